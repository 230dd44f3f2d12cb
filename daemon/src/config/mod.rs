//! Configuration: the types every stage is built from, and how they are loaded.
//!
//! Layers, lowest first (each later layer wins key by key):
//! 1. built-in defaults ([`Config::default`], the same values `config/wardgate.toml` documents);
//! 2. the main file, `/etc/wardgate/wardgate.toml` or the one given with `-c FILE`
//!    (a missing default file is fine, a missing explicit file is an error);
//! 3. every `*.toml` in the `conf.d/` directory beside the main file, in name order;
//! 4. `WARDGATE_*` environment variables, `__` separating levels
//!    (`WARDGATE_LOG__LEVEL=debug` sets `log.level`).
//!
//! Arrays are concatenated across files (a drop-in in `conf.d/` can add `[[devices]]`), scalars
//! are replaced.
//!
//! What must stay true:
//! - unknown keys are errors, never silently ignored;
//! - loading reports *every* problem it can find at once ([`ConfigErrors`]), each naming where the
//!   bad value came from (file and key, or the environment variable);
//! - secrets never appear in plain text: devices carry salted argon2 hashes (PHC strings) only.
//!
//! Config types sit here with doc comments and units in their names (`_bytes`) or types
//! (`Duration`, written in the humantime form `"10s"`).

mod load;
mod validate;

pub use load::{load, ConfigError, ConfigErrors, LoadOptions, Loaded, Source, DEFAULT_CONFIG_PATH};
pub use validate::{valid_kind_name, valid_thing_name, IOT_CORE_MAX_PAYLOAD_BYTES};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The shipped default configuration file, with every key commented.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../config/wardgate.toml");

/// The whole configuration of one gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identity and local state of this gateway.
    pub gateway: GatewayConfig,
    /// Device-facing listeners (the gatekeeper).
    pub listeners: ListenersConfig,
    /// What a login may cost: bounds on password checks, the argon2 pool, the credential cache.
    pub login: LoginConfig,
    /// Per-connection limits the gatekeeper enforces.
    pub limits: LimitsConfig,
    /// Default topic policy (per-device entries may replace it).
    pub policy: PolicyConfig,
    /// Per-device traffic metering.
    pub metering: MeteringConfig,
    /// WebAssembly normalisation plugins.
    pub plugins: PluginsConfig,
    /// The embedded MQTT broker behind the gatekeeper.
    pub broker: BrokerConfig,
    /// The device registry: who may connect, and what kind of device it is.
    pub devices: Vec<DeviceConfig>,
    /// Edge rules (AWS IoT SQL), evaluated on the gateway even while offline.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleConfig>,
    /// Forwarding to AWS IoT Core.
    pub upstream: UpstreamConfig,
    /// The durable offline queue.
    pub queue: QueueConfig,
    /// The dead-letter store's bound.
    pub dead_letter: DeadLetterConfig,
    /// The defender agent: Device Defender reports, local Detect, quarantine.
    pub defender: DefenderConfig,
    /// Logging.
    pub log: LogConfig,
    /// The operators' HTTP endpoint: `/healthz` and Prometheus `/metrics`.
    pub http: HttpConfig,
    /// The ward history: readings, alerts and violations kept on the gateway.
    pub history: HistoryConfig,
}

/// `[history]`: the ward history (`<state_dir>/history`, see `wardgate history`), bounded by
/// dropping its oldest segments (at most an hour or `max_bytes / 16` each).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Whether readings, alerts and violations are kept.
    pub enabled: bool,
    /// Most bytes on disk; above it the oldest segments are dropped (counted).
    pub max_bytes: u64,
    /// Rows received longer ago than this are dropped, a segment at a time.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        let b = crate::history::store::Bounds::default();
        Self {
            enabled: true,
            max_bytes: b.max_bytes,
            max_age: b.max_age,
        }
    }
}

impl HistoryConfig {
    /// The store's bounds.
    pub fn bounds(&self) -> crate::history::store::Bounds {
        crate::history::store::Bounds {
            max_bytes: self.max_bytes,
            max_age: self.max_age,
        }
    }
}

