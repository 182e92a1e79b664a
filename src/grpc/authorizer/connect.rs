//! `Authorize` as a Connect unary call with JSON: `POST <base>/ssegate.v1.Authorizer/Authorize`,
//! `Content-Type: application/json`, the request and answer in the proto3 JSON mapping (pbjson).
//! HTTP/1.1 (what any web framework serves), plaintext or TLS, over a small pool of kept-alive
//! connections (at most one per call in flight, which `--authorizer-max-in-flight` bounds).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, ClientConfig, RootCertStore, pki_types::CertificateDer, pki_types::ServerName, pki_types::pem::PemObject,
    },
};

use super::AUTHORIZE_PATH;
use crate::{auth::authorizer::CallError, grpc::pb};

/// Largest answer read, in bytes: an allow is a user id, some groups and topics.
const MAX_ANSWER: usize = 256 * 1024;

pub struct Client {
    /// `host:port`, resolved at each new connection (a backend's address may change).
    authority: String,
    /// The `Host` header.
    host_header: String,
    /// The base path joined with the method's.
    path: String,
    /// TLS with the server name to check, for https.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Connections not in use; at most `max_idle` kept.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    max_idle: usize,
}

impl Client {
    pub fn new(uri: &http::Uri, ca_pem: Option<&[u8]>, max_idle: usize) -> Result<Self, String> {
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or("no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = format!("{}:{port}", host.trim_start_matches('[').trim_end_matches(']'));
        let tls = if https {
            let mut roots = RootCertStore::empty();
            // The system's roots; unreadable ones are skipped (the CA file may be all we need).
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if let Some(pem) = ca_pem {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(cert.map_err(|e| format!("the CA file: {e}"))?)
                        .map_err(|e| format!("the CA file: {e}"))?;
                }
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
                .map_err(|e| e.to_string())?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let base = uri.path().trim_end_matches('/');
        Ok(Self {
            authority,
            host_header: uri.authority().map_or(host, |a| a.as_str().to_owned()),
            path: format!("{base}{AUTHORIZE_PATH}"),
            tls,
            idle: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
        })
    }

    /// A new HTTP/1.1 connection; its driver runs in a task that ends with the connection
    /// (when its `SendRequest` is dropped or the server closes it). Not on the application's
    /// tracker: an idle pooled connection would hold the drain for its whole grace.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let unreachable = |e: &dyn std::fmt::Display| CallError::Unreachable(format!("{}: {e}", self.authority));
        // Resolved without blocking (tokio's resolver runs off the workers).
        let tcp = TcpStream::connect(&self.authority).await.map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        macro_rules! handshake {
            ($io:expr) => {{
                let (send, conn) = http1::handshake(TokioIo::new($io)).await.map_err(|e| unreachable(&e))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                send
            }};
        }
        Ok(match &self.tls {
            None => handshake!(tcp),
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.map_err(|e| unreachable(&e))?;
                handshake!(tls)
            }
        })
    }

    /// A pooled connection that is still open (true), else a new one (false).
    async fn take(&self) -> Result<(SendRequest<Full<Bytes>>, bool), CallError> {
        loop {
            let pooled = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            match pooled {
                Some(mut send) if !send.is_closed() => {
                    if send.ready().await.is_ok() {
                        return Ok((send, true));
                    }
                }
                Some(_) => {}
                None => return Ok((self.connect().await?, false)),
            }
        }
    }

    fn unreachable(&self, e: &dyn std::fmt::Display) -> CallError {
        CallError::Unreachable(format!("{}: {e}", self.authority))
    }

    fn give_back(&self, send: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.max_idle && !send.is_closed() {
            idle.push(send);
        }
    }

    /// One call: the request as JSON, the `200` answer parsed as JSON; any other status is a
    /// failure (a Connect error body is logged, cut short).
    pub async fn call(&self, req: &pb::AuthorizeRequest) -> Result<pb::AuthorizeResponse, CallError> {
        let body =
            Bytes::from(serde_json::to_vec(req).map_err(|e| CallError::Failed(format!("encoding the request: {e}")))?);
        let request = || {
            Request::post(&self.path)
                .header(header::HOST, &self.host_header)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json")
                .header("connect-protocol-version", "1")
                .body(Full::new(body.clone()))
                .map_err(|e| CallError::Failed(format!("building the request: {e}")))
        };
        let (mut send, pooled) = self.take().await?;
        let resp = match send.send_request(request()?).await {
            Ok(resp) => resp,
            // A kept-alive connection the server closed as the request went out: the call is
            // idempotent, so it is sent once more on a new connection.
            Err(_) if pooled => {
                send = self.connect().await?;
                send.send_request(request()?).await.map_err(|e| self.unreachable(&e))?
            }
            Err(e) => return Err(self.unreachable(&e)),
        };
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| CallError::Failed(format!("reading the answer: {e}")))?
            .to_bytes();
        self.give_back(send);
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).replace(['\r', '\n'], " ");
            return Err(CallError::Failed(format!("HTTP {status}: {text}")));
        }
        parse_answer(&bytes)
    }
}

/// The answer in proto3 JSON. `null` means the field's default (the JSON mapping says so), so
/// nulls are dropped first: a Java object with both `allow` and `deny` fields, one of them
/// null, is what Jackson writes by default, and the generated parser would otherwise see both
/// members of the oneof. Unknown fields are refused (an answer ssegate may be misreading).
fn parse_answer(bytes: &[u8]) -> Result<pb::AuthorizeResponse, CallError> {
    fn strip_nulls(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.retain(|_, v| !v.is_null());
                map.values_mut().for_each(strip_nulls);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
            _ => {}
        }
    }
    let invalid = |e: serde_json::Error| CallError::Invalid(format!("not an AuthorizeResponse in JSON: {e}"));
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(invalid)?;
    strip_nulls(&mut value);
    serde_json::from_value(value).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::pb::authorize_response::Decision;

    #[test]
    fn answers_parse_as_a_java_or_python_backend_writes_them() {
        let allow = |json: &str| match parse_answer(json.as_bytes()).map(|r| r.decision) {
            Ok(Some(Decision::Allow(a))) => a,
            other => panic!("{json}: {other:?}"),
        };
        let a = allow(r#"{"allow":{"userId":"alice","groups":["g"],"expiresAt":1767225600},"deny":null}"#);
        assert_eq!((a.user_id.as_str(), a.expires_at, a.groups.len()), ("alice", 1_767_225_600, 1));
        assert_eq!(allow(r#"{"allow":{"user_id":"bob","expiresAt":"7","topics":null}}"#).expires_at, 7);
        let deny = parse_answer(br#"{"deny":{"status":401,"reason":"no"}}"#).unwrap();
        assert!(matches!(deny.decision, Some(Decision::Deny(d)) if d.status == 401));
        for bad in [&br#"{"allow":{"userId":"a"},"extra":1}"#[..], b"<html>", br#"{"allow":{"userId":1}}"#] {
            assert!(matches!(parse_answer(bad), Err(CallError::Invalid(_))), "{}", String::from_utf8_lossy(bad));
        }
    }
}
