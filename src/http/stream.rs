//! An SSE stream served on HTTP/1.1 without hyper, once the listener has read the request head
//! and admission accepted it: the response head and the first frames in one write, then one
//! chunk per wake-up carrying everything pending, and the client's close noticed with a
//! 16-byte read.
//!
//! Why not hyper for this: a hyper HTTP/1.1 connection keeps an 8 KiB read buffer and an
//! 8 KiB write buffer for the life of a response, which is most of an idle stream's memory
//! (`BENCHMARKS.md`). A stream needs neither: it never reads another request, and it writes
//! frames that are already encoded. The only state held while idle is this task's future,
//! the socket and the connection's mailbox.

use std::{
    collections::VecDeque,
    future::poll_fn,
    io::Write as _,
    sync::{Arc, Mutex},
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    domain::UserId,
    router::{CloseReason, Drained, Frame, Registration},
    telemetry::metrics::EdgeMetrics,
};

/// What admission hands to whoever serves the stream.
pub struct StreamStart {
    pub reg: Registration,
    /// The `retry:` field, sent before anything else.
    pub retry: Bytes,
    /// When the stream must end (its lifetime or its token's expiry), and why.
    pub close_after: Option<(Duration, CloseReason)>,
    /// For the log line at the end.
    pub user: UserId,
}

/// Marks a request read by the HTTP/1.1 fast path: admission hands the stream back in the
/// response extensions instead of building a hyper body.
#[derive(Clone, Copy, Debug)]
pub struct FastPath;

/// A `StreamStart` in a response's extensions (which require `Clone`), taken out once.
#[derive(Clone)]
pub struct Handoff(Arc<Mutex<Option<StreamStart>>>);

impl Handoff {
    pub fn new(start: StreamStart) -> Self {
        Self(Arc::new(Mutex::new(Some(start))))
    }

    pub fn take(&self) -> Option<StreamStart> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The client went away, or the stream was aborted, while we wrote.
struct Gone;

/// Serves the stream until it ends; `head` is the serialized response head.
pub async fn serve<IO>(mut io: IO, head: Vec<u8>, start: StreamStart, metrics: Arc<EdgeMetrics>)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let StreamStart { reg, retry, close_after, user } = start;
    let opened = Instant::now();
    // Boxed only when set: most connections need no timer of their own.
    let mut timer = close_after.map(|(d, reason)| (Box::pin(tokio::time::sleep(d)), reason));
    let mut prefix = Some((head, retry));
    let reason = loop {
        let mut frames = VecDeque::new();
        let mut probe = [0u8; 16];
        let drained = tokio::select! {
            biased;
            d = poll_fn(|cx| reg.mailbox().poll_drain(cx, &mut frames)) => d,
            r = io.read(&mut probe) => match r {
                // Bytes after the request are ignored; end of file or an error is the client
                // leaving.
                Ok(n) if n > 0 => continue,
                _ => break CloseReason::ClientLeft,
            },
            () = poll_fn(|cx| match &mut timer {
                Some((sleep, _)) => sleep.as_mut().poll(cx),
                None => Poll::Pending,
            }) => {
                if let Some((_, reason)) = timer.take() {
                    // Like a Disconnect without a final event: what is queued still goes out,
                    // then the stream ends and the client resumes (elsewhere, or with a fresh
                    // token) from its last id.
                    reg.close(reason);
                }
                continue;
            }
        };
        let end = match drained {
            Drained::Frames => None,
            // Aborted: the socket is torn down without another byte.
            Drained::End(CloseReason::SlowConsumer) => break CloseReason::SlowConsumer,
            Drained::End(reason) => Some(reason),
        };
        // The first write carries the response head and the `retry:` field too.
        let (mut buf, retry) = prefix.take().unwrap_or_default();
        buf.reserve(retry.len() + frames.iter().map(|f| f.bytes.len()).sum::<usize>() + 24);
        append_chunk(&mut buf, &retry, &frames);
        if end.is_some() {
            buf.extend_from_slice(b"0\r\n\r\n");
        }
        if write(&mut io, &buf, &reg).await.is_err() {
            break end.unwrap_or(CloseReason::ClientLeft);
        }
        record(&reg, &metrics, &frames);
        if let Some(reason) = end {
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            break reason;
        }
    };
    closed(&metrics, &reg, &user, reason, opened);
}

