//! Keeping each device's classic shadow in step with its copy in AWS IoT Core.
//!
//! # The rule
//! **The ward owns `reported`, the cloud owns `desired`.**
//! - Every accepted change a device makes to its reported state (its own `/update`; its
//!   readings too with `upstream.sync_readings`) goes upstream as a shadow update
//!   `{"state":{"reported":…}}` on `upstream.topics.shadow`. (Readings already go up as
//!   telemetry; mirroring them costs a publish per device turn from the readings' quota, and
//!   each such publish delays a batch of readings by one publish interval.)
//!   Changes are merged per device while they wait, and at most
//!   `upstream.shadow_updates_per_second` devices' changes (10 by default, a tenth of an IoT
//!   Core connection's publish quota) are queued per second, a few every [`Pace::tick`], so a
//!   ward of plugin devices reporting every second costs the uplink 10 publishes/s, not 500,
//!   and never a burst in front of the readings.
//!   The cloud's reported state is a copy of the ward's, late by the outage (or by the pace).
//! - Desired changes made in the cloud reach the device as a local `/update/delta`. The gateway
//!   subscribes to the cloud shadows' `/update/documents` and, after every (re)connection,
//!   asks for each device's shadow (`/get`): IoT Core keeps a persistent session's messages
//!   only for a while, so what changed during a long outage is fetched, not hoped for.
//! - Desired changes made on the ward (a local app's `/update` with `desired`) apply locally at
//!   once and go upstream too. While the device's cloud shadow has not been fetched in the
//!   current session (the uplink is down, or reconnecting), they wait here; when the fetch
//!   comes back, a key the cloud changed meanwhile takes the **cloud's** value and the ward's
//!   change of that key is dropped; the ward's changes of other keys go upstream.
//! - Versions: the local and the cloud shadow count their own versions (each side's devices
//!   see one increasing counter); they are not the same number. The cloud version last seen is
//!   kept only to ignore messages older than it.
//!
//! Only classic shadows are synchronised; named shadows stay on the ward.
//!
//! # What must stay true
//! - Nothing decided here is lost in a crash: the per-device sync state ([`SyncState`]) is
//!   stored with the shadow documents, in the same write as the change that made it.
//! - A desired change that came from the cloud is never sent back to the cloud.
//! - Everything here is pure: no I/O, no clock, no topics (the uplink owns the topics).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

/// How fast waiting changes are queued: `per_second`, a few every tick (at most 10 ticks a
/// second), so that they never stand in front of the readings in the uplink as a burst (each
/// goes in a message of its own, and a burst of 20 would hold a reading behind them for
/// 200 ms of publish quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Things whose changes are queued per tick.
    pub per_tick: usize,
    /// How often.
    pub tick: std::time::Duration,
}

impl Pace {
    /// The pace of `per_second` (at least 1).
    pub fn of(per_second: u32) -> Self {
        let rate = per_second.max(1);
        let per_tick = rate.div_ceil(10);
        Self {
            per_tick: per_tick as usize,
            tick: std::time::Duration::from_secs(1) * per_tick / rate,
        }
    }
}

/// What the uplink tells the shadow service.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudEvent {
    /// A session with the upstream is up: every device's cloud shadow is fetched again.
    Connected,
    /// The session ended.
    Disconnected,
    /// The cloud's desired state of `thing`'s classic shadow (`None`: no desired section, or
    /// no shadow at all), at cloud `version` (`None` when the cloud has no shadow).
    Desired {
        /// The device.
        thing: String,
        /// The cloud shadow's version.
        version: Option<u64>,
        /// Its desired section.
        desired: Option<Value>,
        /// An answer to the gateway's `/get` (rather than an `/update/documents`).
        fetched: bool,
    },
}

/// The uplink's end of the link (cheap to clone: a restarted uplink takes it over).
#[derive(Debug, Clone)]
pub struct CloudLink {
    /// Events for the shadow service (bounded: a shadow service far behind slows the uplink's
    /// reading of the cloud's messages, never loses one).
    pub events: mpsc::Sender<CloudEvent>,
    /// Devices whose cloud shadow to fetch (`/get`).
    pub fetch: std::sync::Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
}

