//! cloudcore: the cloud side of the edge system.
//!
//! `serve` runs the QUIC tunnel ([`hub`]) with the cluster CA ([`pki`]) and its durable state
//! ([`registry`]); the CLI's token and node commands work on the same registry file.

pub mod apiserver;
pub mod autonomy;
pub mod config;
pub mod device_crds;
pub mod downstream;
pub mod events;
pub mod ha;
pub mod hub;
pub mod join;
pub mod kubelet;
pub mod metrics;
pub mod nodes;
pub mod permissions;
pub mod pki;
pub mod reconcile;
pub mod registry;
pub mod scheduler;
pub mod slots;
pub mod state;
pub mod streams;
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
    #[error("cannot choose the kubelet endpoint's address: {0}; set --kubelet-advertise-address")]
    KubeletAddress(String),
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
    #[error(transparent)]
    Lock(#[from] daemon::datadir::LockError),
    #[error(transparent)]
    PrivateDir(#[from] daemon::files::FileError),
}

/// The lock file `serve` holds in its data dir.
pub const LOCK_FILE: &str = "cloudcore.lock";

/// Runs `serve` until `shutdown` is cancelled. Everything is bound before this returns an
/// error, so a bad address fails fast.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    // One `serve` per data dir: a second one would rewrite the kubeconfig and fight over
    // sessions. Held until `run` returns (the kernel frees it if the process dies).
    let _lock = private_data_dir(&config.data_dir)?;
    let embedded_mode = matches!(config.control_plane, config::ControlPlane::Embedded { .. });
    // Kube mode: the one client of the real cluster, made before anything else needs it.
    let kube = match &config.control_plane {
        config::ControlPlane::Kube { kubeconfig } => {
            Some(kube_client(kubeconfig.as_deref(), USER_AGENT).await?)
        }
        config::ControlPlane::Embedded { .. } => None,
    };
    // `--state=cluster`: the CA and the registry live in the cluster; the data dir is a cache.
    let cluster_state = match (&config.shared_state, &kube) {
        (config::SharedState::Cluster { namespace }, Some((client, _))) => Some(Arc::new(
            registry::cluster::ClusterState::new(client.clone(), namespace),
        )),
        _ => None,
    };
    // Before anything else is created: a data dir that lost a part is refused, not refilled.
    if cluster_state.is_none() {
        state::check_data_dir(&config.data_dir, embedded_mode, config.allow)?;
    }
    let ca = match &cluster_state {
        Some(state) => Arc::new(
            pki::ClusterCa::load_or_create_in_cluster(
                &config.data_dir,
                state.client(),
                state.namespace(),
            )
            .await?,
        ),
        None => Arc::new(pki::ClusterCa::load_or_create(&config.data_dir)?),
    };
    let registry = registry::Registry::open(&config.data_dir)?;
    if let Some(state) = &cluster_state {
        registry.attach_cluster(state.clone()).await?;
        state
            .record_cloud_address(&config.cloud_address())
            .await
            .map_err(registry::RegistryError::from)?;
        tracing::info!(
            namespace = state.namespace(),
            "shared state kept in the cluster"
        );
    }
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
    let streams = streams::Streams::new(config.max_streams_per_edge);
    let mut embedded_store = None;
    let mut embedded_kubeconfig = None;
    let mut cluster_url = None;
    let (client, lifecycle) = match &config.control_plane {
        config::ControlPlane::Embedded { listen, services } => {
            let settings = apiserver::Settings {
                listen: *listen,
                service_ranges: *services,
            };
            let embedded = apiserver::start_with(
                &config.data_dir,
                settings,
                &config.server_sans(),
                &ca,
                streams.clone(),
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
            embedded_kubeconfig = Some(embedded.kubeconfig.clone());
            (
                kube_client(Some(&embedded.kubeconfig), USER_AGENT).await?.0,
                true,
            )
        }
        config::ControlPlane::Kube { kubeconfig } => {
            tracing::info!(
                control_plane = "kube",
                kubeconfig = %kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "in-cluster".into()),
                "using a real cluster's API"
            );
            let (client, api_server) = kube.clone().expect("kube mode has its client");
            cluster_url = Some(api_server);
            let missing = permissions::check(&client)
                .await
                .map_err(ServeError::PermissionCheck)?;
            if !missing.is_empty() {
                return Err(ServeError::MissingPermissions(missing));
            }
            if let Some(state) = &cluster_state {
                let missing = permissions::check_cluster_state(&client, state.namespace())
                    .await
                    .map_err(ServeError::PermissionCheck)?;
                if !missing.is_empty() {
                    return Err(ServeError::MissingPermissions(missing));
                }
            }
            tracing::info!("every permission cloudcore needs is granted");
            // The cluster's node-lifecycle controller marks lost nodes itself.
            (client, false)
        }
    };

    // Which store this is, checked against what cloudcore.db recorded before edges connect.
    let cloud_state = match state::read(&client).await {
        Ok(state) => state,
        // A stop asked for while starting: the embedded API is already going away, so the read
        // fails; that is a clean stop, not a failed start.
        Err(_) if shutdown.is_cancelled() => {
            tracing::info!("stopped while starting");
            tracker.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    // Embedded mode: KubeEdge's device API is part of the API this cloudcore serves; its
    // definitions are established before the relay lists Devices. A failure costs devices
    // only: the relay treats them as not served and retries.
    if lifecycle && let Err(e) = device_crds::install(&client).await {
        tracing::error!(error = %daemon::error_chain(&e), "cannot install the device definitions; Devices are not relayed");
    }
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
    streams.attach(downstream.clone(), metrics.clone());
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
    // Kube mode: the kubelet API for every edge node (the embedded API reaches streams itself).
    let kubelet = match &cluster_url {
        Some(api_server) => {
            let advertise = match config.kubelet.advertise {
                Some(ip) => ip,
                None => kubelet::default_advertise(&config.advertise_addresses, Some(api_server))
                    .await
                    .map_err(ServeError::KubeletAddress)?,
            };
            registry.use_kubelet_ports(config.kubelet.ports);
            let endpoints = kubelet::Endpoints::new(advertise, config.kubelet.address_type);
            let rewrite_with = endpoints.clone();
            upstream.rewrite_node_status(Arc::new(move |node, status| {
                if let Some(address) = rewrite_with.of(node) {
                    nodes::apply_kubelet_endpoint(status, address);
                }
            }));
            tracing::info!(
                listen = %config.kubelet.listen,
                advertise = %advertise,
                ports = %format!("{}-{}", config.kubelet.ports.first, config.kubelet.ports.last),
                "kubelet endpoint: one listener per edge node"
            );
            Some((endpoints, kubelet::auth::Auth::new(client.clone())))
        }
        None => None,
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
        streams,
    ));
    // The one Event recorder (one queue, one writer): edges' events in both modes, the
    // scheduler's and the controllers' in embedded mode.
    let recorder = controllers::events::Recorder::with_metrics(
        client.clone(),
        "cloudcore",
        shared.metrics.events.recorder.clone(),
    );
    shared.events.connect(&recorder);
    let accepting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Embedded mode: no kube-controller-manager, so cloudcore runs the workload controllers;
    // readiness reports whether their caches have synced.
    // Their own client, so the API records their writes under kube-controller-manager's name
    // (managedFields), as it does for the real one.
    let controllers_ctx = if lifecycle {
        let controllers_client = match &embedded_kubeconfig {
            Some(path) => kube_client(Some(path), CONTROLLERS_USER_AGENT).await?.0,
            None => client.clone(),
        };
        Some(
            controllers::Context::new(controllers_client)
                .with_recorder(recorder.for_component("controller-manager")),
        )
    } else {
        None
    };
    // Once-only work runs on the replica holding the leader-election Lease (kube mode with
    // several replicas); embedded mode and a lone replica always lead.
    let leadership = match shared
        .config
        .ha
        .as_ref()
        .map(|ha| (ha.replica_id.clone(), ha.election.clone()))
    {
        Some((
            me,
            ha::Election::Lease {
                name,
                namespace,
                timing,
            },
        )) => {
            let leadership = ha::lease::Leadership::new(shared.metrics.ha.clone());
            tracker.spawn(ha::lease::run(
                client.clone(),
                name,
                namespace,
                me,
                timing,
                leadership.clone(),
                shutdown.clone(),
            ));
            leadership
        }
        Some((me, ha::Election::Disabled)) => {
            ha::lease::Leadership::always(&me, shared.metrics.ha.clone())
        }
        None => ha::lease::Leadership::always("cloudcore", shared.metrics.ha.clone()),
    };
    let health = health_checks(
        &shared,
        embedded_store.clone(),
        controllers_ctx.clone(),
        accepting.clone(),
        shutdown.clone(),
    );
    // Which replica leads, in the verbose readiness answer (kube mode with several replicas).
    let health = match &shared.config.ha {
        Some(ha) => {
            let (me, leadership) = (ha.replica_id.clone(), leadership.clone());
            health.with_note("leader-election", move || match leadership.holder() {
                Some(holder) if leadership.is_leader() => format!("this replica ({holder}) leads"),
                Some(holder) => format!("{holder} leads; this replica is {me}"),
                None => format!("no replica holds the lease; this replica is {me}"),
            })
        }
        None => health,
    };
    let metrics_shutdown = shutdown.clone();
    tracker.spawn(async move {
        let render: daemon::http::Render = Arc::new(move || metrics.render());
        if let Err(e) =
            daemon::http::serve(metrics_listener, render, health, metrics_shutdown).await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    if lifecycle {
        // Embedded mode: no kube-scheduler, so cloudcore binds pods itself.
        tracker.spawn(scheduler::run_with_events(
            client.clone(),
            recorder.for_component(scheduler::COMPONENT),
            shutdown.clone(),
        ));
    }
    if let Some(ctx) = controllers_ctx {
        controllers::run_all(ctx, &tracker, shutdown.clone());
    }
    // Both modes: edge pods tolerate their node's absence for their autonomy duration; in
    // embedded mode, with no kube-controller-manager, cloudcore also evicts when that runs out.
    // Once-only: two replicas would write the same tolerations.
    {
        let client = client.clone();
        let metrics = shared.metrics.autonomy.clone();
        tracker.spawn(ha::lease::while_leading(
            leadership.clone(),
            "autonomy",
            shutdown.clone(),
            move |stop| {
                autonomy::run(
                    client.clone(),
                    if lifecycle {
                        autonomy::TaintEviction::Enabled
                    } else {
                        autonomy::TaintEviction::Disabled
                    },
                    metrics.clone(),
                    stop,
                )
            },
        ));
    }
    // Kube mode with several replicas: each edge's session is recorded on its Node; the
    // kubelet endpoint forwards requests for nodes whose session is on another replica.
    let owners = match (&shared.config.ha, &kubelet) {
        (Some(ha), Some((endpoints, _))) => {
            let owners = ha::sessions::Owners::new(ha.replica_id.clone());
            tracker.spawn(ha::sessions::run(
                client.clone(),
                shared.clone(),
                endpoints.clone(),
                owners.clone(),
                shared.metrics.ha.clone(),
                shutdown.clone(),
            ));
            Some(owners)
        }
        _ => None,
    };
    if let Some((endpoints, auth)) = &kubelet {
        tracker.spawn(kubelet::auth::watch_client_ca(
            client.clone(),
            auth.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(kubelet::run(
            shared.config.kubelet.clone(),
            endpoints.clone(),
            shared.clone(),
            auth.clone(),
            owners.clone(),
            shutdown.clone(),
        ));
    }
    tracker.spawn(nodes::run(
        client,
        shared.presence.clone(),
        nodes::NodeControllerConfig {
            grace_period: shared.config.node_grace_period,
            lifecycle,
            kubelet: kubelet.as_ref().map(|(endpoints, _)| endpoints.clone()),
            store: embedded_store.clone(),
            ..nodes::NodeControllerConfig::default()
        },
        shutdown.clone(),
    ));
    tracker.spawn(hub::watch_revocations(shared.clone(), shutdown.clone()));
    if let Some(state) = cluster_state {
        // Its own connection: its commits change the serving one's data_version, which
        // `watch_revocations` follows.
        let cache = registry::Registry::open(&shared.config.data_dir)?;
        tracker.spawn(state.follow(cache, shutdown.clone()));
    }
    tracker.spawn(state::track(shared.clone(), shutdown.clone()));
    tracker.spawn(hub::heartbeat_registry(
        shared.clone(),
        shutdown.clone(),
        SERVER_HEARTBEAT,
    ));

    accepting.store(true, std::sync::atomic::Ordering::SeqCst);
    hub::accept(
        endpoint.clone(),
        shared.clone(),
        shutdown.clone(),
        tracker.clone(),
    )
    .await;

    accepting.store(false, std::sync::atomic::Ordering::SeqCst);
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

/// Makes the data dir and the secrets already in it private (docs/security.md, "File
/// modes"), then takes the data dir's lock.
fn private_data_dir(dir: &std::path::Path) -> Result<daemon::datadir::DataDirLock, ServeError> {
    daemon::datadir::ensure_private_dir(dir)?;
    let lock = daemon::datadir::DataDirLock::acquire(dir, LOCK_FILE, "cloudcore serve")?;
    let pki = dir.join("pki");
    if pki.is_dir() {
        daemon::datadir::ensure_private_dir(&pki)?;
    }
    for file in ["pki/ca.key", "kubeconfig"] {
        daemon::datadir::ensure_private_file(&dir.join(file))?;
    }
    Ok(lock)
}

/// The checks behind `/livez`, `/readyz` and `/healthz` on the metrics port
/// (docs/security.md, "Health endpoints"). Liveness is only `ping`: every dependency outage
/// (a full disk, an unreadable database, the API's watches not synced) is one a restart does
/// not fix, so it fails readiness only.
fn health_checks(
    shared: &Arc<hub::Shared>,
    embedded_store: Option<apiserver::store::Store>,
    controllers_ctx: Option<controllers::Context>,
    accepting: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) -> daemon::health::Health {
    use daemon::health::{Health, Probe, dir_writable};
    let registry = shared.clone();
    let data_dir = shared.config.data_dir.clone();
    let downstream = shared.downstream.clone();
    let mut health = Health::new()
        .with("registry", Probe::Readiness, move || {
            let shared = registry.clone();
            async move {
                tokio::task::spawn_blocking(move || shared.registry.data_version())
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|_| ())
                    .map_err(|e| daemon::error_chain(&e))
            }
        })
        .with("data-dir", Probe::Readiness, move || {
            dir_writable(data_dir.clone())
        })
        .with("watch-caches", Probe::Readiness, move || {
            let synced = downstream.is_synced();
            async move {
                synced
                    .then_some(())
                    .ok_or_else(|| "the API's watches have not listed everything yet".to_string())
            }
        })
        .with("hub", Probe::Readiness, move || {
            let up = accepting.load(std::sync::atomic::Ordering::SeqCst);
            let stopping = shutdown.is_cancelled();
            async move {
                match (up, stopping) {
                    (_, true) => Err("shutting down".to_string()),
                    (false, false) => Err("not accepting tunnel connections yet".to_string()),
                    (true, false) => Ok(()),
                }
            }
        });
    if let Some(store) = embedded_store {
        health = health.with("api-store", Probe::Readiness, move || {
            apiserver::store_check(store.clone())
        });
    }
    if let Some(ctx) = controllers_ctx {
        health = health.with("controllers", Probe::Readiness, move || {
            let unsynced: Vec<&str> = ctx
                .synced()
                .into_iter()
                .filter(|(_, synced)| !synced)
                .map(|(name, _)| name)
                .collect();
            async move {
                if unsynced.is_empty() {
                    Ok(())
                } else {
                    Err(format!("caches not synced: {}", unsynced.join(", ")))
                }
            }
        });
    }
    health
}

/// The User-Agent of cloudcore's requests: the API servers name the field manager of its
/// writes after it (`cloudcore`).
const USER_AGENT: &str = concat!("cloudcore/v", env!("CARGO_PKG_VERSION"));
/// The User-Agent of the embedded workload controllers, named after kube-controller-manager
/// whose work they do, so managedFields read as in a real cluster.
const CONTROLLERS_USER_AGENT: &str = concat!(
    "kube-controller-manager/v",
    env!("CARGO_PKG_VERSION"),
    " cloudcore"
);

/// A client for the CLI's `--state=cluster` commands: the kubeconfig given, else in-cluster
/// configuration (inside a replica with `kubectl exec`).
pub async fn cli_kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, ServeError> {
    Ok(kube_client(kubeconfig, "cloudcore-cli").await?.0)
}

/// A kube-rs client sending `user_agent` from a kubeconfig file, or the in-cluster
/// configuration, and the API server's URL.
async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    user_agent: &'static str,
) -> Result<(kube::Client, http::Uri), ServeError> {
    let mut config = match kubeconfig {
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
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(user_agent),
    ));
    let url = config.cluster_url.clone();
    let client =
        kube::Client::try_from(config).map_err(|e| ServeError::KubeClient(e.to_string()))?;
    Ok((client, url))
}

/// The machine's hostname, if it has one.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
