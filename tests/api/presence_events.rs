//! WatchPresence: a snapshot of who is online, then online/offline transitions with a grace,
//! ordered per user; a watcher that does not read is cut off, one that reads keeps up. On one
//! node here; across replicas on a real nats-server below.

use std::{net::SocketAddr, time::Duration};

use ssegate::grpc::pb::{self, presence_event::State, publisher_client::PublisherClient};
use tokio::time::{Instant, timeout_at};
use tonic::{Code, Streaming, transport::Endpoint};

use crate::{
    broker::{Broker, replica},
    helpers::{SseClient, TestApp, deadline, spawn_app, spawn_app_with, spawn_process},
};

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

#[tokio::test]
async fn a_watcher_gets_the_snapshot_then_online_at_once_and_offline_after_the_grace() {
    let grace = Duration::from_millis(300);
    let app = spawn_app(&["--presence-grace", "300ms"]).await;
    let _carol = app.subscribe("user=carol").await;
    let _dave = app.subscribe("user=dave").await;
    app.wait_connections("carol", 1).await;
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

/// Reads a watch until the users it knows online (its snapshot, then its transitions) are
/// exactly `want`: a replica learns the others' users shortly after it starts.
async fn converges(w: &mut Watcher, want: &[&str]) {
    let mut online: std::collections::BTreeSet<String> = w.snapshot().await.into_iter().collect();
    let want: std::collections::BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    while online != want {
        match w.next().await {
            (u, "online") => assert!(online.insert(u.clone()), "{u} online twice"),
            (u, _) => assert!(online.remove(&u), "{u} offline while not online"),
        }
    }
}

#[tokio::test]
async fn across_replicas_a_watcher_sees_each_users_first_stream_anywhere_and_last_one_after_the_grace() {
    let nats = Broker::start().await;
    let flags = ["--presence-grace", "1s"];
    let (a, b) = (replica(&nats, &flags).await, replica(&nats, &flags).await);
    let mut on_a = Watcher::open(&a).await;
    assert!(on_a.snapshot().await.is_empty());

    let bob_on_b = b.subscribe("user=bob").await;
    assert_eq!(on_a.next().await, t("bob", "online"), "a user of another replica");
    // bob moves from b to a (a page reload landing on another replica: the old stream closes
    // first, and for a moment bob has none anywhere): nothing.
    drop(bob_on_b);
    b.wait_connections("bob", 0).await;
    let bob_on_a = a.subscribe("user=bob").await;
    a.wait_connections("bob", 1).await;
    // The marker comes and goes on b after bob left b: had bob's offline been pending, it would
    // come before the marker's.
    let marker = b.subscribe("user=marker").await;
    assert_eq!(on_a.next().await, t("marker", "online"));
    drop(marker);
    assert_eq!(on_a.next().await, t("marker", "offline"), "nothing about bob in between");

    // A replica started now learns who is online on the others.
    let _carol_on_b = b.subscribe("user=carol").await;
    assert_eq!(on_a.next().await, t("carol", "online"));
    let c = replica(&nats, &flags).await;
    let mut on_c = Watcher::open(&c).await;
    converges(&mut on_c, &["bob", "carol"]).await;

    // bob leaves everywhere: offline, once, on every watcher, after the grace.
    let left = Instant::now();
    drop(bob_on_a);
    assert_eq!(on_a.next().await, t("bob", "offline"));
    assert!(left.elapsed() >= Duration::from_secs(1), "after the grace ({:?})", left.elapsed());
    assert_eq!(on_c.next().await, t("bob", "offline"));
}

#[tokio::test]
async fn the_users_of_a_replica_that_dies_go_offline_once_it_is_silent_and_the_grace_is_over() {
    let nats = Broker::start().await;
    let a = replica(&nats, &["--presence-grace", "300ms"]).await;
    let url = nats.url();
    let mut b = spawn_process(&["--backplane", "nats", "--nats-url", &url, "--presence-grace", "300ms"], &[]).await;
    let mut on_a = Watcher::open(&a).await;
    assert!(on_a.snapshot().await.is_empty());
    let dan = SseClient::connect(b.http, "/v1/events?user=dan", &[]).await;
    assert_eq!(dan.status, 200);
    assert_eq!(on_a.next().await, t("dan", "online"));

    b.child.kill().await.unwrap(); // SIGKILL: b says nothing more
    let killed = Instant::now();
    assert_eq!(on_a.next().await, t("dan", "offline"));
    // Silent for PEER_TTL (3 s, heard every second), then the grace.
    assert!(killed.elapsed() >= Duration::from_secs(2), "not before b was missed ({:?})", killed.elapsed());
    drop(dan);
}

/// A tiny webhook endpoint on a loopback port: answers the first `fail_first` POSTs 500 and
/// the rest 200, and hands over every body it received with the status it answered.
struct HookEndpoint {
    url: String,
    bodies: tokio::sync::mpsc::UnboundedReceiver<(u16, serde_json::Value)>,
}

impl HookEndpoint {
    async fn start(fail_first: usize) -> HookEndpoint {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/presence", listener.local_addr().unwrap());
        let (tx, bodies) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut served = 0;
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = Vec::new();
                // The head, then Content-Length bytes of body.
                let (head_end, len) = loop {
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break (0, 0);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        assert!(head.starts_with("post /hooks/presence http/1.1"), "{head}");
                        assert!(head.contains("content-type: application/json"), "{head}");
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .expect("a content-length");
                        break (i + 4, len);
                    }
                };
                if head_end == 0 {
                    continue;
                }
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body: serde_json::Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
                served += 1;
                let status = if served <= fail_first { 500 } else { 200 };
                let _ = tx.send((status, body));
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        });
        HookEndpoint { url, bodies }
    }

    /// The next body received, with the status it was answered.
    async fn next(&mut self) -> (u16, Vec<serde_json::Value>) {
        let (status, body) = timeout_at(deadline(), self.bodies.recv()).await.expect("a POST in time").unwrap();
        (status, body["events"].as_array().expect("events").clone())
    }

    /// Events of accepted POSTs until there are `n`, as (id, user, state); checks each `at`.
    async fn accepted(&mut self, n: usize) -> Vec<(String, String, String)> {
        let mut got = Vec::new();
        while got.len() < n {
            let (status, events) = self.next().await;
            if status != 200 {
                continue;
            }
            for e in events {
                let at = e["at"].as_str().unwrap();
                assert!(humantime::parse_rfc3339(at).is_ok(), "RFC 3339: {at}");
                let s = |k: &str| e[k].as_str().unwrap().to_owned();
                got.push((s("id"), s("user"), s("state")));
            }
        }
        got
    }
}

