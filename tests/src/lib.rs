//! Helpers for wardgate's integration tests: configs on `127.0.0.1:0`, real MQTT clients
//! (rumqttc), a systemd notify socket, and subprocess control.
//!
//! Nothing here mocks a component: tests start the real gateway (in process or as the
//! `wardgate-under-test` binary, which is `wardgate::cli::main`), the real embedded rumqttd,
//! and talk real MQTT over loopback sockets.
//!
//! Tests hold on any date: every time they send comes from the clock at run time
//! ([`now_ms`], [`pacemaker_reading`]). They wait for events — a CONNACK, a SUBACK, a
//! notification on the notify socket, a log line — with generous timeouts, never for a fixed
//! time.

use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};
use wardgate::config::{Config, DeviceConfig};

pub use wardgate::clock::now_ms;

/// A pacemaker reading with heart rate `hr`, taken now (as a device sends it: `ts` in epoch ms).
pub fn pacemaker_reading(hr: u32) -> String {
    format!(r#"{{"heartbeat":{hr},"ts":{}}}"#, now_ms())
}

/// Publish a pacemaker reading with heart rate `hr` (QoS 1, taken now) on
/// `ward/<id>/telemetry`.
pub async fn send_heart_rate(client: &AsyncClient, id: &str, hr: u32) {
    client
        .publish(
            format!("ward/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            pacemaker_reading(hr),
        )
        .await
        .expect("publish queued");
}

/// Wait until `f` holds, checking every 20 ms; panics naming `what` after `within`.
pub async fn until<F: Fn() -> bool>(what: &str, within: Duration, f: F) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The workspace root.
pub fn workspace() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The virtualenv's python with the AWS IoT Device SDKs (`tests/python/requirements.txt`);
/// panics with how to make it.
pub fn sdk_python() -> std::path::PathBuf {
    let py = workspace().join("target/py/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `cargo xtask test`, or `python3 -m venv target/py && \
         target/py/bin/pip install -r tests/python/requirements.txt`",
        py.display()
    );
    py
}

/// A registered test device.
pub fn device(id: &str, kind: &str, password: &str) -> DeviceConfig {
    DeviceConfig::with_password(id, kind, wardgate::registry::hash_password_demo(password))
}

/// A configuration that binds only `127.0.0.1:0` and keeps state in `state_dir`.
pub fn config(state_dir: &Path, devices: Vec<DeviceConfig>) -> Config {
    let mut c = Config::default();
    c.gateway.id = "test-gateway".into();
    c.gateway.state_dir = state_dir.to_path_buf();
    c.listeners.plain.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.listeners.connect_timeout = Duration::from_secs(2);
    c.broker.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.http.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.plugins.dir = components_dir();
    // Never plugins installed on the machine running the tests.
    c.plugins.shipped_dir = Default::default();
    // Every test client comes from 127.0.0.1, where a ward's devices have an address each:
    // the per-address login bounds are the gateway-wide ones (tests of the bounds set them).
    c.login.max_pending_per_address = c.login.max_pending;
    c.login.max_per_second_per_address = c.login.max_per_second;
    c.devices = devices;
    c
}

/// Where `cargo xtask plugins` puts the plugin components.
pub fn components_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/components")
}

/// The component file of plugin `name` (test guests from `test-components/`); panics with the
/// fix when it was not built.
pub fn component(name: &str) -> std::path::PathBuf {
    let dir = if name.starts_with("test-") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/test-components")
    } else {
        components_dir()
    };
    let p = dir.join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "{} is missing: build the plugins first with `cargo xtask plugins` (cargo xtask test does)",
        p.display()
    );
    p
}

/// The same configuration as TOML text, for the binary.
pub fn config_toml(c: &Config) -> String {
    toml::to_string(c).expect("a Config serialises to TOML")
}

