//! Torture runs of the real `wardgate` binary: bounded fault scenarios under load, each checking
//! that no acknowledged reading is lost. Run with `cargo xtask torture [SCENARIO] [--quick]` (or
//! `cargo bench -p wardgate --bench torture -- [SCENARIO] [--quick]`).
//!
//! Set-up, shared by every scenario: an upstream mosquitto with mutual TLS and a persistent
//! session store (certificates from `packaging/pki/ward-pki`), a "cloud" subscriber on it with a
//! persistent session that decodes the gateway's batches, and [`DEVICES`] QoS 1 pacemaker devices.
//! Each reading carries a unique (device, counter): the counter is coded in the heart rate
//! (`60 + counter / 10^6`). A device keeps its unacknowledged readings and, when its connection
//! breaks, connects again (a fresh session) and sends them again before new ones, as a real
//! device does; PUBACKs are matched to readings by packet id.
//!
//! Scenarios (in this order when none is named):
//! - `kill9`: N `kill -9` / restart cycles of `wardgate run` under load, the upstream up;
//! - `flap`: the upstream mosquitto stopped and started every 5 s under load;
//! - `outage`: the upstream down while the devices send far more than `queue.max_bytes`
//!   (4 MiB), so routine readings are evicted (counted in the status file); every 50th reading
//!   is an alarm (`ward/<id>/alarm`), which must never be evicted; then the upstream returns;
//! - `disk-full`: `gateway.state_dir` on a 32 MiB tmpfs (mounted here, so root; unmounted when
//!   the scenario ends, also by a panic), the upstream down, filled with a file until writes
//!   fail: the gateway must then stop acknowledging (no PUBACK for 3 s) and keep running; once
//!   the file is removed PUBACKs must come again; then the upstream returns.
//!
//! After each, the devices stop, the queue drains, and the run compares. What must stay true:
//! LOST = acknowledged readings neither delivered upstream nor accounted for by the evictions
//! the gateway counted is 0 (and no alarm is missing), or the run fails (exit status 1).
//! Duplicates upstream are allowed (delivery is at-least-once) and counted. Shadows and
//! violations must come through intact too: every device violates a security profile
//! (`CHATTY_PROFILE`) before each fault (the scenario waits for it); afterwards each device's
//! shadow, fetched as the device does, must report a heart rate it had acknowledged, and the
//! defender's events must alternate per device — never a second `in-alarm` while one is in
//! force, which would mean a violation's state was lost and raised again. Times come from the
//! clock at run time; the only fixed waits are the flap period and the devices' pacing.
//! One summary line per scenario; all in `target/bench/torture.json`.

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod load;
mod real;

use load::{counter_of, heart_rate, Pending};
use real::Mosquitto;

const DEVICES: usize = 20;
/// Readings a device has in flight at most.
const WINDOW: usize = 10;
/// Time between two publishes of a device (50/s each, 1 000/s in all).
const PACE: Duration = Duration::from_millis(20);
const READINGS_TOPIC: &str = "wardgate/bench-gateway/readings";
/// The longest a drain may take once the devices stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `cargo bench` adds `--bench`; every other `--` flag is ignored too.
    let named: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let all = ["kill9", "flap", "outage", "disk-full"];
    for n in &named {
        assert!(all.contains(n), "unknown scenario `{n}` (one of {all:?})");
    }
    let chosen: Vec<&str> = all
        .iter()
        .copied()
        .filter(|s| named.is_empty() || named.contains(s))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut report = Vec::new();
    let mut failed = false;
    for s in chosen {
        let r = rt.block_on(scenario(s, quick));
        failed |= !r.ok();
        println!("{}", r.line());
        report.push(r.json());
    }
    println!(
        "torture: done in {:.0} s{}",
        started.elapsed().as_secs_f64(),
        if failed { ": FAILED" } else { "" }
    );
    real::write_report("torture", &serde_json::Value::Array(report));
    if failed {
        std::process::exit(1);
    }
}

/// Whether reading `k` is sent as an alarm in `scenario`.
fn is_alarm(scenario: &str, k: u64) -> bool {
    scenario == "outage" && k.is_multiple_of(50)
}

