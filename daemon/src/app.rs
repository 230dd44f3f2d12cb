//! Builds every stage from a [`Config`], starts them, and stops them in pipeline order.
//!
//! Start order: internal broker → pipeline → listeners. Stop order is the flow of a reading:
//! listeners stop accepting and close their connections (no new readings enter; a connection
//! finishes the message it is handling), then the pipeline stage ends with the last of them and
//! the queue writer commits what it has, all under `gateway.shutdown_timeout`.
//!
//! Every long-running stage runs under the gateway's [`Supervisor`] (per-stage policies and why
//! in [`crate::supervisor`]). Everything that can fail on bad files fails in [`Gateway::start`],
//! before READY=1: the listener's TLS material, the queue, the uplink's TLS material.
//!
//! Stages come in two shapes, and each is started the same way:
//! - a **service** serves an entrance until the last entrance is gone: its module has
//!   `fn …(what it needs, beat) -> (Entrance, impl Future<Output = ()>)`, started with
//!   [`Supervisor::spawn_service`] (the queue writer, the dead-letter writer, the shadow service,
//!   the webhook outbox). Stopping one is dropping its entrances, in the order readings flow:
//!   listeners → pipeline → writers and services.
//! - a **run-until-told** stage loops until a cancellation token fires: `fn run(self, stop,
//!   beat)`, started with [`Supervisor::spawn_restarting`] (the uplink, the plugin watcher, the
//!   status writer) or, for the listeners and the pipeline, [`Supervisor::spawn_fatal`].
//!
//! The configuration of a stage is its section of [`Config`], checked by
//! [`crate::config::validate`] before anything starts.
//!
//! [`run_daemon`] adds the service around it: systemd notifications (READY=1 once listeners are
//! up, RELOADING=1/READY=1 around SIGHUP, STOPPING=1, WATCHDOG=1 when `WATCHDOG_USEC` is set,
//! and only while every stage makes progress) and signal handling (SIGTERM/SIGINT stop, SIGHUP
//! reloads the device registry, the rules, the TLS material and the log level, SIGUSR1 makes
//! the defender take operators' requests). A fatal stage that ends stops the gateway and
//! makes the daemon exit non-zero, so systemd's `Restart=on-failure` starts it again.

use crate::broker::{self, BrokerHandle};
use crate::config::{self, Config, LoadOptions};
use crate::gatekeeper::{Gatekeeper, ListenerLimits, Shared, TlsState, Transport};
use crate::metering::Metering;
use crate::pipeline::{dead_letter, DeadLetters, LocalPublisher, Pipeline, PipelineStats, Stages};
use crate::plugin_host::PluginHost;
use crate::registry::{Registry, SharedRegistry};
use crate::status::{self, ListenerStatus, Status};
use crate::supervisor::{Heartbeat, Stage, StageFailure, Supervisor};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    shutdown: CancellationToken,
    listeners: Vec<(&'static str, SocketAddr)>,
    listener_tasks: Vec<Stage<()>>,
    pipeline: Stage<u64>,
    stats: PipelineStats,
    registry: SharedRegistry,
    login: crate::gatekeeper::login::LoginGate,
    broker: BrokerHandle,
    metering: Metering,
    tls: Option<Arc<TlsState>>,
    status: Option<Stage<()>>,
    view: Arc<StatusView>,
    plugins: Arc<PluginHost>,
    plugin_watch: Stage<()>,
    queue_writer: Option<Stage<()>>,
    /// Writes dead letters; ends after the pipeline (its only sender) is gone.
    dead_letter_writer: Stage<()>,
    /// Answers device shadow requests; ends after the pipeline (its only sender) is gone.
    shadows: Stage<()>,
    /// Delivers the rules' webhooks (when a rule has an `http` action); ends after the rules.
    webhooks: Option<Stage<()>>,
    /// Writes the ward history (when `[history]` is enabled); ends after its recorders (the
    /// pipeline, the rules, the defender) are gone.
    history: Option<Stage<()>>,
    shadow_stats: Arc<crate::shadow::ShadowStats>,
    rule_counters: crate::rules::CountersView,
    /// The edge rules (replaced on reload). Dropped first on stop: they hold entrances of the
    /// queue writer and the webhook outbox, which end once every entrance is gone.
    rules: Option<Arc<crate::rules::Rules>>,
    /// The queue's entrance for producers other than the pipeline (dropped first on stop, so
    /// the writer can finish).
    outbox: Option<crate::queue::Enqueue>,
    uplink: Option<Stage<()>>,
    uplink_stop: CancellationToken,
    /// The defender stage (when `[defender]` is enabled); holds entrances of the queue writer
    /// and the rules, so it is stopped once the pipeline has ended and before the writers.
    defender: Option<Stage<()>>,
    defender_stop: CancellationToken,
    uplink_stats: Arc<crate::uplink::UplinkStats>,
    supervisor: Supervisor,
    monitor: JoinHandle<()>,
    /// With no listener enabled, this keeps the pipeline's entrance open until the stop (the
    /// pipeline ends when its last sender is gone, which would otherwise be at once).
    spare_ingest: Option<crate::pipeline::IngestSender>,
    /// Keeps the dead-letter writer's entrance open until the stop, so a pipeline that dies
    /// does not make the writer end too and be reported as a second failure.
    spare_dead_letters: Option<dead_letter::DeadLetterSender>,
    /// What a reload reaches besides the above.
    live: Live,
    /// `/healthz` and `/metrics` (when `[http]` is enabled); stopped last, so it answers 503
    /// while the gateway drains.
    http: Option<Stage<()>>,
    http_stop: CancellationToken,
}

/// The parts of a running gateway a reload changes (see [`Gateway::reload`]).
#[derive(Debug)]
struct Live {
    limits: crate::gatekeeper::SharedLimits,
    /// Holds entrances of the queue writer and the rules: dropped at the start of the stop.
    defender: Option<Arc<crate::defender::Defender>>,
    uplink: Option<tokio::sync::watch::Sender<crate::uplink::Reconfigured>>,
}

