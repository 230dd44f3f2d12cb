//! The defender agent: AWS IoT Device Defender on the gateway, working offline.
//!
//! - **Device agents' reports** ([`Defender::report`]): a device running AWS's Device Defender
//!   agent publishes its metrics on `$aws/things/<device>/defender/metrics/{json|cbor}`
//!   through the gatekeeper (the default policy allows a device its own defender topics). The
//!   pipeline hands them here, in the device's connection task: the report is checked against
//!   AWS's schema ([`report`]), answered on `.../accepted` or `.../rejected` as AWS does, its
//!   metrics kept for Detect, and — accepted, with the upstream enabled — forwarded upstream on
//!   the `defender` stream (as long-name JSON, whatever the device sent).
//! - **The gateway's own report**: every `defender.report_interval`, the gateway's device-side
//!   metrics from `/proc` ([`proc`]) and custom metrics (queue depth, dead letters, plugin
//!   failures, devices connected), queued for `$aws/things/<gateway>/defender/metrics/json`.
//! - **Local Detect** ([`detect`]): at the end of every metering window the security profiles
//!   are evaluated; each violation event is logged, written to the store, and sent through the
//!   profile's actions (the rules' actions, [`crate::rules::Rules::run_actions`]) and the
//!   `quarantine` action ([`quarantine`]).
//! - **Operators** (`wardgate violations`, `wardgate quarantine list|clear`): the stage keeps
//!   `<state_dir>/defender.json` (active violations, quarantines, recent events) up to date, and
//!   takes requests dropped in `<state_dir>/requests/` when it gets SIGUSR1.
//!
//! Why in-line for reports but a stage for Detect: a report costs a parse and a reply, like a
//! shadow request, and its device should wait for it (a QoS 1 report is acknowledged once
//! forwarded); an evaluation looks at every device and runs once per window, so it runs in its
//! own stage ("defender", restarted if it fails) and never delays a device.
//!
//! What must stay true: a malformed report gets `/rejected` with the reason and affects no one
//! else; tracks (streaks and active violations) and quarantines are written to the store
//! (`<state_dir>/defender`, sled) before the events they cause are acted on, so a violation
//! survives kill -9 and resumes; the stage holds entrances of the queue writer and must be
//! stopped before the writer is awaited ([`crate::app`]).
//!
//! Write errors (a full disk): every write of the store is flushed before it counts, and one
//! that fails closes the store, which is opened again at most once per second
//! ([`crate::sled_reopen`]: sled would otherwise refuse every write until a restart); its
//! failures are logged at most once per 10 s. Detect goes on meanwhile: the events and
//! quarantines are acted on and kept in memory (then, and only then, a kill -9 loses them), and
//! the next evaluation that can write stores the tracks (always written whole), the events not
//! yet stored (at most `defender.history_events`; an event whose failed write partly reached the
//! disk may then be stored twice) and, after a failed quarantine write, the whole in-memory
//! quarantine list. Nothing in memory is made from the store after the start, so a reopened
//! store needs nothing reloaded.

pub mod detect;
pub mod proc;
pub mod quarantine;
pub mod report;

use crate::config::DefenderConfig;
use crate::gatekeeper::Sessions;
use crate::metering::Metering;
use crate::pipeline::{Ack, LocalPublisher};
use crate::registry::SharedRegistry;
use detect::{Detector, Event, EventType, Inputs, Reports, Track, TrackKey};
use quarantine::{Entry, Quarantine};
use report::{Format, Names, Report};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The file `wardgate violations` and `wardgate quarantine list` read.
pub const STATE_FILE: &str = "defender.json";
/// The directory operators' requests are dropped in.
pub const REQUESTS_DIR: &str = "requests";
/// Prefix of a request file that lifts a device's quarantine (`clear-quarantine.<device>`).
pub const CLEAR_QUARANTINE: &str = "clear-quarantine.";
/// Most events kept in [`STATE_FILE`] (all of them stay in the store up to
/// `defender.history_events`).
const EVENTS_IN_FILE: usize = 1000;
/// At most one "report rejected" journal line per device per this long.
const REJECT_LOG_EVERY: Duration = Duration::from_secs(60);

/// A Device Defender metrics topic: `$aws/things/<thing>/defender/metrics/<json|cbor>`.
pub fn parse_topic(topic: &str) -> Option<(&str, Format)> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing, tail) = rest.split_once('/')?;
    let format = match tail {
        "defender/metrics/json" => Format::Json,
        "defender/metrics/cbor" => Format::Cbor,
        _ => return None,
    };
    (!thing.is_empty()).then_some((thing, format))
}

/// Counters for `wardgate status`.
#[derive(Debug, Default)]
pub struct DefenderCounters {
    /// Device reports accepted.
    pub reports_accepted: AtomicU64,
    /// Device reports rejected.
    pub reports_rejected: AtomicU64,
    /// The gateway's own reports queued.
    pub own_reports: AtomicU64,
    /// Violation events raised (in-alarm), cleared and invalidated.
    pub in_alarm: AtomicU64,
    /// `alarm-cleared` events.
    pub cleared: AtomicU64,
    /// `alarm-invalidated` events.
    pub invalidated: AtomicU64,
    /// Evaluations run.
    pub evaluations: AtomicU64,
    /// Quarantines imposed.
    pub quarantines: AtomicU64,
}

