//! One device connection: TLS handshake, CONNECT, authentication, then the two-way relay.
//!
//! A single task owns both sockets and `select!`s between the device, the broker, the
//! pipeline's confirmations and the keep-alive timer, so there is one place that decides when
//! the connection ends and why.
//!
//! PUBACK rule: a device's QoS 1 PUBLISH is answered only when (a) the pipeline confirmed the
//! reading and (b) the broker acknowledged the relayed copy (so local subscribers have it too).
//! The relayed copy goes over the shared relay link (`broker::RelayLink`), which renumbers it;
//! the broker's PUBACK for it resolves (b) and is never forwarded. A message is copied to the
//! broker only when it is retained or a local subscriber's filter matches it
//! (`broker::Interest`, kept here as SUBSCRIBEs and UNSUBSCRIBEs pass); otherwise (b) holds
//! at once.
//!
//! Broker session: a device gets a broker connection of its own only when it needs one — at
//! CONNECT if it asked for a persistent session (`clean_session = false`: the broker keeps its
//! subscriptions and queued messages, and the CONNACK's session-present flag is the broker's),
//! otherwise at its first SUBSCRIBE. Without one, the gatekeeper answers PINGREQ and
//! UNSUBSCRIBE itself. A device that connects again takes over: its older connection ends
//! (`Sessions`), whether or not it had a broker session. At most one broker session per client
//! id exists at a time: opening one waits for the client id's turn (`BrokerTurn`), which an
//! ending session gives back only once the broker has closed its side ([`Session::close`]).
//!
//! Memory per connection (measured, `cargo bench --bench memory`): a publish-only device costs
//! about 14 KiB resident — this task and its futures, the read buffer (kept at most
//! [`KEEP_READ_BUFFER_BYTES`] between packets), its meter and policy.

use super::login::{Method, Outcome};
use super::policy::{check_filter, check_topic};
use super::tls::certificate_names;
use super::{BrokerTurn, Context, Transport};
use crate::broker::{Listening, Owner};
use crate::metering::{DeviceMeter, GatewayCounters};
use crate::mqtt::{self, ConnectProblem, FrameError};
use crate::pipeline::{Ack, Ingest, Qos};
use crate::registry::Device;
use bytes::BytesMut;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, Publish, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long the internal broker has to answer the relayed CONNECT.
const BROKER_CONNACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an ending broker session waits for the broker to close its side (see
/// [`Session::close`]); the broker answers within milliseconds.
const BROKER_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a connection waits for its client id's turn on the broker (see
/// `Sessions::broker_turn`): the holder is an ending session, bounded by
/// [`BROKER_CLOSE_TIMEOUT`], or one that opens and is told to end at once.
const BROKER_TURN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a relay ended.
#[derive(Debug)]
enum End {
    Shutdown,
    DeviceDisconnected,
    DeviceClosed,
    DeviceError(FrameError),
    DeviceWrite(std::io::Error),
    /// A limit or protocol rule was broken; `.1` says how.
    Violation(&'static str, String),
    /// The device published where its policy forbids.
    Forbidden(String),
    BrokerClosed,
    /// The same device connected again; this older connection gives way.
    TakenOver,
    /// A security profile quarantined the device.
    Quarantined(crate::defender::quarantine::Entry),
    /// A reloaded configuration no longer lets this connection go on; `.0` says why.
    Revoked(String),
    /// The broker refused the session the device needed for its first SUBSCRIBE.
    SessionRefused(std::io::Error),
    BrokerError(FrameError),
    BrokerWrite(std::io::Error),
    PipelineClosed,
    /// A message was not confirmed (the queue refused it or could not write it).
    NotStored,
}

/// Take over an accepted TCP connection: TLS handshake if the listener has TLS, then serve.
pub(super) async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + ctx.accept_limits.connect_timeout;
    let tls = match &ctx.transport {
        Transport::Plain => return serve(stream, peer, None, &ctx, &stop, deadline).await,
        Transport::Tls(state) => {
            match handshake(stream, peer, state, &ctx, &stop, deadline).await {
                Some(tls) => tls,
                None => return,
            }
        }
    };
    let names = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(certificate_names);
    serve(tls, peer, names, &ctx, &stop, deadline).await
}

/// A device's TLS stream, kept on the heap: see [`handshake`].
type TlsDevice = Box<tokio_rustls::server::TlsStream<TcpStream>>;

/// The TLS handshake of an accepted connection; `None` if it failed (logged and counted) or the
/// gateway is stopping.
///
/// Memory: a connection's task holds the largest state any of its `await`s needs for the life
/// of the connection. A TLS stream is ~1.2 KiB and an `async fn` argument is stored twice in its
/// state (the argument and its binding), so a `serve` over the stream itself, with the
/// handshake's own ~2.6 KiB in the same task, made every connection's task 11.3 KiB, plain
/// ones too (a task is as large as its largest path). Boxed, and with the handshake in a
/// function of its own whose state is gone once it returns, a connection task is the plain
/// `serve`'s size for both (`cargo bench --bench memory`, heaptrack).
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    state: &super::tls::TlsState,
    ctx: &Context,
    stop: &CancellationToken,
    deadline: Instant,
) -> Option<TlsDevice> {
    let acceptor = tokio_rustls::TlsAcceptor::from(state.current());
    let handshake = tokio::select! {
        _ = stop.cancelled() => return None,
        r = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => r,
    };
    let counters = ctx.shared.metering.gateway();
    match handshake {
        Ok(Ok(tls)) => return Some(Box::new(tls)),
        Ok(Err(e)) => {
            GatewayCounters::bump(&counters.tls_handshake_failures);
            log::warn!(
                listener = ctx.listener, peer:% = peer, error:% = e;
                "TLS handshake failed: {e}"
            );
        }
        Err(_) => {
            GatewayCounters::bump(&counters.tls_handshake_failures);
            log::warn!(
                listener = ctx.listener, peer:% = peer, rule = "connect_timeout";
                "TLS handshake not finished within {:?}", ctx.accept_limits.connect_timeout
            );
        }
    }
    None
}