fn states(events: &[(String, String, String)], user: &str) -> Vec<String> {
    events.iter().filter(|(_, u, _)| u == user).map(|(_, _, s)| s.clone()).collect()
}

#[tokio::test]
async fn the_webhook_gets_the_transitions_in_batches_once_each_in_order_per_user_after_a_retried_500() {
    let mut hook = HookEndpoint::start(1).await;
    let app =
        spawn_app(&["--presence-webhook", &hook.url, "--presence-grace", "300ms", "--presence-webhook-delay", "50ms"])
            .await;
    let alice = app.subscribe("user=alice").await;
    let bob = app.subscribe("user=bob").await;
    // The first POST is answered 500; the same batch, with the same ids, comes again.
    let (status, first) = hook.next().await;
    assert_eq!(status, 500);
    let (status, retried) = hook.next().await;
    assert_eq!((status, &retried), (200, &first), "the retry repeats the batch");
    closed(&app, "alice", alice).await;
    closed(&app, "bob", bob).await;

    let mut events: Vec<(String, String, String)> = retried
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (s("id"), s("user"), s("state"))
        })
        .collect();
    let more = 4 - events.len();
    events.extend(hook.accepted(more).await);
    assert_eq!(states(&events, "alice"), ["online", "offline"]);
    assert_eq!(states(&events, "bob"), ["online", "offline"]);
    // Once each: the next accepted event is the marker's, nothing repeated before it.
    let _marker = app.subscribe("user=marker").await;
    let next = hook.accepted(1).await;
    assert_eq!((next[0].1.as_str(), next[0].2.as_str()), ("marker", "online"));
    events.extend(next);
    let mut ids: Vec<&str> = events.iter().map(|(id, ..)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "every event has its own id: {events:?}");
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

