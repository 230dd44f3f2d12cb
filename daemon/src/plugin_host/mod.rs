//! The WebAssembly plugin host: one wasmtime engine, one component per device kind, loaded
//! from a drop-in directory and swapped while the gateway runs.
//!
//! Contract: `wit/plugin.wit` (`wardgate:plugin@0.1.0`, world `device-plugin`); the only
//! `bindgen!` is in [`bindings`]. Host functions live in `host`.
//!
//! What must stay true:
//! - a plugin cannot reach anything but the three host functions: no WASI, no files, no
//!   network, no clock of its own;
//! - **an instance serves one device only.** Each device's messages run on an instance made
//!   for it (a store of its own), kept between its calls (see `instances`) and never handed to
//!   another device. So what a plugin keeps in its memory (a static, a cache, a leftover
//!   buffer) can reach later messages of the same device, never another device's — another
//!   patient's — call. A trap, a new plugin version, or memory pressure among kept instances
//!   (least recently used first, [`KEPT_MEMORY_BYTES`] per plugin) drops a device's instance;
//!   its next message gets a fresh one. Chosen over a fresh instance per call by measurement
//!   (`cargo xtask bench`): a call on a kept instance costs a few µs, one on a fresh instance
//!   tens of µs (instantiation plus the page faults of a new memory), an order of magnitude
//!   more for every reading, for a guarantee — no state between two messages of the same
//!   device — that the device's own reading stream does not need;
//! - every call runs under a CPU-time budget (`plugins.call_deadline` per 32 KiB of payload,
//!   see `budget`), capped in wall time at [`wall_cap`] (the longer of 20 × that and 1 s), and
//!   under a memory cap (`plugins.max_memory_bytes`). A trap (CPU budget, memory, panic) ends
//!   that call and drops that instance, never the process;
//! - **a trap is charged to the device whose message caused it** (exact: its instance has
//!   seen that device's messages and no other's): `plugins.max_consecutive_traps` traps in a
//!   row contain that device for that plugin (journal WARN; its messages go to the dead-letter
//!   store as `device-contained` without calling the plugin; shown by `wardgate status`; see
//!   `containment`). No device's traps ever stop the
//!   plugin for another device. A stop by the wall-clock cap (the machine was too busy) and a
//!   failure to make an instance are charged to no one. Containment ends with a new version of
//!   the plugin or with [`PluginHost::clear_containment`] (reload: SIGHUP, `wardgate reload`).
//!   [`MANY_CONTAINED`] devices contained for one plugin raise one journal ERROR (the plugin
//!   itself is suspect) and stop nothing;
//! - whatever a plugin returns is checked (finite values, sane metrics, units and times) before
//!   it becomes a reading; anything a plugin fails or refuses goes to the dead-letter store
//!   with the reason (the pipeline's job) — never silently dropped;
//! - a new or replaced `.wasm` is validated, compiled and test-called (`describe`) before it
//!   replaces the old one in one pointer swap; a broken file is rejected and the previous
//!   version keeps serving. Readings handled after the swap use the new version.
//!
//! Compiled components are cached in `<state_dir>/plugin-cache/<engine hash>/` keyed by the
//! file's SHA-256, so a restart does not recompile.

pub mod bindings;
mod budget;
mod containment;
mod host;
mod instances;
mod stats;

pub use budget::{call_budget, wall_cap, BUDGET_BYTES, WALL_CAP_FACTOR, WALL_CAP_FLOOR};
pub use containment::ContainedDevice;
pub use stats::{CallCounts, CallStats, Histogram, FAILURE_KINDS, LATENCY_BOUNDS_S};

use crate::config::PluginsConfig;
use bindings::wardgate::plugin::types::{NormalizeError, Quality};
use bindings::{DevicePlugin, DevicePluginPre};
use budget::{Stopped, Verdict};
use containment::{Charged, Ledger};
use host::HostState;
use instances::Kept;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, StoreLimitsBuilder, UpdateDeadline};

