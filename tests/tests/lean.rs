//! A connected device's footprint on the internal broker: devices that only publish share the
//! gatekeeper's relay link and hold no broker connection of their own; a device gets one when
//! it subscribes or asks for a persistent session; without one the gatekeeper answers PINGREQ
//! and UNSUBSCRIBE itself; a device connecting again takes over its older connection; a
//! message is copied to the broker only while a local subscription matches it, and every
//! subscriber still gets what it subscribed to. Real rumqttd, real gatekeeper, loopback only.

use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
    Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use wardgate::config::DeviceConfig;
use wardgate_tests::{config, device, Raw};

const T: Duration = Duration::from_secs(10);

/// A broker allowing `broker_connections` connections and one plain gatekeeper listener whose
/// readings are confirmed as they arrive. Returns the listener address and what must stay
/// alive for it to keep serving.
async fn gateway(devices: Vec<DeviceConfig>, broker_connections: usize) -> (SocketAddr, Running) {
    use wardgate::gatekeeper::{Gatekeeper, ListenerLimits, Shared, Transport};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), devices);
    cfg.broker.max_connections = broker_connections;
    let broker = wardgate::broker::start(&cfg.broker, &cfg.limits)
        .await
        .expect("broker starts");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<wardgate::pipeline::Ingest>(64);
    let interest = broker.interest().clone();
    let sessions = wardgate::gatekeeper::Sessions::default();
    let gk = Gatekeeper::bind(
        "plain",
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Transport::Plain,
        ListenerLimits {
            connect_timeout: Duration::from_secs(2),
            max_connections: 1024,
            max_connections_per_address: 1024,
        },
        Shared {
            registry: wardgate::registry::SharedRegistry::new(
                wardgate::registry::Registry::from_config(&cfg.devices, &cfg.policy),
            ),
            login: wardgate::gatekeeper::login::LoginGate::new(&cfg.login)
                .expect("password-check threads start"),
            broker,
            ingest: tx.into(),
            metering: wardgate::metering::Metering::new(Duration::from_secs(300), 4),
            limits: cfg.limits.clone().into(),
            sessions: sessions.clone(),
            quarantine: Default::default(),
        },
    )
    .await
    .unwrap();
    let addr = gk.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::spawn(gk.run(stop.clone()));
    let pump = tokio::spawn(async move {
        while let Some(mut m) = rx.recv().await {
            if let Some(a) = m.ack.take() {
                a.confirm();
            }
        }
    });
    (
        addr,
        Running {
            stop,
            tasks: vec![listener, pump],
            interest,
            sessions,
            _dir: dir,
        },
    )
}

struct Running {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The broker's index of local subscriptions.
    interest: wardgate::broker::Interest,
    /// The devices' connections and their turns on the broker.
    sessions: wardgate::gatekeeper::Sessions,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A subscriber allowed to read every device's telemetry.
fn monitor() -> DeviceConfig {
    let mut m = device("monitor-01", "monitor", "monitor-secret");
    m.subscribe = Some(vec!["ward/+/telemetry".into()]);
    m
}

fn pacemakers(n: usize) -> Vec<DeviceConfig> {
    (1..=n)
        .map(|i| device(&format!("pm-{i:02}"), "pacemaker", "pm-secret"))
        .collect()
}

/// Connect `id` with `clean_session`; returns the stream and its CONNACK.
async fn connect(
    addr: SocketAddr,
    id: &str,
    password: &str,
    clean_session: bool,
) -> (Raw<TcpStream>, rumqttc::mqttbytes::v4::ConnAck) {
    let mut raw = Raw::new(TcpStream::connect(addr).await.unwrap());
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c.clean_session = clean_session;
    c.login = Some(Login::new(id, password));
    raw.send(&Packet::Connect(c)).await.unwrap();
    match raw.recv(T).await {
        Ok(Some(Packet::ConnAck(a))) => (raw, a),
        other => panic!("{id}: expected a CONNACK, got {other:?}"),
    }
}

fn publish(topic: &str, pkid: u16, retain: bool, payload: &str) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain,
        topic: topic.into(),
        pkid,
        payload: payload.as_bytes().to_vec().into(),
    })
}

/// Next packet; panics on a close or a timeout.
async fn next(raw: &mut Raw<TcpStream>) -> Packet {
    match raw.recv(T).await {
        Ok(Some(p)) => p,
        other => panic!("expected a packet, got {other:?}"),
    }
}

