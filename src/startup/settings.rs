//! The server's settings, made once from the flags: typed (durations, sizes, addresses),
//! validated, grouped by the module they are for, and passed down. No module below reads a
//! flag; the few tunables that are not flags live here too, named and documented.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    auth::{authorizer::AuthorizerSettings, jwt::JwtSettings},
    backplane::nats::NatsSettings,
    config::{BackplaneKind, ServeArgs},
    grpc,
    http::{HttpSettings, server::ServerLimits},
    net::{Budget, Timeouts},
    presence::{
        PresenceConfig,
        webhook::{self, WebhookConfig, WebhookUrlError},
    },
    router::{ReplayConfig, RetainedConfig, RouterConfig},
    store::SyncPolicy,
};

/// How often key and certificate files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// How long the memory backplane remembers an idempotency key (the proto documents it; the
/// NATS backplane uses `--nats-duplicate-window`).
const MEMORY_DEDUPE_WINDOW: Duration = Duration::from_secs(120);

/// Longest wait at start for a replica to catch up with the broker's stream before it serves.
const NATS_CATCH_UP: Duration = Duration::from_secs(60);

/// Most concurrent streams on one HTTP/2 connection when `--max-connections-per-ip` is 0: the
/// RFC 9113 recommended minimum, far more than a browser opens for event streams.
const DEFAULT_H2_STREAMS: u32 = 100;

/// The most SSE connections by default (`--max-connections` unset), if the descriptor limit
/// allows as many.
const DEFAULT_MAX_CONNECTIONS: usize = 50_000;

/// `--max-connections` when it is not given: `DEFAULT_MAX_CONNECTIONS`, or the HTTP port's
/// socket budget (out of the open-files limit) if that is lower, so that a default start never
/// admits more event streams than the port can hold sockets.
fn default_max_connections(budget: Budget) -> usize {
    budget.http.clamp(1, DEFAULT_MAX_CONNECTIONS)
}

/// Flags that cannot be used together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Conflict(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Webhook(#[from] WebhookUrlError),
}

/// Where published events go.
#[derive(Clone, Debug)]
pub enum BackplaneSettings {
    /// `data`: the durable store (`--data-dir`), if any.
    Memory {
        dedupe_window: Duration,
        data: Option<DataSettings>,
    },
    Nats(NatsSettings),
}

/// The memory backplane's data directory (`--data-dir`, `--data-sync`).
#[derive(Clone, Debug)]
pub struct DataSettings {
    pub dir: PathBuf,
    pub sync: SyncPolicy,
    /// A quarter of `--replay-max-bytes`, within 1 to 64 MiB: the log is removed a segment at a
    /// time once its events left the replay log, so the disk holds the replay span plus about
    /// one segment (and the retained values' checkpoint).
    pub segment_bytes: u64,
}

/// The bounds of the data dir's segment size (`DataSettings::segment_bytes`).
const SEGMENT_BYTES: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 20);

/// Who may subscribe.
#[derive(Clone, Debug)]
pub struct SubscriberSettings {
    pub jwt: JwtSettings,
    /// The cookie that may carry the token.
    pub cookie: String,
    /// Development only: believe `?user=` without a token.
    pub insecure_dev_identity: bool,
    /// The application's backend decides (`--authorizer-addr`), if set.
    pub authorizer: Option<AuthorizerSettings>,
}

/// Who may publish.
#[derive(Clone, Debug)]
pub struct PublisherSettings {
    pub api_keys_file: Option<PathBuf>,
    pub api_keys: Option<String>,
    /// Publishers are whoever presents a client certificate (`--grpc-client-ca-file`).
    pub client_certificates: bool,
    /// Development only: anyone may publish.
    pub insecure_open: bool,
}

/// The TLS certificate of the HTTP and gRPC ports.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA of the client certificates the gRPC port requires (mutual TLS).
    pub grpc_client_ca: Option<PathBuf>,
}

