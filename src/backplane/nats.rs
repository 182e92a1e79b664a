//! The NATS JetStream backplane.
//!
//! - Publish: the event (target inside the payload) goes to one subject of one stream; the
//!   call returns when JetStream acknowledged storing it, with the stream sequence number as
//!   the event's sequence. `Nats-Msg-Id` carries the idempotency key (JetStream duplicate
//!   detection), and a duplicate's ack carries the first one's sequence.
//! - Consume: each replica reads the whole stream with an ordered consumer (in order, no gaps;
//!   it recreates itself from the last sequence after a disconnect) and feeds its router, which
//!   ignores any sequence it has seen (redeliveries never reach a browser twice).
//! - Replay: served by each replica's local log. At start the consumer begins far enough back
//!   to fill the log with the last `replay_capacity` events, and the server reports ready only
//!   once it has caught up, so a client resuming on a fresh replica finds its events.
//! - Retained values: kept in a key-value bucket beside the stream (`retained_kv`), written by
//!   the publishing replica before it answers and loaded at start before the consumer runs.
//! - Epoch: the stream's creation time (`identity.rs`), so ids are the same on every replica and
//!   change only if the stream is recreated. The identity is read on every probe and every
//!   (re)start of the consumer; a missing stream is recreated by whoever notices (create-or-get,
//!   so racing replicas end up on one stream). On a change the replica refuses publishes, tells
//!   its clients (`Router::rebase`: `ssegate.missed` / `stream_recreated`), reloads the retained
//!   values, consumes the new stream from its first event, and takes publishes again once it
//!   has caught up.
//! - Health: a probe task asks JetStream for the stream's info every `HEALTH_EVERY`, bounded by
//!   `HEALTH_TIMEOUT`; a failure or a lost connection marks the broker down (publishes are then
//!   refused at once with nothing sent, the gRPC health of `ssegate.v1.Publisher` turns
//!   NOT_SERVING, `ssegate_backplane_up` is 0), and so does a resynchronisation after a change of
//!   identity. A paused broker keeps its TCP connection open, so the connection state alone
//!   would not notice it; the round trip does. The same answer settles the clients that resumed
//!   after an id this replica had not received (`Router::settle_ahead`).
//! - Tasks (consumer, probe, cluster responder) run on the application's `TaskTracker` and end
//!   when its `CancellationToken` is cancelled.

mod follow;
mod identity;
mod merge;
mod publish;
mod reorder;
mod streams;
mod subjects;
mod tasks;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use async_nats::{
    Client, ConnectOptions,
    connection::State,
    jetstream::{self, Context},
};
use tokio::sync::{Notify, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use streams::{NatsStreams, combine};

use super::{
    cluster::Cluster,
    retained_kv::{self, RetainedKv},
};
use crate::{router::Router, telemetry::histogram::Histogram};

/// Whether a nats-server of this version processes a client's publish to a single-server stream
/// on that client's own thread and queues the republished copy after releasing the stream
/// (nats-server before 2.9.16; from 2.9.16 every publish goes through one queue per stream), so
/// copies of events published over different connections can leave it out of sequence order. A
/// replicated stream (R > 1) applies its Raft log on one thread and is not affected.
fn inline_publishes(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']).map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor), Some(patch)) => (major, minor, patch) < (2, 9, 16),
        _ => false,
    }
}

/// The `--nats-*` flags.
#[derive(Clone, Debug)]
pub struct NatsSettings {
    pub urls: Vec<String>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub stream: String,
    pub subject: String,
    pub max_age: Duration,
    pub max_bytes: i64,
    pub duplicate_window: Duration,
    /// Longest wait for JetStream's acknowledgement of a publish.
    pub publish_timeout: Duration,
    /// Longest wait for every replica's answer to a cluster-wide query.
    pub cluster_wait: Duration,
    /// Copies of the stream the NATS cluster keeps (`num_replicas`, 1 to 5).
    pub stream_replicas: usize,
    /// `--nats-delivery interest`: a stream this replica creates republishes per-user live
    /// subjects, and on such a stream the replica follows only its users (`follow.rs`).
    pub interest: bool,
    /// How long a user stays followed after its last connection here (`--nats-interest-linger`).
    pub linger: Duration,
    /// How many partitions the events are spread over (`--nats-partitions`), each its own stream.
    pub partitions: usize,
    /// Which one these settings name (0 for the unpartitioned stream).
    pub partition: usize,
}