/// One active violation as `wardgate violations` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveViolation {
    /// `violationId`.
    pub violation_id: String,
    /// `thingName`.
    pub thing_name: String,
    /// `securityProfileName`.
    pub security_profile_name: String,
    /// The behavior's name.
    pub behavior: String,
    /// Its metric.
    pub metric: String,
    /// Since when, epoch ms.
    pub since_ms: i64,
    /// AWS's `metricValue` that raised or last confirmed it.
    pub metric_value: serde_json::Value,
}

/// What the defender shows in `wardgate status` and [`STATE_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DefenderStatus {
    /// Security profiles loaded.
    pub profiles: usize,
    /// Device reports accepted since start.
    pub reports_accepted: u64,
    /// Device reports rejected since start.
    pub reports_rejected: u64,
    /// The gateway's own reports queued since start.
    pub own_reports: u64,
    /// Evaluations since start.
    pub evaluations: u64,
    /// Events since start: in-alarm, alarm-cleared, alarm-invalidated.
    pub events: [u64; 3],
    /// Quarantines imposed since start.
    #[serde(default)]
    pub quarantines: u64,
    /// The profiles' alert actions that failed since start (as of the last evaluation).
    #[serde(default)]
    pub action_failures: u64,
    /// Violations in force.
    pub active: Vec<ActiveViolation>,
    /// Devices in quarantine.
    pub quarantined: Vec<Entry>,
    /// Statistical behaviors not evaluated at the last window for want of devices.
    #[serde(default)]
    pub too_few_devices: Vec<String>,
}

/// [`STATE_FILE`]: the status plus recent events, newest last.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    /// When written, epoch ms.
    pub written_ms: i64,
    /// The status.
    pub status: DefenderStatus,
    /// Recent violation events (AWS's violation messages), oldest first.
    pub history: Vec<serde_json::Value>,
}

/// Active violations as lines for `wardgate status` and `wardgate violations`.
pub fn render_active(d: &DefenderStatus) -> String {
    let mut out = String::new();
    for v in &d.active {
        out.push_str(&format!(
            "violation {} {:<20} profile {} behavior {} ({} = {}) since {}\n",
            v.violation_id,
            v.thing_name,
            v.security_profile_name,
            v.behavior,
            v.metric,
            v.metric_value,
            crate::clock::rfc3339_ms(v.since_ms)
        ));
    }
    out
}

/// Quarantines as lines.
pub fn render_quarantined(d: &DefenderStatus) -> String {
    let mut out = String::new();
    for q in &d.quarantined {
        out.push_str(&format!(
            "quarantined {:<20} until {} (profile {}, behavior {}, violation {})\n",
            q.device_id,
            crate::clock::rfc3339_ms(q.until_ms),
            q.security_profile,
            q.behavior,
            q.violation_id
        ));
    }
    out
}

