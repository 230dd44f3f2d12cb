//! Developer tasks for wardgate, run as `cargo xtask <task>`.
//!
//! - `demo [ARGS]`: build in release mode and run `wardgate demo` (the gateway on its built-in
//!   configuration with a simulated ward). Without ARGS: `--speed 10 --duration 2m`.
//! - `test`: first the gate against date-bound tests (`lint-times`), then install what the
//!   tests need, then formatting, lints and every test.
//! - `lint-times`: fail on a hard-coded 13-digit epoch time in test code unless its line is
//!   marked `// pure input: <why>` (see `lint_times.rs`).
//! - `plugins`: build every plugin in `plugins/` into a WebAssembly component under
//!   `plugins/target/components/`. Uses rustup's `wasm32-unknown-unknown` target when it is
//!   installed; otherwise Debian's `rustc-web` toolchain with `-Zbuild-std` (installed with apt
//!   when missing), because the std of that target cannot be downloaded for rustup here.
//! - `bench`: the benchmarks (release build): per-reading plugin cost, end-to-end gateway
//!   throughput and PUBACK latency, the spine to a local mosquitto next to a mosquitto bridge
//!   (latency, backlog drain rate against IoT Core's quotas), logins (the gateway's RSS through
//!   rounds of parallel wrong-password CONNECTs and 500 devices logging in and reconnecting at
//!   once), an outage, memory, edge rules (evaluation rate with 50 rules, and what they add
//!   to a reading's PUBACK), and the ward history (write cost, 24 h lookups).
//! - `bench --compare`: only the side-by-side comparison (`daemon/benches/compare.rs`, release
//!   build, plugins built first): the same device load (flat out, steady 1 000 readings/s from
//!   500 devices, a reconnect storm) through wardgate, a mosquitto bridge and a bare mosquitto,
//!   the load generator in its own process; ~11 min. Writes `target/bench/compare.json` and
//!   prints a Markdown table with wardgate's targets (PASS / MISS).
//! - `deb`: the Debian package `target/debian/wardgate_<version>_<arch>.deb`: builds the plugins
//!   and the release binary, then stages them with the man pages generated from `--help` and
//!   runs cargo-deb on `[package.metadata.deb]` (daemon/Cargo.toml); see `deb.rs`. Installs
//!   cargo-deb 3.x (`cargo install cargo-deb --locked`), dpkg-dev and binutils when missing.
//! - `deps`: only install what the tests need: Debian packages, cargo-deb, and the AWS IoT
//!   Device SDKs for Python in `target/py`.
//! - `torture [SCENARIO] [--quick]`: fault scenarios on the real release binary under load
//!   (`kill9`: kill -9 / restart cycles; `flap`: the upstream stopped and started every 5 s;
//!   `outage`: the upstream down past `queue.max_bytes`; `disk-full`: the state directory on a
//!   full 32 MiB tmpfs, root needed), each failing when an acknowledged
//!   reading is neither delivered upstream nor counted as evicted; all of them, or only
//!   SCENARIO; `--quick` shortens each. Writes `target/bench/torture.json` (see
//!   `daemon/benches/torture.rs`).
//! - `fuzz [TARGET] [--seconds N] [--cmin]`: the coverage-guided fuzz targets in `fuzz/`
//!   (cargo-fuzz, installed when missing), each (or only TARGET) for N seconds (default 60) on
//!   its corpus `fuzz/corpus/<target>`; fails naming the reproducer of any crash (see
//!   `fuzz.rs`).
//!
//! Each task installs what it needs itself (Debian packages via apt-get when missing), so a
//! fresh Debian 12 machine with a Rust toolchain needs nothing else.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

mod deb;
mod fuzz;
mod lint_times;

/// Debian packages the test suite uses: `systemd` (systemd-analyze, systemd-journald,
/// journalctl) and `util-linux` (unshare) for the journal and unit tests, `openssl` for the
/// ward-pki script test, `mosquitto` as the stand-in for AWS IoT Core; `gcc` and `python3-dev`
/// build the `cbor` package the Device Defender agent needs (it ships only as source). The
/// package tests (`tests/tests/deb.rs`) need [`DEB_PACKAGES`] to build the .deb, `lintian` to
/// check it, `debootstrap` to make the Debian 12 root they install it into, and `iproute2`
/// (`ip`) to bring up the loopback of the network namespace the installed gateway runs in.
const TEST_PACKAGES: &[&str] = &[
    "systemd",
    "util-linux",
    "openssl",
    "mosquitto",
    "python3",
    "python3-venv",
    "python3-dev",
    "gcc",
    "dpkg-dev",
    "binutils",
    "lintian",
    "debootstrap",
    "iproute2",
    // The console's pages are loaded in a real headless browser (tests/tests/console.rs).
    "chromium",
];

