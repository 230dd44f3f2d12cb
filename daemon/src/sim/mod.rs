//! The ward simulator: real MQTT clients playing the devices of a ward, each vendor with its own
//! raw format so normalisation has real work to do.
//!
//! | device id          | kind            | vendor format                                   | every |
//! |--------------------|-----------------|-------------------------------------------------|-------|
//! | `pacemaker-NN`     | pacemaker       | JSON, heart rate 80–110 bpm, epoch-ms time      | 15 s  |
//! | `pacemaker-alarm-NN` | pacemaker     | same format, one reading of 141 bpm, then quiet | once  |
//! | `glucose-a-NN`     | glucose         | JSON, mg/dL, RFC 3339 time                      | 60 s  |
//! | `glucose-b-NN`     | glucose         | `SS1;<mmol/L>;mmol/L;<epoch s>` text            | 60 s  |
//! | `bedtemp-NN`       | bed-temperature | `bed=NN temp_f=<°F> ts=<epoch s>` text          | 5 s   |
//! | `rogue-NN`         | generic         | 100 random characters; subscribed to its topic  | 1 s   |
//!
//! Every device publishes at QoS 1 on `ward/<device id>/telemetry`. `speed` divides every
//! interval; `copies` repeats the whole ward (`NN` = 01, 02, ...). Demo passwords are
//! `demo-<device id>`: public by design, for simulated devices only.

use crate::config::DeviceConfig;
use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// A vendor's device model and payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Pacemaker, JSON.
    Pacemaker,
    /// Pacemaker sending one tachycardia reading (141 bpm).
    PacemakerAlarm,
    /// Glucose monitor, JSON in mg/dL.
    GlucoseMgDl,
    /// Glucose monitor, text in mmol/L.
    GlucoseMmolL,
    /// Bed temperature monitor, text in °F.
    BedTemperatureF,
    /// A compromised agent flooding random strings.
    Rogue,
}

impl Model {
    const ALL: [(Model, &'static str, &'static str); 6] = [
        (Model::Pacemaker, "pacemaker", "pacemaker"),
        (Model::PacemakerAlarm, "pacemaker-alarm", "pacemaker"),
        (Model::GlucoseMgDl, "glucose-a", "glucose"),
        (Model::GlucoseMmolL, "glucose-b", "glucose"),
        (Model::BedTemperatureF, "bedtemp", "bed-temperature"),
        (Model::Rogue, "rogue", "generic"),
    ];

    /// Interval between readings at speed 1 (`None`: sends once).
    pub fn interval(self) -> Option<Duration> {
        match self {
            Model::Pacemaker => Some(Duration::from_secs(15)),
            Model::PacemakerAlarm => None,
            Model::GlucoseMgDl | Model::GlucoseMmolL => Some(Duration::from_secs(60)),
            Model::BedTemperatureF => Some(Duration::from_secs(5)),
            Model::Rogue => Some(Duration::from_secs(1)),
        }
    }

    /// One raw payload in this vendor's format.
    pub fn payload(self, index: usize, now: SystemTime, rng: &mut impl Rng) -> Vec<u8> {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        match self {
            Model::Pacemaker | Model::PacemakerAlarm => {
                let hr = if self == Model::PacemakerAlarm {
                    141
                } else {
                    rng.gen_range(80..=110)
                };
                serde_json::json!({
                    "heartbeat": hr,
                    "ts": since.as_millis() as u64,
                    "battery_pct": rng.gen_range(70..=100),
                    "mode": "DDD",
                })
                .to_string()
                .into_bytes()
            }
            Model::GlucoseMgDl => serde_json::json!({
                "glucose": { "value": rng.gen_range(70..=180), "unit": "mg/dL" },
                "measured_at": humantime::format_rfc3339_seconds(now).to_string(),
                "sensor": format!("GC-{index:04}"),
            })
            .to_string()
            .into_bytes(),
            Model::GlucoseMmolL => format!(
                "SS1;{:.1};mmol/L;{}",
                rng.gen_range(3.9..=10.0f64),
                since.as_secs()
            )
            .into_bytes(),
            Model::BedTemperatureF => format!(
                "bed={index:02} temp_f={:.1} ts={}",
                rng.gen_range(96.8..=100.4f64),
                since.as_secs()
            )
            .into_bytes(),
            Model::Rogue => rng
                .sample_iter(&rand::distributions::Alphanumeric)
                .take(100)
                .collect(),
        }
    }
}

/// One simulated device.
#[derive(Debug, Clone)]
pub struct SimDevice {
    /// Device id (MQTT client id).
    pub id: String,
    /// Device kind, as registered.
    pub kind: &'static str,
    /// Vendor model.
    pub model: Model,
    /// Which copy of the ward it belongs to (1-based).
    pub index: usize,
}

impl SimDevice {
    /// Its demo password.
    pub fn password(&self) -> String {
        demo_password(&self.id)
    }

    /// The topic it publishes on.
    pub fn topic(&self) -> String {
        format!("ward/{}/telemetry", self.id)
    }
}

/// The public password of a simulated device.
pub fn demo_password(id: &str) -> String {
    format!("demo-{id}")
}

/// The devices of `copies` simulated wards.
pub fn ward(copies: usize) -> Vec<SimDevice> {
    (1..=copies.max(1))
        .flat_map(|i| {
            Model::ALL.iter().map(move |(model, base, kind)| SimDevice {
                id: format!("{base}-{i:02}"),
                kind,
                model: *model,
                index: i,
            })
        })
        .collect()
}

