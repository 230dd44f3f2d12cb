//! The upstream batch format, version 2: many queued records in one upstream message, with
//! what they share written once.
//!
//! ```json
//! {"format":2,"gateway_id":"ward-7",
//!  "sources":[{"kind":"pacemaker","plugin":"pacemaker","plugin_version":"0.1.0"}],
//!  "devices":[{"device_id":"pm-01","source":0,"topic":"ward/pm-01/telemetry",
//!              "units":{"heart-rate":"/min","battery-level":"%"},
//!              "records":[{"seq":41,"received_at_ms":1796000000123,
//!                          "readings":[["heart-rate",72.0,-3],["battery-level",87.0,-3]]}]}],
//!  "messages":[{"seq":42,"message":{"rule":"tachycardia","device_id":"pm-01"}}]}
//! ```
//!
//! - `format`: 2. (Version 1 was `{"gateway_id":..,"records":[{"seq":N,"message":{..}}]}`.)
//! - `sources`: each distinct (kind, plugin, plugin version) of the batch's readings, once;
//!   a device group names its source by index.
//! - `devices`: canonical readings grouped per device, source, topic and units: the group
//!   says them once, each record keeps its queue sequence number (`seq`, for de-duplication:
//!   delivery is at-least-once), when the gateway received it, and its readings.
//! - A reading is `[metric, value]`, `[metric, value, dt]` or `[metric, value, dt, quality]`:
//!   its unit is the group's `units[metric]`, its `observed_at_ms` is `received_at_ms + dt`
//!   (`dt` absent: 0), its quality is `"good"` unless a fourth element says otherwise.
//! - `messages`: records that are not canonical readings (alerts, anything else batched),
//!   each as it was queued.
//! - Keys with nothing to say (`sources`, `devices`, `messages` when empty) are left out.
//!
//! Expanding a device record gives back exactly the canonical message the gateway published
//! locally on `ward/<device>/readings` ([`expand`] does it, and the README shows it in
//! Python).
//!
//! What must stay true: [`Builder::len`] is the exact byte length of [`Builder::finish`] (the
//! uplink bounds messages and paces bytes by it), and every record added comes out of
//! [`expand`] unchanged.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The `format` this module writes.
pub const FORMAT: u64 = 2;

/// A canonical message as the pipeline queues it (`pipeline::Canonical`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canonical {
    /// Thing name of the gateway.
    pub gateway_id: String,
    /// Device id.
    pub device_id: String,
    /// Device kind.
    pub kind: String,
    /// Plugin name.
    pub plugin: String,
    /// Plugin version.
    pub plugin_version: String,
    /// Topic the raw message came on.
    pub topic: String,
    /// When the gateway received it, ms since the UNIX epoch.
    pub received_at_ms: i64,
    /// The readings.
    pub readings: Vec<Reading>,
}

/// One reading of a [`Canonical`] message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    /// What was measured.
    pub metric: String,
    /// The value.
    pub value: f64,
    /// UCUM unit.
    pub unit: String,
    /// Device time, ms since the UNIX epoch.
    pub observed_at_ms: i64,
    /// `good` or `questionable`.
    pub quality: String,
}

/// Why a record cannot go into any batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undeliverable(pub String);

/// What [`Builder::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The record is in the batch.
    Yes,
    /// It would take the batch over its bound: send this one and start another.
    Full,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    device_id: String,
    source: usize,
    topic: String,
    units: Vec<(String, String)>,
}

#[derive(Debug)]
struct Group {
    /// `{"device_id":..,"source":N,"topic":..,"units":{..},"records":[`
    head: Vec<u8>,
    /// Serialized records, each `{"seq":..,..}`.
    records: Vec<Vec<u8>>,
}

impl Group {
    /// Bytes of this group in the batch: head, records with commas, `]}`.
    fn len(&self) -> usize {
        self.head.len()
            + self.records.iter().map(Vec::len).sum::<usize>()
            + commas(self.records.len())
            + 2
    }
}

fn commas(n: usize) -> usize {
    n.saturating_sub(1)
}

/// A batch being built, at most `max_bytes` long.
#[derive(Debug)]
pub struct Builder {
    max_bytes: usize,
    /// `{"format":2,"gateway_id":"..."`
    head: Vec<u8>,
    sources: Vec<Vec<u8>>,
    source_index: HashMap<(String, String, String), usize>,
    groups: Vec<Group>,
    group_index: HashMap<GroupKey, usize>,
    messages: Vec<Vec<u8>>,
    seqs: Vec<u64>,
    len: usize,
    /// The gateway id: canonical readings of another gateway go into `messages` as they are.
    gateway_id: String,
}

