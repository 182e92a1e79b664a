//! The subjects of interest delivery (`--nats-delivery interest`, see ARCHITECTURE.md, "The
//! cluster at scale"). An event for one user, setting no retained value, is published to
//! `<subject>.to.u.<user in unpadded base64url>`; one for a group, likewise, to
//! `<subject>.to.g.<group>`; one for a topic to `<subject>.to.t.<topic>` once every replica
//! follows topics (`Cluster::everyone_follows_topics`: an older replica would miss them);
//! every other event (broadcast, several users, and every retained update, so that every
//! replica's retained store stays whole) to `<subject>.to.all`. The stream takes `<subject>` and `<subject>.to.>`
//! and republishes each stored `<subject>.to.X` on `<subject>.live.X` (core NATS, with the
//! stream sequence in `Nats-Sequence` and the previous sequence on the same subject in
//! `Nats-Last-Sequence`), so the NATS servers route a live copy only to replicas subscribed
//! to it: a replica with no connection of a user never receives that user's events.
//!
//! Ids are encoded because a user id may hold characters a subject cannot (`.`, `*`, `>`,
//! spaces); base64url's alphabet is subject-safe.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::domain::{GroupId, Retain, Target, Topic, UserId};

#[derive(Clone, Debug)]
pub struct Subjects {
    /// `--nats-subject`: what a replica reading the whole stream publishes to.
    pub base: String,
    /// `<subject>.to.all`.
    pub to_all: String,
    /// `<subject>.live.all`, followed by every replica.
    pub live_all: String,
    /// `<subject>.to.>`: the stream's second subject and the republish source.
    pub to_any: String,
    /// `<subject>.live.>`: the republish destination.
    pub live_any: String,
}

impl Subjects {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            to_all: format!("{base}.to.all"),
            live_all: format!("{base}.live.all"),
            to_any: format!("{base}.to.>"),
            live_any: format!("{base}.live.>"),
        }
    }

    /// Where an event of `target` is published with interest delivery; a topic's own subject
    /// only if `topics` (every replica follows topics).
    pub fn publish_to(&self, target: &Target, retain: Retain, topics: bool) -> String {
        match target {
            Target::Users(users) if users.len() == 1 && retain == Retain::No => self.to_user(&users[0]),
            Target::Group(group) if retain == Retain::No => self.to_group(group),
            Target::Topic(topic) if retain == Retain::No && topics => self.to_topic(topic),
            _ => self.to_all.clone(),
        }
    }

    /// `<subject>.to.t.<topic>`: where the events of `topic` are stored.
    pub fn to_topic(&self, topic: &Topic) -> String {
        format!("{}.to.t.{}", self.base, URL_SAFE_NO_PAD.encode(topic.as_str()))
    }

    /// `<subject>.live.t.<topic>`: where their live copies arrive.
    pub fn live_topic(&self, topic: &Topic) -> String {
        format!("{}.live.t.{}", self.base, URL_SAFE_NO_PAD.encode(topic.as_str()))
    }

    /// `<subject>.to.u.<user>`: where the events of `user` alone are stored.
    pub fn to_user(&self, user: &UserId) -> String {
        format!("{}.to.u.{}", self.base, URL_SAFE_NO_PAD.encode(user.as_str()))
    }

    /// `<subject>.live.u.<user>`: where their live copies arrive.
    pub fn live_user(&self, user: &UserId) -> String {
        format!("{}.live.u.{}", self.base, URL_SAFE_NO_PAD.encode(user.as_str()))
    }

    /// `<subject>.to.g.<group>`: where the events of `group` are stored.
    pub fn to_group(&self, group: &GroupId) -> String {
        format!("{}.to.g.{}", self.base, URL_SAFE_NO_PAD.encode(group.as_str()))
    }

    /// `<subject>.live.g.<group>`: where their live copies arrive.
    pub fn live_group(&self, group: &GroupId) -> String {
        format!("{}.live.g.{}", self.base, URL_SAFE_NO_PAD.encode(group.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_user_without_retain_has_its_own_subject_and_everything_else_goes_to_all() {
        let s = Subjects::new("ssegate.events");
        let alice = UserId::parse("alice.smith@example.com").unwrap();
        let one = Target::Users(vec![alice.clone()]);
        assert_eq!(s.publish_to(&one, Retain::No, true), "ssegate.events.to.u.YWxpY2Uuc21pdGhAZXhhbXBsZS5jb20");
        assert_eq!(s.live_user(&alice), "ssegate.events.live.u.YWxpY2Uuc21pdGhAZXhhbXBsZS5jb20");
        assert_eq!(s.publish_to(&one, Retain::Set { expires_at: None }, true), "ssegate.events.to.all");
        assert_eq!(s.publish_to(&one, Retain::Clear, true), "ssegate.events.to.all");
        let two = Target::Users(vec![alice, UserId::parse("bob").unwrap()]);
        assert_eq!(s.publish_to(&two, Retain::No, true), "ssegate.events.to.all");
        assert_eq!(s.publish_to(&Target::Broadcast, Retain::No, true), "ssegate.events.to.all");
        let g = GroupId::parse("team.a").unwrap();
        assert_eq!(s.publish_to(&Target::Group(g.clone()), Retain::No, true), "ssegate.events.to.g.dGVhbS5h");
        assert_eq!(s.live_group(&g), "ssegate.events.live.g.dGVhbS5h");
        assert_eq!(s.publish_to(&Target::Group(g), Retain::Clear, true), "ssegate.events.to.all");
        assert_eq!((s.to_any.as_str(), s.live_any.as_str()), ("ssegate.events.to.>", "ssegate.events.live.>"));
    }

    #[test]
    fn a_topic_has_its_own_subject_only_once_every_replica_follows_topics() {
        let s = Subjects::new("ssegate.events");
        // Dots, stars and `>` in a topic stay inside one subject token.
        let t = Topic::parse("orders.>*").unwrap();
        let topic = Target::Topic(t.clone());
        assert_eq!(s.publish_to(&topic, Retain::No, true), "ssegate.events.to.t.b3JkZXJzLj4q");
        assert_eq!(s.live_topic(&t), "ssegate.events.live.t.b3JkZXJzLj4q");
        assert_eq!(s.publish_to(&topic, Retain::No, false), "ssegate.events.to.all", "an older replica is there");
        assert_eq!(s.publish_to(&topic, Retain::Set { expires_at: None }, true), "ssegate.events.to.all");
    }
}