/// `[http]`: the operators' endpoint — `/healthz`, `/metrics` and the local console (see
/// [`crate::http`]). Changing any of it needs a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Whether the endpoint runs at all.
    pub enabled: bool,
    /// Address and port. Loopback by default: `/healthz` and `/metrics` have no
    /// authentication, so expose them beyond the gateway only on a management network.
    pub address: SocketAddr,
    /// The local console (`/` and a page per device). Unset: served on a loopback address, and
    /// on any other only with `tls` and `console_password_hash` (otherwise left off, with a
    /// warning at start). `true`: served, and a non-loopback address without both is a
    /// configuration error. `false`: only `/healthz` and `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<bool>,
    /// User name the console asks for (HTTP Basic authentication).
    pub console_user: String,
    /// argon2 PHC string of the console's password (`wardgate hash-password`). When set, every
    /// console page asks for `console_user` and this password, on any address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_password_hash: Option<String>,
    /// How often the console's pages reload themselves (1s to 1h).
    #[serde(with = "humantime_serde")]
    pub console_refresh: Duration,
    /// Serve HTTPS instead of HTTP (every page, `/healthz` and `/metrics` included).
    pub tls: bool,
    /// Certificate chain for `tls` (PEM, leaf first); unset: `listeners.tls.cert_file`, the
    /// gateway's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM); unset: `listeners.tls.key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT)),
            console: None,
            console_user: "operator".into(),
            console_password_hash: None,
            console_refresh: Duration::from_secs(15),
            tls: false,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl HttpConfig {
    /// Whether the console is served: see [`HttpConfig::console`].
    pub fn console_served(&self) -> bool {
        let safe =
            self.address.ip().is_loopback() || (self.tls && self.console_password_hash.is_some());
        self.console.unwrap_or(safe)
    }

    /// The certificate chain and key files `tls` serves, with the keys that name them.
    pub fn tls_files<'a>(
        &'a self,
        listener: &'a TlsListenerConfig,
    ) -> [(&'static str, &'a std::path::Path); 2] {
        [
            match &self.tls_cert_file {
                Some(p) => ("http.tls_cert_file", p.as_path()),
                None => ("listeners.tls.cert_file", listener.cert_file.as_path()),
            },
            match &self.tls_key_file {
                Some(p) => ("http.tls_key_file", p.as_path()),
                None => ("listeners.tls.key_file", listener.key_file.as_path()),
            },
        ]
    }
}

/// The default port of `[http]`.
pub const DEFAULT_HTTP_PORT: u16 = 9883;

/// `[gateway]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The gateway's thing name in AWS IoT Core (1–128 of `[a-zA-Z0-9:_-]`); also its MQTT
    /// client id upstream.
    pub id: String,
    /// Directory for durable state (queue, plugin cache, status). Must be absolute.
    pub state_dir: PathBuf,
    /// How long a stop (SIGTERM/SIGINT) may take to drain in-flight readings.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            id: "wardgate".into(),
            state_dir: PathBuf::from("/var/lib/wardgate"),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// `[listeners]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenersConfig {
    /// Plain-TCP MQTT listener for legacy devices that authenticate with a password.
    pub plain: PlainListenerConfig,
    /// TLS listener: mutual TLS for devices with certificates, or TLS + password.
    pub tls: TlsListenerConfig,
    /// Time a new connection has to finish its TLS handshake and send its MQTT CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most device connections open at once on one listener; more are closed on accept.
    pub max_connections: usize,
    /// Most connections open at once from one source address, per listener.
    pub max_connections_per_address: usize,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        Self {
            plain: PlainListenerConfig::default(),
            tls: TlsListenerConfig::default(),
            connect_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_address: 64,
        }
    }
}

/// `[listeners.tls]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsListenerConfig {
    /// Whether the TLS listener runs.
    pub enabled: bool,
    /// Address and port to listen on.
    pub address: SocketAddr,
    /// The gateway's server certificate chain (PEM, leaf first).
    pub cert_file: PathBuf,
    /// The server certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The ward CA bundle (PEM): every CA in it may sign device certificates.
    pub ca_file: PathBuf,
    /// Certificate revocation lists (PEM, one or more) of the ward CAs; optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl_file: Option<PathBuf>,
    /// Lowest TLS version accepted: "1.2" or "1.3".
    pub min_version: TlsVersion,
}

impl Default for TlsListenerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: SocketAddr::from(([0, 0, 0, 0], 8883)),
            cert_file: PathBuf::from("/etc/wardgate/tls/server.crt"),
            key_file: PathBuf::from("/etc/wardgate/tls/server.key"),
            ca_file: PathBuf::from("/etc/wardgate/tls/ward-ca.crt"),
            crl_file: None,
            min_version: TlsVersion::V1_2,
        }
    }
}

