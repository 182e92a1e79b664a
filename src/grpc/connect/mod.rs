//! HTTP/JSON on the gRPC port: the unary `ssegate.v1.Publisher` methods as
//! `POST /ssegate.v1.Publisher/<Method>` with `Content-Type: application/json` (or
//! `application/proto`), following the Connect protocol's unary rules, so plain HTTP clients
//! (curl, Feign, RestTemplate) and Connect clients both work.
//!
//! A tower layer in front of the gRPC stack dispatches on the content type: `application/grpc*`
//! passes through untouched; anything else on the publisher's paths is answered here. Such a
//! call is **transcoded**, never served by a second implementation: the body is parsed with the
//! proto3 JSON mapping generated from the proto (pbjson), re-encoded as a gRPC request with the
//! caller's headers (so `authorization` reaches the same API-key interceptor) and sent through
//! the same stack a gRPC call takes (telemetry, interceptor, `PublisherService`); the gRPC
//! answer is turned back into JSON, and its status into a Connect error with its HTTP status.
//!
//! By concern: this file is the layer and its dispatch; `call.rs` serves one call (the
//! protocol's checks, the body, the gRPC round trip); `transcode.rs` has the content types and
//! the table of methods with their conversions; `error.rs` the errors, Connect's code names and
//! HTTP statuses, and the error body.

mod call;
mod error;
mod transcode;

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response, header};
use http_body_util::{Either, Full};
use tonic::body::Body;
use tower::{Layer, Service};

/// The path prefix of the publisher's methods, on both protocols.
const PREFIX: &str = "/ssegate.v1.Publisher/";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Answers `application/json` and `application/proto` calls to the publisher's unary methods;
/// passes everything else to the inner (gRPC) service.
#[derive(Clone)]
pub struct ConnectLayer {
    max_message_bytes: usize,
}

impl ConnectLayer {
    /// `max_message_bytes` bounds a request body, as `--grpc-max-message-bytes` bounds a gRPC
    /// message.
    pub fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

impl<S> Layer<S> for ConnectLayer {
    type Service = Connect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Connect { inner, max_message_bytes: self.max_message_bytes }
    }
}

#[derive(Clone)]
pub struct Connect<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S, ResBody> Service<Request<Body>> for Connect<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if !is_connect(&req) {
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(fut.await?.map(Either::Left)) });
        }
        // The clone that was made ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let max = self.max_message_bytes;
        Box::pin(async move { Ok(call::unary(inner, req, max).await.map(Either::Right)) })
    }
}

/// A publisher path without a gRPC content type. Content types are case-insensitive.
fn is_connect<B>(req: &Request<B>) -> bool {
    req.uri().path().starts_with(PREFIX)
        && !req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.get(..16).is_some_and(|p| p.eq_ignore_ascii_case("application/grpc")))
}