/// Read [`STATE_FILE`] from `state_dir`.
pub fn read_state(state_dir: &Path) -> Result<StateFile, String> {
    let path = state_dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(|e| {
        format!(
            "cannot read {}: {e} (is wardgate running with this gateway.state_dir, with [defender] enabled?)",
            path.display()
        )
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a defender state file: {e}", path.display()))
}

/// The defender store's open database.
#[derive(Debug)]
struct Handles {
    db: sled::Db,
    tracks: sled::Tree,
    quarantine: sled::Tree,
    events: sled::Tree,
}

impl crate::sled_reopen::Handles for Handles {
    fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// The store's errors: what failed, where, what to do.
pub use crate::sled_reopen::StoreError;

/// What a failure of the defender's store means, for the journal.
const STORE_FAILURE: &str = "violations, events and quarantines are kept in memory and written with the next evaluation once it works again (until then a restart would lose them)";

/// The defender's store: tracks, quarantines and the event history. Cheap to clone: every
/// clone uses the same database, which is closed and opened again after a write error
/// ([`crate::sled_reopen`]).
#[derive(Debug, Clone)]
pub struct Store {
    db: crate::sled_reopen::Reopening<Handles>,
}

fn track_key(k: &TrackKey) -> Vec<u8> {
    format!("{}\0{}\0{}", k.0, k.1, k.2).into_bytes()
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: crate::sled_reopen::Reopening::open(
                "Device Defender store",
                STORE_FAILURE,
                dir,
                Self::open_handles,
            )?,
        })
    }

    fn open_handles(dir: &Path) -> sled::Result<Handles> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(1 << 20)
            .open()?;
        Ok(Handles {
            tracks: db.open_tree("tracks")?,
            quarantine: db.open_tree("quarantine")?,
            events: db.open_tree("events")?,
            db,
        })
    }

    /// Every stored track (none while the store cannot be read: that is logged).
    pub fn tracks(&self) -> BTreeMap<TrackKey, Track> {
        let read = self.db.read(|h| {
            let mut out = BTreeMap::new();
            for (k, v) in h.tracks.iter().flatten() {
                let key = String::from_utf8_lossy(&k).into_owned();
                let mut parts = key.splitn(3, '\0');
                let (Some(p), Some(b), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                if let Ok(t) = serde_json::from_slice::<Track>(&v) {
                    out.insert((Arc::from(p), Arc::from(b), Arc::from(d)), t);
                }
            }
            Ok(out)
        });
        read.unwrap_or_default()
    }

    /// Every stored quarantine (none while the store cannot be read: that is logged).
    pub fn quarantines(&self) -> Vec<Entry> {
        let read = self.db.read(|h| {
            Ok(h.quarantine
                .iter()
                .flatten()
                .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
                .collect())
        });
        read.unwrap_or_default()
    }

    /// The newest `n` events, oldest first (none while the store cannot be read).
    pub fn events(&self, n: usize) -> Vec<serde_json::Value> {
        let read = self.db.read(|h| {
            let mut out: Vec<serde_json::Value> = h
                .events
                .iter()
                .rev()
                .take(n)
                .flatten()
                .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
                .collect();
            out.reverse();
            Ok(out)
        });
        read.unwrap_or_default()
    }

    /// Replace the tracks with `tracks`, append `events` (violation messages, keeping the
    /// newest `keep`), replace the quarantines with `quarantines` when given, and flush.
    fn save(
        &self,
        tracks: &BTreeMap<TrackKey, Track>,
        events: &[serde_json::Value],
        keep: usize,
        quarantines: Option<&[Entry]>,
    ) -> Result<(), StoreError> {
        self.db.write(|h| {
            let mut batch = sled::Batch::default();
            let wanted: std::collections::BTreeSet<Vec<u8>> =
                tracks.keys().map(track_key).collect();
            for k in h.tracks.iter().keys().flatten() {
                if !wanted.contains(k.as_ref()) {
                    batch.remove(k);
                }
            }
            for (k, t) in tracks {
                batch.insert(track_key(k), serde_json::to_vec(t).unwrap_or_default());
            }
            h.tracks.apply_batch(batch)?;
            for e in events {
                let seq = h.db.generate_id()?;
                h.events
                    .insert(seq.to_be_bytes(), serde_json::to_vec(e).unwrap_or_default())?;
            }
            while h.events.len() > keep {
                match h.events.pop_min()? {
                    Some(_) => {}
                    None => break,
                }
            }
            if let Some(list) = quarantines {
                let wanted: std::collections::HashSet<&[u8]> =
                    list.iter().map(|q| q.device_id.as_bytes()).collect();
                let mut batch = sled::Batch::default();
                for k in h.quarantine.iter().keys().flatten() {
                    if !wanted.contains(k.as_ref()) {
                        batch.remove(k);
                    }
                }
                for q in list {
                    batch.insert(
                        q.device_id.as_bytes(),
                        serde_json::to_vec(q).unwrap_or_default(),
                    );
                }
                h.quarantine.apply_batch(batch)?;
            }
            h.db.flush()?;
            Ok(())
        })
    }

    /// Store a quarantine (or remove it: `None`), and flush.
    pub fn put_quarantine(&self, device: &str, entry: Option<&Entry>) -> Result<(), StoreError> {
        self.db.write(|h| {
            match entry {
                Some(e) => {
                    h.quarantine
                        .insert(device.as_bytes(), serde_json::to_vec(e).unwrap_or_default())?;
                }
                None => {
                    h.quarantine.remove(device.as_bytes())?;
                }
            }
            h.db.flush()?;
            Ok(())
        })
    }
}

/// Everything the defender needs from the rest of the gateway.
#[derive(Debug)]
pub struct Parts {
    /// The gateway's thing name.
    pub gateway_id: String,
    /// `[defender]`.
    pub config: DefenderConfig,
    /// `metering.window` and `metering.windows_kept`.
    pub window: Duration,
    /// Closed windows kept.
    pub windows_kept: usize,
    /// Where [`STATE_FILE`] and [`REQUESTS_DIR`] live.
    pub state_dir: PathBuf,
    /// The store.
    pub store: Store,
    /// Replies to device agents.
    pub local: Arc<LocalPublisher>,
    /// The queue (`None`: upstream disabled).
    pub queue: Option<crate::queue::Enqueue>,
    /// Runs the profiles' actions.
    pub rules: Arc<crate::rules::Rules>,
    /// Registered devices (targets, kinds).
    pub registry: SharedRegistry,
    /// The ward history: every violation event is kept there (`None`: history disabled).
    pub history: Option<crate::history::Recorder>,
    /// Cloud-side metrics.
    pub metering: Metering,
    /// Connected devices (to disconnect a quarantined one).
    pub sessions: Sessions,
    /// The quarantine list the gatekeeper consults.
    pub quarantine: Quarantine,
    /// For the gateway's custom metrics: the queue.
    pub queue_status: Option<crate::queue::SharedQueue>,
    /// For the gateway's custom metrics: dead letters.
    pub dead_letters: Arc<crate::pipeline::dead_letter::DeadLetterCounters>,
    /// For the gateway's custom metrics: plugin failures.
    pub plugins: Arc<crate::plugin_host::PluginHost>,
}

#[derive(Debug)]
struct State {
    reports: Reports,
    detector: Detector,
    /// Last accepted report id per device (monotonic, as AWS requires).
    last_report: HashMap<Arc<str>, u64>,
    /// Recent events for the state file.
    recent: VecDeque<serde_json::Value>,
    /// The gateway's last own report id.
    own_report_id: u64,
    /// Violation events whose store write failed, oldest first (at most
    /// `defender.history_events`): written with the next evaluation.
    unsaved_events: Vec<serde_json::Value>,
    /// A quarantine write failed: the next evaluation writes the whole in-memory list.
    quarantines_unsaved: bool,
}