/// What adding one record changes.
enum Change {
    Message(Vec<u8>),
    Reading {
        /// A source the batch does not have yet: its key and document.
        new_source: Option<((String, String, String), Vec<u8>)>,
        /// The record's group, or a new one (key and head).
        group: Result<usize, (GroupKey, Vec<u8>)>,
        record: Vec<u8>,
    },
}

fn json<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    // Strings, numbers and plain structs: serialising cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The bytes `,"<key>":[` + items with commas + `]` take, or 0 when there are no items.
fn section_len(key: &str, items: usize, item_bytes: usize) -> usize {
    if items == 0 {
        0
    } else {
        key.len() + 6 + item_bytes + commas(items)
    }
}

impl Builder {
    /// An empty batch from `gateway_id`, bounded to `max_bytes`.
    pub fn new(gateway_id: &str, max_bytes: usize) -> Self {
        let head = format!("{{\"format\":{FORMAT},\"gateway_id\":").into_bytes();
        let head = [head, json(gateway_id)].concat();
        let len = head.len() + 1;
        Self {
            max_bytes,
            head,
            sources: Vec::new(),
            source_index: HashMap::new(),
            groups: Vec::new(),
            group_index: HashMap::new(),
            messages: Vec::new(),
            seqs: Vec::new(),
            len,
            gateway_id: gateway_id.to_owned(),
        }
    }

    /// Exact length of [`Builder::finish`] now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Sequence numbers of the records in it, in the order added.
    pub fn seqs(&self) -> &[u64] {
        &self.seqs
    }

    fn sources_len(&self) -> usize {
        section_len(
            "sources",
            self.sources.len(),
            self.sources.iter().map(Vec::len).sum(),
        )
    }

    fn devices_len(&self) -> usize {
        section_len(
            "devices",
            self.groups.len(),
            self.groups.iter().map(Group::len).sum(),
        )
    }

    fn messages_len(&self) -> usize {
        section_len(
            "messages",
            self.messages.len(),
            self.messages.iter().map(Vec::len).sum(),
        )
    }

    fn total(&self) -> usize {
        self.head.len() + self.sources_len() + self.devices_len() + self.messages_len() + 1
    }

    /// Add record `seq` (its `payload` as queued). `Full` leaves the batch unchanged;
    /// `Err` says why the record can never be delivered (not JSON, or too big for any batch).
    pub fn add(&mut self, seq: u64, payload: &[u8]) -> Result<Added, Undeliverable> {
        let canonical = serde_json::from_slice::<Canonical>(payload)
            .ok()
            .filter(|c| c.gateway_id == self.gateway_id)
            .and_then(|c| compact(&c).map(|r| (c, r)));
        let change = match canonical {
            Some((c, record)) => self.reading_change(seq, &c, record),
            None => {
                // Embedded as it is: it must be one whole JSON value, or it would spoil the batch.
                serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                    .map_err(|e| Undeliverable(format!("the record is not JSON ({e})")))?;
                let mut m = format!("{{\"seq\":{seq},\"message\":").into_bytes();
                m.extend_from_slice(payload);
                m.push(b'}');
                Change::Message(m)
            }
        };
        let grows = self.growth(&change);
        if self.len + grows > self.max_bytes {
            if self.seqs.is_empty() {
                return Err(Undeliverable(format!(
                    "the message would be {} bytes, over upstream.max_batch_bytes ({})",
                    self.len + grows,
                    self.max_bytes
                )));
            }
            return Ok(Added::Full);
        }
        self.apply(change);
        self.len += grows;
        debug_assert_eq!(self.len, self.total());
        self.seqs.push(seq);
        Ok(Added::Yes)
    }