/// What the status writer needs, detached from the [`Gateway`].
#[derive(Debug)]
struct StatusView {
    plugins: Arc<PluginHost>,
    login: crate::gatekeeper::login::LoginGate,
    queue: Option<crate::queue::SharedQueue>,
    dead_letters: Arc<dead_letter::DeadLetterCounters>,
    uplink: Arc<crate::uplink::UplinkStats>,
    endpoint: String,
    gateway_id: String,
    started_at: std::time::SystemTime,
    listeners: Vec<(&'static str, SocketAddr)>,
    stats: PipelineStats,
    metering: Metering,
    state_dir: std::path::PathBuf,
    supervisor: Supervisor,
    shadows: Arc<crate::shadow::ShadowStats>,
    rules: crate::rules::CountersView,
    webhooks: Option<Arc<crate::rules::webhook::WebhookStats>>,
    defender: Option<crate::defender::StatusHandle>,
    http: Option<SocketAddr>,
    /// Whether the HTTP endpoint serves HTTPS.
    http_tls: bool,
    history: Option<Arc<crate::history::HistoryCounters>>,
}

impl crate::http::Source for StatusView {
    fn status(&self) -> Status {
        self.snapshot(true)
    }

    fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }
}

impl StatusView {
    fn snapshot(&self, running: bool) -> Status {
        Status {
            gateway_id: self.gateway_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at: humantime::format_rfc3339_seconds(self.started_at).to_string(),
            updated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            running,
            listeners: self
                .listeners
                .iter()
                .map(|(n, a)| ListenerStatus {
                    name: (*n).into(),
                    address: a.to_string(),
                })
                .collect(),
            readings: self.stats.total_messages(),
            gateway: self.metering.gateway().snapshot(),
            login: self.login.counters().snapshot(),
            devices: self.metering.snapshot(),
            plugins: self.plugins.status(),
            queue: self.queue.as_ref().map(|q| q.status()),
            dead_letter: self.dead_letters.status(),
            uplink: self.queue.as_ref().map(|_| {
                use std::sync::atomic::Ordering::Relaxed;
                status::UplinkStatus {
                    endpoint: self.endpoint.clone(),
                    connected: self.uplink.connected.load(Relaxed),
                    batches_acked: self.uplink.batches_acked.load(Relaxed),
                    records_delivered: self.uplink.records_delivered.load(Relaxed),
                    delivered_by_stream: {
                        use crate::queue::Stream;
                        Stream::ALL
                            .into_iter()
                            .map(|s| (s.name().to_owned(), self.uplink.delivered(s)))
                            .collect()
                    },
                    connection_errors: self.uplink.connection_errors.load(Relaxed),
                    connects: self.uplink.connects.load(Relaxed),
                    publishes: self.uplink.publishes.load(Relaxed),
                    publish_bytes: self.uplink.publish_bytes.load(Relaxed),
                }
            }),
            pipeline: self
                .stats
                .snapshot()
                .into_iter()
                .map(|(id, c)| status::PipelineDevice {
                    device_id: id.to_string(),
                    messages: c.messages,
                    readings: c.readings,
                    dead_letters: c.dead_letters,
                })
                .collect(),
            stages: self.supervisor.snapshot(),
            shadows: self.shadows.snapshot(),
            rules: self.rules.counts(),
            webhooks: self
                .webhooks
                .as_ref()
                .map(|w| w.snapshot())
                .unwrap_or_default(),
            defender: self.defender.as_ref().map(|d| d.snapshot()),
            http: self.http.map(|a| a.to_string()),
            http_tls: self.http_tls,
            history: self.history.as_ref().map(|h| h.status()),
        }
    }
}

/// How a stop went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// Everything accepted was drained before the deadline, by a pipeline and a queue writer
    /// that ended normally (false when either failed: what it held was not handled).
    pub drained: bool,
    /// Readings the pipeline handled over the gateway's life.
    pub readings: u64,
    /// Time the stop took.
    pub took: Duration,
    /// The deadline passed before the pipeline and the queue writer ended.
    pub deadline_reached: bool,
    /// Stages that ended unexpectedly (before or during the stop) and were not restarted.
    pub failed: Vec<StageFailure>,
}

