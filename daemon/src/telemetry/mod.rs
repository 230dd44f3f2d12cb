//! Logging: the journal's native protocol when wardgate runs under systemd, readable lines on
//! stderr otherwise.
//!
//! Records are written with `log`'s key-values, fields first and message last:
//! `info!(device_id = id, peer:% = addr; "device connected")`. In the journal every key becomes
//! an upper-case field (`DEVICE_ID`, `PEER`, `LISTENER`, `PLUGIN`, ...) beside
//! `SYSLOG_IDENTIFIER=wardgate`, so `journalctl -u wardgate DEVICE_ID=pacemaker-01` works. On
//! stderr the same record reads `... INFO gatekeeper: device connected device_id=... peer=...`.
//!
//! What must stay true: ERROR means data was lost or an operator must act. Every field and
//! every message is written with its control characters escaped ([`escape_controls`]): values
//! such as topics and client ids come from devices, and a `\n` in one must not forge a line
//! of its own in a text log, nor a NUL or an escape sequence reach an operator's terminal. The embedded
//! broker's own records (target `rumqttd`, bridged from `tracing`, including its span
//! bookkeeping) are all written at TRACE: the gatekeeper already reports every connection
//! event with device and peer, and broker start-up failures surface through its readiness
//! probe, so rumqttd's lines only matter when debugging rumqttd itself.

use crate::config::{LogConfig, LogFormat};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The identifier every journal entry carries.
pub const SYSLOG_IDENTIFIER: &str = "wardgate";

static LEVEL: AtomicUsize = AtomicUsize::new(LevelFilter::Info as usize);

enum Sink {
    Journal(systemd_journal_logger::JournalLog),
    Text,
}

struct Logger {
    sink: Sink,
}

