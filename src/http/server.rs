//! The HTTP accept loop. Hand-rolled (rather than `axum::serve`) because it reads each
//! connection's request head itself, with a deadline: an HTTP/1.1 `GET /v1/events` is admitted
//! by the same axum route as everything else and then served without hyper (`stream.rs`);
//! everything else is handed to hyper (`hyper_conn.rs`: HTTP/1.1 or h2) with the bytes already
//! read. The per-address count is `per_ip.rs`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use super::{
    head::{self, Head},
    hyper_conn::{H2_SEND_BUFFER, StreamExec, serve_hyper},
    per_ip::{IpSlot, PerIp, refuse},
    stream::{self, FastPath, Handoff},
};
use crate::{
    net::{self, Admission, Gate, Refusal, Timeouts},
    telemetry::metrics::{EdgeMetrics, Rejection},
};

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
    /// Time a client may take to send its first request's headers (slowloris), and after which
    /// a connection with no request in flight is closed.
    pub timeouts: Timeouts,
    /// Largest request head accepted (431 beyond it on HTTP/1.1).
    pub max_header_bytes: usize,
    /// Most TCP connections from one IP address; 0 means no limit.
    pub max_connections_per_ip: usize,
    /// Most concurrent streams on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
}

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const HEAD_TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n\
x-content-type-options: nosniff\r\n\
content-length: 44\r\nconnection: close\r\n\r\nrequest head larger than --max-header-bytes\n";

/// Largest answer body (an error message) the fast path serializes.
const MAX_ANSWER: usize = 64 * 1024;

/// What every connection task of one listener shares.
pub(super) struct Shared {
    pub(super) app: axum::Router,
    pub(super) h1: http1::Builder,
    pub(super) h2: http2::Builder<StreamExec>,
    pub(super) limits: ServerLimits,
    pub(super) metrics: Arc<EdgeMetrics>,
    pub(super) shutdown: CancellationToken,
    pub(super) tracker: TaskTracker,
}

/// Accepts connections on `listener` until `shutdown` is cancelled, each served on a task of
/// `tracker`, within the port's budget (`gate`). On shutdown, connections finish their current
/// response (SSE streams are ended by the router) and then close.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    gate: Arc<Gate>,
    app: axum::Router,
    limits: ServerLimits,
    tls: Option<TlsAcceptor>,
    metrics: Arc<EdgeMetrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.timeouts.first_request)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let mut h2 = http2::Builder::new(StreamExec(tracker.clone()));
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_streams_per_connection)
        // A stream whose reader stalls holds at most this much in h2's buffer; the rest waits in
        // its mailbox, whose bound cuts it off (that stream only) as it would an HTTP/1.1 reader.
        .max_send_buf_size(H2_SEND_BUFFER);
    let per_ip = Arc::new(PerIp::default());
    let shared = Arc::new(Shared { app, h1, h2, limits, metrics, shutdown, tracker: tracker.clone() });
    let refused_metrics = shared.metrics.clone();
    let refused = move |why: Refusal, _peer: SocketAddr| {
        refused_metrics.rejected(match why {
            Refusal::DescriptorBudget | Refusal::EvictedOldestOpen => Rejection::DescriptorBudget,
            Refusal::EvictedOldestPending => Rejection::PendingConnections,
        });
    };
    let accept_shared = shared.clone();
    net::accept_loop(listener, gate, shared.shutdown.clone(), refused, move |stream, peer, admission| {
        let shared = &accept_shared;
        let limits = &shared.limits;
        let Some(slot) = per_ip.acquire(peer.ip(), limits.max_connections_per_ip) else {
            shared.metrics.rejected(Rejection::MaxConnectionsPerIp);
            let limit = limits.max_connections_per_ip;
            let reason = "too many connections from this address (--max-connections-per-ip)";
            tracing::warn!(status = 429, %peer, limit, reason, "connection refused: too many from this address");
            tracker.spawn(refuse(stream));
            return;
        };
        // Events are small and latency matters; coalescing happens in the router instead.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        let conn = Conn { peer, slot, admission };
        tracker.spawn(async move {
            match tls {
                None => serve_conn(stream, conn, &shared, false).await,
                // Boxed: a TLS session is large, and plain connections must not carry its room.
                Some(acceptor) => Box::pin(serve_tls(stream, conn, acceptor, &shared)).await,
            }
        });
    })
    .await;
}

/// What a connection holds from accept to close.
pub(super) struct Conn {
    pub(super) peer: SocketAddr,
    /// Its place in the per-address count.
    pub(super) slot: IpSlot,
    /// Its places in the port's counts of open and not yet admitted sockets.
    pub(super) admission: Admission,
}

async fn serve_tls(stream: tokio::net::TcpStream, conn: Conn, acceptor: TlsAcceptor, shared: &Shared) {
    let peer = conn.peer;
    conn.admission.pending.watch();
    let evicted = conn.admission.pending.evicted();
    let handshake = tokio::select! {
        r = tokio::time::timeout(shared.limits.timeouts.first_request, acceptor.accept(stream)) => r,
        () = evicted => return tracing::debug!(%peer, "pending TLS handshake evicted for a newer connection"),
    };
    match handshake {
        Ok(Ok(tls)) => {
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_conn(tls, conn, shared, h2).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves one connection (plain or TLS): reads the request head within the header timeout,
/// then serves a stream itself or hands the connection to hyper. What `conn` holds is held as
/// long as the connection is.
async fn serve_conn<IO>(mut io: IO, conn: Conn, shared: &Shared, h2: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    if h2 {
        return Box::pin(serve_hyper(io, Bytes::new(), conn, shared, true)).await;
    }
    let mut buf = Vec::new();
    let limits = &shared.limits;
    conn.admission.pending.watch();
    let evicted = conn.admission.pending.evicted();
    let read = tokio::select! {
        r = tokio::time::timeout(limits.timeouts.first_request, head::read(&mut io, &mut buf, limits.max_header_bytes)) => r,
        () = shared.shutdown.cancelled() => return,
        () = evicted => return tracing::debug!(%peer, received = buf.len(), "pending connection evicted for a newer one"),
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
            // A bad request, like a 400: the client's mistake, at INFO.
            let max_header_bytes = limits.max_header_bytes;
            tracing::info!(status = 431, %peer, max_header_bytes, reason = "request head too large", "request refused");
            let _ = answer(&mut io, HEAD_TOO_LARGE).await;
        }
        Head::Other(read) => {
            let h2 = read.starts_with(head::H2_PREFACE);
            Box::pin(serve_hyper(io, read, conn, shared, h2)).await;
        }
        Head::Stream(req) => {
            let Conn { slot, admission, .. } = conn;
            // A whole request arrived: no longer pending; the socket keeps its open place.
            let open = admission.open;
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
                        let _held = (slot, open);
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
