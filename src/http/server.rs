//! The HTTP accept loop. Hand-rolled (rather than `axum::serve`) because it reads each
//! connection's request head itself, with a deadline: an HTTP/1.1 `GET /v1/events` is admitted
//! by the same axum route as everything else and then served without hyper (`stream.rs`);
//! everything else is handed to hyper-util's auto (HTTP/1.1 + h2) builder with the bytes
//! already read. Connections served by hyper get a per-connection abort token (a slow
//! consumer's socket is torn down from the router) and graceful shutdown under our deadline.

use std::{
    cell::Cell,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulConnection,
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
use crate::{
    net::{self, ActiveGuard, Admission, Gate, Guarded, Refusal, Timeouts, Tracked},
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
    /// Time a client may take to send its request headers (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head accepted (431 beyond it on HTTP/1.1).
    pub max_header_bytes: usize,
    /// Most TCP connections from one IP address; 0 means no limit.
    pub max_connections_per_ip: usize,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Most concurrent streams on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
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

/// What every connection task of one listener shares.
struct Shared {
    app: axum::Router,
    h1: http1::Builder,
    h2: http2::Builder<StreamExec>,
    limits: ServerLimits,
    metrics: Arc<EdgeMetrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
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
        .header_read_timeout(limits.header_read_timeout)
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
            Refusal::DescriptorBudget => Rejection::DescriptorBudget,
            Refusal::PendingConnections | Refusal::EvictedOldestPending => Rejection::PendingConnections,
        });
    };
    let accept_shared = shared.clone();
    net::accept_loop(listener, gate, shared.shutdown.clone(), refused, move |stream, peer, admission| {
        let shared = &accept_shared;
        let limits = &shared.limits;
        let Some(slot) = per_ip.acquire(peer.ip(), limits.max_connections_per_ip) else {
            shared.metrics.rejected(Rejection::MaxConnectionsPerIp);
            tracing::warn!(%peer, limit = limits.max_connections_per_ip, "connection refused: too many from this address");
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
struct Conn {
    peer: SocketAddr,
    /// Its place in the per-address count.
    slot: IpSlot,
    /// Its places in the port's counts of open and not yet admitted sockets.
    admission: Admission,
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

async fn serve_tls(stream: tokio::net::TcpStream, conn: Conn, acceptor: TlsAcceptor, shared: &Shared) {
    let peer = conn.peer;
    let evicted = conn.admission.pending.evicted();
    let handshake = tokio::select! {
        r = tokio::time::timeout(shared.limits.header_read_timeout, acceptor.accept(stream)) => r,
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
    let evicted = conn.admission.pending.evicted();
    let read = tokio::select! {
        r = tokio::time::timeout(limits.header_read_timeout, head::read(&mut io, &mut buf, limits.max_header_bytes)) => r,
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

/// Serves a connection with hyper (HTTP/1.1 keep-alive, or h2), replaying `read` first. The
/// connection is closed once idle (`net::idle`): no first request in time, or no request in
/// flight for the idle timeout.
async fn serve_hyper<IO>(io: IO, read: Bytes, conn: Conn, shared: &Shared, h2: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn { peer, slot: _slot, admission } = conn;
    let timeouts = Timeouts { first_request: shared.limits.header_read_timeout, idle: shared.limits.idle_timeout };
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

/// Calls the app; the request counts as in flight until its response body is done.
async fn call(
    app: axum::Router,
    req: http::Request<Incoming>,
    guard: ActiveGuard,
) -> Result<http::Response<Tracked<axum::body::Body>>, std::convert::Infallible> {
    let Ok(resp) = app.oneshot(req).await;
    Ok(resp.map(|body| Tracked::new(body, Some(guard))))
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
        move |stream, _peer, admission| {
            let io = Guarded::admitted(stream, timeouts, admission);
            let activity = io.activity().clone();
            let app = app.clone();
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
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
const H2_SEND_BUFFER: usize = 64 * 1024;

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
struct StreamExec(TaskTracker);

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
