//! `StoreError`: what the durable log reports, one line each, naming the file it concerns.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A failure of the store. `Clone` because one failed write fails every ticket of its batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A system call failed: disk full (`ENOSPC`), I/O error (`EIO`), file too large (`EFBIG`)...
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done (`"write"`, `"fdatasync"`, ...).
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// Another process holds the data directory's lock.
    #[error(
        "data dir {} is in use: another ssegate process holds {}; stop it or use another --data-dir",
        .dir.display(),
        .dir.join(super::LOCK_FILE).display()
    )]
    Locked { dir: PathBuf },
    /// Something on disk that no crash of ours can produce (a bad record before the last
    /// segment's tail, a foreign epoch): refused rather than silently cut.
    #[error("corrupt {} at byte {offset}: {reason}", .path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    /// `append` was given a sequence number not above the last one appended.
    #[error("sequence {seq} is not above the last appended {last}")]
    OutOfOrder { seq: u64, last: u64 },
    /// A record over `MAX_RECORD_BYTES`.
    #[error("record of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// More than `Options::max_pending_bytes` wait to be written: the disk is not keeping up.
    #[error("{pending} bytes wait to be written (limit {max}): the disk is not keeping up")]
    Backlogged { pending: usize, max: usize },
    /// A write failed and so did cutting the file back to its last good length: what is on
    /// disk is unknown, so the store takes no more writes until a restart recovers it.
    #[error("store in {} failed and takes no more writes (a restart recovers it): {cause}", .dir.display())]
    Failed { dir: PathBuf, cause: String },
    /// A write failed less than `REST_AFTER_FAILURE` ago: refused without trying.
    #[error("the last write to the data dir failed ({cause}); writes are retried every 500 ms")]
    Resting { cause: String },
    /// A checkpoint name outside `[a-z0-9_-]{1,64}`.
    #[error("invalid checkpoint name {0:?} (expected 1-64 of a-z, 0-9, '_', '-')")]
    BadName(String),
}

impl StoreError {
    pub(super) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError::Io { op, path: path.to_path_buf(), source: Arc::new(source) }
    }

    pub(super) fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> Self {
        StoreError::Corrupt { path: path.to_path_buf(), offset, reason: reason.into() }
    }

    /// The OS error number of an `Io` failure, for tests and metrics labels.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StoreError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