/// Epoch tick: how often a running call's budget is looked at, at the earliest.
const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Most readings one message may produce.
const MAX_READINGS_PER_MESSAGE: usize = 64;
/// Linear memory of the instances one plugin keeps for its devices between calls (see
/// `instances`): 64 MiB is ~50 devices' instances of the ward's plugins (~1.1 MiB each, most of
/// it the untouched stack reservation, so far less is resident). Beyond it the least recently
/// used are dropped and re-made on their device's next message.
pub const KEPT_MEMORY_BYTES: usize = 64 << 20;
/// Core module instances, memories and tables one store may have. Components made by
/// `wit-component` from one Rust module need fewer.
const CORE_INSTANCES_PER_STORE: usize = 4;
const MEMORIES_PER_STORE: usize = 2;
const TABLES_PER_STORE: usize = 16;
/// This many devices contained for one plugin at once means the plugin, not the devices, is
/// likely at fault: one journal ERROR (calls for other devices go on).
pub const MANY_CONTAINED: usize = 3;

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
    /// The sending device is contained for this plugin after repeated traps; the plugin was not
    /// called.
    Contained {
        /// The plugin.
        plugin: String,
        /// Traps in a row that contained the device.
        traps: u32,
        /// Why the last of them trapped.
        reason: String,
    },
    /// The call trapped (CPU budget, memory cap, panic); charged to the sending device.
    Trap(String),
    /// The wall-clock cap stopped the call before it spent its CPU budget: the gateway was
    /// overloaded. Charged to no device.
    Overloaded(String),
    /// The host could not make an instance for the call. Charged to no device.
    Host(String),
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
            Failure::Contained { .. } => "device-contained",
            Failure::Trap(_) => "trap",
            Failure::Overloaded(_) => "overloaded",
            Failure::Host(_) => "host-error",
            Failure::Rejected { kind, .. } => kind,
            Failure::InvalidOutput(_) => "invalid-output",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoPlugin(p) => write!(f, "no plugin `{p}` is loaded"),
            Failure::Contained { plugin, traps, reason } => write!(
                f,
                "device contained for plugin `{plugin}` after {traps} traps in a row (last: {reason}); \
                 the plugin is not called for it until a new version is loaded or the configuration is reloaded (`wardgate reload`)"
            ),
            Failure::Trap(e) => write!(f, "plugin trapped: {e}"),
            Failure::Overloaded(e) => write!(f, "plugin call stopped: {e}"),
            Failure::Host(e) => write!(f, "plugin not called: {e}"),
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

/// An instance and the store it lives in, made for one device.
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
    /// Instances kept between calls, by device.
    kept: Mutex<Kept<Instance>>,
    /// Trap counts and containment of this version's devices.
    ledger: Ledger,
    /// Calls of this plugin name (shared by its versions).
    stats: Arc<CallStats>,
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

    /// The devices contained for it, sorted by id.
    pub fn contained(&self) -> Vec<ContainedDevice> {
        self.ledger.contained()
    }

    /// Instances kept for devices between calls, and their linear memory in bytes.
    pub fn kept_instances(&self) -> (usize, usize) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).usage()
    }
}

/// Status of one loaded plugin.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct PluginStatus {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// SHA-256 of the file.
    pub digest: String,
    /// Devices contained for it (their messages go to the dead-letter store).
    #[serde(default)]
    pub contained: Vec<ContainedDevice>,
    /// Its calls since start (all versions of this name).
    #[serde(default)]
    pub calls: CallCounts,
}

/// The engine configuration: the gateway's engine and the ones that compile (see
/// `PluginHost::compile`) must use the same, or the gateway's cannot load what they compiled.
fn engine_config() -> wasmtime::Config {
    let mut wc = wasmtime::Config::new();
    wc.epoch_interruption(true);
    wc.wasm_component_model(true);
    wc
}

/// The plugin host.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    cfg: PluginsConfig,
    /// `plugins.call_deadline` (in microseconds) and `plugins.max_consecutive_traps` as the
    /// last reload set them; read on every call, so atomics rather than a lock.
    call_deadline_us: AtomicU64,
    max_consecutive_traps: AtomicU32,
    cache_dir: Option<PathBuf>,
    plugins: RwLock<HashMap<String, Arc<Plugin>>>,
    /// (modified, length) of every file seen, loaded or rejected.
    seen: Mutex<HashMap<PathBuf, (SystemTime, u64)>>,
    ticker_stop: Arc<AtomicBool>,
    /// Messages a plugin failed or refused since start (any [`Failure`]).
    failures: std::sync::atomic::AtomicU64,
    /// Call counters by plugin name, kept across versions.
    stats: Mutex<HashMap<String, Arc<CallStats>>>,
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

impl PluginHost {
    fn call_deadline(&self) -> Duration {
        Duration::from_micros(self.call_deadline_us.load(Ordering::Relaxed))
    }