impl Gateway {
    /// Start every stage. Listeners are accepting when this returns.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        // One crypto provider for every TLS use in the process, installed explicitly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let state_dir = config.gateway.state_dir.clone();
        std::fs::create_dir_all(&state_dir).with_context(|| {
            format!(
                "creating the state directory {} (gateway.state_dir)",
                state_dir.display()
            )
        })?;
        let tls = if config.listeners.tls.enabled {
            Some(Arc::new(
                TlsState::new(&config.listeners.tls).context("loading the TLS listener's files")?,
            ))
        } else {
            None
        };
        // The uplink's files are read now, not after READY=1: a broken one stops the start.
        let upstream_tls = if config.upstream.enabled {
            Some(
                crate::uplink::load_tls(&config.upstream)
                    .context("loading the upstream's TLS files")?,
            )
        } else {
            None
        };
        // Bound first: a busy port stops the start before anything else runs.
        let http = if config.http.enabled {
            Some(crate::http::Endpoint::bind(config).await?)
        } else {
            None
        };
        let supervisor = Supervisor::new();
        let broker = broker::start(&config.broker, &config.limits)
            .await
            .context("starting the internal broker")?;
        {
            let b = broker.clone();
            supervisor.watch_fatal("broker", move || {
                b.ended().map(|why| format!("thread {why}"))
            });
        }
        let registry = SharedRegistry::new(Registry::from_config(&config.devices, &config.policy));
        let metering = Metering::new(config.metering.window, config.metering.windows_kept);
        let plugins = PluginHost::new(&config.plugins, Some(&state_dir))?;
        plugins.scan();
        let uplink_stats = Arc::new(crate::uplink::UplinkStats::default());
        let uplink_stop = CancellationToken::new();
        let shutdown = CancellationToken::new();
        // A start that fails half-way stops what it started, without reporting those ends.
        let mut abandon = AbandonOnError(Some((
            supervisor.clone(),
            [shutdown.clone(), uplink_stop.clone()],
        )));
        let mut shared_queue = None;
        let mut uplink_reload = None;
        let mut shadow_link = None;
        let mut outbox = None;
        let (queue, queue_writer, uplink) = if let Some(tls) = upstream_tls {
            let (store, report) =
                open_sled(|| crate::queue::SledStore::open(&state_dir.join("queue"), 4 << 20))
                    .await
                    .with_context(|| {
                        format!("opening the queue in {}", state_dir.join("queue").display())
                    })?;
            if report.corrupt > 0 {
                log::error!(corrupt = report.corrupt, intact = report.records; "queue: damaged records found on open and set aside; the intact ones will be delivered");
            }
            log::info!(queued = report.records; "queue opened");
            let shared = crate::queue::SharedQueue::new(store);
            shared_queue = Some(shared.clone());
            let q = &config.queue;
            let (commit_interval, max_bytes, max_age) = (q.commit_interval, q.max_bytes, q.max_age);
            let (writer, enqueue) = supervisor.spawn_service("queue-writer", |beat| {
                crate::queue::writer(shared.clone(), commit_interval, max_bytes, max_age, beat)
            });
            let syncable = crate::uplink::topics::CloudShadowTopics::of(
                &config.upstream.topics.shadow,
                &config.gateway.id,
            )
            .is_some();
            let cloud_link = if !config.upstream.sync_shadows {
                None
            } else if syncable {
                let (cloud, local) = crate::shadow::sync::link(
                    enqueue.clone(),
                    crate::shadow::sync::Pace::of(config.upstream.shadow_updates_per_second),
                    config.upstream.sync_readings,
                );
                shadow_link = Some(local);
                Some(cloud)
            } else {
                log::info!(topic:% = config.upstream.topics.shadow; "upstream.topics.shadow is not an IoT Core shadow update topic naming the device: shadow updates go upstream as queued, and desired changes made in the cloud are not followed");
                None
            };
            let (reconfigure, reload) =
                tokio::sync::watch::channel(Arc::new((config.upstream.clone(), tls.clone())));
            uplink_reload = Some(reconfigure);
            let stage = crate::uplink::Uplink {
                reload: Some(reload),
                cfg: config.upstream.clone(),
                gateway_id: config.gateway.id.clone(),
                tls,
                queue: shared,
                stats: uplink_stats.clone(),
                sync: cloud_link,
            };
            let stop = uplink_stop.clone();
            let uplink = supervisor.spawn_restarting("uplink", uplink_stop.clone(), move |beat| {
                let run = stage.clone().run(stop.clone(), beat);
                async move {
                    run.await;
                    Ok::<_, std::convert::Infallible>(())
                }
            });
            outbox = Some(enqueue.clone());
            (Some(enqueue), Some(writer), Some(uplink))
        } else {
            (None, None, None)
        };
        let local = Arc::new(LocalPublisher::new(&broker));
        supervisor.watch_fatal("local-publisher", local.ended_probe());
        let shadow_dir = state_dir.join("shadows");
        let shadow_store = open_sled(|| crate::shadow::Store::open(&shadow_dir))
            .await
            .with_context(|| format!("opening the shadow store in {}", shadow_dir.display()))?;
        // The webhook outbox exists only when a rule has an `http` action.
        let (webhook_stage, webhooks) = if crate::rules::wants_webhooks(&config.rules) {
            let dir = state_dir.join("webhooks");
            let outbox = open_sled(|| crate::rules::webhook::Outbox::open(&dir))
                .await
                .with_context(|| format!("opening the webhook outbox in {}", dir.display()))?;
            let (stage, webhooks) = supervisor.spawn_service("webhooks", |beat| {
                crate::rules::webhook::service(outbox, beat)
            });
            (Some(stage), Some(webhooks))
        } else {
            (None, None)
        };
        let webhook_stats = webhooks.as_ref().map(|w| w.stats().clone());
        let history_counters = Arc::new(crate::history::HistoryCounters::default());
        let (history_stage, history) = if config.history.enabled {
            let dir = state_dir.join("history");
            let bounds = config.history.bounds();
            let store = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || crate::history::store::Store::open(&dir, bounds)
            })
            .await?
            .with_context(|| format!("opening the ward history in {}", dir.display()))?;
            let (recorder, make) =
                crate::history::channel(store, history_counters.clone(), Some(registry.clone()));
            let (stage, recorder) = supervisor.spawn_service("history", move |beat| {
                (recorder, crate::history::run(make(beat)))
            });
            (Some(stage), Some(recorder))
        } else {
            (None, None)
        };
        let rules = Arc::new(crate::rules::Rules::new(
            &config.rules,
            crate::rules::Sinks {
                local: Some(local.clone()),
                queue: queue.clone(),
                webhooks,
                history: history.clone(),
            },
        ));
        let rule_counters = rules.counters();
        let (shadow_stage, shadows) = supervisor.spawn_service("shadows", |beat| {
            crate::shadow::service(
                shadow_store,
                local.clone(),
                rules.clone(),
                shadow_link,
                beat,
            )
        });
        let (dead_letter_writer, dead_letters) = {
            let (store, bound) = (DeadLetters::new(&state_dir), config.dead_letter.clone());
            supervisor.spawn_service("dead-letter-writer", |beat| {
                dead_letter::writer(store, bound, beat)
            })
        };
        let dead_letter_counters = dead_letters.counters().clone();
        let spare_dead_letters = Some(dead_letters.clone());
        let shadow_stats = shadows.stats();
        let sessions = crate::gatekeeper::Sessions::default();
        let quarantine = crate::defender::quarantine::Quarantine::default();
        let defender_stop = CancellationToken::new();
        let mut defender_handle = None;
        let (defender, defender_stage, defender_status) = if config.defender.enabled {
            let dir = state_dir.join("defender");
            let store = open_sled(|| crate::defender::Store::open(&dir))
                .await
                .with_context(|| format!("opening the defender's store in {}", dir.display()))?;
            let (defender, status) = crate::defender::Defender::new(crate::defender::Parts {
                gateway_id: config.gateway.id.clone(),
                config: config.defender.clone(),
                window: config.metering.window,
                windows_kept: config.metering.windows_kept,
                state_dir: state_dir.clone(),
                store,
                local: local.clone(),
                queue: queue.clone(),
                rules: rules.clone(),
                registry: registry.clone(),
                metering: metering.clone(),
                sessions: sessions.clone(),
                quarantine: quarantine.clone(),
                queue_status: shared_queue.clone(),
                dead_letters: dead_letter_counters.clone(),
                plugins: plugins.clone(),
                history: history.clone(),
            });
            defender_handle = Some(defender.clone());
            let (d, st, stop) = (defender.clone(), status.clone(), defender_stop.clone());
            let stage =
                supervisor.spawn_restarting("defender", defender_stop.clone(), move |beat| {
                    d.clone().run(st.clone(), stop.clone(), beat)
                });
            (Some(defender), Some(stage), Some(status))
        } else {
            (None, None, None)
        };
        let (pipeline, ingest) = Pipeline::new(Stages {
            gateway_id: config.gateway.id.clone(),
            plugins: plugins.clone(),
            dead_letters,
            local: Some(local),
            shadows: Some(shadows),
            defender,
            rules: rules.clone(),
            queue,
            history: history.clone(),
        });
        let stats = pipeline.stats();
        let login = crate::gatekeeper::login::LoginGate::new(&config.login)
            .context("starting the password-check threads")?;
        let limits = crate::gatekeeper::SharedLimits::from(config.limits.clone());
        let shared = Shared {
            registry: registry.clone(),
            login: login.clone(),
            broker: broker.clone(),
            ingest,
            metering: metering.clone(),
            limits: limits.clone(),
            sessions,
            quarantine,
        };
        let accept_limits = ListenerLimits {
            connect_timeout: config.listeners.connect_timeout,
            max_connections: config.listeners.max_connections,
            max_connections_per_address: config.listeners.max_connections_per_address,
        };
        let mut wanted = Vec::new();
        if config.listeners.plain.enabled {
            wanted.push((
                "plain",
                config.listeners.plain.address,
                Transport::Plain,
                "listeners.plain.address",
            ));
        }
        if let Some(tls) = &tls {
            wanted.push((
                "tls",
                config.listeners.tls.address,
                Transport::Tls(tls.clone()),
                "listeners.tls.address",
            ));
        }
        let mut listeners = Vec::new();
        let mut listener_tasks = Vec::new();
        for (name, addr, transport, key) in wanted {
            let gk = Gatekeeper::bind(name, addr, transport, accept_limits.clone(), shared.clone())
                .await
                .with_context(|| format!("binding the {name} listener on {addr} ({key})"))?;
            listeners.push((name, gk.local_addr()?));
            let stop = shutdown.clone();
            listener_tasks.push(supervisor.spawn_fatal(
                &format!("listener-{name}"),
                move |beat| async move {
                    gk.with_heartbeat(beat).run(stop).await;
                    Ok::<_, std::convert::Infallible>(())
                },
            ));
        }
        let spare_ingest = listeners.is_empty().then(|| shared.ingest.clone());
        if listeners.is_empty() {
            log::warn!("no device listener is enabled: devices cannot connect");
        }
        // Only the listeners (or the spare) hold senders now: the pipeline ends when they are
        // gone.
        drop(shared);
        let pipeline = supervisor.spawn_fatal("pipeline", move |beat| async move {
            Ok::<_, std::convert::Infallible>(pipeline.with_heartbeat(beat).run().await)
        });
        let plugin_watch = {
            let (plugins, stop) = (plugins.clone(), shutdown.clone());
            supervisor.spawn_restarting("plugin-watch", shutdown.clone(), move |beat| {
                let run = plugins.clone().watch(stop.clone(), beat);
                async move {
                    run.await;
                    Ok::<_, std::convert::Infallible>(())
                }
            })
        };
        let live = Live {
            limits,
            defender: defender_handle,
            uplink: uplink_reload,
        };
        let view = Arc::new(StatusView {
            plugins: plugins.clone(),
            login: login.clone(),
            queue: shared_queue,
            dead_letters: dead_letter_counters,
            uplink: uplink_stats.clone(),
            endpoint: config.upstream.endpoint.clone(),
            gateway_id: config.gateway.id.clone(),
            started_at: std::time::SystemTime::now(),
            listeners: listeners.clone(),
            stats: stats.clone(),
            metering: metering.clone(),
            state_dir,
            supervisor: supervisor.clone(),
            shadows: shadow_stats.clone(),
            rules: rule_counters.clone(),
            webhooks: webhook_stats,
            defender: defender_status,
            http: http.as_ref().map(|h| h.local_addr()),
            http_tls: http.as_ref().is_some_and(|h| h.is_tls()),
            history: history.as_ref().map(|_| history_counters.clone()),
        });
        let http_stop = CancellationToken::new();
        let http = http.map(|endpoint| {
            let source: Arc<dyn crate::http::Source> = view.clone();
            let stop = http_stop.clone();
            supervisor.spawn_restarting("http", http_stop.clone(), move |beat| {
                endpoint.clone().serve(source.clone(), stop.clone(), beat)
            })
        });
        let mut gw = Self {
            shutdown,
            listeners,
            listener_tasks,
            pipeline,
            stats,
            registry,
            login: login.clone(),
            broker,
            metering,
            tls,
            status: None,
            view,
            plugins,
            plugin_watch,
            queue_writer,
            dead_letter_writer,
            shadows: shadow_stage,
            webhooks: webhook_stage,
            history: history_stage,
            shadow_stats,
            rule_counters,
            rules: Some(rules.clone()),
            outbox,
            uplink,
            uplink_stop,
            uplink_stats,
            defender: defender_stage,
            defender_stop,
            monitor: supervisor.spawn_monitor(),
            supervisor,
            spare_ingest,
            spare_dead_letters,
            live,
            http,
            http_stop,
        };
        gw.status = Some(gw.spawn_status_writer(config.metering.status_interval));
        abandon.0 = None;
        Ok(gw)
    }

    fn spawn_status_writer(&self, every: Duration) -> Stage<()> {
        let (view, stop) = (self.view.clone(), self.shutdown.clone());
        self.supervisor
            .spawn_restarting("status", self.shutdown.clone(), move |beat| {
                status_writer(view.clone(), every, stop.clone(), beat)
            })
    }

    /// The supervisor of this gateway's stages.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The queue at a glance (`None` when the upstream is disabled). Blocking for a moment.
    pub fn queue_status(&self) -> Option<crate::queue::QueueStatus> {
        self.view.queue.as_ref().map(|q| q.status())
    }

    /// Where producers queue records for the upstream (alerts, shadow updates, defender
    /// reports; readings come through the pipeline). `None` when the upstream is disabled.
    /// A record is durable once the `Ack` handed with it is confirmed.
    pub fn outbox(&self) -> Option<&crate::queue::Enqueue> {
        self.outbox.as_ref()
    }

    /// Uplink counters.
    pub fn uplink(&self) -> &Arc<crate::uplink::UplinkStats> {
        &self.uplink_stats
    }

    /// The plugin host.
    pub fn plugins(&self) -> &Arc<PluginHost> {
        &self.plugins
    }

    /// Per-device meters.
    pub fn metering(&self) -> &Metering {
        &self.metering
    }

    /// Re-read the TLS listener's certificate, key, CA bundle and CRL. Connected devices keep
    /// their sessions; new handshakes use the new material. On error the old material stays.
    pub fn reload_tls(
        &self,
        cfg: &config::TlsListenerConfig,
    ) -> Result<bool, crate::gatekeeper::tls::TlsError> {
        match &self.tls {
            Some(t) => t.reload(cfg).map(|()| true),
            None => Ok(false),
        }
    }

    /// Address of the listener called `name` (`"plain"`).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
    }

    /// Every listener with its bound address.
    pub fn listeners(&self) -> &[(&'static str, SocketAddr)] {
        &self.listeners
    }

    /// Where `/healthz` and `/metrics` are served, when `[http]` is enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.view.http
    }

    /// The internal broker's address (loopback).
    pub fn broker_addr(&self) -> SocketAddr {
        self.broker.addr()
    }

    /// What `wardgate status` would show now.
    pub fn status_snapshot(&self) -> status::Status {
        self.view.snapshot(true)
    }

    /// Every rule's counters, in configuration order.
    pub fn rule_counts(&self) -> Vec<crate::rules::RuleCounts> {
        self.rule_counters.counts()
    }

    /// Shadow service counters.
    pub fn shadow_stats(&self) -> crate::shadow::ShadowCounts {
        self.shadow_stats.snapshot()
    }

    /// Pipeline counters.
    pub fn stats(&self) -> PipelineStats {
        self.stats.clone()
    }

    /// The live device registry.
    pub fn registry(&self) -> &SharedRegistry {
        &self.registry
    }

    /// The login gate (password-check bounds, pool and credential cache).
    pub fn login(&self) -> &crate::gatekeeper::login::LoginGate {
        &self.login
    }

    /// Stop accepting, close device connections, drain the pipeline; give up after `deadline`.
    pub async fn stop(mut self, deadline: Duration) -> StopReport {
        let started = Instant::now();
        self.supervisor.begin_stop();
        self.shutdown.cancel();
        let stats = self.stats.clone();
        let tasks = std::mem::take(&mut self.listener_tasks);
        let pipeline = &mut self.pipeline;
        let writer = self.queue_writer.take();
        let dead_letter_writer = &mut self.dead_letter_writer;
        let shadows = &mut self.shadows;
        let webhooks = &mut self.webhooks;
        let history = &mut self.history;
        let defender = self.defender.take();
        let defender_stop = self.defender_stop.clone();
        self.outbox = None;
        self.rules = None;
        self.spare_ingest = None;
        self.spare_dead_letters = None;
        self.live.defender = None;
        let drain = async {
            for mut t in tasks {
                let _ = t.join().await;
            }
            let handled = pipeline.join().await;
            // No device report can arrive now: the defender lets go of the queue and the rules.
            defender_stop.cancel();
            if let Some(mut d) = defender {
                let _ = d.join().await;
            }
            // The pipeline's queue and dead-letter handles are gone with it: the writers
            // commit what they have.
            let mut written = match writer {
                Some(mut w) => w.join().await.is_ok(),
                None => true,
            };
            written &= dead_letter_writer.join().await.is_ok();
            written &= shadows.join().await.is_ok();
            // Ends once the rules (held by the pipeline and the shadow service) are gone.
            if let Some(w) = webhooks {
                written &= w.join().await.is_ok();
            }
            // Ends once its recorders (pipeline, rules, defender) are gone.
            if let Some(h) = history {
                written &= h.join().await.is_ok();
            }
            (handled, written)
        };
        let result = tokio::time::timeout(deadline, drain).await;
        // Readings still queued stay on disk for the next start.
        self.uplink_stop.cancel();
        let side = Duration::from_secs(2);
        for stage in [self.uplink.take(), self.status.take()]
            .into_iter()
            .flatten()
            .chain([self.plugin_watch])
        {
            let mut stage = stage;
            let _ = tokio::time::timeout(side, stage.join()).await;
        }
        self.http_stop.cancel();
        if let Some(mut h) = self.http.take() {
            let _ = tokio::time::timeout(side, h.join()).await;
        }
        self.monitor.abort();
        let failed = self.supervisor.failures();
        // The last word in the status file: final counters and stages, not running.
        if let Err(e) = status::write(&self.view.state_dir, &self.view.snapshot(false)) {
            log::warn!(error:% = e; "cannot write the final status file");
        }
        match result {
            Ok((Ok(readings), written)) => StopReport {
                drained: written,
                readings,
                took: started.elapsed(),
                deadline_reached: false,
                failed,
            },
            Ok((Err(_), _)) => StopReport {
                drained: false,
                readings: stats.total_messages(),
                took: started.elapsed(),
                deadline_reached: false,
                failed,
            },
            Err(_) => StopReport {
                drained: false,
                readings: stats.total_messages(),
                took: started.elapsed(),
                deadline_reached: true,
                failed,
            },
        }
    }
}

