//! Local Detect: AWS IoT Device Defender's rule-based and statistical behaviors, evaluated on
//! the gateway at the end of every metering window, offline.
//!
//! A security profile ([`Profile`]) targets devices (`*`, device ids, `kind:<kind>`) and lists
//! behaviors in AWS's own JSON shape (`aws iot describe-security-profile` output can be used as
//! it is). **A behavior describes normal behaviour: a device violates it when the criteria are
//! false.** Each evaluation gives a device one datapoint per behavior (when it has the metric);
//! `consecutiveDatapointsToAlarm` violating datapoints in a row raise `in-alarm`,
//! `consecutiveDatapointsToClear` compliant ones in a row give `alarm-cleared`, and a device
//! in alarm that has had no datapoint for `defender.invalidate_after` gets `alarm-invalidated`.
//!
//! Where each metric comes from:
//! - cloud-side (`aws:num-messages-sent`, `-received`, `aws:num-authorization-failures`,
//!   `aws:num-connection-attempts`, `aws:num-disconnects`, `aws:message-byte-size`,
//!   `aws:source-ip-address`): the gatekeeper's meters ([`crate::metering`]), summed over the
//!   closed windows `durationSeconds` covers. A device has a datapoint when it was connected or
//!   tried to connect in those windows;
//! - device-side (`aws:all-bytes-*`, `aws:all-packets-*`, ports, connections, destination
//!   addresses) and custom metrics: the Device Defender reports the device's agent published
//!   ([`Reports`]): network counts summed over the windows, everything else from the newest
//!   report in them. No report in those windows: no datapoint.
//!
//! Decisions where AWS says nothing exact (documented in the README too):
//! - `aws:message-byte-size` is the largest message of the window (AWS evaluates each message;
//!   the largest is the one that decides);
//! - a statistical threshold is the percentile, by linear interpolation between closest ranks,
//!   of the values of every targeted device with a datapoint in the same evaluation, computed
//!   only when at least `defender.statistics_min_devices` devices have one;
//! - `durationSeconds` is AWS's 300, 600, 900, 1800 or 3600, or any multiple of
//!   `metering.window` (so short windows work for tests and small sites), at most
//!   `metering.windows_kept` windows; metrics without a time dimension ignore it for sums but
//!   look back that far for the newest report.
//!
//! What must stay true: evaluation is pure (no I/O, no clock: the caller passes the time), so
//! the service can persist its state after each evaluation and a restart resumes the streaks;
//! one device's data never changes another's datapoint, except through a statistical threshold,
//! which is what it is for.

use super::report::{CustomValue, Report};
use crate::config::{DefenderConfig, ProfileConfig};
use crate::metering::DeviceSnapshot;
use crate::rules::Problem;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Where a metric is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Cloud,
    Device,
}

/// What a metric's values are, which decides its operators and value key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A count (`value.count`), compared with less-than ... greater-than-equals.
    Count,
    /// A number (custom `number` metrics; `value.number`).
    Number,
    /// Numbers (custom `number_list`; `value.numbers`), in-set / not-in-set.
    Numbers,
    /// Strings (custom `string_list`; `value.strings`), in-set / not-in-set.
    Strings,
    /// IP addresses (`value.cidrs`), in-cidr-set / not-in-cidr-set.
    Ips,
    /// Ports (`value.ports`), in-port-set / not-in-port-set.
    Ports,
}

impl Shape {
    fn value_key(self) -> &'static str {
        match self {
            Shape::Count => "count",
            Shape::Number => "number",
            Shape::Numbers => "numbers",
            Shape::Strings => "strings",
            Shape::Ips => "cidrs",
            Shape::Ports => "ports",
        }
    }

    fn operators(self) -> &'static [&'static str] {
        match self {
            Shape::Count | Shape::Number => &[
                "less-than",
                "less-than-equals",
                "greater-than",
                "greater-than-equals",
            ],
            Shape::Numbers | Shape::Strings => &["in-set", "not-in-set"],
            Shape::Ips => &["in-cidr-set", "not-in-cidr-set"],
            Shape::Ports => &["in-port-set", "not-in-port-set"],
        }
    }
}

/// AWS's metrics: name, side, shape, and whether it has a time dimension (summed over
/// `durationSeconds`).
const METRICS: &[(&str, Side, Shape, bool)] = &[
    ("aws:message-byte-size", Side::Cloud, Shape::Count, false),
    ("aws:num-messages-sent", Side::Cloud, Shape::Count, true),
    ("aws:num-messages-received", Side::Cloud, Shape::Count, true),
    (
        "aws:num-authorization-failures",
        Side::Cloud,
        Shape::Count,
        true,
    ),
    (
        "aws:num-connection-attempts",
        Side::Cloud,
        Shape::Count,
        true,
    ),
    ("aws:num-disconnects", Side::Cloud, Shape::Count, true),
    ("aws:source-ip-address", Side::Cloud, Shape::Ips, false),
    ("aws:all-bytes-in", Side::Device, Shape::Count, true),
    ("aws:all-bytes-out", Side::Device, Shape::Count, true),
    ("aws:all-packets-in", Side::Device, Shape::Count, true),
    ("aws:all-packets-out", Side::Device, Shape::Count, true),
    (
        "aws:num-listening-tcp-ports",
        Side::Device,
        Shape::Count,
        false,
    ),
    (
        "aws:num-listening-udp-ports",
        Side::Device,
        Shape::Count,
        false,
    ),
    (
        "aws:num-established-tcp-connections",
        Side::Device,
        Shape::Count,
        false,
    ),
    ("aws:listening-tcp-ports", Side::Device, Shape::Ports, false),
    ("aws:listening-udp-ports", Side::Device, Shape::Ports, false),
    (
        "aws:destination-ip-addresses",
        Side::Device,
        Shape::Ips,
        false,
    ),
];

/// AWS's statistics for statistical thresholds, and the percentile each is.
const STATISTICS: &[(&str, f64)] = &[
    ("p0", 0.0),
    ("p0.1", 0.1),
    ("p0.01", 0.01),
    ("p1", 1.0),
    ("p10", 10.0),
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
    ("p99.99", 99.99),
    ("p100", 100.0),
];

/// `durationSeconds` values AWS accepts.
const AWS_DURATIONS: &[u64] = &[300, 600, 900, 1800, 3600];

/// One IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `fd00::/8`, or one address (`10.0.0.1` is `/32`).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = s.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is in it (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        // IPv4 addresses sit in the top 32 bits, so a prefix counts from the top either way.
        let len = u32::from(self.prefix);
        if len == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - len.min(128));
        bits(ip) & mask == bits(self.addr) & mask
    }
}

/// What a behavior compares with.
#[derive(Debug, Clone, PartialEq)]
enum Against {
    /// A fixed value.
    Value(f64),
    /// The percentile of the targeted devices' values.
    Statistic(f64),
}

