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
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

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
    /// Too many connections have not sent their first request yet (and none could be evicted).
    PendingConnections,
    /// The pending connection silent the longest was closed to admit a new one.
    EvictedOldestPending,
}

/// Counts a port's open and not-yet-admitted sockets against their limits. When the pending
/// ones are at their limit, a new socket evicts the one that has been pending longest, rather
/// than being refused: clients that send their request at once get in even while a flood of
/// silent sockets keeps the limit full (each flood socket lives only until it is the oldest).
#[derive(Debug)]
pub struct Gate {
    port: &'static str,
    max_open: usize,
    max_pending: usize,
    open: AtomicUsize,
    pending: AtomicUsize,
    /// Eviction handles of the pending sockets, oldest first (dead ones are skipped).
    oldest: Mutex<VecDeque<Weak<CancellationToken>>>,
}

/// Holds a socket's place in its port's open count.
#[derive(Debug)]
pub struct OpenPermit(Arc<Gate>);

/// Holds a socket's place among the not yet admitted, until it sends its first request.
/// `evicted()` completes if the gate closes it to make room for a newer one.
#[derive(Debug)]
pub struct PendingPermit(Arc<Gate>, Arc<CancellationToken>);

impl PendingPermit {
    /// Completes when the gate evicts this socket: its connection should close.
    pub fn evicted(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        (*self.1).clone().cancelled_owned()
    }
}

/// What an accepted socket carries: its places in the counts, and when it was accepted.
#[derive(Debug)]
pub struct Admission {
    pub open: OpenPermit,
    pub pending: PendingPermit,
    pub accepted: Instant,
}

impl Gate {
    pub fn new(port: &'static str, max_open: usize, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            port,
            max_open,
            max_pending,
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            oldest: Mutex::new(VecDeque::new()),
        })
    }

    /// Evicts the socket pending longest, if there is one still pending.
    fn evict_oldest(&self) -> bool {
        let mut q = self.oldest.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(w) = q.pop_front() {
            if let Some(token) = w.upgrade() {
                token.cancel();
                return true;
            }
        }
        false
    }

    fn track(&self, token: &Arc<CancellationToken>) {
        let mut q = self.oldest.lock().unwrap_or_else(|e| e.into_inner());
        // Sockets admitted normally leave dead entries behind: sweep them now and then.
        if q.len() >= 2 * self.max_pending.max(16) {
            q.retain(|w| w.strong_count() > 0);
        }
        q.push_back(Arc::downgrade(token));
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Admits a socket, evicting the oldest pending one if the pending are at their limit
    /// (the evicted one gives its place back when its task ends; until then the count may
    /// exceed the limit by the evictions in flight). The second value says one was evicted.
    fn admit(self: &Arc<Self>) -> Result<(Admission, bool), Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_open {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::DescriptorBudget);
        }
        let open = OpenPermit(self.clone());
        let mut evicted = false;
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            evicted = self.evict_oldest();
            if !evicted {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::PendingConnections);
            }
        }
        let token = Arc::new(CancellationToken::new());
        // Only a port whose pending limit is below its open limit can ever evict.
        if self.max_pending < self.max_open {
            self.track(&token);
        }
        Ok((Admission { open, pending: PendingPermit(self.clone(), token), accepted: Instant::now() }, evicted))
    }
}

impl Drop for OpenPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for PendingPermit {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts on `listener` until `shutdown`, handing each socket within its port's limits to
/// `serve` and closing the others at once (`refused` is told why, and also when an older
/// pending socket was evicted to admit one). Accept errors (typically
/// the descriptor limit) back off for 100 ms instead of spinning.
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
        let outcome = match gate.admit() {
            Ok((admission, evicted)) => {
                serve(stream, peer, admission);
                if !evicted {
                    continue;
                }
                Refusal::EvictedOldestPending
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
                reason = ?outcome,
                closed = unlogged,
                open = gate.open(),
                max_open = gate.max_open,
                pending = gate.pending(),
                max_pending = gate.max_pending,
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

    #[test]
    fn the_gate_counts_open_and_pending_sockets_evicts_the_oldest_pending_and_gives_places_back() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let gate = Gate::new("test", 4, 2);
            let (a, _) = gate.admit().unwrap();
            let (b, _) = gate.admit().unwrap();
            drop(a.pending); // admitted: no longer pending
            let (c, evicted) = gate.admit().unwrap();
            assert!(!evicted);
            assert_eq!((gate.open(), gate.pending()), (3, 2));
            // Pending full: the newcomer evicts the oldest pending socket (b), not c.
            let (d, evicted) = gate.admit().unwrap();
            assert!(evicted);
            let b_evicted = b.pending.evicted();
            tokio::time::timeout(Duration::from_secs(1), b_evicted).await.expect("b is told to close");
            assert!(tokio::time::timeout(Duration::from_millis(10), c.pending.evicted()).await.is_err());
            assert_eq!(gate.admit().unwrap_err(), Refusal::DescriptorBudget);
            drop((b, c, d));
            assert_eq!((gate.open(), gate.pending()), (1, 0));
        });
    }

    #[test]
    fn somaxconn_reads_the_kernel_setting() {
        assert!(somaxconn() >= 128);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
