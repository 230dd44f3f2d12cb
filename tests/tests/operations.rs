//! The operators' HTTP endpoint (`[http]`) of a real gateway forwarding to a real mosquitto:
//! `/metrics` parses with a Prometheus text parser (the `prometheus-parse` crate) and follows
//! the naming conventions, and its counters are the ones `wardgate status` shows after real
//! traffic (readings, a dead letter, a denied publish, a rule firing, deliveries upstream);
//! `/healthz` answers 200 while every stage makes progress; other paths and methods are
//! refused. The 503 side of `/healthz` (a stuck queue writer, a stalled pipeline) is in
//! `supervision.rs`, next to the watchdog it mirrors.

use prometheus_parse::{Sample, Scrape, Value};
use rumqttc::QoS;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use wardgate::app::Gateway;
use wardgate::config::{ActionConfig, RuleConfig};
use wardgate_tests::upstream::Upstream;
use wardgate_tests::{connect, device, http_get, http_request, options, send_heart_rate, until};

/// `/metrics` parsed, and its raw text.
fn scrape(addr: std::net::SocketAddr) -> (Scrape, String) {
    let (code, text) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    (scrape, text)
}

/// The value of the one sample of `metric` whose labels include `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{metric}{labels:?}: {found:?}");
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{metric}: not a plain value: {other:?}"),
    }
}

