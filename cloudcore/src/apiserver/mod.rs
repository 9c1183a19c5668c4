//! The embedded control plane: a Kubernetes-compatible API served by cloudcore on SQLite, so
//! `kubectl` and kube-rs work against a single machine with no cluster.
//!
//! - [`server`]: HTTPS with client-certificate authentication, the admin kubeconfig.
//! - [`request`]: paths to discovery documents or resource requests.
//! - [`verbs`]: get, list, watch, create, update, patch, delete.
//! - [`objects`]: metadata, defaults, validation, deletion, garbage collection; [`gc`]: the
//!   `orphan` and `foregroundDeletion` finalizers (Orphan and Foreground propagation).
//! - [`store`]: objects and watch events in `DIR/api.db`, resourceVersion, watch fan-out.
//! - [`patch`]: JSON patch, JSON merge patch and strategic merge patch.
//! - [`resources`]: the resource table, selectors and server-side printing (tables).
//! - [`discovery`]: `/version`, `/api`, `/apis`, resource lists and OpenAPI documents.
//! - [`streaming`]: `pods/log`, `pods/exec`, `pods/attach`, `pods/portforward` through the
//!   tunnel to the pod's edge.
//! - [`metrics_api`]: `metrics.k8s.io` (`kubectl top`) from the edges' stats.
//! - [`status`]: errors as Kubernetes `Status` bodies.
//! - [`workloads`]: apps/v1 and batch/v1 defaults and validation; [`scale`]: the scale
//!   subresource.
//! - [`apply`]: server-side apply and managedFields; [`validation`]: `fieldValidation`;
//!   [`dryrun`]: `dryRun=All`; [`pagination`]: lists in pages (`limit`, `continue`).
//! - [`crd`]: resources served from CustomResourceDefinitions.
//! - [`services`]: Services (defaults, validation, cluster IP and node port allocation),
//!   Endpoints, EndpointSlices, and the `default/kubernetes` Service.
//! - `fuzzing` (hidden): entry points for the fuzz targets in `integration/fuzz/`.

pub mod apply;
pub mod crd;
pub mod discovery;
pub mod dryrun;
pub mod event_ttl;
#[doc(hidden)]
pub mod fuzzing;
pub mod gc;
pub mod metrics_api;
pub mod objects;
pub mod pagination;
pub mod patch;
pub mod request;
pub mod resources;
pub mod scale;
pub mod server;
pub mod services;
pub mod status;
pub mod store;
pub mod streaming;
pub mod validation;
pub mod verbs;
pub mod workloads;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::pki::ClusterCa;
use store::{ResourceId, Store, StoreError, StoreOptions};

/// Namespaces every cluster has. kube-apiserver's system-namespaces controller recreates
/// `kube-system`, `kube-public` and `kube-node-lease` when they are missing, and its bootstrap
/// controller `default`; the first three but `kube-node-lease` cannot be deleted at all
/// ([`objects::IMMORTAL_NAMESPACES`]).
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];
/// How often missing system namespaces are recreated (kube-apiserver: every minute).
const SYSTEM_NAMESPACES_INTERVAL: Duration = Duration::from_secs(10);

/// The embedded API could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// The `default/kubernetes` Service or its endpoints could not be written.
    #[error("cannot create the default/kubernetes service: {0}")]
    KubernetesService(String),
}

/// A started embedded API: where it listens and where its kubeconfig is.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub listen: SocketAddr,
    pub kubeconfig: PathBuf,
    pub store: Store,
}

