//! Device shadows answered by the gateway: the real AWS IoT Device SDKs for Python (v1's
//! `AWSIoTMQTTShadowClient`, v2's `IotShadowClientV2`) over mutual TLS, unchanged; `$aws`
//! topics through the internal broker without ever reaching a wildcard subscriber; shadows
//! kept across a restart.
//!
//! The SDKs come from PyPI, pinned in `tests/python/requirements.txt`, in the virtualenv
//! `target/py` that `cargo xtask test` makes.

use rumqttc::QoS;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use wardgate::app::Gateway;
use wardgate::config::{AuthMode, Config, DeviceConfig};
use wardgate_tests::pki::{Ca, Issued, ListenerFiles};
use wardgate_tests::{config, connect, device, options, sdk_python, workspace};

const THING: &str = "Pacemaker-IoT";

struct Ward {
    gw: Gateway,
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl Ward {
    fn tls_port(&self) -> u16 {
        self.gw.listener_addr("tls").unwrap().port()
    }
}

fn cert_device(id: &str) -> DeviceConfig {
    let mut d = device(id, "pacemaker", "unused");
    d.password_hash = None;
    d.auth = Some(AuthMode::Certificate);
    d
}

/// A nurse station: may update any device's desired state and read every shadow reply.
fn nurse_station() -> DeviceConfig {
    let mut d = device("nurse-01", "station", "nurse-pw");
    d.publish = Some(vec!["$aws/things/+/shadow/update".into()]);
    d.subscribe = Some(vec!["$aws/things/+/shadow/#".into(), "#".into()]);
    d
}

fn ward_config(state: &std::path::Path, files: &ListenerFiles) -> Config {
    let mut cfg = config(state, vec![cert_device(THING), nurse_station()]);
    cfg.listeners.tls = files.config();
    cfg
}

async fn ward() -> Ward {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::new("Ward 7 CA");
    let files = ListenerFiles::write(dir.path(), &ca.server(), &[&ca], &ca.crl(&[]));
    let Issued {
        cert_pem, key_pem, ..
    } = ca.device(THING);
    let (cert_file, key_file) = (dir.path().join("device.crt"), dir.path().join("device.key"));
    std::fs::write(&cert_file, cert_pem).unwrap();
    std::fs::write(&key_file, key_pem).unwrap();
    let state = dir.path().join("state");
    let gw = Gateway::start(&ward_config(&state, &files)).await.unwrap();
    Ward {
        gw,
        ca_file: files.ca.clone(),
        cert_file,
        key_file,
        dir,
    }
}

/// Run one SDK script against the ward; its JSON lines as they come, on a channel.
fn run_sdk(
    w: &Ward,
    script: &str,
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<Value>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(sdk_python())
        .arg(workspace().join("tests/python").join(script))
        .args(["127.0.0.1", &w.tls_port().to_string()])
        .args([&w.ca_file, &w.cert_file, &w.key_file])
        .arg(THING)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            match serde_json::from_str::<Value>(&l) {
                Ok(v) => {
                    let _ = tx.send(v);
                }
                Err(_) => eprintln!("sdk: {l}"),
            }
        }
    });
    (child, rx)
}

