//! Benchmark: the spine, device → gateway → upstream, on the real binary, next to a mosquitto
//! bridge doing the same relay in the same run.
//!
//! Set-up: an upstream mosquitto with mutual TLS (certificates from `packaging/pki/ward-pki`)
//! stands in for AWS IoT Core; a "cloud" client subscribes there. `wardgate run` (release
//! build, its three plugins, upstream enabled with IoT Core's quotas) serves 500 password
//! devices; a second mosquitto with a bridge to the upstream (persistence every 1 s, the
//! bridge at QoS 1) serves the same devices for comparison. Devices publish ~100-byte
//! pacemaker payloads at QoS 1 carrying their send time (`ts`); the cloud side takes
//! `arrival - ts` for every reading, from the expanded batch (gateway) or the relayed message
//! (bridge).
//!
//! 1. Paced: 500 devices × 2 readings/s = 1 000 readings/s for 20 s → p50/p99/max device →
//!    upstream, and the peak RSS of each process in that run.
//! 2. Flat out: 50 devices, 100 publishes in flight each, for 5 s → readings acknowledged per
//!    second (the gateway writes each to disk before its PUBACK; mosquitto persists every 1 s).
//! 3. Drain: while and after that, the backlog goes upstream → readings/s delivered within one
//!    connection's quotas (100 publishes/s, 512 KiB/s) and the KiB/s of MQTT payload used.
//!
//! `SPINE_ONLY=wardgate` skips the bridge; `SPINE_PHASES=paced` runs only the paced part;
//! `BENCH_GATEWAY_ENV` adds to the gateway's environment (see `real`). `SPINE_PERF=<file>` records a CPU profile (`perf record -g`) of each system while flat out,
//! into `<file>.wardgate` and `<file>.mosquitto-bridge`.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p wardgate --bench spine`). Prints one line
//! per figure and writes `target/bench/spine.json`. The clients share the two cores with the
//! gateway (or the bridge), so the figures are floors for a dedicated gateway.

mod load;
mod real;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PACED_DEVICES: usize = 500;
const PACED_RATE: f64 = 2.0;
const PACED_RUN: Duration = Duration::from_secs(20);
const FLAT_DEVICES: usize = 50;
const FLAT_RUN: Duration = Duration::from_secs(5);
const READINGS_TOPIC: &str = "wardgate/bench-gateway/readings";

fn now_ms() -> i64 {
    wardgate::clock::now_ms()
}

/// What the cloud client saw.
#[derive(Default)]
struct Cloud {
    /// device → upstream latency of every reading, ms.
    latencies: Mutex<Vec<i64>>,
    /// Readings and payload bytes received, and when the last came.
    readings: AtomicU64,
    bytes: AtomicU64,
    last_ms: AtomicU64,
    /// Whether latencies are being collected.
    collecting: AtomicBool,
}

/// Subscribe on the upstream as the "cloud", with mutual TLS.
async fn cloud(port: u16, pki: &Path, topics: &[&str]) -> Arc<Cloud> {
    let o = real::cloud_options("bench-cloud", port, pki);
    let (client, mut el) = AsyncClient::new(o, 64);
    for t in topics {
        client.subscribe(*t, QoS::AtLeastOnce).await.unwrap();
    }
    let seen = Arc::new(Cloud::default());
    let s = seen.clone();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = now_ms();
                    // The device's send time of each reading in this message.
                    let sent: Vec<i64> =
                        load::readings_in(p.topic == READINGS_TOPIC, &p.topic, &p.payload)
                            .iter()
                            .map(|r| r.ts.unwrap_or(now))
                            .collect();
                    if sent.is_empty() {
                        continue;
                    }
                    s.readings.fetch_add(sent.len() as u64, Ordering::Relaxed);
                    s.bytes.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                    s.last_ms.store(now as u64, Ordering::Relaxed);
                    if s.collecting.load(Ordering::Relaxed) {
                        s.latencies
                            .lock()
                            .unwrap()
                            .extend(sent.iter().map(|t| now - t));
                    }
                }
                Ok(_) => {}
                // The upstream is stopped at the end of the run.
                Err(_) => break,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("SUBACK from the upstream")
        .unwrap();
    seen
}

/// The payload of reading `k` of a device: about 100 bytes, with the send time.
fn payload(k: u64) -> String {
    format!(
        r#"{{"heartbeat":{},"ts":{},"battery_pct":87,"mode":"DDD","lead_impedance_ohm":512,"n":{k:>8}}}"#,
        60 + k % 60,
        now_ms()
    )
}

