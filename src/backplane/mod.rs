//! Where a published event goes. `Memory`: straight into this process's router, which numbers
//! it. `Nats`: into a NATS JetStream stream, acknowledged once stored; every replica consumes
//! the stream in order and hands each event to its own router with the stream's sequence
//! number, so an event has the same id everywhere and a browser can resume on any replica.

pub mod cluster;
pub mod nats;
mod retained_kv;
mod wire;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use crate::{
    domain::{Event, EventId, IdempotencyKey, Retain, Target},
    router::{PublishError, Router},
};

pub enum Backplane {
    Memory(Dedupe),
    Nats(Arc<nats::NatsBackplane>),
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
}

/// How many keys are remembered at most (oldest forgotten first, even inside the window): the
/// memory a publisher inventing keys can pin is bounded (256-byte keys: about 35 MB).
pub const DEDUPE_MAX_KEYS: usize = 100_000;

impl Backplane {
    /// In this process only; idempotency keys are remembered for `dedupe_window`.
    pub fn memory(dedupe_window: Duration) -> Self {
        Backplane::Memory(Dedupe::new(dedupe_window, DEDUPE_MAX_KEYS))
    }
}

impl Dedupe {
    fn new(window: Duration, max_keys: usize) -> Self {
        Self { seen: Mutex::default(), window, max_keys, evicted: AtomicU64::new(0), warned: AtomicBool::new(false) }
    }

    /// Publishes through `router` unless `key` was seen within the window, in which case the
    /// first publish's id is returned and nothing is published.
    fn publish(
        &self,
        router: &Router,
        target: Target,
        event: &Event,
        retain: Retain,
        key: &IdempotencyKey,
    ) -> Result<Accepted, BackplaneError> {
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
            return Ok(Accepted { id: *id, recipients: None });
        }
        let p = router.publish_with(target, event, retain)?;
        seen.ids.insert(key.clone(), (p.id, now));
        seen.order.push_back(key.clone());
        Ok(Accepted { id: p.id, recipients: Some(p.recipients) })
    }
}

/// An accepted publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub id: EventId,
    /// Connections it was queued for, when known at publish time (memory only).
    pub recipients: Option<u64>,
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
    /// Sent, then the connection failed before an acknowledgement arrived.
    #[error(
        "outcome unknown: the NATS connection failed before JetStream acknowledged ({0}); the event may still be \
         stored and delivered: retry with the same idempotency_key"
    )]
    Lost(String),
}

impl Backplane {
    /// Publishes; with NATS, returns once JetStream has stored the event.
    pub async fn publish(
        &self,
        router: &Router,
        target: Target,
        event: Event,
        retain: Retain,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<Accepted, BackplaneError> {
        match self {
            Backplane::Memory(dedupe) => match idempotency_key {
                None => {
                    let p = router.publish_with(target, &event, retain)?;
                    Ok(Accepted { id: p.id, recipients: Some(p.recipients) })
                }
                Some(key) => dedupe.publish(router, target, &event, retain, key),
            },
            Backplane::Nats(nats) => {
                if router.is_closing() {
                    return Err(PublishError::ShuttingDown.into());
                }
                if matches!(retain, Retain::Set { .. }) {
                    router.admits_retained(&target, &event)?;
                }
                // The id names the stream that stored it (its epoch may be newer than the router's
                // for a moment, while this replica catches up with a recreated stream).
                let id = nats.publish(&target, &event, retain, idempotency_key).await?;
                Ok(Accepted { id, recipients: None })
            }
        }
    }

    /// Asks every replica (or just this process, in memory) about its connections.
    pub async fn gather(&self, router: &Router, query: &cluster::Query) -> cluster::Gathered {
        match self {
            Backplane::Memory(_) => cluster::Gathered { answers: vec![cluster::answer(router, query)], partial: false },
            Backplane::Nats(n) => match n.cluster.gather(query).await {
                Ok(g) => g,
                Err(e) => {
                    // The broker is away: answer for this replica, and say it is partial.
                    tracing::warn!(error = %e, "cluster query failed; answering for this replica only");
                    cluster::Gathered { answers: vec![cluster::answer(router, query)], partial: true }
                }
            },
        }
    }

    /// Whether the backplane can take publishes now: always in memory; with NATS, while the
    /// broker answers its probe (`nats::HEALTH_EVERY`) and the replica is not catching up with a
    /// recreated stream.
    pub fn is_up(&self) -> bool {
        match self {
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
            Backplane::Memory(d) => d.evicted.load(Relaxed),
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

    /// Closes the connection to the broker (after every task using it has stopped): pending
    /// messages are flushed and the server sees the client leave at once.
    pub async fn close(&self) {
        if let Backplane::Nats(n) = self {
            n.close().await;
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
        let dedupe = Dedupe::new(Duration::from_secs(3600), 2);
        let event = Event { name: None, data: "x".into() };
        let publish = |k: &str| dedupe.publish(&router, Target::Broadcast, &event, Retain::No, &key(k)).unwrap();
        let a = publish("a");
        assert_eq!(publish("a").id, a.id, "a retry inside the window gets the first id");
        publish("b");
        assert_eq!(dedupe.evicted.load(Relaxed), 0, "at the cap, nothing forgotten yet");
        publish("c");
        assert_eq!(dedupe.evicted.load(Relaxed), 1, "`a` was forgotten inside its window");
        assert_ne!(publish("a").id, a.id, "so its retry is published again");
        assert_eq!(dedupe.evicted.load(Relaxed), 2);
        assert_eq!(Backplane::Memory(dedupe).idempotency_evicted(), 2);
    }

    #[test]
    fn keys_past_their_window_are_forgotten_without_counting() {
        let router = Router::new(RouterConfig { epoch: Some(7), ..RouterConfig::with_queue_capacity(16) });
        let dedupe = Dedupe::new(Duration::ZERO, 2);
        let event = Event { name: None, data: "x".into() };
        for k in ["a", "b", "c", "d"] {
            dedupe.publish(&router, Target::Broadcast, &event, Retain::No, &key(k)).unwrap();
        }
        assert_eq!(dedupe.evicted.load(Relaxed), 0);
    }
}
