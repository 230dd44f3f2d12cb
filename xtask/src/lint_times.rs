//! The gate against tests that hold only until some date: `cargo xtask lint-times` (and the first
//! step of `cargo xtask test`) fails on a 13-digit integer literal — an epoch time in milliseconds,
//! `1795326538000` or `1_795_326_538_000`, also with a type suffix or inside a string — in test
//! code, unless its line says why it is a pure input.
//!
//! Test code is every `.rs` file under `tests/` and `daemon/benches/`, and in every `.rs` file
//! under `daemon/src/` and `plugins/*/src/` the part from the first `#[cfg(test)]` line on.
//! Code before that line is the product's own and is not scanned.
//!
//! A literal may stay when the test's result does not depend on today (a unit test of a
//! date-parsing or date-formatting function, a day-boundary case): the line then ends with
//! `// pure input: <why>`, and the reason must not be empty. Every other time in a test comes
//! from the clock at run time.
//!
//! What must stay true: the scan is by text, line by line, so it never needs the code to build;
//! a literal is a run of digits and `_` that does not continue an identifier or a number, holds
//! exactly 13 digits and does not start with `0`; a longer run (a hash, a digest) is not a time.

use std::path::{Path, PathBuf};

/// The trailing comment that lets a literal stay, followed by its reason.
pub const MARKER: &str = "// pure input:";

/// One literal that needs fixing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file, relative to the workspace root.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// The literal as written.
    pub literal: String,
    /// Whether the line had the marker but no reason after it.
    pub empty_reason: bool,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.literal)?;
        if self.empty_reason {
            write!(f, " (marked `{MARKER}` without a reason)")?;
        }
        Ok(())
    }
}

/// Which part of a file is test code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole file (integration tests, test helpers, benchmarks).
    WholeFile,
    /// From the first `#[cfg(test)]` line on (product source with inline unit tests).
    FromCfgTest,
}

/// Integer type suffixes Rust allows on a literal.
const SUFFIXES: &[&str] = &[
    "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64", "u128", "usize",
];

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The 13-digit integer literals on one line of code.
pub fn epoch_literals(line: &str) -> Vec<String> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
        // A run that continues an identifier (`x1795…`, `0x…`) or follows a decimal point is
        // not an integer literal of its own.
        let continues = start > 0
            && (is_ident(b[start - 1])
                || (b[start - 1] == b'.' && start > 1 && b[start - 2].is_ascii_digit()));
        // What follows may be a type suffix; anything else alphanumeric makes it a word.
        let rest_start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let tail = &line[rest_start..i];
        let ends_well = tail.is_empty() || SUFFIXES.contains(&tail);
        let run = &line[start..rest_start];
        let digits = run.bytes().filter(u8::is_ascii_digit).count();
        if !continues && ends_well && digits == 13 && b[start] != b'0' {
            out.push(line[start..i].to_owned());
        }
    }
    out
}

/// Whether `line` carries the marker, and with a reason.
fn marker(line: &str) -> Option<bool> {
    let at = line.find(MARKER)?;
    Some(!line[at + MARKER.len()..].trim().is_empty())
}

/// The findings in one file's text, as (line number, literal, marked without a reason).
pub fn scan_text(text: &str, scope: Scope) -> Vec<(usize, String, bool)> {
    let mut in_tests = scope == Scope::WholeFile;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if !in_tests {
            if line.trim_start().starts_with("#[cfg(test)]") {
                in_tests = true;
            } else {
                continue;
            }
        }
        let literals = epoch_literals(line);
        if literals.is_empty() {
            continue;
        }
        match marker(line) {
            Some(true) => {}
            Some(false) => out.extend(literals.into_iter().map(|l| (n + 1, l, true))),
            None => out.extend(literals.into_iter().map(|l| (n + 1, l, false))),
        }
    }
    out
}

/// Every `.rs` file under `dir` (recursively, skipping `target/`), sorted.
fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "target") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The test code of the workspace at `root`: each file with the part of it that is scanned.
pub fn test_files(root: &Path) -> std::io::Result<Vec<(PathBuf, Scope)>> {
    let mut files = Vec::new();
    for d in ["tests", "daemon/benches"] {
        files.extend(
            rust_files(&root.join(d))?
                .into_iter()
                .map(|p| (p, Scope::WholeFile)),
        );
    }
    let mut sources = vec![root.join("daemon/src")];
    if let Ok(plugins) = std::fs::read_dir(root.join("plugins")) {
        let mut dirs: Vec<PathBuf> = plugins
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n != "target"))
            .map(|p| p.join("src"))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        sources.extend(dirs);
    }
    for s in sources {
        files.extend(rust_files(&s)?.into_iter().map(|p| (p, Scope::FromCfgTest)));
    }
    Ok(files)
}

/// Scan the workspace at `root`.
pub fn scan(root: &Path) -> std::io::Result<Vec<Finding>> {
    let mut out = Vec::new();
    for (path, scope) in test_files(root)? {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))
        })?;
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        out.extend(
            scan_text(&text, scope)
                .into_iter()
                .map(|(line, literal, empty_reason)| Finding {
                    path: rel.clone(),
                    line,
                    literal,
                    empty_reason,
                }),
        );
    }
    Ok(out)
}