/// Dropped with `Some` (a start that failed): stop the stages started so far, as expected ends.
struct AbandonOnError(Option<(Supervisor, [CancellationToken; 2])>);

impl Drop for AbandonOnError {
    fn drop(&mut self) {
        if let Some((supervisor, tokens)) = self.0.take() {
            supervisor.begin_stop();
            for t in tokens {
                t.cancel();
            }
        }
    }
}

/// The status writer stage: the status file every `every`, until `stop`.
async fn status_writer(
    view: Arc<StatusView>,
    every: Duration,
    stop: CancellationToken,
    beat: Heartbeat,
) -> Result<(), std::convert::Infallible> {
    let mut tick = tokio::time::interval(every);
    let mut idle = Heartbeat::ticker();
    let mut warned = false;
    loop {
        beat.beat();
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = idle.tick() => continue,
            _ = tick.tick() => {}
        }
        let v = view.clone();
        let r = tokio::task::spawn_blocking(move || status::write(&v.state_dir, &v.snapshot(true)))
            .await;
        match r {
            Ok(Err(e)) if !warned => {
                warned = true;
                log::warn!(error:% = e, state_dir:% = view.state_dir.display(); "cannot write the status file");
            }
            Ok(Ok(())) => warned = false,
            Ok(Err(_)) => {}
            // A panic while writing is this stage's panic: the supervisor restarts it.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!(error:% = e; "cannot notify the service manager");
    }
}

