//! `ssegate-bench chaos-worker`: one process holding a share of the chaos clients. Each client
//! behaves like a browser tab's `EventSource`: it subscribes to one replica, keeps the last
//! event id (the `ssegate.position` cursor included), and when its stream ends or fails it
//! waits the server's `retry:` time (plus up to 250 ms, as browsers do not all wake in the same
//! millisecond) and reconnects with `Last-Event-ID` to a replica picked at random; a refused connection is
//! tried on the next replica at once (a load balancer's retry of another backend). It also leaves on its own
//! after a random lifetime (a page reload), so resumes happen all the time, not only at faults.
//!
//! A **storm** (the coordinator's `storm` line, sent just before it kills a replica): for a
//! short window, a client whose stream on that replica ends reconnects at once (no `retry:`
//! delay, no jitter, no cap on connections in flight) to one of the other replicas, as every
//! tab of a crashed backend does behind a load balancer; the worker reports how long they
//! took to be back and how their attempts failed, if any.
//!
//! Everything received is logged per client (id, publish number) for the final check
//! against the coordinator's ledger (`check`). Single-threaded (`Rc`, `Cell`), like the bench's
//! own worker.

use std::{
    cell::{Cell, RefCell},
    io::{BufRead, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    rc::Rc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::Semaphore,
    task::LocalSet,
    time::Instant,
};

use super::{
    ChaosWorkerArgs,
    check::{self, ClientLog, Counts, Ledger, Miss, Segment},
    layout::{self, Layout, Pos, Record, Rng},
    sse::{Item, Scanner},
};
use crate::{histogram::Histogram, plan::now_ns, sse as http};

/// Read buffer per open stream (events are small; a replay just takes more reads).
const READ_BUF: usize = 4 * 1024;
/// Longest wait for a connection to open and answer with its response head.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for every client's first stream before reporting `ready` anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Delay before reconnecting until a server has sent a `retry:` (the WHATWG default is
/// implementation-defined; the replicas here send `--retry 1s`).
const DEFAULT_RETRY_MS: u64 = 1000;
/// Notes per client and clients written to the failure file.
const NOTES_PER_CLIENT: usize = 8;
const MAX_FAILED_CLIENTS: usize = 300;

/// Worker → coordinator, once every client had its first stream (or the wait ended).
#[derive(Debug, Serialize, Deserialize)]
pub struct ReadyLine {
    pub connected: u64,
    pub clients: u64,
}

/// Worker → coordinator, every 250 ms.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StatLine {
    pub ns: u64,
    pub connected: u64,
    /// The lowest last event id over all clients (connected or not).
    pub min_id: Pos,
    pub opened: u64,
    pub events: u64,
}

/// Coordinator → worker: publishing is over; `end` is the end barrier's id (the highest
/// acknowledged), and `ends` the highest acknowledged id in each partition's newest stream (one
/// entry without partitions: `end`).
#[derive(Debug, Serialize, Deserialize)]
pub struct EndLine {
    pub end: Pos,
    #[serde(default)]
    pub ends: Vec<Pos>,
    pub ledger: String,
    pub drain_ms: u64,
}

/// Coordinator → worker, just before it kills `replica`: for `window_ms` from now, a client
/// whose stream on it ends reconnects at once to another replica. Answered with `armed`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StormLine {
    pub replica: usize,
    pub window_ms: u64,
}

/// A line from the coordinator.
enum Command {
    Storm(StormLine),
    End(EndLine),
}

