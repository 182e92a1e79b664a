//! Unit tests of routing decisions; the integration tests cover the same over real sockets.

use std::{
    collections::VecDeque,
    task::{Context, Poll, Waker},
};

use super::*;
use crate::domain::{Event, EventId, EventName, Retain, Target};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Everything queued for a connection now (the writer takes the whole queue at once).
fn drain(m: &Mailbox) -> (Poll<Drained>, Vec<Frame>) {
    let mut out = VecDeque::new();
    let poll = m.poll_drain(&mut Context::from_waker(Waker::noop()), &mut out);
    (poll, out.into())
}

fn router(cap: usize) -> Arc<Router> {
    Router::new(RouterConfig { epoch: Some(7), ..RouterConfig::with_queue_capacity(cap) })
}

fn sub(r: &Arc<Router>, user: &str, groups: &[&str], topics: &[&str]) -> Registration {
    r.subscribe(Subscription {
        user: UserId::parse(user).unwrap(),
        groups: groups.iter().map(|g| GroupId::parse(g).unwrap()).collect(),
        topics: topics.iter().map(|t| Topic::parse(t).unwrap()).collect(),
        abort: None,
        resume: None,
    })
    .unwrap()
}

fn ev(data: &str) -> Event {
    Event { name: None, data: data.into() }
}

/// The cursor as it is queued: the `ssegate.position` event, whose id and data are `id`.
fn pos(id: &str) -> String {
    format!("event: ssegate.position\nid: {id}\ndata: {id}\n\n")
}

/// Whether a frame is the cursor (`ssegate.position`).
fn is_position(f: &Frame) -> bool {
    f.bytes.starts_with(format!("event: {}\n", crate::event_stream::POSITION).as_bytes())
}

