//! The figures of a chaos run: totals over the workers' checks, latency percentiles, and the
//! recovery time after each fault, as a summary for people and one JSON line.
//!
//! **Recovery** after an instant `t`: the time from `t` until every client (connected or in
//! the middle of reconnecting) has a last event id at or past the first broadcast whose first
//! publish attempt started after `t` and that was acknowledged. Broadcasts go out twice a
//! second and address everyone, so this says "every tab is live again and has caught up",
//! within about half a second of granularity (plus the workers' 250 ms sampling).
//! `recovery_s` counts from when the fault's cause was lifted (process back, broker resumed,
//! floods released); `disruption_s` from the injection (for a fault lifted later, such as the
//! broker's stop, it includes the time it lasted: the first broadcast after the injection is
//! acknowledged only once the broker is back). "Fewest connected": the fewest clients holding
//! a stream from the injection to the recovery.
//!
//! **The storm**: the workers' counts of the clients that lost the killed replica, summed;
//! `reconnect_s` is from the kill to the last of them getting its cursor back on another
//! replica. It fails the run if any of them is not back, or later than the profile's bound, or
//! if any of their attempts was not admitted (closed without a response, refused, non-200).

use std::{fmt::Write, path::Path};

use serde_json::json;

use super::{
    Outcome, Profile,
    check::Counts,
    client::{StatLine, StormOutcome},
    faults,
    layout::{Pos, Record, Target},
};
use crate::histogram::Histogram;

/// When every worker's lowest last-event-id first reached the first acknowledged broadcast
/// published from `t_ns` on; `None` if that never happened in the timeline.
pub fn caught_up(timeline: &[(usize, StatLine)], workers: usize, ledger: &[Record], t_ns: u64) -> Option<u64> {
    let probe = ledger
        .iter()
        .filter(|r| r.target == Target::Broadcast && r.sent_ns >= t_ns)
        .filter_map(|r| Some((r.sent_ns, r.id?)))
        .min()?;
    let mut latest: Vec<Option<Pos>> = vec![None; workers];
    for (w, s) in timeline {
        if let Some(slot) = latest.get_mut(*w) {
            *slot = Some(s.min_id);
        }
        if s.ns >= probe.0 && latest.iter().all(|m| m.is_some_and(|m| m >= probe.1)) {
            return Some(s.ns);
        }
    }
    None
}

/// Fewest clients holding a stream at once (summed over workers at each sample) in `[a, b]`.
fn fewest_connected(timeline: &[(usize, StatLine)], workers: usize, a: u64, b: u64) -> Option<u64> {
    let mut latest: Vec<Option<u64>> = vec![None; workers];
    let mut fewest = None;
    for (w, s) in timeline {
        if let Some(slot) = latest.get_mut(*w) {
            *slot = Some(s.connected);
        }
        if s.ns >= a && s.ns <= b && latest.iter().all(Option::is_some) {
            let sum: u64 = latest.iter().flatten().sum();
            fewest = Some(fewest.map_or(sum, |f: u64| f.min(sum)));
        }
    }
    fewest
}

pub struct FaultFigures {
    pub name: String,
    pub recovery_s: Option<f64>,
    pub disruption_s: Option<f64>,
    pub fewest_connected: Option<u64>,
    pub notes: Vec<String>,
}

/// The storm's figures (see the module's documentation).
pub struct StormFigures {
    pub outcome: StormOutcome,
    /// From the kill to the last client back.
    pub reconnect_s: Option<f64>,
    pub bound_s: f64,
}

pub struct Report {
    pub profile: &'static str,
    pub connections: u64,
    pub workers: usize,
    pub ready_connected: u64,
    pub peak_connected: u64,
    pub counts: Counts,
    pub streams_opened: u64,
    pub failed_attempts: u64,
    pub first_error: String,
    pub drained: u64,
    pub acknowledged: u64,
    pub unacknowledged: u64,
    pub publish: String,
    pub publish_attempts: u64,
    pub retried: u64,
    pub rejected: u64,
    pub via_stream: u64,
    pub end: Pos,
    pub latency: Histogram,
    pub latency_first_us: Histogram,
    pub faults: Vec<FaultFigures>,
    pub silent: serde_json::Value,
    pub stalled: serde_json::Value,
    pub problems: Vec<String>,
    pub publish_s: f64,
    pub wall_s: f64,
    pub end_reasons: Vec<(String, u64)>,
    pub storm: Option<StormFigures>,
}

