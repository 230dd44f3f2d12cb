//! Device shadows, answered by the gateway itself: AWS IoT's classic and named shadows on the
//! local broker, online or offline.
//!
//! A device's PUBLISH to `$aws/things/<thing>/shadow[/name/<shadow>]/<update|get|delete>` is
//! routed here by the pipeline (never to a plugin). The service applies it to the stored
//! document ([`document`]: merge, `null` deletes, version, metadata, delta, AWS's limits and
//! error replies), keeps the result in sled (`<state_dir>/shadows`), and publishes the replies
//! devices expect on the local broker: `/accepted` or `/rejected` (with the request's
//! `clientToken`), `/update/delta` and `/update/documents`. Replies nobody subscribes to are
//! not published.
//!
//! Requests are handled by one task in arrival order, in groups: every request waiting when
//! the task wakes is applied, the changed documents are written and flushed to disk once, and
//! only then are the replies published and the QoS 1 requests acknowledged. (A group made only
//! of updates from readings is written without waiting for a flush: sled flushes it within
//! a second, and the readings themselves are already durable in the queue.) So the
//! `/update/accepted` a device's request gets (and its PUBACK) always means the new document
//! survives a kill -9, and a
//! burst of updates costs one flush, not one each.
//!
//! Readings feed the shadow: a plugin's canonical readings update the device's classic shadow
//! (reported state, see [`Shadows::report`]), so rules written for shadow topics see plugin
//! devices too.
//!
//! Bounds: a document's state is at most 8 KB and 6 levels deep (AWS's limits); a thing has at
//! most [`MAX_NAMED_PER_THING`] named shadows; at most [`MAX_IN_FLIGHT_PER_THING`] requests
//! of one thing wait for the service (IoT Core's limit): one more is answered at once on its
//! `/rejected` topic with 429 "Too Many Requests" (and acknowledged: it was answered), so a
//! device flooding its shadow cannot fill the queue the other devices' requests wait in.
//! Requests wait in a channel of [`REQUEST_CHANNEL_CAPACITY`]; a full channel holds up the
//! devices sending them (their connections are not read meanwhile), never anyone else's
//! readings.
//!
//! Versions: a classic shadow's version survives its deletion (a recreated shadow continues
//! the numbering, as on IoT Core within 48 h). A deleted *named* shadow is forgotten
//! altogether, so that creating and deleting names cannot grow the store without bound;
//! recreated, it starts again at version 1.
//!
//! What must stay true: a rejected request changes nothing; an accepted one is on disk before
//! anyone hears of it; errors in one thing's requests never affect another's.
//!
//! Write errors (a full disk): a group whose write or flush fails, or whose store cannot be
//! read, is not answered at all — no reply, no PUBACK, so its QoS 1 requests are sent again —
//! and counted in `store_errors`. A failed write closes the store, which is opened again at most
//! once per second ([`crate::sled_reopen`]: sled would otherwise refuse every write until a
//! restart), so once the disk has room the next request is answered again; the failures are
//! logged at most once per 10 s. Opening again is what a restart does: every answered change was
//! flushed and is there; state from readings not yet flushed may be gone (the next reading
//! brings it back). With the cloud in step ([`sync`]), what waits for the cloud is read from the
//! reopened store again and, online, every cloud shadow is fetched again (a desired change from
//! the cloud may not have been flushed).

pub mod document;
pub mod sync;

pub use document::{Document, Limits, Rejection, Updated};

use crate::pipeline::{Ack, LocalPublisher};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Named shadows one thing may have at a time.
pub const MAX_NAMED_PER_THING: usize = 16;
/// Requests waiting for the shadow task.
pub const REQUEST_CHANNEL_CAPACITY: usize = 256;
/// Requests of one thing waiting for the shadow task at most (IoT Core's in-flight limit).
pub const MAX_IN_FLIGHT_PER_THING: usize = 10;
/// How long an update made from readings alone may wait for its flush (the readings
/// themselves are durable in the queue; a kill -9 loses at most this much of the reported
/// state, which the device's next reading restores).
const REPORT_FLUSH_MS: u64 = 1000;
/// Reported state from readings is applied at most this often.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// Requests applied under one flush at most.
const MAX_GROUP: usize = 64;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `/update`.
    Update,
    /// `/get`.
    Get,
    /// `/delete`.
    Delete,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Update => "update",
            Op::Get => "get",
            Op::Delete => "delete",
        }
    }
}

/// A shadow request's address, from its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Thing name.
    pub thing: String,
    /// Named shadow (`None`: the classic shadow).
    pub name: Option<String>,
    /// The operation.
    pub op: Op,
}

impl Address {
    /// The request a topic names: `Some` for `$aws/things/<thing>/shadow/<op>` and
    /// `$aws/things/<thing>/shadow/name/<name>/<op>`, `None` for any other topic (replies such
    /// as `/update/accepted` included).
    pub fn parse(topic: &str) -> Option<Self> {
        let rest = topic.strip_prefix("$aws/things/")?;
        let mut levels = rest.split('/');
        let thing = levels.next()?;
        if levels.next()? != "shadow" {
            return None;
        }
        let (name, op) = match (levels.next()?, levels.next(), levels.next(), levels.next()) {
            (op, None, None, None) => (None, op),
            ("name", Some(name), Some(op), None) => (Some(name.to_owned()), op),
            _ => return None,
        };
        let op = match op {
            "update" => Op::Update,
            "get" => Op::Get,
            "delete" => Op::Delete,
            _ => return None,
        };
        Some(Self {
            thing: thing.to_owned(),
            name,
            op,
        })
    }

    /// The topic prefix of this shadow: `$aws/things/<thing>/shadow[/name/<name>]`.
    pub fn prefix(&self) -> String {
        match &self.name {
            None => format!("$aws/things/{}/shadow", self.thing),
            Some(n) => format!("$aws/things/{}/shadow/name/{n}", self.thing),
        }
    }

