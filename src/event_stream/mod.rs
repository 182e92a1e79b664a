//! The `text/event-stream` format: the encoder the server uses and a spec-following parser
//! for clients (tests, the load generator).

mod encode;
pub mod parse;

pub use encode::{HEARTBEAT, POSITION, PartialEvent, encode, position, retry};

#[cfg(test)]
mod roundtrip {
    //! Property: any event, encoded then parsed as a browser would, comes back identical
    //! (line breaks normalised to LF, which is all the format can carry).
    use super::parse::{Item, Parser};
    use crate::domain::{EventId, EventName};
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[^\\p{Cc}]{1,40}".prop_filter("valid name", |s| EventName::parse(s).is_ok()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn encode_then_parse_is_identity(
            name in name(),
            data in "(.|\r|\n|\r\n|:|data: |id: |event: ){0,60}",
            epoch: u64,
            seq: u64,
            split in 0usize..200,
        ) {
            let id = EventId { epoch, seq };
            let wire = super::encode(name.as_deref(), &data).finish(id);
            let mut p = Parser::new();
            let mut out = Vec::new();
            let split = split.min(wire.len());
            p.feed(&wire[..split], &mut out);
            p.feed(&wire[split..], &mut out);
            prop_assert_eq!(out.len(), 1, "exactly one event, nothing forged: {:?}", out);
            let Item::Event(ev) = &out[0] else { panic!("not an event: {:?}", out) };
            prop_assert_eq!(&ev.event_type, name.as_deref().unwrap_or("message"));
            prop_assert_eq!(ev.data.clone(), data.replace("\r\n", "\n").replace('\r', "\n"));
            prop_assert_eq!(ev.last_event_id.clone(), id.to_string());
        }

        #[test]
        fn the_position_parses_as_one_named_event_carrying_its_id(epoch: u64, seq: u64) {
            let id = EventId { epoch, seq };
            let mut p = Parser::new();
            let mut out = Vec::new();
            p.feed(&super::position(id), &mut out);
            let want = super::parse::ParsedEvent {
                event_type: super::POSITION.to_owned(),
                data: id.to_string(),
                last_event_id: id.to_string(),
            };
            prop_assert_eq!(out, vec![Item::Event(want)]);
            prop_assert_eq!(p.last_event_id(), id.to_string());
        }
    }
}
