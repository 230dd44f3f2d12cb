//! The WebAssembly plugin host: one wasmtime engine, one component per device kind, loaded
//! from a drop-in directory and swapped while the gateway runs.
//!
//! Contract: `wit/plugin.wit` (`wardgate:plugin@0.1.0`, world `device-plugin`); the only
//! `bindgen!` is in [`bindings`]. Host functions live in `host`.
//!
//! What must stay true:
//! - a plugin cannot reach anything but the three host functions: no WASI, no files, no
//!   network, no clock of its own;
//! - every call runs under an epoch deadline (`plugins.call_deadline`) and every instance under a
//!   memory cap (`plugins.max_memory_bytes`); a trap (deadline, memory, panic) discards that
//!   instance, never the process; `plugins.max_consecutive_traps` traps in a row mark the plugin
//!   failed (journal ERROR) until a new file replaces it;
//! - whatever a plugin returns is checked (finite values, sane metrics, units and times) before
//!   it becomes a reading; anything a plugin fails or refuses goes to the dead-letter store
//!   with the reason (the pipeline's job) — never silently dropped;
//! - a new or replaced `.wasm` is validated, compiled and test-called (`describe`) before it
//!   replaces the old one in one pointer swap; a broken file is rejected and the previous
//!   version keeps serving. Readings handled after the swap use the new version.
//!
//! Instances are pooled per plugin and reused (a fresh instance costs ~20 µs, a call well under
//! 2 µs). Compiled components are cached in `<state_dir>/plugin-cache/<engine hash>/` keyed by the
//! file's SHA-256, so a restart does not recompile.

pub mod bindings;
mod host;

use crate::config::PluginsConfig;
use bindings::wardgate::plugin::types::{NormalizeError, Quality};
use bindings::{DevicePlugin, DevicePluginPre};
use host::HostState;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, StoreLimitsBuilder};

/// Epoch tick: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Most readings one message may produce.
const MAX_READINGS_PER_MESSAGE: usize = 64;
/// Instances kept per plugin for reuse.
const POOL_SIZE: usize = 4;

/// Why a plugin file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("plugin file {}: {problem}", path.display())]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

/// Why a message did not become readings. Every variant ends in the dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No plugin of that name is loaded.
    NoPlugin(String),
    /// The plugin is marked failed after repeated traps.
    PluginFailed(String),
    /// The call trapped (deadline, memory cap, panic); the instance was discarded.
    Trap(String),
    /// The plugin refused the message (its own typed error).
    Rejected {
        /// `malformed`, `out-of-range` or `unsupported`.
        kind: &'static str,
        /// The plugin's explanation.
        message: String,
    },
    /// The plugin returned something that is not a valid reading.
    InvalidOutput(String),
}

impl Failure {
    /// Short class for counters and the journal.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::NoPlugin(_) => "no-plugin",
            Failure::PluginFailed(_) => "plugin-failed",
            Failure::Trap(_) => "trap",
            Failure::Rejected { kind, .. } => kind,
            Failure::InvalidOutput(_) => "invalid-output",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoPlugin(p) => write!(f, "no plugin `{p}` is loaded"),
            Failure::PluginFailed(p) => write!(f, "plugin `{p}` is marked failed"),
            Failure::Trap(e) => write!(f, "plugin trapped: {e}"),
            Failure::Rejected { kind, message } => write!(f, "{kind}: {message}"),
            Failure::InvalidOutput(e) => write!(f, "invalid plugin output: {e}"),
        }
    }
}

/// One canonical reading, as published and queued.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    /// What was measured.
    pub metric: String,
    /// The value.
    pub value: f64,
    /// UCUM unit.
    pub unit: String,
    /// Device time, ms since the UNIX epoch.
    pub observed_at_ms: i64,
    /// `good` or `questionable`.
    pub quality: &'static str,
}

/// A message turned into readings, and by what.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// The readings.
    pub readings: Vec<Reading>,
    /// Plugin name.
    pub plugin: Arc<str>,
    /// Plugin version (from `describe`).
    pub version: Arc<str>,
}

/// The input of one call.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Authenticated device id.
    pub device_id: &'a str,
    /// Device kind.
    pub kind: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Raw payload.
    pub payload: &'a [u8],
    /// Gateway receive time, ms since the UNIX epoch.
    pub received_at_ms: i64,
    /// The device's settings.
    pub settings: &'a Arc<BTreeMap<String, String>>,
}

struct Instance {
    store: Store<HostState>,
    plugin: DevicePlugin,
}

