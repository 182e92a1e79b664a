//! A full disk and `kill -9`, in child processes: this test binary run again on one ignored
//! helper test, which does nothing unless `CHILD_DIR` is set.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{TempDir, open, payload};
use crate::store::format::segment_name;
use crate::store::{Health, Options, REST_AFTER_FAILURE, Store, StoreError, Ticket};

/// The data directory a child helper works in.
const CHILD_DIR: &str = "SSEGATE_STORE_CHILD_DIR";
/// `EFBIG`: what a write past `RLIMIT_FSIZE` fails with once `SIGXFSZ` is ignored.
const EFBIG: i32 = 27;

/// Runs this test binary on the ignored helper `test`.
fn child(program: &str, leading: &[&str], test: &str, dir: &Path) -> Command {
    let exe = std::env::current_exe().expect("the test binary");
    let mut command = Command::new(program);
    command
        .args(leading)
        .arg(exe)
        .args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// The sequence numbers after `prefix` in a child's output (the first may share its line
/// with libtest's `test <name> ... `).
fn seqs(output: &str, prefix: &str) -> Vec<u64> {
    output.lines().filter_map(|l| l.rsplit_once(prefix)).filter_map(|(_, s)| s.trim().parse().ok()).collect()
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[test]
fn a_write_over_the_file_size_limit_fails_its_appends_and_writes_resume_once_the_limit_is_gone() {
    let dir = TempDir::new("efbig");
    // A 64 KiB soft limit on file size; SIGXFSZ ignored (kept across exec), so the write that
    // crosses it fails with EFBIG instead of killing the process.
    let script = r#"trap '' XFSZ; ulimit -S -f 128; exec "$0" "$@""#;
    let output = child("sh", &["-c", script], "store::tests::crash::write_failure_child", dir.path())
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {}\n{stdout}", output.status);
    let durable = seqs(&stdout, "durable ");
    let failed = seqs(&stdout, "failed ");
    assert!(stdout.contains("limit raised"), "{stdout}");
    assert!(failed.len() >= 16, "two batches of 8 failed: {stdout}");

    let (store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.cut_bytes, 0, "the failed batch was cut back, not left torn");
    let on_disk: Vec<u64> = recovered.records.iter().map(|r| r.seq).collect();
    assert_eq!(on_disk, durable, "exactly the acknowledged records are on disk");
    assert!(failed.iter().all(|s| !on_disk.contains(s)));
    let next = recovered.last_seq + 1;
    store.append(next, 1, b"after").expect("append").wait().expect("durable");
}

#[test]
#[ignore = "helper of the test above, run in a child process"]
fn write_failure_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let limits = std::fs::read_to_string("/proc/self/limits").expect("limits");
    assert!(limits.lines().any(|l| l.starts_with("Max file size") && l.contains("65536")), "{limits}");
    let (store, recovered) = Store::open(&dir, Options::default()).expect("open");
    let record = vec![b'x'; 1000];
    let mut seq = recovered.last_seq;
    // Batches of 8 (appended together, so written together) until one fails.
    let mut batch = |store: &Store| -> Vec<(u64, Result<(), StoreError>)> {
        // An append refused at once (the store rests after a failed write) fails like its write.
        let tickets: Vec<(u64, Result<Ticket, StoreError>)> = (0..8)
            .map(|_| {
                seq += 1;
                (seq, store.append(seq, 1, &record))
            })
            .collect();
        let outcomes: Vec<_> = tickets.into_iter().map(|(s, t)| (s, t.and_then(Ticket::wait))).collect();
        for (s, outcome) in &outcomes {
            say(&format!("{} {s}", if outcome.is_ok() { "durable" } else { "failed" }));
        }
        outcomes
    };
    let (mut failure, mut durable) = (None, 0);
    for _ in 0..100 {
        let outcomes = batch(&store);
        durable += outcomes.iter().filter(|(_, o)| o.is_ok()).count() as u64;
        if let Some((_, Err(e))) = outcomes.into_iter().find(|(_, o)| o.is_err()) {
            failure = Some(e);
            break;
        }
    }
    let failure = failure.expect("a write failed at the limit");
    assert_eq!(failure.raw_os_error(), Some(EFBIG), "{failure}");
    assert!(failure.to_string().contains(&*dir.to_string_lossy()), "names the file: {failure}");
    assert!(matches!(store.health(), Health::Degraded(_)), "{:?}", store.health());
    // Right after a failure, appends are refused without a write.
    let refused = batch(&store);
    assert!(refused.iter().all(|(_, o)| matches!(o, Err(StoreError::Resting { .. }))), "{refused:?}");
    let failures = store.stats().write_failures;
    // The file is still at its limit: once the rest is over the next batch is written, fails
    // again and is cut back again.
    std::thread::sleep(REST_AFTER_FAILURE);
    let again = batch(&store);
    assert!(again.iter().all(|(_, o)| matches!(o, Err(StoreError::Io { .. }))), "still over the limit: {again:?}");
    assert_eq!(store.stats().write_failures, failures + 1, "one write tried");
    // Nothing unacknowledged is left on disk (the write was partial: up to the limit).
    let segment = std::fs::metadata(Path::new(&dir).join(segment_name(1))).expect("segment").len();
    assert_eq!(segment, 32 + durable * (8 + 9 + 1000), "cut back to the last acknowledged record");

    let pid = std::process::id().to_string();
    let raised = Command::new("prlimit").args(["--pid", &pid, "--fsize=unlimited:"]).status().expect("run prlimit");
    assert!(raised.success(), "prlimit: {raised}");
    say("limit raised");
    std::thread::sleep(REST_AFTER_FAILURE);
    for _ in 0..4 {
        assert!(batch(&store).iter().all(|(_, o)| o.is_ok()), "appends work once there is room");
    }
    assert!(matches!(store.health(), Health::Ok), "{:?}", store.health());
}

#[test]
fn a_kill_9_mid_flood_loses_no_acknowledged_record() {
    let dir = TempDir::new("kill9");
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = child(&exe.to_string_lossy(), &[], "store::tests::crash::kill_9_child", dir.path())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().expect("piped");
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Let it acknowledge a few thousand records, then kill it while it floods.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut output = String::new();
    let mut acknowledged = 0;
    while acknowledged < 3000 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = received.recv_timeout(left).expect("the child acknowledges records in time");
        acknowledged += usize::from(line.contains("durable "));
        output.push_str(&line);
        output.push('\n');
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    // What it printed before dying was acknowledged too.
    reader.join().expect("reader");
    for line in received.try_iter() {
        output.push_str(&line);
        output.push('\n');
    }
    let durable = seqs(&output, "durable ");
    let newest = durable.iter().copied().max().expect("some acknowledged");

    let (_store, recovered) = open(dir.path(), Options::default());
    let on_disk: Vec<u64> = recovered.records.iter().map(|r| r.seq).collect();
    let last = *on_disk.last().expect("records");
    assert!(last >= newest, "acknowledged {newest}, on disk up to {last}");
    assert_eq!(on_disk, (1..=last).collect::<Vec<_>>(), "in order, no gap");
    for record in &recovered.records {
        assert_eq!(record.bytes, payload(record.seq), "record {} intact", record.seq);
    }
    println!("killed after {} acknowledged (newest {newest}); {last} on disk", durable.len());
}

#[test]
#[ignore = "helper of the test above, run in a child process"]
fn kill_9_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let (store, _) = Store::open(&dir, Options::default()).expect("open");
    let store = Arc::new(store);
    let next = Arc::new(Mutex::new(0u64));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            std::thread::spawn(move || {
                // Bounded: the parent kills it long before.
                for _ in 0..1_000_000 {
                    let (seq, ticket) = {
                        let mut next = next.lock().expect("not poisoned");
                        *next += 1;
                        (*next, store.append(*next, *next as u8, &payload(*next)).expect("append"))
                    };
                    ticket.wait().expect("durable");
                    say(&format!("durable {seq}"));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("appender");
    }
}
