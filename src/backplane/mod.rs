//! Where a published event goes. `Memory`: straight into this process's router, which numbers
//! it. `Nats`: into a NATS JetStream stream, acknowledged once stored; every replica consumes
//! the stream in order and hands each event to its own router with the stream's sequence
//! number, so an event has the same id everywhere and a browser can resume on any replica.

pub mod cluster;
mod durable;
pub mod nats;
mod retained_kv;
mod wire;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use futures_util::{FutureExt, future::BoxFuture};

use crate::{
    domain::{Event, EventId, IdempotencyKey, Retain, Target},
    router::{Partitions, PublishError, Published, Router},
    store::{Health, Recovered, Store, StoreError, Ticket},
};

pub enum Backplane {
    Memory(Memory),
    Nats(Arc<nats::NatsStreams>),
}

/// The single-process backplane: idempotency keys, and the data dir if `--data-dir` is set.
pub struct Memory {
    dedupe: Dedupe,
    store: Option<Arc<Store>>,
}

/// In memory, the idempotency keys seen in the last `window`, with the id each got: the same
/// contract as JetStream's duplicate detection, for one process, up to `DEDUPE_MAX_KEYS` keys.
pub struct Dedupe {
    seen: Mutex<Seen>,
    window: Duration,
    /// `DEDUPE_MAX_KEYS` (smaller in tests).
    max_keys: usize,
    /// Keys forgotten before their window ended, because the cap was reached: a retry with one
    /// of them would be published again. Counted (`ssegate_idempotency_evicted_total`) and
    /// logged the first time, since nothing else would tell.
    evicted: AtomicU64,
    warned: AtomicBool,
}

#[derive(Default)]
struct Seen {
    ids: HashMap<IdempotencyKey, (EventId, Instant)>,
    /// Keys in the order they were first seen, to forget the oldest first.
    order: VecDeque<IdempotencyKey>,
    /// With a data dir: keys whose event is still being written, with a ticket on that write,
    /// so a retry meanwhile is answered only once the first publish's outcome is known.
    pending: HashMap<IdempotencyKey, Ticket>,
}

/// How many keys are remembered at most (oldest forgotten first, even inside the window): the
/// memory a publisher inventing keys can pin is bounded (256-byte keys: about 35 MB).
pub const DEDUPE_MAX_KEYS: usize = 100_000;

impl Backplane {
    /// In this process only; idempotency keys are remembered for `dedupe_window`.
    pub fn memory(dedupe_window: Duration) -> Self {
        Backplane::Memory(Memory { dedupe: Dedupe::new(dedupe_window, DEDUPE_MAX_KEYS), store: None })
    }

    /// In this process, every event also appended to `store` (`--data-dir`) and acknowledged
    /// once stored; call `restore` with what the store recovered before serving.
    pub fn durable(dedupe_window: Duration, store: Arc<Store>) -> Self {
        Backplane::Memory(Memory { dedupe: Dedupe::new(dedupe_window, DEDUPE_MAX_KEYS), store: Some(store) })
    }
}

/// A publish started by `Memory::start`: its answer, the write to wait for, and whether this
/// call published (`false`: a retry answered with the first id).
type Started = (Accepted, Option<Ticket>, bool);

impl Memory {
    /// Publishes through `router`, appending the event to the store (if any) inside the core
    /// critical section that numbers it; returns its ticket (`None` without a store).
    fn publish(
        &self,
        router: &Router,
        target: Target,
        event: &Event,
        retain: Retain,
        key: Option<&IdempotencyKey>,
    ) -> Result<(Published, Option<Ticket>), PublishError> {
        let Some(store) = &self.store else {
            return Ok((router.publish_with(target, event, retain)?, None));
        };
        // Encoded outside the core lock; only the copy into the store's batch happens under it.
        let record = durable::encode(key, SystemTime::now(), &target, event, retain);
        let (p, ticket) =
            router.publish_journaled(target, event, retain, |seq| store.append(seq, durable::KIND_EVENT, &record))?;
        Ok((p, Some(ticket)))
    }

