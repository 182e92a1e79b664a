//! Identifier and event-id parsing never panics, and a parsed event id prints back as given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegate::domain::{EventId, EventName, UserId};

fuzz_target!(|s: &str| {
    let _ = UserId::parse(s);
    let _ = EventName::parse(s);
    if let Ok(id) = s.parse::<EventId>() {
        assert_eq!(id.to_string(), s);
    }
});