    /// Name used in a 404's message: the shadow's name, or the thing's for the classic one.
    fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.thing)
    }

    /// The store's key: `<thing>` NUL `<name>` (empty for the classic shadow).
    fn key(&self) -> Vec<u8> {
        let mut k = self.thing.as_bytes().to_vec();
        k.push(0);
        if let Some(n) = &self.name {
            k.extend_from_slice(n.as_bytes());
        }
        k
    }

    /// A thing name of 1–128 `[a-zA-Z0-9:_-]`, a shadow name of 1–64 `[$a-zA-Z0-9:_-]`
    /// (AWS's rules); `Err` with the 400 message otherwise.
    fn check(&self) -> Result<(), String> {
        let ok = |s: &str, max: usize, extra: &[u8]| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":_-".contains(&b) || extra.contains(&b))
        };
        if !ok(&self.thing, 128, b"") {
            return Err(
                "Invalid thing name: 1 to 128 characters of a-z, A-Z, 0-9, ':', '_', '-'".into(),
            );
        }
        if let Some(n) = &self.name {
            if !ok(n, 64, b"$") {
                return Err(
                    "Invalid shadow name: 1 to 64 characters of a-z, A-Z, 0-9, '$', ':', '_', '-'"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// One request for the shadow task.
#[derive(Debug)]
struct Job {
    address: Address,
    body: Body,
    device_id: Arc<str>,
    ack: Option<Ack>,
}

/// What a job asks.
#[derive(Debug)]
enum Body {
    /// A device's request payload, as published.
    Request(Bytes),
    /// Reported state the gateway made from the device's readings (an update, merged as
    /// [`Document::report`] merges it: no payload to parse).
    Report(serde_json::Map<String, serde_json::Value>),
    /// The cloud's desired state of the thing's classic shadow ([`sync`]).
    Cloud {
        version: Option<u64>,
        desired: Option<serde_json::Value>,
        fetched: bool,
    },
    /// A desired change from the cloud, applied as an update (never sent back up).
    FromCloud(serde_json::Value),
}

/// Documents changed by the group being applied, by store key (`None`: removed).
type Changed = HashMap<Vec<u8>, Option<Document>>;

/// Sync states changed by the group being applied, by thing.
type SyncChanged = HashMap<String, sync::SyncState>;

/// Store keys of sync states start with this byte (no thing name can: see [`Address::check`]).
const SYNC_PREFIX: &[u8] = &[1];

/// Add `thing`'s sync state to `batch` (plain data with string keys: serialising it cannot
/// fail).
fn put_sync(batch: &mut sled::Batch, thing: &str, state: &sync::SyncState) {
    batch.insert(
        sync_key(thing),
        serde_json::to_vec(state).unwrap_or_default(),
    );
}

fn sync_key(thing: &str) -> Vec<u8> {
    let mut k = SYNC_PREFIX.to_vec();
    k.extend_from_slice(thing.as_bytes());
    k
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShadowCounts {
    /// Requests accepted.
    pub accepted: u64,
    /// Requests rejected (any code).
    pub rejected: u64,
    /// Of those, rejected with 429: more than [`MAX_IN_FLIGHT_PER_THING`] in flight.
    #[serde(default)]
    pub too_many: u64,
    /// Store writes that failed.
    pub store_errors: u64,
    /// Reported-state updates made from readings.
    pub reports: u64,
    /// Shadow updates queued for the cloud ([`sync`]).
    #[serde(default)]
    pub synced: u64,
}

/// Counters, readable from anywhere.
#[derive(Debug, Default)]
pub struct ShadowStats {
    /// Requests accepted.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Requests rejected (any code).
    pub rejected: std::sync::atomic::AtomicU64,
    /// Of those, rejected with 429.
    pub too_many: std::sync::atomic::AtomicU64,
    /// Store writes that failed (those requests got no reply and no PUBACK).
    pub store_errors: std::sync::atomic::AtomicU64,
    /// Reported-state updates made from readings.
    pub reports: std::sync::atomic::AtomicU64,
    /// Shadow updates queued for the cloud.
    pub synced: std::sync::atomic::AtomicU64,
}

impl ShadowStats {
    /// The counters now.
    pub fn snapshot(&self) -> ShadowCounts {
        use std::sync::atomic::Ordering::Relaxed;
        ShadowCounts {
            accepted: self.accepted.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            too_many: self.too_many.load(Relaxed),
            store_errors: self.store_errors.load(Relaxed),
            reports: self.reports.load(Relaxed),
            synced: self.synced.load(Relaxed),
        }
    }
}

/// The entrance to the shadow service (cheap to clone).
#[derive(Debug, Clone)]
pub struct Shadows {
    tx: mpsc::Sender<Job>,
    stats: Arc<ShadowStats>,
    reports: Arc<Reports>,
    in_flight: Arc<InFlight>,
    publisher: Arc<LocalPublisher>,
    rules: Arc<crate::rules::Rules>,
}

/// Device requests waiting for the service, per thing.
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl InFlight {
    /// Count one more for `thing`, unless it has [`MAX_IN_FLIGHT_PER_THING`] already.
    fn take(&self, thing: &str) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(thing.to_string()).or_default();
        if *n >= MAX_IN_FLIGHT_PER_THING {
            return false;
        }
        *n += 1;
        true
    }

    /// One of `thing`'s requests left the queue.
    fn give(&self, thing: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(thing) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(thing);
            }
        }
    }
}

/// Reported state from readings, waiting for the service: one merged entry per device.
#[derive(Debug, Default)]
struct Reports {
    pending: std::sync::Mutex<
        std::collections::HashMap<Arc<str>, serde_json::Map<String, serde_json::Value>>,
    >,
    ready: tokio::sync::Notify,
}

/// The service has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl Shadows {
    /// Hand a request over; its `ack` is confirmed once the request was answered (an accepted
    /// change on disk first). Waits while the service is [`REQUEST_CHANNEL_CAPACITY`] behind.
    pub async fn submit(
        &self,
        address: Address,
        payload: Bytes,
        device_id: Arc<str>,
        ack: Option<Ack>,
    ) -> Result<(), Stopped> {
        if !self.in_flight.take(&address.thing) {
            self.too_many(address, &payload, device_id, ack).await;
            return Ok(());
        }
        let thing = address.thing.clone();
        let sent = self
            .tx
            .send(Job {
                address,
                body: Body::Request(payload),
                device_id,
                ack,
            })
            .await;
        if sent.is_err() {
            self.in_flight.give(&thing);
            return Err(Stopped);
        }
        Ok(())
    }

    /// Answer a request over the thing's in-flight limit: 429 on its `/rejected` topic, seen
    /// by the rules like any rejection, and acknowledged (it was answered).
    async fn too_many(
        &self,
        address: Address,
        payload: &[u8],
        device_id: Arc<str>,
        ack: Option<Ack>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.rejected.fetch_add(1, Relaxed);
        self.stats.too_many.fetch_add(1, Relaxed);
        log::debug!(
            device_id:% = device_id, thing:% = address.thing, op = address.op.as_str(), code = 429;
            "shadow {} rejected: 429 more than {MAX_IN_FLIGHT_PER_THING} requests in flight", address.op.as_str()
        );
        let now_s = crate::clock::now_ms() / 1000;
        let rejection = Rejection {
            code: 429,
            message: "Too Many Requests".into(),
            client_token: client_token(payload),
        };
        let reply = Reply::rejected(&address, &rejection, now_s);
        publish_replies(
            &self.rules,
            &self.publisher,
            vec![reply],
            &device_id,
            now_s * 1000,
            ack,
        )
        .await;
    }

    /// A device's canonical readings, as its classic shadow's reported state: each metric
    /// becomes a key with `-` turned into `_` (`heart-rate` → `heart_rate`), its value the
    /// reading's value (the last reading of a metric wins). Rules see the resulting
    /// `/update/accepted`, so one rule can watch a shadow device and a plugin device alike.
    ///
    /// Never waits, never drops: reports wait in a map with one entry per device, merged
    /// until the service takes them all, at most every 100 ms (at most one pending update
    /// per device, so the map is bounded by the registry and a flood of readings costs one
    /// update per device per 100 ms, not one per reading). The reading itself is queued for
    /// the upstream regardless.
    pub fn report(&self, device_id: &Arc<str>, readings: &[crate::plugin_host::Reading]) {
        let mut fields = serde_json::Map::new();
        for r in readings {
            if let Some(n) = serde_json::Number::from_f64(r.value) {
                fields.insert(r.metric.replace('-', "_"), serde_json::Value::Number(n));
            }
        }
        if fields.is_empty() {
            return;
        }
        {
            let mut pending = self
                .reports
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            pending.entry(device_id.clone()).or_default().extend(fields);
        }
        self.reports.ready.notify_one();
    }

    /// The counters (shared: they outlive this entrance).
    pub fn stats(&self) -> Arc<ShadowStats> {
        self.stats.clone()
    }
}

