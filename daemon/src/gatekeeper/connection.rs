//! One device connection: CONNECT, authentication, then the two-way relay to the broker.
//!
//! A single task owns both sockets and `select!`s between them, so the order of packets in each
//! direction is kept and there is one place that decides when the connection ends.

use super::Context;
use crate::mqtt::{self, FrameError};
use crate::pipeline::{Ingest, Qos};
use crate::registry::Device;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long the internal broker has to answer the relayed CONNECT.
const BROKER_CONNACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a relay ended.
#[derive(Debug)]
enum End {
    Shutdown,
    DeviceDisconnected,
    DeviceClosed,
    DeviceError(FrameError),
    DeviceWrite(std::io::Error),
    Violation(&'static str),
    BrokerClosed,
    BrokerError(FrameError),
    BrokerWrite(std::io::Error),
    PipelineClosed,
}

/// Serve one accepted TCP connection to its end. Never panics, never affects other connections.
pub(super) async fn serve(
    mut device: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let _ = device.set_nodelay(true);
    let listener = ctx.listener;
    let max = ctx.broker.max_frame_bytes();
    let mut dbuf = BytesMut::with_capacity(1024);

    let first = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout(
            ctx.limits.connect_timeout,
            mqtt::read_packet(&mut device, &mut dbuf, max),
        ) => r,
    };
    let connect = match first {
        Err(_) => {
            log::warn!(
                listener = listener, peer:% = peer, rule = "connect_timeout";
                "closing connection: no MQTT CONNECT within {:?}", ctx.limits.connect_timeout
            );
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(Packet::Connect(c)))) if c.protocol == Protocol::V4 => c,
        Ok(Ok(Some(Packet::Connect(_)))) => {
            log::warn!(
                listener = listener, peer:% = peer, protocol_level = 5;
                "connection refused: only MQTT 3.1.1 (protocol level 4) is supported"
            );
            let _ = refuse(&mut device, ConnectReturnCode::RefusedProtocolVersion, max).await;
            return;
        }
        Ok(Ok(Some(other))) => {
            log::warn!(
                listener = listener, peer:% = peer, packet = packet_name(&other);
                "closing connection: first packet was not CONNECT"
            );
            return;
        }
        Ok(Err(FrameError::Malformed(mqttbytes::Error::InvalidProtocolLevel(level)))) => {
            log::warn!(
                listener = listener, peer:% = peer, protocol_level = level;
                "connection refused: only MQTT 3.1.1 (protocol level 4) is supported"
            );
            let _ = refuse(&mut device, ConnectReturnCode::RefusedProtocolVersion, max).await;
            return;
        }
        Ok(Err(e)) => {
            log::warn!(
                listener = listener, peer:% = peer, error:% = e;
                "closing connection: malformed data instead of CONNECT"
            );
            return;
        }
    };

    let registry = ctx.registry.snapshot();
    let client_id = connect.client_id.clone();
    let password = connect.login.as_ref().map(|l| l.password.clone());
    let auth = tokio::task::spawn_blocking(move || {
        registry.authenticate_password(&client_id, password.as_deref().map(str::as_bytes))
    })
    .await;
    let dev = match auth {
        Ok(Ok(d)) => d,
        Ok(Err(why)) => {
            log::warn!(
                listener = listener, device_id:% = connect.client_id, peer:% = peer,
                reason = why.reason();
                "connection refused: {}", why.reason()
            );
            let _ = refuse(&mut device, ConnectReturnCode::NotAuthorized, max).await;
            return;
        }
        Err(e) => {
            log::error!(listener = listener, peer:% = peer, error:% = e; "authentication task failed");
            let _ = refuse(&mut device, ConnectReturnCode::ServiceUnavailable, max).await;
            return;
        }
    };

    let (broker, ack) = match open_broker_link(&ctx, &connect).await {
        Ok(x) => x,
        Err(e) => {
            log::error!(
                listener = listener, device_id:% = dev.id, peer:% = peer, error:% = e;
                "internal broker refused the relayed connection; device turned away"
            );
            let _ = refuse(&mut device, ConnectReturnCode::ServiceUnavailable, max).await;
            return;
        }
    };
    if let Err(e) = mqtt::write_packet(&mut device, &Packet::ConnAck(ack), max).await {
        log::debug!(device_id:% = dev.id, peer:% = peer, error:% = e; "device left before CONNACK");
        return;
    }
    log::info!(
        listener = listener, device_id:% = dev.id, kind:% = dev.kind, peer:% = peer,
        clean_session = connect.clean_session, keep_alive_s = connect.keep_alive;
        "device connected"
    );

    let mut stats = RelayStats::default();
    let end = relay(&ctx, &dev, device, dbuf, broker, &stop, &mut stats).await;
    let fields = (listener, dev.id.clone(), peer);
    match &end {
        End::Shutdown => log::info!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2;
            "device connection closed: gateway stopping"
        ),
        End::DeviceDisconnected | End::DeviceClosed => log::info!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2,
            messages_in = stats.publishes_in, bytes_in = stats.bytes_in,
            clean = matches!(end, End::DeviceDisconnected);
            "device disconnected"
        ),
        End::Violation(rule) => log::warn!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2, rule = *rule;
            "device disconnected: protocol violation ({rule})"
        ),
        End::DeviceError(e) => log::warn!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2, error:% = e;
            "device disconnected: {e}"
        ),
        End::DeviceWrite(e) => log::info!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2, error:% = e;
            "device disconnected: write failed"
        ),
        End::BrokerClosed => log::warn!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2;
            "device disconnected: internal broker closed the relay (keep-alive expired or \
             the same device id connected again)"
        ),
        End::BrokerError(e) => log::warn!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2, error:% = e;
            "device disconnected: unreadable data from the internal broker"
        ),
        End::BrokerWrite(e) => log::warn!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2, error:% = e;
            "device disconnected: relay to the internal broker failed"
        ),
        End::PipelineClosed => log::warn!(
            listener = fields.0, device_id:% = fields.1, peer:% = fields.2;
            "device disconnected: pipeline is stopping"
        ),
    }
}

