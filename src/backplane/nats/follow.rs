//! Interest delivery (`--nats-delivery interest`): a replica receives only the events its
//! connections need. The design and why it holds are in ARCHITECTURE.md ("The cluster at
//! scale"); in short:
//!
//! - every event is stored by the stream and republished by it on a live subject
//!   (`subjects.rs`): one per user for an event to one user, `live.all` for the rest;
//! - this replica subscribes (core NATS) to `live.all` and to the live subject of each user
//!   with a connection here (`follow`, before the connection registers), kept for a linger
//!   after the user's last connection, so that reloads and reconnects do not churn the
//!   broker's interest;
//! - one task (`Task`) owns every subscription and is the only one feeding the router: it
//!   merges the live copies back into stream order (`merge.rs`) and applies them;
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
    NatsBackplane, NatsError,
    identity::{self, Source},
    merge::{Batch, Merge},
    subjects::Subjects,
};
use crate::{
    backplane::wire::{self, Decoded},
    domain::{EventId, Target, UserId},
    router::{Held, Interest, Router},
};

/// Longest wait for a user's subscription and its events before the connection is refused
/// (503, retry).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads of the stream by subject in flight at once (a reconnect storm queues behind them).
const FILLS_IN_FLIGHT: usize = 64;
/// How often lingering subscriptions are looked at (at most).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What the edge and the task share: the users followed here.
pub struct Follower {
    users: Mutex<HashMap<UserId, Followed>>,
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
    user: UserId,
    from: u64,
    done: oneshot::Sender<Result<(), String>>,
}

/// A connection's hold on its user's subscription.
struct Following {
    follower: Arc<Follower>,
    user: UserId,
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut users = self.follower.lock();
        if let Some(f) = users.get_mut(&self.user) {
            f.conns = f.conns.saturating_sub(1);
            if f.conns == 0 {
                f.idle_since = Some(Instant::now());
            }
        }
    }
}

impl Follower {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Followed>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Users followed now (subscribed or lingering).
    pub fn followed(&self) -> usize {
        self.lock().len()
    }
}

/// `Follower` as the router's `Interest`.
pub struct Handle(pub Arc<Follower>);

impl Interest for Handle {
    fn follow<'a>(
        &'a self,
        user: &'a UserId,
        after: Option<EventId>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Held, String>> + Send + 'a>> {
        Box::pin(self.0.clone().follow(user.clone(), after))
    }
}

impl Follower {
    async fn follow(self: Arc<Self>, user: UserId, after: Option<EventId>) -> Result<Held, String> {
        let router = self.router.upgrade().ok_or("the server is shutting down")?;
        let epoch = router.epoch();
        // A resume of another epoch is told `ssegate.missed` and starts fresh; one the log
        // evicted past gets `ssegate.missed` as well: no need to read further back.
        let from = match after {
            Some(id) if id.epoch == epoch => id.seq.max(router.replay_evicted_through()),
            _ => router.last_seq(),
        };
        drop(router);
        let guard = {
            let mut users = self.lock();
            let f = users.entry(user.clone()).or_insert(Followed {
                conns: 0,
                ready: false,
                since: u64::MAX,
                idle_since: None,
            });
            f.conns += 1;
            f.idle_since = None;
            let ready = f.ready && f.since <= from;
            drop(users);
            let guard = Following { follower: self.clone(), user: user.clone() };
            if ready {
                return Ok(Box::new(guard));
            }
            guard
        };
        let (done, answer) = oneshot::channel();
        self.requests.send(Request { user, from, done }).map_err(|_| "the follower stopped")?;
        match tokio::time::timeout(FOLLOW_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(Box::new(guard)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err("the follower stopped".to_owned()),
            Err(_) => Err(format!("no answer from NATS within {FOLLOW_TIMEOUT:?}")),
        }
    }
}

/// What a live copy or a fetched event is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    All,
    User(UserId),
}

/// An event from the stream, in its place (`seq`); `previous` is the sequence of the one
/// before it on its subject, for a live copy.
struct Item {
    seq: u64,
    key: Key,
    previous: Option<u64>,
    event: Decoded,
}

/// The result of reading a subject of the stream after `from`.
struct Filled {
    key: Key,
    from: u64,
    /// A gap in the live copies (or a lost subscription): the connections that may have missed
    /// an event are cut off once it is in the log.
    gap: bool,
    result: Result<Vec<(u64, Decoded)>, String>,
}

