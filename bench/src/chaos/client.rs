//! `ssegate-bench chaos-worker`: one process holding a share of the chaos clients. Each client
//! behaves like a browser tab's `EventSource`: it subscribes to one replica, keeps the last
//! event id (cursor lines included), and when its stream ends or fails it waits the server's
//! `retry:` time (plus up to 250 ms, as browsers do not all wake in the same millisecond) and
//! reconnects with `Last-Event-ID` to a replica picked at random; a refused connection is
//! tried on the next replica at once (a load balancer's retry of another backend). It also leaves on its own
//! after a random lifetime (a page reload), so resumes happen all the time, not only at faults.
//!
//! Everything received is logged per client (sequence, publish number) for the final check
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
    check::{self, ClientLog, Counts, Ledger, Miss, Rec, Segment},
    layout::{self, Layout, Record, Rng},
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
    /// The lowest last-event-id sequence over all clients (connected or not).
    pub min_seq: u64,
    pub opened: u64,
    pub events: u64,
}

/// Coordinator → worker: publishing is over; `seq` is the end barrier.
#[derive(Debug, Serialize, Deserialize)]
pub struct EndLine {
    pub seq: u64,
    pub ledger: String,
    pub drain_ms: u64,
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
}

struct Ctx {
    args: ChaosWorkerArgs,
    layout: Layout,
    replicas: Vec<SocketAddr>,
    permits: Semaphore,
    logs: RefCell<Vec<ClientLog>>,
    last_seq: Vec<Cell<u64>>,
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
        last_seq: (0..count).map(|_| Cell::new(0)).collect(),
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

    let mut end = Box::pin(read_end());
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let end = loop {
        tokio::select! {
            e = &mut end => break e?,
            _ = tick.tick() => say("stat", &stat(&ctx)),
        }
    };

    // Drain: until every client's last id reached the barrier, or the deadline.
    let drain_by = Instant::now() + Duration::from_millis(end.drain_ms);
    while ctx.last_seq.iter().any(|s| s.get() < end.seq) && Instant::now() < drain_by {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tick.tick() => say("stat", &stat(&ctx)),
        }
    }
    say("stat", &stat(&ctx));
    ctx.stopping.set(true);
    let drained = ctx.last_seq.iter().filter(|s| s.get() >= end.seq).count() as u64;
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
        min_seq: ctx.last_seq.iter().map(Cell::get).min().unwrap_or(0),
        opened: ctx.opened.get(),
        events: ctx.events.get(),
    }
}

/// Waits for the `end` line on stdin (a plain thread: EOF means the coordinator is gone).
async fn read_end() -> Result<EndLine, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(match r {
            Ok(0) | Err(_) => Err("stdin closed before `end`".to_string()),
            Ok(_) => line
                .trim_end()
                .strip_prefix("end ")
                .ok_or_else(|| format!("expected `end`: {line:?}"))
                .and_then(|j| serde_json::from_str(j).map_err(|e| e.to_string())),
        });
    });
    rx.await.map_err(|_| "stdin reader vanished".to_string())?
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
        let (c, notes) = check::check(log, &id, &ledger, end.seq, NOTES_PER_CLIENT);
        counts.add(&c);
        for s in &log.segs {
            *reasons.entry(s.end).or_default() += 1;
        }
        let bad = c.lost + c.duplicated + c.out_of_order + c.misrouted + c.phantom + c.id_mismatch + c.never_connected;
        if (bad > 0 || c.missed() > 0) && failed_clients < MAX_FAILED_CLIENTS {
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
    })
}

fn source_ip(args: &ChaosWorkerArgs, global: u64) -> IpAddr {
    let base = u32::from(args.source_base);
    IpAddr::V4(Ipv4Addr::from(base + (global % u64::from(args.source_ips.max(1))) as u32))
}

async fn open(
    addr: SocketAddr,
    source: IpAddr,
    path: &str,
    last_id: Option<&str>,
) -> Result<(TcpStream, http::BodyDecoder, Vec<u8>), String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("bind {source}: {e}"))?;
    let mut stream = socket.connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let resume = last_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{resume}\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await.map_err(|e| format!("read: {e}"))? == 0 {
            return Err(format!("{addr} closed before the response head"));
        }
        if let Some(head) = http::parse_head(&buf)? {
            if head.status != 200 {
                let text = String::from_utf8_lossy(&buf[head.len..]);
                return Err(format!("{addr} HTTP {} {}", head.status, text.trim()));
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
            tokio::time::timeout(OPEN_TIMEOUT, open(ctx.replicas[replica], source, &path, last_id.as_deref()))
                .await
                .unwrap_or_else(|_| Err("open timed out".into()))
        };
        let delay = match opened {
            // A refused connection goes to the next replica at once, as a load balancer
            // retries another backend when one refuses; once all refused, wait as below.
            Err(e) if e.starts_with("connect ") && refused + 1 < ctx.replicas.len() => {
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
                    *first_error = e;
                }
                Duration::from_millis(retry_ms) + rng.between_ms(0, 250)
            }
            Ok((stream, body, rest)) => {
                let lifetime = rng.between_ms(a.churn_min_ms, a.churn_max_ms);
                let end =
                    stream_once(&ctx, local, replica, stream, body, rest, lifetime, &mut last_id, &mut retry_ms).await;
                mark_ready(&ctx, local);
                if end == "churn" {
                    rng.between_ms(0, 250)
                } else {
                    Duration::from_millis(retry_ms) + rng.between_ms(0, 250)
                }
            }
        };
        first = false;
        refused = 0;
        tokio::time::sleep(delay).await;
        replica = rng.below(n) as usize;
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
    let resume = last_id.as_deref().and_then(layout::id_seq);
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
            missed: None,
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
    let last_seq = &ctx.last_seq[local];
    let mut on_item = |item: Item<'_>| match item {
        Item::Comment => ctx.heartbeats.set(ctx.heartbeats.get() + 1),
        Item::Retry(ms) => *retry_ms = ms.clamp(100, 30_000),
        Item::IdOnly { id } => {
            let seq = std::str::from_utf8(id).ok().and_then(layout::id_seq);
            if let (Some(seq), Some(seg)) = (seq, log.segs.last_mut())
                && seg.cursor.is_none()
            {
                seg.cursor = Some(seq);
                if !counted {
                    counted = true;
                    ctx.connected.set(ctx.connected.get() + 1);
                    mark_ready(ctx, local);
                }
            }
            if let Some(seq) = seq {
                last_seq.set(seq);
            }
        }
        Item::Event { name, data, id } => {
            if name == b"ssegate.missed" {
                if let Some(seg) = log.segs.last_mut() {
                    seg.missed = Some(Miss::from_data(data));
                }
                return;
            }
            let parsed = if name == b"message" { layout::parse_payload(data) } else { None };
            let Some((n, sent)) = parsed else {
                log.foreign += 1;
                return;
            };
            let Some(seq) = std::str::from_utf8(id).ok().and_then(layout::id_seq) else {
                log.no_id += 1;
                return;
            };
            let (Ok(seq32), Ok(n32)) = (u32::try_from(seq), u32::try_from(n)) else {
                log.foreign += 1;
                return;
            };
            let latency = now.saturating_sub(sent);
            log.recs.push(Rec { seq: seq32, n: n32, latency_us: u32::try_from(latency / 1000).unwrap_or(u32::MAX) });
            last_seq.set(seq);
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
