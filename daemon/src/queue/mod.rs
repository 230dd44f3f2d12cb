//! The durable offline queue: readings wait here, on disk, until the upstream acknowledged them.
//!
//! # On-disk format (sled database `<state_dir>/queue`)
//!
//! Tree `records`: queued records in **runs** — the records of one append (one group commit),
//! cut into values of about [`RUN_BYTES`]. sled's cost is per value (an insert copies and
//! re-sorts the tree node it lands in, and its page cache tracks every value), so a group
//! commit of hundreds of readings writes a few values instead of hundreds; that was most of
//! the queue's CPU per reading.
//! - key: the sequence number of the run's first record, 8 bytes big-endian; every record in
//!   the run has a number at or above it and below the next run's key, so key order is
//!   arrival order;
//! - value, run format (version 3): `3 (1 byte) | entries`, each entry `offset (4 bytes BE:
//!   its sequence number minus the key) | length (4 bytes BE) | record`;
//! - a record, format version 2: `version (1 byte, = 2) | class (1 byte) | crc32 (4 bytes BE) |
//!   enqueued_at_ms (8 bytes BE, signed) | stream (1 byte) | subject length (1 byte) | subject
//!   (UTF-8) | payload`; the CRC-32 (IEEE) covers every byte after the CRC, and the class byte.
//!   Each record keeps its own CRC, so damage costs only the records it touches.
//! - Values that are a single record of version 2 or 1 (`version = 1 | class | crc32 |
//!   enqueued_at_ms | payload`, CRC over `class | enqueued_at_ms | payload`; telemetry with
//!   no subject), keyed by its sequence number — the format before runs — are still read, as
//!   runs of one.
//!
//! When records leave (delivered, evicted, set aside), each run they were in is rewritten
//! once without them ([`Store::remove_all`] takes all of one upstream PUBACK's records at
//! once), or removed when empty; so a delivered record never comes back after a restart. The
//! byte counters count records (the version 2 bytes), not the 8 bytes of framing each.
//!
//! `class` decides order and eviction; `stream` decides the upstream topic (telemetry, alerts,
//! shadow, defender); `subject` is the device the record is about (empty: the gateway itself).
//! The topic is not stored: it is made from `upstream.topics` when the record is sent, so a
//! changed template applies to the backlog too.
//!
//! Tree `meta`: `next_seq` → the next sequence number, 8 bytes BE, written with every append.
//!
//! Tree `corrupt`: records found damaged when the queue was opened, moved here untouched for
//! forensics (never delivered, never deleted by the queue), keyed by their sequence number
//! (a run cut short: what follows its last intact record, under the next number); the
//! intact records of their run stay queued.
//!
//! Tree `undeliverable`: intact records the upstream can never take (a message over
//! `upstream.max_batch_bytes`, or a topic IoT Core would refuse), moved here by the uplink with
//! an ERROR in the journal so they cannot block the queue; kept for forensics like `corrupt`.
//!
//! # Invariants
//! 1. A record is durable (flushed) before anyone is told it is safe: [`Store::sync`] returns
//!    only after sled's flush, and callers acknowledge devices only after it.
//! 2. A record leaves `records` only by [`Store::remove`] (after the upstream's PUBACK), by
//!    eviction under the class policy ([`Store::evict`]), or by [`Store::set_aside`] (it can
//!    never be delivered); all three are counted. A removal that had
//!    not been synced before a crash may be undone — the record is then delivered again
//!    (at-least-once; duplicates carry the same sequence number). Evictions leave their run
//!    lazily (rewritten once half of a run has gone, and at a clean stop): after a crash, routine readings evicted shortly
//!    before it may be back, to be evicted again or delivered late — never lost early.
//! 3. Sequence numbers only grow, across restarts too (`meta.next_seq`, and never below the last
//!    stored key + 1).
//! 4. Damage found on open (bad CRC, unknown version or class, short value) is reported and
//!    moved aside; every intact record is still delivered.
//! 5. Alarms and security records are never evicted; routine records are evicted oldest first
//!    when the queue is over its byte bound, and when older than its age bound.
//! 7. Eviction costs what it evicts, not what is queued: a group commit during a long outage
//!    must cost the same with an empty queue and with hundreds of megabytes queued (see
//!    *Eviction* below). The byte and record counters are kept as records come and go, never
//!    recounted.
//! 6. The disk stays bounded even so: alarm and security records are accepted only while they
//!    fit in the byte bound by themselves ([`Store::priority_bytes`]). One that does not fit is
//!    refused — never acknowledged, so its device keeps it and sends it again — rather than
//!    accepted and dropped later.
//!
//! # Eviction
//!
//! Sequence numbers follow key order, so walking the runs is arrival order, and a routine record's
//! `enqueued_at_ms` is the wall clock at its append: it grows with the key. Eviction therefore
//! only ever looks at the *front* of the routine records. The store keeps a cursor,
//! `routine_front`: no routine record has a smaller sequence number (records only leave
//! `records`, and new ones get larger numbers, so the cursor stays true as it only moves
//! forward; it starts at 0 on open). One eviction pass walks from the run holding the cursor
//! (records of that run below the cursor are skipped by their framing alone) and looks at the
//! first record at or after the cursor: an alarm or security record (known from the in-memory `priority` set, without
//! reading its value) is stepped over and the cursor moves past it for good; a routine record
//! is judged from its header bytes alone (no CRC check, no copy of the payload: the value was
//! checked when the queue was opened or written by this process) — evicted when it is older
//! than the age bound, else when the queue is over its byte bound, else the pass ends. A pass
//! therefore reads the records it evicts, plus each alarm or security record once in its life,
//! plus one, and rewrites each run it evicted from once; records the uplink removed in the
//! middle are never seen.
//!
//! If the wall clock steps back, records appended after the step carry smaller times than the
//! ones before them. The pass stops at the first routine record that is not too old, so a
//! record behind it that is already too old stays until the records in front of it are
//! evicted or delivered: it is evicted *late*. It is never evicted *early*: a record is only
//! evicted for age when its own time is below the bound, and for bytes only when it is the
//! oldest routine record by arrival, exactly as without a clock step.
//!
//! The queue sits behind the [`Store`] trait so a model test can drive it with random
//! push / remove / crash / reopen sequences against a plain in-memory model. (In that test a
//! "crash" drops the store without a sync and reopens it; real power-loss style crashes are
//! the job of the gateway-level kill -9 tests.)
//!
//! Filled by the pipeline through the group-commit writer ([`spawn_writer`]) (durable before the device's
//! PUBACK), drained by [`crate::uplink`] (removed after the upstream's PUBACK).

mod writer;

pub use writer::{
    spawn_writer, writer, Bounds, Enqueue, QueueCounters, QueueStatus, SharedQueue, MAX_GROUP,
};

use std::path::Path;

/// Format version written into every record.
const FORMAT_VERSION: u8 = 2;
/// Bytes before the payload in a version 1 record.
const HEADER_V1: usize = 1 + 1 + 4 + 8;
/// Bytes before the subject in a version 2 record.
const HEADER_V2: usize = HEADER_V1 + 1 + 1;
/// Longest subject (a device id is at most 128 bytes).
pub const MAX_SUBJECT: usize = 255;

