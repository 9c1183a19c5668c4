//! The cluster CA: created once in the data dir, then used to issue the server certificate and to
//! sign node certificates from edge-generated CSRs.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Prefix of the common name of every node certificate (the Kubernetes node identity shape).
pub const NODE_CN_PREFIX: &str = "system:node:";
/// Organization of every node certificate.
pub const NODE_ORGANIZATION: &str = "system:nodes";

/// Certificates are valid from this long before their issue time, so edges whose clocks run
/// behind the cloud's (by up to this much) accept and present them. Short lifetimes (tests)
/// are backdated by a tenth of the lifetime instead, so renewal timing stays meaningful.
const BACKDATE: Duration = Duration::from_secs(3600);

fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 10)
}
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// A PKI step failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] daemon::files::FileError),
    #[error("CA files in {dir} are unusable: {why}")]
    CorruptCa { dir: PathBuf, why: String },
    #[error("certificate signing request is invalid")]
    InvalidCsr(#[source] rcgen::Error),
    #[error("cannot build certificate")]
    Build(#[source] rcgen::Error),
    #[error("certificate is not a node certificate: {0}")]
    NotANodeCertificate(String),
    #[error("{action} the CA secret {namespace}/{CA_SECRET} failed")]
    Secret {
        action: &'static str,
        namespace: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("the CA secret {namespace}/{CA_SECRET} is unusable: {why}")]
    CorruptSecret { namespace: String, why: String },
}

/// `--state=cluster`: the Secret (type `kubernetes.io/tls`) holding the cluster CA every
/// replica uses.
pub const CA_SECRET: &str = "cloudcore-ca";

/// `tls.crt` and `tls.key` of the CA Secret.
fn ca_pems(
    secret: &k8s_openapi::api::core::v1::Secret,
    namespace: &str,
) -> Result<(String, String), PkiError> {
    let field = |key: &str| {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| PkiError::CorruptSecret {
                namespace: namespace.to_string(),
                why: format!("it has no {key}"),
            })?;
        String::from_utf8(bytes.0.clone()).map_err(|_| PkiError::CorruptSecret {
            namespace: namespace.to_string(),
            why: format!("{key} is not PEM text"),
        })
    };
    Ok((field("tls.crt")?, field("tls.key")?))
}

/// A certificate the CA has just issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub der: Vec<u8>,
    /// Hex of the DER serial number; the registry's key for revocation.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// Identity read from a verified node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_name: String,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// The cluster certificate authority.
pub struct ClusterCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("hash", &self.hash())
            .finish()
    }
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    // Positive and without a leading zero byte, so the DER encoding is exactly these bytes.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

