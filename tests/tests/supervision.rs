//! Supervised stages, seen from outside: the real binary runs under a notify socket with a
//! systemd watchdog, one real stage is made to fail (the test builds' fault injection:
//! `WG_FAULT=<stage>:<mode>` and SIGUSR2, see `wardgate::supervisor`), and the test looks at
//! what an operator sees: the ERROR line naming the stage, `wardgate status`, the WATCHDOG=1
//! pings, the exit code. Also: the uplink's TLS files are loaded by `check-config` and before
//! READY=1.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::QoS;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wardgate::config::Config;
use wardgate_tests::pki::{Ca, Issued};
use wardgate_tests::upstream::{free_port, write, Upstream};
use wardgate_tests::{
    config, config_toml, connect, device, options, plain_addr_from_status, NotifySocket,
};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
/// A 1 s watchdog: pings every 500 ms; a stage stalls after the supervisor's minimum (10 s).
const WATCHDOG_USEC: &str = "1000000";
/// Generous: a loaded machine can be slow.
const EVENT: Duration = Duration::from_secs(60);

/// The binary as a subprocess, with its stderr and its notifications collected.
struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    /// Every notification so far, read all the time: a full notify socket would block the
    /// daemon's sends (a datagram socket's queue is short).
    notes: Arc<Mutex<Vec<String>>>,
    reading: Arc<std::sync::atomic::AtomicBool>,
    /// Rounds of the reader so far.
    rounds: Arc<std::sync::atomic::AtomicU64>,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reading.store(false, Ordering::SeqCst);
    }
}

