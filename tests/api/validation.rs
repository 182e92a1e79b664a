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
async fn an_oversized_grpc_message_gets_resource_exhausted_and_the_server_keeps_serving() {
    let app = spawn_app(&["--grpc-max-message-bytes", "4096"]).await;
    let mut c = app.client.clone();
    // Over the limit (read, then refused by the service), and over twice the limit (refused by
    // the transport before it is read): both RESOURCE_EXHAUSTED, as grpc-go and grpc-java say.
    for len in [6_000, 10_000] {
        let big = pb::BroadcastRequest { event: Some(ev("", &"x".repeat(len))), ..Default::default() };
        let status = c.broadcast(big).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{len} bytes: {status:?}");
        assert!(status.message().contains("4096"), "{status:?}");
    }
    assert!(app.broadcast("small").await.event_id.contains('-'));
}

#[tokio::test]
async fn an_oversized_publish_stream_item_is_refused_alone_and_a_huge_one_ends_the_stream() {
    let app = spawn_app(&["--grpc-max-message-bytes", "4096"]).await;
    let item = |data: &str| pb::PublishStreamRequest {
        target: Some(pb::publish_stream_request::Target::Broadcast(pb::BroadcastTarget {})),
        event: Some(ev("", data)),
        ..Default::default()
    };
    let items = vec![item("a"), item(&"x".repeat(6_000)), item("b")];
    let mut answers = app.client.clone().publish_stream(tokio_stream::iter(items)).await.unwrap().into_inner();
    let mut codes = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        codes.push(Code::from_i32(a.code));
    }
    assert_eq!(codes, [Code::Ok, Code::ResourceExhausted, Code::Ok]);
    let items = vec![item("c"), item(&"x".repeat(10_000))];
    let mut answers = app.client.clone().publish_stream(tokio_stream::iter(items)).await.unwrap().into_inner();
    assert_eq!(Code::from_i32(answers.message().await.unwrap().unwrap().code), Code::Ok);
    let status = answers.message().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn a_request_that_is_not_protobuf_gets_invalid_argument() {
    let app = spawn_app(&[]).await;
    let tcp = tokio::net::TcpStream::connect(app.grpc).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/ssegate.v1.Publisher/Broadcast", app.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = client.ready().await.unwrap().send_request(req, false).unwrap();
    // One uncompressed gRPC frame of 4 bytes that are no valid protobuf (field 1, wire type 7).
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 4, 0x0f, 0xff, 0xff, 0xff]), true).unwrap();
    let resp = resp.await.unwrap();
    let status = match resp.headers().get("grpc-status") {
        Some(s) => s.clone(),
        None => resp.into_body().trailers().await.unwrap().unwrap()["grpc-status"].clone(),
    };
    assert_eq!(status, "3", "INVALID_ARGUMENT");
    assert!(app.broadcast("still serving").await.event_id.contains('-'));
}
