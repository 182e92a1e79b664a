//! The in-process router: which connections receive which event, in one order for everyone.
//!
//! Transport-free (no tonic, axum or prost here). One std `Mutex` guards the tables and the
//! sequence counter; it is held for microseconds and never across an `.await`. Publishing
//! assigns the next sequence number and queues the shared frame into every addressed mailbox
//! under that lock, so every connection sees events in sequence order. Queuing never waits: a
//! full mailbox means a slow consumer, which is cut off (it can reconnect and resume).
//!
//! Every event is also appended to the replay log under the same lock, and a resuming
//! connection is filled from the log and registered for live events in one critical section:
//! nothing published meanwhile can fall between the two, or arrive twice.

mod mailbox;
mod replay;
mod state;

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use mailbox::{Drained, Frame, Mailbox, Push};
pub use replay::ReplayConfig;
use replay::{Gap, ReplayLog};
use state::{Conn, Tables};

use crate::{
    domain::{Event, EventId, EventName, GroupId, Target, Topic, UserId},
    event_stream,
};

/// Identifies one connection inside this process.
pub type ConnId = u64;

/// Why a connection's stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client went away (or the HTTP connection failed).
    ClientLeft,
    /// Its queue filled up: it did not read fast enough.
    SlowConsumer,
    /// A `Disconnect` call closed it.
    Disconnected,
    /// It reached its maximum lifetime (clients then reconnect, possibly to another replica).
    Lifetime,
    /// The credential it was opened with expired (clients reconnect with a fresh one).
    TokenExpired,
    /// The server is shutting down.
    Shutdown,
}

impl CloseReason {
    pub const ALL: [CloseReason; 6] = [
        CloseReason::ClientLeft,
        CloseReason::SlowConsumer,
        CloseReason::Disconnected,
        CloseReason::Lifetime,
        CloseReason::TokenExpired,
        CloseReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientLeft => "client_left",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Disconnected => "disconnected",
            CloseReason::Lifetime => "lifetime",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Settings of the router.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Frames a connection may have queued before it counts as a slow consumer.
    pub queue_capacity: usize,
    /// The epoch of event ids; `None` draws a random one (a fresh sequence per process).
    pub epoch: Option<u64>,
    /// Bounds of the replay log that serves `Last-Event-ID` resumes.
    pub replay: ReplayConfig,
    /// Most connections at once; more are refused.
    pub max_connections: usize,
    /// Most connections of one user at once; more are refused.
    pub max_connections_per_user: usize,
}

impl RouterConfig {
    /// A configuration with the given queue capacity and generous limits (for tests).
    pub fn with_queue_capacity(queue_capacity: usize) -> Self {
        Self {
            queue_capacity,
            epoch: None,
            replay: ReplayConfig {
                capacity: 10_000,
                max_bytes: 64 << 20,
                max_age: std::time::Duration::from_secs(300),
            },
            max_connections: usize::MAX,
            max_connections_per_user: usize::MAX,
        }
    }
}

/// Who a new connection is and what it joins; validated by the caller.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub user: UserId,
    pub groups: Vec<GroupId>,
    pub topics: Vec<Topic>,
    /// Cancelled to tear the transport down when the connection is cut off.
    pub abort: Option<CancellationToken>,
    /// The id of the last event the client saw (`Last-Event-ID`), to resume after it.
    pub resume: Option<EventId>,
}

/// How a new connection's stream begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// No `Last-Event-ID`: live events from now on.
    Fresh,
    /// Resumed: this many missed events were queued ahead of the live ones.
    Resumed { replayed: usize },
    /// The resume could not be served; the client was sent an `ssegate.missed` event.
    Missed(MissReason),
}

/// Why a `Last-Event-ID` could not be resumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissReason {
    /// Events after it were evicted from the replay log (too old, or the log was full).
    Expired,
    /// It names an event this server has not published (a later sequence number).
    Unknown,
    /// It is from another epoch: an earlier process, or a server without a shared log.
    OtherEpoch,
}

impl MissReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MissReason::Expired => "expired",
            MissReason::Unknown => "unknown",
            MissReason::OtherEpoch => "other_epoch",
        }
    }
}

