//! The Debian package, checked as a ward machine meets it: its contents, its man pages, lintian,
//! the installed systemd unit, install / upgrade / remove / purge in a real Debian 12 root, the
//! example drop-ins, and the installed gateway starting and stopping as its service user.
//!
//! **What is packaged.** A release build takes about 11 minutes on the 2-core machines (more than
//! CI can spend on it), so these tests package the test build of the command line instead:
//! `wardgate-under-test` (the same `wardgate::cli::main` as `/usr/bin/wardgate`, dev profile,
//! with the integration tests' `fault-injection` feature, inert without `WG_FAULT`). It goes
//! through `xtask/src/deb.rs` (included below), the very code `cargo xtask deb` runs after its
//! release build: the same `[package.metadata.deb]`, the same staging, the same generated man
//! pages, plugins, conffiles, maintainer scripts and unit. What differs is only the executable's
//! build and the compression (`--fast`). What must stay true: nothing may be added to the
//! release package outside `deb::build` and the metadata, or these tests stop covering it.
//!
//! **Runs once per test run.** The package is built once per run (under a file lock, keyed by
//! nextest's run id, so the tests, each in its own process, share it) in
//! `target/tmp/deb-test/package/`.
//!
//! **The Debian 12 root.** `debootstrap --variant=minbase --include=adduser,systemd bookworm`
//! from `http://deb.debian.org/debian` (or `$WARDGATE_DEBIAN_MIRROR`): minbase plus the
//! package's one dependency that minbase lacks (adduser) and systemd, whose `systemd-analyze`
//! checks the installed unit against Debian 12's own units. It is cached as
//! `target/tmp/deb-test/bookworm-minbase-adduser-systemd.tar.gz` (delete it to refresh); each
//! test unpacks a fresh copy and deletes it afterwards, also when it fails. Nothing is mounted
//! in it (dpkg, adduser and systemd-analyze need no /proc), so the deletion cannot reach the
//! host.
//!
//! **Starting the service.** No systemd runs as PID 1 here. The tests create `/run/systemd/system`
//! in the root, so the maintainer scripts take the branch they take on a systemd machine, and
//! install a `policy-rc.d` that writes down each request and answers 101 (denied): starting is
//! skipped cleanly, and the record shows that install starts the unit, an upgrade restarts it
//! and a remove stops it.
//!
//! Needs root (debootstrap, chroot, unshare) and the tools `cargo xtask deps` installs:
//! cargo-deb 3.x, dpkg-dev, binutils, lintian, debootstrap, iproute2; and the plugin components
//! (`cargo xtask plugins`). Every check here fails when what it checks breaks: none is skipped
//! for a missing tool or privilege.

#[path = "../../xtask/src/deb.rs"]
mod deb;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_wardgate-under-test");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// debootstrap's packages beyond minbase; part of the cache's name.
const INCLUDE: &str = "adduser,systemd";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

fn scratch() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("deb-test")
}

fn describe(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run `cmd`, panic with its output unless it succeeds; its stdout.
fn ok(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed: {}", describe(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn is_root() -> bool {
    // /proc/self belongs to the process's effective user.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The package under test, built once per test run (see the module doc).
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let dir = scratch().join("package");
        fs::create_dir_all(&dir).unwrap();
        let lock = File::create(dir.join(".lock")).unwrap();
        lock.lock().unwrap();
        let run = std::env::var("NEXTEST_RUN_ID")
            .unwrap_or_else(|_| format!("pid-{}", std::process::id()));
        let stamp = dir.join("run");
        let out = dir.join("out");
        if fs::read_to_string(&stamp).is_ok_and(|s| s == run) {
            if let Some(deb) = fs::read_dir(&out).ok().and_then(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.extension().is_some_and(|x| x == "deb"))
            }) {
                return deb;
            }
        }
        let _ = fs::remove_dir_all(&out);
        let started = Instant::now();
        let root = workspace();
        let deb = deb::build(&deb::Inputs {
            root: &root,
            binary: Path::new(BIN),
            components: &root.join("plugins/target/components"),
            stage: &dir.join("stage"),
            out_dir: &out,
            fast: true,
        })
        .unwrap_or_else(|e| panic!("building the package: {e:#}"));
        let _ = fs::remove_dir_all(dir.join("stage"));
        fs::write(&stamp, &run).unwrap();
        eprintln!(
            "deb-test: built {} in {:.1} s",
            deb.display(),
            started.elapsed().as_secs_f64()
        );
        deb
    })
}

