//! Fuzz target `mqtt_packets`: the gatekeeper's handling of the raw bytes a device sends.
//!
//! The input is the byte stream of one device connection, exactly as it would arrive on the
//! socket (the seeds are real CONNECT / PUBLISH / SUBSCRIBE / ... packets). It is read the way
//! `gatekeeper::connection::serve` reads it: the first packet with [`mqtt::read_connect`], every
//! later one with [`mqtt::read_packet`], from an in-memory reader, once whole and once in small
//! chunks. The decisions the gatekeeper then takes on each packet are replayed with the same
//! public building blocks it uses (`policy::check_topic` / `check_filter`, `TopicPolicy`,
//! `broker::inside` / `outside`, the subscription index `broker::Interest`, the shadow and
//! defender topic routers), because the connection task itself needs a running broker.
//!
//! What must stay true (asserted here):
//! - no input panics, and the read buffer never grows past a bound set by the frame limit
//!   (a length field claiming 200 MB is refused, not reserved);
//! - framing does not depend on how the bytes are split between reads (cancel safety);
//! - a CONNECT that `read_connect` returns passed `check_connect_frame` and is MQTT 3.1.1;
//! - a packet re-encoded for the broker parses back to itself (what the policy checked is
//!   what the broker sees);
//! - `$SYS/...` and `_wardgate/...` are never allowed, whatever the policy; a subscription the
//!   policy allows only ever matches topics one of its patterns matches;
//! - `inside` / `outside` round-trip every allowed topic;
//! - the subscription index holds, for every live subscription, every topic it matches
//!   (it may hold more, never less), and counts exactly the subscriptions held.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::{Connect, Packet, Subscribe};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};
use wardgate::broker::{self, Interest, Owner, FRAME_OVERHEAD_BYTES};
use wardgate::config::{valid_thing_name, LimitsConfig, PolicyConfig};
use wardgate::gatekeeper::policy::{self, check_filter, check_topic, TopicPolicy};
use wardgate::mqtt::{self, ConnectProblem, FrameError};

/// A socket that has all the device's bytes at once and hands out at most `chunk` per read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

/// Drive a future whose reader never waits.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory reader never waits"),
    }
}

/// What one read gave, in a comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Packet(Packet),
    Refused(ConnectProblem),
    /// A frame error, by its message (the error types are not comparable).
    Error(String),
}

/// The largest buffer a connection may hold: a whole frame at the limit, doubled for the
/// growth strategy of `BytesMut`, plus slack for one read.
fn buffer_bound(max: usize) -> usize {
    4 * (max + 5) + 4096
}

/// Read the stream as the gatekeeper does: CONNECT first, then packets until the stream ends
/// or a frame is refused.
fn read_stream(data: &[u8], chunk: usize, max: usize) -> Vec<Event> {
    let mut reader = Chunked { data, chunk };
    let mut buf = BytesMut::with_capacity(1024);
    let mut events = Vec::new();
    match ready(mqtt::read_connect(&mut reader, &mut buf, max)) {
        Ok(None) => return events,
        Ok(Some(p)) => events.push(Event::Packet(p)),
        Err(Ok(problem)) => {
            events.push(Event::Refused(problem));
            return events;
        }
        Err(Err(e)) => {
            events.push(Event::Error(frame_error(e)));
            return events;
        }
    }
    loop {
        assert!(
            buf.capacity() <= buffer_bound(max),
            "read buffer grew to {} bytes (frame limit {max})",
            buf.capacity()
        );
        match ready(mqtt::read_packet(&mut reader, &mut buf, max)) {
            Ok(None) => return events,
            Ok(Some(p)) => events.push(Event::Packet(p)),
            Err(e) => {
                events.push(Event::Error(frame_error(e)));
                return events;
            }
        }
    }
}

fn frame_error(e: FrameError) -> String {
    match e {
        FrameError::Io(e) => panic!("an in-memory reader cannot fail: {e}"),
        other => other.to_string(),
    }
}

/// Encode for the broker and parse back: the broker must see what was checked.
fn assert_round_trip(packet: &Packet, max: usize) {
    let mut out = BytesMut::new();
    if mqtt::encode(packet, &mut out, max).is_err() {
        // Too large for the broker link: the gatekeeper ends the connection instead.
        return;
    }
    let again = Packet::read(&mut out, max + 8)
        .unwrap_or_else(|e| panic!("re-encoded {packet:?} does not parse: {e}"));
    assert_eq!(&again, packet, "re-encoding changed the packet");
    assert!(out.is_empty(), "re-encoding left {} extra bytes", out.len());
}

/// Topics `filter` matches, to test matching with: wildcards filled in a few ways.
fn sample_topics(filter: &str) -> Vec<String> {
    let mut topics: Vec<Vec<String>> = vec![Vec::new()];
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let choices: Vec<Vec<&str>> = match *level {
            "+" if i == 0 => vec![vec!["x"], vec!["$aws"], vec![""]],
            "+" => vec![vec!["x"], vec![""]],
            "#" => vec![vec![], vec!["x"], vec!["x", "y"], vec!["$SYS"]],
            other => vec![vec![other]],
        };
        let mut next = Vec::new();
        for t in &topics {
            for c in &choices {
                let mut t = t.clone();
                t.extend(c.iter().map(|s| (*s).to_owned()));
                next.push(t);
                if next.len() >= 32 {
                    break;
                }
            }
        }
        topics = next;
    }
    topics
        .into_iter()
        .map(|t| t.join("/"))
        .filter(|t| policy::topic_matches(filter, t))
        .collect()
}

