//! Upstream topics: one template per stream (`upstream.topics`), expanded per record.
//!
//! Templates may use `${thing}` (the gateway's thing name, `gateway.id`) and, for the
//! per-device streams (shadow, defender), `${device}` (the record's device; the thing name for
//! records about the gateway itself). The batched streams (telemetry, alerts) carry many
//! devices in one message, so `${device}` means nothing there and is refused.
//!
//! What must stay true: a topic handed to the upstream is one IoT Core accepts — at most 256
//! bytes, at most 7 slashes (the 3 of a `$aws/rules/<rule>/` Basic Ingest prefix not counted),
//! no wildcard, no NUL, and for a named shadow (`.../shadow/name/<name>/...`) a name of 1–64 of
//! `[$a-zA-Z0-9:_-]`. IoT Core closes the connection on a publish it refuses, and a record
//! whose topic it refuses would be sent again forever; so [`check`] runs on every expanded
//! topic, and the uplink sets aside a record that fails it instead of sending it.

use crate::config::TopicsConfig;
use crate::queue::Stream;

/// Longest topic IoT Core accepts, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;
/// Most slashes in a topic IoT Core accepts.
pub const MAX_SLASHES: usize = 7;
/// Longest named-shadow name.
pub const MAX_SHADOW_NAME: usize = 64;

/// The template of `stream`.
pub fn template(topics: &TopicsConfig, stream: Stream) -> &str {
    match stream {
        Stream::Telemetry => &topics.telemetry,
        Stream::Alert => &topics.alerts,
        Stream::Shadow => &topics.shadow,
        Stream::Defender => &topics.defender,
    }
}

/// Variables `stream`'s template may use.
fn allowed(stream: Stream) -> &'static [&'static str] {
    if stream.is_batched() {
        &["thing"]
    } else {
        &["thing", "device"]
    }
}

/// Check a template's shape (variables, wildcards); `Err` says what is wrong and how to fix it.
pub fn check_template(stream: Stream, t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("is empty; give a topic such as \"wardgate/${thing}/readings\"".into());
    }
    if t.contains(['+', '#', '\0']) {
        return Err(format!(
            "`{t}` contains `+`, `#` or NUL: a publish topic cannot have wildcards"
        ));
    }
    let ok = allowed(stream);
    let mut rest = t;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("`{t}` has a `${{` without its `}}`"));
        };
        let name = &after[..end];
        if !ok.contains(&name) {
            let known = ok
                .iter()
                .map(|v| format!("`${{{v}}}`"))
                .collect::<Vec<_>>()
                .join(" and ");
            return Err(format!(
                "`{t}` uses `${{{name}}}`; the {} topic knows only {known}",
                stream.name()
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// Expand a template. `device` empty means the gateway itself (`${device}` = the thing name).
pub fn expand(t: &str, thing: &str, device: &str) -> String {
    let device = if device.is_empty() { thing } else { device };
    t.replace("${thing}", thing).replace("${device}", device)
}

/// Check an expanded topic against IoT Core's rules; `Err` says which one it breaks.
pub fn check(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        return Err(format!(
            "topic `{topic}` is {} bytes; IoT Core takes 1 to {MAX_TOPIC_BYTES}",
            topic.len()
        ));
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(format!("topic `{topic}` contains a wildcard or NUL"));
    }
    let mut slashes = topic.matches('/').count();
    if topic.starts_with("$aws/rules/") {
        slashes = slashes.saturating_sub(3);
    }
    if slashes > MAX_SLASHES {
        return Err(format!(
            "topic `{topic}` has {slashes} slashes; IoT Core takes at most {MAX_SLASHES}"
        ));
    }
    if let Some(i) = topic.find("/shadow/name/") {
        let name = topic[i + "/shadow/name/".len()..]
            .split('/')
            .next()
            .unwrap_or("");
        let valid = (1..=MAX_SHADOW_NAME).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'$' | b':' | b'_' | b'-'));
        if !valid {
            return Err(format!(
                "shadow name `{name}` in `{topic}` is not 1 to {MAX_SHADOW_NAME} of letters, digits, `$`, `:`, `_` or `-`"
            ));
        }
    }
    Ok(())
}

