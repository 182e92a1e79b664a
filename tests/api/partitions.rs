//! Partitioned streams (`--nats-partitions`, issue 26 goal 3), against a real `nats-server -js`:
//! events for users are stored in their users' partitions' streams and events for everyone in
//! every one; a connection reads its user's partition, so its ids keep their form and a resume
//! on another replica is lossless and in order; a replica started with another count refuses
//! to start; an id of another partition gets `ssegate.missed`.

use std::process::Stdio;

use ssegate::{event_stream::parse::Item, grpc::pb, router::partition_of};
use tokio::time::timeout_at;
use tonic::Code;

use crate::{
    broker::{Broker, replica},
    helpers::{deadline, ev},
};

const P: usize = 3;
const FLAGS: &[&str] = &["--nats-partitions", "3"];

/// Users named `<prefix><n>`, one in each partition, in partition order (panics, rather than
/// searching forever, if 1,000 names do not reach every partition).
fn one_per_partition(prefix: &str) -> Vec<String> {
    (0..P)
        .map(|k| {
            (0..1000)
                .map(|n| format!("{prefix}{n}"))
                .find(|u| partition_of(u, P) == k)
                .unwrap_or_else(|| panic!("no user of partition {k} among 1,000 names"))
        })
        .collect()
}

/// Messages stored in the stream `name`.
async fn stored(nats: &Broker, name: &str) -> u64 {
    let js = nats.jetstream().await;
    let mut stream = js.get_stream(name).await.unwrap_or_else(|e| panic!("stream {name}: {e}"));
    stream.info().await.expect("stream info").state.messages
}

fn epoch_of(id: &str) -> &str {
    id.split('-').next().unwrap_or_default()
}

#[tokio::test]
async fn user_events_are_stored_in_their_partition_and_everyones_in_each_with_that_partitions_ids() {
    let nats = Broker::start().await;
    let (a, b) = (replica(&nats, FLAGS).await, replica(&nats, FLAGS).await);
    let users = one_per_partition("u");
    let mut subs = Vec::new();
    for u in &users {
        subs.push(b.subscribe(&format!("user={u}&group=g")).await);
    }
    for (k, u) in users.iter().enumerate() {
        a.publish_users(&[u], "", &format!("for {u}")).await;
        let streams = ["SSEGATE", "SSEGATE-p1", "SSEGATE-p2"];
        for (j, s) in streams.iter().enumerate() {
            assert_eq!(stored(&nats, s).await, u64::from(j <= k), "after {u}'s event: stream {s}");
        }
    }
    let to_all = a.publish_users(&users.iter().map(String::as_str).collect::<Vec<_>>(), "", "to all three").await;
    a.publish_group("g", "to the group").await;
    a.broadcast("to everyone").await;
    for s in ["SSEGATE", "SSEGATE-p1", "SSEGATE-p2"] {
        assert_eq!(
            stored(&nats, s).await,
            4,
            "{s}: its user's event, the three users' one (split), the group's, the broadcast"
        );
    }
    let mut epochs = Vec::new();
    let mut to_all_ids = Vec::new();
    for (u, sub) in users.iter().zip(&mut subs) {
        let got = [sub.next_event().await, sub.next_event().await, sub.next_event().await, sub.next_event().await];
        let data: Vec<&str> = got.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, [format!("for {u}").as_str(), "to all three", "to the group", "to everyone"]);
        let epoch = epoch_of(&got[0].last_event_id);
        assert!(got.iter().all(|e| epoch_of(&e.last_event_id) == epoch), "one partition, one epoch: {got:?}");
        epochs.push(epoch.to_owned());
        to_all_ids.push(got[1].last_event_id.clone());
    }
    epochs.sort();
    epochs.dedup();
    assert_eq!(epochs.len(), P, "each partition numbers its own events");
    assert_eq!(
        epoch_of(&to_all.event_id),
        epoch_of(&subs[0].last_event_id()),
        "the answer names the first partition's id"
    );
    assert_eq!(to_all.partition_event_ids.len(), P, "an id in each partition: {to_all:?}");
    assert_eq!(to_all.partition_event_ids[0], to_all.event_id, "the first is event_id");
    assert_eq!(to_all.partition_event_ids, to_all_ids, "each user saw its partition's id of the event");
    let one = a.publish_users(&[&users[1]], "", "one partition").await;
    assert!(one.partition_event_ids.is_empty(), "an event with one id lists none: {one:?}");
}

