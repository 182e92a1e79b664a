//! Who may subscribe to what (JWT, or the application's backend through `authorizer`, on the
//! HTTP port) and who may publish (API keys on the gRPC port). Identity is decided here, once,
//! from the request; the router only sees the result.

mod api_keys;
pub mod authorizer;
pub mod jwt;
pub mod pattern;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

pub use api_keys::{ApiKeyError, ApiKeys, PublishDenied, PublisherAuth};
use std::sync::Arc;

use authorizer::{Authorizer, CallError, Verdict};
use jwt::{ReloadingVerifier, TokenError};

use crate::domain::{GroupId, InvalidText, Topic, UserId};

/// How subscribers prove who they are.
pub enum SubscriberAuth {
    /// A JWT in `Authorization: Bearer`, the cookie, or `?token=`.
    Jwt { verifier: Arc<ReloadingVerifier>, cookie: String },
    /// The application's backend decides (`--authorizer-addr`). With JWT keys configured too, a
    /// request that carries a JWT (header, cookie or `?token=`) is decided by the JWT alone,
    /// as with `Jwt`; any other asks the backend.
    Authorizer { authorizer: Arc<Authorizer>, jwt: Option<(Arc<ReloadingVerifier>, String)> },
    /// `?user=` is believed as is (`--insecure-dev-identity`, development only).
    InsecureQuery,
    /// Nothing configured: every subscription is refused with a message saying what to set.
    Disabled,
}

/// What a subscription asked for, before authentication.
#[derive(Debug, Default)]
pub struct Requested {
    pub user: Option<UserId>,
    pub groups: Vec<GroupId>,
    pub topics: Vec<Topic>,
    pub token: Option<String>,
}

/// Who a connection is and what it may join.
#[derive(Debug)]
pub struct Identity {
    pub user: UserId,
    pub groups: Vec<GroupId>,
    pub topics: Vec<Topic>,
    /// When the credential expires; the stream is closed then.
    pub expires_in: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required: send `Authorization: Bearer <jwt>`, the `{cookie}` cookie, or `?token=`")]
    MissingToken { cookie: String },
    /// An `Authorization` header that is not `Bearer <jwt>` (a bare token, another scheme), and
    /// no token elsewhere: said so, rather than that no token was sent.
    #[error("the Authorization header is malformed: expected `Authorization: Bearer <jwt>`")]
    MalformedAuthorization,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "the `{cookie}` cookie was sent {count} times (set for more than one domain or path), so which token \
         is meant is ambiguous: clear the extra ones, or send `Authorization: Bearer <jwt>`"
    )]
    AmbiguousCookie { cookie: String, count: usize },
    #[error("the token's claim `{claim}` is invalid: {reason}")]
    BadClaim { claim: &'static str, reason: InvalidText },
    #[error("query parameter `user` is required")]
    MissingUser,
    /// `user` (in these three) is the token's, verified: for the log, never the answer.
    #[error("the token is for another user")]
    WrongUser { user: UserId },
    #[error("group `{group}` is not in the token's `groups` claim")]
    GroupNotAllowed { group: String, user: UserId },
    #[error("topic `{topic}` is not allowed by the token's `topics` claim")]
    TopicNotAllowed { topic: String, user: UserId },
    /// Asked for something the backend's allow answer does not grant (`what`: "`?user=bob`",
    /// "group `g`", "topic `t`"). `user` is the one the backend named: for the log.
    #[error("{what} is not allowed for this session")]
    NotGranted { what: String, user: UserId },
    /// The backend's deny answer: its status (400-499) and one-line reason.
    #[error("{reason}")]
    Denied { status: u16, reason: String },
    /// No valid answer from the backend: refused (fail closed), 503.
    #[error("authorization is unavailable: {0}")]
    AuthorizerUnavailable(CallError),
    #[error(
        "subscriptions are disabled: configure --jwt-secret-file, --jwt-public-key-file or --jwt-jwks-file, \
         or --authorizer-addr (or --insecure-dev-identity for development)"
    )]
    Disabled,
}

impl AuthError {
    /// The verified user a refusal is for, when the token was good (a 403).
    pub fn user(&self) -> Option<&UserId> {
        match self {
            AuthError::WrongUser { user }
            | AuthError::GroupNotAllowed { user, .. }
            | AuthError::TopicNotAllowed { user, .. }
            | AuthError::NotGranted { user, .. } => Some(user),
            _ => None,
        }
    }
}

impl SubscriberAuth {
    /// Who the request is and what it may join. Only the backend authorizer awaits anything
    /// (its call, within `--authorizer-timeout`); the other modes answer at once.
    pub async fn identify(&self, headers: &HeaderMap, req: Requested, peer: &str) -> Result<Identity, AuthError> {
        match self {
            SubscriberAuth::Disabled => Err(AuthError::Disabled),
            SubscriberAuth::InsecureQuery => Ok(Identity {
                user: req.user.ok_or(AuthError::MissingUser)?,
                groups: req.groups,
                topics: req.topics,
                expires_in: None,
            }),
            SubscriberAuth::Jwt { verifier, cookie } => identify_jwt(verifier, cookie, headers, req),
            SubscriberAuth::Authorizer { authorizer, jwt } => match jwt {
                Some((verifier, cookie)) if carries_jwt(headers, cookie, &req) => {
                    identify_jwt(verifier, cookie, headers, req)
                }
                _ => identify_by_backend(authorizer, headers, req, peer).await,
            },
        }
    }
}

