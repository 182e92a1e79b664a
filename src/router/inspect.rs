//! What the admin console reads from the router: a subject's streams (from its shards), the
//! replay window, one event of the log, a scope's retained values, and the log's events after a
//! position (the console's live tail). Read-only; each takes the core lock or one shard's
//! tables lock at a time, briefly, and nothing here runs on the event path.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;

use super::{
    ConnId, Router,
    mailbox::{Positions, StreamMeta},
    replay::Logged,
};
use crate::domain::{EventId, EventName, GroupId, Scope, Target, Topic, UserId};

/// What the console looks up: one user, group or topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    User(UserId),
    Group(GroupId),
    Topic(Topic),
}

impl Subject {
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::User(_) => "user",
            Subject::Group(_) => "group",
            Subject::Topic(_) => "topic",
        }
    }

    /// Parses a subject from its kind (`user`, `group`, `topic`) and id; `None` for another kind.
    pub fn parse(kind: &str, id: &str) -> Option<Result<Subject, crate::domain::InvalidText>> {
        Some(match kind {
            "user" => UserId::parse(id).map(Subject::User),
            "group" => GroupId::parse(id).map(Subject::Group),
            "topic" => Topic::parse(id).map(Subject::Topic),
            _ => return None,
        })
    }

    pub fn id(&self) -> &str {
        match self {
            Subject::User(u) => u.as_str(),
            Subject::Group(g) => g.as_str(),
            Subject::Topic(t) => t.as_str(),
        }
    }

    /// The target of an event published to exactly this subject.
    pub fn target(&self) -> Target {
        self.scope().target()
    }

    pub fn scope(&self) -> Scope {
        match self {
            Subject::User(u) => Scope::User(u.clone()),
            Subject::Group(g) => Scope::Group(g.clone()),
            Subject::Topic(t) => Scope::Topic(t.clone()),
        }
    }
}

/// One open stream as the console shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamView {
    pub conn: ConnId,
    pub user: UserId,
    pub groups: Vec<GroupId>,
    pub topics: Vec<Topic>,
    pub age: Duration,
    pub meta: StreamMeta,
    pub positions: Positions,
}

impl StreamView {
    /// Whether an event published to `target` is for this stream.
    pub fn is_addressed_by(&self, target: &Target) -> bool {
        match target {
            Target::Users(users) => users.binary_search(&self.user).is_ok(),
            Target::Group(g) => self.groups.binary_search(g).is_ok(),
            Target::Topic(t) => self.topics.binary_search(t).is_ok(),
            Target::Broadcast => true,
        }
    }
}

/// The replay log's extent now.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    pub epoch: u64,
    pub last_seq: u64,
    pub events: usize,
    pub bytes: usize,
    pub oldest_seq: Option<u64>,
    /// How long ago the oldest event held was published.
    pub oldest_age: Option<Duration>,
    /// The newest sequence number evicted so far (0 if none).
    pub evicted_through: u64,
    pub capacity: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// What the replay log says about one event id.
#[derive(Clone)]
pub enum EventLookup {
    Found(Arc<Logged>),
    /// An id of another epoch (an earlier process, or a recreated broker stream).
    OtherEpoch,
    /// Later than the newest event this replica has.
    NotYet,
    /// Evicted from the log (its bounds): nothing more can be said.
    Evicted,
    /// Within the log's span, but no event has this number (a broker message that could not be
    /// decoded, or a sequence that skipped it).
    Absent,
}

/// One retained value of a scope.
#[derive(Clone, Debug)]
pub struct RetainedView {
    pub name: Option<EventName>,
    /// The sequence number of the event that set it.
    pub seq: u64,
    /// The event, encoded without its id.
    pub frame: Bytes,
    pub expires_at: Option<SystemTime>,
}

/// Events of a target after a position (`Router::events_after`).
pub struct Tail {
    /// Oldest first.
    pub events: Vec<Arc<Logged>>,
    /// Events after the position were evicted before they were read: some may be missing.
    pub gap: bool,
    /// Where to continue from: the newest sequence number looked at.
    pub position: u64,
    pub epoch: u64,
}

impl Router {
    /// The open streams of `subject` on this replica, at most `limit` (oldest connection
    /// first), and how many there are.
    pub fn streams(&self, subject: &Subject, limit: usize) -> (Vec<StreamView>, usize) {
        let shards: Vec<usize> = match subject {
            // All of a user's connections live in one shard.
            Subject::User(u) => vec![self.shard_of(u)],
            _ => (0..self.shards.len()).collect(),
        };
        let now = Instant::now();
        let (mut out, mut total) = (Vec::new(), 0);
        for i in shards {
            total += self.with_shard_tables(i, |t| t.views(subject, limit, now, &mut out));
        }
        out.sort_by_key(|v| v.conn);
        out.truncate(limit);
        (out, total)
    }

    pub fn replay_window(&self) -> ReplayWindow {
        let now = Instant::now();
        let mut core = self.lock();
        core.log.expire(now);
        let config = core.log.config().clone();
        ReplayWindow {
            epoch: core.epoch,
            last_seq: core.last_seq,
            events: core.log.len(),
            bytes: core.log.bytes(),
            oldest_seq: core.log.oldest(),
            oldest_age: core.log.oldest_published_at().map(|at| now.saturating_duration_since(at)),
            evicted_through: core.log.evicted_through(),
            capacity: config.capacity,
            max_bytes: config.max_bytes,
            max_age: config.max_age,
        }
    }

    /// Looks event `id` up in the replay log.
    pub fn find_event(&self, id: EventId) -> EventLookup {
        let now = Instant::now();
        let mut core = self.lock();
        core.log.expire(now);
        if id.epoch != core.epoch {
            return EventLookup::OtherEpoch;
        }
        if id.seq > core.last_seq {
            return EventLookup::NotYet;
        }
        match core.log.get(id.seq) {
            Some(logged) => EventLookup::Found(logged.clone()),
            None if id.seq <= core.log.evicted_through() => EventLookup::Evicted,
            None => EventLookup::Absent,
        }
    }

    /// The retained values of `subject` itself (not of its groups or topics), by event name.
    pub fn retained_of(&self, subject: &Subject) -> Vec<RetainedView> {
        let mut core = self.lock();
        core.retained.expire(SystemTime::now());
        core.retained.of_scope(&subject.scope())
    }

    /// Up to `limit` events published to exactly `target` with a sequence number above
    /// `after`, oldest first, and whether some after it were evicted unread.
    pub fn events_after(&self, target: &Target, after: u64, limit: usize) -> Tail {
        let now = Instant::now();
        let mut core = self.lock();
        core.log.expire(now);
        let gap = after < core.log.evicted_through();
        let (events, position) = core.log.after(target, after, limit);
        Tail { events, gap, position: position.unwrap_or(core.last_seq).max(after), epoch: core.epoch }
    }
}
