//! Cluster-wide Presence, Stats and Disconnect: scatter/gather over core NATS request-reply.
//!
//! Every replica answers queries on one control subject with what its own router knows, and
//! announces itself on a hello subject every second, so that a querying replica knows how
//! many answers to wait for. It waits until every replica seen in the last few seconds has
//! answered or a bounded time has passed, and says `partial` if some did not. With the
//! memory backplane the same queries are answered by this process alone.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::Client;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{
    domain::{GroupId, Topic, UserId},
    router::{Router, Stats},
};

/// A question every replica answers about its own connections.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Query {
    Presence {
        users: Vec<String>,
        groups: Vec<String>,
        topics: Vec<String>,
        /// `(after, limit)`: a page of online users.
        online: Option<(Option<String>, usize)>,
    },
    Stats,
    Disconnect {
        user: String,
        reason: String,
    },
}

/// One replica's answer.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Answer {
    pub user_connections: Vec<u64>,
    pub group_connections: Vec<u64>,
    pub topic_connections: Vec<u64>,
    pub online: Vec<String>,
    pub more_online: bool,
    pub stats: Option<Stats>,
    pub closed: u64,
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

    /// Starts answering queries and announcing this replica (tasks live as long as the process).
    pub async fn start(self: &Arc<Self>, router: Arc<Router>) -> Result<(), async_nats::Error> {
        let mut queries = self.client.subscribe(self.query_subject.clone()).await?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(msg) = queries.next().await {
                let (Some(reply), Ok(query)) = (msg.reply, serde_json::from_slice::<Query>(&msg.payload)) else {
                    continue;
                };
                let a = answer(&router, &query);
                let _ = client.publish(reply, serde_json::to_vec(&a).unwrap_or_default().into()).await;
            }
        });
        let mut hellos = self.client.subscribe(self.hello_subject.clone()).await?;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = hellos.next().await {
                let id = String::from_utf8_lossy(&msg.payload).into_owned();
                this.peers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Instant::now());
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HELLO_EVERY);
            loop {
                tick.tick().await;
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