    /// Publishes (numbering the event and handing it to open streams now), unless `key` was
    /// seen within the window (then the first id, and that publish's write if still going on).
    fn start(
        &self,
        router: &Router,
        target: Target,
        event: &Event,
        retain: Retain,
        key: Option<&IdempotencyKey>,
    ) -> Result<Started, BackplaneError> {
        match key {
            None => {
                let (p, ticket) = self.publish(router, target, event, retain, None)?;
                Ok((Accepted::one(p.id, Some(p.recipients)), ticket, false))
            }
            Some(key) => self.dedupe.publish_once(self, router, target, event, retain, key),
        }
    }

    /// Waits for a started publish's write; with a store, the key of a publish whose write
    /// failed is forgotten (a retry is then published again).
    async fn finish(
        &self,
        key: Option<&IdempotencyKey>,
        (accepted, ticket, first): Started,
    ) -> Result<Accepted, BackplaneError> {
        let outcome = stored(ticket).await;
        if let (true, Some(key)) = (first, key) {
            self.dedupe.written(key, accepted.id, outcome.is_ok());
        }
        outcome.map(|()| accepted)
    }
}

/// Waits for a publish's record to be stored. A failed ticket answers UNAVAILABLE although the
/// event was already handed to the open streams (it got its id under the core lock, before the
/// write): it is not stored, so it is not replayed after a restart, and a retry publishes it
/// again (the idempotency key is forgotten) with a new id.
async fn stored(ticket: Option<Ticket>) -> Result<(), BackplaneError> {
    match ticket {
        None => Ok(()),
        Some(t) => t.await.map_err(|e| {
            tracing::warn!(error = %e, "a publish was not stored in the data dir; answered UNAVAILABLE");
            BackplaneError::Router(PublishError::NotStored(format!(
                "{e} (it may already have reached open streams, but will not be replayed)"
            )))
        }),
    }
}

impl Dedupe {
    fn new(window: Duration, max_keys: usize) -> Self {
        Self { seen: Mutex::default(), window, max_keys, evicted: AtomicU64::new(0), warned: AtomicBool::new(false) }
    }

    /// The write of the publish that first used `key` (as `id`) ended: a failed one forgets
    /// the key, so a retry is published (and stored) again.
    fn written(&self, key: &IdempotencyKey, id: EventId, stored: bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.pending.remove(key);
        if !stored && seen.ids.get(key).is_some_and(|(first, _)| *first == id) {
            seen.ids.remove(key);
        }
    }

    /// Under the dedupe lock: the first id of `key` (with a ticket on its write if that is
    /// still going on), or a new publish and its ticket (`true`: this call published).
    fn publish_once(
        &self,
        memory: &Memory,
        router: &Router,
        target: Target,
        event: &Event,
        retain: Retain,
        key: &IdempotencyKey,
    ) -> Result<Started, BackplaneError> {
        // Held across the publish, so two concurrent retries cannot both get through.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Forget keys past the window, and the oldest beyond the cap.
        let mut early = 0u64;
        while let Some(oldest) = seen.order.front() {
            let expired = seen.ids.get(oldest).is_none_or(|(_, at)| now.duration_since(*at) >= self.window);
            if !expired && seen.order.len() < self.max_keys {
                break;
            }
            early += u64::from(!expired);
            if let Some(k) = seen.order.pop_front() {
                seen.ids.remove(&k);
                // Left by a publish whose caller went away before its write's outcome.
                seen.pending.remove(&k);
            }
        }
        if early > 0 {
            self.evicted.fetch_add(early, Relaxed);
            if !self.warned.swap(true, Relaxed) {
                tracing::warn!(
                    max_keys = self.max_keys,
                    window_secs = self.window.as_secs(),
                    "idempotency keys forgotten inside their window: the in-memory cap was reached, so a retry \
                     with such a key would be published again (counted in ssegate_idempotency_evicted_total; \
                     logged once)"
                );
            }
        }
        if let Some((id, _)) = seen.ids.get(key) {
            let write = seen.pending.get(key).map(Ticket::follow);
            return Ok((Accepted::one(*id, None), write, false));
        }
        let (p, ticket) = memory.publish(router, target, event, retain, Some(key))?;
        seen.ids.insert(key.clone(), (p.id, now));
        seen.order.push_back(key.clone());
        if let Some(t) = &ticket {
            seen.pending.insert(key.clone(), t.follow());
        }
        Ok((Accepted::one(p.id, Some(p.recipients)), ticket, true))
    }