async fn subscribe(raw: &mut Raw<TcpStream>, filter: &str, pkid: u16) {
    let mut sub = Subscribe::new(filter, QoS::AtLeastOnce);
    sub.pkid = pkid;
    raw.send(&Packet::Subscribe(sub)).await.unwrap();
    match next(raw).await {
        Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "subscription to `{filter}` granted"
        ),
        other => panic!("expected a SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn devices_that_only_publish_need_no_broker_connection_of_their_own() {
    // Room on the broker for the relay link, the monitor's session and one more: six
    // publishing devices only fit if they do not each hold a broker connection.
    let mut devices = pacemakers(6);
    devices.push(monitor());
    let (addr, _gw) = gateway(devices, wardgate::broker::RELAY_CONNECTIONS + 2).await;
    let (mut mon, ack) = connect(addr, "monitor-01", "monitor-secret", true).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    subscribe(&mut mon, "ward/+/telemetry", 1).await;

    let mut pms = Vec::new();
    for i in 1..=6 {
        let id = format!("pm-{i:02}");
        let (mut pm, ack) = connect(addr, &id, "pm-secret", true).await;
        assert_eq!(
            ack.code,
            ConnectReturnCode::Success,
            "{id} accepted although the broker has room for one more connection only"
        );
        pm.send(&publish(&format!("ward/{id}/telemetry"), 7, false, &id))
            .await
            .unwrap();
        match next(&mut pm).await {
            Packet::PubAck(a) => assert_eq!(a.pkid, 7, "{id}'s own packet id is acknowledged"),
            other => panic!("{id}: expected its PUBACK, got {other:?}"),
        }
        pms.push(pm);
    }
    // The monitor got every one of them, through the broker, in order.
    for i in 1..=6 {
        match next(&mut mon).await {
            Packet::Publish(p) => {
                assert_eq!(p.topic, format!("ward/pm-{i:02}/telemetry"));
                assert_eq!(&p.payload[..], format!("pm-{i:02}").as_bytes());
                if p.qos == QoS::AtLeastOnce {
                    mon.send(&Packet::PubAck(PubAck::new(p.pkid)))
                        .await
                        .unwrap();
                }
            }
            other => panic!("expected pm-{i:02}'s publish, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn without_a_broker_session_the_gatekeeper_answers_and_a_first_subscribe_opens_one() {
    let mut devices = pacemakers(1);
    devices.push(monitor());
    let (addr, _gw) = gateway(devices, 16).await;
    // A retained reading, published over the relay link, is there for a later subscriber.
    let (mut pm, _) = connect(addr, "pm-01", "pm-secret", true).await;
    pm.send(&publish("ward/pm-01/telemetry", 1, true, "retained"))
        .await
        .unwrap();
    assert!(matches!(next(&mut pm).await, Packet::PubAck(a) if a.pkid == 1));

    let (mut mon, _) = connect(addr, "monitor-01", "monitor-secret", true).await;
    mon.send(&Packet::PingReq).await.unwrap();
    assert!(
        matches!(next(&mut mon).await, Packet::PingResp),
        "PINGREQ answered"
    );
    let mut unsub = Unsubscribe::new("ward/+/telemetry");
    unsub.pkid = 9;
    mon.send(&Packet::Unsubscribe(unsub)).await.unwrap();
    assert!(
        matches!(next(&mut mon).await, Packet::UnsubAck(a) if a.pkid == 9),
        "UNSUBSCRIBE answered"
    );
    subscribe(&mut mon, "ward/+/telemetry", 2).await;
    match next(&mut mon).await {
        Packet::Publish(p) => {
            assert!(p.retain, "the retained reading, marked retained");
            assert_eq!(&p.payload[..], b"retained");
        }
        other => panic!("expected the retained publish, got {other:?}"),
    }
    // With its session open, PINGREQ still gets its answer (now the broker's).
    mon.send(&Packet::PingReq).await.unwrap();
    assert!(matches!(next(&mut mon).await, Packet::PingResp));
}

#[tokio::test]
async fn a_persistent_session_is_the_brokers_from_connect() {
    let mut devices = pacemakers(1);
    devices.push(monitor());
    let (addr, _gw) = gateway(devices, 16).await;
    let (mut mon, ack) = connect(addr, "monitor-01", "monitor-secret", false).await;
    assert!(!ack.session_present, "first connection: no session yet");
    subscribe(&mut mon, "ward/+/telemetry", 1).await;
    mon.send(&Packet::Disconnect).await.unwrap();
    assert!(mon.closed_within(T).await);

    // Reconnecting without subscribing again: the broker kept the subscription, and says so.
    let (mut mon, ack) = connect(addr, "monitor-01", "monitor-secret", false).await;
    assert!(ack.session_present, "the broker's session is resumed");
    let (mut pm, _) = connect(addr, "pm-01", "pm-secret", true).await;
    pm.send(&publish("ward/pm-01/telemetry", 3, false, "after"))
        .await
        .unwrap();
    assert!(matches!(next(&mut pm).await, Packet::PubAck(a) if a.pkid == 3));
    match next(&mut mon).await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"after"),
        other => panic!("expected the publish on the resumed subscription, got {other:?}"),
    }
}

#[tokio::test]
async fn a_device_connecting_again_takes_over_its_older_connection() {
    let (addr, _gw) = gateway(pacemakers(1), 16).await;
    let (mut old, _) = connect(addr, "pm-01", "pm-secret", true).await;
    let (mut new, ack) = connect(addr, "pm-01", "pm-secret", true).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(
        old.closed_within(T).await,
        "the older connection of the device is closed"
    );
    new.send(&publish("ward/pm-01/telemetry", 5, false, "still here"))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut new).await, Packet::PubAck(a) if a.pkid == 5),
        "the new connection serves"
    );
}

