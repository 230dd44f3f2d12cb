//! Ward history: every canonical reading, every edge-rule alert and every Device Defender
//! violation event, kept on the gateway for lookups by device, metric and time range — so
//! clinical engineers can see a device's last hours without the cloud, and export them
//! (`wardgate history`), draw them (`wardgate chart`) or browse them (the console).
//!
//! Data flow: the pipeline, the rules and the defender hand [`Row`]s to a [`Recorder`], which
//! never waits: it puts them in a bounded channel and, when that is full (the disk far
//! behind), drops them and counts them (`dropped_busy`). The history stage ([`run`]) takes
//! them in batches and appends them to the segment files of [`store`] on a blocking thread.
//! So history is off the PUBACK path: a slow or full history disk never delays a device, and
//! the durable queue (not history) is what guarantees delivery upstream.
//!
//! Storage, bounds and durability: see [`store`]. In short, append-only segment files under
//! `<state_dir>/history`, at most [`store::SEGMENT_SPAN`] of time or `max_bytes / 16` each;
//! whole segments are dropped oldest first when the total passes `history.max_bytes` or their
//! newest row is older than `history.max_age` (dropped rows counted); every batch is written
//! to the kernel before the next (so a kill -9 loses nothing written) and synced at most
//! [`store::SYNC_EVERY`] apart (a power cut loses at most that much); a torn last row is cut
//! off when the store is opened again.
//!
//! What must stay true: recording never blocks and never fails a reading; one device's rows
//! never hide another's; what the export shows is what was recorded, in the order it was
//! received.

pub mod chart;
pub mod export;
pub mod store;

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Rows waiting for the history writer; more are dropped (and counted).
pub const CHANNEL_CAPACITY: usize = 8192;
/// Most rows written in one batch.
const MAX_BATCH: usize = 4096;

/// What a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowKind {
    /// A canonical reading (a plugin's output).
    Reading,
    /// An edge rule fired on the device's message (`metric` is the rule's name).
    Alert,
    /// A Device Defender violation event (`metric` is the behavior's metric, `quality` the
    /// event type: `in-alarm`, `alarm-cleared`, `alarm-invalidated`).
    Violation,
}

impl RowKind {
    /// The name used in exports and on the console.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Reading => "reading",
            RowKind::Alert => "alert",
            RowKind::Violation => "violation",
        }
    }

    fn code(self) -> u8 {
        match self {
            RowKind::Reading => 0,
            RowKind::Alert => 1,
            RowKind::Violation => 2,
        }
    }

    fn of_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => RowKind::Reading,
            1 => RowKind::Alert,
            2 => RowKind::Violation,
            _ => return None,
        })
    }
}

/// One row of history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// What it records.
    pub record: RowKind,
    /// The device.
    pub device: String,
    /// Its kind (`pacemaker`, ...).
    pub kind: String,
    /// The reading's metric; the alert's rule; the violation's metric.
    pub metric: String,
    /// The reading's value; the violation's metric value when it is a number; none for alerts.
    pub value: Option<f64>,
    /// UCUM unit of the value (empty when none).
    pub unit: String,
    /// `good` / `questionable` for readings; the event type for violations; empty for alerts.
    pub quality: String,
    /// When the device measured it (readings) or the event happened, ms since the epoch.
    pub observed_ms: i64,
    /// When the gateway received or raised it, ms since the epoch.
    pub received_ms: i64,
    /// The alert's output or the violation's behavior and profile (empty for readings).
    pub detail: String,
}

/// Which rows a lookup wants. Times are inclusive bounds on `observed_ms`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Only this device.
    pub device: Option<String>,
    /// Only devices of this kind.
    pub kind: Option<String>,
    /// Only this metric (alerts and violations of the device are kept with it when
    /// `with_events` is set).
    pub metric: Option<String>,
    /// Keep alerts and violations even when `metric` does not match them (for charts).
    pub with_events: bool,
    /// Earliest observed time.
    pub from_ms: i64,
    /// Latest observed time.
    pub to_ms: i64,
}

impl Filter {
    /// Every row observed in `[from_ms, to_ms]`.
    pub fn between(from_ms: i64, to_ms: i64) -> Self {
        Self {
            from_ms,
            to_ms,
            ..Self::default()
        }
    }

    /// Whether `row` is wanted.
    pub fn matches(&self, row: &Row) -> bool {
        if row.observed_ms < self.from_ms || row.observed_ms > self.to_ms {
            return false;
        }
        if self.device.as_ref().is_some_and(|d| *d != row.device) {
            return false;
        }
        if self.kind.as_ref().is_some_and(|k| *k != row.kind) {
            return false;
        }
        match &self.metric {
            Some(m) if *m != row.metric => self.with_events && row.record != RowKind::Reading,
            _ => true,
        }
    }
}

