//! The operators' HTTP endpoint (`[http]`): `/healthz` for load balancers and monitoring,
//! `/metrics` in the Prometheus text format (version 0.0.4), and the local console (`/` and a
//! page per device, see [`console`]).
//!
//! - `GET /healthz` answers from [`Supervisor::health`], the same check that decides whether
//!   the systemd watchdog is fed: `200 ok` while every stage is alive and making progress (the
//!   queue writer's heartbeat is its group commit loop, so a writer stuck on the disk stops it),
//!   `503` naming every stage that is not (stalled, failed) or saying that a stop has begun.
//!   The body lists every stage with its state, one per line.
//! - `GET /metrics` renders a [`Status`] snapshot, the very data `wardgate status` and the
//!   status file show, so the two never disagree about a counter. Names follow Prometheus'
//!   conventions: a `wardgate_` prefix, base units (`_seconds`, `_bytes`), `_total` on counters,
//!   `_info` for constant labels. Per-device series carry a `device` label; devices are the
//!   registered ones only (the gateway never meters an unknown client id), so the series count
//!   is bounded by the registry.
//! - The console: server-rendered HTML pages of the ward (devices, readings, alerts,
//!   violations, quarantines, queue and uplink), see [`console`] for what they show and how
//!   they are bounded.
//!
//! It is a supervised, restartable stage (`http`): its socket is bound once at start (so a busy
//! port fails the start with the key to change), and a restarted accept loop keeps serving on
//! it.
//!
//! Who may see what: `/healthz` and `/metrics` carry no readings and have no authentication,
//! as before the console existed; keep them on loopback or a management network. The console
//! shows readings and alerts, so it is served on a loopback address, and on any other only
//! over TLS (`http.tls`, the gateway's certificate by default, see [`tls`]) and with a
//! credential (`http.console_password_hash`, HTTP Basic authentication checked with argon2 as
//! device passwords are); once a credential is configured every console page asks for it, on
//! any address. `http.console` decides whether it is served at all ([`crate::config::HttpConfig::console`]);
//! [`Endpoint::bind`] refuses to serve it beyond loopback without TLS and a credential even if a
//! configuration got past validation.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections are served at once (more wait in the
//! kernel's backlog), a TLS handshake and a request's head must each arrive within
//! [`HEADER_TIMEOUT`], and a connection lives at most [`CONNECTION_LIFETIME`]. Only `GET` and
//! `HEAD` are answered; any other method gets `405`, any other path `404`. The console bounds
//! its own work (history reads, charts, password checks): see [`console`].
//!
//! What must stay true: `/healthz` is 200 only when the watchdog would be fed; `/metrics`
//! parses with a Prometheus text parser (every family has one `# TYPE`, label values are
//! escaped) and carries no series for an unregistered client id; no console page is served
//! beyond loopback without TLS and a credential, nor without the credential once one is set;
//! nothing here logs a credential, a reading or a request's path.

pub mod console;
pub mod tls;

use crate::status::Status;
use crate::supervisor::{Health, Heartbeat, StageState, Supervisor};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to finish the TLS handshake, and then to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection stays open (keep-alive included).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What the endpoint shows: the gateway's status snapshot and its health.
pub trait Source: Send + Sync + 'static {
    /// What `wardgate status` would show now. May block for a moment (it reads the queue's
    /// bounds); called on a blocking thread.
    fn status(&self) -> Status;
    /// The supervisor whose health `/healthz` reports.
    fn supervisor(&self) -> &Supervisor;
}

/// The bound endpoint.
#[derive(Clone)]
pub struct Endpoint {
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    console: Option<Arc<console::Console>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("console", &self.console.is_some())
            .finish()
    }
}