/// What happens on SIGTERM.
#[derive(Clone, Copy, Debug)]
pub struct ShutdownSettings {
    /// Keep serving, not ready, this long first.
    pub delay: Duration,
    /// Longest wait for streams and calls to end.
    pub grace: Duration,
    /// The reconnection delay clients are sent (jittered) as their streams end.
    pub retry: Duration,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The admin console's token file (`--console-token-file`); the console is off without it.
    pub console_token_file: Option<PathBuf>,
    pub backplane: BackplaneSettings,
    /// The router's settings; `shards` and `epoch` are filled in at build (from the runtime and
    /// the backplane).
    pub router: RouterConfig,
    pub http: HttpSettings,
    pub server: ServerLimits,
    pub grpc: grpc::Limits,
    /// First-request and idle deadlines, on every port.
    pub timeouts: Timeouts,
    /// Most not-yet-admitted sockets on the HTTP port.
    pub max_pending_connections: usize,
    /// Whether `--max-connections` was given (`router.max_connections` is derived from the
    /// open-files limit otherwise, and cannot exceed it).
    pub max_connections_given: bool,
    pub heartbeat_interval: Duration,
    /// `WatchPresence` and the presence webhook.
    pub presence: PresenceConfig,
    /// `--presence-webhook` and its tunables, if set.
    pub presence_webhook: Option<WebhookConfig>,
    pub subscriber: SubscriberSettings,
    pub publisher: PublisherSettings,
    pub tls: Option<TlsFiles>,
    pub shutdown: ShutdownSettings,
    pub reload_every: Duration,
    pub nats_catch_up: Duration,
}

/// A count flag as a size (flags are `u32`/`u64` for clap's range checks).
fn size(n: impl TryInto<usize>) -> usize {
    n.try_into().unwrap_or(usize::MAX)
}

