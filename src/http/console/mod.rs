//! The admin console: `/console/` on the admin port. A platform engineer answers "is user X
//! connected, on which replica, and did they get event Y?" from a browser: an overview with
//! live charts, an inspector (a user's, group's or topic's streams, retained values, recent
//! events, whether an event reached it; actions: publish a test event, clear a retained value,
//! disconnect a user) and a live tail of a subject's events.
//!
//! - **Off unless configured**: without `--console-token-file` every `/console` path answers
//!   404 with a one-line reason. The static page (HTML, JS, CSS: no data) is served without a
//!   token; every API call needs `Authorization: Bearer <token>` (`guard`, compared in constant
//!   time by `ApiKeys`). The page keeps the token in `sessionStorage`, never in a cookie: a
//!   browser never attaches it by itself, so another site cannot make a request carry it
//!   (CSRF-safe by construction). POSTs must still be `application/json` and, if the browser
//!   sends an `Origin`, come from the console's own origin.
//! - **Reuses what the gRPC API does**: publishes go through `Backplane::publish`, Disconnect
//!   and the cluster figures through `Backplane::gather` (the same scatter/gather as the
//!   `Disconnect` and `Stats` calls), recent events through `Router::history`.
//! - **Every replica**: a subject's streams come from the cluster's `Streams` scatter/gather
//!   (each replica lists its own, labelled with its id; this one's as `this`); a replica that
//!   does not answer in time makes the answer `partial`, which the page says.
//! - **Bounded**: at most `MAX_LIVE` overview streams and `MAX_TAILS` tails at once, each
//!   ending at shutdown and after a maximum time.
//! - **Audited**: each action is one `ssegate::audit` log line (action, subject, peer, outcome).

mod actions;
mod error;
mod inspect;
mod overview;
mod tail;

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
    routing::{any, get, post},
};
use http::{HeaderMap, HeaderValue, Method, header};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use error::ConsoleError;

use crate::{
    auth::ApiKeys,
    backplane::Backplane,
    router::{Partitions, Router, Subject},
    telemetry::metrics::EdgeMetrics,
};

/// Overview streams (`/console/api/live`) open at once, at most.
pub const MAX_LIVE: usize = 16;
/// Live tails open at once, at most.
pub const MAX_TAILS: usize = 8;

/// The console's state, shared by its handlers.
#[derive(Clone)]
pub struct Console(Arc<Inner>);

struct Inner {
    routers: Arc<Partitions>,
    backplane: Arc<Backplane>,
    edge: Arc<EdgeMetrics>,
    tokens: Arc<ApiKeys>,
    /// Largest event (name + data) a test publish may carry (`--max-event-bytes`).
    max_event_bytes: usize,
    live: Arc<Semaphore>,
    tails: Arc<Semaphore>,
    /// Cancelled when the server drains: every console stream ends (the admin port outlives
    /// the drain, and an open stream would hold its graceful stop).
    stop: CancellationToken,
}

impl Inner {
    /// The router holding `subject`'s streams and events here: a user's partition's; a group's
    /// or topic's events are in every partition (with their own ids), the first is read.
    fn router_of(&self, subject: &Subject) -> &Arc<Router> {
        match subject {
            Subject::User(user) => self.routers.of_user(user),
            _ => self.routers.first(),
        }
    }
}

impl Console {
    pub fn new(
        routers: Arc<Partitions>,
        backplane: Arc<Backplane>,
        edge: Arc<EdgeMetrics>,
        tokens: Arc<ApiKeys>,
        max_event_bytes: usize,
        stop: CancellationToken,
    ) -> Self {
        Console(Arc::new(Inner {
            routers,
            backplane,
            edge,
            tokens,
            max_event_bytes,
            live: Arc::new(Semaphore::new(MAX_LIVE)),
            tails: Arc::new(Semaphore::new(MAX_TAILS)),
            stop,
        }))
    }
}