/// MQTT options for a device at `addr`.
pub fn options(addr: SocketAddr, id: &str, password: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials(id, password);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// How a CONNECT attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// CONNACK with success.
    Accepted,
    /// CONNACK with this refusal code.
    Refused(ConnectReturnCode),
    /// The connection closed or failed without a CONNACK.
    Closed(String),
}

/// Try to connect; report the outcome within `timeout`.
pub async fn try_connect(opts: MqttOptions, timeout: Duration) -> ConnectOutcome {
    let (_client, mut el) = AsyncClient::new(opts, 10);
    let r = tokio::time::timeout(timeout, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return if a.code == ConnectReturnCode::Success {
                        ConnectOutcome::Accepted
                    } else {
                        ConnectOutcome::Refused(a.code)
                    }
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    return ConnectOutcome::Refused(code)
                }
                Err(e) => return ConnectOutcome::Closed(e.to_string()),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| ConnectOutcome::Closed("timed out".into()))
}

#[allow(missing_debug_implementations)]
/// A connected client whose event loop runs in the background; incoming publishes are
/// forwarded on a channel.
pub struct Device {
    /// The client.
    pub client: AsyncClient,
    /// Incoming PUBLISHes (topic, payload).
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// PUBACKs received so far.
    pub acks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    subacks: tokio::sync::mpsc::UnboundedReceiver<rumqttc::SubAck>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connect and wait for the CONNACK; panics if refused.
pub async fn connect(opts: MqttOptions) -> Device {
    let (client, mut el) = AsyncClient::new(opts, 100);
    let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
    let (suback_tx, subacks) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let a = acks.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(ack.code));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let _ = suback_tx.send(ack);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(e.to_string()));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let code = tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("CONNACK within 10 s")
        .expect("event loop alive");
    assert_eq!(code, Ok(ConnectReturnCode::Success), "connect refused");
    Device {
        client,
        incoming,
        acks,
        subacks,
        task,
    }
}

impl Device {
    /// Subscribe and wait for the SUBACK; panics unless it grants the subscription. The
    /// gatekeeper relays rumqttd's SUBACK, and rumqttd sends it once the filter is in its
    /// router: a publish made after this returns reaches the subscriber.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let ack = tokio::time::timeout(Duration::from_secs(10), self.subacks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for `{filter}` within 10 s"))
            .expect("event loop alive");
        assert!(
            ack.return_codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            "subscription to `{filter}` refused: {ack:?}"
        );
    }

    /// Wait until at least `n` PUBACKs have arrived; panics after `timeout`.
    pub async fn wait_acks(&self, n: u64, timeout: Duration) {
        let r = tokio::time::timeout(timeout, async {
            while self.acks.load(std::sync::atomic::Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            r.is_ok(),
            "{} of {n} PUBACKs within {timeout:?}",
            self.acks.load(std::sync::atomic::Ordering::SeqCst)
        );
    }

    /// Wait for the next incoming publish.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(timeout, self.incoming.recv())
            .await
            .ok()
            .flatten()
    }
}

