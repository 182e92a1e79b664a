//! The in-process router: which connections receive which event, in one order for everyone.
//!
//! Transport-free (no tonic, axum or prost here). One std `Mutex` guards the tables and the
//! sequence counter; it is held for microseconds and never across an `.await`. Publishing
//! assigns the next sequence number and queues the shared frame into every addressed mailbox
//! under that lock, so every connection sees events in sequence order. Queuing never waits: a
//! full mailbox means a slow consumer, which is cut off (it can reconnect and resume).

mod mailbox;
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
    /// The server is shutting down.
    Shutdown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientLeft => "client_left",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Disconnected => "disconnected",
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
}

/// Who a new connection is and what it joins; validated by the caller.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub user: UserId,
    pub groups: Vec<GroupId>,
    pub topics: Vec<Topic>,
    /// Cancelled to tear the transport down when the connection is cut off.
    pub abort: Option<CancellationToken>,
}

/// The router refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("the server is shutting down")]
    ShuttingDown,
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
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    opened: AtomicU64,
}

struct Locked {
    tables: Tables,
    next_conn: ConnId,
    /// The sequence number of the last event published; ids are `(epoch, last_seq)`.
    last_seq: u64,
    /// Set by `close_all`: new connections and publishes are refused from then on.
    closing: bool,
}

pub struct Router {
    locked: Mutex<Locked>,
    epoch: u64,
    queue_capacity: usize,
    counters: Counters,
    started: Instant,
}

/// A live connection's hold on the router. Dropping it (the HTTP body ends or is dropped)
/// removes the connection from every table.
pub struct Registration {
    router: Arc<Router>,
    id: ConnId,
    mailbox: Arc<Mailbox>,
}

impl Registration {
    pub fn id(&self) -> ConnId {
        self.id
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
            locked: Mutex::new(Locked { tables: Tables::default(), next_conn: 0, last_seq: 0, closing: false }),
            epoch: config.epoch.unwrap_or_else(|| fastrand::u64(1..)),
            queue_capacity: config.queue_capacity,
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

    /// Registers a connection. Its mailbox receives every event published to its user, groups,
    /// topics and to everyone from now on.
    pub fn subscribe(self: &Arc<Self>, sub: Subscription) -> Result<Registration, RouterError> {
        let mailbox = Arc::new(Mailbox::new(self.queue_capacity, sub.abort));
        let mut locked = self.lock();
        if locked.closing {
            return Err(RouterError::ShuttingDown);
        }
        locked.next_conn += 1;
        let id = locked.next_conn;
        let conn = Conn { mailbox: mailbox.clone(), user: sub.user, groups: sub.groups, topics: sub.topics };
        locked.tables.insert(id, conn);
        drop(locked);
        self.counters.opened.fetch_add(1, Relaxed);
        Ok(Registration { router: self.clone(), id, mailbox })
    }

    /// Publishes an event: assigns its id and queues it for every addressed connection. Never
    /// waits on a subscriber; connections whose queue is full are cut off.
    pub fn publish(&self, target: &Target, event: &Event) -> Result<Published, RouterError> {
        // Encode outside the lock; only the id is appended under it.
        let partial = event_stream::encode(event.name.as_ref().map(EventName::as_str), &event.data);
        let published_at = Instant::now();
        let mut slow = Vec::new();
        let mut recipients = 0;
        let mut locked = self.lock();
        if locked.closing {
            return Err(RouterError::ShuttingDown);
        }
        locked.last_seq += 1;
        let id = EventId { epoch: self.epoch, seq: locked.last_seq };
        let frame = Frame { bytes: partial.finish(id), published_at, is_event: true };
        locked.tables.for_each_target(target, |conn, mailbox| match mailbox.push(frame.clone()) {
            Push::Queued => recipients += 1,
            Push::Full => slow.push(conn),
            Push::Closed => {}
        });
        for conn in slow {
            Self::cut_off(&mut locked, &self.counters, conn);
        }
        drop(locked);
        self.counters.published.fetch_add(1, Relaxed);
        Ok(Published { id, recipients })
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
        let (connections, users, groups, topics) = {
            let l = self.lock();
            let t = &l.tables;
            (t.conns.len(), t.users.len(), t.groups.len(), t.topics.len())
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
        }
    }
}

#[cfg(test)]
mod tests;
