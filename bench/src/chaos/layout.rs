//! Who the chaos clients are, what each publish addresses, and the ledger of publishes the
//! coordinator hands to the workers for the final check.
//!
//! Every client (a browser tab) is one user, one group, one topic and receives broadcasts;
//! three clients share a user (a user's tabs). Groups and topics are picked by a hash of the
//! client number, so they mix users and never line up with worker boundaries. Every process
//! derives the same identities from the client number alone.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// SplitMix64: the deterministic hash behind identities, the publish mix and jitter.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A small PRNG (SplitMix64 stream) for jitter and replica choice; no crate needed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn between_ms(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

const GROUP_SALT: u64 = 0x0067_726f_7570;
const TOPIC_SALT: u64 = 0x0074_6f70_6963;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub clients: u64,
    pub users: u32,
    pub groups: u32,
    pub topics: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: u32,
    pub group: u32,
    pub topic: u32,
}

/// What a publish addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Users(Vec<u32>),
    Group(u32),
    Topic(u32),
    Broadcast,
}

impl Layout {
    /// Three tabs per user, ~300 clients per group, ~150 per topic.
    pub fn for_clients(clients: u64) -> Self {
        let f = |d: u64| (clients / d).clamp(1, u64::from(u32::MAX)) as u32;
        Layout { clients, users: f(3), groups: f(300), topics: f(150) }
    }

    pub fn identity(&self, client: u64) -> Identity {
        Identity {
            user: (client % u64::from(self.users)) as u32,
            group: (mix64(client ^ GROUP_SALT) % u64::from(self.groups)) as u32,
            topic: (mix64(client ^ TOPIC_SALT) % u64::from(self.topics)) as u32,
        }
    }

    /// The subscription request path of a client (the insecure development identity).
    pub fn path(&self, client: u64) -> String {
        let id = self.identity(client);
        format!("/v1/events?user=u{}&group=g{}&topic=t{}", id.user, id.group, id.topic)
    }

    /// The target of publish `n`: a broadcast every `broadcast_every` publishes (the recovery
    /// probes), else 10 % groups, 15 % topics, 75 % one to three users.
    pub fn target(&self, n: u64, broadcast_every: u64, seed: u64) -> Target {
        if n.is_multiple_of(broadcast_every.max(1)) {
            return Target::Broadcast;
        }
        let h = mix64(n ^ seed);
        let r = h % 1000;
        let pick = |x: u64, m: u32| (mix64(x) % u64::from(m)) as u32;
        if r < 100 {
            Target::Group(pick(h, self.groups))
        } else if r < 250 {
            Target::Topic(pick(h, self.topics))
        } else {
            let k = 1 + (h >> 32) % 3;
            let mut users: Vec<u32> = (0..k).map(|i| pick(h.wrapping_add(i + 1), self.users)).collect();
            users.sort_unstable();
            users.dedup();
            Target::Users(users)
        }
    }
}

impl Target {
    pub fn addresses(&self, id: &Identity) -> bool {
        match self {
            Target::Users(us) => us.contains(&id.user),
            Target::Group(g) => *g == id.group,
            Target::Topic(t) => *t == id.topic,
            Target::Broadcast => true,
        }
    }

    #[cfg(test)]
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Users(_) => "user",
            Target::Group(_) => "group",
            Target::Topic(_) => "topic",
            Target::Broadcast => "broadcast",
        }
    }

    fn encode(&self) -> String {
        match self {
            Target::Users(us) => {
                let mut s = String::from("u");
                for (i, u) in us.iter().enumerate() {
                    let _ = write!(s, "{}{u}", if i == 0 { "" } else { "," });
                }
                s
            }
            Target::Group(g) => format!("g{g}"),
            Target::Topic(t) => format!("t{t}"),
            Target::Broadcast => "b".into(),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        let (tag, rest) = s.split_at_checked(1)?;
        Some(match tag {
            "u" => Target::Users(rest.split(',').map(|u| u.parse().ok()).collect::<Option<_>>()?),
            "g" => Target::Group(rest.parse().ok()?),
            "t" => Target::Topic(rest.parse().ok()?),
            "b" if rest.is_empty() => Target::Broadcast,
            _ => return None,
        })
    }
}

/// An event's data: `chaos <n> <first send time, ns since the Unix epoch>`. `n` is the publish
/// number; its idempotency key is `chaos-<n>`.
pub fn payload(n: u64, sent_ns: u64) -> String {
    format!("chaos {n} {sent_ns}")
}

pub fn idempotency_key(n: u64) -> String {
    format!("chaos-{n}")
}

pub fn parse_payload(data: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(data).ok()?;
    let mut it = s.strip_prefix("chaos ")?.split(' ');
    let n = it.next()?.parse().ok()?;
    let sent = it.next()?.parse().ok()?;
    it.next().is_none().then_some((n, sent))
}

/// Where an event id `<epoch hex>-<seq>` stands in the run: the broker stream's epoch (its
/// creation time, so the ids of a stream recreated after the broker lost its store sort after
/// every id of the lost one) and the stream sequence. Ordered by epoch, then sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pos {
    pub epoch: u64,
    pub seq: u64,
}

