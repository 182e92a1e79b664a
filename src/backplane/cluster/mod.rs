//! Cluster-wide Presence, Stats, Disconnect and (for the admin console) a subject's streams:
//! scatter/gather over core NATS request-reply.
//!
//! Every replica answers queries on one control subject with what its own router knows, and
//! announces itself on a hello subject every second, so that a querying replica knows how
//! many answers to wait for. It waits until every replica seen in the last few seconds has
//! answered or a bounded time has passed, and says `partial` if some did not. With the
//! memory backplane the same queries are answered by this process alone.
//!
//! `Query` and `Answer` carry domain values, parsed once at the gRPC edge; `wire.rs` is their
//! versioned form between replicas (and its compatibility rules), the one place they become
//! text and are validated again on arrival.

mod presence;
pub mod wire;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::Client;
use futures_util::StreamExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    domain::{GroupId, Topic, UserId},
    router::{Partitions, Stats, StreamView, Subject},
};

/// A question every replica answers about its own connections.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// Connections per user, group and topic (each list in the order asked), and optionally a
    /// page of the online users.
    Presence {
        users: Vec<UserId>,
        groups: Vec<GroupId>,
        topics: Vec<Topic>,
        online: Option<OnlinePage>,
    },
    Stats,
    /// Closes every connection of `user`, telling it `reason`.
    Disconnect {
        user: UserId,
        reason: String,
    },
    /// The open streams of a user, group or topic (at most `limit` per replica), for the admin
    /// console's inspector.
    Streams {
        subject: Subject,
        limit: usize,
    },
}

/// A page of online users, sorted by id: those after `after` (exclusive), at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlinePage {
    pub after: Option<String>,
    pub limit: usize,
}

/// One replica's answer. A field the query did not ask about is empty (or 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// Connections of each user of a Presence query, in its order.
    pub user_connections: Vec<u64>,
    pub group_connections: Vec<u64>,
    pub topic_connections: Vec<u64>,
    /// The page of online users asked for, sorted, and whether more remain after it.
    pub online: Vec<UserId>,
    pub more_online: bool,
    pub stats: Option<Stats>,
    /// Connections a Disconnect closed.
    pub closed: u64,
    /// The streams a `Streams` query asked for (at most its limit) and how many there are.
    pub streams: Vec<StreamView>,
    pub streams_total: u64,
    /// The answering replica's id (`Cluster::id`); empty when answered in process.
    pub replica: String,
}

/// Answers `query` from this process's routers (one per partition; a user's connections are
/// all in its user's partition, a group's or topic's in any).
pub fn answer(parts: &Partitions, query: &Query) -> Answer {
    match query {
        Query::Presence { users, groups, topics, online } => {
            let (online, more_online) = match online {
                Some(page) => online_page(parts, page),
                None => (Vec::new(), false),
            };
            let per_router: Vec<Vec<u64>> =
                parts.all().iter().map(|r| r.user_presence(users).iter().map(|p| p.connections).collect()).collect();
            let user_connections = users
                .iter()
                .enumerate()
                .map(|(i, u)| per_router[parts.index_of(u)].get(i).copied().unwrap_or(0))
                .collect();
            Answer {
                user_connections,
                group_connections: summed(parts.all().iter().map(|r| r.group_connections(groups))),
                topic_connections: summed(parts.all().iter().map(|r| r.topic_connections(topics))),
                online,
                more_online,
                ..Default::default()
            }
        }
        Query::Stats => Answer { stats: Some(parts.stats()), ..Default::default() },
        Query::Disconnect { user, reason } => {
            Answer { closed: parts.of_user(user).disconnect(user, reason), ..Default::default() }
        }
        Query::Streams { subject, limit } => {
            let routers = match subject {
                Subject::User(user) => std::slice::from_ref(parts.of_user(user)),
                _ => parts.all(),
            };
            let (mut streams, mut total) = (Vec::new(), 0u64);
            for r in routers {
                let (more, n) = r.streams(subject, limit.saturating_sub(streams.len()));
                streams.extend(more);
                total += n as u64;
            }
            Answer { streams, streams_total: total, ..Default::default() }
        }
    }
}

/// Element-wise sums of equally long lists of counts.
fn summed(lists: impl Iterator<Item = Vec<u64>>) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for list in lists {
        if out.is_empty() {
            out = list;
        } else {
            for (a, b) in out.iter_mut().zip(list) {
                *a += b;
            }
        }
    }
    out
}

