//! Benchmark: the same device load through three relays, side by side in one run, on this
//! machine: (a) `wardgate run` (release binary, its plugins, upstream enabled with IoT Core's
//! quotas: gatekeeper → plugin → durable sled queue → uplink) to an upstream mosquitto with
//! mutual TLS; (b) a local mosquitto with persistence (`autosave_interval 1`) and a QoS 1 bridge
//! to the same upstream; (c) one bare mosquitto, the devices publishing to it and the cloud
//! subscribing to it directly (over mutual TLS too): the ceiling of a relay on this box.
//! Certificates come from `packaging/pki/ward-pki`; the upstream, the bridge's configuration and
//! the gateway's come from `real`.
//!
//! Processes. This program is the driver: it starts each relay fresh for each scenario, holds
//! the "cloud" subscriber (in the driver's process, on its tokio runtime) and reads the relay's
//! `/proc/<pid>`. The devices are a separate process, the load generator: this same executable
//! re-run (`std::env::current_exe()`) with `COMPARE_ROLE=loadgen` and the arguments
//! `<scenario> <address>`; it prints its results as one JSON line on stdout (the counters each
//! device had acknowledged, rates, PUBACK latency, the storm's timings, its own CPU time).
//!
//! Devices publish ~100-byte pacemaker payloads at QoS 1 carrying their send time (`ts`, ms
//! since the epoch, read at run time) and a per-device counter in the heart rate
//! (`load::heart_rate`: the pacemaker plugin keeps the heart rate and the time, not unknown
//! fields), so the cloud side counts every (device, counter) from the gateway's expanded batches
//! or the relayed messages. A device keeps what is not acknowledged and sends it again, first,
//! after a broken connection (a fresh session), as a real device does.
//!
//! Scenarios:
//! 1. `flat-out`: 50 devices × 2 000 readings, each as fast as PUBACKs allow (100 in flight).
//! 2. `steady`: 500 devices × 2 readings/s (1 000/s) for 60 s.
//! 3. `storm`: 500 devices at 2 readings/s; after 10 s all drop their TCP connections at once
//!    (the event loop dropped, no DISCONNECT) and, once all have, reconnect at once; the time
//!    until every one has its CONNACK and its first PUBACK after it; 10 s more, then stop.
//!
//! Figures per relay and scenario: readings/s acknowledged to the devices (acknowledged / time
//! from the start to the last PUBACK), readings/s delivered upstream (distinct readings / time
//! from the start to the last first arrival), device → upstream latency p50 / p99 / max (cloud
//! arrival − `ts`, first arrival of each reading), LOST (acknowledged, not delivered once the
//! drain ends: everything acknowledged is in, or nothing came for 10 s, or 180 s) and
//! duplicated, the relay's CPU seconds (utime + stime of the gateway, or of the one relaying
//! mosquitto: never the upstream mosquitto nor the load generator, whose own CPU is reported
//! apart, nor the driver), its peak RSS (VmHWM, reset with `clear_refs` 5 once the relay is
//! ready). Within one IoT Core connection's quotas (100 publishes/s, 512 KiB/s): for wardgate,
//! `min(100 × readings per publish, 512 KiB / bytes per reading)` from the batches the cloud
//! received in `flat-out` (computed), next to the drain rate measured in that scenario (the
//! uplink paces itself to those quotas); a bridge sends one reading per publish, so ≤ 100/s.
//!
//! Targets for wardgate, printed PASS / MISS: p99 ≤ 20 ms in `steady`; `flat-out` acknowledged
//! rate ≥ 1.0× the bridge's; zero loss in every run; peak RSS ≤ 15 MiB + 10 KiB per connected
//! device.
//!
//! `COMPARE_REPEAT=N` rounds (default 2: a round takes ~5 min on the 2-core machine), medians
//! quoted; a round is not started when it would end past `COMPARE_BUDGET_S` (default 840 s)
//! from the start. `COMPARE_SCENARIOS` / `COMPARE_RELAYS` (comma-separated: `flat-out,steady,
//! storm` / `wardgate,bridge,bare`) run a subset. Run with `cargo xtask bench --compare` (or
//! `cargo bench -p wardgate --bench compare`); writes `target/bench/compare.json` and prints a
//! Markdown table for the README.
//!
//! What must stay true: everything binds 127.0.0.1 only; no fixed sleep waits for an event (a
//! relay is ready at READY=1 / its port accepting / a probe relayed to the cloud, the cloud at
//! SUBACK, devices at CONNACK); the only fixed waits are the scenarios' own durations and
//! pacing; the load generator runs in its own process; every relay is started fresh per run.

mod load;
mod real;

use load::{counter_of, heart_rate, Pending};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, Semaphore};

