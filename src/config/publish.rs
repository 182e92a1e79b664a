//! The flags of `ssegate publish`.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use super::duration;

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["user", "group", "topic", "broadcast"])))]
pub struct PublishArgs {
    /// The server's gRPC port (its `--grpc-addr`; not the SSE port): `http://host:port`,
    /// `https://host:port` (TLS), or a bare `host:port`, taken as `https://` if a TLS option
    /// below is given and `http://` otherwise.
    #[arg(long, visible_alias = "grpc-addr", env = "SSEGATE_GRPC_URL", default_value = "http://127.0.0.1:50051")]
    pub grpc_url: String,

    /// Publisher API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "SSEGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// With an `https://` URL: the CA (PEM) that signed the server's certificate (a bare
    /// address then means `https://`).
    #[arg(long, env = "SSEGATE_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// With an `https://` URL and mutual TLS: this client certificate (PEM)...
    #[arg(long, env = "SSEGATE_TLS_CLIENT_CERT_FILE", requires = "tls_client_key_file")]
    pub tls_client_cert_file: Option<PathBuf>,

    /// ...and its private key (PEM).
    #[arg(long, env = "SSEGATE_TLS_CLIENT_KEY_FILE", requires = "tls_client_cert_file")]
    pub tls_client_key_file: Option<PathBuf>,

    /// Deliver to this user (repeatable).
    #[arg(long)]
    pub user: Vec<String>,

    /// Deliver to the members of this group.
    #[arg(long)]
    pub group: Option<String>,

    /// Deliver to the subscribers of this topic.
    #[arg(long)]
    pub topic: Option<String>,

    /// Deliver to every connection.
    #[arg(long)]
    pub broadcast: bool,

    /// Idempotency key: publishes with the same key within the server's duplicate window are
    /// delivered once, each answered with the first one's id. Every backplane: memory (2
    /// minutes; kept across restarts with --data-dir) and NATS (--nats-duplicate-window).
    #[arg(long)]
    pub idempotency_key: Option<String>,

    /// SSE event name; empty for the default `message`.
    #[arg(long, default_value = "")]
    pub event: String,

    /// Keep the event as the current state of its target and name, sent to every connection
    /// that opens later ("State on page load" in the README).
    #[arg(long)]
    pub retain: bool,

    /// With --retain: stop sending the value to new connections after this long.
    #[arg(long, requires = "retain", value_parser = duration)]
    pub retain_ttl: Option<Duration>,

    /// Delete the retained value of the target and event name (the event is still delivered).
    #[arg(long, conflicts_with_all = ["retain", "retain_ttl"])]
    pub clear_retained: bool,

    /// Event data; `-` reads it from standard input.
    #[arg(long)]
    pub data: String,
}
