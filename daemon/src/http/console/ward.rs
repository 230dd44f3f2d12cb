//! What the console reads from the history and the dead-letter store: the overview's board (the
//! last hour of every device: latest reading per metric, alerts) and a device page's day (its
//! charts, alerts, violation events, dead letters). Each is one streaming pass, in memory that
//! does not grow with the rows, stopped at the budget it is given (then marked partial).

use super::{
    CHART_HEIGHT, CHART_WIDTH, DAY_MS, HOUR_MS, MAX_BOARD_DEVICES, MAX_BOARD_METRICS,
    MAX_CHART_METRICS, RECENT,
};
use crate::history::chart::{Chart, ChartSpec, Style};
use crate::history::{Filter, Row, RowKind};
use crate::pipeline::dead_letter::DeadLetter;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

/// A device's latest reading of one metric.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Last {
    pub(super) value: f64,
    pub(super) unit: String,
    pub(super) observed_ms: i64,
}

/// One device on the overview.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct DeviceBoard {
    pub(super) kind: String,
    /// Latest reading per metric.
    pub(super) last: BTreeMap<String, Last>,
    pub(super) alerts: u64,
    /// The latest alert: its rule and when.
    pub(super) last_alert: Option<(String, i64)>,
}

/// The overview's read of the last hour of history.
#[derive(Debug, Clone, Default)]
pub(super) struct Board {
    pub(super) devices: BTreeMap<String, DeviceBoard>,
    /// The last [`RECENT`] alerts, oldest first.
    pub(super) recent_alerts: VecDeque<Row>,
    /// The read stopped at [`SCAN_BUDGET`].
    pub(super) partial: bool,
    pub(super) error: Option<String>,
}

impl Board {
    /// Read the last hour of `dir` (observed from `now` − 1 h on; later ones too, for devices
    /// whose clocks are ahead).
    pub(super) fn scan(dir: &Path, now: i64, budget: Duration) -> Board {
        let mut board = Board::default();
        let rows = match crate::history::store::query(dir, Filter::between(now - HOUR_MS, i64::MAX))
        {
            Ok(q) => q,
            Err(e) => {
                board.error = Some(format!("the history cannot be read: {e}"));
                return board;
            }
        };
        let started = Instant::now();
        for (i, row) in rows.enumerate() {
            if i % 4096 == 4095 && started.elapsed() > budget {
                board.partial = true;
                break;
            }
            let row = match row {
                Ok(r) => r,
                Err(e) => {
                    board.error = Some(format!("the history could not be read to its end: {e}"));
                    break;
                }
            };
            board.take(row);
        }
        board
    }

    pub(super) fn take(&mut self, row: Row) {
        if !self.devices.contains_key(&row.device) && self.devices.len() >= MAX_BOARD_DEVICES {
            return;
        }
        let d = self.devices.entry(row.device.clone()).or_default();
        if d.kind.is_empty() {
            d.kind.clone_from(&row.kind);
        }
        match row.record {
            RowKind::Reading => {
                let Some(value) = row.value else { return };
                if let Some(last) = d.last.get_mut(&row.metric) {
                    if row.observed_ms >= last.observed_ms {
                        *last = Last {
                            value,
                            unit: row.unit,
                            observed_ms: row.observed_ms,
                        };
                    }
                } else if d.last.len() < MAX_BOARD_METRICS {
                    d.last.insert(
                        row.metric,
                        Last {
                            value,
                            unit: row.unit,
                            observed_ms: row.observed_ms,
                        },
                    );
                }
            }
            RowKind::Alert => {
                d.alerts += 1;
                if d.last_alert
                    .as_ref()
                    .is_none_or(|(_, at)| row.observed_ms >= *at)
                {
                    d.last_alert = Some((row.metric.clone(), row.observed_ms));
                }
                if self.recent_alerts.len() == RECENT {
                    self.recent_alerts.pop_front();
                }
                self.recent_alerts.push_back(row);
            }
            RowKind::Violation => {}
        }
    }
}

/// One metric's two charts (or why each is missing).
#[derive(Debug, Clone)]
pub(super) struct Charts {
    pub(super) metric: String,
    pub(super) hour: Result<String, String>,
    pub(super) day: Result<String, String>,
}

/// A device page's read of the last day.
#[derive(Debug, Clone, Default)]
pub(super) struct DevicePage {
    pub(super) kind: Option<String>,
    pub(super) charts: Vec<Charts>,
    /// Metrics beyond [`MAX_CHART_METRICS`].
    pub(super) other_metrics: BTreeSet<String>,
    pub(super) alerts: VecDeque<Row>,
    pub(super) alerts_total: u64,
    pub(super) violations: VecDeque<Row>,
    pub(super) dead_letters: VecDeque<DeadLetter>,
    pub(super) dead_letters_total: u64,
    pub(super) partial: bool,
    pub(super) error: Option<String>,
}

impl DevicePage {
    pub(super) fn scan(
        history: Option<&Path>,
        dead_letter_dir: &Path,
        device: &str,
        now: i64,
        budget: Duration,
    ) -> DevicePage {
        let started = Instant::now();
        let mut page = DevicePage::default();
        if let Some(dir) = history {
            page.scan_history(dir, device, now, budget);
        }
        page.scan_dead_letters(
            dead_letter_dir,
            device,
            now,
            budget.saturating_sub(started.elapsed()),
        );
        page
    }

