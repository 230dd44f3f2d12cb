//! Shared by the benchmarks that drive devices: QoS 1 devices publishing pacemaker readings as
//! fast as their in-flight window allows, with PUBACK latency measured per packet id; the
//! coding of a reading's counter in its heart rate, so the cloud side can tell every reading
//! apart; a device's book of unacknowledged readings ([`Pending`]); and decoding what reaches
//! the cloud (the gateway's batches or relayed device messages) back into device readings.
//!
//! What must stay true: [`heart_rate`] and [`counter_of`] are inverse for counters below
//! 10^6 and keep the heart rate in 60–61 /min, inside what the pacemaker plugin keeps as
//! `good`; [`Pending`]'s `requested` is in the order the publishes go on the wire.
#![allow(dead_code)]

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Registry entries `pm-000`.. with the password `pw`.
pub fn devices(n: usize) -> Vec<wardgate::config::DeviceConfig> {
    (0..n)
        .map(|i| {
            wardgate::config::DeviceConfig::with_password(
                &format!("pm-{i:03}"),
                "pacemaker",
                wardgate::registry::hash_password_demo("pw"),
            )
        })
        .collect()
}

/// What a load run measured.
pub struct Load {
    /// PUBACK latencies, sorted.
    pub latencies: Vec<Duration>,
    /// Time the devices were publishing.
    pub elapsed: Duration,
}

impl Load {
    /// Latency percentile `p` (0..1).
    pub fn pct(&self, p: f64) -> Duration {
        let l = &self.latencies;
        l[((l.len() as f64 * p) as usize).min(l.len() - 1)]
    }

    /// Acknowledged publishes per second.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Run `n` devices against `addr` for `run`, each with 100 publishes in flight. `during` is
/// called right before the devices are told to stop.
pub async fn drive(addr: SocketAddr, n: usize, run: Duration, during: impl FnOnce()) -> Load {
    let running = Arc::new(AtomicBool::new(true));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut tasks = Vec::new();
    for i in 0..n {
        let id = format!("pm-{i:03}");
        let mut o = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
        o.set_credentials(id.clone(), "pw");
        o.set_inflight(100);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 200);
        let lat = latencies.clone();
        let poller = tokio::spawn(async move {
            let mut sent: HashMap<u16, Instant> = HashMap::new();
            let mut mine = Vec::new();
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        sent.insert(pkid, Instant::now());
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if let Some(t) = sent.remove(&a.pkid) {
                            mine.push(t.elapsed());
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            lat.lock().unwrap().extend(mine);
        });
        let go = running.clone();
        let publisher = tokio::spawn(async move {
            let topic = format!("ward/{id}/telemetry");
            let mut k = 0u64;
            while go.load(Ordering::Relaxed) {
                let payload = format!(
                    r#"{{"heartbeat":{},"ts":{},"battery_pct":87,"mode":"DDD"}}"#,
                    60 + k % 60,
                    wardgate::clock::now_ms()
                );
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                k += 1;
            }
            // Let the last acknowledgements arrive, then leave cleanly.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = client.disconnect().await;
        });
        tasks.push((publisher, poller));
    }
    let started = Instant::now();
    tokio::time::sleep(run).await;
    during();
    running.store(false, Ordering::Relaxed);
    for (p, q) in tasks {
        let _ = p.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), q).await;
    }
    let elapsed = started.elapsed() - Duration::from_millis(500);
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    Load { latencies, elapsed }
}

/// The heart rate that carries `counter` (`60 + counter / 10^6`): the pacemaker plugin keeps the
/// heart rate (not unknown fields), so this is how a reading stays identifiable upstream.
pub fn heart_rate(counter: u64) -> f64 {
    60.0 + counter as f64 / 1e6
}

/// The counter a heart rate carries.
pub fn counter_of(hr: f64) -> u64 {
    ((hr - 60.0) * 1e6).round() as u64
}

/// A device's readings not yet acknowledged: to send again, asked of rumqttc (not yet on the
/// wire, in order), on the wire by packet id.
#[derive(Default)]
pub struct Pending {
    /// The next new counter.
    pub next: u64,
    pub resend: VecDeque<u64>,
    pub requested: VecDeque<u64>,
    pub inflight: HashMap<u16, u64>,
}

impl Pending {
    pub fn empty(&self) -> bool {
        self.resend.is_empty() && self.requested.is_empty() && self.inflight.is_empty()
    }

    /// The connection broke: everything unacknowledged goes again, oldest first.
    pub fn broken(&mut self) {
        let mut again: Vec<u64> = self.requested.drain(..).collect();
        again.extend(self.inflight.drain().map(|(_, k)| k));
        again.extend(self.resend.drain(..));
        again.sort_unstable();
        again.dedup();
        self.resend = again.into();
    }
}

/// One device reading as the cloud received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub device: String,
    /// Its heart rate (see [`counter_of`]), when it has one.
    pub heart_rate: Option<f64>,
    /// The device's own time of the reading (`ts`, ms since the epoch).
    pub ts: Option<i64>,
}

/// The device readings in one message the cloud received on `topic`: a gateway batch
/// (`batch`, expanded with `wardgate::uplink::batch::expand`, one per record) or a device
/// message relayed as it was (`ward/<device>/...`, one). Nothing for what does not decode.
pub fn readings_in(batch: bool, topic: &str, payload: &[u8]) -> Vec<Received> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Vec::new();
    };
    if batch {
        let Ok(records) = wardgate::uplink::batch::expand(&v) else {
            return Vec::new();
        };
        records
            .into_iter()
            .map(|(_, m)| {
                let readings = m["readings"].as_array();
                let hr = readings
                    .and_then(|r| r.iter().find(|r| r["metric"] == "heart-rate"))
                    .and_then(|r| r["value"].as_f64());
                let ts = readings
                    .and_then(|r| r.first())
                    .and_then(|r| r["observed_at_ms"].as_i64());
                Received {
                    device: m["device_id"].as_str().unwrap_or_default().to_owned(),
                    heart_rate: hr,
                    ts,
                }
            })
            .collect()
    } else {
        let device = topic.split('/').nth(1).unwrap_or_default().to_owned();
        vec![Received {
            device,
            heart_rate: v["heartbeat"].as_f64(),
            ts: v["ts"].as_i64(),
        }]
    }
}
