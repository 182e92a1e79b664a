//! Who subscribes to what, and what an event carries: the deterministic layout every worker
//! process and the publisher agree on without talking to each other.
//!
//! Streams are numbered: users `0..U`, then groups, then topics, then one broadcast stream.
//! Connection `i` is user `i % U`, joins group `i % G` and topic `i % T` (when there are any)
//! and receives broadcasts. Nchan and the baseline have plain channels only, so there a
//! connection follows exactly one channel: its topic if there are topics, else its user.

use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Ssegate,
    Nchan,
    Baseline,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Ssegate => "ssegate",
            Target::Nchan => "nchan",
            Target::Baseline => "baseline",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    User,
    Group,
    Topic,
    Broadcast,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub target: Target,
    pub users: u32,
    pub groups: u32,
    pub topics: u32,
    /// The number in the first user's name (`u<first_user>`): load generators with disjoint
    /// ranges of users share a cluster without receiving each other's events.
    pub first_user: u32,
}

impl Layout {
    /// Number of streams (the broadcast stream included).
    pub fn streams(&self) -> u32 {
        self.users + self.groups + self.topics + 1
    }

    /// The streams of one kind, as a range of stream ids.
    pub fn streams_of(&self, kind: Kind) -> std::ops::Range<u32> {
        let (u, g, t) = (self.users, self.groups, self.topics);
        match kind {
            Kind::User => 0..u,
            Kind::Group => u..u + g,
            Kind::Topic => u + g..u + g + t,
            Kind::Broadcast => u + g + t..u + g + t + 1,
        }
    }

    /// The kind of a stream and its index within that kind.
    pub fn kind_of(&self, stream: u32) -> (Kind, u32) {
        for kind in [Kind::User, Kind::Group, Kind::Topic, Kind::Broadcast] {
            let r = self.streams_of(kind);
            if r.contains(&stream) {
                return (kind, stream - r.start);
            }
        }
        (Kind::Broadcast, 0)
    }

    /// The name publishers and subscribers use for a stream (`u12`, `g3`, `t0`, `all`).
    pub fn name(&self, stream: u32) -> String {
        match self.kind_of(stream) {
            (Kind::User, i) => format!("u{}", u64::from(i) + u64::from(self.first_user)),
            (Kind::Group, i) => format!("g{i}"),
            (Kind::Topic, i) => format!("t{i}"),
            (Kind::Broadcast, _) => "all".to_string(),
        }
    }

    /// The streams connection `conn` follows.
    pub fn followed(&self, conn: u64) -> Vec<u32> {
        let pick = |kind: Kind| {
            let r = self.streams_of(kind);
            r.start + (conn % u64::from(r.len() as u32)) as u32
        };
        if self.target != Target::Ssegate {
            return vec![if self.topics > 0 { pick(Kind::Topic) } else { pick(Kind::User) }];
        }
        let mut s = vec![pick(Kind::User)];
        if self.groups > 0 {
            s.push(pick(Kind::Group));
        }
        if self.topics > 0 {
            s.push(pick(Kind::Topic));
        }
        s.push(self.streams_of(Kind::Broadcast).start);
        s
    }

    /// The request path connection `conn` subscribes with.
    pub fn subscribe_path(&self, conn: u64) -> String {
        let followed = self.followed(conn);
        if self.target != Target::Ssegate {
            return format!("/sub/{}", self.name(followed[0]));
        }
        let mut path = format!("/v1/events?user={}", self.name(followed[0]));
        for s in &followed[1..] {
            match self.kind_of(*s) {
                (Kind::Group, _) => _ = write!(path, "&group={}", self.name(*s)),
                (Kind::Topic, _) => _ = write!(path, "&topic={}", self.name(*s)),
                _ => {}
            }
        }
        path
    }

    /// Whether the target can publish to this kind of stream.
    pub fn supports(&self, kind: Kind) -> bool {
        self.target == Target::Ssegate || matches!(kind, Kind::User | Kind::Topic)
    }
}

/// An event's data: `<stream> <seq> <send time, ns since the Unix epoch>`, then optional
/// padding to reach a payload size.
pub fn payload(stream: u32, seq: u64, sent_ns: u64, pad_to: usize) -> String {
    let mut s = format!("{stream} {seq} {sent_ns}");
    if s.len() < pad_to {
        s.push(' ');
        s.extend(std::iter::repeat_n('x', pad_to - s.len()));
    }
    s
}

/// Reads back `(stream, seq, sent_ns)` from an event's data.
pub fn parse_payload(data: &[u8]) -> Option<(u32, u64, u64)> {
    let mut it = data.split(|b| *b == b' ');
    let mut num = || -> Option<u64> {
        let f = it.next()?;
        if f.is_empty() || f.len() > 20 {
            return None;
        }
        let mut acc = 0u64;
        for b in f {
            if !b.is_ascii_digit() {
                return None;
            }
            acc = acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        Some(acc)
    };
    Some((u32::try_from(num()?).ok()?, num()?, num()?))
}

/// Now, in ns since the Unix epoch: the clock both publisher and worker processes share.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout { target: Target::Ssegate, users: 10, groups: 2, topics: 1, first_user: 0 };

    #[test]
    fn stream_numbering() {
        assert_eq!(L.streams(), 14);
        assert_eq!(L.streams_of(Kind::Group), 10..12);
        assert_eq!(L.kind_of(11), (Kind::Group, 1));
        assert_eq!(L.kind_of(12), (Kind::Topic, 0));
        assert_eq!(L.kind_of(13), (Kind::Broadcast, 0));
        assert_eq!([L.name(3), L.name(11), L.name(12), L.name(13)], ["u3", "g1", "t0", "all"]);
    }

    #[test]
    fn ssegate_connection_follows_user_group_topic_and_broadcast() {
        assert_eq!(L.followed(13), [3, 11, 12, 13]);
        assert_eq!(L.subscribe_path(13), "/v1/events?user=u3&group=g1&topic=t0");
        let bare = Layout { groups: 0, topics: 0, ..L };
        assert_eq!(bare.subscribe_path(4), "/v1/events?user=u4");
        assert_eq!(bare.followed(4), [4, 10]);
    }

    #[test]
    fn channel_targets_follow_one_channel() {
        let n = Layout { target: Target::Nchan, ..L };
        assert_eq!(n.followed(5), [12]);
        assert_eq!(n.subscribe_path(5), "/sub/t0");
        let n = Layout { topics: 0, groups: 0, ..n };
        assert_eq!(n.subscribe_path(25), "/sub/u5");
        assert!(n.supports(Kind::User) && !n.supports(Kind::Group) && !n.supports(Kind::Broadcast));
    }

    #[test]
    fn payload_round_trip_and_padding() {
        let p = payload(7, 42, 1_700_000_000_123_456_789, 0);
        assert_eq!(p, "7 42 1700000000123456789");
        assert_eq!(parse_payload(p.as_bytes()), Some((7, 42, 1_700_000_000_123_456_789)));
        let padded = payload(1, 2, 3, 64);
        assert_eq!(padded.len(), 64);
        assert_eq!(parse_payload(padded.as_bytes()), Some((1, 2, 3)));
        for bad in ["", "1 2", "1 x 3", "1  2 3", "99999999999 1 1", "1 2 99999999999999999999999"] {
            assert_eq!(parse_payload(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
