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
//! A connection that is not idle but never takes its answers is closed too (`--send-timeout`):
//! a socket write blocked that long fails (the peer reads nothing: HTTP/1.1 pipelining), and a
//! response in flight that waits that long for the server to take its next frame fails the
//! reads (an HTTP/2 stream granted no flow-control window writes nothing at all). Admitted
//! event streams are exempt from the second ([`Tracked::stream`]): their queue's bound cuts a
//! reader that stops reading, that stream alone.
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

/// The deadlines of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accept to the first request (whole head, or HTTP/2 preface and a stream).
    pub first_request: Duration,
    /// With no request in flight, after the first.
    pub idle: Duration,
    /// The longest a socket write may stay blocked, and a response (other than an admitted
    /// event stream) may wait for the server to take its next frame (`--send-timeout`).
    pub send: Duration,
}

/// Whether a connection has requests in flight, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    active: AtomicUsize,
    /// Milliseconds from `start` to when the last request in flight ended.
    idle_since_ms: AtomicU64,
    served: AtomicBool,
    /// The connection's place among those not yet admitted, given back at the first request
    /// (or, where `admit_on_auth`, at the first authenticated call).
    pending: Mutex<Option<PendingPermit>>,
    /// The gRPC port: a connection stays pending (evictable, within the port's share for
    /// strangers) until a call passes the publisher's credential check, so that health watches
    /// and silent sockets cannot take the places authenticated publishers need.
    admit_on_auth: bool,
    /// Responses in flight (other than admitted event streams) that wait for the server to take
    /// their next frame, and when the connection last made send progress on one of them or one
    /// began waiting: `ms << SENDING_BITS | count`, in one word so that both are read together.
    sending: AtomicU64,
    /// The connection's task, woken when its last request in flight ends, or when a response
    /// begins waiting to send (either deadline then moves earlier than its timer may be set).
    waker: AtomicWaker,
}

/// Bits of [`Activity::sending`] that count responses; the rest are milliseconds from the
/// connection's start (2^40 ms: 34 years).
const SENDING_BITS: u32 = 24;
const SENDING_COUNT: u64 = (1 << SENDING_BITS) - 1;

impl Activity {
    fn new(start: Instant, pending: Option<PendingPermit>, admit_on_auth: bool) -> Arc<Self> {
        Arc::new(Self {
            start,
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
            pending: Mutex::new(pending),
            admit_on_auth,
            sending: AtomicU64::new(0),
            waker: AtomicWaker::new(),
        })
    }

    /// A request has begun; it is in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        if !self.served.swap(true, Ordering::AcqRel) && !self.admit_on_auth {
            self.admit();
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    /// A call on this connection passed the credential check: it is admitted (no longer
    /// pending, so no longer evictable for newcomers).
    pub fn authenticated(&self) {
        self.admit();
    }

    fn admit(&self) {
        let permit = self.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(permit); // outside the lock: its drop wakes the accept loop
    }

    /// The connection now waits for its socket to speak (see `PendingPermit::watch`).
    fn watch(&self) {
        if let Some(p) = &*self.pending.lock().unwrap_or_else(|e| e.into_inner()) {
            p.watch();
        }
    }

    /// Since when responses on this connection (other than admitted event streams) have been
    /// waiting for the server to send their next frame without any send progress, if one is
    /// waiting at all. The send-progress deadline falls `--send-timeout` after it.
    pub fn send_stalled_since(&self) -> Option<Instant> {
        let s = self.sending.load(Ordering::Acquire);
        (s & SENDING_COUNT > 0).then(|| self.start + Duration::from_millis(s >> SENDING_BITS))
    }

    /// Counts a response in or out of waiting for the server to take its next frame (`delta`
    /// of +1, 0 or -1); with `progress`, the server has just taken one (send progress). The
    /// first to begin waiting starts the clock, and wakes the connection's task so that its
    /// timer is set to the send-progress deadline.
    fn sending(&self, delta: i8, progress: bool) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX).min(u64::MAX >> SENDING_BITS);
        let update = |s: u64| {
            let n = s & SENDING_COUNT;
            let n2 = match delta {
                1 => (n + 1).min(SENDING_COUNT),
                -1 => n.saturating_sub(1),
                _ => n,
            };
            let ms = if progress || n == 0 { now } else { s >> SENDING_BITS };
            Some(ms << SENDING_BITS | n2)
        };
        // `update` always gives a value, so this is `Ok`.
        let before = self.sending.fetch_update(Ordering::AcqRel, Ordering::Acquire, update).unwrap_or_else(|s| s);
        if delta > 0 && before & SENDING_COUNT == 0 {
            self.waker.wake();
        }
    }

    /// When the connection's current deadline falls, or `None` while requests are in flight
    /// and none waits to send (then its send-progress deadline, see [`Tracked`]).
    fn deadline(&self, timeouts: Timeouts) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return self.send_stalled_since().map(|since| since + timeouts.send);
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
    /// Completes if the gate evicts this connection for a newer one.
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Whether a read has been tried yet (the gate's silence clock starts at the first).
    read_tried: bool,
    /// The send-progress deadline of the socket: set when a write (or flush, or shutdown) first
    /// stays pending, cleared when one goes through. Boxed on first use: most connections never
    /// wait on a write.
    write_timer: Option<Pin<Box<Sleep>>>,
    write_waiting: bool,
}

