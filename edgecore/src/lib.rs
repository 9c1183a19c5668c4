//! edgecore: the daemon on an edge gateway.
//!
//! `join` obtains the node identity once; `run` keeps the tunnel to cloudcore up ([`hub`]).

pub mod backoff;
pub mod ctl;
pub mod dial;
pub mod hub;
pub mod identity;
pub mod join;
pub mod metrics;
pub mod node;
pub mod replica;
pub mod signal;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings of `edgecore run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub hub: hub::HubConfig,
    pub metrics_listen: SocketAddr,
}

/// `edgecore run` could not start or lost its identity.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("cannot open the local store")]
    Store(#[from] store::StoreError),
    #[error("cannot bind the metrics listener on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs edgecore until `shutdown` is cancelled.
pub async fn run(config: RunConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    // Fail fast on a missing or corrupt identity, before binding anything.
    let identity = identity::load(&config.hub.data_dir)?;
    let metrics = Arc::new(metrics::Metrics::default());
    // Desired state comes from the local store first: nothing on the start path needs the
    // cloud.
    let replica = replica::Replica::open(&config.hub.data_dir, metrics.clone())?;
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| RunError::Metrics {
            addr: config.metrics_listen,
            source,
        })?;
    tracing::info!(
        node.name = %identity.config.node_name,
        cloud = %config.hub.cloud.as_deref().unwrap_or(&identity.config.cloud),
        certificate.not_after = %identity.not_after,
        metrics = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %config.hub.data_dir.display(),
        store.objects = metrics.store_objects.get(),
        "edgecore running"
    );
    let tracker = TaskTracker::new();
    {
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = metrics::serve(listener, metrics, shutdown).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    let result = hub::run(config.hub, metrics, replica, shutdown.clone()).await;
    shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    Ok(result?)
}
