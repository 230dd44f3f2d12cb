//! Supervision of the gateway's long-running stages: none of them may end or hang unseen.
//!
//! Every long-running task of a [`crate::app::Gateway`] runs as a *stage* of one
//! [`Supervisor`]: it has a name (`STAGE=` in the journal, a line in `wardgate status`), a
//! [`Policy`], and a [`Heartbeat`] it bumps whenever its loop turns: after every piece of work
//! and on an idle tick ([`Heartbeat::ticker`], every [`HEARTBEAT_INTERVAL`]), so an idle stage
//! still proves its loop is alive, and a stage blocked inside one step stops beating.
//!
//! The supervisor sees a stage
//! - **end**: it returned while nobody asked it to stop, returned an error, or panicked (the
//!   panic message is kept). It is logged at ERROR with `STAGE=` and `REASON=` and recorded
//!   for the status file; then the policy decides.
//! - **stall**: its heartbeat is older than the stall threshold ([`Supervisor::stall_after`]:
//!   the systemd watchdog interval, at least [`MIN_STALL`]; [`DEFAULT_STALL`] without a
//!   watchdog). It is logged at ERROR once, shown as `stalled`, and the watchdog is no longer
//!   fed ([`Supervisor::check`] is what `run_daemon`'s watchdog asks before every `WATCHDOG=1`),
//!   so systemd kills and restarts the daemon if the stage does not recover in time. A stage
//!   that beats again is logged at INFO and counts as healthy again.
//!
//! # Policies, per stage, and why
//! | stage | policy | why |
//! |---|---|---|
//! | `pipeline` | fatal | its receiver holds every accepted reading not yet handled and is shared by every device connection; a new one cannot be attached to the connections' senders. Readings it held were never acknowledged, so devices resend them after the restart. |
//! | `queue-writer` | fatal | it owns the group commit behind every PUBACK; a panic may have left the sled store half-written, and only reopening the queue (CRC check of every record, [`crate::queue`]) proves what is on disk. Its unconfirmed readings were never acknowledged. |
//! | `listener-plain`, `listener-tls` | fatal | a restarted accept loop would have to rebind the same port while the dead loop's connections still hang off the old state (and port 0 would move); a process restart rebinds everything and costs each device one reconnect. |
//! | `broker` | fatal | rumqttd runs on its own threads and cannot be stopped or restarted in-process (upstream has no shutdown); the supervisor checks that its thread is alive. |
//! | `local-publisher` | fatal | the pipeline's MQTT client to the broker (`ward/<device>/readings` for local consumers) is owned by the pipeline; its event loop ending means a bug in it, and a fresh process is the clean way back. The supervisor checks that its task is alive. |
//! | `uplink` | restart | it keeps no state the queue does not: a new session re-reads everything unacknowledged from the durable queue (at-least-once, duplicates carry their sequence number). |
//! | `plugin-watch` | restart | a directory scan holds nothing a later scan does not rebuild. |
//! | `status` | restart | it only writes a snapshot of counters kept elsewhere. |
//!
//! A fatal stage that ends makes [`Supervisor::fatal`] resolve: `run_daemon` then stops the
//! gateway in order (what can still be drained is drained) and exits non-zero, so the unit's
//! `Restart=on-failure` starts a fresh process. A restartable stage is started again after a
//! jittered backoff (1 s doubling to [`RESTART_BACKOFF_MAX`], ±25 %, back to 1 s once it ran
//! for [`RESTART_RESET_AFTER`]); every restart is counted and logged at ERROR with the reason.
//!
//! Not stages: one task per device connection (a panic there ends that connection only; the
//! listener's task tracker outlives it), and the plugin engine's epoch ticker thread (if it
//! stopped, a plugin call that never returns would stop the `pipeline` heartbeat, which the
//! watchdog sees).
//!
//! What must stay true: a stage ends unexpectedly only with an ERROR naming it; the watchdog
//! is fed only while every running stage beats; ends during [`Supervisor::begin_stop`] are
//! expected, except panics and errors, which are still reported (and keep a stop from saying
//! "drained").
//!
//! # Fault injection (test builds only)
//! With the cargo feature `fault-injection` (enabled by the integration tests' dependency on
//! this crate, never by the release or package build), `WG_FAULT=<stage>:<panic|error|stall>`
//! names one stage; on SIGUSR2 that stage panics, returns an error, or stops being polled
//! (a hang with its state still alive). It fires once, so a restarted stage runs normally.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often an idle stage beats: its idle tick.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest stall threshold: ten idle ticks, so a busy machine's scheduling delays or a
/// slow disk flush never count as a stall.
pub const MIN_STALL: Duration = Duration::from_secs(10);
/// The stall threshold when no watchdog is configured.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// First wait before a restartable stage is started again.
pub const RESTART_BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest wait before a restartable stage is started again.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A stage that ran this long before ending restarts after the first backoff again.
pub const RESTART_RESET_AFTER: Duration = Duration::from_secs(60);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn elapsed_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// A stage's proof of progress: bump it every time the stage's loop turns.
#[derive(Debug, Clone)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    /// A heartbeat nobody watches (a stage run outside a supervisor).
    pub fn detached() -> Self {
        Self(Arc::new(AtomicU64::new(elapsed_ms())))
    }

    /// The stage made progress (or its idle tick came): it is alive now.
    pub fn beat(&self) {
        self.0.store(elapsed_ms(), Ordering::Relaxed);
    }

    /// The idle tick a stage selects on beside its work, every [`HEARTBEAT_INTERVAL`].
    pub fn ticker() -> tokio::time::Interval {
        let mut t = tokio::time::interval_at(
            tokio::time::Instant::now() + HEARTBEAT_INTERVAL,
            HEARTBEAT_INTERVAL,
        );
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }

    fn age(&self) -> Duration {
        Duration::from_millis(elapsed_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// What happens when a stage ends unexpectedly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Start it again after a backoff.
    Restart,
    /// Stop the gateway; the daemon exits non-zero and systemd restarts it.
    Fatal,
}

impl Policy {
    /// `restart` or `fatal`.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Restart => "restart",
            Policy::Fatal => "fatal",
        }
    }
}

