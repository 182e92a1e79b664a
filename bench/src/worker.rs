//! A client process: opens its share of the SSE connections (at most `--connect-concurrency`
//! attempts in flight, or all at once with 0), checks every event it receives (sequence,
//! latency), and reports to `run` over stdout, with how each connection that was not admitted
//! failed.
//!
//! Single-threaded on purpose (a current-thread runtime and `Rc` state): the bench pins all
//! clients to one core, and one thread per process avoids any locking on the hot path.

use std::{
    cell::{Cell, RefCell},
    io::{BufRead, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    rc::Rc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::Semaphore,
    task::LocalSet,
};

use crate::{
    args::WorkerArgs,
    histogram::Histogram,
    plan,
    seqcheck::{Counts, SeqCheck},
    sse::{self, BodyDecoder, Scanner, Sse},
    wire::{End, Ready, WorkerResult},
};

/// Read buffer per connection.
const READ_BUF: usize = 16 * 1024;
/// Longest wait for one connection to open and answer with its response head.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// State shared by this process's connection tasks (one thread, so `Cell`/`RefCell`).
struct Shared {
    checks: RefCell<Vec<SeqCheck>>,
    latency: RefCell<Histogram>,
    /// Sum of every connection's progress, compared with what was published to end the drain.
    progress: Cell<u64>,
    heartbeats: Cell<u64>,
    established: Cell<u64>,
    failed: Cell<u64>,
    /// Of `failed`, by kind (`Refusal`).
    refused: Cell<u64>,
    closed: Cell<u64>,
    non_200: Cell<u64>,
    timed_out: Cell<u64>,
    closed_early: Cell<u64>,
    first_error: RefCell<String>,
    first_ns: Cell<u64>,
    last_ns: Cell<u64>,
    /// Set once the run is over: connections closing from then on are expected.
    stopping: Cell<bool>,
}

pub fn main(args: WorkerArgs) -> Result<(), String> {
    args.sub.validate()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    LocalSet::new().block_on(&rt, run(args))
}

fn source_ip(args: &WorkerArgs, conn: u64) -> Option<IpAddr> {
    if args.sub.http_addr.is_ipv6() {
        return None;
    }
    let base = u32::from(args.sub.source_base);
    Some(IpAddr::V4(Ipv4Addr::from(base + (conn % u64::from(args.sub.source_ips)) as u32)))
}

async fn run(args: WorkerArgs) -> Result<(), String> {
    // The layout must match the coordinator's, which sizes it on the total connections; the
    // user count is always passed explicitly to workers.
    let layout = args.sub.layout(args.first + args.count);
    let shared = Rc::new(Shared {
        checks: RefCell::new((0..args.count).map(|i| SeqCheck::new(&layout.followed(args.first + i))).collect()),
        latency: RefCell::new(Histogram::default()),
        progress: Cell::new(0),
        heartbeats: Cell::new(0),
        established: Cell::new(0),
        failed: Cell::new(0),
        refused: Cell::new(0),
        closed: Cell::new(0),
        non_200: Cell::new(0),
        timed_out: Cell::new(0),
        closed_early: Cell::new(0),
        first_error: RefCell::new(String::new()),
        first_ns: Cell::new(0),
        last_ns: Cell::new(0),
        stopping: Cell::new(false),
    });
    // 0: no cap, every connection's connect and request go out without waiting for another
    // (a reconnect storm).
    let permits =
        (args.sub.connect_concurrency > 0).then(|| Rc::new(Semaphore::new(args.sub.connect_concurrency as usize)));
    for i in 0..args.count {
        let conn = args.first + i;
        let ctx = ConnCtx {
            shared: shared.clone(),
            permits: permits.clone(),
            local: i as usize,
            addr: args.sub.http_addr,
            source: source_ip(&args, conn),
            path: layout.subscribe_path(conn),
        };
        tokio::task::spawn_local(connection(ctx));
    }
    while shared.established.get() + shared.failed.get() < args.count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = Ready {
        established: shared.established.get(),
        failed: shared.failed.get(),
        refused: shared.refused.get(),
        closed: shared.closed.get(),
        non_200: shared.non_200.get(),
        timed_out: shared.timed_out.get(),
        first_error: shared.first_error.borrow().clone(),
    };
    say(&ready.encode());

    let end = read_end().await?;
    let expected: u64 = shared.checks.borrow().iter().map(|c| c.expected(&end.published)).sum();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(end.drain_ms);
    while shared.progress.get() < expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.stopping.set(true);
    let mut counts = Counts::default();
    for c in shared.checks.borrow().iter() {
        counts.add(&c.finish(&end.published));
    }
    let result = WorkerResult {
        counts,
        closed_early: shared.closed_early.get(),
        heartbeats: shared.heartbeats.get(),
        first_ns: shared.first_ns.get(),
        last_ns: shared.last_ns.get(),
        latency: shared.latency.borrow().clone(),
    };
    say(&result.encode());
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // If `run` is gone there is nobody to tell; the next read of stdin ends this worker.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Waits for the `end` line on stdin (read on a plain thread: tokio's stdin would need a
/// blocking pool anyway). EOF means `run` died: give up.
async fn read_end() -> Result<End, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(match r {
            Ok(0) | Err(_) => Err("stdin closed before `end`".to_string()),
            Ok(_) => End::decode(&line),
        });
    });
    rx.await.map_err(|_| "stdin reader vanished".to_string())?
}