/// Connect `n` devices to `addr` (retrying CONNACK 3 as an SDK would); each publishes
/// `rate` readings per second at QoS 1 for `run`, at a random phase. Returns the PUBACKs.
async fn paced(addr: SocketAddr, n: usize, rate: f64, run: Duration) -> u64 {
    let acked = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(tokio::sync::Semaphore::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for i in 0..n {
        let id = format!("pm-{i:03}");
        let mut o = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
        o.set_credentials(id.clone(), "pw");
        o.set_keep_alive(Duration::from_secs(60));
        let (client, mut el) = AsyncClient::new(o, 16);
        let (acked, connected) = (acked.clone(), connected.clone());
        let poller = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        if a.code == rumqttc::ConnectReturnCode::Success {
                            connected.add_permits(1);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    // Refused (busy) or dropped: rumqttc reconnects on the next poll.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 200))
                            .await
                    }
                }
            }
        });
        let go = go.clone();
        let publisher = tokio::spawn(async move {
            go.notified().await;
            let period = Duration::from_secs_f64(1.0 / rate);
            tokio::time::sleep(period.mul_f64(rand::random::<f64>())).await;
            let mut tick = tokio::time::interval(period);
            let end = Instant::now() + run;
            let topic = format!("ward/{id}/telemetry");
            let mut k = 0;
            while Instant::now() < end {
                tick.tick().await;
                let _ = client
                    .publish(&topic, QoS::AtLeastOnce, false, payload(k))
                    .await;
                k += 1;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = client.disconnect().await;
        });
        tasks.push((publisher, poller));
    }
    let all = connected.acquire_many(n as u32);
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every device connects within 120 s")
        .unwrap()
        .forget();
    go.notify_waiters();
    for (p, q) in tasks {
        let _ = p.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), q).await;
    }
    acked.load(Ordering::Relaxed)
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return -1;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// One system under test: where devices connect, its process, and the cloud's view.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    cloud: Arc<Cloud>,
}

