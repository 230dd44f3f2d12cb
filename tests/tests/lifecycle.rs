//! The daemon's life as systemd sees it: READY=1 once listeners are up, SIGHUP reload (the
//! new registry and log level in force once READY=1 follows RELOADING=1), SIGTERM under load
//! draining to exit 0 with STOPPING=1, and watchdog pings; rules replaced by a reload.
//! The real binary runs as a subprocess with `NOTIFY_SOCKET` pointing at a socket the test owns.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::QoS;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardgate::config::{DeviceConfig, LogLevel};
use wardgate_tests::{
    config, config_toml, connect, device, options, pacemaker_reading, plain_addr_from_status,
    try_connect, ConnectOutcome, Log, NotifySocket,
};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");

struct Daemon {
    child: Child,
    log: Log,
    notify: NotifySocket,
    addr: std::net::SocketAddr,
    config_path: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Write a new configuration file: `devices`, log level `level`, the rest as at start.
    fn rewrite_config(&self, devices: Vec<DeviceConfig>, level: LogLevel) {
        let mut cfg = config(self.dir.path(), devices);
        cfg.log.level = level;
        std::fs::write(&self.config_path, config_toml(&cfg)).unwrap();
    }

    /// SIGHUP, then wait until the daemon says the reload is over (RELOADING=1, then READY=1)
    /// and return its outcome line from the log.
    fn reload(&mut self, outcome: &str) -> String {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGHUP).unwrap();
        assert!(
            self.notify.reloaded(Duration::from_secs(20)),
            "no RELOADING=1 then READY=1 within 20 s; saw {:?}",
            self.notify.drain()
        );
        self.log
            .wait_for(outcome, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no `{outcome}` line in:\n{}", self.log.text()))
    }
}

fn start(devices: Vec<DeviceConfig>, env: &[(&str, &str)]) -> Daemon {
    start_with(|dir| config(dir, devices), env)
}