/// What a worker saw of a storm: its clients that lost the replica, and how they came back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormOutcome {
    pub replica: usize,
    /// Clients whose stream on the replica ended in the window (each reconnected at once).
    pub clients: u64,
    /// Of those, the ones back: a new stream answered 200 with its cursor.
    pub back: u64,
    /// When the first of those streams ended, and when the last client got its cursor back
    /// (ns since the Unix epoch; 0 if none).
    pub first_end_ns: u64,
    pub last_back_ns: u64,
    /// Their attempts on the surviving replicas until back, and the failed ones by how they
    /// failed (`refused`: nothing listening there).
    pub attempts: u64,
    /// Accepted, then closed (or reset) before any response head: not admitted.
    pub closed_without_response: u64,
    pub refused: u64,
    pub non_200: u64,
    pub timed_out: u64,
    pub other_failures: u64,
    pub first_error: String,
}

impl StormOutcome {
    pub fn failed(&self) -> u64 {
        self.closed_without_response + self.refused + self.non_200 + self.timed_out + self.other_failures
    }

    pub fn add(&mut self, o: &StormOutcome) {
        self.replica = o.replica;
        self.clients += o.clients;
        self.back += o.back;
        // 0 is "none": the earliest of the others.
        if self.first_end_ns == 0 || (o.first_end_ns != 0 && o.first_end_ns < self.first_end_ns) {
            self.first_end_ns = o.first_end_ns;
        }
        self.last_back_ns = self.last_back_ns.max(o.last_back_ns);
        self.attempts += o.attempts;
        self.closed_without_response += o.closed_without_response;
        self.refused += o.refused;
        self.non_200 += o.non_200;
        self.timed_out += o.timed_out;
        self.other_failures += o.other_failures;
        if self.first_error.is_empty() {
            self.first_error.clone_from(&o.first_error);
        }
    }

    fn failure(&mut self, e: &OpenError) {
        match e {
            OpenError::Closed(_) => self.closed_without_response += 1,
            OpenError::Connect(_) => self.refused += 1,
            OpenError::Status(..) => self.non_200 += 1,
            OpenError::Timeout => self.timed_out += 1,
            OpenError::Other(_) => self.other_failures += 1,
        }
        if self.first_error.is_empty() {
            self.first_error = e.to_string();
        }
    }
}

/// Worker → coordinator: the check of its clients.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResultLine {
    pub counts: Counts,
    pub latency: String,
    /// Only events whose publish was acknowledged at the first attempt (no broker outage or
    /// retry in the figure), µs.
    pub latency_first_attempt_us: String,
    pub opened: u64,
    pub failed_attempts: u64,
    pub first_error: String,
    /// Clients whose last id reached the end barrier within the drain.
    pub drained: u64,
    pub heartbeats: u64,
    pub end_reasons: Vec<(String, u64)>,
    #[serde(default)]
    pub storm: Option<StormOutcome>,
}

struct Ctx {
    args: ChaosWorkerArgs,
    layout: Layout,
    replicas: Vec<SocketAddr>,
    permits: Semaphore,
    logs: RefCell<Vec<ClientLog>>,
    /// Per client: its last event id (default: none yet).
    last: Vec<Cell<Pos>>,
    /// The storm in progress: its replica and until when a stream ending on it joins it.
    storm: Cell<Option<(usize, Instant)>>,
    storm_outcome: RefCell<Option<StormOutcome>>,
    /// Per client: when its stream on the storm's replica ended, until it is back (0: not in
    /// the storm).
    storm_since: Vec<Cell<u64>>,
    /// Per client: its first stream got its cursor, or its first attempt failed.
    reported: Vec<Cell<bool>>,
    had_stream: Cell<u64>,
    connected: Cell<u64>,
    opened: Cell<u64>,
    events: Cell<u64>,
    heartbeats: Cell<u64>,
    failed_attempts: Cell<u64>,
    first_error: RefCell<String>,
    latency: RefCell<Histogram>,
    stopping: Cell<bool>,
}

pub fn main(args: ChaosWorkerArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    LocalSet::new().block_on(&rt, run(args))
}

fn say<T: Serialize>(tag: &str, v: &T) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{tag} {}", serde_json::to_string(v).unwrap_or_default());
    let _ = out.flush();
}

