//! Interest delivery (`--nats-delivery interest`): a replica receives only the events its
//! connections need. The design and why it holds are in ARCHITECTURE.md ("The cluster at
//! scale"); in short:
//!
//! - every event is stored by the stream and republished by it on a live subject
//!   (`subjects.rs`): one per user, group or topic for an event to one of them, `live.all` for
//!   the rest;
//! - this replica subscribes (core NATS) to `live.all` and to the live subject of each user,
//!   group and topic (each a `Key`) with a connection here (`follow`, before the connection
//!   registers), kept for a linger after its last connection, so that reloads and reconnects
//!   do not churn the broker's interest;
//! - one task (`Task`) owns every subscription and is the only one feeding the router: it
//!   merges the live copies (`merge.rs`) back into stream order (`reorder.rs`) and applies them;
//! - a user's events before its subscription (the connection's resume point up to now) are
//!   read from the stream by subject (`fill`: a message-get per event, answered by the stream
//!   leader, no consumer per resume) and put in the replay log, so the resume is served from
//!   the log in order with the `live.all` events;
//! - core NATS is at most once, so every copy carries the previous sequence on its subject
//!   (`Nats-Last-Sequence`): a copy that shows a missed one (a slow consumer) fetches what was
//!   missed into the log and cuts the user's connections off, which then resume from their
//!   last id (the path a stalled reader already takes); an event that arrives behind the
//!   router's last one is put in the log the same way; a NATS reconnect reads the stream from
//!   the router's last sequence, keeping what this replica follows;
//! - a recreated stream (a new identity) rebases the router as with `--nats-delivery stream`
//!   and reads the new stream from its first event.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap, Message,
    jetstream::{
        consumer::{DeliverPolicy, pull},
        stream::{DirectGetErrorKind, Stream},
    },
};
use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    HEALTH_TIMEOUT, NatsBackplane, NatsError,
    identity::{self, Source},
    merge::{Batch, Merge},
    reorder::{Blocked, Entry, Reorder},
    subjects::Subjects,
};
use crate::{
    backplane::wire::{self, Decoded},
    domain::{EventId, GroupId, Target, Topic, UserId},
    router::{Applied, Held, Interest, Router},
};

/// Longest wait for a user's subscription and its events before the connection is refused
/// (503, retry).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads of the stream by subject in flight at once (a reconnect storm queues behind them).
const FILLS_IN_FLIGHT: usize = 64;
/// How often lingering subscriptions are looked at (at most).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What the edge and the task share: the users, groups and topics followed here.
pub struct Follower {
    users: Mutex<HashMap<Key, Followed>>,
    requests: mpsc::UnboundedSender<Request>,
    router: Weak<Router>,
}

struct Followed {
    /// Connections holding it (`Following`).
    conns: u32,
    /// Subscribed, and the replay log holds every event of the user after `since`.
    ready: bool,
    since: u64,
    /// When `conns` last fell to 0.
    idle_since: Option<Instant>,
}

struct Request {
    key: Key,
    /// The resume point, or `None` for a fresh stream (it needs no earlier event, only a
    /// cursor past every event of the user already stored).
    from: Option<u64>,
    done: Answer,
}

/// A connection's hold on the subscriptions of its user, groups and topics.
struct Following {
    follower: Arc<Follower>,
    keys: Vec<Key>,
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut users = self.follower.lock();
        let now = Instant::now();
        for key in &self.keys {
            if let Some(f) = users.get_mut(key) {
                f.conns = f.conns.saturating_sub(1);
                if f.conns == 0 {
                    f.idle_since = Some(now);
                }
            }
        }
    }
}

