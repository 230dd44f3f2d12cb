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
    /// The embedded MQTT broker behind the gatekeeper.
    pub broker: BrokerConfig,
    /// The device registry: who may connect, and what kind of device it is.
    pub devices: Vec<DeviceConfig>,
    /// Forwarding to AWS IoT Core.
    pub upstream: UpstreamConfig,
    /// Logging.
    pub log: LogConfig,
}

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
    /// Plain-TCP MQTT listener for devices that authenticate with a password.
    pub plain: PlainListenerConfig,
    /// Time a new connection has to send its MQTT CONNECT before it is closed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most device connections open at once on one listener; more are closed on accept.
    pub max_connections: usize,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        Self {
            plain: PlainListenerConfig::default(),
            connect_timeout: Duration::from_secs(10),
            max_connections: 1024,
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
    /// Most connections the broker accepts (the gatekeeper opens one per device).
    pub max_connections: usize,
    /// Largest MQTT payload accepted, in bytes (AWS IoT Core: 128 KB).
    pub max_payload_bytes: usize,
    /// Unacknowledged QoS 1 messages per connection.
    pub max_inflight: usize,
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
            max_payload_bytes: 128 * 1024,
            max_inflight: 100,
            max_segment_bytes: 1024 * 1024,
            max_segment_count: 4,
            max_outgoing_packets: 200,
        }
    }
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
    /// Argon2 hash (PHC string) of the device's MQTT password; make one with
    /// `wardgate hash-password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Free text for operators (room, bed, serial number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl DeviceConfig {
    /// The plugin this device's payloads go through.
    pub fn plugin(&self) -> &str {
        self.plugin.as_deref().unwrap_or(&self.kind)
    }
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
}
