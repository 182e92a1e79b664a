//! The presence link between replicas, over core NATS on `<subject>.ctl.presence`: each replica
//! sends its own users' changes (a user's first stream here opened, or last closed), numbered,
//! and a heartbeat every second carrying the number of its last message; each applies the
//! others' to its `presence::Hub`. A replica asks for another's whole set when it meets it
//! mid-way or sees a gap in its numbers (core NATS is at most once), and every replica asks
//! everyone at start; a replica not heard from for `presence::PEER_TTL` counts as gone (its
//! users enter the grace). One task sends everything this replica says, so its messages leave
//! in the order they are numbered.

use std::sync::Arc;

use async_nats::Client;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    HELLO_EVERY,
    wire::{self, PresenceMsg},
};
use crate::{
    domain::UserId,
    presence::{Hub, Local, Outbox},
};

/// Users per message at most: a 256-byte id each keeps a message well under NATS's 1 MiB
/// default payload limit.
const CHUNK: usize = 1000;
/// Batches of local changes queued for the sender at most; past it the whole set is sent.
const QUEUE: usize = 1024;
/// Longest wait for the NATS client to take a message: its buffer fills while the broker is
/// away, and the sender (whose `Bye` ends a drain) must not wait for the broker.
const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Subscribes to the presence subject and starts the receiver and the sender on `tracker`
/// (ending with `stop`); returns where the hub's driver hands this replica's changes.
pub async fn start(
    client: Client,
    subject: String,
    hub: Arc<Hub>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Outbox, async_nats::Error> {
    let mut sub = client.subscribe(subject.clone()).await?;
    let (batches, mut queued) = mpsc::channel::<Local>(QUEUE);
    let resync = Arc::new(Notify::new());
    let me = hub.me().to_string();

    // Receiver: applies the others' messages; asks for a whole set when needed.
    let (c, s, h, r, token, me2) =
        (client.clone(), subject.clone(), hub.clone(), resync.clone(), stop.clone(), me.clone());
    tracker.spawn(async move {
        loop {
            let msg = tokio::select! {
                () = token.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            let msg = match wire::decode_presence(&msg.payload) {
                Ok((m, 0)) => m,
                Ok((m, skipped)) => {
                    // Ids another version accepts and this one refuses: left out.
                    tracing::warn!(skipped, "presence message with user ids this version refuses; those left out");
                    m
                }
                Err(e) => {
                    // A kind from a newer replica: ignored (its state comes by the kinds we know).
                    tracing::debug!(error = %e, "presence message not understood; ignored");
                    continue;
                }
            };
            let ask = match &msg {
                PresenceMsg::Changes { replica, seq, reset, changes } => {
                    h.remote(replica, *seq, *reset, changes).then_some(replica)
                }
                PresenceMsg::Heartbeat { replica, seq } => h.heartbeat(replica, *seq).then_some(replica),
                PresenceMsg::Bye { replica } => {
                    h.bye(replica);
                    None
                }
                PresenceMsg::Sync { from, of } => {
                    if *from != me2 && of.as_ref().is_none_or(|of| *of == me2) {
                        r.notify_one();
                    }
                    None
                }
            };
            if let Some(replica) = ask {
                tracing::debug!(replica, "presence: asking a replica for its whole set");
                let ask = PresenceMsg::Sync { from: me2.clone(), of: Some(replica.clone()) };
                let _ =
                    tokio::time::timeout(PUBLISH_WAIT, c.publish(s.clone(), wire::encode_presence(&ask).into())).await;
            }
        }
        let _ = sub.unsubscribe().await;
    });

    // Sender: this replica's changes, whole sets when asked, and the heartbeat, in order.
    let token = stop.clone();
    let r = resync.clone();
    tracker.spawn(async move {
        let mut seq = 0u64;
        let send = |msg: PresenceMsg| {
            let client = client.clone();
            let subject = subject.clone();
            async move {
                match tokio::time::timeout(PUBLISH_WAIT, client.publish(subject, wire::encode_presence(&msg).into())).await {
                    Ok(Ok(())) => {}
                    // Lost like any core NATS message: the others see the gap and ask again.
                    Ok(Err(e)) => tracing::debug!(error = %e, "presence message not sent"),
                    Err(_) => tracing::debug!("presence message not sent: the NATS client is not taking messages"),
                }
            }
        };
        // Everyone's whole set, for this new replica.
        send(PresenceMsg::Sync { from: me.clone(), of: None }).await;
        let mut tick = tokio::time::interval(HELLO_EVERY);
        loop {
            tokio::select! {
                () = token.cancelled() => {
                    // Stopping: the others start this replica's users' grace now rather than
                    // after `PEER_TTL` of silence (its clients are reconnecting elsewhere
                    // meanwhile, within the grace), and share the webhook without it.
                    send(PresenceMsg::Bye { replica: me.clone() }).await;
                    // Bounded: a broker that is away must not hold the drain.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), client.flush()).await;
                    break;
                }
                Some(batch) = queued.recv() => {
                    for chunk in batch.chunks(CHUNK) {
                        seq += 1;
                        send(PresenceMsg::Changes { replica: me.clone(), seq, reset: false, changes: chunk.to_vec() }).await;
                    }
                }
                () = r.notified() => {
                    // The whole set is newer than anything queued: what is queued is in it.
                    while queued.try_recv().is_ok() {}
                    let all: Vec<(UserId, bool)> = hub.local_set().into_iter().map(|u| (u, true)).collect();
                    let mut chunks = all.chunks(CHUNK);
                    let first = chunks.next().unwrap_or(&[]);
                    seq += 1;
                    send(PresenceMsg::Changes { replica: me.clone(), seq, reset: true, changes: first.to_vec() }).await;
                    for chunk in chunks {
                        seq += 1;
                        send(PresenceMsg::Changes { replica: me.clone(), seq, reset: false, changes: chunk.to_vec() }).await;
                    }
                }
                _ = tick.tick() => {
                    send(PresenceMsg::Heartbeat { replica: me.clone(), seq }).await;
                    hub.expire_peers();
                }
            }
        }
    });
    Ok(Outbox { batches, resync })
}