async fn run(args: ChaosWorkerArgs) -> Result<(), String> {
    let replicas = args
        .replicas
        .split(',')
        .map(|a| a.parse::<SocketAddr>().map_err(|e| format!("--replicas {a}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if replicas.is_empty() || replicas.iter().any(|a| !a.ip().is_loopback()) {
        return Err("--replicas: loopback addresses only".into());
    }
    let layout = Layout::for_clients(args.clients);
    let count = args.count as usize;
    let ctx = Rc::new(Ctx {
        permits: Semaphore::new(256),
        logs: RefCell::new(vec![ClientLog::default(); count]),
        last: (0..count).map(|_| Cell::new(Pos::default())).collect(),
        storm: Cell::new(None),
        storm_outcome: RefCell::new(None),
        storm_since: (0..count).map(|_| Cell::new(0)).collect(),
        reported: (0..count).map(|_| Cell::new(false)).collect(),
        had_stream: Cell::new(0),
        connected: Cell::new(0),
        opened: Cell::new(0),
        events: Cell::new(0),
        heartbeats: Cell::new(0),
        failed_attempts: Cell::new(0),
        first_error: RefCell::new(String::new()),
        latency: RefCell::new(Histogram::default()),
        stopping: Cell::new(false),
        args,
        layout,
        replicas,
    });
    for local in 0..count {
        tokio::task::spawn_local(client(ctx.clone(), local));
    }
    let ready_by = Instant::now() + READY_TIMEOUT;
    while ctx.had_stream.get() < count as u64 && Instant::now() < ready_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    say("ready", &ReadyLine { connected: ctx.connected.get(), clients: count as u64 });

    let mut commands = read_commands();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let end = loop {
        tokio::select! {
            c = commands.recv() => match c.ok_or("stdin reader vanished")?? {
                Command::End(e) => break e,
                Command::Storm(s) => {
                    ctx.storm.set(Some((s.replica, Instant::now() + Duration::from_millis(s.window_ms))));
                    *ctx.storm_outcome.borrow_mut() = Some(StormOutcome { replica: s.replica, ..Default::default() });
                    say("armed", &s);
                }
            },
            _ = tick.tick() => say("stat", &stat(&ctx)),
        }
    };

    // Drain: until every client's last id reached the barrier, or the deadline.
    let drain_by = Instant::now() + Duration::from_millis(end.drain_ms);
    let ends = if end.ends.is_empty() { vec![end.end] } else { end.ends.clone() };
    while ctx.last.iter().any(|s| !check::reached(s.get(), &ends)) && Instant::now() < drain_by {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tick.tick() => say("stat", &stat(&ctx)),
        }
    }
    say("stat", &stat(&ctx));
    ctx.stopping.set(true);
    let drained = ctx.last.iter().filter(|s| check::reached(s.get(), &ends)).count() as u64;
    let result = finish(&ctx, &end, drained)?;
    say("result", &result);
    // The client tasks are still parked in reads; the process ends here.
    std::process::exit(0);
}

/// Counts a client towards `ready` once.
fn mark_ready(ctx: &Ctx, local: usize) {
    if !ctx.reported[local].replace(true) {
        ctx.had_stream.set(ctx.had_stream.get() + 1);
    }
}

fn stat(ctx: &Ctx) -> StatLine {
    StatLine {
        ns: now_ns(),
        connected: ctx.connected.get(),
        min_id: ctx.last.iter().map(Cell::get).min().unwrap_or_default(),
        opened: ctx.opened.get(),
        events: ctx.events.get(),
    }
}

/// The coordinator's lines on stdin, read on a plain thread until `end`; EOF (the coordinator
/// is gone) or an unreadable line ends the worker.
fn read_commands() -> tokio::sync::mpsc::UnboundedReceiver<Result<Command, String>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = String::new();
            let command = match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => Err("stdin closed before `end`".to_string()),
                Ok(_) => parse_command(line.trim_end()),
            };
            let last = !matches!(command, Ok(Command::Storm(_)));
            if tx.send(command).is_err() || last {
                break;
            }
        }
    });
    rx
}

