//! The router's core: what must be one order for everyone. Under one std `Mutex`, held for
//! microseconds (no fan-out, no syscall, no logging inside): the sequence counter, the replay
//! log, the closing flag, and the connection counts per user, group and topic (admission
//! limits, Presence, Stats and `recipients` read them), the retained events. Publishing
//! (`publish.rs`), subscribing (`subscribe.rs`), Disconnect and close-all hand their command to
//! the shards' inboxes inside this critical section, so every shard sees one order: the order
//! of ids.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, MutexGuard},
    time::{Instant, SystemTime},
};

use bytes::Bytes;

use super::{
    CloseReason, ConnId, Router,
    mailbox::Frame,
    replay::{Logged, ReplayLog},
    retained::{Retained, RetainedEntry},
    shard::Cmd,
};
use crate::domain::{EventId, GroupId, Target, Topic, UserId};

/// A page of a target's history (`Router::history`).
pub struct History {
    /// Newest first.
    pub events: Vec<Arc<Logged>>,
    /// Older events of the target remain in the log.
    pub more: bool,
    /// The stream's position as the page was read.
    pub position: EventId,
    /// The log has evicted events (for its bounds) since the process started.
    pub evicted: bool,
}

pub(super) struct Core {
    /// The epoch of the ids assigned now: fixed for the memory backplane; the stream's identity
    /// with a broker, changed by `Router::rebase` when the stream is recreated.
    pub(super) epoch: u64,
    /// The sequence number of the last event published; ids are `(epoch, last_seq)`.
    pub(super) last_seq: u64,
    pub(super) log: ReplayLog,
    /// The retained events (`retained.rs`).
    pub(super) retained: Retained,
    /// Set by `close_all`: new connections and publishes are refused from then on.
    pub(super) closing: bool,
    /// Connections registered with a resume id ahead of `last_seq` (a shared sequence) that the
    /// broker has not yet confirmed exist (`Router::settle_ahead`).
    pub(super) ahead: Vec<Ahead>,
    next_conn: ConnId,
    connections: u64,
    users: HashMap<UserId, u64>,
    groups: HashMap<GroupId, u64>,
    topics: HashMap<Topic, u64>,
    /// Users whose count went from 0 to 1 or to 0 since the presence hub last took them
    /// (`Router::take_presence_changes`), each with (a first stream opened meanwhile, has a
    /// stream now): kept up to date here so that taking them is one swap. `None` until a hub
    /// tracks presence, so that a router nobody watches keeps nothing. Bounded by the users that
    /// changed meanwhile.
    pub(super) presence: Option<HashMap<UserId, (bool, bool)>>,
    /// A change was recorded since the last `take_presence_signal`: wake the hub, after the lock.
    presence_signal: bool,
}

/// A connection that resumed after an id this router has not received yet: either an event of
/// the shared stream still on its way to this replica, or an id the stream never issued. Kept
/// (with what its `ssegate.missed` would need) until a stream position read after it
/// registered tells which (`Router::settle_ahead`).
pub(super) struct Ahead {
    pub conn: ConnId,
    pub shard: usize,
    pub resume: EventId,
    pub user: UserId,
    pub groups: Box<[GroupId]>,
    pub topics: Box<[Topic]>,
}

/// Gauges read for `Stats`.
pub(super) struct Gauges {
    pub connections: u64,
    pub users: u64,
    pub groups: u64,
    pub topics: u64,
    pub log_events: u64,
    pub log_bytes: u64,
    pub retained_values: u64,
    pub retained_bytes: u64,
}

fn add<K: Hash + Eq + Clone>(map: &mut HashMap<K, u64>, key: &K) {
    *map.entry(key.clone()).or_default() += 1;
}

