//! The gatekeeper: the only door devices have into wardgate.
//!
//! It accepts device connections (plain TCP, or TLS with optional client certificates), reads
//! their MQTT CONNECT, authenticates it against the [`SharedRegistry`] (client id = device id;
//! certificate CN/SAN and/or argon2 password, as the device's entry demands), and only then
//! relays to the internal broker: every PUBLISH over the shared relay link, and a broker
//! session of the device's own (logged in with the internal secret) once it subscribes or if
//! it asked for a persistent session. From then on it relays MQTT 3.1.1 packets both ways, parsing every one: it enforces the
//! device's topic policy and the connection limits, meters the traffic, hands every PUBLISH to
//! the pipeline, and sends a QoS 1 PUBACK only when the pipeline has confirmed the reading.
//!
//! Why a relay and not rumqttd's own listener: rumqttd has no topic ACLs, no view of the peer
//! address or certificate at auth time, and awaits TLS handshakes inside its accept loop. Here
//! every connection is its own task from the first byte — the TLS handshake included, under
//! `listeners.connect_timeout` — so one slow or hostile client only ever costs its own task.
//!
//! What must stay true:
//! - nothing reaches the broker before authentication succeeds;
//! - the device id attached to a reading is the authenticated one;
//! - malformed bytes or a broken limit close that one connection and nothing else;
//! - on shutdown the listener stops accepting first, then every connection closes, and
//!   [`Gatekeeper::run`] returns only after all connection tasks ended.

mod connection;
pub mod login;
pub mod policy;
pub mod tls;

use crate::broker::BrokerHandle;
use crate::config::LimitsConfig;
use crate::metering::{GatewayCounters, Metering};
use crate::pipeline::IngestSender;
use crate::registry::SharedRegistry;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use tls::TlsState;

/// Limits one listener enforces on accepting.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Time from accept to a complete CONNECT (TLS handshake included).
    pub connect_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_address: usize,
}

/// How bytes arrive on a listener.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain TCP: password login only.
    Plain,
    /// TLS; the state can be reloaded while connections stay up.
    Tls(Arc<TlsState>),
}

/// What every listener of a gateway shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Registered devices.
    pub registry: SharedRegistry,
    /// Password checks: their bounds, pool and cache.
    pub login: login::LoginGate,
    /// The internal broker.
    pub broker: BrokerHandle,
    /// The pipeline's ingest channel.
    pub ingest: IngestSender,
    /// Per-device meters.
    pub metering: Metering,
    /// Per-connection limits (replaced on reload).
    pub limits: SharedLimits,
    /// The live connection of every connected device.
    pub sessions: Sessions,
    /// Devices the defender quarantined: their CONNECTs are refused.
    pub quarantine: crate::defender::quarantine::Quarantine,
}

/// Per-connection limits, replaced on reload. A connection reads them at its CONNECT and again
/// whenever the registry changes (a reload replaces the limits first, then the registry).
#[derive(Debug, Clone, Default)]
pub struct SharedLimits(Arc<std::sync::RwLock<LimitsConfig>>);

impl SharedLimits {
    /// The current limits.
    pub fn get(&self) -> LimitsConfig {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace them.
    pub fn set(&self, limits: LimitsConfig) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = limits;
    }
}

impl From<LimitsConfig> for SharedLimits {
    fn from(l: LimitsConfig) -> Self {
        Self(Arc::new(std::sync::RwLock::new(l)))
    }
}

/// The one live connection of each device: a device that connects again takes over, and its
/// older connection ends (MQTT 3.1.1 section 3.1.4). Kept here, not left to the broker,
/// because most devices have no broker session of their own (see `broker::RelayLink`).
///
/// Also the broker sessions' turns ([`BrokerTurn`]): at most one broker session per client id
/// is open at a time, and the next opens only once the broker has let go of the previous one.
/// rumqttd cannot be left to sort out two sessions of one client id: it closes the older one
/// and hands its slot to the newer, and the older session's own "disconnected", arriving
/// later, then closes the newer session (its SUBSCRIBE never gets a SUBACK).
#[derive(Debug, Default, Clone)]
pub struct Sessions(Arc<Mutex<SessionMap>>);

#[derive(Debug, Default)]
struct SessionMap {
    next: u64,
    live: HashMap<String, (u64, CancellationToken)>,
    /// Per client id with a broker session open or wanted: whose turn it is. An entry goes
    /// when no connection holds or waits for it.
    broker: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// A client id's turn to have a session on the broker (see [`Sessions`]). Held by the broker
/// session until the broker has closed its side of it; dropping it lets the next connection
/// of the same client id open its session.
#[derive(Debug)]
pub(crate) struct BrokerTurn {
    sessions: Sessions,
    client_id: String,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Sessions {
    /// Wait until no other connection of `client_id` has a session on the broker, then hold
    /// the turn. Waiters are served in arrival order.
    pub(crate) async fn broker_turn(&self, client_id: &str) -> BrokerTurn {
        let lock = {
            let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.broker.entry(client_id.to_owned()).or_default())
        };
        let mut turn = BrokerTurn {
            sessions: self.clone(),
            client_id: client_id.to_owned(),
            turn: None,
        };
        turn.turn = Some(lock.lock_owned().await);
        turn
    }

    /// Client ids with a broker session open or wanted (for tests of the bookkeeping).
    pub fn broker_turns(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .broker
            .len()
    }
}

impl BrokerTurn {
    /// The client id whose turn this is.
    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }
}

