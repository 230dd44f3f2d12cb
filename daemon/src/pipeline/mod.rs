//! The pipeline: what happens to every accepted device PUBLISH, in the device's order.
//!
//! The gatekeeper hands each PUBLISH over as an [`Ingest`] through an [`IngestSender`]. A QoS 1
//! reading carries an [`Ack`]: the device gets its PUBACK only after the pipeline has
//! confirmed the reading is safe: handled by the pipeline, and — when the upstream is enabled —
//! written to disk by the durable queue. An `Ack` dropped without confirming means "not safe":
//! no PUBACK, and the device resends. When the queue writer cannot take more, the device's
//! connection waits in [`IngestSender::send`] and is not read meanwhile: backpressure, never
//! loss.
//!
//! Where it runs: in the connection's own task, not in a pipeline task of its own. A serial
//! pipeline task held every device's readings to one core and cost two task switches per
//! reading (connection → pipeline → queue writer); in-line, the stages of different devices run
//! side by side on every core, one device's readings are still handled one after the other (its
//! connection reads the next packet only when the last is handled), and the only hand-over left
//! is the queue writer's group commit, which needs one.
//!
//! Stages, in `Core::handle`: the device's plugin normalises the raw payload
//! ([`crate::plugin_host`]); the readings are published on the local broker as canonical JSON on
//! `ward/<device>/readings` for local consumers, when one subscribes to that topic
//! ([`crate::broker::Interest`]); a message the plugin fails or refuses is
//! handed, with the reason and the device's `Ack`, to the dead-letter writer
//! ([`dead_letter`]), which confirms it once it is on disk — the pipeline does not wait for
//! that, so one device sending garbage does not hold up anyone else's readings; with the
//! upstream enabled, the canonical message goes into the durable queue ([`crate::queue`]),
//! which confirms it once it is on disk. Then, and only then, the device gets its PUBACK.
//! (Shadows and rules hang off the same place.)
//!
//! What must stay true: the pipeline stage ([`Pipeline::run`]) ends only when every entrance is
//! gone (all device connections closed), so a stop has handled everything accepted so far, and
//! the queue writer ends after it. It is a fatal stage of the [`crate::supervisor`]: it beats
//! its heartbeat while messages finish or none waits, so one message stuck for longer than the
//! stall threshold (a queue writer that takes nothing) shows as a stalled pipeline and stops the
//! watchdog.

pub mod dead_letter;

pub use dead_letter::{DeadLetter, DeadLetterSender, DeadLetters};

use crate::broker::BrokerHandle;
use crate::plugin_host::{Input, Normalized, PluginHost};
use crate::registry::Device;
use bytes::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// How often the pipeline writes a one-line summary to the log.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// MQTT delivery guarantee of an ingested PUBLISH (IoT Core supports these two only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// QoS 0.
    AtMostOnce,
    /// QoS 1.
    AtLeastOnce,
}

/// One accepted device PUBLISH.
#[derive(Debug)]
pub struct Ingest {
    /// The authenticated device that sent it (never the client's claim alone).
    pub device: Arc<Device>,
    /// Topic it was published to.
    pub topic: String,
    /// Raw payload as the device sent it.
    pub payload: Bytes,
    /// When the gatekeeper received it.
    pub received_at: SystemTime,
    /// Delivery guarantee the device asked for.
    pub qos: Qos,
    /// MQTT packet id (0 for QoS 0).
    pub pkid: u16,
    /// Confirmation owed to the device (QoS 1 only).
    pub ack: Option<Ack>,
}

/// The pipeline's promise to tell the gatekeeper when a QoS 1 reading is safe.
///
/// A message with more than one durable consequence (its reading, and the alert a rule raised
/// on it) [`Ack::split`]s its promise: the device is confirmed once every part is, and never
/// when one part is dropped unconfirmed.
#[derive(Debug)]
pub struct Ack(AckInner);

#[derive(Debug)]
enum AckInner {
    Whole(tokio::sync::oneshot::Sender<()>),
    Part(Part),
}

/// The promise shared by the parts of a split [`Ack`].
#[derive(Debug)]
struct Joint {
    whole: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    parts_left: std::sync::atomic::AtomicUsize,
}