/// What a record is, for ordering and eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Raised by a rule; delivered first, never evicted.
    Alarm = 0,
    /// Security violation; never evicted.
    Security = 1,
    /// Ordinary reading; evicted first when the queue is full.
    Routine = 2,
}

impl Class {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Class::Alarm),
            1 => Some(Class::Security),
            2 => Some(Class::Routine),
            _ => None,
        }
    }

    /// Alarm and security records go upstream first and are never evicted.
    pub fn is_priority(self) -> bool {
        self != Class::Routine
    }
}

/// What kind of upstream message a record becomes, and so its topic (`upstream.topics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    /// A canonical reading; batched with others on `upstream.topics.telemetry`.
    Telemetry = 0,
    /// An alert (a rule fired, a security violation); batched on `upstream.topics.alerts`.
    Alert = 1,
    /// A device shadow update document; sent alone on `upstream.topics.shadow`.
    Shadow = 2,
    /// A Device Defender metrics report; sent alone on `upstream.topics.defender`.
    Defender = 3,
}

impl Stream {
    /// Every stream, in index order.
    pub const ALL: [Stream; 4] = [
        Stream::Telemetry,
        Stream::Alert,
        Stream::Shadow,
        Stream::Defender,
    ];

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Stream::Telemetry),
            1 => Some(Stream::Alert),
            2 => Some(Stream::Shadow),
            3 => Some(Stream::Defender),
            _ => None,
        }
    }

    /// The name used in configuration, logs and the status view.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Telemetry => "telemetry",
            Stream::Alert => "alerts",
            Stream::Shadow => "shadow",
            Stream::Defender => "defender",
        }
    }

    /// Whether records of this stream are packed together into one upstream message.
    pub fn is_batched(self) -> bool {
        matches!(self, Stream::Telemetry | Stream::Alert)
    }
}

/// One queued record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its class (order and eviction).
    pub class: Class,
    /// Its stream (upstream topic and message shape).
    pub stream: Stream,
    /// The device it is about; empty for the gateway itself. At most [`MAX_SUBJECT`] bytes.
    pub subject: String,
    /// When it was queued, ms since the UNIX epoch.
    pub enqueued_at_ms: i64,
    /// The message: a JSON document (canonical reading, alert, shadow update, defender report).
    pub payload: Vec<u8>,
}

impl Record {
    /// Bytes it takes in the `records` tree (what the queue's byte bound counts).
    pub fn stored_len(&self) -> usize {
        HEADER_V2 + subject_cut(&self.subject) + self.payload.len()
    }

    /// A telemetry record of `class` about `device`, queued now.
    pub fn telemetry(class: Class, device: &str, payload: Vec<u8>) -> Self {
        Self {
            class,
            stream: Stream::Telemetry,
            subject: device.to_owned(),
            enqueued_at_ms: crate::clock::now_ms(),
            payload,
        }
    }

    /// An alert raised by an edge rule about `device`: an alarm on the alerts stream.
    pub fn alert(device: &str, payload: Vec<u8>) -> Self {
        Self {
            class: Class::Alarm,
            stream: Stream::Alert,
            subject: device.to_owned(),
            enqueued_at_ms: crate::clock::now_ms(),
            payload,
        }
    }
}

/// Queue errors.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// sled failed.
    #[error("queue storage error: {0}")]
    Storage(#[from] sled::Error),
    /// The database was closed after a write error and could not be opened again yet (see
    /// [`SledStore::recover`]).
    #[error("queue storage closed after a write error, not yet reopened (is the disk full?)")]
    Closed,
}

/// Shortest time between two [`SledStore::recover`] tries: opening reads every queued record.
pub const RECOVERY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What opening found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Intact records.
    pub records: usize,
    /// Damaged records moved to the `corrupt` tree.
    pub corrupt: usize,
}

/// What eviction removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Routine records removed because the queue was over its byte bound.
    pub over_bytes: u64,
    /// Routine records removed because they were older than the age bound.
    pub over_age: u64,
}

/// The queue's storage.
pub trait Store {
    /// Append records (not yet durable); returns their sequence numbers.
    fn append(&mut self, records: &[Record]) -> Result<Vec<u64>, QueueError>;
    /// Make every earlier append and remove durable.
    fn sync(&mut self) -> Result<(), QueueError>;
    /// Up to `limit` records with a sequence number greater than `after`, in order.
    fn read_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, QueueError>;
    /// The oldest `limit` alarm and security records, in order (they go upstream before the
    /// routine backlog).
    fn read_priority(&self, limit: usize) -> Result<Vec<(u64, Record)>, QueueError>;
    /// Delete a record (after the upstream acknowledged it). `false` if it was not there.
    fn remove(&mut self, seq: u64) -> Result<bool, QueueError>;
    /// Delete records (the ones one upstream PUBACK acknowledged); how many were there.
    /// Cheaper than one [`Store::remove`] each: records stored together are rewritten once.
    fn remove_all(&mut self, seqs: &[u64]) -> Result<usize, QueueError> {
        let mut n = 0;
        for &seq in seqs {
            n += usize::from(self.remove(seq)?);
        }
        Ok(n)
    }
    /// Move a record the upstream can never take out of the queue, kept for forensics.
    /// `false` if it was not there.
    fn set_aside(&mut self, seq: u64) -> Result<bool, QueueError>;
    /// Evict routine records: oldest first while over `max_bytes`, and all older than
    /// `min_enqueued_at_ms`.
    fn evict(&mut self, max_bytes: u64, min_enqueued_at_ms: i64) -> Result<Evicted, QueueError>;
    /// Records queued.
    fn len(&self) -> usize;
    /// Whether nothing is queued.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of records queued (values as stored).
    fn bytes(&self) -> u64;
    /// Of those, the bytes of alarm and security records.
    fn priority_bytes(&self) -> u64;
}

/// How many bytes of `subject` a record keeps: a subject longer than a length byte can say
/// is cut at a character boundary (device ids are at most 128 bytes, so this never happens
/// for records the gateway makes).
fn subject_cut(subject: &str) -> usize {
    let mut cut = subject.len().min(MAX_SUBJECT);
    while !subject.is_char_boundary(cut) {
        cut -= 1;
    }
    cut
}

/// The CRC of a record's bytes `v`: over the class byte and everything after the CRC.
fn record_crc(v: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&v[1..2]);
    h.update(&v[6..]);
    h.finalize()
}

#[cfg(test)]
fn encode(r: &Record) -> Vec<u8> {
    let mut v = Vec::with_capacity(r.stored_len());
    encode_into(r, &mut v);
    v
}