fn sub<K: Hash + Eq>(map: &mut HashMap<K, u64>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Core {
    pub fn new(epoch: u64, log: ReplayLog, retained: Retained) -> Self {
        Self {
            epoch,
            last_seq: 0,
            log,
            retained,
            closing: false,
            ahead: Vec::new(),
            next_conn: 0,
            connections: 0,
            users: HashMap::new(),
            groups: HashMap::new(),
            topics: HashMap::new(),
            presence: None,
            presence_signal: false,
        }
    }

    /// Counts a new connection in; returns its id.
    pub fn join(&mut self, user: &UserId, groups: &[GroupId], topics: &[Topic]) -> ConnId {
        self.next_conn += 1;
        self.connections += 1;
        add(&mut self.users, user);
        if let Some(changes) = &mut self.presence
            && self.users.get(user) == Some(&1)
        {
            // The user's first stream here: remembered as opened even if it closes before the
            // hub looks, so a short visit is still seen.
            changes.insert(user.clone(), (true, true));
            self.presence_signal = true;
        }
        groups.iter().for_each(|g| add(&mut self.groups, g));
        topics.iter().for_each(|t| add(&mut self.topics, t));
        self.next_conn
    }

    /// The id of the connection registered last (ids increase).
    pub fn last_conn(&self) -> ConnId {
        self.next_conn
    }

    /// Open connections.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// Takes a connection its shard removed off the counts.
    pub fn leave(&mut self, user: &UserId, groups: &[GroupId], topics: &[Topic]) {
        self.connections -= 1;
        sub(&mut self.users, user);
        if let Some(changes) = &mut self.presence
            && !self.users.contains_key(user)
        {
            changes.entry(user.clone()).or_insert((false, false)).1 = false;
            self.presence_signal = true;
        }
        groups.iter().for_each(|g| sub(&mut self.groups, g));
        topics.iter().for_each(|t| sub(&mut self.topics, t));
    }

    /// Whether a presence change was recorded since the last call (the caller wakes the hub
    /// once it has let go of the lock).
    pub fn take_presence_signal(&mut self) -> bool {
        std::mem::take(&mut self.presence_signal)
    }

    pub fn user_count(&self, user: &UserId) -> u64 {
        self.users.get(user).copied().unwrap_or(0)
    }

    pub fn group_count(&self, group: &GroupId) -> u64 {
        self.groups.get(group).copied().unwrap_or(0)
    }

    pub fn topic_count(&self, topic: &Topic) -> u64 {
        self.topics.get(topic).copied().unwrap_or(0)
    }

    pub fn users_after(&self, after: &str) -> Vec<UserId> {
        self.users.keys().filter(|u| u.as_str() > after).cloned().collect()
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            connections: self.connections,
            users: self.users.len() as u64,
            groups: self.groups.len() as u64,
            topics: self.topics.len() as u64,
            log_events: self.log.len() as u64,
            log_bytes: self.log.bytes() as u64,
            retained_values: self.retained.len() as u64,
            retained_bytes: self.retained.bytes() as u64,
        }
    }

    /// Connections `target` addresses now: the ones its shards will queue it for.
    pub(super) fn recipients(&self, target: &Target) -> u64 {
        match target {
            Target::Users(users) => users.iter().map(|u| self.user_count(u)).sum(),
            Target::Group(g) => self.group_count(g),
            Target::Topic(t) => self.topic_count(t),
            Target::Broadcast => self.connections,
        }
    }
}

