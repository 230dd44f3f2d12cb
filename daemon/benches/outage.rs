//! Benchmark: what a reading costs during an upstream outage, with an empty queue and with a
//! large backlog, measured on the real binary.
//!
//! The upstream is enabled but unreachable (a closed 127.0.0.1 port; certificates from
//! `packaging/pki/ward-pki`), so every reading stays in the durable queue. 50 QoS 1 devices
//! each send 20 pacemaker readings a second (1 000 readings/s offered, a steady load rather
//! than flat out, so the CPU per reading is comparable between cases). After a warm-up, for
//! [`RUN`], it measures:
//! - CPU per reading: the gateway process's utime + stime (`/proc/<pid>/stat`) over the run,
//!   divided by the readings acknowledged in it;
//! - PUBACK latency p50 / p99 of the readings sent in the run (each is on disk before its PUBACK).
//!
//! Cases, one gateway start each:
//! 1. an empty queue (`queue.max_bytes` 512 MiB);
//! 2. 256 MiB already queued (written into the queue directory with the queue's own store
//!    before the gateway starts: realistic canonical readings), under the same 512 MiB bound;
//! 3. the same backlog with `queue.max_bytes` set to what is queued, so every group commit
//!    evicts the oldest routine readings (the steady state of a long outage).
//!
//! Run with `cargo xtask bench` (or `cargo bench -p wardgate --bench outage`). Prints one line
//! per case and writes `target/bench/outage.json`.

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wardgate::queue::{Class, Record, SledStore, Store};

const DEVICES: usize = 50;
/// Readings per second per device.
const RATE: u64 = 20;
const WARMUP: Duration = Duration::from_secs(3);
const RUN: Duration = Duration::from_secs(20);
/// Backlog written before cases 2 and 3.
const BACKLOG_BYTES: u64 = 256 << 20;
/// `queue.max_bytes` of cases 1 and 2: above the backlog.
const ROOMY_BOUND: u64 = 512 << 20;

mod real;
use real::pki;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// Clock ticks per second of `/proc/<pid>/stat`.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / ticks
}

fn registry() -> Vec<wardgate::config::DeviceConfig> {
    let hash = wardgate::registry::hash_password_demo("pw");
    (0..DEVICES)
        .map(|i| {
            wardgate::config::DeviceConfig::with_password(
                &format!("pm-{i:03}"),
                "pacemaker",
                hash.clone(),
            )
        })
        .collect()
}

/// A canonical message as the pipeline makes it from one pacemaker reading.
fn canonical(device: &str, hr: u32) -> Vec<u8> {
    let now = wardgate::clock::now_ms();
    let readings = [
        wardgate::plugin_host::Reading {
            metric: "heart_rate".into(),
            value: f64::from(hr),
            unit: "/min".into(),
            observed_at_ms: now,
            quality: "good",
        },
        wardgate::plugin_host::Reading {
            metric: "battery".into(),
            value: 87.0,
            unit: "%".into(),
            observed_at_ms: now,
            quality: "good",
        },
    ];
    let topic = format!("ward/{device}/telemetry");
    serde_json::to_vec(&wardgate::pipeline::Canonical {
        gateway_id: "bench-gateway",
        device_id: device,
        kind: "pacemaker",
        plugin: "pacemaker",
        plugin_version: "1.0.0",
        topic: &topic,
        received_at_ms: now,
        readings: &readings,
    })
    .unwrap()
}

/// Write about `bytes` of routine readings into the queue in `dir`; (records, bytes, seconds).
fn prefill(dir: &Path, bytes: u64) -> (usize, u64, f64) {
    let started = Instant::now();
    let (mut q, _) = SledStore::open(dir, 64 << 20).unwrap();
    let mut n = 0u32;
    while q.bytes() < bytes {
        let batch: Vec<Record> = (0..1000)
            .map(|_| {
                n += 1;
                let device = format!("pm-{:03}", n as usize % DEVICES);
                Record::telemetry(Class::Routine, &device, canonical(&device, 60 + n % 60))
            })
            .collect();
        q.append(&batch).unwrap();
        if n.is_multiple_of(50_000) {
            q.sync().unwrap();
        }
    }
    q.sync().unwrap();
    (q.len(), q.bytes(), started.elapsed().as_secs_f64())
}

/// What one case measured.
struct Case {
    name: &'static str,
    queued_before: u64,
    readings: u64,
    cpu_s: f64,
    p50: Duration,
    p99: Duration,
    queue_after: serde_json::Value,
}

