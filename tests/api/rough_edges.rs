//! Rough edges a migrating team met (issue 22), each over real sockets: JWT NumericDates with a
//! fraction, a bare token in `Authorization`, what `/v1/events` advertises against what it
//! serves, CORS origins a browser could never send, and the refusal and connection log lines.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    time::timeout_at,
};

use crate::helpers::{SseClient, deadline, http_request, serve_command, spawn_app, spawn_app_with};

const SECRET: &str = "a-test-only-hs256-secret-of-more-than-32-bytes";

/// The secret in a file of its own directory.
fn secret_file() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ssegate-rough-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secret");
    std::fs::write(&path, SECRET).unwrap();
    path
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// An HS256 token signed with `SECRET`, as an issuer would make it.
fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A token for `sub`, valid for ten minutes (whole seconds, as most issuers write them).
fn token_for(sub: &str) -> String {
    hs256(&json!({"sub": sub, "exp": now() as u64 + 600, "groups": ["g1"]}))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn a_token_whose_exp_nbf_and_iat_have_a_fraction_is_accepted() {
    let secret = secret_file();
    let app = spawn_app_with(&["--jwt-secret-file", secret.to_str().unwrap(), "--insecure-open-publish"]).await;
    // What a JavaScript issuer writes: `Date.now() / 1000`, milliseconds and all.
    let t = now();
    let js = hs256(&json!({"sub": "alice", "exp": t + 600.123, "nbf": t - 1.5, "iat": t - 1.5}));
    let mut c = SseClient::connect(app.http, "/v1/events", &[("Authorization", &format!("Bearer {js}"))]).await;
    assert_eq!(c.status, 200, "{:?}", c.head);
    c.cursor().await;
    // Also from the query, and a fraction in the past is expired, not malformed.
    let c = SseClient::connect(app.http, &format!("/v1/events?token={js}"), &[]).await;
    assert_eq!(c.status, 200, "{:?}", c.head);
    let old = hs256(&json!({"sub": "alice", "exp": t - 60.5}));
    let (status, _, body) = http_request(app.http, "GET", &format!("/v1/events?token={old}"), &[]).await;
    assert_eq!((status, body.as_str()), (401, "the token has expired\n"));
}

#[tokio::test]
async fn a_token_in_authorization_without_bearer_is_called_malformed_not_missing() {
    let secret = secret_file();
    let app = spawn_app_with(&["--jwt-secret-file", secret.to_str().unwrap(), "--insecure-open-publish"]).await;
    let good = token_for("alice");
    for value in [good.as_str(), "Basic YWxpY2U6cHc=", "Bearer"] {
        let (status, h, body) = http_request(app.http, "GET", "/v1/events", &[("Authorization", value)]).await;
        assert_eq!(status, 401, "{value}: {body}");
        assert_eq!(body, "the Authorization header is malformed: expected `Authorization: Bearer <jwt>`\n", "{value}");
        assert_eq!(header(&h, "www-authenticate"), Some("Bearer"));
    }
    // Nothing sent at all is still "required".
    let (status, _, body) = http_request(app.http, "GET", "/v1/events", &[]).await;
    assert_eq!(status, 401);
    assert!(body.starts_with("a token is required"), "{body}");
    // Another scheme may be a proxy's (Basic auth in front of a staging site): the cookie and
    // the query still carry the token then.
    let path = format!("/v1/events?token={good}");
    let c = SseClient::connect(app.http, &path, &[("Authorization", "Basic YWxpY2U6cHc=")]).await;
    assert_eq!(c.status, 200, "{:?}", c.head);
    let cookie = format!("ssegate_token={good}");
    let c = SseClient::connect(app.http, "/v1/events", &[("Authorization", "Basic x"), ("Cookie", &cookie)]).await;
    assert_eq!(c.status, 200, "{:?}", c.head);
}

#[tokio::test]
async fn the_cors_preflight_advertises_only_get_which_is_what_v1_events_serves() {
    let app = spawn_app(&["--cors-allowed-origins", "https://app.example.com"]).await;
    let preflight = [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "GET")];
    let (status, h, _) = http_request(app.http, "OPTIONS", "/v1/events", &preflight).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "access-control-allow-methods"), Some("GET"));
    assert_eq!(header(&h, "allow"), Some("GET"), "the preflight lists no method that is refused: {h:?}");
    // HEAD is refused, and says what is allowed: the same.
    let (status, h, _) =
        http_request(app.http, "HEAD", "/v1/events?user=a", &[("Origin", "https://app.example.com")]).await;
    assert_eq!(status, 405);
    assert_eq!(header(&h, "allow"), Some("GET"));
    // A non-preflight OPTIONS, and other resources, keep their own answers.
    let (_, h, _) = http_request(app.http, "OPTIONS", "/v1/events", &[]).await;
    assert_eq!(header(&h, "allow"), Some("GET"));
    let (status, _, _) = http_request(app.http, "HEAD", "/v1/client.js", &[]).await;
    assert_eq!(status, 200, "the client script does serve HEAD");
    let c = SseClient::connect(app.http, "/v1/events?user=a", &[("Origin", "https://app.example.com")]).await;
    assert_eq!(c.status, 200, "GET, as advertised");
}

