//! The two hostile-client faults, on plain blocking sockets swept without blocking:
//!
//! - **Silent sockets:** TCP connections to a replica's HTTP port that never send a byte. We
//!   note which ones the server closes (or answers, e.g. `408`) and after how long.
//! - **Stalled HTTP/2 streams:** an h2c connection (prior knowledge) that sends the preface,
//!   an empty SETTINGS and one HEADERS frame opening an SSE stream (HPACK literals without
//!   indexing, written by hand), then never reads and never grants flow-control credit. When
//!   the stall ends we read what piled up: DATA bytes, RST_STREAM (the server reset the stream),
//!   GOAWAY, end of connection.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde::Serialize;

#[derive(Debug, Default, Clone, Serialize)]
pub struct SilentOutcome {
    pub requested: u64,
    pub opened: u64,
    pub failed_to_open: u64,
    /// Closed (FIN or reset) by the server while we held them.
    pub closed_by_server: u64,
    /// Of those, how many got some bytes first (an error response).
    pub answered: u64,
    pub close_after_ms_min: Option<u64>,
    pub close_after_ms_max: Option<u64>,
    pub still_open_at_end: u64,
    pub held_ms: u64,
}

/// Opens `count` silent connections to `addr`, holds them for `hold`, watching for the server
/// closing them (swept every 100 ms).
pub fn silent_sockets(addr: SocketAddr, count: u64, hold: Duration) -> SilentOutcome {
    let mut out = SilentOutcome { requested: count, ..Default::default() };
    let start = Instant::now();
    let mut socks: Vec<(TcpStream, Instant, bool)> = Vec::new();
    for _ in 0..count {
        if start.elapsed() > hold {
            break;
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) if s.set_nonblocking(true).is_ok() => socks.push((s, Instant::now(), false)),
            _ => out.failed_to_open += 1,
        }
    }
    out.opened = socks.len() as u64;
    let mut open: Vec<bool> = vec![true; socks.len()];
    let mut closes = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        for (i, (s, opened_at, got_bytes)) in socks.iter_mut().enumerate() {
            if !open[i] {
                continue;
            }
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        open[i] = false;
                        closes.push(opened_at.elapsed().as_millis() as u64);
                        out.answered += u64::from(*got_bytes);
                        break;
                    }
                    Ok(_) => *got_bytes = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        open[i] = false;
                        closes.push(opened_at.elapsed().as_millis() as u64);
                        out.answered += u64::from(*got_bytes);
                        break;
                    }
                }
            }
        }
        if start.elapsed() >= hold || open.iter().all(|o| !o) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out.closed_by_server = closes.len() as u64;
    out.close_after_ms_min = closes.iter().min().copied();
    out.close_after_ms_max = closes.iter().max().copied();
    out.still_open_at_end = open.iter().filter(|o| **o).count() as u64;
    out.held_ms = start.elapsed().as_millis() as u64;
    out
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the bits above it.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header field as "literal without indexing, new name" (RFC 7541 §6.2.2), no Huffman.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The client's whole side of a stalled stream: preface, SETTINGS, HEADERS (END_STREAM,
/// END_HEADERS) for `GET path` on stream 1.
pub fn h2_opening(authority: &str, path: &str) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut block = Vec::new();
    for (n, v) in [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)] {
        hpack_literal(&mut block, n, v);
    }
    hpack_literal(&mut block, "accept", "text/event-stream");
    frame(&mut out, 0x1, 0x1 | 0x4, 1, &block);
    out
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct StallOutcome {
    pub requested: u64,
    pub opened: u64,
    pub failed_to_open: u64,
    /// Connections on which the server had sent a response HEADERS frame.
    pub answered: u64,
    pub data_bytes: u64,
    /// Connections that received RST_STREAM on the stream / GOAWAY / the end of the connection.
    pub rst_stream: u64,
    pub goaway: u64,
    pub closed: u64,
    /// Neither reset nor closed when read after the stall.
    pub untouched: u64,
    pub rst_codes: Vec<u32>,
    pub held_ms: u64,
    pub server_rss_kib_before: Option<u64>,
    pub server_rss_kib_after: Option<u64>,
}

/// What the frames read after the stall said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub headers: bool,
    pub data_bytes: u64,
    pub rst: Option<u32>,
    pub goaway: bool,
}

/// Reads the frames in `buf` (after the server's part of the preface: none, h2 servers send
/// no preface string). Partial trailing frames are ignored.
pub fn parse_frames(buf: &[u8]) -> Seen {
    let mut seen = Seen::default();
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
        let kind = buf[at + 3];
        let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]) & 0x7fff_ffff;
        let Some(payload) = buf.get(at + 9..at + 9 + len) else { break };
        match kind {
            0x0 if stream == 1 => seen.data_bytes += len as u64,
            0x1 if stream == 1 => seen.headers = true,
            0x3 if stream == 1 && payload.len() >= 4 => {
                seen.rst = Some(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
            }
            0x7 => seen.goaway = true,
            _ => {}
        }
        at += 9 + len;
    }
    seen
}

