//! Command-line arguments, and the checks that keep every run bounded and on loopback.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::plan::{Kind, Layout, Target};

/// Longest publish or hold phase of one run.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Most connections one run may open (about five client processes at this box's fd limit).
pub const MAX_CONNECTIONS: u64 = 100_000;
/// Most connections one worker process holds: under the 20,000-descriptor hard limit.
pub const MAX_PER_WORKER: u64 = 19_000;

#[derive(Parser, Debug)]
#[command(
    name = "ssegate-bench",
    about = "Load generator for ssegate, nginx+Nchan and the baseline: SSE connections, publishes, latency, loss"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one benchmark: open the connections, publish, report a table and a JSON line.
    Run(Box<RunArgs>),
    /// Internal: one client process holding a share of the connections (started by `run`).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// The chaos run: nats-server, three replicas, browser-like clients, faults; checks that
    /// nothing acknowledged is lost or delivered twice (docs/chaos.md).
    Chaos(Box<crate::chaos::ChaosArgs>),
    /// Internal: one client process of the chaos run (started by `chaos`).
    #[command(hide = true)]
    ChaosWorker(crate::chaos::ChaosWorkerArgs),
    /// The broker's own figure: a plain JetStream publisher on a fresh stream, acknowledged
    /// publishes per second (and the broker's CPU per event with --broker-pid).
    RawNats(crate::rawnats::RawNatsArgs),
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 15s, 2m)"))
}

/// How fast to publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// Events per second in total (0: publish nothing, hold the connections idle).
    PerSecond(u32),
    /// As fast as the server accepts them (ingest scenario).
    Max,
}

