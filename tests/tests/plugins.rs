//! The plugin platform with real components built from `plugins/` (`cargo xtask plugins`):
//! each plugin against its simulator's payloads, misbehaving guests contained, hot swap under
//! a live stream, a corrupt file rejected.

use rumqttc::QoS;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wardgate::app::Gateway;
use wardgate::config::PluginsConfig;
use wardgate::plugin_host::{Failure, Input, PluginHost};
use wardgate::sim::Model;
use wardgate_tests::{component, config, connect, device, now_ms, options, pacemaker_reading};

fn host(dir: &std::path::Path) -> Arc<PluginHost> {
    // A generous deadline so that on a loaded machine the allocating guest reliably hits the
    // memory cap first and the looping one the deadline.
    let cfg = PluginsConfig {
        dir: dir.to_path_buf(),
        shipped_dir: Default::default(),
        poll_interval: Duration::from_millis(100),
        call_deadline: Duration::from_millis(200),
        max_memory_bytes: 16 * 1024 * 1024,
        max_consecutive_traps: 3,
    };
    PluginHost::new(&cfg, None).unwrap()
}

fn call(
    h: &PluginHost,
    plugin: &str,
    payload: &[u8],
    settings: &Arc<BTreeMap<String, String>>,
) -> Result<Vec<wardgate::plugin_host::Reading>, Failure> {
    h.normalize(
        plugin,
        Input {
            device_id: "dev-1",
            kind: plugin,
            topic: "ward/dev-1/telemetry",
            payload,
            received_at_ms: now_ms(),
            settings,
        },
    )
    .map(|n| n.readings)
}

/// Whether the host's `pacemaker` plugin normalises a good reading.
fn pacemaker_normalises(h: &PluginHost) -> bool {
    let none = Arc::new(BTreeMap::new());
    call(h, "pacemaker", pacemaker_reading(70).as_bytes(), &none).is_ok()
}