#[derive(Debug)]
struct Part {
    joint: Arc<Joint>,
    confirmed: bool,
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.confirmed {
            // Not safe: the whole is never confirmed (its receiver sees the sender go).
            drop(
                self.joint
                    .whole
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(),
            );
        }
    }
}

impl Ack {
    /// A new promise and the receiver the gatekeeper waits on.
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(AckInner::Whole(tx)), rx)
    }

    /// Two promises in place of this one: the device is confirmed once both are.
    pub fn split(self) -> (Ack, Ack) {
        use std::sync::atomic::Ordering::AcqRel;
        let joint = match self.0 {
            AckInner::Whole(tx) => Arc::new(Joint {
                whole: Mutex::new(Some(tx)),
                parts_left: std::sync::atomic::AtomicUsize::new(2),
            }),
            AckInner::Part(mut p) => {
                // This part becomes two.
                p.joint.parts_left.fetch_add(1, AcqRel);
                p.confirmed = true;
                p.joint.clone()
            }
        };
        let part = |joint: Arc<Joint>| {
            Ack(AckInner::Part(Part {
                joint,
                confirmed: false,
            }))
        };
        (part(joint.clone()), part(joint))
    }

    /// The reading is safe: the device may get its PUBACK.
    pub fn confirm(self) {
        use std::sync::atomic::Ordering::AcqRel;
        match self.0 {
            // The connection may be gone; then the device resends and nothing is lost.
            AckInner::Whole(tx) => {
                let _ = tx.send(());
            }
            AckInner::Part(mut p) => {
                p.confirmed = true;
                if p.joint.parts_left.fetch_sub(1, AcqRel) == 1 {
                    let whole = p
                        .joint
                        .whole
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    if let Some(tx) = whole {
                        let _ = tx.send(());
                    }
                }
            }
        }
    }
}

/// Counters per device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Messages received.
    pub messages: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// Canonical readings produced by its plugin.
    pub readings: u64,
    /// Messages handed to the dead-letter store (a write that then fails is logged as an
    /// ERROR and counted in the store's counters; those messages are not acknowledged).
    pub dead_letters: u64,
}

/// What the pipeline has handled so far; cheap to clone and read from anywhere.
#[derive(Debug, Clone, Default)]
pub struct PipelineStats(Arc<Mutex<BTreeMap<Arc<str>, DeviceCounts>>>);

impl PipelineStats {
    /// Counts for one device.
    pub fn device(&self, id: &str) -> DeviceCounts {
        self.lock().get(id).cloned().unwrap_or_default()
    }

    /// Total messages over all devices.
    pub fn total_messages(&self) -> u64 {
        self.lock().values().map(|c| c.messages).sum()
    }

    /// A copy of every device's counts.
    pub fn snapshot(&self) -> BTreeMap<Arc<str>, DeviceCounts> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Arc<str>, DeviceCounts>> {
        // Counters stay meaningful even if a holder panicked.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the pipeline does with a message.
#[derive(Debug)]
pub struct Stages {
    /// Thing name, stamped on every canonical message.
    pub gateway_id: String,
    /// The plugin host.
    pub plugins: Arc<PluginHost>,
    /// Where failed messages go (the dead-letter writer).
    pub dead_letters: DeadLetterSender,
    /// Publisher on the local broker (`None`: do not publish locally).
    pub local: Option<Arc<LocalPublisher>>,
    /// The shadow service: device shadow requests go there, never to a plugin (`None`: they
    /// are relayed to local subscribers only).
    pub shadows: Option<crate::shadow::Shadows>,
    /// The defender: device agents' Device Defender reports go there (`None`: they are
    /// relayed to local subscribers only).
    pub defender: Option<Arc<crate::defender::Defender>>,
    /// Edge rules: they see every message and every canonical reading.
    pub rules: Arc<crate::rules::Rules>,
    /// The durable queue towards the upstream (`None`: upstream disabled).
    pub queue: Option<crate::queue::Enqueue>,
    /// The ward history: every canonical reading is handed to it, never waited for (`None`:
    /// history disabled).
    pub history: Option<crate::history::Recorder>,
}

/// The canonical message published on `ward/<device>/readings`.
#[derive(Debug, Serialize)]
pub struct Canonical<'a> {
    /// Thing name of the gateway.
    pub gateway_id: &'a str,
    /// Device id.
    pub device_id: &'a str,
    /// Device kind.
    pub kind: &'a str,
    /// Plugin and its version.
    pub plugin: &'a str,
    /// Plugin version.
    pub plugin_version: &'a str,
    /// Topic the raw message came on.
    pub topic: &'a str,
    /// When the gateway received it, ms since the UNIX epoch.
    pub received_at_ms: i64,
    /// The readings.
    pub readings: &'a [crate::plugin_host::Reading],
}

/// A client of the local broker, logged in with the internal secret.
pub struct LocalPublisher {
    client: rumqttc::AsyncClient,
    /// Who listens on the broker: readings nobody subscribes to are not published.
    interest: crate::broker::Interest,
    task: tokio::task::JoinHandle<()>,
    /// Set once its event loop task ended, with how.
    ended: Arc<std::sync::OnceLock<String>>,
}

/// Records how the local publisher's event loop ended (returned, or unwinding a panic).
struct EndGuard(Arc<std::sync::OnceLock<String>>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            "panicked"
        } else {
            "ended"
        };
        let _ = self.0.set(why.to_owned());
    }
}

