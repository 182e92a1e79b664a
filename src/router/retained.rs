//! Retained events: per (target, event name), the latest event published with `Retain::Set`,
//! sent to a connection that opens without `Last-Event-ID` (or whose resume cannot be served)
//! before any live event, so a page has its state on load.
//!
//! Part of the core (its lock orders updates with publishes and snapshots with registrations):
//! an event updates the store in the critical section that gives it its id, and a new
//! connection takes its snapshot in the one that registers it, so the snapshot holds exactly
//! the retained events up to the connection's cursor and every later one arrives live.
//!
//! Values are stored encoded **without an `id:` line** and sent before the cursor (the
//! `ssegate.position` event, whose id is the newest id): a client's last event id is untouched
//! by them and then set to the newest id, so it never moves backwards, and a reconnect resumes
//! after the cursor (the replay carries any value that changed since).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    time::SystemTime,
};

use bytes::Bytes;

use crate::domain::{EventName, GroupId, Retain, Scope, Target, Topic, UserId};

/// Bytes a value costs beyond its frame and key (its map entry), for `--max-retained-bytes`.
pub const VALUE_OVERHEAD: usize = 64;

/// The bounds of the store (`--max-retained`, `--max-retained-bytes`).
#[derive(Clone, Copy, Debug)]
pub struct RetainedConfig {
    pub max_values: usize,
    pub max_bytes: usize,
}

type Key = (Scope, Option<EventName>);

/// One retained value as a checkpoint keeps it: its scope and event name, the sequence number
/// of the event that set it, the event encoded without `id:` (exactly as sent), its expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetainedEntry {
    pub scope: Scope,
    pub name: Option<EventName>,
    pub seq: u64,
    pub frame: Bytes,
    pub expires_at: Option<SystemTime>,
}

#[derive(Clone)]
struct Value {
    /// The sequence number of the event that set it: a value is only replaced by a later one.
    seq: u64,
    /// `event:` and `data:` lines and the blank line, without `id:`.
    frame: Bytes,
    expires_at: Option<SystemTime>,
    cost: usize,
}

fn cost(key: &Key, frame_len: usize) -> usize {
    key.0.id().map_or(0, str::len) + key.1.as_ref().map_or(0, |n| n.as_str().len()) + frame_len + VALUE_OVERHEAD
}

/// The store was full: the retained publish was refused, nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetainedFull {
    #[error("retained values are at their limit of {limit} (--max-retained): clear some, or raise it")]
    Values { limit: usize },
    #[error("retained values are at their limit of {limit} bytes (--max-retained-bytes): clear some, or raise it")]
    Bytes { limit: usize },
}

pub(super) struct Retained {
    values: BTreeMap<Key, Value>,
    /// Values with a time to live, soonest first (entries whose value was replaced since are
    /// skipped when they come up).
    expiring: BinaryHeap<Reverse<(SystemTime, u64, Key)>>,
    bytes: usize,
    config: RetainedConfig,
}

