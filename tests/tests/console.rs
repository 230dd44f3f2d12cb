//! The local console (`/` and `/device/<token>` on the `[http]` endpoint) in a real headless
//! browser: Debian's `chromium` (`--headless --dump-dom`) loads the pages of a gateway serving
//! the simulated ward (`wardgate::sim`, real MQTT clients) over HTTPS with the gateway's
//! certificate and a console credential, with the edge rule `heartbeat > 140` raising the
//! ward's alarm (the simulator's `pacemaker-alarm-01` sends 141 once).
//!
//! What is checked: the overview lists every simulated device and the alarm; the alarming
//! device's page has its chart (inline SVG) and the alert; without the credential the browser
//! gets nothing of the ward (the endpoint answers 401 and chromium reports the refused
//! authentication), and a plain HTTPS client sees the 401, its challenge and a page with no
//! device on it. Chromium sends the credential from the URL's userinfo (it answers the 401
//! challenge with it), so the positive case needs no other client. The endpoint binds only
//! 127.0.0.1: refusal there is tested because a configured credential is required on every
//! address, loopback included. That a non-loopback address needs TLS and a credential is a
//! configuration check, tested here on the loaded configuration.
//!
//! The browser's certificate check is turned off (`--ignore-certificate-errors`, in this test
//! only): the certificate is the test CA's, which chromium does not know. Each chromium start
//! takes a second or two; there are three.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wardgate::app::Gateway;
use wardgate::config::{ActionConfig, RuleConfig};
use wardgate_tests::pki::{Ca, ListenerFiles};

const USER: &str = "operator";
const PASSWORD: &str = "ward7-console";

/// Debian's chromium; panics with how to install it.
fn chromium() -> PathBuf {
    let p = PathBuf::from("/usr/bin/chromium");
    assert!(
        p.exists(),
        "{} is missing: `apt-get install chromium` (cargo xtask deps installs it)",
        p.display()
    );
    p
}