/// Run as the service: start, notify, serve until SIGTERM/SIGINT, stop.
pub async fn run_daemon(opts: LoadOptions, config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // SIGUSR1 asks the defender to take operators' requests (`wardgate quarantine clear`).
    // Listening here too means it never terminates the daemon, whether or not the defender
    // runs (tokio keeps the handler installed for the process).
    let _sigusr1 = signal(SignalKind::user_defined1())?;

    log::info!(
        gateway_id:% = config.gateway.id, devices = config.devices.len(),
        version = env!("CARGO_PKG_VERSION");
        "wardgate starting"
    );
    #[cfg(feature = "fault-injection")]
    crate::supervisor::fault::install()?;
    let gw = Gateway::start(&config).await?;
    let watchdog_every = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    gw.supervisor()
        .set_stall_after(Supervisor::stall_threshold(watchdog_every));
    let pid_file = config.gateway.state_dir.join(status::PID_FILE);
    if let Err(e) = std::fs::write(&pid_file, format!("{}\n", std::process::id())) {
        log::warn!(error:% = e, path:% = pid_file.display(); "cannot write the PID file; `wardgate reload` will not find this process");
    }
    let listening = gw
        .listeners()
        .iter()
        .map(|(n, a)| format!("{n}={a}"))
        .collect::<Vec<_>>()
        .join(" ");
    let http = gw
        .http_addr()
        .map(|a| format!("; http={a}"))
        .unwrap_or_default();
    let status = format!(
        "listening {listening}; {} devices registered{http}",
        config.devices.len()
    );
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    match gw.http_addr() {
        Some(a) => {
            let scheme = if gw.view.http_tls { "https" } else { "http" };
            log::info!(listeners:% = listening, http:% = a; "wardgate ready; /healthz and /metrics on {scheme}://{a}")
        }
        None => log::info!(listeners:% = listening; "wardgate ready"),
    }

    // Start-up's code and read-only data leave the resident set now, cheaply, and the heap's
    // free pages go back (see `footprint`).
    let r = crate::footprint::release_at_ready();
    log::debug!(
        code_bytes = r.code_bytes, data_bytes = r.data_bytes, heap_trimmed = r.heap_trimmed;
        "memory: start-up code and data pages dropped from the resident set"
    );
    let watchdog = watchdog_every.map(|every| start_watchdog(every, gw.supervisor().clone()));
    // What reloads compare with: the configuration in force, recorded for `check-config`.
    let mut running = config.clone();
    let mut generation = 0u64;
    if let Err(e) = crate::reload::write_running(&config.gateway.state_dir, &running) {
        log::warn!(error:% = e; "cannot record the running configuration; `wardgate check-config` cannot compare with it");
    }
    // Start-up memory is given back once the gateway has been quiet for a while (see
    // `footprint`): never under load, where paging code back in would delay readings.
    let mut quiet = Quiet::new(gw.stats().total_messages());
    let mut quiet_tick = tokio::time::interval(Duration::from_secs(1));
    let failure = loop {
        tokio::select! {
            _ = sigterm.recv() => { log::info!(signal = "SIGTERM"; "stopping"); break None; }
            _ = sigint.recv() => { log::info!(signal = "SIGINT"; "stopping"); break None; }
            _ = sighup.recv() => {
                generation += 1;
                reload(&opts, &config, &mut running, &gw, generation);
                quiet.pending = Some("reload");
            }
            _ = quiet_tick.tick(), if quiet.pending.is_some() => {
                if let Some(after) = quiet.observe(gw.stats().total_messages()) {
                    release_startup_memory(after);
                }
            }
            f = gw.supervisor().fatal() => break Some(f),
        }
    };
    let stopping = match &failure {
        Some(f) => format!("stopping: {f}"),
        None => "stopping: draining readings".to_owned(),
    };
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status(&stopping),
    ]);
    if let Some(w) = watchdog {
        w.abort();
    }
    let deadline = running.gateway.shutdown_timeout;
    let report = gw.stop(deadline).await;
    let _ = std::fs::remove_file(&pid_file);
    let failed = report
        .failed
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if report.deadline_reached {
        log::error!(
            readings = report.readings, deadline_ms = deadline.as_millis() as u64;
            "shutdown deadline (gateway.shutdown_timeout) reached before the pipeline drained; \
             readings still in flight were not handled"
        );
    }
    if let Some(f) = failure {
        log::error!(
            stage = f.stage, reason:% = f.reason, readings = report.readings,
            drained = report.drained, failed:% = failed, took_ms = report.took.as_millis() as u64;
            "wardgate stopped because {f}"
        );
        anyhow::bail!("{f}; stopped so that the service manager restarts wardgate")
    }
    if !report.failed.is_empty() {
        anyhow::bail!("stages failed while stopping: {failed}")
    }
    if report.drained {
        log::info!(
            readings = report.readings, took_ms = report.took.as_millis() as u64;
            "wardgate stopped"
        );
        Ok(())
    } else {
        anyhow::bail!("shutdown deadline of {deadline:?} reached")
    }
}

