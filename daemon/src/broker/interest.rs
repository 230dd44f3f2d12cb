//! Who listens on the internal broker: every filter a local subscriber holds there.
//!
//! Every subscription reaches rumqttd through the gatekeeper (the broker listens on loopback
//! and takes only the internal login), so the gatekeeper can keep this index as SUBSCRIBEs and
//! UNSUBSCRIBEs pass. A message no filter matches has nobody to go to on the broker; copying it
//! there anyway costs two loopback writes, a parse, a route and a log append per message — on
//! a ward where nothing local subscribes to telemetry, most of the gateway's CPU. So the
//! gatekeeper relays a device's PUBLISH (and the pipeline its canonical readings) only when
//! [`Interest::wanted`] says someone listens, or when it is retained (a later subscriber gets
//! it from the broker).
//!
//! What must stay true: the index may hold more than the broker (a message relayed in vain
//! costs only time) but never less while a subscription is live, or that subscriber misses
//! messages. Hence:
//! - a filter is added *before* its SUBSCRIBE goes to the broker, and removed only after its
//!   UNSUBSCRIBE went out: a message accepted after the SUBACK always finds it;
//! - a clean session's filters go with its connection ([`Owner::Connection`], dropped by
//!   [`Listening`]); a persistent session's ([`Owner::Session`]) stay while the device is
//!   away — the broker keeps queueing for it — and go when the device opens a clean session
//!   on the broker again (which discards the old one);
//! - `$share/<group>/<filter>` listens on `<filter>`, but is a subscription of its own (as on
//!   the broker): an owner's filters are kept as subscribed, so unsubscribing `<filter>` or
//!   another group's `$share/<other>/<filter>` leaves it live.
//!
//! Matching walks a trie of filter levels (`+` and `#` as their own branches, the `$` rule
//! applied at the first level), so the cost is per topic level, not per filter: hundreds of
//! devices subscribed to their own shadow topics cost the same per message as one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// Whose subscriptions these are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A clean session: its subscriptions end with this connection.
    Connection(u64),
    /// A persistent session of this client id: its subscriptions outlive the connection.
    Session(Arc<str>),
}

/// The index of live filters (cheap to clone; one per broker).
#[derive(Debug, Clone, Default)]
pub struct Interest(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Distinct filters held; 0 makes [`Interest::wanted`] one atomic load.
    filters: AtomicUsize,
    next_connection: AtomicU64,
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Each owner's filters as subscribed (`$share/<group>/` included).
    owners: HashMap<Owner, HashSet<String>>,
    /// The filters listened on ([`effective`]), counted once per subscription.
    trie: Node,
}

/// One filter level; `count` is how many subscriptions listen on the filter ending here.
#[derive(Debug, Default)]
struct Node {
    count: usize,
    /// Subscriptions listening on the filter ending in `#` below this level.
    hash: usize,
    plus: Option<Box<Node>>,
    exact: HashMap<String, Node>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.count == 0 && self.hash == 0 && self.plus.is_none() && self.exact.is_empty()
    }

    /// Add `delta` (±1) to the filter made of `levels`; prunes emptied branches.
    fn adjust<'a>(&mut self, mut levels: impl Iterator<Item = &'a str>, delta: isize) {
        let apply = |n: &mut usize| *n = n.saturating_add_signed(delta);
        match levels.next() {
            None => apply(&mut self.count),
            Some("#") => apply(&mut self.hash),
            Some("+") => {
                let child = self.plus.get_or_insert_with(Box::default);
                child.adjust(levels, delta);
                if child.is_empty() {
                    self.plus = None;
                }
            }
            Some(level) => {
                let child = self.exact.entry(level.to_owned()).or_default();
                child.adjust(levels, delta);
                if child.is_empty() {
                    self.exact.remove(level);
                }
            }
        }
    }

    /// Whether a filter in this subtree matches the topic made of the rest of `levels`;
    /// `root` applies the rule that wildcards at the first level do not match `$` topics.
    fn matches(&self, mut levels: std::str::Split<'_, char>, root: bool) -> bool {
        let Some(level) = levels.next() else {
            // `a/#` also matches `a` itself.
            return self.count > 0 || self.hash > 0;
        };
        let wild = !(root && level.starts_with('$'));
        if wild && self.hash > 0 {
            return true;
        }
        if let Some(child) = self.exact.get(level) {
            if child.matches(levels.clone(), false) {
                return true;
            }
        }
        match &self.plus {
            Some(child) if wild => child.matches(levels, false),
            _ => false,
        }
    }
}

