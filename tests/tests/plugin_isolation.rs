//! Plugin failure isolation, with real components built from `plugins/` (`cargo xtask plugins`)
//! and the real gateway: a device whose messages keep trapping a plugin is contained, never the
//! plugin for the other devices of its kind; containment shows in the status and is lifted by
//! reload or a new plugin version; the call budget is CPU time, so a busy machine does not turn
//! good readings into traps; a plugin's memory never carries one device's data into another
//! device's call; and a guest that spins forever is still stopped.
//!
//! The misbehaving device uses the `test-selective` guest: a pacemaker plugin that panics on
//! `"trap":"panic"`, loops forever on `"trap":"spin"`, and reports how many messages its
//! instance has seen (`instance-calls`).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::QoS;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wardgate::app::Gateway;
use wardgate::clock::now_ms;
use wardgate::config::{DeviceConfig, PluginsConfig};
use wardgate::pipeline::{DeadLetter, DeadLetters};
use wardgate::plugin_host::{Failure, Input, PluginHost};
use wardgate_tests::{
    component, config, config_toml, connect, device, options, plain_addr_from_status, NotifySocket,
};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
const PLUGIN: &str = "test-selective";
/// Generous: the tests are about who gets blamed, not how fast a call is.
const WAIT: Duration = Duration::from_secs(30);

