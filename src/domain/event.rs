//! Events, their ids and their targets.

use std::{fmt, str::FromStr, time::SystemTime};

use super::{EventName, GroupId, Topic, UserId};

/// The id of a published event, as subscribers see it in the SSE `id:` field.
///
/// `epoch` names the sequence the event belongs to and `seq` is its position in it. The
/// in-memory backplane draws a random epoch at start, so an id from before a restart is
/// recognised as foreign; a broker backplane uses the stream's identity as epoch and the
/// broker's global sequence as `seq`, so every replica produces the same id for an event.
/// On the wire: `<epoch in lowercase hex>-<seq in decimal>`, for example `1f3a9c0b2d4e5f60-42`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct EventId {
    pub epoch: u64,
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}", self.epoch, self.seq)
    }
}

/// The text was not an event id this server could have produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an ssegate event id (expected `<hex epoch>-<decimal sequence>`)")]
pub struct MalformedEventId;

impl FromStr for EventId {
    type Err = MalformedEventId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, seq) = s.split_once('-').ok_or(MalformedEventId)?;
        let all = |t: &str, f: fn(&u8) -> bool| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| f(&b));
        // Only the canonical form Display writes is accepted (no sign, no upper case, no
        // leading zeros beyond what Display writes), so an id maps to exactly one text.
        if !all(epoch, |b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) || !all(seq, u8::is_ascii_digit) {
            return Err(MalformedEventId);
        }
        let id = EventId {
            epoch: u64::from_str_radix(epoch, 16).map_err(|_| MalformedEventId)?,
            seq: seq.parse().map_err(|_| MalformedEventId)?,
        };
        if id.to_string() != s {
            return Err(MalformedEventId);
        }
        Ok(id)
    }
}

/// One event as a publisher gave it: an optional name (absent means `message`) and data.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Event {
    pub name: Option<EventName>,
    pub data: String,
}

/// What a publish does to the retained state of its target and event name: the latest event
/// published with `Set` per (target, name) is sent to every connection that opens later,
/// before live events (see `router::retained`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Retain {
    /// A plain event: the retained state is left as it is.
    #[default]
    No,
    /// The event becomes the current value, kept until replaced, cleared, or `expires_at`
    /// passes. Wall-clock time, so that every replica (and a restarted one) agrees on it.
    Set { expires_at: Option<SystemTime> },
    /// The current value is deleted; the event itself is still delivered like any other.
    Clear,
}

/// Who receives an event.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Target {
    /// Every connection of these users; sorted and without duplicates.
    Users(Vec<UserId>),
    Group(GroupId),
    Topic(Topic),
    Broadcast,
}

impl Target {
    /// Targets users, sorted and deduplicated so that a user listed twice receives once.
    pub fn users(mut ids: Vec<UserId>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        Target::Users(ids)
    }
}

/// What one retained value is for: one user's connections (a publish to a user list sets one
/// value per user), a group's, a topic's, or everyone's.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Scope {
    User(UserId),
    Group(GroupId),
    Topic(Topic),
    Broadcast,
}

impl Scope {
    /// The scopes of a target: one per user of a user list.
    pub fn of(target: &Target) -> Vec<Scope> {
        match target {
            Target::Users(users) => users.iter().cloned().map(Scope::User).collect(),
            Target::Group(g) => vec![Scope::Group(g.clone())],
            Target::Topic(t) => vec![Scope::Topic(t.clone())],
            Target::Broadcast => vec![Scope::Broadcast],
        }
    }

    /// The target whose retained value this scope's is.
    pub fn target(&self) -> Target {
        match self {
            Scope::User(u) => Target::users(vec![u.clone()]),
            Scope::Group(g) => Target::Group(g.clone()),
            Scope::Topic(t) => Target::Topic(t.clone()),
            Scope::Broadcast => Target::Broadcast,
        }
    }

    /// The user, group or topic id; none for broadcast.
    pub fn id(&self) -> Option<&str> {
        match self {
            Scope::User(u) => Some(u.as_str()),
            Scope::Group(g) => Some(g.as_str()),
            Scope::Topic(t) => Some(t.as_str()),
            Scope::Broadcast => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn event_id_round_trips_and_rejects_junk() {
        let id = EventId { epoch: 0x1f3a, seq: 42 };
        assert_eq!(id.to_string(), "1f3a-42");
        assert_eq!("1f3a-42".parse::<EventId>(), Ok(id));
        for bad in ["", "42", "-1", "1f3a-", "1F3A-42", "1f3a-+42", "1f3a-042", "g-1", "1-2-3", "01-2"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_event_id_round_trips(epoch: u64, seq: u64) {
            let id = EventId { epoch, seq };
            prop_assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".*") {
            let _ = s.parse::<EventId>();
        }
    }
}
