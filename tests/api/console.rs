//! The admin console (`/console/` on the admin port): off without `--console-token-file`; every
//! data endpoint and action needs the token; the inspector shows a user's streams, recent
//! events and whether an event reached them; its actions do what the gRPC calls do; the live
//! overview and the live tail stream JSON over SSE.

use serde_json::Value;
use ssegate::grpc::pb;
use tokio::{net::TcpStream, time::timeout_at};

use crate::helpers::{SseClient, TestApp, deadline, ev, http_request_with_body, spawn_app};

pub const TOKEN: &str = "console-token-0123456789abcdef";

/// A token file holding `TOKEN`, kept for the test's lifetime.
pub fn token_file() -> tempfile_lite::TempFile {
    tempfile_lite::TempFile::with(&format!("# console\n{TOKEN}\n"))
}

/// A server with the console on.
pub async fn console_app(file: &tempfile_lite::TempFile) -> TestApp {
    spawn_app(&["--console-token-file", file.path()]).await
}

const BEARER: &str = "Bearer console-token-0123456789abcdef";

/// `GET` an API path with the token; asserts 200 and returns the JSON.
pub async fn get_json(app: &TestApp, path: &str) -> Value {
    let (status, _, body) = http_request_with_body(app.admin, "GET", path, &[("Authorization", BEARER)], "").await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// `POST` JSON to an API path with the token; (status, JSON).
pub async fn post_json(app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    let headers = [("Authorization", BEARER), ("Content-Type", "application/json")];
    let (status, _, text) = http_request_with_body(app.admin, "POST", path, &headers, &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Opens an SSE stream of the console API with the token.
async fn console_stream(app: &TestApp, path: &str) -> SseClient {
    let c = SseClient::connect(app.admin, path, &[("Authorization", BEARER)]).await;
    assert_eq!(c.status, 200, "{path}: {:?}", c.head);
    c
}

/// A tiny temporary file (std only), removed on drop.
pub mod tempfile_lite {
    pub struct TempFile(String);

    impl TempFile {
        pub fn with(content: &str) -> Self {
            let path = std::env::temp_dir().join(format!("ssegate-console-{}-{}", std::process::id(), fastrand_u64()));
            std::fs::write(&path, content).unwrap();
            TempFile(path.to_string_lossy().into_owned())
        }

        pub fn path(&self) -> &str {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn fastrand_u64() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
        h.finish()
    }
}

const DATA_ENDPOINTS: [&str; 4] = [
    "/console/api/overview",
    "/console/api/live",
    "/console/api/lookup?kind=user&id=u",
    "/console/api/tail?kind=user&id=u",
];
const ACTIONS: [(&str, &str); 3] = [
    ("/console/api/publish", r#"{"kind":"user","id":"u","data":"x"}"#),
    ("/console/api/clear-retained", r#"{"kind":"user","id":"u","name":"s"}"#),
    ("/console/api/disconnect", r#"{"user":"u"}"#),
];

#[tokio::test]
async fn the_console_is_off_with_a_reason_without_a_token_file() {
    let app = spawn_app(&[]).await;
    for path in ["/console", "/console/", "/console/console.js", DATA_ENDPOINTS[0]] {
        let (status, _, body) = http_request_with_body(app.admin, "GET", path, &[("Authorization", BEARER)], "").await;
        assert_eq!(status, 404, "{path}");
        assert!(body.contains("--console-token-file"), "{path}: the reason names the flag: {body}");
        assert_eq!(body.lines().count(), 1, "one line: {body}");
    }
    let (status, ..) = http_request_with_body(app.admin, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200, "the rest of the admin port is unchanged");
}

#[tokio::test]
async fn every_data_endpoint_and_action_is_refused_without_the_token_or_with_a_wrong_one() {
    let file = token_file();
    let app = console_app(&file).await;
    let (status, headers, body) = http_request_with_body(app.admin, "GET", "/console/", &[], "").await;
    assert_eq!(status, 200, "the page itself (no data) needs no token");
    assert!(headers.iter().any(|(k, v)| k == "content-security-policy" && v.contains("default-src 'none'")));
    assert!(!body.contains(TOKEN));
    let wrong = "Bearer console-token-0123456789abcdeX";
    for auth in [None, Some(wrong), Some("Basic Y29uc29sZQ=="), Some(TOKEN)] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        for path in DATA_ENDPOINTS {
            let (status, h, body) = http_request_with_body(app.admin, "GET", path, &headers, "").await;
            assert_eq!(status, 401, "GET {path} with {auth:?}: {body}");
            assert!(h.iter().any(|(k, v)| k == "www-authenticate" && v == "Bearer"));
            assert!(!body.contains(TOKEN), "no secret in the answer");
        }
        for (path, json) in ACTIONS {
            let mut headers = headers.clone();
            headers.push(("Content-Type", "application/json"));
            let (status, _, body) = http_request_with_body(app.admin, "POST", path, &headers, json).await;
            assert_eq!(status, 401, "POST {path} with {auth:?}: {body}");
        }
    }
    // With the token, the same calls are served.
    let o = get_json(&app, "/console/api/overview").await;
    assert_eq!(o["broker"]["kind"], "memory");
    assert!(!o.to_string().contains(TOKEN));
    let (status, _) = post_json(&app, "/console/api/disconnect", &serde_json::json!({"user": "u"})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_cross_origin_or_non_json_post_is_refused() {
    let file = token_file();
    let app = console_app(&file).await;
    let body = ACTIONS[0].1;
    let evil = [("Authorization", BEARER), ("Content-Type", "application/json"), ("Origin", "http://evil.example")];
    let (status, _, text) = http_request_with_body(app.admin, "POST", "/console/api/publish", &evil, body).await;
    assert_eq!(status, 403, "{text}");
    let form = [("Authorization", BEARER), ("Content-Type", "text/plain")];
    let (status, _, text) = http_request_with_body(app.admin, "POST", "/console/api/publish", &form, body).await;
    assert_eq!(status, 415, "{text}");
    let origin = format!("http://{}", app.admin);
    let ours = [("Authorization", BEARER), ("Content-Type", "application/json"), ("Origin", origin.as_str())];
    let (status, _, text) = http_request_with_body(app.admin, "POST", "/console/api/publish", &ours, body).await;
    assert_eq!(status, 200, "from its own origin: {text}");
    assert_eq!(app.stats().await.events_published, 1, "only the same-origin publish went out");
}

#[tokio::test]
async fn the_inspector_shows_a_users_stream_its_events_and_whether_one_reached_it() {
    let file = token_file();
    let app = console_app(&file).await;
    let mut client = app.subscribe("user=4711&topic=news").await;
    client.cursor().await;
    let sent = app.publish_users(&["4711"], "note", "hello").await;
    assert_eq!(client.next_event().await.data, "hello");
    let before_any = app.publish_users(&["someone-else"], "", "not for 4711").await;

    let r = get_json(&app, &format!("/console/api/lookup?kind=user&id=4711&event={}", sent.event_id)).await;
    let streams = r["this_replica"]["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{r}");
    let s = &streams[0];
    assert_eq!(s["protocol"], "h1");
    assert!(s["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(s["topics"][0], "news");
    assert_eq!(s["last_sent_id"].as_str(), Some(sent.event_id.as_str()));
    assert_eq!(r["cluster"]["connections"], 1);
    let recent = r["recent"]["events"].as_array().unwrap();
    assert_eq!(recent[0]["id"].as_str(), Some(sent.event_id.as_str()));
    assert_eq!((recent[0]["name"].as_str(), recent[0]["data"].as_str()), (Some("note"), Some("hello")));
    assert_eq!(r["reached"]["verdict"], "reached", "{}", r["reached"]);
    assert_eq!(r["reached"]["streams"][0]["state"], "sent");

    // An event for someone else: in the log, not addressed to 4711's stream.
    let r = get_json(&app, &format!("/console/api/lookup?kind=user&id=4711&event={}", before_any.event_id)).await;
    assert_eq!(r["reached"]["verdict"], "not_addressed", "{}", r["reached"]);
    // An id of another epoch cannot be judged: said so.
    let r = get_json(&app, "/console/api/lookup?kind=user&id=4711&event=abc-1").await;
    assert_eq!(r["reached"]["verdict"], "unknown");
    // The topic's view lists the same stream.
    let r = get_json(&app, "/console/api/lookup?kind=topic&id=news").await;
    assert_eq!(r["this_replica"]["total"], 1);
    // A bad id is a 400 with the reason.
    let (status, _, body) =
        http_request_with_body(app.admin, "GET", "/console/api/lookup?kind=user&id=", &[("Authorization", BEARER)], "")
            .await;
    assert_eq!(status, 400, "{body}");

    // The publish action: same path as a gRPC publish; the inspector then shows it reached.
    let (status, p) = post_json(
        &app,
        "/console/api/publish",
        &serde_json::json!({"kind": "user", "id": "4711", "name": "probe", "data": "from the console"}),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    let e = client.next_event().await;
    assert_eq!((e.event_type.as_str(), e.data.as_str()), ("probe", "from the console"));
    assert_eq!(e.last_event_id, p["id"].as_str().unwrap());
    let r = get_json(&app, &format!("/console/api/lookup?kind=user&id=4711&event={}", p["id"].as_str().unwrap())).await;
    assert_eq!(r["reached"]["verdict"], "reached", "{}", r["reached"]);
}

#[tokio::test]
async fn the_disconnect_action_closes_the_users_stream_with_its_final_event() {
    let file = token_file();
    let app = console_app(&file).await;
    let mut client = app.subscribe("user=4711").await;
    client.cursor().await;
    let (status, r) = post_json(&app, "/console/api/disconnect", &serde_json::json!({"user": "4711"})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["closed"], 1);
    let last = client.next_event().await;
    assert_eq!((last.event_type.as_str(), last.data.as_str()), ("ssegate.disconnect", "console"));
    assert!(client.next_event_or_end().await.is_none(), "then the stream ends");
}

#[tokio::test]
async fn the_clear_retained_action_clears_the_value() {
    let file = token_file();
    let app = console_app(&file).await;
    let req = pb::PublishRequest {
        user_ids: vec!["4711".into()],
        event: Some(ev("status", "away")),
        retain: Some(pb::Retain { clear: false, ttl_seconds: 0 }),
        ..Default::default()
    };
    app.client.clone().publish(req).await.unwrap();
    let r = get_json(&app, "/console/api/lookup?kind=user&id=4711").await;
    assert_eq!(r["retained"][0]["name"], "status");
    assert_eq!(r["retained"][0]["data"], "away");
    let (status, c) = post_json(
        &app,
        "/console/api/clear-retained",
        &serde_json::json!({"kind": "user", "id": "4711", "name": "status"}),
    )
    .await;
    assert_eq!(status, 200, "{c}");
    let r = get_json(&app, "/console/api/lookup?kind=user&id=4711").await;
    assert_eq!(r["retained"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(app.stats().await.retained_values, 0);
}

#[tokio::test]
async fn the_live_overview_and_the_live_tail_stream_what_is_published() {
    let file = token_file();
    let app = console_app(&file).await;
    let mut live = console_stream(&app, "/console/api/live").await;
    let first: Value = serde_json::from_str(&live.next_event().await.data).unwrap();
    assert_eq!(first["replica"]["published"], 0);
    let mut tail = console_stream(&app, "/console/api/tail?kind=topic&id=news").await;
    let start = tail.next_event().await;
    assert_eq!(start.event_type, "start");
    let sent = app.publish_topic("news", "breaking").await;
    app.publish_topic("sports", "not followed").await;
    let e = tail.next_event().await;
    assert_eq!(e.event_type, "event");
    let e: Value = serde_json::from_str(&e.data).unwrap();
    assert_eq!((e["id"].as_str(), e["data"].as_str()), (Some(sent.event_id.as_str()), Some("breaking")));
    assert_eq!(e["target"], "topic news");
    // The overview's numbers move: the next samples count the publishes.
    loop {
        let v: Value = serde_json::from_str(&live.next_event().await.data).unwrap();
        if v["replica"]["published"] == 2 {
            assert!(v["replica"]["publishes_per_s"].is_number());
            break;
        }
    }
}

#[tokio::test]
async fn console_streams_end_when_the_server_shuts_down() {
    let file = token_file();
    let mut app = console_app(&file).await;
    let mut live = console_stream(&app, "/console/api/live").await;
    live.next_event().await;
    let mut tail = console_stream(&app, "/console/api/tail?kind=user&id=u").await;
    tail.next_event().await;
    app.stop().await;
    live.until_end().await;
    let rest = tail.until_end().await;
    assert!(live.ended && tail.ended, "both streams ended; tail said: {rest:?}");
}

#[tokio::test]
async fn each_action_is_one_audit_line_with_action_subject_peer_and_outcome() {
    let file = token_file();
    let mut server = crate::helpers::spawn_process(&["--console-token-file", file.path()], &[]).await;
    let admin = server.admin;
    let json = [("Authorization", BEARER), ("Content-Type", "application/json")];
    let (status, ..) =
        http_request_with_body(admin, "POST", "/console/api/disconnect", &json, r#"{"user":"4711"}"#).await;
    assert_eq!(status, 200);
    let (status, ..) = http_request_with_body(
        admin,
        "POST",
        "/console/api/publish",
        &json,
        r#"{"kind":"topic","id":"news","data":"x"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let bad = [("Authorization", "Bearer wrong-token-0123456789"), ("Content-Type", "application/json")];
    let (status, ..) =
        http_request_with_body(admin, "POST", "/console/api/disconnect", &bad, r#"{"user":"4711"}"#).await;
    assert_eq!(status, 401);

    let pid = server.child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = timeout_at(deadline(), server.child.wait()).await.expect("exits in time").unwrap();
    assert!(exit.success(), "{exit:?}");
    let audit: Vec<Value> = server
        .rest_of_logs()
        .await
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "ssegate::audit")
        .collect();
    let fields: Vec<(String, String, String)> = audit
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            assert!(s("peer").starts_with("127.0.0.1:"), "{v}");
            (s("action"), s("subject"), s("outcome"))
        })
        .collect();
    let expect = |a: &str, s: &str, o: &str| (a.to_owned(), s.to_owned(), o.to_owned());
    assert_eq!(
        fields,
        [
            expect("disconnect", "user 4711", "ok"),
            expect("publish", "topic news", "ok"),
            expect("disconnect", "-", "unauthorized"),
        ],
        "{audit:?}"
    );
    assert!(!audit.iter().any(|v| v.to_string().contains(TOKEN)), "no token in any audit line");
}

#[tokio::test]
async fn with_nats_the_inspector_lists_streams_on_every_replica_and_judges_reached_across_them() {
    let nats = crate::broker::Broker::start().await;
    let file = token_file();
    let flags = ["--console-token-file", file.path()];
    let (a, b) = (crate::broker::replica(&nats, &flags).await, crate::broker::replica(&nats, &flags).await);
    let mut on_b = b.subscribe("user=4711").await;
    on_b.cursor().await;
    let sent = a.publish_users(&["4711"], "", "via a").await;
    assert_eq!(on_b.next_event().await.data, "via a");
    // Asked on a, where 4711 has no stream: b's stream is listed under b's id and got the event.
    let end = deadline();
    let r = loop {
        let r = get_json(&a, &format!("/console/api/lookup?kind=user&id=4711&event={}", sent.event_id)).await;
        // a may still be catching up with the stream, or b's hello not yet heard: ask again.
        if r["reached"]["verdict"] == "reached" && r["cluster"]["replicas"] == 2 {
            break r;
        }
        assert!(tokio::time::Instant::now() < end, "never reached across replicas: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let streams = r["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{r}");
    assert_ne!(streams[0]["replica"], "this", "the stream is on the other replica");
    assert_eq!(r["this_replica"]["total"], 0);
    assert_eq!(r["cluster"]["connections"], 1);
    assert_eq!(r["reached"]["streams"][0]["state"], "sent");
    // The disconnect action asked on a closes the stream on b.
    // The overview lists both replicas, this one first.
    let o = get_json(&a, "/console/api/overview").await;
    let reps = o["cluster"]["per_replica"].as_array().unwrap();
    assert_eq!(reps.len(), 2, "{o}");
    assert_eq!((reps[0]["replica"].as_str(), reps[0]["streams"].as_u64()), (Some("this"), Some(0)));
    assert_eq!(reps[1]["streams"], 1);
    let (status, d) = post_json(&a, "/console/api/disconnect", &serde_json::json!({"user": "4711"})).await;
    assert_eq!((status, d["closed"].as_u64()), (200, Some(1)), "{d}");
    assert_eq!(on_b.next_event().await.event_type, "ssegate.disconnect");
}

#[tokio::test]
async fn console_streams_are_bounded_in_number() {
    let file = token_file();
    let app = console_app(&file).await;
    let mut live = Vec::new();
    for _ in 0..16 {
        live.push(console_stream(&app, "/console/api/live").await);
    }
    let (status, _, body) =
        http_request_with_body(app.admin, "GET", "/console/api/live", &[("Authorization", BEARER)], "").await;
    assert_eq!(status, 429, "{body}");
    let mut tails = Vec::new();
    for _ in 0..8 {
        tails.push(console_stream(&app, "/console/api/tail?kind=topic&id=t").await);
    }
    let (status, ..) =
        http_request_with_body(app.admin, "GET", "/console/api/tail?kind=topic&id=t", &[("Authorization", BEARER)], "")
            .await;
    assert_eq!(status, 429);
    // A closed stream gives its place back.
    drop(tails.pop());
    let end = deadline();
    loop {
        let c = SseClient::connect(app.admin, "/console/api/tail?kind=topic&id=t", &[("Authorization", BEARER)]).await;
        if c.status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "the place never came back ({})", c.status);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn problems_are_listed_first_in_the_overview() {
    let file = token_file();
    let app = spawn_app(&["--console-token-file", file.path(), "--replay-capacity", "0"]).await;
    let o = get_json(&app, "/console/api/overview").await;
    let problems: Vec<&str> = o["problems"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(problems, ["the replay log is off (--replay-capacity 0): no client can resume"]);
}

#[tokio::test]
async fn a_token_file_without_a_valid_token_stops_the_server_at_start() {
    use clap::Parser;
    for content in ["", "short\n"] {
        let file = tempfile_lite::TempFile::with(content);
        let argv = ["ssegate", "serve", "--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
        let mut argv: Vec<&str> = argv.to_vec();
        argv.extend(["--grpc-addr", "127.0.0.1:0", "--console-token-file", file.path()]);
        let ssegate::config::Command::Serve(args) = ssegate::config::Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        let err = ssegate::startup::Application::build(*args).await.err().expect("refused");
        assert!(err.to_string().starts_with("--console-token-file: "), "{err}");
    }
}

#[test]
fn the_readme_states_the_pages_weight() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/console/page/");
    let size = |f: &str| std::fs::metadata(format!("{dir}{f}")).unwrap().len();
    let with_commas = |n: u64| {
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    let (html, js, css) = (size("index.html"), size("console.js"), size("console.css"));
    let want = format!(
        "{} bytes (`index.html` {}, `console.js` {}, `console.css` {};",
        with_commas(html + js + css),
        with_commas(html),
        with_commas(js),
        with_commas(css)
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains(&want), "README.md should say: {want}");
    assert!(html + js + css < 32 * 1024, "the console page stays light");
}

#[tokio::test]
async fn a_tail_that_is_not_read_is_cut_off_not_buffered_without_bound() {
    let file = token_file();
    let app = spawn_app(&["--console-token-file", file.path(), "--replay-max-bytes", "268435456"]).await;
    let mut tail = console_stream(&app, "/console/api/tail?kind=topic&id=big").await;
    assert_eq!(tail.next_event().await.event_type, "start");
    // Far more than the socket buffers and the tail's queue (512 events) hold while unread.
    let data = "x".repeat(16 * 1024);
    let published = 2000;
    for _ in 0..published {
        app.publish_topic("big", &data).await;
    }
    let mut events = 0;
    let mut ended = None;
    while let Some(e) = tail.next_event_or_end().await {
        match e.event_type.as_str() {
            "event" => events += 1,
            "end" => ended = Some(e.data),
            _ => {}
        }
    }
    assert!(events < published, "cut off before the end: got {events} of {published}");
    if let Some(end) = ended {
        assert_eq!(end, r#"{"reason":"cutoff"}"#);
    }
}

#[tokio::test]
async fn the_inspector_tells_h2_streams_from_h1() {
    let file = token_file();
    let app = console_app(&file).await;
    let tcp = TcpStream::connect(app.http).await.unwrap();
    let (client, conn) = h2::client::Builder::new().handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/v1/events?user=h2user", app.http)).body(()).unwrap();
    let (resp, _) = client.ready().await.unwrap().send_request(req, true).unwrap();
    let resp = timeout_at(deadline(), resp).await.expect("response in time").unwrap();
    assert_eq!(resp.status(), 200);
    app.wait_connections("h2user", 1).await;
    let r = get_json(&app, "/console/api/lookup?kind=user&id=h2user").await;
    assert_eq!(r["streams"][0]["protocol"], "h2", "{r}");
    drop(resp);
}