    /// Apply a reloaded `[plugins]`: the call deadline and the trap count that contains a
    /// device take effect from the next call. The directory, its poll interval and the memory
    /// cap are fixed at start (the engine's instance pool is sized by the cap); the caller
    /// reports a change to them as needing a restart.
    pub fn reconfigure(&self, cfg: &PluginsConfig) {
        self.call_deadline_us
            .store(micros(cfg.call_deadline), Ordering::Relaxed);
        self.max_consecutive_traps
            .store(cfg.max_consecutive_traps, Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
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
        let engine = Engine::new(&engine_config())
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
            call_deadline_us: AtomicU64::new(micros(cfg.call_deadline)),
            max_consecutive_traps: AtomicU32::new(cfg.max_consecutive_traps),
            cache_dir,
            plugins: RwLock::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            ticker_stop,
            failures: Default::default(),
            stats: Mutex::default(),
        }))
    }

    /// A new instance of `p` for `device_id`.
    fn instantiate(&self, p: &Plugin, device_id: &str) -> wasmtime::Result<Instance> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.cfg.max_memory_bytes)
            .instances(CORE_INSTANCES_PER_STORE)
            .tables(TABLES_PER_STORE)
            .memories(MEMORIES_PER_STORE)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState::new(p.name.clone(), limits, device_id),
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|ctx| {
            let s = ctx.data();
            let (cpu, wall) = s.clock.used();
            match budget::verdict(s.budget, cpu, wall, EPOCH_TICK) {
                Verdict::Continue(ticks) => Ok(UpdateDeadline::Continue(ticks)),
                Verdict::CpuSpent => Err(wasmtime::Error::new(Stopped::CpuSpent {
                    cpu,
                    wall,
                    budget: s.budget,
                })),
                Verdict::WallCap => Err(wasmtime::Error::new(Stopped::WallCap { cpu, wall })),
            }
        });
        // Instantiation runs under the budget of a small call.
        Self::begin_call(&mut store, self.call_deadline(), Arc::default());
        let plugin = p.pre.instantiate(&mut store)?;
        Ok(Instance { store, plugin })
    }

    /// Start the clock of a call with `budget` of CPU time.
    fn begin_call(
        store: &mut Store<HostState>,
        budget: Duration,
        settings: Arc<BTreeMap<String, String>>,
    ) {
        store.data_mut().begin_call(budget, settings);
        store.set_epoch_deadline(budget::ticks(budget, EPOCH_TICK));
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
        // Compiled by an engine of its own, dropped once the component is compiled: an engine
        // keeps its compiler's working memory (cranelift and register-allocator contexts,
        // ~2 MiB after the three ward plugins) for its whole life, and the gateway's engine
        // lives as long as the gateway. The same configuration makes the two engines
        // compatible, so the gateway's engine loads the result as it loads the cache.
        let compiled = Engine::new(&engine_config())
            .map_err(|e| err(format!("cannot start the plugin compiler: {e:#}")))?
            .precompile_component(bytes)
            .map_err(|e| err(format!("not a valid WebAssembly component: {e:#}")))?;
        // SAFETY: `compiled` was made just now, in this process, by wasmtime from `bytes`, with
        // an engine of the same configuration as `self.engine`; wasmtime checks its header,
        // version and compatibility anyway.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(&self.engine, &compiled) }
            .map_err(|e| err(format!("cannot load the compiled component: {e:#}")))?;
        if let Some(dir) = &self.cache_dir {
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(dir)?;
                let tmp = dir.join(format!(".{digest}.tmp"));
                std::fs::write(&tmp, &compiled)?;
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
        let mut loaded = Plugin {
            name: name.clone(),
            version: "".into(),
            digest,
            pre,
            kept: Mutex::new(Kept::new(KEPT_MEMORY_BYTES)),
            ledger: Ledger::default(),
            stats: self.stats_for(&name),
        };
        // A test call on an instance of its own (made for no device, then dropped).
        let mut probe = self
            .instantiate(&loaded, "")
            .map_err(|e| err(format!("cannot be instantiated: {e:#}")))?;
        Self::begin_call(
            &mut probe.store,
            self.call_deadline().saturating_mul(10),
            Arc::default(),
        );
        let info = probe
            .plugin
            .call_describe(&mut probe.store)
            .map_err(|e| err(format!("`describe` trapped: {e:#}")))?;
        drop(probe);
        if info.name != *name {
            log::warn!(
                plugin:% = name, described_as:% = info.name;
                "plugin file name and its own name differ; the file name is used"
            );
        }
        loaded.version = info.version.as_str().into();
        let loaded = Arc::new(loaded);
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
        if let Some(old) = previous {
            let lifted = old.ledger.clear();
            if !lifted.is_empty() {
                log::info!(
                    plugin:% = name, version:% = info.version, devices:% = lifted.join(","),
                    count = lifted.len();
                    "containment lifted by the new version of plugin {name} for {} device(s): {}; their next messages are normalised again",
                    lifted.len(), lifted.join(", ")
                );
            }
        }
        Ok(loaded)
    }

    /// The plugin files in force: `<name>.wasm` from the drop-in directory (`plugins.dir`)
    /// first, then from the shipped directory (`plugins.shipped_dir`) for names the drop-in
    /// directory does not have. Sorted by name.
    fn candidates(&self) -> Vec<(PathBuf, std::fs::Metadata)> {
        let mut chosen: std::collections::BTreeMap<String, (PathBuf, std::fs::Metadata)> =
            Default::default();
        let dirs = [
            (&self.cfg.dir, "plugins.dir"),
            (&self.cfg.shipped_dir, "plugins.shipped_dir"),
        ];
        for (dir, key) in dirs {
            if dir.as_os_str().is_empty() {
                continue;
            }
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                // The shipped directory exists only where the package is installed.
                Err(e)
                    if key == "plugins.shipped_dir" && e.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(e) => {
                    log::warn!(path:% = dir.display(), error:% = e, key = key; "cannot read the plugin directory ({key})");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|x| x != "wasm") {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                chosen.entry(name.to_owned()).or_insert((path, meta));
            }
        }
        chosen.into_values().collect()
    }

    /// Look at the plugin directories once: load new and changed files, drop removed ones. A
    /// plugin in the drop-in directory (`plugins.dir`) overrides the shipped one of the same
    /// name (`plugins.shipped_dir`); removing the drop-in file brings the shipped one back.
    pub fn scan(&self) {
        let mut present = Vec::new();
        for (path, meta) in self.candidates() {
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
        let names: std::collections::HashSet<&std::ffi::OsStr> =
            present.iter().filter_map(|p| p.file_stem()).collect();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<PathBuf> = seen
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            seen.remove(&path);
            // Still served from the other directory (a drop-in over a shipped plugin).
            if path.file_stem().is_some_and(|n| names.contains(n)) {
                continue;
            }
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
                contained: p.ledger.contained(),
                calls: p.stats.snapshot(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Lift every device's containment, for every plugin (reload), and start every trap
    /// count over. One journal INFO per plugin that had contained devices. Returns how many
    /// devices were released.
    pub fn clear_containment(&self) -> usize {
        let plugins: Vec<Arc<Plugin>> = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut released = 0;
        for p in plugins {
            let lifted = p.ledger.clear();
            if !lifted.is_empty() {
                log::info!(
                    plugin:% = p.name, devices:% = lifted.join(","), count = lifted.len();
                    "containment lifted by reload for {} device(s) of plugin {}: {}; their next messages are normalised again",
                    lifted.len(), p.name, lifted.join(", ")
                );
                released += lifted.len();
            }
        }
        released
    }

    /// The call counters of plugin `name`, made on first use.
    fn stats_for(&self, name: &str) -> Arc<CallStats> {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Messages a plugin failed or refused since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run `plugin` on one message, on the instance of the message's device.
    pub fn normalize(&self, plugin: &str, input: Input<'_>) -> Result<Normalized, Failure> {
        let r = self.normalize_counted(plugin, input);
        if r.is_err() {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn normalize_counted(&self, plugin: &str, input: Input<'_>) -> Result<Normalized, Failure> {
        let p = self
            .get(plugin)
            .ok_or_else(|| Failure::NoPlugin(plugin.to_owned()))?;
        if let Some((traps, reason)) = p.ledger.containment(input.device_id) {
            p.stats.refused("device-contained");
            return Err(Failure::Contained {
                plugin: p.name.to_string(),
                traps,
                reason,
            });
        }
        let kept = p
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(input.device_id);
        let mut inst = match kept {
            Some(i) => i,
            None => self.instantiate(&p, input.device_id).map_err(|e| {
                p.stats.refused("host-error");
                log::warn!(plugin:% = p.name, device_id = input.device_id, error:% = format!("{e:#}"); "cannot make a plugin instance; message not normalised");
                Failure::Host(format!("cannot make an instance of the plugin: {e:#}"))
            })?,
        };
        let msg = bindings::wardgate::plugin::types::RawMessage {
            device_id: input.device_id.to_owned(),
            kind: input.kind.to_owned(),
            topic: input.topic.to_owned(),
            payload: input.payload.to_vec(),
            received_at_ms: input.received_at_ms,
        };
        Self::begin_call(
            &mut inst.store,
            budget::call_budget(self.call_deadline(), input.payload.len()),
            input.settings.clone(),
        );
        let started = std::time::Instant::now();
        let called = inst.plugin.call_normalize(&mut inst.store, &msg);
        let took = started.elapsed();
        let out = match called {
            Ok(out) => out,
            // The instance is poisoned: it is dropped here, the next call makes a new one.
            Err(e) => {
                let failure = self.trapped(&p, input.device_id, &e);
                p.stats.ran(took, Some(failure.kind()));
                return Err(failure);
            }
        };
        let bytes = inst.store.data().limits.memory_bytes;
        p.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(input.device_id, inst, bytes);
        p.ledger.completed(input.device_id);
        let result = match out {
            Ok(readings) => {
                check_readings(readings, input.received_at_ms).map(|readings| Normalized {
                    readings,
                    plugin: p.name.clone(),
                    version: p.version.clone(),
                })
            }
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
        };
        p.stats.ran(took, result.as_ref().err().map(Failure::kind));
        result
    }

    /// A call for `device` ended in `e`: charge it (or not) and say what it was.
    fn trapped(&self, p: &Plugin, device: &str, e: &wasmtime::Error) -> Failure {
        let reason = trap_reason(e);
        if matches!(e.downcast_ref::<Stopped>(), Some(Stopped::WallCap { .. })) {
            return Failure::Overloaded(reason);
        }
        match p.ledger.trapped(
            device,
            &reason,
            self.max_consecutive_traps.load(Ordering::Relaxed),
        ) {
            Charged::Counted(n) => log::warn!(
                plugin:% = p.name, device_id = device, traps = n, reason:% = reason;
                "plugin trapped on a message of {device} ({n} in a row): {reason}"
            ),
            Charged::Contained(n) => {
                log::warn!(
                    device_id = device, plugin:% = p.name, traps = n, reason:% = reason;
                    "device {device} contained for plugin {} after {n} traps in a row (last: {reason}); \
                     its messages go to the dead-letter store without calling the plugin, other devices are not affected; \
                     lift with `wardgate reload` or a new version of the plugin", p.name
                );
                let contained = p.ledger.contained();
                if contained.len() == MANY_CONTAINED {
                    log::error!(
                        plugin:% = p.name, version:% = p.version, count = contained.len(),
                        devices:% = contained.iter().map(|c| c.device_id.as_str()).collect::<Vec<_>>().join(",");
                        "{} devices are contained for plugin {} {}: the plugin itself may be broken; check their dead letters and replace the plugin; other devices are still served",
                        contained.len(), p.name, p.version
                    );
                }
            }
        }
        Failure::Trap(reason)
    }
}

fn trap_reason(e: &wasmtime::Error) -> String {
    if let Some(s) = e.downcast_ref::<Stopped>() {
        return s.to_string();
    }
    if let Some(t) = e.downcast_ref::<wasmtime::Trap>() {
        return match t {
            wasmtime::Trap::Interrupt => "call interrupted".into(),
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

/// Plausibility of plugin output; anything else is the plugin's fault
/// ([`Failure::InvalidOutput`]): at most 64 readings, each with a metric and a unit of 1–64
/// bytes without control characters, a finite value and an observation time between
/// 2000-01-01 and one day after `received_at_ms`. Public for the fuzz target
/// `fuzz/fuzz_targets/plugin_output.rs`; the host calls it on every plugin result.
pub fn check_readings(
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
    // Saturating: a receive time near the end of `i64` must not overflow (found by fuzzing).
    let latest = received_at_ms.saturating_add(86_400_000);
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

#[cfg(test)]
mod tests {
    use super::*;
    use bindings::wardgate::plugin::types::Reading as RawReading;

    fn heart_rate(observed_at_ms: i64) -> RawReading {
        RawReading {
            metric: "heart-rate".into(),
            value: 72.0,
            unit: "/min".into(),
            observed_at_ms,
            quality: Quality::Good,
        }
    }

    /// Found by the fuzz target `plugin_output`: its minimised input (a receive time of
    /// `i64::MAX`, no readings) made "one day after receipt" overflow, a panic in a build with
    /// overflow checks and, wrapped, a limit in 1970 that refused every reading otherwise.
    #[test]
    fn a_receive_time_at_the_end_of_time_does_not_overflow() {
        const MINIMISED: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        let received_at_ms = i64::from_le_bytes(MINIMISED);
        assert_eq!(check_readings(Vec::new(), received_at_ms), Ok(Vec::new()));
        let readings = check_readings(vec![heart_rate(i64::MAX)], received_at_ms)
            .expect("observed at receipt");
        assert_eq!(readings[0].observed_at_ms, i64::MAX);
        assert!(matches!(
            check_readings(vec![heart_rate(0)], received_at_ms),
            Err(Failure::InvalidOutput(_))
        ));
    }
}
