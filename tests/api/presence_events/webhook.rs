//! The presence webhook: batches, a retried 500, once each in order per user; in a cluster,
//! once from the replica responsible for the user.

use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use super::{closed, metric};
use crate::{
    broker::{Broker, replica},
    helpers::{SseClient, TestApp, deadline, spawn_app},
};

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

/// Each replica sends in order: once a marker user's event from each of the two replicas has
/// arrived, so has everything they sent before (a repeat of any transition included). Opens
/// marker users on `app` until both have sent one; returns their streams.
async fn until_both_sent(
    hook: &mut HookEndpoint,
    app: &TestApp,
    events: &mut Vec<(String, String, String)>,
) -> Vec<SseClient> {
    let markers_seen =
        |events: &[(String, String, String)]| events.iter().filter(|(_, u, _)| u.starts_with("marker")).count();
    let senders = |events: &[(String, String, String)]| -> std::collections::BTreeSet<String> {
        events
            .iter()
            .filter(|(_, u, _)| u.starts_with("marker"))
            .map(|(id, ..)| id.rsplit_once('-').unwrap().0.to_owned())
            .collect()
    };
    let mut markers = Vec::new();
    while senders(events).len() < 2 {
        assert!(markers.len() < 64, "no marker user ever landed on both replicas");
        let n = markers_seen(events);
        markers.push(app.subscribe(&format!("user=marker-{}", markers.len())).await);
        while markers_seen(events) == n {
            events.extend(hook.accepted(1).await);
        }
    }
    markers
}

/// Waits until both replicas hear each other (then they share the users).
async fn hear_each_other(a: &TestApp, b: &TestApp) {
    let end = deadline();
    while metric(a, "ssegate_presence_replicas").await < 2.0 || metric(b, "ssegate_presence_replicas").await < 2.0 {
        assert!(Instant::now() < end, "the replicas never heard each other");
        tokio::time::sleep(Duration::from_millis(50)).await;
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
async fn in_a_cluster_each_transition_reaches_the_webhook_once_from_the_replica_responsible_for_its_user() {
    let mut hook = HookEndpoint::start(0).await;
    let nats = Broker::start().await;
    let flags = ["--presence-webhook", &hook.url, "--presence-grace", "300ms", "--presence-webhook-delay", "20ms"];
    let (a, b) = (replica(&nats, &flags).await, replica(&nats, &flags).await);
    hear_each_other(&a, &b).await;
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
    let _markers = until_both_sent(&mut hook, &a, &mut events).await;
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
async fn a_replica_that_starts_does_not_repeat_to_the_webhook_the_users_already_online() {
    let mut hook = HookEndpoint::start(0).await;
    let nats = Broker::start().await;
    let url = hook.url.clone();
    let flags = ["--presence-webhook", &url, "--presence-webhook-delay", "20ms"];
    let a = replica(&nats, &flags).await;
    let users: Vec<String> = (0..16).map(|i| format!("user-{i}")).collect();
    let mut streams = Vec::new();
    for u in &users {
        streams.push(a.subscribe(&format!("user={u}")).await);
    }
    let mut events = hook.accepted(users.len()).await;
    // b learns them (a's whole set) as it starts: the cluster's state, not transitions.
    let b = replica(&nats, &flags).await;
    hear_each_other(&a, &b).await;
    let _markers = until_both_sent(&mut hook, &a, &mut events).await;
    for u in &users {
        assert_eq!(states(&events, u), ["online"], "{u}: told once: {events:?}");
    }
    drop(streams);
}
