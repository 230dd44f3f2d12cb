//! The dead-letter store: every message a plugin failed or refused, with the reason.
//!
//! # On disk
//!
//! One JSON line per message ([`DeadLetter`], payload in base64) in
//! `<state_dir>/dead-letter/<YYYY-MM-DD>.jsonl`, the UTC day it was stored. Other files in the
//! directory are left alone (not counted, not removed).
//!
//! # Writing: in groups, off the PUBACK path
//!
//! The pipeline hands each entry, with the device's [`Ack`], to the dead-letter writer
//! ([`writer`]) through a bounded channel ([`CHANNEL_CAPACITY`]) and goes on with the next
//! message at once: one device sending garbage does not slow any other device's readings. The
//! writer takes everything waiting (up to [`MAX_GROUP`] entries), appends them to their day's
//! file, syncs each file once per group, and only then confirms each entry's `Ack`: the
//! failing device's PUBACK still waits until its dead letter is on disk. If the write fails,
//! those acknowledgements are dropped unconfirmed (the devices resend) and the failure is
//! logged as an ERROR: a message is never dropped without a trace. When the channel is full
//! (the disk is far behind), a new entry is refused the same way — not acknowledged, counted,
//! logged — instead of stalling the pipeline.
//!
//! # The bound: `[dead_letter]`
//!
//! The store is kept under `dead_letter.max_bytes` and `dead_letter.max_age` by removing whole
//! day files, oldest first: a day file whose last possible entry (the end of its UTC day) is
//! older than `max_age` goes, then, while the files together are over `max_bytes`, the oldest
//! ones. A file that has just received entries, and the newest day file, are never removed by
//! the bound: a new dead letter is never dropped because of it (so the store can exceed
//! `max_bytes` by at most the day file in use). The byte total is kept as files grow and go
//! between readings of the directory (at the start and every [`ENFORCE_INTERVAL`], so files
//! an operator removed are noticed), never recounted per write; the bound is applied at the
//! start, after every group and every [`ENFORCE_INTERVAL`]. What it removes is counted (files,
//! entries, bytes), shown by `wardgate status`, and logged as a WARN per file.

use super::{Ack, Ingest};
use crate::clock::epoch_ms;
use crate::config::DeadLetterConfig;
use crate::plugin_host::Failure;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Entries waiting for the dead-letter writer. A device's in-flight window is at most a few
/// hundred messages, so this absorbs several garbage-sending devices at once; beyond it the
/// disk is far behind, and entries are refused (not acknowledged) rather than stalling every
/// device's readings.
pub const CHANNEL_CAPACITY: usize = 1024;
/// Most entries written (and synced) as one group.
pub const MAX_GROUP: usize = 256;
/// How often the directory is read again and the bound applied when nothing is written.
pub const ENFORCE_INTERVAL: Duration = Duration::from_secs(60);

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When it was stored, ms since the UNIX epoch.
    pub stored_at_ms: i64,
    /// When the gateway received it.
    pub received_at_ms: i64,
    /// Authenticated device id.
    pub device_id: String,
    /// Device kind.
    pub kind: String,
    /// Plugin that should have handled it.
    pub plugin: String,
    /// MQTT topic.
    pub topic: String,
    /// Failure class (`malformed`, `out-of-range`, `unsupported`, `invalid-output`, `trap`,
    /// `device-contained`, `overloaded`, `host-error`, `no-plugin`).
    pub reason_kind: String,
    /// Failure explanation.
    pub reason: String,
    /// The payload, base64.
    pub payload_base64: String,
}

impl DeadLetter {
    /// The day file it belongs in: `YYYY-MM-DD` of `stored_at_ms`, UTC.
    pub fn day(&self) -> String {
        Self::day_of(std::time::UNIX_EPOCH + Duration::from_millis(self.stored_at_ms.max(0) as u64))
    }

    /// `YYYY-MM-DD` of `at`, UTC.
    pub fn day_of(at: SystemTime) -> String {
        humantime::format_rfc3339_seconds(at).to_string()[..10].to_owned()
    }
}

/// The store's directory.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    dir: PathBuf,
}

impl DeadLetters {
    /// A store under `<state_dir>/dead-letter`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("dead-letter"),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the file of `day` (`YYYY-MM-DD`).
    pub fn day_file(&self, day: &str) -> PathBuf {
        self.dir.join(format!("{day}.jsonl"))
    }

