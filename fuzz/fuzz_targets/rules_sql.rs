//! Fuzz target `rules_sql`: the edge rules' SQL parser and evaluator (`rules::sql`).
//!
//! Input: up to four parts separated by NUL bytes, `SQL \0 payload \0 topic \0 template`,
//! each taken as UTF-8 (lossily). The SQL goes to [`Statement::parse`]; a statement that parses
//! is evaluated against the payload (as JSON when it is JSON, as "not JSON" otherwise) on the
//! topic — or, without a topic part, on a topic made from the statement's own FROM filter so
//! that the evaluator is reached. The template part (and the SQL text itself) goes to
//! [`Template::parse`] and is rendered against the same message.
//!
//! What must stay true (asserted here; see the module's "What must stay true"):
//! - nothing panics or overflows the stack, whatever the text or the payload;
//! - every `ParseError` has a 1-based line and column that lie inside the text (or just after
//!   its end) and a message;
//! - parsing and evaluating are deterministic;
//! - a statement's FROM filter is a valid MQTT filter;
//! - `evaluate` gives `None` for a topic the FROM filter does not match, and otherwise `None`
//!   or a JSON object;
//! - a template without `${` renders as its own text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wardgate::gatekeeper::policy;
use wardgate::rules::sql::{Context, ParseError, Statement, Template};

/// A parse error's place is inside `text` (a column just after a line's end is allowed: the
/// error is "at end of input" there).
fn assert_in_text(e: &ParseError, text: &str) {
    assert!(!e.message.is_empty(), "error without a message: {e:?}");
    assert!(e.line >= 1 && e.column >= 1, "{e:?}");
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        e.line <= lines.len(),
        "line {} of a text with {} lines: {e:?}",
        e.line,
        lines.len()
    );
    let chars = lines[e.line - 1].chars().count();
    assert!(
        e.column <= chars + 1,
        "column {} of a line of {chars} characters: {e:?}",
        e.column
    );
}

/// A topic the filter matches: `+` and `#` replaced by a level.
fn topic_for(filter: &str) -> String {
    filter
        .split('/')
        .map(|level| match level {
            "+" | "#" => "x",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn check_template(text: &str, ctx: &Context<'_>) {
    match Template::parse(text) {
        Err(e) => assert_in_text(&e, text),
        Ok(template) => {
            assert_eq!(Template::parse(text).ok().as_ref(), Some(&template));
            let rendered = template.render(ctx);
            assert_eq!(
                rendered,
                template.render(ctx),
                "rendering is not deterministic"
            );
            if !text.contains("${") {
                assert_eq!(rendered, text, "a template without `${{` is literal text");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |b| *b == 0);
    let sql = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let payload_bytes = parts.next();
    let topic_part = parts.next().map(String::from_utf8_lossy);
    let template_part = parts.next().map(String::from_utf8_lossy);

    let payload: Option<Value> = payload_bytes.and_then(|b| serde_json::from_slice(b).ok());
    let statement = Statement::parse(&sql);
    let topic = match (&topic_part, &statement) {
        (Some(t), _) => t.to_string(),
        (None, Ok(s)) => topic_for(s.topic_filter()),
        (None, Err(_)) => "ward/pm-1/telemetry".to_owned(),
    };
    let ctx = Context {
        topic: &topic,
        client_id: "pm-1",
        timestamp_ms: 1_000_000,
        payload: payload.as_ref(),
    };

    match &statement {
        Err(e) => assert_in_text(e, &sql),
        Ok(s) => {
            assert_eq!(
                Statement::parse(&sql).as_ref(),
                Ok(s),
                "parsing is not deterministic"
            );
            let filter = s.topic_filter();
            assert!(
                !filter.is_empty()
                    && !filter.contains('\0')
                    && policy::filter_syntax(filter).is_ok(),
                "FROM filter {filter:?} is not a valid MQTT filter"
            );
            let out = s.evaluate(&ctx);
            assert_eq!(out, s.evaluate(&ctx), "evaluation is not deterministic");
            if !s.matches_topic(&topic) {
                assert_eq!(out, None, "fired on a topic its filter does not match");
            }
            if let Some(out) = out {
                assert!(out.is_object(), "output is not an object: {out}");
            }
        }
    }
    if let Some(t) = &template_part {
        check_template(t, &ctx);
    }
    check_template(&sql, &ctx);
});
