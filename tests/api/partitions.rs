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

/// Users named `<prefix><n>`, one in each partition, in partition order.
fn one_per_partition(prefix: &str) -> Vec<String> {
    (0..P)
        .map(|k| (0..).map(|n| format!("{prefix}{n}")).find(|u| partition_of(u, P) == k).unwrap_or_default())
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
        assert_eq!(stored(&nats, s).await, 4, "{s}: its user's event, the three users' one (split), the group's, the broadcast");
    }
    let mut epochs = Vec::new();
    for (u, sub) in users.iter().zip(&mut subs) {
        let got = [sub.next_event().await, sub.next_event().await, sub.next_event().await, sub.next_event().await];
        let data: Vec<&str> = got.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, [format!("for {u}").as_str(), "to all three", "to the group", "to everyone"]);
        let epoch = epoch_of(&got[0].last_event_id);
        assert!(got.iter().all(|e| epoch_of(&e.last_event_id) == epoch), "one partition, one epoch: {got:?}");
        epochs.push(epoch.to_owned());
    }
    epochs.sort();
    epochs.dedup();
    assert_eq!(epochs.len(), P, "each partition numbers its own events");
    assert_eq!(epoch_of(&to_all.event_id), epoch_of(&subs[0].last_event_id()), "the answer names the first partition's id");
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
    let args = ["serve", "--backplane", "nats", "--nats-url", &url, "--nats-partitions", "2", "--http-addr", "127.0.0.1:0"];
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
