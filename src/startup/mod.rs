//! Building and running the server: bind both listeners, start the tasks, drain on shutdown.

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};

use crate::{
    admin::Readiness,
    auth::{ApiKeyError, ApiKeys, PublisherAuth, jwt::KeyError},
    backplane::{Backplane, nats::NatsError},
    config::ServeArgs,
    event_stream, grpc, http,
    net::{self, Budget, Gate, Policy},
    presence::{self, Hub},
    router::{CloseReason, Partitions, Router, RouterConfig},
    store::StoreError,
    telemetry::metrics::Metrics,
    tls::{self, ReloadingCert},
};

mod from_flags;
pub mod settings;

use from_flags::{Connected, connect_backplane, publisher_auth, subscriber_auth};
pub use settings::{ConfigError, Settings};

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
    #[error(transparent)]
    Authorizer(#[from] grpc::authorizer::AuthorizerConfigError),
    #[error("JWT keys: {0}")]
    Jwt(#[from] KeyError),
    #[error("publisher API keys: {0}")]
    ApiKeys(#[from] ApiKeyError),
    #[error("--console-token-file: {0}")]
    ConsoleTokens(ApiKeyError),
    #[error("{0}")]
    Conflict(&'static str),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("--data-dir: {0}")]
    Store(#[from] StoreError),
}

/// A server with its listeners bound, ready to run. Tests build it with port 0 and read the
/// real ports back.
pub struct Application {
    settings: Settings,
    http: TcpListener,
    grpc: TcpListener,
    admin: TcpListener,
    routers: Arc<Partitions>,
    app: http::App,
    metrics: Arc<Metrics>,
    publisher_auth: PublisherAuth,
    /// The admin console's tokens (`--console-token-file`); the console is off without them.
    console_tokens: Option<Arc<ApiKeys>>,
    /// The TLS certificate, watched for changes, if TLS is on.
    cert: Option<Arc<ReloadingCert>>,
    /// TLS acceptors for the HTTP and gRPC ports.
    tls: Option<(TlsAcceptor, TlsAcceptor)>,
    backplane: Arc<Backplane>,
    /// Who is online in the cluster (`WatchPresence`), driven from `build` on.
    presence: Arc<Hub>,
    ready: Readiness,
    /// Every task's stop signal (cancelled if the application is dropped without running) and
    /// the tracker they are spawned on; the NATS tasks start in `build`.
    stop: DropGuard,
    tracker: TaskTracker,
}

/// The event that ends every stream at a shutdown, carrying the reconnect delay.
const SHUTDOWN_EVENT: &str = "ssegate.shutdown";

/// How often the data dir's health is read for the publisher's gRPC health.
const STORE_HEALTH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// With a data dir: whether it takes writes, read every `STORE_HEALTH_EVERY` until `stop`, for
/// the publisher's gRPC health (`None` without one).
fn store_up(
    backplane: &Arc<Backplane>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<tokio::sync::watch::Receiver<bool>> {
    if !backplane.has_data_dir() {
        return None;
    }
    let (tx, rx) = tokio::sync::watch::channel(true);
    let (backplane, stop) = (backplane.clone(), stop.clone());
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(STORE_HEALTH_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let trouble = backplane.store_trouble();
            if let Some(reason) = &trouble
                && *tx.borrow()
            {
                tracing::warn!(reason, "publisher NOT_SERVING: the data dir does not take writes");
            }
            // While down, re-asserted on every tick (as the broker probe does), so a SERVING set
            // by the gRPC server's start in between does not stick.
            if trouble.is_some() || !*tx.borrow() {
                tx.send_replace(trouble.is_none());
            }
        }
    });
    Some(rx)
}

/// A duration in whole milliseconds, for logs (a plain number, not `Debug` text).
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn bind(addr: SocketAddr, port: &'static str) -> Result<TcpListener, StartupError> {
    crate::net::bind(addr).map_err(|source| StartupError::Bind { addr, port, source })
}

impl Application {
    /// Builds from the flags (`Settings::from_args`) and binds the listeners.
    pub async fn build(args: ServeArgs) -> Result<Self, StartupError> {
        let settings = Settings::from_args(args)?;
        let Connected { backplane, epochs, shared_sequence, recovered } =
            connect_backplane(&settings.backplane).await?;
        let count = epochs.len();
        let per_partition = |total: usize| total.div_ceil(count).max(1);
        let routers = epochs
            .into_iter()
            .map(|epoch| {
                let mut config = RouterConfig {
                    // One shard per runtime worker: fan-out to different shards can run in parallel.
                    shards: tokio::runtime::Handle::current().metrics().num_workers(),
                    epoch,
                    shared_sequence,
                    ..settings.router.clone()
                };
                if count > 1 {
                    // The flags bound the replica: each partition holds its share (a broadcast,
                    // group or topic event is in every partition's log).
                    config.replay.capacity = per_partition(config.replay.capacity);
                    config.replay.max_bytes = per_partition(config.replay.max_bytes);
                    config.retained.max_bytes = per_partition(config.retained.max_bytes);
                    config.max_connections = per_partition(config.max_connections);
                }
                Router::new(config)
            })
            .collect();
        let routers = Arc::new(Partitions::new(routers));
        let router = routers.first().clone();
        if let Some(recovered) = recovered {
            // Before any connection exists: the replay log, retained values and keys come back.
            backplane.restore(&router, recovered).await?;
        }
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        // If building fails from here on, the tasks already started stop.
        let stop_on_drop = stop.clone().drop_guard();
        if let Backplane::Nats(nats) = &*backplane {
            // Fill the replay logs and catch up before serving anyone.
            let capacity = u64::try_from(routers.first().replay_window().capacity).unwrap_or(u64::MAX);
            nats.start(routers.clone(), capacity, settings.nats_catch_up, &stop, &tracker).await?;
        }
        let presence = match &*backplane {
            Backplane::Nats(nats) => {
                let hub = Hub::new(nats.cluster.id().into(), settings.presence.clone());
                let link = nats
                    .cluster
                    .start_presence(hub.clone(), &stop, &tracker)
                    .await
                    .map_err(|e| NatsError::Presence(e.to_string()))?;
                presence::start(hub.clone(), &routers, Some(link), &stop, &tracker);
                hub
            }
            Backplane::Memory(_) => {
                // A fresh id per process, as a cluster replica's: the webhook's event ids start
                // with it, so ids of a restarted process never repeat earlier ones.
                let hub = Hub::new(format!("{:016x}", fastrand::u64(..)).into(), settings.presence.clone());
                presence::start(hub.clone(), &routers, None, &stop, &tracker);
                hub
            }
        };
        if let Some(config) = settings.presence_webhook.clone() {
            let out = presence::webhook::Outgoing::new(presence.me().clone(), config.queue);
            presence.set_webhook(out.clone());
            presence::webhook::start(config, out, &stop, &tracker);
        }
        let metrics = Arc::new(Metrics::new(routers.clone(), backplane.clone(), presence.clone()));
        let subscriber_auth =
            subscriber_auth(&settings.subscriber, settings.reload_every, &stop, &tracker, &metrics.edge)?;
        let (cert, tls) = match &settings.tls {
            None => (None, None),
            Some(files) => {
                let cert = ReloadingCert::load(files.cert.clone(), files.key.clone())?;
                let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
                let http = tls::acceptor(cert.clone(), None, alpn)?;
                let grpc = tls::acceptor(cert.clone(), files.grpc_client_ca.as_deref(), alpn)?;
                (Some(cert), Some((http, grpc)))
            }
        };
        let publisher_auth = publisher_auth(&settings.publisher)?;
        let console_tokens = match &settings.console_token_file {
            None => None,
            Some(file) => Some(Arc::new(
                ApiKeys::load_for("console tokens", Some(file.clone()), None).map_err(StartupError::ConsoleTokens)?,
            )),
        };
        let app = http::app(routers.clone(), subscriber_auth, &settings.http, metrics.edge.clone())?;
        let http = bind(settings.http_addr, "http").await?;
        let grpc = bind(settings.grpc_addr, "grpc").await?;
        let admin = bind(settings.admin_addr, "admin").await?;
        Ok(Self {
            settings,
            http,
            grpc,
            admin,
            routers,
            app,
            metrics,
            publisher_auth,
            console_tokens,
            cert,
            tls,
            ready: {
                let backplane = backplane.clone();
                Readiness::new().reporting(move || backplane.store_trouble())
            },
            backplane,
            presence,
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
            settings,
            http,
            grpc,
            admin,
            routers,
            app,
            metrics,
            publisher_auth,
            console_tokens,
            cert,
            tls,
            ready,
            backplane,
            presence,
            stop,
            tracker,
        } = self;
        let stop = stop.disarm();
        if let Some(cert) = &cert {
            cert.watch(settings.reload_every, &stop, &tracker);
        }
        let (http_tls, grpc_tls) = tls.unzip();
        if let PublisherAuth::ApiKeys(keys) = &publisher_auth {
            keys.clone().watch(settings.reload_every, &stop, &tracker);
        }
        // The bound addresses, not the configured ones: with port 0 the log tells the real port.
        let (http_addr, grpc_addr, admin_addr) = (http.local_addr()?, grpc.local_addr()?, admin.local_addr()?);
        let (health, health_service) = grpc::Health::new();
        let timeouts = settings.timeouts;
        let budget = Budget::for_process();
        let max_connections = settings.router.max_connections;
        // Only a given value can exceed the budget: the default is derived from it.
        if settings.max_connections_given && budget.http < max_connections {
            tracing::warn!(
                max_connections,
                http_sockets = budget.http,
                "--max-connections is more than the descriptor limit allows on the HTTP port; raise \
                 the open-files limit (ulimit -n) or lower --max-connections"
            );
        }
        tracing::info!(
            http = budget.http,
            grpc = budget.grpc,
            admin = budget.admin,
            max_connections,
            "sockets each port may hold"
        );
        // A pending socket may be evicted for a newcomer once silent this long (never later
        // than its first-request deadline would close it anyway).
        let evict_after = net::EVICT_AFTER.min(timeouts.first_request);
        let policy =
            |max_open, max_pending, evict_oldest_open| Policy { max_open, max_pending, evict_after, evict_oldest_open };
        let http_gate = Gate::new("http", policy(budget.http, settings.max_pending_connections, false));
        // Strangers (connections with no authenticated call yet: health watchers, silent or
        // unauthenticated sockets) may hold half the gRPC port; the rest is kept for publishers.
        let grpc_gate = Gate::new("grpc", policy(budget.grpc, (budget.grpc / 2).max(1), false));
        // Probes must always get in: a full admin port evicts the connection open longest.
        let admin_gate = Gate::new("admin", policy(budget.admin, budget.admin, true));

        let grpc_task = tokio::spawn(grpc::serve(
            grpc,
            routers.clone(),
            grpc::GrpcSettings {
                limits: settings.grpc.clone(),
                auth: publisher_auth,
                metrics: metrics.edge.clone(),
                tls: grpc_tls,
                backplane: backplane.clone(),
                presence,
                gate: grpc_gate,
                timeouts,
            },
            (health.clone(), health_service),
            stop.clone(),
            tracker.clone(),
        ));
        tracker.spawn(http::server::serve(
            http,
            http_gate,
            app,
            settings.server.clone(),
            http_tls,
            metrics.edge.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        routers.start_timers(settings.heartbeat_interval, &stop, &tracker);
        if backplane.has_data_dir() {
            let (backplane, router, stop) = (backplane.clone(), routers.first().clone(), stop.clone());
            tracker.spawn(async move { backplane.maintain(&router, stop).await });
        }
        let console = console_tokens.map(|tokens| {
            tokens.clone().watch(settings.reload_every, &stop, &tracker);
            tracing::info!(path = "/console/", admin = %admin_addr, "admin console on");
            http::console::Console::new(
                routers.clone(),
                backplane.clone(),
                metrics.edge.clone(),
                tokens,
                settings.grpc.max_event_bytes,
                stop.clone(),
            )
        });
        // The admin port outlives the drain (it stops last), so probes answer throughout.
        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(http::admin::serve(
            admin,
            admin_gate,
            metrics,
            ready.clone(),
            console,
            timeouts,
            admin_stop.clone(),
            TaskTracker::new(),
        ));
        // The publisher's gRPC health follows the broker; stopped before the drain marks it.
        let broker_health_stop = stop.child_token();
        let up = backplane.watch_up().or_else(|| store_up(&backplane, &broker_health_stop, &tracker));
        let broker_health = up.map(|up| tracker.spawn(health.clone().follow_broker(up, broker_health_stop.clone())));
        ready.set(true);
        tracing::info!(http = %http_addr, grpc = %grpc_addr, admin = %admin_addr, "ssegate serving");

        shutdown.await;
        ready.set(false);
        broker_health_stop.cancel();
        if let Some(task) = broker_health {
            let _ = task.await;
        }
        health.set_not_serving().await;
        let drain = settings.shutdown;
        if !drain.delay.is_zero() {
            // Keep serving while load balancers notice we are not ready.
            tracing::info!(delay_ms = millis(drain.delay), "shutting down: not ready, still serving");
            tokio::time::sleep(drain.delay).await;
        }
        tracing::info!(grace_ms = millis(drain.grace), "shutting down: draining connections");
        let retry_ms = millis(drain.retry);
        let closed = routers.close_all(CloseReason::Shutdown, move || {
            // Spread reconnections over [retry, 2*retry + 1s) so thousands of clients do not come
            // back in the same millisecond. The `retry:` travels in a named event of its own
            // (`ssegate.shutdown`, its data the same delay): a parser that reports `retry` only
            // with a dispatched event (httpx-sse) sees it, one that hands every block to the app
            // (fetch-event-source) hands over a named event, never an empty message, and
            // EventSource dispatches nothing without a listener but takes the delay.
            let delay = retry_ms.saturating_add(fastrand::u64(0..=retry_ms.saturating_add(1000)));
            let block = format!("event: {SHUTDOWN_EVENT}\ndata: {{\"retry_ms\":{delay}}}\n");
            let mut last = block.into_bytes();
            last.extend_from_slice(&event_stream::retry(delay));
            last.push(b'\n');
            Some(last.into())
        });
        stop.cancel();
        tracker.close();
        let drained = async {
            tracker.wait().await;
            grpc_task.await
        };
        match tokio::time::timeout(drain.grace, drained).await {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => tracing::error!(error = %join, "gRPC server task failed"),
            Err(_) => tracing::warn!(streams = closed, "grace period over: dropping what is still open"),
        }
        backplane.close(routers.first()).await;
        admin_stop.cancel();
        if let Err(e) = admin_task.await {
            tracing::warn!(error = %e, "admin server task failed");
        }
        tracing::info!("ssegate stopped");
        Ok(())
    }
}
