//! The StatefulSet controller: pods with stable names `<set>-<ordinal>` (ordinals from
//! `spec.ordinals.start`, default 0), made and replaced in order, as kube-controller-manager's
//! does.
//!
//! `OrderedReady` (the default) creates ordinals 0..n-1 one at a time, each waiting until the
//! one before is Running and Ready (available, with `minReadySeconds`), and removes pods from the
//! highest ordinal down, one at a time, only while every other pod is healthy. `Parallel` creates
//! and removes without waiting. A `RollingUpdate` replaces pods from the highest ordinal down to
//! `partition`, one at a time, each after the pod above it is healthy again; `OnDelete` replaces a
//! pod only once someone deletes it. Templates are kept as ControllerRevisions
//! ([`crate::history`]); a pod's `controller-revision-hash` label names its revision, and the
//! status says which revision is current and which is being rolled out.
//!
//! Each pod gets the labels `statefulset.kubernetes.io/pod-name` and
//! `apps.kubernetes.io/pod-index`, its name as `hostname` and the set's `serviceName` as
//! `subdomain`.
//!
//! `volumeClaimTemplates`: the embedded API has no PersistentVolumeClaims. A set with them is
//! accepted; each claim becomes an `emptyDir` volume of the same name in the pod (its data lives
//! as long as the pod), and a Warning Event `VolumeClaimTemplatesNotSupported` says so, once per
//! generation of the set.
//!
//! The autonomy rule ([`crate::pods`]): a pod on a disconnected node is never deleted or
//! replaced by this controller; scaling down and rolling updates wait for its node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    EmptyDirVolumeSource, Node, ObjectReference, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Context;
use crate::events::{EventType, Recorder};
use crate::history::{self, Owner, REVISION_HASH_LABEL, Revisions};
use crate::informer::{
    Key, Listing, Queue, SharedInformer, Synced, all_keys, api_message, controller_key, key_of,
    observed, watch,
};
use crate::pods;

/// The name this controller reports its caches under.
const NAME: &str = "statefulset";
/// `source.component` of its Events.
const COMPONENT: &str = "statefulset-controller";
/// Every StatefulSet is looked at again this often, even without a change.
const RESYNC: Duration = Duration::from_secs(30);
/// A failed reconcile is retried after this long.
const RETRY: Duration = Duration::from_secs(2);
/// The label with the pod's name (a Service can select one pod of the set with it).
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// The label with the pod's ordinal.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// Why a StatefulSet could not be reconciled.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("history")]
    History(#[from] history::HistoryError),
    #[error("api request failed")]
    Api(#[from] kube::Error),
}

/// The StatefulSet controller, following Pods through the shared `pods` informer (its handler is
/// added here); the future runs it until `shutdown`.
pub(crate) fn run(
    ctx: Arc<Context>,
    pods: &mut SharedInformer<Pod>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let client = ctx.client.clone();
    let queue = Arc::new(Queue::default());
    let synced = Synced::new(ctx.clone(), NAME);
    let (sets, sets_driver) = watch(
        Api::<StatefulSet>::all(client.clone()),
        queue.clone(),
        &synced,
        |set| vec![key_of(&set.metadata)],
    );
    pods.add_keys(queue.clone(), &synced, |pod| {
        controller_key(&pod.metadata, "StatefulSet")
            .into_iter()
            .collect()
    });
    let pods_listed = pods.listing();
    let pods = pods.store();
    let (revisions, revisions_driver) = watch(
        Api::<ControllerRevision>::all(client.clone()),
        queue.clone(),
        &synced,
        |r| {
            controller_key(&r.metadata, "StatefulSet")
                .into_iter()
                .collect()
        },
    );
    // A node coming back lets a waiting scale-down or update go on.
    let every_set = sets.clone();
    let (nodes, nodes_driver) = watch(
        Api::<Node>::all(client.clone()),
        queue.clone(),
        &synced,
        move |_| all_keys(&every_set),
    );
    let controller = Controller {
        recorder: ctx.recorder.for_component(COMPONENT),
        client,
        sets,
        pods,
        pods_listed,
        nodes,
        revisions,
        warned: Mutex::new(BTreeSet::new()),
    };
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = futures::future::join3(sets_driver, revisions_driver, nodes_driver) => {}
            _ = controller.work(&queue) => {}
        }
    }
}

