//! Edge rules end to end: the ward's alarm with the uplink down — a pacemaker using the real
//! AWS IoT Device SDK v1 shadow client reports heartbeat 141, the rule fires, the nurse station
//! gets the republished alert, and the alert reaches IoT Core's stand-in (mosquitto) once the
//! uplink is back; the same for a plugin device through readings feeding its shadow; a
//! republish loop is stopped; debounce; `check-config` on a bad rule.

use rumqttc::QoS;
use serde_json::{json, Value};
use std::time::Duration;
use wardgate::app::Gateway;
use wardgate::config::{ActionConfig, AuthMode, DeviceConfig, RuleConfig};
use wardgate_tests::pki::{Ca, ListenerFiles};
use wardgate_tests::upstream::Upstream;
use wardgate_tests::webhook::Receiver;
use wardgate_tests::{connect, device, options, pacemaker_reading, sdk_python, until, workspace};

fn rule(name: &str, sql: &str, actions: Vec<ActionConfig>) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        sql: sql.into(),
        actions,
        debounce: None,
        description: None,
    }
}

fn tachycardia(webhook: String) -> RuleConfig {
    rule(
        "tachycardia",
        "SELECT state.reported.heartbeat AS heartbeat, topic(3) AS device \
         FROM '$aws/things/+/shadow/update/accepted' WHERE state.reported.heartbeat > 140",
        vec![
            ActionConfig::Republish {
                topic: "alerts/${topic(3)}".into(),
                qos: 1,
            },
            ActionConfig::Upstream {
                stream: "alerts".into(),
            },
            ActionConfig::Http {
                url: webhook,
                timeout: Duration::from_secs(2),
                headers: Default::default(),
                max_age: Duration::from_secs(3600),
                ca_file: None,
            },
            ActionConfig::Journal {
                priority: "warning".into(),
            },
        ],
    )
}

fn nurse_station() -> DeviceConfig {
    let mut d = device("nurse-01", "station", "nurse-pw");
    d.subscribe = Some(vec!["alerts/#".into()]);
    d.publish = Some(vec![]);
    d
}

