//! Benchmark: sustained end-to-end throughput and PUBACK latency through a running gateway
//! (gatekeeper → pipeline → pacemaker plugin → canonical readings), with real MQTT clients at
//! QoS 1 on loopback, each keeping up to 100 publishes in flight. Two rounds: with no local
//! subscriber (nothing is copied to the local broker), and with a console subscribed to
//! `ward/+/readings` (every reading is published on the broker and delivered to it).
//!
//! Run with `cargo xtask bench`. Prints readings/s and PUBACK latency percentiles. The
//! clients run in the same process and share the machine's two cores with the gateway, so the
//! figure is a floor for a dedicated gateway, not a ceiling.

mod load;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
    round(&components, false).await;
    round(&components, true).await;
}

/// One round on a fresh gateway; with `console`, a local client subscribed to every
/// device's canonical readings, so every reading is also copied to the broker and delivered.
async fn round(components: &std::path::Path, console: bool) {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.gateway.state_dir = state.path().to_path_buf();
    cfg.listeners.plain.address = "127.0.0.1:0".parse().unwrap();
    cfg.broker.address = "127.0.0.1:0".parse().unwrap();
    cfg.http.address = "127.0.0.1:0".parse().unwrap();
    cfg.plugins.dir = components.to_path_buf();
    cfg.devices = load::devices(DEVICES);
    let mut c = wardgate::config::DeviceConfig::with_password(
        "console-01",
        "console",
        wardgate::registry::hash_password_demo("pw"),
    );
    c.subscribe = Some(vec!["ward/+/readings".into()]);
    cfg.devices.push(c);
    let gw = Gateway::start(&cfg).await.unwrap();
    assert!(
        gw.plugins().get("pacemaker").is_some(),
        "pacemaker plugin missing: run `cargo xtask plugins`"
    );
    let addr = gw.listener_addr("plain").unwrap();
    let delivered = Arc::new(AtomicU64::new(0));
    let listener = if console {
        Some(subscribe(addr, delivered.clone()).await)
    } else {
        None
    };

    let load = load::drive(addr, DEVICES, RUN, || {}).await;
    let stats = gw.stats();
    let readings: u64 = stats.snapshot().values().map(|c| c.readings).sum();
    if let Some(l) = listener {
        l.abort();
    }
    let _ = gw.stop(Duration::from_secs(10)).await;
    println!(
        "gateway end to end, {DEVICES} QoS 1 devices x 100 in flight for {:?}, {}: {} PUBACKs, {:.0} readings/s; PUBACK latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; canonical readings {readings}{}",
        RUN,
        if console { "a console subscribed to ward/+/readings" } else { "no local subscriber" },
        load.latencies.len(),
        load.rate(),
        load.pct(0.50).as_secs_f64() * 1e3,
        load.pct(0.99).as_secs_f64() * 1e3,
        load.latencies.last().unwrap().as_secs_f64() * 1e3,
        if console { format!(", {} delivered to the console", delivered.load(Ordering::Relaxed)) } else { String::new() },
    );
}

/// The console: subscribed (SUBACK received) before the load starts; counts deliveries.
async fn subscribe(
    addr: std::net::SocketAddr,
    delivered: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new("console-01", addr.ip().to_string(), addr.port());
    o.set_credentials("console-01", "pw");
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 16);
    client
        .subscribe("ward/+/readings", QoS::AtMostOnce)
        .await
        .unwrap();
    loop {
        match el.poll().await.expect("console connects") {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    tokio::spawn(async move {
        let _client = client;
        while let Ok(e) = el.poll().await {
            if let Event::Incoming(Packet::Publish(_)) = e {
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}
