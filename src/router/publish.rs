//! Publishing: an event gets its id, its place in the replay log and its place in the shards'
//! inboxes in one short core critical section; the shards then fan it out.

use std::{
    sync::{Arc, MutexGuard, atomic::Ordering::Relaxed},
    time::Instant,
};

use super::{
    Published, Router, RouterError, core::Core, mailbox::Frame, replay::Logged, shard::Cmd, stats::target_index,
};
use crate::{
    domain::{Event, EventId, EventName, Target},
    event_stream,
};

impl Router {
    /// Publishes an event: assigns its id and queues it for every addressed connection. Never
    /// waits on a subscriber; connections whose queue is full are cut off.
    pub fn publish(&self, target: Target, event: &Event) -> Result<Published, RouterError> {
        // Encode outside the lock; only the id is appended under it.
        let partial = event_stream::encode(event.name.as_ref().map(EventName::as_str), &event.data);
        let core = self.lock();
        if core.closing {
            return Err(RouterError::ShuttingDown);
        }
        let seq = core.last_seq + 1;
        Ok(self.sequence(core, seq, target, partial))
    }

    /// Publishes an event whose sequence number a broker assigned (the NATS backplane): the
    /// same event gets the same id on every replica. A sequence number not above the last one
    /// is a redelivery and is ignored (`None`), so a browser never gets an event twice.
    pub fn publish_sequenced(&self, seq: u64, target: Target, event: &Event) -> Option<Published> {
        let partial = event_stream::encode(event.name.as_ref().map(EventName::as_str), &event.data);
        let core = self.lock();
        if seq <= core.last_seq {
            return None;
        }
        Some(self.sequence(core, seq, target, partial))
    }

    /// Under the core lock: makes `seq` the last sequence number, logs the event for replay and
    /// hands it to the shards that may hold its recipients; then, outside the lock, lets those
    /// shards fan it out.
    fn sequence(
        &self,
        mut core: MutexGuard<'_, Core>,
        seq: u64,
        target: Target,
        partial: event_stream::PartialEvent,
    ) -> Published {
        let published_at = Instant::now();
        let kind = target_index(&target);
        core.last_seq = seq;
        let id = EventId { epoch: self.epoch, seq };
        let recipients = core.recipients(&target);
        let shards = self.shards_for(&target);
        let logged =
            Arc::new(Logged { seq, target, frame: Frame { bytes: partial.finish(id), published_at, is_event: true } });
        for i in shards.iter() {
            self.shards[i].submit(Cmd::Event(logged.clone()));
        }
        core.log.push(seq, logged);
        core.log.expire(published_at);
        drop(core);
        for i in shards.iter() {
            self.run_shard(i);
        }
        self.counters.published.fetch_add(1, Relaxed);
        self.counters.published_by_target[kind].fetch_add(1, Relaxed);
        Published { id, recipients }
    }

    /// The shards that may hold connections `target` addresses.
    fn shards_for(&self, target: &Target) -> ShardSet {
        let n = self.shards.len();
        match target {
            Target::Users(users) if users.len() < n => {
                ShardSet::Some(users.iter().fold(0u64, |set, u| set | 1 << (self.shard_of(u) % 64)))
            }
            _ => ShardSet::All(n),
        }
    }
}

/// A set of shard indexes: a bit set when the target names fewer users than there are
/// shards, else all of them.
enum ShardSet {
    Some(u64),
    All(usize),
}

impl ShardSet {
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let (bits, n) = match *self {
            ShardSet::Some(bits) => (bits, 64),
            ShardSet::All(n) => (u64::MAX, n),
        };
        (0..n).filter(move |i| bits & (1 << i) != 0)
    }
}
