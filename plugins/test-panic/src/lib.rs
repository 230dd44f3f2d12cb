//! Misbehaving test guest (panic), used to prove the host contains it. Never deploy.

wit_bindgen::generate!({ path: "../../wit", world: "device-plugin" });

#[allow(unused_imports)]
use wardgate::plugin::types::Quality;

struct Plugin;

impl Guest for Plugin {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "test-panic".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            device_kinds: vec!["test".into()],
            metrics: vec![],
        }
    }

    #[allow(unreachable_code, clippy::never_loop)]
    fn normalize(message: RawMessage) -> Result<Vec<Reading>, NormalizeError> {
        let v: Vec<u8> = message.payload; if v.len() < 1_000_000 { panic!("test guest panics on purpose") } Ok(vec![])
    }
}

export!(Plugin);
