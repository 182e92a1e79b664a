//! Integration tests: the real server on port 0, real sockets, a tonic client publishing and a
//! raw HTTP client reading the event stream. Each test names the behaviour it pins down.
//! Set TEST_LOG=1 to see the server's logs.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod authorizer;
mod backplane_faults;
mod broker;
mod browser;
mod cli_edges;
mod client_js;
mod client_tabs;
mod cluster;
mod cluster_retained;
mod connect;
mod console;
mod console_ui;
mod control;
mod docs;
mod drain;
mod durable;
mod edge_hygiene;
mod encoding;
mod helpers;
mod history;
mod hostile;
mod http_edge;
mod limits;
mod observability;
mod partitions;
mod presence_events;
mod resume;
mod retained;
mod rough_edges;
mod routing;
mod security;
mod services;
mod stream;
mod stream_identity;
mod stuck_clients;
mod tls;
mod validation;
