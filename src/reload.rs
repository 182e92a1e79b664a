//! Files re-read when they change (JWT keys, publisher API keys, TLS certificates): what the
//! three reloaders share. Polling the modification time every few seconds works the same for a
//! plain file and for a Kubernetes Secret volume (whose files are swapped by symlink).

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

/// The file's modification time (following symlinks), or `None` if it cannot be read.
pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Calls `check` every `every` until the process ends.
pub fn every(every: Duration, check: impl Fn() + Send + 'static) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            check();
        }
    });
}