impl Follower {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Followed>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `Follower` as the router's `Interest`.
pub struct Handle(pub Arc<Follower>);

impl Interest for Handle {
    fn follow<'a>(
        &'a self,
        user: Option<&'a UserId>,
        groups: &'a [GroupId],
        topics: &'a [Topic],
        after: Option<EventId>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Held, String>> + Send + 'a>> {
        let keys = user
            .map(|u| Key::User(u.clone()))
            .into_iter()
            .chain(groups.iter().cloned().map(Key::Group))
            .chain(topics.iter().cloned().map(Key::Topic))
            .collect();
        Box::pin(self.0.clone().follow(keys, after))
    }
}

impl Follower {
    async fn follow(self: Arc<Self>, keys: Vec<Key>, after: Option<EventId>) -> Result<Held, String> {
        let router = self.router.upgrade().ok_or("the server is shutting down")?;
        let epoch = router.epoch();
        // A resume of another epoch is told `ssegate.missed` and starts fresh; one the log
        // evicted past gets `ssegate.missed` as well: no need to read further back.
        let from = match after {
            Some(id) if id.epoch == epoch => Some(id.seq.max(router.replay_evicted_through())),
            _ => None,
        };
        drop(router);
        let missing: Vec<Key> = {
            let mut users = self.lock();
            keys.iter()
                .filter(|key| {
                    let f = users.entry((*key).clone()).or_insert(Followed {
                        conns: 0,
                        ready: false,
                        since: u64::MAX,
                        idle_since: None,
                    });
                    f.conns += 1;
                    f.idle_since = None;
                    !(f.ready && from.is_none_or(|from| f.since <= from))
                })
                .cloned()
                .collect()
        };
        let guard = Following { follower: self.clone(), keys };
        if missing.is_empty() {
            return Ok(Box::new(guard));
        }
        let mut answers = Vec::with_capacity(missing.len());
        for key in missing {
            let (done, answer) = oneshot::channel();
            self.requests.send(Request { key, from, done }).map_err(|_| "the follower stopped")?;
            answers.push(answer);
        }
        let all = futures_util::future::join_all(answers);
        let answers = tokio::time::timeout(FOLLOW_TIMEOUT, all)
            .await
            .map_err(|_| format!("no answer from NATS within {FOLLOW_TIMEOUT:?}"))?;
        for answer in answers {
            answer.map_err(|_| "the follower stopped".to_owned())??;
        }
        Ok(Box::new(guard))
    }
}

/// What a live copy or a fetched event is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    All,
    User(UserId),
    Group(GroupId),
    Topic(Topic),
}

/// An event from the stream in its place, with its subject and, for a live copy, the
/// previous sequence on that subject.
type Item = Entry<Key, Decoded>;

/// What is read of a key's subject: its events after a resume point, or its last one.
#[derive(Clone, Copy, Debug)]
enum Read {
    After(u64),
    Last,
}

/// The result of reading a key's subject of the stream.
struct Filled {
    key: Key,
    read: Read,
    result: Result<Vec<(u64, Decoded)>, String>,
}

/// A followed user, as the task sees it.
struct Live {
    slot: usize,
    /// The highest sequence of the user's events applied or logged here.
    last: u64,
    /// A read of the user's subject is in flight: its copies are not checked for a missing
    /// predecessor (the read covers them).
    filling: bool,
    waiters: Vec<(Option<u64>, Answer)>,
}

/// Where a follow request's outcome goes.
type Answer = oneshot::Sender<Result<(), String>>;

/// How long copies wait for a missing predecessor on their subject (copies of one subject can
/// reach a replica out of order when the broker catches up after a stall) before it is read
/// from the stream.
const GAP_WAIT: Duration = Duration::from_millis(100);

/// While the broker is not answering (the probe), and for `SETTLE_FOR` after it answers again
/// or after a reconnect, each copy is held `SETTLE_HOLD` before it is applied: right after a
/// stall the broker was seen to send a copy ~10 ms behind later copies of other subjects, which
/// nothing in them shows (`reorder.rs`), and an event applied after a later one reaches only
/// the connections that are not past it. Outside these moments copies are applied at once.
const SETTLE_HOLD: Duration = Duration::from_millis(50);
const SETTLE_FOR: Duration = Duration::from_secs(2);

