//! Misbehaving test guest (nonsense), used to prove the host contains it. Never deploy.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

#[allow(unused_imports)]
use wardgate::plugin::types::Quality;

struct Plugin;

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "test-nonsense".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["test".into()],
            metrics: vec![],
        }
    }

    #[allow(unreachable_code, clippy::never_loop)]
    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let _ = message; Ok(vec![Reading { metric: String::new(), value: f64::NAN, unit: String::new(), observed_at_ms: -5, quality: Quality::Good }])
    }
}

export!(Plugin);
