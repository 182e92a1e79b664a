//! Publishing: an event gets its id, its place in the replay log and its place in the shards'
//! inboxes in one short core critical section; the shards then fan it out.

use std::{
    sync::{Arc, MutexGuard, atomic::Ordering::Relaxed},
    time::Instant,
};

use bytes::Bytes;

use super::{
    PublishError, Published, Router, core::Core, mailbox::Frame, replay::Logged, shard::Cmd, stats::target_index,
};
use crate::{
    domain::{Event, EventId, EventName, Retain, Target},
    event_stream,
};

/// An event encoded outside the lock: for the live stream (its id appended under the lock),
/// and, when it sets a retained value, once more without an id.
pub(super) struct Encoded {
    partial: event_stream::PartialEvent,
    pub retained: Option<Bytes>,
}

impl Encoded {
    pub fn new(event: &Event, retain: Retain) -> Self {
        let name = event.name.as_ref().map(EventName::as_str);
        let retained =
            matches!(retain, Retain::Set { .. }).then(|| event_stream::encode(name, &event.data).finish_without_id());
        Self { partial: event_stream::encode(name, &event.data), retained }
    }
}

impl Router {
    /// Publishes a plain event (see `publish_with`).
    pub fn publish(&self, target: Target, event: &Event) -> Result<Published, PublishError> {
        self.publish_with(target, event, Retain::No)
    }

    /// Publishes an event: assigns its id, applies `retain` to the retained value of its
    /// target and name, and queues it for every addressed connection. Never waits on a
    /// subscriber; connections whose queue is full are cut off. A retained value that does not
    /// fit the store's bounds refuses the publish, with nothing changed.
    pub fn publish_with(&self, target: Target, event: &Event, retain: Retain) -> Result<Published, PublishError> {
        // Encode outside the lock; only the id is appended under it.
        let encoded = Encoded::new(event, retain);
        let mut core = self.lock();
        if core.closing {
            return Err(PublishError::ShuttingDown);
        }
        if let Some(frame) = &encoded.retained {
            core.retained.admits(&target, event.name.as_ref(), frame.len())?;
        }
        let seq = core.last_seq + 1;
        Ok(self.sequence(core, seq, target, event.name.as_ref(), retain, encoded))
    }

    /// Whether a retained value of `event` for `target` would fit the store now: a broker
    /// backplane asks before sending (every replica then applies it, in stream order).
    pub fn admits_retained(&self, target: &Target, event: &Event) -> Result<(), PublishError> {
        let frame_len =
            event_stream::encode(event.name.as_ref().map(EventName::as_str), &event.data).finish_without_id().len();
        Ok(self.lock().retained.admits(target, event.name.as_ref(), frame_len)?)
    }

    /// Publishes an event whose sequence number a broker assigned (the NATS backplane): the
    /// same event gets the same id on every replica, and updates the retained values the same
    /// way on each (without a bound check: replicas must agree; `admits_retained` bounded it
    /// before it was sent). A sequence number not above the last one is a redelivery and is
    /// ignored (`None`), so a browser never gets an event twice.
    pub fn publish_sequenced(&self, seq: u64, target: Target, event: &Event, retain: Retain) -> Option<Published> {
        let encoded = Encoded::new(event, retain);
        let core = self.lock();
        if seq <= core.last_seq {
            return None;
        }
        Some(self.sequence(core, seq, target, event.name.as_ref(), retain, encoded))
    }

    /// Loads a retained value kept by a broker (at start, before the stream is consumed): it
    /// stands until an event later than `seq` replaces or clears it.
    pub fn load_retained(&self, seq: u64, target: &Target, event: &Event, retain: Retain) {
        let encoded = Encoded::new(event, retain);
        self.lock().retained.apply(seq, target, event.name.as_ref(), retain, encoded.retained.as_ref());
    }

    /// Under the core lock: makes `seq` the last sequence number, logs the event for replay and
    /// hands it to the shards that may hold its recipients; then, outside the lock, lets those
    /// shards fan it out.
    fn sequence(
        &self,
        mut core: MutexGuard<'_, Core>,
        seq: u64,
        target: Target,
        name: Option<&EventName>,
        retain: Retain,
        encoded: Encoded,
    ) -> Published {
        let published_at = Instant::now();
        let kind = target_index(&target);
        core.last_seq = seq;
        if retain != Retain::No {
            core.retained.apply(seq, &target, name, retain, encoded.retained.as_ref());
        }
        let partial = encoded.partial;
        let id = EventId { epoch: core.epoch, seq };
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
