//! The console's actions, each the same internal call as its gRPC counterpart
//! (`Backplane::publish`, `Backplane::gather` with `Query::Disconnect`), each logged as one
//! audit line: `target: "ssegate::audit"` with `action`, `subject`, `peer`, `outcome`.

use axum::{
    extract::State,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::Extensions;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;

use super::{Console, ConsoleError, inspect::subject, json};
use crate::{
    backplane::cluster::Query,
    domain::{Event, EventName, Retain, UserId},
    http::server::ConnContext,
};

/// Longest disconnect reason, as the gRPC `Disconnect` allows.
const MAX_REASON: usize = 1024;

/// Who called, for audit lines: the admin port's peer address.
pub(super) fn peer_of(ext: &Extensions) -> String {
    ext.get::<ConnContext>().map_or_else(|| "-".to_owned(), |c| c.peer.to_string())
}

fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ConsoleError> {
    serde_json::from_slice(bytes).map_err(|e| ConsoleError::BadRequest(format!("request body: {e}")))
}

fn name(s: Option<&str>) -> Result<Option<EventName>, ConsoleError> {
    match s.map(str::trim) {
        None | Some("" | "message") => Ok(None),
        Some(n) => EventName::parse(n).map(Some).map_err(|e| ConsoleError::BadRequest(format!("event name {e}"))),
    }
}

/// Logs the audit line of `action` on `subject` and answers.
fn audited(action: &str, subject: &str, peer: &str, result: Result<serde_json::Value, ConsoleError>) -> Response {
    match result {
        Ok(value) => {
            tracing::info!(target: "ssegate::audit", action, subject, %peer, outcome = "ok", result = %value, "console action");
            json(&value)
        }
        Err(e) => {
            tracing::warn!(target: "ssegate::audit", action, subject, %peer, outcome = e.outcome(), reason = %e, "console action");
            e.into_response()
        }
    }
}

#[derive(Deserialize)]
pub(super) struct PublishBody {
    kind: String,
    id: String,
    name: Option<String>,
    data: String,
    /// Also set it as the retained value (for its name).
    #[serde(default)]
    retain: bool,
}

/// `POST /console/api/publish`: a test event to a user, group or topic.
pub(super) async fn publish(State(console): State<Console>, ext: Extensions, raw: Bytes) -> Response {
    let peer = peer_of(&ext);
    let parsed = body::<PublishBody>(&raw);
    let who = parsed.as_ref().map_or_else(|_| "-".to_owned(), |b| format!("{} {}", b.kind, b.id));
    let result = async {
        let b = parsed?;
        let subject = subject(&b.kind, &b.id)?;
        let event = Event { name: name(b.name.as_deref())?, data: b.data };
        let len = event.name.as_ref().map_or(0, |n| n.as_str().len()) + event.data.len();
        if len > console.0.max_event_bytes {
            return Err(ConsoleError::BadRequest(format!(
                "event of {len} bytes, over the limit of {} (--max-event-bytes)",
                console.0.max_event_bytes
            )));
        }
        let retain = if b.retain { Retain::Set { expires_at: None } } else { Retain::No };
        let c = &console.0;
        let accepted = c.backplane.publish(&c.routers, subject.target(), event, retain, None).await?;
        Ok(json!({ "id": accepted.id.to_string(), "recipients": accepted.recipients }))
    }
    .await;
    audited("publish", &who, &peer, result)
}

#[derive(Deserialize)]
pub(super) struct ClearBody {
    kind: String,
    id: String,
    name: Option<String>,
}

/// `POST /console/api/clear-retained`: clears one retained value the way a publisher does, with
/// an event carrying `retain.clear` (empty data; open streams receive it like any event).
pub(super) async fn clear_retained(State(console): State<Console>, ext: Extensions, raw: Bytes) -> Response {
    let peer = peer_of(&ext);
    let parsed = body::<ClearBody>(&raw);
    let who = parsed.as_ref().map_or_else(|_| "-".to_owned(), |b| format!("{} {}", b.kind, b.id));
    let result = async {
        let b = parsed?;
        let subject = subject(&b.kind, &b.id)?;
        let event = Event { name: name(b.name.as_deref())?, data: String::new() };
        let c = &console.0;
        let accepted = c.backplane.publish(&c.routers, subject.target(), event, Retain::Clear, None).await?;
        Ok(json!({ "id": accepted.id.to_string(), "name": b.name.unwrap_or_default() }))
    }
    .await;
    audited("clear_retained", &who, &peer, result)
}

#[derive(Deserialize)]
pub(super) struct DisconnectBody {
    user: String,
    #[serde(default)]
    reason: String,
}

/// `POST /console/api/disconnect`: closes every stream of a user on every replica, as the gRPC
/// `Disconnect` does (each gets its final `ssegate.disconnect` event).
pub(super) async fn disconnect(State(console): State<Console>, ext: Extensions, raw: Bytes) -> Response {
    let peer = peer_of(&ext);
    let parsed = body::<DisconnectBody>(&raw);
    let who = parsed.as_ref().map_or_else(|_| "-".to_owned(), |b| format!("user {}", b.user));
    let result = async {
        let b = parsed?;
        let user = UserId::parse(&b.user).map_err(|e| ConsoleError::BadRequest(format!("user {e}")))?;
        if b.reason.len() > MAX_REASON {
            return Err(ConsoleError::BadRequest(format!("reason over {MAX_REASON} bytes")));
        }
        let reason = if b.reason.is_empty() { "console".to_owned() } else { b.reason };
        let c = &console.0;
        let g = c.backplane.gather(&c.routers, &Query::Disconnect { user, reason }).await;
        let closed: u64 = g.answers.iter().map(|a| a.closed).sum();
        Ok(json!({ "closed": closed, "replicas": g.answers.len(), "partial": g.partial }))
    }
    .await;
    audited("disconnect", &who, &peer, result)
}