/// Serve one connection to its end. Never panics, never affects other connections.
async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut device: S,
    peer: SocketAddr,
    cert_names: Option<Vec<String>>,
    ctx: &Context,
    stop: &CancellationToken,
    deadline: Instant,
) {
    let listener = ctx.listener;
    let max = ctx.shared.broker.max_frame_bytes();
    let counters = ctx.shared.metering.gateway();
    let mut dbuf = BytesMut::with_capacity(1024);

    let first = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout_at(deadline, mqtt::read_connect(&mut device, &mut dbuf, max)) => r,
    };
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(c)))) if c.protocol == Protocol::V4 => c,
        Ok(Err(Ok(ConnectProblem::UnsupportedVersion { name, level }))) => {
            GatewayCounters::bump(&counters.connections_closed_before_connect);
            log::warn!(
                listener = listener, peer:% = peer, rule = "protocol_version",
                protocol:% = name, level = level;
                "connection refused: protocol `{name}` level {level}; only MQTT 3.1.1 (protocol level 4) is supported"
            );
            let _ = refuse(&mut device, ConnectReturnCode::RefusedProtocolVersion, max).await;
            return;
        }
        Ok(Err(Ok(problem))) => {
            GatewayCounters::bump(&counters.connections_closed_before_connect);
            log::warn!(
                listener = listener, peer:% = peer, rule = "protocol", error:% = problem;
                "closing connection: {problem}"
            );
            return;
        }
        Ok(Ok(Some(Packet::Connect(_)))) => {
            // The frame check lets only level 4 through; the codec agreeing is belt and braces.
            let _ = refuse(&mut device, ConnectReturnCode::RefusedProtocolVersion, max).await;
            return;
        }
        Err(_) => {
            GatewayCounters::bump(&counters.connections_closed_before_connect);
            log::warn!(
                listener = listener, peer:% = peer, rule = "connect_timeout";
                "closing connection: no MQTT CONNECT within {:?}", ctx.accept_limits.connect_timeout
            );
            return;
        }
        Ok(Ok(None)) => {
            GatewayCounters::bump(&counters.connections_closed_before_connect);
            return;
        }
        Ok(Ok(Some(other))) => {
            GatewayCounters::bump(&counters.connections_closed_before_connect);
            log::warn!(
                listener = listener, peer:% = peer, packet = packet_name(&other);
                "closing connection: first packet was not CONNECT"
            );
            return;
        }
        Ok(Err(Err(e))) => {
            GatewayCounters::bump(&counters.connections_closed_before_connect);
            log::warn!(
                listener = listener, peer:% = peer, error:% = e;
                "closing connection: malformed data instead of CONNECT"
            );
            return;
        }
    };

    // Watched from before the snapshot: a reload after it is never missed.
    let registry_changes = ctx.shared.registry.changes();
    let registry = ctx.shared.registry.snapshot();
    let meter = registry
        .get(&connect.client_id)
        .map(|d| ctx.shared.metering.device(&d.id));
    match &meter {
        Some(m) => m.connection_attempt(peer),
        None => GatewayCounters::bump(&counters.unknown_device_attempts),
    }
    let outcome = ctx
        .shared
        .login
        .authenticate(
            registry,
            &connect.client_id,
            cert_names.as_deref(),
            connect.login.as_ref().map(|l| l.password.as_str()),
            peer.ip(),
        )
        .await;
    let (dev, method, cached) = match outcome {
        Outcome::Accepted {
            device,
            method,
            cached,
        } => (device, method, cached),
        Outcome::Refused(why) => {
            if let Some(m) = &meter {
                m.connection_failed();
            }
            log::warn!(
                listener = listener, device_id:% = connect.client_id, peer:% = peer,
                reason = why.reason(), certificate:? = cert_names;
                "connection refused: {}", why.reason()
            );
            let _ = refuse(&mut device, ConnectReturnCode::NotAuthorized, max).await;
            return;
        }
        Outcome::Busy(_) => {
            // Counted and reported (once per interval) by the login gate.
            if let Some(m) = &meter {
                m.connection_failed();
            }
            let _ = refuse(&mut device, ConnectReturnCode::ServiceUnavailable, max).await;
            return;
        }
    };
    // Registered devices always have a meter.
    let meter = meter.unwrap_or_else(|| ctx.shared.metering.device(&dev.id));
    if let Some(q) = ctx.shared.quarantine.get(&dev.id, crate::clock::now_ms()) {
        meter.connection_failed();
        meter.authorization_failure();
        if let Some(suppressed) = ctx.shared.quarantine.log_refusal(&dev.id) {
            log::warn!(
                listener = listener, device_id:% = dev.id, peer:% = peer, rule = "quarantine",
                security_profile:% = q.security_profile, behavior:% = q.behavior, violation_id:% = q.violation_id,
                suppressed = suppressed;
                "connection refused: device quarantined by security profile {} (behavior {}) until {}; `wardgate quarantine clear {}` lifts it{}",
                q.security_profile, q.behavior, crate::clock::rfc3339_ms(q.until_ms), dev.id,
                if suppressed > 0 { format!(" ({suppressed} more refused since the last report)") } else { String::new() }
            );
        }
        let _ = refuse(&mut device, ConnectReturnCode::NotAuthorized, max).await;
        return;
    }

    // The Will is the device's own PUBLISH, made later: it must be one the device may make now.
    let will = match connect.last_will.clone().map(|w| check_will(w, &dev, ctx)) {
        None => None,
        Some(Ok(w)) => Some(w),
        Some(Err((rule, detail))) => {
            meter.connection_failed();
            if rule == "policy_will" {
                meter.authorization_failure();
            }
            log::warn!(
                listener = listener, device_id:% = dev.id, peer:% = peer, rule = rule;
                "connection refused: {detail}"
            );
            let _ = refuse(&mut device, ConnectReturnCode::NotAuthorized, max).await;
            return;
        }
    };

    // From here on this is the device's connection: an older one of the same device ends.
    let session = ctx.shared.sessions.begin(&dev.id);
    // A device gets its own broker session when it asks for a persistent one (the broker
    // keeps its subscriptions and queued messages) or, later, when it subscribes. Its
    // publishes always go over the shared relay link.
    let opened = if connect.clean_session {
        Ok((None, ConnAck::new(ConnectReturnCode::Success, false)))
    } else {
        // Boxed, like the first SUBSCRIBE's below: a connection opens at most one broker
        // session, so its (large) future stays out of every connection task's own state.
        Box::pin(open_broker_link(ctx, &connect))
            .await
            .map(|(session, ack)| (Some(Box::new(session)), ack))
    };
    let (broker, ack) = match opened {
        Ok(x) => x,
        Err(e) => {
            meter.connection_failed();
            log::error!(
                listener = listener, device_id:% = dev.id, peer:% = peer, error:% = e;
                "internal broker refused the relayed connection; device turned away"
            );
            let _ = refuse(&mut device, ConnectReturnCode::ServiceUnavailable, max).await;
            return;
        }
    };
    if let Err(e) = write(&mut device, &Packet::ConnAck(ack), max, &meter).await {
        if let Some(session) = broker {
            session.close(true).await;
        }
        meter.connection_failed();
        log::debug!(device_id:% = dev.id, peer:% = peer, error:% = e; "device left before CONNACK");
        return;
    }
    meter.connected(peer, listener);
    log::info!(
        listener = listener, device_id:% = dev.id, kind:% = dev.kind, peer:% = peer,
        auth = method.name(), credential_cache = if cached { "hit" } else if matches!(method, Method::Certificate) { "none" } else { "miss" },
        client_certificate = cert_names.is_some(),
        clean_session = connect.clean_session, keep_alive_s = connect.keep_alive,
        will:% = will.as_ref().map(|w| w.topic.as_str()).unwrap_or("");
        "device connected"
    );

    // Its subscriptions on the broker, in the index that decides what is copied there.
    let interest = ctx.shared.broker.interest();
    let listening = Listening::new(
        interest.clone(),
        interest.owner(&connect.client_id, connect.clean_session),
    );
    let mut relay = Relay {
        ctx,
        dev: dev.clone(),
        limits: ctx.shared.limits.get(),
        registry_changes,
        listening: &listening,
        meter: &meter,
        max,
        keep_alive: Duration::from_secs(u64::from(broker_keep_alive(connect.keep_alive))) * 3 / 2,
        connect: &connect,
        taken_over: session.token(),
    };
    let end = relay.run(device, dbuf, broker, stop).await;
    // The device as the latest configuration has it (a reload may have changed its policy).
    let dev = relay.dev;
    drop(session);
    meter.disconnected();
    log_end(listener, &dev, peer, &end);
    if let Some(will) = will {
        if end.fires_will() {
            publish_will(ctx, &dev, &meter, will).await;
        }
    }
}

