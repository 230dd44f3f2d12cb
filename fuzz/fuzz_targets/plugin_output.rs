//! Fuzz target `plugin_output`: the plugin host's check of what a plugin returns
//! (`plugin_host::check_readings`), the last gate before a plugin's output becomes readings
//! that are published, queued and sent upstream.
//!
//! Input: a [`Case`] (the gateway's receive time and the plugin's readings, as the WIT record
//! `reading` has them). Inputs starting with `{` are read as JSON (`{"received_at_ms": ..,
//! "readings": [{"metric": .., "value": .., "unit": .., "observed_at_ms": .., "quality":
//! "good"}]}`), so the seeds can be readings the ward's plugins really produce; any other input
//! is decoded with `arbitrary`.
//!
//! What must stay true (the plugin host's "whatever a plugin returns is checked"):
//! - nothing panics, whatever the plugin returns;
//! - the output is accepted exactly when there are at most 64 readings and each has a metric
//!   and a unit of 1–64 bytes without control characters, a finite value, and an observation
//!   time between 2000-01-01 and one day after receipt; it is refused as invalid output
//!   otherwise;
//! - accepted readings are the plugin's, unchanged and in order, and serialize to JSON.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use wardgate::plugin_host::bindings::wardgate::plugin::types;
use wardgate::plugin_host::{check_readings, Failure};

/// Most readings one message may give (`MAX_READINGS_PER_MESSAGE` in the plugin host).
const MAX_READINGS: usize = 64;
/// 2000-01-01T00:00:00Z in epoch milliseconds: the earliest observation accepted.
const EARLIEST_MS: i64 = 946_684_800_000;
/// How far after receipt an observation may lie (a device clock a little ahead).
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Quality {
    Good,
    Questionable,
}

/// A local mirror of the WIT record `reading`.
#[derive(Debug, Clone, Arbitrary, Deserialize)]
struct RawReading {
    metric: String,
    value: f64,
    unit: String,
    observed_at_ms: i64,
    quality: Quality,
}

#[derive(Debug, Arbitrary, Deserialize)]
struct Case {
    received_at_ms: i64,
    readings: Vec<RawReading>,
}

impl RawReading {
    fn to_wit(&self) -> types::Reading {
        types::Reading {
            metric: self.metric.clone(),
            value: self.value,
            unit: self.unit.clone(),
            observed_at_ms: self.observed_at_ms,
            quality: match self.quality {
                Quality::Good => types::Quality::Good,
                Quality::Questionable => types::Quality::Questionable,
            },
        }
    }

    /// The documented rule, written out independently of the host's code.
    fn valid(&self, received_at_ms: i64) -> bool {
        let name = |s: &str| !s.is_empty() && s.len() <= 64 && !s.chars().any(char::is_control);
        name(&self.metric)
            && name(&self.unit)
            && self.value.is_finite()
            && self.observed_at_ms >= EARLIEST_MS
            && self.observed_at_ms <= received_at_ms.saturating_add(DAY_MS)
    }
}

fn decode(data: &[u8]) -> Option<Case> {
    if data.first() == Some(&b'{') {
        serde_json::from_slice(data).ok()
    } else {
        Case::arbitrary_take_rest(Unstructured::new(data)).ok()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = decode(data) else { return };
    let raw: Vec<types::Reading> = case.readings.iter().map(RawReading::to_wit).collect();
    let expected = case.readings.len() <= MAX_READINGS
        && case.readings.iter().all(|r| r.valid(case.received_at_ms));
    match check_readings(raw, case.received_at_ms) {
        Ok(readings) => {
            assert!(expected, "accepted invalid output: {case:?}");
            assert_eq!(readings.len(), case.readings.len());
            for (got, sent) in readings.iter().zip(&case.readings) {
                assert_eq!(got.metric, sent.metric);
                assert_eq!(got.value.to_bits(), sent.value.to_bits());
                assert_eq!(got.unit, sent.unit);
                assert_eq!(got.observed_at_ms, sent.observed_at_ms);
                let quality = match sent.quality {
                    Quality::Good => "good",
                    Quality::Questionable => "questionable",
                };
                assert_eq!(got.quality, quality);
            }
            let json = serde_json::to_string(&readings).expect("readings serialize");
            assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
        }
        Err(Failure::InvalidOutput(why)) => {
            assert!(!expected, "refused valid output ({why}): {case:?}");
            assert!(!why.is_empty());
        }
        Err(other) => panic!("check_readings failed with {other:?}, not InvalidOutput"),
    }
});