impl Settings {
    pub fn from_args(a: ServeArgs) -> Result<Self, ConfigError> {
        let jwt = JwtSettings {
            secret_file: a.jwt_secret_file,
            public_key_file: a.jwt_public_key_file,
            jwks_file: a.jwt_jwks_file,
            issuer: a.jwt_issuer,
            audience: a.jwt_audience,
            leeway: a.jwt_leeway,
        };
        if jwt.is_configured() && a.insecure_dev_identity {
            return Err(ConfigError::Conflict("--insecure-dev-identity cannot be combined with --jwt-* keys"));
        }
        if a.authorizer_addr.is_some() && a.insecure_dev_identity {
            return Err(ConfigError::Conflict("--insecure-dev-identity cannot be combined with --authorizer-addr"));
        }
        let authorizer = match a.authorizer_addr {
            None => None,
            Some(url) => Some(AuthorizerSettings {
                url,
                protocol: a.authorizer_protocol,
                headers: a
                    .authorizer_header
                    .iter()
                    .map(|h| {
                        http::HeaderName::from_bytes(h.trim().as_bytes())
                            .map_err(|_| ConfigError::Invalid(format!("--authorizer-header {h}: not a header name")))
                    })
                    .collect::<Result<_, _>>()?,
                cookies: a.authorizer_cookie.iter().map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect(),
                timeout: a.authorizer_timeout,
                cache_ttl: a.authorizer_cache_ttl,
                cache_size: size(a.authorizer_cache_size),
                max_in_flight: size(a.authorizer_max_in_flight),
                tls_ca_file: a.authorizer_tls_ca_file,
            }),
        };
        let timeouts = Timeouts { first_request: a.header_read_timeout, idle: a.idle_timeout, send: a.send_timeout };
        let backplane = match a.backplane {
            BackplaneKind::Memory => BackplaneSettings::Memory {
                dedupe_window: MEMORY_DEDUPE_WINDOW,
                data: a.data_dir.map(|dir| DataSettings {
                    dir,
                    sync: a.data_sync,
                    segment_bytes: (a.replay_max_bytes / 4).clamp(*SEGMENT_BYTES.start(), *SEGMENT_BYTES.end()),
                }),
            },
            BackplaneKind::Nats if a.data_dir.is_some() => {
                return Err(ConfigError::Conflict(
                    "--data-dir is for the memory backplane; with --backplane nats the JetStream stream keeps \
                     the events: remove --data-dir",
                ));
            }
            BackplaneKind::Nats => BackplaneSettings::Nats(NatsSettings {
                urls: a.nats_url,
                creds_file: a.nats_creds_file,
                tls_ca_file: a.nats_tls_ca_file,
                stream: a.nats_stream,
                subject: a.nats_subject,
                max_age: a.nats_stream_max_age,
                max_bytes: a.nats_stream_max_bytes,
                duplicate_window: a.nats_duplicate_window,
                publish_timeout: a.nats_publish_timeout,
                cluster_wait: a.nats_cluster_wait,
                stream_replicas: usize::from(a.nats_stream_replicas),
                interest: a.nats_delivery == crate::config::NatsDelivery::Interest,
                linger: a.nats_interest_linger,
                partitions: usize::from(a.nats_partitions),
                partition: 0,
            }),
        };
        Ok(Self {
            http_addr: a.http_addr,
            grpc_addr: a.grpc_addr,
            admin_addr: a.admin_addr,
            console_token_file: a.console_token_file,
            backplane,
            router: RouterConfig {
                queue_capacity: size(a.queue_capacity),
                max_queue_bytes: size(a.max_queue_bytes),
                write_coalesce: a.write_coalesce,
                shards: 1,
                epoch: None,
                shared_sequence: false,
                replay: ReplayConfig {
                    capacity: size(a.replay_capacity),
                    max_bytes: size(a.replay_max_bytes),
                    max_age: a.replay_max_age,
                },
                retained: RetainedConfig { max_values: size(a.max_retained), max_bytes: size(a.max_retained_bytes) },
                max_connections: a.max_connections.map_or_else(|| default_max_connections(Budget::for_process()), size),
                max_connections_per_user: size(a.max_connections_per_user),
            },
            http: HttpSettings {
                retry: a.retry,
                max_subscriptions: size(a.max_subscriptions),
                cors_allowed_origins: a.cors_allowed_origins,
                max_connection_lifetime: a.max_connection_lifetime,
                demo_page: a.insecure_dev_identity,
            },
            server: ServerLimits {
                timeouts,
                max_header_bytes: size(a.max_header_bytes),
                max_connections_per_ip: size(a.max_connections_per_ip),
                // As many streams on one h2 connection as connections from one address, if limited.
                max_streams_per_connection: match a.max_connections_per_ip {
                    0 => DEFAULT_H2_STREAMS,
                    n => n,
                },
            },
            grpc: grpc::Limits {
                max_event_bytes: size(a.max_event_bytes),
                max_ids_per_request: size(a.max_ids_per_request),
                max_message_bytes: size(a.grpc_max_message_bytes),
            },
            timeouts,
            max_pending_connections: size(a.max_pending_connections),
            max_connections_given: a.max_connections.is_some(),
            heartbeat_interval: a.heartbeat_interval,
            presence: PresenceConfig { grace: a.presence_grace, watcher_queue: size(a.presence_watcher_queue) },
            presence_webhook: match &a.presence_webhook {
                None => None,
                Some(url) => Some(WebhookConfig {
                    url: webhook::parse_url(url)?,
                    batch: size(a.presence_webhook_batch),
                    delay: a.presence_webhook_delay,
                    timeout: a.presence_webhook_timeout,
                    queue: size(a.presence_webhook_queue),
                }),
            },
            subscriber: SubscriberSettings {
                jwt,
                cookie: a.token_cookie,
                insecure_dev_identity: a.insecure_dev_identity,
                authorizer,
            },
            publisher: PublisherSettings {
                api_keys_file: a.publisher_api_keys_file,
                api_keys: a.publisher_api_keys,
                client_certificates: a.grpc_client_ca_file.is_some(),
                insecure_open: a.insecure_open_publish,
            },
            tls: match (a.tls_cert_file, a.tls_key_file) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key, grpc_client_ca: a.grpc_client_ca_file }),
                _ => None,
            },
            shutdown: ShutdownSettings { delay: a.shutdown_delay, grace: a.shutdown_grace, retry: a.retry },
            reload_every: RELOAD_EVERY,
            nats_catch_up: NATS_CATCH_UP,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    fn settings(extra: &[&str]) -> Result<Settings, ConfigError> {
        let Cli { command: Command::Serve(args) } =
            Cli::try_parse_from([&["ssegate", "serve"], extra].concat()).unwrap()
        else {
            panic!("not serve")
        };
        Settings::from_args(*args)
    }

    #[test]
    fn flags_become_typed_settings_once() {
        let s = settings(&["--max-connections-per-ip", "8", "--max-retained", "5", "--idle-timeout", "90s"]).unwrap();
        assert_eq!(s.server.max_streams_per_connection, 8);
        assert_eq!(s.router.retained.max_values, 5);
        assert_eq!((s.timeouts.idle, s.server.timeouts.idle), (Duration::from_secs(90), Duration::from_secs(90)));
        assert!(
            matches!(s.backplane, BackplaneSettings::Memory { dedupe_window, data: None } if dedupe_window == MEMORY_DEDUPE_WINDOW)
        );
        assert!(s.tls.is_none());
        assert_eq!(settings(&[]).unwrap().server.max_streams_per_connection, DEFAULT_H2_STREAMS);
    }

