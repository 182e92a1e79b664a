//! What the router counts and reports: `Stats`, Presence and the online-user listing. Gauges
//! come from the core's counts (one short lock); counters are relaxed atomics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Router, UserPresence};
use crate::domain::{GroupId, Target, Topic, UserId};

/// A snapshot of the router's gauges and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections: u64,
    pub users: u64,
    pub groups: u64,
    pub topics: u64,
    pub events_published: u64,
    pub events_delivered: u64,
    pub events_dropped: u64,
    pub connections_opened: u64,
    /// Missed events sent to connections that resumed with `Last-Event-ID`.
    pub events_replayed: u64,
    /// Resumes that could not be served from the log (told with `ssegate.missed`).
    pub resumes_missed: u64,
    /// Connections refused by a connection limit.
    pub connections_rejected: u64,
    /// Events in the replay log now.
    pub replay_log_events: u64,
    /// Bytes of encoded events in the replay log now.
    pub replay_log_bytes: u64,
    /// Retained values now (one per target and event name).
    pub retained_values: u64,
    /// Bytes the retained values take now (each its encoded event, key and
    /// `RETAINED_VALUE_OVERHEAD`).
    pub retained_bytes: u64,
    /// Retained events sent to connections as they opened.
    pub retained_sent: u64,
    /// Events published, by target kind (indexed like `TARGET_KINDS`).
    pub published_by_target: [u64; 4],
    /// Connections that came with a `Last-Event-ID`, by outcome (indexed like
    /// `RESUME_OUTCOMES`).
    pub resumes_by_outcome: [u64; 4],
}

impl Stats {
    /// Adds `other`'s figures to these (the partitions of one replica).
    pub fn add(&mut self, other: &Stats) {
        let Stats {
            connections,
            users,
            groups,
            topics,
            events_published,
            events_delivered,
            events_dropped,
            connections_opened,
            events_replayed,
            resumes_missed,
            connections_rejected,
            replay_log_events,
            replay_log_bytes,
            retained_values,
            retained_bytes,
            retained_sent,
            published_by_target,
            resumes_by_outcome,
        } = other;
        self.connections += connections;
        self.users += users;
        self.groups += groups;
        self.topics += topics;
        self.events_published += events_published;
        self.events_delivered += events_delivered;
        self.events_dropped += events_dropped;
        self.connections_opened += connections_opened;
        self.events_replayed += events_replayed;
        self.resumes_missed += resumes_missed;
        self.connections_rejected += connections_rejected;
        self.replay_log_events += replay_log_events;
        self.replay_log_bytes += replay_log_bytes;
        self.retained_values += retained_values;
        self.retained_bytes += retained_bytes;
        self.retained_sent += retained_sent;
        for (a, b) in self.published_by_target.iter_mut().zip(published_by_target) {
            *a += b;
        }
        for (a, b) in self.resumes_by_outcome.iter_mut().zip(resumes_by_outcome) {
            *a += b;
        }
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub opened: AtomicU64,
    pub replayed: AtomicU64,
    pub missed: AtomicU64,
    pub rejected: AtomicU64,
    pub retained_sent: AtomicU64,
    /// Indexed like `TARGET_KINDS`.
    pub published_by_target: [AtomicU64; 4],
    /// Indexed like `RESUME_OUTCOMES`.
    pub resumes: [AtomicU64; 4],
}

/// Names of target kinds, in the order of `Stats::published_by_target`.
pub const TARGET_KINDS: [&str; 4] = ["user", "group", "topic", "broadcast"];
/// Names of resume outcomes, in the order of `Stats::resumes_by_outcome`.
pub const RESUME_OUTCOMES: [&str; 4] = ["resumed", "expired", "unknown", "other_epoch"];

pub(super) fn target_index(target: &Target) -> usize {
    match target {
        Target::Users(_) => 0,
        Target::Group(_) => 1,
        Target::Topic(_) => 2,
        Target::Broadcast => 3,
    }
}

impl Router {
    /// Counts frames handed to a connection's socket.
    pub fn record_delivered(&self, frames: u64) {
        self.counters.delivered.fetch_add(frames, Relaxed);
    }

    /// How many connections each user has (0 when offline), in the order asked.
    pub fn user_presence(&self, users: &[UserId]) -> Vec<UserPresence> {
        let core = self.lock();
        users.iter().map(|u| UserPresence { user: u.clone(), connections: core.user_count(u) }).collect()
    }

    pub fn group_connections(&self, groups: &[GroupId]) -> Vec<u64> {
        let core = self.lock();
        groups.iter().map(|g| core.group_count(g)).collect()
    }

    pub fn topic_connections(&self, topics: &[Topic]) -> Vec<u64> {
        let core = self.lock();
        topics.iter().map(|t| core.topic_count(t)).collect()
    }

    /// Online users sorted by id, after `after` (exclusive), at most `limit`; and whether more
    /// remain.
    pub fn online_users(&self, after: Option<&str>, limit: usize) -> (Vec<UserId>, bool) {
        let mut ids = self.lock().users_after(after.unwrap_or(""));
        ids.sort_unstable();
        let more = ids.len() > limit;
        ids.truncate(limit);
        (ids, more)
    }

    /// Starts recording which users' first stream opens or last closes here, and returns the
    /// users online now (the hub's starting point). Changes are then taken with
    /// `take_presence_changes` after `presence_changed` returns.
    pub fn track_presence(&self) -> Vec<UserId> {
        let mut core = self.lock();
        core.presence.get_or_insert_with(Default::default);
        core.users_after("")
    }

    /// Waits until a presence change was recorded (at once if one was since the last call).
    pub async fn presence_changed(&self) {
        self.presence_changed.notified().await;
    }

    /// The users whose first stream opened or last closed here since the last call: each with
    /// whether a first stream opened meanwhile, and whether the user has a stream now. One swap
    /// under the core lock, whatever their number.
    pub fn take_presence_changes(&self) -> Vec<(UserId, bool, bool)> {
        let changes = self.lock().presence.as_mut().map(std::mem::take).unwrap_or_default();
        changes.into_iter().map(|(user, (opened, online))| (user, opened, online)).collect()
    }

    pub fn stats(&self) -> Stats {
        let gauges = {
            let mut core = self.lock();
            // Gauges say what is held now: values past their time to live are gone.
            core.retained.expire(std::time::SystemTime::now());
            core.gauges()
        };
        let c = &self.counters;
        Stats {
            connections: gauges.connections,
            users: gauges.users,
            groups: gauges.groups,
            topics: gauges.topics,
            events_published: c.published.load(Relaxed),
            events_delivered: c.delivered.load(Relaxed),
            events_dropped: c.dropped.load(Relaxed),
            connections_opened: c.opened.load(Relaxed),
            events_replayed: c.replayed.load(Relaxed),
            resumes_missed: c.missed.load(Relaxed),
            connections_rejected: c.rejected.load(Relaxed),
            replay_log_events: gauges.log_events,
            replay_log_bytes: gauges.log_bytes,
            retained_values: gauges.retained_values,
            retained_bytes: gauges.retained_bytes,
            retained_sent: c.retained_sent.load(Relaxed),
            published_by_target: std::array::from_fn(|i| c.published_by_target[i].load(Relaxed)),
            resumes_by_outcome: std::array::from_fn(|i| c.resumes[i].load(Relaxed)),
        }
    }
}
