//! The fault schedule, run on its own thread while the publishers and clients carry on:
//!
//! 1. `SIGKILL` one replica; start it again after a pause.
//! 2. `SIGSTOP` the broker; `SIGCONT` it after a while (longer than the publish timeout).
//! 3. Restart the broker (`SIGTERM`, wait for its exit, start it on the same store and port).
//! 4. A rolling `SIGTERM` of the three replicas: each drained, restarted, ready, a pause (the
//!    schedule's gap), then the next.
//! 5. A flood of silent sockets on replica 2 and of stalled HTTP/2 streams (fed big events) on
//!    replica 0, at the same time.
//! 6. A reconnect storm: the workers are told (and acknowledge) that every client of replica 0
//!    reconnects at once when its stream ends; then `SIGKILL` replica 0, start it again after
//!    a pause. The workers report how long their clients took to be back (`client`).
//! 7. The broker loses its volume: `SIGTERM` it, delete its store directory, start it on the
//!    same port with an empty store; then a probe (`probe`) checks that a publish is
//!    acknowledged again and delivered on every replica.
//!
//! Each fault starts at its offset from the start of publishing, or `gap` after the previous
//! one ended, whichever is later. Every wait has a deadline; a fault that cannot be carried out
//! is a problem of the run (which then fails).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    Link,
    client::StormLine,
    floods, probe, procs,
    procs::{Ports, Proc},
    publisher::{self, Shared},
};
use crate::{plan::now_ns, procstat};

/// The faults, by name (`--faults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultKind {
    Kill,
    StopBroker,
    RestartBroker,
    Rolling,
    Flood,
    Storm,
    VolumeLoss,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    /// Only these faults, one after the other (each `gap` after the previous, offsets
    /// ignored); empty: all of them, at their offsets.
    pub only: Vec<FaultKind>,
    pub kill_at: Duration,
    pub kill_down: Duration,
    pub stop_at: Duration,
    pub stop_for: Duration,
    pub broker_restart_at: Duration,
    pub rolling_at: Duration,
    pub flood_at: Duration,
    pub flood_hold: Duration,
    pub storm_at: Duration,
    /// How long the storm's replica stays down.
    pub storm_down: Duration,
    pub volume_loss_at: Duration,
    pub gap: Duration,
}

pub struct Cluster {
    pub nats: Proc,
    pub nats_port: u16,
    /// The broker's store directory (`-sd`), which the volume-loss fault deletes.
    pub store: std::path::PathBuf,
    pub replicas: Vec<Proc>,
    pub ports: Vec<Ports>,
}

/// One injected fault: when it began, when its cause was lifted (the process back, the broker
/// resumed, the floods released), when the step ended, and what was observed.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    pub name: String,
    pub start_ns: u64,
    pub lift_ns: u64,
    pub end_ns: u64,
    pub notes: Vec<String>,
}

pub struct FaultReport {
    pub faults: Vec<Fault>,
    pub silent: Option<floods::SilentOutcome>,
    pub stalled: Option<floods::StallOutcome>,
    pub problems: Vec<String>,
}

const READY_WITHIN: Duration = Duration::from_secs(120);
const EXIT_WITHIN: Duration = Duration::from_secs(20);
/// Longest wait for every worker to acknowledge a storm before the kill.
const ARM_WITHIN: Duration = Duration::from_secs(10);
/// After the broker came back with an empty store: longest wait for a publish to be
/// acknowledged, then for every replica to deliver it, then for every replica to be ready.
const PROBE_PUBLISH_WITHIN: Duration = Duration::from_secs(30);
const PROBE_DELIVER_WITHIN: Duration = Duration::from_secs(15);
const READY_AFTER_LOSS_WITHIN: Duration = Duration::from_secs(30);

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// What the faults act on besides the cluster.
pub struct Env {
    pub rt: tokio::runtime::Handle,
    pub shared: Arc<Shared>,
    pub link: Arc<Link>,
    pub silent: u64,
    pub stalled: u64,
}

