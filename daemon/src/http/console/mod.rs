//! The local console: server-rendered HTML pages of the ward on the operators' HTTP endpoint,
//! for the people at the gateway (clinical engineers, the ward's IT) when the cloud is far or
//! down.
//!
//! # Pages
//! - `GET /`, the overview: every device (registered at start, seen since, or in the last
//!   hour's history) with its kind, whether it is connected, its last readings, its alerts of
//!   the last hour, its violations in alarm and its quarantine; the last hour's alerts; the
//!   violations in alarm and the quarantines; the health of the stages, the uplink, the queue,
//!   the dead-letter store and the history; the rules' counters.
//! - `GET /device/<token>`, one device: its state, a line chart of the last hour and a bar
//!   chart of the last day for each of its metrics (at most [`MAX_CHART_METRICS`], drawn by
//!   [`crate::history::chart`] as inline SVG), its alerts and violation events of the last day
//!   and its latest dead letters (reason and topic; never the payload).
//!
//! Plain HTML and CSS, no JavaScript, no external asset: the pages work in any browser, with
//! scripts off, through no network but the gateway's; they reload themselves every
//! `http.console_refresh` (`<meta http-equiv="refresh">`). Every text that comes from a device,
//! a rule or a configuration is HTML-escaped; the pages are well-formed XML too (the tests parse
//! them). Responses carry `Cache-Control: no-store` and a Content-Security-Policy that allows
//! nothing but the page's own stylesheet (by its hash): no script, no frame, no form, no
//! request to anywhere.
//!
//! # Why device pages have opaque tokens
//! A device page's URL is `/device/<token>`: the first 16 bytes of an HMAC-SHA-256 of the device
//! id under a key kept in `<state_dir>/console-token.key` (made at the first start, 0600). URLs
//! end up in browser histories, bookmarks, proxy and server logs, and a device id can tell whose
//! bedside it is; the token says nothing about the device to whoever does not have the key, yet
//! it is stable across restarts, so a bookmark keeps working. No page takes a query string and
//! no reading is ever put in a URL.
//!
//! # Credential
//! With `http.console_password_hash` set, every console page asks for HTTP Basic credentials
//! (`http.console_user` and the password), on any address; the endpoint serves the console
//! beyond loopback only over TLS and with a credential (see [`super`]). The password is checked
//! with argon2 against the PHC string as device passwords are ([`crate::registry::verify_phc`]),
//! one check at a time ([`AUTH_WAIT`] at most to get a turn, then `503`), and a verified
//! password is remembered as a keyed tag ([`crate::gatekeeper::login::CredentialCache`]) for
//! [`CREDENTIAL_TTL`], so a page that reloads itself does not pay argon2 every time. A refusal
//! is `401` with a page that shows nothing of the ward; refusals are counted and reported in the
//! log at most once per [`REFUSAL_REPORT_EVERY`], with the client's address only (never what it
//! sent).
//!
//! # Bounds
//! The expensive part is reading the history (a day of a ward at one reading a second is
//! millions of rows). Reads run on blocking threads, at most [`RENDER_SLOTS`] at once (a request
//! that waits longer than [`RENDER_WAIT`] for one gets `503` with `Retry-After`), each stops
//! after [`SCAN_BUDGET`] (the page then says its data is partial), in memory that does not grow
//! with the rows (charts keep per-pixel summaries, lists keep their last [`RECENT`] entries). The
//! overview's hour of history is read at most once per [`BOARD_TTL`] and a device page's day at
//! most once per [`PAGE_TTL`] per device, for [`PAGE_CACHE`] devices, whoever asks. With the
//! endpoint's [`super::MAX_CONNECTIONS`], that bounds what a browser left open, or a client
//! hammering the console, can cost.
//!
//! # Layout
//! This file: the requests (credential, caches, render slots, tokens); `pages.rs`: the HTML;
//! `ward.rs`: the reads of the history and the dead-letter store.
//!
//! What must stay true: no page shows anything before the credential is checked (when one is
//! set); nothing about a device or a reading appears in a URL or in the log; every text is
//! escaped; the work of a request is bounded as above.

mod pages;
mod ward;

use super::Source;
use crate::config::Config;
use crate::status::Status;
use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use pages::{message_page, refused_page, CSS};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ward::{Board, DevicePage};