/// Append the record's bytes (format version 2) to `out`.
fn encode_into(r: &Record, out: &mut Vec<u8>) {
    let subject = &r.subject.as_bytes()[..subject_cut(&r.subject)];
    let begin = out.len();
    let v = out;
    v.push(FORMAT_VERSION);
    v.push(r.class as u8);
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&r.enqueued_at_ms.to_be_bytes());
    v.push(r.stream as u8);
    v.push(subject.len() as u8);
    v.extend_from_slice(subject);
    v.extend_from_slice(&r.payload);
    let crc = record_crc(&v[begin..]);
    v[begin + 2..begin + 6].copy_from_slice(&crc.to_be_bytes());
}

fn decode(v: &[u8]) -> Option<Record> {
    #[cfg(test)]
    tests::count_decode();
    if v.len() < HEADER_V1 || !(1..=FORMAT_VERSION).contains(&v[0]) {
        return None;
    }
    let class = Class::from_byte(v[1])?;
    let crc = u32::from_be_bytes(v[2..6].try_into().ok()?);
    if record_crc(v) != crc {
        return None;
    }
    let enqueued_at_ms = i64::from_be_bytes(v[6..14].try_into().ok()?);
    if v[0] == 1 {
        return Some(Record {
            class,
            stream: Stream::Telemetry,
            subject: String::new(),
            enqueued_at_ms,
            payload: v[HEADER_V1..].to_vec(),
        });
    }
    if v.len() < HEADER_V2 {
        return None;
    }
    let stream = Stream::from_byte(v[14])?;
    let end = HEADER_V2 + usize::from(v[15]);
    let subject = std::str::from_utf8(v.get(HEADER_V2..end)?).ok()?.to_owned();
    Some(Record {
        class,
        stream,
        subject,
        enqueued_at_ms,
        payload: v[end..].to_vec(),
    })
}

/// The `enqueued_at_ms` of a stored value, from its header alone (both format versions keep it
/// at the same place); `None` for a value too short to hold it.
fn header_time(v: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(v.get(6..14)?.try_into().ok()?))
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

/// Format version of a run value (see *On-disk format*).
const RUN_VERSION: u8 = 3;
/// Bytes in front of each record in a run: its offset from the run's key and its length.
const ENTRY_HEADER: usize = 4 + 4;
/// A run is closed once it holds this many bytes. Large enough that a group commit of
/// hundreds of readings is a few sled values instead of hundreds (sled's cost is per value:
/// each insert copies and re-sorts the tree node it lands in); small enough that rewriting a
/// run when some of its records leave copies little.
pub const RUN_BYTES: usize = 16 * 1024;

/// One record's place in a stored value.
#[derive(Debug, Clone, Copy)]
struct Entry<'a> {
    seq: u64,
    /// The record, format version 1 or 2.
    bytes: &'a [u8],
}

/// The records of the value stored under `run_key`: a run (version 3) or a single record of
/// version 1 or 2 (key = its sequence number). The second part is what could not be framed
/// (empty for an intact value): an unknown version, or a run cut short.
fn entries(run_key: u64, v: &[u8]) -> (Vec<Entry<'_>>, &[u8]) {
    match v.first() {
        Some(1 | 2) => (
            vec![Entry {
                seq: run_key,
                bytes: v,
            }],
            &[],
        ),
        Some(&RUN_VERSION) => {
            let mut out = Vec::new();
            let mut i = 1;
            while i < v.len() {
                let Some(head) = v.get(i..i + ENTRY_HEADER) else {
                    return (out, &v[i..]);
                };
                let offset = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
                let start = i + ENTRY_HEADER;
                let Some(bytes) = start.checked_add(len).and_then(|end| v.get(start..end)) else {
                    return (out, &v[i..]);
                };
                out.push(Entry {
                    seq: run_key + u64::from(offset),
                    bytes,
                });
                i = start + len;
            }
            (out, &[])
        }
        _ => (Vec::new(), v),
    }
}

/// A run value holding `entries` (their sequence numbers at most `u32::MAX` above `run_key`,
/// which holds for runs made from one append).
fn encode_run<'a>(run_key: u64, entries: impl IntoIterator<Item = Entry<'a>>) -> Vec<u8> {
    let mut v = vec![RUN_VERSION];
    for e in entries {
        push_entry(&mut v, run_key, e.seq, e.bytes);
    }
    v
}

fn push_entry(run: &mut Vec<u8>, run_key: u64, seq: u64, record: &[u8]) {
    push_entry_header(run, run_key, seq, record.len());
    run.extend_from_slice(record);
}

/// An entry's framing: its offset from the run's key and the length of the record after it.
fn push_entry_header(run: &mut Vec<u8>, run_key: u64, seq: u64, len: usize) {
    // Both fit: a run spans one append's sequence numbers, a record is below 4 GiB.
    run.extend_from_slice(&((seq - run_key) as u32).to_be_bytes());
    run.extend_from_slice(&(len as u32).to_be_bytes());
}

/// A value found damaged on open: what is left of it, and its damaged parts.
struct Repair {
    key: sled::IVec,
    /// The intact records, as a run (`None`: nothing intact, the value goes).
    left: Option<Vec<u8>>,
    /// Damaged parts, by sequence number, for the `corrupt` tree.
    damaged: Vec<(u64, Vec<u8>)>,
}

/// The open sled database of a [`SledStore`] and its trees.
#[derive(Debug)]
struct Trees {
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    undeliverable: sled::Tree,
}

/// The sled-backed queue.
#[derive(Debug)]
pub struct SledStore {
    /// `None` after a failed [`SledStore::recover`]: every operation fails until a later one
    /// opens the database again.
    trees: Option<Trees>,
    /// Where it is, and its cache bound, to open it again ([`SledStore::recover`]).
    dir: std::path::PathBuf,
    cache_bytes: u64,
    /// When [`SledStore::recover`] last tried.
    last_recovery: Option<std::time::Instant>,
    /// Keys of the values in `records` (rebuilt on open): the run holding a sequence number
    /// is the one with the greatest key at or below it.
    runs: std::collections::BTreeSet<u64>,
    /// Records evicted but still in their run on disk, by run (see
    /// [`SledStore::take_many`]); empty on open.
    pending: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>>,
    /// Sequence numbers of queued alarm and security records (rebuilt on open).
    priority: std::collections::BTreeSet<u64>,
    /// No routine record in `records` has a smaller sequence number (see *Eviction*).
    routine_front: u64,
    next_seq: u64,
    count: usize,
    bytes: u64,
    priority_bytes: u64,
}

