//! The flags of `ssegate serve`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use super::{AuthorizerProtocol, BackplaneKind, LogFormat, NatsDelivery, duration};
use crate::store::SyncPolicy;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of the public HTTP port (SSE subscriptions).
    #[arg(long, env = "SSEGATE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Address of the internal gRPC port (publishers).
    #[arg(long, env = "SSEGATE_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the admin port: `/metrics`, `/healthz`, `/readyz`, and `/console/`.
    #[arg(long, env = "SSEGATE_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Turns the admin console (`/console/` on the admin port) on: its API and actions require
    /// one of the tokens in this file (one per line, at least 16 characters, `#` comments) as
    /// `Authorization: Bearer <token>`. Re-read when it changes. Without it the console is off.
    #[arg(long, env = "SSEGATE_CONSOLE_TOKEN_FILE")]
    pub console_token_file: Option<PathBuf>,

    /// Where published events go: `memory` (this process only) or `nats` (NATS JetStream,
    /// shared by every replica). Several replicas need `nats`.
    #[arg(long, env = "SSEGATE_BACKPLANE", default_value = "memory")]
    pub backplane: BackplaneKind,

    /// Keep events, retained values, idempotency keys and the epoch in this directory (the
    /// memory backplane only): a restart, clean or not, loses nothing acknowledged and clients
    /// resume across it. Created if missing; one process per directory (a lock).
    #[arg(long, env = "SSEGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// When a publish to --data-dir counts as stored: `always` (acknowledged after fdatasync;
    /// concurrent publishes share one) or a duration like `10ms` (acknowledged once written;
    /// synced at most that long later: a power loss may lose that last stretch).
    #[arg(long, env = "SSEGATE_DATA_SYNC", default_value = "always", value_parser = sync_policy)]
    pub data_sync: SyncPolicy,

    /// NATS server URLs, comma-separated (several for a cluster).
    #[arg(long, env = "SSEGATE_NATS_URL", value_delimiter = ',', default_value = "nats://127.0.0.1:4222")]
    pub nats_url: Vec<String>,

    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, env = "SSEGATE_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,

    /// CA (PEM) to verify the NATS servers' TLS certificates; turns TLS on.
    #[arg(long, env = "SSEGATE_NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,

    /// JetStream stream holding the events (created if missing, checked if present).
    #[arg(long, env = "SSEGATE_NATS_STREAM", default_value = "SSEGATE")]
    pub nats_stream: String,

    /// The one subject events are published to (targets travel in the payload).
    #[arg(long, env = "SSEGATE_NATS_SUBJECT", default_value = "ssegate.events")]
    pub nats_subject: String,

    /// The stream keeps events this long (at least --replay-max-age).
    #[arg(long, env = "SSEGATE_NATS_STREAM_MAX_AGE", default_value = "24h", value_parser = duration)]
    pub nats_stream_max_age: Duration,

    /// The stream keeps at most this many bytes (oldest dropped first).
    #[arg(long, env = "SSEGATE_NATS_STREAM_MAX_BYTES", default_value_t = 1 << 30)]
    pub nats_stream_max_bytes: i64,

    /// Window in which publishes with the same idempotency key are delivered once.
    #[arg(long, env = "SSEGATE_NATS_DUPLICATE_WINDOW", default_value = "2m", value_parser = duration)]
    pub nats_duplicate_window: Duration,

    /// Longest wait for every replica to answer a cluster-wide Presence, Stats or Disconnect;
    /// missing answers make the result `partial`.
    #[arg(long, env = "SSEGATE_NATS_CLUSTER_WAIT", default_value = "1s", value_parser = duration)]
    pub nats_cluster_wait: Duration,

    /// Longest wait for JetStream to acknowledge a publish; past it the call answers
    /// DEADLINE_EXCEEDED (outcome unknown: retry with the same idempotency key).
    #[arg(long, env = "SSEGATE_NATS_PUBLISH_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub nats_publish_timeout: Duration,

    /// Copies of the stream the NATS cluster keeps (JetStream `num_replicas`; 3 on a 3-node
    /// cluster survives the loss of one node). An existing stream with another number is
    /// updated at start (if NATS refuses, a warning is logged and the stream used as it is).
    #[arg(long, env = "SSEGATE_NATS_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_stream_replicas: u8,

    /// How events reach each replica: `interest` (only those its connections need: the stream,
    /// when this replica creates it, republishes each event on a live subject per user, group
    /// or topic, and a replica subscribes to the users, groups and topics it serves) or `stream`
    /// (every replica reads every event). A stream created without interest delivery is read whole either way; all
    /// replicas must run a version that knows `interest` before such a stream is created.
    #[arg(long, env = "SSEGATE_NATS_DELIVERY", value_enum, default_value = "interest")]
    pub nats_delivery: NatsDelivery,

    /// Interest delivery: how long a replica keeps receiving a user's (group's, topic's) events
    /// after its last stream on it closed, so that reloads and reconnects do not churn the broker's
    /// subscriptions (and a reconnect within it is served from the replica's log at once).
    #[arg(long, env = "SSEGATE_NATS_INTEREST_LINGER", default_value = "60s", value_parser = duration)]
    pub nats_interest_linger: Duration,

    /// Spread the events over this many JetStream streams (partitions), whose leaders a NATS
    /// cluster places on different servers, so that the cluster stores more events per second
    /// than one stream's leader can. An event for users goes to each user's partition (a hash of
    /// the user id), any other event (broadcast, group, topic) to every partition; a browser's
    /// stream reads its user's partition only, so ids keep their form. Every replica must use
    /// the same count; to change it, stop every replica and delete the streams.
    #[arg(long, env = "SSEGATE_NATS_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    pub nats_partitions: u8,

    /// WatchPresence: a user with no stream anywhere in the cluster for this long goes offline;
    /// a reconnect within it emits nothing.
    #[arg(long, env = "SSEGATE_PRESENCE_GRACE", default_value = "5s", value_parser = duration)]
    pub presence_grace: Duration,

    /// WatchPresence: transitions queued per watcher at most; a watcher that does not read
    /// and reaches it is cut off (RESOURCE_EXHAUSTED) and reconnects for a fresh snapshot.
    #[arg(long, env = "SSEGATE_PRESENCE_WATCHER_QUEUE", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub presence_watcher_queue: u32,

    /// Also POST the presence transitions (this replica's share of the users) as JSON batches
    /// to this `http://` URL.
    #[arg(long, env = "SSEGATE_PRESENCE_WEBHOOK")]
    pub presence_webhook: Option<String>,

    /// Most events in one webhook POST.
    #[arg(long, env = "SSEGATE_PRESENCE_WEBHOOK_BATCH", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub presence_webhook_batch: u32,

    /// How long a webhook event waits for others to share its POST (a full batch goes at once).
    #[arg(long, env = "SSEGATE_PRESENCE_WEBHOOK_DELAY", default_value = "100ms", value_parser = duration)]
    pub presence_webhook_delay: Duration,

    /// Longest a webhook POST may take (connect to answer); past it the batch is retried.
    #[arg(long, env = "SSEGATE_PRESENCE_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub presence_webhook_timeout: Duration,

    /// Most webhook events queued (while the endpoint is slow or down); beyond it the oldest is
    /// dropped, counted and logged.
    #[arg(long, env = "SSEGATE_PRESENCE_WEBHOOK_QUEUE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub presence_webhook_queue: u32,

    /// Interval between heartbeat comments on an idle stream.
    #[arg(long, env = "SSEGATE_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// Reconnection delay advertised to clients in the `retry:` field.
    #[arg(long, env = "SSEGATE_RETRY", default_value = "3s", value_parser = duration)]
    pub retry: Duration,

    /// Events a connection may have queued before it is cut off as a slow consumer (see also
    /// --max-queue-bytes; whichever is reached first).
    #[arg(long, env = "SSEGATE_QUEUE_CAPACITY", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub queue_capacity: u32,

    /// Bytes a connection may have queued (each event counts its encoded size plus 64) before
    /// it is cut off as a slow consumer; bounds the memory one reader that stopped reading pins.
    #[arg(long, env = "SSEGATE_MAX_QUEUE_BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub max_queue_bytes: u64,

    /// A connection writes at most once per this window under load, carrying everything
    /// pending in one write; the first event after a quiet period goes out at once. 0 = off.
    #[arg(long, env = "SSEGATE_WRITE_COALESCE", default_value = "5ms", value_parser = duration)]
    pub write_coalesce: Duration,

    /// Events kept for resuming clients (`Last-Event-ID`); 0 disables replay.
    #[arg(long, env = "SSEGATE_REPLAY_CAPACITY", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub replay_capacity: u32,

    /// Most bytes of encoded events the replay log keeps.
    #[arg(long, env = "SSEGATE_REPLAY_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub replay_max_bytes: u64,

    /// Events older than this are no longer replayed.
    #[arg(long, env = "SSEGATE_REPLAY_MAX_AGE", default_value = "5m", value_parser = duration)]
    pub replay_max_age: Duration,

    /// Most retained values (one per target and event name, see "State on page load"); a
    /// retained publish that would add one more gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "SSEGATE_MAX_RETAINED", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(0..=100_000_000))]
    pub max_retained: u32,

    /// Most bytes the retained values take (each its encoded event, its key and 64); a
    /// retained publish over it gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "SSEGATE_MAX_RETAINED_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_retained_bytes: u64,

    /// Most SSE connections at once; more get HTTP 503 with Retry-After. Unset: 50000, or the
    /// HTTP port's socket budget if lower (the open-files limit, `ulimit -n`, minus a reserve
    /// of a tenth, 128 to 4096: logged at start), so the default always fits; a value above
    /// that budget is warned about at start.
    #[arg(long, env = "SSEGATE_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Most SSE connections of one user at once; more get HTTP 429 with Retry-After.
    #[arg(long, env = "SSEGATE_MAX_CONNECTIONS_PER_USER", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_user: u32,

    /// Close each SSE connection cleanly after about this long (minus up to 10% jitter), so
    /// clients reconnect and rebalance across replicas; they resume with no loss. Off unless set.
    #[arg(long, env = "SSEGATE_MAX_CONNECTION_LIFETIME", value_parser = duration)]
    pub max_connection_lifetime: Option<Duration>,

    /// Largest event accepted (name + data, in bytes).
    #[arg(long, env = "SSEGATE_MAX_EVENT_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_event_bytes: u32,

    /// Most ids in one list of a request (users of a Publish, entries of a Presence query).
    #[arg(long, env = "SSEGATE_MAX_IDS_PER_REQUEST", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_ids_per_request: u32,

    /// Most groups plus topics one connection may join.
    #[arg(long, env = "SSEGATE_MAX_SUBSCRIPTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub max_subscriptions: u32,

    /// Largest gRPC request message accepted, in bytes.
    #[arg(long, env = "SSEGATE_GRPC_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=268_435_456))]
    pub grpc_max_message_bytes: u32,

    /// Subscribers' JWTs are HS256-signed with the secret in this file (at least 32 bytes).
    #[arg(long, env = "SSEGATE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Subscribers' JWTs are signed with the private key matching this PEM public key (RSA:
    /// RS256, EC P-256: ES256, Ed25519: EdDSA).
    #[arg(long, env = "SSEGATE_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Subscribers' JWTs are signed with one of the keys of this JWKS file (matched by `kid`).
    #[arg(long, env = "SSEGATE_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// If set, a JWT's `iss` must equal it.
    #[arg(long, env = "SSEGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// If set, a JWT's `aud` must contain it.
    #[arg(long, env = "SSEGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated when checking a JWT's `exp` and `nbf`.
    #[arg(long, env = "SSEGATE_JWT_LEEWAY", default_value = "30s", value_parser = duration)]
    pub jwt_leeway: Duration,

    /// Name of the cookie that may carry a subscriber's JWT.
    #[arg(long, env = "SSEGATE_TOKEN_COOKIE", default_value = "ssegate_token")]
    pub token_cookie: String,

    /// Ask the application's backend whether each new stream may open, and as whom: it
    /// implements `ssegate.v1.Authorizer/Authorize` (proto/ssegate/v1/authorizer.proto) at this
    /// address, `http://host:port` (h2c for gRPC) or `https://host:port` (TLS). For session
    /// cookies; with --jwt-* keys too, a request carrying a JWT is decided by the JWT.
    #[arg(long, env = "SSEGATE_AUTHORIZER_ADDR")]
    pub authorizer_addr: Option<String>,

    /// How to call the authorizer: `grpc`, or `connect` (a plain HTTP POST of JSON to
    /// <addr>/ssegate.v1.Authorizer/Authorize, e.g. a Spring @PostMapping).
    #[arg(long, env = "SSEGATE_AUTHORIZER_PROTOCOL", default_value = "grpc")]
    pub authorizer_protocol: AuthorizerProtocol,

    /// A request header to send to the authorizer besides the cookies (repeatable or
    /// comma-separated; none by default).
    #[arg(long, env = "SSEGATE_AUTHORIZER_HEADER", value_delimiter = ',')]
    pub authorizer_header: Vec<String>,

    /// Send only these cookies to the authorizer (repeatable or comma-separated); all of them
    /// by default. Naming the session cookie keeps unrelated cookies out of the call and the
    /// cache key.
    #[arg(long, env = "SSEGATE_AUTHORIZER_COOKIE", value_delimiter = ',')]
    pub authorizer_cookie: Vec<String>,

    /// Longest wait for the authorizer's answer (a place among the calls in flight included);
    /// past it the stream is refused with 503.
    #[arg(long, env = "SSEGATE_AUTHORIZER_TIMEOUT", default_value = "2s", value_parser = positive_duration)]
    pub authorizer_timeout: Duration,

    /// An allow answer is reused for the same credential (cookies, headers and query sent) this
    /// long, never past its `expires_at`; a deny for at most 5s. 0 = ask every time.
    #[arg(long, env = "SSEGATE_AUTHORIZER_CACHE_TTL", default_value = "30s", value_parser = duration)]
    pub authorizer_cache_ttl: Duration,

    /// Most authorizer answers cached (the oldest go first).
    #[arg(long, env = "SSEGATE_AUTHORIZER_CACHE_SIZE", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub authorizer_cache_size: u32,

    /// Most calls to the authorizer at once; more wait (at most half of --authorizer-timeout,
    /// so each call has the other half) for one to finish, else get 503.
    #[arg(long, env = "SSEGATE_AUTHORIZER_MAX_IN_FLIGHT", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub authorizer_max_in_flight: u32,

    /// A CA (PEM) to trust for an https:// authorizer, besides the system's roots.
    #[arg(long, env = "SSEGATE_AUTHORIZER_TLS_CA_FILE")]
    pub authorizer_tls_ca_file: Option<PathBuf>,

    /// DEVELOPMENT ONLY: believe `?user=` (and `group=`, `topic=`) without any token. Anyone
    /// can then read anyone's events.
    #[arg(long, env = "SSEGATE_INSECURE_DEV_IDENTITY")]
    pub insecure_dev_identity: bool,

    /// Publishers must send one of the API keys in this file (one per line, `#` comments) as
    /// `authorization: Bearer <key>`. Re-read when it changes.
    #[arg(long, env = "SSEGATE_PUBLISHER_API_KEYS_FILE")]
    pub publisher_api_keys_file: Option<PathBuf>,

    /// More publisher API keys, comma-separated (usually from a Secret as an env var).
    #[arg(long, env = "SSEGATE_PUBLISHER_API_KEYS", hide_env_values = true)]
    pub publisher_api_keys: Option<String>,

    /// DEVELOPMENT ONLY: anyone who can reach the gRPC port may publish.
    #[arg(long, env = "SSEGATE_INSECURE_OPEN_PUBLISH")]
    pub insecure_open_publish: bool,

    /// Serve TLS on the HTTP and gRPC ports with this PEM certificate chain (re-read when it
    /// changes). Needs --tls-key-file.
    #[arg(long, env = "SSEGATE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// The PEM private key of --tls-cert-file (re-read when it changes).
    #[arg(long, env = "SSEGATE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Require publishers to present a client certificate signed by a CA in this PEM file
    /// (mutual TLS on the gRPC port). Needs --tls-cert-file.
    #[arg(long, env = "SSEGATE_GRPC_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub grpc_client_ca_file: Option<PathBuf>,

    /// Most TCP connections to the HTTP port from one IP address; 0 for no limit. Leave it 0
    /// behind a proxy or ingress, where every client shares the proxy's address.
    #[arg(long, env = "SSEGATE_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: u32,

    /// Largest HTTP request head (request line and headers) accepted, in bytes.
    #[arg(long, env = "SSEGATE_MAX_HEADER_BYTES", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(8_192..=1_048_576))]
    pub max_header_bytes: u32,

    /// Time a new connection (on any port) may take to send its first request: whole headers,
    /// or the HTTP/2 preface and a stream, TLS handshake included. Silent sockets are closed.
    #[arg(long, env = "SSEGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,

    /// A connection (any port) with no request in flight is closed after this long: an HTTP/1.1
    /// keep-alive or HTTP/2 connection with no open stream. Event streams are never idle.
    #[arg(long, env = "SSEGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// The longest a response (any port) may go without sending progress: a socket write that
    /// stays blocked, or an HTTP/2 response the client gives no flow-control window, this long
    /// closes its connection. Admitted event streams are exempt (their bound is the queue's).
    #[arg(long, env = "SSEGATE_SEND_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub send_timeout: Duration,

    /// Most connections on the HTTP port that have not sent a complete request yet (TLS
    /// handshakes included); at the limit, a new one evicts the one that has waited longest.
    #[arg(long, env = "SSEGATE_MAX_PENDING_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_connections: u32,

    /// On SIGTERM/SIGINT, how long to keep serving while reporting not ready, before draining:
    /// time for load balancers (Kubernetes endpoints) to stop sending new traffic.
    #[arg(long, env = "SSEGATE_SHUTDOWN_DELAY", default_value = "0s", value_parser = duration)]
    pub shutdown_delay: Duration,

    /// On SIGTERM/SIGINT, the longest wait for streams and calls to end before exiting.
    #[arg(long, env = "SSEGATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Origins allowed to subscribe from a web page on another origin, comma-separated, or `*`.
    /// Empty: no cross-origin access.
    #[arg(long, env = "SSEGATE_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,

    /// Log output: `pretty` for people, `json` for log collectors. Filter with RUST_LOG.
    #[arg(long, env = "SSEGATE_LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
}

/// A duration above zero: a send timeout of zero would cut every write that waits at all.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be more than 0 (examples: 500ms, 10s)".to_owned()),
        d => Ok(d),
    }
}

/// `always`, or a positive duration: the group-commit interval.
fn sync_policy(s: &str) -> Result<SyncPolicy, String> {
    if s == "always" {
        return Ok(SyncPolicy::Always);
    }
    match duration(s) {
        Ok(d) if !d.is_zero() => Ok(SyncPolicy::Every(d)),
        _ => Err("expected `always` or a duration above 0 (examples: 5ms, 10ms)".to_owned()),
    }
}
