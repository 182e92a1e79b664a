//! WatchPresence: a snapshot of who is online, then online/offline transitions with a grace,
//! ordered per user; a watcher that does not read is cut off, one that reads keeps up. On one
//! node here; across replicas on a real nats-server in `cluster.rs`; the webhook in
//! `webhook.rs`.

mod cluster;
mod webhook;

use std::{net::SocketAddr, time::Duration};

use ssegate::grpc::pb::{self, presence_event::State, publisher_client::PublisherClient};
use tokio::time::{Instant, timeout_at};
use tonic::{Code, Streaming, transport::Endpoint};

use crate::helpers::{SseClient, TestApp, deadline, spawn_app, spawn_app_with};

/// One `WatchPresence` call, read with deadlines.
pub struct Watcher {
    stream: Streaming<pb::PresenceEvent>,
}

impl Watcher {
    pub async fn open(app: &TestApp) -> Watcher {
        Watcher::with_client(app.client.clone()).await
    }

    async fn with_client(mut client: PublisherClient<tonic::transport::Channel>) -> Watcher {
        let stream = client.watch_presence(pb::WatchPresenceRequest {}).await.expect("watch_presence").into_inner();
        Watcher { stream }
    }

    /// The next message, failing the test at the deadline or if the stream ends.
    async fn message(&mut self) -> pb::PresenceEvent {
        match timeout_at(deadline(), self.stream.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => panic!("the watch ended"),
            Ok(Err(status)) => panic!("the watch failed: {status:?}"),
            Err(_) => panic!("no presence event within the deadline"),
        }
    }

    /// Reads the snapshot up to its marker: the users online, sorted.
    pub async fn snapshot(&mut self) -> Vec<String> {
        let mut users = Vec::new();
        loop {
            let m = self.message().await;
            if m.snapshot_complete {
                assert!(m.user_id.is_empty() && !m.snapshot, "the marker carries no user: {m:?}");
                return users;
            }
            assert!(m.snapshot && m.state == State::Online as i32, "a snapshot entry: {m:?}");
            users.push(m.user_id);
        }
    }

    /// The next live transition, as (user, "online" | "offline").
    pub async fn next(&mut self) -> (String, &'static str) {
        let m = self.message().await;
        assert!(!m.snapshot && !m.snapshot_complete, "a live transition: {m:?}");
        assert!(m.at_unix_ms > 0, "stamped: {m:?}");
        let state = match State::try_from(m.state) {
            Ok(State::Online) => "online",
            Ok(State::Offline) => "offline",
            other => panic!("a transition without a state: {other:?}"),
        };
        (m.user_id, state)
    }
}

fn t(user: &str, state: &'static str) -> (String, &'static str) {
    (user.to_owned(), state)
}

/// Waits until the server has noticed that `user`'s streams closed (their count is 0).
async fn closed(app: &TestApp, user: &str, stream: SseClient) {
    drop(stream);
    app.wait_connections(user, 0).await;
}

/// The value of a metric without labels on the admin port.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let (status, _, body) = crate::helpers::http_request(app.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    let prefix = format!("{name} ");
    let line = body.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{name} exported"));
    line[prefix.len()..].parse().unwrap()
}

#[tokio::test]
async fn a_watcher_gets_the_snapshot_then_online_at_once_and_offline_after_the_grace() {
    let grace = Duration::from_millis(300);
    let app = spawn_app(&["--presence-grace", "300ms"]).await;
    let _carol = app.subscribe("user=carol").await;
    let _dave = app.subscribe("user=dave").await;
    // The hub takes the router's changes on its own task: wait until it has them.
    let end = deadline();
    while metric(&app, "ssegate_presence_online_users").await < 2.0 {
        assert!(Instant::now() < end, "the hub never saw carol and dave");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut w = Watcher::open(&app).await;
    assert_eq!(w.snapshot().await, ["carol", "dave"]);

    let alice = app.subscribe("user=alice").await;
    assert_eq!(w.next().await, t("alice", "online"));
    let left = Instant::now();
    closed(&app, "alice", alice).await;
    assert_eq!(w.next().await, t("alice", "offline"));
    assert!(left.elapsed() >= grace, "offline only after the grace ({:?})", left.elapsed());

    // A watcher that comes now sees the same state as a snapshot.
    let mut late = Watcher::open(&app).await;
    assert_eq!(late.snapshot().await, ["carol", "dave"]);
}

#[tokio::test]
async fn a_second_stream_and_a_reconnect_within_the_grace_emit_nothing() {
    // Long enough that the reconnect below is surely inside it on a loaded machine.
    let app = spawn_app(&["--presence-grace", "2s"]).await;
    let mut w = Watcher::open(&app).await;
    assert!(w.snapshot().await.is_empty());
    let first = app.subscribe("user=alice").await;
    assert_eq!(w.next().await, t("alice", "online"));
    let second = app.subscribe("user=alice&topic=t").await;
    app.wait_connections("alice", 2).await;
    drop(first);
    app.wait_connections("alice", 1).await;
    closed(&app, "alice", second).await;
    let _back = app.subscribe("user=alice").await;
    app.wait_connections("alice", 1).await;

    // The marker: a user who comes and goes after alice's reconnect. Had alice's offline been
    // pending, it would come before the marker's, whose grace started later.
    let marker = app.subscribe("user=marker").await;
    assert_eq!(w.next().await, t("marker", "online"));
    closed(&app, "marker", marker).await;
    assert_eq!(w.next().await, t("marker", "offline"), "nothing about alice in between");
}

/// A channel of its own (so its connection's flow control is its own) with a small HTTP/2
/// stream window: a watcher that does not read stops the server's writes after ~1 KiB.
async fn small_window_client(grpc: SocketAddr) -> PublisherClient<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    PublisherClient::new(channel)
}

