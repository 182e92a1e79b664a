//! Security: each test names the attack or mistake it covers. Keys come from the TEST-ONLY
//! fixtures in tests/fixtures/jwt.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use ssegate::{event_stream::parse::Item, grpc::pb};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tonic::{Code, Request, metadata::MetadataValue};

use crate::helpers::{SseClient, TestApp, deadline, ev, http_request, spawn_app_with};

const SECRET: &str = "a-test-only-hs256-secret-of-more-than-32-bytes";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A file in a fresh temporary directory, holding `contents`.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ssegate-test-{}-{}", std::process::id(), fastrand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), None, claims)
}

fn claims(sub: &str, groups: &[&str], topics: &[&str]) -> Value {
    json!({ "sub": sub, "exp": now() + 3600, "groups": groups, "topics": topics })
}

async fn hs256_app(extra: &[&str]) -> TestApp {
    let secret = temp_file("secret", SECRET);
    let secret = secret.to_str().unwrap().to_owned();
    let mut flags = vec!["--jwt-secret-file", secret.as_str(), "--insecure-open-publish"];
    flags.extend_from_slice(extra);
    spawn_app_with(&flags).await
}

/// A request whose answer is an error (the body is read to its end).
async fn get(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, String) {
    http_request(app.http, "GET", path, headers).await
}

/// The status of a subscription attempt, reading only the response head (a 200 never ends).
async fn status_of(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> u16 {
    SseClient::connect(app.http, path, headers).await.status
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn with_no_auth_configured_subscriptions_are_refused_saying_what_to_configure() {
    let app = spawn_app_with(&["--insecure-open-publish"]).await;
    let (status, _, body) = get(&app, "/v1/events?user=a", &[]).await;
    assert_eq!(status, 503);
    assert!(body.starts_with("subscriptions are disabled: configure --jwt-secret-file"), "{body}");
}

#[tokio::test]
async fn missing_garbled_expired_premature_wrongly_signed_and_alg_none_tokens_get_401() {
    let app = hs256_app(&["--jwt-leeway", "0s"]).await;
    let other_key = EncodingKey::from_secret(b"another-secret-another-secret-another-secret");
    let alg_none = {
        use std::io::Write;
        let b64 = |v: &Value| {
            let mut out = Vec::new();
            write!(out, "{v}").unwrap();
            base64url(&out)
        };
        format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims("a", &[], &[])))
    };
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).unwrap()).unwrap();
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "a token is required"),
        (Some("not-a-jwt".into()), "the token is malformed"),
        (Some(hs256(&json!({"sub": "a", "exp": now() - 60}))), "the token has expired"),
        (Some(hs256(&json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300}))), "the token is not valid yet"),
        (Some(sign(Algorithm::HS256, &other_key, None, &claims("a", &[], &[]))), "the token's signature is invalid"),
        (Some(alg_none), "the token is malformed"),
        (Some(sign(Algorithm::RS256, &rsa, None, &claims("a", &[], &[]))), "the token's algorithm is not accepted"),
        (Some(hs256(&json!({"exp": now() + 60}))), "the token lacks the `sub` claim"),
        (Some(hs256(&json!({"sub": "a\nb", "exp": now() + 60}))), "the token's claim `sub` is invalid"),
    ];
    for (token, reason) in cases {
        let auth = token.as_deref().map(bearer);
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (status, h, body) = get(&app, "/v1/events", &headers).await;
        assert_eq!(status, 401, "{reason}: {body}");
        assert!(body.starts_with(reason), "{body:?} should start with {reason:?}");
        assert!(h.iter().any(|(k, v)| k == "www-authenticate" && v == "Bearer"));
    }
    let m = app.stats().await;
    assert_eq!(m.connections, 0);
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn a_token_for_alice_can_read_neither_bobs_events_nor_a_topic_or_group_it_was_not_granted() {
    let app = hs256_app(&[]).await;
    let token = hs256(&claims("alice", &["staff"], &["orders/*"]));
    let auth = bearer(&token);
    let h = [("Authorization", auth.as_str())];
    for (path, status, reason) in [
        ("/v1/events?user=bob", 403, "the token is for another user"),
        ("/v1/events?topic=admin", 403, "topic `admin` is not allowed by the token's `topics` claim"),
        ("/v1/events?group=finance", 403, "group `finance` is not in the token's `groups` claim"),
    ] {
        let (s, _, body) = get(&app, path, &h).await;
        assert_eq!((s, body.trim_end()), (status, reason), "{path}");
    }
    let mut alice = SseClient::connect(app.http, "/v1/events?topic=orders/42", &h).await;
    assert_eq!(alice.status, 200);
    app.wait_connections("alice", 1).await;
    app.publish_users(&["bob"], "", "for bob").await;
    app.publish_group("finance", "for finance").await;
    app.publish_topic("orders/43", "other order").await;
    app.publish_group("staff", "for staff").await;
    app.publish_topic("orders/42", "my order").await;
    app.publish_users(&["alice"], "", "for alice").await;
    assert_eq!(alice.next_data(3).await, ["for staff", "my order", "for alice"], "only what alice may see");
}

