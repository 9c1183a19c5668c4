//! The embedded control plane: a Kubernetes-compatible API served by cloudcore on SQLite, so
//! `kubectl` and kube-rs work against a single machine with no cluster.
//!
//! - [`server`]: HTTPS with client-certificate authentication, the admin kubeconfig.
//! - [`request`]: paths to discovery documents or resource requests.
//! - [`verbs`]: get, list, watch, create, update, patch, delete.
//! - [`objects`]: metadata, defaults, validation, deletion, garbage collection.
//! - [`store`]: objects and watch events in `DIR/api.db`, resourceVersion, watch fan-out.
//! - [`patch`]: JSON patch, JSON merge patch and strategic merge patch.
//! - [`resources`]: the resource table, selectors and server-side printing (tables).
//! - [`discovery`]: `/version`, `/api`, `/apis`, resource lists and OpenAPI documents.
//! - [`status`]: errors as Kubernetes `Status` bodies.
//! - `fuzzing` (hidden): entry points for the fuzz targets in `integration/fuzz/`.

pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod objects;
pub mod patch;
pub mod request;
pub mod resources;
pub mod server;
pub mod status;
pub mod store;
pub mod verbs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::pki::ClusterCa;
use store::{ResourceId, Store, StoreError, StoreOptions};

/// Namespaces every cluster has.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// The embedded API could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
}

/// A started embedded API: where it listens and where its kubeconfig is.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub listen: SocketAddr,
    pub kubeconfig: PathBuf,
    pub store: Store,
}

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
            Ok(_) | Err(StoreError::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens `DIR/api.db`, writes `DIR/kubeconfig`, binds `listen` and serves until cancelled.
pub async fn start(
    data_dir: &Path,
    listen: SocketAddr,
    sans: &[String],
    ca: &ClusterCa,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<Embedded, EmbeddedError> {
    let store = Store::open(&data_dir.join("api.db"), StoreOptions::default())?;
    bootstrap(&store)?;
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
    let api = Arc::new(verbs::Api {
        store: store.clone(),
        bookmark_interval: Duration::from_secs(10),
    });
    let router = axum::Router::new().fallback(verbs::handle).with_state(api);
    tracker.spawn(server::serve(listener, tls, router, shutdown));
    Ok(Embedded {
        listen: bound,
        kubeconfig,
        store,
    })
}
