//! The memory backplane's records in the data dir (`--data-dir`): one per published event,
//! appended to the store (`crate::store`) under the event's sequence number, read back at start
//! to rebuild the replay log, the retained values and the idempotency keys.
//!
//! Layout (store record kind [`KIND_EVENT`]): a version byte (1), the publish wall time in Unix
//! milliseconds (u64, little-endian), the idempotency key's length (u16 LE, 0 for none: a key is
//! never empty) and bytes, then the replica wire encoding of (target, event, retain)
//! (`wire.rs`: JSON that ignores unknown fields, a retained value's expiry as absolute time), so
//! a newer version can add fields there without a new layout.

use std::{sync::Arc, time::SystemTime};

use super::{
    Dedupe,
    wire::{self, DecodeError},
};
use crate::{
    domain::{Event, IdempotencyKey, InvalidText, Retain, Target},
    router::Router,
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
    let (mut restored, mut unreadable) = (0u64, 0u64);
    for record in &recovered.records {
        if record.kind != KIND_EVENT {
            unreadable += 1;
            continue;
        }
        match decode(&record.bytes) {
            Ok(r) => {
                if let Some(p) = router.publish_sequenced(record.seq, r.target, &r.event, r.retain) {
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
    let (clean, continue_after) = match stopped_at {
        Some(last) if last >= recovered.last_seq => (true, last),
        _ if recovered.created => (true, 0),
        _ => (false, recovered.last_seq.saturating_add(UNCLEAN_SKIP)),
    };
    router.skip_to(continue_after);
    let log = if clean { "data dir restored after a clean stop" } else { "data dir restored after an unclean stop" };
    tracing::info!(
        records = recovered.records.len(),
        restored,
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
    use crate::domain::{EventName, UserId};

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
