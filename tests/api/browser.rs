//! A real browser: headless Chromium's `EventSource`, driven by tests/browser/driver.mjs
//! (playwright-core). `scripts/test.sh` installs Chromium and the driver's packages.

use std::process::Stdio;

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
    time::timeout_at,
};

use ssegate::grpc::pb;

use crate::helpers::{deadline, spawn_app};

/// Starts `node tests/browser/<script> <args>` with piped stdin and stdout (its JSON lines).
pub fn spawn_driver(script: &str, args: &[String]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(dir).join("node_modules/playwright-core").exists(),
        "tests/browser/node_modules is missing: run ./scripts/test.sh (or `npm ci` in tests/browser)"
    );
    let mut child = Command::new("node")
        .arg(format!("{dir}/{script}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (install Node.js 20)");
    let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    (child, lines)
}

pub struct Browser {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    /// Opens a page whose EventSource connects to `url`, listening for `message` and `names`.
    pub async fn open(url: &str, names: &[&str]) -> Browser {
        let mut args = vec![url.to_owned()];
        args.extend(names.iter().map(|n| n.to_string()));
        let (child, lines) = spawn_driver("driver.mjs", &args);
        let mut b = Browser { child, lines };
        assert_eq!(b.next("ready").await["kind"], "ready");
        b
    }

    /// The next JSON line the driver printed.
    pub async fn next(&mut self, what: &str) -> Value {
        let line = timeout_at(deadline(), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("browser: timed out waiting for {what}"))
            .expect("read driver output")
            .unwrap_or_else(|| panic!("browser driver exited while waiting for {what}"));
        serde_json::from_str(&line).expect("driver prints JSON lines")
    }

    /// The next line of the given kind, skipping others.
    pub async fn next_kind(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next(kind).await;
            if v["kind"] == kind {
                return v;
            }
        }
    }

    pub async fn quit(mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"quit\n").await;
        }
        let _ = timeout_at(deadline(), self.child.wait()).await;
    }
}

#[tokio::test]
async fn chromium_eventsource_receives_named_multiline_unicode_events_with_ids() {
    let app = spawn_app(&["--cors-allowed-origins", "*"]).await;
    let mut browser = Browser::open(&format!("http://{}/v1/events?user=web&topic=t", app.http), &["chat"]).await;
    browser.next_kind("open").await;
    let r1 = app.publish_users(&["web"], "chat", "héllo\nwörld ✓ 😀").await;
    let r2 = app.publish_topic("t", "line1\r\nline2\rline3").await;
    let r3 = app.publish_users(&["web"], "", "data: forged\n\nevent: chat").await;
    let e1 = browser.next_kind("event").await;
    assert_eq!(
        (e1["type"].as_str(), e1["data"].as_str(), e1["lastEventId"].as_str()),
        (Some("chat"), Some("héllo\nwörld ✓ 😀"), Some(r1.event_id.as_str()))
    );
    let e2 = browser.next_kind("event").await;
    assert_eq!(
        (e2["type"].as_str(), e2["data"].as_str(), e2["lastEventId"].as_str()),
        (Some("message"), Some("line1\nline2\nline3"), Some(r2.event_id.as_str()))
    );
    let e3 = browser.next_kind("event").await;
    assert_eq!((e3["type"].as_str(), e3["data"].as_str()), (Some("message"), Some("data: forged\n\nevent: chat")));
    assert_eq!(e3["lastEventId"].as_str(), Some(r3.event_id.as_str()));
    browser.quit().await;
}

#[tokio::test]
async fn chromium_reconnects_by_itself_and_resumes_with_last_event_id_losing_nothing() {
    // A long retry leaves a wide window between the stream's end and the reconnect, so the
    // events below are certainly published while the browser is away.
    let app = spawn_app(&["--cors-allowed-origins", "*", "--retry", "2s"]).await;
    let mut browser = Browser::open(&format!("http://{}/v1/events?user=web", app.http), &[]).await;
    browser.next_kind("open").await;
    app.publish_users(&["web"], "", "before").await;
    assert_eq!(browser.next_kind("event").await["data"], "before");

    // End the stream from the server side; EventSource goes back to CONNECTING by itself.
    app.client
        .clone()
        .disconnect(pb::DisconnectRequest { user_id: "web".into(), reason: String::new() })
        .await
        .unwrap();
    assert_eq!(browser.next_kind("error").await["readyState"], 0, "reconnecting, not closed");
    for i in 0..3 {
        app.publish_users(&["web"], "", &format!("away {i}")).await;
    }
    browser.next_kind("open").await;
    for i in 0..3 {
        assert_eq!(browser.next_kind("event").await["data"], format!("away {i}"));
    }
    app.publish_users(&["web"], "", "live").await;
    assert_eq!(browser.next_kind("event").await["data"], "live", "then live, with nothing repeated");
    assert_eq!(app.stats().await.events_replayed, 3, "the browser sent Last-Event-ID and was replayed to");
    browser.quit().await;
}
