//! Benchmark: sustained end-to-end throughput and PUBACK latency through a running gateway
//! (gatekeeper → pipeline → pacemaker plugin → canonical readings on the local broker), with
//! real MQTT clients at QoS 1 on loopback, each keeping up to 100 publishes in flight.
//!
//! Run with `cargo xtask bench`. Prints readings/s and PUBACK latency percentiles. The
//! clients run in the same process and share the machine's two cores with the gateway, so the
//! figure is a floor for a dedicated gateway, not a ceiling.

mod load;

use std::time::Duration;
use wardgate::app::Gateway;
use wardgate::config::Config;

const DEVICES: usize = 10;
const RUN: Duration = Duration::from_secs(10);

fn main() {
    let components = std::env::var("WARDGATE_COMPONENTS").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target/components").into()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(components.into()));
}

async fn run(components: std::path::PathBuf) {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.gateway.state_dir = state.path().to_path_buf();
    cfg.listeners.plain.address = "127.0.0.1:0".parse().unwrap();
    cfg.broker.address = "127.0.0.1:0".parse().unwrap();
    cfg.plugins.dir = components;
    cfg.devices = load::devices(DEVICES);
    let gw = Gateway::start(&cfg).await.unwrap();
    assert!(
        gw.plugins().get("pacemaker").is_some(),
        "pacemaker plugin missing: run `cargo xtask plugins`"
    );
    let addr = gw.listener_addr("plain").unwrap();

    let load = load::drive(addr, DEVICES, RUN, || {}).await;
    let stats = gw.stats();
    let readings: u64 = stats.snapshot().values().map(|c| c.readings).sum();
    let _ = gw.stop(Duration::from_secs(10)).await;
    println!(
        "gateway end to end, {DEVICES} QoS 1 devices x 100 in flight for {:?}: {} PUBACKs, {:.0} readings/s; PUBACK latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; canonical readings {readings}",
        RUN,
        load.latencies.len(),
        load.rate(),
        load.pct(0.50).as_secs_f64() * 1e3,
        load.pct(0.99).as_secs_f64() * 1e3,
        load.latencies.last().unwrap().as_secs_f64() * 1e3,
    );
}
