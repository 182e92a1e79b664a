//! Resuming with `Last-Event-ID`: a client that comes back gets exactly what it missed, then
//! live events; when the replay log cannot tell, it is told with `ssegate.missed`.

use ssegate::{event_stream::parse::Item, grpc::pb};

use crate::helpers::{SseClient, ev, spawn_app};

#[tokio::test]
async fn a_reconnect_gets_exactly_its_own_missed_events_in_order_then_live_ones() {
    let app = spawn_app(&[]).await;
    let query = "user=a&group=g&topic=t";
    let mut c = app.subscribe(query).await;
    app.publish_users(&["a"], "", "seen").await;
    assert_eq!(c.next_event().await.data, "seen");
    let last = c.last_event_id();
    drop(c);
    app.wait_connections("a", 0).await;

    // Missed while away: its own (user a, group g, topic t, broadcasts) and others'.
    app.publish_users(&["a", "b"], "", "1 user a").await;
    app.publish_users(&["b"], "", "x user b").await;
    app.publish_group("g", "2 group g").await;
    app.publish_group("h", "x group h").await;
    app.publish_topic("t", "3 topic t").await;
    app.publish_topic("u", "x topic u").await;
    app.broadcast("4 broadcast").await;
    app.publish_users(&["a"], "named", "5 multi\nline").await;

    let mut c = app.resume(query, &last).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let e = c.next_event().await;
        got.push((e.event_type, e.data));
    }
    let want = [
        ("message", "1 user a"),
        ("message", "2 group g"),
        ("message", "3 topic t"),
        ("message", "4 broadcast"),
        ("named", "5 multi\nline"),
    ];
    assert_eq!(got, want.map(|(t, d)| (t.to_string(), d.to_string())));
    app.publish_topic("t", "live").await;
    let e = c.next_event().await;
    assert_eq!(e.data, "live", "the next thing after the replay is the live event: nothing extra, nothing twice");
    let s = app.stats().await;
    assert_eq!((s.events_replayed, s.resumes_missed), (5, 0));
}

#[tokio::test]
async fn last_event_id_in_the_query_works_for_clients_that_cannot_set_headers() {
    let app = spawn_app(&[]).await;
    let mut c = app.subscribe("user=a").await;
    let last = c.cursor().await;
    drop(c);
    app.wait_connections("a", 0).await;
    app.publish_users(&["a"], "", "missed").await;
    let mut c = app.subscribe(&format!("user=a&last_event_id={last}")).await;
    assert_eq!(c.next_event().await.data, "missed");
}

#[tokio::test]
async fn a_client_that_saw_no_event_yet_resumes_from_when_it_connected() {
    // Every stream opens with its position (`ssegate.position`, an event carrying the newest
    // id), so even a client that never received another event sends a Last-Event-ID when it
    // reconnects.
    let app = spawn_app(&[]).await;
    app.broadcast("before it connected").await;
    let mut c = app.subscribe("user=a").await;
    let start = c.cursor().await;
    drop(c);
    app.wait_connections("a", 0).await;
    app.broadcast("while away").await;
    let mut c = app.resume("user=a", &start).await;
    assert_eq!(c.next_event().await.data, "while away");
}

/// Reconnects over and over while a publisher streams a burst: every event arrives exactly
/// once, in order, across all the connections.
#[tokio::test]
async fn reconnecting_during_a_burst_has_no_gap_and_no_duplicate() {
    const N: usize = 2_000;
    let app = spawn_app(&[]).await;
    let first = app.subscribe("user=a").await;
    let mut client = app.client.clone();
    let publisher = tokio::spawn(async move {
        let reqs = (0..N).map(|i| pb::PublishStreamRequest {
            target: Some(pb::publish_stream_request::Target::Broadcast(pb::BroadcastTarget {})),
            event: Some(ev("", &i.to_string())),
            ..Default::default()
        });
        let mut out = client.publish_stream(tokio_stream::iter(reqs)).await.expect("stream").into_inner();
        let mut n = 0;
        while let Some(r) = out.message().await.expect("response") {
            assert_eq!(r.code, 0, "{r:?}");
            n += 1;
        }
        n
    });
    let mut seen: Vec<usize> = Vec::new();
    let mut c: SseClient = first;
    let mut reconnects = 0;
    while seen.len() < N {
        // Read a few events, then drop the connection and resume from the last id seen.
        // The stream may also end by itself: on one thread, a burst can fill the queue before
        // the connection's writer runs, and it is cut off as a slow consumer. Resuming covers
        // that too.
        for _ in 0..97 {
            if seen.len() == N {
                break;
            }
            match c.next_event_or_end().await {
                Some(e) => seen.push(e.data.parse().expect("a number")),
                None => break,
            }
        }
        let last = c.last_event_id();
        drop(c);
        c = app.resume("user=a", &last).await;
        reconnects += 1;
    }
    assert_eq!(publisher.await.expect("publisher"), N);
    assert!(seen.iter().copied().eq(0..N), "gap or duplicate after {reconnects} reconnects");
    assert_eq!(app.stats().await.resumes_missed, 0);
}

fn missed(item: Option<Item>) -> serde_json::Value {
    match item {
        Some(Item::Event(e)) if e.event_type == "ssegate.missed" => serde_json::from_str(&e.data).expect("JSON data"),
        other => panic!("expected an ssegate.missed event, got {other:?}"),
    }
}

#[tokio::test]
async fn an_id_the_log_cannot_serve_gets_ssegate_missed_then_live_events() {
    let app = spawn_app(&["--replay-capacity", "2"]).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(app.broadcast(&i.to_string()).await.event_id);
    }
    let (epoch, _) = ids[0].split_once('-').unwrap();
    let other_epoch = if epoch == "1" { "2-3".to_string() } else { "1-3".to_string() };
    let cases = [(ids[0].clone(), "expired"), (format!("{epoch}-999"), "unknown"), (other_epoch, "other_epoch")];
    let mut newest = ids[3].clone();
    let mut live_ids = Vec::new();
    for (last, reason) in cases {
        let mut c = app.resume("user=a", &last).await;
        assert_eq!(c.next_item().await, Some(Item::Retry(3000)));
        let m = missed(c.next_item().await);
        assert_eq!((m["reason"].as_str(), m["last_event_id"].as_str()), (Some(reason), Some(last.as_str())));
        assert_eq!(c.cursor().await, newest, "resumes from the newest id after the notice");
        newest = app.broadcast("live").await.event_id;
        live_ids.push(newest.clone());
        assert_eq!(c.next_event().await.data, "live");
    }
    // Within the window (the last two events): replayed normally.
    let mut c = app.resume("user=a", &live_ids[0]).await;
    assert_eq!(c.next_data(2).await, ["live", "live"]);
    assert_eq!(c.last_event_id(), newest);
    assert_eq!(app.stats().await.resumes_missed, 3);
}

#[tokio::test]
async fn a_malformed_last_event_id_is_ignored_not_an_error() {
    let app = spawn_app(&[]).await;
    app.broadcast("old").await;
    for bad in ["garbage", "1-2-3", "ABC-1", "1-01"] {
        let mut c = app.resume("user=a", bad).await;
        assert_eq!(c.next_item().await, Some(Item::Retry(3000)));
        c.cursor().await;
        app.broadcast("live").await;
        assert_eq!(c.next_event().await.data, "live", "{bad}: treated as a fresh connection");
    }
    assert_eq!(app.stats().await.resumes_missed, 0);
}