/// A behavior's criteria.
#[derive(Debug, Clone, PartialEq)]
enum Criterion {
    /// less-than ... greater-than-equals.
    Compare(&'static str, Against),
    /// in-cidr-set (`true`) / not-in-cidr-set.
    Cidrs(bool, Vec<Cidr>),
    /// in-port-set / not-in-port-set.
    Ports(bool, BTreeSet<u16>),
    /// in-set / not-in-set over numbers.
    Numbers(bool, Vec<f64>),
    /// in-set / not-in-set over strings.
    Strings(bool, BTreeSet<String>),
}

/// One compiled behavior.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Its name (unique in its profile; shared by its tracks' keys).
    pub name: Arc<str>,
    /// The metric (`aws:...` or a custom metric's name).
    pub metric: String,
    side: Side,
    shape: Shape,
    criterion: Criterion,
    /// Windows summed (`durationSeconds / metering.window`, at least 1).
    windows: u32,
    to_alarm: u32,
    to_clear: u32,
    /// `suppressAlerts`: violations are tracked but no alert actions run.
    pub suppress_alerts: bool,
    /// The behavior as configured (AWS's shape), for violation messages.
    pub raw: Value,
}

/// One compiled security profile.
#[derive(Debug)]
pub struct Profile {
    /// Its name (shared by its tracks' keys).
    pub name: Arc<str>,
    targets: Vec<Target>,
    /// Its behaviors.
    pub behaviors: Vec<Behavior>,
    /// Its alert actions (everything but quarantine).
    pub actions: Arc<crate::rules::Actions>,
    /// The quarantine action's duration, if it has one.
    pub quarantine: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    All,
    Device(String),
    Kind(String),
}

impl Profile {
    /// Whether the profile covers device `id` of `kind`.
    pub fn targets(&self, id: &str, kind: &str) -> bool {
        self.targets.iter().any(|t| match t {
            Target::All => true,
            Target::Device(d) => d == id,
            Target::Kind(k) => k == kind,
        })
    }
}

/// Reads a behavior's JSON, naming each mistake with its path.
struct Check<'a> {
    prefix: String,
    label: String,
    problems: &'a mut Vec<Problem>,
}

impl Check<'_> {
    fn bad(&mut self, field: &str, message: impl std::fmt::Display) {
        self.problems.push(Problem {
            key: format!("{}.{field}", self.prefix),
            message: format!("{}: {message}", self.label),
        });
    }
}

fn datapoints(c: &mut Check<'_>, criteria: &serde_json::Map<String, Value>, key: &str) -> u32 {
    match criteria.get(key) {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=10) => n as u32,
            _ => {
                c.bad(
                    &format!("criteria.{key}"),
                    format!("{v} is not 1–10 (AWS's range; 1 when left out)"),
                );
                1
            }
        },
    }
}

/// Every entry of a criteria list read with `f`; the first that is not `what` is reported
/// with its index.
fn entries<T>(
    c: &mut Check<'_>,
    at: &str,
    items: &[Value],
    what: &str,
    f: impl Fn(&Value) -> Option<T>,
) -> Option<Vec<T>> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match f(item) {
            Some(x) => out.push(x),
            None => {
                c.bad(&format!("{at}[{i}]"), format!("{item} is not {what}"));
                return None;
            }
        }
    }
    Some(out)
}

