//! The publishers: paced (or unpaced, for ingest) loops that number every event per stream
//! and stamp it with its send time, over ssegate's gRPC API (unary or `PublishStream`) or
//! over Nchan's / the baseline's HTTP `POST /pub/<channel>`.
//!
//! Each publisher task owns a disjoint share of the streams and sends to each in order, so the
//! per-stream sequence numbers subscribers check are never reordered by our own concurrency.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ssegate::grpc::pb::{self, publish_stream_request::Target as StreamTarget, publisher_client::PublisherClient};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;

use crate::{
    args::{Api, Rate},
    httppub::HttpPublisher,
    plan::{self, Kind, Layout, Target},
};

/// What to publish, how fast and for how long.
#[derive(Clone, Debug)]
pub struct Plan {
    pub layout: Layout,
    pub kinds: Vec<Kind>,
    pub rate: Rate,
    pub concurrency: u32,
    pub duration: Duration,
    pub max_events: u64,
    pub payload_bytes: usize,
    pub api: Api,
    pub window: u32,
    pub grpc_addr: SocketAddr,
    pub pub_addr: SocketAddr,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// Events accepted per stream (the highest sequence number sent to it).
    pub published: Vec<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: String,
    /// From the first send to the last answer.
    pub elapsed: Duration,
}

/// One task's streams, grouped by kind; it cycles over the kinds, and within a kind over its
/// streams.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cycler {
    lists: Vec<Vec<u32>>,
    kind: usize,
    pos: Vec<usize>,
}

impl Cycler {
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    pub fn next_stream(&mut self) -> u32 {
        let k = self.kind;
        self.kind = (self.kind + 1) % self.lists.len();
        let s = self.lists[k][self.pos[k]];
        self.pos[k] = (self.pos[k] + 1) % self.lists[k].len();
        s
    }
}

/// Splits the streams of `kinds` over `tasks` publishers (stream `s` goes to task `s % tasks`).
pub fn split(layout: &Layout, kinds: &[Kind], tasks: u32) -> Vec<Cycler> {
    (0..tasks)
        .map(|t| {
            let lists: Vec<Vec<u32>> = kinds
                .iter()
                .map(|k| layout.streams_of(*k).filter(|s| s % tasks == t).collect::<Vec<_>>())
                .filter(|l| !l.is_empty())
                .collect();
            Cycler { pos: vec![0; lists.len()], lists, kind: 0 }
        })
        .filter(|c| !c.is_empty())
        .collect()
}

/// When event `n` of a task publishing `rate` events per second is due, after its start.
pub fn due(n: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(n as f64 / rate)
}

/// What one task did.
#[derive(Default)]
struct TaskOutcome {
    seqs: HashMap<u32, u64>,
    ok: u64,
    errors: u64,
    first_error: String,
}

impl TaskOutcome {
    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_empty() {
            self.first_error = e;
        }
    }
}

/// How long past the end of the run a publisher waits for the answers still due: a server
/// that stops answering costs the run this much, not a hang.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// A task's pacing and bounds.
#[derive(Clone, Copy)]
struct Pace {
    start: Instant,
    deadline: Instant,
    /// Events per second for this task; `None`: as fast as possible.
    rate: Option<f64>,
    max_events: u64,
}