/// Check a CONNECT's Will as the PUBLISH it will become: topic rules and limits, payload size
/// and the device's publish policy (retained or not: a device may not leave behind a message it
/// could not publish). QoS 2 is taken as QoS 1, as for subscriptions (IoT Core has no QoS 2).
fn check_will(
    mut will: LastWill,
    dev: &Device,
    ctx: &Context,
) -> Result<LastWill, (&'static str, String)> {
    let limits = &ctx.shared.limits.get();
    if let Err(e) = check_topic(&will.topic, limits) {
        return Err((e.rule(), format!("Will topic `{}`: {e}", will.topic)));
    }
    if will.message.len() > limits.max_payload_bytes {
        return Err((
            "max_payload_bytes",
            format!(
                "Will message of {} bytes; the limit is {}",
                will.message.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    if !dev.policy.may_publish(&will.topic) {
        return Err((
            "policy_will",
            format!(
                "Will on `{}` is not allowed by the device's publish policy",
                will.topic
            ),
        ));
    }
    if will.qos == QoS::ExactlyOnce {
        will.qos = QoS::AtLeastOnce;
    }
    Ok(will)
}

/// How long a fired Will may take to be handled by the pipeline before the gateway stops
/// waiting for it (it is not lost then: it stays in the pipeline's channel).
const WILL_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// A Will fired: send it down the same path as any PUBLISH of the device — metering, the
/// pipeline (plugin, queue, dead letters) and the local broker, retained if it asked — and say
/// so in the journal. The device's own relay is gone by now, so the broker gets it over a
/// short link of its own.
async fn publish_will(ctx: &Context, dev: &Arc<Device>, meter: &DeviceMeter, will: LastWill) {
    // Checked at CONNECT; checked again, since a reload may have narrowed the policy since.
    if !dev.policy.may_publish(&will.topic) {
        meter.authorization_failure();
        log::warn!(
            device_id:% = dev.id, topic:% = will.topic, rule = "policy_will";
            "Last Will not published: the device's policy no longer allows `{}` (configuration reloaded)", will.topic
        );
        return;
    }
    let qos = if will.qos == QoS::AtMostOnce {
        Qos::AtMostOnce
    } else {
        Qos::AtLeastOnce
    };
    meter.message_sent(will.message.len());
    let (ack, confirmation) = if qos == Qos::AtLeastOnce {
        let (a, rx) = Ack::new();
        (Some(a), Some(rx))
    } else {
        (None, None)
    };
    let ingest = Ingest {
        device: dev.clone(),
        topic: will.topic.clone(),
        payload: will.message.clone(),
        received_at: SystemTime::now(),
        qos,
        pkid: 0,
        ack,
    };
    if ctx.shared.ingest.send(ingest).await.is_err() {
        log::warn!(device_id:% = dev.id, topic:% = will.topic; "Will not handled: the pipeline is stopping");
        return;
    }
    let publish = Publish {
        dup: false,
        qos: will.qos,
        retain: will.retain,
        pkid: u16::from(will.qos != QoS::AtMostOnce),
        topic: crate::broker::inside(&will.topic).into_owned(),
        payload: will.message.clone(),
    };
    // As any publish: copied to the broker when retained or when someone listens.
    let relayed = if publish.retain || ctx.shared.broker.interest().wanted(&will.topic) {
        relay_will(ctx, dev, publish).await
    } else {
        Ok(())
    };
    let stored = match confirmation {
        Some(rx) => tokio::time::timeout(WILL_CONFIRM_TIMEOUT, rx)
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false),
        None => true,
    };
    match relayed {
        Ok(()) => log::info!(
            device_id:% = dev.id, topic:% = will.topic, retain = will.retain,
            qos = will.qos as u8, bytes = will.message.len(), handled = stored;
            "Last Will published: the device's connection ended without DISCONNECT"
        ),
        Err(e) => log::warn!(
            device_id:% = dev.id, topic:% = will.topic, error:% = e, handled = stored;
            "Last Will handled by the pipeline but not relayed to local subscribers"
        ),
    }
}

/// Publish a Will on the internal broker over a link of its own (client id
/// `wardgate-will-<device>`, so the device's next session is not disturbed).
async fn relay_will(ctx: &Context, dev: &Device, publish: Publish) -> std::io::Result<()> {
    let broker = &ctx.shared.broker;
    let max = broker.max_frame_bytes();
    let mut connect = Connect::new(format!("wardgate-will-{}", dev.id));
    connect.keep_alive = 30;
    let (mut session, _) = open_broker_link(ctx, &connect).await?;
    let sent = will_exchange(&mut session, publish, max).await;
    session.close(true).await;
    sent
}

/// The Will's PUBLISH on its own broker session, its PUBACK if QoS 1, and a DISCONNECT.
async fn will_exchange(session: &mut Session, publish: Publish, max: usize) -> std::io::Result<()> {
    let qos1 = publish.qos != QoS::AtMostOnce;
    mqtt::write_packet(&mut session.w, &Packet::Publish(publish), max).await?;
    if qos1 {
        let answer = tokio::time::timeout(
            BROKER_CONNACK_TIMEOUT,
            mqtt::read_packet(&mut session.r, &mut session.buf, max),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no PUBACK from broker"))?
        .map_err(std::io::Error::other)?;
        if !matches!(answer, Some(Packet::PubAck(_))) {
            return Err(std::io::Error::other(format!(
                "expected the broker's PUBACK, got {answer:?}"
            )));
        }
    }
    mqtt::write_packet(&mut session.w, &Packet::Disconnect, max).await
}

impl End {
    /// Whether the device's Will is published: every end but a DISCONNECT from the device
    /// and the gateway stopping (a restart would otherwise raise every device's Will).
    fn fires_will(&self) -> bool {
        !matches!(
            self,
            End::DeviceDisconnected | End::Shutdown | End::Revoked(_)
        )
    }
}

fn log_end(listener: &'static str, dev: &Device, peer: SocketAddr, end: &End) {
    let id = &dev.id;
    match end {
        End::Shutdown => log::info!(
            listener = listener, device_id:% = id, peer:% = peer;
            "device connection closed: gateway stopping"
        ),
        End::DeviceDisconnected | End::DeviceClosed => log::info!(
            listener = listener, device_id:% = id, peer:% = peer,
            clean = matches!(end, End::DeviceDisconnected);
            "device disconnected"
        ),
        End::Violation(rule, detail) => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer, rule = *rule;
            "device disconnected: limit broken ({rule}): {detail}"
        ),
        End::Forbidden(topic) => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer, rule = "policy_publish",
            topic:% = topic;
            "device disconnected: publish to `{topic}` is not allowed by its policy"
        ),
        End::DeviceError(e) => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer, error:% = e;
            "device disconnected: {e}"
        ),
        End::DeviceWrite(e) => log::info!(
            listener = listener, device_id:% = id, peer:% = peer, error:% = e;
            "device disconnected: write failed"
        ),
        End::BrokerClosed => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer;
            "device disconnected: internal broker closed the relay (it dropped a slow \
             subscriber, or the relay link was lost)"
        ),
        End::TakenOver => log::info!(
            listener = listener, device_id:% = id, peer:% = peer;
            "device disconnected: the same device connected again"
        ),
        End::Quarantined(q) => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer, rule = "quarantine",
            security_profile:% = q.security_profile, behavior:% = q.behavior, violation_id:% = q.violation_id;
            "device disconnected: quarantined by security profile {} (behavior {}) until {}; `wardgate quarantine clear {id}` lifts it",
            q.security_profile, q.behavior, crate::clock::rfc3339_ms(q.until_ms)
        ),
        End::Revoked(why) => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer, rule = "reload", reason:% = why;
            "device disconnected: {why} (configuration reloaded)"
        ),
        End::SessionRefused(e) => log::error!(
            listener = listener, device_id:% = id, peer:% = peer, error:% = e;
            "device disconnected: the internal broker refused its session (needed for its subscription)"
        ),
        End::BrokerError(e) => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer, error:% = e;
            "device disconnected: unreadable data from the internal broker"
        ),
        End::BrokerWrite(e) => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer, error:% = e;
            "device disconnected: relay to the internal broker failed"
        ),
        End::PipelineClosed => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer;
            "device disconnected: pipeline is stopping"
        ),
        End::NotStored => log::warn!(
            listener = listener, device_id:% = id, peer:% = peer;
            "device disconnected: a message could not be stored (see the queue's ERROR); not acknowledged, the device sends it again"
        ),
    }
}

