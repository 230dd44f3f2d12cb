//! Per-device traffic metering, kept in fixed time windows.
//!
//! Counters follow AWS Device Defender's cloud-side metrics, seen from the device: messages it
//! sent and received, bytes in and out, its largest message, authorization failures (forbidden
//! publish or subscribe), connection attempts (failed ones included), disconnects, and the
//! source addresses it connected from.
//!
//! Each device has totals since start, the current window, and the last `windows_kept` closed
//! windows. Windows are aligned to multiples of the window length since the UNIX epoch, so every
//! device's windows line up (the defender compares devices within one window).
//!
//! The API is [`Metering`] (one per gateway, cheap to clone) → [`DeviceMeter`] (one per
//! registered device, held by its connections) → [`DeviceSnapshot`] (plain data for the
//! status file and the defender). Only registered device ids get a meter, so an attacker cycling
//! through random client ids cannot grow memory; those attempts are counted in
//! [`GatewayCounters`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Counters for one window (or the totals).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// PUBLISH packets the device sent (`aws:num-messages-sent`).
    pub messages_sent: u64,
    /// PUBLISH packets delivered to the device (`aws:num-messages-received`).
    pub messages_received: u64,
    /// Bytes the device sent, all MQTT packets (`aws:all-bytes-in` seen from the gateway).
    pub bytes_in: u64,
    /// Bytes sent to the device, all MQTT packets.
    pub bytes_out: u64,
    /// Largest PUBLISH payload the device sent, in bytes (`aws:message-byte-size`).
    pub largest_message_bytes: u64,
    /// Forbidden PUBLISH or SUBSCRIBE attempts (`aws:num-authorization-failures`).
    pub authorization_failures: u64,
    /// CONNECT attempts, failed ones included (`aws:num-connection-attempts`).
    pub connection_attempts: u64,
    /// CONNECT attempts that were refused.
    pub connection_failures: u64,
    /// Connections that ended (`aws:num-disconnects`).
    pub disconnects: u64,
}

/// One window of a device's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Start, seconds since the UNIX epoch.
    pub start_s: u64,
    /// Length in seconds.
    pub length_s: u64,
    /// What happened in it.
    pub counters: Counters,
    /// Source addresses seen connecting in it (`aws:source-ip-address`).
    pub source_addresses: BTreeSet<IpAddr>,
}

/// Everything known about one device's traffic, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// Device id.
    pub device_id: String,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Peer of the open connection.
    pub peer: Option<SocketAddr>,
    /// Listener of the open connection.
    pub listener: Option<String>,
    /// Since start of the gateway.
    pub totals: Counters,
    /// The window in progress.
    pub current: Window,
    /// Closed windows, oldest first.
    pub history: Vec<Window>,
}

#[derive(Debug)]
struct State {
    totals: Counters,
    current: Window,
    history: VecDeque<Window>,
    connections: u32,
    peer: Option<SocketAddr>,
    listener: Option<&'static str>,
}

