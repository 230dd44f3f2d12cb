//! Semantic checks on a configuration that parsed: ranges, formats, cross-references.
//! Every check runs; every failure is reported with its key and source.

use super::load::{ConfigError, Source};
use super::{AuthMode, Config};
use crate::gatekeeper::policy::{filter_syntax, unknown_variable};
use std::collections::HashMap;
use std::net::SocketAddr;

/// AWS IoT Core's largest MQTT payload.
pub const IOT_CORE_MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// Thing names and device ids: 1–128 of `[a-zA-Z0-9:_-]` (AWS IoT thing-name rules, which also
/// keep ids safe inside MQTT topics and journal fields).
pub fn valid_thing_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// Kind and plugin names: 1–64 of `[a-z0-9_-]`, starting with a letter.
pub fn valid_kind_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// `positions[i]` is the index that `c.devices[i]` had in the combined `[[devices]]` list
/// (entries that failed to parse are left out of `c.devices` but keep their numbers in messages).
fn check_patterns(key: &str, patterns: &[String], err: &mut impl FnMut(&str, String)) {
    for (i, p) in patterns.iter().enumerate() {
        let at = format!("{key}[{i}]");
        if let Some(v) = unknown_variable(p) {
            err(
                &at,
                format!("`{p}` uses `${{{v}}}`; only `${{device}}` and `${{kind}}` are known"),
            );
        } else if p.is_empty() || filter_syntax(p).is_err() {
            err(
                &at,
                format!("`{p}` is not a valid MQTT topic filter (`#` only last and alone, `+` alone in its level)"),
            );
        }
    }
}

