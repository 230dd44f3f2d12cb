//! Charts of the ward history as SVG: one device's metric over a time range, as a line or as
//! bars of bucket means, with the device's alerts and Device Defender violations marked where
//! they happened (`wardgate chart`, and the console's device pages inline).
//!
//! A chart is drawn from a stream of [`Row`]s (a [`store::query`](super::store::query) with
//! `with_events`), fed to a [`Chart`] one at a time, so one pass over the history can feed
//! several charts (the console draws the last hour and the last day of every metric from a
//! single read). Memory does not grow with the rows, only with the picture:
//! - **line**: readings are kept per pixel column of the plot (at most [`MAX_WIDTH`]
//!   columns) as their count, minimum and maximum with their times; the line joins each
//!   column's minimum and maximum in time order, so a spike inside a column is still drawn and
//!   there are at most two points per column. The line breaks where readings stop for much
//!   longer than their usual spacing (a device that was offline shows as a gap, not a slope).
//! - **bar**: readings are averaged into time buckets of a round length (1 s … 1 day) chosen so
//!   that the range has at most [`MAX_BARS`] of them (30–60 for most ranges), aligned to UTC,
//!   as `resample(...).mean().plot.bar()` does in pandas; an empty bucket has no bar.
//! - **events**: alerts, violations in alarm and violations cleared or invalidated are marked
//!   per pixel column (a vertical line and a symbol at the top, one per kind and column), so a
//!   rule firing every second for a day is as cheap to draw as one firing once.
//!
//! Text: plotters is built without a font feature. Its SVG backend writes labels as `<text>`
//! elements that whoever displays the SVG lays out with its own `sans-serif` font; plotters only
//! needs an estimate of the text size for the margins, which its built-in estimator gives. So
//! nothing is read from the system at run time (no fontconfig, no font file), and no font is
//! embedded in the binary: the `ab_glyph` feature with an embedded DejaVu Sans would add ~700 KB
//! and only make the margin estimates a little better for a picture a browser renders anyway.
//!
//! Times are UTC: labels are `HH:MM:SS` for ranges up to 10 minutes, `HH:MM` up to 36 hours
//! (the dates are in the axis title), `MM-DD HH:MM` beyond.
//!
//! What must stay true: a chart never holds more than a fixed number of entries per pixel
//! column whatever the number of rows; rows of another device, of another metric (readings),
//! or outside the range are ignored, so any superset of the wanted rows gives the same chart;
//! a range without a reading of the metric is an error ([`ChartError::NoReadings`]) that says
//! so in words, never an empty picture.

use super::{Row, RowKind};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use std::ops::Range;

/// Narrowest chart, in pixels.
pub const MIN_WIDTH: u32 = 240;
/// Widest chart, in pixels (bounds the per-column memory).
pub const MAX_WIDTH: u32 = 4096;
/// Lowest chart, in pixels.
pub const MIN_HEIGHT: u32 = 160;
/// Highest chart, in pixels.
pub const MAX_HEIGHT: u32 = 4096;
/// Most bars of a bar chart.
pub const MAX_BARS: i64 = 60;

/// Colour of the readings (matplotlib's first colour, as pandas draws a series).
pub const SERIES_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// Colour of alert marks.
pub const ALERT_COLOR: RGBColor = RGBColor(0xd6, 0x27, 0x28);
/// Colour of marks of violations going into alarm.
pub const VIOLATION_COLOR: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
/// Colour of marks of violations cleared or invalidated.
pub const CLEARED_COLOR: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);

/// Space around the plot, in pixels.
const MARGIN: u32 = 12;
/// Space for the y labels and the unit.
const Y_LABEL_AREA: u32 = 64;
/// Space for the x labels and the time axis title.
const X_LABEL_AREA: u32 = 44;
/// A pause longer than this many times the mean spacing of the readings breaks the line.
const GAP_FACTOR: i64 = 5;
/// Round durations, in ms: time axis steps and bar buckets.
const NICE_STEPS_MS: [i64; 22] = [
    1_000,
    2_000,
    5_000,
    10_000,
    15_000,
    30_000,
    60_000,
    2 * 60_000,
    5 * 60_000,
    10 * 60_000,
    15 * 60_000,
    30 * 60_000,
    3_600_000,
    2 * 3_600_000,
    3 * 3_600_000,
    6 * 3_600_000,
    12 * 3_600_000,
    86_400_000,
    2 * 86_400_000,
    7 * 86_400_000,
    14 * 86_400_000,
    28 * 86_400_000,
];

