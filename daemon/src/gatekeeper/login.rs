//! What a login costs, and the bounds that keep a flood of them from costing more.
//!
//! A CONNECT with a password is checked with argon2, which is expensive on purpose (the default
//! parameters take 19 MiB and tens of milliseconds). Left on tokio's blocking pool, every
//! CONNECT of a flood got its own thread and its own 19 MiB, and the allocator kept it: a few
//! rounds of parallel wrong-password CONNECTs took the gateway to gigabytes. This module puts
//! three things between a CONNECT and argon2:
//!
//! 1. **Admission** ([`Admission`]): before a check is queued, a gateway-wide and a
//!    per-source-address bound on checks *in progress* (`login.max_pending`,
//!    `login.max_pending_per_address`) and *started per second* (token buckets,
//!    `login.max_per_second`, `login.max_per_second_per_address`). A CONNECT over a bound is
//!    answered at once with CONNACK 3 ("server unavailable": try again later), without argon2,
//!    counted, and reported in the journal once per [`REFUSAL_REPORT_EVERY`].
//! 2. **A small argon2 pool** ([`Argon2Pool`]): `login.argon2_threads` threads (default: one
//!    per core), each with one argon2 memory area it reuses for every check. Memory for
//!    password checks is therefore `threads × m_cost`, whatever arrives, and none once no
//!    check has come for [`RELEASE_IDLE_ARGON2_AFTER`] (the areas are given back).
//! 3. **A cache of recently verified credentials** ([`CredentialCache`]): after a successful
//!    check, the device's entry keeps an HMAC-SHA-256 tag of (device id, stored hash,
//!    password) under a key drawn at random when the gateway starts and never written
//!    anywhere. A reconnect with the same password matches the tag and skips argon2. Neither
//!    the password nor its hash is kept; an entry lives `login.cache_ttl` at most, holds one
//!    tag per registered device, and the whole cache is emptied on every reload.
//!
//! What must stay true:
//! - timing reveals neither which ids exist nor how they authenticate: every refusal of a
//!   CONNECT that carried a password pays one argon2 check (against a dummy hash when there is
//!   nothing real to check), and admission refusals do not look at the id at all; only a
//!   correct password can be answered from the cache, and its answer is "accepted" anyway;
//! - nothing here blocks the async runtime: checks run on the pool's own threads;
//! - the pool and every map here are bounded; a flood costs bounded CPU and memory.

use crate::config::LoginConfig;
use crate::registry::{AuthFailure, Decision, Device, Registry};
use hmac::{Hmac, Mac};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often refused logins are reported in the journal (every refusal is counted).
pub const REFUSAL_REPORT_EVERY: Duration = Duration::from_secs(10);
/// Source addresses tracked by the per-address buckets; beyond it idle ones are pruned, and an
/// address that finds no room is refused like one over its rate.
const MAX_TRACKED_ADDRESSES: usize = 8192;
/// argon2 memory a pool thread keeps between checks: enough for the default parameters
/// (19 MiB) and for stronger ones up to 64 MiB; a larger area, needed by an unusually costly
/// hash, is given back after its check.
const RETAINED_ARGON2_BYTES: usize = 64 << 20;
/// A pool thread gives its argon2 area back once no check has come for this long. With the
/// default parameters the areas are 19 MiB a thread, more than the rest of a 500-device
/// gateway's heap: kept for good, one login storm would leave them resident for the life of
/// the gateway, although most reconnects are answered by the credential cache. A check after
/// the release allocates the area again (a few milliseconds of page faults, next to tens of
/// milliseconds of argon2). Long enough that a ward's devices coming up, or a power cut's
/// reconnects, reuse the areas throughout.
const RELEASE_IDLE_ARGON2_AFTER: Duration = Duration::from_secs(60);

type HmacSha256 = Hmac<sha2::Sha256>;

