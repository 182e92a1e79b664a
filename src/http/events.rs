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
    auth::{AuthError, Requested},
    domain::{EventId, GroupId, InvalidText, Topic, UserId},
    router::{CloseReason, RouterError, Subscription},
    telemetry::metrics::Rejection,
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
/// requests hyper serves) the response body is an `SseBody`.
pub async fn subscribe(
    State(state): State<AppState>,
    conn: Option<Extension<ConnContext>>,
    fast: Option<Extension<FastPath>>,
    headers: HeaderMap,
    uri: http::Uri,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    // HTTP/1.1 requires Host (RFC 9112 §3.2); h2 carries the authority in the URI instead.
    if !headers.contains_key(header::HOST) && uri.authority().is_none() {
        state.metrics.rejected(Rejection::BadRequest);
        return Err(HttpError::MissingHost);
    }
    let q = parse_query(query.as_deref().unwrap_or(""), state.settings.max_subscriptions).inspect_err(|_| {
        state.metrics.rejected(Rejection::BadRequest);
    })?;
    let peer = conn.as_ref().map_or_else(|| "-".to_owned(), |c| c.peer.to_string());
    let id = state.auth.identify(&headers, q.requested).map_err(|e| {
        state.metrics.rejected(match e {
            AuthError::MissingToken { .. }
            | AuthError::AmbiguousCookie { .. }
            | AuthError::Token(_)
            | AuthError::BadClaim { .. } => Rejection::Unauthenticated,
            AuthError::WrongUser | AuthError::GroupNotAllowed(_) | AuthError::TopicNotAllowed(_) => {
                Rejection::Forbidden
            }
            AuthError::MissingUser => Rejection::BadRequest,
            AuthError::Disabled => Rejection::Disabled,
        });
        tracing::info!(%peer, error = %e, "sse connection refused");
        HttpError::Auth(e)
    })?;
    if id.groups.len() + id.topics.len() > state.settings.max_subscriptions {
        state.metrics.rejected(Rejection::BadRequest);
        let count = id.groups.len() + id.topics.len();
        return Err(HttpError::TooManySubscriptions { count, max: state.settings.max_subscriptions });
    }
    let resume = resume_id(&headers, q.last_event_id.as_deref());
    let abort = conn.and_then(|c| c.abort.clone());
    let (user, groups, topics) = (id.user.clone(), id.groups.len(), id.topics.len());
    let subscription = Subscription { user: id.user, groups: id.groups, topics: id.topics, abort, resume };
    let reg = state.router.subscribe(subscription);
    let reg = match reg {
        Ok(reg) => reg,
        Err(e) => {
            state.metrics.rejected(match e {
                RouterError::ShuttingDown => Rejection::ShuttingDown,
                RouterError::TooManyConnections { .. } => Rejection::MaxConnections,
                RouterError::TooManyForUser { .. } => Rejection::MaxConnectionsPerUser,
            });
            tracing::warn!(user = %user, %peer, error = %e, "sse connection refused");
            return Err(e.into());
        }
    };
    tracing::info!(
        conn = reg.id(), user = %user, groups, topics, %peer,
        resume = ?resume.map(|id| id.to_string()), start = ?reg.start(),
        "sse connection opened"
    );
    // The stream ends at its lifetime or when its token expires, whichever comes first.
    let lifetime = state.settings.max_connection_lifetime.map(|d| (jittered(d), CloseReason::Lifetime));
    let expiry = id.expires_in.map(|d| (d, CloseReason::TokenExpired));
    let close_after = [lifetime, expiry].into_iter().flatten().min_by_key(|(d, _)| *d);
    let start = StreamStart { reg, retry: state.retry_field.clone(), close_after, user };
    let mut resp = if fast.is_some() {
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
