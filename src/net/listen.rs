//! Listening sockets and what each port may hold: the listen backlog follows the kernel's
//! `somaxconn`; each port has a budget of open sockets (out of the process's descriptor limit,
//! with a reserve kept for the gRPC and admin ports so an SSE flood cannot starve publishing
//! and health checks) and of sockets not yet admitted (no complete request yet). One accept
//! loop serves all three ports.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
    time::Instant,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The listen backlog the kernel allows (`net.core.somaxconn`); 4096 if it cannot be read.
pub fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(4096)
}

/// Binds `addr` with the largest backlog the kernel allows: a burst of reconnecting browsers
/// (after a deploy) must queue in the kernel, not be refused by a short default.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(somaxconn())
}

/// The process's limit on open descriptors (soft), if known.
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How many sockets each port may hold open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub http: usize,
    pub grpc: usize,
    pub admin: usize,
}

impl Budget {
    /// Splits a descriptor limit: a tenth of it (at least 128, at most 4,096) is kept back from
    /// the HTTP port; half of that reserve is the gRPC port's, an eighth (at most 64) the admin
    /// port's, and the rest is for the listeners, the broker connection, files and the runtime.
    pub fn from_limit(open_files: usize) -> Self {
        let reserve = (open_files / 10).clamp(128, 4096);
        Self { http: open_files.saturating_sub(reserve), grpc: reserve / 2, admin: (reserve / 8).min(64) }
    }

    /// The budget for this process (no limit known: as for a million descriptors).
    pub fn for_process() -> Self {
        Self::from_limit(open_files_limit().unwrap_or(1 << 20))
    }
}

/// Why an accepted socket was closed at once, or an older one closed to make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The port holds all the sockets its descriptor budget allows.
    DescriptorBudget,
    /// A pending connection that stayed silent past `Policy::evict_after` was closed to admit
    /// a new one.
    EvictedOldestPending,
    /// The port's budget was full and it evicts the socket open longest (the admin port: a
    /// probe must always get in).
    EvictedOldestOpen,
}

impl Refusal {
    /// As logged (snake_case).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::DescriptorBudget => "descriptor_budget",
            Refusal::EvictedOldestPending => "evicted_oldest_pending",
            Refusal::EvictedOldestOpen => "evicted_oldest_open",
        }
    }
}

/// What a port holds, and what it does when full.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Most sockets open at once.
    pub max_open: usize,
    /// Most sockets not yet admitted at once. At this many the port stops accepting (the
    /// newcomers wait in the kernel's backlog) until one is admitted or closes, or the oldest
    /// has been silent for `evict_after` and is evicted to make room.
    pub max_pending: usize,
    /// How long a pending socket must have been waited on (from its connection's first read)
    /// before it may be evicted. A burst of clients whose requests sit unread in the kernel's
    /// buffers while the server is behind is never evicted: their clock has not started.
    pub evict_after: Duration,
    /// When the port holds `max_open`, evict the socket open longest instead of refusing the
    /// newcomer (for the admin port, whose connections are short: probes must get in).
    pub evict_oldest_open: bool,
}

/// How long a pending socket may stay silent before it can be evicted: long enough for a
/// client on a slow link to finish a TLS handshake and send its head, short enough that a
/// flood of silent sockets rotates (at least `max_pending / EVICT_AFTER` accepts a second).
pub const EVICT_AFTER: Duration = Duration::from_secs(2);

/// Counts a port's open and not-yet-admitted sockets against their limits (see [`Policy`]).
/// Accepting is paced, not forced: a storm of legitimate clients queues in the kernel's backlog
/// while the server admits the pending ones, and only sockets that have been silent for a
/// while are evicted to make room.
#[derive(Debug)]
pub struct Gate {
    port: &'static str,
    policy: Policy,
    /// When the gate was made: entries' times are milliseconds since then.
    epoch: Instant,
    open: AtomicUsize,
    pending: AtomicUsize,
    /// Woken when a pending socket is admitted or closes: the paced accept loop looks again.
    freed: Notify,
    /// The pending sockets that may be evicted, oldest first (dead ones are skipped).
    pending_order: Mutex<VecDeque<Weak<Entry>>>,
    /// The open sockets, oldest first, where the policy evicts open sockets.
    open_order: Mutex<VecDeque<Weak<Entry>>>,
}

