//! The rules' `http` action: a rule's output POSTed to a webhook (a nurse call, a paging
//! gateway), delivered at least once across receiver failures, outages and restarts.
//!
//! The way of one alert:
//! 1. the rule fires, in the task that produced the message, and hands the delivery to this
//!    service's outbox writer together with a part of the message's [`Ack`];
//! 2. the writer stores it in sled (`<state_dir>/webhooks`, opened only when a rule has an
//!    `http` action), flushes once for every group of deliveries waiting, and only then
//!    confirms the ack: a QoS 1 message that fired the rule gets its PUBACK once the delivery
//!    survives a kill -9;
//! 3. the delivery worker of the URL's origin (`scheme://host:port`) POSTs it; a 2xx answer
//!    removes it from the outbox.
//!
//! Retries: a connection error, a timeout, 408, 429 and 5xx are retried with exponential
//! backoff ([`FIRST_BACKOFF`] doubling up to [`MAX_BACKOFF`]) until the delivery is older than
//! the action's `max_age`; any other status (a receiver that refuses the request) is final. A
//! delivery that is refused, expires or is pushed out by the bound is logged as an error and
//! counted as the rule's action failure.
//!
//! Order and isolation: per origin, deliveries are attempted one at a time in firing order (an
//! alarm is never overtaken by a later one to the same receiver); a receiver that is down holds
//! up only its own origin, never a device, another receiver, or the rules.
//!
//! At least once, not exactly once: a receiver whose 2xx was lost, or a kill -9 between its
//! answer and the removal, gets the delivery again. Every attempt carries the same
//! `X-Wardgate-Delivery: <id>` (also across restarts), so a receiver can drop repeats; a
//! receiver that answers gets each alert once.
//!
//! Bounds: at most [`MAX_PENDING`] deliveries wait per origin (beyond, the oldest goes, counted
//! and logged), at most [`MAX_ORIGINS`] origins are served (a URL template could otherwise make
//! one worker per device), a body is the rule's output.
//!
//! What must stay true: a delivery is confirmed to the device only when it is on disk; it
//! leaves the disk only when delivered, refused, expired or bounded out — never silently.
//!
//! Write errors (a full disk): a delivery whose write or flush fails is not confirmed (the
//! message that fired the rule is not acknowledged, so its device sends it again), counted in
//! `store_errors` and as the rule's action failure; one that was written but not flushed is
//! sent anyway. A failed write closes the outbox, which is opened again at most once per second
//! ([`crate::sled_reopen`]: sled would otherwise refuse every write until a restart), so once
//! the disk has room deliveries are stored and confirmed again without a restart; the failures
//! are logged at most once per 10 s, not once per delivery. Opening again is what a restart
//! does: every confirmed delivery was flushed and is there; a removal not yet flushed may be
//! undone, and that delivery is made again after the next start (at least once). The workers'
//! queues stay as they are: nothing in memory is made from the outbox after the start.

use crate::pipeline::Ack;
use crate::sled_reopen::{Reopening, StoreError};
use bytes::Bytes;
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// The first retry waits this long; each further one twice as long, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Deliveries waiting per origin at most.
pub const MAX_PENDING: usize = 10_000;
/// Origins (`scheme://host:port`) served at most.
pub const MAX_ORIGINS: usize = 64;
/// Deliveries stored under one flush at most.
const MAX_GROUP: usize = 64;
/// Deliveries waiting for the writer.
const CHANNEL_CAPACITY: usize = 256;

/// One delivery as stored in the outbox: everything needed to send it, so that it survives a
/// restart with a changed configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Delivery {
    /// Format of this record.
    pub format: u8,
    /// Where to POST it (rendered).
    pub url: String,
    /// Extra request headers (rendered).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// How long one attempt may take.
    pub timeout_ms: u64,
    /// Given up this long after firing.
    pub max_age_ms: u64,
    /// CA bundle for `https` (none: the system's trust store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The rule that fired.
    pub rule: String,
    /// The device the message came from.
    pub device_id: String,
    /// When the rule fired, ms since the epoch.
    pub fired_at_ms: i64,
    /// The request body: the rule's output (JSON).
    pub body: String,
}