/// A followed user, as the task sees it.
struct Live {
    slot: usize,
    /// The highest sequence of the user's events applied or logged here.
    last: u64,
    /// A read of the user's subject is in flight: its copies are applied but not checked for
    /// gaps (the read covers them).
    filling: bool,
    waiters: Vec<(u64, oneshot::Sender<Result<(), String>>)>,
}

/// The one task feeding the router under interest delivery.
pub struct Task {
    bp: Arc<NatsBackplane>,
    router: Arc<Router>,
    follower: Arc<Follower>,
    stream: Stream<()>,
    subjects: Subjects,
    merge: Merge<Key>,
    live: HashMap<UserId, Live>,
    /// The highest sequence of a `live.all` event applied or logged here.
    all_last: u64,
    requests: mpsc::UnboundedReceiver<Request>,
    fills_tx: mpsc::UnboundedSender<Filled>,
    fills: mpsc::UnboundedReceiver<Filled>,
    in_flight: Arc<Semaphore>,
    limit: usize,
}

/// What woke the task.
enum Step {
    Stop,
    Copies(Batch<Key>),
    Request(Request),
    Filled(Filled),
    Reconnected,
    Identity,
    Sweep,
}

fn sequence_of(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

impl Task {
    /// Subscribes to `live.all`, then reads the stream's `to.all` events from `first` (the
    /// replay log's worth) into the router: after this the replica is ready. The task runs
    /// with `run`.
    pub async fn start(
        bp: Arc<NatsBackplane>,
        router: Arc<Router>,
        first: u64,
        replay_capacity: usize,
    ) -> Result<Self, NatsError> {
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
            requests,
            fills_tx,
            fills,
            in_flight: Arc::new(Semaphore::new(FILLS_IN_FLIGHT)),
            limit: replay_capacity.max(1),
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
        let linger = self.bp.settings.linger;
        let mut sweep = tokio::time::interval((linger / 4).clamp(Duration::from_millis(50), SWEEP_EVERY));
        loop {
            let step = tokio::select! {
                biased;
                () = stop.cancelled() => Step::Stop,
                r = generation.changed() => if r.is_ok() { Step::Reconnected } else { Step::Stop },
                r = identity.changed() => if r.is_ok() { Step::Identity } else { Step::Stop },
                Some(f) = self.fills.recv() => Step::Filled(f),
                Some(r) = self.requests.recv() => Step::Request(r),
                b = self.merge.next_batch() => Step::Copies(b),
                _ = sweep.tick() => Step::Sweep,
            };
            match step {
                Step::Stop => return,
                Step::Copies(batch) => self.apply(batch, Vec::new()),
                Step::Request(r) => self.on_request(r).await,
                Step::Filled(f) => self.on_filled(f),
                Step::Reconnected | Step::Identity => {
                    identity.borrow_and_update();
                    generation.borrow_and_update();
                    self.recover().await;
                }
                Step::Sweep => self.sweep(linger),
            }
        }
    }

    /// Applies live copies and fetched events in sequence order. A copy that shows a missed
    /// event on its subject starts a read of it; an event behind the router's last one (one
    /// that was missed live) goes into the log and the connections that needed it are cut
    /// off, to resume from the log.
    fn apply(&mut self, batch: Batch<Key>, fetched: Vec<Item>) {
        for key in batch.closed {
            tracing::warn!(?key, "a NATS subscription ended; following it again after the next reconnect");
        }
        let mut items = fetched;
        for (key, msg) in batch.copies {
            let Message { headers, payload, subject, .. } = msg;
            let Some(seq) = sequence_of(headers.as_ref(), "Nats-Sequence") else {
                tracing::warn!(%subject, "a live copy without Nats-Sequence ignored");
                continue;
            };
            match wire::decode(&payload) {
                Ok(event) => {
                    items.push(Item { seq, key, previous: sequence_of(headers.as_ref(), "Nats-Last-Sequence"), event })
                }
                Err(e) => tracing::error!(seq, error = %e, "undecodable event in the stream skipped"),
            }
        }
        items.sort_by_key(|i| i.seq);
        let mut reopen_all = false;
        let mut reopen = Vec::new();
        let mut gaps = Vec::new();
        let epoch = self.router.epoch();
        for Item { seq, key, previous, event } in items {
            // Gaps: a copy whose subject had an event after the last one this replica has.
            let filling = matches!(&key, Key::User(u) if self.live.get(u).is_some_and(|l| l.filling));
            let last = match &key {
                Key::All => Some(&mut self.all_last),
                Key::User(u) => self.live.get_mut(u).map(|l| &mut l.last),
            };
            if let Some(last) = last {
                if previous.is_some_and(|p| p > *last) && !filling {
                    gaps.push((key.clone(), *last));
                }
                *last = (*last).max(seq);
            }
            let Decoded { target, event, retain } = event;
            let user = match &target {
                Target::Users(u) if u.len() == 1 => Some(u[0].clone()),
                _ => None,
            };
            if self.router.publish_sequenced(seq, target.clone(), &event, retain).is_none()
                && self.router.insert_sequenced(seq, target, &event, retain)
            {
                // Behind the last one applied and not in the log: missed live.
                tracing::info!(
                    seq,
                    epoch = format_args!("{epoch:x}"),
                    "an event arrived behind later ones: logged, its connections resume"
                );
                self.bp.kick.notify_one();
                match (key, user) {
                    (Key::User(_), Some(u)) => reopen.push(u),
                    _ => reopen_all = true,
                }
            }
            self.bp.identity.saw(epoch, seq);
        }
        for (key, after) in gaps {
            tracing::info!(?key, after, "live copies missed an event: reading it from the stream");
            self.fill(key, after, true);
        }
        if reopen_all {
            self.router.reopen(None);
        } else {
            for u in reopen {
                self.router.reopen(Some(&u));
            }
        }
    }

    /// Reads the events of `key`'s subject after `after` in the background (`Filled`).
    fn fill(&mut self, key: Key, after: u64, gap: bool) {
        if let Key::User(u) = &key
            && let Some(l) = self.live.get_mut(u)
        {
            l.filling = true;
        }
        let subject = match &key {
            Key::All => self.subjects.to_all.clone(),
            Key::User(u) => self.subjects.to_user(u),
        };
        let (stream, tx, sem, limit) = (self.stream.clone(), self.fills_tx.clone(), self.in_flight.clone(), self.limit);
        tokio::spawn(async move {
            let result = match sem.acquire_owned().await {
                Ok(_permit) => fetch(&stream, &subject, after, limit).await,
                Err(_) => Err("stopping".to_owned()),
            };
            let _ = tx.send(Filled { key, from: after, gap, result });
        });
    }

    async fn on_request(&mut self, Request { user, from, done }: Request) {
        let ready_since = self.follower.lock().get(&user).filter(|f| f.ready).map(|f| f.since);
        if ready_since.is_some_and(|since| since <= from) {
            let _ = done.send(Ok(()));
            return;
        }
        if !self.live.contains_key(&user) {
            let sub = match self.bp.client.subscribe(self.subjects.live_user(&user)).await {
                Ok(sub) => sub,
                Err(e) => {
                    let _ = done.send(Err(format!("cannot subscribe: {e}")));
                    return;
                }
            };
            let slot = self.merge.add(Key::User(user.clone()), sub);
            self.live.insert(user.clone(), Live { slot, last: from, filling: false, waiters: Vec::new() });
        }
        let Some(live) = self.live.get_mut(&user) else { return };
        live.waiters.push((from, done));
        if !live.filling {
            // The read is sent after the subscription on the same connection, so it sees every
            // event stored before the subscription took effect; later ones arrive as copies.
            self.fill(Key::User(user), from, false);
        }
    }

    fn on_filled(&mut self, Filled { key, from, gap, result }: Filled) {
        // Every copy stored before the read was answered arrived before its answer: take them
        // so that the read's newer events are applied in order with them.
        let batch = self.merge.drain_now();
        let events = match result {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(?key, from, error = %e, "reading the stream by subject failed");
                if let Key::User(u) = &key
                    && let Some(l) = self.live.get_mut(u)
                {
                    l.filling = false;
                    for (_, done) in l.waiters.drain(..) {
                        let _ = done.send(Err(e.clone()));
                    }
                }
                self.apply(batch, Vec::new());
                if gap {
                    // Cut off whoever may have missed something: their resume reads again.
                    match &key {
                        Key::All => self.router.reopen(None),
                        Key::User(u) => self.router.reopen(Some(u)),
                    };
                }
                return;
            }
        };
        let newest = events.last().map(|(s, _)| *s);
        let last_seq = self.router.last_seq();
        let mut older = 0;
        let mut items = Vec::new();
        for (seq, event) in events {
            if seq <= last_seq {
                let Decoded { target, event, retain } = event;
                older += usize::from(self.router.insert_sequenced(seq, target, &event, retain));
            } else {
                items.push(Item { seq, key: key.clone(), previous: None, event });
            }
        }
        self.apply(batch, items);
        match &key {
            Key::All => {
                self.all_last = self.all_last.max(newest.unwrap_or(0));
                if gap && older > 0 {
                    self.router.reopen(None);
                }
            }
            Key::User(u) => {
                if gap && older > 0 {
                    self.router.reopen(Some(u));
                }
                let since = {
                    let mut users = self.follower.lock();
                    let Some(f) = users.get_mut(u) else { return };
                    f.since = if f.ready { f.since.min(from) } else { from };
                    f.ready = true;
                    f.since
                };
                let Some(l) = self.live.get_mut(u) else { return };
                l.last = l.last.max(newest.unwrap_or(0));
                l.filling = false;
                let mut rest = Vec::new();
                for (wanted, done) in l.waiters.drain(..) {
                    if wanted >= since {
                        let _ = done.send(Ok(()));
                    } else {
                        rest.push((wanted, done));
                    }
                }
                if let Some(earliest) = rest.iter().map(|(w, _)| *w).min() {
                    l.waiters = rest;
                    self.fill(key.clone(), earliest, false);
                }
            }
        }
    }

    /// Drops the subscriptions of users with no connection here for `linger`.
    fn sweep(&mut self, linger: Duration) {
        let now = Instant::now();
        let gone: Vec<UserId> = {
            let mut users = self.follower.lock();
            let gone: Vec<UserId> = users
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
        let batch = self.merge.drain_now();
        self.apply(batch, Vec::new());
        let stream = self.bp.stream_now(Source::Consumer).await?;
        let epoch = identity::epoch_of(stream.cached_info());
        let from = if epoch == self.router.epoch() {
            self.router.last_seq() + 1
        } else {
            self.bp.resync(&self.router, epoch).await.map_err(|e| e.to_string())?;
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
        // Copies lost to a slow consumer are not behind a reconnect: read every subject again.
        self.fill(Key::All, self.all_last, true);
        let users: Vec<(UserId, u64)> = self.live.iter().map(|(u, l)| (u.clone(), l.last)).collect();
        for (u, last) in users {
            if !self.live.get(&u).is_some_and(|l| l.filling) {
                self.fill(Key::User(u), last, true);
            }
        }
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
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| e.to_string())?;
            let info = msg.info().map_err(|e| e.to_string())?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let key = if msg.subject.as_str() == self.subjects.to_all || msg.subject.as_str() == self.subjects.base {
                Some(Key::All)
            } else {
                None
            };
            match wire::decode(&msg.payload) {
                Ok(d) => {
                    let key = key.or_else(|| match &d.target {
                        Target::Users(u) if u.len() == 1 && self.live.contains_key(&u[0]) => {
                            Some(Key::User(u[0].clone()))
                        }
                        _ => None,
                    });
                    if let Some(key) = key {
                        match &key {
                            Key::All => self.all_last = self.all_last.max(seq),
                            Key::User(u) => {
                                if let Some(l) = self.live.get_mut(u) {
                                    l.last = l.last.max(seq);
                                }
                            }
                        }
                        self.router.publish_sequenced(seq, d.target, &d.event, d.retain);
                    }
                }
                Err(e) => tracing::error!(seq, error = %e, "undecodable event in the stream skipped"),
            }
            self.bp.identity.saw(epoch, seq);
            if pending == 0 || seq >= target {
                break;
            }
        }
        Ok(())
    }
}

/// The events of `subject` after `after`, oldest first, at most `limit`: one direct get per
/// event (`next_by_subj`; the stream allows direct gets). On one server it sees every event
/// acknowledged before it. On a NATS cluster any replica of the stream may answer, and one
/// that lags may not have the newest yet: the next live copy of the subject then shows the
/// gap (`Nats-Last-Sequence`) and it is read again. (The leader-only message-get with
/// `next_by_subj` gets no answer from a clustered stream on nats-server 2.9.10: checked.)
async fn fetch(stream: &Stream<()>, subject: &str, after: u64, limit: usize) -> Result<Vec<(u64, Decoded)>, String> {
    let mut out = Vec::new();
    // An id past every sequence (a resume "ahead" of the stream): nothing after it.
    let Some(mut next) = after.checked_add(1) else { return Ok(out) };
    while out.len() < limit {
        match stream.direct_get_next_for_subject(subject, Some(next)).await {
            Ok(m) => {
                next = m.sequence + 1;
                match wire::decode(&m.payload) {
                    Ok(d) => out.push((m.sequence, d)),
                    Err(e) => tracing::error!(seq = m.sequence, error = %e, "undecodable event in the stream skipped"),
                }
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(out)
}
