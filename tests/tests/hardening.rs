//! The gatekeeper under hostile or careless clients: logins that cannot exhaust memory, Wills
//! that obey the publish policy, CONNECTs that break MQTT 3.1.1's rules, and log lines that a
//! device cannot forge. Every test runs the real gateway (in process, or the binary) on
//! 127.0.0.1:0 with real MQTT bytes on the wire.

use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, LastWill, Login, Packet, Publish, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::QoS;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use wardgate::app::Gateway;
use wardgate::config::DeviceConfig;
use wardgate_tests::{config, device, Raw};

const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    wardgate::clock::epoch_ms(std::time::SystemTime::now())
}

/// A pacemaker reading stamped now.
fn reading(hr: u32) -> String {
    format!(r#"{{"heartbeat":{hr},"ts":{}}}"#, now_ms())
}

/// A nurse-station display that may read every device's alarms and readings.
fn display(id: &str) -> DeviceConfig {
    let mut d = device(id, "display", "pw");
    d.publish = Some(vec![]);
    d.subscribe = Some(vec!["ward/+/alarm".into(), "ward/+/readings".into()]);
    d
}

async fn raw(addr: SocketAddr) -> Raw<TcpStream> {
    Raw::new(
        TcpStream::connect(addr)
            .await
            .expect("connect to the listener"),
    )
}

/// CONNECT `id` with `password` and an optional Will; the CONNACK code (`None`: closed).
async fn connect_with_will(
    addr: SocketAddr,
    id: &str,
    password: &str,
    will: Option<LastWill>,
) -> (Raw<TcpStream>, Option<ConnectReturnCode>) {
    let mut r = raw(addr).await;
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c.login = Some(Login::new(id, password));
    c.last_will = will;
    r.send(&Packet::Connect(c)).await.expect("send CONNECT");
    let code = match r.recv(WAIT).await {
        Ok(Some(Packet::ConnAck(a))) => Some(a.code),
        _ => None,
    };
    (r, code)
}

/// Connect the display and subscribe to `filter`, waiting for its SUBACK.
async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> Raw<TcpStream> {
    let (mut r, code) = connect_with_will(addr, id, "pw", None).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let mut sub = Subscribe::new_many([SubscribeFilter::new(filter.into(), QoS::AtLeastOnce)]);
    sub.pkid = 1;
    r.send(&Packet::Subscribe(sub)).await.unwrap();
    loop {
        match r.recv(WAIT).await {
            Ok(Some(Packet::SubAck(a))) => {
                assert!(
                    a.return_codes.iter().all(|c| !matches!(
                        c,
                        rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure
                    )),
                    "subscription to {filter} refused"
                );
                return r;
            }
            Ok(Some(_)) => {}
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    }
}

/// The next PUBLISH a raw client receives (PUBACKing QoS 1 ones).
async fn next_publish(r: &mut Raw<TcpStream>) -> Publish {
    loop {
        match r.recv(WAIT).await {
            Ok(Some(Packet::Publish(p))) => {
                if p.qos == QoS::AtLeastOnce {
                    r.send(&Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid)))
                        .await
                        .unwrap();
                }
                return p;
            }
            Ok(Some(_)) => {}
            other => panic!("no PUBLISH arrived: {other:?}"),
        }
    }
}

/// Publish one QoS 1 message and wait for its PUBACK.
async fn publish_acked(r: &mut Raw<TcpStream>, topic: &str, payload: &str, pkid: u16) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
    p.pkid = pkid;
    r.send(&Packet::Publish(p)).await.unwrap();
    loop {
        match r.recv(WAIT).await {
            Ok(Some(Packet::PubAck(a))) if a.pkid == pkid => return,
            Ok(Some(_)) => {}
            other => panic!("no PUBACK for {topic}: {other:?}"),
        }
    }
}

async fn gateway(devices: Vec<DeviceConfig>) -> (Gateway, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), devices);
    let gw = Gateway::start(&cfg).await.expect("gateway starts");
    let addr = gw.listener_addr("plain").unwrap();
    (gw, addr, dir)
}