fn parse_command(line: &str) -> Result<Command, String> {
    let json = |e: serde_json::Error| format!("{e}: {line:?}");
    match line.split_once(' ') {
        Some(("end", j)) => serde_json::from_str(j).map(Command::End).map_err(json),
        Some(("storm", j)) => serde_json::from_str(j).map(Command::Storm).map_err(json),
        _ => Err(format!("expected `end` or `storm`: {line:?}")),
    }
}

fn finish(ctx: &Ctx, end: &EndLine, drained: u64) -> Result<ResultLine, String> {
    let text = std::fs::read_to_string(&end.ledger).map_err(|e| format!("ledger {}: {e}", end.ledger))?;
    let records: Vec<Record> = text.lines().filter_map(Record::decode).collect();
    let ledger = Ledger::build(&ctx.layout, records);
    let mut counts = Counts::default();
    let mut failures = String::new();
    let mut failed_clients = 0;
    let mut reasons: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let logs = ctx.logs.borrow();
    let mut first_attempt = Histogram::default();
    for (local, log) in logs.iter().enumerate() {
        for r in &log.recs {
            if ledger.attempts(r.n) == 1 {
                first_attempt.record(u64::from(r.latency_us));
            }
        }
        let global = ctx.args.first + local as u64;
        let id = ctx.layout.identity(global);
        let ends = if end.ends.is_empty() { std::slice::from_ref(&end.end) } else { end.ends.as_slice() };
        let (c, notes) = check::check(log, &id, &ledger, ends, NOTES_PER_CLIENT);
        counts.add(&c);
        for s in &log.segs {
            *reasons.entry(s.end).or_default() += 1;
        }
        let bad = c.lost + c.duplicated + c.out_of_order + c.misrouted + c.phantom + c.id_mismatch + c.never_connected;
        // Also the clients told `expired`, `unknown` or an unknown reason: with a replay log
        // longer than any absence here, each is suspicious (not so `other_epoch` and
        // `stream_recreated`, which every client gets after the broker lost its store).
        let suspicious = c.missed_expired + c.missed_unknown + c.missed_other;
        if (bad > 0 || suspicious > 0) && failed_clients < MAX_FAILED_CLIENTS {
            failed_clients += 1;
            use std::fmt::Write as _;
            let _ = writeln!(
                failures,
                "client {global} {id:?} lost={} dup={} ooo={} missed={} notes={notes:?}\n  streams: {}",
                c.lost,
                c.duplicated,
                c.out_of_order,
                c.missed(),
                check::describe(log)
            );
        }
    }
    if !failures.is_empty() {
        let _ = std::fs::write(&ctx.args.failures, failures);
    }
    Ok(ResultLine {
        counts,
        latency: ctx.latency.borrow().encode(),
        latency_first_attempt_us: first_attempt.encode(),
        opened: ctx.opened.get(),
        failed_attempts: ctx.failed_attempts.get(),
        first_error: ctx.first_error.borrow().clone(),
        drained,
        heartbeats: ctx.heartbeats.get(),
        end_reasons: reasons.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        storm: ctx.storm_outcome.borrow().clone(),
    })
}

fn source_ip(args: &ChaosWorkerArgs, global: u64) -> IpAddr {
    let base = u32::from(args.source_base);
    IpAddr::V4(Ipv4Addr::from(base + (global % u64::from(args.source_ips.max(1))) as u32))
}

/// How opening a stream failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The connection was refused (nothing listening): a load balancer tries the next backend.
    Connect(String),
    /// Connected, then closed or reset before any response head: the server did not admit it.
    Closed(String),
    /// Answered with another status than 200.
    Status(u16, String),
    Timeout,
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Connect(e) | OpenError::Closed(e) | OpenError::Other(e) => f.write_str(e),
            OpenError::Status(status, text) => write!(f, "HTTP {status} {text}"),
            OpenError::Timeout => f.write_str("no response head within the open timeout"),
        }
    }
}