impl Pace {
    /// Waits until event `n` is due; false when the run is over.
    async fn wait(&self, n: u64) -> bool {
        if n >= self.max_events || Instant::now() >= self.deadline {
            return false;
        }
        if let Some(rate) = self.rate {
            let at = self.start + due(n, rate);
            if at >= self.deadline {
                return false;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        true
    }
}

pub async fn run(plan: &Plan) -> Result<Outcome, String> {
    let cyclers = split(&plan.layout, &plan.kinds, plan.concurrency);
    let tasks = cyclers.len().max(1) as u64;
    let client = match plan.layout.target {
        Target::Ssegate => Some(connect(plan.grpc_addr).await?),
        _ => None,
    };
    let start = Instant::now();
    let pace = Pace {
        start,
        deadline: start + plan.duration,
        rate: match plan.rate {
            Rate::PerSecond(r) => Some(f64::from(r) / tasks as f64),
            Rate::Max => None,
        },
        max_events: plan.max_events / tasks,
    };
    let mut handles = Vec::new();
    for cycler in cyclers {
        let plan = plan.clone();
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            match (client, plan.api) {
                (Some(c), Api::Unary) => unary_task(c, &plan, cycler, pace).await,
                (Some(c), Api::Stream) => stream_task(c, &plan, cycler, pace).await,
                (None, _) => http_task(&plan, cycler, pace).await,
            }
        }));
    }
    let mut out = Outcome { published: vec![0; plan.layout.streams() as usize], ..Outcome::default() };
    for h in handles {
        let t = h.await.map_err(|e| format!("publisher task failed: {e}"))?;
        for (s, seq) in t.seqs {
            out.published[s as usize] = seq;
        }
        out.ok += t.ok;
        out.errors += t.errors;
        if out.first_error.is_empty() {
            out.first_error = t.first_error;
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

async fn connect(addr: SocketAddr) -> Result<PublisherClient<Channel>, String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("gRPC connect to {addr}: {e}"))?;
    Ok(PublisherClient::new(channel).max_decoding_message_size(16 << 20))
}

fn event(data: String) -> Option<pb::Event> {
    Some(pb::Event { data, ..Default::default() })
}

/// The next event of a task: its stream, sequence number and data.
fn next_event(plan: &Plan, cycler: &mut Cycler, seqs: &HashMap<u32, u64>) -> (u32, u64, String) {
    let s = cycler.next_stream();
    let seq = seqs.get(&s).copied().unwrap_or(0) + 1;
    (s, seq, plan::payload(s, seq, plan::now_ns(), plan.payload_bytes))
}