/// What cargo-deb runs: `dpkg-shlibdeps` (dpkg-dev) for the `$auto` dependencies, `strip`
/// (binutils) for the executable.
const DEB_PACKAGES: &[&str] = &["dpkg-dev", "binutils"];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "demo" => demo(&rest),
        "test" => test(),
        "lint-times" => lint_times(),
        "plugins" => plugins().map(|_| ()),
        "bench" => bench(&rest),
        "deb" => deb_package(),
        "deps" => install_packages(TEST_PACKAGES)
            .and_then(|()| cargo_deb())
            .and_then(|()| python_sdks()),
        "fuzz" => fuzz::fuzz(&rest),
        "torture" => torture(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 demo [ARGS]  run the gateway with a simulated ward (default: --speed 10 --duration 2m)\n  \
                 test         check test times, install test dependencies, then fmt, clippy and all tests\n  \
                 lint-times   fail on hard-coded epoch times in test code\n  \
                 plugins      build the WebAssembly plugins into components\n  \
                 bench [--compare]\n               build the plugins and run the benchmarks (release build);\n               --compare: only wardgate vs. a mosquitto bridge vs. a bare mosquitto, same load\n  \
                 deb          build the Debian package target/debian/wardgate_<version>_<arch>.deb\n  \
                 deps         install what the tests need (Debian packages, cargo-deb, the AWS IoT SDKs for Python)\n  \
                 torture [SCENARIO] [--quick]\n               kill -9, upstream flap, outage and disk-full runs of the release binary; fail on a lost reading\n  \
                 fuzz [TARGET] [--seconds N] [--cmin]\n               run the fuzz targets (default: all, 60 s each); fail on a crash"
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
    // `cargo xtask` runs this program with `cargo run`, which sets the package's variables
    // (CARGO_PKG_NAME=xtask, CARGO_MANIFEST_DIR, ...). Build scripts that watch them (ring's
    // does) would see them differ between a build started from a shell and one started here,
    // and rebuild, with everything above them, each time. Cargo sets them itself for what it
    // builds.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| {
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || matches!(
                    k,
                    "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
                )
        }) {
            c.env_remove(key);
        }
    }
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