async fn unsubscribe(raw: &mut Raw<TcpStream>, filter: &str, pkid: u16) {
    let mut u = Unsubscribe::new(filter);
    u.pkid = pkid;
    raw.send(&Packet::Unsubscribe(u)).await.unwrap();
    assert!(matches!(next(raw).await, Packet::UnsubAck(a) if a.pkid == pkid));
}

/// Publish `payload` from `pm` as `pkid` and wait for its PUBACK.
async fn send(pm: &mut Raw<TcpStream>, pkid: u16, payload: &str) {
    pm.send(&publish("ward/pm-01/telemetry", pkid, false, payload))
        .await
        .unwrap();
    assert!(matches!(next(pm).await, Packet::PubAck(a) if a.pkid == pkid));
}

/// The next PUBLISH `mon` gets, answering its PUBACK.
async fn delivered(mon: &mut Raw<TcpStream>) -> String {
    match next(mon).await {
        Packet::Publish(p) => {
            mon.send(&Packet::PubAck(PubAck::new(p.pkid)))
                .await
                .unwrap();
            String::from_utf8_lossy(&p.payload).into_owned()
        }
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn subscriptions_decide_what_is_copied_to_the_broker_and_every_subscriber_is_served() {
    let mut devices = pacemakers(1);
    devices.push(monitor());
    let (addr, gw) = gateway(devices, 16).await;
    let wanted = || gw.interest.wanted("ward/pm-01/telemetry");
    let (mut pm, _) = connect(addr, "pm-01", "pm-secret", true).await;
    // Nobody listens: acknowledged without a copy on the broker.
    assert!(!wanted());
    send(&mut pm, 1, "unheard").await;

    let (mut mon, _) = connect(addr, "monitor-01", "monitor-secret", true).await;
    subscribe(&mut mon, "ward/+/telemetry", 1).await;
    assert!(wanted(), "the subscription is in the index once SUBACKed");
    send(&mut pm, 2, "heard").await;
    assert_eq!(delivered(&mut mon).await, "heard");

    unsubscribe(&mut mon, "ward/+/telemetry", 2).await;
    assert!(!wanted(), "gone with its UNSUBSCRIBE");
    send(&mut pm, 3, "after unsubscribe").await;
    subscribe(&mut mon, "ward/pm-01/telemetry", 3).await;
    send(&mut pm, 4, "subscribed again").await;
    assert_eq!(
        delivered(&mut mon).await,
        "subscribed again",
        "nothing from while it was not subscribed, then the new subscription's"
    );

    // A clean session's subscriptions end with its connection, however it ends.
    drop(mon);
    let t0 = std::time::Instant::now();
    while wanted() {
        assert!(
            t0.elapsed() < T,
            "the closed connection's subscription stays in the index"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(gw.interest.is_empty());
}

#[tokio::test]
async fn an_absent_persistent_sessions_subscriptions_stay_until_a_clean_session_replaces_it() {
    let mut devices = pacemakers(1);
    devices.push(monitor());
    let (addr, gw) = gateway(devices, 16).await;
    let (mut mon, _) = connect(addr, "monitor-01", "monitor-secret", false).await;
    subscribe(&mut mon, "ward/+/telemetry", 1).await;
    mon.send(&Packet::Disconnect).await.unwrap();
    assert!(mon.closed_within(T).await);
    assert!(
        gw.interest.wanted("ward/pm-01/telemetry"),
        "the broker keeps queueing for the absent session, so messages still go there"
    );
    let (mut pm, _) = connect(addr, "pm-01", "pm-secret", true).await;
    send(&mut pm, 7, "while away").await;
    // A clean session on the broker discards the persistent one, and its subscriptions.
    let (mut mon, _) = connect(addr, "monitor-01", "monitor-secret", true).await;
    assert!(
        gw.interest.wanted("ward/pm-02/telemetry"),
        "kept until the clean session reaches the broker"
    );
    subscribe(&mut mon, "ward/pm-01/telemetry", 2).await;
    assert!(
        !gw.interest.wanted("ward/pm-02/telemetry"),
        "the persistent session's `ward/+/telemetry` is gone"
    );
    assert!(gw.interest.wanted("ward/pm-01/telemetry"));
}

/// A device that connects again at once — after its DISCONNECT, or while its older connection
/// is still open — gets a broker session that stays. The broker must have let go of the older
/// session before the new one reaches it: rumqttd hands a dropped session's slot to the next
/// connection, and the older session's late "disconnected" would then close the new one
/// (seen as a SUBSCRIBE that gets no SUBACK). Sixteen devices at once, so that the broker's
/// tasks compete for the two cores as on a busy gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connecting_again_at_once_keeps_its_new_broker_session() {
    const DEVICES: usize = 16;
    let monitors: Vec<DeviceConfig> = (1..=DEVICES)
        .map(|i| {
            let mut m = device(&format!("mon-{i:02}"), "monitor", "monitor-secret");
            m.subscribe = Some(vec![format!("ward/mon-{i:02}/telemetry")]);
            m
        })
        .collect();
    let (addr, gw) = gateway(monitors, 64).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 1..=DEVICES {
        tasks.spawn(reconnect_rounds(addr, format!("mon-{i:02}"), 40));
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a device's rounds");
    }
    // Every device's last connection ended with DISCONNECT: no broker session is left, and
    // nothing is left of their bookkeeping.
    let t0 = std::time::Instant::now();
    while gw.sessions.broker_turns() != 0 {
        assert!(
            t0.elapsed() < T,
            "{} client ids still hold a turn on the broker",
            gw.sessions.broker_turns()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `rounds` connections of device `id` (a monitor subscribed to its own telemetry), each
/// subscribing and receiving what it then publishes; every other one ends with DISCONNECT, the
/// others are taken over by the next.
async fn reconnect_rounds(addr: SocketAddr, id: String, rounds: u16) {
    let topic = format!("ward/{id}/telemetry");
    let mut older: Option<Raw<TcpStream>> = None;
    for round in 1..=rounds {
        // Every third connection asks for a persistent session, which opens at CONNECT.
        let clean = round % 3 != 0;
        let (mut dev, ack) = connect(addr, &id, "monitor-secret", clean).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{id} round {round}");
        // The older connection, if left open, has just been taken over.
        drop(older.take());
        let mut sub = Subscribe::new(&topic, QoS::AtLeastOnce);
        sub.pkid = round;
        dev.send(&Packet::Subscribe(sub)).await.unwrap();
        let want = format!("round {round}");
        let mut subacked = false;
        loop {
            match dev.recv(T).await {
                Ok(Some(Packet::SubAck(a))) if a.pkid == round => {
                    subacked = true;
                    dev.send(&publish(&topic, round, false, &want))
                        .await
                        .unwrap();
                }
                Ok(Some(Packet::PubAck(a))) if a.pkid == round => {}
                Ok(Some(Packet::Publish(p))) => {
                    dev.send(&Packet::PubAck(PubAck::new(p.pkid)))
                        .await
                        .unwrap();
                    if p.payload[..] == *want.as_bytes() {
                        break;
                    }
                    // Only a persistent session hands over an earlier round's delivery again.
                    assert!(!clean, "{id} round {round}: unexpected {p:?}");
                }
                other => panic!(
                    "{id} round {round} (clean session {clean}): the new connection's broker \
                     session ended: {other:?} (SUBACK received: {subacked})"
                ),
            }
        }
        if round % 2 == 0 {
            dev.send(&Packet::Disconnect).await.unwrap();
        } else {
            older = Some(dev);
        }
    }
}
