//! Cluster-wide Presence, Stats and Disconnect: scatter/gather over core NATS request-reply.
//!
//! Every replica answers queries on one control subject with what its own router knows, and
//! announces itself on a hello subject every second, so that a querying replica knows how
//! many answers to wait for. It waits until every replica seen in the last few seconds has
//! answered or a bounded time has passed, and says `partial` if some did not. With the
//! memory backplane the same queries are answered by this process alone.
//!
//! **Compatibility:** replicas of different versions meet during a rolling upgrade, so the JSON
//! exchanged here tolerates fields added or removed: unknown fields are ignored, missing ones
//! take their default (`#[serde(default)]`, never `deny_unknown_fields`), and per-kind counters
//! travel as lists of any length. A field may be added with a default meaning "not known"; it
//! must never be renamed or change type. A query kind an older replica does not know gets no
//! answer from it (the result is then honestly `partial`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::Client;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    domain::{GroupId, Topic, UserId},
    router::{Router, Stats},
};

/// A question every replica answers about its own connections.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Query {
    Presence {
        #[serde(default)]
        users: Vec<String>,
        #[serde(default)]
        groups: Vec<String>,
        #[serde(default)]
        topics: Vec<String>,
        /// `(after, limit)`: a page of online users.
        #[serde(default)]
        online: Option<(Option<String>, usize)>,
    },
    Stats,
    Disconnect {
        user: String,
        #[serde(default)]
        reason: String,
    },
}

/// One replica's answer.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct Answer {
    pub user_connections: Vec<u64>,
    pub group_connections: Vec<u64>,
    pub topic_connections: Vec<u64>,
    pub online: Vec<String>,
    pub more_online: bool,
    #[serde(with = "wire_stats")]
    pub stats: Option<Stats>,
    pub closed: u64,
}

/// `Stats` as replicas exchange it: every field optional, per-kind counters as lists (a newer
/// replica may count more kinds; extra entries are dropped, missing ones are 0).
mod wire_stats {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::router::Stats;

    #[derive(Serialize, Deserialize, Default)]
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

    fn array<const N: usize>(v: &[u64]) -> [u64; N] {
        let mut a = [0; N];
        for (slot, x) in a.iter_mut().zip(v) {
            *slot = *x;
        }
        a
    }

