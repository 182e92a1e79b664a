//! Every invalid request gets the right status and a reason, and the server keeps serving.

use tonic::Code;

use ssegate::grpc::pb;

use crate::helpers::{ev, spawn_app};

#[tokio::test]
async fn invalid_publishes_get_invalid_argument_naming_the_problem() {
    let app = spawn_app(&["--max-event-bytes", "100", "--max-ids-per-request", "3"]).await;
    let mut sub = app.subscribe("user=u").await;
    let mut c = app.client.clone();
    let user = |ids: &[&str], e: Option<pb::Event>| pb::PublishRequest {
        user_ids: ids.iter().map(|s| s.to_string()).collect(),
        event: e,
        ..Default::default()
    };
    let long = "x".repeat(257);
    let cases: Vec<(pb::PublishRequest, &str)> = vec![
        (user(&[], Some(ev("", "x"))), "user_ids is required"),
        (user(&["u"], None), "event is required"),
        (user(&[""], Some(ev("", "x"))), "user_ids[0] must not be empty"),
        (user(&["u", "a\nb"], Some(ev("", "x"))), "user_ids[1] contains the control character U+000A"),
        (user(&[&long], Some(ev("", "x"))), "user_ids[0] is 257 bytes, longer than the limit of 256 bytes"),
        (user(&["a", "b", "c", "d"], Some(ev("", "x"))), "user_ids has 4 entries, over the limit of 3"),
        (user(&["u"], Some(ev("evil\r\nid: 1", "x"))), "event.name contains the control character U+000D"),
        (user(&["u"], Some(ev("x\ny", "x"))), "event.name contains the control character U+000A"),
        (user(&["u"], Some(ev("ssegate.disconnect", "x"))), "event.name starts with the reserved prefix"),
        (user(&["u"], Some(ev("", &"d".repeat(101)))), "event is 101 bytes (name + data), over the limit of 100 bytes"),
    ];
    for (req, expected) in cases {
        let status = c.publish(req.clone()).await.expect_err("must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{req:?}");
        assert!(status.message().contains(expected), "{:?} should contain {expected:?}", status.message());
    }
    let status = c
        .publish_group(pb::PublishGroupRequest { group: String::new(), event: Some(ev("", "x")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "group must not be empty"));
    let status = c
        .publish_topic(pb::PublishTopicRequest {
            topic: "a\u{7f}".into(),
            event: Some(ev("", "x")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "topic contains the control character U+007F")
    );
    let status = c.broadcast(pb::BroadcastRequest { event: None, ..Default::default() }).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "event is required"));
    let status =
        c.disconnect(pb::DisconnectRequest { user_id: String::new(), reason: String::new() }).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "user_id must not be empty"));
    let status =
        c.disconnect(pb::DisconnectRequest { user_id: "u".into(), reason: "r".repeat(1025) }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let req = pb::PresenceRequest { topics: vec!["ok".into(), String::new()], ..Default::default() };
    let status = c.presence(req).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "topics[1] must not be empty"));
    let req = pb::PresenceRequest {
        list_online: Some(pb::OnlineUsersPage { limit: 10_001, after: String::new() }),
        ..Default::default()
    };
    assert_eq!(c.presence(req).await.unwrap_err().code(), Code::InvalidArgument);

    let ok = app.publish_users(&["u"], "", "still serving").await;
    let got = sub.next_event().await;
    assert_eq!((got.data.as_str(), got.last_event_id.as_str()), ("still serving", ok.event_id.as_str()));
    assert_eq!(app.stats().await.events_published, 1, "refused requests published nothing");
}

#[tokio::test]
async fn an_oversized_grpc_message_is_refused_and_the_server_keeps_serving() {
    let app = spawn_app(&["--grpc-max-message-bytes", "4096"]).await;
    let mut c = app.client.clone();
    let big = pb::BroadcastRequest { event: Some(ev("", &"x".repeat(10_000))), ..Default::default() };
    let status = c.broadcast(big).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(app.broadcast("small").await.event_id.contains('-'));
}