fn rejected(r: Result<Vec<wardgate::plugin_host::Reading>, Failure>) -> &'static str {
    match r {
        Err(Failure::Rejected { kind, .. }) => kind,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn each_plugin_normalises_its_vendor_formats_and_rejects_bad_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(dir.path());
    for p in ["pacemaker", "glucose", "bed-temperature"] {
        h.load_file(&component(p)).unwrap();
    }
    let none = Arc::new(BTreeMap::new());
    let mut rng = rand::thread_rng();
    // Now, in whole seconds: the glucose and bed vendors send seconds.
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    let t_ms = secs as i64 * 1000;
    let rfc3339 = humantime::format_rfc3339_seconds(t).to_string();
    let local_time = format!("{}+02:00", rfc3339.trim_end_matches('Z'));

    // Pacemaker: simulator payloads, heart rate and battery, device time kept.
    for _ in 0..20 {
        let payload = Model::Pacemaker.payload(1, t, &mut rng);
        let r = call(&h, "pacemaker", &payload, &none).unwrap();
        assert_eq!(r[0].metric, "heart-rate");
        assert_eq!(r[0].unit, "/min");
        assert!((80.0..=110.0).contains(&r[0].value));
        assert_eq!(r[0].observed_at_ms, t_ms);
        assert_eq!(r[1].metric, "battery-level");
    }
    let alarm = call(
        &h,
        "pacemaker",
        &Model::PacemakerAlarm.payload(1, t, &mut rng),
        &none,
    )
    .unwrap();
    assert_eq!((alarm[0].value, alarm[0].quality), (141.0, "good"));
    assert_eq!(
        rejected(call(
            &h,
            "pacemaker",
            format!(r#"{{"heartbeat":400,"ts":{t_ms}}}"#).as_bytes(),
            &none
        )),
        "out-of-range"
    );
    assert_eq!(
        rejected(call(
            &h,
            "pacemaker",
            br#"{"heartbeat":92,"ts":17953"#,
            &none
        )),
        "malformed"
    );
    assert_eq!(
        rejected(call(
            &h,
            "pacemaker",
            format!(r#"{{"ts":{t_ms}}}"#).as_bytes(),
            &none
        )),
        "malformed"
    );

    // Glucose: both vendors, converted to mg/dL; the device setting switches to mmol/L.
    let a = call(
        &h,
        "glucose",
        &Model::GlucoseMgDl.payload(1, t, &mut rng),
        &none,
    )
    .unwrap();
    assert_eq!(
        (a[0].metric.as_str(), a[0].unit.as_str()),
        ("blood-glucose", "mg/dL")
    );
    assert_eq!(a[0].observed_at_ms, t_ms);
    let b = call(
        &h,
        "glucose",
        format!("SS1;5.5;mmol/L;{secs}").as_bytes(),
        &none,
    )
    .unwrap();
    assert_eq!((b[0].value, b[0].unit.as_str()), (99.1, "mg/dL"));
    assert_eq!(b[0].observed_at_ms, t_ms);
    let mmol = Arc::new(BTreeMap::from([("unit".to_owned(), "mmol/L".to_owned())]));
    let c = call(
        &h,
        "glucose",
        format!(r#"{{"glucose":{{"value":180,"unit":"mg/dL"}},"measured_at":"{rfc3339}"}}"#)
            .as_bytes(),
        &mmol,
    )
    .unwrap();
    assert_eq!((c[0].value, c[0].unit.as_str()), (9.99, "mmol/L"));
    assert_eq!(
        rejected(call(
            &h,
            "glucose",
            format!("SS1;5.5;g/L;{secs}").as_bytes(),
            &none
        )),
        "unsupported"
    );
    assert_eq!(
        rejected(call(
            &h,
            "glucose",
            format!("SS1;80.0;mmol/L;{secs}").as_bytes(),
            &none
        )),
        "out-of-range"
    );
    assert_eq!(
        rejected(call(&h, "glucose", b"SS1;5.5;mmol", &none)),
        "malformed"
    );
    let offset =
        format!(r#"{{"glucose":{{"value":104,"unit":"mg/dL"}},"measured_at":"{local_time}"}}"#);
    assert_eq!(
        rejected(call(&h, "glucose", offset.as_bytes(), &none)),
        "malformed",
        "only UTC times"
    );

    // Bed temperature: °F → °C.
    let bt = call(
        &h,
        "bed-temperature",
        format!("bed=07 temp_f=98.6 ts={secs}").as_bytes(),
        &none,
    )
    .unwrap();
    assert_eq!(
        (bt[0].value, bt[0].unit.as_str(), bt[0].observed_at_ms),
        (37.0, "Cel", t_ms)
    );
    let sim = call(
        &h,
        "bed-temperature",
        &Model::BedTemperatureF.payload(3, t, &mut rng),
        &none,
    )
    .unwrap();
    assert!((36.0..=38.1).contains(&sim[0].value), "{sim:?}");
    assert_eq!(
        rejected(call(
            &h,
            "bed-temperature",
            format!("bed=07 temp_f=150 ts={secs}").as_bytes(),
            &none
        )),
        "out-of-range"
    );
    assert_eq!(
        rejected(call(
            &h,
            "bed-temperature",
            format!("bed=07 temp_k=310 ts={secs}").as_bytes(),
            &none
        )),
        "unsupported"
    );
    assert_eq!(
        rejected(call(&h, "bed-temperature", b"bed=07 temp_f=98.", &none)),
        "malformed"
    );
}

#[test]
fn misbehaving_guests_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(dir.path());
    for p in [
        "pacemaker",
        "test-loop",
        "test-alloc",
        "test-panic",
        "test-nonsense",
    ] {
        h.load_file(&component(p)).unwrap();
    }
    let none = Arc::new(BTreeMap::new());
    let good = pacemaker_reading(90);
    let good = good.as_bytes();
    let expect = [
        ("test-loop", "deadline"),
        ("test-alloc", "memory"),
        ("test-panic", "panicked"),
    ];
    for (plugin, what) in expect {
        let started = std::time::Instant::now();
        match call(&h, plugin, b"x", &none) {
            Err(Failure::Trap(reason)) => assert!(reason.contains(what), "{plugin}: {reason}"),
            other => panic!("{plugin}: expected a trap, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{plugin} was not stopped"
        );
        // The host and the other plugins are unaffected.
        assert_eq!(call(&h, "pacemaker", good, &none).unwrap()[0].value, 90.0);
    }
    match call(&h, "test-nonsense", b"x", &none) {
        Err(Failure::InvalidOutput(_)) => {}
        other => panic!("nonsense output must be refused, got {other:?}"),
    }
    // A device that keeps trapping a plugin is contained for it.
    for _ in 0..2 {
        assert!(matches!(
            call(&h, "test-panic", b"x", &none),
            Err(Failure::Trap(_))
        ));
    }
    assert_eq!(h.get("test-panic").unwrap().contained().len(), 1);
    assert!(matches!(
        call(&h, "test-panic", b"x", &none),
        Err(Failure::Contained { .. })
    ));
    assert_eq!(call(&h, "pacemaker", good, &none).unwrap().len(), 1);
}

#[test]
fn a_corrupt_file_is_rejected_and_the_previous_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pacemaker.wasm");
    std::fs::copy(component("pacemaker"), &path).unwrap();
    let h = host(dir.path());
    h.scan();
    let v1 = h.get("pacemaker").expect("v1 loaded");
    // Replace with garbage (and a truncated component).
    let bytes = std::fs::read(component("test-pacemaker-v2")).unwrap();
    for bad in [
        b"not wasm at all".to_vec(),
        bytes[..bytes.len() / 2].to_vec(),
    ] {
        let tmp = dir.path().join(".pacemaker.wasm.tmp");
        std::fs::write(&tmp, &bad).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        h.scan();
        let now = h.get("pacemaker").expect("still loaded");
        assert_eq!(now.digest(), v1.digest(), "v1 keeps serving");
        assert!(pacemaker_normalises(&h));
    }
    // A good v2 replaces it.
    std::fs::copy(component("test-pacemaker-v2"), dir.path().join(".tmp")).unwrap();
    std::fs::rename(dir.path().join(".tmp"), &path).unwrap();
    h.scan();
    assert_eq!(h.get("pacemaker").unwrap().version(), "0.2.0");
    // And a removed file unloads the plugin.
    std::fs::remove_file(&path).unwrap();
    h.scan();
    assert!(h.get("pacemaker").is_none());
}

#[test]
fn a_drop_in_plugin_overrides_the_shipped_one_until_it_is_removed() {
    let drop_in = tempfile::tempdir().unwrap();
    let shipped = tempfile::tempdir().unwrap();
    std::fs::copy(
        component("pacemaker"),
        shipped.path().join("pacemaker.wasm"),
    )
    .unwrap();
    std::fs::copy(component("glucose"), shipped.path().join("glucose.wasm")).unwrap();
    let cfg = PluginsConfig {
        dir: drop_in.path().to_path_buf(),
        shipped_dir: shipped.path().to_path_buf(),
        ..PluginsConfig::default()
    };
    let h = PluginHost::new(&cfg, None).unwrap();
    h.scan();
    let shipped_version = h
        .get("pacemaker")
        .expect("shipped plugin loaded")
        .version()
        .to_owned();
    assert!(h.get("glucose").is_some(), "every shipped plugin is loaded");
    assert_ne!(shipped_version, "0.2.0");

    // A newer version dropped in wins over the shipped one.
    let path = drop_in.path().join("pacemaker.wasm");
    std::fs::copy(component("test-pacemaker-v2"), &path).unwrap();
    h.scan();
    assert_eq!(h.get("pacemaker").unwrap().version(), "0.2.0");
    // Scanning again changes nothing (the shipped file is not loaded over it).
    h.scan();
    assert_eq!(h.get("pacemaker").unwrap().version(), "0.2.0");

    // Removing the drop-in brings the shipped version back instead of unloading the plugin.
    std::fs::remove_file(&path).unwrap();
    h.scan();
    assert_eq!(
        h.get("pacemaker")
            .expect("the shipped version serves again")
            .version(),
        shipped_version
    );
    assert!(pacemaker_normalises(&h));

    // Removed from both: unloaded.
    std::fs::remove_file(shipped.path().join("pacemaker.wasm")).unwrap();
    h.scan();
    assert!(h.get("pacemaker").is_none());
    assert!(h.get("glucose").is_some());
}

/// Publish one pacemaker reading (QoS 1) with heart rate `hr`, taken now.
async fn send_heart_rate(client: &rumqttc::AsyncClient, hr: u32) {
    wardgate_tests::send_heart_rate(client, "pm-01", hr).await;
}

/// A monitor allowed to read every device's canonical readings.
fn monitor() -> wardgate::config::DeviceConfig {
    let mut m = device("monitor-01", "monitor", "m");
    m.subscribe = Some(vec!["ward/+/readings".into()]);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_plugin_never_costs_another_device_a_reading() {
    let state = tempfile::tempdir().unwrap();
    let mut devices = vec![device("pm-01", "pacemaker", "pw"), monitor()];
    for (id, plugin) in [
        ("bad-loop", "test-loop"),
        ("bad-alloc", "test-alloc"),
        ("bad-panic", "test-panic"),
    ] {
        let mut d = device(id, "test", "pw");
        d.plugin = Some(plugin.into());
        devices.push(d);
    }
    let plugins = tempfile::tempdir().unwrap();
    for p in ["pacemaker", "test-loop", "test-alloc", "test-panic"] {
        std::fs::copy(component(p), plugins.path().join(format!("{p}.wasm"))).unwrap();
    }
    let mut cfg = config(state.path(), devices);
    cfg.plugins.dir = plugins.path().to_path_buf();
    cfg.plugins.call_deadline = Duration::from_millis(5);
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut mon = connect(options(addr, "monitor-01", "m")).await;
    mon.subscribe("ward/+/readings").await;

    let n: u32 = 60;
    let pm = connect(options(addr, "pm-01", "pw")).await;
    let bad: Vec<_> = futures_join(
        ["bad-loop", "bad-alloc", "bad-panic"].map(|id| connect(options(addr, id, "pw"))),
    )
    .await;
    for i in 0..n {
        let hr = 60 + i % 50;
        send_heart_rate(&pm.client, hr).await;
        for (d, id) in bad.iter().zip(["bad-loop", "bad-alloc", "bad-panic"]) {
            d.client
                .publish(
                    format!("ward/{id}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    b"x".to_vec(),
                )
                .await
                .unwrap();
        }
    }
    let mut got = Vec::new();
    while got.len() < n as usize {
        let (topic, payload) = mon
            .next(Duration::from_secs(20))
            .await
            .expect("canonical readings keep flowing");
        assert_eq!(topic, "ward/pm-01/readings");
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        got.push(v["readings"][0]["value"].as_f64().unwrap());
    }
    let want: Vec<f64> = (0..n).map(|i| f64::from(60 + i % 50)).collect();
    assert_eq!(got, want, "every pacemaker reading, in order");
    // Every bad message was acknowledged and kept, with its reason.
    tokio::time::timeout(Duration::from_secs(20), async {
        while bad
            .iter()
            .any(|d| d.acks.load(std::sync::atomic::Ordering::SeqCst) < u64::from(n))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("bad devices' messages are acknowledged once stored");
    let report = gw.stop(Duration::from_secs(10)).await;
    assert!(report.drained);
    let dead = wardgate::pipeline::DeadLetters::new(state.path()).read_all();
    for id in ["bad-loop", "bad-alloc", "bad-panic"] {
        let mine: Vec<_> = dead.iter().filter(|d| d.device_id == id).collect();
        assert_eq!(
            mine.len(),
            n as usize,
            "{id}: every message in the dead-letter store"
        );
    }
    // Each bad guest trapped until its device was contained; the loop hit the deadline. (Whether
    // the allocator hits the memory cap or the 5 ms deadline first depends on the machine's
    // load; `misbehaving_guests_are_contained` pins each cause down.)
    assert!(dead
        .iter()
        .all(|d| matches!(d.reason_kind.as_str(), "trap" | "device-contained")));
    assert!(dead
        .iter()
        .any(|d| d.device_id == "bad-loop" && d.reason.contains("deadline")));
    assert!(dead.iter().any(|d| d.reason_kind == "device-contained"));
}

async fn futures_join<F: std::future::Future>(fs: [F; 3]) -> Vec<F::Output> {
    let mut out = Vec::new();
    for f in fs {
        out.push(f.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_a_live_stream_loses_nothing() {
    let state = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    std::fs::copy(
        component("pacemaker"),
        plugins.path().join("pacemaker.wasm"),
    )
    .unwrap();
    let mut cfg = config(
        state.path(),
        vec![device("pm-01", "pacemaker", "pw"), monitor()],
    );
    cfg.plugins.dir = plugins.path().to_path_buf();
    cfg.plugins.poll_interval = Duration::from_millis(50);
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut mon = connect(options(addr, "monitor-01", "m")).await;
    mon.subscribe("ward/+/readings").await;
    let pm = connect(options(addr, "pm-01", "pw")).await;

    let total = 1000;
    let dir = plugins.path().to_path_buf();
    let publisher = tokio::spawn(async move {
        for i in 0..total {
            if i == total / 3 {
                // Drop in v2 the way an operator should: write beside, then rename over.
                let tmp = dir.join(".pacemaker.wasm.new");
                std::fs::copy(component("test-pacemaker-v2"), &tmp).unwrap();
                std::fs::rename(&tmp, dir.join("pacemaker.wasm")).unwrap();
            }
            let hr = 40 + i % 100;
            send_heart_rate(&pm.client, hr).await;
            // Pacing, not a wait: the stream spans the swap.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pm
    });
    let mut versions = Vec::new();
    while versions.len() < total as usize {
        let (_, payload) = mon
            .next(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("only {} of {total} readings", versions.len()));
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v["readings"][0]["value"].as_f64().unwrap(),
            f64::from(40 + versions.len() as u32 % 100),
            "in order, none lost"
        );
        versions.push(v["plugin_version"].as_str().unwrap().to_owned());
    }
    let _pm = publisher.await.unwrap();
    let first_v2 = versions
        .iter()
        .position(|v| v == "0.2.0")
        .expect("v2 took over");
    assert!(first_v2 > 0, "v1 served before the swap");
    assert!(versions[..first_v2].iter().all(|v| v == "0.1.0"));
    assert!(
        versions[first_v2..].iter().all(|v| v == "0.2.0"),
        "after the swap everything is handled by v2"
    );
    assert!(
        mon.next(Duration::from_millis(300)).await.is_none(),
        "no duplicates"
    );
    let report = gw.stop(Duration::from_secs(10)).await;
    assert!(report.drained);
}

#[test]
fn compiled_components_are_cached_in_the_state_directory() {
    let plugins = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::copy(
        component("pacemaker"),
        plugins.path().join("pacemaker.wasm"),
    )
    .unwrap();
    let cfg = PluginsConfig {
        dir: plugins.path().to_path_buf(),
        shipped_dir: Default::default(),
        ..PluginsConfig::default()
    };
    let first = PluginHost::new(&cfg, Some(state.path())).unwrap();
    first.scan();
    // Compiled by an engine of its own (dropped after), loaded by the host's.
    assert!(pacemaker_normalises(&first));
    let digest = first.get("pacemaker").unwrap().digest().to_owned();
    let cached: Vec<_> = walk(&state.path().join("plugin-cache"));
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].ends_with(&format!("{digest}.cwasm")));
    drop(first);
    // A second host (a restart) loads from the cache and works; a damaged cache entry is
    // recompiled, not trusted.
    let second = PluginHost::new(&cfg, Some(state.path())).unwrap();
    second.scan();
    assert!(pacemaker_normalises(&second));
    drop(second);
    std::fs::write(&cached[0], b"damaged").unwrap();
    let third = PluginHost::new(&cfg, Some(state.path())).unwrap();
    third.scan();
    assert!(pacemaker_normalises(&third));
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}