    fn reading_change(&self, seq: u64, c: &Canonical, record: Vec<u8>) -> Change {
        let skey = (c.kind.clone(), c.plugin.clone(), c.plugin_version.clone());
        let (source, new_source) = match self.source_index.get(&skey) {
            Some(i) => (*i, None),
            None => {
                let doc = json(&serde_json::json!({
                    "kind": c.kind, "plugin": c.plugin, "plugin_version": c.plugin_version,
                }));
                (self.sources.len(), Some((skey, doc)))
            }
        };
        let mut units: Vec<(String, String)> = c
            .readings
            .iter()
            .map(|r| (r.metric.clone(), r.unit.clone()))
            .collect();
        units.sort();
        units.dedup();
        let key = GroupKey {
            device_id: c.device_id.clone(),
            source,
            topic: c.topic.clone(),
            units,
        };
        let mut r = format!("{{\"seq\":{seq},").into_bytes();
        r.extend(record);
        match self.group_index.get(&key) {
            Some(g) => Change::Reading {
                new_source,
                group: Ok(*g),
                record: r,
            },
            None => {
                let mut head = b"{\"device_id\":".to_vec();
                head.extend(json(&key.device_id));
                head.extend(format!(",\"source\":{source},\"topic\":").bytes());
                head.extend(json(&key.topic));
                head.extend(b",\"units\":");
                let map: serde_json::Map<String, serde_json::Value> = key
                    .units
                    .iter()
                    .map(|(m, u)| (m.clone(), u.clone().into()))
                    .collect();
                head.extend(json(&map));
                head.extend(b",\"records\":[");
                Change::Reading {
                    new_source,
                    group: Err((key, head)),
                    record: r,
                }
            }
        }
    }

    /// Bytes `change` would add to the batch.
    fn growth(&self, change: &Change) -> usize {
        // A section's first item also brings `,"<key>":[` and `]`; later ones a comma.
        let item = |existing: usize, key: &str, bytes: usize| {
            if existing == 0 {
                key.len() + 6 + bytes
            } else {
                1 + bytes
            }
        };
        match change {
            Change::Message(m) => item(self.messages.len(), "messages", m.len()),
            Change::Reading {
                new_source,
                group,
                record,
            } => {
                let source = new_source
                    .as_ref()
                    .map_or(0, |(_, doc)| item(self.sources.len(), "sources", doc.len()));
                let group = match group {
                    Ok(_) => 1 + record.len(),
                    Err((_, head)) => {
                        item(self.groups.len(), "devices", head.len() + record.len() + 2)
                    }
                };
                source + group
            }
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Message(m) => self.messages.push(m),
            Change::Reading {
                new_source,
                group,
                record,
            } => {
                if let Some((key, doc)) = new_source {
                    self.source_index.insert(key, self.sources.len());
                    self.sources.push(doc);
                }
                let g = match group {
                    Ok(g) => g,
                    Err((key, head)) => {
                        self.group_index.insert(key, self.groups.len());
                        self.groups.push(Group {
                            head,
                            records: Vec::new(),
                        });
                        self.groups.len() - 1
                    }
                };
                self.groups[g].records.push(record);
            }
        }
    }

    /// The batch as sent upstream.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        out.extend_from_slice(&self.head);
        let section = |out: &mut Vec<u8>, key: &str, items: &mut dyn Iterator<Item = Vec<u8>>| {
            let mut first = true;
            for item in items {
                if first {
                    out.extend(format!(",\"{key}\":[").bytes());
                    first = false;
                } else {
                    out.push(b',');
                }
                out.extend(item);
            }
            if !first {
                out.push(b']');
            }
        };
        section(&mut out, "sources", &mut self.sources.into_iter());
        section(
            &mut out,
            "devices",
            &mut self.groups.into_iter().map(|g| {
                let mut v = g.head;
                for (i, r) in g.records.into_iter().enumerate() {
                    if i > 0 {
                        v.push(b',');
                    }
                    v.extend(r);
                }
                v.extend(b"]}");
                v
            }),
        );
        section(&mut out, "messages", &mut self.messages.into_iter());
        out.push(b'}');
        debug_assert_eq!(out.len(), self.len);
        out
    }
}

/// A canonical message's record in a device group, after `{"seq":N,`: `"received_at_ms":..,
/// "readings":[..]}`. `None` when its readings cannot share one units map (one metric in two
/// units): then it goes into `messages` as it is.
fn compact(c: &Canonical) -> Option<Vec<u8>> {
    let mut units: HashMap<&str, &str> = HashMap::new();
    for r in &c.readings {
        if *units.entry(&r.metric).or_insert(&r.unit) != r.unit {
            return None;
        }
    }
    let readings: Vec<serde_json::Value> = c
        .readings
        .iter()
        .map(|r| {
            let mut v = vec![r.metric.clone().into(), json_f64(r.value)];
            let dt = r.observed_at_ms - c.received_at_ms;
            if dt != 0 || r.quality != "good" {
                v.push(dt.into());
            }
            if r.quality != "good" {
                v.push(r.quality.clone().into());
            }
            serde_json::Value::Array(v)
        })
        .collect();
    let mut out = format!("\"received_at_ms\":{},\"readings\":", c.received_at_ms).into_bytes();
    out.extend(json(&readings));
    out.push(b'}');
    Some(out)
}

