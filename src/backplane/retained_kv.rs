//! Retained values that outlive every replica: a JetStream key-value bucket beside the event
//! stream (`<stream>_retained`, history 1, file storage, the stream's replicas), one key per
//! (scope, event name) as in the router's store (`codec`).
//!
//! - Write: the publishing replica, after JetStream's PubAck and before answering, writes each
//!   value of the event (one per user of a user list) with compare-and-set, the newer event id
//!   (stream epoch, sequence) wins: read the entry; if its id is not older, done; else update
//!   at its revision (or create it), retrying a few times on a conflict. A clear writes a
//!   tombstone.
//!   A failed write does not fail the publish (the event is stored and every running replica
//!   applies it from the stream): it is logged and counted
//!   (`ssegate_retained_persist_failures_total`).
//! - Load: at start, before the stream is consumed, every live value is loaded into the router
//!   (`Router::load_retained`); the catch-up from the stream then only applies events newer than
//!   a loaded value, so both converge. Expired values and tombstones older than
//!   `tombstone_keep` are deleted afterwards (revision-checked, best effort).
//! - A recreated stream (`nats/identity.rs`): the bucket is opened again (created if it went
//!   with the stream, e.g. a broker that lost its store), its values are read under the new
//!   epoch (those of the old stream then count as older than every new event) and handed to
//!   `Router::rebase` with the switch.

mod codec;

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::{
    HeaderMap,
    jetstream::{
        Context,
        consumer::{DeliverPolicy, pull},
        kv::{self, Operation, UpdateErrorKind},
        stream::{self, DiscardPolicy, StorageType},
    },
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::codec::Stored;
pub use self::codec::bucket_name;
use super::nats::NatsError;
use crate::{
    domain::{Event, Retain, Scope, Target},
    router::KeptValue,
};

/// Compare-and-set attempts per value before a write counts as failed (each lost race means
/// another replica wrote the key meanwhile; the next attempt reads its value).
const CAS_ATTEMPTS: u32 = 5;
/// Values of one publish written at once (a user list has one per user).
const WRITE_CONCURRENCY: usize = 16;
/// Tombstones are kept at least this long (and at least the duplicate window, within which a
/// retry of an older publish may still write its value).
const TOMBSTONE_KEEP: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("reading the current value: {0}")]
    Read(#[from] kv::EntryError),
    #[error("writing: {0}")]
    Write(#[from] kv::UpdateError),
    #[error("other replicas kept writing the key ({CAS_ATTEMPTS} compare-and-set attempts lost)")]
    Contended,
    #[error("not done within {0:?} (--nats-publish-timeout)")]
    TimedOut(Duration),
}

/// What loading found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The live values, for the router.
    pub values: Vec<KeptValue>,
    /// Expired values and old tombstones (key, revision), to delete.
    stale: Vec<(String, u64)>,
}

pub struct RetainedKv {
    store: kv::Store,
    bucket: String,
    /// The stream the bucket is (to create it again if it is gone).
    config: stream::Config,
    /// The event stream's epoch now: values of another epoch are older than every event of
    /// this one (it changes when the stream is recreated: `reopen`).
    epoch: AtomicU64,
    /// Bound of one publish's writes.
    write_timeout: Duration,
    tombstone_keep: Duration,
    failures: AtomicU64,
}

