//! The name, keys and values of the retained-values bucket.
//!
//! **Keys** are the router's retained-store keys, one per (scope, event name): `u.<user>.<name>`,
//! `g.<group>.<name>`, `t.<topic>.<name>` and `b.<name>`, each id and name in unpadded base64url
//! and `_` for "no name" (no base64url text of a non-empty name is `_`). KV keys allow only
//! `[-/_=.A-Za-z0-9]` and no empty token between dots; ids may hold dots, `*`, `>`, spaces and
//! any unicode, so they never appear raw. The encoding is deterministic (one key per value, so
//! compare-and-set works) and reversible (a restarted replica knows whose value it reads).
//!
//! **Values** are small JSON, readable with `nats kv get`: `{"v":1,"epoch":…,"seq":…,"scope":…,
//! "name":…,"data":…,"expires_at_ms":…}`, or a tombstone `{"v":1,"epoch":…,"seq":…,"cleared":true}`
//! for a clear (so that a late write of an older value cannot bring it back). `epoch` and `seq`
//! are the event's id (the stream's creation time and the stream sequence): a value only ever
//! replaces one with a lower (`epoch`, `seq`), so the events of a recreated stream, whose
//! sequence starts again at 1, replace the values of the old one. Like the stream's wire format,
//! unknown fields are ignored and missing ones default (never `deny_unknown_fields`), so
//! replicas of two versions share the bucket during a rolling upgrade.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize};

use super::super::wire::{from_unix_ms, unix_ms};
use crate::domain::{Event, EventName, GroupId, InvalidText, Retain, Scope, Topic, UserId};

/// The version of the value format this version writes.
const VERSION: u32 = 1;

/// The name token of a value for events without a name.
const NO_NAME: &str = "_";

/// The bucket for the stream's retained values. KV bucket names allow `[A-Za-z0-9_-]`; a
/// stream name with other characters gets them replaced and a hash of the whole name added, so
/// that two streams never share a bucket.
pub fn bucket_name(stream: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if stream.chars().all(allowed) {
        return format!("{stream}_retained");
    }
    let clean: String = stream.chars().map(|c| if allowed(c) { c } else { '_' }).collect();
    // FNV-1a: stable across versions and platforms.
    let hash = stream.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("{clean}_retained_{hash:08x}")
}

/// The kind name and id of a scope, as a value records them.
fn kind_and_id(scope: &Scope) -> (&'static str, Option<&str>) {
    let kind = match scope {
        Scope::User(_) => "user",
        Scope::Group(_) => "group",
        Scope::Topic(_) => "topic",
        Scope::Broadcast => "broadcast",
    };
    (kind, scope.id())
}

/// The key of the value of (`scope`, `name`).
pub fn key(scope: &Scope, name: Option<&EventName>) -> String {
    let name = name.map_or_else(|| NO_NAME.to_owned(), |n| B64.encode(n.as_str()));
    match scope {
        Scope::User(u) => format!("u.{}.{name}", B64.encode(u.as_str())),
        Scope::Group(g) => format!("g.{}.{name}", B64.encode(g.as_str())),
        Scope::Topic(t) => format!("t.{}.{name}", B64.encode(t.as_str())),
        Scope::Broadcast => format!("b.{name}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{key:?} is not a retained-value key of this version")]
    Shape { key: String },
    #[error("{key:?}: a token is not unpadded base64url of UTF-8 text")]
    Token { key: String },
    #[error("{key:?}: {source}")]
    Invalid { key: String, source: InvalidText },
}

/// The (scope, name) a key stands for.
pub fn parse_key(key: &str) -> Result<(Scope, Option<EventName>), KeyError> {
    let text = |token: &str| {
        B64.decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| KeyError::Token { key: key.into() })
    };
    let invalid = |source| KeyError::Invalid { key: key.into(), source };
    let tokens: Vec<&str> = key.split('.').collect();
    let (scope, name) = match tokens.as_slice() {
        ["b", name] => (Scope::Broadcast, *name),
        [kind, id, name] => {
            let id = text(id)?;
            let scope = match *kind {
                "u" => Scope::User(UserId::parse(&id).map_err(invalid)?),
                "g" => Scope::Group(GroupId::parse(&id).map_err(invalid)?),
                "t" => Scope::Topic(Topic::parse(&id).map_err(invalid)?),
                _ => return Err(KeyError::Shape { key: key.into() }),
            };
            (scope, *name)
        }
        _ => return Err(KeyError::Shape { key: key.into() }),
    };
    let name = if name == NO_NAME { None } else { Some(EventName::parse(&text(name)?).map_err(invalid)?) };
    Ok((scope, name))
}

