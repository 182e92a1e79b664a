//! The presence webhook (`--presence-webhook`): the same transitions as `WatchPresence`, POSTed
//! as JSON batches `{"events":[{"id","user","state","at"}, ..]}` by one sender task per
//! replica, over plain HTTP/1.1 (hyper's client; `http://` only: TLS would need a client TLS
//! configuration this first version does not have).
//!
//! **Who sends:** in a cluster every replica sees every transition, and sends those of the
//! users it is responsible for: the replica with the highest hash of (replica, user) among the
//! replicas it hears from (rendezvous hashing), so each transition is sent once while the
//! replicas agree on who is alive; when one joins or dies, a transition decided in that
//! moment may be sent by two replicas or (if the one responsible dies with it queued) by none.
//! **Queue:** bounded (`--presence-webhook-queue` events); when full, the oldest event is
//! dropped, counted (`ssegate_presence_webhook_dropped_total`) and logged. **Batches:** up to
//! `--presence-webhook-batch` events, sent once the first has waited `--presence-webhook-delay`
//! (or at once when full). **Retries:** a connection failure, a timeout
//! (`--presence-webhook-timeout`), 408, 429 or 5xx retries the same batch, with the same event
//! ids, after an exponential backoff with full jitter (100 ms doubling to 30 s); later batches
//! wait, so events stay in order per user. Any other answer ends the batch: 2xx delivered, other
//! 4xx refused (counted and logged, not retried: the endpoint said it will not take it).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{ReplicaId, Transition};

/// The first retry waits up to this (full jitter), doubling per failure up to `BACKOFF_MAX`.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// `http://host[:port]/path`, checked at start.
    pub url: Uri,
    /// Most events in one POST.
    pub batch: usize,
    /// How long the first event of a batch waits for others.
    pub delay: Duration,
    /// Longest a POST may take (connect to answer).
    pub timeout: Duration,
    /// Most events queued; the oldest is dropped beyond it.
    pub queue: usize,
}

/// Why `--presence-webhook` was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookUrlError {
    #[error("--presence-webhook {0:?} is not a URL: {1}")]
    Parse(String, http::uri::InvalidUri),
    #[error("--presence-webhook {0:?}: only http:// URLs with a host are supported (no TLS client yet)")]
    NotHttp(String),
}

/// Parses and checks `--presence-webhook`.
pub fn parse_url(s: &str) -> Result<Uri, WebhookUrlError> {
    let uri: Uri = s.parse().map_err(|e| WebhookUrlError::Parse(s.to_owned(), e))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(WebhookUrlError::NotHttp(s.to_owned()));
    }
    Ok(uri)
}

/// Counts for `/metrics`.
#[derive(Default, Debug)]
pub struct WebhookCounters {
    /// Events in batches the endpoint accepted (2xx).
    pub sent: AtomicU64,
    /// Events dropped: the oldest when the queue was full, and refused batches (4xx).
    pub dropped: AtomicU64,
    /// POSTs retried (failed, timed out, 408, 429 or 5xx).
    pub retries: AtomicU64,
}

/// One event as the endpoint reads it.
#[derive(Serialize, Debug, Clone)]
struct Item {
    /// `<replica>-<n>`: unique per event, the same on every retry, so the endpoint can drop a
    /// repeat (a retry after an answer that was lost).
    id: String,
    user: String,
    state: &'static str,
    /// RFC 3339, UTC, milliseconds.
    at: String,
}

#[derive(Serialize)]
struct Body<'a> {
    events: &'a [Item],
}

/// The queue between the hub (which pushes inside its lock: never waits) and the sender.
pub struct Outgoing {
    me: ReplicaId,
    queue: Mutex<VecDeque<Item>>,
    cap: usize,
    next_id: AtomicU64,
    ready: Notify,
    pub counters: WebhookCounters,
    /// Events dropped from a full queue and not logged yet (`log_drops`).
    full_drops: AtomicU64,
    /// When the last "queue full" line was logged (one a second at most).
    warned: Mutex<Option<Instant>>,
}