const READINGS_TOPIC: &str = "wardgate/bench-gateway/readings";
/// Registered in the gateway in every scenario (the most any scenario connects).
const REGISTERED: usize = 500;
const FLAT_DEVICES: usize = 50;
const FLAT_READINGS: u64 = 2_000;
const FLAT_WINDOW: usize = 100;
const PACED_DEVICES: usize = 500;
const PACED_RATE: f64 = 2.0;
const PACED_WINDOW: usize = 10;
const STEADY_RUN: Duration = Duration::from_secs(60);
const STORM_BEFORE: Duration = Duration::from_secs(10);
const STORM_AFTER: Duration = Duration::from_secs(10);
/// The longest a drain may take once the load generator is done; and the longest without a
/// delivery before the drain is over.
const DRAIN_LIMIT: Duration = Duration::from_secs(180);
const DRAIN_IDLE: Duration = Duration::from_secs(10);
/// IoT Core's quotas per connection.
const QUOTA_PUBLISHES: f64 = 100.0;
const QUOTA_BYTES: f64 = 512.0 * 1024.0;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Scenario {
    FlatOut,
    Steady,
    Storm,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::FlatOut, Scenario::Steady, Scenario::Storm];

    fn name(self) -> &'static str {
        match self {
            Scenario::FlatOut => "flat-out",
            Scenario::Steady => "steady",
            Scenario::Storm => "storm",
        }
    }

    fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    fn devices(self) -> usize {
        match self {
            Scenario::FlatOut => FLAT_DEVICES,
            _ => PACED_DEVICES,
        }
    }

    fn window(self) -> usize {
        match self {
            Scenario::FlatOut => FLAT_WINDOW,
            _ => PACED_WINDOW,
        }
    }

    /// Readings per second per device, when paced.
    fn rate(self) -> Option<f64> {
        match self {
            Scenario::FlatOut => None,
            _ => Some(PACED_RATE),
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scenario::FlatOut => "flat out: 50 devices × 2 000 readings, 100 in flight each",
            Scenario::Steady => "steady: 500 devices × 2 readings/s (1 000/s) for 60 s",
            Scenario::Storm => "reconnect storm: 500 devices × 2/s, all drop and reconnect at once",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Relay {
    Wardgate,
    Bridge,
    Bare,
}

impl Relay {
    const ALL: [Relay; 3] = [Relay::Wardgate, Relay::Bridge, Relay::Bare];

    fn name(self) -> &'static str {
        match self {
            Relay::Wardgate => "wardgate",
            Relay::Bridge => "bridge",
            Relay::Bare => "bare",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Relay::Wardgate => "wardgate",
            Relay::Bridge => "mosquitto bridge",
            Relay::Bare => "bare mosquitto",
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var("COMPARE_ROLE").is_ok_and(|r| r == "loadgen") {
        loadgen(&args);
        return;
    }
    drive();
}

fn now_ms() -> i64 {
    wardgate::clock::now_ms()
}

/// The names in `var` (comma-separated) that `parse` knows, or all of `all`.
fn chosen<T: Copy>(var: &str, all: &[T], name: impl Fn(T) -> &'static str) -> Vec<T> {
    match std::env::var(var) {
        Ok(list) if !list.trim().is_empty() => {
            let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &wanted {
                assert!(all.iter().any(|x| name(*x) == *w), "{var}: unknown `{w}`");
            }
            all.iter()
                .copied()
                .filter(|x| wanted.contains(&name(*x)))
                .collect()
        }
        _ => all.to_vec(),
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator (its own process).

/// What the devices of one load-generator run share.
struct Shared {
    scenario: Scenario,
    addr: SocketAddr,
    /// True once every device is connected: publishing starts.
    go: watch::Receiver<bool>,
    /// No new readings from now on (what is pending is still sent).
    stop: AtomicBool,
    /// The storm: 0 before, 1 drop the connection, 2 connect again.
    phase: watch::Receiver<u8>,
    /// When phase 2 began.
    storm_at: Mutex<Option<Instant>>,
    /// A permit per device: first connected; dropped (storm); back, i.e. first PUBACK after
    /// the storm's reconnect.
    connected: Semaphore,
    dropped: Semaphore,
    back: Semaphore,
    /// CONNACKs refusing the device, and other connection failures.
    refused: AtomicU64,
    errors: AtomicU64,
}

/// What one device did.
#[derive(Default)]
struct DeviceLog {
    sent: u64,
    acked: Vec<u64>,
    puback_us: Vec<u32>,
    connections: u64,
    last_ack: Option<Instant>,
    storm_connack: Option<Duration>,
    storm_back: Option<Duration>,
}

fn loadgen(args: &[String]) {
    let scenario = args
        .first()
        .and_then(|s| Scenario::parse(s))
        .expect("loadgen: <scenario> <address>");
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .expect("loadgen: <scenario> <address>");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut out = rt.block_on(generate(scenario, addr));
    drop(rt);
    out["cpu_s"] = json!(real::cpu_seconds(std::process::id()));
    println!("{out}");
}

async fn generate(scenario: Scenario, addr: SocketAddr) -> Value {
    let n = scenario.devices();
    let (go_tx, go) = watch::channel(false);
    let (phase_tx, phase) = watch::channel(0u8);
    let sh = Arc::new(Shared {
        scenario,
        addr,
        go,
        stop: AtomicBool::new(false),
        phase,
        storm_at: Mutex::new(None),
        connected: Semaphore::new(0),
        dropped: Semaphore::new(0),
        back: Semaphore::new(0),
        refused: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let logs: Vec<_> = (0..n)
        .map(|_| Arc::new(Mutex::new(DeviceLog::default())))
        .collect();
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(device(i, sh.clone(), logs[i].clone())))
        .collect();
    let connect_started = Instant::now();
    let all_connected = tokio::time::timeout(
        Duration::from_secs(120),
        sh.connected.acquire_many(n as u32),
    )
    .await
    .is_ok();
    let connect_s = connect_started.elapsed().as_secs_f64();
    let start = Instant::now();
    let start_ms = now_ms();
    let _ = go_tx.send(true);
    let mut storm = Value::Null;
    match scenario {
        // The devices stop by themselves after their readings.
        Scenario::FlatOut => {}
        Scenario::Steady => {
            // The scenario's length, not a wait for an event.
            tokio::time::sleep(STEADY_RUN).await;
            sh.stop.store(true, Ordering::SeqCst);
        }
        Scenario::Storm => {
            tokio::time::sleep(STORM_BEFORE).await;
            let _ = phase_tx.send(1);
            let all_dropped =
                tokio::time::timeout(Duration::from_secs(30), sh.dropped.acquire_many(n as u32))
                    .await
                    .is_ok();
            let refused_before = sh.refused.load(Ordering::SeqCst);
            let overflows_before = listen_overflows();
            let at = Instant::now();
            *sh.storm_at.lock().unwrap() = Some(at);
            let _ = phase_tx.send(2);
            let all_back =
                tokio::time::timeout(Duration::from_secs(60), sh.back.acquire_many(n as u32))
                    .await
                    .is_ok();
            let back_waited = at.elapsed();
            let overflows = listen_overflows().saturating_sub(overflows_before);
            tokio::time::sleep(STORM_AFTER).await;
            sh.stop.store(true, Ordering::SeqCst);
            let mut connack: Vec<f64> = Vec::new();
            let mut back: Vec<f64> = Vec::new();
            for l in &logs {
                let l = l.lock().unwrap();
                connack.extend(l.storm_connack.map(|d| d.as_secs_f64()));
                back.extend(l.storm_back.map(|d| d.as_secs_f64()));
            }
            connack.sort_by(f64::total_cmp);
            back.sort_by(f64::total_cmp);
            storm = json!({
                "all_dropped": all_dropped,
                "all_back": all_back,
                "connack_count": connack.len(),
                "back_count": back.len(),
                "connack_p50_s": pct_f(&connack, 0.5),
                "connack_all_s": connack.last(),
                "back_p50_s": pct_f(&back, 0.5),
                "back_all_s": if all_back { back.last().copied() } else { Some(back_waited.as_secs_f64()) },
                "refused": sh.refused.load(Ordering::SeqCst) - refused_before,
                "listen_overflows": overflows,
            });
        }
    }
    // Everything sent acknowledged (the flat-out run ends here), 120 s at most.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut unfinished = 0;
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
            unfinished += 1;
        }
    }
    let mut acked_total = 0u64;
    let mut sent_total = 0u64;
    let mut connections = 0u64;
    let mut last_ack = start;
    let mut puback: Vec<u32> = Vec::new();
    let mut ranges = serde_json::Map::new();
    for (i, l) in logs.iter().enumerate() {
        let mut l = l.lock().unwrap();
        sent_total += l.sent;
        connections += l.connections;
        last_ack = last_ack.max(l.last_ack.unwrap_or(start));
        puback.extend_from_slice(&l.puback_us);
        l.acked.sort_unstable();
        l.acked.dedup();
        acked_total += l.acked.len() as u64;
        ranges.insert(format!("pm-{i:03}"), json!(to_ranges(&l.acked)));
    }
    puback.sort_unstable();
    let elapsed = last_ack.duration_since(start).as_secs_f64();
    json!({
        "scenario": scenario.name(),
        "devices": n,
        "all_connected": all_connected,
        "connect_s": connect_s,
        "start_ms": start_ms,
        "sent": sent_total,
        "acked": acked_total,
        "ack_seconds": elapsed,
        "acked_per_second": if elapsed > 0.0 { acked_total as f64 / elapsed } else { 0.0 },
        "puback_p50_ms": pct_u(&puback, 0.5) as f64 / 1e3,
        "puback_p99_ms": pct_u(&puback, 0.99) as f64 / 1e3,
        "connections": connections,
        "refused": sh.refused.load(Ordering::SeqCst),
        "errors": sh.errors.load(Ordering::SeqCst),
        "unfinished_devices": unfinished,
        "storm": storm,
        "acked_ranges": ranges,
    })
}

/// The machine's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`): a dropped SYN is sent again after 1 s.
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Sorted, distinct counters as inclusive ranges `[first, last]`.
fn to_ranges(sorted: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &k in sorted {
        match out.last_mut() {
            Some(r) if r[1] + 1 == k => r[1] = k,
            _ => out.push([k, k]),
        }
    }
    out
}

fn pct_u(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn pct_f(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)])
}

fn pct_i(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)])
}