/// Compile one behavior (AWS's JSON shape) found at `prefix`.
fn behavior(
    v: &Value,
    prefix: String,
    profile: &str,
    window: Duration,
    kept: usize,
    problems: &mut Vec<Problem>,
) -> Option<Behavior> {
    let before = problems.len();
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    let mut c = Check {
        prefix,
        label: format!("security profile `{profile}`, behavior `{name}`"),
        problems,
    };
    let Some(obj) = v.as_object() else {
        c.bad("", "expected a behavior object such as {\"name\": ..., \"metric\": ..., \"criteria\": {...}}");
        return None;
    };
    for key in obj.keys() {
        match key.as_str() {
            "name" | "metric" | "criteria" | "suppressAlerts" | "exportMetric" => {}
            "metricDimension" => c.bad(
                key,
                "metric dimensions (topic filters) are not supported on the gateway; remove it",
            ),
            _ => c.bad(
                key,
                "unknown field; expected name, metric, criteria, suppressAlerts or exportMetric",
            ),
        }
    }
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'));
    if !name_ok {
        c.bad(
            "name",
            "missing or not a behavior name (1–128 of letters, digits, `_`, `-`, `:`)",
        );
    }
    let metric = v.get("metric").and_then(Value::as_str).unwrap_or("");
    let Some(criteria) = obj.get("criteria").and_then(Value::as_object) else {
        c.bad(
            "criteria",
            "missing: give comparisonOperator and value (or statisticalThreshold)",
        );
        return None;
    };
    for key in criteria.keys() {
        if !matches!(
            key.as_str(),
            "comparisonOperator"
                | "value"
                | "durationSeconds"
                | "consecutiveDatapointsToAlarm"
                | "consecutiveDatapointsToClear"
                | "statisticalThreshold"
        ) {
            let m = if key == "mlDetectionConfig" {
                "ML Detect needs AWS's models; not available on the gateway".to_owned()
            } else {
                "unknown field; expected comparisonOperator, value, durationSeconds, consecutiveDatapointsToAlarm, consecutiveDatapointsToClear or statisticalThreshold".to_owned()
            };
            c.bad(&format!("criteria.{key}"), m);
        }
    }
    let value = criteria.get("value").and_then(Value::as_object);
    let known = METRICS.iter().find(|(n, ..)| *n == metric);
    let (side, shape, timed) = match known {
        Some((_, side, shape, timed)) => (*side, *shape, *timed),
        None if metric.starts_with("aws:") || metric.is_empty() => {
            let names: Vec<&str> = METRICS.iter().map(|m| m.0).collect();
            c.bad("metric", format!("`{metric}` is not a Device Defender metric; use one of {} or a custom metric's name", names.join(", ")));
            return None;
        }
        None if !super::report::valid_custom_name(metric) => {
            c.bad("metric", format!("`{metric}` is not a custom metric name (1–128 of letters, digits, `:`, `_`, `-`)"));
            return None;
        }
        None => {
            // A custom metric: its type follows from the value given.
            let shape = if criteria.contains_key("statisticalThreshold") {
                Shape::Number
            } else {
                match value.and_then(|v| v.keys().next()).map(String::as_str) {
                    Some("number") => Shape::Number,
                    Some("numbers") => Shape::Numbers,
                    Some("strings") => Shape::Strings,
                    Some("cidrs") => Shape::Ips,
                    _ => {
                        c.bad("criteria.value", "a custom metric's value is one of {\"number\": x}, {\"numbers\": [...]}, {\"strings\": [...]}, {\"cidrs\": [...]}");
                        return None;
                    }
                }
            };
            (Side::Device, shape, false)
        }
    };
    let op = criteria
        .get("comparisonOperator")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(op) = shape.operators().iter().find(|o| **o == op).copied() else {
        c.bad(
            "criteria.comparisonOperator",
            format!(
                "`{op}` is not valid for {metric}; use one of {}",
                shape.operators().join(", ")
            ),
        );
        return None;
    };
    let inside = !op.starts_with("not-");
    let stat = criteria.get("statisticalThreshold");
    let criterion = match (stat, value) {
        (Some(_), Some(_)) => {
            c.bad(
                "criteria",
                "give either value or statisticalThreshold, not both",
            );
            return None;
        }
        (Some(s), None) => {
            if !matches!(shape, Shape::Count | Shape::Number) {
                c.bad(
                    "criteria.statisticalThreshold",
                    format!("only for metrics compared with numbers; {metric} is not"),
                );
                return None;
            }
            let label = s.get("statistic").and_then(Value::as_str).unwrap_or("");
            match STATISTICS.iter().find(|(l, _)| *l == label) {
                Some((_, p)) => Criterion::Compare(op, Against::Statistic(*p)),
                None => {
                    let all: Vec<&str> = STATISTICS.iter().map(|s| s.0).collect();
                    c.bad(
                        "criteria.statisticalThreshold.statistic",
                        format!("`{label}`: use one of {}", all.join(", ")),
                    );
                    return None;
                }
            }
        }
        (None, None) => {
            c.bad(
                "criteria.value",
                format!(
                    "missing: give {{\"{}\": ...}} or a statisticalThreshold",
                    shape.value_key()
                ),
            );
            return None;
        }
        (None, Some(value)) => {
            let key = shape.value_key();
            if value.len() != 1 || !value.contains_key(key) {
                c.bad(
                    "criteria.value",
                    format!("{metric} takes {{\"{key}\": ...}}"),
                );
                return None;
            }
            let x = &value[key];
            let at = format!("criteria.value.{key}");
            let list = |c: &mut Check<'_>| -> Option<Vec<Value>> {
                match x.as_array() {
                    Some(items) if !items.is_empty() => Some(items.clone()),
                    _ => {
                        c.bad(&at, "expected a non-empty array");
                        None
                    }
                }
            };
            match shape {
                Shape::Count => match x.as_u64() {
                    Some(n) => Criterion::Compare(op, Against::Value(n as f64)),
                    None => {
                        c.bad(&at, format!("{x} is not a count (a non-negative integer)"));
                        return None;
                    }
                },
                Shape::Number => match x.as_f64() {
                    Some(n) => Criterion::Compare(op, Against::Value(n)),
                    None => {
                        c.bad(&at, format!("{x} is not a number"));
                        return None;
                    }
                },
                Shape::Numbers | Shape::Strings | Shape::Ips | Shape::Ports => {
                    let items = list(&mut c)?;
                    let c = &mut c;
                    match shape {
                        Shape::Numbers => Criterion::Numbers(
                            inside,
                            entries(c, &at, &items, "a number", Value::as_f64)?,
                        ),
                        Shape::Strings => Criterion::Strings(
                            inside,
                            entries(c, &at, &items, "a string", |v| {
                                v.as_str().map(str::to_owned)
                            })?
                            .into_iter()
                            .collect(),
                        ),
                        Shape::Ips => Criterion::Cidrs(
                            inside,
                            entries(c, &at, &items, "a CIDR such as \"10.0.0.0/8\"", |v| {
                                v.as_str().and_then(Cidr::parse)
                            })?,
                        ),
                        _ => Criterion::Ports(
                            inside,
                            entries(c, &at, &items, "a port 1–65535", |v| {
                                v.as_u64()
                                    .and_then(|p| u16::try_from(p).ok())
                                    .filter(|p| *p > 0)
                            })?
                            .into_iter()
                            .collect(),
                        ),
                    }
                }
            }
        }
    };
    let len = window.as_secs().max(1);
    let windows = match criteria.get("durationSeconds") {
        None if timed => {
            c.bad("criteria.durationSeconds", format!("missing: {metric} is counted over a time; use 300, 600, 900, 1800, 3600 or a multiple of metering.window ({len} s)"));
            1
        }
        None => 1,
        Some(d) => match d.as_u64() {
            Some(d) if d > 0 && d % len == 0 && (d / len) as usize <= kept.max(1) => {
                (d / len) as u32
            }
            Some(d) if d > 0 && d % len == 0 => {
                c.bad(
                    "criteria.durationSeconds",
                    format!(
                        "{d} s is {} windows; the gateway keeps {kept} (metering.windows_kept)",
                        d / len
                    ),
                );
                1
            }
            Some(d) if AWS_DURATIONS.contains(&d) => {
                c.bad("criteria.durationSeconds", format!("{d} s is not a multiple of metering.window ({len} s); make the window divide it"));
                1
            }
            _ => {
                c.bad("criteria.durationSeconds", format!("{d}: use 300, 600, 900, 1800, 3600 or a multiple of metering.window ({len} s)"));
                1
            }
        },
    };
    let to_alarm = datapoints(&mut c, criteria, "consecutiveDatapointsToAlarm");
    let to_clear = datapoints(&mut c, criteria, "consecutiveDatapointsToClear");
    let suppress_alerts = match obj.get("suppressAlerts") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            c.bad("suppressAlerts", "expected true or false");
            false
        }
    };
    if c.problems.len() > before {
        return None;
    }
    Some(Behavior {
        name: Arc::from(name),
        metric: metric.to_owned(),
        side,
        shape,
        criterion,
        windows,
        to_alarm,
        to_clear,
        suppress_alerts,
        raw: v.clone(),
    })
}

/// The behaviors of a profile's `behaviors_file`: a bare array of behaviors, or the whole
/// output of `aws iot describe-security-profile` (its `behaviors`).
fn behaviors_of_file(path: &std::path::Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    match v {
        Value::Array(items) => Ok(items),
        Value::Object(mut o) => match o.remove("behaviors") {
            Some(Value::Array(items)) => Ok(items),
            _ => Err(format!("{}: expected an array of behaviors or an object with `behaviors` (the output of `aws iot describe-security-profile`)", path.display())),
        },
        _ => Err(format!("{}: expected an array of behaviors", path.display())),
    }
}

/// Compile profile `i`; every problem it has when it has any.
pub fn compile(
    i: usize,
    p: &ProfileConfig,
    window: Duration,
    kept: usize,
) -> Result<Profile, Vec<Problem>> {
    let prefix = format!("defender.profiles[{i}]");
    let mut problems = Vec::new();
    let name_ok = !p.name.is_empty()
        && p.name.len() <= 128
        && p.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'));
    if !name_ok {
        problems.push(Problem {
            key: format!("{prefix}.name"),
            message: format!("`{}` is not a security profile name: use 1–128 of letters, digits, `_`, `-`, `:` (as AWS)", p.name),
        });
    }
    let mut targets = Vec::new();
    if p.targets.is_empty() {
        problems.push(Problem {
            key: format!("{prefix}.targets"),
            message: format!(
                "security profile `{}` targets nothing: give device ids, \"kind:<kind>\" or \"*\"",
                p.name
            ),
        });
    }
    for (j, t) in p.targets.iter().enumerate() {
        if t == "*" {
            targets.push(Target::All);
        } else if let Some(kind) = t.strip_prefix("kind:") {
            if crate::config::valid_kind_name(kind) {
                targets.push(Target::Kind(kind.to_owned()));
            } else {
                problems.push(Problem {
                    key: format!("{prefix}.targets[{j}]"),
                    message: format!("`{kind}` is not a device kind"),
                });
            }
        } else if crate::config::valid_thing_name(t) {
            targets.push(Target::Device(t.clone()));
        } else {
            problems.push(Problem {
                key: format!("{prefix}.targets[{j}]"),
                message: format!("`{t}`: use a device id, \"kind:<kind>\" or \"*\""),
            });
        }
    }
    let mut raw: Vec<(Value, String)> = p
        .behaviors
        .iter()
        .enumerate()
        .map(|(j, b)| (b.clone(), format!("{prefix}.behaviors[{j}]")))
        .collect();
    if let Some(file) = &p.behaviors_file {
        match behaviors_of_file(file) {
            Ok(items) => raw.extend(items.into_iter().enumerate().map(|(j, b)| {
                (
                    b,
                    format!("{prefix}.behaviors_file({}).behaviors[{j}]", file.display()),
                )
            })),
            Err(e) => problems.push(Problem {
                key: format!("{prefix}.behaviors_file"),
                message: e,
            }),
        }
    }
    if raw.is_empty() && p.behaviors_file.is_none() {
        problems.push(Problem {
            key: format!("{prefix}.behaviors"),
            message: format!("security profile `{}` has no behaviors: add [[defender.profiles.behaviors]] or behaviors_file", p.name),
        });
    }
    let mut behaviors: Vec<Behavior> = Vec::new();
    for (v, at) in raw {
        if let Some(b) = behavior(&v, at.clone(), &p.name, window, kept, &mut problems) {
            if behaviors.iter().any(|o| o.name == b.name) {
                problems.push(Problem {
                    key: format!("{at}.name"),
                    message: format!(
                        "security profile `{}`: behavior name `{}` is used twice",
                        p.name, b.name
                    ),
                });
            }
            behaviors.push(b);
        }
    }
    let mut quarantine = None;
    for a in &p.actions {
        if let crate::config::ActionConfig::Quarantine { duration } = a {
            quarantine = Some(*duration);
        }
    }
    let actions = match crate::rules::Actions::compile(&prefix, &p.name, &p.actions) {
        Ok(a) => Some(a),
        Err(mut e) => {
            problems.append(&mut e);
            None
        }
    };
    match actions {
        Some(actions) if problems.is_empty() => Ok(Profile {
            name: Arc::from(p.name.as_str()),
            targets,
            behaviors,
            actions: Arc::new(actions),
            quarantine,
        }),
        _ => Err(problems),
    }
}

