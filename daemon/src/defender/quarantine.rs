//! Quarantined devices: the gatekeeper refuses their CONNECTs (counted as authorization
//! failures) and the defender disconnects them when a security profile's `quarantine` action
//! fires, for its duration or until an operator clears it (`wardgate quarantine clear`).
//!
//! What must stay true: a lookup is one uncontended read lock (it sits on the CONNECT path of
//! every device); an expired entry never refuses anyone, even before the defender removes it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// One quarantined device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The device.
    pub device_id: String,
    /// Since when, epoch ms.
    pub since_ms: i64,
    /// Until when, epoch ms.
    pub until_ms: i64,
    /// The security profile whose violation quarantined it.
    pub security_profile: String,
    /// Its behavior.
    pub behavior: String,
    /// The violation.
    pub violation_id: String,
}

/// The quarantine list (cheap to clone, shared by the gatekeeper and the defender).
#[derive(Debug, Clone)]
pub struct Quarantine(
    Arc<RwLock<BTreeMap<String, Entry>>>,
    Arc<crate::telemetry::LogLimiter>,
);

/// At most one "refused: quarantined" line per device per this long.
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Default for Quarantine {
    fn default() -> Self {
        Self(
            Arc::default(),
            Arc::new(crate::telemetry::LogLimiter::every(REFUSAL_LOG_EVERY)),
        )
    }
}

impl Quarantine {
    /// Whether to log a refused CONNECT of `device` now: `Some(refusals not logged since the
    /// last line)`, or `None` (one line per device per minute: a quarantined device retrying
    /// every second must not flood the journal).
    pub fn log_refusal(&self, device: &Arc<str>) -> Option<u64> {
        self.1.allow(device)
    }

    /// The device's quarantine if it is in force at `now_ms`.
    pub fn get(&self, device: &str, now_ms: i64) -> Option<Entry> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.get(device).filter(|e| e.until_ms > now_ms).cloned()
    }

    /// Put a device in quarantine (replacing an earlier entry: the later end wins).
    pub fn insert(&self, entry: Entry) -> Entry {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        let e = map
            .entry(entry.device_id.clone())
            .or_insert_with(|| entry.clone());
        if entry.until_ms > e.until_ms {
            *e = entry;
        }
        e.clone()
    }

    /// Lift a device's quarantine; the entry, if there was one.
    pub fn remove(&self, device: &str) -> Option<Entry> {
        self.1.forget(device);
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device)
    }

    /// Remove and return the entries that ended by `now_ms`.
    pub fn expire(&self, now_ms: i64) -> Vec<Entry> {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        let ended: Vec<String> = map
            .values()
            .filter(|e| e.until_ms <= now_ms)
            .map(|e| e.device_id.clone())
            .collect();
        ended.iter().filter_map(|d| map.remove(d)).collect()
    }

    /// Every entry, by device id.
    pub fn list(&self) -> Vec<Entry> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(device: &str, until_ms: i64) -> Entry {
        Entry {
            device_id: device.into(),
            since_ms: 0,
            until_ms,
            security_profile: "p".into(),
            behavior: "b".into(),
            violation_id: "v".into(),
        }
    }

    #[test]
    fn entries_hold_until_they_end_and_the_later_end_wins() {
        let q = Quarantine::default();
        q.insert(entry("rogue-01", 100));
        assert!(q.get("rogue-01", 99).is_some());
        assert!(
            q.get("rogue-01", 100).is_none(),
            "ended, not yet removed: refuses no one"
        );
        assert!(q.get("pm-01", 0).is_none());
        assert_eq!(q.insert(entry("rogue-01", 50)).until_ms, 100);
        assert_eq!(q.insert(entry("rogue-01", 200)).until_ms, 200);
        q.insert(entry("rogue-02", 10));
        assert_eq!(q.expire(150).len(), 1);
        assert_eq!(q.list().len(), 1);
        assert!(q.remove("rogue-01").is_some());
        assert!(q.list().is_empty());
    }
}
