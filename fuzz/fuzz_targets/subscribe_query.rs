//! The subscription query parser accepts or refuses any query string without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|q: &str| {
    let _ = ssegate::http::parse_query(q, 64);
});
