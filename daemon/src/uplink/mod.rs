//! The uplink: drains the durable queue to AWS IoT Core over mutual TLS (rumqttc + rustls).
//!
//! - Connection: client id = the gateway's thing name, `clean_session = false`, SNI = the
//!   endpoint host; port 8883, or 443 with ALPN `x-amzn-mqtt-ca` (`upstream.alpn` overrides,
//!   e.g. behind a port-forwarding firewall). Reconnects with exponential
//!   backoff (1 s doubling to `upstream.max_backoff`, ±25 % jitter) — rumqttc itself would
//!   retry at once.
//! - Streams and topics ([`topics`]): each record belongs to a stream with its own topic
//!   template (`upstream.topics`). Telemetry and alerts are batched: records bound for the same
//!   topic are packed into one upstream message of at most `upstream.max_batch_bytes` (waiting
//!   at most `upstream.max_linger` for more), as
//!   `{"gateway_id":..,"records":[{"seq":N,"message":<record>},..]}`; every record carries the
//!   gateway id and its queue sequence number, so the cloud can drop duplicates (delivery is
//!   at-least-once). Shadow updates and defender reports must arrive in AWS's own document
//!   format, so each goes alone, as it was queued; a shadow update without a `clientToken`
//!   gets `<thing>:<seq>` (IoT Core echoes it on `/accepted` and `/rejected`).
//! - Undeliverable records (a topic IoT Core refuses, a message over `max_batch_bytes`, a
//!   payload that is not JSON) would be refused forever — with IoT Core, by closing the
//!   connection, which would stall everything behind them. They are set aside in the queue's
//!   `undeliverable` tree with an ERROR naming the record, and counted.
//! - Quotas: at most `upstream.max_inflight` unacknowledged publishes, `max_publishes_per_second`
//!   publishes and `max_bytes_per_second` bytes per second (IoT Core: 100, 100/s, 512 KiB/s).
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

pub mod topics;

use crate::config::UpstreamConfig;
pub use crate::gatekeeper::tls::TlsError;
use crate::queue::{Record, SharedQueue, Store, Stream};
use crate::supervisor::Heartbeat;
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
    /// Records delivered per stream, indexed by [`Stream`] as `usize` (telemetry, alerts,
    /// shadow, defender).
    pub delivered_by_stream: [AtomicU64; 4],
}

impl UplinkStats {
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

/// Token buckets for the per-second quotas.
struct Quota {
    window_start: Instant,
    publishes: u32,
    bytes: u64,
}

impl Quota {
    fn roll(&mut self) {
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            self.window_start = Instant::now();
            self.publishes = 0;
            self.bytes = 0;
        }
    }

    fn publishes_left(&mut self, cfg: &UpstreamConfig) -> usize {
        self.roll();
        cfg.max_publishes_per_second.saturating_sub(self.publishes) as usize
    }

    fn allows(&mut self, cfg: &UpstreamConfig, bytes: usize) -> bool {
        self.roll();
        self.publishes < cfg.max_publishes_per_second
            && self.bytes + bytes as u64 <= cfg.max_bytes_per_second
    }

    fn spend(&mut self, bytes: usize) {
        self.publishes += 1;
        self.bytes += bytes as u64;
    }
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
}