impl NatsSettings {
    /// The settings of partition `k`: partition 0 keeps `--nats-stream` and `--nats-subject`, so
    /// one partition is exactly the unpartitioned stream; partition k > 0 is the stream
    /// `<stream>-p<k>` on the subject `<subject>.p<k>`, which no other partition's subjects
    /// (`<subject>`, `<subject>.to.>`) match. The retained-values bucket follows the stream's
    /// name, the control subjects stay `<subject>.ctl.*` (one cluster).
    pub fn for_partition(&self, k: usize) -> Self {
        let mut s = self.clone();
        s.partition = k;
        if k > 0 {
            s.stream = format!("{}-p{k}", self.stream);
            s.subject = format!("{}.p{k}", self.subject);
        }
        s
    }
}

/// How often the broker is probed (one JetStream stream-info request per replica), and how long
/// a probe may take before the broker counts as down. A killed broker is noticed within
/// `HEALTH_EVERY` (the connection drops); a paused or unresponsive one within
/// `HEALTH_EVERY + HEALTH_TIMEOUT`.
pub const HEALTH_EVERY: Duration = Duration::from_secs(1);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The client's own keep-alive: a connection that answers no PING for three intervals is dropped
/// and re-established (possibly to another server of a NATS cluster).
const PING_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("JetStream stream `{stream}`: {reason}")]
    Stream { stream: String, reason: String },
    #[error(
        "the stream `{stream}` exists with subjects {found:?}, not [{expected:?}]: use another --nats-stream or fix it"
    )]
    Conflict { stream: String, found: Vec<String>, expected: String },
    #[error("timed out catching up with the stream (at {at} of {target})")]
    CatchUp { at: u64, target: u64 },
    #[error("JetStream key-value bucket `{bucket}` (retained values): {reason}")]
    Retained { bucket: String, reason: String },
    #[error("timed out loading the retained values from the bucket `{bucket}` (after {after:?})")]
    RetainedTimeout { bucket: String, after: Duration },
    #[error("cannot subscribe to the presence subject: {0}")]
    Presence(String),
    #[error(
        "the stream `{stream}` was made for {found} partition(s), not --nats-partitions {flag}: every replica must use \
         the same count; to change it, stop every replica and delete the streams (or use another --nats-stream)"
    )]
    Partitions { stream: String, found: usize, flag: usize },
}

pub struct NatsBackplane {
    client: Client,
    js: Context,
    settings: NatsSettings,
    /// The stream as every replica creates it.
    stream_config: jetstream::stream::Config,
    /// Stream sequence at start, and the epoch derived from the stream.
    pub last_seq_at_start: u64,
    pub epoch: u64,
    /// The stream's identity now, and whether the router has caught up with it.
    identity: identity::Tracked,
    /// Signalled on every (re)connection: the consumer is then recreated from the last
    /// sequence seen instead of waiting for its heartbeats to time out.
    reconnected: Arc<Notify>,
    /// Cluster-wide Presence, Stats and Disconnect.
    pub cluster: Arc<Cluster>,
    /// The retained values, kept beyond the life of every replica.
    retained: RetainedKv,
    /// Whether the broker answered the last probe (see `HEALTH_EVERY`). Starts true: connecting
    /// just succeeded.
    probe_ok: AtomicBool,
    /// `probe_ok` and not resynchronising with a recreated stream: publishes are taken.
    up: watch::Sender<bool>,
    /// Runs the probe now (a publish found no stream to store its event).
    kick: Notify,
    /// The subjects of interest delivery.
    subjects: subjects::Subjects,
    /// The stream republishes per-user live subjects and this replica follows only its users
    /// (decided at connect from the stream's configuration).
    interest: bool,
    /// Bumped on every (re)connection and every slow-consumer notice: interest delivery then
    /// reads what its subscriptions may have missed.
    generation: Arc<watch::Sender<u64>>,
    /// How live copies arrived against the stream's order (interest delivery; shared by the
    /// partitions).
    pub order: Arc<OrderStats>,
}