#[tokio::test]
async fn a_will_on_another_devices_topic_is_refused_at_connect_and_never_published() {
    let (gw, addr, _dir) = gateway(vec![
        device("pm-a", "pacemaker", "pw-a"),
        device("pm-b", "pacemaker", "pw-b"),
        display("nurse-1"),
    ])
    .await;
    // Device A tries to leave a retained QoS 1 alarm on B's topic behind.
    let forged = LastWill::new("ward/pm-b/alarm", reading(190), QoS::AtLeastOnce, true);
    let (mut a, code) = connect_with_will(addr, "pm-a", "pw-a", Some(forged)).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    assert!(a.closed_within(WAIT).await, "refused connection stays open");
    drop(a);
    let meter = gw.metering().snapshot_of("pm-a").unwrap();
    assert_eq!(meter.totals.authorization_failures, 1);
    assert_eq!(meter.totals.connection_failures, 1);
    assert!(!meter.connected);

    // Nothing was retained on B's topic: the first message a new subscriber gets is B's own.
    let mut nurse = subscriber(addr, "nurse-1", "ward/pm-b/alarm").await;
    let (mut b, code) = connect_with_will(addr, "pm-b", "pw-b", None).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let genuine = reading(150);
    publish_acked(&mut b, "ward/pm-b/alarm", &genuine, 1).await;
    let first = next_publish(&mut nurse).await;
    assert_eq!(first.topic, "ward/pm-b/alarm");
    assert_eq!(
        first.payload.as_ref(),
        genuine.as_bytes(),
        "a forged Will arrived first"
    );
    assert!(!first.retain);
    assert_eq!(gw.stats().device("pm-a").messages, 0);
    let _ = gw.stop(WAIT).await;
}

#[tokio::test]
async fn a_will_within_policy_fires_through_the_pipeline_when_the_connection_drops() {
    let (gw, addr, _dir) = gateway(vec![
        device("pm-a", "pacemaker", "pw-a"),
        device("pm-c", "pacemaker", "pw-c"),
        display("nurse-1"),
        display("nurse-2"),
    ])
    .await;
    let mut nurse = subscriber(addr, "nurse-1", "ward/pm-a/alarm").await;
    let will_payload = reading(35);
    let will = LastWill::new(
        "ward/pm-a/alarm",
        will_payload.clone(),
        QoS::AtLeastOnce,
        true,
    );
    let (a, code) = connect_with_will(addr, "pm-a", "pw-a", Some(will)).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    // The TCP connection drops without DISCONNECT.
    drop(a);
    let fired = next_publish(&mut nurse).await;
    assert_eq!(fired.topic, "ward/pm-a/alarm");
    assert_eq!(fired.payload.as_ref(), will_payload.as_bytes());
    // It went through the pipeline (plugin: one canonical reading) and the meter.
    let deadline = tokio::time::Instant::now() + WAIT;
    while gw.stats().device("pm-a").readings == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Will never reached the pipeline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counts = gw.stats().device("pm-a");
    assert_eq!(
        (counts.messages, counts.readings, counts.dead_letters),
        (1, 1, 0)
    );
    assert_eq!(
        gw.metering()
            .snapshot_of("pm-a")
            .unwrap()
            .totals
            .messages_sent,
        1
    );
    // Retained as the device asked: a later subscriber gets it at once.
    let mut late = subscriber(addr, "nurse-2", "ward/pm-a/alarm").await;
    let retained = next_publish(&mut late).await;
    assert!(retained.retain);
    assert_eq!(retained.payload.as_ref(), will_payload.as_bytes());

    // A DISCONNECT does not fire the Will: C's next message is the first anyone sees.
    let mut watch = subscriber(addr, "nurse-1", "ward/pm-c/alarm").await;
    let quiet = LastWill::new("ward/pm-c/alarm", reading(36), QoS::AtLeastOnce, false);
    let (mut c, code) = connect_with_will(addr, "pm-c", "pw-c", Some(quiet)).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    c.send(&Packet::Disconnect).await.unwrap();
    assert!(c.closed_within(WAIT).await);
    let (mut c, _) = connect_with_will(addr, "pm-c", "pw-c", None).await;
    let sentinel = reading(80);
    publish_acked(&mut c, "ward/pm-c/alarm", &sentinel, 7).await;
    let first = next_publish(&mut watch).await;
    assert_eq!(
        first.payload.as_ref(),
        sentinel.as_bytes(),
        "a Will fired on DISCONNECT"
    );
    let _ = gw.stop(WAIT).await;
}

