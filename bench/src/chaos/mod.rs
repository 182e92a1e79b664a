//! `ssegate-bench chaos`: a real `nats-server -js`, three ssegate replicas, thousands of SSE
//! clients that reconnect like browsers, a mixed publish load with idempotency keys and
//! retries, and faults injected on a schedule; at the end every client's history is checked
//! against the ledger of acknowledged publishes. See `docs/chaos.md`.
//!
//! - `mod.rs`: flags, profiles, the coordinator's main flow.
//! - `faults`: the schedule and each fault (signals, restarts, floods).
//! - `procs`: the child processes and their ports, readiness, signals.
//! - `publisher`: paced publishes with retries; the ledger.
//! - `client`: the worker processes' browser-like clients.
//! - `check`: the per-client verdict; `layout`: identities, targets, payloads.
//! - `sse`: an event-stream scanner that keeps ids and names; `floods`: hostile sockets.
//! - `probe`: after the broker lost its store, a publish acknowledged and delivered on every
//!   replica.
//! - `report`: recovery times, the summary and the JSON line.

mod check;
mod client;
mod faults;
mod floods;
mod layout;
mod probe;
mod procs;
mod publisher;
mod report;
mod sse;

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use clap::Args;

use self::{
    client::{EndLine, ReadyLine, ResultLine, StatLine, StormLine},
    faults::{Cluster, Schedule},
    layout::{Layout, Pos, Record, Target},
    procs::{Ports, Proc},
};
use crate::plan::now_ns;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 15s, 2m)"))
}

#[derive(Args, Debug, Clone)]
pub struct ChaosArgs {
    /// The CI version: 600 connections, about a minute of publishing, every fault.
    #[arg(long)]
    pub short: bool,
    /// SSE clients (default 15000; 600 with --short).
    #[arg(long)]
    pub connections: Option<u64>,
    /// Publish for at least this long (default 240s; 60s with --short); longer if the faults
    /// take longer.
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// Publishes per second (default 200; 50 with --short).
    #[arg(long)]
    pub rate: Option<u32>,
    /// The ssegate binary (default: `ssegate` next to this executable).
    #[arg(long, env = "SSEGATE_BIN")]
    pub ssegate_bin: Option<PathBuf>,
    /// The nats-server binary (default: /usr/sbin/nats-server or similar).
    #[arg(long)]
    pub nats_bin: Option<PathBuf>,
    /// Where logs, the ledger, failures and the report go (default target/chaos/<profile>-<time>).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Clients per worker process (each under the 20,000-descriptor limit).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=15_000))]
    pub conns_per_worker: u64,
    /// Silent sockets in the flood (default 3000; 200 with --short).
    #[arg(long)]
    pub silent_sockets: Option<u64>,
    /// Stalled HTTP/2 streams (default 100; 10 with --short).
    #[arg(long)]
    pub stalled_h2: Option<u64>,
    /// Only these faults, one after the other, each a gap after the previous (offsets ignored),
    /// comma-separated; for a targeted run, e.g. a bigger storm: `--short --connections 6600
    /// --faults storm --duration 20s`. Default: all, on the profile's schedule.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<faults::FaultKind>,
    /// Per mille of publishes sent over `PublishStream` (the rest are unary calls).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub stream_per_mille: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ChaosWorkerArgs {
    /// Total clients (the layout depends on it).
    #[arg(long)]
    pub clients: u64,
    #[arg(long)]
    pub first: u64,
    #[arg(long)]
    pub count: u64,
    /// The replicas' HTTP addresses, comma-separated.
    #[arg(long)]
    pub replicas: String,
    #[arg(long, default_value = "127.0.0.10")]
    pub source_base: Ipv4Addr,
    #[arg(long, default_value_t = 8)]
    pub source_ips: u8,
    #[arg(long)]
    pub churn_min_ms: u64,
    #[arg(long)]
    pub churn_max_ms: u64,
    /// A stream silent this long (no event, no heartbeat) is treated as dead.
    #[arg(long, default_value_t = 20_000)]
    pub idle_timeout_ms: u64,
    /// Where to write the failing clients' histories.
    #[arg(long)]
    pub failures: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The sizes and timings of a run.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: &'static str,
    pub connections: u64,
    pub duration: Duration,
    pub rate: u32,
    pub churn_ms: (u64, u64),
    pub schedule: Schedule,
    pub silent: u64,
    pub stalled: u64,
    pub drain: Duration,
    /// Every client of the storm's replica must be reconnected (a new stream with its cursor)
    /// within this long of the kill.
    pub storm_bound: Duration,
}

