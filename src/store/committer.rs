//! The committer: one std thread that owns the active segment, writes each pending batch with
//! one write per segment touched, syncs as the policy says, and completes the batch's tickets.
//!
//! While it writes and syncs one batch, appends gather in the next: under load many publishes
//! share one fdatasync (group commit) without anyone waiting to fill a batch.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::checkpoint::sync_dir;
use super::format::{self, HEADER_LEN, Header};
use super::ticket::{Batch, Completion};
use super::{Health, Shared, StoreError, SyncPolicy};

/// The capacity of a written batch's buffer kept for reuse.
const KEEP_BUFFER: usize = 1 << 20;

/// The segment appends go to.
struct Active {
    first_seq: u64,
    file: File,
    path: PathBuf,
    /// Bytes written (header included): where the next record goes.
    len: u64,
}

/// The committer's view of the files. Used by its thread only.
pub(super) struct Writer {
    dir: PathBuf,
    epoch: u64,
    segment_bytes: u64,
    active: Option<Active>,
    /// Segments created by the batch being written: removed if it fails, and shown to
    /// `remove_before` only once it succeeded (so it never removes what a rollback truncates).
    created: Vec<u64>,
}

impl Writer {
    /// `active`: the last segment and its valid length, as recovery left them.
    pub(super) fn new(
        dir: &Path,
        epoch: u64,
        segment_bytes: u64,
        active: Option<(u64, u64)>,
    ) -> Result<Self, StoreError> {
        let mut writer = Writer { dir: dir.to_path_buf(), epoch, segment_bytes, active: None, created: Vec::new() };
        if let Some((first_seq, len)) = active {
            writer.reopen(first_seq, len)?;
        }
        Ok(writer)
    }

    fn reopen(&mut self, first_seq: u64, len: u64) -> Result<(), StoreError> {
        let path = self.dir.join(format::segment_name(first_seq));
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(|e| StoreError::io("open", &path, e))?;
        self.active = Some(Active { first_seq, file, path, len });
        Ok(())
    }

    /// Writes the encoded records in `buf` (whole records, in sequence order), rolling to a new
    /// segment where the active one would pass `segment_bytes`; fdatasyncs if `sync`.
    fn write(&mut self, buf: &[u8], sync: bool) -> Result<u64, StoreError> {
        let mut pos = 0;
        let mut written = 0;
        while let Some((size, seq)) = buf.get(pos..).and_then(format::peek_encoded) {
            if self.active.as_ref().is_none_or(|a| a.len > HEADER_LEN && a.len + size as u64 > self.segment_bytes) {
                self.roll(seq)?;
            }
            let Some(active) = self.active.as_mut() else { break };
            // The run of records that fit in this segment (at least one: a record larger than
            // a segment gets a segment of its own).
            let mut end = pos + size;
            while let Some((next, _)) = buf.get(end..).and_then(format::peek_encoded) {
                if active.len + (end + next - pos) as u64 > self.segment_bytes {
                    break;
                }
                end += next;
            }
            let run = buf.get(pos..end).unwrap_or_default();
            active.file.write_all_at(run, active.len).map_err(|e| StoreError::io("write", &active.path, e))?;
            active.len += run.len() as u64;
            written += run.len() as u64;
            pos = end;
        }
        if sync {
            self.sync()?;
        }
        Ok(written)
    }

    /// fdatasyncs the active segment.
    fn sync(&self) -> Result<(), StoreError> {
        match &self.active {
            Some(a) => a.file.sync_data().map_err(|e| StoreError::io("fdatasync", &a.path, e)),
            None => Ok(()),
        }
    }

    /// Starts segment `<seq>.log`. The segment before it is synced first, so that only the
    /// last segment can ever hold a torn record; the directory is synced so the new file's
    /// name survives a crash before any of its records is acknowledged.
    fn roll(&mut self, seq: u64) -> Result<(), StoreError> {
        self.sync()?;
        let path = self.dir.join(format::segment_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| StoreError::io("create", &path, e))?;
        self.created.push(seq);
        let header = format::encode_header(Header { epoch: self.epoch, first_seq: seq });
        file.write_all_at(&header, 0).map_err(|e| StoreError::io("write", &path, e))?;
        self.active = Some(Active { first_seq: seq, file, path, len: HEADER_LEN });
        sync_dir(&self.dir)?;
        tracing::debug!(first_seq = seq, "new log segment");
        Ok(())
    }

    /// Undoes a failed batch: removes the segments it created and cuts the one it started in
    /// back to `start`, durably. An error here means the files' state is unknown.
    fn rollback(&mut self, start: Option<(u64, u64)>) -> Result<(), StoreError> {
        let created = std::mem::take(&mut self.created);
        for &first in &created {
            let path = self.dir.join(format::segment_name(first));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path, e)),
            }
        }
        self.active = None;
        if let Some((first_seq, len)) = start {
            self.reopen(first_seq, len)?;
            if let Some(a) = &self.active {
                a.file.set_len(len).map_err(|e| StoreError::io("truncate", &a.path, e))?;
            }
            self.sync()?;
        }
        if !created.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn position(&self) -> Option<(u64, u64)> {
        self.active.as_ref().map(|a| (a.first_seq, a.len))
    }
}

