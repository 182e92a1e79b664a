//! The HTTP edge: response headers, the opening `retry:`, heartbeats, errors, CORS, the CLI.

use ssegate::event_stream::parse::Item;

use crate::helpers::{SseClient, http_request, spawn_app};

#[tokio::test]
async fn stream_opens_at_once_with_sse_headers_and_a_retry_field() {
    let app = spawn_app(&["--retry", "2500ms"]).await;
    let mut c = app.subscribe("user=u").await;
    assert_eq!(c.header("content-type"), Some("text/event-stream"));
    assert_eq!(c.header("cache-control"), Some("no-cache"));
    assert_eq!(c.header("x-accel-buffering"), Some("no"));
    assert_eq!(c.next_item().await, Some(Item::Retry(2500)), "first thing on the stream, before any event");
}

#[tokio::test]
async fn idle_streams_get_comment_heartbeats() {
    let app = spawn_app(&["--heartbeat-interval", "200ms"]).await;
    let mut c = app.subscribe("user=u").await;
    assert_eq!(c.next_item().await, Some(Item::Retry(3000)));
    assert_eq!(c.next_item().await, Some(Item::Comment(String::new())));
    assert_eq!(c.next_item().await, Some(Item::Comment(String::new())), "and keeps sending them");
}

#[tokio::test]
async fn bad_subscriptions_get_400_with_a_one_line_reason() {
    let app = spawn_app(&["--max-subscriptions", "2"]).await;
    let cases = [
        ("/v1/events", "query parameter `user` is required"),
        ("/v1/events?user=", "query parameter `user` must not be empty"),
        ("/v1/events?user=a%0D%0Ab", "query parameter `user` contains the control character U+000D"),
        ("/v1/events?user=a&user=b", "query parameter `user` may appear only once"),
        ("/v1/events?user=a&topic=1&topic=2&topic=3", "3 groups and topics requested, over the limit of 2"),
        ("/v1/events?user=a&channel=x", "unknown query parameter `channel`"),
    ];
    for (path, reason) in cases {
        let (status, headers, body) = http_request(app.http, "GET", path, &[]).await;
        assert_eq!(status, 400, "{path}");
        assert!(body.starts_with(reason) && body.trim_end().lines().count() == 1, "{path}: {body:?}");
        assert!(headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("text/plain")));
    }
    let (status, _, body) = http_request(app.http, "GET", "/nope", &[]).await;
    assert_eq!((status, body.trim_end()), (404, "no such resource; subscribe with GET /v1/events"));
    let (status, _, _) = http_request(app.http, "POST", "/v1/events?user=a", &[("Content-Length", "0")]).await;
    assert_eq!(status, 405);
    let mut ok = app.subscribe("user=a").await;
    app.publish_users(&["a"], "", "still serving").await;
    assert_eq!(ok.next_event().await.data, "still serving");
}

#[tokio::test]
async fn cors_preflight_and_stream_for_an_allowed_origin() {
    let app = spawn_app(&["--cors-allowed-origins", "https://app.example.com,https://other.example.com"]).await;
    let (status, headers, _) = http_request(
        app.http,
        "OPTIONS",
        "/v1/events?user=u",
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "last-event-id"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let get = |k: &str| headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
    assert_eq!(get("access-control-allow-origin").as_deref(), Some("https://app.example.com"));
    assert!(get("access-control-allow-headers").unwrap_or_default().contains("last-event-id"));
    let c = SseClient::connect(app.http, "/v1/events?user=u", &[("Origin", "https://other.example.com")]).await;
    assert_eq!(c.header("access-control-allow-origin"), Some("https://other.example.com"));
    let c = SseClient::connect(app.http, "/v1/events?user=u", &[("Origin", "https://evil.example.net")]).await;
    assert_eq!(c.header("access-control-allow-origin"), None, "a foreign origin gets no CORS grant");
}

#[tokio::test]
async fn the_publish_command_delivers_an_event() {
    let app = spawn_app(&[]).await;
    let mut c = app.subscribe("user=cli&topic=deploys").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssegate"))
        .args(["publish", "--grpc-url", &format!("http://{}", app.grpc), "--topic", "deploys", "--event", "deploy"])
        .args(["--data", "v1.2.3\nrolled out"])
        .output()
        .await
        .expect("run ssegate publish");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap();
    let e = c.next_event().await;
    assert_eq!(
        (e.event_type.as_str(), e.data.as_str(), e.last_event_id.as_str()),
        ("deploy", "v1.2.3\nrolled out", id.trim())
    );
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssegate"))
        .args(["publish", "--grpc-url", &format!("http://{}", app.grpc), "--user", "", "--data", "x"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("user_ids[0] must not be empty"));
}

#[tokio::test]
async fn head_is_refused_missing_host_is_400_and_polyfill_params_are_accepted() {
    let app = spawn_app(&[]).await;
    let (status, headers, _) = crate::helpers::http_request(app.http, "HEAD", "/v1/events?user=a", &[]).await;
    assert_eq!(status, 405);
    assert!(headers.iter().any(|(k, v)| k == "allow" && v == "GET"), "{headers:?}");
    assert_eq!(app.stats().await.connections, 0, "HEAD opened no subscription");

    // No Host header at all (the helper always sends one, so by hand).
    let mut s = tokio::net::TcpStream::connect(app.http).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /v1/events?user=a HTTP/1.1\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout_at(crate::helpers::deadline(), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("no Host header"), "{text}");

    // event-source-polyfill's `lastEventId` resumes; `_` cache busters are ignored.
    let first = app.publish_users(&["a"], "m", "one").await;
    app.publish_users(&["a"], "m", "two").await;
    let mut c = app.subscribe(&format!("user=a&_=1700000000000&lastEventId={}", first.event_id)).await;
    assert_eq!(c.next_event().await.data, "two");
    let (status, _, body) = crate::helpers::http_request(app.http, "GET", "/v1/events?user=a%FF", &[]).await;
    assert_eq!(status, 400, "{body}");
}
