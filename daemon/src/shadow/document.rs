//! Device Shadow documents: the state, metadata and version of one AWS IoT shadow (classic or
//! named), and the payloads AWS IoT Core would publish in answer to `/update`, `/get` and
//! `/delete` requests, computed locally.
//!
//! Everything here is pure: no I/O, no clock (callers pass `now_s`, epoch seconds) and no topics.
//! The caller persists a [`Document`] with serde and publishes the returned payloads on the
//! matching `/accepted`, `/rejected`, `/update/delta` and `/update/documents` topics.
//!
//! # What must stay true
//! - A failed request never changes the document: every change is computed on a copy that
//!   replaces the document only once every check has passed.
//! - The stored state holds no `null`, no empty object and nothing at all that is `null` inside
//!   an array; a section without keys is absent (`None`), never `{}`.
//! - The metadata trees mirror the state trees exactly: the same keys, an object for an object,
//!   `{"timestamp": s}` for a scalar, and for an array an array of as many `{"timestamp": s}`.
//! - A shadow that does not exist (never created, or deleted) has no state and no metadata.
//! - The version never decreases and grows by exactly 1 per accepted update or report.
//! - Deserializing a stored document checks the `"format": 1` marker and the invariants above,
//!   so a corrupt file is refused instead of being served.
//! - No request payload can make this module panic.
//!
//! # Decisions where AWS is unclear
//! 1. **Delete keeps the version.** `/delete/accepted` carries the version the shadow had when it
//!    was deleted, the counter does not move, and the next update produces that version + 1
//!    (AWS's 48-hour reset to 0 is not modelled).
//! 2. **`version` on a shadow that does not exist** is compared with the kept counter like on any
//!    other shadow: 0 for a shadow never created, the version at deletion after a delete.
//! 3. **Empty objects are never stored.** An object emptied by deletions is removed, recursively
//!    up to the section, and a section left empty becomes absent. An object sent empty
//!    (`{"a":{}}`) stores nothing. An object sent over a scalar or an array is merged into an empty
//!    object, so its `null` members vanish and, if nothing is left, the old value is removed.
//! 4. **Nesting depth counts object keys only.** A key directly under `desired` / `reported` is
//!    level 1, a key of an object under it level 2, and so on. Arrays add no level: the keys of an
//!    object held in an array sit one level below the key that holds the array.
//! 5. **`null` inside an array** (directly, or anywhere inside an object or array held in an
//!    array) is refused with 400 `State contains an invalid node`, AWS's documented text without
//!    suffix. A key in `state` other than `desired` / `reported` gets IoT Core's observed text
//!    `State contains an invalid node: '<key>'`; keys are checked in sorted order.
//! 6. **`clientToken`** must be a string of at most the limit in UTF-8 bytes (an empty string is
//!    allowed); `null` or any other type is `Invalid clientToken`. **`version`** must be a JSON
//!    integer ≥ 0 that fits in `u64`; `null`, `1.0`, `-1` and `"1"` are `Invalid version`.
//! 7. Top-level request keys other than `state`, `clientToken` and `version` are ignored.
//! 8. **Array metadata** is one `{"timestamp": s}` per element, whatever the element is; objects
//!    held in arrays are not mirrored in the metadata.
//! 9. **Metadata of a `null` request node** is `{"timestamp": s}` like any leaf, at every level:
//!    `"desired": null` gives `metadata.desired = {"timestamp": s}` and `"state": null` gives
//!    `"metadata": {"timestamp": s}` in `/update/accepted`.
//! 10. **Sizes.** The state size is the length of the compact JSON serialization of
//!     `{"desired":…,"reported":…}` of the resulting state (absent sections omitted, metadata
//!     excluded); exactly `max_state_bytes` is accepted. The request size is the raw payload
//!     length; exactly `max_request_bytes` is accepted.
//! 11. **Delta.** Values compare as JSON values (`1` and `1.0` differ). The `/update/delta`
//!     metadata is the desired metadata of the delta tree. `/get/accepted` carries
//!     `metadata.desired` / `metadata.reported` only, never `metadata.delta`.
//! 12. `/update/delta` is produced whenever the request holds a non-null `desired` section and
//!     the resulting delta is not empty, so `"desired": {}` republishes an outstanding delta.
//! 13. **get / delete payloads**: an empty or whitespace-only payload carries no fields;
//!     otherwise the same byte checks as an update apply (413, 415, 400 `Invalid JSON`), then the
//!     `clientToken` check, then 404. Other fields, `version` included, are ignored.
//! 14. Rejections raised before a valid `clientToken` is known (413 request size, 415,
//!     `Invalid JSON`, `Invalid clientToken`) carry no `clientToken`.
//! 15. [`Document::report`] has no payload bytes, so the request-size and UTF-8 checks do not
//!     apply to it; every other check does, and it never carries a `clientToken`.
//! 16. A version counter that would overflow `u64` is refused with 500 `Internal service failure`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io;

const INVALID_JSON: &str = "Invalid JSON";
const INVALID_CLIENT_TOKEN: &str = "Invalid clientToken";
const INVALID_VERSION: &str = "Invalid version";
const MISSING_STATE: &str = "Missing required node: state";
const STATE_NOT_OBJECT: &str = "State node must be an object";
const DESIRED_NOT_OBJECT: &str = "Desired node must be an object";
const REPORTED_NOT_OBJECT: &str = "Reported node must be an object";
const INVALID_NODE: &str = "State contains an invalid node";
const VERSION_CONFLICT: &str = "Version conflict";
const TOO_LARGE: &str = "The payload exceeds the maximum size allowed";
const NOT_UTF8: &str = "Unsupported documented encoding; supported encoding is UTF-8";
const INTERNAL: &str = "Internal service failure";

/// The only stored format this module reads and writes.
const FORMAT: u32 = 1;

/// Limits of one shadow (AWS's defaults in `Default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Serialized size of the state document (desired + reported, metadata excluded): 8192.
    pub max_state_bytes: usize,
    /// Nesting depth inside desired / reported: 6 (a key directly under `desired` is level 1).
    pub max_depth: usize,
    /// Request payload bytes: 65536 (larger → 413).
    pub max_request_bytes: usize,
    /// clientToken length in bytes: 64.
    pub max_client_token_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_state_bytes: 8192,
            max_depth: 6,
            max_request_bytes: 65536,
            max_client_token_bytes: 64,
        }
    }
}

/// A refused request, published on `/rejected`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {message}")]
pub struct Rejection {
    /// HTTP-like status code (400, 404, 409, 413, 415, 500).
    pub code: u16,
    /// AWS's error message text.
    pub message: String,
    /// The request's clientToken, when it was known to be valid before the failure.
    pub client_token: Option<String>,
}

impl Rejection {
    /// `{"code":..,"message":"..","timestamp":now_s,"clientToken":".."}` (clientToken only when known).
    pub fn to_json(&self, now_s: i64) -> Value {
        let mut out = Map::new();
        out.insert("code".into(), Value::from(self.code));
        out.insert("message".into(), Value::from(self.message.as_str()));
        out.insert("timestamp".into(), Value::from(now_s));
        insert_token(&mut out, self.client_token.as_deref());
        Value::Object(out)
    }
}

fn reject(code: u16, message: impl Into<String>, token: Option<&str>) -> Rejection {
    Rejection {
        code,
        message: message.into(),
        client_token: token.map(str::to_owned),
    }
}

/// One shadow as stored (serde: it is persisted as JSON by the caller; the format is stable and
/// versioned by a `"format": 1` field, and checked on load).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Stored", into = "Stored")]
pub struct Document {
    desired: Option<Map<String, Value>>,
    reported: Option<Map<String, Value>>,
    desired_metadata: Map<String, Value>,
    reported_metadata: Map<String, Value>,
    version: u64,
    exists: bool,
}

/// What an accepted update produces, each a full JSON payload ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Updated {
    /// For `/update/accepted`.
    pub accepted: Value,
    /// For `/update/delta` (None: nothing to publish).
    pub delta: Option<Value>,
    /// For `/update/documents`.
    pub documents: Value,
}

/// What a request does to one section (`desired` or `reported`).
#[derive(Clone, Copy)]
enum Patch<'a> {
    /// The section is not in the request.
    Keep,
    /// The section (or the whole state) is `null`.
    Clear,
    /// The section is an object to merge.
    Merge(&'a Map<String, Value>),
}

impl Document {
    /// True while the shadow exists (created by an update, not deleted since).
    pub fn exists(&self) -> bool {
        self.exists
    }

    /// Current version (kept across delete: a shadow recreated continues the numbering).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Current desired state (None when that section is absent).
    pub fn desired(&self) -> Option<&Map<String, Value>> {
        self.desired.as_ref()
    }

    /// Current reported state (None when that section is absent).
    pub fn reported(&self) -> Option<&Map<String, Value>> {
        self.reported.as_ref()
    }