    #[test]
    fn max_connections_defaults_to_what_the_descriptor_limit_allows_and_a_given_value_is_kept() {
        assert_eq!(default_max_connections(Budget::from_limit(4096)), 3687);
        assert_eq!(default_max_connections(Budget::from_limit(1 << 20)), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(default_max_connections(Budget::from_limit(64)), 1, "never 0: one stream may still fit");
        let default = settings(&[]).unwrap();
        assert!(!default.max_connections_given);
        assert_eq!(default.router.max_connections, default_max_connections(Budget::for_process()));
        let given = settings(&["--max-connections", "100000"]).unwrap();
        assert!(given.max_connections_given);
        assert_eq!(given.router.max_connections, 100_000, "kept as given, even above the budget");
    }

    #[test]
    fn the_send_timeout_reaches_every_port_and_cannot_be_zero() {
        assert_eq!(settings(&[]).unwrap().timeouts.send, Duration::from_secs(10));
        let s = settings(&["--send-timeout", "3s"]).unwrap();
        assert_eq!((s.timeouts.send, s.server.timeouts.send), (Duration::from_secs(3), Duration::from_secs(3)));
        assert!(Cli::try_parse_from(["ssegate", "serve", "--send-timeout", "0s"]).is_err());
    }

    #[test]
    fn conflicting_flags_are_refused() {
        let both = settings(&["--insecure-dev-identity", "--jwt-secret-file", "/x"]);
        assert!(matches!(both, Err(ConfigError::Conflict(_))));
        let nats = settings(&["--backplane", "nats", "--data-dir", "/x"]);
        assert!(matches!(nats, Err(ConfigError::Conflict(m)) if m.contains("--data-dir")));
    }

    #[test]
    fn authorizer_flags_become_its_settings_and_conflict_with_the_development_identity() {
        assert!(settings(&[]).unwrap().subscriber.authorizer.is_none());
        let s = settings(&[
            "--authorizer-addr",
            "http://app:8080",
            "--authorizer-protocol",
            "connect",
            "--authorizer-header",
            "X-Tenant,authorization",
            "--authorizer-cookie",
            "SESSION",
        ])
        .unwrap();
        let a = s.subscriber.authorizer.unwrap();
        assert_eq!((a.url.as_str(), a.protocol), ("http://app:8080", crate::config::AuthorizerProtocol::Connect));
        assert_eq!(a.headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(), ["x-tenant", "authorization"]);
        assert_eq!(a.cookies, ["SESSION"]);
        assert_eq!((a.timeout, a.cache_ttl, a.max_in_flight), (Duration::from_secs(2), Duration::from_secs(30), 64));
        let bad = settings(&["--authorizer-addr", "http://a:1", "--authorizer-header", "bad header"]);
        assert!(matches!(bad, Err(ConfigError::Invalid(m)) if m.contains("bad header")));
        let dev = settings(&["--authorizer-addr", "http://a:1", "--insecure-dev-identity"]);
        assert!(matches!(dev, Err(ConfigError::Conflict(m)) if m.contains("--authorizer-addr")));
        assert!(Cli::try_parse_from(["ssegate", "serve", "--authorizer-timeout", "0s"]).is_err());
    }

    #[test]
    fn the_data_dir_takes_a_sync_policy_always_by_default() {
        let data = |extra: &[&str]| match settings(extra).unwrap().backplane {
            BackplaneSettings::Memory { data, .. } => data,
            BackplaneSettings::Nats(_) => panic!("not memory"),
        };
        let d = data(&["--data-dir", "/d"]).unwrap();
        assert_eq!((d.dir, d.sync), (PathBuf::from("/d"), SyncPolicy::Always));
        let d = data(&["--data-dir", "/d", "--data-sync", "10ms"]).unwrap();
        assert_eq!(d.sync, SyncPolicy::Every(Duration::from_millis(10)));
        for bad in ["0ms", "sometimes"] {
            assert!(Cli::try_parse_from(["ssegate", "serve", "--data-sync", bad]).is_err(), "{bad}");
        }
    }
}
