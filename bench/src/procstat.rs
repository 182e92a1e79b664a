//! Server-side resource readings from `/proc`: resident memory and CPU time of a process and
//! its direct children (nginx's master and workers count as one server).

use std::fs;

/// Kernel clock ticks per second for `/proc/<pid>/stat` times (USER_HZ: 100 on Linux, fixed
/// by the ABI on every architecture we run on).
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Resident set, KiB (VmRSS), summed over the process and its children.
    pub rss_kib: u64,
    /// User + system CPU seconds, summed likewise (children that exited are not counted).
    pub cpu_seconds: f64,
    /// The system (kernel) part of `cpu_seconds`.
    pub sys_seconds: f64,
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `(parent pid, utime ticks, stime ticks)` from the text of `/proc/<pid>/stat`. The command
/// name (field 2) may contain spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat(stat: &str) -> Option<(u32, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime, stime))
}

/// Direct children of `pid`, found by scanning `/proc/*/stat`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .is_some_and(|(pp, ..)| pp == pid)
        })
        .collect()
}

fn one(pid: u32) -> Option<Usage> {
    let rss_kib = parse_vm_rss(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)?;
    let (_, user, sys) = parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(Usage {
        rss_kib,
        cpu_seconds: (user + sys) as f64 / TICKS_PER_SECOND,
        sys_seconds: sys as f64 / TICKS_PER_SECOND,
    })
}

/// Reads `pid` and its direct children; `None` if `pid` is gone.
pub fn read_tree(pid: u32) -> Option<Usage> {
    let mut total = one(pid)?;
    for c in children(pid) {
        if let Some(u) = one(c) {
            total.rss_kib += u.rss_kib;
            total.cpu_seconds += u.cpu_seconds;
            total.sys_seconds += u.sys_seconds;
        }
    }
    Some(total)
}

/// Reads one process (no children), e.g. a client worker.
pub fn read_one(pid: u32) -> Option<Usage> {
    one(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tssegate\nVmPeak:\t  9000 kB\nVmRSS:\t   51234 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(51_234));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        let stat = "4242 (tokio (rt) worker) S 4200 4242 4200 0 -1 4194560 1 0 0 0 250 70 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat(stat), Some((4200, 250, 70)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = read_tree(std::process::id()).unwrap();
        assert!(me.rss_kib > 0);
        assert!(read_one(std::process::id()).unwrap().rss_kib > 0);
    }
}