#[derive(Debug, Default)]
struct RelayStats {
    publishes_in: u64,
    bytes_in: u64,
}

/// Relay packets both ways until one side ends.
async fn relay(
    ctx: &Context,
    dev: &Arc<Device>,
    device: TcpStream,
    mut dbuf: BytesMut,
    broker: TcpStream,
    stop: &CancellationToken,
    stats: &mut RelayStats,
) -> End {
    let max = ctx.broker.max_frame_bytes();
    let (mut dr, mut dw) = device.into_split();
    let (mut br, mut bw) = broker.into_split();
    let mut bbuf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(4096);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return End::Shutdown,
            r = mqtt::read_packet(&mut dr, &mut dbuf, max) => {
                let packet = match r {
                    Ok(Some(p)) => p,
                    Ok(None) => return End::DeviceClosed,
                    Err(e) => return End::DeviceError(e),
                };
                let packet = match packet {
                    Packet::Publish(p) => {
                        let qos = match p.qos {
                            QoS::AtMostOnce => Qos::AtMostOnce,
                            QoS::AtLeastOnce => Qos::AtLeastOnce,
                            QoS::ExactlyOnce => return End::Violation("qos2_not_supported"),
                        };
                        stats.publishes_in += 1;
                        stats.bytes_in += p.payload.len() as u64;
                        let ingest = Ingest {
                            device: dev.clone(),
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            received_at: SystemTime::now(),
                            qos,
                            pkid: p.pkid,
                        };
                        // Full channel: wait, and stop reading from this device meanwhile.
                        tokio::select! {
                            r = ctx.ingest.send(ingest) => if r.is_err() { return End::PipelineClosed },
                            _ = stop.cancelled() => return End::Shutdown,
                        }
                        Packet::Publish(p)
                    }
                    Packet::Subscribe(mut s) => {
                        // IoT Core semantics: QoS 2 is granted as QoS 1.
                        for f in &mut s.filters {
                            if f.qos == QoS::ExactlyOnce {
                                f.qos = QoS::AtLeastOnce;
                            }
                        }
                        Packet::Subscribe(s)
                    }
                    p @ (Packet::PubAck(_) | Packet::Unsubscribe(_) | Packet::PingReq) => p,
                    Packet::Disconnect => {
                        let _ = mqtt::write_packet(&mut bw, &Packet::Disconnect, max).await;
                        return End::DeviceDisconnected;
                    }
                    Packet::Connect(_) => return End::Violation("second_connect"),
                    Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                        return End::Violation("qos2_not_supported")
                    }
                    Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                        return End::Violation("server_packet_from_client")
                    }
                };
                out.clear();
                if let Err(e) = mqtt::encode(&packet, &mut out, max) {
                    return End::BrokerWrite(e);
                }
                if let Err(e) = bw.write_all(&out).await {
                    return End::BrokerWrite(e);
                }
            }
            r = mqtt::read_packet(&mut br, &mut bbuf, max) => {
                let packet = match r {
                    Ok(Some(p)) => p,
                    Ok(None) => return End::BrokerClosed,
                    Err(e) => return End::BrokerError(e),
                };
                out.clear();
                if let Err(e) = mqtt::encode(&packet, &mut out, max) {
                    return End::DeviceWrite(e);
                }
                if let Err(e) = dw.write_all(&out).await {
                    return End::DeviceWrite(e);
                }
            }
        }
    }
}

/// Connect to the internal broker as this device, with the internal login.
async fn open_broker_link(
    ctx: &Context,
    connect: &Connect,
) -> std::io::Result<(TcpStream, ConnAck)> {
    let max = ctx.broker.max_frame_bytes();
    let mut broker = TcpStream::connect(ctx.broker.addr()).await?;
    let _ = broker.set_nodelay(true);
    let mut relayed = connect.clone();
    relayed.login = Some(ctx.broker.internal_login());
    relayed.keep_alive = broker_keep_alive(connect.keep_alive);
    mqtt::write_packet(&mut broker, &Packet::Connect(relayed), max).await?;
    let mut buf = BytesMut::with_capacity(16);
    let answer = tokio::time::timeout(
        BROKER_CONNACK_TIMEOUT,
        mqtt::read_packet(&mut broker, &mut buf, max),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNACK from broker"))?
    .map_err(std::io::Error::other)?;
    match answer {
        Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok((broker, ack)),
        other => Err(std::io::Error::other(format!(
            "expected a successful CONNACK, got {other:?}"
        ))),
    }
}

/// Keep-alive as AWS IoT Core applies it: 0 or more than 1200 s → 1200 s; 1–29 s → 30 s.
/// (rumqttd itself refuses 0.)
fn broker_keep_alive(requested: u16) -> u16 {
    match requested {
        0 => 1200,
        1..=29 => 30,
        1201.. => 1200,
        k => k,
    }
}

async fn refuse(
    device: &mut TcpStream,
    code: ConnectReturnCode,
    max: usize,
) -> std::io::Result<()> {
    mqtt::write_packet(device, &Packet::ConnAck(ConnAck::new(code, false)), max).await?;
    device.shutdown().await
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use super::broker_keep_alive;

    #[test]
    fn keep_alive_follows_iot_core() {
        assert_eq!(broker_keep_alive(0), 1200);
        assert_eq!(broker_keep_alive(5), 30);
        assert_eq!(broker_keep_alive(60), 60);
        assert_eq!(broker_keep_alive(5000), 1200);
    }
}