/// VmRSS of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// One CONNECT with `id`/`password`: its CONNACK code (`None`: closed without one).
async fn login(addr: SocketAddr, id: &str, password: &str) -> Option<ConnectReturnCode> {
    connect_with_will(addr, id, password, None).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_wrong_passwords_keeps_memory_bounded() {
    // Real argon2 cost (19 MiB per check), as the registry's dummy hash has.
    let (gw, addr, _dir) = gateway(vec![DeviceConfig::with_password(
        "pm-a",
        "pacemaker",
        wardgate::registry::hash_password("right"),
    )])
    .await;
    assert_eq!(
        login(addr, "pm-a", "right").await,
        Some(ConnectReturnCode::Success)
    );
    let before = rss_kib();
    let mut peak = before;
    for round in 0..3 {
        let tries: Vec<_> = (0..60)
            .map(|i| {
                tokio::spawn(
                    async move { login(addr, &format!("intruder-{round}-{i}"), "wrong").await },
                )
            })
            .collect();
        for t in tries {
            let code = t.await.unwrap();
            assert!(
                matches!(
                    code,
                    Some(ConnectReturnCode::NotAuthorized | ConnectReturnCode::ServiceUnavailable)
                ),
                "a wrong password got {code:?}"
            );
        }
        peak = peak.max(rss_kib());
    }
    let grown_mib = (peak.saturating_sub(before)) / 1024;
    // Before the pool, each round added about 1.1 GiB; the pool holds one argon2 area per
    // thread. The bound is generous on purpose: it is about gigabytes, not megabytes.
    assert!(
        grown_mib < 256,
        "RSS grew by {grown_mib} MiB over three rounds of 60 wrong passwords"
    );
    let s = gw.login().counters().snapshot();
    assert_eq!(s.checks + s.refused_pending + s.refused_rate, 181, "{s:?}");
    let _ = gw.stop(WAIT).await;
}

#[tokio::test]
async fn logins_over_the_bounds_get_server_unavailable_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), vec![device("pm-a", "pacemaker", "pw")]);
    cfg.login.argon2_threads = 1;
    cfg.login.max_pending = 2;
    cfg.login.max_pending_per_address = 2;
    let gw = Gateway::start(&cfg).await.unwrap();
    let addr = gw.listener_addr("plain").unwrap();
    let tries: Vec<_> = (0..24)
        .map(|i| tokio::spawn(async move { login(addr, &format!("x-{i}"), "wrong").await }))
        .collect();
    let mut codes = Vec::new();
    for t in tries {
        codes.push(t.await.unwrap());
    }
    let busy = codes
        .iter()
        .filter(|c| **c == Some(ConnectReturnCode::ServiceUnavailable))
        .count();
    let refused = codes
        .iter()
        .filter(|c| **c == Some(ConnectReturnCode::NotAuthorized))
        .count();
    assert_eq!(busy + refused, 24, "{codes:?}");
    assert!(
        busy > 0,
        "24 parallel logins against 2 slots were all checked: {codes:?}"
    );
    let s = gw.login().counters().snapshot();
    assert_eq!(s.refused_pending as usize, busy);
    assert_eq!(s.checks as usize, refused);
    // The bounds hold back only password checks: the device itself still gets in.
    assert_eq!(
        login(addr, "pm-a", "pw").await,
        Some(ConnectReturnCode::Success)
    );
    let _ = gw.stop(WAIT).await;
}

