//! The history's on-disk store: append-only segment files, dropped whole, read by any process.
//!
//! # Layout (`<state_dir>/history`)
//! - `<n>.wgh`: segment number `n` (20 decimal digits, only ever growing, so name order is
//!   arrival order): the magic `WGHIST1\n`, then rows, each framed `length (u32 LE) | crc32 of
//!   the body (u32 LE) | body`. Body: `record (u8) | has value (u8) | value (f64 LE) |
//!   observed ms (i64 LE) | received ms (i64 LE)`, then six strings, each `length (u16 LE) |
//!   UTF-8`: device, kind, metric, unit, quality, detail (detail cut to [`MAX_DETAIL`] bytes).
//! - `<n>.idx`: the summary of a *sealed* segment (JSON, [`Summary`]): rows, byte length, time
//!   ranges, devices with their kinds, metrics, events. Written (through a temporary file and a
//!   rename, then a directory sync) when the segment is sealed; a segment without one is the
//!   one being written, or one a crash left unsealed.
//!
//! # Sealing
//!
//! Rows arrive interleaved (fifty devices a second each), so a lookup of one device in a
//! segment written in arrival order would read every other device's rows too: a day of one
//! device out of fifty would read fifty days' worth. When a segment is sealed (at its size or
//! span, or on the next start after a crash), it is rewritten with its rows grouped by device,
//! each group in arrival order, through a temporary file renamed over it; its summary records
//! each device's byte range and observed-time range. A lookup then reads only the ranges of the
//! devices it wants, merging them by arrival time (one small buffer per range), so the order of
//! rows out of a lookup is the same before and after sealing. Sealing holds 12 bytes per row
//! in memory while it sorts, so a segment is at most 64 MiB.
//!
//! Why files and not sled (which the queue uses): a history is written once and read in time
//! ranges, and is bounded by dropping its oldest part. Whole-file drops make the byte and age
//! bounds exact and free (an unlink, no compaction), appends cost one buffered write per
//! batch, a lookup skips every segment whose summary rules it out and streams the rest in
//! constant memory, and — the deciding point — `wardgate history` and `wardgate chart` can read
//! the files while the daemon writes them (sled locks its database to one process).
//!
//! # What must stay true
//! 1. Rows are only appended; a segment is sealed once (its sorted copy renamed over it, then
//!    its summary written) and then never changes until it is dropped whole. Readers therefore
//!    need no lock: a reader holds the file it opened (the unsorted one, if it opened it before
//!    the rename), and in the segment being written it stops at the first row that is not
//!    complete yet. A summary exists only for the sorted file it describes.
//! 2. Bounds: after every batch (and every [`MAINTENANCE_EVERY`] when none comes), sealed
//!    segments whose newest row is older than `max_age` are dropped, then the oldest while the
//!    total is over `max_bytes`; every dropped row is counted. A segment is sealed once it holds
//!    `max_bytes / 16` bytes or spans [`SEGMENT_SPAN`], so the bound is kept to within one
//!    segment and an hour.
//! 3. Durability: each batch is handed to the kernel before the writer takes the next (a kill -9
//!    loses nothing written), and synced to disk at most [`SYNC_EVERY`] after it was written (a
//!    power cut loses at most that much). On open, a segment cut short by a crash is cut at its
//!    last whole row (checked by its CRC) and sealed; writing goes on in a new segment.

use super::{Filter, Row, RowKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest time one segment covers before it is sealed.
pub const SEGMENT_SPAN: Duration = Duration::from_secs(3600);
/// Longest time written rows wait for a sync to disk.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How often the bounds are applied when no rows come.
pub const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// Longest detail kept (an alert's output), in bytes.
pub const MAX_DETAIL: usize = 2048;
/// Smallest segment size (a small `max_bytes` would otherwise make tiny files).
const MIN_SEGMENT_BYTES: u64 = 64 << 10;
/// Largest segment size: sealing sorts a segment's row positions in memory (12 bytes a row).
const MAX_SEGMENT_BYTES: u64 = 64 << 20;
const MAGIC: &[u8; 8] = b"WGHIST1\n";
const FIXED: usize = 1 + 1 + 8 + 8 + 8;
/// Longest row body: six strings of at most `u16::MAX` and the fixed part.
const MAX_BODY: usize = FIXED + 6 * (2 + u16::MAX as usize);

/// The store's bounds (`[history]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Most bytes on disk.
    pub max_bytes: u64,
    /// Oldest row kept (by the time it was received).
    pub max_age: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Bounds {
    /// Size at which a segment is sealed.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 16).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
    }
}

