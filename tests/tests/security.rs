//! Device security: mutual TLS identities, deny-by-default topic policy, connection limits,
//! metering, and acknowledging only what the pipeline confirmed. Real TLS (rustls, rcgen
//! certificates), real rumqttd, loopback only.

use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use wardgate::config::{AuthMode, DeviceConfig, LimitsConfig};
use wardgate_tests::pki::{tls_connect, Ca, ListenerFiles};
use wardgate_tests::{device, Raw, Rig, RigOptions};

fn cert_device(id: &str) -> DeviceConfig {
    let mut d = device(id, "pacemaker", "unused");
    d.password_hash = None;
    d.auth = Some(AuthMode::Certificate);
    d
}

struct TlsRig {
    rig: Rig,
    ca: Ca,
    other_ca: Ca,
    second_ca: Ca,
    revoked: wardgate_tests::pki::Issued,
    _dir: tempfile::TempDir,
}

async fn tls_rig(accept: Option<wardgate::gatekeeper::ListenerLimits>) -> TlsRig {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::new("Ward 7 CA");
    let second_ca = Ca::new("Ward 7 CA (2027)");
    let other_ca = Ca::new("Somebody else's CA");
    let server = ca.server();
    let revoked = ca.device("pm-revoked");
    let files = ListenerFiles::write(
        dir.path(),
        &server,
        &[&ca, &second_ca],
        &ca.crl(&[revoked.serial]),
    );
    let mut both = device("gl-both", "glucose", "gl-pw");
    both.auth = Some(AuthMode::Both);
    let mut o = RigOptions::new(vec![
        cert_device("pm-01"),
        cert_device("pm-02"),
        cert_device("pm-revoked"),
        device("legacy-01", "bed-temperature", "legacy-pw"),
        both,
    ]);
    o.tls = Some(files.config());
    if let Some(a) = accept {
        o.accept = a;
    }
    TlsRig {
        rig: Rig::start(o).await,
        ca,
        other_ca,
        second_ca,
        revoked,
        _dir: dir,
    }
}

/// Connect over TLS with `client` and CONNECT as `id`; the CONNACK code, or None when the TLS
/// layer or the gateway closed the connection first.
async fn tls_login(
    t: &TlsRig,
    client: Option<&wardgate_tests::pki::Issued>,
    id: &str,
    password: Option<&str>,
) -> Option<ConnectReturnCode> {
    let (stream, _) = tls_connect(t.rig.addr, &t.ca, client).await.ok()?;
    Raw::new(stream).connect(id, password).await
}

