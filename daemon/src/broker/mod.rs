//! The embedded MQTT broker (rumqttd) behind the gatekeeper.
//!
//! rumqttd has no per-client topic ACLs, never sees certificates or peer addresses, and cannot
//! be stopped. So devices never talk to it: it listens on a loopback port only, accepts exactly
//! one login (an internal user with a secret generated at every start), and the gatekeeper
//! relays authenticated devices to it: every device's PUBLISH over a few shared connections,
//! the [`RelayLink`] (see `relay`), and a connection of the device's own only for a device that
//! needs a session there (it subscribed, or asked for a persistent session). A message goes to
//! the broker at all only when it is retained or some local subscriber's filter matches it
//! ([`Interest`], see `interest`): with nobody listening, the copy would cost most of the
//! gateway's CPU per reading for nothing. The rest of
//! wardgate sees only [`BrokerHandle`]; no rumqttd type leaves this module.
//!
//! Why not one broker connection per device (as before) or rumqttd's in-process links: each
//! connection, TCP or in-process (`LinkBuilder`), allocates rumqttd's router-side buffers of
//! 200 packets each way and an ack log — about 200 KiB of heap, some 45 KiB of it resident per
//! idle device, measured with heaptrack and `/proc/<pid>/smaps` (`cargo bench --bench memory`).
//! An in-process link would have saved only the network side (two 10 KiB buffers and a task);
//! a shared link saves all of it for devices that only publish.
//!
//! Memory bound: rumqttd keeps published messages in per-filter logs of at most
//! `max_segment_bytes × max_segment_count` (4 MiB with the defaults), and at most
//! `max_outgoing_packets` queued towards any one subscriber.
//!
//! The broker's thread is watched ([`BrokerHandle::ended`]): if it ever ends, the gateway's
//! supervisor stops the daemon (rumqttd cannot be restarted in-process).
//!
//! AWS's reserved topics (`$aws/things/<thing>/shadow/...`, Device Defender's
//! `$aws/things/<thing>/defender/...`) must work for devices as on IoT Core, but rumqttd refuses
//! every filter that starts with `$` (other than `$share/`) and closes the connection that sent
//! it. So inside the broker they travel as [`AWS_INSIDE`]`...` ([`inside`]; [`outside`] back);
//! everything else in wardgate — policy, the [`Interest`] index, the shadow service, the journal
//! — sees the `$aws/...` names devices use. The gatekeeper never lets a device name the inside
//! prefix itself, and delivers an inside topic to a device only when one of that device's own
//! `$aws` filters matches it (MQTT 3.1.1 §4.7.2: `#` and `+/...` never match `$` topics, but on
//! the broker they would match the inside name).
//!
//! What must stay true: the internal port is loopback-only (checked by config validation) and
//! refuses any CONNECT without the secret; the secret never leaves the process.

mod interest;
mod relay;

pub use interest::{Interest, Listening, Owner};

pub use relay::{
    Closed as RelayClosed, RelayLink, CONNECTIONS as RELAY_CONNECTIONS,
    MAX_INFLIGHT as RELAY_MAX_INFLIGHT,
};

use crate::config::{BrokerConfig, LimitsConfig};
use crate::mqtt;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Where `$aws/...` topics live inside the broker (see the module docs). Devices can never
/// publish or subscribe to it themselves (the policy denies it whatever it says).
pub const AWS_INSIDE: &str = "_wardgate/aws";

/// The broker's name for `topic` (a topic or a filter): `$aws/...` becomes
/// `_wardgate/aws/...`; every other topic is its own name.
pub fn inside(topic: &str) -> std::borrow::Cow<'_, str> {
    match topic.strip_prefix("$aws") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            std::borrow::Cow::Owned(format!("{AWS_INSIDE}{rest}"))
        }
        _ => std::borrow::Cow::Borrowed(topic),
    }
}

/// Rename `topic` (a topic or a filter) in place to the broker's name for it ([`inside`]).
pub fn to_inside(topic: &mut String) {
    if let std::borrow::Cow::Owned(t) = inside(topic) {
        *topic = t;
    }
}

/// The device's name for a topic the broker delivers: `Some("$aws/...")` for an inside name,
/// `None` for a topic that is its own name.
pub fn outside(topic: &str) -> Option<String> {
    match topic.strip_prefix(AWS_INSIDE) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => Some(format!("$aws{rest}")),
        _ => None,
    }
}

/// User name the gatekeeper presents to the internal broker.
pub const INTERNAL_USER: &str = "wardgate-gatekeeper";
/// Extra room above the payload limit for topic, packet id and header bytes in one frame.
pub const FRAME_OVERHEAD_BYTES: usize = 4096;
/// How long the broker has to accept its first internal login after start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No free port could be found for port 0.
    #[error("cannot pick a free loopback port for the internal broker: {0}")]
    PickPort(#[source] std::io::Error),
    /// The broker thread could not be started.
    #[error("cannot start the internal broker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The broker did not accept the internal login in time.
    #[error("internal broker on {addr} did not come up within {READY_TIMEOUT:?}: {last}")]
    NotReady {
        /// Its address.
        addr: SocketAddr,
        /// The last error seen while probing.
        last: String,
    },
}

