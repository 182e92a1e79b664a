//! A connection's bounded queue of frames, between its shard (producer) and the connection's
//! writer (consumer: the HTTP/1.1 stream task, or the SSE body on hyper).
//!
//! Hand-written rather than a `tokio::sync::mpsc` because it needs, together: a non-blocking
//! push that reports "full" by bytes (the slow-consumer signal), a push that does *not* wake
//! the consumer (its shard decides when to wake it, so that writes are coalesced), a close
//! that carries a reason and a last frame, a drain that hands over the whole queue at once
//! (one write for everything pending), an abort that also tears the socket down, and no
//! allocation while the connection is idle (we hold tens of thousands of idle queues).

use std::{
    collections::VecDeque,
    sync::Mutex,
    task::{Context, Poll, Waker},
    time::Instant,
};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::CloseReason;

/// What a queued frame costs beyond its bytes (its slot in the queue and bookkeeping), so
/// that many tiny frames cannot pin more memory than the byte bound says.
pub const FRAME_OVERHEAD: usize = 64;

/// Encoded bytes on their way to one connection. Cloning shares the bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Bytes,
    /// When the event was accepted, to measure publish-to-write latency.
    pub published_at: Instant,
    /// A published event (counted as a delivery when written), as opposed to a heartbeat or a
    /// control frame.
    pub is_event: bool,
}

impl Frame {
    /// The last frame of a stream the server ends: an `ssegate.disconnect` event (no id: it is
    /// not part of the replayable stream) with `reason` as its data.
    pub fn disconnect(reason: &str) -> Self {
        let name = crate::domain::EventName::reserved("disconnect");
        Frame {
            bytes: crate::event_stream::encode(Some(name.as_str()), reason).finish_without_id(),
            published_at: Instant::now(),
            is_event: false,
        }
    }

    fn cost(&self) -> usize {
        self.bytes.len() + FRAME_OVERHEAD
    }
}

/// The outcome of [`Mailbox::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued; `was_empty` says the consumer had nothing pending, so it needs a wake-up.
    Queued { was_empty: bool },
    /// Over the bound (frames or bytes): the consumer is too slow.
    Full,
    /// The mailbox was closed; the frame was not queued.
    Closed,
}

/// What [`Mailbox::poll_drain`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// At least one frame was moved out.
    Frames,
    /// Nothing is left and the mailbox is closed: the stream should end.
    End(CloseReason),
}

/// Bounds of one connection's pending output.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bounds {
    /// Most frames pending.
    pub frames: usize,
    /// Most bytes pending (each frame counts its bytes plus [`FRAME_OVERHEAD`]).
    pub bytes: usize,
}

pub struct Mailbox {
    inner: Mutex<Inner>,
    bounds: Bounds,
    /// Cancelling it tears down the transport of a connection served by hyper (HTTP/2 or
    /// the hyper fallback), whose body is never polled again once the client stops reading.
    /// Streams served by our own HTTP/1.1 writer watch `aborted` instead and need no token.
    abort: Option<CancellationToken>,
    /// Who the stream is and since when, for the admin console's inspector (a few dozen bytes
    /// per connection, never read on the event path).
    meta: StreamMeta,
    opened: Instant,
}

/// How a stream is carried, as the HTTP edge saw it: for the admin console.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Unknown,
    Http1,
    Http2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Unknown => "unknown",
            Protocol::Http1 => "h1",
            Protocol::Http2 => "h2",
        }
    }
}

/// What the HTTP edge knows about a stream that the router does not need, kept for the admin
/// console's inspector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamMeta {
    pub peer: Option<std::net::SocketAddr>,
    pub protocol: Protocol,
}

/// A stream's queue and positions at one moment (`Mailbox::positions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Positions {
    /// Frames and bytes (with their overhead) queued, not yet handed to the writer.
    pub queued_frames: usize,
    pub queued_bytes: usize,
    /// The stream gets every event addressed to it with a sequence number above this: its
    /// cursor when it opened fresh (or could not be resumed), its resume id when it was.
    pub from_seq: u64,
    /// The sequence number of the last event queued for it (its cursor until one is).
    pub queued_seq: u64,
    /// The sequence number of the last event its writer took from the queue to write.
    pub sent_seq: u64,
}

