//! Who is online in the whole cluster, as transitions: `online(user)` when a user's first
//! stream anywhere opens, `offline(user)` when the user has had no stream anywhere for the
//! grace. Transport-free; `grpc` serves it as `WatchPresence`, `webhook.rs` POSTs it, and the
//! cluster link (`backplane::cluster::presence`) feeds it the other replicas' users.
//!
//! The `Hub` owns the cluster view (`view.rs`: user → replicas that have it) behind one std
//! `Mutex` held for microseconds, and the watchers, each a bounded `mpsc` fed with `try_send`
//! inside that critical section (never waiting): so every watcher gets the transitions in the
//! one order the view decided them, and a watcher that does not read is cut off, never waited
//! for. Inputs: this replica's router (a user's first stream here opens or last closes,
//! `driver.rs`), other replicas' messages and their silence (`remote`, `heartbeat`, `bye`,
//! `expire_peers`). Tests: `tests.rs` (the hub), `view.rs` (the view).

mod driver;
mod view;
pub mod webhook;

pub use driver::{Outbox, start};

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::mpsc;

use crate::domain::UserId;
use view::View;

/// A replica's id in the cluster (its cluster id; one constant with the memory backplane).
pub type ReplicaId = Arc<str>;

/// How long a replica counts as present after its last message (as for cluster queries).
pub const PEER_TTL: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Online,
    Offline,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Online => "online",
            State::Offline => "offline",
        }
    }
}

/// One transition of one user, as watchers receive it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub user: UserId,
    pub state: State,
    /// When this replica decided it (for offline: when the grace ended).
    pub at: SystemTime,
}

#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// A user with no stream anywhere for this long goes offline; a return within it emits
    /// nothing (`--presence-grace`).
    pub grace: Duration,
    /// Transitions queued per watcher at most; a watcher with a full queue is cut off
    /// (`--presence-watcher-queue`).
    pub watcher_queue: usize,
}

/// Why a watch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Its queue was full: it did not read fast enough.
    FellBehind,
    /// The server is shutting down.
    Shutdown,
}

/// A watcher's view: the users online when it began, then every transition.
pub struct Watch {
    /// Online when the watch began (unordered), taken in the same critical section that
    /// registered `events`: nothing falls between them or comes twice.
    pub snapshot: Vec<UserId>,
    /// When the watch began.
    pub at: SystemTime,
    /// Transitions after the snapshot. Ends when the hub cut the watcher off (`end`).
    pub events: mpsc::Receiver<Transition>,
    ended: Arc<OnceLock<End>>,
}

impl Watch {
    /// Why the hub ended this watch, once it has (`None` while it runs).
    pub fn end(&self) -> Option<End> {
        self.ended.get().copied()
    }
}

struct Watcher {
    tx: mpsc::Sender<Transition>,
    ended: Arc<OnceLock<End>>,
}

/// What the hub knows of another replica.
struct Peer {
    /// The sequence number of its last change applied (or announced by a heartbeat).
    seq: u64,
    seen: Instant,
    /// Its whole set has reached the view (a `reset`, or every message from its first).
    complete: bool,
}

/// After the hub starts, the whole sets of replicas met for the first time are the cluster's
/// state being learned, not transitions: the webhook does not send them (every replica that
/// starts would otherwise repeat `online` for its share of the users). Watchers still see them.
/// Long enough to hear every live replica (`PEER_TTL`) and get its whole set.
const WARM_UP: Duration = Duration::from_secs(6);

/// One batch of this replica's own changes, in order: (user, has a stream here now). What the
/// cluster link sends to the others (it numbers the messages it sends).
pub type Local = Vec<(UserId, bool)>;

struct Inner {
    view: View,
    /// Users with a stream on this replica, as told to the view and the other replicas.
    local: HashSet<UserId>,
    peers: HashMap<ReplicaId, Peer>,
    watchers: Vec<Watcher>,
    /// The webhook's queue, when one is configured: gets the transitions of the users this
    /// replica is responsible for (`webhook::responsible` among the replicas it hears from).
    webhook: Option<Arc<webhook::Outgoing>>,
    closed: bool,
}