/// The demo's local upstream: a mosquitto with TLS and required client certificates (as AWS
/// IoT Core requires), its certificates made with `packaging/pki/ward-pki`, and a
/// `mosquitto_sub` writing what arrives to `target/demo/upstream.log`.
struct LocalUpstream {
    broker: std::process::Child,
    subscriber: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for LocalUpstream {
    fn drop(&mut self) {
        let _ = self.subscriber.kill();
        let _ = self.broker.kill();
        let _ = self.subscriber.wait();
        let _ = self.broker.wait();
    }
}

fn local_upstream() -> Result<LocalUpstream> {
    install_packages(&["mosquitto", "mosquitto-clients", "openssl"])?;
    let dir = root().join("target/demo");
    let pki = dir.join("pki");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let script = root().join("packaging/pki/ward-pki");
    let pki_s = pki.to_string_lossy().to_string();
    for args in [
        vec!["init", &pki_s, "Demo upstream CA"],
        vec![
            "server",
            &pki_s,
            "localhost",
            "DNS:localhost",
            "IP:127.0.0.1",
        ],
        vec!["device", &pki_s, "ward-demo"],
        vec!["device", &pki_s, "cloud"],
    ] {
        let o = Command::new("sh").arg(&script).args(&args).output()?;
        if !o.status.success() {
            bail!("ward-pki {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("mosquitto.conf");
    let is_root = is_root();
    std::fs::write(
        &conf,
        format!(
            "{}per_listener_settings true\nlistener {port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/server.crt\nkeyfile {p}/server.key\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
            if is_root { "user root\n" } else { "" },
            p = pki.display()
        ),
    )?;
    let broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log"))?)
        .spawn()
        .context("starting mosquitto")?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let subscriber = Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            // Every stream: readings and alerts, shadow updates, defender reports.
            "-t",
            "wardgate/#",
            "-t",
            "$aws/things/+/shadow/#",
            "-t",
            "$aws/things/+/defender/#",
            "-v",
            "-q",
            "1",
        ])
        .arg("--cafile")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("devices/cloud.crt"))
        .arg("--key")
        .arg(pki.join("devices/cloud.key"))
        .stdout(std::fs::File::create(dir.join("upstream.log"))?)
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting mosquitto_sub")?;
    eprintln!("xtask: local upstream (mosquitto, mutual TLS) on localhost:{port}");
    Ok(LocalUpstream {
        broker,
        subscriber,
        port,
        dir,
    })
}

fn demo(args: &[String]) -> Result<()> {
    let components = plugins()?;
    run(cargo().args(["build", "--release", "-p", "wardgate"]))?;
    let upstream = local_upstream()?;
    let pki = upstream.dir.join("pki");
    let mut cmd = Command::new(root().join("target/release/wardgate"));
    cmd.arg("demo")
        .arg("--plugins")
        .arg(components)
        .arg("--upstream")
        .arg(format!("localhost:{}", upstream.port))
        .arg("--upstream-ca")
        .arg(pki.join("ca.crt"))
        .arg("--upstream-cert")
        .arg(pki.join("devices/ward-demo.crt"))
        .arg("--upstream-key")
        .arg(pki.join("devices/ward-demo.key"));
    if args.is_empty() {
        cmd.args(["--speed", "10", "--duration", "2m"]);
    } else {
        cmd.args(args);
    }
    let result = run(&mut cmd);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = upstream.dir.join("upstream.log");
    let messages = std::fs::read_to_string(&log).unwrap_or_default();
    let records = messages.matches("\"seq\":").count();
    eprintln!(
        "xtask: the local upstream received {} messages carrying {records} readings (see {})",
        messages.lines().count(),
        log.display()
    );
    drop(upstream);
    result
}

/// Fail when test code holds a hard-coded epoch time (see `lint_times.rs`).
fn lint_times() -> Result<()> {
    let findings = lint_times::scan(&root()).context("scanning test code for fixed times")?;
    if !findings.is_empty() {
        eprintln!("xtask: lint-times: {}", lint_times::report(&findings));
        bail!(
            "lint-times: {} hard-coded epoch time(s) in test code (listed above)",
            findings.len()
        );
    }
    eprintln!("xtask: lint-times: no hard-coded epoch times in test code");
    Ok(())
}

fn test() -> Result<()> {
    // Before anything is installed or built: a date-bound test fails here, by name and line.
    lint_times()?;
    install_packages(TEST_PACKAGES)?;
    cargo_deb()?;
    python_sdks()?;
    plugins()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The plugins' shared helpers are plain Rust: test them on the host too.
    run(cargo().args([
        "test",
        "--manifest-path",
        "plugins/Cargo.toml",
        "-p",
        "plugin-common",
    ]))?;
    if has_nextest() {
        run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))?;
    } else {
        eprintln!("xtask: cargo-nextest not found; using cargo test");
        run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    }
    Ok(())
}

/// The AWS IoT Device SDKs for Python the integration tests drive (pinned in
/// `tests/python/requirements.txt`), in the virtualenv `target/py`; remade when the
/// requirements change.
fn python_sdks() -> Result<()> {
    let venv = root().join("target/py");
    let requirements = root().join("tests/python/requirements.txt");
    let stamp = venv.join("requirements.installed");
    let wanted = std::fs::read(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    if std::fs::read(&stamp).is_ok_and(|had| had == wanted) {
        return Ok(());
    }
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    run(Command::new(python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check", "-r"])
        .arg(&requirements))?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// The benchmarks; with `--compare` only `compare` (wardgate next to a mosquitto bridge and a
/// bare mosquitto, `daemon/benches/compare.rs`), which the plain run leaves out.
fn bench(args: &[String]) -> Result<()> {
    let compare = match args {
        [] => false,
        [flag] if flag == "--compare" => true,
        _ => bail!("usage: cargo xtask bench [--compare]"),
    };
    let components = plugins()?;
    install_packages(&["mosquitto", "openssl"])?;
    let benches: &[&str] = if compare {
        &["compare"]
    } else {
        &[
            "plugin", "gateway", "spine", "logins", "outage", "memory", "rules", "defender",
            "history",
        ]
    };
    for bench in benches {
        run(cargo()
            .args(["bench", "-p", "wardgate", "--bench", bench])
            .env("WARDGATE_COMPONENTS", &components))?;
    }
    Ok(())
}

/// The torture runs (`daemon/benches/torture.rs`, release build): `args` are passed on
/// (scenario names, `--quick`).
fn torture(args: &[String]) -> Result<()> {
    let components = plugins()?;
    install_packages(&["mosquitto", "openssl"])?;
    run(cargo()
        .args(["bench", "-p", "wardgate", "--bench", "torture", "--"])
        .args(args)
        .env("WARDGATE_COMPONENTS", &components))
}

/// cargo-deb 3.x, installed with `cargo install --locked` when missing (or of another major
/// version), and the Debian packages it runs.
fn cargo_deb() -> Result<()> {
    install_packages(DEB_PACKAGES)?;
    match deb::cargo_deb_version() {
        Some(v) if v.starts_with("3.") => Ok(()),
        found => {
            eprintln!("xtask: installing cargo-deb 3.x (found {found:?})");
            run(cargo().args(["install", "cargo-deb", "--locked", "--version", "^3"]))
        }
    }
}

/// `cargo xtask deb`: the release package in `target/debian/`.
fn deb_package() -> Result<()> {
    cargo_deb()?;
    let components = plugins()?;
    run(cargo().args(["build", "--release", "-p", "wardgate"]))?;
    let root = root();
    let deb = deb::build(&deb::Inputs {
        root: &root,
        binary: &root.join("target/release/wardgate"),
        components: &components,
        stage: &root.join("target/deb-stage"),
        out_dir: &root.join("target/debian"),
        fast: false,
    })?;
    eprintln!("xtask: package {}", deb.display());
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

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
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
    let is_root = is_root();
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

/// Debian packages of the fallback plugin toolchain (rustc 1.96 with its std source, and the
/// linker `rust-lld` points to).
const WASM_TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "rust-web-llvm",
    "lld-22",
];
const WASM_TARGET: &str = "wasm32-unknown-unknown";

fn rustup_has_wasm_target() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == WASM_TARGET)
        })
        .unwrap_or(false)
}

