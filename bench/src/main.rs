//! `ssegate-bench`: the load generator. Opens SSE connections to ssegate, nginx+Nchan or the
//! baseline over loopback, publishes at a target rate, and reports connections, deliveries/s,
//! publish→receive latency, loss and duplicates, and the server's memory and CPU.
//!
//! # Layout
//! - `args`: flags and the bounds every run must respect (loopback only, bounded time/count).
//! - `plan`: which connection follows which stream; the event payload (stream, seq, send time).
//! - `run`: the coordinator: spawns `worker` processes, samples the server, publishes, reports.
//! - `worker`: one client process holding up to ~19k connections (the fd limit) on one thread.
//! - `publish`, `httppub`: gRPC (unary / `PublishStream`) and HTTP POST publishers.
//! - `rawnats`: `raw-nats`, a plain JetStream publisher: the broker's own ingest figure.
//! - `sse`: HTTP response head, chunked decoding, a lean SSE scanner.
//! - `seqcheck`, `histogram`: loss/duplicate accounting and latency percentiles.
//! - `procstat`, `report`, `wire`: `/proc` readings, the output, the worker line protocol.
//! - `chaos`: the chaos run (replicas, broker, faults, browser-like clients; docs/chaos.md).

mod args;
mod chaos;
mod histogram;
mod httppub;
mod plan;
mod procstat;
mod publish;
mod rawnats;
mod report;
mod run;
mod seqcheck;
mod sse;
mod wire;
mod worker;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    let result = match cli.command {
        args::Command::Run(a) => run::main(*a),
        args::Command::Worker(a) => worker::main(a),
        args::Command::Chaos(a) => chaos::main(*a),
        args::Command::ChaosWorker(a) => chaos::worker_main(a),
        args::Command::RawNats(a) => rawnats::run(a),
    };
    if let Err(e) = result {
        eprintln!("ssegate-bench: {e}");
        std::process::exit(1);
    }
}