pub use crate::sled_reopen::StoreError;

/// What a failure of the shadow store means, for the journal.
const STORE_FAILURE: &str = "device shadow requests are not answered or acknowledged until it works again (QoS 1 devices resend them)";

/// The open database of the [`Store`].
#[derive(Debug)]
struct Handles {
    db: sled::Db,
    tree: sled::Tree,
}

impl crate::sled_reopen::Handles for Handles {
    fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// The stored shadows (sled, one value per shadow: its [`Document`] as JSON). Cheap to clone:
/// every clone uses the same database, which is closed and opened again after a write error
/// ([`crate::sled_reopen`]).
#[derive(Debug, Clone)]
pub struct Store {
    db: crate::sled_reopen::Reopening<Handles>,
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: crate::sled_reopen::Reopening::open(
                "shadow store",
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
            .mode(sled::Mode::LowSpace)
            // Groups with device requests flush before they answer; updates made from
            // readings alone are flushed with the next such group or within this interval.
            .flush_every_ms(Some(REPORT_FLUSH_MS))
            .open()?;
        let tree = db.open_tree("shadows")?;
        Ok(Handles { db, tree })
    }

    /// The stored document of a shadow (`Default` when there is none, or when what is stored
    /// cannot be decoded: that is logged, and the next accepted update replaces it). `Err` when
    /// the store cannot be read (closed after a write error): nothing may be answered from it.
    fn get(&self, address: &Address) -> Result<Document, StoreError> {
        let stored = self.db.read(|h| h.tree.get(address.key()))?;
        Ok(match stored {
            Some(v) => serde_json::from_slice(&v).unwrap_or_else(|e| {
                log::error!(thing:% = address.thing, shadow:% = address.display_name(), error:% = e;
                    "stored shadow cannot be read; it is treated as absent and the next update replaces it");
                Document::default()
            }),
            None => Document::default(),
        })
    }

    /// The sync state of `thing`'s classic shadow (default when none is stored or it cannot
    /// be decoded: that is logged). `Err` when the store cannot be read.
    fn get_sync(&self, thing: &str) -> Result<sync::SyncState, StoreError> {
        let stored = self.db.read(|h| h.tree.get(sync_key(thing)))?;
        Ok(match stored {
            Some(v) => serde_json::from_slice(&v).unwrap_or_else(|e| {
                log::error!(thing:% = thing, error:% = e; "stored shadow sync state cannot be read; the cloud copy is fetched afresh");
                sync::SyncState::default()
            }),
            None => sync::SyncState::default(),
        })
    }

    /// Whether a sync state of `thing` is stored.
    fn has_sync(&self, thing: &str) -> Result<bool, StoreError> {
        self.db.read(|h| h.tree.contains_key(sync_key(thing)))
    }

    /// Write `batch` (not flushed).
    fn apply(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.db.write(|h| h.tree.apply_batch(batch))
    }

    /// Make every earlier write durable.
    async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await
    }

