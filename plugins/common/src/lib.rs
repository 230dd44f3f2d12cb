//! Helpers shared by wardgate's device plugins: plain Rust, no bindings, unit-tested on the host.

#![cfg_attr(not(test), no_std)]
extern crate alloc;
use alloc::format;
use alloc::string::String;

/// mg/dL per mmol/L of glucose (molar mass 180.16 g/mol).
pub const GLUCOSE_MGDL_PER_MMOLL: f64 = 18.016;

/// Milliseconds since the UNIX epoch for a UTC civil date-time.
pub fn epoch_ms(year: i64, month: u32, day: u32, h: u32, m: u32, s: u32, ms: u32) -> i64 {
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + i64::from(h)) * 60 + i64::from(m)) * 60_000 + i64::from(s) * 1000 + i64::from(ms)
}

/// Parse an RFC 3339 UTC time (`2026-11-22T05:48:58Z` or with `.123` fraction or `+00:00`).
pub fn parse_rfc3339_utc(s: &str) -> Result<i64, String> {
    let b = s.as_bytes();
    let bad = || format!("`{s}` is not an RFC 3339 UTC time");
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: core::ops::Range<usize>| -> Result<u32, String> {
        s.get(r).and_then(|t| t.parse::<u32>().ok()).ok_or_else(bad)
    };
    let (year, month, day) = (num(0..4)? as i64, num(5..7)?, num(8..10)?);
    let (h, m, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let d = &frac[..digits.min(3)];
        ms = d.parse::<u32>().map_err(|_| bad())? * 10u32.pow(3 - d.len() as u32);
        rest = &frac[digits..];
    }
    if !matches!(rest, "Z" | "z" | "+00:00" | "-00:00") {
        return Err(format!("`{s}`: only UTC times (Z) are accepted"));
    }
    Ok(epoch_ms(year, month, day, h, m, sec, ms))
}

/// `value` within `lo..=hi`, else a message naming the metric and the range.
pub fn in_range(metric: &str, value: f64, lo: f64, hi: f64, unit: &str) -> Result<f64, String> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(value)
    } else {
        Err(format!("{metric} {value} {unit} is outside {lo}..={hi} {unit}"))
    }
}

/// °F → °C.
pub fn fahrenheit_to_celsius(f: f64) -> f64 {
    (f - 32.0) * 5.0 / 9.0
}

/// Round to `places` decimals (for stable canonical values).
pub fn round(v: f64, places: i32) -> f64 {
    let k = libm_pow10(places);
    let x = v * k;
    let r = if x >= 0.0 { (x + 0.5) as i64 } else { (x - 0.5) as i64 };
    r as f64 / k
}

fn libm_pow10(p: i32) -> f64 {
    let mut k = 1.0;
    for _ in 0..p {
        k *= 10.0;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339_utc("2026-11-22T05:48:58Z"), Ok(1_795_326_538_000)); // pure input: parser test
        assert_eq!(parse_rfc3339_utc("2026-11-22T05:48:58.5Z"), Ok(1_795_326_538_500)); // pure input: parser test
        assert!(parse_rfc3339_utc("2026-11-22T05:48:58+01:00").is_err());
        assert!(parse_rfc3339_utc("yesterday").is_err());
    }

    #[test]
    fn conversions() {
        assert_eq!(round(fahrenheit_to_celsius(98.6), 2), 37.0);
        assert_eq!(round(5.5 * GLUCOSE_MGDL_PER_MMOLL, 1), 99.1);
        assert!(in_range("hr", 301.0, 20.0, 300.0, "/min").is_err());
        assert!(in_range("hr", f64::NAN, 20.0, 300.0, "/min").is_err());
    }
}