impl Endpoint {
    /// Bind `config.http.address`, load the TLS files (`http.tls`) and set up the console;
    /// every error names the key to change.
    pub async fn bind(config: &crate::config::Config) -> anyhow::Result<Self> {
        let h = &config.http;
        let address = h.address;
        let serve_console = h.console_served();
        let secured = h.tls && h.console_password_hash.is_some();
        if serve_console && !address.ip().is_loopback() && !secured {
            // Validation refuses this (`http.console = true`); never serve it anyway.
            anyhow::bail!(
                "refusing to serve the console on {address} (http.address, not loopback) without \
                 http.tls = true and http.console_password_hash; set them, or http.console = false"
            );
        }
        if h.console.is_none() && !serve_console {
            log::warn!(
                address:% = address;
                "HTTP endpoint: the console is off on {address}, which is not a loopback address, \
                 because http.tls and http.console_password_hash are not both set; /healthz and \
                 /metrics are served as before. Set both to have the console there, or \
                 http.console = false to silence this"
            );
        }
        let tls = if h.tls {
            let [cert, key] = h.tls_files(&config.listeners.tls);
            Some(tls::acceptor(cert, key)?)
        } else {
            None
        };
        let console = if serve_console {
            Some(Arc::new(console::Console::new(config)?))
        } else {
            None
        };
        let listener = TcpListener::bind(address).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {address} for /healthz and /metrics (http.address): {e}; \
                 choose a free port, or set http.enabled = false"
            )
        })?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener: Arc::new(listener),
            addr,
            tls,
            console,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it speaks HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether the console is served.
    pub fn has_console(&self) -> bool {
        self.console.is_some()
    }

    /// Serve until `stop`.
    pub async fn serve(
        self,
        source: Arc<dyn Source>,
        stop: CancellationToken,
        beat: Heartbeat,
    ) -> Result<(), std::convert::Infallible> {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut idle = Heartbeat::ticker();
        loop {
            beat.beat();
            let permit = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = idle.tick() => continue,
                p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            // Waiting for a client is idling, not a stall: beat while no one comes.
            let (stream, peer) = loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = idle.tick() => beat.beat(),
                    accepted = self.listener.accept() => match accepted {
                        Ok(accepted) => break accepted,
                        Err(e) => {
                            // Out of file descriptors and the like: the next accept may succeed.
                            log::warn!(error:% = e, address:% = self.addr; "HTTP endpoint: cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            };
            let ctx = Ctx {
                source: source.clone(),
                console: self.console.clone(),
                peer,
            };
            let (tls, stop) = (self.tls.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let lifetime = async {
                    match tls {
                        None => serve_connection(stream, ctx).await,
                        Some(acceptor) => {
                            let handshake =
                                tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream));
                            // A failed or slow handshake asked for nothing: just close.
                            if let Ok(Ok(stream)) = handshake.await {
                                serve_connection(stream, ctx).await;
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::timeout(CONNECTION_LIFETIME, lifetime) => {}
                }
            });
        }
    }
}

/// Load the endpoint's TLS files as [`Endpoint::bind`] will (for `wardgate check-config`):
/// nothing to check without `http.enabled` and `http.tls`.
pub fn check_tls(config: &crate::config::Config) -> Result<(), tls::TlsError> {
    let h = &config.http;
    if h.enabled && h.tls {
        let [cert, key] = h.tls_files(&config.listeners.tls);
        tls::acceptor(cert, key)?;
    }
    Ok(())
}

/// What a request is answered from.
#[derive(Clone)]
struct Ctx {
    source: Arc<dyn Source>,
    console: Option<Arc<console::Console>>,
    peer: SocketAddr,
}

async fn serve_connection<I>(io: I, ctx: Ctx)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&ctx, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

async fn answer(ctx: &Ctx, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD are answered\n".into(),
            head,
        );
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let source = &ctx.source;
    match req.uri().path() {
        "/healthz" => {
            let health = source.supervisor().health();
            let (code, body) = healthz(&health);
            reply(code, "text/plain; charset=utf-8", body, head)
        }
        "/metrics" => {
            let s = source.clone();
            match tokio::task::spawn_blocking(move || render(&s.status())).await {
                Ok(text) => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text,
                    head,
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    format!("cannot take a status snapshot: {e}\n"),
                    head,
                ),
            }
        }
        path => match &ctx.console {
            Some(console) if console::is_console_path(path) => {
                console
                    .answer(source, req.headers(), path, ctx.peer, head)
                    .await
            }
            Some(_) => reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "no such page: try / (the console), /healthz or /metrics\n".into(),
                head,
            ),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                format!("no such page `{path}`: try /healthz or /metrics\n"),
                head,
            ),
        },
    }
}

