//! Errors of the HTTP edge and their one mapping to a response: a status and a one-line
//! plain-text reason, never internal detail.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::{auth::AuthError, domain::InvalidText, router::RouterError, telemetry::metrics::Rejection};

/// `X-Content-Type-Options: nosniff`, on every error answer of the HTTP and admin ports.
fn nosniff() -> HeaderValue {
    HeaderValue::from_static("nosniff")
}

/// Adds `X-Content-Type-Options: nosniff` to an error answer made elsewhere than `HttpError`
/// (axum's own 404 and 405, the admin port's 503): a middleware for an axum router.
pub(super) async fn nosniff_on_errors(mut resp: Response) -> Response {
    if resp.status().is_client_error() || resp.status().is_server_error() {
        resp.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, nosniff());
    }
    resp
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("query parameter `{param}` {reason}")]
    InvalidParam { param: &'static str, reason: InvalidText },
    #[error("query parameter `{0}` may appear only once")]
    Repeated(&'static str),
    #[error("unknown query parameter `{0}` (expected user, group, topic, last_event_id, token)")]
    UnknownParam(String),
    #[error("query parameter `{0}` is not valid UTF-8 once percent-decoded")]
    NotUtf8(String),
    #[error("the request has no Host header (HTTP/1.1 requires one)")]
    MissingHost,
    #[error("{count} groups and topics requested, over the limit of {max} (--max-subscriptions)")]
    TooManySubscriptions { count: usize, max: usize },
    #[error("no such resource; subscribe with GET /v1/events")]
    NotFound,
    #[error("method not allowed; use GET")]
    MethodNotAllowed,
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error(transparent)]
    Auth(AuthError),
}

impl HttpError {
    pub(super) fn status(&self) -> StatusCode {
        // The backend's deny chose its status (checked to be 400-499).
        if let HttpError::Auth(AuthError::Denied { status, .. }) = self {
            return StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN);
        }
        match self.rejection() {
            None if matches!(self, HttpError::MethodNotAllowed) => StatusCode::METHOD_NOT_ALLOWED,
            None => StatusCode::NOT_FOUND,
            Some(Rejection::BadRequest) => StatusCode::BAD_REQUEST,
            Some(Rejection::Unauthenticated) => StatusCode::UNAUTHORIZED,
            Some(Rejection::Forbidden) => StatusCode::FORBIDDEN,
            Some(Rejection::MaxConnectionsPerUser | Rejection::MaxConnectionsPerIp) => StatusCode::TOO_MANY_REQUESTS,
            Some(
                Rejection::ShuttingDown
                | Rejection::MaxConnections
                | Rejection::Disabled
                | Rejection::DescriptorBudget
                | Rejection::PendingConnections
                | Rejection::AuthorizerUnavailable
                | Rejection::BrokerUnavailable,
            ) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// How a refused subscription is counted (`ssegate_connections_rejected_total{reason}`);
    /// `None` for answers that refuse no subscription (404, 405).
    pub(super) fn rejection(&self) -> Option<Rejection> {
        Some(match self {
            HttpError::NotFound | HttpError::MethodNotAllowed => return None,
            HttpError::InvalidParam { .. }
            | HttpError::Repeated(_)
            | HttpError::UnknownParam(_)
            | HttpError::NotUtf8(_)
            | HttpError::MissingHost
            | HttpError::TooManySubscriptions { .. }
            | HttpError::Auth(AuthError::MissingUser) => Rejection::BadRequest,
            HttpError::Router(RouterError::ShuttingDown) => Rejection::ShuttingDown,
            HttpError::Router(RouterError::TooManyConnections { .. }) => Rejection::MaxConnections,
            HttpError::Router(RouterError::TooManyForUser { .. }) => Rejection::MaxConnectionsPerUser,
            HttpError::Router(RouterError::BrokerUnavailable(_)) => Rejection::BrokerUnavailable,
            HttpError::Auth(
                AuthError::MissingToken { .. }
                | AuthError::MalformedAuthorization
                | AuthError::AmbiguousCookie { .. }
                | AuthError::Token(_)
                | AuthError::BadClaim { .. },
            ) => Rejection::Unauthenticated,
            HttpError::Auth(
                AuthError::WrongUser { .. }
                | AuthError::GroupNotAllowed { .. }
                | AuthError::TopicNotAllowed { .. }
                | AuthError::NotGranted { .. },
            ) => Rejection::Forbidden,
            // A deny is counted as what its status says (a 4xx other than 401 as forbidden).
            HttpError::Auth(AuthError::Denied { status: 401, .. }) => Rejection::Unauthenticated,
            HttpError::Auth(AuthError::Denied { .. }) => Rejection::Forbidden,
            HttpError::Auth(AuthError::AuthorizerUnavailable(_)) => Rejection::AuthorizerUnavailable,
            HttpError::Auth(AuthError::Disabled) => Rejection::Disabled,
        })
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, format!("{self}\n")).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // The reason may quote the request (a query parameter, a group name): never let a
        // browser sniff it into HTML.
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, nosniff());
        if status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS)
            && !matches!(self, HttpError::Auth(AuthError::Disabled))
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}
