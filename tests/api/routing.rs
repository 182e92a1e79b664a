//! Who receives what. "Nobody else receives" is checked without sleeping: after the targeted
//! event, a broadcast marker is published; since every connection receives in publish order,
//! a connection whose next event is the marker provably did not receive the targeted one.

use crate::helpers::{SseClient, spawn_app};

async fn next_is_marker(clients: &mut [&mut SseClient], marker: &str) {
    for c in clients.iter_mut() {
        assert_eq!(c.next_event().await.data, marker, "a connection received an event not meant for it");
    }
}

#[tokio::test]
async fn publish_to_a_user_reaches_only_that_users_connections() {
    let app = spawn_app(&[]).await;
    let mut alice = app.subscribe("user=alice").await;
    let mut bob = app.subscribe("user=bob").await;
    let resp = app.publish_users(&["alice"], "", "for alice").await;
    assert_eq!(resp.recipients, Some(1));
    let ev = alice.next_event().await;
    assert_eq!(ev.data, "for alice");
    assert_eq!(ev.last_event_id, resp.event_id, "the id returned to the publisher is the one subscribers see");
    app.broadcast("marker").await;
    assert_eq!(alice.next_event().await.data, "marker");
    next_is_marker(&mut [&mut bob], "marker").await;
}

#[tokio::test]
async fn publish_to_several_users_reaches_each_once_even_if_listed_twice() {
    let app = spawn_app(&[]).await;
    let mut a = app.subscribe("user=a").await;
    let mut b = app.subscribe("user=b").await;
    let mut c = app.subscribe("user=c").await;
    let resp = app.publish_users(&["a", "b", "a", "nobody"], "", "ab").await;
    assert_eq!(resp.recipients, Some(2));
    app.broadcast("marker").await;
    assert_eq!(a.next_data(2).await, ["ab", "marker"]);
    assert_eq!(b.next_data(2).await, ["ab", "marker"]);
    next_is_marker(&mut [&mut c], "marker").await;
}

#[tokio::test]
async fn every_connection_of_a_user_receives() {
    let app = spawn_app(&[]).await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        tabs.push(app.subscribe("user=multi").await);
    }
    assert_eq!(app.publish_users(&["multi"], "", "all tabs").await.recipients, Some(3));
    for tab in &mut tabs {
        assert_eq!(tab.next_event().await.data, "all tabs");
    }
}

#[tokio::test]
async fn publish_to_a_group_reaches_its_members_only() {
    let app = spawn_app(&[]).await;
    let mut m1 = app.subscribe("user=u1&group=admins").await;
    let mut m2 = app.subscribe("user=u2&group=admins&group=ops").await;
    let mut other = app.subscribe("user=u3&group=ops").await;
    assert_eq!(app.publish_group("admins", "to admins").await.recipients, Some(2));
    app.broadcast("marker").await;
    assert_eq!(m1.next_data(2).await, ["to admins", "marker"]);
    assert_eq!(m2.next_data(2).await, ["to admins", "marker"]);
    next_is_marker(&mut [&mut other], "marker").await;
}

#[tokio::test]
async fn publish_to_a_topic_reaches_its_subscribers_only() {
    let app = spawn_app(&[]).await;
    let mut s1 = app.subscribe("user=u1&topic=prices.EURUSD").await;
    let mut s2 = app.subscribe("user=u2&topic=prices.EURUSD&topic=news").await;
    let mut other = app.subscribe("user=u3&topic=prices.GBPUSD").await;
    assert_eq!(app.publish_topic("prices.EURUSD", "1.0842").await.recipients, Some(2));
    app.broadcast("marker").await;
    assert_eq!(s1.next_data(2).await, ["1.0842", "marker"]);
    assert_eq!(s2.next_data(2).await, ["1.0842", "marker"]);
    next_is_marker(&mut [&mut other], "marker").await;
}

#[tokio::test]
async fn broadcast_reaches_every_connection_once() {
    let app = spawn_app(&[]).await;
    let mut a = app.subscribe("user=a&group=g&topic=t").await;
    let mut b = app.subscribe("user=b").await;
    assert_eq!(app.broadcast("hello all").await.recipients, Some(2));
    app.publish_topic("t", "second").await;
    assert_eq!(
        a.next_data(2).await,
        ["hello all", "second"],
        "a connection in a group and a topic gets a broadcast once"
    );
    assert_eq!(b.next_event().await.data, "hello all");
}

#[tokio::test]
async fn ids_with_dots_spaces_wildcards_and_unicode_route_exactly() {
    let app = spawn_app(&[]).await;
    let mut star = app.subscribe("user=*&topic=a.%3E").await;
    let mut dotted = app.subscribe("user=a.b%20c&topic=a.b").await;
    let mut uni = app.subscribe("user=%E7%94%A8%E6%88%B7&topic=%F0%9F%93%88").await;
    app.publish_users(&["a.b c"], "", "dotted").await;
    app.publish_topic("a.>", "wild").await;
    app.publish_topic("📈", "chart").await;
    app.publish_users(&["用户"], "", "unicode user").await;
    app.broadcast("marker").await;
    assert_eq!(star.next_data(2).await, ["wild", "marker"], "`*` and `>` are plain names, not patterns");
    assert_eq!(dotted.next_data(2).await, ["dotted", "marker"]);
    assert_eq!(uni.next_data(3).await, ["chart", "unicode user", "marker"]);
}

#[tokio::test]
async fn each_connection_receives_in_publish_order_under_concurrent_publishers() {
    let app = spawn_app(&["--queue-capacity", "4096"]).await;
    let mut sub = app.subscribe("user=u&topic=t").await;
    let mut tasks = Vec::new();
    for p in 0..4 {
        let app_client = app.client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                let mut c = app_client.clone();
                let req = ssegate::grpc::pb::PublishTopicRequest {
                    topic: "t".into(),
                    event: Some(crate::helpers::ev("", &format!("{p}:{i}"))),
                    ..Default::default()
                };
                c.publish_topic(req).await.unwrap();
            }
        }));
    }
    let mut by_publisher = vec![Vec::new(); 4];
    for t in tasks {
        t.await.unwrap();
    }
    let mut last_seq = 0u64;
    for _ in 0..400 {
        let ev = sub.next_event().await;
        let seq: u64 = ev.last_event_id.rsplit('-').next().unwrap().parse().unwrap();
        assert!(seq > last_seq, "ids increase along the stream");
        last_seq = seq;
        let (p, i) = ev.data.split_once(':').unwrap();
        by_publisher[p.parse::<usize>().unwrap()].push(i.parse::<u32>().unwrap());
    }
    for (p, seen) in by_publisher.iter().enumerate() {
        assert_eq!(seen, &(0..100).collect::<Vec<_>>(), "publisher {p}'s events arrive complete and in its order");
    }
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_is_delivered_once_in_memory_too() {
    let app = spawn_app(&[]).await;
    let mut sub = app.subscribe("user=u").await;
    let req = ssegate::grpc::pb::PublishRequest {
        retain: None,
        user_ids: vec!["u".into()],
        event: Some(crate::helpers::ev("", "once")),
        idempotency_key: "retry-me".into(),
    };
    let first = app.client.clone().publish(req.clone()).await.unwrap().into_inner();
    let retry = app.client.clone().publish(req).await.unwrap().into_inner();
    assert_eq!(first.event_id, retry.event_id);
    app.broadcast("marker").await;
    assert_eq!(sub.next_data(2).await, ["once", "marker"]);
}