/// Counters of the history stage since start (in `wardgate status` and `/metrics`), and the
/// bounds a reload hands it.
#[derive(Debug, Default)]
pub struct HistoryCounters {
    /// New bounds from a reload, taken by the writer before its next batch.
    new_bounds: std::sync::Mutex<Option<store::Bounds>>,
    /// Rows written.
    pub written: AtomicU64,
    /// Rows dropped because the writer was far behind (the channel was full).
    pub dropped_busy: AtomicU64,
    /// Rows dropped with their segments because the history was over `history.max_bytes`.
    pub dropped_over_bytes: AtomicU64,
    /// Rows dropped with their segments because they were older than `history.max_age`.
    pub dropped_over_age: AtomicU64,
    /// Batches that could not be written (disk full, I/O error); their rows are lost.
    pub write_failures: AtomicU64,
    /// Rows lost with those batches.
    pub lost_rows: AtomicU64,
    /// Bytes on disk after the last batch.
    pub bytes: AtomicU64,
}

/// The history at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HistoryStatus {
    /// Rows written since start.
    pub written: u64,
    /// Rows dropped since start because the writer was behind.
    pub dropped_busy: u64,
    /// Rows dropped since start over `history.max_bytes`.
    pub dropped_over_bytes: u64,
    /// Rows dropped since start over `history.max_age`.
    pub dropped_over_age: u64,
    /// Batches not written since start (I/O errors).
    pub write_failures: u64,
    /// Rows lost with them.
    pub lost_rows: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

impl HistoryCounters {
    /// Apply new bounds (a reload of `history.max_bytes` / `history.max_age`): from the next
    /// batch, or within [`store::MAINTENANCE_EVERY`] when none comes.
    pub fn set_bounds(&self, b: store::Bounds) {
        *self.new_bounds.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    }

