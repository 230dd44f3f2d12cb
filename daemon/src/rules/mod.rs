//! Edge rules: AWS IoT topic rules (an IoT SQL subset, [`sql`]) evaluated on the gateway, so a
//! ward's alarms do not depend on the internet.
//!
//! Rules see what AWS rules see: every PUBLISH a device is allowed to send (its raw payload),
//! the shadow service's own messages (`/update/accepted`, `/update/documents`,
//! `/update/delta`, `/get/accepted`, the `/rejected` replies, ...), the canonical readings the
//! pipeline publishes on `ward/<device>/readings`, and messages republished by rules.
//!
//! Where rules run, and why: in the task that produced the message (a device's connection, or
//! the shadow service), not behind a queue of their own. Evaluating a statement costs
//! microseconds, and a rule that fell behind in a queue could only block the devices or drop
//! messages — and a dropped message can be a dropped alarm. In-line, no alarm is ever lost to a
//! full queue, and a rule's durable action (`upstream`) joins the triggering message's PUBACK:
//! a QoS 1 message that fired a rule is acknowledged only once the alert is on disk too.
//!
//! Actions:
//! - `republish`: the rule's output on a local topic (a `${...}` template), QoS 0 or 1, when a
//!   local subscriber listens. The republished message is evaluated by the rules again (a rule
//!   may watch another's output, as on AWS), at most [`MAX_HOPS`] times: AWS has no loop
//!   protection, so a wildcard rule republishing into its own filter would loop for ever; here
//!   the chain stops, is counted (`loops_stopped`) and logged once per rule per minute.
//! - `upstream`: the output, with the rule's name, device and topic, as an alarm record on the
//!   alerts stream: never evicted, sent before routine readings when the uplink returns.
//! - `journal`: one entry at the configured priority, with `RULE=` and `DEVICE_ID=` fields.
//! - `http`: the output POSTed to a webhook, stored first and delivered at least once across
//!   receiver failures and restarts ([`webhook`]); like `upstream`, it joins the message's PUBACK.
//!
//! `debounce` keeps a rule from firing for the same device more than once per interval while its
//! condition holds; matches in between are counted as `debounced`.
//!
//! What must stay true: one rule's failure (a template that renders a bad topic, a queue that
//! refuses) is counted on that rule and never stops the others; a rule fires only when its
//! WHERE is true (Undefined never fires).

pub mod sql;
pub mod webhook;

use crate::config::{ActionConfig, RuleConfig};
use crate::pipeline::{Ack, LocalPublisher};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many times a republished message may be evaluated again (see the module docs).
pub const MAX_HOPS: u8 = 3;
/// At most one "rule loop stopped" line per rule per this long.
const LOOP_LOG_EVERY: Duration = Duration::from_secs(60);

/// A problem with one rule's configuration: the dotted key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `rules[2].sql`, `rules[0].actions[1].republish.topic`, ...
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem of every rule (all reported, none hides another).
pub fn check(rules: &[RuleConfig]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some(first) = seen.insert(r.name.as_str(), i) {
            problems.push(Problem {
                key: format!("rules[{i}].name"),
                message: format!("rule name `{}` is already used by rules[{first}]", r.name),
            });
        }
        if let Err(mut p) = Rule::compile(i, r) {
            problems.append(&mut p);
        }
    }
    problems
}

#[derive(Debug)]
enum Action {
    Republish { topic: sql::Template, qos: u8 },
    Upstream,
    Journal { level: log::Level, priority: String },
    Http(Box<HttpAction>),
}

#[derive(Debug)]
struct HttpAction {
    url: sql::Template,
    headers: Vec<(String, sql::Template)>,
    timeout: Duration,
    max_age: Duration,
    ca_file: Option<std::path::PathBuf>,
}

/// Per-rule counters.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Messages whose topic matched the rule's FROM.
    pub matched: AtomicU64,
    /// Times the rule fired (WHERE true, not debounced).
    pub fired: AtomicU64,
    /// Matches held back by `debounce`.
    pub debounced: AtomicU64,
    /// Actions that failed.
    pub action_failures: AtomicU64,
    /// Republish chains stopped at [`MAX_HOPS`].
    pub loops_stopped: AtomicU64,
}

