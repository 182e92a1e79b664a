//! The form of an event inside the broker: small JSON, readable with `nats stream view`.
//! Targets travel in the payload, never in subject names, so no user, group or topic id
//! (dots, spaces, `*`, `>`, unicode) can change where a message is routed.
//!
//! **Compatibility:** the stream outlives any one version and replicas of two versions read it
//! during a rolling upgrade: unknown fields are ignored and optional ones may be missing (never
//! `deny_unknown_fields`). A target kind this version does not know cannot be delivered: the
//! message is skipped with an error log, and the sequence still advances.

use serde::{Deserialize, Serialize};

use crate::domain::{Event, EventName, GroupId, InvalidText, Target, Topic, UserId};

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
}

pub fn encode(target: &Target, event: &Event) -> Vec<u8> {
    let target = match target {
        Target::Users(ids) => WireTarget::Users { ids: ids.iter().map(|u| u.as_str().to_owned()).collect() },
        Target::Group(g) => WireTarget::Group { id: g.as_str().to_owned() },
        Target::Topic(t) => WireTarget::Topic { id: t.as_str().to_owned() },
        Target::Broadcast => WireTarget::Broadcast,
    };
    let wire = WireEvent { target, name: event.name.as_ref().map(|n| n.as_str().to_owned()), data: event.data.clone() };
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
pub fn decode(bytes: &[u8]) -> Result<(Target, Event), DecodeError> {
    let wire: WireEvent = serde_json::from_slice(bytes)?;
    let target = match wire.target {
        WireTarget::Users { ids } => Target::users(ids.iter().map(|u| UserId::parse(u)).collect::<Result<_, _>>()?),
        WireTarget::Group { id } => Target::Group(GroupId::parse(&id)?),
        WireTarget::Topic { id } => Target::Topic(Topic::parse(&id)?),
        WireTarget::Broadcast => Target::Broadcast,
    };
    let name = wire.name.as_deref().map(EventName::parse).transpose()?;
    Ok((target, Event { name, data: wire.data }))
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
            assert_eq!(decode(&encode(&t, &event)).unwrap(), (t, event.clone()));
        }
        assert!(decode(b"{\"target\":{\"kind\":\"group\",\"id\":\"\"},\"data\":\"x\"}").is_err());
    }

    #[test]
    fn an_event_with_fields_this_version_does_not_know_is_read() {
        let newer = br#"{"v":2,"target":{"kind":"users","ids":["u"],"tenant":"t1"},"name":"n","data":"d",
            "published_at":"2030-01-01T00:00:00Z","priority":5}"#;
        let (target, event) = decode(newer).unwrap();
        assert_eq!(target, Target::users(vec![UserId::parse("u").unwrap()]));
        assert_eq!(event, Event { name: Some(EventName::parse("n").unwrap()), data: "d".into() });
    }

    #[test]
    fn an_event_missing_optional_fields_is_read() {
        let (target, event) = decode(br#"{"target":{"kind":"broadcast"}}"#).unwrap();
        assert_eq!((target, event), (Target::Broadcast, Event { name: None, data: String::new() }));
    }

    #[test]
    fn a_target_kind_this_version_does_not_know_is_an_error_not_a_misdelivery() {
        assert!(decode(br#"{"target":{"kind":"session","id":"s1"},"data":"d"}"#).is_err());
    }
}
