//! The ward history end to end, on the real binary: devices' readings and the alerts an edge
//! rule raises on them are kept, survive a kill -9, and `wardgate history` exports them — CSV
//! that real pandas (from PyPI, in `target/py`) reads with typed columns, the README's recipe
//! included — with its filters and its errors.

use rumqttc::QoS;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wardgate::config::{ActionConfig, Config, RuleConfig};
use wardgate_tests::{
    config, config_toml, connect, device, options, plain_addr_from_status, sdk_python, Log,
    NotifySocket,
};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");

struct Daemon {
    child: Child,
    _log: Log,
    addr: std::net::SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, config_path: &Path) -> Daemon {
    // A socket of its own for each start (a killed daemon's is still on disk).
    let dir = tempfile::tempdir_in(dir).unwrap().keep();
    let mut notify = NotifySocket::bind(&dir);
    let mut cmd = wardgate_tests::daemon_command(BIN, config_path, &notify);
    cmd.stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let log = Log::capture(&mut child);
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("READY=1 within 30 s; log:\n{}", log.text()));
    Daemon {
        addr: plain_addr_from_status(&ready).expect("STATUS names the plain listener"),
        child,
        _log: log,
    }
}

fn ward(dir: &Path) -> Config {
    let mut c = config(
        dir,
        vec![
            device("pm-01", "pacemaker", "secret-1"),
            device("pm-02", "pacemaker", "secret-2"),
        ],
    );
    c.rules = vec![RuleConfig {
        name: "tachycardia".into(),
        sql: "SELECT heartbeat FROM 'ward/+/telemetry' WHERE heartbeat > 140".into(),
        actions: vec![ActionConfig::Journal {
            priority: "warning".into(),
        }],
        debounce: None,
        description: None,
    }];
    c
}

