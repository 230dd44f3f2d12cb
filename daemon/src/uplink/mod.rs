//! The uplink: drains the durable queue to AWS IoT Core over mutual TLS (rumqttc + rustls).
//!
//! - Connection: client id = the gateway's thing name, `clean_session = false`, SNI = the
//!   endpoint host; port 8883, or 443 with ALPN `x-amzn-mqtt-ca` (`upstream.alpn` overrides,
//!   e.g. behind a port-forwarding firewall). Reconnects with exponential
//!   backoff (1 s doubling to `upstream.max_backoff`, ±25 % jitter) — rumqttc itself would
//!   retry at once.
//! - Streams and topics ([`topics`]): each record belongs to a stream with its own topic
//!   template (`upstream.topics`). Telemetry and alerts are batched: records bound for the same
//!   topic are packed into one upstream message of at most `upstream.max_batch_bytes`, in
//!   batch format 2 ([`batch`]: what records share written once, readings grouped per
//!   device); every record keeps its queue sequence number, so the cloud can drop duplicates
//!   (delivery is at-least-once). Shadow updates and defender reports must arrive in AWS's own document
//!   format, so each goes alone, as it was queued; a shadow update without a `clientToken`
//!   gets `<thing>:<seq>` (IoT Core echoes it on `/accepted` and `/rejected`).
//! - Undeliverable records (a topic IoT Core refuses, a message over `max_batch_bytes`, a
//!   payload that is not JSON) would be refused forever — with IoT Core, by closing the
//!   connection, which would stall everything behind them. They are set aside in the queue's
//!   `undeliverable` tree with an ERROR naming the record, and counted.
//! - Quotas: at most `upstream.max_inflight` unacknowledged publishes, and a pace ([`pace`]:
//!   a token bucket for publishes, a sliding window for bytes) that keeps every one-second
//!   window within `max_publishes_per_second` and `max_bytes_per_second` (IoT Core: 100,
//!   100/s, 512 KiB/s). A message goes as soon as the pace allows it; the records that arrive
//!   while it waits share the next one, so waiting for the budget is what makes batches (no
//!   timer holds a reading back). `max_linger` is only how often the queue is looked at
//!   without a wake-up. A large batch that waits for room is kept as built (`send_ready`'s
//!   `held`) rather than rebuilt at every wake-up.
//! - Correlation: rumqttc reports `Outgoing::Publish(pkid)` in request order, so each batch's
//!   sequence numbers are tied to its packet id; on `PubAck(pkid)` exactly those records are
//!   removed from the queue. Nothing is removed any other way (except eviction by the queue's
//!   own bounds).
//! - After any connection error everything unacknowledged is read again from the queue, oldest
//!   first (rumqttc's own in-memory retries are not trusted: they vanish with the session).
//!
//! - Order: alarm and security records go first (oldest first among them), then the backlog
//!   oldest first alongside live traffic.
//!
//! - TLS: the CA, client certificate and key are loaded by [`load_tls`] in `check-config` and
//!   before READY=1, so a broken file stops the start with a message naming it; the loaded
//!   configuration is reused for every session and every restart.
//! - Supervision: the uplink is a restartable stage ([`crate::supervisor`]): if it ever ends
//!   or panics, a new [`Uplink::run`] starts after a backoff and re-reads everything
//!   unacknowledged from the queue.
//!
//! Producers queue records through [`crate::queue::Enqueue`] (the gateway hands one out as
//! [`crate::app::Gateway::outbox`]); the uplink needs nothing else to forward a new stream.

pub mod batch;
pub mod pace;
pub mod topics;

use crate::config::UpstreamConfig;
pub use crate::gatekeeper::tls::TlsError;
use crate::queue::{Record, SharedQueue, Store, Stream};
use crate::shadow::sync::{CloudEvent, CloudLink};
use crate::supervisor::Heartbeat;
use batch::{Added, Builder};
use pace::Pace;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Records read from the queue per look.
const READ_LIMIT: usize = 2000;

/// Counters and state, for the status view and tests.
#[derive(Debug, Default)]
pub struct UplinkStats {
    /// Whether a session with the upstream is up.
    pub connected: AtomicBool,
    /// Upstream messages acknowledged.
    pub batches_acked: AtomicU64,
    /// Queue records removed after acknowledgement.
    pub records_delivered: AtomicU64,
    /// Connection attempts that failed or sessions that broke.
    pub connection_errors: AtomicU64,
    /// Sessions established (CONNACK received).
    pub connects: AtomicU64,
    /// PUBLISH packets handed to the upstream connection (batches, shadow and defender
    /// messages, shadow fetches), resends included.
    pub publishes: AtomicU64,
    /// Their payload bytes.
    pub publish_bytes: AtomicU64,
    /// Records delivered per stream, indexed by [`Stream`] as `usize` (telemetry, alerts,
    /// shadow, defender).
    pub delivered_by_stream: [AtomicU64; 4],
}