    /// The keys remembered now, with the sequence number of their event and when (wall clock)
    /// it was published: for the data dir's checkpoint (not those whose write is under way: it
    /// may still fail).
    fn snapshot(&self) -> Vec<(IdempotencyKey, u64, SystemTime)> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.order
            .iter()
            .filter_map(|k| {
                let (id, at) = seen.ids.get(k).filter(|_| !seen.pending.contains_key(k))?;
                let age = now.duration_since(*at);
                (age < self.window).then(|| (k.clone(), id.seq, wall.checked_sub(age).unwrap_or(wall)))
            })
            .collect()
    }

    /// Remembers a key recovered from the data dir, published at `at` (wall clock), if it is
    /// still inside the window.
    fn remember(&self, key: IdempotencyKey, id: EventId, at: SystemTime) {
        let age = SystemTime::now().duration_since(at).unwrap_or(Duration::ZERO);
        if age >= self.window {
            return;
        }
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // A later record with the same key cannot exist (a retry inside the window got the
        // first id), but keep the first one if it does.
        if seen.ids.contains_key(&key) {
            return;
        }
        seen.ids.insert(key.clone(), (id, now.checked_sub(age).unwrap_or(now)));
        seen.order.push_back(key);
    }
}

/// An accepted publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: EventId,
    /// Connections it was queued for, when known at publish time (memory only).
    pub recipients: Option<u64>,
    /// Its id in each partition it was stored in, in partition order, when more than one
    /// (`--nats-partitions`); empty otherwise.
    pub partition_ids: Vec<EventId>,
}

impl Accepted {
    fn one(id: EventId, recipients: Option<u64>) -> Self {
        Self { id, recipients, partition_ids: Vec::new() }
    }

    /// An event stored in each partition of `ids` (never empty), in partition order.
    fn stored(ids: Vec<EventId>) -> Self {
        match ids.as_slice() {
            [one] => Self::one(*one, None),
            [first, ..] => Self { id: *first, recipients: None, partition_ids: ids },
            [] => Self::one(EventId { epoch: 0, seq: 0 }, None),
        }
    }
}

/// Why a publish failed, and whether the event may still have been stored: the first three
/// mean it was not (safe to retry anywhere, with or without the key); `NoAck` and `Lost` mean
/// the outcome is unknown (it may be stored and delivered later: retry with the same
/// idempotency key, which JetStream deduplicates within its duplicate window, and get the
/// first one's id back).
#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    #[error(transparent)]
    Router(#[from] PublishError),
    /// Nothing was sent: the broker is not connected or not answering.
    #[error("not published (nothing was sent; safe to retry): the broker is unavailable: {0}")]
    Unavailable(String),
    /// The broker answered that it did not store the event.
    #[error("not published: {0}")]
    Refused(String),
    /// Sent, but no acknowledgement came in time.
    #[error(
        "outcome unknown: no acknowledgement from JetStream within {timeout:?} (--nats-publish-timeout); the event may \
         still be stored and delivered: retry with the same idempotency_key"
    )]
    NoAck { timeout: std::time::Duration },
    /// Stored in some of the partitions an event is written to, not in all (`--nats-partitions`).
    #[error(
        "outcome partial: stored in {stored} of the {of} partitions it is written to, not in the others ({reason}); \
         retry with the same idempotency_key to complete it"
    )]
    Partial { stored: usize, of: usize, reason: String },
    /// Sent, then the connection failed before an acknowledgement arrived.
    #[error(
        "outcome unknown: the NATS connection failed before JetStream acknowledged ({0}); the event may still be \
         stored and delivered: retry with the same idempotency_key"
    )]
    Lost(String),
}