/// A socket as the gate sees it: how to close it, and since when its connection waits on it.
#[derive(Debug)]
struct Entry {
    evict: CancellationToken,
    /// Milliseconds from the gate's epoch, plus one, at which the connection first waited for
    /// the socket to speak; 0 while it has not (the server has not got to it yet).
    watched: AtomicU64,
}

/// Holds a socket's place in its port's open count.
#[derive(Debug)]
pub struct OpenPermit {
    gate: Arc<Gate>,
    evict: CancellationToken,
    /// Keeps the socket listed in `open_order` while it is open (ports that evict open sockets).
    _listed: Option<Arc<Entry>>,
}

impl OpenPermit {
    /// Completes when the gate evicts this socket, pending or not: its connection should close.
    pub fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.evict.clone().cancelled_owned()
    }
}

/// Holds a socket's place among the not yet admitted, until it is dropped (at the first
/// request; on the gRPC port, at the first authenticated call).
#[derive(Debug)]
pub struct PendingPermit(Arc<Gate>, Arc<Entry>);

impl PendingPermit {
    /// Completes when the gate evicts this socket: its connection should close.
    pub fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.1.evict.clone().cancelled_owned()
    }

    /// The connection now waits for the socket to speak: its silence counts from here (the
    /// first call; later calls change nothing).
    pub fn watch(&self) {
        if self.1.watched.load(Ordering::Relaxed) == 0 {
            self.1.watched.store(self.0.now_ms() + 1, Ordering::Relaxed);
        }
    }
}

/// What an accepted socket carries: its places in the counts, and when it was accepted.
#[derive(Debug)]
pub struct Admission {
    pub open: OpenPermit,
    pub pending: PendingPermit,
    pub accepted: Instant,
}

impl Admission {
    /// Completes when the gate evicts this socket (while pending, or while open on a port that
    /// evicts open sockets): its connection should close.
    pub fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.open.evicted()
    }
}

/// What the accept loop should do next.
#[derive(Debug, PartialEq, Eq)]
enum Room {
    /// Accept; `Some` if a socket was evicted to make room.
    Accept(Option<Refusal>),
    /// Accept nothing for now: look again when a pending socket leaves, or after this long.
    Wait(Duration),
}