impl Uplink {
    /// Drain the queue to the upstream until `stop`, beating `beat` on every event, on an
    /// idle tick while connected, and while waiting to reconnect. (A connection attempt is
    /// never interrupted for a beat: rumqttc would start it over; it is bounded by rumqttc's
    /// connection timeout.)
    pub async fn run(self, stop: CancellationToken, beat: Heartbeat) {
        let Uplink {
            cfg,
            gateway_id,
            tls,
            queue,
            stats,
        } = self;
        // A restarted run starts without a session, whatever the last one left here.
        stats.connected.store(false, Ordering::Relaxed);
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            let outcome =
                session(&cfg, &gateway_id, tls.clone(), &queue, &stats, &stop, &beat).await;
            stats.connected.store(false, Ordering::Relaxed);
            if stop.is_cancelled() {
                return;
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

/// One connection, until it fails (returns why) or `stop`.
async fn session(
    cfg: &UpstreamConfig,
    gateway_id: &str,
    tls: Arc<rustls::ClientConfig>,
    queue: &SharedQueue,
    stats: &UplinkStats,
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
    let mut quota = Quota {
        window_start: Instant::now(),
        publishes: 0,
        bytes: 0,
    };
    let mut connected = false;
    // (connected at, records queued then) until the queue first runs empty.
    let mut backlog: Option<(Instant, usize)> = None;
    let mut linger = tokio::time::interval(cfg.max_linger.max(Duration::from_millis(1)));
    linger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = Heartbeat::ticker();
    loop {
        beat.beat();
        let room = connected && awaiting_pkid.len() + inflight.len() < cfg.max_inflight as usize;
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
                    let q = queue_status(queue).await;
                    log::info!(
                        endpoint:% = cfg.endpoint, session_present = ack.session_present,
                        queued = q.depth, queued_bytes = q.bytes, oldest_age_s = q.oldest_age_s;
                        "upstream connected; {} queued records to deliver", q.depth
                    );
                    if q.depth > 0 {
                        backlog = Some((Instant::now(), q.depth));
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(m) = awaiting_pkid.pop_front() {
                        inflight.insert(pkid, m);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some((stream, seqs)) = inflight.remove(&ack.pkid) {
                        for s in &seqs {
                            sent.remove(s);
                        }
                        let q = queue.clone();
                        let n = seqs.len() as u64;
                        let removed = tokio::task::spawn_blocking(move || {
                            // Synced at once: a removal lost in a crash means a duplicate upstream.
                            q.with(|s| {
                                seqs.iter().try_for_each(|seq| s.remove(*seq).map(|_| ()))?;
                                s.sync()?;
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
                        stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                        stats.records_delivered.fetch_add(n, Ordering::Relaxed);
                        stats.delivered_by_stream[stream as usize].fetch_add(n, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            },
            _ = queue.appended.notified(), if room => {
                cursor = send_batches(cfg, gateway_id, &client, queue, cursor, &mut sent, &mut awaiting_pkid, &inflight, &mut quota).await;
            }
            _ = linger.tick(), if room => {
                cursor = send_batches(cfg, gateway_id, &client, queue, cursor, &mut sent, &mut awaiting_pkid, &inflight, &mut quota).await;
            }
        }
    }
}

/// One upstream message being built.
struct Message {
    topic: String,
    stream: Stream,
    body: Vec<u8>,
    seqs: Vec<u64>,
}

/// The bytes a record contributes to its message: a batch entry, or the whole message body.
/// `head` is the batch envelope's opening (see [`envelope_head`]). `Err` says why the record
/// can never be delivered.
fn body_of(
    cfg: &UpstreamConfig,
    thing: &str,
    head: &[u8],
    seq: u64,
    r: &Record,
) -> Result<Vec<u8>, String> {
    let not_json = |e: serde_json::Error| format!("the record is not JSON ({e})");
    let (body, size) = if r.stream.is_batched() {
        // Embedded as it is: it must be one whole JSON value, or it would spoil the batch.
        serde_json::from_slice::<serde::de::IgnoredAny>(&r.payload).map_err(not_json)?;
        let entry = format!("{{\"seq\":{seq},\"message\":");
        let mut v = Vec::with_capacity(entry.len() + r.payload.len() + 1);
        v.extend_from_slice(entry.as_bytes());
        v.extend_from_slice(&r.payload);
        v.push(b'}');
        let size = head.len() + v.len() + 2;
        (v, size)
    } else {
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
        let v = serde_json::to_vec(&doc).map_err(|e| e.to_string())?;
        let size = v.len();
        (v, size)
    };
    if size > cfg.max_batch_bytes {
        return Err(format!(
            "the message would be {size} bytes, over upstream.max_batch_bytes ({})",
            cfg.max_batch_bytes
        ));
    }
    Ok(body)
}

fn envelope_head(thing: &str) -> String {
    format!(
        "{{\"gateway_id\":{},\"records\":[",
        serde_json::Value::from(thing)
    )
}

/// Read the queue and publish as many messages as the window and quotas allow: alarm and
/// security records first, then the backlog after `cursor`. Records of a batched stream share
/// messages per topic; shadow and defender records go one per message. Returns the new cursor:
/// the highest backlog sequence number below which every record was handed to rumqttc or set
/// aside (records sent out of that order are tracked in `sent`, so none is skipped or sent
/// twice in a session).
#[allow(clippy::too_many_arguments)]
async fn send_batches(
    cfg: &UpstreamConfig,
    thing: &str,
    client: &AsyncClient,
    queue: &SharedQueue,
    mut cursor: Option<u64>,
    sent: &mut HashSet<u64>,
    awaiting_pkid: &mut VecDeque<(Stream, Vec<u64>)>,
    inflight: &HashMap<u16, (Stream, Vec<u64>)>,
    quota: &mut Quota,
) -> Option<u64> {
    let budget = (cfg.max_inflight as usize)
        .saturating_sub(awaiting_pkid.len() + inflight.len())
        .min(quota.publishes_left(cfg));
    if budget == 0 {
        return cursor;
    }
    let q = queue.clone();
    let after = cursor;
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
        return cursor;
    };
    let backlog: Vec<u64> = records
        .iter()
        .filter(|(_, _, b)| *b)
        .map(|(s, _, _)| *s)
        .collect();
    let head = envelope_head(thing).into_bytes();
    let mut seen = HashSet::new();
    let mut messages: Vec<Message> = Vec::new();
    let mut open: HashMap<String, usize> = HashMap::new();
    let mut undeliverable: Vec<(u64, Record, String)> = Vec::new();
    for (seq, r, _) in records {
        if messages.len() >= budget && open.is_empty() {
            break; // nothing more fits in this round
        }
        if sent.contains(&seq) || !seen.insert(seq) {
            continue;
        }
        let topic = match topics::topic_for(&cfg.topics, r.stream, thing, &r.subject) {
            Ok(t) => t,
            Err(why) => {
                undeliverable.push((seq, r, why));
                continue;
            }
        };
        let joins = r.stream.is_batched() && open.contains_key(&topic);
        if !joins && messages.len() >= budget {
            continue; // it needs a message of its own: a later round
        }
        let body = match body_of(cfg, thing, &head, seq, &r) {
            Ok(b) => b,
            Err(why) => {
                undeliverable.push((seq, r, why));
                continue;
            }
        };
        if joins {
            let i = open[&topic];
            let m = &mut messages[i];
            if m.body.len() + 1 + body.len() + 2 <= cfg.max_batch_bytes {
                m.body.push(b',');
                m.body.extend_from_slice(&body);
                m.seqs.push(seq);
                continue;
            }
            open.remove(&topic); // full
            if messages.len() >= budget {
                continue;
            }
        }
        let body = if r.stream.is_batched() {
            open.insert(topic.clone(), messages.len());
            [head.as_slice(), &body].concat()
        } else {
            body
        };
        messages.push(Message {
            topic,
            stream: r.stream,
            body,
            seqs: vec![seq],
        });
    }
    for mut m in messages {
        if m.stream.is_batched() {
            m.body.extend_from_slice(b"]}");
        }
        let len = m.body.len();
        if !quota.allows(cfg, len) {
            break;
        }
        if client
            .try_publish(m.topic, QoS::AtLeastOnce, false, m.body)
            .is_err()
        {
            break;
        }
        quota.spend(len);
        sent.extend(m.seqs.iter().copied());
        awaiting_pkid.push_back((m.stream, m.seqs));
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
            cursor = Some(cursor.map_or(seq, |c| c.max(seq)));
        } else {
            break;
        }
    }
    cursor
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Class;

    const HEAD: &[u8] = br#"{"gateway_id":"gw","records":["#;

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
    fn batch_entries_carry_the_sequence_and_the_record_as_is() {
        assert_eq!(envelope_head("gw").as_bytes(), HEAD);
        let cfg = UpstreamConfig::default();
        let b = body_of(&cfg, "gw", HEAD, 7, &rec(Stream::Telemetry, r#"{"a": 1}"#)).unwrap();
        assert_eq!(b, br#"{"seq":7,"message":{"a": 1}}"#);
        let err = body_of(&cfg, "gw", HEAD, 7, &rec(Stream::Alert, r#"{"a": 1"#)).unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
        let err = body_of(&cfg, "gw", HEAD, 7, &rec(Stream::Telemetry, "1 2")).unwrap_err();
        assert!(
            err.contains("not JSON"),
            "two values would spoil the batch: {err}"
        );
    }

    #[test]
    fn shadow_updates_get_a_client_token_unless_they_have_one() {
        let cfg = UpstreamConfig::default();
        let doc = |b: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        let shadow = rec(Stream::Shadow, r#"{"state":{"reported":{"hr":70}}}"#);
        let b = doc(body_of(&cfg, "gw", HEAD, 9, &shadow).unwrap());
        assert_eq!(b["clientToken"], "gw:9");
        assert_eq!(b["state"]["reported"]["hr"], 70);
        // A thing name too long for the 64-byte token: the sequence number alone.
        let long = "t".repeat(100);
        assert_eq!(
            doc(body_of(&cfg, &long, HEAD, 9, &shadow).unwrap())["clientToken"],
            "9"
        );
        let own = rec(Stream::Shadow, r#"{"state":{},"clientToken":"mine"}"#);
        assert_eq!(
            doc(body_of(&cfg, "gw", HEAD, 9, &own).unwrap())["clientToken"],
            "mine"
        );
        let def = rec(Stream::Defender, r#"{"header":{"report_id":1}}"#);
        let b = doc(body_of(&cfg, "gw", HEAD, 9, &def).unwrap());
        assert!(
            b.get("clientToken").is_none(),
            "defender reports go as queued"
        );
        assert!(body_of(&cfg, "gw", HEAD, 9, &rec(Stream::Defender, "[1]")).is_err());
    }

    #[test]
    fn a_message_over_the_batch_bound_is_undeliverable() {
        let cfg = UpstreamConfig {
            max_batch_bytes: 1024,
            ..Default::default()
        };
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(1024));
        for stream in Stream::ALL {
            let err = body_of(&cfg, "gw", HEAD, 1, &rec(stream, &big)).unwrap_err();
            assert!(err.contains("max_batch_bytes"), "{err}");
        }
    }
}
