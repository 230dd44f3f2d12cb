//! Benchmark: local Detect. One evaluation (the work done at the end of every metering window)
//! of a security profile with 10 behaviors — cloud-side counts, device-side counts from agent
//! reports, a statistical threshold, a CIDR set and a port set — over 500 devices, each with a
//! full window history and one agent report per window, on one thread. Prints the median, p99
//! and max time per evaluation over 200 evaluations (target: under 5 ms).
//!
//! Run with `cargo xtask bench` (or `cargo bench -p wardgate --bench defender`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardgate::config::DefenderConfig;
use wardgate::defender::detect::{Detector, Inputs, Reports};
use wardgate::defender::report::{Format, Report};
use wardgate::metering::{Counters, DeviceSnapshot, Window};

const DEVICES: usize = 500;
const WINDOW: u64 = 300;
const KEPT: usize = 12;
const ROUNDS: usize = 200;

fn profile() -> wardgate::config::ProfileConfig {
    toml::from_str(
        r#"
name = "Ward"
[[behaviors]]
name = "sent"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than", value = { count = 1000 }, durationSeconds = 900 }
[[behaviors]]
name = "received"
metric = "aws:num-messages-received"
criteria = { comparisonOperator = "less-than", value = { count = 100 }, durationSeconds = 300 }
[[behaviors]]
name = "authz"
metric = "aws:num-authorization-failures"
criteria = { comparisonOperator = "less-than", value = { count = 1 }, durationSeconds = 300 }
[[behaviors]]
name = "connects"
metric = "aws:num-connection-attempts"
criteria = { comparisonOperator = "less-than-equals", value = { count = 3 }, durationSeconds = 300, consecutiveDatapointsToAlarm = 2 }
[[behaviors]]
name = "size"
metric = "aws:message-byte-size"
criteria = { comparisonOperator = "less-than-equals", value = { count = 4096 } }
[[behaviors]]
name = "sources"
metric = "aws:source-ip-address"
criteria = { comparisonOperator = "in-cidr-set", value = { cidrs = ["10.7.0.0/16", "127.0.0.0/8"] } }
[[behaviors]]
name = "bytesOut"
metric = "aws:all-bytes-out"
criteria = { comparisonOperator = "less-than", value = { count = 10000 }, durationSeconds = 300 }
[[behaviors]]
name = "packetsIn"
metric = "aws:all-packets-in"
criteria = { comparisonOperator = "less-than", value = { count = 5000 }, durationSeconds = 600 }
[[behaviors]]
name = "ports"
metric = "aws:listening-tcp-ports"
criteria = { comparisonOperator = "in-port-set", value = { ports = [22, 8883] } }
[[behaviors]]
name = "outliers"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than-equals", statisticalThreshold = { statistic = "p90" }, durationSeconds = 300 }
"#,
    )
    .expect("the bench profile parses")
}

fn main() {
    let cfg = DefenderConfig {
        profiles: vec![profile()],
        ..Default::default()
    };
    let mut detector = Detector::new(&cfg, Duration::from_secs(WINDOW), KEPT);
    assert_eq!(detector.profiles.len(), 1, "the profile compiles");
    let devices: Vec<(Arc<str>, String)> = (0..DEVICES)
        .map(|i| (Arc::from(format!("pm-{i:03}")), "pacemaker".to_owned()))
        .collect();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let end = now_s - now_s % WINDOW;
    let mut reports = Reports::new(Duration::from_secs(WINDOW), KEPT);
    let mut meters = HashMap::new();
    for (n, (id, _)) in devices.iter().enumerate() {
        let history = (0..KEPT as u64)
            .map(|k| Window {
                start_s: end - (KEPT as u64 - k) * WINDOW,
                length_s: WINDOW,
                counters: Counters {
                    messages_sent: 20 + (n as u64 % 7),
                    messages_received: (n as u64) % 3,
                    bytes_in: 3000,
                    bytes_out: 200,
                    largest_message_bytes: 120,
                    connection_attempts: 1,
                    ..Default::default()
                },
                source_addresses: BTreeSet::from([std::net::IpAddr::from([
                    10,
                    7,
                    1,
                    (n % 250) as u8,
                ])]),
            })
            .collect::<Vec<_>>();
        meters.insert(
            id.clone(),
            DeviceSnapshot {
                device_id: id.to_string(),
                connected: true,
                peer: None,
                listener: None,
                totals: Counters::default(),
                current: Window {
                    start_s: end,
                    length_s: WINDOW,
                    counters: Counters::default(),
                    source_addresses: BTreeSet::new(),
                },
                history,
            },
        );
        for k in 0..KEPT as u64 {
            let text = format!(
                r#"{{"header":{{"report_id":{},"version":"1.0"}},"metrics":{{"network_stats":{{"bytes_in":4000,"bytes_out":3000,"packets_in":40,"packets_out":30}},"listening_tcp_ports":{{"ports":[{{"port":8883}}],"total":1}},"tcp_connections":{{"established_connections":{{"connections":[{{"remote_addr":"10.7.0.1:8883"}}],"total":1}}}}}}}}"#,
                k + 1
            );
            let (r, _) = Report::parse(text.as_bytes(), Format::Json).unwrap();
            reports.add(id, &r, end - (KEPT as u64 - k) * WINDOW + 1);
        }
    }
    let mut times = Vec::with_capacity(ROUNDS);
    let mut events = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        events += detector
            .evaluate(&Inputs {
                devices: &devices,
                meters: &meters,
                reports: &reports,
                end_s: end,
                now_ms: end as i64 * 1000,
            })
            .len();
        times.push(t.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "detect: {DEVICES} devices x {} behaviors, one evaluation: median {:.2} ms, p99 {:.2} ms, max {:.2} ms ({ROUNDS} evaluations, {events} events; target < 5 ms)",
        detector.profiles[0].behaviors.len(),
        ms(times[ROUNDS / 2]),
        ms(times[ROUNDS * 99 / 100]),
        ms(times[ROUNDS - 1]),
    );
}
