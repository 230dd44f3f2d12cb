//! Shared by the benchmarks that run the real `wardgate` binary as its own process (so its RSS
//! and CPU are the gateway's alone): start it on a configuration and wait for READY=1, read its
//! memory and CPU time, stop it; and the helpers around that (test certificates from
//! `ward-pki`, free ports, mosquitto as the upstream or as a bridge, the cloud's TLS options,
//! the report file). Each bench uses part of it.
//!
//! What must stay true: everything listens on 127.0.0.1 only; a started process (gateway or
//! mosquitto) is waited for by an event (READY=1, its port accepting), never a fixed sleep.
#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
        // `cargo xtask bench` sets it for the benches; the gateway would take it for a
        // `WARDGATE_*` configuration key (`components`) and refuse to start.
        .env_remove("WARDGATE_COMPONENTS")
        .env("WARDGATE_LOG__FORMAT", "text")
        .env("WARDGATE_LOG__LEVEL", "warn")
        .envs(gateway_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let stderr = child.stderr.take().unwrap();
    // Counts the lines, keeping the first few: what a gateway that never got ready said.
    let first = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let kept = first.clone();
    let log = std::thread::spawn(move || {
        let mut n = 0;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if n < 20 {
                kept.lock().unwrap().push(line);
            }
            n += 1;
        }
        n
    });
    let mut buf = vec![0u8; 4096];
    let addr = loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                let _ = log.join();
                panic!(
                    "no READY=1 from the gateway within {ready:?} ({e}); it exited with {status}, saying:\n{}",
                    first.lock().unwrap().join("\n")
                );
            }
        };
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
    pub fn stop(self) -> usize {
        let (status, lines) = self.terminate();
        assert!(status.success(), "gateway exited with {status}");
        lines
    }

    /// SIGTERM and wait for the exit, whatever it is: its status and the log lines it wrote.
    pub fn terminate(mut self) -> (ExitStatus, usize) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = self.child.wait().unwrap();
        (status, self.log.join().unwrap_or(0))
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

/// Where the built plugin components are: `WARDGATE_COMPONENTS` (set by `cargo xtask bench`),
/// else `plugins/target/components`.
pub fn components_dir() -> PathBuf {
    std::env::var("WARDGATE_COMPONENTS")
        .unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target/components").into()
        })
        .into()
}

/// A gateway configuration for `devices` devices connecting at once from loopback: state in
/// `state`, the plain listener, the broker and the HTTP endpoint on free loopback ports, room
/// for twice that many connections (from one address), and 60 s to send CONNECT.
pub fn loopback_gateway(state: &Path, devices: usize) -> wardgate::config::Config {
    let mut cfg = wardgate::config::Config::default();
    cfg.gateway.state_dir = state.to_path_buf();
    cfg.listeners.plain.address = "127.0.0.1:0".parse().unwrap();
    cfg.listeners.max_connections_per_address = 2 * devices;
    cfg.listeners.connect_timeout = Duration::from_secs(60);
    cfg.broker.address = "127.0.0.1:0".parse().unwrap();
    cfg.http.address = "127.0.0.1:0".parse().unwrap();
    cfg.broker.max_connections = 2 * devices;
    cfg
}

/// The gateway configuration of the spine benches: state in `state`, a plain listener on a
/// free loopback port, the plugins in `components`, `devices` password devices (`pm-000`..,
/// password `pw`, a cheap hash: these benches measure the spine, not argon2) and room for
/// twice that many connections, the uplink to the upstream on `up` (see [`bench_gateway`]).
pub fn spine_gateway(
    state: &Path,
    components: PathBuf,
    up: u16,
    pki: &Path,
    devices: usize,
) -> wardgate::config::Config {
    let mut cfg = loopback_gateway(state, devices);
    cfg.plugins.dir = components;
    bench_gateway(&mut cfg, up, pki);
    cfg.devices = pacemakers(devices, &wardgate::registry::hash_password_demo("pw"));
    cfg
}

