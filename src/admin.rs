//! The admin port's state: whether this server is ready. Its routes (metrics and
//! Kubernetes-style probes, kept off the public port) are served by `http::admin`.
//!
//! - `GET /metrics`: OpenMetrics text.
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 while serving, 503 from the start of a drain (readiness), so load
//!   balancers stop sending new connections before any are closed. It is about serving
//!   subscribers only: a broker outage does not change it (streams and resumes keep working, and
//!   pulling every replica out of the Service at once would cut them all off). The broker's
//!   state is the gRPC health of `ssegate.v1.Publisher` and the `ssegate_backplane_up` gauge.
//!   A data dir that does not take writes (`--data-dir`: a full or failing disk) is the same
//!   kind of trouble: `/readyz` stays 200 (the only replica taken out of its Service would cut
//!   off every subscriber, who can still be served) and *reports* it on its line
//!   (`ready; publishes refused: ...`); the publisher's gRPC health is NOT_SERVING and
//!   `ssegate_backplane_up` 0 while it lasts.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// A condition readiness also requires: `Some(reason)` while it fails.
type Check = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Whether this server should receive new subscribers: serving and not draining; and what
/// else readiness reports without failing (the data dir's trouble).
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    also: Option<Check>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also reports `check`'s trouble (`Some(reason)`) while ready: the data dir's health.
    pub fn reporting(mut self, check: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        self.also = Some(Arc::new(check));
        self
    }

    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::SeqCst);
    }

    /// `Ok` with what to report while ready (`None`: nothing wrong), `Err` with the reason when
    /// not ready.
    pub fn check(&self) -> Result<Option<String>, &'static str> {
        if !self.serving.load(Ordering::SeqCst) {
            return Err("not ready: draining");
        }
        Ok(self.also.as_ref().and_then(|check| check()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn readiness_requires_serving_and_reports_the_extra_check_without_failing() {
        let trouble = Arc::new(Mutex::new(None::<String>));
        let t = trouble.clone();
        let ready = Readiness::new().reporting(move || t.lock().unwrap().clone());
        assert_eq!(ready.check(), Err("not ready: draining"));
        ready.set(true);
        assert_eq!(ready.check(), Ok(None));
        *trouble.lock().unwrap() = Some("data dir failed: disk full".into());
        assert_eq!(ready.check(), Ok(Some("data dir failed: disk full".to_owned())));
        *trouble.lock().unwrap() = None;
        assert_eq!(ready.check(), Ok(None));
    }
}