/// The one task feeding the router under interest delivery.
pub struct Task {
    bp: Arc<NatsBackplane>,
    router: Arc<Router>,
    follower: Arc<Follower>,
    stream: Stream<()>,
    subjects: Subjects,
    merge: Merge<Key>,
    live: HashMap<Key, Live>,
    /// The highest sequence of a `live.all` event applied or logged here.
    all_last: u64,
    /// Received and not applied yet, in sequence order: everything after a copy whose
    /// predecessor on its subject has not arrived waits for it (`reorder.rs`).
    reorder: Reorder<Key, Decoded>,
    /// Copies are held `SETTLE_HOLD` until then (`None`: not settling); `broker_down` while
    /// the probe says the broker does not answer.
    settle_until: Option<tokio::time::Instant>,
    broker_down: bool,
    /// The highest sequence of a live copy received, and when (`OrderStats::reordered`).
    newest_copy: Option<(u64, tokio::time::Instant)>,
    /// Users whose read is done, with the point their events are complete from, waiting until
    /// the events read (up to the last sequence) are applied (`release_deferred`).
    deferred: Vec<(Key, u64, u64)>,
    requests: mpsc::UnboundedReceiver<Request>,
    fills_tx: mpsc::UnboundedSender<Filled>,
    fills: mpsc::UnboundedReceiver<Filled>,
    in_flight: Arc<Semaphore>,
}

/// What woke the task.
enum Step {
    Up(bool),
    Release,
    Stop,
    Copies(Batch<Key>),
    Request(Request),
    Filled(Filled),
    Reconnected,
    Identity,
    Gap,
    Sweep,
}

