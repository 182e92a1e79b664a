//! The form of an event inside the broker: small JSON, readable with `nats stream view`.
//! Targets travel in the payload, never in subject names, so no user, group or topic id
//! (dots, spaces, `*`, `>`, unicode) can change where a message is routed.
//!
//! **Compatibility:** the stream outlives any one version and replicas of two versions read it
//! during a rolling upgrade: unknown fields are ignored and optional ones may be missing (never
//! `deny_unknown_fields`). A target kind this version does not know cannot be delivered: the
//! message is skipped with an error log, and the sequence still advances.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::domain::{Event, EventName, GroupId, InvalidText, Retain, Target, Topic, UserId};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireTarget {
    Users { ids: Vec<String> },
    Group { id: String },
    Topic { id: String },
    Broadcast,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct WireEvent {
    target: WireTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default)]
    data: String,
    /// Absent for a plain event (and in messages of versions before retained events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retain: Option<WireRetain>,
}

/// `Retain::Set` (with its expiry in Unix milliseconds, so every replica agrees) or `Clear`.
#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
struct WireRetain {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    clear: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
}

impl WireRetain {
    fn new(retain: Retain) -> Option<Self> {
        match retain {
            Retain::No => None,
            Retain::Clear => Some(WireRetain { clear: true, expires_at_ms: None }),
            Retain::Set { expires_at } => Some(WireRetain { clear: false, expires_at_ms: expires_at.map(unix_ms) }),
        }
    }

    fn retain(&self) -> Retain {
        if self.clear {
            return Retain::Clear;
        }
        Retain::Set { expires_at: self.expires_at_ms.map(from_unix_ms) }
    }
}

/// A wall-clock time as Unix milliseconds (0 before 1970), the form expiries travel in.
pub(super) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(super) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// One event of the stream, as a replica applies it.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub target: Target,
    pub event: Event,
    pub retain: Retain,
}

pub fn encode(target: &Target, event: &Event, retain: Retain) -> Vec<u8> {
    let target = match target {
        Target::Users(ids) => WireTarget::Users { ids: ids.iter().map(|u| u.as_str().to_owned()).collect() },
        Target::Group(g) => WireTarget::Group { id: g.as_str().to_owned() },
        Target::Topic(t) => WireTarget::Topic { id: t.as_str().to_owned() },
        Target::Broadcast => WireTarget::Broadcast,
    };
    let wire = WireEvent {
        target,
        name: event.name.as_ref().map(|n| n.as_str().to_owned()),
        data: event.data.clone(),
        retain: WireRetain::new(retain),
    };
    // Serialising strings and enums to JSON cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not an ssegate event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid id in event: {0}")]
    Id(#[from] InvalidText),
}

/// Decodes (and re-validates: the stream may hold messages from another writer) one event.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let wire: WireEvent = serde_json::from_slice(bytes)?;
    let target = match wire.target {
        WireTarget::Users { ids } => Target::users(ids.iter().map(|u| UserId::parse(u)).collect::<Result<_, _>>()?),
        WireTarget::Group { id } => Target::Group(GroupId::parse(&id)?),
        WireTarget::Topic { id } => Target::Topic(Topic::parse(&id)?),
        WireTarget::Broadcast => Target::Broadcast,
    };
    let name = wire.name.as_deref().map(EventName::parse).transpose()?;
    let retain = wire.retain.as_ref().map_or(Retain::No, WireRetain::retain);
    Ok(Decoded { target, event: Event { name, data: wire.data }, retain })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_round_trips_with_awkward_ids() {
        let ids = ["a.b", "x y", "*", ">", "ünï.cødé", "orders.>"];
        let event = Event { name: Some(EventName::parse("n").unwrap()), data: "line\nline".into() };
        let targets = vec![
            Target::users(ids.iter().map(|u| UserId::parse(u).unwrap()).collect()),
            Target::Group(GroupId::parse("g.*").unwrap()),
            Target::Topic(Topic::parse("t >").unwrap()),
            Target::Broadcast,
        ];
        for t in targets {
            let d = decode(&encode(&t, &event, Retain::No)).unwrap();
            assert_eq!((d.target, d.event, d.retain), (t, event.clone(), Retain::No));
        }
        assert!(decode(b"{\"target\":{\"kind\":\"group\",\"id\":\"\"},\"data\":\"x\"}").is_err());
    }

    #[test]
    fn an_event_with_fields_this_version_does_not_know_is_read() {
        let newer = br#"{"v":2,"target":{"kind":"users","ids":["u"],"tenant":"t1"},"name":"n","data":"d",
            "published_at":"2030-01-01T00:00:00Z","priority":5}"#;
        let Decoded { target, event, .. } = decode(newer).unwrap();
        assert_eq!(target, Target::users(vec![UserId::parse("u").unwrap()]));
        assert_eq!(event, Event { name: Some(EventName::parse("n").unwrap()), data: "d".into() });
    }

    #[test]
    fn an_event_missing_optional_fields_is_read() {
        let d = decode(br#"{"target":{"kind":"broadcast"}}"#).unwrap();
        assert_eq!(
            d,
            Decoded { target: Target::Broadcast, event: Event { name: None, data: String::new() }, retain: Retain::No }
        );
    }

    #[test]
    fn retain_round_trips_with_its_wall_clock_expiry() {
        let event = Event { name: None, data: "3".into() };
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        for retain in
            [Retain::No, Retain::Clear, Retain::Set { expires_at: None }, Retain::Set { expires_at: Some(at) }]
        {
            assert_eq!(decode(&encode(&Target::Broadcast, &event, retain)).unwrap().retain, retain);
        }
        let set = decode(br#"{"target":{"kind":"broadcast"},"retain":{"expires_at_ms":5,"ttl_hint":1}}"#).unwrap();
        assert_eq!(set.retain, Retain::Set { expires_at: Some(UNIX_EPOCH + Duration::from_millis(5)) });
    }

    #[test]
    fn a_target_kind_this_version_does_not_know_is_an_error_not_a_misdelivery() {
        assert!(decode(br#"{"target":{"kind":"session","id":"s1"},"data":"d"}"#).is_err());
    }
}
