//! One Connect unary call: the protocol's checks (method, content type, path, headers, the
//! deadline, the body's size), the body read and transcoded, and the round trip through the
//! gRPC stack as a one-message gRPC call.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tokio::time::Instant;
use tonic::{Code, Status, body::Body};
use tower::Service;

use super::{
    BoxError, PREFIX,
    error::{ConnectError, code_name, error_response},
    transcode::{Codec, PROCEDURES, STREAMING},
};

/// Serves one Connect unary call through `inner`.
pub(super) async fn unary<S, ResBody>(inner: S, req: Request<Body>, max: usize) -> Response<Full<Bytes>>
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
        None if STREAMING.contains(&name) => return Err(ConnectError::Streaming(name.to_owned())),
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
    fn timeouts() {
        assert_eq!(timeout("1500"), Some(Duration::from_millis(1500)));
        assert_eq!(timeout("0"), None);
        assert_eq!(timeout("12345678901"), None);
        assert_eq!(timeout("-1"), None);
        assert_eq!(timeout("+5"), None);
    }
}