    /// Things with a classic shadow or a sync state, and of those with changes waiting for
    /// the cloud (a desired change made here, or a reported state other than the one last
    /// sent), since when.
    fn synced_things(
        &self,
    ) -> Result<(std::collections::BTreeSet<String>, HashMap<String, i64>), StoreError> {
        let (states, reported) = self.db.read(|h| {
            let mut states: HashMap<String, sync::SyncState> = HashMap::new();
            let mut reported: HashMap<String, Option<serde_json::Value>> = HashMap::new();
            for item in h.tree.iter() {
                let Ok((k, v)) = item else { continue };
                if let Some(thing) = k.strip_prefix(SYNC_PREFIX) {
                    let thing = String::from_utf8_lossy(thing).into_owned();
                    let s = serde_json::from_slice::<sync::SyncState>(&v).unwrap_or_default();
                    states.insert(thing, s);
                } else if let Some(thing) = k.strip_suffix(&[0u8]) {
                    if !thing.contains(&0) {
                        let doc = serde_json::from_slice::<Document>(&v).unwrap_or_default();
                        reported.insert(
                            String::from_utf8_lossy(thing).into_owned(),
                            reported_of(&doc),
                        );
                    }
                }
            }
            Ok((states, reported))
        })?;
        let mut things = std::collections::BTreeSet::new();
        let mut waiting = HashMap::new();
        for (thing, s) in &states {
            let now = reported.get(thing).cloned().flatten();
            if s.waiting() || s.reported_changed(now.as_ref()) {
                waiting.insert(thing.clone(), s.waiting_since_ms);
            }
            things.insert(thing.clone());
        }
        for (thing, r) in reported {
            if !states.contains_key(&thing) && r.is_some() {
                waiting.insert(thing.clone(), 0);
            }
            things.insert(thing);
        }
        Ok((things, waiting))
    }

    /// Named shadows of `thing` that exist now: those stored, as the group being applied
    /// (`changed`, not yet written) leaves them.
    fn named_count(&self, thing: &str, changed: &Changed) -> Result<usize, StoreError> {
        let mut prefix = thing.as_bytes().to_vec();
        prefix.push(0);
        let named = |k: &[u8]| k.len() > prefix.len() && k.starts_with(&prefix);
        let mut names: std::collections::HashSet<Vec<u8>> = self.db.read(|h| {
            Ok(h.tree
                .scan_prefix(&prefix)
                .keys()
                .filter_map(Result::ok)
                .filter(|k| named(k))
                .map(|k| k.to_vec())
                .collect())
        })?;
        for (k, doc) in changed.iter().filter(|(k, _)| named(k)) {
            if doc.as_ref().is_some_and(Document::exists) {
                names.insert(k.clone());
            } else {
                names.remove(k);
            }
        }
        Ok(names.len())
    }
}

/// One reply to publish.
struct Reply {
    topic: String,
    payload: Vec<u8>,
}

impl Reply {
    /// The error document on the request's `/rejected` topic.
    fn rejected(address: &Address, rejection: &Rejection, now_s: i64) -> Self {
        Reply {
            topic: format!("{}/{}/rejected", address.prefix(), address.op.as_str()),
            payload: rejection.to_json(now_s).to_string().into_bytes(),
        }
    }
}

/// Publish one request's replies and confirm it. Rules see the replies as AWS rules see the
/// shadow service's messages; an alert a rule queues joins the request's acknowledgement.
async fn publish_replies(
    rules: &crate::rules::Rules,
    publisher: &LocalPublisher,
    replies: Vec<Reply>,
    device_id: &str,
    at_ms: i64,
    mut ack: Option<Ack>,
) {
    for r in replies {
        rules
            .apply(
                crate::rules::Message {
                    topic: &r.topic,
                    payload: &r.payload,
                    device_id,
                    received_at_ms: at_ms,
                },
                &mut ack,
            )
            .await;
        publisher.publish_wanted(&r.topic, r.payload).await;
    }
    if let Some(a) = ack {
        a.confirm();
    }
}

/// The shadow task and its entrance. The task ends when every entrance is gone; it beats
/// `beat` after every group and on an idle tick (a store flush that hangs shows as a stall).
/// With `link` (an upstream whose shadow topic is a shadow update topic), classic shadows are
/// kept in step with the cloud ([`sync`]).
pub fn service(
    store: Store,
    publisher: Arc<LocalPublisher>,
    rules: Arc<crate::rules::Rules>,
    link: Option<sync::ShadowLink>,
    beat: crate::supervisor::Heartbeat,
) -> (Shadows, impl std::future::Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(REQUEST_CHANNEL_CAPACITY);
    let stats = Arc::new(ShadowStats::default());
    let reports = Arc::new(Reports::default());
    let in_flight = Arc::new(InFlight::default());
    let run = run(
        Service {
            store,
            publisher: publisher.clone(),
            rules: rules.clone(),
            stats: stats.clone(),
            reports: reports.clone(),
            in_flight: in_flight.clone(),
            link,
        },
        rx,
        beat,
    );
    (
        Shadows {
            tx,
            stats,
            reports,
            in_flight,
            publisher,
            rules,
        },
        run,
    )
}

/// What the shadow task works with.
struct Service {
    store: Store,
    publisher: Arc<LocalPublisher>,
    rules: Arc<crate::rules::Rules>,
    stats: Arc<ShadowStats>,
    reports: Arc<Reports>,
    in_flight: Arc<InFlight>,
    link: Option<sync::ShadowLink>,
}

/// The cloud side, as the shadow task sees it.
struct Cloud {
    link: sync::ShadowLink,
    /// A session with the upstream is up.
    online: bool,
    /// Things whose cloud shadow was fetched in this session.
    fetched: std::collections::HashSet<String>,
    /// Things whose cloud shadow was asked for in this session.
    requested: std::collections::HashSet<String>,
    /// Things with changes waiting for the cloud, since when (ms).
    waiting: HashMap<String, i64>,
}

impl Cloud {
    /// Ask the cloud for the shadow of every synchronised thing (a new session, or a store
    /// opened again that may have lost what it last heard from the cloud); how many.
    fn fetch_all(&mut self, store: &Store) -> usize {
        self.fetched.clear();
        self.requested.clear();
        // A store that cannot be read fetches nothing now; its reopening fetches again.
        let things = store.synced_things().map(|(t, _)| t).unwrap_or_default();
        let n = things.len();
        for t in things {
            self.requested.insert(t.clone());
            let _ = self.link.fetch.send(t);
        }
        n
    }