type Confirmation = Pin<Box<dyn Future<Output = (u16, bool)> + Send>>;

/// Bytes of read buffer a connection keeps between packets; after a larger message the buffer
/// is given back, so one big message does not pin its size for the life of the connection.
const KEEP_READ_BUFFER_BYTES: usize = 2048;

struct Relay<'a> {
    ctx: &'a Context,
    /// The device as the current registry has it (replaced on reload).
    dev: Arc<Device>,
    /// The limits in force (replaced on reload).
    limits: crate::config::LimitsConfig,
    /// Changes when the registry is replaced.
    registry_changes: tokio::sync::watch::Receiver<u64>,
    /// Its subscriptions in the broker's interest index.
    listening: &'a Listening,
    meter: &'a DeviceMeter,
    max: usize,
    keep_alive: Duration,
    /// The device's CONNECT, to open its broker session when it first needs one.
    connect: &'a Connect,
    /// Cancelled when the same device connects again.
    taken_over: &'a CancellationToken,
}

/// QoS 1 publishes of this connection whose PUBACK is not yet sent.
#[derive(Default)]
struct Inflight {
    /// Pipeline confirmations, in arrival order.
    confirmations: FuturesOrdered<Confirmation>,
    /// The broker's acknowledgements of the relayed copies (over the relay link).
    relayed: FuturesUnordered<Confirmation>,
    /// Packet ids the pipeline confirmed, waiting for the broker's PUBACK.
    confirmed: HashSet<u16>,
    /// Packet ids the broker acknowledged, waiting for the pipeline.
    broker_acked: HashSet<u16>,
    /// Every packet id not yet acknowledged to the device.
    open: HashSet<u16>,
}