/// The committer thread's body: runs until the store is dropped and everything is written.
pub(super) fn run(shared: Arc<Shared>, mut writer: Writer) {
    let mut buf = Vec::new();
    // `Every`: when the oldest write not yet synced was made.
    let mut unsynced: Option<Instant> = None;
    loop {
        let (batch, closing) = {
            let mut state = shared.lock_state();
            loop {
                if !state.buf.is_empty() || state.closing {
                    break;
                }
                let due = match (shared.policy, unsynced) {
                    (SyncPolicy::Every(every), Some(since)) => Some(since + every),
                    _ => None,
                };
                shared.idle.store(true, Relaxed);
                state = match due {
                    None => shared.wait(state),
                    Some(due) => {
                        let now = Instant::now();
                        if now >= due {
                            shared.idle.store(false, Relaxed);
                            break;
                        }
                        shared.wait_timeout(state, due - now)
                    }
                };
                shared.idle.store(false, Relaxed);
            }
            let batch = (!state.buf.is_empty()).then(|| {
                buf.clear();
                std::mem::swap(&mut state.buf, &mut buf);
                Completion(std::mem::replace(&mut state.batch, Batch::new(Arc::downgrade(&shared))))
            });
            (batch, state.closing)
        };
        if let Some(batch) = batch {
            let sync = shared.policy == SyncPolicy::Always;
            commit(&shared, &mut writer, &buf, sync, batch);
            if buf.capacity() > KEEP_BUFFER {
                // A burst's buffer is not kept for the quiet that follows.
                buf = Vec::new();
            }
            if !sync && unsynced.is_none() {
                unsynced = Some(Instant::now());
            }
        }
        let sync_due = match (shared.policy, unsynced) {
            (SyncPolicy::Every(every), Some(since)) => closing || since.elapsed() >= every,
            _ => false,
        };
        if sync_due {
            unsynced = None;
            if let Err(e) = writer.sync() {
                // What the failed fdatasync lost is unknown, and its tickets are already
                // complete (`Every` acknowledges after the write): no rollback can make the
                // log a faithful prefix again, so the store stops here.
                fail(&shared, &e);
            } else {
                shared.counters.syncs.fetch_add(1, Relaxed);
            }
        }
        if closing && shared.lock_state().buf.is_empty() {
            return;
        }
    }
}

/// Writes one batch and completes its tickets.
fn commit(shared: &Shared, writer: &mut Writer, buf: &[u8], sync: bool, batch: Completion) {
    if let Some(failed) = shared.lock_state().failed.clone() {
        batch.complete(Err(failed));
        return;
    }
    let start = writer.position();
    match writer.write(buf, sync) {
        Ok(written) => {
            let created = std::mem::take(&mut writer.created);
            if !created.is_empty() {
                shared.lock_segments().extend(created);
            }
            shared.counters.batches.fetch_add(1, Relaxed);
            shared.counters.bytes_written.fetch_add(written, Relaxed);
            if sync {
                shared.counters.syncs.fetch_add(1, Relaxed);
            }
            shared.set_health_ok();
            batch.complete(Ok(()));
        }
        Err(error) => {
            shared.counters.write_failures.fetch_add(1, Relaxed);
            match writer.rollback(start) {
                Ok(()) => {
                    let mut health = shared.lock_health();
                    // Once per episode: a full disk fails every batch until there is room.
                    if matches!(*health, Health::Ok) {
                        tracing::warn!(%error, "log write failed: its appends fail, the segment is cut back");
                    } else {
                        tracing::debug!(%error, "log write failed again");
                    }
                    *health = Health::Degraded(error.clone());
                    drop(health);
                    shared.lock_state().resting =
                        Some((std::time::Instant::now() + super::REST_AFTER_FAILURE, error.to_string()));
                    batch.complete(Err(error));
                }
                Err(rollback) => {
                    let failed = fail(shared, &rollback);
                    tracing::error!(%error, "log write failed before the store failed");
                    batch.complete(Err(failed));
                }
            }
        }
    }
}

/// Puts the store in its `Failed` state: every later append errs.
fn fail(shared: &Shared, cause: &StoreError) -> StoreError {
    let failed = StoreError::Failed { dir: shared.dir.clone(), cause: cause.to_string() };
    tracing::error!(error = %failed, "the durable log takes no more writes");
    shared.lock_state().failed = Some(failed.clone());
    *shared.lock_health() = Health::Failed(failed.clone());
    failed
}
