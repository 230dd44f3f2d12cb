//! The console's HTML: the overview and the device pages, made from a status snapshot and what
//! [`super::ward`] read from the history. Every text from a device, a rule or the configuration
//! goes through [`esc`]; the markup is well-formed XML (the tests parse it), has no script and
//! no inline `style` attribute (the Content-Security-Policy allows only the stylesheet [`CSS`],
//! by its hash).

use super::ward::{Board, DevicePage};
use super::{
    active_violations, known_devices, quarantines, Console, MAX_DETAIL_CHARS, SCAN_BUDGET,
};
use crate::history::chart;
use crate::history::{Row, RowKind};
use crate::status::Status;
use std::collections::VecDeque;
use std::fmt::Write as _;

/// The console's stylesheet (the only thing the Content-Security-Policy allows, by hash).
pub(super) const CSS: &str = "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{background:#1f3a5f;color:#fff;padding:10px 20px}header a{color:#fff}header h1{font-size:20px;margin:0}\
header p{margin:2px 0 0;font-size:12px;color:#d0d9e6}main{padding:8px 20px 24px}\
h2{font-size:16px;margin:20px 0 6px}h3{font-size:15px;margin:16px 0 4px}\
table{border-collapse:collapse;background:#fff;width:100%;border:1px solid #dde1e6}\
th,td{border-bottom:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#eef1f4;font-weight:600}tr.alarm td{background:#fdecea}\
.ok{color:#1a7f37}.bad{color:#b42318;font-weight:600}.muted{color:#667085}\
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-top:8px}\
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:6px 12px;min-width:150px}\
.card b{display:block;font-size:12px;color:#667085;font-weight:600}\
figure{margin:6px 12px 6px 0;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:4px;display:inline-block;max-width:100%}\
figure svg{max-width:100%;height:auto}figcaption{font-size:12px;color:#667085;padding:2px 4px}\
.detail{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}";