impl RetainedKv {
    /// Opens the bucket, creating it if missing.
    pub async fn open(
        js: &Context,
        stream: &str,
        epoch: u64,
        replicas: usize,
        write_timeout: Duration,
        duplicate_window: Duration,
    ) -> Result<Self, NatsError> {
        let bucket = bucket_name(stream);
        let err = |reason: String| NatsError::Retained { bucket: bucket.clone(), reason };
        // The stream a KV bucket is (as `create_key_value` makes it), made directly: that
        // call first asks for the account's info, which older servers answer in a form the
        // client cannot read.
        let config = stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(format!("ssegate: retained values of the stream {stream}")),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: StorageType::File,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: DiscardPolicy::New,
            ..Default::default()
        };
        js.get_or_create_stream(config.clone()).await.map_err(|e| err(e.to_string()))?;
        let store = js.get_key_value(&bucket).await.map_err(|e| err(e.to_string()))?;
        let info = store.stream.cached_info().clone();
        if info.config.num_replicas != replicas {
            super::nats::NatsBackplane::change_replicas(js, info, replicas).await;
        }
        tracing::info!(%bucket, "retained values bucket opened");
        let tombstone_keep = TOMBSTONE_KEEP.max(duplicate_window);
        Ok(Self {
            store,
            bucket,
            config,
            epoch: AtomicU64::new(epoch),
            write_timeout,
            tombstone_keep,
            failures: AtomicU64::new(0),
        })
    }

    /// The event stream was recreated as `epoch`: creates the bucket again if it is gone too
    /// (create-or-get, as several replicas do it at once; the handle addresses it by name, so
    /// it stays valid), and reads and writes under the new epoch from now on.
    pub async fn reopen(&self, js: &Context, epoch: u64) -> Result<(), NatsError> {
        js.get_or_create_stream(self.config.clone())
            .await
            .map_err(|e| NatsError::Retained { bucket: self.bucket.clone(), reason: e.to_string() })?;
        self.epoch.store(epoch, Relaxed);
        Ok(())
    }

    /// Values that could not be written (`ssegate_retained_persist_failures_total`).
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Writes what event (`epoch`, `seq`) (stored in the stream) does to the retained values of
    /// its target; never fails the publish (see the module docs).
    pub async fn persist(&self, epoch: u64, seq: u64, target: &Target, event: &Event, retain: Retain) {
        let deadline = Instant::now() + self.write_timeout;
        let writes = Scope::of(target).into_iter().filter_map(|scope| {
            let value = Bytes::from(Stored::new(epoch, seq, &scope, event, retain)?.encode());
            let key = codec::key(&scope, event.name.as_ref());
            Some(async move {
                let result = match tokio::time::timeout_at(deadline, self.write(&key, (epoch, seq), value)).await {
                    Ok(r) => r,
                    Err(_) => Err(WriteError::TimedOut(self.write_timeout)),
                };
                (key, result)
            })
        });
        let results: Vec<_> = futures_util::stream::iter(writes).buffer_unordered(WRITE_CONCURRENCY).collect().await;
        let total = results.len();
        let failed: Vec<_> = results.into_iter().filter_map(|(k, r)| r.err().map(|e| (k, e))).collect();
        if let Some((key, error)) = failed.first() {
            self.failures.fetch_add(failed.len() as u64, Relaxed);
            tracing::warn!(bucket = %self.bucket, seq, failed = failed.len(), of = total, %key, %error,
                "retained value not written to the key-value bucket (the event is published; running replicas \
                 hold the value, but a restart of every replica may fall back to the previous one)");
        }
    }

    /// One compare-and-set write of the value of event `id` (epoch, sequence): true if
    /// written, false if the bucket holds a newer value.
    async fn write(&self, key: &str, id: (u64, u64), value: Bytes) -> Result<bool, WriteError> {
        let seq = id.1;
        for attempt in 1..=CAS_ATTEMPTS {
            let revision = match self.store.entry(key).await? {
                None => 0,
                Some(e) if e.operation == Operation::Put && Stored::id_of(&e.value) >= id => {
                    return Ok(false);
                }
                Some(e) => e.revision,
            };
            match self.store.update(key, value.clone(), revision).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    tracing::debug!(%key, seq, attempt, "retained value written meanwhile; reading it again");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(WriteError::Contended)
    }

    /// Reads every live value, for the router (to load before the stream is consumed). An
    /// error means the bucket could not be read.
    pub async fn load(&self) -> Result<Loaded, NatsError> {
        let err = |e: &dyn std::fmt::Display| NatsError::Retained {
            bucket: self.bucket.clone(),
            reason: format!("cannot read it: {e}"),
        };
        let mut stream = self.store.stream.clone();
        let state = stream.info().await.map_err(|e| err(&e))?.state.clone();
        let mut loaded = Loaded::default();
        if state.messages == 0 {
            return Ok(loaded);
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{}>", self.store.prefix),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(loaded);
        }
        let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
        let now = SystemTime::now();
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| err(&e))?;
            let info = msg.info().map_err(|e| err(&e))?;
            let (revision, pending) = (info.stream_sequence, info.pending);
            let age = age(info.published.unix_timestamp_nanos(), now);
            let key = msg.subject.as_str().strip_prefix(self.store.prefix.as_str()).unwrap_or_default();
            match self.entry(key, msg.headers.as_ref(), &msg.payload, age, now) {
                Entry::Loaded(value) => loaded.values.push(value),
                Entry::Stale => loaded.stale.push((key.to_owned(), revision)),
                Entry::Skipped => {}
            }
            // Everything there was at the start has been seen (the newest message of the stream
            // is the last value of its key, so it is delivered last).
            if pending == 0 || revision >= state.last_sequence {
                break;
            }
        }
        tracing::info!(bucket = %self.bucket, values = loaded.values.len(), stale = loaded.stale.len(),
            "retained values loaded");
        Ok(loaded)
    }

    /// What one entry of the bucket holds.
    fn entry(&self, key: &str, headers: Option<&HeaderMap>, payload: &[u8], age: Duration, now: SystemTime) -> Entry {
        // Deleted keys (the markers of deleted tombstones and expired values) hold nothing.
        if headers.and_then(|h| h.get("KV-Operation")).is_some_and(|op| op.as_str() != "PUT") {
            return Entry::Skipped;
        }
        let (scope, name) = match codec::parse_key(key) {
            Ok(k) => k,
            Err(error) => {
                tracing::warn!(bucket = %self.bucket, %error, "retained value with a key this version cannot read skipped");
                return Entry::Skipped;
            }
        };
        let stored = match Stored::decode(payload) {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(bucket = %self.bucket, %key, %error, "unreadable retained value skipped");
                return Entry::Skipped;
            }
        };
        if stored.cleared {
            return if age >= self.tombstone_keep { Entry::Stale } else { Entry::Skipped };
        }
        // A value of an older stream (recreated since) gives way to any event of this one.
        let seq = if stored.epoch == self.epoch.load(Relaxed) { stored.seq } else { 0 };
        let (event, retain) = stored.loaded(name);
        if let Retain::Set { expires_at: Some(at) } = retain
            && at <= now
        {
            return Entry::Stale;
        }
        Entry::Loaded(KeptValue { seq, target: scope.target(), event, retain })
    }

    /// Deletes what `load` found stale, each only if it is still the key's revision (a newer
    /// value written meanwhile stays). Best effort: a failure is logged and left for the next
    /// start.
    pub async fn delete_stale(&self, loaded: Loaded, stop: CancellationToken) {
        let deletes = loaded.stale.into_iter().map(|(key, revision)| async move {
            if let Err(error) = self.store.delete_expect_revision(&key, Some(revision)).await {
                tracing::debug!(bucket = %self.bucket, %key, revision, %error, "stale retained value not deleted");
            }
        });
        let all = futures_util::stream::iter(deletes).buffer_unordered(WRITE_CONCURRENCY).collect::<Vec<()>>();
        tokio::select! {
            _ = all => {}
            () = stop.cancelled() => {}
        }
    }
}

enum Entry {
    Loaded(KeptValue),
    Stale,
    Skipped,
}

/// How long ago a message stored at `published_nanos` (Unix nanoseconds) was stored.
fn age(published_nanos: i128, now: SystemTime) -> Duration {
    let now_nanos = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
    Duration::from_nanos(u64::try_from(now_nanos - published_nanos).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_is_zero_for_a_clock_behind_the_broker() {
        let now = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(age(90_000_000_000, now), Duration::from_secs(10));
        assert_eq!(age(200_000_000_000, now), Duration::ZERO);
    }
}