fn sequence_of(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

impl Task {
    /// Subscribes to `live.all`, then reads the stream's `to.all` events from `first` (the
    /// replay log's worth) into the router: after this the replica is ready. The task runs
    /// with `run`.
    pub async fn start(bp: Arc<NatsBackplane>, router: Arc<Router>, first: u64) -> Result<Self, NatsError> {
        let subjects = bp.subjects.clone();
        let name = bp.settings.stream.clone();
        let stream_err = |reason: String| NatsError::Stream { stream: name.clone(), reason };
        let stream = bp.js.get_stream_no_info(&name).await.map_err(|e| stream_err(e.to_string()))?;
        let mut merge = Merge::new();
        let all = bp.client.subscribe(subjects.live_all.clone()).await.map_err(|e| stream_err(e.to_string()))?;
        merge.add(Key::All, all);
        let (tx, requests) = mpsc::unbounded_channel();
        let follower =
            Arc::new(Follower { users: Mutex::new(HashMap::new()), requests: tx, router: Arc::downgrade(&router) });
        let (fills_tx, fills) = mpsc::unbounded_channel();
        let mut task = Self {
            bp,
            router,
            follower,
            stream,
            subjects,
            merge,
            live: HashMap::new(),
            all_last: first.saturating_sub(1),
            reorder: Reorder::new(),
            settle_until: None,
            broker_down: false,
            newest_copy: None,
            deferred: Vec::new(),
            requests,
            fills_tx,
            fills,
            in_flight: Arc::new(Semaphore::new(FILLS_IN_FLIGHT)),
        };
        task.scan(first, Some(task.subjects.to_all.clone())).await.map_err(stream_err)?;
        Ok(task)
    }

    pub fn follower(&self) -> Arc<Follower> {
        self.follower.clone()
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut generation = self.bp.generation.subscribe();
        generation.borrow_and_update();
        let mut identity = self.bp.identity.watch();
        identity.borrow_and_update();
        let mut up = self.bp.watch_up();
        self.broker_down = !*up.borrow_and_update();
        let linger = self.bp.settings.linger;
        let mut sweep = tokio::time::interval((linger / 4).clamp(Duration::from_millis(50), SWEEP_EVERY));
        loop {
            let gap_at = self.reorder.blocked().map(|b| b.until);
            // Held copies not waiting for a predecessor: released once past the settling hold,
            // or at once when the settling ended with some still held.
            let release_at = match (self.reorder.front_held_at(), self.reorder.blocked()) {
                (Some(at), None) if self.settle_cutoff().is_some() => Some(at + SETTLE_HOLD),
                (Some(_), None) => Some(tokio::time::Instant::now()),
                _ => None,
            };
            let step = tokio::select! {
                biased;
                () = stop.cancelled() => Step::Stop,
                r = generation.changed() => if r.is_ok() { Step::Reconnected } else { Step::Stop },
                r = identity.changed() => if r.is_ok() { Step::Identity } else { Step::Stop },
                r = up.changed() => if r.is_ok() { Step::Up(*up.borrow_and_update()) } else { Step::Stop },
                () = async { tokio::time::sleep_until(release_at.unwrap_or_else(tokio::time::Instant::now)).await },
                    if release_at.is_some() => Step::Release,
                () = async { tokio::time::sleep_until(gap_at.unwrap_or_else(tokio::time::Instant::now)).await },
                    if gap_at.is_some() => Step::Gap,
                Some(f) = self.fills.recv() => Step::Filled(f),
                Some(r) = self.requests.recv() => Step::Request(r),
                b = self.merge.next_batch() => Step::Copies(b),
                _ = sweep.tick() => Step::Sweep,
            };
            match step {
                Step::Stop => return,
                Step::Copies(batch) => self.take(batch, Vec::new()),
                Step::Request(r) => self.on_request(r).await,
                Step::Filled(f) => self.on_filled(f),
                Step::Gap => self.read_gap().await,
                Step::Reconnected | Step::Identity => {
                    identity.borrow_and_update();
                    generation.borrow_and_update();
                    self.settle_until = Some(tokio::time::Instant::now() + SETTLE_FOR);
                    self.recover().await;
                    self.settle_until = Some(tokio::time::Instant::now() + SETTLE_FOR);
                }
                Step::Up(true) => {
                    self.broker_down = false;
                    self.settle_until = Some(tokio::time::Instant::now() + SETTLE_FOR);
                }
                Step::Up(false) => self.broker_down = true,
                Step::Release => self.apply_held(),
                Step::Sweep => self.sweep(linger),
            }
        }
    }

    /// While settling (see `SETTLE_HOLD`), the latest time a copy may have arrived to be
    /// applied now.
    fn settle_cutoff(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let settling = self.broker_down || self.settle_until.is_some_and(|t| now < t);
        settling.then(|| now.checked_sub(SETTLE_HOLD).unwrap_or(now))
    }

    /// The last sequence this replica has of `key`'s subject, if it follows it.
    fn last_of(&mut self, key: &Key) -> Option<&mut u64> {
        match key {
            Key::All => Some(&mut self.all_last),
            _ => self.live.get_mut(key).map(|l| &mut l.last),
        }
    }

    /// Where `key`'s events are stored, and where their live copies arrive.
    fn subjects_of(&self, key: &Key) -> (String, String) {
        match key {
            Key::All => (self.subjects.to_all.clone(), self.subjects.live_all.clone()),
            Key::User(u) => (self.subjects.to_user(u), self.subjects.live_user(u)),
            Key::Group(g) => (self.subjects.to_group(g), self.subjects.live_group(g)),
            Key::Topic(t) => (self.subjects.to_topic(t), self.subjects.live_topic(t)),
        }
    }

    /// Takes live copies and fetched events, and applies what is in order.
    fn take(&mut self, batch: Batch<Key>, fetched: Vec<Item>) {
        for key in batch.closed {
            tracing::warn!(?key, "a NATS subscription ended; following it again after the next reconnect");
        }
        let now = tokio::time::Instant::now();
        for item in fetched {
            self.reorder.hold(item, now);
        }
        for (key, msg) in batch.copies {
            let Message { headers, payload, subject, .. } = msg;
            let Some(seq) = sequence_of(headers.as_ref(), "Nats-Sequence") else {
                tracing::warn!(%subject, "a live copy without Nats-Sequence ignored");
                continue;
            };
            self.note_arrival(seq, now);
            match wire::decode(&payload) {
                Ok(event) => {
                    let previous = sequence_of(headers.as_ref(), "Nats-Last-Sequence");
                    self.reorder.hold(Item { seq, key, previous, value: event }, now);
                }
                Err(e) => tracing::error!(seq, error = %e, "undecodable event in the stream skipped"),
            }
        }
        self.apply_held();
    }

    /// Records how far behind a copy arrived, if one with a higher sequence came in an earlier
    /// batch (copies of one batch are sorted before they are applied).
    fn note_arrival(&mut self, seq: u64, now: tokio::time::Instant) {
        match self.newest_copy {
            Some((newest, at)) if seq < newest => {
                if at < now {
                    self.bp.order.reordered.observe(now - at);
                }
            }
            _ => self.newest_copy = Some((seq, now)),
        }
    }

    /// Applies the held events in sequence order, up to a missing predecessor named by a held
    /// copy (everything after it waits until it arrives, or is read from the stream after
    /// `GAP_WAIT`) or, while settling, up to the copies held less than `SETTLE_HOLD`.
    fn apply_held(&mut self) {
        let epoch = self.router.epoch();
        let deadline = tokio::time::Instant::now() + GAP_WAIT;
        let cutoff = self.settle_cutoff();
        loop {
            // The last this replica has of a copy's subject; not checked while a read of the
            // subject is in flight (it covers the predecessors).
            let (all_last, live) = (self.all_last, &self.live);
            let last_of = |key: &Key| match key {
                Key::All => Some(all_last),
                key => live.get(key).filter(|l| !l.filling).map(|l| l.last),
            };
            let Some(item) = self.reorder.pop(last_of, deadline, cutoff) else { break };
            if let Some(last) = self.last_of(&item.key) {
                *last = (*last).max(item.seq);
            }
            self.apply_one(item, epoch);
        }
        self.release_deferred();
    }

    fn apply_one(&mut self, Item { seq, value: event, .. }: Item, epoch: u64) {
        let Decoded { target, event, retain } = event;
        if self.router.publish_late(seq, target, &event, retain) == Applied::Late {
            // Behind a later one on another subject: logged in its place; connections past it
            // are told `ssegate.missed` (late). Also a sign of a recreated stream: probe now.
            tracing::info!(seq, epoch = format_args!("{epoch:x}"), "an event arrived behind later ones");
            self.bp.order.late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.bp.kick.notify_one();
        }
        self.bp.identity.saw(epoch, seq);
    }

    /// The predecessor of a held copy did not arrive within `GAP_WAIT`: read its subject from
    /// the last sequence this replica has of it, and apply in order.
    async fn read_gap(&mut self) {
        let Some(Blocked { key, after, missing, .. }) = self.reorder.take_blocked() else { return };
        let subject = self.subjects_of(&key).0;
        tracing::info!(?key, after, missing, "a live copy's predecessor did not arrive: reading it from the stream");
        let fetched = tokio::time::timeout(HEALTH_TIMEOUT, fetch(&self.stream, &subject, after)).await;
        let items = match fetched {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                tracing::warn!(?key, error = %e, "reading the stream by subject failed; going on without it");
                Vec::new()
            }
            Err(_) => {
                tracing::warn!(?key, "reading the stream by subject timed out; going on without it");
                Vec::new()
            }
        };
        if !items.iter().any(|(s, _)| *s == missing) {
            tracing::warn!(?key, missing, "the missing event is not in the stream any more (limits): skipped");
        }
        // Whatever happened, the wait ends here: the subject is taken as complete up to it.
        if let Some(last) = self.last_of(&key) {
            *last = (*last).max(missing);
        }
        let batch = self.merge.drain_now();
        let items =
            items.into_iter().map(|(seq, value)| Item { seq, key: key.clone(), previous: None, value }).collect();
        self.take(batch, items);
    }

    /// Reads `key`'s subject in the background (`Filled`), within `HEALTH_TIMEOUT`.
    fn fill(&mut self, key: Key, read: Read) {
        if let Some(l) = self.live.get_mut(&key) {
            l.filling = true;
        }
        let subject = self.subjects_of(&key).0;
        let (stream, tx, sem) = (self.stream.clone(), self.fills_tx.clone(), self.in_flight.clone());
        tokio::spawn(async move {
            let result = match sem.acquire_owned().await {
                Ok(_permit) => {
                    let reading = async {
                        match read {
                            Read::After(after) => fetch(&stream, &subject, after).await,
                            Read::Last => fetch_last(&stream, &subject).await,
                        }
                    };
                    match tokio::time::timeout(HEALTH_TIMEOUT, reading).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {HEALTH_TIMEOUT:?}")),
                    }
                }
                Err(_) => Err("stopping".to_owned()),
            };
            let _ = tx.send(Filled { key, read, result });
        });
    }

    async fn on_request(&mut self, Request { key, from, done }: Request) {
        let ready_since = self.follower.lock().get(&key).filter(|f| f.ready).map(|f| f.since);
        if ready_since.is_some_and(|since| from.is_none_or(|from| since <= from)) {
            let _ = done.send(Ok(()));
            return;
        }
        if !self.live.contains_key(&key) {
            let sub = match self.bp.client.subscribe(self.subjects_of(&key).1).await {
                Ok(sub) => sub,
                Err(e) => {
                    let _ = done.send(Err(format!("cannot subscribe: {e}")));
                    return;
                }
            };
            let slot = self.merge.add(key.clone(), sub);
            let last = from.unwrap_or_else(|| self.router.last_seq());
            self.live.insert(key.clone(), Live { slot, last, filling: false, waiters: Vec::new() });
        }
        let Some(live) = self.live.get_mut(&key) else { return };
        live.waiters.push((from, done));
        if !live.filling {
            // The read is sent after the subscription on the same connection, so it sees every
            // event stored before the subscription took effect; later ones arrive as copies.
            self.fill(key, from.map_or(Read::Last, Read::After));
        }
    }

    fn on_filled(&mut self, Filled { key, read, result }: Filled) {
        // Every copy stored before the read was answered arrived before its answer: take them
        // so that the read's newer events are applied in order with them.
        let batch = self.merge.drain_now();
        let events = match result {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(?key, ?read, error = %e, "reading a subject's events from the stream failed");
                if let Some(l) = self.live.get_mut(&key) {
                    l.filling = false;
                    for (_, done) in l.waiters.drain(..) {
                        let _ = done.send(Err(e.clone()));
                    }
                }
                self.take(batch, Vec::new());
                return;
            }
        };
        let newest = events.last().map(|(s, _)| *s);
        // The log holds every event of the user after `complete` once these are applied: after
        // the resume point, or after the last one (nothing newer was stored before the
        // subscription took effect; later ones arrive as copies).
        let complete = match read {
            Read::After(from) => from,
            Read::Last => newest.unwrap_or(0),
        };
        let last_seq = self.router.last_seq();
        let mut items = Vec::new();
        for (seq, event) in events {
            if seq <= last_seq {
                // Before the connections that asked for it registered: the log serves them.
                let Decoded { target, event, retain } = event;
                self.router.insert_sequenced(seq, target, &event, retain);
            } else {
                items.push(Item { seq, key: key.clone(), previous: None, value: event });
            }
        }
        if let Some(l) = self.live.get_mut(&key) {
            l.last = l.last.max(newest.unwrap_or(0));
            l.filling = false;
        }
        let upto = newest.filter(|n| *n > last_seq);
        // Its connections register once the events read are applied (a fresh one's cursor is
        // then past them): later if they wait behind a missing copy (`blocked`).
        self.deferred.push((key, complete, upto.unwrap_or(0)));
        self.take(batch, items);
    }

    /// Marks the users whose read events are all applied as followed from their point, and
    /// answers their requests.
    fn release_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let first_held = self.reorder.first();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|(_, _, upto)| first_held.is_none_or(|h| h > *upto));
        self.deferred = waiting;
        for (key, complete, _) in ready {
            let since = {
                let mut users = self.follower.lock();
                let Some(f) = users.get_mut(&key) else { continue };
                f.since = if f.ready { f.since.min(complete) } else { complete };
                f.ready = true;
                f.since
            };
            self.answer(&key, since);
        }
    }

    /// Answers the requests of `key` that the log now serves; reads again for the others.
    fn answer(&mut self, key: &Key, since: u64) {
        let Some(l) = self.live.get_mut(key) else { return };
        let mut rest = Vec::new();
        for (wanted, done) in l.waiters.drain(..) {
            if wanted.is_none_or(|w| w >= since) {
                let _ = done.send(Ok(()));
            } else {
                rest.push((wanted, done));
            }
        }
        if let Some(earliest) = rest.iter().filter_map(|(w, _)| *w).min() {
            l.waiters = rest;
            self.fill(key.clone(), Read::After(earliest));
        }
    }

    /// Drops the subscriptions of keys with no connection here for `linger`.
    fn sweep(&mut self, linger: Duration) {
        let now = Instant::now();
        let gone: Vec<Key> = {
            let mut users = self.follower.lock();
            let gone: Vec<Key> = users
                .iter()
                .filter(|(u, f)| {
                    f.conns == 0
                        && f.idle_since.is_none_or(|t| now.duration_since(t) >= linger)
                        && !self.live.get(*u).is_some_and(|l| l.filling || !l.waiters.is_empty())
                })
                .map(|(u, _)| u.clone())
                .collect();
            for u in &gone {
                users.remove(u);
            }
            gone
        };
        for u in gone {
            if let Some(l) = self.live.remove(&u) {
                self.merge.remove(l.slot);
            }
        }
    }

    /// After a NATS reconnect, a slow-consumer notice or a change of the stream's identity:
    /// what was missed is read from the stream. A recreated stream rebases the router first.
    async fn recover(&mut self) {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.try_recover().await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "catching up with the stream after a reconnect failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn try_recover(&mut self) -> Result<(), String> {
        let stream = self.bp.stream_now(Source::Consumer).await?;
        let epoch = identity::epoch_of(stream.cached_info());
        let from = if epoch == self.router.epoch() {
            // What is held stays held: it may wait for an event lost with the connection, and
            // applying it first would move the router past that event. The read below starts
            // after the last one applied, so it covers every gap; the held copies follow it
            // (those it applied are duplicates then).
            self.reorder.take_blocked();
            self.router.last_seq() + 1
        } else {
            self.bp.resync(&self.router, epoch).await.map_err(|e| e.to_string())?;
            self.reorder.clear();
            self.release_deferred();
            self.all_last = 0;
            for l in self.live.values_mut() {
                l.last = 0;
            }
            for f in self.follower.lock().values_mut() {
                f.since = 0;
            }
            1
        };
        self.scan(from, None).await?;
        self.bp.caught_up(&self.router, epoch);
        let batch = self.merge.drain_now();
        self.take(batch, Vec::new());
        Ok(())
    }

    /// Reads the stream from `from` to its end as of now with an ordered consumer (on
    /// `filter`, or everything), applying what this replica follows in order. Live copies
    /// wait in their channels meanwhile; those already applied are dropped as duplicates.
    async fn scan(&mut self, from: u64, filter: Option<String>) -> Result<(), String> {
        let stream = self.bp.stream_now(Source::Consumer).await?;
        let target = stream.cached_info().state.last_sequence;
        if target < from {
            return Ok(());
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter.unwrap_or_default(),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let epoch = self.router.epoch();
        loop {
            let next = tokio::time::timeout(SCAN_STALL, messages.next()).await;
            let msg = match next {
                Ok(Some(msg)) => msg.map_err(|e| e.to_string())?,
                Ok(None) => return Err("the stream's consumer ended".to_owned()),
                Err(_) => return Err(format!("no message from the stream for {SCAN_STALL:?}")),
            };
            let info = msg.info().map_err(|e| e.to_string())?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let key = if msg.subject.as_str() == self.subjects.to_all || msg.subject.as_str() == self.subjects.base {
                Some(Key::All)
            } else {
                None
            };
            match wire::decode(&msg.payload) {
                Ok(d) => {
                    let key = key.or_else(|| {
                        let key = match &d.target {
                            Target::Users(u) if u.len() == 1 => Key::User(u[0].clone()),
                            Target::Group(g) => Key::Group(g.clone()),
                            Target::Topic(t) => Key::Topic(t.clone()),
                            _ => return None,
                        };
                        self.live.contains_key(&key).then_some(key)
                    });
                    if let Some(key) = key {
                        if let Some(last) = self.last_of(&key) {
                            *last = (*last).max(seq);
                        }
                        self.router.publish_sequenced(seq, d.target, &d.event, d.retain);
                    }
                }
                Err(e) => tracing::error!(seq, error = %e, "undecodable event in the stream skipped"),
            }
            self.bp.identity.saw(epoch, seq);
            if pending == 0 || seq >= target {
                return Ok(());
            }
        }
    }
}

