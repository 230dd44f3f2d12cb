//! Glucose plugin, two vendor formats:
//! - GlucoCare JSON: `{"glucose":{"value":104,"unit":"mg/dL"},"measured_at":"<RFC 3339 UTC>",...}`
//! - SugarSense text: `SS1;<value>;mmol/L;<epoch s>`
//!
//! → `blood-glucose` in `mg/dL` (the device setting `unit = "mmol/L"` switches the output to
//! mmol/L). Accepted range 10–1000 mg/dL (0.6–55.5 mmol/L); outside 40–400 mg/dL the reading is
//! marked questionable. The device's own time is kept.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

use plugin_common::{in_range, parse_rfc3339_utc, round, GLUCOSE_MGDL_PER_MMOLL};
use wardgate::plugin::host::device_setting;
use wardgate::plugin::types::Quality;

struct Plugin;

/// (value in mg/dL, observed-at ms)
fn parse(payload: &[u8]) -> Result<(f64, i64), NormalizeError> {
    let malformed = |m: String| NormalizeError::Malformed(m);
    if payload.starts_with(b"SS1;") {
        let text = core::str::from_utf8(payload).map_err(|_| malformed("not UTF-8".into()))?;
        let f: Vec<&str> = text.trim_end().split(';').collect();
        if f.len() != 4 {
            return Err(malformed(format!("SugarSense record has {} fields, expected 4", f.len())));
        }
        let value: f64 = f[1].parse().map_err(|_| malformed(format!("value `{}` is not a number", f[1])))?;
        let secs: i64 = f[3].parse().map_err(|_| malformed(format!("time `{}` is not epoch seconds", f[3])))?;
        let mgdl = match f[2] {
            "mmol/L" => value * GLUCOSE_MGDL_PER_MMOLL,
            "mg/dL" => value,
            other => return Err(NormalizeError::Unsupported(format!("unit `{other}`"))),
        };
        return Ok((mgdl, secs * 1000));
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| malformed(format!("not JSON or SS1 text: {e}")))?;
    let g = v.get("glucose").ok_or_else(|| malformed("no `glucose` object".into()))?;
    let value = g
        .get("value")
        .and_then(|x| x.as_f64())
        .ok_or_else(|| malformed("no numeric `glucose.value`".into()))?;
    let unit = g.get("unit").and_then(|u| u.as_str()).unwrap_or("mg/dL");
    let mgdl = match unit {
        "mg/dL" => value,
        "mmol/L" => value * GLUCOSE_MGDL_PER_MMOLL,
        other => return Err(NormalizeError::Unsupported(format!("unit `{other}`"))),
    };
    let at = v
        .get("measured_at")
        .and_then(|t| t.as_str())
        .ok_or_else(|| malformed("no `measured_at` time".into()))?;
    let ms = parse_rfc3339_utc(at).map_err(NormalizeError::Malformed)?;
    Ok((mgdl, ms))
}

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "glucose".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["glucose".into()],
            metrics: vec!["blood-glucose".into()],
        }
    }

    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let (mgdl, at) = parse(&message.payload)?;
        let mgdl = in_range("blood-glucose", mgdl, 10.0, 1000.0, "mg/dL").map_err(NormalizeError::OutOfRange)?;
        let quality = if (40.0..=400.0).contains(&mgdl) { Quality::Good } else { Quality::Questionable };
        let (value, unit) = match device_setting("unit").as_deref() {
            Some("mmol/L") => (round(mgdl / GLUCOSE_MGDL_PER_MMOLL, 2), "mmol/L"),
            _ => (round(mgdl, 1), "mg/dL"),
        };
        Ok(vec![Reading { metric: "blood-glucose".into(), value, unit: unit.into(), observed_at_ms: at, quality }])
    }
}

export!(Plugin);
