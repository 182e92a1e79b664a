//! ssegate: backend services publish events over gRPC; browsers receive them over
//! Server-Sent Events.
//!
//! # Layout
//! - [`domain`]: identifiers, events, ids and targets, validated once where they enter.
//! - [`event_stream`]: the `text/event-stream` encoder and a spec-following parser.
//! - [`router`]: connections, groups and topics; publish fans out to per-connection mailboxes.
//! - `grpc`: the `ssegate.v1.Publisher` service (the only module that sees prost types).
//! - `http`: `GET /v1/events` and the SSE response body (the only module that sees axum).
//! - [`presence`]: who is online in the cluster, as online/offline transitions.
//! - `admin`: `/metrics`, `/healthz`, `/readyz` on the admin port.
//! - `telemetry`: logs, OTLP traces, Prometheus metrics.
//! - `config`, `startup`: flags, and building and running the three listeners.

pub mod admin;
pub mod auth;
pub mod backplane;
pub mod cli;
pub mod config;
pub mod domain;
pub mod event_stream;
pub mod grpc;
pub mod http;
pub mod net;
pub mod presence;
pub mod reload;
pub mod router;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
