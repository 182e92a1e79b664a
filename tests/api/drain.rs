//! Graceful drain of the real binary on SIGTERM: streams end with a jittered `retry:`, and a
//! stream that cannot be flushed does not keep the process alive past the grace period.

use std::time::Duration;

use ssegate::{event_stream::parse::Item, grpc::pb::publisher_client::PublisherClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    time::timeout_at,
};

use crate::helpers::{SseClient, deadline, ev, spawn_process};

#[tokio::test]
async fn sigterm_ends_streams_with_a_retry_and_exits_within_the_grace_period_despite_a_stuck_client() {
    let mut server = spawn_process(
        &["--shutdown-grace", "1s", "--retry", "1s", "--queue-capacity", "65536", "--max-queue-bytes", "1073741824"],
        &[],
    )
    .await;
    let (http, grpc) = (server.http, server.grpc);
    let mut client = PublisherClient::connect(format!("http://{grpc}")).await.unwrap();

    let mut healthy = SseClient::connect(http, "/v1/events?user=h", &[]).await;
    // A client that never reads, with a tiny receive buffer: what is queued for it can never
    // be flushed, so only the grace period can end its connection.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(http).await.unwrap();
    stuck.write_all(format!("GET /v1/events?user=s HTTP/1.1\r\nHost: {http}\r\n\r\n").as_bytes()).await.unwrap();
    let payload = "x".repeat(60_000);
    let mut sent = 0;
    while sent < 200 {
        let req = ssegate::grpc::pb::PublishRequest {
            user_ids: vec!["s".into()],
            event: Some(ev("", &payload)),
            ..Default::default()
        };
        // The first publishes may race the stuck client's registration; count those that reach it.
        if client.publish(req).await.unwrap().into_inner().recipients == Some(1) {
            sent += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    client
        .publish(ssegate::grpc::pb::PublishRequest {
            user_ids: vec!["h".into()],
            event: Some(ev("", "bye")),
            ..Default::default()
        })
        .await
        .unwrap();

    let pid = server.child.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());

    let items = healthy.until_end().await;
    assert!(items.iter().any(|i| matches!(i, Item::Event(e) if e.data == "bye")), "queued event delivered first");
    let ms = crate::helpers::shutdown_retry(&items);
    assert!((1000..=3000).contains(&ms), "retry {ms} in [retry, 2*retry + 1s]");
    let exit = timeout_at(deadline(), server.child.wait()).await.expect("process exits in time").unwrap();
    assert!(exit.success(), "{exit:?}");
    let rest = server.rest_of_logs().await;
    assert!(
        rest.iter().any(|l| l.contains("grace period over")),
        "the stuck stream held the drain until the grace period ran out: {rest:#?}"
    );
    drop(stuck);
}

/// The body of an HTTP/1.1 response `raw` (head and body), de-chunked if chunked.
fn body_of(raw: &[u8]) -> Vec<u8> {
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole head") + 4;
    let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
    let mut rest = &raw[at..];
    if !head.contains("transfer-encoding: chunked") {
        return rest.to_vec();
    }
    let mut body = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        rest = &rest[eol + 2 + size + 2..];
    }
    body
}

#[tokio::test]
async fn the_drains_retry_field_ends_its_block_so_parsers_that_report_it_on_dispatch_see_it() {
    let mut server = spawn_process(&["--retry", "1s"], &[]).await;
    let http = server.http;
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    let req = format!("GET /v1/events?user=r HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    // Registered once the opening position event has arrived.
    let mut raw = Vec::new();
    while !String::from_utf8_lossy(&raw).contains("event: ssegate.position") {
        let mut buf = [0u8; 4096];
        let n = timeout_at(deadline(), stream.read(&mut buf)).await.expect("the stream opens in time").unwrap();
        assert!(n > 0, "the stream ended before its position: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let pid = server.child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    timeout_at(deadline(), stream.read_to_end(&mut raw)).await.expect("the stream ends in time").unwrap();
    let body = String::from_utf8(body_of(&raw)).unwrap();
    // A complete block: `retry: N`, then the blank line that dispatches it (httpx-sse, for one,
    // reports `retry` only on a dispatched event, and the stream ends right after).
    let last = body.strip_suffix("\n\n").and_then(|b| b.rsplit('\n').next()).unwrap_or_default();
    let ms: u64 = last.strip_prefix("retry: ").and_then(|n| n.parse().ok()).unwrap_or_else(|| {
        panic!("the stream must end with `retry: N` and a blank line: {body:?}");
    });
    assert!((1000..=3000).contains(&ms), "retry {ms} in [retry, 2*retry + 1s]");
    let exit = timeout_at(deadline(), server.child.wait()).await.expect("process exits in time").unwrap();
    assert!(exit.success(), "{exit:?}");
}