    pub fn serialize<S: Serializer>(stats: &Option<Stats>, s: S) -> Result<S::Ok, S::Error> {
        stats
            .as_ref()
            .map(|st| WireStats {
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
            })
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Stats>, D::Error> {
        Ok(Option::<WireStats>::deserialize(d)?.map(|w| Stats {
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
        }))
    }
}

/// Answers `query` from this process's router. Ids were validated by the asking replica;
/// ones that do not parse (a newer peer's rules) count as absent.
pub fn answer(router: &Router, query: &Query) -> Answer {
    match query {
        Query::Presence { users, groups, topics, online } => {
            let users: Vec<UserId> = users.iter().filter_map(|u| UserId::parse(u).ok()).collect();
            let groups: Vec<GroupId> = groups.iter().filter_map(|g| GroupId::parse(g).ok()).collect();
            let topics: Vec<Topic> = topics.iter().filter_map(|t| Topic::parse(t).ok()).collect();
            let (online, more_online) = match online {
                Some((after, limit)) => {
                    let (ids, more) = router.online_users(after.as_deref(), *limit);
                    (ids.iter().map(ToString::to_string).collect(), more)
                }
                None => (Vec::new(), false),
            };
            Answer {
                user_connections: router.user_presence(&users).iter().map(|p| p.connections).collect(),
                group_connections: router.group_connections(&groups),
                topic_connections: router.topic_connections(&topics),
                online,
                more_online,
                ..Default::default()
            }
        }
        Query::Stats => Answer { stats: Some(router.stats()), ..Default::default() },
        Query::Disconnect { user, reason } => {
            Answer { closed: UserId::parse(user).map_or(0, |u| router.disconnect(&u, reason)), ..Default::default() }
        }
    }
}

/// The answers gathered for one query.
pub struct Gathered {
    pub answers: Vec<Answer>,
    /// Some replica known to be alive did not answer in time.
    pub partial: bool,
}

/// How long a replica counts as alive after its last hello.
const PEER_TTL: Duration = Duration::from_secs(3);
const HELLO_EVERY: Duration = Duration::from_secs(1);

pub struct Cluster {
    client: Client,
    id: String,
    query_subject: String,
    hello_subject: String,
    wait: Duration,
    peers: Mutex<HashMap<String, Instant>>,
}

impl Cluster {
    pub fn new(client: Client, prefix: &str, wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            client,
            id: format!("{:016x}", fastrand::u64(..)),
            query_subject: format!("{prefix}.ctl.query"),
            hello_subject: format!("{prefix}.ctl.hello"),
            wait,
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Starts answering queries and announcing this replica: three tasks on `tracker`, ending
    /// when `stop` is cancelled.
    pub async fn start(
        self: &Arc<Self>,
        router: Arc<Router>,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), async_nats::Error> {
        let mut queries = self.client.subscribe(self.query_subject.clone()).await?;
        let client = self.client.clone();
        let token = stop.clone();
        tracker.spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = token.cancelled() => break,
                    msg = queries.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                };
                let Some(reply) = msg.reply else { continue };
                let query = match serde_json::from_slice::<Query>(&msg.payload) {
                    Ok(q) => q,
                    Err(e) => {
                        // A query kind from a newer replica: no answer (it reports `partial`).
                        tracing::debug!(error = %e, "cluster query not understood; not answered");
                        continue;
                    }
                };
                let a = answer(&router, &query);
                match serde_json::to_vec(&a) {
                    Ok(bytes) => {
                        if let Err(e) = client.publish(reply, bytes.into()).await {
                            tracing::debug!(error = %e, "cluster answer not sent");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cluster answer not encodable"),
                }
            }
            let _ = queries.unsubscribe().await;
        });
        let mut hellos = self.client.subscribe(self.hello_subject.clone()).await?;
        let this = self.clone();
        let token = stop.clone();
        tracker.spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = token.cancelled() => break,
                    msg = hellos.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                };
                let id = String::from_utf8_lossy(&msg.payload).into_owned();
                this.peers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Instant::now());
            }
            let _ = hellos.unsubscribe().await;
        });
        let this = self.clone();
        let token = stop.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(HELLO_EVERY);
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let _ = this.client.publish(this.hello_subject.clone(), this.id.clone().into()).await;
            }
        });
        Ok(())
    }

    /// Replicas heard from recently (this one included).
    fn alive(&self) -> usize {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|_, seen| seen.elapsed() < PEER_TTL);
        peers.insert(self.id.clone(), Instant::now());
        peers.len()
    }

    /// Asks every replica; waits for as many answers as there are live replicas, at most the
    /// bounded wait.
    pub async fn gather(&self, query: &Query) -> Result<Gathered, async_nats::Error> {
        // While disconnected, the client would buffer the request until it reconnects: do not
        // wait for that.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err("not connected to NATS".into());
        }
        tokio::time::timeout(self.wait * 2, self.scatter(query)).await.map_err(|_| "cluster query timed out")?
    }

    async fn scatter(&self, query: &Query) -> Result<Gathered, async_nats::Error> {
        let expected = self.alive();
        let inbox = self.client.new_inbox();
        let mut answers_sub = self.client.subscribe(inbox.clone()).await?;
        self.client.publish_with_reply(self.query_subject.clone(), inbox, serde_json::to_vec(query)?.into()).await?;
        self.client.flush().await?;
        let mut answers = Vec::new();
        let _ = tokio::time::timeout(self.wait, async {
            while answers.len() < expected {
                match answers_sub.next().await {
                    Some(msg) => {
                        if let Ok(a) = serde_json::from_slice::<Answer>(&msg.payload) {
                            answers.push(a);
                        }
                    }
                    None => break,
                }
            }
        })
        .await;
        let partial = answers.len() < expected;
        Ok(Gathered { answers, partial })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_fields_this_version_does_not_know_is_read() {
        let newer = r#"{"user_connections":[2],"group_connections":[],"topic_connections":[],"online":["u"],
            "more_online":true,"stats":{"connections":7,"published_by_target":[1,2,3,4,5],"resumes_by_outcome":[1],
            "sessions_migrated":9},"closed":0,"version":3,"replica_zone":"eu-1"}"#;
        let a: Answer = serde_json::from_str(newer).unwrap();
        assert_eq!((a.user_connections, a.online, a.more_online), (vec![2], vec!["u".to_owned()], true));
        let stats = a.stats.unwrap();
        assert_eq!(stats.connections, 7);
        assert_eq!(stats.published_by_target, [1, 2, 3, 4], "extra kinds dropped");
        assert_eq!(stats.resumes_by_outcome, [1, 0, 0, 0], "missing kinds are 0");
    }

    #[test]
    fn an_answer_missing_fields_an_older_version_did_not_send_is_read() {
        let a: Answer = serde_json::from_str(r#"{"user_connections":[1,0]}"#).unwrap();
        assert_eq!((a.user_connections, a.more_online, a.closed), (vec![1, 0], false, 0));
        assert!(a.stats.is_none());
        let a: Answer = serde_json::from_str(r#"{"stats":{"connections":3}}"#).unwrap();
        assert_eq!(a.stats.map(|s| (s.connections, s.published_by_target)), Some((3, [0; 4])));
    }

    #[test]
    fn queries_with_added_or_missing_fields_are_read() {
        let q: Query =
            serde_json::from_str(r#"{"Presence":{"users":["u"],"regions":["x"],"online":[null,10]}}"#).unwrap();
        assert!(matches!(q, Query::Presence { users, groups, topics, online: Some((None, 10)) }
                if users == ["u"] && groups.is_empty() && topics.is_empty()));
        let q: Query = serde_json::from_str(r#"{"Disconnect":{"user":"u","force":true}}"#).unwrap();
        assert!(matches!(q, Query::Disconnect { user, reason } if user == "u" && reason.is_empty()));
    }

    #[test]
    fn answers_round_trip() {
        let stats = Stats { connections: 5, published_by_target: [1, 2, 3, 4], ..Default::default() };
        let a = Answer { closed: 2, stats: Some(stats.clone()), ..Default::default() };
        let back: Answer = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!((back.closed, back.stats), (2, Some(stats)));
    }
}
