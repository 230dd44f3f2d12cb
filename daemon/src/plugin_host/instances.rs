//! The instances one plugin version keeps between calls: at most one per device, never handed
//! to another device.
//!
//! What must stay true:
//! - an instance is kept under the id of the one device it was made for and is only ever taken
//!   back out for that device; so what a plugin leaves in its memory can reach later messages
//!   of the same device and nothing else;
//! - the linear memory of all kept instances together stays within the budget given at
//!   creation (least recently used instances are dropped first), and an instance bigger than
//!   an eighth of it is not kept at all: one large message does not pin a large heap;
//! - a taken instance is out of the map while its call runs: a trap drops it, and only a call
//!   that completed puts it back.

use std::collections::HashMap;

/// Kept instances (`T`), by device.
#[derive(Debug)]
pub(super) struct Kept<T> {
    budget_bytes: usize,
    /// `None` while the device's instance is out for a call (or was dropped by a trap): the key
    /// stays, so putting it back allocates nothing. Keys are device ids that called, so there
    /// are never more than the registry has devices.
    by_device: HashMap<String, Option<Slot<T>>>,
    bytes: usize,
    uses: u64,
}

#[derive(Debug)]
struct Slot<T> {
    instance: T,
    bytes: usize,
    last_used: u64,
}

impl<T> Kept<T> {
    /// Nothing kept; kept instances' memory at most `budget_bytes`.
    pub(super) fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            by_device: HashMap::new(),
            bytes: 0,
            uses: 0,
        }
    }

    /// The instance kept for `device`, taken out.
    pub(super) fn take(&mut self, device: &str) -> Option<T> {
        let slot = self.by_device.get_mut(device)?.take()?;
        self.bytes -= slot.bytes;
        Some(slot.instance)
    }

    /// Keep `instance` (of `bytes` of linear memory) for `device`, dropping the least recently
    /// used others if the budget needs it. Returns whether it was kept.
    pub(super) fn put(&mut self, device: &str, instance: T, bytes: usize) -> bool {
        if bytes > self.budget_bytes / 8 {
            return false;
        }
        self.uses += 1;
        let slot = Slot {
            instance,
            bytes,
            last_used: self.uses,
        };
        let old = match self.by_device.get_mut(device) {
            Some(entry) => entry.replace(slot),
            None => self
                .by_device
                .insert(device.to_owned(), Some(slot))
                .flatten(),
        };
        if let Some(old) = old {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        while self.bytes > self.budget_bytes {
            let oldest = self
                .by_device
                .iter()
                .filter_map(|(d, s)| s.as_ref().map(|s| (d, s.last_used)))
                .min_by_key(|(_, used)| *used)
                .map(|(d, _)| d.clone());
            // Never empty here: the bytes counted are those of the kept slots.
            let Some(oldest) = oldest else { break };
            if let Some(s) = self.by_device.remove(&oldest).flatten() {
                self.bytes -= s.bytes;
            }
        }
        true
    }

    /// Instances kept, and their linear memory in bytes.
    pub(super) fn usage(&self) -> (usize, usize) {
        let kept = self.by_device.values().filter(|s| s.is_some()).count();
        (kept, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn an_instance_goes_back_only_to_its_own_device() {
        let mut k = Kept::new(64 * MIB);
        assert!(k.put("pm-01", 1, MIB));
        assert_eq!(k.take("pm-02"), None);
        assert_eq!(k.take("pm-01"), Some(1));
        assert_eq!(k.take("pm-01"), None, "taken out while its call runs");
        assert_eq!(k.usage(), (0, 0));
    }

    #[test]
    fn the_least_recently_used_go_first_when_the_memory_budget_is_full() {
        let mut k = Kept::new(8 * MIB);
        for (i, d) in ["a", "b", "c", "d"].into_iter().enumerate() {
            assert!(k.put(d, i, MIB));
        }
        // "a" is used again, so "b" is now the oldest.
        let a = k.take("a").unwrap();
        k.put("a", a, MIB);
        for (i, d) in ["e", "f", "g", "h", "i"].into_iter().enumerate() {
            k.put(d, 10 + i, MIB);
        }
        assert_eq!(k.usage(), (8, 8 * MIB));
        assert_eq!(k.take("b"), None, "least recently used dropped");
        assert_eq!(k.take("a"), Some(0));
        assert_eq!(k.take("i"), Some(14));
    }

    #[test]
    fn a_large_instance_is_not_kept_and_a_replaced_one_is_not_counted_twice() {
        let mut k = Kept::new(8 * MIB);
        assert!(!k.put("pm-01", 1, 2 * MIB), "over an eighth of the budget");
        assert_eq!(k.usage(), (0, 0));
        assert!(k.put("pm-01", 1, MIB));
        assert!(k.put("pm-01", 2, MIB / 2));
        assert_eq!(k.usage(), (1, MIB / 2));
        assert_eq!(k.take("pm-01"), Some(2));
    }
}