/// The ward design's scenario, offline, with the real SDK v1 shadow client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ward_alarm_fires_offline_and_reaches_the_cloud_when_it_returns() {
    let up = Upstream::new();
    let mut mq = up.broker();
    let mut cloud = up.raw_subscriber(&["wardgate/test-gateway/alerts"]).await;
    mq.stop();

    let mut ca = Ca::new("Ward 7 CA");
    let files = ListenerFiles::write(up.dir.path(), &ca.server(), &[&ca], &ca.crl(&[]));
    let pm = ca.device("Pacemaker-IoT");
    let (cert_file, key_file) = (
        up.dir.path().join("device.crt"),
        up.dir.path().join("device.key"),
    );
    std::fs::write(&cert_file, &pm.cert_pem).unwrap();
    std::fs::write(&key_file, &pm.key_pem).unwrap();

    let mut cfg = up.gateway_config();
    let mut sdk_device = device("Pacemaker-IoT", "pacemaker", "unused");
    sdk_device.password_hash = None;
    sdk_device.auth = Some(AuthMode::Certificate);
    cfg.devices.push(sdk_device);
    cfg.devices.push(nurse_station());
    cfg.listeners.tls = files.config();
    let mut webhook = Receiver::start(&[]).await;
    cfg.rules = vec![tachycardia(webhook.url("/nurse-call"))];
    let gw = Gateway::start(&cfg).await.unwrap();
    let plain = gw.listener_addr("plain").unwrap();
    let mut nurse = connect(options(plain, "nurse-01", "nurse-pw")).await;
    nurse.subscribe("alerts/#").await;

    let mut sdk = tokio::process::Command::new(sdk_python())
        .arg(workspace().join("tests/python/shadow_sdk_v1.py"))
        .args([
            "127.0.0.1",
            &gw.listener_addr("tls").unwrap().port().to_string(),
        ])
        .args([&files.ca, &cert_file, &key_file])
        .arg("Pacemaker-IoT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let stdout = sdk.stdout.take().unwrap();
    let first = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        lines.next_line().await.ok().flatten()
    });

    // heartbeat 141 → accepted → the rule fires → the nurse station hears it.
    let (topic, payload) = nurse
        .next(Duration::from_secs(60))
        .await
        .expect("the alert reaches the nurse station");
    assert_eq!(topic, "alerts/Pacemaker-IoT");
    let alert: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(alert, json!({"heartbeat": 141, "device": "Pacemaker-IoT"}));
    // ... and the webhook gets one POST of it.
    let post = webhook
        .next(Duration::from_secs(30))
        .await
        .expect("the webhook receives the alert");
    assert_eq!(post.json(), alert);
    assert_eq!(post.path, "/nurse-call");
    let line = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the SDK reports its update")
        .unwrap()
        .expect("a line from the SDK");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["step"], "update-reported");
    assert_eq!(v["status"], "accepted", "{v}");
    drop(sdk);
    let counts = gw.rule_counts();
    assert_eq!(counts[0].fired, 1, "{counts:?}");

    // The uplink returns: the alert reaches the cloud's alerts topic.
    mq.restart();
    let (topic, payload) = tokio::time::timeout(Duration::from_secs(60), cloud.recv())
        .await
        .expect("the alert reaches the upstream")
        .unwrap();
    assert_eq!(topic, "wardgate/test-gateway/alerts");
    let batch: Value = serde_json::from_slice(&payload).unwrap();
    let messages = batch["messages"]
        .as_array()
        .expect("alerts are batch messages");
    assert_eq!(messages.len(), 1, "{batch}");
    let m = &messages[0]["message"];
    assert_eq!(m["rule"], "tachycardia");
    assert_eq!(m["device_id"], "Pacemaker-IoT");
    assert_eq!(m["output"]["heartbeat"], 141);
    assert!(webhook.taken_now().is_empty(), "one POST per alert");
    gw.stop(Duration::from_secs(10)).await;
}

/// A plugin device's readings feed its shadow, so the same rule shape watches it; a reading
/// that does not break the threshold fires nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_feed_the_shadow_and_a_rule_watches_a_plugin_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = wardgate_tests::config(
        dir.path(),
        vec![device("pm-01", "pacemaker", "pw"), nurse_station()],
    );
    cfg.rules = vec![rule(
        "plugin_tachycardia",
        "SELECT state.reported.heart_rate AS hr, clientid() AS device \
         FROM '$aws/things/+/shadow/update/accepted' WHERE state.reported.heart_rate > 140",
        vec![ActionConfig::Republish {
            topic: "alerts/${clientid()}".into(),
            qos: 1,
        }],
    )];
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut nurse = connect(options(addr, "nurse-01", "nurse-pw")).await;
    nurse.subscribe("alerts/#").await;
    let pm = connect(options(addr, "pm-01", "pw")).await;
    for hr in [72, 150] {
        wardgate_tests::send_heart_rate(&pm.client, "pm-01", hr).await;
    }
    let (topic, payload) = nurse
        .next(Duration::from_secs(20))
        .await
        .expect("the plugin device's alert");
    assert_eq!(topic, "alerts/pm-01");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v, json!({"hr": 150.0, "device": "pm-01"}));
    let stored = gw.shadow_stats();
    assert!(stored.reports >= 1, "{stored:?}");
    assert!(nurse.incoming.try_recv().is_err(), "72 fired nothing");
    gw.stop(Duration::from_secs(10)).await;
}

