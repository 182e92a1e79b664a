//! `GET /v1/events`: opens a Server-Sent Events stream for the identity in the query.

use axum::{
    Extension,
    body::Body,
    extract::{RawQuery, State},
    response::Response,
};
use http::{HeaderValue, header};

use super::{AppState, HttpError, body::SseBody, server::ConnContext};
use crate::{
    domain::{GroupId, InvalidText, Topic, UserId},
    router::Subscription,
};

/// Parses `?user=ID&group=G&topic=T` (groups and topics repeatable, deduplicated).
pub fn parse_query(query: &str, max_subscriptions: usize) -> Result<(UserId, Vec<GroupId>, Vec<Topic>), HttpError> {
    fn param<T>(param: &'static str, r: Result<T, InvalidText>) -> Result<T, HttpError> {
        r.map_err(|reason| HttpError::InvalidParam { param, reason })
    }
    let (mut user, mut groups, mut topics) = (None, Vec::new(), Vec::new());
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "user" if user.is_some() => return Err(HttpError::RepeatedUser),
            "user" => user = Some(param("user", UserId::parse(&value))?),
            "group" => groups.push(param("group", GroupId::parse(&value))?),
            "topic" => topics.push(param("topic", Topic::parse(&value))?),
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
    Ok((user.ok_or(HttpError::MissingUser)?, groups, topics))
}

pub async fn subscribe(
    State(state): State<AppState>,
    conn: Option<Extension<ConnContext>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let (user, groups, topics) = parse_query(query.as_deref().unwrap_or(""), state.settings.max_subscriptions)?;
    let peer = conn.as_ref().map(|c| c.peer);
    tracing::info!(user = %user, groups = groups.len(), topics = topics.len(), peer = ?peer, "sse connection opened");
    let abort = conn.map(|c| c.abort.clone());
    let reg = state.router.subscribe(Subscription { user, groups, topics, abort })?;
    let body = SseBody::new(reg, state.settings.retry_field.clone());
    let mut resp = Response::new(Body::new(body));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repeated_groups_and_topics() {
        let (u, g, t) = parse_query("user=al%20ice&group=b&group=a&topic=x&group=a", 8).unwrap();
        assert_eq!(u.as_str(), "al ice");
        assert_eq!(g.iter().map(GroupId::as_str).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(t.iter().map(Topic::as_str).collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn refuses_bad_queries_with_reasons() {
        let err = |q| parse_query(q, 2).unwrap_err().to_string();
        assert_eq!(err(""), "query parameter `user` is required");
        assert_eq!(err("user=a&user=b"), "query parameter `user` may appear only once");
        assert_eq!(err("user=a%0Ab"), "query parameter `user` contains the control character U+000A");
        assert_eq!(err("user=a&topics=x"), "unknown query parameter `topics` (expected user, group, topic)");
        assert_eq!(
            err("user=a&topic=1&topic=2&group=3"),
            "3 groups and topics requested, over the limit of 2 (--max-subscriptions)"
        );
        assert_eq!(err("user=&"), "query parameter `user` must not be empty");
    }
}
