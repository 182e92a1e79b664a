//! The console's errors and their one mapping to a response: a status and a JSON body
//! `{"error": "<one line>"}` (the page shows the line), never a token, a key or internal detail.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::backplane::BackplaneError;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the console is off: start ssegate with --console-token-file (SSEGATE_CONSOLE_TOKEN_FILE) to turn it on")]
    Off,
    #[error("a console token is required: send `Authorization: Bearer <token>`")]
    MissingToken,
    #[error("the console token is not valid")]
    BadToken,
    #[error("cross-origin request refused: the console's actions are only taken from its own page")]
    CrossOrigin,
    #[error("send the request body as `Content-Type: application/json`")]
    NotJson,
    #[error("{0}")]
    BadRequest(String),
    #[error("too many console streams are open ({0} at most); close one and retry")]
    Busy(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Publish(#[from] BackplaneError),
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            ConsoleError::Off => StatusCode::NOT_FOUND,
            ConsoleError::MissingToken | ConsoleError::BadToken => StatusCode::UNAUTHORIZED,
            ConsoleError::CrossOrigin => StatusCode::FORBIDDEN,
            ConsoleError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ConsoleError::Publish(_) | ConsoleError::ShuttingDown | ConsoleError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The outcome word of an audit line.
    pub fn outcome(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            s if s.is_client_error() => "refused",
            _ => "failed",
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = if matches!(self, ConsoleError::Off) {
            // One line of text: what a person with curl (or a browser) needs to know.
            (status, format!("{self}\n")).into_response()
        } else {
            let body = serde_json::json!({ "error": self.to_string() }).to_string();
            let mut resp = (status, body).into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        };
        let h = resp.headers_mut();
        if matches!(self, ConsoleError::Off) {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