impl std::fmt::Debug for LocalPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalPublisher")
    }
}

impl Drop for LocalPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalPublisher {
    /// Connect to the internal broker (reconnecting by itself when needed).
    pub fn new(broker: &BrokerHandle) -> Self {
        let login = broker.internal_login();
        let mut o = rumqttc::MqttOptions::new(
            "wardgate-pipeline",
            broker.addr().ip().to_string(),
            broker.addr().port(),
        );
        o.set_credentials(login.username, login.password);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_max_packet_size(
            broker.max_frame_bytes() + 1024,
            broker.max_frame_bytes() + 1024,
        );
        let (client, mut el) = rumqttc::AsyncClient::new(o, 256);
        let ended = Arc::new(std::sync::OnceLock::new());
        let guard = EndGuard(ended.clone());
        let task = tokio::spawn(async move {
            let _guard = guard;
            loop {
                if let Err(e) = el.poll().await {
                    log::warn!(error:% = e; "local publisher lost the internal broker; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Self {
            client,
            interest: broker.interest().clone(),
            task,
            ended,
        }
    }

    /// Why its event loop ended, once it has (it runs until the publisher is dropped). For
    /// [`crate::supervisor::Supervisor::watch_fatal`].
    pub fn ended_probe(&self) -> impl Fn() -> Option<String> + Send + Sync + 'static {
        let ended = self.ended.clone();
        move || ended.get().map(|how| format!("event loop {how}"))
    }

    /// `ward/<device>/readings`, when a local subscriber listens on it (nothing is
    /// formatted while nobody subscribes to anything).
    fn readings_topic(&self, device_id: &str) -> Option<String> {
        if self.interest.is_empty() {
            return None;
        }
        let topic = format!("ward/{device_id}/readings");
        self.interest.wanted(&topic).then_some(topic)
    }

    /// Publish on the broker's own name of a topic (see [`crate::broker::inside`]).
    async fn publish(&self, topic: String, payload: Vec<u8>, qos: rumqttc::QoS) {
        if let Err(e) = self.client.publish(topic, qos, false, payload).await {
            log::warn!(error:% = e; "cannot publish on the local broker");
        }
    }

    /// Publish `payload` on `topic` (as devices name it; `$aws/...` included) at QoS 1 when a
    /// local subscriber's filter matches it; whether it was published.
    pub async fn publish_wanted(&self, topic: &str, payload: Vec<u8>) -> bool {
        self.publish_wanted_qos(topic, payload, 1).await
    }

    /// [`LocalPublisher::publish_wanted`] at QoS `qos` (0, or 1 for anything else).
    pub async fn publish_wanted_qos(&self, topic: &str, payload: Vec<u8>, qos: u8) -> bool {
        if !self.interest.wanted(topic) {
            return false;
        }
        let qos = if qos == 0 {
            rumqttc::QoS::AtMostOnce
        } else {
            rumqttc::QoS::AtLeastOnce
        };
        self.publish(crate::broker::inside(topic).into_owned(), payload, qos)
            .await;
        true
    }
}

/// At most one journal line per device per [`DEAD_LETTER_LOG_EVERY`] for dead-lettered
/// messages (every message is still stored and counted): a device sending garbage ten times a
/// second must not flood the journal.
const DEAD_LETTER_LOG_EVERY: Duration = Duration::from_secs(10);

/// The entrance to the pipeline, held by the gatekeeper's connections (cheap to clone).
///
/// In the gateway it runs the stages in the caller's task ([`Pipeline::new`]): each device
/// connection normalises and queues its own readings, so the work spreads over every core
/// while one device's readings stay in the order it sent them, and a reading reaches the
/// queue writer without waiting for a task switch. A channel entrance
/// ([`From<mpsc::Sender<Ingest>>`]) hands messages to whoever reads the channel instead (test
/// rigs that look at what the gatekeeper accepted).
#[derive(Debug, Clone)]
pub struct IngestSender(Entrance);

#[derive(Debug, Clone)]
enum Entrance {
    Inline(Arc<Core>),
    Channel(mpsc::Sender<Ingest>),
}

/// The pipeline has stopped: nothing more is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl IngestSender {
    /// Hand one message over. In-line, this returns once the message is handled (normalised,
    /// queued or dead-lettered; its `Ack` confirms later, once it is on disk); a full queue
    /// waits here, so a device whose readings cannot be taken is not read meanwhile.
    pub async fn send(&self, msg: Ingest) -> Result<(), Closed> {
        match &self.0 {
            Entrance::Inline(core) => {
                core.handle(msg).await;
                Ok(())
            }
            Entrance::Channel(tx) => tx.send(msg).await.map_err(|_| Closed),
        }
    }
}

impl From<mpsc::Sender<Ingest>> for IngestSender {
    fn from(tx: mpsc::Sender<Ingest>) -> Self {
        Self(Entrance::Channel(tx))
    }
}

/// Messages started and finished, over the pipeline's life: its heartbeat and its count.
#[derive(Debug, Default)]
struct Progress {
    started: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

/// What every entrance shares: the stages and the counters.
#[derive(Debug)]
struct Core {
    stats: PipelineStats,
    stages: Stages,
    dead_letter_log: crate::telemetry::LogLimiter,
    progress: Arc<Progress>,
    /// Dropped with the last entrance: tells the pipeline stage that nothing can come any more.
    _open: mpsc::Sender<()>,
}

/// The pipeline's supervised stage: it owns no message (the connections run the stages), it
/// watches them. It writes the periodic summary, beats its heartbeat while messages are
/// handled or none is waiting (so a message stuck for longer than the stall threshold, behind
/// a queue writer that takes nothing, shows as a stalled pipeline and stops the watchdog), and
/// ends once every entrance is gone: then every message accepted has been handled, and the
/// queue's and dead-letter store's entrances are dropped with the stages, so their writers
/// commit what they have and end.
#[derive(Debug)]
pub struct Pipeline {
    open: mpsc::Receiver<()>,
    stats: PipelineStats,
    progress: Arc<Progress>,
    beat: crate::supervisor::Heartbeat,
}

impl Pipeline {
    /// A pipeline and the entrance its producers use.
    pub fn new(stages: Stages) -> (Self, IngestSender) {
        let (open_tx, open) = mpsc::channel(1);
        let stats = PipelineStats::default();
        let progress = Arc::new(Progress::default());
        let core = Arc::new(Core {
            stats: stats.clone(),
            stages,
            dead_letter_log: crate::telemetry::LogLimiter::every(DEAD_LETTER_LOG_EVERY),
            progress: progress.clone(),
            _open: open_tx,
        });
        (
            Self {
                open,
                stats,
                progress,
                beat: crate::supervisor::Heartbeat::detached(),
            },
            IngestSender(Entrance::Inline(core)),
        )
    }

    /// Shared view of the counters.
    pub fn stats(&self) -> PipelineStats {
        self.stats.clone()
    }

    /// Beat `beat` while messages make progress (see [`crate::supervisor`]).
    pub fn with_heartbeat(mut self, beat: crate::supervisor::Heartbeat) -> Self {
        self.beat = beat;
        self
    }

    /// Run until every entrance is dropped; returns how many messages were handled.
    pub async fn run(mut self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let mut summary = tokio::time::interval(SUMMARY_INTERVAL);
        summary.tick().await;
        let mut idle = crate::supervisor::Heartbeat::ticker();
        let mut at_summary = 0u64;
        let mut at_tick = 0u64;
        loop {
            tokio::select! {
                // Nothing is ever sent: this returns when the last entrance is dropped.
                _ = self.open.recv() => break,
                _ = summary.tick() => {
                    let done = self.progress.done.load(Relaxed);
                    let since = done - at_summary;
                    at_summary = done;
                    log::info!(
                        readings = since,
                        devices = self.stats.lock().len();
                        "pipeline: {since} readings in the last {}s", SUMMARY_INTERVAL.as_secs()
                    );
                }
                _ = idle.tick() => {
                    // Read `done` first: a message finished after it counts as waiting.
                    let done = self.progress.done.load(Relaxed);
                    let started = self.progress.started.load(Relaxed);
                    if done != at_tick || started == done {
                        self.beat.beat();
                    }
                    at_tick = done;
                }
            }
        }
        let handled = self.progress.done.load(Relaxed);
        log::info!(readings = handled; "pipeline drained and stopped");
        handled
    }
}

/// Counts a message as finished however `handle` leaves (returned early, or dropped).
struct Finished<'a>(&'a Progress);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0
            .done
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Core {
    async fn handle(&self, mut msg: Ingest) {
        self.progress
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _finished = Finished(&self.progress);
        let received_at_ms = crate::clock::epoch_ms(msg.received_at);
        let m = crate::rules::Message {
            topic: &msg.topic,
            payload: &msg.payload,
            device_id: &msg.device.id,
            received_at_ms,
        };
        self.stages.rules.apply(m, &mut msg.ack).await;
        if msg.topic.starts_with("$aws/") {
            // Boxed: this runs in the device connection's task, which is as large as the
            // largest state it ever awaits, for the life of the connection. The shadow and
            // Defender futures (1.4 KiB) made every connection pay for them; a shadow
            // request or a Defender report is rare next to readings, so it pays one
            // allocation instead.
            return Box::pin(self.reserved(msg)).await;
        }
        let result = self.stages.plugins.normalize(
            &msg.device.plugin,
            Input {
                device_id: &msg.device.id,
                kind: &msg.device.kind,
                topic: &msg.topic,
                payload: &msg.payload,
                received_at_ms,
                settings: &msg.device.settings,
            },
        );
        let (readings, dead) = match result {
            Ok(n) => {
                let json = self.canonical(&msg, &n, received_at_ms);
                if !self.stages.rules.is_empty() {
                    let topic = format!("ward/{}/readings", msg.device.id);
                    let m = crate::rules::Message {
                        topic: &topic,
                        payload: &json,
                        device_id: &msg.device.id,
                        received_at_ms,
                    };
                    self.stages.rules.apply(m, &mut msg.ack).await;
                }
                if let Some(shadows) = &self.stages.shadows {
                    shadows.report(&msg.device.id, &n.readings);
                }
                if let Some(history) = &self.stages.history {
                    history.readings(
                        &msg.device.id,
                        &msg.device.kind,
                        &n.readings,
                        received_at_ms,
                    );
                }
                if let Some(local) = &self.stages.local {
                    // Nobody subscribed: the broker would have nobody to give them to.
                    if let Some(topic) = local.readings_topic(&msg.device.id) {
                        local
                            .publish(topic, json.clone(), rumqttc::QoS::AtLeastOnce)
                            .await;
                    }
                }
                if let Some(queue) = &self.stages.queue {
                    let class = if msg.topic.ends_with("/alarm") {
                        crate::queue::Class::Alarm
                    } else {
                        crate::queue::Class::Routine
                    };
                    let record = crate::queue::Record::telemetry(class, &msg.device.id, json);
                    // The queue confirms once the reading is on disk.
                    if !queue.push(record, msg.ack.take()).await {
                        log::error!(device_id:% = msg.device.id; "queue writer stopped; reading not acknowledged");
                        return;
                    }
                }
                (n.readings.len() as u64, 0)
            }
            Err(failure) => {
                let entry = DeadLetters::entry(&msg, &failure);
                // The writer confirms the device's Ack once the entry is on disk.
                match self.stages.dead_letters.send(entry, msg.ack.take()) {
                    Ok(()) => {}
                    Err(dead_letter::Refused::Busy) => {
                        if let Some(suppressed) = self.dead_letter_log.allow(&msg.device.id) {
                            log::warn!(
                                device_id:% = msg.device.id, plugin:% = msg.device.plugin,
                                path:% = self.stages.dead_letters.dir().display(), suppressed = suppressed;
                                "dead-letter store far behind: message not normalised and not acknowledged (the device resends it{})",
                                if msg.qos == Qos::AtMostOnce { "; QoS 0: it is lost" } else { "" }
                            );
                        }
                        return;
                    }
                    Err(dead_letter::Refused::Stopped) => {
                        log::error!(
                            device_id:% = msg.device.id, plugin:% = msg.device.plugin,
                            path:% = self.stages.dead_letters.dir().display();
                            "dead-letter writer stopped; message not acknowledged"
                        );
                        return;
                    }
                }
                if let Some(suppressed) = self.dead_letter_log.allow(&msg.device.id) {
                    log::warn!(
                        device_id:% = msg.device.id, plugin:% = msg.device.plugin,
                        topic:% = msg.topic, reason_kind = failure.kind(), reason:% = failure,
                        suppressed = suppressed;
                        "message not normalised, kept in the dead-letter store: {failure}{}",
                        if suppressed > 0 { format!(" ({suppressed} more from this device since the last report)") } else { String::new() }
                    );
                }
                (0, 1)
            }
        };
        self.count(&msg, readings, dead);
        log::debug!(
            device_id:% = msg.device.id,
            kind:% = msg.device.kind,
            topic:% = msg.topic,
            bytes = msg.payload.len(),
            readings = readings,
            qos = if msg.qos == Qos::AtLeastOnce { 1 } else { 0 },
            pkid = msg.pkid;
            "message handled"
        );
        if let Some(ack) = msg.ack.take() {
            ack.confirm();
        }
    }

    /// A PUBLISH to an AWS reserved topic: a shadow request goes to the shadow service, which
    /// confirms it once answered; anything else there (a reply topic, a Defender report while
    /// no service owns it) was relayed to local subscribers by the gatekeeper and has nothing
    /// more to do here — it is never a plugin's business.
    async fn reserved(&self, mut msg: Ingest) {
        self.count(&msg, 0, 0);
        if let (Some((thing, format)), Some(defender)) = (
            crate::defender::parse_topic(&msg.topic),
            &self.stages.defender,
        ) {
            let ack = msg.ack.take();
            defender
                .report(&msg.device.id, thing, format, &msg.payload, ack)
                .await;
            return;
        }
        let address = crate::shadow::Address::parse(&msg.topic);
        match (address, &self.stages.shadows) {
            (Some(address), Some(shadows)) => {
                let ack = msg.ack.take();
                if shadows
                    .submit(address, msg.payload.clone(), msg.device.id.clone(), ack)
                    .await
                    .is_err()
                {
                    log::error!(device_id:% = msg.device.id, topic:% = msg.topic; "shadow service stopped; request not acknowledged");
                }
            }
            _ => {
                log::debug!(device_id:% = msg.device.id, topic:% = msg.topic; "reserved topic: relayed only");
                if let Some(ack) = msg.ack.take() {
                    ack.confirm();
                }
            }
        }
    }

    /// Count a handled message, its readings and its dead letters on its device.
    fn count(&self, msg: &Ingest, readings: u64, dead_letters: u64) {
        let mut stats = self.stats.lock();
        let c = stats.entry(msg.device.id.clone()).or_default();
        c.messages += 1;
        c.bytes += msg.payload.len() as u64;
        c.readings += readings;
        c.dead_letters += dead_letters;
    }

    fn canonical(&self, msg: &Ingest, n: &Normalized, received_at_ms: i64) -> Vec<u8> {
        let canonical = Canonical {
            gateway_id: &self.stages.gateway_id,
            device_id: &msg.device.id,
            kind: &msg.device.kind,
            plugin: &n.plugin,
            plugin_version: &n.version,
            topic: &msg.topic,
            received_at_ms,
            readings: &n.readings,
        };
        // Plain data with string keys: serialising it cannot fail.
        serde_json::to_vec(&canonical).unwrap_or_default()
    }
}