/// Run `wardgate run` on `cfg` (written into `dir`) under a notify socket in `dir`.
fn spawn(cfg: &Config, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Daemon {
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(cfg)).unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let mut cmd = wardgate_tests::daemon_command(BIN, &config_path, &notify);
    cmd.stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("WARDGATE_") && k != "WARDGATE_LOG__FORMAT" {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("WG_FAULT");
    // The injected panics print their message only: symbolising a backtrace of the debug
    // binary can take most of a minute on a loaded machine, and the test waits for what
    // follows the panic.
    cmd.env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
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
    let notes = Arc::new(Mutex::new(Vec::new()));
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (into, go_on, done) = (notes.clone(), reading.clone(), rounds.clone());
    std::thread::spawn(move || {
        while go_on.load(Ordering::SeqCst) {
            let seen = notify.drain().to_vec();
            *into.lock().unwrap() = seen;
            done.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    Daemon {
        child,
        log,
        notes,
        reading,
        rounds,
        config_path,
        _dir: dir,
    }
}

impl Daemon {
    /// Wait until the reader has read everything sent before this call.
    fn read_all_sent(&self) {
        let start = self.rounds.load(Ordering::SeqCst);
        let deadline = Instant::now() + EVENT;
        while self.rounds.load(Ordering::SeqCst) < start + 2 {
            assert!(Instant::now() < deadline, "the notification reader stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Notifications with a line `line`.
    fn notes_with(&self, line: &str) -> Vec<String> {
        let notes = self.notes.lock().unwrap();
        notes
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .cloned()
            .collect()
    }

    /// Wait for a notification with a line `line`; returns it.
    fn wait_note(&self, line: &str) -> String {
        let deadline = Instant::now() + EVENT;
        loop {
            if let Some(m) = self.notes_with(line).into_iter().next() {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no {line} notification; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for READY=1; the plain listener's address.
    fn ready(&mut self) -> std::net::SocketAddr {
        let ready = self.wait_note("READY=1");
        plain_addr_from_status(&ready).expect("STATUS names the plain listener")
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait for a log line with every one of `parts`; returns it.
    fn wait_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + EVENT;
        loop {
            if let Some(l) = self
                .log()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// WATCHDOG=1 pings received so far.
    fn pings(&mut self) -> usize {
        self.notes_with("WATCHDOG=1").len()
    }

    /// Wait until at least `n` pings arrived in all.
    fn wait_pings(&mut self, n: usize) {
        let deadline = Instant::now() + EVENT;
        while self.pings() < n {
            assert!(
                Instant::now() < deadline,
                "only {} WATCHDOG=1 pings, wanted {n}; log:\n{}",
                self.pings(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fire the fault named by `WG_FAULT`.
    fn inject(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGUSR2).unwrap();
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EVENT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "still running; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `wardgate status` for this daemon's configuration.
    fn status(&self) -> String {
        let o = Command::new(BIN)
            .arg("status")
            .arg("-c")
            .arg(&self.config_path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Wait until `wardgate status` shows a line with every one of `parts`; returns it.
    fn wait_status_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + EVENT;
        loop {
            let s = self.status();
            if let Some(l) = s.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "`wardgate status` never showed {parts:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A gateway forwarding to `localhost:port`, its status file rewritten often.
fn upstream_config(dir: &Path, port: u16, ca: &Ca, gw: &Issued) -> Config {
    let mut cfg = wardgate_tests::upstream::upstream_config(dir, port, ca, gw);
    cfg.metering.status_interval = Duration::from_millis(200);
    cfg
}

/// Publish one pacemaker reading (QoS 1) with heart rate `hr` and wait for its PUBACK.
async fn reading(dev: &wardgate_tests::Device, hr: u32) {
    let before = dev.acks.load(Ordering::SeqCst);
    dev.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"heartbeat":{hr},"ts":{}}}"#, wardgate::clock::now_ms()),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + EVENT;
    while dev.acks.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "no PUBACK for heart rate {hr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The heart rate of the next reading that arrives upstream.
async fn next_upstream(rx: &mut tokio::sync::mpsc::UnboundedReceiver<(u64, f64)>) -> f64 {
    tokio::time::timeout(EVENT, rx.recv())
        .await
        .expect("the reading arrives upstream")
        .unwrap()
        .1
}

/// A gateway forwarding to an upstream where nothing listens (the uplink just retries; the
/// queue writer still commits), under a 1 s watchdog with `fault` armed; ready, pinging, and
/// one reading from pm-01 acknowledged.
async fn forwarding_with_a_reading(fault: &str) -> (Daemon, wardgate_tests::Device) {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::new("Upstream CA");
    let gw = ca.device("test-gateway");
    let cfg = upstream_config(dir.path(), free_port(), &ca, &gw);
    let mut d = spawn(
        &cfg,
        dir,
        &[("WATCHDOG_USEC", WATCHDOG_USEC), ("WG_FAULT", fault)],
    );
    let addr = d.ready();
    d.wait_pings(3);
    let dev = connect(options(addr, "pm-01", "pw")).await;
    reading(&dev, 72).await;
    (d, dev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_stage_is_reported_and_ends_the_watchdog() {
    // The queue writer is fatal: the PUBACK guarantee rests on it.
    let (mut d, _dev) = forwarding_with_a_reading("queue-writer:panic").await;
    d.wait_status_line(&["stage queue-writer", "running", "fatal policy"]);

    d.inject();
    let line = d.wait_line(&["ERROR", "stage=queue-writer", "policy=fatal", "panicked"]);
    assert!(line.contains("fault injected"), "{line}");
    // The gateway stops and exits non-zero so that systemd restarts it: no more watchdog.
    let status = tokio::task::block_in_place(|| d.wait_exit());
    assert_eq!(status.code(), Some(1), "log:\n{}", d.log());
    let stopping = d.wait_note("STOPPING=1");
    assert!(
        stopping.contains("STATUS=stopping: stage queue-writer panicked"),
        "{stopping}"
    );
    let stopped = d.wait_line(&["wardgate stopped because stage queue-writer panicked"]);
    eprintln!("{line}\n{stopped}");
    // The status file left behind says which stage failed, and why.
    let line = d.wait_status_line(&["stage queue-writer", "FAILED"]);
    assert!(line.contains("panicked: fault injected"), "{line}");
    assert!(d.status().contains(" stopped since "), "{}", d.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_pipeline_is_not_reported_as_drained() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    cfg.metering.status_interval = Duration::from_millis(200);
    let mut d = spawn(&cfg, dir, &[("WG_FAULT", "pipeline:panic")]);
    let addr = d.ready();
    let dev = connect(options(addr, "pm-01", "pw")).await;
    reading(&dev, 70).await;
    d.inject();
    d.wait_line(&["ERROR", "stage=pipeline", "policy=fatal", "panicked"]);
    let status = tokio::task::block_in_place(|| d.wait_exit());
    assert_eq!(status.code(), Some(1), "log:\n{}", d.log());
    let stopped = d.wait_line(&["wardgate stopped because stage pipeline panicked"]);
    assert!(stopped.contains("drained=false"), "{stopped}");
    assert!(
        stopped.contains("failed=\"stage pipeline panicked"),
        "{stopped}"
    );
    let log = d.log();
    assert!(!log.contains("pipeline drained and stopped"), "{log}");
    d.wait_status_line(&["stage pipeline", "FAILED", "panicked: fault injected"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_restartable_stage_is_restarted_and_the_gateway_keeps_serving() {
    // The uplink is restarted: a new session re-reads the queue.
    let up = Upstream::new();
    let _mq = up.broker();
    let mut upstream = up.subscriber().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = upstream_config(dir.path(), up.port, &up.ca, &up.gateway_cert);
    let mut d = spawn(
        &cfg,
        dir,
        &[
            ("WATCHDOG_USEC", WATCHDOG_USEC),
            ("WG_FAULT", "uplink:panic"),
        ],
    );
    let addr = d.ready();
    let dev = connect(options(addr, "pm-01", "pw")).await;
    reading(&dev, 61).await;
    assert_eq!(next_upstream(&mut upstream).await, 61.0);

    d.inject();
    let line = d.wait_line(&["ERROR", "stage=uplink", "policy=restart", "panicked"]);
    assert!(line.contains("restarting it in"), "{line}");
    d.wait_line(&["stage uplink restarted"]);
    // Still fed, still serving: pings go on, a new reading is acknowledged and delivered.
    let pings = d.pings();
    d.wait_pings(pings + 3);
    reading(&dev, 62).await;
    // Delivery is at-least-once: a record whose upstream PUBACK the panicked session had not
    // yet turned into a removal comes again; nothing else may come before the new reading.
    let mut next = next_upstream(&mut upstream).await;
    while next == 61.0 {
        next = next_upstream(&mut upstream).await;
    }
    assert_eq!(next, 62.0);
    let line = d.wait_status_line(&["stage uplink", "running", "restarted 1 times"]);
    assert!(line.contains("panicked: fault injected"), "{line}");
    assert!(
        !d.log().contains("wardgate stopped because"),
        "a restartable stage does not stop the gateway:\n{}",
        d.log()
    );
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| d.wait_exit());
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
}

#[test]
fn a_stalled_stage_stops_the_watchdog_and_shows_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    cfg.metering.status_interval = Duration::from_millis(200);
    let mut d = spawn(
        &cfg,
        dir,
        &[
            ("WATCHDOG_USEC", WATCHDOG_USEC),
            ("WG_FAULT", "pipeline:stall"),
        ],
    );
    d.ready();
    d.wait_pings(3);
    d.inject();
    let line = d.wait_line(&["ERROR", "stage pipeline stalled", "stage=pipeline"]);
    assert!(line.contains("made no progress"), "{line}");
    eprintln!(
        "{}\n{line}",
        d.wait_line(&["fault injection: stage pipeline fails now"])
    );
    d.wait_line(&["ERROR", "watchdog is no longer fed", "pipeline"]);
    // Every ping sent before that line is in the socket now; none may follow it.
    d.read_all_sent();
    let pings = d.pings();
    std::thread::sleep(Duration::from_secs(3)); // six watchdog periods
    assert_eq!(
        d.pings(),
        pings,
        "the watchdog was fed while the pipeline stalled"
    );
    d.wait_status_line(&["stage pipeline", "STALLED"]);
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "a stall is left to the watchdog"
    );
}

/// The `/healthz` address out of the READY notification.
fn http_addr(ready: &str) -> std::net::SocketAddr {
    wardgate_tests::listener_addr_from_status(ready, "http").expect("STATUS names the endpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_queue_writer_turns_healthz_503_and_stops_the_watchdog() {
    let (mut d, _dev) = forwarding_with_a_reading("queue-writer:stall").await;
    let http = http_addr(&d.wait_note("READY=1"));
    let (code, body) = wardgate_tests::http_get(http, "/healthz");
    assert_eq!(code, 200, "{body}");

    d.inject();
    d.wait_line(&["ERROR", "stage queue-writer stalled", "stage=queue-writer"]);
    let (code, body) =
        tokio::task::spawn_blocking(move || wardgate_tests::http_get(http, "/healthz"))
            .await
            .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("unhealthy: stage queue-writer stalled"),
        "{body}"
    );
    assert!(body.contains("stage uplink "), "every stage listed: {body}");
    // The watchdog follows the same check.
    d.wait_line(&["ERROR", "watchdog is no longer fed", "queue-writer"]);
    d.read_all_sent();
    let pings = d.pings();
    let metrics = tokio::task::spawn_blocking(move || wardgate_tests::http_get(http, "/metrics"))
        .await
        .unwrap();
    assert_eq!(metrics.0, 200, "metrics are served while unhealthy");
    assert!(
        metrics
            .1
            .contains("wardgate_stage_up{stage=\"queue-writer\"} 0\n"),
        "{}",
        metrics.1
    );
    d.read_all_sent();
    assert_eq!(
        d.pings(),
        pings,
        "the watchdog was fed while /healthz said 503"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_never_says_ok_once_the_pipeline_died() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    let mut d = spawn(
        &cfg,
        dir,
        &[
            ("WATCHDOG_USEC", WATCHDOG_USEC),
            ("WG_FAULT", "pipeline:panic"),
        ],
    );
    let addr = d.ready();
    let http = http_addr(&d.wait_note("READY=1"));
    let dev = connect(options(addr, "pm-01", "pw")).await;
    reading(&dev, 70).await;
    assert_eq!(wardgate_tests::http_get(http, "/healthz").0, 200);
    d.inject();
    d.wait_line(&["ERROR", "stage=pipeline", "panicked"]);
    // From the failure to the exit, /healthz answers 503 (naming the stage or the stop) or
    // nothing at all: never 200.
    let mut answers = Vec::new();
    while d.child.try_wait().unwrap().is_none() {
        match wardgate_tests::http_request(http, "GET", "/healthz") {
            Ok((code, body)) => {
                assert_ne!(code, 200, "healthy after the pipeline died: {body}");
                answers.push(body);
            }
            Err(_) => break,
        }
    }
    if let Some(body) = answers.first() {
        assert!(
            body.contains("stage pipeline failed") || body.contains("stopping"),
            "{body}"
        );
    }
    let status = tokio::task::block_in_place(|| d.wait_exit());
    assert_eq!(status.code(), Some(1), "log:\n{}", d.log());
}

/// `check-config` on a configuration forwarding with these files.
fn check_config(dir: &Path, cfg: &Config) -> (Option<i32>, String) {
    let path = write(dir, "wardgate.toml", &config_toml(cfg));
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config").arg("-c").arg(&path);
    for (k, _) in std::env::vars() {
        if k.starts_with("WARDGATE_") {
            cmd.env_remove(k);
        }
    }
    let o = cmd.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn broken_upstream_tls_files_fail_check_config_and_the_start_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::new("Upstream CA");
    let gw = ca.device("test-gateway");
    let other = ca.device("someone-else");
    let expired = ca.expired_device("test-gateway");
    let cfg = upstream_config(dir.path(), free_port(), &ca, &gw);
    let (code, err) = check_config(dir.path(), &cfg);
    assert_eq!(code, Some(0), "good files pass: {err}");

    let key = cfg.upstream.key_file.clone().unwrap();
    let cert = cfg.upstream.cert_file.clone().unwrap();
    let key_s = key.display().to_string();
    let cases: [(&str, &str, &str, &Path, &str); 3] = [
        // (cert PEM, key PEM, key named, file named, problem)
        (
            &gw.cert_pem,
            "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
            "upstream.key_file",
            &key,
            "no usable private key",
        ),
        (
            &gw.cert_pem,
            &other.key_pem,
            "upstream.key_file",
            &key,
            "does not belong to upstream.cert_file",
        ),
        (
            &expired.cert_pem,
            &expired.key_pem,
            "upstream.cert_file",
            &cert,
            "expired",
        ),
    ];
    for (cert_pem, key_pem, named, file, problem) in cases {
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let (code, err) = check_config(dir.path(), &cfg);
        assert_eq!(code, Some(2), "{err}");
        let file = file.display().to_string();
        assert!(
            err.lines()
                .any(|l| l.contains(named) && l.contains(&file) && l.contains(problem)),
            "want `{named}`, {file} and `{problem}` in:\n{err}"
        );
    }

    // `run` refuses the same broken key before READY=1 and exits non-zero.
    std::fs::write(&cert, &gw.cert_pem).unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let mut d = spawn(&cfg, run_dir, &[("WATCHDOG_USEC", WATCHDOG_USEC)]);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(1), "log:\n{}", d.log());
    d.read_all_sent();
    assert!(
        d.notes_with("READY=1").is_empty(),
        "READY=1 was sent with a broken key"
    );
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("upstream.key_file") && l.contains(&key_s)),
        "{log}"
    );
}
