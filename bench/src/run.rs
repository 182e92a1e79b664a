//! `ssegate-bench run`: starts the worker processes, waits for their connections, samples the
//! server, publishes (or holds idle), collects the workers' results and reports.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{
    args::{Api, Rate, RunArgs},
    histogram::Histogram,
    plan::{self, Layout, Target},
    procstat::{self, Usage},
    publish,
    report::{Report, ServerUsage},
    seqcheck::Counts,
    wire::{End, Ready, WorkerResult},
};

/// Extra time the workers get beyond `--drain` to report.
const REPORT_GRACE: Duration = Duration::from_secs(30);

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Kills the workers on every exit path, so no client process outlives the run.
struct Workers(Vec<Worker>);

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.0 {
            drop(w.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for w in &mut self.0 {
            while Instant::now() < deadline && matches!(w.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
}

pub fn main(args: RunArgs) -> Result<(), String> {
    args.validate()?;
    let layout = args.sub.layout(args.connections);
    let server = |when: &str| -> Result<Option<Usage>, String> {
        match args.server_pid {
            None => Ok(None),
            Some(pid) => procstat::read_tree(pid).map(Some).ok_or(format!("server pid {pid} is gone ({when})")),
        }
    };
    let before = server("before connecting")?;

    // Start the workers; a thread per worker forwards its stdout lines.
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let (lines_tx, lines) = mpsc::channel::<(usize, String)>();
    let mut workers = Workers(Vec::new());
    let connect_started = Instant::now();
    for (w, (first, count)) in args.shares().into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(worker_args(&args, &layout, first, count))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))?;
        let stdout = child.stdout.take().ok_or("worker without stdout")?;
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((w, line)).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        workers.0.push(Worker { child, stdin });
    }
    drop(lines_tx);

    let n = workers.0.len();
    let mut ready = vec![None; n];
    collect(&lines, connect_started + args.connect_timeout, "ready", &mut ready, Ready::decode)?;
    let ready: Vec<Ready> = ready.into_iter().flatten().collect();
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    std::thread::sleep(args.settle);
    let connected = server("after connecting")?;
    let client_pids: Vec<u32> = workers.0.iter().map(|w| w.child.id()).chain([std::process::id()]).collect();
    let client_cpu =
        || -> f64 { client_pids.iter().filter_map(|p| procstat::read_one(*p)).map(|u| u.cpu_seconds).sum() };
    let client_cpu_start = client_cpu();

    // The measured phase: publish, or hold idle; sample the server's RSS every second.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let phase_start = Instant::now();
    let publish_start_ns = plan::now_ns();
    let mut peak_rss = connected.map_or(0, |u| u.rss_kib);
    let outcome = if args.rate == Rate::PerSecond(0) {
        while phase_start.elapsed() < args.duration {
            std::thread::sleep(Duration::from_secs(1).min(args.duration.saturating_sub(phase_start.elapsed())));
            peak_rss = peak_rss.max(server("while holding")?.map_or(0, |u| u.rss_kib));
        }
        publish::Outcome { published: vec![0; layout.streams() as usize], ..Default::default() }
    } else {
        let plan = publish::Plan {
            layout,
            kinds: args.to.clone(),
            rate: args.rate,
            concurrency: args.concurrency,
            duration: args.duration,
            max_events: args.max_events,
            payload_bytes: args.payload_bytes as usize,
            api: args.api,
            window: args.window,
            grpc_addr: args.grpc_addr,
            pub_addr: args.pub_addr(),
        };
        let sampler = args.server_pid.map(|pid| {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s = stop.clone();
            let h = std::thread::spawn(move || {
                let mut peak = 0;
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = procstat::read_tree(pid).map_or(peak, |u| u.rss_kib.max(peak));
                    std::thread::sleep(Duration::from_millis(500));
                }
                peak
            });
            (stop, h)
        });
        let outcome = rt.block_on(publish::run(&plan));
        if let Some((stop, h)) = sampler {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            peak_rss = peak_rss.max(h.join().unwrap_or(0));
        }
        outcome?
    };
    let run_seconds =
        if args.rate == Rate::PerSecond(0) { phase_start.elapsed() } else { outcome.elapsed }.as_secs_f64();
    let after = server("after the run")?;
    let client_cpu_s = client_cpu() - client_cpu_start;

    // Tell the workers what was published; collect what they received.
    let end = End { drain_ms: args.drain.as_millis() as u64, published: outcome.published.clone() }.encode();
    for w in &mut workers.0 {
        if let Some(stdin) = &mut w.stdin {
            writeln!(stdin, "{end}").and_then(|()| stdin.flush()).map_err(|e| format!("cannot reach a worker: {e}"))?;
        }
    }
    let mut results = vec![None; n];
    collect(&lines, Instant::now() + args.drain + REPORT_GRACE, "result", &mut results, WorkerResult::decode)?;
    let results: Vec<WorkerResult> = results.into_iter().flatten().collect();
    let server_dropped =
        if args.sub.target == Target::Ssegate { rt.block_on(server_dropped(args.grpc_addr)) } else { None };
    drop(workers);

    let mut counts = Counts::default();
    let mut latency_ns = Histogram::default();
    for r in &results {
        counts.add(&r.counts);
        latency_ns.merge(&r.latency);
    }
    let last_ns = results.iter().map(|r| r.last_ns).max().unwrap_or(0);
    let report = Report {
        label: args.label.clone(),
        target: args.sub.target.as_str().into(),
        requested: args.connections,
        established: ready.iter().map(|r| r.established).sum(),
        failed: ready.iter().map(|r| r.failed).sum(),
        refused: ready.iter().map(|r| r.refused).sum(),
        closed_no_response: ready.iter().map(|r| r.closed).sum(),
        non_200: ready.iter().map(|r| r.non_200).sum(),
        timed_out: ready.iter().map(|r| r.timed_out).sum(),
        connect_error: ready.iter().map(|r| r.first_error.clone()).find(|e| !e.is_empty()).unwrap_or_default(),
        connect_seconds,
        closed_early: results.iter().map(|r| r.closed_early).sum(),
        run_seconds,
        rate: match args.rate {
            Rate::PerSecond(r) => r.to_string(),
            Rate::Max => "max".into(),
        },
        api: match (args.sub.target, args.api) {
            (Target::Ssegate, Api::Unary) => "grpc-unary".into(),
            (Target::Ssegate, Api::Stream) => "grpc-stream".into(),
            _ => "http-post".into(),
        },
        to: args.to.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>().join(","),
        published: outcome.ok,
        publish_errors: outcome.errors,
        publish_error: outcome.first_error,
        counts,
        heartbeats: results.iter().map(|r| r.heartbeats).sum(),
        delivery_window_s: last_ns.saturating_sub(publish_start_ns) as f64 / 1e9,
        latency_ns,
        server: match (before, connected, after) {
            (Some(b), Some(c), Some(a)) => Some(ServerUsage {
                rss_before_kib: b.rss_kib,
                rss_connected_kib: c.rss_kib,
                rss_peak_kib: peak_rss.max(a.rss_kib),
                cpu_connect_s: c.cpu_seconds - b.cpu_seconds,
                cpu_run_s: a.cpu_seconds - c.cpu_seconds,
                cpu_run_sys_s: a.sys_seconds - c.sys_seconds,
            }),
            _ => None,
        },
        client_cpu_s,
        server_dropped,
    };
    if !args.json_only {
        eprint!("{}", report.human());
    }
    println!("{}", report.json());
    if !report.all_admitted() {
        // Every figure above is over fewer connections than asked for: not a valid run.
        return Err(format!(
            "only {} of {} connections were admitted (answered 200): {} refused at connect, {} closed without a response, {} answered non-200, {} without a response in time",
            report.established,
            report.requested,
            report.refused,
            report.closed_no_response,
            report.non_200,
            report.timed_out
        ));
    }
    Ok(())
}

