//! Store-and-forward to a real mosquitto (TLS, `require_certificate true`) standing in for
//! AWS IoT Core: every acknowledged reading arrives upstream, also across an upstream outage.

use rumqttc::{AsyncClient, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardgate::app::Gateway;
use wardgate_tests::pki::Ca;
use wardgate_tests::upstream::{free_port, write, Mosquitto, Upstream};
use wardgate_tests::{connect, options};

/// Publish one pacemaker reading (QoS 1) with heart rate `hr` on `topic`, taken now.
async fn heartbeat(client: &AsyncClient, topic: &str, hr: u32) {
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            wardgate_tests::pacemaker_reading(hr),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_reading_reaches_the_upstream_across_an_outage() {
    let up = Upstream::new();
    let mut mq = up.broker();
    let mut cloud = up.subscriber().await;

    let mut cfg = up.gateway_config();
    cfg.upstream.max_backoff = Duration::from_secs(2);
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let pm = connect(options(addr, "pm-01", "pw")).await;
    let send = |i: u32| {
        let c = pm.client.clone();
        async move {
            heartbeat(&c, "ward/pm-01/telemetry", 40 + i).await;
        }
    };

    // Normal flow.
    for i in 0..20 {
        send(i).await;
    }
    pm.wait_acks(20, Duration::from_secs(20)).await;
    let mut got = BTreeMap::new();
    while got.len() < 20 {
        let (seq, hr) = tokio::time::timeout(Duration::from_secs(20), cloud.recv())
            .await
            .expect("delivered upstream")
            .unwrap();
        got.insert(seq, hr);
    }

    // Upstream down: readings are still acknowledged (they are on disk), then delivered.
    mq.stop();
    until_uplink(&gw, false, "noticed the upstream is gone").await;
    for i in 20..100 {
        send(i).await;
    }
    pm.wait_acks(100, Duration::from_secs(20)).await;
    mq.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 100 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, cloud.recv()).await {
            Ok(Some((seq, hr))) => {
                got.insert(seq, hr);
            }
            _ => panic!("only {} of 100 readings arrived upstream", got.len()),
        }
    }
    let values: Vec<f64> = got.values().copied().collect();
    let want: Vec<f64> = (0..100).map(|i| f64::from(40 + i)).collect();
    assert_eq!(
        values, want,
        "all readings, in order of their sequence numbers"
    );
    // The cloud has them all; the gateway counts each once mosquitto's PUBACK is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw
        .uplink()
        .records_delivered
        .load(std::sync::atomic::Ordering::SeqCst)
        < 100
    {
        assert!(
            Instant::now() < deadline,
            "the uplink counted {} of 100 deliveries",
            gw.uplink()
                .records_delivered
                .load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = gw.stop(Duration::from_secs(10)).await;
    assert!(report.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_readings_survive_repeated_kill_9_under_load() {
    const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
    let up = Upstream::new();
    let dir = &up.dir;
    let cfg = up.gateway_config();
    let config_path = write(
        dir.path(),
        "wardgate.toml",
        &wardgate_tests::config_toml(&cfg),
    );
    let start = |n: usize| {
        let mut notify =
            wardgate_tests::NotifySocket::bind(&dir.path().join(format!("n{n}")).tap_mkdir());
        let child = wardgate_tests::daemon_command(BIN, &config_path, &notify)
            .spawn()
            .unwrap();
        let ready = notify
            .wait_for("READY=1", Duration::from_secs(20))
            .expect("ready");
        (
            child,
            wardgate_tests::plain_addr_from_status(&ready).unwrap(),
        )
    };

    // Rounds 0-1: the upstream is down; rounds 2-3: it is up and acknowledging while the
    // gateway is killed mid-stream. In every round the device gets PUBACKs, then kill -9.
    let mut mq: Option<Mosquitto> = None;
    let mut cloud = None;
    let mut acked_values = Vec::new();
    for round in 0..4u32 {
        if round == 2 {
            mq = Some(up.broker());
            cloud = Some(up.subscriber().await);
        }
        let (mut child, addr) = start(round as usize);
        let pm = connect(options(addr, "pm-01", "pw")).await;
        // Heart rates stay inside the plugin's 20-300 range, unique per reading.
        for i in 0..60u32 {
            let hr = 20 + round * 60 + i;
            heartbeat(&pm.client, "ward/pm-01/telemetry", hr).await;
        }
        // Kill while the last ones may still be in flight, once most were acknowledged.
        pm.wait_acks(50, Duration::from_secs(20)).await;
        let acked = pm.acks.load(std::sync::atomic::Ordering::SeqCst) as u32;
        // PUBACKs come in order: the first `acked` readings of the round were promised.
        acked_values.extend((0..acked).map(|i| 20 + round * 60 + i));
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        drop(pm);
    }
    assert!(
        acked_values.len() >= 200,
        "most readings were acknowledged ({})",
        acked_values.len()
    );

    // A last start: every acknowledged reading arrives; repeats are counted.
    let (mut child, _) = start(9);
    let mut cloud = cloud.expect("subscriber");
    let mut seen = std::collections::HashMap::<u32, u32>::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !acked_values.iter().all(|v| seen.contains_key(v)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, cloud.recv()).await {
            Ok(Some((_, hr))) => *seen.entry(hr as u32).or_default() += 1,
            _ => {
                let missing: Vec<_> = acked_values
                    .iter()
                    .filter(|v| !seen.contains_key(v))
                    .collect();
                panic!("acknowledged readings never arrived upstream: {missing:?}");
            }
        }
    }
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "kill -9 rounds: {} acknowledged readings all delivered, {duplicates} duplicates",
        acked_values.len()
    );
    let _ = child.kill();
    let _ = child.wait();
    drop(mq);
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_upstream_under_load_loses_nothing() {
    let up = Upstream::new();
    let mut mq = up.broker();
    let mut cloud = up.subscriber().await;
    let gw = Gateway::start(&up.gateway_config()).await.unwrap();
    let pm = connect(options(gw.listener_addr("plain").unwrap(), "pm-01", "pw")).await;

    let total = 600u32;
    let client = pm.client.clone();
    let publisher = tokio::spawn(async move {
        for i in 0..total {
            heartbeat(&client, "ward/pm-01/telemetry", 20 + i % 280).await;
            // Pacing, not a wait: the stream spans the outages below.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // The upstream goes away and comes back every ~700 ms while readings flow: these sleeps
    // are the scenario (outages at arbitrary points of the stream), not waits.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        mq.restart();
    }
    publisher.await.unwrap();
    let mut seqs = std::collections::BTreeSet::new();
    let mut duplicates = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while seqs.len() < total as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, cloud.recv()).await {
            Ok(Some((seq, _))) => {
                if !seqs.insert(seq) {
                    duplicates += 1;
                }
            }
            _ => panic!(
                "{} of {total} readings arrived through the flapping upstream",
                seqs.len()
            ),
        }
    }
    assert_eq!(seqs.len(), total as usize);
    eprintln!(
        "flapping upstream: {total} readings delivered, {duplicates} duplicates (at-least-once)"
    );
    let _ = gw.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_keeps_alarms_and_evicts_routine_readings_exactly() {
    let up = Upstream::new(); // nothing listens yet: the upstream is down
    let mut cfg = up.gateway_config();
    cfg.queue.max_bytes = 20 * 1024;
    // Only the readings and alarms of this test in the queue, counted exactly.
    cfg.upstream.sync_shadows = false;
    let gw = Gateway::start(&cfg).await.unwrap();
    let pm = connect(options(gw.listener_addr("plain").unwrap(), "pm-01", "pw")).await;
    let (routine, alarms) = (200u32, 20u32);
    for i in 0..routine {
        heartbeat(&pm.client, "ward/pm-01/telemetry", 20 + i % 200).await;
        if i % 10 == 0 {
            heartbeat(&pm.client, "ward/pm-01/alarm", 250 + i / 10).await;
        }
    }
    // Every reading acknowledged (stored, or counted when evicted).
    pm.wait_acks(u64::from(routine + alarms), Duration::from_secs(20))
        .await;

    let _mq = up.broker();
    let mut cloud = up.subscriber().await;
    // Wait until the queue is drained and its books balance: every record appended was
    // delivered (mosquitto's PUBACK is back) or evicted. The cloud then gets the delivered ones.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (q, delivered) = loop {
        let q = gw.queue_status().expect("queue enabled");
        let delivered = gw
            .uplink()
            .records_delivered
            .load(std::sync::atomic::Ordering::SeqCst);
        if q.depth == 0 && q.appended == delivered + q.evicted_over_bytes + q.evicted_over_age {
            break (q, delivered);
        }
        assert!(
            Instant::now() < deadline,
            "queue not drained and settled: {q:?}, {delivered} delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        q.appended,
        u64::from(routine + alarms),
        "every reading queued"
    );
    let mut values = Vec::new();
    while (values.len() as u64) < delivered {
        let (_, hr) = tokio::time::timeout(Duration::from_secs(20), cloud.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {delivered} delivered readings", values.len()))
            .unwrap();
        values.push(hr);
    }
    let alarm_values: Vec<f64> = values.iter().copied().filter(|v| *v >= 250.0).collect();
    let want_alarms: Vec<f64> = (0..alarms).map(|i| f64::from(250 + i)).collect();
    assert_eq!(
        alarm_values, want_alarms,
        "every alarm survived the full queue"
    );
    let routine_delivered = values.len() as u64 - u64::from(alarms);
    assert!(
        routine_delivered < u64::from(routine),
        "the bound forced evictions"
    );
    let evicted = q.evicted_over_bytes + q.evicted_over_age;
    assert_eq!(
        evicted + routine_delivered,
        u64::from(routine),
        "evicted + delivered = routine readings sent (evicted {evicted}, delivered {routine_delivered})"
    );
    let _ = gw.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_alarms_go_first_then_the_backlog_in_order() {
    let up = Upstream::new();
    let gw = Gateway::start(&up.gateway_config()).await.unwrap();
    let pm = connect(options(gw.listener_addr("plain").unwrap(), "pm-01", "pw")).await;
    for i in 0..100u32 {
        heartbeat(&pm.client, "ward/pm-01/telemetry", 40 + i).await;
    }
    for i in 0..5u32 {
        heartbeat(&pm.client, "ward/pm-01/alarm", 250 + i).await;
    }
    tokio::time::timeout(Duration::from_secs(20), async {
        while pm.acks.load(std::sync::atomic::Ordering::SeqCst) < 105 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("all queued");
    let _mq = up.broker();
    let mut cloud = up.subscriber().await;
    let mut order = Vec::new();
    while order.len() < 105 {
        let (_, hr) = tokio::time::timeout(Duration::from_secs(30), cloud.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of 105 arrived", order.len()))
            .unwrap();
        order.push(hr);
    }
    let alarms: Vec<f64> = order[..5].to_vec();
    assert_eq!(
        alarms,
        vec![250.0, 251.0, 252.0, 253.0, 254.0],
        "alarms first: {order:?}"
    );
    let backlog: Vec<f64> = order[5..].to_vec();
    let want: Vec<f64> = (0..100).map(|i| f64::from(40 + i)).collect();
    assert_eq!(backlog, want, "then the backlog, oldest first");
    let _ = gw.stop(Duration::from_secs(10)).await;
}

/// Wait until `gw`'s uplink is connected (`up`) or not.
async fn until_uplink(gw: &Gateway, up: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw
        .uplink()
        .connected
        .load(std::sync::atomic::Ordering::SeqCst)
        != up
    {
        assert!(Instant::now() < deadline, "uplink never {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `gw`'s queue is empty (everything delivered or set aside).
async fn until_queue_empty(gw: &Gateway, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let q = gw.queue_status().expect("queue enabled");
        if q.depth == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "queue not drained: {q:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Queue `record` through the gateway's outbox and wait until it is on disk.
async fn queue_record(gw: &Gateway, record: wardgate::queue::Record) {
    let (ack, on_disk) = wardgate::pipeline::Ack::new();
    assert!(
        gw.outbox()
            .expect("upstream enabled")
            .push(record, Some(ack))
            .await
    );
    tokio::time::timeout(Duration::from_secs(10), on_disk)
        .await
        .expect("queued in time")
        .expect("queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_reaches_its_own_topic_and_undeliverable_records_are_set_aside() {
    use wardgate::queue::{Class, Record, Stream};
    let up = Upstream::new();
    let _mq = up.broker();
    let mut cloud = up
        .raw_subscriber(&[
            "wardgate/test-gateway/readings",
            "wardgate/test-gateway/alerts",
            "$aws/things/test-gateway/shadow/name/+/update",
            "$aws/things/test-gateway/defender/metrics/json",
        ])
        .await;
    let mut up_cfg = up.gateway_config();
    // Only the records this test queues (the reading's shadow is not synchronised).
    up_cfg.upstream.sync_shadows = false;
    // Start with the upstream unreachable so every record waits in the queue together: the
    // undeliverable ones come first and must not hold the others back.
    let mut cfg = up_cfg.clone();
    cfg.upstream.port = free_port();
    let state = cfg.gateway.state_dir.clone();
    let gw = Gateway::start(&cfg).await.unwrap();
    let rec = |class, stream, subject: &str, payload: &str| Record {
        class,
        stream,
        subject: subject.into(),
        // Queued now: a fixed time would one day be older than `queue.max_age` and evicted.
        enqueued_at_ms: wardgate_tests::now_ms(),
        payload: payload.as_bytes().to_vec(),
    };
    // Undeliverable: a device id too long for a named shadow, and a report that is not JSON.
    queue_record(
        &gw,
        rec(
            Class::Routine,
            Stream::Shadow,
            &"x".repeat(70),
            r#"{"state":{}}"#,
        ),
    )
    .await;
    queue_record(&gw, rec(Class::Routine, Stream::Defender, "", "not json")).await;
    let pm = connect(options(gw.listener_addr("plain").unwrap(), "pm-01", "pw")).await;
    heartbeat(&pm.client, "ward/pm-01/telemetry", 72).await;
    let shadow = r#"{"state":{"reported":{"heartbeat":72}}}"#;
    queue_record(&gw, rec(Class::Routine, Stream::Shadow, "pm-01", shadow)).await;
    let alert = r#"{"rule":"tachycardia","device_id":"pm-01","heartbeat":141}"#;
    queue_record(&gw, rec(Class::Alarm, Stream::Alert, "pm-01", alert)).await;
    // Device Defender's report_id is the report's time in epoch seconds.
    let report = format!(
        r#"{{"header":{{"report_id":{},"version":"1.0"}},"metrics":{{"network_stats":{{"bytes_in":10,"bytes_out":20,"packets_in":1,"packets_out":2}}}}}}"#,
        wardgate_tests::now_ms() / 1000
    );
    queue_record(&gw, rec(Class::Routine, Stream::Defender, "", &report)).await;
    pm.wait_acks(1, Duration::from_secs(10)).await;
    let q = gw.queue_status().unwrap();
    assert_eq!(q.depth, 6, "{q:?}");
    let _ = gw.stop(Duration::from_secs(10)).await;

    // Now the upstream is reachable.
    let gw = Gateway::start(&up_cfg).await.unwrap();
    let mut by_topic = BTreeMap::<String, Vec<serde_json::Value>>::new();
    while by_topic.values().map(Vec::len).sum::<usize>() < 4 {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(20), cloud.recv())
            .await
            .unwrap_or_else(|_| panic!("only {by_topic:?} arrived"))
            .unwrap();
        by_topic
            .entry(topic)
            .or_default()
            .push(serde_json::from_slice(&payload).unwrap());
    }
    let one = |t: &str| -> &serde_json::Value {
        let v = by_topic
            .get(t)
            .unwrap_or_else(|| panic!("nothing on {t}: {by_topic:?}"));
        assert_eq!(v.len(), 1, "{t}: {v:?}");
        &v[0]
    };
    let readings = one("wardgate/test-gateway/readings");
    assert_eq!(readings["gateway_id"], "test-gateway");
    let readings = wardgate::uplink::batch::expand(readings).unwrap();
    assert_eq!(readings[0].1["device_id"], "pm-01");
    let alerts = one("wardgate/test-gateway/alerts");
    assert_eq!(alerts["gateway_id"], "test-gateway");
    let alerts = wardgate::uplink::batch::expand(alerts).unwrap();
    assert_eq!(
        alerts[0].1,
        serde_json::from_str::<serde_json::Value>(alert).unwrap()
    );
    let sh = one("$aws/things/test-gateway/shadow/name/pm-01/update");
    assert_eq!(sh["state"]["reported"]["heartbeat"], 72);
    let token = sh["clientToken"].as_str().expect("clientToken added");
    assert!(token.starts_with("test-gateway:"), "{token}");
    let def = one("$aws/things/test-gateway/defender/metrics/json");
    assert_eq!(
        *def,
        serde_json::from_str::<serde_json::Value>(&report).unwrap(),
        "the defender report goes as queued"
    );
    until_queue_empty(&gw, Duration::from_secs(10)).await;
    let q = gw.queue_status().unwrap();
    assert_eq!(q.undeliverable, 2, "{q:?}");
    use wardgate::queue::Stream as S;
    let u = gw.uplink();
    assert_eq!(
        [S::Telemetry, S::Alert, S::Shadow, S::Defender].map(|s| u.delivered(s)),
        [1, 1, 1, 1]
    );
    let _ = gw.stop(Duration::from_secs(10)).await;
    // The set-aside records are kept on disk for forensics.
    let db = wait_open_sled(&state.join("queue"));
    assert_eq!(db.open_tree("undeliverable").unwrap().len(), 2);
}

/// Open the queue's sled database once the gateway let go of it.
fn wait_open_sled(dir: &Path) -> sled::Db {
    for _ in 0..300 {
        if let Ok(db) = sled::open(dir) {
            return db;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sled::open(dir).expect("queue database opens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_ward_reaches_the_upstream_reading_for_reading() {
    use std::sync::atomic::Ordering::SeqCst;
    let up = Upstream::new();
    let _mq = up.broker();
    // One cloud client for both topics (a second one with the same client id would take its
    // session over).
    let mut cloud = up
        .raw_subscriber(&[
            "wardgate/test-gateway/readings",
            "wardgate/test-gateway/alerts",
        ])
        .await;
    let mut alerts = Vec::new();
    let ward = wardgate::sim::ward(2);
    let alarms = ward
        .iter()
        .filter(|d| d.id.starts_with("pacemaker-alarm"))
        .count();
    let mut cfg = wardgate::cli::demo_config(&ward, wardgate_tests::components_dir());
    let up_cfg = up.gateway_config();
    cfg.gateway.id = up_cfg.gateway.id.clone();
    cfg.gateway.state_dir = up_cfg.gateway.state_dir.clone();
    cfg.upstream = up_cfg.upstream.clone();
    let gw = Gateway::start(&cfg).await.unwrap();
    let stats = Arc::new(wardgate::sim::SimStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let sim = tokio::spawn(wardgate::sim::run(
        gw.listener_addr("plain").unwrap(),
        ward.clone(),
        50.0,
        stats.clone(),
        stop.clone(),
    ));
    // The ward runs for 4 s: this sleep is the length of the scenario, not a wait.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    sim.await.unwrap();
    // Every device has disconnected; what the gatekeeper took in may still be in the pipeline
    // and the queue writer. Every normalised message must end up queued, and the upstream must
    // take everything queued: wait for both (a lost message fails here).
    let deadline = Instant::now() + Duration::from_secs(30);
    let queued = loop {
        let normalized: u64 = gw
            .stats()
            .snapshot()
            .values()
            .map(|c| c.messages - c.dead_letters)
            .sum();
        // The demo rule's alerts are queued too (one per alarm pacemaker: debounced).
        let fired = gw.rule_counts()[0].fired;
        // And the devices' shadow updates for the cloud.
        let synced = gw.shadow_stats().synced;
        let q = gw.queue_status().expect("queue enabled");
        if q.depth == 0 && q.appended == normalized + fired + synced && fired == alarms as u64 {
            break q.appended - fired - synced;
        }
        assert!(
            Instant::now() < deadline,
            "not every normalised message was queued and delivered: {normalized} normalised, \
             queue {q:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let acked = stats.acked.load(SeqCst);
    assert!(acked > 100, "the ward was busy ({acked} PUBACKs)");

    // The cloud sees every queued record, once per sequence number, in order per device.
    let mut seen = BTreeMap::<u64, serde_json::Value>::new();
    while (seen.len() as u64) < queued || alerts.len() < alarms {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(20), cloud.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {queued} readings and {} of {alarms} alerts arrived",
                    seen.len(),
                    alerts.len()
                )
            })
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        if topic.ends_with("/alerts") {
            alerts.extend(v["messages"].as_array().unwrap().iter().cloned());
            continue;
        }
        assert_eq!(v["gateway_id"], "test-gateway");
        for (seq, m) in wardgate::uplink::batch::expand(&v).unwrap() {
            seen.insert(seq, m);
        }
    }
    assert_eq!(seen.len() as u64, queued);
    let mut last_seen_at = BTreeMap::<String, i64>::new();
    for m in seen.values() {
        let id = m["device_id"].as_str().unwrap().to_owned();
        let at = m["received_at_ms"].as_i64().unwrap();
        let prev = last_seen_at.insert(id.clone(), at);
        assert!(prev.is_none_or(|p| p <= at), "{id}: out of order");
    }
    for d in ward.iter().filter(|d| d.kind != "generic") {
        assert!(
            last_seen_at.contains_key(&d.id),
            "{} has readings upstream: {:?}",
            d.id,
            last_seen_at.keys()
        );
    }
    // Each alarm pacemaker tripped the demo's tachycardia rule once; its alert reached the
    // alerts topic.
    assert_eq!(gw.rule_counts()[0].fired, alarms as u64);
    let mut alerted = std::collections::BTreeSet::new();
    for m in &alerts {
        assert_eq!(m["message"]["rule"], "tachycardia");
        assert_eq!(m["message"]["output"]["heart_rate"], 141.0);
        alerted.insert(m["message"]["device_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(alerted.len(), alarms, "{alerts:?}");
    // The rogue agents' random strings are dead letters, never forwarded.
    assert!(!last_seen_at.keys().any(|id| id.starts_with("rogue")));
    eprintln!(
        "simulated ward: {acked} PUBACKs, {queued} readings queued and all delivered upstream"
    );
    let _ = gw.stop(Duration::from_secs(10)).await;
}

/// The ALPN protocol the uplink negotiates with a TLS server on 127.0.0.1 (the server takes
/// either of IoT Core's and reports what was agreed, then closes), and the SNI it sent.
async fn offered_alpn(cfg_alpn: Option<Vec<String>>) -> (Option<Vec<u8>>, Option<String>) {
    let up = Upstream::new();
    let mut ca = Ca::new("Endpoint CA");
    let server = ca.server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec(), b"mqtt".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let mut cfg = up.gateway_config();
    cfg.upstream.port = listener.local_addr().unwrap().port();
    cfg.upstream.ca_file = Some(write(up.dir.path(), "endpoint-ca.pem", &ca.cert.pem()));
    cfg.upstream.alpn = cfg_alpn;
    let gw = Gateway::start(&cfg).await.unwrap();
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the uplink connects")
        .unwrap();
    let stream = acceptor.accept(tcp).await.expect("TLS handshake");
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let sni = stream.get_ref().1.server_name().map(str::to_owned);
    drop(stream);
    let _ = gw.stop(Duration::from_secs(5)).await;
    (alpn, sni)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_and_sni_are_offered_as_configured() {
    let (alpn, sni) = offered_alpn(None).await;
    assert_eq!(alpn, None, "none on a port other than 443");
    assert_eq!(sni.as_deref(), Some("localhost"), "SNI = upstream.endpoint");
    let (alpn, _) = offered_alpn(Some(vec!["x-amzn-mqtt-ca".into()])).await;
    assert_eq!(alpn.as_deref(), Some(&b"x-amzn-mqtt-ca"[..]));
    // Port 443 itself cannot be bound by a test: the default there is checked on the config.
    let mut u = wardgate::config::UpstreamConfig {
        port: 443,
        ..Default::default()
    };
    assert_eq!(u.alpn_protocols(), vec![b"x-amzn-mqtt-ca".to_vec()]);
    u.alpn = Some(vec![]);
    assert!(u.alpn_protocols().is_empty(), "`alpn = []` offers none");
}

/// The batch format as the cloud sees it: readings of three kinds of device share messages,
/// grouped per device, and the decoder shipped in `packaging/examples/expand_batch.py` gives
/// back the same records as the reference decoder, each with its device's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_decode_with_the_shipped_python_example() {
    let up = Upstream::new();
    let _mq = up.broker();
    let mut cloud = up.raw_subscriber(&["wardgate/test-gateway/readings"]).await;
    let mut cfg = up.gateway_config();
    cfg.devices
        .push(wardgate_tests::device("gl-01", "glucose", "pw"));
    cfg.devices
        .push(wardgate_tests::device("bt-01", "bed-temperature", "pw"));
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let pm = connect(options(addr, "pm-01", "pw")).await;
    let gl = connect(options(addr, "gl-01", "pw")).await;
    let bt = connect(options(addr, "bt-01", "pw")).await;
    let secs = wardgate_tests::now_ms() / 1000;
    for i in 0..20u32 {
        heartbeat(&pm.client, "ward/pm-01/telemetry", 60 + i).await;
        gl.client
            .publish(
                "ward/gl-01/telemetry",
                QoS::AtLeastOnce,
                false,
                format!("SS1;{}.5;mmol/L;{secs}", 5 + i % 3),
            )
            .await
            .unwrap();
        bt.client
            .publish(
                "ward/bt-01/telemetry",
                QoS::AtLeastOnce,
                false,
                format!("bed=07 temp_c=36.{} ts={secs}", i % 10),
            )
            .await
            .unwrap();
    }
    let mut lines = String::new();
    let mut records = Vec::new();
    while records.len() < 60 {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(20), cloud.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of 60 records arrived", records.len()))
            .unwrap();
        let batch: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(batch["format"], 2, "{batch}");
        records.extend(wardgate::uplink::batch::expand(&batch).unwrap());
        lines.push_str(std::str::from_utf8(&payload).unwrap());
        lines.push('\n');
    }
    let _ = gw.stop(Duration::from_secs(10)).await;

    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples/expand_batch.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let from_python: Vec<(u64, serde_json::Value)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["seq"].as_u64().unwrap(), v["message"].clone())
        })
        .collect();
    assert_eq!(
        from_python, records,
        "the Python decoder agrees with the reference"
    );

    let mut by_device = BTreeMap::<String, Vec<f64>>::new();
    for (_, m) in &records {
        assert_eq!(m["gateway_id"], "test-gateway");
        let id = m["device_id"].as_str().unwrap();
        assert_eq!(m["topic"], format!("ward/{id}/telemetry"));
        by_device
            .entry(id.into())
            .or_default()
            .push(m["readings"][0]["value"].as_f64().unwrap());
    }
    let want_pm: Vec<f64> = (0..20).map(|i| f64::from(60 + i)).collect();
    assert_eq!(by_device["pm-01"], want_pm);
    assert_eq!(by_device["gl-01"].len(), 20);
    let want_bt: Vec<f64> = (0..20)
        .map(|i| format!("36.{}", i % 10).parse().unwrap())
        .collect();
    assert_eq!(by_device["bt-01"], want_bt);
    let glucose = records
        .iter()
        .find(|(_, m)| m["device_id"] == "gl-01")
        .unwrap();
    assert_eq!(glucose.1["kind"], "glucose");
    assert_eq!(glucose.1["readings"][0]["unit"], "mg/dL");
    assert_eq!(glucose.1["readings"][0]["observed_at_ms"], secs * 1000);
}
