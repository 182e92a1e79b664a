//! A panic while serving a call fails that call alone, with `INTERNAL`, instead of resetting its
//! HTTP/2 stream with no status (gRPC) or closing the connection (HTTP/1.1, Connect/JSON).
//!
//! Why a layer of our own rather than tower-http's `CatchPanicLayer::custom`: that one catches
//! a panic in the future that produces the response head only. A streaming call's handler (the
//! answers of `PublishStream`) runs while hyper polls the response body, so a panic there would
//! still reset the stream after some answers were sent, with no status for the caller. This
//! layer also polls the body under `catch_unwind` and, after a panic, ends it with trailers
//! saying `INTERNAL`, so every answer sent before stands and the call ends with a status. (It
//! also keeps the body unboxed and needs no other tower-http feature.)
//!
//! It sits innermost in the gRPC port's stack, inside the telemetry layer (which then counts
//! the call as `INTERNAL`) and the Connect layer (which turns that status into a Connect
//! `internal` error, HTTP 500, for a JSON caller): what reaches it is always a gRPC call.

use std::{
    any::Any,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::{FutureExt, future::BoxFuture};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, header};
use http_body::Frame;
use tonic::Status;
use tower::{Layer, Service};

/// What the caller is told: never the panic's message (internal detail), which is logged.
const MESSAGE: &str = "internal error: the server failed while handling this call (logged)";

/// Wraps a service so that a panic in its `call`, its future or its response body answers
/// `INTERNAL` for that call.
#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanicLayer;

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for CatchPanic<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body + Unpin,
{
    type Response = Response<CatchPanicBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Kept for the log line only (a `Uri` clone shares its bytes).
        let uri = req.uri().clone();
        let fut = match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(fut) => fut,
            Err(panic) => {
                log(uri.path(), &*panic);
                return Box::pin(async { Ok(trailers_only()) });
            }
        };
        Box::pin(async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(resp) => Ok(resp?.map(|body| CatchPanicBody { state: State::Inner(body), uri: Some(uri) })),
                Err(panic) => {
                    log(uri.path(), &*panic);
                    Ok(trailers_only())
                }
            }
        })
    }
}

/// The status of a call that panicked.
fn internal() -> Status {
    Status::internal(MESSAGE)
}

/// gRPC's trailers-only answer (the status in the head, an empty body), as tonic answers an
/// error returned by a handler.
fn trailers_only<RB>() -> Response<CatchPanicBody<RB>> {
    let mut resp = Response::new(CatchPanicBody { state: State::Done, uri: None });
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    status_headers(headers);
    resp
}

fn status_headers(headers: &mut HeaderMap) {
    // A constant ASCII message always makes valid headers; the code alone would still do.
    if internal().add_header(headers).is_err() {
        headers.insert("grpc-status", HeaderValue::from_static("13"));
    }
}