/// Every problem of every profile (for `check-config`).
pub fn check(c: &DefenderConfig, window: Duration, kept: usize) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen = HashMap::new();
    for (i, p) in c.profiles.iter().enumerate() {
        if let Some(first) = seen.insert(p.name.as_str(), i) {
            problems.push(Problem {
                key: format!("defender.profiles[{i}].name"),
                message: format!(
                    "security profile name `{}` is already used by defender.profiles[{first}]",
                    p.name
                ),
            });
        }
        if let Err(mut e) = compile(i, p, window, kept) {
            problems.append(&mut e);
        }
    }
    problems
}

/// Device-side data of one device in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportWindow {
    /// Window start, epoch seconds.
    pub start_s: u64,
    /// Sums of the reports' `network_stats` in it: bytes in, bytes out, packets in, packets out.
    pub network: [Option<u64>; 4],
    /// The newest report's other metrics, as measured values by metric name.
    pub latest: BTreeMap<String, Measured>,
}

/// The device-side metrics every device's agent reported, per window.
#[derive(Debug, Clone, Default)]
pub struct Reports {
    window_s: u64,
    kept: usize,
    devices: HashMap<Arc<str>, VecDeque<ReportWindow>>,
}

/// One measured value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measured {
    /// A count or number.
    Number(f64),
    /// Numbers.
    Numbers(Vec<f64>),
    /// Strings.
    Strings(Vec<String>),
    /// Addresses.
    Ips(Vec<IpAddr>),
    /// Ports.
    Ports(Vec<u16>),
}

impl Measured {
    /// AWS's `metricValue` for a metric of `shape`.
    fn metric_value(&self, shape: Shape) -> Value {
        match (self, shape) {
            (Measured::Number(n), Shape::Count) => json!({ "count": *n as u64 }),
            (Measured::Number(n), _) => json!({ "number": n }),
            (Measured::Numbers(ns), _) => json!({ "numbers": ns }),
            (Measured::Strings(ss), _) => json!({ "strings": ss }),
            (Measured::Ips(ips), _) => {
                json!({ "cidrs": ips.iter().map(ToString::to_string).collect::<Vec<_>>() })
            }
            (Measured::Ports(ps), _) => json!({ "ports": ps }),
        }
    }
}

fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

impl Reports {
    /// Windows of `window`, `kept` per device.
    pub fn new(window: Duration, kept: usize) -> Self {
        Self {
            window_s: window.as_secs().max(1),
            kept: kept.max(1),
            devices: HashMap::new(),
        }
    }

    /// Record `report` from `device`, received at `now_s`.
    pub fn add(&mut self, device: &Arc<str>, report: &Report, now_s: u64) {
        let start = now_s - now_s % self.window_s;
        let windows = self.devices.entry(device.clone()).or_default();
        if windows.back().is_none_or(|w| w.start_s != start) {
            windows.push_back(ReportWindow {
                start_s: start,
                ..Default::default()
            });
            while windows.len() > self.kept {
                windows.pop_front();
            }
        }
        let Some(w) = windows.back_mut() else { return };
        let mut latest = BTreeMap::new();
        if let Some(m) = &report.metrics {
            if let Some(ns) = m.network_stats {
                for (slot, v) in w.network.iter_mut().zip([
                    ns.bytes_in,
                    ns.bytes_out,
                    ns.packets_in,
                    ns.packets_out,
                ]) {
                    *slot = add(*slot, v);
                }
            }
            for (list, count, ports) in [
                (
                    &m.listening_tcp_ports,
                    "aws:num-listening-tcp-ports",
                    "aws:listening-tcp-ports",
                ),
                (
                    &m.listening_udp_ports,
                    "aws:num-listening-udp-ports",
                    "aws:listening-udp-ports",
                ),
            ] {
                if let Some(l) = list {
                    let ps: BTreeSet<u16> = l.ports.iter().map(|p| p.port).collect();
                    let n = l.total.unwrap_or(l.ports.len() as u64);
                    latest.insert(count.to_owned(), Measured::Number(n as f64));
                    latest.insert(ports.to_owned(), Measured::Ports(ps.into_iter().collect()));
                }
            }
            if let Some(ec) = &m.established_connections {
                let n = ec.total.unwrap_or(ec.connections.len() as u64);
                latest.insert(
                    "aws:num-established-tcp-connections".into(),
                    Measured::Number(n as f64),
                );
                let ips: BTreeSet<IpAddr> = ec
                    .connections
                    .iter()
                    .map(|c| c.remote_addr.ip().to_canonical())
                    .collect();
                latest.insert(
                    "aws:destination-ip-addresses".into(),
                    Measured::Ips(ips.into_iter().collect()),
                );
            }
        }
        for (name, v) in &report.custom_metrics {
            let m = match v {
                CustomValue::Number(n) => Measured::Number(*n),
                CustomValue::NumberList(ns) => Measured::Numbers(ns.clone()),
                CustomValue::StringList(ss) => Measured::Strings(ss.clone()),
                CustomValue::IpList(ips) => Measured::Ips(ips.clone()),
            };
            latest.insert(name.clone(), m);
        }
        // A report that carries a metric replaces the window's value of it; the others stay.
        w.latest.extend(latest);
    }