impl ClusterCa {
    /// Loads `DIR/pki/ca.{crt,key}`, creating them on first use. Two processes racing to create
    /// it end up with the same CA: the directory appears atomically and the loser loads it.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, PkiError> {
        let dir = data_dir.join("pki");
        if !dir.exists() {
            Self::create(data_dir, &dir)?;
        }
        Self::load(&dir)
    }

    /// Loads `DIR/pki/ca.{crt,key}` and never creates them: for commands that need an
    /// initialized cloud (only `serve` starts a new one).
    pub fn load_existing(data_dir: &Path) -> Result<Self, PkiError> {
        Self::load(&data_dir.join("pki"))
    }

    fn create(data_dir: &Path, dir: &Path) -> Result<(), PkiError> {
        daemon::datadir::ensure_private_dir(data_dir)?;
        let staging = data_dir.join(format!("pki.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir(&staging).map_err(io_err("create", &staging))?;
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))
            .map_err(io_err("set permissions on", &staging))?;

        let key = KeyPair::generate().map_err(PkiError::Build)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "edge cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial().0);
        let cert = params.self_signed(&key).map_err(PkiError::Build)?;

        daemon::files::write_atomic(
            &staging.join("ca.key"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        daemon::files::write_atomic(&staging.join("ca.crt"), cert.pem().as_bytes(), 0o644)?;
        match fs::rename(&staging, dir) {
            Ok(()) => {}
            // Someone else created it first: use theirs.
            Err(_) if dir.join("ca.crt").exists() => {
                let _ = fs::remove_dir_all(&staging);
            }
            Err(e) => return Err(io_err("create", dir)(e)),
        }
        Ok(daemon::files::sync_dir(data_dir)?)
    }

    /// `--state=cluster`: the CA of the Secret [`CA_SECRET`] in `namespace`, created from
    /// this data dir's CA (made if missing) when no replica did yet; on a lost race the
    /// winner's. The Secret's CA is written to `DIR/pki/` as well, replacing what was there.
    pub async fn load_or_create_in_cluster(
        data_dir: &Path,
        client: kube::Client,
        namespace: &str,
    ) -> Result<Self, PkiError> {
        use k8s_openapi::api::core::v1::Secret;
        let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
        let secret_err = |action| {
            let namespace = namespace.to_string();
            move |source| PkiError::Secret {
                action,
                namespace,
                source: Box::new(source),
            }
        };
        let existing = api
            .get_opt(CA_SECRET)
            .await
            .map_err(secret_err("reading"))?;
        let secret = match existing {
            Some(secret) => secret,
            None => {
                let local = Self::load_or_create(data_dir)?;
                let key_pem = fs::read_to_string(data_dir.join("pki/ca.key"))
                    .map_err(io_err("read", &data_dir.join("pki/ca.key")))?;
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(CA_SECRET.into()),
                        ..Default::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(std::collections::BTreeMap::from([
                        (
                            "tls.crt".to_string(),
                            k8s_openapi::ByteString(local.cert_pem.clone().into_bytes()),
                        ),
                        (
                            "tls.key".to_string(),
                            k8s_openapi::ByteString(key_pem.into_bytes()),
                        ),
                    ])),
                    ..Default::default()
                };
                match api.create(&kube::api::PostParams::default(), &secret).await {
                    Ok(created) => created,
                    // Another replica created it first: use theirs.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        api.get(CA_SECRET).await.map_err(secret_err("reading"))?
                    }
                    Err(e) => return Err(secret_err("creating")(e)),
                }
            }
        };
        let (cert_pem, key_pem) = ca_pems(&secret, namespace)?;
        let dir = data_dir.join("pki");
        daemon::datadir::ensure_private_dir(data_dir)?;
        if !dir.exists() {
            fs::create_dir(&dir).map_err(io_err("create", &dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("set permissions on", &dir))?;
        }
        daemon::files::write_atomic(&dir.join("ca.key"), key_pem.as_bytes(), 0o600)?;
        daemon::files::write_atomic(&dir.join("ca.crt"), cert_pem.as_bytes(), 0o644)?;
        Self::from_pems(&dir, &cert_pem, &key_pem)
    }

    /// `--state=cluster` for the CLI: the CA of the Secret, never created.
    pub async fn load_from_cluster(
        client: kube::Client,
        namespace: &str,
    ) -> Result<Self, PkiError> {
        use k8s_openapi::api::core::v1::Secret;
        let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
        let secret = api
            .get_opt(CA_SECRET)
            .await
            .map_err(|source| PkiError::Secret {
                action: "reading",
                namespace: namespace.to_string(),
                source: Box::new(source),
            })?
            .ok_or_else(|| PkiError::CorruptSecret {
                namespace: namespace.to_string(),
                why: "it does not exist; start `cloudcore serve --state=cluster` first".into(),
            })?;
        let (cert_pem, key_pem) = ca_pems(&secret, namespace)?;
        Self::from_pems(Path::new(CA_SECRET), &cert_pem, &key_pem)
    }

    fn load(dir: &Path) -> Result<Self, PkiError> {
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.crt");
        let key_pem = fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err("read", &cert_path))?;
        Self::from_pems(dir, &cert_pem, &key_pem)
    }

    fn from_pems(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let corrupt = |why: String| PkiError::CorruptCa {
            dir: dir.to_path_buf(),
            why,
        };
        let cert_pem = cert_pem.to_string();
        let key = KeyPair::from_pem(key_pem).map_err(|e| corrupt(format!("ca.key: {e}")))?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| corrupt("ca.crt holds no certificate".into()))?
            .map_err(|e| corrupt(format!("ca.crt: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| corrupt(format!("ca.crt: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(corrupt("ca.key does not belong to ca.crt".into()));
        }
        Ok(ClusterCa {
            cert_der,
            cert_pem,
            key,
        })
    }

    /// `sha256:<hex>` of the CA certificate's DER: what edges pin with `--ca-hash`.
    pub fn hash(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(&self.cert_der)))
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A 32-byte secret for `purpose`: HMAC-SHA256 of the purpose, keyed with the CA's private
    /// key. Every cloudcore holding this CA (the same process after a restart, or another
    /// replica sharing the CA Secret) derives the same one, and nobody without the CA key can.
    /// Distinct purposes give unrelated secrets.
    pub fn derived_secret(&self, purpose: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key.serialize_der());
        let tag = ring::hmac::sign(&key, purpose.as_bytes());
        let mut secret = [0u8; 32];
        secret.copy_from_slice(tag.as_ref());
        secret
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(PkiError::Build)
    }

    /// A fresh serving certificate for the tunnel (and later the API), with the given SANs.
    /// Returns the chain `[server, CA]` and its key; nothing is written to disk.
    pub fn issue_server_certificate(
        &self,
        sans: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Build)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "cloudcore");
        params.distinguished_name = dn;
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => san
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(PkiError::Build),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + SERVER_CERT_LIFETIME;
        params.serial_number = Some(random_serial().0);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(PkiError::Build)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    /// A client certificate and key for a user of the embedded API (e.g. the admin kubeconfig):
    /// CN `user`, one O per group.
    pub fn issue_client_certificate(
        &self,
        user: &str,
        groups: &[&str],
        lifetime: Duration,
    ) -> Result<(CertificateDer<'static>, KeyPair), PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Build)?;
        let (params, _, _) = client_params(user, groups, lifetime);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(PkiError::Build)?;
        Ok((cert.der().clone(), key))
    }

    /// Signs a node client certificate for `node_name` with the public key of `csr_der`.
    /// Everything but the key is ours: the subject and extensions requested in the CSR are
    /// ignored, so a CSR cannot ask for another identity.
    pub fn sign_node_csr(
        &self,
        csr_der: &[u8],
        node_name: &str,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(PkiError::InvalidCsr)?;
        let (params, serial, not_after) = client_params(
            &format!("{NODE_CN_PREFIX}{node_name}"),
            &[NODE_ORGANIZATION],
            lifetime,
        );
        csr.params = params;
        let cert = csr.signed_by(&self.issuer()?).map_err(PkiError::Build)?;
        Ok(IssuedCertificate {
            der: cert.der().to_vec(),
            serial,
            not_after,
        })
    }
}

