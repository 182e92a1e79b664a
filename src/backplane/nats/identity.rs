//! A stream's identity: its creation time, which is the epoch of every id made from its
//! sequence numbers. A stream that is deleted and created again (by an operator, or because the
//! broker lost its store) numbers its events from 1 again under a new identity; a replica that
//! kept the old one would acknowledge publishes with ids of the old epoch and skip every event
//! numbered below its last one, silently. So the identity is read wherever the stream is
//! touched (the probe, every start of the consumer, a publish whose sequence does not fit) and
//! a change sends the replica through a resynchronisation (`tasks.rs`): refuse publishes, tell
//! the router (`Router::rebase`), reload the retained values, consume the new stream from its
//! first event, and take publishes again once caught up.
//!
//! `Tracked` is the state of one stream, so that a backplane over several streams keeps one
//! per stream.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use async_nats::jetstream::{
    Context,
    stream::{self, Config, DiscardPolicy, Republish, StorageType},
};
use tokio::sync::watch;

use super::{NatsSettings, subjects::Subjects};

/// The configuration every replica creates the event stream with (the same everywhere, so
/// that creating it is idempotent when several replicas race to do it).
pub(super) fn stream_config(settings: &NatsSettings) -> Config {
    let subjects = Subjects::new(&settings.subject);
    // Interest delivery: `<subject>.to.>` republished on `<subject>.live.>` (`subjects.rs`),
    // and message-gets by subject answered by any replica of the stream as well.
    let (extra, republish) = if settings.interest {
        let republish =
            Republish { source: subjects.to_any.clone(), destination: subjects.live_any.clone(), headers_only: false };
        (Some(subjects.to_any), Some(republish))
    } else {
        (None, None)
    };
    Config {
        name: settings.stream.clone(),
        subjects: std::iter::once(settings.subject.clone()).chain(extra).collect(),
        republish,
        allow_direct: settings.interest,
        max_age: settings.max_age,
        max_bytes: settings.max_bytes,
        duplicate_window: settings.duplicate_window,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        num_replicas: settings.stream_replicas,
        description: (settings.partitions > 1)
            .then(|| format!("{PARTITION_MARK}{} of {}", settings.partition, settings.partitions)),
        ..Default::default()
    }
}

/// How a partitioned stream's description begins: `ssegate partition <k> of <n>`. An
/// unpartitioned stream (one partition) has no description, as before partitions existed.
const PARTITION_MARK: &str = "ssegate partition ";

/// How many partitions the stream was made for (1 without the mark).
pub(super) fn partitions_of(info: &stream::Info) -> usize {
    info.config
        .description
        .as_deref()
        .and_then(|d| d.strip_prefix(PARTITION_MARK))
        .and_then(|rest| rest.split(" of ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(1)
}

/// Whether a stream republishes its events for interest delivery as this version sets it up
/// (a republish cannot be added to an existing stream on nats-server 2.9: a stream created
/// without it is read whole).
pub(super) fn interest_capable(info: &stream::Info, subjects: &Subjects) -> bool {
    info.config.subjects.contains(&subjects.to_any)
        && info
            .config
            .republish
            .as_ref()
            .is_some_and(|r| r.source == subjects.to_any && r.destination == subjects.live_any && !r.headers_only)
}

/// The epoch of ids made from the stream's sequence numbers: its creation time in Unix
/// nanoseconds, never 0 (so that an id can never look like "no epoch").
pub(super) fn epoch_of(info: &stream::Info) -> u64 {
    (info.created.unix_timestamp_nanos() as u64).max(1)
}

/// The stream as it is now, created if it is missing: create-or-get, so that replicas racing
/// to recreate it all end up on the one stream that won (JetStream answers a create with the
/// same configuration with the existing stream; a refused create is followed by a plain get).
pub(super) async fn ensure(js: &Context, config: &Config) -> Result<stream::Stream, String> {
    match js.get_or_create_stream(config.clone()).await {
        Ok(stream) => Ok(stream),
        Err(create) => js.get_stream(&config.name).await.map_err(|get| format!("{create}; then: {get}")),
    }
}

/// Where a change of identity was noticed (a log field).
#[derive(Clone, Copy, Debug)]
pub(super) enum Source {
    Probe,
    Consumer,
    Publish,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Consumer => "consumer",
            Source::Publish => "publish",
        }
    }
}