fn reply(
    code: StatusCode,
    content_type: &'static str,
    body: String,
    head: bool,
) -> Response<Full<Bytes>> {
    let len = body.len();
    let mut r = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from(body)
    }));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    if head {
        h.insert(http::header::CONTENT_LENGTH, len.into());
    }
    r
}

/// The `/healthz` answer: the status code and a body naming what is wrong, then every stage.
pub fn healthz(h: &Health) -> (StatusCode, String) {
    let mut body = String::new();
    let code = if h.ok() {
        body.push_str("ok\n");
        StatusCode::OK
    } else {
        if h.stopping {
            body.push_str("unhealthy: wardgate is stopping\n");
        }
        for name in &h.unhealthy {
            let why = h
                .stages
                .iter()
                .find(|s| &s.name == name)
                .map(|s| {
                    let state = match s.state {
                        StageState::Stalled => "stalled",
                        StageState::Failed => "failed",
                        other => other.name(),
                    };
                    match &s.last_failure {
                        Some(f) => format!("{state}: {f}"),
                        None => state.to_owned(),
                    }
                })
                .unwrap_or_else(|| "not healthy".into());
            let _ = writeln!(body, "unhealthy: stage {name} {why}");
        }
        StatusCode::SERVICE_UNAVAILABLE
    };
    for s in &h.stages {
        let _ = writeln!(
            body,
            "stage {} {} restarts={} since_progress_ms={}",
            s.name,
            s.state.name().to_lowercase(),
            s.restarts,
            s.since_progress_ms
        );
    }
    (code, body)
}

