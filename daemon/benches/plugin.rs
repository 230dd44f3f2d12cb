//! Benchmark: per-reading cost of the pacemaker plugin through the real host (instance reuse,
//! epoch deadline and memory limiter on), the way the pipeline calls it.
//!
//! Run with `cargo xtask bench` (builds the plugins first). Prints ns per call: the median and
//! the best of several rounds, so a busy machine shows up as spread rather than as a wrong
//! figure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardgate::config::PluginsConfig;
use wardgate::plugin_host::{Input, PluginHost};

const ROUNDS: usize = 7;
const CALLS: u32 = 100_000;

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
    let cfg = PluginsConfig {
        dir: components.clone().into(),
        poll_interval: Duration::from_secs(60),
        call_deadline: Duration::from_millis(5),
        max_memory_bytes: 16 << 20,
        max_consecutive_traps: 3,
    };
    let host = PluginHost::new(&cfg, None).expect("engine");
    host.load_file(&path).expect("pacemaker loads");
    let settings = Arc::new(BTreeMap::new());
    // A reading taken now and received 100 ms later, as on a live ward.
    let taken_ms = wardgate::clock::now_ms();
    let payload = format!(r#"{{"heartbeat":92,"ts":{taken_ms},"battery_pct":87,"mode":"DDD"}}"#);
    let payload = payload.as_bytes();
    let input = Input {
        device_id: "pacemaker-01",
        kind: "pacemaker",
        topic: "ward/pacemaker-01/telemetry",
        payload,
        received_at_ms: taken_ms + 100,
        settings: &settings,
    };
    for _ in 0..20_000 {
        host.normalize("pacemaker", input).expect("warm-up call");
    }
    let mut per_call = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..CALLS {
            let n = host.normalize("pacemaker", input).expect("call");
            std::hint::black_box(n);
        }
        per_call.push(t.elapsed().as_nanos() as f64 / f64::from(CALLS));
    }
    per_call.sort_by(f64::total_cmp);
    println!(
        "pacemaker plugin, {}-byte payload, {} rounds x {} calls: median {:.0} ns/reading, best {:.0} ns, worst {:.0} ns",
        payload.len(),
        ROUNDS,
        CALLS,
        per_call[ROUNDS / 2],
        per_call[0],
        per_call[ROUNDS - 1]
    );
}
