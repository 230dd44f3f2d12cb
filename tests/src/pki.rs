//! Test PKI made with rcgen: ward CAs, the gateway's server certificate, device certificates
//! (good, expired, revoked, from a foreign CA) and a CRL; plus TLS client helpers.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A certificate authority.
pub struct Ca {
    /// Its certificate.
    pub cert: rcgen::Certificate,
    key: KeyPair,
    next_serial: u64,
}

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: String,
    /// Serial number.
    pub serial: u64,
    /// DER of the certificate.
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("next_serial", &self.next_serial)
            .finish()
    }
}

impl Ca {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            cert,
            key,
            next_serial: 1000,
        }
    }

    fn issue(
        &mut self,
        cn: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
        valid: (OffsetDateTime, OffsetDateTime),
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = valid.0;
        p.not_after = valid.1;
        self.next_serial += 1;
        p.serial_number = Some(SerialNumber::from(self.next_serial));
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: self.next_serial,
            der: cert.der().to_vec(),
        }
    }

    fn now_valid() -> (OffsetDateTime, OffsetDateTime) {
        let now = OffsetDateTime::now_utc();
        (now - TimeDuration::days(1), now + TimeDuration::days(365))
    }

    /// The gateway's server certificate for 127.0.0.1 / localhost.
    pub fn server(&mut self) -> Issued {
        self.issue(
            "wardgate",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
            Self::now_valid(),
        )
    }

    /// A device certificate with CN = `id`.
    pub fn device(&mut self, id: &str) -> Issued {
        self.issue(
            id,
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            Self::now_valid(),
        )
    }

    /// A device certificate whose CN is a label and whose SAN (DNS name) is the device id.
    pub fn device_by_san(&mut self, label: &str, id: &str) -> Issued {
        self.issue(
            label,
            vec![SanType::DnsName(id.try_into().unwrap())],
            ExtendedKeyUsagePurpose::ClientAuth,
            Self::now_valid(),
        )
    }

    /// A device certificate with CN = `id` that expired yesterday.
    pub fn expired_device(&mut self, id: &str) -> Issued {
        let now = OffsetDateTime::now_utc();
        self.issue(
            id,
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            (now - TimeDuration::days(30), now - TimeDuration::days(1)),
        )
    }

    /// A CRL revoking `serials`.
    pub fn crl(&self, serials: &[u64]) -> String {
        let now = OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now - TimeDuration::hours(1),
            next_update: now + TimeDuration::days(7),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - TimeDuration::minutes(5),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// Files for a TLS listener.
#[derive(Debug, Clone)]
pub struct ListenerFiles {
    /// Server certificate.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
    /// CA bundle.
    pub ca: PathBuf,
    /// CRL.
    pub crl: PathBuf,
}

impl ListenerFiles {
    /// Write the server certificate, a CA bundle of `cas` and a CRL into `dir`.
    pub fn write(dir: &Path, server: &Issued, cas: &[&Ca], crl_pem: &str) -> Self {
        let f = ListenerFiles {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            ca: dir.join("ward-ca.crt"),
            crl: dir.join("ward-ca.crl"),
        };
        std::fs::write(&f.cert, &server.cert_pem).unwrap();
        std::fs::write(&f.key, &server.key_pem).unwrap();
        let bundle: String = cas.iter().map(|c| c.cert.pem()).collect();
        std::fs::write(&f.ca, bundle).unwrap();
        std::fs::write(&f.crl, crl_pem).unwrap();
        f
    }

    /// The listener configuration for these files on `127.0.0.1:0`.
    pub fn config(&self) -> wardgate::config::TlsListenerConfig {
        wardgate::config::TlsListenerConfig {
            enabled: true,
            address: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            ca_file: self.ca.clone(),
            crl_file: Some(self.crl.clone()),
            min_version: Default::default(),
        }
    }
}

/// Open TLS to `addr`, trusting `server_ca`, optionally presenting a client certificate.
/// Returns the stream and the server certificate it saw.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    server_ca: &Ca,
    client: Option<&Issued>,
) -> std::io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
    tls_connect_pem(addr, &server_ca.cert.pem(), client).await
}

/// [`tls_connect`] trusting the CA certificate in `server_ca_pem`.
pub async fn tls_connect_pem(
    addr: std::net::SocketAddr,
    server_ca_pem: &str,
    client: Option<&Issued>,
) -> std::io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(server_ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let chain = vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let seen = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    Ok((tls, seen))
}
