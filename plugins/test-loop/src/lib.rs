//! Misbehaving test guest (loop), used to prove the host contains it. Never deploy.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

#[allow(unused_imports)]
use wardgate::plugin::types::Quality;

struct Plugin;

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "test-loop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["test".into()],
            metrics: vec![],
        }
    }

    #[allow(unreachable_code, clippy::never_loop)]
    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let mut n: u64 = message.payload.len() as u64; loop { n = n.wrapping_mul(6364136223846793005).wrapping_add(1); if n == 42 { break; } } Ok(vec![])
    }
}

export!(Plugin);
