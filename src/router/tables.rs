//! A shard's tables: its connections and their user, group and topic indexes, and what
//! applying one command to them does (fan-out into mailboxes, write coalescing, heartbeats,
//! removals). Side effects are collected in `Effects` and run by the caller after the tables
//! lock is released.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hash, Hasher},
    sync::Arc,
    task::Waker,
    time::{Duration, Instant},
};

use super::{
    CloseReason, ConnId,
    mailbox::{Frame, Mailbox, Push},
    replay::Logged,
    shard::Cmd,
};
use crate::domain::{GroupId, Target, Topic, UserId};

/// A connection as its shard knows it.
pub(super) struct Conn {
    pub mailbox: Arc<Mailbox>,
    pub user: UserId,
    pub groups: Box<[GroupId]>,
    pub topics: Box<[Topic]>,
    /// The writer may not be woken again before this (write coalescing).
    next_wake: Instant,
    /// In the shard's deferred list: its writer will be woken at the end of the window.
    deferred: bool,
    /// Events up to this sequence are not for it: it resumed after an id this router had not
    /// received yet (a shared sequence); 0 for every other connection.
    floor: u64,
}

impl Conn {
    pub fn new(mailbox: Arc<Mailbox>, user: UserId, groups: Box<[GroupId]>, topics: Box<[Topic]>, floor: u64) -> Self {
        Self { mailbox, user, groups, topics, next_wake: Instant::now(), deferred: false, floor }
    }
}

/// Connection ids are sequential numbers: hashing them with SipHash would cost more than the
/// rest of a delivery. A multiplicative hash spreads them over the table (hashbrown uses the
/// top bits for its control bytes and the low bits for the bucket). std has no such hasher.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ById<V> = HashMap<ConnId, V, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
pub(super) struct Tables {
    conns: ById<Conn>,
    users: HashMap<UserId, Vec<ConnId>>,
    groups: HashMap<GroupId, Vec<ConnId>>,
    topics: HashMap<Topic, Vec<ConnId>>,
    /// Connections whose writer waits for the end of its coalescing window.
    deferred: Vec<ConnId>,
    /// The earliest end of those windows: when the timer task must flush.
    flush_at: Option<Instant>,
}

fn join<K: Hash + Eq + Clone>(index: &mut HashMap<K, Vec<ConnId>>, key: &K, id: ConnId) {
    index.entry(key.clone()).or_default().push(id);
}

fn leave<K: Hash + Eq>(index: &mut HashMap<K, Vec<ConnId>>, key: &K, id: ConnId) {
    if let Some(members) = index.get_mut(key) {
        if let Some(i) = members.iter().position(|m| *m == id) {
            members.swap_remove(i);
        }
        if members.is_empty() {
            index.remove(key);
        } else if members.capacity() > 4 * members.len() {
            members.shrink_to_fit();
        }
    }
}

/// What applying commands left to do once the tables lock is released.
#[derive(Default)]
pub(super) struct Effects {
    pub wakers: Vec<Waker>,
    /// Cut off as slow consumers; `true` if an event (not a heartbeat) did not fit.
    pub cut: Vec<(Conn, bool)>,
    /// Closed gracefully, with a last frame.
    pub closed: Vec<(Conn, CloseReason, Option<Frame>)>,
    /// Removed because their registration ended.
    pub gone: Vec<Conn>,
    /// The deferred list became non-empty: the timer task must flush it.
    pub arm_flush: bool,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.wakers.is_empty()
            && self.cut.is_empty()
            && self.closed.is_empty()
            && self.gone.is_empty()
            && !self.arm_flush
    }
}

impl Tables {
    fn insert(&mut self, id: ConnId, conn: Conn) {
        join(&mut self.users, &conn.user, id);
        for g in &conn.groups {
            join(&mut self.groups, g, id);
        }
        for t in &conn.topics {
            join(&mut self.topics, t, id);
        }
        self.conns.insert(id, conn);
    }

    fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        leave(&mut self.users, &conn.user, id);
        for g in &conn.groups {
            leave(&mut self.groups, g, id);
        }
        for t in &conn.topics {
            leave(&mut self.topics, t, id);
        }
        Some(conn)
    }

    pub fn apply(&mut self, cmd: Cmd, window: Duration, now: Instant, fx: &mut Effects) {
        match cmd {
            Cmd::Event(logged) => self.fan_out(&logged, None, window, now, fx),
            Cmd::Register(id, conn) => self.insert(id, conn),
            Cmd::Unregister(id) => fx.gone.extend(self.remove(id)),
            Cmd::Disconnect(user, last) => {
                for id in self.users.get(&user).cloned().unwrap_or_default() {
                    if let Some(conn) = self.remove(id) {
                        fx.closed.push((conn, CloseReason::Disconnected, Some(last.clone())));
                    }
                }
            }
            Cmd::Late(logged, epoch) => self.fan_out(&logged, Some(epoch), window, now, fx),
            Cmd::CloseAll(reason, last) => {
                let all = std::mem::take(self);
                let frame = |bytes| Frame { bytes, published_at: now, is_event: false };
                fx.closed.extend(all.conns.into_values().map(|c| (c, reason, last().map(frame))));
            }
            Cmd::Tell(id, frames) => {
                if let Some(conn) = self.conns.get_mut(&id)
                    && !tell(conn, frames, now, fx)
                {
                    fx.cut.extend(self.remove(id).map(|c| (c, false)));
                }
            }
            Cmd::Rebase(rebased) => {
                let mut slow = Vec::new();
                for (id, conn) in &mut self.conns {
                    if !tell(conn, rebased.frames_for(&conn.user, &conn.groups, &conn.topics), now, fx) {
                        slow.push(*id);
                    }
                }
                for id in slow {
                    fx.cut.extend(self.remove(id).map(|c| (c, false)));
                }
            }
        }
    }

    /// Queues the event for every connection it addresses here, each at most once (a user
    /// list is deduplicated, and a group or topic holds a connection once). An event that
    /// arrived behind later ones (`late`: the epoch, `Cmd::Late`) is queued only where no later
    /// event was; the other connections get `ssegate.missed` (`late`, with the id before it: what
    /// they missed starts there).
    fn fan_out(&mut self, logged: &Logged, late: Option<u64>, window: Duration, now: Instant, fx: &mut Effects) {
        let Self { conns, users, groups, topics, deferred, flush_at } = self;
        let mut later = Deferred { list: deferred, at: flush_at };
        let mut slow = Vec::new();
        let mut deliver = |id: ConnId, conn: &mut Conn| {
            if logged.seq <= conn.floor {
                return;
            }
            let pushed = match late {
                None => conn.mailbox.push_event(logged.frame.clone(), logged.seq),
                Some(epoch) => match conn.mailbox.push_event_in_order(logged.frame.clone(), logged.seq) {
                    Some(pushed) => pushed,
                    None => {
                        // What it missed comes right after the id before this event.
                        let last = crate::domain::EventId { epoch, seq: logged.seq - 1 };
                        conn.mailbox.push(super::subscribe::missed_frame("late", last, now))
                    }
                },
            };
            if !schedule(id, conn, pushed, window, now, &mut later, fx) {
                slow.push(id);
            }
        };
        match &logged.target {
            Target::Users(list) => {
                for ids in list.iter().filter_map(|u| users.get(u)) {
                    visit(conns, ids, &mut deliver);
                }
            }
            Target::Group(g) => visit(conns, groups.get(g).map_or(&[], Vec::as_slice), &mut deliver),
            Target::Topic(t) => visit(conns, topics.get(t).map_or(&[], Vec::as_slice), &mut deliver),
            Target::Broadcast => conns.iter_mut().for_each(|(id, c)| deliver(*id, c)),
        }
        for id in slow {
            fx.cut.extend(self.remove(id).map(|c| (c, true)));
        }
    }

    /// Appends views of `subject`'s connections here (at most `limit` in `out`); returns how
    /// many it has here.
    pub fn views(
        &self,
        subject: &super::Subject,
        limit: usize,
        now: Instant,
        out: &mut Vec<super::StreamView>,
    ) -> usize {
        use super::Subject;
        let ids = match subject {
            Subject::User(u) => self.users.get(u),
            Subject::Group(g) => self.groups.get(g),
            Subject::Topic(t) => self.topics.get(t),
        };
        let ids = ids.map_or(&[][..], Vec::as_slice);
        for id in ids {
            if out.len() >= limit {
                break;
            }
            if let Some(c) = self.conns.get(id) {
                out.push(super::StreamView {
                    conn: *id,
                    user: c.user.clone(),
                    groups: c.groups.to_vec(),
                    topics: c.topics.to_vec(),
                    age: now.saturating_duration_since(c.mailbox.opened()),
                    meta: c.mailbox.meta(),
                    positions: c.mailbox.positions(),
                });
            }
        }
        ids.len()
    }

    /// Queues a heartbeat on the idle connections of one slot.
    pub fn heartbeat(&mut self, slot: u64, slots: u64, frame: &Frame, now: Instant, fx: &mut Effects) {
        let mut slow = Vec::new();
        for (id, conn) in self.conns.iter_mut().filter(|(id, _)| **id % slots == slot) {
            match conn.mailbox.heartbeat(frame) {
                None | Some(Push::Closed) | Some(Push::Queued { was_empty: false }) => {}
                // Heartbeats are rare: wake at once, whatever the window.
                Some(Push::Queued { was_empty: true }) => {
                    conn.next_wake = now;
                    fx.wakers.extend(conn.mailbox.take_waker());
                }
                Some(Push::Full) => slow.push(*id),
            }
        }
        for id in slow {
            fx.cut.extend(self.remove(id).map(|c| (c, false)));
        }
    }

    /// When the timer task must next flush deferred writers, if any wait.
    pub fn flush_at(&self) -> Option<Instant> {
        self.flush_at
    }

    /// Wakes the deferred writers whose window is over; the others wait for a later flush.
    pub fn flush_due(&mut self, window: Duration, now: Instant, fx: &mut Effects) {
        let mut at = None::<Instant>;
        let conns = &mut self.conns;
        self.deferred.retain(|id| {
            let Some(conn) = conns.get_mut(id) else { return false };
            if conn.next_wake > now {
                at = Some(at.map_or(conn.next_wake, |a| a.min(conn.next_wake)));
                return true;
            }
            conn.deferred = false;
            conn.next_wake = now + window;
            fx.wakers.extend(conn.mailbox.take_waker());
            false
        });
        self.flush_at = at;
        if self.deferred.capacity() > 4 * self.deferred.len().max(16) {
            self.deferred.shrink_to_fit();
        }
    }
}

