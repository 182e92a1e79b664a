//! The client's wire decoding: an HTTP/1.1 response head, the body framing (chunked, length
//! or until close) and a lean `text/event-stream` scanner that yields each event's data.
//!
//! Hand-written for speed (one client core reads up to millions of events a second), not for
//! completeness: it ignores `id:` and `retry:`, and `event:` but for skipping the server's
//! `ssegate.position` (the bench only needs the data of the events published), but follows the
//! spec's line rules (LF, CR, CR LF; one space after the colon; blank line dispatches; no data,
//! no event). `ssegate::event_stream::parse` is the complete parser.

/// What a response head said.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Framing {
    Chunked,
    Length(u64),
    UntilClose,
}

/// Parses a response head at the start of `buf`; `None` until it is complete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > 16 * 1024 { Err("response head over 16 KiB".into()) } else { Ok(None) };
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut framing = Framing::UntilClose;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(value.parse().map_err(|_| format!("bad content-length {value:?}"))?);
        }
    }
    Ok(Some(Head { status, framing, len: end + 4 }))
}

/// Removes the body framing; feed it raw bytes, it hands out body bytes.
#[derive(Debug)]
pub enum BodyDecoder {
    Chunked(Chunked),
    Length(u64),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Reading the hex size; the value so far.
    Size(u64),
    /// Skipping a chunk extension up to the end of the size line.
    Extension(u64),
    /// Seen CR after the size line; expecting LF.
    SizeLf(u64),
    /// Inside a chunk: bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// The last chunk was seen: the body is complete (trailers are ignored).
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Chunked => BodyDecoder::Chunked(Chunked::Size(0)),
            Framing::Length(n) => BodyDecoder::Length(n),
            Framing::UntilClose => BodyDecoder::UntilClose,
        }
    }

    /// Decodes `input`, passing body bytes to `out`; returns true once the body is complete.
    pub fn feed(&mut self, mut input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<bool, String> {
        let state = match self {
            BodyDecoder::UntilClose => {
                out(input);
                return Ok(false);
            }
            BodyDecoder::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                out(&input[..n]);
                *left -= n as u64;
                return Ok(*left == 0);
            }
            BodyDecoder::Chunked(state) => state,
        };
        while !input.is_empty() {
            if let Chunked::Data(left) = *state {
                let n = left.min(input.len() as u64) as usize;
                out(&input[..n]);
                input = &input[n..];
                *state = if left == n as u64 { Chunked::DataCr } else { Chunked::Data(left - n as u64) };
                continue;
            }
            let b = input[0];
            input = &input[1..];
            let end_of_size = |size: u64| if size == 0 { Chunked::Done } else { Chunked::Data(size) };
            *state = match (*state, b) {
                (Chunked::Size(n), b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                    Chunked::Size(n.checked_mul(16).ok_or("chunk size overflows")? + digit)
                }
                (Chunked::Size(n) | Chunked::Extension(n), b';' | b' ' | b'\t') => Chunked::Extension(n),
                (Chunked::Size(n) | Chunked::Extension(n), b'\r') => Chunked::SizeLf(n),
                (Chunked::Size(n) | Chunked::Extension(n) | Chunked::SizeLf(n), b'\n') => end_of_size(n),
                (Chunked::Extension(n), _) => Chunked::Extension(n),
                (Chunked::DataCr, b'\r') => Chunked::DataLf,
                (Chunked::DataCr | Chunked::DataLf, b'\n') => Chunked::Size(0),
                (Chunked::Done, _) => return Ok(true),
                (s, b) => return Err(format!("bad chunked framing: byte {b:#04x} in state {s:?}")),
            };
        }
        Ok(*state == Chunked::Done)
    }
}

/// What the scanner found.
#[derive(Debug, PartialEq, Eq)]
pub enum Sse<'a> {
    /// A dispatched event's data (its `data:` lines joined with LF).
    Event(&'a [u8]),
    /// A comment line, such as a heartbeat.
    Comment,
}

/// Splits a byte stream into lines the WHATWG way (LF, CR or CR LF end a line), across chunks.
/// Both event-stream scanners (this one, and the chaos run's) read through it.
#[derive(Debug, Default)]
pub struct Lines {
    /// An incomplete line carried over from the previous chunk.
    carry: Vec<u8>,
    /// The previous chunk ended in CR: a LF first in the next one is part of that break.
    skip_lf: bool,
}

