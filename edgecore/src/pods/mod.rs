//! Pods bound to this node, run through the CRI (KubeEdge's edged).

pub mod cgroups;
pub mod pleg;
pub mod spec;
pub mod volumes;

pub mod probes;
pub mod worker;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::Store;
use spec::Objects;
use worker::{Adopted, Context, Desired, PodInput};

/// How often sandboxes nobody wants are looked for.
const GC_INTERVAL: Duration = Duration::from_secs(30);

/// When the first garbage collection runs after start.
const FIRST_GC_AFTER: Duration = Duration::from_secs(5);
/// How often the runtime is asked again when it does not answer at start.
const RUNTIME_RETRY: Duration = Duration::from_millis(500);

/// A local operator's request about a pod, by namespace and name (`edgecore ctl`).
#[derive(Debug)]
pub enum Request {
    /// Restart the pod's running containers now.
    Restart {
        namespace: String,
        name: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// A running worker and the versions it was last given.
#[derive(Debug)]
struct WorkerHandle {
    namespace: String,
    name: String,
    desired: watch::Sender<Desired>,
    commands: mpsc::Sender<worker::Command>,
    fingerprint: u64,
}

/// The desired pods read from the store, with a fingerprint of everything each depends on.
fn desired_pods(store: &Store) -> Result<Vec<(Arc<PodInput>, u64)>, crate::store::StoreError> {
    let objects = store.list(&["Pod", "ConfigMap", "Secret"])?;
    let mut maps: HashMap<String, Vec<(String, ConfigMap, u64)>> = HashMap::new();
    let mut secrets: HashMap<String, Vec<(String, Secret, u64)>> = HashMap::new();
    let mut pods = Vec::new();
    for o in &objects {
        match o.key.kind.as_str() {
            "ConfigMap" => match serde_json::from_slice::<ConfigMap>(&o.body) {
                Ok(m) => maps.entry(o.key.namespace.clone()).or_default().push((
                    o.key.name.clone(),
                    m,
                    o.resource_version,
                )),
                Err(e) => tracing::warn!(object = %o.key, "unreadable ConfigMap in the store: {e}"),
            },
            "Secret" => match serde_json::from_slice::<Secret>(&o.body) {
                Ok(s) => secrets.entry(o.key.namespace.clone()).or_default().push((
                    o.key.name.clone(),
                    s,
                    o.resource_version,
                )),
                Err(e) => tracing::warn!(object = %o.key, "unreadable Secret in the store: {e}"),
            },
            "Pod" => match serde_json::from_slice::<Pod>(&o.body) {
                Ok(p) => pods.push((p, o.resource_version)),
                Err(e) => tracing::warn!(object = %o.key, "unreadable Pod in the store: {e}"),
            },
            _ => {}
        }
    }
    Ok(pods
        .into_iter()
        .map(|(pod, rv)| {
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            rv.hash(&mut hasher);
            let mut inputs = Objects::default();
            for (name, map, rv) in maps.get(&namespace).into_iter().flatten() {
                ("cm", name, rv).hash(&mut hasher);
                inputs.config_maps.insert(name.clone(), map.clone());
            }
            for (name, secret, rv) in secrets.get(&namespace).into_iter().flatten() {
                ("secret", name, rv).hash(&mut hasher);
                inputs.secrets.insert(name.clone(), secret.clone());
            }
            (
                Arc::new(PodInput {
                    pod,
                    objects: inputs,
                }),
                hasher.finish(),
            )
        })
        .collect())
}

fn label<'a>(labels: &'a HashMap<String, String>, key: &str) -> &'a str {
    labels.get(key).map(String::as_str).unwrap_or_default()
}

/// What the runtime runs for us, by pod uid.
async fn runtime_pods(ctx: &Context) -> Result<BTreeMap<String, Adopted>, crate::cri::CriError> {
    let ours = HashMap::from([(
        spec::LABEL_MANAGED_BY.to_string(),
        spec::MANAGED_BY.to_string(),
    )]);
    let mut pods: BTreeMap<String, Adopted> = BTreeMap::new();
    for sandbox in ctx.cri.list_pod_sandboxes(ours.clone()).await? {
        let uid = label(&sandbox.labels, spec::LABEL_POD_UID).to_string();
        let entry = pods.entry(uid).or_default();
        // Keep the newest sandbox; older ones are garbage.
        let newer = entry
            .sandbox
            .as_ref()
            .is_none_or(|s| s.created_at < sandbox.created_at);
        if newer {
            if let Some(old) = entry.sandbox.replace(sandbox) {
                let _ = ctx.cri.remove_pod_sandbox(&old.id).await;
            }
        } else {
            let _ = ctx.cri.remove_pod_sandbox(&sandbox.id).await;
        }
    }
    for container in ctx.cri.list_containers(ours).await? {
        let uid = label(&container.labels, spec::LABEL_POD_UID).to_string();
        pods.entry(uid).or_default().containers.push(container);
    }
    Ok(pods)
}