/// The first line of everything queued for `reg`, but the opening cursor.
fn received(reg: &Registration) -> Vec<String> {
    let (_, out) = drain(reg.mailbox());
    out.iter()
        .filter(|f| !is_position(f))
        .map(|f| String::from_utf8_lossy(&f.bytes).lines().next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn each_target_reaches_exactly_its_connections() {
    let r = router(16);
    let a1 = sub(&r, "a", &["g"], &[]);
    let a2 = sub(&r, "a", &[], &["t"]);
    let b = sub(&r, "b", &["g"], &["t"]);
    let c = sub(&r, "c", &[], &[]);
    let users = Target::users(vec![UserId::parse("a").unwrap(), UserId::parse("a").unwrap()]);
    assert_eq!(r.publish(users, &ev("to-a")).unwrap().recipients, 2);
    assert_eq!(r.publish(Target::Group(GroupId::parse("g").unwrap()), &ev("to-g")).unwrap().recipients, 2);
    assert_eq!(r.publish(Target::Topic(Topic::parse("t").unwrap()), &ev("to-t")).unwrap().recipients, 2);
    assert_eq!(r.publish(Target::Broadcast, &ev("all")).unwrap().recipients, 4);
    assert_eq!(received(&a1), ["data: to-a", "data: to-g", "data: all"]);
    assert_eq!(received(&a2), ["data: to-a", "data: to-t", "data: all"]);
    assert_eq!(received(&b), ["data: to-g", "data: to-t", "data: all"]);
    assert_eq!(received(&c), ["data: all"]);
}

#[test]
fn ids_increase_within_the_epoch() {
    let r = router(4);
    let p1 = r.publish(Target::Broadcast, &ev("x")).unwrap();
    let p2 = r.publish(Target::Broadcast, &ev("y")).unwrap();
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
        r.publish(t.clone(), &ev(&i.to_string())).unwrap();
        assert_eq!(received(&fast).len(), 1);
    }
    let (poll, _) = drain(slow.mailbox());
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
    r.publish(Target::Broadcast, &ev("still")).unwrap();
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

fn resume(r: &Arc<Router>, user: &str, topics: &[&str], last: EventId) -> Registration {
    r.subscribe(Subscription {
        user: UserId::parse(user).unwrap(),
        groups: Vec::new(),
        topics: topics.iter().map(|t| Topic::parse(t).unwrap()).collect(),
        abort: None,
        resume: Some(last),
    })
    .unwrap()
}

fn id(seq: u64) -> EventId {
    EventId { epoch: 7, seq }
}

#[test]
fn a_resume_gets_its_own_missed_events_then_live_ones_then_a_cursor() {
    let r = router(4);
    r.publish(Target::users(vec![UserId::parse("a").unwrap()]), &ev("1 for a")).unwrap();
    r.publish(Target::users(vec![UserId::parse("b").unwrap()]), &ev("2 for b")).unwrap();
    r.publish(Target::Topic(Topic::parse("t").unwrap()), &ev("3 on t")).unwrap();
    r.publish(Target::Broadcast, &ev("4 all")).unwrap();
    let a = resume(&r, "a", &["t"], id(0));
    assert_eq!(a.start(), Start::Resumed { replayed: 3 });
    r.publish(Target::Broadcast, &ev("5 live")).unwrap();
    assert_eq!(received(&a), ["data: 1 for a", "data: 3 on t", "data: 4 all", "data: 5 live"]);
    let a2 = resume(&r, "a", &[], id(3));
    assert_eq!(a2.start(), Start::Resumed { replayed: 2 });
    assert_eq!(r.stats().events_replayed, 5);
}

#[test]
fn a_resume_the_log_cannot_serve_gets_ssegate_missed() {
    let r = Router::new(RouterConfig {
        epoch: Some(7),
        replay: ReplayConfig { capacity: 2, max_bytes: 1 << 20, max_age: std::time::Duration::from_secs(60) },
        ..RouterConfig::with_queue_capacity(8)
    });
    for i in 0..4 {
        r.publish(Target::Broadcast, &ev(&i.to_string())).unwrap();
    }
    for (last, reason) in [
        (id(1), MissReason::Expired),
        (id(9), MissReason::Unknown),
        (EventId { epoch: 8, seq: 1 }, MissReason::OtherEpoch),
    ] {
        let c = resume(&r, "a", &[], last);
        assert_eq!(c.start(), Start::Missed(reason));
        let (_, out) = drain(c.mailbox());
        let text: Vec<_> = out.iter().map(|f| String::from_utf8_lossy(&f.bytes).into_owned()).collect();
        let expected = format!(
            "event: ssegate.missed\ndata: {{\"reason\":\"{}\",\"last_event_id\":\"{last}\"}}\n\n",
            reason.as_str()
        );
        assert_eq!(text, [expected, pos("7-4")], "then the cursor: resume from the newest id");
    }
    assert_eq!(resume(&r, "a", &[], id(2)).start(), Start::Resumed { replayed: 2 });
    assert_eq!(r.stats().resumes_missed, 3);
}

#[test]
fn on_a_shared_sequence_a_resume_ahead_of_this_router_waits_for_its_events_without_repeats() {
    // A replica behind the broker: the client saw up to 6 on another replica; this one has 4.
    let r =
        Router::new(RouterConfig { epoch: Some(7), shared_sequence: true, ..RouterConfig::with_queue_capacity(16) });
    let publish = |seq: u64| {
        r.publish_sequenced(seq, Target::Broadcast, &ev(&seq.to_string()), Retain::No).unwrap();
    };
    (1..=4).for_each(publish);
    let c = resume(&r, "a", &[], id(6));
    assert_eq!(c.start(), Start::Resumed { replayed: 0 });
    let (_, out) = drain(c.mailbox());
    let text: Vec<_> = out.iter().map(|f| String::from_utf8_lossy(&f.bytes).into_owned()).collect();
    assert_eq!(text, [pos("7-6")], "no ssegate.missed, and the cursor does not move the client's id back");
    // The router catches up: 5 and 6 the client has, 7 and 8 it gets.
    (5..=8).for_each(publish);
    assert_eq!(received(&c), ["data: 7", "data: 8"]);
    assert_eq!(r.stats().resumes_missed, 0);
}

#[test]
fn connection_limits_refuse_and_count() {
    let r = Router::new(RouterConfig {
        max_connections: 3,
        max_connections_per_user: 2,
        ..RouterConfig::with_queue_capacity(4)
    });
    let _a1 = sub(&r, "a", &[], &[]);
    let _a2 = sub(&r, "a", &[], &[]);
    let a3 = r.subscribe(Subscription {
        user: UserId::parse("a").unwrap(),
        groups: vec![],
        topics: vec![],
        abort: None,
        resume: None,
    });
    assert_eq!(a3.err(), Some(RouterError::TooManyForUser { limit: 2 }));
    let _b = sub(&r, "b", &[], &[]);
    let c = r.subscribe(Subscription {
        user: UserId::parse("c").unwrap(),
        groups: vec![],
        topics: vec![],
        abort: None,
        resume: None,
    });
    assert_eq!(c.err(), Some(RouterError::TooManyConnections { limit: 3 }));
    assert_eq!(r.stats().connections_rejected, 2);
}

/// A client that keeps dropping and resuming while another thread publishes sees every
/// event exactly once, in order: the replay-to-live handoff has no gap and no duplicate.
#[test]
fn resuming_while_events_are_published_loses_and_repeats_nothing() {
    const N: u64 = 20_000;
    let r = Router::new(RouterConfig {
        epoch: Some(7),
        replay: ReplayConfig { capacity: N as usize, max_bytes: 1 << 30, max_age: std::time::Duration::from_secs(600) },
        ..RouterConfig::with_queue_capacity(N as usize)
    });
    let publisher = {
        let r = r.clone();
        std::thread::spawn(move || {
            for i in 1..=N {
                r.publish(Target::Broadcast, &ev(&i.to_string())).unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    let mut last = id(0);
    while seen.last() != Some(&N) {
        let c = resume(&r, "a", &[], last);
        assert!(matches!(c.start(), Start::Resumed { .. }), "{:?}", c.start());
        let mut out = Vec::new();
        for _ in 0..3 {
            out.extend(drain(c.mailbox()).1);
        }
        for f in &out {
            let text = std::str::from_utf8(&f.bytes).unwrap();
            for line in text.lines() {
                if let Some(d) = line.strip_prefix("data: ").filter(|_| !is_position(f)) {
                    seen.push(d.parse::<u64>().unwrap());
                } else if let Some(i) = line.strip_prefix("id: ") {
                    last = i.parse().unwrap();
                }
            }
        }
    }
    publisher.join().unwrap();
    assert!(seen.iter().copied().eq(1..=N), "gap or duplicate in {} events", seen.len());
}

/// Counts wake-ups of a writer.
#[derive(Default)]
struct Wakes(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Wakes {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Polls the mailbox with `cx` until it is empty (registering the waker); returns the frames.
fn drain_with(m: &Mailbox, cx: &mut Context<'_>) -> Vec<Frame> {
    let mut all = Vec::new();
    loop {
        let mut out = VecDeque::new();
        match m.poll_drain(cx, &mut out) {
            Poll::Ready(Drained::Frames) => all.extend(out),
            _ => return all,
        }
    }
}

#[tokio::test]
async fn a_writer_is_woken_at_once_after_a_quiet_period_then_once_per_coalescing_window() {
    let window = std::time::Duration::from_millis(200);
    let r = Router::new(RouterConfig { write_coalesce: window, ..RouterConfig::with_queue_capacity(64) });
    let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
    r.start_timers(std::time::Duration::from_secs(3600), &stop, &tracker);
    let c = sub(&r, "a", &[], &[]);
    let wakes = Arc::new(Wakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    assert_eq!(drain_with(c.mailbox(), &mut cx).len(), 1, "the opening cursor");
    let to_a = || Target::users(vec![UserId::parse("a").unwrap()]);

    let first = Instant::now();
    r.publish(to_a(), &ev("1")).unwrap();
    assert_eq!(wakes.count(), 1, "the first event after a quiet period wakes the writer at once");
    assert_eq!(drain_with(c.mailbox(), &mut cx).len(), 1);
    for i in 2..=5 {
        r.publish(to_a(), &ev(&i.to_string())).unwrap();
    }
    assert_eq!(wakes.count(), 1, "events inside the window wait for its end");
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while wakes.count() < 2 {
        assert!(Instant::now() < deadline, "the deferred writer was never woken");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(first.elapsed() >= window, "woken before the window ended");
    let batch = drain_with(c.mailbox(), &mut cx);
    assert_eq!(batch.len(), 4, "everything pending goes in one write");
    assert_eq!(wakes.count(), 2);
    stop.cancel();
}

/// The sharded design keeps the handoff exact: with four shards, two publishers sending to
/// users, a group, a topic and everyone, and clients of users in different shards dropping
/// and resuming over and over, each client sees exactly the events addressed to it, once each,
/// in id order.
#[test]
fn resuming_across_shards_under_concurrent_publishers_loses_and_repeats_nothing() {
    const PER_PUBLISHER: u64 = 6_000;
    let r = Router::new(RouterConfig {
        epoch: Some(7),
        shards: 4,
        replay: ReplayConfig { capacity: 100_000, max_bytes: 1 << 30, max_age: std::time::Duration::from_secs(600) },
        ..RouterConfig::with_queue_capacity(100_000)
    });
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let target_of = |p: u64, i: u64| match (p + i) % 4 {
        0 => Target::users(vec![UserId::parse(&format!("user-{}", i % 8)).unwrap()]),
        1 => Target::Group(GroupId::parse("g").unwrap()),
        2 => Target::Topic(Topic::parse("t").unwrap()),
        _ => Target::Broadcast,
    };
    let publishers: Vec<_> = (0..2u64)
        .map(|p| {
            let r = r.clone();
            std::thread::spawn(move || {
                (0..PER_PUBLISHER)
                    .map(|i| {
                        let target = target_of(p, i);
                        let id = r.publish(target.clone(), &ev(&format!("{p}-{i}"))).unwrap().id;
                        (id.seq, target)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // Even users join group g, odd users topic t.
    let joins = |u: usize| if u.is_multiple_of(2) { (vec!["g"], vec![]) } else { (vec![], vec!["t"]) };
    let clients: Vec<_> = (0..users.len())
        .map(|u| {
            let (r, name) = (r.clone(), users[u].clone());
            std::thread::spawn(move || {
                let (groups, topics) = joins(u);
                let mut seen = Vec::new();
                let mut last = id(0);
                let started = Instant::now();
                while started.elapsed() < std::time::Duration::from_secs(20) && !r.is_closing() {
                    let c = r
                        .subscribe(Subscription {
                            user: UserId::parse(&name).unwrap(),
                            groups: groups.iter().map(|g| GroupId::parse(g).unwrap()).collect(),
                            topics: topics.iter().map(|t| Topic::parse(t).unwrap()).collect(),
                            abort: None,
                            resume: Some(last),
                        })
                        .unwrap();
                    assert!(matches!(c.start(), Start::Resumed { .. }), "{:?}", c.start());
                    for _ in 0..3 {
                        for f in drain(c.mailbox()).1 {
                            let text = std::str::from_utf8(&f.bytes).unwrap();
                            for line in text.lines() {
                                if let Some(i) = line.strip_prefix("id: ") {
                                    last = i.parse().unwrap();
                                    if f.is_event {
                                        seen.push(last.seq);
                                    }
                                }
                            }
                        }
                    }
                    if last.seq >= 2 * PER_PUBLISHER {
                        break;
                    }
                }
                seen
            })
        })
        .collect();
    let mut published: Vec<(u64, Target)> = publishers.into_iter().flat_map(|p| p.join().unwrap()).collect();
    published.sort_by_key(|(seq, _)| *seq);
    for (u, client) in clients.into_iter().enumerate() {
        let seen = client.join().unwrap();
        let user = UserId::parse(&users[u]).unwrap();
        let (groups, topics) = joins(u);
        let expected: Vec<u64> = published
            .iter()
            .filter(|(_, t)| match t {
                Target::Users(list) => list.contains(&user),
                Target::Group(_) => !groups.is_empty(),
                Target::Topic(_) => !topics.is_empty(),
                Target::Broadcast => true,
            })
            .map(|(seq, _)| *seq)
            .collect();
        assert_eq!(seen.len(), expected.len(), "{}: gap or duplicate", users[u]);
        assert!(seen == expected, "{}: events out of order or not its own", users[u]);
    }
}

/// A command submitted while the shard's timer holds its tables (a heartbeat sweep) is left to
/// the timer, which must apply it when it lets go: the event must not wait for the next one.
#[test]
fn an_event_published_while_the_timer_holds_the_shard_is_applied_when_it_lets_go() {
    let r = router(16);
    let a = sub(&r, "a", &[], &[]);
    let shard = r.shard_of(&UserId::parse("a").unwrap());
    r.with_shard_tables(shard, |_| {
        // Same thread: the publisher's try_lock fails, as it would for another thread.
        r.publish(Target::Broadcast, &ev("during the sweep")).unwrap();
    });
    assert_eq!(received(&a), ["data: during the sweep"]);
}

fn set() -> Retain {
    Retain::Set { expires_at: None }
}

fn named(name: &str, data: &str) -> Event {
    Event { name: Some(EventName::parse(name).unwrap()), data: data.into() }
}

fn frames(reg: &Registration) -> Vec<String> {
    drain(reg.mailbox()).1.iter().map(|f| String::from_utf8_lossy(&f.bytes).into_owned()).collect()
}

fn user_target(u: &str) -> Target {
    Target::users(vec![UserId::parse(u).unwrap()])
}

#[test]
fn a_new_connection_gets_the_retained_values_without_ids_then_the_cursor_then_live_events() {
    let r = router(16);
    let g = Target::Group(GroupId::parse("g").unwrap());
    r.publish_with(user_target("a"), &named("unread", "1"), set()).unwrap();
    r.publish_with(user_target("a"), &named("unread", "2"), set()).unwrap();
    r.publish_with(user_target("b"), &named("unread", "9"), set()).unwrap();
    r.publish_with(g.clone(), &named("status", "up"), set()).unwrap();
    r.publish_with(Target::Topic(Topic::parse("other").unwrap()), &ev("not mine"), set()).unwrap();
    r.publish_with(Target::Broadcast, &ev("banner"), set()).unwrap();
    r.publish(user_target("a"), &named("unread", "plain events are not retained")).unwrap();
    let a = sub(&r, "a", &["g"], &[]);
    assert_eq!(a.start(), Start::Fresh);
    r.publish_with(user_target("a"), &named("unread", "3"), set()).unwrap();
    assert_eq!(
        frames(&a),
        [
            "event: unread\ndata: 2\n\n".to_owned(),
            "event: status\ndata: up\n\n".into(),
            "data: banner\n\n".into(),
            pos("7-7"),
            "event: unread\ndata: 3\nid: 7-8\n\n".into()
        ]
    );
    let s = r.stats();
    assert_eq!((s.retained_values, s.retained_sent), (5, 3));
    assert!(s.retained_bytes > 5 * RETAINED_VALUE_OVERHEAD as u64);
}

#[test]
fn a_resume_the_log_can_serve_gets_the_replay_and_one_it_cannot_gets_missed_then_the_state() {
    let r = Router::new(RouterConfig {
        epoch: Some(7),
        replay: ReplayConfig { capacity: 2, max_bytes: 1 << 20, max_age: std::time::Duration::from_secs(60) },
        ..RouterConfig::with_queue_capacity(16)
    });
    for i in 1..=4 {
        r.publish_with(user_target("a"), &named("unread", &i.to_string()), set()).unwrap();
    }
    assert_eq!(frames(&resume(&r, "a", &[], id(3))), ["event: unread\ndata: 4\nid: 7-4\n\n".into(), pos("7-4")]);
    let missed = frames(&resume(&r, "a", &[], id(1)));
    assert!(missed[0].starts_with("event: ssegate.missed\n"), "{missed:?}");
    assert_eq!(missed[1..], ["event: unread\ndata: 4\n\n".into(), pos("7-4")]);
}

#[test]
fn clearing_and_expiry_stop_a_value_from_being_sent_and_the_event_still_flows() {
    let r = router(16);
    let b = sub(&r, "b", &[], &[]);
    r.publish_with(Target::Broadcast, &named("banner", "sale"), set()).unwrap();
    r.publish_with(Target::Broadcast, &named("banner", ""), Retain::Clear).unwrap();
    let past = Retain::Set { expires_at: Some(std::time::SystemTime::now() - std::time::Duration::from_secs(1)) };
    r.publish_with(Target::Broadcast, &named("price", "10"), past).unwrap();
    assert_eq!(received(&b), ["event: banner", "event: banner", "event: price"]);
    assert_eq!(frames(&sub(&r, "a", &[], &[])), [pos("7-3")]);
    r.expire_replay();
    assert_eq!((r.stats().retained_values, r.stats().retained_bytes), (0, 0));
}

#[test]
fn a_retained_publish_over_the_bounds_is_refused_and_changes_nothing() {
    let r = Router::new(RouterConfig {
        epoch: Some(7),
        retained: RetainedConfig { max_values: 1, max_bytes: 1 << 20 },
        ..RouterConfig::with_queue_capacity(16)
    });
    let a = sub(&r, "a", &[], &[]);
    r.publish_with(Target::Broadcast, &named("n", "1"), set()).unwrap();
    let refused = r.publish_with(Target::Broadcast, &named("m", "1"), set());
    assert_eq!(refused, Err(PublishError::RetainedFull(RetainedFull::Values { limit: 1 })));
    assert_eq!(r.admits_retained(&Target::Broadcast, &named("m", "1")), refused.map(|_| ()));
    // Replacing and clearing still work; plain events are not bounded by it.
    r.publish_with(Target::Broadcast, &named("n", "2"), set()).unwrap();
    r.publish(Target::Broadcast, &named("m", "plain")).unwrap();
    assert_eq!(r.last_seq(), 3, "the refused publish took no id");
    assert_eq!(received(&a), ["event: n", "event: n", "event: m"]);
}

#[test]
fn a_value_loaded_from_the_broker_stands_until_a_later_event_changes_it() {
    let r = router(16);
    r.load_retained(10, &user_target("a"), &named("unread", "10"), set());
    // Catching up on the stream from before the stored value: older updates are ignored.
    r.publish_sequenced(8, user_target("a"), &named("unread", "8"), set());
    r.publish_sequenced(9, user_target("a"), &named("unread", ""), Retain::Clear);
    assert_eq!(frames(&sub(&r, "a", &[], &[]))[0], "event: unread\ndata: 10\n\n");
    r.publish_sequenced(11, user_target("a"), &named("unread", "11"), set());
    assert_eq!(frames(&sub(&r, "a", &[], &[]))[0], "event: unread\ndata: 11\n\n");
}

/// The race the retained state exists for: a page loads while its counter keeps changing. Its
/// snapshot and its live events must join exactly: the value it starts from, then every later
/// one, each once, with the cursor at the snapshot's event.
#[test]
fn a_retained_value_updated_while_connections_open_is_neither_lost_nor_doubled() {
    const UPDATES: u64 = 20_000;
    let r = Router::new(RouterConfig { epoch: Some(7), shards: 4, ..RouterConfig::with_queue_capacity(1 << 20) });
    let publisher = {
        let r = r.clone();
        std::thread::spawn(move || {
            for i in 1..=UPDATES {
                r.publish_with(user_target("a"), &named("count", &i.to_string()), set()).unwrap();
            }
        })
    };
    let pages: Vec<_> = (0..4)
        .map(|_| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut checked = 0;
                while r.last_seq() < UPDATES {
                    let page = sub(&r, "a", &[], &[]);
                    let mut values = Vec::new();
                    let mut cursor = None;
                    for _ in 0..50 {
                        for f in drain(page.mailbox()).1 {
                            let text = std::str::from_utf8(&f.bytes).unwrap();
                            if is_position(&f) {
                                cursor = text.lines().find_map(|l| l.strip_prefix("id: ")).map(str::to_owned);
                            } else if let Some(v) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
                                values.push(v.parse::<u64>().unwrap());
                            }
                        }
                    }
                    let cursor: EventId = cursor.expect("a cursor").parse().unwrap();
                    let first = values.first().copied().unwrap_or(cursor.seq + 1);
                    assert!(first == cursor.seq || (cursor.seq == 0 && first == 1), "{first} vs cursor {cursor}");
                    let expected: Vec<u64> = (first..first + values.len() as u64).collect();
                    assert_eq!(values, expected, "a gap or a duplicate between the snapshot and live events");
                    checked += 1;
                }
                checked
            })
        })
        .collect();
    publisher.join().unwrap();
    let checked: u64 = pages.into_iter().map(|p| p.join().unwrap()).sum();
    assert!(checked > 0);
}

#[test]
fn stats_do_not_count_values_past_their_time_to_live() {
    let r = router(16);
    let soon = Retain::Set { expires_at: Some(std::time::SystemTime::now() + std::time::Duration::from_millis(50)) };
    r.publish_with(Target::Broadcast, &ev("x"), soon).unwrap();
    assert_eq!(r.stats().retained_values, 1);
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while r.stats().retained_values != 0 {
        assert!(Instant::now() < deadline, "an expired value is still counted");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(r.stats().retained_bytes, 0);
}

fn shared(epoch: u64) -> Arc<Router> {
    Router::new(RouterConfig { epoch: Some(epoch), shared_sequence: true, ..RouterConfig::with_queue_capacity(16) })
}

#[test]
fn a_rebase_tells_every_open_connection_then_numbers_the_new_epoch_from_one() {
    let r = shared(7);
    r.publish_sequenced(1, user_target("a"), &named("unread", "old"), set());
    r.publish_sequenced(2, Target::Broadcast, &ev("two"), Retain::No);
    let a = sub(&r, "a", &[], &[]);
    let b = sub(&r, "b", &["g"], &[]);
    // Waiting for an id of the old stream that never comes: it must not skip the new ones.
    let ahead = resume(&r, "c", &[], id(40));
    r.publish_sequenced(3, Target::Broadcast, &ev("three"), Retain::No);
    assert_eq!(received(&a), ["event: unread", "data: three"]);
    let _ = drain(b.mailbox());
    let _ = drain(ahead.mailbox());

    // The stream was recreated; the broker kept one value for group g (set by its event 1).
    let kept = KeptValue {
        seq: 1,
        target: Target::Group(GroupId::parse("g").unwrap()),
        event: named("status", "kept"),
        retain: set(),
    };
    assert_eq!(r.rebase(9, vec![kept]), Some(3));
    assert_eq!(r.rebase(9, Vec::new()), None, "once per epoch");
    let missed = "event: ssegate.missed\ndata: {\"reason\":\"stream_recreated\",\"last_event_id\":\"7-3\"}\n\n";
    assert_eq!(frames(&a), [missed.into(), pos("9-0")], "the old value of a went with the old stream");
    assert_eq!(frames(&b), [missed.into(), "event: status\ndata: kept\n\n".into(), pos("9-0")]);
    assert_eq!(frames(&ahead), [missed.into(), pos("9-0")]);
    assert_eq!((r.epoch(), r.last_seq()), (9, 0));

    r.publish_sequenced(1, Target::Broadcast, &ev("new one"), Retain::No);
    for c in [&a, &b, &ahead] {
        assert_eq!(frames(c), ["data: new one\nid: 9-1\n\n"]);
    }
    // The old epoch's events are gone: a resume from one is told, then gets the new state.
    let late = resume(&r, "x", &[], id(3));
    assert_eq!(late.start(), Start::Missed(MissReason::OtherEpoch));
    assert_eq!(
        frames(&resume(&r, "x", &[], EventId { epoch: 9, seq: 0 })),
        ["data: new one\nid: 9-1\n\n".into(), pos("9-1")]
    );
    assert_eq!(frames(&sub(&r, "y", &["g"], &[])), ["event: status\ndata: kept\n\n".into(), pos("9-1")]);
}

#[test]
fn a_resume_ahead_of_the_shared_stream_is_told_unknown_once_the_stream_position_shows_it() {
    let r = shared(7);
    (1..=4).for_each(|seq| {
        r.publish_sequenced(seq, Target::Broadcast, &ev(&seq.to_string()), Retain::No);
    });
    r.publish_sequenced(5, Target::Broadcast, &named("banner", "up"), set());
    let behind = resume(&r, "a", &[], id(6)); // another replica has delivered 6
    let bogus = resume(&r, "b", &[], id(u64::MAX));
    for c in [&behind, &bogus] {
        assert_eq!(c.start(), Start::Resumed { replayed: 0 });
    }
    assert_eq!(frames(&bogus), [pos(&format!("7-{}", u64::MAX))], "nothing is decided before the broker answers");
    assert_eq!(frames(&behind), [pos("7-6")]);
    let mark = r.ahead_mark();
    let later = resume(&r, "c", &[], id(1000)); // registered after the question was asked
    let _ = drain(later.mailbox());

    // The stream was at 6 when asked: 6 exists, the others do not.
    assert_eq!(r.settle_ahead(8, 6, mark), 0, "another epoch's position settles nothing");
    assert_eq!(r.settle_ahead(7, 6, mark), 1);
    let missed =
        format!("event: ssegate.missed\ndata: {{\"reason\":\"unknown\",\"last_event_id\":\"7-{}\"}}\n\n", u64::MAX);
    assert_eq!(frames(&bogus), [missed, "event: banner\ndata: up\n\n".into(), pos("7-5")]);
    assert!(frames(&behind).is_empty() && frames(&later).is_empty());
    let s = r.stats();
    assert_eq!((s.resumes_missed, s.resumes_by_outcome[0], s.resumes_by_outcome[2]), (1, 1, 1));

    (6..=7).for_each(|seq| {
        r.publish_sequenced(seq, Target::Broadcast, &ev(&seq.to_string()), Retain::No);
    });
    assert_eq!(received(&behind), ["data: 7"], "it had 6 already");
    assert_eq!(received(&bogus), ["data: 6", "data: 7"], "no floor any more");
    assert!(received(&later).is_empty());
    assert_eq!(r.settle_ahead(7, 7, r.ahead_mark()), 1, "the later one is settled by a later answer");
    assert!(frames(&later)[0].contains("\"reason\":\"unknown\""));
    assert_eq!(r.settle_ahead(7, 7, r.ahead_mark()), 0, "each once");
}

#[test]
fn presence_changes_are_a_users_first_open_and_last_close_once_tracked() {
    let r = router(8);
    let before = sub(&r, "early", &[], &[]);
    let online_at_start = r.track_presence();
    assert_eq!(online_at_start, [UserId::parse("early").unwrap()]);
    assert!(r.take_presence_changes().is_empty());
    let a1 = sub(&r, "a", &[], &[]);
    let a2 = sub(&r, "a", &[], &[]);
    drop(a1);
    let u = |s: &str| UserId::parse(s).unwrap();
    assert_eq!(r.take_presence_changes(), [(u("a"), true, true)], "one change for two streams");
    drop(a2);
    // A visit that begins and ends between two looks is still seen.
    drop(sub(&r, "b", &[], &[]));
    let mut changes = r.take_presence_changes();
    changes.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(changes, [(u("a"), false, false), (u("b"), true, false)]);
    drop(before);
    assert_eq!(r.take_presence_changes(), [(u("early"), false, false)]);
}

#[test]
fn the_inspector_sees_a_streams_positions_and_finds_events_in_the_log() {
    let r = Router::new(RouterConfig {
        epoch: Some(7),
        replay: ReplayConfig { capacity: 3, max_bytes: 1 << 20, max_age: std::time::Duration::from_secs(60) },
        ..RouterConfig::with_queue_capacity(16)
    });
    let first = r.publish(Target::users(vec![UserId::parse("a").unwrap()]), &ev("before")).unwrap();
    let a = sub(&r, "a", &["g"], &[]);
    let subject = Subject::User(UserId::parse("a").unwrap());
    let (views, total) = r.streams(&subject, 10);
    assert_eq!((views.len(), total), (1, 1));
    assert_eq!(views[0].positions.from_seq, 1, "it receives events after its cursor");
    assert_eq!(views[0].positions.sent_seq, 0, "nothing taken by its writer yet");

    let to_group = r.publish(Target::Group(GroupId::parse("g").unwrap()), &ev("x")).unwrap();
    let (views, _) = r.streams(&subject, 10);
    let p = views[0].positions;
    assert_eq!((p.queued_seq, p.sent_seq, p.queued_frames), (to_group.id.seq, 0, 2), "position + event queued");
    let _ = drain(a.mailbox());
    let (views, _) = r.streams(&subject, 10);
    assert_eq!((views[0].positions.sent_seq, views[0].positions.queued_frames), (to_group.id.seq, 0));
    assert!(views[0].is_addressed_by(&Target::Group(GroupId::parse("g").unwrap())));
    assert!(!views[0].is_addressed_by(&Target::Topic(Topic::parse("t").unwrap())));
    assert_eq!(r.streams(&Subject::Group(GroupId::parse("g").unwrap()), 10).1, 1);

    assert!(matches!(r.find_event(to_group.id), EventLookup::Found(l) if l.seq == to_group.id.seq));
    assert!(matches!(r.find_event(EventId { epoch: 8, seq: 1 }), EventLookup::OtherEpoch));
    assert!(matches!(r.find_event(EventId { epoch: 7, seq: 99 }), EventLookup::NotYet));
    for i in 0..3 {
        r.publish(Target::Broadcast, &ev(&i.to_string())).unwrap();
    }
    assert!(matches!(r.find_event(first.id), EventLookup::Evicted), "the log holds 3 events");

    // The tail's read: events of exactly the target after a position, and a gap once evicted.
    let tail = r.events_after(&Target::Broadcast, to_group.id.seq, 10);
    assert_eq!((tail.events.len(), tail.gap, tail.position), (3, false, r.last_seq()));
    let tail = r.events_after(&Target::Broadcast, 0, 10);
    assert!(tail.gap, "events after 0 were evicted");
    let tail = r.events_after(&Target::Topic(Topic::parse("t").unwrap()), to_group.id.seq, 10);
    assert_eq!((tail.events.len(), tail.position), (0, r.last_seq()), "nothing for it, but the position moves on");
    let w = r.replay_window();
    assert_eq!((w.events, w.capacity, w.oldest_seq, w.last_seq), (3, 3, Some(r.last_seq() - 2), r.last_seq()));
}

#[test]
fn retained_values_of_one_scope_are_listed_by_name() {
    let r = router(16);
    let user = |u: &str| Target::users(vec![UserId::parse(u).unwrap()]);
    let named = |n: &str, d: &str| Event { name: Some(EventName::parse(n).unwrap()), data: d.into() };
    let set = Retain::Set { expires_at: None };
    r.publish_with(user("a"), &named("status", "away"), set).unwrap();
    r.publish_with(user("a"), &ev("plain"), set).unwrap();
    r.publish_with(user("b"), &named("status", "busy"), set).unwrap();
    let values = r.retained_of(&Subject::User(UserId::parse("a").unwrap()));
    let names: Vec<_> = values.iter().map(|v| v.name.as_ref().map(|n| n.as_str().to_owned())).collect();
    assert_eq!(names, [None, Some("status".to_owned())], "only a's, the unnamed first");
}