/// The Prometheus text exposition of a status snapshot.
pub fn render(s: &Status) -> String {
    let mut m = Exposition::default();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);

    m.family(
        "wardgate_build_info",
        "gauge",
        "The running wardgate: its version and the gateway's thing name (always 1).",
    );
    m.sample(
        "wardgate_build_info",
        &[("version", &s.version), ("gateway_id", &s.gateway_id)],
        1,
    );
    m.family(
        "wardgate_start_time_seconds",
        "gauge",
        "When the gateway started, seconds since the UNIX epoch.",
    );
    m.sample(
        "wardgate_start_time_seconds",
        &[],
        humantime::parse_rfc3339(&s.started_at)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    m.family(
        "wardgate_stage_up",
        "gauge",
        "1 while a supervised stage runs and makes progress, 0 when it is stalled, restarting, failed or stopped.",
    );
    for st in &s.stages {
        m.sample(
            "wardgate_stage_up",
            &[("stage", &st.name)],
            u64::from(st.state == StageState::Running),
        );
    }
    m.family(
        "wardgate_stage_restarts_total",
        "counter",
        "Times a restartable stage was started again after it ended unexpectedly.",
    );
    for st in &s.stages {
        m.sample(
            "wardgate_stage_restarts_total",
            &[("stage", &st.name)],
            u64::from(st.restarts),
        );
    }
    m.family(
        "wardgate_pipeline_messages_total",
        "counter",
        "Device messages the pipeline handled.",
    );
    m.sample("wardgate_pipeline_messages_total", &[], s.readings);

    // Devices: the gatekeeper's meters (Device Defender's cloud-side metrics) and the
    // pipeline's results.
    let dev = |m: &mut Exposition,
               name: &str,
               kind: &str,
               help: &str,
               f: &dyn Fn(&crate::metering::DeviceSnapshot) -> u64| {
        m.family(name, kind, help);
        for d in &s.devices {
            m.sample(name, &[("device", &d.device_id)], f(d));
        }
    };
    dev(
        &mut m,
        "wardgate_device_connected",
        "gauge",
        "1 while the device has a connection.",
        &|d| u64::from(d.connected),
    );
    dev(
        &mut m,
        "wardgate_device_messages_sent_total",
        "counter",
        "PUBLISH packets the device sent to the gateway.",
        &|d| d.totals.messages_sent,
    );
    dev(
        &mut m,
        "wardgate_device_messages_received_total",
        "counter",
        "PUBLISH packets the gateway delivered to the device.",
        &|d| d.totals.messages_received,
    );
    dev(
        &mut m,
        "wardgate_device_received_bytes_total",
        "counter",
        "Bytes the gateway received from the device (all MQTT packets).",
        &|d| d.totals.bytes_in,
    );
    dev(
        &mut m,
        "wardgate_device_sent_bytes_total",
        "counter",
        "Bytes the gateway sent to the device (all MQTT packets).",
        &|d| d.totals.bytes_out,
    );
    dev(
        &mut m,
        "wardgate_device_authorization_failures_total",
        "counter",
        "PUBLISH or SUBSCRIBE attempts the device's policy denied.",
        &|d| d.totals.authorization_failures,
    );
    dev(
        &mut m,
        "wardgate_device_connection_attempts_total",
        "counter",
        "CONNECT attempts under the device's id, refused ones included.",
        &|d| d.totals.connection_attempts,
    );
    dev(
        &mut m,
        "wardgate_device_connection_failures_total",
        "counter",
        "CONNECT attempts under the device's id that were refused.",
        &|d| d.totals.connection_failures,
    );
    dev(
        &mut m,
        "wardgate_device_disconnects_total",
        "counter",
        "Connections of the device that ended.",
        &|d| d.totals.disconnects,
    );
    m.family(
        "wardgate_device_readings_total",
        "counter",
        "Canonical readings the device's plugin made from its messages.",
    );
    for p in &s.pipeline {
        m.sample(
            "wardgate_device_readings_total",
            &[("device", &p.device_id)],
            p.readings,
        );
    }
    m.family(
        "wardgate_device_dead_letters_total",
        "counter",
        "Messages of the device handed to the dead-letter store (not normalised).",
    );
    for p in &s.pipeline {
        m.sample(
            "wardgate_device_dead_letters_total",
            &[("device", &p.device_id)],
            p.dead_letters,
        );
    }
    let g = &s.gateway;
    m.counter(
        "wardgate_unknown_device_attempts_total",
        "CONNECTs under a client id that is not in the device registry.",
        g.unknown_device_attempts,
    );
    m.counter(
        "wardgate_tls_handshake_failures_total",
        "TLS handshakes on the device listener that failed.",
        g.tls_handshake_failures,
    );
    m.counter(
        "wardgate_connections_closed_before_connect_total",
        "Connections that ended or timed out before an MQTT CONNECT.",
        g.connections_closed_before_connect,
    );
    m.counter(
        "wardgate_connections_over_limit_total",
        "Connections refused by listeners.max_connections or max_connections_per_address.",
        g.connections_over_limit,
    );
    m.counter(
        "wardgate_login_password_checks_total",
        "Password hashes verified (argon2).",
        s.login.checks,
    );
    m.counter(
        "wardgate_login_cache_hits_total",
        "Logins answered from the credential cache.",
        s.login.cache_hits,
    );
    m.family("wardgate_login_refused_total", "counter", "Logins turned away before a password check, by bound: too many checks pending, or over the rate.");
    m.sample(
        "wardgate_login_refused_total",
        &[("reason", "pending")],
        s.login.refused_pending,
    );
    m.sample(
        "wardgate_login_refused_total",
        &[("reason", "rate")],
        s.login.refused_rate,
    );

    if let Some(q) = &s.queue {
        m.gauge(
            "wardgate_queue_records",
            "Records in the offline queue, not yet acknowledged upstream.",
            q.depth as u64,
        );
        m.gauge(
            "wardgate_queue_bytes",
            "Bytes of the records in the offline queue.",
            q.bytes,
        );
        m.gauge(
            "wardgate_queue_oldest_age_seconds",
            "Age of the oldest queued record (0 when empty).",
            q.oldest_age_s,
        );
        m.counter(
            "wardgate_queue_appended_total",
            "Records written to the offline queue.",
            q.appended,
        );
        m.family(
            "wardgate_queue_evicted_total",
            "counter",
            "Records removed undelivered by the queue's bounds (queue.max_bytes, queue.max_age).",
        );
        m.sample(
            "wardgate_queue_evicted_total",
            &[("bound", "bytes")],
            q.evicted_over_bytes,
        );
        m.sample(
            "wardgate_queue_evicted_total",
            &[("bound", "age")],
            q.evicted_over_age,
        );
        m.counter(
            "wardgate_queue_undeliverable_total",
            "Records set aside because they can never be sent (too large for the upstream).",
            q.undeliverable,
        );
        m.counter(
            "wardgate_queue_refused_full_total",
            "Records refused because the queue was full of alarms it may not evict.",
            q.refused_full,
        );
    }
    if let Some(u) = &s.uplink {
        m.family(
            "wardgate_uplink_connected",
            "gauge",
            "1 while a session with the upstream (AWS IoT Core) is up.",
        );
        m.sample(
            "wardgate_uplink_connected",
            &[("endpoint", &u.endpoint)],
            u64::from(u.connected),
        );
        m.counter(
            "wardgate_uplink_connects_total",
            "Sessions with the upstream established.",
            u.connects,
        );
        m.counter(
            "wardgate_uplink_connection_errors_total",
            "Connection attempts that failed or sessions that broke.",
            u.connection_errors,
        );
        m.counter(
            "wardgate_uplink_publishes_total",
            "PUBLISH packets sent upstream, resends included.",
            u.publishes,
        );
        m.counter(
            "wardgate_uplink_publish_bytes_total",
            "Payload bytes of the PUBLISH packets sent upstream.",
            u.publish_bytes,
        );
        m.counter(
            "wardgate_uplink_acknowledged_total",
            "Upstream PUBLISH packets acknowledged (PUBACK).",
            u.batches_acked,
        );
        m.family(
            "wardgate_uplink_records_delivered_total",
            "counter",
            "Queue records acknowledged upstream and removed from the queue, by stream.",
        );
        for (stream, n) in &u.delivered_by_stream {
            m.sample(
                "wardgate_uplink_records_delivered_total",
                &[("stream", stream)],
                *n,
            );
        }
    }

    m.family(
        "wardgate_plugin_info",
        "gauge",
        "A loaded plugin: its version and the SHA-256 of its file (always 1).",
    );
    for p in &s.plugins {
        m.sample(
            "wardgate_plugin_info",
            &[
                ("plugin", &p.name),
                ("version", &p.version),
                ("digest", &p.digest),
            ],
            1,
        );
    }
    m.family(
        "wardgate_plugin_calls_total",
        "counter",
        "Messages handed to the plugin (contained devices' messages included).",
    );
    for p in &s.plugins {
        m.sample(
            "wardgate_plugin_calls_total",
            &[("plugin", &p.name)],
            p.calls.calls,
        );
    }
    m.family(
        "wardgate_plugin_failures_total",
        "counter",
        "Plugin calls that produced no reading, by kind (trap, overloaded, malformed, ...).",
    );
    for p in &s.plugins {
        for kind in crate::plugin_host::FAILURE_KINDS {
            let n = p.calls.failures.get(kind).copied().unwrap_or(0);
            m.sample(
                "wardgate_plugin_failures_total",
                &[("plugin", &p.name), ("kind", kind)],
                n,
            );
        }
    }
    m.family(
        "wardgate_plugin_contained_devices",
        "gauge",
        "Devices whose messages bypass the plugin after repeated traps.",
    );
    for p in &s.plugins {
        m.sample(
            "wardgate_plugin_contained_devices",
            &[("plugin", &p.name)],
            p.contained.len() as u64,
        );
    }
    m.family(
        "wardgate_plugin_call_duration_seconds",
        "histogram",
        "How long a plugin call took.",
    );
    for p in &s.plugins {
        m.histogram(
            "wardgate_plugin_call_duration_seconds",
            &[("plugin", &p.name)],
            &p.calls.duration,
        );
    }

    for (name, help, f) in [
        (
            "wardgate_rule_matches_total",
            "Messages whose rule's WHERE clause held.",
            (|r: &crate::rules::RuleCounts| r.matched) as fn(&crate::rules::RuleCounts) -> u64,
        ),
        (
            "wardgate_rule_fires_total",
            "Times the rule fired its actions.",
            |r| r.fired,
        ),
        (
            "wardgate_rule_debounced_total",
            "Matches that did not fire because the rule fired shortly before.",
            |r| r.debounced,
        ),
        (
            "wardgate_rule_action_failures_total",
            "Rule actions that failed (a refused or expired webhook delivery, a full queue).",
            |r| r.action_failures,
        ),
        (
            "wardgate_rule_loops_stopped_total",
            "Messages a rule did not act on because a rule's own output made them.",
            |r| r.loops_stopped,
        ),
    ] {
        m.family(name, "counter", help);
        for r in &s.rules {
            m.sample(name, &[("rule", &r.name)], f(r));
        }
    }
    m.family(
        "wardgate_webhook_pending",
        "gauge",
        "Rule webhook deliveries waiting, per receiver origin.",
    );
    for w in &s.webhooks {
        m.sample(
            "wardgate_webhook_pending",
            &[("origin", &w.origin)],
            w.pending,
        );
    }
    for (name, help, f) in [
        (
            "wardgate_webhook_delivered_total",
            "Rule webhook deliveries a receiver accepted (2xx).",
            (|w: &crate::rules::webhook::WebhookCounts| w.delivered)
                as fn(&crate::rules::webhook::WebhookCounts) -> u64,
        ),
        (
            "wardgate_webhook_failed_attempts_total",
            "Rule webhook attempts that failed and were retried or given up.",
            |w| w.failed_attempts,
        ),
        (
            "wardgate_webhook_dropped_total",
            "Rule webhook deliveries given up (refused, expired, or over the bound).",
            |w| w.dropped,
        ),
    ] {
        m.family(name, "counter", help);
        for w in &s.webhooks {
            m.sample(name, &[("origin", &w.origin)], f(w));
        }
    }

    let sh = &s.shadows;
    m.family(
        "wardgate_shadow_updates_total",
        "counter",
        "Shadow updates from devices and the cloud, by result.",
    );
    m.sample(
        "wardgate_shadow_updates_total",
        &[("result", "accepted")],
        sh.accepted,
    );
    m.sample(
        "wardgate_shadow_updates_total",
        &[("result", "rejected")],
        sh.rejected,
    );
    m.sample(
        "wardgate_shadow_updates_total",
        &[("result", "too_many")],
        sh.too_many,
    );
    m.counter(
        "wardgate_shadow_store_errors_total",
        "Shadow updates the shadow store could not write.",
        sh.store_errors,
    );
    m.counter(
        "wardgate_shadow_reports_total",
        "Shadow reports made from readings.",
        sh.reports,
    );
    m.counter(
        "wardgate_shadow_synced_total",
        "Shadow documents brought in from the cloud.",
        sh.synced,
    );

    let dl = &s.dead_letter;
    m.counter(
        "wardgate_dead_letters_total",
        "Messages written to the dead-letter store.",
        dl.written,
    );
    m.counter(
        "wardgate_dead_letter_write_failures_total",
        "Dead letters that could not be written.",
        dl.failed,
    );
    m.counter(
        "wardgate_dead_letter_refused_total",
        "Dead letters dropped because the store's writer was busy.",
        dl.refused_busy,
    );
    m.gauge(
        "wardgate_dead_letter_files",
        "Files in the dead-letter store.",
        dl.files,
    );
    m.gauge(
        "wardgate_dead_letter_bytes",
        "Bytes in the dead-letter store.",
        dl.bytes,
    );
    m.counter(
        "wardgate_dead_letter_removed_entries_total",
        "Dead letters removed by the store's bound (dead_letter.max_bytes, max_age).",
        dl.removed_entries,
    );
    m.counter(
        "wardgate_dead_letter_removed_bytes_total",
        "Bytes of dead letters removed by the store's bound.",
        dl.removed_bytes,
    );

    if let Some(h) = &s.history {
        m.counter(
            "wardgate_history_rows_written_total",
            "Rows (readings, alerts, violations) written to the ward history.",
            h.written,
        );
        m.family(
            "wardgate_history_rows_dropped_total",
            "counter",
            "History rows dropped: while the writer was behind (busy), or with their segments by history.max_bytes (bytes) or history.max_age (age).",
        );
        for (reason, v) in [
            ("busy", h.dropped_busy),
            ("bytes", h.dropped_over_bytes),
            ("age", h.dropped_over_age),
        ] {
            m.sample(
                "wardgate_history_rows_dropped_total",
                &[("reason", reason)],
                v,
            );
        }
        m.counter(
            "wardgate_history_write_failures_total",
            "History batches that could not be written (their rows are lost from the history, not from the queue).",
            h.write_failures,
        );
        m.gauge(
            "wardgate_history_bytes",
            "Bytes of the ward history on disk.",
            h.bytes,
        );
    }

    if let Some(d) = &s.defender {
        m.gauge(
            "wardgate_defender_security_profiles",
            "Security profiles loaded.",
            d.profiles as u64,
        );
        m.family("wardgate_defender_reports_total", "counter", "Device Defender metric reports: devices' reports accepted or rejected, and the gateway's own.");
        m.sample(
            "wardgate_defender_reports_total",
            &[("source", "device"), ("result", "accepted")],
            d.reports_accepted,
        );
        m.sample(
            "wardgate_defender_reports_total",
            &[("source", "device"), ("result", "rejected")],
            d.reports_rejected,
        );
        m.sample(
            "wardgate_defender_reports_total",
            &[("source", "gateway"), ("result", "accepted")],
            d.own_reports,
        );
        m.counter(
            "wardgate_defender_evaluations_total",
            "Behavior evaluations of the local Detect.",
            d.evaluations,
        );
        m.family(
            "wardgate_defender_violation_events_total",
            "counter",
            "Violation events, by type (Detect's in-alarm, alarm-cleared, alarm-invalidated).",
        );
        for (event, n) in ["in-alarm", "alarm-cleared", "alarm-invalidated"]
            .iter()
            .zip(d.events)
        {
            m.sample(
                "wardgate_defender_violation_events_total",
                &[("event", event)],
                n,
            );
        }
        m.family(
            "wardgate_defender_active_violations",
            "gauge",
            "Violations in alarm now, per security profile and behavior.",
        );
        let mut active: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
        for v in &d.active {
            *active
                .entry((&v.security_profile_name, &v.behavior))
                .or_default() += 1;
        }
        for ((profile, behavior), n) in active {
            m.sample(
                "wardgate_defender_active_violations",
                &[("security_profile", profile), ("behavior", behavior)],
                n,
            );
        }
        m.gauge(
            "wardgate_defender_quarantined_devices",
            "Devices in quarantine now.",
            d.quarantined.len() as u64,
        );
        m.counter(
            "wardgate_defender_quarantines_total",
            "Quarantines begun.",
            d.quarantines,
        );
        m.counter(
            "wardgate_defender_action_failures_total",
            "Defender actions that failed.",
            d.action_failures,
        );
    }
    m.family(
        "wardgate_scrape_timestamp_seconds",
        "gauge",
        "When this page was made, seconds since the UNIX epoch.",
    );
    m.sample_f64("wardgate_scrape_timestamp_seconds", &[], now_s);
    m.out
}

