//! Unit tests of routing decisions; the integration tests cover the same over real sockets.

use std::task::{Context, Poll, Waker};

use super::*;

fn router(cap: usize) -> Arc<Router> {
    Router::new(RouterConfig { queue_capacity: cap, epoch: Some(7) })
}

fn sub(r: &Arc<Router>, user: &str, groups: &[&str], topics: &[&str]) -> Registration {
    r.subscribe(Subscription {
        user: UserId::parse(user).unwrap(),
        groups: groups.iter().map(|g| GroupId::parse(g).unwrap()).collect(),
        topics: topics.iter().map(|t| Topic::parse(t).unwrap()).collect(),
        abort: None,
    })
    .unwrap()
}

fn ev(data: &str) -> Event {
    Event { name: None, data: data.into() }
}

/// The data lines of everything queued for `reg`.
fn received(reg: &Registration) -> Vec<String> {
    let mut out = Vec::new();
    let mut cx = Context::from_waker(Waker::noop());
    let _ = reg.mailbox().poll_drain(&mut cx, &mut out);
    out.iter().map(|f| String::from_utf8_lossy(&f.bytes).lines().next().unwrap_or("").to_owned()).collect()
}

#[test]
fn each_target_reaches_exactly_its_connections() {
    let r = router(16);
    let a1 = sub(&r, "a", &["g"], &[]);
    let a2 = sub(&r, "a", &[], &["t"]);
    let b = sub(&r, "b", &["g"], &["t"]);
    let c = sub(&r, "c", &[], &[]);
    let users = Target::users(vec![UserId::parse("a").unwrap(), UserId::parse("a").unwrap()]);
    assert_eq!(r.publish(&users, &ev("to-a")).unwrap().recipients, 2);
    assert_eq!(r.publish(&Target::Group(GroupId::parse("g").unwrap()), &ev("to-g")).unwrap().recipients, 2);
    assert_eq!(r.publish(&Target::Topic(Topic::parse("t").unwrap()), &ev("to-t")).unwrap().recipients, 2);
    assert_eq!(r.publish(&Target::Broadcast, &ev("all")).unwrap().recipients, 4);
    assert_eq!(received(&a1), ["data: to-a", "data: to-g", "data: all"]);
    assert_eq!(received(&a2), ["data: to-a", "data: to-t", "data: all"]);
    assert_eq!(received(&b), ["data: to-g", "data: to-t", "data: all"]);
    assert_eq!(received(&c), ["data: all"]);
}

#[test]
fn ids_increase_within_the_epoch() {
    let r = router(4);
    let p1 = r.publish(&Target::Broadcast, &ev("x")).unwrap();
    let p2 = r.publish(&Target::Broadcast, &ev("y")).unwrap();
    assert_eq!((p1.id.epoch, p1.id.seq, p2.id.seq), (7, 1, 2));
    assert_eq!(p1.recipients, 0);
}

#[test]
fn a_full_queue_cuts_off_that_connection_only() {
    let r = router(2);
    let slow = sub(&r, "slow", &[], &["t"]);
    let fast = sub(&r, "fast", &[], &["t"]);
    let t = Target::Topic(Topic::parse("t").unwrap());
    for i in 0..5 {
        r.publish(&t, &ev(&i.to_string())).unwrap();
        assert_eq!(received(&fast).len(), 1);
    }
    let mut out = Vec::new();
    let poll = slow.mailbox().poll_drain(&mut Context::from_waker(Waker::noop()), &mut out);
    assert_eq!(poll, Poll::Ready(Drained::End(CloseReason::SlowConsumer)));
    let s = r.stats();
    assert_eq!((s.connections, s.events_dropped), (1, 3), "2 queued + the one that did not fit");
}

#[test]
fn dropping_a_registration_removes_it_everywhere() {
    let r = router(4);
    let a = sub(&r, "a", &["g"], &["t"]);
    assert_eq!(r.stats().groups, 1);
    drop(a);
    let s = r.stats();
    assert_eq!((s.connections, s.users, s.groups, s.topics), (0, 0, 0, 0));
}

#[test]
fn disconnect_closes_that_user_gracefully() {
    let r = router(4);
    let a = sub(&r, "a", &[], &[]);
    let b = sub(&r, "b", &[], &[]);
    assert_eq!(r.disconnect(&UserId::parse("a").unwrap(), "bye"), 1);
    assert_eq!(received(&a), ["event: ssegate.disconnect"]);
    assert_eq!(r.user_presence(&[UserId::parse("a").unwrap()])[0].connections, 0);
    r.publish(&Target::Broadcast, &ev("still")).unwrap();
    assert_eq!(received(&b), ["data: still"]);
}

#[test]
fn online_users_pages_in_order() {
    let r = router(4);
    let _regs: Vec<_> = ["d", "b", "a", "c"].iter().map(|u| sub(&r, u, &[], &[])).collect();
    let (page, more) = r.online_users(None, 3);
    assert_eq!(page.iter().map(UserId::as_str).collect::<Vec<_>>(), ["a", "b", "c"]);
    assert!(more);
    let (page, more) = r.online_users(Some("c"), 3);
    assert_eq!(page.iter().map(UserId::as_str).collect::<Vec<_>>(), ["d"]);
    assert!(!more);
}