/// A copy of one rule's counters, for `wardgate status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleCounts {
    /// The rule's name.
    pub name: String,
    /// Messages whose topic matched.
    pub matched: u64,
    /// Times it fired.
    pub fired: u64,
    /// Matches held back by `debounce`.
    pub debounced: u64,
    /// Actions that failed.
    pub action_failures: u64,
    /// Republish chains stopped.
    pub loops_stopped: u64,
}

/// Every rule's counters, by name, in configuration order (cheap to clone; follows reloads).
#[derive(Debug, Clone, Default)]
pub struct CountersView(Arc<std::sync::RwLock<Named>>);

/// Each rule's counters with its name, in configuration order.
type Named = Vec<(Arc<str>, Arc<RuleCounters>)>;

/// When a rule last fired, by (rule, device).
type LastFired = HashMap<(Arc<str>, Arc<str>), Instant>;

impl CountersView {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Named> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Count an action failure (found after the firing, as a webhook given up) on `rule`.
    pub fn failed(&self, rule: &str) {
        if let Some((_, c)) = self.read().iter().find(|(n, _)| &**n == rule) {
            c.action_failures.fetch_add(1, Relaxed);
        }
    }

    /// The counters now.
    pub fn counts(&self) -> Vec<RuleCounts> {
        self.read()
            .iter()
            .map(|(name, c)| RuleCounts {
                name: name.to_string(),
                matched: c.matched.load(Relaxed),
                fired: c.fired.load(Relaxed),
                debounced: c.debounced.load(Relaxed),
                action_failures: c.action_failures.load(Relaxed),
                loops_stopped: c.loops_stopped.load(Relaxed),
            })
            .collect()
    }
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    name: Arc<str>,
    statement: sql::Statement,
    actions: Vec<Action>,
    debounce: Option<Duration>,
    counters: Arc<RuleCounters>,
}

fn level_of(priority: &str) -> Option<log::Level> {
    // The journal logger maps these levels back to syslog priorities.
    Some(match priority {
        "emerg" | "alert" | "crit" | "err" | "error" => log::Level::Error,
        "warning" | "warn" => log::Level::Warn,
        "notice" | "info" => log::Level::Info,
        "debug" => log::Level::Debug,
        _ => return None,
    })
}

impl Rule {
    /// Compile `[[rules]]` entry `i`; every problem it has when it has any.
    pub fn compile(i: usize, r: &RuleConfig) -> Result<Rule, Vec<Problem>> {
        let mut problems = Vec::new();
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 128
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            problems.push(Problem {
                key: format!("rules[{i}].name"),
                message: format!(
                    "`{}` is not a valid rule name: use 1–128 letters, digits or `_` (as AWS IoT rule names)",
                    r.name
                ),
            });
        }
        let statement = match sql::Statement::parse(&r.sql) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(Problem {
                    key: format!("rules[{i}].sql"),
                    message: format!("rule `{}`: SQL error at {e}", r.name),
                });
                None
            }
        };
        let actions = compile_actions(
            &format!("rules[{i}]"),
            &r.name,
            &r.actions,
            &mut problems,
            Quarantine::Refused,
        );
        if r.debounce.is_some_and(|d| d.is_zero()) {
            problems.push(Problem {
                key: format!("rules[{i}].debounce"),
                message: "must be more than 0 (leave it out to fire on every match)".into(),
            });
        }
        match statement {
            Some(statement) if problems.is_empty() => Ok(Rule {
                name: r.name.as_str().into(),
                statement,
                actions,
                debounce: r.debounce,
                counters: Arc::default(),
            }),
            _ => Err(problems),
        }
    }
}