fn current_level() -> LevelFilter {
    match LEVEL.load(Ordering::Relaxed) {
        0 => LevelFilter::Off,
        1 => LevelFilter::Error,
        2 => LevelFilter::Warn,
        3 => LevelFilter::Info,
        4 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Records bridged from `tracing` by third-party crates: rumqttd's events and the span
/// bookkeeping (`tracing::span`) of rumqttd and rumqttc.
fn is_broker_target(target: &str) -> bool {
    target.starts_with("rumqttd") || target.starts_with("tracing::span")
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        let level = if is_broker_target(m.target()) {
            Level::Trace
        } else {
            m.level()
        };
        level <= current_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = if is_broker_target(record.target()) {
            Level::Trace
        } else {
            record.level()
        };
        match &self.sink {
            Sink::Journal(j) => {
                let message = escape_controls(&record.args().to_string()).into_owned();
                let fields = escaped_fields(record);
                // Nothing sensible can be done if the journal refuses a record.
                let _ = j.journal_send(
                    &Record::builder()
                        .args(format_args!("{message}"))
                        .level(level)
                        .target(short_target(record.target()))
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .key_values(&fields)
                        .build(),
                );
            }
            Sink::Text => {
                let line = format_text(level, record);
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// `s` with every control character (C0, DEL, C1) written as an escape (`\n`, `\r`, `\t`,
/// `\u{0}`, `\u{1b}`, ...): one record stays one line, and nothing a device sent can act on
/// a terminal.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    // Unicode's line and paragraph separators end a line in some viewers: escaped too.
    let unsafe_char = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A record's key-values as (key, escaped value) pairs.
fn escaped_fields(record: &Record) -> Vec<(String, String)> {
    struct Collect(Vec<(String, String)>);
    impl<'kvs> log::kv::VisitSource<'kvs> for Collect {
        fn visit_pair(
            &mut self,
            key: log::kv::Key<'kvs>,
            value: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            let v = value.to_string();
            self.0
                .push((key.to_string(), escape_controls(&v).into_owned()));
            Ok(())
        }
    }
    let mut c = Collect(Vec::new());
    let _ = record.key_values().visit(&mut c);
    c.0
}

fn short_target(target: &str) -> &str {
    target.strip_prefix("wardgate::").unwrap_or(target)
}

/// One stderr line: time, level, target, message, then `key=value` fields.
fn format_text(level: Level, record: &Record) -> String {
    use std::fmt::Write as _;
    let mut line = format!(
        "{} {:>5} {}: {}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now()),
        level,
        short_target(record.target()),
        escape_controls(&record.args().to_string())
    );
    for (key, v) in escaped_fields(record) {
        // Escaped already: quote values a reader could not tell apart otherwise.
        if v.is_empty() || v.contains(' ') || v.contains('"') {
            let _ = write!(line, " {key}=\"{}\"", v.replace('"', "\\\""));
        } else {
            let _ = write!(line, " {key}={v}");
        }
    }
    line.push('\n');
    line
}

/// Where [`init`] sent the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// systemd's journal.
    Journal,
    /// stderr text lines.
    Stderr,
}

/// Install the global logger. Call once, before anything logs.
pub fn init(cfg: &LogConfig) -> std::io::Result<Destination> {
    let journal = match cfg.format {
        LogFormat::Journal => true,
        LogFormat::Text => false,
        LogFormat::Auto => systemd_journal_logger::connected_to_journal(),
    };
    let sink = if journal {
        Sink::Journal(
            systemd_journal_logger::JournalLog::new()?
                .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned()),
        )
    } else {
        Sink::Text
    };
    set_level(cfg.level.into());
    log::set_boxed_logger(Box::new(Logger { sink }))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(if journal {
        Destination::Journal
    } else {
        Destination::Stderr
    })
}

/// Change the level at run time (config reload).
pub fn set_level(level: LevelFilter) {
    LEVEL.store(level as usize, Ordering::Relaxed);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_carry_fields_after_the_message() {
        let line = format_text(
            Level::Info,
            &Record::builder()
                .args(format_args!("device connected"))
                .target("wardgate::gatekeeper")
                .key_values(&[("device_id", "pm-1"), ("peer", "127.0.0.1:5")])
                .build(),
        );
        assert!(
            line.ends_with("INFO gatekeeper: device connected device_id=pm-1 peer=127.0.0.1:5\n"),
            "{line}"
        );
    }

    #[test]
    fn control_characters_never_reach_the_log_raw() {
        let line = format_text(
            Level::Warn,
            &Record::builder()
                .args(format_args!("publish to `ward/x\nFAKE ERROR` refused"))
                .target("wardgate::gatekeeper")
                .key_values(&[
                    ("topic", "ward/x\n2026 ERROR forged\u{0}\u{1b}[31m"),
                    ("note", "a \"quoted\" value"),
                ])
                .build(),
        );
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.ends_with('\n'));
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\n'),
            "{line:?}"
        );
        assert!(line.contains("`ward/x\\nFAKE ERROR`"), "{line}");
        assert!(
            line.contains(r#"topic="ward/x\n2026 ERROR forged\u{0}\u{1b}[31m""#),
            "{line}"
        );
        assert!(line.contains(r#"note="a \"quoted\" value""#), "{line}");
        assert_eq!(escape_controls("plain"), "plain");
    }
}

/// At most one journal line per key (a device) per interval, counting the lines held back:
/// a device that repeats a mistake many times a second must not flood the journal.
#[derive(Debug)]
pub struct LogLimiter {
    every: std::time::Duration,
    last:
        std::sync::Mutex<std::collections::HashMap<std::sync::Arc<str>, (std::time::Instant, u64)>>,
}

impl LogLimiter {
    /// One line per key per `every`.
    pub fn every(every: std::time::Duration) -> Self {
        Self {
            every,
            last: Default::default(),
        }
    }

    /// `Some(lines held back since the last one)` when a line for `key` may be written now.
    pub fn allow(&self, key: &std::sync::Arc<str>) -> Option<u64> {
        let mut m = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        match m.get_mut(key) {
            Some((last, suppressed)) if now.duration_since(*last) < self.every => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                m.insert(key.clone(), (now, 0));
                Some(0)
            }
        }
    }

    /// Forget `key`: its next line is written at once.
    pub fn forget(&self, key: &str) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}
