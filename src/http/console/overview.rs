//! The overview: this replica's figures, the cluster's (the `Stats` scatter/gather), the replay
//! window, the retained store, the broker; and `problems`, what needs a look first. Served once
//! (`/console/api/overview`) and as a live stream (`/console/api/live`: one JSON `data:` per
//! second with the rates since the previous one; comments as heartbeats in between).

use std::{
    convert::Infallible,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures_util::stream;
use serde_json::{Value, json};

use super::{Console, ConsoleError, MAX_LIVE, json};
use crate::{
    backplane::{Backplane, cluster::Query},
    router::{CloseReason, Stats},
};

/// How often the live stream sends a sample.
const LIVE_EVERY: Duration = Duration::from_secs(1);
/// A live stream ends after this (the page opens a new one): no stream is held forever.
const LIVE_MAX: Duration = Duration::from_secs(30 * 60);
/// A replay log that evicts events younger than this is "short": a client away longer cannot
/// resume without missing events.
const REPLAY_SHORT: Duration = Duration::from_secs(60);

/// Counters of the previous sample, for rates.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    published: u64,
    delivered: u64,
}

pub(super) async fn snapshot(State(console): State<Console>) -> Response {
    json(&overview(&console, None).await.0)
}

pub(super) async fn live(State(console): State<Console>) -> Result<Response, ConsoleError> {
    if console.0.stop.is_cancelled() {
        return Err(ConsoleError::ShuttingDown);
    }
    let permit = console.0.live.clone().try_acquire_owned().map_err(|_| ConsoleError::Busy(MAX_LIVE))?;
    let end = tokio::time::Instant::now() + LIVE_MAX;
    let mut tick = tokio::time::interval(LIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = (console, tick, None::<Sample>, permit);
    let samples = stream::unfold(state, move |(console, mut tick, prev, permit)| async move {
        tokio::select! {
            () = console.0.stop.cancelled() => return None,
            () = tokio::time::sleep_until(end) => return None,
            _ = tick.tick() => {}
        }
        let (value, sample) = overview(&console, prev.as_ref()).await;
        let event = Event::default().data(value.to_string());
        Some((Ok::<_, Infallible>(event), (console, tick, Some(sample), permit)))
    });
    Ok(Sse::new(samples).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// The overview now, with rates since `prev` if given.
async fn overview(console: &Console, prev: Option<&Sample>) -> (Value, Sample) {
    let c = &console.0;
    let stats = c.routers.stats();
    let window = c.routers.first().replay_window();
    let cut_off = c.edge.closed_count(CloseReason::SlowConsumer);
    let now = Instant::now();
    let sample = Sample { at: now, published: stats.events_published, delivered: stats.events_delivered };
    let rate = |f: fn(&Sample) -> u64| {
        prev.map(|p| {
            let secs = now.duration_since(p.at).as_secs_f64().max(0.001);
            f(&sample).saturating_sub(f(p)) as f64 / secs
        })
    };
    let gathered = c.backplane.gather(&c.routers, &Query::Stats).await;
    let all: Vec<&Stats> = gathered.answers.iter().filter_map(|a| a.stats.as_ref()).collect();
    let this_id = c.backplane.replica_id();
    let mut per_replica: Vec<Value> = gathered
        .answers
        .iter()
        .filter_map(|a| {
            let s = a.stats.as_ref()?;
            let this = a.replica.is_empty() || Some(a.replica.as_str()) == this_id;
            Some(json!({
                "replica": if this { "this" } else { a.replica.as_str() },
                "streams": s.connections, "users": s.users, "delivered": s.events_delivered, "dropped": s.events_dropped,
            }))
        })
        .collect();
    per_replica.sort_by_key(|r| r["replica"] != "this");
    let total = |f: fn(&Stats) -> u64| all.iter().map(|s| f(s)).sum::<u64>();
    let (up, trouble) = (c.backplane.is_up(), c.backplane.store_trouble());
    let id = |seq: u64| format!("{:x}-{seq}", window.epoch);
    let mut problems = Vec::new();
    if !up {
        problems.push(trouble.clone().unwrap_or_else(|| "the backplane is down: publishes are refused".into()));
    }
    if gathered.partial {
        problems.push("some replicas did not answer the cluster query: cluster figures are partial".into());
    }
    if stats.events_dropped > 0 {
        problems.push(format!("{} events dropped (never written to a client) since start", stats.events_dropped));
    }
    if cut_off > 0 {
        problems.push(format!("{cut_off} streams cut off as slow consumers since start"));
    }
    if window.capacity == 0 {
        problems.push("the replay log is off (--replay-capacity 0): no client can resume".into());
    } else if window.evicted_through > 0 && window.oldest_age.is_some_and(|a| a < REPLAY_SHORT) {
        problems.push(format!(
            "the replay window is short: {}s of events; a client away longer misses events",
            window.oldest_age.map_or(0, |a| a.as_secs())
        ));
    }
    let value = json!({
        "at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "problems": problems,
        "replica": {
            "streams": stats.connections,
            "users": stats.users,
            "groups": stats.groups,
            "topics": stats.topics,
            "published": stats.events_published,
            "delivered": stats.events_delivered,
            "dropped": stats.events_dropped,
            "slow_consumer_cutoffs": cut_off,
            "publishes_per_s": rate(|s| s.published),
            "deliveries_per_s": rate(|s| s.delivered),
            "uptime_s": c.routers.uptime().as_secs(),
        },
        "cluster": {
            "replicas": gathered.answers.len(),
            "partial": gathered.partial,
            "streams": total(|s| s.connections),
            "users": total(|s| s.users),
            "delivered": total(|s| s.events_delivered),
            "dropped": total(|s| s.events_dropped),
            "per_replica": per_replica,
        },
        "replay": {
            "events": window.events,
            "bytes": window.bytes,
            "newest_id": id(window.last_seq),
            "oldest_id": window.oldest_seq.map(id),
            "oldest_age_s": window.oldest_age.map(|a| a.as_secs_f64()),
            "evicted": window.evicted_through > 0,
            "capacity": window.capacity,
            "max_bytes": window.max_bytes,
            "max_age_s": window.max_age.as_secs(),
        },
        "retained": { "values": stats.retained_values, "bytes": stats.retained_bytes },
        "broker": { "kind": broker_kind(&c.backplane), "up": up, "trouble": trouble },
    });
    (value, sample)
}

fn broker_kind(backplane: &Backplane) -> &'static str {
    match backplane {
        Backplane::Nats(_) => "nats",
        Backplane::Memory(_) if backplane.has_data_dir() => "memory + data dir",
        Backplane::Memory(_) => "memory",
    }
}
