//! The outcome of a run: derived figures (rates, percentiles, memory per connection), printed
//! as a table for people and as one JSON line for scripts.

use std::fmt::Write;

use crate::{histogram::Histogram, seqcheck::Counts};

/// Server resource readings at the three moments of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServerUsage {
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    /// Highest reading during the hold/publish phase and at its end.
    pub rss_peak_kib: u64,
    /// CPU seconds while the connections opened, and during the publish/hold phase.
    pub cpu_connect_s: f64,
    pub cpu_run_s: f64,
    /// The system (kernel) part of `cpu_run_s`.
    pub cpu_run_sys_s: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub label: String,
    pub target: String,
    pub requested: u64,
    pub established: u64,
    pub failed: u64,
    /// Of `failed`: refused at connect, closed (or reset) without a response, answered with
    /// another status than 200, no response head in time.
    pub refused: u64,
    pub closed_no_response: u64,
    pub non_200: u64,
    pub timed_out: u64,
    pub connect_error: String,
    pub connect_seconds: f64,
    pub closed_early: u64,
    /// The publish phase (or the idle hold), seconds.
    pub run_seconds: f64,
    pub rate: String,
    pub api: String,
    pub to: String,
    pub published: u64,
    pub publish_errors: u64,
    pub publish_error: String,
    pub counts: Counts,
    pub heartbeats: u64,
    /// From the first publish to the last event received, seconds.
    pub delivery_window_s: f64,
    pub latency_ns: Histogram,
    pub server: Option<ServerUsage>,
    pub client_cpu_s: f64,
    /// ssegate's own `events_dropped` counter (slow consumers cut off), when known.
    pub server_dropped: Option<u64>,
}

impl Report {
    /// Whether every requested connection was answered 200.
    pub fn all_admitted(&self) -> bool {
        self.established == self.requested
    }

    pub fn deliveries_per_s(&self) -> f64 {
        if self.delivery_window_s > 0.0 { self.counts.delivered as f64 / self.delivery_window_s } else { 0.0 }
    }

    pub fn publishes_per_s(&self) -> f64 {
        if self.run_seconds > 0.0 { self.published as f64 / self.run_seconds } else { 0.0 }
    }

    /// Server RSS added per established connection, KiB: from before connecting to the highest
    /// reading while holding them (so heartbeats' buffers count).
    pub fn rss_per_conn_kib(&self) -> Option<f64> {
        let s = self.server?;
        (self.established > 0).then(|| {
            s.rss_peak_kib.max(s.rss_connected_kib).saturating_sub(s.rss_before_kib) as f64 / self.established as f64
        })
    }