/// The package's files, unpacked (`dpkg-deb -x`) into a temporary directory.
fn unpacked() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-x")
        .arg(package())
        .arg(dir.path()));
    dir
}

/// Paths of the regular files in the package with their modes, from `dpkg-deb -c`.
fn listing() -> BTreeSet<(String, String)> {
    let out = ok(Command::new("dpkg-deb").arg("-c").arg(package()));
    out.lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(fields[1], "0/0", "not owned by root: {l}");
            (
                fields[5].trim_start_matches('.').to_owned(),
                fields[0].to_owned(),
            )
        })
        .collect()
}

fn names_in(dir: &Path, ext: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    names.sort();
    names
}

#[test]
fn package_ships_exactly_these_files() {
    let ws = workspace();
    let components = ws.join("plugins/target/components");
    let plugins = names_in(&components, ".wasm");
    assert!(!plugins.is_empty(), "run `cargo xtask plugins` first");
    let examples = names_in(&ws.join("packaging/examples/conf.d"), ".toml");
    assert!(
        examples.len() >= 2,
        "rules and profile examples: {examples:?}"
    );

    let exe = "-rwxr-xr-x";
    let file = "-rw-r--r--";
    let mut expected: BTreeSet<(String, String)> = [
        ("/usr/bin/wardgate", exe),
        ("/usr/bin/ward-pki", exe),
        ("/etc/wardgate/wardgate.toml", file),
        ("/etc/wardgate/conf.d/README", file),
        ("/usr/lib/systemd/system/wardgate.service", file),
        ("/usr/share/man/man8/wardgate.8.gz", file),
        ("/usr/share/man/man8/ward-pki.8.gz", file),
        ("/usr/share/doc/wardgate/copyright", file),
        ("/usr/share/doc/wardgate/changelog.Debian.gz", file),
        ("/usr/share/doc/wardgate/examples/expand_batch.py", file),
        ("/usr/share/lintian/overrides/wardgate", file),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_owned(), m.to_owned()))
    .collect();
    expected.extend(
        plugins
            .iter()
            .map(|p| (format!("/usr/lib/wardgate/plugins/{p}"), file.to_owned())),
    );
    expected.extend(examples.iter().map(|e| {
        (
            format!("/usr/share/doc/wardgate/examples/{e}"),
            file.to_owned(),
        )
    }));
    assert_eq!(listing(), expected, "the package's files and modes");

    // Shipped as they are in the source tree.
    let dir = unpacked();
    let root = dir.path();
    let same = |installed: &str, source: &Path| {
        assert!(
            fs::read(root.join(installed.trim_start_matches('/'))).unwrap()
                == fs::read(source).unwrap(),
            "{installed} differs from {}",
            source.display()
        );
    };
    same(
        "/etc/wardgate/wardgate.toml",
        &ws.join("config/wardgate.toml"),
    );
    same(
        "/usr/lib/systemd/system/wardgate.service",
        &ws.join("packaging/systemd/wardgate.service"),
    );
    same("/usr/bin/ward-pki", &ws.join("packaging/pki/ward-pki"));
    same(
        "/etc/wardgate/conf.d/README",
        &ws.join("packaging/debian/conf.d-README"),
    );
    same(
        "/usr/share/doc/wardgate/copyright",
        &ws.join("packaging/debian/copyright"),
    );
    for p in &plugins {
        same(
            &format!("/usr/lib/wardgate/plugins/{p}"),
            &components.join(p),
        );
    }
    for e in &examples {
        same(
            &format!("/usr/share/doc/wardgate/examples/{e}"),
            &ws.join("packaging/examples/conf.d").join(e),
        );
    }
    let changelog = ok(Command::new("gzip")
        .arg("-dc")
        .arg(root.join("usr/share/doc/wardgate/changelog.Debian.gz")));
    assert_eq!(
        changelog,
        fs::read_to_string(ws.join("packaging/debian/changelog")).unwrap()
    );

    // The executable: stripped, and it runs.
    let exe_path = root.join("usr/bin/wardgate");
    let sections = ok(Command::new("readelf").arg("-S").arg(&exe_path));
    for s in [".symtab", ".debug_info"] {
        assert!(
            !sections.contains(s),
            "/usr/bin/wardgate has {s}: not stripped"
        );
    }
    let version = ok(Command::new(&exe_path).arg("--version"));
    assert_eq!(version.trim(), format!("wardgate {VERSION}"));

    // Control fields and conffiles.
    let field = |name: &str| {
        ok(Command::new("dpkg-deb").arg("-f").arg(package()).arg(name))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "wardgate");
    assert_eq!(field("Version"), format!("{VERSION}-1"));
    let depends = field("Depends");
    for d in ["adduser", "libc6"] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("--info")
        .arg(package())
        .arg("conffiles"));
    let conffiles: BTreeSet<&str> = conffiles.lines().map(str::trim).collect();
    assert_eq!(
        conffiles,
        BTreeSet::from(["/etc/wardgate/conf.d/README", "/etc/wardgate/wardgate.toml"])
    );
    let name = package()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(&format!("wardgate_{VERSION}-1_")) && name.ends_with(".deb"),
        "{name}"
    );
}

