//! Group commit: readings are appended in groups and synced once per group, then every
//! reading of the group is confirmed (its device gets its PUBACK). A group is whatever waits
//! when the previous commit is done (at most [`MAX_GROUP`]), so it grows with the load instead
//! of waiting for a timer: one reading and one flush when the ward is quiet, hundreds per flush
//! under a burst. `queue.commit_interval` is the shortest time between the starts of two
//! commits, which bounds the flush rate; a reading waits at most that, plus the commit in
//! progress, plus its own.
//!
//! Admission: an alarm or security record that would take the queue's alarm and security
//! records past `queue.max_bytes` is refused — not written, not confirmed (its device is
//! disconnected and sends it again later) — because those records can never be evicted and the
//! disk must stay bounded. Routine records are always admitted; the eviction policy makes room.
//!
//! Eviction (see [`super`]: it costs what it evicts) runs after every append; a WARN says so
//! at most once per [`EVICTION_LOG_EVERY`], with the numbers since the previous line, so a
//! long outage does not write a journal line per commit.
//!
//! Write errors: a commit that fails acknowledges none of its readings (their devices send
//! them again) and the store is opened again ([`super::SledStore::recover`]), because sled
//! keeps a write error (a full disk) for good; so once the disk has room the queue takes
//! readings again without a restart. An ERROR says so, at most once per
//! [`EVICTION_LOG_EVERY`] with the totals since.
//!
//! Supervision: the writer is a fatal stage ([`crate::supervisor`]). It beats after every
//! successful commit and when idle, never while readings wait behind failing commits, so a
//! writer that cannot write shows as stalled (and stops the watchdog) instead of looking alive
//! while no PUBACK is sent.

use super::{Record, SledStore, Store};
use crate::clock::now_ms;
use crate::pipeline::Ack;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// Most readings in one group commit.
pub const MAX_GROUP: usize = 1024;
/// Readings waiting for their group commit; a full channel slows the pipeline down.
const WRITER_CHANNEL_CAPACITY: usize = 4096;
/// At most one "routine readings evicted" WARN per this long, with the totals since the last
/// one: during a long outage every group commit evicts, and the journal must not get a line
/// per commit (the counters in `wardgate status` stay exact).
const EVICTION_LOG_EVERY: Duration = Duration::from_secs(10);

/// The queue shared by the writer (appends) and the uplink (reads, removes).
#[derive(Debug, Clone)]
pub struct SharedQueue {
    /// The store.
    pub store: Arc<Mutex<SledStore>>,
    /// Woken after every group commit.
    pub appended: Arc<Notify>,
    /// What was dropped, since start.
    pub counters: Arc<QueueCounters>,
    /// New bounds from a reload, taken by the writer before its next group.
    bounds: Arc<Mutex<Option<Bounds>>>,
}

/// The writer's bounds: `queue.commit_interval`, `queue.max_bytes`, `queue.max_age`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Shortest time between the starts of two commits.
    pub commit_interval: Duration,
    /// Most bytes queued.
    pub max_bytes: u64,
    /// Oldest routine record kept.
    pub max_age: Duration,
}

/// Counters of the queue since start (visible in `wardgate status`).
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Records appended.
    pub appended: std::sync::atomic::AtomicU64,
    /// Routine records evicted because the queue was over `queue.max_bytes`.
    pub evicted_over_bytes: std::sync::atomic::AtomicU64,
    /// Routine records evicted because they were older than `queue.max_age`.
    pub evicted_over_age: std::sync::atomic::AtomicU64,
    /// Records the upstream can never take, set aside by the uplink.
    pub set_aside: std::sync::atomic::AtomicU64,
    /// Alarm and security records refused (not acknowledged) because such records alone
    /// filled `queue.max_bytes`.
    pub refused_full: std::sync::atomic::AtomicU64,
}

