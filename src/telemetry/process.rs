//! Process metrics (memory, CPU, file descriptors) in the names Prometheus clients share, read
//! from `/proc/self` at scrape time. Hand-written: prometheus-client has no process collector,
//! and what we need is four numbers from two files.

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::collector::single;

#[derive(Debug)]
pub struct ProcessCollector;

/// Clock ticks per second for `/proc/self/stat` times. Linux has used 100 on every
/// architecture we ship for (`USER_HZ`), and reading it would need `sysconf` (unsafe FFI).
const TICKS_PER_SECOND: f64 = 100.0;

struct Sample {
    rss_bytes: f64,
    cpu_seconds: f64,
    open_fds: f64,
    max_fds: Option<f64>,
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after `) `.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    Some(Sample { rss_bytes: rss_kib * 1024.0, cpu_seconds: ticks / TICKS_PER_SECOND, open_fds, max_fds })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = sample() else { return Ok(()) };
        use MetricType::{Counter, Gauge};
        single(&mut enc, "process_resident_memory_bytes", "Resident set size", Gauge, s.rss_bytes)?;
        single(&mut enc, "process_cpu_seconds", "User and system CPU time", Counter, s.cpu_seconds)?;
        single(&mut enc, "process_open_fds", "Open file descriptors", Gauge, s.open_fds)?;
        if let Some(max) = s.max_fds {
            single(&mut enc, "process_max_fds", "Limit of open file descriptors", Gauge, max)?;
        }
        Ok(())
    }
}