impl Drop for BrokerTurn {
    fn drop(&mut self) {
        let mut m = self.sessions.0.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.turn.take());
        // Unused when only the map holds it (waiters and holders clone it under this lock).
        // A waiter whose wait was cancelled may still hold a clone for a moment; the entry
        // then stays until this client id's next turn ends.
        if m.broker
            .get(&self.client_id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            m.broker.remove(&self.client_id);
        }
    }
}

/// A device's registration in [`Sessions`]; leaves it when dropped (unless taken over).
struct SessionGuard {
    sessions: Sessions,
    device: String,
    generation: u64,
    token: CancellationToken,
}

impl Sessions {
    /// Register `device`'s new connection; its previous one, if any, is told to end.
    fn begin(&self, device: &str) -> SessionGuard {
        let token = CancellationToken::new();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.next += 1;
        let generation = m.next;
        if let Some((_, older)) = m
            .live
            .insert(device.to_owned(), (generation, token.clone()))
        {
            older.cancel();
        }
        SessionGuard {
            sessions: self.clone(),
            device: device.to_owned(),
            generation,
            token,
        }
    }
}

impl Sessions {
    /// End `device`'s connection, if it has one (its connection task closes it and says why:
    /// a quarantine, or the same device connecting again). Whether it had one.
    pub fn end(&self, device: &str) -> bool {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.live.get(device) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

impl SessionGuard {
    /// Cancelled when the device connects again.
    fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut m = self.sessions.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.live.get(&self.device).map(|(g, _)| *g) == Some(self.generation) {
            m.live.remove(&self.device);
        }
    }
}

/// Shared by every connection of one listener.
#[derive(Debug)]
struct Context {
    listener: &'static str,
    transport: Transport,
    accept_limits: ListenerLimits,
    shared: Shared,
}

/// One device-facing listener.
#[derive(Debug)]
pub struct Gatekeeper {
    listener: TcpListener,
    ctx: Arc<Context>,
    beat: crate::supervisor::Heartbeat,
}

/// Counts connections per source address; a slot is released when dropped.
#[derive(Debug, Default, Clone)]
struct PerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct AddressSlot {
    map: PerAddress,
    ip: IpAddr,
}

impl PerAddress {
    fn try_take(&self, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            map: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The listen backlog for a listener of `max_connections`: a whole ward reconnecting at once
/// after a power cut must fit in it. With the usual 128, 500 devices connecting in the same
/// instant overflowed it (the kernel's `ListenOverflows` rose by hundreds) and the median
/// device waited for its TCP SYN retry, about a second. The kernel caps it at
/// `net.core.somaxconn` (4096 on Debian 12).
fn backlog(max_connections: usize) -> u32 {
    max_connections.clamp(128, 65_535) as u32
}

/// A listening socket on `addr` with `backlog` (address reuse on, as tokio's `bind` does).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

impl Gatekeeper {
    /// Bind `addr`. `name` labels the listener in logs (`LISTENER=plain`, `LISTENER=tls`).
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        transport: Transport,
        accept_limits: ListenerLimits,
        shared: Shared,
    ) -> std::io::Result<Self> {
        let listener = listen(addr, backlog(accept_limits.max_connections))?;
        Ok(Self {
            listener,
            ctx: Arc::new(Context {
                listener: name,
                transport,
                accept_limits,
                shared,
            }),
            beat: crate::supervisor::Heartbeat::detached(),
        })
    }

    /// Beat `beat` on every accept and on an idle tick (see [`crate::supervisor`]).
    pub fn with_heartbeat(mut self, beat: crate::supervisor::Heartbeat) -> Self {
        self.beat = beat;
        self
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept until `shutdown`, then close every connection and wait for them.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = self.ctx.listener;
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.ctx.accept_limits.max_connections));
        let per_address = PerAddress::default();
        log::info!(
            listener = name,
            address:% = self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            "listener up"
        );
        let mut idle = crate::supervisor::Heartbeat::ticker();
        loop {
            self.beat.beat();
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = idle.tick() => continue,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        log::warn!(listener = name, error:% = e; "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let counters = self.ctx.shared.metering.gateway();
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                GatewayCounters::bump(&counters.connections_over_limit);
                log::warn!(
                    listener = name, peer:% = peer, rule = "max_connections",
                    limit = self.ctx.accept_limits.max_connections;
                    "connection refused: listener is at its connection limit"
                );
                continue;
            };
            let max_per = self.ctx.accept_limits.max_connections_per_address;
            let Some(address_slot) = per_address.try_take(peer.ip(), max_per) else {
                GatewayCounters::bump(&counters.connections_over_limit);
                log::warn!(
                    listener = name, peer:% = peer, rule = "max_connections_per_address",
                    limit = max_per;
                    "connection refused: too many connections from this address"
                );
                continue;
            };
            let ctx = self.ctx.clone();
            let stop = shutdown.child_token();
            tracker.spawn(async move {
                connection::accept(stream, peer, ctx, stop).await;
                drop(address_slot);
                drop(permit);
            });
        }
        drop(self.listener);
        tracker.close();
        tracker.wait().await;
        log::info!(listener = name; "listener closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listen_backlog_holds_a_ward_reconnecting_at_once() {
        assert_eq!(backlog(1024), 1024);
        assert_eq!(backlog(10), 128);
        let l = listen(SocketAddr::from(([127, 0, 0, 1], 0)), backlog(1024)).unwrap();
        let port = l.local_addr().unwrap().port();
        // The kernel's view: `ss` shows a listening socket's backlog as its Send-Q.
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) installed");
        let text = String::from_utf8_lossy(&out.stdout);
        let tx: u32 = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("ss output: {text}"));
        let cap: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .map(|v| v.trim().parse().unwrap_or(128))
            .unwrap_or(128);
        assert_eq!(tx, 1024.min(cap));
    }
}