impl<IO> Guarded<IO> {
    /// Guards `io`, accepted at `accepted` (the first-request deadline counts from then).
    pub fn new(io: IO, timeouts: Timeouts, accepted: Instant) -> Self {
        Self::build(io, timeouts, accepted, None, None, false)
    }

    /// Guards a socket the accept loop admitted: holds its place in the port's open count, and
    /// its place among the not yet admitted until its first request.
    pub fn admitted(io: IO, timeouts: Timeouts, admission: Admission) -> Self {
        Self::build(io, timeouts, admission.accepted, Some(admission.open), Some(admission.pending), false)
    }

    /// As [`Guarded::admitted`], but the connection stays pending until
    /// [`Activity::authenticated`] (the gRPC port).
    pub fn admitted_on_auth(io: IO, timeouts: Timeouts, admission: Admission) -> Self {
        Self::build(io, timeouts, admission.accepted, Some(admission.open), Some(admission.pending), true)
    }

    fn build(
        io: IO,
        timeouts: Timeouts,
        accepted: Instant,
        open: Option<OpenPermit>,
        pending: Option<PendingPermit>,
        admit_on_auth: bool,
    ) -> Self {
        let evicted = open.as_ref().map(|p| Box::pin(p.evicted()));
        let activity = Activity::new(accepted, pending, admit_on_auth);
        let timer = Box::pin(tokio::time::sleep_until(accepted + timeouts.first_request));
        Self {
            io,
            activity,
            timeouts,
            timer,
            registry: None,
            _open: open,
            evicted,
            read_tried: false,
            write_timer: None,
            write_waiting: false,
        }
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

    /// `Ready` once the deadline has passed with nothing in flight, or the send-progress
    /// deadline of a response in flight has; otherwise registers the timer for the next check.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(evicted) = &mut self.evicted
            && evicted.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(());
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

    /// What a write (flush, shutdown) of the socket gave, with its send-progress deadline: any
    /// result clears it; a write still pending the send timeout after the first pending one
    /// fails with `TimedOut`, so that hyper or tonic drop the connection (the peer has read
    /// nothing, or too little to free any room, for that long).
    fn send_deadline<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.write_waiting = false;
            return r;
        }
        if !self.write_waiting {
            self.write_waiting = true;
            let at = Instant::now() + self.timeouts.send;
            match &mut self.write_timer {
                Some(timer) => timer.as_mut().reset(at),
                None => self.write_timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        // Polled with the write's context, so the task is woken at the deadline.
        let expired = self.write_timer.as_mut().is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
        if expired {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no send progress within --send-timeout")));
        }
        Poll::Pending
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
        if !me.read_tried {
            me.read_tried = true;
            me.activity.watch();
        }
        if let Poll::Ready(r) = Pin::new(&mut me.io).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        match me.poll_expired(cx) {
            Poll::Ready(()) => {
                let why = if me.activity.active.load(Ordering::Relaxed) > 0 {
                    "a response made no send progress within --send-timeout"
                } else {
                    "connection idle past its deadline"
                };
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.send_deadline(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.send_deadline(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.send_deadline(cx, r)
    }

    // A TLS close_notify that cannot be written must not hold the connection either.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.send_deadline(cx, r)
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

    /// Marks the connection from `peer`, if listed, as authenticated (`Activity::authenticated`).
    pub fn authenticated(&self, peer: SocketAddr) {
        let activity = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&peer).cloned();
        if let Some(a) = activity {
            a.authenticated();
        }
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped,
/// and, unless it is an admitted event stream, holds it to the send-progress deadline.
///
/// Why per response and not only per socket: on HTTP/2 a client that grants a stream no
/// flow-control window gets nothing written and nothing is blocked on the socket; hyper then
/// waits for window and does not even poll the body. So the response counts as waiting to send
/// from when it is made and after each frame the server takes from it, until the server takes
/// the next (send progress, see `Activity::sending`); while the body itself has nothing ready
/// (`Pending`: a gRPC stream between messages) it is not waiting. When a connection's waiting
/// responses have seen no progress for `--send-timeout`, its [`Guarded`] fails its reads and
/// the whole connection is closed: on HTTP/2 its healthy streams too, event streams included
/// (cheaper to resume than to let one connection hold a socket at no cost to the client).
pub struct Tracked<B> {
    inner: B,
    guard: Option<ActiveGuard>,
    watch: Watch,
}

/// Where a [`Tracked`] response stands with the send-progress deadline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Exempt (an admitted event stream), or not on a guarded connection.
    Off,
    /// The body has nothing ready: the wait is the body's, not the client's.
    Body,
    /// Waiting for the server to take the next frame: counted in `Activity::sending`.
    Send,
}

impl<B> Tracked<B> {
    /// A response held to the send-progress deadline: waiting to send from now.
    pub fn new(inner: B, guard: Option<ActiveGuard>) -> Self {
        let watch = match &guard {
            Some(g) => {
                g.0.sending(1, false);
                Watch::Send
            }
            None => Watch::Off,
        };
        Self { inner, guard, watch }
    }

    /// An admitted event stream: in flight, but exempt from the send-progress deadline (a
    /// reader that stops reading is cut off by its queue's bound instead, that stream alone).
    pub fn stream(inner: B, guard: Option<ActiveGuard>) -> Self {
        Self { inner, guard, watch: Watch::Off }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        // Before the guard (dropped after this) ends the request.
        if let (Watch::Send, Some(g)) = (self.watch, &self.guard) {
            g.0.sending(-1, false);
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.inner).poll_frame(cx);
        if me.watch != Watch::Off
            && let Some(g) = &me.guard
        {
            // Being polled is progress: hyper takes a frame only when it can send it.
            let next = if matches!(r, Poll::Ready(Some(Ok(_)))) { Watch::Send } else { Watch::Body };
            match (me.watch, next) {
                (Watch::Send, Watch::Send) => g.0.sending(0, true),
                (Watch::Send, _) => g.0.sending(-1, true),
                (_, Watch::Send) => g.0.sending(1, true),
                _ => {}
            }
            me.watch = next;
        }
        r
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

    const T: Timeouts = Timeouts {
        first_request: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        send: Duration::from_secs(5),
    };

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
        let t = Timeouts { first_request: Duration::from_secs(100), idle: Duration::from_secs(10), send: T.send };
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

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_makes_no_room_for_fails_at_the_send_timeout_counted_from_the_last_progress() {
        let (mut client, server) = duplex(64);
        let mut g = Guarded::new(server, T, Instant::now());
        let started = Instant::now();
        let writer = async {
            let mut sent = 0;
            loop {
                match g.write(&[0u8; 64]).await {
                    Ok(n) => sent += n,
                    Err(e) => return (e.kind(), sent, Instant::now()),
                }
            }
        };
        // The peer makes room three times, each within the send timeout, then never again.
        let reader = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                client.read_exact(&mut [0u8; 64]).await.unwrap();
            }
            client
        };
        let ((kind, sent, failed_at), _client) = tokio::join!(writer, reader);
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert_eq!(sent, 4 * 64);
        assert_eq!(failed_at - started, Duration::from_secs(12) + T.send, "blocked since the last room made");
    }

    /// A body that never has anything ready (a gRPC stream between messages).
    struct Quiet;

    impl http_body::Body for Quiet {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    fn full(text: &'static str) -> http_body_util::Full<bytes::Bytes> {
        http_body_util::Full::new(bytes::Bytes::from_static(text.as_bytes()))
    }

    /// Polls `body` once, as hyper does when it can send a frame.
    async fn poll_once<B: http_body::Body + Unpin>(body: &mut B) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_the_server_takes_no_frame_from_fails_the_connection_at_the_send_timeout() {
        let (_client, server) = duplex(64);
        let mut g = Guarded::new(server, T, Instant::now());
        let started = Instant::now();
        let mut body = Tracked::new(full("hello"), Some(g.activity().begin()));
        let reader = async { (g.read(&mut [0u8; 8]).await.unwrap_err().kind(), Instant::now()) };
        // The server takes the one frame at 3 s (progress), then never comes back for the end.
        let driver = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(poll_once(&mut body).await);
            body
        };
        let ((kind, failed_at), body) = tokio::join!(reader, driver);
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert_eq!(failed_at - started, Duration::from_secs(3) + T.send);
        drop(body);
        assert!(g.activity().send_stalled_since().is_none(), "a dropped response waits for nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn event_streams_and_bodies_with_nothing_ready_are_not_held_to_the_send_timeout() {
        let (_client, server) = duplex(64);
        let mut g = Guarded::new(server, T, Instant::now());
        // Never polled (an HTTP/2 stream with no window), but an admitted event stream.
        let stream = Tracked::stream(full("retry: 1000\n\n"), Some(g.activity().begin()));
        // Polled, and waiting on itself.
        let mut quiet = Tracked::new(Quiet, Some(g.activity().begin()));
        assert!(!poll_once(&mut quiet).await);
        assert!(g.activity().send_stalled_since().is_none());
        let still_open = tokio::time::timeout(T.send * 10, g.read(&mut [0u8; 8])).await;
        assert!(still_open.is_err(), "the connection was cut: {still_open:?}");
        // Once both end, the idle timeout counts from then.
        let ended = Instant::now();
        drop((stream, quiet));
        assert_eq!(g.read(&mut [0u8; 8]).await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(ended.elapsed(), T.idle);
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