/// Runs every fault in order. Never panics on a failed step: it is noted and the run goes on.
pub fn run(c: &mut Cluster, s: &Schedule, t0: Instant, env: &Env) -> FaultReport {
    let mut r = FaultReport { faults: Vec::new(), silent: None, stalled: None, problems: Vec::new() };
    let mut prev_end = t0;
    let wait_for = |at: Duration, prev_end: Instant| {
        let when = (t0 + at).max(prev_end + s.gap);
        while let Some(left) = when.checked_duration_since(Instant::now()) {
            std::thread::sleep(left.min(Duration::from_millis(200)));
        }
    };
    type Step<'a> = Box<dyn FnOnce(&mut Cluster, &mut FaultReport) -> Result<Vec<Fault>, String> + 'a>;
    use FaultKind as K;
    let steps: Vec<(K, Duration, &str, Step)> = vec![
        (
            K::Kill,
            s.kill_at,
            "SIGKILL replica-1, restart",
            Box::new(|c, _| kill_replica(c, 1, s.kill_down).map(|f| vec![f])),
        ),
        (
            K::StopBroker,
            s.stop_at,
            "SIGSTOP/SIGCONT broker",
            Box::new(|c, _| stop_broker(c, s.stop_for).map(|f| vec![f])),
        ),
        (
            K::RestartBroker,
            s.broker_restart_at,
            "restart broker",
            Box::new(|c, r| restart_broker(c, r).map(|f| vec![f])),
        ),
        (K::Rolling, s.rolling_at, "rolling SIGTERM of all replicas", Box::new(|c, _| rolling(c, s.gap))),
        (
            K::Flood,
            s.flood_at,
            "flood: silent sockets + stalled h2 streams",
            Box::new(move |c, r| flood(c, r, env, s.flood_hold).map(|f| vec![f])),
        ),
        (K::Storm, s.storm_at, STORM, Box::new(|c, _| storm(c, 0, s.storm_down, &env.link).map(|f| vec![f]))),
        (K::VolumeLoss, s.volume_loss_at, VOLUME_LOSS, Box::new(|c, r| lose_volume(c, r, env).map(|f| vec![f]))),
    ];
    for (kind, at, name, step) in steps {
        if !s.only.is_empty() && !s.only.contains(&kind) {
            continue;
        }
        wait_for(if s.only.is_empty() { at } else { Duration::ZERO }, prev_end);
        crashed(c, &mut r.problems, name);
        match step(c, &mut r) {
            Ok(f) => r.faults.extend(f),
            Err(e) => {
                r.problems.push(format!("fault `{name}` could not be carried out: {e}"));
                r.faults.push(Fault {
                    name: name.into(),
                    start_ns: 0,
                    lift_ns: 0,
                    end_ns: 0,
                    notes: vec![format!("failed: {e}")],
                });
            }
        }
        prev_end = Instant::now();
    }
    crashed(c, &mut r.problems, "the end of the faults");
    r
}

/// Notes (and restarts) a replica or broker that died on its own.
fn crashed(c: &mut Cluster, problems: &mut Vec<String>, before: &str) {
    for (i, p) in c.replicas.iter_mut().enumerate() {
        if let Some(status) = p.exited() {
            problems.push(format!("{} exited on its own ({status}) before {before}; restarted", p.name));
            if p.start().is_ok() {
                let _ = procs::wait_ready(c.ports[i].admin, READY_WITHIN);
            }
        }
    }
    if let Some(status) = c.nats.exited() {
        problems.push(format!("nats-server exited on its own ({status}) before {before}; restarted"));
        let _ = c.nats.start();
    }
}

fn start_replica(c: &mut Cluster, i: usize, notes: &mut Vec<String>) -> Result<(), String> {
    c.replicas[i].start()?;
    let took = procs::wait_ready(c.ports[i].admin, READY_WITHIN)?;
    notes.push(format!("replica-{i} ready {} after start", secs(took)));
    Ok(())
}

fn kill_replica(c: &mut Cluster, i: usize, down: Duration) -> Result<Fault, String> {
    sigkill_and_restart(c, i, down, format!("SIGKILL replica-{i}, restart"), "")
}

/// SIGKILLs replica `i`, leaves it down for `down`, starts it again; `note` follows the kill's note.
fn sigkill_and_restart(c: &mut Cluster, i: usize, down: Duration, name: String, note: &str) -> Result<Fault, String> {
    let start_ns = now_ns();
    let mut notes = Vec::new();
    c.replicas[i].signal("KILL")?;
    let status = c.replicas[i].wait_exit(EXIT_WITHIN).ok_or("did not die of SIGKILL")?;
    notes.push(format!("replica-{i} killed: {status}{note}"));
    let lift_ns = now_ns();
    std::thread::sleep(down);
    start_replica(c, i, &mut notes)?;
    Ok(Fault { name, start_ns, lift_ns, end_ns: now_ns(), notes })
}

fn stop_broker(c: &mut Cluster, stop_for: Duration) -> Result<Fault, String> {
    let start_ns = now_ns();
    c.nats.signal("STOP")?;
    std::thread::sleep(stop_for);
    c.nats.signal("CONT")?;
    let lift_ns = now_ns();
    Ok(Fault {
        name: "SIGSTOP/SIGCONT broker".into(),
        start_ns,
        lift_ns,
        end_ns: lift_ns,
        notes: vec![format!("broker stopped for {}", secs(stop_for))],
    })
}