/// The subcommands a clap help text lists (its `Commands:` section, without `help`), with their
/// one-line descriptions.
fn listed_commands(help: &str) -> Vec<(String, String)> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let l = l.trim();
            let (name, about) = l.split_once("  ")?;
            Some((name.to_owned(), about.trim().to_owned()))
        })
        .filter(|(name, _)| name != "help")
        .collect()
}

fn roff_escaped(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

fn man_page(root: &Path, name: &str) -> String {
    ok(Command::new("gzip")
        .arg("-dc")
        .arg(root.join(format!("usr/share/man/man8/{name}.8.gz"))))
}

#[test]
fn man_pages_cover_every_subcommand_and_option() {
    let dir = unpacked();
    let root = dir.path();
    let exe = root.join("usr/bin/wardgate");
    let help = |args: &[&str]| ok(Command::new(&exe).arg0("wardgate").args(args).arg("--help"));
    let page = man_page(root, "wardgate");
    assert!(page.contains(".TH WARDGATE 8 "), "{page}");
    assert!(page.contains(&format!("wardgate {VERSION}")));

    let mut checked = 0;
    let mut pending: Vec<Vec<String>> = listed_commands(&help(&[]))
        .into_iter()
        .map(|(name, about)| {
            assert!(
                page.contains(&roff_escaped(&about)),
                "wardgate(8) lacks the description of `{name}`: {about}"
            );
            vec![name]
        })
        .collect();
    assert!(pending.len() >= 8, "few subcommands: {pending:?}");
    while let Some(path) = pending.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        let heading = format!(".SS \"wardgate {}\"", roff_escaped(&path.join(" ")));
        assert!(page.contains(&heading), "wardgate(8) lacks {heading}");
        for option in text
            .split_whitespace()
            .filter(|w| w.starts_with("--"))
            .map(|w| w.trim_end_matches(','))
        {
            assert!(
                page.contains(&roff_escaped(option)),
                "wardgate(8) lacks `{option}` of `wardgate {}`",
                path.join(" ")
            );
        }
        for (child, _) in listed_commands(&text) {
            let mut p = path.clone();
            p.push(child);
            pending.push(p);
        }
        checked += 1;
    }
    eprintln!("deb-test: wardgate(8) covers {checked} subcommands");

    let pki_help = ok(Command::new("sh")
        .arg(root.join("usr/bin/ward-pki"))
        .arg("--help"));
    let pki_page = man_page(root, "ward-pki");
    let commands = listed_commands(&pki_help);
    assert_eq!(commands.len(), 5, "{pki_help}");
    for (command, about) in commands {
        assert!(
            pki_page.contains(&format!(".TP\n\\fB{}\\fR", roff_escaped(&command))),
            "ward-pki(8) lacks `{command}`"
        );
        assert!(pki_page.contains(&roff_escaped(&about)));
    }
}