pub struct Hub {
    me: ReplicaId,
    config: PresenceConfig,
    inner: Mutex<Inner>,
    /// Wakes the driver (`driver.rs`) when a grace may have started while it slept.
    wake: tokio::sync::Notify,
    /// When the hub started (`WARM_UP`).
    started: Instant,
    /// Watchers cut off because their queue was full (`ssegate_presence_watchers_cut_total`).
    pub cut_off: AtomicU64,
    /// Of those, the ones not logged yet: the driver logs them once it has let go of the lock.
    cuts_unlogged: AtomicU64,
}

impl Hub {
    pub fn new(me: ReplicaId, config: PresenceConfig) -> Arc<Self> {
        Arc::new(Self {
            me,
            inner: Mutex::new(Inner {
                view: View::new(config.grace),
                local: HashSet::new(),
                peers: HashMap::new(),
                watchers: Vec::new(),
                webhook: None,
                closed: false,
            }),
            config,
            wake: tokio::sync::Notify::new(),
            started: Instant::now(),
            cut_off: AtomicU64::new(0),
            cuts_unlogged: AtomicU64::new(0),
        })
    }

    /// The per-watcher queue bound (`--presence-watcher-queue`).
    pub fn watcher_queue(&self) -> usize {
        self.config.watcher_queue
    }

    pub fn me(&self) -> &ReplicaId {
        &self.me
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the state consistent before anything can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a watch: the users online now, then every transition after them.
    pub fn watch(&self) -> Watch {
        let (tx, events) = mpsc::channel(self.config.watcher_queue.max(1));
        let ended = Arc::new(OnceLock::new());
        let mut inner = self.lock();
        if inner.closed {
            let _ = ended.set(End::Shutdown);
        } else {
            inner.watchers.push(Watcher { tx, ended: ended.clone() });
        }
        Watch { snapshot: inner.view.online(), at: SystemTime::now(), events, ended }
    }

    /// Users online in the cluster view now.
    pub fn online(&self) -> usize {
        self.lock().view.len()
    }

    /// Watchers now.
    pub fn watchers(&self) -> usize {
        self.lock().watchers.len()
    }

    /// The webhook's queue (and its counters), if one is configured.
    pub fn webhook(&self) -> Option<Arc<webhook::Outgoing>> {
        self.lock().webhook.clone()
    }

    /// Sends this replica's share of the transitions to the webhook's queue from now on.
    pub fn set_webhook(&self, out: Arc<webhook::Outgoing>) {
        self.lock().webhook = Some(out);
    }

    /// Applies this replica's own changes (`Router::take_presence_changes`): (user, a first
    /// stream opened since the last call, has a stream now). Returns what to tell the others.
    pub fn local(&self, changes: Vec<(UserId, bool, bool)>) -> Option<Local> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut told = Vec::new();
        let mut inner = self.lock();
        let inner = &mut *inner;
        for (user, opened, online) in changes {
            let known = inner.local.contains(&user);
            // A visit that began and ended between two looks is still a visit: online, then
            // (after the grace) offline.
            if (opened || online) && !known {
                inner.view.add(&user, &self.me, &mut out);
                inner.local.insert(user.clone());
                told.push((user.clone(), true));
            }
            if !online && inner.local.remove(&user) {
                inner.view.remove(&user, &self.me, now);
                told.push((user, false));
            }
        }
        self.emit(inner, out, true);
        (!told.is_empty()).then_some(told)
    }

    /// This replica's users: the answer to a replica that asks for the whole set.
    pub fn local_set(&self) -> Vec<UserId> {
        self.lock().local.iter().cloned().collect()
    }