    /// The record for one failed message.
    pub fn entry(msg: &Ingest, failure: &Failure) -> DeadLetter {
        let now = SystemTime::now();
        DeadLetter {
            stored_at_ms: epoch_ms(now),
            received_at_ms: epoch_ms(msg.received_at),
            device_id: msg.device.id.to_string(),
            kind: msg.device.kind.to_string(),
            plugin: msg.device.plugin.to_string(),
            topic: msg.topic.clone(),
            reason_kind: failure.kind().to_owned(),
            reason: failure.to_string(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&msg.payload),
        }
    }

    /// Append `entries` to the files of the days they were stored (`stored_at_ms`, UTC), one
    /// write and one sync per file (blocking). Per day: the bytes appended, or why not.
    pub fn write_group(&self, entries: &[DeadLetter]) -> BTreeMap<String, std::io::Result<u64>> {
        let mut by_day: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for e in entries {
            let buf = by_day.entry(e.day()).or_default();
            // Plain data with string keys: serialising it cannot fail.
            serde_json::to_writer(&mut *buf, e).unwrap_or_default();
            buf.push(b'\n');
        }
        by_day
            .into_iter()
            .map(|(day, lines)| {
                let r = self.append(&day, &lines).map(|()| lines.len() as u64);
                (day, r)
            })
            .collect()
    }

