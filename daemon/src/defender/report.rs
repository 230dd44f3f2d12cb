//! Device Defender metrics reports: the document a device agent (or the gateway itself)
//! publishes on `$aws/things/<thing>/defender/metrics/{json|cbor}`.
//!
//! [`Report::parse`] reads JSON or CBOR, with AWS's long names (`header`, `metrics`, ...) or
//! short names (`hed`, `met`, ...), and checks it against AWS's schema: a `header` with a
//! positive integer `report_id` and `version` "1.0", and at least one of `metrics` /
//! `custom_metrics`. Every mistake is reported with the path of the field
//! (`metrics.listening_tcp_ports.ports[3].port`), so a device vendor can fix it from the
//! `/rejected` reply alone. [`Report::encode`] writes the long or short form.
//!
//! Each field may have its long or its short name, whatever the others have (not both): AWS's
//! own Python agent, asked for short names, still writes `port` and `interface` in its port
//! lists. Which form a report "is" (for the reply and for re-encoding) is the header's.
//!
//! What must stay true: parsing never panics and never allocates more than the input allows
//! (the gatekeeper bounds the payload); unknown fields are refused (AWS refuses them too), so
//! a misspelt metric is never silently dropped.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// The report format AWS documents.
pub const VERSION: &str = "1.0";

/// A parsed, valid report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `header.report_id`: increases from one report to the next (epoch seconds or ms).
    pub report_id: u64,
    /// `header.version`: always [`VERSION`].
    pub version: String,
    /// `metrics`, if present.
    pub metrics: Option<Metrics>,
    /// `custom_metrics`, by name (each one value, as AWS's array of one object).
    pub custom_metrics: BTreeMap<String, CustomValue>,
}

/// `metrics`: every part is optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// `listening_tcp_ports` (`tp`).
    pub listening_tcp_ports: Option<PortList>,
    /// `listening_udp_ports` (`up`).
    pub listening_udp_ports: Option<PortList>,
    /// `network_stats` (`ns`): deltas since the previous report.
    pub network_stats: Option<NetworkStats>,
    /// `tcp_connections.established_connections` (`tc.ec`).
    pub established_connections: Option<Connections>,
}

/// A list of listening ports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortList {
    /// `ports` (`pts`).
    pub ports: Vec<Port>,
    /// `total` (`t`): may be more than `ports.len()` (agents sample long lists down).
    pub total: Option<u64>,
}

/// One listening port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    /// `port` (`pt`).
    pub port: u16,
    /// `interface` (`if`): the interface name the port listens on, if known.
    pub interface: Option<String>,
}

/// `network_stats`: counts since the previous report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// `bytes_in` (`bi`).
    pub bytes_in: Option<u64>,
    /// `bytes_out` (`bo`).
    pub bytes_out: Option<u64>,
    /// `packets_in` (`pi`).
    pub packets_in: Option<u64>,
    /// `packets_out` (`po`).
    pub packets_out: Option<u64>,
}

/// `tcp_connections.established_connections`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connections {
    /// `connections` (`cs`).
    pub connections: Vec<Connection>,
    /// `total` (`t`).
    pub total: Option<u64>,
}

/// One established TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Connection {
    /// `remote_addr` (`rad`): `ip:port` (`[v6]:port` for IPv6).
    pub remote_addr: std::net::SocketAddr,
    /// `local_port` (`lp`).
    pub local_port: Option<u16>,
    /// `local_interface` (`li`).
    pub local_interface: Option<String>,
}

/// One custom metric's value.
#[derive(Debug, Clone, PartialEq)]
pub enum CustomValue {
    /// `{"number": x}`.
    Number(f64),
    /// `{"number_list": [..]}`.
    NumberList(Vec<f64>),
    /// `{"string_list": [..]}`.
    StringList(Vec<String>),
    /// `{"ip_list": [..]}`.
    IpList(Vec<std::net::IpAddr>),
}

/// Long and short field names, as AWS's schema pairs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// `header`, `report_id`, ...
    Long,
    /// `hed`, `rid`, ...
    Short,
}

/// Why a report was refused: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted path with long names (`metrics.network_stats.bytes_in`); empty: the document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for Invalid {}