/// The text of a panic's payload (`panic!` with a message gives a `&str` or a `String`).
fn message(panic: &(dyn Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}

/// `call`: the request's path, or what part of a call panicked.
fn log(call: &str, panic: &(dyn Any + Send)) {
    tracing::error!(call, panic = message(panic), "a call panicked; it was answered INTERNAL");
}

/// Runs `fut`, a piece of a call that must fail alone (one item of a `PublishStream`): a panic
/// in it becomes `INTERNAL` for that piece, logged, and the call goes on.
/// The status for a panic caught elsewhere (`catch_unwind`), which is logged.
pub(super) fn caught(what: &str, panic: &(dyn Any + Send)) -> Status {
    log(what, panic);
    internal()
}

pub(super) async fn catching<T>(what: &str, fut: impl Future<Output = T>) -> Result<T, Status> {
    AssertUnwindSafe(fut).catch_unwind().await.map_err(|panic| {
        log(what, &*panic);
        internal()
    })
}

/// A response body polled under `catch_unwind`: after a panic, the inner body is dropped and
/// the call ends with `INTERNAL` trailers (everything sent before stands).
pub struct CatchPanicBody<B> {
    state: State<B>,
    /// For the log line.
    uri: Option<Uri>,
}

enum State<B> {
    Inner(B),
    /// Ended, or the inner body panicked and is gone.
    Done,
}

impl<B: http_body::Body + Unpin> http_body::Body for CatchPanicBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let me = &mut *self;
        match &mut me.state {
            State::Inner(body) => match catch_unwind(AssertUnwindSafe(|| Pin::new(body).poll_frame(cx))) {
                Ok(frame) => frame,
                Err(panic) => {
                    log(me.uri.as_ref().map_or("", Uri::path), &*panic);
                    // Dropping what panicked may panic too; either way it is gone.
                    let old = std::mem::replace(&mut me.state, State::Done);
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(old)));
                    let mut trailers = HeaderMap::new();
                    status_headers(&mut trailers);
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
            },
            State::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Inner(body) => body.is_end_stream(),
            State::Done => true,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.state {
            State::Inner(body) => body.size_hint(),
            State::Done => http_body::SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tonic::Code;
    use tower::{ServiceExt, service_fn};

    use super::*;

    fn request() -> Request<()> {
        Request::builder().uri("/ssegate.v1.Publisher/Publish").body(()).unwrap()
    }

    /// The status a trailers-only answer carries in its head.
    fn head_status<B>(resp: &Response<B>) -> Option<Status> {
        Status::from_header_map(resp.headers())
    }

    #[tokio::test]
    async fn a_panic_in_the_handler_future_answers_internal() {
        let svc = CatchPanicLayer.layer(service_fn(|_: Request<()>| async {
            if true {
                panic!("handler bug");
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));
        let resp = svc.oneshot(request()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        let status = head_status(&resp).expect("a trailers-only status");
        assert_eq!((status.code(), status.message()), (Code::Internal, MESSAGE));
        let body = resp.into_body().collect().await.unwrap();
        assert!(body.trailers().is_none() && body.to_bytes().is_empty());
    }

    /// A service whose `call` itself panics, before any future exists.
    #[derive(Clone)]
    struct PanicsInCall;

    impl Service<Request<()>> for PanicsInCall {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            panic!("bug in call");
        }
    }

    #[tokio::test]
    async fn a_panic_in_call_answers_internal() {
        let resp = CatchPanicLayer.layer(PanicsInCall).oneshot(request()).await.unwrap();
        assert_eq!(head_status(&resp).map(|s| s.code()), Some(Code::Internal));
    }

    /// A streaming answer: one message, then the handler panics while making the next.
    struct PanicsOnSecondFrame(u8);

    impl http_body::Body for PanicsOnSecondFrame {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0 += 1;
            if self.0 > 1 {
                panic!("bug while making item 2");
            }
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"item 1")))))
        }
    }

    #[tokio::test]
    async fn a_panic_in_the_body_ends_it_with_internal_trailers_after_what_was_sent() {
        let svc = CatchPanicLayer
            .layer(service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(PanicsOnSecondFrame(0))) }));
        let resp = svc.oneshot(request()).await.unwrap();
        assert!(head_status(&resp).is_none(), "the head went out before the panic");
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "item 1", "what was sent before stands");
        let trailers = body.frame().await.unwrap().unwrap().into_trailers().unwrap();
        let status = Status::from_header_map(&trailers).expect("a status in the trailers");
        assert_eq!((status.code(), status.message()), (Code::Internal, MESSAGE));
        assert!(http_body::Body::is_end_stream(&body));
        assert!(body.frame().await.is_none(), "the body ends after the trailers");
    }

    #[tokio::test]
    async fn calls_that_do_not_panic_pass_unchanged() {
        let svc = CatchPanicLayer.layer(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"answer"))))
        }));
        let resp = svc.oneshot(request()).await.unwrap();
        assert!(head_status(&resp).is_none());
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "answer");
    }

    #[tokio::test]
    async fn a_panicking_piece_is_internal_and_the_next_runs() {
        let failed: Result<(), Status> = catching("item 1", async { panic!("bug in item 1") }).await;
        assert_eq!(failed.unwrap_err().code(), Code::Internal);
        assert_eq!(catching("item 2", async { 2 }).await.unwrap(), 2);
    }
}