/// What a replica checks before handing a publish to the broker: it is not shutting down, and
/// a retained value fits its bounds (`--max-retained*`, checked where the publish is taken).
fn broker_admits(router: &Router, target: &Target, event: &Event, retain: Retain) -> Result<(), PublishError> {
    if router.is_closing() {
        return Err(PublishError::ShuttingDown);
    }
    if matches!(retain, Retain::Set { .. }) {
        router.admits_retained(target, event)?;
    }
    Ok(())
}

/// The order of the publishes one caller starts with `Backplane::start_publish`: with a broker,
/// for each partition, the hand-over of the last one started there, which the next one there
/// waits for.
#[derive(Default)]
pub struct PublishOrder(Vec<Option<tokio::sync::oneshot::Receiver<()>>>);

/// One partition's part of a pipelined publish (`Backplane::start_publish`).
struct InPartition {
    k: usize,
    target: Target,
    /// `broker_admits` for that partition's router.
    checked: Result<(), PublishError>,
    /// The previous publish's hand-over in that partition, and this one's.
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    handed_over: tokio::sync::oneshot::Sender<()>,
}

impl PublishOrder {
    /// The hand-over to wait for in partition `k`, replaced by the one that follows it.
    fn next(&mut self, k: usize) -> (Option<tokio::sync::oneshot::Receiver<()>>, tokio::sync::oneshot::Sender<()>) {
        if self.0.len() <= k {
            self.0.resize_with(k + 1, || None);
        }
        let (handed_over, next) = tokio::sync::oneshot::channel::<()>();
        (self.0[k].replace(next), handed_over)
    }
}

impl Backplane {
    /// Publishes; with NATS, returns once JetStream has stored the event.
    pub async fn publish(
        &self,
        routers: &Partitions,
        target: Target,
        event: Event,
        retain: Retain,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<Accepted, BackplaneError> {
        match self {
            Backplane::Memory(memory) => {
                let started = memory.start(routers.first(), target, &event, retain, idempotency_key)?;
                memory.finish(idempotency_key, started).await
            }
            Backplane::Nats(nats) => {
                // The id names the stream that stored it (its epoch may be newer than the router's
                // for a moment, while this replica catches up with a recreated stream).
                let ids = nats.publish(routers, target, event, retain, idempotency_key).await?;
                Ok(Accepted::stored(ids))
            }
        }
    }

    /// This replica's id in cluster answers (`None` in memory: the only replica).
    pub fn replica_id(&self) -> Option<&str> {
        match self {
            Backplane::Memory(_) => None,
            Backplane::Nats(n) => Some(n.cluster.id()),
        }
    }

    /// Asks every replica (or just this process, in memory) about its connections.
    pub async fn gather(&self, routers: &Partitions, query: &cluster::Query) -> cluster::Gathered {
        match self {
            Backplane::Memory(_) => {
                cluster::Gathered { answers: vec![cluster::answer(routers, query)], partial: false }
            }
            Backplane::Nats(n) => match n.cluster.gather(query).await {
                Ok(g) => g,
                Err(e) => {
                    // The broker is away: answer for this replica, and say it is partial.
                    tracing::warn!(error = %e, "cluster query failed; answering for this replica only");
                    cluster::Gathered { answers: vec![cluster::answer(routers, query)], partial: true }
                }
            },
        }
    }

    /// Starts a publish whose outcome is awaited later, for callers that pipeline (the items of
    /// a `PublishStream`), keeping the order in which they are started: in memory, the event is
    /// numbered and handed to the open streams before this returns, and the future only waits
    /// for its write to the data dir (one group commit serves many items). With a broker, the
    /// future hands the event to the connection once the previous publish started with the
    /// same `order` was handed over (so the stream stores them in order), then waits for its
    /// acknowledgement while later ones are handed over.
    pub fn start_publish(
        self: &Arc<Self>,
        routers: &Partitions,
        target: Target,
        event: Event,
        retain: Retain,
        key: Option<IdempotencyKey>,
        order: &mut PublishOrder,
    ) -> BoxFuture<'static, Result<Accepted, BackplaneError>> {
        let this = self.clone();
        match &**self {
            Backplane::Memory(memory) => {
                let started = memory.start(routers.first(), target, &event, retain, key.as_ref());
                async move {
                    // Always the memory backplane (matched above; a backplane never changes kind).
                    let Backplane::Memory(memory) = &*this else { return Err(PublishError::ShuttingDown.into()) };
                    memory.finish(key.as_ref(), started?).await
                }
                .boxed()
            }
            Backplane::Nats(_) => {
                // Each partition the event is written to keeps the caller's order on its own.
                let parts: Vec<InPartition> = routers
                    .split(target)
                    .into_iter()
                    .map(|(k, target)| {
                        let checked = broker_admits(&routers.all()[k], &target, &event, retain);
                        let (previous, handed_over) = order.next(k);
                        InPartition { k, target, checked, previous, handed_over }
                    })
                    .collect();
                async move {
                    let Backplane::Nats(nats) = &*this else { return Err(PublishError::ShuttingDown.into()) };
                    let one = |p: InPartition| {
                        let (event, key) = (event.clone(), key.clone());
                        async move {
                            if let Some(previous) = p.previous {
                                // Sent or dropped once the previous publish was handed over (or failed).
                                let _ = previous.await;
                            }
                            let part = nats.part(p.k);
                            let handed = match p.checked {
                                Ok(()) => part.hand_over(p.target, event, retain, key.as_ref()).await,
                                Err(e) => Err(e.into()),
                            };
                            drop(p.handed_over);
                            part.finish(handed?).await
                        }
                    };
                    let outcomes = futures_util::future::join_all(parts.into_iter().map(one)).await;
                    Ok(Accepted::stored(nats::combine(outcomes)?))
                }
                .boxed()
            }
        }
    }