/// The router refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the server is at its limit of {limit} connections (--max-connections); retry later")]
    TooManyConnections { limit: usize },
    #[error("this user already has {limit} connections, the limit (--max-connections-per-user)")]
    TooManyForUser { limit: usize },
}

/// A publish that was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: EventId,
    /// Connections the event was queued for.
    pub recipients: u64,
}

/// Presence of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPresence {
    pub user: UserId,
    pub connections: u64,
}

/// A snapshot of the router's gauges and counters (serializable: replicas exchange it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Events published, by target kind (indexed like `TARGET_KINDS`).
    pub published_by_target: [u64; 4],
    /// Connections that came with a `Last-Event-ID`, by outcome (indexed like
    /// `RESUME_OUTCOMES`).
    pub resumes_by_outcome: [u64; 4],
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    opened: AtomicU64,
    replayed: AtomicU64,
    missed: AtomicU64,
    rejected: AtomicU64,
    /// Indexed like `TARGET_KINDS`.
    published_by_target: [AtomicU64; 4],
    /// Indexed like `RESUME_OUTCOMES`.
    resumes: [AtomicU64; 4],
}

/// Names of target kinds, in the order of `Stats::published_by_target`.
pub const TARGET_KINDS: [&str; 4] = ["user", "group", "topic", "broadcast"];
/// Names of resume outcomes, in the order of `Stats::resumes_by_outcome`.
pub const RESUME_OUTCOMES: [&str; 4] = ["resumed", "expired", "unknown", "other_epoch"];

fn target_index(target: &Target) -> usize {
    match target {
        Target::Users(_) => 0,
        Target::Group(_) => 1,
        Target::Topic(_) => 2,
        Target::Broadcast => 3,
    }
}

struct Locked {
    tables: Tables,
    next_conn: ConnId,
    /// The sequence number of the last event published; ids are `(epoch, last_seq)`.
    last_seq: u64,
    log: ReplayLog,
    /// Set by `close_all`: new connections and publishes are refused from then on.
    closing: bool,
}

pub struct Router {
    locked: Mutex<Locked>,
    epoch: u64,
    queue_capacity: usize,
    max_connections: usize,
    max_connections_per_user: usize,
    counters: Counters,
    started: Instant,
}

/// A live connection's hold on the router. Dropping it (the HTTP body ends or is dropped)
/// removes the connection from every table.
pub struct Registration {
    router: Arc<Router>,
    id: ConnId,
    mailbox: Arc<Mailbox>,
    start: Start,
}

impl Registration {
    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn start(&self) -> Start {
        self.start
    }

    /// Ends this connection's stream gracefully: what is queued still goes out, nothing new
    /// is queued. The client may resume from its last id.
    pub fn close(&self, reason: CloseReason) {
        self.router.remove(self.id, reason);
        self.mailbox.close(reason, None);
    }

    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    pub fn router(&self) -> &Router {
        &self.router
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.router.remove(self.id, CloseReason::ClientLeft);
        // Frames the client never got count as dropped (zero after a graceful close).
        let left = self.mailbox.discard();
        self.router.counters.dropped.fetch_add(left as u64, Relaxed);
    }
}