/// What a segment holds, for skipping it in lookups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Rows.
    pub rows: u64,
    /// File length.
    pub bytes: u64,
    /// Observed-time range of the rows.
    pub min_observed_ms: i64,
    /// See `min_observed_ms`.
    pub max_observed_ms: i64,
    /// Received-time range of the rows.
    pub min_received_ms: i64,
    /// See `min_received_ms`.
    pub max_received_ms: i64,
    /// Devices, with their kind.
    pub devices: BTreeMap<String, String>,
    /// Metrics (and rule names of alerts).
    pub metrics: BTreeSet<String>,
    /// Alerts and violations.
    pub events: u64,
    /// Set when the segment was sealed sorted: its rows grouped by device, in this order,
    /// each group in arrival order (see *Sealing*). Empty: rows in arrival order.
    #[serde(default)]
    pub by_device: Vec<DeviceRange>,
}

/// Where one device's rows are in a sealed segment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRange {
    /// The device.
    pub device: String,
    /// Its kind.
    pub kind: String,
    /// Byte range of its rows.
    pub start: u64,
    /// See `start`.
    pub end: u64,
    /// Observed-time range of its rows.
    pub min_observed_ms: i64,
    /// See `min_observed_ms`.
    pub max_observed_ms: i64,
}

impl Summary {
    fn add(&mut self, row: &Row, framed: u64) {
        if self.rows == 0 {
            (self.min_observed_ms, self.max_observed_ms) = (row.observed_ms, row.observed_ms);
            (self.min_received_ms, self.max_received_ms) = (row.received_ms, row.received_ms);
        }
        self.rows += 1;
        self.bytes += framed;
        self.min_observed_ms = self.min_observed_ms.min(row.observed_ms);
        self.max_observed_ms = self.max_observed_ms.max(row.observed_ms);
        self.min_received_ms = self.min_received_ms.min(row.received_ms);
        self.max_received_ms = self.max_received_ms.max(row.received_ms);
        if !self.devices.contains_key(&row.device) {
            self.devices.insert(row.device.clone(), row.kind.clone());
        }
        if !self.metrics.contains(&row.metric) {
            self.metrics.insert(row.metric.clone());
        }
        if row.record != RowKind::Reading {
            self.events += 1;
        }
    }

    /// Whether a row of this segment could match `f`.
    pub fn may_match(&self, f: &Filter) -> bool {
        if self.rows == 0 || self.max_observed_ms < f.from_ms || self.min_observed_ms > f.to_ms {
            return false;
        }
        if f.device
            .as_ref()
            .is_some_and(|d| !self.devices.contains_key(d))
        {
            return false;
        }
        if f.kind
            .as_ref()
            .is_some_and(|k| !self.devices.values().any(|v| v == k))
        {
            return false;
        }
        match &f.metric {
            Some(m) => self.metrics.contains(m) || (f.with_events && self.events > 0),
            None => true,
        }
    }
}

/// What one append did besides writing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Rows dropped over the byte bound.
    pub dropped_over_bytes: u64,
    /// Rows dropped over the age bound.
    pub dropped_over_age: u64,
    /// Bytes on disk now.
    pub bytes: u64,
}

#[derive(Debug)]
struct Sealed {
    number: u64,
    summary: Summary,
}

#[derive(Debug)]
struct Active {
    number: u64,
    file: BufWriter<File>,
    summary: Summary,
    /// Wall clock when it was started.
    started_ms: i64,
}

/// The writer's side of the store (one per directory: the daemon's history stage).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    bounds: Bounds,
    sealed: VecDeque<Sealed>,
    active: Option<Active>,
    next_number: u64,
    /// Written to the kernel but not yet synced, since when.
    unsynced_since: Option<Instant>,
}

fn data_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.wgh"))
}

fn index_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.idx"))
}

/// Segment numbers in `dir`, in order.
fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".wgh").and_then(|n| n.parse().ok()) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    out.extend_from_slice(&(cut as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..cut]);
}