/// A Prometheus text exposition being written.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], v);
    }

    fn gauge(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], v);
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
        }
        self.out.push('}');
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        self.out.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.out, " {v}");
    }

    fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.out, " {}", float(v));
    }

    fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &crate::plugin_host::Histogram,
    ) {
        let bucket = format!("{name}_bucket");
        for (i, n) in h.cumulative.iter().enumerate() {
            let le = h.le.get(i).map_or_else(|| "+Inf".to_owned(), |b| float(*b));
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, *n);
        }
        self.sample_f64(&format!("{name}_sum"), labels, h.sum_s);
        self.sample(&format!("{name}_count"), labels, h.count());
    }
}

fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("a\nb"), "a\\nb");
        let mut m = Exposition::default();
        m.family("x_total", "counter", "Help with \\ and\nnewline.");
        m.sample("x_total", &[("device", "d\"1")], 3);
        assert_eq!(
            m.out,
            "# HELP x_total Help with \\\\ and\\nnewline.\n# TYPE x_total counter\nx_total{device=\"d\\\"1\"} 3\n"
        );
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_an_inf_bucket_a_sum_and_a_count() {
        let mut m = Exposition::default();
        let h = crate::plugin_host::Histogram {
            le: vec![0.001, 0.01],
            cumulative: vec![1, 3, 4],
            sum_s: 0.5,
        };
        m.histogram("d_seconds", &[("plugin", "p")], &h);
        assert_eq!(
            m.out,
            "d_seconds_bucket{plugin=\"p\",le=\"0.001\"} 1\n\
             d_seconds_bucket{plugin=\"p\",le=\"0.01\"} 3\n\
             d_seconds_bucket{plugin=\"p\",le=\"+Inf\"} 4\n\
             d_seconds_sum{plugin=\"p\"} 0.5\n\
             d_seconds_count{plugin=\"p\"} 4\n"
        );
    }

    fn stage(
        name: &str,
        state: StageState,
        failure: Option<&str>,
    ) -> crate::supervisor::StageStatus {
        crate::supervisor::StageStatus {
            name: name.into(),
            policy: crate::supervisor::Policy::Fatal,
            state,
            restarts: 0,
            last_failure: failure.map(str::to_owned),
            last_failure_at: None,
            since_progress_ms: 0,
        }
    }

    #[test]
    fn healthz_is_503_naming_the_stage_that_is_not_alive() {
        let ok = Health {
            stopping: false,
            unhealthy: vec![],
            stages: vec![stage("pipeline", StageState::Running, None)],
        };
        let (code, body) = healthz(&ok);
        assert_eq!(code, StatusCode::OK);
        assert!(body.starts_with("ok\n"), "{body}");
        assert!(body.contains("stage pipeline running"), "{body}");

        let stalled = Health {
            stopping: false,
            unhealthy: vec!["queue-writer".into()],
            stages: vec![
                stage("pipeline", StageState::Running, None),
                stage(
                    "queue-writer",
                    StageState::Stalled,
                    Some("made no progress for 12 s"),
                ),
            ],
        };
        let (code, body) = healthz(&stalled);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("unhealthy: stage queue-writer stalled: made no progress for 12 s"),
            "{body}"
        );

        let stopping = Health {
            stopping: true,
            ..ok
        };
        let (code, body) = healthz(&stopping);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("stopping"), "{body}");
    }

    #[tokio::test]
    async fn a_failed_fatal_stage_makes_the_health_check_fail() {
        let sup = Supervisor::new();
        let _stage = sup.spawn_fatal("pipeline", |_beat| async move {
            Err::<(), _>(anyhow::anyhow!("the receiver is gone"))
        });
        let failure = sup.fatal().await;
        assert_eq!(failure.stage, "pipeline");
        let h = sup.health();
        assert!(!h.ok());
        let (code, body) = healthz(&h);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("unhealthy: stage pipeline failed"), "{body}");
    }
}
