//! A stand-in for AWS IoT Core in tests: a real mosquitto (Debian package) with TLS,
//! `require_certificate true` and a persistent session store, its certificates made by rcgen,
//! a "cloud" subscriber on it, and a gateway configuration forwarding to it. Shared by every
//! test that needs an upstream.

use crate::pki::{Ca, Issued};
use crate::{config, device};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running mosquitto; stopped when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    conf: PathBuf,
    port: u16,
}

impl Mosquitto {
    /// Write mosquitto's configuration and certificates into `dir`.
    pub fn config(dir: &Path, port: u16, ca: &Ca, server: &Issued) -> PathBuf {
        std::fs::write(dir.join("mq-ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("mq-server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("mq-server.key"), &server.key_pem).unwrap();
        std::fs::create_dir_all(dir.join("mq-data")).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings true\npersistence true\npersistence_location {d}/mq-data/\nautosave_interval 1\n\
                 listener {port} 127.0.0.1\ncafile {d}/mq-ca.pem\ncertfile {d}/mq-server.pem\nkeyfile {d}/mq-server.key\n\
                 require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
                d = dir.display()
            ),
        )
        .unwrap();
        conf
    }

    /// Start mosquitto and wait until it listens.
    pub fn start(conf: PathBuf, port: u16) -> Mosquitto {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package) is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto {
            child: Some(child),
            conf,
            port,
        }
    }

    /// Stop it (SIGTERM) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    /// Stop and start again on the same port, with the same session store.
    pub fn restart(&mut self) {
        self.stop();
        *self = Mosquitto::start(self.conf.clone(), self.port);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stand-in for IoT Core: a CA, mosquitto's server certificate, the gateway's and the cloud
/// subscriber's client certificates, a free port and mosquitto's configuration (not started).
#[derive(Debug)]
pub struct Upstream {
    /// Where its files live.
    pub dir: tempfile::TempDir,
    /// The CA of every certificate here.
    pub ca: Ca,
    /// The gateway's client certificate (CN `test-gateway`).
    pub gateway_cert: Issued,
    /// The cloud subscriber's client certificate.
    pub cloud_cert: Issued,
    /// mosquitto's port.
    pub port: u16,
    /// mosquitto's configuration file.
    pub conf: PathBuf,
}

impl Upstream {
    /// Certificates, a free port and the configuration; mosquitto is not started yet.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::new("Upstream CA");
        let mq_server = ca.server();
        let gateway_cert = ca.device("test-gateway");
        let cloud_cert = ca.device("cloud-subscriber");
        let port = free_port();
        let conf = Mosquitto::config(dir.path(), port, &ca, &mq_server);
        Upstream {
            dir,
            ca,
            gateway_cert,
            cloud_cert,
            port,
            conf,
        }
    }

    /// Start mosquitto on the port.
    pub fn broker(&self) -> Mosquitto {
        Mosquitto::start(self.conf.clone(), self.port)
    }

    /// The cloud subscriber on the gateway's telemetry topic.
    pub async fn subscriber(&self) -> tokio::sync::mpsc::UnboundedReceiver<(u64, f64)> {
        cloud_subscriber(
            self.port,
            &self.ca,
            &self.cloud_cert,
            "wardgate/test-gateway/readings",
        )
        .await
    }

    /// A cloud subscriber on `topics`, yielding (topic, payload).
    pub async fn raw_subscriber(
        &self,
        topics: &[&str],
    ) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)> {
        cloud_subscriber_raw(self.port, &self.ca, &self.cloud_cert, topics).await
    }

    /// A gateway configuration forwarding here.
    pub fn gateway_config(&self) -> wardgate::config::Config {
        upstream_config(self.dir.path(), self.port, &self.ca, &self.gateway_cert)
    }
}

/// A port nobody listens on now (for mosquitto, which cannot report the one it bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Write `text` to `dir/name`; the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A "cloud" subscriber on mosquitto with a persistent session; yields (seq, heart rate).
pub async fn cloud_subscriber(
    port: u16,
    ca: &Ca,
    me: &Issued,
    topic: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(u64, f64)> {
    let mut raw = cloud_subscriber_raw(port, ca, me, &[topic]).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((_, payload)) = raw.recv().await {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(v["gateway_id"], "test-gateway");
            for (seq, m) in wardgate::uplink::batch::expand(&v).unwrap() {
                let hr = m["readings"][0]["value"].as_f64().unwrap();
                let _ = tx.send((seq, hr));
            }
        }
    });
    rx
}

/// A "cloud" subscriber on mosquitto with a persistent session; yields (topic, payload) of
/// every message on `topics`.
pub async fn cloud_subscriber_raw(
    port: u16,
    ca: &Ca,
    me: &Issued,
    topics: &[&str],
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    cloud_client(
        port,
        ca,
        me,
        "cloud-subscriber",
        &topics,
        move |_, topic, payload| {
            let _ = tx.send((topic.to_string(), payload.to_vec()));
        },
    )
    .await;
    rx
}

