//! The gRPC client side: `ssegate publish` sends one event through the public API.

use crate::{config::PublishArgs, grpc::pb};

/// Sends one event with `data` as the `publish` flags say, and returns its id.
pub async fn publish(args: PublishArgs, data: String) -> anyhow::Result<String> {
    use pb::publisher_client::PublisherClient;

    let event = Some(pb::Event { name: args.event, data });
    let mut endpoint = tonic::transport::Endpoint::from_shared(args.grpc_url.clone())?;
    if args.grpc_url.starts_with("https://") {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.tls_ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.tls_client_cert_file, &args.tls_client_key_file) {
            tls = tls.identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await.map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.grpc_url))?;
    let auth = match &args.api_key {
        Some(key) => Some(tonic::metadata::MetadataValue::try_from(format!("Bearer {key}"))?),
        None => None,
    };
    let mut client = PublisherClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(v) = &auth {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    });
    let key = args.idempotency_key.unwrap_or_default();
    let retain = if args.clear_retained {
        Some(pb::Retain { ttl_seconds: 0, clear: true })
    } else if args.retain {
        let ttl = args.retain_ttl.map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX));
        Some(pb::Retain { ttl_seconds: ttl, clear: false })
    } else {
        None
    };
    let resp = if !args.user.is_empty() {
        client.publish(pb::PublishRequest { user_ids: args.user, event, idempotency_key: key, retain }).await
    } else if let Some(group) = args.group {
        client.publish_group(pb::PublishGroupRequest { group, event, idempotency_key: key, retain }).await
    } else if let Some(topic) = args.topic {
        client.publish_topic(pb::PublishTopicRequest { topic, event, idempotency_key: key, retain }).await
    } else {
        client.broadcast(pb::BroadcastRequest { event, idempotency_key: key, retain }).await
    };
    let resp = resp.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.into_inner();
    Ok(resp.event_id)
}