/// The command line of one worker. Users are always passed explicitly: a worker does not
/// know the total connection count the default derives from.
fn worker_args(args: &RunArgs, layout: &Layout, first: u64, count: u64) -> Vec<String> {
    let s = &args.sub;
    [
        "worker",
        "--target",
        s.target.as_str(),
        "--http-addr",
        &s.http_addr.to_string(),
        "--users",
        &layout.users.to_string(),
        "--first-user",
        &layout.first_user.to_string(),
        "--groups",
        &s.groups.to_string(),
        "--topics",
        &s.topics.to_string(),
        "--source-base",
        &s.source_base.to_string(),
        "--source-ips",
        &s.source_ips.to_string(),
        "--connect-concurrency",
        &s.connect_concurrency.to_string(),
        "--first",
        &first.to_string(),
        "--count",
        &count.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Waits for one `tag` line from every worker (until `deadline`), decoding each into `slots`.
fn collect<T>(
    lines: &mpsc::Receiver<(usize, String)>,
    deadline: Instant,
    tag: &str,
    slots: &mut [Option<T>],
    decode: impl Fn(&str) -> Result<T, String>,
) -> Result<(), String> {
    while slots.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((w, line)) if line.starts_with(tag) => slots[w] = Some(decode(&line)?),
            Ok((w, line)) => eprintln!("worker {w}: {line}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let missing = slots.iter().filter(|s| s.is_none()).count();
                return Err(format!("{missing} worker(s) did not report `{tag}` in time"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(format!("workers exited before `{tag}`")),
        }
    }
    Ok(())
}

/// ssegate's count of events dropped by slow-consumer cut-offs (the server's view of loss).
async fn server_dropped(addr: std::net::SocketAddr) -> Option<u64> {
    let mut client =
        ssegate::grpc::pb::publisher_client::PublisherClient::connect(format!("http://{addr}")).await.ok()?;
    let stats = client.stats(ssegate::grpc::pb::StatsRequest {}).await.ok()?.into_inner();
    Some(stats.events_dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn workers_get_the_run_layout() {
        let cli =
            crate::args::Cli::try_parse_from(["b", "run", "--connections", "20", "--topics", "2", "--first-user", "7"])
                .unwrap();
        let crate::args::Command::Run(args) = cli.command else { panic!() };
        let layout = args.sub.layout(args.connections);
        let argv = worker_args(&args, &layout, 10, 10);
        let cli = crate::args::Cli::try_parse_from(std::iter::once("b".to_string()).chain(argv)).unwrap();
        let crate::args::Command::Worker(w) = cli.command else { panic!() };
        assert_eq!((w.first, w.count), (10, 10));
        assert_eq!(layout.name(0), "u7", "users from --first-user, in the workers too");
        assert_eq!(w.sub.layout(w.first + w.count), layout);
        assert_eq!(w.sub.layout(1), layout, "independent of what the worker can see");
    }
}