impl Profile {
    fn from_args(a: &ChaosArgs) -> Profile {
        let s = |secs: u64| Duration::from_secs(secs);
        let mut p = if a.short {
            Profile {
                name: "short",
                connections: 600,
                duration: s(60),
                rate: 50,
                churn_ms: (10_000, 30_000),
                schedule: Schedule {
                    only: Vec::new(),
                    kill_at: s(6),
                    kill_down: s(2),
                    stop_at: s(13),
                    stop_for: s(5),
                    broker_restart_at: s(24),
                    rolling_at: s(32),
                    flood_at: s(46),
                    flood_hold: s(8),
                    storm_at: s(57),
                    storm_down: s(2),
                    volume_loss_at: s(63),
                    gap: s(3),
                },
                silent: 200,
                stalled: 10,
                drain: s(30),
                storm_bound: s(5),
            }
        } else {
            Profile {
                name: "full",
                connections: 15_000,
                duration: s(240),
                rate: 200,
                churn_ms: (30_000, 120_000),
                schedule: Schedule {
                    only: Vec::new(),
                    kill_at: s(25),
                    kill_down: s(5),
                    stop_at: s(60),
                    stop_for: s(10),
                    broker_restart_at: s(95),
                    rolling_at: s(130),
                    flood_at: s(180),
                    flood_hold: s(25),
                    storm_at: s(212),
                    storm_down: s(5),
                    volume_loss_at: s(225),
                    gap: s(5),
                },
                silent: 3000,
                stalled: 100,
                drain: s(60),
                storm_bound: s(5),
            }
        };
        p.connections = a.connections.unwrap_or(p.connections);
        p.duration = a.duration.unwrap_or(p.duration);
        p.rate = a.rate.unwrap_or(p.rate);
        p.silent = a.silent_sockets.unwrap_or(p.silent);
        p.stalled = a.stalled_h2.unwrap_or(p.stalled);
        p.schedule.only.clone_from(&a.faults);
        p
    }
}

/// A line from a worker.
enum Line {
    Ready(ReadyLine),
    Stat(StatLine),
    Result(Box<ResultLine>),
    /// A worker armed a storm.
    Armed,
    Other(String),
}

fn parse_line(line: &str) -> Line {
    let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
    let parsed = match tag {
        "ready" => serde_json::from_str(rest).ok().map(Line::Ready),
        "stat" => serde_json::from_str(rest).ok().map(Line::Stat),
        "result" => serde_json::from_str(rest).ok().map(|r| Line::Result(Box::new(r))),
        "armed" => serde_json::from_str::<StormLine>(rest).ok().map(|_| Line::Armed),
        _ => None,
    };
    parsed.unwrap_or_else(|| Line::Other(line.to_string()))
}

/// The coordinator's lines to the workers (their stdin), shared by the main thread (`end`)
/// and the fault thread (`storm`), and the count of `armed` answers.
#[derive(Default)]
pub struct Link {
    stdins: Mutex<Vec<ChildStdin>>,
    armed: AtomicU64,
}

impl Link {
    /// Sends one line to every worker.
    pub fn send(&self, line: &str) -> Result<(), String> {
        let mut stdins = self.stdins.lock().unwrap_or_else(|e| e.into_inner());
        for stdin in stdins.iter_mut() {
            writeln!(stdin, "{line}")
                .and_then(|()| stdin.flush())
                .map_err(|e| format!("cannot reach a worker: {e}"))?;
        }
        Ok(())
    }

