//! The NATS backplane over its partitions (`--nats-partitions`): one `NatsBackplane` (stream,
//! retained-values bucket, consumer or follow task, probe) per partition, on one connection,
//! with one `Cluster` (hello, queries, presence) for the replica. An event for users is written
//! to each of their users' partitions; any other event to every partition, and it is
//! acknowledged once every one of them stored it. See ARCHITECTURE.md ("The cluster at scale", goal 3).

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use futures_util::future::{join_all, select_all};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Link, NatsBackplane, NatsError, NatsSettings, OrderStats};
use crate::{
    backplane::{BackplaneError, cluster::Cluster},
    domain::{Event, EventId, IdempotencyKey, Retain, Target},
    router::Partitions,
    telemetry::histogram::Histogram,
};

pub struct NatsStreams {
    /// One per partition, in partition order; never empty.
    parts: Vec<Arc<NatsBackplane>>,
    pub cluster: Arc<Cluster>,
    /// Every partition takes publishes (see `NatsBackplane::is_up`); with one partition, its own.
    up: watch::Sender<bool>,
}

impl NatsStreams {
    /// Connects once, and creates each partition's stream or checks that the existing one fits.
    pub async fn connect(settings: NatsSettings) -> Result<Self, NatsError> {
        let link = Link::connect(&settings).await?;
        let cluster = Cluster::new(link.client.clone(), &settings.subject, settings.cluster_wait);
        let order = Arc::new(OrderStats { late: AtomicU64::new(0), reordered: Histogram::latency() });
        let mut parts = Vec::with_capacity(settings.partitions);
        for k in 0..settings.partitions.max(1) {
            parts.push(Arc::new(
                NatsBackplane::open(&link, settings.for_partition(k), cluster.clone(), order.clone()).await?,
            ));
        }
        Ok(Self { parts, cluster, up: watch::channel(true).0 })
    }

    /// Each partition's epoch now, in partition order.
    pub fn epochs(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.epoch).collect()
    }

    /// Starts the cluster responder once, then each partition (see `NatsBackplane::start`) with
    /// its router, at once; returns when all have caught up.
    pub async fn start(
        self: &Arc<Self>,
        routers: Arc<Partitions>,
        replay_capacity: u64,
        catch_up: Duration,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), NatsError> {
        self.cluster.start(routers.clone(), stop, tracker).await.map_err(|e| NatsError::Stream {
            stream: self.parts[0].settings.stream.clone(),
            reason: format!("cannot subscribe to the control subjects: {e}"),
        })?;
        let started = join_all(
            self.parts
                .iter()
                .zip(routers.all())
                .map(|(part, router)| part.start(router.clone(), replay_capacity, catch_up, stop, tracker)),
        )
        .await;
        started.into_iter().collect::<Result<Vec<()>, _>>()?;
        if self.parts.len() > 1 {
            tracker.spawn(self.clone().combine_up(stop.clone()));
        }
        Ok(())
    }

    /// Keeps `up` at "every partition is up", sent again whenever one partition's changes (so a
    /// follower re-asserts it while down, as it does with one partition).
    async fn combine_up(self: Arc<Self>, stop: CancellationToken) {
        let mut each: Vec<watch::Receiver<bool>> = self.parts.iter().map(|p| p.watch_up()).collect();
        loop {
            let all = each.iter_mut().all(|rx| *rx.borrow_and_update());
            self.up.send_replace(all);
            let changed = select_all(each.iter_mut().map(|rx| Box::pin(rx.changed())));
            tokio::select! {
                () = stop.cancelled() => return,
                (res, _, _) = changed => if res.is_err() { return },
            }
        }
    }

    /// Publishes to the partitions `target` reaches and waits for every acknowledgement; the ids
    /// in partition order (never none). A failure in one partition after another stored the event is
    /// `Partial` (retry with the same idempotency key: JetStream's duplicate detection keeps
    /// the partitions that have it from storing it twice).
    pub async fn publish(
        &self,
        routers: &Partitions,
        target: Target,
        event: Event,
        retain: Retain,
        key: Option<&IdempotencyKey>,
    ) -> Result<Vec<EventId>, BackplaneError> {
        let split = routers.split(target);
        for (k, t) in &split {
            super::super::broker_admits(&routers.all()[*k], t, &event, retain)?;
        }
        let outcomes =
            join_all(split.into_iter().map(|(k, t)| self.parts[k].publish(t, event.clone(), retain, key))).await;
        combine(outcomes)
    }

    pub fn part(&self, k: usize) -> &Arc<NatsBackplane> {
        &self.parts[k]
    }

    pub fn is_up(&self) -> bool {
        self.parts.iter().all(|p| p.is_up())
    }

    pub fn watch_up(&self) -> watch::Receiver<bool> {
        match self.parts.as_slice() {
            [one] => one.watch_up(),
            _ => self.up.subscribe(),
        }
    }

    pub fn epoch_changes(&self) -> u64 {
        self.parts.iter().map(|p| p.epoch_changes()).sum()
    }

    pub fn retained_persist_failures(&self) -> u64 {
        self.parts.iter().map(|p| p.retained_persist_failures()).sum()
    }

    /// How live copies arrived, over every partition (one set of counters for the replica).
    pub fn order_stats(&self) -> &OrderStats {
        &self.parts[0].order
    }

    /// Drains the shared connection (once every task using it has stopped).
    pub async fn close(&self) {
        self.parts[0].close().await;
    }
}

/// One outcome for an event written to several partitions (outcomes in partition order): every
/// id if every one stored it; the failure alone if none did; `Partial` if some did.
pub fn combine(outcomes: Vec<Result<EventId, BackplaneError>>) -> Result<Vec<EventId>, BackplaneError> {
    let of = outcomes.len();
    let mut ids = Vec::with_capacity(of);
    let mut first_err = None;
    for o in outcomes {
        match o {
            Ok(id) => ids.push(id),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        None if !ids.is_empty() => Ok(ids),
        None => Err(BackplaneError::Unavailable("no partition to publish to".into())),
        Some(e) if ids.is_empty() => Err(e),
        Some(e) => Err(BackplaneError::Partial { stored: ids.len(), of, reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> EventId {
        EventId { epoch: 1, seq }
    }

    #[test]
    fn an_event_stored_everywhere_has_every_id_and_one_stored_somewhere_is_partial() {
        assert_eq!(combine(vec![Ok(id(3)), Ok(id(5))]).unwrap(), [id(3), id(5)]);
        let none =
            combine(vec![Err(BackplaneError::Unavailable("a".into())), Err(BackplaneError::Refused("b".into()))]);
        assert!(matches!(none, Err(BackplaneError::Unavailable(_))), "nothing stored: the first failure as it is");
        let some = combine(vec![Ok(id(3)), Err(BackplaneError::Unavailable("down".into())), Ok(id(4))]);
        match some {
            Err(BackplaneError::Partial { stored: 2, of: 3, reason }) => assert!(reason.contains("down")),
            other => panic!("{other:?}"),
        }
    }
}
