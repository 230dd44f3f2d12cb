//! Pacemaker plugin. Vendor format (JSON):
//! `{"heartbeat": 92, "ts": <epoch ms>, "battery_pct": 87, "mode": "DDD"}`
//! → `heart-rate` in `/min` (20–300 accepted; outside 40–180 marked questionable) and, when
//! present, `battery-level` in `%` (0–100). The device's own `ts` is kept.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

use plugin_common::in_range;
use wardgate::plugin::host::{log, LogLevel};
use wardgate::plugin::types::Quality;

struct Plugin;

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "pacemaker".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["pacemaker".into()],
            metrics: vec!["heart-rate".into(), "battery-level".into()],
        }
    }

    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let v: serde_json::Value = serde_json::from_slice(&message.payload)
            .map_err(|e| NormalizeError::Malformed(format!("not JSON: {e}")))?;
        let hr = v
            .get("heartbeat")
            .and_then(|h| h.as_f64())
            .ok_or_else(|| NormalizeError::Malformed("no numeric `heartbeat`".into()))?;
        let ts = v
            .get("ts")
            .and_then(|t| t.as_i64())
            .ok_or_else(|| NormalizeError::Malformed("no integer `ts` (epoch ms)".into()))?;
        let hr = in_range("heart-rate", hr, 20.0, 300.0, "/min").map_err(NormalizeError::OutOfRange)?;
        let quality = if (40.0..=180.0).contains(&hr) {
            Quality::Good
        } else {
            log(LogLevel::Warn, &format!("heart rate {hr}/min is outside 40–180"));
            Quality::Questionable
        };
        let mut out = vec![Reading {
            metric: "heart-rate".into(),
            value: hr,
            unit: "/min".into(),
            observed_at_ms: ts,
            quality,
        }];
        if let Some(b) = v.get("battery_pct").and_then(|b| b.as_f64()) {
            let b = in_range("battery-level", b, 0.0, 100.0, "%").map_err(NormalizeError::OutOfRange)?;
            out.push(Reading {
                metric: "battery-level".into(),
                value: b,
                unit: "%".into(),
                observed_at_ms: ts,
                quality: Quality::Good,
            });
        }
        Ok(out)
    }
}

export!(Plugin);