/// Why a login was turned away before its password was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// `login.max_pending` checks are already in progress.
    Pending,
    /// This address has `login.max_pending_per_address` checks in progress.
    PendingForAddress,
    /// More than `login.max_per_second` checks were started in the last second.
    Rate,
    /// This address started more than `login.max_per_second_per_address` checks.
    RateForAddress,
    /// The argon2 pool is not running.
    PoolGone,
}

impl Busy {
    /// Short reason for the journal and counters.
    pub fn reason(self) -> &'static str {
        match self {
            Busy::Pending => "too many logins in progress (login.max_pending)",
            Busy::PendingForAddress => {
                "too many logins in progress from this address (login.max_pending_per_address)"
            }
            Busy::Rate => "too many logins per second (login.max_per_second)",
            Busy::RateForAddress => {
                "too many logins per second from this address (login.max_per_second_per_address)"
            }
            Busy::PoolGone => "the password-check pool has stopped",
        }
    }
}

/// How an accepted device proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A client certificate naming it.
    Certificate,
    /// Its password.
    Password,
    /// Both (`auth = "both"`).
    CertificateAndPassword,
}

impl Method {
    /// The `auth=` field of the connect line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Certificate => "certificate",
            Method::Password => "password",
            Method::CertificateAndPassword => "certificate+password",
        }
    }
}

/// The result of one login.
#[derive(Debug)]
pub enum Outcome {
    /// Authenticated. `cached` says the password matched a recent verification.
    Accepted {
        /// The device.
        device: Arc<Device>,
        /// How it proved who it is.
        method: Method,
        /// The password check was answered by the cache.
        cached: bool,
    },
    /// Refused: not who it claims to be.
    Refused(AuthFailure),
    /// Turned away before any check: come back later.
    Busy(Busy),
}

/// Counters of what the login gate did since start.
#[derive(Debug, Default)]
pub struct LoginCounters {
    /// argon2 checks run.
    pub checks: AtomicU64,
    /// Password checks answered by the cache.
    pub cache_hits: AtomicU64,
    /// Logins turned away by a bound on checks in progress.
    pub refused_pending: AtomicU64,
    /// Logins turned away by a per-second bound.
    pub refused_rate: AtomicU64,
}

/// A snapshot of [`LoginCounters`] for the status file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoginCountersSnapshot {
    /// argon2 checks run.
    pub checks: u64,
    /// Password checks answered by the cache.
    pub cache_hits: u64,
    /// Logins turned away by a bound on checks in progress.
    pub refused_pending: u64,
    /// Logins turned away by a per-second bound.
    pub refused_rate: u64,
}

