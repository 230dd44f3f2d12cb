//! Building the `.deb`, shared by `cargo xtask deb` (the release package) and the package tests
//! (`tests/tests/deb.rs` includes this file with `#[path]` and packages the test build).
//!
//! [`build`] stages every *built* file in one directory: the `wardgate` executable it is given,
//! the plugin components, and the man pages `wardgate(8)` and `ward-pki(8)`, generated from
//! `wardgate --help` (every subcommand's too) and `ward-pki --help`. It then runs
//! `cargo deb --no-build` with that directory as cargo's target directory (`CARGO_TARGET_DIR`),
//! so `target/release/...` in `[package.metadata.deb]` (daemon/Cargo.toml) means the stage;
//! every other file comes from the source tree through the same metadata.
//!
//! What must stay true:
//! - the executable is the only input that differs between the release package and the tested
//!   one (plus the compression level): file list, modes, conffiles, maintainer scripts and unit
//!   come from the same metadata and the same staging, here;
//! - the man pages are made from the `--help` of the executable being packaged, so they cannot
//!   fall behind the command line;
//! - only `std` and `anyhow` are used: both crates that compile this file depend on them, and
//!   every item is used by both (dead code would fail clippy in one of them).

use anyhow::{bail, ensure, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to package.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The workspace root.
    pub root: &'a Path,
    /// The `wardgate` executable to ship as `/usr/bin/wardgate`.
    pub binary: &'a Path,
    /// The directory of built plugin components (`*.wasm`; `cargo xtask plugins` makes
    /// `plugins/target/components`).
    pub components: &'a Path,
    /// A scratch directory for the staged files; emptied first.
    pub stage: &'a Path,
    /// Where the `.deb` is written (made if missing).
    pub out_dir: &'a Path,
    /// Lighter compression (`cargo deb --fast`): the same contents, made quicker.
    pub fast: bool,
}

/// `cargo deb --version`'s version (`3.8.0`), or `None` when cargo-deb is not installed.
pub fn cargo_deb_version() -> Option<String> {
    let o = cargo().args(["deb", "--version"]).output().ok()?;
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

/// Stage the built files, make the man pages and run cargo-deb. Returns the `.deb`'s path,
/// `<out_dir>/wardgate_<version>_<arch>.deb`.
pub fn build(inputs: &Inputs) -> Result<PathBuf> {
    match cargo_deb_version() {
        Some(v) if v.starts_with("3.") => {}
        other => bail!(
            "cargo-deb 3.x is needed (found {other:?}); `cargo xtask deps` installs it \
             (cargo install cargo-deb --locked)"
        ),
    }
    let release = inputs.stage.join("release");
    if inputs.stage.exists() {
        std::fs::remove_dir_all(inputs.stage)
            .with_context(|| format!("emptying {}", inputs.stage.display()))?;
    }
    let man = release.join("man");
    let plugins = release.join("plugins");
    for dir in [&man, &plugins, &inputs.out_dir.to_path_buf()] {
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    }

    let binary = release.join("wardgate");
    std::fs::copy(inputs.binary, &binary)
        .with_context(|| format!("copying {}", inputs.binary.display()))?;

    let mut shipped = 0;
    for entry in std::fs::read_dir(inputs.components).with_context(|| {
        format!(
            "reading {} (run `cargo xtask plugins`)",
            inputs.components.display()
        )
    })? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            std::fs::copy(&path, plugins.join(path.file_name().expect("a file name")))?;
            shipped += 1;
        }
    }
    ensure!(
        shipped > 0,
        "no plugin components in {} (run `cargo xtask plugins`)",
        inputs.components.display()
    );

    let version = command_output(wardgate(&binary).arg("--version"))?;
    let version = version.trim().to_owned();
    let wardgate_page = wardgate_man_page(&binary, &version)?;
    let pki = inputs.root.join("packaging/pki/ward-pki");
    let pki_help = command_output(Command::new("sh").arg(&pki).arg("--help"))?;
    let pki_page = ward_pki_man_page(&pki_help, &version);
    for (name, page) in [("wardgate.8", wardgate_page), ("ward-pki.8", pki_page)] {
        let path = man.join(name);
        std::fs::write(&path, page)?;
        // -n: no name or time stamp inside, so the same page gives the same bytes.
        run_quiet(Command::new("gzip").args(["-9nf"]).arg(&path))?;
    }

    let mut deb = cargo();
    deb.args(["deb", "-p", "wardgate", "--no-build", "--output"])
        .arg(format!("{}/", inputs.out_dir.display()))
        .env("CARGO_TARGET_DIR", inputs.stage);
    if inputs.fast {
        deb.arg("--fast");
    }
    let out = command_output(&mut deb)?;
    let path = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no .deb path: {out}"))?;
    ensure!(
        path.is_file(),
        "cargo deb reported {} but it is not there",
        path.display()
    );
    Ok(path)
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The packaged executable, run under the name it is installed as (clap prints it in `Usage:`).
fn wardgate(binary: &Path) -> Command {
    let mut c = Command::new(binary);
    c.arg0("wardgate");
    c
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8(o.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    command_output(cmd).map(|_| ())
}

/// One help text as clap prints it: paragraphs, `Usage:`, sections of items, closing paragraphs.
#[derive(Debug, Default)]
struct Help {
    about: Vec<String>,
    usage: Vec<String>,
    sections: Vec<Section>,
    after: Vec<String>,
}

#[derive(Debug)]
struct Section {
    title: String,
    items: Vec<Item>,
}

#[derive(Debug)]
struct Item {
    term: String,
    paragraphs: Vec<String>,
}

impl Help {
    fn section(&self, title: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.title == title)
    }
}

