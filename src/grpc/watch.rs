//! `WatchPresence`: a `presence::Watch` as a gRPC server stream: the snapshot, its marker, then
//! live transitions, ended with a status when the hub cuts the watcher off.

use std::{
    pin::Pin,
    time::{SystemTime, UNIX_EPOCH},
};

use futures_util::{Stream, StreamExt, stream};
use tonic::Status;

use super::{ApiError, pb};
use crate::presence::{End, State, Transition, Watch};

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::PresenceEvent, Status>> + Send>>;

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn state(s: State) -> pb::presence_event::State {
    match s {
        State::Online => pb::presence_event::State::Online,
        State::Offline => pb::presence_event::State::Offline,
    }
}

fn live(t: Transition) -> pb::PresenceEvent {
    pb::PresenceEvent {
        user_id: t.user.to_string(),
        state: state(t.state) as i32,
        at_unix_ms: unix_ms(t.at),
        ..Default::default()
    }
}

/// The stream of one watch. `queue` is the per-watcher bound, named in the fell-behind status.
pub fn stream(watch: Watch, queue: usize) -> WatchStream {
    let at = unix_ms(watch.at);
    let mut watch = watch;
    let mut snapshot = std::mem::take(&mut watch.snapshot);
    // Sorted, so a watcher (and a test) can compare snapshots; it is a copy per watch anyway.
    snapshot.sort_unstable();
    let first = snapshot.into_iter().map(move |u| {
        Ok(pb::PresenceEvent {
            user_id: u.to_string(),
            state: pb::presence_event::State::Online as i32,
            snapshot: true,
            at_unix_ms: at,
            ..Default::default()
        })
    });
    let marker = pb::PresenceEvent { snapshot_complete: true, at_unix_ms: at, ..Default::default() };
    let live = stream::unfold(Some(watch), move |w| async move {
        let mut w = w?;
        // Cut off: end now, without the stale queue (the watcher starts again from a snapshot).
        if w.end() == Some(End::FellBehind) {
            return Some((Err(ApiError::WatcherFellBehind { queue }.into()), None));
        }
        match w.events.recv().await {
            Some(t) => Some((Ok(live(t)), Some(w))),
            None => {
                let status: Status = match w.end() {
                    Some(End::FellBehind) => ApiError::WatcherFellBehind { queue }.into(),
                    Some(End::Shutdown) | None => ApiError::Unavailable(
                        "the server is shutting down; reconnect (to another replica) for a fresh snapshot".into(),
                    )
                    .into(),
                };
                Some((Err(status), None))
            }
        }
    });
    Box::pin(stream::iter(first).chain(stream::once(async move { Ok(marker) })).chain(live))
}