/// A good pacemaker reading with heart rate `hr`, timed now.
fn good(hr: u32) -> Vec<u8> {
    format!(r#"{{"heartbeat":{hr},"ts":{}}}"#, now_ms()).into_bytes()
}

/// A message that makes `test-selective` misbehave: `panic` or `spin`.
fn bad(how: &str) -> Vec<u8> {
    format!(r#"{{"heartbeat":80,"ts":{},"trap":"{how}"}}"#, now_ms()).into_bytes()
}

/// A valid pacemaker message of just under 128 KiB (the largest payload a device may send):
/// the usual fields and an electrogram strip.
fn large(hr: u32) -> Vec<u8> {
    let mut p = format!(
        r#"{{"heartbeat":{hr},"ts":{},"battery_pct":87,"mode":"DDD","egm":["#,
        now_ms()
    );
    let mut i = 0u32;
    while p.len() < 128 * 1024 - 16 {
        if i > 0 {
            p.push(',');
        }
        p.push_str(&((i * 37) % 1024).to_string());
        i += 1;
    }
    p.push_str("]}");
    p.into_bytes()
}

/// A pacemaker served by `test-selective`.
fn selective(id: &str) -> DeviceConfig {
    let mut d = device(id, "pacemaker", "pw");
    d.plugin = Some(PLUGIN.into());
    d
}

/// A monitor allowed to read every device's canonical readings.
fn monitor() -> DeviceConfig {
    let mut m = device("monitor-01", "monitor", "m");
    m.subscribe = Some(vec!["ward/+/readings".into()]);
    m
}

/// A plugin directory holding the given components.
fn plugin_dir(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for n in names {
        std::fs::copy(component(n), dir.path().join(format!("{n}.wasm"))).unwrap();
    }
    dir
}

async fn publish(d: &wardgate_tests::Device, id: &str, payload: Vec<u8>) {
    d.client
        .publish(
            format!("ward/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
}

/// Wait until `d` has `n` PUBACKs (every message handled: normalised or dead-lettered).
async fn acked(d: &wardgate_tests::Device, n: u64, what: &str) {
    tokio::time::timeout(WAIT, async {
        while d.acks.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{what}: {} of {n} messages acknowledged",
            d.acks.load(Ordering::SeqCst)
        )
    });
}

/// The next canonical message on the monitor, parsed.
async fn next_canonical(mon: &mut wardgate_tests::Device, what: &str) -> serde_json::Value {
    let (_, payload) = mon
        .next(WAIT)
        .await
        .unwrap_or_else(|| panic!("{what}: no canonical reading arrived"));
    serde_json::from_slice(&payload).unwrap()
}

fn dead_of(dead: &[DeadLetter], id: &str) -> Vec<DeadLetter> {
    dead.iter().filter(|d| d.device_id == id).cloned().collect()
}

/// The devices `status.json` shows as contained for `plugin` (none if the field is absent).
fn contained_in_status(state_dir: &std::path::Path, plugin: &str) -> Vec<String> {
    let Ok(text) = std::fs::read(state_dir.join("status.json")) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    v["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == plugin)
        .flat_map(|p| p["contained"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["device_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_survives_another_devices_bursts() {
    let state = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(&[PLUGIN]);
    let mut cfg = config(
        state.path(),
        vec![selective("pm-noisy"), selective("pm-quiet"), monitor()],
    );
    cfg.plugins.dir = plugins.path().to_path_buf();
    // The shipped defaults: 5 ms of CPU per call, 3 traps in a row.
    assert_eq!(cfg.plugins.call_deadline, Duration::from_millis(5));
    assert_eq!(cfg.plugins.max_consecutive_traps, 3);
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut mon = connect(options(addr, "monitor-01", "m")).await;
    mon.subscribe("ward/+/readings").await;
    let noisy = connect(options(addr, "pm-noisy", "pw")).await;
    let quiet = connect(options(addr, "pm-quiet", "pw")).await;

    // A burst of 90 endless loops from one device, never waiting for a PUBACK, with good
    // readings from the other device in the middle of it and after it.
    let rounds = 30u32;
    for i in 0..rounds {
        if i < 10 {
            for _ in 0..9 {
                publish(&noisy, "pm-noisy", bad("spin")).await;
            }
        }
        if i == 10 {
            acked(&noisy, 90, "the noisy device's burst").await;
        }
        publish(&quiet, "pm-quiet", good(60 + i)).await;
    }
    let mut readings = Vec::new();
    for i in 0..rounds {
        let v = next_canonical(&mut mon, "the quiet device").await;
        assert_eq!(v["device_id"], "pm-quiet", "{v}");
        assert_eq!(v["readings"][0]["value"], f64::from(60 + i), "in order");
        readings.push(v);
    }
    for (i, v) in (1u32..).zip(&readings) {
        assert_eq!(
            v["readings"][1]["value"],
            f64::from(i),
            "its instance has seen its own messages and no other device's: {v}"
        );
    }
    // Contained: even its good messages are kept aside now, with the containment as reason.
    publish(&noisy, "pm-noisy", good(70)).await;
    acked(&noisy, 91, "the noisy device's good message").await;
    // The quiet device is still served after all of it.
    publish(&quiet, "pm-quiet", good(99)).await;
    let v = next_canonical(&mut mon, "the quiet device at the end").await;
    assert_eq!(
        (v["device_id"].as_str(), v["readings"][0]["value"].as_f64()),
        (Some("pm-quiet"), Some(99.0))
    );
    let stats = gw.stats();
    let report = gw.stop(Duration::from_secs(10)).await;
    assert!(report.drained);

    assert_eq!(stats.device("pm-quiet").dead_letters, 0);
    assert_eq!(stats.device("pm-quiet").readings, u64::from(rounds + 1) * 2);
    let dead = DeadLetters::new(state.path()).read_all();
    assert!(dead_of(&dead, "pm-quiet").is_empty(), "{dead:#?}");
    let noisy_dead = dead_of(&dead, "pm-noisy");
    assert_eq!(noisy_dead.len(), 91, "every message kept");
    for d in &noisy_dead[..3] {
        assert_eq!(d.reason_kind, "trap", "{d:?}");
        assert!(d.reason.contains("CPU budget spent"), "{d:?}");
    }
    for d in &noisy_dead[3..] {
        assert_eq!(d.reason_kind, "device-contained", "{d:?}");
        assert!(d.reason.contains("3 traps in a row"), "{d:?}");
        assert!(d.reason.contains("wardgate reload"), "{d:?}");
    }
    // The last status file (written at stop) names the contained device, and only it.
    assert_eq!(contained_in_status(state.path(), PLUGIN), vec!["pm-noisy"]);
}

/// Busy-loop threads, one per `hog`, until dropped.
struct CpuHogs {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHogs {
    fn start(hogs: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..hogs)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_on_a_busy_machine_are_not_charged_as_traps() {
    let state = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(&["pacemaker"]);
    let mut cfg = config(state.path(), vec![device("pm-01", "pacemaker", "pw")]);
    cfg.plugins.dir = plugins.path().to_path_buf();
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut o = options(addr, "pm-01", "pw");
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    let pm = connect(o).await;
    let payloads: Vec<Vec<u8>> = (0..90).map(|i| large(60 + i)).collect();
    assert!(payloads.iter().all(|p| p.len() <= 128 * 1024));

    // Every core busy several times over while one device bursts 90 large readings.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs = CpuHogs::start(2 * cores);
    for p in payloads {
        publish(&pm, "pm-01", p).await;
    }
    acked(&pm, 90, "the large readings").await;
    drop(hogs);
    let counts = gw.stats().device("pm-01");
    let report = gw.stop(Duration::from_secs(10)).await;
    assert!(report.drained);
    let dead = DeadLetters::new(state.path()).read_all();
    assert!(
        dead.is_empty(),
        "{} of 90 dead-lettered, first: {:?}",
        dead.len(),
        dead.first().map(|d| (&d.reason_kind, &d.reason))
    );
    assert_eq!(counts.readings, 180, "heart rate and battery from each");
    assert!(contained_in_status(state.path(), "pacemaker").is_empty());
}

fn host(dir: &std::path::Path, call_deadline: Duration) -> Arc<PluginHost> {
    let cfg = PluginsConfig {
        dir: dir.to_path_buf(),
        shipped_dir: Default::default(),
        poll_interval: Duration::from_millis(100),
        call_deadline,
        max_memory_bytes: 16 * 1024 * 1024,
        max_consecutive_traps: 3,
    };
    PluginHost::new(&cfg, None).unwrap()
}

/// The values of the readings `plugin` makes of `payload` from `device`.
fn call(h: &PluginHost, plugin: &str, device: &str, payload: &[u8]) -> Result<Vec<f64>, Failure> {
    h.normalize(
        plugin,
        Input {
            device_id: device,
            kind: "pacemaker",
            topic: &format!("ward/{device}/telemetry"),
            payload,
            received_at_ms: now_ms(),
            settings: &Arc::new(BTreeMap::new()),
        },
    )
    .map(|n| n.readings.iter().map(|r| r.value).collect())
}

#[test]
fn a_guest_that_spins_forever_is_still_stopped_by_its_cpu_budget() {
    let dir = plugin_dir(&["test-loop", PLUGIN]);
    let h = host(dir.path(), Duration::from_millis(20));
    h.scan();
    for (plugin, payload) in [("test-loop", b"x".to_vec()), (PLUGIN, bad("spin"))] {
        let started = Instant::now();
        match call(&h, plugin, "pm-01", &payload) {
            Err(Failure::Trap(reason)) => {
                assert!(reason.contains("CPU budget spent"), "{plugin}: {reason}");
                assert!(reason.contains("budget 20ms"), "{reason}");
            }
            other => panic!("{plugin}: expected a trap, got {other:?}"),
        }
        assert!(started.elapsed() < WAIT, "{plugin} was not stopped");
    }
}

#[test]
fn reload_and_a_new_version_lift_containment_and_other_devices_never_notice() {
    let dir = plugin_dir(&[PLUGIN]);
    let h = host(dir.path(), Duration::from_millis(20));
    h.scan();
    let contained = |h: &PluginHost| -> Vec<String> {
        h.get(PLUGIN)
            .unwrap()
            .contained()
            .into_iter()
            .map(|c| c.device_id)
            .collect()
    };
    let mut quiet_calls = 0.0;
    for round in 0..2 {
        for (i, how) in ["panic", "spin", "panic"].into_iter().enumerate() {
            assert!(matches!(
                call(&h, PLUGIN, "pm-noisy", &bad(how)),
                Err(Failure::Trap(_))
            ));
            // Between the traps, and after, another device is served as if nothing happened.
            quiet_calls += 1.0;
            let hr = 70 + i as u32;
            assert_eq!(
                call(&h, PLUGIN, "pm-quiet", &good(hr)),
                Ok(vec![f64::from(hr), quiet_calls])
            );
        }
        match call(&h, PLUGIN, "pm-noisy", &good(80)) {
            Err(Failure::Contained {
                plugin,
                traps,
                reason,
            }) => {
                assert_eq!((plugin.as_str(), traps), (PLUGIN, 3));
                assert!(reason.contains("panicked"), "{reason}");
            }
            other => panic!("expected containment, got {other:?}"),
        }
        assert_eq!(contained(&h), vec!["pm-noisy"]);
        if round == 0 {
            // Reload lifts it; the other device keeps its instance.
            assert_eq!(h.clear_containment(), 1);
        } else {
            // Drop in the plugin anew (write beside, rename over): a new version, a new ledger.
            let tmp = dir.path().join(".new");
            std::fs::copy(component(PLUGIN), &tmp).unwrap();
            std::fs::rename(&tmp, dir.path().join(format!("{PLUGIN}.wasm"))).unwrap();
            let before = h.get(PLUGIN).unwrap();
            let deadline = Instant::now() + WAIT;
            while Arc::ptr_eq(&before, &h.get(PLUGIN).unwrap()) {
                assert!(Instant::now() < deadline, "the new file was never loaded");
                std::thread::sleep(Duration::from_millis(20));
                h.scan();
            }
        }
        assert!(contained(&h).is_empty());
        assert_eq!(
            call(&h, PLUGIN, "pm-noisy", &good(81)),
            Ok(vec![81.0, 1.0]),
            "a fresh instance"
        );
    }
    // The new version made new instances for every device.
    assert_eq!(call(&h, PLUGIN, "pm-quiet", &good(90)), Ok(vec![90.0, 1.0]));
    assert_eq!(h.clear_containment(), 0);
}

#[test]
fn no_device_sees_what_another_device_left_in_the_plugins_memory() {
    let dir = plugin_dir(&[PLUGIN]);
    let h = host(dir.path(), Duration::from_millis(20));
    h.scan();
    // Alternating devices: each instance counts its own device's messages only.
    for i in 0..20u32 {
        let device = if i % 2 == 0 { "pm-01" } else { "pm-02" };
        assert_eq!(
            call(&h, PLUGIN, device, &good(60 + i)),
            Ok(vec![f64::from(60 + i), f64::from(i / 2 + 1)]),
            "call {i}: {device}'s instance saw another device's messages"
        );
    }
    assert_eq!(
        h.get(PLUGIN).unwrap().kept_instances().0,
        2,
        "one per device"
    );
    // A trap drops the device's instance: nothing it held survives; the other device's stays.
    assert!(call(&h, PLUGIN, "pm-01", &bad("panic")).is_err());
    assert_eq!(call(&h, PLUGIN, "pm-01", &good(61)), Ok(vec![61.0, 1.0]));
    assert_eq!(call(&h, PLUGIN, "pm-02", &good(62)), Ok(vec![62.0, 11.0]));
    // A device never seen before starts on a fresh instance.
    assert_eq!(call(&h, PLUGIN, "pm-03", &good(63)), Ok(vec![63.0, 1.0]));
}

/// The daemon as a subprocess, its stderr collected.
struct Daemon {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    notify: NotifySocket,
    addr: std::net::SocketAddr,
    config_path: std::path::PathBuf,
    state_dir: std::path::PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(devices: Vec<DeviceConfig>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plugins = plugin_dir(&[PLUGIN]);
        let state_dir = dir.path().join("state");
        let mut cfg = config(&state_dir, devices);
        cfg.plugins.dir = plugins.path().to_path_buf();
        cfg.metering.status_interval = Duration::from_millis(100);
        let config_path = dir.path().join("wardgate.toml");
        std::fs::write(&config_path, config_toml(&cfg)).unwrap();
        let mut notify = NotifySocket::bind(dir.path());
        let mut cmd = wardgate_tests::daemon_command(BIN, &config_path, &notify);
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // Drain stderr all the time: a full pipe would block the daemon's logging.
        let mut err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let ready = notify.wait_for("READY=1", WAIT).expect("READY=1");
        let addr = plain_addr_from_status(&ready).expect("STATUS names the plain listener");
        Self {
            child,
            log,
            notify,
            addr,
            config_path,
            state_dir,
            _dirs: (dir, plugins),
        }
    }

    /// `wardgate <args> -c <config>`; its stdout.
    fn cli(&self, args: &[&str]) -> String {
        let o = Command::new(BIN)
            .args(args)
            .arg("-c")
            .arg(&self.config_path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Wait until `wardgate status` output satisfies `pred`; returns it.
    async fn status_until(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.cli(&["status"]);
            if pred(&out) {
                return out;
            }
            assert!(Instant::now() < deadline, "{what}; status:\n{out}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for a log line containing every one of `parts`; returns it.
    async fn log_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_owned);
            if let Some(l) = found {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} in:\n{}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until the daemon has notified READY=1 after its `nth` RELOADING=1 (from 1): the
    /// reload is done.
    async fn reloaded(&mut self, nth: usize) {
        let has = |m: &String, line: &str| m.lines().any(|l| l == line);
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.notify.drain();
            let reload = seen
                .iter()
                .enumerate()
                .filter(|(_, m)| has(m, "RELOADING=1"))
                .nth(nth - 1)
                .map(|(i, _)| i);
            if let Some(at) = reload {
                if seen[at + 1..].iter().any(|m| has(m, "READY=1")) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no READY=1 after reload {nth}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sees_a_contained_device_and_lifts_it_with_reload() {
    let mut d = Daemon::start(vec![
        selective("pm-noisy"),
        selective("pm-quiet"),
        monitor(),
    ]);
    let mut mon = connect(options(d.addr, "monitor-01", "m")).await;
    mon.subscribe("ward/+/readings").await;
    let noisy = connect(options(d.addr, "pm-noisy", "pw")).await;
    let quiet = connect(options(d.addr, "pm-quiet", "pw")).await;
    for _ in 0..3 {
        publish(&noisy, "pm-noisy", bad("panic")).await;
    }
    acked(&noisy, 3, "the traps").await;

    // The journal says who is contained and why; the status shows it.
    let warn = d
        .log_line(&[
            "WARN",
            "device pm-noisy contained for plugin test-selective",
        ])
        .await;
    for field in [
        "device_id=pm-noisy",
        "plugin=test-selective",
        "traps=3",
        "reason=",
    ] {
        assert!(warn.contains(field), "{field} missing: {warn}");
    }
    let out = d
        .status_until("pm-noisy never shown as contained", |s| {
            s.contains("contained pm-noisy")
        })
        .await;
    assert!(out.contains("1 device(s) CONTAINED"), "{out}");
    assert!(out.contains("wardgate reload"), "{out}");
    assert!(!out.contains("contained pm-quiet"), "{out}");

    // Its good messages are kept aside; the other device's are normalised.
    publish(&noisy, "pm-noisy", good(75)).await;
    acked(&noisy, 4, "the contained device's good message").await;
    publish(&quiet, "pm-quiet", good(76)).await;
    let v = next_canonical(&mut mon, "the other device").await;
    assert_eq!(
        (v["device_id"].as_str(), v["readings"][0]["value"].as_f64()),
        (Some("pm-quiet"), Some(76.0))
    );
    let dead = DeadLetters::new(&d.state_dir).read_all();
    assert_eq!(
        dead_of(&dead, "pm-noisy")
            .last()
            .map(|l| l.reason_kind.as_str()),
        Some("device-contained")
    );

    // `wardgate reload` lifts it: the device's next good message is a reading again.
    d.cli(&["reload"]);
    d.reloaded(1).await;
    d.log_line(&["INFO", "containment lifted by reload", "pm-noisy"])
        .await;
    publish(&noisy, "pm-noisy", good(77)).await;
    let v = next_canonical(&mut mon, "the released device").await;
    assert_eq!(
        (v["device_id"].as_str(), v["readings"][0]["value"].as_f64()),
        (Some("pm-noisy"), Some(77.0))
    );
    d.status_until("containment still shown after reload", |s| {
        s.contains("plugin test-selective") && !s.contains("CONTAINED")
    })
    .await;

    // SIGHUP does the same.
    for _ in 0..3 {
        publish(&noisy, "pm-noisy", bad("panic")).await;
    }
    acked(&noisy, 8, "the second traps").await;
    d.status_until("pm-noisy not contained again", |s| {
        s.contains("contained pm-noisy")
    })
    .await;
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGHUP).unwrap();
    d.reloaded(2).await;
    publish(&noisy, "pm-noisy", good(78)).await;
    let v = next_canonical(&mut mon, "the device released by SIGHUP").await;
    assert_eq!(
        (v["device_id"].as_str(), v["readings"][0]["value"].as_f64()),
        (Some("pm-noisy"), Some(78.0))
    );
}