impl Console {
    /// The overview page.
    pub(super) fn overview(
        &self,
        s: &Status,
        health: &crate::supervisor::Health,
        board: &Board,
        now: i64,
    ) -> String {
        let mut b = String::new();
        let devices = known_devices(&self.registry, s, Some(board));
        let active = active_violations(s);
        let quarantined = quarantines(s);
        let connected = s.devices.iter().filter(|d| d.connected).count();
        let alerts: u64 = board.devices.values().map(|d| d.alerts).sum();

        b.push_str("<div class=\"cards\">");
        card(
            &mut b,
            "Devices",
            &format!("{} ({connected} connected)", devices.len()),
            false,
        );
        card(&mut b, "Alerts, last hour", &alerts.to_string(), alerts > 0);
        card(
            &mut b,
            "Violations in alarm",
            &active.len().to_string(),
            !active.is_empty(),
        );
        card(
            &mut b,
            "Quarantined",
            &quarantined.len().to_string(),
            !quarantined.is_empty(),
        );
        let (health_text, health_bad) = if health.ok() {
            ("all stages running".to_owned(), false)
        } else if health.stopping {
            ("stopping".to_owned(), true)
        } else {
            (
                format!("not running: {}", health.unhealthy.join(", ")),
                true,
            )
        };
        card(&mut b, "Gateway", &health_text, health_bad);
        let (uplink, uplink_bad) = match &s.uplink {
            Some(u) if u.connected => (format!("connected to {}", u.endpoint), false),
            Some(u) => (format!("DISCONNECTED from {}", u.endpoint), true),
            None => ("off (upstream.enabled = false)".to_owned(), false),
        };
        card(&mut b, "Uplink", &uplink, uplink_bad);
        let queue = match &s.queue {
            Some(q) => format!(
                "{} records, {}, oldest {}",
                q.depth,
                bytes_words(q.bytes),
                seconds_words(q.oldest_age_s)
            ),
            None => "none (no upstream)".to_owned(),
        };
        card(
            &mut b,
            "Queue",
            &queue,
            s.queue.as_ref().is_some_and(|q| q.oldest_age_s > 300),
        );
        card(
            &mut b,
            "Dead letters",
            &format!(
                "{} since start; {} in the store",
                s.dead_letter.written,
                bytes_words(s.dead_letter.bytes)
            ),
            false,
        );
        let history = match (&self.history_dir, &s.history) {
            (None, _) => "off (history.enabled = false)".to_owned(),
            (Some(_), Some(h)) => {
                format!("{} rows since start, {}", h.written, bytes_words(h.bytes))
            }
            (Some(_), None) => "on".to_owned(),
        };
        card(&mut b, "History", &history, false);
        b.push_str("</div>");
        board_notes(&mut b, board.partial, board.error.as_deref());

        b.push_str("<h2>Devices</h2><table><thead><tr><th>Device</th><th>Kind</th><th>Connection</th><th>Last readings (last hour)</th><th>Alerts, last hour</th><th>Violations in alarm</th><th>Quarantine</th></tr></thead><tbody>");
        for id in &devices {
            let meter = s.devices.iter().find(|d| &d.device_id == id);
            let on_board = board.devices.get(id);
            let kind = self
                .registry
                .get(id)
                .map(String::as_str)
                .or(on_board.map(|d| d.kind.as_str()))
                .filter(|k| !k.is_empty())
                .unwrap_or("—");
            let dev_active: Vec<&crate::defender::ActiveViolation> = active
                .iter()
                .copied()
                .filter(|v| &v.thing_name == id)
                .collect();
            let quarantine = quarantined.iter().find(|q| &q.device_id == id);
            let alerts = on_board.map_or(0, |d| d.alerts);
            let alarm = alerts > 0 || !dev_active.is_empty() || quarantine.is_some();
            let _ = write!(
                b,
                "<tr{}><td><a href=\"/device/{}\">{}</a>{}</td><td>{}</td>",
                if alarm { " class=\"alarm\"" } else { "" },
                self.token(id),
                esc(id),
                if alarm {
                    " <span class=\"bad\">ALARM</span>"
                } else {
                    ""
                },
                esc(kind)
            );
            match meter {
                Some(m) if m.connected => b.push_str("<td class=\"ok\">connected</td>"),
                Some(_) => b.push_str("<td class=\"bad\">not connected</td>"),
                None => b.push_str("<td class=\"muted\">not seen since start</td>"),
            }
            b.push_str("<td>");
            match on_board.filter(|d| !d.last.is_empty()) {
                Some(d) => {
                    for (i, (metric, r)) in d.last.iter().take(3).enumerate() {
                        if i > 0 {
                            b.push_str("<br/>");
                        }
                        let _ = write!(
                            b,
                            "{} <b>{}</b> {} <span class=\"muted\">{}</span>",
                            esc(metric),
                            esc(&number(r.value)),
                            esc(&r.unit),
                            ago(now, r.observed_ms)
                        );
                    }
                    if d.last.len() > 3 {
                        let _ = write!(
                            b,
                            "<br/><span class=\"muted\">and {} more</span>",
                            d.last.len() - 3
                        );
                    }
                }
                None => b.push_str("<span class=\"muted\">none</span>"),
            }
            b.push_str("</td><td>");
            match on_board.and_then(|d| d.last_alert.as_ref().map(|a| (d.alerts, a))) {
                Some((n, (rule, at))) => {
                    let _ = write!(
                        b,
                        "<span class=\"bad\">{n}</span>, last: {} <span class=\"muted\">{}</span>",
                        esc(rule),
                        ago(now, *at)
                    );
                }
                None => b.push_str("<span class=\"muted\">none</span>"),
            }
            b.push_str("</td><td>");
            if dev_active.is_empty() {
                b.push_str("<span class=\"muted\">none</span>");
            }
            for (i, v) in dev_active.iter().enumerate() {
                if i > 0 {
                    b.push_str("<br/>");
                }
                let _ = write!(
                    b,
                    "<span class=\"bad\">{}</span> ({})",
                    esc(&v.behavior),
                    esc(&v.security_profile_name)
                );
            }
            b.push_str("</td><td>");
            match quarantine {
                Some(q) => {
                    let _ = write!(b, "<span class=\"bad\">until {}</span>", utc(q.until_ms));
                }
                None => b.push_str("<span class=\"muted\">no</span>"),
            }
            b.push_str("</td></tr>");
        }
        b.push_str("</tbody></table>");

        b.push_str("<h2>Alerts in the last hour</h2>");
        if board.recent_alerts.is_empty() {
            b.push_str("<p class=\"muted\">No edge rule fired in the last hour.</p>");
        } else {
            b.push_str("<table><thead><tr><th>When (UTC)</th><th>Device</th><th>Rule</th><th>Output</th></tr></thead><tbody>");
            for a in board.recent_alerts.iter().rev() {
                let _ = write!(
                    b,
                    "<tr class=\"alarm\"><td>{}</td><td><a href=\"/device/{}\">{}</a></td><td>{}</td><td class=\"detail\">{}</td></tr>",
                    utc(a.observed_ms),
                    self.token(&a.device),
                    esc(&a.device),
                    esc(&a.metric),
                    esc(&cut(&a.detail))
                );
            }
            b.push_str("</tbody></table>");
        }

        b.push_str("<h2>Violations in alarm</h2>");
        violations_table(&mut b, &active, |d| self.token(d));
        b.push_str("<h2>Quarantines</h2>");
        quarantine_table(&mut b, &quarantined, |d| self.token(d));

        if !s.rules.is_empty() {
            b.push_str("<h2>Edge rules (since start)</h2><table><thead><tr><th>Rule</th><th>Matched</th><th>Fired</th><th>Debounced</th><th>Action failures</th></tr></thead><tbody>");
            for r in &s.rules {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&r.name),
                    r.matched,
                    r.fired,
                    r.debounced,
                    r.action_failures
                );
            }
            b.push_str("</tbody></table>");
        }
        self.page(
            &format!("Ward console · {}", self.gateway_id),
            &format!("Ward console · {}", self.gateway_id),
            now,
            &b,
        )
    }

    /// A device's page.
    pub(super) fn device(&self, id: &str, s: &Status, page: &DevicePage, now: i64) -> String {
        let mut b = String::new();
        let meter = s.devices.iter().find(|d| d.device_id == id);
        let kind = self
            .registry
            .get(id)
            .cloned()
            .or_else(|| page.kind.clone())
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "—".into());
        let active: Vec<&crate::defender::ActiveViolation> = active_violations(s)
            .into_iter()
            .filter(|v| v.thing_name == id)
            .collect();
        let quarantined: Vec<&crate::defender::quarantine::Entry> = quarantines(s)
            .into_iter()
            .filter(|q| q.device_id == id)
            .collect();
        let pipeline = s.pipeline.iter().find(|p| p.device_id == id);

        b.push_str("<div class=\"cards\">");
        card(&mut b, "Kind", &kind, false);
        let (conn, bad) = match meter {
            Some(m) if m.connected => (
                format!(
                    "connected ({})",
                    m.listener.as_deref().unwrap_or("listener")
                ),
                false,
            ),
            Some(_) => ("not connected".to_owned(), true),
            None => ("not seen since start".to_owned(), false),
        };
        card(&mut b, "Connection", &conn, bad);
        card(
            &mut b,
            "Since start",
            &match pipeline {
                Some(p) => format!(
                    "messages {}, readings {}, dead letters {}",
                    p.messages, p.readings, p.dead_letters
                ),
                None => "no messages".to_owned(),
            },
            pipeline.is_some_and(|p| p.dead_letters > 0),
        );
        card(
            &mut b,
            "Alerts, last day",
            &page.alerts_total.to_string(),
            page.alerts_total > 0,
        );
        card(
            &mut b,
            "Violations in alarm",
            &active.len().to_string(),
            !active.is_empty(),
        );
        card(
            &mut b,
            "Quarantine",
            &match quarantined.first() {
                Some(q) => format!("until {}", utc(q.until_ms)),
                None => "no".to_owned(),
            },
            !quarantined.is_empty(),
        );
        b.push_str("</div>");
        board_notes(&mut b, page.partial, page.error.as_deref());
        if self.history_dir.is_none() {
            b.push_str("<p class=\"muted\">The history is off (history.enabled = false): no charts, alerts or violation events.</p>");
        }

        b.push_str("<h2>Readings</h2>");
        if page.charts.is_empty() && self.history_dir.is_some() {
            b.push_str("<p class=\"muted\">No readings in the last day.</p>");
        }
        for c in &page.charts {
            let _ = write!(b, "<h3>{}</h3>", esc(&c.metric));
            for (caption, svg) in [("last hour", &c.hour), ("last day, bars of means", &c.day)] {
                b.push_str("<figure>");
                match svg {
                    Ok(svg) => b.push_str(svg),
                    Err(e) => {
                        let _ = write!(b, "<p class=\"muted\">{}</p>", esc(e));
                    }
                }
                let _ = write!(
                    b,
                    "<figcaption>{} · {caption}</figcaption></figure>",
                    esc(&c.metric)
                );
            }
        }
        if !page.other_metrics.is_empty() {
            let names: Vec<String> = page.other_metrics.iter().map(|m| esc(m)).collect();
            let _ = write!(
                b,
                "<p class=\"muted\">Also measured (not charted here; use <code>wardgate chart</code>): {}</p>",
                names.join(", ")
            );
        }

        b.push_str("<h2>Violations in alarm</h2>");
        violations_table(&mut b, &active, |d| self.token(d));

        b.push_str("<h2>Alerts, last day</h2>");
        events_table(
            &mut b,
            &page.alerts,
            "Rule",
            "Output",
            "No edge rule fired on this device's messages in the last day.",
        );
        b.push_str("<h2>Violation events, last day</h2>");
        events_table(
            &mut b,
            &page.violations,
            "Metric",
            "Event",
            "No violation events in the last day.",
        );

        b.push_str("<h2>Dead letters, today and yesterday</h2>");
        if page.dead_letters.is_empty() {
            b.push_str("<p class=\"muted\">None.</p>");
        } else {
            let _ = write!(
                b,
                "<p class=\"muted\">{} in all; the latest {} (payloads are in the dead-letter store, not shown here).</p>",
                page.dead_letters_total,
                page.dead_letters.len()
            );
            b.push_str("<table><thead><tr><th>Stored (UTC)</th><th>Reason</th><th>Topic</th><th>Why</th></tr></thead><tbody>");
            for d in page.dead_letters.iter().rev() {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td class=\"detail\">{}</td><td class=\"detail\">{}</td></tr>",
                    utc(d.stored_at_ms),
                    esc(&d.reason_kind),
                    esc(&d.topic),
                    esc(&cut(&d.reason))
                );
            }
            b.push_str("</tbody></table>");
        }
        self.page(
            &format!("{id} · ward console"),
            &format!("{id} · {kind}"),
            now,
            &b,
        )
    }

    /// The page around `body`.
    fn page(&self, title: &str, heading: &str, now: i64, body: &str) -> String {
        let mut out = String::with_capacity(body.len() + 4096);
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>\
             <meta http-equiv=\"refresh\" content=\"{}\"/>\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\
             <meta name=\"referrer\" content=\"no-referrer\"/>\
             <title>{}</title><style>{CSS}</style></head><body>\
             <header><h1>{}</h1><p><a href=\"/\">Overview</a> · gateway {} · {} · reloads every {} s</p></header><main>",
            self.refresh_s,
            esc(title),
            esc(heading),
            esc(&self.gateway_id),
            utc(now),
            self.refresh_s
        );
        out.push_str(body);
        out.push_str("</main></body></html>\n");
        out
    }
}

