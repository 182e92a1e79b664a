//! `--data-dir` (issue 21) with the real binary: what a restart, clean (SIGTERM) or not
//! (`kill -9`), keeps: resumes by `Last-Event-ID`, retained values with their TTL, idempotency
//! keys; and the directory's lock.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use ssegate::grpc::pb::{self, publisher_client::PublisherClient};
use tokio::time::timeout_at;

use crate::helpers::{Process, SseClient, deadline, ev, spawn_process};

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