/// The report for `findings`, with how to fix them.
pub fn report(findings: &[Finding]) -> String {
    let mut s = format!(
        "{} hard-coded epoch time(s) in test code:\n",
        findings.len()
    );
    for f in findings {
        s.push_str(&format!("  {f}\n"));
    }
    s.push_str(
        "A test with a fixed time passes only until that time is too old (or too far off) for \
         the code under test.\nDerive the time from the clock at run time \
         (`wardgate::clock::now_ms()`, `SystemTime::now()`), or, when the value is a pure \
         input whose result does not depend on today (a date-parsing test, a day boundary), \
         end its line with `// pure input: <why>`.",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    // The literals below are built from pieces so that this file does not look like what it
    // looks for.
    fn ms() -> String {
        format!("{}{}", "1795326", "538000")
    }

    #[test]
    fn catches_plain_separated_suffixed_and_quoted_literals() {
        let m = ms();
        assert_eq!(epoch_literals(&format!("let t = {m};")), vec![m.clone()]);
        let sep = "1_795_326_538_000";
        assert_eq!(
            epoch_literals(&format!("enqueued_at_ms: {sep},")),
            vec![sep]
        );
        assert_eq!(
            epoch_literals(&format!("v.extend({sep}i64.to_be_bytes());")),
            vec![format!("{sep}i64")]
        );
        assert_eq!(
            epoch_literals(&format!(r##"br#"{{"heartbeat":70,"ts":{m}}}"#"##)),
            vec![m.clone()]
        );
        assert_eq!(
            epoch_literals(&format!("[{m}, {m}]")),
            vec![m.clone(), m.clone()]
        );
    }

    #[test]
    fn leaves_other_numbers_alone() {
        let m = ms();
        for line in [
            "let secs = 1_795_326_538;".to_owned(),
            "let earliest = 946_684_800_000;".to_owned(),
            format!("let digest = \"{m}{m}\";"),
            format!("let id = x{m};"),
            format!("let h = 0x{m};"),
            format!("let f = 0.{m};"),
            format!("let word = {m}abc;"),
            format!("let padded = 0{};", &m[1..]),
        ] {
            assert!(epoch_literals(&line).is_empty(), "{line}");
        }
    }

    #[test]
    fn a_marked_literal_is_accepted_an_unmarked_or_empty_one_is_not() {
        let m = ms();
        let text = format!(
            "let a = {m}; // pure input: a parser test\nlet b = {m};\nlet c = {m}; // pure input:\n"
        );
        assert_eq!(
            scan_text(&text, Scope::WholeFile),
            vec![(2, m.clone(), false), (3, m.clone(), true)]
        );
    }

    #[test]
    fn only_the_test_part_of_a_source_file_is_scanned() {
        let m = ms();
        let text = format!(
            "//! product\nconst KNOWN: i64 = {m};\n\n#[cfg(test)]\nmod tests {{\n    const T: i64 = {m};\n}}\n"
        );
        assert_eq!(
            scan_text(&text, Scope::FromCfgTest),
            vec![(6, m.clone(), false)]
        );
        assert_eq!(scan_text(&text, Scope::WholeFile).len(), 2);
        let no_tests = format!("const KNOWN: i64 = {m};\n");
        assert!(scan_text(&no_tests, Scope::FromCfgTest).is_empty());
    }

    #[test]
    fn the_workspace_scan_covers_tests_benches_and_unit_tests() {
        let m = ms();
        let dir = std::env::temp_dir().join(format!("xtask-lint-times-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let write = |rel: &str, text: &str| {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write("tests/tests/a.rs", &format!("let t = {m};\n"));
        write("tests/target/debug/gen.rs", &format!("let t = {m};\n"));
        write("daemon/benches/load/mod.rs", &format!("let t = {m};\n"));
        write(
            "daemon/src/q.rs",
            &format!("const K: i64 = {m};\n#[cfg(test)]\nmod t {{ const T: i64 = {m}; }}\n"),
        );
        write(
            "plugins/common/src/lib.rs",
            &format!("#[cfg(test)]\nmod t {{ const T: i64 = {m}; // pure input: parser\n}}\n"),
        );
        write(
            "plugins/glucose/src/lib.rs",
            &format!("#[cfg(test)]\n{m}\n"),
        );
        write("daemon/benches/notes.txt", &format!("{m}\n"));
        let found: Vec<String> = scan(&dir).unwrap().iter().map(|f| f.to_string()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            found,
            vec![
                format!("tests/tests/a.rs:1: {m}"),
                format!("daemon/benches/load/mod.rs:1: {m}"),
                format!("daemon/src/q.rs:3: {m}"),
                format!("plugins/glucose/src/lib.rs:2: {m}"),
            ]
        );
        let r = report(
            &scan_text(&format!("{m}\n"), Scope::WholeFile)
                .into_iter()
                .map(|(line, literal, empty_reason)| Finding {
                    path: "tests/tests/x.rs".into(),
                    line,
                    literal,
                    empty_reason,
                })
                .collect::<Vec<_>>(),
        );
        assert!(r.contains(&format!("tests/tests/x.rs:1: {m}")), "{r}");
        assert!(r.contains("// pure input: <why>"), "{r}");
    }
}
