//! HTTP/JSON on the gRPC port: the unary `ssegate.v1.Publisher` methods as
//! `POST /ssegate.v1.Publisher/<Method>` with `Content-Type: application/json` (or
//! `application/proto`), following the Connect protocol's unary rules, so plain HTTP clients
//! (curl, Feign, RestTemplate) and Connect clients both work.
//!
//! A tower layer in front of the gRPC stack dispatches on the content type: `application/grpc*`
//! passes through untouched; anything else on the publisher's paths is answered here. Such a
//! call is **transcoded**, never served by a second implementation: the body is parsed with the
//! proto3 JSON mapping generated from the proto (pbjson), re-encoded as a gRPC request with the
//! caller's headers (so `authorization` reaches the same API-key interceptor) and sent through
//! the same stack a gRPC call takes (telemetry, interceptor, `PublisherService`); the gRPC
//! answer is turned back into JSON, and its status into a Connect error with its HTTP status.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use prost::Message;
use serde::{Serialize, de::DeserializeOwned};
use tokio::time::Instant;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

use super::pb;

/// The path prefix of the publisher's methods, on both protocols.
const PREFIX: &str = "/ssegate.v1.Publisher/";

/// Answers `application/json` and `application/proto` calls to the publisher's unary methods;
/// passes everything else to the inner (gRPC) service.
#[derive(Clone)]
pub struct ConnectLayer {
    max_message_bytes: usize,
}

impl ConnectLayer {
    /// `max_message_bytes` bounds a request body, as `--grpc-max-message-bytes` bounds a gRPC
    /// message.
    pub fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

impl<S> Layer<S> for ConnectLayer {
    type Service = Connect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Connect { inner, max_message_bytes: self.max_message_bytes }
    }
}

#[derive(Clone)]
pub struct Connect<S> {
    inner: S,
    max_message_bytes: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, ResBody> Service<Request<Body>> for Connect<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if !is_connect(&req) {
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(fut.await?.map(Either::Left)) });
        }
        // The clone that was made ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let max = self.max_message_bytes;
        Box::pin(async move { Ok(unary(inner, req, max).await.map(Either::Right)) })
    }
}

/// A publisher path without a gRPC content type. Content types are case-insensitive.
fn is_connect<B>(req: &Request<B>) -> bool {
    req.uri().path().starts_with(PREFIX)
        && !req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.get(..16).is_some_and(|p| p.eq_ignore_ascii_case("application/grpc")))
}

/// The body encodings of Connect unary calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codec {
    Json,
    Proto,
}

impl Codec {
    /// `application/json` (with an optional `charset=utf-8`) or `application/proto`.
    fn from_headers(headers: &HeaderMap) -> Result<Self, ConnectError> {
        let raw = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let Some(raw) = raw else { return Err(ConnectError::MediaType(String::new())) };
        let mut parts = raw.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default().to_ascii_lowercase();
        let params: Vec<String> =
            parts.filter(|p| !p.is_empty()).map(|p| p.to_ascii_lowercase().replace(' ', "")).collect();
        match essence.as_str() {
            "application/json" if params.iter().all(|p| p == "charset=utf-8" || p == "charset=\"utf-8\"") => {
                Ok(Codec::Json)
            }
            "application/proto" if params.is_empty() => Ok(Codec::Proto),
            _ => Err(ConnectError::MediaType(raw)),
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        })
    }
}

/// One unary method: its name and the transcoding of its request and response.
struct Procedure {
    name: &'static str,
    /// The request body (in the codec) as a protobuf message.
    request: fn(&[u8], Codec) -> Result<Vec<u8>, ConnectError>,
    /// The protobuf response message as a body in the codec.
    response: fn(&[u8], Codec) -> Result<Vec<u8>, ConnectError>,
}