/// How the readings are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Style {
    /// Readings joined by a line (at most two points per pixel column: its min and max).
    Line,
    /// Bars of the mean of the readings in round time buckets (30–60 of them).
    Bar,
}

/// What to draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartSpec {
    /// The device.
    pub device: String,
    /// The reading's metric.
    pub metric: String,
    /// Start of the range (observed time, ms since the epoch, inclusive).
    pub from_ms: i64,
    /// End of the range (inclusive).
    pub to_ms: i64,
    /// Line or bars.
    pub style: Style,
    /// Width of the picture in pixels ([`MIN_WIDTH`]..=[`MAX_WIDTH`]).
    pub width: u32,
    /// Height in pixels ([`MIN_HEIGHT`]..=[`MAX_HEIGHT`]).
    pub height: u32,
}

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// Nothing to draw.
    #[error("no {metric} readings of {device} between {from} and {to} (UTC)")]
    NoReadings {
        /// The device.
        device: String,
        /// The metric.
        metric: String,
        /// Start of the range, readable.
        from: String,
        /// End of the range, readable.
        to: String,
    },
    /// The range ends before it starts.
    #[error("the time range is empty: it ends ({to}) before it starts ({from})")]
    EmptyRange {
        /// Start, readable.
        from: String,
        /// End, readable.
        to: String,
    },
    /// A picture too small to hold a plot, or larger than the bound.
    #[error(
        "a chart of {width}x{height} pixels cannot be drawn: the width must be {MIN_WIDTH}-{MAX_WIDTH} and the height {MIN_HEIGHT}-{MAX_HEIGHT}"
    )]
    Size {
        /// Asked width.
        width: u32,
        /// Asked height.
        height: u32,
    },
    /// plotters failed (a bug: every input is checked before drawing).
    #[error("cannot draw the chart: {0}")]
    Draw(String),
}

/// Draw `spec` from `rows` (any superset of the device's readings of the metric and its
/// events in the range: the others are ignored).
pub fn render_svg(spec: &ChartSpec, rows: impl Iterator<Item = Row>) -> Result<String, ChartError> {
    let mut chart = Chart::new(spec.clone())?;
    for row in rows {
        chart.push(&row);
    }
    chart.finish()
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (empty outside years 0–9999).
pub fn utc_seconds(ms: i64) -> String {
    let t = crate::clock::rfc3339_ms(ms);
    if t.len() < 19 {
        return t;
    }
    format!("{} {}", &t[..10], &t[11..19])
}

/// One pixel column of a line chart.
#[derive(Debug, Clone, Copy, Default)]
struct Column {
    n: u32,
    min: (f64, i64),
    max: (f64, i64),
}

/// One bucket of a bar chart.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    n: u64,
    sum: f64,
}

const ALERT: u8 = 1;
const VIOLATION: u8 = 2;
const CLEARED: u8 = 4;

/// A chart being fed rows; [`Chart::finish`] draws it.
#[derive(Debug)]
pub struct Chart {
    spec: ChartSpec,
    /// Plot columns (line) or buckets (bar) share this: pixel columns of the plot area.
    cols: usize,
    columns: Vec<Column>,
    bucket_ms: i64,
    bucket_start_ms: i64,
    buckets: Vec<Bucket>,
    /// Per pixel column: which kinds of events happened there.
    marks: Vec<u8>,
    /// Events seen, per kind: alerts, violations in alarm, cleared or invalidated.
    events: [u64; 3],
    unit: Option<String>,
    readings: u64,
    first_ms: i64,
    last_ms: i64,
}

impl Chart {
    /// An empty chart; the spec is checked here.
    pub fn new(spec: ChartSpec) -> Result<Self, ChartError> {
        if !(MIN_WIDTH..=MAX_WIDTH).contains(&spec.width)
            || !(MIN_HEIGHT..=MAX_HEIGHT).contains(&spec.height)
        {
            return Err(ChartError::Size {
                width: spec.width,
                height: spec.height,
            });
        }
        if spec.to_ms <= spec.from_ms {
            return Err(ChartError::EmptyRange {
                from: utc_seconds(spec.from_ms),
                to: utc_seconds(spec.to_ms),
            });
        }
        let cols = (spec.width - 2 * MARGIN - Y_LABEL_AREA) as usize;
        let span = spec.to_ms - spec.from_ms;
        let bucket_ms = NICE_STEPS_MS
            .iter()
            .copied()
            .find(|s| span / s < MAX_BARS)
            .unwrap_or_else(|| span / MAX_BARS + 1);
        let bucket_start_ms = spec.from_ms.div_euclid(bucket_ms) * bucket_ms;
        let n_buckets = ((spec.to_ms - bucket_start_ms) / bucket_ms + 1) as usize;
        let (columns, buckets) = match spec.style {
            Style::Line => (vec![Column::default(); cols], Vec::new()),
            Style::Bar => (Vec::new(), vec![Bucket::default(); n_buckets]),
        };
        Ok(Self {
            cols,
            columns,
            bucket_ms,
            bucket_start_ms,
            buckets,
            marks: vec![0; cols],
            events: [0; 3],
            unit: None,
            readings: 0,
            first_ms: i64::MAX,
            last_ms: i64::MIN,
            spec,
        })
    }

