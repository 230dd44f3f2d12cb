//! `cargo xtask fuzz [TARGET] [--seconds N] [--cmin]`: run the coverage-guided fuzz targets
//! in `fuzz/` (cargo-fuzz, libFuzzer, AddressSanitizer), each for a bounded time.
//!
//! - Installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when it is missing.
//! - Builds every target once (`cargo fuzz build`), then runs each (or only TARGET) for N
//!   seconds (default [`DEFAULT_SECONDS`]) on its committed corpus `fuzz/corpus/<target>`
//!   (new inputs that add coverage are added there), crashes written to
//!   `fuzz/artifacts/<target>/`. With `--cmin`, each corpus is minimised afterwards
//!   (`cargo fuzz cmin`, keeping every covered edge), as before committing it.
//! - Fails when a target crashed (a panic, a sanitizer report, a leak, a timeout or an
//!   allocation over the limit), naming every reproducer and the command that replays it.
//!
//! What must stay true: a default run is bounded (six targets × 60 s plus the build, about
//! eight minutes once the build is cached), and the fuzz crate stays outside the main
//! workspace (its own `[workspace]`, excluded in the root `Cargo.toml`), so nothing here is
//! built by `cargo build --workspace`. On a stable toolchain the sanitizer flags are accepted
//! through `RUSTC_BOOTSTRAP=1`, set here for cargo-fuzz's builds only.

use super::{cargo, root, run};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Every fuzz target in `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: &[&str] = &[
    "mqtt_packets",
    "rules_sql",
    "shadow_document",
    "defender_report",
    "plugin_output",
    "config_load",
];

/// Seconds each target runs when `--seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 60;

/// What libFuzzer is told besides the time: a run slower than 10 s, or using more than 2 GiB
/// (a single allocation over 512 MiB), is a crash; final statistics for the log.
const LIBFUZZER_FLAGS: &[&str] = &[
    "-timeout=10",
    "-rss_limit_mb=2048",
    "-malloc_limit_mb=512",
    "-print_final_stats=1",
];

/// What was asked for on the command line.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    targets: Vec<&'static str>,
    seconds: u64,
    cmin: bool,
}

fn parse_args(args: &[String]) -> Result<Request> {
    let mut targets = Vec::new();
    let mut seconds = DEFAULT_SECONDS;
    let mut cmin = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let n = it.next().context("--seconds needs a number")?;
                seconds = n
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .with_context(|| format!("--seconds {n}: not a positive whole number"))?;
            }
            "--cmin" => cmin = true,
            name => match TARGETS.iter().find(|t| **t == name) {
                Some(t) if targets.is_empty() => targets.push(*t),
                Some(_) => bail!("give one target, or none for all of them"),
                None => bail!(
                    "unknown fuzz target or option `{name}`; targets: {}",
                    TARGETS.join(", ")
                ),
            },
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    Ok(Request {
        targets,
        seconds,
        cmin,
    })
}

/// `cargo fuzz ...`, from the workspace root (cargo-fuzz finds `fuzz/` there), with the
/// nightly flags it passes accepted by a stable compiler.
fn cargo_fuzz() -> std::process::Command {
    let mut c = cargo();
    c.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    c
}

fn has_cargo_fuzz() -> bool {
    cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The files in a target's artifact directory.
fn artifacts(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// The task.
pub fn fuzz(args: &[String]) -> Result<()> {
    let req = parse_args(args)?;
    if !has_cargo_fuzz() {
        eprintln!("xtask: installing cargo-fuzz");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = root().join("fuzz");
    let mut build = cargo_fuzz();
    build.arg("build");
    if let [one] = req.targets.as_slice() {
        build.arg(one);
    }
    run(&mut build)?;

    let mut crashes = Vec::new();
    for target in &req.targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let artifact_dir = fuzz_dir.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifact_dir)?;
        let before = artifacts(&artifact_dir);
        let started = std::time::Instant::now();
        let mut cmd = cargo_fuzz();
        cmd.args(["run", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", req.seconds))
            .arg(format!("-artifact_prefix={}/", artifact_dir.display()))
            .args(LIBFUZZER_FLAGS);
        let result = run(&mut cmd);
        let found: Vec<PathBuf> = artifacts(&artifact_dir)
            .difference(&before)
            .cloned()
            .collect();
        eprintln!(
            "xtask: fuzz target {target}: {:.0} s, {} new artifact(s)",
            started.elapsed().as_secs_f64(),
            found.len()
        );
        match (result, found.is_empty()) {
            (Ok(()), true) => {}
            (_, false) => crashes.extend(found.into_iter().map(|f| (*target, f))),
            (Err(e), true) => return Err(e.context(format!("fuzz target {target} failed"))),
        }
        if req.cmin {
            // Keep the inputs that reach an edge no smaller one reaches: every edge stays
            // covered and the committed corpus stays at a few hundred small files (counting
            // hit counts as well keeps thousands).
            run(cargo_fuzz().args(["cmin", target]).arg(&corpus).args([
                "--",
                "-use_counters=0",
                "-timeout=10",
                "-rss_limit_mb=2048",
            ]))?;
        }
    }
    if !crashes.is_empty() {
        for (target, file) in &crashes {
            eprintln!(
                "xtask: {target} crashed on {}; replay with\n  RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {}",
                file.display(),
                file.display()
            );
        }
        bail!(
            "{} crash(es) found: {}",
            crashes.len(),
            crashes
                .iter()
                .map(|(t, f)| format!("{t}: {}", f.display()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!(
        "xtask: fuzzing done: {} target(s), {} s each, no crash",
        req.targets.len(),
        req.seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_target_has_a_source_and_a_corpus() {
        let fuzz = root().join("fuzz");
        for t in TARGETS {
            let src = fuzz.join("fuzz_targets").join(format!("{t}.rs"));
            assert!(src.is_file(), "{} missing", src.display());
            let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "fuzz/Cargo.toml has no [[bin]] {t}"
            );
            let corpus = fuzz.join("corpus").join(t);
            let seeds = std::fs::read_dir(&corpus)
                .map(|d| d.count())
                .unwrap_or_default();
            assert!(seeds > 0, "{} has no seeds", corpus.display());
        }
    }

    #[test]
    fn arguments() {
        let all = parse_args(&[]).unwrap();
        assert_eq!(all.targets, TARGETS);
        assert_eq!(all.seconds, DEFAULT_SECONDS);
        assert!(!all.cmin);
        let one = parse_args(&args(&["rules_sql", "--seconds", "300", "--cmin"])).unwrap();
        assert_eq!(one.targets, ["rules_sql"]);
        assert_eq!((one.seconds, one.cmin), (300, true));
        assert!(parse_args(&args(&["nope"])).is_err());
        assert!(parse_args(&args(&["--seconds", "0"])).is_err());
        assert!(parse_args(&args(&["--seconds"])).is_err());
        assert!(parse_args(&args(&["rules_sql", "config_load"])).is_err());
    }
}
