//! The router's tables: every connection, and indexes from user, group and topic to the
//! connections that joined them. Only `Router` touches it, under its lock.

use std::{collections::HashMap, hash::Hash, sync::Arc};

use super::{ConnId, mailbox::Mailbox};
use crate::domain::{GroupId, Target, Topic, UserId};

/// Connections that joined one user, group or topic, with their mailboxes so fan-out needs no
/// second lookup.
pub(super) type Members = HashMap<ConnId, Arc<Mailbox>>;

pub(super) struct Conn {
    pub mailbox: Arc<Mailbox>,
    pub user: UserId,
    pub groups: Vec<GroupId>,
    pub topics: Vec<Topic>,
}

#[derive(Default)]
pub(super) struct Tables {
    pub conns: HashMap<ConnId, Conn>,
    pub users: HashMap<UserId, Members>,
    pub groups: HashMap<GroupId, Members>,
    pub topics: HashMap<Topic, Members>,
}

fn join<K: Hash + Eq + Clone>(index: &mut HashMap<K, Members>, key: &K, id: ConnId, mb: &Arc<Mailbox>) {
    index.entry(key.clone()).or_default().insert(id, mb.clone());
}

fn leave<K: Hash + Eq>(index: &mut HashMap<K, Members>, key: &K, id: ConnId) {
    if let Some(members) = index.get_mut(key) {
        members.remove(&id);
        if members.is_empty() {
            index.remove(key);
        }
    }
}

impl Tables {
    pub fn insert(&mut self, id: ConnId, conn: Conn) {
        join(&mut self.users, &conn.user, id, &conn.mailbox);
        for g in &conn.groups {
            join(&mut self.groups, g, id, &conn.mailbox);
        }
        for t in &conn.topics {
            join(&mut self.topics, t, id, &conn.mailbox);
        }
        self.conns.insert(id, conn);
    }

    pub fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        leave(&mut self.users, &conn.user, id);
        for g in &conn.groups {
            leave(&mut self.groups, g, id);
        }
        for t in &conn.topics {
            leave(&mut self.topics, t, id);
        }
        Some(conn)
    }

    /// Calls `f` once for every connection the target addresses. A connection is never visited
    /// twice: it belongs to one user, users in a target are deduplicated, and a group or topic
    /// holds each connection once.
    pub fn for_each_target(&self, target: &Target, mut f: impl FnMut(ConnId, &Arc<Mailbox>)) {
        let each = |m: &Members| m.iter().for_each(|(id, mb)| f(*id, mb));
        match target {
            Target::Users(users) => users.iter().filter_map(|u| self.users.get(u)).for_each(each),
            Target::Group(g) => self.groups.get(g).into_iter().for_each(each),
            Target::Topic(t) => self.topics.get(t).into_iter().for_each(each),
            Target::Broadcast => self.conns.iter().for_each(|(id, c)| f(*id, &c.mailbox)),
        }
    }

    pub fn count<K: Hash + Eq>(index: &HashMap<K, Members>, key: &K) -> u64 {
        index.get(key).map_or(0, |m| m.len() as u64)
    }
}