impl SledStore {
    /// Open (or create) the queue in `dir`; `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<(Self, OpenReport), QueueError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let records = db.open_tree("records")?;
        let meta = db.open_tree("meta")?;
        let corrupt = db.open_tree("corrupt")?;
        let undeliverable = db.open_tree("undeliverable")?;
        let mut report = OpenReport::default();
        let (mut count, mut bytes, mut priority_bytes, mut last) = (0usize, 0u64, 0u64, None);
        let mut runs = std::collections::BTreeSet::new();
        let mut priority = std::collections::BTreeSet::new();
        let mut repairs: Vec<Repair> = Vec::new();
        for item in records.iter() {
            let (k, v) = item?;
            let Some(run_key) = seq_of(&k) else {
                repairs.push(Repair {
                    key: k,
                    left: None,
                    damaged: vec![(0, v.to_vec())],
                });
                continue;
            };
            let (found, tail) = entries(run_key, &v);
            let (mut kept, mut damaged) = (Vec::new(), Vec::new());
            for e in found {
                match decode(e.bytes) {
                    Some(r) => {
                        let len = e.bytes.len() as u64;
                        if r.class.is_priority() {
                            priority.insert(e.seq);
                            priority_bytes += len;
                        }
                        count += 1;
                        bytes += len;
                        last = last.max(Some(e.seq));
                        kept.push(e);
                    }
                    None => damaged.push((e.seq, e.bytes.to_vec())),
                }
            }
            if !tail.is_empty() {
                let at = kept.last().map_or(run_key, |e| e.seq + 1);
                damaged.push((at, tail.to_vec()));
            }
            if damaged.is_empty() && !kept.is_empty() {
                runs.insert(run_key);
                continue;
            }
            let left = (!kept.is_empty()).then(|| {
                runs.insert(run_key);
                encode_run(run_key, kept.iter().copied())
            });
            repairs.push(Repair {
                key: k.clone(),
                left,
                damaged,
            });
        }
        for r in repairs {
            for (seq, v) in r.damaged {
                corrupt.insert(key(seq), v)?;
                report.corrupt += 1;
            }
            match r.left {
                Some(v) => records.insert(&r.key, v)?,
                None => records.remove(&r.key)?,
            };
        }
        if report.corrupt > 0 {
            db.flush()?;
        }
        report.records = count;
        let stored_next = meta.get("next_seq")?.and_then(|v| seq_of(&v)).unwrap_or(0);
        let next_seq = stored_next.max(last.map_or(0, |l| l + 1)).max(1);
        Ok((
            Self {
                trees: Some(Trees {
                    db,
                    records,
                    meta,
                    undeliverable,
                }),
                dir: dir.to_path_buf(),
                cache_bytes,
                last_recovery: None,
                runs,
                pending: Default::default(),
                priority,
                routine_front: 0,
                next_seq,
                count,
                bytes,
                priority_bytes,
            },
            report,
        ))
    }

    /// The database, or [`QueueError::Closed`] while a [`SledStore::recover`] has not yet
    /// opened it again.
    fn trees(&self) -> Result<&Trees, QueueError> {
        self.trees.as_ref().ok_or(QueueError::Closed)
    }

    /// After a failed write: close the database and open it again, at most once per
    /// [`RECOVERY_EVERY`] (`None`: not tried, too soon after the last try).
    ///
    /// sled 0.34 keeps the first I/O error of a write to its log (`ENOSPC` when the disk is
    /// full) as the database's error and returns it from every later operation, so without
    /// this the queue would refuse every reading until a restart, long after the disk has room
    /// again. Opening again is what a restart does: every record that was flushed is there
    /// (invariant 1), the counters are recounted from disk (an append that failed must not
    /// count), records evicted lazily may come back (invariant 2, as after a crash), and
    /// sequence numbers go on from where this store was, never below (invariant 3), so no
    /// reader's cursor sees a number twice. When opening fails too (the disk is still full),
    /// the store stays closed and the next call tries again.
    pub fn recover(&mut self) -> Option<Result<OpenReport, QueueError>> {
        if self
            .last_recovery
            .is_some_and(|t| t.elapsed() < RECOVERY_EVERY)
        {
            return None;
        }
        self.last_recovery = Some(std::time::Instant::now());
        // Dropping the handles closes the database and releases its lock, so it can be opened.
        self.trees = None;
        self.pending.clear();
        Some(
            Self::open(&self.dir, self.cache_bytes).map(|(mut fresh, report)| {
                fresh.next_seq = fresh.next_seq.max(self.next_seq);
                fresh.last_recovery = self.last_recovery;
                *self = fresh;
                report
            }),
        )
    }

    /// Key of the run that holds `seq`, if any run could.
    fn run_of(&self, seq: u64) -> Option<u64> {
        self.runs.range(..=seq).next_back().copied()
    }

    /// Where a walk over the records from `seq` on starts: the run holding it, or the first
    /// one after it.
    fn walk_from(&self, seq: u64) -> [u8; 8] {
        key(self.run_of(seq).unwrap_or(seq))
    }

    /// Take the records `seqs` (any order) out of the queue, keeping the counters true;
    /// returns what was taken, as stored (numbers not queued are ignored). Each run they are
    /// in is rewritten once without them, or removed when nothing is left in it — except,
    /// with `lazy`, while less than half of a run has left: then they are only noted in
    /// [`SledStore::pending`] (gone for every reader and counter) and leave the run on disk
    /// with a later rewrite. Eviction uses that: during an outage every group commit evicts
    /// a few readings from the front run, and rewriting 16 KiB for each pass cost more than
    /// the readings themselves.
    fn take_many(&mut self, seqs: &[u64], lazy: bool) -> Result<Vec<(u64, Vec<u8>)>, QueueError> {
        let mut by_run: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> =
            std::collections::BTreeMap::new();
        for &seq in seqs {
            if let Some(run_key) = self.run_of(seq) {
                by_run.entry(run_key).or_default().insert(seq);
            }
        }
        let mut batch = sled::Batch::default();
        let mut taken = Vec::new();
        let mut emptied = Vec::new();
        for (run_key, doomed) in by_run {
            let Some(v) = self.trees()?.records.get(key(run_key))? else {
                continue;
            };
            let (found, _) = entries(run_key, &v);
            let physical = found.len();
            let pending = self.pending.remove(&run_key).unwrap_or_default();
            let (gone, kept): (Vec<Entry>, Vec<Entry>) = found
                .into_iter()
                .filter(|e| !pending.contains(&e.seq))
                .partition(|e| doomed.contains(&e.seq));
            for e in &gone {
                let len = e.bytes.len() as u64;
                self.count -= 1;
                self.bytes -= len;
                if self.priority.remove(&e.seq) {
                    self.priority_bytes -= len;
                }
                taken.push((e.seq, e.bytes.to_vec()));
            }
            let left_run = pending.len() + gone.len();
            if lazy && !kept.is_empty() && left_run * 2 < physical {
                let mut pending = pending;
                pending.extend(gone.iter().map(|e| e.seq));
                if !pending.is_empty() {
                    self.pending.insert(run_key, pending);
                }
            } else if gone.is_empty() && pending.is_empty() {
                // Nothing of this run leaves.
            } else if kept.is_empty() {
                batch.remove(&key(run_key));
                emptied.push(run_key);
            } else {
                batch.insert(&key(run_key), encode_run(run_key, kept));
            }
        }
        self.trees()?.records.apply_batch(batch)?;
        for run_key in emptied {
            self.runs.remove(&run_key);
        }
        Ok(taken)
    }

    /// Whether `seq` of run `run_key` has left the queue but not yet its run on disk.
    fn is_pending(&self, run_key: u64, seq: u64) -> bool {
        self.pending.get(&run_key).is_some_and(|p| p.contains(&seq))
    }

    /// Write out every pending removal (see [`SledStore::take_many`]).
    fn settle(&mut self) -> Result<(), QueueError> {
        // Taking them again takes nothing (they are out of every count already) but rewrites
        // their runs without them.
        let pending: Vec<u64> = self.pending.values().flatten().copied().collect();
        self.take_many(&pending, false).map(|_| ())
    }
}

