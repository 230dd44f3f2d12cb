//! The device registry: which devices may connect and how they prove who they are.
//!
//! Built from `[[devices]]`; replaced as a whole on reload (SIGHUP), so a connection
//! authenticates against one consistent snapshot. Passwords are only ever held as argon2 PHC
//! strings; verification is CPU-heavy on purpose and runs on the blocking pool.
//!
//! What must stay true: every refusal of a CONNECT that carried a password costs one argon2
//! verification — an unknown id, a certificate-only device without its certificate, a device
//! without a password credential are checked against a dummy hash — so timing does not reveal
//! which device ids exist or how they authenticate.

use crate::config::{AuthMode, DeviceConfig, PolicyConfig};
use crate::gatekeeper::policy::TopicPolicy;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

/// One registered device, as the rest of the gateway sees it.
#[derive(Debug)]
pub struct Device {
    /// Device id (= MQTT client id).
    pub id: Arc<str>,
    /// Device kind.
    pub kind: Arc<str>,
    /// Plugin that normalises its payloads.
    pub plugin: Arc<str>,
    /// How it must authenticate.
    pub auth: AuthMode,
    /// What it may publish and subscribe to.
    pub policy: TopicPolicy,
    /// Settings for its plugin.
    pub settings: Arc<std::collections::BTreeMap<String, String>>,
    password_hash: Option<String>,
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No device with that client id is registered.
    UnknownDevice,
    /// The CONNECT carried no password.
    MissingPassword,
    /// The password does not match the stored hash.
    WrongPassword,
    /// The device has no password credential.
    NoPasswordCredential,
    /// The device must present a client certificate and did not.
    CertificateRequired,
    /// The client certificate names a different device.
    CertificateMismatch,
}

impl AuthFailure {
    /// A short reason for the journal.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::UnknownDevice => "unknown device id",
            AuthFailure::MissingPassword => "no password given",
            AuthFailure::WrongPassword => "wrong password",
            AuthFailure::NoPasswordCredential => "device has no password credential",
            AuthFailure::CertificateRequired => "client certificate required",
            AuthFailure::CertificateMismatch => "client certificate names another device",
        }
    }
}

/// An immutable snapshot of the registered devices.
#[derive(Debug, Default)]
pub struct Registry {
    devices: HashMap<Arc<str>, Arc<Device>>,
}

impl Registry {
    /// Build from validated configuration entries and the default policy.
    pub fn from_config(devices: &[DeviceConfig], policy: &PolicyConfig) -> Self {
        let devices = devices
            .iter()
            .map(|d| {
                let dev = Arc::new(Device {
                    id: d.id.as_str().into(),
                    kind: d.kind.as_str().into(),
                    plugin: d.plugin().into(),
                    auth: d.auth_mode(),
                    policy: TopicPolicy::new(
                        d.publish.as_ref().unwrap_or(&policy.publish),
                        d.subscribe.as_ref().unwrap_or(&policy.subscribe),
                        &d.id,
                        &d.kind,
                    ),
                    settings: Arc::new(d.settings.clone()),
                    password_hash: d.password_hash.clone(),
                });
                (dev.id.clone(), dev)
            })
            .collect();
        Self { devices }
    }

    /// Number of registered devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Look a device up by id.
    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.devices.get(id).cloned()
    }

    /// Authenticate a CONNECT. `cert_names` are the names of a verified client certificate
    /// (`None` without one); `password` is the CONNECT's password. Blocking when a password is
    /// checked (argon2): call from `spawn_blocking`.
    pub fn authenticate(
        &self,
        client_id: &str,
        cert_names: Option<&[String]>,
        password: Option<&[u8]>,
    ) -> Result<Arc<Device>, AuthFailure> {
        // Every refusal that happens before a real password check pays for one against the
        // dummy hash when a password was given, so timing reveals neither which ids exist nor
        // how they authenticate.
        let refuse = |why: AuthFailure| -> Result<Arc<Device>, AuthFailure> {
            if let Some(p) = password {
                verify(dummy_hash(), p);
            }
            Err(why)
        };
        let Some(device) = self.devices.get(client_id) else {
            return refuse(AuthFailure::UnknownDevice);
        };
        let cert_ok = match cert_names {
            Some(names) if names.iter().any(|n| n == client_id) => true,
            Some(_) => return refuse(AuthFailure::CertificateMismatch),
            None => false,
        };
        match device.auth {
            AuthMode::Certificate if cert_ok => return Ok(device.clone()),
            AuthMode::Certificate | AuthMode::Both if !cert_ok => {
                return refuse(AuthFailure::CertificateRequired)
            }
            _ => {}
        }
        let Some(hash) = device.password_hash.as_deref() else {
            return refuse(AuthFailure::NoPasswordCredential);
        };
        let password = password.ok_or(AuthFailure::MissingPassword)?;
        if verify(hash, password) {
            Ok(device.clone())
        } else {
            Err(AuthFailure::WrongPassword)
        }
    }
}

