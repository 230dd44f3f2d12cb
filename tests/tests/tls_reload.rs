//! Certificate rotation on the running daemon: SIGHUP (and `wardgate reload`) swap the server
//! certificate for new handshakes while connected devices stay connected; a broken file is
//! rejected and the previous material keeps serving, and a later good one is taken. Each step
//! waits for the reload's end (RELOADING=1, then READY=1) and its log line, then checks the
//! certificate served. Also `wardgate status`.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wardgate::config::AuthMode;
use wardgate_tests::pki::{tls_connect, Ca, ListenerFiles};
use wardgate_tests::{
    config, config_toml, device, listener_addr_from_status, Log, NotifySocket, Raw,
};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_rotates_without_dropping_devices() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::new("Ward CA");
    let server1 = ca.server();
    let files = ListenerFiles::write(dir.path(), &server1, &[&ca], &ca.crl(&[]));
    let mut pm = device("pm-01", "pacemaker", "x");
    pm.password_hash = None;
    pm.auth = Some(AuthMode::Certificate);
    let mut cfg = config(&dir.path().join("state"), vec![pm]);
    cfg.listeners.tls = files.config();
    cfg.metering.status_interval = Duration::from_millis(200);
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(&cfg)).unwrap();

    let mut notify = NotifySocket::bind(dir.path());
    let mut child = wardgate_tests::daemon_command(BIN, &config_path, &notify)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = Log::capture(&mut child);
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(20))
        .expect("ready");
    let addr = listener_addr_from_status(&ready, "tls").expect("tls listener in STATUS");

    let device_cert = ca.device("pm-01");
    let (stream, seen) = tls_connect(addr, &ca, Some(&device_cert)).await.unwrap();
    assert_eq!(seen, server1.der);
    let mut old = Raw::new(stream);
    assert_eq!(
        old.connect("pm-01", None).await,
        Some(ConnectReturnCode::Success)
    );

    // Rotate: new key and certificate on disk, then SIGHUP.
    let server2 = ca.server();
    std::fs::write(&files.cert, &server2.cert_pem).unwrap();
    std::fs::write(&files.key, &server2.key_pem).unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    let mut reloaded = |outcome: &str| {
        assert!(
            notify.reloaded(Duration::from_secs(20)),
            "no RELOADING=1 then READY=1 within 20 s; saw {:?}",
            notify.drain()
        );
        log.wait_for(outcome, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no `{outcome}` line in:\n{}", log.text()))
    };
    reloaded("TLS material reloaded");
    let (_, seen) = tls_connect(addr, &ca, Some(&device_cert)).await.unwrap();
    assert!(
        seen == server2.der,
        "a new handshake after the reload sees the new certificate"
    );
    // The device connected before the rotation is still served.
    old.send(&Packet::PingReq).await.unwrap();
    assert_eq!(
        old.recv(Duration::from_secs(5)).await,
        Ok(Some(Packet::PingResp))
    );

    // A broken certificate file is rejected; the current material keeps serving.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    let o = Command::new(BIN)
        .args(["reload", "-c", config_path.to_str().unwrap()])
        .output()
        .unwrap();
    // `wardgate reload` waits for the outcome: rejected, with the file and the reason.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("listeners.tls.cert_file") && stderr.contains("no CERTIFICATE"),
        "{stderr}"
    );
    let line = reloaded("TLS reload rejected");
    assert!(line.contains("previous certificate"), "{line}");
    let (stream, seen) = tls_connect(addr, &ca, Some(&device_cert)).await.unwrap();
    assert!(seen == server2.der, "still the last good certificate");
    let mut fresh = Raw::new(stream);
    assert_eq!(
        fresh.connect("pm-01", None).await,
        Some(ConnectReturnCode::Success)
    );

    // The rejection left nothing stuck: the next good rotation is taken.
    let server3 = ca.server();
    std::fs::write(&files.cert, &server3.cert_pem).unwrap();
    std::fs::write(&files.key, &server3.key_pem).unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    reloaded("TLS material reloaded");
    let (_, seen) = tls_connect(addr, &ca, Some(&device_cert)).await.unwrap();
    assert!(seen == server3.der, "the third certificate is served");

    // `wardgate status` shows the device connected once the status file (written every
    // 200 ms) has caught up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let o = Command::new(BIN)
            .args(["status", "-c", config_path.to_str().unwrap()])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let connected = o.status.success()
            && out
                .lines()
                .any(|l| l.starts_with("pm-01") && l.contains(" yes "));
        if connected {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "pm-01 never shown connected:\n{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(out.contains("listener tls"), "{out}");

    let _ = child.kill();
    let _ = child.wait();
}
