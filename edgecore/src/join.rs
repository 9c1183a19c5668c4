//! `edgecore join`: pin the cloud's CA, prove the token, get a node certificate for a key that
//! is generated here and never leaves this machine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use proto::{
    ErrorMessage, FrameReader, FrameWriter, JoinRequest, Message, PROTOCOL_VERSION, close_code,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::dial::{self, DialError};
use crate::identity::{self, EdgeConfig, IdentityError};
use crate::tls::{self, CaHash, TlsError};

/// What `edgecore join` needs.
#[derive(Debug, Clone)]
pub struct JoinParams {
    pub cloud: String,
    pub token: String,
    pub ca_hash: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub timeout: Duration,
    pub max_frame_size: usize,
    /// Replace the identity of a node already joined here (its certificate expired or was
    /// revoked), keeping its local store and running pods. The node name must stay the same.
    pub rejoin: bool,
}

/// The join did not complete; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "{dir} already holds the identity of node {node:?}; remove {dir}/node.pem to join again"
    )]
    AlreadyJoined { dir: PathBuf, node: String },
    #[error("{dir} holds no identity to replace; use `edgecore join` without --rejoin")]
    NothingToRejoin { dir: PathBuf },
    #[error(
        "{dir} holds the identity of node {joined:?}, not {asked:?}: --rejoin keeps the node name (its store and pods belong to it)"
    )]
    RejoinOtherNode {
        dir: PathBuf,
        joined: String,
        asked: String,
    },
    #[error("node name {name} is not a valid DNS-1123 subdomain: {why}")]
    InvalidNodeName { name: String, why: &'static str },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("refusing the cloud: {0}")]
    CloudNotTrusted(String),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("the cloud refused the join: {0}")]
    Refused(ErrorMessage),
    #[error("the cloud broke the protocol: {0}")]
    Protocol(String),
    #[error("cannot generate the node key")]
    Key(#[source] rcgen::Error),
    #[error("the cloud's answer does not fit our request: {0}")]
    BadCertificate(String),
    #[error("cannot save the identity")]
    Save(#[from] IdentityError),
}

/// What a successful join produced.
#[derive(Debug, Clone)]
pub struct Joined {
    pub node_name: String,
    pub not_after: time::OffsetDateTime,
}

/// Generates a key pair and a CSR for it. The CSR's subject is a hint; the cloud decides.
pub fn new_key_and_csr(node_name: &str) -> Result<(KeyPair, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("system:node:{node_name}"));
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Runs the join. On success the data dir holds `ca.crt`, `edge.json` and `node.pem`.
pub async fn join(params: JoinParams) -> Result<Joined, JoinError> {
    // Checked here as the cloud checks it, so a bad name never costs a dial or a token try.
    if let Some(why) = proto::message::node_name_problem(&params.node_name) {
        let shown: String = params.node_name.chars().take(64).collect();
        let count = params.node_name.chars().count();
        let name = if count > 64 {
            format!("{shown:?}... ({count} characters)")
        } else {
            format!("{shown:?}")
        };
        return Err(JoinError::InvalidNodeName { name, why });
    }
    let joined = identity::is_joined(&params.data_dir);
    if joined && !params.rejoin {
        let node = identity::load(&params.data_dir)
            .map(|i| i.config.node_name)
            .unwrap_or_else(|_| "?".into());
        return Err(JoinError::AlreadyJoined {
            dir: params.data_dir.clone(),
            node,
        });
    }
    if params.rejoin {
        if !joined {
            return Err(JoinError::NothingToRejoin {
                dir: params.data_dir.clone(),
            });
        }
        // The old files may be damaged; only the node name matters here, and edge.json says it.
        let current = identity::load(&params.data_dir).map(|i| i.config.node_name);
        if let Ok(joined) = current
            && joined != params.node_name
        {
            return Err(JoinError::RejoinOtherNode {
                dir: params.data_dir.clone(),
                joined,
                asked: params.node_name.clone(),
            });
        }
    }
    let pin = CaHash::parse(&params.ca_hash)?;
    let (config, failure) = tls::join_config(pin)?;
    let addr = dial::resolve(&params.cloud).await?;
    let endpoint = dial::client_endpoint(addr)?;
    let connection =
        match dial::connect(&endpoint, config, &params.cloud, addr, params.timeout).await {
            Ok(c) => c,
            Err(e) => {
                // The verifier knows why it refused; the QUIC error only has an alert number.
                if let Some(why) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(JoinError::CloudNotTrusted(why));
                }
                return Err(e.into());
            }
        };
    let result = exchange(&connection, &params, pin).await;
    connection.close(quinn::VarInt::from_u32(close_code::NORMAL), b"join done");
    endpoint.wait_idle().await;
    result
}