    /// Apply an `/update` request payload (raw bytes as the device sent them). On error the document is unchanged.
    pub fn update(
        &mut self,
        payload: &[u8],
        now_s: i64,
        limits: &Limits,
    ) -> Result<Updated, Rejection> {
        let request = parse_object(payload, limits)?;
        let token = client_token(&request, limits)?;
        self.apply(&request, token, now_s, limits)
    }

    /// Check a get/delete request against an existing shadow; its `clientToken`.
    fn existing_request(
        &self,
        payload: &[u8],
        shadow_name: &str,
        limits: &Limits,
    ) -> Result<Option<String>, Rejection> {
        let request = parse_optional_object(payload, limits)?;
        let token = match &request {
            Some(request) => client_token(request, limits)?,
            None => None,
        };
        self.require_existing(shadow_name, token)?;
        Ok(token.map(str::to_owned))
    }

    /// Answer a `/get` request: the `/get/accepted` payload. `shadow_name` is the thing name for the classic shadow or the named shadow's name (used in the 404 message).
    pub fn get(
        &self,
        payload: &[u8],
        now_s: i64,
        shadow_name: &str,
        limits: &Limits,
    ) -> Result<Value, Rejection> {
        let token = self.existing_request(payload, shadow_name, limits)?;
        let token = token.as_deref();

        let mut state = self.sections();
        if let Some(desired) = &self.desired {
            let delta = delta_of(desired, self.reported.as_ref());
            if !delta.is_empty() {
                state.insert("delta".into(), Value::Object(delta));
            }
        }
        let mut out = Map::new();
        out.insert("state".into(), Value::Object(state));
        out.insert("metadata".into(), Value::Object(self.metadata_sections()));
        out.insert("version".into(), Value::from(self.version));
        out.insert("timestamp".into(), Value::from(now_s));
        insert_token(&mut out, token);
        Ok(Value::Object(out))
    }

    /// Apply a `/delete` request: the `/delete/accepted` payload.
    pub fn delete(
        &mut self,
        payload: &[u8],
        now_s: i64,
        shadow_name: &str,
        limits: &Limits,
    ) -> Result<Value, Rejection> {
        let token = self.existing_request(payload, shadow_name, limits)?;
        let token = token.as_deref();

        let mut out = Map::new();
        out.insert("version".into(), Value::from(self.version));
        out.insert("timestamp".into(), Value::from(now_s));
        insert_token(&mut out, token);
        *self = Document {
            version: self.version,
            ..Document::default()
        };
        Ok(Value::Object(out))
    }

    /// Merge `reported` fields produced by the gateway itself (not a device request) as an update of `state.reported` — same semantics and same outputs as `update` with payload `{"state":{"reported":<fields>}}`, without a clientToken.
    pub fn report(
        &mut self,
        fields: Map<String, Value>,
        now_s: i64,
        limits: &Limits,
    ) -> Result<Updated, Rejection> {
        let mut state = Map::new();
        state.insert("reported".into(), Value::Object(fields));
        let mut request = Map::new();
        request.insert("state".into(), Value::Object(state));
        self.apply(&request, None, now_s, limits)
    }

    fn require_existing(&self, shadow_name: &str, token: Option<&str>) -> Result<(), Rejection> {
        if self.exists {
            Ok(())
        } else {
            Err(reject(
                404,
                format!("No shadow exists with name: '{shadow_name}'"),
                token,
            ))
        }
    }

    /// Validate a parsed update request and, when every check passes, apply it.
    fn apply(
        &mut self,
        request: &Map<String, Value>,
        token: Option<&str>,
        now_s: i64,
        limits: &Limits,
    ) -> Result<Updated, Rejection> {
        let fail = |code: u16, message: &str| reject(code, message, token);

        let expected_version = match request.get("version") {
            None => None,
            Some(value) => Some(value.as_u64().ok_or_else(|| fail(400, INVALID_VERSION))?),
        };
        let state = request
            .get("state")
            .ok_or_else(|| fail(400, MISSING_STATE))?;
        let (desired_patch, reported_patch) = match state {
            Value::Null => (Patch::Clear, Patch::Clear),
            Value::Object(sections) => {
                if let Some(key) = sections
                    .keys()
                    .find(|key| key.as_str() != "desired" && key.as_str() != "reported")
                {
                    return Err(reject(400, format!("{INVALID_NODE}: '{key}'"), token));
                }
                (
                    section_patch(sections.get("desired"))
                        .ok_or_else(|| fail(400, DESIRED_NOT_OBJECT))?,
                    section_patch(sections.get("reported"))
                        .ok_or_else(|| fail(400, REPORTED_NOT_OBJECT))?,
                )
            }
            _ => return Err(fail(400, STATE_NOT_OBJECT)),
        };
        let merged = [desired_patch, reported_patch]
            .into_iter()
            .filter_map(|patch| match patch {
                Patch::Merge(section) => Some(section),
                Patch::Keep | Patch::Clear => None,
            });
        if merged
            .clone()
            .any(|section| map_too_deep(section, limits.max_depth))
        {
            return Err(reject(
                400,
                format!(
                    "JSON contains too many levels of nesting; maximum is {}",
                    limits.max_depth
                ),
                token,
            ));
        }
        if merged
            .clone()
            .any(|section| section.values().any(has_null_in_array))
        {
            return Err(fail(400, INVALID_NODE));
        }
        if let Some(expected) = expected_version {
            if expected != self.version {
                return Err(fail(409, VERSION_CONFLICT));
            }
        }
        let new_version = self
            .version
            .checked_add(1)
            .ok_or_else(|| fail(500, INTERNAL))?;

        let mut next = self.clone();
        merge_section(
            &mut next.desired,
            &mut next.desired_metadata,
            desired_patch,
            now_s,
        );
        merge_section(
            &mut next.reported,
            &mut next.reported_metadata,
            reported_patch,
            now_s,
        );
        next.version = new_version;
        next.exists = true;
        if next.state_size().ok_or_else(|| fail(500, INTERNAL))? > limits.max_state_bytes {
            return Err(fail(413, TOO_LARGE));
        }

        let mut accepted = Map::new();
        accepted.insert("state".into(), state.clone());
        accepted.insert("metadata".into(), request_metadata(state, now_s));
        accepted.insert("version".into(), Value::from(new_version));
        accepted.insert("timestamp".into(), Value::from(now_s));
        insert_token(&mut accepted, token);

        let delta = match (desired_patch, &next.desired) {
            (Patch::Merge(_), Some(desired)) => {
                let delta = delta_of(desired, next.reported.as_ref());
                if delta.is_empty() {
                    None
                } else {
                    let metadata = delta_metadata(&delta, &next.desired_metadata);
                    let mut out = Map::new();
                    out.insert("version".into(), Value::from(new_version));
                    out.insert("timestamp".into(), Value::from(now_s));
                    out.insert("state".into(), Value::Object(delta));
                    out.insert("metadata".into(), Value::Object(metadata));
                    insert_token(&mut out, token);
                    Some(Value::Object(out))
                }
            }
            _ => None,
        };

        let mut documents = Map::new();
        if self.exists {
            documents.insert("previous".into(), self.snapshot());
        }
        documents.insert("current".into(), next.snapshot());
        documents.insert("timestamp".into(), Value::from(now_s));
        insert_token(&mut documents, token);

        *self = next;
        Ok(Updated {
            accepted: Value::Object(accepted),
            delta,
            documents: Value::Object(documents),
        })
    }

    /// `{"desired"?, "reported"?}` of the current state.
    fn sections(&self) -> Map<String, Value> {
        let mut out = Map::new();
        if let Some(desired) = &self.desired {
            out.insert("desired".into(), Value::Object(desired.clone()));
        }
        if let Some(reported) = &self.reported {
            out.insert("reported".into(), Value::Object(reported.clone()));
        }
        out
    }

    /// `{"desired"?, "reported"?}` of the current metadata (present with its section).
    fn metadata_sections(&self) -> Map<String, Value> {
        let mut out = Map::new();
        if self.desired.is_some() {
            out.insert(
                "desired".into(),
                Value::Object(self.desired_metadata.clone()),
            );
        }
        if self.reported.is_some() {
            out.insert(
                "reported".into(),
                Value::Object(self.reported_metadata.clone()),
            );
        }
        out
    }

    /// `{"state", "metadata", "version"}` as used in `/update/documents`.
    fn snapshot(&self) -> Value {
        let mut out = Map::new();
        out.insert("state".into(), Value::Object(self.sections()));
        out.insert("metadata".into(), Value::Object(self.metadata_sections()));
        out.insert("version".into(), Value::from(self.version));
        Value::Object(out)
    }

    /// Compact serialized size of the state (None only if serialization fails).
    fn state_size(&self) -> Option<usize> {
        #[derive(Serialize)]
        struct StateView<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            desired: Option<&'a Map<String, Value>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reported: Option<&'a Map<String, Value>>,
        }
        let mut counter = ByteCounter(0);
        let view = StateView {
            desired: self.desired.as_ref(),
            reported: self.reported.as_ref(),
        };
        serde_json::to_writer(&mut counter, &view).ok()?;
        Some(counter.0)
    }
}