/// History reads (overview and device pages) running at once: the gateway has few cores and
/// more important work.
pub const RENDER_SLOTS: usize = 1;
/// Longest a request waits for a render slot before `503`.
pub const RENDER_WAIT: Duration = Duration::from_secs(15);
/// Longest one read of the history may take; what was read by then is shown, marked partial.
pub const SCAN_BUDGET: Duration = Duration::from_secs(20);
/// The overview's read of the last hour is reused for this long.
pub const BOARD_TTL: Duration = Duration::from_secs(5);
/// A device page's read of the last day is reused for this long.
pub const PAGE_TTL: Duration = Duration::from_secs(20);
/// Device pages kept ready.
pub const PAGE_CACHE: usize = 8;
/// Metrics of a device charted on its page (the others are named).
pub const MAX_CHART_METRICS: usize = 4;
/// Entries kept in each "recent" list (alerts, violations, dead letters).
pub const RECENT: usize = 20;
/// A verified password is remembered for this long.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(600);
/// Longest a request waits for its turn at a password check before `503`.
pub const AUTH_WAIT: Duration = Duration::from_secs(5);
/// At most one log line per this long about refused requests.
pub const REFUSAL_REPORT_EVERY: Duration = Duration::from_secs(60);
/// Devices on the overview's board (a bound; the registry is far smaller).
const MAX_BOARD_DEVICES: usize = 4096;
/// Metrics per device on the overview's board.
const MAX_BOARD_METRICS: usize = 8;
/// The overview's window: the last hour.
const HOUR_MS: i64 = 3_600_000;
/// A device page's longest window: the last day.
const DAY_MS: i64 = 24 * HOUR_MS;
/// Width of the charts, in pixels (two side by side on a laptop screen).
const CHART_WIDTH: u32 = 640;
/// Height of the charts, in pixels.
const CHART_HEIGHT: u32 = 240;
/// Longest text of an alert's output or a dead letter's reason shown.
const MAX_DETAIL_CHARS: usize = 240;
/// The key file of the device pages' tokens, in the state directory.
pub const TOKEN_KEY_FILE: &str = "console-token.key";
/// `/device/` and 32 hex digits.
const DEVICE_PREFIX: &str = "/device/";

/// Whether `path` is one of the console's.
pub fn is_console_path(path: &str) -> bool {
    path == "/" || path.starts_with(DEVICE_PREFIX)
}

/// The console of one endpoint.
pub struct Console {
    gateway_id: String,
    refresh_s: u64,
    history_dir: Option<PathBuf>,
    dead_letter_dir: PathBuf,
    /// Devices registered at start, with their kind.
    registry: BTreeMap<String, String>,
    token_key: [u8; 32],
    csp: http::HeaderValue,
    auth: Option<Auth>,
    /// Held by a history read until it ends (moved into its blocking task, so a client that
    /// goes away does not free the slot of a read still running).
    renders: Arc<tokio::sync::Semaphore>,
    board: Mutex<Option<(Instant, Arc<Board>)>>,
    pages: Mutex<VecDeque<(String, Instant, Arc<DevicePage>)>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("gateway_id", &self.gateway_id)
            .field("credential", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

/// The credential and what checking it takes.
struct Auth {
    user: String,
    phc: String,
    cache: crate::gatekeeper::login::CredentialCache,
    /// One argon2 check at a time (held by the blocking check itself).
    turn: Arc<tokio::sync::Semaphore>,
    refused: AtomicU64,
    last_report: Mutex<Option<Instant>>,
}

/// What the credential check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allowed,
    Refused,
    Busy,
}

impl Console {
    /// The console for `config` (its history, dead letters, registry and credential).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        use base64::Engine as _;
        use sha2::Digest as _;
        let state_dir = &config.gateway.state_dir;
        let h = &config.http;
        let auth = h.console_password_hash.as_ref().map(|phc| Auth {
            user: h.console_user.clone(),
            phc: phc.clone(),
            cache: crate::gatekeeper::login::CredentialCache::new(CREDENTIAL_TTL),
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
            refused: AtomicU64::new(0),
            last_report: Mutex::new(None),
        });
        let style_hash =
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(CSS.as_bytes()));
        let csp = format!(
            "default-src 'none'; style-src 'sha256-{style_hash}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        );
        Ok(Self {
            gateway_id: config.gateway.id.clone(),
            refresh_s: h.console_refresh.as_secs().max(1),
            history_dir: config.history.enabled.then(|| state_dir.join("history")),
            dead_letter_dir: crate::pipeline::dead_letter::DeadLetters::new(state_dir)
                .dir()
                .to_path_buf(),
            registry: config
                .devices
                .iter()
                .map(|d| (d.id.clone(), d.kind.clone()))
                .collect(),
            token_key: token_key(&state_dir.join(TOKEN_KEY_FILE)),
            csp: http::HeaderValue::from_str(&csp)?,
            auth,
            renders: Arc::new(tokio::sync::Semaphore::new(RENDER_SLOTS)),
            board: Mutex::new(None),
            pages: Mutex::new(VecDeque::new()),
        })
    }

