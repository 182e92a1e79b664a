//! The hub: watchers, local and remote changes, cut-offs.

use super::*;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn hub() -> (Arc<Hub>, Watch) {
    let hub = Hub::new("me".into(), PresenceConfig { grace: Duration::from_secs(60), watcher_queue: 16 });
    let w = hub.watch();
    (hub, w)
}

fn drain(w: &mut Watch) -> Vec<(String, State)> {
    std::iter::from_fn(|| w.events.try_recv().ok()).map(|t| (t.user.to_string(), t.state)).collect()
}

#[test]
fn another_replicas_numbers_tell_when_to_ask_for_its_whole_set() {
    let (hub, mut w) = hub();
    assert!(!hub.heartbeat("r", 0), "new and empty: nothing to ask");
    assert!(!hub.remote("r", 1, false, &[(user("a"), true)]));
    assert!(hub.remote("r", 3, false, &[(user("b"), true)]), "message 2 was missed");
    assert!(!hub.remote("r", 3, false, &[(user("c"), true)]), "a stale number is ignored");
    assert!(hub.heartbeat("r", 5), "the heartbeat shows more were sent");
    assert!(hub.remote("q", 7, false, &[]), "met mid-way");
    assert_eq!(drain(&mut w), [("a".into(), State::Online), ("b".into(), State::Online)]);
    // Its whole set: b is gone (into the grace), d comes; a stays without a transition.
    assert!(!hub.remote("r", 9, true, &[(user("a"), true), (user("d"), true)]));
    assert_eq!(drain(&mut w), [("d".into(), State::Online)]);
    assert_eq!(hub.online(), 3, "b is in its grace");
    assert!(!hub.remote("me", 1, false, &[(user("x"), true)]), "our own messages are ignored");
    assert_eq!(hub.online(), 3);
}

#[test]
fn a_goodbye_takes_the_replica_out_at_once() {
    let (hub, mut w) = hub();
    hub.remote("r", 1, false, &[(user("a"), true)]);
    assert_eq!(hub.replicas().len(), 2);
    hub.bye("r");
    assert_eq!(hub.replicas().len(), 1, "no longer shares the webhook");
    assert_eq!(hub.online(), 1, "a is in its grace, not offline yet");
    assert_eq!(drain(&mut w), [("a".into(), State::Online)]);
    let mut inner = hub.lock();
    assert!(inner.view.next_deadline().is_some(), "a's grace runs");
    let mut out = Vec::new();
    inner.view.expire(Instant::now() + Duration::from_secs(61), &mut out);
    assert_eq!(out, [(user("a"), State::Offline)]);
}

#[test]
fn local_changes_are_told_in_order_and_a_short_visit_still_counts() {
    let (hub, mut w) = hub();
    let told = hub.local(vec![(user("a"), true, true), (user("b"), true, false)]);
    assert_eq!(told, Some(vec![(user("a"), true), (user("b"), true), (user("b"), false)]));
    assert_eq!(hub.local(vec![(user("a"), false, true)]), None, "nothing new");
    assert_eq!(drain(&mut w), [("a".into(), State::Online), ("b".into(), State::Online)]);
    let mut set = hub.local_set();
    set.sort();
    assert_eq!(set, [user("a")]);
}

#[test]
fn a_watcher_with_a_full_queue_is_cut_off_and_the_others_are_not() {
    let hub = Hub::new("me".into(), PresenceConfig { grace: Duration::from_secs(1), watcher_queue: 2 });
    let stalled = hub.watch();
    let mut reading = hub.watch();
    for i in 0..3 {
        hub.local(vec![(user(&format!("u{i}")), true, true)]);
        assert_eq!(drain(&mut reading).len(), 1);
    }
    assert_eq!(stalled.end(), Some(End::FellBehind));
    assert_eq!(reading.end(), None);
    assert_eq!(hub.watchers(), 1);
    assert_eq!(hub.watch().snapshot.len(), 3, "a new watch starts from the whole state");
}
