//! Live reload (SIGHUP, `systemctl reload wardgate`, `wardgate reload`): what a new
//! configuration changes, which of it applies to the running gateway and which needs a restart,
//! and the outcome the gateway records for `wardgate reload` to print.
//!
//! The two configurations are compared key by key: both are serialised and flattened into
//! dotted keys (`listeners.plain.address`; lists such as `devices` or `rules` are one key
//! each), so a setting added to the configuration is compared without anyone listing it here.
//! [`classify`] then sorts every changed key into *applied live* or *needs a restart*; a key it
//! does not name is live. What needs a restart is what the running process is built around:
//! the listeners' sockets, the state directory and the gateway's identity, the embedded broker,
//! the password-check pool, the metering windows (the defender's streaks are counted in them),
//! which stages exist at all (`upstream.enabled`, `defender.enabled`, webhooks), the plugin
//! engine's memory cap and directory, and the log's format and destination.
//!
//! What must stay true: a reload is all or nothing for what it applies — the new configuration
//! is validated whole (and its TLS files loaded) before anything changes, so a rejected one
//! leaves every running setting as it was; keys that need a restart are reported and keep
//! their running values; the outcome is written (`<state_dir>/reload.json`) after the reload
//! has finished, with a generation that only grows, so a waiting `wardgate reload` can tell its
//! own outcome from an older one.

use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The outcome of the last reload, in the state directory.
pub const OUTCOME_FILE: &str = "reload.json";

/// The configuration the gateway runs with, in the state directory (for `check-config`'s
/// comparison; owner-only, as it holds password hashes).
pub const RUNNING_FILE: &str = "running-config.json";

/// What one reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Counts reloads since the gateway started: 1 for the first.
    pub generation: u64,
    /// The gateway's process id (a new process starts again at generation 1).
    pub pid: u32,
    /// When it finished, RFC 3339.
    pub at: String,
    /// `applied` or `rejected`.
    pub outcome: String,
    /// Changed keys now in force.
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until a restart.
    pub needs_restart: Vec<String>,
    /// Why it was rejected (file, key and problem for each), or what failed while applying.
    pub problems: Vec<String>,
    /// A one-line summary, as in the journal.
    pub summary: String,
}

impl Outcome {
    /// A rejected reload: `problems` say why (file, key and problem for each).
    pub fn rejected(problems: Vec<String>) -> Self {
        Self {
            outcome: "rejected".into(),
            summary: format!(
                "rejected ({} problem{}); the running configuration stays in force",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            ),
            problems,
            ..Self::default()
        }
    }

    /// Whether the new configuration was taken.
    pub fn is_applied(&self) -> bool {
        self.outcome == "applied"
    }
}

/// Write `o` atomically to `<state_dir>/reload.json`.
pub fn write_outcome(state_dir: &Path, o: &Outcome) -> std::io::Result<()> {
    write_private(&state_dir.join(OUTCOME_FILE), o)
}

/// The last outcome, if one was written.
pub fn read_outcome(state_dir: &Path) -> Option<Outcome> {
    read_json(&state_dir.join(OUTCOME_FILE))
}

/// Record the configuration in force, for [`read_running`].
pub fn write_running(state_dir: &Path, c: &Config) -> std::io::Result<()> {
    write_private(&state_dir.join(RUNNING_FILE), c)
}

