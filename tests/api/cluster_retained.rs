//! Retained events with the NATS backplane, on a real `nats-server -js`: a value published on
//! one replica is sent on connect at another, and the values (and the clears) survive a restart
//! of every replica, read back from the JetStream key-value bucket (the restarted replicas'
//! replay window does not reach the events that set them). A failed write to the bucket does
//! not fail the publish and is counted; entries of the bucket this version cannot read are
//! skipped at start, the others loaded.

use std::time::Duration;

use ssegate::grpc::pb;
use tokio::time::Instant;

use crate::{
    broker::{Broker, replica},
    helpers::{TestApp, deadline, ev, http_request},
};

/// The bucket of the default stream (`--nats-stream SSEGATE`).
const BUCKET: &str = "SSEGATE_retained";

fn keep() -> Option<pb::Retain> {
    Some(pb::Retain { ttl_seconds: 0, clear: false })
}

fn clear() -> Option<pb::Retain> {
    Some(pb::Retain { ttl_seconds: 0, clear: true })
}

async fn to_users(app: &TestApp, users: &[&str], name: &str, data: &str, retain: Option<pb::Retain>) -> String {
    let req = pb::PublishRequest {
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        event: Some(ev(name, data)),
        idempotency_key: String::new(),
        retain,
    };
    app.client.clone().publish(req).await.expect("publish").into_inner().event_id
}

async fn to_group(app: &TestApp, group: &str, name: &str, data: &str) -> String {
    let req = pb::PublishGroupRequest {
        group: group.into(),
        event: Some(ev(name, data)),
        retain: keep(),
        ..Default::default()
    };
    app.client.clone().publish_group(req).await.expect("publish_group").into_inner().event_id
}

async fn to_all(app: &TestApp, name: &str, data: &str) -> String {
    let req = pb::BroadcastRequest { event: Some(ev(name, data)), retain: keep(), ..Default::default() };
    app.client.clone().broadcast(req).await.expect("broadcast").into_inner().event_id
}