#[derive(Default)]
struct Inner {
    /// Unallocated while idle: the consumer takes the whole deque on every drain.
    queue: VecDeque<Frame>,
    /// Cost of what is queued (bytes plus per-frame overhead).
    bytes: usize,
    waker: Option<Waker>,
    /// Set once; a closed mailbox drains what it holds (for a graceful close) and then ends.
    closed: Option<CloseReason>,
    /// Closed at once: the writer must stop, even in the middle of a write.
    aborted: bool,
    /// Something was queued since the last heartbeat sweep, so no heartbeat is needed.
    active: bool,
    /// Room beyond the bounds for preloaded frames (a resume's replay), until first drained.
    allowance: Bounds,
    /// See `Positions`: set under this lock, so they cost nothing more on the event path.
    from_seq: u64,
    queued_seq: u64,
    sent_seq: u64,
}

impl Inner {
    /// Empties the queue; returns how many published events (not control frames) it held.
    fn discard_events(&mut self) -> usize {
        let n = self.queue.iter().filter(|f| f.is_event).count();
        self.queue = VecDeque::new();
        self.bytes = 0;
        n
    }

    /// Queues `frame` if it fits the bounds.
    fn enqueue(&mut self, bounds: Bounds, frame: Frame) -> Push {
        let cost = frame.cost();
        if self.queue.len() >= bounds.frames + self.allowance.frames
            || self.bytes + cost > bounds.bytes + self.allowance.bytes
        {
            return Push::Full;
        }
        let was_empty = self.queue.is_empty();
        self.queue.push_back(frame);
        self.bytes += cost;
        Push::Queued { was_empty }
    }
}

impl Mailbox {
    pub fn new(bounds: Bounds, abort: Option<CancellationToken>) -> Self {
        Self::with_meta(bounds, abort, StreamMeta::default())
    }

    pub fn with_meta(bounds: Bounds, abort: Option<CancellationToken>, meta: StreamMeta) -> Self {
        let bounds = Bounds { frames: bounds.frames.max(1), bytes: bounds.bytes.max(1) };
        Self { inner: Mutex::new(Inner::default()), bounds, abort, meta, opened: Instant::now() }
    }

    pub fn meta(&self) -> StreamMeta {
        self.meta
    }

    /// When the stream was registered.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// Its queue and positions now (one short lock).
    pub fn positions(&self) -> Positions {
        let inner = self.lock();
        Positions {
            queued_frames: inner.queue.len(),
            queued_bytes: inner.bytes,
            from_seq: inner.from_seq,
            queued_seq: inner.queued_seq,
            sent_seq: inner.sent_seq,
        }
    }

