//! Retained events ("State on page load"): a publish with `retain` keeps the latest event per
//! target and event name, and a connection that opens without `Last-Event-ID` (or whose resume
//! the log cannot serve) gets the current ones first, without ids, before the cursor (the
//! `ssegate.position` event) and any live event. What a page sees is checked exactly, over real sockets: nothing lost,
//! nothing doubled, nothing sent after it was cleared or expired, ids never moving backwards.
//! Also the limits, the error codes, PublishStream, HTTP/JSON, Stats and `/metrics`, and a real
//! page in headless Chromium (tests/browser/unread-driver.mjs).

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use ssegate::{
    event_stream::parse::{Item, ParsedEvent},
    grpc::pb::{self, publish_stream_request::Target},
    router::RETAINED_VALUE_OVERHEAD,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader, Lines},
    net::TcpStream,
    process::{Child, ChildStdout},
    sync::watch,
    time::{Instant, timeout_at},
};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::helpers::{SseClient, TestApp, deadline, ev, http_request, parse_response, spawn_app};

// ------------------------------------------------------------------------------ helpers

/// `retain` that keeps the value until it is replaced or cleared.
fn keep() -> Option<pb::Retain> {
    Some(pb::Retain { ttl_seconds: 0, clear: false })
}

/// `retain` that keeps the value for `secs` seconds.
fn keep_for(secs: u32) -> Option<pb::Retain> {
    Some(pb::Retain { ttl_seconds: secs, clear: false })
}

/// `retain` that deletes the value (the event itself is still delivered).
fn clear() -> Option<pb::Retain> {
    Some(pb::Retain { ttl_seconds: 0, clear: true })
}

/// Publishes `name`/`data` to `users` with `retain`.
async fn to_users(
    app: &TestApp,
    users: &[&str],
    name: &str,
    data: &str,
    retain: Option<pb::Retain>,
) -> Result<pb::PublishResponse, Status> {
    let req = pb::PublishRequest {
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        event: Some(ev(name, data)),
        idempotency_key: String::new(),
        retain,
    };
    app.client.clone().publish(req).await.map(|r| r.into_inner())
}

/// Publishes a retained value to one user and returns its id.
async fn set(app: &TestApp, user: &str, name: &str, data: &str) -> String {
    to_users(app, &[user], name, data, keep()).await.expect("retained publish").event_id
}

async fn to_group(app: &TestApp, group: &str, name: &str, data: &str, retain: Option<pb::Retain>) -> String {
    let req = pb::PublishGroupRequest {
        group: group.into(),
        event: Some(ev(name, data)),
        idempotency_key: String::new(),
        retain,
    };
    app.client.clone().publish_group(req).await.expect("publish_group").into_inner().event_id
}

async fn to_topic(app: &TestApp, topic: &str, name: &str, data: &str, retain: Option<pb::Retain>) -> String {
    let req = pb::PublishTopicRequest {
        topic: topic.into(),
        event: Some(ev(name, data)),
        idempotency_key: String::new(),
        retain,
    };
    app.client.clone().publish_topic(req).await.expect("publish_topic").into_inner().event_id
}

async fn to_everyone(app: &TestApp, name: &str, data: &str, retain: Option<pb::Retain>) -> String {
    let req = pb::BroadcastRequest { event: Some(ev(name, data)), idempotency_key: String::new(), retain };
    app.client.clone().broadcast(req).await.expect("broadcast").into_inner().event_id
}

/// (event type, data, last event id) of an event, for comparing whole sequences at once.
fn triple(e: &ParsedEvent) -> (String, String, String) {
    (e.event_type.clone(), e.data.clone(), e.last_event_id.clone())
}

/// A retained event as a fresh client parses it: no `id:` line has been seen before it.
fn retained(name: &str, data: &str) -> (String, String, String) {
    (name.into(), data.into(), String::new())
}

fn live(name: &str, data: &str, id: &str) -> (String, String, String) {
    (name.into(), data.into(), id.into())
}

