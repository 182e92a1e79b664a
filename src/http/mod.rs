//! The HTTP edge (the public port): `GET /v1/events` and the SSE body. The only module that
//! sees axum; errors map to responses in one place (`error.rs`).

pub mod admin;
mod assets;
mod body;
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

use crate::{auth::SubscriberAuth, event_stream, router::Router, telemetry::metrics::EdgeMetrics};

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
    router: Arc<Router>,
    auth: Arc<SubscriberAuth>,
    settings: Arc<HttpSettings>,
    /// `settings.retry` as the `retry:` field, encoded once.
    retry_field: Bytes,
    metrics: Arc<EdgeMetrics>,
}

/// The invalid CORS origin, if any.
#[derive(Debug, thiserror::Error)]
#[error("invalid CORS origin `{0}`: expected `*` or an origin such as https://app.example.com")]
pub struct InvalidOrigin(String);

/// The public port's application (routes, state, CORS), built once by `app`.
pub type App = axum::Router;

/// Builds the application: routes, state and CORS.
pub fn app(
    router: Arc<Router>,
    auth: SubscriberAuth,
    settings: &HttpSettings,
    metrics: Arc<EdgeMetrics>,
) -> Result<axum::Router, InvalidOrigin> {
    let state = AppState {
        router,
        auth: Arc::new(auth),
        metrics,
        retry_field: event_stream::retry(u64::try_from(settings.retry.as_millis()).unwrap_or(u64::MAX)),
        settings: Arc::new(settings.clone()),
    };
    let app = axum::Router::new()
        // HEAD would open (and at once drop) a subscription: refused, like every other method.
        .route("/v1/events", get(events::subscribe).head(|| async { HttpError::MethodNotAllowed }))
        .route("/v1/client.js", get(assets::client_js))
        .route("/", assets::demo(settings.demo_page))
        .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed })
        .fallback(|| async { HttpError::NotFound })
        .with_state(state);
    Ok(match cors(&settings.cors_allowed_origins)? {
        Some(layer) => app.layer(layer),
        None => app,
    })
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
    let values = origins
        .iter()
        .map(|o| match HeaderValue::from_str(o) {
            Ok(v) if o.starts_with("http://") || o.starts_with("https://") => Ok(v),
            _ => Err(InvalidOrigin(o.clone())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(layer.allow_origin(AllowOrigin::list(values)).allow_credentials(true)))
}