/// Creates the system namespaces that are missing; a namespace still terminating is left to
/// finish and recreated on a later pass.
fn bootstrap(store: &Store) -> Result<(), StoreError> {
    let id = ResourceId {
        group: String::new(),
        resource: "namespaces".into(),
    };
    for name in SYSTEM_NAMESPACES {
        if store.get(&id, "", name)?.is_some() {
            continue;
        }
        let mut namespace = json!({"metadata": {"name": name}});
        objects::prepare_create(
            objects::namespace_info(),
            &mut namespace,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|e| StoreError::InvalidObject(e.message))?;
        match store.create(&id, "", name, namespace) {
            Ok(_) => tracing::info!(namespace = name, "system namespace created"),
            Err(StoreError::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The system-namespaces and bootstrap controllers: [`bootstrap`] and
/// [`services::bootstrap_kubernetes`] every [`SYSTEM_NAMESPACES_INTERVAL`].
async fn keep_system_namespaces(
    store: Store,
    allocator: Arc<services::Allocator>,
    api: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(SYSTEM_NAMESPACES_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store = store.clone();
        let allocator = allocator.clone();
        let pass = move || {
            bootstrap(&store)?;
            services::bootstrap_kubernetes(&store, &allocator, api)
                .map_err(|e| StoreError::InvalidObject(e.message))
        };
        match tokio::task::spawn_blocking(pass).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot recreate system namespaces; will retry")
            }
            Err(e) => tracing::warn!(error = %e, "system namespaces task failed; will retry"),
        }
    }
}

/// Opens `DIR/api.db`, writes `DIR/kubeconfig`, binds `listen` and serves until cancelled,
/// with Services allocated from the default ranges ([`start_with`] takes others).
pub async fn start(
    data_dir: &Path,
    listen: SocketAddr,
    sans: &[String],
    ca: &ClusterCa,
    streams: Arc<crate::streams::Streams>,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<Embedded, EmbeddedError> {
    let settings = Settings {
        listen,
        service_ranges: services::ServiceRanges::default(),
    };
    start_with(data_dir, settings, sans, ca, streams, shutdown, tracker).await
}

/// Where the embedded API listens and what it allocates Services from.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `--service-cluster-ip-range` and `--service-node-port-range`.
    pub service_ranges: services::ServiceRanges,
}

/// [`start`] with these [`Settings`].
pub async fn start_with(
    data_dir: &Path,
    settings: Settings,
    sans: &[String],
    ca: &ClusterCa,
    streams: Arc<crate::streams::Streams>,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<Embedded, EmbeddedError> {
    let Settings {
        listen,
        service_ranges,
    } = settings;
    let store = Store::open(&data_dir.join("api.db"), StoreOptions::default())?;
    bootstrap(&store)?;
    let definitions_rv = crd::load(&store)?;
    let tls = server::tls_config(ca, sans)?;
    let listener = server::bind(listen).await?;
    let bound = listener
        .local_addr()
        .map_err(|source| server::ServerError::Bind {
            addr: listen,
            source,
        })?;
    let host = if bound.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        bound.ip().to_string()
    };
    let server_url = if host.contains(':') {
        format!("https://[{host}]:{}", bound.port())
    } else {
        format!("https://{host}:{}", bound.port())
    };
    let kubeconfig = server::write_admin_kubeconfig(ca, data_dir, &server_url)?;
    let allocator = Arc::new(services::Allocator::new(service_ranges));
    let api_endpoint = services::api_endpoint(bound, sans);
    {
        let (store, allocator) = (store.clone(), allocator.clone());
        tokio::task::spawn_blocking(move || {
            services::bootstrap_kubernetes(&store, &allocator, api_endpoint)
        })
        .await
        .map_err(|e| EmbeddedError::KubernetesService(e.to_string()))?
        .map_err(|e| EmbeddedError::KubernetesService(e.message))?;
    }
    let api_dir = data_dir.to_path_buf();
    let checked = store.clone();
    let health = daemon::health::Health::new()
        .with("api-store", daemon::health::Probe::Readiness, move || {
            store_check(checked.clone())
        })
        .with("data-dir", daemon::health::Probe::Readiness, move || {
            daemon::health::dir_writable(api_dir.clone())
        });
    let api = Arc::new(verbs::Api {
        store: store.clone(),
        bookmark_interval: Duration::from_secs(10),
        health,
        streams,
        services: allocator.clone(),
    });
    let router = axum::Router::new().fallback(verbs::handle).with_state(api);
    tracker.spawn(keep_system_namespaces(
        store.clone(),
        allocator,
        api_endpoint,
        shutdown.clone(),
    ));
    // Events expire after an hour, as with kube-apiserver's --event-ttl=1h.
    tracker.spawn(event_ttl::run(store.clone(), shutdown.clone()));
    tracker.spawn(crd::run(store.clone(), definitions_rv, shutdown.clone()));
    tracker.spawn(gc::run(store.clone(), shutdown.clone()));
    tracker.spawn(server::serve(listener, tls, router, shutdown));
    Ok(Embedded {
        listen: bound,
        kubeconfig,
        store,
    })
}

/// The `api-store` readiness check: the file at `DIR/api.db` opens afresh and reads
/// ([`Store::check_file`]), and the store answers a read (the `default` namespace).
pub async fn store_check(store: Store) -> daemon::health::CheckResult {
    let id = ResourceId {
        group: String::new(),
        resource: "namespaces".into(),
    };
    let read = move || {
        store.check_file()?;
        store.get(&id, "", "default")
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(daemon::error_chain(&e)),
        Err(e) => Err(format!("check task failed: {e}")),
    }
}

/// `/livez`, `/readyz` and `/healthz` of the embedded API: the checks' answer, with a failure
/// as kube-apiserver answers it (500 and the `[-]` lines; the metrics port keeps 503).
pub(crate) async fn health_response(
    health: &daemon::health::Health,
    endpoint: daemon::health::Endpoint,
    query: Option<&str>,
) -> axum::response::Response {
    let mut response = daemon::http::health_response(health, endpoint, query).await;
    if response.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE {
        *response.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
    }
    response
}
