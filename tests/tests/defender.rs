//! The defender agent end to end: the real AWS Device Defender agent (PyPI
//! `AWSIoTDeviceDefenderAgentSDK`, run unchanged through `tests/python/defender_agent.py`,
//! which only adds the port) over mutual TLS with ALPN `x-amzn-mqtt-ca`, malformed reports
//! rejected with a reason, and local Detect catching a rogue agent with short windows
//! (time compressed: `metering.window` = 2 s) while the rest of the ward keeps flowing.

use rand::Rng;
use rumqttc::QoS;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use wardgate::app::Gateway;
use wardgate::config::{AuthMode, Config, DeviceConfig};
use wardgate_tests::pki::{Ca, Issued, ListenerFiles};
use wardgate_tests::{
    config, connect, device, options, sdk_python, try_connect, until, workspace, ConnectOutcome,
};

struct Ward {
    gw: Gateway,
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
}

fn cert_device(id: &str, kind: &str) -> DeviceConfig {
    let mut d = device(id, kind, "unused");
    d.password_hash = None;
    d.auth = Some(AuthMode::Certificate);
    d
}

/// A gateway with a TLS listener; `tune` adjusts the configuration.
async fn ward(devices: Vec<DeviceConfig>, tune: impl FnOnce(&mut Config)) -> Ward {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::new("Ward 7 CA");
    let files = ListenerFiles::write(dir.path(), &ca.server(), &[&ca], &ca.crl(&[]));
    let mut cfg = config(&dir.path().join("state"), devices);
    cfg.listeners.tls = files.config();
    tune(&mut cfg);
    let gw = Gateway::start(&cfg).await.unwrap();
    Ward {
        gw,
        ca_file: files.ca.clone(),
        ca,
        dir,
    }
}

impl Ward {
    fn tls_port(&self) -> u16 {
        self.gw.listener_addr("tls").unwrap().port()
    }

    /// Write a certificate and key for device `id`; their paths.
    fn device_files(&mut self, id: &str) -> (PathBuf, PathBuf) {
        let Issued {
            cert_pem, key_pem, ..
        } = self.ca.device(id);
        let cert = self.dir.path().join(format!("{id}.crt"));
        let key = self.dir.path().join(format!("{id}.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        (cert, key)
    }

    /// Start the real Device Defender agent as `client_id` reporting for `thing`, every second,
    /// offering ALPN `x-amzn-mqtt-ca`; its output lines on a channel.
    fn agent(
        &mut self,
        client_id: &str,
        thing: &str,
        args: &[&str],
    ) -> (
        tokio::process::Child,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        use tokio::io::AsyncBufReadExt;
        let (cert, key) = self.device_files(client_id);
        let mut child = tokio::process::Command::new(sdk_python())
            .arg(workspace().join("tests/python/defender_agent.py"))
            .args([
                "--port",
                &self.tls_port().to_string(),
                "--alpn",
                "x-amzn-mqtt-ca",
            ])
            .args(["-e", "localhost", "-r"])
            .arg(&self.ca_file)
            .arg("-c")
            .arg(&cert)
            .arg("-k")
            .arg(&key)
            .args(["-id", client_id, "-t", thing, "-i", "1"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    eprintln!("agent: {l}");
                    let _ = tx.send(l);
                }
            });
        }
        (child, rx)
    }
}

/// The next message the device receives, as JSON.
async fn reply(dev: &mut wardgate_tests::Device) -> (String, Value) {
    let (t, p) = tokio::time::timeout(Duration::from_secs(10), dev.incoming.recv())
        .await
        .expect("a reply within 10 s")
        .expect("connected");
    (t, serde_json::from_slice::<Value>(&p).unwrap())
}