#[tokio::test]
async fn the_token_is_accepted_from_the_header_the_cookie_and_the_query() {
    let app = hs256_app(&["--token-cookie", "sid"]).await;
    let token = hs256(&claims("alice", &[], &[]));
    let auth = bearer(&token);
    let cookie = format!("theme=dark; sid={token}");
    let mut by_header = SseClient::connect(app.http, "/v1/events", &[("Authorization", &auth)]).await;
    let mut by_cookie = SseClient::connect(app.http, "/v1/events", &[("Cookie", &cookie)]).await;
    let mut by_query = SseClient::connect(app.http, &format!("/v1/events?token={token}"), &[]).await;
    for c in [&by_header, &by_cookie, &by_query] {
        assert_eq!(c.status, 200);
    }
    app.publish_users(&["alice"], "", "hi").await;
    for c in [&mut by_header, &mut by_cookie, &mut by_query] {
        assert_eq!(c.next_event().await.data, "hi");
    }
}

#[tokio::test]
async fn rs256_es256_eddsa_and_jwks_keys_each_verify_their_own_tokens_only() {
    let cases = [
        ("--jwt-public-key-file", "rsa-public.pem", Algorithm::RS256, "rsa-private.pem", None),
        ("--jwt-public-key-file", "ec-public.pem", Algorithm::ES256, "ec-private.pem", None),
        ("--jwt-public-key-file", "ed25519-public.pem", Algorithm::EdDSA, "ed25519-private.pem", None),
        ("--jwt-jwks-file", "jwks.json", Algorithm::RS256, "rsa-private.pem", Some("test-rsa-1")),
    ];
    for (flag, public, alg, private, kid) in cases {
        let public = fixture(public);
        let app = spawn_app_with(&[flag, &public, "--insecure-open-publish"]).await;
        let pem = std::fs::read(fixture(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap();
        let good = bearer(&sign(alg, &key, kid, &claims("alice", &[], &[])));
        assert_eq!(status_of(&app, "/v1/events", &[("Authorization", &good)]).await, 200, "{public}");
        let forged = bearer(&hs256(&claims("alice", &[], &[])));
        assert_eq!(
            status_of(&app, "/v1/events", &[("Authorization", &forged)]).await,
            401,
            "{public}: an HS256 token signed with a guessable secret is refused"
        );
    }
}

#[tokio::test]
async fn issuer_and_audience_must_match_when_configured() {
    let app = hs256_app(&["--jwt-issuer", "https://auth.example.com", "--jwt-audience", "ssegate"]).await;
    let base = |iss: &str, aud: &str| json!({"sub": "a", "exp": now() + 60, "iss": iss, "aud": aud});
    for (c, status) in [
        (base("https://auth.example.com", "ssegate"), 200),
        (base("https://evil.example.com", "ssegate"), 401),
        (base("https://auth.example.com", "other-service"), 401),
    ] {
        let auth = bearer(&hs256(&c));
        assert_eq!(status_of(&app, "/v1/events", &[("Authorization", &auth)]).await, status, "{c}");
    }
}

#[tokio::test]
async fn a_stream_is_closed_when_its_token_expires() {
    let app = hs256_app(&["--jwt-leeway", "0s"]).await;
    let auth = bearer(&hs256(&json!({"sub": "a", "exp": now() + 2})));
    let mut c = SseClient::connect(app.http, "/v1/events", &[("Authorization", &auth)]).await;
    assert_eq!(c.status, 200);
    let items = c.until_end().await;
    // The stream's last event says why it ends, so a client fetches a fresh token.
    let events: Vec<_> = items.iter().filter_map(|i| if let Item::Event(e) = i { Some(e) } else { None }).collect();
    assert_eq!(events.len(), 1, "{items:?}");
    assert_eq!((events[0].event_type.as_str(), events[0].data.as_str()), ("ssegate.disconnect", "token_expired"));
    app.wait_connections("a", 0).await;
    let (_, _, metrics) = http_request(app.admin, "GET", "/metrics", &[]).await;
    assert!(metrics.contains(r#"ssegate_connections_closed_total{reason="token_expired"} 1"#), "{metrics}");
}

#[tokio::test]
async fn a_token_expired_within_the_leeway_is_refused_at_once_not_admitted_then_closed() {
    let app = hs256_app(&["--jwt-leeway", "60s"]).await;
    let auth = bearer(&hs256(&json!({"sub": "a", "exp": now() - 5})));
    let (status, _, body) = get(&app, "/v1/events", &[("Authorization", &auth)]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.starts_with("the token has expired"), "{body}");
}

#[tokio::test]
async fn cors_grants_credentials_only_to_listed_origins() {
    let app = hs256_app(&["--cors-allowed-origins", "https://app.example.com"]).await;
    let preflight = |origin: &'static str| {
        let addr = app.http;
        async move {
            http_request(
                addr,
                "OPTIONS",
                "/v1/events",
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", "GET"),
                    ("Access-Control-Request-Headers", "authorization"),
                ],
            )
            .await
        }
    };
    let (status, h, _) = preflight("https://app.example.com").await;
    let find = |h: &[(String, String)], k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(status, 200);
    assert_eq!(find(&h, "access-control-allow-origin").as_deref(), Some("https://app.example.com"));
    assert_eq!(find(&h, "access-control-allow-credentials").as_deref(), Some("true"));
    assert!(find(&h, "access-control-allow-headers").unwrap_or_default().contains("authorization"));
    let (_, h, _) = preflight("https://evil.example.net").await;
    assert_eq!(find(&h, "access-control-allow-origin"), None, "a foreign origin gets no grant");
}

async fn publish_with(app: &TestApp, key: Option<&str>) -> Result<pb::PublishResponse, tonic::Status> {
    let mut req = Request::new(pb::BroadcastRequest { event: Some(ev("", "x")), ..Default::default() });
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {k}")).unwrap());
    }
    app.client.clone().broadcast(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn publishers_need_a_valid_api_key_and_a_revoked_one_stops_working_without_restart() {
    let keys = temp_file("keys", "# test keys\nkey-alpha-0123456789abcdef\nkey-bravo-0123456789abcdef\n");
    let path = keys.to_str().unwrap().to_owned();
    let app = spawn_app_with(&["--insecure-dev-identity", "--publisher-api-keys-file", &path]).await;
    let err = publish_with(&app, None).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "an API key is required: send `authorization: Bearer <key>`")
    );
    let err = publish_with(&app, Some("key-charlie-0123456789abcdef")).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "the API key is not valid"));
    publish_with(&app, Some("key-alpha-0123456789abcdef")).await.expect("a valid key publishes");

    // Revoke alpha by rewriting the file (as a Secret update does); it stops working shortly.
    std::fs::write(&keys, "key-bravo-0123456789abcdef\n").unwrap();
    let later = SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options().write(true).open(&keys).unwrap().set_modified(later).unwrap();
    let end = deadline();
    while publish_with(&app, Some("key-alpha-0123456789abcdef")).await.is_ok() {
        assert!(Instant::now() < end, "the revoked key still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish_with(&app, Some("key-bravo-0123456789abcdef")).await.expect("the remaining key still works");

    // Probes need no key.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc)).unwrap().connect().await.unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health is open");
}

#[tokio::test]
async fn with_no_publisher_auth_configured_publishing_is_refused_saying_what_to_configure() {
    let app = spawn_app_with(&["--insecure-dev-identity"]).await;
    let err = publish_with(&app, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().starts_with("publishing is disabled: configure --publisher-api-keys-file"));
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let app =
        spawn_app_with(&["--insecure-dev-identity", "--insecure-open-publish", "--max-connections-per-ip", "2"]).await;
    let c1 = app.subscribe("user=a").await;
    let _c2 = app.subscribe("user=b").await;
    let (status, headers, body) = get(&app, "/v1/events?user=c", &[]).await;
    assert_eq!((status, body.trim_end()), (429, "too many connections from this address; retry later"));
    assert!(headers.iter().any(|(k, _)| k == "retry-after"));
    drop(c1);
    app.wait_connections("a", 0).await;
    let end = deadline();
    // The TCP connection closes a moment after the stream ends; then there is room again.
    loop {
        let c = SseClient::connect(app.http, "/v1/events?user=c", &[]).await;
        if c.status == 200 {
            break;
        }
        assert!(Instant::now() < end, "no room after a connection closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_slowloris_client_is_disconnected_after_the_header_timeout() {
    let app =
        spawn_app_with(&["--insecure-dev-identity", "--insecure-open-publish", "--header-read-timeout", "300ms"]).await;
    let mut s = TcpStream::connect(app.http).await.unwrap();
    s.write_all(b"GET /v1/events?user=a HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The server answers 408 or just closes; either way the socket ends.
    timeout_at(deadline(), s.read_to_end(&mut buf)).await.expect("the server hangs up").ok();
    assert!(started.elapsed() >= Duration::from_millis(250), "not before the timeout");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let app =
        spawn_app_with(&["--insecure-dev-identity", "--insecure-open-publish", "--max-header-bytes", "8192"]).await;
    let big = "x".repeat(20_000);
    let (status, _, _) = get(&app, "/v1/events?user=a", &[("X-Big", &big)]).await;
    assert_eq!(status, 431);
    app.subscribe("user=a").await;
}

#[tokio::test]
async fn a_rotated_jwt_key_is_used_without_restart() {
    let secret = temp_file("secret", SECRET);
    let path = secret.to_str().unwrap().to_owned();
    let app = spawn_app_with(&["--jwt-secret-file", &path, "--insecure-open-publish"]).await;
    let old = bearer(&hs256(&claims("alice", &[], &[])));
    assert_eq!(status_of(&app, "/v1/events", &[("Authorization", &old)]).await, 200);

    let new_secret = "a-rotated-test-only-hs256-secret-of-32-bytes-or-more";
    std::fs::write(&secret, new_secret).unwrap();
    let later = SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options().write(true).open(&secret).unwrap().set_modified(later).unwrap();
    let new_key = EncodingKey::from_secret(new_secret.as_bytes());
    let new = bearer(&sign(Algorithm::HS256, &new_key, None, &claims("alice", &[], &[])));
    let end = deadline();
    while status_of(&app, "/v1/events", &[("Authorization", &new)]).await != 200 {
        assert!(Instant::now() < end, "the rotated key was never used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_of(&app, "/v1/events", &[("Authorization", &old)]).await, 401, "the old key is gone");
}
