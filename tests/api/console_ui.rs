//! The admin console in a real browser (headless Chromium, driven by
//! tests/browser/console-driver.mjs): each page loads with no console error, the overview's
//! numbers move as events are published, each action works from the UI. With
//! `SSEGATE_SCREENSHOTS=docs/console` the test writes the README's screenshots there.

use serde_json::Value;
use ssegate::grpc::pb;
use tokio::{
    io::{AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdout},
    time::timeout_at,
};

use crate::{
    browser::spawn_driver,
    console::{TOKEN, console_app, token_file},
    helpers::{deadline, ev},
};

struct Ui {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Errors the page logged, in order.
    errors: Vec<String>,
}

impl Ui {
    async fn open(url: &str) -> Ui {
        let (child, lines) = spawn_driver("console-driver.mjs", &[url.to_owned()]);
        let mut ui = Ui { child, lines, errors: Vec::new() };
        assert_eq!(ui.reply("ready").await["kind"], "ready");
        ui
    }

    /// The next line that is not a console error (those are collected).
    async fn reply(&mut self, what: &str) -> Value {
        loop {
            let line = timeout_at(deadline() + std::time::Duration::from_secs(5), self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("console UI: timed out waiting for {what}"))
                .expect("read driver output")
                .unwrap_or_else(|| panic!("console driver exited while waiting for {what}"));
            let v: Value = serde_json::from_str(&line).expect("driver prints JSON lines");
            if v["kind"] == "console-error" {
                self.errors.push(v["text"].as_str().unwrap_or_default().to_owned());
                continue;
            }
            return v;
        }
    }

    /// Sends one command and waits for its answer; returns the text it read.
    async fn run(&mut self, command: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(format!("{command}\n").as_bytes()).await.unwrap();
        let v = self.reply(command).await;
        assert_eq!(v["kind"], "ok", "{command}: {v}; page errors so far: {:?}", self.errors);
        v["text"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until `selector`'s text matches `regex`.
    async fn wait(&mut self, selector: &str, regex: &str) -> String {
        self.run(&format!("wait {selector} {regex}")).await
    }

    async fn screenshot(&mut self, name: &str) {
        if let Ok(dir) = std::env::var("SSEGATE_SCREENSHOTS") {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            self.run(&format!("screenshot {}", dir.join(format!("{name}.png")).display())).await;
        }
    }

    async fn quit(mut self) -> Vec<String> {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"quit\n").await;
        }
        while let Ok(Ok(Some(line))) = timeout_at(deadline(), self.lines.next_line()).await {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["kind"] == "console-error"
            {
                self.errors.push(v["text"].as_str().unwrap_or_default().to_owned());
            }
        }
        let _ = timeout_at(deadline(), self.child.wait()).await;
        self.errors
    }
}

#[tokio::test]
async fn chromium_runs_the_console_overview_inspector_actions_and_live_tail() {
    let file = token_file();
    let app = console_app(&file).await;
    let mut ui = Ui::open(&format!("http://{}/console/", app.admin)).await;

    // Login: the token is asked for once, then the overview goes live.
    ui.run(&format!("fill #token {TOKEN}")).await;
    ui.run("click #login-form>button").await;
    ui.wait("#conn", "^live$").await;
    ui.wait("#v-streams", "^0$").await;
    ui.wait("#problems", "^No problems$").await;
    assert!(!ui.run("text body").await.contains(TOKEN), "the token is never shown");

    // Numbers move as a user connects and events are published.
    let mut client = app.subscribe("user=4711&topic=news").await;
    client.cursor().await;
    ui.wait("#v-streams", "^1$").await;
    let retained = pb::PublishRequest {
        user_ids: vec!["4711".into()],
        event: Some(ev("status", "{\"online\":true}")),
        retain: Some(pb::Retain { clear: false, ttl_seconds: 0 }),
        ..Default::default()
    };
    app.client.clone().publish(retained).await.unwrap();
    let mut last = String::new();
    for i in 0..5 {
        last = app.publish_users(&["4711"], "notification", &format!("{{\"n\":{i}}}")).await.event_id;
    }
    for _ in 0..6 {
        client.next_event().await;
    }
    ui.wait("#v-published", "^6 since start$").await;
    ui.wait("#v-pub", "^[1-9]").await;
    if std::env::var_os("SSEGATE_SCREENSHOTS").is_some() {
        // For the screenshot only: some seconds of uneven traffic, so the charts have a shape.
        let mut ticks = 0;
        for round in 0u64..40 {
            for _ in 0..(round % 7) * 3 + 1 {
                app.publish_topic("news", "tick").await;
                ticks += 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        for _ in 0..ticks {
            assert_eq!(client.next_event().await.data, "tick");
        }
    }
    ui.screenshot("overview").await;

    // Inspector: the user's stream, retained value, recent events, and the event reached it.
    ui.run("tab inspector").await;
    ui.run("fill #l-id 4711").await;
    ui.run(&format!("fill #l-event {last}")).await;
    ui.run("click #lookup-form>button").await;
    ui.wait("#l-reached", &format!("^Event {last}: reached")).await;
    ui.wait("#l-streams", "h1").await;
    ui.wait("#l-retained", "status").await;
    ui.wait("#l-recent", &last).await;
    ui.screenshot("inspector").await;

    // Publish a test event from the UI: the user's stream receives it, the page says reached.
    ui.run("fill #p-data from the UI").await;
    ui.run("click #publish-form>button").await;
    ui.wait("#a-result", "^publish: .*\"id\"").await;
    let e = client.next_event().await;
    assert_eq!(e.data, "from the UI");
    ui.wait("#l-reached", &format!("^Event {}: reached", e.last_event_id)).await;

    // Clear the retained value from the UI.
    ui.run("click .clear-retained").await;
    ui.wait("#a-result", "^clear-retained: ").await;
    ui.wait("#l-retained", "No retained value").await;
    assert_eq!(client.next_event().await.event_type, "status", "the clearing event is delivered, as over gRPC");
    assert_eq!(app.stats().await.retained_values, 0);

    // Disconnect the user from the UI: the stream gets its final event and ends.
    ui.run("click #disconnect").await;
    ui.wait("#a-result", "\"closed\":1").await;
    let bye = client.next_event().await;
    assert_eq!((bye.event_type.as_str(), bye.data.as_str()), ("ssegate.disconnect", "console"));
    assert!(client.next_event_or_end().await.is_none());
    ui.wait("#l-streams", "No stream open").await;

    // Live tail of a topic.
    ui.run("tab tail").await;
    ui.run("select #t-kind topic").await;
    ui.run("fill #t-id news").await;
    ui.run("click #t-start").await;
    ui.wait("#t-status", "^following topic news").await;
    for text in ["breaking: ssegate 1.0", "weather: sunny"] {
        app.publish_topic("news", text).await;
    }
    ui.wait("#t-events", "weather: sunny").await;
    ui.wait("#t-events", "breaking").await;
    ui.screenshot("tail").await;
    ui.run("click #t-stop").await;
    ui.wait("#t-status", "^stopped$").await;

    let errors = ui.quit().await;
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
}
