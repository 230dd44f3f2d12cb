//! The gatekeeper: the only door devices have into wardgate.
//!
//! It accepts device connections, reads their MQTT CONNECT, authenticates it against the
//! [`SharedRegistry`] (client id = device id, password checked against its argon2 hash), and only
//! then opens a relay to the internal broker, replacing the device's login with the internal
//! secret. From then on it relays MQTT 3.1.1 packets both ways, parsing every one, and hands every
//! device PUBLISH to the pipeline before the broker sees it.
//!
//! Why a relay and not rumqttd's own listener: rumqttd has no topic ACLs, no view of the peer
//! address or certificate at auth time, and awaits TLS handshakes inside its accept loop. Here
//! every connection is its own task, so one slow or hostile client only ever costs its own task.
//!
//! What must stay true:
//! - nothing reaches the broker before authentication succeeds;
//! - the device id attached to a reading is the authenticated one;
//! - malformed bytes close that one connection and nothing else;
//! - on shutdown the listener stops accepting first, then every connection closes, and
//!   [`Gatekeeper::run`] returns only after all connection tasks ended (so every reading they
//!   accepted is already in the pipeline channel).

mod connection;

use crate::broker::BrokerHandle;
use crate::pipeline::IngestSender;
use crate::registry::SharedRegistry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Limits one listener enforces.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Time from accept to a complete CONNECT.
    pub connect_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Shared by every connection of one listener.
#[derive(Debug)]
struct Context {
    listener: &'static str,
    registry: SharedRegistry,
    broker: BrokerHandle,
    ingest: IngestSender,
    limits: ListenerLimits,
}

/// One device-facing listener.
#[derive(Debug)]
pub struct Gatekeeper {
    listener: TcpListener,
    ctx: Arc<Context>,
}

impl Gatekeeper {
    /// Bind `addr`. `name` labels the listener in logs (`LISTENER=plain`).
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        limits: ListenerLimits,
        registry: SharedRegistry,
        broker: BrokerHandle,
        ingest: IngestSender,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            ctx: Arc::new(Context {
                listener: name,
                registry,
                broker,
                ingest,
                limits,
            }),
        })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept until `shutdown`, then close every connection and wait for them.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = self.ctx.listener;
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.ctx.limits.max_connections));
        log::info!(
            listener = name,
            address:% = self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            "listener up"
        );
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
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
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                log::warn!(
                    listener = name,
                    peer:% = peer,
                    limit = self.ctx.limits.max_connections,
                    rule = "max_connections";
                    "connection refused: listener is at its connection limit"
                );
                drop(stream);
                continue;
            };
            let ctx = self.ctx.clone();
            let stop = shutdown.child_token();
            tracker.spawn(async move {
                connection::serve(stream, peer, ctx, stop).await;
                drop(permit);
            });
        }
        drop(self.listener);
        tracker.close();
        tracker.wait().await;
        log::info!(listener = name; "listener closed");
    }
}
