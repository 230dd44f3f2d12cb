//! Pacing within AWS IoT Core's per-connection quotas: one token bucket for publishes, one for
//! bytes.
//!
//! A bucket holding at most `burst` tokens and refilled at `rate` per second lets through at
//! most `burst + rate` in any one-second window. So each bucket is sized to the quota `q`:
//! `burst + rate = q`, which keeps every one-second window within the quota — however the
//! window is placed, not only aligned ones — while a message goes out as soon as its tokens are
//! there, instead of waiting for the next second when a fixed window is used up.
//!
//! - Publishes: `burst = ceil(q / 10)` (10 for IoT Core's 100/s), `rate = q - burst`.
//! - Bytes: `burst = upstream.max_batch_bytes` (one largest message must fit), `rate = q -
//!   burst`. A backlog drains at `rate`: with the defaults (32 KiB batches, 512 KiB/s) that is
//!   480 KiB/s, 94 % of the quota; larger batches leave less of the quota for the drain.
//!
//! What must stay true: a message is sent only when both buckets hold its tokens
//! ([`Pace::try_take`]), so no one-second window ever exceeds either quota.

use std::time::{Duration, Instant};

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

/// Both buckets of one upstream connection.
#[derive(Debug, Clone)]
pub struct Pace {
    publishes: Bucket,
    bytes: Bucket,
}

impl Pace {
    /// Buckets for quotas of `publishes_per_second` and `bytes_per_second`, with messages of
    /// at most `max_message_bytes`. Configuration validation keeps
    /// `max_message_bytes <= bytes_per_second / 2` and `publishes_per_second >= 2`.
    pub fn new(publishes_per_second: u32, bytes_per_second: u64, max_message_bytes: usize) -> Self {
        let now = Instant::now();
        let p = f64::from(publishes_per_second);
        Self {
            publishes: Bucket::new(p, (p / 10.0).ceil(), now),
            bytes: Bucket::new(bytes_per_second as f64, max_message_bytes as f64, now),
        }
    }

    /// Whole publishes available now.
    pub fn publishes(&mut self, now: Instant) -> usize {
        self.publishes.refill(now);
        self.publishes.tokens.floor() as usize
    }

    /// Whole bytes available now.
    pub fn bytes(&mut self, now: Instant) -> usize {
        self.bytes.refill(now);
        self.bytes.tokens.max(0.0).floor() as usize
    }

    /// How long until one publish of `bytes` is allowed (zero: now).
    pub fn wait(&mut self, bytes: usize, now: Instant) -> Duration {
        self.publishes.refill(now);
        self.bytes.refill(now);
        self.publishes.wait(1.0).max(self.bytes.wait(bytes as f64))
    }

    /// Take the tokens of one message of `bytes` if both buckets have them; otherwise how long
    /// until they will.
    pub fn try_take(&mut self, bytes: usize, now: Instant) -> Result<(), Duration> {
        let wait = self.wait(bytes, now);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.publishes.tokens -= 1.0;
        self.bytes.tokens -= bytes as f64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends as fast as the pace allows over `secs` of simulated time (1 ms steps) and returns
    /// every send's (time, bytes).
    fn saturate(pace: &mut Pace, size: usize, secs: u64) -> Vec<(Instant, usize)> {
        let start = Instant::now();
        let mut sent = Vec::new();
        for ms in 0..secs * 1000 {
            let now = start + Duration::from_millis(ms);
            while pace.try_take(size, now).is_ok() {
                sent.push((now, size));
            }
        }
        sent
    }

    #[test]
    fn no_one_second_window_exceeds_either_quota() {
        for size in [100, 4096, 32 * 1024] {
            let mut pace = Pace::new(100, 512 * 1024, 32 * 1024);
            let sent = saturate(&mut pace, size, 5);
            // Every window starting at a send.
            for (i, (t0, _)) in sent.iter().enumerate() {
                let window: Vec<_> = sent[i..]
                    .iter()
                    .take_while(|(t, _)| *t < *t0 + Duration::from_secs(1))
                    .collect();
                assert!(
                    window.len() <= 100,
                    "{} publishes in a second",
                    window.len()
                );
                let bytes: usize = window.iter().map(|(_, b)| b).sum();
                assert!(
                    bytes <= 512 * 1024,
                    "{bytes} bytes in a second ({size}-byte messages)"
                );
            }
        }
    }

    #[test]
    fn a_backlog_drains_at_over_90_percent_of_the_byte_quota() {
        let mut pace = Pace::new(100, 512 * 1024, 32 * 1024);
        let sent = saturate(&mut pace, 32 * 1024, 10);
        let bytes: usize = sent.iter().map(|(_, b)| b).sum();
        let per_second = bytes as f64 / 10.0;
        assert!(per_second >= 0.9 * 512.0 * 1024.0, "{per_second} bytes/s");
    }

    #[test]
    fn small_messages_go_at_once_and_the_wait_says_when_the_next_may() {
        let mut pace = Pace::new(100, 512 * 1024, 32 * 1024);
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
