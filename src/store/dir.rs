//! The data directory itself: its lock, its `META` (the epoch), left-overs of a crash.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::Path;

use super::{LOCK_FILE, META_FILE, StoreError, checkpoint, format, recover};

/// Takes the directory's lock, or says who holds it.
pub(super) fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked { dir: dir.to_path_buf() }),
        Err(TryLockError::Error(e)) => Err(StoreError::io("lock", &path, e)),
    }
}

/// Removes the temporary files of side-file writes a crash interrupted.
pub(super) fn remove_leftovers(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(checkpoint::TMP_SUFFIX)) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
        }
    }
    Ok(())
}

/// The directory's epoch, and whether it was drawn now (a new directory).
pub(super) fn epoch(dir: &Path) -> Result<(u64, bool), StoreError> {
    match checkpoint::read(dir, META_FILE)? {
        Some(meta) => Ok((decode_meta(&meta, dir)?, false)),
        None => Ok((create_meta(dir)?, true)),
    }
}

fn decode_meta(meta: &[u8], dir: &Path) -> Result<u64, StoreError> {
    let epoch: [u8; 8] =
        meta.try_into().map_err(|_| StoreError::corrupt(&dir.join(META_FILE), 0, "META is not 8 bytes"))?;
    Ok(u64::from_le_bytes(epoch))
}

/// A new directory: draws its epoch (random, as the memory backplane's) and persists it.
fn create_meta(dir: &Path) -> Result<u64, StoreError> {
    if let Some(first) = recover::list_segments(dir)?.first() {
        let path = dir.join(format::segment_name(*first));
        return Err(StoreError::corrupt(&path, 0, "log segments without META: their epoch is unknown"));
    }
    let epoch = fastrand::u64(1..);
    checkpoint::write_atomic(dir, META_FILE, &epoch.to_le_bytes())?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        // The directory itself may be new: its name must survive a crash too.
        checkpoint::sync_dir(parent)?;
    }
    Ok(epoch)
}
