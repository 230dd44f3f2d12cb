//! The daemon's life as systemd sees it: READY=1 once listeners are up, SIGHUP reload,
//! SIGTERM under load draining to exit 0 with STOPPING=1, and watchdog pings.
//! The real binary runs as a subprocess with `NOTIFY_SOCKET` pointing at a socket the test owns.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::QoS;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardgate_tests::{
    config, config_toml, connect, device, options, plain_addr_from_status, try_connect,
    ConnectOutcome, NotifySocket,
};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");

struct Daemon {
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    notify: NotifySocket,
    addr: std::net::SocketAddr,
    config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(devices: Vec<wardgate::config::DeviceConfig>, env: &[(&str, &str)]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), devices);
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(&cfg)).unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let mut cmd = wardgate_tests::daemon_command(BIN, &config_path, &notify);
    cmd.stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // Drain stderr all the time: a full pipe would block the daemon's logging.
    let mut err = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
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
        _dir: dir,
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
                let payload = format!("{{\"heartbeat\":{},\"ts\":1795326538000}}", 80 + i % 30);
                if client
                    .publish("ward/pm-01/telemetry", QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Let the stream run, then stop the daemon in the middle of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        dev.acks.load(Ordering::SeqCst) > 50,
        "publishes are flowing"
    );
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
    std::thread::sleep(Duration::from_millis(200));
    let log = d.log.lock().unwrap().clone();
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
async fn sighup_reloads_the_device_registry_and_keeps_connections() {
    let mut d = start(vec![device("pm-01", "pacemaker", "pw")], &[]);
    let mut pm = connect(options(d.addr, "pm-01", "pw")).await;
    pm.subscribe("ward/pm-01/telemetry").await;
    let t = Duration::from_secs(10);
    assert!(matches!(
        try_connect(options(d.addr, "gl-01", "gl"), t).await,
        ConnectOutcome::Refused(_)
    ));

    // Add a device to the file and reload.
    let mut text = std::fs::read_to_string(&d.config_path).unwrap();
    text.push_str(&format!(
        "\n[[devices]]\nid = \"gl-01\"\nkind = \"glucose\"\npassword_hash = \"{}\"\n",
        wardgate::registry::hash_password_demo("gl")
    ));
    std::fs::write(&d.config_path, text).unwrap();
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGHUP).unwrap();
    assert!(d
        .notify
        .wait_for("RELOADING=1", Duration::from_secs(10))
        .is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_connect(options(d.addr, "gl-01", "gl"), t).await {
            ConnectOutcome::Accepted => break,
            other if Instant::now() > deadline => panic!("new device still refused: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    // A broken file is rejected and the running registry stays.
    std::fs::write(&d.config_path, "[gateway\n").unwrap();
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        try_connect(options(d.addr, "gl-01", "gl"), t).await,
        ConnectOutcome::Accepted
    );

    // The connection made before the reloads still works.
    pm.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            b"after reload".to_vec(),
        )
        .await
        .unwrap();
    let (_, payload) = pm
        .next(Duration::from_secs(5))
        .await
        .expect("still connected");
    assert_eq!(payload, b"after reload");
    let _ = d.child.kill();
}

#[test]
fn watchdog_is_pinged_when_requested() {
    let mut d = start(
        vec![device("pm-01", "pacemaker", "pw")],
        &[("WATCHDOG_USEC", "200000")],
    );
    // A 200 ms interval means a ping every 100 ms: one second must show several.
    std::thread::sleep(Duration::from_secs(1));
    let pings = d
        .notify
        .drain()
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 3,
        "expected WATCHDOG=1 pings, saw {:?}",
        d.notify.drain()
    );
}
