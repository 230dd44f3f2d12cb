//! Logging: the journal's native protocol when wardgate runs under systemd, readable lines on
//! stderr otherwise.
//!
//! Records are written with `log`'s key-values, fields first and message last:
//! `info!(device_id = id, peer:% = addr; "device connected")`. In the journal every key becomes
//! an upper-case field (`DEVICE_ID`, `PEER`, `LISTENER`, `PLUGIN`, ...) beside
//! `SYSLOG_IDENTIFIER=wardgate`, so `journalctl -u wardgate DEVICE_ID=pacemaker-01` works. On
//! stderr the same record reads `... INFO gatekeeper: device connected device_id=... peer=...`.
//!
//! What must stay true: ERROR means data was lost or an operator must act. The embedded
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
                let args = record.args();
                let r = Record::builder()
                    .args(*args)
                    .level(level)
                    .target(short_target(record.target()))
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .key_values(record.key_values())
                    .build();
                // Nothing sensible can be done if the journal refuses a record.
                let _ = j.journal_send(&r);
            }
            Sink::Text => {
                let line = format_text(level, record);
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
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
        record.args()
    );
    struct Fields<'a>(&'a mut String);
    impl<'kvs> log::kv::VisitSource<'kvs> for Fields<'_> {
        fn visit_pair(
            &mut self,
            key: log::kv::Key<'kvs>,
            value: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            let v = value.to_string();
            if v.is_empty() || v.contains(char::is_whitespace) || v.contains('"') {
                let _ = write!(self.0, " {key}={v:?}");
            } else {
                let _ = write!(self.0, " {key}={v}");
            }
            Ok(())
        }
    }
    let _ = record.key_values().visit(&mut Fields(&mut line));
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
}