/// The value of a metric without labels on the admin port.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let (status, _, body) = crate::helpers::http_request(app.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    let prefix = format!("{name} ");
    let line = body.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{name} exported"));
    line[prefix.len()..].parse().unwrap()
}

#[tokio::test]
async fn in_a_cluster_each_transition_reaches_the_webhook_once_from_the_replica_responsible_for_its_user() {
    let mut hook = HookEndpoint::start(0).await;
    let nats = Broker::start().await;
    let flags = ["--presence-webhook", &hook.url, "--presence-grace", "300ms", "--presence-webhook-delay", "20ms"];
    let (a, b) = (replica(&nats, &flags).await, replica(&nats, &flags).await);
    // They share the users once each hears the other.
    let end = deadline();
    while metric(&a, "ssegate_presence_replicas").await < 2.0 || metric(&b, "ssegate_presence_replicas").await < 2.0 {
        assert!(Instant::now() < end, "the replicas never heard each other");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let users: Vec<String> = (0..16).map(|i| format!("user-{i}")).collect();
    let mut streams = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let on = if i % 2 == 0 { &a } else { &b };
        streams.push(on.subscribe(&format!("user={u}")).await);
    }
    for (u, s) in users.iter().zip(streams) {
        drop(s);
        a.wait_connections(u, 0).await;
    }
    let mut events = hook.accepted(2 * users.len()).await;
    // Each replica sends in order: once a marker from each has arrived, so has everything it
    // sent before (a repeat of any transition included).
    let senders = |events: &[(String, String, String)]| -> std::collections::BTreeSet<String> {
        events
            .iter()
            .filter(|(_, u, _)| u.starts_with("marker"))
            .map(|(id, ..)| id.rsplit_once('-').unwrap().0.to_owned())
            .collect()
    };
    let mut markers = Vec::new();
    while senders(&events).len() < 2 {
        assert!(markers.len() < 64, "no marker user ever landed on both replicas");
        markers.push(a.subscribe(&format!("user=marker-{}", markers.len())).await);
        let n = events.iter().filter(|(_, u, _)| u.starts_with("marker")).count();
        while events.iter().filter(|(_, u, _)| u.starts_with("marker")).count() == n {
            events.extend(hook.accepted(1).await);
        }
    }
    for u in &users {
        assert_eq!(states(&events, u), ["online", "offline"], "{u}: once each, in order: {events:?}");
    }
    let by: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|(_, u, _)| u.starts_with("user-"))
        .map(|(id, ..)| id.rsplit_once('-').unwrap().0)
        .collect();
    assert_eq!(by.len(), 2, "the users are shared between the replicas: {events:?}");
}

#[tokio::test]
async fn a_replica_that_stops_says_goodbye_so_its_users_grace_starts_at_once() {
    let nats = Broker::start().await;
    let flags = ["--presence-grace", "200ms"];
    let a = replica(&nats, &flags).await;
    let mut b = replica(&nats, &flags).await;
    let mut on_a = Watcher::open(&a).await;
    assert!(on_a.snapshot().await.is_empty());
    let _erin = b.subscribe("user=erin").await;
    assert_eq!(on_a.next().await, t("erin", "online"));
    b.stop().await;
    let stopped = Instant::now();
    assert_eq!(on_a.next().await, t("erin", "offline"));
    // Without the goodbye, a would wait for b's silence: 3 s after its last heartbeat (at most
    // a second before it stopped), checked every second.
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "the grace began at the goodbye ({:?})",
        stopped.elapsed()
    );
}
