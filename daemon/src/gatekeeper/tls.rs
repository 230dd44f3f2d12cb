//! TLS for the device listener: server certificate, ward CA bundle, CRLs, client identities.
//!
//! Material is loaded into an immutable `rustls::ServerConfig`; [`TlsState`] holds the current
//! one and swaps it whole on reload. Connections already established keep the config they
//! were handshaken with; new handshakes use the new one. A reload that fails (unreadable file,
//! no certificate, key that does not parse, CRL that does not parse) changes nothing.
//!
//! Client certificates are optional at the TLS layer (`allow_unauthenticated`): a device whose
//! registry entry allows password login may connect over TLS without one. A presented
//! certificate must chain to one of the CAs in `ca_file` (every CA in the file is trusted), be
//! within its validity period and not be revoked by any CRL in `crl_file` (certificates of a
//! CA with no CRL in the file are not revocation-checked); otherwise the handshake fails. The device identity is then the certificate's subject CN or one of its
//! SAN names; the registry decides whether it matches the CONNECT's client id.
//!
//! ALPN: [`ALPN`] (`x-amzn-mqtt-ca`, as IoT Core on port 443, and `mqtt`), so devices made
//! for IoT Core on 443 (AWS's SDKs and Device Defender agent have no port option) connect to
//! a listener on 443 unchanged.
//!
//! One crypto provider (ring) is used everywhere, passed explicitly.

use crate::config::{TlsListenerConfig, TlsVersion};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{key} ({}): {problem}", path.display())]
pub struct TlsError {
    /// The configuration key naming the file.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

fn err(key: &'static str, path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

/// The process-wide crypto provider (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(key, path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(key, path, "no CERTIFICATE found in the PEM file"));
    }
    Ok(certs)
}

/// Build a server config from the files `cfg` names.
pub fn load(cfg: &TlsListenerConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certs("listeners.tls.cert_file", &cfg.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| {
        err(
            "listeners.tls.key_file",
            &cfg.key_file,
            format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs("listeners.tls.ca_file", &cfg.ca_file)? {
        roots.add(ca).map_err(|e| {
            err(
                "listeners.tls.ca_file",
                &cfg.ca_file,
                format!("bad CA: {e}"),
            )
        })?;
    }
    let crls = match &cfg.crl_file {
        None => Vec::new(),
        Some(path) => CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| err("listeners.tls.crl_file", path, format!("cannot read: {e}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                err(
                    "listeners.tls.crl_file",
                    path,
                    format!("not valid PEM: {e}"),
                )
            })?,
    };
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        // A device certificate whose CA has no CRL in `crl_file` is not revocation-checked
        // (instead of refused): a bundle may hold CAs that publish no CRL.
        .allow_unknown_revocation_status()
        .only_check_end_entity_revocation()
        .allow_unauthenticated()
        .build()
        .map_err(|e| {
            err(
                "listeners.tls.ca_file",
                &cfg.ca_file,
                format!("cannot build the client verifier (CA or CRL invalid): {e}"),
            )
        })?;
    let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS12, &rustls::version::TLS13],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| err("listeners.tls.min_version", Path::new(""), e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            err(
                "listeners.tls.key_file",
                &cfg.key_file,
                format!("key does not match the certificate or is unsupported: {e}"),
            )
        })?;
    let mut config = config;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// ALPN protocols the listener accepts: IoT Core's `x-amzn-mqtt-ca` (what AWS's SDKs and the
/// Device Defender agent offer on port 443) and `mqtt`. A client that offers no ALPN is
/// served too; one that offers only others is refused in the handshake (as IoT Core does).
pub const ALPN: &[&[u8]] = &[b"x-amzn-mqtt-ca", b"mqtt"];

/// The live TLS material of one listener.
#[derive(Debug)]
pub struct TlsState {
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsState {
    /// Load the material or fail.
    pub fn new(cfg: &TlsListenerConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(load(cfg)?),
        })
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-read the files; on error the old material stays in use.
    pub fn reload(&self, cfg: &TlsListenerConfig) -> Result<(), TlsError> {
        let new = load(cfg)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    /// Use `new` (made by [`load`]) for every handshake from now on.
    pub fn install(&self, new: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
    }
}

/// Names the client certificate vouches for: subject CN(s), then SAN DNS names and URIs.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_owned()),
                GeneralName::URI(u) => names.push((*u).to_owned()),
                _ => {}
            }
        }
    }
    names
}