/// Where the field names of each object come from: (long, short) pairs.
const TOP: &[(&str, &str)] = &[
    ("header", "hed"),
    ("metrics", "met"),
    ("custom_metrics", "cmet"),
];
const HEADER: &[(&str, &str)] = &[("report_id", "rid"), ("version", "v")];
const METRICS: &[(&str, &str)] = &[
    ("listening_tcp_ports", "tp"),
    ("listening_udp_ports", "up"),
    ("network_stats", "ns"),
    ("tcp_connections", "tc"),
];
const PORT_LIST: &[(&str, &str)] = &[("ports", "pts"), ("total", "t")];
const PORT: &[(&str, &str)] = &[("port", "pt"), ("interface", "if")];
const NETWORK: &[(&str, &str)] = &[
    ("bytes_in", "bi"),
    ("bytes_out", "bo"),
    ("packets_in", "pi"),
    ("packets_out", "po"),
];
const TCP: &[(&str, &str)] = &[("established_connections", "ec")];
const CONNECTIONS: &[(&str, &str)] = &[("connections", "cs"), ("total", "t")];
const CONNECTION: &[(&str, &str)] = &[
    ("remote_addr", "rad"),
    ("local_port", "lp"),
    ("local_interface", "li"),
];

/// Longest custom metric name and interface name accepted.
const MAX_NAME: usize = 128;
/// Most entries in one list (ports, connections, a custom metric's list): AWS's agents send
/// at most 50; a little room for other agents, and a bound on what one report costs.
pub const MAX_LIST: usize = 1000;

/// Reads one object of the schema, knowing which names it uses and where it is.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    names: Names,
    table: &'static [(&'static str, &'static str)],
    path: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

impl<'a> Fields<'a> {
    fn of(
        value: &'a Value,
        names: Names,
        table: &'static [(&'static str, &'static str)],
        path: String,
    ) -> Result<Self, Invalid> {
        let Value::Object(map) = value else {
            return Err(invalid(
                path,
                format!("expected an object, found {}", kind(value)),
            ));
        };
        for key in map.keys() {
            let Some((long, short)) = table.iter().find(|(l, s)| key == l || key == s) else {
                let expected: Vec<&str> = table
                    .iter()
                    .map(|(long, short)| if names == Names::Long { *long } else { *short })
                    .collect();
                return Err(invalid(
                    join(&path, key),
                    format!("unknown field; expected one of {}", expected.join(", ")),
                ));
            };
            if map.contains_key(*long) && map.contains_key(*short) {
                return Err(invalid(
                    join(&path, long),
                    format!("given twice, as `{long}` and as `{short}`"),
                ));
            }
        }
        Ok(Self {
            map,
            names,
            table,
            path,
        })
    }

    /// The value of `long` (or its short name), and its path.
    fn get(&self, long: &str) -> Option<(&'a Value, String)> {
        let (l, s) = self.table.iter().find(|(l, _)| *l == long)?;
        self.map
            .get(*l)
            .or_else(|| self.map.get(*s))
            .map(|v| (v, join(&self.path, l)))
    }

    fn count(&self, long: &str) -> Result<Option<u64>, Invalid> {
        self.get(long)
            .map(|(v, path)| {
                v.as_u64().ok_or_else(|| {
                    invalid(
                        path,
                        format!("expected a non-negative integer, found {}", show(v)),
                    )
                })
            })
            .transpose()
    }

    fn port(&self, long: &str) -> Result<Option<u16>, Invalid> {
        self.get(long)
            .map(|(v, path)| {
                v.as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0)
                    .ok_or_else(|| {
                        invalid(path, format!("expected a port 1–65535, found {}", show(v)))
                    })
            })
            .transpose()
    }

    fn name(&self, long: &str) -> Result<Option<String>, Invalid> {
        self.get(long)
            .map(|(v, path)| match v {
                Value::String(s)
                    if !s.is_empty() && s.len() <= MAX_NAME && !s.contains(char::is_control) =>
                {
                    Ok(s.clone())
                }
                _ => Err(invalid(
                    path,
                    format!(
                        "expected a name of 1–{MAX_NAME} printable characters, found {}",
                        show(v)
                    ),
                )),
            })
            .transpose()
    }

    fn list(&self, long: &str) -> Result<Option<(&'a [Value], String)>, Invalid> {
        self.get(long)
            .map(|(v, path)| match v {
                Value::Array(items) if items.len() <= MAX_LIST => Ok((items.as_slice(), path)),
                Value::Array(items) => Err(invalid(
                    path,
                    format!("{} entries; at most {MAX_LIST}", items.len()),
                )),
                _ => Err(invalid(
                    path,
                    format!("expected an array, found {}", kind(v)),
                )),
            })
            .transpose()
    }

    fn object(
        &self,
        long: &str,
        table: &'static [(&'static str, &'static str)],
    ) -> Result<Option<Fields<'a>>, Invalid> {
        self.get(long)
            .map(|(v, path)| Fields::of(v, self.names, table, path))
            .transpose()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for an error message: short ones as they are, long ones by kind.