    /// The store was opened again after a write error: what was written but not flushed is
    /// gone (sync states included), so what waits for the cloud is read again from the disk
    /// (added to what waits already: a change sent twice is harmless) and, online, every
    /// cloud shadow is fetched again (a desired change applied from the cloud may be lost).
    fn reopened(&mut self, store: &Store) {
        if let Ok((_, waiting)) = store.synced_things() {
            for (thing, since) in waiting {
                self.waiting.entry(thing).or_insert(since);
            }
        }
        if self.online {
            let n = self.fetch_all(store);
            log::info!(shadows = n; "shadow store opened again after a write error: fetching {n} cloud shadows");
        }
    }

    /// Queue the waiting changes of at most [`sync::Pace::per_tick`] things, oldest first;
    /// a thing's state is updated only once its record is on disk in the queue.
    async fn send_waiting(&mut self, store: &Store, stats: &ShadowStats) {
        let mut due: Vec<(i64, String)> = self
            .waiting
            .iter()
            .map(|(t, since)| (*since, t.clone()))
            .collect();
        due.sort();
        let mut sent = Vec::new();
        for (_, thing) in due {
            if sent.len() >= self.link.pace.per_tick {
                break;
            }
            // A store that cannot be read: the rest waits for the next round.
            let Ok(mut state) = store.get_sync(&thing) else {
                break;
            };
            let Ok(doc) = store.get(&Address {
                thing: thing.clone(),
                name: None,
                op: Op::Get,
            }) else {
                break;
            };
            let reported = reported_of(&doc);
            let Some(update) = state.take_update(reported.as_ref(), self.fetched.contains(&thing))
            else {
                // Nothing to send: done, unless a desired change waits for the fetch.
                if !state.waiting() {
                    self.waiting.remove(&thing);
                }
                continue;
            };
            let record = crate::queue::Record {
                class: crate::queue::Class::Routine,
                stream: crate::queue::Stream::Shadow,
                subject: thing.clone(),
                enqueued_at_ms: crate::clock::now_ms(),
                payload: update.to_string().into_bytes(),
            };
            let (ack, durable) = Ack::new();
            if !self.link.queue.push(record, Some(ack)).await {
                return;
            }
            sent.push((thing, state, durable));
        }
        if sent.is_empty() {
            return;
        }
        let mut batch = sled::Batch::default();
        for (thing, state, durable) in sent {
            if durable.await.is_err() {
                // Not on disk: the change stays waiting and goes with the next round.
                continue;
            }
            if state.waiting() {
                self.waiting.insert(thing.clone(), state.waiting_since_ms);
            } else {
                self.waiting.remove(&thing);
            }
            put_sync(&mut batch, &thing, &state);
            stats
                .synced
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Err(e) = store.apply(batch) {
            // The records are queued; the states on disk say they wait: they go again once the
            // store is opened again (a duplicate update of the same values). The store logs its
            // failures, at most one line per 10 s.
            log::debug!(error:% = e; "shadow store write failed after queueing shadow updates for the cloud; they will be sent again");
        }
    }
}

async fn run(service: Service, mut rx: mpsc::Receiver<Job>, beat: crate::supervisor::Heartbeat) {
    let Service {
        store,
        publisher,
        rules,
        stats,
        reports,
        in_flight,
        link,
    } = service;
    use std::sync::atomic::Ordering::Relaxed;
    let limits = Limits::default();
    let mut jobs = Vec::with_capacity(MAX_GROUP);
    let mut idle = crate::supervisor::Heartbeat::ticker();
    // When the waiting reports are taken: at most every REPORT_EVERY, so a flood of readings
    // costs one update per device per interval (and none waits longer than it).
    let mut reports_due: Option<tokio::time::Instant> = None;
    let mut reports_taken = tokio::time::Instant::now() - REPORT_EVERY;
    let mut cloud = link.map(|link| Cloud {
        link,
        online: false,
        fetched: Default::default(),
        requested: Default::default(),
        waiting: store.synced_things().map(|(_, w)| w).unwrap_or_default(),
    });
    // The store's generation whose contents the in-memory state was made from.
    let mut generation = store.db.generation();
    let tick = cloud
        .as_ref()
        .map_or(std::time::Duration::from_secs(1), |c| c.link.pace.tick);
    let mut send_tick = tokio::time::interval(tick);
    send_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        beat.beat();
        if store.db.generation() != generation {
            generation = store.db.generation();
            if let Some(c) = cloud.as_mut() {
                c.reopened(&store);
            }
        }
        let mut closed = false;
        let mut take_reports = false;
        let sending = cloud
            .as_ref()
            .is_some_and(|c| c.online && !c.waiting.is_empty());
        tokio::select! {
            // Cancel-safe: nothing is taken from the channel unless it returns.
            n = rx.recv_many(&mut jobs, MAX_GROUP) => closed = n == 0,
            () = reports.ready.notified(), if reports_due.is_none() => {
                reports_due = Some(reports_taken + REPORT_EVERY);
                continue;
            }
            () = tokio::time::sleep_until(reports_due.unwrap_or_else(tokio::time::Instant::now)), if reports_due.is_some() => {
                take_reports = true;
            }
            Some(event) = async { cloud.as_mut()?.link.events.recv().await }, if cloud.is_some() => {
                let Some(c) = cloud.as_mut() else { continue };
                match event {
                    sync::CloudEvent::Connected => {
                        c.online = true;
                        let n = c.fetch_all(&store);
                        log::info!(shadows = n; "upstream connected: fetching {n} cloud shadows");
                    }
                    sync::CloudEvent::Disconnected => {
                        c.online = false;
                        c.fetched.clear();
                        c.requested.clear();
                    }
                    sync::CloudEvent::Desired { thing, version, desired, fetched } => {
                        jobs.push(Job {
                            address: Address { thing: thing.clone(), name: None, op: Op::Update },
                            body: Body::Cloud { version, desired, fetched },
                            device_id: thing.into(),
                            ack: None,
                        });
                    }
                }
                if jobs.is_empty() {
                    continue;
                }
            }
            _ = send_tick.tick(), if sending => {
                if let Some(c) = cloud.as_mut() {
                    c.send_waiting(&store, &stats).await;
                }
                continue;
            }
            _ = idle.tick() => continue,
        }
        // Reported state from readings, one update per device (after the requests that were
        // waiting, which came first).
        let pending = if take_reports || closed {
            reports_due = None;
            reports_taken = tokio::time::Instant::now();
            std::mem::take(&mut *reports.pending.lock().unwrap_or_else(|e| e.into_inner()))
        } else {
            Default::default()
        };
        for (device_id, fields) in pending {
            stats.reports.fetch_add(1, Relaxed);
            jobs.push(Job {
                address: Address {
                    thing: device_id.to_string(),
                    name: None,
                    op: Op::Update,
                },
                body: Body::Report(fields),
                device_id,
                ack: None,
            });
        }
        if jobs.is_empty() {
            if closed {
                break;
            }
            continue;
        }
        let now_ms = crate::clock::epoch_ms(std::time::SystemTime::now());
        let now_s = now_ms / 1000;
        // Documents changed by this group, by key (a later request sees an earlier one's
        // change), and the replies, published only once the changes are on disk.
        let mut changed = Changed::new();
        let mut sync_changed = SyncChanged::new();
        // Per request: its replies, its device and its promise.
        let mut answered = Vec::new();
        // Only device requests are promised an answer after the disk.
        let requests = jobs.iter().any(|j| matches!(j.body, Body::Request(_)));
        // A store that cannot be read (closed after a write error): nothing of the group is
        // answered or written, as when its write fails.
        let mut failed: Option<StoreError> = None;
        for mut job in jobs.drain(..) {
            if matches!(job.body, Body::Request(_)) {
                in_flight.give(&job.address.thing);
            }
            if failed.is_some() {
                continue;
            }
            let mut replies = Vec::new();
            let key = job.address.key();
            let current = match changed.get(&key) {
                Some(Some(d)) => d.clone(),
                Some(None) => Document::default(),
                None => match store.get(&job.address) {
                    Ok(d) => d,
                    Err(e) => {
                        failed = Some(e);
                        continue;
                    }
                },
            };
            // What the cloud should hear of this change, if it is synchronised.
            let mut to_cloud = None;
            if let Some(c) = cloud.as_mut() {
                if job.address.name.is_none() {
                    if let Body::Cloud {
                        version,
                        desired,
                        fetched,
                    } = &mut job.body
                    {
                        let thing = job.address.thing.clone();
                        let known = current.exists()
                            || sync_changed.contains_key(&thing)
                            || match store.has_sync(&thing) {
                                Ok(stored) => stored,
                                Err(e) => {
                                    failed = Some(e);
                                    continue;
                                }
                            };
                        if !known {
                            log::debug!(thing:% = thing; "cloud shadow of a thing without a shadow here: ignored");
                            continue;
                        }
                        let state = match sync_state(&mut sync_changed, &store, &thing) {
                            Ok(s) => s,
                            Err(e) => {
                                failed = Some(e);
                                continue;
                            }
                        };
                        let patch = state.cloud(*version, desired.take());
                        if *fetched {
                            c.fetched.insert(thing.clone());
                        }
                        if state.waiting() {
                            c.waiting
                                .entry(thing.clone())
                                .or_insert(state.waiting_since_ms);
                        }
                        let local = current
                            .desired()
                            .map(|d| serde_json::Value::Object(d.clone()));
                        let Some(change) = patch.and_then(|p| sync::effective(local.as_ref(), &p))
                        else {
                            continue;
                        };
                        log::info!(thing:% = thing, desired:% = change; "desired state changed in the cloud: applied here");
                        job.body = Body::FromCloud(change);
                    } else if c.link.readings || !matches!(job.body, Body::Report(_)) {
                        to_cloud = cloud_change(&job);
                    }
                }
            }
            if matches!(job.body, Body::Cloud { .. }) {
                continue;
            }
            // Named shadows the thing has, when this request could create one.
            let named = if job.address.op == Op::Update
                && job.address.name.is_some()
                && !current.exists()
            {
                match store.named_count(&job.address.thing, &changed) {
                    Ok(n) => n,
                    Err(e) => {
                        failed = Some(e);
                        continue;
                    }
                }
            } else {
                0
            };
            match answer(&mut job, current, now_s, &limits, named) {
                Ok((doc, out)) => {
                    stats.accepted.fetch_add(1, Relaxed);
                    if let Some(doc) = doc {
                        changed.insert(key, doc);
                    }
                    if let (Some(state_change), Some(c)) = (to_cloud, cloud.as_mut()) {
                        let thing = job.address.thing.clone();
                        let (reported, desired) = sync::parts(&state_change);
                        // A reported change is only a mark: what goes up is computed from the
                        // document when the thing's turn comes.
                        if reported.is_some() {
                            c.waiting.entry(thing.clone()).or_insert(now_ms);
                        }
                        if let Some(desired) = desired {
                            let state = match sync_state(&mut sync_changed, &store, &thing) {
                                Ok(s) => s,
                                Err(e) => {
                                    failed = Some(e);
                                    continue;
                                }
                            };
                            state.local_desired(desired, now_ms);
                            c.waiting
                                .entry(thing.clone())
                                .or_insert(state.waiting_since_ms);
                            // A desired change for a shadow not yet fetched in this session
                            // (new here since the connection): its cloud copy is fetched now,
                            // and the change waits for it. (Reported changes need no fetch:
                            // the cloud's later desired changes arrive on /update/documents.)
                            if c.online
                                && !c.fetched.contains(&thing)
                                && c.requested.insert(thing.clone())
                            {
                                let _ = c.link.fetch.send(thing);
                            }
                        }
                    }
                    replies.extend(out);
                }
                Err(rejection) => {
                    stats.rejected.fetch_add(1, Relaxed);
                    log::info!(
                        device_id:% = job.device_id, thing:% = job.address.thing,
                        shadow:% = job.address.display_name(), op = job.address.op.as_str(),
                        code = rejection.code, reason:% = rejection.message;
                        "shadow {} rejected: {} {}", job.address.op.as_str(), rejection.code, rejection.message
                    );
                    replies.push(Reply::rejected(&job.address, &rejection, now_s));
                }
            }
            answered.push((replies, job.device_id, job.ack));
        }
        if let Some(e) = failed {
            stats.store_errors.fetch_add(1, Relaxed);
            log::debug!(error:% = e; "shadow store cannot be read: the group's requests are not answered (QoS 1 devices resend them)");
            continue;
        }
        if !changed.is_empty() || !sync_changed.is_empty() {
            if let Err(e) = write(&store, changed, sync_changed, requests).await {
                // Nothing of this group is confirmed: the QoS 1 requests are resent, and the
                // devices hear nothing they could take for accepted. The store logs its
                // failures (at most one line per 10 s, not one per group) and is opened again.
                stats.store_errors.fetch_add(1, Relaxed);
                log::debug!(error:% = e; "shadow store write failed: the group's requests are not acknowledged (QoS 1 devices resend them)");
                continue;
            }
        }
        for (replies, device_id, ack) in answered {
            publish_replies(&rules, &publisher, replies, &device_id, now_s * 1000, ack).await;
        }
        if closed {
            break;
        }
    }
    if let Err(e) = store.flush().await {
        log::error!(error:% = e; "shadow store: final flush failed");
    }
}

