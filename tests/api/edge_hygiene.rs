//! Edge hygiene: an idempotency key is validated once at the edge, the same for every backplane
//! (a CR or LF in it once panicked the NATS client mid-call); a request on the gRPC port that
//! is neither gRPC nor Connect gets a plain 404 saying where to go (an old REST client once
//! got `200 OK` with an empty body); the token cookie sent twice is refused as ambiguous; error
//! answers that may quote the request carry `X-Content-Type-Options: nosniff`; the memory
//! backplane's forgotten keys are exported.

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use http::uri::PathAndQuery;
use serde_json::{Value, json};
use ssegate::grpc::pb::{self, publish_stream_request::Target};
use tokio::time::timeout_at;
use tonic::{Code, transport::Endpoint};

use crate::{
    broker::{Broker, replica},
    helpers::{SseClient, TestApp, deadline, ev, http_request, http_request_with_body, spawn_app, spawn_app_with},
};

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

const CR_LF_KEY: &str = "order-42\r\nNats-Expected-Stream: other";
const CR_LF_REFUSED: &str = "idempotency_key contains the control character U+000D";

fn item(data: &str, key: &str) -> pb::PublishStreamRequest {
    pb::PublishStreamRequest {
        target: Some(Target::Users(pb::UserTarget { user_ids: vec!["alice".into()] })),
        event: Some(ev("", data)),
        idempotency_key: key.into(),
        retain: None,
    }
}

