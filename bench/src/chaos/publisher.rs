//! The chaos publishers: a paced mix of `Publish`, `PublishGroup`, `PublishTopic`, `Broadcast`
//! and `PublishStream`, every event with an idempotency key, retried as the API tells callers
//! to (`UNAVAILABLE`: another replica) with the same key, a bounded number of times.
//!
//! - A ticker numbers publishes `n = 1, 2, …` and fixes each one's target, data and key up
//!   front; a share goes to the `PublishStream` tasks (when their queue is full, it goes unary
//!   instead, so a stalled stream never slows the ticker), the rest to one task per publish.
//! - An attempt that fails with a retryable code, or whose stream broke before it was
//!   answered, is retried on the next replica after a capped exponential backoff.
//! - The ledger records, per `n`, the event id of the first OK answer or none: only those
//!   count as acknowledged.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ssegate::grpc::pb::{self, publish_stream_request::Target as StreamTarget, publisher_client::PublisherClient};
use tokio::{
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tonic::{Code, transport::Channel};

use super::layout::{self, Layout, Pos, Record, Target};
use crate::plan::now_ns;

/// Attempts per publish (the first one included).
pub const MAX_ATTEMPTS: u32 = 10;
/// Longest wait for one unary answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// Items sent on a `PublishStream` before waiting for their answers, and the wait.
const STREAM_BATCH: usize = 8;
const STREAM_BATCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Unary publishes in flight at most (retrying ones included).
const MAX_IN_FLIGHT: usize = 2000;

#[derive(Clone, Debug)]
pub struct Plan {
    pub layout: Layout,
    pub rate: u32,
    /// Every `broadcast_every`-th publish is a broadcast (the recovery probes).
    pub broadcast_every: u64,
    /// Per mille of publishes sent over `PublishStream`.
    pub stream_per_mille: u64,
    pub stream_tasks: usize,
    pub seed: u64,
}

#[derive(Default, Debug)]
pub struct Stats {
    pub attempts: u64,
    pub retried: u64,
    pub ok: u64,
    pub unacked: u64,
    pub rejected: u64,
    pub via_stream: u64,
    pub stream_fallback_unary: u64,
    /// Failed attempts by code (or transport error).
    pub failures: BTreeMap<String, u64>,
    pub first_rejection: String,
}

/// What the publishers share: one lazily connected client per replica, the ledger, counts.
pub struct Shared {
    pub clients: Vec<PublisherClient<Channel>>,
    pub ledger: Mutex<Vec<Record>>,
    pub stats: Mutex<Stats>,
}

impl Shared {
    pub fn new(grpc: &[SocketAddr]) -> Result<Arc<Self>, String> {
        let clients = grpc
            .iter()
            .map(|a| {
                let ch = Channel::from_shared(format!("http://{a}"))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(CALL_TIMEOUT)
                    .tcp_nodelay(true)
                    .connect_lazy();
                Ok(PublisherClient::new(ch))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Arc::new(Shared { clients, ledger: Mutex::new(vec![]), stats: Mutex::new(Stats::default()) }))
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn records(&self) -> std::sync::MutexGuard<'_, Vec<Record>> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed_attempt(&self, what: String) {
        *self.stats().failures.entry(what).or_default() += 1;
    }

    /// Records the outcome of publish `n` (its ledger slot is `n - 1`).
    fn settle(&self, n: u64, outcome: Result<Vec<Pos>, ()>, attempts: u32) {
        {
            let mut s = self.stats();
            s.attempts += u64::from(attempts);
            s.retried += u64::from(attempts > 1);
            match outcome {
                Ok(_) => s.ok += 1,
                Err(()) => s.unacked += 1,
            }
        }
        let mut ledger = self.records();
        if let Some(r) = ledger.get_mut((n - 1) as usize) {
            r.attempts = attempts;
            if let Ok(ids) = outcome {
                r.id = ids.first().copied();
                r.others = ids.get(1..).unwrap_or_default().to_vec();
                r.acked_ns = now_ns();
            }
        }
    }
}

/// Whether a failed attempt may be retried (with the same key, so always safe): the server's
/// `UNAVAILABLE` (draining, broker away), timeouts, and transport failures tonic reports as
/// `UNKNOWN`/`CANCELLED`/`INTERNAL` when a connection breaks mid-call.
pub fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Internal | Code::Aborted
    )
}

