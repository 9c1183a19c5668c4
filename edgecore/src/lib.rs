//! edgecore: the daemon on an edge gateway.
//!
//! `join` obtains the node identity once; `run` keeps the tunnel to cloudcore up ([`hub`]).

pub mod backoff;
pub mod control;
pub mod cri;
pub mod ctl;
pub mod devices;
pub mod dial;
pub mod events;
pub mod hub;
pub mod identity;
pub mod images;
pub mod join;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod pods;
pub mod replica;
pub mod services;
pub mod store;
pub mod streams;
pub mod tls;
pub mod tokens;

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
    /// The container runtime's CRI socket, `unix:///PATH`; `None` holds the desired state
    /// without running pods (sync-only, for benchmarks of the sync layer).
    pub cri_endpoint: Option<String>,
    /// Max pods and reserved resources of the Node this gateway reports.
    pub node: node::NodeConfig,
    pub devices: devices::DevicesConfig,
    /// The data path, DNS and environment variables of Services (docs/services.md).
    pub services: services::ServicesConfig,
}

/// `edgecore run` could not start or lost its identity.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("cannot open the local store")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Cri(#[from] cri::CriError),
    #[error("cannot bind the control socket in {dir}")]
    Control {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the metrics listener on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] daemon::datadir::LockError),
    #[error(transparent)]
    DataDir(#[from] daemon::files::FileError),
    #[error("cannot start the services")]
    Services(#[from] services::ServicesError),
}

/// The lock file `run` holds in its data dir.
pub const LOCK_FILE: &str = "edgecore.lock";

/// The gateway's address towards the cloud (pods' `hostIP`). When the cloud's name does not
/// resolve within a second (an offline start: nothing waits for the network), the primary
/// address of the default-route interface; `None` without one either.
async fn host_ip(cloud: &str) -> Option<std::net::IpAddr> {
    let resolved =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host(cloud)).await;
    let peer = match resolved {
        Ok(Ok(mut addrs)) => addrs.next(),
        _ => None,
    };
    peer.and_then(node::host_ip).or_else(node::default_route_ip)
}

