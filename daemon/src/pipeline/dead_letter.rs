//! The dead-letter store: every message a plugin failed or refused, with the reason.
//!
//! One JSON line per message in `<state_dir>/dead-letter/<YYYY-MM-DD>.jsonl` (UTC date), payload
//! in base64, written and synced before the device's PUBACK. If the write fails the message is
//! not acknowledged (the device resends): a message is never dropped without a trace.

use super::Ingest;
use crate::clock::epoch_ms;
use crate::plugin_host::Failure;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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

/// The store.
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

    /// Append one record to the file of the day it was stored (`stored_at_ms`, UTC) and sync
    /// it to disk (blocking).
    pub fn write(&self, entry: &DeadLetter) -> std::io::Result<()> {
        let stored_at = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(entry.stored_at_ms.max(0) as u64);
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        std::fs::create_dir_all(&self.dir)?;
        let day = humantime::format_rfc3339_seconds(stored_at).to_string();
        let path = self.dir.join(format!("{}.jsonl", &day[..10]));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(&line)?;
        f.sync_data()
    }

    /// Every stored message, oldest file first.
    pub fn read_all(&self) -> Vec<DeadLetter> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_goes_to_the_file_of_the_day_it_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::new(dir.path());
        let entry = DeadLetter {
            // 2026-11-27T23:59:59.900Z: the file is that day's, whatever the clock says now.
            stored_at_ms: 1_795_823_999_900, // pure input: a day boundary, not today
            received_at_ms: 1_795_823_999_800, // pure input: 100 ms before, the day's file

            device_id: "pm-01".into(),
            kind: "pacemaker".into(),
            plugin: "pacemaker".into(),
            topic: "ward/pm-01/telemetry".into(),
            reason_kind: "malformed".into(),
            reason: "not JSON".into(),
            payload_base64: "eA==".into(),
        };
        store.write(&entry).unwrap();
        assert!(store.dir().join("2026-11-27.jsonl").is_file());
        assert_eq!(store.read_all().len(), 1);
    }
}