impl Outgoing {
    pub fn new(me: ReplicaId, cap: usize) -> Arc<Self> {
        Arc::new(Self {
            me,
            queue: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            next_id: AtomicU64::new(1),
            ready: Notify::new(),
            counters: WebhookCounters::default(),
            full_drops: AtomicU64::new(0),
            warned: Mutex::new(None),
        })
    }

    /// Queues a transition this replica is responsible for; drops the oldest when full.
    pub fn push(&self, t: &Transition) {
        let item = Item {
            id: format!("{}-{}", self.me, self.next_id.fetch_add(1, Relaxed)),
            user: t.user.to_string(),
            state: t.state.as_str(),
            at: humantime::format_rfc3339_millis(t.at).to_string(),
        };
        let dropped = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let dropped = if q.len() >= self.cap { q.pop_front().is_some() } else { false };
            q.push_back(item);
            dropped
        };
        if dropped {
            // Counted here; logged by the sender (this runs inside the hub's lock).
            self.counters.dropped.fetch_add(1, Relaxed);
            self.full_drops.fetch_add(1, Relaxed);
        }
        self.ready.notify_one();
    }

    /// One line for the events dropped from a full queue since the last, at most once a second.
    fn log_drops(&self) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        let n = self.full_drops.swap(0, Relaxed);
        if n > 0 {
            *warned = Some(Instant::now());
            drop(warned);
            tracing::warn!(dropped = n, queue = self.cap, "presence webhook queue full: oldest events dropped");
        }
    }

    fn take(&self, n: usize) -> Vec<Item> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = n.min(q.len());
        q.drain(..n).collect()
    }

    fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Whether `me` sends the webhook for `user`, among `replicas` (rendezvous hashing with a
/// stable hash, so replicas of different builds agree).
pub fn responsible(me: &str, replicas: impl Iterator<Item = impl AsRef<str>>, user: &str) -> bool {
    // FNV-1a alone ends on the replica id's last bytes, which barely spreads short ids: the
    // SplitMix64 finalizer mixes every bit in.
    let score = |r: &str| mix(fnv1a(r.as_bytes(), fnv1a(&[0xff], fnv1a(user.as_bytes(), FNV_OFFSET))));
    let mine = score(me);
    replicas.filter(|r| r.as_ref() != me).all(|r| {
        let theirs = score(r.as_ref());
        // Ties (practically never) go to the smaller id.
        mine > theirs || (mine == theirs && me < r.as_ref())
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What one POST came to.
enum Outcome {
    Delivered,
    /// Worth retrying: why.
    Retry(String),
    /// Refused for good (a 4xx other than 408/429).
    Refused(StatusCode),
}

/// Starts the sender on `tracker`; it ends with `stop` (what is queued then is dropped, logged).
pub fn start(config: WebhookConfig, out: Arc<Outgoing>, stop: &CancellationToken, tracker: &TaskTracker) {
    let stop = stop.clone();
    tracker.spawn(async move {
        let url = config.url.to_string();
        loop {
            // Wait for a first event, then for the batch to fill or the delay to pass.
            if out.len() == 0 {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = out.ready.notified() => continue,
                }
            }
            let until = tokio::time::Instant::now() + config.delay;
            while out.len() < config.batch {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep_until(until) => break,
                    () = out.ready.notified() => {}
                }
            }
            if stop.is_cancelled() {
                break;
            }
            out.log_drops();
            let batch = out.take(config.batch);
            let body = Bytes::from(serde_json::to_vec(&Body { events: &batch }).unwrap_or_default());
            let mut failures = 0u32;
            loop {
                let outcome = tokio::select! {
                    () = stop.cancelled() => break,
                    o = post(&config, body.clone()) => o,
                };
                match outcome {
                    Outcome::Delivered => {
                        out.counters.sent.fetch_add(batch.len() as u64, Relaxed);
                        break;
                    }
                    Outcome::Refused(status) => {
                        out.counters.dropped.fetch_add(batch.len() as u64, Relaxed);
                        tracing::error!(%url, status = status.as_u16(), events = batch.len(),
                            "presence webhook refused a batch; not retried");
                        break;
                    }
                    Outcome::Retry(reason) => {
                        out.counters.retries.fetch_add(1, Relaxed);
                        let cap = BACKOFF_FIRST.saturating_mul(1 << failures.min(16)).min(BACKOFF_MAX);
                        let wait = cap.mul_f64(fastrand::f64());
                        failures += 1;
                        // The first failure and then every tenth: a long outage logs little.
                        if failures == 1 || failures.is_multiple_of(10) {
                            tracing::warn!(%url, reason, failures, retry_in_ms = wait.as_millis() as u64,
                                "presence webhook POST failed; retrying");
                        }
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(wait) => {}
                        }
                        out.log_drops();
                    }
                }
            }
        }
        let left = out.len();
        if left > 0 {
            tracing::info!(events = left, "presence webhook stopped with events unsent");
        }
    });
}

/// One POST of `body`, within the timeout, on a connection of its own.
async fn post(config: &WebhookConfig, body: Bytes) -> Outcome {
    match tokio::time::timeout(config.timeout, try_post(&config.url, body)).await {
        Err(_) => Outcome::Retry(format!("no answer within {:?}", config.timeout)),
        Ok(Err(e)) => Outcome::Retry(e),
        Ok(Ok(status)) if status.is_success() => Outcome::Delivered,
        Ok(Ok(status))
            if status.is_server_error()
                || status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS =>
        {
            Outcome::Retry(format!("answered {status}"))
        }
        Ok(Ok(status)) => Outcome::Refused(status),
    }
}

async fn try_post(url: &Uri, body: Bytes) -> Result<StatusCode, String> {
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("handshake: {e}"))?;
    // The connection is driven beside the request and dropped with it (one POST per connection).
    let driver = tokio::spawn(conn);
    // Host and port only: never the URL's userinfo, if any.
    let authority = match url.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::post(path)
        .header(header::HOST, authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, concat!("ssegate/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    let result = sender.send_request(req).await.map(|r| r.status()).map_err(|e| format!("request: {e}"));
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn each_user_has_exactly_one_responsible_replica_and_most_stay_when_one_joins() {
        let three = ["a", "b", "c"];
        let four = ["a", "b", "c", "d"];
        let mut moved = 0;
        for i in 0..1000 {
            let user = format!("user-{i}");
            let owners: Vec<_> = three.iter().filter(|r| responsible(r, three.iter(), &user)).collect();
            assert_eq!(owners.len(), 1, "{user}: {owners:?}");
            let after: Vec<_> = four.iter().filter(|r| responsible(r, four.iter(), &user)).collect();
            assert_eq!(after.len(), 1);
            if after[0] != owners[0] {
                assert_eq!(*after[0], "d", "a user only moves to the newcomer");
                moved += 1;
            }
        }
        assert!((150..350).contains(&moved), "about a quarter moved: {moved}");
    }

    #[test]
    fn only_plain_http_urls_with_a_host_are_taken() {
        assert!(parse_url("http://127.0.0.1:8080/hooks/presence").is_ok());
        assert!(matches!(parse_url("https://example.com/x"), Err(WebhookUrlError::NotHttp(_))));
        assert!(matches!(parse_url("/relative"), Err(WebhookUrlError::NotHttp(_))));
        assert!(matches!(parse_url("http://bad host/"), Err(WebhookUrlError::Parse(..))));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let out = Outgoing::new("r".into(), 2);
        let t = |u: &str| Transition {
            user: crate::domain::UserId::parse(u).unwrap(),
            state: super::super::State::Online,
            at: SystemTime::UNIX_EPOCH,
        };
        for u in ["a", "b", "c"] {
            out.push(&t(u));
        }
        let left = out.take(10);
        assert_eq!(left.iter().map(|i| i.user.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(out.counters.dropped.load(Relaxed), 1);
        assert_eq!((left[0].id.as_str(), left[0].at.as_str()), ("r-2", "1970-01-01T00:00:00.000Z"));
    }
}
