//! Protobuf messages to domain types, validating every field once. Errors name the field the
//! caller sent (for example `user_ids[2]`).

use super::{ApiError, pb, service::Limits};
use std::time::{Duration, SystemTime};

use crate::domain::{Event, EventName, GroupId, IdempotencyKey, InvalidText, Retain, Target, Topic, UserId};

fn field<T>(name: impl Into<String>, r: Result<T, InvalidText>) -> Result<T, ApiError> {
    r.map_err(|reason| ApiError::Invalid { field: name.into(), reason })
}

pub fn user(name: &str, s: &str) -> Result<UserId, ApiError> {
    field(name, UserId::parse(s))
}

/// Parses a list of ids with a per-request cap; `parse` validates one entry.
pub fn list<T>(
    name: &'static str,
    items: &[String],
    limits: &Limits,
    parse: fn(&str) -> Result<T, InvalidText>,
) -> Result<Vec<T>, ApiError> {
    if items.len() > limits.max_ids_per_request {
        return Err(ApiError::TooMany { field: name, count: items.len(), max: limits.max_ids_per_request });
    }
    items.iter().enumerate().map(|(i, s)| field(format!("{name}[{i}]"), parse(s))).collect()
}

pub fn users_target(name: &'static str, ids: &[String], limits: &Limits) -> Result<Target, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::Missing(name));
    }
    Ok(Target::users(list(name, ids, limits, UserId::parse)?))
}

pub fn group(s: &str) -> Result<GroupId, ApiError> {
    field("group", GroupId::parse(s))
}

pub fn topic(s: &str) -> Result<Topic, ApiError> {
    field("topic", Topic::parse(s))
}

pub fn event(ev: Option<pb::Event>, limits: &Limits) -> Result<Event, ApiError> {
    let ev = ev.ok_or(ApiError::Missing("event"))?;
    let len = ev.name.len() + ev.data.len();
    if len > limits.max_event_bytes {
        return Err(ApiError::EventTooLarge { len, max: limits.max_event_bytes });
    }
    let name = match ev.name.as_str() {
        "" | "message" => None,
        n => Some(field("event.name", EventName::parse(n))?),
    };
    Ok(Event { name, data: ev.data })
}

/// `idempotency_key`: empty is no key (proto3's default); anything else must be a valid key
/// (`IdempotencyKey`), so a blank one or one with CR or LF is refused here, the same for every
/// backplane, before anything is published.
pub fn idempotency_key(s: &str) -> Result<Option<IdempotencyKey>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    field("idempotency_key", IdempotencyKey::parse(s)).map(Some)
}

/// `retain`: absent is a plain event; `clear` deletes; otherwise a value with an optional time
/// to live, turned into a wall-clock expiry here (replicas agree on it).
pub fn retain(r: Option<pb::Retain>) -> Result<Retain, ApiError> {
    Ok(match r {
        None => Retain::No,
        Some(pb::Retain { clear: true, ttl_seconds: 0 }) => Retain::Clear,
        Some(pb::Retain { clear: true, .. }) => {
            return Err(ApiError::Conflict(
                "retain.ttl_seconds must be 0 with retain.clear (a cleared value has no time to live)",
            ));
        }
        Some(pb::Retain { ttl_seconds: 0, .. }) => Retain::Set { expires_at: None },
        Some(pb::Retain { ttl_seconds, .. }) => {
            Retain::Set { expires_at: Some(SystemTime::now() + Duration::from_secs(u64::from(ttl_seconds))) }
        }
    })
}

pub fn stream_target(t: Option<pb::publish_stream_request::Target>, limits: &Limits) -> Result<Target, ApiError> {
    use pb::publish_stream_request::Target as T;
    match t.ok_or(ApiError::Missing("target"))? {
        T::Users(u) => users_target("users.user_ids", &u.user_ids, limits),
        T::Group(g) => Ok(Target::Group(group(&g)?)),
        T::Topic(t) => Ok(Target::Topic(topic(&t)?)),
        T::Broadcast(_) => Ok(Target::Broadcast),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_optional_and_refusals_name_the_field() {
        assert_eq!(idempotency_key("").unwrap(), None);
        assert_eq!(idempotency_key("order-42").unwrap().unwrap().as_str(), "order-42");
        let refused = |s: &str| idempotency_key(s).unwrap_err();
        assert_eq!(refused("a\r\nb").to_string(), "idempotency_key contains the control character U+000D");
        assert_eq!(refused("  ").to_string(), "idempotency_key must not be blank (only whitespace)");
        assert_eq!(
            refused(&"k".repeat(257)).to_string(),
            "idempotency_key is 257 bytes, longer than the limit of 256 bytes"
        );
        assert_eq!(refused("\n").code(), tonic::Code::InvalidArgument);
    }
}
