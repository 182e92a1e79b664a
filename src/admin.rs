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
//!   With `--data-dir` it is 503 while the store does not take writes (`Store::health`: a
//!   failed or degraded disk), with the reason; the publisher's gRPC health follows it too.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// A condition readiness also requires: `Some(reason)` while it fails.
type Check = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Whether this server should receive new subscribers: serving and not draining (and, with
/// `--data-dir`, its store taking writes).
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    also: Option<Check>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also requires `check` to pass (`None`): the data dir's health, which is this process's
    /// own disk, not a shared broker.
    pub fn also_requiring(mut self, check: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        self.also = Some(Arc::new(check));
        self
    }

    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::SeqCst);
    }

    /// `Err` with the reason when not ready.
    pub fn check(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::SeqCst) {
            return Err("not ready: draining".to_owned());
        }
        if let Some(reason) = self.also.as_ref().and_then(|check| check()) {
            return Err(format!("not ready: {reason}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn readiness_requires_serving_and_the_extra_check_and_says_why() {
        let trouble = Arc::new(Mutex::new(None::<String>));
        let t = trouble.clone();
        let ready = Readiness::new().also_requiring(move || t.lock().unwrap().clone());
        assert_eq!(ready.check(), Err("not ready: draining".to_owned()));
        ready.set(true);
        assert_eq!(ready.check(), Ok(()));
        *trouble.lock().unwrap() = Some("data dir failed: disk full".into());
        assert_eq!(ready.check(), Err("not ready: data dir failed: disk full".to_owned()));
        *trouble.lock().unwrap() = None;
        assert_eq!(ready.check(), Ok(()));
    }
}
