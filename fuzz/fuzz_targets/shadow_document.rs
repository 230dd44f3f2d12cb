//! Fuzz target `shadow_document`: device shadow documents (`shadow::document`) under a
//! sequence of requests.
//!
//! Input: records separated by NUL bytes; each record's first byte is the operation and the
//! rest its payload, raw as a device would send it:
//! - `u` `/update`, `g` `/get`, `d` `/delete` with the payload bytes;
//! - `r` a report from readings (`Document::report`) with the payload's JSON object as fields;
//! - `s` replace the document by the payload read as a *stored* document (serde), as the shadow
//!   service does when it loads one from sled;
//! - `l` set the limits from the next four bytes (small limits reach the size and depth
//!   checks), anything else is ignored.
//!
//! What must stay true (the module's "What must stay true", asserted after every request):
//! - nothing panics;
//! - a refused request leaves the document unchanged;
//! - an accepted update or report makes the version grow by exactly one, the shadow exist,
//!   and the state fit `max_state_bytes`; `/get` changes nothing; `/delete` keeps the version
//!   and leaves no state;
//! - the stored state holds no `null`, no empty object, no `null` inside an array;
//! - the delta (`/get/accepted`'s `state.delta`, `/update/delta`) holds exactly the desired
//!   values that differ from reported (objects compared member by member);
//! - the document survives its stored form (serialize, deserialize: equal), so what is
//!   written to disk is always readable again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use wardgate::shadow::document::{Document, Limits, Rejection};

/// Codes a rejection may carry.
const CODES: [u16; 6] = [400, 404, 409, 413, 415, 500];

fn limits_from(bytes: &[u8]) -> Limits {
    let b = |i: usize| usize::from(bytes.get(i).copied().unwrap_or(0));
    Limits {
        max_state_bytes: 16 + b(0) * 32,
        max_depth: b(1) % 8,
        max_request_bytes: 16 + b(2) * 64,
        max_client_token_bytes: b(3) % 80,
    }
}

fn assert_rejection(r: &Rejection) {
    assert!(CODES.contains(&r.code), "unexpected code {}", r.code);
    assert!(!r.message.is_empty());
    assert!(r.to_json(0).is_object());
}

/// No null, no empty object, no null inside an array.
fn assert_clean(map: &Map<String, Value>, what: &str) {
    assert!(!map.is_empty(), "{what}: empty section stored");
    for (k, v) in map {
        match v {
            Value::Null => panic!("{what}.{k}: null stored"),
            Value::Object(inner) => assert_clean(inner, what),
            Value::Array(items) => assert!(
                !items.iter().any(has_null),
                "{what}.{k}: null inside an array stored"
            ),
            _ => {}
        }
    }
}

fn has_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().any(has_null),
        Value::Array(items) => items.iter().any(has_null),
        _ => false,
    }
}

/// `delta` is exactly what of `desired` differs from `reported`: every member of it is a
/// desired value that reported does not have (objects recursed into), and no such value is
/// missing from it.
fn assert_delta(
    delta: &Map<String, Value>,
    desired: &Map<String, Value>,
    reported: Option<&Map<String, Value>>,
    path: &str,
) {
    for key in delta.keys() {
        assert!(
            desired.contains_key(key),
            "delta has {path}.{key}, desired does not"
        );
    }
    for (key, wanted) in desired {
        let actual = reported.and_then(|r| r.get(key));
        let at = format!("{path}.{key}");
        match (wanted, actual) {
            (Value::Object(w), Some(Value::Object(a))) => match delta.get(key) {
                Some(Value::Object(d)) => {
                    assert!(!d.is_empty(), "empty object in the delta at {at}");
                    assert_delta(d, w, Some(a), &at);
                }
                Some(other) => panic!("delta at {at} is {other}, not an object"),
                None => {
                    // No difference below: desired's members are all equal in reported.
                    assert_delta(&Map::new(), w, Some(a), &at);
                }
            },
            (_, Some(a)) if a == wanted => {
                assert!(
                    !delta.contains_key(key),
                    "delta has {at}, equal in reported"
                );
            }
            _ => assert_eq!(
                delta.get(key),
                Some(wanted),
                "delta misses {at} (desired differs from reported)"
            ),
        }
    }
}

/// Serialized size of the state as the module defines it.
fn state_size(doc: &Document) -> usize {
    let mut state = Map::new();
    if let Some(d) = doc.desired() {
        state.insert("desired".into(), Value::Object(d.clone()));
    }
    if let Some(r) = doc.reported() {
        state.insert("reported".into(), Value::Object(r.clone()));
    }
    serde_json::to_vec(&Value::Object(state)).map_or(0, |v| v.len())
}