/// A scan gives up (and is retried) when no message came for this long.
const SCAN_STALL: Duration = Duration::from_secs(5);

/// The events of `subject` after `after`, oldest first: one direct get per event
/// (`next_by_subj`; the stream allows direct gets), bounded in time by the caller. On one
/// server it sees every event acknowledged before it. On a NATS cluster any replica of the
/// stream may answer, and one that lags may not have the newest yet: the next live copy of the
/// subject then shows the gap (`Nats-Last-Sequence`) and it is read again. (The leader-only
/// message-get with `next_by_subj` gets no answer from a clustered stream on nats-server
/// 2.9.10: checked.) No count bound: a resume needs every event after its point, and the
/// replay log's own bounds then evict the oldest (the router tells such a resume `missed`).
async fn fetch(stream: &Stream<()>, subject: &str, after: u64) -> Result<Vec<(u64, Decoded)>, String> {
    let mut out = Vec::new();
    // An id past every sequence (a resume "ahead" of the stream): nothing after it.
    let Some(mut next) = after.checked_add(1) else { return Ok(out) };
    loop {
        match stream.direct_get_next_for_subject(subject, Some(next)).await {
            Ok(m) => {
                next = m.sequence + 1;
                match wire::decode(&m.payload) {
                    Ok(d) => out.push((m.sequence, d)),
                    Err(e) => tracing::error!(seq = m.sequence, error = %e, "undecodable event in the stream skipped"),
                }
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The last event of `subject`, if any: one direct get (`last_by_subj`).
async fn fetch_last(stream: &Stream<()>, subject: &str) -> Result<Vec<(u64, Decoded)>, String> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => match wire::decode(&m.payload) {
            Ok(d) => Ok(vec![(m.sequence, d)]),
            Err(e) => {
                tracing::error!(seq = m.sequence, error = %e, "undecodable event in the stream skipped");
                Ok(Vec::new())
            }
        },
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}
