//! The in-process router: which connections receive which event, in one order for everyone.
//!
//! Transport-free (no tonic, axum or prost here). Two levels of state:
//! - the **core** (`core.rs`, one std `Mutex`, held for microseconds): the sequence counter,
//!   the replay log, the closing flag and the connection counts that admission, Presence and
//!   Stats read. A publish takes it once to get its id, enter the log and be handed to the
//!   shards' inboxes, in that order;
//! - the **shards** (`shard.rs`): each owns its connections and their membership indexes and
//!   fans events out to their mailboxes. No lock is shared between shards, and no publisher
//!   waits for one: a shard busy fanning out applies what was handed to it meanwhile.
//!
//! A resuming connection is filled from the log and handed to its shard in the same core
//! critical section that orders events, so nothing published meanwhile can fall between replay
//! and live events, or arrive twice. Queuing never waits: a full mailbox means a slow
//! consumer, which is cut off (it can reconnect and resume).

mod core;
mod inspect;
mod mailbox;
mod partitions;
mod publish;
mod rebase;
mod registration;
mod replay;
mod retained;
mod shard;
mod stats;
mod subscribe;
mod tables;
mod timer;

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

pub use core::History;
pub use inspect::{EventLookup, ReplayWindow, RetainedView, StreamView, Subject, Tail};
pub use mailbox::{Bounds, Drained, FRAME_OVERHEAD, Frame, Mailbox, Positions, Protocol, Push, StreamMeta};
pub use partitions::{Partitions, partition_of};
pub use publish::Applied;
pub use rebase::{KeptValue, STREAM_RECREATED};
pub use registration::Registration;
pub use replay::{Logged, ReplayConfig};
pub use retained::{RetainedConfig, RetainedEntry, RetainedFull, VALUE_OVERHEAD as RETAINED_VALUE_OVERHEAD};
pub use stats::{RESUME_OUTCOMES, Stats, TARGET_KINDS};

use self::core::Core;
use shard::Shard;
use stats::Counters;
use tables::Effects;

use crate::domain::{EventId, GroupId, Topic, UserId};

/// What a connection holds while it is open, for whoever made its events reach this router
/// (`Interest::follow`); dropped after the connection unregisters.
pub type Held = Box<dyn Send + Sync>;

/// Makes the events of a user, groups and topics reach this router before a connection of theirs
/// registers: a broker backplane with interest delivery subscribes this replica to their
/// events and puts those after `after` (the connection's resume point) in the replay log.
/// Without one, the router sees every event anyway.
pub trait Interest: Send + Sync {
    fn follow<'a>(
        &'a self,
        user: Option<&'a UserId>,
        groups: &'a [GroupId],
        topics: &'a [Topic],
        after: Option<EventId>,
    ) -> Pin<Box<dyn Future<Output = Result<Held, String>> + Send + 'a>>;
}

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
    /// Bytes a connection may have queued (each frame counts its bytes plus
    /// `mailbox::FRAME_OVERHEAD`) before it counts as a slow consumer.
    pub max_queue_bytes: usize,
    /// A connection's writer is woken at most once per this window; zero wakes it on every
    /// event.
    pub write_coalesce: Duration,
    /// Connections are spread over this many shards (1 to 64).
    pub shards: usize,
    /// The epoch of event ids; `None` draws a random one (a fresh sequence per process).
    pub epoch: Option<u64>,
    /// Ids come from a sequence shared by several routers (a broker's stream): a resume id
    /// ahead of this router's newest is one it has not received yet, not an unknown one.
    pub shared_sequence: bool,
    /// Bounds of the replay log that serves `Last-Event-ID` resumes.
    pub replay: ReplayConfig,
    /// Bounds of the retained events sent to new connections.
    pub retained: RetainedConfig,
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
            max_queue_bytes: usize::MAX / 2,
            write_coalesce: Duration::ZERO,
            shards: 2,
            epoch: None,
            shared_sequence: false,
            replay: ReplayConfig { capacity: 10_000, max_bytes: 64 << 20, max_age: Duration::from_secs(300) },
            retained: RetainedConfig { max_values: 100_000, max_bytes: 64 << 20 },
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
    /// No `Last-Event-ID`: the retained events, then live events from now on.
    Fresh,
    /// Resumed: this many missed events were queued ahead of the live ones.
    Resumed { replayed: usize },
    /// The resume could not be served; the client was sent an `ssegate.missed` event, then the
    /// retained events.
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
    #[error("this stream's events cannot be followed on the broker now ({0}); retry later")]
    BrokerUnavailable(String),
}

