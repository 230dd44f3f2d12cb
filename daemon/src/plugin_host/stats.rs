//! Per-plugin call counters and a call-duration histogram, for `wardgate status` and the
//! Prometheus `/metrics` endpoint.
//!
//! Kept per plugin *name*, not per loaded version: a hot swap keeps the counts (a dashboard's
//! rate does not jump when a new version is dropped in). Recording a call is a few relaxed
//! atomic additions, no lock, so it can sit on the path of every reading.
//!
//! What must stay true: every call that reached the plugin's entry point (or was refused on
//! its behalf: a contained device) is counted exactly once in `calls`, and exactly once in the
//! histogram when it ran; a failed call is also counted once under its [`super::Failure`]
//! kind.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the call-duration histogram's buckets, in seconds (a `+Inf` bucket follows).
/// A plugin call normally takes 10–100 µs; the upper buckets catch calls near the deadline.
pub const LATENCY_BOUNDS_S: [f64; 12] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Failure kinds counted per plugin ([`super::Failure::kind`], except `no-plugin`, which has
/// no plugin to count it against).
pub const FAILURE_KINDS: [&str; 8] = [
    "device-contained",
    "trap",
    "overloaded",
    "host-error",
    "malformed",
    "out-of-range",
    "unsupported",
    "invalid-output",
];

/// The live counters of one plugin name.
#[derive(Debug, Default)]
pub struct CallStats {
    calls: AtomicU64,
    failures: [AtomicU64; FAILURE_KINDS.len()],
    /// Non-cumulative bucket counts; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BOUNDS_S.len() + 1],
    sum_ns: AtomicU64,
}

impl CallStats {
    /// A call that ran for `took`, and how it ended (`None`: it produced readings).
    pub fn ran(&self, took: Duration, failure: Option<&str>) {
        self.calls.fetch_add(1, Relaxed);
        let s = took.as_secs_f64();
        let i = LATENCY_BOUNDS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS_S.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        if let Some(kind) = failure {
            self.failed(kind);
        }
    }

    /// A call refused before the plugin ran (a contained device, no instance).
    pub fn refused(&self, kind: &str) {
        self.calls.fetch_add(1, Relaxed);
        self.failed(kind);
    }

    fn failed(&self, kind: &str) {
        if let Some(i) = FAILURE_KINDS.iter().position(|k| *k == kind) {
            self.failures[i].fetch_add(1, Relaxed);
        }
    }

    /// Plain data.
    pub fn snapshot(&self) -> CallCounts {
        let mut cumulative = 0;
        let buckets = self
            .buckets
            .iter()
            .map(|b| {
                cumulative += b.load(Relaxed);
                cumulative
            })
            .collect();
        CallCounts {
            calls: self.calls.load(Relaxed),
            failures: FAILURE_KINDS
                .iter()
                .zip(&self.failures)
                .map(|(k, n)| ((*k).to_owned(), n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            duration: Histogram {
                le: LATENCY_BOUNDS_S.to_vec(),
                cumulative: buckets,
                sum_s: self.sum_ns.load(Relaxed) as f64 / 1e9,
            },
        }
    }
}

/// A plugin's calls since start, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallCounts {
    /// Calls (messages handed to the plugin, contained devices' messages included).
    pub calls: u64,
    /// Failed calls by kind (only kinds that happened).
    pub failures: BTreeMap<String, u64>,
    /// How long the calls that ran took.
    pub duration: Histogram,
}

/// A cumulative histogram as Prometheus exposes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Bucket upper bounds in seconds (the `+Inf` bucket is implied).
    pub le: Vec<f64>,
    /// Observations at or below each bound; one more entry than `le`: the `+Inf` bucket, which
    /// is the count.
    pub cumulative: Vec<u64>,
    /// Sum of the observations, in seconds.
    pub sum_s: f64,
}

impl Histogram {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_failures_counted_by_kind() {
        let s = CallStats::default();
        s.ran(Duration::from_micros(20), None);
        s.ran(Duration::from_micros(30), Some("trap"));
        s.ran(Duration::from_secs(2), Some("overloaded"));
        s.refused("device-contained");
        let c = s.snapshot();
        assert_eq!(c.calls, 4);
        assert_eq!(c.duration.count(), 3, "a refused call did not run");
        assert_eq!(c.duration.cumulative[0], 1, "20 µs <= 25 µs");
        assert_eq!(c.duration.cumulative[1], 2, "30 µs <= 50 µs");
        assert_eq!(c.duration.cumulative[LATENCY_BOUNDS_S.len() - 1], 2);
        assert!((c.duration.sum_s - 2.00005).abs() < 1e-9);
        assert_eq!(
            c.failures,
            BTreeMap::from([
                ("device-contained".to_owned(), 1),
                ("overloaded".to_owned(), 1),
                ("trap".to_owned(), 1)
            ])
        );
    }
}
