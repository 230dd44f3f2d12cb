//! `packaging/pki/ward-pki` (the documented way to run a ward CA with OpenSSL) produces files
//! wardgate accepts: the CA, the server certificate, device certificates, and a CRL that
//! really revokes.

use rumqttc::mqttbytes::v4::ConnectReturnCode;
use std::path::Path;
use std::process::Command;
use wardgate::config::AuthMode;
use wardgate_tests::pki::{tls_connect_pem, Issued};
use wardgate_tests::{device, Raw, Rig, RigOptions};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/pki/ward-pki");

fn pki(args: &[&str]) {
    let o = Command::new("sh")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("sh runs");
    assert!(
        o.status.success(),
        "ward-pki {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn issued(dir: &Path, id: &str) -> Issued {
    Issued {
        cert_pem: std::fs::read_to_string(dir.join(format!("devices/{id}.crt"))).unwrap(),
        key_pem: std::fs::read_to_string(dir.join(format!("devices/{id}.key"))).unwrap(),
        serial: 0,
        der: Vec::new(),
    }
}

#[tokio::test]
async fn ward_pki_output_works_with_the_tls_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ward7-pki");
    let d = dir.to_str().unwrap();
    pki(&["init", d, "Ward 7 CA"]);
    pki(&["server", d, "wardgate", "DNS:localhost", "IP:127.0.0.1"]);
    pki(&["device", d, "pm-01"]);
    pki(&["device", d, "pm-02"]);
    pki(&["revoke", d, "pm-02"]);

    let devices = ["pm-01", "pm-02"]
        .iter()
        .map(|id| {
            let mut c = device(id, "pacemaker", "x");
            c.password_hash = None;
            c.auth = Some(AuthMode::Certificate);
            c
        })
        .collect();
    let mut o = RigOptions::new(devices);
    o.tls = Some(wardgate::config::TlsListenerConfig {
        enabled: true,
        address: "127.0.0.1:0".parse().unwrap(),
        cert_file: dir.join("server.crt"),
        key_file: dir.join("server.key"),
        ca_file: dir.join("ca.crt"),
        crl_file: Some(dir.join("ca.crl")),
        min_version: Default::default(),
    });
    let rig = Rig::start(o).await;
    let ca = std::fs::read_to_string(dir.join("ca.crt")).unwrap();

    let (s, _) = tls_connect_pem(rig.addr, &ca, Some(&issued(&dir, "pm-01")))
        .await
        .expect("handshake with the script's server certificate");
    assert_eq!(
        Raw::new(s).connect("pm-01", None).await,
        Some(ConnectReturnCode::Success)
    );
    let refused = match tls_connect_pem(rig.addr, &ca, Some(&issued(&dir, "pm-02"))).await {
        Ok((s, _)) => Raw::new(s).connect("pm-02", None).await,
        Err(_) => None,
    };
    assert_eq!(refused, None, "the revoked device must not get a CONNACK");
}