/// The shadow service's end of the link.
#[derive(Debug)]
pub struct ShadowLink {
    /// Events from the uplink.
    pub events: mpsc::Receiver<CloudEvent>,
    /// Devices to fetch.
    pub fetch: mpsc::UnboundedSender<String>,
    /// Where shadow updates for the cloud are queued.
    pub queue: crate::queue::Enqueue,
    /// How fast.
    pub pace: Pace,
    /// Whether reported state made from readings is sent on every change.
    pub readings: bool,
}

/// A connected pair of ends.
pub fn link(queue: crate::queue::Enqueue, pace: Pace, readings: bool) -> (CloudLink, ShadowLink) {
    let (etx, erx) = mpsc::channel(1024);
    let (ftx, frx) = mpsc::unbounded_channel();
    (
        CloudLink {
            events: etx,
            fetch: std::sync::Arc::new(tokio::sync::Mutex::new(frx)),
        },
        ShadowLink {
            events: erx,
            fetch: ftx,
            queue,
            pace,
            readings,
        },
    )
}

/// One device's sync state, stored next to its shadow.
///
/// Reported changes are not copied here as they happen (readings change the reported state of
/// every device every 100 ms): what goes up is the difference between the reported state now
/// and `sent_reported`, computed when the device's turn comes. So a reading costs the sync
/// nothing but a mark in memory, and after a crash the marks are rebuilt by comparing the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncState {
    /// The cloud version last seen.
    #[serde(default)]
    pub cloud_version: u64,
    /// The cloud's desired state as last seen, with the ward's changes sent since applied.
    #[serde(default)]
    pub cloud_desired: Option<Value>,
    /// The reported state as last queued upstream.
    #[serde(default)]
    pub sent_reported: Option<Value>,
    /// Desired changes made on the ward, not yet queued upstream (a merge patch: `null`
    /// deletes).
    #[serde(default)]
    pub out_desired: Option<Value>,
    /// When the oldest waiting desired change was made (ms since the epoch; 0: none waits).
    #[serde(default)]
    pub waiting_since_ms: i64,
}

/// What a local change touches: its `reported` and `desired` parts, as sent (`null`: delete).
pub fn parts(state: &Value) -> (Option<&Value>, Option<&Value>) {
    match state {
        Value::Null => (Some(&Value::Null), Some(&Value::Null)),
        Value::Object(s) => (s.get("reported"), s.get("desired")),
        _ => (None, None),
    }
}

impl SyncState {
    /// Whether desired changes made on the ward wait to be queued.
    pub fn waiting(&self) -> bool {
        self.out_desired.is_some()
    }

    /// Whether `reported` (the reported state now) differs from what was last queued.
    pub fn reported_changed(&self, reported: Option<&Value>) -> bool {
        self.sent_reported.as_ref() != reported
    }

    /// A desired change made on the ward was accepted (as sent: `null`s are deletions).
    pub fn local_desired(&mut self, desired: &Value, now_ms: i64) {
        if !self.waiting() {
            self.waiting_since_ms = now_ms;
        }
        self.out_desired = Some(compose(self.out_desired.take(), desired));
    }

    /// The shadow update to queue upstream now, if anything changed: the reported state's
    /// difference from what was last sent (`reported`: the reported state now), and, if
    /// `fetched` (the cloud shadow was fetched in this session), the ward's desired changes.
    /// Marks it sent.
    pub fn take_update(&mut self, reported: Option<&Value>, fetched: bool) -> Option<Value> {
        let mut state = Map::new();
        if let Some(r) = diff(self.sent_reported.as_ref(), reported) {
            state.insert("reported".into(), r);
            self.sent_reported = reported.cloned();
        }
        if fetched {
            if let Some(d) = self.out_desired.take() {
                self.cloud_desired = apply(self.cloud_desired.take(), &d);
                state.insert("desired".into(), d);
            }
        }
        if !self.waiting() {
            self.waiting_since_ms = 0;
        }
        (!state.is_empty()).then(|| serde_json::json!({ "state": state }))
    }

