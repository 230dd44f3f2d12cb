//! HTTPS for the operators' endpoint (`http.tls`): the gateway's own certificate by default
//! (`listeners.tls.cert_file` and `key_file`, the one devices see), or `http.tls_cert_file` and
//! `http.tls_key_file`. No client certificates: the console authenticates people with a
//! password (see [`super::console`]).
//!
//! The files are loaded at start (a broken one stops the start, naming its key) and looked at
//! again at most every [`RECHECK_EVERY`] when a handshake comes: a certificate renewed on disk
//! (as `wardgate reload` picks up for the device listener) is served from the next handshake
//! on, without a restart. A renewed pair that cannot be used (unreadable, key not matching)
//! leaves the old one in use and is reported once per change in the log.
//!
//! What must stay true: a handshake never fails because of a reload, and never waits for more
//! than one look at two small files; the endpoint never serves without a certificate.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Longest time a renewed certificate waits to be noticed.
pub const RECHECK_EVERY: Duration = Duration::from_secs(10);

/// A TLS file of the endpoint that cannot be used.
pub type TlsError = crate::gatekeeper::tls::TlsError;

fn err(key: &'static str, path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

/// The certificate and key files with the configuration keys that name them.
#[derive(Debug, Clone)]
struct Files {
    cert: (&'static str, PathBuf),
    key: (&'static str, PathBuf),
}

impl Files {
    /// Modification times (a change of either means "load again").
    fn stamp(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&self.cert.1), m(&self.key.1))
    }

    fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let (cert_key, cert_path) = (self.cert.0, &self.cert.1);
        let (key_key, key_path) = (self.key.0, &self.key.1);
        let chain = CertificateDer::pem_file_iter(cert_path)
            .map_err(|e| err(cert_key, cert_path, format!("cannot read: {e}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(cert_key, cert_path, format!("not valid PEM: {e}")))?;
        if chain.is_empty() {
            return Err(err(
                cert_key,
                cert_path,
                "no CERTIFICATE found in the PEM file",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
            err(
                key_key,
                key_path,
                format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
            )
        })?;
        let provider = crate::gatekeeper::tls::provider();
        CertifiedKey::from_der(chain, key, &provider)
            .map(Arc::new)
            .map_err(|e| {
                err(
                    key_key,
                    key_path,
                    format!("does not belong to {cert_key} or is unsupported: {e}"),
                )
            })
    }
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
    /// The stamp of a pair that failed to load (reported once).
    failed: Option<(Option<SystemTime>, Option<SystemTime>)>,
}

/// Serves the certificate of [`Files`], loading it again when the files change.
#[derive(Debug)]
struct Reloading {
    files: Files,
    current: Mutex<Current>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut c = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if c.checked.elapsed() >= RECHECK_EVERY {
            c.checked = Instant::now();
            let stamp = self.files.stamp();
            if stamp != c.stamp && c.failed != Some(stamp) {
                match self.files.load() {
                    Ok(key) => {
                        c.key = key;
                        c.stamp = stamp;
                        c.failed = None;
                        log::info!("HTTP endpoint: serving the renewed certificate");
                    }
                    Err(e) => {
                        c.failed = Some(stamp);
                        log::warn!(error:% = e; "HTTP endpoint: the changed certificate cannot be used, the previous one stays: {e}");
                    }
                }
            }
        }
        Some(c.key.clone())
    }
}

/// The TLS acceptor for `cert` and `key` (each with the key naming it), or why not.
pub fn acceptor(
    cert: (&'static str, &Path),
    key: (&'static str, &Path),
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let files = Files {
        cert: (cert.0, cert.1.to_path_buf()),
        key: (key.0, key.1.to_path_buf()),
    };
    let stamp = files.stamp();
    let loaded = files.load()?;
    let resolver = Reloading {
        files,
        current: Mutex::new(Current {
            key: loaded,
            stamp,
            checked: Instant::now(),
            failed: None,
        }),
    };
    let mut config =
        rustls::ServerConfig::builder_with_provider(crate::gatekeeper::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(cert.0, cert.1, e))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen_key();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn rcgen_key() -> rcgen::KeyPair {
        rcgen::KeyPair::generate().unwrap()
    }

    #[test]
    fn broken_files_name_their_key_and_a_matching_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let Err(e) = acceptor(("http.tls_cert_file", &c), ("http.tls_key_file", &k)) else {
            panic!("loaded a certificate that is not there");
        };
        assert_eq!(e.key, "http.tls_cert_file", "{e}");
        let (cert, key) = pair("gw.ward7");
        let (_, other_key) = pair("other");
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &other_key).unwrap();
        let Err(e) = acceptor(
            ("listeners.tls.cert_file", &c),
            ("listeners.tls.key_file", &k),
        ) else {
            panic!("loaded a key of another certificate");
        };
        assert_eq!(e.key, "listeners.tls.key_file");
        assert!(e.to_string().contains("does not belong to"), "{e}");
        std::fs::write(&k, &key).unwrap();
        acceptor(("http.tls_cert_file", &c), ("http.tls_key_file", &k)).unwrap();
    }
}