/// `wardgate history -c <config> ARGS`: (exit code, stdout, stderr).
fn history(config_path: &Path, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN)
        .arg("history")
        .arg("-c")
        .arg(config_path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

fn jsonl(config_path: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--format", "jsonl"];
    all.extend_from_slice(args);
    let (code, out, err) = history(config_path, &all);
    assert_eq!(code, 0, "history failed: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Wait until the export holds `n` rows for `args` (the history is written off the PUBACK
/// path, so it follows the PUBACKs by a moment).
async fn until_rows(config_path: &Path, args: &[&str], n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = jsonl(config_path, args);
        if rows.len() >= n || Instant::now() > deadline {
            assert_eq!(rows.len(), n, "rows for {args:?}");
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each device sends `hrs` in order (QoS 1), `ts` one second apart ending now; all acked.
async fn send(addr: std::net::SocketAddr, id: &str, password: &str, hrs: &[u32]) {
    let dev = connect(options(addr, id, password)).await;
    let now = wardgate_tests::now_ms();
    for (i, hr) in hrs.iter().enumerate() {
        let ts = now - (hrs.len() - 1 - i) as i64 * 1000;
        dev.client
            .publish(
                format!("ward/{id}/telemetry"),
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"heartbeat":{hr},"ts":{ts},"battery_pct":80}}"#),
            )
            .await
            .unwrap();
    }
    dev.wait_acks(hrs.len() as u64, Duration::from_secs(20))
        .await;
}

fn pandas(script: &str, csv: &Path) -> serde_json::Value {
    let o = Command::new(sdk_python())
        .arg("-c")
        .arg(script)
        .arg(csv)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pandas: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_alerts_are_kept_across_a_kill_9_and_pandas_reads_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(&ward(dir.path()))).unwrap();
    let first: Vec<u32> = vec![72, 75, 150, 80, 78];
    let second: Vec<u32> = vec![90, 155, 88];
    {
        let gw = start(dir.path(), &config_path);
        send(gw.addr, "pm-01", "secret-1", &first).await;
        send(gw.addr, "pm-02", "secret-2", &[60, 61]).await;
        // 7 messages × 2 readings, and one alert.
        until_rows(&config_path, &[], 15).await;
        // kill -9 (Drop), with the history's segment unsealed.
    }
    let gw = start(dir.path(), &config_path);
    send(gw.addr, "pm-01", "secret-1", &second).await;
    let rows = until_rows(&config_path, &["--device", "pm-01"], 18).await;
    drop(gw);

    // pm-01's heart rates, in the order sent, before and after the kill -9.
    let hr: Vec<f64> = rows
        .iter()
        .filter(|r| r["record"] == "reading" && r["metric"] == "heart-rate")
        .map(|r| r["value"].as_f64().unwrap())
        .collect();
    let want: Vec<f64> = first.iter().chain(&second).map(|&v| f64::from(v)).collect();
    assert_eq!(hr, want);
    let alerts: Vec<&serde_json::Value> = rows.iter().filter(|r| r["record"] == "alert").collect();
    assert_eq!(alerts.len(), 2, "one alert per heart rate over 140");
    for a in &alerts {
        assert_eq!(a["metric"], "tachycardia");
        assert_eq!(a["kind"], "pacemaker");
        assert!(a["detail"].as_str().unwrap().contains("heartbeat"));
    }
    let r = rows.iter().find(|r| r["metric"] == "heart-rate").unwrap();
    assert_eq!(r["unit"], "/min");
    assert_eq!(r["quality"], "good");
    assert_eq!(r["kind"], "pacemaker");
    // Filters: metric, kind, time.
    let battery = jsonl(&config_path, &["--metric", "battery-level"]);
    assert_eq!(battery.len(), 10);
    assert!(battery.iter().all(|r| r["unit"] == "%"));
    let pm02 = jsonl(&config_path, &["--device", "pm-02"]);
    assert_eq!(pm02.len(), 4);
    assert_eq!(jsonl(&config_path, &["--kind", "pacemaker"]).len(), 22);
    assert_eq!(jsonl(&config_path, &["--kind", "glucose-monitor"]).len(), 0);
    // Every `ts` was within seconds of the run.
    assert_eq!(
        jsonl(&config_path, &["--since", "1h", "--device", "pm-01"]).len(),
        18
    );
    let t = rows[0]["observed"].as_str().unwrap();
    let exact = jsonl(&config_path, &["--from", t, "--to", t, "--device", "pm-01"]);
    assert!(exact.iter().all(|r| r["observed"] == t) && !exact.is_empty());

    // CSV into pandas, with typed columns; then the README's bar-chart recipe.
    let (code, csv, err) = history(&config_path, &["--device", "pm-01"]);
    assert_eq!(code, 0, "{err}");
    let csv_path: PathBuf = dir.path().join("pm-01.csv");
    std::fs::write(&csv_path, &csv).unwrap();
    let out = pandas(
        r#"
import json, sys
import pandas as pd
df = pd.read_csv(sys.argv[1], parse_dates=["observed", "received"])
hr = df[(df.record == "reading") & (df.metric == "heart-rate")]
per_minute = hr.set_index("observed")["value"].resample("1min").mean().dropna()
print(json.dumps({
    "dtypes": {c: str(t) for c, t in df.dtypes.items()},
    "rows": len(df),
    "hr": hr["value"].tolist(),
    "alerts": int((df.record == "alert").sum()),
    "minutes": len(per_minute),
    "mean": float(hr["value"].mean()),
}))
"#,
        &csv_path,
    );
    assert_eq!(out["dtypes"]["observed"], "datetime64[ns, UTC]");
    assert_eq!(out["dtypes"]["received"], "datetime64[ns, UTC]");
    assert_eq!(out["dtypes"]["value"], "float64");
    assert_eq!(out["dtypes"]["device"], "object");
    assert_eq!(out["rows"], 18);
    assert_eq!(out["alerts"], 2);
    let got: Vec<f64> = serde_json::from_value(out["hr"].clone()).unwrap();
    assert_eq!(got, want);
    assert!(out["minutes"].as_u64().unwrap() >= 1);
    let mean = want.iter().sum::<f64>() / want.len() as f64;
    assert!((out["mean"].as_f64().unwrap() - mean).abs() < 1e-9);

    // `wardgate chart`: an SVG with the title, the unit and the alerts marked.
    for style in ["line", "bar"] {
        let svg_path = dir.path().join(format!("pm-01-{style}.svg"));
        let o = Command::new(BIN)
            .args(["chart", "-c"])
            .arg(&config_path)
            .args([
                "--device",
                "pm-01",
                "--metric",
                "heart-rate",
                "--since",
                "1h",
            ])
            .args(["--style", style, "--out"])
            .arg(&svg_path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "chart: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let text: String = doc
            .descendants()
            .filter(|n| n.is_text())
            .map(|n| n.text().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("pm-01") && text.contains("heart-rate"),
            "title: {text}"
        );
        assert!(text.contains("/min"), "unit on the axis: {text}");
        assert!(
            text.to_lowercase().contains("alert"),
            "alerts in the legend: {text}"
        );
    }
    let o = Command::new(BIN)
        .args(["chart", "-c"])
        .arg(&config_path)
        .args(["--device", "pm-99", "--metric", "heart-rate", "--out", "-"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no heart-rate readings of pm-99"), "{err}");
}

#[test]
fn bad_arguments_and_a_disabled_history_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("wardgate.toml");
    let mut c = ward(dir.path());
    std::fs::write(&config_path, config_toml(&c)).unwrap();
    let (code, _, err) = history(
        &config_path,
        &[
            "--from",
            "2026-12-05T09:00:00Z",
            "--to",
            "2026-12-05T08:00:00Z",
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--from is after --to"), "{err}");
    let (code, _, err) = history(&config_path, &["--from", "yesterday"]);
    assert_eq!(code, 2);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = history(&config_path, &["--device", "pm-01", "--kind", "pacemaker"]);
    assert_eq!(code, 2, "--device and --kind exclude each other: {err}");
    // Nothing kept yet: a header and a hint, exit 0.
    let (code, out, err) = history(&config_path, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().next(),
        Some(wardgate::history::export::COLUMNS.join(",").as_str())
    );
    assert!(err.contains("no history rows match"), "{err}");
    c.history.enabled = false;
    std::fs::write(&config_path, config_toml(&c)).unwrap();
    let (code, _, err) = history(&config_path, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("history.enabled"), "{err}");
}

/// A Device Defender violation is kept too: a device that sends more than a security profile
/// allows is `in-alarm` within a window or two, and the history has the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violation_events_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("wardgate.toml");
    let mut c = ward(dir.path());
    c.metering.window = Duration::from_secs(1);
    c.metering.windows_kept = 10;
    c.defender.profiles = vec![toml::from_str(
        r#"
name = "Chatty"
targets = ["*"]
[[behaviors]]
name = "chatty"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than", value = { count = 5 }, durationSeconds = 1 }
"#,
    )
    .unwrap()];
    std::fs::write(&config_path, config_toml(&c)).unwrap();
    let gw = start(dir.path(), &config_path);
    // Keep sending until the violation is in the history (each round: 20 readings, acked).
    let deadline = Instant::now() + Duration::from_secs(30);
    let violations = loop {
        send(gw.addr, "pm-02", "secret-2", &[70; 20]).await;
        let v: Vec<serde_json::Value> = jsonl(&config_path, &["--device", "pm-02"])
            .into_iter()
            .filter(|r| r["record"] == "violation")
            .collect();
        if !v.is_empty() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no violation in the history within 30 s"
        );
    };
    let v = &violations[0];
    assert_eq!(v["metric"], "aws:num-messages-sent");
    assert_eq!(v["quality"], "in-alarm");
    assert_eq!(v["kind"], "pacemaker");
    assert!(v["value"].as_f64().unwrap() >= 5.0, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("chatty"), "{v}");
    // pm-01 sent nothing: no violation of its own in the history.
    assert!(jsonl(&config_path, &["--device", "pm-01"]).is_empty());
}