impl Delivery {
    /// The record format this build writes.
    pub const FORMAT: u8 = 1;
}

/// A URL the action may POST to: `http://` or `https://`, a host, no user info, no fragment.
/// Returns the origin (`scheme://host:port`) the delivery worker is chosen by.
pub fn check_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL ({e})"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("`{url}`: use an http:// or https:// URL")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{url}`: no user name or password in the URL; use `headers` (Authorization)"
        ));
    }
    if url.contains('#') {
        return Err(format!("`{url}`: no fragment (#...) in a webhook URL"));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(format!(
        "{}://{}:{port}",
        if tls { "https" } else { "http" },
        authority.host()
    ))
}

/// A header the action may send: a valid name, not one the gateway sets itself.
pub fn check_header(name: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!("`{name}` is not a valid HTTP header name"));
    }
    if matches!(
        lower.as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection" | "content-type"
    ) || lower.starts_with("x-wardgate-")
    {
        return Err(format!(
            "`{name}` is set by the gateway itself; leave it out"
        ));
    }
    Ok(())
}

/// Counters of one origin.
#[derive(Debug, Default)]
struct OriginCounters {
    pending: AtomicU64,
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of one origin's counters, for `wardgate status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookCounts {
    /// `scheme://host:port`.
    pub origin: String,
    /// Deliveries waiting (stored, not yet answered with 2xx).
    pub pending: u64,
    /// Deliveries answered with 2xx since start.
    pub delivered: u64,
    /// Attempts that failed and will be retried.
    pub failed_attempts: u64,
    /// Deliveries given up: refused, expired or pushed out by the bound.
    pub dropped: u64,
    /// Why the last attempt failed, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The service's counters (cheap to share).
#[derive(Debug, Default)]
pub struct WebhookStats {
    origins: Mutex<BTreeMap<String, Arc<OriginCounters>>>,
    store_errors: AtomicU64,
    rules: OnceLock<super::CountersView>,
}

impl WebhookStats {
    /// Every origin's counters, in name order.
    pub fn snapshot(&self) -> Vec<WebhookCounts> {
        let origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        origins
            .iter()
            .map(|(origin, c)| WebhookCounts {
                origin: origin.clone(),
                pending: c.pending.load(Relaxed),
                delivered: c.delivered.load(Relaxed),
                failed_attempts: c.failed_attempts.load(Relaxed),
                dropped: c.dropped.load(Relaxed),
                last_error: c
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            })
            .collect()
    }

    /// Outbox writes that failed.
    pub fn store_errors(&self) -> u64 {
        self.store_errors.load(Relaxed)
    }

    /// Count a failure against the rule called `rule` (if it is still configured).
    pub(super) fn rule_failed(&self, rule: &str) {
        if let Some(view) = self.rules.get() {
            view.failed(rule);
        }
    }

    /// The rules whose failures these deliveries count against.
    pub(super) fn attach(&self, view: super::CountersView) {
        let _ = self.rules.set(view);
    }

