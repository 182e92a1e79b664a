//! Several replicas sharing events through a real `nats-server -js` on a loopback port: an
//! event published on any replica reaches its subscribers on every replica with one id, a
//! client resumes on another replica after its own was killed, retries with an idempotency
//! key are delivered once, and a broker restart loses no acknowledged event.

use std::time::{Duration, Instant as StdInstant};

use ssegate::grpc::pb;
use tokio::time::Instant;
use tonic::Code;

use crate::{
    broker::{Broker, readyz, replica, wait_backplane_up},
    helpers::{SseClient, deadline, ev, spawn_app, spawn_process},
};

#[tokio::test]
async fn an_event_published_on_any_replica_reaches_its_subscribers_on_every_replica_with_one_id() {
    let nats = Broker::start().await;
    let (a, b, c) = (replica(&nats, &[]).await, replica(&nats, &[]).await, replica(&nats, &[]).await);
    let mut on_a = a.subscribe("user=ua&group=g").await;
    let mut on_b = b.subscribe("user=ub").await;
    let mut on_c = c.subscribe("user=uc&topic=t.*").await;

    let to_b = a.publish_users(&["ub"], "", "to ub, via a").await;
    assert_eq!(to_b.recipients, None, "fan-out happens on every replica, after the publish");
    let to_topic = b.publish_topic("t.*", "to topic t.*, via b").await;
    let to_group = c.publish_group("g", "to group g, via c").await;
    let all = a.broadcast("to all, via a").await;

    let e = on_b.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("to ub, via a", to_b.event_id.as_str()));
    let e = on_c.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("to topic t.*, via b", to_topic.event_id.as_str()));
    let e = on_a.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("to group g, via c", to_group.event_id.as_str()));
    for s in [&mut on_a, &mut on_b, &mut on_c] {
        let e = s.next_event().await;
        assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("to all, via a", all.event_id.as_str()));
    }
}

#[tokio::test]
async fn ids_with_dots_stars_and_gt_never_leak_across_targets() {
    let nats = Broker::start().await;
    let (a, b) = (replica(&nats, &[]).await, replica(&nats, &[]).await);
    let mut star = b.subscribe("user=*").await;
    let mut dotted = b.subscribe("user=a.b").await;
    let mut gt = b.subscribe("user=%3E").await;
    a.publish_users(&["a.b"], "", "for a.b").await;
    a.publish_users(&["a.*"], "", "for a.*").await;
    a.broadcast("marker").await;
    assert_eq!(dotted.next_data(2).await, ["for a.b", "marker"]);
    assert_eq!(star.next_event().await.data, "marker");
    assert_eq!(gt.next_event().await.data, "marker");
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_is_delivered_once_with_the_first_id() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let mut sub = a.subscribe("user=u").await;
    let req = pb::PublishRequest {
        retain: None,
        user_ids: vec!["u".into()],
        event: Some(ev("", "once")),
        idempotency_key: "order-42-shipped".into(),
    };
    let first = a.client.clone().publish(req.clone()).await.unwrap().into_inner();
    let retry = a.client.clone().publish(req).await.unwrap().into_inner();
    assert_eq!(first.event_id, retry.event_id, "the retry gets the first publish's id");
    a.broadcast("marker").await;
    assert_eq!(sub.next_data(2).await, ["once", "marker"]);
}

#[tokio::test]
async fn a_client_of_a_killed_replica_resumes_on_another_with_nothing_lost() {
    let nats = Broker::start().await;
    let b = replica(&nats, &[]).await;
    let url = nats.url();
    let mut a = spawn_process(&["--backplane", "nats", "--nats-url", &url], &[]).await;
    let a_http = a.http;
    let mut client = SseClient::connect(a_http, "/v1/events?user=u", &[]).await;
    assert_eq!(client.status, 200);
    b.publish_users(&["u"], "", "1").await;
    assert_eq!(client.next_event().await.data, "1");
    let last = client.last_event_id();

    a.child.kill().await.unwrap(); // SIGKILL: no drain, no goodbye
    assert!(client.until_end().await.iter().all(|i| !matches!(i, ssegate::event_stream::parse::Item::Event(_))));
    b.publish_users(&["u"], "", "2").await;
    b.publish_users(&["u"], "", "3").await;
    let mut resumed = b.resume("user=u", &last).await;
    assert_eq!(resumed.next_data(2).await, ["2", "3"]);
    b.publish_users(&["u"], "", "4").await;
    assert_eq!(resumed.next_event().await.data, "4");
}