/// Append `row`'s frame to `out`; its length.
pub fn encode(row: &Row, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(row.record.code());
    out.push(u8::from(row.value.is_some()));
    out.extend_from_slice(&row.value.unwrap_or(0.0).to_le_bytes());
    out.extend_from_slice(&row.observed_ms.to_le_bytes());
    out.extend_from_slice(&row.received_ms.to_le_bytes());
    let max = u16::MAX as usize;
    for s in [&row.device, &row.kind, &row.metric, &row.unit, &row.quality] {
        put_str(out, s, max);
    }
    put_str(out, &row.detail, MAX_DETAIL);
    let body_len = out.len() - start - 8;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// The row in `body` (already checked against its CRC); `None` when it is malformed.
pub fn decode(body: &[u8]) -> Option<Row> {
    let fixed = body.get(..FIXED)?;
    let record = RowKind::of_code(fixed[0])?;
    let has_value = fixed[1] != 0;
    let value = f64::from_le_bytes(fixed[2..10].try_into().ok()?);
    let observed_ms = i64::from_le_bytes(fixed[10..18].try_into().ok()?);
    let received_ms = i64::from_le_bytes(fixed[18..26].try_into().ok()?);
    let mut rest = &body[FIXED..];
    let mut next = || -> Option<String> {
        let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
        rest = &rest[2 + len..];
        Some(s)
    };
    let row = Row {
        record,
        device: next()?,
        kind: next()?,
        metric: next()?,
        unit: next()?,
        quality: next()?,
        detail: next()?,
        value: has_value.then_some(value),
        observed_ms,
        received_ms,
    };
    rest.is_empty().then_some(row)
}

/// Read the next whole row of a segment: `Ok(None)` at its end, or where a row is incomplete
/// or damaged (a crash, or the row being written right now). `valid` grows by each row's
/// frame.
fn next_row(r: &mut impl Read, body: &mut Vec<u8>, valid: &mut u64) -> io::Result<Option<Row>> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
    if !(FIXED..=MAX_BODY).contains(&len) {
        return Ok(None);
    }
    body.resize(len, 0);
    match r.read_exact(body) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if crc32fast::hash(body) != crc {
        return Ok(None);
    }
    let Some(row) = decode(body) else {
        return Ok(None);
    };
    *valid += 8 + len as u64;
    Ok(Some(row))
}

/// Scan a segment: its summary of whole rows (`bytes` = where they end).
fn scan(path: &Path) -> io::Result<Summary> {
    let mut r = BufReader::with_capacity(64 << 10, File::open(path)?);
    let mut magic = [0u8; 8];
    let mut summary = Summary::default();
    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Ok(summary);
    }
    let mut valid = MAGIC.len() as u64;
    let mut body = Vec::new();
    let mut before = valid;
    while let Some(row) = next_row(&mut r, &mut body, &mut valid)? {
        summary.add(&row, valid - before);
        before = valid;
    }
    summary.bytes = valid;
    Ok(summary)
}