    /// Forget a device (gone from the registry).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.devices.retain(|d, _| keep(d));
    }

    fn measure(&self, device: &str, b: &Behavior, end_s: u64) -> Option<Measured> {
        let windows = self.devices.get(device)?;
        let from = end_s.saturating_sub(u64::from(b.windows) * self.window_s);
        let range = windows
            .iter()
            .filter(|w| w.start_s >= from && w.start_s < end_s);
        let slot = match b.metric.as_str() {
            "aws:all-bytes-in" => Some(0),
            "aws:all-bytes-out" => Some(1),
            "aws:all-packets-in" => Some(2),
            "aws:all-packets-out" => Some(3),
            _ => None,
        };
        match slot {
            Some(i) => range
                .fold(None, |acc, w| add(acc, w.network[i]))
                .map(|n| Measured::Number(n as f64)),
            None => range.rev().find_map(|w| w.latest.get(&b.metric).cloned()),
        }
    }
}

/// The cloud-side value of `b`'s metric for one device over the windows ending at `end_s`
/// (`None`: the device was not there).
fn measure_cloud(s: &DeviceSnapshot, b: &Behavior, end_s: u64) -> Option<Measured> {
    let len = s.current.length_s.max(1);
    let from = end_s.saturating_sub(u64::from(b.windows) * len);
    let range = || {
        s.history
            .iter()
            .rev()
            .skip_while(move |w| w.start_s >= end_s)
            .take_while(move |w| w.start_s >= from)
    };
    let present = s.connected
        || range().any(|w| {
            let c = &w.counters;
            c.connection_attempts + c.disconnects + c.messages_sent + c.bytes_in > 0
        });
    if !present {
        return None;
    }
    let sum = |f: fn(&crate::metering::Counters) -> u64| -> Measured {
        Measured::Number(range().map(|w| f(&w.counters)).sum::<u64>() as f64)
    };
    Some(match b.metric.as_str() {
        "aws:num-messages-sent" => sum(|c| c.messages_sent),
        "aws:num-messages-received" => sum(|c| c.messages_received),
        "aws:num-authorization-failures" => sum(|c| c.authorization_failures),
        "aws:num-connection-attempts" => sum(|c| c.connection_attempts),
        "aws:num-disconnects" => sum(|c| c.disconnects),
        "aws:message-byte-size" => Measured::Number(
            range()
                .map(|w| w.counters.largest_message_bytes)
                .max()
                .unwrap_or(0) as f64,
        ),
        "aws:source-ip-address" => {
            let ips: BTreeSet<IpAddr> = range()
                .flat_map(|w| w.source_addresses.iter().copied())
                .collect();
            if ips.is_empty() {
                return None;
            }
            Measured::Ips(ips.into_iter().collect())
        }
        _ => return None,
    })
}

/// The percentile `p` (0–100) of `values`, by linear interpolation between closest ranks.
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = p.clamp(0.0, 100.0) / 100.0 * (values.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(values[lo] + (values[hi] - values[lo]) * (rank - lo as f64))
}

fn compare(op: &str, x: f64, against: f64) -> bool {
    match op {
        "less-than" => x < against,
        "less-than-equals" => x <= against,
        "greater-than" => x > against,
        _ => x >= against,
    }
}

/// Whether `m` meets `criterion` (a statistical one against `threshold`). An empty list
/// always complies (as on AWS).
fn complies(criterion: &Criterion, m: &Measured, threshold: Option<f64>) -> Option<bool> {
    Some(match (criterion, m) {
        (Criterion::Compare(op, Against::Value(v)), Measured::Number(x)) => compare(op, *x, *v),
        (Criterion::Compare(op, Against::Statistic(_)), Measured::Number(x)) => {
            compare(op, *x, threshold?)
        }
        (Criterion::Cidrs(inside, cidrs), Measured::Ips(ips)) => ips
            .iter()
            .all(|ip| cidrs.iter().any(|c| c.contains(*ip)) == *inside),
        (Criterion::Ports(inside, set), Measured::Ports(ps)) => {
            ps.iter().all(|p| set.contains(p) == *inside)
        }
        (Criterion::Numbers(inside, set), Measured::Numbers(ns)) => {
            ns.iter().all(|n| set.contains(n) == *inside)
        }
        (Criterion::Strings(inside, set), Measured::Strings(ss)) => {
            ss.iter().all(|s| set.contains(s) == *inside)
        }
        _ => return None,
    })
}

/// One device's state for one behavior of one profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Track {
    /// Violating datapoints in a row.
    pub violating: u32,
    /// Compliant datapoints in a row.
    pub compliant: u32,
    /// When the last datapoint was, epoch ms.
    pub last_datapoint_ms: i64,
    /// The active violation, if any.
    pub violation: Option<Violation>,
}

/// An active violation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    /// AWS-style id (32 hex digits).
    pub id: String,
    /// When it started (`in-alarm`), epoch ms.
    pub started_ms: i64,
    /// The value that raised or last confirmed it (AWS's `metricValue`).
    pub metric_value: Value,
}

/// What happened to a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// `in-alarm`.
    #[serde(rename = "in-alarm")]
    InAlarm,
    /// `alarm-cleared`.
    #[serde(rename = "alarm-cleared")]
    Cleared,
    /// `alarm-invalidated`.
    #[serde(rename = "alarm-invalidated")]
    Invalidated,
}

impl EventType {
    /// AWS's name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::InAlarm => "in-alarm",
            EventType::Cleared => "alarm-cleared",
            EventType::Invalidated => "alarm-invalidated",
        }
    }
}

/// A violation event, ready to send: AWS's violation message.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Which profile (index in the profiles).
    pub profile: usize,
    /// Which behavior of it.
    pub behavior: usize,
    /// The device (`thingName`).
    pub device: Arc<str>,
    /// What happened.
    pub kind: EventType,
    /// The message (`violationEventTime`, `thingName`, `behavior`, `violationEventType`,
    /// `metricValue`, `violationId`, `securityProfileName`).
    pub message: Value,
}

/// Key of a [`Track`]: profile name, behavior name, device id.
pub type TrackKey = (Arc<str>, Arc<str>, Arc<str>);

/// Everything one evaluation looks at.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Registered devices: id and kind.
    pub devices: &'a [(Arc<str>, String)],
    /// Meter snapshots by device id.
    pub meters: &'a HashMap<Arc<str>, DeviceSnapshot>,
    /// Device-side reports.
    pub reports: &'a Reports,
    /// End of the window just closed, epoch seconds.
    pub end_s: u64,
    /// Now, epoch ms (event times).
    pub now_ms: i64,
}

/// The detector: profiles and every device's streaks.
#[derive(Debug)]
pub struct Detector {
    /// The compiled profiles.
    pub profiles: Vec<Profile>,
    /// Streaks and violations.
    pub tracks: BTreeMap<TrackKey, Track>,
    min_devices: usize,
    invalidate_after_ms: i64,
    /// Statistical behaviors skipped for want of devices, by (profile, behavior).
    pub too_few_devices: BTreeSet<(Arc<str>, Arc<str>)>,
}

fn violation_id() -> String {
    use rand::Rng;
    format!("{:032x}", rand::thread_rng().gen::<u128>())
}