    /// The cloud's desired state arrived. Returns the change to apply to the local desired
    /// state (a merge patch), if any; `None` also for a message older than one already seen.
    pub fn cloud(&mut self, version: Option<u64>, desired: Option<Value>) -> Option<Value> {
        if let Some(v) = version {
            if v < self.cloud_version {
                return None;
            }
            self.cloud_version = v;
        }
        let desired = desired.filter(|d| !matches!(d, Value::Null));
        let patch = diff(self.cloud_desired.as_ref(), desired.as_ref());
        self.cloud_desired = desired;
        let patch = patch?;
        // The cloud wins a key both sides changed.
        if let Some(out) = self.out_desired.take() {
            self.out_desired = without(out, &patch);
        }
        if !self.waiting() {
            self.waiting_since_ms = 0;
        }
        Some(patch)
    }
}

/// `first` then `then`, as one merge patch.
pub fn compose(first: Option<Value>, then: &Value) -> Value {
    match (first, then) {
        (Some(Value::Object(mut a)), Value::Object(b)) => {
            for (k, v) in b {
                let merged = compose(a.remove(k), v);
                a.insert(k.clone(), merged);
            }
            Value::Object(a)
        }
        (_, v) => v.clone(),
    }
}

/// `patch` applied to `doc` (JSON merge: `null` deletes, objects merge, the rest replaces);
/// `None` when nothing is left.
pub fn apply(doc: Option<Value>, patch: &Value) -> Option<Value> {
    match patch {
        Value::Null => None,
        Value::Object(p) => {
            let mut d = match doc {
                Some(Value::Object(d)) => d,
                _ => Map::new(),
            };
            for (k, v) in p {
                if let Some(x) = apply(d.remove(k), v) {
                    d.insert(k.clone(), x);
                }
            }
            (!d.is_empty()).then_some(Value::Object(d))
        }
        v => Some(v.clone()),
    }
}

/// The merge patch that turns `old` into `new`; `None` when they are equal.
pub fn diff(old: Option<&Value>, new: Option<&Value>) -> Option<Value> {
    match (old, new) {
        (None, None) => None,
        (Some(_), None) => Some(Value::Null),
        (Some(Value::Object(o)), Some(Value::Object(n))) => {
            let mut p = Map::new();
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                p.insert(k.clone(), Value::Null);
            }
            for (k, v) in n {
                if let Some(d) = diff(o.get(k), Some(v)) {
                    p.insert(k.clone(), d);
                }
            }
            (!p.is_empty()).then_some(Value::Object(p))
        }
        (o, Some(n)) => (o != Some(n)).then(|| n.clone()),
    }
}

/// `patch` without the keys `taken` sets (a key `taken` changes inside is dropped whole
/// unless both hold objects there).
pub fn without(patch: Value, taken: &Value) -> Option<Value> {
    match (patch, taken) {
        (Value::Object(mut p), Value::Object(t)) => {
            for (k, tv) in t {
                if let Some(pv) = p.remove(k) {
                    if let Some(rest) = without(pv, tv) {
                        p.insert(k.clone(), rest);
                    }
                }
            }
            (!p.is_empty()).then_some(Value::Object(p))
        }
        // The cloud replaced or removed the whole section.
        _ => None,
    }
}