/// One stream's identity as this replica knows it, and whether the router has caught up with it.
pub(super) struct Tracked {
    stream: String,
    /// The identity read last (from JetStream, by whoever touched the stream).
    observed: watch::Sender<u64>,
    /// Set when `observed` changes; cleared once the router follows the stream of `observed`
    /// and has caught up with it. Publishes are refused meanwhile.
    syncing: AtomicBool,
    /// The highest sequence number known to exist in the stream of `observed` (consumed or
    /// acknowledged): a new event acknowledged at or below it was stored in another stream.
    seen: AtomicU64,
    /// Changes of identity seen (`ssegate_backplane_epoch_changes_total`).
    changes: AtomicU64,
}

impl Tracked {
    pub fn new(stream: String, epoch: u64, last_seq: u64) -> Self {
        let (observed, _) = watch::channel(epoch);
        Self {
            stream,
            observed,
            syncing: AtomicBool::new(false),
            seen: AtomicU64::new(last_seq),
            changes: AtomicU64::new(0),
        }
    }

    /// Records the identity just read; on a change (logged and counted once), the replica is
    /// not consistent any more until `synced`. Returns whether it changed.
    pub fn observe(&self, epoch: u64, source: Source) -> bool {
        let mut old = 0;
        let changed = self.observed.send_if_modified(|current| {
            old = std::mem::replace(current, epoch);
            old != epoch
        });
        if changed {
            self.syncing.store(true, Relaxed);
            self.seen.store(0, Relaxed);
            self.changes.fetch_add(1, Relaxed);
            tracing::warn!(stream = %self.stream, old_epoch = format_args!("{old:x}"), new_epoch = format_args!("{epoch:x}"),
                noticed_by = source.as_str(),
                "the JetStream stream was recreated (its identity changed): publishes are refused while this replica \
                 tells its clients (ssegate.missed, stream_recreated), reloads the retained values and catches up \
                 with the new stream");
        }
        changed
    }

    /// The identity read last.
    pub fn epoch(&self) -> u64 {
        *self.observed.borrow()
    }

    /// Follows the identity read last.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.observed.subscribe()
    }

    /// The identity read last and the highest sequence known to exist in its stream.
    pub fn position(&self) -> (u64, u64) {
        (self.epoch(), self.seen.load(Relaxed))
    }

    /// Sequence `seq` exists in the stream of `epoch`.
    pub fn saw(&self, epoch: u64, seq: u64) {
        if self.epoch() == epoch {
            self.seen.fetch_max(seq, Relaxed);
        }
    }

    pub fn is_syncing(&self) -> bool {
        self.syncing.load(Relaxed)
    }

    /// The router is switching to the stream of `epoch` (`observe` may have seen it first).
    pub fn begin(&self, epoch: u64, source: Source) {
        self.observe(epoch, source);
        self.syncing.store(true, Relaxed);
    }

    /// The router follows the stream of `epoch` and has caught up with it. True if this ends a
    /// resynchronisation; false if there was none, or if the identity changed again meanwhile
    /// (then it goes on).
    pub fn synced(&self, epoch: u64) -> bool {
        if self.epoch() != epoch || !self.syncing.swap(false, Relaxed) {
            return false;
        }
        // A change seen between the check and the swap must not be lost.
        if self.epoch() != epoch {
            self.syncing.store(true, Relaxed);
            return false;
        }
        true
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Relaxed)
    }
}