/// Opens `GET /v1/events?{query}` without `Last-Event-ID` and returns the connection, what it
/// got before its cursor (its state on load: each event parsed before any `id:` line), and the
/// cursor. Nothing may be published to it meanwhile: then every item read before the cursor
/// is the state, and a marker published to `user` afterwards is the next event.
async fn open_fresh(app: &TestApp, query: &str, user: &str) -> (SseClient, Vec<(String, String, String)>, String) {
    let mut c = app.subscribe(query).await;
    let cursor = c.cursor().await;
    assert_eq!(c.next_item().await, Some(Item::Retry(3000)), "{query}: the stream opens with its retry field");
    // Everything read up to the cursor is buffered now; a marker published after it marks the
    // end of that buffer.
    let marker = to_users(app, &[user], "marker", query, None).await.unwrap().event_id;
    let mut state = Vec::new();
    loop {
        let e = c.next_event().await;
        if e.event_type == "marker" {
            assert_eq!(e.last_event_id, marker, "{query}: the marker carries its own id");
            break;
        }
        state.push(triple(&e));
    }
    (c, state, cursor)
}

/// The state a new connection of `user` (with `extra` query parameters) gets on load.
async fn state_on_load(app: &TestApp, user: &str, extra: &str) -> Vec<(String, String, String)> {
    open_fresh(app, &format!("user={user}{extra}"), user).await.1
}

/// The first bytes of a fresh stream's body, dechunked, up to and including its cursor:
/// the exact frames a page receives first.
async fn opening_bytes(addr: SocketAddr, query: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET /v1/events?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    let (mut raw, mut buf) = (Vec::new(), [0u8; 4096]);
    let end = deadline();
    loop {
        let n = timeout_at(end, s.read(&mut buf)).await.expect("opening frames in time").expect("read");
        assert!(n > 0, "stream closed before its cursor: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
        let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200") && head.contains("transfer-encoding: chunked"), "{head}");
        // Dechunk what has arrived so far; stop once the body holds the cursor.
        let (mut body, mut rest) = (Vec::new(), &raw[at + 4..]);
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).expect("chunk size");
            if rest.len() < eol + 2 + size + 2 {
                break;
            }
            body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        let body = String::from_utf8(body).expect("UTF-8 body");
        if body.contains("event: ssegate.position\n") && body.ends_with("\n\n") {
            return body;
        }
    }
}

// ------------------------------------------------------------------------------ page load

#[tokio::test]
async fn a_page_load_gets_the_current_count_first_then_the_cursor_then_live_events() {
    let app = spawn_app(&[]).await;
    set(&app, "alice", "unread", "3").await;
    let newest_for_alice = set(&app, "alice", "unread", "7").await;
    // Neither a plain event nor another user's value is part of alice's state.
    to_users(&app, &["alice"], "unread", "99", None).await.unwrap();
    let newest = set(&app, "bob", "unread", "1").await;
    assert_ne!(newest, newest_for_alice);

    // The exact bytes: the retained event without an `id:` line, then the cursor, an
    // `ssegate.position` event carrying the newest id (not the retained event's own), so the
    // browser's id never moves backwards.
    let body = opening_bytes(app.http, "user=alice").await;
    assert_eq!(
        body,
        format!("retry: 3000\nevent: unread\ndata: 7\n\nevent: ssegate.position\nid: {newest}\ndata: {newest}\n\n")
    );

    // As a browser parses it, then a live update.
    let (mut c, state, cursor) = open_fresh(&app, "user=alice", "alice").await;
    assert_eq!(state, [retained("unread", "7")], "the latest value only, once, before the cursor");
    assert_eq!(cursor, newest);
    let id = set(&app, "alice", "unread", "8").await;
    assert_eq!(triple(&c.next_event().await), live("unread", "8", &id), "then live events, with their ids");
    assert_eq!(app.stats().await.retained_sent, 2, "one retained event per connection opened");
}