/// The queue at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStatus {
    /// Records waiting for the upstream.
    pub depth: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Age of the oldest, in seconds (0 when empty).
    pub oldest_age_s: u64,
    /// Records appended since start.
    pub appended: u64,
    /// Routine records evicted over the byte bound since start.
    pub evicted_over_bytes: u64,
    /// Routine records evicted over the age bound since start.
    pub evicted_over_age: u64,
    /// Records set aside as undeliverable since start (kept in the queue's `undeliverable`
    /// tree).
    #[serde(default)]
    pub undeliverable: u64,
    /// Alarm and security records refused since start because such records alone filled the
    /// queue (their devices keep and resend them).
    #[serde(default)]
    pub refused_full: u64,
}

impl SharedQueue {
    /// Wrap an opened store.
    pub fn new(store: SledStore) -> Self {
        Self {
            store: Arc::new(Mutex::new(store)),
            appended: Arc::new(Notify::new()),
            counters: Arc::default(),
            bounds: Arc::default(),
        }
    }

    /// Give the writer new bounds (a reload): they apply from its next group, and a lower
    /// `max_bytes` or `max_age` evicts at that commit.
    pub fn set_bounds(&self, b: Bounds) {
        *self.bounds.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    }

    /// Depth, bytes, oldest age and drop counters (blocking: reads the oldest record).
    pub fn status(&self) -> QueueStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let (depth, bytes, oldest) = self.with(|s| {
            let oldest = s
                .read_after(None, 1)
                .ok()
                .and_then(|v| v.first().map(|(_, r)| r.enqueued_at_ms));
            (s.len(), s.bytes(), oldest)
        });
        QueueStatus {
            depth,
            bytes,
            oldest_age_s: oldest.map_or(0, |t| ((now_ms() - t).max(0) / 1000) as u64),
            appended: self.counters.appended.load(Relaxed),
            evicted_over_bytes: self.counters.evicted_over_bytes.load(Relaxed),
            evicted_over_age: self.counters.evicted_over_age.load(Relaxed),
            undeliverable: self.counters.set_aside.load(Relaxed),
            refused_full: self.counters.refused_full.load(Relaxed),
        }
    }

    /// Run `f` on the store (blocking: call from a blocking context).
    pub fn with<R>(&self, f: impl FnOnce(&mut SledStore) -> R) -> R {
        let mut s = self.store.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }
}

/// Where the pipeline hands readings for the queue.
#[derive(Debug, Clone)]
pub struct Enqueue(mpsc::Sender<(Record, Option<Ack>)>);

impl Enqueue {
    /// Queue one record; `ack` is confirmed once it is on disk. Waits when the writer is behind.
    pub async fn push(&self, record: Record, ack: Option<Ack>) -> bool {
        self.0.send((record, ack)).await.is_ok()
    }
}

/// Start the group-commit writer on its own task, unsupervised (see [`writer`]).
pub fn spawn_writer(
    queue: SharedQueue,
    commit_interval: Duration,
    max_bytes: u64,
    max_age: Duration,
) -> (Enqueue, tokio::task::JoinHandle<()>) {
    let (enqueue, w) = writer(
        queue,
        commit_interval,
        max_bytes,
        max_age,
        crate::supervisor::Heartbeat::detached(),
    );
    (enqueue, tokio::spawn(w))
}

