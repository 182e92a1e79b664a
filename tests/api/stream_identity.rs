//! The NATS backplane when the stream is recreated under running replicas (deleted, or the
//! broker lost its store), against a real `nats-server -js`: a replica's probe recreates it,
//! every replica tells its clients (`ssegate.missed`, `stream_recreated`), refuses publishes
//! until it follows the new stream (the publisher's gRPC health NOT_SERVING meanwhile), then
//! acknowledges and delivers with the new epoch; retained values of a wiped bucket are not
//! served. And a `Last-Event-ID` ahead of the stream is answered `ssegate.missed` / `unknown`,
//! on NATS as in memory.

use std::time::Duration;

use futures_util::StreamExt;
use ssegate::{event_stream::parse::ParsedEvent, grpc::pb};
use tokio::time::{Instant, timeout_at};
use tonic::{Code, Streaming};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    broker::{Broker, replica},
    helpers::{SseClient, TestApp, deadline, ev, http_request, spawn_app},
};

const PUBLISHER: &str = "ssegate.v1.Publisher";

/// The publisher's health as it changes (the first item is the status now).
async fn watch_health(app: &TestApp) -> Streaming<HealthCheckResponse> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc)).unwrap();
    let mut client = HealthClient::new(channel.connect().await.expect("health connects"));
    client.watch(HealthCheckRequest { service: PUBLISHER.into() }).await.expect("health watch").into_inner()
}

/// Reads `watch` until it reports SERVING, after NOT_SERVING if `after_down`.
async fn serving(watch: &mut Streaming<HealthCheckResponse>, after_down: bool) {
    let end = deadline();
    let mut seen = Vec::new();
    loop {
        let next = timeout_at(end, watch.next()).await;
        let status = next.unwrap_or_else(|_| {
            panic!("health did not go {} SERVING: {seen:?}", if after_down { "NOT_SERVING then" } else { "" })
        });
        let status = status.expect("the watch goes on").expect("a status").status();
        seen.push(status);
        if status == ServingStatus::Serving && (!after_down || seen.contains(&ServingStatus::NotServing)) {
            return;
        }
    }
}

fn to_user(user: &str, name: &str, data: &str, retain: bool) -> pb::PublishRequest {
    pb::PublishRequest {
        retain: retain.then_some(pb::Retain { ttl_seconds: 0, clear: false }),
        user_ids: vec![user.into()],
        event: Some(ev(name, data)),
        idempotency_key: String::new(),
    }
}

/// Publishes, retrying while the answer is UNAVAILABLE (nothing was stored: the replica is
/// still catching up with the new stream), until the deadline.
async fn publish_when_up(app: &TestApp, req: pb::PublishRequest) -> String {
    let end = deadline();
    loop {
        match app.client.clone().publish(req.clone()).await {
            Ok(r) => return r.into_inner().event_id,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("publish failed: {s:?}"),
        }
    }
}

fn epoch_of(id: &str) -> &str {
    id.split_once('-').expect("an id is <epoch>-<seq>").0
}

/// The data of an `ssegate.missed` event: its reason and the id it names.
fn missed(e: &ParsedEvent) -> (String, String) {
    assert_eq!(e.event_type, "ssegate.missed", "{e:?}");
    let v: serde_json::Value = serde_json::from_str(&e.data).expect("JSON data");
    (v["reason"].as_str().unwrap().to_owned(), v["last_event_id"].as_str().unwrap().to_owned())
}

