//! Building and running the server: bind both listeners, start the tasks, drain on shutdown.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};

use crate::{
    admin::Readiness,
    auth::{ApiKeyError, PublisherAuth, jwt::KeyError},
    backplane::{Backplane, nats::NatsError},
    config::ServeArgs,
    event_stream, grpc,
    http::{self, HttpSettings},
    net::{Budget, Gate, Timeouts},
    router::{CloseReason, ReplayConfig, RetainedConfig, Router, RouterConfig},
    telemetry::metrics::Metrics,
    tls::{self, ReloadingCert},
};

mod from_flags;

use from_flags::{connect_backplane, publisher_auth, subscriber_auth};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr} ({port}): {source}")]
    Bind { addr: SocketAddr, port: &'static str, source: io::Error },
    #[error(transparent)]
    Cors(#[from] http::InvalidOrigin),
    #[error(transparent)]
    Grpc(#[from] grpc::ServeError),
    #[error("cannot read a bound address: {0}")]
    LocalAddr(#[from] io::Error),
    #[error("JWT keys: {0}")]
    Jwt(#[from] KeyError),
    #[error("publisher API keys: {0}")]
    ApiKeys(#[from] ApiKeyError),
    #[error("{0}")]
    Conflict(&'static str),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// How often key and certificate files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Most concurrent streams on one HTTP/2 connection when `--max-connections-per-ip` is 0: the
/// RFC 9113 recommended minimum, far more than a browser opens for event streams.
const DEFAULT_H2_STREAMS: u32 = 100;

/// A server with its listeners bound, ready to run. Tests build it with port 0 and read the
/// real ports back.
pub struct Application {
    config: ServeArgs,
    http: TcpListener,
    grpc: TcpListener,
    admin: TcpListener,
    router: Arc<Router>,
    app: http::App,
    metrics: Arc<Metrics>,
    publisher_auth: PublisherAuth,
    /// The TLS certificate, watched for changes, if TLS is on.
    cert: Option<Arc<ReloadingCert>>,
    /// TLS acceptors for the HTTP and gRPC ports.
    tls: Option<(TlsAcceptor, TlsAcceptor)>,
    backplane: Arc<Backplane>,
    ready: Readiness,
    /// Every task's stop signal (cancelled if the application is dropped without running) and
    /// the tracker they are spawned on; the NATS tasks start in `build`.
    stop: DropGuard,
    tracker: TaskTracker,
}

async fn bind(addr: SocketAddr, port: &'static str) -> Result<TcpListener, StartupError> {
    crate::net::bind(addr).map_err(|source| StartupError::Bind { addr, port, source })
}

impl Application {
    pub async fn build(config: ServeArgs) -> Result<Self, StartupError> {
        let (backplane, epoch) = connect_backplane(&config).await?;
        let router = Router::new(RouterConfig {
            queue_capacity: config.queue_capacity as usize,
            max_queue_bytes: usize::try_from(config.max_queue_bytes).unwrap_or(usize::MAX),
            write_coalesce: config.write_coalesce,
            // One shard per runtime worker: fan-out to different shards can run in parallel.
            shards: tokio::runtime::Handle::current().metrics().num_workers(),
            epoch,
            // A broker's stream numbers the events of every replica.
            shared_sequence: epoch.is_some(),
            replay: ReplayConfig {
                capacity: config.replay_capacity as usize,
                max_bytes: usize::try_from(config.replay_max_bytes).unwrap_or(usize::MAX),
                max_age: config.replay_max_age,
            },
            retained: RetainedConfig {
                max_values: config.max_retained as usize,
                max_bytes: usize::try_from(config.max_retained_bytes).unwrap_or(usize::MAX),
            },
            max_connections: config.max_connections as usize,
            max_connections_per_user: config.max_connections_per_user as usize,
        });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        // If building fails from here on, the tasks already started stop.
        let stop_on_drop = stop.clone().drop_guard();
        if let Backplane::Nats(nats) = &*backplane {
            // Fill the replay log and catch up before serving anyone.
            let capacity = u64::from(config.replay_capacity);
            nats.start(router.clone(), capacity, Duration::from_secs(60), &stop, &tracker).await?;
        }
        let metrics = Arc::new(Metrics::new(router.clone(), backplane.clone()));
        let subscriber_auth = subscriber_auth(&config, &stop, &tracker)?;
        let cert = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(ReloadingCert::load(cert.clone(), key.clone())?),
            _ => None,
        };
        let tls = match &cert {
            None => None,
            Some(cert) => Some((
                tls::acceptor(cert.clone(), None, &[b"h2", b"http/1.1"])?,
                tls::acceptor(cert.clone(), config.grpc_client_ca_file.as_deref(), &[b"h2", b"http/1.1"])?,
            )),
        };
        let publisher_auth = publisher_auth(&config)?;
        let app = http::app(
            router.clone(),
            subscriber_auth,
            &HttpSettings {
                retry: config.retry,
                max_subscriptions: config.max_subscriptions as usize,
                cors_allowed_origins: config.cors_allowed_origins.clone(),
                max_connection_lifetime: config.max_connection_lifetime,
                demo_page: config.insecure_dev_identity,
            },
            metrics.edge.clone(),
        )?;
        let http = bind(config.http_addr, "http").await?;
        let grpc = bind(config.grpc_addr, "grpc").await?;
        let admin = bind(config.admin_addr, "admin").await?;
        Ok(Self {
            config,
            http,
            grpc,
            admin,
            router,
            app,
            metrics,
            publisher_auth,
            cert,
            tls,
            ready: Readiness::new(),
            backplane,
            stop: stop_on_drop,
            tracker,
        })
    }

    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    pub fn http_addr(&self) -> io::Result<SocketAddr> {
        self.http.local_addr()
    }

    pub fn grpc_addr(&self) -> io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// Serves until `shutdown` completes, then drains: health turns NOT_SERVING, every stream
    /// gets a `retry:` with a randomised delay and ends, in-flight gRPC calls are answered, and
    /// whatever is still open after the grace period is dropped.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> Result<(), StartupError> {
        let Self {
            config,
            http,
            grpc,
            admin,
            router,
            app,
            metrics,
            publisher_auth,
            cert,
            tls,
            ready,
            backplane,
            stop,
            tracker,
        } = self;
        let stop = stop.disarm();
        if let Some(cert) = &cert {
            cert.watch(RELOAD_EVERY, &stop, &tracker);
        }
        let (http_tls, grpc_tls) = tls.unzip();
        if let PublisherAuth::ApiKeys(keys) = &publisher_auth {
            keys.clone().watch(RELOAD_EVERY, &stop, &tracker);
        }
        // The bound addresses, not the configured ones: with port 0 the log tells the real port.
        let (http_addr, grpc_addr, admin_addr) = (http.local_addr()?, grpc.local_addr()?, admin.local_addr()?);
        let (health, health_service) = grpc::Health::new();
        let timeouts = Timeouts { first_request: config.header_read_timeout, idle: config.idle_timeout };
        let budget = Budget::for_process();
        if budget.http < config.max_connections as usize {
            tracing::warn!(
                max_connections = config.max_connections,
                http_sockets = budget.http,
                "--max-connections is more than the descriptor limit allows on the HTTP port; raise \
                 the open-files limit (ulimit -n) or lower --max-connections"
            );
        }
        tracing::info!(http = budget.http, grpc = budget.grpc, admin = budget.admin, "sockets each port may hold");
        let http_gate = Gate::new("http", budget.http, config.max_pending_connections as usize);
        // Publishers and probes are few: their ports' whole budget may be pending.
        let grpc_gate = Gate::new("grpc", budget.grpc, budget.grpc);
        let admin_gate = Gate::new("admin", budget.admin, budget.admin);

        let limits = grpc::Limits {
            max_event_bytes: config.max_event_bytes as usize,
            max_ids_per_request: config.max_ids_per_request as usize,
            max_message_bytes: config.grpc_max_message_bytes as usize,
        };
        let grpc_task = tokio::spawn(grpc::serve(
            grpc,
            router.clone(),
            grpc::GrpcSettings {
                limits,
                auth: publisher_auth,
                metrics: metrics.edge.clone(),
                max_message_bytes: config.grpc_max_message_bytes as usize,
                tls: grpc_tls,
                backplane: backplane.clone(),
                gate: grpc_gate,
                timeouts,
            },
            (health.clone(), health_service),
            stop.clone(),
            tracker.clone(),
        ));
        let server_limits = http::server::ServerLimits {
            header_read_timeout: config.header_read_timeout,
            max_header_bytes: config.max_header_bytes as usize,
            max_connections_per_ip: config.max_connections_per_ip as usize,
            idle_timeout: config.idle_timeout,
            // As many streams on one h2 connection as connections from one address, if limited.
            max_streams_per_connection: match config.max_connections_per_ip {
                0 => DEFAULT_H2_STREAMS,
                n => n,
            },
        };
        tracker.spawn(http::server::serve(
            http,
            http_gate,
            app,
            server_limits,
            http_tls,
            metrics.edge.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        router.start_timers(config.heartbeat_interval, &stop, &tracker);
        // The admin port outlives the drain (it stops last), so probes answer throughout.
        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(http::admin::serve(
            admin,
            admin_gate,
            metrics,
            ready.clone(),
            timeouts,
            admin_stop.clone(),
            TaskTracker::new(),
        ));
        // The publisher's gRPC health follows the broker; stopped before the drain marks it.
        let broker_health_stop = stop.child_token();
        let broker_health =
            backplane.watch_up().map(|up| tracker.spawn(health.clone().follow_broker(up, broker_health_stop.clone())));
        ready.set(true);
        tracing::info!(http = %http_addr, grpc = %grpc_addr, admin = %admin_addr, "ssegate serving");

        shutdown.await;
        ready.set(false);
        broker_health_stop.cancel();
        if let Some(task) = broker_health {
            let _ = task.await;
        }
        health.set_not_serving().await;
        if !config.shutdown_delay.is_zero() {
            // Keep serving while load balancers notice we are not ready.
            tracing::info!(delay = ?config.shutdown_delay, "shutting down: not ready, still serving");
            tokio::time::sleep(config.shutdown_delay).await;
        }
        tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining connections");
        let retry_ms = config.retry.as_millis() as u64;
        let closed = router.close_all(CloseReason::Shutdown, move || {
            // Spread reconnections over [retry, 2*retry + 1s) so thousands of clients do not come
            // back in the same millisecond.
            Some(event_stream::retry(retry_ms + fastrand::u64(0..=retry_ms + 1000)))
        });
        stop.cancel();
        tracker.close();
        let drained = async {
            tracker.wait().await;
            grpc_task.await
        };
        match tokio::time::timeout(config.shutdown_grace, drained).await {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => tracing::error!(error = %join, "gRPC server task failed"),
            Err(_) => tracing::warn!(streams = closed, "grace period over: dropping what is still open"),
        }
        backplane.close().await;
        admin_stop.cancel();
        if let Err(e) = admin_task.await {
            tracing::warn!(error = %e, "admin server task failed");
        }
        tracing::info!("ssegate stopped");
        Ok(())
    }
}
