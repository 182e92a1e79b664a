//! Connect authorization by the application's backend (`--authorizer-addr`): each new stream
//! is decided by a call to the backend's `ssegate.v1.Authorizer/Authorize`, behind a cache per
//! credential, single-flight for identical concurrent requests, a bound on calls in flight and
//! a circuit breaker, so that a reconnect storm does not become a storm of backend calls.
//! Fails closed: anything but a valid answer refuses the stream (`CallError`).
//!
//! The wire (gRPC or Connect/JSON, prost types) is `grpc::authorizer::Transport`; this module
//! speaks domain types only.

mod breaker;
mod cache;
mod types;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderName};
use tokio::{
    sync::{Semaphore, watch},
    time::{Instant, timeout_at},
};
use tokio_util::task::TaskTracker;

use crate::{
    domain::{GroupId, Topic, UserId},
    grpc::authorizer::Transport,
    telemetry::metrics::{AuthorizerOutcome, EdgeMetrics},
};
use breaker::Breaker;
use cache::{Cache, Key};

pub use crate::config::AuthorizerProtocol;
pub use types::{AuthorizeQuery, CallError, Denial, Grant, Verdict};

/// Deny answers are cached at most this long (and never longer than `--authorizer-cache-ttl`):
/// long enough that a storm of browsers with a dead session costs the backend one call per
/// credential every few seconds, short enough that signing in again is honoured quickly.
pub const DENY_TTL: Duration = Duration::from_secs(5);

/// Consecutive failed calls that open the breaker.
pub const BREAKER_FAILURES: u32 = 5;

/// How long an open breaker refuses at once before letting one probe call through.
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(5);

/// The `--authorizer-*` flags, typed.
#[derive(Clone, Debug)]
pub struct AuthorizerSettings {
    /// `http://` or `https://` (TLS) address of the backend.
    pub url: String,
    pub protocol: AuthorizerProtocol,
    /// Request headers sent besides the cookies (lower case).
    pub headers: Vec<HeaderName>,
    /// Only these cookies are sent (and hashed into the cache key); empty: all of them.
    pub cookies: Vec<String>,
    /// Longest wait for an answer, a place among the calls in flight included.
    pub timeout: Duration,
    /// Allow answers are reused this long for the same credential (0: no cache).
    pub cache_ttl: Duration,
    /// Most answers cached; the oldest go first.
    pub cache_size: usize,
    /// Most calls to the backend at once.
    pub max_in_flight: usize,
    /// A CA (PEM) to trust for an `https://` backend, besides the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// The outcome of one call, shared by every request that waited for it.
type Outcome = Result<Arc<Verdict>, CallError>;

/// The backend's authorizer with its cache, single-flight, bound and breaker.
pub struct Authorizer {
    transport: Transport,
    settings: AuthorizerSettings,
    /// The cache, the calls in flight by key, and the breaker: one short critical section per
    /// request (never held across `.await`), so that a newcomer sees either the call in flight
    /// or its cached answer, never neither.
    state: Mutex<State>,
    /// Bounds calls to the backend at once; a call waits for a permit within its deadline.
    permits: Semaphore,
    metrics: Arc<EdgeMetrics>,
    /// Calls run in tasks of their own, so that a browser leaving does not cancel the answer
    /// the others waiting for it need; each ends within the timeout.
    tracker: TaskTracker,
}

struct State {
    cache: Cache,
    in_flight: HashMap<Key, watch::Receiver<Option<Outcome>>>,
    breaker: Breaker,
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The time left until `at` (Unix seconds), to the sub-second: the stream's end and its cache
/// entry's are both computed from it, so no cached allow outlives the stream it admitted.
pub(crate) fn remaining(at: u64) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(at)).duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
}