/// Parse clap's help layout (also `ward-pki --help`, written to match it): both the one-line
/// items (`  -c, --config <FILE>  Main ...`) and the long-help items whose description follows
/// on deeper-indented lines, paragraphs separated by blank lines.
fn parse_help(text: &str) -> Help {
    #[derive(PartialEq)]
    enum At {
        About,
        Usage,
        Sections,
    }
    let mut help = Help::default();
    let mut at = At::About;
    let mut para = String::new();
    let mut gap = false;
    let flush = |para: &mut String, help: &mut Help, at: &At| {
        if !para.is_empty() {
            let p = std::mem::take(para);
            if *at == At::About {
                help.about.push(p);
            } else {
                help.after.push(p);
            }
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut para, &mut help, &at);
            gap = true;
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(rest) = line.strip_prefix("Usage: ") {
            flush(&mut para, &mut help, &at);
            at = At::Usage;
            help.usage.push(rest.trim().to_owned());
        } else if indent == 0
            && trimmed.ends_with(':')
            && trimmed[..trimmed.len() - 1]
                .chars()
                .all(|c| c.is_ascii_alphabetic() || c == ' ')
        {
            flush(&mut para, &mut help, &at);
            at = At::Sections;
            help.sections.push(Section {
                title: trimmed[..trimmed.len() - 1].to_owned(),
                items: Vec::new(),
            });
        } else if at == At::Usage && indent > 0 {
            help.usage.push(trimmed.to_owned());
        } else if at == At::Sections && indent > 0 && help.after.is_empty() && para.is_empty() {
            let section = help.sections.last_mut().expect("in a section");
            // Items start at column 2 (6 for a long-only option, aligned under the short ones);
            // long-help descriptions continue at column 10.
            if indent < 8 {
                let (term, desc) = match trimmed.find("  ") {
                    Some(i) => (&trimmed[..i], trimmed[i..].trim()),
                    None => (trimmed, ""),
                };
                section.items.push(Item {
                    term: term.to_owned(),
                    paragraphs: if desc.is_empty() {
                        Vec::new()
                    } else {
                        vec![desc.to_owned()]
                    },
                });
            } else if let Some(item) = section.items.last_mut() {
                match item.paragraphs.last_mut() {
                    Some(p) if !gap => {
                        p.push(' ');
                        p.push_str(trimmed);
                    }
                    _ => item.paragraphs.push(trimmed.to_owned()),
                }
            }
        } else {
            if !para.is_empty() {
                para.push(' ');
            }
            para.push_str(trimmed);
        }
        gap = false;
    }
    flush(&mut para, &mut help, &at);
    help
}