/// Compile the actions of `name` (a rule, or a security profile's alert actions), whose
/// configuration is at `prefix` (`rules[2]`); problems are added to `problems`.
fn compile_actions(
    prefix: &str,
    name: &str,
    configs: &[ActionConfig],
    problems: &mut Vec<Problem>,
    quarantine: Quarantine,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (j, a) in configs.iter().enumerate() {
        let key = |field: &str| format!("{prefix}.actions[{j}].{field}");
        match a {
            ActionConfig::Republish { topic, qos } => {
                if *qos > 1 {
                    problems.push(Problem {
                        key: key("republish.qos"),
                        message: format!("QoS {qos}: use 0 or 1"),
                    });
                }
                if topic.contains('+') || topic.contains('#') || topic.is_empty() {
                    problems.push(Problem {
                        key: key("republish.topic"),
                        message: format!(
                            "`{topic}` is not a topic to publish to: no `+` or `#`, not empty"
                        ),
                    });
                }
                match sql::Template::parse(topic) {
                    Ok(t) => actions.push(Action::Republish {
                        topic: t,
                        qos: *qos,
                    }),
                    Err(e) => problems.push(Problem {
                        key: key("republish.topic"),
                        message: format!("`{name}`: template error at {e}"),
                    }),
                }
            }
            ActionConfig::Upstream { stream } => {
                if stream == "alerts" {
                    actions.push(Action::Upstream);
                } else {
                    problems.push(Problem {
                        key: key("upstream.stream"),
                        message: format!("stream `{stream}`: only `alerts` is supported"),
                    });
                }
            }
            ActionConfig::Http {
                url,
                timeout,
                headers,
                max_age,
                ca_file,
            } => {
                let mut ok = true;
                let mut bad = |field: &str, message: String| {
                    ok = false;
                    problems.push(Problem {
                        key: key(field),
                        message,
                    });
                };
                let url_template = match sql::Template::parse(url) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        bad(
                            "http.url",
                            format!("`{name}`: template error at {e}"),
                        );
                        None
                    }
                };
                // A template is checked once rendered; a literal URL now.
                if !url.contains("${") {
                    if let Err(e) = webhook::check_url(url) {
                        bad("http.url", e);
                    }
                } else if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bad(
                        "http.url",
                        format!("`{url}`: start it with http:// or https:// (templates may follow)"),
                    );
                }
                if timeout.is_zero() || *timeout > Duration::from_secs(60) {
                    bad(
                        "http.timeout",
                        "use more than 0 and at most 60s per attempt".into(),
                    );
                }
                if max_age.is_zero() {
                    bad("http.max_age", "must be more than 0".into());
                }
                if ca_file.is_some() && !url.starts_with("https://") {
                    bad(
                        "http.ca_file",
                        "only used with an https:// URL; remove it or use https".into(),
                    );
                }
                let mut hs = Vec::new();
                for (name, value) in headers {
                    if let Err(e) = webhook::check_header(name) {
                        bad(&format!("http.headers.{name}"), e);
                        continue;
                    }
                    match sql::Template::parse(value) {
                        Ok(t) => hs.push((name.clone(), t)),
                        Err(e) => bad(
                            &format!("http.headers.{name}"),
                            format!("`{name}`: template error at {e}"),
                        ),
                    }
                }
                if let (true, Some(url)) = (ok, url_template) {
                    actions.push(Action::Http(Box::new(HttpAction {
                        url,
                        headers: hs,
                        timeout: *timeout,
                        max_age: *max_age,
                        ca_file: ca_file.clone(),
                    })));
                }
            }
            ActionConfig::Quarantine { duration } => match quarantine {
                Quarantine::Refused => problems.push(Problem {
                    key: key("quarantine"),
                    message: "quarantine is an action of security profiles (`[[defender.profiles]]`), not of rules".into(),
                }),
                Quarantine::Allowed if duration.is_zero() => problems.push(Problem {
                    key: key("quarantine.duration"),
                    message: "must be more than 0 (for example \"1h\")".into(),
                }),
                // Carried out by the defender itself.
                Quarantine::Allowed => {}
            },
            ActionConfig::Journal { priority } => match level_of(priority) {
                Some(level) => actions.push(Action::Journal {
                    level,
                    priority: priority.clone(),
                }),
                None => problems.push(Problem {
                    key: key("journal.priority"),
                    message: format!(
                        "`{priority}`: use one of emerg, alert, crit, err, warning, notice, info, debug"
                    ),
                }),
            },
        }
    }
    actions
}

/// Whether a set of actions may hold `quarantine` (carried out by its owner, not here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quarantine {
    Allowed,
    Refused,
}

/// A compiled list of actions with its counters, for an owner other than a rule (a security
/// profile's alerts): run with [`Rules::run_actions`].
#[derive(Debug)]
pub struct Actions {
    list: Vec<Action>,
    counters: Arc<RuleCounters>,
}

