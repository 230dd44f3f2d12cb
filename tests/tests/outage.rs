//! Cost and bounds during trouble, on the real gateway (in process, or the binary) with the real
//! pacemaker plugin: a device sending garbage does not hold up another device's readings
//! (dead letters are written by their own writer, and the garbage device's PUBACK still waits
//! until its dead letter is on disk), and the dead-letter store stays within
//! `[dead_letter]` `max_bytes` / `max_age`, removing whole old day files, counted in
//! `wardgate status` and logged.
//!
//! A disk that does not answer is played by a named pipe (`mkfifo`) where today's day file
//! would be: opening it for writing waits until someone opens it for reading, and a pipe cannot
//! be synced to disk, so what is written into it is reported as a failed write.

use rumqttc::QoS;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};
use wardgate::app::Gateway;
use wardgate::pipeline::{DeadLetter, DeadLetters};
use wardgate_tests::{config, config_toml, connect, device, options, NotifySocket};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
/// Generous: these tests are about who waits for what, not how fast.
const WAIT: Duration = Duration::from_secs(30);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// The day file name (`YYYY-MM-DD`) of `days` days ago, by the clock now (negative: ahead).
fn day_ago(days: i64) -> String {
    let now = SystemTime::now();
    let at = if days >= 0 {
        now - DAY * days as u32
    } else {
        now + DAY * (-days) as u32
    };
    humantime::format_rfc3339_seconds(at).to_string()[..10].to_owned()
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success(), "mkfifo {}", path.display());
}

/// Opens every named pipe in its list for reading and writing when dropped, so a writer
/// still waiting to open one (the code under test, if it blocks) is released and the test
/// can end even when it fails.
struct Release(Vec<PathBuf>);

impl Drop for Release {
    fn drop(&mut self) {
        for p in &self.0 {
            // O_RDWR on a FIFO never waits, and gives a waiting writer its reader.
            if let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open(p) {
                std::mem::forget(f);
            }
        }
    }
}

