//! Benchmark: store and forward to a real upstream (mosquitto with mutual TLS, certificates from
//! `packaging/pki/ward-pki`), within AWS IoT Core's per-connection quotas.
//!
//! 1. Sustained: 10 QoS 1 devices (100 in flight each) for 5 s → device PUBACK rate and latency
//!    (each reading is on disk before its PUBACK) and the upstream delivery rate meanwhile.
//! 2. Drain: the devices stop; time until the queue is empty → backlog drain rate in readings/s
//!    and bytes/s against the 512 KiB/s quota.
//!
//! Run with `cargo xtask bench`.

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wardgate::app::Gateway;
use wardgate::config::{Config, DeviceConfig};

const DEVICES: usize = 10;
const RUN: Duration = Duration::from_secs(5);

fn pki(dir: &Path, args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/pki/ward-pki");
    let o = Command::new("sh")
        .arg(script)
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ward-pki {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn main() {
    let components = std::env::var("WARDGATE_COMPONENTS").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target/components").into()
    });
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pki");
    pki(&p, &["init", "Bench upstream CA"]);
    pki(
        &p,
        &["server", "localhost", "DNS:localhost", "IP:127.0.0.1"],
    );
    pki(&p, &["device", "bench-gateway"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = tmp.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nper_listener_settings true\nlistener {port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/server.crt\nkeyfile {p}/server.key\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
            p = p.display()
        ),
    )
    .unwrap();
    let mut mq = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto installed");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(components.into(), tmp.path(), port, &p));
    let _ = mq.kill();
    let _ = mq.wait();
}

async fn run(components: std::path::PathBuf, tmp: &Path, port: u16, p: &Path) {
    let mut cfg = Config::default();
    cfg.gateway.id = "bench-gateway".into();
    cfg.gateway.state_dir = tmp.join("state");
    cfg.listeners.plain.address = "127.0.0.1:0".parse().unwrap();
    cfg.broker.address = "127.0.0.1:0".parse().unwrap();
    cfg.plugins.dir = components;
    cfg.upstream.enabled = true;
    cfg.upstream.endpoint = "localhost".into();
    cfg.upstream.port = port;
    cfg.upstream.ca_file = Some(p.join("ca.crt"));
    cfg.upstream.cert_file = Some(p.join("devices/bench-gateway.crt"));
    cfg.upstream.key_file = Some(p.join("devices/bench-gateway.key"));
    cfg.upstream.max_inflight = 100;
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
    let addr = gw.listener_addr("plain").unwrap();
    while !gw.uplink().connected.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let running = Arc::new(AtomicBool::new(true));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let id = format!("pm-{i:03}");
        let mut o = MqttOptions::new(id.clone(), "127.0.0.1", addr.port());
        o.set_credentials(id.clone(), "pw");
        o.set_inflight(100);
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
            let topic = format!("ward/{id}/telemetry");
            let mut n = 0u64;
            while run.load(Ordering::Relaxed) {
                let payload = format!(
                    r#"{{"heartbeat":{},"ts":1795326538000,"battery_pct":87}}"#,
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
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = client.disconnect().await;
        });
        tasks.push((publisher, poller));
    }
    let started = Instant::now();
    tokio::time::sleep(RUN).await;
    let delivered_during = gw.uplink().records_delivered.load(Ordering::Relaxed);
    running.store(false, Ordering::Relaxed);
    for (p, q) in tasks {
        let _ = p.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), q).await;
    }
    let ingest_time = started.elapsed() - Duration::from_millis(500);
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    println!(
        "store and forward, {DEVICES} QoS 1 devices for {RUN:?}: {} readings acknowledged ({:.0}/s, each on disk before its PUBACK); PUBACK latency p50 {:.1} ms, p99 {:.1} ms; delivered upstream meanwhile {} ({:.0}/s)",
        l.len(),
        l.len() as f64 / ingest_time.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        delivered_during,
        delivered_during as f64 / RUN.as_secs_f64()
    );
    let backlog = gw.queue_status().unwrap();
    let drain_start = Instant::now();
    loop {
        let q = gw.queue_status().unwrap();
        if q.depth == 0 || drain_start.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = drain_start.elapsed().as_secs_f64();
    println!(
        "backlog drain: {} readings ({} KiB as stored) in {t:.1} s = {:.0} readings/s, {:.0} KiB/s of stored records (quota: 512 KiB/s of MQTT payload, 100 publishes/s)",
        backlog.depth,
        backlog.bytes / 1024,
        backlog.depth as f64 / t,
        backlog.bytes as f64 / 1024.0 / t
    );
    let _ = gw.stop(Duration::from_secs(10)).await;
}
