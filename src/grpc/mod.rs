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

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::server::HealthReporter;

use crate::{
    auth::PublisherAuth,
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
    let GrpcSettings { limits, auth, metrics, max_message_bytes } = settings;
    let publisher = pb::publisher_server::PublisherServer::new(PublisherService::new(router, limits, metrics.clone()))
        .max_decoding_message_size(max_message_bytes);
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
    Ok(Server::builder()
        .layer(GrpcTelemetryLayer::new(metrics))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(publisher)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await?)
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
