//! The live tail: a subject's events as they are published, read-only. A task follows the
//! replay log (`Router::events_after`, every `POLL_EVERY`) rather than registering a stream, so
//! a tail changes nothing the router counts (presence, limits, Disconnect) and costs the event
//! path nothing; it therefore sees events published to exactly the subject (for a user: those
//! whose user list includes them), as `History` does, and needs the replay log on. Bounded: at
//! most `MAX_TAILS` at once, each with a queue of `QUEUE` events (cut off, with a last `cutoff`
//! event, if the page does not keep up), each ending after `TAIL_MAX` or at shutdown.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Query, State},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Console, ConsoleError, MAX_TAILS, inspect::subject};
use crate::{domain::EventId, event_stream::parse::name_and_data};

const POLL_EVERY: Duration = Duration::from_millis(200);
/// Events read per poll, at most (more wait for the next poll).
const BATCH: usize = 256;
/// Events waiting for the page, at most: beyond, the tail is cut off.
const QUEUE: usize = 512;
/// A tail ends after this.
pub const TAIL_MAX: Duration = Duration::from_secs(10 * 60);

#[derive(Deserialize)]
pub(super) struct TailQuery {
    kind: String,
    id: String,
}

pub(super) async fn tail(State(console): State<Console>, Query(q): Query<TailQuery>) -> Result<Response, ConsoleError> {
    let subject = subject(&q.kind, &q.id)?;
    if console.0.stop.is_cancelled() {
        return Err(ConsoleError::ShuttingDown);
    }
    let permit = console.0.tails.clone().try_acquire_owned().map_err(|_| ConsoleError::Busy(MAX_TAILS))?;
    let (tx, rx) = mpsc::channel::<Event>(QUEUE);
    let router = console.0.router_of(&subject).clone();
    let stop = console.0.stop.clone();
    let target = subject.target();
    let replay_on = router.replay_window().capacity > 0;
    tokio::spawn(async move {
        let _permit = permit;
        let mut position = router.last_seq();
        let start = json!({ "subject": format!("{} {}", subject.kind(), subject.id()), "from": position,
            "max_s": TAIL_MAX.as_secs(), "replay_log": replay_on });
        if tx.try_send(Event::default().event("start").data(start.to_string())).is_err() {
            return;
        }
        let end = tokio::time::Instant::now() + TAIL_MAX;
        let mut tick = tokio::time::interval(POLL_EVERY);
        let why = loop {
            tokio::select! {
                () = stop.cancelled() => break "shutdown",
                () = tokio::time::sleep_until(end) => break "time limit",
                () = tx.closed() => return,
                _ = tick.tick() => {}
            }
            let page = router.events_after(&target, position, BATCH);
            let mut events: Vec<Event> = Vec::new();
            if page.gap {
                let note = json!({ "reason": "events were evicted from the replay log before the tail read them" });
                events.push(Event::default().event("gap").data(note.to_string()));
            }
            for logged in &page.events {
                let (name, data) = name_and_data(&logged.frame.bytes);
                let id = EventId { epoch: page.epoch, seq: logged.seq }.to_string();
                let value = json!({ "id": id, "name": name, "data": data,
                    "target": super::inspect::target_text(&logged.target) });
                events.push(Event::default().event("event").data(value.to_string()));
            }
            position = page.position;
            if events.into_iter().any(|e| tx.try_send(e).is_err()) {
                break "cutoff";
            }
        };
        // The queue may be full: the last word waits for room, not past the shutdown.
        let last = Event::default().event("end").data(json!({ "reason": why }).to_string());
        tokio::select! {
            _ = tx.send(last) => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    });
    let events = futures_util::StreamExt::map(ReceiverStream::new(rx), Ok::<_, Infallible>);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}