/// The topic of a record of `stream` about `device`, checked.
pub fn topic_for(
    topics: &TopicsConfig,
    stream: Stream,
    thing: &str,
    device: &str,
) -> Result<String, String> {
    let t = expand(template(topics, stream), thing, device);
    check(&t)?;
    Ok(t)
}

/// The cloud shadow topics behind the shadow stream's template, when it is an IoT Core shadow
/// update topic naming the device (`$aws/things/${thing}/shadow/name/${device}/update`, the
/// default, or `$aws/things/${device}/shadow/update`): what the gateway subscribes to and
/// publishes to keep each device's shadow in step with the cloud
/// ([`crate::shadow::sync`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudShadowTopics {
    /// The levels before `/update`, `None` where the device's name goes.
    levels: Vec<Option<String>>,
}

/// Which cloud shadow message a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudShadowMessage {
    /// `/update/documents`: the shadow changed.
    Documents,
    /// `/get/accepted`: the answer to the gateway's fetch.
    GetAccepted,
    /// `/get/rejected`: the fetch failed (404: the cloud has no such shadow).
    GetRejected,
}

impl CloudShadowTopics {
    /// The topics of `template` with `${thing}` = `thing`; `None` when the template is not a
    /// shadow update topic with `${device}` as one whole level.
    pub fn of(template: &str, thing: &str) -> Option<Self> {
        let t = template.strip_suffix("/update")?;
        if !t.starts_with("$aws/things/") || !t.contains("/shadow") {
            return None;
        }
        let levels: Vec<Option<String>> = t
            .split('/')
            .map(|l| match l {
                "${device}" => None,
                l => Some(l.replace("${thing}", thing)),
            })
            .collect();
        let devices = levels.iter().filter(|l| l.is_none()).count();
        let clean = levels
            .iter()
            .flatten()
            .all(|l| !l.contains("${") && !l.is_empty());
        (devices == 1 && clean).then_some(Self { levels })
    }