impl Lines {
    pub fn feed(&mut self, mut input: &[u8], on_line: &mut impl FnMut(&[u8])) {
        if std::mem::take(&mut self.skip_lf) && input.first() == Some(&b'\n') {
            input = &input[1..];
        }
        while let Some(i) = memchr::memchr2(b'\n', b'\r', input) {
            if self.carry.is_empty() {
                on_line(&input[..i]);
            } else {
                self.carry.extend_from_slice(&input[..i]);
                on_line(&self.carry);
                self.carry.clear();
            }
            let cr = input[i] == b'\r';
            input = &input[i + 1..];
            if cr {
                match input.first() {
                    Some(b'\n') => input = &input[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        self.carry.extend_from_slice(input);
    }
}

/// A field line's name and value (one optional space after the colon dropped; no colon: the
/// whole line is the name).
pub fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b':', line) {
        Some(i) => (&line[..i], line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
        None => (line, &b""[..]),
    }
}

/// The prefix of the server's own events (`ssegate.position` opens every stream,
/// `ssegate.shutdown` ends a drained one): not published events, so the scanner skips them.
const CONTROL: &[u8] = b"ssegate.";

#[derive(Debug, Default)]
pub struct Scanner {
    lines: Lines,
    data: Vec<u8>,
    has_data: bool,
    /// The event being read is one of the server's own (`ssegate.*`).
    position: bool,
}

impl Scanner {
    pub fn feed(&mut self, input: &[u8], on: &mut impl FnMut(Sse<'_>)) {
        let Self { lines, data, has_data, position } = self;
        lines.feed(input, &mut |line| {
            if line.is_empty() {
                if std::mem::take(has_data) && !*position {
                    on(Sse::Event(data));
                }
                *position = false;
                data.clear();
                return;
            }
            if line[0] == b':' {
                return on(Sse::Comment);
            }
            let (name, value) = field(line);
            if name == b"data" {
                if std::mem::replace(has_data, true) {
                    data.push(b'\n');
                }
                data.extend_from_slice(value);
            } else if name == b"event" {
                *position = value.starts_with(CONTROL);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nrest").unwrap().unwrap();
        assert_eq!(h, Head { status: 200, framing: Framing::Chunked, len: 47 });
        let h = parse_head(b"HTTP/1.1 201 Created\r\ncontent-length: 12\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(12));
        assert_eq!(parse_head(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap().unwrap().framing, Framing::UntilClose);
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
    }

    fn dechunk(wire: &[u8], split: usize) -> (Vec<u8>, bool) {
        let mut d = BodyDecoder::new(Framing::Chunked);
        let mut out = Vec::new();
        let mut sink = |b: &[u8]| out.extend_from_slice(b);
        let a = d.feed(&wire[..split], &mut sink).unwrap();
        let b = d.feed(&wire[split..], &mut sink).unwrap();
        (out, a || b)
    }

    #[test]
    fn chunked_at_every_split() {
        let wire = b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n0\r\n\r\n";
        for split in 0..=wire.len() {
            assert_eq!(dechunk(wire, split), (b"hello0123456789".to_vec(), true), "split at {split}");
        }
        let mut d = BodyDecoder::new(Framing::Chunked);
        assert!(d.feed(b"zz\r\n", &mut |_| {}).is_err());
    }

    #[test]
    fn content_length_body_completes() {
        let mut d = BodyDecoder::new(Framing::Length(4));
        let mut out = Vec::new();
        assert!(!d.feed(b"ab", &mut |b| out.extend_from_slice(b)).unwrap());
        assert!(d.feed(b"cdEXTRA", &mut |b| out.extend_from_slice(b)).unwrap());
        assert_eq!(out, b"abcd");
    }

    fn scan(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = Scanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |item| {
                out.push(match item {
                    Sse::Event(d) => String::from_utf8_lossy(d).into_owned(),
                    Sse::Comment => "#".into(),
                })
            });
        }
        out
    }

    #[test]
    fn scanner_follows_the_line_rules() {
        let wire: &[u8] =
            b"retry: 3000\nevent: ssegate.position\nid: a-0\ndata: a-0\n\n:\nevent: x\ndata: 1 2 3\nid: a-1\n\n\
            data:two\r\ndata\r\n\r:hb\rdata: z\n\nevent: ssegatex\ndata: y\n\nevent: ssegate.shutdown\ndata: s\n\n";
        let want = ["#", "1 2 3", "two\n", "#", "z", "y"];
        assert_eq!(scan(&[wire]), want);
        for split in 0..=wire.len() {
            assert_eq!(scan(&[&wire[..split], &wire[split..]]), want, "split at {split}");
        }
    }
}