/// The console's routes on the admin port: the page and its API when `console` is set, else a
/// 404 with the reason on every `/console` path.
pub fn routes(console: Option<Console>) -> axum::Router {
    let Some(console) = console else {
        let off = any(|| async { ConsoleError::Off });
        return axum::Router::new()
            .route("/console", off.clone())
            .route("/console/", off.clone())
            .route("/console/{*rest}", off);
    };
    let api = axum::Router::new()
        .route("/console/api/overview", get(overview::snapshot))
        .route("/console/api/live", get(overview::live))
        .route("/console/api/lookup", get(inspect::lookup))
        .route("/console/api/tail", get(tail::tail))
        .route("/console/api/publish", post(actions::publish))
        .route("/console/api/clear-retained", post(actions::clear_retained))
        .route("/console/api/disconnect", post(actions::disconnect))
        .route_layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console);
    axum::Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/console/console.js", get(|| async { page(CONSOLE_JS, "text/javascript; charset=utf-8") }))
        .route("/console/console.css", get(|| async { page(CONSOLE_CSS, "text/css; charset=utf-8") }))
        .merge(api)
}

// The page is three small hand-written files, embedded: nothing from a CDN, no build step, no
// framework. A few forms, tables and four sparklines do not need one, and a framework would
// multiply the page's weight and bring a toolchain the binary's build does not have.
const INDEX_HTML: &str = include_str!("page/index.html");
const CONSOLE_JS: &str = include_str!("page/console.js");
const CONSOLE_CSS: &str = include_str!("page/console.css");

/// The page's own files may only talk to this origin; nothing may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

/// Every API call: a valid token; a POST also `application/json` from this origin.
async fn guard(State(console): State<Console>, req: Request, next: Next) -> Response {
    let checked = authorize(&console, req.headers())
        .and_then(|()| if req.method() == Method::POST { same_origin_json(req.headers()) } else { Ok(()) });
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => {
            if req.method() == Method::POST {
                let peer = actions::peer_of(req.extensions());
                // The action's name as its successful line says it (`clear_retained`).
                let action = req.uri().path().trim_start_matches("/console/api/").replace('-', "_");
                tracing::warn!(
                    target: "ssegate::audit", action, subject = "-", %peer,
                    outcome = e.outcome(), reason = %e, "console action refused"
                );
            }
            e.into_response()
        }
    }
}

fn authorize(console: &Console, headers: &HeaderMap) -> Result<(), ConsoleError> {
    let value = headers.get(header::AUTHORIZATION).ok_or(ConsoleError::MissingToken)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or(ConsoleError::MissingToken)?;
    if console.0.tokens.accepts(token) { Ok(()) } else { Err(ConsoleError::BadToken) }
}

/// A POST carries JSON, and a browser's `Origin`, if sent, is this host's (the token already
/// makes forgery impossible; this refuses a page elsewhere that was somehow given it).
fn same_origin_json(headers: &HeaderMap) -> Result<(), ConsoleError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ConsoleError::NotJson);
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin = origin.to_str().unwrap_or("");
    let ours = ["http://", "https://"].iter().any(|scheme| origin.strip_prefix(scheme) == Some(host));
    if ours && !host.is_empty() { Ok(()) } else { Err(ConsoleError::CrossOrigin) }
}

/// A JSON answer (`application/json`, not cached).
fn json(value: &serde_json::Value) -> Response {
    let mut resp = value.to_string().into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_post_must_be_json_from_this_origin() {
        let ok = headers(&[("content-type", "application/json"), ("host", "127.0.0.1:9090")]);
        assert!(same_origin_json(&ok).is_ok(), "no Origin (curl): the token decides");
        let ok = headers(&[
            ("content-type", "application/json; charset=utf-8"),
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
        ]);
        assert!(same_origin_json(&ok).is_ok());
        let form = headers(&[("content-type", "text/plain"), ("host", "h")]);
        assert!(matches!(same_origin_json(&form), Err(ConsoleError::NotJson)));
        let other = headers(&[
            ("content-type", "application/json"),
            ("host", "127.0.0.1:9090"),
            ("origin", "http://evil.example"),
        ]);
        assert!(matches!(same_origin_json(&other), Err(ConsoleError::CrossOrigin)));
        let null = headers(&[("content-type", "application/json"), ("host", "h"), ("origin", "null")]);
        assert!(matches!(same_origin_json(&null), Err(ConsoleError::CrossOrigin)));
    }
}
