//! Bed temperature plugin. Vendor format (ThermaBed text): `bed=07 temp_f=98.6 ts=<epoch s>`
//! (`temp_c=` is accepted too) → `body-temperature` in `Cel` (UCUM), 25–45 °C accepted,
//! outside 34–41 °C marked questionable. The device's own time is kept.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

use plugin_common::{fahrenheit_to_celsius, in_range, round};
use wardgate::plugin::types::Quality;

struct Plugin;

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "bed-temperature".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["bed-temperature".into()],
            metrics: vec!["body-temperature".into()],
        }
    }

    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let text = core::str::from_utf8(&message.payload)
            .map_err(|_| NormalizeError::Malformed("not UTF-8 text".into()))?;
        let (mut celsius, mut ts) = (None, None);
        for field in text.split_whitespace() {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| NormalizeError::Malformed(format!("`{field}` is not key=value")))?;
            let num = |v: &str| v.parse::<f64>().map_err(|_| NormalizeError::Malformed(format!("`{k}={v}` is not a number")));
            match k {
                "temp_f" => celsius = Some(fahrenheit_to_celsius(num(v)?)),
                "temp_c" => celsius = Some(num(v)?),
                "ts" => ts = Some(v.parse::<i64>().map_err(|_| NormalizeError::Malformed(format!("`ts={v}` is not epoch seconds")))?),
                "bed" => {}
                other => return Err(NormalizeError::Unsupported(format!("field `{other}`"))),
            }
        }
        let c = celsius.ok_or_else(|| NormalizeError::Malformed("no temp_f or temp_c".into()))?;
        let ts = ts.ok_or_else(|| NormalizeError::Malformed("no ts".into()))?;
        let c = in_range("body-temperature", c, 25.0, 45.0, "Cel").map_err(NormalizeError::OutOfRange)?;
        let quality = if (34.0..=41.0).contains(&c) { Quality::Good } else { Quality::Questionable };
        Ok(vec![Reading { metric: "body-temperature".into(), value: round(c, 2), unit: "Cel".into(), observed_at_ms: ts * 1000, quality }])
    }
}

export!(Plugin);