/// How live copies arrived against the stream's order (interest delivery, `follow.rs`), for
/// `/metrics`.
#[derive(Debug)]
pub struct OrderStats {
    /// Events applied behind a later one of another subject: connections already past them were
    /// told `ssegate.missed` (late) instead (`ssegate_backplane_late_events_total`).
    pub late: AtomicU64,
    /// For each live copy that arrived after a copy with a higher sequence had arrived in an
    /// earlier batch: how long after (`ssegate_backplane_copy_reorder_seconds`). What a hold must
    /// cover to put it back in its place.
    pub reordered: Histogram,
}

/// The connection to the broker, shared by every partition's backplane.
struct Link {
    client: Client,
    /// Signalled on every (re)connection.
    reconnected: Arc<Notify>,
    /// Bumped on every (re)connection and every slow-consumer notice.
    generation: Arc<watch::Sender<u64>>,
}

impl Link {
    async fn connect(settings: &NatsSettings) -> Result<Self, NatsError> {
        let urls = settings.urls.join(",");
        let connect_err = |reason: String| NatsError::Connect { urls: urls.clone(), reason };
        let reconnected = Arc::new(Notify::new());
        let notify = reconnected.clone();
        let generation = Arc::new(watch::channel(0u64).0);
        let bump = generation.clone();
        let mut options =
            ConnectOptions::new().name("ssegate").max_reconnects(None).ping_interval(PING_INTERVAL).event_callback(
                move |event| {
                    let notify = notify.clone();
                    let bump = bump.clone();
                    async move {
                        tracing::info!(%event, "NATS connection event");
                        if matches!(event, async_nats::Event::Connected) {
                            notify.notify_waiters();
                        }
                        if matches!(event, async_nats::Event::Connected | async_nats::Event::SlowConsumer(_)) {
                            bump.send_modify(|g| *g += 1);
                        }
                    }
                },
            );
        if let Some(creds) = &settings.creds_file {
            options = options.credentials_file(creds).await.map_err(|e| connect_err(e.to_string()))?;
        }
        if let Some(ca) = &settings.tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let addrs = settings
            .urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| connect_err(e.to_string()))?;
        let client = options.connect(addrs).await.map_err(|e| connect_err(e.to_string()))?;
        Ok(Self { client, reconnected, generation })
    }
}