/// Opens an SSE stream from `source` (resuming from `last_id`), within `OPEN_TIMEOUT`.
pub async fn open(
    addr: SocketAddr,
    source: IpAddr,
    path: &str,
    last_id: Option<&str>,
) -> Result<(TcpStream, http::BodyDecoder, Vec<u8>), OpenError> {
    tokio::time::timeout(OPEN_TIMEOUT, open_once(addr, source, path, last_id)).await.unwrap_or(Err(OpenError::Timeout))
}

async fn open_once(
    addr: SocketAddr,
    source: IpAddr,
    path: &str,
    last_id: Option<&str>,
) -> Result<(TcpStream, http::BodyDecoder, Vec<u8>), OpenError> {
    let socket = TcpSocket::new_v4().map_err(|e| OpenError::Other(e.to_string()))?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| OpenError::Other(format!("bind {source}: {e}")))?;
    let mut stream = socket.connect(addr).await.map_err(|e| OpenError::Connect(format!("connect {addr}: {e}")))?;
    let resume = last_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{resume}\r\n"
    );
    let closed = |what: &str, e: std::io::Error| OpenError::Closed(format!("{addr} {what}: {e}"));
    stream.write_all(request.as_bytes()).await.map_err(|e| closed("write", e))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await.map_err(|e| closed("read", e))? == 0 {
            return Err(OpenError::Closed(format!("{addr} closed before the response head")));
        }
        if let Some(head) = http::parse_head(&buf).map_err(OpenError::Other)? {
            if head.status != 200 {
                let text = String::from_utf8_lossy(&buf[head.len..]);
                return Err(OpenError::Status(head.status, format!("from {addr}: {}", text.trim())));
            }
            return Ok((stream, http::BodyDecoder::new(head.framing), buf.split_off(head.len)));
        }
    }
}

/// One client: streams, one after the other, until the run ends.
async fn client(ctx: Rc<Ctx>, local: usize) {
    let a = &ctx.args;
    let global = a.first + local as u64;
    let mut rng = Rng::new(a.seed ^ layout::mix64(global));
    let path = ctx.layout.path(global);
    let source = source_ip(a, global);
    let n = ctx.replicas.len() as u64;
    let mut replica = (global % n) as usize;
    let mut retry_ms = DEFAULT_RETRY_MS;
    let mut last_id: Option<String> = None;
    let mut first = true;
    let mut refused = 0;
    while !ctx.stopping.get() {
        let opened = {
            // Only the first wave is throttled; reconnections go at once, as browsers do.
            let _permit = if first { ctx.permits.acquire().await.ok() } else { None };
            open(ctx.replicas[replica], source, &path, last_id.as_deref()).await
        };
        // A storm client's attempts on the surviving replicas (a retry that picked the killed
        // one and was refused says nothing about admission).
        let in_storm = ctx.storm_since[local].get() != 0 && ctx.storm.get().is_some_and(|(r, _)| r != replica);
        if in_storm && let Some(s) = ctx.storm_outcome.borrow_mut().as_mut() {
            s.attempts += 1;
            if let Err(e) = &opened {
                s.failure(e);
            }
        }
        let mut storm = false;
        let delay = match opened {
            // A refused connection goes to the next replica at once, as a load balancer
            // retries another backend when one refuses; once all refused, wait as below.
            Err(OpenError::Connect(_)) if refused + 1 < ctx.replicas.len() => {
                ctx.failed_attempts.set(ctx.failed_attempts.get() + 1);
                refused += 1;
                replica = (replica + 1) % ctx.replicas.len();
                continue;
            }
            Err(e) => {
                mark_ready(&ctx, local);
                ctx.failed_attempts.set(ctx.failed_attempts.get() + 1);
                let mut first_error = ctx.first_error.borrow_mut();
                if first_error.is_empty() {
                    *first_error = e.to_string();
                }
                Duration::from_millis(retry_ms) + rng.between_ms(0, 250)
            }
            Ok((stream, body, rest)) => {
                let lifetime = rng.between_ms(a.churn_min_ms, a.churn_max_ms);
                let end =
                    stream_once(&ctx, local, replica, stream, body, rest, lifetime, &mut last_id, &mut retry_ms).await;
                mark_ready(&ctx, local);
                storm = end != "churn" && end != "stopped" && join_storm(&ctx, local, replica);
                if storm {
                    // The storm: every client of the lost replica at once, no delay.
                    Duration::ZERO
                } else if end == "churn" {
                    rng.between_ms(0, 250)
                } else {
                    Duration::from_millis(retry_ms) + rng.between_ms(0, 250)
                }
            }
        };
        first = false;
        refused = 0;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        replica = if storm {
            // Any other replica (the lost one refuses, or is not back yet).
            (replica + 1 + rng.below(n - 1) as usize) % n as usize
        } else {
            rng.below(n) as usize
        };
    }
}