impl Router {
    pub(super) fn lock(&self) -> MutexGuard<'_, Core> {
        // Every critical section leaves the core consistent before anything can panic, so a
        // poisoned lock is safe to keep using.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sequence number of the last event published.
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// The epoch of the ids this router assigns now (it changes only by `rebase`).
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Whether `close_all` has begun (publishes are refused).
    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Records that sequence numbers up to `seq` are taken without an event (a broker message
    /// that could not be decoded), so later ones still flow.
    pub fn skip_to(&self, seq: u64) {
        let mut core = self.lock();
        core.last_seq = core.last_seq.max(seq);
    }

    /// The newest sequence number the replay log evicted (0 if none): a resume from before it
    /// gets `ssegate.missed`.
    pub fn replay_evicted_through(&self) -> u64 {
        let now = Instant::now();
        let mut core = self.lock();
        core.log.expire(now);
        core.log.evicted_through()
    }

    /// The oldest sequence number the replay log still holds (the last + 1 when it holds
    /// nothing): records below it serve no resume.
    pub fn replay_floor(&self) -> u64 {
        let now = Instant::now();
        let mut core = self.lock();
        core.log.expire(now);
        core.log.oldest().unwrap_or(core.last_seq + 1)
    }

    /// For a checkpoint of the data dir, in one critical section: the last sequence number,
    /// the oldest one the replay log still needs (the last + 1 when it holds nothing: records
    /// below it serve no resume) and every live retained value, all as of that number.
    pub fn checkpoint_state(&self) -> (u64, u64, Vec<RetainedEntry>) {
        let now = Instant::now();
        let mut core = self.lock();
        core.log.expire(now);
        let last = core.last_seq;
        let floor = core.log.oldest().unwrap_or(last + 1);
        (last, floor, core.retained.entries(SystemTime::now()))
    }

    /// At start, before any connection: puts back the retained values of a checkpoint (a later
    /// event, restored after, replaces them as usual), and counts every event up to
    /// `forgotten_through` as evicted (the data dir no longer holds them).
    pub fn restore_checkpoint(&self, values: Vec<RetainedEntry>, forgotten_through: u64) {
        let mut core = self.lock();
        for v in values {
            core.retained.restore(v);
        }
        core.log.forget_through(forgotten_through);
    }

    /// A page of the history of `target` from the replay log (`ReplayLog::history`), with the
    /// stream's position and whether the log has evicted anything, read in one critical
    /// section: a stream opened after the position gets exactly what came after this page.
    pub fn history(&self, target: &Target, before: Option<u64>, limit: usize) -> History {
        let now = Instant::now();
        let mut core = self.lock();
        core.log.expire(now);
        let (events, more) = core.log.history(target, before.unwrap_or(u64::MAX), limit);
        History {
            events,
            more,
            position: EventId { epoch: core.epoch, seq: core.last_seq },
            evicted: core.log.evicted_through() > 0,
        }
    }

    /// Evicts replay-log events past their maximum age (also done on every publish), and
    /// retained events past their time to live.
    pub fn expire_replay(&self) {
        let mut core = self.lock();
        core.log.expire(Instant::now());
        core.retained.expire(SystemTime::now());
    }

    /// Closes every connection of `user`: each receives a final `ssegate.disconnect` event with
    /// `reason` as data, then its stream ends. Returns how many were closed.
    pub fn disconnect(&self, user: &UserId, reason: &str) -> u64 {
        let last = Frame::disconnect(reason);
        let shard = self.shard_of(user);
        let core = self.lock();
        let closed = core.user_count(user);
        if closed > 0 {
            self.shards[shard].submit(Cmd::Disconnect(user.clone(), last));
        }
        drop(core);
        self.run_shard(shard);
        tracing::info!(user = %user, closed, "user disconnected");
        closed
    }

    /// Refuses new connections and publishes from now on, and closes every connection after
    /// queuing the frame `last` makes for it. Returns how many were closed.
    pub fn close_all(&self, reason: CloseReason, last: impl Fn() -> Option<Bytes> + Send + Sync + 'static) -> usize {
        let last: super::shard::LastFrame = Arc::new(last);
        let mut core = self.lock();
        core.closing = true;
        let closed = core.connections;
        for shard in self.shards.iter() {
            shard.submit(Cmd::CloseAll(reason, last.clone()));
        }
        drop(core);
        for i in 0..self.shards.len() {
            self.run_shard(i);
        }
        closed as usize
    }
}
