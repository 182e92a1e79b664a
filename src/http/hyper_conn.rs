//! Connections served by hyper (HTTP/1.1 keep-alive, h2, and the admin port): each guarded by
//! `net::idle`, each request counted in flight, and on h2 each stream abortable alone.

use std::{cell::Cell, sync::Arc};

use bytes::Bytes;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulConnection,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use super::{
    body::EventStream,
    head::Rewind,
    server::{Conn, ConnContext, Shared},
};
use crate::net::{self, ActiveGuard, Gate, Guarded, Timeouts, Tracked};

/// Serves a connection with hyper (HTTP/1.1 keep-alive, or h2), replaying `read` first. The
/// connection is closed once idle (`net::idle`): no first request in time, or no request in
/// flight for the idle timeout.
pub(super) async fn serve_hyper<IO>(io: IO, read: Bytes, conn: Conn, shared: &Shared, h2: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn { peer, slot: _slot, admission } = conn;
    let timeouts = shared.limits.timeouts;
    let io = Guarded::admitted(Rewind::new(read, io), timeouts, admission);
    let activity = io.activity().clone();
    let io = TokioIo::new(io);
    let app = shared.app.clone();
    let result = if h2 {
        // Each stream gets its own abort token: a slow consumer's stream is reset alone
        // (`StreamExec`), its neighbours on the connection keep going.
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            let guard = activity.begin();
            let abort = CancellationToken::new();
            NEXT_STREAM_ABORT.with(|slot| slot.set(Some(abort.clone())));
            req.extensions_mut().insert(ConnContext { peer, abort: Some(abort) });
            call(app.clone(), req, guard)
        });
        let conn = shared.h2.serve_connection(io, service);
        drive(conn, &CancellationToken::new(), &shared.shutdown).await
    } else {
        let abort = CancellationToken::new();
        let ctx = ConnContext { peer, abort: Some(abort.clone()) };
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            let guard = activity.begin();
            req.extensions_mut().insert(ctx.clone());
            call(app.clone(), req, guard)
        });
        let conn = shared.h1.serve_connection(io, service);
        drive(conn, &abort, &shared.shutdown).await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

/// Calls the app; the request counts as in flight until its response body is done, and the
/// response, unless it is an admitted event stream, is held to the send-progress deadline
/// (`net::Tracked`: a client that stops taking it, e.g. with an HTTP/2 window of zero, loses
/// its connection after `--send-timeout`).
async fn call(
    app: axum::Router,
    req: http::Request<Incoming>,
    guard: ActiveGuard,
) -> Result<http::Response<Tracked<axum::body::Body>>, std::convert::Infallible> {
    let Ok(resp) = app.oneshot(req).await;
    let stream = resp.extensions().get::<EventStream>().is_some();
    Ok(resp.map(|body| if stream { Tracked::stream(body, Some(guard)) } else { Tracked::new(body, Some(guard)) }))
}

/// Runs a hyper connection until it ends, is aborted, or shutdown completes it.
async fn drive<C>(conn: C, abort: &CancellationToken, shutdown: &CancellationToken) -> hyper::Result<()>
where
    C: GracefulConnection<Error = hyper::Error>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = abort.cancelled() => Ok(()),
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = abort.cancelled() => Ok(()),
            }
        }
    }
}

/// Serves a plain HTTP/1.1 port (the admin port) within its budget: each connection must send
/// its first request within `timeouts.first_request` and is closed when idle.
pub async fn serve_plain(
    listener: TcpListener,
    gate: Arc<Gate>,
    app: axum::Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new()).header_read_timeout(timeouts.first_request);
    let tasks = tracker.clone();
    let stop = shutdown.clone();
    net::accept_loop(
        listener,
        gate,
        shutdown,
        |_, _| {},
        move |stream, peer, admission| {
            let io = Guarded::admitted(stream, timeouts, admission);
            let activity = io.activity().clone();
            let app = app.clone();
            // The peer, for the console's audit lines.
            let ctx = ConnContext { peer, abort: None };
            let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(ctx.clone());
                call(app.clone(), req, activity.begin())
            });
            let conn = h1.serve_connection(TokioIo::new(io), service);
            let stop = stop.clone();
            tasks.spawn(async move {
                let _ = drive(conn, &CancellationToken::new(), &stop).await;
            });
        },
    )
    .await;
}

/// Largest send buffer of one h2 stream (hyper's default is 400 KiB).
pub(super) const H2_SEND_BUFFER: usize = 64 * 1024;

thread_local! {
    /// The abort token of the h2 stream whose request hyper has just handed the service, taken
    /// by `StreamExec` when hyper spawns that stream's task right after, on the same thread.
    static NEXT_STREAM_ABORT: Cell<Option<CancellationToken>> = const { Cell::new(None) };
}

/// The executor of h2 stream tasks: each runs until its stream ends or its abort token is
/// cancelled. Dropping the task drops hyper's handle on the stream, and h2 then resets it
/// (`RST_STREAM`, CANCEL) while the connection's other streams carry on. (hyper offers no
/// other way to end one stream that is waiting for flow-control capacity: it does not poll
/// the body then.)
#[derive(Clone)]
pub(super) struct StreamExec(pub(super) TaskTracker);

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match NEXT_STREAM_ABORT.with(Cell::take) {
            Some(abort) => {
                self.0.spawn(async move {
                    tokio::select! {
                        () = fut => {}
                        () = abort.cancelled() => {}
                    }
                });
            }
            None => {
                self.0.spawn(fut);
            }
        }
    }
}
