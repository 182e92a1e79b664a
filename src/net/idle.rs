//! Closing connections that hold a socket without using it.
//!
//! Every accepted socket is wrapped in [`Guarded`], which fails its next read once the
//! connection has been idle too long, so whoever serves it (hyper, tonic, our stream writer)
//! drops it:
//! - until its first request, "too long" is the first-request deadline (`--header-read-timeout`):
//!   a socket that sends nothing, only part of a head, only the HTTP/2 preface, or stalls in the
//!   TLS handshake is closed;
//! - after that, the idle timeout (`--idle-timeout`) while no request is in flight: an HTTP/1.1
//!   keep-alive or HTTP/2 connection with no open stream.
//!
//! Requests in flight are counted by [`Activity::begin`]; the guard it returns lives as long as
//! the response (body included), so an open event stream or `PublishStream` is never idle.
//!
//! Written here rather than taken from a crate: hyper offers a header timeout for HTTP/1.1 only,
//! and neither hyper's HTTP/2 server nor tonic closes a connection that never opens a stream.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use futures_util::task::AtomicWaker;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::listen::{Admission, OpenPermit, PendingPermit};

/// The two deadlines of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accept to the first request (whole head, or HTTP/2 preface and a stream).
    pub first_request: Duration,
    /// With no request in flight, after the first.
    pub idle: Duration,
}

/// Whether a connection has requests in flight, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    active: AtomicUsize,
    /// Milliseconds from `start` to when the last request in flight ended.
    idle_since_ms: AtomicU64,
    served: AtomicBool,
    /// The connection's place among those not yet admitted, given back at the first request.
    pending: Mutex<Option<PendingPermit>>,
    /// The connection's task, woken when its last request in flight ends (the idle deadline
    /// then moves earlier than its timer may be set).
    waker: AtomicWaker,
}

impl Activity {
    fn new(start: Instant, pending: Option<PendingPermit>) -> Arc<Self> {
        Arc::new(Self {
            start,
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
            pending: Mutex::new(pending),
            waker: AtomicWaker::new(),
        })
    }

    /// A request has begun; it is in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        if !self.served.swap(true, Ordering::AcqRel) {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    /// When the connection's current deadline falls, or `None` while requests are in flight.
    fn deadline(&self, timeouts: Timeouts) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let limit = if self.served.load(Ordering::Relaxed) { timeouts.idle } else { timeouts.first_request };
        Some(self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed)) + limit)
    }
}

/// One request in flight (see [`Activity::begin`]).
#[derive(Debug)]
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Relaxed);
        if a.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.waker.wake();
        }
    }
}

