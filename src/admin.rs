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

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// Whether this server should receive new subscribers: serving and not draining.
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::SeqCst);
    }

    /// `Err` with the reason when not ready.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.serving.load(Ordering::SeqCst) {
            return Err("not ready: draining");
        }
        Ok(())
    }
}
