//! The client side of `ssegate.v1.Authorizer` (the backend implements it; ssegate calls it,
//! `--authorizer-addr`): over gRPC (tonic, h2c or TLS) or Connect/JSON (`connect.rs`: a plain
//! HTTP/1.1 POST, what a Spring `@PostMapping` answers). Prost types stop here: the request is
//! made from `auth::authorizer::AuthorizeQuery`, and the answer is checked and turned into a
//! `Verdict` (or `CallError::Invalid`, naming what is wrong) in one place, `verdict`.

mod connect;

use std::{path::Path, time::Duration};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::{
    auth::authorizer::{AuthorizeQuery, AuthorizerProtocol, AuthorizerSettings, CallError, Denial, Grant, Verdict},
    domain::{GroupId, UserId},
    grpc::pb::{self, authorize_response::Decision, authorizer_client::AuthorizerClient},
};

/// The method's path, on both protocols.
pub const AUTHORIZE_PATH: &str = "/ssegate.v1.Authorizer/Authorize";

/// Longest reason kept from a deny answer, in bytes.
const MAX_REASON: usize = 200;

/// An `--authorizer-*` setting that cannot be used; reported at start.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizerConfigError {
    #[error("--authorizer-addr {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("--authorizer-tls-ca-file {path}: {reason}")]
    Ca { path: String, reason: String },
}

/// How the backend is called.
pub enum Transport {
    Grpc(AuthorizerClient<Channel>),
    Connect(connect::Client),
}

impl Transport {
    /// The client for the settings; nothing is connected yet (the first call connects).
    pub fn new(settings: &AuthorizerSettings) -> Result<Self, AuthorizerConfigError> {
        let url = settings.url.trim().trim_end_matches('/');
        let bad = |reason: &str| AuthorizerConfigError::Url { url: url.to_owned(), reason: reason.to_owned() };
        let uri: http::Uri =
            url.parse().map_err(|_| bad("not a URL; expected http://host:port or https://host:port"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("expected http://host:port (plaintext, h2c for gRPC) or https://host:port (TLS)")),
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let ca = match &settings.tls_ca_file {
            Some(path) if tls => Some(read_ca(path)?),
            Some(_) => return Err(bad("--authorizer-tls-ca-file is for TLS: use https://")),
            None => None,
        };
        match settings.protocol {
            AuthorizerProtocol::Grpc => {
                if uri.path() != "/" && !uri.path().is_empty() {
                    return Err(bad("a gRPC address has no path"));
                }
                let mut endpoint = Endpoint::from_shared(url.to_owned())
                    .map_err(|e| bad(&e.to_string()))?
                    .connect_timeout(settings.timeout)
                    // A dead connection is noticed between calls, not by a call timing out.
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(settings.timeout);
                if tls {
                    let mut config = ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &ca {
                        config = config.ca_certificate(Certificate::from_pem(pem));
                    }
                    endpoint = endpoint.tls_config(config).map_err(|e| bad(&e.to_string()))?;
                }
                Ok(Transport::Grpc(AuthorizerClient::new(endpoint.connect_lazy())))
            }
            AuthorizerProtocol::Connect => connect::Client::new(&uri, ca.as_deref(), settings.max_in_flight)
                .map(Transport::Connect)
                .map_err(|e| bad(&e)),
        }
    }

    /// One call; the caller bounds its time.
    pub async fn call(&self, query: &AuthorizeQuery) -> Result<Verdict, CallError> {
        let req = request(query);
        let resp = match self {
            Transport::Grpc(client) => client.clone().authorize(req).await.map_err(status_error)?.into_inner(),
            Transport::Connect(client) => client.call(&req).await?,
        };
        verdict(resp)
    }
}

fn read_ca(path: &Path) -> Result<Vec<u8>, AuthorizerConfigError> {
    std::fs::read(path)
        .map_err(|e| AuthorizerConfigError::Ca { path: path.display().to_string(), reason: e.to_string() })
}

/// A gRPC failure: unreachable (the transport failed: the status has a source), timed out,
/// or the backend's own error status (its `UNAVAILABLE` included: it was reached).
fn status_error(s: tonic::Status) -> CallError {
    use std::error::Error;
    let mut detail = format!("{:?}: {}", s.code(), s.message().replace(['\r', '\n'], " "));
    let mut source = s.source();
    while let Some(e) = source {
        detail.push_str(&format!(": {e}"));
        source = e.source();
    }
    match s.code() {
        tonic::Code::DeadlineExceeded => CallError::Timeout,
        _ if s.source().is_some() => CallError::Unreachable(detail),
        _ => CallError::Failed(detail),
    }
}

fn request(q: &AuthorizeQuery) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        cookies: q
            .cookies
            .iter()
            .map(|(name, value)| pb::Cookie { name: name.clone(), value: value.clone() })
            .collect(),
        headers: q
            .headers
            .iter()
            .map(|(name, values)| pb::Header { name: name.clone(), values: values.clone() })
            .collect(),
        user: q.user.as_ref().map(|u| u.as_str().to_owned()).unwrap_or_default(),
        groups: q.groups.iter().map(|g| g.as_str().to_owned()).collect(),
        topics: q.topics.iter().map(|t| t.as_str().to_owned()).collect(),
        peer: q.peer.clone(),
    }
}

