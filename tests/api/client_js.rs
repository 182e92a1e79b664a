//! The browser client (clients/js/ssegate.js): how ssegate serves it at `/v1/client.js`, the
//! development demo page at `/`, and the client itself in headless Chromium
//! (tests/browser/client-driver.mjs) against real failures: a server restart behind a proxy
//! answering 503, a per-user limit answering 429, a token expiring mid-stream, and a page whose
//! only events were retained ones coming back from the stream's position (`ssegate.position`).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    process::Stdio,
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use ssegate::grpc::pb::{self, publisher_client::PublisherClient};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines},
    net::TcpListener,
    process::{Child, ChildStdout, Command},
    sync::watch,
    time::{Instant, timeout_at},
};

use crate::helpers::{deadline, ev, http_request, spawn_app, spawn_app_with};

const CLIENT_JS: &str = include_str!("../../clients/js/ssegate.js");

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

// ------------------------------------------------------------------- serving the assets

#[tokio::test]
async fn client_js_is_served_as_javascript_with_an_etag_and_answers_304_when_unchanged() {
    // Not in development mode: the client is for production pages too.
    let app = spawn_app_with(&["--insecure-open-publish"]).await;
    let (status, headers, body) = http_request(app.http, "GET", "/v1/client.js", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(header(&headers, "cache-control"), Some("public, max-age=300"));
    assert_eq!(body, CLIENT_JS, "the embedded file, byte for byte");
    let etag = header(&headers, "etag").expect("an ETag").to_owned();
    assert!(etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'), "a strong ETag: {etag}");

    let (status, headers, body) = http_request(app.http, "GET", "/v1/client.js", &[("If-None-Match", &etag)]).await;
    assert_eq!(status, 304);
    assert!(body.is_empty());
    assert_eq!(header(&headers, "etag"), Some(etag.as_str()));
    assert_eq!(header(&headers, "cache-control"), Some("public, max-age=300"));

    let weak_in_list = format!("\"other\", W/{etag}");
    let (status, ..) = http_request(app.http, "GET", "/v1/client.js", &[("If-None-Match", &weak_in_list)]).await;
    assert_eq!(status, 304, "If-None-Match compares weakly and reads lists");
    let (status, _, body) = http_request(app.http, "GET", "/v1/client.js", &[("If-None-Match", "\"stale\"")]).await;
    assert_eq!((status, body.len()), (200, CLIENT_JS.len()), "a stale copy gets the file");

    let (status, headers, body) = http_request(app.http, "HEAD", "/v1/client.js", &[]).await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(header(&headers, "etag"), Some(etag.as_str()));
    let (status, ..) = http_request(app.http, "POST", "/v1/client.js", &[]).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn the_demo_page_is_served_only_in_development_mode() {
    let dev = spawn_app(&[]).await;
    let (status, headers, body) = http_request(dev.http, "GET", "/", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/html; charset=utf-8"));
    assert!(body.contains("from '/v1/client.js'"), "the page uses the served client");
    assert!(body.contains("ssegate publish") && body.contains("grpcurl"), "and says how to publish");

    let prod = spawn_app_with(&["--insecure-open-publish"]).await;
    let (status, _, body) = http_request(prod.http, "GET", "/", &[]).await;
    assert_eq!(status, 404, "{body}");
    let (status, ..) = http_request(prod.http, "POST", "/", &[]).await;
    assert_eq!(status, 404);
}

// ------------------------------------------------------------------- the page in Chromium

/// A page using the served client, driven by tests/browser/client-driver.mjs.
struct ClientPage {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Lines read before the page was ready, returned first.
    backlog: VecDeque<Value>,
    /// The last state the client reported.
    state: String,
    /// Every event the page received, in order.
    events: Vec<Value>,
    /// The payloads of every `ssegate.disconnect` reported.
    disconnects: Vec<Value>,
    /// Every `ssegate.missed` reported (the whole line).
    missed: Vec<Value>,
    /// Answers token requests by itself once set.
    auto_token: Option<Box<dyn Fn() -> String + Send>>,
}

impl ClientPage {
    async fn open(server: SocketAddr, options: Value) -> ClientPage {
        let (child, lines) =
            crate::browser::spawn_driver("client-driver.mjs", &[format!("http://{server}"), options.to_string()]);
        let mut page = ClientPage {
            child,
            lines,
            backlog: VecDeque::new(),
            state: String::new(),
            events: Vec::new(),
            disconnects: Vec::new(),
            missed: Vec::new(),
            auto_token: None,
        };
        // The client starts connecting (and may ask for a token) before the page says ready:
        // keep those lines for the test.
        let (mut early, end) = (VecDeque::new(), deadline());
        loop {
            let v = page.next("ready", end).await;
            if v["kind"] == "ready" {
                break;
            }
            early.push_back(v);
        }
        page.backlog = early;
        page
    }

    /// The next line the driver printed, by `end` (token requests answered if `auto_token` is
    /// set).
    async fn next(&mut self, what: &str, end: Instant) -> Value {
        if let Some(v) = self.backlog.pop_front() {
            return v;
        }
        loop {
            let line = timeout_at(end, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("client page: timed out waiting for {what} (state {})", self.state))
                .expect("read driver output")
                .unwrap_or_else(|| panic!("client driver exited while waiting for {what}"));
            let v: Value = serde_json::from_str(&line).expect("driver prints JSON lines");
            match v["kind"].as_str() {
                Some("state") => self.state = v["state"].as_str().unwrap().to_owned(),
                Some("event") => self.events.push(v.clone()),
                Some("disconnect") => self.disconnects.push(v["payload"].clone()),
                Some("missed") => self.missed.push(v.clone()),
                Some("token_request") => {
                    if let Some(mint) = &self.auto_token {
                        let token = mint();
                        self.send(&format!("token {token}")).await;
                        continue;
                    }
                }
                _ => {}
            }
            return v;
        }
    }

    /// The next line of this kind, skipping others; within one deadline.
    async fn next_kind(&mut self, kind: &str) -> Value {
        let end = deadline();
        loop {
            let v = self.next(kind, end).await;
            if v["kind"] == kind {
                return v;
            }
        }
    }

    async fn wait_state(&mut self, state: &str) {
        let end = deadline();
        while self.state != state {
            self.next(&format!("state {state}"), end).await;
        }
    }

    /// The data of the next event, which must be a `message` with this id.
    async fn expect_message(&mut self, id: &str) -> String {
        let e = self.next_kind("event").await;
        assert_eq!((e["name"].as_str(), e["id"].as_str()), (Some("message"), Some(id)), "{e}");
        e["data"].as_str().unwrap().to_owned()
    }

    async fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn quit(mut self) {
        self.send("quit").await;
        let _ = timeout_at(deadline(), self.child.wait()).await;
    }
}

pub(crate) async fn publish(client: &PublisherClient<tonic::transport::Channel>, user: &str, data: &str) -> String {
    let req = pb::PublishRequest { user_ids: vec![user.into()], event: Some(ev("", data)), ..Default::default() };
    client.clone().publish(req).await.expect("publish").into_inner().event_id
}

/// The real binary, on a given HTTP address (so that a second one can take the first's place).
pub(crate) struct Binary {
    child: Child,
    pub(crate) http: SocketAddr,
    pub(crate) client: PublisherClient<tonic::transport::Channel>,
}

impl Binary {
    pub(crate) async fn start(http: &str, extra: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ssegate"))
            .args(["serve", "--insecure-dev-identity", "--insecure-open-publish", "--log-format", "json"])
            .args(["--http-addr", http, "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the ssegate binary starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (http, grpc) = loop {
            let line = timeout_at(deadline(), lines.next_line()).await.expect("startup log").unwrap().expect("a line");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
            if v["message"] == "ssegate serving" {
                let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                break (addr("http"), addr("grpc"));
            }
        };
        // Keep reading, so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let client = PublisherClient::connect(format!("http://{grpc}")).await.expect("grpc connects");
        Binary { child, http, client }
    }

    /// SIGTERM (a graceful drain), then waits for the exit.
    pub(crate) async fn terminate(mut self) {
        let pid = self.child.id().expect("running").to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let exit = timeout_at(deadline(), self.child.wait()).await.expect("exits in time").unwrap();
        assert!(exit.success(), "{exit:?}");
    }
}

/// What a load balancer says while the service behind it restarts: `503` to every request
/// (with CORS, as ssegate's own refusals have). Counts the requests it answered.
pub(crate) async fn unavailable_stub(addr: SocketAddr) -> (watch::Receiver<u32>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.expect("the stopped server's port is free");
    let (tx, rx) = watch::channel(0u32);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nAccess-Control-Allow-Origin: *\r\n\
                      Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nrestarting\r\n",
                )
                .await;
            tx.send_modify(|n| *n += 1);
        }
    });
    (rx, task)
}

#[tokio::test]
async fn the_client_survives_a_server_restart_behind_a_503_and_resumes_from_its_last_id() {
    let flags = ["--cors-allowed-origins", "*", "--retry", "300ms"];
    let first = Binary::start("127.0.0.1:0", &flags).await;
    let addr = first.http;
    let options = json!({ "query": { "user": "web" }, "minDelay": 100, "maxDelay": 800 });
    let mut page = ClientPage::open(addr, options).await;
    page.wait_state("open").await;
    let a1 = publish(&first.client, "web", "a1").await;
    let a2 = publish(&first.client, "web", "a2").await;
    assert_eq!(page.expect_message(&a1).await, "a1");
    assert_eq!(page.expect_message(&a2).await, "a2");

    // The server drains and exits; for a while the address answers 503 (the EventSource fails
    // for good: only the client's own reconnects can get past this).
    first.terminate().await;
    let (mut answered, stub) = unavailable_stub(addr).await;
    page.wait_state("waiting").await;
    timeout_at(deadline(), answered.wait_for(|n| *n >= 1)).await.expect("the client tried the 503").unwrap();
    stub.abort();
    let _ = stub.await;

    // A new process in the same place: the client reconnects with the id of the last event it
    // received (`?last_event_id=`), which the new process did not issue, and is told so.
    let second = Binary::start(&addr.to_string(), &flags).await;
    let missed = page.next_kind("missed").await;
    assert_eq!(missed["payload"], json!({ "reason": "other_epoch", "last_event_id": a2 }));
    page.wait_state("open").await;
    let b1 = publish(&second.client, "web", "b1").await;
    let b2 = publish(&second.client, "web", "b2").await;
    assert_eq!(page.expect_message(&b1).await, "b1");
    assert_eq!(page.expect_message(&b2).await, "b2");
    let data: Vec<_> = page.events.iter().map(|e| e["data"].as_str().unwrap()).collect();
    assert_eq!(data, ["a1", "a2", "b1", "b2"], "everything, in order, once");
    page.quit().await;
    second.terminate().await;
}

#[tokio::test]
async fn the_client_keeps_retrying_a_429_with_growing_backoff_and_connects_once_a_slot_frees() {
    let app = spawn_app(&["--cors-allowed-origins", "*", "--max-connections-per-user", "1"]).await;
    let holder = app.subscribe("user=web").await;
    app.wait_connections("web", 1).await;
    let options = json!({ "query": { "user": "web" }, "minDelay": 50, "maxDelay": 400 });
    let mut page = ClientPage::open(app.http, options).await;

    // Refused again and again; each retry waits under a ceiling that doubles up to the max.
    let (mut caps, end) = (Vec::new(), deadline());
    while caps.len() < 5 {
        assert!(Instant::now() < end, "five retries within the deadline: {caps:?}");
        let v = page.next_kind("state").await;
        assert_ne!(v["state"], "open", "the slot is taken");
        if v["state"] == "waiting" {
            let (attempt, cap, delay) = (&v["detail"]["attempt"], &v["detail"]["cap"], &v["detail"]["delay"]);
            assert_eq!(attempt.as_u64(), Some(caps.len() as u64 + 1), "{v}");
            assert!(delay.as_f64().unwrap() <= cap.as_f64().unwrap(), "full jitter stays under the cap: {v}");
            caps.push(cap.as_u64().unwrap());
        }
    }
    assert_eq!(caps, [50, 100, 200, 400, 400]);
    let rejected = app.stats().await.connections_rejected;
    assert!(rejected >= 5, "the server refused each attempt: {rejected}");

    // The other connection leaves: the next attempt gets in, and events flow.
    drop(holder);
    page.wait_state("open").await;
    app.wait_connections("web", 1).await;
    let id = app.publish_users(&["web"], "", "in").await.event_id;
    assert_eq!(page.expect_message(&id).await, "in");
    page.quit().await;
}

#[tokio::test]
async fn a_client_whose_only_events_were_retained_resumes_from_the_stream_position_and_misses_nothing() {
    let app = spawn_app(&["--cors-allowed-origins", "*"]).await;
    let req = pb::PublishRequest {
        user_ids: vec!["web".into()],
        event: Some(ev("unread", "7")),
        retain: Some(pb::Retain { ttl_seconds: 0, clear: false }),
        ..Default::default()
    };
    let state = app.client.clone().publish(req).await.expect("retained publish").into_inner().event_id;
    let options = json!({ "query": { "user": "web" }, "names": ["unread"], "minDelay": 100, "maxDelay": 800 });
    let mut page = ClientPage::open(app.http, options).await;
    let e = page.next_kind("event").await;
    let got = (e["name"].as_str(), e["data"].as_str(), e["id"].as_str(), e["lastEventId"].as_str());
    assert_eq!(got, (Some("unread"), Some("7"), Some(""), Some("")), "a retained event has no id: {e}");

    // The stream's position follows the retained events: the client records it, though no
    // event had an id and the page does not listen for it.
    page.send("wait_last_id 5000").await;
    let l = page.next_kind("last_id").await;
    assert_eq!(l["lastEventId"].as_str(), Some(state.as_str()), "the position, as lastEventId: {l}");

    // The page goes away, and an event is published while it has no connection.
    page.send("close").await;
    page.next_kind("closed").await;
    app.wait_connections("web", 0).await;
    let away = app.publish_users(&["web"], "", "while away").await.event_id;

    // It comes back from the stored position with a new client, which this time listens for
    // `ssegate.position` by name (the first one did not, and was not handed it).
    page.send(r#"reopen {"names":["unread","ssegate.position"]}"#).await;
    assert_eq!(page.next_kind("reopened").await["lastEventId"].as_str(), Some(state.as_str()));
    assert_eq!(page.expect_message(&away).await, "while away", "resumed from the position, not afresh");
    let p = page.next_kind("event").await;
    let got = (p["name"].as_str(), p["id"].as_str(), p["data"].as_str(), p["lastEventId"].as_str());
    assert_eq!(got, (Some("ssegate.position"), Some(away.as_str()), Some(away.as_str()), Some(away.as_str())), "{p}");
    page.wait_state("open").await;
    let live = app.publish_users(&["web"], "", "live").await.event_id;
    assert_eq!(page.expect_message(&live).await, "live");

    let seen: Vec<_> = page.events.iter().map(|e| (e["name"].as_str().unwrap(), e["data"].as_str().unwrap())).collect();
    assert_eq!(
        seen,
        [("unread", "7"), ("message", "while away"), ("ssegate.position", away.as_str()), ("message", "live")],
        "the retained value once, nothing missed or repeated, the position only where listened for"
    );
    assert!(page.missed.is_empty(), "no ssegate.missed: {:?}", page.missed);
    let s = app.stats().await;
    assert_eq!((s.events_replayed, s.resumes_missed, s.retained_sent), (1, 0, 1), "{s:?}");
    page.quit().await;
}

// ------------------------------------------------------------------- tokens

pub(crate) const SECRET: &str = "a-test-only-hs256-secret-of-more-than-32-bytes";

pub(crate) fn token(sub: &str, ttl_secs: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({ "sub": sub, "exp": now + ttl_secs });
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

#[tokio::test]
async fn the_client_gets_a_fresh_token_when_the_stream_closes_at_expiry_and_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("ssegate-client-js-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let app = spawn_app_with(&[
        "--jwt-secret-file",
        secret.to_str().unwrap(),
        "--jwt-leeway",
        "0s",
        "--insecure-open-publish",
        "--cors-allowed-origins",
        "*",
    ])
    .await;
    let options = json!({ "tokens": true, "minDelay": 50, "maxDelay": 1000, "retry": 100 });
    let mut page = ClientPage::open(app.http, options).await;

    // A token good for about 5 s (exp has one-second resolution; slow enough for a loaded CI
    // machine to connect well before it expires).
    page.next_kind("token_request").await;
    page.send(&format!("token {}", token("web", 5))).await;
    page.wait_state("open").await;
    let opened_at = Instant::now();
    app.wait_connections("web", 1).await;
    let e1 = app.publish_users(&["web"], "", "e1").await.event_id;
    assert_eq!(page.expect_message(&e1).await, "e1");

    // The server closes the stream when the token expires; the client asks for a new one. An
    // event published now, with no connection open, can only arrive by the client resuming.
    page.next_kind("token_request").await;
    assert!(opened_at.elapsed().as_secs_f64() > 1.0, "asked again only at expiry");
    app.wait_connections("web", 0).await;
    let e2 = app.publish_users(&["web"], "", "e2").await.event_id;
    page.send(&format!("token {}", token("web", 3600))).await;
    page.auto_token = Some(Box::new(|| token("web", 3600)));
    assert_eq!(page.expect_message(&e2).await, "e2");
    assert_eq!(page.state, "open");
    let e3 = app.publish_users(&["web"], "", "e3").await.event_id;
    assert_eq!(page.expect_message(&e3).await, "e3");
    let data: Vec<_> = page.events.iter().map(|e| e["data"].as_str().unwrap()).collect();
    assert_eq!(data, ["e1", "e2", "e3"], "everything, in order, once");
    assert_eq!(app.stats().await.events_replayed, 1, "e2 came from the replay log");
    // Whether or not the server says why it closed (the client must not depend on it), it
    // never says anything else here.
    for d in &page.disconnects {
        assert_eq!(d["reason"], "token_expired", "{d}");
    }
    page.quit().await;
}