#[tokio::test]
async fn a_client_resumes_on_another_replica_in_order_with_nothing_lost_in_every_partition() {
    let nats = Broker::start().await;
    let (a, b) = (replica(&nats, FLAGS).await, replica(&nats, FLAGS).await);
    for u in one_per_partition("r") {
        let mut first = a.subscribe(&format!("user={u}&topic=news")).await;
        a.publish_users(&[&u], "", "1").await;
        a.publish_topic("news", "2").await;
        assert_eq!(first.next_data(2).await, ["1", "2"]);
        let last = first.last_event_id();
        drop(first);
        // Published through the other replica while the client is away: user, topic, everyone.
        b.publish_users(&[&u], "", "3").await;
        b.publish_topic("news", "4").await;
        b.broadcast("5").await;
        let mut resumed = b.resume(&format!("user={u}&topic=news"), &last).await;
        assert_eq!(resumed.next_data(3).await, ["3", "4", "5"], "user {u}");
        a.publish_users(&[&u], "", "6").await;
        assert_eq!(resumed.next_data(1).await, ["6"], "then live, once");
    }
}

#[tokio::test]
async fn an_id_of_another_partition_gets_ssegate_missed_then_live_events() {
    let nats = Broker::start().await;
    let a = replica(&nats, FLAGS).await;
    let users = one_per_partition("m");
    let mut in_first = a.subscribe(&format!("user={}", users[0])).await;
    a.broadcast("everyone").await;
    assert_eq!(in_first.next_data(1).await, ["everyone"]);
    // An id of partition 0 presented by a user of partition 1 (as an id of a stream before the
    // partitions were made would be): its epoch is not that partition's.
    let mut other = a.resume(&format!("user={}", users[1]), &in_first.last_event_id()).await;
    let mut first = other.next_item().await;
    while matches!(first, Some(Item::Retry(_) | Item::Comment(_))) {
        first = other.next_item().await;
    }
    match first {
        Some(Item::Event(e)) if e.event_type == "ssegate.missed" => {
            let why: serde_json::Value = serde_json::from_str(&e.data).expect("JSON");
            assert_eq!(why["reason"], "other_epoch", "{why}");
        }
        item => panic!("expected ssegate.missed, got {item:?}"),
    }
    a.publish_users(&[&users[1]], "", "live").await;
    assert_eq!(other.next_data(1).await, ["live"]);
}

#[tokio::test]
async fn a_publish_stream_over_partitions_keeps_each_connections_order_and_answers_every_item() {
    use pb::publish_stream_request::Target;
    let nats = Broker::start().await;
    let (a, b) = (replica(&nats, FLAGS).await, replica(&nats, FLAGS).await);
    let users = one_per_partition("s");
    let mut subs = Vec::new();
    for u in &users {
        subs.push(b.subscribe(&format!("user={u}")).await);
    }
    // Items for each user in turn, and every tenth one for everyone: each connection must see
    // its own and everyone's in the order sent.
    let n = 600usize;
    let items: Vec<_> = (0..n)
        .map(|i| {
            let target = if i % 10 == 9 {
                Target::Broadcast(pb::BroadcastTarget {})
            } else {
                Target::Users(pb::UserTarget { user_ids: vec![users[i % P].clone()] })
            };
            pb::PublishStreamRequest { target: Some(target), event: Some(ev("", &i.to_string())), ..Default::default() }
        })
        .collect();
    let mut answers = a.client.clone().publish_stream(tokio_stream::iter(items)).await.unwrap().into_inner();
    let mut got = 0;
    while let Some(answer) = timeout_at(deadline(), answers.message()).await.expect("answers").unwrap() {
        assert_eq!((answer.index, answer.code), (got, Code::Ok as i32), "{answer:?}");
        got += 1;
    }
    assert_eq!(got, n as u64);
    for (k, sub) in subs.iter_mut().enumerate() {
        let expected: Vec<String> = (0..n).filter(|i| i % 10 == 9 || i % P == k).map(|i| i.to_string()).collect();
        assert_eq!(sub.next_data(expected.len()).await, expected, "user {}", users[k]);
    }
}