impl Detector {
    /// Profiles compiled from a validated configuration (a profile that still fails is logged
    /// and left out).
    pub fn new(c: &DefenderConfig, window: Duration, kept: usize) -> Self {
        let mut profiles = Vec::new();
        for (i, p) in c.profiles.iter().enumerate() {
            match compile(i, p, window, kept) {
                Ok(p) => profiles.push(p),
                Err(problems) => {
                    for pr in problems {
                        log::error!(security_profile:% = p.name, key:% = pr.key; "security profile not loaded: {}", pr.message);
                    }
                }
            }
        }
        Self {
            profiles,
            tracks: BTreeMap::new(),
            min_devices: c.statistics_min_devices.max(1),
            invalidate_after_ms: c.invalidate_after.as_millis().min(i64::MAX as u128) as i64,
            too_few_devices: BTreeSet::new(),
        }
    }

    /// Evaluate every behavior for every targeted device at the end of a window.
    pub fn evaluate(&mut self, inp: &Inputs<'_>) -> Vec<Event> {
        let mut events = Vec::new();
        self.too_few_devices.clear();
        for (pi, p) in self.profiles.iter().enumerate() {
            let targeted: Vec<&(Arc<str>, String)> = inp
                .devices
                .iter()
                .filter(|(id, kind)| p.targets(id, kind))
                .collect();
            for (bi, b) in p.behaviors.iter().enumerate() {
                let measured: Vec<(Arc<str>, Option<Measured>)> = targeted
                    .iter()
                    .map(|(id, _)| {
                        let m = match b.side {
                            Side::Cloud => inp
                                .meters
                                .get(id)
                                .and_then(|s| measure_cloud(s, b, inp.end_s)),
                            Side::Device => inp.reports.measure(id, b, inp.end_s),
                        };
                        (id.clone(), m)
                    })
                    .collect();
                let threshold = match &b.criterion {
                    Criterion::Compare(_, Against::Statistic(pct)) => {
                        let mut values: Vec<f64> = measured
                            .iter()
                            .filter_map(|(_, m)| match m {
                                Some(Measured::Number(x)) => Some(*x),
                                _ => None,
                            })
                            .collect();
                        if values.len() < self.min_devices {
                            self.too_few_devices
                                .insert((p.name.clone(), b.name.clone()));
                            continue;
                        }
                        percentile(&mut values, *pct)
                    }
                    _ => None,
                };
                for (device, m) in measured {
                    let verdict = m
                        .as_ref()
                        .and_then(|m| complies(&b.criterion, m, threshold).map(|ok| (ok, m)));
                    let key = (p.name.clone(), b.name.clone(), device.clone());
                    match (&verdict, self.tracks.get(&key)) {
                        // Compliant and not in alarm: no state to keep (a violating streak
                        // ends here).
                        (Some((true, _)), t) if t.is_none_or(|t| t.violation.is_none()) => {
                            if t.is_some() {
                                self.tracks.remove(&key);
                            }
                            continue;
                        }
                        (None, None) => continue,
                        _ => {}
                    }
                    let track = self.tracks.entry(key.clone()).or_default();
                    let kind = match verdict {
                        Some((ok, m)) => {
                            track.last_datapoint_ms = inp.now_ms;
                            if ok {
                                track.compliant += 1;
                                track.violating = 0;
                                match &track.violation {
                                    Some(_) if track.compliant >= b.to_clear => {
                                        Some((EventType::Cleared, m.metric_value(b.shape)))
                                    }
                                    _ => None,
                                }
                            } else {
                                track.violating += 1;
                                track.compliant = 0;
                                match &mut track.violation {
                                    None if track.violating >= b.to_alarm => {
                                        Some((EventType::InAlarm, m.metric_value(b.shape)))
                                    }
                                    Some(v) => {
                                        v.metric_value = m.metric_value(b.shape);
                                        None
                                    }
                                    None => None,
                                }
                            }
                        }
                        None => match &track.violation {
                            Some(v)
                                if inp.now_ms - track.last_datapoint_ms.max(v.started_ms)
                                    >= self.invalidate_after_ms =>
                            {
                                Some((EventType::Invalidated, v.metric_value.clone()))
                            }
                            _ => None,
                        },
                    };
                    let Some((kind, value)) = kind else {
                        if track == &Track::default() {
                            self.tracks.remove(&key);
                        }
                        continue;
                    };
                    let id = match kind {
                        EventType::InAlarm => {
                            let id = violation_id();
                            track.violation = Some(Violation {
                                id: id.clone(),
                                started_ms: inp.now_ms,
                                metric_value: value.clone(),
                            });
                            id
                        }
                        EventType::Cleared | EventType::Invalidated => {
                            let id = track.violation.take().map(|v| v.id).unwrap_or_default();
                            track.violating = 0;
                            id
                        }
                    };
                    events.push(Event {
                        profile: pi,
                        behavior: bi,
                        device: device.clone(),
                        kind,
                        message: json!({
                            "violationEventTime": inp.now_ms,
                            "thingName": &*device,
                            "behavior": b.raw,
                            "violationEventType": kind.as_str(),
                            "metricValue": value,
                            "violationId": id,
                            "securityProfileName": &*p.name,
                        }),
                    });
                }
            }
        }
        // Tracks of behaviors or devices no longer configured go.
        let live: BTreeSet<(&str, &str)> = self
            .profiles
            .iter()
            .flat_map(|p| p.behaviors.iter().map(move |b| (&*p.name, &*b.name)))
            .collect();
        let devices: BTreeSet<&str> = inp.devices.iter().map(|(d, _)| &**d).collect();
        self.tracks
            .retain(|(p, b, d), _| live.contains(&(&**p, &**b)) && devices.contains(&**d));
        events
    }

    /// Take `tracks` (stored, or a previous detector's) as its own, keeping only those of
    /// behaviors it has (same profile and behavior name): a removed behavior's streaks and
    /// violations end with it.
    pub fn adopt(&mut self, tracks: BTreeMap<TrackKey, Track>) {
        let live: BTreeSet<(Arc<str>, Arc<str>)> = self
            .profiles
            .iter()
            .flat_map(|p| p.behaviors.iter().map(|b| (p.name.clone(), b.name.clone())))
            .collect();
        self.tracks = tracks
            .into_iter()
            .filter(|(k, _)| live.contains(&(k.0.clone(), k.1.clone())))
            .collect();
    }