/// The configuration a running gateway last recorded, if any.
pub fn read_running(state_dir: &Path) -> Option<Config> {
    read_json(&state_dir.join(RUNNING_FILE))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Write `value` as JSON to `path` atomically (a temporary file renamed over it), owner-only.
fn write_private(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The keys whose values differ between `a` and `b`, sorted.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &serde_json::to_value(a).unwrap_or_default(), &mut fa);
    flatten("", &serde_json::to_value(b).unwrap_or_default(), &mut fb);
    let mut keys: Vec<String> = fa
        .keys()
        .chain(fb.keys())
        .filter(|k| fa.get(*k) != fb.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

/// Keys (or key prefixes, ending in `.`) that only a restart changes, with why.
const RESTART: &[(&str, &str)] = &[
    ("gateway.id", "the gateway's identity (client id, topics)"),
    ("gateway.state_dir", "where every store is open"),
    ("listeners.plain.", "a listening socket"),
    ("listeners.tls.enabled", "a listening socket"),
    ("listeners.tls.address", "a listening socket"),
    ("listeners.tls.min_version", "the listener's TLS versions"),
    ("listeners.connect_timeout", "the listeners' accept limits"),
    ("listeners.max_connections", "the listeners' accept limits"),
    (
        "listeners.max_connections_per_address",
        "the listeners' accept limits",
    ),
    ("broker.", "the embedded broker"),
    ("login.", "the password-check pool"),
    ("metering.", "the metering windows"),
    ("plugins.dir", "the plugin directory watched"),
    ("plugins.shipped_dir", "the plugin directory watched"),
    ("plugins.poll_interval", "the plugin directory watch"),
    (
        "plugins.max_memory_bytes",
        "the plugin engine's instance pool",
    ),
    ("upstream.enabled", "the queue and the uplink exist or not"),
    ("upstream.sync_shadows", "the shadow link to the cloud"),
    ("upstream.sync_readings", "the shadow link to the cloud"),
    (
        "upstream.shadow_updates_per_second",
        "the shadow link to the cloud",
    ),
    ("defender.enabled", "the defender stage exists or not"),
    ("defender.report_interval", "the defender's report schedule"),
    ("defender.report_names", "the defender's report format"),
    ("defender.history_events", "the defender's event store"),
    ("log.format", "the log's destination and format"),
    ("http.", "the HTTP endpoint's listening socket"),
    ("history.enabled", "the history stage exists or not"),
];

/// Sort `changed` keys into (applied live, needs a restart with why). `running` and `new` are
/// the two configurations (some keys apply live only within bounds the running process set).
pub fn classify(
    running: &Config,
    new: &Config,
    changed: &[String],
) -> (Vec<String>, Vec<(String, String)>) {
    let mut live = Vec::new();
    let mut restart = Vec::new();
    for key in changed {
        let fixed = RESTART.iter().find(|(k, _)| {
            if let Some(prefix) = k.strip_suffix('.') {
                key == prefix || key.starts_with(k)
            } else {
                key == k
            }
        });
        let why = match (fixed, key.as_str()) {
            (Some((_, why)), _) => Some((*why).to_owned()),
            (None, "upstream.topics.shadow") if running.upstream.sync_shadows =>
            {
                Some("the shadow link to the cloud follows this topic".to_owned())
            }
            // The broker was started with room for these; beyond it needs a new broker.
            (None, "limits.max_payload_bytes")
                if new.limits.max_payload_bytes > running.limits.max_payload_bytes =>
            {
                Some(format!(
                    "the embedded broker was started for payloads of at most {} bytes (a lower limit applies live)",
                    running.limits.max_payload_bytes
                ))
            }
            (None, "limits.max_inflight") if new.limits.max_inflight > running.limits.max_inflight => {
                Some(format!(
                    "the embedded broker was started for {} publishes in flight (a lower limit applies live)",
                    running.limits.max_inflight
                ))
            }
            (None, "rules")
                if crate::rules::wants_webhooks(&new.rules)
                    && !crate::rules::wants_webhooks(&running.rules) =>
            {
                Some("a rule's `http` action needs the webhook outbox, opened at start (the other rules apply live)".to_owned())
            }
            _ => None,
        };
        match why {
            Some(w) => restart.push((key.clone(), w)),
            None => live.push(key.clone()),
        }
    }
    (live, restart)
}

/// `key (why)` for each key that needs a restart, joined for a journal line.
pub fn describe_restart(restart: &[(String, String)]) -> String {
    restart
        .iter()
        .map(|(k, why)| format!("{k} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_dotted_and_lists_are_one_key() {
        let a = Config::default();
        let mut b = a.clone();
        b.listeners.plain.address = "127.0.0.1:1999".parse().unwrap();
        b.queue.max_bytes = 1 << 20;
        b.policy.publish.push("extra/#".into());
        assert_eq!(
            changed_keys(&a, &b),
            [
                "listeners.plain.address",
                "policy.publish",
                "queue.max_bytes"
            ]
        );
        assert!(changed_keys(&a, &a.clone()).is_empty());
    }

    #[test]
    fn what_the_process_is_built_around_needs_a_restart() {
        let a = Config::default();
        let mut b = a.clone();
        b.listeners.plain.address = "127.0.0.1:1999".parse().unwrap();
        b.broker.max_connections += 1;
        b.queue.max_bytes = 1 << 20;
        b.limits.max_topic_levels = 4;
        b.limits.max_payload_bytes = a.limits.max_payload_bytes / 2;
        b.plugins.call_deadline *= 2;
        b.plugins.max_memory_bytes *= 2;
        let changed = changed_keys(&a, &b);
        let (live, restart) = classify(&a, &b, &changed);
        assert_eq!(
            live,
            [
                "limits.max_payload_bytes",
                "limits.max_topic_levels",
                "plugins.call_deadline",
                "queue.max_bytes"
            ]
        );
        let keys: Vec<&str> = restart.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "broker.max_connections",
                "listeners.plain.address",
                "plugins.max_memory_bytes"
            ]
        );
        // Raising a limit the broker was sized by needs a restart; lowering it does not.
        let mut c = a.clone();
        c.limits.max_payload_bytes = a.limits.max_payload_bytes * 2;
        let (live, restart) = classify(&a, &c, &changed_keys(&a, &c));
        assert!(live.is_empty());
        assert!(restart[0].1.contains("embedded broker"), "{restart:?}");
    }

    #[test]
    fn outcome_round_trips_through_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_outcome(dir.path()), None);
        let o = Outcome {
            generation: 3,
            pid: 42,
            outcome: "applied".into(),
            applied: vec!["rules".into()],
            ..Outcome::default()
        };
        write_outcome(dir.path(), &o).unwrap();
        assert_eq!(read_outcome(dir.path()), Some(o));
        let c = Config::default();
        write_running(dir.path(), &c).unwrap();
        assert_eq!(read_running(dir.path()), Some(c));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(RUNNING_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "owner-only");
    }
}