    /// Whether the backplane can take publishes now: in memory, unless its data dir's last
    /// write failed (`Health::Degraded`: appends are refused for a moment, then tried again) or
    /// it failed for good (`Health::Failed`: until a restart); with NATS, while the broker answers its probe (`nats::HEALTH_EVERY`) and the
    /// replica is not catching up with a recreated stream.
    pub fn is_up(&self) -> bool {
        match self {
            Backplane::Memory(Memory { store: Some(store), .. }) => matches!(store.health(), Health::Ok),
            Backplane::Memory(_) => true,
            Backplane::Nats(n) => n.is_up(),
        }
    }

    /// Times the NATS stream's identity changed (it was recreated) while this process ran (0 in
    /// memory, whose epoch is fixed).
    pub fn epoch_changes(&self) -> u64 {
        match self {
            Backplane::Memory(_) => 0,
            Backplane::Nats(n) => n.epoch_changes(),
        }
    }

    /// How live copies arrived against the stream's order (NATS interest delivery only).
    pub fn order_stats(&self) -> Option<&nats::OrderStats> {
        match self {
            Backplane::Memory(_) => None,
            Backplane::Nats(n) => Some(n.order_stats()),
        }
    }

    /// Retained values the NATS backplane could not write to its bucket (0 in memory, which
    /// keeps them in the router only).
    pub fn retained_persist_failures(&self) -> u64 {
        match self {
            Backplane::Memory(_) => 0,
            Backplane::Nats(n) => n.retained_persist_failures(),
        }
    }

    /// Idempotency keys the memory backplane forgot inside their window because it held
    /// `DEDUPE_MAX_KEYS` (0 with NATS, whose stream keeps them for its whole window).
    pub fn idempotency_evicted(&self) -> u64 {
        match self {
            Backplane::Memory(m) => m.dedupe.evicted.load(Relaxed),
            Backplane::Nats(_) => 0,
        }
    }

    /// Follows `is_up` (`None` in memory: always up).
    pub fn watch_up(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        match self {
            Backplane::Memory(_) => None,
            Backplane::Nats(n) => Some(n.watch_up()),
        }
    }