/// The group-commit writer and its entrance. The writer ends when every [`Enqueue`] is
/// dropped, after committing what it has. It beats `beat` after every successful commit and
/// on an idle tick when nothing waits; a writer whose commits keep failing while readings wait
/// makes no progress and shows as stalled. A panic while writing is the writer's panic.
pub fn writer(
    queue: SharedQueue,
    mut commit_interval: Duration,
    mut max_bytes: u64,
    mut max_age: Duration,
    beat: crate::supervisor::Heartbeat,
) -> (
    Enqueue,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, mut rx) = mpsc::channel::<(Record, Option<Ack>)>(WRITER_CHANNEL_CAPACITY);
    let task = async move {
        let mut idle = crate::supervisor::Heartbeat::ticker();
        let mut last_start = tokio::time::Instant::now();
        // Evictions not yet reported, and when the last report was written.
        let (mut unreported, mut last_report) = (super::Evicted::default(), None);
        // Failed commits (and their readings) not yet reported, and when the last report was.
        let (mut failed, mut last_failure_report) = ((0u64, 0u64), None);
        loop {
            let first = tokio::select! {
                // Waiting readings first: the idle tick beats only when there are none.
                biased;
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = idle.tick() => {
                    beat.beat();
                    continue;
                }
            };
            // Everything already waiting joins this group; what arrives while it is written
            // joins the next. So a group is one reading when the ward is quiet and grows with
            // the load, and commits start at most once per `commit_interval`.
            let reloaded = queue
                .bounds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(b) = reloaded {
                (commit_interval, max_bytes, max_age) = (b.commit_interval, b.max_bytes, b.max_age);
            }
            let mut group = vec![first];
            let deadline = last_start + commit_interval;
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(item) => group.push(item),
                    Err(_) if tokio::time::Instant::now() >= deadline => break,
                    Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(item)) => group.push(item),
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            last_start = tokio::time::Instant::now();
            let (records, acks): (Vec<Record>, Vec<Option<Ack>>) = group.into_iter().unzip();
            let q = queue.clone();
            let age_floor = now_ms() - max_age.as_millis() as i64;
            let result = tokio::task::spawn_blocking(move || {
                q.with(|s| {
                    let commit = (|| -> Result<_, super::QueueError> {
                        let admitted = admit(s.priority_bytes(), max_bytes, &records);
                        let kept: Vec<Record> = records
                            .into_iter()
                            .zip(&admitted)
                            .filter_map(|(r, ok)| ok.then_some(r))
                            .collect();
                        s.append(&kept)?;
                        let evicted = s.evict(max_bytes, age_floor)?;
                        s.sync()?;
                        Ok((admitted, evicted, s.len(), s.bytes()))
                    })();
                    // A failed commit may have closed sled for good (see `recover`): open
                    // it again, so the queue takes readings once the disk has room.
                    let recovered = commit.is_err().then(|| s.recover()).flatten();
                    (commit, recovered)
                })
            })
            .await;
            let result = result.map(|(commit, recovered)| {
                match recovered {
                    Some(Ok(report)) => log::warn!(
                        queued = report.records;
                        "queue reopened after a write error: {} records queued; new readings are acknowledged again once they can be written",
                        report.records
                    ),
                    Some(Err(e)) => log::error!(
                        error:% = e;
                        "queue could not be reopened after a write error (tried again at most once per {}s while readings come): {e}; free space in gateway.state_dir",
                        super::RECOVERY_EVERY.as_secs()
                    ),
                    None => {}
                }
                commit
            });
            match result {
                Ok(Ok((admitted, evicted, len, bytes))) => {
                    beat.beat();
                    use std::sync::atomic::Ordering::Relaxed;
                    let c = &queue.counters;
                    let refused = admitted.iter().filter(|ok| !**ok).count() as u64;
                    c.appended
                        .fetch_add(admitted.len() as u64 - refused, Relaxed);
                    c.evicted_over_bytes.fetch_add(evicted.over_bytes, Relaxed);
                    c.evicted_over_age.fetch_add(evicted.over_age, Relaxed);
                    c.refused_full.fetch_add(refused, Relaxed);
                    unreported.over_bytes += evicted.over_bytes;
                    unreported.over_age += evicted.over_age;
                    let due = last_report
                        .is_none_or(|t: std::time::Instant| t.elapsed() >= EVICTION_LOG_EVERY);
                    if unreported.over_bytes + unreported.over_age > 0 && due {
                        log::warn!(
                            evicted_over_bytes = unreported.over_bytes, evicted_over_age = unreported.over_age,
                            queued = len, queued_bytes = bytes;
                            "queue full: routine readings evicted (alarms and security records are kept); at most one such line per {}s",
                            EVICTION_LOG_EVERY.as_secs()
                        );
                        unreported = super::Evicted::default();
                        last_report = Some(std::time::Instant::now());
                    }
                    if refused > 0 {
                        log::error!(
                            refused = refused, queued = len, queued_bytes = bytes;
                            "queue full of alarm and security records (queue.max_bytes): {refused} more refused and not acknowledged; their devices keep them and send them again"
                        );
                    }
                    // A refused record's promise is dropped unconfirmed: its device is not
                    // acknowledged.
                    for (ack, ok) in acks.into_iter().zip(admitted) {
                        if let (Some(ack), true) = (ack, ok) {
                            ack.confirm();
                        }
                    }
                    queue.appended.notify_one();
                }
                Ok(Err(e)) => {
                    // One line per failing commit would flood the journal (often on the same
                    // full disk): the first failure, then at most one per interval with the
                    // totals since.
                    failed.0 += 1;
                    failed.1 += acks.len() as u64;
                    let due = last_failure_report
                        .is_none_or(|t: std::time::Instant| t.elapsed() >= EVICTION_LOG_EVERY);
                    if due {
                        log::error!(
                            error:% = e, failed_commits = failed.0, readings = failed.1;
                            "cannot write the queue: {} readings in {} commits not acknowledged (devices will resend): {e}; at most one such line per {}s",
                            failed.1, failed.0, EVICTION_LOG_EVERY.as_secs()
                        );
                        failed = (0, 0);
                        last_failure_report = Some(std::time::Instant::now());
                    }
                }
                // The store may be half-written: this is the writer's own panic.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => {
                    log::error!(error:% = e; "queue write was cancelled: {} readings not acknowledged (devices will resend)", acks.len())
                }
            }
        }
    };
    (Enqueue(tx), task)
}

