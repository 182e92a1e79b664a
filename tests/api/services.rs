//! The standard gRPC health and reflection services are on.

use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::helpers::{TestApp, spawn_app};

async fn channel(app: &TestApp) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc)).unwrap().connect().await.unwrap()
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_publisher() {
    let app = spawn_app(&[]).await;
    let mut health = HealthClient::new(channel(&app).await);
    for service in ["", "ssegate.v1.Publisher"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_publisher_service() {
    let app = spawn_app(&[]).await;
    let mut client = ServerReflectionClient::new(channel(&app).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(Ok(msg)) = resp.next().await else { panic!("no reflection answer") };
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ssegate.v1.Publisher"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}
