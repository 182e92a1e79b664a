//! The event-stream parser never panics, whatever the bytes and however they are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegate::event_stream::parse::Parser;

fuzz_target!(|input: (Vec<u8>, u8)| {
    let (bytes, split) = input;
    let at = usize::from(split).min(bytes.len());
    let mut p = Parser::new();
    let mut out = Vec::new();
    p.feed(&bytes[..at], &mut out);
    p.feed(&bytes[at..], &mut out);
});
