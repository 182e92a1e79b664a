//! `--data-dir` (issue 21) with the real binary: what a restart, clean (SIGTERM) or not
//! (`kill -9`), keeps: resumes by `Last-Event-ID`, retained values with their TTL, idempotency
//! keys; and the directory's lock; segments removed past the replay bounds; a full disk; a
//! `kill -9` in the middle of a publish flood.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use ssegate::grpc::pb::{self, publisher_client::PublisherClient};
use tokio::time::timeout_at;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::helpers::{Process, SseClient, deadline, ev, http_request, spawn_process, spawn_process_under};

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("ssegate-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(dir: &TempDir) -> Process {
    spawn_process(&["--data-dir", dir.arg(), "--shutdown-grace", "2s"], &[]).await
}

/// Stops the process with SIGTERM (`clean`) or SIGKILL, and waits for it to exit.
async fn stop(server: &mut Process, clean: bool) {
    let pid = server.child.id().expect("running").to_string();
    let signal = if clean { "-TERM" } else { "-KILL" };
    assert!(std::process::Command::new("kill").args([signal, &pid]).status().unwrap().success());
    let status = timeout_at(deadline(), server.child.wait()).await.expect("exits in time").unwrap();
    if clean {
        assert!(status.success(), "a clean stop exits 0: {status}");
    }
}

/// Publishes `data` to user `u` (with an idempotency key and retain if given); returns the id.
async fn publish(server: &Process, data: &str, key: &str, retain: Option<pb::Retain>) -> pb::PublishResponse {
    let mut client = PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let req = pb::PublishRequest {
        user_ids: vec!["u".into()],
        event: Some(ev("", data)),
        idempotency_key: key.into(),
        retain,
    };
    client.publish(req).await.expect("acknowledged").into_inner()
}

async fn publish_named(server: &Process, name: &str, data: &str, retain: Option<pb::Retain>) {
    let mut client = PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let req = pb::PublishRequest {
        user_ids: vec!["u".into()],
        event: Some(ev(name, data)),
        idempotency_key: String::new(),
        retain,
    };
    client.publish(req).await.expect("acknowledged");
}

/// Every event a stream for `u` (resuming after `last_id`, if any) holds up to and including
/// the event whose data is `until` (published once the stream is open): (type, data, id).
async fn read_until(server: &Process, last_id: Option<&str>, until: &str) -> Vec<(String, String, String)> {
    let headers: Vec<(&str, &str)> = last_id.map(|id| ("Last-Event-ID", id)).into_iter().collect();
    let mut s = SseClient::connect(server.http, "/v1/events?user=u", &headers).await;
    assert_eq!(s.status, 200);
    s.cursor().await;
    publish(server, until, "", None).await;
    let mut seen = Vec::new();
    loop {
        let e = s.next_event().await;
        let done = e.data == until;
        seen.push((e.event_type, e.data, e.last_event_id));
        if done {
            return seen;
        }
    }
}

fn seq_of(id: &str) -> u64 {
    id.split_once('-').and_then(|(_, s)| s.parse().ok()).unwrap_or_else(|| panic!("not an event id: {id}"))
}

fn epoch_of(id: &str) -> &str {
    id.split_once('-').map(|(e, _)| e).unwrap_or_else(|| panic!("not an event id: {id}"))
}

#[tokio::test]
async fn a_client_resumes_across_a_clean_restart_and_a_kill_9_receiving_every_acknowledged_event_once_in_order() {
    let dir = TempDir::new("resume");
    let mut server = start(&dir).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for d in ["e1", "e2", "e3"] {
            ids.push(publish(&server, d, "", None).await.event_id);
        }
        ids
    };
    stop(&mut server, true).await;

    let mut server = start(&dir).await;
    // The client had seen e1: it gets e2, e3, then what is published after the restart.
    let got = read_until(&server, Some(&ids[0]), "e4").await;
    let data: Vec<&str> = got.iter().map(|(_, d, _)| d.as_str()).collect();
    assert_eq!(data, ["e2", "e3", "e4"], "every event after its id, once, in order: {got:?}");
    assert_eq!(got[0].2, ids[1], "the same ids after the restart");
    assert_eq!(seq_of(&got[2].2), seq_of(&ids[2]) + 1, "a clean stop continues the sequence");
    let e4 = got[2].2.clone();
    let e5 = publish(&server, "e5", "", None).await.event_id;
    stop(&mut server, false).await;

    let server = start(&dir).await;
    let got = read_until(&server, Some(&ids[2]), "e6").await;
    let data: Vec<&str> = got.iter().map(|(_, d, _)| d.as_str()).collect();
    assert_eq!(data, ["e4", "e5", "e6"], "acknowledged events survive kill -9: {got:?}");
    assert_eq!((got[0].2.as_str(), got[1].2.as_str()), (e4.as_str(), e5.as_str()));
    assert_eq!(epoch_of(&got[2].2), epoch_of(&ids[0]), "the epoch is the directory's");
    assert!(
        seq_of(&got[2].2) > seq_of(&e5) + (1 << 22),
        "after an unclean stop the sequence skips ids that may have reached browsers unstored: {got:?}"
    );
}