#[tokio::test]
async fn state_on_load_covers_the_users_groups_topics_and_broadcast_oldest_first() {
    let app = spawn_app(&[]).await;
    to_group(&app, "admins", "team", "on call: bob", keep()).await;
    set(&app, "alice", "unread", "1").await;
    to_topic(&app, "orders/42", "status", "packed", keep()).await;
    to_everyone(&app, "motd", "maintenance at 22:00", keep()).await;
    to_group(&app, "ops", "team", "not alice's group", keep()).await;
    to_topic(&app, "orders/43", "status", "not alice's topic", keep()).await;
    set(&app, "carol", "unread", "5").await;
    // Replaced: the new value takes the place of the newest.
    set(&app, "alice", "unread", "2").await;
    // The default name (`message`) is a name of its own; a user list sets it for each user.
    to_users(&app, &["alice", "bob", "alice"], "", "hello both", keep()).await.unwrap();
    // A multi-line value arrives whole.
    to_topic(&app, "orders/42", "items", "line 1\nline 2", keep()).await;

    let alice = state_on_load(&app, "alice", "&group=admins&topic=orders/42").await;
    assert_eq!(
        alice,
        [
            retained("team", "on call: bob"),
            retained("status", "packed"),
            retained("motd", "maintenance at 22:00"),
            retained("unread", "2"),
            retained("message", "hello both"),
            retained("items", "line 1\nline 2"),
        ]
    );
    let bob = state_on_load(&app, "bob", "&group=ops").await;
    assert_eq!(
        bob,
        [
            retained("motd", "maintenance at 22:00"),
            retained("team", "not alice's group"),
            retained("message", "hello both")
        ]
    );
    let dave = state_on_load(&app, "dave", "").await;
    assert_eq!(dave, [retained("motd", "maintenance at 22:00")]);
    let s = app.stats().await;
    assert_eq!((s.retained_values, s.retained_sent), (10, 10));
}

// ------------------------------------------------------------------------------ races

/// A counter updated 200 times (absolute values) while 100 connections of its user open at
/// points spread over the updates: each connection gets one value as its state (no id), then
/// every later update exactly once, consecutive, with its id, up to the last one. On several
/// worker threads, so that publishes and subscriptions really run at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_updated_while_connections_open_is_neither_lost_nor_doubled() {
    const UPDATES: u64 = 200;
    const CONNECTIONS: u64 = 100;
    let app = spawn_app(&["--max-connections-per-user", "200"]).await;
    let (progress, mut published) = watch::channel(0u64);
    let mut client = app.client.clone();
    let publisher = tokio::spawn(async move {
        let mut ids = Vec::new();
        for v in 1..=UPDATES {
            let req = pb::PublishRequest {
                user_ids: vec!["u".into()],
                event: Some(ev("unread", &v.to_string())),
                idempotency_key: String::new(),
                retain: keep(),
            };
            ids.push(client.publish(req).await.expect("publish").into_inner().event_id);
            progress.send_replace(v);
        }
        ids
    });
    let http = app.http;
    let mut readers = Vec::new();
    for i in 0..CONNECTIONS {
        // Connection i opens once update 2i has been answered, without waiting for the previous
        // connections: many are being set up while the value keeps changing.
        let opened_after = i * UPDATES / CONNECTIONS;
        timeout_at(deadline(), published.wait_for(|&v| v >= opened_after)).await.expect("publisher progress").unwrap();
        readers.push(tokio::spawn(async move {
            let mut c = SseClient::connect(http, "/v1/events?user=u", &[]).await;
            assert_eq!(c.status, 200);
            let mut seen = Vec::new();
            loop {
                let e = c.next_event().await;
                if e.event_type == "end" {
                    return (opened_after, seen);
                }
                assert!(seen.len() as u64 <= UPDATES, "connection {i}: more events than updates");
                seen.push((e.data.parse::<u64>().expect("a count"), e.last_event_id));
            }
        }));
    }
    let ids = timeout_at(deadline(), publisher).await.expect("publisher in time").unwrap();
    app.wait_connections("u", CONNECTIONS).await;
    to_users(&app, &["u"], "end", "", None).await.unwrap();

    let mut with_state = 0;
    for (i, reader) in readers.into_iter().enumerate() {
        let (opened_after, seen) = timeout_at(deadline(), reader).await.expect("reader in time").unwrap();
        let (first, first_id) = seen.first().cloned().unwrap_or_else(|| panic!("connection {i} got nothing"));
        if first_id.is_empty() {
            // Its state on load: a value at least as new as the last one answered before it opened.
            assert!(first >= opened_after.max(1), "connection {i}: state {first} older than update {opened_after}");
            with_state += 1;
        } else {
            // Registered before the first update: no state to send, the first update live.
            assert_eq!((opened_after, first, first_id.as_str()), (0, 1, ids[0].as_str()), "connection {i}");
        }
        // Every later update once, in order, with its id; the first difference is reported
        // rather than two lists of 200.
        let want = (first + 1..=UPDATES).map(|v| (v, ids[v as usize - 1].clone()));
        for (k, (got, want)) in seen[1..].iter().zip(want).enumerate() {
            assert_eq!(*got, want, "connection {i} (state {first}): event {} of {}", k + 2, seen.len());
        }
        assert_eq!(seen.len() as u64, UPDATES - first + 1, "connection {i} (state {first}): count of events");
    }
    assert!(with_state >= CONNECTIONS - 1, "only a connection opened before any update may lack a state");
    assert_eq!(app.stats().await.retained_sent, with_state);
}