/// What the cloud subscriber saw: (device, counter) → times received.
#[derive(Default)]
struct Cloud {
    seen: Mutex<HashMap<(String, u64), u32>>,
    /// Ms since `epoch` of the last message.
    last: AtomicU64,
    epoch: Mutex<Option<Instant>>,
}

impl Cloud {
    fn idle_for(&self) -> Duration {
        let epoch = self.epoch.lock().unwrap().unwrap_or_else(Instant::now);
        epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::SeqCst)))
    }
}

/// Subscribe on the upstream as the "cloud" (client id `cloud-id`, persistent session), with
/// mutual TLS; returns once the SUBACK is in.
async fn cloud(port: u16, pki: &Path, id: &str) -> Arc<Cloud> {
    let mut o = real::cloud_options(id, port, pki);
    o.set_clean_session(false);
    let c = Arc::new(Cloud::default());
    *c.epoch.lock().unwrap() = Some(Instant::now());
    let s = c.clone();
    // The task keeps the client; it runs as long as the bench.
    let _ = real::subscriber(o, READINGS_TOPIC, move |p| {
        let v: serde_json::Value = serde_json::from_slice(&p.payload).expect("a batch is JSON");
        let records = wardgate::uplink::batch::expand(&v).expect("a batch decodes");
        let mut seen = s.seen.lock().unwrap();
        for (_, m) in records {
            let device = m["device_id"].as_str().unwrap_or_default().to_owned();
            let hr = m["readings"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["metric"] == "heart-rate"))
                .and_then(|r| r["value"].as_f64());
            if let Some(hr) = hr {
                *seen.entry((device, counter_of(hr))).or_default() += 1;
            }
        }
        let epoch = s.epoch.lock().unwrap().unwrap();
        s.last
            .store(epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
    })
    .await;
    c
}

/// What one device did: counters sent (at least once) and acknowledged.
#[derive(Default)]
struct DeviceLog {
    sent: u64,
    acked: HashSet<u64>,
    connections: u64,
}

