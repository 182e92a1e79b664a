//! The four unary publishes (`Publish`, `PublishGroup`, `PublishTopic`, `Broadcast`): one
//! handler, with what differs per request type in `UnaryPublish`.

use tonic::{Request, Response, Status};

use super::{
    ApiError, convert, pb,
    service::{Limits, PublisherService, partition_ids},
};
use crate::domain::Target;

/// What every publish request carries besides its target.
pub(super) struct Parts {
    pub event: Option<pb::Event>,
    pub retain: Option<pb::Retain>,
    pub idempotency_key: String,
}

/// A unary publish request: its target kind, its target parsed, and the rest.
pub(super) trait UnaryPublish: prost::Message + Send + 'static {
    const KIND: &'static str;
    fn target(&self, limits: &Limits) -> Result<Target, ApiError>;
    fn into_parts(self) -> Parts;
}

impl UnaryPublish for pb::PublishRequest {
    const KIND: &'static str = "user";
    fn target(&self, limits: &Limits) -> Result<Target, ApiError> {
        convert::users_target("user_ids", &self.user_ids, limits)
    }
    fn into_parts(self) -> Parts {
        Parts { event: self.event, retain: self.retain, idempotency_key: self.idempotency_key }
    }
}

impl UnaryPublish for pb::PublishGroupRequest {
    const KIND: &'static str = "group";
    fn target(&self, _: &Limits) -> Result<Target, ApiError> {
        convert::group(&self.group).map(Target::Group)
    }
    fn into_parts(self) -> Parts {
        Parts { event: self.event, retain: self.retain, idempotency_key: self.idempotency_key }
    }
}

impl UnaryPublish for pb::PublishTopicRequest {
    const KIND: &'static str = "topic";
    fn target(&self, _: &Limits) -> Result<Target, ApiError> {
        convert::topic(&self.topic).map(Target::Topic)
    }
    fn into_parts(self) -> Parts {
        Parts { event: self.event, retain: self.retain, idempotency_key: self.idempotency_key }
    }
}

impl UnaryPublish for pb::BroadcastRequest {
    const KIND: &'static str = "broadcast";
    fn target(&self, _: &Limits) -> Result<Target, ApiError> {
        Ok(Target::Broadcast)
    }
    fn into_parts(self) -> Parts {
        Parts { event: self.event, retain: self.retain, idempotency_key: self.idempotency_key }
    }
}

impl PublisherService {
    /// The one handler of the four unary publishes.
    pub(super) async fn unary<R: UnaryPublish>(
        &self,
        req: Request<R>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let req = req.into_inner();
        self.within_limit(&req)?;
        let target = req.target(&self.limits);
        let p = self.publish(R::KIND, target, req.into_parts()).await?;
        Ok(Response::new(pb::PublishResponse {
            event_id: p.id.to_string(),
            recipients: p.recipients,
            partition_event_ids: partition_ids(&p),
        }))
    }
}