impl Drop for SledStore {
    /// A clean stop writes out pending evictions, so they do not come back on the next start
    /// (after a crash they may: they are evicted again, late, never lost before their time).
    fn drop(&mut self) {
        if self.settle().is_ok() {
            if let Some(t) = &self.trees {
                let _ = t.db.flush();
            }
        }
    }
}

impl Store for SledStore {
    fn append(&mut self, records: &[Record]) -> Result<Vec<u64>, QueueError> {
        // Counted only once sled has the batch: a failed append must not count.
        let mut seqs = Vec::with_capacity(records.len());
        let mut batch = sled::Batch::default();
        let (mut run, mut run_key) = (Vec::new(), 0);
        let mut run_keys = Vec::new();
        let (mut bytes, mut priority_bytes, mut priority) = (0u64, 0u64, Vec::new());
        let mut next_seq = self.next_seq;
        for r in records {
            let len = r.stored_len();
            let seq = next_seq;
            next_seq += 1;
            bytes += len as u64;
            if r.class.is_priority() {
                priority.push(seq);
                priority_bytes += len as u64;
            }
            if run.is_empty() {
                run.reserve(RUN_BYTES + len + ENTRY_HEADER);
                run.push(RUN_VERSION);
                run_key = seq;
            }
            // The entry's framing, then the record written in place.
            push_entry_header(&mut run, run_key, seq, len);
            encode_into(r, &mut run);
            if run.len() >= RUN_BYTES {
                batch.insert(&key(run_key), std::mem::take(&mut run));
                run_keys.push(run_key);
            }
            seqs.push(seq);
        }
        if !run.is_empty() {
            batch.insert(&key(run_key), run);
            run_keys.push(run_key);
        }
        // Numbers are spent even when the write fails: a reader may have seen them.
        self.next_seq = next_seq;
        let trees = self.trees()?;
        trees.records.apply_batch(batch)?;
        self.runs.extend(run_keys);
        self.priority.extend(priority);
        self.count += records.len();
        self.bytes += bytes;
        self.priority_bytes += priority_bytes;
        self.trees()?.meta.insert("next_seq", &key(self.next_seq))?;
        Ok(seqs)
    }

    fn sync(&mut self) -> Result<(), QueueError> {
        self.trees()?.db.flush()?;
        Ok(())
    }

