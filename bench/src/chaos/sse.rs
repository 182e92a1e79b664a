//! An event-stream scanner that keeps what a browser keeps: the event type, the data, the last
//! event id (set at every dispatch, also by a block with an `id:` and no data; ssegate's cursor
//! is the event `ssegate.position`, whose id is the position) and the reconnection time. The
//! bench's own `sse::Scanner` drops ids and names; the chaos check needs both.
//!
//! Line rules per WHATWG (LF, CR, CR LF; one optional space after the colon; a blank line
//! dispatches; no data, no event; an `id` containing NUL is ignored; `retry` only if digits).

use crate::sse::{Lines, field};

#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A dispatched event; `id` is the last event id after this dispatch.
    Event {
        name: &'a [u8],
        data: &'a [u8],
        id: &'a [u8],
    },
    /// A block with an `id:` field and no data: only the last event id changed.
    IdOnly {
        id: &'a [u8],
    },
    Retry(u64),
    Comment,
}

#[derive(Debug, Default)]
pub struct Scanner {
    lines: Lines,
    state: State,
}

/// What a browser keeps between lines.
#[derive(Debug, Default)]
struct State {
    name: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    id_field_seen: bool,
    id_buffer: Vec<u8>,
    last_id: Vec<u8>,
}

impl Scanner {
    /// The last event id, as a browser would send it in `Last-Event-ID`.
    pub fn last_id(&self) -> &[u8] {
        &self.state.last_id
    }

    pub fn feed(&mut self, input: &[u8], on: &mut impl FnMut(Item<'_>)) {
        let Self { lines, state } = self;
        lines.feed(input, &mut |line| state.line(line, on));
    }
}

impl State {
    fn line(&mut self, line: &[u8], on: &mut impl FnMut(Item<'_>)) {
        if line.is_empty() {
            self.last_id.clone_from(&self.id_buffer);
            if std::mem::take(&mut self.has_data) {
                let name: &[u8] = if self.name.is_empty() { b"message" } else { &self.name };
                on(Item::Event { name, data: &self.data, id: &self.last_id });
            } else if self.id_field_seen {
                on(Item::IdOnly { id: &self.last_id });
            }
            self.id_field_seen = false;
            self.data.clear();
            self.name.clear();
            return;
        }
        if line[0] == b':' {
            return on(Item::Comment);
        }
        let (field, value) = field(line);
        match field {
            b"data" => {
                if std::mem::replace(&mut self.has_data, true) {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
            }
            b"event" => {
                self.name.clear();
                self.name.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.id_field_seen = true;
                self.id_buffer.clear();
                self.id_buffer.extend_from_slice(value);
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    on(Item::Retry(ms));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> (Vec<String>, String) {
        let mut s = Scanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |item| {
                let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                out.push(match item {
                    Item::Event { name, data, id } => format!("{}|{}|{}", show(name), show(data), show(id)),
                    Item::IdOnly { id } => format!("id {}", show(id)),
                    Item::Retry(ms) => format!("retry {ms}"),
                    Item::Comment => "#".into(),
                })
            });
        }
        (out, String::from_utf8_lossy(s.last_id()).into_owned())
    }

    #[test]
    fn what_ssegate_sends() {
        let wire: &[u8] = b"retry: 1000\n\nevent: ssegate.missed\ndata: {\"reason\":\"expired\"}\n\n\
            event: ssegate.position\nid: e-7\ndata: e-7\n\n:\n\
            data: chaos 1 2\nid: e-8\n\ndata:a\r\ndata\r\n\r\nretry: x\n\n";
        let want = [
            "retry 1000",
            "ssegate.missed|{\"reason\":\"expired\"}|",
            "ssegate.position|e-7|e-7",
            "#",
            "message|chaos 1 2|e-8",
            "message|a\n|e-8",
        ];
        assert_eq!(scan(&[wire]), (want.map(String::from).to_vec(), "e-8".to_string()));
        for split in 0..=wire.len() {
            assert_eq!(scan(&[&wire[..split], &wire[split..]]).0, want, "split at {split}");
        }
    }

    #[test]
    fn id_rules() {
        assert_eq!(scan(&[b"id: a\0b\n\n"]).1, "", "an id with NUL is ignored");
        assert_eq!(scan(&[b"id: 1\n\ndata: x\n\n"]).0, ["id 1", "message|x|1"], "the id persists");
        assert_eq!(scan(&[b"id\n\n"]).0, ["id "], "an empty id resets it");
    }
}
