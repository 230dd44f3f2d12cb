//! Benchmark: what logins cost the gateway in memory, measured on the real binary.
//!
//! Runs `wardgate run` as its own process (so its RSS is the gateway's alone) with 500
//! registered password devices whose hashes use argon2's default cost (19 MiB, t = 2), then:
//! 1. three rounds of 60 parallel CONNECTs with unknown ids and wrong passwords;
//! 2. 500 devices connecting at once (first login: every password is checked with argon2);
//! 3. all 500 dropping their TCP connections and reconnecting at once, as after a power cut of
//!    the ward network (the credential cache answers).
//!
//! After each step it reads the gateway's `VmRSS` and `VmHWM` (peak) from `/proc/<pid>/status`.
//! Every client comes from 127.0.0.1, so the per-address login bounds are lifted to the
//! gateway-wide ones for this run; the gateway-wide bounds keep their defaults. A device told
//! "server unavailable" (CONNACK 3) retries after 100–300 ms, as a device SDK would back off.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p wardgate --bench logins`). Prints one line
//! per step and writes `target/bench/logins.json`.

use rumqttc::mqttbytes::v4::{ConnectReturnCode, Login, Packet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

mod real;
use real::rss_kib;

const DEVICES: usize = 500;
const FLOOD: usize = 60;
const ROUNDS: usize = 3;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One CONNECT: the CONNACK code, or `None` when the connection closed without one. The
/// connection is handed back open when accepted.
async fn connect(
    addr: SocketAddr,
    id: &str,
    password: &str,
) -> (Option<ConnectReturnCode>, Option<TcpStream>) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return (None, None);
    };
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
    c.keep_alive = 60;
    c.login = Some(Login::new(id, password));
    if wardgate::mqtt::write_packet(&mut s, &Packet::Connect(c), 1 << 16)
        .await
        .is_err()
    {
        return (None, None);
    }
    let mut buf = bytes::BytesMut::new();
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        wardgate::mqtt::read_packet(&mut s, &mut buf, 1 << 16),
    )
    .await;
    match answer {
        Ok(Ok(Some(Packet::ConnAck(a)))) => {
            let ok = a.code == ConnectReturnCode::Success;
            (Some(a.code), ok.then_some(s))
        }
        _ => (None, None),
    }
}

/// Connect every device, retrying "server unavailable" after a short jittered pause. Returns
/// the open connections, how many CONNACK 3 answers came back, and the time it took.
async fn connect_all(addr: SocketAddr) -> (Vec<TcpStream>, u64, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| {
            tokio::spawn(async move {
                let id = format!("pm-{i:03}");
                let mut busy = 0u64;
                loop {
                    match connect(addr, &id, "pw").await {
                        (Some(ConnectReturnCode::Success), Some(s)) => return (s, busy),
                        (Some(ConnectReturnCode::ServiceUnavailable), _) => {
                            busy += 1;
                            let pause = 100 + rand::random::<u64>() % 200;
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                        other => panic!("{id}: unexpected answer {:?}", other.0),
                    }
                }
            })
        })
        .collect();
    let mut conns = Vec::new();
    let mut busy = 0;
    for t in tasks {
        let (s, b) = t.await.unwrap();
        conns.push(s);
        busy += b;
    }
    (conns, busy, started.elapsed())
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let hash = wardgate::registry::hash_password("pw");
    let mut cfg = real::loopback_gateway(&dir.path().join("state"), DEVICES);
    cfg.gateway.id = "bench-gateway".into();
    cfg.plugins.dir = dir.path().join("plugins");
    std::fs::create_dir_all(&cfg.plugins.dir).unwrap();
    cfg.login.max_pending_per_address = cfg.login.max_pending;
    cfg.login.max_per_second_per_address = cfg.login.max_per_second;
    cfg.devices = real::pacemakers(DEVICES, &hash);
    let gw = real::start(&cfg, dir.path(), "wardgate", Duration::from_secs(60));
    let (pid, addr) = (gw.pid, gw.addr);
    let mut report = serde_json::Map::new();
    let (idle, _) = rss_kib(pid);
    println!(
        "logins: gateway idle, {DEVICES} devices registered: RSS {:.1} MiB",
        mib(idle)
    );
    report.insert("idle_rss_kib".into(), idle.into());

    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let started = Instant::now();
        let tasks: Vec<_> = (0..FLOOD)
            .map(|i| {
                tokio::spawn(async move {
                    connect(addr, &format!("intruder-{round}-{i}"), "wrong")
                        .await
                        .0
                })
            })
            .collect();
        let (mut refused, mut busy, mut other) = (0, 0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Some(ConnectReturnCode::NotAuthorized) => refused += 1,
                Some(ConnectReturnCode::ServiceUnavailable) => busy += 1,
                _ => other += 1,
            }
        }
        let (rss, hwm) = rss_kib(pid);
        println!(
            "logins: round {round}: {FLOOD} parallel wrong-password CONNECTs in {:.2} s: {refused} not authorized, {busy} server unavailable, {other} other; RSS {:.1} MiB, peak {:.1} MiB",
            started.elapsed().as_secs_f64(),
            mib(rss),
            mib(hwm)
        );
        rounds.push(serde_json::json!({
            "round": round, "not_authorized": refused, "server_unavailable": busy,
            "other": other, "rss_kib": rss, "peak_rss_kib": hwm,
            "seconds": started.elapsed().as_secs_f64(),
        }));
    }
    report.insert("wrong_password_rounds".into(), rounds.into());

    let (conns, busy, took) = connect_all(addr).await;
    let (rss, hwm) = rss_kib(pid);
    println!(
        "logins: {DEVICES} devices logging in at once (argon2 for each): all connected in {:.1} s, {busy} CONNACK 3 retries; RSS {:.1} MiB, peak {:.1} MiB",
        took.as_secs_f64(),
        mib(rss),
        mib(hwm)
    );
    report.insert(
        "first_login".into(),
        serde_json::json!({"seconds": took.as_secs_f64(), "busy_retries": busy, "rss_kib": rss, "peak_rss_kib": hwm}),
    );
    drop(conns);
    let (conns, busy, took) = connect_all(addr).await;
    let (rss, hwm) = rss_kib(pid);
    println!(
        "logins: {DEVICES} devices reconnecting at once (credential cache): all connected in {:.2} s, {busy} CONNACK 3 retries; RSS {:.1} MiB, peak {:.1} MiB",
        took.as_secs_f64(),
        mib(rss),
        mib(hwm)
    );
    report.insert(
        "reconnect_storm".into(),
        serde_json::json!({"seconds": took.as_secs_f64(), "busy_retries": busy, "rss_kib": rss, "peak_rss_kib": hwm}),
    );
    drop(conns);
    gw.stop();
    real::write_report("logins", &serde_json::Value::Object(report));
}