/// Whether the request carries a JWT anywhere ssegate reads one (an `Authorization` header of
/// another scheme, e.g. a proxy's Basic, is not one).
fn carries_jwt(headers: &HeaderMap, cookie: &str, req: &Requested) -> bool {
    matches!(authorization(headers), Authorization::Bearer(_))
        || req.token.is_some()
        || !matches!(cookie_value(headers, cookie), Ok(None))
}

fn identify_jwt(
    verifier: &ReloadingVerifier,
    cookie: &str,
    headers: &HeaderMap,
    req: Requested,
) -> Result<Identity, AuthError> {
    let header = authorization(headers);
    let token = match header {
        Authorization::Bearer(token) => Some(token),
        // Another scheme may be meant for something else (a proxy's Basic auth):
        // the cookie and the query still count.
        Authorization::Absent | Authorization::Other => cookie_value(headers, cookie)?.or(req.token.as_deref()),
    };
    let token = token.ok_or_else(|| match header {
        Authorization::Other => AuthError::MalformedAuthorization,
        _ => AuthError::MissingToken { cookie: cookie.to_owned() },
    })?;
    let claims = verifier.verify(token)?;
    authorize(claims, req)
}

/// Asks the backend (or its cache) and applies its allow answer like a token's claims.
async fn identify_by_backend(
    authorizer: &Arc<Authorizer>,
    headers: &HeaderMap,
    req: Requested,
    peer: &str,
) -> Result<Identity, AuthError> {
    let query = authorizer.query(headers, req.user.clone(), req.groups.clone(), req.topics.clone(), peer);
    let verdict = authorizer.authorize(query).await.map_err(AuthError::AuthorizerUnavailable)?;
    match &*verdict {
        Verdict::Deny(d) => Err(AuthError::Denied { status: d.status, reason: d.reason.clone() }),
        Verdict::Allow(g) => {
            let expires_in = g.expires_at.map(authorizer::remaining);
            apply(g.user.clone(), g.groups.clone(), &g.topics, expires_in, req).map_err(|(refusal, user)| {
                let what = match refusal {
                    Refusal::WrongUser(asked) => format!("`?user={asked}`"),
                    Refusal::Group(g) => format!("group `{g}`"),
                    Refusal::Topic(t) => format!("topic `{t}`"),
                };
                AuthError::NotGranted { what, user }
            })
        }
    }
}

/// What a request asked for beyond its grant.
enum Refusal {
    WrongUser(String),
    Group(String),
    Topic(String),
}

/// Applies a verified token's claims to what the request asked for.
fn authorize(claims: jwt::Claims, req: Requested) -> Result<Identity, AuthError> {
    let sub = claims.sub.ok_or_else(|| TokenError::MissingClaim("sub".into()))?;
    let user = UserId::parse(&sub).map_err(|reason| AuthError::BadClaim { claim: "sub", reason })?;
    let granted: Vec<GroupId> = claims
        .groups
        .iter()
        .map(|g| GroupId::parse(g).map_err(|reason| AuthError::BadClaim { claim: "groups", reason }))
        .collect::<Result<_, _>>()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let expires_in = Some(Duration::from_secs(claims.exp.saturating_sub(now)));
    apply(user, granted, &claims.topics, expires_in, req).map_err(|(refusal, user)| match refusal {
        Refusal::WrongUser(_) => AuthError::WrongUser { user },
        Refusal::Group(group) => AuthError::GroupNotAllowed { group, user },
        Refusal::Topic(topic) => AuthError::TopicNotAllowed { topic, user },
    })
}

/// A grant (a token's claims or the backend's allow) applied to what the request asked: the
/// user asked, if any, must be the granted one; no `group=` asked joins every granted group,
/// otherwise only those asked, each of which must be granted; each topic asked must match a
/// granted pattern. The same rules whoever granted, so the two modes never differ.
fn apply(
    user: UserId,
    granted: Vec<GroupId>,
    topic_patterns: &[String],
    expires_in: Option<Duration>,
    req: Requested,
) -> Result<Identity, (Refusal, UserId)> {
    if let Some(asked) = req.user.as_ref().filter(|u| **u != user) {
        return Err((Refusal::WrongUser(asked.as_str().to_owned()), user));
    }
    let groups = if req.groups.is_empty() {
        granted
    } else {
        if let Some(g) = req.groups.iter().find(|g| !granted.contains(g)) {
            return Err((Refusal::Group(g.as_str().to_owned()), user));
        }
        req.groups
    };
    if let Some(t) = req.topics.iter().find(|t| !topic_patterns.iter().any(|p| pattern::matches(p, t.as_str()))) {
        return Err((Refusal::Topic(t.as_str().to_owned()), user));
    }
    Ok(Identity { user, groups, topics: req.topics, expires_in })
}

