//! `ssegate.v1.Publisher`: parse, route, answer.

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use tracing::{Instrument, field::Empty};

use super::{ApiError, convert, panic, pb, unary::Parts};
use crate::{
    backplane::{
        Accepted, Backplane,
        cluster::{Answer, OnlinePage, Query},
    },
    domain::{GroupId, Target, Topic, UserId},
    router::{Router, Stats},
    telemetry::metrics::EdgeMetrics,
};

/// Request-shape limits, from the configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest event (name + data bytes) accepted.
    pub max_event_bytes: usize,
    /// Most ids in one list of a request (users of a publish, entries of a presence query).
    pub max_ids_per_request: usize,
    /// Largest request message (`--grpc-max-message-bytes`). The transport reads messages up to
    /// twice this, so that a larger item of a `PublishStream` is refused alone.
    pub max_message_bytes: usize,
}

/// Largest page of `Presence.list_online`, and the page size when none is given.
const MAX_ONLINE_PAGE: u32 = 10_000;
const DEFAULT_ONLINE_PAGE: u32 = 1_000;

#[derive(Clone)]
pub struct PublisherService {
    router: Arc<Router>,
    backplane: Arc<Backplane>,
    pub(super) limits: Arc<Limits>,
    metrics: Arc<EdgeMetrics>,
}

impl PublisherService {
    /// Refuses a request message over the size limit (`RESOURCE_EXHAUSTED`).
    pub(super) fn within_limit(&self, msg: &impl prost::Message) -> Result<(), ApiError> {
        let (len, max) = (msg.encoded_len(), self.limits.max_message_bytes);
        if len > max { Err(ApiError::MessageTooLarge { len, max }) } else { Ok(()) }
    }

    pub fn new(router: Arc<Router>, backplane: Arc<Backplane>, limits: Limits, metrics: Arc<EdgeMetrics>) -> Self {
        Self { router, backplane, limits: Arc::new(limits), metrics }
    }

    /// Publishes to `target` (of kind `kind`: user, group, topic or broadcast, known even when
    /// the target did not parse) and counts a failure by its kind.
    pub(super) async fn publish(
        &self,
        kind: &'static str,
        target: Result<Target, ApiError>,
        parts: Parts,
    ) -> Result<Accepted, ApiError> {
        let Parts { event, retain, idempotency_key } = parts;
        let span = tracing::info_span!("publish", target = kind, event_id = Empty, recipients = Empty);
        let result: Result<Accepted, ApiError> = async {
            let target = target?;
            let event = convert::event(event, &self.limits)?;
            let retain = convert::retain(retain)?;
            let key = convert::idempotency_key(&idempotency_key)?;
            let accepted = self.backplane.publish(&self.router, target, event, retain, key.as_ref()).await?;
            let span = tracing::Span::current();
            span.record("event_id", tracing::field::display(accepted.id));
            if let Some(n) = accepted.recipients {
                span.record("recipients", n);
            }
            Ok(accepted)
        }
        .instrument(span)
        .await;
        if let Err(e) = &result {
            self.metrics.publish_failed(kind, e.failure());
        }
        result
    }

    async fn stream_item(&self, index: u64, req: pb::PublishStreamRequest) -> pb::PublishStreamResponse {
        use pb::publish_stream_request::Target as T;
        if let Err(e) = self.within_limit(&req) {
            return item_refused(index, e.code(), e.to_string());
        }
        let kind = match &req.target {
            Some(T::Users(_)) | None => "user",
            Some(T::Group(_)) => "group",
            Some(T::Topic(_)) => "topic",
            Some(T::Broadcast(_)) => "broadcast",
        };
        let target = convert::stream_target(req.target, &self.limits);
        let parts = Parts { event: req.event, retain: req.retain, idempotency_key: req.idempotency_key };
        match self.publish(kind, target, parts).await {
            Ok(p) => pb::PublishStreamResponse {
                index,
                code: Code::Ok as i32,
                message: String::new(),
                event_id: p.id.to_string(),
                recipients: p.recipients,
            },
            Err(e) => item_refused(index, e.code(), e.to_string()),
        }
    }
}