fn rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    s.parse().map(Rate::PerSecond).map_err(|_| format!("{s:?} is neither a rate per second nor `max`"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// One unary call per event (`Publish`, `PublishGroup`, `PublishTopic`, `Broadcast`).
    Unary,
    /// `PublishStream`, pipelined up to `--window` unanswered requests per stream.
    Stream,
}

/// What the connections subscribe to; shared by `run` and its workers.
#[derive(Args, Debug, Clone)]
pub struct SubscribeArgs {
    /// The server under test.
    #[arg(long, value_enum, default_value = "ssegate")]
    pub target: Target,

    /// Its HTTP (SSE) address; loopback only.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Distinct users; connection i is user i % users (default: one per connection).
    #[arg(long)]
    pub users: Option<u32>,

    /// The number in the first user's name: users are `u<first-user>`, `u<first-user + 1>`...
    /// (several load generators against one cluster, each with its own users).
    #[arg(long, default_value_t = 0)]
    pub first_user: u32,

    /// Groups; connection i joins group i % groups.
    #[arg(long, default_value_t = 0)]
    pub groups: u32,

    /// Topics; connection i follows topic i % topics.
    #[arg(long, default_value_t = 0)]
    pub topics: u32,

    /// First client source address; connections are spread over `--source-ips` consecutive ones.
    #[arg(long, default_value = "127.0.0.10")]
    pub source_base: Ipv4Addr,

    /// How many source addresses (each can hold ~28k connections to one server port).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=200))]
    pub source_ips: u8,

    /// Connection attempts in flight at once per worker (connect, request, response head);
    /// 0: no cap, all at once: every connection's connect and request go out without waiting
    /// for any other, as browsers reconnect after a backend died (a reconnect storm). The
    /// report says how many were answered 200 and how the others failed; `run` exits non-zero
    /// unless all were.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub connect_concurrency: u32,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub sub: SubscribeArgs,

    /// A name for this run in the report (letters, digits, `-`, `_`, `.`).
    #[arg(long, default_value = "run")]
    pub label: String,

    /// SSE connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,

    /// ssegate's gRPC address; loopback only.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Nchan's or the baseline's HTTP publish address (default: --http-addr).
    #[arg(long)]
    pub pub_addr: Option<SocketAddr>,

    /// What to publish to, comma-separated: user, group, topic, broadcast.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub to: Vec<Kind>,

    /// Publishes per second in total, or `max`; 0 holds the connections idle.
    #[arg(long, default_value = "0", value_parser = rate)]
    pub rate: Rate,

    /// ssegate only: unary calls or `PublishStream`.
    #[arg(long, value_enum, default_value = "unary")]
    pub api: Api,

    /// Publisher tasks (each owns a disjoint share of the streams, keeping each in order).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,

    /// `PublishStream` only: most unanswered requests per stream.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub window: u32,

    /// How long to publish (or to hold the connections when idle).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub duration: Duration,

    /// Stop publishing after this many events even if time remains.
    #[arg(long, default_value_t = 100_000_000)]
    pub max_events: u64,

    /// After publishing, how long to wait for the last events to arrive.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub drain: Duration,

    /// Pad each event's data to this many bytes.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65_536))]
    pub payload_bytes: u32,

    /// The server's process id: its RSS and CPU (with its children's, e.g. nginx workers).
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Connections per client process (each stays under the 20,000-descriptor limit).
    #[arg(long, default_value_t = 9_500)]
    pub conns_per_worker: u64,

    /// Longest wait for every connection to open.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub connect_timeout: Duration,

    /// Pause after the connections are open, before measuring and publishing.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub settle: Duration,

    /// Print only the JSON line.
    #[arg(long)]
    pub json_only: bool,
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub sub: SubscribeArgs,
    /// Index of this worker's first connection.
    #[arg(long)]
    pub first: u64,
    /// Connections this worker opens.
    #[arg(long)]
    pub count: u64,
}

fn loopback(what: &str, ip: IpAddr) -> Result<(), String> {
    if ip.is_loopback() {
        Ok(())
    } else {
        Err(format!("{what} {ip} is not a loopback address: this tool only loads this machine"))
    }
}

impl SubscribeArgs {
    pub fn layout(&self, connections: u64) -> Layout {
        let users = self.users.unwrap_or(connections.clamp(1, u64::from(u32::MAX)) as u32);
        Layout { target: self.target, users, groups: self.groups, topics: self.topics, first_user: self.first_user }
    }

    pub fn validate(&self) -> Result<(), String> {
        loopback("--http-addr", self.http_addr.ip())?;
        loopback("--source-base", self.source_base.into())?;
        let last = u32::from(self.source_base).checked_add(u32::from(self.source_ips) - 1);
        if last.is_none_or(|l| !Ipv4Addr::from(l).is_loopback()) {
            return Err("--source-base plus --source-ips runs out of 127.0.0.0/8".into());
        }
        if self.users == Some(0) {
            return Err("--users must be at least 1".into());
        }
        Ok(())
    }
}

impl RunArgs {
    pub fn pub_addr(&self) -> SocketAddr {
        self.pub_addr.unwrap_or(self.sub.http_addr)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.sub.validate()?;
        loopback("--grpc-addr", self.grpc_addr.ip())?;
        loopback("--pub-addr", self.pub_addr().ip())?;
        if self.label.is_empty() || !self.label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(format!("--label {:?}: use letters, digits, `-`, `_` and `.`", self.label));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!("--connections must be 1..={MAX_CONNECTIONS}"));
        }
        if !(1..=MAX_PER_WORKER).contains(&self.conns_per_worker) {
            return Err(format!("--conns-per-worker must be 1..={MAX_PER_WORKER} (20,000 descriptors per process)"));
        }
        if self.duration > MAX_DURATION || self.drain > MAX_DURATION || self.duration.is_zero() {
            return Err(format!("--duration must be positive, and it and --drain at most {MAX_DURATION:?}"));
        }
        let layout = self.sub.layout(self.connections);
        for kind in &self.to {
            if !layout.supports(*kind) {
                return Err(format!(
                    "--to {kind:?}: {} has channels only (use user or topic)",
                    self.sub.target.as_str()
                ));
            }
            let empty = layout.streams_of(*kind).is_empty();
            if empty {
                return Err(format!("--to {kind:?} needs at least one (set --groups/--topics)"));
            }
        }
        if self.rate != Rate::PerSecond(0) && self.to.is_empty() {
            return Err("--rate needs --to (what to publish to)".into());
        }
        if self.sub.target != Target::Ssegate && self.api == Api::Stream {
            return Err("--api stream is ssegate's PublishStream".into());
        }
        Ok(())
    }

    /// How the connections split over worker processes: `(first, count)` each.
    pub fn shares(&self) -> Vec<(u64, u64)> {
        let workers = self.connections.div_ceil(self.conns_per_worker);
        let base = self.connections / workers;
        let extra = self.connections % workers;
        let mut first = 0;
        (0..workers)
            .map(|w| {
                let count = base + u64::from(w < extra);
                let share = (first, count);
                first += count;
                share
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &str) -> Result<RunArgs, String> {
        let argv = std::iter::once("ssegate-bench").chain("run".split(' ')).chain(args.split_whitespace());
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command {
            Command::Run(r) => r.validate().map(|()| *r),
            _ => Err("not run".into()),
        }
    }

    #[test]
    fn fan_out_command_line() {
        let r = run("--target ssegate --connections 10000 --topics 1 --to topic --rate 1000 --duration 30s").unwrap();
        assert_eq!((r.connections, r.rate, r.to.as_slice()), (10_000, Rate::PerSecond(1000), &[Kind::Topic][..]));
        assert_eq!(r.duration, Duration::from_secs(30));
        assert_eq!(
            r.sub.layout(r.connections),
            Layout { target: Target::Ssegate, users: 10_000, groups: 0, topics: 1, first_user: 0 }
        );
        assert_eq!(r.pub_addr(), r.sub.http_addr);
    }

    #[test]
    fn rates_and_kinds() {
        assert_eq!(run("--rate max --to user,broadcast --api stream").unwrap().rate, Rate::Max);
        assert_eq!(run("").unwrap().rate, Rate::PerSecond(0));
        assert!(run("--rate fast --to user").is_err());
        assert!(run("--rate 10").unwrap_err().contains("--to"));
        assert!(run("--to group --rate 1").unwrap_err().contains("--groups"));
        assert!(run("--target nchan --to broadcast --rate 1").unwrap_err().contains("channels only"));
        assert!(run("--target baseline --api stream").is_err());
    }

    #[test]
    fn refuses_anything_but_loopback() {
        assert!(run("--http-addr 10.0.0.1:80").unwrap_err().contains("loopback"));
        assert!(run("--grpc-addr 192.168.1.2:50051").unwrap_err().contains("loopback"));
        assert!(run("--target nchan --pub-addr 8.8.8.8:80").unwrap_err().contains("loopback"));
        assert!(run("--source-base 10.1.1.1").is_err());
        assert!(run("--source-base 127.255.255.250 --source-ips 10").is_err());
        assert!(run("--http-addr [::1]:8080").is_ok());
    }

    #[test]
    fn connect_concurrency_zero_is_all_at_once() {
        assert_eq!(run("").unwrap().sub.connect_concurrency, 256);
        assert_eq!(run("--connect-concurrency 0").unwrap().sub.connect_concurrency, 0);
        assert!(run("--connect-concurrency 4097").is_err());
    }

    #[test]
    fn runs_are_bounded() {
        assert!(run("--duration 11m").is_err());
        assert!(run("--connections 0").is_err());
        assert!(run("--connections 100001").is_err());
        assert!(run("--conns-per-worker 20000").is_err());
        assert!(run("--label a/b").is_err());
    }

    #[test]
    fn connections_split_evenly_over_workers() {
        let r = run("--connections 19000 --conns-per-worker 9500").unwrap();
        assert_eq!(r.shares(), [(0, 9500), (9500, 9500)]);
        let r = run("--connections 10001 --conns-per-worker 5000").unwrap();
        assert_eq!(r.shares(), [(0, 3334), (3334, 3334), (6668, 3333)]);
        assert_eq!(run("--connections 5").unwrap().shares(), [(0, 5)]);
    }
}
