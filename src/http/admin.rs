//! The admin port's routes: `/metrics`, `/healthz`, `/readyz` (see `crate::admin`) and the
//! console (`/console/`, see `console`), served with the same socket budget and deadlines as
//! the other ports.

use std::sync::Arc;

use axum::{extract::State, response::IntoResponse, routing::get};
use http::{StatusCode, header};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::console::Console;
use crate::{
    admin::Readiness,
    net::{Gate, Timeouts},
    telemetry::metrics::Metrics,
};

/// Serves the admin port until `shutdown` is cancelled.
#[allow(clippy::too_many_arguments)] // each is a distinct part the admin port is made of
pub async fn serve(
    listener: TcpListener,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    ready: Readiness,
    console: Option<Console>,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    super::hyper_conn::serve_plain(listener, gate, app(metrics, ready, console), timeouts, shutdown, tracker).await;
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    ready: Readiness,
}

fn app(metrics: Arc<Metrics>, ready: Readiness, console: Option<Console>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, ready })
        .merge(super::console::routes(console))
        .layer(axum::middleware::map_response(super::error::nosniff_on_errors))
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.render())
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.ready.check() {
        Ok(None) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Some(trouble)) => (StatusCode::OK, format!("ready; publishes refused: {trouble}\n")),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}