    /// A chart of `metric` of the same device, range, style and size that already holds the
    /// events this one took: for a metric that shows up in the middle of a pass over the
    /// history, after events it must still mark.
    pub fn for_metric(&self, metric: &str) -> Chart {
        Chart {
            spec: ChartSpec {
                metric: metric.to_owned(),
                ..self.spec.clone()
            },
            cols: self.cols,
            columns: vec![Column::default(); self.columns.len()],
            bucket_ms: self.bucket_ms,
            bucket_start_ms: self.bucket_start_ms,
            buckets: vec![Bucket::default(); self.buckets.len()],
            marks: self.marks.clone(),
            events: self.events,
            unit: None,
            readings: 0,
            first_ms: i64::MAX,
            last_ms: i64::MIN,
        }
    }

    /// The spec.
    pub fn spec(&self) -> &ChartSpec {
        &self.spec
    }

    /// Readings taken so far.
    pub fn readings(&self) -> u64 {
        self.readings
    }

    fn column(&self, t: i64) -> usize {
        let span = (self.spec.to_ms - self.spec.from_ms) as i128 + 1;
        let c = (t - self.spec.from_ms) as i128 * self.cols as i128 / span;
        (c.max(0) as usize).min(self.cols - 1)
    }

    /// Take one row (ignored unless it is the device's, in the range, and a reading of the
    /// metric or an event).
    pub fn push(&mut self, row: &Row) {
        let t = row.observed_ms;
        if row.device != self.spec.device || t < self.spec.from_ms || t > self.spec.to_ms {
            return;
        }
        match row.record {
            RowKind::Reading => {
                let Some(v) = row.value.filter(|v| v.is_finite()) else {
                    return;
                };
                if row.metric != self.spec.metric {
                    return;
                }
                if self.unit.is_none() && !row.unit.is_empty() {
                    self.unit = Some(row.unit.clone());
                }
                self.readings += 1;
                self.first_ms = self.first_ms.min(t);
                self.last_ms = self.last_ms.max(t);
                match self.spec.style {
                    Style::Line => {
                        let c = self.column(t);
                        let col = &mut self.columns[c];
                        if col.n == 0 {
                            col.min = (v, t);
                            col.max = (v, t);
                        } else {
                            if v < col.min.0 {
                                col.min = (v, t);
                            }
                            if v > col.max.0 {
                                col.max = (v, t);
                            }
                        }
                        col.n += 1;
                    }
                    Style::Bar => {
                        let i = ((t - self.bucket_start_ms) / self.bucket_ms) as usize;
                        if let Some(b) = self.buckets.get_mut(i) {
                            b.n += 1;
                            b.sum += v;
                        }
                    }
                }
            }
            RowKind::Alert | RowKind::Violation => {
                let (bit, i) = match (row.record, row.quality.as_str()) {
                    (RowKind::Alert, _) => (ALERT, 0),
                    (_, "in-alarm") => (VIOLATION, 1),
                    _ => (CLEARED, 2),
                };
                self.events[i] += 1;
                let c = self.column(t);
                self.marks[c] |= bit;
            }
        }
    }

    /// The time at the middle of pixel column `c`.
    fn column_time(&self, c: usize) -> i64 {
        let span = (self.spec.to_ms - self.spec.from_ms) as i128 + 1;
        self.spec.from_ms + ((2 * c as i128 + 1) * span / (2 * self.cols as i128)) as i64
    }