async fn step(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>, name: &str) -> Value {
    let v = tokio::time::timeout(Duration::from_secs(90), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no `{name}` step from the SDK within 90 s"))
        .unwrap_or_else(|| panic!("the SDK script ended before `{name}`"));
    assert_eq!(v["step"], name, "{v}");
    eprintln!("{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_iot_sdk_v1_shadow_client_works_unchanged() {
    let w = ward().await;
    let plain = w.gw.listener_addr("plain").unwrap();
    let nurse = connect(options(plain, "nurse-01", "nurse-pw")).await;
    let (mut child, mut rx) = run_sdk(&w, "shadow_sdk_v1.py");

    let v = step(&mut rx, "update-reported").await;
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["payload"]["state"]["reported"]["heartbeat"], 141);
    assert_eq!(v["payload"]["version"], 1);
    assert!(v["payload"]["metadata"]["reported"]["heartbeat"]["timestamp"].is_i64());

    let v = step(&mut rx, "get").await;
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["payload"]["state"]["reported"]["heartbeat"], 141);
    assert_eq!(v["payload"]["version"], 1);

    // The nurse station asks for another pacing mode; the device hears the delta.
    let v = step(&mut rx, "waiting-for-delta").await;
    assert_eq!(v["status"], "ready", "{v}");
    nurse
        .client
        .publish(
            format!("$aws/things/{THING}/shadow/update"),
            QoS::AtLeastOnce,
            false,
            json!({"state": {"desired": {"pacing_mode": "DDD"}}}).to_string(),
        )
        .await
        .unwrap();
    let v = step(&mut rx, "delta").await;
    assert_eq!(v["status"], "received", "{v}");
    assert_eq!(v["payload"]["state"], json!({"pacing_mode": "DDD"}));
    assert_eq!(v["payload"]["version"], 2);

    let v = step(&mut rx, "stale-version").await;
    assert_eq!(v["status"], "rejected", "{v}");
    assert_eq!(v["payload"]["code"], 409);
    assert_eq!(v["payload"]["message"], "Version conflict");

    let v = step(&mut rx, "delete").await;
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["payload"]["version"], 2);

    let v = step(&mut rx, "get-deleted").await;
    assert_eq!(v["status"], "rejected", "{v}");
    assert_eq!(v["payload"]["code"], 404);

    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the SDK script ends")
        .unwrap();
    assert!(status.success(), "{status}");
    let s = w.gw.shadow_stats();
    assert_eq!(s.rejected, 2, "{s:?}");
    assert!(s.accepted >= 4, "{s:?}");
    w.gw.stop(Duration::from_secs(10)).await;
    drop(w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_iot_sdk_v2_shadow_client_works_unchanged() {
    let w = ward().await;
    let (mut child, mut rx) = run_sdk(&w, "shadow_sdk_v2.py");
    let v = step(&mut rx, "delta-stream").await;
    assert!(v["status"].as_str().unwrap().contains("ESTABLISHED"), "{v}");
    let v = step(&mut rx, "update-reported").await;
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["payload"]["version"], 1, "{v}");
    let v = step(&mut rx, "get").await;
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["payload"]["state"]["reported"]["heartbeat"], 141, "{v}");
    let v = step(&mut rx, "update-desired").await;
    assert_eq!(v["status"], "accepted", "{v}");
    let v = step(&mut rx, "delta").await;
    assert_eq!(v["status"], "received", "{v}");
    assert_eq!(v["payload"]["state"], json!({"pacing_mode": "DDD"}));
    assert_eq!(v["payload"]["version"], 2);
    let v = step(&mut rx, "named-update").await;
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(
        v["payload"]["version"], 1,
        "a named shadow has its own version: {v}"
    );
    let v = step(&mut rx, "named-get").await;
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(v["payload"]["state"]["reported"]["rate_limit"], 120, "{v}");
    let v = step(&mut rx, "delete").await;
    assert_eq!(v["status"], "accepted", "{v}");
    let v = step(&mut rx, "get-deleted").await;
    assert_eq!(v["status"], "rejected", "{v}");
    assert_eq!(v["payload"]["code"], 404, "{v}");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the SDK script ends")
        .unwrap();
    assert!(status.success(), "{status}");
    w.gw.stop(Duration::from_secs(10)).await;
}