/// Counts the bytes written to it.
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn insert_token(out: &mut Map<String, Value>, token: Option<&str>) {
    if let Some(token) = token {
        out.insert("clientToken".into(), Value::from(token));
    }
}

/// Checks the payload's size and encoding and parses it as a JSON object.
fn parse_object(payload: &[u8], limits: &Limits) -> Result<Map<String, Value>, Rejection> {
    if payload.len() > limits.max_request_bytes {
        return Err(reject(413, TOO_LARGE, None));
    }
    let text = std::str::from_utf8(payload).map_err(|_| reject(415, NOT_UTF8, None))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(reject(400, INVALID_JSON, None)),
    }
}

/// Like [`parse_object`], but an empty (or whitespace-only) payload is `None`.
fn parse_optional_object(
    payload: &[u8],
    limits: &Limits,
) -> Result<Option<Map<String, Value>>, Rejection> {
    let blank = payload
        .iter()
        .all(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'));
    if blank && payload.len() <= limits.max_request_bytes {
        return Ok(None);
    }
    parse_object(payload, limits).map(Some)
}

/// The request's clientToken, when present and valid.
fn client_token<'a>(
    request: &'a Map<String, Value>,
    limits: &Limits,
) -> Result<Option<&'a str>, Rejection> {
    match request.get("clientToken") {
        None => Ok(None),
        Some(Value::String(token)) if token.len() <= limits.max_client_token_bytes => {
            Ok(Some(token.as_str()))
        }
        Some(_) => Err(reject(400, INVALID_CLIENT_TOKEN, None)),
    }
}

/// What a `desired` / `reported` node of a request asks for (None: not an object nor null).
fn section_patch(node: Option<&Value>) -> Option<Patch<'_>> {
    match node {
        None => Some(Patch::Keep),
        Some(Value::Null) => Some(Patch::Clear),
        Some(Value::Object(section)) => Some(Patch::Merge(section)),
        Some(_) => None,
    }
}

/// True when `map` (whose keys are at the next level, `remaining` levels still allowed) nests
/// object keys deeper than allowed. Arrays add no level.
fn map_too_deep(map: &Map<String, Value>, remaining: usize) -> bool {
    if map.is_empty() {
        return false;
    }
    match remaining.checked_sub(1) {
        None => true,
        Some(below) => map.values().any(|value| value_too_deep(value, below)),
    }
}

fn value_too_deep(value: &Value, remaining: usize) -> bool {
    match value {
        Value::Object(map) => map_too_deep(map, remaining),
        Value::Array(items) => items.iter().any(|item| value_too_deep(item, remaining)),
        _ => false,
    }
}

/// True when a `null` sits anywhere inside an array within `value`.
fn has_null_in_array(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.values().any(has_null_in_array),
        Value::Array(items) => items.iter().any(contains_null),
        _ => false,
    }
}

fn contains_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.values().any(contains_null),
        Value::Array(items) => items.iter().any(contains_null),
        _ => false,
    }
}

fn leaf_metadata(now_s: i64) -> Value {
    let mut leaf = Map::new();
    leaf.insert("timestamp".into(), Value::from(now_s));
    Value::Object(leaf)
}

fn array_metadata(len: usize, now_s: i64) -> Value {
    Value::Array(vec![leaf_metadata(now_s); len])
}

/// Metadata for exactly the nodes of a request (a `null` gets a timestamp like any leaf).
fn request_metadata(value: &Value, now_s: i64) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, child)| (key.clone(), request_metadata(child, now_s)))
                .collect(),
        ),
        Value::Array(items) => array_metadata(items.len(), now_s),
        _ => leaf_metadata(now_s),
    }
}

/// Applies a request's section to the stored section and its metadata.
fn merge_section(
    section: &mut Option<Map<String, Value>>,
    metadata: &mut Map<String, Value>,
    patch: Patch<'_>,
    now_s: i64,
) {
    match patch {
        Patch::Keep => {}
        Patch::Clear => {
            *section = None;
            metadata.clear();
        }
        Patch::Merge(changes) => {
            let mut merged = section.take().unwrap_or_default();
            merge_map(&mut merged, metadata, changes, now_s);
            if merged.is_empty() {
                metadata.clear();
            } else {
                *section = Some(merged);
            }
        }
    }
}

/// Field-by-field merge of `changes` into `target`, keeping `metadata` mirroring `target`.
fn merge_map(
    target: &mut Map<String, Value>,
    metadata: &mut Map<String, Value>,
    changes: &Map<String, Value>,
    now_s: i64,
) {
    for (key, change) in changes {
        match change {
            Value::Null => {
                target.remove(key);
                metadata.remove(key);
            }
            Value::Object(inner_changes) => {
                let old = target.remove(key);
                let old_metadata = metadata.remove(key);
                let (mut inner, mut inner_metadata) = match (old, old_metadata) {
                    (Some(Value::Object(inner)), Some(Value::Object(inner_metadata))) => {
                        (inner, inner_metadata)
                    }
                    (Some(Value::Object(inner)), _) => (inner, Map::new()),
                    _ => (Map::new(), Map::new()),
                };
                merge_map(&mut inner, &mut inner_metadata, inner_changes, now_s);
                if !inner.is_empty() {
                    target.insert(key.clone(), Value::Object(inner));
                    metadata.insert(key.clone(), Value::Object(inner_metadata));
                }
            }
            Value::Array(items) => {
                target.insert(key.clone(), change.clone());
                metadata.insert(key.clone(), array_metadata(items.len(), now_s));
            }
            _ => {
                target.insert(key.clone(), change.clone());
                metadata.insert(key.clone(), leaf_metadata(now_s));
            }
        }
    }
}

/// Every desired leaf that differs from (or is missing in) reported, with its full path.
fn delta_of(
    desired: &Map<String, Value>,
    reported: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut delta = Map::new();
    for (key, wanted) in desired {
        let actual = reported.and_then(|reported| reported.get(key));
        match (wanted, actual) {
            (Value::Object(wanted_inner), Some(Value::Object(actual_inner))) => {
                let inner = delta_of(wanted_inner, Some(actual_inner));
                if !inner.is_empty() {
                    delta.insert(key.clone(), Value::Object(inner));
                }
            }
            (_, Some(actual)) if actual == wanted => {}
            _ => {
                delta.insert(key.clone(), wanted.clone());
            }
        }
    }
    delta
}

/// The desired metadata of exactly the nodes of `delta`.
fn delta_metadata(delta: &Map<String, Value>, metadata: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in delta {
        match (value, metadata.get(key)) {
            (Value::Object(inner), Some(Value::Object(inner_metadata))) => {
                out.insert(
                    key.clone(),
                    Value::Object(delta_metadata(inner, inner_metadata)),
                );
            }
            (_, Some(leaf)) => {
                out.insert(key.clone(), leaf.clone());
            }
            (_, None) => {}
        }
    }
    out
}

/// The persisted form of a [`Document`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    format: u32,
    exists: bool,
    version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    desired: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reported: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    desired_metadata: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    reported_metadata: Map<String, Value>,
}