/// The sync state of `thing` as the group being applied leaves it (read from the store the
/// first time the group needs it).
fn sync_state<'a>(
    changed: &'a mut SyncChanged,
    store: &Store,
    thing: &str,
) -> Result<&'a mut sync::SyncState, StoreError> {
    Ok(match changed.entry(thing.to_owned()) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(store.get_sync(thing)?),
    })
}

/// A document's reported state, as the cloud copy should have it (`None`: none, or no shadow).
fn reported_of(doc: &Document) -> Option<serde_json::Value> {
    if !doc.exists() {
        return None;
    }
    doc.reported().map(|r| serde_json::Value::Object(r.clone()))
}

/// What a change to a classic shadow means for its cloud copy: the request's `state` as sent
/// (`null`: delete everything), or `None` if it changes nothing the cloud keeps.
fn cloud_change(job: &Job) -> Option<serde_json::Value> {
    match (&job.body, job.address.op) {
        (Body::Request(p), Op::Update) => {
            let v: serde_json::Value = serde_json::from_slice(p).ok()?;
            v.get("state").cloned()
        }
        // Only that reported changed matters (see [`sync::SyncState`]).
        (Body::Report(_), Op::Update) => Some(serde_json::json!({ "reported": {} })),
        (Body::Request(_), Op::Delete) => Some(serde_json::Value::Null),
        _ => None,
    }
}

