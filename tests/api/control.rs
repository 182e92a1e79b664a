//! Disconnect, Presence and Stats while connections come and go.

use ssegate::{event_stream::parse::Item, grpc::pb};

use crate::helpers::spawn_app;

#[tokio::test]
async fn disconnect_closes_exactly_that_users_streams_with_a_final_event() {
    let app = spawn_app(&[]).await;
    let mut a1 = app.subscribe("user=a").await;
    let mut a2 = app.subscribe("user=a&topic=t").await;
    let mut b = app.subscribe("user=b&topic=t").await;
    let req = pb::DisconnectRequest { user_id: "a".into(), reason: "logged out".into() };
    let resp = app.client.clone().disconnect(req).await.unwrap().into_inner();
    assert_eq!(resp.closed, 2);
    for a in [&mut a1, &mut a2] {
        let items = a.until_end().await;
        let events: Vec<_> =
            items.into_iter().filter_map(|i| if let Item::Event(e) = i { Some(e) } else { None }).collect();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].event_type.as_str(), events[0].data.as_str()), ("ssegate.disconnect", "logged out"));
        assert!(a.ended, "the stream ended");
    }
    assert_eq!(app.publish_topic("t", "still here").await.recipients, Some(1));
    assert_eq!(b.next_event().await.data, "still here");
    let again = pb::DisconnectRequest { user_id: "a".into(), reason: String::new() };
    assert_eq!(app.client.clone().disconnect(again).await.unwrap().into_inner().closed, 0, "nothing left to close");
}

#[tokio::test]
async fn presence_and_stats_follow_connections_as_they_come_and_go() {
    let app = spawn_app(&[]).await;
    let presence = |users: &[&str], groups: &[&str], topics: &[&str]| {
        let req = pb::PresenceRequest {
            user_ids: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            topics: topics.iter().map(|s| s.to_string()).collect(),
            list_online: None,
        };
        let mut client = app.client.clone();
        async move { client.presence(req).await.unwrap().into_inner() }
    };
    let a1 = app.subscribe("user=a&group=g&topic=t").await;
    let a2 = app.subscribe("user=a&group=g").await;
    let b = app.subscribe("user=b&topic=t").await;

    let p = presence(&["a", "b", "c"], &["g", "none"], &["t"]).await;
    let users: Vec<_> = p.users.iter().map(|u| (u.user_id.as_str(), u.online, u.connections)).collect();
    assert_eq!(users, [("a", true, 2), ("b", true, 1), ("c", false, 0)]);
    assert_eq!(p.groups.iter().map(|g| (g.name.as_str(), g.connections)).collect::<Vec<_>>(), [("g", 2), ("none", 0)]);
    assert_eq!(p.topics[0].connections, 2);
    let s = app.stats().await;
    assert_eq!((s.connections, s.users, s.groups, s.topics, s.connections_opened), (3, 2, 1, 1, 3));

    drop(a2);
    app.wait_stats("a2 to go", |s| s.connections == 2).await;
    let p = presence(&["a"], &["g"], &[]).await;
    assert_eq!((p.users[0].connections, p.groups[0].connections), (1, 1));

    drop(a1);
    drop(b);
    let s = app.wait_stats("everyone to go", |s| s.connections == 0).await;
    assert_eq!((s.users, s.groups, s.topics, s.connections_opened), (0, 0, 0, 3));
    assert!(!presence(&["a"], &[], &[]).await.users[0].online);
}

#[tokio::test]
async fn stats_count_published_delivered_and_dropped() {
    let app = spawn_app(&[]).await;
    let mut a = app.subscribe("user=a").await;
    let mut b = app.subscribe("user=b").await;
    app.broadcast("one").await;
    app.publish_users(&["a"], "", "two").await;
    a.next_data(2).await;
    b.next_data(1).await;
    let s = app.wait_stats("3 deliveries", |s| s.events_delivered == 3).await;
    assert_eq!((s.events_published, s.events_dropped), (2, 0));
}

#[tokio::test]
async fn online_users_are_listed_page_by_page() {
    let app = spawn_app(&[]).await;
    let mut conns = Vec::new();
    for u in ["carol", "alice", "dave", "bob", "alice"] {
        conns.push(app.subscribe(&format!("user={u}")).await);
    }
    let page = |after: &str| {
        let req = pb::PresenceRequest {
            list_online: Some(pb::OnlineUsersPage { limit: 2, after: after.into() }),
            ..Default::default()
        };
        let mut client = app.client.clone();
        async move { client.presence(req).await.unwrap().into_inner() }
    };
    let p1 = page("").await;
    assert_eq!((p1.online_user_ids.clone(), p1.next_after.as_str()), (vec!["alice".to_string(), "bob".into()], "bob"));
    let p2 = page(&p1.next_after).await;
    assert_eq!((p2.online_user_ids.clone(), p2.next_after.as_str()), (vec!["carol".to_string(), "dave".into()], ""));
    // A page that happens to be full but is the last one says so: no empty extra round trip.
    let p3 = page("dave").await;
    assert!(p3.online_user_ids.is_empty() && p3.next_after.is_empty());
}

#[tokio::test]
async fn shutdown_drains_queued_events_then_ends_every_stream_with_a_jittered_retry() {
    let mut app = spawn_app(&["--retry", "1s"]).await;
    let mut a = app.subscribe("user=a").await;
    let mut b = app.subscribe("user=b").await;
    app.publish_users(&["a", "b"], "", "last words").await;
    app.stop().await;
    for c in [&mut a, &mut b] {
        let items = c.until_end().await;
        let data: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) if !e.event_type.starts_with("ssegate.") => Some(e.data.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(data, ["last words"], "queued event is delivered before the stream ends");
        // The last block tells the browser to come back later than usual, spread over time so
        // that every client of a stopped replica does not reconnect in the same instant.
        let ms = crate::helpers::shutdown_retry(&items);
        assert!((1000..=3000).contains(&ms), "jittered retry {ms}");
    }
    assert!(tokio::net::TcpStream::connect(app.http).await.is_err(), "listener closed");
}
