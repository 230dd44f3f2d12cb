//! The device registry: which devices may connect and how they prove who they are.
//!
//! Built from `[[devices]]`; replaced as a whole on reload (SIGHUP), so a connection
//! authenticates against one consistent snapshot. Passwords are only ever held as argon2 PHC
//! strings. [`Registry::decide`] settles everything but the password; the argon2 check itself
//! ([`verify_phc`]) is CPU- and memory-heavy on purpose and runs on the login gate's own small
//! pool ([`crate::gatekeeper::login`]), which bounds how many run and reuses their memory.
//!
//! What must stay true: every refusal of a CONNECT that carried a password costs one argon2
//! verification — an unknown id, a certificate-only device without its certificate, a device
//! without a password credential are checked against a dummy hash — so timing does not reveal
//! which device ids exist or how they authenticate.

use crate::config::{AuthMode, DeviceConfig, PolicyConfig};
use crate::gatekeeper::policy::TopicPolicy;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
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

    /// Every registered device, in no particular order.
    pub fn devices(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.devices.values()
    }

    /// Look a device up by id.
    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.devices.get(id).cloned()
    }

    /// Decide everything about a CONNECT that needs no password check. `cert_names` are the
    /// names of a verified client certificate (`None` without one); `has_password` says
    /// whether the CONNECT carried one. Cheap: the argon2 check, when one is needed, is the
    /// caller's (see [`crate::gatekeeper::login`]).
    pub fn decide(
        &self,
        client_id: &str,
        cert_names: Option<&[String]>,
        has_password: bool,
    ) -> Decision {
        let refuse = |why| Decision::Refuse { why };
        let Some(device) = self.devices.get(client_id) else {
            return refuse(AuthFailure::UnknownDevice);
        };
        let cert_ok = match cert_names {
            Some(names) if names.iter().any(|n| n == client_id) => true,
            Some(_) => return refuse(AuthFailure::CertificateMismatch),
            None => false,
        };
        match device.auth {
            AuthMode::Certificate if cert_ok => return Decision::Accept(device.clone()),
            AuthMode::Certificate | AuthMode::Both if !cert_ok => {
                return refuse(AuthFailure::CertificateRequired)
            }
            _ => {}
        }
        let Some(hash) = device.password_hash.as_deref() else {
            return refuse(AuthFailure::NoPasswordCredential);
        };
        if !has_password {
            return refuse(AuthFailure::MissingPassword);
        }
        Decision::CheckPassword {
            device: device.clone(),
            phc: hash.to_owned(),
            with_certificate: device.auth == AuthMode::Both,
        }
    }

    /// Authenticate a CONNECT in one blocking call (argon2 on the calling thread, with its own
    /// memory). The gateway itself goes through [`crate::gatekeeper::login::LoginGate`], which
    /// bounds and pools these checks; this is the same decision for tools and tests.
    pub fn authenticate(
        &self,
        client_id: &str,
        cert_names: Option<&[String]>,
        password: Option<&[u8]>,
    ) -> Result<Arc<Device>, AuthFailure> {
        let mut scratch = crate::gatekeeper::login::Scratch::default();
        match self.decide(client_id, cert_names, password.is_some()) {
            Decision::Accept(d) => Ok(d),
            Decision::Refuse { why } => {
                // Every refusal of a CONNECT with a password pays one argon2 check.
                if let Some(p) = password {
                    verify_phc(dummy_hash(), p, &mut scratch);
                }
                Err(why)
            }
            Decision::CheckPassword { device, phc, .. } => {
                if verify_phc(&phc, password.unwrap_or_default(), &mut scratch) {
                    Ok(device)
                } else {
                    Err(AuthFailure::WrongPassword)
                }
            }
        }
    }
}

/// What a CONNECT needs, decided without checking a password.
#[derive(Debug)]
pub enum Decision {
    /// Authenticated by its client certificate alone.
    Accept(Arc<Device>),
    /// Refused. A CONNECT that carried a password must still pay one argon2 check (against
    /// [`dummy_hash`]) before it is answered, so timing reveals nothing.
    Refuse {
        /// Why.
        why: AuthFailure,
    },
    /// Accepted if the password matches `phc`.
    CheckPassword {
        /// The device.
        device: Arc<Device>,
        /// Its argon2 PHC string.
        phc: String,
        /// Its certificate was verified too (`auth = "both"`).
        with_certificate: bool,
    },
}

/// The registry shared by every listener; swapped whole on reload. Every swap bumps a
/// generation that connected devices watch ([`SharedRegistry::changes`]): each connection then
/// looks its device up again, takes the new policy and settings, and ends itself when the
/// device is gone or its credentials changed (see `gatekeeper::connection`).
#[derive(Debug, Clone)]
pub struct SharedRegistry(Arc<SharedInner>);

#[derive(Debug)]
struct SharedInner {
    current: RwLock<Arc<Registry>>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Default for SharedRegistry {
    fn default() -> Self {
        Self::new(Registry::default())
    }
}

impl SharedRegistry {
    /// Wrap a registry.
    pub fn new(r: Registry) -> Self {
        Self(Arc::new(SharedInner {
            current: RwLock::new(Arc::new(r)),
            generation: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Registry> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc: the value is intact.
        self.0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the snapshot. New CONNECTs authenticate against it at once; connected devices
    /// are told through [`Self::changes`].
    pub fn replace(&self, r: Registry) {
        *self.0.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r);
        self.0.generation.send_modify(|g| *g += 1);
    }

    /// Changes when the registry is replaced.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.generation.subscribe()
    }
}

impl Device {
    /// Whether `other` (the same id in a newer registry) proves its identity as this one
    /// does: same authentication mode and password hash. A connection authenticated with the
    /// old credentials must log in again when they changed.
    pub fn same_credentials(&self, other: &Device) -> bool {
        self.auth == other.auth && self.password_hash == other.password_hash
    }
}

/// Check `password` against the argon2 PHC string `phc`, using (and growing) `scratch` for
/// argon2's memory instead of allocating it: the pool threads of the login gate keep one
/// area each. The comparison of the results is constant-time. An unparsable `phc` is `false`.
pub fn verify_phc(
    phc: &str,
    password: &[u8],
    scratch: &mut crate::gatekeeper::login::Scratch,
) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    let argon = Argon2::new(algorithm, version, params);
    let mut out = [0u8; 64];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    if argon
        .hash_password_into_with_memory(password, salt, out, scratch.blocks(blocks))
        .is_err()
    {
        return false;
    }
    // `Output`'s equality is constant-time.
    argon2::password_hash::Output::new(out).is_ok_and(|o| o == expected)
}

/// The hash every refusal that has no real one to check is checked against: the default
/// parameters, so it costs what a real check costs.
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password("wardgate-dummy-password"))
}

/// Largest argon2 memory cost a device's hash may ask for, in KiB (256 MiB).
pub const MAX_HASH_MEMORY_KIB: u32 = 256 * 1024;

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
    let params =
        Params::try_from(&parsed).map_err(|e| format!("unusable argon2 parameters ({e})"))?;
    if params.m_cost() > MAX_HASH_MEMORY_KIB {
        return Err(format!(
            "m={} KiB of memory per check is more than the {MAX_HASH_MEMORY_KIB} KiB wardgate allows \
             (every login thread keeps that much); make a new hash with `wardgate hash-password`",
            params.m_cost()
        ));
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