/// Text for roff: backslashes and hyphens escaped (`\-` is the ASCII hyphen-minus, so commands
/// and options copy right), a leading `.` or `'` made literal.
fn roff(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            c => out.push(c),
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

fn push_paragraphs(page: &mut String, paragraphs: &[String]) {
    for p in paragraphs {
        page.push_str(".PP\n");
        page.push_str(&roff(p));
        page.push('\n');
    }
}

fn push_items(page: &mut String, items: &[Item]) {
    for item in items {
        page.push_str(".TP\n\\fB");
        page.push_str(&roff(&item.term));
        page.push_str("\\fR\n");
        for (i, p) in item.paragraphs.iter().enumerate() {
            if i > 0 {
                page.push_str(".IP\n");
            }
            page.push_str(&roff(p));
            page.push('\n');
        }
    }
}

fn page_header(page: &mut String, name: &str, version: &str, summary: &str) {
    page.push_str(&format!(
        ".\\\" Generated from `{name} --help` by `cargo xtask deb` (xtask/src/deb.rs); do not edit.\n\
         .TH {} 8 \"\" \"{}\" \"System Administration\"\n.SH NAME\n{} \\- {}\n",
        roff(&name.to_uppercase()),
        roff(version),
        roff(name),
        roff(summary.trim_end_matches('.'))
    ));
}

/// The subcommands of `help` (its `Commands` section, without clap's `help`).
fn subcommands(help: &Help) -> Vec<&Item> {
    help.section("Commands")
        .map(|s| s.items.iter().filter(|i| i.term != "help").collect())
        .unwrap_or_default()
}

/// `wardgate(8)`: NAME and DESCRIPTION from `wardgate --help`, one subsection per subcommand
/// (nested ones too) from `wardgate <command> --help`, the global options, and the fixed
/// sections about exit codes, files and the service.
fn wardgate_man_page(binary: &Path, version: &str) -> Result<String> {
    let top = parse_help(&command_output(wardgate(binary).arg("--help"))?);
    let summary = top.about.first().cloned().unwrap_or_default();
    let mut commands: Vec<(Vec<String>, Help)> = Vec::new();
    let mut pending: Vec<Vec<String>> = subcommands(&top)
        .into_iter()
        .map(|i| vec![i.term.clone()])
        .collect();
    pending.reverse();
    while let Some(path) = pending.pop() {
        let help = parse_help(&command_output(wardgate(binary).args(&path).arg("--help"))?);
        ensure!(
            !help.usage.is_empty(),
            "`wardgate {} --help` has no Usage line",
            path.join(" ")
        );
        let mut children: Vec<Vec<String>> = subcommands(&help)
            .into_iter()
            .map(|i| {
                let mut p = path.clone();
                p.push(i.term.clone());
                p
            })
            .collect();
        children.reverse();
        pending.extend(children);
        commands.push((path, help));
    }
    ensure!(!commands.is_empty(), "`wardgate --help` lists no commands");

    let mut page = String::new();
    page_header(&mut page, "wardgate", version, &summary);
    page.push_str(".SH SYNOPSIS\n");
    for (i, (_, help)) in commands.iter().enumerate() {
        if i > 0 {
            page.push_str(".br\n");
        }
        page.push_str(&roff(&help.usage[0]));
        page.push('\n');
    }
    page.push_str(".SH DESCRIPTION\n");
    push_paragraphs(&mut page, &top.about);
    page.push_str(WARDGATE_DESCRIPTION);
    page.push_str(".SH COMMANDS\n");
    for (path, help) in &commands {
        page.push_str(&format!(".SS \"wardgate {}\"\n", roff(&path.join(" "))));
        push_paragraphs(&mut page, &help.about);
        page.push_str(&format!(".PP\nUsage: {}\n", roff(&help.usage.join(" "))));
        for section in help.sections.iter().filter(|s| s.title != "Commands") {
            page.push_str(&format!(".PP\n{}:\n", roff(&section.title)));
            push_items(&mut page, &section.items);
        }
        push_paragraphs(&mut page, &help.after);
    }
    for section in top.sections.iter().filter(|s| s.title != "Commands") {
        page.push_str(&format!(".SH {}\n", roff(&section.title.to_uppercase())));
        push_items(&mut page, &section.items);
    }
    page.push_str(WARDGATE_TRAILER);
    Ok(page)
}

/// `ward-pki(8)`, from `ward-pki --help`.
fn ward_pki_man_page(help_text: &str, version: &str) -> String {
    let help = parse_help(help_text);
    let mut page = String::new();
    page_header(
        &mut page,
        "ward-pki",
        version,
        help.about.first().map_or("", String::as_str),
    );
    page.push_str(".SH SYNOPSIS\n");
    for line in &help.usage {
        page.push_str(&roff(line));
        page.push('\n');
    }
    page.push_str(".SH DESCRIPTION\n");
    push_paragraphs(&mut page, &help.about);
    push_paragraphs(&mut page, &help.after);
    for section in &help.sections {
        page.push_str(&format!(".SH {}\n", roff(&section.title.to_uppercase())));
        push_items(&mut page, &section.items);
    }
    page.push_str(".SH SEE ALSO\n.BR wardgate (8),\n.BR openssl (1)\n");
    page
}

/// Fixed paragraphs after the generated description of `wardgate(8)`.
const WARDGATE_DESCRIPTION: &str = r#".PP
Ward devices connect to wardgate over MQTT 3.1.1 (mutual TLS or password). It lets each device
touch only its own topics, turns each vendor's payload into canonical readings with a sandboxed
WebAssembly plugin, answers device shadows, runs edge rules and Device Defender checks, writes
every reading to a durable queue before acknowledging it, and forwards the queue to AWS IoT Core.
.PP
The configuration is read from \fI/etc/wardgate/wardgate.toml\fR, then \fI/etc/wardgate/conf.d/*.toml\fR
in name order, then \fBWARDGATE_\fR environment variables. Check a change with
\fBwardgate check\-config\fR, apply it with \fBsystemctl reload wardgate\fR.
"#;

/// Fixed sections of `wardgate(8)`: what the command line does not say.
const WARDGATE_TRAILER: &str = r#".SH EXIT STATUS
.TP
.B 0
Success.
.TP
.B 1
A runtime failure (the gateway failed, a running gateway could not be reached).
.TP
.B 2
An invalid configuration or command line; every problem is listed on standard error.
.SH FILES
.TP
.I /etc/wardgate/wardgate.toml
The configuration, every key commented.
.TP
.I /etc/wardgate/conf.d/*.toml
Drop\-ins read after it, in name order; arrays such as [[devices]] and [[rules]] are combined.
.TP
.I /var/lib/wardgate
State: the durable queue, shadows, dead letters, status.
.TP
.I /var/lib/wardgate/plugins
Plugins dropped in by the administrator (\fIplugins.dir\fR), picked up while the gateway runs;
a file here overrides the shipped plugin of the same name.
.TP
.I /usr/lib/wardgate/plugins
The plugins shipped with the package (\fIplugins.shipped_dir\fR).
.TP
.I /usr/share/doc/wardgate/examples
Example drop\-ins: edge rules and a Device Defender security profile.
.SH ENVIRONMENT
.TP
.B WARDGATE_<SECTION>__<KEY>
Overrides a configuration key, e.g. WARDGATE_LOG__LEVEL=debug.
.SH SERVICE
The package runs the gateway as the systemd service \fBwardgate.service\fR, as the system user
\fBwardgate\fR: \fBsystemctl reload wardgate\fR runs \fBwardgate reload\fR and fails, with the
reasons, when the new configuration is rejected; \fBjournalctl \-u wardgate\fR shows its log.
.SH SEE ALSO
.BR ward\-pki (8),
.BR systemctl (1),
.BR journalctl (1)
"#;