impl Actions {
    /// Compile `configs`, configured at `prefix` (`defender.profiles[0]`) for `name`.
    /// `quarantine` entries are checked and skipped: the owner carries them out.
    pub fn compile(
        prefix: &str,
        name: &str,
        configs: &[ActionConfig],
    ) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let list = compile_actions(prefix, name, configs, &mut problems, Quarantine::Allowed);
        if problems.is_empty() {
            Ok(Self {
                list,
                counters: Arc::default(),
            })
        } else {
            Err(problems)
        }
    }

    /// Actions that failed so far.
    pub fn failures(&self) -> u64 {
        self.counters.action_failures.load(Relaxed)
    }
}

/// Who fired: the name in logs and the shape of the upstream alert.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// An edge rule: the upstream alert is `{rule, device_id, topic, fired_at_ms, output}`.
    Rule(&'a str),
    /// A security profile: the upstream alert is the violation message itself (AWS's shape).
    Profile(&'a str),
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Rule(n) => write!(f, "rule {n}"),
            Origin::Profile(n) => write!(f, "security profile {n}"),
        }
    }
}

impl Origin<'_> {
    fn name(&self) -> &str {
        match self {
            Origin::Rule(n) | Origin::Profile(n) => n,
        }
    }
}

/// What a rule sees of one message.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Topic, as devices name it.
    pub topic: &'a str,
    /// Payload as published.
    pub payload: &'a [u8],
    /// The device it came from, or that the gateway's message is about (`clientid()`).
    pub device_id: &'a str,
    /// When the gateway received it, ms since the epoch.
    pub received_at_ms: i64,
}

/// Where actions go.
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    /// The local broker (republish).
    pub local: Option<Arc<LocalPublisher>>,
    /// The durable queue (upstream alerts); `None`: upstream disabled.
    pub queue: Option<crate::queue::Enqueue>,
    /// The webhook outbox (`http` actions); `None` when no rule has one.
    pub webhooks: Option<webhook::Webhooks>,
    /// The ward history: every firing of an edge rule is kept there as an alert (`None`:
    /// history disabled).
    pub history: Option<crate::history::Recorder>,
}

/// Whether any rule has an `http` action (then the gateway opens the webhook outbox).
pub fn wants_webhooks(configs: &[RuleConfig]) -> bool {
    configs
        .iter()
        .flat_map(|r| &r.actions)
        .any(|a| matches!(a, ActionConfig::Http { .. }))
}

/// The compiled rules and their sinks (cheap to share: `Arc<Rules>`).
///
/// The set of rules can be replaced while messages are evaluated ([`Rules::reload`]): a
/// message is evaluated against the set that was current when it arrived, and a rule kept
/// by name keeps its counters and its debounce.
#[derive(Debug, Default)]
pub struct Rules {
    rules: std::sync::RwLock<Arc<Vec<Rule>>>,
    view: CountersView,
    sinks: Sinks,
    /// Last firing per (rule, device), for debounce.
    last: Mutex<LastFired>,
    /// Last "loop stopped" line per rule.
    loop_logged: Mutex<HashMap<Arc<str>, Instant>>,
    /// The configuration of the rules now in force (to tell what a reload changed).
    configs: Mutex<Vec<RuleConfig>>,
}

/// What a reload changed, by rule name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Rules new in this configuration.
    pub added: Vec<String>,
    /// Rules gone from it.
    pub removed: Vec<String>,
    /// Rules kept whose SQL, actions or debounce changed.
    pub changed: Vec<String>,
    /// Rules that failed to compile and were left out.
    pub failed: usize,
}

/// Compile every rule that compiles (logging those that do not), reusing `kept`'s counters
/// for rules of the same name.
fn compile_all(
    configs: &[RuleConfig],
    kept: &[(Arc<str>, Arc<RuleCounters>)],
) -> (Vec<Rule>, usize) {
    let mut rules = Vec::new();
    let mut failed = 0;
    for (i, c) in configs.iter().enumerate() {
        match Rule::compile(i, c) {
            Ok(mut r) => {
                if let Some((_, counters)) = kept.iter().find(|(n, _)| **n == *r.name) {
                    r.counters = counters.clone();
                }
                rules.push(r);
            }
            Err(problems) => {
                failed += 1;
                for p in problems {
                    log::error!(rule:% = c.name, key:% = p.key; "rule not loaded: {}", p.message);
                }
            }
        }
    }
    (rules, failed)
}