const fn procedure<Req, Resp>(name: &'static str) -> Procedure
where
    Req: Message + Default + DeserializeOwned,
    Resp: Message + Default + Serialize,
{
    Procedure { name, request: decode_request::<Req>, response: encode_response::<Resp> }
}

/// Every unary method of the proto; `PublishStream` is the only other one.
const PROCEDURES: [Procedure; 7] = [
    procedure::<pb::PublishRequest, pb::PublishResponse>("Publish"),
    procedure::<pb::PublishGroupRequest, pb::PublishResponse>("PublishGroup"),
    procedure::<pb::PublishTopicRequest, pb::PublishResponse>("PublishTopic"),
    procedure::<pb::BroadcastRequest, pb::PublishResponse>("Broadcast"),
    procedure::<pb::DisconnectRequest, pb::DisconnectResponse>("Disconnect"),
    procedure::<pb::PresenceRequest, pb::PresenceResponse>("Presence"),
    procedure::<pb::StatsRequest, pb::StatsResponse>("Stats"),
];

const STREAMING: &str = "PublishStream";

/// Parses a request body, so a malformed one is refused here with `invalid_argument` (a gRPC
/// server would call a bad protobuf `internal`), and encodes it as protobuf. An empty JSON body
/// is the empty message, as an empty protobuf body is.
fn decode_request<M: Message + Default + DeserializeOwned>(body: &[u8], codec: Codec) -> Result<Vec<u8>, ConnectError> {
    let msg = match codec {
        Codec::Json if body.iter().all(u8::is_ascii_whitespace) => M::default(),
        Codec::Json => serde_json::from_slice::<M>(body).map_err(ConnectError::Json)?,
        Codec::Proto => M::decode(body).map_err(ConnectError::Proto)?,
    };
    Ok(msg.encode_to_vec())
}

fn encode_response<M: Message + Default + Serialize>(proto: &[u8], codec: Codec) -> Result<Vec<u8>, ConnectError> {
    match codec {
        Codec::Proto => Ok(proto.to_vec()),
        Codec::Json => {
            let msg = M::decode(proto).map_err(|e| ConnectError::Internal(format!("decoding the answer: {e}")))?;
            serde_json::to_vec(&msg).map_err(|e| ConnectError::Internal(format!("encoding the answer: {e}")))
        }
    }
}

/// Why a Connect call failed. The message is shown to the caller.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("HTTP/JSON calls use POST, not {0}")]
    NotPost(Method),
    #[error(
        "unsupported content type {0:?}: send `application/json` (or `application/proto`); gRPC clients \
         send `application/grpc`"
    )]
    MediaType(String),
    #[error("{STREAMING} is a streaming method: call it over gRPC (HTTP/JSON serves the unary methods)")]
    Streaming,
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
    fn code(&self) -> Code {
        match self {
            ConnectError::NotPost(_)
            | ConnectError::MediaType(_)
            | ConnectError::Streaming
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
pub fn code_name(code: Code) -> &'static str {
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
pub fn http_status(code: Code) -> StatusCode {
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

fn error_response(e: &ConnectError) -> Response<Full<Bytes>> {
    let message = e.to_string();
    let body = ErrorBody { code: code_name(e.code()), message: &message };
    // Serializing two strings cannot fail; the fallback keeps the answer well-formed regardless.
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"code":"internal"}"#.to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = e.http_status();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
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

/// Serves one Connect unary call through `inner`.
async fn unary<S, ResBody>(inner: S, req: Request<Body>, max: usize) -> Response<Full<Bytes>>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let name = req.uri().path().get(PREFIX.len()..).unwrap_or_default().to_owned();
    match call(inner, req, max).await {
        Ok((codec, body)) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(header::CONTENT_TYPE, codec.content_type());
            resp
        }
        Err(e) => {
            let code = code_name(e.code());
            match &e {
                ConnectError::Internal(_) => tracing::warn!(method = %name, code, error = %e, "HTTP/JSON call failed"),
                _ => tracing::debug!(method = %name, code, error = %e, "HTTP/JSON call refused"),
            }
            error_response(&e)
        }
    }
}

async fn call<S, ResBody>(inner: S, req: Request<Body>, max: usize) -> Result<(Codec, Vec<u8>), ConnectError>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    if parts.method != Method::POST {
        return Err(ConnectError::NotPost(parts.method));
    }
    let codec = Codec::from_headers(&parts.headers)?;
    let name = parts.uri.path().get(PREFIX.len()..).unwrap_or_default();
    let procedure = match PROCEDURES.iter().find(|p| p.name == name) {
        Some(p) => p,
        None if name == STREAMING => return Err(ConnectError::Streaming),
        None => return Err(ConnectError::UnknownMethod(name.to_owned())),
    };
    let text = |name: &str| parts.headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if let Some(v) = text("connect-protocol-version").filter(|v| v != "1") {
        return Err(ConnectError::ProtocolVersion(v));
    }
    if let Some(v) = text("content-encoding").filter(|v| !v.eq_ignore_ascii_case("identity")) {
        return Err(ConnectError::Compressed(v));
    }
    let deadline = match text("connect-timeout-ms") {
        None => None,
        Some(v) => Some(Instant::now() + timeout(&v).ok_or(ConnectError::BadTimeout(v))?),
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ConnectError::TooLarge(max));
    }
    let work = async {
        // A body trickled in byte by byte must not hold the call (and its connection) forever.
        let read = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, max).collect());
        let body = match read.await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(ConnectError::TooLarge(max)),
            Ok(Err(e)) => return Err(ConnectError::Body(e.to_string())),
            Err(_) => {
                let secs = BODY_READ_TIMEOUT.as_secs();
                return Err(ConnectError::Body(format!("the request body did not arrive within {secs} s")));
            }
        };
        let message = (procedure.request)(&body, codec)?;
        grpc_headers(&mut parts.headers);
        parts.version = http::Version::HTTP_2;
        let answer = unary_grpc(inner, Request::from_parts(parts, Body::new(Full::new(frame(&message))))).await?;
        (procedure.response)(&answer, codec)
    };
    let body = match deadline {
        None => work.await?,
        Some(at) => tokio::time::timeout_at(at, work).await.map_err(|_| ConnectError::Deadline)??,
    };
    Ok((codec, body))
}