/// One device's meter. Every method is cheap (one uncontended lock).
#[derive(Debug)]
pub struct DeviceMeter {
    id: Arc<str>,
    window: Duration,
    kept: usize,
    state: Mutex<State>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn window_start(t: u64, len: u64) -> u64 {
    t - t % len.max(1)
}

impl DeviceMeter {
    fn new(id: Arc<str>, window: Duration, kept: usize) -> Self {
        let len = window.as_secs().max(1);
        Self {
            id,
            window,
            kept,
            state: Mutex::new(State {
                totals: Counters::default(),
                current: Window {
                    start_s: window_start(now_s(), len),
                    length_s: len,
                    counters: Counters::default(),
                    source_addresses: BTreeSet::new(),
                },
                history: VecDeque::new(),
                connections: 0,
                peer: None,
                listener: None,
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // Counters stay usable even if a holder panicked.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.rotate(&mut s, now_s());
        f(&mut s)
    }

    fn rotate(&self, s: &mut State, now: u64) {
        let len = self.window.as_secs().max(1);
        let start = window_start(now, len);
        if start == s.current.start_s {
            return;
        }
        let fresh = Window {
            start_s: start,
            length_s: len,
            counters: Counters::default(),
            source_addresses: BTreeSet::new(),
        };
        let closed = std::mem::replace(&mut s.current, fresh);
        s.history.push_back(closed);
        while s.history.len() > self.kept {
            s.history.pop_front();
        }
    }

    fn count(&self, f: impl Fn(&mut Counters)) {
        self.with(|s| {
            f(&mut s.totals);
            f(&mut s.current.counters);
        });
    }

    /// A CONNECT arrived from `peer` (counted whether or not it succeeds).
    pub fn connection_attempt(&self, peer: SocketAddr) {
        self.with(|s| {
            s.totals.connection_attempts += 1;
            s.current.counters.connection_attempts += 1;
            s.current.source_addresses.insert(peer.ip());
        });
    }

    /// The CONNECT was refused.
    pub fn connection_failed(&self) {
        self.count(|c| c.connection_failures += 1);
    }

    /// The connection was accepted.
    pub fn connected(&self, peer: SocketAddr, listener: &'static str) {
        self.with(|s| {
            s.connections += 1;
            s.peer = Some(peer);
            s.listener = Some(listener);
        });
    }

    /// An accepted connection ended.
    pub fn disconnected(&self) {
        self.with(|s| {
            s.connections = s.connections.saturating_sub(1);
            if s.connections == 0 {
                s.peer = None;
                s.listener = None;
            }
            s.totals.disconnects += 1;
            s.current.counters.disconnects += 1;
        });
    }

    /// The device sent a PUBLISH with `payload_bytes` of payload.
    pub fn message_sent(&self, payload_bytes: usize) {
        let n = payload_bytes as u64;
        self.count(|c| {
            c.messages_sent += 1;
            c.largest_message_bytes = c.largest_message_bytes.max(n);
        });
    }

    /// A PUBLISH was delivered to the device.
    pub fn message_received(&self) {
        self.count(|c| c.messages_received += 1);
    }

    /// `n` bytes arrived from the device.
    pub fn bytes_in(&self, n: usize) {
        self.count(|c| c.bytes_in += n as u64);
    }

    /// `n` bytes were written to the device.
    pub fn bytes_out(&self, n: usize) {
        self.count(|c| c.bytes_out += n as u64);
    }

    /// The device tried to publish or subscribe where its policy forbids it.
    pub fn authorization_failure(&self) {
        self.count(|c| c.authorization_failures += 1);
    }

    /// A copy of everything.
    pub fn snapshot(&self) -> DeviceSnapshot {
        self.with(|s| DeviceSnapshot {
            device_id: self.id.to_string(),
            connected: s.connections > 0,
            peer: s.peer,
            listener: s.listener.map(str::to_owned),
            totals: s.totals.clone(),
            current: s.current.clone(),
            history: s.history.iter().cloned().collect(),
        })
    }
}

/// Gateway-wide counters for traffic that has no registered device behind it.
#[derive(Debug, Default, Serialize)]
pub struct GatewayCounters {
    /// CONNECTs with a client id that is not registered.
    pub unknown_device_attempts: AtomicU64,
    /// TLS handshakes that failed (bad, expired, revoked or foreign certificates, timeouts).
    pub tls_handshake_failures: AtomicU64,
    /// Connections closed before CONNECT (timeout, malformed data).
    pub connections_closed_before_connect: AtomicU64,
    /// Connections refused because a listener or source address was at its limit.
    pub connections_over_limit: AtomicU64,
}

/// Plain copy of [`GatewayCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayCountersSnapshot {
    /// See [`GatewayCounters::unknown_device_attempts`].
    pub unknown_device_attempts: u64,
    /// See [`GatewayCounters::tls_handshake_failures`].
    pub tls_handshake_failures: u64,
    /// See [`GatewayCounters::connections_closed_before_connect`].
    pub connections_closed_before_connect: u64,
    /// See [`GatewayCounters::connections_over_limit`].
    pub connections_over_limit: u64,
}

impl GatewayCounters {
    /// Add one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy.
    pub fn snapshot(&self) -> GatewayCountersSnapshot {
        GatewayCountersSnapshot {
            unknown_device_attempts: self.unknown_device_attempts.load(Ordering::Relaxed),
            tls_handshake_failures: self.tls_handshake_failures.load(Ordering::Relaxed),
            connections_closed_before_connect: self
                .connections_closed_before_connect
                .load(Ordering::Relaxed),
            connections_over_limit: self.connections_over_limit.load(Ordering::Relaxed),
        }
    }
}

/// All meters of one gateway.
#[derive(Debug, Clone)]
pub struct Metering {
    devices: Arc<RwLock<HashMap<Arc<str>, Arc<DeviceMeter>>>>,
    gateway: Arc<GatewayCounters>,
    window: Duration,
    kept: usize,
}

impl Metering {
    /// Windows of `window`, keeping `kept` closed ones per device.
    pub fn new(window: Duration, kept: usize) -> Self {
        Self {
            devices: Arc::default(),
            gateway: Arc::default(),
            window,
            kept,
        }
    }

    /// The meter of a registered device (created on first use).
    pub fn device(&self, id: &Arc<str>) -> Arc<DeviceMeter> {
        if let Some(m) = self
            .devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return m.clone();
        }
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_insert_with(|| Arc::new(DeviceMeter::new(id.clone(), self.window, self.kept)))
            .clone()
    }

    /// Gateway-wide counters.
    pub fn gateway(&self) -> &GatewayCounters {
        &self.gateway
    }

    /// A snapshot of one device, if it has a meter.
    pub fn snapshot_of(&self, id: &str) -> Option<DeviceSnapshot> {
        let m = self
            .devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        m.map(|m| m.snapshot())
    }

    /// Snapshots of every metered device, sorted by id.
    pub fn snapshot(&self) -> Vec<DeviceSnapshot> {
        let meters: Vec<Arc<DeviceMeter>> = self
            .devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<DeviceSnapshot> = meters.iter().map(|m| m.snapshot()).collect();
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_totals_and_window_together() {
        let m = Metering::new(Duration::from_secs(300), 3);
        let d = m.device(&Arc::from("pm-1"));
        let peer: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        d.connection_attempt(peer);
        d.connected(peer, "plain");
        d.message_sent(10);
        d.message_sent(30);
        d.bytes_in(100);
        d.authorization_failure();
        let s = m.snapshot_of("pm-1").unwrap();
        assert!(s.connected);
        assert_eq!(s.totals.messages_sent, 2);
        assert_eq!(s.totals.largest_message_bytes, 30);
        assert_eq!(s.current.counters, s.totals);
        assert!(s.current.source_addresses.contains(&peer.ip()));
        d.disconnected();
        let s = m.snapshot_of("pm-1").unwrap();
        assert!(!s.connected);
        assert_eq!(s.totals.disconnects, 1);
    }

    #[test]
    fn windows_rotate_and_are_bounded() {
        let meter = DeviceMeter::new(Arc::from("x"), Duration::from_secs(10), 2);
        let base = window_start(now_s(), 10);
        {
            let mut s = meter.state.lock().unwrap();
            s.current.counters.messages_sent = 1;
            meter.rotate(&mut s, base + 10);
            s.current.counters.messages_sent = 2;
            meter.rotate(&mut s, base + 25);
            s.current.counters.messages_sent = 3;
            meter.rotate(&mut s, base + 31);
            assert_eq!(s.history.len(), 2, "only `kept` windows stay");
            assert_eq!(s.history[0].counters.messages_sent, 2);
            assert_eq!(s.history[1].counters.messages_sent, 3);
            assert_eq!(s.current.start_s, base + 30);
            assert_eq!(s.current.counters.messages_sent, 0);
        }
    }
}