/// A page of this replica's online users over its partitions (each user is in one): every
/// partition's page, merged in order and cut to the limit.
fn online_page(parts: &Partitions, page: &OnlinePage) -> (Vec<UserId>, bool) {
    let mut all = Vec::new();
    let mut more = false;
    for r in parts.all() {
        let (users, m) = r.online_users(page.after.as_deref(), page.limit);
        more |= m;
        all.extend(users);
    }
    all.sort_unstable();
    all.dedup();
    if all.len() > page.limit {
        all.truncate(page.limit);
        more = true;
    }
    (all, more)
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
/// A hello is the replica's id, then what it can do, space-separated. This word says that it
/// receives a topic's events from the topic's own subject (interest delivery follows topics,
/// and a replica reading the whole stream reads every subject). Older replicas send the id
/// alone, and read a newer hello whole as an id: it still counts as one replica there.
const FOLLOWS_TOPICS: &str = "topics";

/// The id and whether the replica follows topics, from a hello.
fn parse_hello(payload: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(payload);
    let mut words = text.split(' ');
    let id = words.next().unwrap_or_default().to_owned();
    (id, words.any(|w| w == FOLLOWS_TOPICS))
}

pub struct Cluster {
    client: Client,
    id: String,
    query_subject: String,
    hello_subject: String,
    presence_subject: String,
    wait: Duration,
    /// Replicas heard from, when last, and whether they follow topics.
    peers: Mutex<HashMap<String, (Instant, bool)>>,
    /// Since when hellos are listened to: before a whole `PEER_TTL` of them, an older replica
    /// may be there unheard.
    listening_since: std::sync::OnceLock<Instant>,
}

impl Cluster {
    pub fn new(client: Client, prefix: &str, wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            client,
            id: format!("{:016x}", fastrand::u64(..)),
            query_subject: format!("{prefix}.ctl.query"),
            hello_subject: format!("{prefix}.ctl.hello"),
            presence_subject: format!("{prefix}.ctl.presence"),
            wait,
            peers: Mutex::new(HashMap::new()),
            listening_since: std::sync::OnceLock::new(),
        })
    }

    /// Starts answering queries and announcing this replica: three tasks on `tracker`, ending
    /// when `stop` is cancelled.
    pub async fn start(
        self: &Arc<Self>,
        parts: Arc<Partitions>,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), async_nats::Error> {
        let mut queries = self.client.subscribe(self.query_subject.clone()).await?;
        let client = self.client.clone();
        let id = self.id.clone();
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
                let query = match wire::decode_query(&msg.payload) {
                    Ok(q) => q,
                    Err(e @ wire::DecodeError::Json(_)) => {
                        // A query kind from a newer replica: no answer (it reports `partial`).
                        tracing::debug!(error = %e, "cluster query not understood; not answered");
                        continue;
                    }
                    Err(e @ wire::DecodeError::Id(_)) => {
                        // Validated by the asker under its rules, refused under ours: no answer
                        // rather than counts for other ids than were asked.
                        tracing::warn!(error = %e, "cluster query refused; not answered");
                        continue;
                    }
                };
                let mut answer = answer(&parts, &query);
                answer.replica.clone_from(&id);
                let bytes = wire::encode_answer(&answer);
                if let Err(e) = client.publish(reply, bytes.into()).await {
                    tracing::debug!(error = %e, "cluster answer not sent");
                }
            }
            let _ = queries.unsubscribe().await;
        });
        let mut hellos = self.client.subscribe(self.hello_subject.clone()).await?;
        let _ = self.listening_since.set(Instant::now());
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
                let (id, topics) = parse_hello(&msg.payload);
                this.peers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (Instant::now(), topics));
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
                let hello = format!("{} {FOLLOWS_TOPICS}", this.id);
                let _ = this.client.publish(this.hello_subject.clone(), hello.into()).await;
            }
        });
        Ok(())
    }

    /// This replica's id in the cluster (random per process): in presence messages and in
    /// the answers of cluster queries.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts the presence link (`presence.rs`) on `<subject>.ctl.presence`.
    pub async fn start_presence(
        &self,
        hub: Arc<crate::presence::Hub>,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<crate::presence::Outbox, async_nats::Error> {
        presence::start(self.client.clone(), self.presence_subject.clone(), hub, stop, tracker).await
    }

    /// Replicas heard from recently (this one included).
    fn alive(&self) -> usize {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|_, (seen, _)| seen.elapsed() < PEER_TTL);
        peers.insert(self.id.clone(), (Instant::now(), true));
        peers.len()
    }

    /// Whether every replica alive follows topics (hellos heard for at least `PEER_TTL`, and
    /// none of them from a replica without `FOLLOWS_TOPICS`): then a topic's events may go to
    /// its own subject, which only replicas with a stream on the topic receive.
    pub fn everyone_follows_topics(&self) -> bool {
        if self.listening_since.get().is_none_or(|t| t.elapsed() < PEER_TTL) {
            return false;
        }
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.values().all(|(seen, topics)| *topics || seen.elapsed() >= PEER_TTL)
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
        self.client.publish_with_reply(self.query_subject.clone(), inbox, wire::encode_query(query).into()).await?;
        self.client.flush().await?;
        let mut answers = Vec::new();
        let _ = tokio::time::timeout(self.wait, async {
            while answers.len() < expected {
                match answers_sub.next().await {
                    Some(msg) => match wire::decode_answer(&msg.payload) {
                        Ok(a) => answers.push(a),
                        // Not counted: the result is `partial` unless another replica answers.
                        Err(e) => tracing::warn!(error = %e, "cluster answer refused; not counted"),
                    },
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
    fn a_hello_says_the_id_and_whether_the_replica_follows_topics() {
        assert_eq!(parse_hello(b"0123456789abcdef topics"), ("0123456789abcdef".to_owned(), true));
        // An older replica: the id alone.
        assert_eq!(parse_hello(b"0123456789abcdef"), ("0123456789abcdef".to_owned(), false));
        // A newer one with more words, in any order.
        assert_eq!(parse_hello(b"0123456789abcdef zones topics"), ("0123456789abcdef".to_owned(), true));
        assert_eq!(parse_hello(b""), (String::new(), false));
    }
}
