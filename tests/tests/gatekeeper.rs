//! The gatekeeper in front of the embedded broker: authentication, relay both ways, the ingest
//! point, and isolation of malformed connections. Real rumqttd, real MQTT clients, loopback only.

use rand::RngCore;
use rumqttc::{ConnectReturnCode, QoS};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wardgate::pipeline::Qos;
use wardgate_tests::{connect, device, options, try_connect, ConnectOutcome, Rig, RigOptions};

/// A nurse-station style monitor may read every device's telemetry.
fn monitor() -> wardgate::config::DeviceConfig {
    let mut m = device("monitor-01", "monitor", "monitor-secret");
    m.subscribe = Some(vec!["ward/+/telemetry".into(), "ward/+/alarm".into()]);
    m
}

async fn rig() -> Rig {
    Rig::start(RigOptions::new(vec![
        device("pm-01", "pacemaker", "pm-secret"),
        monitor(),
        device("raw-01", "generic", "raw-secret"),
    ]))
    .await
}

#[tokio::test]
async fn registered_device_publish_reaches_ingest_and_subscriber() {
    let mut rig = rig().await;
    let mut monitor = connect(options(rig.addr, "monitor-01", "monitor-secret")).await;
    monitor.subscribe("ward/pm-01/telemetry").await;

    let pm = connect(options(rig.addr, "pm-01", "pm-secret")).await;
    pm.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            b"{\"heartbeat\":92}".to_vec(),
        )
        .await
        .unwrap();

    let got = tokio::time::timeout(Duration::from_secs(5), rig.ingest.as_mut().unwrap().recv())
        .await
        .expect("reading reaches the ingest point")
        .expect("channel open");
    assert_eq!(&*got.device.id, "pm-01");
    assert_eq!(&*got.device.kind, "pacemaker");
    assert_eq!(got.topic, "ward/pm-01/telemetry");
    assert_eq!(&got.payload[..], b"{\"heartbeat\":92}");
    assert_eq!(got.qos, Qos::AtLeastOnce);
    assert_ne!(got.pkid, 0);

    let (topic, payload) = monitor
        .next(Duration::from_secs(5))
        .await
        .expect("subscriber receives the publish through rumqttd");
    assert_eq!(topic, "ward/pm-01/telemetry");
    assert_eq!(payload, b"{\"heartbeat\":92}");

    // The device's QoS 1 publish was acknowledged end to end.
    pm.wait_acks(1, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unknown_device_wrong_password_and_direct_broker_access_are_refused() {
    let rig = rig().await;
    let t = Duration::from_secs(10);
    assert_eq!(
        try_connect(options(rig.addr, "intruder", "pm-secret"), t).await,
        ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        try_connect(options(rig.addr, "pm-01", "wrong"), t).await,
        ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized)
    );
    let mut no_password = rumqttc::MqttOptions::new("pm-01", "127.0.0.1", rig.addr.port());
    no_password.set_keep_alive(Duration::from_secs(30));
    assert_eq!(
        try_connect(no_password, t).await,
        ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized)
    );
    // Straight to the internal broker with a valid device login: no secret, no entry.
    let direct = try_connect(options(rig.broker_addr, "pm-01", "pm-secret"), t).await;
    assert!(
        matches!(
            direct,
            ConnectOutcome::Closed(_) | ConnectOutcome::Refused(_)
        ),
        "internal broker accepted a device login: {direct:?}"
    );
    // And with no login at all.
    let mut anon = rumqttc::MqttOptions::new("pm-01", "127.0.0.1", rig.broker_addr.port());
    anon.set_keep_alive(Duration::from_secs(30));
    let direct = try_connect(anon, t).await;
    assert!(
        matches!(
            direct,
            ConnectOutcome::Closed(_) | ConnectOutcome::Refused(_)
        ),
        "internal broker accepted an anonymous login: {direct:?}"
    );
    // The right device still gets in.
    assert_eq!(
        try_connect(options(rig.addr, "pm-01", "pm-secret"), t).await,
        ConnectOutcome::Accepted
    );
}

/// Reads until the peer closes; true if it closed within `timeout`.
async fn closes_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(timeout, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn random_bytes_close_only_that_connection() {
    let mut rig = rig().await;
    let mut monitor = connect(options(rig.addr, "monitor-01", "monitor-secret")).await;
    monitor.subscribe("ward/+/telemetry").await;
    let pm = connect(options(rig.addr, "pm-01", "pm-secret")).await;

    let mut noise = vec![0u8; 1024];
    for round in 0..5 {
        rand::thread_rng().fill_bytes(&mut noise);
        let mut s = TcpStream::connect(rig.addr).await.unwrap();
        s.write_all(&noise).await.unwrap();
        // Closed at once for most noise; noise that looks like the start of a CONNECT with a
        // long length is closed by the 2 s connect timeout.
        assert!(
            closes_within(&mut s, Duration::from_secs(5)).await,
            "round {round}: connection with random bytes stayed open"
        );
    }

    // Garbage after a valid CONNECT on an authenticated connection closes it too.
    let mut raw = TcpStream::connect(rig.addr).await.unwrap();
    let mut connect_pkt = rumqttc::mqttbytes::v4::Connect::new("raw-01");
    connect_pkt.keep_alive = 30;
    connect_pkt.login = Some(rumqttc::mqttbytes::v4::Login::new("raw-01", "raw-secret"));
    wardgate::mqtt::write_packet(
        &mut raw,
        &rumqttc::mqttbytes::v4::Packet::Connect(connect_pkt),
        1024,
    )
    .await
    .unwrap();
    let mut ack = [0u8; 4];
    raw.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    rand::thread_rng().fill_bytes(&mut noise);
    noise[0] = 0xF0; // reserved packet type 15: always malformed
    raw.write_all(&noise).await.unwrap();
    assert!(closes_within(&mut raw, Duration::from_secs(5)).await);

    // The good device is unaffected and its data still flows both ways.
    pm.client
        .publish(
            "ward/pm-01/telemetry",
            QoS::AtLeastOnce,
            false,
            b"still here".to_vec(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rig.ingest.as_mut().unwrap().recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*got.device.id, "pm-01");
    assert_eq!(&got.payload[..], b"still here");
    let (_, payload) = monitor.next(Duration::from_secs(5)).await.expect("relayed");
    assert_eq!(payload, b"still here");
}

#[tokio::test]
async fn mqtt5_connect_is_refused_with_protocol_version_code() {
    let rig = rig().await;
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    // CONNECT, protocol name "MQTT", level 5, clean start, keep-alive 30, no properties, id "x".
    let pkt = [
        0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x1E, 0x00, 0x00, 0x01,
        b'x',
    ];
    s.write_all(&pkt).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(
        ack,
        [0x20, 0x02, 0x00, 0x01],
        "CONNACK 'unacceptable protocol version'"
    );
    assert!(closes_within(&mut s, Duration::from_secs(5)).await);
}
