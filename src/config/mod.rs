//! Command-line flags, each also read from an `SSEGATE_…` environment variable: `serve.rs`
//! (the server's), `publish.rs` (`ssegate publish`'s). `startup::settings` turns the server's
//! into typed, validated settings once, at start; nothing else reads them. The README's flag
//! table is checked against `ServeArgs` (`tests/api/docs.rs`).

mod publish;
mod serve;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

pub use publish::PublishArgs;
pub use serve::ServeArgs;

#[derive(Parser, Debug)]
#[command(name = "ssegate", version, about = "Push service: publish over gRPC, receive over Server-Sent Events")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Publish one event to a running server over gRPC and print its id.
    Publish(Box<PublishArgs>),
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 15s, 2m)"))
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackplaneKind {
    Memory,
    Nats,
}

/// How the events of a NATS stream reach each replica (`--nats-delivery`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsDelivery {
    /// Only the events its connections need: per-user live subjects, on streams created with
    /// them (an older stream is read whole, as with `stream`).
    Interest,
    /// Every replica reads the whole stream.
    Stream,
}

/// How ssegate calls the backend's `ssegate.v1.Authorizer` (`--authorizer-protocol`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizerProtocol {
    /// gRPC (HTTP/2; h2c for http://).
    Grpc,
    /// Connect unary with JSON: `POST <addr>/ssegate.v1.Authorizer/Authorize` over HTTP/1.1.
    Connect,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let Cli { command: Command::Serve(d) } = Cli::try_parse_from(["ssegate", "serve"]).unwrap() else {
            panic!("not serve")
        };
        assert_eq!(d.http_addr.port(), 8080);
        assert_eq!(d.grpc_addr.port(), 50051);
        assert_eq!(d.heartbeat_interval, Duration::from_secs(15));
    }

    #[test]
    fn nats_stream_replicas_is_one_by_default_and_between_one_and_five() {
        let serve = |extra: &[&str]| match Cli::try_parse_from([&["ssegate", "serve"], extra].concat()) {
            Ok(Cli { command: Command::Serve(a) }) => Ok(a.nats_stream_replicas),
            Ok(_) => panic!("not serve"),
            Err(e) => Err(e),
        };
        assert_eq!(serve(&[]).unwrap(), 1);
        assert_eq!(serve(&["--nats-stream-replicas", "3"]).unwrap(), 3);
        assert!(serve(&["--nats-stream-replicas", "0"]).is_err());
        assert!(serve(&["--nats-stream-replicas", "6"]).is_err());
    }

    #[test]
    fn publish_needs_exactly_one_target() {
        assert!(Cli::try_parse_from(["ssegate", "publish", "--data", "x"]).is_err());
        assert!(Cli::try_parse_from(["ssegate", "publish", "--data", "x", "--user", "a", "--broadcast"]).is_err());
        assert!(Cli::try_parse_from(["ssegate", "publish", "--data", "x", "--user", "a", "--user", "b"]).is_ok());
    }
}
