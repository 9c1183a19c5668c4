//! The cloud's state and its identity ([operations.md](../../docs/operations.md)): which API
//! store this cloud serves, the checks that keep a lost, replaced or older store from wiping or
//! freezing the edges, and the operator's backup, restore and adoption.
//!
//! - The store's identity is the uid of the `kube-system` Namespace (the usual "cluster ID": a
//!   new embedded `api.db` or a new etcd creates a new one) and its revision is the
//!   resourceVersion of a list, read through kube-rs in both control-plane modes.
//! - `serve` checks the data dir before it creates anything ([`check_data_dir`]) and the store
//!   against what `cloudcore.db` recorded last ([`check_store`]); [`Fence`] checks every edge's
//!   `Hello` ([`proto::sync::check_state`]) and refuses the session of an edge whose state came
//!   from another store or a later point of this one, so its pods keep running untouched.
//! - [`backup`] copies the data dir online; [`restore`] puts a backup in place with its
//!   revisions moved past everything the edges hold, so they converge to it.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams};
use proto::HeldObject;
use proto::sync::{CloudState, StateMismatch, check_state};
use tokio_util::sync::CancellationToken;

use crate::apiserver::store as api_store;
use crate::registry::{Registry, RegistryError};

/// How often `serve` reads the store's revision and records it in `cloudcore.db` as the
/// high-water mark that a restored or copied `api.db` must not fall below.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// A fenced edge is logged at ERROR level at most this often (it retries every 10 s).
const LOUD_EVERY: Duration = Duration::from_secs(60);

/// The files of a data dir that hold the cloud's state.
pub const API_DB: &str = "api.db";
pub const REGISTRY_DB: &str = "cloudcore.db";
pub const PKI_DIR: &str = "pki";

/// The API store's identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the API store's identity (Namespace kube-system)")]
    Read(#[source] kube::Error),
    #[error("Namespace kube-system has no uid")]
    NoUid,
    #[error("the API answered a list without an integer resourceVersion ({0:?})")]
    NoRevision(Option<String>),
}

/// Reads the store's identity and current revision.
pub async fn read(client: &kube::Client) -> Result<CloudState, StateError> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let id = namespaces
        .get("kube-system")
        .await
        .map_err(StateError::Read)?
        .metadata
        .uid
        .filter(|u| !u.is_empty())
        .ok_or(StateError::NoUid)?;
    // A list's resourceVersion is the store's revision at the time of the (consistent) read.
    let config_maps: Api<ConfigMap> = Api::all(client.clone());
    let list = config_maps
        .list(&ListParams::default().limit(1))
        .await
        .map_err(StateError::Read)?;
    let text = list.metadata.resource_version;
    let revision = text
        .as_deref()
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or(StateError::NoRevision(text))?;
    Ok(CloudState { id, revision })
}

/// `serve` refuses this data dir or API store as it is.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "{dir}/cloudcore.db is missing but {present} exists: the registry of nodes, tokens and certificates was lost, and starting with an empty one would refuse every edge. Restore it from a backup (`cloudcore store restore --from BACKUP --data-dir {dir}`, docs/operations.md), or start anew with --allow-empty-registry (every edge must join again)"
    )]
    RegistryLost { dir: PathBuf, present: String },
    #[error(
        "{dir}/pki is missing but cloudcore.db knows {nodes} node(s) and {certificates} certificate(s): the cluster CA was lost, and a new one would lock every edge out. Restore pki/ from a backup (`cloudcore store restore --from BACKUP --data-dir {dir}`, docs/operations.md), or start with a new CA with --allow-new-ca (every edge must join again)"
    )]
    PkiLost {
        dir: PathBuf,
        nodes: u64,
        certificates: u64,
    },
    #[error(
        "{dir}/api.db is missing but cloudcore.db knows {nodes} node(s): starting on an empty API store would tell every edge to delete what it runs. Restore the store from a backup (`cloudcore store restore --from BACKUP --data-dir {dir}`, docs/operations.md), or start on an empty store with --allow-new-store (edges keep their pods and stay fenced until `cloudcore store adopt`)"
    )]
    ApiStoreLost { dir: PathBuf, nodes: u64 },
    #[error(
        "the API store is not the one this cloud served (store id {found}, cloudcore.db recorded {recorded}) and cloudcore.db knows {nodes} node(s): it was replaced or started anew. Restore the store from a backup (docs/operations.md), or accept it with --allow-new-store (edges keep their pods and stay fenced until `cloudcore store adopt`)"
    )]
    StoreReplaced {
        recorded: String,
        found: String,
        nodes: u64,
    },
    #[error(
        "the API store went back in time: its revision is {found} but this cloud served revision {recorded} (an older copy of the store was put in place). Put a backup in place with `cloudcore store restore --from BACKUP --data-dir DIR`, which moves its revisions forward so edges converge to it (docs/operations.md), or accept it as it is with --allow-new-store (edges stay fenced until `cloudcore store adopt`)"
    )]
    StoreRolledBack { recorded: u64, found: u64 },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What `serve` may start on anyway, each an operator's explicit choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allow {
    /// An API store that is not the one recorded (new, replaced or older).
    pub new_store: bool,
    /// A new CA although the registry knows nodes (every edge must join again).
    pub new_ca: bool,
    /// An empty registry although the data dir holds a CA or an API store.
    pub empty_registry: bool,
}