/// Queues control frames for `conn` and wakes its writer at once (they are rare: no
/// coalescing), and lifts its floor: what comes next is every event. False if they did not fit
/// (a slow consumer: it is cut off, and resumes from its last id).
fn tell(conn: &mut Conn, frames: Vec<Frame>, now: Instant, fx: &mut Effects) -> bool {
    conn.floor = 0;
    for frame in frames {
        match conn.mailbox.push(frame) {
            Push::Full => return false,
            Push::Closed => return true,
            Push::Queued { .. } => {}
        }
    }
    conn.next_wake = now;
    fx.wakers.extend(conn.mailbox.take_waker());
    true
}

fn visit(conns: &mut ById<Conn>, ids: &[ConnId], mut f: impl FnMut(ConnId, &mut Conn)) {
    for id in ids {
        if let Some(conn) = conns.get_mut(id) {
            f(*id, conn);
        }
    }
}

/// The deferred list and its earliest deadline, borrowed together during a fan-out.
struct Deferred<'a> {
    list: &'a mut Vec<ConnId>,
    at: &'a mut Option<Instant>,
}

/// After a push: decides when the writer is woken. False if the mailbox was full.
fn schedule(
    id: ConnId,
    conn: &mut Conn,
    push: Push,
    window: Duration,
    now: Instant,
    later: &mut Deferred<'_>,
    fx: &mut Effects,
) -> bool {
    match push {
        Push::Full => return false,
        Push::Closed | Push::Queued { was_empty: false } => {}
        Push::Queued { was_empty: true } if now >= conn.next_wake => {
            conn.next_wake = now + window;
            fx.wakers.extend(conn.mailbox.take_waker());
        }
        Push::Queued { was_empty: true } => {
            if !conn.deferred {
                conn.deferred = true;
                fx.arm_flush |= later.list.is_empty();
                later.list.push(id);
                *later.at = Some(later.at.map_or(conn.next_wake, |a| a.min(conn.next_wake)));
            }
        }
    }
    true
}
