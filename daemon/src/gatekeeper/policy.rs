//! Topic policy (deny by default) and topic limits, as pure functions.
//!
//! A device's policy is a list of publish patterns and a list of subscribe patterns, MQTT topic
//! filters in which `${device}` and `${kind}` are replaced by the device's id and kind (ids are
//! restricted to `[a-zA-Z0-9:_-]`, so a substitution can never add a level or a wildcard).
//!
//! - A PUBLISH is allowed when its topic matches one publish pattern.
//! - A SUBSCRIBE filter is allowed when *every* topic it could match is matched by one subscribe
//!   pattern ([`filter_covered`]): `ward/pm-01/#` is inside `ward/${device}/#`, `#` is inside
//!   nothing but `#`.
//! - `$SYS/...` and `_wardgate/...` (where the broker keeps `$aws/...`) are never reachable,
//!   whatever the policy says, and wildcards at the first level
//!   never match topics starting with `$` (MQTT 3.1.1 §4.7.2).

use crate::config::LimitsConfig;

/// Topic prefixes no device may ever publish or subscribe to: the broker's own topics, and
/// the broker's inside name of `$aws/...` ([`crate::broker::AWS_INSIDE`]'s first level).
const ALWAYS_DENIED: &[&str] = &["$SYS", "_wardgate"];

/// A topic or filter that breaks a limit or MQTT's syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Longer than `limits.max_topic_bytes`.
    #[error("topic is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More levels than `limits.max_topic_levels`.
    #[error("topic has {levels} levels; the limit is {max}")]
    TooManyLevels {
        /// Its level count.
        levels: usize,
        /// The limit.
        max: usize,
    },
    /// Empty topic or filter.
    #[error("empty topic")]
    Empty,
    /// `+` or `#` in a PUBLISH topic.
    #[error("wildcard in a publish topic")]
    WildcardInTopic,
    /// `#` not alone in the last level, or `+` not alone in its level.
    #[error("malformed wildcard in filter")]
    BadWildcard,
    /// A NUL character.
    #[error("NUL character in topic")]
    Nul,
}

impl TopicError {
    /// The rule name used in logs (`RULE=` in the journal).
    pub fn rule(&self) -> &'static str {
        match self {
            TopicError::TooLong { .. } => "max_topic_bytes",
            TopicError::TooManyLevels { .. } => "max_topic_levels",
            _ => "topic_syntax",
        }
    }
}

fn check_common(s: &str, limits: &LimitsConfig) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    if s.len() > limits.max_topic_bytes {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: limits.max_topic_bytes,
        });
    }
    let levels = s.split('/').count();
    if levels > limits.max_topic_levels {
        return Err(TopicError::TooManyLevels {
            levels,
            max: limits.max_topic_levels,
        });
    }
    Ok(())
}