async fn measure(t: &Target, report: &mut serde_json::Map<String, serde_json::Value>) {
    // 1. Paced.
    real::reset_peak(t.pid);
    t.cloud.collecting.store(true, Ordering::Relaxed);
    let acked = paced(t.addr, PACED_DEVICES, PACED_RATE, PACED_RUN).await;
    // Wait for the last of them upstream.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (t.cloud.latencies.lock().unwrap().len() as u64) < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.cloud.collecting.store(false, Ordering::Relaxed);
    let peak = real::rss_kib(t.pid).1;
    let mut lat = std::mem::take(&mut *t.cloud.latencies.lock().unwrap());
    lat.sort_unstable();
    println!(
        "spine [{}]: {PACED_DEVICES} devices x {PACED_RATE}/s for {PACED_RUN:?}: {acked} acknowledged, {} upstream; device -> upstream p50 {} ms, p99 {} ms, max {} ms; peak RSS {:.1} MiB",
        t.name,
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(-1),
        peak as f64 / 1024.0
    );
    report.insert(
        format!("{}_paced", t.name),
        serde_json::json!({
            "devices": PACED_DEVICES, "readings_per_second": PACED_DEVICES as f64 * PACED_RATE,
            "acknowledged": acked, "upstream": lat.len(),
            "p50_ms": pct(&lat, 0.5), "p99_ms": pct(&lat, 0.99), "max_ms": lat.last(),
            "peak_rss_kib": peak,
        }),
    );

    // `SPINE_PHASES=paced` stops here (e.g. to profile the paced run's memory alone).
    if std::env::var("SPINE_PHASES").is_ok_and(|p| p == "paced") {
        return;
    }
    // 2. Flat out, and 3. the drain.
    let before = (
        t.cloud.readings.load(Ordering::Relaxed),
        t.cloud.bytes.load(Ordering::Relaxed),
    );
    let start_ms = now_ms();
    // SPINE_PERF=<file>: record a CPU profile of the system under test while flat out.
    let perf = std::env::var("SPINE_PERF").ok().map(|out| {
        Command::new("perf")
            .args(["record", "-F", "499", "-g", "-o"])
            .arg(format!("{out}.{}", t.name))
            .args(["-p", &t.pid.to_string(), "--", "sleep", "4"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf installed")
    });
    let load = load::drive(t.addr, FLAT_DEVICES, FLAT_RUN, || {}).await;
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    let acked = load.latencies.len() as u64;
    println!(
        "spine [{}]: {FLAT_DEVICES} devices flat out (100 in flight each) for {FLAT_RUN:?}: {acked} acknowledged, {:.0} readings/s; PUBACK p50 {:.1} ms, p99 {:.1} ms",
        t.name,
        load.rate(),
        load.pct(0.5).as_secs_f64() * 1e3,
        load.pct(0.99).as_secs_f64() * 1e3,
    );
    // Until everything acknowledged is upstream (or no progress for 10 s).
    let mut last = (0, Instant::now());
    loop {
        let got = t.cloud.readings.load(Ordering::Relaxed) - before.0;
        if got >= acked {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let readings = t.cloud.readings.load(Ordering::Relaxed) - before.0;
    let bytes = t.cloud.bytes.load(Ordering::Relaxed) - before.1;
    let secs = (t.cloud.last_ms.load(Ordering::Relaxed) as i64 - start_ms) as f64 / 1e3;
    println!(
        "spine [{}]: upstream during and after it: {readings} readings in {secs:.1} s = {:.0} readings/s, {:.0} KiB/s of MQTT payload (quota 512 KiB/s, 100 publishes/s)",
        t.name,
        readings as f64 / secs,
        bytes as f64 / 1024.0 / secs
    );
    report.insert(
        format!("{}_flat_out", t.name),
        serde_json::json!({
            "devices": FLAT_DEVICES, "acknowledged": acked, "acknowledged_per_second": load.rate(),
            "puback_p50_ms": load.pct(0.5).as_secs_f64() * 1e3,
            "puback_p99_ms": load.pct(0.99).as_secs_f64() * 1e3,
            "upstream_readings": readings, "upstream_seconds": secs,
            "upstream_readings_per_second": readings as f64 / secs,
            "upstream_kib_per_second": bytes as f64 / 1024.0 / secs,
        }),
    );
}

fn main() {
    let components = real::components_dir();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pki");
    real::upstream_pki(
        &p,
        "Bench upstream CA",
        &["bench-gateway", "bench-bridge", "bench-cloud"],
    );
    let up = real::free_port();
    let mut upstream = real::Mosquitto::with_conf(
        &tmp.path().join("upstream.conf"),
        &format!(
            "{}log_dest file {log}\nlog_type all\n",
            real::upstream_conf(up, &p),
            log = tmp.path().join("upstream.log").display(),
        ),
        up,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(run(components, tmp.path(), up, &p));
    upstream.stop();
    real::write_report("spine", &serde_json::Value::Object(report));
}

/// Start `wardgate run` on `tmp` with the upstream on `up`.
fn start_gateway(components: PathBuf, tmp: &Path, up: u16, p: &Path) -> real::Running {
    // Cheap hashes: this measures the spine, not argon2 (the logins bench does that).
    let cfg = real::spine_gateway(&tmp.join("state"), components, up, p, PACED_DEVICES);
    real::start(&cfg, tmp, "wardgate", Duration::from_secs(60))
}

async fn run(
    components: PathBuf,
    tmp: &Path,
    up: u16,
    p: &Path,
) -> serde_json::Map<String, serde_json::Value> {
    let mut report = serde_json::Map::new();
    let cloud_gw = cloud(up, p, &[READINGS_TOPIC, "ward/+/telemetry"]).await;
    let gw = start_gateway(components, tmp, up, p);
    let gateway = Target {
        name: "wardgate",
        addr: gw.addr,
        pid: gw.pid,
        cloud: cloud_gw.clone(),
    };
    measure(&gateway, &mut report).await;
    gw.stop();
    if std::env::var("SPINE_ONLY").is_ok_and(|o| o == "wardgate") {
        return report;
    }
    // The bridge starts now, so it meets the devices as fresh as the gateway did.
    let bridge_port = real::free_port();
    std::fs::create_dir_all(tmp.join("bridge-db")).unwrap();
    let mut bridge = real::Mosquitto::with_conf(
        &tmp.join("bridge.conf"),
        &format!(
            "{}log_dest file {log}\n",
            real::bridge_conf(bridge_port, up, p, &tmp.join("bridge-db")),
            log = tmp.join("bridge.log").display(),
        ),
        bridge_port,
    );
    let target = Target {
        name: "mosquitto-bridge",
        addr: SocketAddr::from(([127, 0, 0, 1], bridge_port)),
        pid: bridge.pid(),
        cloud: cloud_gw,
    };
    measure(&target, &mut report).await;
    bridge.stop();
    report
}
