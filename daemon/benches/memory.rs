//! Benchmark: what a connected device costs the gateway in memory, measured on the real binary.
//!
//! Runs `wardgate run` as its own process (so its RSS is the gateway's alone) with the three
//! ward plugins (`plugins/target/components`, or `WARDGATE_COMPONENTS`) and 500 registered
//! pacemaker password devices (argon2 at the demo cost: the login is not what is measured), then:
//! 1. idle: nothing connected; then the first logins;
//! 2. 50 devices connected, each has published one reading (QoS 1, PUBACK received), then idle;
//! 3. 500 devices likewise;
//! 4. the 500 devices publishing 1 000 readings/s together (2/s each, QoS 1, ~100-byte
//!    pacemaker payloads) for [`LOAD`]; the peak (`VmHWM`) is reset before it starts
//!    (`/proc/<pid>/clear_refs`), so it is the peak of the load alone;
//! 5. a power cut: the 500 devices reconnect at once, each logging in and sending a reading →
//!    the time until all are back, the peak RSS during it and the settled RSS after.
//!
//! Also: the time from spawning `wardgate run` to READY=1, on the first start (empty plugin
//! cache: the three plugins are compiled) and on the restart (compiled cache), and the size of
//! the binary and of the package `cargo xtask deb` made, if any.
//!
//! RSS is read from `/proc/<pid>/status` after the gateway has settled (RSS steady for
//! [`SETTLE`]), once the quiet gateway has given back its start-up memory
//! (`wardgate::footprint`, 10 s after the last message). The idle figure is that of a restart (plugins loaded from the compiled cache);
//! the first start, which compiles them, is reported beside it. Before devices are counted,
//! four logins give the argon2 pool threads their kept memory (a cost of the gateway, reported
//! on its own), and their readings page in the code a connection runs. "Per device" is the
//! growth from there divided by the devices added; "for each of the last 450" is the growth
//! from 50 to 500. Run with
//! `cargo xtask bench` (or `cargo bench -p wardgate --bench memory`). Prints one line per step
//! and writes `target/bench/memory.json`.

use rumqttc::mqttbytes::v4::{ConnectReturnCode, Login, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const DEVICES: usize = 500;
const FIRST: usize = 50;
/// Readings per second of all devices together during the load step.
const RATE: u64 = 1_000;
const LOAD: Duration = Duration::from_secs(20);
/// RSS must not move by more than 64 KiB for this long to count as settled.
const SETTLE: Duration = Duration::from_secs(2);
const MAX_FRAME: usize = 1 << 16;

mod real;
use real::rss_kib;

fn main() {
    let components = std::env::var("WARDGATE_COMPONENTS").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target/components").into()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(components.into()));
}

/// The gateway's own pid: `child` itself, or its `wardgate` descendant when a wrapper
/// started it.
fn gateway_pid(child: u32) -> u32 {
    let mut parents = vec![child];
    let mut found = child;
    for _ in 0..4 {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            break;
        };
        let kids: Vec<(u32, String)> = dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // pid (comm) state ppid ...
                let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
                let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
                parents.contains(&ppid).then(|| (pid, comm.to_owned()))
            })
            .collect();
        if let Some((pid, _)) = kids.iter().find(|(_, c)| c == "wardgate") {
            found = *pid;
            break;
        }
        parents = kids.into_iter().map(|(p, _)| p).collect();
    }
    found
}

/// Copy `/proc/<pid>/smaps` to `$MEMORY_BENCH_SMAPS/<step>.smaps` when that is set.
fn snapshot(pid: u32, step: &str) {
    if let Ok(dir) = std::env::var("MEMORY_BENCH_SMAPS") {
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
            let _ = std::fs::write(format!("{dir}/{step}.smaps"), s);
        }
    }
}

/// RSS once it stopped moving (at most 30 s of waiting).
async fn settled_rss(pid: u32) -> u64 {
    let started = Instant::now();
    let mut last = rss_kib(pid).0;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss_kib(pid).0;
        if now.abs_diff(last) > 64 {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= SETTLE || started.elapsed() > Duration::from_secs(30) {
            return now;
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A pacemaker reading of about 100 bytes.
fn payload(k: u64) -> String {
    format!(
        r#"{{"heartbeat":{},"ts":{},"battery_pct":87,"mode":"DDD","serial":"PM-{:08}"}}"#,
        60 + k % 60,
        wardgate::clock::now_ms(),
        k % 100_000_000
    )
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, p: &Packet) {
    wardgate::mqtt::write_packet(w, p, MAX_FRAME)
        .await
        .expect("write to the gateway");
}

async fn read<R: AsyncRead + Unpin>(r: &mut R, buf: &mut bytes::BytesMut) -> Packet {
    tokio::time::timeout(
        Duration::from_secs(60),
        wardgate::mqtt::read_packet(r, buf, MAX_FRAME),
    )
    .await
    .expect("an answer within 60 s")
    .expect("a readable packet")
    .expect("the connection stays open")
}

fn publish(id: &str, pkid: u16, k: u64) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: format!("ward/{id}/telemetry"),
        pkid,
        payload: payload(k).into(),
    })
}