#[tokio::test]
async fn a_replica_started_later_can_serve_resumes_from_before_it_existed() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let mut c = a.subscribe("user=u").await;
    a.publish_users(&["u"], "", "seen").await;
    assert_eq!(c.next_event().await.data, "seen");
    let last = c.last_event_id();
    a.publish_users(&["u"], "", "missed").await;
    // A new replica fills its replay log from the stream before it serves.
    let late = replica(&nats, &[]).await;
    let mut resumed = late.resume("user=u", &last).await;
    assert_eq!(resumed.next_event().await.data, "missed");
}

#[tokio::test]
async fn a_broker_restart_fails_publishes_fast_keeps_streams_up_and_loses_no_acknowledged_event() {
    let mut nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let b = replica(&nats, &[]).await;
    let mut sub = b.subscribe("user=u").await;
    for i in 0..3 {
        a.publish_users(&["u"], "", &i.to_string()).await;
    }
    assert_eq!(sub.next_data(3).await, ["0", "1", "2"]);

    nats.kill().await;
    wait_backplane_up(&a, 0.0).await;
    let started = StdInstant::now();
    let refused = a
        .client
        .clone()
        .publish(pb::PublishRequest { user_ids: vec!["u".into()], event: Some(ev("", "x")), ..Default::default() })
        .await
        .expect_err("no acknowledgement without a broker");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, with nothing sent");
    assert_eq!(readyz(&a).await, (200, "ready".to_owned()), "subscribers are still served");
    assert_eq!(b.stats().await.connections, 1, "open streams stay up");

    nats.restart().await;
    wait_backplane_up(&a, 1.0).await;
    wait_backplane_up(&b, 1.0).await;
    for i in 3..6 {
        a.publish_users(&["u"], "", &i.to_string()).await;
    }
    assert_eq!(sub.next_data(3).await, ["3", "4", "5"], "continues where it stopped, with no gap");
}

