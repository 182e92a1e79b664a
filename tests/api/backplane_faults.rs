//! The NATS backplane when the broker misbehaves, against a real `nats-server -js` that the
//! tests kill, restart, pause (SIGSTOP: the TCP connection stays open but nothing answers) and
//! resume (SIGCONT), with its monitoring port on to watch connections and streams:
//! - a publish answered "outcome unknown" may have been stored, and a retry with the same
//!   idempotency key on another replica is delivered once and gets the stored event's id;
//! - a broker outage leaves `/readyz` ready (subscribers are served) and shows in the gRPC health
//!   of `ssegate.v1.Publisher` and in `ssegate_backplane_up`; publishes are then refused with
//!   nothing sent;
//! - a stopped replica's consumer and cluster tasks stop (its connection leaves the broker);
//! - replicas of another version (fields added or removed) still count in cluster queries;
//! - `--nats-stream-replicas` on a three-server NATS cluster.

use std::time::Duration;

use futures_util::StreamExt;
use ssegate::grpc::pb;
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::{
    broker::{Broker, backplane_up, free_port, readyz, replica},
    helpers::{TestApp, deadline, ev, spawn_app},
};

const PUBLISHER: &str = "ssegate.v1.Publisher";

async fn publisher_health(app: &TestApp) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc)).unwrap();
    let mut client = HealthClient::new(channel.connect().await.expect("health connects"));
    let status = client.check(HealthCheckRequest { service: PUBLISHER.into() }).await.expect("health check");
    status.into_inner().status()
}

async fn wait_health(app: &TestApp, want: ServingStatus) {
    let end = deadline();
    loop {
        let got = publisher_health(app).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < end, "the publisher's health stayed {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn to_user(user: &str, data: &str, key: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        retain: None,
        user_ids: vec![user.into()],
        event: Some(ev("", data)),
        idempotency_key: key.into(),
    }
}

/// Publishes `req` on `app`, retrying while the answer is UNAVAILABLE (nothing was sent: the
/// replica has not seen the broker back yet) until the deadline.
async fn publish_when_up(app: &TestApp, req: pb::PublishRequest) -> pb::PublishResponse {
    let end = deadline();
    loop {
        match app.client.clone().publish(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("publish failed: {s:?}"),
        }
    }
}

#[tokio::test]
async fn a_publish_paused_at_the_broker_is_outcome_unknown_and_its_retry_on_another_replica_is_delivered_once_with_its_id()
 {
    let mut broker = Broker::start().await;
    let a = replica(&broker, &["--nats-publish-timeout", "500ms"]).await;
    let b = replica(&broker, &[]).await;
    let mut sub = b.subscribe("user=u").await;
    sub.cursor().await;

    broker.pause();
    let lost = a.client.clone().publish(to_user("u", "once", "order-7")).await.expect_err("no acknowledgement");
    assert_eq!(lost.code(), Code::DeadlineExceeded, "{lost:?}");
    assert!(lost.message().contains("outcome unknown"), "{lost:?}");
    assert!(lost.message().contains("idempotency_key"), "says how to retry: {lost:?}");

    broker.resume();
    // The unacknowledged publish was stored after all: that is why its outcome was unknown.
    let delivered = sub.next_event().await;
    assert_eq!(delivered.data, "once");

    // The caller retries with the same key on another replica: deduplicated by JetStream, and
    // answered with the id subscribers saw.
    let retry = publish_when_up(&b, to_user("u", "once", "order-7")).await;
    assert_eq!(retry.event_id, delivered.last_event_id, "the retry gets the stored event's id");
    let again = publish_when_up(&a, to_user("u", "once", "order-7")).await;
    assert_eq!(again.event_id, delivered.last_event_id, "on either replica");
    publish_when_up(&b, to_user("u", "marker", "")).await;
    assert_eq!(sub.next_event().await.data, "marker", "delivered exactly once");
}