    /// The line's pieces: runs of points with no long pause inside.
    fn line_pieces(&self) -> Vec<Vec<(i64, f64)>> {
        let mean_gap = if self.readings > 1 {
            (self.last_ms - self.first_ms) / (self.readings as i64 - 1)
        } else {
            0
        };
        let column_ms = (self.spec.to_ms - self.spec.from_ms) / self.cols as i64;
        let max_gap = (GAP_FACTOR * mean_gap).max(3 * column_ms).max(1);
        let mut pieces: Vec<Vec<(i64, f64)>> = Vec::new();
        let mut piece: Vec<(i64, f64)> = Vec::new();
        for col in self.columns.iter().filter(|c| c.n > 0) {
            let (a, b) = if col.min.1 <= col.max.1 {
                (col.min, col.max)
            } else {
                (col.max, col.min)
            };
            for (v, t) in [a, b] {
                if piece.last().is_some_and(|&(lt, lv)| lt == t && lv == v) {
                    continue;
                }
                if piece.last().is_some_and(|&(lt, _)| t - lt > max_gap) {
                    pieces.push(std::mem::take(&mut piece));
                }
                piece.push((t, v));
            }
        }
        if !piece.is_empty() {
            pieces.push(piece);
        }
        pieces
    }

    /// Bars: (start, end, mean) clipped to the range.
    fn bars(&self) -> Vec<(i64, i64, f64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| b.n > 0)
            .map(|(i, b)| {
                let start = self.bucket_start_ms + i as i64 * self.bucket_ms;
                (
                    start.max(self.spec.from_ms),
                    (start + self.bucket_ms).min(self.spec.to_ms),
                    b.sum / b.n as f64,
                )
            })
            .collect()
    }

    /// Draw the chart.
    pub fn finish(self) -> Result<String, ChartError> {
        let spec = &self.spec;
        if self.readings == 0 {
            return Err(ChartError::NoReadings {
                device: spec.device.clone(),
                metric: spec.metric.clone(),
                from: utc_seconds(spec.from_ms),
                to: utc_seconds(spec.to_ms),
            });
        }
        let (pieces, bars) = match spec.style {
            Style::Line => (self.line_pieces(), Vec::new()),
            Style::Bar => (Vec::new(), self.bars()),
        };
        let values = pieces
            .iter()
            .flatten()
            .map(|p| p.1)
            .chain(bars.iter().map(|b| b.2));
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let (lo, hi) = match spec.style {
            // Bars stand on zero.
            Style::Bar => (lo.min(0.0), hi.max(0.0)),
            Style::Line => (lo, hi),
        };
        let pad = if hi > lo {
            (hi - lo) * 0.08
        } else {
            lo.abs().max(1.0) * 0.1
        };
        let y = match spec.style {
            Style::Bar if lo >= 0.0 => 0.0..hi + pad,
            Style::Bar if hi <= 0.0 => lo - pad..0.0,
            _ => lo - pad..hi + pad,
        };
        let axis = TimeAxis::new(spec.from_ms, spec.to_ms);
        let unit = self.unit.clone().unwrap_or_else(|| "value".into());
        let title = format!("{} · {}", spec.device, spec.metric);
        let series_label = match spec.style {
            Style::Line => spec.metric.clone(),
            Style::Bar => format!(
                "{}, mean per {}",
                spec.metric,
                duration_words(self.bucket_ms)
            ),
        };

        let mut svg = String::new();
        {
            let backend = SVGBackend::with_string(&mut svg, (spec.width, spec.height));
            let root = backend.into_drawing_area();
            let draw_err = |e: &dyn std::fmt::Display| ChartError::Draw(e.to_string());
            root.fill(&WHITE).map_err(|e| draw_err(&e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption(&title, ("sans-serif", 18))
                .margin(MARGIN)
                .x_label_area_size(X_LABEL_AREA)
                .y_label_area_size(Y_LABEL_AREA)
                .build_cartesian_2d(axis.clone(), y.clone())
                .map_err(|e| draw_err(&e))?;
            let x_desc = axis.description();
            chart
                .configure_mesh()
                .max_light_lines(0)
                .x_labels(8)
                .y_labels(6)
                .x_desc(x_desc)
                .y_desc(unit)
                .label_style(("sans-serif", 12))
                .axis_desc_style(("sans-serif", 13))
                .bold_line_style(RGBColor(0xe6, 0xe6, 0xe6))
                .draw()
                .map_err(|e| draw_err(&e))?;

            match spec.style {
                Style::Line => {
                    let style = SERIES_COLOR.stroke_width(2);
                    let mut labelled = false;
                    for piece in &pieces {
                        let series = if piece.len() == 1 {
                            // A lone reading: a dot, since a one-point line draws nothing.
                            chart.draw_series(
                                piece
                                    .iter()
                                    .map(|&p| Circle::new(p, 3, SERIES_COLOR.filled()).into_dyn()),
                            )
                        } else {
                            chart.draw_series(std::iter::once(
                                PathElement::new(piece.clone(), style).into_dyn(),
                            ))
                        }
                        .map_err(|e| draw_err(&e))?;
                        if !labelled {
                            labelled = true;
                            series.label(series_label.clone()).legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 18, y)], style)
                            });
                        }
                    }
                }
                Style::Bar => {
                    let bucket_px = (self.bucket_ms as f64 / (spec.to_ms - spec.from_ms) as f64
                        * self.cols as f64)
                        .max(1.0);
                    // A pixel of space between bars when they are wide enough for it.
                    let inset = if bucket_px >= 4.0 {
                        self.bucket_ms / 10
                    } else {
                        0
                    };
                    chart
                        .draw_series(bars.iter().map(|&(s, e, mean)| {
                            let (s, e) = (s + inset / 2, (e - inset / 2).max(s + inset / 2));
                            Rectangle::new([(s, 0.0), (e, mean)], SERIES_COLOR.filled())
                        }))
                        .map_err(|e| draw_err(&e))?
                        .label(series_label)
                        .legend(|(x, y)| {
                            Rectangle::new([(x, y - 5), (x + 14, y + 5)], SERIES_COLOR.filled())
                        });
                }
            }

            // Events: a vertical line per kind and column, and a symbol at the top: a triangle for
            // alerts, a cross for violations in alarm, a dot for cleared ones.
            let (y0, y1) = (y.start, y.end);
            let kinds: [(u8, RGBColor, &str, usize); 3] = [
                (ALERT, ALERT_COLOR, "alert", 0),
                (VIOLATION, VIOLATION_COLOR, "violation", 1),
                (CLEARED, CLEARED_COLOR, "violation cleared", 2),
            ];
            for (bit, color, name, i) in kinds {
                if self.events[i] == 0 {
                    continue;
                }
                let times: Vec<i64> = (0..self.cols)
                    .filter(|&c| self.marks[c] & bit != 0)
                    .map(|c| self.column_time(c))
                    .collect();
                let line = color.stroke_width(1);
                let series = chart
                    .draw_series(
                        times
                            .iter()
                            .map(|&t| PathElement::new(vec![(t, y0), (t, y1)], line)),
                    )
                    .map_err(|e| draw_err(&e))?;
                series.label(format!("{name} ({})", self.events[i]));
                let fill = color.filled();
                let drawn = match bit {
                    ALERT => {
                        series.legend(move |(x, y)| TriangleMarker::new((x + 7, y), 5, fill));
                        chart.draw_series(
                            times.iter().map(|&t| TriangleMarker::new((t, y1), 5, fill)),
                        )
                    }
                    VIOLATION => {
                        series
                            .legend(move |(x, y)| Cross::new((x + 7, y), 4, color.stroke_width(2)));
                        chart.draw_series(
                            times
                                .iter()
                                .map(|&t| Cross::new((t, y1), 4, color.stroke_width(2))),
                        )
                    }
                    _ => {
                        series.legend(move |(x, y)| Circle::new((x + 7, y), 4, fill));
                        chart.draw_series(times.iter().map(|&t| Circle::new((t, y1), 4, fill)))
                    }
                };
                drawn.map_err(|e| draw_err(&e))?;
            }

            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(0xb0, 0xb0, 0xb0))
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(|e| draw_err(&e))?;
            root.present().map_err(|e| draw_err(&e))?;
        }
        Ok(svg)
    }
}