    /// The token of `device`'s page.
    pub fn token(&self, device: &str) -> String {
        device_token(&self.token_key, device)
    }

    /// Answer a console request (`path` passed [`is_console_path`]).
    pub async fn answer(
        &self,
        source: &Arc<dyn Source>,
        headers: &HeaderMap,
        path: &str,
        peer: SocketAddr,
        head: bool,
    ) -> Response<Full<Bytes>> {
        match self.check(headers, peer).await {
            Verdict::Allowed => {}
            Verdict::Refused => {
                let mut r = self.html(StatusCode::UNAUTHORIZED, refused_page(), head);
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static(
                        "Basic realm=\"wardgate console\", charset=\"UTF-8\"",
                    ),
                );
                return r;
            }
            Verdict::Busy => return self.busy(head),
        }
        let s = source.clone();
        let status = match tokio::task::spawn_blocking(move || s.status()).await {
            Ok(st) => st,
            Err(e) => {
                return self.html(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    message_page("Error", &format!("cannot take a status snapshot: {e}")),
                    head,
                )
            }
        };
        let health = source.supervisor().health();
        let now = crate::clock::now_ms();
        if path == "/" {
            let Some(board) = self.board(now).await else {
                return self.busy(head);
            };
            let body = self.overview(&status, &health, &board, now);
            return self.html(StatusCode::OK, body, head);
        }
        let token = &path[DEVICE_PREFIX.len()..];
        let board = self.cached_board();
        let Some(device) = self.resolve(token, &status, board.as_deref()) else {
            return self.html(
                StatusCode::NOT_FOUND,
                message_page(
                    "No such device",
                    "This device page does not exist (any more): go back to the overview.",
                ),
                head,
            );
        };
        let Some(page) = self.device_page(&device, now).await else {
            return self.busy(head);
        };
        let body = self.device(&device, &status, &page, now);
        self.html(StatusCode::OK, body, head)
    }

    /// The device whose token is `token`, among every device the console knows.
    fn resolve(&self, token: &str, status: &Status, board: Option<&Board>) -> Option<String> {
        if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        known_devices(&self.registry, status, board)
            .into_iter()
            .find(|d| constant_time_eq(self.token(d).as_bytes(), token.as_bytes()))
    }

    async fn check(&self, headers: &HeaderMap, peer: SocketAddr) -> Verdict {
        let Some(auth) = &self.auth else {
            return Verdict::Allowed;
        };
        let verdict = match basic_credentials(headers) {
            None => Verdict::Refused,
            Some((user, password)) => {
                let user_ok = constant_time_eq(user.as_bytes(), auth.user.as_bytes());
                if user_ok && auth.cache.hit(&auth.user, &auth.phc, &password) {
                    return Verdict::Allowed;
                }
                let Ok(Ok(turn)) =
                    tokio::time::timeout(AUTH_WAIT, auth.turn.clone().acquire_owned()).await
                else {
                    return Verdict::Busy;
                };
                let phc = auth.phc.clone();
                let pw = password.clone();
                // A fresh argon2 area per check (one at a time): nothing is kept between them.
                let verified = tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    let mut scratch = crate::gatekeeper::login::Scratch::default();
                    crate::registry::verify_phc(&phc, &pw, &mut scratch)
                })
                .await
                .unwrap_or(false);
                if verified && user_ok {
                    auth.cache
                        .insert(&Arc::from(auth.user.as_str()), &auth.phc, &password);
                    Verdict::Allowed
                } else {
                    Verdict::Refused
                }
            }
        };
        if verdict == Verdict::Refused {
            let n = auth.refused.fetch_add(1, Relaxed) + 1;
            let mut last = auth.last_report.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() >= REFUSAL_REPORT_EVERY) {
                *last = Some(Instant::now());
                log::warn!(
                    peer:% = peer.ip(), refused_total = n;
                    "console: refused a request without valid credentials from {}; {n} refused since start (at most one such line per {}s)",
                    peer.ip(),
                    REFUSAL_REPORT_EVERY.as_secs()
                );
            }
        }
        verdict
    }

    fn cached_board(&self) -> Option<Arc<Board>> {
        let b = self.board.lock().unwrap_or_else(|e| e.into_inner());
        b.as_ref().map(|(_, b)| b.clone())
    }

    /// The last hour's board, read again when older than [`BOARD_TTL`]; `None` when no render
    /// slot came in time.
    async fn board(&self, now: i64) -> Option<Arc<Board>> {
        let fresh = |c: &Mutex<Option<(Instant, Arc<Board>)>>| {
            let b = c.lock().unwrap_or_else(|e| e.into_inner());
            b.as_ref()
                .filter(|(at, _)| at.elapsed() < BOARD_TTL)
                .map(|(_, b)| b.clone())
        };
        if let Some(b) = fresh(&self.board) {
            return Some(b);
        }
        let Some(dir) = self.history_dir.clone() else {
            return Some(Arc::new(Board::default()));
        };
        let slot = tokio::time::timeout(RENDER_WAIT, self.renders.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        // Someone may have read it while this request waited.
        if let Some(b) = fresh(&self.board) {
            return Some(b);
        }
        let board = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            Board::scan(&dir, now, SCAN_BUDGET)
        })
        .await
        .unwrap_or_else(|e| Board {
            error: Some(format!("the history read failed: {e}")),
            ..Board::default()
        });
        let board = Arc::new(board);
        *self.board.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), board.clone()));
        Some(board)
    }

    /// `device`'s page data, read again when older than [`PAGE_TTL`]; `None` when no render
    /// slot came in time.
    async fn device_page(&self, device: &str, now: i64) -> Option<Arc<DevicePage>> {
        let fresh = |c: &Mutex<VecDeque<(String, Instant, Arc<DevicePage>)>>| {
            let pages = c.lock().unwrap_or_else(|e| e.into_inner());
            pages
                .iter()
                .find(|(d, at, _)| d == device && at.elapsed() < PAGE_TTL)
                .map(|(_, _, p)| p.clone())
        };
        if let Some(p) = fresh(&self.pages) {
            return Some(p);
        }
        let slot = tokio::time::timeout(RENDER_WAIT, self.renders.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        if let Some(p) = fresh(&self.pages) {
            return Some(p);
        }
        let (history, dead, id) = (
            self.history_dir.clone(),
            self.dead_letter_dir.clone(),
            device.to_owned(),
        );
        let page = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            DevicePage::scan(history.as_deref(), &dead, &id, now, SCAN_BUDGET)
        })
        .await
        .unwrap_or_else(|e| DevicePage {
            error: Some(format!("the history read failed: {e}")),
            ..DevicePage::default()
        });
        let page = Arc::new(page);
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages.retain(|(d, _, _)| d != device);
        if pages.len() >= PAGE_CACHE {
            pages.pop_front();
        }
        pages.push_back((device.to_owned(), Instant::now(), page.clone()));
        Some(page)
    }

    fn busy(&self, head: bool) -> Response<Full<Bytes>> {
        let mut r = self.html(
            StatusCode::SERVICE_UNAVAILABLE,
            message_page(
                "Busy",
                "The console is busy with other pages; this one reloads in a moment.",
            ),
            head,
        );
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("5"),
        );
        r
    }

    fn html(&self, code: StatusCode, body: String, head: bool) -> Response<Full<Bytes>> {
        let mut r = super::reply(code, "text/html; charset=utf-8", body, head);
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_SECURITY_POLICY, self.csp.clone());
        for (name, value) in [
            (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (http::header::REFERRER_POLICY, "no-referrer"),
            (http::header::X_FRAME_OPTIONS, "DENY"),
        ] {
            h.insert(name, http::HeaderValue::from_static(value));
        }
        r
    }
}

