//! Tests of the durable log: round trips, torn tails, the lock, group commit, segment removal,
//! checkpoints (here); a full disk and `kill -9` in child processes (`crash.rs`); figures
//! (`bench.rs`, ignored).

mod bench;
mod crash;

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::format::segment_name;
use super::*;

/// A directory under the system's temporary directory, removed when dropped.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ssegate-store-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(super) fn open(dir: &Path, options: Options) -> (Store, Recovered) {
    Store::open(dir, options).expect("open the store")
}

pub(super) fn payload(seq: u64) -> Vec<u8> {
    format!("event {seq} ").repeat((seq % 7) as usize).into_bytes()
}

/// Appends `seqs` with `payload(seq)` (kind = seq % 256), all in flight at once, and waits.
fn append_all(store: &Store, seqs: impl IntoIterator<Item = u64>) {
    let tickets: Vec<_> = seqs.into_iter().map(|s| store.append(s, s as u8, &payload(s)).expect("append")).collect();
    for ticket in tickets {
        ticket.wait().expect("durable");
    }
}

fn expected(seqs: impl IntoIterator<Item = u64>) -> Vec<Record> {
    seqs.into_iter().map(|seq| Record { seq, kind: seq as u8, bytes: payload(seq) }).collect()
}

/// The segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<u64> {
    recover::list_segments(dir).expect("list segments")
}

fn small_segments() -> Options {
    Options { segment_bytes: 4096, ..Options::default() }
}

#[test]
fn records_survive_a_reopen_with_their_epoch_and_sequence() {
    let dir = TempDir::new("roundtrip");
    let (store, recovered) = open(dir.path(), Options::default());
    assert!(recovered.created && recovered.records.is_empty() && recovered.last_seq == 0);
    let epoch = recovered.epoch;
    assert_ne!(epoch, 0);
    append_all(&store, 1..=100);
    assert_eq!(store.stats().appends, 100);
    drop(store);

    let (store, recovered) = open(dir.path(), Options::default());
    assert!(!recovered.created);
    assert_eq!(recovered.epoch, epoch, "the epoch is kept");
    assert_eq!(recovered.last_seq, 100, "the sequence is kept");
    assert_eq!(recovered.cut_bytes, 0);
    assert_eq!(recovered.records, expected(1..=100));
    assert!(matches!(store.append(100, 0, b"again"), Err(StoreError::OutOfOrder { seq: 100, last: 100 })));
    // Gaps are allowed: a sequence number whose write failed is not reused.
    append_all(&store, [105]);
    drop(store);
    let (_store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records.last(), expected([105]).last());
    assert_eq!(recovered.last_seq, 105);
}

#[test]
fn a_record_cut_short_at_the_tail_is_cut_off_at_open_and_appends_continue() {
    let dir = TempDir::new("torn");
    let (store, _) = open(dir.path(), Options::default());
    append_all(&store, 1..=10);
    drop(store);
    let path = dir.path().join(segment_name(1));
    let len = fs::metadata(&path).expect("segment").len();
    OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(len - 3)).expect("cut the file");

    let (store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected(1..=9));
    assert_eq!(recovered.last_seq, 9);
    assert_eq!(recovered.cut_bytes, (8 + 9 + payload(10).len() - 3) as u64);
    append_all(&store, 10..=12);
    drop(store);
    let (_store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected(1..=12));
    assert_eq!(recovered.cut_bytes, 0);
}

#[test]
fn a_flipped_byte_in_the_last_segment_cuts_the_log_there() {
    let dir = TempDir::new("flip");
    let (store, _) = open(dir.path(), Options::default());
    append_all(&store, 1..=10);
    drop(store);
    let path = dir.path().join(segment_name(1));
    let mut bytes = fs::read(&path).expect("segment");
    // The 8th record's payload: header, then records 1..=7.
    let offset = 32 + (1..=7).map(|s| 8 + 9 + payload(s).len()).sum::<usize>() + 8 + 3;
    bytes[offset] ^= 0x01;
    fs::write(&path, &bytes).expect("write back");

    let (store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected(1..=7));
    append_all(&store, [8]);
    drop(store);
    let (_store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected(1..=8));
}

#[test]
fn a_bad_record_before_the_last_segment_is_refused_not_cut() {
    let dir = TempDir::new("corrupt");
    let (store, _) = open(dir.path(), small_segments());
    append_all(&store, 1..=200);
    drop(store);
    let firsts = segments(dir.path());
    assert!(firsts.len() >= 3, "small segments roll: {firsts:?}");
    let path = dir.path().join(segment_name(firsts[0]));
    let mut bytes = fs::read(&path).expect("segment");
    bytes[40] ^= 0x01;
    fs::write(&path, &bytes).expect("write back");

    let error = Store::open(dir.path(), small_segments()).err().expect("refused");
    assert!(matches!(&error, StoreError::Corrupt { path: p, offset: 32, .. } if *p == path), "{error}");
    assert!(error.to_string().contains(&segment_name(firsts[0])), "{error}");
}