/// The user name and groups a client certificate carries (CN and every O), as Kubernetes reads
/// them.
pub fn user_of(cert_der: &[u8]) -> Result<(String, Vec<String>), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::NotANodeCertificate(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::NotANodeCertificate("no common name".into()))?
        .to_string();
    let groups = cert
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    Ok((cn, groups))
}

/// Parameters of a client certificate (clientAuth, CN `user`, one O per group) valid from
/// now (backdated) for `lifetime`, with a fresh serial; also returns the serial's hex and the
/// expiry.
fn client_params(
    user: &str,
    groups: &[&str],
    lifetime: Duration,
) -> (CertificateParams, String, OffsetDateTime) {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, user);
    for group in groups {
        dn.push(DnType::OrganizationName, *group);
    }
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - backdate(lifetime);
    params.not_after = now + lifetime;
    let (serial_number, serial) = random_serial();
    params.serial_number = Some(serial_number);
    (params, serial, now + lifetime)
}

/// The one crypto provider of the project (see docs/ARCHITECTURE.md).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A verifier that accepts client certificates signed by `ca` but lets clients without one
/// through the handshake, so the protocol above can refuse them with a proper message (a join
/// on the tunnel, a 401 on the API).
pub fn optional_client_auth(
    ca: &ClusterCa,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, rustls::server::VerifierBuilderError>
{
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates([ca.cert_der().clone()]);
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
        .allow_unauthenticated()
        .build()
}

/// Parses a CSR and verifies its self-signature (proof that the requester holds the key).
pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
        .map(|_| ())
        .map_err(PkiError::InvalidCsr)
}