#[test]
fn lintian_reports_no_errors_or_warnings() {
    let o = Command::new("lintian")
        // Not --show-overrides: with it, lintian fails on the overridden tags it shows.
        .args(["--fail-on", "error,warning", "--tag-display-limit", "0"])
        .arg(package())
        .output()
        .expect("lintian is installed (cargo xtask deps)");
    let text = String::from_utf8_lossy(&o.stdout);
    eprintln!("deb-test: lintian:\n{text}");
    assert!(o.status.success(), "lintian: {}", describe(&o));
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "{text}"
    );
}

#[test]
fn copyright_changelog_and_overrides_stay_in_step() {
    let ws = workspace();
    let manifest: toml::Table = fs::read_to_string(ws.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let license = manifest["workspace"]["package"]["license"]
        .as_str()
        .unwrap();
    let copyright = fs::read_to_string(ws.join("packaging/debian/copyright")).unwrap();
    assert!(copyright.starts_with(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    ));
    let files = copyright
        .split("\n\n")
        .find(|p| p.starts_with("Files: *"))
        .expect("a Files: * paragraph");
    assert!(
        files.lines().any(|l| l == format!("License: {license}")),
        "copyright's Files: * is not under the workspace license {license}"
    );
    assert!(
        copyright.contains(&format!("\n\nLicense: {license}\n")),
        "copyright has no stand-alone License: {license} paragraph"
    );

    let changelog = fs::read_to_string(ws.join("packaging/debian/changelog")).unwrap();
    let top = changelog.lines().next().unwrap();
    assert!(
        top.starts_with(&format!("wardgate ({VERSION}-1) ")),
        "packaging/debian/changelog's latest entry is `{top}`: add one for {VERSION}-1"
    );

    // Every override says why, in a comment right above it.
    let overrides = fs::read_to_string(ws.join("packaging/debian/lintian-overrides")).unwrap();
    let lines: Vec<&str> = overrides.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("wardgate:") {
            assert!(
                i > 0 && lines[i - 1].starts_with('#'),
                "lintian override without its reason above it: {line}"
            );
        }
    }
}

/// A Debian 12 root (see the module doc), deleted when dropped.
struct DebianRoot {
    dir: PathBuf,
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        // Never delete through a mount point: check that nothing is mounted inside.
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.to_string_lossy().into_owned();
        if mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .any(|m| m.starts_with(&prefix))
        {
            eprintln!("deb-test: something is mounted in {prefix}; not deleting it");
            return;
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The cached debootstrap tarball, made when missing.
fn root_tarball() -> PathBuf {
    let dir = scratch();
    fs::create_dir_all(&dir).unwrap();
    let tarball = dir.join(format!(
        "bookworm-minbase-{}.tar.gz",
        INCLUDE.replace(',', "-")
    ));
    let lock = File::create(dir.join(".root.lock")).unwrap();
    lock.lock().unwrap();
    // Roots of test processes that were killed (a timeout) before they could delete theirs: no
    // test holds one for an hour.
    for entry in fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()) {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 3600));
        if stale && entry.file_name().to_string_lossy().starts_with("root-") {
            drop(DebianRoot { dir: entry.path() });
        }
    }
    if tarball.is_file() {
        return tarball;
    }
    let partial = dir.join("debootstrap.partial");
    let _ = fs::remove_dir_all(&partial);
    let mirror = std::env::var("WARDGATE_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let started = Instant::now();
    ok(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            "bookworm",
        ])
        .arg(&partial)
        .arg(&mirror));
    let debootstrap = started.elapsed();
    let tmp = tarball.with_extension("partial");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&partial)
        .arg("-czf")
        .arg(&tmp)
        .arg("."));
    fs::rename(&tmp, &tarball).unwrap();
    let _ = fs::remove_dir_all(&partial);
    eprintln!(
        "deb-test: debootstrap took {:.1} s, the cache {:.1} s more ({})",
        debootstrap.as_secs_f64(),
        (started.elapsed() - debootstrap).as_secs_f64(),
        tarball.display()
    );
    tarball
}