fn json_f64(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Expand a batch (format 2, or format 1) into its records, `(seq, message)`, each message
/// exactly as it was queued: a canonical reading as published on `ward/<device>/readings`,
/// anything else as it was. They come in batch order (device groups in the order their first
/// record was added — alarms first — then `messages`); sort by `seq` for arrival order. The reference decoder for the format (the cloud side does the
/// same; the README shows it in Python).
pub fn expand(batch: &serde_json::Value) -> Result<Vec<(u64, serde_json::Value)>, String> {
    use serde_json::{json, Value};
    let field = |v: &Value, k: &str| v.get(k).cloned().ok_or(format!("no `{k}` in {v}"));
    let seq = |v: &Value| v["seq"].as_u64().ok_or(format!("no `seq` in {v}"));
    let list = |v: &Value, k: &str| -> Vec<Value> { v[k].as_array().cloned().unwrap_or_default() };
    let mut out = Vec::new();
    match batch["format"].as_u64() {
        None => {
            for r in list(batch, "records") {
                out.push((seq(&r)?, field(&r, "message")?));
            }
        }
        Some(FORMAT) => {
            let gateway_id = field(batch, "gateway_id")?;
            let sources = list(batch, "sources");
            for d in list(batch, "devices") {
                let source = d["source"]
                    .as_u64()
                    .and_then(|i| sources.get(i as usize))
                    .ok_or(format!("bad `source` in {d}"))?;
                for r in list(&d, "records") {
                    let at = r["received_at_ms"]
                        .as_i64()
                        .ok_or(format!("no `received_at_ms` in {r}"))?;
                    let mut readings = Vec::new();
                    for x in list(&r, "readings") {
                        let metric = x[0].as_str().ok_or(format!("bad reading {x}"))?;
                        readings.push(json!({
                            "metric": metric,
                            "value": x[1],
                            "unit": d["units"][metric],
                            "observed_at_ms": at + x.get(2).and_then(Value::as_i64).unwrap_or(0),
                            "quality": x.get(3).cloned().unwrap_or("good".into()),
                        }));
                    }
                    let message = json!({
                        "gateway_id": gateway_id,
                        "device_id": d["device_id"],
                        "kind": source["kind"],
                        "plugin": source["plugin"],
                        "plugin_version": source["plugin_version"],
                        "topic": d["topic"],
                        "received_at_ms": at,
                        "readings": readings,
                    });
                    out.push((seq(&r)?, message));
                }
            }
            for m in list(batch, "messages") {
                out.push((seq(&m)?, field(&m, "message")?));
            }
        }
        Some(other) => return Err(format!("unknown batch format {other}")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn canonical(
        device: &str,
        kind: &str,
        version: &str,
        at: i64,
        readings: &[(&str, f64, &str, i64, &str)],
    ) -> Vec<u8> {
        json(&Canonical {
            gateway_id: "ward-7".into(),
            device_id: device.into(),
            kind: kind.into(),
            plugin: kind.into(),
            plugin_version: version.into(),
            topic: format!("ward/{device}/telemetry"),
            received_at_ms: at,
            readings: readings
                .iter()
                .map(|(m, v, u, dt, q)| Reading {
                    metric: (*m).into(),
                    value: *v,
                    unit: (*u).into(),
                    observed_at_ms: at + dt,
                    quality: (*q).into(),
                })
                .collect(),
        })
    }

    fn value(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn shared_fields_are_written_once_and_expand_back() {
        let at = 1_000; // pure input: any time; the format only adds and subtracts
        let a = canonical(
            "pm-01",
            "pacemaker",
            "0.1.0",
            at,
            &[
                ("heart-rate", 72.0, "/min", -3, "good"),
                ("battery-level", 87.0, "%", -3, "good"),
            ],
        );
        let b = canonical(
            "pm-01",
            "pacemaker",
            "0.1.0",
            at + 500,
            &[("heart-rate", 73.5, "/min", 0, "questionable")],
        );
        let c = canonical(
            "bt-01",
            "bed-temperature",
            "0.2.0",
            at,
            &[("temperature", 36.6, "Cel", 0, "good")],
        );
        let alert = br#"{"rule":"tachycardia","device_id":"pm-01"}"#;
        let mut batch = Builder::new("ward-7", 64 * 1024);
        for (seq, p) in [(1, &a[..]), (2, &b[..]), (3, &c[..]), (4, &alert[..])] {
            assert_eq!(batch.add(seq, p), Ok(Added::Yes));
        }
        let len = batch.len();
        let body = batch.finish();
        assert_eq!(body.len(), len, "len() is exact");
        let v = value(&body);
        assert_eq!(v["format"], 2);
        assert_eq!(v["sources"].as_array().unwrap().len(), 2);
        // pm-01's two records have different units maps (b has no battery), so two groups.
        assert_eq!(v["devices"].as_array().unwrap().len(), 3);
        assert_eq!(
            v["devices"][0]["records"][0]["readings"][0],
            serde_json::json!(["heart-rate", 72.0, -3])
        );
        assert_eq!(
            v["devices"][1]["records"][0]["readings"][0],
            serde_json::json!(["heart-rate", 73.5, 0, "questionable"])
        );
        assert_eq!(
            v["devices"][2]["records"][0]["readings"][0],
            serde_json::json!(["temperature", 36.6])
        );
        let mut got = expand(&v).unwrap();
        got.sort_by_key(|(s, _)| *s);
        let want = vec![
            (1, value(&a)),
            (2, value(&b)),
            (3, value(&c)),
            (4, value(alert)),
        ];
        assert_eq!(got, want);
        assert!(
            body.len() < a.len() + b.len() + c.len() + alert.len(),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }

    #[test]
    fn what_is_not_a_canonical_reading_goes_as_it_was() {
        let mut batch = Builder::new("ward-7", 4096);
        // Another gateway's reading, and one metric in two units: both kept verbatim.
        let other = String::from_utf8(canonical("pm-01", "pacemaker", "1", 5, &[]))
            .unwrap()
            .replace("ward-7", "ward-8");
        let two_units = canonical(
            "gl-01",
            "glucose",
            "1",
            5,
            &[
                ("glucose", 5.5, "mmol/L", 0, "good"),
                ("glucose", 99.0, "mg/dL", 0, "good"),
            ],
        );
        assert_eq!(batch.add(1, other.as_bytes()), Ok(Added::Yes));
        assert_eq!(batch.add(2, &two_units), Ok(Added::Yes));
        assert!(batch.add(3, b"{\"a\":1").is_err(), "not JSON");
        assert!(
            batch.add(4, b"1 2").is_err(),
            "two values would spoil the batch"
        );
        let body = batch.finish();
        let got = expand(&value(&body)).unwrap();
        assert_eq!(
            got,
            vec![(1, value(other.as_bytes())), (2, value(&two_units))]
        );
    }

    #[test]
    fn the_bound_is_exact_and_a_record_too_big_alone_is_undeliverable() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let max = rng.gen_range(200..3000);
            let mut batch = Builder::new("ward-7", max);
            let mut added = Vec::new();
            for seq in 0..100u64 {
                let dev = format!("pm-{:02}", rng.gen_range(0..5));
                let n = rng.gen_range(0..4);
                let readings: Vec<(&str, f64, &str, i64, &str)> = (0..n)
                    .map(|i| {
                        (
                            ["heart-rate", "battery-level", "x"][i % 3],
                            rng.gen_range(0.0..200.0),
                            "/min",
                            rng.gen_range(-5..5),
                            if rng.gen_bool(0.1) {
                                "questionable"
                            } else {
                                "good"
                            },
                        )
                    })
                    .collect();
                let p = if rng.gen_bool(0.2) {
                    format!("{{\"alert\":{seq}}}").into_bytes()
                } else {
                    canonical(
                        &dev,
                        ["pacemaker", "glucose"][rng.gen_range(0..2)],
                        "1",
                        9,
                        &readings,
                    )
                };
                match batch.add(seq, &p) {
                    Ok(Added::Yes) => added.push((seq, value(&p))),
                    Ok(Added::Full) => break,
                    Err(e) => {
                        assert!(
                            added.is_empty(),
                            "only a first record can be too big: {e:?}"
                        );
                        assert!(e.0.contains("max_batch_bytes"), "{e:?}");
                    }
                }
                assert!(batch.len() <= max);
            }
            let len = batch.len();
            let body = batch.finish();
            assert_eq!(body.len(), len);
            assert!(body.len() <= max);
            let mut got = expand(&value(&body)).unwrap();
            got.sort_by_key(|(s, _)| *s);
            assert_eq!(got, added);
        }
    }

    #[test]
    fn format_1_batches_still_expand() {
        let v =
            serde_json::json!({"gateway_id": "gw", "records": [{"seq": 3, "message": {"a": 1}}]});
        assert_eq!(expand(&v).unwrap(), vec![(3, serde_json::json!({"a": 1}))]);
        assert!(expand(&serde_json::json!({"format": 9})).is_err());
    }
}