/// Why a stored document is refused.
#[derive(Debug, thiserror::Error)]
enum StoredError {
    #[error("unsupported shadow document format {0} (expected {FORMAT})")]
    Format(u32),
    #[error("a shadow that does not exist holds state or metadata")]
    StateWithoutShadow,
    #[error(
        "the {0} section is empty, holds a null or an empty object, or has a null in an array"
    )]
    InvalidState(&'static str),
    #[error("the {0} metadata does not mirror its state")]
    MetadataMismatch(&'static str),
}

impl From<Document> for Stored {
    fn from(document: Document) -> Self {
        Stored {
            format: FORMAT,
            exists: document.exists,
            version: document.version,
            desired: document.desired,
            reported: document.reported,
            desired_metadata: document.desired_metadata,
            reported_metadata: document.reported_metadata,
        }
    }
}

impl TryFrom<Stored> for Document {
    type Error = StoredError;

    fn try_from(stored: Stored) -> Result<Self, Self::Error> {
        if stored.format != FORMAT {
            return Err(StoredError::Format(stored.format));
        }
        if !stored.exists
            && (stored.desired.is_some()
                || stored.reported.is_some()
                || !stored.desired_metadata.is_empty()
                || !stored.reported_metadata.is_empty())
        {
            return Err(StoredError::StateWithoutShadow);
        }
        for (name, section, metadata) in [
            ("desired", &stored.desired, &stored.desired_metadata),
            ("reported", &stored.reported, &stored.reported_metadata),
        ] {
            let empty = Map::new();
            let section = match section {
                Some(section) if section.is_empty() || !valid_stored_map(section) => {
                    return Err(StoredError::InvalidState(name));
                }
                Some(section) => section,
                None => &empty,
            };
            if !mirrors_map(section, metadata) {
                return Err(StoredError::MetadataMismatch(name));
            }
        }
        Ok(Document {
            desired: stored.desired,
            reported: stored.reported,
            desired_metadata: stored.desired_metadata,
            reported_metadata: stored.reported_metadata,
            version: stored.version,
            exists: stored.exists,
        })
    }
}

/// No null member, no empty object, no null inside an array.
fn valid_stored_map(map: &Map<String, Value>) -> bool {
    map.values().all(|value| match value {
        Value::Null => false,
        Value::Object(inner) => !inner.is_empty() && valid_stored_map(inner),
        Value::Array(items) => !items.iter().any(contains_null),
        _ => true,
    })
}

fn is_leaf_metadata(value: &Value) -> bool {
    match value {
        Value::Object(leaf) => leaf.len() == 1 && leaf.get("timestamp").is_some_and(Value::is_i64),
        _ => false,
    }
}

/// True when `metadata` has exactly the shape of `state`.
fn mirrors_map(state: &Map<String, Value>, metadata: &Map<String, Value>) -> bool {
    state.len() == metadata.len()
        && state.iter().all(|(key, value)| {
            metadata
                .get(key)
                .is_some_and(|meta| mirrors_value(value, meta))
        })
}

fn mirrors_value(value: &Value, metadata: &Value) -> bool {
    match (value, metadata) {
        (Value::Object(inner), Value::Object(inner_metadata)) => mirrors_map(inner, inner_metadata),
        (Value::Object(_), _) => false,
        (Value::Array(items), Value::Array(leaves)) => {
            items.len() == leaves.len() && leaves.iter().all(is_leaf_metadata)
        }
        (Value::Array(_), _) => false,
        _ => is_leaf_metadata(metadata),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// (name, initial state or None for a fresh shadow, update state, desired, reported)
    type MergeRow = (
        &'static str,
        Option<Value>,
        Value,
        Option<Value>,
        Option<Value>,
    );
    /// (name, payload, code, message, echoed token)
    type UpdateErrorRow = (&'static str, Vec<u8>, u16, String, Option<&'static str>);
    /// (name, payload, shadow exists, code, message, echoed token)
    type ReadErrorRow = (
        &'static str,
        Vec<u8>,
        bool,
        u16,
        &'static str,
        Option<&'static str>,
    );

    fn now() -> i64 {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        i64::try_from(secs).unwrap()
    }

    fn limits() -> Limits {
        Limits::default()
    }

    fn ts(t: i64) -> Value {
        json!({ "timestamp": t })
    }

    fn bytes(value: &Value) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
    }

    fn update(doc: &mut Document, payload: Value, t: i64) -> Result<Updated, Rejection> {
        doc.update(&bytes(&payload), t, &limits())
    }

    /// A document created by one update with `state`.
    fn created(state: Value, t: i64) -> Document {
        let mut doc = Document::default();
        update(&mut doc, json!({ "state": state }), t).unwrap();
        doc
    }

    fn as_obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// The stored invariants hold, and the document survives a serde round trip.
    fn assert_invariants(doc: &Document) {
        let checked = Document::try_from(Stored::from(doc.clone()))
            .unwrap_or_else(|e| panic!("invariants broken ({e}): {doc:?}"));
        assert_eq!(&checked, doc);
        let text = serde_json::to_string(doc).unwrap();
        if let Err(e) = serde_json::from_str::<Document>(&text) {
            panic!("stored form refused ({e}): {text}");
        }
    }

    /// Found by the fuzz target `shadow_document` (its minimised input below): a number
    /// serde_json reads only approximately (an integer too long for `u64` becomes an `f64`) is
    /// stored in its shortest form, which serde_json's default parser read back one unit in
    /// the last place off. The stored shadow then did not load equal to what was saved, and a
    /// delta could appear or vanish across a restart. serde_json's `float_roundtrip` parser
    /// reads every float exactly.
    #[test]
    fn stored_numbers_read_back_exactly() {
        const MINIMISED: &[u8] =
            br#"{"state": {"reported":{"l":[26666666666666666666666666, 3], "o":{}}}}"#;
        let mut doc = Document::default();
        doc.update(MINIMISED, now(), &limits()).unwrap();
        assert_invariants(&doc);
        let stored = serde_json::to_vec(&doc).unwrap();
        let back: Document = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, doc, "{}", String::from_utf8_lossy(&stored));
    }

    #[test]
    fn limits_default_are_aws_defaults() {
        let l = Limits::default();
        assert_eq!(l.max_state_bytes, 8192);
        assert_eq!(l.max_depth, 6);
        assert_eq!(l.max_request_bytes, 65536);
        assert_eq!(l.max_client_token_bytes, 64);
    }

    #[test]
    fn merge_table() {
        // (name, initial state or None for a fresh shadow, update state, desired, reported)
        let rows: Vec<MergeRow> = vec![
            (
                "create",
                None,
                json!({"desired": {"a": 1}, "reported": {"b": true}}),
                Some(json!({"a": 1})),
                Some(json!({"b": true})),
            ),
            (
                "nested merge",
                Some(json!({"desired": {"a": {"b": 1, "c": 2}, "z": 0}})),
                json!({"desired": {"a": {"c": 3, "d": {"e": 4}}}}),
                Some(json!({"a": {"b": 1, "c": 3, "d": {"e": 4}}, "z": 0})),
                None,
            ),
            (
                "null deletes a key",
                Some(json!({"desired": {"a": 1, "b": 2}})),
                json!({"desired": {"a": null}}),
                Some(json!({"b": 2})),
                None,
            ),
            (
                "null of a missing key is harmless",
                Some(json!({"desired": {"a": 1}})),
                json!({"desired": {"x": null}}),
                Some(json!({"a": 1})),
                None,
            ),
            (
                "nested null deletes and the emptied object goes",
                Some(json!({"desired": {"a": {"b": {"c": 1}}, "k": 1}})),
                json!({"desired": {"a": {"b": {"c": null}}}}),
                Some(json!({"k": 1})),
                None,
            ),
            (
                "last key deleted removes the section",
                Some(json!({"desired": {"a": 1}, "reported": {"r": 1}})),
                json!({"desired": {"a": null}}),
                None,
                Some(json!({"r": 1})),
            ),
            (
                "null deletes a whole object",
                Some(json!({"reported": {"o": {"x": 1, "y": 2}, "k": 1}})),
                json!({"reported": {"o": null}}),
                None,
                Some(json!({"k": 1})),
            ),
            (
                "arrays are replaced whole",
                Some(json!({"reported": {"l": [1, 2, 3]}})),
                json!({"reported": {"l": [4]}}),
                None,
                Some(json!({"l": [4]})),
            ),
            (
                "arrays of objects replaced whole",
                Some(json!({"reported": {"l": [{"a": 1}, {"b": 2}]}})),
                json!({"reported": {"l": [{"c": 3}]}}),
                None,
                Some(json!({"l": [{"c": 3}]})),
            ),
            (
                "object over scalar (nulls inside vanish)",
                Some(json!({"desired": {"a": 1}})),
                json!({"desired": {"a": {"x": 1, "y": null}}}),
                Some(json!({"a": {"x": 1}})),
                None,
            ),
            (
                "object over array",
                Some(json!({"desired": {"a": [1, 2]}})),
                json!({"desired": {"a": {"x": 1}}}),
                Some(json!({"a": {"x": 1}})),
                None,
            ),
            (
                "scalar over object",
                Some(json!({"desired": {"a": {"x": 1, "y": 2}}})),
                json!({"desired": {"a": "s"}}),
                Some(json!({"a": "s"})),
                None,
            ),
            (
                "array over object",
                Some(json!({"desired": {"a": {"x": 1}}})),
                json!({"desired": {"a": [1]}}),
                Some(json!({"a": [1]})),
                None,
            ),
            (
                "empty object over scalar removes it",
                Some(json!({"desired": {"a": 1, "b": 2}})),
                json!({"desired": {"a": {}}}),
                Some(json!({"b": 2})),
                None,
            ),
            (
                "empty object sent is not stored",
                None,
                json!({"desired": {"a": {}}, "reported": {"r": 1}}),
                None,
                Some(json!({"r": 1})),
            ),
            (
                "desired null removes the desired section only",
                Some(json!({"desired": {"a": 1}, "reported": {"b": 2}})),
                json!({"desired": null}),
                None,
                Some(json!({"b": 2})),
            ),
            (
                "reported null removes the reported section only",
                Some(json!({"desired": {"a": 1}, "reported": {"b": 2}})),
                json!({"reported": null}),
                Some(json!({"a": 1})),
                None,
            ),
            (
                "state null clears both",
                Some(json!({"desired": {"a": 1}, "reported": {"b": 2}})),
                Value::Null,
                None,
                None,
            ),
            (
                "empty state changes nothing",
                Some(json!({"desired": {"a": 1}})),
                json!({}),
                Some(json!({"a": 1})),
                None,
            ),
            (
                "reported update leaves desired alone",
                Some(json!({"desired": {"a": 1}, "reported": {"a": 0}})),
                json!({"reported": {"a": 1}}),
                Some(json!({"a": 1})),
                Some(json!({"a": 1})),
            ),
        ];
        let t = now();
        for (name, initial, change, desired, reported) in rows {
            let mut doc = match initial {
                Some(state) => created(state, t),
                None => Document::default(),
            };
            let before = doc.version();
            update(&mut doc, json!({ "state": change }), t + 1)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                doc.desired().cloned(),
                desired.map(as_obj),
                "{name}: desired"
            );
            assert_eq!(
                doc.reported().cloned(),
                reported.map(as_obj),
                "{name}: reported"
            );
            assert!(doc.exists(), "{name}: exists");
            assert_eq!(doc.version(), before + 1, "{name}: version");
            assert_invariants(&doc);
        }
    }

    #[test]
    fn state_null_keeps_the_shadow() {
        let t = now();
        let mut doc = created(json!({"desired": {"a": 1}}), t);
        let out = update(&mut doc, json!({"state": null}), t).unwrap();
        assert_eq!(
            out.accepted,
            json!({"state": null, "metadata": ts(t), "version": 2, "timestamp": t})
        );
        let got = doc.get(b"", t, "thing", &limits()).unwrap();
        assert_eq!(
            got,
            json!({"state": {}, "metadata": {}, "version": 2, "timestamp": t})
        );
    }

    #[test]
    fn version_increments_and_conflicts() {
        let t = now();
        let mut doc = Document::default();
        assert_eq!(doc.version(), 0);
        assert!(!doc.exists());
        // (payload, expected result: Ok(version) or Err(code))
        let rows: Vec<(Value, Result<u64, u16>)> = vec![
            (
                json!({"state": {"reported": {"a": 1}}, "version": 0}),
                Ok(1),
            ),
            (json!({"state": {"reported": {"a": 2}}}), Ok(2)),
            (
                json!({"state": {"reported": {"a": 3}}, "version": 1}),
                Err(409),
            ),
            (
                json!({"state": {"reported": {"a": 3}}, "version": 3}),
                Err(409),
            ),
            (
                json!({"state": {"reported": {"a": 3}}, "version": 2}),
                Ok(3),
            ),
            (json!({"state": {}}), Ok(4)),
        ];
        for (payload, expected) in rows {
            let before = doc.version();
            let got = update(&mut doc, payload.clone(), t);
            match expected {
                Ok(version) => {
                    let out = got.unwrap();
                    assert_eq!(out.accepted["version"], json!(version), "{payload}");
                    assert_eq!(doc.version(), version, "{payload}");
                }
                Err(code) => {
                    assert_eq!(got.unwrap_err().code, code, "{payload}");
                    assert_eq!(doc.version(), before, "rejected update moved the version");
                }
            }
        }
        doc.report(as_obj(json!({"b": 1})), t, &limits()).unwrap();
        assert_eq!(doc.version(), 5);
    }

    #[test]
    fn version_kept_across_delete_and_continued() {
        let t = now();
        let mut doc = created(json!({"reported": {"a": 1}}), t);
        update(&mut doc, json!({"state": {"reported": {"a": 2}}}), t).unwrap();
        assert_eq!(doc.version(), 2);
        let deleted = doc.delete(b"", t, "thing", &limits()).unwrap();
        assert_eq!(deleted, json!({"version": 2, "timestamp": t}));
        assert!(!doc.exists());
        assert_eq!(doc.version(), 2);
        assert_eq!(doc.desired(), None);
        assert_eq!(doc.reported(), None);
        assert_invariants(&doc);
        // A stale version is still refused, the kept one is accepted.
        let stale = update(
            &mut doc,
            json!({"state": {"reported": {"b": 1}}, "version": 0}),
            t,
        );
        assert_eq!(stale.unwrap_err().code, 409);
        let out = update(
            &mut doc,
            json!({"state": {"reported": {"b": 1}}, "version": 2}),
            t,
        )
        .unwrap();
        assert_eq!(out.accepted["version"], json!(3));
        assert!(out.documents.get("previous").is_none());
        assert_eq!(
            doc.reported(),
            Some(&as_obj(json!({"b": 1}))),
            "old state is gone"
        );
        assert!(doc.exists());
    }

    #[test]
    fn delta_table() {
        // (name, initial state, update state, expected delta state)
        let rows: Vec<(&str, Value, Value, Option<Value>)> = vec![
            (
                "nested difference keeps the full path",
                json!({"reported": {"a": {"b": {"c": 1, "d": 2}, "e": 1}}}),
                json!({"desired": {"a": {"b": {"c": 1, "d": 3}, "e": 1}}}),
                Some(json!({"a": {"b": {"d": 3}}})),
            ),
            (
                "desired-only keys are included",
                json!({"reported": {"r": 1}}),
                json!({"desired": {"x": {"y": 1}}}),
                Some(json!({"x": {"y": 1}})),
            ),
            (
                "reported-only keys are excluded",
                json!({"reported": {"r": 1, "x": 1}}),
                json!({"desired": {"x": 2}}),
                Some(json!({"x": 2})),
            ),
            (
                "arrays compare whole",
                json!({"reported": {"l": [1, 2, 3]}}),
                json!({"desired": {"l": [1, 2, 4]}}),
                Some(json!({"l": [1, 2, 4]})),
            ),
            (
                "equal arrays give nothing",
                json!({"reported": {"l": [1, 2]}}),
                json!({"desired": {"l": [1, 2]}}),
                None,
            ),
            (
                "object against scalar copied whole",
                json!({"reported": {"a": 5}}),
                json!({"desired": {"a": {"b": 1}}}),
                Some(json!({"a": {"b": 1}})),
            ),
            (
                "equal gives nothing",
                json!({"reported": {"a": 1, "b": {"c": "x"}}}),
                json!({"desired": {"a": 1, "b": {"c": "x"}}}),
                None,
            ),
            (
                "keys outside this update are included",
                json!({"desired": {"a": 1}}),
                json!({"desired": {"b": 2}}),
                Some(json!({"a": 1, "b": 2})),
            ),
            (
                "no desired in the request: nothing published",
                json!({"desired": {"a": 1}}),
                json!({"reported": {"b": 1}}),
                None,
            ),
            (
                "desired null: nothing published",
                json!({"desired": {"a": 1}}),
                json!({"desired": null}),
                None,
            ),
            (
                "empty desired republishes an outstanding delta",
                json!({"desired": {"a": 1}}),
                json!({"desired": {}}),
                Some(json!({"a": 1})),
            ),
            (
                "reported catching up in the same request",
                json!({"reported": {"a": 0}}),
                json!({"desired": {"a": 1}, "reported": {"a": 1}}),
                None,
            ),
        ];
        let t = now();
        for (name, initial, change, expected) in rows {
            let mut doc = created(initial, t);
            let out = update(&mut doc, json!({ "state": change }), t + 1).unwrap();
            match expected {
                None => assert_eq!(out.delta, None, "{name}"),
                Some(state) => {
                    let delta = out.delta.unwrap_or_else(|| panic!("{name}: no delta"));
                    assert_eq!(delta["state"], state, "{name}");
                    assert_eq!(delta["version"], json!(2), "{name}");
                    assert_eq!(delta["timestamp"], json!(t + 1), "{name}");
                    assert!(delta.get("clientToken").is_none(), "{name}");
                }
            }
        }
    }

    #[test]
    fn delta_metadata_is_desired_metadata() {
        let t = now();
        let mut doc = created(json!({"desired": {"a": {"b": 1, "c": 2}, "l": [1, 2]}}), t);
        let out = update(
            &mut doc,
            json!({"state": {"desired": {"a": {"c": 3}}, "reported": {"a": {"b": 1}}},
                   "clientToken": "tok"}),
            t + 7,
        )
        .unwrap();
        assert_eq!(
            out.delta,
            Some(json!({
                "version": 2,
                "timestamp": t + 7,
                "state": {"a": {"c": 3}, "l": [1, 2]},
                "metadata": {"a": {"c": ts(t + 7)}, "l": [ts(t), ts(t)]},
                "clientToken": "tok",
            }))
        );
    }

    #[test]
    fn documents_previous_and_current() {
        let t = now();
        let mut doc = Document::default();
        let first = update(&mut doc, json!({"state": {"desired": {"a": 1}}}), t).unwrap();
        assert_eq!(
            first.documents,
            json!({
                "current": {
                    "state": {"desired": {"a": 1}},
                    "metadata": {"desired": {"a": ts(t)}},
                    "version": 1,
                },
                "timestamp": t,
            })
        );
        let second = update(
            &mut doc,
            json!({"state": {"reported": {"b": [1]}}, "clientToken": "c2"}),
            t + 1,
        )
        .unwrap();
        assert_eq!(
            second.documents,
            json!({
                "previous": {
                    "state": {"desired": {"a": 1}},
                    "metadata": {"desired": {"a": ts(t)}},
                    "version": 1,
                },
                "current": {
                    "state": {"desired": {"a": 1}, "reported": {"b": [1]}},
                    "metadata": {"desired": {"a": ts(t)}, "reported": {"b": [ts(t + 1)]}},
                    "version": 2,
                },
                "timestamp": t + 1,
                "clientToken": "c2",
            })
        );
    }

    #[test]
    fn metadata_timestamps() {
        let t1 = now();
        let t2 = t1 + 5;
        let t3 = t1 + 9;
        let mut doc = created(
            json!({"desired": {"a": 1, "b": {"c": 2}, "l": [1, 2], "o": {"p": 1}}}),
            t1,
        );
        let out = update(
            &mut doc,
            json!({"state": {"desired": {"b": {"d": 3}, "l": [9], "o": 5}}}),
            t2,
        )
        .unwrap();
        // Accepted metadata covers exactly the request's leaves.
        assert_eq!(
            out.accepted["metadata"],
            json!({"desired": {"b": {"d": ts(t2)}, "l": [ts(t2)], "o": ts(t2)}})
        );
        let got = doc.get(b"", t2, "thing", &limits()).unwrap();
        assert_eq!(
            got["metadata"],
            json!({"desired": {"a": ts(t1), "b": {"c": ts(t1), "d": ts(t2)}, "l": [ts(t2)], "o": ts(t2)}})
        );
        // A null leaf gets a timestamp in accepted and loses its stored metadata.
        let out = update(
            &mut doc,
            json!({"state": {"desired": {"a": null, "b": {"c": null}}, "reported": null}}),
            t3,
        )
        .unwrap();
        assert_eq!(
            out.accepted,
            json!({
                "state": {"desired": {"a": null, "b": {"c": null}}, "reported": null},
                "metadata": {"desired": {"a": ts(t3), "b": {"c": ts(t3)}}, "reported": ts(t3)},
                "version": 3,
                "timestamp": t3,
            })
        );
        let got = doc.get(b"", t3, "thing", &limits()).unwrap();
        assert_eq!(
            got["metadata"],
            json!({"desired": {"b": {"d": ts(t2)}, "l": [ts(t2)], "o": ts(t2)}})
        );
        assert_invariants(&doc);
    }

    #[test]
    fn metadata_of_arrays_one_per_element() {
        let t = now();
        let mut doc = Document::default();
        let out = update(
            &mut doc,
            json!({"state": {"reported": {"l": [1, {"x": 1}, [2]], "e": []}}}),
            t,
        )
        .unwrap();
        let expected = json!({"reported": {"l": [ts(t), ts(t), ts(t)], "e": []}});
        assert_eq!(out.accepted["metadata"], expected);
        assert_eq!(
            doc.get(b"", t, "x", &limits()).unwrap()["metadata"],
            expected
        );
    }

    #[test]
    fn accepted_echoes_the_request_state() {
        let t = now();
        let mut doc = created(json!({"reported": {"z": 1}}), t);
        let out = update(
            &mut doc,
            json!({"state": {"desired": {"a": {"b": null, "c": [1]}}}, "clientToken": "abc",
                   "version": 1, "other": 1}),
            t,
        )
        .unwrap();
        assert_eq!(
            out.accepted,
            json!({
                "state": {"desired": {"a": {"b": null, "c": [1]}}},
                "metadata": {"desired": {"a": {"b": ts(t), "c": [ts(t)]}}},
                "version": 2,
                "timestamp": t,
                "clientToken": "abc",
            })
        );
    }

    #[test]
    fn client_token_echoed_or_absent() {
        let t = now();
        let l = limits();
        for token in [None, Some("tok-1")] {
            let with = |mut payload: Value| {
                if let Some(token) = token {
                    payload["clientToken"] = json!(token);
                }
                bytes(&payload)
            };
            let expected = token.map(|t| json!(t));
            let mut doc = Document::default();
            // 404 on get and delete of a missing shadow
            let e = doc.get(&with(json!({})), t, "s", &l).unwrap_err();
            assert_eq!(e.client_token.as_deref(), token);
            assert_eq!(e.to_json(t).get("clientToken"), expected.as_ref());
            let e = doc.delete(&with(json!({})), t, "s", &l).unwrap_err();
            assert_eq!(e.client_token.as_deref(), token);
            // accepted, delta, documents
            let out = doc
                .update(&with(json!({"state": {"desired": {"a": 1}}})), t, &l)
                .unwrap();
            assert_eq!(out.accepted.get("clientToken"), expected.as_ref());
            assert_eq!(out.delta.unwrap().get("clientToken"), expected.as_ref());
            assert_eq!(out.documents.get("clientToken"), expected.as_ref());
            // rejected (version conflict)
            let e = doc
                .update(&with(json!({"state": {}, "version": 9})), t, &l)
                .unwrap_err();
            assert_eq!(e.code, 409);
            assert_eq!(e.to_json(t).get("clientToken"), expected.as_ref());
            // get and delete accepted
            let got = doc.get(&with(json!({})), t, "s", &l).unwrap();
            assert_eq!(got.get("clientToken"), expected.as_ref());
            let deleted = doc.delete(&with(json!({})), t, "s", &l).unwrap();
            assert_eq!(deleted.get("clientToken"), expected.as_ref());
        }
    }

    #[test]
    fn rejection_to_json() {
        let t = now();
        let with = Rejection {
            code: 409,
            message: "Version conflict".into(),
            client_token: Some("x".into()),
        };
        assert_eq!(
            with.to_json(t),
            json!({"code": 409, "message": "Version conflict", "timestamp": t, "clientToken": "x"})
        );
        let without = Rejection {
            client_token: None,
            ..with
        };
        assert_eq!(
            without.to_json(t),
            json!({"code": 409, "message": "Version conflict", "timestamp": t})
        );
    }

    /// Nested objects `{"k":{"k":...{"k":1}}}` with `levels` keys.
    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |inner, _| json!({ "k": inner }))
    }

    #[test]
    fn update_errors_table() {
        let t = now();
        let tok = "tk";
        let big_string = "x".repeat(65536);
        let oversized = bytes(&json!({"state": {"reported": {"a": big_string}}}));
        let long_token = "a".repeat(65);
        let state_too_big = "y".repeat(9000);
        // (name, payload, code, message, echoed token)
        let rows: Vec<UpdateErrorRow> = vec![
            ("request too large", oversized, 413, TOO_LARGE.into(), None),
            (
                "not UTF-8",
                b"{\"state\":{\"reported\":{\"a\":\"\xff\"}}}".to_vec(),
                415,
                NOT_UTF8.into(),
                None,
            ),
            (
                "not JSON",
                b"{\"state\":".to_vec(),
                400,
                INVALID_JSON.into(),
                None,
            ),
            ("empty payload", Vec::new(), 400, INVALID_JSON.into(), None),
            (
                "not an object",
                b"[1,2]".to_vec(),
                400,
                INVALID_JSON.into(),
                None,
            ),
            (
                "a string",
                b"\"state\"".to_vec(),
                400,
                INVALID_JSON.into(),
                None,
            ),
            (
                "clientToken not a string",
                bytes(&json!({"state": {}, "clientToken": 5})),
                400,
                INVALID_CLIENT_TOKEN.into(),
                None,
            ),
            (
                "clientToken null",
                bytes(&json!({"state": {}, "clientToken": null})),
                400,
                INVALID_CLIENT_TOKEN.into(),
                None,
            ),
            (
                "clientToken too long",
                bytes(&json!({"state": {}, "clientToken": long_token})),
                400,
                INVALID_CLIENT_TOKEN.into(),
                None,
            ),
            (
                "clientToken checked before version",
                bytes(&json!({"clientToken": 1, "version": "x"})),
                400,
                INVALID_CLIENT_TOKEN.into(),
                None,
            ),
            (
                "version a string",
                bytes(&json!({"state": {}, "version": "1", "clientToken": tok})),
                400,
                INVALID_VERSION.into(),
                Some(tok),
            ),
            (
                "version negative",
                bytes(&json!({"state": {}, "version": -1, "clientToken": tok})),
                400,
                INVALID_VERSION.into(),
                Some(tok),
            ),
            (
                "version fractional",
                bytes(&json!({"state": {}, "version": 1.5})),
                400,
                INVALID_VERSION.into(),
                None,
            ),
            (
                "version null",
                bytes(&json!({"state": {}, "version": null})),
                400,
                INVALID_VERSION.into(),
                None,
            ),
            (
                "version checked before state",
                bytes(&json!({"version": true})),
                400,
                INVALID_VERSION.into(),
                None,
            ),
            (
                "missing state",
                bytes(&json!({"clientToken": tok, "desired": {}})),
                400,
                MISSING_STATE.into(),
                Some(tok),
            ),
            (
                "state a number",
                bytes(&json!({"state": 5, "clientToken": tok})),
                400,
                STATE_NOT_OBJECT.into(),
                Some(tok),
            ),
            (
                "state an array",
                bytes(&json!({"state": [{}]})),
                400,
                STATE_NOT_OBJECT.into(),
                None,
            ),
            (
                "state holds delta",
                bytes(&json!({"state": {"delta": {"a": 1}, "desired": 1}, "clientToken": tok})),
                400,
                "State contains an invalid node: 'delta'".into(),
                Some(tok),
            ),
            (
                "desired not an object",
                bytes(&json!({"state": {"desired": 1, "reported": 1}, "clientToken": tok})),
                400,
                DESIRED_NOT_OBJECT.into(),
                Some(tok),
            ),
            (
                "reported not an object",
                bytes(&json!({"state": {"reported": [1]}, "clientToken": tok})),
                400,
                REPORTED_NOT_OBJECT.into(),
                Some(tok),
            ),
            (
                "too deep (7 levels)",
                bytes(&json!({"state": {"desired": nested(7)}, "clientToken": tok})),
                400,
                "JSON contains too many levels of nesting; maximum is 6".into(),
                Some(tok),
            ),
            (
                "too deep in reported, through an array",
                bytes(&json!({"state": {"reported": {"l": [nested(6)]}}})),
                400,
                "JSON contains too many levels of nesting; maximum is 6".into(),
                None,
            ),
            (
                "depth checked before nulls in arrays",
                bytes(&json!({"state": {"desired": nested(7), "reported": {"l": [null]}}})),
                400,
                "JSON contains too many levels of nesting; maximum is 6".into(),
                None,
            ),
            (
                "null in an array",
                bytes(&json!({"state": {"desired": {"l": [1, null]}}, "clientToken": tok})),
                400,
                INVALID_NODE.into(),
                Some(tok),
            ),
            (
                "null in an object inside an array",
                bytes(&json!({"state": {"reported": {"l": [{"a": null}]}}})),
                400,
                INVALID_NODE.into(),
                None,
            ),
            (
                "null-in-array checked before version conflict",
                bytes(&json!({"state": {"reported": {"l": [null]}}, "version": 7})),
                400,
                INVALID_NODE.into(),
                None,
            ),
            (
                "version conflict",
                bytes(&json!({"state": {"reported": {"a": 2}}, "version": 7, "clientToken": tok})),
                409,
                VERSION_CONFLICT.into(),
                Some(tok),
            ),
            (
                "version conflict before state size",
                bytes(&json!({"state": {"reported": {"a": state_too_big}}, "version": 0})),
                409,
                VERSION_CONFLICT.into(),
                None,
            ),
            (
                "state too large",
                bytes(&json!({"state": {"reported": {"a": state_too_big}}, "clientToken": tok})),
                413,
                TOO_LARGE.into(),
                Some(tok),
            ),
        ];
        for (name, payload, code, message, token) in rows {
            let mut doc = created(json!({"desired": {"a": 1}, "reported": {"b": [1]}}), t);
            let before = doc.clone();
            let err = doc.update(&payload, t + 1, &limits()).unwrap_err();
            assert_eq!(err.code, code, "{name}");
            assert_eq!(err.message, message, "{name}");
            assert_eq!(err.client_token.as_deref(), token, "{name}");
            assert_eq!(doc, before, "{name}: document changed");
            let body = err.to_json(t + 1);
            assert_eq!(body["code"], json!(code), "{name}");
            assert_eq!(body["message"], json!(message), "{name}");
            assert_eq!(body["timestamp"], json!(t + 1), "{name}");
        }
    }

    #[test]
    fn get_and_delete_errors_table() {
        let t = now();
        let l = limits();
        let oversized = {
            let mut p = b"{\"clientToken\":\"a\"}".to_vec();
            p.resize(65537, b' ');
            p
        };
        // (name, payload, exists, code, message, token)
        let rows: Vec<ReadErrorRow> = vec![
            (
                "missing shadow",
                Vec::new(),
                false,
                404,
                "No shadow exists with name: 'dev-1'",
                None,
            ),
            (
                "missing shadow with token",
                bytes(&json!({"clientToken": "q"})),
                false,
                404,
                "No shadow exists with name: 'dev-1'",
                Some("q"),
            ),
            ("too large", oversized, true, 413, TOO_LARGE, None),
            (
                "not UTF-8",
                b"{\"a\":\"\xc3\"}".to_vec(),
                true,
                415,
                NOT_UTF8,
                None,
            ),
            ("invalid JSON", b"{".to_vec(), true, 400, INVALID_JSON, None),
            (
                "not an object",
                b"42".to_vec(),
                true,
                400,
                INVALID_JSON,
                None,
            ),
            (
                "bad token before 404",
                bytes(&json!({"clientToken": ["x"]})),
                false,
                400,
                INVALID_CLIENT_TOKEN,
                None,
            ),
        ];
        for (name, payload, exists, code, message, token) in rows {
            let mut doc = if exists {
                created(json!({"reported": {"a": 1}}), t)
            } else {
                Document::default()
            };
            let before = doc.clone();
            let err = doc.get(&payload, t, "dev-1", &l).unwrap_err();
            assert_eq!(
                (err.code, err.message.as_str(), err.client_token.as_deref()),
                (code, message, token),
                "get: {name}"
            );
            let err = doc.delete(&payload, t, "dev-1", &l).unwrap_err();
            assert_eq!(
                (err.code, err.message.as_str(), err.client_token.as_deref()),
                (code, message, token),
                "delete: {name}"
            );
            assert_eq!(doc, before, "{name}: document changed");
        }
    }

    #[test]
    fn get_and_delete_accept_empty_or_object_payloads() {
        let t = now();
        let l = limits();
        let payloads: Vec<&[u8]> =
            vec![b"", b"  \r\n\t", b"{}", b"{\"clientToken\":\"u\",\"x\":1}"];
        for payload in payloads {
            let mut doc = created(json!({"reported": {"a": 1}}), t);
            assert!(doc.get(payload, t, "n", &l).is_ok(), "{payload:?}");
            assert!(doc.delete(payload, t, "n", &l).is_ok(), "{payload:?}");
            let again = doc.delete(payload, t, "n", &l).unwrap_err();
            assert_eq!(again.code, 404, "second delete of {payload:?}");
            assert_eq!(doc.get(payload, t, "n", &l).unwrap_err().code, 404);
        }
    }

    #[test]
    fn get_full_document() {
        let t = now();
        let mut doc = created(
            json!({"desired": {"a": 1, "b": {"c": 2}}, "reported": {"a": 1, "r": 0}}),
            t,
        );
        update(
            &mut doc,
            json!({"state": {"desired": {"b": {"c": 3}}}}),
            t + 2,
        )
        .unwrap();
        let got = doc
            .get(b"{\"clientToken\":\"g\"}", t + 3, "thing", &limits())
            .unwrap();
        assert_eq!(
            got,
            json!({
                "state": {
                    "desired": {"a": 1, "b": {"c": 3}},
                    "reported": {"a": 1, "r": 0},
                    "delta": {"b": {"c": 3}},
                },
                "metadata": {
                    "desired": {"a": ts(t), "b": {"c": ts(t + 2)}},
                    "reported": {"a": ts(t), "r": ts(t)},
                },
                "version": 2,
                "timestamp": t + 3,
                "clientToken": "g",
            })
        );
        // In sync: no delta at all.
        update(
            &mut doc,
            json!({"state": {"reported": {"b": {"c": 3}}}}),
            t + 4,
        )
        .unwrap();
        let got = doc.get(b"", t + 4, "thing", &limits()).unwrap();
        assert!(got["state"].get("delta").is_none());
        assert!(got["metadata"].get("delta").is_none());
    }

    #[test]
    fn state_size_limit() {
        let t = now();
        // `{"desired":{"a":""}}` is 20 bytes.
        let exact = "x".repeat(8192 - 20);
        let mut doc = Document::default();
        update(&mut doc, json!({"state": {"desired": {"a": exact}}}), t).unwrap();
        assert_eq!(doc.version(), 1);
        let mut doc = Document::default();
        let over = "x".repeat(8192 - 19);
        let err = update(&mut doc, json!({"state": {"desired": {"a": over}}}), t).unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (413, TOO_LARGE));
        assert_eq!(doc, Document::default());
        // desired and reported count together.
        let half = "z".repeat(5000);
        let mut doc = created(json!({"desired": {"a": half.clone()}}), t);
        let err = update(&mut doc, json!({"state": {"reported": {"a": half}}}), t).unwrap_err();
        assert_eq!(err.code, 413);
        // Deleting keys brings an update back under the limit.
        let mut doc = created(json!({"desired": {"a": "x".repeat(8000)}}), t);
        update(
            &mut doc,
            json!({"state": {"desired": {"a": null, "b": "y".repeat(8000)}}}),
            t,
        )
        .unwrap();
        // The configured limit is the one used.
        let small = Limits {
            max_state_bytes: 29,
            ..Limits::default()
        };
        let mut doc = Document::default();
        let payload = bytes(&json!({"state": {"desired": {"a": "0123456789"}}}));
        assert_eq!(doc.update(&payload, t, &small).unwrap_err().code, 413);
        let exact = Limits {
            max_state_bytes: 30,
            ..Limits::default()
        };
        assert!(doc.update(&payload, t, &exact).is_ok());
    }

    #[test]
    fn request_size_limit() {
        let t = now();
        let mut payload = bytes(&json!({"state": {"reported": {"a": 1}}}));
        payload.resize(65536, b' ');
        let mut doc = Document::default();
        assert!(doc.update(&payload, t, &limits()).is_ok());
        payload.push(b' ');
        let err = doc.update(&payload, t, &limits()).unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (413, TOO_LARGE));
        assert_eq!(doc.version(), 1);
    }

    #[test]
    fn depth_limit() {
        let t = now();
        // (name, desired section, accepted)
        let rows: Vec<(&str, Value, bool)> = vec![
            ("6 levels", nested(6), true),
            ("7 levels", nested(7), false),
            (
                "array at level 6",
                json!({"a": {"b": {"c": {"d": {"e": {"f": [[1], 2]}}}}}}),
                true,
            ),
            (
                "object in array at level 7",
                json!({"a": {"b": {"c": {"d": {"e": {"f": [{"g": 1}]}}}}}}),
                false,
            ),
            (
                "object in array at level 6",
                json!({"a": {"b": {"c": {"d": {"e": [{"f": 1}]}}}}}),
                true,
            ),
            (
                "empty object at level 7",
                json!({"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}),
                true,
            ),
            (
                "null at level 7",
                json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": null}}}}}}}),
                false,
            ),
        ];
        for (name, desired, ok) in rows {
            let mut doc = Document::default();
            let got = update(&mut doc, json!({"state": {"desired": desired}}), t);
            assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
        }
        let shallow = Limits {
            max_depth: 2,
            ..Limits::default()
        };
        let mut doc = Document::default();
        let err = doc
            .update(
                &bytes(&json!({"state": {"reported": nested(3)}})),
                t,
                &shallow,
            )
            .unwrap_err();
        assert_eq!(
            err.message,
            "JSON contains too many levels of nesting; maximum is 2"
        );
        assert!(doc
            .update(
                &bytes(&json!({"state": {"reported": nested(2)}})),
                t,
                &shallow
            )
            .is_ok());
    }

    #[test]
    fn client_token_limit() {
        let t = now();
        // (token, accepted) — the limit is in bytes.
        let rows = vec![
            ("a".repeat(64), true),
            ("a".repeat(65), false),
            ("é".repeat(32), true),
            ("é".repeat(33), false),
            (String::new(), true),
        ];
        for (token, ok) in rows {
            let mut doc = Document::default();
            let got = update(&mut doc, json!({"state": {}, "clientToken": token}), t);
            assert_eq!(got.is_ok(), ok, "{token}");
            if let Err(e) = got {
                assert_eq!(e.message, INVALID_CLIENT_TOKEN);
            }
            let got = doc.get(&bytes(&json!({"clientToken": token})), t, "n", &limits());
            assert_eq!(got.is_ok(), ok, "get {token}");
        }
    }

    #[test]
    fn report_is_an_update_of_reported() {
        let t = now();
        let initial = json!({"desired": {"fw": "2", "mode": "a"}, "reported": {"fw": "1"}});
        let fields = json!({"fw": "2", "temp": {"c": 21.5}, "gone": null});
        let mut by_report = created(initial.clone(), t);
        let mut by_update = by_report.clone();
        let reported = by_report
            .report(as_obj(fields.clone()), t + 1, &limits())
            .unwrap();
        let updated = update(
            &mut by_update,
            json!({"state": {"reported": fields}}),
            t + 1,
        )
        .unwrap();
        assert_eq!(reported, updated);
        assert_eq!(by_report, by_update);
        assert_eq!(by_report.version(), 2);
        assert_eq!(
            by_report.reported(),
            Some(&as_obj(json!({"fw": "2", "temp": {"c": 21.5}})))
        );
        assert!(reported.accepted.get("clientToken").is_none());
        assert_eq!(reported.delta, None, "no desired in a report");
        assert_eq!(reported.documents["previous"]["version"], json!(1));
        // A report creates a missing shadow.
        let mut fresh = Document::default();
        let out = fresh
            .report(as_obj(json!({"up": true})), t, &limits())
            .unwrap();
        assert!(fresh.exists());
        assert!(out.documents.get("previous").is_none());
        // Reports are validated too, and a refused one changes nothing.
        let before = by_report.clone();
        let err = by_report
            .report(as_obj(json!({"l": [null]})), t, &limits())
            .unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (400, INVALID_NODE));
        let err = by_report
            .report(as_obj(json!({"d": nested(6)})), t, &limits())
            .unwrap_err();
        assert_eq!(err.code, 400);
        let err = by_report
            .report(as_obj(json!({"big": "x".repeat(9000)})), t, &limits())
            .unwrap_err();
        assert_eq!(err.code, 413);
        assert_eq!(by_report, before);
    }

    #[test]
    fn stored_format() {
        let t = now();
        let mut doc = created(
            json!({"desired": {"a": [1]}, "reported": {"b": {"c": 1}}}),
            t,
        );
        let text = serde_json::to_value(&doc).unwrap();
        assert_eq!(text["format"], json!(1));
        assert_eq!(text["version"], json!(1));
        assert_eq!(text["exists"], json!(true));
        assert_invariants(&doc);
        doc.delete(b"", t, "n", &limits()).unwrap();
        assert_invariants(&doc);
        assert_invariants(&Document::default());

        let good = json!({
            "format": 1, "exists": true, "version": 3,
            "desired": {"a": 1}, "desired_metadata": {"a": ts(t)},
        });
        let loaded: Document = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(loaded.version(), 3);
        assert_eq!(loaded.desired(), Some(&as_obj(json!({"a": 1}))));
        // (name, edit of the good document) — each must be refused.
        let bad: Vec<(&str, Value)> = vec![
            ("format 2", json!({"format": 2})),
            ("no format", json!({"format": null})),
            ("deleted with state", json!({"exists": false})),
            ("metadata missing", json!({"desired_metadata": {}})),
            (
                "metadata extra",
                json!({"desired_metadata": {"a": ts(t), "b": ts(t)}}),
            ),
            (
                "metadata wrong shape",
                json!({"desired_metadata": {"a": [ts(t)]}}),
            ),
            (
                "null stored",
                json!({"desired": {"a": null}, "desired_metadata": {"a": ts(t)}}),
            ),
            (
                "empty section",
                json!({"desired": {}, "desired_metadata": {}}),
            ),
            ("unknown field", json!({"extra": 1})),
        ];
        for (name, edit) in bad {
            let mut value = good.clone();
            for (k, v) in as_obj(edit) {
                if v.is_null() {
                    as_obj_mut(&mut value).remove(&k);
                } else {
                    value[k] = v;
                }
            }
            assert!(
                serde_json::from_value::<Document>(value.clone()).is_err(),
                "{name}: {value}"
            );
        }
    }

    fn as_obj_mut(value: &mut Value) -> &mut Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(9, 96, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(
                    "(state|desired|reported|delta|version|clientToken|[a-c])",
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn seeded() -> Document {
        created(
            json!({"desired": {"a": 1, "b": {"c": [1, 2]}}, "reported": {"a": 2, "b": {"c": 3}}}),
            1_000,
        )
    }

    /// Runs every operation on `payload` and checks that refusals change nothing.
    fn exercise(payload: &[u8]) {
        let l = limits();
        for mut doc in [Document::default(), seeded()] {
            let before = doc.clone();
            match doc.update(payload, 2_000, &l) {
                Ok(out) => {
                    assert_eq!(doc.version(), before.version() + 1);
                    assert!(doc.exists());
                    assert_eq!(out.accepted["version"], json!(doc.version()));
                    assert_invariants(&doc);
                }
                Err(_) => assert_eq!(doc, before),
            }
            let _ = doc.get(payload, 2_000, "p", &l);
            let before = doc.clone();
            match doc.delete(payload, 2_000, "p", &l) {
                Ok(_) => {
                    assert!(!doc.exists());
                    assert_eq!(doc.version(), before.version());
                    assert_invariants(&doc);
                }
                Err(_) => assert_eq!(doc, before),
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(payload in prop::collection::vec(any::<u8>(), 0..256)) {
            exercise(&payload);
        }

        #[test]
        fn arbitrary_json_never_panics(value in arb_json()) {
            exercise(&bytes(&value));
            exercise(&bytes(&json!({ "state": value.clone() })));
            exercise(&bytes(&json!({ "state": { "desired": value.clone(), "reported": value } })));
        }

        #[test]
        fn arbitrary_report_never_panics(value in arb_json()) {
            let mut doc = seeded();
            let before = doc.clone();
            let fields = match value {
                Value::Object(map) => map,
                other => as_obj(json!({ "v": other })),
            };
            match doc.report(fields, 2_000, &limits()) {
                Ok(_) => assert_invariants(&doc),
                Err(_) => prop_assert_eq!(doc, before),
            }
        }
    }
}
