//! The pipeline: where every accepted device PUBLISH goes, in arrival order.
//!
//! The gatekeeper hands each PUBLISH over as an [`Ingest`] through a bounded channel
//! ([`INGEST_CHANNEL_CAPACITY`]). A QoS 1 reading carries an [`Ack`]: the device gets its PUBACK
//! only after the pipeline has confirmed the reading is safe (today: handled by the pipeline;
//! with the durable queue: written to disk). An `Ack` dropped without confirming means "not
//! safe": no PUBACK, and the device resends. When the channel is full the gatekeeper stops
//! reading from that device: backpressure, never loss.
//!
//! Stages to come hang off [`Pipeline::handle`]: plugin normalisation → shadow and rules →
//! durable queue → uplink. For now it counts per device and logs.
//!
//! What must stay true: the pipeline stops only when every sender is gone (all device
//! connections closed), so a stop drains everything accepted so far, in order.

use crate::registry::Device;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Readings buffered between the gatekeeper and the pipeline. At 1 000 readings/s this is about
/// one second of traffic: enough to absorb bursts, small enough that backpressure reaches
/// devices quickly and a stop drains fast.
pub const INGEST_CHANNEL_CAPACITY: usize = 1024;
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
#[derive(Debug)]
pub struct Ack(tokio::sync::oneshot::Sender<()>);

impl Ack {
    /// A new promise and the receiver the gatekeeper waits on.
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(tx), rx)
    }

    /// The reading is safe: the device may get its PUBACK.
    pub fn confirm(self) {
        // The connection may be gone; then the device resends and nothing is lost.
        let _ = self.0.send(());
    }
}

/// Sending half, held by the gatekeeper's connections.
pub type IngestSender = mpsc::Sender<Ingest>;

/// Counters per device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Messages received.
    pub messages: u64,
    /// Payload bytes received.
    pub bytes: u64,
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

/// The pipeline task.
#[derive(Debug)]
pub struct Pipeline {
    rx: mpsc::Receiver<Ingest>,
    stats: PipelineStats,
}

impl Pipeline {
    /// A pipeline and the sender its producers use.
    pub fn new() -> (Self, IngestSender) {
        let (tx, rx) = mpsc::channel(INGEST_CHANNEL_CAPACITY);
        (
            Self {
                rx,
                stats: PipelineStats::default(),
            },
            tx,
        )
    }

    /// Shared view of the counters.
    pub fn stats(&self) -> PipelineStats {
        self.stats.clone()
    }

    /// Run until every sender is dropped; returns how many readings were handled.
    pub async fn run(mut self) -> u64 {
        let mut handled = 0u64;
        let mut since_summary = 0u64;
        let mut summary = tokio::time::interval(SUMMARY_INTERVAL);
        summary.tick().await;
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => {
                        self.handle(msg);
                        handled += 1;
                        since_summary += 1;
                    }
                    None => break,
                },
                _ = summary.tick() => {
                    log::info!(
                        readings = since_summary,
                        devices = self.stats.lock().len();
                        "pipeline: {since_summary} readings in the last {}s", SUMMARY_INTERVAL.as_secs()
                    );
                    since_summary = 0;
                }
            }
        }
        log::info!(readings = handled; "pipeline drained and stopped");
        handled
    }

    fn handle(&self, mut msg: Ingest) {
        {
            let mut stats = self.stats.lock();
            let c = stats.entry(msg.device.id.clone()).or_default();
            c.messages += 1;
            c.bytes += msg.payload.len() as u64;
        }
        log::debug!(
            device_id:% = msg.device.id,
            kind:% = msg.device.kind,
            topic:% = msg.topic,
            bytes = msg.payload.len(),
            qos = if msg.qos == Qos::AtLeastOnce { 1 } else { 0 },
            pkid = msg.pkid;
            "reading received"
        );
        if let Some(ack) = msg.ack.take() {
            ack.confirm();
        }
    }
}