    pub fn workers(&self) -> u64 {
        self.stdins.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    /// `armed` answers so far (one per worker per storm).
    pub fn armed(&self) -> u64 {
        self.armed.load(Ordering::Acquire)
    }

    /// Closes every worker's stdin (a worker that did not get `end` then exits).
    fn close(&self) {
        self.stdins.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Kills the workers on every exit path.
struct Workers {
    children: Vec<std::process::Child>,
    link: Arc<Link>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.link.close();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn default_ssegate_bin() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let p = me.with_file_name("ssegate");
    p.exists().then_some(p)
}

pub fn main(args: ChaosArgs) -> Result<(), String> {
    let profile = Profile::from_args(&args);
    if profile.connections == 0 || profile.connections > 30_000 || profile.rate == 0 || profile.rate > 5000 {
        return Err("--connections must be 1..=30000 and --rate 1..=5000".into());
    }
    if profile.duration > Duration::from_secs(900) {
        return Err("--duration is at most 15m".into());
    }
    let ssegate =
        args.ssegate_bin.clone().or_else(default_ssegate_bin).ok_or("no ssegate binary: pass --ssegate-bin")?;
    let nats = args.nats_bin.clone().or_else(procs::find_nats).ok_or("nats-server is not installed")?;
    let out = args
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("target/chaos/{}-{}", profile.name, now_ns() / 1_000_000_000)));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let result = run(&args, &profile, &ssegate, &nats, &out, &mut outcome);
    if let Err(e) = &result {
        outcome.problems.push(format!("the run could not complete: {e}"));
    }
    outcome.wall_s = started.elapsed().as_secs_f64();
    let report = report::Report::new(&profile, &outcome);
    let human = report.human(&out);
    eprint!("{human}");
    let json = report.json();
    println!("{json}");
    let _ = std::fs::write(out.join("summary.txt"), &human);
    let _ = std::fs::write(out.join("result.json"), format!("{json}\n"));
    if report.passed() { Ok(()) } else { Err("chaos run failed (see the summary above)".into()) }
}

/// Everything the report needs.
#[derive(Default)]
pub struct Outcome {
    pub ready_connected: u64,
    pub timeline: Vec<(usize, StatLine)>,
    pub workers: usize,
    pub results: Vec<ResultLine>,
    pub ledger: Vec<Record>,
    pub end: Pos,
    pub publish: publisher::Stats,
    pub faults: Vec<faults::Fault>,
    pub silent: Option<floods::SilentOutcome>,
    pub stalled: Option<floods::StallOutcome>,
    pub problems: Vec<String>,
    pub publish_s: f64,
    pub wall_s: f64,
}

fn run(
    args: &ChaosArgs,
    profile: &Profile,
    ssegate: &Path,
    nats_bin: &Path,
    out: &Path,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let _ = std::fs::remove_file(out.join("pids"));
    let nats_port = procs::free_port()?;
    let store = out.join("nats-store");
    let _ = std::fs::remove_dir_all(&store);
    let nats = Proc::new("nats", nats_bin, procs::nats_args(nats_port, &store), out);
    let mut ports = Vec::new();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let p = Ports::pick()?;
        replicas.push(
            Proc::new(&format!("replica-{i}"), ssegate, procs::replica_args(&p, nats_port), out)
                .env("RUST_LOG", "warn,ssegate::backplane=info,ssegate::startup=info"),
        );
        ports.push(p);
    }
    let mut cluster = Cluster { nats, nats_port, store, replicas, ports: ports.clone() };
    cluster.nats.start()?;
    procs::wait_port(SocketAddr::from(([127, 0, 0, 1], nats_port)), Duration::from_secs(30))?;
    for i in 0..3 {
        cluster.replicas[i].start()?;
    }
    for p in &ports {
        procs::wait_ready(p.admin, Duration::from_secs(120))?;
    }