#[tokio::test]
async fn a_watcher_that_does_not_read_is_cut_off_while_a_reading_one_keeps_up() {
    let app = spawn_app(&["--presence-watcher-queue", "8", "--presence-grace", "30s"]).await;
    let mut stalled = Watcher::with_client(small_window_client(app.grpc).await).await;
    let mut reading = Watcher::with_client(small_window_client(app.grpc).await).await;
    assert!(stalled.snapshot().await.is_empty());
    assert!(reading.snapshot().await.is_empty());

    // 40 users with long ids (~270 bytes per event): far more than the stalled watcher's
    // window and queue hold.
    let users: Vec<String> = (0..40).map(|i| format!("{i:02}{}", "u".repeat(250))).collect();
    let mut streams = Vec::new();
    for u in &users {
        streams.push(app.subscribe(&format!("user={u}")).await);
        assert_eq!(reading.next().await, t(u, "online"), "the reading watcher keeps up");
    }

    // Now the stalled watcher reads: what was in flight, then the status that cut it off.
    let end = deadline();
    let mut got = 0;
    let status = loop {
        match timeout_at(end, stalled.stream.message()).await.expect("the cut-off arrives in time") {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the stream ended without a status after {got} events"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("watcher fell behind; reconnect for a fresh snapshot"), "{status:?}");
    assert!(got < users.len(), "cut off before it got everything ({got})");

    // The reading watcher is still served; a new watch starts from a full snapshot.
    let marker = app.subscribe("user=marker").await;
    assert_eq!(reading.next().await, t("marker", "online"));
    let mut again = Watcher::open(&app).await;
    assert_eq!(again.snapshot().await.len(), users.len() + 1);
    drop((marker, streams));
}

#[tokio::test]
async fn watching_presence_needs_an_api_key_like_every_publisher_call() {
    let dir = std::env::temp_dir().join(format!("ssegate-presence-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "key-alpha-0123456789abcdef\n").unwrap();
    let app = spawn_app_with(&["--insecure-dev-identity", "--publisher-api-keys-file", keys.to_str().unwrap()]).await;
    let err = app.client.clone().watch_presence(pb::WatchPresenceRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut req = tonic::Request::new(pb::WatchPresenceRequest {});
    req.metadata_mut().insert("authorization", "Bearer key-alpha-0123456789abcdef".parse().unwrap());
    let stream = app.client.clone().watch_presence(req).await.expect("a valid key watches").into_inner();
    assert!(Watcher { stream }.snapshot().await.is_empty());
}

#[tokio::test]
async fn a_watcher_outlives_the_idle_timeout_and_a_drain_ends_it_with_unavailable() {
    let mut app = spawn_app(&["--idle-timeout", "300ms"]).await;
    let mut w = Watcher::open(&app).await;
    assert!(w.snapshot().await.is_empty());
    // A timer is what is under test here: wait past it on purpose.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let _alice = app.subscribe("user=alice").await;
    assert_eq!(w.next().await, t("alice", "online"), "an open watch is never idle");

    // The drain ends the watch (it does not hold the shutdown for the grace).
    app.stop().await;
    let status = timeout_at(deadline(), w.stream.message()).await.expect("ended in time").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("reconnect"), "{status:?}");
}
