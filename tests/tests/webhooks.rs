//! The rules' `http` action against a real HTTP receiver: a receiver that fails (500), then
//! hangs past the timeout, then answers gets the alert exactly once, in firing order with the
//! next one; a receiver that refuses (400) makes it an action failure; and a kill -9 between
//! the rule firing (the device has its PUBACK) and the delivery loses nothing: the restarted
//! gateway delivers it, with the same delivery id.

use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use wardgate::app::Gateway;
use wardgate::config::{ActionConfig, RuleConfig};
use wardgate_tests::webhook::{Answer, Receiver};
use wardgate_tests::{config, config_toml, connect, device, options, until, NotifySocket};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
const WAIT: Duration = Duration::from_secs(30);

fn nurse_call(url: String, timeout: Duration) -> RuleConfig {
    RuleConfig {
        name: "nurse_call".into(),
        sql: "SELECT heartbeat, topic(2) AS device FROM 'ward/+/telemetry' WHERE heartbeat > 140"
            .into(),
        actions: vec![ActionConfig::Http {
            url,
            timeout,
            headers: BTreeMap::from([
                ("Authorization".into(), "Bearer ward-7".into()),
                ("X-Bed".into(), "${topic(2)}".into()),
            ]),
            max_age: Duration::from_secs(3600),
            ca_file: None,
        }],
        debounce: None,
        description: None,
    }
}