struct ConnCtx {
    shared: Rc<Shared>,
    /// `None`: no cap on connection attempts in flight.
    permits: Option<Rc<Semaphore>>,
    /// Index among this worker's connections.
    local: usize,
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: String,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The connection itself was refused (or failed to connect).
    Refused,
    /// Accepted, then closed or reset before any response head.
    Closed,
    /// Answered with another status than 200.
    Status,
    /// No response head within `OPEN_TIMEOUT`.
    Timeout,
    /// Anything else (no local port, a malformed head).
    Other,
}

/// Connects from `source`, sends the subscription request, reads the response head. Returns
/// the stream, its body decoder and body bytes that came with the head.
async fn open(ctx: &ConnCtx) -> Result<(TcpStream, BodyDecoder, Vec<u8>), (Refusal, String)> {
    let other = |e: String| (Refusal::Other, e);
    let socket =
        if ctx.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| other(e.to_string()))?;
    if let Some(ip) = ctx.source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| other(format!("bind {ip}: {e}")))?;
    }
    let mut stream = socket.connect(ctx.addr).await.map_err(|e| (Refusal::Refused, format!("connect: {e}")))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
        ctx.path, ctx.addr
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| (Refusal::Closed, format!("write: {e}")))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await.map_err(|e| (Refusal::Closed, format!("read: {e}")))? == 0 {
            return Err((Refusal::Closed, "closed before the response head".into()));
        }
        if let Some(head) = sse::parse_head(&buf).map_err(other)? {
            if head.status != 200 {
                let text = String::from_utf8_lossy(&buf[head.len..]);
                return Err((Refusal::Status, format!("HTTP {} {}", head.status, text.trim())));
            }
            return Ok((stream, BodyDecoder::new(head.framing), buf.split_off(head.len)));
        }
    }
}

async fn connection(ctx: ConnCtx) {
    let opened = {
        let _permit = match &ctx.permits {
            Some(p) => match p.acquire().await {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            None => None,
        };
        tokio::time::timeout(OPEN_TIMEOUT, open(&ctx))
            .await
            .unwrap_or_else(|_| Err((Refusal::Timeout, "no response head within the open timeout".into())))
    };
    let shared = &ctx.shared;
    let (mut stream, mut body, rest) = match opened {
        Ok(o) => o,
        Err((kind, e)) => {
            shared.failed.set(shared.failed.get() + 1);
            let count = match kind {
                Refusal::Refused => Some(&shared.refused),
                Refusal::Closed => Some(&shared.closed),
                Refusal::Status => Some(&shared.non_200),
                Refusal::Timeout => Some(&shared.timed_out),
                Refusal::Other => None,
            };
            if let Some(c) = count {
                c.set(c.get() + 1);
            }
            let mut first = shared.first_error.borrow_mut();
            if first.is_empty() {
                *first = e;
            }
            return;
        }
    };
    shared.established.set(shared.established.get() + 1);
    let mut scanner = Scanner::default();
    let mut done = receive(shared, ctx.local, &mut body, &mut scanner, &rest);
    drop(rest);
    let mut buf = vec![0u8; READ_BUF];
    while !done.unwrap_or(true) {
        done = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => receive(shared, ctx.local, &mut body, &mut scanner, &buf[..n]),
        };
    }
    if !shared.stopping.get() {
        shared.closed_early.set(shared.closed_early.get() + 1);
    }
}

/// Decodes one read's worth of bytes and accounts every event in it; `Ok(true)` when the
/// response body ended.
fn receive(
    shared: &Shared,
    local: usize,
    body: &mut BodyDecoder,
    scanner: &mut Scanner,
    bytes: &[u8],
) -> Result<bool, String> {
    if bytes.is_empty() {
        return Ok(false);
    }
    let now = plan::now_ns();
    let mut on_item = |item: Sse<'_>| match item {
        Sse::Comment => shared.heartbeats.set(shared.heartbeats.get() + 1),
        Sse::Event(data) => {
            let Some((stream, seq, sent)) = plan::parse_payload(data) else {
                // Not one of ours (a server's own event): counts as misrouted.
                shared.checks.borrow_mut()[local].counts.unexpected += 1;
                return;
            };
            let advanced = shared.checks.borrow_mut()[local].observe(stream, seq);
            shared.progress.set(shared.progress.get() + advanced);
            shared.latency.borrow_mut().record(now.saturating_sub(sent));
            if shared.first_ns.get() == 0 {
                shared.first_ns.set(now);
            }
            shared.last_ns.set(now);
        }
    };
    body.feed(bytes, &mut |b| scanner.feed(b, &mut on_item))
}