/// The filter a subscription listens on, as the index documents it (`$share/<group>/`
/// stripped); `None` for a `$share/<group>` without a filter.
fn listens_on(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map(|(_, f)| f),
        None => Some(filter),
    }
}

/// The always-denied namespaces hold whatever the policy says.
fn assert_always_denied(policy: &TopicPolicy, topic: &str) {
    for denied in ["$SYS", "_wardgate"] {
        if topic == denied || topic.starts_with(&format!("{denied}/")) {
            assert!(!policy.may_publish(topic), "publish to {topic} allowed");
            assert!(
                !policy.may_subscribe(topic),
                "subscription to {topic} allowed"
            );
        }
    }
}

/// A subscription the policy allows matches only topics one of its patterns matches.
fn assert_covered(policy: &TopicPolicy, patterns: &[String], filter: &str) {
    if !policy.may_subscribe(filter) {
        return;
    }
    for topic in sample_topics(filter) {
        assert!(
            patterns.iter().any(|p| policy::topic_matches(p, &topic)),
            "subscription {filter} allowed, but it matches {topic}, which no pattern of {patterns:?} matches"
        );
    }
}

/// `inside` / `outside` are inverse on every topic a device may use.
fn assert_inside_outside(topic: &str) {
    let inside = broker::inside(topic);
    match broker::outside(&inside) {
        Some(back) => assert_eq!(back, topic, "outside(inside({topic}))"),
        None => assert_eq!(inside, topic, "inside() renamed a topic outside() keeps"),
    }
}

/// The gatekeeper's subscription index next to a plain model of what the broker holds.
struct Index {
    interest: Interest,
    /// Per owner, the filters as the device sent them (what the broker holds).
    model: HashMap<Owner, HashSet<String>>,
}

impl Index {
    fn add(&mut self, owner: &Owner, filters: &[String]) {
        self.interest.add(owner, filters.iter().map(String::as_str));
        self.model
            .entry(owner.clone())
            .or_default()
            .extend(filters.iter().cloned());
    }

    fn remove(&mut self, owner: &Owner, filters: &[String]) {
        self.interest
            .remove(owner, filters.iter().map(String::as_str));
        if let Some(held) = self.model.get_mut(owner) {
            for f in filters {
                held.remove(f);
            }
        }
    }

    fn forget(&mut self, owner: &Owner) {
        self.interest.forget(owner);
        self.model.remove(owner);
    }

    /// Subscriptions held, each (owner, filter as subscribed) once: what `Interest::len`
    /// counts (`$share/<group>/<filter>` is a subscription of its own, as on the broker).
    fn distinct(&self) -> usize {
        self.model.values().map(HashSet::len).sum()
    }

    /// Never less than a live subscription; also check `topic` itself.
    fn check(&self, topic: Option<&str>) {
        for held in self.model.values() {
            for f in held {
                let Some(on) = listens_on(f) else { continue };
                let mut topics = sample_topics(on);
                topics.extend(topic.map(str::to_owned));
                for t in topics {
                    if policy::topic_matches(on, &t) {
                        assert!(
                            self.interest.wanted(&t),
                            "subscription {f} is live but the index does not want {t}"
                        );
                    }
                }
            }
        }
    }
}

