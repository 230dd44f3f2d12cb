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

/// RFC 3339 UTC with milliseconds, for any time from year 0 to 9999; empty outside that.
pub fn rfc3339_millis(ms: i64) -> String {
    const MIN: i64 = -62_167_219_200_000; // pure input: 0000-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799_999; // pure input: 9999-12-31T23:59:59.999Z
    if !(MIN..=MAX).contains(&ms) {
        return String::new();
    }
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// `ms` since the epoch as RFC 3339 UTC, to the second (`2026-12-02T06:00:00Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_millis(951_782_400_250), "2000-02-29T00:00:00.250Z"); // pure input: a leap day
        assert_eq!(rfc3339_millis(i64::MAX), "");
        // Against the system's formatter for the time now.
        let now = crate::clock::now_ms();
        let sys = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(now as u64),
        )
        .to_string();
        assert_eq!(rfc3339_millis(now), sys);
    }
}
