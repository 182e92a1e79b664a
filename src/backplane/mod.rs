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
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    domain::{Event, EventId, Retain, Target},
    router::{PublishError, Router},
};

pub enum Backplane {
    Memory(Dedupe),
    Nats(Arc<nats::NatsBackplane>),
}

/// In memory, the idempotency keys seen in the last `window`, with the id each got: the same
/// contract as JetStream's duplicate detection, for one process.
pub struct Dedupe {
    seen: Mutex<Seen>,
    window: Duration,
}

#[derive(Default)]
struct Seen {
    ids: HashMap<String, (EventId, Instant)>,
    /// Keys in the order they were first seen, to forget the oldest first.
    order: VecDeque<String>,
}

/// How many keys are remembered at most (oldest forgotten first).
const DEDUPE_MAX_KEYS: usize = 100_000;

impl Backplane {
    /// In this process only; idempotency keys are remembered for `dedupe_window`.
    pub fn memory(dedupe_window: Duration) -> Self {
        Backplane::Memory(Dedupe { seen: Mutex::default(), window: dedupe_window })
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
        idempotency_key: &str,
    ) -> Result<Accepted, BackplaneError> {
        match self {
            Backplane::Memory(_) if idempotency_key.is_empty() => {
                let p = router.publish_with(target, &event, retain)?;
                Ok(Accepted { id: p.id, recipients: Some(p.recipients) })
            }
            Backplane::Memory(dedupe) => {
                // Held across the publish, so two concurrent retries cannot both get through.
                let mut seen = dedupe.seen.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                // Forget keys past the window, and the oldest beyond the cap.
                while let Some(oldest) = seen.order.front() {
                    let expired = seen.ids.get(oldest).is_none_or(|(_, at)| now.duration_since(*at) >= dedupe.window);
                    if !expired && seen.order.len() < DEDUPE_MAX_KEYS {
                        break;
                    }
                    if let Some(k) = seen.order.pop_front() {
                        seen.ids.remove(&k);
                    }
                }
                if let Some((id, _)) = seen.ids.get(idempotency_key) {
                    return Ok(Accepted { id: *id, recipients: None });
                }
                let p = router.publish_with(target, &event, retain)?;
                seen.ids.insert(idempotency_key.to_owned(), (p.id, now));
                seen.order.push_back(idempotency_key.to_owned());
                Ok(Accepted { id: p.id, recipients: Some(p.recipients) })
            }
            Backplane::Nats(nats) => {
                if router.is_closing() {
                    return Err(PublishError::ShuttingDown.into());
                }
                if matches!(retain, Retain::Set { .. }) {
                    router.admits_retained(&target, &event)?;
                }
                let seq = nats.publish(&target, &event, retain, idempotency_key).await?;
                Ok(Accepted { id: EventId { epoch: router.epoch(), seq }, recipients: None })
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
    /// broker answers its probe (`nats::HEALTH_EVERY`).
    pub fn is_up(&self) -> bool {
        match self {
            Backplane::Memory(_) => true,
            Backplane::Nats(n) => n.is_up(),
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
