//! The relay link: a few connections to the internal broker ([`CONNECTIONS`]) that carry every
//! device's PUBLISH.
//!
//! A device that only publishes (most ward devices) needs no session of its own in the broker:
//! its messages are local subscribers' business, not its own. So the gatekeeper hands devices'
//! publishes to this link instead of keeping a broker connection per device — a broker
//! connection costs some 40 KiB of resident memory in rumqttd (its router-side buffers of 200
//! packets, its network buffers, its task), per device. A device gets a broker connection of its
//! own only when it needs a session there: when it subscribes, or when it asked for a
//! persistent session (see `gatekeeper::connection`).
//!
//! What must stay true:
//! - a device's publishes always use the same connection (by a hash of its id) and are written
//!   in the order they were handed over (one task, one queue per connection), so the order of
//!   one device's messages is kept for every subscriber;
//! - a QoS 1 publish's confirmation resolves only on the broker's PUBACK for it: the broker has
//!   the copy and local subscribers get it. If the link is lost first, the confirmation fails
//!   (the sender is dropped) and the device is not acknowledged: it sends the message again;
//! - packet ids on the link are unique among its unacknowledged publishes; at most
//!   [`MAX_INFLIGHT`] are unacknowledged at once (new ones wait);
//! - the link reconnects by itself (backoff from [`RETRY_MIN`] to [`RETRY_MAX`]) and ends when
//!   every [`RelayLink`] handle is gone.

use crate::mqtt;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Publishes waiting for the link's task. Bounded so that a stalled broker holds devices back
/// (their relays wait here, and stop reading their sockets) instead of queueing without end.
const QUEUE: usize = 1024;
/// Unacknowledged publishes on the link at once (below the 65 535 packet ids MQTT has).
pub const MAX_INFLIGHT: usize = 60_000;
/// Client id of the link's connections on the broker (`-0`, `-1`, … appended). Device ids
/// cannot take it over: the gatekeeper relays only registered devices, under their own ids.
const CLIENT_ID: &str = "wardgate-relay";
/// Keep-alive announced to the broker; a PINGREQ goes out at half of it.
const KEEP_ALIVE_S: u16 = 60;
/// Reconnect backoff.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The link is gone: the broker has stopped (it never should), or the gateway is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the relay link to the internal broker is closed")]
pub struct Closed;

/// One publish handed to the link; `acked` is answered on the broker's PUBACK (QoS 1 only).
#[derive(Debug)]
struct Request {
    publish: Publish,
    acked: Option<oneshot::Sender<()>>,
}

/// Connections the relay link spreads devices over. rumqttd reads one connection in batches of
/// `limits.max_inflight` packets with a round trip to its router between them; measured with
/// `cargo bench --bench gateway` on one machine at one time: one connection 39 700, four
/// 48 600, the former connection per device 29 400 messages/s. Each costs ~45 KiB.
pub const CONNECTIONS: usize = 4;

/// Handle to the relay link (cheap to clone).
#[derive(Debug, Clone)]
pub struct RelayLink {
    /// One queue per connection; a device always uses the same one (its order is kept).
    tx: std::sync::Arc<[mpsc::Sender<Request>]>,
}

impl RelayLink {
    /// Start the link's task for the broker at `addr`, logging in with `login`. The task holds
    /// no [`super::BrokerHandle`], so it ends when the last `RelayLink` is dropped.
    pub(super) fn start(addr: SocketAddr, login: Login, max_frame_bytes: usize) -> Self {
        let tx: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let target = Target {
                    addr,
                    connect: {
                        let mut c = Connect::new(format!("{CLIENT_ID}-{i}"));
                        c.keep_alive = KEEP_ALIVE_S;
                        c.login = Some(login.clone());
                        c
                    },
                    max: max_frame_bytes,
                };
                tokio::spawn(run(target, rx));
                tx
            })
            .collect();
        Self { tx: tx.into() }
    }

    /// Hand `device`'s `publish` to the broker (its packet id is replaced by one of the
    /// link's). For QoS 1 the receiver resolves when the broker acknowledged it, and fails if
    /// the link was lost before; QoS 0 gets `None`. Waits while the link's queue is full.
    pub async fn publish(
        &self,
        device: &str,
        mut publish: Publish,
    ) -> Result<Option<oneshot::Receiver<()>>, Closed> {
        let (acked, rx) = if publish.qos == QoS::AtMostOnce {
            (None, None)
        } else {
            // QoS 2 never reaches the broker (the gatekeeper refuses it); taken as QoS 1.
            publish.qos = QoS::AtLeastOnce;
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let link = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            device.hash(&mut h);
            // The remainder is below the number of connections, which fits a usize.
            (h.finish() % self.tx.len() as u64) as usize
        };
        self.tx[link]
            .send(Request { publish, acked })
            .await
            .map_err(|_| Closed)?;
        Ok(rx)
    }
}