#[tokio::test]
async fn a_reconnect_is_answered_by_the_credential_cache_until_it_is_emptied() {
    let (gw, addr, _dir) = gateway(vec![device("pm-a", "pacemaker", "pw")]).await;
    let checks = || gw.login().counters().snapshot();
    assert_eq!(
        login(addr, "pm-a", "pw").await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!((checks().checks, checks().cache_hits), (1, 0));
    assert_eq!(
        login(addr, "pm-a", "pw").await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!(
        (checks().checks, checks().cache_hits),
        (1, 1),
        "a reconnect paid argon2 again"
    );
    // A wrong password is never answered by the cache.
    assert_eq!(
        login(addr, "pm-a", "nope").await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(checks().checks, 2);
    assert_eq!(gw.login().clear_cache(), 1);
    assert_eq!(
        login(addr, "pm-a", "pw").await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!((checks().checks, checks().cache_hits), (3, 1));
    let _ = gw.stop(WAIT).await;
}

/// The bytes of an MQTT 5.0 CONNECT for `id` (no properties, clean start).
fn mqtt5_connect(id: &str) -> Vec<u8> {
    let mut v = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02, 0x00, 0x3c, 0x00,
    ];
    v.extend((id.len() as u16).to_be_bytes());
    v.extend(id.as_bytes());
    let mut frame = vec![0x10, v.len() as u8];
    frame.extend(v);
    frame
}

#[tokio::test]
async fn an_mqtt5_connect_gets_unacceptable_protocol_version() {
    use tokio::io::AsyncWriteExt;
    let (gw, addr, _dir) = gateway(vec![device("pm-a", "pacemaker", "pw")]).await;
    let mut r = raw(addr).await;
    r.stream.write_all(&mqtt5_connect("pm-a")).await.unwrap();
    match r.recv(WAIT).await {
        Ok(Some(Packet::ConnAck(a))) => {
            assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }
    assert!(r.closed_within(WAIT).await);
    let _ = gw.stop(WAIT).await;
}

#[tokio::test]
async fn a_connect_with_the_reserved_flag_set_is_closed_without_connack() {
    use tokio::io::AsyncWriteExt;
    let (gw, addr, _dir) = gateway(vec![device("pm-a", "pacemaker", "pw")]).await;
    let mut c = Connect::new("pm-a");
    c.login = Some(Login::new("pm-a", "pw"));
    let mut bytes = bytes::BytesMut::new();
    wardgate::mqtt::encode(&Packet::Connect(c), &mut bytes, 1 << 16).unwrap();
    // Connect flags: fixed header (2) + protocol name (6) + level (1).
    bytes[9] |= 0x01;
    let mut r = raw(addr).await;
    r.stream.write_all(&bytes).await.unwrap();
    match r.recv(WAIT).await {
        Ok(None) => {}
        Err(e) if e != "timed out" => {}
        other => panic!("expected the connection to close without CONNACK, got {other:?}"),
    }
    assert_eq!(
        gw.metering()
            .gateway()
            .snapshot()
            .connections_closed_before_connect,
        1
    );
    assert!(!gw
        .metering()
        .snapshot_of("pm-a")
        .is_some_and(|m| m.connected));
    let _ = gw.stop(WAIT).await;
}

/// The daemon binary with its stderr log readable line by line.
struct Daemon {
    child: std::process::Child,
    log: wardgate_tests::Log,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(devices: Vec<DeviceConfig>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("state"), devices);
        let conf = dir.path().join("wardgate.toml");
        std::fs::write(&conf, wardgate_tests::config_toml(&cfg)).unwrap();
        let mut notify = wardgate_tests::NotifySocket::bind(dir.path());
        let mut child = wardgate_tests::daemon_command(
            env!("CARGO_BIN_EXE_wardgate-under-test"),
            &conf,
            &notify,
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let log = wardgate_tests::Log::capture(&mut child);
        let ready = notify.wait_for("READY=1", WAIT).expect("READY=1");
        let addr = wardgate_tests::plain_addr_from_status(&ready).expect("plain listener address");
        Daemon {
            child,
            log,
            addr,
            _dir: dir,
        }
    }

    /// The next log line containing `needle`.
    fn until(&mut self, needle: &str) -> String {
        match self.log.wait_for(needle, WAIT) {
            Some(line) => line,
            None => panic!("no log line with `{needle}`; saw:\n{}", self.log.text()),
        }
    }
}

#[tokio::test]
async fn a_topic_with_a_newline_or_nul_cannot_forge_a_log_line() {
    let mut d = Daemon::start(vec![device("pm-a", "pacemaker", "pw")]);
    let (mut a, code) = connect_with_will(d.addr, "pm-a", "pw", None).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let forged = "ward/pm-a/telemetry\n2026-12-01T00:00:00.000Z ERROR gatekeeper: FORGED\u{0}";
    let mut p = Publish::new(forged, QoS::AtLeastOnce, reading(70).into_bytes());
    p.pkid = 1;
    a.send(&Packet::Publish(p)).await.unwrap();
    assert!(
        a.closed_within(WAIT).await,
        "a topic with a NUL disconnects"
    );
    let line = d.until("FORGED");
    assert!(
        line.contains("device disconnected"),
        "the refusal names the topic: {line}"
    );
    assert!(
        line.contains("\\n2026-12-01T00:00:00.000Z"),
        "newline escaped: {line}"
    );
    assert!(line.contains("\\u{0}"), "NUL escaped: {line}");
    // Every line of the log so far: none forged, no raw NUL.
    let log = d.log.text();
    assert!(!log.contains('\0'), "a raw NUL reached the log: {log:?}");
    for l in log.lines() {
        assert!(
            !l.starts_with("2026-12-01T00:00:00.000Z"),
            "a forged line: {l:?}"
        );
    }
}

/// Log in as `id` on the daemon and return the "device connected" line it logged. (Matched
/// by its `credential_cache` field: the line that ends an older connection of the same
/// device, "the same device connected again", may come first.)
async fn logged_login(d: &mut Daemon, id: &str, password: &str) -> String {
    assert_eq!(
        login(d.addr, id, password).await,
        Some(ConnectReturnCode::Success)
    );
    d.until("credential_cache=")
}

#[tokio::test]
async fn reload_empties_the_credential_cache() {
    let mut d = Daemon::start(vec![device("pm-a", "pacemaker", "pw")]);
    let line = logged_login(&mut d, "pm-a", "pw").await;
    assert!(line.contains("credential_cache=miss"), "{line}");
    let line = logged_login(&mut d, "pm-a", "pw").await;
    assert!(line.contains("credential_cache=hit"), "{line}");
    assert!(line.contains("auth=password"), "{line}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let line = d.until("credential cache emptied");
    assert!(line.contains("credentials_forgotten=1"), "{line}");
    d.until("configuration reloaded");
    let line = logged_login(&mut d, "pm-a", "pw").await;
    assert!(line.contains("credential_cache=miss"), "{line}");
}
