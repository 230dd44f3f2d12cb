//! What a plugin may call: `log`, `now-ms`, `device-setting`. Nothing else is linked. Also the
//! state of one store: which device its instance serves (fixed at creation), the call in
//! progress, and limits that count the instance's linear memory.

use super::bindings;
use super::bindings::wardgate::plugin::host::LogLevel;
use super::budget::CallClock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{ResourceLimiter, StoreLimits};

/// Longest log message a plugin may write, in bytes (longer ones are cut).
const MAX_LOG_BYTES: usize = 1024;

/// Per-store state: limits, the device the instance serves, and the call in progress.
pub(super) struct HostState {
    pub(super) limits: Limits,
    /// CPU time the call in progress may spend.
    pub(super) budget: Duration,
    /// When the call in progress began (the epoch callback measures from here).
    pub(super) clock: CallClock,
    plugin: Arc<str>,
    device_id: String,
    settings: Arc<BTreeMap<String, String>>,
}

impl HostState {
    /// State for an instance of `plugin` that serves `device_id` only.
    pub(super) fn new(plugin: Arc<str>, limits: StoreLimits, device_id: &str) -> Self {
        Self {
            limits: Limits {
                inner: limits,
                memory_bytes: 0,
            },
            budget: Duration::ZERO,
            clock: CallClock::start(),
            plugin,
            device_id: device_id.to_owned(),
            settings: Arc::default(),
        }
    }

    /// A call begins now, with `budget` of CPU time and the device's current settings.
    pub(super) fn begin_call(&mut self, budget: Duration, settings: Arc<BTreeMap<String, String>>) {
        self.budget = budget;
        self.settings = settings;
        self.clock = CallClock::start();
    }
}

/// The store's limits, counting the linear memory they let the instance have.
pub(super) struct Limits {
    inner: StoreLimits,
    /// Linear memory of the store's instances, in bytes (initial sizes and growth allowed).
    pub(super) memory_bytes: usize,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allow = self.inner.memory_growing(current, desired, maximum)?;
        if allow {
            self.memory_bytes = self
                .memory_bytes
                .saturating_add(desired.saturating_sub(current));
        }
        Ok(allow)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
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
