//! The HTTP edge (the public port): `GET /v1/events` and the SSE body. The only module that
//! sees axum; errors map to responses in one place (`error.rs`).

pub mod admin;
mod assets;
mod body;
pub mod console;
mod error;
mod events;
mod head;
mod hyper_conn;
mod per_ip;
pub mod server;
mod stream;

use std::{sync::Arc, time::Duration};

use axum::routing::get;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use error::HttpError;
pub use events::parse_query;

use crate::{auth::SubscriberAuth, event_stream, router::Partitions, telemetry::metrics::EdgeMetrics};

/// Settings of the HTTP edge.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// The reconnection delay advertised to clients in the opening `retry:` field.
    pub retry: Duration,
    /// Most groups plus topics one connection may join.
    pub max_subscriptions: usize,
    /// Origins allowed to open a stream from another origin (`*` for any); empty: none.
    pub cors_allowed_origins: Vec<String>,
    /// Streams are closed cleanly after about this long, if set.
    pub max_connection_lifetime: Option<Duration>,
    /// Serve the demo page at `GET /` (development mode only).
    pub demo_page: bool,
}

#[derive(Clone)]
pub struct AppState {
    /// A connection registers with its user's partition's router.
    routers: Arc<Partitions>,
    auth: Arc<SubscriberAuth>,
    settings: Arc<HttpSettings>,
    /// `settings.retry` as the `retry:` field, encoded once.
    retry_field: Bytes,
    metrics: Arc<EdgeMetrics>,
}

/// An invalid CORS origin, and why: refused at start, since a browser's `Origin` would never
/// match it.
#[derive(Debug, thiserror::Error)]
#[error("invalid CORS origin `{origin}`: {reason}")]
pub struct InvalidOrigin {
    origin: String,
    reason: &'static str,
}

/// The public port's application (routes, state, CORS), built once by `app`.
pub type App = axum::Router;

/// Builds the application: routes, state and CORS.
pub fn app(
    routers: Arc<Partitions>,
    auth: SubscriberAuth,
    settings: &HttpSettings,
    metrics: Arc<EdgeMetrics>,
) -> Result<axum::Router, InvalidOrigin> {
    let state = AppState {
        routers,
        auth: Arc::new(auth),
        metrics,
        retry_field: event_stream::retry(u64::try_from(settings.retry.as_millis()).unwrap_or(u64::MAX)),
        settings: Arc::new(settings.clone()),
    };
    let app = axum::Router::new()
        // GET only. HEAD is refused (405), like every other method: it would run admission and
        // open (and at once drop) a subscription, or else answer headers a GET might not get
        // (admission decides them); probes have the admin port's `/healthz`. axum lists HEAD
        // wherever GET is routed, so `events_allow` says `Allow: GET` on the answers axum
        // completes itself.
        .route("/v1/events", get(events::subscribe).head(|| async { HttpError::MethodNotAllowed }))
        .route("/v1/client.js", get(assets::client_js))
        .route("/", assets::demo(settings.demo_page))
        .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed })
        .fallback(|| async { HttpError::NotFound })
        .with_state(state);
    Ok(match cors(&settings.cors_allowed_origins)? {
        // Outside the CORS layer, which answers preflights itself.
        Some(layer) => app.layer(layer).layer(axum::middleware::from_fn(events_allow)),
        None => app,
    })
}

/// `Allow: GET` on the answers to `OPTIONS /v1/events` (the CORS preflight), as on its 405s
/// and as `Access-Control-Allow-Methods` says, instead of the `GET,HEAD` axum would add.
async fn events_allow(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let events = req.method() == Method::OPTIONS && req.uri().path() == "/v1/events";
    let mut resp = next.run(req).await;
    if events {
        resp.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("GET"));
    }
    resp
}

/// CORS for `GET /v1/events`. An explicit origin list also allows credentials (the token
/// cookie, `withCredentials: true`); `*` never does, or any web site could read a signed-in
/// user's stream with their cookie.
fn cors(origins: &[String]) -> Result<Option<CorsLayer>, InvalidOrigin> {
    if origins.is_empty() {
        return Ok(None);
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET])
        .allow_headers([
            HeaderName::from_static("last-event-id"),
            http::header::CACHE_CONTROL,
            http::header::AUTHORIZATION,
        ])
        .max_age(Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        return Ok(Some(layer.allow_origin(AllowOrigin::any())));
    }
    let values = origins.iter().map(|o| origin(o)).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(layer.allow_origin(AllowOrigin::list(values)).allow_credentials(true)))
}

/// One configured origin, checked to be what a browser sends as `Origin` (RFC 6454
/// serialization: `scheme://host[:port]`, lower case, nothing after), since it is compared
/// byte for byte: `https://app.example.com/` as copied from the address bar would never match.
fn origin(o: &str) -> Result<HeaderValue, InvalidOrigin> {
    let invalid = |reason| InvalidOrigin { origin: o.to_owned(), reason };
    let Some((scheme, rest)) = o.split_once("://").filter(|(s, _)| matches!(*s, "http" | "https")) else {
        return Err(invalid("expected `*` or an origin such as https://app.example.com"));
    };
    if let Some(at) = rest.find(['/', '?', '#']) {
        return Err(invalid(if &rest[at..] == "/" {
            "an origin is scheme://host[:port] with no path: remove the trailing '/'"
        } else {
            "an origin is scheme://host[:port] with no path, query or fragment: remove what follows the host"
        }));
    }
    if rest.contains('@') {
        return Err(invalid("an origin is scheme://host[:port], without user information"));
    }
    let (host, port) = match rest.rsplit_once(':').filter(|(_, p)| !p.contains(']')) {
        Some((host, port)) => (host, Some(port)),
        None => (rest, None),
    };
    if host.is_empty() || port.is_some_and(|p| p.is_empty() || p.parse::<u16>().is_err()) {
        return Err(invalid("expected an origin such as https://app.example.com or http://localhost:5173"));
    }
    if port == Some(if scheme == "https" { "443" } else { "80" }) {
        return Err(invalid("a browser omits the scheme's default port from its Origin: remove it"));
    }
    if o.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid("a browser sends its Origin in lower case: write it so"));
    }
    HeaderValue::from_str(o).map_err(|_| invalid("expected an origin such as https://app.example.com"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_refused_unless_a_browser_could_send_them() {
        for ok in ["https://app.example.com", "http://127.0.0.1:5173", "http://localhost:8080", "http://[::1]:3000"] {
            assert!(origin(ok).is_ok(), "{ok}");
        }
        let reason = |o| origin(o).unwrap_err().to_string();
        assert_eq!(
            reason("http://127.0.0.1:5173/"),
            "invalid CORS origin `http://127.0.0.1:5173/`: an origin is scheme://host[:port] with no path: \
             remove the trailing '/'"
        );
        for with_path in ["https://app.example.com/app", "https://a.example?x=1", "https://a.example#top"] {
            assert!(reason(with_path).contains("no path, query or fragment"), "{with_path}");
        }
        assert!(reason("https://user@a.example").contains("user information"));
        assert!(reason("https://a.example:443").contains("default port"));
        assert!(reason("https://App.example.com").contains("lower case"));
        for bad in ["app.example.com", "ftp://a.example", "https://", "https://a.example:", "https://a.example:99999"] {
            assert!(reason(bad).contains("expected"), "{bad}");
        }
    }
}