#[tokio::test]
async fn a_retained_value_and_its_ttl_survive_a_restart() {
    let dir = TempDir::new("retained");
    let mut server = start(&dir).await;
    let published = Instant::now();
    publish_named(&server, "badge", "7", Some(pb::Retain { ttl_seconds: 0, clear: false })).await;
    publish_named(&server, "toast", "brief", Some(pb::Retain { ttl_seconds: 4, clear: false })).await;
    stop(&mut server, true).await;

    let server = start(&dir).await;
    let retained = |got: &[(String, String, String)]| -> Vec<(String, String)> {
        got.iter().filter(|(_, d, _)| !d.starts_with("marker")).map(|(t, d, _)| (t.clone(), d.clone())).collect()
    };
    let fresh = read_until(&server, None, "marker-0").await;
    assert_eq!(
        retained(&fresh),
        [("badge".to_owned(), "7".to_owned()), ("toast".to_owned(), "brief".to_owned())],
        "a fresh stream after the restart gets the retained values"
    );
    // The TTL counts from the publish, not from the restart: the value goes at about 4 s.
    let mut round = 1;
    loop {
        let got = read_until(&server, None, &format!("marker-{round}")).await;
        if retained(&got) == [("badge".to_owned(), "7".to_owned())] {
            break;
        }
        assert!(published.elapsed() < Duration::from_secs(8), "the TTL was not kept across the restart: {got:?}");
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_retried_publish_after_a_restart_gets_the_first_id_and_is_not_delivered_twice() {
    let dir = TempDir::new("dedupe");
    let mut server = start(&dir).await;
    let first = publish(&server, "pay", "order-42", None).await;
    stop(&mut server, false).await;

    let server = start(&dir).await;
    let mut s = SseClient::connect(server.http, "/v1/events?user=u", &[("Last-Event-ID", &first.event_id)]).await;
    s.cursor().await;
    let retry = publish(&server, "pay", "order-42", None).await;
    assert_eq!(retry.event_id, first.event_id, "the retry gets the first publish's id");
    publish(&server, "after", "", None).await;
    assert_eq!(s.next_event().await.data, "after", "the retry was not delivered again");
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_exits_non_zero_naming_the_lock() {
    let dir = TempDir::new("lock");
    let _first = start(&dir).await;
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssegate"))
        .args(["serve", "--insecure-dev-identity", "--insecure-open-publish", "--data-dir", dir.arg()])
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = timeout_at(deadline(), second).await.expect("the second process exits").unwrap();
    assert!(!out.status.success(), "refused: {:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("LOCK") && stderr.contains("in use"), "the message names the lock: {stderr}");
}

/// The `*.log` segment files of `dir` and their total size.
fn segments(dir: &TempDir) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().ends_with(".log") {
            n += 1;
            bytes += entry.metadata().unwrap().len();
        }
    }
    (n, bytes)
}

/// Publishes `n` events of `size` bytes to user `u` from `tasks` concurrent publishers.
async fn flood(server: &Process, tasks: usize, n: usize, size: usize) {
    let per = n.div_ceil(tasks);
    let mut all = Vec::new();
    for t in 0..tasks {
        let addr = format!("http://{}", server.grpc);
        all.push(tokio::spawn(async move {
            let mut client = PublisherClient::connect(addr).await.unwrap();
            for i in 0..per {
                let mut data = format!("f{t}-{i}-");
                data.extend(std::iter::repeat_n('x', size.saturating_sub(data.len())));
                let req = pb::PublishRequest {
                    user_ids: vec!["u".into()],
                    event: Some(ev("", &data)),
                    idempotency_key: String::new(),
                    retain: None,
                };
                client.publish(req).await.expect("acknowledged");
            }
        }));
    }
    for task in all {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn segments_past_the_replay_bounds_are_removed_and_retained_values_keys_and_the_gap_outlive_them() {
    let dir = TempDir::new("compact");
    // A 1 MiB replay log: 1 MiB segments (the smallest).
    let flags = ["--data-dir", dir.arg(), "--replay-max-bytes", "1048576"];
    let mut server = spawn_process(&flags, &[]).await;
    let badge = Some(pb::Retain { ttl_seconds: 0, clear: false });
    let mut client = PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let req = || pb::PublishRequest {
        user_ids: vec!["u".into()],
        event: Some(ev("badge", "3")),
        idempotency_key: "badge-1".into(),
        retain: badge,
    };
    let first = client.publish(req()).await.unwrap().into_inner().event_id;
    // ~4.5 MB of records: four or five segments, of which the replay log needs the last ~1 MiB.
    flood(&server, 8, 4000, 1000).await;
    let end = deadline();
    loop {
        let (n, bytes) = segments(&dir);
        if n <= 2 {
            assert!(bytes <= 2 * 1024 * 1024 + 64 * 1024, "two segments at most: {bytes} bytes");
            break;
        }
        assert!(tokio::time::Instant::now() < end, "segments were not removed: {n} left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dir.0.join("state.ckpt").exists(), "the retained values and keys were checkpointed first");
    let last = publish(&server, "last", "", None).await.event_id;
    stop(&mut server, false).await;

    let server = spawn_process(&flags, &[]).await;
    let mut client = PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    // The badge's event is gone from the log, its value is not.
    let fresh = read_until(&server, None, "marker").await;
    assert_eq!(
        (fresh[0].0.as_str(), fresh[0].1.as_str()),
        ("badge", "3"),
        "the retained value came from the checkpoint: {:?}",
        &fresh[..1]
    );
    // Nor is its idempotency key.
    let retry = client.publish(req()).await.unwrap().into_inner().event_id;
    assert_eq!(retry, first, "the retry inside the window gets the first id");
    // A client whose id is older than the removed segments is told it missed events.
    let mut old = SseClient::connect(server.http, "/v1/events?user=u", &[("Last-Event-ID", &first)]).await;
    let missed = old.next_event().await;
    assert_eq!(missed.event_type, "ssegate.missed", "{missed:?}");
    // One whose id is still in the log resumes losslessly.
    let got = read_until(&server, Some(&last), "after").await;
    let data: Vec<&str> = got.iter().map(|(_, d, _)| d.as_str()).collect();
    assert_eq!(data, ["marker", "after"], "{got:?}");
}

/// `sh` ignoring `SIGXFSZ` (so a write past the limit fails with `EFBIG` instead of killing
/// the process), then `prlimit` capping the size of any file the server writes at `bytes` (a
/// soft limit: the test raises it later).
fn file_size_limit(bytes: &str) -> [&str; 4] {
    ["sh", "-c", r#"trap '' XFSZ; exec prlimit --fsize="$0":unlimited -- "$@""#, bytes]
}

async fn publisher_health(server: &Process) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc)).unwrap();
    let mut client = HealthClient::new(channel.connect().await.expect("health connects"));
    let req = HealthCheckRequest { service: "ssegate.v1.Publisher".into() };
    client.check(req).await.expect("health check").into_inner().status()
}

async fn wait_health(server: &Process, want: ServingStatus) {
    let end = deadline();
    loop {
        let got = publisher_health(server).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < end, "the publisher's health stayed {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(server: &Process, name: &str) -> f64 {
    let (status, _, body) = http_request(server.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    let line = body.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("{name} exported"));
    line[name.len() + 1..].parse().expect("a number")
}

#[tokio::test]
async fn a_full_disk_refuses_publishes_with_unavailable_reports_it_keeps_subscribers_and_loses_nothing_acknowledged() {
    let dir = TempDir::new("full");
    let mut server = spawn_process_under(&file_size_limit("200000"), &["--data-dir", dir.arg()], &[]).await;
    let mut sub = SseClient::connect(server.http, "/v1/events?user=u", &[]).await;
    sub.cursor().await;
    let mut client = PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let payload = "x".repeat(1000);
    let mut acked = Vec::new();
    let refused = loop {
        assert!(acked.len() < 1000, "a 200 kB file limit never refused a write");
        let data = format!("e{}-{payload}", acked.len());
        let req = pb::PublishRequest {
            user_ids: vec!["u".into()],
            event: Some(ev("", &data)),
            idempotency_key: String::new(),
            retain: None,
        };
        match client.publish(req).await {
            Ok(r) => acked.push((r.into_inner().event_id, data)),
            Err(status) => break status,
        }
    };
    assert!(acked.len() > 100, "the disk took events until it was full: {}", acked.len());
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("File too large") && refused.message().contains("not stored"), "{refused:?}");
    // Readiness reports it without taking the only replica out of service.
    let (status, _, body) = http_request(server.admin, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200, "subscribers are still served: {body}");
    assert!(body.starts_with("ready; publishes refused: data dir"), "{body}");
    assert_eq!(metric(&server, "ssegate_backplane_up").await, 0.0);
    wait_health(&server, ServingStatus::NotServing).await;
    // As large as the refused one: a smaller event may still fit in what is left of the file
    // once the store's pause after the failure is over (a slow machine gets there first).
    let again = client.publish(to_u(&format!("again-{payload}"))).await.expect_err("the disk is still full");
    assert_eq!(again.code(), tonic::Code::Unavailable, "{again:?}");
    // Subscribers keep streaming: the open one got every acknowledged event, a new one opens.
    for (id, data) in &acked {
        let e = sub.next_event().await;
        assert_eq!((&e.last_event_id, &e.data), (id, data));
    }
    let mut late = SseClient::connect(server.http, "/v1/events?user=u", &[]).await;
    assert_eq!(late.status, 200);
    late.cursor().await;

    // Room again: publishes are taken once the store's pause after a failure is over.
    let pid = server.child.id().expect("running").to_string();
    let raised = std::process::Command::new("prlimit").args(["--pid", &pid, "--fsize=unlimited:"]).status().unwrap();
    assert!(raised.success());
    let end = deadline();
    let after = loop {
        match client.publish(to_u("after")).await {
            Ok(r) => break r.into_inner().event_id,
            Err(e) => assert!(tokio::time::Instant::now() < end, "publishes never resumed: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_health(&server, ServingStatus::Serving).await;
    let (status, _, body) = http_request(server.admin, "GET", "/readyz", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert!(metric(&server, "ssegate_data_dir_write_failures_total").await >= 1.0);
    stop(&mut server, false).await;

    // Exactly the acknowledged events come back: none of the refused ones.
    let server = spawn_process(&["--data-dir", dir.arg()], &[]).await;
    let got = read_until(&server, Some(&acked[0].0), "marker").await;
    let want: Vec<(&str, &str)> =
        acked[1..].iter().map(|(id, d)| (id.as_str(), d.as_str())).chain([(after.as_str(), "after")]).collect();
    let got_pairs: Vec<(&str, &str)> = got.iter().map(|(_, d, id)| (id.as_str(), d.as_str())).collect();
    assert_eq!(
        &got_pairs[..got_pairs.len() - 1],
        &want[..],
        "every acknowledged event, once, in order, and nothing else"
    );
}

fn to_u(data: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        user_ids: vec!["u".into()],
        event: Some(ev("", data)),
        idempotency_key: String::new(),
        retain: None,
    }
}

#[tokio::test]
async fn a_kill_9_during_a_publish_flood_keeps_every_acknowledged_event() {
    let dir = TempDir::new("flood");
    let mut server = start(&dir).await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (addr, acked) = (format!("http://{}", server.grpc), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = PublisherClient::connect(addr).await.unwrap();
            // Bounded: the process is killed long before.
            for i in 0..100_000 {
                let data = format!("t{t}-{i}");
                match client.publish(to_u(&data)).await {
                    Ok(r) => acked.lock().unwrap().push((r.into_inner().event_id, data)),
                    Err(_) => return,
                }
            }
        }));
    }
    let end = deadline();
    while acked.lock().unwrap().len() < 500 {
        assert!(tokio::time::Instant::now() < end, "the flood did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop(&mut server, false).await;
    for t in tasks {
        t.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    let server = start(&dir).await;
    let from = format!("{}-0", epoch_of(&acked[0].0));
    let got = read_until(&server, Some(&from), "marker").await;
    let seqs: Vec<u64> = got.iter().map(|(_, _, id)| seq_of(id)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, each once");
    let stored: std::collections::HashMap<&str, &str> =
        got.iter().map(|(_, d, id)| (d.as_str(), id.as_str())).collect();
    for (id, data) in &acked {
        assert_eq!(stored.get(data.as_str()), Some(&id.as_str()), "acknowledged {data} ({id}) is there under its id");
    }
}

#[tokio::test]
async fn publish_streams_pipelining_small_items_against_the_data_dir_are_answered_in_order_and_not_dropped() {
    use pb::publish_stream_request::Target;
    use tokio_stream::StreamExt;
    let dir = TempDir::new("stream");
    // A subscriber queue that holds the whole burst (else it is cut off as a slow consumer).
    let flags = ["--data-dir", dir.arg(), "--queue-capacity", "30000", "--max-queue-bytes", "67108864"];
    let server = spawn_process(&flags, &[]).await;
    let mut u = SseClient::connect(server.http, "/v1/events?user=u", &[]).await;
    u.cursor().await;
    // Four streams on one connection, each keeping up to 1,024 small items unanswered, sent one
    // by one as they come (each in a DATA frame of its own: from a ready iterator the client
    // would pack many into one frame): the server must keep reading while items wait for their
    // fdatasync, or h2 drops the connection (ENHANCE_YOUR_CALM: too many small frames unread).
    let client = PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let mut streams = Vec::new();
    for s in 0..4 {
        let mut client = client.clone();
        streams.push(tokio::spawn(async move {
            let window = std::sync::Arc::new(tokio::sync::Semaphore::new(1024));
            let w = window.clone();
            let items = tokio_stream::iter(0..5000).then(move |i| {
                let w = w.clone();
                async move {
                    w.acquire().await.unwrap().forget();
                    tokio::task::yield_now().await;
                    pb::PublishStreamRequest {
                        target: Some(Target::Users(pb::UserTarget { user_ids: vec!["u".into()] })),
                        event: Some(ev("", &format!("{s}-{i}"))),
                        ..Default::default()
                    }
                }
            });
            let mut answers = client.publish_stream(items).await.unwrap().into_inner();
            let mut ids = Vec::new();
            while let Some(a) = answers.next().await {
                let a = a.expect("the stream is not dropped");
                window.add_permits(1);
                assert_eq!((a.index, a.code), (ids.len() as u64, 0), "{a:?}");
                ids.push(seq_of(&a.event_id));
            }
            assert_eq!(ids.len(), 5000);
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "a stream's items are numbered in its order");
            ids
        }));
    }
    let mut all = Vec::new();
    for s in streams {
        all.extend(s.await.unwrap());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 20_000, "each item got its own id");
    // Delivered in id order, each stream's items in its order.
    let mut next = [0usize; 4];
    for _ in 0..20_000 {
        let e = u.next_event().await;
        let (s, i) = e.data.split_once('-').unwrap();
        let s: usize = s.parse().unwrap();
        assert_eq!(i.parse::<usize>().unwrap(), next[s], "{}", e.data);
        next[s] += 1;
    }
}

#[tokio::test]
async fn history_lists_the_same_events_with_the_same_ids_after_a_kill_9() {
    let dir = TempDir::new("history");
    let mut server = start(&dir).await;
    let mut ids = Vec::new();
    for d in ["h1", "h2", "h3"] {
        ids.push(publish(&server, d, "", None).await.event_id);
    }
    stop(&mut server, false).await;

    let server = start(&dir).await;
    let mut client = PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let req = pb::HistoryRequest {
        target: Some(pb::history_request::Target::UserId("u".into())),
        limit: 2,
        before: String::new(),
    };
    let page = client.history(req.clone()).await.expect("history").into_inner();
    let got: Vec<_> = page.events.iter().map(|e| (e.id.as_str(), e.data.as_str())).collect();
    assert_eq!(got, [(ids[2].as_str(), "h3"), (ids[1].as_str(), "h2")], "restored from the data dir");
    let older = pb::HistoryRequest { before: page.next_before.clone(), ..req };
    let page = client.history(older).await.expect("history").into_inner();
    let got: Vec<_> = page.events.iter().map(|e| (e.id.as_str(), e.data.as_str())).collect();
    assert_eq!(got, [(ids[0].as_str(), "h1")]);
    assert!(page.next_before.is_empty() && !page.truncated, "{page:?}");
}
