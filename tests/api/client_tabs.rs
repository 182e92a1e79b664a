//! One stream per browser: the tabs of one user and subscription set share one stream through
//! the browser client (clients/js/ssegate.js), checked in headless Chromium with several tabs
//! of one browser profile (tests/browser/tabs-driver.mjs): ten tabs hold one stream on the
//! server; the holder closed mid-flood, frozen, or hung is replaced and every tab still gets
//! every event once, in order; another user's tab in the same browser gets none of them; a
//! server restart behind a 503 shows every tab the holder's backoff, and `ssegate.missed` and
//! `ssegate.disconnect` reach every tab as they reach one.

use std::{collections::HashMap, net::SocketAddr};

use serde_json::{Value, json};
use ssegate::grpc::pb;
use tokio::{
    io::{AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdout},
    time::{Duration, Instant, timeout_at},
};

use crate::{
    client_js::{Binary, SECRET, publish, token, unavailable_stub},
    helpers::{TestApp, deadline, ev, spawn_app, spawn_app_with},
};

/// Long enough for a hung holder to be found out (two unanswered pings, 3 s apart) on a busy
/// machine.
const TABS_DEADLINE: Duration = Duration::from_secs(40);

/// The tabs of one browser, driven by tests/browser/tabs-driver.mjs.
struct Tabs {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every line each tab reported, in its order.
    log: HashMap<String, Vec<Value>>,
}

impl Tabs {
    fn start(server: SocketAddr) -> Tabs {
        let (child, lines) = crate::browser::spawn_driver("tabs-driver.mjs", &[format!("http://{server}")]);
        Tabs { child, lines, log: HashMap::new() }
    }

    async fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Reads the driver's lines until `cond` holds, failing after TABS_DEADLINE.
    async fn until(&mut self, what: &str, cond: impl Fn(&Tabs) -> bool) {
        let end = Instant::now() + TABS_DEADLINE;
        while !cond(self) {
            let line = timeout_at(end, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("tabs: timed out waiting for {what}; states: {:?}", self.states()))
                .expect("read driver output")
                .unwrap_or_else(|| panic!("tabs driver exited while waiting for {what}"));
            let v: Value = serde_json::from_str(&line).expect("driver prints JSON lines");
            let tab = v["tab"].as_str().expect("every line names its tab").to_owned();
            self.log.entry(tab).or_default().push(v);
        }
    }

    fn lines_of<'a>(&'a self, tab: &str, kind: &'a str) -> impl Iterator<Item = &'a Value> {
        self.log.get(tab).into_iter().flatten().filter(move |v| v["kind"] == kind)
    }

    /// The tab's last reported state and role.
    fn state(&self, tab: &str) -> (String, String) {
        self.lines_of(tab, "state")
            .last()
            .map(|v| (v["state"].as_str().unwrap_or("").to_owned(), v["role"].as_str().unwrap_or("").to_owned()))
            .unwrap_or_default()
    }

    fn states(&self) -> Vec<(String, (String, String))> {
        let mut v: Vec<_> = self.log.keys().map(|t| (t.clone(), self.state(t))).collect();
        v.sort();
        v
    }

    /// `(name, id, data)` of every event the tab's handlers got.
    fn events(&self, tab: &str) -> Vec<(String, String, String)> {
        self.lines_of(tab, "event")
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
                (s("name"), s("id"), s("data"))
            })
            .collect()
    }

    /// The ids of the `message` events the tab got.
    fn message_ids(&self, tab: &str) -> Vec<String> {
        self.events(tab).into_iter().filter(|(n, ..)| n == "message").map(|(_, id, _)| id).collect()
    }

    async fn open(&mut self, tab: &str, options: Value) {
        self.send(&format!("open {tab} {options}")).await;
        self.until(&format!("tab {tab} ready"), |t| t.lines_of(tab, "ready").next().is_some()).await;
    }

    /// Waits until every tab listed is open, one as the holder and the others as followers (a
    /// follower reports `open` only once it has caught up), and returns the holder.
    async fn settled(&mut self, tabs: &[&str]) -> String {
        let holders = |t: &Tabs| tabs.iter().filter(|tab| t.state(tab).1 == "holder").count();
        self.until("every tab open, and one holder", |t| {
            tabs.iter().all(|tab| t.state(tab).0 == "open") && holders(t) == 1
        })
        .await;
        tabs.iter().find(|tab| self.state(tab).1 == "holder").unwrap().to_string()
    }

    /// The time (the page's clock, ms) of the tab's last line of this kind.
    fn time_of(&self, tab: &str, kind: &str) -> i64 {
        self.lines_of(tab, kind).last().and_then(|v| v["t"].as_i64()).expect("a time")
    }

    async fn quit(mut self) {
        self.send("quit").await;
        let _ = timeout_at(Instant::now() + TABS_DEADLINE, self.child.wait()).await;
    }
}