    fn with(&self, device: &str) -> String {
        self.levels
            .iter()
            .map(|l| l.as_deref().unwrap_or(device))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The filters to subscribe to (every device: `+` in its place).
    pub fn filters(&self) -> [String; 3] {
        let p = self.with("+");
        [
            format!("{p}/update/documents"),
            format!("{p}/get/accepted"),
            format!("{p}/get/rejected"),
        ]
    }

    /// Where to ask for `device`'s cloud shadow.
    pub fn get(&self, device: &str) -> String {
        format!("{}/get", self.with(device))
    }

    /// The device and the kind of message of a topic received, if it is one of these.
    pub fn parse(&self, topic: &str) -> Option<(String, CloudShadowMessage)> {
        let mut parts = topic.split('/');
        let mut device = None;
        for l in &self.levels {
            let got = parts.next()?;
            match l {
                Some(fixed) if fixed != got => return None,
                Some(_) => {}
                None => device = Some(got.to_string()),
            }
        }
        let kind = match (parts.next()?, parts.next()?, parts.next()) {
            ("update", "documents", None) => CloudShadowMessage::Documents,
            ("get", "accepted", None) => CloudShadowMessage::GetAccepted,
            ("get", "rejected", None) => CloudShadowMessage::GetRejected,
            _ => return None,
        };
        device.filter(|d| !d.is_empty()).map(|d| (d, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_expand_to_the_aws_topics() {
        let t = TopicsConfig::default();
        let get = |s, d| topic_for(&t, s, "ward-7", d).unwrap();
        assert_eq!(get(Stream::Telemetry, "pm-01"), "wardgate/ward-7/readings");
        assert_eq!(get(Stream::Alert, ""), "wardgate/ward-7/alerts");
        assert_eq!(
            get(Stream::Shadow, "pm-01"),
            "$aws/things/ward-7/shadow/name/pm-01/update"
        );
        assert_eq!(
            get(Stream::Defender, ""),
            "$aws/things/ward-7/defender/metrics/json"
        );
        for s in Stream::ALL {
            check_template(s, template(&t, s)).unwrap();
        }
    }

    #[test]
    fn templates_are_checked_per_stream() {
        assert!(check_template(Stream::Telemetry, "a/${device}")
            .unwrap_err()
            .contains("knows only `${thing}`"));
        assert!(check_template(Stream::Shadow, "$aws/things/${device}/shadow/update").is_ok());
        assert!(check_template(Stream::Alert, "a/${gateway}").is_err());
        assert!(check_template(Stream::Alert, "a/+/b").is_err());
        assert!(check_template(Stream::Alert, "a/${thing").is_err());
        assert!(check_template(Stream::Alert, "").is_err());
    }

    #[test]
    fn expanded_topics_follow_iot_core_rules() {
        assert!(check(&"a".repeat(256)).is_ok());
        assert!(check(&"a".repeat(257)).is_err());
        assert!(check("1/2/3/4/5/6/7/8").is_ok());
        assert!(check("1/2/3/4/5/6/7/8/9").is_err());
        assert!(
            check("$aws/rules/r/1/2/3/4/5/6/7/8").is_ok(),
            "Basic Ingest prefix not counted"
        );
        assert!(check("$aws/things/t/shadow/name/ok-name_1:$x/update").is_ok());
        let long = format!("$aws/things/t/shadow/name/{}/update", "a".repeat(65));
        assert!(check(&long).unwrap_err().contains("shadow name"));
        assert!(check("$aws/things/t/shadow/name//update").is_err());
        assert!(check("").is_err());
    }

    #[test]
    fn cloud_shadow_topics_follow_the_template() {
        let t = CloudShadowTopics::of(&TopicsConfig::default().shadow, "ward-7").unwrap();
        assert_eq!(
            t.filters()[0],
            "$aws/things/ward-7/shadow/name/+/update/documents"
        );
        assert_eq!(t.get("pm-01"), "$aws/things/ward-7/shadow/name/pm-01/get");
        assert_eq!(
            t.parse("$aws/things/ward-7/shadow/name/pm-01/get/accepted"),
            Some(("pm-01".into(), CloudShadowMessage::GetAccepted))
        );
        assert_eq!(
            t.parse("$aws/things/ward-7/shadow/name/pm-01/update/documents"),
            Some(("pm-01".into(), CloudShadowMessage::Documents))
        );
        for other in [
            "$aws/things/ward-8/shadow/name/pm-01/get/accepted",
            "$aws/things/ward-7/shadow/name/pm-01/update/delta",
            "$aws/things/ward-7/shadow/name/pm-01/get/accepted/x",
            "$aws/things/ward-7/shadow/name/pm-01",
        ] {
            assert_eq!(t.parse(other), None, "{other}");
        }
        let own = CloudShadowTopics::of("$aws/things/${device}/shadow/update", "gw").unwrap();
        assert_eq!(own.get("pm-01"), "$aws/things/pm-01/shadow/get");
        assert_eq!(
            own.parse("$aws/things/pm-01/shadow/get/rejected"),
            Some(("pm-01".into(), CloudShadowMessage::GetRejected))
        );
        for not_a_shadow in [
            "wardgate/${thing}/shadow/${device}/update",
            "$aws/things/${thing}/shadow/name/x/update",
            "$aws/things/${device}/shadow/update/x",
            "$aws/things/${device}/shadow/name/${device}/update",
        ] {
            assert_eq!(
                CloudShadowTopics::of(not_a_shadow, "gw"),
                None,
                "{not_a_shadow}"
            );
        }
    }

    #[test]
    fn a_gateway_record_uses_the_thing_for_device() {
        assert_eq!(expand("x/${device}/${thing}", "gw", ""), "x/gw/gw");
        assert_eq!(expand("x/${device}/${thing}", "gw", "d"), "x/d/gw");
    }
}
