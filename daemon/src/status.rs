//! The status file: `<state_dir>/status.json`, rewritten every `metering.status_interval` and
//! at stop, read by `wardgate status`.
//!
//! A file (not a socket) because it needs no extra listener, survives the daemon for post-mortem
//! reading, and is easy to collect by monitoring tools. It is written to a temporary file and
//! renamed, so a reader never sees half of it.
//!
//! It shows every supervised stage ([`crate::supervisor`]): running, stalled, restarting,
//! failed or stopped, its policy, how often it was restarted and its last failure. The file
//! written at stop keeps that, so a daemon that exited because a stage failed says which.

use crate::metering::{DeviceSnapshot, GatewayCountersSnapshot};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const STATUS_FILE: &str = "status.json";
/// PID file name inside the state directory (used by `wardgate reload`).
pub const PID_FILE: &str = "wardgate.pid";

/// One listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// `plain` or `tls`.
    pub name: String,
    /// Bound address.
    pub address: String,
}

/// Everything `wardgate status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Thing name.
    pub gateway_id: String,
    /// wardgate version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// Start time, RFC 3339.
    pub started_at: String,
    /// Time of this snapshot, RFC 3339.
    pub updated_at: String,
    /// Whether the daemon was running when it wrote this (false in the file left at stop).
    pub running: bool,
    /// Device listeners.
    pub listeners: Vec<ListenerStatus>,
    /// Readings the pipeline handled since start.
    pub readings: u64,
    /// Gateway-wide counters.
    pub gateway: GatewayCountersSnapshot,
    /// Password checks and logins turned away.
    #[serde(default)]
    pub login: crate::gatekeeper::login::LoginCountersSnapshot,
    /// Per-device meters.
    pub devices: Vec<DeviceSnapshot>,
    /// Loaded plugins.
    #[serde(default)]
    pub plugins: Vec<crate::plugin_host::PluginStatus>,
    /// Per-device pipeline results since start: readings made, messages dead-lettered.
    #[serde(default)]
    pub pipeline: Vec<PipelineDevice>,
    /// The offline queue (when the upstream is enabled).
    #[serde(default)]
    pub queue: Option<crate::queue::QueueStatus>,
    /// The dead-letter store: its size and what its bound removed.
    #[serde(default)]
    pub dead_letter: crate::pipeline::dead_letter::DeadLetterStatus,
    /// The uplink (when the upstream is enabled).
    #[serde(default)]
    pub uplink: Option<UplinkStatus>,
    /// Every supervised stage: state, policy, restarts, last failure.
    #[serde(default)]
    pub stages: Vec<crate::supervisor::StageStatus>,
    /// The shadow service's counters.
    #[serde(default)]
    pub shadows: crate::shadow::ShadowCounts,
    /// Every edge rule's counters, in configuration order.
    #[serde(default)]
    pub rules: Vec<crate::rules::RuleCounts>,
    /// The rules' webhook receivers, per origin.
    #[serde(default)]
    pub webhooks: Vec<crate::rules::webhook::WebhookCounts>,
    /// The defender (when enabled): reports, violations, quarantines.
    #[serde(default)]
    pub defender: Option<crate::defender::DefenderStatus>,
    /// Where `/healthz` and `/metrics` are served (`[http]`), when enabled.
    #[serde(default)]
    pub http: Option<String>,
    /// Whether that endpoint serves HTTPS (`http.tls`).
    #[serde(default)]
    pub http_tls: bool,
    /// The ward history (`[history]`), when enabled.
    #[serde(default)]
    pub history: Option<crate::history::HistoryStatus>,
}

/// The uplink at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkStatus {
    /// Endpoint host.
    pub endpoint: String,
    /// Session up.
    pub connected: bool,
    /// Upstream messages acknowledged since start.
    pub batches_acked: u64,
    /// Records delivered (removed from the queue) since start.
    pub records_delivered: u64,
    /// Of those, per stream: telemetry, alerts, shadow, defender.
    #[serde(default)]
    pub delivered_by_stream: std::collections::BTreeMap<String, u64>,
    /// Connection failures since start.
    pub connection_errors: u64,
    /// Sessions established since start.
    #[serde(default)]
    pub connects: u64,
    /// PUBLISH packets handed to the upstream connection since start.
    #[serde(default)]
    pub publishes: u64,
    /// Their payload bytes.
    #[serde(default)]
    pub publish_bytes: u64,
}