async fn write(
    store: &Store,
    changed: Changed,
    sync_changed: SyncChanged,
    flush: bool,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for (k, doc) in changed {
        match doc {
            // Plain data with string keys: serialising it cannot fail.
            Some(d) => batch.insert(k, serde_json::to_vec(&d).unwrap_or_default()),
            None => batch.remove(k),
        }
    }
    for (thing, state) in sync_changed {
        put_sync(&mut batch, &thing, &state);
    }
    store.apply(batch)?;
    if flush {
        store.flush().await?;
    }
    Ok(())
}

/// A document to store (`Some(None)`: remove it) and the replies of one request.
type Answer = (Option<Option<Document>>, Vec<Reply>);

/// Apply `job` to `doc`; `named`: the named shadows its thing has, when the job could create
/// one (an update of a named shadow that does not exist).
fn answer(
    job: &mut Job,
    mut doc: Document,
    now_s: i64,
    limits: &Limits,
    named: usize,
) -> Result<Answer, Rejection> {
    let a = &job.address;
    let payload: &[u8] = match &job.body {
        Body::Request(p) => p,
        Body::Report(_) | Body::Cloud { .. } | Body::FromCloud(_) => &[],
    };
    let token = || client_token(payload);
    a.check().map_err(|message| Rejection {
        code: 400,
        message,
        client_token: token(),
    })?;
    let prefix = a.prefix();
    let reply = |suffix: &str, v: &serde_json::Value| Reply {
        topic: format!("{prefix}/{suffix}"),
        payload: v.to_string().into_bytes(),
    };
    match a.op {
        Op::Get => {
            let v = doc.get(payload, now_s, a.display_name(), limits)?;
            Ok((None, vec![reply("get/accepted", &v)]))
        }
        Op::Delete => {
            let v = doc.delete(payload, now_s, a.display_name(), limits)?;
            let keep = if a.name.is_some() { None } else { Some(doc) };
            Ok((Some(keep), vec![reply("delete/accepted", &v)]))
        }
        Op::Update => {
            if a.name.is_some() && !doc.exists() && named >= MAX_NAMED_PER_THING {
                return Err(Rejection {
                    code: 400,
                    message: format!(
                        "Too many named shadows for thing '{}': the limit is {MAX_NAMED_PER_THING}; delete one first",
                        a.thing
                    ),
                    client_token: token(),
                });
            }
            let Updated {
                accepted,
                delta,
                documents,
            } = match &mut job.body {
                Body::Request(p) => doc.update(p, now_s, limits)?,
                Body::Report(fields) => doc.report(std::mem::take(fields), now_s, limits)?,
                Body::FromCloud(desired) => {
                    let request = serde_json::json!({ "state": { "desired": desired } });
                    doc.update(request.to_string().as_bytes(), now_s, limits)?
                }
                // Turned into a change (or nothing) before it gets here.
                Body::Cloud { .. } => return Ok((None, Vec::new())),
            };
            let mut out = vec![reply("update/accepted", &accepted)];
            if let Some(d) = delta {
                out.push(reply("update/delta", &d));
            }
            out.push(reply("update/documents", &documents));
            Ok((Some(Some(doc)), out))
        }
    }
}