/// Checks the data dir before `serve` creates anything in it: a first start of an empty (or
/// new) dir is fine; a dir that lost one of its parts is refused unless `allow` says otherwise.
/// `embedded` says whether `api.db` is this cloud's store.
pub fn check_data_dir(dir: &Path, embedded: bool, allow: Allow) -> Result<(), DataDirError> {
    let registry = dir.join(REGISTRY_DB).exists();
    let pki = dir.join(PKI_DIR).exists();
    let api = dir.join(API_DB).exists();
    if !registry {
        let present: Vec<&str> = [(pki, "pki/"), (embedded && api, "api.db")]
            .into_iter()
            .filter_map(|(p, name)| p.then_some(name))
            .collect();
        if !present.is_empty() && !allow.empty_registry {
            return Err(DataDirError::RegistryLost {
                dir: dir.to_path_buf(),
                present: present.join(" and "),
            });
        }
        return Ok(());
    }
    let (nodes, certificates) = Registry::open(dir)?.known_nodes()?;
    if !pki && (nodes > 0 || certificates > 0) && !allow.new_ca {
        return Err(DataDirError::PkiLost {
            dir: dir.to_path_buf(),
            nodes,
            certificates,
        });
    }
    if embedded && !api && nodes > 0 && !allow.new_store {
        return Err(DataDirError::ApiStoreLost {
            dir: dir.to_path_buf(),
            nodes,
        });
    }
    Ok(())
}

/// Compares the store `serve` found with the one `cloudcore.db` recorded, then records it.
/// Returns whether the store was accepted only because `allow.new_store` said so.
pub fn check_store(
    registry: &Registry,
    found: &CloudState,
    allow: Allow,
) -> Result<bool, DataDirError> {
    let (nodes, _) = registry.known_nodes()?;
    let refusal = match registry.served_state()? {
        Some(recorded) if recorded.state_id != found.id && nodes > 0 => {
            Some(DataDirError::StoreReplaced {
                recorded: recorded.state_id,
                found: found.id.clone(),
                nodes,
            })
        }
        Some(recorded) if recorded.state_id == found.id && found.revision < recorded.revision => {
            Some(DataDirError::StoreRolledBack {
                recorded: recorded.revision,
                found: found.revision,
            })
        }
        _ => None,
    };
    match refusal {
        Some(refusal) if !allow.new_store => Err(refusal),
        Some(refusal) => {
            tracing::warn!(
                "starting anyway (--allow-new-store): {refusal}; edges that synced with the previous store keep their pods and stay fenced until `cloudcore store adopt`"
            );
            registry.replace_served_state(&found.id, found.revision)?;
            Ok(true)
        }
        None => {
            registry.record_served_state(&found.id, found.revision)?;
            Ok(false)
        }
    }
}