fn violations_table(
    b: &mut String,
    active: &[&crate::defender::ActiveViolation],
    token: impl Fn(&str) -> String,
) {
    if active.is_empty() {
        b.push_str("<p class=\"muted\">None.</p>");
        return;
    }
    b.push_str("<table><thead><tr><th>Device</th><th>Security profile</th><th>Behavior</th><th>Metric</th><th>Since (UTC)</th></tr></thead><tbody>");
    for v in active {
        let _ = write!(
            b,
            "<tr class=\"alarm\"><td><a href=\"/device/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            token(&v.thing_name),
            esc(&v.thing_name),
            esc(&v.security_profile_name),
            esc(&v.behavior),
            esc(&v.metric),
            utc(v.since_ms)
        );
    }
    b.push_str("</tbody></table>");
}

fn quarantine_table(
    b: &mut String,
    list: &[&crate::defender::quarantine::Entry],
    token: impl Fn(&str) -> String,
) {
    if list.is_empty() {
        b.push_str("<p class=\"muted\">None.</p>");
        return;
    }
    b.push_str("<table><thead><tr><th>Device</th><th>Since (UTC)</th><th>Until (UTC)</th><th>Security profile</th><th>Behavior</th></tr></thead><tbody>");
    for q in list {
        let _ = write!(
            b,
            "<tr class=\"alarm\"><td><a href=\"/device/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            token(&q.device_id),
            esc(&q.device_id),
            utc(q.since_ms),
            utc(q.until_ms),
            esc(&q.security_profile),
            esc(&q.behavior)
        );
    }
    b.push_str("</tbody></table>");
}