/// The device's own session on the broker: subscriptions and what is delivered to it. Kept
/// boxed by a connection (`Option<Box<Session>>`): most devices never have one, and every
/// byte of a connection task's own state is paid by every device.
struct Session {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    buf: BytesMut,
    /// Its client id's turn on the broker; given back by [`Session::close`].
    turn: BrokerTurn,
}

impl Session {
    /// End the session: close this side, then wait (at most [`BROKER_CLOSE_TIMEOUT`], and not
    /// at all with `wait` false, when the gateway stops) until the broker has closed its side
    /// too. rumqttd queues a session's removal before it closes the socket, so from then on
    /// a new session of the same client id reaches the broker after the old one is gone; only
    /// then is the client id's turn given back.
    async fn close(self, wait: bool) {
        let Session {
            mut r, mut w, turn, ..
        } = self;
        let _ = w.shutdown().await;
        if wait {
            let drained = tokio::time::timeout(BROKER_CLOSE_TIMEOUT, async {
                let mut sink = [0u8; 512];
                loop {
                    match tokio::io::AsyncReadExt::read(&mut r, &mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            if drained.is_err() {
                log::warn!(
                    client_id:% = turn.client_id();
                    "the internal broker did not close an ended session within {BROKER_CLOSE_TIMEOUT:?}; \
                     the device's next session opens anyway"
                );
            }
        }
        drop(turn);
    }
}

/// Next packet from the device's broker session; never resolves while it has none.
async fn read_session(
    session: &mut Option<Box<Session>>,
    max: usize,
) -> Result<Option<Packet>, FrameError> {
    match session {
        Some(s) => mqtt::read_packet(&mut s.r, &mut s.buf, max).await,
        None => std::future::pending().await,
    }
}

/// Give back a read buffer grown by a large message once it is empty.
fn shrink(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEEP_READ_BUFFER_BYTES {
        *buf = BytesMut::new();
    }
}

impl Relay<'_> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        device: S,
        dbuf: BytesMut,
        mut session: Option<Box<Session>>,
        stop: &CancellationToken,
    ) -> End {
        let (mut dr, mut dw) = tokio::io::split(device);
        let end = self.relay(&mut dr, &mut dw, dbuf, &mut session, stop).await;
        if let Some(s) = session.take() {
            s.close(!matches!(end, End::Shutdown)).await;
        }
        end
    }

    /// The two-way relay until the connection ends; `session` is the device's broker session,
    /// opened here at its first SUBSCRIBE if it had none.
    async fn relay<R, W>(
        &mut self,
        dr: &mut R,
        dw: &mut W,
        mut dbuf: BytesMut,
        session: &mut Option<Box<Session>>,
        stop: &CancellationToken,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.max;
        let mut inflight = Inflight::default();
        // Filters refused per SUBSCRIBE packet id, to merge into the broker's SUBACK.
        let mut sub_masks: HashMap<u16, Vec<bool>> = HashMap::new();
        let keep_alive = tokio::time::sleep(self.keep_alive);
        tokio::pin!(keep_alive);
        loop {
            shrink(&mut dbuf);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return End::Shutdown,
                Ok(()) = self.registry_changes.changed() => {
                    if let Some(end) = self.refresh() {
                        return end;
                    }
                }
                _ = self.taken_over.cancelled() => {
                    return match self.ctx.shared.quarantine.get(&self.dev.id, crate::clock::now_ms()) {
                        Some(q) => End::Quarantined(q),
                        None => End::TakenOver,
                    };
                }
                Some(first) = inflight.confirmations.next(), if !inflight.confirmations.is_empty() => {
                    // A group commit confirms several of a device's readings at once: every
                    // confirmation already in gets its PUBACK in one write. (Polling once
                    // more without this task's waker is safe: the loop polls the stream
                    // again, with it, before it waits.)
                    let mut acks = BytesMut::new();
                    let mut stored = true;
                    let mut next = Some(first);
                    while let Some((pkid, ok)) = next.take() {
                        if !ok {
                            stored = false;
                            break;
                        }
                        if inflight.broker_acked.remove(&pkid) {
                            inflight.open.remove(&pkid);
                            if let Err(e) = mqtt::encode(&Packet::PubAck(PubAck::new(pkid)), &mut acks, max) {
                                return End::DeviceWrite(e);
                            }
                        } else {
                            inflight.confirmed.insert(pkid);
                        }
                        next = inflight.confirmations.next().now_or_never().flatten();
                    }
                    if !acks.is_empty() {
                        if let Err(e) = dw.write_all(&acks).await {
                            return End::DeviceWrite(e);
                        }
                        self.meter.bytes_out(acks.len());
                    }
                    if !stored {
                        return End::NotStored;
                    }
                }
                Some((pkid, ok)) = inflight.relayed.next(), if !inflight.relayed.is_empty() => {
                    if !ok {
                        return End::BrokerClosed;
                    }
                    // The broker has the relayed copy; PUBACK the device if the pipeline
                    // confirmed too.
                    if inflight.confirmed.remove(&pkid) {
                        inflight.open.remove(&pkid);
                        if let Err(e) = write(dw, &Packet::PubAck(PubAck::new(pkid)), max, self.meter).await {
                            return End::DeviceWrite(e);
                        }
                    } else if inflight.open.contains(&pkid) {
                        inflight.broker_acked.insert(pkid);
                    }
                }
                _ = &mut keep_alive => {
                    return End::Violation(
                        "keep_alive",
                        format!("nothing received for {:?} (1.5 × keep-alive)", self.keep_alive),
                    );
                }
                r = mqtt::read_packet(dr, &mut dbuf, max) => {
                    let packet = match r {
                        Ok(Some(p)) => p,
                        Ok(None) => return End::DeviceClosed,
                        Err(FrameError::Malformed(mqttbytes::Error::PayloadSizeLimitExceeded(n))) => {
                            return End::Violation(
                                "max_payload_bytes",
                                format!("packet of {n} bytes; the limit is {} bytes of payload", self.limits.max_payload_bytes),
                            );
                        }
                        Err(e) => return End::DeviceError(e),
                    };
                    keep_alive.as_mut().reset(Instant::now() + self.keep_alive);
                    self.meter.bytes_in(packet.size());
                    let forward = match self.on_device_packet(packet, &mut inflight, &mut sub_masks, dw).await {
                        Ok(Some(p)) => p,
                        Ok(None) => continue,
                        Err(end) => {
                            if matches!(end, End::DeviceDisconnected) {
                                if let Some(s) = session.as_mut() {
                                    let _ = mqtt::write_packet(&mut s.w, &Packet::Disconnect, max).await;
                                }
                            }
                            return end;
                        }
                    };
                    if let Err(end) = self.to_session(forward, session, dw).await {
                        return end;
                    }
                }
                r = read_session(session, max) => {
                    let packet = match r {
                        Ok(Some(p)) => p,
                        Ok(None) => return End::BrokerClosed,
                        Err(e) => return End::BrokerError(e),
                    };
                    if let Some(s) = session.as_mut() {
                        shrink(&mut s.buf);
                    }
                    let packet = match packet {
                        // Publishes go over the relay link, never this session: nothing of the
                        // device's is waiting for a PUBACK here.
                        Packet::PubAck(_) => continue,
                        Packet::SubAck(ack) => Packet::SubAck(merge_suback(ack, &mut sub_masks)),
                        Packet::Publish(mut p) => {
                            if let Some(topic) = crate::broker::outside(&p.topic) {
                                // Only the device's own `$aws` filters match `$aws` topics; on
                                // the broker a `#` or `+/...` of its matched the inside name.
                                let ours = self.ctx.shared.broker.interest().holds_match(self.listening.owner(), &topic);
                                if !ours {
                                    if p.qos != QoS::AtMostOnce {
                                        if let Some(s) = session.as_mut() {
                                            if let Err(e) = mqtt::write_packet(&mut s.w, &Packet::PubAck(PubAck::new(p.pkid)), max).await {
                                                return End::BrokerWrite(e);
                                            }
                                        }
                                    }
                                    continue;
                                }
                                p.topic = topic;
                            }
                            self.meter.message_received();
                            Packet::Publish(p)
                        }
                        other => other,
                    };
                    if let Err(e) = write(dw, &packet, max, self.meter).await {
                        return End::DeviceWrite(e);
                    }
                }
            }
        }
    }

    /// The registry was replaced: take the device's new policy, settings and limits, or say why
    /// this connection must end — the device is gone, its credentials changed (it logs in
    /// again with the new ones), or its policy no longer covers a subscription it holds.
    fn refresh(&mut self) -> Option<End> {
        let Some(new) = self.ctx.shared.registry.snapshot().get(&self.dev.id) else {
            return Some(End::Revoked("removed from the device registry".into()));
        };
        if !self.dev.same_credentials(&new) {
            return Some(End::Revoked(
                "its credentials changed; it must log in again".into(),
            ));
        }
        let limits = self.ctx.shared.limits.get();
        let held = self
            .ctx
            .shared
            .broker
            .interest()
            .held(self.listening.owner());
        if let Some(f) = held
            .iter()
            .find(|f| check_filter(f, &limits).is_err() || !new.policy.may_subscribe(f))
        {
            return Some(End::Revoked(format!(
                "its policy no longer allows its subscription to `{f}`"
            )));
        }
        self.dev = new;
        self.limits = limits;
        None
    }

    /// Pass a packet of the device's on to its broker session, opening the session for its
    /// first SUBSCRIBE. Without a session the gatekeeper answers what the broker would have:
    /// PINGRESP, and UNSUBACK (there is nothing to unsubscribe from).
    async fn to_session<W: AsyncWrite + Unpin>(
        &self,
        packet: Packet,
        session: &mut Option<Box<Session>>,
        dw: &mut W,
    ) -> Result<(), End> {
        let max = self.max;
        if session.is_none() {
            let answer = match &packet {
                Packet::PingReq => Some(Packet::PingResp),
                Packet::Unsubscribe(u) => Some(Packet::UnsubAck(UnsubAck::new(u.pkid))),
                // A PUBACK for a delivery: deliveries only come over a session.
                Packet::PubAck(_) => return Ok(()),
                _ => None,
            };
            if let Some(answer) = answer {
                return write(dw, &answer, max, self.meter)
                    .await
                    .map_err(End::DeviceWrite);
            }
            match Box::pin(open_broker_link(self.ctx, self.connect)).await {
                Ok((opened, _)) => {
                    // A clean session on the broker discards the client's persistent one.
                    self.ctx
                        .shared
                        .broker
                        .interest()
                        .forget(&Owner::Session(self.connect.client_id.as_str().into()));
                    *session = Some(Box::new(opened));
                }
                Err(e) => return Err(End::SessionRefused(e)),
            }
        }
        // Just opened if it was missing.
        let Some(s) = session else {
            return Err(End::BrokerClosed);
        };
        let written = match &packet {
            Packet::Unsubscribe(u) if u.topics.iter().any(|t| t.starts_with("$aws")) => {
                let mut inside = u.clone();
                for t in &mut inside.topics {
                    crate::broker::to_inside(t);
                }
                mqtt::write_packet(&mut s.w, &Packet::Unsubscribe(inside), max).await
            }
            _ => mqtt::write_packet(&mut s.w, &packet, max).await,
        };
        written.map_err(End::BrokerWrite)?;
        if let Packet::Unsubscribe(u) = &packet {
            // Only now: a message accepted before the broker has the UNSUBSCRIBE still goes.
            self.ctx
                .shared
                .broker
                .interest()
                .remove(self.listening.owner(), u.topics.iter().map(String::as_str));
        }
        Ok(())
    }

    /// Decide what to do with one packet from the device: `Ok(Some(p))` relays `p` to the
    /// broker, `Ok(None)` relays nothing, `Err` ends the connection.
    async fn on_device_packet<W: AsyncWrite + Unpin>(
        &self,
        packet: Packet,
        inflight: &mut Inflight,
        sub_masks: &mut HashMap<u16, Vec<bool>>,
        dw: &mut W,
    ) -> Result<Option<Packet>, End> {
        let limits = &self.limits;
        match packet {
            Packet::Publish(p) => {
                if let Err(e) = check_topic(&p.topic, limits) {
                    return Err(End::Violation(
                        e.rule(),
                        format!("topic `{}`: {e}", p.topic),
                    ));
                }
                if p.payload.len() > limits.max_payload_bytes {
                    return Err(End::Violation(
                        "max_payload_bytes",
                        format!(
                            "payload of {} bytes; the limit is {}",
                            p.payload.len(),
                            limits.max_payload_bytes
                        ),
                    ));
                }
                let qos = match p.qos {
                    QoS::AtMostOnce => Qos::AtMostOnce,
                    QoS::AtLeastOnce => Qos::AtLeastOnce,
                    QoS::ExactlyOnce => {
                        return Err(End::Violation(
                            "qos2_not_supported",
                            "QoS 2 publish; use QoS 0 or 1".into(),
                        ))
                    }
                };
                if !self.dev.policy.may_publish(&p.topic) {
                    self.meter.authorization_failure();
                    return Err(End::Forbidden(p.topic.clone()));
                }
                self.meter.message_sent(p.payload.len());
                let (ack, confirmation) = if qos == Qos::AtLeastOnce {
                    if inflight.open.contains(&p.pkid) {
                        // A resend (DUP) of a publish still in flight: already accepted once.
                        return Ok(None);
                    }
                    if inflight.open.len() >= limits.max_inflight {
                        return Err(End::Violation(
                            "max_inflight",
                            format!(
                                "more than {} unacknowledged QoS 1 publishes",
                                limits.max_inflight
                            ),
                        ));
                    }
                    let (ack, rx) = Ack::new();
                    (Some(ack), Some(rx))
                } else {
                    (None, None)
                };
                let ingest = Ingest {
                    device: self.dev.clone(),
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    received_at: SystemTime::now(),
                    qos,
                    pkid: p.pkid,
                    ack,
                };
                // A full channel waits here: this device is not read meanwhile.
                if self.ctx.shared.ingest.send(ingest).await.is_err() {
                    return Err(End::PipelineClosed);
                }
                let pkid = p.pkid;
                // Local subscribers get their copy over the relay link (which renumbers it);
                // with none, and nothing to retain, the broker has nobody to give it to.
                let broker = &self.ctx.shared.broker;
                let relayed = if p.retain || broker.interest().wanted(&p.topic) {
                    let mut p = p;
                    crate::broker::to_inside(&mut p.topic);
                    match broker.relay().publish(&self.dev.id, p).await {
                        Ok(r) => r,
                        Err(_) => return Err(End::BrokerClosed),
                    }
                } else {
                    None
                };
                if let Some(rx) = confirmation {
                    inflight.open.insert(pkid);
                    inflight
                        .confirmations
                        .push_back(Box::pin(async move { (pkid, rx.await.is_ok()) }));
                    match relayed {
                        Some(relayed) => inflight
                            .relayed
                            .push(Box::pin(async move { (pkid, relayed.await.is_ok()) })),
                        // Not relayed: only the pipeline's confirmation is owed.
                        None => {
                            inflight.broker_acked.insert(pkid);
                        }
                    }
                }
                Ok(None)
            }
            Packet::Subscribe(s) => self.subscribe(s, sub_masks, dw).await,
            p @ (Packet::PubAck(_) | Packet::Unsubscribe(_) | Packet::PingReq) => Ok(Some(p)),
            Packet::Disconnect => Err(End::DeviceDisconnected),
            Packet::Connect(_) => Err(End::Violation(
                "protocol",
                "second CONNECT on one connection".into(),
            )),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => Err(End::Violation(
                "qos2_not_supported",
                "QoS 2 flow packet".into(),
            )),
            other => Err(End::Violation(
                "protocol",
                format!("{} is a server packet", packet_name(&other)),
            )),
        }
    }

    /// Filter a SUBSCRIBE through the policy. Refused filters get return code 0x80 in the
    /// SUBACK; the rest go to the broker.
    async fn subscribe<W: AsyncWrite + Unpin>(
        &self,
        mut s: Subscribe,
        sub_masks: &mut HashMap<u16, Vec<bool>>,
        dw: &mut W,
    ) -> Result<Option<Packet>, End> {
        let limits = &self.limits;
        let allowed: Vec<bool> = s
            .filters
            .iter()
            .map(|f| {
                check_filter(&f.path, limits).is_ok() && self.dev.policy.may_subscribe(&f.path)
            })
            .collect();
        for (f, ok) in s.filters.iter().zip(&allowed) {
            if !ok {
                self.meter.authorization_failure();
                log::warn!(
                    listener = self.ctx.listener, device_id:% = self.dev.id,
                    rule = "policy_subscribe", filter:% = f.path;
                    "subscription to `{}` refused by the device's policy", f.path
                );
            }
        }
        let interest = self.ctx.shared.broker.interest();
        if allowed.iter().all(|a| *a) {
            for f in &mut s.filters {
                // IoT Core semantics: QoS 2 is granted as QoS 1.
                if f.qos == QoS::ExactlyOnce {
                    f.qos = QoS::AtLeastOnce;
                }
            }
            // Before the broker has it: whatever is accepted after the SUBACK finds it.
            interest.add(
                self.listening.owner(),
                s.filters.iter().map(|f| f.path.as_str()),
            );
            inside_filters(&mut s.filters);
            return Ok(Some(Packet::Subscribe(s)));
        }
        if !allowed.iter().any(|a| *a) {
            let codes = vec![SubscribeReasonCode::Failure; allowed.len()];
            let ack = Packet::SubAck(SubAck::new(s.pkid, codes));
            if let Err(e) = write(dw, &ack, self.max, self.meter).await {
                return Err(End::DeviceWrite(e));
            }
            return Ok(None);
        }
        let mut kept = Vec::new();
        for (mut f, ok) in s.filters.into_iter().zip(&allowed) {
            if *ok {
                if f.qos == QoS::ExactlyOnce {
                    f.qos = QoS::AtLeastOnce;
                }
                kept.push(f);
            }
        }
        sub_masks.insert(s.pkid, allowed);
        interest.add(self.listening.owner(), kept.iter().map(|f| f.path.as_str()));
        s.filters = kept;
        inside_filters(&mut s.filters);
        Ok(Some(Packet::Subscribe(s)))
    }
}

/// The broker's names of a SUBSCRIBE's filters (`$aws/...` lives inside it under another name;
/// see [`crate::broker::inside`]).
fn inside_filters(filters: &mut [rumqttc::mqttbytes::v4::SubscribeFilter]) {
    for f in filters {
        crate::broker::to_inside(&mut f.path);
    }
}

/// Put refused filters' failure codes back in the broker's SUBACK.
fn merge_suback(ack: SubAck, masks: &mut HashMap<u16, Vec<bool>>) -> SubAck {
    let Some(mask) = masks.remove(&ack.pkid) else {
        return ack;
    };
    let mut granted = ack.return_codes.into_iter();
    let codes = mask
        .into_iter()
        .map(|ok| {
            if ok {
                granted.next().unwrap_or(SubscribeReasonCode::Failure)
            } else {
                SubscribeReasonCode::Failure
            }
        })
        .collect();
    SubAck::new(ack.pkid, codes)
}

/// Write one packet to the device and meter its bytes.
async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    packet: &Packet,
    max: usize,
    meter: &DeviceMeter,
) -> std::io::Result<()> {
    mqtt::write_packet(w, packet, max).await?;
    meter.bytes_out(packet.size());
    Ok(())
}