// ------------------------------------------------------------------------------ ids and resume

#[tokio::test]
async fn a_reconnect_after_retained_events_neither_repeats_them_nor_skips_what_was_published_meanwhile() {
    let app = spawn_app(&[]).await;
    set(&app, "alice", "unread", "7").await;
    let newest = set(&app, "alice", "presence", "away").await;

    let mut c = app.subscribe("user=alice").await;
    assert_eq!(c.cursor().await, newest);
    let state: Vec<_> = [c.next_event().await, c.next_event().await].iter().map(triple).collect();
    assert_eq!(state, [retained("unread", "7"), retained("presence", "away")]);
    // What a browser that handled both would send: the cursor, not an older id, not nothing.
    let last = c.last_event_id();
    assert_eq!(last, newest);
    drop(c);
    app.wait_connections("alice", 0).await;

    // Straight back, nothing published meanwhile: no state again, the next event is live.
    let mut c = app.resume("user=alice", &last).await;
    let id = to_users(&app, &["alice"], "", "live 1", None).await.unwrap().event_id;
    assert_eq!(triple(&c.next_event().await), live("message", "live 1", &id), "the retained events are not repeated");
    let last = c.last_event_id();
    drop(c);
    app.wait_connections("alice", 0).await;

    // Away while the state changes and plain events go by: the replay carries exactly those.
    let u8 = set(&app, "alice", "unread", "8").await;
    let hello = to_users(&app, &["alice"], "", "hello", None).await.unwrap().event_id;
    let motd = to_everyone(&app, "motd", "new", keep()).await;
    to_users(&app, &["bob"], "unread", "1", keep()).await.unwrap();
    let mut c = app.resume("user=alice", &last).await;
    let end = to_users(&app, &["alice"], "", "live 2", None).await.unwrap().event_id;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(triple(&c.next_event().await));
    }
    assert_eq!(
        got,
        [
            live("unread", "8", &u8),
            live("message", "hello", &hello),
            live("motd", "new", &motd),
            live("message", "live 2", &end)
        ],
        "the replay only: nothing retained sent again, nothing skipped, every id newer than the last"
    );
    let s = app.stats().await;
    assert_eq!((s.retained_sent, s.events_replayed, s.resumes_missed), (2, 3, 0));
}