impl Case {
    fn cpu_us_per_reading(&self) -> f64 {
        self.cpu_s * 1e6 / self.readings.max(1) as f64
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_case(
    name: &'static str,
    tmp: &Path,
    state: &Path,
    pki_dir: &Path,
    closed_port: u16,
    components: &Path,
    max_bytes: u64,
    queued_before: u64,
) -> Case {
    let mut cfg = wardgate::config::Config::default();
    cfg.gateway.state_dir = state.to_path_buf();
    cfg.gateway.shutdown_timeout = Duration::from_secs(30);
    cfg.listeners.plain.address = "127.0.0.1:0".parse().unwrap();
    cfg.broker.address = "127.0.0.1:0".parse().unwrap();
    cfg.http.address = "127.0.0.1:0".parse().unwrap();
    cfg.plugins.dir = components.to_path_buf();
    real::bench_gateway(&mut cfg, closed_port, pki_dir);
    cfg.queue.max_bytes = max_bytes;
    cfg.metering.status_interval = Duration::from_secs(1);
    cfg.devices = registry();
    let name_of = state.file_name().unwrap().to_string_lossy().into_owned();
    let gw = real::start(&cfg, tmp, &name_of, Duration::from_secs(600));
    let (pid, addr) = (gw.pid, gw.addr);

    let running = Arc::new(AtomicBool::new(true));
    let measuring = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let id = format!("pm-{i:03}");
        let mut o = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
        o.set_credentials(id.clone(), "pw");
        o.set_inflight(100);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 200);
        let (lat, acked, measuring) = (latencies.clone(), acked.clone(), measuring.clone());
        let poller = tokio::spawn(async move {
            let mut sent: HashMap<u16, (Instant, bool)> = HashMap::new();
            let mut mine = Vec::new();
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        sent.insert(pkid, (Instant::now(), measuring.load(Ordering::Relaxed)));
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        if let Some((t, true)) = sent.remove(&a.pkid) {
                            mine.push(t.elapsed());
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            lat.lock().unwrap().extend(mine);
        });
        let go = running.clone();
        let publisher = tokio::spawn(async move {
            let topic = format!("ward/{id}/telemetry");
            // Devices start spread over one period, as a ward's devices are.
            tokio::time::sleep(Duration::from_millis(
                1000 / RATE * i as u64 / DEVICES as u64,
            ))
            .await;
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut k = 0u64;
            while go.load(Ordering::Relaxed) {
                tick.tick().await;
                let payload = format!(
                    r#"{{"heartbeat":{},"ts":{},"battery_pct":87,"mode":"DDD"}}"#,
                    60 + k % 60,
                    wardgate::clock::now_ms()
                );
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                k += 1;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let _ = client.disconnect().await;
        });
        tasks.push((publisher, poller));
    }
    tokio::time::sleep(WARMUP).await;
    let ticks = clock_ticks();
    let (cpu0, acked0) = (cpu_seconds(pid, ticks), acked.load(Ordering::Relaxed));
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(RUN).await;
    let (cpu1, acked1) = (cpu_seconds(pid, ticks), acked.load(Ordering::Relaxed));
    measuring.store(false, Ordering::Relaxed);
    running.store(false, Ordering::Relaxed);
    for (p, q) in tasks {
        let _ = p.await;
        let _ = tokio::time::timeout(Duration::from_secs(10), q).await;
    }
    // Let the status file catch up, then read the queue's view of the run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let queue_after = std::fs::read(state.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .map(|s| s["queue"].clone())
        .unwrap_or_default();
    gw.stop();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Case {
        name,
        queued_before,
        readings: acked1 - acked0,
        cpu_s: cpu1 - cpu0,
        p50: pct(0.5),
        p99: pct(0.99),
        queue_after,
    }
}

async fn run() {
    let components: PathBuf = std::env::var("WARDGATE_COMPONENTS")
        .unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target/components").into()
        })
        .into();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pki");
    pki(&p, &["init", "Bench upstream CA"]);
    pki(&p, &["device", "bench-gateway"]);
    // A port nobody listens on: the upstream is down for the whole run.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cases = Vec::new();
    let empty = tmp.path().join("state-empty");
    cases.push(
        run_case(
            "empty queue",
            tmp.path(),
            &empty,
            &p,
            closed_port,
            &components,
            ROOMY_BOUND,
            0,
        )
        .await,
    );
    let _ = std::fs::remove_dir_all(&empty);
    let full = tmp.path().join("state-backlog");
    let (records, bytes, secs) = prefill(&full.join("queue"), BACKLOG_BYTES);
    println!(
        "outage: backlog written before start: {records} readings, {:.0} MiB as stored, in {secs:.0} s",
        bytes as f64 / (1 << 20) as f64
    );
    cases.push(
        run_case(
            "256 MiB queued",
            tmp.path(),
            &full,
            &p,
            closed_port,
            &components,
            ROOMY_BOUND,
            bytes,
        )
        .await,
    );
    // The same backlog, now exactly at the bound: every commit evicts as much as it appends.
    let at = {
        let (q, _) = SledStore::open(&full.join("queue"), 16 << 20).unwrap();
        q.bytes()
    };
    cases.push(
        run_case(
            "256 MiB queued at queue.max_bytes (evicting)",
            tmp.path(),
            &full,
            &p,
            closed_port,
            &components,
            at,
            at,
        )
        .await,
    );
    let mut report = Vec::new();
    for c in &cases {
        println!(
            "outage: {:<46} {DEVICES} devices x {RATE}/s for {RUN:?}: {} readings acknowledged, CPU {:.1} us/reading ({:.0} % of a core), PUBACK p50 {:.1} ms, p99 {:.1} ms; queue after: {} records, {} MiB, evicted {}",
            c.name,
            c.readings,
            c.cpu_us_per_reading(),
            c.cpu_s / RUN.as_secs_f64() * 100.0,
            c.p50.as_secs_f64() * 1e3,
            c.p99.as_secs_f64() * 1e3,
            c.queue_after["depth"],
            c.queue_after["bytes"].as_u64().unwrap_or(0) >> 20,
            c.queue_after["evicted_over_bytes"],
        );
        report.push(serde_json::json!({
            "case": c.name,
            "devices": DEVICES,
            "readings_per_second_per_device": RATE,
            "seconds": RUN.as_secs_f64(),
            "queued_bytes_before": c.queued_before,
            "readings_acknowledged": c.readings,
            "cpu_seconds": c.cpu_s,
            "cpu_us_per_reading": c.cpu_us_per_reading(),
            "puback_p50_ms": c.p50.as_secs_f64() * 1e3,
            "puback_p99_ms": c.p99.as_secs_f64() * 1e3,
            "queue_after": c.queue_after,
        }));
    }
    real::write_report("outage", &serde_json::Value::Array(report));
}
