//! HTTP/JSON on the gRPC port: the unary `ssegate.v1.Publisher` methods as
//! `POST /ssegate.v1.Publisher/<Method>` with `Content-Type: application/json` (or
//! `application/proto`), following the Connect protocol's unary rules, so plain HTTP clients
//! (curl, Feign, RestTemplate) and Connect clients both work.
//!
//! A tower layer in front of the gRPC stack dispatches on the content type: `application/grpc*`
//! passes through untouched; anything else on the publisher's paths is answered here, and
//! anything else elsewhere gets a plain-text 404 naming the right paths (`Route`). A publisher
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
use transcode::{Codec, PROCEDURES, STREAMING};

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
        match route(&req) {
            Route::Grpc => {
                let fut = self.inner.call(req);
                Box::pin(async move { Ok(fut.await?.map(Either::Left)) })
            }
            Route::Connect => {
                // The clone that was made ready is the one called (tower's usual swap).
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let max = self.max_message_bytes;
                Box::pin(async move { Ok(call::unary(inner, req, max).await.map(Either::Right)) })
            }
            Route::NotFound => {
                tracing::debug!(method = %req.method(), path = req.uri().path(), "neither gRPC nor Connect: 404");
                Box::pin(async { Ok(error::not_found().map(Either::Right)) })
            }
        }
    }
}

/// Who answers a request on the gRPC port.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// A gRPC content type (`application/grpc`, `+proto`, `-web`, …): the gRPC stack, whatever
    /// the path (tonic answers an unknown method `UNIMPLEMENTED`, as gRPC requires).
    Grpc,
    /// A publisher method (or, with a Connect content type, an unknown one, which Connect
    /// answers `unimplemented`): this layer.
    Connect,
    /// Anything else (a browser, a REST client on the wrong port or path: `GET /sse/push`,
    /// `POST /v1/publish`): a plain 404 saying where to go. Passed on, tonic would answer
    /// `200 OK` with `grpc-status: 12` and an empty body, which such clients take for success.
    NotFound,
}

fn route<B>(req: &Request<B>) -> Route {
    // Content types are case-insensitive.
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.get(..16).is_some_and(|p| p.eq_ignore_ascii_case("application/grpc")));
    if grpc {
        return Route::Grpc;
    }
    match req.uri().path().strip_prefix(PREFIX) {
        Some(name) if STREAMING.contains(&name) || PROCEDURES.iter().any(|p| p.name == name) => Route::Connect,
        Some(_) if Codec::from_headers(req.headers()).is_ok() => Route::Connect,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, content_type: Option<&str>) -> Request<()> {
        let b = Request::builder().method(method).uri(path);
        let b = match content_type {
            Some(ct) => b.header(header::CONTENT_TYPE, ct),
            None => b,
        };
        b.body(()).unwrap()
    }

    #[test]
    fn requests_are_routed_by_content_type_then_path() {
        let cases = [
            ("POST", "/ssegate.v1.Publisher/Publish", Some("application/grpc"), Route::Grpc),
            ("POST", "/ssegate.v1.Publisher/Nope", Some("Application/GRPC+proto"), Route::Grpc),
            ("POST", "/grpc.health.v1.Health/Check", Some("application/grpc"), Route::Grpc),
            ("POST", "/anything", Some("application/grpc-web"), Route::Grpc),
            ("POST", "/ssegate.v1.Publisher/Publish", Some("application/json"), Route::Connect),
            // A known method is Connect's to refuse (405, 415), whatever the method and type.
            ("GET", "/ssegate.v1.Publisher/Stats", None, Route::Connect),
            ("POST", "/ssegate.v1.Publisher/Broadcast", Some("text/plain"), Route::Connect),
            ("POST", "/ssegate.v1.Publisher/PublishStream", Some("application/json"), Route::Connect),
            ("POST", "/ssegate.v1.Publisher/WatchPresence", Some("application/json"), Route::Connect),
            ("POST", "/ssegate.v1.Publisher/Nope", Some("application/json"), Route::Connect),
            ("POST", "/ssegate.v1.Publisher/Nope", Some("application/proto"), Route::Connect),
            ("POST", "/ssegate.v1.Publisher/Nope", None, Route::NotFound),
            ("GET", "/sse/push?id=alice&content=hi", None, Route::NotFound),
            ("POST", "/v1/publish", Some("application/json"), Route::NotFound),
            ("POST", "/grpc.health.v1.Health/Check", Some("application/json"), Route::NotFound),
            ("GET", "/", None, Route::NotFound),
        ];
        for (method, path, ct, want) in cases {
            assert_eq!(route(&req(method, path, ct)), want, "{method} {path} {ct:?}");
        }
    }
}