#[tokio::test]
async fn presence_stats_and_disconnect_cover_every_replica() {
    let nats = Broker::start().await;
    let (a, b) = (replica(&nats, &[]).await, replica(&nats, &[]).await);
    let mut u_on_a = a.subscribe("user=u&group=g").await;
    let mut u_on_b = b.subscribe("user=u").await;
    let _v_on_b = b.subscribe("user=v&group=g").await;
    // Each replica announces itself every second; wait until both count the other.
    for r in [&a, &b] {
        let end = deadline();
        loop {
            let s = r.stats().await;
            if s.replicas == 2 && !s.partial {
                assert_eq!(s.connections, 3);
                break;
            }
            assert!(Instant::now() < end, "replicas never saw each other: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let p = b
        .client
        .clone()
        .presence(pb::PresenceRequest {
            user_ids: vec!["u".into(), "v".into(), "w".into()],
            groups: vec!["g".into()],
            list_online: Some(pb::OnlineUsersPage { limit: 10, after: String::new() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.replicas, p.partial), (2, false));
    let conns: Vec<_> = p.users.iter().map(|u| (u.user_id.as_str(), u.online, u.connections)).collect();
    assert_eq!(conns, [("u", true, 2), ("v", true, 1), ("w", false, 0)]);
    assert_eq!(p.groups[0].connections, 2);
    assert_eq!(p.online_user_ids, ["u", "v"], "each user once, whatever replicas they are on");

    let d = a
        .client
        .clone()
        .disconnect(pb::DisconnectRequest { user_id: "u".into(), reason: "bye".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.closed, d.replicas, d.partial), (2, 2, false), "both of u's streams, on both replicas");
    for s in [&mut u_on_a, &mut u_on_b] {
        let e = s.next_event().await;
        assert_eq!((e.event_type.as_str(), e.data.as_str()), ("ssegate.disconnect", "bye"));
    }
}

/// A TCP forwarder to the broker that can be paused: a replica behind it stops receiving
/// (it falls behind the others) without losing its connection.
struct PausableProxy {
    port: u16,
    paused: tokio::sync::watch::Sender<bool>,
}

impl PausableProxy {
    async fn start(to: u16) -> PausableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (paused, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else { return };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(Self::pipe(cr, uw, rx.clone()));
                tokio::spawn(Self::pipe(ur, cw, rx.clone()));
            }
        });
        PausableProxy { port, paused }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut paused: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if paused.wait_for(|p| !*p).await.is_err() {
                return;
            }
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // Bytes read just before a pause wait for the resume, like the rest.
                    if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }
}

#[tokio::test]
async fn a_resume_on_a_replica_behind_the_client_neither_repeats_nor_moves_the_id_back() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let proxy = PausableProxy::start(nats.port).await;
    let behind_url = format!("nats://127.0.0.1:{}", proxy.port);
    let b = spawn_app(&["--backplane", "nats", "--nats-url", &behind_url, "--nats-publish-timeout", "2s"]).await;
    let one = a.publish_users(&["u"], "", "one").await.event_id;
    // B has consumed it once a fresh stream of the user on B opens at its id (with interest
    // delivery B follows the user from then on, for a minute after its last stream).
    let end = deadline();
    while b.subscribe("user=u").await.cursor().await != one {
        assert!(Instant::now() < end, "replica B never consumed the first event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B stops receiving; a browser on A sees two more events.
    proxy.pause(true);
    a.publish_users(&["u"], "", "two").await;
    let three = a.publish_users(&["u"], "", "three").await.event_id;
    // It moves to B, which has not received them yet.
    let mut moved = b.resume("user=u", &three).await;
    assert_eq!(moved.cursor().await, three, "the cursor keeps the client's id, never an older one");
    proxy.pause(false);
    a.publish_users(&["u"], "", "four").await;
    let got = moved.next_event().await;
    assert_eq!(got.data, "four", "neither ssegate.missed nor a repeat of two and three: {got:?}");
}

#[tokio::test]
async fn a_publish_stream_through_the_broker_keeps_its_order_and_answers_each_item_with_its_own_outcome() {
    use pb::publish_stream_request::Target;
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let b = replica(&nats, &[]).await;
    let mut sub = b.subscribe("user=u").await;

    // Two thousand items sent at once (the server reads them ahead and hands each to the broker
    // while earlier ones wait for their acknowledgement): one with a bad target, and a retry
    // of an earlier item with the same idempotency key.
    let n = 2000usize;
    let (bad, first, retry) = (500usize, 900usize, 1500usize);
    let items: Vec<_> = (0..n)
        .map(|i| {
            let user = if i == bad { "" } else { "u" };
            let (data, key) = match i {
                _ if i == first || i == retry => ("keyed".to_owned(), "the-key".to_owned()),
                _ => (i.to_string(), String::new()),
            };
            pb::PublishStreamRequest {
                target: Some(Target::Users(pb::UserTarget { user_ids: vec![user.into()] })),
                event: Some(ev("", &data)),
                idempotency_key: key,
                ..Default::default()
            }
        })
        .collect();
    let mut answers = a.client.clone().publish_stream(tokio_stream::iter(items)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(answer) = tokio::time::timeout_at(deadline(), answers.message()).await.expect("answers").unwrap() {
        got.push(answer);
    }
    assert_eq!(got.len(), n, "one answer per item");
    let mut last_seq = 0u64;
    for (i, answer) in got.iter().enumerate() {
        assert_eq!(answer.index, i as u64, "answers in item order");
        if i == bad {
            assert_eq!(answer.code, Code::InvalidArgument as i32, "{answer:?}");
            continue;
        }
        assert_eq!(answer.code, Code::Ok as i32, "item {i}: {answer:?}");
        let seq: u64 = answer.event_id.rsplit('-').next().unwrap().parse().unwrap();
        if i == retry {
            assert_eq!(answer.event_id, got[first].event_id, "the retry gets the first one's id");
        } else {
            assert!(seq > last_seq, "item {i}: stored in the order sent ({seq} after {last_seq})");
            last_seq = seq;
        }
    }

    // The subscriber on the other replica gets each stored event once, in the order sent.
    let expected: Vec<String> = (0..n)
        .filter(|i| *i != bad && *i != retry)
        .map(|i| if i == first { "keyed".to_owned() } else { i.to_string() })
        .collect();
    assert_eq!(sub.next_data(expected.len()).await, expected);
    b.broadcast("marker").await;
    assert_eq!(sub.next_data(1).await, ["marker"], "and nothing else");
}

#[tokio::test]
async fn history_on_any_replica_lists_what_was_published_on_any_other_and_its_position_resumes_there() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let b = replica(&nats, &[]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(a.publish_users(&["u"], "", &format!("m{i}")).await.event_id);
    }
    // b has read them back from the stream once a stream opened on it starts at the last one.
    let end = deadline();
    while b.subscribe("user=u").await.cursor().await != ids[2] {
        assert!(Instant::now() < end, "replica b never consumed {}", ids[2]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let req = pb::HistoryRequest {
        target: Some(pb::history_request::Target::UserId("u".into())),
        limit: 10,
        before: String::new(),
    };
    let page = b.client.clone().history(req).await.expect("history").into_inner();
    let got: Vec<_> = page.events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, [ids[2].clone(), ids[1].clone(), ids[0].clone()], "the same ids on every replica");
    // Continue from b's page on a: nothing repeated, nothing missed.
    let next = b.publish_users(&["u"], "", "next").await.event_id;
    let mut stream = a.resume("user=u", &page.position).await;
    let e = stream.next_event().await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("next", next.as_str()));
}

/// The subjects a replica's NATS connection (the one named `ssegate` with the most
/// subscriptions matching `prefix`, or none) is subscribed to, from the broker's monitor.
async fn live_subscriptions(nats: &Broker, prefix: &str) -> Vec<Vec<String>> {
    let connz = nats.monitor("/connz?subs=true").await;
    connz["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            c["subscriptions_list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str())
                .filter(|s| s.starts_with(prefix))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn a_replica_that_gains_a_users_first_stream_resumes_it_from_the_stream_in_order_and_without_loss() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let b = replica(&nats, &[]).await;
    // Interleaved: events of u alone (its own subject, which b does not follow) and broadcasts
    // (which every replica follows).
    let first = a.publish_users(&["u"], "", "u1").await.event_id;
    a.broadcast("all1").await;
    a.publish_users(&["u"], "", "u2").await;
    a.publish_users(&["v"], "", "v1").await;
    a.publish_users(&["u"], "", "u3").await;
    let last = a.broadcast("all2").await.event_id;
    // b is not subscribed to u's live subject: nothing of u has reached it.
    let subs = live_subscriptions(&nats, "ssegate.events.live.").await;
    assert_eq!(subs.iter().filter(|s| s.iter().any(|s| s.contains(".live.u."))).count(), 0, "{subs:?}");
    // The browser moves from a to b after its first event.
    let mut moved = b.resume("user=u", &first).await;
    assert_eq!(moved.next_data(4).await, ["all1", "u2", "u3", "all2"], "in stream order, nothing lost");
    assert_eq!(moved.cursor().await, last, "then the cursor at the newest");
    // From now on b follows u live.
    a.publish_users(&["u"], "", "u4").await;
    a.publish_users(&["v"], "", "v2").await;
    a.broadcast("all3").await;
    assert_eq!(moved.next_data(2).await, ["u4", "all3"], "and nothing of v");
}

#[tokio::test]
async fn a_replica_stops_receiving_a_users_events_once_its_last_stream_is_gone_and_the_linger_is_over() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let b = replica(&nats, &["--nats-interest-linger", "300ms"]).await;
    let mut sub = b.subscribe("user=u").await;
    sub.cursor().await;
    let user_subject = "ssegate.events.live.u.dQ"; // "u" in unpadded base64url
    let followers = || async { live_subscriptions(&nats, user_subject).await.iter().filter(|s| !s.is_empty()).count() };
    assert_eq!(followers().await, 1, "b follows u while u has a stream there");
    a.publish_users(&["u"], "", "live").await;
    assert_eq!(sub.next_data(1).await, ["live"]);
    drop(sub);
    let end = deadline();
    while followers().await != 0 {
        assert!(Instant::now() < end, "b still follows u after its last stream closed and the linger passed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The events of u reach no replica now; a new stream on b follows u again, resuming
    // from the last id it had, and gets what was published meanwhile.
    let missed = a.publish_users(&["u"], "", "meanwhile").await.event_id;
    let mut back = b.subscribe("user=u").await;
    let cursor = back.cursor().await;
    assert_eq!(cursor, missed, "a fresh stream on b opens at the newest event of u");
    a.publish_users(&["u"], "", "again").await;
    assert_eq!(back.next_data(1).await, ["again"]);
}

#[tokio::test]
async fn a_groups_events_reach_only_replicas_with_a_stream_in_it_and_a_resume_there_reads_them_in_order() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let b = replica(&nats, &[]).await;
    let mut on_a = a.subscribe("user=x&group=team").await;
    on_a.cursor().await;
    let first = a.publish_group("team", "g1").await.event_id;
    a.publish_users(&["y"], "", "y1").await;
    a.broadcast("all1").await;
    a.publish_group("team", "g2").await;
    assert_eq!(on_a.next_data(3).await, ["g1", "all1", "g2"]);
    // Only a follows the group's live subject (the subject is the group id in base64url).
    let group_subject = "ssegate.events.live.g.dGVhbQ";
    let subs = live_subscriptions(&nats, group_subject).await;
    assert_eq!(subs.iter().filter(|s| !s.is_empty()).count(), 1, "{subs:?}");
    // A member moves to b after the first event: b reads the group's events from the stream
    // and serves them in order with the broadcast, then live.
    let mut moved = b.resume("user=y&group=team", &first).await;
    assert_eq!(moved.next_data(3).await, ["y1", "all1", "g2"], "in stream order, nothing lost");
    a.publish_group("team", "g3").await;
    a.publish_group("other", "o1").await;
    a.publish_group("team", "g4").await;
    assert_eq!(moved.next_data(2).await, ["g3", "g4"], "live, and nothing of another group");
    let subs = live_subscriptions(&nats, group_subject).await;
    assert_eq!(subs.iter().filter(|s| !s.is_empty()).count(), 2, "both follow it now: {subs:?}");
}

/// The subject the stream stored the event `id` (`<epoch>-<seq>`) under, read from the
/// stream by sequence.
async fn stored_subject(nats: &Broker, id: &str) -> String {
    let seq: u64 = id.rsplit('-').next().and_then(|s| s.parse().ok()).expect("an id ends with its sequence");
    let stream = nats.jetstream().await.get_stream("SSEGATE").await.expect("the stream");
    stream.direct_get(seq).await.expect("the event in the stream").subject.to_string()
}

/// Publishes `data` to `topic` through `app` until the stream stores it under `subject`
/// (whether a topic gets its own subject depends on the replicas heard from: condition, with
/// a deadline). Each publish reaches `sub`, a stream on the topic. Returns the last id.
async fn publish_topic_until_stored_on(
    nats: &Broker,
    app: &crate::helpers::TestApp,
    sub: &mut SseClient,
    topic: &str,
    subject: &str,
) -> String {
    let end = deadline();
    loop {
        let id = app.publish_topic(topic, "probe").await.event_id;
        assert_eq!(sub.next_data(1).await, ["probe"], "every probe is delivered, wherever it is stored");
        let stored = stored_subject(nats, &id).await;
        if stored == subject {
            return id;
        }
        assert!(Instant::now() < end, "topic events still stored under {stored}, not {subject}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const PRICES_TOPIC_SUBJECT: &str = "ssegate.events.to.t.cHJpY2Vz"; // "prices" in base64url

#[tokio::test]
async fn a_topics_events_reach_only_replicas_with_a_stream_on_it_and_a_resume_there_reads_them_in_order() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let b = replica(&nats, &[]).await;
    let mut on_a = a.subscribe("user=x&topic=prices").await;
    on_a.cursor().await;
    // A topic gets its own subject once each replica has heard the others for a while (an
    // older replica, which would not follow it, could be there unheard before).
    let first = publish_topic_until_stored_on(&nats, &a, &mut on_a, "prices", PRICES_TOPIC_SUBJECT).await;
    // Only a follows the topic's live subject: b never receives its events.
    let live = "ssegate.events.live.t.cHJpY2Vz";
    let subs = live_subscriptions(&nats, live).await;
    assert_eq!(subs.iter().filter(|s| !s.is_empty()).count(), 1, "{subs:?}");
    a.publish_users(&["y"], "", "y1").await;
    let p1 = a.publish_topic("prices", "p1").await.event_id;
    assert_eq!(stored_subject(&nats, &p1).await, PRICES_TOPIC_SUBJECT);
    a.broadcast("all1").await;
    a.publish_topic("prices", "p2").await;
    assert_eq!(on_a.next_data(3).await, ["p1", "all1", "p2"]);
    // A reader of the topic moves to b: b reads the topic's events from the stream and serves
    // them in order with the user's and the broadcast, then live, and nothing of another topic.
    let mut moved = b.resume("user=y&topic=prices", &first).await;
    assert_eq!(moved.next_data(4).await, ["y1", "p1", "all1", "p2"], "in stream order, nothing lost");
    a.publish_topic("prices", "p3").await;
    a.publish_topic("other", "o1").await;
    a.publish_topic("prices", "p4").await;
    assert_eq!(moved.next_data(2).await, ["p3", "p4"], "live, and nothing of another topic");
    let subs = live_subscriptions(&nats, live).await;
    assert_eq!(subs.iter().filter(|s| !s.is_empty()).count(), 2, "both follow it now: {subs:?}");
}

#[tokio::test]
async fn topics_stay_on_the_shared_subject_while_a_replica_that_does_not_follow_them_is_around() {
    let nats = Broker::start().await;
    let a = replica(&nats, &[]).await;
    let mut on_a = a.subscribe("user=x&topic=prices").await;
    on_a.cursor().await;
    publish_topic_until_stored_on(&nats, &a, &mut on_a, "prices", PRICES_TOPIC_SUBJECT).await;
    // A replica of the previous version joins (a rollback, or a rolling upgrade's first
    // step): its hello is its id alone, and it reads topics from the shared subject only.
    let client = async_nats::connect(nats.url()).await.expect("raw NATS client");
    let older = tokio::spawn(async move {
        let mut hello = tokio::time::interval(Duration::from_millis(200));
        loop {
            hello.tick().await;
            let _ = client.publish("ssegate.events.ctl.hello", "00000000older000".into()).await;
        }
    });
    publish_topic_until_stored_on(&nats, &a, &mut on_a, "prices", "ssegate.events.to.all").await;
    // Once it is gone (no hello for a few seconds), topics get their own subject again.
    older.abort();
    publish_topic_until_stored_on(&nats, &a, &mut on_a, "prices", PRICES_TOPIC_SUBJECT).await;
}
