//! The memory backplane's records in the data dir (`--data-dir`): one per published event,
//! appended to the store (`crate::store`) under the event's sequence number, read back at start
//! to rebuild the replay log, the retained values and the idempotency keys.
//!
//! Layout (store record kind [`KIND_EVENT`]): a version byte (1), the publish wall time in Unix
//! milliseconds (u64, little-endian), the idempotency key's length (u16 LE, 0 for none: a key is
//! never empty) and bytes, then the replica wire encoding of (target, event, retain)
//! (`wire.rs`: JSON that ignores unknown fields, a retained value's expiry as absolute time), so
//! a newer version can add fields there without a new layout.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    Dedupe,
    wire::{self, DecodeError},
};
use crate::{
    domain::{Event, EventName, GroupId, IdempotencyKey, InvalidText, Retain, Scope, Target, Topic, UserId},
    router::{RetainedEntry, Router},
    store::{Recovered, Store, StoreError},
};

/// The checkpoint saying how the last process stopped: the router's last sequence number,
/// written at a clean stop (`mark_clean`, after the router closed), replaced by [`RUNNING`] at
/// start.
const CLEAN: &str = "clean";
const RUNNING: &[u8] = b"running";

/// How far the sequence jumps after an unclean stop. An event gets its id (and reaches open
/// streams) before its record is written, so after a crash ids just above the last stored one
/// may name events that browsers saw but the log lost; starting past them keeps an id from
/// ever naming two events. 2^22 (4M) is far more than can be assigned but unwritten at once
/// (the store's pending bytes are bounded), and a small dent in 2^64.
pub const UNCLEAN_SKIP: u64 = 1 << 22;

/// The checkpoint of what outlives removed segments: the retained values and the idempotency
/// keys as of one sequence number ([`State`]), written before segments are removed.
const STATE: &str = "state";

/// How often the data dir is checked for something to compact: whole segments whose events
/// have all left the replay log (by count, bytes or age). The check is two short lock holds;
/// a compaction happens about once per segment written.
pub const COMPACT_EVERY: Duration = Duration::from_secs(1);

/// The store record kind of a published event.
pub const KIND_EVENT: u8 = 1;

const VERSION: u8 = 1;
/// Version, wall time, key length.
const HEADER: usize = 1 + 8 + 2;

