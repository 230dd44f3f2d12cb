//! Benchmark: sustained end-to-end throughput and PUBACK latency through a running gateway
//! (gatekeeper → pipeline → pacemaker plugin → canonical readings on the local broker), with
//! real MQTT clients at QoS 1 on loopback, each keeping up to 100 publishes in flight.
//!
//! Run with `cargo xtask bench`. Prints readings/s and PUBACK latency percentiles. The
//! clients run in the same process and share the machine's two cores with the gateway, so the
//! figure is a floor for a dedicated gateway, not a ceiling.

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wardgate::app::Gateway;
use wardgate::config::{Config, DeviceConfig};

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
    cfg.devices = (0..DEVICES)
        .map(|i| {
            DeviceConfig::with_password(
                &format!("pm-{i:03}"),
                "pacemaker",
                wardgate::registry::hash_password_demo("pw"),
            )
        })
        .collect();
    let gw = Gateway::start(&cfg).await.unwrap();
    assert!(
        gw.plugins().get("pacemaker").is_some(),
        "pacemaker plugin missing: run `cargo xtask plugins`"
    );
    let addr = gw.listener_addr("plain").unwrap();

    let running = Arc::new(AtomicBool::new(true));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::with_capacity(1 << 20)));
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let id = format!("pm-{i:03}");
        let mut o = MqttOptions::new(id.clone(), "127.0.0.1", addr.port());
        o.set_credentials(id.clone(), "pw");
        o.set_inflight(100);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 200);
        let lat = latencies.clone();
        let poller = tokio::spawn(async move {
            let mut sent: HashMap<u16, Instant> = HashMap::new();
            let mut mine = Vec::new();
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        sent.insert(pkid, Instant::now());
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if let Some(t) = sent.remove(&a.pkid) {
                            mine.push(t.elapsed());
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            lat.lock().unwrap().extend(mine);
        });
        let run = running.clone();
        let publisher = tokio::spawn(async move {
            let mut n = 0u64;
            let topic = format!("ward/{id}/telemetry");
            while run.load(Ordering::Relaxed) {
                let payload = format!(
                    r#"{{"heartbeat":{},"ts":1795326538000,"battery_pct":87,"mode":"DDD"}}"#,
                    60 + n % 60
                );
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                n += 1;
            }
            // Let the last acknowledgements arrive, then leave cleanly.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = client.disconnect().await;
        });
        tasks.push((publisher, poller));
    }
    let started = Instant::now();
    tokio::time::sleep(RUN).await;
    running.store(false, Ordering::Relaxed);
    for (p, q) in tasks {
        let _ = p.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), q).await;
    }
    let elapsed = started.elapsed() - Duration::from_millis(500);
    let stats = gw.stats();
    let readings: u64 = stats.snapshot().values().map(|c| c.readings).sum();
    let _ = gw.stop(Duration::from_secs(10)).await;
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    println!(
        "gateway end to end, {DEVICES} QoS 1 devices x 100 in flight for {:?}: {} PUBACKs, {:.0} readings/s; PUBACK latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; canonical readings {readings}",
        RUN,
        l.len(),
        l.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        l.last().unwrap().as_secs_f64() * 1e3,
    );
}