/// The defender (shared by the pipeline and the defender stage: `Arc<Defender>`).
#[derive(Debug)]
pub struct Defender {
    parts: Parts,
    state: Mutex<State>,
    counters: Arc<DefenderCounters>,
    /// One "report rejected" line per device per [`REJECT_LOG_EVERY`].
    reject_log: crate::telemetry::LogLimiter,
}

/// A cheap view of the defender for the status file, that keeps none of its entrances.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    counters: Arc<DefenderCounters>,
    shared: Arc<Mutex<DefenderStatus>>,
}

impl StatusHandle {
    /// What `wardgate status` shows.
    pub fn snapshot(&self) -> DefenderStatus {
        let mut s = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let c = &self.counters;
        s.reports_accepted = c.reports_accepted.load(Relaxed);
        s.reports_rejected = c.reports_rejected.load(Relaxed);
        s.own_reports = c.own_reports.load(Relaxed);
        s.evaluations = c.evaluations.load(Relaxed);
        s.quarantines = c.quarantines.load(Relaxed);
        s.events = [
            c.in_alarm.load(Relaxed),
            c.cleared.load(Relaxed),
            c.invalidated.load(Relaxed),
        ];
        s
    }
}

impl Defender {
    /// Build the defender from `parts`, resuming the stored tracks and quarantines.
    pub fn new(parts: Parts) -> (Arc<Self>, StatusHandle) {
        let mut detector = Detector::new(&parts.config, parts.window, parts.windows_kept);
        detector.adopt(parts.store.tracks());
        let resumed = detector.active().count();
        let now = crate::clock::now_ms();
        let mut quarantines_unsaved = false;
        for q in parts.store.quarantines() {
            if q.until_ms > now {
                parts.quarantine.insert(q);
            } else if parts.store.put_quarantine(&q.device_id, None).is_err() {
                quarantines_unsaved = true;
            }
        }
        if !detector.profiles.is_empty() || resumed > 0 {
            log::info!(
                profiles = detector.profiles.len(), active_violations = resumed,
                quarantined = parts.quarantine.list().len();
                "defender: {} security profiles loaded; {resumed} violations in force",
                detector.profiles.len()
            );
        }
        let recent = parts.store.events(EVENTS_IN_FILE).into();
        let counters = Arc::new(DefenderCounters::default());
        let handle = StatusHandle {
            counters: counters.clone(),
            shared: Arc::default(),
        };
        let d = Arc::new(Self {
            state: Mutex::new(State {
                reports: Reports::new(parts.window, parts.windows_kept),
                detector,
                last_report: HashMap::new(),
                recent,
                own_report_id: 0,
                unsaved_events: Vec::new(),
                quarantines_unsaved,
            }),
            parts,
            counters,
            reject_log: crate::telemetry::LogLimiter::every(REJECT_LOG_EVERY),
        });
        *handle.shared.lock().unwrap_or_else(|e| e.into_inner()) = d.status();
        (d, handle)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply reloaded security profiles (and `statistics_min_devices`, `invalidate_after`):
    /// evaluated from the next window end. A behavior kept by name (same profile, same
    /// behavior name) keeps its devices' streaks and violations, which then alarm and clear
    /// by the new criteria; a removed behavior's violations end with it (its tracks are
    /// dropped). Returns (profiles loaded, violations kept). The other `[defender]` settings
    /// are fixed at start.
    pub fn reload(&self, c: &DefenderConfig) -> (usize, usize) {
        let mut detector = Detector::new(c, self.parts.window, self.parts.windows_kept);
        let mut st = self.lock();
        // The store follows at the next evaluation, which replaces its tracks with these.
        detector.adopt(std::mem::take(&mut st.detector.tracks));
        let active = detector.active().count();
        let profiles = detector.profiles.len();
        st.detector = detector;
        (profiles, active)
    }

    /// The status now (without the counters, which [`StatusHandle`] adds).
    fn status(&self) -> DefenderStatus {
        let st = self.lock();
        let d = &st.detector;
        let active = d
            .active()
            .map(|((p, b, dev), v)| ActiveViolation {
                violation_id: v.id.clone(),
                thing_name: dev.to_string(),
                security_profile_name: p.to_string(),
                behavior: b.to_string(),
                metric: d
                    .profiles
                    .iter()
                    .find(|x| *x.name == **p)
                    .and_then(|x| x.behaviors.iter().find(|y| *y.name == **b))
                    .map(|y| y.metric.clone())
                    .unwrap_or_default(),
                since_ms: v.started_ms,
                metric_value: v.metric_value.clone(),
            })
            .collect();
        DefenderStatus {
            profiles: d.profiles.len(),
            action_failures: d.profiles.iter().map(|p| p.actions.failures()).sum(),
            active,
            quarantined: self.parts.quarantine.list(),
            too_few_devices: d
                .too_few_devices
                .iter()
                .map(|(p, b)| format!("{p}/{b}"))
                .collect(),
            ..Default::default()
        }
    }

    /// A device agent's report on `topic` (a [`parse_topic`] topic) from `device`: check it,
    /// answer it, keep its metrics, forward it. `ack` (QoS 1) is confirmed once the forwarded
    /// report is on disk (or at once when it is not forwarded).
    pub async fn report(
        &self,
        device: &Arc<str>,
        thing: &str,
        format: Format,
        payload: &[u8],
        ack: Option<Ack>,
    ) {
        let reply_base = format!("$aws/things/{thing}/defender/metrics/{}", format.as_str());
        let now_ms = crate::clock::now_ms();
        let parsed = Report::parse(payload, format).and_then(|(r, names)| {
            if thing != &**device && self.parts.registry.snapshot().get(thing).is_none() {
                return Err(report::Invalid {
                    field: String::new(),
                    message: format!("thing `{thing}` is not a device registered on this gateway"),
                });
            }
            let st = self.lock();
            match st.last_report.get(thing) {
                Some(last) if r.report_id <= *last => Err(report::Invalid {
                    field: "header.report_id".into(),
                    message: format!("{} is not more than the previous report's {last}: report ids must increase", r.report_id),
                }),
                _ => Ok((r, names)),
            }
        });
        let (r, _names) = match parsed {
            Ok(x) => x,
            Err(why) => {
                self.counters.reports_rejected.fetch_add(1, Relaxed);
                let id = report::report_id_of(payload, format);
                let body = report::rejected(thing, id, &why, now_ms);
                self.parts
                    .local
                    .publish_wanted(&format!("{reply_base}/rejected"), body)
                    .await;
                if let Some(suppressed) = self.reject_log.allow(device) {
                    log::warn!(
                        device_id:% = device, thing:% = thing, reason:% = why, format = format.as_str(),
                        suppressed = suppressed;
                        "Device Defender report from {device} rejected: {why}"
                    );
                }
                if let Some(ack) = ack {
                    ack.confirm();
                }
                return;
            }
        };
        let thing_id: Arc<str> = Arc::from(thing);
        {
            let mut st = self.lock();
            st.last_report.insert(thing_id.clone(), r.report_id);
            st.reports.add(&thing_id, &r, (now_ms / 1000) as u64);
        }
        self.counters.reports_accepted.fetch_add(1, Relaxed);
        log::debug!(device_id:% = device, thing:% = thing, report_id = r.report_id; "Device Defender report accepted");
        let mut ack = ack;
        if let Some(queue) = &self.parts.queue {
            let record = crate::queue::Record {
                class: crate::queue::Class::Routine,
                stream: crate::queue::Stream::Defender,
                subject: thing.to_owned(),
                enqueued_at_ms: now_ms,
                payload: r.encode(Format::Json, Names::Long),
            };
            let (mine, durable) = Ack::new();
            if queue.push(record, Some(mine)).await {
                // The device's PUBACK waits for the forwarded copy to be on disk.
                if durable.await.is_err() {
                    log::warn!(device_id:% = device; "Device Defender report not stored for the upstream; not acknowledged");
                    ack = None;
                }
            }
        }
        let body = report::accepted(thing, r.report_id, crate::clock::now_ms());
        self.parts
            .local
            .publish_wanted(&format!("{reply_base}/accepted"), body)
            .await;
        if let Some(ack) = ack {
            ack.confirm();
        }
    }

    /// Evaluate the window that ended at `end_s`, then act on the events.
    async fn evaluate(&self, end_s: u64, status: &StatusHandle) {
        let devices: Vec<(Arc<str>, String)> = {
            let reg = self.parts.registry.snapshot();
            reg.devices()
                .map(|d| (d.id.clone(), d.kind.to_string()))
                .collect()
        };
        let meters: HashMap<Arc<str>, _> = self
            .parts
            .metering
            .snapshot()
            .into_iter()
            .map(|s| (Arc::from(s.device_id.as_str()), s))
            .collect();
        let now_ms = crate::clock::now_ms();
        let (events, tracks) = {
            let mut st = self.lock();
            let ids: std::collections::HashSet<&str> = devices.iter().map(|(d, _)| &**d).collect();
            st.reports.retain(|d| ids.contains(d));
            let State {
                reports, detector, ..
            } = &mut *st;
            let events = detector.evaluate(&Inputs {
                devices: &devices,
                meters: &meters,
                reports,
                end_s,
                now_ms,
            });
            (events, detector.tracks.clone())
        };
        self.counters.evaluations.fetch_add(1, Relaxed);
        let store = self.parts.store.clone();
        let keep = self.parts.config.history_events.max(1);
        // With the events (and quarantines) an earlier write failed to store.
        let (to_save, quarantines) = {
            let mut st = self.lock();
            st.unsaved_events
                .extend(events.iter().map(|e| e.message.clone()));
            let excess = st.unsaved_events.len().saturating_sub(keep);
            st.unsaved_events.drain(..excess);
            let quarantines =
                std::mem::take(&mut st.quarantines_unsaved).then(|| self.parts.quarantine.list());
            (st.unsaved_events.clone(), quarantines)
        };
        let saving = to_save.len();
        let with_quarantines = quarantines.is_some();
        // The tracks and events are on disk before anything acts on them.
        let saved = tokio::task::spawn_blocking(move || {
            store.save(&tracks, &to_save, keep, quarantines.as_deref())
        })
        .await;
        match saved {
            Ok(Ok(())) => {
                let mut st = self.lock();
                let n = saving.min(st.unsaved_events.len());
                st.unsaved_events.drain(..n);
            }
            Ok(Err(e)) => {
                // Kept in memory and written with the next evaluation (the store logs its
                // failures, at most one line per 10 s).
                self.lock().quarantines_unsaved |= with_quarantines;
                log::debug!(error:% = e; "defender: cannot write violations to the store; they are kept in memory");
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => self.lock().quarantines_unsaved |= with_quarantines,
        }
        for e in &events {
            self.act(e).await;
        }
        let changed = !events.is_empty();
        if changed {
            let mut st = self.lock();
            for e in &events {
                st.recent.push_back(e.message.clone());
            }
            while st.recent.len() > EVENTS_IN_FILE {
                st.recent.pop_front();
            }
        }
        self.publish_status(status);
    }

    /// Log an event and run its profile's actions.
    async fn act(&self, e: &Event) {
        let (profile_name, behavior, metric, suppress, quarantine, actions) = {
            let st = self.lock();
            let p = &st.detector.profiles[e.profile];
            let b = &p.behaviors[e.behavior];
            (
                p.name.clone(),
                b.name.clone(),
                b.metric.clone(),
                b.suppress_alerts,
                p.quarantine,
                p.actions.clone(),
            )
        };
        let id = e.message["violationId"].as_str().unwrap_or("").to_owned();
        let value = e.message["metricValue"].to_string();
        let device = &*e.device;
        if let Some(history) = &self.parts.history {
            let mv = &e.message["metricValue"];
            let number = mv["count"].as_f64().or_else(|| mv["number"].as_f64());
            history.violation(
                device,
                &metric,
                number,
                e.kind.as_str(),
                format!("behavior {behavior} of security profile {profile_name}, violation {id}"),
                crate::clock::now_ms(),
            );
        }
        match e.kind {
            EventType::InAlarm => {
                self.counters.in_alarm.fetch_add(1, Relaxed);
                log::warn!(
                    device_id:% = device, security_profile:% = profile_name, behavior:% = behavior,
                    metric:% = metric, violation_id:% = id, violation_event_type = "in-alarm", metric_value:% = value;
                    "violation: {device} breaks behavior {behavior} of security profile {profile_name} ({metric} = {value})"
                );
            }
            EventType::Cleared => {
                self.counters.cleared.fetch_add(1, Relaxed);
                log::info!(
                    device_id:% = device, security_profile:% = profile_name, behavior:% = behavior,
                    metric:% = metric, violation_id:% = id, violation_event_type = "alarm-cleared", metric_value:% = value;
                    "violation cleared: {device} behaves again for behavior {behavior} of security profile {profile_name} ({metric} = {value})"
                );
            }
            EventType::Invalidated => {
                self.counters.invalidated.fetch_add(1, Relaxed);
                log::info!(
                    device_id:% = device, security_profile:% = profile_name, behavior:% = behavior,
                    metric:% = metric, violation_id:% = id, violation_event_type = "alarm-invalidated";
                    "violation invalidated: {device} sent no {metric} for {:?}; behavior {behavior} of security profile {profile_name} can no longer be evaluated",
                    self.parts.config.invalidate_after
                );
            }
        }
        if !suppress {
            let topic = format!("$aws/things/{}/defender/violations", e.device);
            let msg = crate::rules::Message {
                topic: &topic,
                payload: &[],
                device_id: &e.device,
                received_at_ms: crate::clock::now_ms(),
            };
            self.parts
                .rules
                .run_actions(
                    crate::rules::Origin::Profile(&profile_name),
                    &actions,
                    msg,
                    &e.message,
                    &mut None,
                )
                .await;
        }
        if e.kind == EventType::InAlarm {
            if let Some(duration) = quarantine {
                self.quarantine(device, &profile_name, &behavior, &id, duration)
                    .await;
            }
        }
    }

    async fn quarantine(
        &self,
        device: &str,
        profile: &str,
        behavior: &str,
        violation: &str,
        duration: Duration,
    ) {
        let now = crate::clock::now_ms();
        let entry = self.parts.quarantine.insert(Entry {
            device_id: device.to_owned(),
            since_ms: now,
            until_ms: now.saturating_add(duration.as_millis().min(i64::MAX as u128) as i64),
            security_profile: profile.to_owned(),
            behavior: behavior.to_owned(),
            violation_id: violation.to_owned(),
        });
        let store = self.parts.store.clone();
        let (d, e) = (device.to_owned(), entry.clone());
        let stored = tokio::task::spawn_blocking(move || store.put_quarantine(&d, Some(&e))).await;
        if !matches!(stored, Ok(Ok(()))) {
            self.lock().quarantines_unsaved = true;
            log::debug!(device_id:% = device; "defender: cannot store the quarantine of {device}; it is written with the next evaluation");
        }
        self.counters.quarantines.fetch_add(1, Relaxed);
        let connected = self.parts.sessions.end(device);
        log::warn!(
            device_id:% = device, security_profile:% = profile, behavior:% = behavior, violation_id:% = violation,
            until:% = crate::clock::rfc3339_ms(entry.until_ms), disconnected = connected;
            "quarantine: {device} is refused until {} (security profile {profile}, behavior {behavior}){}; `wardgate quarantine clear {device}` lifts it",
            crate::clock::rfc3339_ms(entry.until_ms),
            if connected { "; its connection is closed" } else { "" }
        );
    }

    /// Lift a device's quarantine (an operator's request); whether it was quarantined.
    pub fn clear_quarantine(&self, device: &str, by: &str) -> bool {
        let had = self.parts.quarantine.remove(device);
        self.store_quarantine(device, None);
        match &had {
            Some(q) => log::warn!(
                device_id:% = device, security_profile:% = q.security_profile, violation_id:% = q.violation_id;
                "quarantine of {device} lifted {by}"
            ),
            None => {
                log::info!(device_id:% = device; "quarantine clear requested for {device}, which is not quarantined")
            }
        }
        had.is_some()
    }

    /// Store `device`'s quarantine (`None`: lifted); when that fails, the next evaluation
    /// writes the whole in-memory list (the store logs its failures).
    fn store_quarantine(&self, device: &str, entry: Option<&Entry>) {
        if let Err(e) = self.parts.store.put_quarantine(device, entry) {
            self.lock().quarantines_unsaved = true;
            log::debug!(device_id:% = device, error:% = e; "defender: cannot change the quarantine of {device} in the store; it is written with the next evaluation");
        }
    }

    fn publish_status(&self, status: &StatusHandle) {
        let s = self.status();
        *status.shared.lock().unwrap_or_else(|e| e.into_inner()) = s;
        let file = StateFile {
            written_ms: crate::clock::now_ms(),
            status: status.snapshot(),
            history: self.lock().recent.iter().cloned().collect(),
        };
        let dir = &self.parts.state_dir;
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let r = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, dir.join(STATE_FILE)));
        if let Err(e) = r {
            log::warn!(error:% = e; "defender: cannot write {}", dir.join(STATE_FILE).display());
        }
    }

