//! What `build` makes from the flags before binding: the backplane, and the subscriber and
//! publisher authentication.

use std::sync::Arc;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{
        ApiKeys, PublisherAuth, SubscriberAuth,
        jwt::{JwtSettings, ReloadingVerifier},
    },
    backplane::{
        Backplane,
        nats::{NatsBackplane, NatsSettings},
    },
    config::{BackplaneKind, ServeArgs},
};

use super::{RELOAD_EVERY, StartupError};

/// The backplane from the flags, and the epoch its ids must use (`None`: the router draws one).
pub(super) async fn connect_backplane(config: &ServeArgs) -> Result<(Arc<Backplane>, Option<u64>), StartupError> {
    match config.backplane {
        BackplaneKind::Memory => Ok((Arc::new(Backplane::memory()), None)),
        BackplaneKind::Nats => {
            let nats = NatsBackplane::connect(NatsSettings {
                urls: config.nats_url.clone(),
                creds_file: config.nats_creds_file.clone(),
                tls_ca_file: config.nats_tls_ca_file.clone(),
                stream: config.nats_stream.clone(),
                subject: config.nats_subject.clone(),
                max_age: config.nats_stream_max_age,
                max_bytes: config.nats_stream_max_bytes,
                duplicate_window: config.nats_duplicate_window,
                publish_timeout: config.nats_publish_timeout,
                cluster_wait: config.nats_cluster_wait,
                stream_replicas: usize::from(config.nats_stream_replicas),
            })
            .await?;
            let epoch = nats.epoch;
            Ok((Arc::new(Backplane::Nats(Arc::new(nats))), Some(epoch)))
        }
    }
}

/// Subscriber authentication from the flags: a JWT key, or the explicit development mode, or
/// nothing (subscriptions refused, with a message saying what to configure).
pub(super) fn subscriber_auth(
    config: &ServeArgs,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<SubscriberAuth, StartupError> {
    let jwt = JwtSettings {
        secret_file: config.jwt_secret_file.clone(),
        public_key_file: config.jwt_public_key_file.clone(),
        jwks_file: config.jwt_jwks_file.clone(),
        issuer: config.jwt_issuer.clone(),
        audience: config.jwt_audience.clone(),
        leeway: config.jwt_leeway,
    };
    match (jwt.is_configured(), config.insecure_dev_identity) {
        (true, true) => Err(StartupError::Conflict("--insecure-dev-identity cannot be combined with --jwt-* keys")),
        (true, false) => {
            let verifier = ReloadingVerifier::load(&jwt)?;
            verifier.watch(RELOAD_EVERY, stop, tracker);
            Ok(SubscriberAuth::Jwt { verifier, cookie: config.token_cookie.clone() })
        }
        (false, true) => {
            tracing::warn!(
                "INSECURE: --insecure-dev-identity is on: subscribers are whoever `?user=` says; \
                 anyone can read anyone's events. Never use this in production."
            );
            Ok(SubscriberAuth::InsecureQuery)
        }
        (false, false) => {
            tracing::warn!(
                "no subscriber authentication configured: every subscription will be refused; set \
                 --jwt-secret-file, --jwt-public-key-file or --jwt-jwks-file (or --insecure-dev-identity)"
            );
            Ok(SubscriberAuth::Disabled)
        }
    }
}

/// Publisher authentication from the flags: API keys, else client certificates, else the
/// explicit development mode, else nothing (publishing refused).
pub(super) fn publisher_auth(config: &ServeArgs) -> Result<PublisherAuth, StartupError> {
    if config.publisher_api_keys_file.is_some() || config.publisher_api_keys.is_some() {
        let keys =
            Arc::new(ApiKeys::load(config.publisher_api_keys_file.clone(), config.publisher_api_keys.as_deref())?);
        if keys.is_empty() {
            return Err(StartupError::Conflict("no publisher API key was given"));
        }
        return Ok(PublisherAuth::ApiKeys(keys));
    }
    if config.grpc_client_ca_file.is_some() {
        return Ok(PublisherAuth::ClientCertificate);
    }
    if config.insecure_open_publish {
        tracing::warn!("INSECURE: --insecure-open-publish is on: anyone who can reach the gRPC port may publish");
        return Ok(PublisherAuth::Open);
    }
    tracing::warn!(
        "no publisher authentication configured: every publish will be refused; set \
                 --publisher-api-keys-file or SSEGATE_PUBLISHER_API_KEYS (or --insecure-open-publish)"
    );
    Ok(PublisherAuth::Disabled)
}