    fn append(&self, day: &str, lines: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.day_file(day);
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(lines)?;
        f.sync_data()?;
        if new {
            // A new file's name must be durable too.
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Every stored message, oldest day file first (only regular `YYYY-MM-DD.jsonl` files are
    /// read).
    pub fn read_all(&self) -> Vec<DeadLetter> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_str().and_then(day_of_file_name).is_some())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// `YYYY-MM-DD` of a day file's name, if it is one.
fn day_of_file_name(name: &str) -> Option<&str> {
    let day = name.strip_suffix(".jsonl")?;
    day_start(day).map(|_| day)
}

/// Midnight UTC at the start of `day` (`YYYY-MM-DD`).
fn day_start(day: &str) -> Option<SystemTime> {
    if day.len() != 10 {
        return None;
    }
    humantime::parse_rfc3339(&format!("{day}T00:00:00Z")).ok()
}

/// Counters of the dead-letter store since start (visible in `wardgate status`).
#[derive(Debug, Default)]
pub struct DeadLetterCounters {
    /// Entries written and synced.
    pub written: AtomicU64,
    /// Entries whose write failed (not acknowledged; their devices resend).
    pub failed: AtomicU64,
    /// Entries refused because the writer was far behind (not acknowledged).
    pub refused_busy: AtomicU64,
    /// Day files removed by the bound.
    pub removed_files: AtomicU64,
    /// Entries in them.
    pub removed_entries: AtomicU64,
    /// Their bytes.
    pub removed_bytes: AtomicU64,
    /// Day files in the store now.
    pub files: AtomicU64,
    /// Their bytes now.
    pub bytes: AtomicU64,
}

impl DeadLetterCounters {
    /// A snapshot for the status file.
    pub fn status(&self) -> DeadLetterStatus {
        DeadLetterStatus {
            files: self.files.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            written: self.written.load(Relaxed),
            failed: self.failed.load(Relaxed),
            refused_busy: self.refused_busy.load(Relaxed),
            removed_files: self.removed_files.load(Relaxed),
            removed_entries: self.removed_entries.load(Relaxed),
            removed_bytes: self.removed_bytes.load(Relaxed),
        }
    }
}

/// The dead-letter store at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeadLetterStatus {
    /// Day files in the store.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Entries written since start.
    pub written: u64,
    /// Entries whose write failed since start (not acknowledged; their devices resend).
    pub failed: u64,
    /// Entries refused since start because the writer was far behind (not acknowledged).
    pub refused_busy: u64,
    /// Day files removed by `dead_letter.max_bytes` / `max_age` since start.
    pub removed_files: u64,
    /// Entries in them.
    pub removed_entries: u64,
    /// Their bytes.
    pub removed_bytes: u64,
}

/// Why an entry was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The writer is far behind: its channel is full.
    Busy,
    /// The writer has stopped.
    Stopped,
}

/// Where the pipeline hands dead letters to the writer.
#[derive(Debug, Clone)]
pub struct DeadLetterSender {
    tx: mpsc::Sender<(DeadLetter, Option<Ack>)>,
    counters: Arc<DeadLetterCounters>,
    dir: PathBuf,
    /// A new bound from a reload, taken by the writer before its next group or tick.
    bound: Arc<std::sync::Mutex<Option<DeadLetterConfig>>>,
}

impl DeadLetterSender {
    /// Give the writer a new bound (a reload); a lower one removes files at its next write.
    pub fn set_bound(&self, bound: DeadLetterConfig) {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
    }
}

impl DeadLetterSender {
    /// Hand over one entry without waiting; `ack` is confirmed once it is on disk. A refused
    /// entry's `ack` is dropped unconfirmed (its device resends).
    pub fn send(&self, entry: DeadLetter, ack: Option<Ack>) -> Result<(), Refused> {
        match self.tx.try_send((entry, ack)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.refused_busy.fetch_add(1, Relaxed);
                Err(Refused::Busy)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Stopped),
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's counters.
    pub fn counters(&self) -> &Arc<DeadLetterCounters> {
        &self.counters
    }
}

/// Why a day file was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    MaxAge,
    MaxBytes,
}

/// The day files and their sizes; the byte total kept as they grow and go.
#[derive(Debug, Default)]
struct Files {
    /// Whether the directory has been read (it is read once, then kept up to date).
    scanned: bool,
    days: BTreeMap<String, u64>,
    total: u64,
}

impl Files {
    fn scan(&mut self, store: &DeadLetters) -> std::io::Result<()> {
        self.days.clear();
        self.total = 0;
        let dir = match std::fs::read_dir(store.dir()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.scanned = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for entry in dir {
            let entry = entry?;
            let name = entry.file_name();
            let Some(day) = name.to_str().and_then(day_of_file_name) else {
                continue;
            };
            let meta = entry.metadata()?;
            if meta.is_file() {
                self.days.insert(day.to_owned(), meta.len());
                self.total += meta.len();
            }
        }
        self.scanned = true;
        Ok(())
    }

    /// `day`'s file grew by `bytes`.
    fn grew(&mut self, day: &str, bytes: u64) {
        *self.days.entry(day.to_owned()).or_default() += bytes;
        self.total += bytes;
    }

    /// `day`'s file has the size the disk says (after a failed write that may have left part).
    fn resync(&mut self, store: &DeadLetters, day: &str) {
        let len = std::fs::metadata(store.day_file(day)).map_or(0, |m| m.len());
        let old = self.days.insert(day.to_owned(), len).unwrap_or(0);
        self.total = self.total - old + len;
    }

    /// Apply the bound at `now`, never removing a day in `keep` or the newest day. Logs a
    /// WARN and counts every file removed.
    fn enforce(
        &mut self,
        store: &DeadLetters,
        bound: &DeadLetterConfig,
        now: SystemTime,
        keep: &BTreeSet<String>,
        counters: &DeadLetterCounters,
    ) {
        if !self.scanned {
            if let Err(e) = self.scan(store) {
                log::warn!(error:% = e, path:% = store.dir().display(); "cannot read the dead-letter directory: its bound (dead_letter.max_bytes, max_age) is not applied until it can be read");
                return;
            }
        }
        let newest = self.days.keys().next_back().cloned();
        let spared = |day: &String| keep.contains(day) || Some(day) == newest.as_ref();
        let floor = now.checked_sub(bound.max_age);
        let expired: Vec<String> = self
            .days
            .keys()
            .filter(|d| !spared(d))
            .filter(|d| {
                let end = day_start(d).map(|s| s + Duration::from_secs(24 * 3600));
                matches!((end, floor), (Some(end), Some(floor)) if end <= floor)
            })
            .cloned()
            .collect();
        for day in expired {
            self.remove(store, &day, Why::MaxAge, bound, counters);
        }
        while self.total > bound.max_bytes {
            let Some(oldest) = self.days.keys().find(|d| !spared(d)).cloned() else {
                break;
            };
            if !self.remove(store, &oldest, Why::MaxBytes, bound, counters) {
                break;
            }
        }
        counters.files.store(self.days.len() as u64, Relaxed);
        counters.bytes.store(self.total, Relaxed);
    }

    fn remove(
        &mut self,
        store: &DeadLetters,
        day: &str,
        why: Why,
        bound: &DeadLetterConfig,
        counters: &DeadLetterCounters,
    ) -> bool {
        let path = store.day_file(day);
        // Count what goes; a file that cannot be read counts as its lines are unknown (0).
        let entries = std::fs::read(&path)
            .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
            .unwrap_or(0);
        let bytes = self.days.get(day).copied().unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Removed by someone else (an operator clearing the store): not counted.
                self.days.remove(day);
                self.total -= bytes;
                return true;
            }
            Err(e) => {
                log::error!(error:% = e, path:% = path.display(); "cannot remove a dead-letter file: the store stays over its bound (dead_letter.max_bytes, max_age)");
                return false;
            }
        }
        self.days.remove(day);
        self.total -= bytes;
        counters.removed_files.fetch_add(1, Relaxed);
        counters.removed_entries.fetch_add(entries, Relaxed);
        counters.removed_bytes.fetch_add(bytes, Relaxed);
        let (reason, limit) = match why {
            Why::MaxAge => (
                "max_age",
                humantime::format_duration(bound.max_age).to_string(),
            ),
            Why::MaxBytes => ("max_bytes", format!("{} bytes", bound.max_bytes)),
        };
        log::warn!(
            path:% = path.display(), entries = entries, bytes = bytes, reason = reason,
            store_bytes = self.total;
            "dead-letter store over dead_letter.{reason} ({limit}): removed {} ({entries} messages, {bytes} bytes)",
            path.display()
        );
        true
    }
}