/// The router refused a publish; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    RetainedFull(#[from] RetainedFull),
    /// The durable store did not take (or did not write) the event: its reason.
    #[error("not stored: {0}")]
    NotStored(String),
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

pub struct Router {
    core: Mutex<Core>,
    shards: Box<[Shard]>,
    shared_sequence: bool,
    /// Signalled when a connection registers with a resume id ahead of this router (a shared
    /// sequence): the backplane then reads the stream's position at once (`settle_ahead`).
    unsettled: tokio::sync::Notify,
    /// Signalled when a user's first stream opened or last closed here, once presence is
    /// tracked (`track_presence`): the presence hub then takes the changes.
    presence_changed: tokio::sync::Notify,
    bounds: Bounds,
    write_coalesce: Duration,
    max_connections: usize,
    max_connections_per_user: usize,
    counters: Counters,
    started: Instant,
    /// Set once by a backplane with interest delivery (`set_interest`).
    interest: OnceLock<Arc<dyn Interest>>,
}

impl Router {
    pub fn new(config: RouterConfig) -> Arc<Self> {
        Arc::new(Self {
            core: Mutex::new(Core::new(
                config.epoch.unwrap_or_else(|| fastrand::u64(1..)),
                replay::ReplayLog::new(config.replay),
                retained::Retained::new(config.retained),
            )),
            shards: (0..config.shards.clamp(1, 64)).map(|_| Shard::new()).collect(),
            shared_sequence: config.shared_sequence,
            unsettled: tokio::sync::Notify::new(),
            presence_changed: tokio::sync::Notify::new(),
            bounds: Bounds { frames: config.queue_capacity, bytes: config.max_queue_bytes },
            write_coalesce: config.write_coalesce,
            max_connections: config.max_connections,
            max_connections_per_user: config.max_connections_per_user,
            counters: Counters::default(),
            started: Instant::now(),
            interest: OnceLock::new(),
        })
    }

    /// Connections of a user are followed by `interest` before they register (see `Interest`).
    pub fn set_interest(&self, interest: Arc<dyn Interest>) {
        let _ = self.interest.set(interest);
    }

    /// Makes the events of `user`, `groups` and `topics` after `after` reach this router (see
    /// `Interest`), before a connection of theirs subscribes; what it returns is held by that
    /// connection (`Registration::hold`). Nothing to do without interest delivery.
    pub async fn follow(
        &self,
        user: Option<&UserId>,
        groups: &[GroupId],
        topics: &[Topic],
        after: Option<EventId>,
    ) -> Result<Option<Held>, RouterError> {
        match self.interest.get() {
            None => Ok(None),
            Some(i) => i.follow(user, groups, topics, after).await.map(Some).map_err(RouterError::BrokerUnavailable),
        }
    }

    /// Time since the router was created.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn shard_of(&self, user: &UserId) -> usize {
        shard::shard_of(user, self.shards.len())
    }

    /// Applies what was handed to shard `i` (or leaves it to the thread applying it now).
    fn run_shard(&self, i: usize) {
        self.shards[i].run(self.write_coalesce, |fx| self.finish(i, fx));
    }

    /// Does, outside every shard lock, what applying commands decided: wakes writers, aborts
    /// slow consumers, closes connections, and takes removed connections off the core counts.
    fn finish(&self, shard: usize, fx: Effects) {
        for w in fx.wakers {
            w.wake();
        }
        if fx.arm_flush {
            self.shards[shard].flush.notify_one();
        }
        if !fx.cut.is_empty() {
            let mut dropped = 0;
            for (conn, overflowed) in &fx.cut {
                dropped += conn.mailbox.abort(CloseReason::SlowConsumer) + usize::from(*overflowed);
            }
            self.counters.dropped.fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
            // One line per batch, not per connection: a storm of cut-offs must not flood the log.
            tracing::warn!(connections = fx.cut.len(), dropped, "slow consumers cut off: their queues were full");
        }
        for (conn, reason, last) in &fx.closed {
            conn.mailbox.close(*reason, last.clone());
        }
        let removed = fx.cut.iter().map(|(c, _)| c).chain(fx.closed.iter().map(|(c, ..)| c)).chain(fx.gone.iter());
        let mut removed = removed.peekable();
        if removed.peek().is_some() {
            let mut core = self.lock();
            for conn in removed {
                core.leave(&conn.user, &conn.groups, &conn.topics);
            }
            let presence_changed = core.take_presence_signal();
            drop(core);
            if presence_changed {
                self.presence_changed.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests;