/// Runs `ssegate serve` with `flags` (JSON logs, ephemeral ports) to its exit.
async fn run_to_exit(flags: &[&str]) -> (std::process::ExitStatus, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssegate"))
        .args(["serve", "--insecure-dev-identity", "--insecure-open-publish", "--log-format", "json"])
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(flags)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = timeout_at(deadline(), run).await.expect("the process exits").unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_cors_origin_with_a_path_stops_the_server_at_start_saying_why() {
    let (status, stderr) =
        run_to_exit(&["--cors-allowed-origins", "https://app.example.com,http://127.0.0.1:5173/"]).await;
    assert!(!status.success(), "refused: {status:?}");
    assert!(stderr.contains("http://127.0.0.1:5173/"), "names the origin: {stderr}");
    assert!(
        stderr.contains("an origin is scheme://host[:port] with no path: remove the trailing '/'"),
        "says why: {stderr}"
    );
    assert!(!stderr.contains("ssegate serving"), "{stderr}");
    let (status, stderr) = run_to_exit(&["--cors-allowed-origins", "https://app.example.com/app"]).await;
    assert!(!status.success() && stderr.contains("with no path, query or fragment"), "{status:?}: {stderr}");
}

/// The real binary with JWT subscribers (`extra` flags added) and JSON logs, its ports, and a
/// channel of its log lines.
struct Logged {
    child: tokio::process::Child,
    http: SocketAddr,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

async fn spawn_logged(secret: &str, extra: &[&str]) -> Logged {
    let mut child = serve_command(&[])
        .args(["--jwt-secret-file", secret, "--insecure-open-publish", "--log-format", "json"])
        .args(["--shutdown-delay", "0s", "--shutdown-grace", "2s"])
        .args(extra)
        .env("RUST_LOG", "info")
        .spawn()
        .expect("the ssegate binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let http = loop {
        let line = timeout_at(deadline(), lines.next_line()).await.expect("startup log").unwrap().expect("a log line");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        if v["message"] == "ssegate serving" {
            break v["http"].as_str().unwrap().parse().unwrap();
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    Logged { child, http, lines: rx }
}

impl Logged {
    /// Stops the process (SIGTERM) and returns every line logged after its start.
    async fn stop(mut self) -> Vec<Value> {
        let pid = self.child.id().expect("running").to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let exit = timeout_at(deadline(), self.child.wait()).await.expect("exits in time").unwrap();
        assert!(exit.success(), "{exit:?}");
        let mut all = Vec::new();
        while let Some(line) = self.lines.recv().await {
            all.push(serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}")));
        }
        all
    }
}

/// A log line's field (tracing-subscriber's JSON puts them under `fields`, or at the top).
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line.get("fields").and_then(|f| f.get(name)).or_else(|| line.get(name))
}

#[tokio::test]
async fn refusals_are_one_structured_line_each_warn_with_the_user_and_400_at_info() {
    let secret = secret_file();
    let secret = secret.to_str().unwrap();
    let server = spawn_logged(secret, &["--max-connections", "2", "--max-connections-per-user", "1"]).await;
    let auth = |sub: &str| format!("Bearer {}", token_for(sub));
    let get = |path: String, headers: Vec<(&'static str, String)>| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http_request(server.http, "GET", &path, &h).await.0
    };
    assert_eq!(get("/v1/events?bogus=1".into(), vec![]).await, 400);
    assert_eq!(get("/v1/events".into(), vec![("X-Big", "x".repeat(20_000))]).await, 431);
    assert_eq!(get("/v1/events?user=alice&token=garbage".into(), vec![]).await, 401);
    assert_eq!(get("/v1/events?user=bob".into(), vec![("Authorization", auth("alice"))]).await, 403);
    assert_eq!(get("/v1/events?group=g3".into(), vec![("Authorization", auth("alice"))]).await, 403);
    let mut alice = SseClient::connect(server.http, "/v1/events", &[("Authorization", &auth("alice"))]).await;
    assert_eq!(alice.status, 200);
    alice.cursor().await;
    assert_eq!(get("/v1/events".into(), vec![("Authorization", auth("alice"))]).await, 429);
    // A resume from another epoch: the connection line says so in plain values.
    let bob_auth = auth("bob");
    let resume = [("Authorization", bob_auth.as_str()), ("Last-Event-ID", "a-1")];
    let mut bob = SseClient::connect(server.http, "/v1/events", &resume).await;
    assert_eq!(bob.status, 200);
    bob.cursor().await;
    assert_eq!(get("/v1/events".into(), vec![("Authorization", auth("carol"))]).await, 503);
    let logs = server.stop().await;

    let refusals: Vec<&Value> =
        logs.iter().filter(|l| field(l, "message") == Some(&json!("sse connection refused"))).collect();
    let by_status =
        |s: u64| refusals.iter().filter(|l| field(l, "status") == Some(&json!(s))).copied().collect::<Vec<_>>();
    assert_eq!(refusals.len(), 6, "one line per refusal: {refusals:#?}");
    let line = |s: u64| -> &Value {
        let all = by_status(s);
        assert!(!all.is_empty(), "a {s} line: {refusals:#?}");
        all[0]
    };
    let str_of = |l: &Value, k: &str| field(l, k).and_then(Value::as_str).map(str::to_owned);

    let bad = line(400);
    assert_eq!(bad["level"], "INFO", "a bad request is the client's mistake: {bad}");
    assert!(str_of(bad, "reason").unwrap().starts_with("unknown query parameter `bogus`"), "{bad}");

    let too_large = logs.iter().find(|l| field(l, "status") == Some(&json!(431))).expect("a 431 line");
    assert_eq!(
        (too_large["level"].as_str(), field(too_large, "message")),
        (Some("INFO"), Some(&json!("request refused")))
    );

    let unauth = line(401);
    assert_eq!(unauth["level"], "WARN", "{unauth}");
    assert_eq!(str_of(unauth, "reason").as_deref(), Some("the token is malformed"));
    assert_eq!(str_of(unauth, "user"), None, "no verified user: {unauth}");
    assert_eq!(str_of(unauth, "requested_user").as_deref(), Some("alice"), "{unauth}");

    let forbidden = by_status(403);
    assert_eq!(forbidden.len(), 2, "{refusals:#?}");
    for l in &forbidden {
        assert_eq!(l["level"], "WARN", "{l}");
        assert_eq!(str_of(l, "user").as_deref(), Some("alice"), "the token's user: {l}");
    }
    assert_eq!(str_of(forbidden[0], "requested_user").as_deref(), Some("bob"), "{}", forbidden[0]);
    assert_eq!(str_of(forbidden[0], "reason").as_deref(), Some("the token is for another user"));
    assert_eq!(str_of(forbidden[1], "requested_user"), None, "{}", forbidden[1]);

    let per_user = line(429);
    assert_eq!((per_user["level"].as_str(), str_of(per_user, "user").as_deref()), (Some("WARN"), Some("alice")));
    let full = line(503);
    assert_eq!((full["level"].as_str(), str_of(full, "user").as_deref()), (Some("WARN"), Some("carol")));
    for l in &refusals {
        assert!(field(l, "peer").is_some_and(Value::is_string), "{l}");
    }

    let opened: Vec<&Value> =
        logs.iter().filter(|l| field(l, "message") == Some(&json!("sse connection opened"))).collect();
    assert_eq!(opened.len(), 2, "{opened:#?}");
    let (fresh, resumed) = (opened[0], opened[1]);
    assert_eq!(str_of(fresh, "start").as_deref(), Some("fresh"), "{fresh}");
    assert_eq!(field(fresh, "resume"), None, "no resume id: absent, not \"None\": {fresh}");
    assert_eq!(str_of(resumed, "resume").as_deref(), Some("a-1"), "{resumed}");
    assert_eq!(str_of(resumed, "start").as_deref(), Some("missed"), "{resumed}");
    assert_eq!(str_of(resumed, "missed").as_deref(), Some("other_epoch"), "{resumed}");
    for l in logs.iter().filter(|l| field(l, "message").and_then(Value::as_str).is_some_and(|m| m.starts_with("sse ")))
    {
        let text = l.to_string();
        for debug in ["\"None\"", "Some(", "\"Fresh\"", "Resumed {", "Missed("] {
            assert!(!text.contains(debug), "Debug text of a Rust value in {text}");
        }
    }
    drop((alice, bob));
}
