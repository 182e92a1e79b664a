//! A live connection's hold on the router: its id, its shard and its mailbox.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use super::{
    CloseReason, ConnId, Router, Start,
    mailbox::{Frame, Mailbox},
    shard::Cmd,
};

/// Dropping it (the stream's writer ends) removes the connection from its shard and from the
/// counts.
pub struct Registration {
    router: Arc<Router>,
    id: ConnId,
    /// Where the connection lives, to remove it without looking anything up.
    shard: usize,
    mailbox: Arc<Mailbox>,
    start: Start,
    /// Kept until the connection is gone (`hold`).
    held: Option<super::Held>,
}

impl Registration {
    pub(super) fn new(router: Arc<Router>, id: ConnId, shard: usize, mailbox: Arc<Mailbox>, start: Start) -> Self {
        Self { router, id, shard, mailbox, start, held: None }
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn start(&self) -> Start {
        self.start
    }

    /// Keeps `held` (what `Router::follow` returned) until this connection is gone.
    pub fn hold(&mut self, held: super::Held) {
        self.held = Some(held);
    }

    /// Ends this connection's stream gracefully: what is queued still goes out, nothing new
    /// is queued. The client may resume from its last id. At token expiry the stream's last
    /// event says so (`ssegate.disconnect`, `token_expired`), so a client knows to get a fresh
    /// token rather than retry the same URL.
    pub fn close(&self, reason: CloseReason) {
        let last = (reason == CloseReason::TokenExpired).then(|| Frame::disconnect("token_expired"));
        self.mailbox.close(reason, last);
        self.unregister();
    }

    fn unregister(&self) {
        self.router.shards[self.shard].submit(Cmd::Unregister(self.id));
        self.router.run_shard(self.shard);
    }

    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    pub fn router(&self) -> &Router {
        &self.router
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.unregister();
        // Frames the client never got count as dropped (zero after a graceful close).
        let left = self.mailbox.discard();
        self.router.counters.dropped.fetch_add(left as u64, Relaxed);
    }
}
