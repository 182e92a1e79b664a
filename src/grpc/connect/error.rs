//! Why a Connect call failed, and how that is told: the error's code, Connect's name for each
//! code, the HTTP status of each code (Connect's table), and the `{"code","message"}` body.

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;
use tonic::{Code, Status};

/// Why a Connect call failed. The message is shown to the caller.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("HTTP/JSON calls use POST, not {0}")]
    NotPost(Method),
    #[error(
        "unsupported content type {0:?}: send `application/json` (or `application/proto`); gRPC clients \
         send `application/grpc`"
    )]
    MediaType(String),
    #[error("{0} is a streaming method: call it over gRPC (HTTP/JSON serves the unary methods)")]
    Streaming(String),
    #[error("no method {0:?} in ssegate.v1.Publisher")]
    UnknownMethod(String),
    #[error("connect-protocol-version {0:?} is not supported: send 1, or leave the header out")]
    ProtocolVersion(String),
    #[error("content-encoding {0:?} is not supported: send the body uncompressed")]
    Compressed(String),
    #[error("connect-timeout-ms {0:?} is not a positive integer of at most 10 digits")]
    BadTimeout(String),
    #[error("the request body is over the limit of {0} bytes (--grpc-max-message-bytes)")]
    TooLarge(usize),
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error("the request body is not valid proto3 JSON for this method: {0}")]
    Json(#[source] serde_json::Error),
    #[error("the request body is not a valid protobuf message for this method: {0}")]
    Proto(#[source] prost::DecodeError),
    #[error("the deadline (connect-timeout-ms) expired")]
    Deadline,
    /// What the service answered.
    #[error("{}", .0.message())]
    Status(Status),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ConnectError {
    pub(super) fn code(&self) -> Code {
        match self {
            ConnectError::NotPost(_)
            | ConnectError::MediaType(_)
            | ConnectError::Streaming(_)
            | ConnectError::UnknownMethod(_)
            | ConnectError::Compressed(_) => Code::Unimplemented,
            ConnectError::ProtocolVersion(_)
            | ConnectError::BadTimeout(_)
            | ConnectError::Json(_)
            | ConnectError::Proto(_) => Code::InvalidArgument,
            ConnectError::TooLarge(_) => Code::ResourceExhausted,
            ConnectError::Body(_) => Code::Cancelled,
            ConnectError::Deadline => Code::DeadlineExceeded,
            ConnectError::Status(s) => s.code(),
            ConnectError::Internal(_) => Code::Internal,
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            ConnectError::NotPost(_) => StatusCode::METHOD_NOT_ALLOWED,
            ConnectError::MediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => http_status(self.code()),
        }
    }
}

/// The Connect name of a code (lower snake case; `canceled` with one l).
pub(super) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of an error code, from the Connect protocol's table.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::REQUEST_TIMEOUT),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// The Connect error body.
#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    message: &'a str,
}

/// The answer to a failed call: the error body, its HTTP status, and the header that tells
/// what would have been accepted (`allow`, `accept-post`, `accept-encoding`) where there is one.
pub(super) fn error_response(e: &ConnectError) -> Response<Full<Bytes>> {
    let message = e.to_string();
    let body = ErrorBody { code: code_name(e.code()), message: &message };
    // Serializing two strings cannot fail; the fallback keeps the answer well-formed regardless.
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"code":"internal"}"#.to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = e.http_status();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    match e {
        ConnectError::NotPost(_) => {
            headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        ConnectError::MediaType(_) => {
            headers.insert("accept-post", HeaderValue::from_static("application/json, application/proto"));
        }
        ConnectError::Compressed(_) => {
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        _ => {}
    }
    resp
}

/// The answer to a request on the gRPC port that is neither gRPC nor Connect.
pub(super) const NOT_FOUND: &str = "not found: publish with gRPC (service ssegate.v1.Publisher) \
     or POST /ssegate.v1.Publisher/<Method> with Content-Type: application/json \
     (Connect/JSON, see docs/http-json.md); browsers subscribe on the HTTP port at GET /v1/events\n";

/// A plain `404` with `NOT_FOUND`: such a caller is not speaking Connect, so a Connect error
/// body would mean nothing to it; the line says where to go instead.
pub(super) fn not_found() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(NOT_FOUND.as_bytes())));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_connect_table() {
        let table = [
            (Code::Cancelled, "canceled", 499),
            (Code::Unknown, "unknown", 500),
            (Code::InvalidArgument, "invalid_argument", 400),
            (Code::DeadlineExceeded, "deadline_exceeded", 504),
            (Code::NotFound, "not_found", 404),
            (Code::AlreadyExists, "already_exists", 409),
            (Code::PermissionDenied, "permission_denied", 403),
            (Code::ResourceExhausted, "resource_exhausted", 429),
            (Code::FailedPrecondition, "failed_precondition", 400),
            (Code::Aborted, "aborted", 409),
            (Code::OutOfRange, "out_of_range", 400),
            (Code::Unimplemented, "unimplemented", 501),
            (Code::Internal, "internal", 500),
            (Code::Unavailable, "unavailable", 503),
            (Code::DataLoss, "data_loss", 500),
            (Code::Unauthenticated, "unauthenticated", 401),
        ];
        for (code, name, status) in table {
            assert_eq!((code_name(code), http_status(code).as_u16()), (name, status), "{code:?}");
        }
    }
}