/// The answer, checked: an allow with a valid user id and groups (topics are patterns, any
/// text), or a deny with a status in 400-499 (0: 403); anything else is invalid, naming why.
fn verdict(resp: pb::AuthorizeResponse) -> Result<Verdict, CallError> {
    match resp.decision {
        None => Err(CallError::Invalid("neither allow nor deny".into())),
        Some(Decision::Allow(a)) => {
            let user = UserId::parse(&a.user_id).map_err(|e| CallError::Invalid(format!("allow.user_id {e}")))?;
            let groups = a
                .groups
                .iter()
                .map(|g| GroupId::parse(g).map_err(|e| CallError::Invalid(format!("allow.groups: a group {e}"))))
                .collect::<Result<_, _>>()?;
            let expires_at = match a.expires_at {
                0 => None,
                at => Some(u64::try_from(at).map_err(|_| CallError::Invalid(format!("allow.expires_at {at} < 0")))?),
            };
            Ok(Verdict::Allow(Grant { user, groups, topics: a.topics, expires_at }))
        }
        Some(Decision::Deny(d)) => {
            let status = match d.status {
                0 => 403,
                s @ 400..=499 => s as u16,
                s => return Err(CallError::Invalid(format!("deny.status {s} is not 400-499"))),
            };
            Ok(Verdict::Deny(Denial { status, reason: one_line(&d.reason) }))
        }
    }
}

/// A reason safe to show as one line: control characters become spaces, at most
/// `MAX_REASON` bytes (cut at a character boundary); empty gets a generic text.
fn one_line(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.trim().chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if out.len() + c.len_utf8() > MAX_REASON {
            break;
        }
        out.push(c);
    }
    if out.trim().is_empty() { "access denied by the application".to_owned() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(user: &str, at: i64) -> pb::AuthorizeResponse {
        pb::AuthorizeResponse {
            decision: Some(Decision::Allow(pb::Allow { user_id: user.into(), expires_at: at, ..Default::default() })),
        }
    }

    fn deny(status: u32, reason: &str) -> pb::AuthorizeResponse {
        pb::AuthorizeResponse { decision: Some(Decision::Deny(pb::Deny { status, reason: reason.into() })) }
    }

    #[test]
    fn answers_are_checked_and_bad_ones_are_invalid() {
        assert!(matches!(verdict(allow("alice", 0)), Ok(Verdict::Allow(Grant { expires_at: None, .. }))));
        assert!(matches!(verdict(allow("alice", 7)), Ok(Verdict::Allow(Grant { expires_at: Some(7), .. }))));
        for bad in [allow("", 0), allow("a\nb", 0), allow("a", -1), deny(200, "x"), deny(503, "x"), Default::default()]
        {
            assert!(matches!(verdict(bad.clone()), Err(CallError::Invalid(_))), "{bad:?}");
        }
        assert_eq!(verdict(deny(0, "")), Ok(Verdict::Deny(Denial { status: 403, reason: one_line("") })));
        let long = format!("line\r\none {}", "é".repeat(300));
        let Ok(Verdict::Deny(d)) = verdict(deny(401, &long)) else { panic!() };
        assert_eq!(d.status, 401);
        assert!(d.reason.starts_with("line  one é") && d.reason.len() <= MAX_REASON, "{}", d.reason);
    }

    #[test]
    fn unusable_addresses_are_refused_at_start() {
        let settings = |url: &str| AuthorizerSettings {
            url: url.into(),
            protocol: AuthorizerProtocol::Grpc,
            headers: vec![],
            cookies: vec![],
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::ZERO,
            cache_size: 0,
            max_in_flight: 1,
            tls_ca_file: None,
        };
        for bad in ["localhost:9000", "grpc://h:1", "http://", "http://h:1/x"] {
            assert!(Transport::new(&settings(bad)).is_err(), "{bad}");
        }
    }
}