/// SIGHUP: lift plugin containment of devices; re-read the configuration and apply it
/// ([`Gateway::reload`]); record the outcome for `wardgate reload`.
fn reload(
    opts: &LoadOptions,
    started: &Config,
    running: &mut Config,
    gw: &Gateway,
    generation: u64,
) -> crate::reload::Outcome {
    let monotonic = sd_notify::NotifyState::monotonic_usec_now().ok();
    let mut states = vec![sd_notify::NotifyState::Reloading];
    states.extend(monotonic);
    notify(&states);
    gw.plugins().clear_containment();
    let mut outcome = match config::load(opts) {
        Ok(loaded) => {
            let files = loaded
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let o = gw.reload(started, running, &loaded.config);
            if o.is_applied() {
                *running = loaded.config;
                if let Err(e) = crate::reload::write_running(&running.gateway.state_dir, running) {
                    log::warn!(error:% = e; "cannot record the running configuration; `wardgate check-config` cannot compare with it");
                }
                log::info!(
                    files:% = files, devices = running.devices.len(), rules = running.rules.len(),
                    applied:? = o.applied, needs_restart:? = o.needs_restart;
                    "configuration reloaded from {files}: {}", o.summary
                );
            }
            o
        }
        Err(errors) => {
            let problems: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
            for e in &errors.0 {
                log::error!(problem:% = e, key:? = e.key; "configuration reload rejected: {e}");
            }
            crate::reload::Outcome::rejected(problems)
        }
    };
    outcome.generation = generation;
    outcome.pid = std::process::id();
    outcome.at = crate::clock::rfc3339_ms(crate::clock::now_ms());
    if let Err(e) = crate::reload::write_outcome(&running.gateway.state_dir, &outcome) {
        log::warn!(error:% = e; "cannot record the reload's outcome for `wardgate reload`");
    }
    if !outcome.is_applied() {
        log::error!(problems:? = outcome.problems; "configuration reload rejected; the running configuration stays in force");
    }
    notify(&[sd_notify::NotifyState::Ready]);
    outcome
}

