//! Each shard's timer task: heartbeats on idle connections, the end of coalescing windows, and
//! (shard 0) the age-based eviction of the replay log.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Router, mailbox::Frame, tables, tables::Effects};
use crate::event_stream;

/// Heartbeats of a shard go out in this many slots per interval, spreading wake-ups over time.
const HEARTBEAT_SLOTS: u64 = 16;

impl Router {
    /// Runs `f` on shard `i`'s tables (blocking briefly), then applies what was submitted
    /// meanwhile: a submitter that found the lock taken left its command to us.
    pub(super) fn with_shard_tables<R>(&self, i: usize, f: impl FnOnce(&mut tables::Tables) -> R) -> R {
        let r = self.shards[i].with_tables(f);
        self.run_shard(i);
        r
    }

    /// Starts each shard's timer task: heartbeats on idle connections (spread over
    /// `HEARTBEAT_SLOTS` slots of the interval), the end of coalescing windows, and (shard 0)
    /// the age-based eviction of the replay log. The tasks end when `stop` is cancelled.
    pub fn start_timers(self: &Arc<Self>, heartbeat: Duration, stop: &CancellationToken, tracker: &TaskTracker) {
        for i in 0..self.shards.len() {
            tracker.spawn(self.clone().shard_timer(i, heartbeat, stop.clone()));
        }
    }

    async fn shard_timer(self: Arc<Self>, i: usize, heartbeat: Duration, stop: CancellationToken) {
        let frame = Frame {
            bytes: bytes::Bytes::from_static(event_stream::HEARTBEAT),
            published_at: Instant::now(),
            is_event: false,
        };
        let mut tick = tokio::time::interval((heartbeat / HEARTBEAT_SLOTS as u32).max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slot = 0;
        // The end of the earliest coalescing window of a deferred writer, if any waits.
        let mut flush_at = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.shards[i].flush.notified() => {}
                () = sleep_until(flush_at), if flush_at.is_some() => {
                    let mut fx = Effects::default();
                    self.with_shard_tables(i, |t| t.flush_due(self.write_coalesce, Instant::now(), &mut fx));
                    self.finish(i, fx);
                }
                _ = tick.tick() => {
                    let mut fx = Effects::default();
                    self.with_shard_tables(i, |t| t.heartbeat(slot, HEARTBEAT_SLOTS, &frame, Instant::now(), &mut fx));
                    self.finish(i, fx);
                    if i == 0 && slot == 0 {
                        self.expire_replay();
                    }
                    slot = (slot + 1) % HEARTBEAT_SLOTS;
                }
            }
            flush_at = self.with_shard_tables(i, |t| t.flush_at());
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}
