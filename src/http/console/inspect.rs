//! The inspector: one user, group or topic: its streams on every replica (the cluster's
//! `Streams` scatter/gather; in memory, this process's), its retained values, its recent
//! events (`Router::history`) and whether a given event reached it.
//!
//! **"Reached"** is decided per stream of the subject on this replica, from the replay log's
//! copy of the event (its target) and the stream's positions (`router::Positions`):
//! - `sent`: the event is addressed to the stream, is after the point the stream started
//!   from, and the stream's writer has taken events up to it or later off its queue (handed to
//!   the socket; TCP delivery to the browser is not observable);
//! - `queued`: addressed and after its start, queued but not yet taken by the writer;
//! - `pending`: addressed and after its start, not yet queued (on its way through the shard);
//! - `before_stream`: published before the stream started (it may have reached an earlier
//!   stream of the subject: unknown);
//! - `not_addressed`: the event's target does not include this stream.
//!
//! The verdict is `reached` if some stream (on any replica that answered) was `sent` it,
//! otherwise `unknown` with the reason (the log no longer holds the id, it is of another epoch,
//! no stream is open, ...). The event itself is looked up in this replica's replay log (every
//! replica consumes the whole stream); sequence numbers are the shared stream's, so positions
//! of streams on other replicas compare with it. A replica that did not answer in time is
//! reported (`partial`), and its streams are missing from the verdict.

use axum::{
    extract::{Query, State},
    response::Response,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Console, ConsoleError, json};
use crate::{
    backplane::cluster,
    domain::{EventId, GroupId, Target, Topic, UserId},
    event_stream::parse::name_and_data,
    router::{EventLookup, StreamView, Subject},
};

/// Streams listed at most per replica (a topic may have thousands; the count is always given).
const MAX_STREAMS: usize = 200;
/// Recent events listed by default, and at most.
const RECENT: usize = 20;
const MAX_RECENT: usize = 200;

#[derive(Deserialize)]
pub(super) struct Lookup {
    kind: String,
    id: String,
    /// An event id to check.
    event: Option<String>,
    limit: Option<usize>,
}

/// Parses a subject from its kind and id (the same rules as everywhere: `UserId::parse` ...).
pub(super) fn subject(kind: &str, id: &str) -> Result<Subject, ConsoleError> {
    match Subject::parse(kind, id) {
        Some(Ok(subject)) => Ok(subject),
        Some(Err(e)) => Err(ConsoleError::BadRequest(format!("{kind} {e}"))),
        None => Err(ConsoleError::BadRequest(format!("unknown kind `{kind}` (expected user, group or topic)"))),
    }
}

pub(super) async fn lookup(State(console): State<Console>, Query(q): Query<Lookup>) -> Result<Response, ConsoleError> {
    let subject = subject(&q.kind, &q.id)?;
    let event = match q.event.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<EventId>().map_err(|e| ConsoleError::BadRequest(format!("event id `{s}`: {e}")))?),
    };
    let c = &console.0;
    let router = c.router_of(&subject);
    // With interest delivery a replica holds a user's, group's or topic's own events only
    // while following it: follow it for this answer (its events in the replay window are read
    // in).
    let all = Some(EventId { epoch: router.epoch(), seq: 0 });
    let followed = match &subject {
        Subject::User(user) => router.follow(Some(user), &[], &[], all).await,
        Subject::Group(group) => router.follow(None, std::slice::from_ref(group), &[], all).await,
        Subject::Topic(topic) => router.follow(None, &[], std::slice::from_ref(topic), all).await,
    };
    let _held = followed.map_err(|e| ConsoleError::Unavailable(e.to_string()))?;
    let gathered =
        c.backplane.gather(&c.routers, &cluster::Query::Streams { subject: subject.clone(), limit: MAX_STREAMS }).await;
    let this_id = c.backplane.replica_id();
    // This replica's answer first; in memory the only answer is this process's (no id).
    let mut answers: Vec<(bool, cluster::Answer)> = gathered
        .answers
        .into_iter()
        .map(|a| (a.replica.is_empty() || Some(a.replica.as_str()) == this_id, a))
        .collect();
    answers.sort_by_key(|(this, _)| !*this);
    let streams: Vec<(bool, &str, &StreamView)> =
        answers.iter().flat_map(|(this, a)| a.streams.iter().map(move |s| (*this, a.replica.as_str(), s))).collect();
    let epoch = router.epoch();
    let id = |seq: u64| EventId { epoch, seq }.to_string();
    let history = router.history(&subject.target(), None, q.limit.unwrap_or(RECENT).clamp(1, MAX_RECENT));
    let recent: Vec<Value> = history
        .events
        .iter()
        .map(|e| {
            let (name, data) = name_and_data(&e.frame.bytes);
            json!({ "id": id(e.seq), "name": name, "data": data, "age_s": e.frame.published_at.elapsed().as_secs_f64() })
        })
        .collect();
    let retained: Vec<Value> = router
        .retained_of(&subject)
        .iter()
        .map(|v| {
            let (_, data) = name_and_data(&v.frame);
            let expires_in = v.expires_at.and_then(|at| at.duration_since(std::time::SystemTime::now()).ok());
            json!({
                "name": v.name.as_ref().map_or("", |n| n.as_str()),
                "set_by": id(v.seq),
                "data": data,
                "expires_in_s": expires_in.map(|d| d.as_secs()),
            })
        })
        .collect();
    let views: Vec<(&str, &StreamView)> =
        streams.iter().map(|(this, replica, s)| (if *this { "this" } else { *replica }, *s)).collect();
    let reached = event.map(|e| reached(&console, &subject, &views, e));
    let this_streams: Vec<Value> =
        streams.iter().filter(|(this, ..)| *this).map(|(.., s)| stream_json(s, epoch)).collect();
    let all_streams: Vec<Value> = streams
        .iter()
        .map(|(this, replica, s)| {
            let mut v = stream_json(s, epoch);
            v["replica"] = json!(if *this { "this" } else { replica });
            v
        })
        .collect();
    let per_replica: Vec<Value> = answers
        .iter()
        .map(
            |(this, a)| json!({ "replica": if *this { "this" } else { a.replica.as_str() }, "total": a.streams_total }),
        )
        .collect();
    let this_total: u64 = answers.iter().filter(|(this, _)| *this).map(|(_, a)| a.streams_total).sum();
    Ok(json(&json!({
        "subject": { "kind": subject.kind(), "id": subject.id() },
        "streams": all_streams,
        "this_replica": { "streams": this_streams, "total": this_total, "listed_max": MAX_STREAMS },
        "cluster": {
            "connections": answers.iter().map(|(_, a)| a.streams_total).sum::<u64>(),
            "per_replica": per_replica,
            "replicas": answers.len(),
            "partial": gathered.partial,
        },
        "retained": retained,
        "recent": { "events": recent, "more": history.more, "log_evicted": history.evicted },
        "reached": reached,
    })))
}