struct Controller {
    client: kube::Client,
    recorder: Recorder,
    sets: Store<StatefulSet>,
    /// The shared pod cache; wait for it with `pods_listed`, never `wait_until_ready`.
    pods: Store<Pod>,
    pods_listed: Listing,
    nodes: Store<Node>,
    revisions: Store<ControllerRevision>,
    /// (uid, generation) of the sets already warned about their volumeClaimTemplates.
    warned: Mutex<BTreeSet<(String, i64)>>,
}

/// The one write a pass makes (in OrderedReady order, a pass makes at most one kind).
#[derive(Debug)]
enum Step {
    Create(Vec<Pod>),
    Delete(Vec<(Arc<Pod>, Why)>),
}

/// Why a pod is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Failed,
    ScaleDown,
    Update,
}

impl Controller {
    async fn work(&self, queue: &Queue) {
        for ready in [
            self.sets.wait_until_ready().await.is_ok(),
            self.pods_listed.wait().await.is_ok(),
            self.nodes.wait_until_ready().await.is_ok(),
            self.revisions.wait_until_ready().await.is_ok(),
        ] {
            if !ready {
                return;
            }
        }
        loop {
            for key in queue.next().await {
                let span =
                    tracing::debug_span!("reconcile", namespace = %key.0, statefulset = %key.1);
                match self.reconcile(&key).instrument(span).await {
                    Ok(Some(after)) => queue.add_after(key, after),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(statefulset = %key.1, namespace = %key.0, error = %e, cause = ?std::error::Error::source(&e), "sync failed");
                        queue.add_after(key, RETRY);
                    }
                }
            }
        }
    }

    /// One pass over one StatefulSet; `Some(d)` asks for another pass after `d`.
    async fn reconcile(&self, key: &Key) -> Result<Option<Duration>, SyncError> {
        let Some(set) = self.sets.get(&ObjectRef::new(&key.1).within(&key.0)) else {
            return Ok(None);
        };
        if set.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let Some(spec) = set.spec.as_ref() else {
            return Ok(None);
        };
        self.warn_claims(&set).await;
        let status = set.status.clone().unwrap_or_default();
        let revisions = history::sync(
            &self.client,
            &self.revisions,
            Owner {
                kind: "StatefulSet",
                meta: &set.metadata,
                hash_label: history::STATEFUL_SET_HASH_LABEL,
            },
            &spec.template,
            None,
            status.collision_count,
        )
        .await?;
        let uid = set.metadata.uid.clone().unwrap_or_default();
        let name = set.metadata.name.clone().unwrap_or_default();
        let owned = self.pods.state_filter(|p| {
            p.metadata.namespace == set.metadata.namespace
                && pods::controller_of(&p.metadata).is_some_and(|o| o.uid == uid)
        });
        let pods: BTreeMap<i32, Arc<Pod>> = owned
            .into_iter()
            .filter_map(|p| Some((ordinal(&name, p.metadata.name.as_deref()?)?, p)))
            .collect();
        let disconnected: BTreeSet<String> = self
            .nodes
            .state()
            .iter()
            .filter(|n| pods::node_disconnected(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let pass = Pass {
            set: &set,
            spec,
            revisions: &revisions,
            pods: &pods,
            disconnected: &disconnected,
            now: Timestamp::now(),
        };
        self.write_status(&set, &pass.status()).await?;
        let step = pass.step();
        let wrote = step.is_some();
        if let Some(step) = step {
            self.carry_out(&set, step).await?;
        }

        let mut live: BTreeSet<String> = pods
            .values()
            .filter_map(|p| {
                p.metadata
                    .labels
                    .as_ref()?
                    .get(REVISION_HASH_LABEL)
                    .cloned()
            })
            .collect();
        live.extend(status.current_revision.clone());
        history::truncate(
            &self.client,
            &self.revisions,
            &revisions,
            spec.revision_history_limit,
            |r| r.metadata.name.as_ref().is_some_and(|n| live.contains(n)),
        )
        .await?;
        let waiting = pass.ready_not_available();
        Ok(Some(if wrote {
            Duration::ZERO
        } else {
            waiting.unwrap_or(RESYNC)
        }))
    }

    /// Warns once per generation that volumeClaimTemplates are served as emptyDir volumes.
    async fn warn_claims(&self, set: &StatefulSet) {
        let claims: Vec<String> = set
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        if claims.is_empty() {
            return;
        }
        let key = (
            set.metadata.uid.clone().unwrap_or_default(),
            set.metadata.generation.unwrap_or(0),
        );
        if !self
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key)
        {
            return;
        }
        let message = format!(
            "volumeClaimTemplates are not supported: this control plane has no PersistentVolumeClaims; each pod gets an emptyDir volume in place of claim(s) {} (the data does not outlive the pod)",
            claims.join(", ")
        );
        self.recorder
            .publish(
                &reference(set),
                EventType::Warning,
                "VolumeClaimTemplatesNotSupported",
                &message,
            )
            .await;
    }

    async fn carry_out(&self, set: &StatefulSet, step: Step) -> Result<(), SyncError> {
        let namespace = set.metadata.namespace.clone().unwrap_or_default();
        let set_name = set.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let reference = reference(set);
        match step {
            Step::Create(new) => {
                for pod in new {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    match api.create(&PostParams::default(), &pod).await {
                        Ok(created) => {
                            tracing::info!(pod = %name, "created stateful pod");
                            self.recorder
                                .publish(
                                    &reference,
                                    EventType::Normal,
                                    "SuccessfulCreate",
                                    &format!(
                                        "create Pod {name} in StatefulSet {set_name} successful"
                                    ),
                                )
                                .await;
                            let key = ObjectRef::new(&name).within(&namespace);
                            let uid = created.metadata.uid.clone();
                            observed(|| self.pods.get(&key).is_some_and(|p| p.metadata.uid == uid))
                                .await;
                        }
                        Err(e) => {
                            self.recorder
                                .publish(
                                    &reference,
                                    EventType::Warning,
                                    "FailedCreate",
                                    &format!(
                                        "create Pod {name} in StatefulSet {set_name} failed error: {}",
                                        api_message(&e)
                                    ),
                                )
                                .await;
                            return Err(e.into());
                        }
                    }
                }
            }
            Step::Delete(doomed) => {
                for (pod, why) in doomed {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    if why == Why::Failed {
                        self.recorder
                            .publish(
                                &reference,
                                EventType::Warning,
                                "RecreatingFailedPod",
                                &format!("StatefulSet {namespace}/{set_name} is recreating failed Pod {name}"),
                            )
                            .await;
                    }
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            tracing::info!(pod = %name, ?why, "deleted stateful pod");
                            self.recorder
                                .publish(
                                    &reference,
                                    EventType::Normal,
                                    "SuccessfulDelete",
                                    &format!(
                                        "delete Pod {name} in StatefulSet {set_name} successful"
                                    ),
                                )
                                .await;
                            let key = ObjectRef::new(&name).within(&namespace);
                            let uid = pod.metadata.uid.clone();
                            observed(|| {
                                self.pods.get(&key).is_none_or(|p| {
                                    p.metadata.uid != uid || p.metadata.deletion_timestamp.is_some()
                                })
                            })
                            .await;
                        }
                        Err(kube::Error::Api(status)) if status.code == 404 => {}
                        Err(e) => {
                            self.recorder
                                .publish(
                                    &reference,
                                    EventType::Warning,
                                    "FailedDelete",
                                    &format!(
                                        "delete Pod {name} in StatefulSet {set_name} failed error: {}",
                                        api_message(&e)
                                    ),
                                )
                                .await;
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn write_status(
        &self,
        set: &StatefulSet,
        status: &serde_json::Value,
    ) -> Result<(), kube::Error> {
        let old = serde_json::to_value(set.status.clone().unwrap_or_default()).unwrap_or_default();
        let unchanged = status.as_object().into_iter().flatten().all(|(k, v)| {
            old.get(k).unwrap_or(&json!(null)) == v || (v == &json!(0) && old.get(k).is_none())
        });
        if unchanged {
            return Ok(());
        }
        let api: Api<StatefulSet> = Api::namespaced(
            self.client.clone(),
            set.metadata.namespace.as_deref().unwrap_or_default(),
        );
        api.patch_status(
            set.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
        Ok(())
    }
}

/// What one pass sees of one set; decides the status and the next step without IO.
struct Pass<'a> {
    set: &'a StatefulSet,
    spec: &'a StatefulSetSpec,
    revisions: &'a Revisions,
    /// The set's pods by ordinal.
    pods: &'a BTreeMap<i32, Arc<Pod>>,
    /// Nodes that stopped reporting (the autonomy rule).
    disconnected: &'a BTreeSet<String>,
    now: Timestamp,
}

impl Pass<'_> {
    fn replicas(&self) -> i32 {
        self.spec.replicas.unwrap_or(1)
    }

    /// The first ordinal (`spec.ordinals.start`, default 0).
    fn start(&self) -> i32 {
        self.spec
            .ordinals
            .as_ref()
            .and_then(|o| o.start)
            .unwrap_or(0)
    }

    /// The ordinals the set should have: `start..start + replicas`.
    fn wanted(&self) -> std::ops::Range<i32> {
        self.start()..self.start().saturating_add(self.replicas().max(0))
    }

    fn min_ready(&self) -> i32 {
        self.spec.min_ready_seconds.unwrap_or(0)
    }

    fn ordered(&self) -> bool {
        self.spec.pod_management_policy.as_deref() != Some("Parallel")
    }

    fn update_revision(&self) -> String {
        self.revisions
            .current
            .metadata
            .name
            .clone()
            .unwrap_or_default()
    }

    /// The status' current revision if the set still has it, else the update revision.
    fn current_revision(&self) -> &ControllerRevision {
        let named = self
            .set
            .status
            .as_ref()
            .and_then(|s| s.current_revision.as_ref());
        named
            .and_then(|n| {
                self.revisions
                    .all
                    .iter()
                    .find(|r| r.metadata.name.as_ref() == Some(n))
            })
            .unwrap_or(&self.revisions.current)
    }

    fn healthy(&self, pod: &Pod) -> bool {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        running
            && pod.metadata.deletion_timestamp.is_none()
            && pods::is_available(pod, self.min_ready(), self.now)
    }

    fn on_disconnected_node(&self, pod: &Pod) -> bool {
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some_and(|n| self.disconnected.contains(n))
    }

    fn partition(&self) -> i32 {
        self.spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.partition)
            .unwrap_or(0)
    }

    fn on_delete(&self) -> bool {
        self.spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            == Some("OnDelete")
    }

    /// The status kube-controller-manager reports for what this pass sees.
    fn status(&self) -> serde_json::Value {
        let current = self
            .current_revision()
            .metadata
            .name
            .clone()
            .unwrap_or_default();
        let update = self.update_revision();
        let (mut replicas, mut ready, mut available, mut on_current, mut updated) = (0, 0, 0, 0, 0);
        for pod in self.pods.values() {
            replicas += 1;
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            ready += i32::from(running && pods::is_ready(pod));
            available += i32::from(self.healthy(pod));
            let revision = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REVISION_HASH_LABEL));
            on_current += i32::from(revision == Some(&current));
            updated += i32::from(revision == Some(&update));
        }
        let (mut current, mut on_current) = (current, on_current);
        // The rollout is complete: the update revision becomes the current one.
        if !self.on_delete()
            && updated == replicas
            && ready == replicas
            && replicas == self.replicas()
        {
            current = update.clone();
            on_current = updated;
        }
        json!({
            "replicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": available,
            "currentReplicas": on_current,
            "updatedReplicas": updated,
            "currentRevision": current,
            "updateRevision": update,
            "observedGeneration": self.set.metadata.generation,
            "collisionCount": self.revisions.collision_count,
        })
    }

    /// When a Ready pod becomes available, if one is waiting for `minReadySeconds`.
    fn ready_not_available(&self) -> Option<Duration> {
        let waiting = self
            .pods
            .values()
            .any(|p| pods::is_ready(p) && !pods::is_available(p, self.min_ready(), self.now));
        waiting.then(|| Duration::from_secs(u64::try_from(self.min_ready()).unwrap_or(0) + 1))
    }

    /// The next write, in kube-controller-manager's order: replace failed pods and create
    /// missing ones (lowest ordinal first), remove condemned ones (highest first), then roll.
    fn step(&self) -> Option<Step> {
        let wanted = self.wanted();
        let ordered = self.ordered();
        let mut create = Vec::new();
        let mut delete = Vec::new();
        for ordinal in wanted.clone() {
            match self.pods.get(&ordinal) {
                None => {
                    create.push(self.new_pod(ordinal));
                    if ordered {
                        break;
                    }
                }
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    if ordered {
                        break;
                    }
                }
                Some(pod) if !pods::is_active(pod) => {
                    if !self.on_disconnected_node(pod) {
                        delete.push((pod.clone(), Why::Failed));
                    }
                    if ordered {
                        break;
                    }
                }
                Some(pod) if ordered && !self.healthy(pod) => break,
                Some(_) => {}
            }
        }
        if !delete.is_empty() {
            return Some(Step::Delete(delete));
        }
        if !create.is_empty() {
            return Some(Step::Create(create));
        }
        if ordered
            && wanted
                .clone()
                .any(|o| self.pods.get(&o).is_none_or(|p| !self.healthy(p)))
        {
            return None;
        }

        // Condemned pods (ordinals outside the wanted range), highest ordinal first.
        let condemned: Vec<&Arc<Pod>> = self
            .pods
            .iter()
            .filter(|(o, _)| !wanted.contains(o))
            .map(|(_, p)| p)
            .rev()
            .collect();
        for (i, pod) in condemned.iter().enumerate() {
            if pod.metadata.deletion_timestamp.is_some() || self.on_disconnected_node(pod) {
                if ordered {
                    return None;
                }
                continue;
            }
            // OrderedReady removes an unhealthy pod only if it is the lowest unhealthy one.
            if ordered && !self.healthy(pod) && condemned[i + 1..].iter().any(|p| !self.healthy(p))
            {
                return None;
            }
            delete.push(((*pod).clone(), Why::ScaleDown));
            if ordered {
                break;
            }
        }
        if !delete.is_empty() {
            return Some(Step::Delete(delete));
        }
        if !condemned.is_empty() && ordered {
            return None;
        }

        if self.on_delete() {
            return None;
        }
        let update = self.update_revision();
        let lowest = wanted.start.saturating_add(self.partition().max(0));
        for ordinal in (lowest..wanted.end).rev() {
            let pod = self.pods.get(&ordinal)?;
            let revision = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REVISION_HASH_LABEL));
            if revision != Some(&update) && pod.metadata.deletion_timestamp.is_none() {
                if self.on_disconnected_node(pod) {
                    return None;
                }
                return Some(Step::Delete(vec![(pod.clone(), Why::Update)]));
            }
            if !self.healthy(pod) {
                return None;
            }
        }
        None
    }

    /// The pod for `ordinal`, from the current revision below the partition and the update
    /// revision otherwise (kube-controller-manager's choice).
    fn new_pod(&self, ordinal: i32) -> Pod {
        let current = self.current_revision();
        let below_partition =
            !self.on_delete() && ordinal < self.start().saturating_add(self.partition());
        let (revision, template) = if below_partition {
            let template = history::template(current).unwrap_or_else(|| self.spec.template.clone());
            (current.metadata.name.clone().unwrap_or_default(), template)
        } else {
            (self.update_revision(), self.spec.template.clone())
        };
        stateful_pod(self.set, &template, ordinal, &revision)
    }
}