/// Connect device `i` (retrying "server unavailable" after a short jittered pause, as a
/// device SDK would back off); with `reading`, publish one reading and wait for its PUBACK.
async fn connect(addr: SocketAddr, i: usize, reading: bool) -> TcpStream {
    let id = format!("pm-{i:03}");
    let mut buf = bytes::BytesMut::new();
    let mut s = loop {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut c = rumqttc::mqttbytes::v4::Connect::new(&id);
        // Long enough that the idle steps need no PINGREQ.
        c.keep_alive = 600;
        c.login = Some(Login::new(&id, "pw"));
        write(&mut s, &Packet::Connect(c)).await;
        match read(&mut s, &mut buf).await {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => break s,
            Packet::ConnAck(a) if a.code == ConnectReturnCode::ServiceUnavailable => {
                buf.clear();
                let pause = 100 + rand::random::<u64>() % 200;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            other => panic!("{id}: expected CONNACK 0, got {other:?}"),
        }
    };
    if !reading {
        return s;
    }
    write(&mut s, &publish(&id, 1, i as u64)).await;
    match read(&mut s, &mut buf).await {
        Packet::PubAck(a) if a.pkid == 1 => {}
        other => panic!("{id}: expected PUBACK 1, got {other:?}"),
    }
    s
}

/// Connect devices `range` (in batches, as devices would come up on a ward).
async fn connect_range(addr: SocketAddr, range: std::ops::Range<usize>) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    let ids: Vec<usize> = range.collect();
    for batch in ids.chunks(50) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|&i| tokio::spawn(connect(addr, i, true)))
            .collect();
        for t in tasks {
            conns.push(t.await.unwrap());
        }
    }
    conns
}