pub fn backoff(attempt: u32, jitter: u64) -> Duration {
    Duration::from_millis((100u64 << attempt.min(5)).min(2000) + jitter % 100)
}

fn names(prefix: &str, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|i| format!("{prefix}{i}")).collect()
}

fn event(data: &str) -> Option<pb::Event> {
    Some(pb::Event { data: data.to_string(), ..Default::default() })
}

/// One unary attempt on replica `r`; the event id on success.
async fn unary_once(
    shared: &Shared,
    r: usize,
    target: &Target,
    data: &str,
    key: &str,
) -> Result<Vec<Pos>, tonic::Status> {
    let mut c = shared.clients[r % shared.clients.len()].clone();
    let key = key.to_string();
    let call = async {
        let resp = match target {
            Target::Users(us) => {
                c.publish(pb::PublishRequest {
                    retain: None,
                    user_ids: names("u", us),
                    event: event(data),
                    idempotency_key: key,
                })
                .await
            }
            Target::Group(g) => {
                c.publish_group(pb::PublishGroupRequest {
                    retain: None,
                    group: format!("g{g}"),
                    event: event(data),
                    idempotency_key: key,
                })
                .await
            }
            Target::Topic(t) => {
                c.publish_topic(pb::PublishTopicRequest {
                    retain: None,
                    topic: format!("t{t}"),
                    event: event(data),
                    idempotency_key: key,
                })
                .await
            }
            Target::Broadcast => {
                c.broadcast(pb::BroadcastRequest { retain: None, event: event(data), idempotency_key: key }).await
            }
        }?;
        let resp = resp.into_inner();
        ids_of(&resp.event_id, &resp.partition_event_ids)
            .ok_or_else(|| tonic::Status::internal(format!("unreadable event id {:?}", resp.event_id)))
    };
    tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client-side timeout")))
}

/// An answer's ids: every partition's when the event has several (the first is `event_id`),
/// else `event_id`; `None` if one does not parse.
fn ids_of(event_id: &str, partition_ids: &[String]) -> Option<Vec<Pos>> {
    if partition_ids.is_empty() {
        return Pos::parse(event_id).map(|p| vec![p]);
    }
    partition_ids.iter().map(|s| Pos::parse(s)).collect()
}

/// Publishes with retries; records the outcome in the ledger. Returns the event's ids if acked.
pub async fn publish_unary(
    shared: &Shared,
    n: u64,
    target: &Target,
    data: &str,
    first_attempt: u32,
) -> Option<Vec<Pos>> {
    let key = layout::idempotency_key(n);
    let mut attempts = first_attempt;
    while attempts < MAX_ATTEMPTS {
        let r = (n as usize + attempts as usize) % shared.clients.len();
        attempts += 1;
        match unary_once(shared, r, target, data, &key).await {
            Ok(ids) => {
                shared.settle(n, Ok(ids.clone()), attempts);
                return Some(ids);
            }
            Err(st) if retryable(st.code()) => {
                shared.failed_attempt(format!("{:?}", st.code()));
                tokio::time::sleep(backoff(attempts, layout::mix64(n ^ u64::from(attempts)))).await;
            }
            Err(st) => {
                let mut s = shared.stats();
                s.rejected += 1;
                if s.first_rejection.is_empty() {
                    s.first_rejection = format!("n={n}: {:?}: {}", st.code(), st.message());
                }
                drop(s);
                break;
            }
        }
    }
    shared.settle(n, Err(()), attempts);
    None
}

/// One item for a `PublishStream` task.
struct Item {
    n: u64,
    target: Target,
    data: String,
    attempts: u32,
}