impl NatsBackplane {
    /// Creates partition `settings.partition`'s stream or checks that the existing one fits, on
    /// the shared connection.
    async fn open(
        link: &Link,
        settings: NatsSettings,
        cluster: Arc<Cluster>,
        order: Arc<OrderStats>,
    ) -> Result<Self, NatsError> {
        let client = link.client.clone();
        let reconnected = link.reconnected.clone();
        let generation = link.generation.clone();
        let mut js = jetstream::new(client.clone());
        // The acknowledgement wait of a publish is the context's timeout; `publish` bounds the
        // whole call by --nats-publish-timeout itself, so this only must not be shorter.
        js.set_timeout(settings.publish_timeout.max(Duration::from_secs(5)));
        let stream_err = |reason: String| NatsError::Stream { stream: settings.stream.clone(), reason };
        let stream_config = identity::stream_config(&settings);
        let mut stream = identity::ensure(&js, &stream_config).await.map_err(stream_err)?;
        let mut info = stream.info().await.map_err(|e| stream_err(e.to_string()))?.clone();
        if info.config.num_replicas != settings.stream_replicas {
            info = Self::change_replicas(&js, info, settings.stream_replicas).await;
        }
        let made_for = identity::partitions_of(&info);
        if made_for != settings.partitions {
            return Err(NatsError::Partitions {
                stream: settings.stream.clone(),
                found: made_for,
                flag: settings.partitions,
            });
        }
        if !info.config.subjects.contains(&settings.subject) {
            return Err(NatsError::Conflict {
                stream: settings.stream.clone(),
                found: info.config.subjects.clone(),
                expected: settings.subject.clone(),
            });
        }
        let epoch = identity::epoch_of(&info);
        let last_seq_at_start = info.state.last_sequence;
        let subjects = subjects::Subjects::new(&settings.subject);
        let interest = settings.interest && identity::interest_capable(&info, &subjects);
        if settings.interest && !interest {
            tracing::warn!(stream = %settings.stream,
                "the stream was created without interest delivery (by --nats-delivery stream, or an older version; \
                 nats-server cannot add it to an existing stream): every event is read by every replica. \
                 To change that, delete the stream once every replica runs this version (clients are told to \
                 refetch: stream_recreated)");
        }
        let version = client.server_info().version;
        if interest && info.config.num_replicas <= 1 && inline_publishes(&version) {
            tracing::warn!(server_version = %version,
                "this nats-server stores publishes on each client's own thread and republishes after \
                 letting go of the stream (fixed in 2.9.16): under load a live copy can reach a replica \
                 behind a later one, whose connections already past it then get ssegate.missed (late); \
                 upgrade nats-server (ssegate_backplane_late_events_total counts them)");
        }
        tracing::info!(stream = %settings.stream, subject = %settings.subject, last_seq = last_seq_at_start,
            delivery = if interest { "interest" } else { "stream" }, "NATS JetStream backplane connected");
        let retained = RetainedKv::open(
            &js,
            &settings.stream,
            epoch,
            settings.stream_replicas,
            settings.publish_timeout,
            settings.duplicate_window,
        )
        .await?;
        let (up, _) = watch::channel(true);
        let identity = identity::Tracked::new(settings.stream.clone(), epoch, last_seq_at_start);
        Ok(Self {
            client,
            js,
            settings,
            stream_config,
            last_seq_at_start,
            epoch,
            identity,
            reconnected,
            cluster,
            retained,
            probe_ok: AtomicBool::new(true),
            up,
            kick: Notify::new(),
            subjects,
            interest,
            generation,
            order,
        })
    }

    /// Asks JetStream to keep `replicas` copies of an existing stream that has another number
    /// (the flag changed, or the stream was made by an older version). A refusal (e.g. more
    /// replicas than the NATS cluster has servers) is logged and the stream used as it is: the
    /// events still flow, with the durability the stream has.
    pub(super) async fn change_replicas(
        js: &Context,
        info: jetstream::stream::Info,
        replicas: usize,
    ) -> jetstream::stream::Info {
        let from = info.config.num_replicas;
        let mut config = info.config.clone();
        config.num_replicas = replicas;
        match js.update_stream(config).await {
            Ok(updated) => {
                tracing::info!(stream = %info.config.name, from, to = replicas, "JetStream stream replicas changed");
                updated
            }
            Err(e) => {
                tracing::warn!(stream = %info.config.name, has = from, wanted = replicas, error = %e,
                    "cannot change the stream's replicas (--nats-stream-replicas); using it as it is");
                info
            }
        }
    }