    /// Server CPU seconds (user, system) per million deliveries during the run.
    pub fn cpu_per_million(&self) -> Option<(f64, f64)> {
        let s = self.server?;
        let m = self.counts.delivered as f64 / 1e6;
        (m > 0.0).then(|| ((s.cpu_run_s - s.cpu_run_sys_s) / m, s.cpu_run_sys_s / m))
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency_ns.quantile(q) as f64 / 1e6
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let c = &self.counts;
        let _ = writeln!(s, "── ssegate-bench {} (target {}) ──", self.label, self.target);
        let _ = writeln!(
            s,
            "connections   {} of {} open (answered 200) in {:.1} s ({} failed{}), {} closed early",
            self.established,
            self.requested,
            self.connect_seconds,
            self.failed,
            if self.connect_error.is_empty() { String::new() } else { format!(": {}", self.connect_error) },
            self.closed_early
        );
        if !self.all_admitted() {
            let _ = writeln!(
                s,
                "NOT ADMITTED  {} of {}: {} refused at connect, {} closed without a response, {} answered non-200, {} without a response in time, {} other",
                self.requested - self.established,
                self.requested,
                self.refused,
                self.closed_no_response,
                self.non_200,
                self.timed_out,
                self.failed.saturating_sub(self.refused + self.closed_no_response + self.non_200 + self.timed_out)
            );
        }
        if self.published > 0 || self.publish_errors > 0 {
            let _ = writeln!(
                s,
                "published     {} to {} via {} at {} requested: {:.0}/s over {:.1} s, {} errors{}",
                self.published,
                self.to,
                self.api,
                self.rate,
                self.publishes_per_s(),
                self.run_seconds,
                self.publish_errors,
                if self.publish_error.is_empty() { String::new() } else { format!(" ({})", self.publish_error) }
            );
            let _ = writeln!(s, "deliveries    {} ({:.0}/s)", c.delivered, self.deliveries_per_s());
            let _ = writeln!(
                s,
                "latency ms    p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                self.ms(0.5),
                self.ms(0.99),
                self.ms(0.999),
                self.latency_ns.max() as f64 / 1e6
            );
        } else {
            let _ = writeln!(s, "held idle     {:.1} s, {} heartbeats received", self.run_seconds, self.heartbeats);
        }
        let _ = writeln!(
            s,
            "lost / dup    {} / {} (misrouted {}){}",
            c.lost,
            c.duplicated,
            c.unexpected,
            self.server_dropped.map(|d| format!(", server dropped {d}")).unwrap_or_default()
        );
        if let Some(u) = self.server {
            let _ = writeln!(
                s,
                "server RSS    {:.1} MiB before, {:.1} MiB connected, {:.1} MiB peak → {:.2} KiB per connection",
                u.rss_before_kib as f64 / 1024.0,
                u.rss_connected_kib as f64 / 1024.0,
                u.rss_peak_kib as f64 / 1024.0,
                self.rss_per_conn_kib().unwrap_or(0.0)
            );
            let _ = writeln!(
                s,
                "server CPU    {:.2} s connecting, {:.2} s during the run ({:.2} user + {:.2} system; {:.0} % of one core)",
                u.cpu_connect_s,
                u.cpu_run_s,
                u.cpu_run_s - u.cpu_run_sys_s,
                u.cpu_run_sys_s,
                percent(u.cpu_run_s, self.run_seconds)
            );
            if let Some((user, sys)) = self.cpu_per_million() {
                let _ = writeln!(
                    s,
                    "server CPU    {:.2} s per million deliveries ({user:.2} user + {sys:.2} system)",
                    user + sys
                );
            }
        }
        let _ = writeln!(
            s,
            "client CPU    {:.2} s during the run ({:.0} % of one core)",
            self.client_cpu_s,
            percent(self.client_cpu_s, self.run_seconds)
        );
        s
    }

    pub fn json(&self) -> String {
        let c = &self.counts;
        let mut j = Json::default();
        j.str("label", &self.label);
        j.str("target", &self.target);
        j.num("connections_requested", self.requested as f64, 0);
        j.num("connections", self.established as f64, 0);
        j.num("connections_failed", self.failed as f64, 0);
        j.num("connections_refused", self.refused as f64, 0);
        j.num("connections_closed_without_response", self.closed_no_response as f64, 0);
        j.num("connections_non_200", self.non_200 as f64, 0);
        j.num("connections_timed_out", self.timed_out as f64, 0);
        j.raw("all_admitted", if self.all_admitted() { "true" } else { "false" });
        j.num("connect_s", self.connect_seconds, 2);
        j.num("closed_early", self.closed_early as f64, 0);
        j.str("rate", &self.rate);
        j.str("api", &self.api);
        j.str("to", &self.to);
        j.num("run_s", self.run_seconds, 2);
        j.num("published", self.published as f64, 0);
        j.num("publishes_per_s", self.publishes_per_s(), 1);
        j.num("publish_errors", self.publish_errors as f64, 0);
        j.num("delivered", c.delivered as f64, 0);
        j.num("deliveries_per_s", self.deliveries_per_s(), 0);
        j.num("lost", c.lost as f64, 0);
        j.num("duplicated", c.duplicated as f64, 0);
        j.num("misrouted", c.unexpected as f64, 0);
        j.num("heartbeats", self.heartbeats as f64, 0);
        j.num("latency_samples", self.latency_ns.count() as f64, 0);
        j.num("latency_p50_ms", self.ms(0.5), 3);
        j.num("latency_p99_ms", self.ms(0.99), 3);
        j.num("latency_p999_ms", self.ms(0.999), 3);
        j.num("latency_max_ms", self.latency_ns.max() as f64 / 1e6, 3);
        match self.server {
            Some(u) => {
                j.num("server_rss_before_kib", u.rss_before_kib as f64, 0);
                j.num("server_rss_connected_kib", u.rss_connected_kib as f64, 0);
                j.num("server_rss_peak_kib", u.rss_peak_kib as f64, 0);
                j.num("server_rss_per_conn_kib", self.rss_per_conn_kib().unwrap_or(0.0), 3);
                j.num("server_cpu_connect_s", u.cpu_connect_s, 2);
                j.num("server_cpu_run_s", u.cpu_run_s, 2);
                j.num("server_cpu_run_user_s", u.cpu_run_s - u.cpu_run_sys_s, 2);
                j.num("server_cpu_run_sys_s", u.cpu_run_sys_s, 2);
                let (user, sys) = self.cpu_per_million().unwrap_or_default();
                j.num("server_cpu_user_s_per_m", user, 3);
                j.num("server_cpu_sys_s_per_m", sys, 3);
            }
            None => j.raw("server", "null"),
        }
        j.num("client_cpu_run_s", self.client_cpu_s, 2);
        match self.server_dropped {
            Some(d) => j.num("server_events_dropped", d as f64, 0),
            None => j.raw("server_events_dropped", "null"),
        }
        j.finish()
    }
}

