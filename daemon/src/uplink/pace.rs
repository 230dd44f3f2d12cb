//! Pacing within AWS IoT Core's per-connection quotas: publishes per second and bytes per
//! second, each kept so that **no one-second window**, however placed, exceeds its quota.
//!
//! - Publishes: a token bucket holding at most `burst` tokens and refilled at `rate` per second
//!   lets through at most `burst + rate` in any one-second window, so it is sized `burst =
//!   ceil(q / 10)` (10 for IoT Core's 100/s), `rate = q - burst`. IoT Core *drops* publishes
//!   over its quota, so the burst stays small: a message goes as soon as its token is there,
//!   and never more than a tenth of the quota at once.
//! - Bytes: a sliding window — the sizes and times of the messages sent in the last second.
//!   A message goes when it fits in what the last second left of the quota. IoT Core only
//!   *delays* bytes over its quota, so the whole quota may go at once: a burst of readings
//!   (500 devices reconnecting after a power cut, all reporting at the same moment) leaves as
//!   soon as the publish bucket allows, instead of trickling out at the refill rate of a
//!   bucket whose burst is one message (with 32 KiB batches such a bucket held the last
//!   reading of a 500-reading burst back ~200 ms); and a backlog drains at the full quota.
//!   The window holds one entry per message of the last second, so at most the publish quota.
//! - A message's bytes are counted as on the wire (see [`wire_bytes`]), not only its payload.
//!
//! What must stay true: a message is sent only when both hold room for it
//! ([`Pace::try_take`]), so no one-second window ever exceeds either quota.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);

/// Bytes of a QoS 1 PUBLISH of `payload` bytes on `topic`, as IoT Core counts its throughput:
/// payload, topic, its length, the packet id and the fixed header.
pub fn wire_bytes(topic: &str, payload: usize) -> usize {
    let rest = 2 + topic.len() + 2 + payload;
    let length_bytes = match rest {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + rest
}

#[derive(Debug, Clone)]
struct Bucket {
    burst: f64,
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(quota: f64, burst: f64, now: Instant) -> Self {
        Self {
            burst,
            rate: (quota - burst).max(1.0),
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
    }

    /// How long until `n` tokens are there (zero: now).
    fn wait(&self, n: f64) -> Duration {
        if self.tokens >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.tokens) / self.rate)
        }
    }
}

/// The bytes sent in the last second, message by message.
#[derive(Debug, Clone)]
struct Window {
    quota: u64,
    /// (sent at, bytes), oldest first; only sends of the last second.
    sent: VecDeque<(Instant, u64)>,
    /// Sum of `sent`'s bytes.
    total: u64,
}

impl Window {
    fn new(quota: u64) -> Self {
        Self {
            quota,
            sent: VecDeque::new(),
            total: 0,
        }
    }

    /// Forget the sends that no one-second window ending at `now` holds.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, n)) = self.sent.front() {
            if now.saturating_duration_since(at) < SECOND {
                break;
            }
            self.sent.pop_front();
            self.total -= n;
        }
    }

    /// Bytes that may go now.
    fn room(&self) -> u64 {
        self.quota.saturating_sub(self.total)
    }

    /// How long until `n` bytes fit (zero: now). A message larger than the whole quota (which
    /// configuration validation rules out) fits once the window is empty.
    fn wait(&self, n: u64, now: Instant) -> Duration {
        let n = n.min(self.quota);
        if self.total + n <= self.quota {
            return Duration::ZERO;
        }
        let mut left = self.total;
        for &(at, bytes) in &self.sent {
            left -= bytes;
            if left + n <= self.quota {
                return (at + SECOND).saturating_duration_since(now);
            }
        }
        Duration::ZERO
    }

    fn take(&mut self, n: u64, now: Instant) {
        self.sent.push_back((now, n));
        self.total += n;
    }
}

/// Both limits of one upstream connection.
#[derive(Debug, Clone)]
pub struct Pace {
    publishes: Bucket,
    bytes: Window,
}

impl Pace {
    /// Limits for quotas of `publishes_per_second` and `bytes_per_second`. Configuration
    /// validation keeps messages at most `bytes_per_second / 2` and `publishes_per_second >= 2`.
    pub fn new(publishes_per_second: u32, bytes_per_second: u64) -> Self {
        let now = Instant::now();
        let p = f64::from(publishes_per_second);
        Self {
            publishes: Bucket::new(p, (p / 10.0).ceil(), now),
            bytes: Window::new(bytes_per_second),
        }
    }

    /// Whole publishes available now.
    pub fn publishes(&mut self, now: Instant) -> usize {
        self.publishes.refill(now);
        self.publishes.tokens.floor() as usize
    }

    /// Bytes that may go now.
    pub fn bytes(&mut self, now: Instant) -> usize {
        self.bytes.expire(now);
        usize::try_from(self.bytes.room()).unwrap_or(usize::MAX)
    }

    /// How long until one message of `bytes` (on the wire) is allowed (zero: now).
    pub fn wait(&mut self, bytes: usize, now: Instant) -> Duration {
        self.publishes.refill(now);
        self.bytes.expire(now);
        self.publishes
            .wait(1.0)
            .max(self.bytes.wait(bytes as u64, now))
    }