#[tokio::test]
async fn mutual_tls_identities_and_refusals() {
    let mut t = tls_rig(None).await;
    let good = t.ca.device("pm-01");
    // A device with a certificate from the ward CA gets in, and its reading carries its id.
    let (stream, _) = tls_connect(t.rig.addr, &t.ca, Some(&good)).await.unwrap();
    let mut raw = Raw::new(stream);
    assert_eq!(
        raw.connect("pm-01", None).await,
        Some(ConnectReturnCode::Success)
    );
    let mut p = Publish::new(
        "ward/pm-01/telemetry",
        QoS::AtLeastOnce,
        b"{\"heartbeat\":90}".to_vec(),
    );
    p.pkid = 1;
    raw.send(&Packet::Publish(p)).await.unwrap();
    let r = t
        .rig
        .next_reading(Duration::from_secs(5))
        .await
        .expect("reading");
    assert_eq!(&*r.device.id, "pm-01");
    assert_eq!(
        raw.recv(Duration::from_secs(5)).await,
        Ok(Some(Packet::PubAck(PubAck::new(1))))
    );

    // Every CA in the bundle is trusted.
    let mut second = t.second_ca;
    let from_second = second.device("pm-02");
    t.second_ca = second;
    assert_eq!(
        tls_login(&t, Some(&from_second), "pm-02", None).await,
        Some(ConnectReturnCode::Success)
    );

    // A certificate from another CA, an expired one and a revoked one: no CONNACK at all.
    let foreign = t.other_ca.device("pm-01");
    assert_eq!(
        tls_login(&t, Some(&foreign), "pm-01", None).await,
        None,
        "foreign CA"
    );
    let expired = t.ca.expired_device("pm-01");
    assert_eq!(
        tls_login(&t, Some(&expired), "pm-01", None).await,
        None,
        "expired"
    );
    let revoked = t.revoked.clone();
    assert_eq!(
        tls_login(&t, Some(&revoked), "pm-revoked", None).await,
        None,
        "revoked"
    );

    // The identity may also be a SAN (here with a CN that is just a label).
    let by_san = t.ca.device_by_san("Acme Cardio serial 7731", "pm-02");
    assert_eq!(
        tls_login(&t, Some(&by_san), "pm-02", None).await,
        Some(ConnectReturnCode::Success)
    );

    // A valid certificate for pm-01 cannot log in as pm-02.
    assert_eq!(
        tls_login(&t, Some(&good), "pm-02", None).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    // A certificate device cannot fall back to a password.
    assert_eq!(
        tls_login(&t, None, "pm-01", Some("anything")).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    // A password device may use TLS without a certificate; a `both` device needs both.
    assert_eq!(
        tls_login(&t, None, "legacy-01", Some("legacy-pw")).await,
        Some(ConnectReturnCode::Success)
    );
    let gl = t.ca.device("gl-both");
    assert_eq!(
        tls_login(&t, None, "gl-both", Some("gl-pw")).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        tls_login(&t, Some(&gl), "gl-both", Some("gl-pw")).await,
        Some(ConnectReturnCode::Success)
    );
    let gw = t.rig.metering.gateway().snapshot();
    assert!(gw.tls_handshake_failures >= 3, "{gw:?}");
}

#[tokio::test]
async fn stalled_handshakes_do_not_delay_a_good_device() {
    let accept = wardgate::gatekeeper::ListenerLimits {
        connect_timeout: Duration::from_secs(30),
        max_connections: 2048,
        max_connections_per_address: 2048,
    };
    let mut t = tls_rig(Some(accept)).await;
    let mut stalled = Vec::new();
    for _ in 0..500 {
        stalled.push(TcpStream::connect(t.rig.addr).await.unwrap());
    }
    // The listener accepts in arrival order, so the good device queues behind all 500. Were a
    // stalled handshake awaited in the accept loop, it would wait out their 30 s connect
    // timeout; served beside them it gets in well within 10 s.
    let good = t.ca.device("pm-01");
    let started = Instant::now();
    let code = tokio::time::timeout(
        Duration::from_secs(10),
        tls_login(&t, Some(&good), "pm-01", None),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "good device still waiting after {:?} behind 500 stalled clients",
            started.elapsed()
        )
    });
    assert_eq!(code, Some(ConnectReturnCode::Success));
    let _ = &mut t;
    drop(stalled);
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let mut o = RigOptions::new(vec![device("pm-01", "pacemaker", "pw")]);
    o.accept.max_connections_per_address = 3;
    let rig = Rig::start(o).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Raw::new(TcpStream::connect(rig.addr).await.unwrap()));
    }
    // Accepted in arrival order: the 4th finds three slots taken.
    let mut fourth = Raw::new(TcpStream::connect(rig.addr).await.unwrap());
    assert!(
        fourth.closed_within(Duration::from_secs(2)).await,
        "4th connection from one address"
    );
    assert_eq!(rig.metering.gateway().snapshot().connections_over_limit, 1);
    // Closing the three frees their slots: each counts as closed before CONNECT as its task
    // ends, right before it gives its slot back.
    drop(open);
    until(
        Duration::from_secs(10),
        "the three closed connections counted",
        || {
            rig.metering
                .gateway()
                .snapshot()
                .connections_closed_before_connect
                == 3
        },
    )
    .await;
    let mut again = Raw::new(TcpStream::connect(rig.addr).await.unwrap());
    assert_eq!(
        again.connect("pm-01", Some("pw")).await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!(rig.metering.gateway().snapshot().connections_over_limit, 1);
}

/// Wait until `done()` holds; panics with `what` after `timeout`.
async fn until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn plain(rig: &Rig, id: &str, pw: &str) -> Raw<TcpStream> {
    let mut r = Raw::new(TcpStream::connect(rig.addr).await.unwrap());
    assert_eq!(
        r.connect(id, Some(pw)).await,
        Some(ConnectReturnCode::Success)
    );
    r
}

