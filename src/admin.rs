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

use crate::telemetry::metrics::Metrics;

/// Whether this server should receive new traffic.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
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
    if s.ready.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
    }
}