async fn publish(d: &wardgate_tests::Device, hr: u32) {
    wardgate_tests::send_heart_rate(&d.client, "pm-01", hr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_twice_gets_the_alert_exactly_once() {
    let mut receiver = Receiver::start(&[
        Answer::Status(500),
        Answer::Hang(Duration::from_secs(5)),
        Answer::Status(200),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    cfg.rules = vec![nurse_call(
        receiver.url("/nurse-call?ward=7"),
        Duration::from_millis(500),
    )];
    let gw = Gateway::start(&cfg).await.unwrap();
    let pm = connect(options(gw.listener_addr("plain").unwrap(), "pm-01", "pw")).await;
    publish(&pm, 150).await;
    pm.wait_acks(1, WAIT).await;

    let mut attempts = Vec::new();
    for _ in 0..3 {
        attempts.push(receiver.next(WAIT).await.expect("an attempt"));
    }
    let answers: Vec<Answer> = attempts.iter().map(|r| r.answer).collect();
    assert_eq!(
        answers,
        [
            Answer::Status(500),
            Answer::Hang(Duration::from_secs(5)),
            Answer::Status(200)
        ]
    );
    let id = attempts[0].header("x-wardgate-delivery").to_string();
    assert_eq!(id.len(), 16, "{:?}", attempts[0].headers);
    for a in &attempts {
        assert_eq!(a.method, "POST");
        assert_eq!(a.path, "/nurse-call?ward=7");
        assert_eq!(a.json(), json!({"heartbeat": 150, "device": "pm-01"}));
        assert_eq!(a.header("x-wardgate-delivery"), id, "one delivery, retried");
        assert_eq!(a.header("x-wardgate-rule"), "nurse_call");
        assert_eq!(a.header("x-wardgate-device"), "pm-01");
        assert_eq!(a.header("authorization"), "Bearer ward-7");
        assert_eq!(a.header("x-bed"), "pm-01", "header templates are rendered");
        assert_eq!(a.header("content-type"), "application/json");
    }

    // Delivered once: the next request is the next alert, not the first again.
    publish(&pm, 160).await;
    let next = receiver.next(WAIT).await.expect("the second alert");
    assert_eq!(next.json()["heartbeat"], 160);
    assert_ne!(next.header("x-wardgate-delivery"), id);
    assert!(
        next.header("x-wardgate-delivery") > id.as_str(),
        "ids grow in firing order"
    );
    until("both deliveries counted", WAIT, || {
        gw.status_snapshot()
            .webhooks
            .first()
            .is_some_and(|w| w.delivered == 2 && w.pending == 0)
    })
    .await;
    let w = &gw.status_snapshot().webhooks[0];
    assert_eq!(w.origin, receiver.url(""));
    assert_eq!((w.failed_attempts, w.dropped), (2, 0), "{w:?}");

    // A receiver that refuses: given up at once, counted as the rule's action failure.
    receiver.answer_all(Answer::Status(400));
    publish(&pm, 170).await;
    let refused = receiver.next(WAIT).await.expect("the third alert");
    assert_eq!(refused.answer, Answer::Status(400));
    until("the refusal counted", WAIT, || {
        gw.rule_counts()[0].action_failures == 1
    })
    .await;
    let w = &gw.status_snapshot().webhooks[0];
    assert_eq!((w.delivered, w.dropped, w.pending), (2, 1, 0), "{w:?}");
    assert!(receiver.taken_now().is_empty(), "a refusal is not retried");
    assert_eq!(gw.rule_counts()[0].fired, 3);
    gw.stop(Duration::from_secs(10)).await;
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(
    config_path: &std::path::Path,
    notify_dir: &std::path::Path,
) -> (Daemon, std::net::SocketAddr, wardgate_tests::Log) {
    std::fs::create_dir_all(notify_dir).unwrap();
    let mut notify = NotifySocket::bind(notify_dir);
    let mut cmd = wardgate_tests::daemon_command(BIN, config_path, &notify);
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let log = wardgate_tests::Log::capture(&mut child);
    let ready = notify.wait_for("READY=1", WAIT).expect("READY=1");
    let addr = wardgate_tests::plain_addr_from_status(&ready).unwrap();
    (Daemon(child), addr, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_firing_and_delivery_loses_no_webhook() {
    let mut receiver = Receiver::start(&[]).await;
    receiver.answer_all(Answer::Status(503));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        &dir.path().join("state"),
        vec![device("pm-01", "pacemaker", "pw")],
    );
    cfg.rules = vec![nurse_call(
        receiver.url("/nurse-call"),
        Duration::from_secs(2),
    )];
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(&cfg)).unwrap();

    let (mut daemon, addr, _log) = start(&config_path, &dir.path().join("run-1"));
    let pm = connect(options(addr, "pm-01", "pw")).await;
    publish(&pm, 150).await;
    // The PUBACK means the delivery is on disk; kill -9 at once.
    pm.wait_acks(1, WAIT).await;
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    drop(pm);
    let before: Vec<String> = receiver
        .taken_now()
        .iter()
        .map(|r| r.header("x-wardgate-delivery").to_string())
        .collect();
    assert!(
        before.iter().all(|id| Some(id) == before.first()),
        "{before:?}"
    );

    receiver.answer_all(Answer::Status(200));
    let (_daemon, addr, mut log) = start(&config_path, &dir.path().join("run-2"));
    log.wait_for("deliveries from before the restart", WAIT)
        .expect("the restarted gateway finds the delivery");
    let mut got = receiver
        .next(WAIT)
        .await
        .expect("delivered after the restart");
    while got.answer != Answer::Status(200) {
        got = receiver
            .next(WAIT)
            .await
            .expect("delivered after the restart");
    }
    assert_eq!(got.json(), json!({"heartbeat": 150, "device": "pm-01"}));
    if let Some(first) = before.first() {
        assert_eq!(got.header("x-wardgate-delivery"), first, "same delivery id");
    }
    log.wait_for("delivered to", WAIT)
        .expect("the delivery is logged");
    // Delivered once: the next request is a new alert.
    let pm = connect(options(addr, "pm-01", "pw")).await;
    publish(&pm, 161).await;
    let next = receiver.next(WAIT).await.expect("the next alert");
    assert_eq!(next.json()["heartbeat"], 161);
    assert_ne!(
        next.header("x-wardgate-delivery"),
        got.header("x-wardgate-delivery")
    );
}
