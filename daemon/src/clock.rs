//! Wall-clock times as milliseconds since the UNIX epoch: the one representation used in
//! records, canonical readings and the plugin contract. A clock before 1970 reads as 0.

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in milliseconds since the UNIX epoch.
pub fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Now, in milliseconds since the UNIX epoch.
pub fn now_ms() -> i64 {
    epoch_ms(SystemTime::now())
}

/// `ms` since the epoch as RFC 3339 UTC, to the second (`2026-12-02T06:00:00Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