/// Runs edgecore until `shutdown` is cancelled.
pub async fn run(config: RunConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    // Fail fast on a missing or corrupt identity, before binding anything.
    let identity = identity::load(&config.hub.data_dir)?;
    // One `run` per data dir, taken before the store and the control socket: a second one
    // would take the socket over and replace this one's session every second.
    daemon::datadir::ensure_private_dir(&config.hub.data_dir)?;
    let _lock =
        daemon::datadir::DataDirLock::acquire(&config.hub.data_dir, LOCK_FILE, "edgecore run")?;
    daemon::datadir::ensure_private_file(&config.hub.data_dir.join(identity::NODE_PEM))?;
    let metrics = Arc::new(metrics::Metrics::default());
    // Desired state comes from the local store first: nothing on the start path needs the
    // cloud.
    let replica = replica::Replica::open(&config.hub.data_dir, metrics.clone())?;
    let control = control::bind(&config.hub.data_dir).map_err(|source| RunError::Control {
        dir: config.hub.data_dir.clone(),
        source,
    })?;
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
    // Reports for the cloud, kept in the store: those not yet acknowledged before a restart
    // are sent first.
    let (outbox, outbox_writer) = outbox::Outbox::open(&config.hub.data_dir, metrics.clone())?;
    tracker.spawn(outbox_writer.run(replica.subscribe(), shutdown.clone()));
    // `edgecore ctl` talks to the runtime this daemon uses. Not fatal: pods run on a full disk
    // too, and `ctl exec --cri-endpoint` still works.
    if let Err(e) = ctl::record_runtime(&config.hub.data_dir, config.cri_endpoint.as_deref()) {
        tracing::warn!(
            error = %daemon::error_chain(&e),
            "cannot record the CRI endpoint for edgecore ctl; ctl exec needs --cri-endpoint until it is"
        );
    }
    let runtime = match &config.cri_endpoint {
        Some(endpoint) => Some(cri::Cri::new(endpoint)?),
        None => None,
    };
    // Service-account tokens of pods' projected volumes: kept in the store, asked for over the
    // session, handed to the volume writer.
    let tokens = tokens::Tokens::open(&config.hub.data_dir, config.hub.token_refresh_max)?;
    // The pods' events for the cloud: in memory, bounded, best effort (docs/events.md).
    let events = events::Events::new(config.hub.max_buffered_events, metrics.clone());
    let _devices = devices::start(
        config.devices.clone(),
        config.hub.data_dir.clone(),
        replica.subscribe(),
        outbox.clone(),
        &tracker,
        shutdown.clone(),
    )?;
    // Services before pods: a pod started now sees its Services' environment variables.
    let services = services::start(
        config.services.clone(),
        config.hub.data_dir.clone(),
        identity.config.node_name.clone(),
        replica.subscribe(),
        outbox.clone(),
        &tracker,
        shutdown.clone(),
    )?;
    let mut pod_requests = None;
    if let Some(cri) = &runtime {
        let cloud = config
            .hub
            .cloud
            .clone()
            .unwrap_or_else(|| identity.config.cloud.clone());
        let context = pods::worker::Context {
            cri: cri.clone(),
            data_dir: config.hub.data_dir.clone(),
            node_name: identity.config.node_name.clone(),
            host_ip: host_ip(&cloud).await,
            outbox: outbox.clone(),
            tokens: tokens.clone(),
            events: events.clone(),
            services: services.clone(),
            pleg: pods::pleg::Pleg::new(metrics.clone()),
        };
        // Runtime changes (container events, or a relist every second without them) wake
        // the pod workers.
        tracker.spawn(context.pleg.clone().run(cri.clone(), shutdown.clone()));
        let host_ip = context
            .host_ip
            .map_or_else(|| "none".into(), |ip| ip.to_string());
        tracing::info!(cri = %cri.endpoint(), host.ip = %host_ip, "running pods through the CRI");
        let (requests, requests_rx) = tokio::sync::mpsc::channel(16);
        pod_requests = Some(requests);
        tracker.spawn(pods::run(
            Arc::new(context),
            replica.subscribe(),
            requests_rx,
            shutdown.clone(),
        ));
    }
    tracker.spawn(control::serve(control, pod_requests, shutdown.clone()));
    {
        let health = health_checks(&config.hub.data_dir, runtime.clone());
        let render: daemon::http::Render = {
            let metrics = metrics.clone();
            Arc::new(move || metrics.render())
        };
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = daemon::http::serve(listener, render, health, shutdown).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    // Streams the cloud opens for kubectl logs, exec, attach, port-forward and top.
    let streams = streams::Dispatcher::new(
        identity.config.node_name.clone(),
        config.hub.data_dir.clone(),
        runtime.clone(),
        replica.subscribe(),
        metrics.clone(),
    );
    let reporter = node::Reporter::new(config.hub.data_dir.clone(), config.node, runtime);
    let result = hub::run(
        config.hub,
        metrics,
        replica,
        outbox,
        reporter,
        tokens,
        streams,
        events,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    Ok(result?)
}

/// The checks behind `/livez`, `/readyz` and `/healthz` on the metrics port
/// (docs/security.md, "Health endpoints"). The cloud is not among them: the edge works
/// offline. The store, the data dir and the runtime are readiness checks: a restart fixes none
/// of them.
fn health_checks(data_dir: &std::path::Path, runtime: Option<cri::Cri>) -> daemon::health::Health {
    use daemon::health::{Health, Probe, dir_writable};
    let (store_dir, probe_dir) = (data_dir.to_path_buf(), data_dir.to_path_buf());
    let health = Health::new()
        .with("store", Probe::Readiness, move || {
            let dir = store_dir.clone();
            async move {
                tokio::task::spawn_blocking(move || store::Store::probe(&dir))
                    .await
                    .map_err(|e| format!("check task failed: {e}"))?
                    .map_err(|e| daemon::error_chain(&e))
            }
        })
        .with("data-dir", Probe::Readiness, move || {
            dir_writable(probe_dir.clone())
        });
    match runtime {
        Some(cri) => health.with("runtime", Probe::Readiness, move || {
            let cri = cri.clone();
            async move {
                cri.version()
                    .await
                    .map(drop)
                    .map_err(|e| daemon::error_chain(&e))
            }
        }),
        None => health,
    }
}
