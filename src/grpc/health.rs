//! The standard gRPC health service of the port: the server ("") and `ssegate.v1.Publisher`.
//! The publisher follows the broker (NOT_SERVING while it is down), or with `--data-dir` the
//! store (NOT_SERVING while it does not take writes), and both turn NOT_SERVING when draining.

use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

use super::{PublisherService, pb};

type Publisher = pb::publisher_server::PublisherServer<PublisherService>;

/// Sets the health statuses; clones share them.
#[derive(Clone)]
pub struct Health(HealthReporter);

/// The service `serve` registers, made once with its `Health`.
pub struct HealthService(pub(super) tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>);

impl Health {
    pub fn new() -> (Health, HealthService) {
        let reporter = HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        (Health(reporter), HealthService(tonic_health::pb::health_server::HealthServer::new(service)))
    }

    pub(super) async fn set_publisher_serving(&self) {
        self.0.set_serving::<Publisher>().await;
    }

    /// Marks the publisher and the server not serving (used when draining).
    pub async fn set_not_serving(&self) {
        self.0.set_not_serving::<Publisher>().await;
        self.0.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    }

    /// Marks the publisher NOT_SERVING while the broker is down (`up` false) and SERVING once it
    /// is back, until `stop`. While down every probe re-asserts NOT_SERVING, so a SERVING set by
    /// the gRPC server's start in between does not stick.
    pub async fn follow_broker(self, mut up: tokio::sync::watch::Receiver<bool>, stop: CancellationToken) {
        let mut serving = true;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = up.changed() => if changed.is_err() { return },
            }
            let now = *up.borrow_and_update();
            if !now {
                self.0.set_not_serving::<Publisher>().await;
            } else if !serving {
                self.0.set_serving::<Publisher>().await;
            }
            serving = now;
        }
    }
}
