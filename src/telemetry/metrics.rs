//! Prometheus metrics. Hot-path counts are plain atomics (in the router and in `EdgeMetrics`)
//! read at scrape time by one collector; only per-request gRPC metrics use prometheus-client's
//! own families. Each `Application` has its own registry, so tests in one process do not mix.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram as PromHistogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{collector::ServerCollector, histogram::Histogram, process};
use crate::{
    backplane::Backplane,
    router::{CloseReason, Partitions, TARGET_KINDS},
};

/// Why a subscription was refused, for `ssegate_connections_rejected_total{reason}`.
#[derive(Clone, Copy, Debug)]
pub enum Rejection {
    MaxConnections = 0,
    MaxConnectionsPerUser = 1,
    ShuttingDown = 2,
    BadRequest = 3,
    Unauthenticated = 4,
    Forbidden = 5,
    Disabled = 6,
    MaxConnectionsPerIp = 7,
    /// Closed at accept: the port held all the sockets its descriptor budget allows.
    DescriptorBudget = 8,
    /// Closed at accept: too many connections had not sent a request yet.
    PendingConnections = 9,
    /// The backend's authorizer gave no valid answer (timeout, error, invalid, overload,
    /// breaker open).
    AuthorizerUnavailable = 10,
    /// Interest delivery could not follow the user's events on the broker.
    BrokerUnavailable = 11,
}

pub(super) const REJECTIONS: [&str; 12] = [
    "max_connections",
    "max_connections_per_user",
    "shutting_down",
    "bad_request",
    "unauthenticated",
    "forbidden",
    "disabled",
    "max_connections_per_ip",
    "descriptor_budget",
    "pending_connections",
    "authorizer_unavailable",
    "broker_unavailable",
];

/// Why a publish failed, for `ssegate_events_published_total{outcome}`.
#[derive(Clone, Copy, Debug)]
pub enum PublishFailure {
    Invalid = 0,
    /// Not applied: nothing was stored (safe to retry anywhere).
    Unavailable = 1,
    /// Sent but not acknowledged: may be stored (retry with the same idempotency key).
    Unknown = 2,
}

/// How a call to the backend's authorizer ended, for `ssegate_authorizer_calls_total{outcome}`.
/// `breaker_open` counts requests refused without a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizerOutcome {
    Allow = 0,
    Deny = 1,
    Timeout = 2,
    /// Unreachable, or an error answer.
    Error = 3,
    /// An answer that is not a valid allow or deny.
    Invalid = 4,
    /// No place among the calls in flight within the timeout.
    Overloaded = 5,
    BreakerOpen = 6,
}

impl AuthorizerOutcome {
    pub const ALL: [&'static str; 7] = ["allow", "deny", "timeout", "error", "invalid", "overloaded", "breaker_open"];

    pub fn as_str(self) -> &'static str {
        Self::ALL[self as usize]
    }
}

/// Counts kept by the HTTP and gRPC edges.
#[derive(Debug)]
pub struct EdgeMetrics {
    pub(super) closed: [AtomicU64; CloseReason::ALL.len()],
    pub(super) rejected: [AtomicU64; REJECTIONS.len()],
    /// `[target kind][failure]`, target kinds indexed like `TARGET_KINDS`.
    pub(super) publish_failed: [[AtomicU64; 3]; 4],
    /// Calls to the backend's authorizer by `AuthorizerOutcome`.
    pub(super) authorizer_calls: [AtomicU64; AuthorizerOutcome::ALL.len()],
    /// Authorizer look-ups: `[cache hits, misses]` (a miss waits for a call, its own or one in
    /// flight for the same credential).
    pub(super) authorizer_cache: [AtomicU64; 2],
    /// Publish to socket write, one sample per write (the oldest event in it).
    pub delivery_latency: Histogram,
    /// Frames a connection's writer found queued when it drained its mailbox.
    pub queue_depth: Histogram,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    pub grpc_duration: Family<MethodLabels, PromHistogram>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

impl EdgeMetrics {
    fn new() -> Self {
        Self {
            closed: Default::default(),
            rejected: Default::default(),
            publish_failed: Default::default(),
            authorizer_calls: Default::default(),
            authorizer_cache: Default::default(),
            delivery_latency: Histogram::latency(),
            queue_depth: Histogram::depth(),
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(|| PromHistogram::new(exponential_buckets(0.0001, 4.0, 10))),
        }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].fetch_add(1, Relaxed);
    }

    /// Streams closed for `reason` since start.
    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize].load(Relaxed)
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Relaxed);
    }

    pub fn authorizer_call(&self, outcome: AuthorizerOutcome) {
        self.authorizer_calls[outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn authorizer_cache(&self, hit: bool) {
        self.authorizer_cache[usize::from(!hit)].fetch_add(1, Relaxed);
    }

    /// `target` is a `Target::kind` name.
    pub fn publish_failed(&self, target: &str, why: PublishFailure) {
        if let Some(i) = TARGET_KINDS.iter().position(|t| *t == target) {
            self.publish_failed[i][why as usize].fetch_add(1, Relaxed);
        }
    }
}

/// The registry of one server and the edge counts it renders.
pub struct Metrics {
    registry: Registry,
    pub edge: Arc<EdgeMetrics>,
}

impl Metrics {
    pub fn new(routers: Arc<Partitions>, backplane: Arc<Backplane>, presence: Arc<crate::presence::Hub>) -> Self {
        let edge = Arc::new(EdgeMetrics::new());
        let mut registry = Registry::default();
        registry.register(
            "ssegate_grpc_requests",
            "gRPC requests answered, by method and status code",
            edge.grpc_requests.clone(),
        );
        registry.register(
            "ssegate_grpc_request_duration_seconds",
            "Time from a gRPC request's arrival to its final status, by method",
            edge.grpc_duration.clone(),
        );
        registry.register_collector(Box::new(ServerCollector { routers, backplane, presence, edge: edge.clone() }));
        registry.register_collector(Box::new(process::ProcessCollector));
        Self { registry, edge }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
