//! `ssegate.v1.Publisher`: parse, route, answer.

use std::{pin::Pin, sync::Arc};

use futures_util::{
    FutureExt, Stream, StreamExt,
    future::{self, BoxFuture},
    stream::FuturesOrdered,
};
use tonic::{Code, Request, Response, Status, Streaming};

use tracing::{Instrument, field::Empty};

use super::{ApiError, convert, panic, pb, unary::Parts, watch};
use crate::{
    backplane::{
        Accepted, Backplane, PublishOrder,
        cluster::{Answer, OnlinePage, Query},
    },
    domain::{EventId, GroupId, MalformedEventId, Target, Topic, UserId},
    event_stream::parse::name_and_data,
    presence::Hub,
    router::{Partitions, Stats},
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

/// Items of one `PublishStream` read and not yet answered, at most: queued, or published and
/// waiting for their write to the data dir (memory backplane: one group commit then serves
/// many items) or for the broker's acknowledgement (NATS: many wait at once). Items are read as soon as they arrive, up to this, so the transport never
/// holds a pile of unread small messages: h2 answers that with `ENHANCE_YOUR_CALM` and drops
/// the whole connection (its budget for small DATA frames is about 2,000 of them), which a
/// caller keeping fewer items than this unanswered per stream can then never meet.
const STREAM_IN_FLIGHT: usize = 4096;
/// Bytes of items read and not yet started, at most: what the transport would have held
/// unread anyway (hyper's 1 MiB stream window), so reading ahead costs no more memory per
/// stream than before. Each item is started as soon as it is read; with a broker its hand-over
/// to the connection waits for the previous item's.
const STREAM_QUEUED_BYTES: usize = 1 << 20;

/// Largest page of `History`, and the page size when none is given.
const MAX_HISTORY_PAGE: u32 = 1000;
const DEFAULT_HISTORY_PAGE: u32 = 100;

/// Largest page of `Presence.list_online`, and the page size when none is given.
const MAX_ONLINE_PAGE: u32 = 10_000;
const DEFAULT_ONLINE_PAGE: u32 = 1_000;

#[derive(Clone)]
pub struct PublisherService {
    routers: Arc<Partitions>,
    backplane: Arc<Backplane>,
    presence: Arc<Hub>,
    pub(super) limits: Arc<Limits>,
    metrics: Arc<EdgeMetrics>,
}

impl PublisherService {
    /// Refuses a request message over the size limit (`RESOURCE_EXHAUSTED`).
    pub(super) fn within_limit(&self, msg: &impl prost::Message) -> Result<(), ApiError> {
        let (len, max) = (msg.encoded_len(), self.limits.max_message_bytes);
        if len > max { Err(ApiError::MessageTooLarge { len, max }) } else { Ok(()) }
    }

    pub fn new(
        routers: Arc<Partitions>,
        backplane: Arc<Backplane>,
        presence: Arc<Hub>,
        limits: Limits,
        metrics: Arc<EdgeMetrics>,
    ) -> Self {
        Self { routers, backplane, presence, limits: Arc::new(limits), metrics }
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
            let accepted = self.backplane.publish(&self.routers, target, event, retain, key.as_ref()).await?;
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

    /// Starts item `index` of a `PublishStream`, after those started before it with `order`
    /// (`Backplane::start_publish`): the future answers it once it is stored.
    fn start_item(
        &self,
        index: u64,
        req: pb::PublishStreamRequest,
        order: &mut PublishOrder,
    ) -> BoxFuture<'static, pb::PublishStreamResponse> {
        let kind = item_kind(&req);
        let span = tracing::info_span!("publish", target = kind, event_id = Empty, recipients = Empty);
        let started = span.in_scope(|| {
            self.within_limit(&req)?;
            let target = convert::stream_target(req.target, &self.limits)?;
            let event = convert::event(req.event, &self.limits)?;
            let retain = convert::retain(req.retain)?;
            let key = convert::idempotency_key(&req.idempotency_key)?;
            Ok::<_, ApiError>(self.backplane.start_publish(&self.routers, target, event, retain, key, order))
        });
        let metrics = self.metrics.clone();
        let answer = async move {
            let outcome = match started {
                Ok(stored) => stored.await.map_err(ApiError::from),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(p) => {
                    let span = tracing::Span::current();
                    span.record("event_id", tracing::field::display(p.id));
                    if let Some(n) = p.recipients {
                        span.record("recipients", n);
                    }
                    accepted_item(index, &p)
                }
                Err(e) => {
                    if !matches!(e, ApiError::MessageTooLarge { .. }) {
                        metrics.publish_failed(kind, e.failure());
                    }
                    item_refused(index, e.code(), e.to_string())
                }
            }
        };
        answer.instrument(span).boxed()
    }
}

/// The target kind of a stream item, for metrics and spans.
fn item_kind(req: &pb::PublishStreamRequest) -> &'static str {
    use pb::publish_stream_request::Target as T;
    match &req.target {
        Some(T::Users(_)) | None => "user",
        Some(T::Group(_)) => "group",
        Some(T::Topic(_)) => "topic",
        Some(T::Broadcast(_)) => "broadcast",
    }
}