impl Report {
    pub fn new(p: &Profile, o: &Outcome) -> Report {
        let mut counts = Counts::default();
        let mut latency = Histogram::default();
        let mut latency_first_us = Histogram::default();
        let mut reasons: std::collections::BTreeMap<String, u64> = Default::default();
        let mut first_error = String::new();
        for r in &o.results {
            counts.add(&r.counts);
            if let Ok(h) = Histogram::decode(&r.latency) {
                latency.merge(&h);
            }
            if let Ok(h) = Histogram::decode(&r.latency_first_attempt_us) {
                latency_first_us.merge(&h);
            }
            for (k, v) in &r.end_reasons {
                *reasons.entry(k.clone()).or_default() += v;
            }
            if first_error.is_empty() {
                first_error.clone_from(&r.first_error);
            }
        }
        let mut timeline = o.timeline.clone();
        timeline.sort_by_key(|(_, s)| s.ns);
        let peak_connected = {
            let mut latest = vec![0u64; o.workers];
            let mut peak = 0;
            for (w, s) in &timeline {
                if let Some(l) = latest.get_mut(*w) {
                    *l = s.connected;
                }
                peak = peak.max(latest.iter().sum());
            }
            peak
        };
        let faults = o
            .faults
            .iter()
            .map(|f| {
                let after = |t: u64| {
                    (t > 0)
                        .then(|| caught_up(&timeline, o.workers, &o.ledger, t))
                        .flatten()
                        .map(|at| at.saturating_sub(t) as f64 / 1e9)
                };
                let recovery_s = after(f.lift_ns);
                let disruption_s = after(f.start_ns);
                let until = f.lift_ns + recovery_s.map_or(0, |d| (d * 1e9) as u64);
                FaultFigures {
                    name: f.name.clone(),
                    recovery_s,
                    disruption_s,
                    fewest_connected: fewest_connected(&timeline, o.workers, f.start_ns, until.max(f.end_ns)),
                    notes: f.notes.clone(),
                }
            })
            .collect();
        let acknowledged = o.ledger.iter().filter(|r| r.id.is_some()).count() as u64;
        let failures: Vec<String> = o.publish.failures.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let mut problems = o.problems.clone();
        if o.results.len() < o.workers {
            problems.push(format!("{} of {} workers reported", o.results.len(), o.workers));
        }
        if counts.never_connected > 0 {
            problems.push(format!("{} clients never got a stream", counts.never_connected));
        }
        let storm = storm_figures(p, o);
        if let Some(s) = &storm {
            problems.extend(storm_problems(s));
        }
        let drained: u64 = o.results.iter().map(|r| r.drained).sum();
        if drained < p.connections {
            problems.push(format!(
                "{} of {} clients did not reach the end barrier within {:?}",
                p.connections - drained,
                p.connections,
                p.drain
            ));
        }
        Report {
            profile: p.name,
            connections: p.connections,
            workers: o.workers,
            ready_connected: o.ready_connected,
            peak_connected,
            streams_opened: o.results.iter().map(|r| r.opened).sum(),
            failed_attempts: o.results.iter().map(|r| r.failed_attempts).sum(),
            first_error,
            drained,
            acknowledged,
            unacknowledged: o.ledger.len() as u64 - acknowledged,
            publish: failures.join(", "),
            publish_attempts: o.publish.attempts,
            retried: o.publish.retried,
            rejected: o.publish.rejected,
            via_stream: o.publish.via_stream,
            end: o.end,
            latency,
            latency_first_us,
            faults,
            silent: serde_json::to_value(&o.silent).unwrap_or_default(),
            stalled: serde_json::to_value(&o.stalled).unwrap_or_default(),
            problems,
            publish_s: o.publish_s,
            wall_s: o.wall_s,
            end_reasons: reasons.into_iter().collect(),
            counts,
            storm,
        }
    }

    /// Nothing lost, nothing twice, nothing misdelivered, and the run went through.
    pub fn passed(&self) -> bool {
        let c = &self.counts;
        c.lost == 0
            && c.duplicated == 0
            && c.out_of_order == 0
            && c.misrouted == 0
            && c.phantom == 0
            && c.id_mismatch == 0
            && self.problems.is_empty()
            && self.workers > 0
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency.quantile(q) as f64 / 1e6
    }