/// One published event as stored.
#[derive(Debug, PartialEq)]
pub struct EventRecord {
    pub key: Option<IdempotencyKey>,
    /// When it was published (wall clock): ages its idempotency key across a restart.
    pub at: SystemTime,
    pub target: Target,
    pub event: Event,
    pub retain: Retain,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("record version {0} is not known to this version")]
    Version(u8),
    #[error("idempotency key: {0}")]
    Key(#[from] InvalidText),
    #[error("idempotency key is not UTF-8")]
    KeyUtf8,
    #[error(transparent)]
    Event(#[from] DecodeError),
}

/// Encodes one event record.
pub fn encode(key: Option<&IdempotencyKey>, at: SystemTime, target: &Target, event: &Event, retain: Retain) -> Vec<u8> {
    let key = key.map_or("", IdempotencyKey::as_str).as_bytes();
    let body = wire::encode(target, event, retain);
    let mut out = Vec::with_capacity(HEADER + key.len() + body.len());
    out.push(VERSION);
    out.extend_from_slice(&wire::unix_ms(at).to_le_bytes());
    // Keys are at most 256 bytes (`IdempotencyKey`), far below u16::MAX.
    out.extend_from_slice(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&body);
    out
}

/// Decodes (and re-validates) one event record.
pub fn decode(bytes: &[u8]) -> Result<EventRecord, RecordError> {
    let (&version, rest) = bytes.split_first().ok_or(RecordError::Short(0))?;
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let short = || RecordError::Short(bytes.len());
    let (ms, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let (len, rest) = rest.split_first_chunk::<2>().ok_or_else(short)?;
    let len = usize::from(u16::from_le_bytes(*len));
    let (key, body) = rest.split_at_checked(len).ok_or_else(short)?;
    let key = match key {
        [] => None,
        k => Some(IdempotencyKey::parse(std::str::from_utf8(k).map_err(|_| RecordError::KeyUtf8)?)?),
    };
    let wire::Decoded { target, event, retain } = wire::decode(body)?;
    Ok(EventRecord { key, at: wire::from_unix_ms(u64::from_le_bytes(*ms)), target, event, retain })
}

/// The `state` checkpoint (JSON: read rarely, and easy to inspect when something goes wrong).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct State {
    /// Every event up to this sequence number is reflected in the values and keys.
    upto: u64,
    retained: Vec<StoredValue>,
    keys: Vec<StoredKey>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct StoredValue {
    /// `u`ser, `g`roup, `t`opic or `b`roadcast, and its id (none for broadcast).
    scope: char,
    id: Option<String>,
    name: Option<String>,
    seq: u64,
    /// The event as sent, without `id:` (always UTF-8: built from text).
    frame: String,
    expires_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct StoredKey {
    key: String,
    seq: u64,
    at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
enum StateError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("scope {0:?} is not u, g, t or b with an id")]
    Scope(char),
    #[error(transparent)]
    Text(#[from] InvalidText),
}

impl StoredValue {
    fn from_entry(e: RetainedEntry) -> Option<Self> {
        let (scope, id) = match &e.scope {
            Scope::User(u) => ('u', Some(u.as_str().to_owned())),
            Scope::Group(g) => ('g', Some(g.as_str().to_owned())),
            Scope::Topic(t) => ('t', Some(t.as_str().to_owned())),
            Scope::Broadcast => ('b', None),
        };
        Some(StoredValue {
            scope,
            id,
            name: e.name.as_ref().map(|n| n.as_str().to_owned()),
            seq: e.seq,
            frame: String::from_utf8(e.frame.to_vec()).ok()?,
            expires_at_ms: e.expires_at.map(wire::unix_ms),
        })
    }

    fn into_entry(self) -> Result<RetainedEntry, StateError> {
        let scope = match (self.scope, self.id.as_deref()) {
            ('u', Some(id)) => Scope::User(UserId::parse(id)?),
            ('g', Some(id)) => Scope::Group(GroupId::parse(id)?),
            ('t', Some(id)) => Scope::Topic(Topic::parse(id)?),
            ('b', None) => Scope::Broadcast,
            (c, _) => return Err(StateError::Scope(c)),
        };
        Ok(RetainedEntry {
            scope,
            name: self.name.as_deref().map(EventName::parse).transpose()?,
            seq: self.seq,
            frame: Bytes::from(self.frame),
            expires_at: self.expires_at_ms.map(wire::from_unix_ms),
        })
    }
}

/// Removes the segments whose events have all left the replay log, after checkpointing what
/// they still held for later (retained values, idempotency keys), every `COMPACT_EVERY` until
/// `stop`. The data dir then stays within about the replay bounds, one segment, and the
/// retained values.
pub(super) async fn compact_until(store: Arc<Store>, dedupe: &Dedupe, router: &Router, stop: CancellationToken) {
    let mut tick = tokio::time::interval(COMPACT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = compact(&store, dedupe, router).await {
            tracing::warn!(error = %e, "data dir compaction failed; the segments stay until the next try");
        }
    }
}

/// One compaction, if a segment can go. Blocking parts run on the blocking pool.
pub(super) async fn compact(store: &Arc<Store>, dedupe: &Dedupe, router: &Router) -> Result<usize, StoreError> {
    // Cheap check first: the second segment's start must be at or below the replay floor.
    let starts = store.segment_starts();
    let Some(&second) = starts.get(1) else { return Ok(0) };
    if second > router.replay_floor() {
        return Ok(0);
    }
    let (upto, floor, values) = router.checkpoint_state();
    let keys = dedupe.snapshot();
    let state = State {
        upto,
        retained: values.into_iter().filter_map(StoredValue::from_entry).collect(),
        keys: keys
            .into_iter()
            .map(|(key, seq, at)| StoredKey { key: key.as_str().to_owned(), seq, at_ms: wire::unix_ms(at) })
            .collect(),
    };
    let s = store.clone();
    let (removed, bytes) = tokio::task::spawn_blocking(move || {
        let bytes = serde_json::to_vec(&state).map_err(|e| StoreError::Failed {
            dir: s.dir().to_path_buf(),
            cause: format!("encoding the state checkpoint: {e}"),
        })?;
        // The checkpoint first: a crash between the two leaves both, which restores the same.
        s.write_checkpoint(STATE, &bytes)?;
        Ok::<_, StoreError>((s.remove_before(floor)?, bytes.len()))
    })
    .await
    .map_err(|e| StoreError::Failed { dir: store.dir().to_path_buf(), cause: e.to_string() })??;
    tracing::info!(removed, below = floor, checkpoint_bytes = bytes, upto, "data dir compacted");
    Ok(removed)
}

/// Reads the `state` checkpoint; a damaged one is logged and ignored (the values and keys it
/// held are lost, the events are not).
fn read_state(store: &Store) -> Result<State, StoreError> {
    let Some(bytes) = store.read_checkpoint(STATE)? else { return Ok(State::default()) };
    match serde_json::from_slice::<State>(&bytes) {
        Ok(state) => Ok(state),
        Err(e) => {
            tracing::error!(error = %StateError::from(e), "the data dir's state checkpoint cannot be read; retained values and idempotency keys of removed segments are lost");
            Ok(State::default())
        }
    }
}

/// Rebuilds `router` (made with the store's epoch, no connection yet) from the recovered
/// records: each goes through `publish_sequenced` under its own sequence number, which rebuilds
/// the replay log (within its bounds) and the retained values (expired ones are dropped as
/// usual); idempotency keys still inside their window are remembered with their ids. Then
/// decides where the sequence continues (see [`CLEAN`] and [`UNCLEAN_SKIP`]) and marks the
/// directory in use.
pub(super) async fn restore(
    store: &Arc<Store>,
    dedupe: &Dedupe,
    router: &Router,
    recovered: Recovered,
) -> Result<(), StoreError> {
    let s = store.clone();
    let state = tokio::task::spawn_blocking(move || read_state(&s))
        .await
        .map_err(|e| StoreError::Failed { dir: store.dir().to_path_buf(), cause: e.to_string() })??;
    let (upto, checkpointed_keys) = (state.upto, state.keys.len());
    let mut values = Vec::with_capacity(state.retained.len());
    for v in state.retained {
        match v.into_entry() {
            Ok(v) => values.push(v),
            Err(e) => tracing::error!(error = %e, "a retained value of the state checkpoint cannot be read; skipped"),
        }
    }
    // Everything before the first record still held is gone from the data dir: a client
    // resuming from before it is told it missed events, rather than silently skipping them.
    let forgotten_through = recovered.records.first().map_or(recovered.last_seq, |r| r.seq - 1);
    router.restore_checkpoint(values, forgotten_through);
    for k in state.keys {
        match IdempotencyKey::parse(&k.key) {
            Ok(key) => dedupe.remember(
                key,
                crate::domain::EventId { epoch: store.epoch(), seq: k.seq },
                wire::from_unix_ms(k.at_ms),
            ),
            Err(e) => tracing::error!(error = %e, "an idempotency key of the state checkpoint cannot be read; skipped"),
        }
    }
    let now = SystemTime::now();
    let (mut restored, mut unreadable) = (0u64, 0u64);
    for record in &recovered.records {
        if record.kind != KIND_EVENT {
            unreadable += 1;
            continue;
        }
        match decode(&record.bytes) {
            Ok(r) => {
                let age = now.duration_since(r.at).unwrap_or(Duration::ZERO);
                if let Some(p) = router.publish_restored(record.seq, r.target, &r.event, r.retain, age) {
                    restored += 1;
                    if let Some(key) = r.key {
                        dedupe.remember(key, p.id, r.at);
                    }
                }
            }
            Err(e) => {
                // Its checksum was right, so a newer version wrote it: skipped, not fatal.
                unreadable += 1;
                tracing::error!(seq = record.seq, error = %e, "a record of the data dir cannot be read; skipped");
            }
        }
    }
    let s = store.clone();
    let marker = tokio::task::spawn_blocking(move || {
        let marker = s.read_checkpoint(CLEAN)?;
        s.write_checkpoint(CLEAN, RUNNING)?;
        Ok::<_, StoreError>(marker)
    })
    .await
    .map_err(|e| StoreError::Failed { dir: store.dir().to_path_buf(), cause: e.to_string() })??;
    let stopped_at = marker.as_deref().and_then(|m| std::str::from_utf8(m).ok()).and_then(|m| m.parse::<u64>().ok());
    // A clean stop wrote the router's last number: every id up to it was assigned, none above.
    // It may exceed the last stored record (a failed write, or a jump after an earlier crash).
    // The checkpoint's number was assigned too, even if its record never reached the disk.
    let last_assigned = recovered.last_seq.max(upto);
    let (clean, continue_after) = match stopped_at {
        Some(last) if last >= last_assigned => (true, last),
        _ if recovered.created => (true, 0),
        _ => (false, last_assigned.saturating_add(UNCLEAN_SKIP)),
    };
    router.skip_to(continue_after);
    let log = if clean { "data dir restored after a clean stop" } else { "data dir restored after an unclean stop" };
    tracing::info!(
        records = recovered.records.len(),
        restored,
        checkpointed_keys,
        forgotten_through,
        unreadable,
        last_seq = recovered.last_seq,
        cut_bytes = recovered.cut_bytes,
        clean,
        next_seq = continue_after + 1,
        "{log}"
    );
    Ok(())
}

/// Writes the clean-stop marker with the router's final last sequence number.
pub(super) async fn mark_clean(store: &Arc<Store>, last_seq: u64) {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.write_checkpoint(CLEAN, last_seq.to_string().as_bytes())).await {
        Ok(Ok(())) => tracing::info!(last_seq, "data dir marked cleanly stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot mark the data dir cleanly stopped; the next start skips ids"),
        Err(e) => tracing::warn!(error = %e, "cannot mark the data dir cleanly stopped; the next start skips ids"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn an_event_record_round_trips_with_its_key_wall_time_and_retained_expiry() {
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let event = Event { name: Some(EventName::parse("n").unwrap()), data: "a\nb".into() };
        let target = Target::users(vec![UserId::parse("ü.x").unwrap()]);
        let key = IdempotencyKey::parse("order-42").unwrap();
        for (key, retain) in [
            (Some(key.clone()), Retain::Set { expires_at: Some(at + Duration::from_secs(60)) }),
            (None, Retain::No),
            (Some(key), Retain::Clear),
        ] {
            let bytes = encode(key.as_ref(), at, &target, &event, retain);
            let want = EventRecord { key, at, target: target.clone(), event: event.clone(), retain };
            assert_eq!(decode(&bytes).unwrap(), want);
        }
    }

    #[test]
    fn a_retained_value_round_trips_through_the_state_checkpoint_in_every_scope() {
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let scopes = [
            Scope::User(UserId::parse("ü.x").unwrap()),
            Scope::Group(GroupId::parse("g").unwrap()),
            Scope::Topic(Topic::parse("orders/42").unwrap()),
            Scope::Broadcast,
        ];
        for (i, scope) in scopes.into_iter().enumerate() {
            let entry = RetainedEntry {
                scope,
                name: (i % 2 == 0).then(|| EventName::parse("badge").unwrap()),
                seq: 40 + i as u64,
                frame: Bytes::from_static(b"event: badge\ndata: 3\n\n"),
                expires_at: (i % 2 == 1).then_some(at),
            };
            let state = State {
                upto: 99,
                retained: vec![StoredValue::from_entry(entry.clone()).unwrap()],
                keys: vec![StoredKey { key: "k".into(), seq: 7, at_ms: 1 }],
            };
            let back: State = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
            assert_eq!(back, state);
            assert_eq!(back.retained.into_iter().next().unwrap().into_entry().unwrap(), entry);
        }
        let bad = StoredValue {
            scope: 'b',
            id: Some("x".into()),
            name: None,
            seq: 1,
            frame: String::new(),
            expires_at_ms: None,
        };
        assert!(matches!(bad.into_entry(), Err(StateError::Scope('b'))));
    }

    #[test]
    fn a_damaged_record_is_an_error() {
        let bytes = encode(None, UNIX_EPOCH, &Target::Broadcast, &Event { name: None, data: "x".into() }, Retain::No);
        assert!(matches!(decode(&bytes[..5]), Err(RecordError::Short(5))));
        let mut newer = bytes.clone();
        newer[0] = 9;
        assert!(matches!(decode(&newer), Err(RecordError::Version(9))));
        let mut long_key = bytes;
        long_key[9] = 200;
        assert!(decode(&long_key).is_err());
    }
}