fn read_summary(dir: &Path, n: u64) -> Option<Summary> {
    let text = std::fs::read(index_path(dir, n)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_summary(dir: &Path, n: u64, s: &Summary) -> io::Result<()> {
    let tmp = dir.join(format!("{n:020}.idx.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(s).map_err(io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, index_path(dir, n))
}

/// Rewrite segment `n` (sealed, whole rows only, `summary` its summary) with its rows grouped by
/// device, each group in arrival order, through a temporary file renamed over it; the summary
/// gains the groups' ranges. Memory: 12 bytes per row, plus one row.
fn sort_by_device(dir: &Path, n: u64, mut summary: Summary) -> io::Result<Summary> {
    use std::os::unix::fs::FileExt;
    let path = data_path(dir, n);
    let devices: Vec<(&String, &String)> = summary.devices.iter().collect();
    let index: BTreeMap<&str, u32> = devices
        .iter()
        .enumerate()
        .map(|(i, (d, _))| (d.as_str(), i as u32))
        .collect();
    // (device, offset, frame length) of every row, then grouped by device (stable: arrival
    // order within a device).
    let mut rows: Vec<(u32, u32, u32)> = Vec::with_capacity(summary.rows as usize);
    let mut times = vec![(i64::MAX, i64::MIN); devices.len()];
    {
        let mut r = BufReader::with_capacity(64 << 10, File::open(&path)?);
        r.seek(io::SeekFrom::Start(MAGIC.len() as u64))?;
        let mut body = Vec::new();
        let mut valid = MAGIC.len() as u64;
        loop {
            let at = valid;
            let Some(row) = next_row(&mut r, &mut body, &mut valid)? else {
                break;
            };
            let d = index[row.device.as_str()];
            let t = &mut times[d as usize];
            *t = (t.0.min(row.observed_ms), t.1.max(row.observed_ms));
            rows.push((d, at as u32, (valid - at) as u32));
        }
    }
    rows.sort_by_key(|r| r.0);
    let source = File::open(&path)?;
    let tmp = dir.join(format!("{n:020}.wgh.tmp"));
    let mut out = BufWriter::with_capacity(64 << 10, File::create(&tmp)?);
    out.write_all(MAGIC)?;
    let mut pos = MAGIC.len() as u64;
    let mut ranges: Vec<DeviceRange> = Vec::with_capacity(devices.len());
    let mut frame = Vec::new();
    for (d, offset, len) in rows {
        if ranges.len() <= d as usize {
            let (device, kind) = devices[d as usize];
            let (min, max) = times[d as usize];
            ranges.push(DeviceRange {
                device: device.clone(),
                kind: kind.clone(),
                start: pos,
                end: pos,
                min_observed_ms: min,
                max_observed_ms: max,
            });
        }
        frame.resize(len as usize, 0);
        source.read_exact_at(&mut frame, u64::from(offset))?;
        out.write_all(&frame)?;
        pos += u64::from(len);
        ranges.last_mut().expect("pushed").end = pos;
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    std::fs::rename(&tmp, &path)?;
    summary.bytes = pos;
    summary.by_device = ranges;
    Ok(summary)
}

impl Store {
    /// Open (or create) the store in `dir`. Every segment found is sealed: one a crash left
    /// unsealed is cut at its last whole row first; empty ones are removed.
    pub fn open(dir: &Path, bounds: Bounds) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut sealed = VecDeque::new();
        let numbers = segment_numbers(dir)?;
        for &n in &numbers {
            let data = data_path(dir, n);
            let len = std::fs::metadata(&data)?.len();
            let summary = match read_summary(dir, n) {
                Some(s) if s.bytes == len => s,
                _ => {
                    let s = scan(&data)?;
                    if s.rows > 0 {
                        if s.bytes < len {
                            OpenOptions::new()
                                .write(true)
                                .open(&data)?
                                .set_len(s.bytes)?;
                            log::warn!(
                                path:% = data.display(), cut_bytes = len - s.bytes, rows = s.rows;
                                "history: segment cut short by a crash; kept its {} whole rows",
                                s.rows
                            );
                        }
                        File::open(&data)?.sync_all()?;
                        let s = sort_by_device(dir, n, s)?;
                        write_summary(dir, n, &s)?;
                        s
                    } else {
                        s
                    }
                }
            };
            if summary.rows == 0 {
                std::fs::remove_file(&data)?;
                let _ = std::fs::remove_file(index_path(dir, n));
                continue;
            }
            sealed.push_back(Sealed { number: n, summary });
        }
        // Leftovers: summaries of dropped segments, temporary files.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let orphan = match name.strip_suffix(".idx") {
                Some(n) => n.parse::<u64>().is_ok_and(|n| !data_path(dir, n).exists()),
                None => name.ends_with(".idx.tmp") || name.ends_with(".wgh.tmp"),
            };
            if orphan {
                let _ = std::fs::remove_file(&path);
            }
        }
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            bounds,
            sealed,
            active: None,
            next_number: numbers.last().map_or(0, |n| n + 1),
            unsynced_since: None,
        })
    }

    /// New bounds (a reload); they apply from the next append.
    pub fn set_bounds(&mut self, bounds: Bounds) {
        self.bounds = bounds;
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.summary.bytes).sum::<u64>()
            + self.active.as_ref().map_or(0, |a| a.summary.bytes)
    }

    /// Append `rows` (received at `now_ms` or before), then seal and drop as the bounds say.
    /// An empty `rows` only applies the bounds.
    pub fn append(&mut self, rows: &[Row], now_ms: i64) -> io::Result<Outcome> {
        if !rows.is_empty() {
            self.write(rows, now_ms)?;
        }
        let due = self.active.as_ref().is_some_and(|a| {
            a.summary.bytes >= self.bounds.segment_bytes()
                || now_ms.saturating_sub(a.started_ms) >= SEGMENT_SPAN.as_millis() as i64
        });
        if due {
            self.seal()?;
        } else if self
            .unsynced_since
            .is_some_and(|t| t.elapsed() >= SYNC_EVERY)
        {
            self.sync()?;
        }
        let mut outcome = self.enforce(now_ms)?;
        outcome.bytes = self.bytes();
        Ok(outcome)
    }

    fn write(&mut self, rows: &[Row], now_ms: i64) -> io::Result<()> {
        if self.active.is_none() {
            let n = self.next_number;
            let path = data_path(&self.dir, n);
            let mut file = BufWriter::with_capacity(
                64 << 10,
                OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .open(&path)?,
            );
            file.write_all(MAGIC)?;
            self.next_number += 1;
            self.active = Some(Active {
                number: n,
                file,
                summary: Summary {
                    bytes: MAGIC.len() as u64,
                    ..Summary::default()
                },
                started_ms: now_ms,
            });
        }
        let active = self.active.as_mut().expect("just made");
        let mut buf = Vec::with_capacity(rows.len() * 96);
        let mut summary = active.summary.clone();
        for row in rows {
            let framed = encode(row, &mut buf);
            summary.add(row, framed as u64);
        }
        let written = active
            .file
            .write_all(&buf)
            .and_then(|()| active.file.flush());
        if let Err(e) = written {
            // Cut the segment back to its last whole batch, so a partial row never stays
            // in the middle of it; if even that fails, seal what is there.
            let keep = active.summary.bytes;
            let file = active.file.get_mut();
            let cut = file
                .set_len(keep)
                .and_then(|()| file.seek(io::SeekFrom::Start(keep)).map(|_| ()));
            if cut.is_err() {
                let _ = self.seal();
            }
            return Err(e);
        }
        active.summary = summary;
        self.unsynced_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Sync what was written.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(a) = &mut self.active {
            a.file.flush()?;
            a.file.get_ref().sync_data()?;
        }
        self.unsynced_since = None;
        Ok(())
    }

    /// Seal the segment being written (if any): sync it, write its summary.
    fn seal(&mut self) -> io::Result<()> {
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        a.file.flush()?;
        a.file.get_ref().sync_all()?;
        drop(a.file);
        a.summary = sort_by_device(&self.dir, a.number, a.summary)?;
        write_summary(&self.dir, a.number, &a.summary)?;
        sync_dir(&self.dir)?;
        self.unsynced_since = None;
        self.sealed.push_back(Sealed {
            number: a.number,
            summary: a.summary,
        });
        Ok(())
    }

    /// Drop sealed segments over the age bound, then over the byte bound, oldest first.
    fn enforce(&mut self, now_ms: i64) -> io::Result<Outcome> {
        let mut outcome = Outcome::default();
        let floor = now_ms.saturating_sub(self.bounds.max_age.as_millis() as i64);
        while self
            .sealed
            .front()
            .is_some_and(|s| s.summary.max_received_ms < floor)
        {
            outcome.dropped_over_age += self.drop_front()?;
        }
        while self.bytes() > self.bounds.max_bytes && !self.sealed.is_empty() {
            outcome.dropped_over_bytes += self.drop_front()?;
        }
        if outcome.dropped_over_age + outcome.dropped_over_bytes > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(outcome)
    }

    fn drop_front(&mut self) -> io::Result<u64> {
        let Some(s) = self.sealed.front() else {
            return Ok(0);
        };
        std::fs::remove_file(data_path(&self.dir, s.number))?;
        let _ = std::fs::remove_file(index_path(&self.dir, s.number));
        let rows = s.summary.rows;
        self.sealed.pop_front();
        Ok(rows)
    }
}