/// Start the dead-letter writer on its own task, unsupervised (see [`writer`]).
pub fn spawn_writer(
    store: DeadLetters,
    bound: DeadLetterConfig,
) -> (DeadLetterSender, tokio::task::JoinHandle<()>) {
    let (tx, w) = writer(store, bound, crate::supervisor::Heartbeat::detached());
    (tx, tokio::spawn(w))
}

/// The dead-letter writer and its entrance. The writer ends when every [`DeadLetterSender`]
/// is dropped, after writing what it has. It beats `beat` after every group and on an idle
/// tick; a write stuck in the kernel shows as a stalled stage. A panic while writing is the
/// writer's panic.
pub fn writer(
    store: DeadLetters,
    mut bound: DeadLetterConfig,
    beat: crate::supervisor::Heartbeat,
) -> (
    DeadLetterSender,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, mut rx) = mpsc::channel::<(DeadLetter, Option<Ack>)>(CHANNEL_CAPACITY);
    let counters = Arc::new(DeadLetterCounters::default());
    let sender = DeadLetterSender {
        tx,
        counters: counters.clone(),
        dir: store.dir().to_path_buf(),
        bound: Arc::default(),
    };
    let reloaded = sender.bound.clone();
    let task = async move {
        let mut files = Files::default();
        let mut tick = tokio::time::interval(ENFORCE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle = crate::supervisor::Heartbeat::ticker();
        loop {
            if let Some(b) = reloaded.lock().unwrap_or_else(|e| e.into_inner()).take() {
                bound = b;
                // Enforced anew at the next write or tick.
                files.scanned = false;
            }
            // The bound first (at start, and on each tick), then whatever waits.
            let first = tokio::select! {
                biased;
                _ = tick.tick() => {
                    // Read the directory again: an operator may have removed files.
                    files.scanned = false;
                    files = blocking(&store, &bound, &counters, files, Vec::new()).await.0;
                    beat.beat();
                    continue;
                }
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = idle.tick() => {
                    beat.beat();
                    continue;
                }
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(m) => group.push(m),
                    Err(_) => break,
                }
            }
            let (entries, acks): (Vec<DeadLetter>, Vec<Option<Ack>>) = group.into_iter().unzip();
            let days: Vec<String> = entries.iter().map(DeadLetter::day).collect();
            let (back, outcome) = blocking(&store, &bound, &counters, files, entries).await;
            files = back;
            let mut failed: BTreeMap<&str, (String, u64)> = BTreeMap::new();
            let mut written = 0u64;
            for (ack, day) in acks.into_iter().zip(&days) {
                match outcome.get(day) {
                    Some(Ok(_)) => {
                        written += 1;
                        if let Some(ack) = ack {
                            ack.confirm();
                        }
                    }
                    // Not safe anywhere: the acknowledgement is dropped, the device resends.
                    Some(Err(e)) => failed.entry(day).or_insert_with(|| (e.to_string(), 0)).1 += 1,
                    None => {
                        failed
                            .entry(day)
                            .or_insert_with(|| ("not written".into(), 0))
                            .1 += 1
                    }
                }
            }
            counters.written.fetch_add(written, Relaxed);
            for (day, (error, n)) in failed {
                counters.failed.fetch_add(n, Relaxed);
                log::error!(
                    error:% = error, path:% = store.day_file(day).display(), messages = n;
                    "cannot write the dead-letter store: {n} messages not acknowledged (their devices resend)"
                );
            }
            beat.beat();
        }
    };
    (sender, task)
}