#[tokio::test]
async fn a_resume_the_log_cannot_serve_gets_ssegate_missed_then_the_current_state_then_the_cursor() {
    let app = spawn_app(&["--replay-capacity", "2"]).await;
    set(&app, "alice", "unread", "7").await;
    to_group(&app, "admins", "team", "on call: bob", keep()).await;
    let mut c = app.subscribe("user=alice&group=admins").await;
    let last = c.cursor().await;
    drop(c);
    app.wait_connections("alice", 0).await;

    // Away for longer than the log holds (two events).
    set(&app, "alice", "unread", "9").await;
    to_everyone(&app, "", "x", None).await;
    to_everyone(&app, "", "y", None).await;
    let newest = to_group(&app, "ops", "team", "not alice's group", keep()).await;

    let mut c = app.resume("user=alice&group=admins", &last).await;
    assert_eq!(c.cursor().await, newest, "the cursor is the newest id, after the state");
    assert_eq!(c.next_item().await, Some(Item::Retry(3000)));
    let missed = c.next_event().await;
    assert_eq!((missed.event_type.as_str(), missed.last_event_id.as_str()), ("ssegate.missed", ""));
    let m: Value = serde_json::from_str(&missed.data).expect("JSON");
    assert_eq!((m["reason"].as_str(), m["last_event_id"].as_str()), (Some("expired"), Some(last.as_str())));
    let state: Vec<_> = [c.next_event().await, c.next_event().await].iter().map(triple).collect();
    assert_eq!(state, [retained("team", "on call: bob"), retained("unread", "9")], "the current state, oldest first");
    let id = to_users(&app, &["alice"], "", "live", None).await.unwrap().event_id;
    assert_eq!(triple(&c.next_event().await), live("message", "live", &id), "then live, nothing in between");
    let s = app.stats().await;
    assert_eq!((s.resumes_missed, s.retained_sent), (1, 4));
}

// ------------------------------------------------------------------------------ clear and TTL

#[tokio::test]
async fn a_cleared_value_is_delivered_live_and_no_longer_sent() {
    let app = spawn_app(&[]).await;
    set(&app, "alice", "unread", "5").await;
    set(&app, "alice", "presence", "busy").await;
    let (mut c, state, _) = open_fresh(&app, "user=alice", "alice").await;
    assert_eq!(state, [retained("unread", "5"), retained("presence", "busy")]);

    let cleared = to_users(&app, &["alice"], "unread", "0", clear()).await.unwrap();
    assert_eq!(cleared.recipients, Some(1));
    assert_eq!(
        triple(&c.next_event().await),
        live("unread", "0", &cleared.event_id),
        "the clearing event is delivered"
    );

    // Clearing what is not there is fine, and delivered too.
    let again = to_users(&app, &["alice"], "unread", "0", clear()).await.unwrap().event_id;
    assert_eq!(triple(&c.next_event().await), live("unread", "0", &again));
    drop(c);
    // Only that name of that target is gone.
    assert_eq!(state_on_load(&app, "alice", "").await, [retained("presence", "busy")]);
    to_users(&app, &["alice"], "presence", "", clear()).await.unwrap();
    assert_eq!(state_on_load(&app, "alice", "").await, []);
    let s = app.stats().await;
    assert_eq!((s.retained_values, s.retained_bytes), (0, 0));
}