async fn line_starting(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    prefix: &str,
    within: Duration,
) -> String {
    tokio::time::timeout(within, async {
        while let Some(l) = rx.recv().await {
            if l.starts_with(prefix) {
                return l;
            }
        }
        panic!("the agent ended before printing `{prefix}...`");
    })
    .await
    .unwrap_or_else(|_| panic!("no `{prefix}...` from the agent within {within:?}"))
}

fn defender(gw: &Gateway) -> wardgate::defender::DefenderStatus {
    gw.status_snapshot()
        .defender
        .expect("the defender is enabled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_defender_agent_is_answered_accepted_in_json_and_cbor() {
    let mut w = ward(
        vec![
            cert_device("bed-12", "bed-temperature"),
            cert_device("bed-14", "bed-temperature"),
        ],
        |_| {},
    )
    .await;
    // JSON with custom metrics, and CBOR: both formats the agent speaks.
    let (_json, mut json_out) = w.agent("bed-12", "bed-12", &["-f", "json", "-cm"]);
    let (_cbor, mut cbor_out) = w.agent("bed-14", "bed-14", &["-f", "cbor"]);
    let l = line_starting(
        &mut json_out,
        "Received message from topic '$aws/things/bed-12/defender/metrics/json/",
        Duration::from_secs(60),
    )
    .await;
    assert!(l.contains("/json/accepted'"), "{l}");
    assert!(
        l.contains(r#""status":"ACCEPTED""#) && l.contains(r#""thingName":"bed-12""#),
        "{l}"
    );
    let l = line_starting(
        &mut cbor_out,
        "Received message from topic '$aws/things/bed-14/defender/metrics/cbor/",
        Duration::from_secs(60),
    )
    .await;
    assert!(l.contains("/cbor/accepted'"), "{l}");
    let s = defender(&w.gw);
    assert!(s.reports_accepted >= 2, "{s:?}");
    assert_eq!(s.reports_rejected, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_reports_are_rejected_with_the_field_and_nothing_else_stalls() {
    let w = ward(vec![device("pm-01", "pacemaker", "pm-pw")], |_| {}).await;
    let plain = w.gw.listener_addr("plain").unwrap();
    let mut dev = connect(options(plain, "pm-01", "pm-pw")).await;
    dev.subscribe("$aws/things/pm-01/defender/metrics/json/+")
        .await;
    let topic = "$aws/things/pm-01/defender/metrics/json";
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let bad = [
        (r#"{"header":{"report_id":1,"version":"1.0"},"metrics":{"listening_tcp_ports":{"ports":[{"port":99999}]}}}"#.to_owned(), "metrics.listening_tcp_ports.ports[0].port"),
        ("not json".to_owned(), "not JSON"),
        (format!(r#"{{"hed":{{"rid":{now_s},"v":"2.0"}},"met":{{}}}}"#), "header.version"),
    ];
    for (payload, reason) in &bad {
        dev.client
            .publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        let (t, v) = reply(&mut dev).await;
        assert_eq!(t, format!("{topic}/rejected"), "{v}");
        assert_eq!(v["status"], "REJECTED");
        let why = v["statusDetails"]["ErrorMessage"].as_str().unwrap();
        assert!(why.contains(reason), "{why} should name {reason}");
    }
    // The device is still served, and a good report is accepted with its id.
    let good = format!(
        r#"{{"header":{{"report_id":{now_s},"version":"1.0"}},"metrics":{{"network_stats":{{"bytes_out":10}}}}}}"#
    );
    dev.client
        .publish(topic, QoS::AtLeastOnce, false, good.clone())
        .await
        .unwrap();
    let (t, v) = reply(&mut dev).await;
    assert_eq!(t, format!("{topic}/accepted"), "{v}");
    assert_eq!(v["reportId"], now_s);
    // The same id again breaks the order AWS requires.
    dev.client
        .publish(topic, QoS::AtLeastOnce, false, good)
        .await
        .unwrap();
    let (t, v) = reply(&mut dev).await;
    assert_eq!(t, format!("{topic}/rejected"), "{v}");
    assert!(v["statusDetails"]["ErrorMessage"]
        .as_str()
        .unwrap()
        .contains("must increase"));
    wardgate_tests::send_heart_rate(&dev.client, "pm-01", 80).await;
    dev.wait_acks(6, Duration::from_secs(10)).await;
    let s = defender(&w.gw);
    assert_eq!((s.reports_accepted, s.reports_rejected), (1, 4), "{s:?}");
}

/// Random 100-character strings, the Defender walkthrough's rogue agent (faster: the windows
/// are 2 s here, not 5 min).
async fn rogue_flood(client: rumqttc::AsyncClient, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.is_cancelled() {
        tick.tick().await;
        let s: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(100)
            .map(char::from)
            .collect();
        if client
            .try_publish("ward/rogue-01/telemetry", QoS::AtMostOnce, false, s)
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn rogue_profile() -> wardgate::config::ProfileConfig {
    toml::from_str(
        r#"
name = "CheckRogueDevices"
targets = ["*"]
actions = [
  { republish = { topic = "alerts/${thingName}" } },
  { quarantine = { duration = "1h" } },
]
[[behaviors]]
name = "msgReceive"
metric = "aws:num-messages-received"
criteria = { comparisonOperator = "less-than", value = { count = 100 }, durationSeconds = 2 }
[[behaviors]]
name = "bytesOut"
metric = "aws:all-bytes-out"
criteria = { comparisonOperator = "less-than", value = { count = 10000 }, durationSeconds = 2 }
"#,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rogue_agent_is_caught_within_two_windows_and_quarantined_while_the_ward_flows() {
    // The rogue's Device Defender agent runs beside it with an identity of its own and
    // reports for thing `rogue-01` (AWS allows publishing for another thing by its topic).
    let mut agent = cert_device("rogue-01-agent", "generic");
    agent.publish = Some(vec!["$aws/things/rogue-01/defender/metrics/json".into()]);
    agent.subscribe = Some(vec!["$aws/things/rogue-01/defender/metrics/#".into()]);
    let mut nurse = device("nurse-01", "station", "nurse-pw");
    nurse.subscribe = Some(vec!["alerts/#".into()]);
    let devices = vec![
        device("rogue-01", "generic", "rogue-pw"),
        device("pm-01", "pacemaker", "pm-pw"),
        agent,
        nurse,
    ];
    let mut w = ward(devices, |c| {
        c.metering.window = Duration::from_secs(2);
        c.metering.windows_kept = 30;
        c.defender.profiles = vec![rogue_profile()];
        // The agent's own connection and the nurse's are targeted too: they receive few
        // messages and report nothing of their own.
    })
    .await;
    let plain = w.gw.listener_addr("plain").unwrap();
    let mut station = connect(options(plain, "nurse-01", "nurse-pw")).await;
    station.subscribe("alerts/#").await;
    let pm = connect(options(plain, "pm-01", "pm-pw")).await;
    let mut rogue = connect(options(plain, "rogue-01", "rogue-pw")).await;
    rogue.subscribe("ward/rogue-01/telemetry").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = tokio::spawn(rogue_flood(rogue.client.clone(), stop.clone()));
    let (_agent, mut agent_out) = w.agent("rogue-01-agent", "rogue-01", &["-f", "json"]);
    line_starting(
        &mut agent_out,
        "Received message from topic '$aws/things/rogue-01/defender/metrics/json/accepted'",
        Duration::from_secs(60),
    )
    .await;
    let started = std::time::Instant::now();
    // The pacemaker keeps sending its readings all along.
    let mut hr = 70;
    let mut alerts: Vec<Value> = Vec::new();
    // Both behaviors in alarm within two windows of the agent's first report (its network
    // counts) — the message count may have caught the rogue already.
    let deadline = started + Duration::from_secs(2 * 2 + 2);
    let in_alarm = |alerts: &[Value]| {
        alerts
            .iter()
            .filter(|a| a["violationEventType"] == "in-alarm")
            .map(|a| a["behavior"]["name"].as_str().unwrap().to_owned())
            .collect::<std::collections::BTreeSet<String>>()
    };
    while in_alarm(&alerts).len() < 2 && std::time::Instant::now() < deadline {
        hr = if hr >= 90 { 70 } else { hr + 1 };
        wardgate_tests::send_heart_rate(&pm.client, "pm-01", hr).await;
        if let Ok(Some((topic, payload))) =
            tokio::time::timeout(Duration::from_millis(200), station.incoming.recv()).await
        {
            let v: Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(
                topic, "alerts/rogue-01",
                "only the rogue is in violation: {v}"
            );
            alerts.push(v);
        }
    }
    stop.cancel();
    let _ = flood.await;
    assert_eq!(
        in_alarm(&alerts),
        ["bytesOut".to_owned(), "msgReceive".to_owned()].into(),
        "both behaviors violated by the rogue: {alerts:?}"
    );
    for a in alerts
        .iter()
        .filter(|a| a["violationEventType"] == "in-alarm")
    {
        assert_eq!(a["thingName"], "rogue-01");
        assert_eq!(a["securityProfileName"], "CheckRogueDevices");
        assert_eq!(a["violationId"].as_str().unwrap().len(), 32);
        assert!(a["violationEventTime"].as_i64().unwrap() > 0);
        let count = a["metricValue"]["count"].as_u64().unwrap();
        let limit = a["behavior"]["criteria"]["value"]["count"]
            .as_u64()
            .unwrap();
        assert!(count >= limit, "{a}");
    }
    // Quarantined: its connection is closed and a new CONNECT is refused.
    until("the rogue is disconnected", Duration::from_secs(10), || {
        w.gw.metering()
            .snapshot_of("rogue-01")
            .is_some_and(|s| !s.connected)
    })
    .await;
    let again = try_connect(
        options(plain, "rogue-01", "rogue-pw"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        again,
        ConnectOutcome::Refused(rumqttc::ConnectReturnCode::NotAuthorized)
    );
    let s = defender(&w.gw);
    assert_eq!(s.quarantined.len(), 1, "{s:?}");
    assert_eq!(
        s.quarantines, s.events[0],
        "each in-alarm event quarantines: {s:?}"
    );
    assert_eq!(s.quarantined[0].device_id, "rogue-01");
    assert!(s.active.iter().all(|v| v.thing_name == "rogue-01"), "{s:?}");
    // The pacemaker was never stopped: every reading it sent was acknowledged.
    let pm_stats = w.gw.stats().device("pm-01");
    assert!(pm_stats.messages > 0);
    let refused = w.gw.metering().snapshot_of("rogue-01").unwrap().totals;
    assert!(
        refused.authorization_failures >= 1,
        "the refused CONNECT is counted"
    );
    drop(rogue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_report_and_device_reports_go_upstream_in_aws_format() {
    use wardgate::defender::report::{Format, Names, Report};
    let up = wardgate_tests::upstream::Upstream::new();
    let _mq = up.broker();
    let mut cloud = up
        .raw_subscriber(&[
            "$aws/things/test-gateway/defender/metrics/json",
            "$aws/things/pm-01/defender/metrics/json",
        ])
        .await;
    let mut cfg = up.gateway_config();
    cfg.defender.report_interval = Duration::from_secs(1);
    cfg.defender.report_names = "short".into();
    let gw = Gateway::start(&cfg).await.unwrap();
    let plain = gw.listener_addr("plain").unwrap();
    let dev = connect(options(plain, "pm-01", "pw")).await;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A device's report in short names and CBOR goes up as long-name JSON on its thing.
    let report = Report::parse(
        format!(r#"{{"header":{{"report_id":{now_s},"version":"1.0"}},"custom_metrics":{{"battery":[{{"number":71}}]}}}}"#).as_bytes(),
        Format::Json,
    )
    .unwrap()
    .0;
    dev.client
        .publish(
            "$aws/things/pm-01/defender/metrics/cbor",
            QoS::AtLeastOnce,
            false,
            report.encode(Format::Cbor, Names::Short),
        )
        .await
        .unwrap();
    dev.wait_acks(1, Duration::from_secs(10)).await;
    let (mut own, mut forwarded) = (None, None);
    tokio::time::timeout(Duration::from_secs(30), async {
        while own.is_none() || forwarded.is_none() {
            let (topic, payload) = cloud.recv().await.expect("the cloud subscriber runs");
            let v: Value = serde_json::from_slice(&payload).unwrap();
            if topic.contains("test-gateway") {
                own = Some(v);
            } else {
                forwarded = Some(v);
            }
        }
    })
    .await
    .expect("both reports upstream within 30 s");
    let forwarded = forwarded.unwrap();
    assert_eq!(forwarded["header"]["report_id"], now_s, "{forwarded}");
    assert_eq!(forwarded["custom_metrics"]["battery"][0]["number"], 71.0);
    let own = own.unwrap();
    let (r, names) = Report::from_value(&own).expect("the gateway's report is valid");
    assert_eq!(names, Names::Short, "{own}");
    assert_eq!(
        r.custom_metrics["devices_connected"],
        wardgate::defender::report::CustomValue::Number(1.0)
    );
    assert!(r.custom_metrics.contains_key("queue_depth"), "{own}");
    // The gateway's own device listener is among its listening ports.
    let ports = r.metrics.unwrap().listening_tcp_ports.unwrap();
    assert!(ports.ports.iter().any(|p| p.port == plain.port()), "{own}");
}

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");

/// The CLI against `config`: (exit code, stdout).
fn cli(args: &[&str], config: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .env("WARDGATE_LOG__FORMAT", "text")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    eprintln!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

struct Daemon {
    child: std::process::Child,
    log: wardgate_tests::Log,
    addr: std::net::SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the daemon; `run` names this start (its notify socket's directory).
fn start_daemon(dir: &std::path::Path, run: &str, config_path: &std::path::Path) -> Daemon {
    let dir = dir.join(run);
    std::fs::create_dir_all(&dir).unwrap();
    let mut notify = wardgate_tests::NotifySocket::bind(&dir);
    let mut cmd = wardgate_tests::daemon_command(BIN, config_path, &notify);
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let log = wardgate_tests::Log::capture(&mut child);
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(20))
        .expect("READY=1 within 20 s");
    let addr =
        wardgate_tests::plain_addr_from_status(&ready).expect("STATUS names the plain listener");
    Daemon { child, log, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_violation_and_its_quarantine_survive_kill_9_and_operators_see_and_lift_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pm-pw")]);
    cfg.metering.window = Duration::from_secs(2);
    cfg.metering.windows_kept = 30;
    cfg.defender.profiles = vec![toml::from_str(
        r#"
name = "Chatty"
targets = ["kind:pacemaker"]
actions = [{ journal = { priority = "warning" } }, { quarantine = { duration = "1h" } }]
[[behaviors]]
name = "sent"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than", value = { count = 20 }, durationSeconds = 2 }
"#,
    )
    .unwrap()];
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, wardgate_tests::config_toml(&cfg)).unwrap();
    let mut d = start_daemon(dir.path(), "first", &config_path);
    let pm = connect(options(d.addr, "pm-01", "pm-pw")).await;
    for hr in 0..40 {
        wardgate_tests::send_heart_rate(&pm.client, "pm-01", 60 + hr % 30).await;
    }
    let line = d
        .log
        .wait_for(
            "violation: pm-01 breaks behavior sent of security profile Chatty",
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| panic!("no violation line in:\n{}", d.log.text()));
    assert!(line.contains("aws:num-messages-sent"), "{line}");
    // The profile's journal action prints AWS's violation message.
    let line = d
        .log
        .wait_for(
            "security profile Chatty fired for pm-01: ",
            Duration::from_secs(10),
        )
        .expect("the journal action's line");
    assert!(
        line.contains(r#""violationEventType":"in-alarm""#),
        "{line}"
    );
    d.log
        .wait_for(
            "quarantine: pm-01 is refused until",
            Duration::from_secs(10),
        )
        .expect("quarantined");
    drop(pm);
    let (code, out) = cli(&["violations"], &config_path);
    assert_eq!(code, 0);
    assert!(
        out.contains("pm-01") && out.contains("profile Chatty behavior sent"),
        "{out}"
    );
    let (_, out) = cli(&["quarantine", "list"], &config_path);
    assert!(out.starts_with("quarantined pm-01"), "{out}");

    // kill -9: the violation and the quarantine are on disk.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let mut d = start_daemon(dir.path(), "after-kill", &config_path);
    d.log
        .wait_for("1 violations in force", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the violation is not resumed:\n{}", d.log.text()));
    assert_eq!(
        try_connect(options(d.addr, "pm-01", "pm-pw"), Duration::from_secs(5)).await,
        ConnectOutcome::Refused(rumqttc::ConnectReturnCode::NotAuthorized),
        "still quarantined after the restart"
    );
    let (code, out) = cli(&["quarantine", "clear", "pm-01"], &config_path);
    assert_eq!(code, 0);
    assert!(out.contains("quarantine of pm-01 lifted"), "{out}");
    d.log
        .wait_for(
            "quarantine of pm-01 lifted by an operator",
            Duration::from_secs(10),
        )
        .expect("logged");
    // Behaving now (one reading per window): the violation clears.
    let pm = connect(options(d.addr, "pm-01", "pm-pw")).await;
    wardgate_tests::send_heart_rate(&pm.client, "pm-01", 72).await;
    d.log
        .wait_for(
            "violation cleared: pm-01 behaves again for behavior sent",
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| panic!("no clearing in:\n{}", d.log.text()));
    let (_, out) = cli(&["violations", "--history"], &config_path);
    assert!(out.starts_with("no violations in force"), "{out}");
    assert!(
        out.contains("in-alarm") && out.contains("alarm-cleared"),
        "{out}"
    );
    let (_, json) = cli(&["violations", "--json", "--history"], &config_path);
    let v: Value = serde_json::from_str(&json).unwrap();
    let kinds: Vec<&str> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["violationEventType"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["in-alarm", "alarm-cleared"]);
    drop(pm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ward_designs_rule_profile_fires_on_the_misbehaving_device_only() {
    // The ward design's profile (thresholds low on purpose): per window, at most 3 connection
    // attempts and 3 disconnects, no authorization failure, messages up to 1 KiB, at most 5
    // messages sent and 5 received.
    let profile: wardgate::config::ProfileConfig = toml::from_str(
        r#"
name = "WardRules"
targets = ["kind:pacemaker"]
[[behaviors]]
name = "authz"
metric = "aws:num-authorization-failures"
criteria = { comparisonOperator = "less-than", value = { count = 1 }, durationSeconds = 8 }
[[behaviors]]
name = "connects"
metric = "aws:num-connection-attempts"
criteria = { comparisonOperator = "less-than-equals", value = { count = 3 }, durationSeconds = 8 }
[[behaviors]]
name = "disconnects"
metric = "aws:num-disconnects"
criteria = { comparisonOperator = "less-than-equals", value = { count = 3 }, durationSeconds = 8 }
[[behaviors]]
name = "size"
metric = "aws:message-byte-size"
criteria = { comparisonOperator = "less-than-equals", value = { count = 256 } }
[[behaviors]]
name = "sent"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than-equals", value = { count = 5 }, durationSeconds = 8 }
[[behaviors]]
name = "received"
metric = "aws:num-messages-received"
criteria = { comparisonOperator = "less-than-equals", value = { count = 5 }, durationSeconds = 8 }
"#,
    )
    .unwrap();
    let w = ward(
        vec![
            device("flaky-01", "pacemaker", "f-pw"),
            device("calm-01", "pacemaker", "c-pw"),
        ],
        |c| {
            // 2 s windows, behaviors over 8 s: the misbehaviour below is counted whole.
            c.metering.window = Duration::from_secs(2);
            c.metering.windows_kept = 10;
            c.defender.profiles = vec![profile];
        },
    )
    .await;
    let plain = w.gw.listener_addr("plain").unwrap();
    let calm = connect(options(plain, "calm-01", "c-pw")).await;
    wardgate_tests::send_heart_rate(&calm.client, "calm-01", 70).await;
    for _ in 0..5 {
        let flaky = connect(options(plain, "flaky-01", "f-pw")).await;
        flaky.client.disconnect().await.unwrap();
        until("flaky-01 disconnected", Duration::from_secs(5), || {
            w.gw.metering()
                .snapshot_of("flaky-01")
                .is_some_and(|s| !s.connected)
        })
        .await;
    }
    let mut flaky = connect(options(plain, "flaky-01", "f-pw")).await;
    flaky.subscribe("ward/flaky-01/telemetry").await;
    for _ in 0..6 {
        flaky
            .client
            .publish(
                "ward/flaky-01/telemetry",
                QoS::AtLeastOnce,
                false,
                vec![b'x'; 512],
            )
            .await
            .unwrap();
    }
    flaky.wait_acks(6, Duration::from_secs(10)).await;
    for _ in 0..6 {
        flaky
            .next(Duration::from_secs(10))
            .await
            .expect("its own messages come back");
    }
    // Forbidden: an authorization failure (and the connection ends, as on IoT Core).
    flaky
        .client
        .publish("ward/calm-01/telemetry", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let state_dir = w.dir.path().join("state");
    let raised = |who: &str| -> std::collections::BTreeSet<String> {
        wardgate::defender::read_state(&state_dir)
            .map(|f| f.history)
            .unwrap_or_default()
            .iter()
            .filter(|e| e["violationEventType"] == "in-alarm" && e["thingName"] == who)
            .map(|e| e["behavior"]["name"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while raised("flaky-01").len() < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "in alarm within 20 s: {:?}; {:?}",
            raised("flaky-01"),
            w.gw.metering().snapshot_of("flaky-01")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        raised("flaky-01").into_iter().collect::<Vec<_>>(),
        [
            "authz",
            "connects",
            "disconnects",
            "received",
            "sent",
            "size"
        ]
    );
    assert!(raised("calm-01").is_empty(), "calm-01 behaves");
    let s = defender(&w.gw);
    assert!(s.active.iter().all(|v| v.thing_name == "flaky-01"), "{s:?}");
    let history = wardgate::defender::read_state(&state_dir).unwrap().history;
    let size = history
        .iter()
        .find(|e| e["behavior"]["name"] == "size")
        .unwrap();
    assert!(
        size["metricValue"]["count"].as_u64().unwrap() >= 512,
        "{size}"
    );
    drop(calm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_catches_the_simulated_rogue_with_the_shipped_example_profile() {
    let dir = tempfile::tempdir().unwrap();
    let ward = wardgate::sim::ward(1);
    let speed = 100.0;
    let mut cfg = wardgate::cli::demo_config(&ward, wardgate_tests::components_dir());
    cfg.gateway.state_dir = dir.path().join("state");
    (cfg.metering.window, cfg.metering.windows_kept) = wardgate::cli::demo_window(speed);
    let window = cfg.metering.window;
    let gw = Gateway::start(&cfg).await.unwrap();
    let stats = std::sync::Arc::new(wardgate::sim::SimStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let sim = tokio::spawn(wardgate::sim::run(
        gw.listener_addr("plain").unwrap(),
        ward.clone(),
        speed,
        stats.clone(),
        stop.clone(),
    ));
    until("rogue-01 connected", Duration::from_secs(10), || {
        gw.metering()
            .snapshot_of("rogue-01")
            .is_some_and(|s| s.connected)
    })
    .await;
    // Caught within two windows of connecting.
    until(
        "rogue-01 in violation and quarantined",
        window * 2 + Duration::from_secs(2),
        || {
            let d = defender(&gw);
            d.active
                .iter()
                .any(|v| v.thing_name == "rogue-01" && v.behavior == "msgReceive")
                && d.quarantined.iter().any(|q| q.device_id == "rogue-01")
        },
    )
    .await;
    let d = defender(&gw);
    assert!(
        d.active.iter().all(|v| v.thing_name.starts_with("rogue")),
        "{d:?}"
    );
    // The rest of the ward keeps flowing.
    let before = gw.stats().device("pacemaker-01").messages;
    until(
        "pacemaker-01 keeps sending",
        Duration::from_secs(10),
        || gw.stats().device("pacemaker-01").messages > before,
    )
    .await;
    stop.cancel();
    sim.await.unwrap();
    let _ = gw.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statistical_threshold_over_fifty_devices_catches_only_the_outlier() {
    let profile: wardgate::config::ProfileConfig = toml::from_str(
        r#"
name = "Outliers"
targets = ["kind:pacemaker"]
[[behaviors]]
name = "sent"
metric = "aws:num-messages-sent"
# Two datapoints in a row: a window that ends while the ward is still sending its first
# readings cannot alarm a device on its own.
criteria = { comparisonOperator = "less-than-equals", statisticalThreshold = { statistic = "p90" }, durationSeconds = 4, consecutiveDatapointsToAlarm = 2 }
"#,
    )
    .unwrap();
    let mut devices: Vec<DeviceConfig> = (0..50)
        .map(|i| device(&format!("pm-{i:02}"), "pacemaker", "pw"))
        .collect();
    devices.push(device("pm-odd", "pacemaker", "pw"));
    let w = ward(devices, |c| {
        c.metering.window = Duration::from_secs(2);
        c.metering.windows_kept = 10;
        c.defender.profiles = vec![profile];
    })
    .await;
    let plain = w.gw.listener_addr("plain").unwrap();
    let mut ward_devices = Vec::new();
    for i in 0..50 {
        let id = format!("pm-{i:02}");
        let d = connect(options(plain, &id, "pw")).await;
        for hr in [70, 71, 72] {
            wardgate_tests::send_heart_rate(&d.client, &id, hr).await;
        }
        ward_devices.push(d);
    }
    let odd = connect(options(plain, "pm-odd", "pw")).await;
    for hr in 0..60 {
        wardgate_tests::send_heart_rate(&odd.client, "pm-odd", 60 + hr % 40).await;
    }
    odd.wait_acks(60, Duration::from_secs(20)).await;
    for d in &ward_devices {
        d.wait_acks(3, Duration::from_secs(20)).await;
    }
    let state_dir = w.dir.path().join("state");
    let raised = || -> Vec<String> {
        wardgate::defender::read_state(&state_dir)
            .map(|f| f.history)
            .unwrap_or_default()
            .iter()
            .filter(|e| e["violationEventType"] == "in-alarm")
            .map(|e| e["thingName"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    until("the outlier in alarm", Duration::from_secs(20), || {
        !raised().is_empty()
    })
    .await;
    assert_eq!(raised(), ["pm-odd"], "only the outlier");
    let s = defender(&w.gw);
    assert_eq!(s.active.len(), 1, "{s:?}");
    assert!(s.active[0].metric_value["count"].as_u64().unwrap() >= 60);
}