/// A socket that fails its reads once its connection has been idle past its deadline.
pub struct Guarded<IO> {
    io: IO,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    /// Where this connection is listed by peer address, if its server finds requests that way.
    registry: Option<(Arc<Registry>, SocketAddr)>,
    _open: Option<OpenPermit>,
    /// Until the first request: completes if the gate evicts this connection for a newer one.
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<IO> Guarded<IO> {
    /// Guards `io`, accepted at `accepted` (the first-request deadline counts from then).
    pub fn new(io: IO, timeouts: Timeouts, accepted: Instant) -> Self {
        Self::build(io, timeouts, accepted, None, None)
    }

    /// Guards a socket the accept loop admitted: holds its place in the port's open count, and
    /// its place among the not yet admitted until its first request.
    pub fn admitted(io: IO, timeouts: Timeouts, admission: Admission) -> Self {
        Self::build(io, timeouts, admission.accepted, Some(admission.open), Some(admission.pending))
    }

    fn build(
        io: IO,
        timeouts: Timeouts,
        accepted: Instant,
        open: Option<OpenPermit>,
        pending: Option<PendingPermit>,
    ) -> Self {
        let evicted = pending.as_ref().map(|p| Box::pin(p.evicted()));
        let activity = Activity::new(accepted, pending);
        let timer = Box::pin(tokio::time::sleep_until(accepted + timeouts.first_request));
        Self { io, activity, timeouts, timer, registry: None, _open: open, evicted }
    }

    /// Lists the connection in `registry` under `peer`, for servers (tonic) whose requests carry
    /// the peer address but no handle of ours.
    pub fn register(mut self, registry: &Arc<Registry>, peer: SocketAddr) -> Self {
        registry.insert(peer, self.activity.clone());
        self.registry = Some((registry.clone(), peer));
        self
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// `Ready` once the deadline has passed with nothing in flight; otherwise registers the
    /// timer for the next check.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(evicted) = &mut self.evicted {
            if self.activity.served.load(Ordering::Relaxed) {
                self.evicted = None;
            } else if evicted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        self.activity.waker.register(cx.waker());
        // Idle since a request ended: the deadline may be earlier than the timer.
        if let Some(at) = self.activity.deadline(self.timeouts)
            && at < self.timer.deadline()
        {
            self.timer.as_mut().reset(at);
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let next = match self.activity.deadline(self.timeouts) {
                // Busy: look again after a full idle period at the earliest.
                None => Instant::now() + self.timeouts.idle,
                Some(at) if at <= Instant::now() => return Poll::Ready(()),
                Some(at) => at,
            };
            self.timer.as_mut().reset(next);
        }
    }
}

impl<IO> Drop for Guarded<IO> {
    fn drop(&mut self) {
        if let Some((registry, peer)) = self.registry.take() {
            registry.remove(peer);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if let Poll::Ready(r) = Pin::new(&mut me.io).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        match me.poll_expired(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle past its deadline")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Connections by peer address, for finding a request's [`Activity`] where the server (tonic)
/// hands requests only the peer address.
#[derive(Debug, Default)]
pub struct Registry(Mutex<HashMap<SocketAddr, Arc<Activity>>>);

impl Registry {
    fn insert(&self, peer: SocketAddr, activity: Arc<Activity>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, activity);
    }

    fn remove(&self, peer: SocketAddr) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer);
    }

    /// Marks a request from `peer` in flight, if that connection is listed.
    pub fn begin(&self, peer: SocketAddr) -> Option<ActiveGuard> {
        let activity = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&peer).cloned();
        activity.map(|a| a.begin())
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped.
pub struct Tracked<B> {
    inner: B,
    _guard: Option<ActiveGuard>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: Option<ActiveGuard>) -> Self {
        Self { inner, _guard: guard }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    const T: Timeouts = Timeouts { first_request: Duration::from_secs(10), idle: Duration::from_secs(60) };

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_its_read_at_the_first_request_deadline() {
        let (_client, server) = duplex(64);
        let mut g = Guarded::new(server, T, Instant::now());
        let started = Instant::now();
        let err = g.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), T.first_request);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_then_the_idle_timeout_counts_from_its_end() {
        let (mut client, server) = duplex(64);
        let mut g = Guarded::new(server, T, Instant::now());
        let guard = g.activity().begin();
        let started = Instant::now();
        let reader = async {
            let mut buf = [0u8; 8];
            assert_eq!(g.read(&mut buf).await.unwrap(), 1);
            (g.read(&mut buf).await.unwrap_err().kind(), Instant::now())
        };
        let driver = async {
            tokio::time::sleep(Duration::from_secs(300)).await;
            client.write_all(b"x").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(guard);
            client
        };
        let ((kind, failed_at), _client) = tokio::join!(reader, driver);
        assert_eq!(kind, io::ErrorKind::TimedOut);
        // In flight for 305 s without being cut, then idle for exactly the idle timeout.
        assert_eq!(failed_at - started, Duration::from_secs(305) + T.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_end_of_the_first_request_not_from_its_deadline() {
        let t = Timeouts { first_request: Duration::from_secs(100), idle: Duration::from_secs(10) };
        let (_client, server) = duplex(64);
        let mut g = Guarded::new(server, t, Instant::now());
        let guard = g.activity().begin();
        let started = Instant::now();
        let reader = async { (g.read(&mut [0u8; 8]).await.unwrap_err().kind(), Instant::now()) };
        let driver = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(guard);
        };
        let ((kind, failed_at), ()) = tokio::join!(reader, driver);
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert_eq!(failed_at - started, Duration::from_secs(15), "5 s in flight, then 10 s idle");
    }

    #[test]
    fn the_registry_finds_a_connection_by_peer_until_it_is_dropped() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let registry = Arc::new(Registry::default());
            let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
            let (_c, s) = duplex(8);
            let g = Guarded::new(s, T, Instant::now()).register(&registry, peer);
            let guard = registry.begin(peer).expect("listed");
            assert!(g.activity().deadline(T).is_none(), "in flight");
            drop(guard);
            assert!(g.activity().deadline(T).is_some());
            drop(g);
            assert!(registry.begin(peer).is_none());
        });
    }
}