async fn garbage(d: &wardgate_tests::Device, id: &str, i: u32) {
    d.client
        .publish(
            format!("ward/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            format!("garbage {i:02}, not JSON"),
        )
        .await
        .unwrap();
}

async fn reading(d: &wardgate_tests::Device, id: &str, hr: u32) {
    d.client
        .publish(
            format!("ward/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            wardgate_tests::pacemaker_reading(hr),
        )
        .await
        .unwrap();
}

/// `status.json`'s `dead_letter` section, once `pred` holds for it.
async fn dead_letter_status_until(
    state: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = std::fs::read(state.join("status.json"))
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
            .map(|s| s["dead_letter"].clone());
        if let Some(dl) = st.as_ref().filter(|dl| pred(dl)) {
            return dl.clone();
        }
        assert!(Instant::now() < deadline, "{what}: status shows {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sending_garbage_does_not_hold_up_another_devices_pubacks() {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(
        state.path(),
        vec![
            device("pm-good", "pacemaker", "pw"),
            device("pm-junk", "pacemaker", "pw"),
        ],
    );
    cfg.metering.status_interval = Duration::from_millis(100);
    let store = DeadLetters::new(state.path());
    std::fs::create_dir_all(store.dir()).unwrap();
    // Today's file (and tomorrow's, should the test run across midnight) does not answer.
    let days = [day_ago(0), day_ago(-1)];
    let pipes: Vec<PathBuf> = days.iter().map(|d| store.day_file(d)).collect();
    for p in &pipes {
        mkfifo(p);
    }
    let _release = Release(pipes.clone());
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let good = connect(options(addr, "pm-good", "pw")).await;
    let junk = connect(options(addr, "pm-junk", "pw")).await;

    // 20 garbage messages, all handed to the dead-letter store; none can reach the disk.
    for i in 0..20 {
        garbage(&junk, "pm-junk", i).await;
    }
    let deadline = Instant::now() + WAIT;
    while gw.stats().device("pm-junk").dead_letters < 20 {
        assert!(
            Instant::now() < deadline,
            "the pipeline handled {} of 20 garbage messages: it waits for the dead-letter disk",
            gw.stats().device("pm-junk").dead_letters
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Meanwhile the other device's readings go through and are acknowledged...
    for i in 0..50 {
        reading(&good, "pm-good", 60 + i).await;
    }
    good.wait_acks(50, WAIT).await;
    assert_eq!(gw.stats().device("pm-good").readings, 50);
    // ...while the garbage device's are not: its dead letters are not on disk yet.
    assert_eq!(
        junk.acks.load(Ordering::SeqCst),
        0,
        "a dead letter was acknowledged before it was on disk"
    );

    // The disk answers again: the pipes are moved aside and given a reader. What the writer
    // had already opened goes into a pipe, which cannot be synced: a failed write, counted,
    // and not acknowledged. Later groups go to a real file.
    let mut held = Vec::new();
    for p in &pipes {
        let aside = p.with_extension("pipe");
        std::fs::rename(p, &aside).unwrap();
        held.push(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&aside)
                .unwrap(),
        );
    }
    dead_letter_status_until(state.path(), "the failed write is counted", |dl| {
        dl["failed"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(
        junk.acks.load(Ordering::SeqCst),
        0,
        "a dead letter that never reached the disk was acknowledged"
    );

    // The device sends them again (as it does after a missing PUBACK); all are acknowledged
    // now, and each is in the store with its reason.
    drop(junk);
    let junk = connect(options(addr, "pm-junk", "pw")).await;
    for i in 0..20 {
        garbage(&junk, "pm-junk", i).await;
    }
    junk.wait_acks(20, WAIT).await;
    let dead = store.read_all();
    let junk_dead: Vec<&DeadLetter> = dead.iter().filter(|d| d.device_id == "pm-junk").collect();
    assert!(junk_dead.iter().all(|d| d.reason_kind == "malformed"
        && d.topic == "ward/pm-junk/telemetry"
        && !d.reason.is_empty()));
    let distinct: BTreeSet<&str> = junk_dead
        .iter()
        .map(|d| d.payload_base64.as_str())
        .collect();
    assert_eq!(distinct.len(), 20, "every garbage message is in the store");
    assert!(dead.iter().all(|d| d.device_id == "pm-junk"));
    // The good device still flows.
    reading(&good, "pm-good", 99).await;
    good.wait_acks(51, WAIT).await;
    let report = gw.stop(Duration::from_secs(10)).await;
    assert!(report.drained, "{report:?}");
    drop(held);
}

/// The binary with `[dead_letter]` bounds and older day files already in its state directory.
struct Daemon {
    child: std::process::Child,
    log: wardgate_tests::Log,
    config_path: PathBuf,
    addr: std::net::SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn status(&self) -> String {
        let o = Command::new(BIN)
            .arg("status")
            .arg("-c")
            .arg(&self.config_path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_store_is_bounded_by_bytes_and_age_and_counts_what_it_removed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = DeadLetters::new(&state);
    std::fs::create_dir_all(store.dir()).unwrap();
    // Day files from earlier runs: 40 days old (over max_age), 10 and 5 days old.
    let line = |n: u32| {
        let mut e = serde_json::json!({
            "stored_at_ms": 0, "received_at_ms": 0, "device_id": "pm-junk", "kind": "pacemaker",
            "plugin": "pacemaker", "topic": "ward/pm-junk/telemetry", "reason_kind": "malformed",
            "reason": "earlier", "payload_base64": "eA==",
        });
        e["received_at_ms"] = n.into();
        format!("{e}\n")
    };
    let old: Vec<(i64, u32)> = vec![(40, 3), (10, 4), (5, 5)];
    let mut sizes = Vec::new();
    for (days, lines) in &old {
        let text: String = (0..*lines).map(line).collect();
        sizes.push(text.len() as u64);
        std::fs::write(store.day_file(&day_ago(*days)), text).unwrap();
    }
    let mut cfg = config(&state, vec![device("pm-junk", "pacemaker", "pw")]);
    cfg.metering.status_interval = Duration::from_millis(100);
    // Room for the 5-day-old file alone.
    cfg.dead_letter.max_bytes = sizes[2];
    cfg.dead_letter.max_age = Duration::from_secs(30 * 24 * 3600);
    let config_path = dir.path().join("wardgate.toml");
    std::fs::write(&config_path, config_toml(&cfg)).unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let mut cmd = wardgate_tests::daemon_command(BIN, &config_path, &notify);
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let log = wardgate_tests::Log::capture(&mut child);
    let ready = notify.wait_for("READY=1", WAIT).expect("READY=1");
    let addr = wardgate_tests::plain_addr_from_status(&ready).unwrap();
    let mut d = Daemon {
        child,
        log,
        config_path,
        addr,
    };

    // At start: the 40-day-old file goes (max_age), then the 10-day-old one (max_bytes); the
    // newest, 5 days old, fits and stays.
    let aged = d
        .log
        .wait_for("over dead_letter.max_age", WAIT)
        .expect("a WARN for the file over max_age");
    assert!(
        aged.contains(&day_ago(40)) && aged.contains("3 messages"),
        "{aged}"
    );
    let over = d
        .log
        .wait_for("over dead_letter.max_bytes", WAIT)
        .expect("a WARN for the file over max_bytes");
    assert!(
        over.contains(&day_ago(10)) && over.contains("4 messages"),
        "{over}"
    );
    assert!(!store.day_file(&day_ago(40)).exists());
    assert!(!store.day_file(&day_ago(10)).exists());
    assert!(store.day_file(&day_ago(5)).exists());
    let dl = dead_letter_status_until(&state, "start-up removals counted", |dl| {
        dl["removed_files"] == 2
    })
    .await;
    assert_eq!(dl["removed_entries"], 7);
    assert_eq!(dl["removed_bytes"], sizes[0] + sizes[1]);

    // New dead letters: today's file makes the store too big, so the 5-day-old file goes; the
    // new entries are all kept, even though today's file alone is over the bound.
    let junk = connect(options(d.addr, "pm-junk", "pw")).await;
    for i in 0..30 {
        garbage(&junk, "pm-junk", i).await;
    }
    junk.wait_acks(30, WAIT).await;
    let over = d
        .log
        .wait_for("over dead_letter.max_bytes", WAIT)
        .expect("a WARN for the file removed on write");
    assert!(
        over.contains(&day_ago(5)) && over.contains("5 messages"),
        "{over}"
    );
    assert!(!store.day_file(&day_ago(5)).exists());
    let kept = store.read_all();
    assert_eq!(kept.len(), 30, "every new dead letter kept");
    assert!(kept.iter().all(|e| e.reason_kind == "malformed"));
    let dl = dead_letter_status_until(&state, "removal on write counted", |dl| {
        dl["removed_files"] == 3 && dl["written"] == 30
    })
    .await;
    assert_eq!(dl["removed_entries"], 12);
    assert_eq!(dl["removed_bytes"], sizes.iter().sum::<u64>());
    assert_eq!(dl["files"], 1);
    assert!(dl["bytes"].as_u64() > Some(cfg.dead_letter.max_bytes));
    // `wardgate status` says it in words.
    let out = d.status();
    assert!(
        out.contains("dead-letter store 1 day files")
            && out.contains("30 written since start")
            && out.contains("removed by dead_letter.max_bytes/max_age: 3 files, 12 messages"),
        "{out}"
    );
}

#[test]
fn dead_letter_bounds_are_checked_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wardgate.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nstate_dir = \"{}\"\n[dead_letter]\nmax_bytes = 0\nmax_age = \"1h\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let o = Command::new(BIN)
        .arg("check-config")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("dead_letter.max_bytes") && err.contains("dead_letter.max_age"),
        "{err}"
    );
    assert!(err.contains("at least 1day"), "{err}");
}