/// Certificates for a local upstream in `dir` with `ward-pki`: a CA named `ca_name`, the
/// server certificate for `localhost` / 127.0.0.1, and a client certificate per `clients`.
pub fn upstream_pki(dir: &Path, ca_name: &str, clients: &[&str]) {
    pki(dir, &["init", ca_name]);
    pki(
        dir,
        &["server", "localhost", "DNS:localhost", "IP:127.0.0.1"],
    );
    for who in clients {
        pki(dir, &["device", who]);
    }
}

/// A mosquitto configuration standing in for AWS IoT Core on 127.0.0.1:`port`: mutual TLS
/// with the certificates of [`upstream_pki`] in `pki` (the client certificate's name is the
/// user name), 100 messages in flight and up to a million queued per client. No persistence,
/// no log; append lines for more.
pub fn upstream_conf(port: u16, pki: &Path) -> String {
    format!(
        "user root\nper_listener_settings true\nlistener {port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/server.crt\nkeyfile {p}/server.key\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\nmax_inflight_messages 100\nmax_queued_messages 1000000\n",
        p = pki.display()
    )
}

/// A mosquitto configuration relaying like the gateway: anonymous devices on 127.0.0.1:`port`,
/// persistence in `db` every second, and a bridge forwarding `ward/#` at QoS 1 to the upstream
/// on 127.0.0.1:`up` as `bench-bridge` (certificate from `pki`), with a persistent session.
pub fn bridge_conf(port: u16, up: u16, pki: &Path, db: &Path) -> String {
    format!(
        "user root\nper_listener_settings false\nallow_anonymous true\nlistener {port} 127.0.0.1\npersistence true\npersistence_location {db}/\nautosave_interval 1\nmax_queued_messages 1000000\n\
         connection upstream\naddress 127.0.0.1:{up}\ntopic ward/# out 1\nbridge_cafile {p}/ca.crt\nbridge_certfile {p}/devices/bench-bridge.crt\nbridge_keyfile {p}/devices/bench-bridge.key\nremote_clientid bench-bridge\ncleansession false\n",
        db = db.display(),
        p = pki.display()
    )
}

/// A mosquitto started from `conf` on `port`; stopped (SIGTERM, which saves its sessions) on drop.
pub struct Mosquitto {
    child: Option<Child>,
}

impl Mosquitto {
    /// Start it and wait (20 s at most) until `port` accepts connections.
    pub fn start(conf: &Path, port: u16) -> Mosquitto {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto installed");
        wait_port(port, Duration::from_secs(20));
        Mosquitto { child: Some(child) }
    }

    /// Write `conf` to `path`, then [`Mosquitto::start`].
    pub fn with_conf(path: &Path, conf: &str, port: u16) -> Mosquitto {
        std::fs::write(path, conf).unwrap();
        Mosquitto::start(path, port)
    }

    /// Its process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until 127.0.0.1:`port` accepts a connection; panics after `limit`.
pub fn wait_port(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reset the peak RSS (VmHWM) of `pid` to its current RSS (Linux ≥ 4.0: write 5 to clear_refs).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// CPU time `pid` has used, user + system, all its threads, in seconds (`/proc/<pid>/stat`
/// fields 14 and 15, in USER_HZ = 100 ticks per second on Linux); 0 once it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count from the `)` that ends it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |n: usize| -> u64 {
        rest.split_whitespace()
            .nth(n - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field(14) + field(15)) as f64 / 100.0
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

/// Subscribe with `o` to `topic` (QoS 1) and hand every PUBLISH to `on_publish`, in a task of
/// its own that also holds a clone of the client; returns the client and the task once the
/// SUBACK is in (20 s at most). The task ends once the client has sent DISCONNECT; after a
/// connection error (the upstream restarted) it polls again 100 ms later, and rumqttc connects
/// again.
pub async fn subscriber(
    o: rumqttc::MqttOptions,
    topic: &str,
    mut on_publish: impl FnMut(rumqttc::Publish) + Send + 'static,
) -> (rumqttc::AsyncClient, tokio::task::JoinHandle<()>) {
    use rumqttc::{Event, Outgoing, Packet};
    let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
    client
        .subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let keep = client.clone();
    let task = tokio::spawn(async move {
        let _client = keep; // keeps the event loop's request channel open
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(p),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), subscribed)
        .await
        .unwrap_or_else(|_| panic!("no SUBACK for `{topic}` within 20 s"))
        .unwrap();
    (client, task)
}