/// Build every plugin crate and turn each core module into a component. Returns the directory
/// holding the deployable components (`plugins/target/components`; the `test-*` guests go to
/// `plugins/target/test-components`).
fn plugins() -> Result<PathBuf> {
    let dir = root().join("plugins");
    let mut cmd;
    if rustup_has_wasm_target() {
        cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--release", "--target", WASM_TARGET]);
    } else {
        install_packages(WASM_TOOLCHAIN_PACKAGES)?;
        let rustc = debian_binary("rustc-web", "/bin/rustc")?;
        let cargo_bin = debian_binary("cargo-web", "/bin/cargo")?;
        cmd = Command::new(cargo_bin);
        cmd.env("RUSTC", rustc)
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .args([
                "build",
                "--release",
                "--target",
                WASM_TARGET,
                "-Zbuild-std=std,panic_abort",
            ]);
    }
    cmd.current_dir(&dir);
    run(&mut cmd)?;

    let modules = dir.join("target").join(WASM_TARGET).join("release");
    // Deployable plugins and the misbehaving test guests go to separate directories, so a
    // plugin directory pointed at `components/` never loads a test guest.
    let out = dir.join("target").join("components");
    let test_out = dir.join("target").join("test-components");
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&test_out)?;
    let members = plugin_members(&dir.join("Cargo.toml"))?;
    for name in members.iter().filter(|m| *m != "common") {
        let module = modules.join(format!("{}.wasm", name.replace('-', "_")));
        let bytes = std::fs::read(&module)
            .with_context(|| format!("reading the built module {}", module.display()))?;
        let component = wit_component::ComponentEncoder::default()
            .module(&bytes)
            .with_context(|| format!("{name}: not a module wit-bindgen produced"))?
            .validate(true)
            .encode()
            .with_context(|| format!("{name}: cannot make a component"))?;
        let dest = if name.starts_with("test-") {
            &test_out
        } else {
            &out
        };
        let path = dest.join(format!("{name}.wasm"));
        std::fs::write(&path, &component)?;
        eprintln!(
            "xtask: component {} ({} bytes)",
            path.display(),
            component.len()
        );
    }
    Ok(out)
}

/// Where a Debian package installed `suffix` (e.g. `/bin/rustc`).
fn debian_binary(package: &str, suffix: &str) -> Result<PathBuf> {
    let o = Command::new("dpkg").args(["-L", package]).output()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.ends_with(suffix))
        .map(PathBuf::from)
        .with_context(|| format!("package {package} has no {suffix}"))
}

/// The `members` of the plugins workspace, by directory name.
fn plugin_members(manifest: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(manifest)?;
    let start = text
        .find("members = [")
        .context("plugins/Cargo.toml has no members list")?;
    let end = text[start..]
        .find(']')
        .context("unterminated members list")?
        + start;
    Ok(text[start + "members = [".len()..end]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect())
}