/// Registry entries for simulated devices (cheap demo hashes).
pub fn registry_entries(devices: &[SimDevice]) -> Vec<DeviceConfig> {
    devices
        .iter()
        .map(|d| {
            let mut c = DeviceConfig::with_password(
                &d.id,
                d.kind,
                crate::registry::hash_password_demo(&d.password()),
            );
            c.description = Some(format!("simulated {:?}", d.model));
            c
        })
        .collect()
}

/// The `[[devices]]` TOML for simulated devices, to paste into a gateway's configuration.
pub fn registry_toml(devices: &[SimDevice]) -> String {
    #[derive(serde::Serialize)]
    struct Doc {
        devices: Vec<DeviceConfig>,
    }
    toml::to_string(&Doc {
        devices: registry_entries(devices),
    })
    .expect("device entries serialise to TOML")
}

/// Counters of a simulation run.
#[derive(Debug, Default)]
pub struct SimStats {
    /// PUBLISHes handed to the MQTT client.
    pub published: AtomicU64,
    /// PUBACKs received.
    pub acked: AtomicU64,
    /// Messages received on subscriptions.
    pub received: AtomicU64,
    /// Connection errors seen (each followed by a reconnect).
    pub connection_errors: AtomicU64,
}

/// Run every device against the gatekeeper at `addr` until `stop`.
pub async fn run(
    addr: SocketAddr,
    devices: Vec<SimDevice>,
    speed: f64,
    stats: Arc<SimStats>,
    stop: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for d in devices {
        tasks.spawn(run_device(addr, d, speed, stats.clone(), stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

async fn run_device(
    addr: SocketAddr,
    dev: SimDevice,
    speed: f64,
    stats: Arc<SimStats>,
    stop: CancellationToken,
) {
    let mut opts = MqttOptions::new(dev.id.clone(), addr.ip().to_string(), addr.port());
    opts.set_credentials(dev.id.clone(), dev.password());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let topic = dev.topic();
    if dev.model == Model::Rogue {
        // The rogue agent also listens to its own topic (as in the ward design).
        let _ = client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
    }
    let poll_stats = stats.clone();
    let poll_stop = stop.clone();
    let id = dev.id.clone();
    // The poller runs until the DISCONNECT requested at the end has gone out, so the gateway
    // sees a clean disconnect.
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                // rumqttc reports the DISCONNECT before flushing it: keep polling until the
                // gateway closes the connection.
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {}
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    poll_stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    poll_stats.received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) if poll_stop.is_cancelled() => break,
                Err(e) => {
                    poll_stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!(device_id:% = id, error:% = e; "simulated device: connection error, retrying in 1s");
                    tokio::select! {
                        _ = poll_stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    });

    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        1.0
    };
    let mut rng = rand::rngs::StdRng::from_entropy();
    // Spread devices out so a large ward does not publish in lock-step.
    let jitter = Duration::from_millis(rng.gen_range(0..1000)).div_f64(speed);
    let first = match dev.model.interval() {
        Some(_) => jitter,
        // The one-shot alarm comes a little after the ward is up.
        None => Duration::from_secs(10).div_f64(speed) + jitter,
    };
    tokio::select! {
        _ = stop.cancelled() => {},
        _ = tokio::time::sleep(first) => loop {
            let payload = dev.model.payload(dev.index, SystemTime::now(), &mut rng);
            if client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.is_err() {
                break;
            }
            stats.published.fetch_add(1, Ordering::Relaxed);
            let Some(every) = dev.model.interval() else { break };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every.div_f64(speed)) => {}
            }
        },
    }
    if dev.model.interval().is_none() {
        // The one-shot device stays connected until stopped so its PUBACK arrives.
        stop.cancelled().await;
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(2), poller)
        .await
        .is_err()
    {
        log::debug!(device_id:% = dev.id; "simulated device: no clean disconnect within 2s");
    }
}

use rand::SeedableRng as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ward_has_every_model_per_copy_with_unique_ids() {
        let w = ward(3);
        assert_eq!(w.len(), 18);
        let ids: std::collections::HashSet<_> = w.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids.len(), 18);
        assert!(ids.contains("pacemaker-03"));
    }

    #[test]
    fn payloads_follow_each_vendor_format() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Now with a millisecond part: the vendors sending seconds must drop it.
        let ms = crate::clock::now_ms() / 1000 * 1000 + 250;
        let (secs, now) = (ms / 1000, UNIX_EPOCH + Duration::from_millis(ms as u64));
        let pm: serde_json::Value =
            serde_json::from_slice(&Model::Pacemaker.payload(1, now, &mut rng)).unwrap();
        let hr = pm["heartbeat"].as_u64().unwrap();
        assert!((80..=110).contains(&hr));
        assert_eq!(pm["ts"], ms);
        let alarm: serde_json::Value =
            serde_json::from_slice(&Model::PacemakerAlarm.payload(1, now, &mut rng)).unwrap();
        assert_eq!(alarm["heartbeat"], 141);
        let g = String::from_utf8(Model::GlucoseMmolL.payload(1, now, &mut rng)).unwrap();
        assert!(
            g.starts_with("SS1;") && g.ends_with(&format!(";mmol/L;{secs}")),
            "{g}"
        );
        let t = String::from_utf8(Model::BedTemperatureF.payload(2, now, &mut rng)).unwrap();
        assert!(
            t.starts_with("bed=02 temp_f=") && t.ends_with(&format!(" ts={secs}")),
            "{t}"
        );
        assert_eq!(Model::Rogue.payload(1, now, &mut rng).len(), 100);
    }

    #[test]
    fn registry_toml_is_a_valid_device_list() {
        let text = registry_toml(&ward(1));
        assert_eq!(text.matches("[[devices]]").count(), 6);
        assert!(
            !text.contains("demo-pacemaker-01"),
            "plain passwords must not appear"
        );
    }
}
