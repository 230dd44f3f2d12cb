//! What a plugin may call: `log`, `now-ms`, `device-setting`. Nothing else is linked.

use super::bindings;
use super::bindings::wardgate::plugin::host::LogLevel;
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::StoreLimits;

/// Longest log message a plugin may write, in bytes (longer ones are cut).
const MAX_LOG_BYTES: usize = 1024;

/// Per-store state: limits and the call in progress.
pub(super) struct HostState {
    pub(super) limits: StoreLimits,
    plugin: Arc<str>,
    device_id: String,
    settings: Arc<BTreeMap<String, String>>,
}

impl HostState {
    pub(super) fn new(plugin: Arc<str>, limits: StoreLimits) -> Self {
        Self {
            limits,
            plugin,
            device_id: String::new(),
            settings: Arc::default(),
        }
    }

    pub(super) fn set_call(&mut self, device_id: &str, settings: Arc<BTreeMap<String, String>>) {
        device_id.clone_into(&mut self.device_id);
        self.settings = settings;
    }
}

impl bindings::wardgate::plugin::types::Host for HostState {}

impl bindings::wardgate::plugin::host::Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        let mut message = message;
        if message.len() > MAX_LOG_BYTES {
            let mut cut = MAX_LOG_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let level = match level {
            LogLevel::Trace => log::Level::Trace,
            LogLevel::Debug => log::Level::Debug,
            LogLevel::Info => log::Level::Info,
            LogLevel::Warn => log::Level::Warn,
            // A plugin cannot claim that an operator must act: its errors are warnings.
            LogLevel::Error => log::Level::Warn,
        };
        log::log!(
            target: "wardgate::plugin",
            level,
            plugin:% = self.plugin, device_id:% = self.device_id;
            "{message}"
        );
    }

    fn now_ms(&mut self) -> i64 {
        crate::clock::now_ms()
    }

    fn device_setting(&mut self, key: String) -> Option<String> {
        self.settings.get(&key).cloned()
    }
}

pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    bindings::DevicePlugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
}
