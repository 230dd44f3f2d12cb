//! Loading: figment layers → [`Config`], collecting every problem at once.
//!
//! serde stops at the first error inside one struct, so extraction is done section by section
//! (`[gateway]`, `[listeners]`, ...) and device by device; a syntax error in one file excludes
//! only that file. Semantic checks ([`super::validate`]) run on whatever extracted cleanly.
//! Every error carries its [`Source`]: the file, the environment variable, or the built-in
//! default it came from.

use super::Config;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the main configuration file is looked for when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/wardgate/wardgate.toml";
/// Prefix of configuration environment variables.
const ENV_PREFIX: &str = "WARDGATE_";
/// Top-level sections and what they hold.
const SECTIONS: &[&str] = &[
    "gateway",
    "listeners",
    "login",
    "limits",
    "policy",
    "metering",
    "plugins",
    "broker",
    "devices",
    "rules",
    "upstream",
    "queue",
    "dead_letter",
    "defender",
    "log",
    "http",
    "history",
];

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Main file given explicitly (`-c FILE`): it must exist. `None` uses
    /// [`DEFAULT_CONFIG_PATH`] if that exists.
    pub file: Option<PathBuf>,
    /// Skip the `WARDGATE_*` environment layer (used by in-process tests).
    pub ignore_env: bool,
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in defaults.
    Default,
    /// A TOML file.
    File(PathBuf),
    /// An environment variable, by its name.
    Env(String),
}

/// One configuration problem: where, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the offending value came from, when known.
    pub source: Option<Source>,
    /// The dotted key (`devices[2].password_hash`), when the problem belongs to one.
    pub key: Option<String>,
    /// What is wrong and, where it helps, how to fix it.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(source: Option<Source>, key: Option<String>, message: String) -> Self {
        Self {
            source,
            key,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(Source::File(p)) => write!(f, "{}: ", p.display())?,
            Some(Source::Env(var)) => write!(f, "environment variable {var}: ")?,
            Some(Source::Default) => write!(f, "built-in default: ")?,
            None => {}
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found while loading; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} configuration problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A loaded, validated configuration and the files it was built from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Files that contributed, in the order they were applied.
    pub files: Vec<PathBuf>,
}

/// Load and validate the configuration described by `opts`.
pub fn load(opts: &LoadOptions) -> Result<Loaded, ConfigErrors> {
    let mut errors = Vec::new();
    let files = collect_files(opts, &mut errors);

    // Arrays are concatenated across layers (so drop-ins can add devices), which would append
    // a user's policy lists to the built-in ones: the defaults layer carries empty policy lists
    // and the built-in lists are filled in after extraction when no file or variable set them.
    let mut defaults = Config::default();
    defaults.policy.publish.clear();
    defaults.policy.subscribe.clear();
    let mut fig = Figment::from(Serialized::defaults(defaults));
    let mut used = Vec::new();
    for file in files {
        // Parse each file on its own first so one broken file is reported precisely and
        // does not hide the problems of the others.
        match std::fs::read_to_string(&file) {
            Err(e) => errors.push(ConfigError::new(
                Some(Source::File(file.clone())),
                None,
                format!("cannot read file: {e}"),
            )),
            Ok(text) => match text.parse::<toml::Table>() {
                Err(e) => errors.push(ConfigError::new(
                    Some(Source::File(file.clone())),
                    None,
                    describe_toml_error(&text, &e),
                )),
                Ok(_) => {
                    fig = fig.admerge(Toml::file_exact(&file));
                    used.push(file);
                }
            },
        }
    }
    if !opts.ignore_env {
        fig = fig.admerge(Env::prefixed(ENV_PREFIX).split("__"));
    }

    // Sections that failed to extract keep their defaults, so validating the rest is safe and
    // reports its problems in the same run.
    let mut devices = Vec::new();
    let mut config = extract(&fig, &mut devices, &mut errors);
    if let Some(c) = &mut config {
        let built_in = super::PolicyConfig::default();
        if matches!(
            source_of_key(&fig, "policy.publish"),
            None | Some(Source::Default)
        ) {
            c.policy.publish = built_in.publish;
        }
        if matches!(
            source_of_key(&fig, "policy.subscribe"),
            None | Some(Source::Default)
        ) {
            c.policy.subscribe = built_in.subscribe;
        }
    }
    if let Some(config) = &config {
        let positions: Vec<usize> = devices.iter().map(|(pos, _)| *pos).collect();
        let source_of = |key: &str| match device_index(key) {
            Some(pos) => devices
                .iter()
                .find(|(p, _)| *p == pos)
                .and_then(|(_, s)| s.clone()),
            None => match rule_index(key) {
                Some(i) => rule_source(&fig, i),
                None => source_of_key(&fig, key),
            },
        };
        super::validate::validate(config, &positions, &source_of, &mut errors);
    }
    match config {
        Some(config) if errors.is_empty() => Ok(Loaded {
            config,
            files: used,
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

/// "invalid TOML at line L, column C: message" on one line.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', ", ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("invalid TOML at line {line}, column {col}: {msg}")
        }
        None => format!("invalid TOML: {msg}"),
    }
}

/// The main file, then `conf.d/*.toml` beside it in name order.
fn collect_files(opts: &LoadOptions, errors: &mut Vec<ConfigError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let main = match &opts.file {
        Some(path) => {
            if path.is_file() {
                Some(path.clone())
            } else {
                errors.push(ConfigError::new(
                    Some(Source::File(path.clone())),
                    None,
                    "configuration file not found (given with -c/--config); check the path".into(),
                ));
                None
            }
        }
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG_PATH);
            p.is_file().then_some(p)
        }
    };
    let base_dir = match (&main, &opts.file) {
        (Some(m), _) | (None, Some(m)) => m.parent().map(Path::to_path_buf),
        (None, None) => Path::new(DEFAULT_CONFIG_PATH)
            .parent()
            .map(Path::to_path_buf),
    };
    files.extend(main);
    if let Some(dir) = base_dir.map(|d| d.join("conf.d")) {
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                let mut dropins: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                    .collect();
                dropins.sort();
                files.extend(dropins);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(ConfigError::new(
                Some(Source::File(dir)),
                None,
                format!("cannot read drop-in directory: {e}"),
            )),
        }
    }
    files
}