impl Gateway {
    /// Apply `new` to the running gateway, which started with `started` and last applied
    /// `previous`. All or nothing: the new TLS files are loaded first, and a problem with them
    /// rejects the whole reload. Then, live: the device registry and policies (connected
    /// devices take their new policy; a device removed, with new credentials, or holding a
    /// subscription its policy no longer allows is disconnected), the limits, the plugins'
    /// call deadline and trap count, the rules, the security profiles, the queue's and the
    /// dead-letter store's bounds, the upstream settings and TLS material (the uplink
    /// reconnects with them), the listener's TLS material, the log level. Keys that need a
    /// restart ([`crate::reload::classify`]) keep their running values and are named.
    pub fn reload(
        &self,
        started: &Config,
        previous: &Config,
        new: &Config,
    ) -> crate::reload::Outcome {
        use crate::reload::{changed_keys, classify, describe_restart, Outcome};
        // Everything that can still fail, before anything changes.
        let listener_tls = match (&self.tls, new.listeners.tls.enabled) {
            (Some(_), true) => match crate::gatekeeper::tls::load(&new.listeners.tls) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::error!(
                        error:% = e;
                        "TLS reload rejected, the previous certificate, CA bundle and CRL stay in use: {e}"
                    );
                    return Outcome::rejected(vec![e.to_string()]);
                }
            },
            _ => None,
        };
        let upstream_changed = new.upstream != previous.upstream;
        let upstream_tls = match (&self.live.uplink, upstream_changed && new.upstream.enabled) {
            (Some(_), true) => match crate::uplink::load_tls(&new.upstream) {
                Ok(t) => Some(t),
                Err(e) => return Outcome::rejected(vec![e.to_string()]),
            },
            _ => None,
        };
        let (_, restart) = classify(started, new, &changed_keys(started, new));
        let (applied, _) = classify(started, new, &changed_keys(previous, new));
        let mut problems = Vec::new();

        // Limits before the registry: connections re-read both when the registry changes.
        let mut limits = new.limits.clone();
        limits.max_payload_bytes = limits
            .max_payload_bytes
            .min(started.limits.max_payload_bytes);
        limits.max_inflight = limits.max_inflight.min(started.limits.max_inflight);
        self.live.limits.set(limits);
        self.registry
            .replace(Registry::from_config(&new.devices, &new.policy));
        // Devices, hashes or policies may have changed: every password is checked anew.
        let forgotten = self.login.clear_cache();
        log::info!(credentials_forgotten = forgotten; "credential cache emptied: the next login of every password device is checked with argon2");
        self.plugins.reconfigure(&new.plugins);
        if let Some(t) = self.tls.as_ref().zip(listener_tls) {
            t.0.install(t.1);
            log::info!("TLS material reloaded: new handshakes use it, connected devices stay");
        }
        let mut rule_changes = String::new();
        if let Some(rules) = &self.rules {
            let r = rules.reload(&new.rules);
            rule_changes = format!(
                " ({} rules: {} added, {} removed, {} changed)",
                new.rules.len() - r.failed,
                r.added.len(),
                r.removed.len(),
                r.changed.len()
            );
            if r.failed > 0 {
                problems.push(format!(
                    "{} rules failed to compile and are not in force (see the journal)",
                    r.failed
                ));
            }
        }
        if let Some(d) = &self.live.defender {
            let (profiles, kept) = d.reload(&new.defender);
            log::debug!(profiles = profiles, violations_kept = kept; "security profiles reloaded");
        }
        if let Some(h) = &self.view.history {
            h.set_bounds(new.history.bounds());
        }
        if let Some(q) = &self.view.queue {
            q.set_bounds(crate::queue::Bounds {
                commit_interval: new.queue.commit_interval,
                max_bytes: new.queue.max_bytes,
                max_age: new.queue.max_age,
            });
        }
        if let Some(d) = &self.spare_dead_letters {
            d.set_bound(new.dead_letter.clone());
        }
        if let Some((tx, tls)) = self.live.uplink.as_ref().zip(upstream_tls) {
            let mut cfg = new.upstream.clone();
            // Kept as started (named as needing a restart when changed).
            cfg.sync_shadows = started.upstream.sync_shadows;
            cfg.sync_readings = started.upstream.sync_readings;
            cfg.shadow_updates_per_second = started.upstream.shadow_updates_per_second;
            if started.upstream.sync_shadows {
                cfg.topics.shadow = started.upstream.topics.shadow.clone();
            }
            tx.send_replace(Arc::new((cfg, tls)));
        }
        crate::telemetry::set_level(new.log.level.into());
        for (key, why) in &restart {
            log::warn!(key:% = key, reason:% = why; "configuration key {key} changed: needs a restart ({why}); the running value stays until `systemctl restart wardgate`");
        }
        let mut summary = if applied.is_empty() {
            "nothing changed that applies live".to_owned()
        } else {
            format!("applied {}", applied.join(", "))
        };
        summary.push_str(&rule_changes);
        if !restart.is_empty() {
            summary.push_str(&format!(
                "; needs a restart: {}",
                describe_restart(&restart)
            ));
        }
        if !problems.is_empty() {
            summary.push_str(&format!("; {}", problems.join("; ")));
        }
        Outcome {
            outcome: "applied".into(),
            applied,
            needs_restart: restart.into_iter().map(|(k, _)| k).collect(),
            problems,
            summary,
            ..Default::default()
        }
    }
}