fn publish(topic: &str, pkid: u16, payload: &[u8]) -> Packet {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    p.pkid = pkid;
    Packet::Publish(p)
}

#[tokio::test]
async fn publishing_to_another_devices_topic_disconnects_and_counts_once() {
    let mut rig = Rig::start(RigOptions::new(vec![
        device("pm-a", "pacemaker", "a"),
        device("pm-b", "pacemaker", "b"),
    ]))
    .await;
    let mut a = plain(&rig, "pm-a", "a").await;
    let mut b = plain(&rig, "pm-b", "b").await;
    a.send(&publish("ward/pm-b/telemetry", 1, b"spoof"))
        .await
        .unwrap();
    assert!(
        a.closed_within(Duration::from_secs(5)).await,
        "A is disconnected"
    );

    // B is unaffected: its own reading flows and is acknowledged.
    b.send(&publish("ward/pm-b/telemetry", 1, b"real"))
        .await
        .unwrap();
    let r = rig
        .next_reading(Duration::from_secs(5))
        .await
        .expect("B's reading");
    assert_eq!(&*r.device.id, "pm-b");
    assert_eq!(&r.payload[..], b"real");
    assert_eq!(
        b.recv(Duration::from_secs(5)).await,
        Ok(Some(Packet::PubAck(PubAck::new(1))))
    );
    // The spoofed reading never reached the pipeline.
    assert!(rig.next_reading(Duration::from_millis(300)).await.is_none());

    // A's connection task counts its end as it finishes.
    until(Duration::from_secs(10), "A's disconnect counted", || {
        rig.metering
            .snapshot_of("pm-a")
            .is_some_and(|s| s.totals.disconnects == 1)
    })
    .await;
    let sa = rig.metering.snapshot_of("pm-a").unwrap();
    assert_eq!(sa.totals.authorization_failures, 1);
    assert_eq!(sa.totals.messages_sent, 0);
    assert_eq!(sa.totals.disconnects, 1);
    let sb = rig.metering.snapshot_of("pm-b").unwrap();
    assert_eq!(sb.totals.authorization_failures, 0);
    assert!(sb.connected);
}