    fn origin(&self, origin: &str) -> Option<Arc<OriginCounters>> {
        let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = origins.get(origin) {
            return Some(c.clone());
        }
        if origins.len() >= MAX_ORIGINS {
            return None;
        }
        let c = Arc::new(OriginCounters::default());
        origins.insert(origin.to_string(), c.clone());
        Some(c)
    }
}

/// The outbox's open database.
#[derive(Debug)]
struct Handles {
    db: sled::Db,
    tree: sled::Tree,
}

impl crate::sled_reopen::Handles for Handles {
    fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// What a failure of the outbox means, for the journal.
const OUTBOX_FAILURE: &str = "new webhook deliveries are not stored and the messages that fired them are not acknowledged (their devices resend them); deliveries already stored are still sent";

/// The outbox on disk, opened before the service starts (so a broken one stops the start).
/// Shared by the writer and the delivery workers (cheap to clone); closed and opened again after
/// a write error ([`crate::sled_reopen`]).
#[derive(Debug, Clone)]
pub struct Outbox {
    db: Reopening<Handles>,
}

impl Outbox {
    /// Open (or create) the outbox in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: Reopening::open("webhook outbox", OUTBOX_FAILURE, dir, Self::open_handles)?,
        })
    }

    fn open_handles(dir: &Path) -> sled::Result<Handles> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(256 << 10)
            .flush_every_ms(Some(1000))
            .open()?;
        let tree = db.open_tree("deliveries")?;
        Ok(Handles { db, tree })
    }

    /// Deliveries waiting on disk (0 while the outbox cannot be read).
    pub fn len(&self) -> usize {
        self.db.read(|h| Ok(h.tree.len())).unwrap_or(0)
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Store `delivery` under a new id (not flushed: see [`Outbox::flush`]); its id.
    fn store(&self, delivery: &Delivery) -> Result<u64, StoreError> {
        let value = serde_json::to_vec(delivery).expect("a delivery serialises");
        self.db.write(|h| {
            let id = h.db.generate_id()?;
            h.tree.insert(id.to_be_bytes(), value)?;
            Ok(id)
        })
    }

    /// Make every earlier store and removal durable.
    async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await
    }

    /// Remove a delivery (not flushed: lost in a crash, the delivery is made again). A failure
    /// is logged by the outbox and otherwise ignored, the same way.
    fn remove(&self, id: u64) {
        self.remove_key(&id.to_be_bytes());
    }

    /// Remove the record under `key`, the same way.
    fn remove_key(&self, key: &[u8]) {
        let _ = self.db.write(|h| h.tree.remove(key));
    }

    /// Every stored record, in id order (an unreadable one as its error).
    fn records(&self) -> Result<Vec<sled::Result<(sled::IVec, sled::IVec)>>, StoreError> {
        self.db.read(|h| Ok(h.tree.iter().collect()))
    }
}

struct Submit {
    delivery: Delivery,
    ack: Option<Ack>,
}

/// Where rules hand their deliveries (cheap to clone).
#[derive(Debug, Clone)]
pub struct Webhooks {
    tx: mpsc::Sender<Submit>,
    stats: Arc<WebhookStats>,
}

impl std::fmt::Debug for Submit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submit")
            .field("url", &self.delivery.url)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Store `delivery` and send it. `ack` is confirmed once it is on disk. False: the
    /// service has stopped (the delivery is not stored; `ack` is dropped unconfirmed).
    pub async fn submit(&self, delivery: Delivery, ack: Option<Ack>) -> bool {
        self.tx.send(Submit { delivery, ack }).await.is_ok()
    }

    /// The service's counters.
    pub fn stats(&self) -> &Arc<WebhookStats> {
        &self.stats
    }
}

/// The webhook service: its entrance and the task to run. The task ends when every
/// entrance is gone, after storing what was handed to it; deliveries not yet made stay in the
/// outbox for the next start.
pub fn service(
    outbox: Outbox,
    beat: crate::supervisor::Heartbeat,
) -> (Webhooks, impl std::future::Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let stats = Arc::new(WebhookStats::default());
    let run = run(outbox, rx, stats.clone(), beat);
    (Webhooks { tx, stats }, run)
}

/// A delivery handed to a worker.
#[derive(Debug)]
struct Queued {
    id: u64,
    delivery: Delivery,
}