impl Rules {
    /// Compile every rule (the configuration was validated: a rule that still fails to
    /// compile is logged and left out, the others run).
    pub fn new(configs: &[RuleConfig], sinks: Sinks) -> Self {
        let (compiled, _) = compile_all(configs, &[]);
        if !compiled.is_empty() {
            log::info!(rules = compiled.len(); "{} edge rules loaded", compiled.len());
        }
        let rules = Self {
            sinks,
            configs: configs.to_vec().into(),
            ..Self::default()
        };
        rules.install(compiled);
        if let Some(w) = &rules.sinks.webhooks {
            w.stats().attach(rules.counters());
        }
        rules
    }

    fn install(&self, compiled: Vec<Rule>) {
        *self.view.0.write().unwrap_or_else(|e| e.into_inner()) = compiled
            .iter()
            .map(|r| (r.name.clone(), r.counters.clone()))
            .collect();
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(compiled);
    }

    fn current(&self) -> Arc<Vec<Rule>> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the rules with `configs` (validated by the configuration loader): messages
    /// arriving from now on see the new set. An `http` action needs the webhook outbox, which
    /// a gateway opens at start only when a rule has one: without it those actions fail
    /// (counted, logged) until a restart, and the reload says so.
    pub fn reload(&self, configs: &[RuleConfig]) -> Reloaded {
        let old = self
            .configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let kept = self.view.read().clone();
        let (compiled, failed) = compile_all(configs, &kept);
        let name = |c: &RuleConfig| c.name.clone();
        let mut r = Reloaded {
            failed,
            ..Default::default()
        };
        for c in configs {
            match old.iter().find(|o| o.name == c.name) {
                None => r.added.push(name(c)),
                Some(o) if o != c => r.changed.push(name(c)),
                Some(_) => {}
            }
        }
        r.removed = old
            .iter()
            .filter(|o| !configs.iter().any(|c| c.name == o.name))
            .map(name)
            .collect();
        if self.sinks.webhooks.is_none() && wants_webhooks(configs) {
            log::warn!("a reloaded rule has an http action, but this gateway started without one and so without its webhook outbox: those actions fail until `systemctl restart wardgate`");
        }
        self.install(compiled);
        *self.configs.lock().unwrap_or_else(|e| e.into_inner()) = configs.to_vec();
        r
    }

    /// No rules: nothing to evaluate.
    pub fn is_empty(&self) -> bool {
        self.current().is_empty()
    }

    /// A view of every rule's counters that does not keep the rules (and their sinks) alive,
    /// and follows reloads.
    pub fn counters(&self) -> CountersView {
        self.view.clone()
    }

    /// Evaluate every rule on `msg` and run the actions of those that fire. A durable action
    /// takes a part of `ack`: the message is confirmed only once its alert is on disk too.
    pub async fn apply(&self, msg: Message<'_>, ack: &mut Option<Ack>) {
        let rules = self.current();
        if !rules.is_empty() {
            self.apply_at(&rules, msg, ack, 0).await;
        }
    }