/// Every connection publishes `RATE / n` readings per second for `LOAD`, one in flight at a
/// time. Returns the PUBACKs received.
async fn load(conns: Vec<TcpStream>) -> u64 {
    let n = conns.len() as u64;
    let period = Duration::from_nanos(1_000_000_000 * n / RATE);
    let acked = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + LOAD;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let acked = acked.clone();
            tokio::spawn(async move {
                let id = format!("pm-{i:03}");
                let mut buf = bytes::BytesMut::new();
                // Spread the devices over one period.
                let start = tokio::time::Instant::now() + period * i as u32 / n as u32;
                let mut tick = tokio::time::interval_at(start, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut pkid = 1u16;
                let mut k = 0u64;
                while Instant::now() < end {
                    tick.tick().await;
                    pkid = pkid % u16::MAX + 1;
                    k += 1;
                    write(&mut s, &publish(&id, pkid, k)).await;
                    match read(&mut s, &mut buf).await {
                        Packet::PubAck(a) if a.pkid == pkid => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("{id}: expected PUBACK {pkid}, got {other:?}"),
                    }
                }
                write(&mut s, &Packet::Disconnect).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    acked.load(Ordering::Relaxed)
}

/// Start the gateway with `conf`; returns it, its own pid, its plain listener and the thread
/// draining its log.
fn start(
    conf: &std::path::Path,
    sock_path: &std::path::Path,
) -> (
    std::process::Child,
    u32,
    SocketAddr,
    std::thread::JoinHandle<usize>,
    std::sync::mpsc::Receiver<()>,
    Duration,
) {
    let sock = UnixDatagram::bind(sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // A profiler in front of the gateway (`MEMORY_BENCH_WRAP="heaptrack -o /tmp/wg"`): the
    // RSS figures are then those of the gateway under it, so only its report counts.
    let wrap = std::env::var("MEMORY_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(w) => {
            let mut c = std::process::Command::new(w);
            c.args(words).arg(env!("CARGO_BIN_EXE_wardgate"));
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_wardgate")),
    };
    let spawned = Instant::now();
    let mut child = command
        .arg("run")
        .arg("-c")
        .arg(conf)
        // `cargo xtask bench` sets it for the benches; the gateway would read it as a
        // `WARDGATE_*` configuration key (`components`) and refuse to start.
        .env_remove("WARDGATE_COMPONENTS")
        .env("NOTIFY_SOCKET", sock_path)
        .env("WARDGATE_LOG__FORMAT", "text")
        .env("WARDGATE_LOG__LEVEL", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let stderr = child.stderr.take().unwrap();
    // Keep reading the log so the gateway never blocks on a full pipe.
    // and tell when the quiet gateway has given back its start-up memory (`footprint`).
    let (released_tx, released) = std::sync::mpsc::channel();
    let log_lines = std::thread::spawn(move || {
        let mut n = 0;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            n += 1;
            if line.contains("start-up pages released") {
                let _ = released_tx.send(());
            }
        }
        n
    });
    let mut buf = vec![0u8; 4096];
    let addr: SocketAddr = loop {
        let n = sock.recv(&mut buf).expect("READY=1 within 60 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == "READY=1") {
            let a = msg
                .split_whitespace()
                .find_map(|w| w.strip_prefix("plain="))
                .and_then(|a| a.trim_end_matches(';').parse().ok())
                .expect("listener address in STATUS=");
            break a;
        }
    };
    let to_ready = spawned.elapsed();
    let pid = gateway_pid(child.id());
    (child, pid, addr, log_lines, released, to_ready)
}

/// SIGTERM the gateway and check that it stopped cleanly.
fn stop(child: &mut std::process::Child, pid: u32, log_lines: std::thread::JoinHandle<usize>) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().unwrap();
    let _ = log_lines.join();
    assert!(status.success(), "gateway exited with {status}");
}

async fn run(components: std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = wardgate::config::Config::default();
    cfg.gateway.id = "bench-gateway".into();
    cfg.gateway.state_dir = dir.path().join("state");
    cfg.listeners.plain.address = "127.0.0.1:0".parse().unwrap();
    cfg.listeners.max_connections_per_address = 2 * DEVICES;
    cfg.broker.address = "127.0.0.1:0".parse().unwrap();
    cfg.http.address = "127.0.0.1:0".parse().unwrap();
    cfg.broker.max_connections = 2 * DEVICES;
    cfg.plugins.dir = components;
    cfg.login.max_pending_per_address = cfg.login.max_pending;
    cfg.login.max_per_second_per_address = cfg.login.max_per_second;
    let hash = wardgate::registry::hash_password_demo("pw");
    cfg.devices = real::pacemakers(DEVICES, &hash);
    let conf = dir.path().join("wardgate.toml");
    std::fs::write(&conf, toml::to_string(&cfg).unwrap()).unwrap();
    let (mut child, pid, _addr, log_lines, released, ready_first) =
        start(&conf, &dir.path().join("notify-1.sock"));
    released
        .recv_timeout(Duration::from_secs(60))
        .expect("start-up memory released once quiet");
    let idle_first = settled_rss(pid).await;
    stop(&mut child, pid, log_lines);
    // The idle figure that counts is that of a restart: the plugins are compiled once, then
    // loaded from the cache, as on a gateway that has run before.
    let (mut child, pid, addr, log_lines, released, ready_cached) =
        start(&conf, &dir.path().join("notify-2.sock"));
    println!(
        "memory: start to READY=1: {} ms with the plugins' compiled cache, {} ms with an empty cache (the first start compiles them)",
        ready_cached.as_millis(),
        ready_first.as_millis(),
    );
    released
        .recv_timeout(Duration::from_secs(60))
        .expect("start-up memory released once quiet");
    let plugins = std::fs::read_dir(&cfg.plugins.dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
                .count()
        })
        .unwrap_or(0);
    assert!(
        plugins >= 3,
        "the three ward plugins are missing from {}: run `cargo xtask plugins`",
        cfg.plugins.dir.display()
    );

    let idle = settled_rss(pid).await;
    snapshot(pid, "idle");
    println!(
        "memory: idle, {plugins} plugins, {DEVICES} devices registered: RSS {:.1} MiB after a restart ({:.1} MiB on the first start, which compiles the plugins)",
        mib(idle),
        mib(idle_first)
    );
    // The first password logins give each argon2 pool thread the memory area it keeps for
    // every later check (`login.argon2_threads` × the hashes' m_cost), and their readings page
    // in the code a connection and a reading run (released after start-up, see
    // `wardgate::footprint`): costs of the gateway, not of a device, so they are taken before
    // the devices are counted. The four then disconnect.
    let warm: Vec<_> = (0..4)
        .map(|k| tokio::spawn(connect(addr, DEVICES - 1 - k, true)))
        .collect();
    for w in warm {
        drop(w.await.unwrap());
    }
    let logged_in = settled_rss(pid).await;
    println!(
        "memory: after the first logins and readings (argon2 areas of the login pool, the code they run): RSS {:.1} MiB",
        mib(logged_in)
    );
    let mut conns = connect_range(addr, 0..FIRST).await;
    let at_first = settled_rss(pid).await;
    snapshot(pid, "connected-50");
    let per_first = (at_first.saturating_sub(logged_in)) as f64 / FIRST as f64;
    println!(
        "memory: {FIRST} devices connected, one reading each: RSS {:.1} MiB, {per_first:.1} KiB per device",
        mib(at_first)
    );
    conns.extend(connect_range(addr, FIRST..DEVICES).await);
    let at_all = settled_rss(pid).await;
    snapshot(pid, "connected-500");
    let per_all = (at_all.saturating_sub(logged_in)) as f64 / DEVICES as f64;
    let per_more = (at_all.saturating_sub(at_first)) as f64 / (DEVICES - FIRST) as f64;
    println!(
        "memory: {DEVICES} devices connected, one reading each: RSS {:.1} MiB, {per_all:.1} KiB per device ({per_more:.1} KiB for each of the last {})",
        mib(at_all),
        DEVICES - FIRST
    );
    let (_, peak_connect) = rss_kib(pid);
    // Reset VmHWM so the next peak is the load's own.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let started = Instant::now();
    let acked = load(conns).await;
    let took = started.elapsed();
    let (after, peak_load) = rss_kib(pid);
    snapshot(pid, "after-load");
    println!(
        "memory: {DEVICES} devices publishing {RATE} readings/s for {LOAD:?}: {acked} PUBACKs ({:.0}/s); peak RSS {:.1} MiB, RSS after {:.1} MiB",
        acked as f64 / took.as_secs_f64(),
        mib(peak_load),
        mib(after)
    );

    // 5. A power cut: all devices come back at once, each logging in and sending a reading
    // (their previous connections ended with the load).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let started = Instant::now();
    let storm: Vec<_> = (0..DEVICES)
        .map(|i| tokio::spawn(connect(addr, i, true)))
        .collect();
    let mut back = Vec::new();
    for t in storm {
        back.push(t.await.unwrap());
    }
    let storm_took = started.elapsed();
    let (_, peak_storm) = rss_kib(pid);
    let after_storm = settled_rss(pid).await;
    println!(
        "memory: {DEVICES} devices reconnecting at once (a power cut), each sending a reading: all back in {:.2} s; peak RSS {:.1} MiB, settled {:.1} MiB",
        storm_took.as_secs_f64(),
        mib(peak_storm),
        mib(after_storm)
    );
    drop(back);

    stop(&mut child, pid, log_lines);
    let binary_bytes = std::fs::metadata(env!("CARGO_BIN_EXE_wardgate"))
        .map(|m| m.len())
        .unwrap_or(0);
    // The package, when `cargo xtask deb` made one: its size and its stripped executable's.
    let package = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian"),
    )
    .ok()
    .and_then(|d| {
        d.filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    });
    let package_bytes = package
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len());
    println!(
        "memory: release binary {:.1} MiB (unstripped){}",
        binary_bytes as f64 / (1 << 20) as f64,
        match (&package, package_bytes) {
            (Some(p), Some(n)) => format!(
                "; package {} {:.1} MiB",
                p.file_name().unwrap_or_default().to_string_lossy(),
                n as f64 / (1 << 20) as f64
            ),
            _ => "; no package built (cargo xtask deb)".into(),
        }
    );
    let report = serde_json::json!({
        "start_to_ready_ms": {"cached_plugins": ready_cached.as_millis() as u64, "empty_cache": ready_first.as_millis() as u64},
        "reconnect_storm": {"devices": DEVICES, "seconds": storm_took.as_secs_f64(), "peak_rss_kib": peak_storm, "settled_rss_kib": after_storm},
        "binary_bytes": binary_bytes,
        "package_bytes": package_bytes,
        "plugins": plugins,
        "idle_rss_kib": idle,
        "idle_first_start_rss_kib": idle_first,
        "after_first_logins_rss_kib": logged_in,
        "connected_50": {"rss_kib": at_first, "kib_per_device": per_first},
        "connected_500": {"rss_kib": at_all, "kib_per_device": per_all, "kib_per_device_after_50": per_more, "peak_rss_kib": peak_connect},
        "load": {
            "devices": DEVICES, "readings_per_second": RATE, "seconds": took.as_secs_f64(),
            "pubacks": acked, "peak_rss_kib": peak_load, "rss_after_kib": after,
        },
    });
    real::write_report("memory", &report);
}
