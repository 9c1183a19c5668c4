//! HTTPS for the embedded API: TLS with optional client certificates (the cluster CA is the only
//! root), the user each connection authenticates as, and the admin kubeconfig.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::pki::{self, ClusterCa, PkiError};

/// Group whose members may do anything (Kubernetes' superuser group).
pub const MASTERS_GROUP: &str = "system:masters";
/// Lifetime of the admin client certificate written into the kubeconfig.
const ADMIN_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A TLS handshake that takes longer than this is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who made a request, from the verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    Anonymous,
    Authenticated { name: String, groups: Vec<String> },
}

impl User {
    /// Whether the user is in `system:masters`.
    pub fn is_master(&self) -> bool {
        matches!(self, User::Authenticated { groups, .. } if groups.iter().any(|g| g == MASTERS_GROUP))
    }
}

/// The API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot issue a certificate for the API")]
    Pki(#[from] PkiError),
    #[error("cannot build the API's TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot bind the API listener on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: daemon::files::FileError,
    },
}

/// The rustls configuration: TLS 1.2/1.3, h2 and http/1.1, client certificates optional so that
/// a request without one gets a proper 401 instead of a TLS alert.
pub fn tls_config(ca: &ClusterCa, sans: &[String]) -> Result<rustls::ServerConfig, ServerError> {
    let provider = pki::crypto_provider();
    let verifier = pki::optional_client_auth(ca)?;
    let (chain, key) = ca.issue_server_certificate(sans)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// Binds the API listener (so the caller can log the address before serving).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

fn user_of(certs: Option<&[CertificateDer<'static>]>) -> User {
    let Some(cert) = certs.and_then(|c| c.first()) else {
        return User::Anonymous;
    };
    match pki::user_of(cert) {
        Ok((name, groups)) => User::Authenticated { name, groups },
        Err(e) => {
            tracing::debug!(error = %e, "client certificate without a usable subject");
            User::Anonymous
        }
    }
}

/// Serves `router` over TLS until cancelled. Each request carries the connection's [`User`] as
/// a request extension.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    router: Router,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Watch events and small responses must leave at once: without TCP_NODELAY the last
        // event of a burst waits for the client's delayed ACK (~40 ms, seen in sync-bench).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(peer.addr = %peer, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer.addr = %peer, error = %e, "API TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let user = user_of(stream.get_ref().1.peer_certificates());
            let service = router.map_request(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(user.clone());
                request
            });
            let builder = Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service),
            );
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer.addr = %peer, error = %e, "API connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der))
}

/// Standard base64 with padding (the kubeconfig's `*-data` fields).
pub fn base64_standard(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Writes `DIR/kubeconfig` (mode 0600) for user `admin` in `system:masters`, pointing at
/// `server` (e.g. `https://127.0.0.1:6443`). A fresh client certificate each start.
pub fn write_admin_kubeconfig(
    ca: &ClusterCa,
    data_dir: &Path,
    server: &str,
) -> Result<PathBuf, ServerError> {
    let (cert, key) =
        ca.issue_client_certificate("admin", &[MASTERS_GROUP], ADMIN_CERT_LIFETIME)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let kubeconfig = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: edge
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: edge
  context:
    cluster: edge
    user: admin
    namespace: default
current-context: edge
",
        ca = base64_standard(ca.cert_pem().as_bytes()),
        cert = base64_standard(pem("CERTIFICATE", &cert).as_bytes()),
        key = base64_standard(pem("PRIVATE KEY", key_der.secret_der()).as_bytes()),
    );
    let path = data_dir.join("kubeconfig");
    daemon::files::write_atomic(&path, kubeconfig.as_bytes(), 0o600).map_err(|source| {
        ServerError::Write {
            path: path.clone(),
            source,
        }
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_standard(input.as_bytes()), expected);
        }
    }

    #[test]
    fn admin_certificate_is_a_master() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("ca");
        let (cert, _key) = ca
            .issue_client_certificate("admin", &[MASTERS_GROUP], Duration::from_secs(60))
            .expect("cert");
        let user = user_of(Some(&[cert]));
        assert!(user.is_master(), "{user:?}");
        assert_eq!(user_of(None), User::Anonymous);
        assert!(!User::Anonymous.is_master());
    }

    #[test]
    fn kubeconfig_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("ca");
        let path =
            write_admin_kubeconfig(&ca, dir.path(), "https://127.0.0.1:6443").expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("server: https://127.0.0.1:6443"));
    }
}
