//! Resolving the cloud address and opening a QUIC connection to it.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint};

/// The cloud could not be reached or refused the TLS handshake.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cloud address {0:?} must be HOST:PORT")]
    BadAddress(String),
    #[error("cannot resolve {cloud}")]
    Resolve {
        cloud: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a UDP socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot start a connection to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
    #[error("no answer from {addr} within {}", humantime::format_duration(*.timeout))]
    Timeout { addr: SocketAddr, timeout: Duration },
}

impl DialError {
    /// Whether the cloud refused the connection before any TLS (QUIC `CONNECTION_REFUSED`):
    /// it is busy (a reconnect storm filled its handshake queue) and the edge should wait
    /// longer before the next attempt ([`crate::backoff::after_busy`]).
    pub fn is_busy_refusal(&self) -> bool {
        matches!(
            self,
            DialError::Handshake {
                source: ConnectionError::ConnectionClosed(close),
                ..
            } if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        )
    }
}

/// Splits `host:port` (IPv6 literals in brackets) into the TLS server name and the port.
pub fn split_host_port(cloud: &str) -> Result<(String, u16), DialError> {
    let bad = || DialError::BadAddress(cloud.to_string());
    let (host, port) = cloud.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port.parse().map_err(|_| bad())?))
}

/// Resolves the cloud address to its first socket address.
pub async fn resolve(cloud: &str) -> Result<SocketAddr, DialError> {
    split_host_port(cloud)?;
    tokio::net::lookup_host(cloud)
        .await
        .map_err(|source| DialError::Resolve {
            cloud: cloud.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| DialError::Resolve {
            cloud: cloud.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        })
}

/// A client endpoint on an ephemeral UDP port of the right address family.
pub fn client_endpoint(remote: SocketAddr) -> Result<Endpoint, DialError> {
    let local: SocketAddr = if remote.is_ipv6() {
        "[::]:0".parse().expect("valid literal")
    } else {
        "0.0.0.0:0".parse().expect("valid literal")
    };
    Endpoint::client(local).map_err(DialError::Socket)
}

/// Connects and completes the TLS handshake within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    cloud: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Connection, DialError> {
    let (host, _) = split_host_port(cloud)?;
    let connecting = endpoint
        .connect_with(config, addr, &host)
        .map_err(|source| DialError::Connect { addr, source })?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(DialError::Handshake { addr, source }),
        Err(_) => Err(DialError::Timeout { addr, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("cloud.example:10000").expect("ok"),
            ("cloud.example".into(), 10000)
        );
        assert_eq!(
            split_host_port("127.0.0.1:1").expect("ok"),
            ("127.0.0.1".into(), 1)
        );
        assert_eq!(
            split_host_port("[::1]:10000").expect("ok"),
            ("::1".into(), 10000)
        );
        for bad in ["cloud", ":10000", "cloud:x", "cloud:99999"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_quic_connection_refused_is_a_busy_refusal() {
        let addr: SocketAddr = "127.0.0.1:10000".parse().expect("literal");
        let closed = |code| DialError::Handshake {
            addr,
            source: ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: Default::default(),
            }),
        };
        assert!(closed(quinn::TransportErrorCode::CONNECTION_REFUSED).is_busy_refusal());
        assert!(!closed(quinn::TransportErrorCode::PROTOCOL_VIOLATION).is_busy_refusal());
        let timeout = DialError::Timeout {
            addr,
            timeout: Duration::from_secs(3),
        };
        assert!(!timeout.is_busy_refusal(), "no answer is not a refusal");
        assert!(
            !DialError::Handshake {
                addr,
                source: ConnectionError::TimedOut
            }
            .is_busy_refusal()
        );
    }
}