    /// A snapshot.
    pub fn status(&self) -> HistoryStatus {
        HistoryStatus {
            written: self.written.load(Relaxed),
            dropped_busy: self.dropped_busy.load(Relaxed),
            dropped_over_bytes: self.dropped_over_bytes.load(Relaxed),
            dropped_over_age: self.dropped_over_age.load(Relaxed),
            write_failures: self.write_failures.load(Relaxed),
            lost_rows: self.lost_rows.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

/// Where rows are handed to the history. Cheap to clone; never waits.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Row>,
    counters: Arc<HistoryCounters>,
    /// Device kinds of alerts and violations (their sources know only the id).
    registry: Option<crate::registry::SharedRegistry>,
}

impl Recorder {
    /// Record `row`, or drop it (counted) when the writer is far behind or stopped.
    pub fn record(&self, row: Row) {
        if self.tx.try_send(row).is_err() {
            self.counters.dropped_busy.fetch_add(1, Relaxed);
        }
    }

    /// Record the readings of one message of `device` (of `kind`), received at `received_ms`.
    pub fn readings(
        &self,
        device: &str,
        kind: &str,
        readings: &[crate::plugin_host::Reading],
        received_ms: i64,
    ) {
        for r in readings {
            self.record(Row {
                record: RowKind::Reading,
                device: device.to_owned(),
                kind: kind.to_owned(),
                metric: r.metric.clone(),
                value: Some(r.value),
                unit: r.unit.clone(),
                quality: r.quality.to_owned(),
                observed_ms: r.observed_at_ms,
                received_ms,
                detail: String::new(),
            });
        }
    }

    /// The kind of a registered device (empty when it is not registered).
    fn kind_of(&self, device: &str) -> String {
        self.registry
            .as_ref()
            .and_then(|r| r.snapshot().get(device).map(|d| d.kind.to_string()))
            .unwrap_or_default()
    }

    /// Record that edge rule `rule` fired on `device`'s message, with its output.
    pub fn alert(&self, device: &str, rule: &str, output: &str, at_ms: i64) {
        self.record(Row {
            record: RowKind::Alert,
            device: device.to_owned(),
            kind: self.kind_of(device),
            metric: rule.to_owned(),
            value: None,
            unit: String::new(),
            quality: String::new(),
            observed_ms: at_ms,
            received_ms: at_ms,
            detail: output.to_owned(),
        });
    }

    /// Record a Device Defender violation event of `device`: `event` is `in-alarm`,
    /// `alarm-cleared` or `alarm-invalidated`; `detail` names the behavior and profile.
    pub fn violation(
        &self,
        device: &str,
        metric: &str,
        value: Option<f64>,
        event: &str,
        detail: String,
        at_ms: i64,
    ) {
        self.record(Row {
            record: RowKind::Violation,
            device: device.to_owned(),
            kind: self.kind_of(device),
            metric: metric.to_owned(),
            value,
            unit: String::new(),
            quality: event.to_owned(),
            observed_ms: at_ms,
            received_ms: at_ms,
            detail,
        });
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<HistoryCounters> {
        &self.counters
    }
}

/// The recorder and the stage that writes what it is given into `store`. The stage ends when
/// every [`Recorder`] is gone, after writing what it has, or when `stop` fires (after writing
/// what is already waiting).
pub fn channel(
    store: store::Store,
    counters: Arc<HistoryCounters>,
    registry: Option<crate::registry::SharedRegistry>,
) -> (Recorder, impl FnOnce(crate::supervisor::Heartbeat) -> Stage) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let recorder = Recorder {
        tx,
        counters: counters.clone(),
        registry,
    };
    (recorder, move |beat| Stage {
        store: Some(store),
        rx,
        counters,
        beat,
    })
}

/// The history writer stage (see [`run`]).
#[derive(Debug)]
pub struct Stage {
    store: Option<store::Store>,
    rx: mpsc::Receiver<Row>,
    counters: Arc<HistoryCounters>,
    beat: crate::supervisor::Heartbeat,
}

/// At most one ERROR line per this long about failed history writes.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Run the history writer until every recorder is gone.
pub async fn run(mut stage: Stage) {
    let mut idle = crate::supervisor::Heartbeat::ticker();
    let mut last_failure_log: Option<std::time::Instant> = None;
    let mut maintenance = tokio::time::interval(store::MAINTENANCE_EVERY);
    maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            biased;
            n = stage.rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { break },
            _ = maintenance.tick() => {}
            _ = idle.tick() => {
                stage.beat.beat();
                continue;
            }
        }
        let Some(mut store) = stage.store.take() else {
            break;
        };
        let rows = batch.len() as u64;
        let now = crate::clock::now_ms();
        let reloaded = stage
            .counters
            .new_bounds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (store, result) = tokio::task::spawn_blocking(move || {
            if let Some(b) = reloaded {
                store.set_bounds(b);
            }
            let r = store.append(&batch, now);
            (store, r)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        stage.store = Some(store);
        let c = &stage.counters;
        match result {
            Ok(outcome) => {
                c.written.fetch_add(rows, Relaxed);
                c.dropped_over_bytes
                    .fetch_add(outcome.dropped_over_bytes, Relaxed);
                c.dropped_over_age
                    .fetch_add(outcome.dropped_over_age, Relaxed);
                c.bytes.store(outcome.bytes, Relaxed);
                stage.beat.beat();
            }
            Err(e) => {
                c.write_failures.fetch_add(1, Relaxed);
                c.lost_rows.fetch_add(rows, Relaxed);
                if last_failure_log.is_none_or(|t| t.elapsed() >= FAILURE_LOG_EVERY) {
                    last_failure_log = Some(std::time::Instant::now());
                    log::error!(
                        error:% = e, lost_rows = c.lost_rows.load(Relaxed);
                        "history: cannot write {rows} rows: {e}; readings still go upstream (the queue is separate); free space in gateway.state_dir. At most one such line per {}s; wardgate status counts them",
                        FAILURE_LOG_EVERY.as_secs()
                    );
                }
                // Still alive: history failing must not stop the gateway.
                stage.beat.beat();
            }
        }
    }
    if let Some(mut store) = stage.store.take() {
        let _ = tokio::task::spawn_blocking(move || store.sync()).await;
    }
}

/// For tests: a pacemaker reading of `metric` = `value` (unit `/min`, quality `good`) of
/// `device`, observed and received at `at`.
#[cfg(test)]
pub(crate) fn test_reading(device: &str, metric: &str, value: f64, at: i64) -> Row {
    Row {
        record: RowKind::Reading,
        device: device.into(),
        kind: "pacemaker".into(),
        metric: metric.into(),
        value: Some(value),
        unit: "/min".into(),
        quality: "good".into(),
        observed_ms: at,
        received_ms: at,
        detail: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, metric: &str, record: RowKind, at: i64) -> Row {
        Row {
            record,
            ..test_reading(device, metric, 1.0, at)
        }
    }

    #[test]
    fn filter_keeps_events_with_a_metric_only_when_asked() {
        let t = crate::clock::now_ms();
        let mut f = Filter::between(t - 10, t + 10);
        f.metric = Some("heartbeat".into());
        f.device = Some("pm-01".into());
        assert!(f.matches(&row("pm-01", "heartbeat", RowKind::Reading, t)));
        assert!(!f.matches(&row("pm-02", "heartbeat", RowKind::Reading, t)));
        assert!(!f.matches(&row("pm-01", "battery", RowKind::Reading, t)));
        assert!(!f.matches(&row("pm-01", "tachycardia", RowKind::Alert, t)));
        f.with_events = true;
        assert!(f.matches(&row("pm-01", "tachycardia", RowKind::Alert, t)));
        assert!(!f.matches(&row("pm-01", "battery", RowKind::Reading, t)));
        assert!(!f.matches(&row("pm-01", "heartbeat", RowKind::Reading, t + 11)));
        assert!(!f.matches(&row("pm-01", "heartbeat", RowKind::Reading, t - 11)));
    }

    #[tokio::test]
    async fn a_full_channel_drops_and_counts_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open(dir.path(), store::Bounds::default()).unwrap();
        let counters = Arc::new(HistoryCounters::default());
        let (rec, _stage) = channel(store, counters.clone(), None);
        let t = crate::clock::now_ms();
        // The stage is not running: the channel fills, then rows are dropped at once.
        for i in 0..CHANNEL_CAPACITY + 10 {
            rec.record(row("pm-01", "heartbeat", RowKind::Reading, t + i as i64));
        }
        assert_eq!(counters.dropped_busy.load(Relaxed), 10);
    }
}