impl DebianRoot {
    /// A fresh copy of the cached root, made ready for the package (see the module doc).
    fn new() -> DebianRoot {
        assert!(
            is_root(),
            "the package tests need root (debootstrap, chroot); run them as root"
        );
        let tarball = root_tarball();
        let started = Instant::now();
        let root = DebianRoot {
            dir: tempfile::Builder::new()
                .prefix("root-")
                .tempdir_in(scratch())
                .unwrap()
                .keep(),
        };
        ok(Command::new("tar")
            .arg("-C")
            .arg(&root.dir)
            // --touch: the root's own time is now (the clean-up of stale roots relies on it).
            .args(["--touch", "-xzf"])
            .arg(&tarball));
        fs::create_dir_all(root.path("/run/systemd/system")).unwrap();
        let policy = root.path("/usr/sbin/policy-rc.d");
        fs::write(
            &policy,
            "#!/bin/sh\n# deb-test: write down the request, deny it.\necho \"$*\" >> /var/log/policy-rc.d.log\nexit 101\n",
        )
        .unwrap();
        fs::set_permissions(&policy, fs::Permissions::from_mode(0o755)).unwrap();
        eprintln!(
            "deb-test: root unpacked in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        root
    }

    /// `path` inside the root.
    fn path(&self, path: &str) -> PathBuf {
        self.dir.join(path.trim_start_matches('/'))
    }

    /// A command run inside the root (`chroot`, a clean environment); `user` runs it as that
    /// user and group.
    fn command(&self, user: Option<&str>, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        if let Some(user) = user {
            c.arg(format!("--userspec={user}:{user}"));
        }
        c.arg(&self.dir)
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8");
        c
    }

    fn run(&self, args: &[&str]) -> String {
        ok(&mut self.command(None, args))
    }

    /// Copy `deb` into the root's /tmp and `dpkg -i` it with `options`.
    fn install(&self, deb: &Path, options: &[&str]) {
        let name = deb.file_name().unwrap().to_string_lossy().into_owned();
        fs::copy(deb, self.path(&format!("/tmp/{name}"))).unwrap();
        let target = format!("/tmp/{name}");
        let mut args = vec!["dpkg", "-i"];
        args.extend_from_slice(options);
        args.push(&target);
        self.run(&args);
    }

    /// dpkg's status and version of wardgate, or `None` when dpkg knows nothing of it.
    fn status(&self) -> Option<String> {
        let o = self
            .command(
                None,
                &["dpkg-query", "-W", "-f=${Status} ${Version}", "wardgate"],
            )
            .output()
            .unwrap();
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// What the maintainer scripts asked policy-rc.d for, in order.
    fn service_requests(&self) -> Vec<String> {
        fs::read_to_string(self.path("/var/log/policy-rc.d.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The `wardgate` entry of the root's passwd, split in fields.
    fn passwd(&self) -> Option<Vec<String>> {
        fs::read_to_string(self.path("/etc/passwd"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("wardgate:"))
            .map(|l| l.split(':').map(str::to_owned).collect())
    }

    /// `wardgate check-config` as the service user, as ExecStartPre runs it.
    fn check_config(&self) -> String {
        ok(&mut self.command(Some("wardgate"), &["/usr/bin/wardgate", "check-config"]))
    }
}

fn mode_and_owner(path: &Path) -> (u32, u32, u32) {
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// A copy of `deb` with version `version` whose shipped wardgate.toml has one more line
/// (`marker`): the "previous build" bumped, so the upgrade also meets a changed conffile.
fn bumped(deb: &Path, version: &str, marker: &str, dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    ok(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&control, text).unwrap();
    let conf = tree.join("etc/wardgate/wardgate.toml");
    let mut shipped = fs::read_to_string(&conf).unwrap();
    shipped.push_str(&format!("{marker}\n"));
    fs::write(&conf, shipped).unwrap();
    // cargo-deb writes no md5sums; if it ever does, they must describe the edited file.
    let md5sums = tree.join("DEBIAN/md5sums");
    if md5sums.exists() {
        let sums = ok(Command::new("sh").current_dir(&tree).args([
            "-c",
            "find . -path ./DEBIAN -prune -o -type f -printf '%P\\0' | sort -z | xargs -0 md5sum",
        ]));
        fs::write(&md5sums, sums).unwrap();
    }
    let out = dir.join(format!("wardgate_{version}_bumped.deb"));
    ok(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&out));
    out
}

#[test]
fn installs_upgrades_removes_and_purges_in_a_debian_12_root() {
    let deb = package();
    let root = DebianRoot::new();
    let started = Instant::now();

    // Install.
    root.install(deb, &[]);
    let status = root.status().expect("dpkg knows wardgate");
    assert_eq!(status, format!("install ok installed {VERSION}-1"));
    let user = root.passwd().expect("postinst made the user wardgate");
    let (uid, gid): (u32, u32) = (user[2].parse().unwrap(), user[3].parse().unwrap());
    assert!(uid < 1000, "not a system user: {user:?}");
    assert_eq!(user[5], "/var/lib/wardgate", "home: {user:?}");
    assert_eq!(user[6], "/usr/sbin/nologin", "shell: {user:?}");
    let group = fs::read_to_string(root.path("/etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.starts_with(&format!("wardgate:x:{gid}:"))),
        "no group wardgate with gid {gid}"
    );
    for dir in ["/var/lib/wardgate", "/var/lib/wardgate/plugins"] {
        assert_eq!(mode_and_owner(&root.path(dir)), (0o750, uid, gid), "{dir}");
    }
    assert_eq!(
        mode_and_owner(&root.path("/etc/wardgate")),
        (0o750, 0, gid),
        "/etc/wardgate: root:wardgate 0750"
    );
    let wants = root.path("/etc/systemd/system/multi-user.target.wants/wardgate.service");
    let link = fs::read_link(&wants).expect("the unit is enabled (multi-user.target.wants)");
    assert!(
        link.ends_with("systemd/system/wardgate.service")
            && root.path(&link.to_string_lossy()).is_file(),
        "the wants link points to {}",
        link.display()
    );
    assert_eq!(root.service_requests(), ["wardgate.service start"]);
    let checked = root.check_config();
    assert!(
        checked.contains("configuration is valid")
            && checked.contains("/etc/wardgate/wardgate.toml"),
        "{checked}"
    );

    // Local state and a local edit of the configuration, then the upgrade.
    fs::write(root.path("/var/lib/wardgate/state-marker"), "kept").unwrap();
    fs::write(
        root.path("/var/lib/wardgate/plugins/local.wasm"),
        "dropped in",
    )
    .unwrap();
    let conf = root.path("/etc/wardgate/wardgate.toml");
    let mut edited = fs::read_to_string(&conf).unwrap();
    edited.push_str("# edited on this ward: keep me\n");
    fs::write(&conf, &edited).unwrap();
    let work = tempfile::tempdir().unwrap();
    let next = format!("{VERSION}-1+upgradetest1");
    let upgrade = bumped(deb, &next, "# shipped by the upgrade", work.path());
    root.install(&upgrade, &["--force-confdef", "--force-confold"]);
    assert_eq!(
        root.status().unwrap(),
        format!("install ok installed {next}")
    );
    assert_eq!(
        fs::read_to_string(&conf).unwrap(),
        edited,
        "the upgrade replaced the locally edited conffile"
    );
    let dist = fs::read_to_string(root.path("/etc/wardgate/wardgate.toml.dpkg-dist"))
        .expect("the upgrade's version waits beside it as .dpkg-dist");
    assert!(dist.ends_with("# shipped by the upgrade\n"));
    assert_eq!(
        root.service_requests().last().map(String::as_str),
        Some("wardgate.service restart"),
        "an upgrade restarts the unit"
    );
    assert!(root.check_config().contains("configuration is valid"));
    assert_eq!(
        fs::read_to_string(root.path("/var/lib/wardgate/state-marker")).unwrap(),
        "kept"
    );

    // Remove: the program goes, state and configuration stay.
    root.run(&["dpkg", "--remove", "wardgate"]);
    assert_eq!(
        root.status().unwrap(),
        format!("deinstall ok config-files {next}")
    );
    assert_eq!(
        root.service_requests().last().map(String::as_str),
        Some("wardgate.service stop"),
        "a remove stops the unit"
    );
    for gone in [
        "/usr/bin/wardgate",
        "/usr/bin/ward-pki",
        "/usr/lib/wardgate",
    ] {
        assert!(!root.path(gone).exists(), "{gone} is left after remove");
    }
    assert_eq!(
        fs::read_to_string(root.path("/var/lib/wardgate/state-marker")).unwrap(),
        "kept",
        "remove must keep the state"
    );
    assert!(root.path("/var/lib/wardgate/plugins/local.wasm").is_file());
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);

    // Purge: state and configuration go; the system user stays (see packaging/debian/postrm).
    root.run(&["dpkg", "--purge", "wardgate"]);
    assert_eq!(root.status(), None, "dpkg still knows wardgate after purge");
    for gone in ["/var/lib/wardgate", "/etc/wardgate", "/usr/lib/wardgate"] {
        assert!(!root.path(gone).exists(), "{gone} is left after purge");
    }
    let leftovers = ok(Command::new("find")
        .arg(root.path("/etc/systemd"))
        .arg(root.path("/var/lib/systemd"))
        .args(["-name", "*wardgate*"]));
    assert!(
        leftovers.trim().is_empty(),
        "systemd links left: {leftovers}"
    );
    // dpkg-statoverride --list exits 1 when it has nothing to list.
    let o = root
        .command(None, &["dpkg-statoverride", "--list", "/etc/wardgate"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "statoverride left: {}",
        describe(&o)
    );
    assert!(
        root.passwd().is_some(),
        "the system user is kept on purge, as Debian does"
    );
    eprintln!(
        "deb-test: install, upgrade, remove and purge took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// `systemd-analyze security --offline=true` on the installed unit: the exposure figure.
fn exposure(root: &DebianRoot) -> f64 {
    let text = root.run(&[
        "systemd-analyze",
        "security",
        "--offline=true",
        "--no-pager",
        "wardgate.service",
    ]);
    text.lines()
        .find_map(|l| {
            l.split("Overall exposure level for wardgate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure in: {text}"))
}

fn verify(root: &DebianRoot) {
    let o = root
        .command(
            None,
            &["systemd-analyze", "verify", "--man=no", "wardgate.service"],
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "verify failed: {}", describe(&o));
    assert!(
        !stderr.contains("wardgate"),
        "verify complained about the unit: {stderr}"
    );
}

#[test]
fn installed_unit_passes_systemd_analyze() {
    let root = DebianRoot::new();
    root.install(package(), &[]);
    verify(&root);
    let score = exposure(&root);
    eprintln!(
        "deb-test: installed unit's exposure (systemd-analyze security --offline=true): {score}"
    );
    assert!(score <= 2.0, "exposure {score} > 2.0");
    let unit = fs::read_to_string(root.path("/usr/lib/systemd/system/wardgate.service")).unwrap();
    assert!(unit.contains("\nExecReload=/usr/bin/wardgate reload\n"));
    assert!(
        unit.contains("\nCapabilityBoundingSet=\n"),
        "no capability by default"
    );

    // The unit's documented drop-in for a port below 1024, exactly as its comment writes it.
    let dropin: String = unit
        .lines()
        .skip_while(|l| *l != "#   [Service]")
        .take_while(|l| l.starts_with("#   "))
        .map(|l| format!("{}\n", &l["#   ".len()..]))
        .collect();
    assert!(
        dropin.contains("CAP_NET_BIND_SERVICE"),
        "the unit no longer documents the low-port drop-in: {dropin:?}"
    );
    let dir = root.path("/etc/systemd/system/wardgate.service.d");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("low-port.conf"), &dropin).unwrap();
    verify(&root);
    let with_dropin = exposure(&root);
    eprintln!("deb-test: exposure with the documented CAP_NET_BIND_SERVICE drop-in: {with_dropin}");
    assert!(
        with_dropin > score,
        "the drop-in changed nothing: is it read?"
    );
    assert!(
        with_dropin <= 2.0,
        "exposure with the drop-in {with_dropin} > 2.0"
    );
}

#[test]
fn example_drop_ins_are_valid_with_the_installed_binary() {
    let root = DebianRoot::new();
    root.install(package(), &[]);
    let examples = names_in(&root.path("/usr/share/doc/wardgate/examples"), ".toml");
    assert!(!examples.is_empty());
    for e in &examples {
        fs::copy(
            root.path(&format!("/usr/share/doc/wardgate/examples/{e}")),
            root.path(&format!("/etc/wardgate/conf.d/{e}")),
        )
        .unwrap();
    }
    let checked = root.check_config();
    for e in &examples {
        assert!(
            checked.contains(&format!("/etc/wardgate/conf.d/{e}")),
            "{e} was not read: {checked}"
        );
    }
    assert!(
        !checked.contains("conf.d/README"),
        "the loader read conf.d/README: {checked}"
    );
    // And each is really taken in: a broken copy of one is an error naming it.
    let first = &examples[0];
    let path = root.path(&format!("/etc/wardgate/conf.d/{first}"));
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("\n[no_such_section]\nkey = 1\n");
    fs::write(&path, text).unwrap();
    let o = root
        .command(Some("wardgate"), &["/usr/bin/wardgate", "check-config"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains(first.as_str()));
}

/// The gateway started by the test; killed if the test ends before it stops.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn installed_gateway_runs_as_the_service_user() {
    let root = DebianRoot::new();
    root.install(package(), &[]);
    // As ExecStart runs it: the installed configuration unchanged, user wardgate. In a network
    // namespace of its own (loopback only), so its fixed ports (1883, 9883, 18830) cannot meet
    // anything else on this machine. unshare, sh and chroot each exec the next: the child is
    // the gateway itself.
    let mut child = Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec chroot --userspec=wardgate:wardgate \"$0\" /usr/bin/wardgate run",
        ])
        .arg(&root.dir)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) runs");
    let stderr = child.stderr.take().unwrap();
    let gateway = Running(child);
    let (lines, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(90);
    while !seen.iter().any(|l: &String| l.contains("wardgate ready")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "the installed gateway did not get ready:\n{}",
                seen.join("\n")
            ),
        }
    }
    let components = workspace().join("plugins/target/components");
    for plugin in names_in(&components, ".wasm") {
        let name = plugin.trim_end_matches(".wasm");
        assert!(
            seen.iter()
                .any(|l| l.contains("plugin loaded") && l.contains(&format!("plugin={name} "))),
            "the shipped plugin {name} was not loaded:\n{}",
            seen.join("\n")
        );
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gateway.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut gateway = gateway;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    seen.extend(log.try_iter());
    assert!(status.success(), "{status}:\n{}", seen.join("\n"));
    assert!(
        seen.iter().any(|l| l.contains("wardgate stopped")),
        "{}",
        seen.join("\n")
    );
    let uid = root.passwd().unwrap()[2].parse::<u32>().unwrap();
    let status_file = root.path("/var/lib/wardgate/status.json");
    assert_eq!(
        fs::metadata(&status_file)
            .unwrap_or_else(|e| panic!("{}: {e}", status_file.display()))
            .uid(),
        uid,
        "the state is written by the service user"
    );
}