    fn scan_history(&mut self, dir: &Path, device: &str, now: i64, budget: Duration) {
        let spec = |from_ms: i64, style: Style| ChartSpec {
            device: device.to_owned(),
            metric: String::new(),
            from_ms,
            to_ms: now,
            style,
            width: CHART_WIDTH,
            height: CHART_HEIGHT,
        };
        // Templates: they take every event, and each metric's charts start from them.
        let (Ok(mut hour), Ok(mut day)) = (
            Chart::new(spec(now - HOUR_MS, Style::Line)),
            Chart::new(spec(now - DAY_MS, Style::Bar)),
        ) else {
            self.error = Some("the charts cannot be set up".into());
            return;
        };
        let mut charts: Vec<(Chart, Chart)> = Vec::new();
        let filter = Filter {
            device: Some(device.to_owned()),
            ..Filter::between(now - DAY_MS, now)
        };
        let rows = match crate::history::store::query(dir, filter) {
            Ok(q) => q,
            Err(e) => {
                self.error = Some(format!("the history cannot be read: {e}"));
                return;
            }
        };
        let started = Instant::now();
        for (i, row) in rows.enumerate() {
            if i % 4096 == 4095 && started.elapsed() > budget {
                self.partial = true;
                break;
            }
            let row = match row {
                Ok(r) => r,
                Err(e) => {
                    self.error = Some(format!("the history could not be read to its end: {e}"));
                    break;
                }
            };
            if self.kind.is_none() && !row.kind.is_empty() {
                self.kind = Some(row.kind.clone());
            }
            match row.record {
                RowKind::Reading => {
                    let at = charts
                        .iter()
                        .position(|(h, _)| h.spec().metric == row.metric);
                    let at = match at {
                        Some(at) => at,
                        None if charts.len() < MAX_CHART_METRICS => {
                            charts
                                .push((hour.for_metric(&row.metric), day.for_metric(&row.metric)));
                            charts.len() - 1
                        }
                        None => {
                            if self.other_metrics.len() < 64 {
                                self.other_metrics.insert(row.metric.clone());
                            }
                            continue;
                        }
                    };
                    charts[at].0.push(&row);
                    charts[at].1.push(&row);
                }
                RowKind::Alert | RowKind::Violation => {
                    hour.push(&row);
                    day.push(&row);
                    for (h, d) in &mut charts {
                        h.push(&row);
                        d.push(&row);
                    }
                    let list = if row.record == RowKind::Alert {
                        self.alerts_total += 1;
                        &mut self.alerts
                    } else {
                        &mut self.violations
                    };
                    if list.len() == RECENT {
                        list.pop_front();
                    }
                    list.push_back(row);
                }
            }
        }
        self.charts = charts
            .into_iter()
            .map(|(h, d)| Charts {
                metric: h.spec().metric.clone(),
                hour: h.finish().map_err(|e| e.to_string()),
                day: d.finish().map_err(|e| e.to_string()),
            })
            .collect();
    }

    /// The device's dead letters of today and yesterday (UTC), the latest [`RECENT`] kept.
    fn scan_dead_letters(&mut self, dir: &Path, device: &str, now: i64, budget: Duration) {
        let started = Instant::now();
        // `"device_id":"<id>"` as serde_json writes it: lines of other devices are skipped
        // without parsing them.
        let needle = format!(
            "\"device_id\":{}",
            serde_json::to_string(device).unwrap_or_default()
        );
        for day_ms in [now - DAY_MS, now] {
            let day = DeadLetter::day_of(
                std::time::UNIX_EPOCH + Duration::from_millis(day_ms.max(0) as u64),
            );
            let Ok(f) = std::fs::File::open(dir.join(format!("{day}.jsonl"))) else {
                continue;
            };
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                if started.elapsed() > budget {
                    self.partial = true;
                    return;
                }
                if !line.contains(&needle) {
                    continue;
                }
                let Ok(d) = serde_json::from_str::<DeadLetter>(&line) else {
                    continue;
                };
                if d.device_id != device {
                    continue;
                }
                self.dead_letters_total += 1;
                if self.dead_letters.len() == RECENT {
                    self.dead_letters.pop_front();
                }
                self.dead_letters.push_back(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::console::tests::{row, MIN};

    #[test]
    fn the_board_keeps_the_latest_reading_and_counts_alerts() {
        let now = crate::clock::now_ms();
        let mut b = Board::default();
        b.take(row(
            "pm-01",
            RowKind::Reading,
            "heartbeat",
            Some(70.0),
            now - 2 * MIN,
        ));
        b.take(row(
            "pm-01",
            RowKind::Reading,
            "heartbeat",
            Some(71.5),
            now - MIN,
        ));
        // Received later, measured earlier: not the latest.
        b.take(row(
            "pm-01",
            RowKind::Reading,
            "heartbeat",
            Some(60.0),
            now - 3 * MIN,
        ));
        b.take(row("pm-01", RowKind::Alert, "tachycardia", None, now - MIN));
        for i in 0..(RECENT as i64 + 5) {
            b.take(row(
                "pm-02",
                RowKind::Alert,
                "tachycardia",
                None,
                now - 30 * MIN + i,
            ));
        }
        let d = &b.devices["pm-01"];
        assert_eq!(d.last["heartbeat"].value, 71.5);
        assert_eq!(d.alerts, 1);
        assert_eq!(b.devices["pm-02"].alerts, RECENT as u64 + 5);
        assert_eq!(b.recent_alerts.len(), RECENT, "bounded");
        assert_eq!(
            b.recent_alerts.back().unwrap().observed_ms,
            now - 30 * MIN + RECENT as i64 + 4
        );
    }
}
