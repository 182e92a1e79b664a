//! A connection's bounded queue of frames, between the router (producer) and the connection's
//! HTTP body (consumer).
//!
//! Hand-written rather than a `tokio::sync::mpsc` because it needs, together: a non-blocking
//! push that reports "full" (the slow-consumer signal), a close that carries a reason and a last
//! frame, a drain of everything queued at once (so several events go out in one write), an
//! abort that also tears the socket down, and no allocation while the connection is idle (a
//! bounded mpsc allocates its first block up front; we hold tens of thousands of idle queues).

use std::{
    collections::VecDeque,
    sync::Mutex,
    task::{Context, Poll, Waker},
    time::Instant,
};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::CloseReason;

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

/// The outcome of [`Mailbox::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue is at capacity: the consumer is too slow.
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

pub struct Mailbox {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Cancelling it tears down the transport (the TCP connection), for consumers that stopped
    /// reading: their body is never polled again, so ending the stream alone would not free
    /// the socket.
    abort: Option<CancellationToken>,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Frame>,
    waker: Option<Waker>,
    /// Set once; a closed mailbox drains what it holds (for a graceful close) and then ends.
    closed: Option<CloseReason>,
    /// Something was queued since the last heartbeat sweep, so no heartbeat is needed.
    active: bool,
    /// Room beyond the capacity for preloaded frames (a resume's replay), until first drained.
    allowance: usize,
}

impl Inner {
    /// Empties the queue; returns how many published events (not control frames) it held.
    fn discard_events(&mut self) -> usize {
        let n = self.queue.iter().filter(|f| f.is_event).count();
        self.queue.clear();
        n
    }
}

impl Mailbox {
    pub fn new(capacity: usize, abort: Option<CancellationToken>) -> Self {
        Self { inner: Mutex::new(Inner::default()), capacity: capacity.max(1), abort }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent (every critical
        // section is a single push/drain), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without ever waiting.
    pub fn push(&self, frame: Frame) -> Push {
        let waker = {
            let mut inner = self.lock();
            if inner.closed.is_some() {
                return Push::Closed;
            }
            if inner.queue.len() >= self.capacity + inner.allowance {
                return Push::Full;
            }
            inner.queue.push_back(frame);
            inner.active = true;
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Push::Queued
    }

    /// Queues `frames` beyond the capacity (a resumed connection's replay, which the replay
    /// log bounds, and its opening `id:` line). Live events still get the full capacity on top
    /// of them until the consumer first drains.
    pub fn preload(&self, frames: Vec<Frame>) {
        let waker = {
            let mut inner = self.lock();
            inner.allowance = frames.len();
            inner.queue.extend(frames);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Queues a heartbeat unless something was queued since the previous call (a busy stream
    /// needs none). `None` means it was skipped.
    pub fn heartbeat(&self, frame: &Frame) -> Option<Push> {
        let waker = {
            let mut inner = self.lock();
            if std::mem::take(&mut inner.active) || inner.closed.is_some() {
                return None;
            }
            if inner.queue.len() >= self.capacity + inner.allowance {
                return Some(Push::Full);
            }
            inner.queue.push_back(frame.clone());
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Some(Push::Queued)
    }

    /// Closes gracefully: what is queued still goes out, then `last` (if any, even beyond the
    /// capacity), then the stream ends. Returns false if it was already closed.
    pub fn close(&self, reason: CloseReason, last: Option<Frame>) -> bool {
        let waker = {
            let mut inner = self.lock();
            if inner.closed.is_some() {
                return false;
            }
            inner.closed = Some(reason);
            inner.queue.extend(last);
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

    /// Moves every queued frame into `out`, or reports the end, or registers for a wake-up.
    pub fn poll_drain(&self, cx: &mut Context<'_>, out: &mut Vec<Frame>) -> Poll<Drained> {
        let mut inner = self.lock();
        if !inner.queue.is_empty() {
            out.extend(inner.queue.drain(..));
            inner.allowance = 0;
            if inner.queue.capacity() > 4 * self.capacity.min(64) {
                // A burst grew the queue; give the memory back while the connection idles.
                inner.queue.shrink_to(0);
            }
            return Poll::Ready(Drained::Frames);
        }
        if let Some(reason) = inner.closed {
            return Poll::Ready(Drained::End(reason));
        }
        match &mut inner.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn frame(s: &'static str) -> Frame {
        Frame { bytes: Bytes::from_static(s.as_bytes()), published_at: Instant::now(), is_event: true }
    }

    fn drain(m: &Mailbox) -> (Poll<Drained>, Vec<Frame>) {
        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        (m.poll_drain(&mut cx, &mut out), out)
    }

    #[test]
    fn bounded_and_drains_everything_at_once() {
        let m = Mailbox::new(2, None);
        assert_eq!(m.push(frame("a")), Push::Queued);
        assert_eq!(m.push(frame("b")), Push::Queued);
        assert_eq!(m.push(frame("c")), Push::Full);
        let (p, out) = drain(&m);
        assert_eq!(p, Poll::Ready(Drained::Frames));
        assert_eq!(out.len(), 2);
        assert_eq!(drain(&m).0, Poll::Pending);
    }

    #[test]
    fn graceful_close_delivers_queue_then_last_then_ends() {
        let m = Mailbox::new(1, None);
        m.push(frame("a"));
        assert!(m.close(CloseReason::Disconnected, Some(frame("bye"))));
        assert_eq!(m.push(frame("late")), Push::Closed);
        let (_, out) = drain(&m);
        assert_eq!(out.iter().map(|f| &f.bytes[..]).collect::<Vec<_>>(), [b"a", b"bye" as &[u8]]);
        assert_eq!(drain(&m).0, Poll::Ready(Drained::End(CloseReason::Disconnected)));
    }

    #[test]
    fn abort_discards_and_cancels_the_transport() {
        let token = CancellationToken::new();
        let m = Mailbox::new(4, Some(token.clone()));
        m.push(frame("a"));
        m.push(frame("b"));
        assert_eq!(m.abort(CloseReason::SlowConsumer), 2);
        assert!(token.is_cancelled());
        assert_eq!(drain(&m).0, Poll::Ready(Drained::End(CloseReason::SlowConsumer)));
    }

    #[test]
    fn heartbeat_only_when_idle() {
        let m = Mailbox::new(4, None);
        let hb = frame(":\n");
        assert_eq!(m.heartbeat(&hb), Some(Push::Queued));
        assert_eq!(drain(&m).1.len(), 1);
        m.push(frame("ev"));
        assert_eq!(m.heartbeat(&hb), None, "busy since last sweep: skipped");
        let _ = drain(&m);
        assert_eq!(m.heartbeat(&hb), Some(Push::Queued));
    }

    #[test]
    fn preloaded_frames_do_not_eat_into_the_live_capacity() {
        let m = Mailbox::new(2, None);
        m.preload(vec![frame("r1"), frame("r2"), frame("r3")]);
        assert_eq!(m.push(frame("live1")), Push::Queued);
        assert_eq!(m.push(frame("live2")), Push::Queued);
        assert_eq!(m.push(frame("live3")), Push::Full);
        assert_eq!(drain(&m).1.len(), 5);
        assert_eq!(m.push(frame("a")), Push::Queued);
        assert_eq!(m.push(frame("b")), Push::Queued);
        assert_eq!(m.push(frame("c")), Push::Full, "the allowance ends with the first drain");
    }
}