/// SIGTERMs the broker (SIGKILL if it lingers) and says how it went.
fn terminate_broker(c: &mut Cluster) -> String {
    let t = Instant::now();
    match c.nats.stop(EXIT_WITHIN) {
        (_, true) => format!("nats-server did not exit within {EXIT_WITHIN:?} of SIGTERM: killed"),
        (s, false) => format!("nats-server exited after {}: {s:?}", secs(t.elapsed())),
    }
}

fn restart_broker(c: &mut Cluster, _: &mut FaultReport) -> Result<Fault, String> {
    let start_ns = now_ns();
    let t = Instant::now();
    let mut notes = vec![terminate_broker(c)];
    c.nats.start()?;
    procs::wait_port(std::net::SocketAddr::from(([127, 0, 0, 1], c.nats_port)), Duration::from_secs(30))?;
    let lift_ns = now_ns();
    notes.push(format!("nats-server listening again {} after SIGTERM", secs(t.elapsed())));
    // Replicas report not-ready while the broker is away; note how long they take to be back.
    let back = Instant::now();
    for (i, p) in c.ports.iter().enumerate() {
        match procs::wait_ready(p.admin, READY_WITHIN) {
            Ok(_) => {}
            Err(e) => notes.push(format!("replica-{i}: {e}")),
        }
    }
    notes.push(format!("all replicas ready {} after the broker listened", secs(back.elapsed())));
    Ok(Fault { name: "restart broker".into(), start_ns, lift_ns, end_ns: now_ns(), notes })
}

/// Each replica in turn: SIGTERM, wait for its exit, start it, wait until ready, then `pause`
/// (a rollout's minimum ready time) before the next one. One fault per replica.
fn rolling(c: &mut Cluster, pause: Duration) -> Result<Vec<Fault>, String> {
    let mut faults = Vec::new();
    for i in 0..c.replicas.len() {
        let start_ns = now_ns();
        let mut notes = Vec::new();
        let t = Instant::now();
        let (status, killed) = c.replicas[i].stop(EXIT_WITHIN);
        notes.push(match (status, killed) {
            (_, true) => format!("replica-{i} did not exit within {EXIT_WITHIN:?} of SIGTERM: killed"),
            (Some(s), false) => format!("replica-{i} drained and exited after {}: {s}", secs(t.elapsed())),
            (None, false) => format!("replica-{i} was not running"),
        });
        start_replica(c, i, &mut notes)?;
        let lift_ns = now_ns();
        faults.push(Fault { name: format!("rolling SIGTERM: replica-{i}"), start_ns, lift_ns, end_ns: lift_ns, notes });
        if i + 1 < c.replicas.len() {
            std::thread::sleep(pause);
        }
    }
    Ok(faults)
}

fn flood(c: &mut Cluster, r: &mut FaultReport, env: &Env, hold: Duration) -> Result<Fault, String> {
    let (rt, shared, silent, stalled) = (&env.rt, &env.shared, env.silent, env.stalled);
    let start_ns = now_ns();
    let silent_addr = c.ports[2].http;
    let silent_thread = std::thread::spawn(move || floods::silent_sockets(silent_addr, silent, hold));
    let pid = c.replicas[0].pid();
    let stall_until = tokio::time::Instant::now() + hold;
    let mut load = None;
    let stall = floods::stalled_h2(
        c.ports[0].http,
        stalled,
        publisher::STALL_TOPIC,
        hold,
        || load = Some(rt.spawn(publisher::stall_load(shared.clone(), 8192, 20, stall_until))),
        || pid.and_then(procstat::read_one).map(|u| u.rss_kib),
    );
    let silent = silent_thread.join().map_err(|_| "the silent-socket thread panicked")?;
    let lift_ns = now_ns();
    let mut notes = vec![
        format!(
            "silent sockets on replica-2: {} opened, {} closed by the server (after {:?}..{:?} ms), {} still open after {} ms",
            silent.opened,
            silent.closed_by_server,
            silent.close_after_ms_min,
            silent.close_after_ms_max,
            silent.still_open_at_end,
            silent.held_ms
        ),
        format!(
            "stalled h2 streams on replica-0: {} opened, {} answered, {} reset (codes {:?}), {} GOAWAY, {} closed, {} untouched; {} DATA bytes; replica-0 RSS {:?} -> {:?} KiB",
            stall.opened,
            stall.answered,
            stall.rst_stream,
            stall.rst_codes,
            stall.goaway,
            stall.closed,
            stall.untouched,
            stall.data_bytes,
            stall.server_rss_kib_before,
            stall.server_rss_kib_after
        ),
    ];
    if let Some(h) = load {
        let acked = rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), h).await });
        if let Ok(Ok(n)) = acked {
            notes.push(format!("{n} events of 8 KiB acknowledged to the stalled streams' topic"));
        }
    }
    r.silent = Some(silent);
    r.stalled = Some(stall);
    Ok(Fault { name: "flood: silent sockets + stalled h2 streams".into(), start_ns, lift_ns, end_ns: now_ns(), notes })
}