    /// The gateway's own report: `/proc` metrics and custom metrics.
    fn own_report(&self, sampler: &mut proc::Sampler) -> Option<Report> {
        let metrics = match sampler.sample() {
            Ok(m) => Some(m),
            Err(e) => {
                log::warn!(error:% = e; "defender: cannot read the gateway's network metrics from /proc; the report carries custom metrics only");
                None
            }
        };
        let mut custom = BTreeMap::new();
        use report::CustomValue::Number;
        if let Some(q) = &self.parts.queue_status {
            let s = q.status();
            custom.insert("queue_depth".to_owned(), Number(s.depth as f64));
        }
        let dl = self.parts.dead_letters.status();
        custom.insert("dead_letters".to_owned(), Number(dl.written as f64));
        let failures = self.parts.plugins.failures();
        custom.insert("plugin_failures".to_owned(), Number(failures as f64));
        let connected = self
            .parts
            .metering
            .snapshot()
            .iter()
            .filter(|s| s.connected)
            .count();
        custom.insert("devices_connected".to_owned(), Number(connected as f64));
        let mut st = self.lock();
        let id = ((crate::clock::now_ms() / 1000) as u64).max(st.own_report_id + 1);
        st.own_report_id = id;
        Some(Report {
            report_id: id,
            version: report::VERSION.into(),
            metrics,
            custom_metrics: custom,
        })
    }