impl Router {
    pub fn new(config: RouterConfig) -> Arc<Self> {
        Arc::new(Self {
            locked: Mutex::new(Locked {
                tables: Tables::default(),
                next_conn: 0,
                last_seq: 0,
                log: ReplayLog::new(config.replay),
                closing: false,
            }),
            epoch: config.epoch.unwrap_or_else(|| fastrand::u64(1..)),
            queue_capacity: config.queue_capacity,
            max_connections: config.max_connections,
            max_connections_per_user: config.max_connections_per_user,
            counters: Counters::default(),
            started: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Locked> {
        // Every critical section leaves the tables consistent before anything can panic, so a
        // poisoned lock is safe to keep using.
        self.locked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time since the router was created.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The epoch of the ids this router assigns.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number of the last event published.
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Whether `close_all` has begun (publishes are refused).
    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Records that sequence numbers up to `seq` are taken without an event (a broker message
    /// that could not be decoded), so later ones still flow.
    pub fn skip_to(&self, seq: u64) {
        let mut locked = self.lock();
        locked.last_seq = locked.last_seq.max(seq);
    }

    /// Registers a connection. Its mailbox receives every event published to its user, groups,
    /// topics and to everyone from now on. With `resume`, the events it missed since that id
    /// are queued first (or an `ssegate.missed` event if the log cannot tell), in the same
    /// critical section, so the handoff from replay to live has no gap and no duplicate. Then
    /// an `id:` line without data sets the client's last event id to the newest one, so that a
    /// reconnect resumes from here even if no event arrives before it.
    pub fn subscribe(self: &Arc<Self>, sub: Subscription) -> Result<Registration, RouterError> {
        let Subscription { user, mut groups, mut topics, abort, resume } = sub;
        groups.sort_unstable();
        groups.dedup();
        topics.sort_unstable();
        topics.dedup();
        let mailbox = Arc::new(Mailbox::new(self.queue_capacity, abort));
        let mut locked = self.lock();
        if let Err(e) = self.admit(&locked, &user) {
            drop(locked);
            self.counters.rejected.fetch_add(1, Relaxed);
            return Err(e);
        }
        let now = Instant::now();
        locked.log.expire(now);
        let newest = EventId { epoch: self.epoch, seq: locked.last_seq };
        let (start, mut preload) = match resume {
            None => (Start::Fresh, Vec::new()),
            Some(last) if last.epoch != self.epoch => (Start::Missed(MissReason::OtherEpoch), Vec::new()),
            Some(last) if last.seq > newest.seq => (Start::Missed(MissReason::Unknown), Vec::new()),
            Some(last) => match locked.log.missed(last.seq, &user, &groups, &topics) {
                Ok(frames) => {
                    let frames: Vec<Frame> = frames.cloned().collect();
                    (Start::Resumed { replayed: frames.len() }, frames)
                }
                Err(Gap::Expired) => (Start::Missed(MissReason::Expired), Vec::new()),
            },
        };
        if let (Start::Missed(reason), Some(last)) = (start, resume) {
            preload.push(missed_frame(reason, last, now));
        }
        preload.push(Frame { bytes: event_stream::cursor(newest), published_at: now, is_event: false });
        mailbox.preload(preload);
        locked.next_conn += 1;
        let id = locked.next_conn;
        locked.tables.insert(id, Conn { mailbox: mailbox.clone(), user, groups, topics });
        drop(locked);
        self.counters.opened.fetch_add(1, Relaxed);
        let outcome = match start {
            Start::Fresh => None,
            Start::Resumed { replayed } => {
                self.counters.replayed.fetch_add(replayed as u64, Relaxed);
                Some(0)
            }
            Start::Missed(reason) => {
                self.counters.missed.fetch_add(1, Relaxed);
                Some(match reason {
                    MissReason::Expired => 1,
                    MissReason::Unknown => 2,
                    MissReason::OtherEpoch => 3,
                })
            }
        };
        if let Some(i) = outcome {
            self.counters.resumes[i].fetch_add(1, Relaxed);
        }
        Ok(Registration { router: self.clone(), id, mailbox, start })
    }

    /// Whether one more connection of `user` may open now.
    fn admit(&self, locked: &Locked, user: &UserId) -> Result<(), RouterError> {
        if locked.closing {
            return Err(RouterError::ShuttingDown);
        }
        if locked.tables.conns.len() >= self.max_connections {
            return Err(RouterError::TooManyConnections { limit: self.max_connections });
        }
        if Tables::count(&locked.tables.users, user) >= self.max_connections_per_user as u64 {
            return Err(RouterError::TooManyForUser { limit: self.max_connections_per_user });
        }
        Ok(())
    }

    /// Publishes an event: assigns its id and queues it for every addressed connection. Never
    /// waits on a subscriber; connections whose queue is full are cut off.
    pub fn publish(&self, target: Target, event: &Event) -> Result<Published, RouterError> {
        // Encode outside the lock; only the id is appended under it.
        let partial = event_stream::encode(event.name.as_ref().map(EventName::as_str), &event.data);
        let locked = self.lock();
        if locked.closing {
            return Err(RouterError::ShuttingDown);
        }
        let seq = locked.last_seq + 1;
        Ok(self.fan_out(locked, seq, target, partial))
    }

    /// Publishes an event whose sequence number a broker assigned (the NATS backplane): the
    /// same event gets the same id on every replica. A sequence number not above the last one
    /// is a redelivery and is ignored (`None`), so a browser never gets an event twice.
    pub fn publish_sequenced(&self, seq: u64, target: Target, event: &Event) -> Option<Published> {
        let partial = event_stream::encode(event.name.as_ref().map(EventName::as_str), &event.data);
        let locked = self.lock();
        if seq <= locked.last_seq {
            return None;
        }
        Some(self.fan_out(locked, seq, target, partial))
    }

    /// Under the lock: makes `seq` the last sequence number, queues the event's frame for every
    /// connection `target` addresses, cuts off the full ones, and logs it for replay.
    fn fan_out(
        &self,
        mut locked: MutexGuard<'_, Locked>,
        seq: u64,
        target: Target,
        partial: event_stream::PartialEvent,
    ) -> Published {
        let published_at = Instant::now();
        let kind = target_index(&target);
        let mut slow = Vec::new();
        let mut recipients = 0;
        locked.last_seq = seq;
        let id = EventId { epoch: self.epoch, seq };
        let frame = Frame { bytes: partial.finish(id), published_at, is_event: true };
        locked.tables.for_each_target(&target, |conn, mailbox| match mailbox.push(frame.clone()) {
            Push::Queued => recipients += 1,
            Push::Full => slow.push(conn),
            Push::Closed => {}
        });
        for conn in slow {
            Self::cut_off(&mut locked, &self.counters, conn);
        }
        locked.log.push(id.seq, target, frame);
        locked.log.expire(published_at);
        drop(locked);
        self.counters.published.fetch_add(1, Relaxed);
        self.counters.published_by_target[kind].fetch_add(1, Relaxed);
        Published { id, recipients }
    }

    /// Removes a slow consumer and tears its connection down; the frame that did not fit and
    /// everything queued count as dropped.
    fn cut_off(locked: &mut Locked, counters: &Counters, id: ConnId) {
        if let Some(conn) = locked.tables.remove(id) {
            let dropped = conn.mailbox.abort(CloseReason::SlowConsumer) + 1;
            counters.dropped.fetch_add(dropped as u64, Relaxed);
            tracing::warn!(conn = id, user = %conn.user, dropped, "slow consumer cut off: its queue was full");
        }
    }

    /// Removes a connection from every table (no-op if it is gone already).
    fn remove(&self, id: ConnId, reason: CloseReason) -> Option<Arc<Mailbox>> {
        let conn = self.lock().tables.remove(id)?;
        tracing::debug!(conn = id, user = %conn.user, reason = reason.as_str(), "connection removed");
        Some(conn.mailbox)
    }

    /// Closes every connection of `user`: each receives a final `ssegate.disconnect` event with
    /// `reason` as data, then its stream ends. Returns how many were closed.
    pub fn disconnect(&self, user: &UserId, reason: &str) -> u64 {
        let name = EventName::reserved("disconnect");
        let last = Frame {
            bytes: event_stream::encode(Some(name.as_str()), reason).finish_without_id(),
            published_at: Instant::now(),
            is_event: false,
        };
        let mut locked = self.lock();
        let ids: Vec<ConnId> = locked.tables.users.get(user).map(|m| m.keys().copied().collect()).unwrap_or_default();
        for id in &ids {
            if let Some(conn) = locked.tables.remove(*id) {
                conn.mailbox.close(CloseReason::Disconnected, Some(last.clone()));
            }
        }
        drop(locked);
        tracing::info!(user = %user, closed = ids.len(), "user disconnected");
        ids.len() as u64
    }

    /// Refuses new connections and publishes from now on, and closes every connection after
    /// queuing the frame `last` makes for it. Returns how many were closed.
    pub fn close_all(&self, reason: CloseReason, mut last: impl FnMut() -> Option<Bytes>) -> usize {
        let mut locked = self.lock();
        locked.closing = true;
        let conns = std::mem::take(&mut locked.tables);
        drop(locked);
        let now = Instant::now();
        for conn in conns.conns.values() {
            let frame = last().map(|bytes| Frame { bytes, published_at: now, is_event: false });
            conn.mailbox.close(reason, frame);
        }
        conns.conns.len()
    }

    /// Queues `frame` as a heartbeat on every connection in heartbeat slot `slot` of `slots`
    /// that had nothing queued since its previous heartbeat. Spreading connections over slots
    /// spreads the wake-ups over the interval instead of waking everyone at once.
    pub fn heartbeat(&self, slot: u64, slots: u64, frame: &Frame) {
        let mailboxes: Vec<(ConnId, Arc<Mailbox>)> = {
            let locked = self.lock();
            locked
                .tables
                .conns
                .iter()
                .filter(|(id, _)| *id % slots.max(1) == slot)
                .map(|(id, c)| (*id, c.mailbox.clone()))
                .collect()
        };
        let slow: Vec<ConnId> =
            mailboxes.iter().filter(|(_, mb)| mb.heartbeat(frame) == Some(Push::Full)).map(|(id, _)| *id).collect();
        if !slow.is_empty() {
            let mut locked = self.lock();
            for id in slow {
                Self::cut_off(&mut locked, &self.counters, id);
            }
        }
    }

    /// Evicts replay-log events past their maximum age (also done on every publish).
    pub fn expire_replay(&self) {
        self.lock().log.expire(Instant::now());
    }

    /// Counts frames handed to a connection's socket.
    pub fn record_delivered(&self, frames: u64) {
        self.counters.delivered.fetch_add(frames, Relaxed);
    }

    /// How many connections each user has (0 when offline), in the order asked.
    pub fn user_presence(&self, users: &[UserId]) -> Vec<UserPresence> {
        let locked = self.lock();
        users
            .iter()
            .map(|u| UserPresence { user: u.clone(), connections: Tables::count(&locked.tables.users, u) })
            .collect()
    }

    pub fn group_connections(&self, groups: &[GroupId]) -> Vec<u64> {
        let locked = self.lock();
        groups.iter().map(|g| Tables::count(&locked.tables.groups, g)).collect()
    }

    pub fn topic_connections(&self, topics: &[Topic]) -> Vec<u64> {
        let locked = self.lock();
        topics.iter().map(|t| Tables::count(&locked.tables.topics, t)).collect()
    }

    /// Online users sorted by id, after `after` (exclusive), at most `limit`; and whether more
    /// remain.
    pub fn online_users(&self, after: Option<&str>, limit: usize) -> (Vec<UserId>, bool) {
        let mut ids: Vec<UserId> = {
            let locked = self.lock();
            let after = after.unwrap_or("");
            locked.tables.users.keys().filter(|u| u.as_str() > after).cloned().collect()
        };
        ids.sort_unstable();
        let more = ids.len() > limit;
        ids.truncate(limit);
        (ids, more)
    }

    pub fn stats(&self) -> Stats {
        let (connections, users, groups, topics, log_events, log_bytes) = {
            let l = self.lock();
            let t = &l.tables;
            (t.conns.len(), t.users.len(), t.groups.len(), t.topics.len(), l.log.len(), l.log.bytes())
        };
        Stats {
            connections: connections as u64,
            users: users as u64,
            groups: groups as u64,
            topics: topics as u64,
            events_published: self.counters.published.load(Relaxed),
            events_delivered: self.counters.delivered.load(Relaxed),
            events_dropped: self.counters.dropped.load(Relaxed),
            connections_opened: self.counters.opened.load(Relaxed),
            events_replayed: self.counters.replayed.load(Relaxed),
            resumes_missed: self.counters.missed.load(Relaxed),
            connections_rejected: self.counters.rejected.load(Relaxed),
            replay_log_events: log_events as u64,
            replay_log_bytes: log_bytes as u64,
            published_by_target: std::array::from_fn(|i| self.counters.published_by_target[i].load(Relaxed)),
            resumes_by_outcome: std::array::from_fn(|i| self.counters.resumes[i].load(Relaxed)),
        }
    }
}

/// The `ssegate.missed` event: `last` could not be resumed from, so the client may have
/// missed events and should refetch its state. Its data is a small JSON object.
fn missed_frame(reason: MissReason, last: EventId, now: Instant) -> Frame {
    // Both values are from fixed alphabets (a reason name; hex, digits and `-`), so they need
    // no JSON escaping.
    let data = format!(r#"{{"reason":"{}","last_event_id":"{last}"}}"#, reason.as_str());
    let name = EventName::reserved("missed");
    Frame {
        bytes: event_stream::encode(Some(name.as_str()), &data).finish_without_id(),
        published_at: now,
        is_event: false,
    }
}

#[cfg(test)]
mod tests;
