//! A replica's partitions (`--nats-partitions`): one `Router` per partition of the broker's
//! events, each with its own stream, epoch and sequence. An event for users goes to each of
//! their users' partitions; a broadcast, group or topic event to every partition. A connection
//! belongs to its user's partition, so it reads one sequence, and an id keeps its form (the
//! epoch names the partition). Without a broker, or with one partition, there is one router.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{CloseReason, Router, Stats};
use crate::domain::{Target, UserId};

pub struct Partitions {
    /// Never empty.
    routers: Box<[Arc<Router>]>,
}

/// The partition of `user` among `count`: FNV-1a (64 bits) of the id's UTF-8 bytes, modulo
/// `count`. Written here, not taken from `std`'s hasher, because every replica of every version
/// must agree on it for as long as the streams live (`DefaultHasher` may change between Rust
/// releases); FNV-1a is fixed by its specification and enough to spread user ids.
pub fn partition_of(user: &str, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % count as u64) as usize
}

impl Partitions {
    /// `routers` must not be empty (one per partition, in partition order).
    pub fn new(routers: Vec<Arc<Router>>) -> Self {
        assert!(!routers.is_empty(), "at least one partition");
        Self { routers: routers.into() }
    }

    pub fn all(&self) -> &[Arc<Router>] {
        &self.routers
    }

    /// Partition 0: the one every broadcast, group and topic event reaches as well.
    pub fn first(&self) -> &Arc<Router> {
        &self.routers[0]
    }

    pub fn index_of(&self, user: &UserId) -> usize {
        partition_of(user.as_str(), self.routers.len())
    }

    /// The router of `user`'s connections.
    pub fn of_user(&self, user: &UserId) -> &Arc<Router> {
        &self.routers[self.index_of(user)]
    }

    /// The router of the partition whose current epoch is `epoch`.
    pub fn of_epoch(&self, epoch: u64) -> Option<&Arc<Router>> {
        self.routers.iter().find(|r| r.epoch() == epoch)
    }

    /// Where an event for `target` is written: `(partition, target)` pairs in partition order,
    /// never none. Users are split by partition (each partition gets its own users); any other
    /// target goes to every partition.
    pub fn split(&self, target: Target) -> Vec<(usize, Target)> {
        split(target, self.routers.len())
    }

    /// The counters of every partition added up (an event written to several partitions counts
    /// once in each).
    pub fn stats(&self) -> Stats {
        let mut all = self.routers[0].stats();
        for r in &self.routers[1..] {
            all.add(&r.stats());
        }
        all
    }

    pub fn uptime(&self) -> Duration {
        self.routers[0].uptime()
    }

    /// Closes every connection of every partition (see `Router::close_all`); how many.
    pub fn close_all(&self, reason: CloseReason, last: impl Fn() -> Option<Bytes> + Send + Sync + 'static) -> usize {
        let last = Arc::new(last);
        self.routers
            .iter()
            .map(|r| {
                let last = last.clone();
                r.close_all(reason, move || last())
            })
            .sum()
    }

    pub fn start_timers(&self, heartbeat: Duration, stop: &CancellationToken, tracker: &TaskTracker) {
        for r in &self.routers {
            r.start_timers(heartbeat, stop, tracker);
        }
    }
}

/// `Partitions::split` for `count` partitions.
pub fn split(target: Target, count: usize) -> Vec<(usize, Target)> {
    if count <= 1 {
        return vec![(0, target)];
    }
    match target {
        Target::Users(users) => {
            let mut by: Vec<Vec<UserId>> = vec![Vec::new(); count];
            for u in users {
                by[partition_of(u.as_str(), count)].push(u);
            }
            // Still sorted and without duplicates within each partition.
            let split: Vec<_> =
                by.into_iter().enumerate().filter(|(_, u)| !u.is_empty()).map(|(k, u)| (k, Target::Users(u))).collect();
            if split.is_empty() { vec![(0, Target::Users(Vec::new()))] } else { split }
        }
        other => (0..count).map(|k| (k, other.clone())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn the_partition_of_a_user_is_fixed_by_fnv1a() {
        // FNV-1a 64 of "" and "a" (the specification's test vectors), modulo 3 and 7.
        assert_eq!(0xcbf2_9ce4_8422_2325u64 % 3, partition_of("", 3) as u64);
        assert_eq!(0xaf63_dc4c_8601_ec8cu64 % 7, partition_of("a", 7) as u64);
        assert_eq!(partition_of("anyone", 1), 0);
        let spread: std::collections::HashSet<usize> = (0..100).map(|i| partition_of(&format!("u{i}"), 4)).collect();
        assert_eq!(spread.len(), 4, "100 users reach every one of 4 partitions");
    }

    #[test]
    fn users_are_split_by_partition_and_other_targets_go_everywhere() {
        let users: Vec<UserId> = (0..20).map(|i| user(&format!("u{i}"))).collect();
        let parts = split(Target::users(users.clone()), 3);
        let mut seen = Vec::new();
        for (k, t) in &parts {
            let Target::Users(us) = t else { panic!("users stay users") };
            assert!(us.iter().all(|u| partition_of(u.as_str(), 3) == *k));
            assert!(us.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
            seen.extend(us.iter().cloned());
        }
        seen.sort();
        let mut expected = users;
        expected.sort();
        assert_eq!(seen, expected, "every user once");
        assert_eq!(split(Target::Broadcast, 3).iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(split(Target::Broadcast, 1).len(), 1);
    }
}