/// What the runtime runs for us, asked until it answers: no worker may start before, or it
/// would start a second copy of a pod the runtime still runs (containerd starting up with the
/// gateway). Gives up only at shutdown.
async fn runtime_pods_when_ready(
    ctx: &Context,
    shutdown: &CancellationToken,
) -> Option<BTreeMap<String, Adopted>> {
    let started = tokio::time::Instant::now();
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        match runtime_pods(ctx).await {
            Ok(found) => {
                tracing::info!(pods = found.len(), "found pods in the runtime");
                return Some(found);
            }
            Err(e) => {
                // Say so at once, then every 30 s: pods wait for the runtime, nothing else does.
                if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    tracing::warn!(
                        error = %e,
                        waited = ?started.elapsed(),
                        "the container runtime does not answer; pods start once it does (what it already runs is adopted first)"
                    );
                    warned_at = Some(tokio::time::Instant::now());
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(RUNTIME_RETRY) => {}
        }
    }
}

/// Runs the pods the store holds until `shutdown`; then leaves them running.
pub async fn run(
    ctx: Arc<Context>,
    mut store_changed: watch::Receiver<u64>,
    mut requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let store = match Store::open_read_only(&ctx.data_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "pods: cannot read the store");
            return;
        }
    };
    let tracker = TaskTracker::new();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    // Adoption: what the runtime already runs for us is handed to the pod's worker.
    // Adoption: what the runtime already runs for us is handed to the pod's worker.
    let Some(mut adopted) = runtime_pods_when_ready(&ctx, &shutdown).await else {
        return;
    };
    // The first pass soon after start: a sandbox whose creation an earlier edgecore started
    // but did not see finish (killed meanwhile) shows up as a second sandbox of its pod, and
    // the older of the two goes.
    let mut gc =
        tokio::time::interval_at(tokio::time::Instant::now() + FIRST_GC_AFTER, GC_INTERVAL);
    let mut first_pass = true;
    loop {
        match desired_pods(&store) {
            Ok(pods) => {
                let mut seen = std::collections::HashSet::new();
                for (input, fingerprint) in pods {
                    let uid = input.pod.metadata.uid.clone().unwrap_or_default();
                    seen.insert(uid.clone());
                    match workers.get_mut(&uid) {
                        Some(handle) if handle.fingerprint == fingerprint => {}
                        Some(handle) => {
                            handle.fingerprint = fingerprint;
                            let _ = handle.desired.send(Desired::Run(input));
                        }
                        None => {
                            let (tx, rx) = watch::channel(Desired::Run(input.clone()));
                            let (commands, commands_rx) = mpsc::channel(4);
                            let span = tracing::info_span!(
                                "pod",
                                pod.uid = %uid,
                                pod.name = %input.pod.metadata.name.clone().unwrap_or_default(),
                                pod.namespace = %input.pod.metadata.namespace.clone().unwrap_or_default()
                            );
                            let found = adopted.remove(&uid).unwrap_or_default();
                            tracker.spawn(tracing::Instrument::instrument(
                                worker::run(ctx.clone(), rx, commands_rx, found, shutdown.clone()),
                                span,
                            ));
                            workers.insert(
                                uid,
                                WorkerHandle {
                                    namespace: input
                                        .pod
                                        .metadata
                                        .namespace
                                        .clone()
                                        .unwrap_or_default(),
                                    name: input.pod.metadata.name.clone().unwrap_or_default(),
                                    desired: tx,
                                    commands,
                                    fingerprint,
                                },
                            );
                        }
                    }
                }
                workers.retain(|uid, handle| {
                    if seen.contains(uid) {
                        return true;
                    }
                    let _ = handle.desired.send(Desired::Gone);
                    false
                });
                // A deleted pod's service-account tokens go with it.
                ctx.tokens.retain_pods(&seen).await;
            }
            Err(e) => tracing::error!(error = %e, "pods: cannot read the store"),
        }
        if first_pass {
            // Orphans: runtime pods no desired pod claimed.
            for (uid, orphan) in std::mem::take(&mut adopted) {
                remove_orphan(&ctx, &uid, orphan).await;
            }
            first_pass = false;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = store_changed.changed() => if changed.is_err() { break },
            _ = gc.tick() => collect_garbage(&ctx, &workers).await,
            Some(request) = requests.recv() => route(&workers, request),
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
}

/// Hands a local request to the pod's worker; answers at once when there is none.
fn route(workers: &HashMap<String, WorkerHandle>, request: Request) {
    match request {
        Request::Restart {
            namespace,
            name,
            reply,
        } => {
            let handle = workers
                .values()
                .find(|h| h.namespace == namespace && h.name == name);
            let Some(handle) = handle else {
                let _ = reply.send(Err(format!(
                    "pod {namespace}/{name} is not bound to this node"
                )));
                return;
            };
            let why = match handle.commands.try_send(worker::Command::Restart { reply }) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(command)) => {
                    (command, "is busy with earlier requests; try again")
                }
                Err(mpsc::error::TrySendError::Closed(command)) => {
                    (command, "is being removed from this node")
                }
            };
            let (worker::Command::Restart { reply }, why) = why;
            let _ = reply.send(Err(format!("pod {namespace}/{name} {why}")));
        }
    }
}