fn stream_json(s: &StreamView, epoch: u64) -> Value {
    let id = |seq: u64| EventId { epoch, seq }.to_string();
    let p = &s.positions;
    json!({
        "conn": s.conn,
        "user": s.user.as_str(),
        "groups": s.groups.iter().map(GroupId::as_str).collect::<Vec<_>>(),
        "topics": s.topics.iter().map(Topic::as_str).collect::<Vec<_>>(),
        "age_s": s.age.as_secs_f64(),
        "protocol": s.meta.protocol.as_str(),
        "peer": s.meta.peer.map(|p| p.to_string()),
        "queued_frames": p.queued_frames,
        "queued_bytes": p.queued_bytes,
        "from_id": id(p.from_seq),
        "last_queued_id": id(p.queued_seq),
        "last_sent_id": id(p.sent_seq),
    })
}

/// Whether event `event` reached `subject`'s streams here (see the module's definition).
fn reached(console: &Console, subject: &Subject, streams: &[(&str, &StreamView)], event: EventId) -> Value {
    let unknown = |reason: String| json!({ "event": event.to_string(), "verdict": "unknown", "reason": reason });
    let c = &console.0;
    let router = c.routers.of_epoch(event.epoch).unwrap_or_else(|| c.router_of(subject));
    let logged = match router.find_event(event) {
        EventLookup::Found(logged) => logged,
        EventLookup::OtherEpoch => {
            return unknown("the id is of another epoch (an earlier process or a recreated stream)".into());
        }
        EventLookup::NotYet => {
            return json!({ "event": event.to_string(), "verdict": "not_yet",
            "reason": "this replica has not received an event with this id (yet)" });
        }
        EventLookup::Evicted => return unknown("the replay log no longer holds this event".into()),
        EventLookup::Absent => return unknown("no event has this id (a skipped sequence number)".into()),
    };
    let seq = logged.seq;
    let per_stream: Vec<Value> = streams
        .iter()
        .map(|(replica, s)| {
            let p = &s.positions;
            let state = if !s.is_addressed_by(&logged.target) {
                "not_addressed"
            } else if seq <= p.from_seq {
                "before_stream"
            } else if p.sent_seq >= seq {
                "sent"
            } else if p.queued_seq >= seq {
                "queued"
            } else {
                "pending"
            };
            json!({ "replica": replica, "conn": s.conn, "state": state })
        })
        .collect();
    let any = |state: &str| per_stream.iter().any(|s| s["state"] == state);
    let (verdict, reason) = if any("sent") {
        ("reached", "handed to the socket of at least one of its streams".to_owned())
    } else if any("queued") || any("pending") {
        ("on_its_way", "queued for its stream, not yet written".to_owned())
    } else if streams.is_empty() {
        ("unknown", "no stream of it is open now on the replicas that answered".to_owned())
    } else if any("before_stream") {
        ("unknown", "published before its current streams started: an earlier stream may have had it".to_owned())
    } else {
        ("not_addressed", "the event's target does not include its streams".to_owned())
    };
    let (name, data) = name_and_data(&logged.frame.bytes);
    json!({
        "event": event.to_string(),
        "verdict": verdict,
        "reason": reason,
        "target": target_text(&logged.target),
        "addressed_to_subject": addressed(&logged.target, subject),
        "name": name,
        "data": data,
        "streams": per_stream,
    })
}

/// Whether `target` names `subject` itself (a user in its list, the group, the topic, or all).
fn addressed(target: &Target, subject: &Subject) -> bool {
    match (target, subject) {
        (Target::Broadcast, _) => true,
        (Target::Users(users), Subject::User(u)) => users.binary_search(u).is_ok(),
        (Target::Group(a), Subject::Group(b)) => a == b,
        (Target::Topic(a), Subject::Topic(b)) => a == b,
        _ => false,
    }
}

pub(super) fn target_text(target: &Target) -> String {
    match target {
        Target::Users(users) if users.len() <= 5 => {
            format!("user {}", users.iter().map(UserId::as_str).collect::<Vec<_>>().join(", "))
        }
        Target::Users(users) => format!("{} users", users.len()),
        Target::Group(g) => format!("group {g}"),
        Target::Topic(t) => format!("topic {t}"),
        Target::Broadcast => "broadcast".into(),
    }
}