/// The per-session check of edges against the store, with what is known of the store.
pub struct Fence {
    client: kube::Client,
    /// The identity `serve` started with; a store that changes under a running `serve` is
    /// not recorded over it.
    started: CloudState,
    /// A std mutex: held only to copy or replace the value.
    current: Mutex<CloudState>,
    /// Fenced nodes and when each was last logged at ERROR level. Same locking rule.
    fenced: Mutex<HashMap<String, Option<Instant>>>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("started", &self.started)
            .field("current", &self.current())
            .finish()
    }
}

/// The outcome of [`Fence::check`].
#[derive(Debug)]
pub struct Checked {
    /// The store as the check saw it (what `HelloAck` tells the edge).
    pub state: CloudState,
    /// Why the edge must not sync, if it must not.
    pub mismatch: Option<StateMismatch>,
}

impl Fence {
    /// A fence for the store `started`, counting fenced edges in `gauge`.
    pub fn new(
        client: kube::Client,
        started: CloudState,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        Fence {
            client,
            current: Mutex::new(started.clone()),
            started,
            fenced: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    /// The store as last read.
    pub fn current(&self) -> CloudState {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the store again.
    pub async fn refresh(&self) -> Result<CloudState, StateError> {
        let state = read(&self.client).await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
        Ok(state)
    }

    /// Whether an edge remembering `remembered` and holding `inventory` may sync. The cached
    /// revision only lags, so a mismatch is confirmed with a fresh read before it counts.
    pub async fn check(
        &self,
        remembered: &str,
        inventory: &[HeldObject],
    ) -> Result<Checked, StateError> {
        let state = self.current();
        if check_state(&state, remembered, inventory).is_ok() {
            return Ok(Checked {
                state,
                mismatch: None,
            });
        }
        let state = self.refresh().await?;
        let mismatch = check_state(&state, remembered, inventory).err();
        Ok(Checked { state, mismatch })
    }

    /// `node` is fenced for `why`; logs at ERROR level at most once a minute per node.
    pub fn fenced(&self, node: &str, why: &str) {
        let mut fenced = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        let last = fenced.entry(node.to_string()).or_insert(None);
        if last.is_none_or(|t| t.elapsed() >= LOUD_EVERY) {
            *last = Some(Instant::now());
            tracing::error!(node.name = %node, "refusing to sync the edge: {why}");
        } else {
            tracing::debug!(node.name = %node, "refusing to sync the edge: {why}");
        }
        self.gauge.set(fenced.len() as i64);
    }

    /// `node` syncs normally again.
    pub fn cleared(&self, node: &str) {
        let mut fenced = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        if fenced.remove(node).is_some() {
            tracing::info!(node.name = %node, "the edge is no longer fenced");
        }
        self.gauge.set(fenced.len() as i64);
    }
}

/// Records the store's revision in the registry every [`REFRESH_EVERY`] until `shutdown`: the
/// high-water mark a restored or copied `api.db` must reach.
pub async fn track(shared: std::sync::Arc<crate::hub::Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared.fence.refresh().await {
            Ok(state) if state.id == shared.fence.started.id => {
                let worker = shared.clone();
                let recorded = tokio::task::spawn_blocking(move || {
                    worker
                        .registry
                        .record_served_state(&state.id, state.revision)
                })
                .await;
                if let Ok(Err(e)) = recorded {
                    tracing::warn!(error = %e, "cannot record the API store's revision");
                }
            }
            Ok(state) => {
                if !warned {
                    warned = true;
                    tracing::error!(
                        started = %shared.fence.started.id,
                        now = %state.id,
                        "the API store changed identity while cloudcore runs; edges that synced with the previous one are fenced"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the API store's revision"),
        }
    }
}

/// A backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    ApiStore(#[from] api_store::StoreError),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
    move |source| BackupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`backup`] wrote.
#[derive(Debug)]
pub struct BackupReport {
    pub files: Vec<PathBuf>,
}

/// Copies the cloud's state in `dir` into the new directory `to` (mode 0700: it holds the CA
/// key): `cloudcore.db` and `api.db` (if this is an embedded control plane's dir) through
/// `VACUUM INTO`, consistent while `serve` runs, and `pki/`.
pub fn backup(dir: &Path, to: &Path) -> Result<BackupReport, BackupError> {
    require_initialized(dir)?;
    if to.exists() && fs::read_dir(to).map_err(io("read", to))?.next().is_some() {
        return Err(BackupError::Refused(format!(
            "{} exists and is not empty; back up into a new directory",
            to.display()
        )));
    }
    fs::create_dir_all(to).map_err(io("create", to))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o700))
        .map_err(io("set permissions on", to))?;
    let mut files = Vec::new();
    Registry::open(dir)?.backup_to(&to.join(REGISTRY_DB))?;
    files.push(to.join(REGISTRY_DB));
    if dir.join(API_DB).exists() {
        api_store::backup(&dir.join(API_DB), &to.join(API_DB))?;
        files.push(to.join(API_DB));
    }
    copy_pki(&dir.join(PKI_DIR), &to.join(PKI_DIR))?;
    files.push(to.join(PKI_DIR));
    for file in [to.join(REGISTRY_DB), to.join(API_DB)] {
        if file.exists() {
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600))
                .map_err(io("set permissions on", &file))?;
        }
    }
    fs::File::open(to)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", to))?;
    Ok(BackupReport { files })
}

