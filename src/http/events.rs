//! `GET /v1/events`: opens a Server-Sent Events stream for the identity in the query.

use axum::{
    Extension,
    body::Body,
    extract::{RawQuery, State},
    response::Response,
};
use std::{borrow::Cow, time::Duration};

use http::{HeaderMap, HeaderValue, header};

use super::{
    AppState, HttpError,
    body::SseBody,
    server::ConnContext,
    stream::{FastPath, Handoff, StreamStart},
};
use crate::{
    auth::Requested,
    domain::{EventId, GroupId, InvalidText, Topic, UserId},
    router::{CloseReason, Protocol, RouterError, Start, StreamMeta, Subscription},
};

/// What `GET /v1/events` asks for.
#[derive(Debug)]
pub struct SubscribeQuery {
    /// What to authenticate and authorize.
    pub requested: Requested,
    /// `?last_event_id=`, for clients that cannot set the `Last-Event-ID` header; unparsed.
    pub last_event_id: Option<String>,
}

/// Decodes one `application/x-www-form-urlencoded` component strictly: percent-escapes that do
/// not decode to UTF-8 are an error, not U+FFFD (two different ids must never collide).
/// (`form_urlencoded` only decodes lossily.)
fn decode(raw: &str) -> Result<Cow<'_, str>, std::str::Utf8Error> {
    let raw: Cow<'_, str> = if raw.contains('+') { Cow::Owned(raw.replace('+', " ")) } else { Cow::Borrowed(raw) };
    match raw {
        Cow::Borrowed(r) => percent_encoding::percent_decode_str(r).decode_utf8(),
        Cow::Owned(r) => percent_encoding::percent_decode_str(&r).decode_utf8().map(|c| Cow::Owned(c.into_owned())),
    }
}

/// The query's `key=value` pairs, decoded strictly (see `decode`).
fn pairs(query: &str) -> impl Iterator<Item = Result<(Cow<'_, str>, Cow<'_, str>), HttpError>> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k).map_err(|_| HttpError::NotUtf8(k.chars().take(64).collect()))?;
        let value = decode(v).map_err(|_| HttpError::NotUtf8(key.chars().take(64).collect()))?;
        Ok((key, value))
    })
}

/// Parses `?user=ID&group=G&topic=T&last_event_id=ID&token=JWT` (groups and topics
/// repeatable). Also accepted: `lastEventId` (what the `event-source-polyfill` sends on
/// reconnect), the same as `last_event_id`, and `_` (cache busters), ignored.
pub fn parse_query(query: &str, max_subscriptions: usize) -> Result<SubscribeQuery, HttpError> {
    fn param<T>(param: &'static str, r: Result<T, InvalidText>) -> Result<T, HttpError> {
        r.map_err(|reason| HttpError::InvalidParam { param, reason })
    }
    let (mut user, mut groups, mut topics, mut last_event_id, mut token) = (None, Vec::new(), Vec::new(), None, None);
    for pair in pairs(query) {
        let (key, value) = pair?;
        match &*key {
            "_" => {}
            "user" if user.is_some() => return Err(HttpError::Repeated("user")),
            "user" => user = Some(param("user", UserId::parse(&value))?),
            "group" => groups.push(param("group", GroupId::parse(&value))?),
            "topic" => topics.push(param("topic", Topic::parse(&value))?),
            "last_event_id" | "lastEventId" if last_event_id.is_some() => {
                return Err(HttpError::Repeated("last_event_id"));
            }
            "last_event_id" | "lastEventId" => last_event_id = Some(value.into_owned()),
            "token" if token.is_some() => return Err(HttpError::Repeated("token")),
            "token" => token = Some(value.into_owned()),
            other => return Err(HttpError::UnknownParam(other.chars().take(64).collect())),
        }
        if groups.len() + topics.len() > max_subscriptions {
            return Err(HttpError::TooManySubscriptions { count: groups.len() + topics.len(), max: max_subscriptions });
        }
    }
    groups.sort_unstable();
    groups.dedup();
    topics.sort_unstable();
    topics.dedup();
    Ok(SubscribeQuery { requested: Requested { user, groups, topics, token }, last_event_id })
}

/// The id to resume after: the `Last-Event-ID` header (what a browser sends when it
/// reconnects), else the query parameter. A malformed value is logged and treated as absent: a
/// client must never be locked out by an id it echoes back.
fn resume_id(headers: &HeaderMap, query: Option<&str>) -> Option<EventId> {
    let raw = match headers.get("last-event-id") {
        Some(v) => v.to_str().unwrap_or("\u{fffd}"),
        None => query?,
    };
    if raw.is_empty() {
        return None;
    }
    match raw.parse() {
        Ok(id) => Some(id),
        Err(_) => {
            tracing::info!(last_event_id = raw.chars().take(64).collect::<String>(), "malformed Last-Event-ID ignored");
            None
        }
    }
}

