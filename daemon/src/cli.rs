//! The command line: `run`, `check-config`, `print-default-config`, `status`, `reload`,
//! `violations`, `quarantine list|clear`, `history`, `chart`, `hash-password`, `simulate` and `demo`. Thin: each command loads what it needs and calls into the library.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 invalid configuration or usage.

use crate::app::{self, Gateway};
use crate::config::{self, Config, LoadOptions, LogFormat};
use crate::sim;
use clap::{Parser, Subcommand};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Exit code for an invalid configuration or usage.
pub const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "wardgate",
    version,
    about = "Edge gateway for hospital ward devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (as the systemd service does).
    Run {
        /// Main configuration file [default: /etc/wardgate/wardgate.toml].
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check the configuration and load its TLS files: exit 0 when valid, 2 with every problem
    /// listed when not.
    CheckConfig {
        /// Main configuration file [default: /etc/wardgate/wardgate.toml].
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the shipped default configuration, every key commented.
    PrintDefaultConfig,
    /// Show the running gateway's listeners and per-device traffic (from its status file).
    Status {
        /// Main configuration file (to find gateway.state_dir).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the raw status file (JSON), with totals and past windows.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running gateway to re-read its configuration and TLS files (SIGHUP).
    Reload {
        /// Main configuration file (to find gateway.state_dir).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show the defender's violations in force (and, with --history, recent events).
    Violations {
        /// Main configuration file (to find gateway.state_dir).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON: `active` (and `history`, AWS's violation messages).
        #[arg(long)]
        json: bool,
        /// Also show recent violation events, oldest first.
        #[arg(long)]
        history: bool,
    },
    /// List quarantined devices, or lift a device's quarantine.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Export the ward history (readings, alerts, violations) to stdout, oldest first, as CSV
    /// (for pandas: `pd.read_csv(f, parse_dates=["observed", "received"])`) or JSON Lines.
    /// Reads `<state_dir>/history` directly; works while the gateway runs.
    History {
        /// Only this device.
        #[arg(long, value_name = "ID", conflicts_with = "kind")]
        device: Option<String>,
        /// Only devices of this kind (e.g. `pacemaker`).
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
        /// Only this metric (readings) or rule (alerts).
        #[arg(long, value_name = "M")]
        metric: Option<String>,
        /// Only rows observed in the last DURATION (e.g. `1h`, `30m`, `2days`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with_all = ["from", "to"])]
        since: Option<Duration>,
        /// Only rows observed at or after T (RFC 3339, e.g. `2026-12-05T08:00:00Z`).
        #[arg(long, value_name = "T", value_parser = parse_time)]
        from: Option<i64>,
        /// Only rows observed at or before T (RFC 3339).
        #[arg(long, value_name = "T", value_parser = parse_time)]
        to: Option<i64>,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::history::export::Format,
        /// Main configuration file (to find gateway.state_dir).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Draw one metric of one device from the ward history as an SVG chart, with the device's
    /// alerts and violations marked. Works while the gateway runs.
    Chart {
        /// The device.
        #[arg(long, value_name = "ID")]
        device: String,
        /// The metric (e.g. `heart-rate`).
        #[arg(long, value_name = "M")]
        metric: String,
        /// The last DURATION (e.g. `1h`, `24h`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1h", conflicts_with_all = ["from", "to"])]
        since: Duration,
        /// From T (RFC 3339), instead of --since.
        #[arg(long, value_name = "T", value_parser = parse_time, requires = "to")]
        from: Option<i64>,
        /// To T (RFC 3339), with --from.
        #[arg(long, value_name = "T", value_parser = parse_time, requires = "from")]
        to: Option<i64>,
        /// Line, or bars of the mean per time bucket.
        #[arg(long, value_enum, default_value = "line")]
        style: crate::history::chart::Style,
        /// Width and height in pixels.
        #[arg(long, default_value_t = 1000)]
        width: u32,
        /// Height in pixels.
        #[arg(long, default_value_t = 420)]
        height: u32,
        /// Where to write the SVG (`-` for stdout).
        #[arg(long, value_name = "FILE.svg")]
        out: PathBuf,
        /// Main configuration file (to find gateway.state_dir).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Read a password on stdin and print its argon2id hash for `password_hash`.
    HashPassword,
    /// Play a simulated ward against a running gateway.
    Simulate {
        /// The gateway's plain device listener.
        #[arg(long, default_value = "127.0.0.1:1883")]
        gateway: SocketAddr,
        /// Divide every device's interval by this factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Number of copies of the ward's devices.
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// Stop after this long (e.g. `5m`); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Print the `[[devices]]` entries these simulated devices need, then exit.
        #[arg(long)]
        print_devices: bool,
    },
    /// Run the gateway on a built-in configuration with a simulated ward.
    Demo {
        /// Directory of plugin components (`cargo xtask plugins` builds them into
        /// plugins/target/components).
        #[arg(long, default_value = "plugins/target/components")]
        plugins: PathBuf,
        /// Divide every device's interval by this factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Number of copies of the ward's devices.
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// Stop after this long (e.g. `2m`); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Forward to this local upstream (an MQTT broker with TLS standing in for IoT Core),
        /// as HOST:PORT; needs the three --upstream-* files.
        #[arg(long, requires_all = ["upstream_ca", "upstream_cert", "upstream_key"])]
        upstream: Option<String>,
        /// CA certificate of the upstream broker (PEM).
        #[arg(long)]
        upstream_ca: Option<PathBuf>,
        /// The gateway's client certificate for the upstream (PEM, CN = ward-demo).
        #[arg(long)]
        upstream_cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long)]
        upstream_key: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum QuarantineAction {
    /// Devices in quarantine, with the violation that put them there.
    List {
        /// Main configuration file (to find gateway.state_dir).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lift DEVICE's quarantine now: it may connect again.
    Clear {
        /// The device id.
        device: String,
        /// Main configuration file (to find gateway.state_dir).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// Parse the command line and run it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => check_config(config),
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG_TOML);
            ExitCode::SUCCESS
        }
        Command::HashPassword => hash_password(),
        Command::Chart {
            device,
            metric,
            since,
            from,
            to,
            style,
            width,
            height,
            out,
            config,
        } => {
            let now = crate::clock::now_ms();
            let (from_ms, to_ms) = match (from, to) {
                (Some(f), Some(t)) => (f, t),
                _ => (now.saturating_sub(since.as_millis() as i64), now),
            };
            let spec = crate::history::chart::ChartSpec {
                device,
                metric,
                from_ms,
                to_ms,
                style,
                width,
                height,
            };
            chart(config, spec, &out)
        }
        Command::History {
            device,
            kind,
            metric,
            since,
            from,
            to,
            format,
            config,
        } => {
            let now = crate::clock::now_ms();
            let (from_ms, to_ms) = match since {
                Some(d) => (now.saturating_sub(d.as_millis() as i64), i64::MAX),
                None => (from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX)),
            };
            let filter = crate::history::Filter {
                device,
                kind,
                metric,
                with_events: false,
                from_ms,
                to_ms,
            };
            history(config, filter, format)
        }
        Command::Status { config, json } => status(config, json),
        Command::Reload { config } => reload(config),
        Command::Violations {
            config,
            json,
            history,
        } => violations(config, json, history),
        Command::Quarantine {
            action: QuarantineAction::List { config, json },
        } => quarantine_list(config, json),
        Command::Quarantine {
            action: QuarantineAction::Clear { device, config },
        } => quarantine_clear(config, &device),
        Command::Simulate {
            gateway,
            speed,
            devices,
            duration,
            print_devices,
        } => {
            let ward = sim::ward(devices);
            if print_devices {
                print!("{}", sim::registry_toml(&ward));
                return ExitCode::SUCCESS;
            }
            init_text_logging();
            runtime_block_on(simulate(gateway, ward, speed, duration))
        }
        Command::Demo {
            plugins,
            speed,
            devices,
            duration,
            upstream,
            upstream_ca,
            upstream_cert,
            upstream_key,
        } => {
            init_text_logging();
            let upstream = match upstream.map(|u| parse_upstream(&u)).transpose() {
                Ok(u) => u.map(|(host, port)| DemoUpstream {
                    host,
                    port,
                    ca: upstream_ca.unwrap_or_default(),
                    cert: upstream_cert.unwrap_or_default(),
                    key: upstream_key.unwrap_or_default(),
                }),
                Err(e) => {
                    eprintln!("wardgate: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            runtime_block_on(demo(plugins, speed, devices, duration, upstream))
        }
    }
}

fn load_or_report(file: Option<PathBuf>) -> Result<(LoadOptions, config::Loaded), ExitCode> {
    let opts = LoadOptions {
        file,
        ignore_env: false,
    };
    match config::load(&opts) {
        Ok(l) => Ok((opts, l)),
        Err(errors) => {
            eprint!("wardgate: {errors}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

fn check_config(file: Option<PathBuf>) -> ExitCode {
    match load_or_report(file) {
        Ok((_, loaded)) => {
            // The TLS files are loaded as `run` loads them, so a file that exists but cannot be
            // used fails here (ExecStartPre) rather than after start-up.
            let mut problems = Vec::new();
            let c = &loaded.config;
            if c.listeners.tls.enabled {
                if let Err(e) = crate::gatekeeper::tls::load(&c.listeners.tls) {
                    problems.push(e);
                }
            }
            if c.upstream.enabled {
                if let Err(e) = crate::uplink::load_tls(&c.upstream) {
                    problems.push(e);
                }
            }
            if let Err(e) = crate::http::check_tls(c) {
                problems.push(e);
            }
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("wardgate: {p}");
                }
                eprintln!(
                    "wardgate: {} TLS file problem{}; fix the files named above",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            let files: Vec<String> = loaded
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            println!(
                "configuration is valid: gateway `{}`, {} devices, files: {}",
                loaded.config.gateway.id,
                loaded.config.devices.len(),
                if files.is_empty() {
                    "(built-in defaults only)".to_owned()
                } else {
                    files.join(", ")
                }
            );
            // Against the gateway running on this state directory, if any: what a reload
            // would apply and what needs a restart.
            if let Some(running) = crate::reload::read_running(&c.gateway.state_dir)
                .filter(|_| running_pid(&c.gateway.state_dir).is_some())
            {
                let changed = crate::reload::changed_keys(&running, c);
                let (live, restart) = crate::reload::classify(&running, c, &changed);
                if changed.is_empty() {
                    println!("the running gateway already uses this configuration");
                }
                if !live.is_empty() {
                    println!("a reload applies: {}", live.join(", "));
                }
                for (key, why) in &restart {
                    println!("needs a restart: {key} ({why})");
                }
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(file: Option<PathBuf>) -> ExitCode {
    // Before any thread starts (see `footprint::malloc_arenas`).
    crate::footprint::limit_malloc_arenas();
    let (opts, loaded) = match load_or_report(file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if let Err(e) = crate::telemetry::init(&loaded.config.log) {
        eprintln!("wardgate: cannot set up logging: {e}");
        return ExitCode::FAILURE;
    }
    for f in &loaded.files {
        log::info!(file:% = f.display(); "configuration file loaded");
    }
    runtime_block_on(app::run_daemon(opts, loaded.config))
}

fn runtime_block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wardgate")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wardgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(fut);
    // The embedded broker's threads never end; do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(error:% = format!("{e:#}"); "wardgate failed: {e:#}");
            eprintln!("wardgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_text_logging() {
    let mut cfg = config::LogConfig {
        format: LogFormat::Text,
        ..Default::default()
    };
    if let Ok(level) = std::env::var("WARDGATE_LOG__LEVEL") {
        if let Ok(l) = serde_json::from_value(serde_json::Value::String(level)) {
            cfg.level = l;
        }
    }
    let _ = crate::telemetry::init(&cfg);
}

fn status(file: Option<PathBuf>, json: bool) -> ExitCode {
    let (_, loaded) = match load_or_report(file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match crate::status::read(&loaded.config.gateway.state_dir) {
        Ok(s) if json => {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(s) => {
            print!("{}", crate::status::render(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wardgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A time on the command line: RFC 3339 (`2026-12-05T08:00:00Z`, or without the zone,
/// meaning UTC), as ms since the epoch.
fn parse_time(s: &str) -> Result<i64, String> {
    humantime::parse_rfc3339_weak(s)
        .map(crate::clock::epoch_ms)
        .map_err(|e| format!("{e}: expected RFC 3339 such as 2026-12-05T08:00:00Z"))
}

/// The history directory of the configuration in `file`.
fn history_dir(file: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    let (_, loaded) = load_or_report(file)?;
    let c = &loaded.config;
    if !c.history.enabled {
        eprintln!(
            "wardgate: history.enabled is false in this configuration: nothing is kept (set it to true and reload)"
        );
        return Err(ExitCode::from(EXIT_CONFIG));
    }
    Ok(c.gateway.state_dir.join("history"))
}

/// The history directory of the configuration in `file` and a lookup of `filter` in it; the
/// exit code once the problem is printed.
fn history_rows(
    file: Option<PathBuf>,
    filter: crate::history::Filter,
) -> Result<(PathBuf, crate::history::store::Query), ExitCode> {
    let dir = history_dir(file)?;
    match crate::history::store::query(&dir, filter) {
        Ok(q) => Ok((dir, q)),
        Err(e) => {
            eprintln!(
                "wardgate: cannot read the history in {}: {e}",
                dir.display()
            );
            Err(ExitCode::FAILURE)
        }
    }
}

fn history(
    file: Option<PathBuf>,
    filter: crate::history::Filter,
    format: crate::history::export::Format,
) -> ExitCode {
    if filter.from_ms > filter.to_ms {
        eprintln!("wardgate: --from is after --to");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (dir, rows) = match history_rows(file, filter) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let out = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    let written = (|| -> std::io::Result<u64> {
        let mut e = crate::history::export::Exporter::new(out, format)?;
        let mut n = 0;
        for row in rows {
            e.row(&row?)?;
            n += 1;
        }
        e.finish()?;
        Ok(n)
    })();
    match written {
        Ok(0) => {
            eprintln!(
                "wardgate: no history rows match (history in {}; check --device, --kind, --metric and the time range)",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        // `| head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wardgate: history export failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn chart(file: Option<PathBuf>, spec: crate::history::chart::ChartSpec, out: &Path) -> ExitCode {
    if spec.from_ms >= spec.to_ms {
        eprintln!("wardgate: the chart's range is empty: --from must be before --to");
        return ExitCode::from(EXIT_CONFIG);
    }
    let filter = crate::history::Filter {
        device: Some(spec.device.clone()),
        kind: None,
        metric: Some(spec.metric.clone()),
        with_events: true,
        from_ms: spec.from_ms,
        to_ms: spec.to_ms,
    };
    let mut failed = None;
    let (dir, rows) = match history_rows(file, filter) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let rows = rows.map_while(|r| r.map_err(|e| failed = Some(e)).ok());
    let svg = crate::history::chart::render_svg(&spec, rows);
    if let Some(e) = failed {
        eprintln!(
            "wardgate: cannot read the history in {}: {e}",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    let svg = match svg {
        Ok(svg) => svg,
        Err(e) => {
            eprintln!("wardgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let written = if out == Path::new("-") {
        std::io::stdout().lock().write_all(svg.as_bytes())
    } else {
        std::fs::write(out, svg.as_bytes())
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wardgate: cannot write {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn defender_state(
    file: Option<PathBuf>,
) -> Result<(PathBuf, crate::defender::StateFile), ExitCode> {
    let (_, loaded) = load_or_report(file)?;
    let dir = loaded.config.gateway.state_dir.clone();
    match crate::defender::read_state(&dir) {
        Ok(s) => Ok((dir, s)),
        Err(e) => {
            eprintln!("wardgate: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn violations(file: Option<PathBuf>, json: bool, history: bool) -> ExitCode {
    let (_, s) = match defender_state(file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if json {
        let mut v = serde_json::json!({ "active": s.status.active });
        if history {
            v["history"] = serde_json::Value::from(s.history);
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    if s.status.active.is_empty() {
        println!("no violations in force");
    } else {
        print!("{}", crate::defender::render_active(&s.status));
    }
    if history {
        println!("\nrecent events, oldest first:");
        for e in &s.history {
            println!(
                "{} {:<17} {:<20} profile {} behavior {} {}",
                crate::clock::rfc3339_ms(e["violationEventTime"].as_i64().unwrap_or(0)),
                e["violationEventType"].as_str().unwrap_or(""),
                e["thingName"].as_str().unwrap_or(""),
                e["securityProfileName"].as_str().unwrap_or(""),
                e["behavior"]["name"].as_str().unwrap_or(""),
                e["metricValue"]
            );
        }
    }
    ExitCode::SUCCESS
}

fn quarantine_list(file: Option<PathBuf>, json: bool) -> ExitCode {
    let (_, s) = match defender_state(file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s.status.quarantined).unwrap_or_default()
        );
    } else if s.status.quarantined.is_empty() {
        println!("no device is quarantined");
    } else {
        print!("{}", crate::defender::render_quarantined(&s.status));
    }
    ExitCode::SUCCESS
}

/// The running gateway's pid, if its pid file names a live process.
fn running_pid(state_dir: &std::path::Path) -> Option<i32> {
    let pid = std::fs::read_to_string(state_dir.join(crate::status::PID_FILE))
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .is_ok()
        .then_some(pid)
}

fn quarantine_clear(file: Option<PathBuf>, device: &str) -> ExitCode {
    if !config::valid_thing_name(device) {
        eprintln!(
            "wardgate: `{device}` is not a device id (1-128 of letters, digits, ':', '_', '-')"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let (_, loaded) = match load_or_report(file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let dir = loaded.config.gateway.state_dir.clone();
    let Some(pid) = running_pid(&dir) else {
        // No gateway running: the store is ours to change.
        let store_dir = dir.join("defender");
        return match crate::defender::Store::open(&store_dir) {
            Ok(store) => {
                let had = store.quarantines().iter().any(|q| q.device_id == device);
                match store.put_quarantine(device, None) {
                    Ok(()) if had => {
                        println!("quarantine of {device} lifted (the gateway is not running)");
                        ExitCode::SUCCESS
                    }
                    Ok(()) => {
                        println!("{device} is not quarantined");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("wardgate: cannot change {}: {e}", store_dir.display());
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("wardgate: cannot open {}: {e}", store_dir.display());
                ExitCode::FAILURE
            }
        };
    };
    let requests = dir.join(crate::defender::REQUESTS_DIR);
    let request = requests.join(format!("{}{device}", crate::defender::CLEAR_QUARANTINE));
    if let Err(e) = std::fs::create_dir_all(&requests).and_then(|()| std::fs::write(&request, b""))
    {
        eprintln!(
            "wardgate: cannot write the request {}: {e}",
            request.display()
        );
        return ExitCode::FAILURE;
    }
    let was = crate::defender::read_state(&dir)
        .map(|s| s.status.quarantined.iter().any(|q| q.device_id == device))
        .unwrap_or(false);
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    ) {
        eprintln!("wardgate: cannot signal pid {pid}: {e}");
        return ExitCode::FAILURE;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while request.exists() {
        if std::time::Instant::now() > deadline {
            eprintln!("wardgate: the gateway (pid {pid}) did not take the request within 10 s; is [defender] enabled? see the journal");
            let _ = std::fs::remove_file(&request);
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if was {
        println!("quarantine of {device} lifted; it may connect again");
    } else {
        println!("{device} is not quarantined");
    }
    ExitCode::SUCCESS
}

fn reload(file: Option<PathBuf>) -> ExitCode {
    let (_, loaded) = match load_or_report(file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let pid_file = loaded
        .config
        .gateway
        .state_dir
        .join(crate::status::PID_FILE);
    let pid = match std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        Some(p) => p,
        None => {
            eprintln!(
                "wardgate: no running gateway found ({} missing or unreadable); \
                 under systemd use `systemctl reload wardgate`",
                pid_file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let state_dir = &loaded.config.gateway.state_dir;
    let before = crate::reload::read_outcome(state_dir)
        .filter(|o| o.pid == pid as u32)
        .map_or(0, |o| o.generation);
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    ) {
        eprintln!("wardgate: cannot signal pid {pid}: {e}");
        return ExitCode::FAILURE;
    }
    // The gateway writes the outcome once the reload is over; a newer generation of the same
    // process is ours.
    let deadline = std::time::Instant::now() + RELOAD_WAIT;
    loop {
        if let Some(o) = crate::reload::read_outcome(state_dir)
            .filter(|o| o.pid == pid as u32 && o.generation > before)
        {
            if o.is_applied() {
                println!("configuration reloaded (pid {pid}): {}", o.summary);
                return ExitCode::SUCCESS;
            }
            eprintln!("wardgate: configuration reload rejected; the running configuration stays in force:");
            for p in &o.problems {
                eprintln!("  - {p}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "wardgate: sent SIGHUP to pid {pid}, but no outcome in {} within {RELOAD_WAIT:?}; see `journalctl -u wardgate`",
                state_dir.join(crate::reload::OUTCOME_FILE).display()
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How long `wardgate reload` waits for the gateway's outcome.
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        eprintln!("wardgate: cannot read the password from stdin");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!(
            "wardgate: empty password; type it on stdin, e.g. `wardgate hash-password < file`"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let hash = crate::registry::hash_password(password);
    let _ = writeln!(std::io::stdout(), "{hash}");
    ExitCode::SUCCESS
}

async fn until_stopped(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::select! {
            _ = tokio::time::sleep(d) => {},
            _ = tokio::signal::ctrl_c() => {},
        },
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn simulate(
    gateway: SocketAddr,
    ward: Vec<sim::SimDevice>,
    speed: f64,
    duration: Option<Duration>,
) -> anyhow::Result<()> {
    let stats = Arc::new(sim::SimStats::default());
    let stop = CancellationToken::new();
    log::info!(devices = ward.len(), gateway:% = gateway, speed = speed; "simulated ward starting");
    let task = tokio::spawn(sim::run(gateway, ward, speed, stats.clone(), stop.clone()));
    until_stopped(duration).await;
    stop.cancel();
    let _ = task.await;
    log::info!(
        published = stats.published.load(Ordering::Relaxed),
        acked = stats.acked.load(Ordering::Relaxed),
        connection_errors = stats.connection_errors.load(Ordering::Relaxed);
        "simulated ward stopped"
    );
    Ok(())
}

/// A local upstream for the demo.
#[derive(Debug, Clone)]
pub struct DemoUpstream {
    /// Host name (also the TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// CA file.
    pub ca: PathBuf,
    /// Client certificate file.
    pub cert: PathBuf,
    /// Client key file.
    pub key: PathBuf,
}

fn parse_upstream(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("--upstream `{s}`: expected HOST:PORT"))?;
    let port = port
        .parse()
        .map_err(|_| format!("--upstream `{s}`: `{port}` is not a port"))?;
    Ok((host.to_owned(), port))
}

/// The built-in demo configuration: loopback only, free ports, the simulated ward registered.
pub fn demo_config(ward: &[sim::SimDevice], plugins: PathBuf) -> Config {
    let mut c = Config::default();
    c.plugins.dir = plugins;
    c.gateway.id = "ward-demo".into();
    c.gateway.state_dir = std::env::temp_dir().join("wardgate-demo");
    c.listeners.plain.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.broker.address = SocketAddr::from(([127, 0, 0, 1], 0));
    c.http.address = SocketAddr::from(([127, 0, 0, 1], 0));
    // Every simulated device connects from loopback.
    c.listeners.max_connections_per_address =
        c.listeners.max_connections_per_address.max(ward.len() + 16);
    c.listeners.max_connections = c.listeners.max_connections.max(ward.len() + 16);
    c.broker.max_connections = c.broker.max_connections.max(ward.len() + 16);
    // One address for the whole ward: its login bounds are the gateway-wide ones.
    c.login.max_pending_per_address = c.login.max_pending;
    c.login.max_per_second_per_address = c.login.max_per_second;
    c.devices = sim::registry_entries(ward);
    c.rules = vec![demo_rule()];
    // The shipped example security profile: it catches the simulated rogue agents.
    c.defender.profiles = vec![config::example_profile()];
    c
}

/// The demo's metering window for `speed` (AWS's 5 minutes, divided by the speed, rounded
/// down to a divisor of 300 s so that the example profile's `durationSeconds = 300` still
/// fits) and the windows kept to cover 300 s.
pub fn demo_window(speed: f64) -> (Duration, usize) {
    const DIVISORS: [u64; 17] = [
        300, 150, 100, 75, 60, 50, 30, 25, 20, 15, 12, 10, 6, 5, 4, 3, 2,
    ];
    let target = 300.0 / speed.max(1.0);
    let w = DIVISORS
        .iter()
        .copied()
        .find(|d| *d as f64 <= target)
        .unwrap_or(2);
    (Duration::from_secs(w), (300 / w as usize).max(12))
}

/// The demo's edge rule: the ward's tachycardia alarm on the reported state that plugin
/// readings feed (`heart-rate` → `heart_rate`), so the simulated alarm pacemaker's 141 bpm
/// trips it; the alert goes to the journal (printed by the demo) and, with an upstream, to
/// the alerts stream.
pub fn demo_rule() -> crate::config::RuleConfig {
    use crate::config::ActionConfig;
    crate::config::RuleConfig {
        name: "tachycardia".into(),
        sql: "SELECT state.reported.heart_rate AS heart_rate, topic(3) AS device \
              FROM '$aws/things/+/shadow/update/accepted' WHERE state.reported.heart_rate > 140"
            .into(),
        actions: vec![
            ActionConfig::Journal {
                priority: "warning".into(),
            },
            ActionConfig::Upstream {
                stream: "alerts".into(),
            },
        ],
        debounce: Some(Duration::from_secs(60)),
        description: Some("demo: heart rate above 140/min".into()),
    }
}

async fn demo(
    plugins: PathBuf,
    speed: f64,
    copies: usize,
    duration: Option<Duration>,
    upstream: Option<DemoUpstream>,
) -> anyhow::Result<()> {
    let ward = sim::ward(copies);
    let mut config = demo_config(&ward, plugins);
    (config.metering.window, config.metering.windows_kept) = demo_window(speed);
    if let Some(u) = &upstream {
        config.upstream.enabled = true;
        config.upstream.endpoint = u.host.clone();
        config.upstream.port = u.port;
        config.upstream.ca_file = Some(u.ca.clone());
        config.upstream.cert_file = Some(u.cert.clone());
        config.upstream.key_file = Some(u.key.clone());
        // A fresh queue every demo run.
        let _ = std::fs::remove_dir_all(config.gateway.state_dir.join("queue"));
    }
    let gw = Gateway::start(&config).await?;
    let addr = gw
        .listener_addr("plain")
        .ok_or_else(|| anyhow::anyhow!("the demo's plain listener did not start"))?;
    log::info!(
        gateway:% = addr, devices = ward.len(), speed = speed;
        "demo: gateway up on {addr}; simulated ward connecting (Ctrl-C to stop)"
    );
    let stats = Arc::new(sim::SimStats::default());
    let stop = CancellationToken::new();
    let sim_task = tokio::spawn(sim::run(addr, ward, speed, stats.clone(), stop.clone()));
    let pipeline = gw.stats();
    let uplink = gw.uplink().clone();
    let upstream_on = upstream.is_some();
    let report = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tick.tick().await;
            let per_device = pipeline.snapshot();
            let summary: Vec<String> = per_device
                .iter()
                .map(|(id, c)| format!("{id}:{}/{}/{}", c.messages, c.readings, c.dead_letters))
                .collect();
            log::info!(
                messages = pipeline.total_messages();
                "demo: per device messages/readings/dead-letters {}", summary.join(" ")
            );
            if upstream_on {
                use std::sync::atomic::Ordering::Relaxed;
                log::info!(
                    connected = uplink.connected.load(Relaxed),
                    delivered = uplink.records_delivered.load(Relaxed),
                    batches = uplink.batches_acked.load(Relaxed);
                    "demo: upstream"
                );
            }
        }
    });
    until_stopped(duration).await;
    report.abort();
    stop.cancel();
    let _ = sim_task.await;
    if upstream.is_some() {
        // Give the uplink a moment to deliver the last readings.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let delivered = gw
        .uplink()
        .records_delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    let stop_report = gw.stop(config.gateway.shutdown_timeout).await;
    log::info!(
        delivered_upstream = delivered;
        "demo: readings delivered upstream: {delivered}"
    );
    log::info!(
        published = stats.published.load(Ordering::Relaxed),
        acked = stats.acked.load(Ordering::Relaxed),
        readings = stop_report.readings,
        drained = stop_report.drained;
        "demo finished"
    );
    Ok(())
}