/// Removes what nobody uses: pods the store no longer holds, and sandboxes left not ready for
/// over a minute (a failed start can leave one; a worker replaces its own dead sandbox).
async fn collect_garbage(ctx: &Context, workers: &HashMap<String, WorkerHandle>) {
    let ours = HashMap::from([(
        spec::LABEL_MANAGED_BY.to_string(),
        spec::MANAGED_BY.to_string(),
    )]);
    if let Ok(sandboxes) = ctx.cri.list_pod_sandboxes(ours).await {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        for sandbox in sandboxes {
            let ready = k8s_cri::v1::PodSandboxState::try_from(sandbox.state)
                .is_ok_and(|s| s == k8s_cri::v1::PodSandboxState::SandboxReady);
            let age = Duration::from_nanos((now - sandbox.created_at as i128).max(0) as u64);
            if !ready && age > Duration::from_secs(60) {
                tracing::info!(sandbox = %sandbox.id, "removing a sandbox that is not ready");
                let _ = ctx.cri.remove_pod_sandbox(&sandbox.id).await;
            }
        }
    }
    if let Ok(found) = runtime_pods(ctx).await {
        for (uid, orphan) in found {
            if !workers.contains_key(&uid) {
                remove_orphan(ctx, &uid, orphan).await;
            }
        }
    }
}

async fn remove_orphan(ctx: &Context, uid: &str, orphan: Adopted) {
    tracing::info!(pod.uid = %uid, "removing a pod no longer bound to this node");
    for container in &orphan.containers {
        let _ = ctx
            .cri
            .stop_container(&container.id, Duration::from_secs(10))
            .await;
    }
    if let Some(sandbox) = &orphan.sandbox {
        let _ = ctx.cri.stop_pod_sandbox(&sandbox.id).await;
        let _ = ctx.cri.remove_pod_sandbox(&sandbox.id).await;
    }
    if !uid.is_empty() {
        worker::cleanup(&spec::pod_paths(&ctx.data_dir, uid), uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_worker_starts_before_the_runtime_answers() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let (outbox, _writer) = crate::outbox::Outbox::open(dir.path(), metrics.clone()).unwrap();
        let ctx = Context {
            cri: crate::cri::Cri::new(&format!("unix://{}/containerd.sock", dir.path().display()))
                .unwrap(),
            data_dir: dir.path().to_path_buf(),
            node_name: "gw".into(),
            host_ip: None,
            outbox,
            tokens: crate::tokens::Tokens::in_memory(crate::tokens::DEFAULT_REFRESH_MAX),
            events: crate::events::Events::new(16, metrics),
            services: crate::services::Services::detached(),
            pleg: pleg::Pleg::new(Arc::new(crate::metrics::Metrics::default())),
        };
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            cancel.cancel();
        });
        let started = std::time::Instant::now();
        let found = runtime_pods_when_ready(&ctx, &shutdown).await;
        assert!(
            found.is_none(),
            "no runtime: nothing to adopt, and no go-ahead"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1100),
            "kept asking until shutdown"
        );
    }
}
