//! Shared by the gateway and store-and-forward benchmarks: QoS 1 devices publishing pacemaker
//! readings as fast as their in-flight window allows, with PUBACK latency measured per packet id.

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashMap;
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