/// Check a PUBLISH topic name against the limits and MQTT syntax.
pub fn check_topic(topic: &str, limits: &LimitsConfig) -> Result<(), TopicError> {
    check_common(topic, limits)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

/// Check a SUBSCRIBE filter against the limits and MQTT syntax.
pub fn check_filter(filter: &str, limits: &LimitsConfig) -> Result<(), TopicError> {
    check_common(filter, limits)?;
    filter_syntax(filter)
}

/// MQTT filter syntax only (no limits): `#` alone and last, `+` alone in its level.
pub fn filter_syntax(filter: &str) -> Result<(), TopicError> {
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        if level.contains('#') && (*level != "#" || !last) {
            return Err(TopicError::BadWildcard);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// Whether `filter` matches `topic` (MQTT 3.1.1 rules, including the `$` rule).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `filter` can match is also matched by `pattern`.
pub fn filter_covered(filter: &str, pattern: &str) -> bool {
    if filter.starts_with('$') != pattern.starts_with('$')
        && (pattern.starts_with('+') || pattern.starts_with('#'))
    {
        // A wildcard pattern never covers `$` topics.
        return false;
    }
    let mut f = filter.split('/');
    let mut p = pattern.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Replace `${device}` and `${kind}`.
pub fn substitute(pattern: &str, device: &str, kind: &str) -> String {
    pattern
        .replace("${device}", device)
        .replace("${kind}", kind)
}

/// Variables a pattern may use.
pub fn unknown_variable(pattern: &str) -> Option<String> {
    let mut rest = pattern;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}')?;
        let name = &after[..end];
        if name != "device" && name != "kind" {
            return Some(name.to_owned());
        }
        rest = &after[end + 1..];
    }
    None
}

fn always_denied(s: &str) -> bool {
    ALWAYS_DENIED
        .iter()
        .any(|p| s == *p || s.starts_with(&format!("{p}/")))
}

/// One device's resolved policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicPolicy {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl TopicPolicy {
    /// Resolve patterns for one device.
    pub fn new(publish: &[String], subscribe: &[String], device: &str, kind: &str) -> Self {
        Self {
            publish: publish
                .iter()
                .map(|p| substitute(p, device, kind))
                .collect(),
            subscribe: subscribe
                .iter()
                .map(|p| substitute(p, device, kind))
                .collect(),
        }
    }

    /// May the device PUBLISH to `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        !always_denied(topic) && self.publish.iter().any(|p| topic_matches(p, topic))
    }

    /// May the device SUBSCRIBE to `filter`?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        !always_denied(filter) && self.subscribe.iter().any(|p| filter_covered(filter, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy(device: &str) -> TopicPolicy {
        let p = crate::config::PolicyConfig::default();
        TopicPolicy::new(&p.publish, &p.subscribe, device, "pacemaker")
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("a/+/c", "a/b/d"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("+/x", "$aws/x"));
        assert!(topic_matches(
            "$aws/things/pm/shadow/#",
            "$aws/things/pm/shadow/update"
        ));
    }

    #[test]
    fn coverage_of_filters() {
        assert!(filter_covered("ward/pm/#", "ward/pm/#"));
        assert!(filter_covered("ward/pm/telemetry", "ward/pm/#"));
        assert!(filter_covered("ward/pm/+", "ward/pm/#"));
        assert!(!filter_covered("ward/#", "ward/pm/#"));
        assert!(!filter_covered("ward/+/telemetry", "ward/pm/telemetry"));
        assert!(filter_covered("ward/+/telemetry", "ward/+/telemetry"));
        assert!(!filter_covered("#", "ward/#"));
        assert!(!filter_covered("ward/pm/#", "ward/pm/+"));
    }

    #[test]
    fn default_policy_is_the_devices_own_namespace() {
        let p = default_policy("pm-01");
        assert!(p.may_publish("ward/pm-01/telemetry"));
        assert!(p.may_publish("$aws/things/pm-01/shadow/update"));
        assert!(p.may_publish("$aws/things/pm-01/shadow/name/settings/update"));
        assert!(!p.may_publish("ward/pm-02/telemetry"));
        assert!(
            !p.may_publish("ward/pm-01/readings"),
            "readings are the gateway's to publish"
        );
        assert!(!p.may_publish("$aws/things/pm-02/shadow/update"));
        assert!(!p.may_publish("$SYS/broker/load"));
        assert!(p.may_subscribe("ward/pm-01/#"));
        assert!(p.may_subscribe("$aws/things/pm-01/shadow/update/delta"));
        assert!(!p.may_subscribe("#"));
        assert!(!p.may_subscribe("ward/#"));
        assert!(!p.may_subscribe("ward/+/telemetry"));
        assert!(!p.may_subscribe("$SYS/#"));
    }

    #[test]
    fn even_an_allow_all_policy_never_reaches_sys() {
        let p = TopicPolicy::new(&["#".into()], &["#".into()], "x", "k");
        assert!(p.may_publish("anything/at/all"));
        assert!(p.may_subscribe("#"));
        assert!(!p.may_publish("$SYS/x"));
        assert!(!p.may_subscribe("$SYS/#"));
        // Where the broker keeps `$aws/...`: never a device's to name.
        assert!(!p.may_subscribe("_wardgate/#"));
        assert!(!p.may_publish("_wardgate/aws/things/x/shadow/update"));
    }

    #[test]
    fn limits_and_syntax() {
        let l = LimitsConfig::default();
        assert!(check_topic("a/b", &l).is_ok());
        assert_eq!(check_topic("", &l), Err(TopicError::Empty));
        assert_eq!(check_topic("a/+", &l), Err(TopicError::WildcardInTopic));
        assert!(matches!(
            check_topic(&"x".repeat(257), &l),
            Err(TopicError::TooLong { len: 257, max: 256 })
        ));
        assert!(check_topic("1/2/3/4/5/6/7/8", &l).is_ok());
        assert!(matches!(
            check_topic("1/2/3/4/5/6/7/8/9", &l),
            Err(TopicError::TooManyLevels { levels: 9, max: 8 })
        ));
        assert!(check_filter("a/#", &l).is_ok());
        assert_eq!(check_filter("a/#/b", &l), Err(TopicError::BadWildcard));
        assert_eq!(check_filter("a/b+", &l), Err(TopicError::BadWildcard));
    }

    #[test]
    fn variables() {
        assert_eq!(
            substitute("ward/${device}/${kind}", "pm-1", "pacemaker"),
            "ward/pm-1/pacemaker"
        );
        assert_eq!(unknown_variable("ward/${device}"), None);
        assert_eq!(
            unknown_variable("ward/${iot:ClientId}"),
            Some("iot:ClientId".into())
        );
    }
}
