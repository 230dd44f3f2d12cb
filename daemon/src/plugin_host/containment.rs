//! Trap accounting per device, for one loaded plugin version.
//!
//! A trap is charged to the device whose message was being normalised: a device's calls run on
//! an instance that only ever served that device (see `instances`), so nothing another device
//! sent can have caused it. `plugins.max_consecutive_traps` traps in a row from one device contain that device for
//! this plugin: its messages go to the dead-letter store without calling the plugin. Other
//! devices of the same plugin are not affected in any way.
//!
//! What must stay true:
//! - only devices with a trap since their last completed call have an entry; a completed call
//!   removes it. Device ids come from the registry (authenticated), so the map never holds more
//!   entries than there are registered devices;
//! - containment ends only by [`Ledger::clear`] (reload) or by a new version of the plugin,
//!   which starts with an empty ledger;
//! - the common case (no device has trapped) costs one atomic load, no lock.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// A device whose messages are not given to a plugin any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainedDevice {
    /// Device id.
    pub device_id: String,
    /// Traps in a row that contained it.
    pub traps: u32,
    /// Why the last of them trapped.
    pub reason: String,
    /// When it was contained, RFC 3339.
    pub since: String,
}

/// What a trap led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Charged {
    /// Counted: this many in a row so far, below the limit.
    Counted(u32),
    /// This trap reached the limit: the device is contained from now on.
    Contained(u32),
}

#[derive(Debug)]
struct Entry {
    traps: u32,
    reason: String,
    contained_since: Option<SystemTime>,
}

/// The per-device trap counters of one plugin version.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Entries in `devices`, readable without the lock.
    entries: AtomicUsize,
    devices: Mutex<HashMap<String, Entry>>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map stays consistent even if a holder panicked: every update is one statement.
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If `device` is contained: the traps that contained it and the last reason.
    pub(super) fn containment(&self, device: &str) -> Option<(u32, String)> {
        if self.entries.load(Ordering::Acquire) == 0 {
            return None;
        }
        let devices = self.lock();
        let e = devices.get(device)?;
        e.contained_since.map(|_| (e.traps, e.reason.clone()))
    }

    /// Charge one trap to `device`; `limit` in a row contain it.
    pub(super) fn trapped(&self, device: &str, reason: &str, limit: u32) -> Charged {
        let mut devices = self.lock();
        let e = devices.entry(device.to_owned()).or_insert(Entry {
            traps: 0,
            reason: String::new(),
            contained_since: None,
        });
        e.traps = e.traps.saturating_add(1);
        reason.clone_into(&mut e.reason);
        let charged = if e.contained_since.is_some() {
            // Calls already in progress when it was contained; it stays contained.
            Charged::Counted(e.traps)
        } else if e.traps >= limit {
            e.contained_since = Some(SystemTime::now());
            Charged::Contained(e.traps)
        } else {
            Charged::Counted(e.traps)
        };
        self.entries.store(devices.len(), Ordering::Release);
        charged
    }

    /// A call for `device` completed (whatever its result): its trap count starts over.
    pub(super) fn completed(&self, device: &str) {
        if self.entries.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut devices = self.lock();
        if devices
            .get(device)
            .is_some_and(|e| e.contained_since.is_none())
        {
            devices.remove(device);
        }
        self.entries.store(devices.len(), Ordering::Release);
    }

    /// Forget every count and containment; returns the devices that were contained, sorted.
    pub(super) fn clear(&self) -> Vec<String> {
        let mut devices = self.lock();
        let mut contained: Vec<String> = devices
            .drain()
            .filter(|(_, e)| e.contained_since.is_some())
            .map(|(id, _)| id)
            .collect();
        self.entries.store(0, Ordering::Release);
        contained.sort();
        contained
    }

    /// Every contained device, sorted by id.
    pub(super) fn contained(&self) -> Vec<ContainedDevice> {
        if self.entries.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut v: Vec<ContainedDevice> = self
            .lock()
            .iter()
            .filter_map(|(id, e)| {
                e.contained_since.map(|since| ContainedDevice {
                    device_id: id.clone(),
                    traps: e.traps,
                    reason: e.reason.clone(),
                    since: humantime::format_rfc3339_seconds(since).to_string(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traps_in_a_row_contain_only_the_device_that_caused_them() {
        let l = Ledger::default();
        assert_eq!(l.trapped("pm-01", "panic", 3), Charged::Counted(1));
        assert_eq!(l.trapped("pm-02", "panic", 3), Charged::Counted(1));
        assert_eq!(l.trapped("pm-01", "panic", 3), Charged::Counted(2));
        assert_eq!(l.containment("pm-01"), None);
        assert_eq!(l.trapped("pm-01", "cpu", 3), Charged::Contained(3));
        assert_eq!(l.containment("pm-01"), Some((3, "cpu".into())));
        assert_eq!(
            l.containment("pm-02"),
            None,
            "another device is never contained"
        );
        assert_eq!(l.containment("pm-03"), None);
        let c = l.contained();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].device_id.as_str(), c[0].traps), ("pm-01", 3));
    }

    #[test]
    fn a_completed_call_starts_the_count_over_and_drops_the_entry() {
        let l = Ledger::default();
        l.trapped("pm-01", "panic", 3);
        l.trapped("pm-01", "panic", 3);
        l.completed("pm-01");
        assert_eq!(l.entries.load(Ordering::Acquire), 0, "no entry kept");
        assert_eq!(l.trapped("pm-01", "panic", 3), Charged::Counted(1));
        // A completed call does not lift a containment.
        l.trapped("pm-01", "panic", 3);
        l.trapped("pm-01", "panic", 3);
        l.completed("pm-01");
        assert!(l.containment("pm-01").is_some());
    }

    #[test]
    fn clearing_lifts_every_containment_and_forgets_every_count() {
        let l = Ledger::default();
        for d in ["pm-02", "pm-01"] {
            for _ in 0..3 {
                l.trapped(d, "panic", 3);
            }
        }
        l.trapped("pm-03", "panic", 3);
        assert_eq!(l.clear(), vec!["pm-01".to_owned(), "pm-02".to_owned()]);
        assert!(l.contained().is_empty());
        assert_eq!(l.containment("pm-01"), None);
        assert_eq!(l.trapped("pm-03", "panic", 3), Charged::Counted(1));
        assert!(l.clear().is_empty());
    }

    #[test]
    fn a_limit_of_one_contains_at_the_first_trap() {
        let l = Ledger::default();
        assert_eq!(l.trapped("pm-01", "panic", 1), Charged::Contained(1));
        assert_eq!(l.trapped("pm-01", "panic", 1), Charged::Counted(2));
    }
}