impl Authorizer {
    pub fn new(
        settings: AuthorizerSettings,
        transport: Transport,
        metrics: Arc<EdgeMetrics>,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            transport,
            state: Mutex::new(State {
                cache: Cache::new(settings.cache_size),
                in_flight: HashMap::new(),
                breaker: Breaker::new(BREAKER_FAILURES, BREAKER_COOL_DOWN),
            }),
            permits: Semaphore::new(settings.max_in_flight.max(1)),
            settings,
            metrics,
            tracker,
        }
    }

    pub fn settings(&self) -> &AuthorizerSettings {
        &self.settings
    }

    /// What to send about a request: its cookies (those configured, or all), the configured
    /// headers, what it asked for and its peer.
    pub fn query(
        &self,
        headers: &HeaderMap,
        user: Option<UserId>,
        groups: Vec<GroupId>,
        topics: Vec<Topic>,
        peer: &str,
    ) -> AuthorizeQuery {
        let wanted = &self.settings.cookies;
        let cookies = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .filter(|(k, _)| wanted.is_empty() || wanted.iter().any(|w| w == k))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let headers = self
            .settings
            .headers
            .iter()
            .filter(|name| headers.contains_key(*name))
            .map(|name| {
                let values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(str::to_owned);
                (name.as_str().to_owned(), values.collect())
            })
            .collect();
        AuthorizeQuery { cookies, headers, user, groups, topics, peer: peer.to_owned() }
    }

    /// The backend's verdict on `query`: from the cache, from a call in flight for the same
    /// credential, or from a new call.
    pub async fn authorize(self: &Arc<Self>, query: AuthorizeQuery) -> Result<Arc<Verdict>, CallError> {
        let key = cache::key(&query);
        let now = Instant::now();
        let (mut rx, lead) = {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(verdict) = state.cache.get(&key, now) {
                self.metrics.authorizer_cache(true);
                return Ok(verdict);
            }
            self.metrics.authorizer_cache(false);
            // A call whose task ended without answering (it panicked) is not waited for: its
            // entry is replaced, so one bad call cannot lock a credential out.
            match state.in_flight.get(&key).filter(|rx| rx.has_changed().is_ok()) {
                Some(rx) => (rx.clone(), None),
                None => {
                    if let Err(e) = state.breaker.admit(now) {
                        self.metrics.authorizer_call(e.outcome());
                        return Err(e);
                    }
                    let (tx, rx) = watch::channel(None);
                    state.in_flight.insert(key, rx.clone());
                    // The task is spawned below, outside the lock.
                    (rx, Some(tx))
                }
            }
        };
        if let Some(tx) = lead {
            let this = self.clone();
            self.tracker.spawn(async move { this.call(key, query, tx).await });
        }
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Err(CallError::Failed("no outcome".into()))),
            // The call's task ended without an answer (the runtime is shutting down).
            Err(_) => Err(CallError::Failed("the call was abandoned".into())),
        }
    }

    /// One call to the backend, within the timeout (a place among the calls in flight
    /// included); its outcome is cached (if it may be), counted, logged if it failed, and
    /// handed to every request waiting for it.
    async fn call(&self, key: Key, query: AuthorizeQuery, tx: watch::Sender<Option<Outcome>>) {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        // A place among the calls in flight is waited for at most half the timeout, so that a
        // call always has the other half: one started with a few milliseconds left would time
        // out for want of time, not because the backend is slow, and open the breaker.
        let permit_deadline = started + self.settings.timeout / 2;
        let outcome = match timeout_at(permit_deadline, self.permits.acquire()).await {
            Err(_) | Ok(Err(_)) => Err(CallError::Overloaded),
            Ok(Ok(_permit)) => match timeout_at(deadline, self.transport.call(&query)).await {
                Err(_) => Err(CallError::Timeout),
                Ok(result) => result.and_then(|v| check_expiry(v, now_secs())).map(Arc::new),
            },
        };
        let outcome_label = match &outcome {
            Ok(v) if matches!(**v, Verdict::Allow(_)) => AuthorizerOutcome::Allow,
            Ok(_) => AuthorizerOutcome::Deny,
            Err(e) => e.outcome(),
        };
        self.metrics.authorizer_call(outcome_label);
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &outcome {
            Err(e) => tracing::warn!(
                outcome = outcome_label.as_str(), reason = %e, detail = e.detail(), elapsed_ms,
                peer = %query.peer, "authorizer call failed: streams refused with 503"
            ),
            Ok(v) => tracing::debug!(outcome = outcome_label.as_str(), elapsed_ms, verdict = ?v, "authorizer answered"),
        }
        let now = Instant::now();
        {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            state.in_flight.remove(&key);
            match &outcome {
                Ok(verdict) => {
                    state.breaker.succeeded();
                    if let Some(ttl) = self.cache_ttl(verdict) {
                        state.cache.insert(key, verdict.clone(), now + ttl);
                    }
                }
                Err(e) if e.is_backend_failure() => {
                    if state.breaker.failed(now) {
                        tracing::warn!(
                            failures = BREAKER_FAILURES,
                            cool_down_ms = u64::try_from(BREAKER_COOL_DOWN.as_millis()).unwrap_or(u64::MAX),
                            "authorizer breaker open: new credentials are refused with 503 until a probe succeeds"
                        );
                    }
                }
                Err(_) => state.breaker.neutral(),
            }
        }
        tx.send_replace(Some(outcome));
    }

    /// How long an answer may be reused: allows up to the cache TTL and never past their
    /// expiry; denies up to `DENY_TTL`.
    fn cache_ttl(&self, verdict: &Verdict) -> Option<Duration> {
        let ttl = match verdict {
            Verdict::Allow(grant) => match grant.expires_at {
                Some(at) => self.settings.cache_ttl.min(remaining(at)),
                None => self.settings.cache_ttl,
            },
            Verdict::Deny(_) => self.settings.cache_ttl.min(DENY_TTL),
        };
        (!ttl.is_zero()).then_some(ttl)
    }
}

/// An allow whose expiry is already past is not an answer ssegate can use.
fn check_expiry(verdict: Verdict, now: u64) -> Result<Verdict, CallError> {
    match &verdict {
        Verdict::Allow(Grant { expires_at: Some(at), .. }) if *at <= now => {
            Err(CallError::Invalid(format!("allow.expires_at {at} is not in the future (now {now})")))
        }
        _ => Ok(verdict),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allow_that_expired_already_is_invalid() {
        let grant = |at| {
            Verdict::Allow(Grant { user: UserId::parse("a").unwrap(), groups: vec![], topics: vec![], expires_at: at })
        };
        assert!(check_expiry(grant(Some(10)), 10).is_err());
        assert!(check_expiry(grant(Some(11)), 10).is_ok());
        assert!(check_expiry(grant(None), 10).is_ok());
    }
}
