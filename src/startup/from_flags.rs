//! What `build` makes from the settings before binding: the backplane, and the subscriber and
//! publisher authentication.

use std::{sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{ApiKeys, PublisherAuth, SubscriberAuth, authorizer::Authorizer, jwt::ReloadingVerifier},
    backplane::{Backplane, nats::NatsStreams},
    grpc::authorizer::Transport,
    store::{Options, Recovered, Store, StoreError},
    telemetry::metrics::EdgeMetrics,
};

use super::{
    StartupError,
    settings::{BackplaneSettings, PublisherSettings, SubscriberSettings},
};

/// The backplane from the flags, as `build` needs it.
pub(super) struct Connected {
    pub backplane: Arc<Backplane>,
    /// The epoch of each partition's ids, in partition order (`[None]`: one router, which draws
    /// one).
    pub epochs: Vec<Option<u64>>,
    /// Whether a broker's stream numbers the events (of every replica).
    pub shared_sequence: bool,
    /// What the data dir held (`--data-dir`), to rebuild the router from before serving.
    pub recovered: Option<Recovered>,
}

/// The backplane from the flags: a broker connection, or memory, with its data dir opened (and
/// locked) if there is one.
pub(super) async fn connect_backplane(settings: &BackplaneSettings) -> Result<Connected, StartupError> {
    match settings {
        BackplaneSettings::Memory { dedupe_window, data: None } => Ok(Connected {
            backplane: Arc::new(Backplane::memory(*dedupe_window)),
            epochs: vec![None],
            shared_sequence: false,
            recovered: None,
        }),
        BackplaneSettings::Memory { dedupe_window, data: Some(data) } => {
            let (dir, options) = (
                data.dir.clone(),
                Options { sync: data.sync, segment_bytes: data.segment_bytes, ..Options::default() },
            );
            // Recovery reads every segment: blocking I/O.
            let (store, recovered) =
                tokio::task::spawn_blocking(move || Store::open(dir, options)).await.map_err(|e| {
                    StartupError::Store(StoreError::Failed { dir: data.dir.clone(), cause: e.to_string() })
                })??;
            Ok(Connected {
                backplane: Arc::new(Backplane::durable(*dedupe_window, Arc::new(store))),
                epochs: vec![Some(recovered.epoch)],
                shared_sequence: false,
                recovered: Some(recovered),
            })
        }
        BackplaneSettings::Nats(nats) => {
            let nats = NatsStreams::connect(nats.clone()).await?;
            let epochs = nats.epochs().into_iter().map(Some).collect();
            Ok(Connected {
                backplane: Arc::new(Backplane::Nats(Arc::new(nats))),
                epochs,
                shared_sequence: true,
                recovered: None,
            })
        }
    }
}

/// Subscriber authentication from the flags: the backend's authorizer (with a JWT key too, if
/// given), a JWT key, or the explicit development mode, or nothing (subscriptions refused,
/// with a message saying what to configure).
pub(super) fn subscriber_auth(
    settings: &SubscriberSettings,
    reload_every: Duration,
    stop: &CancellationToken,
    tracker: &TaskTracker,
    metrics: &Arc<EdgeMetrics>,
) -> Result<SubscriberAuth, StartupError> {
    if let Some(authorizer) = &settings.authorizer {
        let jwt = if settings.jwt.is_configured() {
            let verifier = ReloadingVerifier::load(&settings.jwt)?;
            verifier.watch(reload_every, stop, tracker);
            Some((verifier, settings.cookie.clone()))
        } else {
            None
        };
        let transport = Transport::new(authorizer)?;
        tracing::info!(
            addr = %authorizer.url,
            protocol = ?authorizer.protocol,
            jwt_too = jwt.is_some(),
            "subscribers are authorized by the backend (ssegate.v1.Authorizer/Authorize)"
        );
        let authorizer = Authorizer::new(authorizer.clone(), transport, metrics.clone(), tracker.clone());
        return Ok(SubscriberAuth::Authorizer { authorizer: Arc::new(authorizer), jwt });
    }
    // `Settings::from_args` refused a JWT key together with the development mode.
    match (settings.jwt.is_configured(), settings.insecure_dev_identity) {
        (true, _) => {
            let verifier = ReloadingVerifier::load(&settings.jwt)?;
            verifier.watch(reload_every, stop, tracker);
            Ok(SubscriberAuth::Jwt { verifier, cookie: settings.cookie.clone() })
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
                 --jwt-secret-file, --jwt-public-key-file or --jwt-jwks-file, or --authorizer-addr \
                 (or --insecure-dev-identity)"
            );
            Ok(SubscriberAuth::Disabled)
        }
    }
}

/// Publisher authentication from the flags: API keys, else client certificates, else the
/// explicit development mode, else nothing (publishing refused).
pub(super) fn publisher_auth(settings: &PublisherSettings) -> Result<PublisherAuth, StartupError> {
    if settings.api_keys_file.is_some() || settings.api_keys.is_some() {
        let keys = Arc::new(ApiKeys::load(settings.api_keys_file.clone(), settings.api_keys.as_deref())?);
        if keys.is_empty() {
            return Err(StartupError::Conflict("no publisher API key was given"));
        }
        return Ok(PublisherAuth::ApiKeys(keys));
    }
    if settings.client_certificates {
        return Ok(PublisherAuth::ClientCertificate);
    }
    if settings.insecure_open {
        tracing::warn!("INSECURE: --insecure-open-publish is on: anyone who can reach the gRPC port may publish");
        return Ok(PublisherAuth::Open);
    }
    tracing::warn!(
        "no publisher authentication configured: every publish will be refused; set \
                 --publisher-api-keys-file or SSEGATE_PUBLISHER_API_KEYS (or --insecure-open-publish)"
    );
    Ok(PublisherAuth::Disabled)
}