    /// Records where the stream starts (`Positions`): it gets events after `from`; its cursor
    /// (the id its opening `ssegate.position` carries) is `cursor`.
    pub fn start_at(&self, from: u64, cursor: u64) {
        let mut inner = self.lock();
        inner.from_seq = from;
        inner.queued_seq = cursor;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent (every critical
        // section is a single push/drain), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without waiting and without waking the consumer (see `take_waker`).
    pub fn push(&self, frame: Frame) -> Push {
        self.enqueue(frame, None)
    }

    /// Queues event `seq` like `push`, recording it as the last event queued.
    pub fn push_event(&self, frame: Frame, seq: u64) -> Push {
        self.enqueue(frame, Some(seq))
    }

    /// Queues event `seq` like `push_event` only if no later event was queued (an event that
    /// reached this replica behind later ones: `Router::publish_late`); `None` if one was.
    pub fn push_event_in_order(&self, frame: Frame, seq: u64) -> Option<Push> {
        let mut inner = self.lock();
        if inner.queued_seq >= seq {
            return None;
        }
        Some(Self::enqueue_locked(&mut inner, self.bounds, frame, Some(seq)))
    }

    fn enqueue(&self, frame: Frame, seq: Option<u64>) -> Push {
        let mut inner = self.lock();
        Self::enqueue_locked(&mut inner, self.bounds, frame, seq)
    }

    fn enqueue_locked(inner: &mut Inner, bounds: Bounds, frame: Frame, seq: Option<u64>) -> Push {
        if inner.closed.is_some() {
            return Push::Closed;
        }
        let pushed = inner.enqueue(bounds, frame);
        if pushed != Push::Full {
            inner.active = true;
            if let Some(seq) = seq {
                inner.queued_seq = seq;
            }
        }
        pushed
    }

    /// The consumer's waker, if it is waiting: waking it makes it drain everything queued.
    pub fn take_waker(&self) -> Option<Waker> {
        self.lock().waker.take()
    }

    /// Queues `frames` beyond the bounds (a resumed connection's replay, which the replay
    /// log bounds, and its opening `ssegate.position` event). Live events still get the full bounds on top
    /// of them until the consumer first drains.
    pub fn preload(&self, frames: Vec<Frame>) {
        let mut inner = self.lock();
        let bytes = frames.iter().map(Frame::cost).sum();
        inner.allowance = Bounds { frames: frames.len(), bytes };
        inner.bytes += bytes;
        inner.queue.extend(frames);
    }

    /// Queues a heartbeat unless something was queued since the previous call (a busy stream
    /// needs none). `None` means it was skipped.
    pub fn heartbeat(&self, frame: &Frame) -> Option<Push> {
        let mut inner = self.lock();
        if std::mem::take(&mut inner.active) || inner.closed.is_some() {
            return None;
        }
        Some(inner.enqueue(self.bounds, frame.clone()))
    }

    /// Closes gracefully: what is queued still goes out, then `last` (if any, even beyond the
    /// bounds), then the stream ends. Returns false if it was already closed.
    pub fn close(&self, reason: CloseReason, last: Option<Frame>) -> bool {
        let waker = {
            let mut inner = self.lock();
            if inner.closed.is_some() {
                return false;
            }
            inner.closed = Some(reason);
            if let Some(f) = last {
                inner.bytes += f.cost();
                inner.queue.push_back(f);
            }
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Closes at once: discards the queue and tears the transport down. Returns how many events
    /// were discarded.
    pub fn abort(&self, reason: CloseReason) -> usize {
        let (dropped, waker) = {
            let mut inner = self.lock();
            inner.closed.get_or_insert(reason);
            inner.aborted = true;
            (inner.discard_events(), inner.waker.take())
        };
        if let Some(t) = &self.abort {
            t.cancel();
        }
        if let Some(w) = waker {
            w.wake();
        }
        dropped
    }

    /// Closes (if still open) and discards what is queued, leaving the transport alone: the
    /// consumer is gone already. Returns how many events were discarded.
    pub fn discard(&self) -> usize {
        let mut inner = self.lock();
        inner.closed.get_or_insert(CloseReason::ClientLeft);
        inner.discard_events()
    }

    /// Hands every queued frame over by swapping `out` (which must be empty) with the queue,
    /// so the consumer owns the memory and frees it after writing; or reports the end; or
    /// registers for a wake-up.
    pub fn poll_drain(&self, cx: &mut Context<'_>, out: &mut VecDeque<Frame>) -> Poll<Drained> {
        debug_assert!(out.is_empty());
        let mut inner = self.lock();
        if !inner.queue.is_empty() {
            std::mem::swap(out, &mut inner.queue);
            inner.bytes = 0;
            inner.sent_seq = inner.queued_seq;
            inner.allowance = Bounds::default();
            return Poll::Ready(Drained::Frames);
        }
        if let Some(reason) = inner.closed {
            return Poll::Ready(Drained::End(reason));
        }
        register(&mut inner.waker, cx);
        Poll::Pending
    }

    /// Ready once the mailbox is aborted; a writer blocked on a socket watches it meanwhile.
    pub fn poll_aborted(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.lock();
        if inner.aborted {
            return Poll::Ready(());
        }
        register(&mut inner.waker, cx);
        Poll::Pending
    }
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        slot => *slot = Some(cx.waker().clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn frame(s: &'static str) -> Frame {
        Frame { bytes: Bytes::from_static(s.as_bytes()), published_at: Instant::now(), is_event: true }
    }

    fn frames(n: usize) -> Mailbox {
        Mailbox::new(Bounds { frames: n, bytes: usize::MAX / 2 }, None)
    }

    fn drain(m: &Mailbox) -> (Poll<Drained>, VecDeque<Frame>) {
        let mut out = VecDeque::new();
        let mut cx = Context::from_waker(Waker::noop());
        (m.poll_drain(&mut cx, &mut out), out)
    }

    #[test]
    fn bounded_in_frames_and_drains_everything_at_once() {
        let m = frames(2);
        assert_eq!(m.push(frame("a")), Push::Queued { was_empty: true });
        assert_eq!(m.push(frame("b")), Push::Queued { was_empty: false });
        assert_eq!(m.push(frame("c")), Push::Full);
        let (p, out) = drain(&m);
        assert_eq!(p, Poll::Ready(Drained::Frames));
        assert_eq!(out.len(), 2);
        assert_eq!(drain(&m).0, Poll::Pending);
    }

    #[test]
    fn bounded_in_bytes_counting_the_overhead_of_each_frame() {
        let m = Mailbox::new(Bounds { frames: 1000, bytes: 2 * (10 + FRAME_OVERHEAD) }, None);
        let ten = || frame("0123456789");
        assert_eq!(m.push(ten()), Push::Queued { was_empty: true });
        assert_eq!(m.push(ten()), Push::Queued { was_empty: false });
        assert_eq!(m.push(frame("x")), Push::Full, "a third frame, however small, is over the bound");
        let _ = drain(&m);
        assert_eq!(m.push(ten()), Push::Queued { was_empty: true }, "draining frees the room");
    }

    #[test]
    fn an_idle_mailbox_holds_no_queue_memory() {
        let m = frames(64);
        for _ in 0..50 {
            m.push(frame("x"));
        }
        let (_, out) = drain(&m);
        assert_eq!(out.len(), 50);
        assert_eq!(m.lock().queue.capacity(), 0, "the drained queue went to the consumer");
    }

    #[test]
    fn graceful_close_delivers_queue_then_last_then_ends() {
        let m = frames(1);
        m.push(frame("a"));
        assert!(m.close(CloseReason::Disconnected, Some(frame("bye"))));
        assert_eq!(m.push(frame("late")), Push::Closed);
        let (_, out) = drain(&m);
        assert_eq!(out.iter().map(|f| &f.bytes[..]).collect::<Vec<_>>(), [b"a", b"bye" as &[u8]]);
        assert_eq!(drain(&m).0, Poll::Ready(Drained::End(CloseReason::Disconnected)));
    }

    #[test]
    fn abort_discards_cancels_the_transport_and_wakes_a_blocked_writer() {
        let token = CancellationToken::new();
        let m = Mailbox::new(Bounds { frames: 4, bytes: 1 << 20 }, Some(token.clone()));
        m.push(frame("a"));
        m.push(frame("b"));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(m.poll_aborted(&mut cx), Poll::Pending);
        assert_eq!(m.abort(CloseReason::SlowConsumer), 2);
        assert!(token.is_cancelled());
        assert_eq!(m.poll_aborted(&mut cx), Poll::Ready(()));
        assert_eq!(drain(&m).0, Poll::Ready(Drained::End(CloseReason::SlowConsumer)));
    }

    #[test]
    fn heartbeat_only_when_idle() {
        let m = frames(4);
        let hb = frame(":\n");
        assert_eq!(m.heartbeat(&hb), Some(Push::Queued { was_empty: true }));
        assert_eq!(drain(&m).1.len(), 1);
        m.push(frame("ev"));
        assert_eq!(m.heartbeat(&hb), None, "busy since last sweep: skipped");
        let _ = drain(&m);
        assert_eq!(m.heartbeat(&hb), Some(Push::Queued { was_empty: true }));
    }

    #[test]
    fn preloaded_frames_do_not_eat_into_the_live_bounds() {
        let m = frames(2);
        m.preload(vec![frame("r1"), frame("r2"), frame("r3")]);
        assert_eq!(m.push(frame("live1")), Push::Queued { was_empty: false });
        assert_eq!(m.push(frame("live2")), Push::Queued { was_empty: false });
        assert_eq!(m.push(frame("live3")), Push::Full);
        assert_eq!(drain(&m).1.len(), 5);
        assert_eq!(m.push(frame("a")), Push::Queued { was_empty: true });
        assert_eq!(m.push(frame("b")), Push::Queued { was_empty: false });
        assert_eq!(m.push(frame("c")), Push::Full, "the allowance ends with the first drain");
    }
}