/// Whether the stream that just ended on `replica` is one the storm takes (it is armed for
/// that replica and within its window); if so, the client is counted in it until it is back.
fn join_storm(ctx: &Ctx, local: usize, replica: usize) -> bool {
    let armed = ctx.storm.get().is_some_and(|(r, until)| r == replica && Instant::now() < until);
    if !armed || ctx.replicas.len() < 2 {
        return false;
    }
    let now = now_ns();
    if ctx.storm_since[local].replace(now) == 0
        && let Some(s) = ctx.storm_outcome.borrow_mut().as_mut()
    {
        s.clients += 1;
        if s.first_end_ns == 0 {
            s.first_end_ns = now;
        }
    }
    true
}

/// A client of the storm got its cursor back.
fn storm_back(ctx: &Ctx, local: usize, now: u64) {
    if ctx.storm_since[local].replace(0) != 0
        && let Some(s) = ctx.storm_outcome.borrow_mut().as_mut()
    {
        s.back += 1;
        s.last_back_ns = s.last_back_ns.max(now);
    }
}

/// Reads one stream until it ends; returns why it ended.
#[allow(clippy::too_many_arguments)]
async fn stream_once(
    ctx: &Ctx,
    local: usize,
    replica: usize,
    mut stream: TcpStream,
    mut body: http::BodyDecoder,
    rest: Vec<u8>,
    lifetime: Duration,
    last_id: &mut Option<String>,
    retry_ms: &mut u64,
) -> &'static str {
    let resume = last_id.as_deref().and_then(Pos::parse);
    ctx.opened.set(ctx.opened.get() + 1);
    {
        let mut logs = ctx.logs.borrow_mut();
        let log = &mut logs[local];
        let first_rec = log.recs.len();
        log.segs.push(Segment {
            replica: replica as u8,
            opened_ns: now_ns(),
            closed_ns: 0,
            resume,
            cursor: None,
            first_rec,
            end: "open",
        });
    }
    let mut state = StreamState { scanner: Scanner::default(), counted: false };
    let churn_at = Instant::now() + lifetime;
    let idle = Duration::from_millis(ctx.args.idle_timeout_ms);
    let mut buf = vec![0u8; READ_BUF];
    let mut result = receive(ctx, local, &mut state, &mut body, &rest, last_id, retry_ms);
    drop(rest);
    let end = loop {
        match result {
            Err(_) => break "bad-framing",
            Ok(true) => break "eof",
            Ok(false) => {}
        }
        if ctx.stopping.get() {
            break "stopped";
        }
        let read = tokio::select! {
            r = tokio::time::timeout(idle, stream.read(&mut buf)) => r,
            () = tokio::time::sleep_until(churn_at) => break "churn",
        };
        result = match read {
            Err(_) => break "idle-timeout",
            Ok(Ok(0)) => break "eof",
            Ok(Err(_)) => break "error",
            Ok(Ok(n)) => receive(ctx, local, &mut state, &mut body, &buf[..n], last_id, retry_ms),
        };
    };
    if state.counted {
        ctx.connected.set(ctx.connected.get() - 1);
    }
    if let Some(seg) = ctx.logs.borrow_mut()[local].segs.last_mut() {
        seg.closed_ns = now_ns();
        seg.end = end;
    }
    end
}