/// Which connections a stored value is for, repeated from its key for people reading the
/// bucket (the key is what a replica goes by).
#[derive(Serialize, Deserialize, Debug, Default, PartialEq)]
struct StoredScope {
    #[serde(default)]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

/// One value of the bucket, as stored.
#[derive(Serialize, Deserialize, Debug, Default, PartialEq)]
pub struct Stored {
    #[serde(default)]
    pub v: u32,
    /// The id of the event that set (or cleared) it: the stream's epoch and sequence.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub seq: u64,
    /// A tombstone: the value was cleared by event `seq`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cleared: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<StoredScope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
    /// Wall-clock expiry in Unix milliseconds; absent: kept until replaced or cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

impl Stored {
    /// What event (`epoch`, `seq`) with `retain` leaves as the value of `scope` (`None` for a
    /// plain event).
    pub fn new(epoch: u64, seq: u64, scope: &Scope, event: &Event, retain: Retain) -> Option<Self> {
        match retain {
            Retain::No => None,
            Retain::Clear => Some(Stored { v: VERSION, epoch, seq, cleared: true, ..Default::default() }),
            Retain::Set { expires_at } => {
                let (kind, id) = kind_and_id(scope);
                Some(Stored {
                    v: VERSION,
                    epoch,
                    seq,
                    cleared: false,
                    scope: Some(StoredScope { kind: kind.to_owned(), id: id.map(str::to_owned) }),
                    name: event.name.as_ref().map(|n| n.as_str().to_owned()),
                    data: event.data.clone(),
                    expires_at_ms: expires_at.map(unix_ms),
                })
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising strings and numbers to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The id (epoch, sequence) of the event behind a stored value, for compare-and-set:
    /// (0, 0) if unreadable, so that a valid write replaces it.
    pub fn id_of(bytes: &[u8]) -> (u64, u64) {
        Self::decode(bytes).map_or((0, 0), |s| (s.epoch, s.seq))
    }

    /// The event and retain to load for (`name`, from the key) if this is a live value.
    pub fn loaded(self, name: Option<EventName>) -> (Event, Retain) {
        let expires_at = self.expires_at_ms.map(from_unix_ms);
        (Event { name, data: self.data }, Retain::Set { expires_at })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn bucket_names_are_valid_and_distinct() {
        assert_eq!(bucket_name("SSEGATE"), "SSEGATE_retained");
        assert_eq!(bucket_name("my-app_1"), "my-app_1_retained");
        let (a, b) = (bucket_name("a:b"), bucket_name("a@b"));
        assert_ne!(a, b);
        for n in [a, b, bucket_name("ünï")] {
            assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'), "{n}");
        }
    }

    const AWKWARD: [&str; 9] = ["a.b", "*", ">", "x y", "ünï.cødé", "orders.>", "_", "-", "a..b"];

    #[test]
    fn every_key_round_trips_and_is_a_valid_kv_key_whatever_the_ids() {
        let valid = |k: &str| {
            !k.is_empty()
                && k.split('.').all(|t| !t.is_empty())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
        };
        let mut seen = std::collections::HashSet::new();
        for id in AWKWARD {
            let scopes = [
                Scope::User(UserId::parse(id).unwrap()),
                Scope::Group(GroupId::parse(id).unwrap()),
                Scope::Topic(Topic::parse(id).unwrap()),
                Scope::Broadcast,
            ];
            for scope in scopes {
                for name in [None, Some(EventName::parse(id).unwrap())] {
                    let k = key(&scope, name.as_ref());
                    assert!(valid(&k), "{k:?} is not a valid KV key");
                    assert_eq!(parse_key(&k).unwrap(), (scope.clone(), name.clone()), "{k}");
                    seen.insert(k);
                }
            }
        }
        // Distinct (scope, name) pairs get distinct keys: 9 ids × 3 kinds × 2 names, plus
        // broadcast with no name and with each of the 9 names.
        assert_eq!(seen.len(), 9 * 3 * 2 + 1 + 9);
    }

    #[test]
    fn a_key_that_is_not_ours_is_an_error() {
        let bad = ["", "u", "u.YQ", "x.YQ._", "u.YQ._.x", "b", "b.a b", "u.YQ=.X", "u.__.YQ", "g.Kg.c3NlZ2F0ZS54"];
        for k in bad {
            assert!(parse_key(k).is_err(), "{k:?} parsed");
        }
    }

    #[test]
    fn values_round_trip_and_a_clear_is_a_tombstone() {
        let scope = Scope::User(UserId::parse("a.b").unwrap());
        let event = Event { name: Some(EventName::parse("unread").unwrap()), data: "7\nx".into() };
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let set = Stored::new(77, 9, &scope, &event, Retain::Set { expires_at: Some(at) }).unwrap();
        let back = Stored::decode(&set.encode()).unwrap();
        assert_eq!((back.epoch, back.seq, back.cleared), (77, 9, false));
        assert_eq!(back.loaded(event.name.clone()), (event.clone(), Retain::Set { expires_at: Some(at) }));
        let clear = Stored::new(77, 10, &scope, &event, Retain::Clear).unwrap().encode();
        assert_eq!(String::from_utf8(clear.clone()).unwrap(), r#"{"v":1,"epoch":77,"seq":10,"cleared":true}"#);
        assert_eq!(Stored::id_of(&clear), (77, 10));
        assert!(Stored::new(77, 11, &scope, &event, Retain::No).is_none());
    }

    #[test]
    fn a_value_with_fields_this_version_does_not_know_or_missing_ones_is_read() {
        let newer = br#"{"v":7,"seq":5,"scope":{"kind":"session","id":"s","tenant":"t"},"data":"d",
            "encoding":"zstd","expires_at_ms":42,"cleared":false}"#;
        let s = Stored::decode(newer).unwrap();
        assert_eq!((s.v, s.seq, s.data.as_str(), s.expires_at_ms), (7, 5, "d", Some(42)));
        let bare = Stored::decode(b"{}").unwrap();
        assert_eq!(bare, Stored::default());
        assert_eq!(Stored::id_of(b"not json"), (0, 0), "an unreadable value loses to any write");
        assert_eq!(Stored::id_of(br#"{"seq":3}"#), (0, 3));
    }
}