#[tokio::test]
async fn a_killed_broker_keeps_readyz_ready_and_turns_publisher_health_and_backplane_up_off_until_it_is_back() {
    let mut broker = Broker::start().await;
    let a = replica(&broker, &[]).await;
    let mut sub = a.subscribe("user=u").await;
    sub.cursor().await;
    assert_eq!(publisher_health(&a).await, ServingStatus::Serving);
    assert_eq!(backplane_up(&a).await, 1.0);
    // Interest delivery counts copies that came out of the stream's order (none here).
    let (_, _, metrics) = crate::helpers::http_request(a.admin, "GET", "/metrics", &[]).await;
    for line in ["ssegate_backplane_late_events_total 0.0", "ssegate_backplane_copy_reorder_seconds_count 0"] {
        assert!(metrics.lines().any(|l| l == line), "{line} exported:\n{metrics}");
    }

    broker.kill().await;
    wait_health(&a, ServingStatus::NotServing).await;
    assert_eq!(backplane_up(&a).await, 0.0);
    assert_eq!(readyz(&a).await, (200, "ready".to_owned()), "subscribers are still served");
    let mut late = a.subscribe("user=u").await;
    late.cursor().await;
    let refused = a.client.clone().publish(to_user("u", "refused", "")).await.expect_err("no broker");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("nothing was sent"), "{refused:?}");

    broker.restart().await;
    wait_health(&a, ServingStatus::Serving).await;
    assert_eq!(backplane_up(&a).await, 1.0);
    publish_when_up(&a, to_user("u", "after", "")).await;
    assert_eq!(sub.next_event().await.data, "after", "the refused publish was never delivered");
    assert_eq!(late.next_event().await.data, "after");
}

