//! The hub's driver on this replica: takes the router's changes as they are signalled, hands
//! each batch to the cluster link (if any), ends graces on time, and closes every watch when
//! the replica stops.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Hub, Local};
use crate::{domain::UserId, router::Partitions};

/// Where the driver hands this replica's batches of changes for the other replicas: a bounded
/// queue, and the signal to send the whole set instead when it is full.
pub struct Outbox {
    pub batches: mpsc::Sender<Local>,
    pub resync: Arc<tokio::sync::Notify>,
}

impl Outbox {
    /// Queues a batch, never waiting. When the link is a whole queue behind, the batch is
    /// dropped and the link sends the whole set instead (which includes it).
    fn send(&self, batch: Local) {
        if self.batches.try_send(batch).is_err() {
            tracing::debug!("presence: cluster link queue full; sending the whole set instead");
            self.resync.notify_one();
        }
    }
}

/// Drives the hub on this replica until `stop`: takes the routers' changes as they are
/// signalled (handing each batch to `send`, the cluster link, if any) and ends graces on
/// time. Closes every watch when it stops. (A user's connections are all in one partition's
/// router, so the partitions' changes never concern the same user.)
pub fn start(
    hub: Arc<Hub>,
    routers: &Arc<Partitions>,
    send: Option<Outbox>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) {
    // Users already online (none at start, but the order of start-up need not matter).
    let now: Vec<(UserId, bool, bool)> =
        routers.all().iter().flat_map(|r| r.track_presence()).map(|u| (u, true, true)).collect();
    let routers = routers.clone();
    let first = hub.local(now);
    let stop = stop.clone();
    tracker.spawn(async move {
        if let (Some(first), Some(send)) = (first, &send) {
            send.send(first);
        }
        let mut next: Option<Instant> = None;
        loop {
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                _ = futures_util::future::select_all(routers.all().iter().map(|r| Box::pin(r.presence_changed()))) => {
                    let changes = routers.all().iter().flat_map(|r| r.take_presence_changes()).collect();
                    if let Some(local) = hub.local(changes)
                        && let Some(send) = &send
                    {
                        send.send(local);
                    }
                }
                () = hub.wake.notified() => {}
                () = sleep => {}
            }
            next = hub.expire();
            hub.log_cuts();
        }
        hub.close();
    });
}