impl LoginCounters {
    /// Plain numbers.
    pub fn snapshot(&self) -> LoginCountersSnapshot {
        LoginCountersSnapshot {
            checks: self.checks.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            refused_pending: self.refused_pending.load(Ordering::Relaxed),
            refused_rate: self.refused_rate.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admission

/// A token bucket: `rate` tokens per second, holding at most `rate` (one second's worth).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Self {
        Self {
            tokens: rate,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(rate);
        self.at = now;
    }

    fn take(&mut self, rate: f64, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn give_back(&mut self, rate: f64) {
        self.tokens = (self.tokens + 1.0).min(rate);
    }
}

#[derive(Debug)]
struct AdmissionState {
    pending: usize,
    per_address: HashMap<IpAddr, (usize, Bucket)>,
    global: Bucket,
}

/// The bounds on password checks in progress and per second.
#[derive(Debug)]
pub struct Admission {
    cfg: LoginConfig,
    state: Mutex<AdmissionState>,
}

/// A check admitted: its slot is released when this is dropped.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.admission.lock();
        s.pending = s.pending.saturating_sub(1);
        if let Some((n, _)) = s.per_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Admission {
    /// Bounds from `cfg`.
    pub fn new(cfg: &LoginConfig) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            cfg: cfg.clone(),
            state: Mutex::new(AdmissionState {
                pending: 0,
                per_address: HashMap::new(),
                global: Bucket::full(f64::from(cfg.max_per_second), now),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        // Plain counters: still meaningful if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admit one check from `ip`, or say which bound it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Busy> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Slot, Busy> {
        let cfg = &self.cfg;
        let rate = f64::from(cfg.max_per_second);
        let rate_ip = f64::from(cfg.max_per_second_per_address);
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.pending >= cfg.max_pending {
            return Err(Busy::Pending);
        }
        if !s.per_address.contains_key(&ip) && s.per_address.len() >= MAX_TRACKED_ADDRESSES {
            // Forget addresses with nothing in progress whose bucket is full again: they
            // are indistinguishable from addresses never seen.
            s.per_address.retain(|_, (n, b)| {
                b.refill(rate_ip, now);
                *n > 0 || b.tokens < rate_ip
            });
            if s.per_address.len() >= MAX_TRACKED_ADDRESSES {
                return Err(Busy::RateForAddress);
            }
        }
        let (n, bucket) = s
            .per_address
            .entry(ip)
            .or_insert_with(|| (0, Bucket::full(rate_ip, now)));
        if *n >= cfg.max_pending_per_address {
            return Err(Busy::PendingForAddress);
        }
        if !bucket.take(rate_ip, now) {
            return Err(Busy::RateForAddress);
        }
        if !s.global.take(rate, now) {
            bucket.give_back(rate_ip);
            return Err(Busy::Rate);
        }
        *n += 1;
        s.pending += 1;
        Ok(Slot {
            admission: self.clone(),
            ip,
        })
    }

    /// Checks in progress now.
    pub fn pending(&self) -> usize {
        self.lock().pending
    }
}

// ---------------------------------------------------------------------------------------------
// The argon2 pool

/// The argon2 memory area one pool thread reuses.
#[derive(Debug, Default)]
pub struct Scratch {
    blocks: Vec<argon2::Block>,
}

impl Scratch {
    /// At least `n` blocks, reusing (and growing) this thread's area.
    pub fn blocks(&mut self, n: usize) -> &mut [argon2::Block] {
        if self.blocks.len() < n {
            self.blocks.resize(n, argon2::Block::default());
        }
        &mut self.blocks[..n]
    }

    /// Give back an area larger than the retained size (after an unusually costly check).
    fn trim(&mut self) {
        let max = RETAINED_ARGON2_BYTES / argon2::Block::SIZE;
        if self.blocks.len() > max {
            self.blocks = Vec::new();
        }
    }

    /// Whether an area is held.
    fn holds_memory(&self) -> bool {
        self.blocks.capacity() > 0
    }

    /// Give the area back, and the heap's free pages with it: an area that glibc placed in an
    /// arena rather than a mapping of its own would otherwise stay resident as free memory.
    fn release(&mut self) {
        self.blocks = Vec::new();
        crate::footprint::trim_heap();
    }
}

type Job = Box<dyn FnOnce(&mut Scratch) + Send>;

/// A fixed set of threads running password checks, each with its own reusable memory.
#[derive(Debug)]
pub struct Argon2Pool {
    jobs: std::sync::mpsc::SyncSender<Job>,
    threads: usize,
}

impl Argon2Pool {
    /// Start `threads` threads (0: one per core) with room for `queue` waiting checks.
    pub fn start(threads: usize, queue: usize) -> std::io::Result<Self> {
        Self::start_releasing_after(threads, queue, RELEASE_IDLE_ARGON2_AFTER)
    }

    /// [`Argon2Pool::start`], each thread giving its area back after `idle_after` without a
    /// check.
    fn start_releasing_after(
        threads: usize,
        queue: usize,
        idle_after: Duration,
    ) -> std::io::Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("wardgate-argon2-{i}"))
                .spawn(move || {
                    let mut scratch = Scratch::default();
                    let mut idle_since = Instant::now();
                    loop {
                        // Holding an area, wait only until it is due back.
                        let due = scratch
                            .holds_memory()
                            .then(|| idle_after.saturating_sub(idle_since.elapsed()));
                        // The lock is held only while waiting for the next job.
                        let next = {
                            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                            match due {
                                Some(wait) => rx.recv_timeout(wait),
                                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                            }
                        };
                        let job = match next {
                            Ok(job) => job,
                            Err(RecvTimeoutError::Timeout) => {
                                scratch.release();
                                continue;
                            }
                            Err(RecvTimeoutError::Disconnected) => return,
                        };
                        // A panicking check must not take the thread (and its memory) with
                        // it: the waiting connection sees its answer dropped and refuses.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(&mut scratch)
                        }));
                        scratch.trim();
                        idle_since = Instant::now();
                    }
                })?;
        }
        Ok(Self { jobs: tx, threads })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` on a pool thread and wait for its answer; `None` if the pool cannot take it.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Scratch) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |scratch| {
            // The connection gave up waiting (client gone, gateway stopping): skip the work.
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(f(scratch));
        });
        self.jobs.try_send(job).ok()?;
        rx.await.ok()
    }
}

// ---------------------------------------------------------------------------------------------
// The credential cache

#[derive(Debug)]
struct CacheEntry {
    tag: [u8; 32],
    verified_at: Instant,
}

/// Recently verified credentials, as keyed tags (see the module doc).
#[derive(Debug)]
pub struct CredentialCache {
    key: [u8; 32],
    ttl: Duration,
    entries: Mutex<HashMap<Arc<str>, CacheEntry>>,
}

impl CredentialCache {
    /// An empty cache with a fresh random key; `ttl` zero disables it.
    pub fn new(ttl: Duration) -> Self {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self {
            key,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn tag(&self, id: &str, phc: &str, password: &[u8]) -> [u8; 32] {
        let mut mac =
            HmacSha256::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        for part in [id.as_bytes(), phc.as_bytes(), password] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, CacheEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `password` was verified for device `id` with hash `phc` within the TTL.
    pub fn hit(&self, id: &str, phc: &str, password: &[u8]) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let tag = self.tag(id, phc, password);
        let mut m = self.lock();
        match m.get(id) {
            Some(e) if e.verified_at.elapsed() <= self.ttl => {
                // Constant-time comparison of the two tags.
                tag.iter()
                    .zip(e.tag.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
            }
            Some(_) => {
                m.remove(id);
                false
            }
            None => false,
        }
    }

    /// Remember a successful verification (one entry per device: the latest).
    pub fn insert(&self, id: &Arc<str>, phc: &str, password: &[u8]) {
        if self.ttl.is_zero() {
            return;
        }
        let tag = self.tag(id, phc, password);
        self.lock().insert(
            id.clone(),
            CacheEntry {
                tag,
                verified_at: Instant::now(),
            },
        );
    }

    /// Forget everything (on reload: devices, hashes or policies may have changed).
    pub fn clear(&self) -> usize {
        let mut m = self.lock();
        let n = m.len();
        m.clear();
        n
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------------
// The gate

#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

/// Everything between a CONNECT and its answer; one per gateway, shared by every listener.
#[derive(Debug, Clone)]
pub struct LoginGate(Arc<GateInner>);

#[derive(Debug)]
struct GateInner {
    admission: Arc<Admission>,
    pool: Argon2Pool,
    cache: CredentialCache,
    counters: LoginCounters,
    refusals: Mutex<RefusalLog>,
}

impl LoginGate {
    /// Start the pool and set the bounds from `cfg`.
    pub fn new(cfg: &LoginConfig) -> std::io::Result<Self> {
        Ok(Self(Arc::new(GateInner {
            admission: Admission::new(cfg),
            pool: Argon2Pool::start(cfg.argon2_threads, cfg.max_pending)?,
            cache: CredentialCache::new(cfg.cache_ttl),
            counters: LoginCounters::default(),
            refusals: Mutex::new(RefusalLog::default()),
        })))
    }

    /// What the gate did since start.
    pub fn counters(&self) -> &LoginCounters {
        &self.0.counters
    }

    /// Threads checking passwords.
    pub fn threads(&self) -> usize {
        self.0.pool.threads()
    }

    /// Checks in progress now.
    pub fn pending(&self) -> usize {
        self.0.admission.pending()
    }

    /// Verified credentials cached now.
    pub fn cached(&self) -> usize {
        self.0.cache.len()
    }

    /// Forget every cached credential (configuration reload). Returns how many were held.
    pub fn clear_cache(&self) -> usize {
        self.0.cache.clear()
    }

    /// Authenticate a CONNECT from `peer` against `registry`.
    pub async fn authenticate(
        &self,
        registry: Arc<Registry>,
        client_id: &str,
        cert_names: Option<&[String]>,
        password: Option<&str>,
        peer: IpAddr,
    ) -> Outcome {
        let inner = &self.0;
        /// What the one argon2 check of a CONNECT with a password is made against.
        enum Check {
            /// The device's own hash: a match authenticates it.
            Device {
                device: Arc<Device>,
                phc: String,
                method: Method,
            },
            /// Already refused: the dummy hash, so the refusal costs what a check costs.
            Dummy(AuthFailure),
        }
        let check = match registry.decide(client_id, cert_names, password.is_some()) {
            Decision::Accept(device) => {
                return Outcome::Accepted {
                    device,
                    method: Method::Certificate,
                    cached: false,
                }
            }
            Decision::Refuse { why } => Check::Dummy(why),
            Decision::CheckPassword {
                device,
                phc,
                with_certificate,
            } => Check::Device {
                device,
                phc,
                method: if with_certificate {
                    Method::CertificateAndPassword
                } else {
                    Method::Password
                },
            },
        };
        let Some(password) = password else {
            // No password, nothing to check: `decide` refuses a device that needs one.
            return Outcome::Refused(match check {
                Check::Dummy(why) => why,
                Check::Device { .. } => AuthFailure::MissingPassword,
            });
        };
        if let Check::Device {
            device,
            phc,
            method,
        } = &check
        {
            if inner.cache.hit(&device.id, phc, password.as_bytes()) {
                inner.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Outcome::Accepted {
                    device: device.clone(),
                    method: *method,
                    cached: true,
                };
            }
        }
        let slot = match inner.admission.admit(peer) {
            Ok(s) => s,
            Err(busy) => {
                self.refused(busy, peer);
                return Outcome::Busy(busy);
            }
        };
        inner.counters.checks.fetch_add(1, Ordering::Relaxed);
        let against = match &check {
            Check::Device { phc, .. } => phc.clone(),
            Check::Dummy(_) => crate::registry::dummy_hash().to_owned(),
        };
        let given = password.to_owned();
        let matched = inner
            .pool
            .run(move |scratch| {
                let _slot = slot;
                crate::registry::verify_phc(&against, given.as_bytes(), scratch)
            })
            .await;
        let Some(matched) = matched else {
            self.refused(Busy::PoolGone, peer);
            return Outcome::Busy(Busy::PoolGone);
        };
        match check {
            Check::Dummy(why) => Outcome::Refused(why),
            Check::Device {
                device,
                phc,
                method,
            } if matched => {
                inner.cache.insert(&device.id, &phc, password.as_bytes());
                Outcome::Accepted {
                    device,
                    method,
                    cached: false,
                }
            }
            Check::Device { .. } => Outcome::Refused(AuthFailure::WrongPassword),
        }
    }

    /// Count a turned-away login and report it, at most once per [`REFUSAL_REPORT_EVERY`].
    fn refused(&self, busy: Busy, peer: IpAddr) {
        let c = &self.0.counters;
        match busy {
            Busy::Pending | Busy::PendingForAddress | Busy::PoolGone => {
                c.refused_pending.fetch_add(1, Ordering::Relaxed)
            }
            Busy::Rate | Busy::RateForAddress => c.refused_rate.fetch_add(1, Ordering::Relaxed),
        };
        let mut log = self.0.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if log
            .last
            .is_some_and(|t| now.duration_since(t) < REFUSAL_REPORT_EVERY)
        {
            log.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed);
        log.last = Some(now);
        drop(log);
        let s = c.snapshot();
        log::warn!(
            peer_address:% = peer, reason = busy.reason(), suppressed = suppressed,
            refused_pending = s.refused_pending, refused_rate = s.refused_rate;
            "login refused before any password check: {}; CONNACK 3 (server unavailable), the device retries later{}",
            busy.reason(),
            if suppressed > 0 {
                format!(" ({suppressed} more refused in the last {}s)", REFUSAL_REPORT_EVERY.as_secs())
            } else {
                String::new()
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LoginConfig {
        LoginConfig {
            argon2_threads: 1,
            max_pending: 3,
            max_pending_per_address: 2,
            max_per_second: 5,
            max_per_second_per_address: 4,
            cache_ttl: Duration::from_secs(60),
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    #[test]
    fn checks_in_progress_are_bounded_per_address_and_in_all() {
        let adm = Admission::new(&cfg());
        let now = Instant::now();
        let a1 = adm.admit_at(A, now).unwrap();
        let _a2 = adm.admit_at(A, now).unwrap();
        assert_eq!(adm.admit_at(A, now).unwrap_err(), Busy::PendingForAddress);
        let _b1 = adm.admit_at(B, now).unwrap();
        assert_eq!(adm.admit_at(C, now).unwrap_err(), Busy::Pending);
        drop(a1);
        assert_eq!(adm.pending(), 2);
        assert!(adm.admit_at(C, now).is_ok());
    }

    #[test]
    fn checks_per_second_are_bounded_and_refill() {
        let adm = Admission::new(&cfg());
        let t0 = Instant::now();
        // Four from A (its bucket), each released at once.
        for _ in 0..4 {
            drop(adm.admit_at(A, t0).unwrap());
        }
        assert_eq!(adm.admit_at(A, t0).unwrap_err(), Busy::RateForAddress);
        // The fifth of the second, from B, fits the global bucket; the sixth does not.
        drop(adm.admit_at(B, t0).unwrap());
        assert_eq!(adm.admit_at(C, t0).unwrap_err(), Busy::Rate);
        // A refused global take does not use up the address's token.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..4 {
            drop(adm.admit_at(C, t1).unwrap());
        }
        // Half a second later: half of each bucket is back.
        let t2 = t1 + Duration::from_millis(500);
        assert!(adm.admit_at(A, t2).is_ok());
    }

    #[test]
    fn cache_matches_only_the_same_id_hash_and_password_within_its_ttl() {
        let c = CredentialCache::new(Duration::from_secs(60));
        let id: Arc<str> = "pm-1".into();
        c.insert(&id, "$hash-1", b"secret");
        assert!(c.hit("pm-1", "$hash-1", b"secret"));
        assert!(!c.hit("pm-1", "$hash-1", b"secreT"));
        assert!(
            !c.hit("pm-1", "$hash-2", b"secret"),
            "a changed hash misses"
        );
        assert!(!c.hit("pm-2", "$hash-1", b"secret"));
        assert_eq!(c.clear(), 1);
        assert!(!c.hit("pm-1", "$hash-1", b"secret"));
        let off = CredentialCache::new(Duration::ZERO);
        off.insert(&id, "$hash-1", b"secret");
        assert!(!off.hit("pm-1", "$hash-1", b"secret"));
        assert!(off.is_empty());
    }

    #[test]
    fn tags_keep_neither_password_nor_hash() {
        let c = CredentialCache::new(Duration::from_secs(60));
        let other = CredentialCache::new(Duration::from_secs(60));
        let t = c.tag("pm-1", "$argon2id$v=19$...", b"secret");
        assert_ne!(
            t,
            other.tag("pm-1", "$argon2id$v=19$...", b"secret"),
            "keyed per process"
        );
        // Length-prefixed parts: moving bytes between parts changes the tag.
        assert_ne!(c.tag("pm-1", "ab", b"c"), c.tag("pm-1", "a", b"bc"));
    }

    #[tokio::test]
    async fn the_method_names_what_was_verified() {
        use crate::config::{AuthMode, DeviceConfig, PolicyConfig};
        use crate::registry::hash_password_demo;
        let mut cert = DeviceConfig::with_password("cert-1", "pacemaker", String::new());
        cert.password_hash = None;
        cert.auth = Some(AuthMode::Certificate);
        let mut both = DeviceConfig::with_password("both-1", "glucose", hash_password_demo("pw"));
        both.auth = Some(AuthMode::Both);
        let pw = DeviceConfig::with_password("pw-1", "glucose", hash_password_demo("pw"));
        let registry = Arc::new(Registry::from_config(
            &[cert, both, pw],
            &PolicyConfig::default(),
        ));
        let gate = LoginGate::new(&cfg()).unwrap();
        let names = |n: &str| vec![n.to_owned()];
        let method = |o: Outcome| match o {
            Outcome::Accepted { method, .. } => method,
            other => panic!("refused: {other:?}"),
        };
        let login = |id: &'static str, cert: Option<Vec<String>>, pw: Option<&'static str>| {
            let (gate, registry) = (gate.clone(), registry.clone());
            async move {
                gate.authenticate(registry, id, cert.as_deref(), pw, A)
                    .await
            }
        };
        assert_eq!(
            method(login("cert-1", Some(names("cert-1")), None).await),
            Method::Certificate
        );
        assert_eq!(
            method(login("both-1", Some(names("both-1")), Some("pw")).await),
            Method::CertificateAndPassword
        );
        // A password device that also shows its certificate authenticated by its password.
        assert_eq!(
            method(login("pw-1", Some(names("pw-1")), Some("pw")).await),
            Method::Password
        );
        assert_eq!(
            method(login("pw-1", None, Some("pw")).await),
            Method::Password
        );
        assert!(matches!(
            login("both-1", None, Some("pw")).await,
            Outcome::Refused(AuthFailure::CertificateRequired)
        ));
        assert!(matches!(
            login("pw-1", None, Some("nope")).await,
            Outcome::Refused(AuthFailure::WrongPassword)
        ));
        assert_eq!(
            Method::CertificateAndPassword.name(),
            "certificate+password"
        );
    }

    #[tokio::test]
    async fn pool_threads_reuse_their_memory_and_survive_a_panicking_check() {
        let pool = Argon2Pool::start(1, 4).unwrap();
        let first = pool.run(|s| s.blocks(16).as_ptr() as usize).await.unwrap();
        let again = pool.run(|s| s.blocks(16).as_ptr() as usize).await.unwrap();
        assert_eq!(first, again, "the same area is reused");
        assert!(pool.run(|_| -> u8 { panic!("boom") }).await.is_none());
        assert_eq!(pool.run(|_| 7).await, Some(7), "the thread is still there");
    }

    #[tokio::test]
    async fn pool_threads_give_their_memory_back_when_idle() {
        let pool = Argon2Pool::start_releasing_after(1, 4, Duration::from_millis(200)).unwrap();
        assert_eq!(pool.run(|s| s.blocks(16).len()).await, Some(16));
        assert_eq!(
            pool.run(|s| s.holds_memory()).await,
            Some(true),
            "kept between checks"
        );
        // Given back once idle for 200 ms: asked until it is (each ask is a check, so the
        // asks must be further apart than the idle time).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if pool.run(|s| s.holds_memory()).await == Some(false) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "area not given back after the idle time"
            );
        }
        assert_eq!(
            pool.run(|s| s.blocks(16).len()).await,
            Some(16),
            "and taken again"
        );
    }
}
