//! Misbehaving test guest (alloc), used to prove the host contains it. Never deploy.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

#[allow(unused_imports)]
use wardgate::plugin::types::Quality;

struct Plugin;

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "test-alloc".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["test".into()],
            metrics: vec![],
        }
    }

    #[allow(unreachable_code, clippy::never_loop)]
    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let _ = &message;
        let mut hoard: Vec<Vec<u8>> = Vec::new(); loop { hoard.push(vec![1u8; 1 << 20]); if hoard.len() == usize::MAX { break; } } Ok(vec![Reading { metric: format!("{}", hoard.len()), value: 0.0, unit: "1".into(), observed_at_ms: 0, quality: Quality::Good }])
    }
}

export!(Plugin);