/// Reads the node identity from a certificate the TLS layer has already verified.
pub fn node_identity(cert_der: &[u8]) -> Result<NodeIdentity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::NotANodeCertificate(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::NotANodeCertificate("no common name".into()))?;
    let node_name = cn
        .strip_prefix(NODE_CN_PREFIX)
        .ok_or_else(|| PkiError::NotANodeCertificate(format!("common name {cn:?}")))?;
    Ok(NodeIdentity {
        node_name: node_name.to_string(),
        serial: hex::encode(cert.raw_serial()),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(name_claimed: &str) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("{NODE_CN_PREFIX}{name_claimed}"),
        );
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).expect("csr");
        (key, csr.der().to_vec())
    }

    #[test]
    fn ca_is_created_once_and_reloaded_identically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ClusterCa::load_or_create(dir.path()).expect("create");
        let second = ClusterCa::load_or_create(dir.path()).expect("load");
        assert_eq!(first.hash(), second.hash());
        let key_mode = fs::metadata(dir.path().join("pki/ca.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
    }

    #[test]
    fn derived_secrets_are_stable_across_loads_and_differ_by_purpose_and_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ClusterCa::load_or_create(dir.path()).expect("create");
        let reloaded = ClusterCa::load_or_create(dir.path()).expect("load");
        assert_eq!(first.derived_secret("a"), reloaded.derived_secret("a"));
        assert_ne!(first.derived_secret("a"), first.derived_secret("b"));
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = ClusterCa::load_or_create(other_dir.path()).expect("create");
        assert_ne!(first.derived_secret("a"), other.derived_secret("a"));
    }

    #[test]
    fn mismatched_key_is_reported_as_corrupt() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        ClusterCa::load_or_create(a.path()).expect("a");
        ClusterCa::load_or_create(b.path()).expect("b");
        fs::copy(b.path().join("pki/ca.key"), a.path().join("pki/ca.key")).expect("copy");
        let err = ClusterCa::load_or_create(a.path()).unwrap_err();
        assert!(err.to_string().contains("unusable"), "{err}");
    }

    #[test]
    fn node_certificate_names_the_node_we_chose_not_the_one_claimed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("ca");
        let (_key, csr) = csr_for("someone-else");
        let issued = ca
            .sign_node_csr(&csr, "gw-1", Duration::from_secs(3600))
            .expect("sign");
        let identity = node_identity(&issued.der).expect("identity");
        assert_eq!(identity.node_name, "gw-1");
        assert_eq!(identity.serial, issued.serial);
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("ca");
        let err = ca
            .sign_node_csr(b"not a csr", "gw-1", Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr(_)));
    }

    #[test]
    fn server_certificate_is_not_a_node_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("ca");
        let (chain, _key) = ca
            .issue_server_certificate(&["localhost".into(), "127.0.0.1".into()])
            .expect("server cert");
        assert_eq!(chain.len(), 2);
        assert!(node_identity(&chain[0]).is_err());
    }
}