impl UplinkStats {
    /// One PUBLISH of `bytes` payload bytes handed to the connection.
    fn published(&self, bytes: usize) {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        self.publish_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Records of `stream` delivered since start.
    pub fn delivered(&self, stream: Stream) -> u64 {
        self.delivered_by_stream[stream as usize].load(Ordering::Relaxed)
    }
}

/// Load the upstream's CA, client certificate and key into a TLS client configuration, or say
/// which file is wrong, what is wrong with it, and how to fix it. `check-config` runs this, and
/// the gateway runs it before READY=1, so a broken file never surfaces after start-up.
pub fn load_tls(cfg: &UpstreamConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let file = |key: &'static str, p: &Option<std::path::PathBuf>| {
        p.clone().ok_or_else(|| TlsError {
            key,
            path: Default::default(),
            problem: "not set; it is required when upstream.enabled = true".into(),
        })
    };
    let ca = file("upstream.ca_file", &cfg.ca_file)?;
    let cert = file("upstream.cert_file", &cfg.cert_file)?;
    let key = file("upstream.key_file", &cfg.key_file)?;
    let bad = |key: &'static str, path: &std::path::Path, problem: String| TlsError {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in read_pem_certs("upstream.ca_file", &ca, "the CA that signed the endpoint's server certificate (for AWS IoT Core: AmazonRootCA1.pem)")? {
        roots.add(c).map_err(|e| {
            bad(
                "upstream.ca_file",
                &ca,
                format!("not a usable CA certificate ({e}); use the CA that signed the endpoint's server certificate (for AWS IoT Core: AmazonRootCA1.pem)"),
            )
        })?;
    }
    let chain = read_pem_certs(
        "upstream.cert_file",
        &cert,
        "the gateway's client certificate registered with the endpoint (for AWS IoT Core: the thing's certificate.pem.crt)",
    )?;
    check_validity(&cert, &chain[0])?;
    let private = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
        bad(
            "upstream.key_file",
            &key,
            format!(
                "no usable private key ({e}); it must hold the PEM private key (PKCS#8, PKCS#1 or SEC1) of upstream.cert_file, readable by the wardgate user"
            ),
        )
    })?;
    let provider = crate::gatekeeper::tls::provider();
    // Parsed on its own first, so a broken key is not reported as a mismatch.
    provider
        .key_provider
        .load_private_key(private.clone_key())
        .map_err(|e| {
            bad(
                "upstream.key_file",
                &key,
                format!(
                    "no usable private key ({e}); it must hold the PEM private key (PKCS#8, PKCS#1 or SEC1) of upstream.cert_file"
                ),
            )
        })?;
    let mut config =
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("upstream", std::path::Path::new(""), format!("no usable TLS versions: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|e| {
                bad(
                    "upstream.key_file",
                    &key,
                    format!(
                        "does not belong to upstream.cert_file ({}) or is unsupported ({e}); use the key the certificate was issued for",
                        cert.display()
                    ),
                )
            })?;
    config.alpn_protocols = cfg.alpn_protocols();
    Ok(Arc::new(config))
}

fn read_pem_certs(
    key: &'static str,
    path: &std::path::Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |problem: String| TlsError {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            bad(format!(
                "cannot read it ({e}); it must be readable by the wardgate user"
            ))
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM ({e}); it must hold {what}")))?;
    if certs.is_empty() {
        return Err(bad(format!(
            "no CERTIFICATE block in it; it must hold {what}"
        )));
    }
    Ok(certs)
}

/// The client certificate must parse and be within its validity period now: the endpoint
/// would refuse it at every handshake otherwise.
fn check_validity(path: &std::path::Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    use x509_parser::prelude::*;
    let bad = |problem: String| TlsError {
        key: "upstream.cert_file",
        path: path.to_path_buf(),
        problem,
    };
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| bad(format!("the first certificate does not parse ({e})")))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(bad(format!(
            "the certificate expired on {}; install a renewed certificate (and its key) for this gateway",
            validity.not_after
        )));
    }
    if now < validity.not_before {
        return Err(bad(format!(
            "the certificate is not valid before {}; check the gateway's clock, or install a certificate valid now",
            validity.not_before
        )));
    }
    Ok(())
}

/// The uplink stage: everything one run needs (cloned for every restart; see
/// [`crate::supervisor`]: a new run re-reads every unacknowledged record from the queue).
#[derive(Debug, Clone)]
pub struct Uplink {
    /// Upstream settings.
    pub cfg: UpstreamConfig,
    /// The thing name (client id).
    pub gateway_id: String,
    /// TLS material, loaded before start ([`load_tls`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// The durable queue it drains.
    pub queue: SharedQueue,
    /// Counters.
    pub stats: Arc<UplinkStats>,
    /// The link to the shadow service, when device shadows are kept in step with the cloud
    /// (the shadow topic is a shadow update topic: [`topics::CloudShadowTopics`]).
    pub sync: Option<crate::shadow::sync::CloudLink>,
    /// Reloaded settings and TLS material ([`Reconfigured`]): the session in progress ends and
    /// the next one uses them at once (records not yet acknowledged stay queued and go again).
    pub reload: Option<tokio::sync::watch::Receiver<Reconfigured>>,
}