/// Admission of a stream, the same for every transport: query, authentication, limits, then
/// registration with the router. On the HTTP/1.1 fast path (`FastPath` in the request) the
/// stream is handed back to the listener in the response's extensions; otherwise (HTTP/2, or
/// requests hyper serves) the response body is an `SseBody`. Every refusal is counted and
/// logged in one place (`refuse`).
pub async fn subscribe(
    State(state): State<AppState>,
    conn: Option<Extension<ConnContext>>,
    fast: Option<Extension<FastPath>>,
    version: http::Version,
    headers: HeaderMap,
    uri: http::Uri,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let peer = conn.as_ref().map_or_else(|| "-".to_owned(), |c| c.peer.to_string());
    let meta = StreamMeta {
        peer: conn.as_ref().map(|c| c.peer),
        protocol: match version {
            http::Version::HTTP_2 => Protocol::Http2,
            http::Version::HTTP_11 | http::Version::HTTP_10 => Protocol::Http1,
            _ => Protocol::Unknown,
        },
    };
    admit(&state, conn, fast.is_some(), &headers, &uri, query.as_deref(), (&peer, meta))
        .await
        .map_err(|refused| refuse(&state, &peer, refused))
}

/// A refused subscription: the answer, and whom it was for as far as known.
struct Refused {
    error: HttpError,
    /// The verified user: from a good token, or the development identity.
    user: Option<UserId>,
    /// `?user=` as asked, not verified (a 401, or a token for someone else).
    requested_user: Option<UserId>,
}

impl From<HttpError> for Refused {
    fn from(error: HttpError) -> Self {
        Refused { error, user: None, requested_user: None }
    }
}

/// Counts a refusal and logs it, one line with structured fields: `status`, `user` (verified,
/// when known), `requested_user` (the query's, when it is not that), `peer` and the `reason`
/// the client is told. A bad request (400) is the client's mistake: `INFO`. The others (401,
/// 403: a forged, stale or misused credential; 429, 503: limits or a drain) are `WARN`.
fn refuse(state: &AppState, peer: &str, refused: Refused) -> HttpError {
    let Refused { error, user, requested_user } = refused;
    if let Some(rejection) = error.rejection() {
        state.metrics.rejected(rejection);
    }
    let status = error.status();
    let user = user.as_ref().or(match &error {
        HttpError::Auth(e) => e.user(),
        _ => None,
    });
    let requested_user = requested_user.as_ref().filter(|r| Some(*r) != user);
    macro_rules! refusal {
        ($level:expr) => {
            tracing::event!(
                $level,
                status = status.as_u16(),
                user = user.map(tracing::field::display),
                requested_user = requested_user.map(tracing::field::display),
                %peer,
                reason = %error,
                "sse connection refused"
            )
        };
    }
    if status == http::StatusCode::BAD_REQUEST {
        refusal!(tracing::Level::INFO);
    } else {
        refusal!(tracing::Level::WARN);
    }
    error
}