    async fn send_own_report(&self, sampler: &mut proc::Sampler) {
        let Some(queue) = &self.parts.queue else {
            return;
        };
        let Some(r) = self.own_report(sampler) else {
            return;
        };
        let names = if self.parts.config.report_names == "short" {
            Names::Short
        } else {
            Names::Long
        };
        let record = crate::queue::Record {
            class: crate::queue::Class::Routine,
            stream: crate::queue::Stream::Defender,
            subject: String::new(),
            enqueued_at_ms: crate::clock::now_ms(),
            payload: r.encode(Format::Json, names),
        };
        if queue.push(record, None).await {
            self.counters.own_reports.fetch_add(1, Relaxed);
            log::debug!(report_id = r.report_id; "defender: the gateway's metrics report queued");
        }
    }

    /// Take the operators' requests in `<state_dir>/requests/`.
    fn take_requests(&self, status: &StatusHandle) {
        let dir = self.parts.state_dir.join(REQUESTS_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut any = false;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(device) = name.strip_prefix(CLEAR_QUARANTINE) {
                self.clear_quarantine(device, "by an operator (wardgate quarantine clear)");
                any = true;
            }
            let _ = std::fs::remove_file(e.path());
        }
        if any {
            self.publish_status(status);
        }
    }

    /// The defender stage: evaluate at each window's end, send the gateway's report, expire
    /// quarantines, take operators' requests (on SIGUSR1 and at each window), until `stop`.
    pub async fn run(
        self: Arc<Self>,
        status: StatusHandle,
        stop: CancellationToken,
        beat: crate::supervisor::Heartbeat,
    ) -> Result<(), std::convert::Infallible> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = signal(SignalKind::user_defined1()).ok();
        let len = self.parts.window.as_secs().max(1);
        let mut sampler = proc::Sampler::new("/proc");
        // The first sample is the baseline of the network counters (as AWS's agent does).
        let _ = sampler.sample();
        let report_every = self
            .parts
            .config
            .report_interval
            .max(Duration::from_secs(1));
        let mut report_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + report_every, report_every);
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle = crate::supervisor::Heartbeat::ticker();
        self.take_requests(&status);
        self.publish_status(&status);
        // The end of the next window to evaluate; it moves only once that window is evaluated,
        // so other wake-ups (the idle beat, a report, a request) never skip one.
        let next_end = |now_ms: i64| (now_ms.max(0) / 1000) as u64 / len * len + len;
        let mut end_s = next_end(crate::clock::now_ms());
        loop {
            beat.beat();
            let now_ms = crate::clock::now_ms();
            // A little after the boundary, so the meters have closed the window.
            let wait =
                Duration::from_millis((end_s * 1000 + 50).saturating_sub(now_ms.max(0) as u64));
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = idle.tick() => continue,
                _ = report_tick.tick() => self.send_own_report(&mut sampler).await,
                Some(()) = async { match &mut usr1 { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    self.take_requests(&status);
                }
                _ = tokio::time::sleep(wait) => {
                    for q in self.parts.quarantine.expire(crate::clock::now_ms()) {
                        self.store_quarantine(&q.device_id, None);
                        log::info!(device_id:% = q.device_id, security_profile:% = q.security_profile; "quarantine of {} ended", q.device_id);
                    }
                    self.evaluate(end_s, &status).await;
                    self.take_requests(&status);
                    // After a long pause (a suspended machine) the next evaluation is the
                    // window in progress, not every window missed.
                    end_s = (end_s + len).max(next_end(crate::clock::now_ms()) - len);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled_reopen::testing::SmallDisk;

    fn entry(device: &str) -> Entry {
        Entry {
            device_id: device.to_owned(),
            since_ms: 1,
            until_ms: i64::MAX,
            security_profile: "pacemakers".into(),
            behavior: "traffic".into(),
            violation_id: format!("v-{device}"),
        }
    }

    /// A violation message numbered `n`, of about 1 KiB.
    fn event(n: u32) -> serde_json::Value {
        serde_json::json!({ "violationId": format!("v-{n}"), "pad": "x".repeat(1000) })
    }

    fn tracks() -> BTreeMap<TrackKey, Track> {
        let key: TrackKey = (
            Arc::from("pacemakers"),
            Arc::from("traffic"),
            Arc::from("pm-1"),
        );
        BTreeMap::from([(
            key,
            Track {
                violating: 3,
                ..Track::default()
            },
        )])
    }

    fn numbers(store: &Store) -> std::collections::BTreeSet<String> {
        store
            .events(usize::MAX)
            .iter()
            .map(|e| e["violationId"].as_str().unwrap().to_owned())
            .collect()
    }

    /// sled keeps a write error for good: the store is closed and opened again, so once the
    /// full disk has room, violations and quarantines are written again without a restart.
    #[test]
    fn a_full_disk_fails_writes_and_room_brings_them_back_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let disk = SmallDisk::new(&dir.path().join("small"), "4m");
        let path = disk.0.join("defender");
        let store = Store::open(&path).unwrap();
        let keep = usize::MAX;
        store.put_quarantine("pm-1", Some(&entry("pm-1"))).unwrap();
        store.save(&tracks(), &[event(0)], keep, None).unwrap();
        let mut saved = vec![format!("v-0")];
        disk.fill("filler");
        // Writes go on until one fails (sled may still have room it already took).
        let mut n = 0;
        let error = loop {
            n += 1;
            assert!(n < 100_000, "every write succeeded with the disk full");
            match store.save(&tracks(), &[event(n)], keep, None) {
                Ok(()) => saved.push(format!("v-{n}")),
                Err(e) => break e.to_string(),
            }
        };
        // The error says what, where and what to do.
        SmallDisk::assert_explains(&error, "Device Defender store", &path);
        // Still failing while the disk is full, across tries to open the store again.
        let until = std::time::Instant::now() + crate::sled_reopen::REOPEN_EVERY * 3;
        while std::time::Instant::now() < until {
            n += 1;
            assert!(
                store.save(&tracks(), &[event(n)], keep, None).is_err(),
                "written with the disk full"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        disk.free("filler");
        // Room again: written again, with no restart and no reopening by hand.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            n += 1;
            if store.save(&tracks(), &[event(n)], keep, None).is_ok() {
                saved.push(format!("v-{n}"));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing written within 60 s of freeing the disk"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // What was written before the disk filled is there.
        assert_eq!(store.quarantines(), [entry("pm-1")]);
        assert!(numbers(&store).contains("v-0"));
        store.put_quarantine("pm-2", Some(&entry("pm-2"))).unwrap();
        // A whole quarantine list, as after a failed quarantine write.
        store
            .save(&tracks(), &[], keep, Some(&[entry("pm-2"), entry("pm-3")]))
            .unwrap();
        let check = |store: &Store| {
            let events = numbers(store);
            for s in &saved {
                assert!(events.contains(s), "saved event {s} missing");
            }
            assert_eq!(store.tracks(), tracks());
            let mut q: Vec<String> = store
                .quarantines()
                .into_iter()
                .map(|q| q.device_id)
                .collect();
            q.sort();
            assert_eq!(q, ["pm-2", "pm-3"], "the list replaced the stored ones");
        };
        check(&store);
        // And from disk, as the next start finds it.
        drop(store);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let again = loop {
            match Store::open(&path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("could not acquire lock"), "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        check(&again);
    }
}