/// `30 min`, `1 h`, `15 s`, `1 day`.
fn duration_words(ms: i64) -> String {
    match ms {
        ms if ms % 86_400_000 == 0 => match ms / 86_400_000 {
            1 => "1 day".into(),
            d => format!("{d} days"),
        },
        ms if ms % 3_600_000 == 0 => format!("{} h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
        ms => format!("{ms} ms"),
    }
}

/// The time axis: ms since the epoch, ticks at round UTC times.
#[derive(Debug, Clone)]
struct TimeAxis {
    from: i64,
    to: i64,
}

impl TimeAxis {
    fn new(from: i64, to: i64) -> Self {
        Self { from, to }
    }

    fn span(&self) -> i64 {
        self.to - self.from
    }

    /// The axis title: the time zone and the dates the labels leave out.
    fn description(&self) -> String {
        let (a, b) = (utc_seconds(self.from), utc_seconds(self.to));
        let (da, db) = (a.get(..10).unwrap_or(""), b.get(..10).unwrap_or(""));
        if self.span() > 36 * 3_600_000 {
            format!("UTC, {da} to {db}")
        } else if da == db {
            format!("UTC, {da}")
        } else {
            format!("UTC, {da} to {db}")
        }
    }

    fn label(&self, t: i64) -> String {
        let s = utc_seconds(t);
        if s.len() < 19 {
            return s;
        }
        if self.span() <= 10 * 60_000 {
            s[11..19].to_owned()
        } else if self.span() <= 36 * 3_600_000 {
            s[11..16].to_owned()
        } else {
            s[5..16].to_owned()
        }
    }
}

impl Ranged for TimeAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = i64;

    fn map(&self, value: &i64, limit: (i32, i32)) -> i32 {
        let span = self.span().max(1) as f64;
        let frac = (*value - self.from) as f64 / span;
        limit.0 + (frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<i64> {
        let max = hint.max_num_points() as i64;
        if max == 0 {
            return Vec::new();
        }
        let step = NICE_STEPS_MS
            .iter()
            .copied()
            .find(|s| self.span() / s < max)
            .unwrap_or_else(|| self.span() / max + 1);
        let first = self.from.div_euclid(step) * step;
        let first = if first < self.from {
            first + step
        } else {
            first
        };
        (0..)
            .map(|i| first + i * step)
            .take_while(|t| *t <= self.to)
            .collect()
    }

    fn range(&self) -> Range<i64> {
        self.from..self.to
    }
}

impl ValueFormatter<i64> for TimeAxis {
    fn format(value: &i64) -> String {
        utc_seconds(*value)
    }

    fn format_ext(&self, value: &i64) -> String {
        self.label(*value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    /// Midnight UTC of a day a while back (from the clock: the tests hold on any date).
    fn day() -> i64 {
        (crate::clock::now_ms().div_euclid(DAY) - 10) * DAY
    }

    use crate::history::test_reading as reading;

    fn event(record: RowKind, quality: &str, at: i64) -> Row {
        Row {
            record,
            metric: "tachycardia".into(),
            value: None,
            unit: String::new(),
            quality: quality.into(),
            detail: "{\"heartbeat\":150}".into(),
            ..reading("pm-01", "tachycardia", 0.0, at)
        }
    }

    fn spec(style: Style, from: i64, to: i64) -> ChartSpec {
        ChartSpec {
            device: "pm-01".into(),
            metric: "heartbeat".into(),
            from_ms: from,
            to_ms: to,
            style,
            width: 900,
            height: 320,
        }
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    /// The parsed SVG's elements named `tag` drawn in `color` (fill or stroke).
    fn elements<'a>(
        doc: &'a roxmltree::Document<'a>,
        tag: &str,
        color: RGBColor,
    ) -> Vec<roxmltree::Node<'a, 'a>> {
        let color = hex(color);
        doc.descendants()
            .filter(|n| n.has_tag_name(tag))
            .filter(|n| {
                n.attribute("fill") == Some(color.as_str())
                    || n.attribute("stroke") == Some(color.as_str())
            })
            .collect()
    }

    fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_owned()))
            .collect()
    }

    fn polyline_points(n: &roxmltree::Node<'_, '_>) -> usize {
        n.attribute("points")
            .unwrap_or_default()
            .split_whitespace()
            .count()
    }

    #[test]
    fn a_bar_chart_has_one_bar_per_bucket_with_readings_and_the_title_and_unit() {
        // 08:00 to 09:00 UTC of some day: one-minute buckets, 60 of them; readings in 45.
        let from = day() + 8 * HOUR;
        let to = from + HOUR - 1;
        let mut rows = Vec::new();
        for minute in 0..45 {
            for s in [0, 20, 40] {
                let t = from + minute * 60_000 + s * 1000;
                rows.push(reading("pm-01", "heartbeat", 60.0 + minute as f64, t));
            }
        }
        // Another device and another metric are ignored.
        rows.push(reading("pm-02", "heartbeat", 500.0, from + 1000));
        rows.push(reading("pm-01", "battery", 500.0, from + 1000));
        rows.push(event(RowKind::Alert, "", from + 10 * 60_000));
        let svg = render_svg(&spec(Style::Bar, from, to), rows.into_iter()).unwrap();
        if let Some(dir) = std::env::var_os("WG_DUMP_CHARTS") {
            std::fs::write(std::path::Path::new(&dir).join("hour-bar.svg"), &svg).unwrap();
        }
        let doc = roxmltree::Document::parse(&svg).expect("the SVG is XML");
        // 45 bars and the legend's swatch.
        assert_eq!(elements(&doc, "rect", SERIES_COLOR).len(), 45 + 1, "{svg}");
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == "pm-01 · heartbeat"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "/min"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "08:30"), "{texts:?}");
        assert!(
            texts.iter().any(|t| t == "heartbeat, mean per 1 min"),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t == "alert (1)"), "{texts:?}");
        // The alert: its line and its triangle, and the legend's triangle.
        assert_eq!(elements(&doc, "polyline", ALERT_COLOR).len(), 1);
        assert_eq!(elements(&doc, "polygon", ALERT_COLOR).len(), 2);
        assert!(
            !svg.contains("500"),
            "other devices and metrics are not drawn"
        );
    }

    #[test]
    fn bars_are_bucket_means_of_a_round_length() {
        let from = day();
        // A day: half-hour buckets (48).
        let mut c = Chart::new(spec(Style::Bar, from, from + 24 * HOUR - 1)).unwrap();
        assert_eq!(c.bucket_ms, 30 * 60_000);
        c.push(&reading("pm-01", "heartbeat", 60.0, from + 1000));
        c.push(&reading("pm-01", "heartbeat", 80.0, from + 29 * 60_000));
        c.push(&reading("pm-01", "heartbeat", 100.0, from + 31 * 60_000));
        assert_eq!(
            c.bars(),
            [
                (from, from + 30 * 60_000, 70.0),
                (from + 30 * 60_000, from + 60 * 60_000, 100.0)
            ]
        );
        for (span, bucket) in [
            (10 * 60_000, 10_000),
            (HOUR, 60_000),
            (3 * HOUR, 5 * 60_000),
            (7 * 24 * HOUR, 3 * HOUR),
        ] {
            let c = Chart::new(spec(Style::Bar, from, from + span - 1)).unwrap();
            assert_eq!(c.bucket_ms, bucket, "span {span}");
            let n = span / bucket;
            assert!((30..=60).contains(&n), "{n} bars for {span}");
        }
    }

    #[test]
    fn a_day_of_one_reading_a_second_is_at_most_two_points_per_column() {
        let from = day();
        let to = from + 24 * HOUR - 1;
        let mut c = Chart::new(spec(Style::Line, from, to)).unwrap();
        let heap_before = c.columns.capacity() + c.marks.capacity();
        let mut t = from;
        let mut i = 0u64;
        while t <= to {
            // A slow wave, and one spike that must survive the downsampling.
            let v = if i == 40_000 {
                250.0
            } else {
                70.0 + (i % 600) as f64 / 60.0
            };
            c.push(&reading("pm-01", "heartbeat", v, t));
            if i.is_multiple_of(3600) {
                c.push(&event(RowKind::Violation, "in-alarm", t));
            }
            t += 1000;
            i += 1;
        }
        assert_eq!(c.readings(), 86_400);
        assert_eq!(
            c.columns.capacity() + c.marks.capacity(),
            heap_before,
            "nothing grows with the rows"
        );
        let cols = c.cols;
        let svg = c.finish().unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("the SVG is XML");
        let lines = elements(&doc, "polyline", SERIES_COLOR);
        // The line, and the legend's sample.
        let points: usize = lines.iter().map(polyline_points).sum::<usize>() - 2;
        assert!(
            points <= 2 * cols && points >= cols,
            "{points} points for {cols} columns"
        );
        assert!(
            svg.contains("250"),
            "the spike's label, or the axis reaches it"
        );
        // 24 violations in alarm, one per hour: 24 lines and 24 crosses of two strokes each
        // (and the legend's cross).
        assert_eq!(elements(&doc, "polyline", VIOLATION_COLOR).len(), 24);
        assert_eq!(elements(&doc, "line", VIOLATION_COLOR).len(), 2 * 25);
        if let Some(dir) = std::env::var_os("WG_DUMP_CHARTS") {
            std::fs::write(std::path::Path::new(&dir).join("day-line.svg"), &svg).unwrap();
        }
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == "violation (24)"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "12:00"), "{texts:?}");
    }

    #[test]
    fn the_line_breaks_where_the_device_was_silent() {
        let from = day();
        let to = from + HOUR;
        let mut rows = Vec::new();
        // Every 5 s for the first 20 minutes and the last 20; nothing in between.
        for i in 0..240 {
            rows.push(reading(
                "pm-01",
                "heartbeat",
                70.0 + (i % 7) as f64,
                from + i * 5000,
            ));
            rows.push(reading("pm-01", "heartbeat", 90.0, to - i * 5000));
        }
        rows.push(event(
            RowKind::Violation,
            "alarm-cleared",
            from + 30 * 60_000,
        ));
        let svg = render_svg(&spec(Style::Line, from, to), rows.into_iter()).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        // Two pieces of line, and the legend's sample.
        assert_eq!(elements(&doc, "polyline", SERIES_COLOR).len(), 3, "{svg}");
        assert_eq!(elements(&doc, "circle", CLEARED_COLOR).len(), 2);
        assert!(texts(&doc).iter().any(|t| t == "violation cleared (1)"));
    }

    #[test]
    fn a_chart_made_for_a_metric_mid_pass_keeps_the_events_before_it() {
        let from = day() + 8 * HOUR;
        let mut template = Chart::new(ChartSpec {
            metric: String::new(),
            ..spec(Style::Bar, from, from + HOUR)
        })
        .unwrap();
        template.push(&event(RowKind::Alert, "", from + 60_000));
        // Readings of no metric are not taken by the template.
        template.push(&reading("pm-01", "heartbeat", 70.0, from + 1));
        assert_eq!(template.readings(), 0);
        let mut c = template.for_metric("heartbeat");
        c.push(&reading("pm-01", "heartbeat", 70.0, from + 120_000));
        c.push(&event(RowKind::Violation, "in-alarm", from + 180_000));
        assert_eq!((c.readings(), c.events), (1, [1, 1, 0]));
        let svg = c.finish().unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(elements(&doc, "polyline", ALERT_COLOR).len(), 1);
        assert_eq!(elements(&doc, "polyline", VIOLATION_COLOR).len(), 1);
        assert!(
            template.finish().is_err(),
            "the template itself has no readings"
        );
    }

    #[test]
    fn no_readings_in_the_range_is_a_clear_error() {
        let from = day() + 8 * HOUR;
        let rows = vec![
            reading("pm-01", "heartbeat", 70.0, from - 1),
            reading("pm-01", "battery", 70.0, from + 1),
            event(RowKind::Alert, "", from + 1),
        ];
        let e = render_svg(&spec(Style::Line, from, from + HOUR), rows.into_iter()).unwrap_err();
        assert!(matches!(e, ChartError::NoReadings { .. }), "{e:?}");
        let date = &utc_seconds(from)[..10];
        assert_eq!(
            e.to_string(),
            format!(
                "no heartbeat readings of pm-01 between {date} 08:00:00 and {date} 09:00:00 (UTC)"
            )
        );
        let e = render_svg(&spec(Style::Bar, from, from), std::iter::empty()).unwrap_err();
        assert!(e.to_string().contains("time range is empty"), "{e}");
        let mut s = spec(Style::Bar, from, from + HOUR);
        s.width = 100_000;
        let e = render_svg(&s, std::iter::empty()).unwrap_err();
        assert!(e.to_string().contains("width must be"), "{e}");
    }

    #[test]
    fn labels_follow_the_range_and_text_is_escaped() {
        let from = day() + 8 * HOUR;
        let mut s = spec(Style::Line, from, from + 5 * 60_000);
        s.device = "pm<&>\"01".into();
        let rows = (0..60).map(|i| {
            let mut r = reading("pm<&>\"01", "heartbeat", 70.0, from + i * 5000);
            r.unit = "mm[Hg]<".into();
            r
        });
        let svg = render_svg(&s, rows).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("escaped");
        let texts = texts(&doc);
        assert!(
            texts.iter().any(|t| t == "pm<&>\"01 · heartbeat"),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t == "mm[Hg]<"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "08:02:00"), "{texts:?}");
        // A week: dates in the labels.
        let axis = TimeAxis::new(from, from + 7 * 24 * HOUR);
        let (a, b) = (utc_seconds(from), utc_seconds(from + 7 * DAY));
        assert_eq!(axis.label(from), format!("{} 08:00", &a[5..10]));
        assert_eq!(
            axis.description(),
            format!("UTC, {} to {}", &a[..10], &b[..10])
        );
        assert!(axis.key_points(8usize).iter().all(|t| t % 86_400_000 == 0));
    }
}