#[tokio::test]
async fn subscribing_to_everything_or_sys_is_refused() {
    let rig = Rig::start(RigOptions::new(vec![device("pm-a", "pacemaker", "a")])).await;
    let mut a = plain(&rig, "pm-a", "a").await;
    let mut s = Subscribe::new("#", QoS::AtLeastOnce);
    s.add("ward/pm-a/#".into(), QoS::AtLeastOnce);
    s.add("$SYS/#".into(), QoS::AtMostOnce);
    s.pkid = 9;
    a.send(&Packet::Subscribe(s)).await.unwrap();
    match a.recv(Duration::from_secs(5)).await {
        Ok(Some(Packet::SubAck(ack))) => {
            assert_eq!(ack.pkid, 9);
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Failure,
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Still connected, and the allowed subscription works.
    a.send(&publish("ward/pm-a/telemetry", 2, b"x"))
        .await
        .unwrap();
    let mut got_publish = false;
    for _ in 0..2 {
        if let Ok(Some(Packet::Publish(p))) = a.recv(Duration::from_secs(5)).await {
            assert_eq!(p.topic, "ward/pm-a/telemetry");
            got_publish = true;
        }
    }
    assert!(got_publish);
    assert_eq!(
        rig.metering
            .snapshot_of("pm-a")
            .unwrap()
            .totals
            .authorization_failures,
        2
    );
}

#[tokio::test]
async fn breaking_a_limit_closes_only_that_connection() {
    let mut o = RigOptions::new(vec![
        device("pm-a", "pacemaker", "a"),
        device("pm-b", "pacemaker", "b"),
    ]);
    o.limits = LimitsConfig {
        max_payload_bytes: 1024,
        ..Default::default()
    };
    o.devices[0].publish = Some(vec!["#".into()]);
    let mut rig = Rig::start(o).await;
    let mut b = plain(&rig, "pm-b", "b").await;

    let mut a = plain(&rig, "pm-a", "a").await;
    a.send(&publish("ward/pm-a/telemetry", 1, &[b'x'; 1025]))
        .await
        .unwrap();
    assert!(
        a.closed_within(Duration::from_secs(5)).await,
        "payload over the limit"
    );

    let mut a = plain(&rig, "pm-a", "a").await;
    let long = format!("ward/{}", "x".repeat(300));
    a.send(&publish(&long, 1, b"x")).await.unwrap();
    assert!(
        a.closed_within(Duration::from_secs(5)).await,
        "topic over 256 bytes"
    );

    let mut a = plain(&rig, "pm-a", "a").await;
    a.send(&publish("1/2/3/4/5/6/7/8/9", 1, b"x"))
        .await
        .unwrap();
    assert!(
        a.closed_within(Duration::from_secs(5)).await,
        "topic over 8 levels"
    );

    let mut a = plain(&rig, "pm-a", "a").await;
    a.send(&publish("ward/pm-a/telemetry", 1, &[b'x'; 1024]))
        .await
        .unwrap();
    assert_eq!(
        a.recv(Duration::from_secs(5)).await,
        Ok(Some(Packet::PubAck(PubAck::new(1))))
    );

    b.send(&publish("ward/pm-b/telemetry", 5, b"ok"))
        .await
        .unwrap();
    assert_eq!(
        b.recv(Duration::from_secs(5)).await,
        Ok(Some(Packet::PubAck(PubAck::new(5))))
    );
    let mut seen = Vec::new();
    while let Some(r) = rig.next_reading(Duration::from_millis(500)).await {
        seen.push(r.device.id.to_string());
    }
    assert_eq!(
        seen,
        vec!["pm-a", "pm-b"],
        "only the in-limit readings were accepted"
    );
}

#[tokio::test]
async fn metering_counters_are_exact() {
    let rig = Rig::start(RigOptions::new(vec![device("pm-a", "pacemaker", "a")])).await;
    let payloads: [&[u8]; 4] = [b"12345", b"1234567890", b"1", b"123"];
    let k = 3;
    let mut bytes_in = 0;
    let mut bytes_out = 0;
    let mut sent = 0;
    for round in 0..k {
        let mut a = plain(&rig, "pm-a", "a").await;
        bytes_out += 4; // CONNACK
                        // Subscribe to its own topic: it receives what it publishes.
        let mut s = Subscribe::new("ward/pm-a/telemetry", QoS::AtMostOnce);
        s.pkid = 1;
        a.send(&Packet::Subscribe(s)).await.unwrap();
        match a.recv(Duration::from_secs(5)).await {
            Ok(Some(p @ Packet::SubAck(_))) => bytes_out += p.size(),
            other => panic!("{other:?}"),
        }
        for (i, p) in payloads.iter().enumerate() {
            a.send(&publish("ward/pm-a/telemetry", 10 + i as u16, p))
                .await
                .unwrap();
            sent += 1;
            // One PUBACK and one delivery per publish, in either order.
            for _ in 0..2 {
                match a.recv(Duration::from_secs(5)).await {
                    Ok(Some(p)) => bytes_out += p.size(),
                    other => panic!("round {round}: {other:?}"),
                }
            }
        }
        a.send(&Packet::Disconnect).await.unwrap();
        bytes_in += a.sent_bytes;
        assert!(a.closed_within(Duration::from_secs(5)).await);
    }
    // One failed attempt on top.
    let mut bad = Raw::new(TcpStream::connect(rig.addr).await.unwrap());
    assert_eq!(
        bad.connect("pm-a", Some("wrong")).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    // The counters of a connection are final once its task ended: the last disconnect counted.
    until(
        Duration::from_secs(10),
        "every session's end counted",
        || {
            rig.metering.snapshot_of("pm-a").is_some_and(|s| {
                let t = &s.totals;
                t.disconnects == k && t.connection_attempts == k + 1 && t.connection_failures == 1
            })
        },
    )
    .await;

    let s = rig.metering.snapshot_of("pm-a").unwrap();
    let t = &s.totals;
    assert_eq!(t.messages_sent, sent);
    assert_eq!(
        t.messages_received, sent,
        "every publish came back on the subscription"
    );
    assert_eq!(t.largest_message_bytes, 10);
    assert_eq!(t.connection_attempts, k + 1);
    assert_eq!(t.connection_failures, 1);
    assert_eq!(t.disconnects, k);
    assert_eq!(t.authorization_failures, 0);
    // CONNECT bytes of the accepted sessions are not metered (the device is not yet known to
    // be who it claims): everything after them is.
    let connect_bytes = {
        let mut c = rumqttc::mqttbytes::v4::Connect::new("pm-a");
        c.keep_alive = 60;
        c.login = Some(rumqttc::mqttbytes::v4::Login::new("pm-a", "a"));
        Packet::Connect(c).size() as u64
    };
    assert_eq!(t.bytes_in, bytes_in as u64 - k * connect_bytes);
    assert_eq!(t.bytes_out, bytes_out as u64);
    assert!(s
        .current
        .source_addresses
        .contains(&"127.0.0.1".parse().unwrap()));
    assert!(!s.connected);
}

#[tokio::test]
async fn a_stalled_pipeline_withholds_pubacks_and_loses_nothing() {
    let mut o = RigOptions::new(vec![device("pm-a", "pacemaker", "a")]);
    o.capacity = 4;
    o.auto_confirm = false;
    let mut rig = Rig::start(o).await;
    let n: u16 = 20;

    // The pipeline accepts nothing: the device gets no PUBACK.
    let mut a = plain(&rig, "pm-a", "a").await;
    for i in 1..=n {
        a.send(&publish(
            "ward/pm-a/telemetry",
            i,
            format!("r{i}").as_bytes(),
        ))
        .await
        .unwrap();
    }
    assert_eq!(
        a.recv(Duration::from_secs(1)).await,
        Err("timed out".into()),
        "no PUBACK while stalled"
    );

    // The device gives up on this connection and retries everything on a new one (DUP).
    drop(a);
    let mut a = plain(&rig, "pm-a", "a").await;
    for i in 1..=n {
        let mut p = Publish::new(
            "ward/pm-a/telemetry",
            QoS::AtLeastOnce,
            format!("r{i}").into_bytes(),
        );
        p.pkid = i;
        p.dup = true;
        a.send(&Packet::Publish(p)).await.unwrap();
    }

    // The pipeline resumes and confirms what it gets.
    let mut raw = rig.raw.take().unwrap();
    let collector = tokio::spawn(async move {
        let mut seen = std::collections::BTreeMap::<String, u32>::new();
        while let Ok(Some(mut m)) = tokio::time::timeout(Duration::from_secs(2), raw.recv()).await {
            *seen
                .entry(String::from_utf8_lossy(&m.payload).into_owned())
                .or_default() += 1;
            if let Some(ack) = m.ack.take() {
                ack.confirm();
            }
        }
        seen
    });
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < n as usize {
        match a.recv(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(ack))) => {
                acked.insert(ack.pkid);
            }
            other => panic!("after resume: {other:?}, acked so far {acked:?}"),
        }
    }
    let seen = collector.await.unwrap();
    for i in 1..=n {
        assert!(
            seen.contains_key(&format!("r{i}")),
            "r{i} lost; pipeline saw {seen:?}"
        );
    }
    // At-least-once: some readings may have arrived twice (first try and retry), none lost.
    assert!(seen.values().all(|c| *c <= 2));
}

#[tokio::test]
async fn more_unacknowledged_publishes_than_the_inflight_limit_disconnects() {
    let mut o = RigOptions::new(vec![device("pm-a", "pacemaker", "a")]);
    o.capacity = 256;
    o.auto_confirm = false;
    o.limits.max_inflight = 10;
    let rig = Rig::start(o).await;
    let mut a = plain(&rig, "pm-a", "a").await;
    for i in 1..=10 {
        a.send(&publish("ward/pm-a/telemetry", i, b"x"))
            .await
            .unwrap();
    }
    assert_eq!(
        a.recv(Duration::from_millis(500)).await,
        Err("timed out".into()),
        "10 in flight is allowed"
    );
    a.send(&publish("ward/pm-a/telemetry", 11, b"x"))
        .await
        .unwrap();
    assert!(
        a.closed_within(Duration::from_secs(5)).await,
        "the 11th breaks max_inflight"
    );
}