/// The names the report finds these faults by.
pub const STORM: &str = "reconnect storm: SIGKILL replica-0, every client at once";
pub const VOLUME_LOSS: &str = "broker loses its volume";

/// Arms the storm in every worker (each acknowledges), `SIGKILL`s replica `i`, and starts it
/// again after `down`. The clients' side is measured by the workers.
fn storm(c: &mut Cluster, i: usize, down: Duration, link: &Link) -> Result<Fault, String> {
    let armed = link.armed();
    // The window covers the kill and the reconnections; streams on the replica end at the kill.
    let line = StormLine { replica: i, window_ms: (down + Duration::from_secs(2)).as_millis() as u64 };
    link.send(&format!("storm {}", serde_json::to_string(&line).map_err(|e| e.to_string())?))?;
    let by = Instant::now() + ARM_WITHIN;
    while link.armed() < armed + link.workers() {
        if Instant::now() >= by {
            return Err(format!("the workers did not arm the storm within {ARM_WITHIN:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    sigkill_and_restart(c, i, down, STORM.into(), "; its clients reconnect at once to the other replicas")
}

/// Stops the broker, deletes its store, starts it again empty on the same port; then checks
/// with a probe that a publish is acknowledged and reaches every replica's clients.
fn lose_volume(c: &mut Cluster, r: &mut FaultReport, env: &Env) -> Result<Fault, String> {
    let before = env.shared.records().iter().filter_map(|r| r.id).max();
    let start_ns = now_ns();
    let t = Instant::now();
    let mut notes = vec![terminate_broker(c)];
    match std::fs::remove_dir_all(&c.store) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot delete the broker's store {}: {e}", c.store.display())),
    }
    c.nats.start()?;
    procs::wait_port(std::net::SocketAddr::from(([127, 0, 0, 1], c.nats_port)), Duration::from_secs(30))?;
    let lift_ns = now_ns();
    notes.push(format!(
        "store {} deleted; nats-server listening again, empty, {} after SIGTERM; last id acknowledged before: {}",
        c.store.display(),
        secs(t.elapsed()),
        before.map_or("none".into(), |p| p.to_string())
    ));
    let back = Instant::now();
    let http = c.ports.iter().map(|p| p.http).collect();
    let publish_by = tokio::time::Instant::now() + PROBE_PUBLISH_WITHIN;
    let probe = env.rt.block_on(probe::run(env.shared.clone(), http, publish_by, PROBE_DELIVER_WITHIN));
    match probe.acked {
        Some((id, after)) => {
            notes.push(format!(
                "probe publish acknowledged as {id} {} after the broker listened ({} attempts)",
                secs(after),
                probe.attempts
            ));
            if before.is_some_and(|b| b.epoch == id.epoch) {
                r.problems.push(format!(
                    "after the broker lost its store, a publish was acknowledged as {id}: the lost stream's epoch, so \
                     ids of the new stream repeat ids browsers already hold"
                ));
            }
            for (i, d) in probe.delivered.iter().enumerate() {
                match d {
                    Some(d) => {
                        notes.push(format!("probe delivered on replica-{i} {} after its acknowledgement", secs(*d)))
                    }
                    None => r.problems.push(format!(
                        "replica-{i} did not deliver a publish acknowledged after the broker lost its store within \
                         {PROBE_DELIVER_WITHIN:?}: {}",
                        probe.stream_errors[i]
                    )),
                }
            }
        }
        None => r.problems.push(format!(
            "no publish was acknowledged within {PROBE_PUBLISH_WITHIN:?} of the broker's return with an empty store \
             ({} attempts; last error: {})",
            probe.attempts, probe.last_error
        )),
    }
    for (i, p) in c.ports.iter().enumerate() {
        if let Err(e) = procs::wait_ready(p.admin, READY_AFTER_LOSS_WITHIN.saturating_sub(back.elapsed())) {
            notes.push(format!("replica-{i}: {e}"));
        }
    }
    notes.push(format!("replicas checked {} after the broker listened", secs(back.elapsed())));
    Ok(Fault { name: VOLUME_LOSS.into(), start_ns, lift_ns, end_ns: now_ns(), notes })
}