struct Workers {
    outbox: Outbox,
    stats: Arc<WebhookStats>,
    senders: HashMap<String, mpsc::UnboundedSender<Queued>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Workers {
    fn dispatch(&mut self, q: Queued) {
        let origin = match check_url(&q.delivery.url) {
            Ok(o) => o,
            Err(e) => {
                self.give_up(&q, None, &format!("cannot be sent: {e}"));
                return;
            }
        };
        let Some(counters) = self.stats.origin(&origin) else {
            self.give_up(
                &q,
                None,
                &format!("more than {MAX_ORIGINS} webhook origins; `{origin}` is not served"),
            );
            return;
        };
        counters.pending.fetch_add(1, Relaxed);
        if let Some(tx) = self.senders.get(&origin) {
            match tx.send(q) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    // Its worker ended (it never does before the service); start another.
                    self.senders.remove(&origin);
                    counters.pending.fetch_sub(1, Relaxed);
                    return self.dispatch(back);
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(q);
        self.senders.insert(origin.clone(), tx);
        let worker = Worker {
            origin,
            outbox: self.outbox.clone(),
            stats: self.stats.clone(),
            counters,
        };
        self.tasks.spawn(worker.run(rx));
    }

    fn give_up(&self, q: &Queued, counters: Option<&OriginCounters>, why: &str) {
        give_up(&self.outbox, &self.stats, counters, q, why);
    }
}

fn give_up(
    outbox: &Outbox,
    stats: &WebhookStats,
    counters: Option<&OriginCounters>,
    q: &Queued,
    why: &str,
) {
    outbox.remove(q.id);
    if let Some(c) = counters {
        c.dropped.fetch_add(1, Relaxed);
    }
    stats.rule_failed(&q.delivery.rule);
    log::error!(
        rule:% = q.delivery.rule, device_id:% = q.delivery.device_id, delivery:% = format!("{:016x}", q.id);
        "rule {}: webhook delivery {:016x} for {} given up: {why}",
        q.delivery.rule, q.id, q.delivery.device_id
    );
}

async fn run(
    outbox: Outbox,
    mut rx: mpsc::Receiver<Submit>,
    stats: Arc<WebhookStats>,
    beat: crate::supervisor::Heartbeat,
) {
    let mut workers = Workers {
        outbox: outbox.clone(),
        stats: stats.clone(),
        senders: HashMap::new(),
        tasks: tokio::task::JoinSet::new(),
    };
    // What an earlier run stored and did not deliver, in firing order.
    let mut restored = 0usize;
    let records = outbox.records().unwrap_or_else(|e| {
        stats.store_errors.fetch_add(1, Relaxed);
        log::error!(error:% = e; "webhooks: the outbox cannot be read; what it holds is sent after the next restart");
        Vec::new()
    });
    for item in records {
        let Ok((key, value)) = item else {
            stats.store_errors.fetch_add(1, Relaxed);
            log::error!("webhooks: an outbox record cannot be read; it is skipped");
            continue;
        };
        let id = key
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .unwrap_or_default();
        match serde_json::from_slice::<Delivery>(&value) {
            Ok(delivery) => {
                restored += 1;
                workers.dispatch(Queued { id, delivery });
            }
            Err(e) => {
                outbox.remove_key(&key);
                stats.store_errors.fetch_add(1, Relaxed);
                log::error!(delivery:% = format!("{id:016x}"); "webhooks: outbox record {id:016x} is damaged ({e}); it is removed");
            }
        }
    }
    if restored > 0 {
        log::info!(pending = restored; "webhooks: {restored} deliveries from before the restart are being sent");
    }
    let mut batch = Vec::with_capacity(MAX_GROUP);
    let mut idle = crate::supervisor::Heartbeat::ticker();
    loop {
        beat.beat();
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_GROUP) => if n == 0 { break },
            _ = idle.tick() => continue,
        }
        let mut stored = Vec::with_capacity(batch.len());
        for Submit { delivery, ack } in batch.drain(..) {
            match outbox.store(&delivery) {
                Ok(id) => stored.push((Queued { id, delivery }, ack)),
                Err(e) => {
                    // The ack goes unconfirmed: the device sends the message again. The outbox
                    // logs its failures (at most one line per 10 s, not one per delivery).
                    stats.store_errors.fetch_add(1, Relaxed);
                    stats.rule_failed(&delivery.rule);
                    log::debug!(rule:% = delivery.rule, device_id:% = delivery.device_id; "rule {}: webhook delivery not stored ({e}); the device is not acknowledged", delivery.rule);
                }
            }
        }
        let flushed = match outbox.flush().await {
            Ok(()) => true,
            Err(e) => {
                stats.store_errors.fetch_add(1, Relaxed);
                log::debug!("webhooks: the outbox cannot be flushed ({e}); the devices are not acknowledged, the deliveries are sent anyway");
                false
            }
        };
        for (q, ack) in stored {
            if let (true, Some(ack)) = (flushed, ack) {
                ack.confirm();
            }
            workers.dispatch(q);
        }
    }
    let _ = outbox.flush().await;
    workers.tasks.abort_all();
    while workers.tasks.join_next().await.is_some() {}
}