/// The answer to a stream item that was not published.
fn item_refused(index: u64, code: Code, message: String) -> pb::PublishStreamResponse {
    pb::PublishStreamResponse { index, code: code as i32, message, event_id: String::new(), recipients: None }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::PublishStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::publisher_server::Publisher for PublisherService {
    async fn publish(&self, req: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        self.unary(req).await
    }

    async fn publish_group(
        &self,
        req: Request<pb::PublishGroupRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.unary(req).await
    }

    async fn publish_topic(
        &self,
        req: Request<pb::PublishTopicRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.unary(req).await
    }

    async fn broadcast(&self, req: Request<pb::BroadcastRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        self.unary(req).await
    }

    type PublishStreamStream = ResponseStream;

    /// Answers each request in order as it arrives: the next request is read only once the
    /// previous one was published (stored, with a broker) and its answer taken by the
    /// transport, which gives the caller backpressure for free.
    async fn publish_stream(
        &self,
        req: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let this = self.clone();
        let answers = req.into_inner().enumerate().then(move |(i, item)| {
            let this = this.clone();
            async move {
                // A transport or decoding error ends the stream: framing can no longer be trusted.
                // A message too large even to be read and skipped (over twice the limit) is
                // the caller's excess, not a range error (tonic says OUT_OF_RANGE).
                match item {
                    // A panic while handling an item fails that item alone (`INTERNAL`, logged):
                    // the answers before it were sent, and the items after it are served.
                    Ok(r) => {
                        let what = "/ssegate.v1.Publisher/PublishStream item";
                        let answer = panic::catching(what, this.stream_item(i as u64, r)).await;
                        Ok(answer.unwrap_or_else(|s| item_refused(i as u64, s.code(), s.message().to_owned())))
                    }
                    Err(e) if e.code() == Code::OutOfRange => Err(Status::resource_exhausted(format!(
                        "item {i}: {} (--grpc-max-message-bytes is {})",
                        e.message(),
                        this.limits.max_message_bytes
                    ))),
                    Err(e) => Err(e),
                }
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn disconnect(
        &self,
        req: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        self.within_limit(req.get_ref())?;
        let req = req.into_inner();
        let user = convert::user("user_id", &req.user_id)?;
        if req.reason.len() > 1024 {
            let value = format!("{} bytes", req.reason.len());
            return Err(ApiError::OverBound { field: "reason", value, max: 1024 }.into());
        }
        let query = Query::Disconnect { user, reason: req.reason };
        let g = self.backplane.gather(&self.router, &query).await;
        let closed = g.answers.iter().map(|a| a.closed).sum();
        Ok(Response::new(pb::DisconnectResponse { closed, partial: g.partial, replicas: g.answers.len() as u32 }))
    }

    async fn presence(&self, req: Request<pb::PresenceRequest>) -> Result<Response<pb::PresenceResponse>, Status> {
        self.within_limit(req.get_ref())?;
        let req = req.into_inner();
        // Parsed here, once: the query carries domain values to every replica; the answer
        // echoes the caller's strings (they parsed, so they are the ids).
        let users = convert::list("user_ids", &req.user_ids, &self.limits, UserId::parse)?;
        let groups = convert::list("groups", &req.groups, &self.limits, GroupId::parse)?;
        let topics = convert::list("topics", &req.topics, &self.limits, Topic::parse)?;
        let online = match req.list_online {
            None => None,
            Some(page) => {
                let limit = match page.limit {
                    0 => DEFAULT_ONLINE_PAGE,
                    n if n <= MAX_ONLINE_PAGE => n,
                    n => {
                        let max = MAX_ONLINE_PAGE as usize;
                        return Err(
                            ApiError::OverBound { field: "list_online.limit", value: n.to_string(), max }.into()
                        );
                    }
                };
                Some(OnlinePage { after: (!page.after.is_empty()).then_some(page.after), limit: limit as usize })
            }
        };
        let page_limit = online.as_ref().map(|p| p.limit);
        let query = Query::Presence { users, groups, topics, online };
        let g = self.backplane.gather(&self.router, &query).await;
        let sum = |n: usize, pick: fn(&Answer) -> &Vec<u64>| -> Vec<u64> {
            (0..n).map(|i| g.answers.iter().map(|a| pick(a).get(i).copied().unwrap_or(0)).sum()).collect()
        };
        let users = sum(req.user_ids.len(), |a| &a.user_connections);
        let mut resp = pb::PresenceResponse {
            users: req
                .user_ids
                .into_iter()
                .zip(users)
                .map(|(user_id, n)| pb::UserPresence { user_id, online: n > 0, connections: n })
                .collect(),
            groups: counts(&req.groups, sum(req.groups.len(), |a| &a.group_connections)),
            topics: counts(&req.topics, sum(req.topics.len(), |a| &a.topic_connections)),
            partial: g.partial,
            replicas: g.answers.len() as u32,
            ..Default::default()
        };
        if let Some(limit) = page_limit {
            // Each replica's page is sorted; a user online on several replicas appears once.
            let mut ids: Vec<&UserId> = g.answers.iter().flat_map(|a| &a.online).collect();
            ids.sort_unstable();
            ids.dedup();
            let more = ids.len() > limit || g.answers.iter().any(|a| a.more_online);
            ids.truncate(limit);
            resp.next_after = if more { ids.last().map(|u| u.to_string()).unwrap_or_default() } else { String::new() };
            resp.online_user_ids = ids.iter().map(|u| u.to_string()).collect();
        }
        Ok(Response::new(resp))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let g = self.backplane.gather(&self.router, &Query::Stats).await;
        let all: Vec<&Stats> = g.answers.iter().filter_map(|a| a.stats.as_ref()).collect();
        let total = |f: fn(&Stats) -> u64| all.iter().map(|s| f(s)).sum::<u64>();
        // Every replica consumes the whole stream and keeps its own replay log: these are the
        // same events seen from each, so the most advanced replica's figure is the cluster's.
        let most = |f: fn(&Stats) -> u64| all.iter().map(|s| f(s)).max().unwrap_or(0);
        Ok(Response::new(pb::StatsResponse {
            connections: total(|s| s.connections),
            users: total(|s| s.users),
            groups: total(|s| s.groups),
            topics: total(|s| s.topics),
            events_published: most(|s| s.events_published),
            events_delivered: total(|s| s.events_delivered),
            events_dropped: total(|s| s.events_dropped),
            connections_opened: total(|s| s.connections_opened),
            uptime_seconds: self.router.uptime().as_secs(),
            events_replayed: total(|s| s.events_replayed),
            resumes_missed: total(|s| s.resumes_missed),
            connections_rejected: total(|s| s.connections_rejected),
            replay_log_events: most(|s| s.replay_log_events),
            replay_log_bytes: most(|s| s.replay_log_bytes),
            // Every replica applies the same retained updates in stream order.
            retained_values: most(|s| s.retained_values),
            retained_bytes: most(|s| s.retained_bytes),
            retained_sent: total(|s| s.retained_sent),
            partial: g.partial,
            replicas: g.answers.len() as u32,
        }))
    }
}

fn counts(names: &[String], counts: Vec<u64>) -> Vec<pb::MembershipCount> {
    names
        .iter()
        .zip(counts)
        .map(|(name, connections)| pb::MembershipCount { name: name.clone(), connections })
        .collect()
}
