//! Subscribing: a new connection is admitted against the limits, gets what it must see before
//! live events (the replay after its `Last-Event-ID`, or `ssegate.missed`, or the retained
//! events) and is handed to its shard, all in one core critical section, so that nothing
//! published meanwhile falls between its first frames and its live events, or arrives twice.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Instant, SystemTime},
};

use super::{
    ConnId, MissReason, Registration, Router, RouterError, Start, Subscription,
    core::{Ahead, Core},
    mailbox::{Frame, Mailbox, StreamMeta},
    replay::Gap,
    shard::Cmd,
    tables::Conn,
};
use crate::{
    domain::{EventId, EventName, GroupId, Topic, UserId},
    event_stream,
};

impl Router {
    /// Registers a connection. Its mailbox receives every event published to its user, groups,
    /// topics and to everyone from now on. With `resume`, the events it missed since that id
    /// are queued first (or an `ssegate.missed` event if the log cannot tell); without, or
    /// after `ssegate.missed`, the current retained events for it. Either is taken in the same
    /// critical section that hands the connection to its shard, so the handoff to live events
    /// has no gap and no duplicate. Then the cursor, an `ssegate.position` event whose id (and
    /// data) is the newest id, sets the client's last event id to it, so that a reconnect
    /// resumes from here even if no event arrives before it (retained events carry no id: they
    /// never move it backwards).
    pub fn subscribe(self: &Arc<Self>, sub: Subscription) -> Result<Registration, RouterError> {
        self.subscribe_with(sub, StreamMeta::default())
    }

    /// `subscribe`, keeping what the edge knows of the stream (`meta`) for the console.
    pub fn subscribe_with(self: &Arc<Self>, sub: Subscription, meta: StreamMeta) -> Result<Registration, RouterError> {
        let Subscription { user, mut groups, mut topics, abort, resume } = sub;
        groups.sort_unstable();
        groups.dedup();
        topics.sort_unstable();
        topics.dedup();
        let mailbox = Arc::new(Mailbox::with_meta(self.bounds, abort, meta));
        let shard = self.shard_of(&user);
        let mut core = self.lock();
        if let Err(e) = self.admit(&core, &user) {
            drop(core);
            self.counters.rejected.fetch_add(1, Relaxed);
            return Err(e);
        }
        let now = Instant::now();
        core.log.expire(now);
        let epoch = core.epoch;
        let newest = EventId { epoch, seq: core.last_seq };
        // A client resuming after an id this router has not received yet (another replica of
        // a shared sequence issued it): it is served from there on as the events arrive, those
        // up to its id skipped (`floor`), and its cursor stays at its own id. Telling it
        // "missed" and sending our older cursor would move its id backwards and repeat events.
        // Whether the stream really issued that id is settled by the broker (`settle_ahead`).
        let ahead = resume.filter(|last| self.shared_sequence && last.epoch == epoch && last.seq > newest.seq);
        let floor = ahead.map_or(0, |last| last.seq);
        let (start, mut preload) = match resume {
            None => (Start::Fresh, Vec::new()),
            Some(last) if last.epoch != epoch => (Start::Missed(MissReason::OtherEpoch), Vec::new()),
            Some(_) if ahead.is_some() => (Start::Resumed { replayed: 0 }, Vec::new()),
            Some(last) if last.seq > newest.seq => (Start::Missed(MissReason::Unknown), Vec::new()),
            Some(last) => match core.log.missed(last.seq, &user, &groups, &topics) {
                Ok(frames) => {
                    let frames: Vec<Frame> = frames.cloned().collect();
                    (Start::Resumed { replayed: frames.len() }, frames)
                }
                Err(Gap::Expired) => (Start::Missed(MissReason::Expired), Vec::new()),
            },
        };
        if let (Start::Missed(reason), Some(last)) = (start, resume) {
            preload.push(missed_frame(reason.as_str(), last, now));
        }
        let mut retained = 0;
        if matches!(start, Start::Fresh | Start::Missed(_)) {
            let state = core.retained.snapshot(&user, &groups, &topics, SystemTime::now());
            retained = state.len();
            preload.extend(state.into_iter().map(|bytes| Frame { bytes, published_at: now, is_event: true }));
        }
        let cursor = ahead.unwrap_or(newest);
        preload.push(Frame { bytes: event_stream::position(cursor), published_at: now, is_event: false });
        mailbox.preload(preload);
        // A served resume gets every event after its id; any other start, those after its cursor.
        let from = match (start, resume) {
            (Start::Resumed { .. }, Some(last)) => last.seq,
            _ => cursor.seq,
        };
        mailbox.start_at(from, cursor.seq);
        let id = core.join(&user, &groups, &topics);
        let (groups, topics): (Box<[GroupId]>, Box<[Topic]>) = (groups.into(), topics.into());
        if let Some(resume) = ahead {
            core.ahead.push(Ahead {
                conn: id,
                shard,
                resume,
                user: user.clone(),
                groups: groups.clone(),
                topics: topics.clone(),
            });
        }
        let conn = Conn::new(mailbox.clone(), user, groups, topics, floor);
        self.shards[shard].submit(Cmd::Register(id, conn));
        let presence_changed = core.take_presence_signal();
        drop(core);
        self.run_shard(shard);
        if presence_changed {
            self.presence_changed.notify_one();
        }
        if ahead.is_some() {
            self.unsettled.notify_one();
        }
        self.counters.opened.fetch_add(1, Relaxed);
        self.counters.retained_sent.fetch_add(retained as u64, Relaxed);
        // A resume ahead of this router is counted once the broker settles it.
        let outcome = match start {
            Start::Fresh => None,
            Start::Resumed { .. } if ahead.is_some() => None,
            Start::Resumed { replayed } => {
                self.counters.replayed.fetch_add(replayed as u64, Relaxed);
                Some(0)
            }
            Start::Missed(reason) => {
                self.counters.missed.fetch_add(1, Relaxed);
                Some(outcome_index(reason))
            }
        };
        if let Some(i) = outcome {
            self.counters.resumes[i].fetch_add(1, Relaxed);
        }
        Ok(Registration::new(self.clone(), id, shard, mailbox, start))
    }