async fn publish_to(app: &TestApp, user: &str, data: &str) -> String {
    app.publish_users(&[user], "", data).await.event_id
}

fn jwt_app_flags(dir: &std::path::Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    ["--jwt-secret-file", secret.to_str().unwrap(), "--insecure-open-publish", "--cors-allowed-origins", "*"]
        .map(String::from)
        .to_vec()
}

#[tokio::test]
async fn ten_tabs_share_one_stream_and_a_holder_closed_mid_flood_hands_over_without_loss_or_repeat() {
    let dir = std::env::temp_dir().join(format!("ssegate-client-tabs-{}", std::process::id()));
    let flags = jwt_app_flags(&dir);
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let retained = pb::PublishRequest {
        user_ids: vec!["alice".into()],
        event: Some(ev("unread", "3")),
        retain: Some(pb::Retain { ttl_seconds: 0, clear: false }),
        ..Default::default()
    };
    app.client.clone().publish(retained).await.expect("retained publish");

    // Ten tabs of alice and one of bob, in one browser.
    let mut tabs = Tabs::start(app.http);
    let alice: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let alice: Vec<&str> = alice.iter().map(String::as_str).collect();
    for tab in &alice {
        tabs.open(tab, json!({ "token": token("alice", 3600), "names": ["unread"] })).await;
    }
    tabs.open("bob", json!({ "token": token("bob", 3600), "names": ["unread"] })).await;
    let holder = tabs.settled(&alice).await;
    tabs.settled(&["bob"]).await;

    // One stream each on the server (a tab that joins reads the retained state on a stream of
    // its own, closed at the stream's position: those are gone once every tab is open).
    app.wait_connections("alice", 1).await;
    app.wait_connections("bob", 1).await;
    app.wait_stats("two streams", |s| s.connections == 2).await;
    for tab in &alice {
        assert_eq!(tabs.events(tab), [("unread".into(), String::new(), "3".into())], "tab {tab}: the state, once");
    }

    // A flood, and the holder tab is closed in the middle of it.
    let mut ids = Vec::new();
    for i in 0..200 {
        if i == 60 {
            tabs.send(&format!("close {holder}")).await;
        }
        ids.push(publish_to(&app, "alice", &format!("m{i}")).await);
    }
    let rest: Vec<&str> = alice.iter().copied().filter(|t| *t != holder).collect();
    tabs.until("every open tab has every event", |t| rest.iter().all(|tab| t.message_ids(tab).len() >= ids.len()))
        .await;
    for tab in &rest {
        assert_eq!(tabs.message_ids(tab), ids, "tab {tab}: every event once, in order");
        let unread = tabs.events(tab).into_iter().filter(|(n, ..)| n == "unread").count();
        assert_eq!(unread, 1, "tab {tab}: the retained state is not sent again on a hand-over");
    }
    let next = tabs.settled(&rest).await;
    assert_ne!(next, holder);
    app.wait_connections("alice", 1).await;
    let gap = tabs.time_of(&next, "state") - tabs.time_of(&holder, "closing");
    eprintln!("hand-over: the new holder's stream open {gap} ms after the holder tab began to close");

    // Bob's tab, in the same browser, got none of it.
    let b = publish_to(&app, "bob", "for bob").await;
    tabs.until("bob's event", |t| !t.message_ids("bob").is_empty()).await;
    assert_eq!(tabs.events("bob"), [("message".into(), b, "for bob".into())], "bob sees only his own");
    tabs.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_frozen_holder_and_a_hung_one_are_replaced_and_catch_up_when_they_come_back() {
    let app = spawn_app(&["--cors-allowed-origins", "*"]).await;
    let mut tabs = Tabs::start(app.http);
    let all = ["a", "b", "c"];
    for tab in all {
        tabs.open(tab, json!({ "query": { "user": "web" } })).await;
    }
    let first = tabs.settled(&all).await;
    app.wait_connections("web", 1).await;
    let mut ids = vec![publish_to(&app, "web", "before").await];

    // The holder is frozen (the `freeze` event, then no more tasks): it hands over at once.
    tabs.send(&format!("freeze {first}")).await;
    let others: Vec<&str> = all.iter().copied().filter(|t| *t != first).collect();
    tabs.until("a new holder", |t| others.iter().any(|tab| t.state(tab).1 == "holder")).await;
    ids.push(publish_to(&app, "web", "while frozen 1").await);
    ids.push(publish_to(&app, "web", "while frozen 2").await);
    tabs.until("the others have them", |t| others.iter().all(|tab| t.message_ids(tab).len() >= 3)).await;
    // Back, it follows: what it missed while frozen, then the rest, each once.
    tabs.send(&format!("unfreeze {first}")).await;
    ids.push(publish_to(&app, "web", "after").await);
    tabs.until("every tab has everything", |t| all.iter().all(|tab| t.message_ids(tab).len() >= 4)).await;
    for tab in all {
        assert_eq!(tabs.message_ids(tab), ids, "tab {tab}: every event once, in order");
    }
    let second = tabs.settled(&all).await;
    assert_ne!(second, first);
    app.wait_connections("web", 1).await;

    // The new holder hangs, without any event (a long task, a debugger): the followers ping it,
    // hear nothing, and one takes the lock from it.
    tabs.send(&format!("hang {second}")).await;
    tabs.until("hung", |t| t.lines_of(&second, "frozen").next().is_some()).await;
    ids.push(publish_to(&app, "web", "while hung").await);
    let others: Vec<&str> = all.iter().copied().filter(|t| *t != second).collect();
    tabs.until("a holder that answers", |t| others.iter().any(|tab| t.state(tab).1 == "holder")).await;
    ids.push(publish_to(&app, "web", "after the steal").await);
    tabs.until("the others have them", |t| others.iter().all(|tab| t.message_ids(tab).len() >= 6)).await;
    tabs.send(&format!("unfreeze {second}")).await;
    ids.push(publish_to(&app, "web", "last").await);
    tabs.until("every tab has everything", |t| all.iter().all(|tab| t.message_ids(tab).len() >= 7)).await;
    for tab in all {
        assert_eq!(tabs.message_ids(tab), ids, "tab {tab}: every event once, in order");
    }
    let third = tabs.settled(&all).await;
    assert_ne!(third, second, "the hung tab follows once it runs again");
    app.wait_connections("web", 1).await;
    tabs.quit().await;
}

#[tokio::test]
async fn tabs_share_only_within_one_subscription_set_and_a_page_can_opt_out() {
    let app = spawn_app(&["--cors-allowed-origins", "*"]).await;
    let mut tabs = Tabs::start(app.http);
    // Two tabs that opt out, two that share (topic x), one with another topic.
    tabs.open("alone1", json!({ "query": { "user": "web" }, "shared": false })).await;
    tabs.open("alone2", json!({ "query": { "user": "web" }, "shared": false })).await;
    tabs.open("x1", json!({ "query": { "user": "web", "topic": "x" } })).await;
    tabs.open("x2", json!({ "query": { "user": "web", "topic": "x" } })).await;
    tabs.open("y", json!({ "query": { "user": "web", "topic": "y" } })).await;
    tabs.until("every tab open", |t| ["alone1", "alone2", "x1", "x2", "y"].iter().all(|tab| t.state(tab).0 == "open"))
        .await;
    for tab in ["alone1", "alone2"] {
        assert_eq!(tabs.state(tab).1, "alone", "shared: false");
    }
    tabs.settled(&["x1", "x2"]).await;
    tabs.settled(&["y"]).await;
    app.wait_connections("web", 4).await;

    let x = app.publish_topic("x", "x only").await.event_id;
    let u = publish_to(&app, "web", "to the user").await;
    tabs.until("the user's event everywhere", |t| {
        ["alone1", "alone2", "x1", "x2", "y"].iter().all(|tab| t.message_ids(tab).contains(&u))
    })
    .await;
    for tab in ["alone1", "alone2", "y"] {
        assert_eq!(tabs.message_ids(tab), std::slice::from_ref(&u), "tab {tab}");
    }
    for tab in ["x1", "x2"] {
        assert_eq!(tabs.message_ids(tab), [x.clone(), u.clone()], "tab {tab}");
    }
    tabs.quit().await;
}

#[tokio::test]
async fn every_tab_shows_the_holders_backoff_and_gets_missed_and_disconnect_as_one_tab_would() {
    let flags = ["--cors-allowed-origins", "*", "--retry", "300ms"];
    let first = Binary::start("127.0.0.1:0", &flags).await;
    let addr = first.http;
    let mut tabs = Tabs::start(addr);
    let all = ["a", "b", "c"];
    for tab in all {
        tabs.open(tab, json!({ "query": { "user": "web" }, "minDelay": 100, "maxDelay": 800 })).await;
    }
    tabs.settled(&all).await;
    let a1 = publish(&first.client, "web", "a1").await;
    tabs.until("a1 everywhere", |t| all.iter().all(|tab| !t.message_ids(tab).is_empty())).await;

    // The server restarts; meanwhile the address answers 503. The holder backs off, and every
    // tab says so (a badge greys out in each).
    first.terminate().await;
    let (mut answered, stub) = unavailable_stub(addr).await;
    tabs.until("every tab waiting", |t| all.iter().all(|tab| t.state(tab).0 == "waiting")).await;
    timeout_at(deadline(), answered.wait_for(|n| *n >= 1)).await.expect("the holder tried the 503").unwrap();
    stub.abort();
    let _ = stub.await;

    // The new process did not issue a1: every tab is told it may have missed events.
    let second = Binary::start(&addr.to_string(), &flags).await;
    tabs.until("ssegate.missed in every tab", |t| all.iter().all(|tab| t.lines_of(tab, "missed").next().is_some()))
        .await;
    tabs.settled(&all).await;
    let b1 = publish(&second.client, "web", "b1").await;
    tabs.until("b1 everywhere", |t| all.iter().all(|tab| t.message_ids(tab).len() >= 2)).await;
    for tab in all {
        assert_eq!(tabs.message_ids(tab), [a1.clone(), b1.clone()], "tab {tab}");
        let missed: Vec<_> = tabs.lines_of(tab, "missed").map(|v| v["payload"].clone()).collect();
        assert_eq!(missed, [json!({ "reason": "other_epoch", "last_event_id": a1 })], "tab {tab}: once");
    }

    // The backend closes the user's streams: every tab hears why.
    let req = pb::DisconnectRequest { user_id: "web".into(), reason: "logout".into() };
    second.client.clone().disconnect(req).await.expect("disconnect");
    tabs.until("ssegate.disconnect in every tab", |t| {
        all.iter().all(|tab| t.lines_of(tab, "disconnect").next().is_some())
    })
    .await;
    for tab in all {
        let reasons: Vec<_> = tabs.lines_of(tab, "disconnect").map(|v| v["payload"]["reason"].clone()).collect();
        assert_eq!(reasons, [json!("logout")], "tab {tab}");
    }
    tabs.quit().await;
    second.terminate().await;
}

#[tokio::test]
async fn a_tab_whose_token_becomes_another_users_leaves_the_shared_stream_and_sees_none_of_its_events() {
    let dir = std::env::temp_dir().join(format!("ssegate-client-tabs-login-{}", std::process::id()));
    let mut flags = jwt_app_flags(&dir);
    flags.extend(["--retry", "300ms"].map(String::from));
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let mut tabs = Tabs::start(app.http);
    for tab in ["a1", "a2"] {
        tabs.open(tab, json!({ "token": token("alice", 3600) })).await;
    }
    tabs.settled(&["a1", "a2"]).await;
    app.wait_connections("alice", 1).await;
    let before = publish_to(&app, "alice", "before").await;
    tabs.until("both have it", |t| ["a1", "a2"].iter().all(|tab| !t.message_ids(tab).is_empty())).await;

    // In a2, someone else logs in: its token provider now answers bob's token. The next time
    // the shared stream reconnects (here: the backend disconnects alice), a2 finds out, and
    // moves to bob's stream, whichever tab held alice's.
    tabs.send(&format!("settoken a2 {}", token("bob", 3600))).await;
    tabs.until("a2's new token", |t| t.lines_of("a2", "token_set").next().is_some()).await;
    let req = pb::DisconnectRequest { user_id: "alice".into(), reason: "logout elsewhere".into() };
    app.client.clone().disconnect(req).await.expect("disconnect");
    app.wait_connections("bob", 1).await;
    app.wait_connections("alice", 1).await;
    tabs.settled(&["a1"]).await;
    tabs.settled(&["a2"]).await;

    let secret = publish_to(&app, "alice", "for alice only").await;
    let for_bob = publish_to(&app, "bob", "for bob").await;
    tabs.until("each tab its own", |t| t.message_ids("a1").contains(&secret) && t.message_ids("a2").contains(&for_bob))
        .await;
    assert_eq!(tabs.message_ids("a1"), [before.clone(), secret], "a1 stays alice's");
    assert_eq!(tabs.message_ids("a2"), [before, for_bob], "a2 gets bob's events from then on, none of alice's");
    tabs.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}