/// Open a sled store, waiting up to [`SLED_LOCK_WAIT`] while another holder lets go of its
/// lock: a previous gateway in this process (its sled flusher thread ends a moment after the
/// last handle), or a previous process still exiting. After that the error says so.
async fn open_sled<T, E: std::fmt::Display>(
    mut open: impl FnMut() -> Result<T, E>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + SLED_LOCK_WAIT;
    loop {
        match open() {
            Ok(t) => return Ok(t),
            Err(e) if e.to_string().contains("could not acquire lock") => {
                if Instant::now() >= deadline {
                    anyhow::bail!("{e}: is another wardgate running with this gateway.state_dir?");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    }
}

/// How long [`open_sled`] waits for a store's lock.
const SLED_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The watchdog interval systemd asks for, as `sd_watchdog_enabled(3)` reads it: `WATCHDOG_USEC`
/// set and non-zero, and `WATCHDOG_PID` either unset or this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|u| *u > 0)?;
    match pid {
        Some(p) if p.parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// Ping the systemd watchdog at half its interval, but only while every stage is alive and
/// making progress ([`Supervisor::check`]); otherwise stop pinging, so systemd restarts the
/// daemon once `WatchdogSec` has passed.
fn start_watchdog(interval: Duration, supervisor: Supervisor) -> JoinHandle<()> {
    let period = interval / 2;
    log::info!(
        period_ms = period.as_millis() as u64,
        stall_after_ms = supervisor.stall_after().as_millis() as u64;
        "systemd watchdog enabled"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        let mut withheld = false;
        loop {
            tick.tick().await;
            // The same check `/healthz` answers with.
            let health = supervisor.health();
            let healthy = health.ok();
            let unhealthy = health.unhealthy;
            if healthy {
                if withheld {
                    log::info!(
                        "every stage makes progress again: the systemd watchdog is fed again"
                    );
                    withheld = false;
                }
                notify(&[sd_notify::NotifyState::Watchdog]);
            } else if unhealthy.is_empty() {
                // Stopping (STOPPING=1 was sent): systemd no longer expects pings.
            } else if !withheld {
                withheld = true;
                let stages = unhealthy.join(", ");
                log::error!(
                    stages:% = stages;
                    "the systemd watchdog is no longer fed: stage {stages} stalled or failed; systemd restarts wardgate after WatchdogSec unless it recovers"
                );
            }
        }
    })
}

/// How long no message may arrive before start-up memory is given back.
const RELEASE_WHEN_QUIET_FOR: Duration = Duration::from_secs(10);

/// Whether the gateway has been quiet (no message handled) long enough to give back what
/// start-up or a reload needed.
struct Quiet {
    /// What is waiting to be given back (`"start"`, `"reload"`), if anything.
    pending: Option<&'static str>,
    last: u64,
    since: std::time::Instant,
}

impl Quiet {
    fn new(messages: u64) -> Self {
        Self {
            pending: Some("start"),
            last: messages,
            since: std::time::Instant::now(),
        }
    }

    /// The message count now; what to give back, once it stood still long enough.
    fn observe(&mut self, messages: u64) -> Option<&'static str> {
        if messages != self.last {
            self.last = messages;
            self.since = std::time::Instant::now();
            return None;
        }
        if self.since.elapsed() < RELEASE_WHEN_QUIET_FOR {
            return None;
        }
        self.pending.take()
    }
}

/// Give back what start-up (or a reload) needed and the running gateway does not.
fn release_startup_memory(after: &str) {
    let r = crate::footprint::release_startup_memory();
    log::info!(
        code_bytes = r.code_bytes, heap_trimmed = r.heap_trimmed;
        "memory: quiet after the {after}: {} KiB of start-up pages released from the resident set",
        r.code_bytes / 1024
    );
}

#[cfg(test)]
mod tests {
    use super::{watchdog_interval, Quiet, RELEASE_WHEN_QUIET_FOR};
    use std::time::Duration;

    #[test]
    fn start_up_memory_is_given_back_once_and_only_when_quiet() {
        let mut q = Quiet::new(5);
        assert_eq!(q.observe(5), None, "not quiet long enough yet");
        q.since -= RELEASE_WHEN_QUIET_FOR;
        assert_eq!(q.observe(6), None, "a message arrived: quiet starts again");
        assert_eq!(q.observe(6), None);
        q.since -= RELEASE_WHEN_QUIET_FOR;
        assert_eq!(q.observe(6), Some("start"));
        q.since -= RELEASE_WHEN_QUIET_FOR;
        assert_eq!(q.observe(6), None, "once");
        q.pending = Some("reload");
        assert_eq!(q.observe(6), Some("reload"));
    }

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        assert_eq!(
            watchdog_interval(Some("200000"), None, 7),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            watchdog_interval(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(200))
        );
        assert_eq!(watchdog_interval(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }
}