/// Counts and logs the end of a stream, whichever writer served it.
pub(super) fn closed(metrics: &EdgeMetrics, reg: &Registration, user: &UserId, reason: CloseReason, opened: Instant) {
    metrics.closed(reason);
    let duration_ms = opened.elapsed().as_millis() as u64;
    if reason == CloseReason::SlowConsumer {
        // Counted and logged per batch by the router; one line each would flood a storm.
        tracing::debug!(conn = reg.id(), user = %user, reason = reason.as_str(), duration_ms, "sse connection closed");
    } else {
        tracing::info!(conn = reg.id(), user = %user, reason = reason.as_str(), duration_ms, "sse connection closed");
    }
}

/// Appends one chunk holding `prefix` and every frame (nothing if both are empty).
fn append_chunk(buf: &mut Vec<u8>, prefix: &[u8], frames: &VecDeque<Frame>) {
    let len = prefix.len() + frames.iter().map(|f| f.bytes.len()).sum::<usize>();
    if len == 0 {
        return;
    }
    let _ = write!(buf, "{len:x}\r\n");
    buf.extend_from_slice(prefix);
    for f in frames {
        buf.extend_from_slice(&f.bytes);
    }
    buf.extend_from_slice(b"\r\n");
}

/// Writes `buf` whole, unless the router aborts the stream (slow consumer) meanwhile.
async fn write<IO: AsyncWrite + Unpin>(io: &mut IO, buf: &[u8], reg: &Registration) -> Result<(), Gone> {
    let written = async {
        io.write_all(buf).await?;
        io.flush().await
    };
    tokio::select! {
        r = written => r.map_err(|_| Gone),
        () = poll_fn(|cx| reg.mailbox().poll_aborted(cx)) => Err(Gone),
    }
}

/// Counts the events just written and observes their latency and the batch size.
fn record(reg: &Registration, metrics: &EdgeMetrics, frames: &VecDeque<Frame>) {
    if frames.is_empty() {
        return;
    }
    metrics.queue_depth.observe_value(frames.len() as f64);
    let events = frames.iter().filter(|f| f.is_event).count() as u64;
    if events > 0 {
        reg.router().record_delivered(events);
    }
    // Frames are in publish order, so the first event is the oldest of this write.
    if let Some(oldest) = frames.iter().find(|f| f.is_event) {
        metrics.delivery_latency.observe(oldest.published_at.elapsed());
    }
}

/// Serializes a response head for HTTP/1.1: the status line, `parts`' headers, and either
/// `transfer-encoding: chunked` (a stream) or a content length and `connection: close` (an
/// answer, after which the connection closes).
pub fn response_head(parts: &http::response::Parts, content_length: Option<usize>) -> Vec<u8> {
    let mut h = Vec::with_capacity(256);
    let status = parts.status;
    let _ = write!(h, "HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    for (name, value) in &parts.headers {
        // The framing is ours to say, once (a handed-off stream's parts may say
        // `content-length: 0`; RFC 9112 forbids sending it beside chunked).
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    match content_length {
        None => h.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n"),
        Some(n) => {
            let _ = write!(h, "content-length: {n}\r\nconnection: close\r\n\r\n");
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_carries_the_prefix_and_every_frame() {
        let f = |s: &'static str| Frame {
            bytes: Bytes::from_static(s.as_bytes()),
            published_at: Instant::now(),
            is_event: true,
        };
        let mut buf = Vec::new();
        append_chunk(&mut buf, b"retry: 3000\n\n", &VecDeque::from([f("data: a\n\n"), f("data: bb\n\n")]));
        assert_eq!(buf, b"20\r\nretry: 3000\n\ndata: a\n\ndata: bb\n\n\r\n");
        let mut empty = Vec::new();
        append_chunk(&mut empty, b"", &VecDeque::new());
        assert!(empty.is_empty(), "an empty chunk would end the body");
    }

    #[test]
    fn response_heads_are_chunked_for_streams_and_sized_for_answers() {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.headers.insert("content-type", http::HeaderValue::from_static("text/event-stream"));
        parts.headers.insert("content-length", http::HeaderValue::from_static("0"));
        let head = String::from_utf8(response_head(&parts, None)).unwrap();
        assert_eq!(head, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n");
        parts.status = http::StatusCode::TOO_MANY_REQUESTS;
        let head = String::from_utf8(response_head(&parts, Some(5))).unwrap();
        assert!(head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{head}");
        assert!(head.ends_with("content-length: 5\r\nconnection: close\r\n\r\n"), "{head}");
    }
}