struct StreamState {
    scanner: Scanner,
    /// Whether this stream got its cursor (and is counted as connected).
    counted: bool,
}

/// Decodes one read and logs every item; `Ok(true)` once the response body ended.
fn receive(
    ctx: &Ctx,
    local: usize,
    st: &mut StreamState,
    body: &mut http::BodyDecoder,
    bytes: &[u8],
    last_id: &mut Option<String>,
    retry_ms: &mut u64,
) -> Result<bool, String> {
    if bytes.is_empty() {
        return Ok(false);
    }
    let now = now_ns();
    let mut logs = ctx.logs.borrow_mut();
    let log = &mut logs[local];
    let mut counted = st.counted;
    let last = &ctx.last[local];
    let mut on_item = |item: Item<'_>| match item {
        Item::Comment => ctx.heartbeats.set(ctx.heartbeats.get() + 1),
        Item::Retry(ms) => *retry_ms = ms.clamp(100, 30_000),
        // The cursor: `ssegate.position` (a bare `id:` block from a server before it).
        Item::IdOnly { id } | Item::Event { name: b"ssegate.position", id, .. } => {
            let Some(pos) = std::str::from_utf8(id).ok().and_then(Pos::parse) else { return };
            if let Some(seg) = log.segs.last_mut()
                && seg.cursor.is_none()
            {
                seg.cursor = Some(pos);
                if !counted {
                    counted = true;
                    ctx.connected.set(ctx.connected.get() + 1);
                    mark_ready(ctx, local);
                    storm_back(ctx, local, now);
                }
            }
            log.saw_id(pos, false);
            last.set(pos);
        }
        Item::Event { name, data, id } => {
            if name == b"ssegate.missed" {
                // The gap starts at the client's last id: at a stream's start, the
                // Last-Event-ID it sent; mid-stream, the last event it got.
                let from = Some(last.get()).filter(|p| *p != Pos::default());
                log.missed(Miss::from_data(data), from, now);
                return;
            }
            if name.starts_with(b"ssegate.") {
                // The server's other control events (`ssegate.shutdown` ends a drained stream
                // with the reconnect delay, taken above as `Retry`): not published events.
                return;
            }
            let parsed = if name == b"message" { layout::parse_payload(data) } else { None };
            let Some((n, sent)) = parsed else {
                log.foreign += 1;
                return;
            };
            let Some(pos) = std::str::from_utf8(id).ok().and_then(Pos::parse) else {
                log.no_id += 1;
                return;
            };
            let latency = now.saturating_sub(sent);
            if !log.push(pos, n, u32::try_from(latency / 1000).unwrap_or(u32::MAX)) {
                log.foreign += 1;
                return;
            }
            log.saw_id(pos, true);
            last.set(pos);
            ctx.events.set(ctx.events.get() + 1);
            ctx.latency.borrow_mut().record(latency);
        }
    };
    let scanner = &mut st.scanner;
    let done = body.feed(bytes, &mut |b| scanner.feed(b, &mut on_item));
    st.counted = counted;
    if let Ok(id) = std::str::from_utf8(st.scanner.last_id())
        && !id.is_empty()
    {
        *last_id = Some(id.to_string());
    }
    done
}