/// A client of mosquitto with `me`'s certificate and a persistent session, subscribed to
/// `topics` (returns once every SUBACK is in); `on_publish` gets every message.
async fn cloud_client<F>(
    port: u16,
    ca: &Ca,
    me: &Issued,
    id: &str,
    topics: &[String],
    mut on_publish: F,
) -> AsyncClient
where
    F: FnMut(&AsyncClient, &str, &[u8]) + Send + 'static,
{
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(me.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(me.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let mut o = MqttOptions::new(id, "localhost", port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    let (client, mut el) = AsyncClient::new(o, 1000);
    for topic in topics {
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    }
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let wanted = topics.len();
    let own = client.clone();
    tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        let mut subacks = 0;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&own, &p.topic, &p.payload),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    assert!(
                        ack.return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                        "mosquitto refused a subscription: {ack:?}"
                    );
                    subacks += 1;
                    if subacks == wanted {
                        if let Some(t) = subscribed_tx.take() {
                            let _ = t.send(());
                        }
                    }
                }
                Ok(_) => {}
                // A broker being restarted by the test: rumqttc reconnects on the next poll.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    // Mosquitto keeps the session (clean_session false): once every SUBACK is here, whatever
    // is published on the topics reaches this client, also across a restart.
    tokio::time::timeout(Duration::from_secs(20), subscribed)
        .await
        .expect("SUBACK for every topic within 20 s")
        .expect("client running");
    client
}

/// Gateway with the upstream at `port`, for in-process tests.
pub fn upstream_config(
    dir: &Path,
    port: u16,
    ca: &Ca,
    gateway_cert: &Issued,
) -> wardgate::config::Config {
    let mut cfg = config(&dir.join("state"), vec![device("pm-01", "pacemaker", "pw")]);
    cfg.upstream.enabled = true;
    cfg.upstream.endpoint = "localhost".into();
    cfg.upstream.port = port;
    cfg.upstream.ca_file = Some(write(dir, "up-ca.pem", &ca.cert.pem()));
    cfg.upstream.cert_file = Some(write(dir, "gw.pem", &gateway_cert.cert_pem));
    cfg.upstream.key_file = Some(write(dir, "gw.key", &gateway_cert.key_pem));
    cfg.upstream.max_linger = Duration::from_millis(20);
    cfg.upstream.max_backoff = Duration::from_secs(1);
    cfg
}

/// IoT Core's shadow service for the gateway's thing, on the mosquitto stand-in: answers the
/// gateway's `/update` and `/get` on `$aws/things/test-gateway/shadow/name/<device>/…` with the
/// payloads IoT Core publishes (computed by wardgate's own, table-tested, shadow documents),
/// and lets a test change a shadow the way the AWS console would.
#[derive(Debug, Clone)]
pub struct CloudShadows {
    client: AsyncClient,
    docs: Docs,
}

/// The cloud's shadow documents, by name.
type Docs = Arc<std::sync::Mutex<std::collections::HashMap<String, wardgate::shadow::Document>>>;

impl CloudShadows {
    const PREFIX: &'static str = "$aws/things/test-gateway/shadow/name/";

    /// Connect (persistent session) and subscribe; returns once subscribed.
    pub async fn start(up: &Upstream) -> CloudShadows {
        let docs: Docs = Default::default();
        let topics = ["update", "get"].map(|op| format!("{}+/{op}", Self::PREFIX));
        let served = docs.clone();
        let client = cloud_client(
            up.port,
            &up.ca,
            &up.cloud_cert,
            "cloud-shadow-service",
            &topics,
            move |client, topic, payload| Self::answer(client, &served, topic, payload),
        )
        .await;
        CloudShadows { client, docs }
    }

    fn now_s() -> i64 {
        wardgate::clock::now_ms() / 1000
    }

    fn publish(client: &AsyncClient, topic: String, v: &serde_json::Value) {
        client
            .try_publish(topic, QoS::AtLeastOnce, false, v.to_string())
            .expect("room in the cloud's request channel");
    }

    fn answer(client: &AsyncClient, docs: &Docs, topic: &str, payload: &[u8]) {
        let Some(rest) = topic.strip_prefix(Self::PREFIX) else {
            return;
        };
        let Some((name, op)) = rest.split_once('/') else {
            return;
        };
        let prefix = format!("{}{name}", Self::PREFIX);
        let limits = wardgate::shadow::Limits::default();
        let mut docs = docs.lock().unwrap();
        let doc = docs.entry(name.to_string()).or_default();
        match op {
            "update" => match doc.update(payload, Self::now_s(), &limits) {
                Ok(u) => {
                    Self::publish(client, format!("{prefix}/update/accepted"), &u.accepted);
                    if let Some(d) = u.delta {
                        Self::publish(client, format!("{prefix}/update/delta"), &d);
                    }
                    Self::publish(client, format!("{prefix}/update/documents"), &u.documents);
                }
                Err(r) => Self::publish(
                    client,
                    format!("{prefix}/update/rejected"),
                    &r.to_json(Self::now_s()),
                ),
            },
            "get" => match doc.get(payload, Self::now_s(), name, &limits) {
                Ok(v) => Self::publish(client, format!("{prefix}/get/accepted"), &v),
                Err(r) => Self::publish(
                    client,
                    format!("{prefix}/get/rejected"),
                    &r.to_json(Self::now_s()),
                ),
            },
            _ => {}
        }
    }

    /// Change `name`'s desired state as the console would; with `announce`, publish its
    /// `/update/documents` (as IoT Core does to connected subscribers).
    pub fn set_desired(&self, name: &str, desired: serde_json::Value, announce: bool) {
        let request = serde_json::json!({ "state": { "desired": desired } }).to_string();
        let mut docs = self.docs.lock().unwrap();
        let doc = docs.entry(name.to_string()).or_default();
        let u = doc
            .update(
                request.as_bytes(),
                Self::now_s(),
                &wardgate::shadow::Limits::default(),
            )
            .expect("a valid desired change");
        if announce {
            Self::publish(
                &self.client,
                format!("{}{name}/update/documents", Self::PREFIX),
                &u.documents,
            );
        }
    }

    /// `name`'s shadow as `/get/accepted` would show it (`None`: it does not exist).
    pub fn shadow(&self, name: &str) -> Option<serde_json::Value> {
        let docs = self.docs.lock().unwrap();
        docs.get(name)?
            .get(
                b"",
                Self::now_s(),
                name,
                &wardgate::shadow::Limits::default(),
            )
            .ok()
    }
}