/// One device: connects (again after a refusal or a broken connection, 100–300 ms later),
/// publishes its readings (see [`publisher`]); one task polls its event loop and is the only
/// one, a second publishes. In the storm it drops its connection on phase 1 and connects again
/// on phase 2.
async fn device(i: usize, sh: Arc<Shared>, log: Arc<Mutex<DeviceLog>>) {
    let id = format!("pm-{i:03}");
    let pending = Arc::new(Mutex::new(Pending::default()));
    let wake = Arc::new(Notify::new());
    let mut phase = sh.phase.clone();
    let window = sh.scenario.window();
    let (mut first, mut dropped, mut back) = (true, false, false);
    loop {
        if *phase.borrow_and_update() == 1 && !dropped {
            dropped = true;
            sh.dropped.add_permits(1);
            let _ = phase.wait_for(|p| *p == 2).await;
        }
        let mut o = MqttOptions::new(id.clone(), sh.addr.ip().to_string(), sh.addr.port());
        o.set_credentials(id.clone(), "pw");
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_inflight(window as u16);
        let (client, mut el) = AsyncClient::new(o, window * 2);
        let connected = match tokio::time::timeout(Duration::from_secs(30), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => true,
            Ok(Err(rumqttc::ConnectionError::ConnectionRefused(_))) => {
                sh.refused.fetch_add(1, Ordering::SeqCst);
                false
            }
            _ => {
                sh.errors.fetch_add(1, Ordering::SeqCst);
                false
            }
        };
        if !connected {
            tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 200)).await;
            continue;
        }
        let storm_at = *sh.storm_at.lock().unwrap();
        {
            let mut l = log.lock().unwrap();
            l.connections += 1;
            if dropped && l.storm_connack.is_none() {
                l.storm_connack = storm_at.map(|t| t.elapsed());
            }
        }
        if first {
            sh.connected.add_permits(1);
        }
        let publisher = tokio::spawn(publisher(
            client,
            sh.clone(),
            id.clone(),
            pending.clone(),
            wake.clone(),
            log.clone(),
            first,
        ));
        first = false;
        let mut sent_at: HashMap<u16, Instant> = HashMap::new();
        let mut watching = true;
        loop {
            let ev = tokio::select! {
                changed = phase.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                    } else if *phase.borrow_and_update() == 1 && !dropped {
                        // The storm: drop the connection (the event loop and its socket go).
                        break;
                    }
                    continue;
                }
                ev = el.poll() => ev,
            };
            match ev {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut p = pending.lock().unwrap();
                    if let Some(k) = p.requested.pop_front() {
                        p.inflight.insert(pkid, k);
                        sent_at.insert(pkid, Instant::now());
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let k = pending.lock().unwrap().inflight.remove(&a.pkid);
                    if let Some(k) = k {
                        let now = Instant::now();
                        let mut l = log.lock().unwrap();
                        l.acked.push(k);
                        l.last_ack = Some(now);
                        if let Some(t) = sent_at.remove(&a.pkid) {
                            l.puback_us.push(
                                now.duration_since(t).as_micros().min(u32::MAX as u128) as u32,
                            );
                        }
                        if dropped && !back {
                            back = true;
                            l.storm_back = storm_at.map(|t| t.elapsed());
                            sh.back.add_permits(1);
                        }
                        drop(l);
                        wake.notify_one();
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let _ = publisher.await;
                    return;
                }
                Ok(_) => {}
                Err(_) => {
                    sh.errors.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        }
        publisher.abort();
        let _ = publisher.await;
        drop(el);
        pending.lock().unwrap().broken();
        if *phase.borrow() != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Publishes a device's readings on one connection: what is to be sent again first, then new
/// ones, with at most the scenario's window requested or in flight; paced at the scenario's
/// rate (one per tick, a random phase on the first connection), or flat out (as many as the
/// window allows, again on each PUBACK). Ends with a DISCONNECT once told to stop (or, flat
/// out, all readings issued) and everything is acknowledged.
async fn publisher(
    client: AsyncClient,
    sh: Arc<Shared>,
    id: String,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    log: Arc<Mutex<DeviceLog>>,
    first: bool,
) {
    let mut go = sh.go.clone();
    let _ = go.wait_for(|g| *g).await;
    let window = sh.scenario.window();
    let topic = format!("ward/{id}/telemetry");
    let mut tick = match sh.scenario.rate() {
        Some(rate) => {
            let period = Duration::from_secs_f64(1.0 / rate);
            if first {
                tokio::time::sleep(period.mul_f64(rand::random::<f64>())).await;
            }
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            Some(t)
        }
        None => None,
    };
    loop {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        {
            let mut p = pending.lock().unwrap();
            let stopping =
                sh.stop.load(Ordering::SeqCst) || (tick.is_none() && p.next >= FLAT_READINGS);
            if stopping && p.empty() {
                let _ = client.try_disconnect();
                return;
            }
            let budget = if tick.is_some() { 1 } else { window };
            for _ in 0..budget {
                if p.requested.len() + p.inflight.len() >= window {
                    break;
                }
                let k = match p.resend.pop_front() {
                    Some(k) => k,
                    // Flat out, no counter past the device's readings.
                    None if !stopping && (tick.is_some() || p.next < FLAT_READINGS) => {
                        p.next += 1;
                        p.next - 1
                    }
                    None => break,
                };
                let payload = format!(
                    r#"{{"heartbeat":{:.6},"ts":{},"battery_pct":87,"mode":"DDD","lead_impedance_ohm":512}}"#,
                    heart_rate(k),
                    now_ms()
                );
                // Under the lock: the request's place in `requested` is its place on the wire.
                if client
                    .try_publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                    .is_ok()
                {
                    p.requested.push_back(k);
                } else {
                    p.resend.push_front(k);
                    break;
                }
            }
            log.lock().unwrap().sent = p.next;
        }
        if tick.is_none() {
            wake.notified().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// What the cloud subscriber saw in one run.
#[derive(Default)]
struct CloudState {
    /// (device index, counter) → times received.
    seen: HashMap<(u32, u64), u32>,
    /// device → upstream latency of each reading's first arrival, ms.
    latencies: Vec<i64>,
    /// Messages, their payload bytes, the readings in them (duplicates included).
    publishes: u64,
    bytes: u64,
    readings: u64,
    most_per_publish: u64,
    /// Wall-clock ms of the last first arrival, and of the last message.
    last_new_ms: i64,
    last_ms: i64,
}

struct Cloud {
    state: Arc<Mutex<CloudState>>,
    probe: Arc<Notify>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Cloud {
    /// Subscribe as `id` at the TLS listener 127.0.0.1:`port` (certificate `bench-cloud`) to
    /// `topic`; `batch`: the messages are gateway batches. Returns at SUBACK.
    async fn subscribe(id: &str, port: u16, pki: &Path, topic: &str, batch: bool) -> Cloud {
        let o = real::cloud_options(id, port, pki);
        let state = Arc::new(Mutex::new(CloudState::default()));
        let probe = Arc::new(Notify::new());
        let (s, pr) = (state.clone(), probe.clone());
        let (client, task) = real::subscriber(o, topic, move |p| {
            let now = now_ms();
            let got = load::readings_in(batch, &p.topic, &p.payload);
            if got.first().is_some_and(|r| r.device == "probe") {
                pr.notify_one();
                return;
            }
            let mut st = s.lock().unwrap();
            st.publishes += 1;
            st.bytes += p.payload.len() as u64;
            st.readings += got.len() as u64;
            st.most_per_publish = st.most_per_publish.max(got.len() as u64);
            st.last_ms = now;
            for r in got {
                let (Some(dev), Some(hr)) = (
                    r.device.strip_prefix("pm-").and_then(|d| d.parse().ok()),
                    r.heart_rate,
                ) else {
                    continue;
                };
                let n = st.seen.entry((dev, counter_of(hr))).or_default();
                *n += 1;
                if *n == 1 {
                    st.last_new_ms = now;
                    if let Some(ts) = r.ts {
                        st.latencies.push(now - ts);
                    }
                }
            }
        })
        .await;
        Cloud {
            state,
            probe,
            client,
            task,
        }
    }

    /// DISCONNECT, and the event loop ends once it is sent (5 s at most).
    async fn close(self) {
        let _ = self.client.disconnect().await;
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    fn idle_ms(&self) -> i64 {
        let last = self.state.lock().unwrap().last_ms;
        if last == 0 {
            i64::MAX
        } else {
            now_ms() - last
        }
    }
}

/// A relay under test, running.
enum Proc {
    Gateway(real::Running),
    Mosquitto(real::Mosquitto),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Gateway(g) => g.pid,
            Proc::Mosquitto(m) => m.pid(),
        }
    }

    /// Stop it; a problem to report if it did not exit cleanly.
    fn stop(self) -> Option<String> {
        match self {
            Proc::Gateway(g) => {
                let (status, lines) = g.terminate();
                (!status.success())
                    .then(|| format!("wardgate exited with {status} ({lines} log lines)"))
            }
            Proc::Mosquitto(mut m) => {
                m.stop();
                None
            }
        }
    }
}

/// The fixed parts: certificates, the upstream, the plugins.
struct Rig {
    tmp: tempfile::TempDir,
    pki: PathBuf,
    up_port: u16,
    components: PathBuf,
    runs: u32,
}

fn drive() {
    let started = Instant::now();
    let repeat: u32 = std::env::var("COMPARE_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2)
        .max(1);
    let budget = Duration::from_secs(
        std::env::var("COMPARE_BUDGET_S")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(840),
    );
    let scenarios = chosen("COMPARE_SCENARIOS", &Scenario::ALL, Scenario::name);
    let relays = chosen("COMPARE_RELAYS", &Relay::ALL, Relay::name);
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    real::upstream_pki(
        &pki,
        "Compare upstream CA",
        &["bench-gateway", "bench-bridge", "bench-cloud"],
    );
    let up_port = real::free_port();
    let mut upstream = real::Mosquitto::with_conf(
        &tmp.path().join("upstream.conf"),
        &real::upstream_conf(up_port, &pki),
        up_port,
    );
    let mut rig = Rig {
        tmp,
        pki,
        up_port,
        components: real::components_dir(),
        runs: 0,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // results[relay][scenario]: one JSON object per round.
    let mut results: HashMap<(Relay, Scenario), Vec<Value>> = HashMap::new();
    let mut rounds = 0;
    let mut last_round = Duration::ZERO;
    for round in 0..repeat {
        if round > 0 && started.elapsed() + last_round > budget {
            println!(
                "compare: round {} of {repeat} skipped: it would end past the {} s budget",
                round + 1,
                budget.as_secs()
            );
            break;
        }
        let round_started = Instant::now();
        for &scenario in &scenarios {
            // Relays in a rotating order, so a disturbance of the machine does not always hit
            // the same one first.
            for k in 0..relays.len() {
                let relay = relays[(k + round as usize) % relays.len()];
                let r = rt.block_on(run_one(&mut rig, relay, scenario));
                println!("{}", summary_line(relay, scenario, round, &r));
                results.entry((relay, scenario)).or_default().push(r);
            }
        }
        rounds += 1;
        last_round = round_started.elapsed();
    }
    drop(rt);
    upstream.stop();
    let seconds = started.elapsed().as_secs_f64();
    let (table, figures) = table(&results, &scenarios, &relays, rounds);
    let mut runs = serde_json::Map::new();
    for ((relay, scenario), v) in &results {
        runs.insert(
            format!("{}_{}", relay.name(), scenario.name()),
            Value::Array(v.clone()),
        );
    }
    real::write_report(
        "compare",
        &json!({
            "rounds": rounds,
            "seconds": seconds,
            "medians": figures,
            "runs": runs,
            "markdown": table,
        }),
    );
    println!("\ncompare: {rounds} round(s) in {seconds:.0} s; target/bench/compare.json\n");
    println!("{table}");
}

/// One relay, fresh, through one scenario: the figures as JSON.
async fn run_one(rig: &mut Rig, relay: Relay, scenario: Scenario) -> Value {
    rig.runs += 1;
    let dir = rig.tmp.path().join(format!("run-{}", rig.runs));
    std::fs::create_dir_all(&dir).unwrap();
    let cloud_id = format!("compare-cloud-{}", rig.runs);
    let mut problems: Vec<String> = Vec::new();
    let (proc, addr, cloud) = match relay {
        Relay::Wardgate => {
            let cloud =
                Cloud::subscribe(&cloud_id, rig.up_port, &rig.pki, READINGS_TOPIC, true).await;
            let cfg = real::spine_gateway(
                &dir.join("state"),
                rig.components.clone(),
                rig.up_port,
                &rig.pki,
                REGISTERED,
            );
            let d = dir.clone();
            let gw = tokio::task::spawn_blocking(move || {
                real::start(&cfg, &d, "wardgate", Duration::from_secs(60))
            })
            .await
            .unwrap();
            let addr = gw.addr;
            (Proc::Gateway(gw), addr, cloud)
        }
        Relay::Bridge => {
            let port = real::free_port();
            let db = dir.join("db");
            std::fs::create_dir_all(&db).unwrap();
            let conf = real::bridge_conf(port, rig.up_port, &rig.pki, &db);
            let path = dir.join("bridge.conf");
            let mq =
                tokio::task::spawn_blocking(move || real::Mosquitto::with_conf(&path, &conf, port))
                    .await
                    .unwrap();
            let cloud =
                Cloud::subscribe(&cloud_id, rig.up_port, &rig.pki, "ward/+/telemetry", false).await;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // The bridge is up once a message sent to it reaches the cloud.
            if !probe(addr, &cloud).await {
                problems.push("the bridge relayed no probe within 30 s".into());
            }
            (Proc::Mosquitto(mq), addr, cloud)
        }
        Relay::Bare => {
            let (port, cloud_port) = (real::free_port(), real::free_port());
            let conf = format!(
                "user root\nper_listener_settings true\nmax_inflight_messages 100\nmax_queued_messages 1000000\n\
                 listener {port} 127.0.0.1\nallow_anonymous true\n\
                 listener {cloud_port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/server.crt\nkeyfile {p}/server.key\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
                p = rig.pki.display()
            );
            let path = dir.join("bare.conf");
            let mq = tokio::task::spawn_blocking(move || {
                let m = real::Mosquitto::with_conf(&path, &conf, port);
                real::wait_port(cloud_port, Duration::from_secs(20));
                m
            })
            .await
            .unwrap();
            let cloud =
                Cloud::subscribe(&cloud_id, cloud_port, &rig.pki, "ward/+/telemetry", false).await;
            (
                Proc::Mosquitto(mq),
                SocketAddr::from(([127, 0, 0, 1], port)),
                cloud,
            )
        }
    };
    let pid = proc.pid();
    real::reset_peak(pid);
    let cpu0 = real::cpu_seconds(pid);
    let driver0 = real::cpu_seconds(std::process::id());

    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env("COMPARE_ROLE", "loadgen")
        .arg(scenario.name())
        .arg(addr.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the load generator");
    let lg: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            problems.push(format!("the load generator failed ({})", out.status));
            json!({})
        });
    let mut acked: HashSet<(u32, u64)> = HashSet::new();
    if let Some(ranges) = lg["acked_ranges"].as_object() {
        for (d, rs) in ranges {
            let dev: u32 = d.trim_start_matches("pm-").parse().unwrap_or(u32::MAX);
            for r in rs.as_array().into_iter().flatten() {
                let (a, b) = (r[0].as_u64().unwrap_or(0), r[1].as_u64().unwrap_or(0));
                acked.extend((a..=b).map(|k| (dev, k)));
            }
        }
    }

    // The drain: until everything acknowledged is in, or nothing came for DRAIN_IDLE, or
    // DRAIN_LIMIT.
    let drain_started = Instant::now();
    loop {
        let missing = {
            let st = cloud.state.lock().unwrap();
            acked.iter().filter(|k| !st.seen.contains_key(k)).count()
        };
        if missing == 0
            || drain_started.elapsed() > DRAIN_LIMIT
            || cloud.idle_ms() > DRAIN_IDLE.as_millis() as i64
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Late duplicates: until the cloud has heard nothing for 1 s (10 s at most).
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle && cloud.idle_ms() < 1_000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    let relay_cpu = real::cpu_seconds(pid) - cpu0;
    let driver_cpu = real::cpu_seconds(std::process::id()) - driver0;
    let (_, peak_kib) = real::rss_kib(pid);
    problems.extend(proc.stop());
    let st = std::mem::take(&mut *cloud.state.lock().unwrap());
    cloud.close().await;

    let start_ms = lg["start_ms"].as_i64().unwrap_or(0);
    let delivered = st.seen.len() as u64;
    let lost = acked.iter().filter(|k| !st.seen.contains_key(k)).count() as u64;
    let duplicated: u64 = st.seen.values().map(|n| u64::from(n - 1)).sum();
    let unacked_delivered = st.seen.keys().filter(|k| !acked.contains(k)).count() as u64;
    let deliver_s = (st.last_new_ms - start_ms) as f64 / 1e3;
    let mut lat = st.latencies;
    lat.sort_unstable();
    let devices = scenario.devices();
    let rss_target_kib = 15 * 1024 + 10 * devices as u64;
    let mut r = json!({
        "relay": relay.name(),
        "scenario": scenario.name(),
        "devices": devices,
        "sent": lg["sent"],
        "acknowledged": acked.len(),
        "acked_per_second": lg["acked_per_second"],
        "puback_p50_ms": lg["puback_p50_ms"],
        "puback_p99_ms": lg["puback_p99_ms"],
        "delivered": delivered,
        "delivered_per_second": if deliver_s > 0.0 { delivered as f64 / deliver_s } else { 0.0 },
        "deliver_seconds": deliver_s,
        "p50_ms": pct_i(&lat, 0.5),
        "p99_ms": pct_i(&lat, 0.99),
        "max_ms": lat.last(),
        "lost": lost,
        "duplicated": duplicated,
        "delivered_unacknowledged": unacked_delivered,
        "drain_seconds": drain_s,
        "relay_cpu_s": relay_cpu,
        "loadgen_cpu_s": lg["cpu_s"],
        "driver_cpu_s": driver_cpu,
        "peak_rss_kib": peak_kib,
        "rss_target_kib": rss_target_kib,
        "publishes": st.publishes,
        "payload_bytes": st.bytes,
        "readings_received": st.readings,
        "most_readings_per_publish": st.most_per_publish,
        "connect_s": lg["connect_s"],
        "connections": lg["connections"],
        "refused": lg["refused"],
        "connection_errors": lg["errors"],
        "unfinished_devices": lg["unfinished_devices"],
        "storm": lg["storm"],
        "problems": problems,
    });
    if st.publishes > 0 && st.readings > 0 {
        let per_publish = st.readings as f64 / st.publishes as f64;
        let bytes_per_reading = st.bytes as f64 / st.readings as f64;
        r["readings_per_publish"] = json!(per_publish);
        r["bytes_per_reading"] = json!(bytes_per_reading);
        r["quota_readings_per_second"] =
            json!((QUOTA_PUBLISHES * per_publish).min(QUOTA_BYTES / bytes_per_reading));
    }
    r
}

/// Send one message through the relay at `addr` as device `probe` until the cloud has it
/// (30 s at most); whether it came.
async fn probe(addr: SocketAddr, cloud: &Cloud) -> bool {
    let o = MqttOptions::new("probe", addr.ip().to_string(), addr.port());
    let (client, mut el) = AsyncClient::new(o, 4);
    let arrived = cloud.probe.notified();
    client
        .publish("ward/probe/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let poll = async {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let ok = tokio::select! {
        _ = arrived => true,
        _ = poll => false,
        _ = tokio::time::sleep(Duration::from_secs(30)) => false,
    };
    let _ = client.try_disconnect();
    ok
}

fn summary_line(relay: Relay, scenario: Scenario, round: u32, r: &Value) -> String {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut line = format!(
        "compare [{} {:<8} round {}]: acknowledged {} ({:.0}/s), delivered {} ({:.0}/s), p50 {} / p99 {} / max {} ms, lost {}, duplicated {}, relay CPU {:.1} s, load generator CPU {:.1} s, peak RSS {:.1} MiB",
        relay.name(),
        scenario.name(),
        round + 1,
        r["acknowledged"],
        f("acked_per_second"),
        r["delivered"],
        f("delivered_per_second"),
        r["p50_ms"],
        r["p99_ms"],
        r["max_ms"],
        r["lost"],
        r["duplicated"],
        f("relay_cpu_s"),
        f("loadgen_cpu_s"),
        f("peak_rss_kib") / 1024.0,
    );
    if scenario == Scenario::Storm {
        let s = &r["storm"];
        line += &format!(
            "; storm: all CONNACK in {:.2} s (median {:.2} s), all publishing in {:.2} s (all back: {}), {} refused, {} listen-queue overflows",
            s["connack_all_s"].as_f64().unwrap_or(f64::NAN),
            s["connack_p50_s"].as_f64().unwrap_or(f64::NAN),
            s["back_all_s"].as_f64().unwrap_or(f64::NAN),
            s["all_back"],
            s["refused"],
            s["listen_overflows"]
        );
    }
    if let Some(q) = r["quota_readings_per_second"].as_f64() {
        line += &format!(
            "; {:.1} readings / {:.0} bytes per publish",
            f("readings_per_publish"),
            f("readings_per_publish") * f("bytes_per_reading"),
        );
        if relay == Relay::Wardgate {
            line += &format!(" → {q:.0} readings/s within the quotas");
        }
    }
    if let Some(p) = r["problems"].as_array().filter(|p| !p.is_empty()) {
        line += &format!(" [PROBLEMS: {p:?}]");
    }
    line
}

// ---------------------------------------------------------------------------------------------
// The summary.

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// A number with thin grouping (`84 000`), `digits` decimals.
fn num(x: Option<f64>, digits: usize) -> String {
    let Some(x) = x else {
        return "–".into();
    };
    let s = format!("{:.*}", digits, x.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(a, b)| (a, b));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i).is_multiple_of(3) {
            grouped.push(' ');
        }
        grouped.push(c);
    }
    format!(
        "{}{grouped}{}{frac}",
        if x < 0.0 { "−" } else { "" },
        if frac.is_empty() { "" } else { "." }
    )
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "**PASS**"
    } else {
        "**MISS**"
    }
}

/// One line of the table; the scenario named on its first.
fn row(
    out: &mut String,
    first: &mut bool,
    s: Scenario,
    figure: &str,
    cells: Vec<String>,
    ratio: String,
    target: String,
) {
    *out += &format!(
        "| {} | {figure} | {} | {ratio} | {target} |\n",
        if *first { s.title() } else { "" },
        cells.join(" | ")
    );
    *first = false;
}

/// The Markdown table of medians (and the medians as JSON).
fn table(
    results: &HashMap<(Relay, Scenario), Vec<Value>>,
    scenarios: &[Scenario],
    relays: &[Relay],
    rounds: u32,
) -> (String, Value) {
    let runs = |r: Relay, s: Scenario| results.get(&(r, s)).cloned().unwrap_or_default();
    let med = |r: Relay, s: Scenario, key: &str| -> Option<f64> {
        median(runs(r, s).iter().filter_map(|v| v[key].as_f64()).collect())
    };
    let storm_med = |r: Relay, key: &str| -> Option<f64> {
        median(
            runs(r, Scenario::Storm)
                .iter()
                .filter_map(|v| v["storm"][key].as_f64())
                .collect(),
        )
    };
    let total = |r: Relay, s: Scenario, key: &str| -> u64 {
        runs(r, s).iter().filter_map(|v| v[key].as_u64()).sum()
    };
    let ratio = |s: Scenario, key: &str| -> String {
        match (med(Relay::Wardgate, s, key), med(Relay::Bridge, s, key)) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        }
    };
    let mut out = String::new();
    out += &format!(
        "| scenario | figure (median of {rounds} round{}) | {} | wardgate / bridge | wardgate target |\n",
        if rounds == 1 { "" } else { "s" },
        relays.iter().map(|r| r.title()).collect::<Vec<_>>().join(" | ")
    );
    out += &format!("|---|---|{}---|---|\n", "---|".repeat(relays.len()));
    let mut figures = serde_json::Map::new();
    let wg = relays.contains(&Relay::Wardgate);
    let mut lost_all = 0u64;
    for &s in scenarios {
        let mut first = true;
        let cells = |f: &dyn Fn(Relay) -> String| relays.iter().map(|r| f(*r)).collect::<Vec<_>>();
        // Acknowledged.
        let target = if s == Scenario::FlatOut && wg {
            match (
                med(Relay::Wardgate, s, "acked_per_second"),
                med(Relay::Bridge, s, "acked_per_second"),
            ) {
                (Some(a), Some(b)) => format!("≥ 1.0× bridge: {}", pass(a >= b)),
                _ => "≥ 1.0× bridge".into(),
            }
        } else {
            String::new()
        };
        row(
            &mut out,
            &mut first,
            s,
            "readings/s acknowledged to devices",
            cells(&|r| num(med(r, s, "acked_per_second"), 0)),
            ratio(s, "acked_per_second"),
            target,
        );
        row(
            &mut out,
            &mut first,
            s,
            "readings/s delivered upstream",
            cells(&|r| num(med(r, s, "delivered_per_second"), 0)),
            ratio(s, "delivered_per_second"),
            String::new(),
        );
        let target = if s == Scenario::Steady && wg {
            match med(Relay::Wardgate, s, "p99_ms") {
                Some(p) => format!("p99 ≤ 20 ms: {}", pass(p <= 20.0)),
                None => "p99 ≤ 20 ms".into(),
            }
        } else {
            String::new()
        };
        row(
            &mut out,
            &mut first,
            s,
            "device → upstream p50 / p99 / max, ms",
            cells(&|r| {
                format!(
                    "{} / {} / {}",
                    num(med(r, s, "p50_ms"), 0),
                    num(med(r, s, "p99_ms"), 0),
                    num(med(r, s, "max_ms"), 0)
                )
            }),
            ratio(s, "p99_ms") + " (p99)",
            target,
        );
        let lost_wg = total(Relay::Wardgate, s, "lost");
        lost_all += lost_wg;
        row(
            &mut out,
            &mut first,
            s,
            &format!(
                "lost / duplicated (sum of {rounds} round{})",
                if rounds == 1 { "" } else { "s" }
            ),
            cells(&|r| format!("{} / {}", total(r, s, "lost"), total(r, s, "duplicated"))),
            String::new(),
            if wg {
                format!("zero loss: {}", pass(lost_wg == 0))
            } else {
                String::new()
            },
        );
        row(
            &mut out,
            &mut first,
            s,
            "relay CPU, s (load generator CPU, s)",
            cells(&|r| {
                format!(
                    "{} ({})",
                    num(med(r, s, "relay_cpu_s"), 1),
                    num(med(r, s, "loadgen_cpu_s"), 1)
                )
            }),
            ratio(s, "relay_cpu_s"),
            String::new(),
        );
        let rss_target = 15.0 + 10.0 * s.devices() as f64 / 1024.0;
        let target = match med(Relay::Wardgate, s, "peak_rss_kib") {
            Some(p) if wg => format!("≤ {rss_target:.1} MiB: {}", pass(p / 1024.0 <= rss_target)),
            _ => String::new(),
        };
        row(
            &mut out,
            &mut first,
            s,
            "peak RSS, MiB",
            cells(&|r| num(med(r, s, "peak_rss_kib").map(|k| k / 1024.0), 1)),
            ratio(s, "peak_rss_kib"),
            target,
        );
        if s == Scenario::Storm {
            row(
                &mut out,
                &mut first,
                s,
                "all 500 back: CONNACK / first PUBACK after it, s (listen-queue overflows)",
                cells(&|r| {
                    format!(
                        "{} / {} ({})",
                        num(storm_med(r, "connack_all_s"), 2),
                        num(storm_med(r, "back_all_s"), 2),
                        num(storm_med(r, "listen_overflows"), 0)
                    )
                }),
                String::new(),
                String::new(),
            );
        }
        let mut per = serde_json::Map::new();
        for &r in relays {
            per.insert(
                r.name().into(),
                json!({
                    "acked_per_second": med(r, s, "acked_per_second"),
                    "delivered_per_second": med(r, s, "delivered_per_second"),
                    "p50_ms": med(r, s, "p50_ms"),
                    "p99_ms": med(r, s, "p99_ms"),
                    "max_ms": med(r, s, "max_ms"),
                    "lost_total": total(r, s, "lost"),
                    "duplicated_total": total(r, s, "duplicated"),
                    "relay_cpu_s": med(r, s, "relay_cpu_s"),
                    "loadgen_cpu_s": med(r, s, "loadgen_cpu_s"),
                    "peak_rss_kib": med(r, s, "peak_rss_kib"),
                    "storm_connack_all_s": storm_med(r, "connack_all_s"),
                    "storm_back_all_s": storm_med(r, "back_all_s"),
                    "storm_listen_overflows": storm_med(r, "listen_overflows"),
                }),
            );
        }
        figures.insert(s.name().into(), Value::Object(per));
    }
    // Within one IoT Core connection's quotas.
    if scenarios.contains(&Scenario::FlatOut) {
        let s = Scenario::FlatOut;
        let cells: Vec<String> = relays
            .iter()
            .map(|&r| match r {
                Relay::Wardgate => format!(
                    "{} computed ({} readings, {} bytes per publish); drain measured {}",
                    num(med(r, s, "quota_readings_per_second"), 0),
                    num(med(r, s, "readings_per_publish"), 1),
                    num(
                        med(r, s, "readings_per_publish")
                            .zip(med(r, s, "bytes_per_reading"))
                            .map(|(a, b)| a * b),
                        0
                    ),
                    num(med(r, s, "delivered_per_second"), 0)
                ),
                Relay::Bridge => "≤ 100 (one reading per publish)".into(),
                Relay::Bare => "– (no uplink)".into(),
            })
            .collect();
        let ratio = med(Relay::Wardgate, s, "quota_readings_per_second")
            .map_or("–".into(), |q| format!("{:.0}×", q / QUOTA_PUBLISHES));
        out += &format!(
            "| within one IoT Core connection (100 publishes/s, 512 KiB/s) | readings/s deliverable | {} | {ratio} | |\n",
            cells.join(" | ")
        );
        figures.insert(
            "quota".into(),
            json!({
                "wardgate_computed_readings_per_second": med(Relay::Wardgate, s, "quota_readings_per_second"),
                "wardgate_readings_per_publish": med(Relay::Wardgate, s, "readings_per_publish"),
                "wardgate_bytes_per_reading": med(Relay::Wardgate, s, "bytes_per_reading"),
                "wardgate_drain_measured_readings_per_second": med(Relay::Wardgate, s, "delivered_per_second"),
                "bridge_readings_per_second": QUOTA_PUBLISHES,
            }),
        );
    }
    figures.insert("wardgate_lost_total".into(), json!(lost_all));
    (out, Value::Object(figures))
}
