//! Files re-read when they change (JWT keys, publisher API keys, TLS certificates): what the
//! three reloaders share. Polling the modification time every few seconds works the same for a
//! plain file and for a Kubernetes Secret volume (whose files are swapped by symlink).

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The file's modification time (following symlinks), or `None` if it cannot be read.
pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Calls `check` every `every` until `stop`, on a task of `tracker`.
pub fn every(every: Duration, stop: &CancellationToken, tracker: &TaskTracker, check: impl Fn() + Send + 'static) {
    let stop = stop.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => check(),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_watcher_stops_with_the_token_and_its_tracker_sees_it_end() {
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let checks = Arc::new(AtomicUsize::new(0));
        let c = checks.clone();
        every(Duration::from_secs(2), &stop, &tracker, move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(checks.load(Ordering::SeqCst), 3, "at 0, 2 and 4 s");
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(checks.load(Ordering::SeqCst), 3, "no check after the stop");
    }
}
