//! Figures for the module's doc (ignored; run with
//! `cargo test --release --lib store::tests::bench -- --ignored --nocapture`): what one
//! fdatasync costs here, and what the log sustains with one appender and with many.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{TempDir, open};
use crate::store::{Options, SyncPolicy};

/// A typical event's size on the wire.
const RECORD: usize = 200;
/// How long each figure is measured.
const RUN: Duration = Duration::from_secs(3);

#[test]
#[ignore = "prints figures; run on purpose"]
fn measure() {
    let dir = TempDir::new("bench");
    println!("record {RECORD} B, {} s per figure", RUN.as_secs());

    // The floor: append 200 bytes to a file and fdatasync it, one at a time.
    let path = dir.path().join("raw");
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).expect("file");
    let (mut n, mut offset, start) = (0u64, 0u64, Instant::now());
    while start.elapsed() < RUN {
        file.write_all_at(&[1; RECORD], offset).expect("write");
        file.sync_data().expect("fdatasync");
        offset += RECORD as u64;
        n += 1;
    }
    let per = start.elapsed() / n as u32;
    println!("raw write+fdatasync: {n} in {:?}: {per:?} each, {:.0}/s", start.elapsed(), n as f64 / RUN.as_secs_f64());

    for threads in [1usize, 8, 64, 256] {
        run("Always", Options::default(), threads, &dir);
    }
    run("Every(10ms)", Options { sync: SyncPolicy::Every(Duration::from_millis(10)), ..Options::default() }, 8, &dir);
}

/// `threads` appenders, each appending (under a shared lock, as the router will) and waiting
/// for its ticket in a loop.
fn run(policy: &str, options: Options, threads: usize, parent: &TempDir) {
    let dir = parent.path().join(format!("{policy}-{threads}"));
    let (store, _) = open(&dir, options);
    let store = Arc::new(store);
    let next = Arc::new(Mutex::new(0u64));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                while start.elapsed() < RUN {
                    let began = Instant::now();
                    let ticket = {
                        let mut next = next.lock().expect("not poisoned");
                        *next += 1;
                        store.append(*next, 0, &[7; RECORD]).expect("append")
                    };
                    ticket.wait().expect("durable");
                    latencies.push(began.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers.into_iter().flat_map(|w| w.join().expect("worker")).collect();
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let stats = store.stats();
    let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
    println!(
        "{policy:>11}, {threads:>3} appenders: {:>7.0} appends/s, {:>5.1} per fdatasync ({} syncs), {:.1} MB/s, latency p50 {:?} p99 {:?}",
        stats.appends as f64 / elapsed.as_secs_f64(),
        stats.appends as f64 / stats.syncs.max(1) as f64,
        stats.syncs,
        stats.bytes_written as f64 / elapsed.as_secs_f64() / 1e6,
        at(0.5),
        at(0.99),
    );
}