/// Alerts or violation events, newest first.
fn events_table(b: &mut String, rows: &VecDeque<Row>, what: &str, detail: &str, none: &str) {
    if rows.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", esc(none));
        return;
    }
    let _ = write!(
        b,
        "<table><thead><tr><th>When (UTC)</th><th>{}</th><th>{}</th></tr></thead><tbody>",
        esc(what),
        esc(detail)
    );
    for r in rows.iter().rev() {
        let detail = match r.record {
            RowKind::Violation => {
                let mut d = r.quality.clone();
                if let Some(v) = r.value {
                    let _ = write!(d, ", value {}", number(v));
                }
                if !r.detail.is_empty() {
                    let _ = write!(d, ", {}", r.detail);
                }
                d
            }
            _ => r.detail.clone(),
        };
        let _ = write!(
            b,
            "<tr class=\"alarm\"><td>{}</td><td>{}</td><td class=\"detail\">{}</td></tr>",
            utc(r.observed_ms),
            esc(&r.metric),
            esc(&cut(&detail))
        );
    }
    b.push_str("</tbody></table>");
}

fn card(b: &mut String, title: &str, value: &str, bad: bool) {
    let _ = write!(
        b,
        "<div class=\"card\"><b>{}</b><span{}>{}</span></div>",
        esc(title),
        if bad { " class=\"bad\"" } else { "" },
        esc(value)
    );
}