#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    connect: Connect,
    max: usize,
}

/// Keep the link up until every handle is gone.
async fn run(target: Target, mut rx: mpsc::Receiver<Request>) {
    let mut pause = RETRY_MIN;
    loop {
        match open(&target).await {
            Ok(stream) => {
                pause = RETRY_MIN;
                match serve(stream, &target, &mut rx).await {
                    Ok(()) => return,
                    Err(e) => log::warn!(
                        error:% = e;
                        "relay link to the internal broker lost; unacknowledged device publishes are not acknowledged to their devices (they send them again); reconnecting"
                    ),
                }
            }
            Err(e) => {
                if rx.is_closed() {
                    return;
                }
                log::warn!(error:% = e; "cannot open the relay link to the internal broker; retrying");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Connect and log in.
async fn open(target: &Target) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(target.addr).await?;
    let _ = stream.set_nodelay(true);
    mqtt::write_packet(
        &mut stream,
        &Packet::Connect(target.connect.clone()),
        target.max,
    )
    .await?;
    let mut buf = BytesMut::with_capacity(16);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        mqtt::read_packet(&mut stream, &mut buf, target.max),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNACK from broker"))?
    .map_err(std::io::Error::other)?;
    match answer {
        Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => Ok(stream),
        other => Err(std::io::Error::other(format!(
            "expected a successful CONNACK, got {other:?}"
        ))),
    }
}

/// Relay requests over one connection. `Ok(())` once every handle is gone; `Err` when the
/// connection failed (the unacknowledged publishes' senders are dropped with `pending`).
async fn serve(
    stream: TcpStream,
    target: &Target,
    rx: &mut mpsc::Receiver<Request>,
) -> Result<(), mqtt::FrameError> {
    let (mut r, mut w) = stream.into_split();
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut pending: HashMap<u16, oneshot::Sender<()>> = HashMap::new();
    let mut next_pkid: u16 = 0;
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE_S / 2)));
    ping.reset();
    loop {
        tokio::select! {
            req = rx.recv(), if pending.len() < MAX_INFLIGHT => {
                let Some(first) = req else {
                    let _ = mqtt::write_packet(&mut w, &Packet::Disconnect, target.max).await;
                    return Ok(());
                };
                // Write what is queued in one go.
                let mut next = Some(first);
                while let Some(Request { mut publish, acked }) = next.take() {
                    if let Some(acked) = acked {
                        loop {
                            next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                            if !pending.contains_key(&next_pkid) {
                                break;
                            }
                        }
                        publish.pkid = next_pkid;
                        pending.insert(next_pkid, acked);
                    } else {
                        publish.pkid = 0;
                    }
                    mqtt::encode(&Packet::Publish(publish), &mut out, target.max)?;
                    if pending.len() < MAX_INFLIGHT && out.len() < 64 * 1024 {
                        next = rx.try_recv().ok();
                    }
                }
                use tokio::io::AsyncWriteExt;
                w.write_all(&out).await?;
                out.clear();
                if out.capacity() > 64 * 1024 {
                    out = BytesMut::new();
                }
                ping.reset();
            }
            packet = mqtt::read_packet(&mut r, &mut buf, target.max) => {
                match packet? {
                    None => {
                        return Err(mqtt::FrameError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the broker closed the relay link",
                        )))
                    }
                    Some(Packet::PubAck(a)) => {
                        if let Some(acked) = pending.remove(&a.pkid) {
                            // The device's relay may have ended meanwhile; nothing to tell then.
                            let _ = acked.send(());
                        }
                    }
                    Some(_) => {}
                }
                if buf.is_empty() && buf.capacity() > 64 * 1024 {
                    buf = BytesMut::new();
                }
            }
            _ = ping.tick() => {
                mqtt::write_packet(&mut w, &Packet::PingReq, target.max).await?;
            }
        }
    }
}