/// The pod `<set>-<ordinal>` made from `template`, labelled with its identity and `revision`.
fn stateful_pod(
    set: &StatefulSet,
    template: &PodTemplateSpec,
    ordinal: i32,
    revision: &str,
) -> Pod {
    let set_name = set.metadata.name.clone().unwrap_or_default();
    let name = format!("{set_name}-{ordinal}");
    let mut pod = pods::pod_from_template(
        template,
        set.metadata.namespace.as_deref().unwrap_or_default(),
        pods::owner_reference("apps/v1", "StatefulSet", &set.metadata),
        Some(name.clone()),
        None,
    );
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(POD_NAME_LABEL.to_string(), name.clone());
    labels.insert(POD_INDEX_LABEL.to_string(), ordinal.to_string());
    labels.insert(REVISION_HASH_LABEL.to_string(), revision.to_string());
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.hostname = Some(name);
    if let Some(service) = set
        .spec
        .as_ref()
        .and_then(|s| s.service_name.clone())
        .filter(|s| !s.is_empty())
    {
        spec.subdomain = Some(service);
    }
    let claims = set
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.metadata.name.clone());
    for claim in claims {
        let volumes = spec.volumes.get_or_insert_with(Vec::new);
        if volumes.iter().all(|v| v.name != claim) {
            volumes.push(Volume {
                name: claim,
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
        }
    }
    pod
}

/// The ordinal of pod `name` of set `set`: `<set>-<n>`, n a plain non-negative number.
fn ordinal(set: &str, name: &str) -> Option<i32> {
    let digits = name.strip_prefix(set)?.strip_prefix('-')?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

fn reference(set: &StatefulSet) -> ObjectReference {
    ObjectReference {
        api_version: Some("apps/v1".to_string()),
        kind: Some("StatefulSet".to_string()),
        name: set.metadata.name.clone(),
        namespace: set.metadata.namespace.clone(),
        uid: set.metadata.uid.clone(),
        resource_version: set.metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn set(spec: Value) -> StatefulSet {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "db"}});
        spec["template"] = json!({"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "db", "image": "busybox"}]}});
        serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "default", "uid": "u1", "generation": 1},
            "spec": spec,
        }))
        .expect("set")
    }

    fn revisions(update: &str) -> Revisions {
        let revision = |name: &str, number: i64| ControllerRevision {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            revision: number,
            data: None,
        };
        Revisions {
            current: revision(update, 2),
            all: vec![revision("db-old", 1), revision(update, 2)],
            collision_count: None,
            hash_label: history::STATEFUL_SET_HASH_LABEL,
        }
    }

    fn pod(ordinal: i32, revision: &str, healthy: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("db-{ordinal}"), "labels": {REVISION_HASH_LABEL: revision}},
                "spec": {"nodeName": "edge-1", "containers": []},
                "status": {"phase": if healthy {"Running"} else {"Pending"}, "conditions": [{"type": "Ready", "status": if healthy {"True"} else {"False"}}]},
            }))
            .expect("pod"),
        )
    }

    fn step_of(
        set: &StatefulSet,
        pods: &BTreeMap<i32, Arc<Pod>>,
        disconnected: &[&str],
    ) -> Option<Step> {
        let revisions = revisions("db-new");
        let disconnected: BTreeSet<String> = disconnected.iter().map(|s| s.to_string()).collect();
        let pass = Pass {
            set,
            spec: set.spec.as_ref().expect("spec"),
            revisions: &revisions,
            pods,
            disconnected: &disconnected,
            now: Timestamp::now(),
        };
        pass.step()
    }

    fn created(step: Option<Step>) -> Vec<String> {
        match step {
            Some(Step::Create(pods)) => pods.into_iter().filter_map(|p| p.metadata.name).collect(),
            other => panic!("expected creations, got {other:?}"),
        }
    }

    fn deleted(step: Option<Step>) -> Vec<(String, Why)> {
        match step {
            Some(Step::Delete(pods)) => pods
                .into_iter()
                .map(|(p, why)| (p.metadata.name.clone().unwrap_or_default(), why))
                .collect(),
            other => panic!("expected deletions, got {other:?}"),
        }
    }

    #[test]
    fn ordered_ready_creates_one_at_a_time_and_waits() {
        let s = set(json!({"replicas": 3, "serviceName": "db"}));
        let mut pods = BTreeMap::new();
        assert_eq!(created(step_of(&s, &pods, &[])), vec!["db-0"]);
        pods.insert(0, pod(0, "db-new", false));
        assert!(step_of(&s, &pods, &[]).is_none(), "waits for db-0");
        pods.insert(0, pod(0, "db-new", true));
        assert_eq!(created(step_of(&s, &pods, &[])), vec!["db-1"]);

        let parallel = set(json!({"replicas": 3, "podManagementPolicy": "Parallel"}));
        assert_eq!(
            created(step_of(&parallel, &BTreeMap::new(), &[])),
            vec!["db-0", "db-1", "db-2"]
        );
    }

    #[test]
    fn scale_down_goes_from_the_top_and_respects_autonomy() {
        let s = set(json!({"replicas": 1}));
        let pods: BTreeMap<i32, Arc<Pod>> = (0..3).map(|o| (o, pod(o, "db-new", true))).collect();
        assert_eq!(
            deleted(step_of(&s, &pods, &[])),
            vec![("db-2".to_string(), Why::ScaleDown)]
        );
        assert!(
            step_of(&s, &pods, &["edge-1"]).is_none(),
            "a pod of a disconnected node stays"
        );
    }

    #[test]
    fn rolling_update_goes_down_to_the_partition() {
        let s = set(
            json!({"replicas": 3, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}}),
        );
        let mut pods: BTreeMap<i32, Arc<Pod>> =
            (0..3).map(|o| (o, pod(o, "db-old", true))).collect();
        assert_eq!(
            deleted(step_of(&s, &pods, &[])),
            vec![("db-2".to_string(), Why::Update)]
        );
        pods.insert(2, pod(2, "db-new", false));
        assert!(
            step_of(&s, &pods, &[]).is_none(),
            "waits for db-2 to be healthy"
        );
        pods.insert(2, pod(2, "db-new", true));
        assert_eq!(
            deleted(step_of(&s, &pods, &[])),
            vec![("db-1".to_string(), Why::Update)]
        );
        pods.insert(1, pod(1, "db-new", true));
        assert!(
            step_of(&s, &pods, &[]).is_none(),
            "db-0 is below the partition"
        );
        let on_delete = set(json!({"replicas": 3, "updateStrategy": {"type": "OnDelete"}}));
        let old: BTreeMap<i32, Arc<Pod>> = (0..3).map(|o| (o, pod(o, "db-old", true))).collect();
        assert!(step_of(&on_delete, &old, &[]).is_none());
    }

    #[test]
    fn ordinals_can_start_elsewhere() {
        let s = set(
            json!({"replicas": 2, "ordinals": {"start": 5}, "updateStrategy": {"rollingUpdate": {"partition": 1}}}),
        );
        assert_eq!(created(step_of(&s, &BTreeMap::new(), &[])), vec!["db-5"]);
        // db-0 is outside 5..7: condemned once db-5 and db-6 run.
        let mut pods: BTreeMap<i32, Arc<Pod>> = [0, 5, 6]
            .into_iter()
            .map(|o| (o, pod(o, "db-new", true)))
            .collect();
        assert_eq!(
            deleted(step_of(&s, &pods, &[])),
            vec![("db-0".to_string(), Why::ScaleDown)]
        );
        // The partition counts from the start: only db-6 is updated.
        pods.remove(&0);
        pods.insert(5, pod(5, "db-old", true));
        pods.insert(6, pod(6, "db-old", true));
        assert_eq!(
            deleted(step_of(&s, &pods, &[])),
            vec![("db-6".to_string(), Why::Update)]
        );
        pods.insert(6, pod(6, "db-new", true));
        assert!(step_of(&s, &pods, &[]).is_none());
    }

    #[test]
    fn pods_have_stable_identity() {
        let s = set(
            json!({"replicas": 1, "serviceName": "db-headless", "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}),
        );
        let template = s.spec.as_ref().expect("spec").template.clone();
        let pod = serde_json::to_value(stateful_pod(&s, &template, 4, "db-abc")).expect("json");
        assert_eq!(pod["metadata"]["name"], "db-4");
        assert_eq!(pod["metadata"]["labels"][POD_NAME_LABEL], "db-4");
        assert_eq!(pod["metadata"]["labels"][POD_INDEX_LABEL], "4");
        assert_eq!(pod["metadata"]["labels"][REVISION_HASH_LABEL], "db-abc");
        assert_eq!(pod["spec"]["hostname"], "db-4");
        assert_eq!(pod["spec"]["subdomain"], "db-headless");
        assert_eq!(
            pod["spec"]["volumes"],
            json!([{"name": "data", "emptyDir": {}}])
        );
        assert_eq!(ordinal("db", "db-12"), Some(12));
        assert_eq!(ordinal("db", "db-012"), None);
        assert_eq!(ordinal("db", "dbx-1"), None);
        assert_eq!(ordinal("db", "db-"), None);
    }
}