fn show(v: &Value) -> String {
    let text = v.to_string();
    if text.len() <= 40 {
        text
    } else {
        kind(v).to_owned()
    }
}

/// `ip:port`, `[v6]:port`, or `v6:port` without brackets (as AWS's Python agent 2.0 writes
/// IPv6 addresses: the last `:` separates the port).
fn parse_socket_addr(s: &str) -> Option<std::net::SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let (ip, port) = s.rsplit_once(':')?;
    let ip: std::net::Ipv6Addr = ip.parse().ok()?;
    Some(std::net::SocketAddr::from((ip, port.parse::<u16>().ok()?)))
}

fn port_list(f: Fields<'_>) -> Result<PortList, Invalid> {
    let mut ports = Vec::new();
    if let Some((items, path)) = f.list("ports")? {
        for (i, item) in items.iter().enumerate() {
            let p = Fields::of(item, f.names, PORT, format!("{path}[{i}]"))?;
            let port = p
                .port("port")?
                .ok_or_else(|| invalid(join(&p.path, "port"), "missing"))?;
            ports.push(Port {
                port,
                interface: p.name("interface")?,
            });
        }
    }
    let total = f.count("total")?;
    Ok(PortList { ports, total })
}

fn connections(f: Fields<'_>) -> Result<Connections, Invalid> {
    let mut connections = Vec::new();
    if let Some((items, path)) = f.list("connections")? {
        for (i, item) in items.iter().enumerate() {
            let c = Fields::of(item, f.names, CONNECTION, format!("{path}[{i}]"))?;
            let (v, at) = c
                .get("remote_addr")
                .ok_or_else(|| invalid(join(&c.path, "remote_addr"), "missing"))?;
            let remote_addr = v
                .as_str()
                .and_then(parse_socket_addr)
                .ok_or_else(|| invalid(at, format!("expected \"ip:port\", found {}", show(v))))?;
            connections.push(Connection {
                remote_addr,
                local_port: c.port("local_port")?,
                local_interface: c.name("local_interface")?,
            });
        }
    }
    Ok(Connections {
        connections,
        total: f.count("total")?,
    })
}

/// Whether `name` is a valid custom metric name (AWS: 1–128 of `[a-zA-Z0-9:_-]`).
pub fn valid_custom_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

