//! Fuzz target `config_load`: the configuration loader (`config::load`) on arbitrary files.
//!
//! Input: the text of `wardgate.toml`, optionally followed by drop-ins: every line
//! `#@conf.d` starts a new file in the `conf.d/` beside it (`conf.d/00.toml`, `01.toml`, ...),
//! so layering and array concatenation across files are reached too. The files are written
//! to a directory of this process's own under `fuzz/target/config_load/` (ignored by git,
//! gone with `cargo clean`), and loaded with `LoadOptions { file: Some(..), ignore_env: true }`
//! (the environment is never read).
//!
//! What must stay true (the loader's contract):
//! - it returns a configuration or a non-empty list of problems, never panics;
//! - every problem that names a file names one of the files given;
//! - loading the same files twice gives the same result (the same problems, in any order);
//! - an accepted configuration lists exactly the files it was built from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use wardgate::config::{load, LoadOptions, Source};

/// The line that starts a drop-in.
const DROP_IN: &str = "#@conf.d\n";
/// Most drop-ins one input makes.
const MAX_DROP_INS: usize = 8;

/// This process's directory: `fuzz/target/config_load/<pid>/` with `conf.d/` in it.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/config_load")
            .join(std::process::id().to_string());
        std::fs::create_dir_all(d.join("conf.d")).expect("temp dir");
        d
    })
}

/// `data` cut at every [`DROP_IN`] line.
fn split_files(data: &[u8]) -> Vec<&[u8]> {
    let marker = DROP_IN.as_bytes();
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(marker.len()).position(|w| w == marker) {
        parts.push(&rest[..at]);
        rest = &rest[at + marker.len()..];
    }
    parts.push(rest);
    parts
}

/// Write the input's files (bytes as given: a file that is not UTF-8 is a problem the loader
/// reports); their paths, main file first.
fn write_files(data: &[u8]) -> Vec<PathBuf> {
    let dir = dir();
    let conf_d = dir.join("conf.d");
    if let Ok(entries) = std::fs::read_dir(&conf_d) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let parts = split_files(data);
    let main = dir.join("wardgate.toml");
    std::fs::write(&main, parts[0]).expect("write main file");
    let mut files = vec![main];
    for (i, part) in parts[1..].iter().take(MAX_DROP_INS).enumerate() {
        let f = conf_d.join(format!("{i:02}.toml"));
        std::fs::write(&f, part).expect("write drop-in");
        files.push(f);
    }
    files
}

/// The outcome in a comparable form.
fn outcome(files: &[PathBuf]) -> Result<wardgate::config::Loaded, Vec<String>> {
    let opts = LoadOptions {
        file: Some(files[0].clone()),
        ignore_env: true,
    };
    match load(&opts) {
        Ok(loaded) => Ok(loaded),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result without problems");
            for e in &errors.0 {
                if let Some(Source::File(f)) = &e.source {
                    assert!(
                        files.contains(f) || f.starts_with(dir()),
                        "a problem names a file that was not given: {}",
                        f.display()
                    );
                }
                assert!(!e.message.is_empty(), "a problem without a message: {e:?}");
            }
            let _ = errors.to_string();
            // Compared as a set: the order of problems is not part of the contract.
            let mut problems: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            problems.sort();
            Err(problems)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let files = write_files(data);
    let first = outcome(&files);
    let second = outcome(&files);
    match (&first, &second) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.config, b.config, "loading twice differs");
            assert_eq!(a.files, b.files);
            assert_eq!(a.files, files, "the files a configuration was built from");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "loading twice reports differently"),
        _ => panic!("loading twice: {first:?} then {second:?}"),
    }
});