/// The registry shared by every listener; swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub struct SharedRegistry(Arc<RwLock<Arc<Registry>>>);

impl SharedRegistry {
    /// Wrap a registry.
    pub fn new(r: Registry) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(r))))
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Registry> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc: the value is intact.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the snapshot; connections already authenticated are not affected.
    pub fn replace(&self, r: Registry) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r);
    }
}

fn verify(phc: &str, password: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password("wardgate-dummy-password"))
}

/// Hash a password with argon2id and the default (OWASP-recommended) cost.
pub fn hash_password(password: &str) -> String {
    hash_password_with(password, Params::default())
}

/// Hash with cheap parameters: for simulated demo devices only, where hundreds of devices are
/// registered at start and their passwords are public anyway.
pub fn hash_password_demo(password: &str) -> String {
    // 1 MiB, 1 pass, 1 lane: valid argon2id, fast to create and check.
    let params = Params::new(1024, 1, 1, None).expect("constant argon2 parameters are valid");
    hash_password_with(password, params)
}

fn hash_password_with(password: &str, params: Params) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with a generated salt and valid parameters cannot fail")
        .to_string()
}

/// Check that `phc` is an argon2 PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(phc).map_err(|e| {
        format!(
            "not a valid password hash ({e}); expected an argon2 PHC string such as \
             `$argon2id$v=19$m=19456,t=2,p=1$...`, made with `wardgate hash-password`"
        )
    })?;
    let alg = parsed.algorithm.as_str();
    if !matches!(alg, "argon2id" | "argon2i" | "argon2d") {
        return Err(format!(
            "hash algorithm `{alg}` is not supported; use argon2id (`wardgate hash-password`)"
        ));
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("the hash has no salt or no hash value".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let mut cert = DeviceConfig::with_password("cert-1", "pacemaker", String::new());
        cert.password_hash = None;
        let mut both = DeviceConfig::with_password("both-1", "glucose", hash_password_demo("pw"));
        both.auth = Some(AuthMode::Both);
        Registry::from_config(
            &[
                DeviceConfig::with_password("pm-1", "pacemaker", hash_password_demo("secret")),
                cert,
                both,
            ],
            &PolicyConfig::default(),
        )
    }

    #[test]
    fn password_devices() {
        let r = registry();
        assert_eq!(
            &*r.authenticate("pm-1", None, Some(b"secret")).unwrap().id,
            "pm-1"
        );
        assert_eq!(
            r.authenticate("pm-1", None, Some(b"wrong")).unwrap_err(),
            AuthFailure::WrongPassword
        );
        assert_eq!(
            r.authenticate("pm-2", None, Some(b"secret")).unwrap_err(),
            AuthFailure::UnknownDevice
        );
        assert_eq!(
            r.authenticate("pm-1", None, None).unwrap_err(),
            AuthFailure::MissingPassword
        );
    }

    #[test]
    fn certificate_devices() {
        let r = registry();
        let names = |n: &str| vec![n.to_owned()];
        assert!(r
            .authenticate("cert-1", Some(&names("cert-1")), None)
            .is_ok());
        assert_eq!(
            r.authenticate("cert-1", None, Some(b"x")).unwrap_err(),
            AuthFailure::CertificateRequired
        );
        assert_eq!(
            r.authenticate("cert-1", Some(&names("pm-1")), None)
                .unwrap_err(),
            AuthFailure::CertificateMismatch
        );
        // `both` needs the certificate and the password.
        assert!(r
            .authenticate("both-1", Some(&names("both-1")), Some(b"pw"))
            .is_ok());
        assert_eq!(
            r.authenticate("both-1", Some(&names("both-1")), Some(b"no"))
                .unwrap_err(),
            AuthFailure::WrongPassword
        );
        assert_eq!(
            r.authenticate("both-1", None, Some(b"pw")).unwrap_err(),
            AuthFailure::CertificateRequired
        );
    }

    #[test]
    fn hash_check_rejects_plain_text_and_other_algorithms() {
        assert!(check_password_hash(&hash_password_demo("x")).is_ok());
        assert!(check_password_hash("hunter2").is_err());
        assert!(check_password_hash("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
    }
}