/// Lowest accepted TLS protocol version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// `[login]`: bounds on what password logins cost (see [`crate::gatekeeper::login`]). Only
/// CONNECTs that need an argon2 check count against them: certificate logins and passwords
/// answered by the credential cache do not. A CONNECT over a bound gets CONNACK 3 ("server
/// unavailable") at once and the device retries later.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoginConfig {
    /// Threads checking passwords (each keeps one argon2 memory area); 0 = one per core.
    pub argon2_threads: usize,
    /// Password checks in progress (running or waiting for a thread) at once, gateway-wide.
    pub max_pending: usize,
    /// Password checks in progress at once from one source address.
    pub max_pending_per_address: usize,
    /// Password checks started per second, gateway-wide (bursts up to one second's worth).
    pub max_per_second: u32,
    /// Password checks started per second from one source address.
    pub max_per_second_per_address: u32,
    /// How long a verified password is remembered (as a keyed tag, never in clear), so a
    /// reconnect does not pay argon2 again; `"0s"` turns the cache off. Emptied on reload.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for LoginConfig {
    fn default() -> Self {
        Self {
            argon2_threads: 0,
            max_pending: 64,
            max_pending_per_address: 8,
            max_per_second: 100,
            max_per_second_per_address: 10,
            cache_ttl: Duration::from_secs(3600),
        }
    }
}

/// `[limits]`: what one device connection may do; each breach closes that connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest PUBLISH payload, in bytes (AWS IoT Core: 128 KiB).
    pub max_payload_bytes: usize,
    /// Longest topic, in bytes of UTF-8 (AWS IoT Core: 256).
    pub max_topic_bytes: usize,
    /// Most topic levels (AWS IoT Core: 8, i.e. 7 slashes).
    pub max_topic_levels: usize,
    /// Unacknowledged QoS 1 publishes a device may have outstanding (AWS IoT Core: 100).
    pub max_inflight: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 128 * 1024,
            max_topic_bytes: 256,
            max_topic_levels: 8,
            max_inflight: 100,
        }
    }
}

/// `[policy]`: topics a device may publish to and filters it may subscribe to, unless its own
/// `[[devices]]` entry says otherwise. `${device}` and `${kind}` are replaced by the device's id
/// and kind. Deny by default: anything not matched is refused. `$SYS/...` is never reachable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Topic filters (with `+`/`#`) a device may PUBLISH to.
    pub publish: Vec<String>,
    /// Topic filters a device's SUBSCRIBE filters must fall within.
    pub subscribe: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            publish: vec![
                "ward/${device}/telemetry".into(),
                "ward/${device}/alarm".into(),
                "$aws/things/${device}/shadow/update".into(),
                "$aws/things/${device}/shadow/get".into(),
                "$aws/things/${device}/shadow/delete".into(),
                "$aws/things/${device}/shadow/name/+/update".into(),
                "$aws/things/${device}/shadow/name/+/get".into(),
                "$aws/things/${device}/shadow/name/+/delete".into(),
                "$aws/things/${device}/defender/metrics/json".into(),
                "$aws/things/${device}/defender/metrics/cbor".into(),
            ],
            subscribe: vec![
                "ward/${device}/#".into(),
                "$aws/things/${device}/shadow/#".into(),
                "$aws/things/${device}/defender/metrics/#".into(),
            ],
        }
    }
}

/// `[plugins]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Drop-in directory of plugin components (`<name>.wasm`), watched for new and replaced
    /// files; searched first.
    pub dir: PathBuf,
    /// The plugins shipped with wardgate (the package's `/usr/lib/wardgate/plugins`), searched
    /// after `dir` and watched the same way: a file of the same name in `dir` overrides one
    /// here. Empty: none. A directory that does not exist is skipped without a word.
    pub shipped_dir: PathBuf,
    /// How often the directory is checked for changes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// CPU time one plugin call may spend before it is stopped (a trap charged to the device
    /// that sent the message). Time spent waiting for a core does not count; in wall time a
    /// call is stopped at 20 × this (at least 1 s) whatever its CPU time (charged to no one).
    #[serde(with = "humantime_serde")]
    pub call_deadline: Duration,
    /// Most linear memory one plugin instance may use, in bytes.
    pub max_memory_bytes: usize,
    /// Traps in a row from one device after which that device is contained for its plugin:
    /// its messages go to the dead-letter store without calling the plugin, until a new
    /// version of the plugin is loaded or the configuration is reloaded. Other devices are
    /// never affected.
    pub max_consecutive_traps: u32,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/wardgate/plugins"),
            shipped_dir: PathBuf::from("/usr/lib/wardgate/plugins"),
            poll_interval: Duration::from_secs(2),
            call_deadline: Duration::from_millis(5),
            max_memory_bytes: 16 * 1024 * 1024,
            max_consecutive_traps: 3,
        }
    }
}