    fn apply_at<'a>(
        &'a self,
        rules: &'a [Rule],
        msg: Message<'a>,
        ack: &'a mut Option<Ack>,
        hops: u8,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let mut payload: Option<Option<serde_json::Value>> = None;
            for rule in rules {
                if !rule.statement.matches_topic(msg.topic) {
                    continue;
                }
                rule.counters.matched.fetch_add(1, Relaxed);
                let doc = payload
                    .get_or_insert_with(|| serde_json::from_slice(msg.payload).ok())
                    .as_ref();
                let ctx = sql::Context {
                    topic: msg.topic,
                    client_id: msg.device_id,
                    timestamp_ms: msg.received_at_ms,
                    payload: doc,
                };
                let Some(output) = rule.statement.evaluate(&ctx) else {
                    continue;
                };
                if self.debounced(rule, msg.device_id) {
                    rule.counters.debounced.fetch_add(1, Relaxed);
                    continue;
                }
                rule.counters.fired.fetch_add(1, Relaxed);
                self.fire(
                    rules,
                    Origin::Rule(&rule.name),
                    &rule.actions,
                    &rule.counters,
                    &msg,
                    &ctx,
                    &output,
                    ack,
                    hops,
                )
                .await;
            }
        })
    }

    /// Run `actions` (a security profile's) with `output` for the message `msg` describes;
    /// a republished output is evaluated by the rules as any other message. Counts failures
    /// on `actions`.
    pub async fn run_actions(
        &self,
        origin: Origin<'_>,
        actions: &Actions,
        msg: Message<'_>,
        output: &serde_json::Value,
        ack: &mut Option<Ack>,
    ) {
        let rules = self.current();
        let ctx = sql::Context {
            topic: msg.topic,
            client_id: msg.device_id,
            timestamp_ms: msg.received_at_ms,
            payload: Some(output),
        };
        self.fire(
            &rules,
            origin,
            &actions.list,
            &actions.counters,
            &msg,
            &ctx,
            output,
            ack,
            0,
        )
        .await;
    }

    /// Whether `rule` fired for `device` within its debounce interval (if not, this firing
    /// is recorded).
    fn debounced(&self, rule: &Rule, device: &str) -> bool {
        let Some(every) = rule.debounce else {
            return false;
        };
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let key = (rule.name.clone(), Arc::<str>::from(device));
        match last.get(&key) {
            Some(at) if now.duration_since(*at) < every => true,
            _ => {
                last.insert(key, now);
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fire(
        &self,
        rules: &[Rule],
        origin: Origin<'_>,
        actions: &[Action],
        counters: &RuleCounters,
        msg: &Message<'_>,
        ctx: &sql::Context<'_>,
        output: &serde_json::Value,
        ack: &mut Option<Ack>,
        hops: u8,
    ) {
        let body = output.to_string();
        if let (Origin::Rule(name), Some(history)) = (origin, &self.sinks.history) {
            history.alert(msg.device_id, name, &body, crate::clock::now_ms());
        }
        for action in actions {
            match action {
                Action::Journal { level, priority } => {
                    log::log!(
                        *level,
                        rule:% = origin.name(), device_id:% = msg.device_id, topic:% = msg.topic,
                        priority:% = priority, output:% = body;
                        "{} fired for {}: {body}", origin, msg.device_id
                    );
                }
                Action::Upstream => {
                    let Some(queue) = &self.sinks.queue else {
                        // Upstream disabled: nothing to forward to (the configuration says so).
                        continue;
                    };
                    let alert = match origin {
                        Origin::Rule(name) => serde_json::json!({
                            "rule": name,
                            "device_id": msg.device_id,
                            "topic": msg.topic,
                            "fired_at_ms": crate::clock::now_ms(),
                            "output": output,
                        }),
                        Origin::Profile(_) => output.clone(),
                    };
                    let mut record =
                        crate::queue::Record::alert(msg.device_id, alert.to_string().into_bytes());
                    if let Origin::Profile(_) = origin {
                        // A violation: never evicted, sent with the alarms.
                        record.class = crate::queue::Class::Security;
                    }
                    let part = split_ack(ack);
                    if !queue.push(record, part).await {
                        counters.action_failures.fetch_add(1, Relaxed);
                        log::error!(rule:% = origin.name(), device_id:% = msg.device_id; "{}: the queue writer stopped; alert not queued", origin);
                    }
                }
                Action::Http(h) => {
                    let Some(webhooks) = &self.sinks.webhooks else {
                        counters.action_failures.fetch_add(1, Relaxed);
                        log::error!(rule:% = origin.name(), device_id:% = msg.device_id; "{}: no webhook outbox in this gateway; http action skipped", origin);
                        continue;
                    };
                    let url = h.url.render(ctx);
                    if let Err(e) = webhook::check_url(&url) {
                        counters.action_failures.fetch_add(1, Relaxed);
                        log::warn!(rule:% = origin.name(), device_id:% = msg.device_id; "{}: http action skipped: {e}", origin);
                        continue;
                    }
                    let delivery = webhook::Delivery {
                        format: webhook::Delivery::FORMAT,
                        url,
                        headers: h
                            .headers
                            .iter()
                            .map(|(n, v)| (n.clone(), v.render(ctx)))
                            .collect(),
                        timeout_ms: h.timeout.as_millis() as u64,
                        max_age_ms: h.max_age.as_millis() as u64,
                        ca_file: h.ca_file.clone(),
                        rule: origin.name().to_string(),
                        device_id: msg.device_id.to_string(),
                        fired_at_ms: crate::clock::now_ms(),
                        body: body.clone(),
                    };
                    let part = split_ack(ack);
                    if !webhooks.submit(delivery, part).await {
                        counters.action_failures.fetch_add(1, Relaxed);
                        log::error!(rule:% = origin.name(), device_id:% = msg.device_id; "{}: the webhook service stopped; delivery not stored", origin);
                    }
                }
                Action::Republish { topic, qos } => {
                    let topic = topic.render(ctx);
                    if topic.is_empty()
                        || topic.contains(['+', '#', '\0'])
                        || topic.starts_with("_wardgate")
                        || topic.starts_with("$SYS")
                    {
                        counters.action_failures.fetch_add(1, Relaxed);
                        log::warn!(rule:% = origin.name(), device_id:% = msg.device_id, topic:% = topic; "{}: republish topic `{topic}` is not one to publish to; action skipped", origin);
                        continue;
                    }
                    if let Some(local) = &self.sinks.local {
                        local
                            .publish_wanted_qos(&topic, body.clone().into_bytes(), *qos)
                            .await;
                    }
                    if hops + 1 >= MAX_HOPS {
                        counters.loops_stopped.fetch_add(1, Relaxed);
                        self.log_loop(&origin.to_string(), &topic);
                        continue;
                    }
                    let next = Message {
                        topic: &topic,
                        payload: body.as_bytes(),
                        device_id: msg.device_id,
                        received_at_ms: msg.received_at_ms,
                    };
                    self.apply_at(rules, next, ack, hops + 1).await;
                }
            }
        }
    }

    fn log_loop(&self, name: &str, topic: &str) {
        let now = Instant::now();
        let mut logged = self.loop_logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged
            .get(name)
            .is_some_and(|at| now.duration_since(*at) < LOOP_LOG_EVERY)
        {
            return;
        }
        logged.insert(name.into(), now);
        log::warn!(
            rule:% = name, topic:% = topic, hops = MAX_HOPS;
            "{name}: republished on `{topic}` after {MAX_HOPS} rule hops; not evaluated again (a rule loop?)"
        );
    }
}

/// A part of `ack` for a durable action (none when the message needs no acknowledgement).
fn split_ack(ack: &mut Option<Ack>) -> Option<Ack> {
    let (mine, theirs) = ack.take()?.split();
    *ack = Some(mine);
    Some(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(actions: &str) -> Vec<Problem> {
        let text = format!("name = \"r\"\nsql = \"SELECT * FROM 'a/+'\"\nactions = [{actions}]\n");
        let rule: RuleConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        check(&[rule])
    }

    #[test]
    fn http_actions_are_checked_field_by_field() {
        assert!(problems(r#"{ http = { url = "http://127.0.0.1:8080/nurse-call" } }"#).is_empty());
        assert!(problems(
            r#"{ http = { url = "https://pager/${topic(2)}", headers = { Authorization = "Bearer ${clientid()}" }, ca_file = "/etc/ssl/ward.pem", timeout = "5s", max_age = "1h" } }"#
        )
        .is_empty());
        let keys = |actions: &str| -> Vec<String> {
            problems(actions).into_iter().map(|p| p.key).collect()
        };
        assert_eq!(
            keys(r#"{ http = { url = "ftp://x/" } }"#),
            ["rules[0].actions[0].http.url"]
        );
        assert_eq!(
            keys(r#"{ http = { url = "pager/${topic(2)}" } }"#),
            ["rules[0].actions[0].http.url"]
        );
        assert_eq!(
            keys(r#"{ http = { url = "http://x/", timeout = "2m" } }"#),
            ["rules[0].actions[0].http.timeout"]
        );
        assert_eq!(
            keys(r#"{ http = { url = "http://x/", ca_file = "/ca.pem" } }"#),
            ["rules[0].actions[0].http.ca_file"]
        );
        assert_eq!(
            keys(r#"{ http = { url = "http://x/", headers = { Host = "y" } } }"#),
            ["rules[0].actions[0].http.headers.Host"]
        );
        assert_eq!(
            keys(r#"{ journal = {} }, { http = { url = "http://x/${topic(" } }"#),
            ["rules[0].actions[1].http.url"]
        );
    }
}
