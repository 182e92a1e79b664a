//! PublishStream: one answer per request, in order, each with its own status.

use tokio_stream::StreamExt;
use tonic::Code;

use ssegate::grpc::pb::{self, publish_stream_request::Target};

use crate::helpers::{ev, spawn_app};

fn item(target: Target, data: &str) -> pb::PublishStreamRequest {
    pb::PublishStreamRequest { target: Some(target), event: Some(ev("", data)), ..Default::default() }
}

#[tokio::test]
async fn publish_stream_answers_in_order_and_a_bad_item_does_not_end_it() {
    let app = spawn_app(&[]).await;
    let mut u = app.subscribe("user=u&group=g&topic=t").await;
    let requests = vec![
        item(Target::Users(pb::UserTarget { user_ids: vec!["u".into()] }), "1"),
        item(Target::Group("".into()), "bad group"),
        item(Target::Group("g".into()), "2"),
        pb::PublishStreamRequest { target: None, event: Some(ev("", "no target")), ..Default::default() },
        item(Target::Topic("t".into()), "3"),
        pb::PublishStreamRequest {
            target: Some(Target::Broadcast(pb::BroadcastTarget {})),
            event: None,
            ..Default::default()
        },
        item(Target::Broadcast(pb::BroadcastTarget {}), "4"),
        item(Target::Users(pb::UserTarget { user_ids: vec![] }), "no users"),
    ];
    let n = requests.len();
    let mut answers =
        app.client.clone().publish_stream(tokio_stream::iter(requests)).await.expect("stream opens").into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.next().await {
        got.push(a.expect("per-item errors are answers, not stream errors"));
    }
    assert_eq!(got.len(), n, "one answer per request");
    let summary: Vec<_> = got.iter().map(|a| (a.index, Code::from_i32(a.code))).collect();
    use Code::{InvalidArgument as Bad, Ok};
    assert_eq!(summary, [(0, Ok), (1, Bad), (2, Ok), (3, Bad), (4, Ok), (5, Bad), (6, Ok), (7, Bad)]);
    assert_eq!(got[1].message, "group must not be empty");
    assert_eq!(got[3].message, "target is required");
    assert_eq!(got[5].message, "event is required");
    assert_eq!(got[7].message, "users.user_ids is required");
    assert!(got.iter().filter(|a| a.code == 0).all(|a| !a.event_id.is_empty() && a.recipients == Some(1)));
    for (i, expected) in [(0, "1"), (2, "2"), (4, "3"), (6, "4")] {
        let e = u.next_event().await;
        assert_eq!((e.data.as_str(), e.last_event_id.as_str()), (expected, got[i].event_id.as_str()));
    }
}

#[tokio::test]
async fn publish_stream_handles_a_bulk_load_in_order() {
    let app = spawn_app(&["--queue-capacity", "20000", "--max-queue-bytes", "67108864"]).await;
    let mut u = app.subscribe("user=u").await;
    let reqs = (0..5000).map(|i| item(Target::Users(pb::UserTarget { user_ids: vec!["u".into()] }), &i.to_string()));
    let mut answers = app.client.clone().publish_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut count = 0u64;
    while let Some(a) = answers.next().await {
        let a = a.unwrap();
        assert_eq!((a.index, a.code), (count, 0));
        count += 1;
    }
    assert_eq!(count, 5000);
    for i in 0..5000 {
        assert_eq!(u.next_event().await.data, i.to_string());
    }
}

/// A publisher that sends items and never reads the answers: once the answers fill the
/// transport's windows the server stops reading its items (flow control, not memory), and
/// everyone else is served meanwhile.
#[tokio::test]
async fn a_publish_stream_whose_answers_are_never_read_is_held_by_flow_control_and_others_are_served() {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    };
    let app = spawn_app(&[]).await;
    let mut other = app.subscribe("user=other").await;
    let taken = Arc::new(AtomicU64::new(0));
    let counter = taken.clone();
    const ITEMS: u64 = 2_000_000;
    let items = tokio_stream::iter(0..ITEMS).map(move |i| {
        counter.fetch_add(1, Relaxed);
        item(Target::Users(pb::UserTarget { user_ids: vec!["nobody".into()] }), &i.to_string())
    });
    // The answers are never read (the stream is held, not polled).
    let _answers = app.client.clone().publish_stream(items).await.expect("stream opens").into_inner();
    // Wait until the client can send no more: no item taken for a second.
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = taken.load(Relaxed);
        if now == last {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "the stream was never held back ({now} items taken)");
        last = now;
    }
    assert!(last < ITEMS, "flow control held the stream back after {last} items");
    app.publish_users(&["other"], "", "still served").await;
    assert_eq!(other.next_event().await.data, "still served");
}
