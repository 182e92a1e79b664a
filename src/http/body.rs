//! The SSE response body for streams hyper serves (HTTP/2, and HTTP/1.1 requests the fast
//! path passes on): drains the connection's mailbox and hands the bytes to hyper.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use tokio::time::Sleep;

use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame as BodyFrame, SizeHint};

use super::stream::{self, StreamStart};
use crate::{
    domain::UserId,
    router::{CloseReason, Drained, Frame, Registration},
    telemetry::metrics::EdgeMetrics,
};

/// Most bytes coalesced into one write; a backlog beyond it goes out in several.
const MAX_WRITE: usize = 64 * 1024;

/// In a response's extensions: its body is an admitted event stream, which its connection
/// does not hold to the send-progress deadline (`net::Tracked::stream`): a stream the client
/// grants no HTTP/2 window is cut off by its queue's bound, that stream alone, as on HTTP/1.1.
/// Set only by [`SseBody::response`], so no other response can claim the exemption.
#[derive(Clone, Copy, Debug)]
pub struct EventStream;

pub struct SseBody {
    reg: Registration,
    /// Sent before anything else: the `retry:` field.
    head: Option<Bytes>,
    /// Frames taken from the mailbox but not yet written (the whole queue is taken at once and
    /// dropped once written, so an idle body holds no allocation).
    backlog: VecDeque<Frame>,
    /// Why the stream ended, once the mailbox said so; `None` while open.
    ended: Option<CloseReason>,
    opened: Instant,
    /// Fires when the stream must end (its maximum lifetime, or its token's expiry), if ever.
    close_timer: Option<(Pin<Box<Sleep>>, CloseReason)>,
    metrics: Arc<EdgeMetrics>,
    user: UserId,
}

impl SseBody {
    pub fn new(start: StreamStart, metrics: Arc<EdgeMetrics>) -> Self {
        let StreamStart { reg, retry, close_after, user } = start;
        Self {
            metrics,
            close_timer: close_after.map(|(d, reason)| (Box::pin(tokio::time::sleep(d)), reason)),
            reg,
            head: Some(retry),
            backlog: VecDeque::new(),
            ended: None,
            opened: Instant::now(),
            user,
        }
    }

    /// The response carrying this stream, marked [`EventStream`].
    pub fn response(self) -> Response {
        let mut resp = Response::new(axum::body::Body::new(self));
        resp.extensions_mut().insert(EventStream);
        resp
    }

    /// Takes frames from the backlog up to `MAX_WRITE` bytes (at least one) and joins them:
    /// several queued events go out in one write. A single frame is passed on without a copy.
    fn next_write(&mut self) -> Option<Bytes> {
        let first = self.backlog.pop_front()?;
        let mut events = u64::from(first.is_event);
        // Frames are in publish order, so the first event is the oldest of this write.
        let mut oldest = first.is_event.then_some(first.published_at);
        let bytes = if self.backlog.front().is_none_or(|f| first.bytes.len() + f.bytes.len() > MAX_WRITE) {
            first.bytes
        } else {
            let mut buf = BytesMut::with_capacity(
                MAX_WRITE.min(self.backlog.iter().map(|f| f.bytes.len()).sum::<usize>() + first.bytes.len()),
            );
            buf.extend_from_slice(&first.bytes);
            while let Some(f) = self.backlog.front() {
                if buf.len() + f.bytes.len() > MAX_WRITE {
                    break;
                }
                buf.extend_from_slice(&f.bytes);
                events += u64::from(f.is_event);
                if f.is_event {
                    oldest.get_or_insert(f.published_at);
                }
                self.backlog.pop_front();
            }
            buf.freeze()
        };
        if self.backlog.is_empty() {
            // Give the burst's memory back.
            self.backlog = VecDeque::new();
        }
        self.reg.router().record_delivered(events);
        if let Some(t) = oldest {
            self.metrics.delivery_latency.observe(t.elapsed());
        }
        Some(bytes)
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(BodyFrame::data(head))));
        }
        if let Some((sleep, reason)) = &mut this.close_timer
            && sleep.as_mut().poll(cx).is_ready()
        {
            // Close like a Disconnect without a final event: what is queued still goes out,
            // then the stream ends and the client resumes (maybe elsewhere, maybe with a fresh
            // token) from its last id.
            let reason = *reason;
            this.close_timer = None;
            this.reg.close(reason);
        }
        if this.backlog.is_empty() && this.ended.is_none() {
            match this.reg.mailbox().poll_drain(cx, &mut this.backlog) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Drained::Frames) => this.metrics.queue_depth.observe_value(this.backlog.len() as f64),
                // Cut off as a slow consumer: the abort token (cancelled with the mailbox) drops
                // this stream's task, so h2 resets the stream (HTTP/1.1: the connection) rather
                // than ending it as if it were complete. Nothing more to write meanwhile.
                Poll::Ready(Drained::End(CloseReason::SlowConsumer)) => {
                    this.ended = Some(CloseReason::SlowConsumer);
                    return Poll::Pending;
                }
                Poll::Ready(Drained::End(reason)) => this.ended = Some(reason),
            }
        }
        Poll::Ready(this.next_write().map(|b| Ok(BodyFrame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let reason = self.ended.unwrap_or(CloseReason::ClientLeft);
        stream::closed(&self.metrics, &self.reg, &self.user, reason, self.opened);
    }
}