/// `[metering]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// Length of one metering window (AWS Device Defender evaluates 5-minute windows).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Completed windows kept per device.
    pub windows_kept: usize,
    /// How often the status file (`<state_dir>/status.json`) is rewritten.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(300),
            windows_kept: 12,
            status_interval: Duration::from_secs(5),
        }
    }
}

/// `[listeners.plain]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlainListenerConfig {
    /// Whether the plain listener runs at all.
    pub enabled: bool,
    /// Address and port to listen on.
    pub address: SocketAddr,
}

impl Default for PlainListenerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: SocketAddr::from(([0, 0, 0, 0], 1883)),
        }
    }
}

/// `[broker]`: limits of the embedded rumqttd. Memory held for retained history is at most
/// `max_segment_bytes × max_segment_count` per subscribed filter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Internal listener; must be a loopback address. Port 0 picks a free port at start.
    pub address: SocketAddr,
    /// Most connections the broker accepts: one per device with a session of its own (a device
    /// that subscribed, or asked for a persistent session), plus the gatekeeper's relay link
    /// (`broker::RELAY_CONNECTIONS`) and the pipeline's publisher. Devices that only publish
    /// use the relay link.
    pub max_connections: usize,
    /// Size of one in-memory log segment per filter, in bytes.
    pub max_segment_bytes: usize,
    /// Segments kept per filter before the oldest is dropped.
    pub max_segment_count: usize,
    /// Packets queued towards one slow subscriber before it is disconnected.
    pub max_outgoing_packets: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 18830)),
            max_connections: 512,
            max_segment_bytes: 1024 * 1024,
            max_segment_count: 4,
            max_outgoing_packets: 200,
        }
    }
}

/// The commented example that starts at `marker` (`# [[rules]]`) in the shipped configuration
/// file, uncommented: the lines from it up to the first that is not a comment.
fn shipped_example(marker: &str) -> Option<String> {
    let start = DEFAULT_CONFIG_TOML.find(marker)?;
    Some(
        DEFAULT_CONFIG_TOML[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or("")))
            .collect(),
    )
}

/// The commented `[[defender.profiles]]` example of the shipped configuration file, as a
/// profile (the demo runs it; a test keeps it valid).
pub fn example_profile() -> ProfileConfig {
    shipped_example("# [[defender.profiles]]")
        .and_then(|text| toml::from_str::<Config>(&text).ok())
        .and_then(|c| c.defender.profiles.into_iter().next())
        .expect("the shipped configuration's example profile parses (a unit test checks it)")
}

/// `[defender]`: Device Defender on the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DefenderConfig {
    /// Answer device agents' reports on `$aws/things/<device>/defender/metrics/{json|cbor}`,
    /// send the gateway's own report, and evaluate the security profiles.
    pub enabled: bool,
    /// How often the gateway reports its own device-side metrics upstream (at least 5 min
    /// when the upstream is IoT Core: faster reports are throttled there).
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// `long` or `short` field names in the gateway's own report.
    pub report_names: String,
    /// A statistical threshold is computed only over at least this many devices with a
    /// datapoint (AWS documents no minimum).
    pub statistics_min_devices: usize,
    /// A violation whose device has had no datapoint for this long becomes
    /// `alarm-invalidated` (AWS: 2 days).
    #[serde(with = "humantime_serde")]
    pub invalidate_after: Duration,
    /// Violation events kept for `wardgate violations --history`.
    pub history_events: usize,
    /// Security profiles.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<ProfileConfig>,
}

impl Default for DefenderConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            report_interval: Duration::from_secs(300),
            report_names: "long".into(),
            statistics_min_devices: 5,
            invalidate_after: Duration::from_secs(2 * 24 * 3600),
            history_events: 10_000,
            profiles: Vec::new(),
        }
    }
}

