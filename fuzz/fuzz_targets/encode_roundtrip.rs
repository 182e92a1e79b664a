//! Any data, encoded then parsed, comes back as one event with the same data (line breaks
//! normalised to LF): no payload can forge a field or a second event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegate::{
    domain::EventId,
    event_stream::{
        encode,
        parse::{Item, Parser},
    },
};

fuzz_target!(|data: String| {
    let bytes = encode(Some("n"), &data).finish(EventId { epoch: 1, seq: 2 });
    let mut p = Parser::new();
    let mut out = Vec::new();
    p.feed(&bytes, &mut out);
    let expected = data.replace("\r\n", "\n").replace('\r', "\n");
    match out.as_slice() {
        [Item::Event(e)] => {
            assert_eq!(e.data, expected);
            assert_eq!(e.event_type, "n");
            assert_eq!(e.last_event_id, "1-2");
        }
        other => panic!("expected exactly one event, got {other:?}"),
    }
});