/// `<bin> run -c <config>` under the test's notify socket, logging text lines: no stdin,
/// stdout and stderr discarded. Callers change what they need (e.g. pipe stderr) and spawn.
pub fn daemon_command(bin: &str, config: &Path, notify: &NotifySocket) -> std::process::Command {
    use std::process::Stdio;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("run")
        .arg("-c")
        .arg(config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WARDGATE_LOG__FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A child process's stderr, read all the time on a thread (a full pipe would block the
/// daemon's logging) and searchable line by line as it arrives.
#[derive(Debug)]
pub struct Log {
    shared: std::sync::Arc<(std::sync::Mutex<LogState>, std::sync::Condvar)>,
    /// Byte offset past the last line [`Log::wait_for`] returned.
    cursor: usize,
}

#[derive(Debug, Default)]
struct LogState {
    text: String,
    closed: bool,
}

impl Log {
    /// Take `child`'s piped stderr and start reading it.
    pub fn capture(child: &mut std::process::Child) -> Log {
        use std::io::Read;
        let mut err = child
            .stderr
            .take()
            .expect("the child's stderr is piped (Stdio::piped())");
        let shared = std::sync::Arc::new((
            std::sync::Mutex::new(LogState::default()),
            std::sync::Condvar::new(),
        ));
        let sink = shared.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = err.read(&mut buf).unwrap_or(0);
                let mut st = sink.0.lock().unwrap();
                if n == 0 {
                    st.closed = true;
                } else {
                    st.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                sink.1.notify_all();
                if n == 0 {
                    return;
                }
            }
        });
        Log { shared, cursor: 0 }
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.shared.0.lock().unwrap().text.clone()
    }

    /// Wait for a complete line containing `needle` after the last line this returned; the
    /// line, or `None` after `timeout` or once the stream closed without one.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.shared;
        let mut st = lock.lock().unwrap();
        loop {
            let mut at = self.cursor;
            while let Some(end) = st.text[at..].find('\n') {
                let line = &st.text[at..at + end];
                if line.contains(needle) {
                    let line = line.to_owned();
                    self.cursor = at + end + 1;
                    return Some(line);
                }
                at += end + 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if st.closed || left.is_zero() {
                return None;
            }
            st = cond.wait_timeout(st, left).unwrap().0;
        }
    }

    /// Wait until the stream closed (the process and its children exited); false after
    /// `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let (lock, cond) = &*self.shared;
        let st = lock.lock().unwrap();
        let (st, _) = cond.wait_timeout_while(st, timeout, |s| !s.closed).unwrap();
        st.closed
    }
}

/// A systemd notify socket the test owns (`NOTIFY_SOCKET`).
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    /// Its path.
    pub path: std::path::PathBuf,
    seen: Vec<String>,
    /// Messages before this index belong to reloads already waited for.
    reload_cursor: usize,
}

impl NotifySocket {
    /// Bind a datagram socket under `dir`.
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            sock,
            path,
            seen: Vec::new(),
            reload_cursor: 0,
        }
    }

    /// Receive one message into `seen`, waiting at most the socket's 100 ms read timeout.
    fn receive_one(&mut self) {
        let mut buf = vec![0u8; 4096];
        if let Ok(n) = self.sock.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// Wait until the daemon has finished a reload: `RELOADING=1` in a message after the last
    /// reload waited for, then `READY=1` in a later one (sent once the new configuration is in
    /// force or was rejected). False after `timeout`.
    pub fn reloaded(&mut self, timeout: Duration) -> bool {
        let has = |m: &String, line: &str| m.lines().any(|l| l == line);
        let deadline = Instant::now() + timeout;
        loop {
            let from = self.reload_cursor.min(self.seen.len());
            if let Some(r) = self.seen[from..].iter().position(|m| has(m, "RELOADING=1")) {
                let after = from + r + 1;
                if let Some(k) = self.seen[after..].iter().position(|m| has(m, "READY=1")) {
                    self.reload_cursor = after + k + 1;
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.receive_one();
        }
    }

    /// Wait until `n` messages containing `line` have arrived in all; returns how many did
    /// within `timeout`.
    pub fn wait_count(&mut self, line: &str, n: usize, timeout: Duration) -> usize {
        let count = |seen: &[String]| seen.iter().filter(|m| m.lines().any(|l| l == line)).count();
        let deadline = Instant::now() + timeout;
        while count(&self.seen) < n && Instant::now() < deadline {
            self.receive_one();
        }
        count(&self.seen)
    }

    /// Wait until a message containing `line` (e.g. `READY=1`) arrives; returns that message.
    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> Option<String> {
        if let Some(m) = self.seen.iter().find(|m| m.lines().any(|l| l == line)) {
            return Some(m.clone());
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.lines().any(|l| l == line) {
                    return Some(msg);
                }
            }
        }
        None
    }

    /// Every message received so far (reads only what is already queued).
    pub fn drain(&mut self) -> &[String] {
        let mut buf = vec![0u8; 4096];
        self.sock.set_nonblocking(true).unwrap();
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.sock.set_nonblocking(false).unwrap();
        &self.seen
    }
}

/// The `plain=ADDR` address out of a READY notification's `STATUS=` line.
pub fn plain_addr_from_status(msg: &str) -> Option<SocketAddr> {
    listener_addr_from_status(msg, "plain")
}

/// The `NAME=ADDR` address out of a READY notification's `STATUS=` line.
pub fn listener_addr_from_status(msg: &str, name: &str) -> Option<SocketAddr> {
    let prefix = format!("{name}=");
    msg.lines()
        .find_map(|l| l.strip_prefix("STATUS="))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))?
        .trim_end_matches(';')
        .parse()
        .ok()
}