/// Extract section by section so that problems in different sections are all reported.
/// `devices[3].kind` → 3.
fn device_index(key: &str) -> Option<usize> {
    key.strip_prefix("devices[")?
        .split(']')
        .next()?
        .parse()
        .ok()
}

fn extract(
    fig: &Figment,
    device_sources: &mut Vec<(usize, Option<Source>)>,
    errors: &mut Vec<ConfigError>,
) -> Option<Config> {
    let root: Dict = match fig.extract::<Dict>() {
        Ok(d) => d,
        Err(e) => {
            push_figment_errors(fig, e, errors);
            return None;
        }
    };
    for key in root.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            errors.push(ConfigError::new(
                source_of_key(fig, key),
                Some(key.clone()),
                format!(
                    "unknown section or key; expected one of: {}",
                    SECTIONS.join(", ")
                ),
            ));
        }
    }
    let mut config = Config::default();
    section(fig, "gateway", &mut config.gateway, errors);
    section(fig, "listeners", &mut config.listeners, errors);
    section(fig, "login", &mut config.login, errors);
    section(fig, "limits", &mut config.limits, errors);
    section(fig, "policy", &mut config.policy, errors);
    section(fig, "metering", &mut config.metering, errors);
    section(fig, "plugins", &mut config.plugins, errors);
    section(fig, "broker", &mut config.broker, errors);
    section(fig, "upstream", &mut config.upstream, errors);
    section(fig, "queue", &mut config.queue, errors);
    section(fig, "dead_letter", &mut config.dead_letter, errors);
    section(fig, "defender", &mut config.defender, errors);
    section(fig, "log", &mut config.log, errors);
    section(fig, "http", &mut config.http, errors);
    section(fig, "history", &mut config.history, errors);
    config.devices = devices(fig, root.get("devices"), device_sources, errors);
    config.rules = rules(fig, root.get("rules"), errors);
    Some(config)
}

/// Extract one section. serde stops at its first error, so when the section fails, each of its
/// keys is tried alone on top of the defaults to find every bad key.
fn section<T: DeserializeOwned + Serialize + Default>(
    fig: &Figment,
    name: &str,
    out: &mut T,
    errors: &mut Vec<ConfigError>,
) {
    let first = match fig.focus(name).extract::<T>() {
        Ok(v) => {
            *out = v;
            return;
        }
        Err(e) => e,
    };
    let before = errors.len();
    if let Ok(Value::Dict(_, dict)) = fig.find_value(name) {
        for (key, value) in dict {
            let probe = Figment::from(Serialized::defaults(T::default()))
                .merge(Serialized::default(&key, value));
            if let Err(e) = probe.extract::<T>() {
                for e in e {
                    let rel = if e.path.is_empty() {
                        key.clone()
                    } else {
                        e.path.join(".")
                    };
                    let full = format!("{name}.{rel}");
                    let source = source_of_key(fig, &format!("{name}.{key}")).map(|s| match s {
                        Source::Env(_) => Source::Env(env_var_name(&full)),
                        other => other,
                    });
                    errors.push(ConfigError::new(source, Some(full), describe_kind(&e.kind)));
                }
            }
        }
    }
    if errors.len() == before {
        for e in first {
            let key = std::iter::once(name.to_owned())
                .chain(e.path.iter().cloned())
                .collect::<Vec<_>>()
                .join(".");
            errors.push(ConfigError::new(
                source_of_key(fig, name),
                Some(key),
                describe_kind(&e.kind),
            ));
        }
    }
}