/// The key rules on `app`, whatever its backplane: over gRPC, Connect/JSON and inside a
/// `PublishStream`, a key with CR/LF (or blank) is `INVALID_ARGUMENT` naming the field, nothing
/// is published, and the calls around it are served.
async fn bad_keys_are_invalid_argument_and_publish_nothing(app: &TestApp) {
    let mut alice = app.subscribe("user=alice").await;
    let publish = |key: &str| pb::PublishRequest {
        user_ids: vec!["alice".into()],
        event: Some(ev("", "refused")),
        idempotency_key: key.into(),
        retain: None,
    };

    // Unary gRPC.
    for (key, message) in [
        (CR_LF_KEY, CR_LF_REFUSED),
        ("just\nLF", "idempotency_key contains the control character U+000A"),
        (" ", "idempotency_key must not be blank (only whitespace)"),
        (" order-7", "idempotency_key must not start or end with whitespace"),
    ] {
        let err = app.client.clone().publish(publish(key)).await.expect_err(key);
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, message), "{key:?}");
    }
    let err = app.client.clone().publish(publish(&"k".repeat(257))).await.unwrap_err();
    assert_eq!(err.message(), "idempotency_key is 257 bytes, longer than the limit of 256 bytes");

    // Connect/JSON: the same refusal, as a Connect error.
    let body = json!({"userIds": ["alice"], "event": {"data": "refused"}, "idempotencyKey": CR_LF_KEY}).to_string();
    let (status, headers, text) = http_request_with_body(
        app.grpc,
        "POST",
        "/ssegate.v1.Publisher/Publish",
        &[("Content-Type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).expect("a Connect error body");
    assert_eq!((v["code"].as_str(), v["message"].as_str()), (Some("invalid_argument"), Some(CR_LF_REFUSED)));
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));

    // Inside a stream: the bad item alone is refused; those before and after are published.
    let items = vec![item("1", "k-1"), item("refused", CR_LF_KEY), item("3", "k-3")];
    let mut answers = app.client.clone().publish_stream(tokio_stream::iter(items)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(a) = timeout_at(deadline(), answers.next()).await.expect("answers in time") {
        got.push(a.expect("per-item errors are answers, not stream errors"));
    }
    let summary: Vec<_> = got.iter().map(|a| (a.index, Code::from_i32(a.code), a.message.as_str())).collect();
    assert_eq!(summary, [(0, Code::Ok, ""), (1, Code::InvalidArgument, CR_LF_REFUSED), (2, Code::Ok, "")]);

    // Nothing refused was delivered: alice sees the two stream items and the marker only.
    app.publish_users(&["alice"], "", "marker").await;
    assert_eq!(alice.next_data(3).await, ["1", "3", "marker"]);
}

#[tokio::test]
async fn a_cr_lf_or_blank_idempotency_key_is_invalid_argument_in_memory() {
    let app = spawn_app(&[]).await;
    bad_keys_are_invalid_argument_and_publish_nothing(&app).await;
}

#[tokio::test]
async fn a_cr_lf_or_blank_idempotency_key_is_invalid_argument_on_nats() {
    let nats = Broker::start().await;
    let app = replica(&nats, &[]).await;
    bad_keys_are_invalid_argument_and_publish_nothing(&app).await;
    // And a good key still deduplicates there.
    let req =
        pb::BroadcastRequest { event: Some(ev("", "once")), idempotency_key: "order-7 retry".into(), retain: None };
    let first = app.client.clone().broadcast(req.clone()).await.unwrap().into_inner();
    let again = app.client.clone().broadcast(req).await.unwrap().into_inner();
    assert_eq!(first.event_id, again.event_id);
}

/// The one-line reason of the gRPC port's 404.
const WHERE_TO_GO: &[&str] = &["gRPC", "POST /ssegate.v1.Publisher/<Method>", "application/json", "GET /v1/events"];

#[tokio::test]
async fn requests_on_the_grpc_port_that_are_neither_grpc_nor_connect_get_a_plain_404() {
    let app = spawn_app(&[]).await;
    let cases = [
        // The old Feign call, and its POST twin.
        ("GET", "/sse/push?id=alice&content=hi", vec![], ""),
        ("POST", "/v1/publish", vec![("Content-Type", "application/json")], r#"{"id":"alice","content":"hi"}"#),
        // A browser, and a publisher path without a Connect content type.
        ("GET", "/", vec![], ""),
        ("POST", "/ssegate.v1.Publisher/Nope", vec![], "{}"),
        // Health over JSON is not served: gRPC only.
        ("POST", "/grpc.health.v1.Health/Check", vec![("Content-Type", "application/json")], "{}"),
    ];
    for (method, path, headers, body) in cases {
        let (status, h, text) = http_request_with_body(app.grpc, method, path, &headers, body).await;
        assert_eq!(status, 404, "{method} {path}: {h:?} {text:?}");
        assert_eq!(header(&h, "content-type"), Some("text/plain; charset=utf-8"), "{method} {path}");
        assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"), "{method} {path}");
        assert_eq!(header(&h, "grpc-status"), None, "{method} {path}: not a gRPC answer");
        assert_eq!(text.lines().count(), 1, "one line: {text:?}");
        for part in WHERE_TO_GO {
            assert!(text.contains(part), "{method} {path}: {text:?} names {part}");
        }
    }

    // An unknown method with a Connect content type: Connect's `unimplemented`.
    let (status, h, text) = http_request_with_body(
        app.grpc,
        "POST",
        "/ssegate.v1.Publisher/Nope",
        &[("Content-Type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(status, 501, "{text}");
    assert_eq!(header(&h, "content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["code"], "unimplemented", "{text}");

    // Real gRPC to an unknown method or service stays gRPC UNIMPLEMENTED, and real gRPC works.
    let channel = Endpoint::from_shared(format!("http://{}", app.grpc)).unwrap().connect().await.unwrap();
    for path in ["/ssegate.v1.Publisher/Nope", "/nope.v1.Nothing/Call"] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<pb::StatsRequest, pb::StatsResponse>::default();
        let err = grpc
            .unary(tonic::Request::new(pb::StatsRequest {}), PathAndQuery::from_static(path), codec)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{path}: {err:?}");
    }
    app.stats().await;
}

fn hs256_token(sub: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &json!({"sub": sub, "exp": exp}), &key).unwrap()
}

const SECRET: &str = "a-test-only-hs256-secret-of-more-than-32-bytes";

#[tokio::test]
async fn a_token_cookie_sent_twice_is_refused_as_ambiguous() {
    let dir = std::env::temp_dir().join(format!("ssegate-edge-hygiene-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let app = spawn_app_with(&["--jwt-secret-file", secret.to_str().unwrap(), "--insecure-open-publish"]).await;
    let (alice, mallory) = (hs256_token("alice"), hs256_token("mallory"));

    // A sibling subdomain's cookie beside ours, in either order, or split over two headers.
    let both = format!("ssegate_token={mallory}; theme=dark; ssegate_token={alice}");
    let reversed = format!("ssegate_token={alice}; ssegate_token={mallory}");
    for headers in [vec![("Cookie", both.as_str())], vec![("Cookie", reversed.as_str())]] {
        let (status, h, body) = http_request(app.http, "GET", "/v1/events", &headers).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.starts_with("the `ssegate_token` cookie was sent 2 times"), "{body}");
        assert_eq!(body.lines().count(), 1, "one line: {body:?}");
        assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    }

    // One cookie is fine, and so are two cookies beside a bearer token (the header wins; the
    // cookies are not read).
    let one = format!("theme=dark; ssegate_token={alice}");
    let c = SseClient::connect(app.http, "/v1/events", &[("Cookie", &one)]).await;
    assert_eq!(c.status, 200);
    let auth = format!("Bearer {alice}");
    let c = SseClient::connect(app.http, "/v1/events", &[("Cookie", &both), ("Authorization", &auth)]).await;
    assert_eq!(c.status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn error_answers_on_every_port_carry_nosniff() {
    let app = spawn_app(&[]).await;
    // HTTP port: a refusal that quotes the request, and a 404.
    for path in ["/v1/events?user=alice&%3Cscript%3E=1", "/nope"] {
        let (status, h, body) = http_request(app.http, "GET", path, &[]).await;
        assert!(status >= 400, "{path}: {status} {body}");
        assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"), "{path}");
    }
    // Admin port: axum's own 404 and 405.
    for (method, path) in [("GET", "/nope"), ("POST", "/readyz")] {
        let (status, h, _) = http_request(app.admin, method, path, &[]).await;
        assert!(status >= 400, "{method} {path}: {status}");
        assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"), "{method} {path}");
    }
    // Success answers are left as they are.
    let (status, h, _) = http_request(app.admin, "GET", "/healthz", &[]).await;
    assert_eq!((status, header(&h, "x-content-type-options")), (200, None));
}

#[tokio::test]
async fn idempotency_keys_forgotten_early_are_exported_as_a_counter() {
    let app = spawn_app(&[]).await;
    let (status, _, body) = http_request(app.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE ssegate_idempotency_evicted counter"), "{body}");
    let value = body.lines().find_map(|l| l.strip_prefix("ssegate_idempotency_evicted_total "));
    assert_eq!(value.map(|v| v.parse::<f64>().unwrap()), Some(0.0), "{body}");
}
