//! The authorizer's answers by credential. The key is a SHA-256 of what was sent (cookies,
//! configured headers, user, groups and topics asked), so that no cookie value is kept past
//! the call, and so that nobody can make their request share another's entry without sending
//! the same credential. Bounded in entries: the oldest inserted go first.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{AuthorizeQuery, Verdict};

pub(super) type Key = [u8; 32];

/// The key of a request: every field the backend decides on, except the peer (so that a
/// browser that changes address, or many behind one proxy, share their credential's answer).
/// Each part is length-prefixed, so no two different requests encode the same.
pub(super) fn key(q: &AuthorizeQuery) -> Key {
    let mut h = Sha256::new();
    let mut part = |tag: u8, bytes: &[u8]| {
        h.update([tag]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for (name, value) in &q.cookies {
        part(b'c', name.as_bytes());
        part(b'v', value.as_bytes());
    }
    for (name, values) in &q.headers {
        part(b'h', name.as_bytes());
        for v in values {
            part(b'v', v.as_bytes());
        }
    }
    if let Some(user) = &q.user {
        part(b'u', user.as_str().as_bytes());
    }
    for g in &q.groups {
        part(b'g', g.as_str().as_bytes());
    }
    for t in &q.topics {
        part(b't', t.as_str().as_bytes());
    }
    h.finalize().into()
}

pub(super) struct Cache {
    max: usize,
    entries: HashMap<Key, (Arc<Verdict>, Instant)>,
    /// Keys in insertion order with the expiry they were inserted with (an entry replaced
    /// since has another, and is not removed by its old place in the queue).
    order: VecDeque<(Key, Instant)>,
}

impl Cache {
    pub(super) fn new(max: usize) -> Self {
        Self { max, entries: HashMap::new(), order: VecDeque::new() }
    }

    pub(super) fn get(&mut self, key: &Key, now: Instant) -> Option<Arc<Verdict>> {
        match self.entries.get(key) {
            Some((verdict, expires)) if now < *expires => Some(verdict.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub(super) fn insert(&mut self, key: Key, verdict: Arc<Verdict>, expires: Instant) {
        if self.max == 0 {
            return;
        }
        self.entries.insert(key, (verdict, expires));
        self.order.push_back((key, expires));
        while self.order.len() > self.max {
            if let Some((old, at)) = self.order.pop_front()
                && self.entries.get(&old).is_some_and(|(_, e)| *e == at)
            {
                self.entries.remove(&old);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{auth::authorizer::Denial, domain::UserId};

    fn q(cookie: &str, user: Option<&str>) -> AuthorizeQuery {
        AuthorizeQuery {
            cookies: vec![("SESSION".into(), cookie.into())],
            user: user.map(|u| UserId::parse(u).unwrap()),
            peer: "1.2.3.4:5".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_key_covers_the_credential_and_the_query_but_not_the_peer() {
        assert_eq!(key(&q("a", None)), key(&AuthorizeQuery { peer: "9.9.9.9:1".into(), ..q("a", None) }));
        assert_ne!(key(&q("a", None)), key(&q("b", None)));
        assert_ne!(key(&q("a", None)), key(&q("a", Some("x"))));
        // Length prefixes: moving bytes between name and value is another key.
        let a = AuthorizeQuery { cookies: vec![("ab".into(), "c".into())], ..Default::default() };
        let b = AuthorizeQuery { cookies: vec![("a".into(), "bc".into())], ..Default::default() };
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn entries_expire_and_the_oldest_go_first_when_full() {
        let now = Instant::now();
        let deny = Arc::new(Verdict::Deny(Denial { status: 401, reason: "no".into() }));
        let mut c = Cache::new(2);
        c.insert([1; 32], deny.clone(), now + Duration::from_secs(1));
        assert!(c.get(&[1; 32], now).is_some());
        assert!(c.get(&[1; 32], now + Duration::from_secs(1)).is_none(), "expired");
        c.insert([1; 32], deny.clone(), now + Duration::from_secs(9));
        c.insert([2; 32], deny.clone(), now + Duration::from_secs(9));
        c.insert([3; 32], deny.clone(), now + Duration::from_secs(9));
        assert_eq!(c.len(), 2);
        assert!(c.get(&[1; 32], now).is_none(), "the oldest went");
        assert!(c.get(&[3; 32], now).is_some());
        // Replacing an entry keeps it in the cache even when its first place is popped.
        c.insert([2; 32], deny.clone(), now + Duration::from_secs(10));
        c.insert([4; 32], deny, now + Duration::from_secs(9));
        assert!(c.get(&[2; 32], now).is_some());
    }
}