/// Runs the publish schedule until `stop` is set; returns once every publish has settled (or
/// the settle deadline passed).
pub async fn run(shared: Arc<Shared>, plan: Plan, stop: Arc<AtomicBool>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut stream_txs = Vec::new();
    let mut stream_tasks = Vec::new();
    for t in 0..plan.stream_tasks {
        let (tx, rx) = mpsc::channel::<Item>(64);
        stream_txs.push(tx);
        stream_tasks.push(tokio::spawn(stream_task(shared.clone(), rx, t)));
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        let at = start + Duration::from_secs_f64(n as f64 / f64::from(plan.rate.max(1)));
        tokio::time::sleep_until(at).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        n += 1;
        let target = plan.layout.target(n, plan.broadcast_every, plan.seed);
        let sent_ns = now_ns();
        let data = layout::payload(n, sent_ns);
        shared.records().push(Record {
            n,
            target: target.clone(),
            id: None,
            others: Vec::new(),
            attempts: 0,
            sent_ns,
            acked_ns: 0,
        });
        let via_stream = !stream_txs.is_empty() && layout::mix64(n ^ 0x5157) % 1000 < plan.stream_per_mille;
        if via_stream {
            let tx = &stream_txs[(n as usize) % stream_txs.len()];
            match tx.try_send(Item { n, target, data, attempts: 0 }) {
                Ok(()) => {
                    shared.stats().via_stream += 1;
                    continue;
                }
                Err(e) => {
                    shared.stats().stream_fallback_unary += 1;
                    let item = match e {
                        mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
                    };
                    spawn_unary(&shared, &in_flight, item.n, item.target, item.data).await;
                }
            }
        } else {
            spawn_unary(&shared, &in_flight, n, target, data).await;
        }
    }
    drop(stream_txs);
    // Settle: every retry loop is bounded (MAX_ATTEMPTS, each attempt bounded in time).
    let settle_by = Duration::from_secs(90);
    let _ = tokio::time::timeout(settle_by, in_flight.acquire_many(MAX_IN_FLIGHT as u32)).await;
    for t in stream_tasks {
        let _ = tokio::time::timeout(settle_by, t).await;
    }
}

async fn spawn_unary(shared: &Arc<Shared>, in_flight: &Arc<Semaphore>, n: u64, target: Target, data: String) {
    let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
    let shared = shared.clone();
    tokio::spawn(async move {
        publish_unary(&shared, n, &target, &data, 0).await;
        drop(permit);
    });
}

/// A `PublishStream` publisher: sends batches on one open stream, reads their answers, and
/// re-sends what failed or went unanswered on a new stream to the next replica.
async fn stream_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<Item>, task: usize) {
    let mut retry: Vec<Item> = Vec::new();
    let mut replica = task;
    let mut open: Option<(mpsc::Sender<pb::PublishStreamRequest>, tonic::Streaming<pb::PublishStreamResponse>)> = None;
    let mut closed = false;
    loop {
        let mut batch: Vec<Item> = retry.drain(..retry.len().min(STREAM_BATCH)).collect();
        while batch.len() < STREAM_BATCH && !closed {
            let wait = if batch.is_empty() { Duration::from_millis(200) } else { Duration::from_millis(5) };
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(item)) => batch.push(item),
                Ok(None) => closed = true,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            if closed && retry.is_empty() {
                break;
            }
            continue;
        }
        for item in &mut batch {
            item.attempts += 1;
        }
        if open.is_none() {
            let (tx, req_rx) = mpsc::channel(STREAM_BATCH * 2);
            let mut client = shared.clients[replica % shared.clients.len()].clone();
            // The first batch goes into the channel before the call (the server answers the
            // headers with the first response).
            for item in &batch {
                let _ = tx.try_send(request(item));
            }
            let call = client.publish_stream(tokio_stream::wrappers::ReceiverStream::new(req_rx));
            match tokio::time::timeout(STREAM_BATCH_TIMEOUT, call).await {
                Ok(Ok(resp)) => open = Some((tx, resp.into_inner())),
                Ok(Err(st)) => {
                    shared.failed_attempt(format!("stream {:?}", st.code()));
                    requeue(&shared, batch, &mut retry);
                    replica += 1;
                    tokio::time::sleep(backoff(1, replica as u64)).await;
                    continue;
                }
                Err(_) => {
                    shared.failed_attempt("stream open timeout".into());
                    requeue(&shared, batch, &mut retry);
                    replica += 1;
                    continue;
                }
            }
        } else if let Some((tx, _)) = &open {
            for item in &batch {
                if tx.send(request(item)).await.is_err() {
                    break;
                }
            }
        }
        let Some((_, answers)) = open.as_mut() else { continue };
        let mut answered = 0;
        let mut broken = false;
        let mut move_on = false;
        let deadline = Instant::now() + STREAM_BATCH_TIMEOUT;
        let mut failed: Vec<Item> = Vec::new();
        let mut items = batch.into_iter();
        while answered < STREAM_BATCH {
            let Some(item) = items.next() else { break };
            match tokio::time::timeout_at(deadline, answers.message()).await {
                Ok(Ok(Some(a))) => {
                    answered += 1;
                    let ids = (a.code == 0).then(|| ids_of(&a.event_id, &a.partition_event_ids)).flatten();
                    match ids {
                        Some(ids) => shared.settle(item.n, Ok(ids), item.attempts),
                        None if a.code == 0 || retryable(Code::from(a.code)) => {
                            // UNAVAILABLE (draining, broker away): retry on another replica.
                            shared.failed_attempt(format!("stream item {:?}", Code::from(a.code)));
                            failed.push(item);
                            move_on = true;
                        }
                        None => {
                            let mut s = shared.stats();
                            s.rejected += 1;
                            if s.first_rejection.is_empty() {
                                s.first_rejection = format!("n={}: code {}: {}", item.n, a.code, a.message);
                            }
                            drop(s);
                            shared.settle(item.n, Err(()), item.attempts);
                        }
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    shared.failed_attempt("stream broken".into());
                    failed.push(item);
                    broken = true;
                    break;
                }
            }
        }
        failed.extend(items);
        if broken || move_on {
            // Closing our side ends the stream on the server.
            open = None;
            replica += 1;
        }
        if !failed.is_empty() {
            requeue(&shared, failed, &mut retry);
            tokio::time::sleep(backoff(retry.first().map_or(1, |i| i.attempts), replica as u64)).await;
        }
    }
}