/// `$aws` replies reach the filters that name them (wildcards inside `$aws` included) and
/// never a subscriber of `#`, although the broker keeps them under a name `#` matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_topics_reach_only_aws_filters() {
    let dir = tempfile::tempdir().unwrap();
    let mut only_hash = device("display-01", "station", "d-pw");
    only_hash.subscribe = Some(vec!["#".into()]);
    only_hash.publish = Some(vec!["#".into()]);
    let cfg = config(
        dir.path(),
        vec![
            device("pm-01", "pacemaker", "pw"),
            nurse_station(),
            only_hash,
        ],
    );
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut nurse = connect(options(addr, "nurse-01", "nurse-pw")).await;
    nurse.subscribe("$aws/things/+/shadow/update/+").await;
    let mut display = connect(options(addr, "display-01", "d-pw")).await;
    display.subscribe("#").await;
    let mut pm = connect(options(addr, "pm-01", "pw")).await;
    pm.subscribe("$aws/things/pm-01/shadow/update/accepted")
        .await;
    pm.client
        .publish(
            "$aws/things/pm-01/shadow/update",
            QoS::AtLeastOnce,
            false,
            json!({"state": {"reported": {"heartbeat": 72}}, "clientToken": "t-1"}).to_string(),
        )
        .await
        .unwrap();
    let (topic, payload) = pm.next(Duration::from_secs(10)).await.expect("accepted");
    assert_eq!(topic, "$aws/things/pm-01/shadow/update/accepted");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["clientToken"], "t-1");
    assert_eq!(v["state"]["reported"]["heartbeat"], 72);
    // The nurse's `+` inside `$aws` gets accepted and documents (no delta: no desired).
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (t, _) = nurse
            .next(Duration::from_secs(10))
            .await
            .expect("nurse reply");
        seen.push(t);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "$aws/things/pm-01/shadow/update/accepted",
            "$aws/things/pm-01/shadow/update/documents"
        ]
    );
    // A message after the shadow replies: once it arrives at `#`, nothing of `$aws` came first.
    pm.client
        .publish("ward/pm-01/telemetry", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let (t, _) = display
        .next(Duration::from_secs(10))
        .await
        .expect("telemetry");
    assert_eq!(t, "ward/pm-01/telemetry", "a `#` subscriber got {t}");
    assert!(display.incoming.try_recv().is_err());
    gw.stop(Duration::from_secs(10)).await;
}

/// An accepted update is on disk: the shadow is there after a restart, its version continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    for (round, hr) in [(1, 70), (2, 80)] {
        let gw = Gateway::start(&cfg).await.unwrap();
        let addr = gw.listener_addr("plain").unwrap();
        let mut pm = connect(options(addr, "pm-01", "pw")).await;
        pm.subscribe("$aws/things/pm-01/shadow/+/accepted").await;
        pm.client
            .publish("$aws/things/pm-01/shadow/get", QoS::AtLeastOnce, false, "")
            .await
            .unwrap();
        if round == 2 {
            let (t, p) = pm.next(Duration::from_secs(10)).await.expect("get reply");
            assert_eq!(t, "$aws/things/pm-01/shadow/get/accepted");
            let v: Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["state"]["reported"]["heartbeat"], 70, "{v}");
            assert_eq!(v["version"], 1, "{v}");
        }
        pm.client
            .publish(
                "$aws/things/pm-01/shadow/update",
                QoS::AtLeastOnce,
                false,
                json!({"state": {"reported": {"heartbeat": hr}}}).to_string(),
            )
            .await
            .unwrap();
        let (t, p) = pm
            .next(Duration::from_secs(10))
            .await
            .expect("update reply");
        assert_eq!(t, "$aws/things/pm-01/shadow/update/accepted");
        let v: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["version"], round, "{v}");
        pm.wait_acks(2, Duration::from_secs(10)).await;
        assert!(gw.stop(Duration::from_secs(10)).await.drained);
    }
}

