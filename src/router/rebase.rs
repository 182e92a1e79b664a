//! A new epoch: the broker's stream was recreated (deleted, or the broker lost its store), so
//! the ids this router assigned can no longer be served and sequence numbers start again.
//! Every open connection is told in the core critical section that switches the epoch, so no
//! event of the new epoch can reach it before it knows.

use std::{
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;

use super::{Router, mailbox::Frame, publish::Encoded, retained::Frozen, shard::Cmd, subscribe::missed_frame};
use crate::{
    domain::{Event, EventId, GroupId, Retain, Target, Topic, UserId},
    event_stream,
};

/// The `reason` of the `ssegate.missed` event sent to every open connection when the ids start
/// a new epoch (the stream was recreated): events may have been lost with the old stream, and
/// an id of the old epoch can no longer be resumed from.
pub const STREAM_RECREATED: &str = "stream_recreated";

/// A retained value kept by the broker, to load into the router.
#[derive(Clone, Debug)]
pub struct KeptValue {
    /// The sequence number of the event that set it in the current stream; 0 if it was set in
    /// an older one (any event of this stream replaces it).
    pub seq: u64,
    pub target: Target,
    pub event: Event,
    pub retain: Retain,
}

/// What each connection is told at a rebase, shared by the shards.
pub(super) struct Rebased {
    missed: Frame,
    cursor: Frame,
    retained: Frozen,
    now: SystemTime,
}

impl Rebased {
    /// The frames for a connection of `user` in `groups` and `topics`: `ssegate.missed`, its
    /// retained values, and the cursor of the new epoch, `ssegate.position` with id `<epoch>-0`
    /// (as a resume that missed gets).
    pub fn frames_for(&self, user: &UserId, groups: &[GroupId], topics: &[Topic]) -> Vec<Frame> {
        let state = self.retained.snapshot(user, groups, topics, self.now);
        let at = self.missed.published_at;
        let mut frames = Vec::with_capacity(state.len() + 2);
        frames.push(self.missed.clone());
        frames.extend(state.into_iter().map(|bytes: Bytes| Frame { bytes, published_at: at, is_event: true }));
        frames.push(self.cursor.clone());
        frames
    }
}

impl Router {
    /// Switches to `epoch` (the identity of a recreated stream): the sequence starts again at 0,
    /// the replay log and the retained values of the old stream are dropped and `values` (kept
    /// by the broker) loaded instead, and every open connection gets `ssegate.missed`
    /// (`STREAM_RECREATED`, with the newest id of the old epoch), its retained values and the
    /// cursor `<epoch>-0`, in that order and before any event of the new epoch. A resume from an
    /// old id is then `other_epoch`. Returns how many connections were told, or `None` if the
    /// epoch was already `epoch`.
    pub fn rebase(&self, epoch: u64, values: Vec<KeptValue>) -> Option<u64> {
        // Encoded outside the lock, as a publish does.
        let values: Vec<_> = values.into_iter().map(|v| (Encoded::new(&v.event, v.retain), v)).collect();
        let now = Instant::now();
        let mut core = self.lock();
        if core.epoch == epoch {
            return None;
        }
        let old = EventId { epoch: core.epoch, seq: core.last_seq };
        core.epoch = epoch;
        core.last_seq = 0;
        core.log.clear();
        core.retained.clear();
        // Connections that waited for an id of the old stream are told like every other one.
        core.ahead.clear();
        for (encoded, v) in &values {
            core.retained.apply(v.seq, &v.target, v.event.name.as_ref(), v.retain, encoded.retained.as_ref());
        }
        let rebased = Arc::new(Rebased {
            missed: missed_frame(STREAM_RECREATED, old, now),
            cursor: Frame {
                bytes: event_stream::position(EventId { epoch, seq: 0 }),
                published_at: now,
                is_event: false,
            },
            retained: core.retained.freeze(),
            now: SystemTime::now(),
        });
        let told = core.connections();
        for shard in self.shards.iter() {
            shard.submit(Cmd::Rebase(rebased.clone()));
        }
        drop(core);
        for i in 0..self.shards.len() {
            self.run_shard(i);
        }
        Some(told)
    }
}