/// Write `entries` (if any) and apply the bound, on a blocking thread; the file list comes back.
async fn blocking(
    store: &DeadLetters,
    bound: &DeadLetterConfig,
    counters: &Arc<DeadLetterCounters>,
    mut files: Files,
    entries: Vec<DeadLetter>,
) -> (Files, BTreeMap<String, std::io::Result<u64>>) {
    let (store, bound, counters) = (store.clone(), bound.clone(), counters.clone());
    let r = tokio::task::spawn_blocking(move || {
        if !files.scanned {
            files.enforce(
                &store,
                &bound,
                SystemTime::now(),
                &BTreeSet::new(),
                &counters,
            );
        }
        let outcome = if entries.is_empty() {
            BTreeMap::new()
        } else {
            store.write_group(&entries)
        };
        let mut keep: BTreeSet<String> = outcome.keys().cloned().collect();
        keep.insert(DeadLetter::day_of(SystemTime::now()));
        for (day, r) in &outcome {
            match r {
                Ok(n) => files.grew(day, *n),
                Err(_) => files.resync(&store, day),
            }
        }
        files.enforce(&store, &bound, SystemTime::now(), &keep, &counters);
        (files, outcome)
    })
    .await;
    match r {
        Ok(x) => x,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("dead-letter write cancelled: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stored_at_ms: i64) -> DeadLetter {
        DeadLetter {
            stored_at_ms,
            received_at_ms: stored_at_ms - 100,
            device_id: "pm-01".into(),
            kind: "pacemaker".into(),
            plugin: "pacemaker".into(),
            topic: "ward/pm-01/telemetry".into(),
            reason_kind: "malformed".into(),
            reason: "not JSON".into(),
            payload_base64: "eA==".into(),
        }
    }

    #[test]
    fn a_record_goes_to_the_file_of_the_day_it_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::new(dir.path());
        // 2026-11-27T23:59:59.900Z: the file is that day's, whatever the clock says now.
        let late = entry(1_795_823_999_900); // pure input: a day boundary, not today
        let next_day = entry(1_795_823_999_900 + 200); // pure input: 200 ms later, the next day
        let out = store.write_group(&[late, next_day]);
        assert_eq!(out.len(), 2);
        assert!(out.values().all(|r| r.is_ok()));
        assert!(store.day_file("2026-11-27").is_file());
        assert!(store.day_file("2026-11-28").is_file());
        assert_eq!(store.read_all().len(), 2);
    }

    fn day_ago(days: u64) -> String {
        DeadLetter::day_of(SystemTime::now() - Duration::from_secs(days * 24 * 3600))
    }

    #[test]
    fn the_bound_removes_old_and_oldest_day_files_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::new(dir.path());
        std::fs::create_dir_all(store.dir()).unwrap();
        let line = format!("{}\n", serde_json::to_string(&entry(0)).unwrap());
        for (days, lines) in [(40, 2), (10, 3), (5, 4), (1, 5)] {
            std::fs::write(store.day_file(&day_ago(days)), line.repeat(lines)).unwrap();
        }
        std::fs::write(store.dir().join("notes.txt"), "kept").unwrap();
        let per = line.len() as u64;
        let bound = DeadLetterConfig {
            // Room for the two newest files (9 lines), not for the one of 10 days ago too.
            max_bytes: per * 10,
            max_age: Duration::from_secs(30 * 24 * 3600),
        };
        let counters = DeadLetterCounters::default();
        let mut files = Files::default();
        files.enforce(
            &store,
            &bound,
            SystemTime::now(),
            &BTreeSet::new(),
            &counters,
        );
        let st = counters.status();
        assert_eq!(
            (st.removed_files, st.removed_entries, st.removed_bytes),
            (2, 5, per * 5)
        );
        assert_eq!((st.files, st.bytes), (2, per * 9));
        assert!(!store.day_file(&day_ago(40)).exists(), "over max_age");
        assert!(
            !store.day_file(&day_ago(10)).exists(),
            "oldest over max_bytes"
        );
        assert!(store.dir().join("notes.txt").exists(), "not a day file");
        // The newest file is never removed, even alone over the bound.
        let tiny = DeadLetterConfig {
            max_bytes: 1,
            ..bound
        };
        files.enforce(
            &store,
            &tiny,
            SystemTime::now(),
            &BTreeSet::new(),
            &counters,
        );
        assert!(store.day_file(&day_ago(1)).exists());
        assert_eq!(counters.status().files, 1);
        assert_eq!(counters.status().removed_entries, 9);
    }
}
