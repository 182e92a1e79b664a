//! The cluster view: which replicas hold a stream of each user, and the grace before a user
//! with none counts as offline. A plain state machine (no clock, no I/O): the hub feeds it and
//! passes the current instant, so it is tested without waiting.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::{ReplicaId, State};
use crate::domain::UserId;

/// A transition the view decided, before it gets its wall-clock time.
pub type Change = (UserId, State);

/// One user the view knows: online, or gone from every replica and in its grace.
struct Entry {
    /// Replicas with at least one stream of the user (a handful at most: a user's tabs).
    replicas: Vec<ReplicaId>,
    /// Since when no replica has had the user, as the deadline its grace ends at; `None` while
    /// some replica has it.
    offline_at: Option<Instant>,
}

pub struct View {
    grace: Duration,
    /// Every user told online and not yet offline: memory per online user (and per user in
    /// its grace).
    users: HashMap<UserId, Entry>,
    /// Grace deadlines in the order they were set: the grace is one constant, so this order is
    /// also deadline order and the next deadline is the front. An entry whose user came back
    /// (or left again later) is stale and skipped when it comes due.
    pending: VecDeque<(Instant, UserId)>,
}

impl View {
    pub fn new(grace: Duration) -> Self {
        Self { grace, users: HashMap::new(), pending: VecDeque::new() }
    }

    /// `replica` has a stream of `user`. A user nobody had (and not in a grace) goes online.
    pub fn add(&mut self, user: &UserId, replica: &ReplicaId, out: &mut Vec<Change>) {
        match self.users.get_mut(user) {
            Some(e) => {
                // Back within the grace (or on one more replica): no transition.
                e.offline_at = None;
                if !e.replicas.contains(replica) {
                    e.replicas.push(replica.clone());
                }
            }
            None => {
                self.users.insert(user.clone(), Entry { replicas: vec![replica.clone()], offline_at: None });
                out.push((user.clone(), State::Online));
            }
        }
    }

    /// `replica` no longer has a stream of `user`. When no replica has, the grace starts.
    pub fn remove(&mut self, user: &UserId, replica: &ReplicaId, now: Instant) {
        let Some(e) = self.users.get_mut(user) else { return };
        e.replicas.retain(|r| r != replica);
        if e.replicas.is_empty() && e.offline_at.is_none() {
            let at = now + self.grace;
            e.offline_at = Some(at);
            self.pending.push_back((at, user.clone()));
        }
    }

    /// Every user of `replica` is gone from it (the replica stopped being heard from, or sent
    /// its whole set anew).
    pub fn remove_replica(&mut self, replica: &ReplicaId, now: Instant) {
        let users: Vec<UserId> =
            self.users.iter().filter(|(_, e)| e.replicas.contains(replica)).map(|(u, _)| u.clone()).collect();
        for u in users {
            self.remove(&u, replica, now);
        }
    }

    /// Users whose grace is over go offline.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Change>) {
        while let Some((at, _)) = self.pending.front() {
            if *at > now {
                break;
            }
            let Some((at, user)) = self.pending.pop_front() else { break };
            if self.users.get(&user).is_some_and(|e| e.offline_at == Some(at)) {
                self.users.remove(&user);
                out.push((user, State::Offline));
            }
        }
    }

    /// When the next grace ends, if one is running.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|(at, _)| *at)
    }

    /// Users online now as far as watchers were told (those in their grace included).
    pub fn online(&self) -> Vec<UserId> {
        self.users.keys().cloned().collect()
    }

    /// Users online now.
    pub fn len(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn online_once_per_user_offline_only_after_a_grace_with_no_replica() {
        let (a, b): (ReplicaId, ReplicaId) = (Arc::from("a"), Arc::from("b"));
        let mut v = View::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let mut out = Vec::new();
        v.add(&user("bob"), &b, &mut out);
        v.add(&user("bob"), &a, &mut out);
        assert_eq!(out, [(user("bob"), State::Online)]);
        out.clear();
        v.remove(&user("bob"), &b, t0);
        v.expire(t0 + Duration::from_secs(10), &mut out);
        assert!(out.is_empty(), "still on a");
        v.remove(&user("bob"), &a, t0 + Duration::from_secs(10));
        v.expire(t0 + Duration::from_secs(14), &mut out);
        assert!(out.is_empty(), "in the grace");
        v.expire(t0 + Duration::from_secs(15), &mut out);
        assert_eq!(out, [(user("bob"), State::Offline)]);
        assert_eq!(v.len(), 0);
    }

    #[test]
    fn a_return_within_the_grace_cancels_the_offline() {
        let a: ReplicaId = Arc::from("a");
        let mut v = View::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let mut out = Vec::new();
        v.add(&user("u"), &a, &mut out);
        v.remove(&user("u"), &a, t0);
        v.add(&user("u"), &a, &mut out);
        // Leaves again later: only the second grace counts.
        v.remove(&user("u"), &a, t0 + Duration::from_secs(3));
        v.expire(t0 + Duration::from_secs(6), &mut out);
        assert_eq!(out, [(user("u"), State::Online)]);
        v.expire(t0 + Duration::from_secs(8), &mut out);
        assert_eq!(out, [(user("u"), State::Online), (user("u"), State::Offline)]);
        assert_eq!(v.next_deadline(), None);
    }

    #[test]
    fn a_replica_gone_takes_its_users_into_the_grace() {
        let (a, b): (ReplicaId, ReplicaId) = (Arc::from("a"), Arc::from("b"));
        let mut v = View::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let mut out = Vec::new();
        v.add(&user("x"), &a, &mut out);
        v.add(&user("y"), &a, &mut out);
        v.add(&user("y"), &b, &mut out);
        out.clear();
        v.remove_replica(&a, t0);
        v.expire(t0 + Duration::from_secs(1), &mut out);
        assert_eq!(out, [(user("x"), State::Offline)]);
        let mut online = v.online();
        online.sort();
        assert_eq!(online, [user("y")]);
    }
}
