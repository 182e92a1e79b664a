//! A tower layer around the gRPC server: one span per call (child of the caller's W3C
//! `traceparent`, when sent), and per-method request counts by status code plus latency.
//!
//! The status of a gRPC call is known only at its end: in the response headers for a
//! "trailers-only" answer (errors), otherwise in the trailers, so the response body is wrapped
//! to see them. A call whose body is dropped before its trailers counts as `CANCELLED`.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::Extractor;
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::{EdgeMetrics, GrpcLabels, MethodLabels};

/// The standard services we serve beside ours (whose methods `build.rs` derives from the
/// proto: `pb::METHODS`); anything else is labelled `unknown` so labels stay bounded.
const STANDARD_METHODS: [&str; 5] = [
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.health.v1.Health/List",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

fn method_name(path: &str) -> &'static str {
    let path = path.strip_prefix('/').unwrap_or(path);
    crate::grpc::pb::METHODS.iter().chain(&STANDARD_METHODS).find(|m| **m == path).copied().unwrap_or("unknown")
}

/// The canonical name of a numeric gRPC status code.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code).ok().and_then(|i| NAMES.get(i)).copied().unwrap_or("UNKNOWN")
}

fn status_in(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

struct Metadata<'a>(&'a HeaderMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[derive(Clone)]
pub struct GrpcTelemetryLayer {
    edge: Arc<EdgeMetrics>,
}

impl GrpcTelemetryLayer {
    pub fn new(edge: Arc<EdgeMetrics>) -> Self {
        Self { edge }
    }
}

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry { inner, edge: self.edge.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
    edge: Arc<EdgeMetrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcTelemetry<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = Response<Recorded<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let method = method_name(req.uri().path());
        let span = tracing::info_span!(
            "grpc",
            otel.name = method,
            rpc.system = "grpc",
            rpc.method = method,
            rpc.grpc.status_code = Empty
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Metadata(req.headers())));
        // Without a `traceparent` the extracted context is empty and the span is a root.
        let _ = span.set_parent(parent);
        let start = Instant::now();
        let edge = self.edge.clone();
        let fut = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let resp = fut.await?;
            let status = status_in(resp.headers());
            let recorder = Recorder { method, start, edge, span };
            Ok(resp.map(|inner| Recorded { inner, recorder: Some(recorder), status }))
        })
    }
}

struct Recorder {
    method: &'static str,
    start: Instant,
    edge: Arc<EdgeMetrics>,
    span: Span,
}

impl Recorder {
    fn finish(self, code: i32) {
        let name = code_name(code);
        self.span.record("rpc.grpc.status_code", code);
        self.edge.grpc_requests.get_or_create(&GrpcLabels { method: self.method, code: name }).inc();
        self.edge
            .grpc_duration
            .get_or_create(&MethodLabels { method: self.method })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A response body that records the call when its status is known.
pub struct Recorded<B> {
    inner: B,
    recorder: Option<Recorder>,
    /// The status from a trailers-only response's headers.
    status: Option<i32>,
}

impl<B> Recorded<B> {
    fn finish(&mut self, code: i32) {
        if let Some(r) = self.recorder.take() {
            r.finish(code);
        }
    }
}

impl<B: Body + Unpin> Body for Recorded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    self.finish(code);
                }
            }
            // An error while streaming: the client sees the call fail without a status.
            Poll::Ready(Some(Err(_))) => self.finish(2),
            Poll::Ready(None) => {
                let code = self.status.unwrap_or(2);
                self.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the server is stopping).
        self.finish(self.status.unwrap_or(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_proto_is_its_own_label_and_anything_else_is_unknown() {
        assert_eq!(crate::grpc::pb::METHODS.len(), 10, "the Publisher's methods, from the proto");
        for m in crate::grpc::pb::METHODS.iter().chain(&STANDARD_METHODS) {
            assert_eq!(method_name(&format!("/{m}")), *m);
        }
        assert_eq!(method_name("/ssegate.v1.Publisher/Nope"), "unknown");
        assert_eq!(method_name("/../etc"), "unknown");
    }
}