/// One `[[defender.profiles]]` entry: an AWS IoT Device Defender security profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Name (`securityProfileName`).
    pub name: String,
    /// Device ids, `kind:<kind>`, or `*`.
    #[serde(default = "all_targets")]
    pub targets: Vec<String>,
    /// A JSON file of behaviors: an array, or `aws iot describe-security-profile` output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behaviors_file: Option<PathBuf>,
    /// Behaviors inline, with AWS's field names (`metric`, `criteria.comparisonOperator`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub behaviors: Vec<serde_json::Value>,
    /// What to do on each violation event: the rules' actions, and `quarantine`.
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn all_targets() -> Vec<String> {
    vec!["*".into()]
}

/// One `[[rules]]` entry, shaped like an AWS IoT topic rule so that one can be copied from the
/// console: a name, an IoT SQL statement and the actions to take when it fires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name (1–128 of `[a-zA-Z0-9_]`, as AWS's rule names): `RULE=` in the journal.
    pub name: String,
    /// `SELECT ... FROM '<topic filter>' [WHERE ...]`.
    pub sql: String,
    /// What to do with the rule's output when it fires.
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    /// At most one firing per device within this long while the condition keeps holding
    /// (further matches are counted as debounced). None: every match fires.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub debounce: Option<Duration>,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One action of a rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionConfig {
    /// Publish the output on the local broker.
    Republish {
        /// Topic; `${...}` templates allowed (`alerts/${topic(3)}`).
        topic: String,
        /// 0 or 1.
        #[serde(default = "one")]
        qos: u8,
    },
    /// Queue the output for IoT Core on the alerts stream, as an alarm: never evicted, sent
    /// before routine readings.
    Upstream {
        /// Only `alerts` for now.
        #[serde(default = "alerts")]
        stream: String,
    },
    /// Disconnect the device and refuse its connections for `duration` or until an operator
    /// clears it (`wardgate quarantine clear`). Security profiles only.
    Quarantine {
        /// How long; `0s` is refused.
        #[serde(with = "humantime_serde")]
        duration: Duration,
    },
    /// Write a journal entry with `RULE=` and `DEVICE_ID=`.
    Journal {
        /// `emerg` … `debug` (syslog names); `warning` by default.
        #[serde(default = "warning")]
        priority: String,
    },
    /// POST the output (JSON) to a webhook, at least once across failures and restarts.
    Http {
        /// `http://` or `https://` URL; `${...}` templates allowed.
        url: String,
        /// How long one attempt may take (connect, send, answer).
        #[serde(default = "two_seconds", with = "humantime_serde")]
        timeout: Duration,
        /// Extra request headers (`Authorization = "Bearer ..."`); values may use templates.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        /// Given up (logged, counted) when not delivered this long after firing.
        #[serde(default = "one_day", with = "humantime_serde")]
        max_age: Duration,
        /// CA bundle that signed an `https` receiver's certificate (default: the system's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<PathBuf>,
    },
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}
fn one_day() -> Duration {
    Duration::from_secs(86_400)
}

fn one() -> u8 {
    1
}
fn alerts() -> String {
    "alerts".into()
}
fn warning() -> String {
    "warning".into()
}

/// One `[[devices]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device id: its MQTT client id (1–128 of `[a-zA-Z0-9:_-]`).
    pub id: String,
    /// Device kind, e.g. `pacemaker`, `glucose`, `bed-temperature`.
    pub kind: String,
    /// Plugin that normalises this device's payloads; defaults to the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// How the device proves who it is. Default: `password` when `password_hash` is set,
    /// `certificate` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    /// Argon2 hash (PHC string) of the device's MQTT password; make one with
    /// `wardgate hash-password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Topics this device may publish to, replacing `[policy] publish`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Filters this device may subscribe within, replacing `[policy] subscribe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
    /// Free text for operators (room, bed, serial number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Settings handed to the device's plugin (`device-setting` in the plugin contract).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

impl DeviceConfig {
    /// A device entry with just an id, a kind and a password hash.
    pub fn with_password(id: &str, kind: &str, password_hash: String) -> Self {
        Self {
            id: id.into(),
            kind: kind.into(),
            plugin: None,
            auth: None,
            password_hash: Some(password_hash),
            publish: None,
            subscribe: None,
            description: None,
            settings: BTreeMap::new(),
        }
    }

    /// The plugin this device's payloads go through.
    pub fn plugin(&self) -> &str {
        self.plugin.as_deref().unwrap_or(&self.kind)
    }