/// A counter on `app`'s admin port.
async fn counter(app: &TestApp, name: &str) -> f64 {
    let (status, _, body) = http_request(app.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    let prefix = format!("{name} ");
    let line = body.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{name} exported"));
    line[prefix.len()..].parse().expect("a number")
}

async fn delete_stream(broker: &Broker) {
    let js = broker.jetstream().await;
    js.delete_stream("SSEGATE").await.expect("the event stream is deleted");
}

#[tokio::test]
async fn a_deleted_stream_is_recreated_and_every_replica_tells_its_clients_and_follows_the_new_one() {
    let broker = Broker::start().await;
    let (a, b) = (replica(&broker, &[]).await, replica(&broker, &[]).await);
    let (mut health_a, mut health_b) = (watch_health(&a).await, watch_health(&b).await);
    serving(&mut health_a, false).await;
    serving(&mut health_b, false).await;
    let mut on_a = a.subscribe("user=u").await;
    let mut on_b = b.subscribe("user=u").await;
    on_a.cursor().await;
    on_b.cursor().await;
    let mut old = Vec::new();
    for (i, app) in [&a, &b, &a].into_iter().enumerate() {
        old.push(publish_when_up(app, to_user("u", "", &format!("old {i}"), false)).await);
    }
    for sub in [&mut on_a, &mut on_b] {
        assert_eq!(sub.next_data(3).await, ["old 0", "old 1", "old 2"]);
    }
    let old_epoch = epoch_of(&old[0]).to_owned();

    delete_stream(&broker).await;

    // No replica restarts: a probe recreates the stream, and each replica tells its clients.
    for sub in [&mut on_a, &mut on_b] {
        let e = sub.next_event().await;
        assert_eq!(missed(&e), ("stream_recreated".to_owned(), old[2].clone()), "{e:?}");
    }
    // The publisher was NOT_SERVING while each replica caught up, and is SERVING again.
    serving(&mut health_a, true).await;
    serving(&mut health_b, true).await;

    // Publishes through either replica get ids of the new stream and reach both.
    let via_a = publish_when_up(&a, to_user("u", "", "new via a", false)).await;
    let via_b = publish_when_up(&b, to_user("u", "", "new via b", false)).await;
    let new_epoch = epoch_of(&via_a).to_owned();
    assert_ne!(new_epoch, old_epoch, "{via_a}");
    assert_eq!((via_a.as_str(), epoch_of(&via_b)), (format!("{new_epoch}-1").as_str(), new_epoch.as_str()));
    for sub in [&mut on_a, &mut on_b] {
        let (first, second) = (sub.next_event().await, sub.next_event().await);
        assert_eq!((first.data.as_str(), first.last_event_id.as_str()), ("new via a", via_a.as_str()));
        assert_eq!((second.data.as_str(), second.last_event_id.as_str()), ("new via b", via_b.as_str()));
    }

    // An id of the old stream can no longer be resumed from, on either replica.
    for app in [&a, &b] {
        let mut late = app.resume("user=u", &old[1]).await;
        assert_eq!(missed(&late.next_event().await), ("other_epoch".to_owned(), old[1].clone()));
        assert_eq!(late.cursor().await, via_b);
        assert_eq!(counter(app, "ssegate_backplane_epoch_changes_total").await, 1.0);
    }
}

#[tokio::test]
async fn after_the_broker_lost_its_store_only_values_published_since_are_sent_on_connect() {
    let mut broker = Broker::start().await;
    let (a, b) = (replica(&broker, &[]).await, replica(&broker, &[]).await);
    let mut health_b = watch_health(&b).await;
    serving(&mut health_b, false).await;
    publish_when_up(&a, to_user("u", "banner", "before", true)).await;
    let mut open = b.subscribe("user=u").await;
    assert_eq!(open.next_event().await.data, "before");

    broker.restart_empty().await;

    // The replicas reconnect, find no stream, create it (and the bucket), and tell their clients.
    let e = open.next_event().await;
    assert_eq!(missed(&e).0, "stream_recreated", "{e:?}");
    // Once B takes publishes again it has rebased, so what A publishes next reaches it live.
    serving(&mut health_b, true).await;
    let after = publish_when_up(&a, to_user("u", "status", "after", true)).await;
    let next = open.next_event().await;
    assert_eq!((next.data.as_str(), next.last_event_id.as_str()), ("after", after.as_str()), "no old value came back");

    // On connect, at both replicas: the value published since, and not the lost one. Each
    // stream opens once its replica has consumed everything published so far, including the
    // previous round's marker (else that marker, for the same user, could arrive first).
    let mut last = after.clone();
    for app in [&a, &b] {
        let mut fresh = connect_when_consumed(app, &last).await;
        let marker = publish_when_up(app, to_user("u", "", "marker", false)).await;
        let first = fresh.next_event().await;
        assert_eq!((first.event_type.as_str(), first.data.as_str()), ("status", "after"));
        let second = fresh.next_event().await;
        assert_eq!((second.data.as_str(), second.last_event_id.as_str()), ("marker", marker.as_str()));
        last = marker;
    }
}

fn seq_of(id: &str) -> u64 {
    id.split_once('-').expect("an id is <epoch>-<seq>").1.parse().expect("a sequence number")
}

/// Opens a stream for user `u` on `app` once it has consumed `id` (its cursor is at least it).
async fn connect_when_consumed(app: &TestApp, id: &str) -> SseClient {
    let end = deadline();
    loop {
        let mut c = app.subscribe("user=u").await;
        let cursor = c.cursor().await;
        if epoch_of(&cursor) == epoch_of(id) && seq_of(&cursor) >= seq_of(id) {
            return c;
        }
        assert!(Instant::now() < end, "{id} was never consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `Last-Event-ID` ahead of everything the stream has issued is answered `unknown` at once,
/// and live events follow.
async fn an_id_ahead_of_the_stream_is_unknown(app: &TestApp) {
    let current = publish_when_up(app, to_user("u", "", "before", false)).await;
    let ahead = format!("{}-{}", epoch_of(&current), u64::MAX);
    let mut c = app.resume("user=u", &ahead).await;
    let e = c.next_event().await;
    assert_eq!(missed(&e), ("unknown".to_owned(), ahead), "{e:?}");
    let live = publish_when_up(app, to_user("u", "", "live", false)).await;
    let e = c.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("live", live.as_str()));
}

#[tokio::test]
async fn a_resume_id_ahead_of_the_stream_is_told_unknown_on_nats() {
    let broker = Broker::start().await;
    an_id_ahead_of_the_stream_is_unknown(&replica(&broker, &[]).await).await;
}

#[tokio::test]
async fn a_resume_id_ahead_of_the_stream_is_told_unknown_in_memory() {
    an_id_ahead_of_the_stream_is_unknown(&spawn_app(&[]).await).await;
}

#[tokio::test]
async fn a_broker_restart_that_kept_its_store_keeps_the_epoch_and_tells_nobody() {
    let mut broker = Broker::start().await;
    let a = replica(&broker, &[]).await;
    let mut sub = a.subscribe("user=u").await;
    sub.cursor().await;
    let before = publish_when_up(&a, to_user("u", "", "before", false)).await;
    assert_eq!(sub.next_event().await.data, "before");

    broker.kill().await;
    broker.restart().await;
    let after = publish_when_up(&a, to_user("u", "", "after", false)).await;
    assert_eq!((epoch_of(&after), seq_of(&after)), (epoch_of(&before), seq_of(&before) + 1));
    let e = sub.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("after", after.as_str()), "no ssegate.missed");
    assert_eq!(counter(&a, "ssegate_backplane_epoch_changes_total").await, 0.0);
}

#[tokio::test]
async fn a_publish_stored_in_a_stream_recreated_behind_the_replica_gets_the_new_epoch() {
    let broker = Broker::start().await;
    let a = replica(&broker, &[]).await;
    for i in 0..3 {
        publish_when_up(&a, to_user("u", "", &i.to_string(), false)).await;
    }
    // Recreated by someone else (another replica of this version: interest delivery's
    // subjects and republish), just now: the replica's probe has most likely not run since,
    // and the publish's sequence (1) is one the old stream had used.
    let js = broker.jetstream().await;
    js.delete_stream("SSEGATE").await.expect("the event stream is deleted");
    let config = async_nats::jetstream::stream::Config {
        name: "SSEGATE".into(),
        subjects: vec!["ssegate.events".into(), "ssegate.events.to.>".into()],
        republish: Some(async_nats::jetstream::stream::Republish {
            source: "ssegate.events.to.>".into(),
            destination: "ssegate.events.live.>".into(),
            headers_only: false,
        }),
        allow_direct: true,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let created = js.create_stream(config).await.expect("the stream is created").cached_info().created;
    let new_epoch = format!("{:x}", created.unix_timestamp_nanos() as u64);

    let id = publish_when_up(&a, to_user("u", "", "new", false)).await;
    assert_eq!(epoch_of(&id), new_epoch, "{id}");
}