    pub fn human(&self, out: &Path) -> String {
        let c = &self.counts;
        let mut s = String::new();
        let _ = writeln!(s, "\n== ssegate chaos run ({}) ==", self.profile);
        let _ = writeln!(
            s,
            "connections: {} clients, {} holding a stream at start, peak {}; {} streams opened in all ({} failed attempts{})",
            self.connections,
            self.ready_connected,
            self.peak_connected,
            self.streams_opened,
            self.failed_attempts,
            if self.first_error.is_empty() { String::new() } else { format!(", first: {}", self.first_error) }
        );
        let _ = writeln!(
            s,
            "publishes: {} acknowledged, {} never acknowledged, {} attempts ({} publishes retried, {} via PublishStream, {} rejected) over {:.0} s; end barrier id {}",
            self.acknowledged,
            self.unacknowledged,
            self.publish_attempts,
            self.retried,
            self.via_stream,
            self.rejected,
            self.publish_s,
            self.end
        );
        if !self.publish.is_empty() {
            let _ = writeln!(s, "failed attempts by code: {}", self.publish);
        }
        let _ = writeln!(
            s,
            "deliveries: {} received, {} expected; LOST {}; DUPLICATED {} ({} after a ssegate.missed); out of order {}; misrouted {}; phantom {}; id mismatch {}",
            c.received,
            c.expected,
            c.lost,
            c.duplicated,
            c.duplicated_after_missed,
            c.out_of_order,
            c.misrouted,
            c.phantom,
            c.id_mismatch
        );
        let _ = writeln!(
            s,
            "ssegate.missed signals: {} (expired {}, unknown {}, other_epoch {}, stream_recreated {}, other {}), excusing {} events; unacknowledged but delivered: {}",
            c.missed(),
            c.missed_expired,
            c.missed_unknown,
            c.missed_other_epoch,
            c.missed_stream_recreated,
            c.missed_other,
            c.excused,
            c.unacked_delivered
        );
        if c.duplicated_across_epochs + c.lost_stream_copies > 0 {
            let _ = writeln!(
                s,
                "retried publishes stored in the lost stream and again in the new one: {} second copies, {} copies under the lost stream's id (not failures: the broker lost its duplicate window with its store)",
                c.duplicated_across_epochs, c.lost_stream_copies
            );
        }
        if let Some(st) = &self.storm {
            let o = &st.outcome;
            let _ = writeln!(
                s,
                "storm (replica-{}): {} clients lost it and reconnected at once, {} back, the last {} after the kill (bound {:.0} s); {} attempts, {} failed (closed without a response {}, refused {}, non-200 {}, timed out {}, other {}){}",
                o.replica,
                o.clients,
                o.back,
                st.reconnect_s.map_or("never".into(), |v| format!("{v:.2} s")),
                st.bound_s,
                o.attempts,
                o.failed(),
                o.closed_without_response,
                o.refused,
                o.non_200,
                o.timed_out,
                o.other_failures,
                if o.first_error.is_empty() { String::new() } else { format!("; first: {}", o.first_error) }
            );
        }
        let _ = writeln!(
            s,
            "latency (first publish attempt -> received, replays included): p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "latency of events acknowledged at the first attempt: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.latency_first_us.quantile(0.5) as f64 / 1e3,
            self.latency_first_us.quantile(0.99) as f64 / 1e3,
            self.latency_first_us.max() as f64 / 1e3
        );
        let _ = writeln!(s, "clients that reached the end barrier: {} of {}", self.drained, self.connections);
        let reasons: Vec<String> = self.end_reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "stream ends: {}", reasons.join(", "));
        let _ = writeln!(s, "faults:");
        for f in &self.faults {
            let show = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.2} s"));
            let _ = writeln!(
                s,
                "  - {}: recovery {} after lifting, disruption {} from injection, fewest clients connected {}",
                f.name,
                show(f.recovery_s),
                show(f.disruption_s),
                f.fewest_connected.map_or("?".into(), |n| n.to_string())
            );
            for n in &f.notes {
                let _ = writeln!(s, "      {n}");
            }
        }
        for p in &self.problems {
            let _ = writeln!(s, "PROBLEM: {p}");
        }
        let _ = writeln!(s, "logs, ledger and failing clients' histories: {}", out.display());
        let _ =
            writeln!(s, "verdict: {} (wall time {:.0} s)", if self.passed() { "PASS" } else { "FAIL" }, self.wall_s);
        s
    }

    pub fn json(&self) -> String {
        let c = &self.counts;
        let faults: Vec<serde_json::Value> = self
            .faults
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "recovery_s": f.recovery_s,
                    "disruption_s": f.disruption_s,
                    "fewest_connected": f.fewest_connected,
                    "notes": f.notes,
                })
            })
            .collect();
        let storm = self.storm.as_ref().map(|st| {
            json!({
                "replica": st.outcome.replica,
                "clients": st.outcome.clients,
                "back": st.outcome.back,
                "reconnect_s": st.reconnect_s,
                "bound_s": st.bound_s,
                "attempts": st.outcome.attempts,
                "failed": st.outcome.failed(),
                "closed_without_response": st.outcome.closed_without_response,
                "refused": st.outcome.refused,
                "non_200": st.outcome.non_200,
                "timed_out": st.outcome.timed_out,
                "first_error": st.outcome.first_error,
            })
        });
        let mut v = json!({
            "run": "chaos",
            "profile": self.profile,
            "passed": self.passed(),
            "connections": self.connections,
            "connections_held_at_start": self.ready_connected,
            "connections_held_peak": self.peak_connected,
            "streams_opened": self.streams_opened,
            "clients_reaching_end_barrier": self.drained,
            "acknowledged": self.acknowledged,
            "unacknowledged": self.unacknowledged,
            "publish_attempts": self.publish_attempts,
            "publishes_retried": self.retried,
            "publishes_via_stream": self.via_stream,
            "deliveries": c.received,
            "expected": c.expected,
            "lost": c.lost,
            "duplicated": c.duplicated,
            "duplicated_after_missed": c.duplicated_after_missed,
            "out_of_order": c.out_of_order,
            "misrouted": c.misrouted,
            "phantom": c.phantom,
            "id_mismatch": c.id_mismatch,
            "missed_signals": c.missed(),
            "missed_expired": c.missed_expired,
            "missed_unknown": c.missed_unknown,
            "missed_other_epoch": c.missed_other_epoch,
            "excused": c.excused,
            "unacked_delivered": c.unacked_delivered,
            "p50_latency_ms": self.ms(0.5),
            "p99_latency_ms": self.ms(0.99),
            "max_latency_ms": self.latency.max() as f64 / 1e6,
            "p99_latency_first_attempt_ms": self.latency_first_us.quantile(0.99) as f64 / 1e3,
            "faults": faults,
            "silent_sockets": self.silent,
            "stalled_h2": self.stalled,
            "problems": self.problems,
            "publish_s": self.publish_s,
            "wall_s": self.wall_s,
        });
        // Added apart: one `json!` with every field goes past the macro's recursion limit.
        v["missed_stream_recreated"] = json!(c.missed_stream_recreated);
        v["duplicated_across_epochs"] = json!(c.duplicated_across_epochs);
        v["lost_stream_copies"] = json!(c.lost_stream_copies);
        v["storm"] = storm.unwrap_or_default();
        v.to_string()
    }
}