pub(super) fn validate(
    c: &Config,
    positions: &[usize],
    source_of: &dyn Fn(&str) -> Option<Source>,
    errors: &mut Vec<ConfigError>,
) {
    let mut err = |key: &str, message: String| {
        errors.push(ConfigError::new(
            source_of(key),
            Some(key.to_owned()),
            message,
        ));
    };

    if !valid_thing_name(&c.gateway.id) {
        err(
            "gateway.id",
            format!(
                "`{}` is not a valid thing name: use 1–128 letters, digits, `:`, `_` or `-`",
                c.gateway.id
            ),
        );
    }
    if !c.gateway.state_dir.is_absolute() {
        err(
            "gateway.state_dir",
            format!(
                "`{}` must be an absolute path",
                c.gateway.state_dir.display()
            ),
        );
    }
    if c.gateway.shutdown_timeout.is_zero() {
        err(
            "gateway.shutdown_timeout",
            "must be longer than 0s, e.g. \"10s\"".into(),
        );
    }
    if c.listeners.connect_timeout.is_zero() {
        err(
            "listeners.connect_timeout",
            "must be longer than 0s, e.g. \"10s\"".into(),
        );
    }
    if c.listeners.max_connections == 0 {
        err("listeners.max_connections", "must be at least 1".into());
    }
    if !c.broker.address.ip().is_loopback() {
        err(
            "broker.address",
            format!(
                "`{}` is not a loopback address: the internal broker must only listen on \
                 127.0.0.1 or ::1 (devices connect through the gatekeeper)",
                c.broker.address
            ),
        );
    }
    if c.listeners.plain.enabled
        && c.broker.address.port() != 0
        && c.listeners.plain.address.port() == c.broker.address.port()
    {
        err(
            "listeners.plain.address",
            format!(
                "port {} is also the internal broker's port (broker.address)",
                c.broker.address.port()
            ),
        );
    }
    let l = &c.limits;
    if l.max_payload_bytes == 0 || l.max_payload_bytes > IOT_CORE_MAX_PAYLOAD_BYTES {
        err(
            "limits.max_payload_bytes",
            format!(
                "{} is out of range: use 1 to {IOT_CORE_MAX_PAYLOAD_BYTES} (AWS IoT Core's limit)",
                l.max_payload_bytes
            ),
        );
    }
    if !(1..=65_535).contains(&l.max_topic_bytes) {
        err(
            "limits.max_topic_bytes",
            "must be between 1 and 65535".into(),
        );
    }
    if l.max_topic_levels == 0 {
        err("limits.max_topic_levels", "must be at least 1".into());
    }
    if !(1..=u16::MAX as usize).contains(&l.max_inflight) {
        err("limits.max_inflight", "must be between 1 and 65535".into());
    }
    if c.broker.max_segment_bytes < l.max_payload_bytes {
        err(
            "broker.max_segment_bytes",
            format!(
                "{} is smaller than limits.max_payload_bytes ({}): one segment must hold the largest message",
                c.broker.max_segment_bytes, l.max_payload_bytes
            ),
        );
    }
    if c.listeners.max_connections_per_address == 0 {
        err(
            "listeners.max_connections_per_address",
            "must be at least 1".into(),
        );
    }
    let login = &c.login;
    for (key, value) in [
        ("login.max_pending", login.max_pending),
        (
            "login.max_pending_per_address",
            login.max_pending_per_address,
        ),
        ("login.max_per_second", login.max_per_second as usize),
        (
            "login.max_per_second_per_address",
            login.max_per_second_per_address as usize,
        ),
    ] {
        if value == 0 {
            err(
                key,
                "must be at least 1 (0 would refuse every password login)".into(),
            );
        }
    }
    if login.max_pending_per_address > login.max_pending {
        err(
            "login.max_pending_per_address",
            format!(
                "{} is more than login.max_pending ({}); one address cannot have more checks in progress than the whole gateway",
                login.max_pending_per_address, login.max_pending
            ),
        );
    }
    if login.argon2_threads > 64 {
        err(
            "login.argon2_threads",
            format!(
                "{} threads, each holding an argon2 memory area (19 MiB by default): use 0 (one per core) or at most 64",
                login.argon2_threads
            ),
        );
    }
    if c.http.enabled {
        let overlaps = |other: SocketAddr| {
            other.port() == c.http.address.port()
                && (other.ip() == c.http.address.ip()
                    || other.ip().is_unspecified()
                    || c.http.address.ip().is_unspecified())
        };
        for (on, key, addr) in [
            (
                c.listeners.plain.enabled,
                "listeners.plain.address",
                c.listeners.plain.address,
            ),
            (
                c.listeners.tls.enabled,
                "listeners.tls.address",
                c.listeners.tls.address,
            ),
            (true, "broker.address", c.broker.address),
        ] {
            if on && addr.port() != 0 && overlaps(addr) {
                err(
                    "http.address",
                    format!(
                        "`{}` is also {key} (`{addr}`): give the HTTP endpoint a port of its own, \
                         e.g. 127.0.0.1:{}",
                        c.http.address,
                        crate::config::DEFAULT_HTTP_PORT
                    ),
                );
            }
        }
    }
    // The console on the HTTP endpoint: a credential that is an argon2 hash, and never served
    // beyond loopback without TLS and that credential (see `crate::http`).
    if c.http.enabled {
        let h = &c.http;
        if let Some(hash) = &h.console_password_hash {
            if let Err(e) = crate::registry::check_password_hash(hash) {
                err("http.console_password_hash", e);
            }
        }
        if h.console_user.is_empty()
            || h.console_user.contains(':')
            || h.console_user.chars().any(char::is_control)
        {
            err(
                "http.console_user",
                format!(
                    "`{}` cannot be an HTTP Basic user name: give 1 or more characters, no `:` and no control characters",
                    h.console_user.escape_debug()
                ),
            );
        }
        if !(std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600))
            .contains(&h.console_refresh)
        {
            err(
                "http.console_refresh",
                format!(
                    "{} is outside 1s to 1h; e.g. \"15s\"",
                    humantime::format_duration(h.console_refresh)
                ),
            );
        }
        let loopback = h.address.ip().is_loopback();
        if h.console == Some(true) && !loopback && !(h.tls && h.console_password_hash.is_some()) {
            let mut missing = Vec::new();
            if !h.tls {
                missing.push("http.tls = true");
            }
            if h.console_password_hash.is_none() {
                missing.push("http.console_password_hash (make one with `wardgate hash-password`)");
            }
            err(
                "http.console",
                format!(
                    "the console would be served on `{}`, which is not a loopback address, without {}: \
                     set them (the console then asks for http.console_user and that password over \
                     HTTPS, with listeners.tls.cert_file or http.tls_cert_file), or put http.address \
                     on 127.0.0.1, or set http.console = false to serve only /healthz and /metrics there",
                    h.address,
                    missing.join(" and ")
                ),
            );
        }
    }
    if c.metering.window.as_secs() == 0 {
        err("metering.window", "must be at least 1s, e.g. \"5m\"".into());
    }
    if c.metering.status_interval.is_zero() {
        err(
            "metering.status_interval",
            "must be longer than 0s, e.g. \"5s\"".into(),
        );
    }
    let p = &c.plugins;
    if p.poll_interval.is_zero() {
        err(
            "plugins.poll_interval",
            "must be longer than 0s, e.g. \"2s\"".into(),
        );
    }
    if p.call_deadline.is_zero() || p.call_deadline > std::time::Duration::from_secs(10) {
        err(
            "plugins.call_deadline",
            "must be between 1ms and 10s, e.g. \"5ms\"".into(),
        );
    }
    if p.max_memory_bytes < 1024 * 1024 {
        err(
            "plugins.max_memory_bytes",
            "must be at least 1048576 (1 MiB)".into(),
        );
    }
    if p.max_consecutive_traps == 0 {
        err("plugins.max_consecutive_traps", "must be at least 1".into());
    }
    let tls = &c.listeners.tls;
    if tls.enabled {
        let files = [
            ("listeners.tls.cert_file", Some(&tls.cert_file)),
            ("listeners.tls.key_file", Some(&tls.key_file)),
            ("listeners.tls.ca_file", Some(&tls.ca_file)),
            ("listeners.tls.crl_file", tls.crl_file.as_ref()),
        ];
        for (key, path) in files {
            if let Some(path) = path {
                if !path.is_file() {
                    err(
                        key,
                        format!(
                            "{} does not exist or is not a file (see README, \"Certificates for a ward\")",
                            path.display()
                        ),
                    );
                }
            }
        }
        if c.listeners.plain.enabled
            && tls.address.port() == c.listeners.plain.address.port()
            && tls.address.port() != 0
        {
            err(
                "listeners.tls.address",
                format!(
                    "port {} is also the plain listener's port",
                    tls.address.port()
                ),
            );
        }
    }
    for (key, patterns) in [
        ("policy.publish", &c.policy.publish),
        ("policy.subscribe", &c.policy.subscribe),
    ] {
        check_patterns(key, patterns, &mut err);
    }
    if c.broker.max_segment_count == 0 {
        err("broker.max_segment_count", "must be at least 1".into());
    }
    // The relay link's connections and the pipeline's publisher, and room for one device
    // session: with fewer, devices' publishes could not reach the broker at all.
    let internal = crate::broker::RELAY_CONNECTIONS + 1;
    if c.broker.max_connections <= internal {
        err(
            "broker.max_connections",
            format!(
                "{} leaves no room for a device: the gateway itself uses {internal} broker \
                 connections (the relay link's {} and the pipeline's publisher); set at least {}",
                c.broker.max_connections,
                crate::broker::RELAY_CONNECTIONS,
                internal + 1
            ),
        );
    }
    if c.broker.max_outgoing_packets == 0 {
        err("broker.max_outgoing_packets", "must be at least 1".into());
    }

    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, d) in c.devices.iter().enumerate() {
        let pos = |i: usize| positions.get(i).copied().unwrap_or(i);
        let at = |field: &str| format!("devices[{}].{field}", pos(i));
        if !valid_thing_name(&d.id) {
            err(
                &at("id"),
                format!(
                    "`{}` is not a valid device id: use 1–128 letters, digits, `:`, `_` or `-`",
                    d.id
                ),
            );
        } else if let Some(first) = seen.insert(&d.id, i) {
            err(
                &at("id"),
                format!(
                    "device `{}` is already defined as devices[{}]",
                    d.id,
                    pos(first)
                ),
            );
        }
        if !valid_kind_name(&d.kind) {
            err(
                &at("kind"),
                format!(
                    "`{}` is not a valid kind: use 1–64 lowercase letters, digits, `_` or `-`",
                    d.kind
                ),
            );
        }
        if let Some(p) = &d.plugin {
            if !valid_kind_name(p) {
                err(
                    &at("plugin"),
                    format!(
                        "`{p}` is not a valid plugin name: use 1–64 lowercase letters, digits, `_` or `-`"
                    ),
                );
            }
        }
        let mode = d.auth_mode();
        match &d.password_hash {
            None if mode != AuthMode::Certificate => err(
                &at("password_hash"),
                format!(
                    "device `{}` authenticates with a password but has no `password_hash` \
                     (make one with `wardgate hash-password`)",
                    d.id
                ),
            ),
            None => {}
            Some(h) => {
                if let Err(e) = crate::registry::check_password_hash(h) {
                    err(&at("password_hash"), e);
                }
            }
        }
        if mode != AuthMode::Password && !c.listeners.tls.enabled {
            err(
                &at("auth"),
                format!(
                    "device `{}` needs a client certificate, but the TLS listener is disabled \
                     (listeners.tls.enabled)",
                    d.id
                ),
            );
        }
        if let Some(p) = &d.publish {
            check_patterns(&at("publish"), p, &mut err);
        }
        if let Some(p) = &d.subscribe {
            check_patterns(&at("subscribe"), p, &mut err);
        }
    }

    let u = &c.upstream;
    if u.enabled {
        if u.endpoint.is_empty() {
            err(
                "upstream.endpoint",
                "must name the IoT Core endpoint host, e.g. `xxxx-ats.iot.eu-west-1.amazonaws.com`"
                    .into(),
            );
        }
        for (key, file) in [
            ("upstream.ca_file", &u.ca_file),
            ("upstream.cert_file", &u.cert_file),
            ("upstream.key_file", &u.key_file),
        ] {
            match file {
                None => err(key, "must be set when upstream.enabled = true".into()),
                Some(p) if !p.is_file() => err(
                    key,
                    format!("{} does not exist or is not a file", p.display()),
                ),
                Some(_) => {}
            }
        }
    }
    if u.max_batch_bytes < 1024 || u.max_batch_bytes > IOT_CORE_MAX_PAYLOAD_BYTES {
        err("upstream.max_batch_bytes", format!("must be between 1024 and {IOT_CORE_MAX_PAYLOAD_BYTES} (AWS IoT Core's message limit)"));
    }
    if !(1..=100).contains(&u.max_inflight) {
        err(
            "upstream.max_inflight",
            "must be between 1 and 100 (AWS IoT Core's limit)".into(),
        );
    }
    if !(2..=100).contains(&u.max_publishes_per_second) {
        err(
            "upstream.max_publishes_per_second",
            "must be between 2 and 100 (AWS IoT Core's limit is 100; the pacing keeps a tenth of it as burst)".into(),
        );
    }
    if u.shadow_updates_per_second < 1
        || u.shadow_updates_per_second > u.max_publishes_per_second / 2
    {
        err(
            "upstream.shadow_updates_per_second",
            format!(
                "must be between 1 and half of upstream.max_publishes_per_second ({}): shadow updates and fetches share the publish quota with the readings",
                u.max_publishes_per_second / 2
            ),
        );
    }
    if u.max_bytes_per_second < 2 * u.max_batch_bytes as u64 || u.max_bytes_per_second > 512 * 1024
    {
        err(
            "upstream.max_bytes_per_second",
            "must be at least twice upstream.max_batch_bytes (so that a backlog of full messages drains steadily) and at most 524288 (AWS IoT Core's limit)"
                .into(),
        );
    }
    if let Some(bad) = u
        .alpn
        .iter()
        .flatten()
        .find(|p| p.is_empty() || p.len() > 255)
    {
        err(
            "upstream.alpn",
            format!("`{bad}` is not an ALPN protocol id (1 to 255 bytes), e.g. \"x-amzn-mqtt-ca\""),
        );
    }
    if u.max_backoff < std::time::Duration::from_secs(1) {
        err("upstream.max_backoff", "must be at least 1s".into());
    }
    {
        use crate::queue::Stream;
        use crate::uplink::topics;
        for stream in Stream::ALL {
            let key = format!("upstream.topics.{}", stream.name());
            let t = topics::template(&u.topics, stream);
            if let Err(why) = topics::check_template(stream, t) {
                err(&key, why);
                continue;
            }
            // Every device this gateway knows must get a topic IoT Core accepts.
            let thing = &c.gateway.id;
            let mut subjects: Vec<&str> = vec![""];
            if u.enabled && !stream.is_batched() && t.contains("${device}") {
                subjects.extend(c.devices.iter().map(|d| d.id.as_str()));
            }
            if let Some(why) = subjects
                .iter()
                .find_map(|d| topics::check(&topics::expand(t, thing, d)).err())
            {
                err(
                    &key,
                    format!("{why}; shorten gateway.id or the device id, or change the template"),
                );
            }
        }
    }
    if c.history.enabled && c.history.max_bytes < 1 << 20 {
        err(
            "history.max_bytes",
            format!(
                "{} bytes is too small to keep any history: use at least 1048576 (1 MiB), or history.enabled = false",
                c.history.max_bytes
            ),
        );
    }
    if c.queue.commit_interval.is_zero()
        || c.queue.commit_interval > std::time::Duration::from_secs(1)
    {
        err(
            "queue.commit_interval",
            "must be between 1ms and 1s, e.g. \"5ms\"".into(),
        );
    }
    if c.dead_letter.max_bytes == 0 {
        err(
            "dead_letter.max_bytes",
            "must be at least 1 byte, e.g. 67108864 (64 MiB); the day file in use is always kept"
                .into(),
        );
    }
    if c.dead_letter.max_age < std::time::Duration::from_secs(24 * 3600) {
        err(
            "dead_letter.max_age",
            "must be at least 1day, e.g. \"30days\" (the store keeps whole UTC day files)".into(),
        );
    }
    if c.upstream.port == 0 {
        err(
            "upstream.port",
            "must be 8883 or 443 (or another non-zero port)".into(),
        );
    }
    for problem in crate::rules::check(&c.rules) {
        err(&problem.key, problem.message);
    }
    let d = &c.defender;
    if !matches!(d.report_names.as_str(), "long" | "short") {
        err(
            "defender.report_names",
            format!("`{}`: use \"long\" or \"short\"", d.report_names),
        );
    }
    if d.enabled
        && c.upstream.enabled
        && c.upstream.endpoint.ends_with(".amazonaws.com")
        && d.report_interval < std::time::Duration::from_secs(300)
    {
        err(
            "defender.report_interval",
            "must be at least 5m towards AWS IoT Core, which throttles faster reports".into(),
        );
    }
    if d.report_interval.is_zero() {
        err("defender.report_interval", "must be more than 0".into());
    }
    if d.invalidate_after.is_zero() {
        err(
            "defender.invalidate_after",
            "must be more than 0, e.g. \"2days\" (AWS's)".into(),
        );
    }
    for problem in crate::defender::detect::check(d, c.metering.window, c.metering.windows_kept) {
        err(&problem.key, problem.message);
    }
}
