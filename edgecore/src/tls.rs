//! rustls client configurations for the tunnel.
//!
//! - Join: the cloud is trusted only if the chain it presents contains a CA whose SHA-256 equals
//!   the pinned `--ca-hash`, and its certificate chains to that CA and names the dialled host.
//!   This runs inside the TLS handshake, so the token is never sent to an unpinned peer.
//! - Run: the cluster CA from `ca.crt` is the only root, and `node.pem` is the client identity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::identity::Identity;

/// QUIC keep-alive, well below the idle timeout so a quiet but healthy link is never dropped.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// QUIC idle timeout: the link is dead after this long without any packet.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--ca-hash must be `sha256:` followed by 64 hex digits, got {0:?}")]
    BadCaHash(String),
    #[error("cannot build the TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build the certificate verifier")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    #[error("TLS configuration is not usable for QUIC")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The SHA-256 of a CA certificate's DER, as given with `--ca-hash sha256:HEX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaHash([u8; 32]);

impl CaHash {
    pub fn parse(text: &str) -> Result<Self, TlsError> {
        let bad = || TlsError::BadCaHash(text.to_string());
        let hex_part = text.strip_prefix("sha256:").ok_or_else(bad)?;
        let bytes = hex::decode(hex_part).map_err(|_| bad())?;
        Ok(CaHash(bytes.try_into().map_err(|_| bad())?))
    }

    pub fn of(der: &[u8]) -> Self {
        CaHash(Sha256::digest(der).into())
    }
}

impl std::fmt::Display for CaHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why the pinned verifier refused the cloud, kept for a readable error after the handshake
/// fails (QUIC only carries a TLS alert number back to the caller).
pub type VerifyFailure = Arc<Mutex<Option<String>>>;

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaHash,
    provider: Arc<CryptoProvider>,
    failure: VerifyFailure,
}

impl PinnedCaVerifier {
    fn fail(&self, why: String) -> rustls::Error {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        rustls::Error::General(why)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| CaHash::of(c) == self.pin) else {
            let presented: Vec<String> = intermediates
                .iter()
                .map(|c| CaHash::of(c).to_string())
                .collect();
            return Err(self.fail(format!(
                "the cloud's CA does not match --ca-hash {} (it presented {}); refusing to send the token",
                self.pin,
                if presented.is_empty() { "no CA".to_string() } else { presented.join(", ") }
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| self.fail(format!("cannot verify against the pinned CA: {e}")))?;
        inner
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
            .map_err(|e| {
                self.fail(format!(
                    "the cloud's certificate does not verify against the pinned CA for {server_name:?}: {e}"
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ))
        .max_concurrent_uni_streams(0u32.into())
        // Streams the cloud opens (logs, exec, attach, port-forward, stats); the dispatcher
        // refuses those over its own cap with a clear reason.
        .max_concurrent_bidi_streams(crate::streams::TRANSPORT_MAX_STREAMS.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Join: trust only a CA with the pinned hash; present no client certificate.
pub fn join_config(pin: CaHash) -> Result<(quinn::ClientConfig, VerifyFailure), TlsError> {
    let provider = provider();
    let failure = VerifyFailure::default();
    let verifier = PinnedCaVerifier {
        pin,
        provider: provider.clone(),
        failure: failure.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    Ok((quic_client(tls)?, failure))
}

/// Run: trust the cluster CA only; present the node certificate.
pub fn node_config(identity: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.ca.clone())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    quic_client(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_hash_parsing() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(CaHash::parse(&good).expect("valid").to_string(), good);
        for bad in [
            "",
            "ab".repeat(32).as_str(),
            "sha256:abc",
            "sha1:00",
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(CaHash::parse(bad).is_err(), "{bad}");
        }
    }
}