/// One loaded plugin version.
pub struct Plugin {
    name: Arc<str>,
    version: Arc<str>,
    digest: String,
    pre: DevicePluginPre<HostState>,
    pool: Mutex<Vec<Instance>>,
    consecutive_traps: AtomicU32,
    failed: AtomicBool,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("digest", &self.digest)
            .finish()
    }
}

impl Plugin {
    /// Its name (the file name without `.wasm`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its version, as it describes itself.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// SHA-256 of its file, hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Whether it is marked failed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Status of one loaded plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PluginStatus {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// SHA-256 of the file.
    pub digest: String,
    /// Marked failed.
    pub failed: bool,
}

/// The plugin host.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    cfg: PluginsConfig,
    cache_dir: Option<PathBuf>,
    plugins: RwLock<HashMap<String, Arc<Plugin>>>,
    /// (modified, length) of every file seen, loaded or rejected.
    seen: Mutex<HashMap<PathBuf, (SystemTime, u64)>>,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("dir", &self.cfg.dir)
            .field("plugins", &self.status())
            .finish()
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl PluginHost {
    /// A host with no plugins loaded yet. `state_dir` holds the compiled-component cache
    /// (`None`: no cache).
    pub fn new(cfg: &PluginsConfig, state_dir: Option<&Path>) -> anyhow::Result<Arc<Self>> {
        let mut wc = wasmtime::Config::new();
        wc.epoch_interruption(true);
        wc.wasm_component_model(true);
        let engine = Engine::new(&wc)
            .map_err(|e| anyhow::anyhow!("cannot start the plugin engine: {e:#}"))?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link the plugin host functions: {e:#}"))?;
        let cache_dir = state_dir.map(|d| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            d.join("plugin-cache").join(format!("{:016x}", h.finish()))
        });
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("wardgate-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?;
        }
        Ok(Arc::new(Self {
            engine,
            linker,
            cfg: cfg.clone(),
            cache_dir,
            plugins: RwLock::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            ticker_stop,
        }))
    }

    fn deadline_ticks(&self) -> u64 {
        (self.cfg.call_deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }

    fn new_store(&self, plugin: &Arc<str>) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.cfg.max_memory_bytes)
            .instances(4)
            .tables(16)
            .memories(2)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&self.engine, HostState::new(plugin.clone(), limits));
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store
    }

    /// Compile (or load from cache) a component from `bytes`.
    fn compile(&self, path: &Path, bytes: &[u8], digest: &str) -> Result<Component, LoadError> {
        let err = |problem: String| LoadError {
            path: path.to_path_buf(),
            problem,
        };
        if let Some(dir) = &self.cache_dir {
            let cached = dir.join(format!("{digest}.cwasm"));
            // Read into memory instead of mapping the file: a mapped file that somebody
            // truncates under a running gateway would crash it (SIGBUS).
            if let Ok(compiled) = std::fs::read(&cached) {
                // SAFETY: files in the cache directory are written only by this function (temp
                // file + rename), from components wasmtime itself compiled and serialised with an
                // engine of the same compatibility hash (the directory name); the state
                // directory is private to the service user. wasmtime checks the header and
                // version and refuses anything it did not write.
                #[allow(unsafe_code)]
                let c = unsafe { Component::deserialize(&self.engine, &compiled) };
                match c {
                    Ok(c) => return Ok(c),
                    Err(e) => log::warn!(
                        path:% = cached.display(), error:% = e;
                        "unusable compiled plugin in the cache; recompiling"
                    ),
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| err(format!("not a valid WebAssembly component: {e:#}")))?;
        if let Some(dir) = &self.cache_dir {
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(dir)?;
                let data = component.serialize().map_err(std::io::Error::other)?;
                let tmp = dir.join(format!(".{digest}.tmp"));
                std::fs::write(&tmp, data)?;
                std::fs::rename(&tmp, dir.join(format!("{digest}.cwasm")))
            };
            if let Err(e) = write() {
                log::warn!(error:% = e; "cannot cache the compiled plugin; it will be compiled again at next start");
            }
        }
        Ok(component)
    }

    /// Validate, compile and test-call the plugin in `path`, then make it the one serving its
    /// name. On error nothing changes.
    pub fn load_file(&self, path: &Path) -> Result<Arc<Plugin>, LoadError> {
        let err = |problem: String| LoadError {
            path: path.to_path_buf(),
            problem,
        };
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| crate::config::valid_kind_name(s))
            .ok_or_else(|| err("file name must be <plugin-name>.wasm with a name of lowercase letters, digits, `_`, `-`".into()))?
            .to_owned();
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let digest = sha256_hex(&bytes);
        let component = self.compile(path, &bytes, &digest)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| err(format!("imports something the host does not offer (only wardgate:plugin/host@0.1.0 exists): {e:#}")))?;
        let pre = DevicePluginPre::new(pre).map_err(|e| {
            err(format!(
                "does not export the `device-plugin` world of wardgate:plugin@0.1.0: {e:#}"
            ))
        })?;
        let name: Arc<str> = name.into();
        let mut store = self.new_store(&name);
        store.set_epoch_deadline(self.deadline_ticks() * 10);
        let plugin = pre
            .instantiate(&mut store)
            .map_err(|e| err(format!("cannot be instantiated: {e:#}")))?;
        let info = plugin
            .call_describe(&mut store)
            .map_err(|e| err(format!("`describe` trapped: {e:#}")))?;
        if info.name != *name {
            log::warn!(
                plugin:% = name, described_as:% = info.name;
                "plugin file name and its own name differ; the file name is used"
            );
        }
        let loaded = Arc::new(Plugin {
            name: name.clone(),
            version: info.version.as_str().into(),
            digest,
            pre,
            pool: Mutex::new(vec![Instance { store, plugin }]),
            consecutive_traps: AtomicU32::new(0),
            failed: AtomicBool::new(false),
        });
        let previous = self
            .plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), loaded.clone());
        log::info!(
            plugin:% = name, version:% = info.version, digest:% = &loaded.digest[..16],
            kinds:? = info.device_kinds,
            replaced:% = previous.as_ref().map(|p| p.version.to_string()).unwrap_or_default();
            "plugin {} {}", if previous.is_some() { "replaced" } else { "loaded" }, name
        );
        Ok(loaded)
    }

    /// Look at the plugin directory once: load new and changed files, drop removed ones.
    pub fn scan(&self) {
        let dir = &self.cfg.dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                log::warn!(path:% = dir.display(), error:% = e; "cannot read the plugin directory (plugins.dir)");
                return;
            }
        };
        let mut present = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "wasm") {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            present.push(path.clone());
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            let changed = self
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(path.clone(), stamp)
                != Some(stamp);
            if !changed {
                continue;
            }
            if let Err(e) = self.load_file(&path) {
                let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
                let keeps = self.get(name).map(|p| p.version.to_string());
                log::error!(
                    plugin = name, path:% = path.display(), error:% = e.problem;
                    "plugin file rejected: {}; {}", e.problem,
                    match &keeps {
                        Some(v) => format!("version {v} keeps serving"),
                        None => "no version of this plugin is loaded".into(),
                    }
                );
            }
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<PathBuf> = seen
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            seen.remove(&path);
            if let Some(name) = path.file_stem().and_then(|s| s.to_str()) {
                if self
                    .plugins
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name)
                    .is_some()
                {
                    log::warn!(plugin = name, path:% = path.display(); "plugin file removed: plugin unloaded; its devices' messages go to the dead-letter store");
                }
            }
        }
    }

    /// Scan every `plugins.poll_interval` until `stop`, beating `beat` between scans (a scan
    /// that hangs stops the beat; see [`crate::supervisor`]).
    pub async fn watch(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
        beat: crate::supervisor::Heartbeat,
    ) {
        let mut tick = tokio::time::interval(self.cfg.poll_interval);
        tick.tick().await;
        let mut idle = crate::supervisor::Heartbeat::ticker();
        loop {
            beat.beat();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = idle.tick() => {}
                _ = tick.tick() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.scan()).await;
                }
            }
        }
    }

    /// The plugin currently serving `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every loaded plugin.
    pub fn status(&self) -> Vec<PluginStatus> {
        let mut v: Vec<PluginStatus> = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| PluginStatus {
                name: p.name.to_string(),
                version: p.version.to_string(),
                digest: p.digest.clone(),
                failed: p.is_failed(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Run `plugin` on one message.
    pub fn normalize(&self, plugin: &str, input: Input<'_>) -> Result<Normalized, Failure> {
        let p = self
            .get(plugin)
            .ok_or_else(|| Failure::NoPlugin(plugin.to_owned()))?;
        if p.is_failed() {
            return Err(Failure::PluginFailed(plugin.to_owned()));
        }
        let pooled = p.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut inst = match pooled {
            Some(i) => i,
            None => {
                let mut store = self.new_store(&p.name);
                store.set_epoch_deadline(self.deadline_ticks());
                let plugin = p
                    .pre
                    .instantiate(&mut store)
                    .map_err(|e| Failure::Trap(format!("instantiation failed: {e:#}")))?;
                Instance { store, plugin }
            }
        };
        inst.store
            .data_mut()
            .set_call(input.device_id, input.settings.clone());
        inst.store.set_epoch_deadline(self.deadline_ticks());
        let msg = bindings::wardgate::plugin::types::RawMessage {
            device_id: input.device_id.to_owned(),
            kind: input.kind.to_owned(),
            topic: input.topic.to_owned(),
            payload: input.payload.to_vec(),
            received_at_ms: input.received_at_ms,
        };
        let result = inst.plugin.call_normalize(&mut inst.store, &msg);
        match result {
            Err(trap) => {
                // The instance is poisoned: drop it; the next call instantiates afresh.
                let n = p.consecutive_traps.fetch_add(1, Ordering::Relaxed) + 1;
                let reason = trap_reason(&trap);
                if n >= self.cfg.max_consecutive_traps && !p.failed.swap(true, Ordering::Relaxed) {
                    log::error!(
                        plugin:% = p.name, device_id = input.device_id, traps = n, error:% = reason;
                        "plugin marked failed after {n} traps in a row; its devices' messages go to the dead-letter store until a new version is dropped in"
                    );
                } else {
                    log::warn!(plugin:% = p.name, device_id = input.device_id, error:% = reason; "plugin trapped; instance discarded");
                }
                Err(Failure::Trap(reason))
            }
            Ok(out) => {
                p.consecutive_traps.store(0, Ordering::Relaxed);
                let mut pool = p.pool.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < POOL_SIZE {
                    pool.push(inst);
                }
                drop(pool);
                match out {
                    Ok(readings) => Ok(Normalized {
                        readings: check_readings(readings, input.received_at_ms)?,
                        plugin: p.name.clone(),
                        version: p.version.clone(),
                    }),
                    Err(e) => Err(match e {
                        NormalizeError::Malformed(m) => Failure::Rejected {
                            kind: "malformed",
                            message: m,
                        },
                        NormalizeError::OutOfRange(m) => Failure::Rejected {
                            kind: "out-of-range",
                            message: m,
                        },
                        NormalizeError::Unsupported(m) => Failure::Rejected {
                            kind: "unsupported",
                            message: m,
                        },
                    }),
                }
            }
        }
    }
}

fn trap_reason(e: &wasmtime::Error) -> String {
    if let Some(t) = e.downcast_ref::<wasmtime::Trap>() {
        return match t {
            wasmtime::Trap::Interrupt => "call deadline exceeded (plugins.call_deadline)".into(),
            wasmtime::Trap::UnreachableCodeReached => {
                "plugin panicked or aborted (unreachable)".into()
            }
            other => format!("{other}"),
        };
    }
    let text = format!("{e:#}");
    if text.contains("memory") || text.contains("grow") {
        format!("memory cap exceeded (plugins.max_memory_bytes): {text}")
    } else {
        text
    }
}

/// Plausibility of plugin output; anything else is the plugin's fault.
fn check_readings(
    raw: Vec<bindings::wardgate::plugin::types::Reading>,
    received_at_ms: i64,
) -> Result<Vec<Reading>, Failure> {
    if raw.len() > MAX_READINGS_PER_MESSAGE {
        return Err(Failure::InvalidOutput(format!(
            "{} readings from one message (at most {MAX_READINGS_PER_MESSAGE})",
            raw.len()
        )));
    }
    // 2000-01-01 .. one day after receipt: anything else is a broken clock or a broken plugin.
    let earliest = 946_684_800_000;
    let latest = received_at_ms + 86_400_000;
    raw.into_iter()
        .map(|r| {
            let ok_name =
                |s: &str| !s.is_empty() && s.len() <= 64 && !s.chars().any(|c| c.is_control());
            if !ok_name(&r.metric) {
                return Err(Failure::InvalidOutput(format!(
                    "metric name `{}`",
                    r.metric
                )));
            }
            if !ok_name(&r.unit) {
                return Err(Failure::InvalidOutput(format!(
                    "unit `{}` of {}",
                    r.unit, r.metric
                )));
            }
            if !r.value.is_finite() {
                return Err(Failure::InvalidOutput(format!(
                    "{} is {}",
                    r.metric, r.value
                )));
            }
            if r.observed_at_ms < earliest || r.observed_at_ms > latest {
                return Err(Failure::InvalidOutput(format!(
                    "{} observed at {} ms, outside 2000-01-01 .. receipt + 1 day",
                    r.metric, r.observed_at_ms
                )));
            }
            Ok(Reading {
                metric: r.metric,
                value: r.value,
                unit: r.unit,
                observed_at_ms: r.observed_at_ms,
                quality: match r.quality {
                    Quality::Good => "good",
                    Quality::Questionable => "questionable",
                },
            })
        })
        .collect()
}