fn custom_value(v: &Value, path: &str) -> Result<CustomValue, Invalid> {
    let entry = match v {
        Value::Array(items) if items.len() == 1 => &items[0],
        _ => {
            return Err(invalid(
                path,
                "expected an array of one object such as [{\"number\": 1}]",
            ))
        }
    };
    let path = format!("{path}[0]");
    let Value::Object(map) = entry else {
        return Err(invalid(
            path,
            format!("expected an object, found {}", kind(entry)),
        ));
    };
    let mut entries = map.iter();
    let (Some((key, value)), None) = (entries.next(), entries.next()) else {
        return Err(invalid(
            path,
            "expected exactly one of number, number_list, string_list, ip_list",
        ));
    };
    let at = join(&path, key);
    let list = |v: &Value| -> Result<Vec<Value>, Invalid> {
        match v {
            Value::Array(items) if items.len() <= MAX_LIST => Ok(items.clone()),
            Value::Array(items) => Err(invalid(
                at.clone(),
                format!("{} entries; at most {MAX_LIST}", items.len()),
            )),
            _ => Err(invalid(
                at.clone(),
                format!("expected an array, found {}", kind(v)),
            )),
        }
    };
    let number = |v: &Value, at: String| {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| invalid(at, format!("expected a number, found {}", show(v))))
    };
    Ok(match key.as_str() {
        "number" => CustomValue::Number(number(value, at.clone())?),
        "number_list" => CustomValue::NumberList(
            list(value)?
                .iter()
                .enumerate()
                .map(|(i, v)| number(v, format!("{at}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        "string_list" => CustomValue::StringList(
            list(value)?
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) if s.len() <= 1024 => Ok(s.clone()),
                    _ => Err(invalid(
                        format!("{at}[{i}]"),
                        format!("expected a string of at most 1024 bytes, found {}", show(v)),
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
        "ip_list" => CustomValue::IpList(
            list(value)?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                        invalid(
                            format!("{at}[{i}]"),
                            format!("expected an IP address, found {}", show(v)),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => {
            return Err(invalid(
                at,
                "unknown value type; expected number, number_list, string_list or ip_list",
            ))
        }
    })
}

/// Convert a CBOR document to the JSON data model (text keys only; floats that are not
/// finite and byte strings are refused).
fn from_cbor(v: ciborium::Value, path: &str) -> Result<Value, Invalid> {
    use ciborium::Value as C;
    Ok(match v {
        C::Null => Value::Null,
        C::Bool(b) => Value::Bool(b),
        C::Integer(i) => {
            let i = i128::from(i);
            if let Ok(u) = u64::try_from(i) {
                Value::from(u)
            } else if let Ok(s) = i64::try_from(i) {
                Value::from(s)
            } else {
                return Err(invalid(path, "integer out of range"));
            }
        }
        C::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| invalid(path, "a number that is not finite"))?,
        C::Text(s) => Value::String(s),
        C::Tag(_, inner) => from_cbor(*inner, path)?,
        C::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| from_cbor(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        C::Map(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let C::Text(k) = k else {
                    return Err(invalid(path, "a map key that is not text"));
                };
                let v = from_cbor(v, &join(path, &k))?;
                map.insert(k, v);
            }
            Value::Object(map)
        }
        C::Bytes(_) => return Err(invalid(path, "a byte string; the schema has none")),
        _ => return Err(invalid(path, "a CBOR value the schema has no place for")),
    })
}

/// The encoding of a report, from the last level of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.../metrics/json`.
    Json,
    /// `.../metrics/cbor`.
    Cbor,
}

impl Format {
    /// The topic level naming it.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
        }
    }
}

impl Report {
    /// Decode and check a report (see the module docs). The error names the field.
    pub fn parse(bytes: &[u8], format: Format) -> Result<(Report, Names), Invalid> {
        let value = match format {
            Format::Json => serde_json::from_slice::<Value>(bytes)
                .map_err(|e| invalid("", format!("not JSON: {e}")))?,
            Format::Cbor => {
                let c: ciborium::Value = ciborium::from_reader(bytes)
                    .map_err(|e| invalid("", format!("not CBOR: {e}")))?;
                from_cbor(c, "")?
            }
        };
        Self::from_value(&value)
    }

    /// Check a decoded report.
    pub fn from_value(value: &Value) -> Result<(Report, Names), Invalid> {
        let Value::Object(map) = value else {
            return Err(invalid(
                "",
                format!("expected an object, found {}", kind(value)),
            ));
        };
        let names = match (map.contains_key("header"), map.contains_key("hed")) {
            (true, false) => Names::Long,
            (false, true) => Names::Short,
            (true, true) => {
                return Err(invalid(
                    "",
                    "both `header` and `hed`: use long or short names, not both",
                ))
            }
            (false, false) => return Err(invalid("header", "missing (short name `hed`)")),
        };
        let top = Fields::of(value, names, TOP, String::new())?;
        let header = top
            .object("header", HEADER)?
            .ok_or_else(|| invalid("header", "missing"))?;
        let report_id = header
            .count("report_id")?
            .ok_or_else(|| invalid("header.report_id", "missing"))?;
        if report_id == 0 {
            return Err(invalid(
                "header.report_id",
                "must be a positive integer (epoch seconds or milliseconds are usual)",
            ));
        }
        let version = match header.get("version") {
            Some((Value::String(v), _)) if v == VERSION => v.clone(),
            Some((v, path)) => {
                return Err(invalid(
                    path,
                    format!("expected \"{VERSION}\", found {}", show(v)),
                ))
            }
            None => {
                return Err(invalid(
                    "header.version",
                    format!("missing; use \"{VERSION}\""),
                ))
            }
        };
        let metrics = match top.object("metrics", METRICS)? {
            None => None,
            Some(m) => Some(Metrics {
                listening_tcp_ports: m
                    .object("listening_tcp_ports", PORT_LIST)?
                    .map(port_list)
                    .transpose()?,
                listening_udp_ports: m
                    .object("listening_udp_ports", PORT_LIST)?
                    .map(port_list)
                    .transpose()?,
                network_stats: m
                    .object("network_stats", NETWORK)?
                    .map(|n| -> Result<NetworkStats, Invalid> {
                        Ok(NetworkStats {
                            bytes_in: n.count("bytes_in")?,
                            bytes_out: n.count("bytes_out")?,
                            packets_in: n.count("packets_in")?,
                            packets_out: n.count("packets_out")?,
                        })
                    })
                    .transpose()?,
                established_connections: match m.object("tcp_connections", TCP)? {
                    None => None,
                    Some(tc) => tc
                        .object("established_connections", CONNECTIONS)?
                        .map(connections)
                        .transpose()?,
                },
            }),
        };
        let mut custom_metrics = BTreeMap::new();
        if let Some((v, path)) = top.get("custom_metrics") {
            let Value::Object(map) = v else {
                return Err(invalid(
                    path,
                    format!("expected an object, found {}", kind(v)),
                ));
            };
            for (name, v) in map {
                let at = join(&path, name);
                if !valid_custom_name(name) {
                    return Err(invalid(
                        at,
                        "not a custom metric name: use 1–128 of letters, digits, `:`, `_`, `-`",
                    ));
                }
                custom_metrics.insert(name.clone(), custom_value(v, &at)?);
            }
        }
        if metrics.is_none() && custom_metrics.is_empty() {
            return Err(invalid(
                "",
                "a report needs `metrics` or `custom_metrics` (or both)",
            ));
        }
        Ok((
            Report {
                report_id,
                version,
                metrics,
                custom_metrics,
            },
            names,
        ))
    }

    /// The report as a JSON value with `names`.
    pub fn to_value(&self, names: Names) -> Value {
        let n = |table: &[(&str, &'static str)], long: &str| -> String {
            let (l, s) = table
                .iter()
                .find(|(l, _)| *l == long)
                .copied()
                .unwrap_or((TOP[0].0, TOP[0].1));
            if names == Names::Long { l } else { s }.to_owned()
        };
        let mut top = Map::new();
        let mut header = Map::new();
        header.insert(n(HEADER, "report_id"), Value::from(self.report_id));
        header.insert(n(HEADER, "version"), Value::from(self.version.clone()));
        top.insert(n(TOP, "header"), Value::Object(header));
        if let Some(m) = &self.metrics {
            let mut met = Map::new();
            let ports = |list: &PortList| {
                let mut o = Map::new();
                let items = list
                    .ports
                    .iter()
                    .map(|p| {
                        let mut e = Map::new();
                        e.insert(n(PORT, "port"), Value::from(p.port));
                        if let Some(i) = &p.interface {
                            e.insert(n(PORT, "interface"), Value::from(i.clone()));
                        }
                        Value::Object(e)
                    })
                    .collect();
                o.insert(n(PORT_LIST, "ports"), Value::Array(items));
                if let Some(t) = list.total {
                    o.insert(n(PORT_LIST, "total"), Value::from(t));
                }
                Value::Object(o)
            };
            if let Some(l) = &m.listening_tcp_ports {
                met.insert(n(METRICS, "listening_tcp_ports"), ports(l));
            }
            if let Some(l) = &m.listening_udp_ports {
                met.insert(n(METRICS, "listening_udp_ports"), ports(l));
            }
            if let Some(ns) = &m.network_stats {
                let mut o = Map::new();
                for (long, v) in [
                    ("bytes_in", ns.bytes_in),
                    ("bytes_out", ns.bytes_out),
                    ("packets_in", ns.packets_in),
                    ("packets_out", ns.packets_out),
                ] {
                    if let Some(v) = v {
                        o.insert(n(NETWORK, long), Value::from(v));
                    }
                }
                met.insert(n(METRICS, "network_stats"), Value::Object(o));
            }
            if let Some(ec) = &m.established_connections {
                let items = ec
                    .connections
                    .iter()
                    .map(|c| {
                        let mut e = Map::new();
                        e.insert(
                            n(CONNECTION, "remote_addr"),
                            Value::from(c.remote_addr.to_string()),
                        );
                        if let Some(p) = c.local_port {
                            e.insert(n(CONNECTION, "local_port"), Value::from(p));
                        }
                        if let Some(i) = &c.local_interface {
                            e.insert(n(CONNECTION, "local_interface"), Value::from(i.clone()));
                        }
                        Value::Object(e)
                    })
                    .collect();
                let mut o = Map::new();
                o.insert(n(CONNECTIONS, "connections"), Value::Array(items));
                if let Some(t) = ec.total {
                    o.insert(n(CONNECTIONS, "total"), Value::from(t));
                }
                let mut tc = Map::new();
                tc.insert(n(TCP, "established_connections"), Value::Object(o));
                met.insert(n(METRICS, "tcp_connections"), Value::Object(tc));
            }
            top.insert(n(TOP, "metrics"), Value::Object(met));
        }
        if !self.custom_metrics.is_empty() {
            let mut c = Map::new();
            for (name, v) in &self.custom_metrics {
                let (key, value) = match v {
                    CustomValue::Number(x) => ("number", Value::from(*x)),
                    CustomValue::NumberList(xs) => ("number_list", Value::from(xs.clone())),
                    CustomValue::StringList(xs) => ("string_list", Value::from(xs.clone())),
                    CustomValue::IpList(xs) => (
                        "ip_list",
                        Value::Array(xs.iter().map(|ip| Value::from(ip.to_string())).collect()),
                    ),
                };
                let mut e = Map::new();
                e.insert(key.to_owned(), value);
                c.insert(name.clone(), Value::Array(vec![Value::Object(e)]));
            }
            top.insert(n(TOP, "custom_metrics"), Value::Object(c));
        }
        Value::Object(top)
    }

    /// The report encoded as `format` with `names`.
    pub fn encode(&self, format: Format, names: Names) -> Vec<u8> {
        let value = self.to_value(names);
        match format {
            // Plain data with string keys: serialising it cannot fail.
            Format::Json => serde_json::to_vec(&value).unwrap_or_default(),
            Format::Cbor => {
                let mut out = Vec::new();
                // Writing into a Vec cannot fail.
                let _ = ciborium::into_writer(&value, &mut out);
                out
            }
        }
    }
}

/// The reply Device Defender publishes on `.../accepted`.
pub fn accepted(thing: &str, report_id: u64, now_ms: i64) -> Vec<u8> {
    serde_json::json!({
        "thingName": thing,
        "reportId": report_id,
        "status": "ACCEPTED",
        "timestamp": now_ms,
    })
    .to_string()
    .into_bytes()
}

/// The reply on `.../rejected`: the accepted shape with `status` "REJECTED" and
/// `statusDetails` (`ErrorCode`, `ErrorMessage`); `reportId` when the header could be read.
pub fn rejected(thing: &str, report_id: Option<u64>, why: &Invalid, now_ms: i64) -> Vec<u8> {
    let mut body = serde_json::json!({
        "thingName": thing,
        "status": "REJECTED",
        "statusDetails": { "ErrorCode": "InvalidPayload", "ErrorMessage": why.to_string() },
        "timestamp": now_ms,
    });
    if let Some(id) = report_id {
        body["reportId"] = Value::from(id);
    }
    body.to_string().into_bytes()
}

/// The report id of a report that failed the check, when its header is readable (for the
/// `/rejected` reply's `reportId`).
pub fn report_id_of(bytes: &[u8], format: Format) -> Option<u64> {
    let value: Value = match format {
        Format::Json => serde_json::from_slice(bytes).ok()?,
        Format::Cbor => from_cbor(ciborium::from_reader(bytes).ok()?, "").ok()?,
    };
    let header = value.get("header").or_else(|| value.get("hed"))?;
    header
        .get("report_id")
        .or_else(|| header.get("rid"))?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LONG: &str = r#"{"header":{"report_id":1530304554,"version":"1.0"},
      "metrics":{"listening_tcp_ports":{"ports":[{"interface":"eth0","port":24800},{"port":22}],"total":2},
        "listening_udp_ports":{"ports":[{"interface":"eth0","port":5353}],"total":1},
        "network_stats":{"bytes_in":29152,"bytes_out":26112,"packets_in":192,"packets_out":228},
        "tcp_connections":{"established_connections":{"connections":[{"local_interface":"eth0","local_port":80,"remote_addr":"192.168.0.1:8000"}],"total":1}}},
      "custom_metrics":{"cpu_usage":[{"number":26.1}],"ips":[{"ip_list":["10.0.0.1","::1"]}]}}"#;

    fn parse(text: &str) -> Result<Report, Invalid> {
        Report::parse(text.as_bytes(), Format::Json).map(|(r, _)| r)
    }

    fn field(text: &str) -> String {
        match parse(text) {
            Ok(r) => panic!("accepted: {r:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn long_names_parse_and_round_trip_through_short_names_and_cbor() {
        let (r, names) = Report::parse(LONG.as_bytes(), Format::Json).unwrap();
        assert_eq!(names, Names::Long);
        assert_eq!(r.report_id, 1530304554);
        let m = r.metrics.as_ref().unwrap();
        assert_eq!(
            m.listening_tcp_ports.as_ref().unwrap().ports[0]
                .interface
                .as_deref(),
            Some("eth0")
        );
        assert_eq!(m.network_stats.unwrap().bytes_out, Some(26112));
        assert_eq!(
            m.established_connections.as_ref().unwrap().connections[0].remote_addr,
            "192.168.0.1:8000".parse().unwrap()
        );
        assert_eq!(r.custom_metrics["cpu_usage"], CustomValue::Number(26.1));
        for (format, names) in [
            (Format::Json, Names::Short),
            (Format::Json, Names::Long),
            (Format::Cbor, Names::Short),
            (Format::Cbor, Names::Long),
        ] {
            let bytes = r.encode(format, names);
            let (again, seen) = Report::parse(&bytes, format).unwrap();
            assert_eq!((again, seen), (r.clone(), names), "{format:?} {names:?}");
        }
        let short = String::from_utf8(r.encode(Format::Json, Names::Short)).unwrap();
        assert!(
            short.contains(r#""hed":{"rid":1530304554,"v":"1.0"}"#),
            "{short}"
        );
        assert!(
            short.contains(
                r#""tc":{"ec":{"cs":[{"li":"eth0","lp":80,"rad":"192.168.0.1:8000"}],"t":1}}"#
            ),
            "{short}"
        );
    }

    #[test]
    fn mistakes_name_their_field() {
        assert_eq!(field("[]"), "");
        assert_eq!(field(r#"{"metrics":{}}"#), "header");
        assert_eq!(
            field(r#"{"header":{"version":"1.0"},"metrics":{}}"#),
            "header.report_id"
        );
        assert_eq!(
            field(r#"{"header":{"report_id":0,"version":"1.0"},"metrics":{}}"#),
            "header.report_id"
        );
        assert_eq!(
            field(r#"{"header":{"report_id":-4,"version":"1.0"},"metrics":{}}"#),
            "header.report_id"
        );
        assert_eq!(
            field(r#"{"header":{"report_id":1,"version":"2.0"},"metrics":{}}"#),
            "header.version"
        );
        assert_eq!(field(r#"{"header":{"report_id":1,"version":"1.0"}}"#), "");
        assert_eq!(
            field(
                r#"{"header":{"report_id":1,"version":"1.0"},"metrics":{"listening_tcp_ports":{"ports":[{"port":22},{"port":70000}]}}}"#
            ),
            "metrics.listening_tcp_ports.ports[1].port"
        );
        assert_eq!(
            field(
                r#"{"header":{"report_id":1,"version":"1.0"},"metrics":{"network_stats":{"bytes_in":"many"}}}"#
            ),
            "metrics.network_stats.bytes_in"
        );
        assert_eq!(
            field(
                r#"{"header":{"report_id":1,"version":"1.0"},"metrics":{"tcp_connections":{"established_connections":{"connections":[{"remote_addr":"nowhere"}]}}}}"#
            ),
            "metrics.tcp_connections.established_connections.connections[0].remote_addr"
        );
        assert_eq!(
            field(r#"{"header":{"report_id":1,"version":"1.0"},"metrics":{"bytes":1}}"#),
            "metrics.bytes"
        );
        // Long and short names may be mixed (AWS's agent does), but not given twice.
        assert!(
            parse(r#"{"hed":{"rid":1,"v":"1.0"},"metrics":{"tp":{"pts":[{"port":1}]}}}"#).is_ok()
        );
        assert_eq!(
            field(r#"{"hed":{"rid":1,"v":"1.0"},"met":{"ns":{"bi":1,"bytes_in":2}}}"#),
            "metrics.network_stats.bytes_in"
        );
        assert_eq!(
            field(
                r#"{"header":{"report_id":1,"version":"1.0"},"custom_metrics":{"cpu":[{"number":"x"}]}}"#
            ),
            "custom_metrics.cpu[0].number"
        );
        assert_eq!(
            field(
                r#"{"header":{"report_id":1,"version":"1.0"},"custom_metrics":{"cpu":{"number":1}}}"#
            ),
            "custom_metrics.cpu"
        );
        assert_eq!(
            field(
                r#"{"header":{"report_id":1,"version":"1.0"},"custom_metrics":{"a b":[{"number":1}]}}"#
            ),
            "custom_metrics.a b"
        );
        assert_eq!(
            field(
                r#"{"header":{"report_id":1,"version":"1.0"},"custom_metrics":{"ips":[{"ip_list":["10.0.0.300"]}]}}"#
            ),
            "custom_metrics.ips[0].ip_list[0]"
        );
    }

    #[test]
    fn reports_of_the_real_agent_are_accepted_in_every_form() {
        for (file, format, names) in [
            ("agent-long.json", Format::Json, Names::Long),
            ("agent-custom.json", Format::Json, Names::Long),
            ("agent-short.json", Format::Json, Names::Short),
            ("agent-long.cbor", Format::Cbor, Names::Long),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/defender/testdata")
                .join(file);
            let bytes = std::fs::read(&path).unwrap();
            let (r, seen) = Report::parse(&bytes, format).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(seen, names, "{file}");
            let m = r.metrics.as_ref().unwrap();
            assert!(
                m.network_stats.is_some() && m.established_connections.is_some(),
                "{file}"
            );
            assert!(
                !m.listening_tcp_ports.as_ref().unwrap().ports.is_empty(),
                "{file}"
            );
        }
        let v6 = r#"{"header":{"report_id":1,"version":"1.0"},"metrics":{"tcp_connections":{"established_connections":{"connections":[{"remote_addr":"::1:8883"}]}}}}"#;
        let r = parse(v6).unwrap();
        assert_eq!(
            r.metrics
                .unwrap()
                .established_connections
                .unwrap()
                .connections[0]
                .remote_addr,
            "[::1]:8883".parse().unwrap()
        );
    }

    #[test]
    fn rejected_replies_carry_the_reason_and_the_report_id_when_readable() {
        let bytes = br#"{"hed":{"rid":77,"v":"1.0"}}"#;
        let e = Report::parse(bytes, Format::Json).unwrap_err();
        assert_eq!(report_id_of(bytes, Format::Json), Some(77));
        let reply: Value = serde_json::from_slice(&rejected("pm-01", Some(77), &e, 5)).unwrap();
        assert_eq!(reply["status"], "REJECTED");
        assert_eq!(reply["reportId"], 77);
        assert!(reply["statusDetails"]["ErrorMessage"]
            .as_str()
            .unwrap()
            .contains("metrics"));
        let ok: Value = serde_json::from_slice(&accepted("pm-01", 77, 5)).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"thingName":"pm-01","reportId":77,"status":"ACCEPTED","timestamp":5})
        );
        assert_eq!(report_id_of(b"\xff", Format::Cbor), None);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u16>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z_:.0-9]{0,12}".prop_map(Value::from),
            Just(Value::from("1.0")),
            Just(Value::from("10.0.0.1:443")),
        ];
        let keys = prop_oneof![
            Just("header"),
            Just("hed"),
            Just("report_id"),
            Just("rid"),
            Just("version"),
            Just("v"),
            Just("metrics"),
            Just("met"),
            Just("custom_metrics"),
            Just("cmet"),
            Just("ports"),
            Just("pts"),
            Just("port"),
            Just("pt"),
            Just("interface"),
            Just("total"),
            Just("t"),
            Just("network_stats"),
            Just("ns"),
            Just("bytes_in"),
            Just("tcp_connections"),
            Just("tc"),
            Just("established_connections"),
            Just("ec"),
            Just("connections"),
            Just("cs"),
            Just("remote_addr"),
            Just("rad"),
            Just("number"),
            Just("number_list"),
            Just("ip_list"),
            Just("listening_tcp_ports"),
            Just("tp"),
            Just("x"),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((keys.clone(), inner), 0..5).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        /// Random documents (random shapes over the schema's own names) never panic: they
        /// parse into a report that encodes back to itself, or are refused with a reason.
        #[test]
        fn random_reports_are_accepted_consistently_or_refused(v in arb_json(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            match Report::from_value(&v) {
                Ok((r, names)) => {
                    let (again, _) = Report::parse(&r.encode(Format::Json, names), Format::Json).unwrap();
                    prop_assert_eq!(again, r.clone());
                    let (again, _) = Report::parse(&r.encode(Format::Cbor, Names::Short), Format::Cbor).unwrap();
                    prop_assert_eq!(again, r);
                }
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
            let _ = Report::parse(&bytes, Format::Cbor);
            let _ = Report::parse(&bytes, Format::Json);
        }
    }
}