/// What a reload gives the uplink: its new `[upstream]` settings and their TLS material.
pub type Reconfigured = Arc<(UpstreamConfig, Arc<rustls::ClientConfig>)>;

impl Uplink {
    /// Drain the queue to the upstream until `stop`, beating `beat` on every event, on an
    /// idle tick while connected, and while waiting to reconnect. (A connection attempt is
    /// never interrupted for a beat: rumqttc would start it over; it is bounded by rumqttc's
    /// connection timeout.)
    pub async fn run(self, stop: CancellationToken, beat: Heartbeat) {
        let Uplink {
            mut cfg,
            gateway_id,
            mut tls,
            queue,
            stats,
            sync,
            mut reload,
        } = self;
        // The newest settings: at a (re)start of the run, and after a reload.
        let take_latest = |r: &mut tokio::sync::watch::Receiver<Reconfigured>| {
            let latest = r.borrow_and_update().clone();
            (latest.0.clone(), latest.1.clone())
        };
        if let Some(r) = &mut reload {
            (cfg, tls) = take_latest(r);
        }
        // A reload never changes the shadow topic while shadows are synced (it needs a
        // restart), so these topics hold for the whole run.
        let cloud = sync.and_then(|link| {
            topics::CloudShadowTopics::of(&cfg.topics.shadow, &gateway_id).map(|t| (link, t))
        });
        // A restarted run starts without a session, whatever the last one left here.
        stats.connected.store(false, Ordering::Relaxed);
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            let session_stop = stop.child_token();
            let outcome = {
                let s = session(
                    &cfg,
                    &gateway_id,
                    tls.clone(),
                    &queue,
                    &stats,
                    cloud.as_ref(),
                    &session_stop,
                    &beat,
                );
                tokio::pin!(s);
                let changed = async {
                    match &mut reload {
                        Some(r) => r.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(changed);
                tokio::select! {
                    o = &mut s => o,
                    // A reload ends the session (it finishes what it has, as on a stop); a
                    // gone sender changes nothing.
                    reloaded = &mut changed => {
                        if reloaded {
                            session_stop.cancel();
                        }
                        s.await
                    }
                }
            };
            // The shadow service hears of it before anyone can see `connected` go false.
            if let Some((link, _)) = &cloud {
                tokio::select! {
                    _ = link.events.send(CloudEvent::Disconnected) => {}
                    _ = stop.cancelled() => return,
                }
            }
            stats.connected.store(false, Ordering::Relaxed);
            if stop.is_cancelled() {
                return;
            }
            if session_stop.is_cancelled() {
                if let Some(r) = &mut reload {
                    (cfg, tls) = take_latest(r);
                }
                log::info!(
                    endpoint:% = cfg.endpoint;
                    "upstream settings reloaded: reconnecting with them; records not yet acknowledged stay queued and go again"
                );
                backoff = Duration::from_secs(1);
                continue;
            }
            stats.connection_errors.fetch_add(1, Ordering::Relaxed);
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_secs(1);
            }
            let jitter = 0.75 + rand::random::<f64>() * 0.5;
            let wait = backoff.mul_f64(jitter);
            let q = queue_status(&queue).await;
            log::warn!(
                endpoint:% = cfg.endpoint, error:% = outcome, retry_in_ms = wait.as_millis() as u64,
                queued = q.depth, queued_bytes = q.bytes, oldest_age_s = q.oldest_age_s,
                evicted = q.evicted_over_bytes + q.evicted_over_age;
                "upstream connection lost or refused; {} records stay queued (oldest {} s)", q.depth, q.oldest_age_s
            );
            let pause = tokio::time::sleep(wait);
            tokio::pin!(pause);
            let mut idle = Heartbeat::ticker();
            loop {
                beat.beat();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = &mut pause => break,
                    _ = idle.tick() => {}
                }
            }
            backoff = (backoff * 2).min(cfg.max_backoff);
        }
    }
}

/// The queue at a glance, read off the async threads.
async fn queue_status(queue: &SharedQueue) -> crate::queue::QueueStatus {
    let q = queue.clone();
    tokio::task::spawn_blocking(move || q.status())
        .await
        .unwrap_or_default()
}

/// The client token of the gateway's own shadow fetches.
const FETCH_TOKEN: &str = "wardgate-sync";

/// Log Device Defender's reply to one of the gateway's own reports, sent on `own` (`.../accepted`:
/// debug; `.../rejected`: a warning with AWS's reason). Whether `topic` was one.
fn defender_reply(own: &str, topic: &str, payload: &[u8]) -> bool {
    let Some(outcome) = topic.strip_prefix(own).and_then(|t| t.strip_prefix('/')) else {
        return false;
    };
    let v: serde_json::Value = if own.ends_with("/cbor") {
        ciborium::from_reader(payload).unwrap_or_default()
    } else {
        serde_json::from_slice(payload).unwrap_or_default()
    };
    let id = v["reportId"].as_u64().unwrap_or(0);
    match outcome {
        "accepted" => {
            log::debug!(report_id = id; "Device Defender accepted the gateway's metrics report {id}");
            true
        }
        "rejected" => {
            let why = v["statusDetails"]["ErrorMessage"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned());
            log::warn!(report_id = id, reason:% = why; "Device Defender rejected the gateway's metrics report {id}: {why}");
            true
        }
        _ => false,
    }
}