/// One device: publishes readings 0, 1, 2, ... at [`PACE`] with at most [`WINDOW`] in flight
/// until `stop`, then until everything sent is acknowledged. On a broken connection it connects
/// again (clean session) and sends its unacknowledged readings again first. The event loop is
/// only ever polled by one task and never cancelled; a second task publishes.
async fn device(
    i: usize,
    addr: SocketAddr,
    scenario: &'static str,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    log: Arc<Mutex<DeviceLog>>,
) {
    let id = format!("pm-{i:03}");
    let pending = Arc::new(Mutex::new(Pending::default()));
    loop {
        let mut o = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
        o.set_credentials(id.clone(), "pw");
        o.set_keep_alive(Duration::from_secs(5));
        o.set_clean_session(true);
        o.set_inflight(WINDOW as u16);
        let (client, mut el) = AsyncClient::new(o, WINDOW * 2);
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        return a.code == rumqttc::ConnectReturnCode::Success
                    }
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if !connected {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        log.lock().unwrap().connections += 1;
        let publisher = {
            let (pending, stop, log, id) = (pending.clone(), stop.clone(), log.clone(), id.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PACE);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let stopping = stop.load(Ordering::SeqCst);
                    let mut p = pending.lock().unwrap();
                    if stopping && p.empty() {
                        let _ = client.try_disconnect();
                        return;
                    }
                    if p.requested.len() + p.inflight.len() >= WINDOW {
                        continue;
                    }
                    let k = match p.resend.pop_front() {
                        Some(k) => k,
                        None if !stopping => {
                            p.next += 1;
                            log.lock().unwrap().sent = p.next;
                            p.next - 1
                        }
                        None => continue,
                    };
                    let topic = if is_alarm(scenario, k) {
                        format!("ward/{id}/alarm")
                    } else {
                        format!("ward/{id}/telemetry")
                    };
                    let payload = format!(
                        r#"{{"heartbeat":{},"ts":{},"battery_pct":87,"mode":"DDD"}}"#,
                        heart_rate(k),
                        wardgate::clock::now_ms()
                    );
                    // Under the lock: the request's place in `requested` is its place on the wire.
                    if client
                        .try_publish(topic, QoS::AtLeastOnce, false, payload)
                        .is_ok()
                    {
                        p.requested.push_back(k);
                    } else {
                        p.resend.push_front(k);
                    }
                }
            })
        };
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut p = pending.lock().unwrap();
                    if let Some(k) = p.requested.pop_front() {
                        p.inflight.insert(pkid, k);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let k = pending.lock().unwrap().inflight.remove(&a.pkid);
                    if let Some(k) = k {
                        log.lock().unwrap().acked.insert(k);
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let _ = publisher.await;
                    return;
                }
                Ok(_) => {}
                Err(_) => {
                    publisher.abort();
                    let _ = publisher.await;
                    pending.lock().unwrap().broken();
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The devices of a run.
struct Fleet {
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    logs: Vec<Arc<Mutex<DeviceLog>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    fn start(addr: SocketAddr, scenario: &'static str) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let logs: Vec<_> = (0..DEVICES)
            .map(|_| Arc::new(Mutex::new(DeviceLog::default())))
            .collect();
        let tasks = (0..DEVICES)
            .map(|i| {
                tokio::spawn(device(
                    i,
                    addr,
                    scenario,
                    stop.clone(),
                    acks.clone(),
                    logs[i].clone(),
                ))
            })
            .collect();
        Fleet {
            stop,
            acks,
            logs,
            tasks,
        }
    }

    /// Wait until `n` more PUBACKs came in (or `limit` passed); whether they did.
    async fn wait_acks(&self, n: u64, limit: Duration) -> bool {
        let target = self.acks.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + limit;
        while self.acks.load(Ordering::SeqCst) < target {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Stop publishing new readings; wait until every device has all it sent acknowledged, for
    /// `limit` at most in all (then the devices still waiting are stopped).
    async fn finish(self, limit: Duration) -> Vec<Arc<Mutex<DeviceLog>>> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + limit;
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        self.logs
    }
}

/// The gateway's status file, once there.
fn status(state: &Path) -> Option<serde_json::Value> {
    std::fs::read(state.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
}

/// What a scenario measured.
struct Outcome {
    scenario: &'static str,
    detail: String,
    seconds: f64,
    sent: u64,
    acked: u64,
    delivered: u64,
    duplicates: u64,
    dropped: u64,
    lost: u64,
    alarms_missing: u64,
    unacked_delivered: u64,
    examples: Vec<String>,
    /// Other failures of the scenario (e.g. the gateway died).
    problems: Vec<String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.lost == 0 && self.alarms_missing == 0 && self.problems.is_empty()
    }

    fn line(&self) -> String {
        format!(
            "torture {:<9} {}: sent {}, acknowledged {}, delivered {} (distinct; {} of them never acknowledged), duplicated {}, dropped by policy {}, LOST {}{} in {:.0} s: {}{}{}",
            self.scenario,
            self.detail,
            self.sent,
            self.acked,
            self.delivered,
            self.unacked_delivered,
            self.duplicates,
            self.dropped,
            self.lost,
            if self.alarms_missing > 0 {
                format!(", ALARMS MISSING {}", self.alarms_missing)
            } else {
                String::new()
            },
            self.seconds,
            if self.ok() { "ok" } else { "FAILED" },
            if self.examples.is_empty() {
                String::new()
            } else {
                format!(" (missing e.g. {})", self.examples.join(", "))
            },
            if self.problems.is_empty() {
                String::new()
            } else {
                format!(" [{}]", self.problems.join("; "))
            }
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": self.scenario,
            "detail": self.detail,
            "seconds": self.seconds,
            "devices": DEVICES,
            "sent": self.sent,
            "acknowledged": self.acked,
            "delivered_distinct": self.delivered,
            "delivered_unacknowledged": self.unacked_delivered,
            "duplicated": self.duplicates,
            "dropped_by_policy": self.dropped,
            "lost": self.lost,
            "alarms_missing": self.alarms_missing,
            "missing_examples": self.examples,
            "problems": self.problems,
            "ok": self.ok(),
        })
    }
}

/// The fixed parts of every run: certificates, the upstream's configuration, the gateway's.
struct Rig {
    tmp: tempfile::TempDir,
    pki: PathBuf,
    up_conf: PathBuf,
    up_port: u16,
    components: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let components = real::components_dir();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("pki");
        real::upstream_pki(&p, "Torture upstream CA", &["bench-gateway", "bench-cloud"]);
        let up_port = real::free_port();
        let data = tmp.path().join("mq-data");
        std::fs::create_dir_all(&data).unwrap();
        let up_conf = tmp.path().join("upstream.conf");
        std::fs::write(
            &up_conf,
            format!(
                "user root\nper_listener_settings true\npersistence true\npersistence_location {d}/\nautosave_interval 1\n\
                 listener {up_port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/server.crt\nkeyfile {p}/server.key\n\
                 require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n\
                 max_inflight_messages 100\nmax_queued_messages 10000000\nmax_queued_bytes 0\n",
                d = data.display(),
                p = p.display()
            ),
        )
        .unwrap();
        Rig {
            tmp,
            pki: p,
            up_conf,
            up_port,
            components,
        }
    }

    /// The gateway's configuration: state in `state`, devices on 127.0.0.1:`port`.
    fn gateway(&self, state: &Path, port: u16) -> wardgate::config::Config {
        let mut cfg = wardgate::config::Config::default();
        cfg.gateway.state_dir = state.to_path_buf();
        cfg.gateway.shutdown_timeout = Duration::from_secs(30);
        cfg.listeners.plain.address = SocketAddr::from(([127, 0, 0, 1], port));
        cfg.listeners.max_connections_per_address = 4 * DEVICES;
        cfg.broker.address = "127.0.0.1:0".parse().unwrap();
        cfg.http.address = "127.0.0.1:0".parse().unwrap();
        cfg.plugins.dir = self.components.clone();
        real::bench_gateway(&mut cfg, self.up_port, &self.pki);
        cfg.upstream.sync_shadows = false;
        cfg.metering.status_interval = Duration::from_millis(500);
        // Every device sends far more than 10 messages per 2 s window: each is in violation of
        // this profile within a window or two (each scenario waits for that before its fault,
        // `await_violations`), and its violation must survive the faults (see
        // `check_violations`). No action: nothing but the journal hears of it.
        cfg.metering.window = Duration::from_secs(2);
        cfg.defender.profiles = vec![toml::from_str(CHATTY_PROFILE).expect("profile parses")];
        let hash = wardgate::registry::hash_password_demo("pw");
        cfg.devices = real::pacemakers(DEVICES, &hash);
        cfg
    }
}

/// The security profile every torture device violates (see `Rig::gateway`).
const CHATTY_PROFILE: &str = r#"
name = "TortureChatty"
targets = ["*"]
[[behaviors]]
name = "chatty"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than", value = { count = 10 }, durationSeconds = 2 }
"#;

/// The devices' shadows after a scenario, fetched as a device does (`$aws/things/<id>/shadow/
/// get` on the gateway): each must answer `accepted` with a version and a reported heart rate
/// carrying a counter the device sent and had acknowledged (the shadow store came through the
/// faults readable and consistent with what the devices were told).
async fn check_shadows(addr: SocketAddr, logs: &[Arc<Mutex<DeviceLog>>]) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let id = format!("pm-{i:03}");
        let mut o = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
        o.set_credentials(id.clone(), "pw");
        let (client, mut el) = AsyncClient::new(o, 10);
        let answer = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(format!("$aws/things/{id}/shadow/get/+"), QoS::AtLeastOnce)
                            .await
                            .ok()?;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        client
                            .publish(
                                format!("$aws/things/{id}/shadow/get"),
                                QoS::AtLeastOnce,
                                false,
                                "",
                            )
                            .await
                            .ok()?;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        return Some((p.topic, p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await
        .ok()
        .flatten();
        let _ = client.disconnect().await;
        let Some((topic, body)) = answer else {
            problems.push(format!("{id}: no answer to its shadow get within 20 s"));
            continue;
        };
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if !topic.ends_with("/accepted") {
            problems.push(format!("{id}: shadow get {topic}: {doc}"));
            continue;
        }
        let hr = doc["state"]["reported"]["heart_rate"].as_f64();
        let acked = hr.is_some_and(|hr| log.lock().unwrap().acked.contains(&counter_of(hr)));
        if doc["version"].as_u64().unwrap_or(0) == 0 || !acked {
            problems.push(format!(
                "{id}: shadow version {} reports heart_rate {hr:?}, not a reading it had acknowledged",
                doc["version"]
            ));
        }
    }
    problems
}

/// Wait until the defender has every device in violation (`<state_dir>/defender.json`), so the
/// faults that follow hit violations in force; a problem when it does not happen in 30 s.
async fn await_violations(state: &Path, devices: usize, problems: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = std::fs::read(state.join("defender.json"))
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
            .and_then(|v| v["status"]["active"].as_array().map(Vec::len))
            .unwrap_or(0);
        if active >= devices {
            return;
        }
        if Instant::now() > deadline {
            problems.push(format!(
                "only {active} of {devices} devices in violation 30 s into the load"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The defender's violations after a scenario (`<state_dir>/defender.json`): every device broke
/// the chatty behavior, and for each device its events alternate — `in-alarm`, then a clear or
/// an invalidation of that same violation, then a new `in-alarm` — never two `in-alarm`s in a
/// row, which would mean a violation's state was lost in a fault and raised again.
fn check_violations(state: &Path, devices: usize) -> Vec<String> {
    let text = match std::fs::read(state.join("defender.json")) {
        Ok(t) => t,
        Err(e) => return vec![format!("no defender.json: {e}")],
    };
    let file: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => return vec![format!("defender.json unreadable: {e}")],
    };
    let mut problems = Vec::new();
    let mut open: HashMap<String, Option<String>> = HashMap::new();
    for e in file["history"].as_array().into_iter().flatten() {
        let thing = e["thingName"].as_str().unwrap_or("").to_owned();
        let id = e["violationId"].as_str().unwrap_or("").to_owned();
        let current = open.entry(thing.clone()).or_default();
        match (e["violationEventType"].as_str(), current.clone()) {
            (Some("in-alarm"), None) => *current = Some(id),
            (Some("in-alarm"), Some(was)) => {
                problems.push(format!("{thing}: in-alarm {id} while {was} was in alarm"));
                *current = Some(id);
            }
            (Some(_), Some(was)) if was == id => *current = None,
            (kind, was) => {
                problems.push(format!(
                    "{thing}: {kind:?} of {id} while {was:?} was in alarm"
                ));
                *current = None;
            }
        }
    }
    if open.len() < devices {
        problems.push(format!(
            "violations of {} devices recorded, {devices} expected",
            open.len()
        ));
    }
    problems
}

/// A tmpfs mounted on a directory; unmounted (lazily if busy) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount -t tmpfs on {} (needs root)", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Write `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    let mut n = 0u64;
    while let Ok(w) = f.write(&chunk) {
        if w == 0 {
            break;
        }
        n += w as u64;
    }
    let _ = f.sync_all();
    n
}

/// kill -9 the gateway and reap it.
fn kill9(gw: real::Running) {
    let mut child = gw.child;
    let _ = child.kill();
    let _ = child.wait();
}

async fn scenario(name: &'static str, quick: bool) -> Outcome {
    let rig = Rig::new();
    let started = Instant::now();
    let state = rig.tmp.path().join("state");
    let port = real::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cfg = rig.gateway(&state, port);
    let mut mq = Mosquitto::start(&rig.up_conf, rig.up_port);
    let cloud = cloud(rig.up_port, &rig.pki, "torture-cloud").await;
    let ready = Duration::from_secs(120);
    let detail;
    let mut problems = Vec::new();
    // The small file system of `disk-full`, unmounted when this returns or unwinds.
    let mut _tmpfs = None;
    let gw = match name {
        "kill9" => {
            let cycles = if quick { 10 } else { 100 };
            let fleet = Fleet::start(addr, name);
            let mut rng_state = 0x9E37_79B9_7F4A_7C15u64;
            let mut stalled = 0;
            for c in 0..cycles {
                let gw = real::start(&cfg, rig.tmp.path(), &format!("gw{}", c % 2), ready);
                // Kill once readings flow again, at a varying point after that.
                if !fleet.wait_acks(20, Duration::from_secs(30)).await {
                    stalled += 1;
                }
                if c == 0 {
                    await_violations(&state, DEVICES, &mut problems).await;
                }
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                tokio::time::sleep(Duration::from_millis(rng_state % 400)).await;
                kill9(gw);
            }
            detail = format!(
                "{cycles} kill -9 cycles{}",
                if stalled > 0 {
                    format!(" ({stalled} without 20 new PUBACKs in 30 s)")
                } else {
                    String::new()
                }
            );
            let gw = real::start(&cfg, rig.tmp.path(), "last", ready);
            (gw, fleet.finish(DRAIN_LIMIT).await)
        }
        "flap" => {
            let period = if quick { 20 } else { 60 };
            let gw = real::start(&cfg, rig.tmp.path(), "gw", ready);
            let fleet = Fleet::start(addr, name);
            fleet.wait_acks(100, Duration::from_secs(30)).await;
            await_violations(&state, DEVICES, &mut problems).await;
            let until = Instant::now() + Duration::from_secs(period);
            let mut flaps = 0;
            while Instant::now() < until {
                // The scenario's period, not a wait for an event.
                tokio::time::sleep(Duration::from_secs(5)).await;
                mq.stop();
                tokio::time::sleep(Duration::from_secs(5)).await;
                mq = Mosquitto::start(&rig.up_conf, rig.up_port);
                flaps += 1;
            }
            detail = format!("{flaps} upstream stops of 5 s in {period} s");
            (gw, fleet.finish(DRAIN_LIMIT).await)
        }
        "outage" => {
            cfg.queue.max_bytes = 4 << 20;
            // The cloud's session is in mosquitto's store: what arrives while it is down too.
            mq.stop();
            let gw = real::start(&cfg, rig.tmp.path(), "gw", ready);
            let fleet = Fleet::start(addr, name);
            await_violations(&state, DEVICES, &mut problems).await;
            let limit = Duration::from_secs(if quick { 40 } else { 120 });
            let deadline = Instant::now() + limit;
            // Until the queue has evicted a good share of what was sent.
            loop {
                let evicted = status(&state)
                    .and_then(|s| s["queue"]["evicted_over_bytes"].as_u64())
                    .unwrap_or(0);
                if evicted >= 10_000 || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let logs = fleet.finish(DRAIN_LIMIT).await;
            mq = Mosquitto::start(&rig.up_conf, rig.up_port);
            detail = "upstream down past queue.max_bytes 4 MiB, 1 in 50 an alarm".to_string();
            (gw, logs)
        }
        "disk-full" => {
            let mount = rig.tmp.path().join("small");
            _tmpfs = Some(Tmpfs::mount(&mount, "32m"));
            cfg.gateway.state_dir = mount.join("state");
            // The upstream is down: the queue only grows, until the disk is full.
            mq.stop();
            let mut gw = real::start(&cfg, rig.tmp.path(), "gw", ready);
            let fleet = Fleet::start(addr, name);
            fleet.wait_acks(200, Duration::from_secs(30)).await;
            await_violations(&cfg.gateway.state_dir, DEVICES, &mut problems).await;
            // Fill what is left of the file system.
            let filler = mount.join("filler");
            let full = fill(&filler);
            // The gateway must stop acknowledging: wait until no PUBACK came for 3 s.
            let deadline = Instant::now() + Duration::from_secs(60);
            let (mut last, mut since) = (fleet.acks.load(Ordering::SeqCst), Instant::now());
            while since.elapsed() < Duration::from_secs(3) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = fleet.acks.load(Ordering::SeqCst);
                if now != last {
                    (last, since) = (now, Instant::now());
                }
            }
            let refused = since.elapsed() >= Duration::from_secs(3);
            if !refused {
                problems.push("PUBACKs went on with the disk full".to_string());
            }
            if gw.child.try_wait().ok().flatten().is_some() {
                problems.push("the gateway exited when the disk was full".to_string());
            }
            let acked_full = fleet.acks.load(Ordering::SeqCst);
            let _ = std::fs::remove_file(&filler);
            let resumed = fleet.wait_acks(200, Duration::from_secs(60)).await;
            if !resumed {
                problems.push(
                    "no PUBACKs within 60 s after space was freed (restarted with kill -9 to drain)"
                        .to_string(),
                );
                kill9(gw);
                gw = real::start(&cfg, rig.tmp.path(), "gw-after", ready);
                fleet.wait_acks(200, Duration::from_secs(60)).await;
            }
            let logs = fleet.finish(DRAIN_LIMIT).await;
            mq = Mosquitto::start(&rig.up_conf, rig.up_port);
            detail = format!(
                "state_dir on a 32 MiB tmpfs filled ({} MiB of filler) at {acked_full} PUBACKs, {}, freed: {}",
                full >> 20,
                if refused { "then no PUBACK" } else { "PUBACKs went on" },
                if resumed { "PUBACKs again" } else { "no PUBACK" },
            );
            (gw, logs)
        }
        _ => unreachable!(),
    };
    let (gw, logs) = gw;
    let mut acked: HashSet<(String, u64)> = HashSet::new();
    let mut sent = 0;
    for (i, l) in logs.iter().enumerate() {
        let l = l.lock().unwrap();
        sent += l.sent;
        acked.extend(l.acked.iter().map(|k| (format!("pm-{i:03}"), *k)));
    }
    // Drain: until every acknowledged reading is upstream, or the queue is empty and the cloud
    // has heard nothing for 5 s, or the limit.
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let all_in = {
            let seen = cloud.seen.lock().unwrap();
            acked.iter().all(|k| seen.contains_key(k))
        };
        if all_in || Instant::now() > deadline {
            break;
        }
        let empty = status(&cfg.gateway.state_dir).is_some_and(|s| s["queue"]["depth"] == 0);
        if empty && cloud.idle_for() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late duplicates would still come: wait until the queue is empty and the cloud idle 1 s.
    let settle = Instant::now() + Duration::from_secs(30);
    while Instant::now() < settle
        && !(status(&cfg.gateway.state_dir).is_some_and(|s| s["queue"]["depth"] == 0)
            && cloud.idle_for() > Duration::from_secs(1))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Shadows and violations intact: asked of the running gateway, then read from its state.
    problems.extend(check_shadows(addr, &logs).await);
    problems.extend(check_violations(&cfg.gateway.state_dir, DEVICES));
    let st = status(&cfg.gateway.state_dir).unwrap_or_default();
    let q = &st["queue"];
    let dropped =
        q["evicted_over_bytes"].as_u64().unwrap_or(0) + q["evicted_over_age"].as_u64().unwrap_or(0);
    gw.stop();
    mq.stop();
    let seen = cloud.seen.lock().unwrap().clone();
    let delivered = seen.len() as u64;
    let duplicates: u64 = seen.values().map(|n| u64::from(n - 1)).sum();
    let unacked_delivered = seen.keys().filter(|k| !acked.contains(*k)).count() as u64;
    let mut missing: Vec<&(String, u64)> =
        acked.iter().filter(|k| !seen.contains_key(*k)).collect();
    missing.sort();
    let alarms_missing = missing.iter().filter(|(_, k)| is_alarm(name, *k)).count() as u64;
    let lost = (missing.len() as u64).saturating_sub(dropped);
    Outcome {
        scenario: name,
        detail,
        seconds: started.elapsed().as_secs_f64(),
        sent,
        acked: acked.len() as u64,
        delivered,
        duplicates,
        dropped,
        lost,
        alarms_missing,
        unacked_delivered,
        problems,
        examples: if lost > 0 || alarms_missing > 0 {
            missing
                .iter()
                .take(10)
                .map(|(d, k)| format!("{d}#{k}"))
                .collect()
        } else {
            Vec::new()
        },
    }
}
