//! The `wardgate` command line as a subprocess: `check-config` problem reports, layering,
//! `print-default-config`, `hash-password`, `--version`.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");

fn wardgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // Only the variables a test sets may reach the configuration layer.
    for (k, _) in std::env::vars() {
        if k.starts_with("WARDGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run wardgate")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn check_config_reports_every_problem_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("wardgate.toml");
    write(
        &main,
        "[gateway]\nid = \"ward-7\"\nshutdown_timeout = 10\n\n[log]\nlevel = \"info\"\nverbosity = 3\n",
    );
    let dropin = dir.path().join("conf.d/50-broker.toml");
    write(&dropin, "[broker]\nmax_inflight = \"many\"\n");

    let o = wardgate(
        &["check-config", "-c", main.to_str().unwrap()],
        &[("WARDGATE_LISTENERS__MAX_CONNECTIONS", "lots")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    let main_s = main.display().to_string();
    let dropin_s = dropin.display().to_string();
    // Wrong type in the main file.
    assert!(
        err.lines().any(|l| l.contains(&main_s)
            && l.contains("`gateway.shutdown_timeout`")
            && l.contains("wrong type")),
        "{err}"
    );
    // Unknown key in the main file.
    assert!(
        err.lines().any(|l| l.contains(&main_s)
            && l.contains("`log.verbosity`")
            && l.contains("unknown key")),
        "{err}"
    );
    // Wrong type in a drop-in.
    assert!(
        err.lines()
            .any(|l| l.contains(&dropin_s) && l.contains("`broker.max_inflight`")),
        "{err}"
    );
    // Wrong type from the environment, named by its variable.
    assert!(
        err.lines()
            .any(|l| l.contains("WARDGATE_LISTENERS__MAX_CONNECTIONS")
                && l.contains("`listeners.max_connections`")),
        "{err}"
    );
    assert!(err.contains("4 configuration problems"), "{err}");
}

#[test]
fn check_config_names_a_missing_explicit_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let o = wardgate(&["check-config", "-c", missing.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("not found"),
        "{err}"
    );
    // `run` refuses the same way, before binding anything.
    let o = wardgate(&["run", "-c", missing.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn environment_overrides_file_and_dropins_override_main_file() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("wardgate.toml");
    write(&main, "[gateway]\nid = \"from-file\"\n");
    let o = wardgate(&["check-config", "-c", main.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("gateway `from-file`"), "{}", stdout(&o));

    write(
        &dir.path().join("conf.d/10-id.toml"),
        "[gateway]\nid = \"from-dropin\"\n",
    );
    let o = wardgate(&["check-config", "-c", main.to_str().unwrap()], &[]);
    assert!(
        stdout(&o).contains("gateway `from-dropin`"),
        "{}",
        stdout(&o)
    );

    let o = wardgate(
        &["check-config", "-c", main.to_str().unwrap()],
        &[("WARDGATE_GATEWAY__ID", "from-env")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("gateway `from-env`"), "{}", stdout(&o));
}

#[test]
fn devices_from_dropins_are_combined_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("wardgate.toml");
    let hash = wardgate::registry::hash_password_demo("pw");
    write(
        &main,
        &format!("[[devices]]\nid = \"pm-01\"\nkind = \"pacemaker\"\npassword_hash = \"{hash}\"\n"),
    );
    write(
        &dir.path().join("conf.d/20-more.toml"),
        &format!("[[devices]]\nid = \"gl-01\"\nkind = \"glucose\"\npassword_hash = \"{hash}\"\n"),
    );
    let o = wardgate(&["check-config", "-c", main.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("2 devices"), "{}", stdout(&o));

    let bad = dir.path().join("conf.d/30-bad.toml");
    write(
        &bad,
        "[[devices]]\nid = \"pm-01\"\nkind = \"pacemaker\"\npassword = \"hunter2\"\n",
    );
    let o = wardgate(&["check-config", "-c", main.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains(&bad.display().to_string())
            && err.contains("plain-text passwords are not accepted"),
        "{err}"
    );
}

#[test]
fn print_default_config_is_the_shipped_file_and_valid() {
    let o = wardgate(&["print-default-config"], &[]);
    assert_eq!(o.status.code(), Some(0));
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/wardgate.toml"
    ))
    .unwrap();
    assert_eq!(stdout(&o), shipped);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("wardgate.toml");
    std::fs::write(&f, stdout(&o)).unwrap();
    let o = wardgate(&["check-config", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn hash_password_output_is_accepted_as_a_credential() {
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let hash = stdout(&o).trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("s3cret"));
    assert!(wardgate::registry::check_password_hash(&hash).is_ok());
}

#[test]
fn version_is_printed() {
    let o = wardgate(&["--version"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        stdout(&o).trim(),
        format!("wardgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn upstream_topic_templates_are_checked_with_the_devices_they_will_carry() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("wardgate.toml");
    for f in ["ca.pem", "gw.pem", "gw.key"] {
        write(&dir.path().join(f), "");
    }
    let hash = wardgate::registry::hash_password_demo("pw");
    let long_id = "m".repeat(70);
    write(
        &main,
        &format!(
            "[upstream]\nenabled = true\nendpoint = \"example-ats.iot.eu-west-1.amazonaws.com\"\n\
             ca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/gw.pem\"\nkey_file = \"{d}/gw.key\"\n\
             [upstream.topics]\ntelemetry = \"ward/${{device}}/data\"\n\
             alerts = \"ward/${{gateway}}/alerts\"\n\
             [[devices]]\nid = \"{long_id}\"\nkind = \"pacemaker\"\npassword_hash = \"{hash}\"\n",
            d = dir.path().display()
        ),
    );
    let o = wardgate(&["check-config", "-c", main.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    let err = stderr(&o);
    for want in [
        "upstream.topics.telemetry",
        "the telemetry topic knows only `${thing}`",
        "upstream.topics.alerts",
        "`${gateway}`",
        // The default named-shadow template cannot carry a 70-character device id.
        "upstream.topics.shadow",
        "shadow name",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}
