//! A shard: the single owner of some connections (all of a user's connections live in the
//! same shard) and of their membership indexes, and the place where events fan out to them.
//!
//! Work reaches a shard as commands in its `inbox`, appended in global order under the core
//! lock (events in sequence order, registrations at the point in that order where their replay
//! ended). Whoever submits a command then tries to apply the inbox; if another thread is
//! applying already, that thread picks the new commands up before it lets go (flat combining),
//! so nobody ever waits for a shard and every shard applies commands in submission order. The
//! tables lock is held only while queuing frames into mailboxes; waking writers, aborting
//! sockets and logging happen after it is released.
//!
//! Writes are coalesced here: a connection's writer is woken at most once per
//! `--write-coalesce` window. The first event after a quiet period wakes it at once; events
//! within the window wait in the mailbox and the shard's timer task wakes the writer at the end
//! of the window, so it carries all of them in one write.

use std::{
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, MutexGuard, TryLockError},
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{
    CloseReason, ConnId,
    mailbox::Frame,
    rebase::Rebased,
    replay::Logged,
    tables::{Conn, Effects, Tables},
};
use crate::domain::UserId;

/// Builds the frame a connection gets when the server closes everyone (a jittered `retry:`).
pub(super) type LastFrame = Arc<dyn Fn() -> Option<Bytes> + Send + Sync>;

pub(super) enum Cmd {
    Event(Arc<Logged>),
    Register(ConnId, Conn),
    Unregister(ConnId),
    /// Close every connection of the user, each after the given frame.
    Disconnect(UserId, Frame),
    CloseAll(CloseReason, LastFrame),
    /// An event that reached this replica behind later ones (epoch given): queued for each
    /// addressed connection that has not been sent a later event; the others are told
    /// `ssegate.missed` (`late`), since it can no longer reach them in order.
    Late(Arc<Logged>, u64),
    /// Queue these control frames for one connection (its `ssegate.missed`, retained values and
    /// cursor, `ssegate.position`) and deliver it every event from now on (its floor is lifted).
    Tell(ConnId, Vec<Frame>),
    /// The ids start a new epoch: tell every connection (see `Router::rebase`).
    Rebase(Arc<Rebased>),
}

pub(super) struct Shard {
    inbox: Mutex<Vec<Cmd>>,
    tables: Mutex<Tables>,
    /// Wakes the shard's timer task when the deferred list becomes non-empty.
    pub flush: tokio::sync::Notify,
}

impl Shard {
    pub fn new() -> Self {
        Self { inbox: Mutex::new(Vec::new()), tables: Mutex::new(Tables::default()), flush: tokio::sync::Notify::new() }
    }

    /// Appends a command; the caller orders submissions (under the core lock) and then calls
    /// `run`.
    pub fn submit(&self, cmd: Cmd) {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).push(cmd);
    }

    fn inbox_is_empty(&self) -> bool {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Applies the inbox unless another thread is applying it (which then also applies what
    /// was just submitted). `finish` runs the effects of each batch after the lock is released.
    pub fn run(&self, window: Duration, mut finish: impl FnMut(Effects)) {
        loop {
            let mut tables = match self.tables.try_lock() {
                Ok(t) => t,
                // Every critical section leaves the tables consistent, so poison is harmless.
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            let batch = std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|e| e.into_inner()));
            let mut fx = Effects::default();
            let now = Instant::now();
            for cmd in batch {
                tables.apply(cmd, window, now, &mut fx);
            }
            drop(tables);
            if !fx.is_empty() {
                finish(fx);
            }
            // A command submitted while we held the lock saw `WouldBlock` and left it to us.
            if self.inbox_is_empty() {
                return;
            }
        }
    }

    /// Runs `f` on the tables (heartbeats, deferred flushes, queries), blocking briefly.
    pub fn with_tables<R>(&self, f: impl FnOnce(&mut Tables) -> R) -> R {
        let mut tables: MutexGuard<'_, Tables> = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut tables)
    }
}

/// The shard a user's connections live in.
pub(super) fn shard_of(user: &UserId, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    // DefaultHasher::new() has fixed keys: the same user always lands in the same shard.
    let mut h = std::hash::DefaultHasher::new();
    user.hash(&mut h);
    (h.finish() % shards as u64) as usize
}