    /// Applies a batch of another replica's changes. `reset`: the batch starts that replica's
    /// whole set (its users not in it are gone). Returns whether this replica should ask for
    /// that replica's whole set: it is new to us mid-way, or a batch was missed.
    pub fn remote(&self, from: &str, seq: u64, reset: bool, changes: &[(UserId, bool)]) -> bool {
        if *from == *self.me {
            return false;
        }
        let now = Instant::now();
        let need_sync = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let (replica, need_sync, complete) = match inner.peers.get_key_value(from) {
                Some((id, p)) => {
                    if !reset && seq <= p.seq {
                        // Already part of a whole set we applied: stale.
                        return false;
                    }
                    (id.clone(), !reset && seq > p.seq + 1, p.complete)
                }
                None => (ReplicaId::from(from), !reset && seq > 1, seq == 1 && !reset),
            };
            // Learning an existing replica's users at start: not transitions for the webhook.
            let learning = reset && !complete && self.started.elapsed() < WARM_UP;
            let mut out = Vec::new();
            if reset {
                inner.view.remove_replica(&replica, now);
            }
            for (user, online) in changes {
                if *online {
                    inner.view.add(user, &replica, &mut out);
                } else {
                    inner.view.remove(user, &replica, now);
                }
            }
            inner.peers.insert(replica, Peer { seq, seen: now, complete: complete || reset });
            self.emit(inner, out, !learning);
            need_sync
        };
        // A grace may have started: the driver sleeps until the next deadline it knew.
        self.wake.notify_one();
        need_sync
    }

    /// Another replica is alive and its last batch was `seq`. Returns whether this replica
    /// should ask for its whole set (it is new to us with changes, or we missed some).
    pub fn heartbeat(&self, from: &str, seq: u64) -> bool {
        if *from == *self.me {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.peers.get_mut(from) {
            Some(p) => {
                p.seen = now;
                let missed = seq > p.seq;
                p.seq = p.seq.max(seq);
                missed
            }
            None => {
                // Nothing sent yet: its (empty) whole set is known.
                inner.peers.insert(ReplicaId::from(from), Peer { seq, seen: now, complete: seq == 0 });
                seq > 0
            }
        }
    }

    /// Another replica is stopping: its users enter the grace now, and it no longer counts
    /// among the replicas (until it is heard from again).
    pub fn bye(&self, from: &str) {
        if *from == *self.me {
            return;
        }
        let now = Instant::now();
        {
            let mut inner = self.lock();
            if let Some((replica, _)) = inner.peers.remove_entry(from) {
                inner.view.remove_replica(&replica, now);
            }
        }
        self.wake.notify_one();
    }

    /// Replicas not heard from for `PEER_TTL` count as gone: their users enter the grace.
    pub fn expire_peers(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        let gone: Vec<ReplicaId> = inner
            .peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.seen) >= PEER_TTL)
            .map(|(r, _)| r.clone())
            .collect();
        for r in &gone {
            inner.peers.remove(r);
            inner.view.remove_replica(r, now);
        }
        drop(inner);
        if !gone.is_empty() {
            tracing::info!(replicas = gone.len(), "presence: replicas not heard from; their users count as gone");
            self.wake.notify_one();
        }
    }

    /// Replicas this one hears from, itself included, sorted: who shares the webhook's work.
    pub fn replicas(&self) -> Vec<ReplicaId> {
        let inner = self.lock();
        let mut all: Vec<ReplicaId> = inner.peers.keys().cloned().collect();
        all.push(self.me.clone());
        all.sort();
        all
    }

    /// Ends the graces that are over; returns when the next one ends.
    fn expire(&self) -> Option<Instant> {
        let mut out = Vec::new();
        let mut inner = self.lock();
        inner.view.expire(Instant::now(), &mut out);
        self.emit(&mut inner, out, true);
        inner.view.next_deadline()
    }

    /// One line for the watchers cut off since the last call (never per watcher or event).
    fn log_cuts(&self) {
        let cut = self.cuts_unlogged.swap(0, Relaxed);
        if cut > 0 {
            tracing::warn!(watchers = cut, "presence watchers cut off: their queues were full");
        }
    }

    /// Ends every watch (`Shutdown`); later watches end at once.
    fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for w in inner.watchers.drain(..) {
            let _ = w.ended.set(End::Shutdown);
        }
    }
}

impl Hub {
    /// Hands the view's decisions to every watcher and the webhook, in order, never waiting:
    /// a watcher whose queue is full is cut off (its channel dropped, `End::FellBehind`).
    fn emit(&self, inner: &mut Inner, changes: Vec<view::Change>, webhook: bool) {
        if changes.is_empty() {
            return;
        }
        let at = SystemTime::now();
        let mut cut = 0;
        for (user, state) in changes {
            let t = Transition { user, state, at };
            if webhook
                && let Some(out) = &inner.webhook
                && webhook::responsible(&self.me, inner.peers.keys(), t.user.as_str())
            {
                out.push(&t);
            }
            inner.watchers.retain(|w| match w.tx.try_send(t.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let _ = w.ended.set(End::FellBehind);
                    cut += 1;
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
        if cut > 0 {
            self.cut_off.fetch_add(cut, Relaxed);
            // Logged by the driver, outside this lock (`log_cuts`).
            self.cuts_unlogged.fetch_add(cut, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