/// Pipeline results of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineDevice {
    /// Device id.
    pub device_id: String,
    /// Messages handled.
    pub messages: u64,
    /// Canonical readings produced.
    pub readings: u64,
    /// Messages handed to the dead-letter store.
    pub dead_letters: u64,
}

/// Path of the status file.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATUS_FILE)
}

/// Write `status` atomically.
pub fn write(state_dir: &Path, status: &Status) -> std::io::Result<()> {
    let path = status_path(state_dir);
    let tmp = state_dir.join(format!(".{STATUS_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Read the status file.
pub fn read(state_dir: &Path) -> Result<Status, String> {
    let path = status_path(state_dir);
    let text = std::fs::read(&path).map_err(|e| {
        format!(
            "cannot read {}: {e}; is wardgate running with this gateway.state_dir?",
            path.display()
        )
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a status file: {e}", path.display()))
}

/// A human-readable view.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gateway {} (wardgate {}, pid {}) {} since {}; snapshot {}",
        s.gateway_id,
        s.version,
        s.pid,
        if s.running { "running" } else { "stopped" },
        s.started_at,
        s.updated_at
    );
    for l in &s.listeners {
        let _ = writeln!(out, "listener {:<6} {}", l.name, l.address);
    }
    if let Some(a) = &s.http {
        let scheme = if s.http_tls { "https" } else { "http" };
        let _ = writeln!(
            out,
            "http            {scheme}://{a}/healthz  {scheme}://{a}/metrics"
        );
    }
    for st in &s.stages {
        let _ = write!(
            out,
            "stage {:<14} {:<10} ({} policy)",
            st.name,
            st.state.name(),
            st.policy.name()
        );
        if st.restarts > 0 {
            let _ = write!(out, "; restarted {} times", st.restarts);
        }
        if let Some(why) = &st.last_failure {
            let _ = write!(
                out,
                "; last failure {}: {why}",
                st.last_failure_at.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "readings {}; unknown-device attempts {}; TLS handshake failures {}; closed before CONNECT {}; over connection limits {}",
        s.readings,
        s.gateway.unknown_device_attempts,
        s.gateway.tls_handshake_failures,
        s.gateway.connections_closed_before_connect,
        s.gateway.connections_over_limit
    );
    let _ = writeln!(
        out,
        "logins: argon2 checks {}; answered by the credential cache {}; turned away (server unavailable): {} over the in-progress bounds, {} over the per-second bounds",
        s.login.checks, s.login.cache_hits, s.login.refused_pending, s.login.refused_rate
    );
    let _ = writeln!(
        out,
        "\n{:<24} {:<5} {:>9} {:>9} {:>11} {:>11} {:>9} {:>7} {:>9} {:>7}  peer",
        "device",
        "conn",
        "msgs in",
        "msgs out",
        "bytes in",
        "bytes out",
        "largest",
        "authz!",
        "attempts",
        "discon"
    );
    for d in &s.devices {
        let c = &d.current.counters;
        let _ = writeln!(
            out,
            "{:<24} {:<5} {:>9} {:>9} {:>11} {:>11} {:>9} {:>7} {:>9} {:>7}  {}",
            d.device_id,
            if d.connected { "yes" } else { "no" },
            c.messages_sent,
            c.messages_received,
            c.bytes_in,
            c.bytes_out,
            c.largest_message_bytes,
            c.authorization_failures,
            c.connection_attempts,
            c.disconnects,
            d.peer.map(|p| p.to_string()).unwrap_or_default()
        );
    }
    let sh = &s.shadows;
    let _ = writeln!(
        out,
        "shadows: {} requests accepted, {} rejected ({} with 429, too many in flight); {} reported-state updates from readings; {} updates queued for the cloud; {} store write failures",
        sh.accepted, sh.rejected, sh.too_many, sh.reports, sh.synced, sh.store_errors
    );
    for r in &s.rules {
        let _ = writeln!(
            out,
            "rule {:<24} matched {:>9}  fired {:>7}  debounced {:>7}  action failures {:>5}  loops stopped {:>4}",
            r.name, r.matched, r.fired, r.debounced, r.action_failures, r.loops_stopped
        );
    }
    if let Some(d) = &s.defender {
        let _ = writeln!(
            out,
            "defender: {} security profiles; device reports {} accepted, {} rejected; own reports {}; {} evaluations; events: {} in-alarm, {} cleared, {} invalidated; {} quarantines; {} action failures",
            d.profiles, d.reports_accepted, d.reports_rejected, d.own_reports, d.evaluations,
            d.events[0], d.events[1], d.events[2], d.quarantines, d.action_failures
        );
        out.push_str(&crate::defender::render_active(d));
        out.push_str(&crate::defender::render_quarantined(d));
    }
    for w in &s.webhooks {
        let _ = writeln!(
            out,
            "webhook {:<32} pending {:>6}  delivered {:>7}  failed attempts {:>5}  given up {:>4}{}",
            w.origin,
            w.pending,
            w.delivered,
            w.failed_attempts,
            w.dropped,
            w.last_error
                .as_deref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(u) = &s.uplink {
        let _ = writeln!(
            out,
            "upstream {} {}; {} records delivered in {} messages ({}); {} connection errors",
            u.endpoint,
            if u.connected {
                "connected"
            } else {
                "DISCONNECTED"
            },
            u.records_delivered,
            u.batches_acked,
            u.delivered_by_stream
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            u.connection_errors
        );
    }
    if let Some(q) = &s.queue {
        let _ = writeln!(
            out,
            "queue {} records, {} bytes, oldest {} s; evicted {} (over bytes) + {} (over age) routine records; {} undeliverable set aside; {} alarm/security records refused (queue full of them)",
            q.depth, q.bytes, q.oldest_age_s, q.evicted_over_bytes, q.evicted_over_age, q.undeliverable, q.refused_full
        );
    }
    if !s.plugins.is_empty() {
        let _ = writeln!(out);
        for p in &s.plugins {
            let _ = writeln!(
                out,
                "plugin {:<20} {:<10} sha256 {}  calls {}, failed {}, mean {:.0} µs{}",
                p.name,
                p.version,
                &p.digest[..16.min(p.digest.len())],
                p.calls.calls,
                p.calls.failures.values().sum::<u64>(),
                match p.calls.duration.count() {
                    0 => 0.0,
                    n => p.calls.duration.sum_s * 1e6 / n as f64,
                },
                match p.contained.len() {
                    0 => String::new(),
                    n => format!("  {n} device(s) CONTAINED"),
                }
            );
            for c in &p.contained {
                let _ = writeln!(
                    out,
                    "  contained {:<24} since {} after {} traps in a row; last: {}",
                    c.device_id, c.since, c.traps, c.reason
                );
            }
        }
        if s.plugins.iter().any(|p| !p.contained.is_empty()) {
            let _ = writeln!(
                out,
                "  (contained devices' messages go to the dead-letter store; `wardgate reload` lifts containment)"
            );
        }
    }
    let dl = &s.dead_letter;
    let _ = writeln!(
        out,
        "dead-letter store {} day files, {} bytes; {} written since start ({} failed writes, {} refused while the writer was behind: not acknowledged); removed by dead_letter.max_bytes/max_age: {} files, {} messages, {} bytes",
        dl.files, dl.bytes, dl.written, dl.failed, dl.refused_busy, dl.removed_files, dl.removed_entries, dl.removed_bytes
    );
    if let Some(h) = &s.history {
        let _ = writeln!(
            out,
            "history {} bytes; {} rows written since start; dropped: {} while the writer was behind, {} by history.max_bytes, {} by history.max_age; {} rows lost in {} failed writes",
            h.bytes, h.written, h.dropped_busy, h.dropped_over_bytes, h.dropped_over_age, h.lost_rows, h.write_failures
        );
    }
    let dead: Vec<&PipelineDevice> = s.pipeline.iter().filter(|d| d.dead_letters > 0).collect();
    if !dead.is_empty() {
        let _ = writeln!(out);
        for d in dead {
            let _ = writeln!(
                out,
                "dead letters {:<24} {} of {} messages (see <state_dir>/dead-letter/)",
                d.device_id, d.dead_letters, d.messages
            );
        }
    }
    let _ = writeln!(
        out,
        "\n(counters are for the current {}-second window; `--json` shows totals and past windows)",
        s.devices.first().map(|d| d.current.length_s).unwrap_or(300)
    );
    out
}
