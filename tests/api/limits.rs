//! Limits and the slow-consumer policy: each limit answers with its status and a reason, a
//! stalled reader is cut off without hurting anyone else, and it loses nothing if it resumes.

use std::time::Duration;

use ssegate::event_stream::parse::{Item, Parser};
use tokio::{io::AsyncWriteExt, net::TcpSocket};

use crate::helpers::{http_request, spawn_app};

#[tokio::test]
async fn connections_over_the_server_limit_get_503_with_retry_after() {
    let app = spawn_app(&["--max-connections", "2"]).await;
    let mut a = app.subscribe("user=a").await;
    let _b = app.subscribe("user=b").await;
    let (status, headers, body) = http_request(app.http, "GET", "/v1/events?user=c", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(body.trim_end(), "the server is at its limit of 2 connections (--max-connections); retry later");
    assert!(headers.iter().any(|(k, v)| k == "retry-after" && v.parse::<u32>().is_ok()), "{headers:?}");
    app.publish_users(&["a"], "", "still served").await;
    assert_eq!(a.next_event().await.data, "still served");
    drop(a);
    app.wait_connections("a", 0).await;
    app.subscribe("user=c").await;
    assert_eq!(app.stats().await.connections_rejected, 1);
}

#[tokio::test]
async fn connections_over_the_per_user_limit_get_429() {
    let app = spawn_app(&["--max-connections-per-user", "2"]).await;
    let _a1 = app.subscribe("user=a").await;
    let _a2 = app.subscribe("user=a").await;
    let (status, headers, body) = http_request(app.http, "GET", "/v1/events?user=a", &[]).await;
    assert_eq!(status, 429);
    assert_eq!(body.trim_end(), "this user already has 2 connections, the limit (--max-connections-per-user)");
    assert!(headers.iter().any(|(k, _)| k == "retry-after"));
    app.subscribe("user=b").await;
}

#[tokio::test]
async fn a_connection_reaching_its_lifetime_ends_cleanly_and_resumes_with_nothing_lost() {
    let app = spawn_app(&["--max-connection-lifetime", "300ms"]).await;
    let mut c = app.subscribe("user=a").await;
    app.publish_users(&["a"], "", "before").await;
    let items = c.until_end().await;
    assert!(items.iter().any(|i| matches!(i, Item::Event(e) if e.data == "before")), "{items:?}");
    let last = c.last_event_id();
    app.wait_connections("a", 0).await;
    app.publish_users(&["a"], "", "between").await;
    let mut c = app.resume("user=a", &last).await;
    assert_eq!(c.next_event().await.data, "between");
}

/// Opens a stream whose socket has a tiny receive buffer and is never read.
async fn stalled_subscriber(addr: std::net::SocketAddr, query: &str) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let req = format!("GET /v1/events?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn a_stalled_reader_is_cut_off_while_a_healthy_one_gets_everything_and_it_resumes_losslessly() {
    const EVENTS: usize = 300;
    let app = spawn_app(&["--queue-capacity", "16"]).await;
    let mut healthy = app.subscribe("user=h&topic=news").await;
    let stalled = stalled_subscriber(app.http, "user=s&topic=news").await;
    app.wait_connections("s", 1).await;
    // 300 events of 60 KB: far more than the stalled socket's buffers plus its queue.
    let payload = "x".repeat(60_000);
    for i in 0..EVENTS {
        let resp = app.publish_topic("news", &format!("{i} {payload}")).await;
        // The healthy reader keeps up; it is never more than one event behind.
        let e = healthy.next_event().await;
        assert_eq!(e.data.split_once(' ').map(|(n, _)| n), Some(i.to_string().as_str()));
        assert_eq!(e.last_event_id, resp.event_id);
    }
    app.wait_connections("s", 0).await;
    let s = app.stats().await;
    assert!(s.events_dropped > 0, "the stalled reader's queued events count as dropped: {s:?}");

    // The stalled client now reads what reached its socket before the cut-off, then resumes
    // from the last complete event: between the two it gets every event exactly once.
    let (mut seen, last) = read_until_closed(stalled).await;
    let mut c = app.resume("user=s&topic=news", &last).await;
    while seen.len() < EVENTS {
        let e = c.next_event().await;
        seen.push(e.data.split_once(' ').map(|(n, _)| n.parse::<usize>().unwrap()).unwrap());
    }
    assert!(seen.iter().copied().eq(0..EVENTS), "nothing lost or repeated across the cut-off");
}

/// What a reader that stopped reading can pin is bounded in bytes (`--max-queue-bytes`), not in
/// events: with unique 60 KB events each is cut off after its queue plus the kernel's send
/// buffer (at most 4 MiB here) filled, long before its 4,096-event capacity.
#[tokio::test]
async fn readers_that_stopped_reading_are_cut_off_by_bytes_not_by_event_count() {
    let app = spawn_app(&["--queue-capacity", "4096", "--max-queue-bytes", "262144"]).await;
    let users = ["s0", "s1", "s2"];
    let mut stalled = Vec::new();
    for u in users {
        stalled.push(stalled_subscriber(app.http, &format!("user={u}")).await);
        app.wait_connections(u, 1).await;
    }
    let payload = "x".repeat(60_000);
    for u in users {
        let mut accepted = 0;
        while app.publish_users(&[u], "", &format!("{accepted} {payload}")).await.recipients == Some(1) {
            accepted += 1;
            assert!(accepted < 100, "{u} still queued after {accepted} events of 60 KB: not bounded in bytes");
        }
        app.wait_connections(u, 0).await;
    }
    assert!(app.stats().await.events_dropped > 0);
    // Everyone else is still served.
    let mut ok = app.subscribe("user=ok").await;
    app.publish_users(&["ok"], "", "still here").await;
    assert_eq!(ok.next_event().await.data, "still here");
    drop(stalled);
}

/// Reads a raw stream (HTTP/1.1 chunked) until the server closes it; returns the numbers of the
/// complete events and the last event id a browser would resume from.
async fn read_until_closed(mut stream: tokio::net::TcpStream) -> (Vec<usize>, String) {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the cut-off stream was not closed"),
        }
    }
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("response head") + 4;
    let body = dechunk(&raw[head_end..]);
    let (mut parser, mut items) = (Parser::new(), Vec::new());
    parser.feed(&body, &mut items);
    let seen = items
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => e.data.split_once(' ').and_then(|(n, _)| n.parse().ok()),
            _ => None,
        })
        .collect();
    (seen, parser.last_event_id().to_owned())
}

/// Decodes as many complete chunks as `raw` holds (the stream was cut, so the last may not be).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let Ok(size) = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap_or("x").trim(), 16) else { break };
        let start = eol + 2;
        if size == 0 || raw.len() < start + size + 2 {
            break;
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
    out
}