/// Every device the console knows: registered at start, metered, in the pipeline's counters,
/// in the defender's lists, or on the board; sorted.
fn known_devices(
    registry: &BTreeMap<String, String>,
    s: &Status,
    board: Option<&Board>,
) -> BTreeSet<String> {
    let mut all: BTreeSet<String> = registry.keys().cloned().collect();
    all.extend(s.devices.iter().map(|d| d.device_id.clone()));
    all.extend(s.pipeline.iter().map(|d| d.device_id.clone()));
    all.extend(
        active_violations(s)
            .into_iter()
            .map(|v| v.thing_name.clone()),
    );
    all.extend(quarantines(s).into_iter().map(|q| q.device_id.clone()));
    if let Some(b) = board {
        all.extend(b.devices.keys().cloned());
    }
    all
}

fn active_violations(s: &Status) -> Vec<&crate::defender::ActiveViolation> {
    s.defender.iter().flat_map(|d| d.active.iter()).collect()
}

fn quarantines(s: &Status) -> Vec<&crate::defender::quarantine::Entry> {
    s.defender
        .iter()
        .flat_map(|d| d.quarantined.iter())
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The page token of `device` under `key` (see the module doc).
pub fn device_token(key: &[u8; 32], device: &str) -> String {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key)
        .expect("HMAC takes a key of any length");
    mac.update(b"wardgate console device page\0");
    mac.update(device.as_bytes());
    let tag = mac.finalize().into_bytes();
    tag[..16]
        .iter()
        .fold(String::with_capacity(32), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The key of the page tokens: read from `path`, or made and written there (0600) the first
/// time. If it cannot be kept, a key for this run only (tokens change at the next start).
fn token_key(path: &Path) -> [u8; 32] {
    use rand::RngCore as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Ok(bytes) = std::fs::read(path) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return key;
        }
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let tmp = path.with_extension("tmp");
    let kept = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = kept {
        log::warn!(
            path:% = path.display(), error:% = e;
            "console: cannot keep the key of the device pages' addresses in {}: {e}; they change at every start until it can",
            path.display()
        );
    }
    key
}

/// User and password of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, Vec<u8>)> {
    use base64::Engine as _;
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Row, RowKind};
    use base64::Engine as _;

    pub(super) const MIN: i64 = 60_000;

    pub(super) fn row(
        device: &str,
        record: RowKind,
        metric: &str,
        value: Option<f64>,
        at: i64,
    ) -> Row {
        Row {
            record,
            device: device.into(),
            kind: "pacemaker".into(),
            metric: metric.into(),
            value,
            unit: if record == RowKind::Reading {
                "/min".into()
            } else {
                String::new()
            },
            quality: if record == RowKind::Violation {
                "in-alarm".into()
            } else {
                "good".into()
            },
            observed_ms: at,
            received_ms: at,
            detail: if record == RowKind::Alert {
                "{\"heartbeat\":150,\"note\":\"<b>\"}".into()
            } else {
                String::new()
            },
        }
    }

    /// A status snapshot with `devices` (id, connected) and one active violation of pm-02.
    pub(super) fn status(devices: &[(&str, bool)]) -> Status {
        let counters = serde_json::to_value(crate::metering::Counters::default()).unwrap();
        let window = serde_json::json!({
            "start_s": 0, "length_s": 300, "counters": counters, "source_addresses": []
        });
        let devices: Vec<serde_json::Value> = devices
            .iter()
            .map(|(id, connected)| {
                serde_json::json!({
                    "device_id": id, "connected": connected, "peer": null, "listener": "plain",
                    "totals": counters, "current": window, "history": []
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "gateway_id": "ward7-gw", "version": "0", "pid": 1, "started_at": "",
            "updated_at": "", "running": true, "listeners": [], "readings": 0,
            "gateway": serde_json::to_value(crate::metering::GatewayCountersSnapshot::default()).unwrap(),
            "devices": devices,
            "uplink": {"endpoint": "iot.example", "connected": false, "batches_acked": 0,
                       "records_delivered": 0, "connection_errors": 3},
            "defender": {"profiles": 1, "reports_accepted": 0, "reports_rejected": 0,
                         "own_reports": 0, "evaluations": 0, "events": [1, 0, 0],
                         "active": [{"violation_id": "v1", "thing_name": "pm-02",
                                     "security_profile_name": "ward", "behavior": "msgs<x>",
                                     "metric": "aws:num-messages-sent", "since_ms": 0,
                                     "metric_value": {"count": 9}}],
                         "quarantined": []},
            "rules": [{"name": "tachycardia", "matched": 3, "fired": 2, "debounced": 1,
                       "action_failures": 0, "loops_stopped": 0}]
        }))
        .expect("a status snapshot")
    }

    pub(super) fn console(dir: &Path, hash: Option<String>) -> Console {
        let mut c = Config::default();
        c.gateway.state_dir = dir.to_path_buf();
        c.gateway.id = "ward7-gw".into();
        c.devices = vec![crate::config::DeviceConfig::with_password(
            "pm-01",
            "pacemaker",
            crate::registry::hash_password_demo("x"),
        )];
        c.http.console_password_hash = hash;
        Console::new(&c).unwrap()
    }

    pub(super) fn health() -> crate::supervisor::Health {
        crate::supervisor::Health {
            stopping: false,
            unhealthy: vec![],
            stages: vec![],
        }
    }

    /// The page parsed as XML (every page is well-formed), and its text.
    pub(super) fn parse(page: &str) -> String {
        let doc = roxmltree::Document::parse_with_options(
            page,
            roxmltree::ParsingOptions {
                allow_dtd: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{page}"));
        doc.descendants()
            .filter(|n| n.is_text())
            .filter_map(|n| n.text())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tokens_are_stable_opaque_and_keyed() {
        let dir = tempfile::tempdir().unwrap();
        let a = console(dir.path(), None);
        let t = a.token("pm-01");
        assert_eq!(t.len(), 32);
        assert!(!t.contains("pm"));
        assert_ne!(t, a.token("pm-02"));
        // The key is kept: the same token after a restart.
        assert_eq!(console(dir.path(), None).token("pm-01"), t);
        let key = std::fs::metadata(dir.path().join(TOKEN_KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        // Another gateway, another key.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(console(other.path(), None).token("pm-01"), t);
    }

    #[test]
    fn basic_credentials_are_parsed_and_anything_else_is_not() {
        let header = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            basic_credentials(&header(&format!("Basic {}", enc("operator:pa:ss")))),
            Some(("operator".into(), b"pa:ss".to_vec()))
        );
        assert_eq!(
            basic_credentials(&header(&format!("basic {}", enc("u:")))),
            Some(("u".into(), vec![]))
        );
        assert_eq!(
            basic_credentials(&header(&format!("Bearer {}", enc("u:p")))),
            None
        );
        assert_eq!(basic_credentials(&header("Basic !!!")), None);
        assert_eq!(
            basic_credentials(&header(&format!("Basic {}", enc("nocolon")))),
            None
        );
        assert_eq!(basic_credentials(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn the_credential_is_checked_and_a_good_one_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let c = console(
            dir.path(),
            Some(crate::registry::hash_password_demo("s3cret")),
        );
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let with = |user: &str, pw: &str| {
            let mut h = HeaderMap::new();
            let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
            h.insert(
                http::header::AUTHORIZATION,
                format!("Basic {v}").parse().unwrap(),
            );
            h
        };
        assert_eq!(c.check(&HeaderMap::new(), peer).await, Verdict::Refused);
        assert_eq!(
            c.check(&with("operator", "wrong"), peer).await,
            Verdict::Refused
        );
        assert_eq!(
            c.check(&with("intruder", "s3cret"), peer).await,
            Verdict::Refused
        );
        let auth = c.auth.as_ref().unwrap();
        assert!(auth.cache.is_empty(), "nothing refused is remembered");
        assert_eq!(
            c.check(&with("operator", "s3cret"), peer).await,
            Verdict::Allowed
        );
        assert_eq!(auth.cache.len(), 1);
        assert!(auth.cache.hit("operator", &auth.phc, b"s3cret"));
        assert_eq!(
            c.check(&with("operator", "s3cret"), peer).await,
            Verdict::Allowed
        );
        assert_eq!(auth.refused.load(Relaxed), 3);
        // Without a configured credential (loopback), everyone is let in.
        let open = console(dir.path(), None);
        assert_eq!(open.check(&HeaderMap::new(), peer).await, Verdict::Allowed);
    }
}
