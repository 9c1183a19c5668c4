//! Raw tunnel clients for tests that speak the protocol themselves (hostile or broken peers):
//! a QUIC connection with a node's identity, and how the cloud closed it.

use std::path::Path;
use std::time::Duration;

use edgecore::{dial, identity, tls};
use quinn::{Connection, ConnectionError};

use crate::Cloud;

/// Connects to `cloud` with the node identity in `dir` (mutual TLS), panicking on failure.
pub async fn connect_as(dir: &Path, cloud: &Cloud) -> Connection {
    let identity = identity::load(dir).expect("identity");
    connect_with(&identity, cloud).await.expect("connect")
}

/// Connects to `cloud` with `identity`; the dial error is the caller's to judge.
pub async fn connect_with(
    identity: &identity::Identity,
    cloud: &Cloud,
) -> Result<Connection, dial::DialError> {
    let addr = dial::resolve(&cloud.address()).await?;
    let endpoint = dial::client_endpoint(addr)?;
    let config = tls::node_config(identity).expect("tls config");
    dial::connect(
        &endpoint,
        config,
        &cloud.address(),
        addr,
        Duration::from_secs(5),
    )
    .await
}

/// Waits for the cloud to close the connection and returns its application close code.
pub async fn closed_by_cloud(connection: &Connection) -> u32 {
    match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(ConnectionError::ApplicationClosed(close)) => close.error_code.into_inner() as u32,
        Ok(other) => panic!("closed, but not by the application: {other}"),
        Err(_) => panic!("the cloud did not close the connection within 5 s"),
    }
}