/// Rows of the history in `dir` matching `filter`, in the order they were received, read
/// lazily (constant memory). Works while the daemon writes.
pub fn query(dir: &Path, filter: Filter) -> io::Result<Query> {
    let numbers = match segment_numbers(dir) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(Query {
        dir: dir.to_path_buf(),
        numbers: numbers.into(),
        filter,
        current: None,
        body: Vec::new(),
        segments_read: 0,
    })
}

/// A lookup in progress (see [`query`]).
#[derive(Debug)]
pub struct Query {
    dir: PathBuf,
    numbers: VecDeque<u64>,
    filter: Filter,
    current: Option<Segment>,
    body: Vec<u8>,
    /// Segments opened so far (the others were ruled out by their summaries).
    pub segments_read: usize,
}

/// The segment a [`Query`] is reading.
#[derive(Debug)]
enum Segment {
    /// In arrival order (being written, or sealed unsorted): read through.
    Plain(BufReader<File>),
    /// Sealed sorted: the ranges of the devices that may match, merged by arrival time.
    Merge(Merge),
}

/// Bytes `pos..end` of a shared file, read with `pread` (each range keeps its own position).
#[derive(Debug)]
struct Range {
    file: std::sync::Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Range {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = (buf.len() as u64).min(self.end - self.pos) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// One reader per device range, and the next row of each, smallest arrival time first.
#[derive(Debug)]
struct Merge {
    ranges: Vec<BufReader<Range>>,
    /// (arrival time, range) of each range's next row, as a min-heap.
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(i64, usize)>>,
    next: Vec<Option<Row>>,
}

impl Merge {
    /// Read range `i`'s next row into the heap.
    fn refill(&mut self, i: usize, body: &mut Vec<u8>) -> io::Result<()> {
        let mut valid = 0;
        let row = next_row(&mut self.ranges[i], body, &mut valid)?;
        if let Some(r) = &row {
            self.heap.push(std::cmp::Reverse((r.received_ms, i)));
        }
        self.next[i] = row;
        Ok(())
    }

    fn pop(&mut self, body: &mut Vec<u8>) -> io::Result<Option<Row>> {
        let Some(std::cmp::Reverse((_, i))) = self.heap.pop() else {
            return Ok(None);
        };
        let row = self.next[i].take();
        self.refill(i, body)?;
        Ok(row)
    }
}

/// Whether a device range may hold a row `f` wants.
fn range_may_match(r: &DeviceRange, f: &Filter) -> bool {
    r.max_observed_ms >= f.from_ms
        && r.min_observed_ms <= f.to_ms
        && f.device.as_ref().is_none_or(|d| *d == r.device)
        && f.kind.as_ref().is_none_or(|k| *k == r.kind)
}

impl Query {
    /// Open the next segment that may hold a match.
    fn open_next(&mut self) -> io::Result<bool> {
        while let Some(n) = self.numbers.pop_front() {
            let summary = read_summary(&self.dir, n);
            if summary.as_ref().is_some_and(|s| !s.may_match(&self.filter)) {
                continue;
            }
            let file = match File::open(data_path(&self.dir, n)) {
                Ok(f) => f,
                // Dropped by the daemon since the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let segment = match summary.filter(|s| !s.by_device.is_empty()) {
                Some(s) => {
                    let file = std::sync::Arc::new(file);
                    let ranges: Vec<BufReader<Range>> = s
                        .by_device
                        .iter()
                        .filter(|r| range_may_match(r, &self.filter))
                        .map(|r| {
                            BufReader::with_capacity(
                                8 << 10,
                                Range {
                                    file: file.clone(),
                                    pos: r.start,
                                    end: r.end,
                                },
                            )
                        })
                        .collect();
                    if ranges.is_empty() {
                        continue;
                    }
                    let k = ranges.len();
                    let mut m = Merge {
                        ranges,
                        heap: std::collections::BinaryHeap::with_capacity(k),
                        next: vec![None; k],
                    };
                    for i in 0..k {
                        m.refill(i, &mut self.body)?;
                    }
                    Segment::Merge(m)
                }
                None => {
                    let mut r = BufReader::with_capacity(64 << 10, file);
                    let mut magic = [0u8; 8];
                    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
                        continue;
                    }
                    Segment::Plain(r)
                }
            };
            self.segments_read += 1;
            self.current = Some(segment);
            return Ok(true);
        }
        Ok(false)
    }
}

impl Iterator for Query {
    type Item = io::Result<Row>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                match self.open_next() {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
            let next = match self.current.as_mut().expect("opened") {
                Segment::Plain(r) => {
                    let mut valid = 0;
                    next_row(r, &mut self.body, &mut valid)
                }
                Segment::Merge(m) => m.pop(&mut self.body),
            };
            match next {
                Ok(Some(row)) if self.filter.matches(&row) => return Some(Ok(row)),
                Ok(Some(_)) => {}
                Ok(None) => self.current = None,
                Err(e) => {
                    self.current = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::test_reading as row;

    fn all(dir: &Path) -> Vec<Row> {
        query(dir, Filter::between(i64::MIN, i64::MAX))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn rows_round_trip_in_order_and_lookups_skip_segments() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::clock::now_ms();
        let mut s = Store::open(dir.path(), Bounds::default()).unwrap();
        let mut want = Vec::new();
        for i in 0..100 {
            let mut r = row(&format!("pm-{:02}", i % 5), "heartbeat", i as f64, t + i);
            if i == 7 {
                r.record = RowKind::Alert;
                r.metric = "tachycardia".into();
                r.value = None;
                r.detail = "{\"heartbeat\":150}".into();
            }
            want.push(r);
        }
        s.append(&want[..50], t).unwrap();
        s.seal().unwrap();
        s.append(&want[50..], t).unwrap();
        assert_eq!(all(dir.path()), want, "everything, in arrival order");
        // Only pm-03, observed from t + 60: the first (sealed) segment is skipped unread.
        let mut f = Filter::between(t + 60, t + 1000);
        f.device = Some("pm-03".into());
        let mut q = query(dir.path(), f).unwrap();
        let got: Vec<i64> = q.by_ref().map(|r| r.unwrap().observed_ms - t).collect();
        assert_eq!(got, [63, 68, 73, 78, 83, 88, 93, 98]);
        assert_eq!(q.segments_read, 1);
        // A metric that is nowhere: nothing is read.
        let mut f = Filter::between(i64::MIN, i64::MAX);
        f.metric = Some("glucose".into());
        let mut q = query(dir.path(), f.clone()).unwrap();
        assert_eq!(q.by_ref().count(), 0);
        assert_eq!(q.segments_read, 1, "only the unsealed segment is read");
        // With events: the alert comes with the metric's readings.
        f.metric = Some("heartbeat".into());
        f.with_events = true;
        f.device = Some("pm-02".into());
        let got: Vec<RowKind> = query(dir.path(), f)
            .unwrap()
            .map(|r| r.unwrap().record)
            .collect();
        assert_eq!(got.iter().filter(|k| **k == RowKind::Alert).count(), 1);
        assert_eq!(got.len(), 20);
    }

    #[test]
    fn sealed_segments_are_grouped_by_device_and_read_back_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::clock::now_ms();
        let mut s = Store::open(dir.path(), Bounds::default()).unwrap();
        let rows: Vec<Row> = (0..90)
            .map(|i| {
                let mut r = row(&format!("dev-{}", i % 3), "heartbeat", i as f64, t + i);
                r.kind = if i % 3 == 2 { "glucose" } else { "pacemaker" }.into();
                r
            })
            .collect();
        s.append(&rows, t).unwrap();
        s.seal().unwrap();
        let summary = read_summary(dir.path(), 0).unwrap();
        let ranges: Vec<(&str, u64, u64)> = summary
            .by_device
            .iter()
            .map(|r| (r.device.as_str(), r.start, r.end))
            .collect();
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges[0].1, MAGIC.len() as u64);
        assert_eq!(ranges[0].2, ranges[1].1);
        assert_eq!(ranges[2].2, summary.bytes);
        // On disk, grouped by device.
        let mut raw = BufReader::new(File::open(data_path(dir.path(), 0)).unwrap());
        raw.seek(io::SeekFrom::Start(MAGIC.len() as u64)).unwrap();
        let (mut body, mut valid) = (Vec::new(), 0);
        let mut on_disk = Vec::new();
        while let Some(r) = next_row(&mut raw, &mut body, &mut valid).unwrap() {
            on_disk.push(r.device);
        }
        let mut grouped = on_disk.clone();
        grouped.sort();
        assert_eq!(on_disk, grouped);
        // Read back: arrival order, whole and filtered.
        assert_eq!(all(dir.path()), rows);
        let mut f = Filter::between(i64::MIN, i64::MAX);
        f.kind = Some("pacemaker".into());
        let got: Vec<Row> = query(dir.path(), f).unwrap().map(Result::unwrap).collect();
        let want: Vec<Row> = rows
            .iter()
            .filter(|r| r.kind == "pacemaker")
            .cloned()
            .collect();
        assert_eq!(got, want);
        // A crash after the sorted file replaced the segment but before its summary was
        // written: the segment is sealed again on open, the same.
        std::fs::remove_file(index_path(dir.path(), 0)).unwrap();
        drop(s);
        let _s = Store::open(dir.path(), Bounds::default()).unwrap();
        assert_eq!(read_summary(dir.path(), 0).unwrap(), summary);
        assert_eq!(all(dir.path()), rows);
    }

    #[test]
    fn the_byte_bound_drops_whole_segments_oldest_first_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::clock::now_ms();
        let bounds = Bounds {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
        };
        let mut s = Store::open(dir.path(), bounds).unwrap();
        let (mut written, mut dropped) = (0u64, 0u64);
        for b in 0..400 {
            let rows: Vec<Row> = (0..100)
                .map(|i| row("pm-01", "heartbeat", 70.0, t + b * 100 + i))
                .collect();
            let o = s.append(&rows, t).unwrap();
            written += 100;
            dropped += o.dropped_over_bytes;
            assert!(
                o.bytes <= bounds.max_bytes + bounds.segment_bytes(),
                "over the bound by more than a segment: {}",
                o.bytes
            );
        }
        let left = all(dir.path());
        assert!(dropped > 0);
        assert_eq!(left.len() as u64, written - dropped, "every drop counted");
        // What is left is the newest, contiguous.
        let first = left[0].observed_ms - t;
        assert_eq!(left.last().unwrap().observed_ms - t, 399 * 100 + 99);
        assert_eq!(left.len() as i64, 400 * 100 - first);
    }