    /// The id of the connection registered last: a stream position read after this call is at
    /// least every id a connection up to it resumed from, if the stream issued that id.
    pub fn ahead_mark(&self) -> ConnId {
        self.lock().last_conn()
    }

    /// Waits until a connection registers with a resume id ahead of this router (see
    /// `settle_ahead`); returns at once if one did since the last call.
    pub async fn unsettled(&self) {
        self.unsettled.notified().await;
    }

    /// Settles the connections that resumed after an id this router had not received yet, now
    /// that the shared stream of `epoch` is known to have reached `stream_last` at a moment
    /// after connection `mark` registered (see `ahead_mark`). Those up to `mark` whose id is
    /// beyond it were given an id the stream never issued: each gets `ssegate.missed`
    /// (`unknown`, as with one process), its retained values and the cursor
    /// (`ssegate.position`) of the newest event, and from then on every event (no floor); the
    /// others keep waiting for their events, which are on their way. Later connections are
    /// settled by a later call. Returns how many were told.
    pub fn settle_ahead(&self, epoch: u64, stream_last: u64, mark: ConnId) -> usize {
        let mut core = self.lock();
        if core.epoch != epoch || core.ahead.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let cursor = EventId { epoch, seq: core.last_seq };
        let mut shards = 0u64;
        let (mut told, mut waited, mut retained) = (0, 0, 0);
        let mut keep = Vec::new();
        for a in std::mem::take(&mut core.ahead) {
            if a.conn > mark {
                keep.push(a);
                continue;
            }
            if a.resume.seq <= stream_last {
                waited += 1;
                continue;
            }
            let mut frames = vec![missed_frame(MissReason::Unknown.as_str(), a.resume, now)];
            let state = core.retained.snapshot(&a.user, &a.groups, &a.topics, wall);
            retained += state.len();
            frames.extend(state.into_iter().map(|bytes| Frame { bytes, published_at: now, is_event: true }));
            frames.push(Frame { bytes: event_stream::position(cursor), published_at: now, is_event: false });
            self.shards[a.shard].submit(Cmd::Tell(a.conn, frames));
            shards |= 1 << (a.shard % 64);
            told += 1;
        }
        core.ahead = keep;
        drop(core);
        for i in (0..self.shards.len()).filter(|i| shards & (1 << i) != 0) {
            self.run_shard(i);
        }
        self.counters.resumes[0].fetch_add(waited, Relaxed);
        self.counters.resumes[outcome_index(MissReason::Unknown)].fetch_add(told as u64, Relaxed);
        self.counters.missed.fetch_add(told as u64, Relaxed);
        self.counters.retained_sent.fetch_add(retained as u64, Relaxed);
        told
    }

    /// Whether one more connection of `user` may open now: checked again by `subscribe`; the
    /// edge asks first so that a refused connection costs the broker nothing (`follow`).
    pub fn admits(&self, user: &UserId) -> Result<(), RouterError> {
        let admitted = self.admit(&self.lock(), user);
        if admitted.is_err() {
            self.counters.rejected.fetch_add(1, Relaxed);
        }
        admitted
    }

    /// Whether one more connection of `user` may open now.
    fn admit(&self, core: &Core, user: &UserId) -> Result<(), RouterError> {
        if core.closing {
            return Err(RouterError::ShuttingDown);
        }
        if core.connections() >= self.max_connections as u64 {
            return Err(RouterError::TooManyConnections { limit: self.max_connections });
        }
        if core.user_count(user) >= self.max_connections_per_user as u64 {
            return Err(RouterError::TooManyForUser { limit: self.max_connections_per_user });
        }
        Ok(())
    }
}

/// Where a miss is counted in `RESUME_OUTCOMES`.
fn outcome_index(reason: MissReason) -> usize {
    match reason {
        MissReason::Expired => 1,
        MissReason::Unknown => 2,
        MissReason::OtherEpoch => 3,
    }
}

/// The `ssegate.missed` event: `last` could not be resumed from, so the client may have
/// missed events and should refetch its state. Its data is a small JSON object.
pub(super) fn missed_frame(reason: &str, last: EventId, now: Instant) -> Frame {
    // Both values are from fixed alphabets (a reason name; hex, digits and `-`), so they need
    // no JSON escaping.
    let data = format!(r#"{{"reason":"{reason}","last_event_id":"{last}"}}"#);
    let name = EventName::reserved("missed");
    Frame {
        bytes: event_stream::encode(Some(name.as_str()), &data).finish_without_id(),
        published_at: now,
        is_event: false,
    }
}
