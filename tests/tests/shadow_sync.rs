//! Device shadows kept in step with IoT Core (its stand-in: mosquitto, with the cloud's shadow
//! service answering on it): reported state goes up, desired state set in the cloud reaches
//! the device as a local delta, and an outage in which both sides changed ends by the rule —
//! the cloud wins a desired key both changed, the ward's other changes go up.

use rumqttc::QoS;
use serde_json::{json, Value};
use std::time::Duration;
use wardgate::app::Gateway;
use wardgate_tests::upstream::{CloudShadows, Upstream};
use wardgate_tests::{connect, options, until, Device};

const PM: &str = "$aws/things/pm-01/shadow";

async fn update(pm: &Device, state: Value) {
    pm.client
        .publish(
            format!("{PM}/update"),
            QoS::AtLeastOnce,
            false,
            json!({ "state": state }).to_string(),
        )
        .await
        .unwrap();
}

/// The next message on `topic`, skipping others.
async fn next_on(pm: &mut Device, topic: &str) -> Value {
    loop {
        let (t, payload) = pm
            .next(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("nothing on {topic} within 30 s"));
        if t == topic {
            return serde_json::from_slice(&payload).unwrap();
        }
    }
}

fn cloud_has(cloud: &CloudShadows, pointer: &str, want: Value) -> bool {
    cloud
        .shadow("pm-01")
        .and_then(|s| s.pointer(pointer).cloned())
        == Some(want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_follow_the_cloud_and_an_outage_on_both_sides_ends_by_the_rule() {
    let up = Upstream::new();
    let mut mq = up.broker();
    let cloud = CloudShadows::start(&up).await;
    let gw = Gateway::start(&up.gateway_config()).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut pm = connect(options(addr, "pm-01", "pw")).await;
    pm.subscribe(&format!("{PM}/update/delta")).await;
    pm.subscribe(&format!("{PM}/update/accepted")).await;

    // Reported state goes up to the gateway's named shadow for the device.
    update(&pm, json!({"reported": {"heartbeat": 70, "rate": 5}})).await;
    next_on(&mut pm, &format!("{PM}/update/accepted")).await;
    until(
        "the cloud has the reported state",
        Duration::from_secs(30),
        || cloud_has(&cloud, "/state/reported/heartbeat", json!(70)),
    )
    .await;

    // Desired set in the cloud reaches the device as a local delta.
    cloud.set_desired("pm-01", json!({"rate": 10}), true);
    let delta = next_on(&mut pm, &format!("{PM}/update/delta")).await;
    assert_eq!(delta["state"], json!({"rate": 10}), "{delta}");

    // The uplink goes down; both sides change.
    mq.stop();
    until(
        "the uplink sees the outage",
        Duration::from_secs(30),
        || {
            !gw.uplink()
                .connected
                .load(std::sync::atomic::Ordering::Relaxed)
        },
    )
    .await;
    update(&pm, json!({"reported": {"heartbeat": 80}})).await;
    next_on(&mut pm, &format!("{PM}/update/accepted")).await;
    update(
        &pm,
        json!({"desired": {"alarm_limit": 150, "mode": "night"}}),
    )
    .await;
    let local_delta = next_on(&mut pm, &format!("{PM}/update/delta")).await;
    assert_eq!(local_delta["state"]["alarm_limit"], 150, "{local_delta}");
    // The cloud changes alarm_limit too (and rate); the gateway's session misses it.
    cloud.set_desired("pm-01", json!({"alarm_limit": 140, "rate": 12}), false);

    // Back: the fetch brings the cloud's changes down as a local delta (the cloud wins
    // alarm_limit), and the ward's other changes go up.
    mq.restart();
    let delta = next_on(&mut pm, &format!("{PM}/update/delta")).await;
    assert_eq!(delta["state"]["alarm_limit"], 140, "{delta}");
    assert_eq!(delta["state"]["rate"], 12, "{delta}");
    until(
        "the cloud has the ward's changes",
        Duration::from_secs(30),
        || {
            cloud_has(&cloud, "/state/reported/heartbeat", json!(80))
                && cloud_has(&cloud, "/state/desired/mode", json!("night"))
        },
    )
    .await;
    let up_desired = cloud.shadow("pm-01").unwrap()["state"]["desired"].clone();
    assert_eq!(
        up_desired,
        json!({"rate": 12, "alarm_limit": 140, "mode": "night"})
    );

    // Both sides agree.
    pm.subscribe(&format!("{PM}/get/accepted")).await;
    pm.client
        .publish(format!("{PM}/get"), QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let local = next_on(&mut pm, &format!("{PM}/get/accepted")).await;
    assert_eq!(local["state"]["desired"], up_desired, "{local}");
    assert_eq!(
        local["state"]["reported"],
        json!({"heartbeat": 80, "rate": 5})
    );
    let counts = gw.shadow_stats();
    assert!(counts.synced >= 3, "{counts:?}");
    gw.stop(Duration::from_secs(10)).await;
}

/// Changes made while the uplink is down wait in the shadow store, not in memory: a gateway
/// restarted before the uplink returns still sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_offline_survive_a_restart_and_go_up_when_the_uplink_returns() {
    let up = Upstream::new();
    let mut mq = up.broker();
    let cloud = CloudShadows::start(&up).await;
    mq.stop();
    let cfg = up.gateway_config();
    let gw = Gateway::start(&cfg).await.unwrap();
    let mut pm = connect(options(gw.listener_addr("plain").unwrap(), "pm-01", "pw")).await;
    pm.subscribe(&format!("{PM}/update/accepted")).await;
    update(
        &pm,
        json!({"reported": {"heartbeat": 90}, "desired": {"mode": "day"}}),
    )
    .await;
    next_on(&mut pm, &format!("{PM}/update/accepted")).await;
    drop(pm);
    gw.stop(Duration::from_secs(10)).await;
    assert!(cloud.shadow("pm-01").is_none());

    mq.restart();
    let gw = Gateway::start(&cfg).await.unwrap();
    until(
        "the cloud has the offline changes",
        Duration::from_secs(30),
        || {
            cloud_has(&cloud, "/state/reported/heartbeat", json!(90))
                && cloud_has(&cloud, "/state/desired/mode", json!("day"))
        },
    )
    .await;
    gw.stop(Duration::from_secs(10)).await;
}

/// Reported state made from readings goes up with the device's next own update by default,
/// and on every change with `upstream.sync_readings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_reach_the_cloud_shadow_with_the_next_update_or_at_once_when_asked() {
    for mirror in [false, true] {
        let up = Upstream::new();
        let _mq = up.broker();
        let cloud = CloudShadows::start(&up).await;
        let mut cfg = up.gateway_config();
        cfg.upstream.sync_readings = mirror;
        let gw = Gateway::start(&cfg).await.unwrap();
        let mut pm = connect(options(gw.listener_addr("plain").unwrap(), "pm-01", "pw")).await;
        wardgate_tests::send_heart_rate(&pm.client, "pm-01", 77).await;
        until(
            "the reading reaches the local shadow",
            Duration::from_secs(20),
            || gw.shadow_stats().reports >= 1,
        )
        .await;
        if mirror {
            until(
                "the reading reaches the cloud shadow",
                Duration::from_secs(30),
                || cloud_has(&cloud, "/state/reported/heart_rate", json!(77.0)),
            )
            .await;
        } else {
            pm.subscribe(&format!("{PM}/update/accepted")).await;
            update(&pm, json!({"reported": {"battery_ok": true}})).await;
            next_on(&mut pm, &format!("{PM}/update/accepted")).await;
            until(
                "the device's update reaches the cloud",
                Duration::from_secs(30),
                || cloud_has(&cloud, "/state/reported/battery_ok", json!(true)),
            )
            .await;
            assert!(
                cloud_has(&cloud, "/state/reported/heart_rate", json!(77.0)),
                "the reading's key went up with it: {:?}",
                cloud.shadow("pm-01")
            );
        }
        gw.stop(Duration::from_secs(10)).await;
    }
}