/// What the `Authorization` header holds.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Authorization<'a> {
    Absent,
    /// `Bearer <token>` (the scheme in any case).
    Bearer(&'a str),
    /// Anything else: a bare token, another scheme, bytes that are not text.
    Other,
}

fn authorization(headers: &HeaderMap) -> Authorization<'_> {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else { return Authorization::Absent };
    match v.to_str().ok().and_then(|v| v.split_once(' ')) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Authorization::Bearer(token.trim()),
        _ => Authorization::Other,
    }
}

/// The token cookie's value, if sent; refused if sent more than once. A browser sends every
/// cookie whose domain and path match, so a sibling subdomain (`evil.example.com` setting
/// `ssegate_token` for `.example.com`) can add one beside ours; if the first one won, it could
/// pin the browser to an identity of its choosing. HTTP/2 may split cookies over several
/// headers: all are read.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AuthError> {
    let mut values = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = values.next();
    match values.count() {
        0 => Ok(first),
        more => Err(AuthError::AmbiguousCookie { cookie: name.to_owned(), count: more + 1 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_header_then_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; ssegate_token=abc; b=2".parse().unwrap());
        assert_eq!(cookie_value(&h, "ssegate_token").unwrap(), Some("abc"));
        assert_eq!(cookie_value(&h, "other").unwrap(), None);
        assert_eq!(authorization(&h), Authorization::Absent);
        h.insert("authorization", "Bearer xyz".parse().unwrap());
        assert_eq!(authorization(&h), Authorization::Bearer("xyz"));
        h.insert("authorization", "Basic xyz".parse().unwrap());
        assert_eq!(authorization(&h), Authorization::Other);
        h.insert("authorization", "eyJhbGciOiJIUzI1NiJ9.e30.sig".parse().unwrap());
        assert_eq!(authorization(&h), Authorization::Other, "a bare token");
    }

    #[test]
    fn a_token_cookie_sent_twice_is_refused_as_ambiguous() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "ssegate_token=mine; a=1; ssegate_token=theirs".parse().unwrap());
        let err = cookie_value(&h, "ssegate_token").unwrap_err();
        assert!(matches!(&err, AuthError::AmbiguousCookie { count: 2, .. }), "{err:?}");
        assert!(!err.to_string().contains('\n'), "one line");
        // Also when split over two headers (HTTP/2), and even with equal values.
        let mut h = HeaderMap::new();
        h.append("cookie", "ssegate_token=same".parse().unwrap());
        h.append("cookie", "b=2; ssegate_token=same".parse().unwrap());
        assert!(matches!(cookie_value(&h, "ssegate_token"), Err(AuthError::AmbiguousCookie { count: 2, .. })));
        // Other cookies may repeat; a name that merely ends like ours is another cookie.
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; a=2; x_ssegate_token=1; ssegate_token=t".parse().unwrap());
        assert_eq!(cookie_value(&h, "ssegate_token").unwrap(), Some("t"));
    }

    fn claims(groups: &[&str], topics: &[&str]) -> jwt::Claims {
        jwt::Claims {
            sub: Some("alice".into()),
            exp: u64::MAX / 2,
            groups: groups.iter().map(|s| s.to_string()).collect(),
            topics: topics.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn claims_bound_what_a_connection_may_join() {
        let req = |user: Option<&str>, groups: &[&str], topics: &[&str]| Requested {
            user: user.map(|u| UserId::parse(u).unwrap()),
            groups: groups.iter().map(|g| GroupId::parse(g).unwrap()).collect(),
            topics: topics.iter().map(|t| Topic::parse(t).unwrap()).collect(),
            token: None,
        };
        let id = authorize(claims(&["g1", "g2"], &["orders/*"]), req(None, &[], &["orders/1"])).unwrap();
        assert_eq!((id.user.as_str(), id.groups.len(), id.topics.len()), ("alice", 2, 1));
        let id = authorize(claims(&["g1", "g2"], &[]), req(Some("alice"), &["g2"], &[])).unwrap();
        assert_eq!(id.groups.iter().map(GroupId::as_str).collect::<Vec<_>>(), ["g2"]);
        let err = |c, r| authorize(c, r).unwrap_err().to_string();
        assert_eq!(err(claims(&[], &[]), req(Some("bob"), &[], &[])), "the token is for another user");
        assert_eq!(
            err(claims(&["g1"], &[]), req(None, &["g3"], &[])),
            "group `g3` is not in the token's `groups` claim"
        );
        assert_eq!(
            err(claims(&[], &["orders/*"]), req(None, &[], &["admin"])),
            "topic `admin` is not allowed by the token's `topics` claim"
        );
    }
}