/// What a message from the cloud shadows means for the shadow service, if anything.
fn cloud_event(
    topics: &topics::CloudShadowTopics,
    topic: &str,
    payload: &[u8],
) -> Option<CloudEvent> {
    use topics::CloudShadowMessage as M;
    let (thing, kind) = topics.parse(topic)?;
    let v: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            log::warn!(topic:% = topic, error:% = e; "cloud shadow message is not JSON: ignored");
            return None;
        }
    };
    let ours = v.get("clientToken").and_then(|t| t.as_str()) == Some(FETCH_TOKEN);
    match kind {
        M::Documents => {
            let current = v.get("current")?;
            Some(CloudEvent::Desired {
                thing,
                version: current.get("version").and_then(|n| n.as_u64()),
                desired: current.pointer("/state/desired").cloned(),
                fetched: false,
            })
        }
        M::GetAccepted => Some(CloudEvent::Desired {
            thing,
            version: v.get("version").and_then(|n| n.as_u64()),
            desired: v.pointer("/state/desired").cloned(),
            fetched: ours,
        }),
        M::GetRejected if ours && v.get("code").and_then(|c| c.as_u64()) == Some(404) => {
            Some(CloudEvent::Desired {
                thing,
                version: None,
                desired: None,
                fetched: true,
            })
        }
        M::GetRejected => {
            if ours {
                log::warn!(thing:% = thing, answer:% = v; "the cloud refused the gateway's shadow fetch; desired changes made here wait until the next connection");
            }
            None
        }
    }
}