/// Which of `records` may be written: every routine record, and alarm and security records
/// while those (already queued: `priority_bytes`) fit in `max_bytes`.
fn admit(mut priority_bytes: u64, max_bytes: u64, records: &[Record]) -> Vec<bool> {
    records
        .iter()
        .map(|r| {
            if !r.class.is_priority() {
                return true;
            }
            let len = r.stored_len() as u64;
            if priority_bytes + len > max_bytes {
                return false;
            }
            priority_bytes += len;
            true
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Class, Store};

    fn alarm(n: u32) -> Record {
        Record::telemetry(Class::Alarm, "pm-01", format!("{{\"n\":{n}}}").into_bytes())
    }

    #[tokio::test]
    async fn alarms_beyond_the_byte_bound_are_refused_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
        let queue = SharedQueue::new(store);
        let per = alarm(10).stored_len() as u64;
        // Room for exactly 5 alarms.
        let (tx, writer) = spawn_writer(
            queue.clone(),
            Duration::from_millis(1),
            per * 5,
            Duration::from_secs(3600),
        );
        let mut confirmations = Vec::new();
        for n in 10..18 {
            let (ack, rx) = Ack::new();
            assert!(tx.push(alarm(n), Some(ack)).await);
            confirmations.push(rx);
        }
        // A routine reading is still taken (and evicted at once: nothing routine fits).
        let (ack, routine) = Ack::new();
        let r = Record::telemetry(Class::Routine, "bt-01", b"{}".to_vec());
        assert!(tx.push(r, Some(ack)).await);
        drop(tx);
        writer.await.unwrap();
        let mut outcome = Vec::new();
        for rx in confirmations {
            outcome.push(rx.await.is_ok());
        }
        assert_eq!(
            outcome,
            [true, true, true, true, true, false, false, false],
            "the first five alarms are acknowledged, the rest refused"
        );
        assert!(routine.await.is_ok(), "routine reading acknowledged");
        let st = queue.status();
        assert_eq!(
            (st.depth, st.refused_full, st.evicted_over_bytes),
            (5, 3, 1)
        );
        assert!(queue.with(|s| s.priority_bytes()) <= per * 5);
        // The five kept are the oldest, in order.
        let kept: Vec<Vec<u8>> = queue.with(|s| {
            s.read_after(None, 10)
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.payload)
                .collect()
        });
        let want: Vec<Vec<u8>> = (10..15)
            .map(|n| format!("{{\"n\":{n}}}").into_bytes())
            .collect();
        assert_eq!(kept, want);
    }

    use crate::sled_reopen::testing::SmallDisk;

    async fn confirmed(tx: &Enqueue, n: u32) -> bool {
        let (ack, rx) = Ack::new();
        let r = Record::telemetry(
            Class::Routine,
            "bt-01",
            format!("{{\"n\":{n}}}").into_bytes(),
        );
        assert!(tx.push(r, Some(ack)).await, "writer gone");
        rx.await.is_ok()
    }

    #[tokio::test]
    async fn a_full_disk_stops_acknowledgements_and_room_brings_them_back_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let disk = SmallDisk::new(&dir.path().join("small"), "4m");
        let (store, _) = SledStore::open(&disk.0.join("queue"), 1 << 20).unwrap();
        let queue = SharedQueue::new(store);
        let (tx, writer) = spawn_writer(
            queue.clone(),
            Duration::from_millis(1),
            1 << 30,
            Duration::from_secs(3600),
        );
        let mut acked = Vec::new();
        let mut n = 0u32;
        for _ in 0..50 {
            assert!(confirmed(&tx, n).await, "disk has room");
            acked.push(n);
            n += 1;
        }
        disk.fill("filler");
        // Readings go on being offered until one is refused (sled may still have room in a
        // segment it already has).
        let mut refused = false;
        for _ in 0..200_000 {
            n += 1;
            if !confirmed(&tx, n).await {
                refused = true;
                break;
            }
            acked.push(n);
        }
        assert!(refused, "a reading was acknowledged with the disk full");
        // Still refused while the disk is full, also after the store was opened again.
        let until = std::time::Instant::now() + crate::queue::RECOVERY_EVERY * 3;
        while std::time::Instant::now() < until {
            n += 1;
            assert!(!confirmed(&tx, n).await, "acknowledged with the disk full");
        }
        disk.free("filler");
        // Room again: readings are acknowledged again (the event waited for), with no restart.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            n += 1;
            if confirmed(&tx, n).await {
                acked.push(n);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no reading acknowledged within 60 s of freeing the disk"
            );
        }
        for _ in 0..50 {
            n += 1;
            assert!(confirmed(&tx, n).await, "after recovery");
            acked.push(n);
        }
        drop(tx);
        writer.await.unwrap();
        // Every acknowledged reading is queued, and the counters are those of the records
        // there (a failed append counted nothing).
        let payloads = |q: &mut SledStore| -> Vec<Vec<u8>> {
            q.read_after(None, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.payload)
                .collect()
        };
        let stored = queue.with(payloads);
        for a in &acked {
            let want = format!("{{\"n\":{a}}}").into_bytes();
            assert!(stored.contains(&want), "acknowledged reading {a} missing");
        }
        let st = queue.status();
        assert_eq!(st.depth, stored.len(), "depth counts what is stored");
        assert_eq!(
            st.bytes,
            queue.with(|q| {
                q.read_after(None, usize::MAX)
                    .unwrap()
                    .iter()
                    .map(|(_, r)| r.stored_len() as u64)
                    .sum::<u64>()
            })
        );
        // And from disk, as after a restart.
        drop(queue);
        let (again, report) = SledStore::open(&disk.0.join("queue"), 1 << 20).unwrap();
        assert_eq!(report.corrupt, 0);
        assert_eq!(again.len(), stored.len());
    }
}