    /// Take the room of one message of `bytes` (on the wire) if both limits have it;
    /// otherwise how long until they will.
    pub fn try_take(&mut self, bytes: usize, now: Instant) -> Result<(), Duration> {
        let wait = self.wait(bytes, now);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.publishes.tokens -= 1.0;
        self.bytes.take(bytes as u64, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends as fast as the pace allows over `secs` of simulated time (1 ms steps), message
    /// sizes taken in turn from `sizes`, and returns every send's (time, bytes).
    fn saturate(pace: &mut Pace, sizes: &[usize], secs: u64) -> Vec<(Instant, usize)> {
        let start = Instant::now();
        let mut sent = Vec::new();
        for ms in 0..secs * 1000 {
            let now = start + Duration::from_millis(ms);
            while pace.try_take(sizes[sent.len() % sizes.len()], now).is_ok() {
                sent.push((now, sizes[sent.len() % sizes.len()]));
            }
        }
        sent
    }

    /// Every one-second window starting at a send holds at most 100 publishes and 512 KiB.
    fn assert_within_quotas(sent: &[(Instant, usize)], what: &str) {
        for (i, (t0, _)) in sent.iter().enumerate() {
            let window: Vec<_> = sent[i..]
                .iter()
                .take_while(|(t, _)| *t < *t0 + Duration::from_secs(1))
                .collect();
            assert!(
                window.len() <= 100,
                "{} publishes in a second ({what})",
                window.len()
            );
            let bytes: usize = window.iter().map(|(_, b)| b).sum();
            assert!(bytes <= 512 * 1024, "{bytes} bytes in a second ({what})");
        }
    }

    #[test]
    fn no_one_second_window_exceeds_either_quota() {
        for size in [100, 4096, 32 * 1024] {
            let mut pace = Pace::new(100, 512 * 1024);
            let sent = saturate(&mut pace, &[size], 5);
            assert_within_quotas(&sent, &format!("{size}-byte messages"));
        }
    }

    #[test]
    fn a_backlog_drains_at_the_byte_quota() {
        let mut pace = Pace::new(100, 512 * 1024);
        let sent = saturate(&mut pace, &[32 * 1024], 10);
        let bytes: usize = sent.iter().map(|(_, b)| b).sum();
        let per_second = bytes as f64 / 10.0;
        assert!(per_second >= 0.99 * 512.0 * 1024.0, "{per_second} bytes/s");
    }

    #[test]
    fn mixed_sizes_keep_every_window_within_both_quotas() {
        let mut pace = Pace::new(100, 512 * 1024);
        let sent = saturate(&mut pace, &[100, 32 * 1024, 4096, 700, 20 * 1024, 1], 5);
        // Bytes are the bound here, and the quota is used.
        let total: usize = sent.iter().map(|(_, b)| b).sum();
        assert!(total as f64 >= 4.5 * 512.0 * 1024.0, "{total} bytes in 5 s");
        assert_within_quotas(&sent, "mixed sizes");
    }

    #[test]
    fn a_burst_within_the_byte_quota_goes_as_fast_as_the_publish_quota_allows() {
        // ~500 KiB of readings at once, after a quiet second: 16 messages of 31 KiB.
        let mut pace = Pace::new(100, 512 * 1024);
        let now = Instant::now();
        let size = 31 * 1024;
        for i in 0..10 {
            assert_eq!(pace.try_take(size, now), Ok(()), "message {i} goes at once");
        }
        // The rest wait only for publish tokens (~11 ms each), not for bytes.
        let wait = pace.try_take(size, now).unwrap_err();
        assert!(wait <= Duration::from_millis(12), "{wait:?}");
        let mut t = now;
        for i in 10..16 {
            t += Duration::from_millis(12);
            assert_eq!(pace.try_take(size, t), Ok(()), "message {i}");
        }
        // The quota is used up: what comes next waits for the first sends to leave the window.
        t += Duration::from_millis(12);
        let wait = pace.try_take(size, t).unwrap_err();
        assert_eq!(t + wait, now + Duration::from_secs(1), "{wait:?}");
        assert!(pace.bytes(t) < size);
        assert_eq!(pace.try_take(size, now + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn wire_bytes_are_the_publish_packets_size() {
        use rumqttc::mqttbytes::v4::Publish;
        use rumqttc::mqttbytes::QoS;
        for topic in ["dt/ward/gw-01/telemetry", "t"] {
            for n in [0, 10, 100, 127, 128, 16_000, 16_384, 200_000] {
                let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![0u8; n]);
                p.pkid = 1;
                assert_eq!(wire_bytes(topic, n), p.size(), "{topic}, {n} bytes");
            }
        }
    }

    #[test]
    fn small_messages_go_at_once_and_the_wait_says_when_the_next_may() {
        let mut pace = Pace::new(100, 512 * 1024);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(pace.try_take(200, now), Ok(()), "the burst goes at once");
        }
        let wait = pace.try_take(200, now).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(12),
            "{wait:?}"
        );
        assert_eq!(pace.try_take(200, now + wait), Ok(()));
    }
}
