//! Shared by the benchmarks that run the real `wardgate` binary as its own process (so its RSS
//! and CPU are the gateway's alone): start it on a configuration and wait for READY=1, read its
//! memory, stop it; and the helpers around that (test certificates from `ward-pki`, free ports).
//! Each bench uses part of it.
#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// (VmRSS, VmHWM) of `pid` in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Run `packaging/pki/ward-pki <args[0]> <dir> <args[1..]>`.
pub fn pki(dir: &Path, args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/pki/ward-pki");
    let o = Command::new("sh")
        .arg(script)
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ward-pki {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Extra environment for the gateway under test, from `BENCH_GATEWAY_ENV`
/// (`NAME=value` pairs separated by `;`), e.g. a heap profiler's preload library:
/// `BENCH_GATEWAY_ENV="LD_PRELOAD=/usr/lib/x86_64-linux-gnu/heaptrack/libheaptrack_preload.so;DUMP_HEAPTRACK_OUTPUT=/tmp/gw.heaptrack"`.
fn gateway_env() -> Vec<(String, String)> {
    std::env::var("BENCH_GATEWAY_ENV")
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A running `wardgate run`.
pub struct Running {
    pub child: Child,
    pub pid: u32,
    /// Its plain listener.
    pub addr: SocketAddr,
    /// Counts the log lines it wrote (kept reading so it never blocks on a full pipe).
    log: std::thread::JoinHandle<usize>,
}

/// Start `wardgate run` on `cfg` (written to `<dir>/<name>.toml`, log level warn) and wait up to
/// `ready` for READY=1; its plain listener's address comes from the STATUS= line.
pub fn start(cfg: &wardgate::config::Config, dir: &Path, name: &str, ready: Duration) -> Running {
    let conf = dir.join(format!("{name}.toml"));
    std::fs::write(&conf, toml::to_string(cfg).unwrap()).unwrap();
    let sock_path = dir.join(format!("{name}.notify"));
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(ready)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wardgate"))
        .arg("run")
        .arg("-c")
        .arg(&conf)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WARDGATE_LOG__FORMAT", "text")
        .env("WARDGATE_LOG__LEVEL", "warn")
        .envs(gateway_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || std::io::BufReader::new(stderr).lines().count());
    let mut buf = vec![0u8; 4096];
    let addr = loop {
        let n = sock.recv(&mut buf).expect("READY=1 in time");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == "READY=1") {
            break msg
                .split_whitespace()
                .find_map(|w| w.strip_prefix("plain="))
                .and_then(|a| a.trim_end_matches(';').parse().ok())
                .expect("listener address in STATUS=");
        }
    };
    Running {
        pid: child.id(),
        child,
        addr,
        log,
    }
}

impl Running {
    /// SIGTERM, wait for the exit, which must be clean; the number of log lines it wrote.
    pub fn stop(mut self) -> usize {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = self.child.wait().unwrap();
        let lines = self.log.join().unwrap_or(0);
        assert!(status.success(), "gateway exited with {status}");
        lines
    }
}

/// Point `cfg`'s uplink at a mosquitto on 127.0.0.1:`port` (server name `localhost`), as the
/// gateway `bench-gateway` of the `ward-pki` directory `pki`; and, since every bench client
/// comes from 127.0.0.1, lift the per-address login bounds to the gateway-wide ones.
pub fn bench_gateway(cfg: &mut wardgate::config::Config, port: u16, pki: &Path) {
    cfg.gateway.id = "bench-gateway".into();
    cfg.login.max_pending_per_address = cfg.login.max_pending;
    cfg.login.max_per_second_per_address = cfg.login.max_per_second;
    cfg.upstream.enabled = true;
    cfg.upstream.endpoint = "localhost".into();
    cfg.upstream.port = port;
    cfg.upstream.ca_file = Some(pki.join("ca.crt"));
    cfg.upstream.cert_file = Some(pki.join("devices/bench-gateway.crt"));
    cfg.upstream.key_file = Some(pki.join("devices/bench-gateway.key"));
}

/// `n` pacemaker devices `pm-000`, `pm-001`, ... logging in with the password hash `hash`.
pub fn pacemakers(n: usize, hash: &str) -> Vec<wardgate::config::DeviceConfig> {
    (0..n)
        .map(|i| {
            wardgate::config::DeviceConfig::with_password(
                &format!("pm-{i:03}"),
                "pacemaker",
                hash.to_owned(),
            )
        })
        .collect()
}

/// Write a bench's results to `target/bench/<name>.json`.
pub fn write_report(name: &str, report: &serde_json::Value) {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .unwrap();
}

/// Options of a "cloud" client `id` on the upstream mosquitto at `localhost:port`: mutual TLS
/// with the `bench-cloud` certificate from `pki` (made with `ward-pki`), packets up to 256 KiB
/// (a whole upstream batch), a 30 s keep-alive.
pub fn cloud_options(id: &str, port: u16, pki: &Path) -> rumqttc::MqttOptions {
    let upstream = wardgate::config::UpstreamConfig {
        enabled: true,
        endpoint: "localhost".into(),
        port,
        ca_file: Some(pki.join("ca.crt")),
        cert_file: Some(pki.join("devices/bench-cloud.crt")),
        key_file: Some(pki.join("devices/bench-cloud.key")),
        ..Default::default()
    };
    let tls = wardgate::uplink::load_tls(&upstream).unwrap();
    let mut o = rumqttc::MqttOptions::new(id, "localhost", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o.set_keep_alive(Duration::from_secs(30));
    o
}
