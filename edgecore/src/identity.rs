//! The edge's identity files in its data dir:
//! - `node.pem`: node certificate and private key in one file (mode 0600), replaced atomically,
//!   so a crash can never leave a certificate next to the wrong key (kubelet's
//!   `kubelet-client-current.pem` does the same);
//! - `ca.crt`: the cluster CA, the only root trusted for the cloud;
//! - `edge.json`: where the cloud is and which node this is.

use std::fs;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const NODE_PEM: &str = "node.pem";
pub const CA_CRT: &str = "ca.crt";
pub const EDGE_JSON: &str = "edge.json";

/// An identity file is missing or unusable.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path} does not exist: this gateway has not joined yet (run `edgecore join`)")]
    NotJoined { path: PathBuf },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "{config} names node {configured:?} but the certificate in {certificate} is for node {certified:?}: the files come from different joins; restore the matching {EDGE_JSON} or join again (`edgecore join --rejoin`)"
    )]
    NameMismatch {
        config: PathBuf,
        configured: String,
        certificate: PathBuf,
        certified: String,
    },
}

/// Where the cloud is and who we are; written at join.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeConfig {
    pub cloud: String,
    pub node_name: String,
}

/// The loaded identity.
#[derive(Debug)]
pub struct Identity {
    pub config: EdgeConfig,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IdentityError::NotJoined {
                path: path.to_path_buf(),
            }
        } else {
            IdentityError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> IdentityError {
    IdentityError::Corrupt {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// Whether a join has completed in `dir` (the node certificate is written last).
pub fn is_joined(dir: &Path) -> bool {
    dir.join(NODE_PEM).exists()
}

/// Loads all three files.
pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
    let config_path = dir.join(EDGE_JSON);
    let config: EdgeConfig =
        serde_json::from_slice(&fs::read(&config_path).map_err(io_err("read", &config_path))?)
            .map_err(|e| corrupt(&config_path, e.to_string()))?;
    let ca_path = dir.join(CA_CRT);
    let ca_pem = fs::read(&ca_path).map_err(io_err("read", &ca_path))?;
    let ca = rustls_pemfile::certs(&mut ca_pem.as_slice())
        .next()
        .ok_or_else(|| corrupt(&ca_path, "no certificate in it"))?
        .map_err(|e| corrupt(&ca_path, e.to_string()))?;
    let node_path = dir.join(NODE_PEM);
    let node_pem = fs::read(&node_path).map_err(io_err("read", &node_path))?;
    let cert = rustls_pemfile::certs(&mut node_pem.as_slice())
        .next()
        .ok_or_else(|| corrupt(&node_path, "no certificate in it"))?
        .map_err(|e| corrupt(&node_path, e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut node_pem.as_slice())
        .map_err(|e| corrupt(&node_path, e.to_string()))?
        .ok_or_else(|| corrupt(&node_path, "no private key in it"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| corrupt(&node_path, e.to_string()))?;
    // The cloud names the session from the certificate; a different name in edge.json would
    // make this edgecore report and log as another node than the one it is.
    let certified = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(|cn| cn.strip_prefix("system:node:").unwrap_or(cn).to_string())
        .ok_or_else(|| corrupt(&node_path, "the certificate has no common name"))?;
    if certified != config.node_name {
        return Err(IdentityError::NameMismatch {
            config: config_path,
            configured: config.node_name,
            certificate: node_path,
            certified,
        });
    }
    let not_before = parsed.validity().not_before.to_datetime();
    let not_after = parsed.validity().not_after.to_datetime();
    Ok(Identity {
        config,
        cert,
        key,
        ca,
        not_before,
        not_after,
    })
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der))
}

/// Writes a file durably (see [`daemon::files::write_atomic`]).
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    daemon::files::write_atomic(path, contents, mode).map_err(|e| IdentityError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    })
}

/// Replaces `node.pem` with a certificate and the PKCS#8 key it certifies.
pub fn write_node_pem(
    dir: &Path,
    cert_der: &[u8],
    key_pkcs8_der: &[u8],
) -> Result<(), IdentityError> {
    let contents = format!(
        "{}{}",
        pem("CERTIFICATE", cert_der),
        pem("PRIVATE KEY", key_pkcs8_der)
    );
    write_atomic(&dir.join(NODE_PEM), contents.as_bytes(), 0o600)
}

/// Writes everything a join produced; `node.pem` goes last and marks the join complete.
pub fn write_joined(
    dir: &Path,
    config: &EdgeConfig,
    ca_der: &[u8],
    cert_der: &[u8],
    key_pkcs8_der: &[u8],
) -> Result<(), IdentityError> {
    daemon::datadir::ensure_private_dir(dir).map_err(|e| IdentityError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    })?;
    write_atomic(
        &dir.join(CA_CRT),
        pem("CERTIFICATE", ca_der).as_bytes(),
        0o644,
    )?;
    let json = serde_json::to_vec_pretty(config)
        .map_err(|e| corrupt(&dir.join(EDGE_JSON), e.to_string()))?;
    write_atomic(&dir.join(EDGE_JSON), &json, 0o644)?;
    write_node_pem(dir, cert_der, key_pkcs8_der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn written_identity_loads_back_with_a_private_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["gw-1".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:gw-1");
        let cert = params.self_signed(&key).expect("cert");
        let config = EdgeConfig {
            cloud: "127.0.0.1:10000".into(),
            node_name: "gw-1".into(),
        };
        write_joined(
            dir.path(),
            &config,
            cert.der(),
            cert.der(),
            &key.serialize_der(),
        )
        .expect("write");
        let identity = load(dir.path()).expect("load");
        assert_eq!(identity.config, config);
        assert_eq!(identity.cert, *cert.der());
        assert_eq!(identity.key.secret_der(), key.serialize_der().as_slice());
        let mode = fs::metadata(dir.path().join(NODE_PEM))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // edge.json naming another node than the certificate is refused, naming both.
        let other = EdgeConfig {
            cloud: "127.0.0.1:10000".into(),
            node_name: "gw-2".into(),
        };
        fs::write(
            dir.path().join(EDGE_JSON),
            serde_json::to_vec(&other).expect("json"),
        )
        .expect("write");
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("names node \"gw-2\" but the certificate")
                && err.contains("is for node \"gw-1\""),
            "{err}"
        );
    }

    #[test]
    fn missing_files_say_join_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("run `edgecore join`"), "{err}");
    }

    #[test]
    fn corrupt_node_pem_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join(EDGE_JSON),
            br#"{"cloud":"x:1","node_name":"a"}"#,
        )
        .expect("write");
        fs::write(dir.path().join(CA_CRT), pem("CERTIFICATE", b"xx")).expect("write");
        fs::write(dir.path().join(NODE_PEM), b"garbage").expect("write");
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("node.pem is corrupt"), "{err}");
    }
}