/// The part of `patch` that changes `local` (leaves already equal dropped); `None` if nothing.
pub fn effective(local: Option<&Value>, patch: &Value) -> Option<Value> {
    let after = apply(local.cloned(), patch);
    diff(local, after.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_and_apply_round_trip() {
        let cases = [
            (
                json!({"a":1,"b":{"c":2,"d":3}}),
                json!({"a":1,"b":{"c":5},"e":[1]}),
            ),
            (json!({"a":1}), json!({"a":{"x":1}})),
            (json!({"a":[1,2]}), json!({"a":[2]})),
        ];
        for (old, new) in cases {
            let p = diff(Some(&old), Some(&new)).unwrap();
            assert_eq!(
                apply(Some(old.clone()), &p),
                Some(new.clone()),
                "{old} → {new} by {p}"
            );
        }
        assert_eq!(diff(Some(&json!({"a":1})), Some(&json!({"a":1}))), None);
        assert_eq!(diff(Some(&json!({"a":1})), None), Some(Value::Null));
        assert_eq!(diff(None, Some(&json!({"a":1}))), Some(json!({"a":1})));
        assert_eq!(
            diff(Some(&json!({"a":1,"b":2})), Some(&json!({"b":2}))),
            Some(json!({"a":null}))
        );
    }

    #[test]
    fn patches_compose_like_two_updates() {
        let doc = json!({"a":1,"b":{"c":2,"d":3}});
        let p1 = json!({"a":null,"b":{"c":9}});
        let p2 = json!({"b":{"d":null},"e":4});
        let both = compose(Some(p1.clone()), &p2);
        let stepwise = apply(apply(Some(doc.clone()), &p1), &p2);
        assert_eq!(apply(Some(doc), &both), stepwise);
        assert_eq!(compose(None, &json!(null)), json!(null));
    }

    #[test]
    fn the_cloud_wins_a_key_both_sides_changed() {
        let mut s = SyncState {
            cloud_version: 4,
            cloud_desired: Some(json!({"rate":5})),
            ..Default::default()
        };
        // Offline: the ward changes alarm_limit and mode, and reports.
        s.local_desired(&json!({"alarm_limit":150,"mode":"night"}), 1000);
        assert_eq!(s.waiting_since_ms, 1000);
        let reported = json!({"heartbeat":80});
        assert!(s.reported_changed(Some(&reported)));
        // Not fetched yet: only reported may go.
        assert_eq!(
            s.take_update(Some(&reported), false),
            Some(json!({"state":{"reported":{"heartbeat":80}}}))
        );
        assert!(!s.reported_changed(Some(&reported)));
        assert!(s.waiting());
        // The fetch: the cloud changed rate and alarm_limit meanwhile.
        let patch = s.cloud(Some(9), Some(json!({"rate":10,"alarm_limit":140})));
        assert_eq!(patch, Some(json!({"rate":10,"alarm_limit":140})));
        assert_eq!(s.out_desired, Some(json!({"mode":"night"})));
        assert_eq!(
            s.take_update(Some(&reported), true),
            Some(json!({"state":{"desired":{"mode":"night"}}}))
        );
        assert!(!s.waiting());
        assert_eq!(s.waiting_since_ms, 0);
        assert_eq!(
            s.cloud_desired,
            Some(json!({"rate":10,"alarm_limit":140,"mode":"night"}))
        );
        // The cloud's echo of that update changes nothing; an older message is ignored.
        assert_eq!(
            s.cloud(
                Some(10),
                Some(json!({"rate":10,"alarm_limit":140,"mode":"night"}))
            ),
            None
        );
        assert_eq!(s.cloud(Some(3), Some(json!({"rate":1}))), None);
        assert_eq!(s.cloud_version, 10);
        // A cloud deletion of the shadow clears desired on the ward.
        assert_eq!(s.cloud(None, None), Some(Value::Null));
    }

    #[test]
    fn the_pace_spreads_the_rate_over_ticks() {
        let ms = |p: Pace| (p.per_tick, p.tick.as_millis());
        assert_eq!(ms(Pace::of(10)), (1, 100));
        assert_eq!(ms(Pace::of(5)), (1, 200));
        assert_eq!(ms(Pace::of(20)), (2, 100));
        assert_eq!(ms(Pace::of(25)), (3, 120));
        assert_eq!(ms(Pace::of(0)), (1, 1000));
    }

    #[test]
    fn a_local_delete_clears_both_sections_upstream() {
        let mut s = SyncState {
            sent_reported: Some(json!({"heartbeat":70})),
            ..Default::default()
        };
        let (reported, desired) = parts(&Value::Null);
        assert_eq!(reported, Some(&Value::Null));
        s.local_desired(desired.unwrap(), 5);
        assert_eq!(
            s.take_update(None, true),
            Some(json!({"state":{"reported":null,"desired":null}}))
        );
        assert_eq!(s.take_update(None, true), None);
    }

    #[test]
    fn only_what_changes_the_local_state_is_applied() {
        let local = json!({"rate":10,"mode":"day"});
        assert_eq!(effective(Some(&local), &json!({"rate":10})), None);
        assert_eq!(
            effective(Some(&local), &json!({"rate":10,"mode":null,"x":1})),
            Some(json!({"mode":null,"x":1}))
        );
        assert_eq!(
            without(json!({"a":{"b":1,"c":2}}), &json!({"a":{"b":5}})),
            Some(json!({"a":{"c":2}}))
        );
        assert_eq!(without(json!({"a":1}), &Value::Null), None);
    }
}