/// Only authentication awaits (a call to the backend's authorizer, bounded by its timeout);
/// the router's registration after it is one critical section, as before.
async fn admit(
    state: &AppState,
    conn: Option<Extension<ConnContext>>,
    fast: bool,
    headers: &HeaderMap,
    uri: &http::Uri,
    query: Option<&str>,
    (peer, meta): (&str, StreamMeta),
) -> Result<Response, Refused> {
    // HTTP/1.1 requires Host (RFC 9112 §3.2); h2 carries the authority in the URI instead.
    if !headers.contains_key(header::HOST) && uri.authority().is_none() {
        return Err(HttpError::MissingHost.into());
    }
    let q = parse_query(query.unwrap_or(""), state.settings.max_subscriptions)?;
    let requested_user = q.requested.user.clone();
    let id = state.auth.identify(headers, q.requested, peer).await.map_err(|e| Refused {
        error: HttpError::Auth(e),
        user: None,
        requested_user,
    })?;
    if id.groups.len() + id.topics.len() > state.settings.max_subscriptions {
        let count = id.groups.len() + id.topics.len();
        let error = HttpError::TooManySubscriptions { count, max: state.settings.max_subscriptions };
        return Err(Refused { error, user: Some(id.user), requested_user: None });
    }
    let resume = resume_id(headers, q.last_event_id.as_deref());
    let abort = conn.and_then(|c| c.abort.clone());
    let (user, groups, topics) = (id.user.clone(), id.groups.len(), id.topics.len());
    let refused = |e: RouterError| Refused { error: e.into(), user: Some(user.clone()), requested_user: None };
    // With interest delivery, the events of the user and its groups must reach this replica
    // first (subscriptions on the broker, and the events after `resume` in the replay log).
    // Refused at the limits before that, so a refused connection costs the broker nothing.
    let router = state.routers.of_user(&id.user);
    router.admits(&id.user).map_err(refused)?;
    let held = router.follow(Some(&id.user), &id.groups, &id.topics, resume).await.map_err(refused)?;
    let subscription = Subscription { user: id.user, groups: id.groups, topics: id.topics, abort, resume };
    let mut reg = router.subscribe_with(subscription, meta).map_err(refused)?;
    if let Some(held) = held {
        reg.hold(held);
    }
    // Plain values, never Debug text of Rust enums: `resume` is the id asked for (absent on a
    // fresh start); `start` is `fresh`, `resumed` (with `replayed`, the missed events re-sent)
    // or `missed` (with `missed`, why: `expired`, `unknown` or `other_epoch`).
    let (start, replayed, missed) = match reg.start() {
        Start::Fresh => ("fresh", None, None),
        Start::Resumed { replayed } => ("resumed", Some(replayed), None),
        Start::Missed(why) => ("missed", None, Some(why.as_str())),
    };
    tracing::info!(
        conn = reg.id(), user = %user, groups, topics, %peer,
        resume = resume.map(tracing::field::display), start, replayed, missed,
        "sse connection opened"
    );
    // The stream ends at its lifetime or when its token (or the backend's allow) expires,
    // whichever comes first.
    let lifetime = state.settings.max_connection_lifetime.map(|d| (jittered(d), CloseReason::Lifetime));
    let expiry = id.expires_in.map(|d| (d, CloseReason::TokenExpired));
    let close_after = [lifetime, expiry].into_iter().flatten().min_by_key(|(d, _)| *d);
    let start = StreamStart { reg, retry: state.retry_field.clone(), close_after, user };
    let mut resp = if fast {
        let mut resp = Response::new(Body::empty());
        resp.extensions_mut().insert(Handoff::new(start));
        resp
    } else {
        SseBody::new(start, state.metrics.clone()).response()
    };
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// A lifetime shortened by up to 10%, so that connections opened together (after a deploy)
/// do not all close together.
fn jittered(lifetime: Duration) -> Duration {
    lifetime.mul_f64(1.0 - fastrand::f64() * 0.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repeated_groups_and_topics() {
        let q = parse_query("user=al%20ice&group=b&group=a&topic=x&group=a&last_event_id=7-1&token=t", 8).unwrap();
        let r = &q.requested;
        assert_eq!(r.user.as_ref().map(UserId::as_str), Some("al ice"));
        assert_eq!(r.groups.iter().map(GroupId::as_str).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r.topics.iter().map(Topic::as_str).collect::<Vec<_>>(), ["x"]);
        assert_eq!(r.token.as_deref(), Some("t"));
        assert_eq!(q.last_event_id.as_deref(), Some("7-1"));
    }

    #[test]
    fn refuses_bad_queries_with_reasons() {
        let err = |q| parse_query(q, 2).unwrap_err().to_string();
        assert_eq!(err("user=a&user=b"), "query parameter `user` may appear only once");
        assert_eq!(err("user=a%0Ab"), "query parameter `user` contains the control character U+000A");
        assert_eq!(
            err("user=a&topics=x"),
            "unknown query parameter `topics` (expected user, group, topic, last_event_id, token)"
        );
        assert_eq!(
            err("user=a&topic=1&topic=2&group=3"),
            "3 groups and topics requested, over the limit of 2 (--max-subscriptions)"
        );
        assert_eq!(err("user=&"), "query parameter `user` must not be empty");
        // Invalid UTF-8 is refused, not replaced: `%FF` and `%FE` would both become U+FFFD.
        assert_eq!(err("user=a%FF"), "query parameter `user` is not valid UTF-8 once percent-decoded");
        assert_eq!(err("us%C3er=a"), "query parameter `us%C3er` is not valid UTF-8 once percent-decoded");
        assert_eq!(err("lastEventId=1-1&last_event_id=1-2"), "query parameter `last_event_id` may appear only once");
    }

    #[test]
    fn polyfill_resume_ids_and_cache_busters_are_accepted() {
        let q = parse_query("user=a&lastEventId=7-3&_=1700000000000&_=2", 8).unwrap();
        assert_eq!(q.last_event_id.as_deref(), Some("7-3"));
        let q = parse_query("user=a+b&group=%C3%A9t%C3%A9", 8).unwrap();
        assert_eq!(q.requested.user.as_ref().map(UserId::as_str), Some("a b"));
        assert_eq!(q.requested.groups[0].as_str(), "été");
    }

    #[test]
    fn the_header_wins_and_malformed_ids_count_as_absent() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_id(&h, Some("a-2")), Some(EventId { epoch: 0xa, seq: 2 }));
        assert_eq!(resume_id(&h, Some("junk")), None);
        h.insert("last-event-id", HeaderValue::from_static("a-3"));
        assert_eq!(resume_id(&h, Some("a-2")), Some(EventId { epoch: 0xa, seq: 3 }));
        h.insert("last-event-id", HeaderValue::from_static("a-03"));
        assert_eq!(resume_id(&h, Some("a-2")), None, "a malformed header is not replaced by the query");
        h.insert("last-event-id", HeaderValue::from_static(""));
        assert_eq!(resume_id(&h, None), None);
    }

    proptest::proptest! {
        #[test]
        fn any_query_string_parses_or_is_refused_without_panicking(q in ".{0,200}") {
            let _ = parse_query(&q, 4);
        }

        #[test]
        fn any_header_value_as_last_event_id_is_safe(v in "[ -~]{0,64}") {
            let mut h = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&v) {
                h.insert("last-event-id", value);
            }
            let _ = resume_id(&h, Some(&v));
        }
    }
}