    /// Active violations: (profile, behavior, device, violation).
    pub fn active(&self) -> impl Iterator<Item = (&TrackKey, &Violation)> {
        self.tracks
            .iter()
            .filter_map(|(k, t)| t.violation.as_ref().map(|v| (k, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::{Counters, Window};

    const W: u64 = 10;

    fn profile(toml_text: &str) -> Result<Profile, Vec<Problem>> {
        let p: ProfileConfig = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"));
        compile(0, &p, Duration::from_secs(W), 360)
    }

    fn detector(toml_text: &str, min_devices: usize) -> Detector {
        let p: ProfileConfig = toml::from_str(toml_text).unwrap();
        let c = DefenderConfig {
            profiles: vec![p],
            statistics_min_devices: min_devices,
            invalidate_after: Duration::from_secs(60),
            ..Default::default()
        };
        let d = Detector::new(&c, Duration::from_secs(W), 12);
        assert_eq!(d.profiles.len(), 1, "profile compiles");
        d
    }

    fn keys(r: Result<Profile, Vec<Problem>>) -> Vec<String> {
        match r {
            Ok(_) => vec![],
            Err(ps) => ps.into_iter().map(|p| p.key).collect(),
        }
    }

    const ROGUE: &str = r#"
name = "CheckRogueDevices"
[[behaviors]]
name = "msgReceive"
metric = "aws:num-messages-received"
criteria = { comparisonOperator = "less-than", value = { count = 100 }, durationSeconds = 10 }
[[behaviors]]
name = "bytesOut"
metric = "aws:all-bytes-out"
criteria = { comparisonOperator = "less-than", value = { count = 10000 }, durationSeconds = 20, consecutiveDatapointsToAlarm = 2, consecutiveDatapointsToClear = 2 }
"#;

    #[test]
    fn behaviors_in_aws_shape_compile_and_mistakes_name_profile_behavior_and_field() {
        assert!(profile(ROGUE).is_ok());
        let bad = |criteria: &str, metric: &str| {
            keys(profile(&format!("name = \"P\"\n[[behaviors]]\nname = \"b\"\nmetric = \"{metric}\"\ncriteria = {criteria}\n")))
        };
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "in-cidr-set", value = { count = 1 }, durationSeconds = 300 }"#,
                "aws:num-messages-sent"
            ),
            ["defender.profiles[0].behaviors[0].criteria.comparisonOperator"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "less-than", value = { count = 1 }, durationSeconds = 7 }"#,
                "aws:num-messages-sent"
            ),
            ["defender.profiles[0].behaviors[0].criteria.durationSeconds"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "less-than", value = { count = 1 } }"#,
                "aws:num-messages-sent"
            ),
            ["defender.profiles[0].behaviors[0].criteria.durationSeconds"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "less-than", value = { count = -1 }, durationSeconds = 300 }"#,
                "aws:num-messages-sent"
            ),
            ["defender.profiles[0].behaviors[0].criteria.value.count"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "less-than", value = { cidrs = ["10.0.0.0/8"] }, durationSeconds = 300 }"#,
                "aws:num-messages-sent"
            ),
            ["defender.profiles[0].behaviors[0].criteria.value"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "in-cidr-set", value = { cidrs = ["10.0.0.0/33"] } }"#,
                "aws:source-ip-address"
            ),
            ["defender.profiles[0].behaviors[0].criteria.value.cidrs[0]"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "in-port-set", value = { ports = [22, 0] } }"#,
                "aws:listening-tcp-ports"
            ),
            ["defender.profiles[0].behaviors[0].criteria.value.ports[1]"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "greater-than", statisticalThreshold = { statistic = "p42" }, durationSeconds = 300 }"#,
                "aws:num-messages-sent"
            ),
            ["defender.profiles[0].behaviors[0].criteria.statisticalThreshold.statistic"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "less-than", value = { count = 1 }, durationSeconds = 300, consecutiveDatapointsToAlarm = 11 }"#,
                "aws:num-messages-sent"
            ),
            ["defender.profiles[0].behaviors[0].criteria.consecutiveDatapointsToAlarm"]
        );
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "less-than", value = { count = 1 } }"#,
                "aws:num-messages"
            ),
            ["defender.profiles[0].behaviors[0].metric"]
        );
        // Custom metrics take their type from the value.
        assert!(bad(
            r#"{ comparisonOperator = "less-than", value = { number = 90.5 } }"#,
            "cpu_usage"
        )
        .is_empty());
        assert!(bad(
            r#"{ comparisonOperator = "in-set", value = { strings = ["a"] } }"#,
            "firmware"
        )
        .is_empty());
        assert_eq!(
            bad(
                r#"{ comparisonOperator = "in-set", value = { number = 1 } }"#,
                "cpu_usage"
            ),
            ["defender.profiles[0].behaviors[0].criteria.comparisonOperator"]
        );
        // The message names the profile and the behavior.
        let Err(ps) = profile("name = \"P\"\n[[behaviors]]\nname = \"b\"\nmetric = \"aws:num-disconnects\"\ncriteria = { comparisonOperator = \"equals\", value = { count = 1 }, durationSeconds = 300 }\n") else { panic!() };
        assert!(
            ps[0]
                .message
                .starts_with("security profile `P`, behavior `b`: `equals` is not valid"),
            "{}",
            ps[0].message
        );
        assert_eq!(
            keys(profile("name = \"P\"\ntargets = []\n")),
            [
                "defender.profiles[0].targets",
                "defender.profiles[0].behaviors"
            ]
        );
        assert_eq!(
            keys(profile("name = \"P\"\nactions = [{ quarantine = { duration = \"0s\" } }]\n[[behaviors]]\nname = \"b\"\nmetric = \"aws:num-disconnects\"\ncriteria = { comparisonOperator = \"less-than\", value = { count = 1 }, durationSeconds = 300 }\n")),
            ["defender.profiles[0].actions[0].quarantine.duration"]
        );
    }

    #[test]
    fn a_describe_security_profile_export_is_read_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.json");
        std::fs::write(&file, r#"{"securityProfileName":"NormalHTTPTraffic","securityProfileArn":"arn:aws:iot:eu-west-1:1:securityprofile/x","version":1,
          "behaviors":[{"name":"PacketsOut","metric":"aws:all-packets-out","criteria":{"value":{"count":100},"durationSeconds":300,"comparisonOperator":"less-than"},"suppressAlerts":false}]}"#).unwrap();
        let p = profile(&format!(
            "name = \"NormalHTTPTraffic\"\nbehaviors_file = \"{}\"\n",
            file.display()
        ))
        .unwrap();
        assert_eq!(&*p.behaviors[0].name, "PacketsOut");
        assert_eq!(p.behaviors[0].windows, 30);
        std::fs::write(&file, r#"[{"name":"x","metric":"aws:all-packets-out","criteria":{"value":{"count":"many"},"durationSeconds":300,"comparisonOperator":"less-than"}}]"#).unwrap();
        let ks = keys(profile(&format!(
            "name = \"P\"\nbehaviors_file = \"{}\"\n",
            file.display()
        )));
        assert_eq!(
            ks,
            [format!(
                "defender.profiles[0].behaviors_file({}).behaviors[0].criteria.value.count",
                file.display()
            )]
        );
    }

    fn snapshot(id: &str, windows: &[(u64, Counters)]) -> DeviceSnapshot {
        let w = |start_s, counters: Counters| Window {
            start_s,
            length_s: W,
            counters,
            source_addresses: BTreeSet::new(),
        };
        DeviceSnapshot {
            device_id: id.into(),
            connected: true,
            peer: None,
            listener: None,
            totals: Counters::default(),
            current: w(
                windows.last().map(|x| x.0 + W).unwrap_or(0),
                Counters::default(),
            ),
            history: windows.iter().map(|(s, c)| w(*s, c.clone())).collect(),
        }
    }

    fn received(n: u64) -> Counters {
        Counters {
            messages_received: n,
            ..Default::default()
        }
    }

    #[test]
    fn datapoints_to_alarm_and_to_clear_and_invalidation() {
        let mut d = detector(ROGUE, 1);
        let devices: Vec<(Arc<str>, String)> = vec![
            ("rogue-01".into(), "generic".into()),
            ("pm-01".into(), "pacemaker".into()),
        ];
        let mut reports = Reports::new(Duration::from_secs(W), 12);
        let report = |bytes_out: u64, id: u64| -> Report {
            let text = format!(
                r#"{{"header":{{"report_id":{id},"version":"1.0"}},"metrics":{{"network_stats":{{"bytes_out":{bytes_out}}}}}}}"#
            );
            Report::parse(text.as_bytes(), super::super::report::Format::Json)
                .unwrap()
                .0
        };
        let run = |d: &mut Detector, reports: &Reports, end_s: u64, rogue_received: u64| {
            let meters: HashMap<Arc<str>, DeviceSnapshot> = [
                (
                    "rogue-01".into(),
                    snapshot("rogue-01", &[(end_s - W, received(rogue_received))]),
                ),
                (
                    "pm-01".into(),
                    snapshot("pm-01", &[(end_s - W, received(0))]),
                ),
            ]
            .into_iter()
            .collect();
            d.evaluate(&Inputs {
                devices: &devices,
                meters: &meters,
                reports,
                end_s,
                now_ms: end_s as i64 * 1000,
            })
            .into_iter()
            .map(|e| {
                (
                    e.device.to_string(),
                    d.profiles[e.profile].behaviors[e.behavior].name.clone(),
                    e.kind,
                )
            })
            .collect::<Vec<_>>()
        };
        let rogue: Arc<str> = "rogue-01".into();
        // Window 1000..1010: 300 messages received → msgReceive alarms at once (1 datapoint);
        // 6 000 bytes out: compliant.
        reports.add(&rogue, &report(6000, 1), 1005);
        assert_eq!(
            run(&mut d, &reports, 1010, 300),
            [("rogue-01".into(), "msgReceive".into(), EventType::InAlarm)]
        );
        // 1010..1020: 6 000 more bytes: 12 000 over the 20 s duration → violating, 1 of 2.
        reports.add(&rogue, &report(6000, 2), 1015);
        assert_eq!(run(&mut d, &reports, 1020, 300), []);
        reports.add(&rogue, &report(6000, 3), 1025);
        assert_eq!(
            run(&mut d, &reports, 1030, 300),
            [("rogue-01".into(), "bytesOut".into(), EventType::InAlarm)]
        );
        let message = d
            .active()
            .find(|(k, _)| &*k.1 == "bytesOut")
            .map(|(_, v)| v.metric_value.clone())
            .unwrap();
        assert_eq!(message, json!({"count": 12000}));
        // Quiet: msgReceive clears after 1 compliant datapoint; bytesOut needs 2.
        reports.add(&rogue, &report(10, 4), 1035);
        // (1040: 6 010 bytes over 1020..1040, compliant 1 of 2.)
        assert_eq!(
            run(&mut d, &reports, 1040, 3),
            [("rogue-01".into(), "msgReceive".into(), EventType::Cleared)]
        );
        reports.add(&rogue, &report(10, 5), 1045);
        assert_eq!(
            run(&mut d, &reports, 1050, 3),
            [("rogue-01".into(), "bytesOut".into(), EventType::Cleared)]
        );
        reports.add(&rogue, &report(10, 6), 1055);
        assert_eq!(run(&mut d, &reports, 1060, 3), []);
        // In alarm again, then the agent stops reporting: invalidated after 60 s without data.
        reports.add(&rogue, &report(20000, 7), 1065);
        assert_eq!(run(&mut d, &reports, 1070, 3), []);
        assert_eq!(
            run(&mut d, &reports, 1080, 3),
            [("rogue-01".into(), "bytesOut".into(), EventType::InAlarm)]
        );
        let mut invalidated = vec![];
        for end in (1090..=1150).step_by(10) {
            invalidated.extend(run(&mut d, &reports, end, 3));
        }
        assert_eq!(
            invalidated,
            [("rogue-01".into(), "bytesOut".into(), EventType::Invalidated)]
        );
        assert_eq!(d.active().count(), 0);
        // pm-01 never violated anything.
        assert!(d
            .tracks
            .keys()
            .all(|k| &*k.2 != "pm-01" || d.tracks[k].violation.is_none()));
    }

    #[test]
    fn a_statistical_threshold_catches_only_the_outlier() {
        let mut d = detector(
            r#"
name = "Outliers"
[[behaviors]]
name = "sent"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than-equals", statisticalThreshold = { statistic = "p90" }, durationSeconds = 10 }
"#,
            5,
        );
        let mut devices: Vec<(Arc<str>, String)> = (0..50)
            .map(|i| (Arc::from(format!("pm-{i:02}")), "pacemaker".to_owned()))
            .collect();
        devices.push(("rogue".into(), "generic".into()));
        let meters: HashMap<Arc<str>, DeviceSnapshot> = devices
            .iter()
            .map(|(id, _)| {
                let n = if &**id == "rogue" {
                    900
                } else {
                    20 + (id.len() as u64 % 3)
                };
                (
                    id.clone(),
                    snapshot(
                        id,
                        &[(
                            1000,
                            Counters {
                                messages_sent: n,
                                ..Default::default()
                            },
                        )],
                    ),
                )
            })
            .collect();
        let reports = Reports::new(Duration::from_secs(W), 12);
        let events = d.evaluate(&Inputs {
            devices: &devices,
            meters: &meters,
            reports: &reports,
            end_s: 1010,
            now_ms: 1_010_000,
        });
        let who: Vec<&str> = events.iter().map(|e| &*e.device).collect();
        assert_eq!(who, ["rogue"]);
        assert_eq!(events[0].message["metricValue"], json!({"count": 900}));
        assert_eq!(events[0].message["securityProfileName"], "Outliers");
        assert_eq!(events[0].message["behavior"]["name"], "sent");
        // Too few devices: no datapoints at all.
        let few = &devices[46..];
        let mut d2 = detector(
            r#"
name = "Outliers"
[[behaviors]]
name = "sent"
metric = "aws:num-messages-sent"
criteria = { comparisonOperator = "less-than-equals", statisticalThreshold = { statistic = "p90" }, durationSeconds = 10 }
"#,
            10,
        );
        assert!(d2
            .evaluate(&Inputs {
                devices: few,
                meters: &meters,
                reports: &reports,
                end_s: 1010,
                now_ms: 1
            })
            .is_empty());
        assert_eq!(d2.too_few_devices.len(), 1);
    }

    #[test]
    fn set_criteria_and_percentiles() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        let inside = Criterion::Cidrs(true, vec![c]);
        assert_eq!(
            complies(
                &inside,
                &Measured::Ips(vec!["10.1.0.9".parse().unwrap()]),
                None
            ),
            Some(true)
        );
        assert_eq!(
            complies(
                &inside,
                &Measured::Ips(vec![
                    "10.1.0.9".parse().unwrap(),
                    "1.1.1.1".parse().unwrap()
                ]),
                None
            ),
            Some(false)
        );
        assert_eq!(
            complies(&inside, &Measured::Ips(vec![]), None),
            Some(true),
            "an empty list conforms"
        );
        let ports = Criterion::Ports(false, [23].into());
        assert_eq!(
            complies(&ports, &Measured::Ports(vec![22, 443]), None),
            Some(true)
        );
        assert_eq!(
            complies(&ports, &Measured::Ports(vec![22, 23]), None),
            Some(false)
        );
        let mut v = vec![3.0, 1.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 50.0), Some(2.5));
        assert_eq!(percentile(&mut v, 0.0), Some(1.0));
        assert_eq!(percentile(&mut v, 100.0), Some(4.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