    /// Drains the connection (its subscriptions end, pending messages are flushed) and closes
    /// it. Call once the tasks using it have stopped.
    pub async fn close(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::debug!(error = %e, "closing the NATS connection");
        }
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Whether publishes are taken: the broker is reachable and answering (the last probe
    /// succeeded), and this replica is not resynchronising with a recreated stream.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Follows `is_up`. While the broker is down, every probe sends `false` again (so a
    /// follower can re-assert it); a recovery is sent once.
    pub fn watch_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Values of the retained-values bucket that could not be written.
    pub fn retained_persist_failures(&self) -> u64 {
        self.retained.failures()
    }

    /// Where an event of `target` is published: its own subject under interest delivery.
    fn publish_subject(&self, target: &crate::domain::Target, retain: crate::domain::Retain) -> String {
        if !self.interest {
            return self.settings.subject.clone();
        }
        // A topic's own subject only once no replica that does not follow topics is around.
        let topics = matches!(target, crate::domain::Target::Topic(_)) && self.cluster.everyone_follows_topics();
        self.subjects.publish_to(target, retain, topics)
    }

    /// Times the stream's identity changed (it was recreated) while this replica ran.
    pub fn epoch_changes(&self) -> u64 {
        self.identity.changes()
    }

    /// Sets `up` from the probe's last answer and the resynchronisation state. While down it
    /// is sent again on every call (a follower re-asserts it); a recovery is sent once.
    fn refresh_up(&self) {
        self.up.send_if_modified(|up| {
            let now = self.probe_ok.load(Relaxed) && !self.identity.is_syncing();
            let recovered = now && !*up;
            *up = now;
            !now || recovered
        });
    }

    /// Loads the retained values kept in the bucket into `router`, then starts the tasks on
    /// `tracker`, each ending when `stop` is cancelled: the broker probe,
    /// and the consumer feeding `router` from the stream, beginning early enough to fill the
    /// replay log. Waits (both steps within `catch_up`) until the consumer has caught up with
    /// the stream as it was at connect time.
    pub async fn start(
        self: &Arc<Self>,
        router: Arc<Router>,
        replay_capacity: u64,
        catch_up: Duration,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), NatsError> {
        let deadline = tokio::time::Instant::now() + catch_up;
        // Before the consumer starts: the events it catches up on then only replace older values.
        let mut loaded = tokio::time::timeout_at(deadline, self.retained.load()).await.map_err(|_| {
            NatsError::RetainedTimeout { bucket: retained_kv::bucket_name(&self.settings.stream), after: catch_up }
        })??;
        for v in std::mem::take(&mut loaded.values) {
            router.load_retained(v.seq, &v.target, &v.event, v.retain);
        }
        let this = self.clone();
        let token = stop.clone();
        tracker.spawn(async move { this.retained.delete_stale(loaded, token).await });
        let this = self.clone();
        tracker.spawn(this.probe(router.clone(), stop.clone()));
        let target = self.last_seq_at_start;
        let first = target.saturating_sub(replay_capacity) + 1;
        if self.interest {
            let task = tokio::time::timeout_at(deadline, follow::Task::start(self.clone(), router.clone(), first))
                .await
                .map_err(|_| NatsError::CatchUp { at: router.last_seq(), target })??;
            router.set_interest(Arc::new(follow::Handle(task.follower())));
            tracker.spawn(task.run(stop.clone()));
            return Ok(());
        }
        // Everything before `first` counts as caught up (with no replay, that is the whole stream).
        let (progress_tx, mut progress) = watch::channel(first - 1);
        let this = self.clone();
        let token = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = this.consume(router, first, progress_tx) => {}
                () = token.cancelled() => tracing::debug!("NATS consumer stopped"),
            }
        });
        let caught_up = tokio::time::timeout_at(deadline, async {
            while *progress.borrow_and_update() < target {
                if progress.changed().await.is_err() {
                    break;
                }
            }
        });
        if caught_up.await.is_err() {
            return Err(NatsError::CatchUp { at: *progress.borrow(), target });
        }
        Ok(())
    }
}

#[cfg(test)]
mod version_tests {
    use super::inline_publishes;

    #[test]
    fn brokers_before_2_9_16_publish_inline() {
        for v in ["2.9.10", "v2.9.15", "2.8.4", "1.4.0"] {
            assert!(inline_publishes(v), "{v}");
        }
        for v in ["2.9.16", "2.10.0", "v2.11.3", "3.0.0-beta", "", "unknown"] {
            assert!(!inline_publishes(v), "{v}");
        }
    }
}
