//! The gRPC edge: the `ssegate.v1.Publisher` service, plus the standard health and reflection
//! services. The only module that sees prost types; requests are parsed into domain types on
//! entry and errors mapped to `Status` in one place (`error.rs`).

pub mod authorizer;
pub mod client;
mod codec;
mod connect;
mod convert;
mod error;
mod health;
mod layers;
mod panic;
mod service;
mod unary;
mod watch;

pub use error::ApiError;
pub use health::{Health, HealthService};
pub use service::{Limits, PublisherService};

/// The HTTP/2 connection flow-control window of the gRPC port (see `serve`).
const CONNECTION_WINDOW: u32 = 8 << 20;
/// Generated protobuf types, server and client of `proto/ssegate/v1/publisher.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ssegate.v1");
    // The proto3 JSON mapping (serde impls of the types above), for HTTP/JSON calls.
    include!(concat!(env!("OUT_DIR"), "/ssegate.v1.serde.rs"));

    include!(concat!(env!("OUT_DIR"), "/ssegate_methods.rs"));

    /// The encoded `FileDescriptorSet` of the ssegate protos, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ssegate_descriptor.bin"));
}

use std::{future::Future, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{service::interceptor::InterceptedService, transport::Server};

use crate::{
    auth::PublisherAuth,
    backplane::Backplane,
    net::{self, Gate, Guarded, Registry, Timeouts},
    router::Partitions,
    telemetry::{grpc_layer::GrpcTelemetryLayer, metrics::EdgeMetrics},
};

/// What the gRPC edge is built from.
pub struct GrpcSettings {
    pub limits: Limits,
    pub auth: PublisherAuth,
    pub metrics: Arc<EdgeMetrics>,
    /// TLS (and, if it verifies client certificates, mutual TLS) for the port.
    pub tls: Option<TlsAcceptor>,
    /// Where publishes go.
    pub backplane: Arc<Backplane>,
    /// Who is online in the cluster, for `WatchPresence`.
    pub presence: Arc<crate::presence::Hub>,
    /// The port's budget of open and not yet admitted sockets.
    pub gate: Arc<Gate>,
    /// First-request and idle deadlines of its connections.
    pub timeouts: Timeouts,
}

/// Serves the publisher, health and reflection services on `listener` until `shutdown` is
/// cancelled; in-flight calls are answered before it returns. Connection tasks run on `tracker`.
pub async fn serve(
    listener: TcpListener,
    routers: Arc<Partitions>,
    settings: GrpcSettings,
    health: (Health, HealthService),
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), ServeError> {
    let (health, HealthService(health_service)) = health;
    let GrpcSettings { limits, auth, metrics, tls, backplane, presence, gate, timeouts } = settings;
    let max_message_bytes = limits.max_message_bytes;
    let service = PublisherService::new(routers, backplane, presence, limits, metrics.clone());
    // Read messages up to twice the limit, so that a `PublishStream` item over it is refused
    // alone (the service checks the limit); beyond that the call ends (`layers::Oversize`).
    let publisher = pb::publisher_server::PublisherServer::new(service)
        .max_decoding_message_size(max_message_bytes.saturating_mul(2));
    let registry = Arc::new(Registry::default());
    // Only the publisher needs credentials: health and reflection stay open for probes and tools.
    let authenticated = registry.clone();
    let publisher = InterceptedService::new(publisher, move |req| authorize(&auth, &authenticated, req));
    health.set_publisher_serving().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both reflection versions: v1alpha is what older tools (grpcurl 1.8) ask for.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // HTTP/1.1 too, for HTTP/JSON callers; `connect` answers those (outside the telemetry layer,
    // so the gRPC call it makes of them is counted like any other).
    let server = Server::builder()
        .accept_http1(true)
        // h2 drops a connection (GOAWAY ENHANCE_YOUR_CALM) once its small DATA frames waiting
        // to be read cost more than half the connection window (each counts as 256 bytes):
        // with hyper's 1 MiB, ~2,000 unread small publishes, which a pipelining publisher
        // reaches in a moment when the server is busy (`PublishStream` items, or many unary
        // calls on one connection). 8 MiB lets ~16,000 wait; each stream still holds at most
        // its 1 MiB window, and `PublishStream` reads ahead (`service::STREAM_IN_FLIGHT`).
        .initial_connection_window_size(CONNECTION_WINDOW)
        .layer(layers::InFlightLayer(registry.clone()))
        .layer(layers::OversizeLayer::new(max_message_bytes))
        .layer(connect::ConnectLayer::new(max_message_bytes))
        .layer(GrpcTelemetryLayer::new(metrics))
        .layer(panic::CatchPanicLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(publisher);
    let accept = Accept { listener, gate, timeouts, registry, shutdown: shutdown.clone(), tracker };
    let stopped = shutdown.cancelled_owned();
    match tls {
        None => server.serve_with_incoming_shutdown(accept.incoming(|io| async { Some(io) }), stopped).await?,
        Some(acceptor) => {
            let handshake = move |io: Guarded<TcpStream>| {
                let acceptor = acceptor.clone();
                async move {
                    let peer = io.get_ref().peer_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
                    // The guard also fails a silent handshake's reads; this bounds a trickling one.
                    match tokio::time::timeout(timeouts.first_request, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => Some(tls),
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "gRPC TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            tracing::info!(%peer, "gRPC TLS handshake timed out");
                            None
                        }
                    }
                }
            };
            server.serve_with_incoming_shutdown(accept.incoming(handshake), stopped).await?
        }
    }
    Ok(())
}

/// The interceptor run before every `Publisher` call: auth decides, this maps a refusal.
#[allow(clippy::result_large_err)] // the signature tonic's interceptors have
fn authorize(
    auth: &PublisherAuth,
    connections: &Registry,
    req: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    let header = req.metadata().get("authorization").map(|v| v.as_bytes());
    match auth.authorize(header) {
        Ok(()) => {
            // A publisher's connection: no longer among the strangers the gate may evict.
            if let Some(peer) = req.remote_addr() {
                connections.authenticated(peer);
            }
            Ok(req)
        }
        Err(denied) => Err(tonic::Status::unauthenticated(denied.to_string())),
    }
}

/// The gRPC port's accept side.
struct Accept {
    listener: TcpListener,
    gate: Arc<Gate>,
    timeouts: Timeouts,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Accept {
    /// Accepted connections, guarded (`net::idle`) and listed in the registry, after `upgrade`
    /// (the TLS handshake, in a task per connection so a slow client holds up no one). Ends
    /// at shutdown.
    fn incoming<IO, F, Fut>(self, upgrade: F) -> ReceiverStream<Result<IO, std::io::Error>>
    where
        IO: Send + 'static,
        F: Fn(Guarded<TcpStream>) -> Fut + Send + 'static,
        Fut: Future<Output = Option<IO>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let Self { listener, gate, timeouts, registry, shutdown, tracker } = self;
        let tasks = tracker.clone();
        tracker.spawn(net::accept_loop(
            listener,
            gate,
            shutdown,
            |_, _| {},
            move |stream, peer, admission| {
                let _ = stream.set_nodelay(true);
                let io = Guarded::admitted_on_auth(stream, timeouts, admission).register(&registry, peer);
                let (tx, upgraded) = (tx.clone(), upgrade(io));
                tasks.spawn(async move {
                    if let Some(io) = upgraded.await {
                        let _ = tx.send(Ok(io)).await;
                    }
                });
            },
        ));
        ReceiverStream::new(rx)
    }
}

/// The gRPC server could not start or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl tonic::transport::server::Connected for Guarded<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}
