//! The HTTP accept loop. Hand-rolled around hyper-util (rather than `axum::serve`) because it
//! needs a per-connection handle: a slow consumer's socket is torn down from the router, and
//! graceful shutdown waits for each connection under our own deadline.

use std::{net::SocketAddr, time::Duration};

use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

/// Per-TCP-connection facts handed to handlers as a request extension.
#[derive(Clone, Debug)]
pub struct ConnContext {
    pub peer: SocketAddr,
    /// Cancelling it closes the TCP connection at once.
    pub abort: CancellationToken,
}

/// Accepts connections on `listener` until `shutdown` is cancelled, each served by `app` on a
/// task of `tracker`. On shutdown, connections finish their current response (SSE streams are
/// ended by the router) and then close.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Events are small and latency matters; coalescing happens in the body instead.
        let _ = stream.set_nodelay(true);
        let abort = CancellationToken::new();
        let ctx = ConnContext { peer, abort: abort.clone() };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ctx.clone());
            app.clone().oneshot(req)
        });
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = abort.cancelled() => Ok(()),
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => r,
                        () = abort.cancelled() => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
}