/// A broker plus one gatekeeper listener, built from the library's parts, whose pipeline end
/// the test holds.
pub struct Rig {
    /// The device listener.
    pub addr: SocketAddr,
    /// The internal broker.
    pub broker_addr: SocketAddr,
    /// Readings, already confirmed (auto-confirm mode).
    pub ingest: Option<tokio::sync::mpsc::UnboundedReceiver<wardgate::pipeline::Ingest>>,
    /// The raw ingest channel: nothing is confirmed until the test does it (manual mode).
    pub raw: Option<tokio::sync::mpsc::Receiver<wardgate::pipeline::Ingest>>,
    /// The meters.
    pub metering: wardgate::metering::Metering,
    /// TLS state, to reload.
    pub tls: Option<std::sync::Arc<wardgate::gatekeeper::TlsState>>,
    task: tokio::task::JoinHandle<()>,
    pump: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Rig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rig").field("addr", &self.addr).finish()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.pump {
            p.abort();
        }
    }
}

/// How to build a [`Rig`].
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// Registered devices.
    pub devices: Vec<DeviceConfig>,
    /// TLS listener files; `None` for a plain listener.
    pub tls: Option<wardgate::config::TlsListenerConfig>,
    /// Connection limits.
    pub limits: wardgate::config::LimitsConfig,
    /// Accept limits.
    pub accept: wardgate::gatekeeper::ListenerLimits,
    /// Ingest channel capacity.
    pub capacity: usize,
    /// Confirm every reading as it arrives (false: the test holds `raw`).
    pub auto_confirm: bool,
}

impl RigOptions {
    /// Plain listener, default limits, auto-confirm.
    pub fn new(devices: Vec<DeviceConfig>) -> Self {
        Self {
            devices,
            tls: None,
            limits: Default::default(),
            accept: wardgate::gatekeeper::ListenerLimits {
                connect_timeout: Duration::from_secs(2),
                max_connections: 1024,
                max_connections_per_address: 1024,
            },
            capacity: 64,
            auto_confirm: true,
        }
    }
}

