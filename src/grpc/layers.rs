//! Tower layers of the gRPC port: counting calls in flight per connection (for idle
//! connections, `net::idle`), and one status mapping tonic does not let us make elsewhere.

use std::{future::Future, pin::Pin, sync::Arc};

use http::HeaderValue;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::net::{Registry, Tracked};

/// Counts each call as in flight on its connection (found by peer address) until its response
/// ends, so a connection with no call in flight can be closed when idle.
#[derive(Clone)]
pub struct InFlightLayer(pub Arc<Registry>);

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight { inner, registry: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    registry: Arc<Registry>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for InFlight<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ext = req.extensions();
        let peer = ext
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()));
        let guard = peer.and_then(|p| self.registry.begin(p));
        let fut = self.inner.call(req);
        Box::pin(async move { Ok(fut.await?.map(|body| Tracked::new(body, guard))) })
    }
}

/// Answers `RESOURCE_EXHAUSTED` (as grpc-go and grpc-java do) where tonic refuses a request
/// message over its decoding limit with `OUT_OF_RANGE` before our service sees it, whether the
/// status travels in the response headers or its trailers.
/// The message says the configured limit (`--grpc-max-message-bytes`).
#[derive(Clone)]
pub struct OversizeLayer(pub HeaderValue);

impl OversizeLayer {
    pub fn new(max_message_bytes: usize) -> Self {
        let message = format!("request message over the limit of {max_message_bytes} bytes (--grpc-max-message-bytes)");
        Self(HeaderValue::from_str(&message).unwrap_or_else(|_| HeaderValue::from_static("request message too large")))
    }
}

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversize(inner, self.0.clone())
    }
}

#[derive(Clone)]
pub struct Oversize<S>(S, HeaderValue);

/// Rewrites tonic's "message too large" status in place.
fn remap_oversize(h: &mut http::HeaderMap, message: &HeaderValue) {
    let too_large = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains("length%20too%20large"));
    if too_large {
        h.insert("grpc-status", HeaderValue::from_static("8"));
        h.insert("grpc-message", message.clone());
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for Oversize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<OversizeBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        let message = self.1.clone();
        Box::pin(async move {
            let mut resp = fut.await?;
            remap_oversize(resp.headers_mut(), &message);
            Ok(resp.map(|b| OversizeBody(b, message)))
        })
    }
}

/// A response body whose trailers go through `remap_oversize`.
pub struct OversizeBody<B>(B, HeaderValue);

impl<B: http_body::Body + Unpin> http_body::Body for OversizeBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let me = &mut *self;
        Pin::new(&mut me.0).poll_frame(cx).map(|f| {
            f.map(|f| {
                f.map(|mut frame| {
                    if let Some(t) = frame.trailers_mut() {
                        remap_oversize(t, &me.1);
                    }
                    frame
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}