async fn unary_task(mut client: PublisherClient<Channel>, plan: &Plan, mut cycler: Cycler, pace: Pace) -> TaskOutcome {
    let mut t = TaskOutcome::default();
    let mut n = 0;
    while pace.wait(n).await {
        n += 1;
        let (s, seq, data) = next_event(plan, &mut cycler, &t.seqs);
        let name = plan.layout.name(s);
        let call = async {
            match plan.layout.kind_of(s).0 {
                Kind::User => {
                    client
                        .publish(pb::PublishRequest { user_ids: vec![name], event: event(data), ..Default::default() })
                        .await
                }
                Kind::Group => {
                    client
                        .publish_group(pb::PublishGroupRequest {
                            group: name,
                            event: event(data),
                            ..Default::default()
                        })
                        .await
                }
                Kind::Topic => {
                    client
                        .publish_topic(pb::PublishTopicRequest {
                            topic: name,
                            event: event(data),
                            ..Default::default()
                        })
                        .await
                }
                Kind::Broadcast => {
                    client.broadcast(pb::BroadcastRequest { event: event(data), ..Default::default() }).await
                }
            }
        };
        let Ok(r) = tokio::time::timeout_at((pace.deadline + ANSWER_GRACE).into(), call).await else {
            t.fail(format!("no answer within {ANSWER_GRACE:?} past the end of the run"));
            break;
        };
        match r {
            Ok(_) => {
                t.seqs.insert(s, seq);
                t.ok += 1;
            }
            Err(status) => t.fail(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    t
}

async fn stream_task(mut client: PublisherClient<Channel>, plan: &Plan, mut cycler: Cycler, pace: Pace) -> TaskOutcome {
    let mut t = TaskOutcome::default();
    let (tx, rx) = mpsc::channel(plan.window as usize);
    let window = Arc::new(Semaphore::new(plan.window as usize));
    let mut answers = match client.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            t.fail(format!("PublishStream: {:?}: {}", status.code(), status.message()));
            return t;
        }
    };
    let reader_window = window.clone();
    let reader = tokio::spawn(async move {
        let (mut ok, mut errors, mut first_error) = (0u64, 0u64, String::new());
        loop {
            match answers.message().await {
                Ok(Some(a)) => {
                    reader_window.add_permits(1);
                    if a.code == 0 {
                        ok += 1;
                    } else {
                        errors += 1;
                        if first_error.is_empty() {
                            first_error = format!("item {}: code {}: {}", a.index, a.code, a.message);
                        }
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    errors += 1;
                    first_error = format!("PublishStream ended: {:?}: {}", status.code(), status.message());
                    break;
                }
            }
        }
        (ok, errors, first_error)
    });
    let mut n = 0;
    while pace.wait(n).await {
        n += 1;
        // A server that stops answering holds the window closed: stop at the end of the run.
        let Ok(Ok(permit)) = tokio::time::timeout_at(pace.deadline.into(), window.acquire()).await else { break };
        permit.forget();
        let (s, seq, data) = next_event(plan, &mut cycler, &t.seqs);
        let name = plan.layout.name(s);
        let target = match plan.layout.kind_of(s).0 {
            Kind::User => StreamTarget::Users(pb::UserTarget { user_ids: vec![name] }),
            Kind::Group => StreamTarget::Group(name),
            Kind::Topic => StreamTarget::Topic(name),
            Kind::Broadcast => StreamTarget::Broadcast(pb::BroadcastTarget {}),
        };
        if tx
            .send(pb::PublishStreamRequest { target: Some(target), event: event(data), ..Default::default() })
            .await
            .is_err()
        {
            t.fail("PublishStream closed by the server".into());
            break;
        }
        t.seqs.insert(s, seq);
    }
    drop(tx);
    match tokio::time::timeout_at((pace.deadline.max(Instant::now()) + ANSWER_GRACE).into(), reader).await {
        Ok(Ok((ok, errors, first_error))) => {
            t.ok += ok;
            t.errors += errors;
            if t.first_error.is_empty() {
                t.first_error = first_error;
            }
        }
        _ => t.fail(format!("PublishStream answers did not finish within {ANSWER_GRACE:?} past the end of the run")),
    }
    t
}

async fn http_task(plan: &Plan, mut cycler: Cycler, pace: Pace) -> TaskOutcome {
    let mut t = TaskOutcome::default();
    let mut http = HttpPublisher::new(plan.pub_addr);
    let mut n = 0;
    while pace.wait(n).await {
        n += 1;
        let (s, seq, data) = next_event(plan, &mut cycler, &t.seqs);
        match http.post(&format!("/pub/{}", plan.layout.name(s)), data.as_bytes()).await {
            Ok(status) if (200..300).contains(&status) => {
                t.seqs.insert(s, seq);
                t.ok += 1;
            }
            Ok(status) => t.fail(format!("POST answered HTTP {status}")),
            Err(e) => t.fail(e),
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_split_disjointly_and_completely() {
        let layout = Layout { target: Target::Ssegate, users: 10, groups: 0, topics: 2, first_user: 0 };
        let cyclers = split(&layout, &[Kind::User, Kind::Topic, Kind::Broadcast], 3);
        let mut all: Vec<u32> = cyclers.iter().flat_map(|c| c.lists.iter().flatten().copied()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..13).collect::<Vec<_>>());
        let one = split(&layout, &[Kind::Broadcast], 4);
        assert_eq!(one.len(), 1, "tasks with nothing to publish are left out");
    }

    #[test]
    fn cycler_alternates_kinds_then_streams() {
        let layout = Layout { target: Target::Ssegate, users: 3, groups: 0, topics: 1, first_user: 0 };
        let mut c = split(&layout, &[Kind::User, Kind::Topic], 1).remove(0);
        let order: Vec<u32> = (0..8).map(|_| c.next_stream()).collect();
        assert_eq!(order, [0, 3, 1, 3, 2, 3, 0, 3]);
    }

    #[test]
    fn pacing_schedule() {
        assert_eq!(due(0, 1000.0), Duration::ZERO);
        assert_eq!(due(500, 1000.0), Duration::from_millis(500));
        assert_eq!(due(3, 2.0), Duration::from_millis(1500));
    }
}