/// Replay what the gatekeeper decides for one connection's packets (`events[0]` is the
/// CONNECT). Stops where the gatekeeper would close the connection.
fn replay(connect: &Connect, rest: &[Event], max: usize) {
    let limits = LimitsConfig::default();
    // An unknown client id is refused at CONNECT (registry ids are valid thing names).
    if !valid_thing_name(&connect.client_id) {
        return;
    }
    let device = connect.client_id.as_str();
    let kind = "pacemaker";
    let defaults = PolicyConfig::default();
    let narrow = TopicPolicy::new(&defaults.publish, &defaults.subscribe, device, kind);
    let narrow_subscribe: Vec<String> = defaults
        .subscribe
        .iter()
        .map(|p| policy::substitute(p, device, kind))
        .collect();
    // An id can never add a level or a wildcard to a pattern.
    for (p, s) in defaults.subscribe.iter().zip(&narrow_subscribe) {
        assert_eq!(p.split('/').count(), s.split('/').count(), "{p} -> {s}");
        assert_eq!(p.matches(['+', '#']).count(), s.matches(['+', '#']).count());
    }
    // A policy as wide as a configuration can make it: the always-denied rule must still hold.
    let wide_patterns: Vec<String> = ["#", "$aws/#", "$share/#", "$SYS/#", "_wardgate/#"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let wide = TopicPolicy::new(&wide_patterns, &wide_patterns, device, kind);

    if let Some(will) = &connect.last_will {
        assert_always_denied(&narrow, &will.topic);
        assert_always_denied(&wide, &will.topic);
        let allowed = check_topic(&will.topic, &limits).is_ok()
            && will.message.len() <= limits.max_payload_bytes
            && wide.may_publish(&will.topic);
        if allowed {
            assert_inside_outside(&will.topic);
        }
    }

    let mut index = Index {
        interest: Interest::default(),
        model: HashMap::new(),
    };
    // The persistent session a previous connection of this device left on the broker.
    let persistent = Owner::Session(device.into());
    index.add(&persistent, &[format!("ward/{device}/cmd")]);
    let owner = index.interest.owner(device, connect.clean_session);
    let mut session = !connect.clean_session;

    for event in rest {
        let Event::Packet(packet) = event else { break };
        match packet {
            Packet::Publish(p) => {
                assert_always_denied(&narrow, &p.topic);
                assert_always_denied(&wide, &p.topic);
                if check_topic(&p.topic, &limits).is_err()
                    || p.payload.len() > limits.max_payload_bytes
                    || p.qos == QoS::ExactlyOnce
                    || !wide.may_publish(&p.topic)
                {
                    break;
                }
                assert_inside_outside(&p.topic);
                let mut relayed = p.clone();
                broker::to_inside(&mut relayed.topic);
                assert_round_trip(&Packet::Publish(relayed), max);
                index.check(Some(&p.topic));
                route(&p.topic, &p.payload);
            }
            Packet::Subscribe(s) => {
                let mut kept = Vec::new();
                for f in &s.filters {
                    assert_always_denied(&narrow, &f.path);
                    assert_always_denied(&wide, &f.path);
                    assert_covered(&narrow, &narrow_subscribe, &f.path);
                    if check_filter(&f.path, &limits).is_ok() && wide.may_subscribe(&f.path) {
                        kept.push(f.clone());
                    }
                }
                if kept.is_empty() {
                    continue;
                }
                let paths: Vec<String> = kept.iter().map(|f| f.path.clone()).collect();
                index.add(&owner, &paths);
                if !session {
                    // The session opened for a first SUBSCRIBE is clean on the broker.
                    index.forget(&persistent);
                    session = true;
                }
                let mut inside = Subscribe {
                    pkid: s.pkid,
                    filters: kept,
                };
                for f in &mut inside.filters {
                    if f.qos == QoS::ExactlyOnce {
                        f.qos = QoS::AtLeastOnce;
                    }
                    broker::to_inside(&mut f.path);
                }
                assert_round_trip(&Packet::Subscribe(inside), max);
                index.check(None);
            }
            Packet::Unsubscribe(u) => {
                if session {
                    let mut inside = u.clone();
                    for t in &mut inside.topics {
                        broker::to_inside(t);
                    }
                    assert_round_trip(&Packet::Unsubscribe(inside), max);
                    index.remove(&owner, &u.topics);
                }
                index.check(None);
            }
            Packet::PubAck(_) | Packet::PingReq => assert_round_trip(packet, max),
            // DISCONNECT, a second CONNECT, QoS 2 flows and server packets end the connection.
            _ => break,
        }
        assert_eq!(
            index.interest.len(),
            index.distinct(),
            "the index counts subscriptions it does not hold (or misses some)"
        );
    }
    // The connection ended: a clean session's subscriptions go with it.
    if matches!(owner, Owner::Connection(_)) {
        index.forget(&owner);
    }
    index.check(None);
}

/// The pipeline's routing of an accepted PUBLISH: shadow requests and defender reports.
fn route(topic: &str, payload: &[u8]) {
    if let Some(address) = wardgate::shadow::Address::parse(topic) {
        assert!(
            topic.starts_with(&format!("{}/", address.prefix())),
            "{topic} is not under its shadow prefix {}",
            address.prefix()
        );
    }
    if let Some((thing, format)) = wardgate::defender::parse_topic(topic) {
        assert!(!thing.is_empty());
        let _ = wardgate::defender::report::Report::parse(payload, format);
    }
}

fuzz_target!(|data: &[u8]| {
    let max = LimitsConfig::default().max_payload_bytes + FRAME_OVERHEAD_BYTES;
    let whole = read_stream(data, usize::MAX, max);
    // The same bytes in small reads frame the same packets, errors included.
    let chunk = 1 + data.len() % 7;
    assert_eq!(
        read_stream(data, chunk, max),
        whole,
        "framing depends on read sizes ({chunk})"
    );

    let Some(Event::Packet(first)) = whole.first() else {
        return;
    };
    if let Packet::Connect(connect) = first {
        // `read_connect` checked the frame's bytes before parsing them, and only level 4 passes.
        let header = mqttbytes::check(data.iter(), max).expect("a parsed CONNECT is framed");
        assert_eq!(
            mqtt::check_connect_frame(&data[..header.frame_length()]),
            Ok(())
        );
        assert_eq!(connect.protocol, Protocol::V4);
        replay(connect, &whole[1..], max);
    }
});