impl Retained {
    pub fn new(config: RetainedConfig) -> Self {
        Self { values: BTreeMap::new(), expiring: BinaryHeap::new(), bytes: 0, config }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether setting `frame_len` bytes as the value of (`target`, `name`) fits the bounds
    /// (values it replaces give their room back). Clearing always fits.
    pub fn admits(&mut self, target: &Target, name: Option<&EventName>, frame_len: usize) -> Result<(), RetainedFull> {
        self.expire(SystemTime::now());
        let (mut values, mut bytes) = (self.values.len(), self.bytes);
        for scope in Scope::of(target) {
            let key = (scope, name.cloned());
            let new = cost(&key, frame_len);
            match self.values.get(&key) {
                Some(old) => bytes = bytes - old.cost + new,
                None => {
                    values += 1;
                    bytes += new;
                }
            }
        }
        if values > self.config.max_values {
            return Err(RetainedFull::Values { limit: self.config.max_values });
        }
        if bytes > self.config.max_bytes {
            return Err(RetainedFull::Bytes { limit: self.config.max_bytes });
        }
        Ok(())
    }

    /// Applies event `seq`'s `retain` to (`target`, `name`); `frame` is the event without its
    /// id (needed for `Set`). A value set by a later event than `seq` is left alone (a replica
    /// that loaded a newer value from the broker's store, then catches up on older events).
    pub fn apply(
        &mut self,
        seq: u64,
        target: &Target,
        name: Option<&EventName>,
        retain: Retain,
        frame: Option<&Bytes>,
    ) {
        for scope in Scope::of(target) {
            let key = (scope, name.cloned());
            if self.values.get(&key).is_some_and(|v| v.seq >= seq) {
                continue;
            }
            match (retain, frame) {
                (Retain::Set { expires_at }, Some(frame)) => {
                    if let Some(at) = expires_at {
                        self.expiring.push(Reverse((at, seq, key.clone())));
                    }
                    let value = Value { seq, cost: cost(&key, frame.len()), frame: frame.clone(), expires_at };
                    self.bytes += value.cost;
                    if let Some(old) = self.values.insert(key, value) {
                        self.bytes -= old.cost;
                    }
                }
                (Retain::Clear, _) => {
                    if let Some(old) = self.values.remove(&key) {
                        self.bytes -= old.cost;
                    }
                }
                (Retain::No, _) | (Retain::Set { .. }, None) => {}
            }
        }
    }

    /// Every live value, for a checkpoint of the data dir (`--data-dir`).
    pub fn entries(&self, now: SystemTime) -> Vec<RetainedEntry> {
        self.values
            .iter()
            .filter(|(_, v)| v.expires_at.is_none_or(|at| at > now))
            .map(|((scope, name), v)| RetainedEntry {
                scope: scope.clone(),
                name: name.clone(),
                seq: v.seq,
                frame: v.frame.clone(),
                expires_at: v.expires_at,
            })
            .collect()
    }

    /// Puts back a value from a checkpoint, unless a later event already set or cleared it.
    /// Bypasses the bounds, as a broker's catch-up does: the values were admitted when set.
    pub fn restore(&mut self, entry: RetainedEntry) {
        let key = (entry.scope, entry.name);
        if self.values.get(&key).is_some_and(|v| v.seq >= entry.seq) {
            return;
        }
        if let Some(at) = entry.expires_at {
            self.expiring.push(Reverse((at, entry.seq, key.clone())));
        }
        let value = Value {
            seq: entry.seq,
            cost: cost(&key, entry.frame.len()),
            frame: entry.frame,
            expires_at: entry.expires_at,
        };
        self.bytes += value.cost;
        if let Some(old) = self.values.insert(key, value) {
            self.bytes -= old.cost;
        }
    }

    /// The live values of `scope` itself, by event name (the unnamed one first).
    pub fn of_scope(&self, scope: &Scope) -> Vec<super::RetainedView> {
        let now = SystemTime::now();
        // Keys sort by scope, then name (`None` first): one range holds the scope's values.
        self.values
            .range((scope.clone(), None)..)
            .take_while(|((s, _), _)| s == scope)
            .filter(|(_, v)| v.expires_at.is_none_or(|at| at > now))
            .map(|((_, name), v)| super::RetainedView {
                name: name.clone(),
                seq: v.seq,
                frame: v.frame.clone(),
                expires_at: v.expires_at,
            })
            .collect()
    }

    /// Drops every value (the stream they came from was recreated: `Router::rebase`).
    pub fn clear(&mut self) {
        *self = Self::new(self.config);
    }

    /// A copy of the values now, for the shards to take each connection's snapshot from
    /// outside the core lock (rare: `Router::rebase`). The frames are shared, not copied.
    pub fn freeze(&self) -> Frozen {
        Frozen(self.values.clone())
    }

    /// Drops values whose time to live is over.
    pub fn expire(&mut self, now: SystemTime) {
        while let Some(Reverse((at, seq, _))) = self.expiring.peek() {
            if *at > now {
                break;
            }
            let seq = *seq;
            let Some(Reverse((_, _, key))) = self.expiring.pop() else { break };
            if self.values.get(&key).is_some_and(|v| v.seq == seq)
                && let Some(old) = self.values.remove(&key)
            {
                self.bytes -= old.cost;
            }
        }
    }

    /// The current values for a connection of `user` in `groups` and `topics`, in the order
    /// they were published.
    pub fn snapshot(&self, user: &UserId, groups: &[GroupId], topics: &[Topic], now: SystemTime) -> Vec<Bytes> {
        snapshot(&self.values, user, groups, topics, now)
    }
}

/// The values of a `Retained` at one moment (`Retained::freeze`).
pub(super) struct Frozen(BTreeMap<Key, Value>);

impl Frozen {
    /// As `Retained::snapshot`, of the frozen values.
    pub fn snapshot(&self, user: &UserId, groups: &[GroupId], topics: &[Topic], now: SystemTime) -> Vec<Bytes> {
        snapshot(&self.0, user, groups, topics, now)
    }
}

fn snapshot(
    values: &BTreeMap<Key, Value>,
    user: &UserId,
    groups: &[GroupId],
    topics: &[Topic],
    now: SystemTime,
) -> Vec<Bytes> {
    // Most deployments retain nothing: a connection then costs no scope lookups here.
    if values.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<(u64, Bytes)> = Vec::new();
    let scopes = std::iter::once(Scope::User(user.clone()))
        .chain(groups.iter().cloned().map(Scope::Group))
        .chain(topics.iter().cloned().map(Scope::Topic))
        .chain(std::iter::once(Scope::Broadcast));
    for scope in scopes {
        let live = values
            .range((scope.clone(), None)..)
            .take_while(|((s, _), _)| *s == scope)
            .filter(|(_, v)| v.expires_at.is_none_or(|at| at > now));
        found.extend(live.map(|(_, v)| (v.seq, v.frame.clone())));
    }
    found.sort_unstable_by_key(|(seq, _)| *seq);
    found.into_iter().map(|(_, frame)| frame).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn name(s: &str) -> Option<EventName> {
        Some(EventName::parse(s).unwrap())
    }

    fn store(max_values: usize, max_bytes: usize) -> Retained {
        Retained::new(RetainedConfig { max_values, max_bytes })
    }

    const SET: Retain = Retain::Set { expires_at: None };

    #[test]
    fn the_latest_value_per_target_and_name_is_kept_in_publish_order() {
        let mut r = store(100, 1 << 20);
        let alice = Target::users(vec![user("alice")]);
        let g = GroupId::parse("g").unwrap();
        r.apply(1, &alice, name("unread").as_ref(), SET, Some(&Bytes::from("u1")));
        r.apply(2, &Target::Group(g.clone()), name("unread").as_ref(), SET, Some(&Bytes::from("g2")));
        r.apply(3, &alice, name("unread").as_ref(), SET, Some(&Bytes::from("u3")));
        r.apply(4, &alice, None, SET, Some(&Bytes::from("m4")));
        r.apply(5, &Target::Broadcast, None, SET, Some(&Bytes::from("b5")));
        r.apply(6, &alice, name("other").as_ref(), Retain::No, Some(&Bytes::from("x")));
        let now = SystemTime::now();
        assert_eq!(r.snapshot(&user("alice"), std::slice::from_ref(&g), &[], now), ["g2", "u3", "m4", "b5"]);
        assert_eq!(r.snapshot(&user("bob"), &[], &[], now), ["b5"]);
        assert_eq!(r.len(), 4);
        // An older event does not replace a newer value (a catch-up after loading the store).
        r.apply(2, &alice, None, SET, Some(&Bytes::from("old")));
        r.apply(3, &alice, None, Retain::Clear, None);
        assert_eq!(r.snapshot(&user("alice"), &[], &[], now), ["u3", "m4", "b5"]);
        r.apply(7, &alice, None, Retain::Clear, None);
        assert_eq!(r.snapshot(&user("alice"), &[], &[], now), ["u3", "b5"]);
    }

    #[test]
    fn a_user_list_keeps_one_value_per_user_and_bytes_add_up() {
        let mut r = store(100, 1 << 20);
        let both = Target::users(vec![user("a"), user("bb")]);
        r.apply(1, &both, None, SET, Some(&Bytes::from("12345")));
        assert_eq!(r.len(), 2);
        assert_eq!(r.bytes(), (1 + 5 + VALUE_OVERHEAD) + (2 + 5 + VALUE_OVERHEAD));
        r.apply(2, &both, None, Retain::Clear, None);
        assert_eq!((r.len(), r.bytes()), (0, 0));
    }

    #[test]
    fn values_past_their_time_to_live_are_not_sent_and_are_dropped() {
        let mut r = store(100, 1 << 20);
        let now = SystemTime::now();
        let soon = Retain::Set { expires_at: Some(now + Duration::from_secs(10)) };
        r.apply(1, &Target::Broadcast, None, soon, Some(&Bytes::from("x")));
        assert_eq!(r.snapshot(&user("u"), &[], &[], now).len(), 1);
        assert!(r.snapshot(&user("u"), &[], &[], now + Duration::from_secs(10)).is_empty());
        // Replaced without a TTL: the old expiry no longer applies.
        r.apply(2, &Target::Broadcast, None, SET, Some(&Bytes::from("y")));
        r.expire(now + Duration::from_secs(11));
        assert_eq!(r.len(), 1);
        r.apply(3, &Target::Broadcast, None, soon, Some(&Bytes::from("z")));
        r.expire(now + Duration::from_secs(11));
        assert_eq!((r.len(), r.bytes()), (0, 0));
    }

    #[test]
    fn a_full_store_refuses_new_values_but_takes_replacements_and_clears() {
        let mut r = store(1, 1 << 20);
        let a = Target::users(vec![user("a")]);
        assert!(r.admits(&a, None, 10).is_ok());
        r.apply(1, &a, None, SET, Some(&Bytes::from("0123456789")));
        assert!(r.admits(&a, None, 10).is_ok());
        assert_eq!(r.admits(&a, name("n").as_ref(), 10), Err(RetainedFull::Values { limit: 1 }));
        let mut r = store(10, 200);
        assert!(r.admits(&a, None, 100).is_ok());
        assert_eq!(r.admits(&a, None, 200), Err(RetainedFull::Bytes { limit: 200 }));
    }
}
