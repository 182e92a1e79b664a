//! The gRPC edge: the `ssegate.v1.Publisher` service, plus the standard health and reflection
//! services. The only module that sees prost types; requests are parsed into domain types on
//! entry and errors mapped to `Status` in one place (`error.rs`).

mod convert;
mod error;
mod service;

pub use error::ApiError;
pub use service::{Limits, PublisherService};

/// Generated protobuf types, server and client of `proto/ssegate/v1/publisher.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ssegate.v1");

    /// The encoded `FileDescriptorSet` of the ssegate protos, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ssegate_descriptor.bin"));
}

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::server::HealthReporter;

use crate::{
    auth::PublisherAuth,
    backplane::Backplane,
    router::Router,
    telemetry::{grpc_layer::GrpcTelemetryLayer, metrics::EdgeMetrics},
};

/// What the gRPC edge is built from.
pub struct GrpcSettings {
    pub limits: Limits,
    pub auth: PublisherAuth,
    pub metrics: Arc<EdgeMetrics>,
    /// Largest request message accepted.
    pub max_message_bytes: usize,
    /// TLS (and, if it verifies client certificates, mutual TLS) for the port.
    pub tls: Option<TlsAcceptor>,
    /// Where publishes go.
    pub backplane: Arc<Backplane>,
}

/// Serves the publisher, health and reflection services on `listener` until `shutdown`
/// completes; in-flight calls are answered before it returns.
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    settings: GrpcSettings,
    health: (
        HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (reporter, health_service) = health;
    let GrpcSettings { limits, auth, metrics, max_message_bytes, tls, backplane } = settings;
    let service = PublisherService::new(router, backplane, limits, metrics.clone());
    let publisher = pb::publisher_server::PublisherServer::new(service).max_decoding_message_size(max_message_bytes);
    // Only the publisher needs credentials: health and reflection stay open for probes and tools.
    let publisher = InterceptedService::new(publisher, move |req| auth.check(req));
    reporter.set_serving::<pb::publisher_server::PublisherServer<PublisherService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both reflection versions: v1alpha is what older tools (grpcurl 1.8) ask for.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let server = Server::builder()
        .layer(GrpcTelemetryLayer::new(metrics))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(publisher);
    match tls {
        None => {
            server.serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown).await?
        }
        Some(acceptor) => server.serve_with_incoming_shutdown(tls_incoming(listener, acceptor), shutdown).await?,
    }
    Ok(())
}

/// Accepted TLS connections. Each handshake runs in its own task, so a slow or hostile client
/// cannot hold up the others; failed handshakes are logged and skipped. Ends when the server
/// drops the stream.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "gRPC TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The gRPC server could not start or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Marks the publisher service not serving in the health service (used when draining).
pub async fn set_not_serving(reporter: &HealthReporter) {
    reporter.set_not_serving::<pb::publisher_server::PublisherServer<PublisherService>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
}