/// Where a stage is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageState {
    /// Running and beating.
    Running,
    /// Running, but its heartbeat is older than the stall threshold.
    Stalled,
    /// Ended unexpectedly; waiting for its restart.
    Restarting,
    /// Ended unexpectedly and not restarted (fatal policy, or during a stop).
    Failed,
    /// Ended because it was asked to stop.
    Stopped,
}

impl StageState {
    /// The word `wardgate status` shows.
    pub fn name(self) -> &'static str {
        match self {
            StageState::Running => "running",
            StageState::Stalled => "STALLED",
            StageState::Restarting => "RESTARTING",
            StageState::Failed => "FAILED",
            StageState::Stopped => "stopped",
        }
    }
}

/// One stage in the status file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStatus {
    /// Stage name (`pipeline`, `queue-writer`, `uplink`, ...).
    pub name: String,
    /// What happens when it ends unexpectedly.
    pub policy: Policy,
    /// Where it is now.
    pub state: StageState,
    /// Times it was restarted since start.
    pub restarts: u32,
    /// Why it last ended unexpectedly or stalled.
    #[serde(default)]
    pub last_failure: Option<String>,
    /// When, RFC 3339.
    #[serde(default)]
    pub last_failure_at: Option<String>,
    /// Milliseconds since its last heartbeat.
    pub since_progress_ms: u64,
}

/// A stage that ended unexpectedly, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageFailure {
    /// Stage name.
    pub stage: String,
    /// What happened (`panicked: ...`, `failed: ...`, `ended without being asked to stop`).
    pub reason: String,
}

impl std::fmt::Display for StageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage {} {}", self.stage, self.reason)
    }
}

type Probe = Box<dyn Fn() -> Option<String> + Send + Sync>;

struct Entry {
    name: String,
    policy: Policy,
    beat: Heartbeat,
    state: StageState,
    restarts: u32,
    last_failure: Option<(String, SystemTime)>,
    /// For stages that are not tasks (the broker's thread): `Some(reason)` once it ended.
    probe: Option<Probe>,
}

struct Inner {
    stages: Mutex<Vec<Entry>>,
    stopping: AtomicBool,
    fatal: CancellationToken,
    first_fatal: Mutex<Option<StageFailure>>,
    stall_after_ms: AtomicU64,
}

/// Runs and watches the stages of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor(Arc<Inner>);

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("stages", &self.snapshot())
            .finish()
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

/// A running stage; [`Stage::join`] waits for its end.
#[derive(Debug)]
pub struct Stage<T> {
    name: String,
    task: JoinHandle<Result<T, StageFailure>>,
}

