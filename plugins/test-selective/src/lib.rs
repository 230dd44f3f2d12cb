//! Test guest (selective): normalises pacemaker messages like the pacemaker plugin, except that
//! it misbehaves on the messages that ask for it, so tests can make one device trap the plugin
//! while another device of the same plugin sends good readings. Never deploy.
//!
//! `{"heartbeat": 92, "ts": <epoch ms>}` → `heart-rate` in `/min`, and `instance-calls`: how
//! many messages this instance has normalised, itself included (state kept in the instance's
//! memory; a fresh instance per call always says 1). `"trap": "panic"` panics, `"trap": "spin"`
//! loops without end.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

use std::sync::atomic::{AtomicU32, Ordering};
use wardgate::plugin::types::Quality;

/// Messages this instance has normalised.
static CALLS: AtomicU32 = AtomicU32::new(0);

struct Plugin;

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "test-selective".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["pacemaker".into()],
            metrics: vec!["heart-rate".into(), "instance-calls".into()],
        }
    }

    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let v: serde_json::Value = serde_json::from_slice(&message.payload)
            .map_err(|e| NormalizeError::Malformed(format!("not JSON: {e}")))?;
        match v.get("trap").and_then(|t| t.as_str()) {
            Some("panic") => panic!("test guest panics on request"),
            Some("spin") => {
                let mut n = message.payload.len() as u64;
                loop {
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if n == 42 {
                        break;
                    }
                }
                return Err(NormalizeError::Unsupported(format!("{n}")));
            }
            _ => {}
        }
        let hr = v
            .get("heartbeat")
            .and_then(|h| h.as_f64())
            .ok_or_else(|| NormalizeError::Malformed("no numeric `heartbeat`".into()))?;
        let ts = v
            .get("ts")
            .and_then(|t| t.as_i64())
            .ok_or_else(|| NormalizeError::Malformed("no integer `ts` (epoch ms)".into()))?;
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(vec![
            Reading {
                metric: "heart-rate".into(),
                value: hr,
                unit: "/min".into(),
                observed_at_ms: ts,
                quality: Quality::Good,
            },
            Reading {
                metric: "instance-calls".into(),
                value: f64::from(calls),
                unit: "1".into(),
                observed_at_ms: ts,
                quality: Quality::Good,
            },
        ])
    }
}

export!(Plugin);
