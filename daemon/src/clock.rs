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
