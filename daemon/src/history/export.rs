//! `wardgate history`'s output: rows as CSV or JSON Lines, written as they are read.
//!
//! CSV (RFC 4180, `\n` line ends, a header line) with the columns [`COLUMNS`]: times are RFC
//! 3339 in UTC with milliseconds (`2026-12-05T08:00:00.250Z`), so
//! `pandas.read_csv(f, parse_dates=["observed", "received"])` gives `datetime64[ns, UTC]`
//! columns; `value` is a plain decimal number (empty when there is none), so it reads as
//! `float64`; text fields are quoted only when they hold a comma, a quote or a line break.
//! JSON Lines: one object per row with the same fields, plus the times as `observed_ms` and
//! `received_ms` (ms since the epoch).
//!
//! What must stay true: one row in, one line out (CSV fields with line breaks are quoted), in
//! the order given; nothing is buffered beyond the writer's buffer, so an export of any size
//! runs in constant memory.

use super::Row;
use std::io::{self, Write};

/// The CSV columns, in order.
pub const COLUMNS: [&str; 10] = [
    "observed", "received", "device", "kind", "record", "metric", "value", "unit", "quality",
    "detail",
];

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

fn csv_field(out: &mut impl Write, s: &str) -> io::Result<()> {
    if s.contains([',', '"', '\n', '\r']) {
        out.write_all(b"\"")?;
        out.write_all(s.replace('"', "\"\"").as_bytes())?;
        out.write_all(b"\"")
    } else {
        out.write_all(s.as_bytes())
    }
}

/// Writes rows in one format.
#[derive(Debug)]
pub struct Exporter<W: Write> {
    out: W,
    format: Format,
}

impl<W: Write> Exporter<W> {
    /// Start an export (the CSV header is written at once).
    pub fn new(mut out: W, format: Format) -> io::Result<Self> {
        if format == Format::Csv {
            writeln!(out, "{}", COLUMNS.join(","))?;
        }
        Ok(Self { out, format })
    }

    /// Write one row.
    pub fn row(&mut self, r: &Row) -> io::Result<()> {
        match self.format {
            Format::Csv => {
                let value = r.value.filter(|v| v.is_finite()).map(|v| v.to_string());
                let fields: [&str; 10] = [
                    &crate::clock::rfc3339_millis(r.observed_ms),
                    &crate::clock::rfc3339_millis(r.received_ms),
                    &r.device,
                    &r.kind,
                    r.record.as_str(),
                    &r.metric,
                    value.as_deref().unwrap_or(""),
                    &r.unit,
                    &r.quality,
                    &r.detail,
                ];
                for (i, f) in fields.iter().enumerate() {
                    if i > 0 {
                        self.out.write_all(b",")?;
                    }
                    csv_field(&mut self.out, f)?;
                }
                self.out.write_all(b"\n")
            }
            Format::Jsonl => {
                let v = serde_json::json!({
                    "observed": crate::clock::rfc3339_millis(r.observed_ms),
                    "received": crate::clock::rfc3339_millis(r.received_ms),
                    "observed_ms": r.observed_ms,
                    "received_ms": r.received_ms,
                    "device": r.device,
                    "kind": r.kind,
                    "record": r.record.as_str(),
                    "metric": r.metric,
                    "value": r.value.filter(|v| v.is_finite()),
                    "unit": r.unit,
                    "quality": r.quality,
                    "detail": r.detail,
                });
                serde_json::to_writer(&mut self.out, &v)?;
                self.out.write_all(b"\n")
            }
        }
    }

    /// Flush and give the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::RowKind;

    #[test]
    fn csv_quotes_only_what_needs_it_and_keeps_one_line_per_row() {
        let t = crate::clock::now_ms();
        let r = Row {
            record: RowKind::Alert,
            device: "pm-01".into(),
            kind: "pacemaker".into(),
            metric: "tachycardia".into(),
            value: None,
            unit: String::new(),
            quality: String::new(),
            observed_ms: t,
            received_ms: t,
            detail: "{\"heartbeat\":150,\n\"x\":1}".into(),
        };
        let mut e = Exporter::new(Vec::new(), Format::Csv).unwrap();
        e.row(&r).unwrap();
        let text = String::from_utf8(e.finish().unwrap()).unwrap();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        assert_eq!(lines[0], format!("{}\n", COLUMNS.join(",")));
        assert!(text.ends_with(",alert,tachycardia,,,,\"{\"\"heartbeat\"\":150,\n\"\"x\"\":1}\"\n"));
        let mut e = Exporter::new(Vec::new(), Format::Jsonl).unwrap();
        e.row(&r).unwrap();
        let text = String::from_utf8(e.finish().unwrap()).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["observed_ms"], t);
        assert_eq!(v["value"], serde_json::Value::Null);
    }
}