/// Everything the module promises of a document at rest.
fn assert_invariants(doc: &Document) {
    if let Some(d) = doc.desired() {
        assert_clean(d, "desired");
    }
    if let Some(r) = doc.reported() {
        assert_clean(r, "reported");
    }
    if !doc.exists() {
        assert!(doc.desired().is_none() && doc.reported().is_none());
    }
    let stored = serde_json::to_vec(doc).expect("a document serializes");
    let back: Document = serde_json::from_slice(&stored).unwrap_or_else(|e| {
        panic!(
            "stored form refused ({e}): {}",
            String::from_utf8_lossy(&stored)
        )
    });
    assert_eq!(&back, doc, "the stored form does not read back equal");
    let get = doc.get(b"", 0, "thing", &Limits::default());
    match get {
        Ok(reply) => {
            assert!(doc.exists());
            assert_eq!(reply["version"], Value::from(doc.version()));
            let delta = reply["state"].get("delta");
            match (doc.desired(), delta) {
                (Some(desired), Some(Value::Object(delta))) => {
                    assert!(!delta.is_empty(), "empty delta published");
                    assert_delta(delta, desired, doc.reported(), "desired");
                }
                (Some(desired), None) => {
                    assert_delta(&Map::new(), desired, doc.reported(), "desired")
                }
                (None, None) => {}
                (_, Some(other)) => panic!("delta {other} without desired state"),
            }
        }
        Err(r) => {
            assert!(!doc.exists(), "/get of an existing shadow refused: {r:?}");
            assert_eq!(r.code, 404);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut doc = Document::default();
    let mut limits = Limits::default();
    for (now, record) in data.split(|b| *b == 0).enumerate().take(64) {
        let now = i64::try_from(now).unwrap_or(0);
        let Some((&op, payload)) = record.split_first() else {
            continue;
        };
        let before = doc.clone();
        match op {
            b'u' | b'r' => {
                let result = if op == b'u' {
                    doc.update(payload, now, &limits)
                } else {
                    match serde_json::from_slice::<Value>(payload) {
                        Ok(Value::Object(fields)) => doc.report(fields, now, &limits),
                        _ => continue,
                    }
                };
                match result {
                    Ok(updated) => {
                        let version = before.version() + 1;
                        assert_eq!(doc.version(), version, "an accepted update adds one");
                        assert!(doc.exists());
                        assert!(
                            state_size(&doc) <= limits.max_state_bytes,
                            "state of {} bytes accepted; the limit is {}",
                            state_size(&doc),
                            limits.max_state_bytes
                        );
                        assert_eq!(updated.accepted["version"], Value::from(version));
                        assert_eq!(
                            updated.documents["current"]["version"],
                            Value::from(version)
                        );
                        if before.exists() {
                            assert_eq!(
                                updated.documents["previous"]["version"],
                                Value::from(before.version())
                            );
                        }
                        if let Some(delta) = &updated.delta {
                            let Some(Value::Object(state)) = delta.get("state") else {
                                panic!("/update/delta without a state object: {delta}");
                            };
                            assert!(!state.is_empty(), "empty /update/delta published");
                            let desired = doc.desired().expect("a delta needs desired state");
                            assert_delta(state, desired, doc.reported(), "desired");
                        }
                    }
                    Err(r) => {
                        assert_rejection(&r);
                        assert_eq!(doc, before, "a refused update changed the document");
                    }
                }
            }
            b'g' => {
                if let Err(r) = doc.get(payload, now, "thing", &limits) {
                    assert_rejection(&r);
                }
                assert_eq!(doc, before, "/get changed the document");
            }
            b'd' => match doc.delete(payload, now, "thing", &limits) {
                Ok(reply) => {
                    assert_eq!(reply["version"], Value::from(before.version()));
                    assert!(before.exists());
                    assert!(!doc.exists());
                    assert_eq!(doc.version(), before.version(), "delete keeps the version");
                }
                Err(r) => {
                    assert_rejection(&r);
                    assert_eq!(doc, before, "a refused delete changed the document");
                }
            },
            b's' => {
                if let Ok(stored) = serde_json::from_slice::<Document>(payload) {
                    doc = stored;
                }
            }
            b'l' => limits = limits_from(payload),
            _ => continue,
        }
        assert_invariants(&doc);
    }
});