/// Extract `[[devices]]` one entry at a time; `sources` gets (position, origin) of each good one.
/// Entries that fail are reported and left out (indices in messages are the file's).
fn devices(
    fig: &Figment,
    value: Option<&Value>,
    sources: &mut Vec<(usize, Option<Source>)>,
    errors: &mut Vec<ConfigError>,
) -> Vec<super::DeviceConfig> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        errors.push(ConfigError::new(
            source_of_tag(fig, value, &["devices".into()]),
            Some("devices".into()),
            "must be an array of tables: write each device as a `[[devices]]` block".into(),
        ));
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.deserialize::<super::DeviceConfig>() {
            Ok(d) => {
                out.push(d);
                sources.push((i, source_of_tag(fig, item, &[])));
            }
            Err(e) => {
                for e in e {
                    let mut key = format!("devices[{i}]");
                    for p in &e.path {
                        key.push('.');
                        key.push_str(p);
                    }
                    let message = match &e.kind {
                        figment::error::Kind::UnknownField(f, _) if f == "password" => {
                            "plain-text passwords are not accepted; store an argon2 hash as \
                             `password_hash` (make one with `wardgate hash-password`)"
                                .to_owned()
                        }
                        kind => describe_kind(kind),
                    };
                    errors.push(ConfigError::new(
                        source_of_tag(fig, item, &[]),
                        Some(key),
                        message,
                    ));
                }
            }
        }
    }
    out
}

/// Extract `[[rules]]` one entry at a time; entries that fail are reported and left out.
fn rules(
    fig: &Figment,
    value: Option<&Value>,
    errors: &mut Vec<ConfigError>,
) -> Vec<super::RuleConfig> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        errors.push(ConfigError::new(
            source_of_tag(fig, value, &["rules".into()]),
            Some("rules".into()),
            "must be an array of tables: write each rule as a `[[rules]]` block".into(),
        ));
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.deserialize::<super::RuleConfig>() {
            Ok(r) => out.push(r),
            Err(e) => {
                for e in e {
                    let mut key = format!("rules[{i}]");
                    for p in &e.path {
                        key.push('.');
                        key.push_str(p);
                    }
                    errors.push(ConfigError::new(
                        source_of_tag(fig, item, &[]),
                        Some(key),
                        describe_kind(&e.kind),
                    ));
                }
            }
        }
    }
    out
}

/// `rules[3].sql` → 3.
fn rule_index(key: &str) -> Option<usize> {
    key.strip_prefix("rules[")?.split(']').next()?.parse().ok()
}

/// Where `[[rules]]` entry `i` came from (for messages about its SQL).
fn rule_source(fig: &Figment, i: usize) -> Option<Source> {
    let items = fig.find_value("rules").ok()?;
    let item = items.as_array()?.get(i)?;
    source_of_tag(fig, item, &[])
}

fn push_figment_errors(fig: &Figment, e: figment::Error, errors: &mut Vec<ConfigError>) {
    for e in e {
        let key = (!e.path.is_empty()).then(|| e.path.join("."));
        let source = key
            .as_deref()
            .and_then(|k| source_of_key(fig, k))
            .or_else(|| e.metadata.as_ref().map(|m| source_of_metadata(m, &e.path)));
        errors.push(ConfigError::new(source, key, describe_kind(&e.kind)));
    }
}

fn env_var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(field, expected) => format!(
            "unknown key `{field}`; expected one of: {}",
            expected.join(", ")
        ),
        Kind::InvalidType(actual, expected) if expected.contains("duration") => {
            format!(
                "wrong type: found {actual}, expected a duration written like \"10s\" or \"500ms\""
            )
        }
        Kind::InvalidType(actual, expected) => {
            format!("wrong type: found {actual}, expected {expected}")
        }
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value: found {actual}, expected {expected}")
        }
        Kind::MissingField(field) => format!("missing required key `{field}`"),
        Kind::UnknownVariant(found, expected) => format!(
            "`{found}` is not allowed; expected one of: {}",
            expected.join(", ")
        ),
        other => other.to_string(),
    }
}

/// The source that supplied `key` (dotted path), if figment knows it.
pub(crate) fn source_of_key(fig: &Figment, key: &str) -> Option<Source> {
    let md = fig.find_metadata(key)?;
    let path: Vec<String> = key.split('.').map(str::to_owned).collect();
    Some(source_of_metadata(md, &path))
}

fn source_of_tag(fig: &Figment, value: &Value, path: &[String]) -> Option<Source> {
    fig.get_metadata(value.tag())
        .map(|md| source_of_metadata(md, path))
}

fn source_of_metadata(md: &figment::Metadata, path: &[String]) -> Source {
    match &md.source {
        Some(figment::Source::File(p)) => Source::File(p.clone()),
        _ if md.name.contains("environment variable") => Source::Env(env_var_name(&path.join("."))),
        _ => Source::Default,
    }
}
