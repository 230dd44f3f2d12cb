//! Logging into a real systemd-journald: the daemon's records carry
//! `SYSLOG_IDENTIFIER=wardgate` and structured fields, and `journalctl DEVICE_ID=...` finds them.
//!
//! No journald runs on a build machine without systemd as PID 1, so the test starts one: in a
//! private mount namespace (`unshare --mount`, root) it mounts fresh tmpfs over
//! `/run/systemd/journal` and `/run/log` (and `/var/log/journal` when present), starts
//! `/lib/systemd/systemd-journald` there, runs `wardgate run` with `log.format = "journal"`, and
//! reads the result back with the real `journalctl`. The host's journal is never touched.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::QoS;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wardgate_tests::{
    config, config_toml, connect, device, options, plain_addr_from_status, try_connect,
    ConnectOutcome, NotifySocket,
};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");

const SCRIPT: &str = r#"
set -eu
mount -t tmpfs tmpfs /run/systemd/journal
mount -t tmpfs tmpfs /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
env -u NOTIFY_SOCKET -u WATCHDOG_USEC /lib/systemd/systemd-journald >"$DIR/journald.out" 2>&1 &
JPID=$!
i=0
while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
"$WARDGATE" run -c "$CONFIG" &
WPID=$!
echo $WPID > "$DIR/wardgate.pid"
set +e
wait $WPID
echo $? > "$DIR/exit"
set -e
journalctl --no-pager -o json SYSLOG_IDENTIFIER=wardgate > "$DIR/all.json"
journalctl --no-pager -o json DEVICE_ID=pm-01 > "$DIR/pm.json"
kill $JPID
"#;

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn field<'a>(r: &'a serde_json::Value, k: &str) -> &'a str {
    r.get(k).and_then(|v| v.as_str()).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_records_carry_identifier_and_device_fields() {
    for dir in ["/run/systemd/journal", "/run/log"] {
        std::fs::create_dir_all(dir).expect("mount points (the test runs as root)");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    // An upstream that never lets the uplink in: its retries must tell what waits in the queue.
    let mut ca = wardgate_tests::pki::Ca::new("Upstream CA");
    let gw = ca.device("test-gateway");
    for (name, pem) in [
        ("up-ca.pem", ca.cert.pem()),
        ("gw.pem", gw.cert_pem.clone()),
        ("gw.key", gw.key_pem.clone()),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    cfg.upstream.enabled = true;
    cfg.upstream.endpoint = "localhost".into();
    // The "upstream" accepts each connection and closes it at once: the uplink's TLS handshake
    // fails, it logs the retry, and the test counts its attempts.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    cfg.upstream.port = upstream.local_addr().unwrap().port();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = attempts.clone();
    let refuser = tokio::spawn(async move {
        while let Ok((conn, _)) = upstream.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    cfg.upstream.ca_file = Some(dir.path().join("up-ca.pem"));
    cfg.upstream.cert_file = Some(dir.path().join("gw.pem"));
    cfg.upstream.key_file = Some(dir.path().join("gw.key"));
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(&cfg)).unwrap();
    let mut notify = NotifySocket::bind(dir.path());

    let mut script = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", SCRIPT])
        .env("DIR", dir.path())
        .env("WARDGATE", BIN)
        .env("CONFIG", &config_path)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WARDGATE_LOG__FORMAT", "journal")
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) runs");

    let ready = notify
        .wait_for("READY=1", Duration::from_secs(30))
        .expect("wardgate became ready under the test journald");
    let addr = plain_addr_from_status(&ready).unwrap();
    let pm = connect(options(addr, "pm-01", "pw")).await;
    // A heart rate the pacemaker plugin flags: its own log line must carry PLUGIN and DEVICE_ID.
    pm.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            wardgate_tests::pacemaker_reading(200),
        )
        .await
        .unwrap();
    assert!(matches!(
        try_connect(options(addr, "intruder", "x"), Duration::from_secs(10)).await,
        ConnectOutcome::Refused(_)
    ));
    // The reading is on disk once its PUBACK is here. Every attempt the refuser accepts from
    // now on fails with the reading queued, and the uplink logs that failure before it sleeps
    // and tries again: a second attempt means the first one's record is in the journal.
    pm.wait_acks(1, Duration::from_secs(10)).await;
    let before = attempts.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while attempts.load(std::sync::atomic::Ordering::SeqCst) < before + 2 {
        assert!(
            Instant::now() < deadline,
            "the uplink did not retry twice within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pid: i32 = std::fs::read_to_string(dir.path().join("wardgate.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = script.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "namespace script did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    refuser.abort();
    assert!(status.success(), "namespace script failed: {status}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("exit"))
            .unwrap()
            .trim(),
        "0",
        "wardgate exit code"
    );

    let all = records(&dir.path().join("all.json"));
    assert!(!all.is_empty(), "no wardgate records in the journal");
    let connected = all
        .iter()
        .find(|r| field(r, "MESSAGE") == "device connected")
        .unwrap_or_else(|| panic!("no 'device connected' record in {all:#?}"));
    assert_eq!(field(connected, "DEVICE_ID"), "pm-01");
    assert_eq!(field(connected, "LISTENER"), "plain");
    assert_eq!(field(connected, "KIND"), "pacemaker");
    assert!(field(connected, "PEER").starts_with("127.0.0.1:"));
    // systemd-journal-logger maps log's INFO to syslog "notice" (5) and DEBUG to "info" (6).
    assert_eq!(field(connected, "PRIORITY"), "5", "INFO record");
    assert_eq!(field(connected, "SYSLOG_IDENTIFIER"), "wardgate");

    let refused = all
        .iter()
        .find(|r| field(r, "MESSAGE").starts_with("connection refused"))
        .expect("a refusal record");
    assert_eq!(field(refused, "DEVICE_ID"), "intruder");
    assert_eq!(field(refused, "REASON"), "unknown device id");
    assert_eq!(field(refused, "PRIORITY"), "4", "warning");

    // `journalctl DEVICE_ID=pm-01` selects exactly that device's records.
    let pm_records = records(&dir.path().join("pm.json"));
    assert!(pm_records.len() >= 2, "{pm_records:#?}");
    assert!(pm_records.iter().all(|r| field(r, "DEVICE_ID") == "pm-01"));
    assert!(all
        .iter()
        .any(|r| field(r, "MESSAGE") == "wardgate stopped"));

    // While the upstream is away, every retry says what waits in the queue.
    let retries: Vec<_> = all
        .iter()
        .filter(|r| field(r, "MESSAGE").starts_with("upstream connection lost or refused"))
        .collect();
    assert!(retries.len() >= 2, "{all:#?}");
    let last = retries
        .iter()
        .find(|r| field(r, "QUEUED") == "1")
        .unwrap_or_else(|| panic!("no retry record shows the queued reading: {retries:#?}"));
    assert!(field(last, "QUEUED_BYTES").parse::<u64>().unwrap() > 0);
    assert!(field(last, "OLDEST_AGE_S").parse::<u64>().is_ok());
    assert!(!field(last, "RETRY_IN_MS").is_empty());
    assert_eq!(field(last, "PRIORITY"), "4", "warning");

    // The plugin's own log call, with the plugin and the device it was working for.
    let from_plugin = all
        .iter()
        .find(|r| field(r, "MESSAGE").contains("outside 40"))
        .unwrap_or_else(|| panic!("no plugin log record in {all:#?}"));
    assert_eq!(field(from_plugin, "PLUGIN"), "pacemaker");
    assert_eq!(field(from_plugin, "DEVICE_ID"), "pm-01");
    assert!(all
        .iter()
        .any(|r| field(r, "MESSAGE") == "plugin loaded pacemaker"
            && field(r, "PLUGIN") == "pacemaker"));
}