#[tokio::test]
async fn a_value_with_a_time_to_live_is_not_sent_once_it_expired() {
    let app = spawn_app(&[]).await;
    let published = Instant::now();
    to_everyone(&app, "banner", "sale ends soon", keep_for(1)).await;
    set(&app, "alice", "unread", "3").await;
    assert_eq!(state_on_load(&app, "alice", "").await, [retained("banner", "sale ends soon"), retained("unread", "3")]);

    // New connections until the banner is gone (a second after its publish), a few seconds at most.
    let give_up = published + Duration::from_secs(5);
    loop {
        let state = state_on_load(&app, "alice", "").await;
        if state == [retained("unread", "3")] {
            break;
        }
        assert_eq!(state, [retained("banner", "sale ends soon"), retained("unread", "3")]);
        assert!(Instant::now() < give_up, "the banner is still sent 5 s after its 1 s time to live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published.elapsed() >= Duration::from_secs(1), "not dropped before its time to live");
    // Gone from the store too (the gauges count it until the next expiry sweep or retained publish).
    set(&app, "alice", "unread", "4").await;
    assert_eq!(app.stats().await.retained_values, 1);
    assert_eq!(state_on_load(&app, "alice", "").await, [retained("unread", "4")]);
}

// ------------------------------------------------------------------------------ limits and errors

#[tokio::test]
async fn a_full_store_refuses_a_new_value_with_resource_exhausted_naming_the_flag_and_publishes_nothing() {
    let app = spawn_app(&["--max-retained", "1"]).await;
    let mut c = app.subscribe("user=alice").await;
    c.cursor().await;
    let one = set(&app, "alice", "unread", "1").await;

    let full = to_users(&app, &["alice"], "presence", "busy", keep()).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("(--max-retained)"), "names the flag: {}", full.message());
    // Over HTTP/JSON: Connect's code and HTTP status for it, the same message.
    let (status, v) = post_json(
        app.grpc,
        "Publish",
        r#"{"userIds":["alice"],"event":{"name":"presence","data":"busy"},"retain":{}}"#,
    )
    .await;
    assert_eq!(
        (status, v["code"].as_str(), v["message"].as_str()),
        (429, Some("resource_exhausted"), Some(full.message()))
    );
    // A user list adds one value per user: bob's does not fit, so neither is applied.
    let full = to_users(&app, &["alice", "bob"], "unread", "2", keep()).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    // Replacing the one value fits; clearing always does (and a plain event is no value).
    let two = set(&app, "alice", "unread", "2").await;
    let plain = to_users(&app, &["alice"], "presence", "plain", None).await.unwrap().event_id;
    let cleared = to_users(&app, &["alice"], "presence", "gone", clear()).await.unwrap().event_id;

    let end = to_users(&app, &["alice"], "", "end", None).await.unwrap().event_id;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(triple(&c.next_event().await));
    }
    assert_eq!(
        got,
        [
            live("unread", "1", &one),
            live("unread", "2", &two),
            live("presence", "plain", &plain),
            live("presence", "gone", &cleared),
            live("message", "end", &end),
        ],
        "the refused publishes were delivered to nobody"
    );
    let s = app.stats().await;
    assert_eq!((s.events_published, s.retained_values), (5, 1));
    assert_eq!(state_on_load(&app, "bob", "").await, [], "bob's value was not kept either");
    assert_eq!(state_on_load(&app, "alice", "").await, [retained("unread", "2")]);

    // The byte bound: alice's `unread` costs 5 + 6 + its frame (23 bytes with one digit) + 64.
    let app = spawn_app(&["--max-retained-bytes", "100"]).await;
    let full = to_users(&app, &["alice"], "unread", "1234", keep()).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("--max-retained-bytes"), "names the flag: {}", full.message());
    set(&app, "alice", "unread", "7").await;
    let s = app.stats().await;
    assert_eq!((s.events_published, s.retained_values, s.retained_bytes), (1, 1, 98));
}

#[tokio::test]
async fn clear_with_a_time_to_live_is_invalid_argument_and_changes_nothing() {
    let app = spawn_app(&[]).await;
    set(&app, "alice", "unread", "5").await;
    let mut c = app.subscribe("user=alice").await;
    c.cursor().await;
    let bad =
        to_users(&app, &["alice"], "unread", "0", Some(pb::Retain { ttl_seconds: 5, clear: true })).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("retain.ttl_seconds"), "names the field: {}", bad.message());
    let end = to_users(&app, &["alice"], "", "end", None).await.unwrap().event_id;
    assert_eq!(
        [c.next_event().await, c.next_event().await].iter().map(triple).collect::<Vec<_>>(),
        [retained("unread", "5"), live("message", "end", &end)],
        "the refused clear was not delivered"
    );
    assert_eq!(app.stats().await.events_published, 2);
    assert_eq!(state_on_load(&app, "alice", "").await, [retained("unread", "5")], "nor applied");
}