/// `partition_event_ids` of an answer (empty unless the event was stored in several partitions).
pub(super) fn partition_ids(p: &Accepted) -> Vec<String> {
    p.partition_ids.iter().map(ToString::to_string).collect()
}

/// The answer to a stream item that was published.
fn accepted_item(index: u64, p: &Accepted) -> pb::PublishStreamResponse {
    pb::PublishStreamResponse {
        index,
        code: Code::Ok as i32,
        message: String::new(),
        event_id: p.id.to_string(),
        recipients: p.recipients,
        partition_event_ids: partition_ids(p),
    }
}

/// The answers of one `PublishStream`, in the order of its items: reads items as they arrive
/// (up to `STREAM_IN_FLIGHT` and `STREAM_QUEUED_BYTES`), starts them in order while earlier
/// ones wait for their write or their broker's acknowledgement (`PublisherService::start_item`).
struct StreamPipeline {
    service: PublisherService,
    items: Streaming<pb::PublishStreamRequest>,
    next_index: u64,
    /// Read, not started yet, and their encoded size.
    queued: std::collections::VecDeque<pb::PublishStreamRequest>,
    queued_bytes: usize,
    in_flight: FuturesOrdered<BoxFuture<'static, pb::PublishStreamResponse>>,
    /// Where the next item's publish goes in the order of those started.
    order: PublishOrder,
    /// The items ended (or failed: the status, sent after the answers in flight).
    ended: bool,
    failed: Option<Status>,
}

impl StreamPipeline {
    /// The next answer, or the transport error that ended the items (after every answer in
    /// flight), or `None` at the end.
    async fn next(&mut self) -> Option<Result<pb::PublishStreamResponse, Status>> {
        loop {
            // Whatever has arrived is taken off the transport first, then started in order.
            while self.may_read() {
                match self.items.next().now_or_never() {
                    Some(item) => self.take(item),
                    None => break,
                }
            }
            while !self.queued.is_empty() {
                if let Some(req) = self.queued.pop_front() {
                    self.queued_bytes -= prost::Message::encoded_len(&req);
                    self.start(req);
                }
            }
            let reading = self.may_read();
            if !reading && self.in_flight.is_empty() && self.queued.is_empty() {
                return self.failed.take().map(Err);
            }
            tokio::select! {
                biased;
                Some(answer) = self.in_flight.next(), if !self.in_flight.is_empty() => return Some(Ok(answer)),
                item = self.items.next(), if reading => self.take(item),
            }
        }
    }

    fn may_read(&self) -> bool {
        !self.ended
            && self.queued.len() + self.in_flight.len() < STREAM_IN_FLIGHT
            && self.queued_bytes < STREAM_QUEUED_BYTES
    }

    /// Queues an item read from the transport, or notes the end (or the error that ended it).
    fn take(&mut self, item: Option<Result<pb::PublishStreamRequest, Status>>) {
        match item {
            None => self.ended = true,
            Some(Ok(req)) => {
                self.queued_bytes += prost::Message::encoded_len(&req);
                self.queued.push_back(req);
            }
            Some(Err(e)) => {
                self.ended = true;
                // A transport or decoding error ends the stream: framing can no longer be
                // trusted. A message too large even to be read and skipped (over twice the
                // limit) is the caller's excess, not a range error (tonic says OUT_OF_RANGE).
                let index = self.next_index + self.queued.len() as u64;
                self.failed = Some(if e.code() == Code::OutOfRange {
                    Status::resource_exhausted(format!(
                        "item {index}: {} (--grpc-max-message-bytes is {})",
                        e.message(),
                        self.service.limits.max_message_bytes
                    ))
                } else {
                    e
                });
            }
        }
    }

    /// Starts the next item. A panic while handling an item fails that item alone
    /// (`INTERNAL`, logged): the answers before it were sent, and the items after it are served.
    fn start(&mut self, req: pb::PublishStreamRequest) {
        const WHAT: &str = "/ssegate.v1.Publisher/PublishStream item";
        let index = self.next_index;
        self.next_index += 1;
        let refused = move |s: Status| item_refused(index, s.code(), s.message().to_owned());
        let order = &mut self.order;
        let started =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.service.start_item(index, req, order)));
        let answer = match started {
            Ok(started) => started,
            Err(panic) => future::ready(refused(panic::caught(WHAT, &*panic))).boxed(),
        };
        self.in_flight.push_back(panic::catching(WHAT, answer).map(move |a| a.unwrap_or_else(refused)).boxed());
    }
}

