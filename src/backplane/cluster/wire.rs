//! The form of cluster queries and answers between replicas: small JSON, versioned, with ids as
//! strings. This is the one place where the typed `Query` and `Answer` become text and back;
//! everything a replica receives is validated here again (it may come from another version),
//! and a message that does not read or validate is refused whole, so its sender's query is not
//! answered (the asker reports `partial`) or its answer is not counted.
//!
//! **Compatibility:** replicas of different versions meet during a rolling upgrade, so every
//! message tolerates fields added or removed: unknown fields are ignored, missing ones take
//! their default (`#[serde(default)]`, never `deny_unknown_fields`), and per-kind counters travel
//! as lists of any length (extra entries are dropped, missing ones are 0). Each message with a
//! body carries `v`, the version of the format its writer speaks (`VERSION`; absent, so 0, from
//! writers before it was added); a reader reads every `v` the same tolerant way, and a later
//! version may use it to read a field whose meaning changed. A field may be added with a
//! default meaning "not known"; it must never be renamed or change type. A query is one
//! externally tagged kind (`{"Presence":{..}}`, `{"Disconnect":{..}}`, `{"Streams":{..}}`, or
//! `"Stats"`, which has no body); a kind an older replica does not know gets no answer from it (the result is then
//! honestly `partial`).

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};

use super::{Answer, OnlinePage, Query};
use crate::{
    domain::{GroupId, InvalidText, Topic, UserId},
    router::{Positions, Protocol, Stats, StreamMeta, StreamView, Subject},
};

/// The version of the format this replica writes.
pub const VERSION: u32 = 1;

/// Most streams one replica lists in an answer, whatever the asker asks.
const MAX_STREAMS: usize = 1000;