/// Checks a parser does not make: one `# TYPE` per family, before its samples; `_total` only
/// on counters and every counter ends in `_total`; names in Prometheus' alphabet.
fn check_conventions(text: &str) {
    let mut types: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "two # TYPE lines for {name}"
            );
            assert!(
                name.starts_with("wardgate_")
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            match kind {
                "counter" => assert!(name.ends_with("_total"), "counter {name} without _total"),
                "gauge" | "histogram" => {
                    assert!(!name.ends_with("_total"), "{kind} {name} ends in _total")
                }
                other => panic!("{name}: unexpected type {other}"),
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line
                .split(['{', ' '])
                .next()
                .expect("a sample line starts with its name");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(
                types.contains_key(family),
                "sample {name} before (or without) its # TYPE line"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_agree_with_wardgate_status() {
    let up = Upstream::new();
    let _mq = up.broker();
    let mut cloud = up.subscriber().await;
    let mut cfg = up.gateway_config();
    cfg.devices.push(device("pm-02", "pacemaker", "pw2"));
    cfg.rules = vec![RuleConfig {
        name: "fast_heart".into(),
        sql: "SELECT * FROM 'ward/+/telemetry' WHERE heartbeat > 140".into(),
        actions: vec![ActionConfig::Journal {
            priority: "warning".into(),
        }],
        debounce: None,
        description: None,
    }];
    let gw = Gateway::start(&cfg).await.unwrap();
    let http = gw.http_addr().expect("[http] is on by default");
    let plain = gw.listener_addr("plain").unwrap();

    let pm = connect(options(plain, "pm-01", "pw")).await;
    // 130, 132, ..., 148: four of them above 140.
    for i in 0..10 {
        send_heart_rate(&pm.client, "pm-01", 130 + 2 * i).await;
    }
    pm.client
        .publish("ward/pm-01/telemetry", QoS::AtLeastOnce, false, "not json")
        .await
        .unwrap();
    pm.wait_acks(11, Duration::from_secs(30)).await;
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(30), cloud.recv())
            .await
            .expect("delivered upstream")
            .unwrap();
    }
    // pm-02 publishes on pm-01's topic: denied, its connection closed.
    let pm2 = connect(options(plain, "pm-02", "pw2")).await;
    pm2.client
        .publish("ward/pm-01/telemetry", QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    let denied = |gw: &Gateway| {
        gw.status_snapshot()
            .devices
            .iter()
            .any(|d| d.device_id == "pm-02" && d.totals.authorization_failures == 1 && !d.connected)
    };
    until(
        "pm-02's denied publish counted",
        Duration::from_secs(30),
        || denied(&gw),
    )
    .await;
    drop(pm2);
    until(
        "every record acknowledged upstream",
        Duration::from_secs(30),
        || gw.queue_status().is_some_and(|q| q.depth == 0),
    )
    .await;

    let (s, text) = scrape(http);
    check_conventions(&text);
    let st = gw.status_snapshot();

    // Devices: the gatekeeper's meters and the pipeline's results.
    for d in &st.devices {
        let l = [("device", d.device_id.as_str())];
        for (metric, want) in [
            (
                "wardgate_device_messages_sent_total",
                d.totals.messages_sent,
            ),
            ("wardgate_device_received_bytes_total", d.totals.bytes_in),
            (
                "wardgate_device_authorization_failures_total",
                d.totals.authorization_failures,
            ),
            (
                "wardgate_device_connection_attempts_total",
                d.totals.connection_attempts,
            ),
            ("wardgate_device_connected", u64::from(d.connected)),
        ] {
            assert_eq!(
                value(&s, metric, &l),
                want as f64,
                "{metric} of {}",
                d.device_id
            );
        }
    }
    let pm01 = [("device", "pm-01")];
    assert_eq!(
        value(&s, "wardgate_device_messages_sent_total", &pm01),
        11.0
    );
    assert_eq!(value(&s, "wardgate_device_readings_total", &pm01), 10.0);
    assert_eq!(value(&s, "wardgate_device_dead_letters_total", &pm01), 1.0);
    assert_eq!(value(&s, "wardgate_device_connected", &pm01), 1.0);
    assert_eq!(
        value(
            &s,
            "wardgate_device_authorization_failures_total",
            &[("device", "pm-02")]
        ),
        1.0
    );
    assert!(
        !text.contains("device=\"pm-03\""),
        "only registered devices have series"
    );
    assert_eq!(
        value(&s, "wardgate_pipeline_messages_total", &[]),
        st.readings as f64
    );

    // The queue and the uplink.
    let q = st.queue.as_ref().expect("the queue runs with an upstream");
    assert_eq!(value(&s, "wardgate_queue_records", &[]), 0.0);
    assert_eq!(
        value(&s, "wardgate_queue_appended_total", &[]),
        q.appended as f64
    );
    assert!(q.appended >= 10);
    let u = st.uplink.as_ref().expect("uplink");
    assert_eq!(value(&s, "wardgate_uplink_connected", &[]), 1.0);
    assert_eq!(
        value(&s, "wardgate_uplink_connects_total", &[]),
        u.connects as f64
    );
    assert!(u.connects >= 1);
    assert_eq!(
        value(&s, "wardgate_uplink_publishes_total", &[]),
        u.publishes as f64
    );
    assert!(u.publishes >= 1 && u.publish_bytes > 0);
    assert_eq!(
        value(&s, "wardgate_uplink_publish_bytes_total", &[]),
        u.publish_bytes as f64
    );
    assert_eq!(
        value(
            &s,
            "wardgate_uplink_records_delivered_total",
            &[("stream", "telemetry")]
        ),
        u.delivered_by_stream["telemetry"] as f64
    );
    assert_eq!(u.delivered_by_stream["telemetry"], 10);

    // The plugin: every call counted once, failures by kind, a histogram of call times.
    let plugin = [("plugin", "pacemaker")];
    let p = st.plugins.iter().find(|p| p.name == "pacemaker").unwrap();
    assert_eq!(value(&s, "wardgate_plugin_calls_total", &plugin), 11.0);
    assert_eq!(p.calls.calls, 11);
    assert_eq!(
        value(
            &s,
            "wardgate_plugin_failures_total",
            &[("plugin", "pacemaker"), ("kind", "malformed")]
        ),
        1.0
    );
    let hist = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "wardgate_plugin_call_duration_seconds"
                && x.labels.get("plugin") == Some("pacemaker")
        })
        .expect("the call-time histogram");
    let Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {hist:?}")
    };
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .expect("+Inf bucket");
    assert_eq!(inf.count, 11.0, "every call that ran");
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "cumulative: {buckets:?}"
    );
    assert!(text.contains("wardgate_plugin_call_duration_seconds_count{plugin=\"pacemaker\"} 11\n"));

    // The rule fired for the four fast beats; build info; the stages are up.
    assert_eq!(
        value(&s, "wardgate_rule_fires_total", &[("rule", "fast_heart")]),
        4.0
    );
    let r = st.rules.iter().find(|r| r.name == "fast_heart").unwrap();
    assert_eq!(r.fired, 4);
    assert_eq!(
        value(
            &s,
            "wardgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let stages: BTreeMap<String, f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == "wardgate_stage_up")
        .map(|x| {
            (
                x.labels.get("stage").unwrap().to_owned(),
                value(
                    &s,
                    "wardgate_stage_up",
                    &[("stage", x.labels.get("stage").unwrap())],
                ),
            )
        })
        .collect();
    assert!(
        stages.contains_key("queue-writer") && stages.contains_key("uplink"),
        "{stages:?}"
    );
    assert!(stages.values().all(|v| *v == 1.0), "{stages:?}");

    // Every series the shipped Grafana dashboard queries exists.
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(
        "../../packaging/grafana/wardgate-dashboard.json"
    ))
    .expect("the dashboard is JSON");
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("wardgate_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))
                    || l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name} "))),
            "the dashboard queries {name}, which /metrics does not have"
        );
    }

    // Health, and what is not served.
    let (code, body) = http_get(http, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ok\n") && body.contains("stage queue-writer running"),
        "{body}"
    );
    let (code, body) = http_get(http, "/status?device=pm-01");
    assert_eq!(code, 404, "{body}");
    let (code, _) = http_request(http, "POST", "/metrics").unwrap();
    assert_eq!(code, 405);
    let (code, body) = http_request(http, "HEAD", "/healthz").unwrap();
    assert_eq!((code, body.as_str()), (200, ""));

    // `wardgate status` names the endpoint.
    assert_eq!(st.http.as_deref(), Some(http.to_string().as_str()));
    gw.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_can_be_turned_off_and_a_taken_port_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = wardgate_tests::config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    cfg.http.enabled = false;
    let gw = Gateway::start(&cfg).await.unwrap();
    assert_eq!(gw.http_addr(), None);
    assert_eq!(gw.status_snapshot().http, None);
    gw.stop(Duration::from_secs(10)).await;

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = wardgate_tests::config(dir.path(), vec![device("pm-01", "pacemaker", "pw")]);
    cfg.http.address = taken.local_addr().unwrap();
    let e = match Gateway::start(&cfg).await {
        Ok(_) => panic!("started on a port that is taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("http.address") && e.contains("http.enabled = false"),
        "{e}"
    );
}
