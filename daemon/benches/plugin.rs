//! Benchmark: per-reading cost of the pacemaker plugin, through the real host the way the
//! pipeline calls it (the device's own kept instance, CPU-time budget, memory limiter), and the
//! cost of each way of isolating devices from one another that the host could have chosen:
//!
//! - one instance reused for every call: what an instance kept per device costs (the host's
//!   choice), and what the old pool shared across devices cost;
//! - a fresh instance per call, with wasmtime's on-demand allocator (the host's) and with its
//!   pooling allocator (slots reset between instances);
//! - through the host with a new device on every call, so every call makes an instance.
//!
//! Each for a 65-byte payload and a 128 KiB one (a pacemaker with an electrogram strip).
//! Also the cost of reading the thread's CPU clock, paid once per call for the CPU budget.
//!
//! Run with `cargo xtask bench` (builds the plugins first). Prints µs per call: the median and
//! the best of several rounds, so a busy machine shows up as spread rather than as a wrong
//! figure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardgate::config::PluginsConfig;
use wardgate::plugin_host::bindings::wardgate::plugin::{host, types};
use wardgate::plugin_host::bindings::{DevicePlugin, DevicePluginPre};
use wardgate::plugin_host::{Input, PluginHost};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

const ROUNDS: usize = 7;

/// When the benchmark's readings were taken: now, as on a live ward (received 100 ms later).
fn taken_ms() -> i64 {
    static AT: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *AT.get_or_init(wardgate::clock::now_ms)
}

/// A 65-byte pacemaker message taken now.
fn small_payload() -> Vec<u8> {
    format!(
        r#"{{"heartbeat":92,"ts":{},"battery_pct":87,"mode":"DDD"}}"#,
        taken_ms()
    )
    .into_bytes()
}

fn main() {
    let components = std::env::var("WARDGATE_COMPONENTS").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target/components").into()
    });
    let path = std::path::Path::new(&components).join("pacemaker.wasm");
    assert!(
        path.is_file(),
        "{} missing: run `cargo xtask plugins`",
        path.display()
    );
    let large = large_payload();
    let small = small_payload();
    let cfg = PluginsConfig {
        dir: components.clone().into(),
        shipped_dir: Default::default(),
        poll_interval: Duration::from_secs(60),
        // Generous: this measures what a call costs, not whether it fits the default budget.
        call_deadline: Duration::from_millis(100),
        max_memory_bytes: 16 << 20,
        max_consecutive_traps: 3,
    };

    let host = PluginHost::new(&cfg, None).expect("engine");
    host.load_file(&path).expect("pacemaker loads");
    let settings = Arc::new(BTreeMap::new());
    for (label, payload, calls) in [
        ("65-byte", &small[..], 50_000),
        ("128 KiB", &large[..], 500),
    ] {
        let input = Input {
            device_id: "pacemaker-01",
            kind: "pacemaker",
            topic: "ward/pacemaker-01/telemetry",
            payload,
            received_at_ms: taken_ms() + 100,
            settings: &settings,
        };
        report(
            &format!("host, the device's kept instance, {label} payload"),
            calls * 4,
            || {
                let n = host.normalize("pacemaker", input).expect("call");
                std::hint::black_box(n);
            },
        );
        let mut n = 0u64;
        report(
            &format!("host, a new device every call (fresh instance), {label} payload"),
            calls,
            || {
                n += 1;
                let id = format!("pacemaker-{n}");
                let r = host
                    .normalize(
                        "pacemaker",
                        Input {
                            device_id: &id,
                            ..input
                        },
                    )
                    .expect("call");
                std::hint::black_box(r);
            },
        );
    }

    let bytes = std::fs::read(&path).unwrap();
    for (strategy, pooling) in [("on-demand allocator", false), ("pooling allocator", true)] {
        let engine = engine(pooling);
        let component = Component::new(&engine, &bytes).expect("compiles");
        let mut linker = Linker::<Bare>::new(&engine);
        DevicePlugin::add_to_linker::<Bare, HasSelf<Bare>>(&mut linker, |s| s).unwrap();
        let pre = DevicePluginPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
        for (label, payload, calls) in [
            ("65-byte", &small[..], 50_000),
            ("128 KiB", &large[..], 500),
        ] {
            let msg = message(payload);
            report(
                &format!("fresh instance per call, {strategy}, {label} payload"),
                calls,
                || {
                    let mut store = store(&engine);
                    let p = pre.instantiate(&mut store).expect("instantiates");
                    let r = p.call_normalize(&mut store, &msg).expect("no trap");
                    std::hint::black_box(r.expect("normalised"));
                },
            );
            if !pooling {
                let mut store = store(&engine);
                let p = pre.instantiate(&mut store).expect("instantiates");
                report(
                    &format!("one reused instance, {label} payload"),
                    calls * 4,
                    || {
                        store.set_epoch_deadline(1_000);
                        let r = p.call_normalize(&mut store, &msg).expect("no trap");
                        std::hint::black_box(r.expect("normalised"));
                    },
                );
            }
        }
        {
            report(
                &format!("instantiation alone (store + instance), {strategy}"),
                50_000,
                || {
                    let mut store = store(&engine);
                    std::hint::black_box(pre.instantiate(&mut store).expect("instantiates"));
                },
            );
        }
    }
    report("thread CPU clock read", 200_000, || {
        std::hint::black_box(
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap(),
        );
    });
}

