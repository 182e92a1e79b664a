//! The admin port: Prometheus metrics and Kubernetes-style probes, kept off the public port.
//!
//! - `GET /metrics`: OpenMetrics text.
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 while serving, 503 from the start of a drain (readiness), so load
//!   balancers stop sending new connections before any are closed.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{extract::State, response::IntoResponse, routing::get};
use http::{StatusCode, header};

use crate::{backplane::Backplane, telemetry::metrics::Metrics};

/// Whether this server should receive new traffic: serving, not draining, and its backplane
/// (the broker) reachable.
#[derive(Clone)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    backplane: Arc<Backplane>,
}

impl Readiness {
    pub fn new(backplane: Arc<Backplane>) -> Self {
        Self { serving: Arc::default(), backplane }
    }

    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::SeqCst);
    }

    /// `Err` with the reason when not ready.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.serving.load(Ordering::SeqCst) {
            return Err("not ready: draining");
        }
        if !self.backplane.is_healthy() {
            return Err("not ready: broker unavailable");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    ready: Readiness,
}

pub fn app(metrics: Arc<Metrics>, ready: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, ready })
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.render())
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.ready.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}