/// Waits until `app` has consumed the stream up to `id`, an event of `user` or of everyone (a
/// fresh stream of `user` opens at it: with interest delivery a replica receives a user's
/// events once a stream of the user is open there).
async fn wait_consumed(app: &TestApp, user: &str, id: &str) {
    let end = deadline();
    loop {
        let cursor = app.subscribe(&format!("user={user}")).await.cursor().await;
        if cursor == id {
            return;
        }
        assert!(Instant::now() < end, "the replica never consumed {id} (opens at {cursor})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens a fresh stream for `user` (with `extra` query parameters) on `app` and returns the
/// (event type, data) of the retained events it is sent: those before the cursor, which carry
/// no id. A plain marker published once the cursor has arrived ends the reading.
async fn sent_on_connect(app: &TestApp, user: &str, extra: &str) -> Vec<(String, String)> {
    let mut stream = app.subscribe(&format!("user={user}{extra}")).await;
    stream.cursor().await;
    let marker = to_users(app, &[user], "", "marker", None).await;
    let mut retained = Vec::new();
    loop {
        let e = stream.next_event().await;
        if e.data == "marker" {
            assert_eq!(e.last_event_id, marker, "the marker is the first live event");
            return retained;
        }
        assert_eq!(e.last_event_id, "", "a retained event comes before the cursor, without an id: {e:?}");
        retained.push((e.event_type, e.data));
    }
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// `ssegate_retained_persist_failures_total` on `app`'s admin port.
async fn persist_failures(app: &TestApp) -> f64 {
    let (status, _, body) = http_request(app.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    let name = "ssegate_retained_persist_failures_total ";
    let line = body.lines().find(|l| l.starts_with(name)).expect("the persist failure counter is exported");
    line.trim_start_matches(name).parse().expect("a number")
}

#[tokio::test]
async fn a_retained_value_published_on_one_replica_is_sent_on_connect_at_another() {
    let nats = Broker::start().await;
    let (a, b) = (replica(&nats, &[]).await, replica(&nats, &[]).await);
    to_users(&a, &["u", "a.b"], "badge", "3", keep()).await;
    let last = to_group(&a, "g", "status", "busy").await;
    wait_consumed(&b, "nobody", &last).await;

    assert_eq!(sent_on_connect(&b, "u", "&group=g").await, pairs(&[("badge", "3"), ("status", "busy")]));
    assert_eq!(sent_on_connect(&b, "a.b", "").await, pairs(&[("badge", "3")]), "one value per user of a list");
    assert_eq!(sent_on_connect(&a, "u", "").await, pairs(&[("badge", "3")]), "and on the publishing replica");
    assert_eq!((persist_failures(&a).await, persist_failures(&b).await), (0.0, 0.0));
}

#[tokio::test]
async fn retained_values_survive_a_restart_of_every_replica_and_cleared_ones_stay_cleared() {
    let nats = Broker::start().await;
    let (mut a, mut b) = (replica(&nats, &[]).await, replica(&nats, &[]).await);
    to_users(&a, &["u", "v"], "badge", "3", keep()).await;
    to_group(&a, "g", "status", "busy").await;
    to_users(&a, &["u"], "draft", "unsaved", keep()).await;
    to_users(&a, &["u"], "draft", "", clear()).await;
    to_all(&b, "motd", "hello").await;
    to_users(&b, &["u"], "badge", "4", keep()).await;
    let mut last = String::new();
    for i in 0..3 {
        last = to_users(&a, &["nobody"], "", &i.to_string(), None).await;
    }
    wait_consumed(&a, "nobody", &last).await;
    wait_consumed(&b, "nobody", &last).await;
    let u_sees = pairs(&[("status", "busy"), ("motd", "hello"), ("badge", "4")]);
    let v_sees = pairs(&[("badge", "3"), ("motd", "hello")]);
    assert_eq!(sent_on_connect(&a, "u", "&group=g").await, u_sees, "before the restart");
    assert_eq!(sent_on_connect(&b, "v", "").await, v_sees, "before the restart");
    assert_eq!((persist_failures(&a).await, persist_failures(&b).await), (0.0, 0.0));

    a.stop().await;
    b.stop().await;
    // No replay (nothing read from the stream) and a window of one event (a plain one): the
    // values can only come from the bucket.
    let a = replica(&nats, &["--replay-capacity", "0"]).await;
    let b = replica(&nats, &["--replay-capacity", "1"]).await;
    for r in [&a, &b] {
        assert_eq!(sent_on_connect(r, "u", "&group=g").await, u_sees, "the cleared draft stays cleared");
        assert_eq!(sent_on_connect(r, "v", "").await, v_sees);
    }
    // A value set after the restart replaces the loaded one everywhere.
    let five = to_users(&a, &["u"], "badge", "5", keep()).await;
    wait_consumed(&b, "u", &five).await;
    assert_eq!(sent_on_connect(&b, "u", "").await, pairs(&[("motd", "hello"), ("badge", "5")]));
}

#[tokio::test]
async fn a_failed_write_to_the_bucket_does_not_fail_the_publish_and_is_counted() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let mut live = a.subscribe("user=u").await;
    live.cursor().await;
    nats.jetstream().await.delete_stream(format!("KV_{BUCKET}")).await.expect("the bucket's stream is deleted");

    to_users(&a, &["u", "v"], "badge", "7", keep()).await;
    let e = live.next_event().await;
    assert_eq!((e.event_type.as_str(), e.data.as_str()), ("badge", "7"), "the event is delivered");
    assert_eq!(persist_failures(&a).await, 2.0, "one failure per value (one per user)");
    assert_eq!(sent_on_connect(&a, "v", "").await, pairs(&[("badge", "7")]), "the running replica holds the value");
}

#[tokio::test]
async fn entries_of_the_bucket_this_version_cannot_read_are_skipped_and_the_rest_loaded() {
    let nats = Broker::start().await;
    let mut a = replica(&nats, &[]).await;
    to_users(&a, &["u"], "badge", "1", keep()).await;
    a.stop().await;
    let kv = nats.jetstream().await.get_key_value(BUCKET).await.expect("the bucket exists");
    // A key of another shape, a value that is not JSON (user "u", no name), and a value of a
    // later version with fields this one does not know (group "g", no name).
    kv.put("session.czE._", "{}".into()).await.unwrap();
    kv.put("u.dQ._", "not json".into()).await.unwrap();
    let newer = r#"{"v":9,"seq":1,"scope":{"kind":"group","id":"g","shard":3},"data":"from v9","codec":"none"}"#;
    kv.put("g.Zw._", newer.into()).await.unwrap();

    let a = replica(&nats, &["--replay-capacity", "0"]).await;
    let mut got = sent_on_connect(&a, "u", "&group=g").await;
    got.sort();
    assert_eq!(got, pairs(&[("badge", "1"), ("message", "from v9")]));
}

#[tokio::test]
async fn a_retry_of_an_older_publish_never_replaces_a_newer_value_in_the_bucket() {
    let nats = Broker::start().await;
    let mut a = replica(&nats, &[]).await;
    let first = pb::PublishRequest {
        user_ids: vec!["u".into()],
        event: Some(ev("badge", "1")),
        idempotency_key: "badge-1".into(),
        retain: keep(),
    };
    let id = a.client.clone().publish(first.clone()).await.unwrap().into_inner().event_id;
    to_users(&a, &["u"], "badge", "2", keep()).await;
    // The retry is a duplicate (the first one's id) and writes its value again, which is older.
    let retry = a.client.clone().publish(first).await.unwrap().into_inner().event_id;
    assert_eq!(retry, id);
    a.stop().await;

    let a = replica(&nats, &["--replay-capacity", "0"]).await;
    assert_eq!(sent_on_connect(&a, "u", "").await, pairs(&[("badge", "2")]));
}

#[tokio::test]
async fn an_expired_value_is_not_loaded_and_is_deleted_from_the_bucket() {
    let nats = Broker::start().await;
    let mut a = replica(&nats, &[]).await;
    let flash = pb::PublishRequest {
        user_ids: vec!["u".into()],
        event: Some(ev("flash", "soon gone")),
        idempotency_key: String::new(),
        retain: Some(pb::Retain { ttl_seconds: 1, clear: false }),
    };
    a.client.clone().publish(flash).await.unwrap();
    // The expiry was set to the server's clock plus one second while the call ran.
    let expired = std::time::SystemTime::now() + Duration::from_millis(1_050);
    to_users(&a, &["u"], "badge", "1", keep()).await;
    a.stop().await;
    if let Ok(left) = expired.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }

    let a = replica(&nats, &["--replay-capacity", "0"]).await;
    assert_eq!(sent_on_connect(&a, "u", "").await, pairs(&[("badge", "1")]));
    let kv = nats.jetstream().await.get_key_value(BUCKET).await.unwrap();
    let key = "u.dQ.Zmxhc2g"; // user "u", name "flash"
    let end = deadline();
    loop {
        let entry = kv.entry(key).await.unwrap().expect("the key has an entry");
        if entry.operation == async_nats::jetstream::kv::Operation::Delete {
            break;
        }
        assert!(Instant::now() < end, "the expired value was never deleted: {entry:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(kv.get("u.dQ.YmFkZ2U").await.unwrap().is_some(), "the live value stays"); // name "badge"
}

#[tokio::test]
async fn the_values_of_a_recreated_stream_replace_those_of_the_old_one() {
    let nats = Broker::start().await;
    let mut a = replica(&nats, &[]).await;
    for i in 0..3 {
        to_users(&a, &["nobody"], "", &i.to_string(), None).await;
    }
    to_users(&a, &["u"], "badge", "old", keep()).await; // sequence 4 of the old stream
    a.stop().await;
    nats.jetstream().await.delete_stream("SSEGATE").await.expect("the event stream is deleted");

    // A new stream (a new epoch, sequences from 1): the old value is still sent until replaced.
    let mut a = replica(&nats, &[]).await;
    assert_eq!(sent_on_connect(&a, "u", "").await, pairs(&[("badge", "old")]));
    let new = to_users(&a, &["u"], "badge", "new", keep()).await;
    // Acknowledged once stored; the replica applies it once it has read it back from the
    // stream (a stream opened before then gets "old", then "new" live).
    wait_consumed(&a, "u", &new).await;
    assert_eq!(sent_on_connect(&a, "u", "").await, pairs(&[("badge", "new")]));
    a.stop().await;

    let a = replica(&nats, &["--replay-capacity", "0"]).await;
    assert_eq!(sent_on_connect(&a, "u", "").await, pairs(&[("badge", "new")]), "in the bucket too");
}
