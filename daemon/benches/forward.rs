//! Benchmark: store and forward to a real upstream (mosquitto with mutual TLS, certificates from
//! `packaging/pki/ward-pki`), within AWS IoT Core's per-connection quotas.
//!
//! 1. Sustained: 10 QoS 1 devices (100 in flight each) for 5 s → device PUBACK rate and latency
//!    (each reading is on disk before its PUBACK) and the upstream delivery rate meanwhile.
//! 2. Drain: the devices stop; time until the queue is empty → backlog drain rate in readings/s
//!    and bytes/s against the 512 KiB/s quota.
//!
//! Run with `cargo xtask bench`.

mod load;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use wardgate::app::Gateway;
use wardgate::config::Config;

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
    cfg.devices = load::devices(DEVICES);
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    while !gw.uplink().connected.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let uplink = gw.uplink().clone();
    let mut delivered_during = 0;
    let load = load::drive(addr, DEVICES, RUN, || {
        delivered_during = uplink.records_delivered.load(Ordering::Relaxed);
    })
    .await;
    println!(
        "store and forward, {DEVICES} QoS 1 devices for {RUN:?}: {} readings acknowledged ({:.0}/s, each on disk before its PUBACK); PUBACK latency p50 {:.1} ms, p99 {:.1} ms; delivered upstream meanwhile {} ({:.0}/s)",
        load.latencies.len(),
        load.rate(),
        load.pct(0.5).as_secs_f64() * 1e3,
        load.pct(0.99).as_secs_f64() * 1e3,
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