/// What chromium made of `url`: the DOM it dumped (empty when the page did not load) and
/// what it said on stderr.
async fn browse(url: &str) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--ignore-certificate-errors",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium answers within 90 s")
        .expect("chromium runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Standard base64 (for the Basic credential of the plain client).
fn base64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET path` over HTTPS (trusting `ca_pem`), with a Basic credential or none: the status
/// code, the head and the body.
async fn https_get(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
    credential: Option<(&str, &str)>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tls, _) = wardgate_tests::pki::tls_connect_pem(addr, ca_pem, None)
        .await
        .expect("TLS to the console");
    let auth = credential
        .map(|(u, p)| {
            format!(
                "Authorization: Basic {}\r\n",
                base64(format!("{u}:{p}").as_bytes())
            )
        })
        .unwrap_or_default();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    // The server closes after the answer; a missing close_notify is no matter here.
    let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    (code, head.to_owned(), body.to_owned())
}

/// The device page link of `device` on the overview.
fn device_link(overview: &str, device: &str) -> String {
    let end = overview
        .find(&format!("\">{device}</a>"))
        .unwrap_or_else(|| panic!("no link to {device} on the overview"));
    let start = overview[..end].rfind("href=\"").expect("the link's href") + "href=\"".len();
    overview[start..end].replace("&amp;", "&")
}

fn write_ca(dir: &Path, ca: &Ca) -> String {
    let pem = ca.cert.pem();
    std::fs::write(dir.join("test-ca.pem"), &pem).unwrap();
    pem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_ward_and_its_alarm_in_a_browser_and_refuses_without_the_credential()
{
    let dir = tempfile::tempdir().unwrap();
    let mut ca = Ca::new("Ward 7 CA");
    let ca_pem = write_ca(dir.path(), &ca);
    let files = ListenerFiles::write(dir.path(), &ca.server(), &[&ca], &ca.crl(&[]));
    let ward = wardgate::sim::ward(1);
    let mut cfg = wardgate_tests::config(
        &dir.path().join("state"),
        wardgate::sim::registry_entries(&ward),
    );
    // The gateway's certificate (the device listener's files), served by the console; the
    // device listener itself stays off.
    cfg.listeners.tls.cert_file = files.cert.clone();
    cfg.listeners.tls.key_file = files.key.clone();
    cfg.http.tls = true;
    cfg.http.console_password_hash = Some(wardgate::registry::hash_password_demo(PASSWORD));
    cfg.rules = vec![RuleConfig {
        name: "tachycardia".into(),
        sql: "SELECT heartbeat FROM 'ward/+/telemetry' WHERE heartbeat > 140".into(),
        actions: vec![ActionConfig::Journal {
            priority: "warning".into(),
        }],
        debounce: None,
        description: None,
    }];
    let gw = Gateway::start(&cfg).await.unwrap();
    let http = gw.http_addr().expect("[http] is on");
    let stop = tokio_util::sync::CancellationToken::new();
    let sim = tokio::spawn(wardgate::sim::run(
        gw.listener_addr("plain").unwrap(),
        ward.clone(),
        10.0,
        std::sync::Arc::new(wardgate::sim::SimStats::default()),
        stop.clone(),
    ));

    // Wait for the alarm to be in the history and on the overview (read at most every 5 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let overview = loop {
        let (code, _, body) = https_get(http, &ca_pem, "/", Some((USER, PASSWORD))).await;
        assert_eq!(code, 200, "{body}");
        if body.contains("tachycardia") && body.contains("ALARM") && body.contains("heart-rate") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the alarm on the overview within 60 s:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // Refused without the credential, or with a wrong one: a 401 that shows nothing.
    for credential in [None, Some((USER, "wrong")), Some(("intruder", PASSWORD))] {
        let (code, head, body) = https_get(http, &ca_pem, "/", credential).await;
        assert_eq!(code, 401, "{credential:?}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: basic realm=\"wardgate console\""),
            "{head}"
        );
        assert!(!body.contains("pacemaker"), "{body}");
    }
    let link = device_link(&overview, "pacemaker-alarm-01");
    assert!(
        link.starts_with("/device/") && !link.contains("pacemaker"),
        "the device's id stays out of its URL: {link}"
    );
    let (code, _, body) = https_get(http, &ca_pem, &link, None).await;
    assert_eq!((code, body.contains("pacemaker")), (401, false));

    // The browser: the overview, with the credential in the URL.
    let base = format!("https://{USER}:{PASSWORD}@127.0.0.1:{}", http.port());
    let (dom, err) = browse(&format!("{base}/")).await;
    for d in &ward {
        assert!(
            dom.contains(&d.id),
            "{} missing from the overview:\n{dom}\n{err}",
            d.id
        );
    }
    assert!(dom.contains("<meta http-equiv=\"refresh\""), "{dom}");
    assert!(!dom.contains("<script"), "no scripts");
    let alarm_row = dom
        .split("<tr")
        .find(|row| row.contains(">pacemaker-alarm-01</a>"))
        .expect("the alarming device's row");
    assert!(
        alarm_row.contains("ALARM") && alarm_row.contains("tachycardia"),
        "{alarm_row}"
    );
    assert!(dom.contains("Alerts in the last hour"), "{dom}");

    // Its page: the chart and the alert.
    let (page, err) = browse(&format!("{base}{link}")).await;
    assert!(page.contains("pacemaker-alarm-01"), "{page}\n{err}");
    assert!(page.contains("<svg"), "a chart: {page}");
    assert!(
        page.contains("pacemaker-alarm-01 · heart-rate"),
        "the chart's title: {page}"
    );
    assert!(page.contains("tachycardia"), "the alert: {page}");
    assert!(page.contains("141"), "the alarming reading: {page}");
    // For a look at the pages: WG_CONSOLE_SCREENSHOTS=<dir> saves them as PNG.
    if let Some(shots) = std::env::var_os("WG_CONSOLE_SCREENSHOTS") {
        for (name, url) in [
            ("overview", format!("{base}/")),
            ("device", format!("{base}{link}")),
        ] {
            let png = Path::new(&shots).join(format!("{name}.png"));
            let status = tokio::process::Command::new(chromium())
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                ])
                .args(["--ignore-certificate-errors", "--window-size=1280,1400"])
                .arg(format!("--screenshot={}", png.display()))
                .arg(url)
                .output()
                .await
                .expect("chromium runs");
            assert!(png.exists(), "{status:?}");
        }
    }

    // Without the credential: chromium gets the 401 and shows nothing of the ward.
    let (dom, err) = browse(&format!("https://127.0.0.1:{}/", http.port())).await;
    assert!(!dom.contains("pacemaker"), "{dom}");
    assert!(
        dom.trim().is_empty() || dom.contains("Authentication required"),
        "{dom}"
    );
    assert!(
        err.contains("ERR_INVALID_AUTH_CREDENTIALS") || dom.contains("Authentication required"),
        "chromium reports the refusal: {err}"
    );

    stop.cancel();
    sim.await.unwrap();
    gw.stop(Duration::from_secs(10)).await;
}

/// Beyond loopback the console needs TLS and a credential: asked for without them, the
/// configuration is refused naming the keys; left unset, the console is off there and
/// `/healthz` and `/metrics` stay as they were.
#[test]
fn a_console_beyond_loopback_needs_tls_and_a_credential() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wardgate.toml");
    let load = |http: &str| {
        std::fs::write(
            &file,
            format!("[gateway]\nstate_dir = \"/var/lib/wardgate\"\n\n[http]\n{http}"),
        )
        .unwrap();
        wardgate::config::load(&wardgate::config::LoadOptions {
            file: Some(file.clone()),
            ignore_env: true,
        })
    };
    let e = format!(
        "{:?}",
        load("address = \"0.0.0.0:9883\"\nconsole = true\n").expect_err("refused")
    );
    assert!(
        e.contains("http.console")
            && e.contains("http.tls = true")
            && e.contains("http.console_password_hash")
            && e.contains("http.console = false"),
        "{e}"
    );
    let hash = wardgate::registry::hash_password_demo("pw");
    let ok = load(&format!(
        "address = \"0.0.0.0:9883\"\nconsole = true\ntls = true\nconsole_password_hash = \"{hash}\"\n"
    ))
    .expect("TLS and a credential");
    assert!(ok.config.http.console_served());
    // Unset: off beyond loopback (the endpoint warns at start), on at loopback.
    let off = load("address = \"0.0.0.0:9883\"\n").expect("valid as before");
    assert!(!off.config.http.console_served());
    let on = load("address = \"127.0.0.1:9883\"\n").expect("valid");
    assert!(on.config.http.console_served());
    let e = format!(
        "{:?}",
        load("console_password_hash = \"hunter2\"\n").expect_err("not a hash")
    );
    assert!(e.contains("http.console_password_hash"), "{e}");
}