impl Rig {
    /// Start the broker and the listener on `127.0.0.1:0`.
    pub async fn start(o: RigOptions) -> Rig {
        use wardgate::gatekeeper::{Gatekeeper, Shared, TlsState, Transport};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), o.devices.clone());
        let broker = wardgate::broker::start(&cfg.broker, &o.limits)
            .await
            .expect("broker starts");
        let (tx, rx) = tokio::sync::mpsc::channel(o.capacity);
        let metering = wardgate::metering::Metering::new(Duration::from_secs(300), 4);
        let tls = o
            .tls
            .as_ref()
            .map(|t| std::sync::Arc::new(TlsState::new(t).expect("TLS material loads")));
        let transport = match &tls {
            Some(t) => Transport::Tls(t.clone()),
            None => Transport::Plain,
        };
        let gk = Gatekeeper::bind(
            if tls.is_some() { "tls" } else { "plain" },
            SocketAddr::from(([127, 0, 0, 1], 0)),
            transport,
            o.accept.clone(),
            Shared {
                registry: wardgate::registry::SharedRegistry::new(
                    wardgate::registry::Registry::from_config(&cfg.devices, &cfg.policy),
                ),
                login: wardgate::gatekeeper::login::LoginGate::new(&cfg.login)
                    .expect("password-check threads start"),
                broker: broker.clone(),
                ingest: tx.into(),
                metering: metering.clone(),
                limits: o.limits.clone().into(),
                sessions: Default::default(),
                quarantine: Default::default(),
            },
        )
        .await
        .unwrap();
        let addr = gk.local_addr().unwrap();
        let task = tokio::spawn(gk.run(tokio_util::sync::CancellationToken::new()));
        let (ingest, raw, pump) = if o.auto_confirm {
            let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut rx = rx;
            let pump = tokio::spawn(async move {
                while let Some(mut m) = rx.recv().await {
                    if let Some(a) = m.ack.take() {
                        a.confirm();
                    }
                    let _ = seen_tx.send(m);
                }
            });
            (Some(seen_rx), None, Some(pump))
        } else {
            (None, Some(rx), None)
        };
        Rig {
            addr,
            broker_addr: broker.addr(),
            ingest,
            raw,
            metering,
            tls,
            task,
            pump,
            _dir: dir,
        }
    }

    /// Next confirmed reading (auto-confirm mode).
    pub async fn next_reading(&mut self, timeout: Duration) -> Option<wardgate::pipeline::Ingest> {
        let rx = self.ingest.as_mut().expect("auto-confirm rig");
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }
}

pub mod pki;
pub mod upstream;
pub mod webhook;

/// A hand-driven MQTT client over any stream: exact control of every byte sent.
#[derive(Debug)]
pub struct Raw<S> {
    /// The stream.
    pub stream: S,
    buf: bytes::BytesMut,
    /// Bytes written so far.
    pub sent_bytes: usize,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    /// Wrap a connected stream.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: bytes::BytesMut::new(),
            sent_bytes: 0,
        }
    }

    /// Send one packet.
    pub async fn send(&mut self, p: &rumqttc::mqttbytes::v4::Packet) -> std::io::Result<()> {
        wardgate::mqtt::write_packet(&mut self.stream, p, 1 << 20).await?;
        self.sent_bytes += p.size();
        Ok(())
    }

    /// Next packet; `Ok(None)` when the peer closed, `Err` on timeout or garbage.
    pub async fn recv(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<rumqttc::mqttbytes::v4::Packet>, String> {
        match tokio::time::timeout(
            timeout,
            wardgate::mqtt::read_packet(&mut self.stream, &mut self.buf, 1 << 20),
        )
        .await
        {
            Err(_) => Err("timed out".into()),
            Ok(Ok(p)) => Ok(p),
            // A reset or TLS alert is the peer closing on us.
            Ok(Err(wardgate::mqtt::FrameError::Io(_))) => Ok(None),
            Ok(Err(e)) => Err(e.to_string()),
        }
    }

    /// CONNECT as `id` and return the CONNACK code (`None` if the connection closed instead).
    pub async fn connect(
        &mut self,
        id: &str,
        password: Option<&str>,
    ) -> Option<rumqttc::mqttbytes::v4::ConnectReturnCode> {
        let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
        c.keep_alive = 60;
        if let Some(p) = password {
            c.login = Some(rumqttc::mqttbytes::v4::Login::new(id, p));
        }
        if self
            .send(&rumqttc::mqttbytes::v4::Packet::Connect(c))
            .await
            .is_err()
        {
            return None;
        }
        match self.recv(Duration::from_secs(10)).await {
            Ok(Some(rumqttc::mqttbytes::v4::Packet::ConnAck(a))) => Some(a.code),
            _ => None,
        }
    }

    /// Whether the peer closes the connection within `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.recv(left).await {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(e) if e == "timed out" => return false,
                Err(_) => return true,
            }
        }
    }
}

/// `method path` on the gateway's HTTP endpoint at `addr` (`Connection: close`): the status
/// code and the body. Plain HTTP/1.1 over a std socket, so a test can use it from any thread.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// `GET path` on the gateway's HTTP endpoint; panics when it cannot be asked.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}