async fn exchange(
    connection: &quinn::Connection,
    params: &JoinParams,
    pin: CaHash,
) -> Result<Joined, JoinError> {
    let (key, csr_der) = new_key_and_csr(&params.node_name).map_err(JoinError::Key)?;
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| JoinError::Protocol(format!("cannot open a stream: {e}")))?;
    let mut writer = FrameWriter::new(send, params.max_frame_size);
    let mut reader = FrameReader::new(recv, params.max_frame_size);
    writer
        .send(Message::JoinRequest(JoinRequest {
            version: PROTOCOL_VERSION,
            token: params.token.clone(),
            node_name: params.node_name.clone(),
            csr_der,
            labels: params.labels.clone(),
        }))
        .await
        .map_err(|e| JoinError::Protocol(format!("cannot send the join request: {e}")))?;
    let reply = tokio::time::timeout(params.timeout, reader.next())
        .await
        .map_err(|_| JoinError::Protocol("no answer to the join request".into()))?
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    let response = match reply {
        Some(Message::JoinResponse(r)) => r,
        Some(Message::Error(e)) => return Err(JoinError::Refused(e)),
        Some(other) => {
            return Err(JoinError::Protocol(format!(
                "expected a join response, got {}",
                other.kind()
            )));
        }
        None => {
            return Err(JoinError::Protocol(
                "the cloud closed the stream without answering".into(),
            ));
        }
    };
    if CaHash::of(&response.ca_der) != pin {
        return Err(JoinError::BadCertificate(
            "the CA returned is not the pinned CA".into(),
        ));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&response.certificate_der)
        .map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(JoinError::BadCertificate(
            "the certificate is not for our key".into(),
        ));
    }
    let not_after = cert.validity().not_after.to_datetime();
    identity::write_joined(
        &params.data_dir,
        &EdgeConfig {
            cloud: params.cloud.clone(),
            node_name: params.node_name.clone(),
        },
        &response.ca_der,
        &response.certificate_der,
        &key.serialize_der(),
    )?;
    Ok(Joined {
        node_name: params.node_name.clone(),
        not_after,
    })
}

/// Parses `k=v,k2=v2` (Kubernetes label syntax, checked loosely; the cloud has the last word).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} must be key=value"))?;
        let valid = |s: &str| {
            s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        };
        if k.is_empty() || !valid(k) || !valid(v) {
            return Err(format!(
                "label {pair:?} has characters Kubernetes does not allow"
            ));
        }
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let parsed =
            parse_labels("zone=a, line=3,node-role.kubernetes.io/gateway=").expect("valid");
        assert_eq!(parsed.get("zone").map(String::as_str), Some("a"));
        assert_eq!(
            parsed
                .get("node-role.kubernetes.io/gateway")
                .map(String::as_str),
            Some("")
        );
        assert_eq!(parse_labels("").expect("empty"), BTreeMap::new());
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("=x").is_err());
        assert!(parse_labels("a=b c").is_err());
    }

    #[test]
    fn csr_carries_our_public_key() {
        use x509_parser::prelude::FromDer;
        let (key, csr) = new_key_and_csr("gw-1").expect("csr");
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
                .expect("parse");
        assert_eq!(
            parsed
                .certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .as_ref(),
            key.public_key_raw()
        );
    }
}