/// Connect to the internal broker as this device, with the internal login.
async fn open_broker_link(ctx: &Context, connect: &Connect) -> std::io::Result<(Session, ConnAck)> {
    let broker = &ctx.shared.broker;
    let max = broker.max_frame_bytes();
    let turn = tokio::time::timeout(
        BROKER_TURN_TIMEOUT,
        ctx.shared.sessions.broker_turn(&connect.client_id),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the previous broker session of this client id did not end",
        )
    })?;
    let mut stream = TcpStream::connect(broker.addr()).await?;
    let _ = stream.set_nodelay(true);
    let mut relayed = connect.clone();
    relayed.login = Some(broker.internal_login());
    // The gatekeeper publishes the Will itself (through policy, pipeline and journal); the
    // broker must never fire one on its own.
    relayed.last_will = None;
    relayed.keep_alive = broker_keep_alive(connect.keep_alive);
    mqtt::write_packet(&mut stream, &Packet::Connect(relayed), max).await?;
    let mut buf = BytesMut::with_capacity(16);
    let answer = tokio::time::timeout(
        BROKER_CONNACK_TIMEOUT,
        mqtt::read_packet(&mut stream, &mut buf, max),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNACK from broker"))?
    .map_err(std::io::Error::other)?;
    match answer {
        Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
            let (r, w) = stream.into_split();
            Ok((Session { r, w, buf, turn }, ack))
        }
        other => Err(std::io::Error::other(format!(
            "expected a successful CONNACK, got {other:?}"
        ))),
    }
}

/// Keep-alive as AWS IoT Core applies it: 0 or more than 1200 s → 1200 s; 1–29 s → 30 s.
/// (rumqttd itself refuses 0.) The gatekeeper closes a device silent for 1.5 × this.
fn broker_keep_alive(requested: u16) -> u16 {
    match requested {
        0 => 1200,
        1..=29 => 30,
        1201.. => 1200,
        k => k,
    }
}

async fn refuse<S: AsyncWrite + Unpin>(
    device: &mut S,
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
    use super::*;

    #[test]
    fn keep_alive_follows_iot_core() {
        assert_eq!(broker_keep_alive(0), 1200);
        assert_eq!(broker_keep_alive(5), 30);
        assert_eq!(broker_keep_alive(60), 60);
        assert_eq!(broker_keep_alive(5000), 1200);
    }

    #[test]
    fn refused_filters_keep_their_place_in_the_suback() {
        let mut masks = HashMap::from([(7u16, vec![false, true, false, true])]);
        let broker = SubAck::new(
            7,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Success(QoS::AtMostOnce),
            ],
        );
        let merged = merge_suback(broker, &mut masks);
        assert_eq!(
            merged.return_codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtMostOnce),
            ]
        );
        assert!(masks.is_empty());
    }
}
