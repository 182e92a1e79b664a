//! Reading a request head ourselves, before deciding who serves the connection: an HTTP/1.1
//! `GET /v1/events` goes to the stream fast path (`stream.rs`), anything else (other paths,
//! HTTP/2 prior knowledge, HTTP/1.0, requests with a body, upgrades, heads httparse refuses)
//! to hyper, with the bytes already read replayed through `Rewind`.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface a prior-knowledge (h2c) client opens with.
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Headers parsed on the fast path; a request with more goes to hyper.
const MAX_HEADERS: usize = 48;
/// First read buffer; EventSource requests fit (grows up to the head limit otherwise).
const INITIAL_BUFFER: usize = 1024;

/// What the first bytes of a connection turned out to be.
pub enum Head {
    /// An HTTP/1.1 `GET /v1/events` without a body: the fast path. (Boxed: this value lives
    /// in the connection task's future, and only for a moment.)
    Stream(Box<http::Request<axum::body::Body>>),
    /// Anything else: hyper serves it, starting with these bytes.
    Other(Bytes),
    /// The head grew past the limit before it ended.
    TooLarge,
    /// The client closed before sending a whole head.
    Closed,
}

/// Reads until the head is complete (or is recognisably not ours). `buf` is the caller's so
/// that it can tell, after a timeout, whether anything arrived.
pub async fn read<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut Vec<u8>, max: usize) -> io::Result<Head> {
    buf.reserve_exact(INITIAL_BUFFER.min(max));
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= max {
                return Ok(Head::TooLarge);
            }
            buf.reserve_exact((buf.len() * 2).min(max) - buf.len());
        }
        let before = buf.len();
        if io.read_buf(buf).await? == 0 {
            return Ok(Head::Closed);
        }
        // Parse only once the head may be complete (or may be an HTTP/2 preface): a head
        // dripped in byte by byte must not cost a full parse per byte.
        let may_be_h2 = buf.len() <= H2_PREFACE.len() || buf.starts_with(b"PRI ");
        if (may_be_h2 || ends_head(buf, before))
            && let Some(head) = classify(buf)
        {
            return Ok(head);
        }
    }
}

/// Whether the bytes from `from` on (with the three before, for a marker split across reads)
/// hold the blank line that ends a head (`\n\n`, or `\n\r\n`: httparse accepts both).
fn ends_head(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(3)..];
    memchr::memmem::find(tail, b"\n\n").is_some() || memchr::memmem::find(tail, b"\n\r\n").is_some()
}

/// Decides from what was read so far; `None` means more bytes are needed.
fn classify(buf: &[u8]) -> Option<Head> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then(|| Head::Other(Bytes::copy_from_slice(buf)));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(len)) if len == buf.len() => {
            Some(fast_path(&req).unwrap_or_else(|| Head::Other(Bytes::copy_from_slice(buf))))
        }
        // Bytes after the head (a body, a pipelined request) or a parse error: hyper decides.
        Ok(httparse::Status::Complete(_)) | Err(_) => Some(Head::Other(Bytes::copy_from_slice(buf))),
    }
}

/// The request, if it is one the fast path serves.
fn fast_path(req: &httparse::Request<'_, '_>) -> Option<Head> {
    let path = req.path?;
    let on_path = path == "/v1/events" || path.starts_with("/v1/events?");
    if req.method != Some("GET") || req.version != Some(1) || !on_path {
        return None;
    }
    let mut builder = http::Request::builder().method(http::Method::GET).uri(path).version(http::Version::HTTP_11);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        // A body or an upgrade is not a stream request; hyper answers those.
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || (name.eq_ignore_ascii_case(b"content-length") && h.value != b"0")
        {
            return None;
        }
        builder = builder.header(h.name, h.value);
    }
    builder.body(axum::body::Body::empty()).ok().map(|r| Head::Stream(Box::new(r)))
}

/// An IO that first yields bytes already read from it. hyper-util has one, but it is private.
pub struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(pre: Bytes, inner: T) -> Self {
        Self { pre, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(raw: &str) -> &'static str {
        match classify(raw.as_bytes()) {
            None => "partial",
            Some(Head::Stream(_)) => "stream",
            Some(Head::Other(_)) => "other",
            Some(Head::TooLarge | Head::Closed) => "?",
        }
    }

    #[test]
    fn only_a_plain_http11_get_of_the_stream_takes_the_fast_path() {
        assert_eq!(kind("GET /v1/events?user=a HTTP/1.1\r\nHost: x\r\n\r\n"), "stream");
        assert_eq!(kind("GET /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"), "stream");
        assert_eq!(kind("GET /v1/events?user=a HTTP/1.1\r\nHost: x\r\n"), "partial");
        assert_eq!(kind("GET /v1/events HTTP/1.0\r\n\r\n"), "other");
        assert_eq!(kind("GET /v1/eventsX HTTP/1.1\r\n\r\n"), "other");
        assert_eq!(kind("HEAD /v1/events HTTP/1.1\r\n\r\n"), "other");
        assert_eq!(kind("OPTIONS /v1/events HTTP/1.1\r\n\r\n"), "other");
        assert_eq!(kind("GET /v1/events HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"), "other");
        assert_eq!(kind("GET /v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), "other");
        assert_eq!(kind("GET /v1/events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"), "other");
        assert_eq!(kind("GET /v1/events HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"), "other", "pipelined");
        assert_eq!(kind("G\x01T / HTTP/1.1\r\n\r\n"), "other", "hyper answers malformed heads");
        assert_eq!(kind("PRI * HTTP/2.0\r\n"), "partial");
        assert_eq!(kind("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "other");
    }

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let b = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(ends_head(b, 0));
        assert!(ends_head(b, b.len() - 1), "the marker began in an earlier read");
        assert!(!ends_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 0));
        assert!(ends_head(b"GET / HTTP/1.1\nHost: x\n\n", 0));
    }

    #[tokio::test]
    async fn a_head_is_read_across_reads_and_bounded() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in ["GET /v1/events?user=a HT", "TP/1.1\r\nHost: x\r\n", "\r\n"] {
                client.write_all(part.as_bytes()).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buf = Vec::new();
        assert!(matches!(read(&mut server, &mut buf, 8192).await.unwrap(), Head::Stream(_)));
        let mut client = writer.await.unwrap();
        let mut buf = Vec::new();
        let big = format!("GET /v1/events HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(5000));
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = client.write_all(big.as_bytes()).await;
        });
        assert!(matches!(read(&mut server, &mut buf, 2048).await.unwrap(), Head::TooLarge));
    }

    #[tokio::test]
    async fn rewind_replays_what_was_read_first() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut r = Rewind::new(Bytes::from_static(b"abc"), server);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"def").await.unwrap();
        });
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"abcdef");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_classified_without_panicking(b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = classify(&b);
        }
    }
}