    // The client workers.
    let layout = Layout::for_clients(profile.connections);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let http: Vec<String> = ports.iter().map(|p| p.http.to_string()).collect();
    let (tx, lines) = mpsc::channel::<(usize, String)>();
    let link = Arc::new(Link::default());
    let mut workers = Workers { children: Vec::new(), link: link.clone() };
    let n_workers = profile.connections.div_ceil(args.conns_per_worker);
    for w in 0..n_workers {
        let first = w * profile.connections / n_workers;
        let count = (w + 1) * profile.connections / n_workers - first;
        let mut child = Command::new(&exe)
            .args([
                "chaos-worker",
                "--clients",
                &profile.connections.to_string(),
                "--first",
                &first.to_string(),
                "--count",
                &count.to_string(),
                "--replicas",
                &http.join(","),
                "--source-base",
                &format!("127.0.{}.10", 10 + w),
                "--churn-min-ms",
                &profile.churn_ms.0.to_string(),
                "--churn-max-ms",
                &profile.churn_ms.1.to_string(),
                "--failures",
                &out.join(format!("worker-{w}-failures.txt")).display().to_string(),
                "--seed",
                &args.seed.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))?;
        procs::record_pid(&out.join("pids"), child.id());
        let stdout = child.stdout.take().ok_or("worker without stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((w as usize, line)).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().ok_or("worker without stdin")?;
        link.stdins.lock().unwrap_or_else(|e| e.into_inner()).push(stdin);
        workers.children.push(child);
    }
    drop(tx);
    outcome.workers = workers.children.len();
    let mut ready = 0;
    let ready_by = Instant::now() + Duration::from_secs(180);
    while ready < workers.children.len() {
        let left = ready_by.checked_duration_since(Instant::now()).ok_or("workers not ready within 180 s")?;
        let (w, line) = lines.recv_timeout(left).map_err(|_| "workers not ready within 180 s (or one died)")?;
        match parse_line(&line) {
            Line::Ready(r) => {
                ready += 1;
                outcome.ready_connected += r.connected;
            }
            Line::Stat(s) => outcome.timeline.push((w, s)),
            _ => eprintln!("worker {w}: {line}"),
        }
    }
    if outcome.ready_connected < profile.connections {
        outcome
            .problems
            .push(format!("only {} of {} clients connected at start", outcome.ready_connected, profile.connections));
    }

    // Publish and inject the faults.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let grpc: Vec<SocketAddr> = ports.iter().map(|p| p.grpc).collect();
    let shared = {
        let _guard = rt.enter();
        publisher::Shared::new(&grpc)?
    };
    let stop = Arc::new(AtomicBool::new(false));
    let plan = publisher::Plan {
        layout,
        rate: profile.rate,
        broadcast_every: u64::from(profile.rate / 2).max(1),
        stream_per_mille: args.stream_per_mille,
        stream_tasks: if args.stream_per_mille > 0 { 2 } else { 0 },
        seed: args.seed,
    };
    let t0 = Instant::now();
    let publishing = rt.spawn(publisher::run(shared.clone(), plan, stop.clone()));
    let fault_thread = {
        let schedule = profile.schedule.clone();
        let env = faults::Env {
            rt: rt.handle().clone(),
            shared: shared.clone(),
            link: link.clone(),
            silent: profile.silent,
            stalled: profile.stalled,
        };
        std::thread::spawn(move || {
            let report = faults::run(&mut cluster, &schedule, t0, &env);
            (cluster, report)
        })
    };
    let mut fault_thread = Some(fault_thread);
    let mut cluster: Option<Cluster> = None;
    let hard_deadline = t0 + profile.duration + Duration::from_secs(600);
    let mut faults_done_at: Option<Instant> = None;
    while !publishing.is_finished() {
        if Instant::now() > hard_deadline {
            stop.store(true, Ordering::Relaxed);
            return Err("the run did not end within its hard deadline".into());
        }
        if let Some(t) = fault_thread.take_if(|t| t.is_finished()) {
            let (c, report) = t.join().map_err(|_| "the fault thread panicked")?;
            cluster = Some(c);
            outcome.faults = report.faults;
            outcome.silent = report.silent;
            outcome.stalled = report.stalled;
            outcome.problems.extend(report.problems);
            faults_done_at = Some(Instant::now());
        }
        // Publishing lasts the profile's duration, and at least 8 s past the last fault.
        let publish_until = faults_done_at.map(|d| (t0 + profile.duration).max(d + Duration::from_secs(8)));
        if publish_until.is_some_and(|u| Instant::now() >= u) && !stop.swap(true, Ordering::Relaxed) {
            outcome.publish_s = t0.elapsed().as_secs_f64();
        }
        drain_lines(&lines, outcome, &link, Duration::from_millis(100));
    }
    let mut cluster = cluster.ok_or("publishing ended before the faults did")?;

    // The end barrier: one more broadcast, acknowledged, every client must reach it.
    let barrier_n = shared.records().len() as u64 + 1;
    let sent_ns = now_ns();
    shared.records().push(Record {
        n: barrier_n,
        target: Target::Broadcast,
        id: None,
        others: Vec::new(),
        attempts: 0,
        sent_ns,
        acked_ns: 0,
    });
    let barrier = rt.block_on(publisher::publish_unary(
        &shared,
        barrier_n,
        &Target::Broadcast,
        &layout::payload(barrier_n, sent_ns),
        0,
    ));
    if barrier.is_none() {
        outcome.problems.push("the end barrier was not acknowledged".into());
    }
    outcome.ledger = shared.records().clone();
    outcome.publish = std::mem::take(&mut *shared.stats.lock().unwrap_or_else(|e| e.into_inner()));
    outcome.end = outcome.ledger.iter().filter_map(|r| r.id).max().unwrap_or_default();
    // With partitions, each partition's newest stream has its own end: the highest acknowledged
    // id of the epoch of each of the barrier's ids (one per partition, as it went to everyone).
    let ends: Vec<Pos> = barrier
        .unwrap_or_default()
        .iter()
        .map(|b| outcome.ledger.iter().flat_map(Record::ids).filter(|p| p.epoch == b.epoch).max().unwrap_or(*b))
        .collect();
    let ledger_path = out.join("ledger.txt");
    let text: String = outcome.ledger.iter().map(|r| r.encode() + "\n").collect();
    std::fs::write(&ledger_path, text).map_err(|e| format!("{}: {e}", ledger_path.display()))?;

    let end = EndLine {
        end: outcome.end,
        ends,
        ledger: ledger_path.display().to_string(),
        drain_ms: profile.drain.as_millis() as u64,
    };
    link.send(&format!("end {}", serde_json::to_string(&end).map_err(|e| e.to_string())?))?;
    let results_by = Instant::now() + profile.drain + Duration::from_secs(120);
    while outcome.results.len() < workers.children.len() {
        let Some(left) = results_by.checked_duration_since(Instant::now()) else {
            outcome.problems.push("some workers sent no result".into());
            break;
        };
        match lines.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok((w, line)) => handle_line(w, &line, outcome, &link),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                outcome.problems.push("workers ended without a result".into());
                break;
            }
        }
    }
    drop(workers);

    // Stop the cluster; a replica that had crashed, or does not exit cleanly, is a finding.
    for r in &mut cluster.replicas {
        if let Some(status) = r.exited() {
            outcome.problems.push(format!("{} had exited on its own: {status}", r.name));
            continue;
        }
        let (status, killed) = r.stop(Duration::from_secs(15));
        if killed {
            outcome.problems.push(format!("{} did not exit within 15 s of SIGTERM at the end", r.name));
        } else if let Some(s) = status.filter(|s| !s.success()) {
            outcome.problems.push(format!("{} exited with {s} at the end", r.name));
        }
    }
    cluster.nats.stop(Duration::from_secs(15));
    Ok(())
}