#[test]
fn a_torn_segment_header_is_reset_and_the_sequence_kept() {
    let dir = TempDir::new("header");
    let (store, _) = open(dir.path(), Options::default());
    append_all(&store, 1..=3);
    drop(store);
    // A crash while segment 8 was being created (its records were never acknowledged).
    fs::write(dir.path().join(segment_name(8)), b"SSEGLOG\0\x01").expect("torn header");

    let (store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected(1..=3));
    assert_eq!(recovered.last_seq, 7, "the segment's name keeps where the sequence stood");
    assert!(matches!(store.append(7, 0, b""), Err(StoreError::OutOfOrder { .. })));
    append_all(&store, [8, 9]);
    drop(store);
    let (_store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected([1, 2, 3, 8, 9]));
}

#[test]
fn a_second_open_of_the_same_dir_is_refused_until_the_first_is_dropped() {
    let dir = TempDir::new("lock");
    let (store, _) = open(dir.path(), Options::default());
    let error = Store::open(dir.path(), Options::default()).err().expect("second open refused");
    assert!(matches!(&error, StoreError::Locked { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&dir.path().display().to_string()) && message.contains("another ssegate"), "{message}");
    drop(store);
    let (_store, recovered) = open(dir.path(), Options::default());
    assert!(!recovered.created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_appends_share_fsyncs_and_all_survive_a_reopen() {
    let dir = TempDir::new("group");
    let (store, _) = open(dir.path(), Options::default());
    let store = Arc::new(store);
    // The caller's critical section: sequence numbers are appended in order.
    let next = Arc::new(Mutex::new(0u64));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                let (seq, ticket) = {
                    let mut next = next.lock().expect("not poisoned");
                    *next += 1;
                    (*next, store.append(*next, *next as u8, &payload(*next)).expect("append"))
                };
                ticket.await.map(|()| seq)
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for task in tasks {
        let done = tokio::time::timeout_at(deadline, task).await.expect("every ticket completes in time");
        done.expect("task").expect("durable");
    }
    let stats = store.stats();
    assert_eq!(stats.appends, 1000);
    assert!(stats.syncs < 1000, "appends share fdatasyncs: {stats:?}");
    assert_eq!(stats.syncs, stats.batches);
    println!("1000 concurrent appends: {stats:?}");
    drop(store);

    let (_store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected(1..=1000));
}

#[test]
fn remove_before_deletes_only_whole_old_segments() {
    let dir = TempDir::new("remove");
    let (store, _) = open(dir.path(), small_segments());
    append_all(&store, 1..=300);
    let firsts = segments(dir.path());
    assert!(firsts.len() >= 4, "{firsts:?}");
    // A bound inside the third segment: the first two go, the third stays (it holds records
    // at and above the bound as well as below).
    let bound = firsts[2] + 1;
    assert_eq!(store.remove_before(bound).expect("remove"), 2);
    assert_eq!(segments(dir.path()), firsts[2..]);
    assert_eq!(store.remove_before(bound).expect("again"), 0);
    drop(store);

    let (store, recovered) = open(dir.path(), small_segments());
    assert_eq!(recovered.records, expected(firsts[2]..=300));
    // Past every record: all but the active segment go, and the sequence is kept.
    let removed = store.remove_before(u64::MAX).expect("remove");
    assert_eq!(removed, firsts.len() - 3);
    assert_eq!(segments(dir.path()), [*firsts.last().expect("a segment")]);
    drop(store);
    let (_store, recovered) = open(dir.path(), small_segments());
    assert_eq!(recovered.last_seq, 300);
    assert_eq!(recovered.records, expected(*firsts.last().expect("a segment")..=300));
}

#[test]
fn checkpoints_are_replaced_whole_and_checked() {
    let dir = TempDir::new("checkpoint");
    let (store, _) = open(dir.path(), Options::default());
    assert_eq!(store.read_checkpoint("retained").expect("read"), None);
    store.write_checkpoint("retained", b"first").expect("write");
    store.write_checkpoint("retained", b"second").expect("replace");
    store.write_checkpoint("idem-keys_2", b"").expect("empty");
    assert_eq!(store.read_checkpoint("retained").expect("read").as_deref(), Some(&b"second"[..]));
    assert_eq!(store.read_checkpoint("idem-keys_2").expect("read").as_deref(), Some(&b""[..]));
    for bad in ["", "Retained", "a/b", "../x", &"x".repeat(65)] {
        assert!(matches!(store.write_checkpoint(bad, b"x"), Err(StoreError::BadName(_))), "{bad:?}");
    }
    drop(store);

    // A crash mid-write leaves a temporary file: removed at open, the checkpoint intact.
    fs::write(dir.path().join("retained.ckpt.tmp"), b"half").expect("leftover");
    let path = dir.path().join("idem-keys_2.ckpt");
    let mut bytes = fs::read(&path).expect("checkpoint");
    bytes.push(0);
    fs::write(&path, &bytes).expect("damage");
    let (store, _) = open(dir.path(), Options::default());
    assert!(!dir.path().join("retained.ckpt.tmp").exists());
    assert_eq!(store.read_checkpoint("retained").expect("read").as_deref(), Some(&b"second"[..]));
    let error = store.read_checkpoint("idem-keys_2").expect_err("damaged");
    assert!(matches!(&error, StoreError::Corrupt { path: p, .. } if *p == path), "{error}");
}

#[test]
fn appends_out_of_order_or_over_the_size_limit_are_refused() {
    let dir = TempDir::new("refuse");
    let (store, _) = open(dir.path(), Options::default());
    assert!(matches!(store.append(0, 0, b""), Err(StoreError::OutOfOrder { .. })));
    append_all(&store, [5]);
    assert!(matches!(store.append(5, 0, b""), Err(StoreError::OutOfOrder { seq: 5, last: 5 })));
    assert!(matches!(store.append(4, 0, b""), Err(StoreError::OutOfOrder { .. })));
    let huge = vec![0u8; MAX_RECORD_BYTES + 1];
    assert!(matches!(store.append(6, 0, &huge), Err(StoreError::TooLarge { .. })));
    append_all(&store, [6]);
}

#[test]
fn pending_appends_are_bounded_and_written_once_a_ticket_is_polled() {
    let dir = TempDir::new("backlog");
    let options = Options { max_pending_bytes: 10_000, ..Options::default() };
    let (store, _) = open(dir.path(), options);
    // The committer writes whatever is pending when it first looks, unasked: wait until it is
    // waiting for a kick (a loaded machine may start its thread after the appends below).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.shared.idle.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the committer never went idle");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nothing polls these tickets yet, so nothing wakes the writer: they pile up.
    let mut tickets = Vec::new();
    let refused = loop {
        let seq = tickets.len() as u64 + 1;
        match store.append(seq, 0, &[7; 1000]) {
            Ok(ticket) => tickets.push(ticket),
            Err(error) => break error,
        }
        assert!(tickets.len() < 100, "never refused");
    };
    assert!(matches!(refused, StoreError::Backlogged { max: 10_000, .. }), "{refused}");
    assert_eq!(store.stats().batches, 0);
    let count = tickets.len() as u64;
    for ticket in tickets {
        ticket.wait().expect("durable");
    }
    assert_eq!(store.stats().batches, 1, "one batch, one fdatasync");
    store.append(count + 1, 0, &[7; 1000]).expect("room again").wait().expect("durable");
}

#[test]
fn every_policy_acknowledges_after_the_write_and_syncs_on_its_timer() {
    let dir = TempDir::new("every");
    let options = Options { sync: SyncPolicy::Every(Duration::from_millis(500)), ..Options::default() };
    let (store, _) = open(dir.path(), options.clone());
    append_all(&store, 1..=50);
    assert_eq!(store.stats().syncs, 0, "acknowledged before any fdatasync");
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().syncs == 0 {
        assert!(Instant::now() < deadline, "the timer never synced");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(store);
    let (_store, recovered) = open(dir.path(), options);
    assert_eq!(recovered.records, expected(1..=50));
}

#[test]
fn dropping_the_store_writes_what_is_pending() {
    let dir = TempDir::new("drop");
    let (store, _) = open(dir.path(), Options::default());
    let tickets: Vec<_> = (1..=20).map(|s| store.append(s, s as u8, &payload(s)).expect("append")).collect();
    drop(store);
    for ticket in tickets {
        ticket.wait().expect("written at close");
    }
    let (_store, recovered) = open(dir.path(), Options::default());
    assert_eq!(recovered.records, expected(1..=20));
}

/// Async appenders, each waiting for its ticket before the next append (as publishers do),
/// on a runtime with fewer threads than appenders: every ticket completes.
#[test]
fn sequential_async_appenders_never_wait_forever() {
    let dir = TempDir::new("async");
    let (store, _) = open(dir.path(), Options::default());
    let store = Arc::new(store);
    let seq = Arc::new(Mutex::new(0u64));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (store, seq) = (store.clone(), seq.clone());
                tokio::spawn(async move {
                    for _ in 0..3000 {
                        let ticket = {
                            let mut s = seq.lock().unwrap();
                            *s += 1;
                            store.append(*s, 1, b"x").unwrap()
                        };
                        tokio::time::timeout(Duration::from_secs(5), ticket)
                            .await
                            .expect("a ticket completes")
                            .expect("stored");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}
