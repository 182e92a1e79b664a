//! Publishing: an event gets its id, its place in the replay log and its place in the shards'
//! inboxes in one short core critical section; the shards then fan it out.

use std::{
    convert::Infallible,
    fmt::Display,
    sync::{Arc, MutexGuard, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{
    PublishError, Published, Router,
    core::Core,
    mailbox::Frame,
    replay::{Inserted, Logged},
    shard::Cmd,
    stats::target_index,
};
use crate::{
    domain::{Event, EventId, EventName, Retain, Target},
    event_stream,
};

/// How `Router::publish_late` applied an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Newer than the last one: published as usual.
    InOrder,
    /// Older than the last one and new to the log: logged in its place and delivered where it
    /// still could be in order (`ssegate.missed`, `late`, elsewhere).
    Late,
    /// The log had it already (a copy of an event read from the stream before).
    Duplicate,
}

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
        self.publish_journaled(target, event, retain, |_| Ok::<(), Infallible>(())).map(|(p, ())| p)
    }

    /// `publish_with`, calling `journal` under the core lock with the sequence number the event
    /// is about to get, after every check that could refuse it and before anything changes: a
    /// durable backplane appends the event to its log there, so records reach the log in
    /// sequence order and no other event can take the number meanwhile. `journal` must be
    /// short (no I/O, no waiting: the lock orders every publish and subscription). An `Err`
    /// refuses the publish with nothing changed (`PublishError::NotStored`, its reason).
    pub fn publish_journaled<T, E: Display>(
        &self,
        target: Target,
        event: &Event,
        retain: Retain,
        journal: impl FnOnce(u64) -> Result<T, E>,
    ) -> Result<(Published, T), PublishError> {
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
        let journaled = journal(seq).map_err(|e| PublishError::NotStored(e.to_string()))?;
        Ok((self.sequence(core, seq, target, event.name.as_ref(), retain, encoded, None), journaled))
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
        self.publish_aged(seq, target, event, retain, None)
    }

    /// `publish_sequenced` of an event published `age` ago (restored from the data dir at
    /// start): the replay log ages it from then, so `--replay-max-age` holds across a restart.
    pub fn publish_restored(
        &self,
        seq: u64,
        target: Target,
        event: &Event,
        retain: Retain,
        age: Duration,
    ) -> Option<Published> {
        self.publish_aged(seq, target, event, retain, Some(age))
    }

    fn publish_aged(
        &self,
        seq: u64,
        target: Target,
        event: &Event,
        retain: Retain,
        age: Option<Duration>,
    ) -> Option<Published> {
        let encoded = Encoded::new(event, retain);
        let core = self.lock();
        if seq <= core.last_seq {
            return None;
        }
        Some(self.sequence(core, seq, target, event.name.as_ref(), retain, encoded, age))
    }

    /// Logs an event older than the last one applied (interest delivery: a followed user's
    /// event fetched from the broker before its connections register), in its place in the
    /// replay log, without handing it to any connection: those that need it resume from the
    /// log. A retained update in it applies only if it is newer than the value held. An event
    /// not older than the last one is published as usual.
    pub fn insert_sequenced(&self, seq: u64, target: Target, event: &Event, retain: Retain) {
        self.behind(seq, target, event, retain, false);
    }

    /// An event older than the last one applied that was not applied yet (interest delivery:
    /// its live copy arrived behind later ones): logged in its place, and queued for each
    /// addressed connection that has not been sent a later event; the others get
    /// `ssegate.missed` (`late`, with the id before it); nothing if the log already had it (`Applied::Duplicate`). An
    /// event newer than the last one is published as usual (`Applied::InOrder`).
    pub fn publish_late(&self, seq: u64, target: Target, event: &Event, retain: Retain) -> Applied {
        self.behind(seq, target, event, retain, true)
    }

    /// `insert_sequenced` (`deliver` false) and `publish_late` (true).
    fn behind(&self, seq: u64, target: Target, event: &Event, retain: Retain, deliver: bool) -> Applied {
        let encoded = Encoded::new(event, retain);
        let mut core = self.lock();
        if seq > core.last_seq {
            self.sequence(core, seq, target, event.name.as_ref(), retain, encoded, None);
            return Applied::InOrder;
        }
        if retain != Retain::No {
            core.retained.apply(seq, &target, event.name.as_ref(), retain, encoded.retained.as_ref());
        }
        let epoch = core.epoch;
        let bytes = encoded.partial.finish(EventId { epoch, seq });
        let shards = self.shards_for(&target);
        let logged =
            Arc::new(Logged { seq, target, frame: Frame { bytes, published_at: Instant::now(), is_event: true } });
        // Evicted past it: no resume is served from before it, but a connection may still get it.
        if core.log.insert(seq, logged.clone()) == Inserted::Present {
            return Applied::Duplicate;
        }
        if !deliver {
            return Applied::Late;
        }
        for i in shards.iter() {
            self.shards[i].submit(Cmd::Late(logged.clone(), epoch));
        }
        drop(core);
        for i in shards.iter() {
            self.run_shard(i);
        }
        Applied::Late
    }

    /// Loads a retained value kept by a broker (at start, before the stream is consumed): it
    /// stands until an event later than `seq` replaces or clears it.
    pub fn load_retained(&self, seq: u64, target: &Target, event: &Event, retain: Retain) {
        let encoded = Encoded::new(event, retain);
        self.lock().retained.apply(seq, target, event.name.as_ref(), retain, encoded.retained.as_ref());
    }

    /// Under the core lock: makes `seq` the last sequence number, logs the event for replay and
    /// hands it to the shards that may hold its recipients; then, outside the lock, lets those
    /// shards fan it out. `age`: how long ago it was published (now if `None`).
    #[allow(clippy::too_many_arguments)] // the parts of one event, taken apart by its callers
    fn sequence(
        &self,
        mut core: MutexGuard<'_, Core>,
        seq: u64,
        target: Target,
        name: Option<&EventName>,
        retain: Retain,
        encoded: Encoded,
        age: Option<Duration>,
    ) -> Published {
        let now = Instant::now();
        let published_at = age.and_then(|age| now.checked_sub(age)).unwrap_or(now);
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
        core.log.expire(now);
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

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        task::{Context, Waker},
    };

    use super::*;
    use crate::{
        domain::UserId,
        router::{Registration, RouterConfig, Subscription},
    };

    #[test]
    fn a_late_event_reaches_in_order_whoever_has_not_passed_it_and_the_others_are_told_missed() {
        let router = Router::new(RouterConfig {
            epoch: Some(9),
            shared_sequence: true,
            ..RouterConfig::with_queue_capacity(16)
        });
        let group = crate::domain::GroupId::parse("g").unwrap();
        let open = |user: &str| {
            router
                .subscribe(Subscription {
                    user: UserId::parse(user).unwrap(),
                    groups: vec![group.clone()],
                    topics: vec![],
                    abort: None,
                    resume: None,
                })
                .unwrap()
        };
        let (ahead, behind) = (open("a"), open("b"));
        let event = |data: &str| Event { name: None, data: data.into() };
        router.publish_sequenced(5, Target::users(vec![UserId::parse("a").unwrap()]), &event("five"), Retain::No);
        assert_eq!(router.publish_late(3, Target::Group(group.clone()), &event("three"), Retain::No), Applied::Late);
        let again = router.publish_late(3, Target::Group(group.clone()), &event("three"), Retain::No);
        assert_eq!(again, Applied::Duplicate);
        let text = |reg: &Registration| {
            let mut out = VecDeque::new();
            let _ = reg.mailbox().poll_drain(&mut Context::from_waker(Waker::noop()), &mut out);
            out.iter().map(|f| String::from_utf8_lossy(&f.bytes).into_owned()).collect::<String>()
        };
        let (a, b) = (text(&ahead), text(&behind));
        assert!(a.contains("data: five") && !a.contains("data: three"), "{a}");
        assert!(
            a.contains("event: ssegate.missed")
                && a.contains(r#""reason":"late""#)
                && a.contains(r#""last_event_id":"9-2""#),
            "{a}"
        );
        assert!(b.contains("data: three\nid: 9-3") && !b.contains("ssegate.missed"), "{b}");
        // The log has it in its place: a resume from before it gets it in order.
        let resumed = router
            .subscribe(Subscription {
                user: UserId::parse("c").unwrap(),
                groups: vec![group],
                topics: vec![],
                abort: None,
                resume: Some(EventId { epoch: 9, seq: 1 }),
            })
            .unwrap();
        assert!(text(&resumed).contains("data: three\nid: 9-3"));
    }

    #[test]
    fn a_journal_that_refuses_publishes_nothing_and_one_that_accepts_sees_the_events_sequence() {
        let router = Router::new(RouterConfig { epoch: Some(7), ..RouterConfig::with_queue_capacity(16) });
        let reg = router
            .subscribe(Subscription {
                user: UserId::parse("u").unwrap(),
                groups: vec![],
                topics: vec![],
                abort: None,
                resume: None,
            })
            .unwrap();
        let event = |data: &str| Event { name: None, data: data.into() };
        let set = Retain::Set { expires_at: None };
        let refused =
            router.publish_journaled(Target::Broadcast, &event("refused"), set, |_| Err::<(), _>("disk full"));
        assert_eq!(refused, Err(PublishError::NotStored("disk full".into())));
        assert_eq!(router.last_seq(), 0, "no sequence number was used");
        let (p, seen) = router.publish_journaled(Target::Broadcast, &event("kept"), Retain::No, Ok::<_, &str>).unwrap();
        assert_eq!((p.id, seen), (EventId { epoch: 7, seq: 1 }, 1));
        let mut out = VecDeque::new();
        let _ = reg.mailbox().poll_drain(&mut Context::from_waker(Waker::noop()), &mut out);
        let text: String = out.iter().map(|f| String::from_utf8_lossy(&f.bytes).into_owned()).collect();
        assert!(text.contains("data: kept") && !text.contains("refused"), "{text}");
        let late = router.subscribe(Subscription {
            user: UserId::parse("v").unwrap(),
            groups: vec![],
            topics: vec![],
            abort: None,
            resume: None,
        });
        let mut out = VecDeque::new();
        let _ = late.unwrap().mailbox().poll_drain(&mut Context::from_waker(Waker::noop()), &mut out);
        let text: String = out.iter().map(|f| String::from_utf8_lossy(&f.bytes).into_owned()).collect();
        assert!(!text.contains("refused"), "the refused retained value was not set: {text}");
    }
}
