//! Benchmark: edge rules.
//!
//! 1. Evaluation rate: 50 rules (10 on shadow replies with thresholds on nested attributes, 20
//!    on device telemetry, 20 on other topics) applied to a shadow `/update/accepted` message
//!    and to a telemetry message, in one thread: messages/s and rule evaluations/s.
//! 2. What they add to a reading's PUBACK: 50 password devices each publishing one pacemaker
//!    reading (QoS 1) every 50 ms — 1 000 readings/s — through a running gateway for 10 s,
//!    with no rules and with the same 50 rules (which see every reading and its canonical
//!    form; none fires); PUBACK latency p50 / p99 / max of each round, three alternating
//!    pairs of rounds, and the median of what the rules added to the p99.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p wardgate --bench rules`).

use std::time::{Duration, Instant};
use wardgate::app::Gateway;
use wardgate::config::{Config, RuleConfig};
use wardgate::rules::{Message, Rules, Sinks};

const DEVICES: usize = 50;
const EVERY: Duration = Duration::from_millis(50);
const RUN: Duration = Duration::from_secs(10);

fn rules() -> Vec<RuleConfig> {
    let mut r = Vec::new();
    let rule = |name: String, sql: String| RuleConfig {
        name,
        sql,
        actions: vec![wardgate::config::ActionConfig::Journal {
            priority: "warning".into(),
        }],
        debounce: None,
        description: None,
    };
    for i in 0..10 {
        r.push(rule(
            format!("shadow_{i}"),
            format!(
                "SELECT state.reported.heartbeat AS hr, topic(3) AS device FROM '$aws/things/+/shadow/update/accepted' \
                 WHERE state.reported.heartbeat > {} AND state.reported.battery_level < 5",
                300 + i
            ),
        ));
    }
    for i in 0..20 {
        r.push(rule(
            format!("telemetry_{i}"),
            format!(
                "SELECT heartbeat, clientid() AS device FROM 'ward/+/telemetry' WHERE heartbeat > {} OR heartbeat < {}",
                400 + i,
                -1 - i
            ),
        ));
    }
    for i in 0..20 {
        r.push(rule(
            format!("other_{i}"),
            format!("SELECT * FROM 'ward/+/glucose/{i}' WHERE mg_dl < 40"),
        ));
    }
    r
}

fn main() {
    evaluation_rate();
    let components = std::env::var("WARDGATE_COMPONENTS").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target/components").into()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Alternating rounds, so a noisy minute on a shared machine does not land on one side.
        let mut added = Vec::new();
        for pair in 1..=3 {
            let without = puback_round(&components, Vec::new()).await;
            let with = puback_round(&components, rules()).await;
            let d = ms(pct(&with, 0.99)) - ms(pct(&without, 0.99));
            added.push(d);
            println!(
                "rules: PUBACK latency at 1000 readings/s from {DEVICES} devices, pair {pair}: no rules p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; 50 rules p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; added p99 {d:+.2} ms",
                ms(pct(&without, 0.5)), ms(pct(&without, 0.99)), ms(*without.last().unwrap()),
                ms(pct(&with, 0.5)), ms(pct(&with, 0.99)), ms(*with.last().unwrap()),
            );
        }
        added.sort_by(f64::total_cmp);
        println!(
            "rules: added PUBACK p99 with 50 rules, median of 3 pairs: {:+.2} ms",
            added[1]
        );
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn evaluation_rate() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let rules = Rules::new(&rules(), Sinks::default());
    let shadow = serde_json::json!({
        "state": {"reported": {"heartbeat": 141, "battery_level": 80}},
        "metadata": {"reported": {"heartbeat": {"timestamp": 1}, "battery_level": {"timestamp": 1}}},
        "version": 7, "timestamp": 1
    })
    .to_string();
    let telemetry = r#"{"heartbeat":141,"ts":1}"#;
    let n = 200_000u64;
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            let (topic, payload) = if i % 2 == 0 {
                (
                    "$aws/things/pm-01/shadow/update/accepted",
                    shadow.as_bytes(),
                )
            } else {
                ("ward/pm-01/telemetry", telemetry.as_bytes())
            };
            let m = Message {
                topic,
                payload,
                device_id: "pm-01",
                received_at_ms: 0,
            };
            rules.apply(m, &mut None).await;
        }
    });
    let took = started.elapsed().as_secs_f64();
    let counts = rules.counters().counts();
    let matched: u64 = counts.iter().map(|c| c.matched).sum();
    let fired: u64 = counts.iter().map(|c| c.fired).sum();
    println!(
        "rules: 50 rules, one thread: {:.0} messages/s, {:.0} WHERE evaluations/s ({} matched, {} fired), {:.2} µs per message",
        n as f64 / took,
        matched as f64 / took,
        matched,
        fired,
        took * 1e6 / n as f64
    );
}

/// One paced round on a fresh gateway; every PUBACK latency, sorted.
async fn puback_round(components: &str, rules: Vec<RuleConfig>) -> Vec<Duration> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let state = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.gateway.state_dir = state.path().to_path_buf();
    cfg.listeners.plain.address = "127.0.0.1:0".parse().unwrap();
    cfg.broker.address = "127.0.0.1:0".parse().unwrap();
    cfg.http.address = "127.0.0.1:0".parse().unwrap();
    cfg.plugins.dir = components.into();
    cfg.devices = (0..DEVICES)
        .map(|i| {
            wardgate::config::DeviceConfig::with_password(
                &format!("pm-{i:03}"),
                "pacemaker",
                wardgate::registry::hash_password_demo("pw"),
            )
        })
        .collect();
    cfg.rules = rules;
    // Every device logs in from 127.0.0.1 at once: the per-address bounds are the whole ward's.
    cfg.login.max_pending_per_address = cfg.login.max_pending;
    cfg.login.max_per_second_per_address = cfg.login.max_per_second;
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let id = cfg.devices[i].id.clone();
        tasks.push(tokio::spawn(async move {
            let mut o = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
            o.set_credentials(&id, "pw");
            o.set_keep_alive(Duration::from_secs(60));
            let (client, mut el) = AsyncClient::new(o, 16);
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.expect("connects") {
                    break;
                }
            }
            let mut tick = tokio::time::interval(EVERY);
            let mut lat = Vec::new();
            let end = Instant::now() + RUN;
            let topic = format!("ward/{id}/telemetry");
            while Instant::now() < end {
                tick.tick().await;
                let payload = format!(
                    r#"{{"heartbeat":{},"ts":{}}}"#,
                    60 + lat.len() % 40,
                    wardgate::clock::now_ms()
                );
                let sent = Instant::now();
                client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
                loop {
                    if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.expect("runs") {
                        break;
                    }
                }
                lat.push(sent.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let _ = gw.stop(Duration::from_secs(10)).await;
    all.sort();
    all
}