/// A thing has at most 16 named shadows, also when the creations arrive together (one group
/// of the shadow service) and when some of them were deleted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_shadows_are_bounded_per_thing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut pm = connect(options(addr, "pm-01", "pw")).await;
    pm.subscribe("$aws/things/pm-01/shadow/name/+/+/+").await;
    let max = wardgate::shadow::MAX_NAMED_PER_THING;
    let client = pm.client.clone();
    let update = |name: String| {
        let c = client.clone();
        async move {
            c.publish(
                format!("$aws/things/pm-01/shadow/name/{name}/update"),
                QoS::AtLeastOnce,
                false,
                json!({"state": {"reported": {"n": 1}}}).to_string(),
            )
            .await
            .unwrap();
        }
    };
    // One at a time, as a device waiting for each answer (more than 10 in flight would be
    // answered 429, another test's subject).
    let mut replies = std::collections::BTreeMap::<String, Value>::new();
    for i in 0..=max {
        update(format!("s{i}")).await;
        while replies.len() <= i {
            let (t, p) = pm
                .next(Duration::from_secs(10))
                .await
                .expect("a reply each");
            if t.ends_with("/update/accepted") || t.ends_with("/update/rejected") {
                replies.insert(t, serde_json::from_slice(&p).unwrap());
            }
        }
    }
    let rejected: Vec<_> = replies
        .iter()
        .filter(|(t, _)| t.ends_with("rejected"))
        .collect();
    assert_eq!(rejected.len(), 1, "{replies:?}");
    assert_eq!(rejected[0].1["code"], 400);
    assert!(rejected[0].1["message"]
        .as_str()
        .unwrap()
        .contains("Too many named shadows"));
    // Deleting one makes room for one.
    pm.client
        .publish(
            "$aws/things/pm-01/shadow/name/s0/delete",
            QoS::AtLeastOnce,
            false,
            "",
        )
        .await
        .unwrap();
    update("again".into()).await;
    let mut accepted_again = false;
    while !accepted_again {
        let (t, _) = pm.next(Duration::from_secs(10)).await.expect("replies");
        assert!(!t.ends_with("again/update/rejected"), "{t}");
        accepted_again = t == "$aws/things/pm-01/shadow/name/again/update/accepted";
    }
    gw.stop(Duration::from_secs(10)).await;
}

/// IoT Core's limit of 10 requests in flight per thing: with the shadow service held up (the
/// test builds' fault injection stalls it), a thing's 11th waiting request is answered at once
/// with 429 on its `/rejected` topic, with its clientToken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eleventh_request_in_flight_gets_429() {
    const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &dir.path().join("state"),
        vec![device("pm-01", "pacemaker", "pw")],
    );
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, wardgate_tests::config_toml(&cfg)).unwrap();
    let mut notify = wardgate_tests::NotifySocket::bind(dir.path());
    let mut cmd = wardgate_tests::daemon_command(BIN, &config_path, &notify);
    cmd.stderr(std::process::Stdio::piped())
        .env("WG_FAULT", "shadows:stall");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(cmd.spawn().unwrap());
    let mut log = wardgate_tests::Log::capture(&mut child.0);
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(30))
        .expect("READY=1");
    let addr = wardgate_tests::plain_addr_from_status(&ready).unwrap();
    let mut pm = connect(options(addr, "pm-01", "pw")).await;
    pm.subscribe("$aws/things/pm-01/shadow/update/rejected")
        .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    log.wait_for(
        "fault injection: stage shadows fails now",
        Duration::from_secs(30),
    )
    .expect("the shadow service is held up");
    for i in 0..=wardgate::shadow::MAX_IN_FLIGHT_PER_THING {
        let body =
            json!({"state": {"reported": {"heartbeat": 60 + i}}, "clientToken": format!("t{i}")});
        pm.client
            .publish(
                "$aws/things/pm-01/shadow/update",
                QoS::AtMostOnce,
                false,
                body.to_string(),
            )
            .await
            .unwrap();
    }
    let (topic, payload) = pm.next(Duration::from_secs(30)).await.expect("a rejection");
    assert_eq!(topic, "$aws/things/pm-01/shadow/update/rejected");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["code"], 429, "{v}");
    assert_eq!(v["message"], "Too Many Requests");
    assert_eq!(
        v["clientToken"],
        format!("t{}", wardgate::shadow::MAX_IN_FLIGHT_PER_THING),
        "the 11th is the one refused"
    );
    assert!(v["timestamp"].is_i64(), "{v}");
}
