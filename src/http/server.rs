//! The HTTP accept loop. Hand-rolled around hyper-util (rather than `axum::serve`) because it
//! needs a per-connection handle: a slow consumer's socket is torn down from the router, and
//! graceful shutdown waits for each connection under our own deadline.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::telemetry::metrics::{EdgeMetrics, Rejection};

/// Per-TCP-connection facts handed to handlers as a request extension.
#[derive(Clone, Debug)]
pub struct ConnContext {
    pub peer: SocketAddr,
    /// Cancelling it closes the TCP connection at once.
    pub abort: CancellationToken,
}

/// Limits that protect the accept loop from hostile clients.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Time a client may take to send its request headers (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head accepted (431 beyond it on HTTP/1.1).
    pub max_header_bytes: usize,
    /// Most TCP connections from one IP address; 0 means no limit.
    pub max_connections_per_ip: usize,
}

/// Open TCP connections per peer IP address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// Holds one connection's place in `PerIp`; gives it back when dropped.
struct IpSlot(Arc<PerIp>, IpAddr);

impl PerIp {
    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

const TOO_MANY_FROM_IP: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\n\
retry-after: 5\r\nconnection: close\r\ncontent-length: 52\r\n\r\n\
too many connections from this address; retry later\n";

/// Accepts connections on `listener` until `shutdown` is cancelled, each served by `app` on a
/// task of `tracker`. On shutdown, connections finish their current response (SSE streams are
/// ended by the router) and then close.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    metrics: Arc<EdgeMetrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder.http2().max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let per_ip = Arc::new(PerIp::default());
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
        let Some(slot) = per_ip.acquire(peer.ip(), limits.max_connections_per_ip) else {
            metrics.rejected(Rejection::MaxConnectionsPerIp);
            tracing::warn!(%peer, limit = limits.max_connections_per_ip, "connection refused: too many from this address");
            // Answer in a task: a client that does not read must not stall the accept loop.
            // Then half-close and drain what it sent, so the close is a FIN the client can
            // read the answer before, not a reset that discards it.
            let mut stream = stream;
            tracker.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    stream.write_all(TOO_MANY_FROM_IP).await?;
                    stream.shutdown().await?;
                    let mut sink = [0u8; 4096];
                    while stream.read(&mut sink).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                })
                .await;
            });
            continue;
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
        let tls = tls.clone();
        let handshake_timeout = limits.header_read_timeout;
        tracker.spawn(async move {
            let _slot = slot;
            let result = match tls {
                None => serve_io(&builder, TokioIo::new(stream), service, &abort, &shutdown).await,
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_io(&builder, TokioIo::new(tls), service, &abort, &shutdown).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
}

type Builder = auto::Builder<TokioExecutor>;

/// Serves one connection (plain or TLS) until it ends, is aborted, or shutdown completes it.
async fn serve_io<I, S, B>(
    builder: &Builder,
    io: TokioIo<I>,
    service: S,
    abort: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(io, service);
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