#[tokio::test]
async fn publish_stream_items_carry_retain_each_with_its_own_answer() {
    let app = spawn_app(&[]).await;
    let item = |target: Target, name: &str, data: &str, retain: Option<pb::Retain>| pb::PublishStreamRequest {
        target: Some(target),
        event: Some(ev(name, data)),
        idempotency_key: String::new(),
        retain,
    };
    let alice = || Target::Users(pb::UserTarget { user_ids: vec!["alice".into()] });
    let requests = vec![
        item(alice(), "unread", "3", keep()),
        item(Target::Group("admins".into()), "team", "on call: bob", keep_for(3600)),
        item(Target::Topic("prices".into()), "tick", "1.08", Some(pb::Retain { ttl_seconds: 1, clear: true })),
        item(Target::Broadcast(pb::BroadcastTarget {}), "motd", "hi", keep()),
        item(alice(), "unread", "4", keep()),
        item(Target::Topic("prices".into()), "tick", "1.09", keep()),
        item(Target::Topic("prices".into()), "tick", "closed", clear()),
        item(alice(), "", "plain", None),
    ];
    let mut answers = app.client.clone().publish_stream(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.next().await {
        let a = a.expect("per-item answers");
        got.push((a.index, Code::from_i32(a.code), a.message));
    }
    let codes: Vec<_> = got.iter().map(|(i, c, _)| (*i, *c)).collect();
    use Code::{InvalidArgument as Bad, Ok};
    assert_eq!(codes, [(0, Ok), (1, Ok), (2, Bad), (3, Ok), (4, Ok), (5, Ok), (6, Ok), (7, Ok)]);
    assert!(got[2].2.contains("retain.ttl_seconds"), "{}", got[2].2);
    assert_eq!(
        state_on_load(&app, "alice", "&group=admins&topic=prices").await,
        [retained("team", "on call: bob"), retained("motd", "hi"), retained("unread", "4")]
    );
    assert_eq!(app.stats().await.retained_values, 3);
}

/// `POST /ssegate.v1.Publisher/{method}` with a JSON body on the gRPC port (HTTP/1.1).
async fn post_json(addr: SocketAddr, method: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST /ssegate.v1.Publisher/{method} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    timeout_at(deadline(), s.read_to_end(&mut raw)).await.expect("answer in time").expect("read");
    let (status, _, body) = parse_response(&raw);
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

#[tokio::test]
async fn http_json_on_the_grpc_port_accepts_retain() {
    let app = spawn_app(&[]).await;
    let (status, v) =
        post_json(app.grpc, "Publish", r#"{"userIds":["alice"],"event":{"name":"unread","data":"4"},"retain":{}}"#)
            .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post_json(
        app.grpc,
        "PublishGroup",
        r#"{"group":"admins","event":{"name":"team","data":"on call"},"retain":{"ttlSeconds":60}}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) =
        post_json(app.grpc, "Broadcast", r#"{"event":{"data":"x"},"retain":{"clear":true,"ttl_seconds":5}}"#).await;
    assert_eq!((status, v["code"].as_str()), (400, Some("invalid_argument")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("retain.ttl_seconds"), "{v}");
    let (status, v) = post_json(app.grpc, "Broadcast", r#"{"event":{"data":"x"},"retain":{"forever":true}}"#).await;
    assert_eq!((status, v["code"].as_str()), (400, Some("invalid_argument")), "an unknown field: {v}");
    assert_eq!(
        state_on_load(&app, "alice", "&group=admins").await,
        [retained("unread", "4"), retained("team", "on call")]
    );
    let (status, v) = post_json(app.grpc, "Stats", "{}").await;
    assert_eq!((status, v["retainedValues"].as_str()), (200, Some("2")), "{v}");
}

// ------------------------------------------------------------------------------ observability

#[tokio::test]
async fn stats_and_metrics_report_the_retained_values_their_bytes_and_what_was_sent() {
    let app = spawn_app(&[]).await;
    set(&app, "alice", "unread", "7").await;
    to_group(&app, "admins", "team", "on call", keep_for(60)).await;
    to_users(&app, &["alice"], "", "plain", None).await.unwrap();
    let cost = |key: &str, frame: &str| (key.len() + frame.len() + RETAINED_VALUE_OVERHEAD) as u64;
    let bytes =
        cost("aliceunread", "event: unread\ndata: 7\n\n") + cost("adminsteam", "event: team\ndata: on call\n\n");
    let s = app.stats().await;
    assert_eq!((s.retained_values, s.retained_bytes, s.retained_sent), (2, bytes, 0));

    assert_eq!(state_on_load(&app, "alice", "&group=admins").await.len(), 2);
    assert_eq!(state_on_load(&app, "bob", "").await.len(), 0);
    let s = app.stats().await;
    assert_eq!((s.retained_values, s.retained_bytes, s.retained_sent), (2, bytes, 2));

    let (status, _, body) = http_request(app.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    let sample = |name: &str| -> f64 {
        let line = body.lines().find(|l| l.split(' ').next() == Some(name));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("no {name} in:\n{body}"))
    };
    assert_eq!(sample("ssegate_retained_values"), 2.0);
    assert_eq!(sample("ssegate_retained_bytes"), bytes as f64);
    assert_eq!(sample("ssegate_retained_sent_total"), 2.0);
}

// ------------------------------------------------------------------------------ a real page

/// tests/browser/unread-driver.mjs: a page with an unread badge fed by a plain EventSource.
struct UnreadPage {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl UnreadPage {
    async fn open(sse_url: &str) -> UnreadPage {
        let (child, lines) = crate::browser::spawn_driver("unread-driver.mjs", &[sse_url.to_owned()]);
        UnreadPage { child, lines }
    }

    async fn next(&mut self, what: &str) -> Value {
        let line = timeout_at(deadline(), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("unread page: timed out waiting for {what}"))
            .expect("read driver output")
            .unwrap_or_else(|| panic!("unread driver exited while waiting for {what}"));
        let v: Value = serde_json::from_str(&line).expect("driver prints JSON lines");
        assert_eq!(v["kind"], what, "unread page: expected {what}, got {v}");
        v
    }

    async fn send(&mut self, command: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(format!("{command}\n").as_bytes()).await.expect("driver reads commands");
    }

    /// The page made two requests since it was (re)loaded: itself and its event stream; no
    /// fetch, no XHR.
    async fn assert_requests(&mut self, sse_url: &str, when: &str) {
        self.send("requests").await;
        let v = self.next("requests").await;
        let list: Vec<(&str, &str)> = v["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["type"].as_str().unwrap(), r["url"].as_str().unwrap()))
            .collect();
        assert_eq!(list.len(), 2, "{when}: {v}");
        assert_eq!(list[0].0, "document", "{when}: {v}");
        assert_eq!(list[1], ("eventsource", sse_url), "{when}: {v}");
    }

    async fn quit(mut self) {
        self.send("quit").await;
        let _ = timeout_at(deadline(), self.child.wait()).await;
    }
}

#[tokio::test]
async fn chromium_unread_counter_shows_the_retained_count_on_load_then_live_updates_and_after_reload() {
    let app = spawn_app(&["--cors-allowed-origins", "*"]).await;
    set(&app, "reader", "unread", "6").await;
    set(&app, "reader", "unread", "7").await;
    let sse_url = format!("http://{}/v1/events?user=reader", app.http);
    let mut page = UnreadPage::open(&sse_url).await;
    page.send("load").await;

    // On load: the badge shows 7 from the stream alone, and it was the first thing the page got.
    assert_eq!(page.next("ready").await["badge"], "–");
    let shown = page.next("unread").await;
    assert_eq!((shown["badge"].as_str(), shown["lastEventId"].as_str()), (Some("7"), Some("")), "{shown}");
    page.assert_requests(&sse_url, "on load").await;

    // Live: the next count replaces it.
    let id = set(&app, "reader", "unread", "8").await;
    let shown = page.next("unread").await;
    assert_eq!((shown["badge"].as_str(), shown["lastEventId"].as_str()), (Some("8"), Some(id.as_str())), "{shown}");

    // Reload: a new EventSource, no Last-Event-ID, and 8 at once.
    page.send("reload").await;
    assert_eq!(page.next("ready").await["badge"], "–");
    let shown = page.next("unread").await;
    assert_eq!((shown["badge"].as_str(), shown["lastEventId"].as_str()), (Some("8"), Some("")), "{shown}");
    page.assert_requests(&sse_url, "after the reload").await;
    let s = app.stats().await;
    assert_eq!((s.retained_sent, s.events_replayed, s.resumes_missed), (2, 0, 0));
    page.quit().await;
}