/// How to reach the running internal broker.
#[derive(Clone)]
pub struct BrokerHandle {
    addr: SocketAddr,
    secret: String,
    max_frame_bytes: usize,
    /// Set once the broker's thread ended, with why.
    ended: Arc<OnceLock<String>>,
    /// The one connection carrying every device's PUBLISH.
    relay: RelayLink,
    /// The filters local subscribers hold (see `interest`).
    interest: Interest,
}

impl std::fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerHandle")
            .field("addr", &self.addr)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl BrokerHandle {
    /// The internal listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Largest MQTT frame (remaining length) either side may send.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Why the broker's thread ended, once it has (it never should: rumqttd runs for the life
    /// of the process). Watched by the [`crate::supervisor`].
    pub fn ended(&self) -> Option<String> {
        self.ended.get().cloned()
    }

    /// The link that carries devices' publishes to the broker (see `relay`).
    pub fn relay(&self) -> &RelayLink {
        &self.relay
    }

    /// Who listens on the broker: a message no local filter matches is not copied there.
    pub fn interest(&self) -> &Interest {
        &self.interest
    }

    /// The login the gatekeeper puts into every relayed CONNECT.
    pub fn internal_login(&self) -> Login {
        Login::new(INTERNAL_USER, self.secret.clone())
    }
}

/// Start rumqttd on its own threads and wait until it accepts the internal login.
pub async fn start(cfg: &BrokerConfig, limits: &LimitsConfig) -> Result<BrokerHandle, BrokerError> {
    let addr = if cfg.address.port() == 0 {
        // rumqttd binds by itself and cannot report the port: find a free one and release it.
        let l = StdTcpListener::bind(cfg.address).map_err(BrokerError::PickPort)?;
        l.local_addr().map_err(BrokerError::PickPort)?
    } else {
        cfg.address
    };
    let secret = {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let max_frame_bytes = limits.max_payload_bytes + FRAME_OVERHEAD_BYTES;

    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5_000,
        max_payload_size: max_frame_bytes,
        max_inflight_count: limits.max_inflight,
        auth: Some(HashMap::from([(INTERNAL_USER.to_owned(), secret.clone())])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "wardgate-internal".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let rconfig = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: cfg.max_outgoing_packets,
            max_segment_size: cfg.max_segment_bytes,
            max_segment_count: cfg.max_segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("internal".to_owned(), server)])),
        ..Default::default()
    };
    let ended = Arc::new(OnceLock::new());
    let on_end = EndGuard(ended.clone());
    std::thread::Builder::new()
        .name("wardgate-broker".into())
        .spawn(move || {
            let on_end = on_end;
            let mut broker = rumqttd::Broker::new(rconfig);
            // start() blocks for the life of the process (rumqttd has no shutdown).
            if let Err(e) = broker.start() {
                let _ = on_end.0.set(format!("stopped: {e}"));
            }
        })
        .map_err(BrokerError::Thread)?;

    let login = Login::new(INTERNAL_USER, secret.clone());
    let started = Instant::now();
    loop {
        match probe(addr, &login, max_frame_bytes).await {
            Ok(()) => break,
            Err(e) if started.elapsed() > READY_TIMEOUT => {
                return Err(BrokerError::NotReady {
                    addr,
                    last: e.to_string(),
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let handle = BrokerHandle {
        addr,
        secret,
        max_frame_bytes,
        ended,
        relay: RelayLink::start(addr, login, max_frame_bytes),
        interest: Interest::default(),
    };
    log::debug!(address:% = addr; "internal broker ready");
    Ok(handle)
}

/// Records the end of the broker's thread however it ends (returned, or unwinding a panic).
struct EndGuard(Arc<OnceLock<String>>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            "panicked"
        } else {
            "returned"
        };
        let _ = self.0.set(why.to_owned());
    }
}

/// Log in with the internal secret and log out again.
async fn probe(addr: SocketAddr, login: &Login, max_frame_bytes: usize) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut connect = Connect::new("wardgate-ready-probe");
    connect.keep_alive = 10;
    connect.login = Some(login.clone());
    mqtt::write_packet(&mut s, &Packet::Connect(connect), max_frame_bytes).await?;
    let mut rbuf = BytesMut::with_capacity(16);
    let ack = tokio::time::timeout(
        Duration::from_secs(2),
        mqtt::read_packet(&mut s, &mut rbuf, 64),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    .map_err(std::io::Error::other)?;
    match ack {
        Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => {
            let _ = mqtt::write_packet(&mut s, &Packet::Disconnect, 16).await;
            Ok(())
        }
        other => Err(std::io::Error::other(format!(
            "unexpected answer to the internal login: {other:?}"
        ))),
    }
}