/// Puts failed items back for another attempt, or gives up on those out of attempts.
fn requeue(shared: &Shared, items: Vec<Item>, retry: &mut Vec<Item>) {
    for item in items {
        if item.attempts >= MAX_ATTEMPTS {
            shared.settle(item.n, Err(()), item.attempts);
        } else {
            retry.push(item);
        }
    }
}

fn request(item: &Item) -> pb::PublishStreamRequest {
    let target = match &item.target {
        Target::Users(us) => StreamTarget::Users(pb::UserTarget { user_ids: names("u", us) }),
        Target::Group(g) => StreamTarget::Group(format!("g{g}")),
        Target::Topic(t) => StreamTarget::Topic(format!("t{t}")),
        Target::Broadcast => StreamTarget::Broadcast(pb::BroadcastTarget {}),
    };
    pb::PublishStreamRequest {
        retain: None,
        target: Some(target),
        event: event(&item.data),
        idempotency_key: layout::idempotency_key(item.n),
    }
}

/// The big events of the stalled-stream fault, to a topic only the stalled h2 streams follow
/// (not part of the check). Returns how many were acknowledged.
pub async fn stall_load(shared: Arc<Shared>, bytes: usize, rate: u32, until: Instant) -> u64 {
    let mut ok = 0;
    let data = "x".repeat(bytes);
    let start = Instant::now();
    let mut k: u64 = 0;
    while Instant::now() < until {
        tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / f64::from(rate.max(1)))).await;
        k += 1;
        let mut c = shared.clients[0].clone();
        let req = pb::PublishTopicRequest {
            retain: None,
            topic: STALL_TOPIC.into(),
            event: event(&data),
            idempotency_key: format!("stall-{k}"),
        };
        if tokio::time::timeout(CALL_TIMEOUT, c.publish_topic(req)).await.is_ok_and(|r| r.is_ok()) {
            ok += 1;
        }
    }
    ok
}

pub const STALL_TOPIC: &str = "chaos-stall";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy() {
        assert!(retryable(Code::Unavailable) && retryable(Code::DeadlineExceeded) && retryable(Code::Unknown));
        assert!(!retryable(Code::InvalidArgument) && !retryable(Code::ResourceExhausted));
        assert_eq!(backoff(0, 0), Duration::from_millis(100));
        assert_eq!(backoff(3, 0), Duration::from_millis(800));
        assert_eq!(backoff(9, 150), Duration::from_millis(2050));
    }
}