    fn read_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, QueueError> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for item in self.trees()?.records.range(self.walk_from(start)..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let Some(run_key) = seq_of(&k) else { continue };
            for e in entries(run_key, &v).0 {
                if e.seq < start || self.is_pending(run_key, e.seq) {
                    continue;
                }
                if out.len() >= limit {
                    break;
                }
                if let Some(r) = decode(e.bytes) {
                    out.push((e.seq, r));
                }
            }
        }
        Ok(out)
    }

    fn read_priority(&self, limit: usize) -> Result<Vec<(u64, Record)>, QueueError> {
        let mut out = Vec::new();
        // Alarms raised together share a run: read each run once.
        let mut run: Option<(u64, sled::IVec)> = None;
        for &seq in self.priority.iter().take(limit) {
            let Some(run_key) = self.run_of(seq) else {
                continue;
            };
            if run.as_ref().map(|(k, _)| *k) != Some(run_key) {
                run = self
                    .trees()?
                    .records
                    .get(key(run_key))?
                    .map(|v| (run_key, v));
            }
            let Some((_, v)) = &run else { continue };
            let found = entries(run_key, v).0.into_iter().find(|e| e.seq == seq);
            if let Some(r) = found.and_then(|e| decode(e.bytes)) {
                out.push((seq, r));
            }
        }
        Ok(out)
    }

    fn remove(&mut self, seq: u64) -> Result<bool, QueueError> {
        Ok(!self.take_many(&[seq], false)?.is_empty())
    }

    fn remove_all(&mut self, seqs: &[u64]) -> Result<usize, QueueError> {
        Ok(self.take_many(seqs, false)?.len())
    }

    fn set_aside(&mut self, seq: u64) -> Result<bool, QueueError> {
        match self.take_many(&[seq], false)?.pop() {
            Some((seq, v)) => {
                self.trees()?.undeliverable.insert(key(seq), v)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn evict(&mut self, max_bytes: u64, min_enqueued_at_ms: i64) -> Result<Evicted, QueueError> {
        let mut ev = Evicted::default();
        let mut front = self.routine_front;
        let mut doomed = Vec::new();
        let mut freed = 0u64;
        'walk: for item in self.trees()?.records.range(self.walk_from(front)..) {
            let (k, v) = item?;
            let Some(run_key) = seq_of(&k) else { break };
            for e in entries(run_key, &v).0 {
                if e.seq < front {
                    // Stepped over before (an alarm or security record), or evicted.
                    continue;
                }
                #[cfg(test)]
                tests::count_touched();
                if self.priority.contains(&e.seq) {
                    // Never evicted, and nothing routine is in front of it: step over it for good.
                    front = e.seq + 1;
                    continue;
                }
                let Some(enqueued_at_ms) = header_time(e.bytes) else {
                    break 'walk;
                };
                if enqueued_at_ms < min_enqueued_at_ms {
                    ev.over_age += 1;
                } else if self.bytes - freed > max_bytes {
                    ev.over_bytes += 1;
                } else {
                    break 'walk;
                }
                freed += e.bytes.len() as u64;
                front = e.seq + 1;
                doomed.push(e.seq);
            }
        }
        // One rewrite per run touched; the cursor moves only once that is applied.
        if !doomed.is_empty() {
            self.take_many(&doomed, true)?;
        }
        self.routine_front = front;
        Ok(ev)
    }

    fn len(&self) -> usize {
        self.count
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn priority_bytes(&self) -> u64 {
        self.priority_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::cell::Cell;
    use std::collections::BTreeMap;

    thread_local! {
        /// Values fully decoded on this thread.
        static DECODES: Cell<u64> = const { Cell::new(0) };
        /// Records eviction looked at on this thread.
        static TOUCHED: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn count_decode() {
        DECODES.with(|c| c.set(c.get() + 1));
    }

    pub(super) fn count_touched() {
        TOUCHED.with(|c| c.set(c.get() + 1));
    }

    /// (decodes, records looked at by eviction) on this thread so far.
    fn counted() -> (u64, u64) {
        (DECODES.with(Cell::get), TOUCHED.with(Cell::get))
    }

    /// What eviction must do, on the model: walk the records in sequence order, skip alarms
    /// and security records, evict routine ones while too old or while over the byte bound,
    /// stop at the first routine record that is neither.
    fn model_evict(live: &mut BTreeMap<u64, Record>, max_bytes: u64, floor: i64) -> Evicted {
        let mut bytes: u64 = live.values().map(|r| r.stored_len() as u64).sum();
        let mut ev = Evicted::default();
        let mut doomed = Vec::new();
        for (s, r) in live.iter() {
            if r.class.is_priority() {
                continue;
            }
            if r.enqueued_at_ms < floor {
                ev.over_age += 1;
            } else if bytes > max_bytes {
                ev.over_bytes += 1;
            } else {
                break;
            }
            bytes -= r.stored_len() as u64;
            doomed.push(*s);
        }
        for s in doomed {
            live.remove(&s);
        }
        ev
    }

    fn model_bytes(live: &BTreeMap<u64, Record>, priority_only: bool) -> u64 {
        live.values()
            .filter(|r| !priority_only || r.class.is_priority())
            .map(|r| r.stored_len() as u64)
            .sum()
    }

    fn rec(class: Class, at: i64, n: u32) -> Record {
        Record {
            class,
            stream: Stream::Telemetry,
            subject: format!("pm-{:02}", n % 7),
            enqueued_at_ms: at,
            payload: format!("reading {n}").into_bytes(),
        }
    }

    #[test]
    fn format_round_trips_and_detects_damage() {
        let r = rec(Class::Alarm, crate::clock::now_ms(), 7);
        let mut v = encode(&r);
        assert_eq!(decode(&v), Some(r));
        let last = v.len() - 1;
        v[last] ^= 1;
        assert_eq!(decode(&v), None, "payload bit flip");
        let mut v = encode(&rec(Class::Routine, 1, 1));
        v[0] = 9;
        assert_eq!(decode(&v), None, "unknown version");
        assert_eq!(decode(&[1, 2, 3]), None, "short value");
        let mut v = encode(&rec(Class::Routine, 1, 1));
        v[14] = 9;
        assert_eq!(
            decode(&v),
            None,
            "unknown stream (even with a matching CRC)"
        );
        let mut v = encode(&rec(Class::Routine, 1, 1));
        v[15] = 200;
        let crc = crc32fast::hash(&[&v[1..2], &v[6..]].concat());
        v[2..6].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(decode(&v), None, "subject length beyond the value");
        for stream in Stream::ALL {
            let r = Record {
                class: Class::Security,
                stream,
                subject: String::new(),
                enqueued_at_ms: -5,
                payload: b"{}".to_vec(),
            };
            assert_eq!(decode(&encode(&r)), Some(r));
        }
    }

    #[test]
    fn version_1_records_still_decode_as_telemetry() {
        // A value written by format version 1: no stream, no subject.
        let at = crate::clock::now_ms();
        let mut v = vec![1u8, Class::Alarm as u8, 0, 0, 0, 0];
        v.extend_from_slice(&at.to_be_bytes());
        v.extend_from_slice(b"{\"device_id\":\"pm-01\"}");
        let crc = crc32fast::hash(&[&v[1..2], &v[6..]].concat());
        v[2..6].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode(&v),
            Some(Record {
                class: Class::Alarm,
                stream: Stream::Telemetry,
                subject: String::new(),
                enqueued_at_ms: at,
                payload: b"{\"device_id\":\"pm-01\"}".to_vec(),
            })
        );
    }

    #[test]
    fn a_long_subject_is_cut_at_a_character_boundary() {
        let r = Record {
            subject: "é".repeat(200),
            ..rec(Class::Routine, 1, 1)
        };
        assert_eq!(encode(&r).len(), r.stored_len());
        let back = decode(&encode(&r)).unwrap();
        assert_eq!(back.subject, "é".repeat(127));
        assert_eq!(back.payload, r.payload);
    }

    #[test]
    fn set_aside_moves_a_record_out_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
        let seqs = q
            .append(&[rec(Class::Alarm, 1, 1), rec(Class::Routine, 2, 2)])
            .unwrap();
        assert!(q.set_aside(seqs[0]).unwrap());
        assert!(!q.set_aside(seqs[0]).unwrap());
        assert_eq!(q.len(), 1);
        assert!(q.read_priority(10).unwrap().is_empty());
        q.sync().unwrap();
        drop(q);
        let (q, report) = reopen(dir.path());
        assert_eq!(report.records, 1);
        let aside = q.trees().unwrap().db.open_tree("undeliverable").unwrap();
        assert_eq!(
            decode(&aside.get(key(seqs[0])).unwrap().unwrap()),
            Some(rec(Class::Alarm, 1, 1))
        );
    }

    /// Reopen after a drop: sled's background flusher may hold the file lock for a moment.
    fn reopen(dir: &std::path::Path) -> (SledStore, OpenReport) {
        for _ in 0..200 {
            match SledStore::open(dir, 1 << 20) {
                Ok(x) => return x,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        SledStore::open(dir, 1 << 20).expect("queue reopens")
    }

    /// Random push / sync / remove / evict / crash / reopen against an in-memory model.
    ///
    /// Model: `synced` holds what must survive a crash; `live` what is in the queue now.
    /// After a crash the reopened queue must hold every synced, not-removed-and-synced record,
    /// nothing that was never appended, and every record intact and in sequence order.
    /// Appends mix routine, alarm and security records; the uplink's removals come in any
    /// order; eviction runs with random byte and age bounds and must take exactly what the
    /// model's eviction takes. The record and byte counters must match the model after every
    /// step.
    #[test]
    fn model_random_operations_with_crashes() {
        for seed in 0..12u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
            let mut live: BTreeMap<u64, Record> = BTreeMap::new();
            let mut durable: BTreeMap<u64, Record> = BTreeMap::new();
            let mut ever: BTreeMap<u64, Record> = BTreeMap::new();
            let mut n = 0u32;
            let mut last_seq = 0;
            let (mut evicted_age, mut evicted_bytes) = (0, 0);
            for _ in 0..400 {
                match rng.gen_range(0..100) {
                    0..=39 => {
                        let batch: Vec<Record> = (0..rng.gen_range(1..6))
                            .map(|_| {
                                n += 1;
                                let class = match rng.gen_range(0..10) {
                                    0 => Class::Alarm,
                                    1 => Class::Security,
                                    _ => Class::Routine,
                                };
                                rec(class, i64::from(n), n)
                            })
                            .collect();
                        let seqs = q.append(&batch).unwrap();
                        for (s, r) in seqs.into_iter().zip(batch) {
                            assert!(s > last_seq, "sequence numbers grow");
                            last_seq = s;
                            live.insert(s, r.clone());
                            ever.insert(s, r);
                        }
                    }
                    40..=54 => {
                        q.sync().unwrap();
                        durable = live.clone();
                    }
                    55..=64 => {
                        // The uplink delivers the oldest record...
                        if let Some(&s) = live.keys().next() {
                            assert!(q.remove(s).unwrap());
                            live.remove(&s);
                        }
                    }
                    65..=74 => {
                        // ...or one further back (priority records go first, batches
                        // complete out of order).
                        if !live.is_empty() {
                            let i = rng.gen_range(0..live.len());
                            let s = *live.keys().nth(i).unwrap();
                            assert!(q.remove(s).unwrap());
                            assert!(!q.remove(s).unwrap(), "removed once");
                            live.remove(&s);
                        }
                    }
                    75..=91 => {
                        let bytes = q.bytes();
                        let max_bytes = match rng.gen_range(0..3) {
                            0 => u64::MAX,
                            1 => bytes.saturating_sub(rng.gen_range(0..300)),
                            _ => rng.gen_range(0..bytes.max(1)),
                        };
                        let floor = if rng.gen_bool(0.5) {
                            i64::MIN
                        } else {
                            i64::from(n) - rng.gen_range(0..60)
                        };
                        let want = model_evict(&mut live, max_bytes, floor);
                        let got = q.evict(max_bytes, floor).unwrap();
                        assert_eq!(got, want, "seed {seed}: eviction took what the model took");
                        evicted_age += got.over_age;
                        evicted_bytes += got.over_bytes;
                        let left: Vec<u64> = q
                            .read_after(None, usize::MAX)
                            .unwrap()
                            .into_iter()
                            .map(|(s, _)| s)
                            .collect();
                        assert_eq!(
                            left,
                            live.keys().copied().collect::<Vec<_>>(),
                            "seed {seed}: the records the model kept"
                        );
                    }
                    _ => {
                        // Crash: drop without syncing, reopen.
                        drop(q);
                        let (reopened, report) = reopen(dir.path());
                        q = reopened;
                        assert_eq!(report.corrupt, 0);
                        let got: BTreeMap<u64, Record> = q
                            .read_after(None, usize::MAX)
                            .unwrap()
                            .into_iter()
                            .collect();
                        for (s, r) in &got {
                            assert_eq!(
                                ever.get(s),
                                Some(r),
                                "seed {seed}: record {s} intact and once appended"
                            );
                        }
                        for s in durable.keys() {
                            // Everything synced survives, unless a synced removal took it.
                            if live.contains_key(s) {
                                assert!(got.contains_key(s), "seed {seed}: synced record {s} lost");
                            }
                        }
                        assert_eq!(q.len(), got.len());
                        live = got;
                        durable = live.clone();
                        // New sequence numbers stay above everything ever handed out.
                        let s = q.append(&[rec(Class::Routine, 0, 0)]).unwrap()[0];
                        assert!(s > last_seq, "seed {seed}: sequence reused after reopen");
                        last_seq = s;
                        q.remove(s).unwrap();
                    }
                }
                assert_eq!(q.len(), live.len(), "seed {seed}: record count");
                assert_eq!(q.bytes(), model_bytes(&live, false), "seed {seed}: bytes");
                assert_eq!(
                    q.priority_bytes(),
                    model_bytes(&live, true),
                    "seed {seed}: alarm and security bytes"
                );
            }
            assert!(
                evicted_age > 0 && evicted_bytes > 0,
                "seed {seed}: both bounds were exercised ({evicted_age} over age, {evicted_bytes} over bytes)"
            );
        }
    }

    /// A long outage: a big backlog, and every group commit appends a few readings and evicts
    /// as many. Eviction must not decode the queue, and must look only at the records it
    /// evicts, the alarm and security records in front of them once, and one more per pass.
    #[test]
    fn eviction_reads_only_what_it_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = SledStore::open(dir.path(), 8 << 20).unwrap();
        let mut n = 0u32;
        let mut next = |class: Class| {
            n += 1;
            rec(class, i64::from(n), n)
        };
        // Alarms and security records at the front and among the routine backlog.
        let mut backlog: Vec<Record> = (0..20).map(|_| next(Class::Alarm)).collect();
        for i in 0..20_000 {
            backlog.push(next(if i % 1000 == 0 {
                Class::Security
            } else {
                Class::Routine
            }));
        }
        for chunk in backlog.chunks(1000) {
            q.append(chunk).unwrap();
        }
        let bound = q.bytes();
        let priority = 20 + 20;
        let (decodes_before, touched_before) = counted();
        let (mut evicted, passes) = (0, 200u64);
        for _ in 0..passes {
            let group: Vec<Record> = (0..10).map(|_| next(Class::Routine)).collect();
            q.append(&group).unwrap();
            let ev = q.evict(bound, 0).unwrap();
            assert_eq!(ev.over_age, 0);
            assert!(ev.over_bytes >= 10, "made room for the group");
            evicted += ev.over_bytes;
        }
        let (decodes, touched) = counted();
        assert_eq!(decodes - decodes_before, 0, "eviction decoded records");
        assert!(
            touched - touched_before <= evicted + priority + passes,
            "eviction looked at {} records to evict {evicted}",
            touched - touched_before
        );
        assert!(q.bytes() <= bound);
        // Age eviction from the front, the same way.
        let (_, touched_before) = counted();
        let ev = q.evict(u64::MAX, i64::from(n) - 100).unwrap();
        let (_, touched) = counted();
        assert!(ev.over_age > 0);
        assert!(touched - touched_before <= ev.over_age + priority + 1);
    }

    /// With the wall clock stepped back, records queued after the step look older than the
    /// ones before them: they are evicted late (once the ones in front are gone), never early.
    #[test]
    fn a_clock_step_back_evicts_late_never_early() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
        let times = [100, 200, 50, 60, 300];
        let records: Vec<Record> = times
            .iter()
            .enumerate()
            .map(|(i, t)| rec(Class::Routine, *t, i as u32))
            .collect();
        q.append(&records).unwrap();
        let left = |q: &SledStore| -> Vec<i64> {
            q.read_after(None, 10)
                .unwrap()
                .iter()
                .map(|(_, r)| r.enqueued_at_ms)
                .collect()
        };
        // 50 and 60 are already too old, but 100 in front of them is not: nothing goes.
        assert_eq!(q.evict(u64::MAX, 80).unwrap(), Evicted::default());
        assert_eq!(left(&q), times);
        // 100 goes; 200 stops the pass; 50 and 60 wait behind it.
        assert_eq!(q.evict(u64::MAX, 150).unwrap().over_age, 1);
        assert_eq!(left(&q), [200, 50, 60, 300]);
        // Once 200 is too old, the late ones go with it; 300 is not too old and stays.
        assert_eq!(q.evict(u64::MAX, 250).unwrap().over_age, 3);
        assert_eq!(left(&q), [300]);
    }

    #[test]
    fn eviction_spares_alarms_and_security() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
        let mut batch = Vec::new();
        for i in 0..30 {
            let class = match i % 3 {
                0 => Class::Alarm,
                1 => Class::Security,
                _ => Class::Routine,
            };
            batch.push(rec(class, 1000 + i, i as u32));
        }
        q.append(&batch).unwrap();
        let per = q.bytes() / 30;
        // Bound of 20 records' worth: the 10 routine ones go, oldest first, until under it.
        let ev = q.evict(per * 20, 0).unwrap();
        assert_eq!(ev.over_bytes, 10);
        let left = q.read_after(None, 100).unwrap();
        assert!(left.iter().all(|(_, r)| r.class != Class::Routine));
        // Nothing else is evictable, even far over the bound.
        let ev = q.evict(0, i64::MAX).unwrap();
        assert_eq!(ev, Evicted::default());
        assert_eq!(q.len(), 20);
    }

    #[test]
    fn old_routine_records_are_evicted_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
        q.append(&[
            rec(Class::Routine, 10, 1),
            rec(Class::Alarm, 10, 2),
            rec(Class::Routine, 99, 3),
        ])
        .unwrap();
        let ev = q.evict(u64::MAX, 50).unwrap();
        assert_eq!(ev.over_age, 1);
        let left: Vec<i64> = q
            .read_after(None, 10)
            .unwrap()
            .iter()
            .map(|(_, r)| r.enqueued_at_ms)
            .collect();
        assert_eq!(left, vec![10, 99], "the old alarm stays");
    }

    #[test]
    fn damaged_records_are_reported_and_the_rest_delivered() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
            q.append(&[
                rec(Class::Routine, 1, 1),
                rec(Class::Routine, 2, 2),
                rec(Class::Alarm, 3, 3),
            ])
            .unwrap();
            // Damage record 2 behind the queue's back: all three share one run.
            assert_eq!(q.runs.len(), 1);
            let mut run = q
                .trees()
                .unwrap()
                .records
                .get(key(1))
                .unwrap()
                .unwrap()
                .to_vec();
            let at = run.windows(9).position(|w| w == b"reading 2").unwrap();
            run[at] ^= 0xff;
            q.trees().unwrap().records.insert(key(1), run).unwrap();
            q.sync().unwrap();
        }
        let (q, report) = reopen(dir.path());
        assert_eq!(
            report,
            OpenReport {
                records: 2,
                corrupt: 1
            }
        );
        let seqs: Vec<u64> = q
            .read_after(None, 10)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs, vec![1, 3]);
        assert_eq!(
            q.trees().unwrap().db.open_tree("corrupt").unwrap().len(),
            1,
            "kept aside for forensics"
        );
    }

    fn reading(n: u32) -> Record {
        Record {
            payload: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(100)).into_bytes(),
            ..rec(Class::Routine, i64::from(n), n)
        }
    }

    #[test]
    fn a_group_commit_is_a_few_runs_and_every_record_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
        let batch: Vec<Record> = (0..1000).map(reading).collect();
        let seqs = q.append(&batch).unwrap();
        let bytes: usize = batch.iter().map(Record::stored_len).sum();
        assert_eq!(q.bytes(), bytes as u64);
        assert!(
            (bytes / RUN_BYTES..=bytes / RUN_BYTES + 1).contains(&q.runs.len()),
            "{} runs for {bytes} bytes",
            q.runs.len()
        );
        let all = q.read_after(None, usize::MAX).unwrap();
        assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), seqs);
        assert!(all.iter().zip(&batch).all(|((_, got), want)| got == want));
        // From the middle of a run.
        let some = q.read_after(Some(seqs[499]), 10).unwrap();
        assert_eq!(
            some.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            seqs[500..510]
        );
        // What one upstream PUBACK takes, across runs, and a gap in the middle.
        let delivered: Vec<u64> = seqs[..600].iter().copied().filter(|s| s % 7 != 0).collect();
        assert_eq!(q.remove_all(&delivered).unwrap(), delivered.len());
        assert_eq!(q.remove_all(&delivered).unwrap(), 0, "removed once");
        q.sync().unwrap();
        drop(q);
        let (q, report) = reopen(dir.path());
        let left: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| !delivered.contains(s))
            .collect();
        assert_eq!(report.records, left.len());
        let got = q.read_after(None, usize::MAX).unwrap();
        assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), left);
        let want: u64 = left
            .iter()
            .map(|s| batch[(s - seqs[0]) as usize].stored_len() as u64)
            .sum();
        assert_eq!(q.bytes(), want);
    }

    #[test]
    fn records_of_format_2_are_still_read_evicted_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
            // A queue written one value per record, as before runs.
            for n in 1..=4u32 {
                let class = if n == 2 { Class::Alarm } else { Class::Routine };
                q.trees()
                    .unwrap()
                    .records
                    .insert(key(u64::from(n)), encode(&rec(class, i64::from(n), n)))
                    .unwrap();
            }
            q.trees().unwrap().db.flush().unwrap();
        }
        let (mut q, report) = reopen(dir.path());
        assert_eq!(
            report,
            OpenReport {
                records: 4,
                corrupt: 0
            }
        );
        let s = q.append(&[rec(Class::Routine, 10, 10)]).unwrap()[0];
        assert_eq!(s, 5, "numbering goes on after the old records");
        assert_eq!(q.read_priority(10).unwrap()[0].0, 2);
        assert!(q.remove(3).unwrap());
        // Age eviction steps over the old alarm and takes the old routine records.
        assert_eq!(q.evict(u64::MAX, 5).unwrap().over_age, 2);
        let left: Vec<u64> = q
            .read_after(None, 10)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(left, [2, 5]);
        assert_eq!(q.len(), 2);
    }

    /// During an outage each pass evicts a few readings from the front run: they leave every
    /// count and read at once, but their run is rewritten only once half of it has gone, and
    /// a clean stop writes out the rest.
    #[test]
    fn evictions_leave_their_run_in_few_rewrites_and_stay_gone_after_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = SledStore::open(dir.path(), 1 << 20).unwrap();
        let batch: Vec<Record> = (1..=100)
            .map(|n| rec(Class::Routine, i64::from(n), n))
            .collect();
        let seqs = q.append(&batch).unwrap();
        assert_eq!(q.runs.len(), 1);
        let run_key = seqs[0];
        let on_disk = |q: &SledStore| {
            entries(
                run_key,
                &q.trees()
                    .unwrap()
                    .records
                    .get(key(run_key))
                    .unwrap()
                    .unwrap(),
            )
            .0
            .len()
        };
        let mut rewrites = 0;
        let mut last = on_disk(&q);
        for pass in 1..=60u64 {
            // A bound one record below what is queued: one eviction per pass.
            let ev = q.evict(q.bytes() - 1, i64::MIN).unwrap();
            assert_eq!(ev.over_bytes, 1, "pass {pass}");
            assert_eq!(q.len(), 100 - pass as usize);
            let first = q.read_after(None, 1).unwrap()[0].0;
            assert_eq!(
                first, seqs[pass as usize],
                "evicted records are gone for readers"
            );
            let now = on_disk(&q);
            if now != last {
                rewrites += 1;
                last = now;
            }
        }
        assert!(
            (1..=3).contains(&rewrites),
            "60 evictions rewrote the run {rewrites} times"
        );
        // The uplink removing an evicted record finds nothing; a live one is taken.
        assert!(!q.remove(seqs[0]).unwrap());
        assert!(q.remove(seqs[70]).unwrap());
        q.sync().unwrap();
        drop(q);
        let (q, report) = reopen(dir.path());
        assert_eq!(report.records, 39, "the evicted and the removed stay gone");
        assert_eq!(q.read_after(None, 1).unwrap()[0].0, seqs[60]);
    }
}