fn board_notes(b: &mut String, partial: bool, error: Option<&str>) {
    if partial {
        let _ = write!(
            b,
            "<p class=\"bad\">The history was not read to its end within {} s: what is shown is partial.</p>",
            SCAN_BUDGET.as_secs()
        );
    }
    if let Some(e) = error {
        let _ = write!(b, "<p class=\"bad\">{}</p>", esc(e));
    }
}

/// The page a refused request gets: nothing of the ward.
pub(super) fn refused_page() -> String {
    message_page(
        "Authentication required",
        "This console asks for the user name and password set in the gateway's configuration \
         (http.console_user, http.console_password_hash).",
    )
}

/// A small page with a heading and a sentence (no refresh, nothing of the ward).
pub(super) fn message_page(title: &str, text: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>{0}</title>\
         <style>{CSS}</style></head><body><header><h1>{0}</h1></header><main><p>{1}</p>\
         <p><a href=\"/\">Overview</a></p></main></body></html>\n",
        esc(title),
        esc(text)
    )
}

/// HTML- (and XML-) escaped text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in XML; they carry nothing readable.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// At most [`MAX_DETAIL_CHARS`] characters of `s`.
fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// `YYYY-MM-DD HH:MM:SS`, UTC.
fn utc(ms: i64) -> String {
    chart::utc_seconds(ms)
}

