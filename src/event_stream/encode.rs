//! The encoder: events to `text/event-stream` bytes, per the WHATWG HTML standard
//! ("Server-sent events", section 9.2.6, the event stream interpretation).
//!
//! Hand-written because the format is a few lines and the crates that offer it (axum's `Sse`)
//! encode per connection; we encode each event once and share the bytes with every recipient.
//! Safety comes from construction: data is cut at every CR, LF and CR LF into separate `data:`
//! lines, so no payload can end a line of its own; names and ids never contain control
//! characters (their types refuse them).

use bytes::{BufMut, Bytes, BytesMut};

use crate::domain::EventId;

/// A comment line: ignored by clients, keeps idle connections and proxies from timing out.
pub const HEARTBEAT: &[u8] = b":\n";

/// Room reserved at the end of a [`PartialEvent`] for `id: <epoch>-<seq>\n\n`
/// (4 + 16 + 1 + 20 + 2 bytes at most).
const ID_RESERVE: usize = 43;

/// An event encoded but for its `id:` line, which goes last so that the (cheap) id can be
/// appended once the sequence number is assigned, while the (costly) data is encoded outside
/// the router's lock. Field order does not matter to the format.
#[derive(Debug)]
pub struct PartialEvent(BytesMut);

impl PartialEvent {
    /// Appends the id and the blank line that ends the event; the result is what goes on the
    /// wire, shared by every recipient.
    pub fn finish(mut self, id: EventId) -> Bytes {
        use std::fmt::Write;
        self.0.put_slice(b"id: ");
        // Writing to a BytesMut cannot fail.
        let _ = write!(self.0, "{id}");
        self.0.put_slice(b"\n\n");
        self.0.freeze()
    }

    /// Ends the event without an id, so a client's last event id stays what it was (used for
    /// control events such as `ssegate.disconnect` that are not part of the replayable stream).
    pub fn finish_without_id(mut self) -> Bytes {
        self.0.put_u8(b'\n');
        self.0.freeze()
    }
}

/// Encodes the `event:` and `data:` lines of an event. `name` of `None` is the default
/// `message` type, which needs no `event:` line.
pub fn encode(name: Option<&str>, data: &str) -> PartialEvent {
    let lines_guess = 1 + memchr::memchr2_iter(b'\r', b'\n', data.as_bytes()).count();
    let name_len = name.map_or(0, |n| n.len() + 8);
    let mut buf = BytesMut::with_capacity(name_len + data.len() + 7 * lines_guess + ID_RESERVE);
    if let Some(name) = name {
        debug_assert!(!name.contains(['\r', '\n']));
        buf.put_slice(b"event: ");
        buf.put_slice(name.as_bytes());
        buf.put_u8(b'\n');
    }
    for line in data_lines(data.as_bytes()) {
        buf.put_slice(b"data: ");
        buf.put_slice(line);
        buf.put_u8(b'\n');
    }
    PartialEvent(buf)
}

/// A `retry:` field telling the client how long to wait before reconnecting.
pub fn retry(millis: u64) -> Bytes {
    Bytes::from(format!("retry: {millis}\n"))
}

/// The name of the position event (the reserved `ssegate.` prefix).
pub const POSITION: &str = "ssegate.position";

/// The position event that opens a stream (after any replayed, missed or retained events):
/// `event: ssegate.position`, `id: <id>`, `data: <id>`. It sets the client's last event id to
/// `id`, so that a reconnect resumes from here even if no other event carries an id first.
///
/// A named event with data rather than a bare `id:` block, so that every kind of client sees
/// it: a browser's `EventSource` sets its last event id from it as from any event and, with no
/// listener for the name, dispatches nothing to the page (its behaviour is that of the bare
/// `id:` line); a library that ignores a block without data (many do) records the id like any
/// other event's; one that hands every block to its caller hands over an event it can tell
/// apart by its name (never an empty `message`), and a client that wants the position (to
/// store it, to reconnect from it) can listen for it; the data repeats the id for those that
/// do not expose ids.
pub fn position(id: EventId) -> Bytes {
    Bytes::from(format!("event: {POSITION}\nid: {id}\ndata: {id}\n\n"))
}

/// Splits at every LF, CR and CR LF, as the parser does. Always yields at least one line (the
/// empty data yields one empty line, which the client reads back as the empty string), and a
/// trailing line break yields a trailing empty line, so `"a\n"` arrives as `"a\n"`.
fn data_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let s = rest?;
        match memchr::memchr2(b'\r', b'\n', s) {
            None => {
                rest = None;
                Some(s)
            }
            Some(i) => {
                let skip = if s[i] == b'\r' && s.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(name: Option<&str>, data: &str) -> String {
        let id = EventId { epoch: 0xab, seq: 7 };
        String::from_utf8(encode(name, data).finish(id).to_vec()).unwrap()
    }

    #[test]
    fn simple_message() {
        assert_eq!(enc(None, "hello"), "data: hello\nid: ab-7\n\n");
    }

    #[test]
    fn named_event_with_every_line_break_kind() {
        assert_eq!(enc(Some("chat"), "a\nb\r\nc\rd"), "event: chat\ndata: a\ndata: b\ndata: c\ndata: d\nid: ab-7\n\n");
    }

    #[test]
    fn injected_fields_stay_inside_data_lines() {
        assert_eq!(
            enc(None, "x\n\nid: 999\nevent: evil\r\ndata: forged"),
            "data: x\ndata: \ndata: id: 999\ndata: event: evil\ndata: data: forged\nid: ab-7\n\n"
        );
    }

    #[test]
    fn empty_and_trailing_breaks() {
        assert_eq!(enc(None, ""), "data: \nid: ab-7\n\n");
        assert_eq!(enc(None, "a\n"), "data: a\ndata: \nid: ab-7\n\n");
        assert_eq!(enc(None, "\r\n"), "data: \ndata: \nid: ab-7\n\n");
    }

    #[test]
    fn the_position_is_a_named_event_whose_data_is_its_id() {
        let b = position(EventId { epoch: 0xab, seq: 7 });
        assert_eq!(&b[..], b"event: ssegate.position\nid: ab-7\ndata: ab-7\n\n");
        assert!(POSITION.starts_with(crate::domain::RESERVED_EVENT_PREFIX));
    }

    #[test]
    fn control_event_has_no_id() {
        let b = encode(Some("ssegate.disconnect"), "bye").finish_without_id();
        assert_eq!(&b[..], b"event: ssegate.disconnect\ndata: bye\n\n");
    }
}