impl<T> Stage<T> {
    /// Wait for the stage to end: its value, or why it failed (already logged and recorded).
    pub async fn join(&mut self) -> Result<T, StageFailure> {
        match (&mut self.task).await {
            Ok(r) => r,
            // The watching task itself only awaits and records; it ends this way only if the
            // runtime is shutting down.
            Err(e) => Err(StageFailure {
                stage: self.name.clone(),
                reason: format!("was not watched to its end: {e}"),
            }),
        }
    }
}

impl Supervisor {
    /// No stages yet; stall threshold [`DEFAULT_STALL`].
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            stages: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            fatal: CancellationToken::new(),
            first_fatal: Mutex::new(None),
            stall_after_ms: AtomicU64::new(DEFAULT_STALL.as_millis() as u64),
        }))
    }

    /// The stall threshold for a watchdog of `interval` (`None`: no watchdog).
    pub fn stall_threshold(watchdog: Option<Duration>) -> Duration {
        watchdog.map_or(DEFAULT_STALL, |w| w.max(MIN_STALL))
    }

    /// Set the stall threshold.
    pub fn set_stall_after(&self, d: Duration) {
        self.0
            .stall_after_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// A stage whose heartbeat is older than this is stalled.
    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.0.stall_after_ms.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // The entries stay meaningful even if a holder panicked.
        self.0.stages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, name: &str, policy: Policy, probe: Option<Probe>) -> Heartbeat {
        let beat = Heartbeat::detached();
        self.lock().push(Entry {
            name: name.to_owned(),
            policy,
            beat: beat.clone(),
            state: StageState::Running,
            restarts: 0,
            last_failure: None,
            probe,
        });
        beat
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.lock().iter_mut().find(|e| e.name == name) {
            f(e);
        }
    }

    /// From now on stages are expected to end (the gateway is stopping).
    pub fn begin_stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether [`Supervisor::begin_stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    /// Resolves when a fatal stage failed, with the first such failure.
    pub async fn fatal(&self) -> StageFailure {
        self.0.fatal.cancelled().await;
        self.fatal_failure()
            .expect("the fatal token is cancelled only after the failure is stored")
    }

    /// The first fatal failure, if one happened.
    pub fn fatal_failure(&self) -> Option<StageFailure> {
        self.0
            .first_fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every stage as the status file shows it, in start order.
    pub fn snapshot(&self) -> Vec<StageStatus> {
        self.lock()
            .iter()
            .map(|e| StageStatus {
                name: e.name.clone(),
                policy: e.policy,
                state: e.state,
                restarts: e.restarts,
                last_failure: e.last_failure.as_ref().map(|(r, _)| r.clone()),
                last_failure_at: e
                    .last_failure
                    .as_ref()
                    .map(|(_, t)| humantime::format_rfc3339_seconds(*t).to_string()),
                since_progress_ms: if e.probe.is_some() {
                    0
                } else {
                    e.beat.age().as_millis() as u64
                },
            })
            .collect()
    }

    /// Stages that failed and were not restarted, with their reasons.
    pub fn failures(&self) -> Vec<StageFailure> {
        self.lock()
            .iter()
            .filter(|e| e.state == StageState::Failed)
            .map(|e| StageFailure {
                stage: e.name.clone(),
                reason: e
                    .last_failure
                    .as_ref()
                    .map(|(r, _)| r.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Record an unexpected end that is not followed by a restart; logs it at ERROR. A fatal
    /// stage's failure (outside a stop) makes [`Supervisor::fatal`] resolve.
    fn failed(&self, name: &str, reason: String) -> StageFailure {
        let mut policy = Policy::Fatal;
        self.update(name, |e| {
            policy = e.policy;
            e.state = StageState::Failed;
            e.last_failure = Some((reason.clone(), SystemTime::now()));
        });
        let failure = StageFailure {
            stage: name.to_owned(),
            reason,
        };
        if self.is_stopping() || policy != Policy::Fatal {
            log::error!(
                stage = name, policy = policy.name(), reason:% = failure.reason;
                "{failure} while the gateway was stopping"
            );
        } else {
            log::error!(
                stage = name, policy = policy.name(), reason:% = failure.reason;
                "{failure}; wardgate stops and exits with an error so that the service manager restarts it"
            );
            let mut first = self.0.first_fatal.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(failure.clone());
            }
            drop(first);
            self.0.fatal.cancel();
        }
        failure
    }

    /// Run a stage whose unexpected end stops the gateway. `make` gets the stage's heartbeat.
    pub fn spawn_fatal<T, E, Fut, F>(&self, name: &str, make: F) -> Stage<T>
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        E: std::fmt::Display + 'static,
        T: Send + 'static,
    {
        let beat = self.register(name, Policy::Fatal, None);
        self.run_fatal(name, make(beat))
    }

    /// Run a service stage: the shape of every stage that serves an entrance (the queue
    /// writer, the dead-letter writer, the shadow service, the webhook outbox). `make` gets the
    /// stage's heartbeat and builds the entrance (handed back, for its producers to clone) and
    /// the task that serves it until the last entrance is gone. Like [`Self::spawn_fatal`], an
    /// end before the gateway stops stops the gateway.
    pub fn spawn_service<H, Fut, F>(&self, name: &str, make: F) -> (Stage<()>, H)
    where
        F: FnOnce(Heartbeat) -> (H, Fut),
        Fut: Future<Output = ()> + Send + 'static,
    {
        let beat = self.register(name, Policy::Fatal, None);
        let (entrance, run) = make(beat);
        let stage = self.run_fatal(name, async move {
            run.await;
            Ok::<_, std::convert::Infallible>(())
        });
        (stage, entrance)
    }

    fn run_fatal<T, E, Fut>(&self, name: &str, fut: Fut) -> Stage<T>
    where
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        E: std::fmt::Display + 'static,
        T: Send + 'static,
    {
        let inner = tokio::spawn(guarded(name.to_owned(), fut));
        let sup = self.clone();
        let stage = name.to_owned();
        let task = tokio::spawn(async move {
            match outcome(inner.await) {
                Ok(v) if sup.is_stopping() => {
                    sup.update(&stage, |e| e.state = StageState::Stopped);
                    Ok(v)
                }
                Ok(_) => Err(sup.failed(&stage, "ended without being asked to stop".into())),
                Err(reason) => Err(sup.failed(&stage, reason)),
            }
        });
        Stage {
            name: name.to_owned(),
            task,
        }
    }

    /// Run a stage that is started again (by calling `make` anew) when it ends unexpectedly.
    /// It ends for good when `stop` is cancelled or the supervisor is stopping.
    pub fn spawn_restarting<E, Fut, F>(
        &self,
        name: &str,
        stop: CancellationToken,
        mut make: F,
    ) -> Stage<()>
    where
        F: FnMut(Heartbeat) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + 'static,
    {
        let beat = self.register(name, Policy::Restart, None);
        let sup = self.clone();
        let stage = name.to_owned();
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                let started = Instant::now();
                beat.beat();
                let inner = tokio::spawn(guarded(stage.clone(), make(beat.clone())));
                let result = outcome(inner.await);
                let expected = stop.is_cancelled() || sup.is_stopping();
                let reason = match result {
                    Ok(()) if expected => {
                        sup.update(&stage, |e| e.state = StageState::Stopped);
                        return Ok(());
                    }
                    Ok(()) => "ended without being asked to stop".to_owned(),
                    Err(reason) => reason,
                };
                if expected {
                    return Err(sup.failed(&stage, reason));
                }
                if started.elapsed() >= RESTART_RESET_AFTER {
                    backoff = Backoff::default();
                }
                let wait = backoff.next_wait();
                let mut restarts = 0;
                sup.update(&stage, |e| {
                    e.state = StageState::Restarting;
                    e.restarts += 1;
                    restarts = e.restarts;
                    e.last_failure = Some((reason.clone(), SystemTime::now()));
                });
                log::error!(
                    stage = stage, policy = "restart", reason:% = reason,
                    retry_in_ms = wait.as_millis() as u64, restarts = restarts;
                    "stage {stage} {reason}; restarting it in {} ms", wait.as_millis()
                );
                tokio::select! {
                    _ = stop.cancelled() => {
                        sup.update(&stage, |e| e.state = StageState::Stopped);
                        return Ok(());
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                sup.update(&stage, |e| e.state = StageState::Running);
                log::info!(stage = stage, restarts = restarts; "stage {stage} restarted");
            }
        });
        Stage {
            name: name.to_owned(),
            task,
        }
    }

    /// Watch something that is not a task (a thread): `probe` returns why it ended, once it
    /// has. Checked by [`Supervisor::check`]; its end is fatal.
    pub fn watch_fatal(
        &self,
        name: &str,
        probe: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) {
        self.register(name, Policy::Fatal, Some(Box::new(probe)));
    }

    /// Look at every stage: log stalls and recoveries (once per change), notice watched
    /// threads that ended. Returns the stages that are stalled or failed: the watchdog is fed
    /// only while this is empty.
    pub fn check(&self) -> Vec<String> {
        let stall_after = self.stall_after();
        let mut unhealthy = Vec::new();
        let mut ended = Vec::new();
        {
            let mut stages = self.lock();
            for e in stages.iter_mut() {
                if let Some(probe) = &e.probe {
                    // What a probe watches is let go during a stop.
                    if e.state == StageState::Running && !self.is_stopping() {
                        if let Some(reason) = probe() {
                            ended.push((e.name.clone(), reason));
                        }
                    }
                    if e.state == StageState::Failed {
                        unhealthy.push(e.name.clone());
                    }
                    continue;
                }
                match e.state {
                    StageState::Running | StageState::Stalled => {
                        let age = e.beat.age();
                        if age > stall_after {
                            if e.state == StageState::Running {
                                let reason = format!(
                                    "made no progress for {} s (stall threshold {} s)",
                                    age.as_secs(),
                                    stall_after.as_secs()
                                );
                                log::error!(
                                    stage = e.name, policy = e.policy.name(), reason:% = reason,
                                    since_progress_ms = age.as_millis() as u64;
                                    "stage {} stalled: it {reason}", e.name
                                );
                                e.state = StageState::Stalled;
                                e.last_failure = Some((reason, SystemTime::now()));
                            }
                            unhealthy.push(e.name.clone());
                        } else if e.state == StageState::Stalled {
                            log::info!(stage = e.name; "stage {} is making progress again", e.name);
                            e.state = StageState::Running;
                        }
                    }
                    StageState::Failed => unhealthy.push(e.name.clone()),
                    StageState::Restarting | StageState::Stopped => {}
                }
            }
        }
        for (name, reason) in ended {
            self.failed(&name, reason);
            unhealthy.push(name);
        }
        unhealthy
    }

    /// The health check behind both `/healthz` and the systemd watchdog: [`Supervisor::check`]
    /// (so a stall is noticed by whichever asks first), plus whether a stop has begun.
    pub fn health(&self) -> Health {
        let unhealthy = self.check();
        Health {
            stopping: self.is_stopping(),
            unhealthy,
            stages: self.snapshot(),
        }
    }

    /// Run [`Supervisor::check`] every [`HEARTBEAT_INTERVAL`] (so stalls are logged and shown
    /// with or without a watchdog). Abort the handle to stop it.
    pub fn spawn_monitor(&self) -> JoinHandle<()> {
        let sup = self.clone();
        tokio::spawn(async move {
            let mut tick = Heartbeat::ticker();
            loop {
                tick.tick().await;
                sup.check();
            }
        })
    }
}

/// What [`Supervisor::health`] found.
#[derive(Debug, Clone)]
pub struct Health {
    /// A stop has begun: stages are being let go.
    pub stopping: bool,
    /// Stages stalled or failed.
    pub unhealthy: Vec<String>,
    /// Every stage.
    pub stages: Vec<StageStatus>,
}

impl Health {
    /// Every stage is alive and making progress, and no stop has begun: the watchdog may be
    /// fed and `/healthz` answers 200.
    pub fn ok(&self) -> bool {
        !self.stopping && self.unhealthy.is_empty()
    }
}

/// Restart delays: doubling from [`RESTART_BACKOFF_FIRST`] to [`RESTART_BACKOFF_MAX`], each
/// jittered by ±25 % and never above the maximum.
#[derive(Debug)]
struct Backoff {
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: RESTART_BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    fn next_wait(&mut self) -> Duration {
        let jitter = 0.75 + rand::random::<f64>() * 0.5;
        let wait = self.base.mul_f64(jitter).min(RESTART_BACKOFF_MAX);
        self.base = (self.base * 2).min(RESTART_BACKOFF_MAX);
        wait
    }
}

/// The stage's own future, with the test builds' fault hook around it.
async fn guarded<T, E, Fut>(name: String, fut: Fut) -> Result<T, String>
where
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    #[cfg(feature = "fault-injection")]
    {
        fault::around(&name, fut).await
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = name;
        fut.await.map_err(|e| e.to_string())
    }
}

/// How a stage's task ended, in words.
fn outcome<T>(r: Result<Result<T, String>, tokio::task::JoinError>) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("failed: {e}")),
        Err(e) if e.is_panic() => Err(format!("panicked: {}", panic_message(&*e.into_panic()))),
        Err(e) => Err(format!("was cancelled: {e}")),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(the panic carried no message)".to_owned()
    }
}

#[cfg(feature = "fault-injection")]
pub mod fault {
    //! Test builds only: make one named stage fail on SIGUSR2 (see the module above).

    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;
    use tokio::sync::Notify;

    /// The variable naming the stage and the fault: `WG_FAULT=queue-writer:panic`.
    pub const ENV: &str = "WG_FAULT";

    /// What happens to the stage.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        /// It panics.
        Panic,
        /// It returns an error.
        Error,
        /// It is no longer polled (hangs), its state still alive.
        Stall,
    }

    static ARMED: AtomicBool = AtomicBool::new(false);

    fn notify() -> &'static Notify {
        static N: OnceLock<Notify> = OnceLock::new();
        N.get_or_init(Notify::new)
    }

    fn configured() -> Option<&'static (String, Mode)> {
        static C: OnceLock<Option<(String, Mode)>> = OnceLock::new();
        C.get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (stage, mode) = v.rsplit_once(':')?;
            let mode = match mode {
                "panic" => Mode::Panic,
                "error" => Mode::Error,
                "stall" => Mode::Stall,
                _ => return None,
            };
            Some((stage.to_owned(), mode))
        })
        .as_ref()
    }

    /// Arm the fault on SIGUSR2 when [`ENV`] names one.
    pub fn install() -> std::io::Result<()> {
        let Some((stage, mode)) = configured() else {
            return Ok(());
        };
        use tokio::signal::unix::{signal, SignalKind};
        let mut sig = signal(SignalKind::user_defined2())?;
        log::warn!(stage = stage.as_str(), mode:? = mode; "fault injection: stage {stage} fails on SIGUSR2 ({ENV}; test builds only)");
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                ARMED.store(true, Ordering::SeqCst);
                notify().notify_waiters();
            }
        });
        Ok(())
    }

    async fn hit(stage: &str) -> Mode {
        match configured() {
            Some((s, mode)) if s == stage => loop {
                let n = notify().notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if ARMED.swap(false, Ordering::SeqCst) {
                    return *mode;
                }
                n.await;
            },
            _ => std::future::pending().await,
        }
    }

    pub(super) async fn around<T, E, Fut>(stage: &str, fut: Fut) -> Result<T, String>
    where
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        tokio::pin!(fut);
        let mode = tokio::select! {
            r = &mut fut => return r.map_err(|e| e.to_string()),
            m = hit(stage) => m,
        };
        log::warn!(stage = stage, mode:? = mode; "fault injection: stage {stage} fails now");
        match mode {
            Mode::Panic => panic!("fault injected into stage {stage} ({ENV})"),
            Mode::Error => Err(format!("fault injected into stage {stage} ({ENV})")),
            // `fut` stays alive and is never polled again: a hung stage.
            Mode::Stall => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stays_capped() {
        let mut b = Backoff::default();
        let mut base = RESTART_BACKOFF_FIRST;
        for _ in 0..12 {
            let w = b.next_wait();
            assert!(
                w >= base.mul_f64(0.75).min(RESTART_BACKOFF_MAX),
                "{w:?} < {base:?}"
            );
            assert!(
                w <= base.mul_f64(1.25).min(RESTART_BACKOFF_MAX),
                "{w:?} > {base:?}"
            );
            base = (base * 2).min(RESTART_BACKOFF_MAX);
        }
        assert_eq!(b.base, RESTART_BACKOFF_MAX);
    }

    #[test]
    fn the_stall_threshold_follows_the_watchdog() {
        assert_eq!(Supervisor::stall_threshold(None), DEFAULT_STALL);
        assert_eq!(
            Supervisor::stall_threshold(Some(Duration::from_millis(200))),
            MIN_STALL
        );
        assert_eq!(
            Supervisor::stall_threshold(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
    }

    #[tokio::test]
    async fn a_panicking_fatal_stage_is_reported_with_its_message() {
        let sup = Supervisor::new();
        let mut stage = sup.spawn_fatal("pipeline", |_beat| async {
            if true {
                panic!("index out of bounds");
            }
            Ok::<u64, std::convert::Infallible>(0)
        });
        let failure = stage.join().await.unwrap_err();
        assert_eq!(failure.stage, "pipeline");
        assert_eq!(failure.reason, "panicked: index out of bounds");
        assert_eq!(sup.fatal().await, failure);
        let s = &sup.snapshot()[0];
        assert_eq!((s.state, s.policy), (StageState::Failed, Policy::Fatal));
        assert_eq!(sup.failures(), vec![failure]);
        assert_eq!(sup.check(), vec!["pipeline".to_owned()]);
    }

    #[tokio::test]
    async fn an_early_return_is_a_failure_but_an_end_during_stop_is_not() {
        let sup = Supervisor::new();
        let mut early = sup.spawn_fatal("queue-writer", |_| async {
            Ok::<(), std::convert::Infallible>(())
        });
        let f = early.join().await.unwrap_err();
        assert_eq!(f.reason, "ended without being asked to stop");

        let sup = Supervisor::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut s = sup.spawn_fatal("pipeline", |_| async move {
            let _ = rx.await;
            Ok::<u64, std::convert::Infallible>(7)
        });
        sup.begin_stop();
        drop(tx);
        assert_eq!(s.join().await, Ok(7));
        assert_eq!(sup.snapshot()[0].state, StageState::Stopped);
        assert!(sup.fatal_failure().is_none());
    }

    #[tokio::test]
    async fn a_restartable_stage_is_restarted_and_counted() {
        let sup = Supervisor::new();
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let asked = stop.clone();
        let mut stage = sup.spawn_restarting("uplink", stop.clone(), move |_beat| {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let stop = asked.clone();
            async move {
                if n < 2 {
                    return Err(format!("broken session {n}"));
                }
                stop.cancelled().await;
                Ok(())
            }
        });
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let s = sup.snapshot()[0].clone();
        assert_eq!((s.state, s.restarts), (StageState::Running, 2));
        assert_eq!(s.last_failure.as_deref(), Some("failed: broken session 1"));
        assert!(
            sup.fatal_failure().is_none(),
            "a restartable stage never stops the gateway"
        );
        stop.cancel();
        assert_eq!(stage.join().await, Ok(()));
        assert_eq!(sup.snapshot()[0].state, StageState::Stopped);
    }

    #[tokio::test]
    async fn a_stage_that_stops_beating_is_stalled_until_it_beats_again() {
        let sup = Supervisor::new();
        let (beat_tx, mut beat_rx) = tokio::sync::mpsc::channel::<Heartbeat>(1);
        let _stage = sup.spawn_fatal("pipeline", move |beat| async move {
            let _ = beat_tx.send(beat).await;
            std::future::pending::<Result<(), std::convert::Infallible>>().await
        });
        let beat = beat_rx.recv().await.unwrap();
        beat.beat();
        assert!(sup.check().is_empty());
        sup.set_stall_after(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(sup.check(), vec!["pipeline".to_owned()]);
        let s = &sup.snapshot()[0];
        assert_eq!(s.state, StageState::Stalled);
        assert!(s
            .last_failure
            .as_deref()
            .unwrap()
            .contains("made no progress"));
        assert!(
            sup.fatal_failure().is_none(),
            "a stall is the watchdog's business"
        );
        beat.beat();
        sup.set_stall_after(Duration::from_secs(10));
        assert!(sup.check().is_empty());
        assert_eq!(sup.snapshot()[0].state, StageState::Running);
    }

    #[test]
    fn a_watched_thread_that_ended_is_fatal() {
        let sup = Supervisor::new();
        let gone = Arc::new(AtomicBool::new(false));
        let g = gone.clone();
        sup.watch_fatal("broker", move || {
            g.load(Ordering::SeqCst)
                .then(|| "its thread ended".to_owned())
        });
        assert!(sup.check().is_empty());
        gone.store(true, Ordering::SeqCst);
        assert_eq!(sup.check(), vec!["broker".to_owned()]);
        assert_eq!(sup.fatal_failure().unwrap().reason, "its thread ended");
        // Reported once.
        assert_eq!(sup.check(), vec!["broker".to_owned()]);
    }
}