/// Opens `count` stalled h2 streams (user `stall-<i>`, topic `topic`), holds them without
/// reading for `hold` (calling `during` once they are open, e.g. to start the load), then
/// reads what came.
pub fn stalled_h2(
    addr: SocketAddr,
    count: u64,
    topic: &str,
    hold: Duration,
    mut during: impl FnMut(),
    rss: impl Fn() -> Option<u64>,
) -> StallOutcome {
    let mut out = StallOutcome { requested: count, ..Default::default() };
    let start = Instant::now();
    let mut socks = Vec::new();
    for i in 0..count {
        let opening = h2_opening(&addr.to_string(), &format!("/v1/events?user=stall-{i}&topic={topic}"));
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => match s.write_all(&opening) {
                Ok(()) => socks.push(s),
                Err(_) => out.failed_to_open += 1,
            },
            Err(_) => out.failed_to_open += 1,
        }
    }
    out.opened = socks.len() as u64;
    out.server_rss_kib_before = rss();
    during();
    let until = start + hold;
    while Instant::now() < until {
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(200)));
    }
    out.server_rss_kib_after = rss();
    // Now read everything that arrived, sweeping without blocking for up to 3 s.
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let mut eof = vec![false; socks.len()];
    for s in &socks {
        let _ = s.set_nonblocking(true);
    }
    let read_until = Instant::now() + Duration::from_secs(3);
    let mut chunk = vec![0u8; 64 * 1024];
    while Instant::now() < read_until && eof.iter().any(|e| !e) {
        let mut progress = false;
        for (i, s) in socks.iter_mut().enumerate() {
            while !eof[i] {
                match s.read(&mut chunk) {
                    Ok(0) => eof[i] = true,
                    Ok(n) => {
                        bufs[i].extend_from_slice(&chunk[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => eof[i] = true,
                }
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for (buf, eof) in bufs.iter().zip(&eof) {
        let seen = parse_frames(buf);
        out.answered += u64::from(seen.headers);
        out.data_bytes += seen.data_bytes;
        out.goaway += u64::from(seen.goaway);
        out.closed += u64::from(*eof);
        if let Some(code) = seen.rst {
            out.rst_stream += 1;
            if !out.rst_codes.contains(&code) {
                out.rst_codes.push(code);
            }
        }
        out.untouched += u64::from(seen.rst.is_none() && !seen.goaway && !*eof);
    }
    out.held_ms = start.elapsed().as_millis() as u64;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers() {
        let enc = |v| {
            let mut o = Vec::new();
            hpack_int(&mut o, 0, 7, v);
            o
        };
        assert_eq!(enc(10), [10]);
        assert_eq!(enc(126), [126]);
        assert_eq!(enc(127), [127, 0]);
        assert_eq!(enc(1337), [127, 0xba, 0x09]);
        let mut o = Vec::new();
        hpack_int(&mut o, 0xe0, 5, 1337);
        assert_eq!(o, [0xff, 0x9a, 0x0a], "RFC 7541 C.1.2");
    }

    #[test]
    fn opening_frames() {
        let o = h2_opening("127.0.0.1:1", "/v1/events?user=a");
        let rest = o.strip_prefix(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice()).unwrap();
        assert_eq!(&rest[..9], [0, 0, 0, 4, 0, 0, 0, 0, 0], "empty SETTINGS");
        let h = &rest[9..];
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        assert_eq!((h[3], h[4], &h[5..9]), (1, 5, &[0, 0, 0, 1][..]), "HEADERS, END_STREAM|END_HEADERS, stream 1");
        assert_eq!(h.len(), 9 + len);
        assert_eq!(&h[9..18], b"\x00\x07:method");
    }

    #[test]
    fn frames_after_a_stall() {
        let mut b = Vec::new();
        frame(&mut b, 0x4, 0, 0, &[0; 6]);
        frame(&mut b, 0x1, 0x4, 1, b"hdrs");
        frame(&mut b, 0x0, 0, 1, &[b'x'; 100]);
        frame(&mut b, 0x3, 0, 1, &8u32.to_be_bytes());
        frame(&mut b, 0x7, 0, 0, &[0; 8]);
        b.extend_from_slice(&[0, 0, 9]);
        assert_eq!(parse_frames(&b), Seen { headers: true, data_bytes: 100, rst: Some(8), goaway: true });
    }
}