    /// How the device authenticates (explicit, or derived from its credentials).
    pub fn auth_mode(&self) -> AuthMode {
        self.auth.unwrap_or(if self.password_hash.is_some() {
            AuthMode::Password
        } else {
            AuthMode::Certificate
        })
    }
}

/// How a device proves its identity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A client certificate from the ward CA whose CN (or a SAN) is the device id; TLS listener
    /// only.
    Certificate,
    /// Client id + password (plain listener, or TLS without a client certificate).
    Password,
    /// Both a certificate and the password.
    Both,
}

/// `[upstream]`: AWS IoT Core over mutual TLS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Whether readings are forwarded upstream.
    pub enabled: bool,
    /// IoT Core endpoint host name (`xxxx-ats.iot.<region>.amazonaws.com`); also sent as SNI.
    pub endpoint: String,
    /// 8883 (MQTT over TLS) or 443 (with ALPN `x-amzn-mqtt-ca`).
    pub port: u16,
    /// CA bundle that signs the endpoint's certificate (Amazon Root CA 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The gateway's client certificate (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The gateway's private key (PEM); readable by the service user only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// ALPN protocols offered in the TLS handshake. Unset: `["x-amzn-mqtt-ca"]` on port 443
    /// (IoT Core requires it there), none otherwise. `[]` offers none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// Topic per stream (`[upstream.topics]`).
    pub topics: TopicsConfig,
    /// Largest upstream message, in bytes (readings are batched up to this; IoT Core: 128 KB).
    /// It is also the byte pacing's burst: a backlog drains at `max_bytes_per_second` minus
    /// this (see [`crate::uplink::pace`]).
    pub max_batch_bytes: usize,
    /// How often the uplink looks at the queue even without a wake-up. No reading waits for a
    /// batch to fill: it goes as soon as the quotas allow, with whatever piled up meanwhile.
    #[serde(with = "humantime_serde")]
    pub max_linger: Duration,
    /// Unacknowledged upstream publishes at once (IoT Core allows 100).
    pub max_inflight: u16,
    /// Publishes per second (IoT Core: 100 per connection).
    pub max_publishes_per_second: u32,
    /// Bytes per second (IoT Core: 512 KiB per connection).
    pub max_bytes_per_second: u64,
    /// Longest wait between reconnect attempts (backoff doubles from 1 s, with jitter).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Keep each device's classic shadow in step with its cloud copy (reported state up,
    /// cloud desired state down; [`crate::shadow::sync`]). Needs `topics.shadow` to be a shadow
    /// update topic naming `${device}`.
    pub sync_shadows: bool,
    /// Devices' shadow updates queued per second for the cloud, and shadow fetches sent per
    /// second: both take this much of `max_publishes_per_second` from the readings.
    pub shadow_updates_per_second: u32,
    /// Also send the reported state that readings make (`heart_rate`, ...) as shadow updates,
    /// each time it changes. Off by default: the readings already go up as telemetry, and
    /// mirroring them costs a publish per device turn, taken from the readings' quota. Off,
    /// those keys go up with the device's next own shadow update.
    pub sync_readings: bool,
}

impl UpstreamConfig {
    /// The ALPN protocols to offer: `alpn` when set, else IoT Core's on port 443.
    pub fn alpn_protocols(&self) -> Vec<Vec<u8>> {
        match &self.alpn {
            Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
            None if self.port == 443 => vec![b"x-amzn-mqtt-ca".to_vec()],
            None => Vec::new(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: String::new(),
            port: 8883,
            ca_file: None,
            cert_file: None,
            key_file: None,
            alpn: None,
            topics: TopicsConfig::default(),
            max_batch_bytes: 32 * 1024,
            max_linger: Duration::from_millis(200),
            max_inflight: 20,
            max_publishes_per_second: 100,
            max_bytes_per_second: 512 * 1024,
            max_backoff: Duration::from_secs(60),
            sync_shadows: true,
            shadow_updates_per_second: 10,
            sync_readings: false,
        }
    }
}

/// `[upstream.topics]`: the upstream topic of each stream. `${thing}` is `gateway.id` (the
/// gateway's thing name); `${device}` (shadow and defender only) is the device a record is
/// about, or the thing name for the gateway's own records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Batches of canonical readings.
    pub telemetry: String,
    /// Batches of alerts (rules that fired, security violations).
    pub alerts: String,
    /// Device shadow update documents, one per message.
    pub shadow: String,
    /// Device Defender metrics reports, one per message.
    pub defender: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            telemetry: "wardgate/${thing}/readings".into(),
            alerts: "wardgate/${thing}/alerts".into(),
            shadow: "$aws/things/${thing}/shadow/name/${device}/update".into(),
            defender: "$aws/things/${device}/defender/metrics/json".into(),
        }
    }
}