fn percent(cpu: f64, wall: f64) -> f64 {
    if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 }
}

/// A flat JSON object writer. Strings here are labels, enum names and error texts; they are
/// escaped per RFC 8259 all the same.
#[derive(Default)]
struct Json(String);

impl Json {
    fn key(&mut self, k: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        let _ = write!(self.0, "\"{k}\":");
    }

    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        self.0.push('"');
        for ch in v.chars() {
            match ch {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                c if (c as u32) < 0x20 => _ = write!(self.0, "\\u{:04x}", c as u32),
                c => self.0.push(c),
            }
        }
        self.0.push('"');
    }

    fn num(&mut self, k: &str, v: f64, decimals: usize) {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.0, "{v:.decimals$}");
        } else {
            self.0.push_str("null");
        }
    }

    fn raw(&mut self, k: &str, v: &str) {
        self.key(k);
        self.0.push_str(v);
    }

    fn finish(mut self) -> String {
        if self.0.is_empty() {
            self.0.push('{');
        }
        self.0.push('}');
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut latency_ns = Histogram::default();
        for ms in 1..=100 {
            latency_ns.record(ms * 1_000_000);
        }
        Report {
            label: "fan\"out".into(),
            target: "ssegate".into(),
            requested: 1000,
            established: 1000,
            run_seconds: 10.0,
            published: 1000,
            counts: Counts { delivered: 1_000_000, ..Counts::default() },
            delivery_window_s: 10.0,
            latency_ns,
            server: Some(ServerUsage {
                rss_before_kib: 10_000,
                rss_connected_kib: 13_000,
                rss_peak_kib: 14_000,
                cpu_connect_s: 0.5,
                cpu_run_s: 5.0,
                cpu_run_sys_s: 2.0,
            }),
            ..Report::default()
        }
    }

    #[test]
    fn derived_figures() {
        let r = sample();
        assert_eq!(r.deliveries_per_s(), 100_000.0);
        assert_eq!(r.publishes_per_s(), 100.0);
        assert_eq!(r.rss_per_conn_kib(), Some(4.0), "peak minus before, per connection");
        assert_eq!(Report::default().rss_per_conn_kib(), None);
        assert_eq!(Report::default().deliveries_per_s(), 0.0);
    }

    #[test]
    fn json_line_is_flat_escaped_and_parseable() {
        let line = sample().json();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["label"], "fan\"out");
        assert_eq!(v["deliveries_per_s"], 100_000.0);
        assert_eq!(v["server_rss_per_conn_kib"], 4.0);
        let p99 = v["latency_p99_ms"].as_f64().unwrap();
        assert!((99.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(v["server_events_dropped"], serde_json::Value::Null);
        let none: serde_json::Value = serde_json::from_str(&Report::default().json()).unwrap();
        assert_eq!(none["server"], serde_json::Value::Null);
    }

    #[test]
    fn connections_not_admitted_are_counted_by_kind_and_stand_out() {
        let r = Report { established: 900, failed: 100, refused: 10, closed_no_response: 85, non_200: 5, ..sample() };
        assert!(!r.all_admitted() && sample().all_admitted());
        let t = r.human();
        assert!(
            t.contains(
                "NOT ADMITTED  100 of 1000: 10 refused at connect, 85 closed without a response, 5 answered non-200"
            ),
            "{t}"
        );
        assert!(!sample().human().contains("NOT ADMITTED"));
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(
            (v["connections_closed_without_response"].as_f64(), v["all_admitted"].as_bool()),
            (Some(85.0), Some(false))
        );
    }

    #[test]
    fn table_mentions_the_headline_figures() {
        let t = sample().human();
        assert!(t.contains("1000 of 1000 open"), "{t}");
        assert!(t.contains("(100000/s)"), "{t}");
        assert!(t.contains("4.00 KiB per connection"), "{t}");
    }
}
