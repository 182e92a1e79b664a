//! Where a published event goes. `Memory`: straight into this process's router, which numbers
//! it. `Nats`: into a NATS JetStream stream, acknowledged once stored; every replica consumes
//! the stream in order and hands each event to its own router with the stream's sequence
//! number, so an event has the same id everywhere and a browser can resume on any replica.

pub mod cluster;
pub mod nats;
mod wire;

use std::sync::Arc;

use crate::{
    domain::{Event, EventId, Target},
    router::{Router, RouterError},
};

pub enum Backplane {
    Memory,
    Nats(Arc<nats::NatsBackplane>),
}

/// An accepted publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub id: EventId,
    /// Connections it was queued for, when known at publish time (memory only).
    pub recipients: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

impl Backplane {
    /// Publishes; with NATS, returns once JetStream has stored the event.
    pub async fn publish(
        &self,
        router: &Router,
        target: Target,
        event: Event,
        idempotency_key: &str,
    ) -> Result<Accepted, BackplaneError> {
        match self {
            Backplane::Memory => {
                let p = router.publish(target, &event)?;
                Ok(Accepted { id: p.id, recipients: Some(p.recipients) })
            }
            Backplane::Nats(nats) => {
                if router.is_closing() {
                    return Err(RouterError::ShuttingDown.into());
                }
                let seq = nats.publish(&target, &event, idempotency_key).await?;
                Ok(Accepted { id: EventId { epoch: router.epoch(), seq }, recipients: None })
            }
        }
    }

    /// Asks every replica (or just this process, in memory) about its connections.
    pub async fn gather(&self, router: &Router, query: &cluster::Query) -> cluster::Gathered {
        match self {
            Backplane::Memory => cluster::Gathered { answers: vec![cluster::answer(router, query)], partial: false },
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

    /// Whether the backplane can take publishes now (for readiness).
    pub fn is_healthy(&self) -> bool {
        match self {
            Backplane::Memory => true,
            Backplane::Nats(n) => n.is_connected(),
        }
    }
}
