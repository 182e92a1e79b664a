//! `History`: the recent events of one user, group or topic from the replay log, newest first,
//! a page at a time; a stream opened from the page's position continues without a gap or a
//! repeat; bad requests get clear errors. Over HTTP/JSON: `connect.rs`.

use ssegate::grpc::pb::{self, history_request::Target};
use tonic::Code;

use crate::helpers::{TestApp, spawn_app};

async fn history(
    app: &TestApp,
    target: Target,
    limit: u32,
    before: &str,
) -> Result<pb::HistoryResponse, tonic::Status> {
    let req = pb::HistoryRequest { target: Some(target), limit, before: before.into() };
    app.client.clone().history(req).await.map(|r| r.into_inner())
}

fn user(u: &str) -> Target {
    Target::UserId(u.into())
}

fn datas(page: &pb::HistoryResponse) -> Vec<&str> {
    page.events.iter().map(|e| e.data.as_str()).collect()
}

#[tokio::test]
async fn a_users_history_comes_newest_first_a_page_at_a_time_and_only_what_was_published_to_them() {
    let app = spawn_app(&[]).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(app.publish_users(&["u", "other"], "", &format!("u{i}")).await.event_id);
        // Interleaved: events to someone else, to a group and a topic, and broadcasts.
        app.publish_users(&["v"], "", &format!("v{i}")).await;
        if i % 5 == 0 {
            app.publish_group("g", &format!("g{i}")).await;
            app.publish_topic("t", &format!("t{i}")).await;
            app.broadcast(&format!("b{i}")).await;
        }
    }
    let first = history(&app, user("u"), 10, "").await.unwrap();
    let want: Vec<String> = (15..25).rev().map(|i| format!("u{i}")).collect();
    assert_eq!(datas(&first), want);
    assert_eq!(first.events[0].id, ids[24]);
    assert_eq!(first.next_before, ids[15], "the next page starts below the oldest of this one");
    let newest = app.broadcast("newest").await.event_id;
    let second = history(&app, user("u"), 10, &first.next_before).await.unwrap();
    assert_eq!(datas(&second), (5..15).rev().map(|i| format!("u{i}")).collect::<Vec<_>>());
    let last = history(&app, user("u"), 10, &second.next_before).await.unwrap();
    assert_eq!(datas(&last), (0..5).rev().map(|i| format!("u{i}")).collect::<Vec<_>>());
    assert_eq!((last.next_before.as_str(), last.truncated), ("", false), "the whole history, nothing evicted");
    assert_eq!(last.position, newest, "the position is the newest id as the page was read");

    let g = history(&app, Target::Group("g".into()), 0, "").await.unwrap();
    assert_eq!(datas(&g), ["g20", "g15", "g10", "g5", "g0"], "a limit of 0 means the default");
    let t = history(&app, Target::Topic("t".into()), 2, "").await.unwrap();
    assert_eq!(datas(&t), ["t20", "t15"]);
    let b = history(&app, Target::Broadcast(pb::BroadcastTarget {}), 2, "").await.unwrap();
    assert_eq!(datas(&b), ["newest", "b20"]);
    let none = history(&app, user("nobody"), 10, "").await.unwrap();
    assert!(none.events.is_empty() && none.next_before.is_empty());
    assert_eq!(none.position, newest);
}

#[tokio::test]
async fn names_and_multi_line_data_come_back_as_published() {
    let app = spawn_app(&[]).await;
    app.publish_users(&["u"], "chat", "line one\nline two").await;
    app.publish_users(&["u"], "", "").await;
    let page = history(&app, user("u"), 10, "").await.unwrap();
    let got: Vec<_> = page.events.iter().map(|e| (e.name.as_str(), e.data.as_str())).collect();
    assert_eq!(got, [("", ""), ("chat", "line one\nline two")]);
}

#[tokio::test]
async fn a_stream_opened_at_the_pages_position_continues_it_without_a_gap_or_a_repeat() {
    let app = spawn_app(&[]).await;
    for i in 0..3 {
        app.publish_users(&["u"], "", &format!("old{i}")).await;
    }
    let page = history(&app, user("u"), 10, "").await.unwrap();
    assert_eq!(datas(&page), ["old2", "old1", "old0"]);
    // Published between reading the page and opening the stream: it must arrive, once.
    let between = app.publish_users(&["u"], "", "between").await.event_id;
    let mut stream = app.resume("user=u", &page.position).await;
    let e = stream.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("between", between.as_str()));
    let live = app.publish_users(&["u"], "", "live").await.event_id;
    let e = stream.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("live", live.as_str()));
}

#[tokio::test]
async fn the_last_page_says_when_the_log_has_evicted_events() {
    let app = spawn_app(&["--replay-capacity", "4"]).await;
    for i in 0..10 {
        app.publish_users(&["u"], "", &format!("e{i}")).await;
    }
    let page = history(&app, user("u"), 100, "").await.unwrap();
    assert_eq!(datas(&page), ["e9", "e8", "e7", "e6"], "what the log still holds");
    assert!(page.truncated, "older events were evicted");
    assert!(page.next_before.is_empty());
}

#[tokio::test]
async fn bad_history_requests_get_clear_errors() {
    let app = spawn_app(&[]).await;
    let id = app.publish_users(&["u"], "", "x").await.event_id;
    let err = app.client.clone().history(pb::HistoryRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("target"), "{err:?}");
    let err = history(&app, user(""), 10, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = history(&app, user("u"), 1001, "").await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "limit is 1001, over the limit of 1000"));
    let err = history(&app, user("u"), 10, "yesterday").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("before: not an ssegate event id"), "{err:?}");
    // An id of another process: the caller starts again from the newest.
    let (epoch, seq) = id.split_once('-').unwrap();
    let other_epoch = format!("{:x}-{seq}", u64::from_str_radix(epoch, 16).unwrap() ^ 1);
    let err = history(&app, user("u"), 10, &other_epoch).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("earlier server process"), "{err:?}");
    // And the server keeps serving.
    assert_eq!(datas(&history(&app, user("u"), 10, "").await.unwrap()), ["x"]);
}
