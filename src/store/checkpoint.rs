//! Side files replaced atomically: checkpoints (compacted state that must outlive removed
//! segments) and `META` (the epoch).
//!
//! Written as `<file>.tmp`, fsynced, renamed over `<file>`, and the directory fsynced: after
//! a crash the file is the old version or the new one, never a mix. A checksum catches what
//! the disk itself may have damaged since.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;

use super::StoreError;

/// The first bytes of every side file.
const MAGIC: [u8; 8] = *b"SSEGSIDE";
const VERSION: u32 = 1;
/// `magic | version u32 | len u64 | crc32 u32`, then the payload.
const HEADER_LEN: usize = 24;
/// Where a side file is written before it is renamed into place; left-overs of a crash are
/// removed at open.
pub(super) const TMP_SUFFIX: &str = ".tmp";

/// fsyncs a directory, so that files created, renamed or removed in it stay so after a crash.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io("fsync dir", dir, e))
}

/// Replaces `dir/name` with `payload`, durably.
pub(super) fn write_atomic(dir: &Path, name: &str, payload: &[u8]) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StoreError::io("create", &tmp, e))?;
    file.write_all(&bytes).map_err(|e| StoreError::io("write", &tmp, e))?;
    file.sync_all().map_err(|e| StoreError::io("fsync", &tmp, e))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename into", &path, e))?;
    sync_dir(dir)
}

/// Reads `dir/name`: `None` if it does not exist, `Corrupt` if it fails its checks.
pub(super) fn read(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let path = dir.join(name);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", &path, e)),
    };
    let Some((head, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(StoreError::corrupt(&path, 0, "side file cut short"));
    };
    if head[0..8] != MAGIC {
        return Err(StoreError::corrupt(&path, 0, "not an ssegate side file (bad magic)"));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != VERSION {
        return Err(StoreError::corrupt(&path, 8, format!("side file version {version}, this build reads {VERSION}")));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[12..20]);
    if u64::from_le_bytes(len) != payload.len() as u64 {
        return Err(StoreError::corrupt(&path, 12, "length does not match the file"));
    }
    if u32::from_le_bytes([head[20], head[21], head[22], head[23]]) != crc32fast::hash(payload) {
        return Err(StoreError::corrupt(&path, HEADER_LEN as u64, "checksum mismatch"));
    }
    Ok(Some(payload.to_vec()))
}

/// A checkpoint's file name, if `name` is an acceptable one.
pub(super) fn file_name(name: &str) -> Result<String, StoreError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(format!("{name}.ckpt")) } else { Err(StoreError::BadName(name.into())) }
}
