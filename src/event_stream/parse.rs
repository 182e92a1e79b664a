//! A client-side parser of `text/event-stream`, written from the WHATWG HTML standard
//! (section 9.2.6) step by step, independent of the encoder. Tests and the load generator use
//! it to read what the server sends exactly as a browser's `EventSource` would.

/// What a client sees in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event (the `MessageEvent` a browser would fire).
    Event(ParsedEvent),
    /// A valid `retry:` field: the new reconnection time in milliseconds.
    Retry(u64),
    /// A comment line (without its leading colon), such as a heartbeat.
    Comment(String),
}

/// A dispatched event, as `EventSource` exposes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEvent {
    /// `event.type`: the `event:` field, or `message` when there was none.
    pub event_type: String,
    /// `event.data`: the `data:` lines joined with LF.
    pub data: String,
    /// `event.lastEventId`: the last `id:` seen so far on this stream (it persists across events).
    pub last_event_id: String,
}

/// The name (empty when the event has none) and data of one encoded event as the server
/// stores it (the replay log's and the retained store's frames): what `History` and the admin
/// console show.
pub fn name_and_data(frame: &[u8]) -> (String, String) {
    let mut parsed = Vec::new();
    Parser::new().feed(frame, &mut parsed);
    // A retained value is stored without its closing id line, but with its blank line.
    match parsed.into_iter().find_map(|i| match i {
        Item::Event(e) => Some(e),
        _ => None,
    }) {
        // The frame has an `event:` line only when the event has a name.
        Some(e) => (if frame.starts_with(b"event:") { e.event_type } else { String::new() }, e.data),
        None => (String::new(), String::new()),
    }
}

/// Incremental parser: feed it bytes as they arrive, in chunks of any size.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The previous chunk ended in CR: a LF at the start of the next is part of the same break.
    skip_lf: bool,
    /// Whether the first bytes (and a possible byte order mark) were seen.
    started: bool,
    data: String,
    event_type: String,
    /// The last event ID buffer (set by `id:` fields).
    id_buffer: String,
    /// The last event ID string, set from the buffer at each dispatch.
    last_event_id: String,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The event source's last event id: the id buffer as of the last dispatch (a blank line),
    /// with or without data. What a browser sends as `Last-Event-ID` when it reconnects.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Parses `chunk`, appending what it completes to `out`.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<Item>) {
        if !self.started && !chunk.is_empty() {
            // One leading U+FEFF BYTE ORDER MARK is ignored. A BOM split across chunks is not
            // handled: the server never sends one.
            self.started = true;
            chunk = chunk.strip_prefix("\u{feff}".as_bytes()).unwrap_or(chunk);
        }
        for &b in chunk {
            if std::mem::take(&mut self.skip_lf) && b == b'\n' {
                continue;
            }
            match b {
                b'\r' | b'\n' => {
                    self.skip_lf = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&String::from_utf8_lossy(&line), out);
                }
                _ => self.line.push(b),
            }
        }
    }

    fn process_line(&mut self, line: &str, out: &mut Vec<Item>) {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if let Some(comment) = line.strip_prefix(':') {
            out.push(Item::Comment(comment.to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event_type = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.id_buffer = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse() {
                    out.push(Item::Retry(ms));
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Item>) {
        let mut data = std::mem::take(&mut self.data);
        let event_type = std::mem::take(&mut self.event_type);
        self.last_event_id.clone_from(&self.id_buffer);
        if data.is_empty() {
            return;
        }
        if data.ends_with('\n') {
            data.pop();
        }
        out.push(Item::Event(ParsedEvent {
            event_type: if event_type.is_empty() { "message".to_owned() } else { event_type },
            data,
            last_event_id: self.last_event_id.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<Item> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out);
        }
        out
    }

    fn ev(t: &str, d: &str, id: &str) -> Item {
        Item::Event(ParsedEvent { event_type: t.into(), data: d.into(), last_event_id: id.into() })
    }

    #[test]
    fn examples_from_the_standard() {
        // "data: YHOO\ndata: +2\ndata: 10\n\n" fires one message with "YHOO\n+2\n10".
        assert_eq!(parse(&[b"data: YHOO\ndata: +2\ndata: 10\n\n"]), vec![ev("message", "YHOO\n+2\n10", "")]);
        // An event without a trailing blank line is not dispatched.
        assert_eq!(parse(&[b"data: first\n\ndata: second"]), vec![ev("message", "first", "")]);
        // "data:test" and "data: test" are the same; the id persists.
        assert_eq!(
            parse(&[b"id: 1\ndata:test\n\ndata: test\n\n"]),
            vec![ev("message", "test", "1"), ev("message", "test", "1")]
        );
        // A lone "data" line is an empty data line.
        assert_eq!(parse(&[b"data\n\ndata\ndata\n\ndata:\n"]), vec![ev("message", "", ""), ev("message", "\n", "")]);
    }

    #[test]
    fn line_breaks_of_every_kind_even_split_across_chunks() {
        assert_eq!(
            parse(&[b"event: a\r", b"\ndata: x\r\r", b"event: b\rdata: y\n\n"]),
            vec![ev("a", "x", ""), ev("b", "y", "")]
        );
    }

    #[test]
    fn retry_comments_and_bom() {
        assert_eq!(
            parse(&["\u{feff}: hi\nretry: 1500\nretry: x\n".as_bytes()]),
            vec![Item::Comment(" hi".into()), Item::Retry(1500)]
        );
    }

    #[test]
    fn ids_with_nul_are_ignored() {
        assert_eq!(parse(&[b"id: 5\nid: a\0b\ndata: x\n\n"]), vec![ev("message", "x", "5")]);
    }
}