/// Longest time a request body may take to arrive, whatever the caller's deadline.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// `Connect-Timeout-Ms`: a positive integer of at most 10 digits.
fn timeout(v: &str) -> Option<Duration> {
    let ok = !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| v.parse::<u64>().ok()).flatten().filter(|ms| *ms > 0).map(Duration::from_millis)
}

/// The caller's headers (metadata, among them `authorization` and `traceparent`) as those of a
/// gRPC call: Connect and hop-by-hop headers removed, gRPC's content type and `te` set.
fn grpc_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ACCEPT_ENCODING,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::TE,
        header::UPGRADE,
        header::HOST,
        header::EXPECT,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("connect-protocol-version");
    headers.remove("connect-timeout-ms");
    headers.remove("grpc-timeout");
    headers.remove("grpc-encoding");
    headers.remove("grpc-accept-encoding");
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
}

/// One gRPC length-prefixed message, uncompressed.
fn frame(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.put_u8(0);
    // A request body is bounded by `max` (a usize of the configuration), far below 4 GiB in
    // practice; a larger one would be refused by the service's own size limit.
    buf.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    buf.put_slice(message);
    buf.freeze()
}

/// Calls `inner` with a unary gRPC request and returns the response message's bytes, or the
/// call's status.
async fn unary_grpc<S, ResBody>(mut inner: S, req: Request<Body>) -> Result<Bytes, ConnectError>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let internal = |e: BoxError| ConnectError::Internal(e.to_string());
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await.map_err(|e| internal(e.into()))?;
    let resp = inner.call(req).await.map_err(|e| internal(e.into()))?;
    // A trailers-only answer (every error the interceptor or the service returns) carries the
    // status in its headers.
    if let Some(status) = Status::from_header_map(resp.headers()).filter(|s| s.code() != Code::Ok) {
        return Err(ConnectError::Status(status));
    }
    let collected = resp.into_body().collect().await.map_err(|e| internal(e.into()))?;
    let status = collected.trailers().and_then(Status::from_header_map);
    match status {
        Some(s) if s.code() == Code::Ok => {}
        Some(s) => return Err(ConnectError::Status(s)),
        None => return Err(ConnectError::Internal("the gRPC answer has no status".into())),
    }
    let data = collected.to_bytes();
    let (head, rest) =
        data.split_at_checked(5).ok_or_else(|| ConnectError::Internal("no message in the answer".into()))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if head[0] != 0 || rest.len() != len {
        return Err(ConnectError::Internal("the gRPC answer is not one uncompressed message".into()));
    }
    Ok(data.slice(5..))
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

    #[test]
    fn content_types_and_timeouts() {
        let codec = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            Codec::from_headers(&h).ok()
        };
        assert_eq!(codec("application/json"), Some(Codec::Json));
        assert_eq!(codec("Application/JSON; charset=UTF-8"), Some(Codec::Json));
        assert_eq!(codec("application/proto"), Some(Codec::Proto));
        assert_eq!(codec("application/json; charset=latin1"), None);
        assert_eq!(codec("text/plain"), None);
        assert_eq!(codec("application/connect+json"), None);
        assert_eq!(Codec::from_headers(&HeaderMap::new()).ok(), None);
        assert_eq!(timeout("1500"), Some(Duration::from_millis(1500)));
        assert_eq!(timeout("0"), None);
        assert_eq!(timeout("12345678901"), None);
        assert_eq!(timeout("-1"), None);
        assert_eq!(timeout("+5"), None);
    }

    #[test]
    fn json_requests_use_the_proto3_mapping() {
        let proto = decode_request::<pb::PublishRequest>(
            br#"{"userIds":["a"],"event":{"name":"n","data":"d"},"idempotency_key":"k"}"#,
            Codec::Json,
        )
        .unwrap();
        let req = pb::PublishRequest::decode(proto.as_slice()).unwrap();
        assert_eq!(
            (req.user_ids, req.event.unwrap().data, req.idempotency_key),
            (vec!["a".into()], "d".into(), "k".into())
        );
        let err = decode_request::<pb::PublishRequest>(br#"{"userIdz":[]}"#, Codec::Json).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("unknown field `userIdz`"), "{err}");
        assert!(decode_request::<pb::StatsRequest>(b"", Codec::Json).unwrap().is_empty());
        let resp = pb::PublishResponse { event_id: "1-2".into(), recipients: Some(3) }.encode_to_vec();
        let json = encode_response::<pb::PublishResponse>(&resp, Codec::Json).unwrap();
        assert_eq!(String::from_utf8(json).unwrap(), r#"{"eventId":"1-2","recipients":"3"}"#);
    }
}
