//! WatchPresence across replicas on a real nats-server: users of every replica, a move between
//! replicas within the grace, a replica started later, one that dies, one that stops.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::{Instant, timeout_at};

use super::{Watcher, t};
use crate::{
    broker::{Broker, replica},
    helpers::{SseClient, deadline, spawn_process},
};

/// Reads a watch until the users it knows online (its snapshot, then its transitions) are
/// exactly `want`: a replica learns the others' users shortly after it starts.
async fn converges(w: &mut Watcher, want: &[&str]) {
    let mut online: std::collections::BTreeSet<String> = w.snapshot().await.into_iter().collect();
    let want: std::collections::BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    while online != want {
        match w.next().await {
            (u, "online") => assert!(online.insert(u.clone()), "{u} online twice"),
            (u, _) => assert!(online.remove(&u), "{u} offline while not online"),
        }
    }
}

#[tokio::test]
async fn across_replicas_a_watcher_sees_each_users_first_stream_anywhere_and_last_one_after_the_grace() {
    let nats = Broker::start().await;
    let flags = ["--presence-grace", "1s"];
    let (a, b) = (replica(&nats, &flags).await, replica(&nats, &flags).await);
    let mut on_a = Watcher::open(&a).await;
    assert!(on_a.snapshot().await.is_empty());

    let bob_on_b = b.subscribe("user=bob").await;
    assert_eq!(on_a.next().await, t("bob", "online"), "a user of another replica");
    // bob moves from b to a (a page reload landing on another replica: the old stream closes
    // first, and for a moment bob has none anywhere): nothing.
    drop(bob_on_b);
    b.wait_connections("bob", 0).await;
    let bob_on_a = a.subscribe("user=bob").await;
    a.wait_connections("bob", 1).await;
    // The marker comes and goes on b after bob left b: had bob's offline been pending, it would
    // come before the marker's.
    let marker = b.subscribe("user=marker").await;
    assert_eq!(on_a.next().await, t("marker", "online"));
    drop(marker);
    assert_eq!(on_a.next().await, t("marker", "offline"), "nothing about bob in between");

    // A replica started now learns who is online on the others.
    let _carol_on_b = b.subscribe("user=carol").await;
    assert_eq!(on_a.next().await, t("carol", "online"));
    let c = replica(&nats, &flags).await;
    let mut on_c = Watcher::open(&c).await;
    converges(&mut on_c, &["bob", "carol"]).await;

    // bob leaves everywhere: offline, once, on every watcher, after the grace.
    let left = Instant::now();
    drop(bob_on_a);
    assert_eq!(on_a.next().await, t("bob", "offline"));
    assert!(left.elapsed() >= Duration::from_secs(1), "after the grace ({:?})", left.elapsed());
    assert_eq!(on_c.next().await, t("bob", "offline"));
}

#[tokio::test]
async fn the_users_of_a_replica_that_dies_go_offline_once_it_is_silent_and_the_grace_is_over() {
    let nats = Broker::start().await;
    let a = replica(&nats, &["--presence-grace", "300ms"]).await;
    let url = nats.url();
    let mut b = spawn_process(&["--backplane", "nats", "--nats-url", &url, "--presence-grace", "300ms"], &[]).await;
    let mut on_a = Watcher::open(&a).await;
    assert!(on_a.snapshot().await.is_empty());
    let dan = SseClient::connect(b.http, "/v1/events?user=dan", &[]).await;
    assert_eq!(dan.status, 200);
    assert_eq!(on_a.next().await, t("dan", "online"));

    b.child.kill().await.unwrap(); // SIGKILL: b says nothing more
    let killed = Instant::now();
    assert_eq!(on_a.next().await, t("dan", "offline"));
    // Silent for PEER_TTL (3 s, heard every second), then the grace.
    assert!(killed.elapsed() >= Duration::from_secs(2), "not before b was missed ({:?})", killed.elapsed());
    drop(dan);
}

#[tokio::test]
async fn a_replica_that_stops_says_goodbye_so_its_users_grace_starts_at_once() {
    let nats = Broker::start().await;
    let flags = ["--presence-grace", "200ms"];
    let a = replica(&nats, &flags).await;
    let mut b = replica(&nats, &flags).await;
    let mut on_a = Watcher::open(&a).await;
    assert!(on_a.snapshot().await.is_empty());
    let _erin = b.subscribe("user=erin").await;
    assert_eq!(on_a.next().await, t("erin", "online"));
    b.stop().await;
    let stopped = Instant::now();
    assert_eq!(on_a.next().await, t("erin", "offline"));
    // Without the goodbye, a would wait for b's silence: 3 s after its last heartbeat (at most
    // a second before it stopped), checked every second.
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "the grace began at the goodbye ({:?})",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn a_replica_met_mid_way_is_asked_for_its_whole_set_and_forgotten_once_silent() {
    let nats = Broker::start().await;
    let a = replica(&nats, &["--presence-grace", "200ms"]).await;
    let mut on_a = Watcher::open(&a).await;
    assert!(on_a.snapshot().await.is_empty());
    // A replica of our own making, speaking the wire format by hand.
    let raw = async_nats::connect(nats.url()).await.expect("the test connects to NATS");
    let subject = "ssegate.events.ctl.presence";
    let mut heard = raw.subscribe(subject).await.unwrap();
    raw.flush().await.unwrap();
    let say = |json: &'static str| {
        let raw = raw.clone();
        async move { raw.publish(subject, json.into()).await.unwrap() }
    };

    // Its fifth message is the first a hears: applied, and a asks for the whole set.
    say(r#"{"Changes":{"v":1,"replica":"ghost","seq":5,"changes":[["gus",true]]}}"#).await;
    assert_eq!(on_a.next().await, t("gus", "online"));
    let end = deadline();
    loop {
        let msg = timeout_at(end, heard.next()).await.expect("a asks the ghost for its set").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        if v["Sync"]["of"] == "ghost" {
            break;
        }
    }
    // The whole set: hal is there, gus is not (his grace starts).
    say(r#"{"Changes":{"v":1,"replica":"ghost","seq":6,"reset":true,"changes":[["hal",true]]}}"#).await;
    assert_eq!(on_a.next().await, t("hal", "online"));
    assert_eq!(on_a.next().await, t("gus", "offline"));
    // A user id this version refuses is left out, the rest applied; then the ghost falls silent
    // (no heartbeat): its users go after 3 s and the grace.
    say(r#"{"Changes":{"v":1,"replica":"ghost","seq":7,"changes":[["",true],["ivy",true]]}}"#).await;
    assert_eq!(on_a.next().await, t("ivy", "online"));
    let mut gone = [on_a.next().await, on_a.next().await];
    gone.sort();
    assert_eq!(gone, [t("hal", "offline"), t("ivy", "offline")]);
}