/// The filter a subscription listens on (`$share/<group>/` stripped).
fn effective(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

impl Interest {
    /// The owner for a device's connection: its client id when it keeps a persistent
    /// session, otherwise this connection alone.
    pub fn owner(&self, client_id: &str, clean_session: bool) -> Owner {
        if clean_session {
            Owner::Connection(self.0.next_connection.fetch_add(1, Ordering::Relaxed))
        } else {
            Owner::Session(client_id.into())
        }
    }

    /// `owner` subscribes to `filters` (call before the SUBSCRIBE goes to the broker).
    pub fn add<'a>(&self, owner: &Owner, filters: impl IntoIterator<Item = &'a str>) {
        let mut s = self.write();
        let State { owners, trie } = &mut *s;
        let held = owners.entry(owner.clone()).or_default();
        for f in filters {
            if held.insert(f.to_owned()) {
                trie.adjust(effective(f).split('/'), 1);
                self.0.filters.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `owner` unsubscribed from `filters` (call after the UNSUBSCRIBE went to the broker).
    pub fn remove<'a>(&self, owner: &Owner, filters: impl IntoIterator<Item = &'a str>) {
        let mut s = self.write();
        let State { owners, trie } = &mut *s;
        let Some(held) = owners.get_mut(owner) else {
            return;
        };
        for f in filters {
            if held.remove(f) {
                trie.adjust(effective(f).split('/'), -1);
                self.0.filters.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if held.is_empty() {
            owners.remove(owner);
        }
    }

    /// Every subscription of `owner` is gone (its clean session ended, or the broker
    /// discarded its persistent session).
    pub fn forget(&self, owner: &Owner) {
        let mut s = self.write();
        let State { owners, trie } = &mut *s;
        if let Some(held) = owners.remove(owner) {
            for f in &held {
                trie.adjust(effective(f).split('/'), -1);
            }
            self.0.filters.fetch_sub(held.len(), Ordering::Relaxed);
        }
    }

    /// The filters `owner` listens on (without `$share/<group>/`), each once.
    pub fn held(&self, owner: &Owner) -> Vec<String> {
        let s = self.0.state.read().unwrap_or_else(|e| e.into_inner());
        s.owners
            .get(owner)
            .map(|held| {
                held.iter()
                    .map(|f| effective(f))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `owner` holds a filter that matches `topic`, by MQTT's rules (a filter starting
    /// with a wildcard does not match a `$` topic).
    pub fn holds_match(&self, owner: &Owner, topic: &str) -> bool {
        let s = self.0.state.read().unwrap_or_else(|e| e.into_inner());
        s.owners.get(owner).is_some_and(|held| {
            held.iter()
                .any(|f| crate::gatekeeper::policy::topic_matches(effective(f), topic))
        })
    }

    /// Whether some local subscriber's filter matches `topic`.
    pub fn wanted(&self, topic: &str) -> bool {
        if self.0.filters.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let s = self.0.state.read().unwrap_or_else(|e| e.into_inner());
        s.trie.matches(topic.split('/'), true)
    }

    /// Distinct (owner, filter as subscribed) subscriptions held.
    pub fn len(&self) -> usize {
        self.0.filters.load(Ordering::Relaxed)
    }

    /// Whether nobody subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // The index stays consistent under each single call: a panic mid-call cannot leave
        // half an update behind that matters more than relaying too much.
        self.0.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Holds a connection's clean-session subscriptions; dropping it (the connection ended, by
/// any path) forgets them.
#[derive(Debug)]
pub struct Listening {
    interest: Interest,
    owner: Owner,
}

impl Listening {
    /// Subscriptions of `owner` on `interest`.
    pub fn new(interest: Interest, owner: Owner) -> Self {
        Self { interest, owner }
    }

    /// Whose they are.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if matches!(self.owner, Owner::Connection(_)) {
            self.interest.forget(&self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gatekeeper::policy::topic_matches;

    #[test]
    fn nothing_is_wanted_until_someone_subscribes() {
        let i = Interest::default();
        assert!(!i.wanted("ward/pm-01/telemetry"));
        let o = i.owner("console", true);
        i.add(&o, ["ward/+/telemetry"]);
        assert!(i.wanted("ward/pm-01/telemetry"));
        assert!(!i.wanted("ward/pm-01/alarm"));
        i.remove(&o, ["ward/+/telemetry"]);
        assert!(!i.wanted("ward/pm-01/telemetry"));
        assert!(i.is_empty());
    }

    #[test]
    fn a_clean_sessions_filters_end_with_its_connection_a_persistent_ones_do_not() {
        let i = Interest::default();
        {
            let clean = Listening::new(i.clone(), i.owner("a", true));
            i.add(clean.owner(), ["ward/#"]);
            assert!(i.wanted("ward/x"));
        }
        assert!(!i.wanted("ward/x"), "gone with the connection");
        {
            let kept = Listening::new(i.clone(), i.owner("b", false));
            i.add(kept.owner(), ["ward/#"]);
        }
        assert!(i.wanted("ward/x"), "the broker still queues for b");
        i.forget(&Owner::Session("b".into()));
        assert!(!i.wanted("ward/x"));
    }

    #[test]
    fn two_owners_of_one_filter_each_hold_it() {
        let i = Interest::default();
        let (a, b) = (i.owner("a", true), i.owner("b", true));
        i.add(&a, ["$aws/things/pm-01/shadow/update/accepted"]);
        i.add(&a, ["$aws/things/pm-01/shadow/update/accepted"]);
        i.add(&b, ["$share/g/$aws/things/pm-01/shadow/update/accepted"]);
        assert_eq!(i.len(), 2);
        i.forget(&a);
        assert!(i.wanted("$aws/things/pm-01/shadow/update/accepted"));
        i.forget(&b);
        assert!(!i.wanted("$aws/things/pm-01/shadow/update/accepted"));
    }

    #[test]
    fn wildcards_at_the_root_do_not_match_dollar_topics() {
        let i = Interest::default();
        let o = i.owner("a", true);
        i.add(&o, ["#", "+/things/#"]);
        assert!(i.wanted("ward/x"));
        assert!(!i.wanted("$aws/things/x/shadow/get"));
        i.add(&o, ["$aws/things/+/shadow/get/+"]);
        assert!(i.wanted("$aws/things/x/shadow/get/accepted"));
    }

    /// Found by the fuzz target `mqtt_packets` (minimised: a device SUBSCRIBEs to
    /// `$share/f/ward/+/telemetry`, then UNSUBSCRIBEs from `$share/g/ward/+/telemetry`, a group
    /// it never joined). The index kept filters without their `$share/<group>/`, so that
    /// UNSUBSCRIBE, or one from the plain `ward/+/telemetry`, took away a shared subscription
    /// the broker still had live, and its subscriber missed messages.
    #[test]
    fn another_groups_or_the_plain_filters_unsubscribe_keeps_a_shared_subscription() {
        use rumqttc::mqttbytes::v4::Packet;
        const SUBSCRIBE: &[u8] = b"\x82\x1e\x00\x01\x00\x19$share/f/ward/+/telemetry\x01";
        const UNSUBSCRIBE: &[u8] = b"\xa2\x1d\x00\x02\x00\x19$share/g/ward/+/telemetry";
        let i = Interest::default();
        let o = i.owner("pm-1", true);
        let mut stream = bytes::BytesMut::from([SUBSCRIBE, UNSUBSCRIBE].concat().as_slice());
        while !stream.is_empty() {
            match Packet::read(&mut stream, 1 << 16).expect("a valid packet") {
                Packet::Subscribe(s) => i.add(&o, s.filters.iter().map(|f| f.path.as_str())),
                Packet::Unsubscribe(u) => i.remove(&o, u.topics.iter().map(String::as_str)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            i.wanted("ward/pm-1/telemetry"),
            "the $share/f subscription is live"
        );
        i.add(&o, ["ward/+/telemetry"]);
        assert_eq!(i.len(), 2, "two subscriptions on the broker");
        i.remove(&o, ["ward/+/telemetry"]);
        assert!(
            i.wanted("ward/pm-1/telemetry"),
            "the $share/f subscription is live"
        );
        assert!(i.holds_match(&o, "ward/pm-1/telemetry"));
        assert_eq!(i.held(&o), ["ward/+/telemetry"]);
        i.remove(&o, ["$share/f/ward/+/telemetry"]);
        assert!(!i.wanted("ward/pm-1/telemetry"));
        assert!(i.is_empty());
    }

    /// The trie says what matching every held filter one by one says, after random
    /// sequences of subscribes and unsubscribes over a small alphabet of levels.
    #[test]
    fn the_trie_agrees_with_matching_each_filter() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        const LEVELS: [&str; 4] = ["a", "b", "$s", ""];
        let level = |rng: &mut rand::rngs::StdRng, wild: bool| -> String {
            let n = if wild { 5 } else { 4 };
            match rng.gen_range(0..n) {
                4 => "+".to_owned(),
                k => LEVELS[k].to_owned(),
            }
        };
        for _ in 0..300 {
            let i = Interest::default();
            let owners: Vec<Owner> = (0..3).map(|_| i.owner("x", true)).collect();
            let mut held: Vec<HashSet<String>> = vec![HashSet::new(); 3];
            for _ in 0..rng.gen_range(0..30) {
                let mut f: Vec<String> = (0..rng.gen_range(0..4))
                    .map(|_| level(&mut rng, true))
                    .collect();
                if f.is_empty() || rng.gen_bool(0.3) {
                    f.push("#".to_owned());
                }
                let f = f.join("/");
                let who = rng.gen_range(0..3);
                if rng.gen_bool(0.7) {
                    i.add(&owners[who], [f.as_str()]);
                    held[who].insert(f);
                } else {
                    i.remove(&owners[who], [f.as_str()]);
                    held[who].remove(&f);
                }
            }
            for _ in 0..10 {
                let t: Vec<String> = (0..rng.gen_range(1..5))
                    .map(|_| level(&mut rng, false))
                    .collect();
                let t = t.join("/");
                let want = held.iter().flatten().any(|f| topic_matches(f, &t));
                assert_eq!(i.wanted(&t), want, "topic {t:?} with {held:?}");
            }
            assert_eq!(i.len(), held.iter().map(HashSet::len).sum::<usize>());
        }
    }
}
