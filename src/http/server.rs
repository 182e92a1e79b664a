//! The HTTP accept loop. Hand-rolled (rather than `axum::serve`) because it reads each
//! connection's request head itself, with a deadline: an HTTP/1.1 `GET /v1/events` is admitted
//! by the same axum route as everything else and then served without hyper (`stream.rs`);
//! everything else is handed to hyper-util's auto (HTTP/1.1 + h2) builder with the bytes
//! already read. Connections served by hyper get a per-connection abort token (a slow
//! consumer's socket is torn down from the router) and graceful shutdown under our deadline.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use super::{
    head::{self, Head, Rewind},
    stream::{self, FastPath, Handoff},
};
use crate::telemetry::metrics::{EdgeMetrics, Rejection};

/// Per-TCP-connection facts handed to handlers as a request extension.
#[derive(Clone, Debug)]
pub struct ConnContext {
    pub peer: SocketAddr,
    /// Cancelling it closes a hyper-served connection at once (streams on the HTTP/1.1 fast
    /// path are aborted through their mailbox instead and carry none).
    pub abort: Option<CancellationToken>,
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

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const HEAD_TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 44\r\nconnection: close\r\n\r\nrequest head larger than --max-header-bytes\n";

/// Largest answer body (an error message) the fast path serializes.
const MAX_ANSWER: usize = 64 * 1024;

type Builder = auto::Builder<TokioExecutor>;

/// What every connection task of one listener shares.
struct Shared {
    app: axum::Router,
    builder: Builder,
    limits: ServerLimits,
    metrics: Arc<EdgeMetrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Accepts connections on `listener` until `shutdown` is cancelled, each served on a task of
/// `tracker`. On shutdown, connections finish their current response (SSE streams are ended
/// by the router) and then close.
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
    let shared = Arc::new(Shared { app, builder, limits, metrics, shutdown, tracker: tracker.clone() });
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break,
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
        let limits = &shared.limits;
        let Some(slot) = per_ip.acquire(peer.ip(), limits.max_connections_per_ip) else {
            shared.metrics.rejected(Rejection::MaxConnectionsPerIp);
            tracing::warn!(%peer, limit = limits.max_connections_per_ip, "connection refused: too many from this address");
            tracker.spawn(refuse(stream));
            continue;
        };
        // Events are small and latency matters; coalescing happens in the router instead.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            match tls {
                None => serve_conn(stream, peer, &shared, false, slot).await,
                // Boxed: a TLS session is large, and plain connections must not carry its room.
                Some(acceptor) => Box::pin(serve_tls(stream, peer, acceptor, &shared, slot)).await,
            }
        });
    }
}

/// Answers 429 to a connection over the per-address limit. In a task: a client that does not
/// read must not stall the accept loop. Then half-closes and drains what it sent, so the close
/// is a FIN the client can read the answer before, not a reset that discards it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(TOO_MANY_FROM_IP).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

async fn serve_tls(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: &Shared,
    slot: IpSlot,
) {
    match tokio::time::timeout(shared.limits.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_conn(tls, peer, shared, h2, slot).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves one connection (plain or TLS): reads the request head within the header timeout,
/// then serves a stream itself or hands the connection to hyper. `slot` (its place in the
/// per-address count) is held as long as the connection is.
async fn serve_conn<IO>(mut io: IO, peer: SocketAddr, shared: &Shared, h2: bool, slot: IpSlot)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        return Box::pin(serve_hyper(io, Bytes::new(), peer, shared)).await;
    }
    let mut buf = Vec::new();
    let limits = &shared.limits;
    let read = tokio::select! {
        r = tokio::time::timeout(limits.header_read_timeout, head::read(&mut io, &mut buf, limits.max_header_bytes)) => r,
        () = shared.shutdown.cancelled() => return,
    };
    let head = match read {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "reading the request head failed"),
        Err(_) => {
            tracing::debug!(%peer, received = buf.len(), "request head not received in time");
            if !buf.is_empty() {
                let _ = answer(&mut io, REQUEST_TIMEOUT).await;
            }
            return;
        }
    };
    drop(buf);
    match head {
        Head::Closed => {}
        Head::TooLarge => {
            shared.metrics.rejected(Rejection::BadRequest);
            let _ = answer(&mut io, HEAD_TOO_LARGE).await;
        }
        Head::Other(read) => Box::pin(serve_hyper(io, read, peer, shared)).await,
        Head::Stream(req) => {
            let mut req = *req;
            req.extensions_mut().insert(ConnContext { peer, abort: None });
            req.extensions_mut().insert(FastPath);
            let Ok(resp) = Box::pin(shared.app.clone().oneshot(req)).await;
            let (parts, body) = resp.into_parts();
            match parts.extensions.get::<Handoff>().and_then(Handoff::take) {
                Some(start) => {
                    let head = stream::response_head(&parts, None);
                    let metrics = shared.metrics.clone();
                    // The stream gets a task of its own, sized to what it holds while idle;
                    // this one, sized for reading heads, admission and hyper, ends here.
                    shared.tracker.spawn(async move {
                        let _slot = slot;
                        stream::serve(io, head, start, metrics).await;
                    });
                }
                None => {
                    let body = axum::body::to_bytes(body, MAX_ANSWER).await.unwrap_or_default();
                    let mut out = stream::response_head(&parts, Some(body.len()));
                    out.extend_from_slice(&body);
                    let _ = answer(&mut io, &out).await;
                }
            }
        }
    }
}

/// Writes a final answer and closes, within a second (a client that does not read gets no
/// more of our time).
async fn answer<IO: AsyncWrite + Unpin>(io: &mut IO, bytes: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(bytes).await?;
        io.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}

/// Serves a connection with hyper (HTTP/1.1 keep-alive or h2), replaying `read` first.
async fn serve_hyper<IO>(io: IO, read: Bytes, peer: SocketAddr, shared: &Shared)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let abort = CancellationToken::new();
    let ctx = ConnContext { peer, abort: Some(abort.clone()) };
    let app = shared.app.clone();
    let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(ctx.clone());
        app.clone().oneshot(req)
    });
    let io = TokioIo::new(Rewind::new(read, io));
    if let Err(e) = serve_io(&shared.builder, io, service, &abort, &shared.shutdown).await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

/// Serves one connection with hyper until it ends, is aborted, or shutdown completes it.
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