impl Gate {
    pub fn new(port: &'static str, policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            port,
            policy,
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            freed: Notify::new(),
            pending_order: Mutex::new(VecDeque::new()),
            open_order: Mutex::new(VecDeque::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Whether a socket may be accepted now: yes below the pending limit; at it, only if the
    /// pending socket listed first has been silent for `evict_after`, which `evict` then evicts.
    /// The loop asks without `evict` before accepting and with it once a newcomer is in hand, so
    /// that each eviction admits exactly one newcomer (the evicted socket gives its place back
    /// when its task ends: the count may exceed the limit by the evictions in flight).
    fn room(&self, evict: bool) -> Room {
        if self.pending() < self.policy.max_pending {
            return Room::Accept(None);
        }
        if self.policy.evict_oldest_open && self.policy.max_pending >= self.policy.max_open {
            // Every socket may be pending here: the open budget's eviction makes the room.
            return Room::Accept(None);
        }
        let mut order = lock(&self.pending_order);
        while let Some(front) = order.front() {
            let Some(entry) = front.upgrade() else {
                order.pop_front();
                continue;
            };
            let watched = entry.watched.load(Ordering::Relaxed);
            if watched == 0 {
                // Not even read yet: the server is behind, not the client. Let it catch up.
                return Room::Wait(Duration::from_millis(50));
            }
            let silent = Duration::from_millis(self.now_ms().saturating_sub(watched - 1));
            if silent < self.policy.evict_after {
                return Room::Wait(self.policy.evict_after - silent);
            }
            if evict {
                order.pop_front();
                entry.evict.cancel();
            }
            return Room::Accept(Some(Refusal::EvictedOldestPending));
        }
        // At the limit but nothing listed to evict: wait for one to be admitted or to close.
        Room::Wait(Duration::from_millis(100))
    }

    /// Evicts the socket open longest, if there is one.
    fn evict_oldest_open(&self) -> bool {
        let mut order = lock(&self.open_order);
        while let Some(w) = order.pop_front() {
            if let Some(entry) = w.upgrade() {
                entry.evict.cancel();
                return true;
            }
        }
        false
    }

    /// Takes the places of a socket just accepted (the loop made room first). The second value
    /// says which older socket was evicted for it, if any.
    fn admit(self: &Arc<Self>, made_room: Option<Refusal>) -> Result<(Admission, Option<Refusal>), Refusal> {
        let mut evicted = made_room;
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.policy.max_open {
            if !(self.policy.evict_oldest_open && self.evict_oldest_open()) {
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::DescriptorBudget);
            }
            evicted = Some(Refusal::EvictedOldestOpen);
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        let entry = Arc::new(Entry { evict: CancellationToken::new(), watched: AtomicU64::new(0) });
        // Only a port that can evict keeps the lists.
        if self.policy.max_pending < self.policy.max_open {
            track(&self.pending_order, &entry, self.policy.max_pending);
        }
        // Its own entry (same token): the pending list must see this one die at admission.
        let open_entry = self.policy.evict_oldest_open.then(|| {
            let open = Arc::new(Entry { evict: entry.evict.clone(), watched: AtomicU64::new(0) });
            track(&self.open_order, &open, self.policy.max_open);
            open
        });
        let admission = Admission {
            open: OpenPermit { gate: self.clone(), evict: entry.evict.clone(), _listed: open_entry },
            pending: PendingPermit(self.clone(), entry),
            accepted: Instant::now(),
        };
        Ok((admission, evicted))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lists `entry` last in `order`, sweeping out dead entries now and then.
fn track(order: &Mutex<VecDeque<Weak<Entry>>>, entry: &Arc<Entry>, limit: usize) {
    let mut q = lock(order);
    if q.len() >= 2 * limit.max(16) {
        q.retain(|w| w.strong_count() > 0);
    }
    q.push_back(Arc::downgrade(entry));
}

impl Drop for OpenPermit {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for PendingPermit {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// Accepts on `listener` until `shutdown`, handing each socket within its port's limits to
/// `serve` and closing the others at once (`refused` is told why, and also when an older
/// socket was evicted to admit one). While the pending are at their limit it accepts nothing,
/// so a burst waits in the kernel's backlog (`bind` makes it as long as the kernel allows)
/// instead of being turned away. Accept errors (typically the descriptor limit) back off for
/// 100 ms instead of spinning.
pub async fn accept_loop(
    listener: TcpListener,
    gate: Arc<Gate>,
    shutdown: CancellationToken,
    refused: impl Fn(Refusal, SocketAddr),
    mut serve: impl FnMut(TcpStream, SocketAddr, Admission),
) {
    // Refusals come in floods: log the first of each second, with how many there were.
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        match gate.room(false) {
            Room::Accept(_) => {}
            Room::Wait(at_most) => {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    () = gate.freed.notified() => {}
                    () = tokio::time::sleep(at_most) => {}
                }
                continue;
            }
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(port = gate.port, error = %e, "accept failed; retrying in 100 ms");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        // A newcomer in hand: now make its room (the loop saw it could; a socket admitted
        // meanwhile may have made it, in which case nobody is evicted).
        let made_room = match gate.room(true) {
            Room::Accept(evicted) => evicted,
            Room::Wait(_) => None,
        };
        let outcome = match gate.admit(made_room) {
            Ok((admission, evicted)) => {
                serve(stream, peer, admission);
                match evicted {
                    None => continue,
                    Some(why) => why,
                }
            }
            Err(why) => {
                drop(stream);
                why
            }
        };
        refused(outcome, peer);
        unlogged += 1;
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(
                port = gate.port,
                %peer,
                reason = outcome.as_str(),
                closed = unlogged,
                open = gate.open(),
                max_open = gate.policy.max_open,
                pending = gate.pending(),
                max_pending = gate.policy.max_pending,
                "connections closed: over the port's limits"
            );
            last_log = Some(Instant::now());
            unlogged = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_budget_keeps_a_reserve_for_publishing_and_probes() {
        assert_eq!(Budget::from_limit(1024), Budget { http: 896, grpc: 64, admin: 16 });
        assert_eq!(Budget::from_limit(20_000), Budget { http: 18_000, grpc: 1000, admin: 64 });
        assert_eq!(Budget::from_limit(1 << 20), Budget { http: (1 << 20) - 4096, grpc: 2048, admin: 64 });
    }

    fn policy(max_open: usize, max_pending: usize) -> Policy {
        Policy { max_open, max_pending, evict_after: Duration::from_secs(2), evict_oldest_open: false }
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_pending_limit_the_gate_waits_and_evicts_only_a_socket_silent_long_enough() {
        let gate = Gate::new("test", policy(8, 2));
        let (a, _) = gate.admit(None).unwrap();
        let (b, _) = gate.admit(None).unwrap();
        drop(a.pending); // admitted: no longer pending
        assert_eq!(gate.room(true), Room::Accept(None));
        let (c, _) = gate.admit(None).unwrap();
        assert_eq!((gate.open(), gate.pending()), (3, 2));
        // Full, and nobody has read b yet (the server is behind): wait, never evict.
        assert_eq!(gate.room(true), Room::Wait(Duration::from_millis(50)));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(gate.room(true), Room::Wait(Duration::from_millis(50)), "an unread socket is never evicted");
        // Read from now on: evictable once silent for evict_after.
        b.pending.watch();
        c.pending.watch();
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(gate.room(true), Room::Wait(Duration::from_millis(1500)));
        tokio::time::advance(Duration::from_millis(1500)).await;
        // Asking evicts nobody: only a newcomer in hand does.
        assert_eq!(gate.room(false), Room::Accept(Some(Refusal::EvictedOldestPending)));
        assert!(tokio::time::timeout(Duration::from_millis(10), b.pending.evicted()).await.is_err());
        assert_eq!(gate.room(true), Room::Accept(Some(Refusal::EvictedOldestPending)));
        tokio::time::timeout(Duration::from_secs(1), b.pending.evicted())
            .await
            .expect("b, the oldest, is told to close");
        assert!(tokio::time::timeout(Duration::from_millis(10), c.pending.evicted()).await.is_err(), "c is not");
        drop(b);
        assert_eq!(gate.pending(), 1, "b's place is given back");
        assert_eq!(gate.room(true), Room::Accept(None));
    }

    #[tokio::test(start_paused = true)]
    async fn the_paced_loop_is_woken_when_a_pending_socket_leaves() {
        let gate = Gate::new("test", policy(8, 1));
        let (a, _) = gate.admit(None).unwrap();
        let woken = gate.freed.notified();
        drop(a);
        tokio::time::timeout(Duration::from_millis(1), woken).await.expect("woken at once");
    }

    #[tokio::test]
    async fn a_full_port_refuses_or_evicts_the_socket_open_longest() {
        let gate = Gate::new("test", policy(2, 2));
        let (_a, _) = gate.admit(None).unwrap();
        let (_b, _) = gate.admit(None).unwrap();
        assert_eq!(gate.admit(None).unwrap_err(), Refusal::DescriptorBudget);
        let admin = Gate::new("admin", Policy { evict_oldest_open: true, ..policy(2, 2) });
        let (a, _) = admin.admit(None).unwrap();
        drop(a.pending); // an admitted connection, open longest
        let (b, _) = admin.admit(None).unwrap();
        assert_eq!(admin.room(true), Room::Accept(None));
        let (_c, evicted) = admin.admit(None).unwrap();
        assert_eq!(evicted, Some(Refusal::EvictedOldestOpen));
        tokio::time::timeout(Duration::from_secs(1), a.open.evicted())
            .await
            .expect("a, open longest, is told to close");
        assert!(tokio::time::timeout(Duration::from_millis(10), b.evicted()).await.is_err(), "b is not");
    }

    #[test]
    fn somaxconn_reads_the_kernel_setting() {
        assert!(somaxconn() >= 128);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
