//! cloudcore: the cloud side of the edge system.
//!
//! `serve` runs the QUIC tunnel ([`hub`]) with the cluster CA ([`pki`]) and its durable state
//! ([`registry`]); the CLI's token and node commands work on the same registry file.

pub mod apiserver;
pub mod autonomy;
pub mod config;
pub mod downstream;
pub mod hub;
pub mod join;
pub mod metrics;
pub mod nodes;
pub mod permissions;
pub mod pki;
pub mod reconcile;
pub mod registry;
pub mod scheduler;
pub mod signal;
pub mod state;
pub mod token;
pub mod tokens;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ServeConfig;

/// How often `serve` records in the registry that it is alive.
pub const SERVER_HEARTBEAT: Duration = Duration::from_secs(5);
/// `node list` reports nodes as connected only while that record is younger than this.
pub const SERVER_STALE_AFTER: Duration = Duration::from_secs(20);

/// `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error("cannot build a Kubernetes client: {0}")]
    KubeClient(String),
    #[error(
        "cloudcore's credentials lack permissions it needs: {}; apply deploy/kubernetes/rbac.yaml (or see `cloudcore permissions`)",
        .0.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", ")
    )]
    MissingPermissions(Vec<permissions::Missing>),
    #[error("cannot check cloudcore's permissions in the cluster: {0}")]
    PermissionCheck(#[source] kube::Error),
    #[error("cannot start the embedded control plane")]
    Embedded(#[from] apiserver::EmbeddedError),
    #[error(transparent)]
    DataDir(#[from] state::DataDirError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("cannot bind the metrics listener on {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `serve` until `shutdown` is cancelled. Everything is bound before this returns an
/// error, so a bad address fails fast.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let embedded_mode = matches!(config.control_plane, config::ControlPlane::Embedded { .. });
    // Before anything is created: a data dir that lost a part is refused, not refilled.
    state::check_data_dir(&config.data_dir, embedded_mode, config.allow)?;
    let ca = Arc::new(pki::ClusterCa::load_or_create(&config.data_dir)?);
    let registry = registry::Registry::open(&config.data_dir)?;
    let endpoint = hub::endpoint(&config, &ca)?;
    let metrics_listener = metrics::bind(config.metrics_listen)
        .await
        .map_err(|source| ServeError::Metrics {
            addr: config.metrics_listen,
            source,
        })?;
    tracing::info!(
        listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        metrics = %metrics_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %config.data_dir.display(),
        ca.hash = %ca.hash(),
        cloud = %config.cloud_address(),
        "cloudcore serving"
    );

    let tracker = TaskTracker::new();
    let mut embedded_store = None;
    let (client, lifecycle) = match &config.control_plane {
        config::ControlPlane::Embedded { listen } => {
            let embedded = apiserver::start(
                &config.data_dir,
                *listen,
                &config.server_sans(),
                &ca,
                shutdown.clone(),
                &tracker,
            )
            .await?;
            tracing::info!(
                control_plane = "embedded",
                api = %embedded.listen,
                kubeconfig = %embedded.kubeconfig.display(),
                "Kubernetes API served by cloudcore"
            );
            embedded_store = Some(embedded.store.clone());
            (kube_client(Some(&embedded.kubeconfig)).await?, true)
        }
        config::ControlPlane::Kube { kubeconfig } => {
            tracing::info!(
                control_plane = "kube",
                kubeconfig = %kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "in-cluster".into()),
                "using a real cluster's API"
            );
            let client = kube_client(kubeconfig.as_deref()).await?;
            let missing = permissions::check(&client)
                .await
                .map_err(ServeError::PermissionCheck)?;
            if !missing.is_empty() {
                return Err(ServeError::MissingPermissions(missing));
            }
            tracing::info!("every permission cloudcore needs is granted");
            // The cluster's node-lifecycle controller marks lost nodes itself.
            (client, false)
        }
    };

    // Which store this is, checked against what cloudcore.db recorded before edges connect.
    let cloud_state = state::read(&client).await?;
    let accepted_anyway = state::check_store(&registry, &cloud_state, config.allow)?;
    tracing::info!(
        store.id = %cloud_state.id,
        store.revision = cloud_state.revision,
        accepted_anyway,
        "API store identified"
    );
    // Only now: a refused start must not look like a running serve to `store restore`.
    registry.server_started(&config.cloud_address())?;

    let metrics = Arc::new(metrics::Metrics::default());
    let fence = state::Fence::new(
        client.clone(),
        cloud_state,
        metrics.edges_state_mismatch.clone(),
    );
    let downstream = Arc::new(downstream::Downstream::new(
        downstream::DownstreamConfig::default(),
        metrics.clone(),
    ));
    let (upstream, upstream_worker) = upstream::Upstream::new(
        client.clone(),
        upstream::UpstreamConfig::default(),
        metrics.upstream.clone(),
    );
    tracker.spawn(upstream_worker.run(shutdown.clone()));
    tracker.spawn(downstream::run(
        client.clone(),
        downstream.clone(),
        upstream.clone(),
        shutdown.clone(),
    ));
    // Service-account tokens for edge pods come from a real cluster's TokenRequest API; the
    // embedded control plane has none to give.
    let issuer = if lifecycle {
        tokens::Issuer::Embedded
    } else {
        tokens::Issuer::Kube(client.clone())
    };
    let shared = Arc::new(hub::Shared::new(
        config,
        registry,
        ca,
        metrics.clone(),
        downstream,
        upstream,
        issuer,
        fence,
    ));
    let metrics_shutdown = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = metrics::serve(metrics_listener, metrics, metrics_shutdown).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    if lifecycle {
        // Embedded mode: no kube-scheduler, so cloudcore binds pods itself.
        tracker.spawn(scheduler::run(client.clone(), shutdown.clone()));
    }
    // Both modes: edge pods tolerate their node's absence for their autonomy duration; in
    // embedded mode, with no kube-controller-manager, cloudcore also evicts when that runs out.
    tracker.spawn(autonomy::run(
        client.clone(),
        if lifecycle {
            autonomy::TaintEviction::Enabled
        } else {
            autonomy::TaintEviction::Disabled
        },
        shared.metrics.autonomy.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(nodes::run(
        client,
        shared.presence.clone(),
        nodes::NodeControllerConfig {
            grace_period: shared.config.node_grace_period,
            lifecycle,
            ..nodes::NodeControllerConfig::default()
        },
        shutdown.clone(),
    ));
    tracker.spawn(hub::watch_revocations(shared.clone(), shutdown.clone()));
    tracker.spawn(state::track(shared.clone(), shutdown.clone()));
    tracker.spawn(hub::heartbeat_registry(
        shared.clone(),
        shutdown.clone(),
        SERVER_HEARTBEAT,
    ));

    hub::accept(
        endpoint.clone(),
        shared.clone(),
        shutdown.clone(),
        tracker.clone(),
    )
    .await;

    tracing::info!("shutting down");
    shared.close_all("cloudcore shutting down");
    endpoint.close(
        quinn::VarInt::from_u32(proto::close_code::SHUTDOWN),
        b"cloudcore shutting down",
    );
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 5s");
    }
    if let Some(store) = &embedded_store {
        // The last revision served, so that an older copy of api.db is noticed at the next start.
        let served = shared.fence.current();
        if let Err(e) = shared
            .registry
            .record_served_state(&served.id, store.resource_version())
        {
            tracing::warn!(error = %e, "cannot record the API store's revision");
        }
    }
    if let Err(e) = shared.registry.server_stopped() {
        tracing::warn!(error = %e, "cannot record shutdown");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

/// A kube-rs client from a kubeconfig file, or the in-cluster configuration.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ServeError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ServeError::KubeClient(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| ServeError::KubeClient(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster()
            .map_err(|e| ServeError::KubeClient(format!("in-cluster configuration: {e}")))?,
    };
    kube::Client::try_from(config).map_err(|e| ServeError::KubeClient(e.to_string()))
}

/// The machine's hostname, if it has one.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