fn copy_pki(from: &Path, to: &Path) -> Result<(), BackupError> {
    fs::create_dir_all(to).map_err(io("create", to))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o700))
        .map_err(io("set permissions on", to))?;
    for (name, mode) in [("ca.crt", 0o644), ("ca.key", 0o600)] {
        let source = from.join(name);
        let dest = to.join(name);
        let bytes = fs::read(&source).map_err(io("read", &source))?;
        daemon::files::write_atomic(&dest, &bytes, mode)
            .map_err(|e| BackupError::Refused(format!("cannot write {}: {e}", dest.display())))?;
    }
    Ok(())
}

/// Fails naming `dir` unless it holds an initialized cloud (`cloudcore.db` and `pki/`):
/// commands other than `serve` never start a new one.
pub fn require_initialized(dir: &Path) -> Result<(), BackupError> {
    let missing: Vec<&str> = [REGISTRY_DB, "pki/ca.crt"]
        .into_iter()
        .filter(|f| !dir.join(f).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(BackupError::Refused(format!(
        "{} does not hold an initialized cloudcore (missing {}): check --data-dir; only `cloudcore serve` initializes a new data dir",
        dir.display(),
        missing.join(", ")
    )))
}

/// What [`restore`] did, for the operator.
#[derive(Debug)]
pub struct RestoreReport {
    /// One line per part of the state.
    pub lines: Vec<String>,
}

/// Puts the backup in `from` in place in `dir` (cloudcore stopped). `api.db` always, with its
/// revisions moved past the high-water mark `cloudcore.db` recorded (and past the backup's by
/// [`api_store::RESTORE_BUMP`]), so edges converge to it; `cloudcore.db` and `pki/` only when
/// `dir` lost them, since the current ones hold later joins and revocations.
pub fn restore(from: &Path, dir: &Path) -> Result<RestoreReport, BackupError> {
    if !from.join(REGISTRY_DB).exists() || !from.join("pki/ca.crt").exists() {
        return Err(BackupError::Refused(format!(
            "{} is not a cloudcore backup (it needs cloudcore.db and pki/; see `cloudcore store backup`)",
            from.display()
        )));
    }
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let mut lines = Vec::new();
    let registry_path = dir.join(REGISTRY_DB);
    if registry_path.exists() {
        let registry = Registry::open(dir)?;
        if registry.serve_alive(crate::SERVER_STALE_AFTER)? {
            return Err(BackupError::Refused(format!(
                "cloudcore serve is running on {} (its heartbeat is recent); stop it before restoring",
                dir.display()
            )));
        }
        lines.push(format!(
            "kept {} (it holds joins and revocations newer than the backup)",
            registry_path.display()
        ));
    } else {
        fs::copy(from.join(REGISTRY_DB), &registry_path).map_err(io("write", &registry_path))?;
        fs::set_permissions(&registry_path, fs::Permissions::from_mode(0o600))
            .map_err(io("set permissions on", &registry_path))?;
        lines.push(format!("restored {}", registry_path.display()));
    }
    let pki = dir.join(PKI_DIR);
    if pki.exists() {
        lines.push(format!("kept {}", pki.display()));
    } else {
        let staging = dir.join(format!("pki.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        copy_pki(&from.join(PKI_DIR), &staging)?;
        fs::rename(&staging, &pki).map_err(io("create", &pki))?;
        lines.push(format!("restored {}", pki.display()));
    }
    if from.join(API_DB).exists() {
        let registry = Registry::open(dir)?;
        let floor = registry.served_state()?.map_or(0, |s| s.revision);
        let restored = api_store::restore(&from.join(API_DB), &dir.join(API_DB), floor)?;
        lines.push(format!(
            "restored {} ({} objects; revision {} in the backup, now {}: every object has a new resourceVersion above anything an edge holds, and watches from before get 410 Gone)",
            dir.join(API_DB).display(),
            restored.objects,
            restored.backup_revision,
            restored.revision
        ));
    }
    Ok(RestoreReport { lines })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_none() -> Allow {
        Allow::default()
    }

    /// A registry in `dir` that knows one node.
    fn registry_with_a_node(dir: &Path) -> Registry {
        let registry = Registry::open(dir).unwrap();
        let token = crate::token::BootstrapToken::generate();
        registry
            .create_token(&crate::registry::NewToken {
                token: token.clone(),
                ttl: Duration::from_secs(3600),
                uses: 1,
                node: None,
            })
            .unwrap();
        registry
            .admit_join(&token, "gw-1", &Default::default(), || {
                Ok::<_, std::convert::Infallible>(crate::pki::IssuedCertificate {
                    der: Vec::new(),
                    serial: "s1".into(),
                    not_after: time::OffsetDateTime::now_utc() + time::Duration::days(1),
                })
            })
            .unwrap()
            .unwrap();
        registry
    }

    #[test]
    fn an_empty_data_dir_starts_and_a_dir_that_lost_a_part_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_data_dir(dir.path(), true, allow_none()).is_ok());

        registry_with_a_node(dir.path());
        assert!(matches!(
            check_data_dir(dir.path(), true, allow_none()),
            Err(DataDirError::PkiLost { nodes: 1, .. })
        ));
        fs::create_dir(dir.path().join(PKI_DIR)).unwrap();
        assert!(matches!(
            check_data_dir(dir.path(), true, allow_none()),
            Err(DataDirError::ApiStoreLost { nodes: 1, .. })
        ));
        // Kube mode has no api.db of its own.
        assert!(check_data_dir(dir.path(), false, allow_none()).is_ok());
        let allow = Allow {
            new_store: true,
            ..Allow::default()
        };
        assert!(check_data_dir(dir.path(), true, allow).is_ok());

        let lost = tempfile::tempdir().unwrap();
        fs::create_dir(lost.path().join(PKI_DIR)).unwrap();
        let refused = check_data_dir(lost.path(), true, allow_none()).unwrap_err();
        assert!(matches!(refused, DataDirError::RegistryLost { .. }));
        assert!(refused.to_string().contains("--allow-empty-registry"));
        assert!(
            !lost.path().join(REGISTRY_DB).exists(),
            "the check created a registry"
        );
    }

    #[test]
    fn a_replaced_or_older_store_is_refused_unless_allowed_and_then_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry_with_a_node(dir.path());
        let first = CloudState {
            id: "a".into(),
            revision: 50,
        };
        assert!(!check_store(&registry, &first, allow_none()).unwrap());
        let older = CloudState {
            id: "a".into(),
            revision: 20,
        };
        assert!(matches!(
            check_store(&registry, &older, allow_none()),
            Err(DataDirError::StoreRolledBack {
                recorded: 50,
                found: 20
            })
        ));
        let other = CloudState {
            id: "b".into(),
            revision: 900,
        };
        assert!(matches!(
            check_store(&registry, &other, allow_none()),
            Err(DataDirError::StoreReplaced { .. })
        ));
        let allow = Allow {
            new_store: true,
            ..Allow::default()
        };
        assert!(check_store(&registry, &older, allow).unwrap());
        // Accepted once: the older store is the recorded one now.
        assert!(!check_store(&registry, &older, allow_none()).unwrap());
    }
}