/// The answer to a stream item that was not published.
fn item_refused(index: u64, code: Code, message: String) -> pb::PublishStreamResponse {
    pb::PublishStreamResponse { index, code: code as i32, message, ..Default::default() }
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

    /// Answers each request in order, with its own outcome: items are read as they arrive and
    /// published in that order while earlier ones wait for their write or acknowledgement
    /// (`StreamPipeline`); a caller that reads no answers is held back by flow control.
    async fn publish_stream(
        &self,
        req: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let pipeline = StreamPipeline {
            service: self.clone(),
            items: req.into_inner(),
            next_index: 0,
            queued: std::collections::VecDeque::new(),
            queued_bytes: 0,
            in_flight: FuturesOrdered::new(),
            order: PublishOrder::default(),
            ended: false,
            failed: None,
        };
        let answers = futures_util::stream::unfold(pipeline, |mut p| async move { p.next().await.map(|a| (a, p)) });
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
        let g = self.backplane.gather(&self.routers, &query).await;
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
        let g = self.backplane.gather(&self.routers, &query).await;
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

    type WatchPresenceStream = watch::WatchStream;

    /// The users online now, a marker, then live transitions (`grpc/watch.rs`); the watcher's
    /// queue is bounded and a watcher that does not read is cut off, never waited for.
    async fn watch_presence(
        &self,
        req: Request<pb::WatchPresenceRequest>,
    ) -> Result<Response<Self::WatchPresenceStream>, Status> {
        self.within_limit(req.get_ref())?;
        let w = self.presence.watch();
        tracing::debug!(snapshot = w.snapshot.len(), "presence watcher attached");
        Ok(Response::new(watch::stream(w, self.presence.watcher_queue())))
    }

    async fn history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        use pb::history_request::Target as T;
        self.within_limit(req.get_ref())?;
        let req = req.into_inner();
        let target = match req.target.ok_or(ApiError::Missing("target (user_id, group, topic or broadcast)"))? {
            T::UserId(u) => Target::users(vec![convert::user("user_id", &u)?]),
            T::Group(g) => Target::Group(convert::group(&g)?),
            T::Topic(t) => Target::Topic(convert::topic(&t)?),
            T::Broadcast(_) => Target::Broadcast,
        };
        let limit = match req.limit {
            0 => DEFAULT_HISTORY_PAGE,
            n if n <= MAX_HISTORY_PAGE => n,
            n => {
                let max = MAX_HISTORY_PAGE as usize;
                return Err(ApiError::OverBound { field: "limit", value: n.to_string(), max }.into());
            }
        };
        let before = match req.before.as_str() {
            "" => None,
            s => Some(
                s.parse::<EventId>()
                    .map_err(|e: MalformedEventId| ApiError::Malformed { field: "before", reason: e.to_string() })?,
            ),
        };
        // A user's events are in its partition; a group's, topic's or everyone's in every one,
        // each with its own ids: the partition `before` names, or the first.
        let router = match (&target, before) {
            (Target::Users(users), _) if users.len() == 1 => self.routers.of_user(&users[0]),
            (_, Some(id)) => self.routers.of_epoch(id.epoch).unwrap_or(self.routers.first()),
            _ => self.routers.first(),
        };
        let before = match before {
            None => None,
            Some(id) if id.epoch != router.epoch() => {
                return Err(ApiError::Stale(format!(
                    "before: {id} is an id of an earlier server process or stream (epoch {:x} now); start again \
                     from the newest (an empty before)",
                    router.epoch()
                ))
                .into());
            }
            Some(id) => Some(id.seq),
        };
        // With interest delivery this replica holds a user's, group's or topic's own events only
        // while following it: follow it (its events in the replay window are read into the log) for
        // this page.
        let all = Some(EventId { epoch: router.epoch(), seq: 0 });
        let followed = match &target {
            Target::Users(users) if users.len() == 1 => router.follow(Some(&users[0]), &[], &[], all).await,
            Target::Group(group) => router.follow(None, std::slice::from_ref(group), &[], all).await,
            Target::Topic(topic) => router.follow(None, &[], std::slice::from_ref(topic), all).await,
            _ => Ok(None),
        };
        let _held = followed.map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let page = router.history(&target, before, limit as usize);
        let epoch = page.position.epoch;
        let events: Vec<pb::HistoryEvent> = page
            .events
            .iter()
            .map(|logged| {
                let (name, data) = name_and_data(&logged.frame.bytes);
                pb::HistoryEvent { id: EventId { epoch, seq: logged.seq }.to_string(), name, data }
            })
            .collect();
        let next_before =
            if page.more { events.last().map(|e| e.id.clone()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(pb::HistoryResponse {
            truncated: !page.more && page.evicted,
            next_before,
            position: page.position.to_string(),
            events,
        }))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let g = self.backplane.gather(&self.routers, &Query::Stats).await;
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
            uptime_seconds: self.routers.uptime().as_secs(),
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