/// `8 s ago`, `5 min ago`, `3 h ago`, `2 days ago`, `in the future`.
fn ago(now: i64, ms: i64) -> String {
    let s = (now - ms) / 1000;
    match s {
        s if s < -5 => "(clock ahead)".into(),
        s if s < 90 => format!("{} s ago", s.max(0)),
        s if s < 90 * 60 => format!("{} min ago", s / 60),
        s if s < 48 * 3600 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

fn seconds_words(s: u64) -> String {
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

fn bytes_words(b: u64) -> String {
    match b {
        b if b < 10 << 10 => format!("{b} B"),
        b if b < 10 << 20 => format!("{} KiB", b >> 10),
        b => format!("{} MiB", b >> 20),
    }
}

/// A reading's value: as written for whole numbers, else to two decimals.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::super::HOUR_MS;
    use super::*;
    use crate::http::console::tests::{console, health, parse, row, status, MIN};
    use crate::pipeline::dead_letter::DeadLetter;

    #[test]
    fn the_overview_lists_devices_alarms_and_escapes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let c = console(dir.path(), None);
        let now = crate::clock::now_ms();
        let mut b = Board::default();
        b.take(row(
            "pm-01",
            RowKind::Reading,
            "heartbeat",
            Some(150.0),
            now - MIN,
        ));
        b.take(row("pm-01", RowKind::Alert, "tachycardia", None, now - MIN));
        let page = c.overview(
            &status(&[("pm-01", true), ("pm-02", false)]),
            &health(),
            &b,
            now,
        );
        let text = parse(&page);
        for want in [
            "pm-01",
            "pm-02",
            "pacemaker",
            "connected",
            "not connected",
            "tachycardia",
            "heartbeat",
            "150",
            "msgs<x>",
            "DISCONNECTED from iot.example",
            "ALARM",
        ] {
            assert!(text.contains(want), "{want} missing: {text}");
        }
        assert!(page.contains(&format!("href=\"/device/{}\"", c.token("pm-01"))));
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"15\"/>"));
        assert!(page.contains("&lt;b&gt;"), "the alert's output is escaped");
        assert!(!page.contains("<script"), "no scripts");
        assert!(
            !page.contains("style=\""),
            "no inline styles (the CSP allows none)"
        );
    }

    #[test]
    fn a_device_page_has_its_charts_events_and_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let history = dir.path().join("history");
        let now = crate::clock::now_ms();
        let mut store =
            crate::history::store::Store::open(&history, crate::history::store::Bounds::default())
                .unwrap();
        let mut rows = Vec::new();
        for i in 0..300 {
            // From 20 h ago to 10 h ago.
            rows.push(row(
                "pm-01",
                RowKind::Reading,
                "heartbeat",
                Some(70.0 + (i % 9) as f64),
                now - 20 * HOUR_MS + i * 2 * MIN,
            ));
            rows.push(row(
                "pm-02",
                RowKind::Reading,
                "heartbeat",
                Some(99.0),
                now - i * MIN,
            ));
        }
        for i in 0..50 {
            rows.push(row(
                "pm-01",
                RowKind::Reading,
                "battery",
                Some(80.0),
                now - i * MIN,
            ));
        }
        rows.push(row(
            "pm-01",
            RowKind::Alert,
            "tachycardia",
            None,
            now - 10 * MIN,
        ));
        rows.push(row(
            "pm-01",
            RowKind::Violation,
            "aws:num-messages-sent",
            Some(12.0),
            now - 5 * MIN,
        ));
        store.append(&rows, now).unwrap();
        let dead = crate::pipeline::dead_letter::DeadLetters::new(dir.path());
        let letter = |device: &str| DeadLetter {
            stored_at_ms: now,
            received_at_ms: now,
            device_id: device.into(),
            kind: "pacemaker".into(),
            plugin: "pacemaker".into(),
            topic: format!("ward/{device}/telemetry"),
            reason_kind: "malformed".into(),
            reason: "expected value at line 1 <x>".into(),
            payload_base64: "bm90IGpzb24=".into(),
        };
        dead.write_group(&[letter("pm-01"), letter("pm-02"), letter("pm-01")]);

        let page = DevicePage::scan(Some(&history), dead.dir(), "pm-01", now, SCAN_BUDGET);
        assert_eq!(page.charts.len(), 2);
        let hb = page
            .charts
            .iter()
            .find(|c| c.metric == "heartbeat")
            .unwrap();
        // The last hour has none of pm-01's heartbeats.
        assert!(hb
            .hour
            .as_ref()
            .is_err_and(|e| e.contains("no heartbeat readings of pm-01")));
        assert!(hb.day.as_ref().is_ok());
        let bat = page.charts.iter().find(|c| c.metric == "battery").unwrap();
        assert!(bat.hour.is_ok() && bat.day.is_ok());
        assert_eq!(
            (page.alerts.len(), page.alerts_total, page.violations.len()),
            (1, 1, 1)
        );
        assert_eq!((page.dead_letters.len(), page.dead_letters_total), (2, 2));
        assert!(!page.partial && page.error.is_none());

        let c = console(dir.path(), None);
        let html = c.device("pm-01", &status(&[("pm-01", true)]), &page, now);
        let text = parse(&html);
        for want in [
            "pm-01",
            "heartbeat",
            "battery",
            "tachycardia",
            "in-alarm",
            "malformed",
            "ward/pm-01/telemetry",
            "no heartbeat readings of pm-01",
        ] {
            assert!(text.contains(want), "{want} missing: {text}");
        }
        assert_eq!(
            html.matches("<svg").count(),
            3,
            "the day's heartbeat and both battery charts"
        );
        assert!(!html.contains("bm90IGpzb24="), "payloads are not shown");
        assert!(html.contains("&lt;x&gt;"));
    }

    #[test]
    fn text_is_escaped_and_cut() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("a\u{1}b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_DETAIL_CHARS + 10);
        assert_eq!(cut(&long).chars().count(), MAX_DETAIL_CHARS + 1);
        assert_eq!(number(72.0), "72");
        assert_eq!(number(36.549), "36.55");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(ago(100_000, 40_000), "60 s ago");
    }
}