/// The storm's outcome summed over the workers, timed from the storm fault's kill; `None` if
/// the run had no storm.
fn storm_figures(p: &Profile, o: &Outcome) -> Option<StormFigures> {
    let fault = o.faults.iter().find(|f| f.name == faults::STORM && f.start_ns > 0)?;
    let mut outcome = StormOutcome::default();
    for r in o.results.iter().filter_map(|r| r.storm.as_ref()) {
        outcome.add(r);
    }
    let reconnect_s = (outcome.back == outcome.clients && outcome.clients > 0)
        .then(|| outcome.last_back_ns.saturating_sub(fault.start_ns) as f64 / 1e9);
    Some(StormFigures { outcome, reconnect_s, bound_s: p.storm_bound.as_secs_f64() })
}

fn storm_problems(st: &StormFigures) -> Vec<String> {
    let o = &st.outcome;
    let mut problems = Vec::new();
    if o.clients == 0 {
        problems.push(format!("storm: no client had a stream on replica-{} when it was killed", o.replica));
    } else if o.back < o.clients {
        problems.push(format!(
            "storm: {} of {} clients of the killed replica never got a stream back",
            o.clients - o.back,
            o.clients
        ));
    }
    if let Some(r) = st.reconnect_s.filter(|r| *r > st.bound_s) {
        problems.push(format!(
            "storm: the last client was back {r:.2} s after the kill, over the bound of {:.0} s",
            st.bound_s
        ));
    }
    if o.failed() > 0 {
        problems.push(format!(
            "storm: {} of {} reconnection attempts were not admitted (closed without a response {}, refused {}, non-200 {}, timed out {}, other {}); first: {}",
            o.failed(),
            o.attempts,
            o.closed_without_response,
            o.refused,
            o.non_200,
            o.timed_out,
            o.other_failures,
            o.first_error
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ns: u64, connected: u64, min_seq: u64) -> StatLine {
        StatLine { ns, connected, min_id: Pos { epoch: 1, seq: min_seq }, opened: 0, events: 0 }
    }

    fn bcast(n: u64, sent_ns: u64, seq: Option<u64>) -> Record {
        Record {
            n,
            target: Target::Broadcast,
            id: seq.map(|seq| Pos { epoch: 1, seq }),
            others: Vec::new(),
            attempts: 1,
            sent_ns,
            acked_ns: 0,
        }
    }

    #[test]
    fn recovery_waits_for_every_worker_to_pass_the_probe() {
        let ledger = [bcast(1, 100, Some(5)), bcast(2, 200, None), bcast(3, 300, Some(9))];
        let timeline = [
            (0, stat(250, 1, 9)),
            (1, stat(260, 1, 5)),
            (0, stat(350, 1, 9)),
            (1, stat(400, 1, 9)),
            (1, stat(500, 0, 9)),
        ];
        assert_eq!(caught_up(&timeline, 2, &ledger, 150), Some(400), "probe = seq 9 (seq of n=2 unknown)");
        assert_eq!(caught_up(&timeline, 2, &ledger, 50), Some(260));
        assert_eq!(caught_up(&timeline, 2, &ledger, 301), None, "no probe after");
        assert_eq!(caught_up(&timeline, 3, &ledger, 150), None, "a worker never reported");
        assert_eq!(fewest_connected(&timeline, 2, 0, 1000), Some(1));
    }

    #[test]
    fn recovery_across_a_recreated_stream_compares_epochs_first() {
        let probe = Record { id: Some(Pos { epoch: 2, seq: 3 }), ..bcast(1, 100, None) };
        let at = |ns, epoch, seq| (0, StatLine { min_id: Pos { epoch, seq }, ..stat(ns, 1, 0) });
        let timeline = [at(200, 1, 900), at(300, 2, 2), at(400, 2, 3)];
        assert_eq!(caught_up(&timeline, 1, &[probe], 50), Some(400), "seq 900 of the lost stream is before it");
    }

    #[test]
    fn a_storm_fails_if_an_attempt_is_not_admitted_a_client_is_not_back_or_the_bound_is_passed() {
        let figures = |f: &dyn Fn(&mut StormOutcome), reconnect_s: Option<f64>| {
            let mut outcome = StormOutcome { clients: 200, back: 200, attempts: 200, ..StormOutcome::default() };
            f(&mut outcome);
            storm_problems(&StormFigures { outcome, reconnect_s, bound_s: 5.0 })
        };
        assert!(figures(&|_| {}, Some(0.4)).is_empty());
        let closed = figures(
            &|o| {
                o.attempts = 230;
                o.closed_without_response = 30;
                o.first_error = "closed before the response head".into();
            },
            Some(1.6),
        );
        assert!(closed.len() == 1 && closed[0].contains("30 of 230") && closed[0].contains("closed"), "{closed:?}");
        let late = figures(&|_| {}, Some(6.1));
        assert!(late.len() == 1 && late[0].contains("over the bound"), "{late:?}");
        let missing = figures(&|o| o.back = 150, None);
        assert!(missing.len() == 1 && missing[0].contains("50 of 200"), "{missing:?}");
        let none = figures(
            &|o| {
                o.clients = 0;
                o.back = 0;
            },
            None,
        );
        assert!(none.len() == 1 && none[0].contains("no client"), "{none:?}");
    }

    #[test]
    fn storm_outcomes_add_up_over_workers() {
        let mut sum = StormOutcome::default();
        let w = |first_end_ns, last_back_ns, closed| StormOutcome {
            replica: 0,
            clients: 10,
            back: 10,
            first_end_ns,
            last_back_ns,
            attempts: 10 + closed,
            closed_without_response: closed,
            ..StormOutcome::default()
        };
        sum.add(&w(500, 900, 0));
        sum.add(&w(400, 800, 2));
        sum.add(&w(0, 0, 0));
        assert_eq!(
            (sum.clients, sum.first_end_ns, sum.last_back_ns, sum.failed(), sum.attempts),
            (30, 400, 900, 2, 32)
        );
    }
}