#[tokio::test]
async fn presence_stats_and_disconnect_cover_every_partition_of_a_replica() {
    let nats = Broker::start().await;
    let a = replica(&nats, FLAGS).await;
    let users = one_per_partition("p");
    let mut subs = Vec::new();
    for u in &users {
        subs.push(a.subscribe(&format!("user={u}&group=team")).await);
    }
    let presence = a
        .client
        .clone()
        .presence(pb::PresenceRequest {
            user_ids: users.clone(),
            groups: vec!["team".into()],
            list_online: Some(pb::OnlineUsersPage { after: String::new(), limit: 10 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(presence.users.iter().all(|u| u.connections == 1), "{presence:?}");
    assert_eq!(presence.groups[0].connections, P as u64);
    let mut online = presence.online_user_ids.clone();
    online.sort();
    let mut expected = users.clone();
    expected.sort();
    assert_eq!(online, expected);
    assert_eq!(a.stats().await.connections, P as u64);
    let closed = a
        .client
        .clone()
        .disconnect(pb::DisconnectRequest { user_id: users[2].clone(), reason: "bye".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.closed, 1);
    a.wait_connections(&users[2], 0).await;
}

#[tokio::test]
async fn a_replica_with_another_partition_count_refuses_to_start_and_says_why() {
    let nats = Broker::start().await;
    let _a = replica(&nats, FLAGS).await;
    let url = nats.url();
    let args =
        ["serve", "--backplane", "nats", "--nats-url", &url, "--nats-partitions", "2", "--http-addr", "127.0.0.1:0"];
    let rest = ["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--insecure-dev-identity"];
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssegate"))
        .args(args)
        .args(rest)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = timeout_at(deadline(), out).await.expect("exits in time").expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("made for 3 partition(s), not --nats-partitions 2"), "{stderr}");
}

/// (event type, data) of the retained events a fresh stream of `user` is sent before its
/// cursor, read until a marker published after the cursor.
async fn sent_on_connect(app: &crate::helpers::TestApp, user: &str, extra: &str) -> Vec<(String, String)> {
    let mut stream = app.subscribe(&format!("user={user}{extra}")).await;
    stream.cursor().await;
    app.publish_users(&[user], "", "marker").await;
    let mut retained = Vec::new();
    loop {
        let e = stream.next_event().await;
        if e.data == "marker" {
            return retained;
        }
        retained.push((e.event_type, e.data));
    }
}

#[tokio::test]
async fn retained_values_reach_users_of_every_partition_and_survive_a_restart_of_the_replicas() {
    let nats = Broker::start().await;
    let mut a = replica(&nats, FLAGS).await;
    let users = one_per_partition("k");
    let keep = Some(pb::Retain { ttl_seconds: 0, clear: false });
    let group = pb::PublishGroupRequest {
        group: "g".into(),
        event: Some(ev("status", "busy")),
        retain: keep,
        ..Default::default()
    };
    a.client.clone().publish_group(group).await.expect("group value");
    for u in &users {
        let req = pb::PublishRequest {
            user_ids: vec![u.clone()],
            event: Some(ev("badge", u)),
            retain: keep,
            ..Default::default()
        };
        a.client.clone().publish(req).await.expect("user value");
    }
    let expect = |u: &str| vec![("status".to_owned(), "busy".to_owned()), ("badge".to_owned(), u.to_owned())];
    for u in &users {
        assert_eq!(sent_on_connect(&a, u, "&group=g").await, expect(u), "before the restart");
    }
    a.stop().await;
    // No replay log: the values can only come from each partition's bucket.
    let b = replica(&nats, &["--nats-partitions", "3", "--replay-capacity", "0"]).await;
    for u in &users {
        assert_eq!(sent_on_connect(&b, u, "&group=g").await, expect(u), "after the restart");
    }
}

#[tokio::test]
async fn an_event_stored_in_some_partitions_only_is_answered_partial_and_a_retry_with_its_key_completes_it_once() {
    let nats = Broker::start().await;
    let a = replica(&nats, FLAGS).await;
    let users = one_per_partition("f");
    let mut subs = Vec::new();
    for u in &users {
        subs.push(a.subscribe(&format!("user={u}")).await);
    }
    // Partition 1's stream refuses anything but tiny messages for a while.
    let js = nats.jetstream().await;
    let mut p1 = js.get_stream("SSEGATE-p1").await.expect("partition 1");
    let config = p1.info().await.expect("info").config.clone();
    js.update_stream(async_nats::jetstream::stream::Config { max_message_size: 16, ..config.clone() })
        .await
        .expect("shrink");
    let req = pb::BroadcastRequest {
        event: Some(ev("", "for everyone")),
        idempotency_key: "everyone-1".into(),
        ..Default::default()
    };
    let err = a.client.clone().broadcast(req.clone()).await.expect_err("partition 1 refuses it");
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(err.message().contains("outcome partial: stored in 2 of the 3 partitions"), "{}", err.message());

    js.update_stream(config).await.expect("restore");
    let retried = a.client.clone().broadcast(req).await.expect("the retry completes it").into_inner();
    assert!(!retried.event_id.is_empty());
    a.broadcast("marker").await;
    for (u, sub) in users.iter().zip(&mut subs) {
        assert_eq!(sub.next_data(2).await, ["for everyone", "marker"], "{u}: once, whichever attempt stored it");
    }
}

#[tokio::test]
async fn a_recreated_partition_stream_concerns_its_own_users_only() {
    let nats = Broker::start().await;
    let a = replica(&nats, FLAGS).await;
    let users = one_per_partition("d");
    let (mut in_p0, mut in_p2) =
        (a.subscribe(&format!("user={}", users[0])).await, a.subscribe(&format!("user={}", users[2])).await);
    a.publish_users(&[&users[0]], "", "before").await;
    let old = a.publish_users(&[&users[2]], "", "before").await.event_id;
    assert_eq!(in_p0.next_data(1).await, ["before"]);
    assert_eq!(in_p2.next_data(1).await, ["before"]);

    nats.jetstream().await.delete_stream("SSEGATE-p2").await.expect("delete partition 2");
    // Partition 2's replica side notices (its probe recreates the stream) and tells its users.
    let e = in_p2.next_event().await;
    assert_eq!(e.event_type, "ssegate.missed", "{e:?}");
    let why: serde_json::Value = serde_json::from_str(&e.data).expect("JSON");
    assert_eq!((why["reason"].as_str(), why["last_event_id"].as_str()), (Some("stream_recreated"), Some(old.as_str())));
    // Publishes to partition 2 work again once the replica has followed the new stream.
    let end = deadline();
    let req =
        pb::PublishRequest { user_ids: vec![users[2].clone()], event: Some(ev("", "after")), ..Default::default() };
    while a.client.clone().publish(req.clone()).await.is_err() {
        assert!(tokio::time::Instant::now() < end, "partition 2 never took publishes again");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(in_p2.next_data(1).await, ["after"]);
    // Partition 0 saw nothing of it: its stream goes on, no ssegate.missed.
    a.publish_users(&[&users[0]], "", "after").await;
    let e = in_p0.next_event().await;
    assert_eq!((e.event_type.as_str(), e.data.as_str()), ("message", "after"));
}