/// A valid pacemaker message of 128 KiB: the usual fields and an electrogram strip.
fn large_payload() -> Vec<u8> {
    let mut p = format!(
        r#"{{"heartbeat":92,"ts":{},"battery_pct":87,"mode":"DDD","egm":["#,
        taken_ms()
    );
    let mut i = 0u32;
    while p.len() < 128 * 1024 - 16 {
        if i > 0 {
            p.push(',');
        }
        p.push_str(&((i * 37) % 1024).to_string());
        i += 1;
    }
    p.push_str("]}");
    p.into_bytes()
}

fn message(payload: &[u8]) -> types::RawMessage {
    types::RawMessage {
        device_id: "pacemaker-01".into(),
        kind: "pacemaker".into(),
        topic: "ward/pacemaker-01/telemetry".into(),
        payload: payload.to_vec(),
        received_at_ms: taken_ms() + 100,
    }
}

/// Time `calls` runs of `f`, `ROUNDS` times; print median, best and worst µs per call.
fn report(what: &str, calls: u32, mut f: impl FnMut()) {
    for _ in 0..(calls / 10).max(1) {
        f();
    }
    let mut per_call = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        per_call.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(calls));
    }
    per_call.sort_by(f64::total_cmp);
    println!(
        "{what}: median {:.2} µs/call, best {:.2}, worst {:.2} ({ROUNDS} rounds x {calls} calls)",
        per_call[ROUNDS / 2],
        per_call[0],
        per_call[ROUNDS - 1]
    );
}

/// An engine like the host's (epoch interruption on), with either allocator.
fn engine(pooling: bool) -> Engine {
    let mut c = wasmtime::Config::new();
    c.epoch_interruption(true);
    c.wasm_component_model(true);
    if pooling {
        let mut p = wasmtime::PoolingAllocationConfig::new();
        p.total_component_instances(8)
            .total_core_instances(64)
            .total_memories(64)
            .total_tables(64)
            .max_memory_size(16 << 20)
            .linear_memory_keep_resident(64 << 10);
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(p));
    }
    Engine::new(&c).unwrap()
}

fn store(engine: &Engine) -> Store<Bare> {
    let mut s = Store::new(engine, Bare);
    s.set_epoch_deadline(1_000);
    s
}

/// The least host a plugin can run against: logs and settings go nowhere.
struct Bare;

impl types::Host for Bare {}

impl host::Host for Bare {
    fn log(&mut self, _level: host::LogLevel, message: String) {
        std::hint::black_box(message);
    }

    fn now_ms(&mut self) -> i64 {
        taken_ms() + 100
    }

    fn device_setting(&mut self, _key: String) -> Option<String> {
        None
    }
}