#[derive(Serialize, Deserialize, Debug)]
enum WireQuery {
    Presence(WirePresence),
    Stats,
    Disconnect(WireDisconnect),
    Streams(WireStreams),
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireStreams {
    v: u32,
    /// `user`, `group` or `topic`.
    kind: String,
    id: String,
    limit: usize,
}

/// `router::StreamView`: sequence numbers are the shared stream's, so comparable across
/// replicas; the age in milliseconds; the peer as text (`None` if it does not parse).
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireStream {
    conn: u64,
    user: String,
    groups: Vec<String>,
    topics: Vec<String>,
    age_ms: u64,
    peer: Option<String>,
    protocol: String,
    queued_frames: usize,
    queued_bytes: usize,
    from_seq: u64,
    queued_seq: u64,
    sent_seq: u64,
}

impl From<&StreamView> for WireStream {
    fn from(s: &StreamView) -> Self {
        let p = &s.positions;
        WireStream {
            conn: s.conn,
            user: s.user.as_str().to_owned(),
            groups: strings(&s.groups),
            topics: strings(&s.topics),
            age_ms: u64::try_from(s.age.as_millis()).unwrap_or(u64::MAX),
            peer: s.meta.peer.map(|p| p.to_string()),
            protocol: s.meta.protocol.as_str().to_owned(),
            queued_frames: p.queued_frames,
            queued_bytes: p.queued_bytes,
            from_seq: p.from_seq,
            queued_seq: p.queued_seq,
            sent_seq: p.sent_seq,
        }
    }
}

impl WireStream {
    fn parse(self) -> Result<StreamView, InvalidText> {
        let protocol = match self.protocol.as_str() {
            "h1" => Protocol::Http1,
            "h2" => Protocol::Http2,
            _ => Protocol::Unknown,
        };
        Ok(StreamView {
            conn: self.conn,
            user: UserId::parse(&self.user)?,
            groups: parse_all(&self.groups, GroupId::parse)?,
            topics: parse_all(&self.topics, Topic::parse)?,
            age: std::time::Duration::from_millis(self.age_ms),
            meta: StreamMeta { peer: self.peer.and_then(|p| p.parse().ok()), protocol },
            positions: Positions {
                queued_frames: self.queued_frames,
                queued_bytes: self.queued_bytes,
                from_seq: self.from_seq,
                queued_seq: self.queued_seq,
                sent_seq: self.sent_seq,
            },
        })
    }
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WirePresence {
    v: u32,
    users: Vec<String>,
    groups: Vec<String>,
    topics: Vec<String>,
    /// `[after, limit]`: a page of online users.
    online: Option<(Option<String>, usize)>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireDisconnect {
    v: u32,
    user: String,
    reason: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireAnswer {
    v: u32,
    user_connections: Vec<u64>,
    group_connections: Vec<u64>,
    topic_connections: Vec<u64>,
    online: Vec<String>,
    more_online: bool,
    stats: Option<WireStats>,
    closed: u64,
    streams: Vec<WireStream>,
    streams_total: u64,
    replica: String,
}

/// `router::Stats`, every field optional and per-kind counters as lists (a newer replica may
/// count more kinds).
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireStats {
    connections: u64,
    users: u64,
    groups: u64,
    topics: u64,
    events_published: u64,
    events_delivered: u64,
    events_dropped: u64,
    connections_opened: u64,
    events_replayed: u64,
    resumes_missed: u64,
    connections_rejected: u64,
    replay_log_events: u64,
    replay_log_bytes: u64,
    retained_values: u64,
    retained_bytes: u64,
    retained_sent: u64,
    published_by_target: Vec<u64>,
    resumes_by_outcome: Vec<u64>,
}

impl From<&Stats> for WireStats {
    fn from(st: &Stats) -> Self {
        WireStats {
            connections: st.connections,
            users: st.users,
            groups: st.groups,
            topics: st.topics,
            events_published: st.events_published,
            events_delivered: st.events_delivered,
            events_dropped: st.events_dropped,
            connections_opened: st.connections_opened,
            events_replayed: st.events_replayed,
            resumes_missed: st.resumes_missed,
            connections_rejected: st.connections_rejected,
            replay_log_events: st.replay_log_events,
            replay_log_bytes: st.replay_log_bytes,
            retained_values: st.retained_values,
            retained_bytes: st.retained_bytes,
            retained_sent: st.retained_sent,
            published_by_target: st.published_by_target.to_vec(),
            resumes_by_outcome: st.resumes_by_outcome.to_vec(),
        }
    }
}

impl From<WireStats> for Stats {
    fn from(w: WireStats) -> Self {
        Stats {
            connections: w.connections,
            users: w.users,
            groups: w.groups,
            topics: w.topics,
            events_published: w.events_published,
            events_delivered: w.events_delivered,
            events_dropped: w.events_dropped,
            connections_opened: w.connections_opened,
            events_replayed: w.events_replayed,
            resumes_missed: w.resumes_missed,
            connections_rejected: w.connections_rejected,
            replay_log_events: w.replay_log_events,
            replay_log_bytes: w.replay_log_bytes,
            retained_values: w.retained_values,
            retained_bytes: w.retained_bytes,
            retained_sent: w.retained_sent,
            published_by_target: array(&w.published_by_target),
            resumes_by_outcome: array(&w.resumes_by_outcome),
        }
    }
}

/// The first `N` counters of a list, 0 where it is shorter.
fn array<const N: usize>(v: &[u64]) -> [u64; N] {
    let mut a = [0; N];
    for (slot, x) in a.iter_mut().zip(v) {
        *slot = *x;
    }
    a
}

/// Why a message from another replica was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON of a known shape (for a query, perhaps a kind from a newer version).
    #[error("not a cluster message this version reads: {0}")]
    Json(#[from] serde_json::Error),
    /// An id this version's rules refuse (the sender's rules may differ).
    #[error("invalid id in cluster message: {0}")]
    Id(#[from] InvalidText),
}

fn strings<T: Borrow<str>>(ids: &[T]) -> Vec<String> {
    ids.iter().map(|id| id.borrow().to_owned()).collect()
}

fn parse_all<T>(ids: &[String], parse: fn(&str) -> Result<T, InvalidText>) -> Result<Vec<T>, InvalidText> {
    ids.iter().map(|id| parse(id)).collect()
}

pub fn encode_query(query: &Query) -> Vec<u8> {
    let wire = match query {
        Query::Presence { users, groups, topics, online } => WireQuery::Presence(WirePresence {
            v: VERSION,
            users: strings(users),
            groups: strings(groups),
            topics: strings(topics),
            online: online.as_ref().map(|p| (p.after.clone(), p.limit)),
        }),
        Query::Stats => WireQuery::Stats,
        Query::Disconnect { user, reason } => {
            WireQuery::Disconnect(WireDisconnect { v: VERSION, user: user.as_str().to_owned(), reason: reason.clone() })
        }
        Query::Streams { subject, limit } => WireQuery::Streams(WireStreams {
            v: VERSION,
            kind: subject.kind().to_owned(),
            id: subject.id().to_owned(),
            limit: *limit,
        }),
    };
    // Serialising strings, numbers and enums to JSON cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// Reads (and re-validates) a query from another replica.
pub fn decode_query(bytes: &[u8]) -> Result<Query, DecodeError> {
    Ok(match serde_json::from_slice::<WireQuery>(bytes)? {
        WireQuery::Presence(p) => Query::Presence {
            users: parse_all(&p.users, UserId::parse)?,
            groups: parse_all(&p.groups, GroupId::parse)?,
            topics: parse_all(&p.topics, Topic::parse)?,
            online: p.online.map(|(after, limit)| OnlinePage { after, limit }),
        },
        WireQuery::Stats => Query::Stats,
        WireQuery::Disconnect(d) => Query::Disconnect { user: UserId::parse(&d.user)?, reason: d.reason },
        WireQuery::Streams(q) => match Subject::parse(&q.kind, &q.id) {
            Some(subject) => Query::Streams { subject: subject?, limit: q.limit.min(MAX_STREAMS) },
            // A kind of subject from a newer version: not understood, as an unknown query kind.
            None => {
                let e = <serde_json::Error as serde::de::Error>::custom(format!("unknown subject kind {:?}", q.kind));
                return Err(DecodeError::Json(e));
            }
        },
    })
}

pub fn encode_answer(answer: &Answer) -> Vec<u8> {
    let wire = WireAnswer {
        v: VERSION,
        user_connections: answer.user_connections.clone(),
        group_connections: answer.group_connections.clone(),
        topic_connections: answer.topic_connections.clone(),
        online: strings(&answer.online),
        more_online: answer.more_online,
        stats: answer.stats.as_ref().map(WireStats::from),
        closed: answer.closed,
        streams: answer.streams.iter().map(WireStream::from).collect(),
        streams_total: answer.streams_total,
        replica: answer.replica.clone(),
    };
    // Serialising strings, numbers and lists to JSON cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// Reads (and re-validates) another replica's answer.
pub fn decode_answer(bytes: &[u8]) -> Result<Answer, DecodeError> {
    let w = serde_json::from_slice::<WireAnswer>(bytes)?;
    Ok(Answer {
        user_connections: w.user_connections,
        group_connections: w.group_connections,
        topic_connections: w.topic_connections,
        online: parse_all(&w.online, UserId::parse)?,
        more_online: w.more_online,
        stats: w.stats.map(Stats::from),
        closed: w.closed,
        streams: w.streams.into_iter().map(WireStream::parse).collect::<Result<_, _>>()?,
        streams_total: w.streams_total,
        replica: w.replica,
    })
}

/// A presence message between replicas, on `<subject>.ctl.presence` (`presence.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceMsg {
    /// A replica's changes, numbered per replica (`seq`, from 1, one per message). `reset`: the
    /// message starts the replica's whole set (its users not listed by it or by the messages
    /// that follow count as gone).
    Changes { replica: String, seq: u64, reset: bool, changes: Vec<(UserId, bool)> },
    /// The replica is alive, and `seq` is the last message it sent.
    Heartbeat { replica: String, seq: u64 },
    /// Asks replica `of` (every replica when `None`) to send its whole set.
    Sync { from: String, of: Option<String> },
    /// The replica is stopping: its users are gone from it now, and it is no longer one of
    /// the replicas (a version without this kind ignores it and waits for the silence).
    Bye { replica: String },
}

#[derive(Serialize, Deserialize, Debug)]
enum WirePresenceMsg {
    Changes(WireChanges),
    Heartbeat(WireHeartbeat),
    Sync(WireSync),
    Bye(WireBye),
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireBye {
    v: u32,
    replica: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireChanges {
    v: u32,
    replica: String,
    seq: u64,
    reset: bool,
    /// `[user, has a stream there now]`, in order.
    changes: Vec<(String, bool)>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireHeartbeat {
    v: u32,
    replica: String,
    seq: u64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
struct WireSync {
    v: u32,
    from: String,
    of: Option<String>,
}

pub fn encode_presence(msg: &PresenceMsg) -> Vec<u8> {
    let wire = match msg {
        PresenceMsg::Changes { replica, seq, reset, changes } => WirePresenceMsg::Changes(WireChanges {
            v: VERSION,
            replica: replica.clone(),
            seq: *seq,
            reset: *reset,
            changes: changes.iter().map(|(u, on)| (u.as_str().to_owned(), *on)).collect(),
        }),
        PresenceMsg::Heartbeat { replica, seq } => {
            WirePresenceMsg::Heartbeat(WireHeartbeat { v: VERSION, replica: replica.clone(), seq: *seq })
        }
        PresenceMsg::Sync { from, of } => {
            WirePresenceMsg::Sync(WireSync { v: VERSION, from: from.clone(), of: of.clone() })
        }
        PresenceMsg::Bye { replica } => WirePresenceMsg::Bye(WireBye { v: VERSION, replica: replica.clone() }),
    };
    // Serialising strings, numbers and booleans to JSON cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// Reads (and re-validates) another replica's presence message, and says how many of its
/// users had an id this version refuses. Unlike a query, a presence message is not refused
/// whole for them: they are left out (no watcher could be told about such an id) and the rest
/// is applied. Refusing it whole would leave a gap in the sender's numbers, and the whole set
/// asked for then would be refused the same way, every second.
pub fn decode_presence(bytes: &[u8]) -> Result<(PresenceMsg, usize), DecodeError> {
    let mut skipped = 0;
    let msg = match serde_json::from_slice::<WirePresenceMsg>(bytes)? {
        WirePresenceMsg::Changes(c) => PresenceMsg::Changes {
            replica: c.replica,
            seq: c.seq,
            reset: c.reset,
            changes: c
                .changes
                .iter()
                .filter_map(|(u, on)| match UserId::parse(u) {
                    Ok(u) => Some((u, *on)),
                    Err(_) => {
                        skipped += 1;
                        None
                    }
                })
                .collect(),
        },
        WirePresenceMsg::Heartbeat(h) => PresenceMsg::Heartbeat { replica: h.replica, seq: h.seq },
        WirePresenceMsg::Sync(s) => PresenceMsg::Sync { from: s.from, of: s.of },
        WirePresenceMsg::Bye(b) => PresenceMsg::Bye { replica: b.replica },
    };
    Ok((msg, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn an_answer_with_fields_this_version_does_not_know_is_read() {
        let newer = br#"{"user_connections":[2],"group_connections":[],"topic_connections":[],"online":["u"],
            "more_online":true,"stats":{"connections":7,"published_by_target":[1,2,3,4,5],"resumes_by_outcome":[1],
            "sessions_migrated":9},"closed":0,"version":3,"replica_zone":"eu-1"}"#;
        let a = decode_answer(newer).unwrap();
        assert_eq!((a.user_connections, a.online, a.more_online), (vec![2], vec![user("u")], true));
        let stats = a.stats.unwrap();
        assert_eq!(stats.connections, 7);
        assert_eq!(stats.published_by_target, [1, 2, 3, 4], "extra kinds dropped");
        assert_eq!(stats.resumes_by_outcome, [1, 0, 0, 0], "missing kinds are 0");
    }

    #[test]
    fn an_answer_missing_fields_an_older_version_did_not_send_is_read() {
        let a = decode_answer(br#"{"user_connections":[1,0]}"#).unwrap();
        assert_eq!((a.user_connections, a.more_online, a.closed), (vec![1, 0], false, 0));
        assert!(a.stats.is_none());
        let a = decode_answer(br#"{"stats":{"connections":3}}"#).unwrap();
        assert_eq!(a.stats.map(|s| (s.connections, s.published_by_target)), Some((3, [0; 4])));
    }

    #[test]
    fn queries_with_added_or_missing_fields_are_read() {
        let q = decode_query(br#"{"Presence":{"users":["u"],"regions":["x"],"online":[null,10]}}"#).unwrap();
        let page = OnlinePage { after: None, limit: 10 };
        assert!(matches!(q, Query::Presence { users, groups, topics, online: Some(p) }
                if users == [user("u")] && groups.is_empty() && topics.is_empty() && p == page));
        let q = decode_query(br#"{"Disconnect":{"user":"u","force":true}}"#).unwrap();
        assert!(matches!(q, Query::Disconnect { user: u, reason } if u == user("u") && reason.is_empty()));
        assert!(matches!(decode_query(br#""Stats""#).unwrap(), Query::Stats));
    }

    #[test]
    fn messages_of_a_version_newer_than_this_one_are_read() {
        let v = VERSION + 1;
        let q = format!(r#"{{"Disconnect":{{"v":{v},"user":"u","reason":"bye","grace_ms":500}}}}"#);
        let q = decode_query(q.as_bytes()).unwrap();
        assert!(matches!(q, Query::Disconnect { user: u, reason } if u == user("u") && reason == "bye"));
        let q = format!(r#"{{"Presence":{{"v":{v},"groups":["g"],"online_filter":"x"}}}}"#);
        let q = decode_query(q.as_bytes()).unwrap();
        assert!(matches!(q, Query::Presence { users, groups, online: None, .. }
                if users.is_empty() && groups == [GroupId::parse("g").unwrap()]));
        let a = format!(r#"{{"v":{v},"closed":4,"closed_by_reason":{{"bye":4}}}}"#);
        assert_eq!(decode_answer(a.as_bytes()).unwrap().closed, 4);
    }

    #[test]
    fn every_message_carries_its_version() {
        let json = |bytes: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&bytes).unwrap();
        let presence = Query::Presence { users: vec![user("u")], groups: vec![], topics: vec![], online: None };
        assert_eq!(json(encode_query(&presence))["Presence"]["v"], VERSION);
        let disconnect = Query::Disconnect { user: user("u"), reason: String::new() };
        assert_eq!(json(encode_query(&disconnect))["Disconnect"]["v"], VERSION);
        assert_eq!(json(encode_answer(&Answer::default()))["v"], VERSION);
    }

    #[test]
    fn a_message_with_an_id_this_version_refuses_is_refused_whole() {
        assert!(matches!(decode_query(br#"{"Presence":{"users":["u",""]}}"#), Err(DecodeError::Id(_))));
        assert!(matches!(decode_query(br#"{"Disconnect":{"reason":"r"}}"#), Err(DecodeError::Id(_))));
        assert!(matches!(decode_answer(br#"{"online":["a\nb"]}"#), Err(DecodeError::Id(_))));
        assert!(matches!(decode_query(br#"{"Sessions":{"v":2}}"#), Err(DecodeError::Json(_))));
    }

    #[test]
    fn presence_messages_round_trip_and_tolerate_fields_added_or_missing() {
        let msgs = [
            PresenceMsg::Changes {
                replica: "r1".into(),
                seq: 7,
                reset: true,
                changes: vec![(user("a.b"), true), (user("a.b"), false)],
            },
            PresenceMsg::Heartbeat { replica: "r1".into(), seq: 9 },
            PresenceMsg::Sync { from: "r2".into(), of: None },
            PresenceMsg::Sync { from: "r2".into(), of: Some("r1".into()) },
            PresenceMsg::Bye { replica: "r1".into() },
        ];
        for m in msgs {
            assert_eq!(decode_presence(&encode_presence(&m)).unwrap(), (m, 0));
        }
        let newer = br#"{"Heartbeat":{"v":2,"replica":"r","seq":3,"zone":"eu"}}"#;
        assert_eq!(decode_presence(newer).unwrap(), (PresenceMsg::Heartbeat { replica: "r".into(), seq: 3 }, 0));
        let older = br#"{"Changes":{"replica":"r","seq":1}}"#;
        assert!(
            matches!(decode_presence(older).unwrap(), (PresenceMsg::Changes { reset: false, changes, .. }, 0) if changes.is_empty())
        );
        let (m, skipped) = decode_presence(br#"{"Changes":{"changes":[["",true],["ok",false]]}}"#).unwrap();
        assert!(matches!(m, PresenceMsg::Changes { changes, .. } if changes == [(user("ok"), false)]));
        assert_eq!(skipped, 1, "a refused id is left out, the rest applied");
        assert!(matches!(decode_presence(br#"{"Leaving":{"v":2}}"#), Err(DecodeError::Json(_))));
    }

    #[test]
    fn queries_and_answers_round_trip() {
        let queries = [
            Query::Presence {
                users: vec![user("a.b"), user("ünï *")],
                groups: vec![GroupId::parse("g >").unwrap()],
                topics: vec![Topic::parse("t").unwrap()],
                online: Some(OnlinePage { after: Some("a".into()), limit: 5 }),
            },
            Query::Stats,
            Query::Disconnect { user: user("u"), reason: "bye".into() },
            Query::Streams { subject: Subject::Topic(Topic::parse("t.*").unwrap()), limit: 50 },
        ];
        for q in queries {
            assert_eq!(decode_query(&encode_query(&q)).unwrap(), q);
        }
        let stats = Stats { connections: 5, published_by_target: [1, 2, 3, 4], ..Default::default() };
        let a = Answer { closed: 2, online: vec![user("x")], stats: Some(stats), ..Default::default() };
        assert_eq!(decode_answer(&encode_answer(&a)).unwrap(), a);
        let stream = StreamView {
            conn: 9,
            user: user("u"),
            groups: vec![GroupId::parse("g").unwrap()],
            topics: vec![],
            age: std::time::Duration::from_millis(1500),
            meta: StreamMeta { peer: "10.0.0.7:40000".parse().ok(), protocol: Protocol::Http2 },
            positions: Positions { queued_frames: 1, queued_bytes: 80, from_seq: 3, queued_seq: 9, sent_seq: 8 },
        };
        let a = Answer { streams: vec![stream], streams_total: 1, replica: "r1".into(), ..Default::default() };
        assert_eq!(decode_answer(&encode_answer(&a)).unwrap(), a);
    }

    #[test]
    fn a_streams_query_of_an_unknown_subject_kind_is_not_understood() {
        assert!(matches!(decode_query(br#"{"Streams":{"kind":"session","id":"x"}}"#), Err(DecodeError::Json(_))));
        assert!(matches!(decode_query(br#"{"Streams":{"kind":"user","id":""}}"#), Err(DecodeError::Id(_))));
    }
}
