//! The shipped systemd unit: valid for systemd (`systemd-analyze verify`) and tightly
//! sandboxed (`systemd-analyze security --offline`), checked with the real systemd tools on the
//! source file. `deb.rs` checks the same unit as the package installs it, in a Debian 12 root.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
const UNIT: &str = include_str!("../../packaging/systemd/wardgate.service");

/// The unit with `/usr/bin/wardgate` pointing at the binary under test (verify checks that
/// executables exist).
fn unit_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wardgate.service");
    std::fs::write(&path, UNIT.replace("/usr/bin/wardgate", BIN)).unwrap();
    (dir, path)
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let (_dir, path) = unit_file();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "verify failed: {stderr}");
    assert!(
        !stderr.contains("wardgate.service:"),
        "verify warned about the unit: {stderr}"
    );
}

#[test]
fn unit_exposure_is_low() {
    let (_dir, path) = unit_file();
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let text = String::from_utf8_lossy(&o.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for wardgate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {text}"));
    eprintln!("packaging: exposure (systemd-analyze security --offline=yes): {score}");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

/// `systemctl reload` runs `wardgate reload`, which sends SIGHUP and waits for the verdict, so
/// a rejected configuration makes the reload fail instead of passing silently.
#[test]
fn unit_runs_the_check_before_start_and_reloads_with_wardgate_reload() {
    assert!(UNIT.contains("\nType=notify\n"));
    assert!(UNIT.contains("\nExecStartPre=/usr/bin/wardgate check-config\n"));
    assert!(UNIT.contains("\nExecReload=/usr/bin/wardgate reload\n"));
    assert!(UNIT.contains("\nWatchdogSec="));
    assert!(UNIT.contains("\nRestart=on-failure\n"));
}