/// What one attempt came to.
enum Outcome {
    /// 2xx.
    Delivered,
    /// A status that will not change by retrying.
    Refused(String),
    /// Worth another attempt.
    Retry(String),
}

struct Worker {
    origin: String,
    outbox: Outbox,
    stats: Arc<WebhookStats>,
    counters: Arc<OriginCounters>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let mut queue = VecDeque::new();
        let mut backoff = FIRST_BACKOFF;
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(q) => self.push(&mut queue, q),
                    None => return,
                }
            }
            while let Ok(q) = rx.try_recv() {
                self.push(&mut queue, q);
            }
            let Some(q) = queue.front() else { continue };
            let age = crate::clock::now_ms().saturating_sub(q.delivery.fired_at_ms);
            if age > 0 && age as u64 > q.delivery.max_age_ms {
                let q = self.take_front(&mut queue);
                self.give_up(
                    &q,
                    &format!(
                        "not delivered within its max_age of {}",
                        humantime::format_duration(Duration::from_millis(q.delivery.max_age_ms))
                    ),
                );
                continue;
            }
            match attempt(q).await {
                Outcome::Delivered => {
                    let q = self.take_front(&mut queue);
                    self.counters.delivered.fetch_add(1, Relaxed);
                    *self
                        .counters
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = None;
                    // Not flushed: lost in a crash, the delivery is made again (at least once).
                    self.outbox.remove(q.id);
                    log::info!(
                        rule:% = q.delivery.rule, device_id:% = q.delivery.device_id, delivery:% = format!("{:016x}", q.id);
                        "rule {}: webhook delivery {:016x} for {} delivered to {}",
                        q.delivery.rule, q.id, q.delivery.device_id, self.origin
                    );
                    backoff = FIRST_BACKOFF;
                }
                Outcome::Refused(why) => {
                    let q = self.take_front(&mut queue);
                    self.give_up(&q, &format!("the receiver refused it ({why})"));
                    backoff = FIRST_BACKOFF;
                }
                Outcome::Retry(why) => {
                    self.counters.failed_attempts.fetch_add(1, Relaxed);
                    *self
                        .counters
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                    log::warn!(
                        rule:% = q.delivery.rule, device_id:% = q.delivery.device_id, delivery:% = format!("{:016x}", q.id), url:% = q.delivery.url;
                        "rule {}: webhook delivery {:016x} to {} failed ({why}); next attempt in {}",
                        q.delivery.rule, q.id, q.delivery.url, humantime::format_duration(backoff)
                    );
                    let wake = tokio::time::Instant::now() + backoff;
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep_until(wake) => break,
                            next = rx.recv() => match next {
                                Some(q) => self.push(&mut queue, q),
                                None => return,
                            },
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The delivery at the front, no longer pending here.
    fn take_front(&self, queue: &mut VecDeque<Queued>) -> Queued {
        self.counters.pending.fetch_sub(1, Relaxed);
        queue.pop_front().expect("only called with a front")
    }

    fn push(&self, queue: &mut VecDeque<Queued>, q: Queued) {
        if queue.len() >= MAX_PENDING {
            let oldest = self.take_front(queue);
            self.give_up(
                &oldest,
                &format!(
                    "more than {MAX_PENDING} deliveries wait for {}",
                    self.origin
                ),
            );
        }
        queue.push_back(q);
    }

    fn give_up(&self, q: &Queued, why: &str) {
        give_up(&self.outbox, &self.stats, Some(&self.counters), q, why);
    }
}

async fn attempt(q: &Queued) -> Outcome {
    let d = &q.delivery;
    let timeout = Duration::from_millis(d.timeout_ms.max(1));
    match tokio::time::timeout(timeout, post(q)).await {
        Ok(Ok(status)) if status.is_success() => Outcome::Delivered,
        Ok(Ok(status))
            if status.is_server_error()
                || status == http::StatusCode::REQUEST_TIMEOUT
                || status == http::StatusCode::TOO_MANY_REQUESTS =>
        {
            Outcome::Retry(format!("HTTP {status}"))
        }
        Ok(Ok(status)) => Outcome::Refused(format!("HTTP {status}")),
        Ok(Err(Failure::Final(why))) => Outcome::Refused(why),
        Ok(Err(Failure::Again(why))) => Outcome::Retry(why),
        Err(_) => Outcome::Retry(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

enum Failure {
    /// Cannot succeed as it is (a bad URL, an unreadable CA file).
    Final(String),
    /// May succeed later (connection refused, reset, TLS handshake failed).
    Again(String),
}

async fn post(q: &Queued) -> Result<http::StatusCode, Failure> {
    let d = &q.delivery;
    let uri: http::Uri = d
        .url
        .parse()
        .map_err(|e| Failure::Final(format!("bad URL ({e})")))?;
    let tls = uri.scheme_str() == Some("https");
    let authority = uri
        .authority()
        .ok_or_else(|| Failure::Final("no host in the URL".into()))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let mut request = http::Request::post(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("wardgate/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::CONNECTION, "close")
        .header("x-wardgate-delivery", format!("{:016x}", q.id))
        .header("x-wardgate-rule", &d.rule)
        .header("x-wardgate-device", &d.device_id);
    for (name, value) in &d.headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(Bytes::from(d.body.clone())))
        .map_err(|e| Failure::Final(format!("bad request header ({e})")))?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| Failure::Again(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if tls {
        let config = client_tls(d.ca_file.as_deref()).map_err(Failure::Final)?;
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| Failure::Final(format!("`{host}` is not a TLS server name ({e})")))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| Failure::Again(format!("TLS handshake with {host}:{port}: {e}")))?;
        exchange(hyper_util::rt::TokioIo::new(stream), request).await
    } else {
        exchange(hyper_util::rt::TokioIo::new(tcp), request).await
    }
}

/// One request on a fresh HTTP/1.1 connection; the status of its answer.
async fn exchange<I>(
    io: I,
    request: http::Request<Full<Bytes>>,
) -> Result<http::StatusCode, Failure>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Failure::Again(format!("HTTP handshake: {e}")))?;
    let send = async move {
        sender
            .send_request(request)
            .await
            .map(|r| r.status())
            .map_err(|e| Failure::Again(format!("HTTP exchange: {e}")))
    };
    // Both in this task: the connection is driven while the answer is awaited, and both go
    // when the attempt ends (no connection task outlives a timeout).
    tokio::pin!(conn);
    tokio::pin!(send);
    tokio::select! {
        status = &mut send => status,
        ended = &mut conn => match ended {
            Err(e) => Err(Failure::Again(format!("HTTP connection: {e}"))),
            Ok(()) => send.await,
        },
    }
}

/// The TLS client for `https` webhooks: the given CA bundle, or the system's trust store.
fn client_tls(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA file {} ({e})", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("CA file {} is not valid PEM ({e})", path.display()))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to verify the receiver with".into());
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(crate::gatekeeper::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("no usable TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_origin() {
        assert_eq!(
            check_url("http://127.0.0.1:8080/nurse-call").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            check_url("https://pager.ward.example/a?b=c").unwrap(),
            "https://pager.ward.example:443"
        );
        assert_eq!(check_url("http://[::1]/x").unwrap(), "http://[::1]:80");
        for bad in [
            "ftp://x/",
            "127.0.0.1:8080/x",
            "/nurse-call",
            "http://user:pw@host/",
            "http://host/#frag",
            "http:// host/",
        ] {
            assert!(check_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn headers_the_gateway_sets_are_refused() {
        assert!(check_header("Authorization").is_ok());
        assert!(check_header("X-Api-Key").is_ok());
        for bad in [
            "Host",
            "content-length",
            "X-Wardgate-Delivery",
            "bad header",
            "",
        ] {
            assert!(check_header(bad).is_err(), "{bad} accepted");
        }
    }

    fn delivery(url: &str) -> Delivery {
        Delivery {
            format: Delivery::FORMAT,
            url: url.into(),
            headers: vec![("X-Api-Key".into(), "k".into())],
            timeout_ms: 2000,
            max_age_ms: 86_400_000,
            ca_file: None,
            rule: "tachycardia".into(),
            device_id: "pm-1".into(),
            fired_at_ms: crate::clock::now_ms(),
            body: r#"{"heart_rate":150}"#.into(),
        }
    }

    #[tokio::test]
    async fn a_stored_delivery_is_confirmed_after_its_flush_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        // A receiver that is never there: port of a listener bound and closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/alarm", closed.local_addr().unwrap());
        drop(closed);
        let (hooks, run) = service(
            Outbox::open(dir.path()).unwrap(),
            crate::supervisor::Heartbeat::detached(),
        );
        let task = tokio::spawn(run);
        let (ack, confirmed) = Ack::new();
        assert!(hooks.submit(delivery(&url), Some(ack)).await);
        confirmed.await.expect("confirmed once stored");
        let stats = hooks.stats().clone();
        drop(hooks);
        task.await.unwrap();
        let counts = stats.snapshot();
        assert_eq!(counts.len(), 1);
        assert_eq!(counts[0].pending, 1);
        assert_eq!(counts[0].delivered, 0);
        let outbox = reopen(dir.path()).await;
        assert_eq!(outbox.len(), 1, "the undelivered delivery stays on disk");
        let (_, value) = outbox.records().unwrap().remove(0).unwrap();
        let back: Delivery = serde_json::from_slice(&value).unwrap();
        assert_eq!(back, delivery_with_time(&url, back.fired_at_ms));
    }

    fn delivery_with_time(url: &str, at: i64) -> Delivery {
        Delivery {
            fired_at_ms: at,
            ..delivery(url)
        }
    }

    #[tokio::test]
    async fn an_expired_delivery_is_given_up_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (hooks, run) = service(
            Outbox::open(dir.path()).unwrap(),
            crate::supervisor::Heartbeat::detached(),
        );
        let task = tokio::spawn(run);
        let mut old = delivery("http://127.0.0.1:9/alarm");
        old.fired_at_ms = crate::clock::now_ms() - 10_000;
        old.max_age_ms = 1_000;
        assert!(hooks.submit(old, None).await);
        let stats = hooks.stats().clone();
        // Wait for the worker's verdict (no fixed sleep: poll the counter it sets).
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..500 {
            tick.tick().await;
            if stats.snapshot().first().is_some_and(|c| c.dropped == 1) {
                break;
            }
        }
        let c = &stats.snapshot()[0];
        assert_eq!((c.dropped, c.pending, c.delivered), (1, 0, 0));
        drop(hooks);
        task.await.unwrap();
        assert!(reopen(dir.path()).await.is_empty());
    }

    /// Store a delivery numbered `n` (a body of about 1 KiB) through the service; whether it
    /// was confirmed (on disk).
    async fn stored(hooks: &Webhooks, url: &str, n: u32) -> bool {
        let mut d = delivery(url);
        d.body = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(1000));
        let (ack, confirmed) = Ack::new();
        assert!(hooks.submit(d, Some(ack)).await, "service gone");
        confirmed.await.is_ok()
    }

    /// The numbers of the deliveries stored in `outbox`.
    fn numbers(outbox: &Outbox) -> std::collections::BTreeSet<u32> {
        outbox
            .records()
            .unwrap()
            .into_iter()
            .map(|r| {
                let (_, v) = r.unwrap();
                let d: Delivery = serde_json::from_slice(&v).unwrap();
                let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
                body["n"].as_u64().unwrap() as u32
            })
            .collect()
    }

    /// sled keeps a write error for good: the outbox is closed and opened again, so once the
    /// full disk has room, deliveries are stored and confirmed again without a restart.
    #[tokio::test]
    async fn a_full_disk_refuses_deliveries_and_room_brings_them_back_without_a_restart() {
        use crate::sled_reopen::testing::SmallDisk;
        let dir = tempfile::tempdir().unwrap();
        let disk = SmallDisk::new(&dir.path().join("small"), "4m");
        let path = disk.0.join("webhooks");
        let outbox = Outbox::open(&path).unwrap();
        // A receiver that is never there: every delivery stays in the outbox.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/alarm", closed.local_addr().unwrap());
        drop(closed);
        let (hooks, run) = service(outbox.clone(), crate::supervisor::Heartbeat::detached());
        let task = tokio::spawn(run);
        let (mut n, mut confirmed) = (0u32, Vec::new());
        for _ in 0..20 {
            n += 1;
            assert!(stored(&hooks, &url, n).await, "disk has room");
            confirmed.push(n);
        }
        disk.fill("filler");
        // Deliveries go on until one is refused (sled may still have room it already took).
        let mut refused = false;
        for _ in 0..200_000 {
            n += 1;
            if !stored(&hooks, &url, n).await {
                refused = true;
                break;
            }
            confirmed.push(n);
        }
        assert!(refused, "a delivery was confirmed with the disk full");
        assert!(hooks.stats().store_errors() > 0);
        // The error says what, where and what to do.
        let e = outbox.store(&delivery(&url)).unwrap_err().to_string();
        SmallDisk::assert_explains(&e, "webhook outbox", &path);
        // Still refused while the disk is full, across tries to open the outbox again.
        let until = std::time::Instant::now() + crate::sled_reopen::REOPEN_EVERY * 3;
        while std::time::Instant::now() < until {
            n += 1;
            assert!(
                !stored(&hooks, &url, n).await,
                "confirmed with the disk full"
            );
        }
        disk.free("filler");
        // Room again: confirmed again, with no restart.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            n += 1;
            if stored(&hooks, &url, n).await {
                confirmed.push(n);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no delivery confirmed within 60 s of freeing the disk"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..20 {
            n += 1;
            assert!(stored(&hooks, &url, n).await, "after recovery");
            confirmed.push(n);
        }
        drop(hooks);
        task.await.unwrap();
        // Every confirmed delivery is on disk, as the next start finds it.
        drop(outbox);
        let again = reopen(&path).await;
        let on_disk = numbers(&again);
        for c in &confirmed {
            assert!(on_disk.contains(c), "confirmed delivery {c} missing");
        }
    }

    /// Reopen after the service ended: sled's background flusher may hold the file lock for a
    /// moment after the last handle is gone.
    async fn reopen(dir: &std::path::Path) -> Outbox {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..300 {
            tick.tick().await;
            if let Ok(o) = Outbox::open(dir) {
                return o;
            }
        }
        Outbox::open(dir).expect("the outbox reopens")
    }
}