impl Pos {
    pub fn parse(id: &str) -> Option<Pos> {
        let (epoch, seq) = id.split_once('-')?;
        Some(Pos { epoch: u64::from_str_radix(epoch, 16).ok()?, seq: seq.parse().ok()? })
    }
}

/// As the server writes it (and a browser sends it back in `Last-Event-ID`).
impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{}", self.epoch, self.seq)
    }
}

/// One publish as the coordinator saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub n: u64,
    pub target: Target,
    /// The event id of the first OK answer; `None` if no attempt succeeded.
    pub id: Option<Pos>,
    /// With partitioned streams, the event's ids in the other partitions it was stored in
    /// (`partition_event_ids` after the first); a client sees the one of its partition.
    pub others: Vec<Pos>,
    pub attempts: u32,
    pub sent_ns: u64,
    /// When the OK answer arrived.
    pub acked_ns: u64,
}

impl Record {
    /// Every id of the event (none if unacknowledged).
    pub fn ids(&self) -> impl Iterator<Item = Pos> + '_ {
        self.id.into_iter().chain(self.others.iter().copied())
    }

    pub fn encode(&self) -> String {
        let id = match self.id {
            None => "-".to_string(),
            Some(_) => self.ids().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
        };
        format!("{} {id} {} {} {} {}", self.n, self.attempts, self.sent_ns, self.acked_ns, self.target.encode())
    }

    pub fn decode(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split(' ').collect();
        let [n, id, attempts, sent_ns, acked_ns, target] = f.as_slice() else { return None };
        let ids = if *id == "-" { Vec::new() } else { id.split(',').map(Pos::parse).collect::<Option<Vec<_>>>()? };
        Some(Record {
            n: n.parse().ok()?,
            id: ids.first().copied(),
            others: ids.get(1..).unwrap_or_default().to_vec(),
            attempts: attempts.parse().ok()?,
            sent_ns: sent_ns.parse().ok()?,
            acked_ns: acked_ns.parse().ok()?,
            target: Target::decode(target)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_spread_and_paths() {
        let l = Layout::for_clients(15_000);
        assert_eq!((l.users, l.groups, l.topics), (5000, 50, 100));
        assert_eq!(l.identity(7).user, l.identity(5007).user, "tabs of one user");
        let mut per_group = vec![0u32; l.groups as usize];
        for c in 0..l.clients {
            per_group[l.identity(c).group as usize] += 1;
        }
        assert!(per_group.iter().all(|&n| (200..400).contains(&n)), "{per_group:?}");
        let id = l.identity(3);
        assert_eq!(l.path(3), format!("/v1/events?user=u3&group=g{}&topic=t{}", id.group, id.topic));
        let tiny = Layout::for_clients(2);
        assert_eq!((tiny.users, tiny.groups, tiny.topics), (1, 1, 1));
    }

    #[test]
    fn publish_mix() {
        let l = Layout::for_clients(15_000);
        let mut kinds = std::collections::HashMap::new();
        for n in 1..=10_000 {
            *kinds.entry(l.target(n, 100, 1).kind()).or_insert(0) += 1;
        }
        assert_eq!(kinds["broadcast"], 100);
        assert!((900..1100).contains(&kinds["group"]), "{kinds:?}");
        assert!((1300..1700).contains(&kinds["topic"]), "{kinds:?}");
        assert_eq!(l.target(42, 100, 9), l.target(42, 100, 9), "deterministic");
    }

    #[test]
    fn addressing() {
        let id = Identity { user: 1, group: 2, topic: 3 };
        assert!(Target::Users(vec![0, 1]).addresses(&id));
        assert!(!Target::Users(vec![2]).addresses(&id));
        assert!(Target::Group(2).addresses(&id) && !Target::Group(3).addresses(&id));
        assert!(Target::Topic(3).addresses(&id) && Target::Broadcast.addresses(&id));
    }

    #[test]
    fn payloads_ids_and_records_round_trip() {
        assert_eq!(parse_payload(payload(12, 34).as_bytes()), Some((12, 34)));
        for bad in ["", "chaos 1", "chaos x 1", "chaos 1 2 3", "stall 1 2"] {
            assert_eq!(parse_payload(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(Pos::parse("18f3a-42"), Some(Pos { epoch: 0x18f3a, seq: 42 }));
        assert_eq!(Pos::parse("18f3a-42").map(|p| p.to_string()).as_deref(), Some("18f3a-42"));
        assert_eq!(Pos::parse("zz-1"), None);
        assert_eq!(Pos::parse("42"), None);
        assert!(Pos { epoch: 2, seq: 1 } > Pos { epoch: 1, seq: 900 }, "a recreated stream's ids sort after");
        for target in [Target::Users(vec![1, 22]), Target::Group(3), Target::Topic(0), Target::Broadcast] {
            let id = Some(Pos { epoch: 0x18f3a, seq: 9 });
            let r = Record { n: 5, target, id, others: Vec::new(), attempts: 2, sent_ns: 100, acked_ns: 200 };
            assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
            let unacked = Record { id: None, ..r };
            assert_eq!(Record::decode(&unacked.encode()), Some(unacked));
        }
        assert_eq!(Record::decode("1 2 3"), None);
    }
}
