//! Static assets: the browser client at `GET /v1/client.js` (cacheable, with an ETag), and
//! in development mode the demo page at `GET /`. Both are embedded in the binary.

use axum::{
    response::{IntoResponse, Response},
    routing::{MethodRouter, any, get},
};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::{AppState, HttpError};

/// clients/js/ssegate.js, the ES module browsers import.
const CLIENT_JS: &str = include_str!("../../clients/js/ssegate.js");
/// clients/js/demo.html, the development demo page.
const DEMO_HTML: &str = include_str!("../../clients/js/demo.html");

/// The client's ETag: a strong validator from a 64-bit FNV-1a hash of its bytes, computed once,
/// at compile time.
const CLIENT_ETAG: &str = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    const BYTES: [u8; 18] = {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let src = CLIENT_JS.as_bytes();
        let mut i = 0;
        while i < src.len() {
            h ^= src[i] as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        let mut out = [b'"'; 18];
        let mut j = 0;
        while j < 16 {
            out[1 + j] = HEX[((h >> (60 - 4 * j)) & 0xf) as usize];
            j += 1;
        }
        out
    };
    match std::str::from_utf8(&BYTES) {
        Ok(s) => s,
        Err(_) => panic!("an ETag is ASCII"),
    }
};

/// How long browsers and proxies may reuse the client without asking again.
const CLIENT_CACHE_CONTROL: &str = "public, max-age=300";

/// `GET /v1/client.js` (HEAD too): the module, or `304 Not Modified` when the browser's copy
/// is current.
pub async fn client_js(headers: HeaderMap) -> Response {
    let mut resp = if etag_matches(&headers, CLIENT_ETAG) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut resp = CLIENT_JS.into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
        resp
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(CLIENT_ETAG));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CLIENT_CACHE_CONTROL));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// `GET /`: the demo page if `enabled` (development mode), else 404 like any unknown path.
pub fn demo(enabled: bool) -> MethodRouter<AppState> {
    if enabled { get(demo_page) } else { any(|| async { HttpError::NotFound }) }
}

async fn demo_page() -> Response {
    let mut resp = DEMO_HTML.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// Whether `If-None-Match` lists `etag` (weak comparison, as RFC 9110 asks for this header)
/// or is `*`.
fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etag_is_a_quoted_hash_of_the_client() {
        assert_eq!(CLIENT_ETAG.len(), 18);
        assert!(CLIENT_ETAG.starts_with('"') && CLIENT_ETAG.ends_with('"'));
        assert!(CLIENT_ETAG[1..17].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn if_none_match_lists_weak_and_any() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_static(v));
            h
        };
        assert!(!etag_matches(&HeaderMap::new(), "\"a\""));
        assert!(etag_matches(&with("\"a\""), "\"a\""));
        assert!(etag_matches(&with("\"b\", W/\"a\""), "\"a\""));
        assert!(etag_matches(&with("*"), "\"a\""));
        assert!(!etag_matches(&with("\"b\""), "\"a\""));
        assert!(!etag_matches(&with("a"), "\"a\""));
    }
}