/// `[queue]`: the durable offline queue (used when `[upstream]` is enabled).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Most bytes of queued readings; above it routine readings are evicted oldest first
    /// (alarms and security records never are: once they alone fill it, further ones are
    /// refused and not acknowledged).
    pub max_bytes: u64,
    /// Routine readings older than this are evicted.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Shortest time between the starts of two group commits (bounds the disk's flush rate);
    /// readings arriving meanwhile share the next flush. A quiet ward's reading is flushed at
    /// once if the last flush started longer ago.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            commit_interval: Duration::from_millis(2),
        }
    }
}

/// `[dead_letter]`: the bound of the dead-letter store (`<state_dir>/dead-letter/`, one file
/// per UTC day), applied by removing whole day files, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Most bytes of day files; above it the oldest day files are removed (the day file in use
    /// is never removed, so a new dead letter is never dropped).
    pub max_bytes: u64,
    /// Day files whose every entry is older than this are removed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Most verbose level written.
    pub level: LogLevel,
    /// Where log records go.
    pub format: LogFormat,
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// Log destination.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// The journal when stderr is connected to it (`JOURNAL_STREAM`), text otherwise.
    #[default]
    Auto,
    /// Always the journal's native protocol.
    Journal,
    /// Always readable lines on stderr.
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped file documents the real defaults: it must parse to exactly them.
    #[test]
    fn shipped_file_equals_built_in_defaults() {
        let dir = std::env::temp_dir().join(format!("wardgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("wardgate.toml");
        std::fs::write(&f, DEFAULT_CONFIG_TOML).unwrap();
        let loaded = load(&LoadOptions {
            file: Some(f),
            ignore_env: true,
        })
        .expect("shipped config is valid");
        assert_eq!(loaded.config, Config::default());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The commented `[[rules]]` example of the shipped file is a valid rule as written.
    #[test]
    fn the_shipped_rule_example_is_valid() {
        let example = shipped_example("# [[rules]]").expect("rule example");
        let dir = std::env::temp_dir().join(format!("wardgate-cfg-rule-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("wardgate.toml");
        std::fs::write(&f, &example).unwrap();
        let loaded = load(&LoadOptions {
            file: Some(f),
            ignore_env: true,
        })
        .unwrap_or_else(|e| panic!("{e:?}\n{example}"));
        assert_eq!(loaded.config.rules.len(), 1);
        assert_eq!(loaded.config.rules[0].actions.len(), 4);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The commented `[[defender.profiles]]` example of the shipped file is valid as written.
    #[test]
    fn the_shipped_security_profile_example_is_valid() {
        let example = shipped_example("# [[defender.profiles]]").expect("profile example");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("wardgate.toml");
        std::fs::write(&f, &example).unwrap();
        let loaded = load(&LoadOptions {
            file: Some(f),
            ignore_env: true,
        })
        .unwrap_or_else(|e| panic!("{e:?}\n{example}"));
        let p = &loaded.config.defender.profiles;
        assert_eq!(
            (p.len(), p[0].behaviors.len(), p[0].actions.len()),
            (1, 2, 4)
        );
        assert_eq!(example_profile(), p[0]);
    }

    /// The gateway's own broker connections (the relay link's and the pipeline's) must fit.
    #[test]
    fn broker_connections_leave_room_for_a_device() {
        let dir = std::env::temp_dir().join(format!("wardgate-cfg-bc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("wardgate.toml");
        let load_with = |n: usize| {
            let text = DEFAULT_CONFIG_TOML
                .replace("max_connections = 512", &format!("max_connections = {n}"));
            std::fs::write(&f, text).unwrap();
            load(&LoadOptions {
                file: Some(f.clone()),
                ignore_env: true,
            })
        };
        let internal = crate::broker::RELAY_CONNECTIONS + 1;
        let refused = format!(
            "{:?}",
            load_with(internal).expect_err("no room for a device")
        );
        assert!(refused.contains("broker.max_connections"), "{refused}");
        assert!(load_with(internal + 1).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