fn start_with(
    make: impl FnOnce(&std::path::Path) -> wardgate::config::Config,
    env: &[(&str, &str)],
) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let cfg = make(dir.path());
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(&cfg)).unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let mut cmd = wardgate_tests::daemon_command(BIN, &config_path, &notify);
    cmd.stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log = Log::capture(&mut child);
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(20))
        .expect("READY=1 within 20 s");
    let addr = plain_addr_from_status(&ready).expect("STATUS names the plain listener");
    Daemon {
        child,
        log,
        notify,
        addr,
        config_path,
        dir,
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_a_stream_of_publishes_drains_and_exits_zero() {
    let mut d = start(vec![device("pm-01", "pacemaker", "pw")], &[]);
    let dev = connect(options(d.addr, "pm-01", "pw")).await;
    let sent = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (sent, running, client) = (sent.clone(), running.clone(), dev.client.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while running.load(Ordering::SeqCst) {
                let payload = pacemaker_reading(80 + (i % 30) as u32);
                if client
                    .publish("ward/pm-01/telemetry", QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                i += 1;
                // Pacing of the stream, not a wait: a device publishing every ~2 ms.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Once the stream is flowing, stop the daemon in the middle of it.
    dev.wait_acks(50, Duration::from_secs(20)).await;
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGTERM).unwrap();

    let status = tokio::task::block_in_place(|| wait_exit(&mut d.child, Duration::from_secs(15)))
        .expect("exits within the shutdown deadline");
    running.store(false, Ordering::SeqCst);
    publisher.abort();
    assert_eq!(status.code(), Some(0), "clean exit");
    assert!(
        d.notify
            .wait_for("STOPPING=1", Duration::from_secs(1))
            .is_some(),
        "STOPPING=1 sent; saw {:?}",
        d.notify.drain()
    );
    // The process exited: its stderr closes once the last line is read.
    assert!(d.log.wait_closed(Duration::from_secs(10)), "stderr closed");
    let log = d.log.text();
    assert!(log.contains("wardgate stopped"), "{log}");
    // Every reading the device got a PUBACK for was handled by the pipeline before exit.
    let handled: u64 = log
        .lines()
        .find(|l| l.contains("pipeline drained and stopped"))
        .and_then(|l| l.split("readings=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("drain line with a count");
    let acked = dev.acks.load(Ordering::SeqCst);
    assert!(
        handled >= acked,
        "pipeline handled {handled} readings but the device got {acked} PUBACKs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_device_registry_and_log_level_and_keeps_connections() {
    // Built once: a rehashed password (a new salt) is a credential change.
    let pm_01 = {
        let d = device("pm-01", "pacemaker", "pw");
        move || d.clone()
    };
    let mut d = start(vec![pm_01(), device("bt-01", "bed-temperature", "bt")], &[]);
    let mut pm = connect(options(d.addr, "pm-01", "pw")).await;
    pm.subscribe("ward/pm-01/telemetry").await;
    let t = Duration::from_secs(10);
    assert_eq!(
        try_connect(options(d.addr, "bt-01", "bt"), t).await,
        ConnectOutcome::Accepted
    );
    assert!(matches!(
        try_connect(options(d.addr, "gl-01", "gl"), t).await,
        ConnectOutcome::Refused(_)
    ));
    // At `info`, a handled message leaves no `message handled` (debug) line. Its PUBACK comes
    // after the pipeline handled it, so the line would already be written.
    let heartbeat = |payload: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(payload).unwrap()["heartbeat"].clone()
    };
    pm.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            pacemaker_reading(70),
        )
        .await
        .unwrap();
    pm.wait_acks(1, t).await;
    let (_, payload) = pm.next(t).await.expect("own subscription");
    assert_eq!(heartbeat(&payload), 70);

    // Add gl-01, remove bt-01, turn the log level up to debug; reload.
    d.rewrite_config(
        vec![pm_01(), device("gl-01", "glucose", "gl")],
        LogLevel::Debug,
    );
    let line = d.reload("configuration reloaded");
    assert!(line.contains("devices=2"), "{line}");
    assert!(
        !d.log.text().contains("message handled"),
        "no debug line before the reload:\n{}",
        d.log.text()
    );
    // The new registry is in force at once: the added device gets in, the removed one not.
    assert_eq!(
        try_connect(options(d.addr, "gl-01", "gl"), t).await,
        ConnectOutcome::Accepted
    );
    assert_eq!(
        try_connect(options(d.addr, "bt-01", "bt"), t).await,
        ConnectOutcome::Refused(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    // The connection made before the reload still works, and the new level shows.
    pm.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            pacemaker_reading(71),
        )
        .await
        .unwrap();
    let (_, payload) = pm.next(t).await.expect("still connected");
    assert_eq!(heartbeat(&payload), 71);
    let handled = d
        .log
        .wait_for("message handled", t)
        .unwrap_or_else(|| panic!("debug level not in force:\n{}", d.log.text()));
    assert!(handled.contains("device_id=pm-01"), "{handled}");

    // A broken file is rejected, said so, and the running registry stays.
    std::fs::write(&d.config_path, "[gateway\n").unwrap();
    d.reload("configuration reload rejected; the running configuration stays in force");
    assert_eq!(
        try_connect(options(d.addr, "gl-01", "gl"), t).await,
        ConnectOutcome::Accepted
    );
    assert_eq!(
        try_connect(options(d.addr, "bt-01", "bt"), t).await,
        ConnectOutcome::Refused(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    let _ = d.child.kill();
}

#[test]
fn watchdog_is_pinged_when_requested() {
    let mut d = start(
        vec![device("pm-01", "pacemaker", "pw")],
        &[("WATCHDOG_USEC", "200000")],
    );
    // A 200 ms interval means a ping every 100 ms (half of it, as sd_watchdog_enabled(3)
    // advises): the daemon says so, and three pings arrive well within 10 s.
    let line = d
        .log
        .wait_for("systemd watchdog enabled", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no watchdog line in:\n{}", d.log.text()));
    assert!(line.contains("period_ms=100"), "{line}");
    let pings = d
        .notify
        .wait_count("WATCHDOG=1", 3, Duration::from_secs(10));
    assert!(
        pings >= 3,
        "expected WATCHDOG=1 pings, saw {:?}",
        d.notify.drain()
    );
}

fn republish_rule(name: &str, above: u32) -> wardgate::config::RuleConfig {
    wardgate::config::RuleConfig {
        name: name.into(),
        sql: format!("SELECT heartbeat FROM 'ward/+/telemetry' WHERE heartbeat > {above}"),
        actions: vec![wardgate::config::ActionConfig::Republish {
            topic: format!("alerts/{name}/${{topic(2)}}"),
            qos: 1,
        }],
        debounce: None,
        description: None,
    }
}

/// A reload replaces the edge rules: a removed rule fires no more, a new one fires at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_the_edge_rules() {
    let devices = {
        let mut nurse = device("nurse-01", "station", "n-pw");
        nurse.subscribe = Some(vec!["alerts/#".into()]);
        nurse.publish = Some(vec![]);
        let all = vec![device("pm-01", "pacemaker", "pw"), nurse];
        move || all.clone()
    };
    let mut d = start_with(
        |dir| {
            let mut c = config(dir, devices());
            c.rules = vec![republish_rule("high", 140)];
            c
        },
        &[],
    );
    let t = Duration::from_secs(10);
    let mut nurse = connect(options(d.addr, "nurse-01", "n-pw")).await;
    nurse.subscribe("alerts/#").await;
    let pm = connect(options(d.addr, "pm-01", "pw")).await;
    let send = |hr: u32| {
        let c = pm.client.clone();
        async move {
            c.publish(
                "ward/pm-01/telemetry",
                QoS::AtLeastOnce,
                false,
                pacemaker_reading(hr),
            )
            .await
            .unwrap();
        }
    };
    // 120 fires nothing, so the first alert is 150's.
    send(120).await;
    send(150).await;
    let (topic, payload) = nurse.next(t).await.expect("the alert of 150");
    assert_eq!(topic, "alerts/high/pm-01");
    assert!(String::from_utf8_lossy(&payload).contains("150"));

    let mut cfg = config(d.dir.path(), devices());
    cfg.rules = vec![republish_rule("low", 100)];
    std::fs::write(&d.config_path, config_toml(&cfg)).unwrap();
    let line = d.reload("configuration reloaded");
    assert!(line.contains("1 added, 1 removed, 0 changed"), "{line}");
    // 160 would fire `high`: once `low`'s alert of 160 has come, `high` did not fire on it
    // (its republish would have come first, from the same evaluation).
    send(120).await;
    send(160).await;
    let (topic, payload) = nurse.next(t).await.expect("the new rule's alert");
    assert_eq!(topic, "alerts/low/pm-01");
    assert!(String::from_utf8_lossy(&payload).contains("120"));
    let (topic, _) = nurse.next(t).await.expect("the new rule's second alert");
    assert_eq!(topic, "alerts/low/pm-01");
    pm.wait_acks(4, t).await;
    assert!(
        nurse.incoming.try_recv().is_err(),
        "nothing from the removed rule"
    );
}

/// `wardgate reload` waits for the outcome. A reload puts the new policy in force on a
/// connection made before it (a publish it allowed is now refused), disconnects a device
/// removed from the registry and one whose policy no longer covers its subscription, and
/// names what needs a restart; a broken file is rejected with the reason, and the running
/// configuration stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_puts_new_policies_in_force_and_disconnects_devices_no_longer_allowed() {
    let pm = {
        let d = device("pm-01", "pacemaker", "pw");
        move || d.clone()
    };
    let sub = {
        let d = device("gl-01", "glucose", "gl");
        move || d.clone()
    };
    let mut d = start(
        vec![pm(), sub(), device("bt-01", "bed-temperature", "bt")],
        &[],
    );
    let t = Duration::from_secs(10);
    let pm_c = connect(options(d.addr, "pm-01", "pw")).await;
    let mut gl_c = connect(options(d.addr, "gl-01", "gl")).await;
    gl_c.subscribe("ward/gl-01/telemetry").await;
    let _bt_c = connect(options(d.addr, "bt-01", "bt")).await;
    pm_c.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            pacemaker_reading(70),
        )
        .await
        .unwrap();
    pm_c.wait_acks(1, t).await;

    // pm-01 may now publish only to ward/pm-01/other; gl-01 may subscribe to nothing;
    // bt-01 is gone; the plain listener's address changes (needs a restart).
    let mut narrowed = pm();
    narrowed.publish = Some(vec!["ward/${device}/other".into()]);
    let mut deaf = sub();
    deaf.subscribe = Some(vec![]);
    let mut cfg = config(d.dir.path(), vec![narrowed, deaf]);
    cfg.listeners.plain.address = "127.0.0.1:1".parse().unwrap();
    std::fs::write(&d.config_path, config_toml(&cfg)).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["reload", "-c"])
        .arg(&d.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration reloaded"), "{stdout}");
    assert!(stdout.contains("devices"), "{stdout}");
    assert!(
        stdout.contains("needs a restart: listeners.plain.address"),
        "{stdout}"
    );
    for (device, why) in [
        ("bt-01", "removed from the device registry"),
        (
            "gl-01",
            "its policy no longer allows its subscription to `ward/gl-01/telemetry`",
        ),
    ] {
        // The two connections end on their own tasks, in either order: look at the whole log
        // rather than after the last line found.
        let wanted = format!("device disconnected: {why}");
        let deadline = Instant::now() + t;
        let line = loop {
            if let Some(l) = d.log.text().lines().find(|l| l.contains(&wanted)) {
                break l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{device} not disconnected:\n{}",
                d.log.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(line.contains(&format!("device_id={device}")), "{line}");
    }
    // The removed device cannot come back; the listener kept its address.
    assert_eq!(
        try_connect(options(d.addr, "bt-01", "bt"), t).await,
        ConnectOutcome::Refused(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    // pm-01's connection from before the reload is still up, under its new policy.
    assert!(
        !d.log
            .text()
            .lines()
            .any(|l| l.contains("device disconnected") && l.contains("device_id=pm-01")),
        "pm-01 was not to be disconnected by the reload:\n{}",
        d.log.text()
    );
    pm_c.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            pacemaker_reading(71),
        )
        .await
        .unwrap();
    let line = d
        .log
        .wait_for(
            "publish to `ward/pm-01/telemetry` is not allowed by its policy",
            t,
        )
        .unwrap_or_else(|| panic!("old policy still in force:\n{}", d.log.text()));
    assert!(line.contains("device_id=pm-01"), "{line}");

    // A broken file: rejected, with the file and the reason, and the registry stays.
    std::fs::write(&d.config_path, "[gateway]\nshutdown_timeout = \"soon\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["reload", "-c"])
        .arg(&d.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken reload must fail: {stderr}");
    // `wardgate reload` itself loads the file first and refuses it with the key.
    assert!(stderr.contains("shutdown_timeout"), "{stderr}");
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGHUP).unwrap();
    assert!(d.notify.reloaded(Duration::from_secs(20)));
    d.log
        .wait_for(
            "configuration reload rejected; the running configuration stays in force",
            t,
        )
        .unwrap_or_else(|| panic!("no rejection line:\n{}", d.log.text()));
    let outcome = wardgate::reload::read_outcome(d.dir.path()).expect("outcome file");
    assert_eq!(outcome.outcome, "rejected");
    assert!(
        outcome
            .problems
            .iter()
            .any(|p| p.contains("shutdown_timeout") && p.contains("wardgate.toml")),
        "{:?}",
        outcome.problems
    );
    assert_eq!(
        try_connect(options(d.addr, "bt-01", "bt"), t).await,
        ConnectOutcome::Refused(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    let _ = d.child.kill();
}
