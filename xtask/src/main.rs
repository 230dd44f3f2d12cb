//! Developer tasks for wardgate, run as `cargo xtask <task>`.
//!
//! - `demo [ARGS]`: build in release mode and run `wardgate demo` (the gateway on its built-in
//!   configuration with a simulated ward). Without ARGS: `--speed 10 --duration 2m`.
//! - `test`: install what the tests need, then formatting, lints and every test.
//! - `deps`: only install the system packages the tests need.
//!
//! Each task installs what it needs itself (Debian packages via apt-get when missing), so a
//! fresh Debian 12 machine with a Rust toolchain needs nothing else.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the test suite uses: `systemd` (systemd-analyze, systemd-journald,
/// journalctl) and `util-linux` (unshare) for the journal and unit tests, `openssl` for the
/// ward-pki script test.
const TEST_PACKAGES: &[&str] = &["systemd", "util-linux", "openssl"];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "demo" => demo(&rest),
        "test" => test(),
        "deps" => install_packages(TEST_PACKAGES),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 demo [ARGS]  run the gateway with a simulated ward (default: --speed 10 --duration 2m)\n  \
                 test         install test dependencies, then fmt, clippy and all tests\n  \
                 deps         install the Debian packages the tests need"
            );
            if task.is_empty() || task == "help" || task == "--help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "wardgate"]))?;
    let mut cmd = Command::new(root().join("target/release/wardgate"));
    cmd.arg("demo");
    if args.is_empty() {
        cmd.args(["--speed", "10", "--duration", "2m"]);
    } else {
        cmd.args(args);
    }
    run(&mut cmd)
}

fn test() -> Result<()> {
    install_packages(TEST_PACKAGES)?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    if has_nextest() {
        run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))?;
    } else {
        eprintln!("xtask: cargo-nextest not found; using cargo test");
        run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    }
    Ok(())
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// apt-get install whatever of `packages` is missing (as root, or through sudo).
fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut c = if is_root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}