/// One connection, until it fails (returns why) or `stop`.
#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &UpstreamConfig,
    gateway_id: &str,
    tls: Arc<rustls::ClientConfig>,
    queue: &SharedQueue,
    stats: &UplinkStats,
    cloud: Option<&(CloudLink, topics::CloudShadowTopics)>,
    stop: &CancellationToken,
    beat: &Heartbeat,
) -> String {
    let mut o = MqttOptions::new(gateway_id, cfg.endpoint.clone(), cfg.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o.set_inflight(cfg.max_inflight);
    o.set_max_packet_size(cfg.max_batch_bytes + 4096, cfg.max_batch_bytes + 4096);
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut el) = AsyncClient::new(o, cfg.max_inflight as usize + 4);
    // Batches handed to rumqttc, waiting for their packet id; then packet id → sequence numbers.
    let mut awaiting_pkid: VecDeque<(Stream, Vec<u64>)> = VecDeque::new();
    let mut inflight: HashMap<u16, (Stream, Vec<u64>)> = HashMap::new();
    let mut cursor: Option<u64> = None;
    // Records handed to rumqttc in this session and not yet acknowledged.
    let mut sent: HashSet<u64> = HashSet::new();
    // A large message built but waiting for its tokens (its records are in `sent`).
    let mut held: Option<Message> = None;
    let mut pace = Pace::new(cfg.max_publishes_per_second, cfg.max_bytes_per_second);
    let mut connected = false;
    // (connected at, records queued then) until the queue first runs empty.
    let mut backlog: Option<(Instant, usize)> = None;
    // Whether the queue may hold records not yet handed to rumqttc in this session.
    let mut pending = true;
    // When the pace allows the next message (armed only while records wait for it).
    let paced = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(paced);
    let mut paced_armed = false;
    // A safety net: look at the queue at least this often even if no wake-up came.
    let mut linger = tokio::time::interval(cfg.max_linger.max(Duration::from_millis(1)));
    linger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = Heartbeat::ticker();
    // Devices whose cloud shadow to fetch (the shadow service asks after every connection).
    let mut fetch_rx = match cloud {
        Some((link, _)) => Some(link.fetch.lock().await),
        None => None,
    };
    let mut to_fetch: VecDeque<String> = VecDeque::new();
    // Fetches take at most this share of the publish quota, so that 500 of them after a
    // reconnection do not hold up the readings.
    let mut fetch_pace = Pace::new(cfg.shadow_updates_per_second.max(2), 1 << 30);
    let fetch_due = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(fetch_due);
    let mut fetch_armed = false;
    // Where the gateway's own Device Defender reports go; IoT Core replies below it.
    let own_defender = topics::expand(&cfg.topics.defender, gateway_id, gateway_id);
    loop {
        beat.beat();
        // Shadow fetches first: they are small, and desired changes made on the ward wait for
        // them. They share the window and the quotas with everything else.
        if let (true, false, Some((_, topics))) = (connected, fetch_armed, cloud) {
            while let Some(device) = to_fetch.front() {
                if awaiting_pkid.len() + inflight.len() >= cfg.max_inflight as usize {
                    break;
                }
                let body = format!(r#"{{"clientToken":"{FETCH_TOKEN}"}}"#);
                let topic = topics.get(device);
                let bytes = pace::wire_bytes(&topic, body.len());
                let now = Instant::now();
                let wait = pace.wait(bytes, now).max(fetch_pace.wait(0, now));
                if !wait.is_zero() {
                    fetch_due.as_mut().reset(tokio::time::Instant::now() + wait);
                    fetch_armed = true;
                    break;
                }
                let _ = fetch_pace.try_take(0, now);
                let _ = pace.try_take(bytes, now);
                let len = body.len();
                if client
                    .try_publish(topic, QoS::AtLeastOnce, false, body)
                    .is_err()
                {
                    break;
                }
                stats.published(len);
                awaiting_pkid.push_back((Stream::Shadow, Vec::new()));
                to_fetch.pop_front();
            }
        }
        let room = connected && awaiting_pkid.len() + inflight.len() < cfg.max_inflight as usize;
        if room && pending && !paced_armed {
            let sent_now = send_ready(
                cfg,
                gateway_id,
                &client,
                queue,
                &mut cursor,
                &mut sent,
                &mut awaiting_pkid,
                &inflight,
                &mut pace,
                &mut held,
                stats,
            )
            .await;
            match sent_now {
                Ready::Drained => pending = false,
                Ready::Window => {}
                Ready::Paced(wait) => {
                    paced.as_mut().reset(tokio::time::Instant::now() + wait);
                    paced_armed = true;
                }
            }
        }
        tokio::select! {
            // Only while connected: interrupting rumqttc's connection attempt restarts it.
            _ = idle.tick(), if connected => {}
            _ = stop.cancelled() => {
                let _ = client.try_disconnect();
                return "stopping".into();
            }
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    stats.connected.store(true, Ordering::Relaxed);
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    let q = queue_status(queue).await;
                    log::info!(
                        endpoint:% = cfg.endpoint, session_present = ack.session_present,
                        queued = q.depth, queued_bytes = q.bytes, oldest_age_s = q.oldest_age_s;
                        "upstream connected; {} queued records to deliver", q.depth
                    );
                    if q.depth > 0 {
                        backlog = Some((Instant::now(), q.depth));
                    }
                    // Device Defender's replies to the gateway's own reports.
                    if own_defender.starts_with("$aws/things/") {
                        for f in [format!("{own_defender}/accepted"), format!("{own_defender}/rejected")] {
                            if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                                return format!("subscribing to {f}: {e}");
                            }
                        }
                    }
                    if let Some((link, topics)) = cloud {
                        for f in topics.filters() {
                            if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                                return format!("subscribing to {f}: {e}");
                            }
                        }
                        let _ = link.events.send(CloudEvent::Connected).await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    defender_reply(&own_defender, &p.topic, &p.payload);
                    if let Some((link, topics)) = cloud {
                        if let Some(event) = cloud_event(topics, &p.topic, &p.payload) {
                            log::debug!(topic:% = p.topic; "cloud shadow message");
                            let _ = link.events.send(event).await;
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        log::warn!(endpoint:% = cfg.endpoint; "the upstream refused a subscription (cloud shadows, or Device Defender's replies): desired changes made in the cloud arrive only with the fetch after each connection, and replies to the gateway's metrics reports are not seen (the gateway's IoT policy must allow iot:Subscribe and iot:Receive on its shadow and defender topics)");
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(m) = awaiting_pkid.pop_front() {
                        inflight.insert(pkid, m);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if inflight.get(&ack.pkid).is_some_and(|(_, seqs)| seqs.is_empty()) {
                        // A shadow fetch: nothing to remove from the queue.
                        inflight.remove(&ack.pkid);
                        pending = true;
                    } else if let Some((stream, seqs)) = inflight.remove(&ack.pkid) {
                        for s in &seqs {
                            sent.remove(s);
                        }
                        let q = queue.clone();
                        let n = seqs.len() as u64;
                        let removed = tokio::task::spawn_blocking(move || {
                            // Not synced here: the next group commit or sled's own flush
                            // (every 500 ms) makes it durable. A removal lost in a crash only
                            // means a duplicate upstream, with the same sequence number.
                            q.with(|s| {
                                s.remove_all(&seqs)?;
                                Ok::<_, crate::queue::QueueError>(s.is_empty())
                            })
                        })
                        .await;
                        let now_empty = matches!(removed, Ok(Ok(true)));
                        if !matches!(removed, Ok(Ok(_))) {
                            log::error!("cannot remove delivered readings from the queue; they will be sent again");
                        }
                        if let Some((since, depth)) = backlog {
                            if now_empty {
                                backlog = None;
                                log::info!(
                                    backlog = depth, took_ms = since.elapsed().as_millis() as u64;
                                    "queue empty: the backlog of {depth} records is delivered"
                                );
                            }
                        }
                        // A free place in the window: more may go now.
                        pending = pending || !now_empty;
                        stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                        stats.records_delivered.fetch_add(n, Ordering::Relaxed);
                        stats.delivered_by_stream[stream as usize].fetch_add(n, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            },
            Some(device) = async {
                match fetch_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            }, if connected => to_fetch.push_back(device),
            _ = &mut fetch_due, if connected && fetch_armed => fetch_armed = false,
            // These, too, only while connected.
            _ = queue.appended.notified(), if connected => pending = true,
            _ = &mut paced, if connected && paced_armed => paced_armed = false,
            _ = linger.tick(), if connected => pending = true,
        }
    }
}

/// One upstream message.
struct Message {
    topic: String,
    stream: Stream,
    body: Vec<u8>,
    seqs: Vec<u64>,
}

/// A message being built: a batch, or a record that goes alone.
enum Building {
    Batch(Box<Builder>),
    Alone(Vec<u8>, u64),
}

impl Building {
    fn len(&self) -> usize {
        match self {
            Building::Batch(b) => b.len(),
            Building::Alone(body, _) => body.len(),
        }
    }
}

/// The whole message of a record of a stream that is not batched (shadow, defender): the
/// document as queued (a shadow update gets a `clientToken` if it has none; a defender report
/// is encoded in CBOR when `upstream.topics.defender` is a `.../cbor` topic). `Err` says why it
/// can never be delivered.
fn body_of(cfg: &UpstreamConfig, thing: &str, seq: u64, r: &Record) -> Result<Vec<u8>, String> {
    let not_json = |e: serde_json::Error| format!("the record is not JSON ({e})");
    let doc: serde_json::Value = serde_json::from_slice(&r.payload).map_err(not_json)?;
    let serde_json::Value::Object(mut doc) = doc else {
        return Err(format!(
            "a {} record must be a JSON object",
            r.stream.name()
        ));
    };
    if r.stream == Stream::Shadow && !doc.contains_key("clientToken") {
        // IoT Core echoes it on .../update/accepted|rejected, so the cloud side can tie a
        // shadow update (and a duplicate of it) to this record. At most 64 bytes.
        let token = format!("{thing}:{seq}");
        let token = if token.len() <= 64 {
            token
        } else {
            seq.to_string()
        };
        doc.insert("clientToken".into(), token.into());
    }
    let v = if r.stream == Stream::Defender && cfg.topics.defender.ends_with("/cbor") {
        // Device Defender's CBOR topic takes the same document in CBOR.
        let mut out = Vec::new();
        ciborium::into_writer(&doc, &mut out).map_err(|e| e.to_string())?;
        out
    } else {
        serde_json::to_vec(&doc).map_err(|e| e.to_string())?
    };
    if v.len() > cfg.max_batch_bytes {
        return Err(format!(
            "the message would be {} bytes, over upstream.max_batch_bytes ({})",
            v.len(),
            cfg.max_batch_bytes
        ));
    }
    Ok(v)
}

/// What one [`send_ready`] round ended on.
enum Ready {
    /// Everything queued is handed to rumqttc (or set aside).
    Drained,
    /// The in-flight window is full: a PUBACK makes room.
    Window,
    /// The quotas allow the next message after this long.
    Paced(Duration),
}

/// Read the queue and publish what the in-flight window and the quotas allow now: alarm and
/// security records first, then the backlog after `cursor`. Records of a batched stream share
/// messages per topic ([`batch`]); shadow and defender records go one per message. What does
/// not fit in the budget now stays queued and is read again next round, with whatever piled up
/// meanwhile, so waiting for the budget is what makes batches. `cursor` becomes the highest
/// backlog sequence number below which every record was handed to rumqttc or set aside
/// (records sent out of that order are tracked in `sent`, so none is skipped or sent twice in
/// a session).
#[allow(clippy::too_many_arguments)]
async fn send_ready(
    cfg: &UpstreamConfig,
    thing: &str,
    client: &AsyncClient,
    queue: &SharedQueue,
    cursor: &mut Option<u64>,
    sent: &mut HashSet<u64>,
    awaiting_pkid: &mut VecDeque<(Stream, Vec<u64>)>,
    inflight: &HashMap<u16, (Stream, Vec<u64>)>,
    pace: &mut Pace,
    held: &mut Option<Message>,
    stats: &UplinkStats,
) -> Ready {
    let room = (cfg.max_inflight as usize).saturating_sub(awaiting_pkid.len() + inflight.len());
    if room == 0 {
        return Ready::Window;
    }
    // A large message built last round waits for room as it is, rather than being rebuilt at
    // every wake-up until it fits.
    if let Some(m) = held.take() {
        if let Err(wait) = pace.try_take(pace::wire_bytes(&m.topic, m.body.len()), Instant::now()) {
            *held = Some(m);
            return Ready::Paced(wait);
        }
        let (stream, seqs) = (m.stream, m.seqs.clone());
        if client
            .try_publish(m.topic.clone(), QoS::AtLeastOnce, false, m.body.clone())
            .is_err()
        {
            *held = Some(m);
            return Ready::Paced(Duration::from_millis(10));
        }
        stats.published(m.body.len());
        awaiting_pkid.push_back((stream, seqs));
        if awaiting_pkid.len() + inflight.len() >= cfg.max_inflight as usize {
            return Ready::Window;
        }
    }
    let now = Instant::now();
    let wait = pace.wait(0, now);
    if !wait.is_zero() {
        return Ready::Paced(wait);
    }
    // Build no more than the next second's worth: what is left is read again next round.
    let budget = room.min(pace.publishes(now).max(1));
    let byte_budget = pace.bytes(now).max(cfg.max_batch_bytes);
    let q = queue.clone();
    let after = *cursor;
    let read = tokio::task::spawn_blocking(move || {
        q.with(|s| -> Result<_, crate::queue::QueueError> {
            // (seq, record, found by the backlog scan)
            let mut records: Vec<_> = s
                .read_priority(READ_LIMIT)?
                .into_iter()
                .map(|(q, r)| (q, r, false))
                .collect();
            records.extend(
                s.read_after(after, READ_LIMIT)?
                    .into_iter()
                    .map(|(q, r)| (q, r, true)),
            );
            Ok(records)
        })
    })
    .await;
    let Ok(Ok(records)) = read else {
        return Ready::Paced(cfg.max_linger);
    };
    let backlog: Vec<u64> = records
        .iter()
        .filter(|(_, _, b)| *b)
        .map(|(s, _, _)| *s)
        .collect();
    let mut seen = HashSet::new();
    // Messages in the order of their first record; `open` maps a topic to its open batch.
    let mut building: Vec<(String, Stream, Building)> = Vec::new();
    let mut open: HashMap<String, usize> = HashMap::new();
    let mut built_bytes = 0usize;
    let mut undeliverable: Vec<(u64, Record, String)> = Vec::new();
    let mut left_over = false;
    let mut byte_bound = false;
    for (seq, r, _) in records {
        if sent.contains(&seq) || !seen.insert(seq) {
            continue;
        }
        let full = building.len() >= budget || built_bytes >= byte_budget;
        if built_bytes >= byte_budget {
            // More than the byte tokens allow now: the next round waits for a full message's.
            byte_bound = true;
        }
        if full && open.is_empty() {
            left_over = true;
            break; // nothing more fits in this round
        }
        let topic = match topics::topic_for(&cfg.topics, r.stream, thing, &r.subject) {
            Ok(t) => t,
            Err(why) => {
                undeliverable.push((seq, r, why));
                continue;
            }
        };
        if r.stream.is_batched() {
            if let Some(&i) = open.get(&topic) {
                let Building::Batch(b) = &mut building[i].2 else {
                    unreachable!("open batches are batches")
                };
                let before = b.len();
                match b.add(seq, &r.payload) {
                    Ok(Added::Yes) => {
                        built_bytes += b.len() - before;
                        continue;
                    }
                    Ok(Added::Full) => {
                        open.remove(&topic);
                    }
                    Err(why) => {
                        undeliverable.push((seq, r, why.0));
                        continue;
                    }
                }
            }
            if full {
                left_over = true;
                continue; // it needs a message of its own: a later round
            }
            let mut b = Builder::new(thing, cfg.max_batch_bytes);
            match b.add(seq, &r.payload) {
                Ok(_) => {
                    built_bytes += b.len();
                    open.insert(topic.clone(), building.len());
                    building.push((topic, r.stream, Building::Batch(Box::new(b))));
                }
                Err(why) => undeliverable.push((seq, r, why.0)),
            }
        } else {
            if full {
                left_over = true;
                continue;
            }
            match body_of(cfg, thing, seq, &r) {
                Ok(body) => {
                    built_bytes += body.len();
                    building.push((topic, r.stream, Building::Alone(body, seq)));
                }
                Err(why) => undeliverable.push((seq, r, why)),
            }
        }
    }
    // A full read may not be all there is.
    let more = left_over || backlog.len() >= READ_LIMIT;
    let mut outcome = if more { Ready::Window } else { Ready::Drained };
    for (topic, stream, m) in building {
        if awaiting_pkid.len() + inflight.len() >= cfg.max_inflight as usize {
            outcome = Ready::Window;
            break;
        }
        let paced = pace.try_take(pace::wire_bytes(&topic, m.len()), Instant::now());
        let large = m.len() * 2 >= cfg.max_batch_bytes;
        if paced.is_err() && !large {
            // Rebuilt next round, with whatever arrives meanwhile.
            outcome = Ready::Paced(paced.err().unwrap_or_default());
            break;
        }
        let m = match m {
            Building::Batch(b) => Message {
                topic,
                stream,
                seqs: b.seqs().to_vec(),
                body: b.finish(),
            },
            Building::Alone(body, seq) => Message {
                topic,
                stream,
                body,
                seqs: vec![seq],
            },
        };
        if let Err(wait) = paced {
            sent.extend(m.seqs.iter().copied());
            *held = Some(m);
            outcome = Ready::Paced(wait);
            break;
        }
        let len = m.body.len();
        if client
            .try_publish(m.topic, QoS::AtLeastOnce, false, m.body)
            .is_err()
        {
            // rumqttc's request queue is full: the tokens are spent, the records stay queued.
            outcome = Ready::Paced(Duration::from_millis(10));
            break;
        }
        stats.published(len);
        sent.extend(m.seqs.iter().copied());
        awaiting_pkid.push_back((m.stream, m.seqs));
    }
    if matches!(outcome, Ready::Window)
        && awaiting_pkid.len() + inflight.len() < cfg.max_inflight as usize
    {
        // Left over for lack of budget, not of window: try again when the pace allows a
        // publish — and, when bytes were the bound, a full message.
        let bytes = if byte_bound { cfg.max_batch_bytes } else { 0 };
        outcome = Ready::Paced(
            pace.wait(bytes, Instant::now())
                .max(Duration::from_millis(1)),
        );
    }
    let mut aside = HashSet::new();
    if !undeliverable.is_empty() {
        for (seq, r, why) in &undeliverable {
            log::error!(
                seq = *seq, stream = r.stream.name(), device_id:% = r.subject, reason:% = why;
                "queued record can never be delivered upstream: set aside in the queue's `undeliverable` tree ({why})"
            );
        }
        let q = queue.clone();
        let seqs: Vec<u64> = undeliverable.iter().map(|(s, _, _)| *s).collect();
        let done = tokio::task::spawn_blocking(move || {
            q.with(|s| -> Result<usize, crate::queue::QueueError> {
                let mut n = 0;
                for seq in &seqs {
                    n += usize::from(s.set_aside(*seq)?);
                }
                s.sync()?;
                Ok(n)
            })
        })
        .await;
        match done {
            Ok(Ok(n)) => {
                queue
                    .counters
                    .set_aside
                    .fetch_add(n as u64, Ordering::Relaxed);
                aside.extend(undeliverable.iter().map(|(s, _, _)| *s));
            }
            _ => log::error!("cannot set undeliverable records aside; they stay queued"),
        }
    }
    for seq in backlog {
        if sent.contains(&seq) || aside.contains(&seq) {
            *cursor = Some(cursor.map_or(seq, |c| c.max(seq)));
        } else {
            break;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Class;

    fn rec(stream: Stream, payload: &str) -> Record {
        Record {
            class: Class::Routine,
            stream,
            subject: "pm-01".into(),
            enqueued_at_ms: 0,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn shadow_updates_get_a_client_token_unless_they_have_one() {
        let cfg = UpstreamConfig::default();
        let doc = |b: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        let shadow = rec(Stream::Shadow, r#"{"state":{"reported":{"hr":70}}}"#);
        let b = doc(body_of(&cfg, "gw", 9, &shadow).unwrap());
        assert_eq!(b["clientToken"], "gw:9");
        assert_eq!(b["state"]["reported"]["hr"], 70);
        // A thing name too long for the 64-byte token: the sequence number alone.
        let long = "t".repeat(100);
        assert_eq!(
            doc(body_of(&cfg, &long, 9, &shadow).unwrap())["clientToken"],
            "9"
        );
        let own = rec(Stream::Shadow, r#"{"state":{},"clientToken":"mine"}"#);
        assert_eq!(
            doc(body_of(&cfg, "gw", 9, &own).unwrap())["clientToken"],
            "mine"
        );
        let def = rec(Stream::Defender, r#"{"header":{"report_id":1}}"#);
        let b = doc(body_of(&cfg, "gw", 9, &def).unwrap());
        assert!(
            b.get("clientToken").is_none(),
            "defender reports go as queued"
        );
        assert!(body_of(&cfg, "gw", 9, &rec(Stream::Defender, "[1]")).is_err());
        // Towards the CBOR topic, the same document in CBOR.
        let mut cbor = cfg.clone();
        cbor.topics.defender = "$aws/things/${device}/defender/metrics/cbor".into();
        let body = body_of(&cbor, "gw", 9, &def).unwrap();
        let back: serde_json::Value = ciborium::from_reader(body.as_slice()).unwrap();
        assert_eq!(back, serde_json::json!({"header":{"report_id":1}}));
    }

    #[test]
    fn a_message_over_the_batch_bound_is_undeliverable() {
        let cfg = UpstreamConfig {
            max_batch_bytes: 1024,
            ..Default::default()
        };
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(1024));
        for stream in [Stream::Shadow, Stream::Defender] {
            let err = body_of(&cfg, "gw", 1, &rec(stream, &big)).unwrap_err();
            assert!(err.contains("max_batch_bytes"), "{err}");
        }
        let mut b = Builder::new("gw", cfg.max_batch_bytes);
        let err = b.add(1, big.as_bytes()).unwrap_err();
        assert!(err.0.contains("max_batch_bytes"), "{err:?}");
    }
}