/// A rule republishing into its own filter is stopped after a few hops, and counted; debounce
/// holds back a rule that keeps matching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_loop_is_stopped_and_debounce_holds_back_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let mut watcher = nurse_station();
    watcher.subscribe = Some(vec!["loop/#".into(), "alerts/#".into()]);
    let mut cfg = wardgate_tests::config(
        dir.path(),
        vec![device("pm-01", "pacemaker", "pw"), watcher],
    );
    let mut pm = device("pm-02", "pacemaker", "pw");
    pm.publish = Some(vec!["loop/start".into(), "ward/pm-02/telemetry".into()]);
    cfg.devices.push(pm);
    cfg.metering.status_interval = Duration::from_millis(200);
    let mut debounced = rule(
        "every_reading",
        "SELECT * FROM 'ward/+/telemetry'",
        vec![ActionConfig::Republish {
            topic: "alerts/${topic(2)}".into(),
            qos: 1,
        }],
    );
    debounced.debounce = Some(Duration::from_secs(3600));
    cfg.rules = vec![
        rule(
            "echo",
            "SELECT * FROM 'loop/#'",
            vec![ActionConfig::Republish {
                topic: "loop/again".into(),
                qos: 0,
            }],
        ),
        debounced,
    ];
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut watch = connect(options(addr, "nurse-01", "nurse-pw")).await;
    watch.subscribe("loop/#").await;
    watch.subscribe("alerts/#").await;
    let pm = connect(options(addr, "pm-02", "pw")).await;
    pm.client
        .publish("loop/start", QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    for hr in [60, 61, 62] {
        pm.client
            .publish(
                "ward/pm-02/telemetry",
                QoS::AtLeastOnce,
                false,
                pacemaker_reading(hr),
            )
            .await
            .unwrap();
    }
    pm.wait_acks(4, Duration::from_secs(20)).await;
    until("the loop is stopped", Duration::from_secs(20), || {
        gw.rule_counts()[0].loops_stopped == 1
    })
    .await;
    let c = gw.rule_counts();
    assert_eq!(c[0].fired, wardgate::rules::MAX_HOPS as u64, "{c:?}");
    assert_eq!((c[1].fired, c[1].debounced), (1, 2), "{c:?}");
    let mut loop_msgs = 0;
    let mut alerts = 0;
    while let Some((t, _)) = watch.next(Duration::from_secs(2)).await {
        if t.starts_with("loop/") {
            loop_msgs += 1;
        } else {
            alerts += 1;
        }
        if loop_msgs == 1 + wardgate::rules::MAX_HOPS as usize && alerts == 1 {
            break;
        }
    }
    assert_eq!(
        (loop_msgs, alerts),
        (1 + wardgate::rules::MAX_HOPS as usize, 1)
    );
    // `wardgate status` shows each rule's counters.
    let state = cfg.gateway.state_dir.clone();
    until(
        "the status file shows the rules",
        Duration::from_secs(20),
        || {
            wardgate::status::read(&state).is_ok_and(|s| {
                s.rules.len() == 2 && s.rules[0].loops_stopped == 1 && s.rules[1].debounced == 2
            })
        },
    )
    .await;
    let text = wardgate::status::render(&wardgate::status::read(&state).unwrap());
    assert!(
        text.lines()
            .any(|l| l.starts_with("rule every_reading") && l.contains("debounced       2")),
        "{text}"
    );
    gw.stop(Duration::from_secs(10)).await;
}

#[test]
fn check_config_names_the_rule_file_line_and_column_of_a_sql_error() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("wardgate.toml");
    std::fs::write(
        &main,
        "[[rules]]\nname = \"tachycardia\"\nsql = \"SELECT * FORM 'a/b' WHERE x > 1\"\n\
         actions = [{ journal = { priority = \"loud\" } }]\n\n\
         [[rules]]\nname = \"fine\"\nsql = \"SELECT * FROM 'a/+'\"\n",
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_wardgate-under-test"))
        .args(["check-config", "-c", main.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let main_s = main.display().to_string();
    assert!(
        err.lines().any(|l| l.contains(&main_s)
            && l.contains("rules[0].sql")
            && l.contains("tachycardia")
            && l.contains("line 1, column 10")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("rules[0].actions[0].journal.priority") && l.contains("loud")),
        "{err}"
    );
    assert!(!err.contains("rules[1]"), "{err}");
}
