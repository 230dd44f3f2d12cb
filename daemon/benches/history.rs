//! Benchmark: the ward history's store (`wardgate::history::store`), on a real directory.
//!
//! 1. Write cost: a day of a 50-device ward at one reading per device per second (4.32 M
//!    heart-rate readings, observed one second apart per device, interleaved as they arrive),
//!    appended in batches of 500 as the history stage does → ns and bytes per reading, and the
//!    rate. Every batch goes to the kernel; syncs happen at most once a second of wall time, as
//!    in the daemon (so this is the cost of the code and the page cache, not of the disk).
//! 2. Lookups on that day, each streamed to the end as `wardgate history` does: one device's
//!    last hour, one device's whole day, one metric of one device for the day with its alerts
//!    (what a day chart reads), and the whole ward for an hour → rows and time each, median of
//!    `HISTORY_REPEAT` (default 3) runs.
//!
//! 3. The whole day exported by the real binary (`wardgate history`, CSV) → time and the
//!    export's peak RSS (it streams: constant memory whatever the range).
//!
//! Run with `cargo bench -p wardgate --bench history` (part of `cargo xtask bench`). Prints one
//! line per figure and writes `target/bench/history.json`.

mod real;

use std::time::{Duration, Instant};
use wardgate::history::store::{query, Bounds, Store};
use wardgate::history::{Filter, Row, RowKind};

const DEVICES: usize = 50;
const SECONDS: i64 = 24 * 3600;
const BATCH: usize = 500;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let bounds = Bounds {
        max_bytes: 4 << 30,
        max_age: Duration::from_secs(30 * 24 * 3600),
    };
    let history_dir = dir.path().join("history");
    let mut store = Store::open(&history_dir, bounds).unwrap();
    let now = wardgate::clock::now_ms();
    let start = now - SECONDS * 1000;
    let names: Vec<String> = (0..DEVICES).map(|d| format!("pm-{d:03}")).collect();
    let mut batch = Vec::with_capacity(BATCH);
    let mut rows = 0u64;
    let t = Instant::now();
    for s in 0..SECONDS {
        let at = start + s * 1000;
        for (d, name) in names.iter().enumerate() {
            let hr = 60.0 + ((s as usize + d * 7) % 40) as f64;
            batch.push(Row {
                record: RowKind::Reading,
                device: name.clone(),
                kind: "pacemaker".into(),
                metric: "heart-rate".into(),
                value: Some(hr),
                unit: "/min".into(),
                quality: "good".into(),
                observed_ms: at,
                received_ms: at + 3,
                detail: String::new(),
            });
            // An alert now and then, as a tachycardia rule raises them.
            if (s as usize + d).is_multiple_of(3600) {
                batch.push(Row {
                    record: RowKind::Alert,
                    device: name.clone(),
                    kind: "pacemaker".into(),
                    metric: "tachycardia".into(),
                    value: None,
                    unit: String::new(),
                    quality: String::new(),
                    observed_ms: at,
                    received_ms: at + 3,
                    detail: format!("{{\"heartbeat\":{}}}", 150 + d),
                });
            }
            if batch.len() >= BATCH {
                rows += batch.len() as u64;
                // The store's clock is the rows' (a day replayed): segments seal hourly.
                store.append(&batch, at).unwrap();
                batch.clear();
            }
        }
    }
    rows += batch.len() as u64;
    store.append(&batch, now).unwrap();
    store.sync().unwrap();
    let write = t.elapsed();
    let bytes = store.bytes();
    let segments = std::fs::read_dir(&history_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "wgh"))
        })
        .count();
    let ns_per_row = write.as_nanos() as f64 / rows as f64;
    println!(
        "history write: {rows} rows in {:.2} s = {:.0} rows/s, {ns_per_row:.0} ns/row, {:.1} bytes/row, {} MiB in {segments} segments",
        write.as_secs_f64(),
        rows as f64 / write.as_secs_f64(),
        bytes as f64 / rows as f64,
        bytes >> 20
    );

    let repeat: usize = std::env::var("HISTORY_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let hour = 3600 * 1000;
    let device = |d: &str, from: i64, to: i64| Filter {
        device: Some(d.into()),
        ..Filter::between(from, to)
    };
    let cases: Vec<(&str, Filter)> = vec![
        ("one device, last hour", device("pm-017", now - hour, now)),
        ("one device, 24 h", device("pm-017", start, now)),
        (
            "one device's heart-rate with alerts, 24 h (a day chart)",
            Filter {
                metric: Some("heart-rate".into()),
                with_events: true,
                ..device("pm-017", start, now)
            },
        ),
        ("whole ward, last hour", Filter::between(now - hour, now)),
    ];
    let mut lookups = Vec::new();
    for (name, f) in cases {
        let mut times = Vec::new();
        let (mut n, mut read) = (0, 0);
        for _ in 0..repeat {
            let t = Instant::now();
            let mut q = query(&history_dir, f.clone()).unwrap();
            n = q.by_ref().map(Result::unwrap).count();
            read = q.segments_read;
            times.push(t.elapsed());
        }
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "history lookup: {name}: {n} rows in {:.1} ms (median of {repeat}), {read} of {segments} segments read",
            median.as_secs_f64() * 1000.0
        );
        lookups.push(serde_json::json!({
            "lookup": name, "rows": n, "median_ms": median.as_secs_f64() * 1000.0,
            "segments_read": read,
        }));
    }
    // The whole day exported as CSV by the real binary: time and peak RSS (constant memory:
    // rows stream from the segments to stdout).
    let config = dir.path().join("wardgate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nstate_dir = {:?}\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import resource, subprocess, sys\n\
             n = 0\n\
             p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)\n\
             for chunk in iter(lambda: p.stdout.read(1 << 20), b''): n += chunk.count(b'\\n')\n\
             p.wait()\n\
             print(n, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
            env!("CARGO_BIN_EXE_wardgate"),
            "history",
            "-c",
        ])
        .arg(&config)
        // Set by `cargo xtask bench`; `wardgate` would read it as a configuration key.
        .env_remove("WARDGATE_COMPONENTS")
        .output()
        .unwrap();
    let export_s = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    let (lines, maxrss_kib) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
    assert!(
        out.status.success() && lines == rows + 1,
        "export: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "history export: the whole day as CSV ({lines} lines) in {export_s:.1} s, peak RSS of `wardgate history` {:.1} MiB",
        maxrss_kib as f64 / 1024.0
    );
    real::write_report(
        "history",
        &serde_json::json!({
            "devices": DEVICES, "seconds": SECONDS, "rows": rows,
            "write_s": write.as_secs_f64(), "ns_per_row": ns_per_row,
            "bytes": bytes, "bytes_per_row": bytes as f64 / rows as f64, "segments": segments,
            "lookups": lookups,
            "export_s": export_s, "export_peak_rss_kib": maxrss_kib,
        }),
    );
}