    /// Rebuilds `router` (made with the store's epoch, before any connection) from what the
    /// data dir recovered: see `durable::restore`. Nothing to do without a data dir.
    pub async fn restore(&self, router: &Router, recovered: Recovered) -> Result<(), StoreError> {
        match self {
            Backplane::Memory(m @ Memory { store: Some(store), .. }) => {
                durable::restore(store, &m.dedupe, router, recovered).await
            }
            _ => Ok(()),
        }
    }

    /// With a data dir, compacts it every `durable::COMPACT_EVERY` until `stop` (returns at
    /// once without one).
    pub async fn maintain(&self, router: &Router, stop: tokio_util::sync::CancellationToken) {
        if let Backplane::Memory(m @ Memory { store: Some(store), .. }) = self {
            durable::compact_until(store.clone(), &m.dedupe, router, stop).await;
        }
    }

    /// The data dir's counters and how many segments it holds (`None` without one).
    pub fn data_dir_stats(&self) -> Option<(crate::store::Stats, usize)> {
        match self {
            Backplane::Memory(Memory { store: Some(store), .. }) => Some((store.stats(), store.segment_starts().len())),
            _ => None,
        }
    }

    /// Whether events are kept in a data dir (`--data-dir`).
    pub fn has_data_dir(&self) -> bool {
        matches!(self, Backplane::Memory(Memory { store: Some(_), .. }))
    }

    /// Why the data dir does not take writes as it should (`None` when it does, or without one).
    pub fn store_trouble(&self) -> Option<String> {
        match self {
            Backplane::Memory(Memory { store: Some(store), .. }) => match store.health() {
                Health::Ok => None,
                Health::Degraded(e) => Some(format!("data dir degraded: the last write failed: {e}")),
                Health::Failed(e) => Some(format!("data dir failed: {e}")),
            },
            _ => None,
        }
    }

    /// Closes the connection to the broker (after every task using it has stopped): pending
    /// messages are flushed and the server sees the client leave at once. With a data dir,
    /// marks the stop clean (`router` closed: its last sequence number is final).
    pub async fn close(&self, router: &Router) {
        match self {
            Backplane::Nats(n) => n.close().await,
            Backplane::Memory(Memory { store: Some(store), .. }) => durable::mark_clean(store, router.last_seq()).await,
            Backplane::Memory(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::RouterConfig;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::parse(s).unwrap()
    }

    #[test]
    fn keys_forgotten_inside_the_window_are_counted_and_a_retry_of_one_is_published_again() {
        let router = Router::new(RouterConfig { epoch: Some(7), ..RouterConfig::with_queue_capacity(16) });
        let memory = Memory { dedupe: Dedupe::new(Duration::from_secs(3600), 2), store: None };
        let dedupe = &memory.dedupe;
        let event = Event { name: None, data: "x".into() };
        let publish =
            |k: &str| dedupe.publish_once(&memory, &router, Target::Broadcast, &event, Retain::No, &key(k)).unwrap().0;
        let a = publish("a");
        assert_eq!(publish("a").id, a.id, "a retry inside the window gets the first id");
        publish("b");
        assert_eq!(dedupe.evicted.load(Relaxed), 0, "at the cap, nothing forgotten yet");
        publish("c");
        assert_eq!(dedupe.evicted.load(Relaxed), 1, "`a` was forgotten inside its window");
        assert_ne!(publish("a").id, a.id, "so its retry is published again");
        assert_eq!(dedupe.evicted.load(Relaxed), 2);
        assert_eq!(Backplane::Memory(memory).idempotency_evicted(), 2);
    }

    #[test]
    fn keys_past_their_window_are_forgotten_without_counting() {
        let router = Router::new(RouterConfig { epoch: Some(7), ..RouterConfig::with_queue_capacity(16) });
        let memory = Memory { dedupe: Dedupe::new(Duration::ZERO, 2), store: None };
        let event = Event { name: None, data: "x".into() };
        for k in ["a", "b", "c", "d"] {
            memory.dedupe.publish_once(&memory, &router, Target::Broadcast, &event, Retain::No, &key(k)).unwrap();
        }
        assert_eq!(memory.dedupe.evicted.load(Relaxed), 0);
    }
}