    #[test]
    fn the_age_bound_drops_old_segments_without_new_rows() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::clock::now_ms();
        let bounds = Bounds {
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(600),
        };
        let mut s = Store::open(dir.path(), bounds).unwrap();
        s.append(&[row("pm-01", "heartbeat", 70.0, t)], t).unwrap();
        // An hour later, with no rows: the segment is sealed (its span is over), and dropped
        // once its newest row is older than max_age.
        let later = t + SEGMENT_SPAN.as_millis() as i64 + 1;
        let o = s.append(&[], later).unwrap();
        assert_eq!(o.dropped_over_age, 1);
        assert!(all(dir.path()).is_empty());
        assert_eq!(segment_numbers(dir.path()).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn a_torn_last_row_is_cut_and_writing_goes_on_in_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::clock::now_ms();
        let rows: Vec<Row> = (0..10)
            .map(|i| row("pm-01", "heartbeat", 1.0, t + i))
            .collect();
        {
            let mut s = Store::open(dir.path(), Bounds::default()).unwrap();
            s.append(&rows, t).unwrap();
            // Dropped without a seal, as by a kill -9.
            std::mem::forget(s);
        }
        let seg = data_path(dir.path(), 0);
        let mut bytes = std::fs::read(&seg).unwrap();
        let whole = bytes.len();
        // Half of an eleventh row, as a crash in the middle of a write leaves it.
        let mut extra = Vec::new();
        encode(&row("pm-01", "heartbeat", 2.0, t + 10), &mut extra);
        bytes.extend_from_slice(&extra[..extra.len() / 2]);
        std::fs::write(&seg, &bytes).unwrap();
        let mut s = Store::open(dir.path(), Bounds::default()).unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len() as usize, whole);
        assert_eq!(all(dir.path()), rows);
        s.append(&[row("pm-01", "heartbeat", 3.0, t + 11)], t)
            .unwrap();
        assert_eq!(all(dir.path()).len(), 11);
        assert_eq!(segment_numbers(dir.path()).unwrap(), [0, 1]);
    }

    #[test]
    fn a_reader_stops_at_a_row_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::clock::now_ms();
        let mut s = Store::open(dir.path(), Bounds::default()).unwrap();
        s.append(&[row("pm-01", "heartbeat", 1.0, t)], t).unwrap();
        // Append half a row by hand behind the store's back.
        let mut extra = Vec::new();
        encode(&row("pm-01", "heartbeat", 2.0, t + 1), &mut extra);
        let mut f = OpenOptions::new()
            .append(true)
            .open(data_path(dir.path(), 0))
            .unwrap();
        f.write_all(&extra[..5]).unwrap();
        assert_eq!(all(dir.path()).len(), 1);
    }

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        let t = crate::clock::now_ms();
        let mut r = row("pm-01", "heartbeat", 1.0, t);
        r.detail = "é".repeat(MAX_DETAIL);
        let mut v = Vec::new();
        encode(&r, &mut v);
        let back = decode(&v[8..]).unwrap();
        assert_eq!(back.detail.len(), MAX_DETAIL);
        assert!(back.detail.chars().all(|c| c == 'é'));
    }
}