#[tokio::test]
async fn a_paused_broker_is_noticed_by_the_probe_and_publishes_are_refused_with_nothing_sent() {
    let mut broker = Broker::start().await;
    let a = replica(&broker, &[]).await;
    let mut sub = a.subscribe("user=u").await;
    sub.cursor().await;

    broker.pause();
    wait_health(&a, ServingStatus::NotServing).await;
    assert_eq!(backplane_up(&a).await, 0.0);
    assert_eq!(readyz(&a).await, (200, "ready".to_owned()));
    let refused = a.client.clone().publish(to_user("u", "refused", "")).await.expect_err("broker paused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    broker.resume();
    wait_health(&a, ServingStatus::Serving).await;
    assert_eq!(backplane_up(&a).await, 1.0);
    publish_when_up(&a, to_user("u", "after", "")).await;
    assert_eq!(sub.next_event().await.data, "after", "the refused publish was never delivered");
}

#[tokio::test]
async fn a_stopped_replica_leaves_the_broker_its_consumer_and_cluster_tasks_end() {
    let broker = Broker::start().await;
    let mut a = replica(&broker, &[]).await;
    let b = replica(&broker, &[]).await;
    b.wait_stats("both replicas", |s| s.replicas == 2 && !s.partial).await;
    assert_eq!(broker.connections().await, 2);

    a.stop().await;
    let end = deadline();
    while broker.connections().await != 1 {
        assert!(Instant::now() < end, "the stopped replica is still connected to NATS (its tasks live on)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It no longer announces itself, so the others stop waiting for it.
    b.wait_stats("the stopped replica to be forgotten", |s| s.replicas == 1 && !s.partial).await;
    // What is published now reaches the live replica only: one replica follows the stream's
    // live subject for everyone (interest delivery), and it still delivers.
    let mut sub = b.subscribe("user=u").await;
    sub.cursor().await;
    b.publish_users(&["u"], "", "after").await;
    assert_eq!(sub.next_event().await.data, "after");
    let connz = broker.monitor("/connz?subs=true").await;
    let following = connz["connections"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| {
                    c["subscriptions_list"].as_array().is_some_and(|s| s.iter().any(|s| s == "ssegate.events.live.all"))
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(following, 1, "{connz:#}");
}

/// A stand-in for a replica of another version: announces itself and answers every cluster
/// query with `answer` (raw JSON).
async fn foreign_replica(broker: &Broker, answer: &'static str) -> tokio::task::JoinHandle<()> {
    let client = async_nats::connect(broker.url()).await.expect("raw NATS client");
    let mut queries = client.subscribe("ssegate.events.ctl.query").await.unwrap();
    client.flush().await.unwrap();
    tokio::spawn(async move {
        let mut hello = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = hello.tick() => {
                    let _ = client.publish("ssegate.events.ctl.hello", "foreign".into()).await;
                }
                msg = queries.next() => {
                    let Some(msg) = msg else { return };
                    if let Some(reply) = msg.reply {
                        let _ = client.publish(reply, answer.into()).await;
                    }
                }
            }
        }
    })
}

#[tokio::test]
async fn replicas_of_another_version_with_added_or_removed_fields_still_count_in_cluster_queries() {
    let broker = Broker::start().await;
    let a = replica(&broker, &[]).await;
    let _u = a.subscribe("user=u").await;
    // Newer: fields this version does not know, more per-kind counters. Older: fields missing.
    let newer = r#"{"user_connections":[2],"group_connections":[],"topic_connections":[],"online":[],
        "more_online":false,"stats":{"connections":2,"users":1,"published_by_target":[1,0,0,0,7],
        "resumes_by_outcome":[0,0,0,0],"sessions":3},"closed":0,"zone":"b"}"#;
    let task = foreign_replica(&broker, newer).await;
    let s = a.wait_stats("the newer replica to count", |s| s.replicas == 2 && !s.partial).await;
    assert_eq!(s.connections, 3);
    let p = a
        .client
        .clone()
        .presence(pb::PresenceRequest { user_ids: vec!["u".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.users[0].connections, p.replicas, p.partial), (3, 2, false));
    task.abort();

    let older = r#"{"user_connections":[1],"stats":{"connections":1}}"#;
    let task = foreign_replica(&broker, older).await;
    let s = a.wait_stats("the older replica to count", |s| s.replicas == 2 && !s.partial && s.connections == 2).await;
    assert_eq!(s.users, 1, "a missing field counts as 0");
    task.abort();
}

/// Three `nats-server -js` routed into one cluster, with JetStream ready.
async fn nats_cluster() -> Vec<Broker> {
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = cluster_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let mut brokers = Vec::new();
    for (i, p) in cluster_ports.iter().enumerate() {
        let args = vec![
            "--cluster_name".into(),
            "ssegate-test".into(),
            "--name".into(),
            format!("n{i}"),
            "--cluster".into(),
            format!("nats://127.0.0.1:{p}"),
            "--routes".into(),
            routes.clone(),
        ];
        brokers.push(Broker::start_with(args, &format!("-n{i}")).await);
    }
    // JetStream is usable once the cluster has a meta leader.
    let end = Instant::now() + Duration::from_secs(30);
    for b in &brokers {
        loop {
            let jsz = b.monitor("/jsz").await;
            if jsz["meta_cluster"]["leader"].as_str().is_some_and(|l| !l.is_empty()) {
                break;
            }
            assert!(Instant::now() < end, "the NATS cluster elected no JetStream leader: {jsz}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    brokers
}

/// The `num_replicas` of the SSEGATE stream as a server hosting it reports it, if any does.
async fn stream_replicas(brokers: &[Broker]) -> Option<u64> {
    for b in brokers {
        let jsz = b.monitor("/jsz?accounts=true&streams=true&config=true").await;
        let accounts = jsz["account_details"].as_array().cloned().unwrap_or_default();
        let found = accounts
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == "SSEGATE");
        if let Some(n) = found.and_then(|s| s["config"]["num_replicas"].as_u64()) {
            return Some(n);
        }
    }
    None
}

async fn wait_stream_replicas(brokers: &[Broker], n: u64) {
    let end = deadline();
    loop {
        let got = stream_replicas(brokers).await;
        if got == Some(n) {
            return;
        }
        assert!(Instant::now() < end, "the stream has {got:?} replicas, not {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn nats_stream_replicas_makes_and_updates_a_replicated_stream_on_a_nats_cluster() {
    let brokers = nats_cluster().await;
    let urls = brokers.iter().map(Broker::url).collect::<Vec<_>>().join(",");
    let flags = |replicas: &'static str| {
        vec!["--backplane", "nats", "--nats-url", "", "--nats-stream-replicas", replicas]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<String>>()
    };
    let spawn = |replicas: &'static str| {
        let mut f = flags(replicas);
        f[3] = urls.clone();
        async move {
            let f: Vec<&str> = f.iter().map(String::as_str).collect();
            spawn_app(&f).await
        }
    };
    // Made with one copy (the default before this flag), then a replica asks for three.
    let one = spawn("1").await;
    wait_stream_replicas(&brokers, 1).await;
    let three = spawn("3").await;
    wait_stream_replicas(&brokers, 3).await;
    let mut sub = one.subscribe("user=u").await;
    sub.cursor().await;
    publish_when_up(&three, to_user("u", "replicated", "")).await;
    assert_eq!(sub.next_event().await.data, "replicated");
}