/// The request's `clientToken`, when it is a JSON object with a string one.
fn client_token(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("clientToken")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_parse_and_replies_do_not() {
        let a = Address::parse("$aws/things/pm-01/shadow/update").unwrap();
        assert_eq!(
            (a.thing.as_str(), a.name.as_deref(), a.op),
            ("pm-01", None, Op::Update)
        );
        let a = Address::parse("$aws/things/pm-01/shadow/name/config/get").unwrap();
        assert_eq!(
            (a.thing.as_str(), a.name.as_deref(), a.op),
            ("pm-01", Some("config"), Op::Get)
        );
        assert_eq!(a.prefix(), "$aws/things/pm-01/shadow/name/config");
        for t in [
            "$aws/things/pm-01/shadow/update/accepted",
            "$aws/things/pm-01/shadow/get/rejected",
            "$aws/things/pm-01/shadow/name/config/update/delta",
            "$aws/things/pm-01/shadow/name/config",
            "$aws/things/pm-01/defender/metrics/json",
            "$aws/things/pm-01/shadow/frobnicate",
            "ward/pm-01/telemetry",
        ] {
            assert_eq!(Address::parse(t), None, "{t}");
        }
    }

    /// A shadow update as a device sends it, on `thing`'s classic shadow, reporting `n` (and
    /// about 1 KiB more); whether it was answered and accepted (its PUBACK is due).
    async fn updated(shadows: &Shadows, thing: &str, n: u32) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let before = shadows.stats.accepted.load(Relaxed);
        let address = Address::parse(&format!("$aws/things/{thing}/shadow/update")).unwrap();
        let payload = format!(
            r#"{{"state":{{"reported":{{"n":{n},"pad":"{}"}}}},"clientToken":"t-{n}"}}"#,
            "x".repeat(1000)
        );
        let (ack, answered) = Ack::new();
        shadows
            .submit(address, Bytes::from(payload), Arc::from(thing), Some(ack))
            .await
            .expect("shadow service running");
        answered.await.is_ok() && shadows.stats.accepted.load(Relaxed) == before + 1
    }

    /// The `n` of `thing`'s stored reported state (`Err`: the store cannot be read).
    fn stored_n(store: &Store, thing: &str) -> Result<Option<u64>, StoreError> {
        let doc = store.get(&Address {
            thing: thing.into(),
            name: None,
            op: Op::Get,
        })?;
        Ok(doc
            .reported()
            .and_then(|r| r.get("n"))
            .and_then(|n| n.as_u64()))
    }

    fn reported_n(store: &Store, thing: &str) -> Option<u64> {
        stored_n(store, thing).unwrap()
    }

    /// sled keeps a write error for good: the store is closed and opened again, so once the
    /// full disk has room, a device's shadow update is answered again, with no restart.
    #[tokio::test]
    async fn a_full_disk_stops_shadow_answers_and_room_brings_them_back_without_a_restart() {
        use crate::sled_reopen::testing::SmallDisk;
        let dir = tempfile::tempdir().unwrap();
        let disk = SmallDisk::new(&dir.path().join("small"), "4m");
        let path = disk.0.join("shadows");
        let store = Store::open(&path).unwrap();
        let broker = crate::broker::start(
            &crate::config::BrokerConfig {
                address: "127.0.0.1:0".parse().unwrap(),
                ..Default::default()
            },
            &crate::config::LimitsConfig::default(),
        )
        .await
        .unwrap();
        let publisher = Arc::new(LocalPublisher::new(&broker));
        let (shadows, run) = service(
            store.clone(),
            publisher,
            Arc::default(),
            None,
            crate::supervisor::Heartbeat::detached(),
        );
        let task = tokio::spawn(run);
        // Other devices' shadows, answered before the disk fills.
        for bed in 0..10u32 {
            assert!(updated(&shadows, &format!("bed-{bed}"), bed).await);
        }
        let (mut n, mut answered) = (0u32, 0u32);
        for _ in 0..20 {
            n += 1;
            assert!(updated(&shadows, "pm-01", n).await, "disk has room");
            answered = n;
        }
        disk.fill("filler");
        // Updates go on until one is not answered (sled may still have room it already took).
        let mut refused = false;
        for _ in 0..100_000 {
            n += 1;
            if !updated(&shadows, "pm-01", n).await {
                refused = true;
                break;
            }
            answered = n;
        }
        assert!(refused, "an update was answered with the disk full");
        assert!(shadows.stats().snapshot().store_errors > 0);
        // The error says what, where and what to do.
        let e = store.apply(sled::Batch::default()).unwrap_err().to_string();
        SmallDisk::assert_explains(&e, "shadow store", &path);
        // Still not answered while the disk is full, across tries to open the store again.
        let until = std::time::Instant::now() + crate::sled_reopen::REOPEN_EVERY * 3;
        while std::time::Instant::now() < until {
            n += 1;
            assert!(
                !updated(&shadows, "pm-01", n).await,
                "answered with the disk full"
            );
        }
        disk.free("filler");
        // Every answered update is on disk (one not answered may be too: its write can have
        // reached the disk before the error), read once the store is open again by itself.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let stored = loop {
            match stored_n(&store, "pm-01") {
                Ok(n) => break n,
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "still closed 60 s after freeing the disk: {e}"
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert!(stored >= Some(u64::from(answered)), "answered update lost");
        // Room again: the device's update is answered again, with no restart.
        loop {
            n += 1;
            if updated(&shadows, "pm-01", n).await {
                answered = n;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no update answered within 60 s of freeing the disk"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for _ in 0..20 {
            n += 1;
            assert!(updated(&shadows, "pm-01", n).await, "after recovery");
            answered = n;
        }
        drop(shadows);
        task.await.unwrap();
        let check = |store: &Store| {
            for bed in 0..10u32 {
                assert_eq!(
                    reported_n(store, &format!("bed-{bed}")),
                    Some(u64::from(bed))
                );
            }
            assert_eq!(reported_n(store, "pm-01"), Some(u64::from(answered)));
        };
        check(&store);
        // And from disk, as the next start finds it.
        drop(store);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let again = loop {
            match Store::open(&path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("could not acquire lock"), "{e}");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        check(&again);
    }

    #[test]
    fn names_follow_aws_rules() {
        let ok = Address::parse("$aws/things/Pacemaker-IoT:1_a/shadow/name/$x-1/update").unwrap();
        assert!(ok.check().is_ok());
        let long = format!("$aws/things/{}/shadow/update", "a".repeat(129));
        assert!(Address::parse(&long).unwrap().check().is_err());
        let bad = Address::parse("$aws/things/pm 01/shadow/update").unwrap();
        assert!(bad.check().unwrap_err().contains("thing name"));
        let bad = Address::parse("$aws/things/pm/shadow/name/a.b/update").unwrap();
        assert!(bad.check().unwrap_err().contains("shadow name"));
    }
}