fn handle_line(w: usize, line: &str, outcome: &mut Outcome, link: &Link) {
    match parse_line(line) {
        Line::Stat(s) => outcome.timeline.push((w, s)),
        Line::Result(r) => outcome.results.push(*r),
        Line::Armed => _ = link.armed.fetch_add(1, Ordering::AcqRel),
        Line::Ready(_) => {}
        Line::Other(l) => eprintln!("worker {w}: {l}"),
    }
}

fn drain_lines(lines: &mpsc::Receiver<(usize, String)>, outcome: &mut Outcome, link: &Link, wait: Duration) {
    match lines.recv_timeout(wait) {
        Ok((w, line)) => {
            handle_line(w, &line, outcome, link);
            while let Ok((w, line)) = lines.try_recv() {
                handle_line(w, &line, outcome, link);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {}
        // Every worker is gone (noticed again at the end): do not spin.
        Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
    }
}

/// `ssegate-bench chaos-worker`.
pub fn worker_main(args: ChaosWorkerArgs) -> Result<(), String> {
    client::main(args)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Profile, faults::FaultKind};
    use crate::args::{Cli, Command};

    fn profile(args: &str) -> Result<Profile, String> {
        let argv = ["ssegate-bench", "chaos"].into_iter().chain(args.split_whitespace());
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command {
            Command::Chaos(a) => Ok(Profile::from_args(&a)),
            _ => Err("not chaos".into()),
        }
    }

    #[test]
    fn every_fault_runs_by_default_the_two_new_ones_last() {
        for p in [profile("--short").unwrap(), profile("").unwrap()] {
            let s = &p.schedule;
            assert!(s.only.is_empty());
            assert!(s.storm_at >= s.flood_at + s.flood_hold + s.gap, "{s:?}");
            assert!(s.volume_loss_at >= s.storm_at + s.storm_down + s.gap, "{s:?}");
        }
    }

    #[test]
    fn a_run_can_select_faults() {
        let p = profile("--short --faults storm,volume-loss --connections 6600").unwrap();
        assert_eq!((p.schedule.only.as_slice(), p.connections), (&[FaultKind::Storm, FaultKind::VolumeLoss][..], 6600));
        assert!(profile("--faults nope").is_err());
    }
}
