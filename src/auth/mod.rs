//! Who may subscribe to what (JWT on the HTTP port) and who may publish (API keys on the gRPC
//! port). Identity is decided here, once, from the request; the router only sees the result.

mod api_keys;
pub mod jwt;
pub mod pattern;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

pub use api_keys::{ApiKeyError, ApiKeys, PublishDenied, PublisherAuth};
use std::sync::Arc;

use jwt::{ReloadingVerifier, TokenError};

use crate::domain::{GroupId, InvalidText, Topic, UserId};

/// How subscribers prove who they are.
pub enum SubscriberAuth {
    /// A JWT in `Authorization: Bearer`, the cookie, or `?token=`.
    Jwt { verifier: Arc<ReloadingVerifier>, cookie: String },
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
    #[error(
        "subscriptions are disabled: configure --jwt-secret-file, --jwt-public-key-file or --jwt-jwks-file \
         (or --insecure-dev-identity for development)"
    )]
    Disabled,
}

impl AuthError {
    /// The verified user a refusal is for, when the token was good (a 403).
    pub fn user(&self) -> Option<&UserId> {
        match self {
            AuthError::WrongUser { user }
            | AuthError::GroupNotAllowed { user, .. }
            | AuthError::TopicNotAllowed { user, .. } => Some(user),
            _ => None,
        }
    }
}

impl SubscriberAuth {
    pub fn identify(&self, headers: &HeaderMap, req: Requested) -> Result<Identity, AuthError> {
        match self {
            SubscriberAuth::Disabled => Err(AuthError::Disabled),
            SubscriberAuth::InsecureQuery => Ok(Identity {
                user: req.user.ok_or(AuthError::MissingUser)?,
                groups: req.groups,
                topics: req.topics,
                expires_in: None,
            }),
            SubscriberAuth::Jwt { verifier, cookie } => {
                let header = authorization(headers);
                let token = match header {
                    Authorization::Bearer(token) => Some(token),
                    // Another scheme may be meant for something else (a proxy's Basic auth):
                    // the cookie and the query still count.
                    Authorization::Absent | Authorization::Other => {
                        cookie_value(headers, cookie)?.or(req.token.as_deref())
                    }
                };
                let token = token.ok_or_else(|| match header {
                    Authorization::Other => AuthError::MalformedAuthorization,
                    _ => AuthError::MissingToken { cookie: cookie.clone() },
                })?;
                let claims = verifier.verify(token)?;
                authorize(claims, req)
            }
        }
    }
}

/// Applies a verified token's claims to what the request asked for.
fn authorize(claims: jwt::Claims, req: Requested) -> Result<Identity, AuthError> {
    let sub = claims.sub.ok_or_else(|| TokenError::MissingClaim("sub".into()))?;
    let user = UserId::parse(&sub).map_err(|reason| AuthError::BadClaim { claim: "sub", reason })?;
    if req.user.as_ref().is_some_and(|u| *u != user) {
        return Err(AuthError::WrongUser { user });
    }
    let granted: Vec<GroupId> = claims
        .groups
        .iter()
        .map(|g| GroupId::parse(g).map_err(|reason| AuthError::BadClaim { claim: "groups", reason }))
        .collect::<Result<_, _>>()?;
    // No `group=` asked: join every group of the token. Otherwise only those asked, each of
    // which must be granted.
    let groups = if req.groups.is_empty() {
        granted
    } else {
        if let Some(g) = req.groups.iter().find(|g| !granted.contains(g)) {
            return Err(AuthError::GroupNotAllowed { group: g.as_str().to_owned(), user });
        }
        req.groups
    };
    if let Some(t) = req.topics.iter().find(|t| !claims.topics.iter().any(|p| pattern::matches(p, t.as_str()))) {
        return Err(AuthError::TopicNotAllowed { topic: t.as_str().to_owned(), user });
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Ok(Identity {
        user,
        groups,
        topics: req.topics,
        expires_in: Some(Duration::from_secs(claims.exp.saturating_sub(now))),
    })
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
