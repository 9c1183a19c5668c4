//! The Deployment controller, in kube-controller-manager's shape: reflectors for Deployments,
//! ReplicaSets, Pods and Nodes feed a work queue of Deployment keys. Each reconcile claims the
//! namespace's ReplicaSets (adopt and release by selector), finds the one whose template is
//! the Deployment's (the *new* ReplicaSet, `<name>-<pod-template-hash>`, created when missing
//! and given the next revision, also when an old one is reused by `kubectl rollout undo`),
//! then scales (a paused Deployment or a change of `spec.replicas`, proportionally across
//! ReplicaSets during a rollout) or rolls out (RollingUpdate within maxSurge/maxUnavailable,
//! or Recreate), removes ReplicaSets beyond `revisionHistoryLimit` and writes the status with
//! the `Available` and `Progressing` conditions (progressDeadlineSeconds).
//!
//! The autonomy rule ([`crate::pods`]): the ReplicaSet controller never deletes a pod of a
//! disconnected node, so a rollout whose old pods sit on one waits for them; the Deployment
//! says so in `Progressing` (reason [`WAITING_FOR_DISCONNECTED_NODE`]), and such a wait never
//! counts against the progress deadline. docs/workloads.md describes it for operators.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::Selector;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::events::{EventType, Recorder};
use crate::informer::SharedInformer;
use crate::pods;
use crate::replicaset::{api_message, selects};
use crate::workqueue::{Change, DisconnectedNodes, Key, Listed, Queue, on_event, reflect};

/// The label (and selector term) that ties a ReplicaSet and its pods to one template.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// A ReplicaSet's revision; the Deployment carries its new ReplicaSet's.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Earlier revisions of a ReplicaSet brought back by a rollback, comma-separated.
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
/// `spec.replicas` of the Deployment when it last scaled this ReplicaSet.
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
/// `spec.replicas` + maxSurge of the Deployment when it last scaled this ReplicaSet.
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
/// The `Progressing` reason of a rollout that waits for pods of disconnected nodes.
pub const WAITING_FOR_DISCONNECTED_NODE: &str = "WaitingForDisconnectedNode";

/// Annotations a Deployment does not copy to its ReplicaSets.
const NOT_COPIED: [&str; 6] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];
/// kube's defaults of `progressDeadlineSeconds` and `revisionHistoryLimit`, used when the
/// stored object has none.
const DEFAULT_PROGRESS_DEADLINE: i32 = 600;
const DEFAULT_REVISION_HISTORY_LIMIT: i32 = 10;
/// The longest `revision-history` annotation kept, in characters.
const MAX_REVISION_HISTORY_CHARS: usize = 2000;

/// Why a reconcile failed; the key is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {step} {name}")]
    Api {
        step: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("invalid {field} of deployment {name}: {value:?}")]
    Invalid {
        field: &'static str,
        name: String,
        value: String,
    },
    #[error(
        "replicaset {name} exists and is not this deployment's: hash collision, count now {count}"
    )]
    Collision { name: String, count: i32 },
}

/// The Deployment controller, following Pods through the shared `pods` informer (its handler
/// is added here); the future runs it until `shutdown`.
pub(crate) fn run(
    ctx: Arc<Context>,
    pods: &mut SharedInformer<Pod>,
    nodes: &mut SharedInformer<Node>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let client = ctx.client.clone();
    let (d_store, d_writer) = reflector::store::<Deployment>();
    let (rs_store, rs_writer) = reflector::store::<ReplicaSet>();
    let controller = Arc::new(Controller {
        recorder: ctx.recorder.for_component("deployment-controller"),
        client: client.clone(),
        deployments: d_store,
        replicasets: rs_store,
        pods: pods.store(),
        nodes: nodes.store(),
        queue: Queue::default(),
    });
    let listed = Listed::new(ctx, "deployment", 4);
    // The shared pod cache is this controller's reflector 2.
    let pod_events = controller.clone();
    pods.add_handler(on_event(listed.clone(), 2, move |pod: &Pod, _| {
        pod_events.pod_changed(pod)
    }));
    let pods_listed = pods.listing();
    // The shared node cache is reflector 3: a node that connects or disconnects changes which
    // of a deployment's pods count as available.
    let node_events = controller.clone();
    let disconnected = DisconnectedNodes::default();
    nodes.add_handler(on_event(listed.clone(), 3, move |node: &Node, change| {
        if disconnected.flipped(node, change) {
            for d in node_events.deployments.state() {
                node_events
                    .queue
                    .add(Key::new(&d.namespace().unwrap_or_default(), &d.name_any()));
            }
        }
    }));
    let nodes_listed = nodes.listing();
    async move {
        let watch_deployments = reflect(
            Api::<Deployment>::all(client.clone()),
            d_writer,
            &listed,
            0,
            |d, _| {
                let key = Key::new(&d.namespace().unwrap_or_default(), &d.name_any());
                controller.queue.add(key);
            },
        );
        let watch_replicasets = reflect(
            Api::<ReplicaSet>::all(client.clone()),
            rs_writer,
            &listed,
            1,
            |rs, change| controller.replicaset_changed(rs, change),
        );
        let work = async {
            let _ = futures::future::join4(
                controller.deployments.wait_until_ready(),
                controller.replicasets.wait_until_ready(),
                pods_listed.wait(),
                nodes_listed.wait(),
            )
            .await;
            while let Some(key) = controller.queue.next(&shutdown).await {
                match controller.reconcile(&key).await {
                    Ok(requeue) => {
                        controller.queue.forget(&key);
                        if let Some(after) = requeue {
                            controller.queue.add_after(key, after);
                        }
                    }
                    Err(Error::Api {
                        source: kube::Error::Api(e),
                        ..
                    }) if e.code == 409 => {
                        // A cache behind a write of ours: look again once it has caught up.
                        tracing::debug!(deployment = %key, "conflict, retrying");
                        controller.queue.retry(key);
                    }
                    Err(e) => {
                        tracing::warn!(deployment = %key, error = %e, "reconcile failed, retrying");
                        controller.queue.retry(key);
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = watch_deployments => {}
            _ = watch_replicasets => {}
            _ = work => {}
        }
    }
}

struct Controller {
    client: kube::Client,
    recorder: Recorder,
    deployments: Store<Deployment>,
    replicasets: Store<ReplicaSet>,
    /// The shared pod and node caches (wait for their listings on the informers' `Listing`).
    pods: Store<Pod>,
    nodes: Store<Node>,
    queue: Queue,
}

/// The status being written at the end of a reconcile, built up as it goes.
#[derive(Debug, Default)]
struct Working {
    conditions: Vec<DeploymentCondition>,
    collision_count: Option<i32>,
    /// The Deployment's generation after our own writes to it.
    generation: i64,
}

fn replicas_of(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn rs_status(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status
        .as_ref()
        .map(|s| {
            (
                s.replicas,
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn annotation_i32(rs: &ReplicaSet, name: &str) -> Option<i32> {
    rs.annotations().get(name).and_then(|v| v.parse().ok())
}

fn is_recreate(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("Recreate")
}

/// A value of maxSurge/maxUnavailable for `total` replicas: an int as it is, a percentage
/// of `total` rounded up (surge) or down (unavailable), as kube's `GetScaledValueFromIntOrPercent`.
pub fn scaled_value(value: &IntOrString, total: i32, round_up: bool) -> Option<i32> {
    match value {
        IntOrString::Int(i) => Some(*i),
        IntOrString::String(s) => {
            let percent: i64 = s.strip_suffix('%')?.parse().ok()?;
            let product = percent * i64::from(total);
            let value = if round_up {
                (product + 99).div_euclid(100)
            } else {
                product.div_euclid(100)
            };
            i32::try_from(value).ok()
        }
    }
}

/// (maxSurge, maxUnavailable) of a RollingUpdate Deployment, resolved for its replicas; both
/// zero becomes an unavailable of 1, so a rollout can move (kube's `ResolveFenceposts`).
fn fenceposts(d: &Deployment) -> Result<(i32, i32), Error> {
    let default = IntOrString::String("25%".into());
    let rolling = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let surge = rolling
        .and_then(|r| r.max_surge.as_ref())
        .unwrap_or(&default);
    let unavailable = rolling
        .and_then(|r| r.max_unavailable.as_ref())
        .unwrap_or(&default);
    let replicas = replicas_of(d);
    let invalid = |field, value: &IntOrString| Error::Invalid {
        field,
        name: d.name_any(),
        value: format!("{value:?}"),
    };
    let surge_n = scaled_value(surge, replicas, true)
        .ok_or_else(|| invalid("spec.strategy.rollingUpdate.maxSurge", surge))?;
    let unavailable_n = scaled_value(unavailable, replicas, false)
        .ok_or_else(|| invalid("spec.strategy.rollingUpdate.maxUnavailable", unavailable))?;
    if surge_n == 0 && unavailable_n == 0 {
        return Ok((0, 1));
    }
    Ok((surge_n, unavailable_n))
}

fn max_surge(d: &Deployment) -> i32 {
    if is_recreate(d) {
        return 0;
    }
    fenceposts(d).map(|f| f.0).unwrap_or(0)
}

fn max_unavailable(d: &Deployment) -> i32 {
    if is_recreate(d) || replicas_of(d) == 0 {
        return 0;
    }
    let unavailable = fenceposts(d).map(|f| f.1).unwrap_or(0);
    unavailable.min(replicas_of(d))
}

/// A template without its `pod-template-hash` label, normalized for comparison (an empty
/// label or annotation map is no map).
fn template_without_hash(template: Option<&PodTemplateSpec>) -> Value {
    let mut t = template.cloned().unwrap_or_default();
    let meta = t.metadata.get_or_insert_with(ObjectMeta::default);
    if let Some(labels) = meta.labels.as_mut() {
        labels.remove(POD_TEMPLATE_HASH);
    }
    if meta.labels.as_ref().is_some_and(BTreeMap::is_empty) {
        meta.labels = None;
    }
    if meta.annotations.as_ref().is_some_and(BTreeMap::is_empty) {
        meta.annotations = None;
    }
    serde_json::to_value(&t).unwrap_or_default()
}

fn rs_template(rs: &ReplicaSet) -> Option<&PodTemplateSpec> {
    rs.spec.as_ref().and_then(|s| s.template.as_ref())
}

fn d_template(d: &Deployment) -> Option<&PodTemplateSpec> {
    d.spec.as_ref().map(|s| &s.template)
}

fn now_seconds() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

fn condition(type_: &str, status: &str, reason: &str, message: String) -> DeploymentCondition {
    let now = now_seconds();
    DeploymentCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

fn get_condition<'a>(
    conditions: &'a [DeploymentCondition],
    type_: &str,
) -> Option<&'a DeploymentCondition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// kube's `SetDeploymentCondition`: the same status and reason leave the condition as it is;
/// the same status keeps its transition time.
fn set_condition(conditions: &mut Vec<DeploymentCondition>, mut new: DeploymentCondition) {
    if let Some(current) = get_condition(conditions, &new.type_) {
        if current.status == new.status && current.reason == new.reason {
            return;
        }
        if current.status == new.status {
            new.last_transition_time = current.last_transition_time.clone();
        }
    }
    conditions.retain(|c| c.type_ != new.type_);
    conditions.push(new);
}

fn remove_condition(conditions: &mut Vec<DeploymentCondition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

impl Controller {
    fn replicaset_changed(&self, rs: &ReplicaSet, change: Change) {
        let namespace = rs.namespace().unwrap_or_default();
        match pods::controller_of(&rs.metadata) {
            Some(owner) if owner.kind == "Deployment" => {
                self.queue.add(Key::new(&namespace, &owner.name));
            }
            Some(_) => {}
            None if change == Change::Applied => {
                for d in self.deployments.state() {
                    if d.namespace().as_deref() == Some(&namespace)
                        && deployment_selector(&d).is_some_and(|s| selects(&s, rs.labels()))
                    {
                        self.queue.add(Key::new(&namespace, &d.name_any()));
                    }
                }
            }
            None => {}
        }
    }

    fn pod_changed(&self, pod: &Pod) {
        let namespace = pod.namespace().unwrap_or_default();
        let Some(owner) = pods::controller_of(&pod.metadata) else {
            return;
        };
        if owner.kind != "ReplicaSet" {
            return;
        }
        if let Some(rs) = self
            .replicasets
            .get(&ObjectRef::new(&owner.name).within(&namespace))
            && let Some(d) = pods::controller_of(&rs.metadata)
            && d.kind == "Deployment"
        {
            self.queue.add(Key::new(&namespace, &d.name));
        }
    }

    /// Reconciles one Deployment; `Some(delay)` to look again after it (a progress deadline).
    async fn reconcile(&self, key: &Key) -> Result<Option<Duration>, Error> {
        let Some(d) = self
            .deployments
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
        else {
            return Ok(None);
        };
        let d = Deployment::clone(&d);
        let status = d.status.clone().unwrap_or_default();
        let mut working = Working {
            conditions: status.conditions.clone().unwrap_or_default(),
            collision_count: status.collision_count,
            generation: d.metadata.generation.unwrap_or(0),
        };
        if d.metadata.deletion_timestamp.is_some() {
            let mut rss = self.owned_replicasets(&d);
            let (new_rs, old) = self
                .split(&d, &mut rss, CreateNew::No, &mut working)
                .await?;
            self.sync_status(&d, new_rs.as_ref(), &old, &mut working)
                .await?;
            return Ok(None);
        }
        let Some(selector) = deployment_selector(&d) else {
            return Ok(None);
        };
        if selector.selects_all() {
            let message =
                "This deployment is selecting all pods. A non-empty selector is required.";
            self.recorder
                .publish(&reference(&d), EventType::Warning, "SelectingAll", message)
                .await;
            return Ok(None);
        }
        let mut rss = self.claim_replicasets(&d, &selector).await?;
        let paused = d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false);
        check_paused_conditions(&d, paused, &mut working);

        if paused || self.is_scaling_event(&d, &mut rss, &mut working).await? {
            self.sync(&d, &mut rss, paused, &mut working).await?;
            return Ok(None);
        }
        if is_recreate(&d) {
            self.rollout_recreate(&d, &mut rss, &mut working).await
        } else {
            self.rollout_rolling(&d, &mut rss, &mut working).await
        }
    }

    /// The namespace's ReplicaSets this Deployment controls.
    fn owned_replicasets(&self, d: &Deployment) -> Vec<ReplicaSet> {
        let uid = d.metadata.uid.clone().unwrap_or_default();
        self.replicasets
            .state_filter(|rs| {
                rs.metadata.namespace == d.metadata.namespace
                    && pods::controller_of(&rs.metadata).is_some_and(|o| o.uid == uid)
            })
            .iter()
            .map(|rs| ReplicaSet::clone(rs))
            .collect()
    }

    /// The ReplicaSets this Deployment controls after adopting orphans its selector matches
    /// and releasing its own it no longer matches.
    async fn claim_replicasets(
        &self,
        d: &Deployment,
        selector: &Selector,
    ) -> Result<Vec<ReplicaSet>, Error> {
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let candidates = self
            .replicasets
            .state_filter(|rs| rs.metadata.namespace == d.metadata.namespace);
        let mut owned = Vec::new();
        for rs in candidates {
            let matches = selects(selector, rs.labels());
            match pods::controller_of(&rs.metadata) {
                Some(owner) if owner.uid == uid => {
                    if matches {
                        owned.push(ReplicaSet::clone(&rs));
                    } else {
                        let kept: Vec<_> = rs
                            .owner_references()
                            .iter()
                            .filter(|r| r.uid != uid)
                            .cloned()
                            .collect();
                        self.patch_rs_owners(&rs, json!(kept), "release replicaset")
                            .await?;
                    }
                }
                Some(_) => {}
                None if matches && rs.metadata.deletion_timestamp.is_none() => {
                    let mut owners = rs.owner_references().to_vec();
                    owners.push(pods::owner_reference("apps/v1", "Deployment", &d.metadata));
                    if let Some(adopted) = self
                        .patch_rs_owners(&rs, json!(owners), "adopt replicaset")
                        .await?
                    {
                        owned.push(adopted);
                    }
                }
                None => {}
            }
        }
        Ok(owned)
    }

    async fn patch_rs_owners(
        &self,
        rs: &ReplicaSet,
        owners: Value,
        step: &'static str,
    ) -> Result<Option<ReplicaSet>, Error> {
        let patch = json!({"metadata": {
            "ownerReferences": owners,
            "resourceVersion": rs.metadata.resource_version,
        }});
        match self
            .rs_api(rs)
            .patch(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(rs) => Ok(Some(rs)),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
            Err(source) => Err(Error::Api {
                step,
                name: rs.name_any(),
                source,
            }),
        }
    }

    fn rs_api(&self, rs: &ReplicaSet) -> Api<ReplicaSet> {
        Api::namespaced(self.client.clone(), &rs.namespace().unwrap_or_default())
    }

    /// Splits `rss` into the new ReplicaSet (the Deployment's template; created when missing
    /// and `create` says so) and the old ones, bringing revision annotations up to date
    /// (kube's `getAllReplicaSetsAndSyncRevision`). `rss` is updated with what was written.
    async fn split(
        &self,
        d: &Deployment,
        rss: &mut Vec<ReplicaSet>,
        create: CreateNew,
        working: &mut Working,
    ) -> Result<(Option<ReplicaSet>, Vec<ReplicaSet>), Error> {
        rss.sort_by(|a, b| {
            let created = |rs: &ReplicaSet| rs.metadata.creation_timestamp.as_ref().map(|t| t.0);
            created(a)
                .cmp(&created(b))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let wanted = template_without_hash(d_template(d));
        let new_index = rss
            .iter()
            .position(|rs| template_without_hash(rs_template(rs)) == wanted);
        let old: Vec<ReplicaSet> = rss
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != new_index)
            .map(|(_, rs)| rs.clone())
            .collect();
        let max_old_revision = old.iter().map(revision_of).max().unwrap_or(0);
        let new_revision = (max_old_revision + 1).to_string();

        if let Some(i) = new_index {
            let mut copy = rss[i].clone();
            let annotations_changed =
                set_new_rs_annotations(d, &mut copy, &new_revision, Exists::Yes);
            let min_ready = d.spec.as_ref().and_then(|s| s.min_ready_seconds);
            let min_ready_changed =
                copy.spec.as_ref().and_then(|s| s.min_ready_seconds) != min_ready;
            if annotations_changed || min_ready_changed {
                let patch = json!({
                    "metadata": {"annotations": copy.metadata.annotations, "resourceVersion": copy.metadata.resource_version},
                    "spec": {"minReadySeconds": min_ready},
                });
                let written = self
                    .rs_api(&copy)
                    .patch(
                        &copy.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map_err(|source| Error::Api {
                        step: "update revision of replicaset",
                        name: copy.name_any(),
                        source,
                    })?;
                rss[i] = written;
            }
            let new_rs = rss[i].clone();
            self.set_deployment_revision(d, &new_rs, working).await?;
            if get_condition(&working.conditions, "Progressing").is_none()
                && has_progress_deadline(d)
            {
                let message = format!("Found new replica set {:?}", new_rs.name_any());
                set_condition(
                    &mut working.conditions,
                    condition("Progressing", "True", "FoundNewReplicaSet", message),
                );
            }
            return Ok((Some(new_rs), old));
        }
        if create == CreateNew::No {
            return Ok((None, old));
        }

        // A new ReplicaSet, named after the template's hash.
        let template = d_template(d).cloned().unwrap_or_default();
        let hash = pods::template_hash(&template, working.collision_count);
        let mut new_template = template;
        new_template
            .metadata
            .get_or_insert_with(ObjectMeta::default)
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let mut selector = d
            .spec
            .as_ref()
            .map(|s| s.selector.clone())
            .unwrap_or_default();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let name = format!("{}-{}", d.name_any(), hash);
        let mut new_rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: d.metadata.namespace.clone(),
                labels: new_template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone()),
                owner_references: Some(vec![pods::owner_reference(
                    "apps/v1",
                    "Deployment",
                    &d.metadata,
                )]),
                ..ObjectMeta::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: d.spec.as_ref().and_then(|s| s.min_ready_seconds),
                selector,
                template: Some(new_template),
            }),
            status: None,
        };
        let mut all = old.clone();
        all.push(new_rs.clone());
        let new_replicas = new_rs_new_replicas(d, &all, &new_rs)?;
        if let Some(spec) = new_rs.spec.as_mut() {
            spec.replicas = Some(new_replicas);
        }
        set_new_rs_annotations(d, &mut new_rs, &new_revision, Exists::No);

        let api = self.rs_api(&new_rs);
        let created = match api.create(&PostParams::default(), &new_rs).await {
            Ok(created) => created,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = api.get(&name).await.map_err(|source| Error::Api {
                    step: "read existing replicaset",
                    name: name.clone(),
                    source,
                })?;
                let ours = pods::controller_of(&existing.metadata)
                    .is_some_and(|o| Some(&o.uid) == d.metadata.uid.as_ref());
                if ours && template_without_hash(rs_template(&existing)) == wanted {
                    // Our cache had not seen it yet.
                    rss.push(existing.clone());
                    return Ok((Some(existing), old));
                }
                let count = working.collision_count.unwrap_or(0).saturating_add(1);
                working.collision_count = Some(count);
                self.write_status(d, calculate_status(d, None, &old, working), working)
                    .await?;
                return Err(Error::Collision { name, count });
            }
            Err(e) => {
                let message = format!(
                    "Failed to create new replica set {name:?}: {}",
                    api_message(&e)
                );
                if has_progress_deadline(d) {
                    set_condition(
                        &mut working.conditions,
                        condition(
                            "Progressing",
                            "False",
                            "ReplicaSetCreateError",
                            message.clone(),
                        ),
                    );
                    let status = calculate_status(d, None, &old, working);
                    self.write_status(d, status, working).await?;
                }
                self.recorder
                    .publish(
                        &reference(d),
                        EventType::Warning,
                        "ReplicaSetCreateError",
                        &message,
                    )
                    .await;
                return Err(Error::Api {
                    step: "create replicaset",
                    name,
                    source: e,
                });
            }
        };
        if new_replicas > 0 {
            let message = format!("Scaled up replica set {name} from 0 to {new_replicas}");
            self.recorder
                .publish(
                    &reference(d),
                    EventType::Normal,
                    "ScalingReplicaSet",
                    &message,
                )
                .await;
        }
        self.set_deployment_revision(d, &created, working).await?;
        if has_progress_deadline(d) {
            let message = format!("Created new replica set {name:?}");
            set_condition(
                &mut working.conditions,
                condition("Progressing", "True", "NewReplicaSetCreated", message),
            );
        }
        rss.push(created.clone());
        Ok((Some(created), old))
    }

    /// Gives the Deployment its new ReplicaSet's revision annotation, if it differs.
    async fn set_deployment_revision(
        &self,
        d: &Deployment,
        new_rs: &ReplicaSet,
        working: &mut Working,
    ) -> Result<(), Error> {
        let Some(revision) = new_rs.annotations().get(REVISION) else {
            return Ok(());
        };
        if d.annotations().get(REVISION) == Some(revision) {
            return Ok(());
        }
        let patch = json!({"metadata": {"annotations": {REVISION: revision}}});
        let api: Api<Deployment> =
            Api::namespaced(self.client.clone(), &d.namespace().unwrap_or_default());
        let written = api
            .patch(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|source| Error::Api {
                step: "write revision of deployment",
                name: d.name_any(),
                source,
            })?;
        working.generation = written.metadata.generation.unwrap_or(working.generation);
        Ok(())
    }

    /// Whether an active ReplicaSet was scaled for another `spec.replicas` than the
    /// Deployment's now (kube's `isScalingEvent`).
    async fn is_scaling_event(
        &self,
        d: &Deployment,
        rss: &mut Vec<ReplicaSet>,
        working: &mut Working,
    ) -> Result<bool, Error> {
        let (new_rs, old) = self.split(d, rss, CreateNew::No, working).await?;
        let replicas = replicas_of(d);
        Ok(new_rs
            .iter()
            .chain(old.iter())
            .filter(|rs| rs_replicas(rs) > 0)
            .any(|rs| {
                annotation_i32(rs, DESIRED_REPLICAS).is_some_and(|desired| desired != replicas)
            }))
    }

    /// A paused Deployment, or one whose `spec.replicas` changed: scale, clean up (paused),
    /// write the status (kube's `sync`).
    async fn sync(
        &self,
        d: &Deployment,
        rss: &mut Vec<ReplicaSet>,
        paused: bool,
        working: &mut Working,
    ) -> Result<(), Error> {
        let (mut new_rs, mut old) = self.split(d, rss, CreateNew::No, working).await?;
        self.scale(d, &mut new_rs, &mut old).await?;
        if paused {
            self.cleanup(d, &old).await?;
        }
        self.sync_status(d, new_rs.as_ref(), &old, working).await
    }

    async fn sync_status(
        &self,
        d: &Deployment,
        new_rs: Option<&ReplicaSet>,
        old: &[ReplicaSet],
        working: &mut Working,
    ) -> Result<(), Error> {
        let status = calculate_status(d, new_rs, old, working);
        self.write_status(d, status, working).await
    }

    /// Brings the ReplicaSets' sizes to `spec.replicas` (kube's `scale`): the only active
    /// one (or the newest) takes it all; a saturated new one leaves the old ones at 0; during
    /// a rolling update the change is shared in proportion to each ReplicaSet's size.
    async fn scale(
        &self,
        d: &Deployment,
        new_rs: &mut Option<ReplicaSet>,
        old: &mut [ReplicaSet],
    ) -> Result<(), Error> {
        let replicas = replicas_of(d);
        let active: Vec<usize> = (0..=old.len())
            .filter(|i| match i.checked_sub(1) {
                None => new_rs.as_ref().is_some_and(|rs| rs_replicas(rs) > 0),
                Some(j) => rs_replicas(&old[j]) > 0,
            })
            .collect();
        // Index 0 is the new ReplicaSet, j + 1 the old one at j.
        let target = match active.as_slice() {
            [] if new_rs.is_some() => Some(0),
            [] if !old.is_empty() => {
                let newest = (0..old.len())
                    .max_by_key(|j| old[*j].metadata.creation_timestamp.as_ref().map(|t| t.0));
                newest.map(|j| j + 1)
            }
            [] => None,
            [only] => Some(*only),
            _ => None,
        };
        if let Some(target) = target {
            let rs = match target {
                0 => new_rs.as_mut(),
                j => old.get_mut(j - 1),
            };
            if let Some(rs) = rs
                && rs_replicas(rs) != replicas
            {
                self.scale_replicaset(d, rs, replicas).await?;
            }
            return Ok(());
        }
        if let Some(new) = new_rs.as_ref()
            && is_saturated(d, new)
        {
            for rs in old.iter_mut().filter(|rs| rs_replicas(rs) > 0) {
                self.scale_replicaset(d, rs, 0).await?;
            }
            return Ok(());
        }
        if is_recreate(d) {
            return Ok(());
        }
        // Proportional scaling across the active ReplicaSets.
        let mut all: Vec<&mut ReplicaSet> = new_rs
            .iter_mut()
            .chain(old.iter_mut())
            .filter(|rs| rs_replicas(rs) > 0)
            .collect();
        let total: i32 = all.iter().map(|rs| rs_replicas(rs)).sum();
        let allowed = if replicas > 0 {
            replicas + max_surge(d)
        } else {
            0
        };
        let to_add = allowed - total;
        if to_add == 0 {
            return Ok(());
        }
        all.sort_by(|a, b| {
            let created = |rs: &ReplicaSet| rs.metadata.creation_timestamp.as_ref().map(|t| t.0);
            rs_replicas(b).cmp(&rs_replicas(a)).then_with(|| {
                if to_add > 0 {
                    created(b).cmp(&created(a))
                } else {
                    created(a).cmp(&created(b))
                }
            })
        });
        let status_replicas = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let mut sizes: Vec<i32> = Vec::with_capacity(all.len());
        let mut added = 0;
        for rs in &all {
            let proportion = proportion(rs, d, to_add, added, status_replicas);
            sizes.push(rs_replicas(rs) + proportion);
            added += proportion;
        }
        if let Some(first) = sizes.first_mut() {
            *first = (*first + to_add - added).max(0);
        }
        for (rs, size) in all.into_iter().zip(sizes) {
            self.scale_replicaset(d, rs, size).await?;
        }
        Ok(())
    }

    /// Sets a ReplicaSet's size and its desired/max annotations; an event when the size moved.
    async fn scale_replicaset(
        &self,
        d: &Deployment,
        rs: &mut ReplicaSet,
        size: i32,
    ) -> Result<(), Error> {
        let old_size = rs_replicas(rs);
        let replicas = replicas_of(d);
        let max = replicas + max_surge(d);
        let annotations_changed = annotation_i32(rs, DESIRED_REPLICAS) != Some(replicas)
            || annotation_i32(rs, MAX_REPLICAS) != Some(max);
        if old_size == size && !annotations_changed {
            return Ok(());
        }
        let patch = json!({
            "metadata": {
                "annotations": {DESIRED_REPLICAS: replicas.to_string(), MAX_REPLICAS: max.to_string()},
                "resourceVersion": rs.metadata.resource_version,
            },
            "spec": {"replicas": size},
        });
        *rs = self
            .rs_api(rs)
            .patch(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|source| Error::Api {
                step: "scale replicaset",
                name: rs.name_any(),
                source,
            })?;
        if old_size != size {
            let direction = if size > old_size { "up" } else { "down" };
            let message = format!(
                "Scaled {direction} replica set {} from {old_size} to {size}",
                rs.name_any()
            );
            self.recorder
                .publish(
                    &reference(d),
                    EventType::Normal,
                    "ScalingReplicaSet",
                    &message,
                )
                .await;
        }
        Ok(())
    }

    /// Deletes the oldest revisions beyond `revisionHistoryLimit` that have no pods left.
    async fn cleanup(&self, d: &Deployment, old: &[ReplicaSet]) -> Result<(), Error> {
        let limit = d
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(DEFAULT_REVISION_HISTORY_LIMIT);
        let mut cleanable: Vec<&ReplicaSet> = old
            .iter()
            .filter(|rs| rs.metadata.deletion_timestamp.is_none())
            .collect();
        let excess = cleanable.len() as i64 - i64::from(limit);
        if excess <= 0 {
            return Ok(());
        }
        cleanable.sort_by_key(|rs| {
            (
                revision_of(rs),
                rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
            )
        });
        for rs in cleanable.into_iter().take(excess as usize) {
            let (status_replicas, _, _) = rs_status(rs);
            let observed = rs
                .status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .unwrap_or(0);
            if status_replicas != 0
                || rs_replicas(rs) != 0
                || rs.metadata.generation.unwrap_or(0) > observed
            {
                continue;
            }
            tracing::info!(deployment = %d.name_any(), replicaset = %rs.name_any(), "deleting old replica set");
            match self
                .rs_api(rs)
                .delete(&rs.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(source) => {
                    return Err(Error::Api {
                        step: "delete old replicaset",
                        name: rs.name_any(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    async fn rollout_rolling(
        &self,
        d: &Deployment,
        rss: &mut Vec<ReplicaSet>,
        working: &mut Working,
    ) -> Result<Option<Duration>, Error> {
        let (new_rs, mut old) = self.split(d, rss, CreateNew::Yes, working).await?;
        let Some(mut new_rs) = new_rs else {
            return Ok(None);
        };
        // Scale up the new ReplicaSet within maxSurge.
        let replicas = replicas_of(d);
        let wanted = if rs_replicas(&new_rs) > replicas {
            Some(replicas)
        } else if rs_replicas(&new_rs) < replicas {
            let mut all = old.clone();
            all.push(new_rs.clone());
            Some(new_rs_new_replicas(d, &all, &new_rs)?)
        } else {
            None
        };
        if let Some(size) = wanted
            && size != rs_replicas(&new_rs)
        {
            self.scale_replicaset(d, &mut new_rs, size).await?;
            return self.sync_rollout_status(d, &new_rs, &old, working).await;
        }
        // Scale down old ReplicaSets within maxUnavailable.
        if self.reconcile_old(d, &new_rs, &mut old).await? {
            return self.sync_rollout_status(d, &new_rs, &old, working).await;
        }
        let status = calculate_status(d, Some(&new_rs), &old, working);
        if deployment_complete(d, &status, working.generation) {
            self.cleanup(d, &old).await?;
        }
        self.sync_rollout_status(d, &new_rs, &old, working).await
    }

    /// Scales old ReplicaSets down as far as maxUnavailable allows, first their unavailable
    /// pods (kube's `reconcileOldReplicaSets`). Whether anything was scaled.
    async fn reconcile_old(
        &self,
        d: &Deployment,
        new_rs: &ReplicaSet,
        old: &mut [ReplicaSet],
    ) -> Result<bool, Error> {
        let old_pods: i32 = old.iter().map(rs_replicas).sum();
        if old_pods == 0 {
            return Ok(false);
        }
        let all_pods = old_pods + rs_replicas(new_rs);
        let min_available = replicas_of(d) - max_unavailable(d);
        let (_, _, new_available) = rs_status(new_rs);
        let new_unavailable = rs_replicas(new_rs) - new_available;
        let max_scaled_down = all_pods - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(false);
        }
        old.sort_by_key(|rs| rs.metadata.creation_timestamp.as_ref().map(|t| t.0));

        // First the old pods that are not available anyway.
        let mut cleaned = 0;
        for rs in old.iter_mut() {
            if cleaned >= max_scaled_down {
                break;
            }
            let size = rs_replicas(rs);
            let (_, _, available) = rs_status(rs);
            if size == 0 || available >= size {
                continue;
            }
            let down = (max_scaled_down - cleaned).min(size - available);
            self.scale_replicaset(d, rs, size - down).await?;
            cleaned += down;
        }

        // Then as many available ones as keep minAvailable.
        let available_all: i32 = old
            .iter()
            .chain(std::iter::once(new_rs))
            .map(|rs| rs_status(rs).2)
            .sum();
        let mut scaled = 0;
        if available_all > min_available {
            let total_down = available_all - min_available;
            for rs in old.iter_mut() {
                if scaled >= total_down {
                    break;
                }
                let size = rs_replicas(rs);
                if size == 0 {
                    continue;
                }
                let down = size.min(total_down - scaled);
                self.scale_replicaset(d, rs, size - down).await?;
                scaled += down;
            }
        }
        Ok(cleaned + scaled > 0)
    }

    async fn rollout_recreate(
        &self,
        d: &Deployment,
        rss: &mut Vec<ReplicaSet>,
        working: &mut Working,
    ) -> Result<Option<Duration>, Error> {
        let (new_rs, mut old) = self.split(d, rss, CreateNew::No, working).await?;
        let mut scaled_down = false;
        for rs in old.iter_mut().filter(|rs| rs_replicas(rs) > 0) {
            self.scale_replicaset(d, rs, 0).await?;
            scaled_down = true;
        }
        if scaled_down || self.old_pods_running(new_rs.as_ref(), &old) {
            return match new_rs {
                Some(new_rs) => self.sync_rollout_status(d, &new_rs, &old, working).await,
                None => {
                    let status = calculate_status(d, None, &old, working);
                    self.write_status(d, status, working).await?;
                    Ok(None)
                }
            };
        }
        let new_rs = match new_rs {
            Some(rs) => Some(rs),
            None => self.split(d, rss, CreateNew::Yes, working).await?.0,
        };
        let Some(mut new_rs) = new_rs else {
            return Ok(None);
        };
        if rs_replicas(&new_rs) != replicas_of(d) {
            self.scale_replicaset(d, &mut new_rs, replicas_of(d))
                .await?;
        }
        let status = calculate_status(d, Some(&new_rs), &old, working);
        if deployment_complete(d, &status, working.generation) {
            self.cleanup(d, &old).await?;
        }
        self.sync_rollout_status(d, &new_rs, &old, working).await
    }

    /// Whether any pod of an old ReplicaSet still exists and has not finished (Recreate
    /// waits for all of them, terminating ones included).
    fn old_pods_running(&self, new_rs: Option<&ReplicaSet>, old: &[ReplicaSet]) -> bool {
        if old.iter().any(|rs| rs_status(rs).0 > 0) {
            return true;
        }
        let old_uids: HashSet<&str> = old
            .iter()
            .filter_map(|rs| rs.metadata.uid.as_deref())
            .collect();
        let new_uid = new_rs.and_then(|rs| rs.metadata.uid.as_deref());
        self.pods.state().iter().any(|pod| {
            let owner = pods::controller_of(&pod.metadata).map(|o| o.uid.as_str());
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            owner.is_some_and(|o| old_uids.contains(o) && Some(o) != new_uid)
                && !matches!(phase, Some("Succeeded" | "Failed"))
        })
    }

    /// Old ReplicaSets' pods on disconnected nodes, as a `Progressing` message; `None` when
    /// there are none.
    fn disconnected_wait(&self, old: &[ReplicaSet]) -> Option<String> {
        let disconnected: HashSet<String> = self
            .nodes
            .state()
            .iter()
            .filter(|n| pods::node_disconnected(n))
            .map(|n| n.name_any())
            .collect();
        if disconnected.is_empty() {
            return None;
        }
        let mut waiting: BTreeMap<String, (usize, HashSet<String>)> = BTreeMap::new();
        for rs in old {
            let Some(uid) = rs.metadata.uid.as_deref() else {
                continue;
            };
            let active: Vec<Arc<Pod>> = self.pods.state_filter(|p| {
                pods::is_active(p) && pods::controller_of(&p.metadata).is_some_and(|o| o.uid == uid)
            });
            // Only a ReplicaSet that wants fewer pods than it has is held up by them.
            if active.len() <= rs_replicas(rs).max(0) as usize {
                continue;
            }
            for pod in active {
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                if disconnected.contains(&node) {
                    let entry = waiting.entry(rs.name_any()).or_default();
                    entry.0 += 1;
                    entry.1.insert(node);
                }
            }
        }
        if waiting.is_empty() {
            return None;
        }
        let parts: Vec<String> = waiting
            .into_iter()
            .map(|(rs, (count, nodes))| {
                let mut nodes: Vec<String> = nodes.into_iter().collect();
                nodes.sort();
                format!(
                    "{count} pod(s) of replica set {rs:?} on disconnected node(s) {}",
                    nodes.join(", ")
                )
            })
            .collect();
        Some(format!(
            "Waiting for {}: the autonomy rule keeps them until their node is back or its autonomy duration runs out",
            parts.join("; ")
        ))
    }

    /// The status after a rollout step, with `Progressing` moved on as kube's
    /// `syncRolloutStatus` does, plus the wait for disconnected nodes; when to look again
    /// for the progress deadline.
    async fn sync_rollout_status(
        &self,
        d: &Deployment,
        new_rs: &ReplicaSet,
        old: &[ReplicaSet],
        working: &mut Working,
    ) -> Result<Option<Duration>, Error> {
        let mut status = calculate_status(d, Some(new_rs), old, working);
        let old_status = d.status.clone().unwrap_or_default();
        if !has_progress_deadline(d) {
            remove_condition(&mut working.conditions, "Progressing");
        }
        let current = get_condition(&working.conditions, "Progressing").cloned();
        let complete_before = status.replicas == status.updated_replicas
            && current
                .as_ref()
                .is_some_and(|c| c.reason.as_deref() == Some("NewReplicaSetAvailable"));
        let complete = deployment_complete(d, &status, working.generation);
        let name = new_rs.name_any();
        if has_progress_deadline(d) && !complete_before {
            if complete {
                let message = format!("ReplicaSet {name:?} has successfully progressed.");
                set_condition(
                    &mut working.conditions,
                    condition("Progressing", "True", "NewReplicaSetAvailable", message),
                );
            } else if deployment_progressing(&old_status, &status) {
                let message = format!("ReplicaSet {name:?} is progressing.");
                let mut new = condition("Progressing", "True", "ReplicaSetUpdated", message);
                if let Some(c) = &current
                    && c.status == "True"
                {
                    new.last_transition_time = c.last_transition_time.clone();
                }
                remove_condition(&mut working.conditions, "Progressing");
                working.conditions.push(new);
            } else if let Some(message) = self.disconnected_wait(old) {
                let unchanged = current.as_ref().is_some_and(|c| {
                    c.reason.as_deref() == Some(WAITING_FOR_DISCONNECTED_NODE)
                        && c.message.as_deref() == Some(message.as_str())
                });
                if !unchanged {
                    let mut new = condition(
                        "Progressing",
                        "True",
                        WAITING_FOR_DISCONNECTED_NODE,
                        message,
                    );
                    if let Some(c) = &current
                        && c.status == "True"
                    {
                        new.last_transition_time = c.last_transition_time.clone();
                    }
                    remove_condition(&mut working.conditions, "Progressing");
                    working.conditions.push(new);
                }
            } else if timed_out(d, current.as_ref()) {
                let message = format!("ReplicaSet {name:?} has timed out progressing.");
                set_condition(
                    &mut working.conditions,
                    condition("Progressing", "False", "ProgressDeadlineExceeded", message),
                );
            }
        }
        // A ReplicaFailure of the new ReplicaSet shows on the Deployment.
        let failure = new_rs
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "ReplicaFailure"));
        match failure {
            Some(f) => set_condition(
                &mut working.conditions,
                DeploymentCondition {
                    type_: "ReplicaFailure".into(),
                    status: f.status.clone(),
                    reason: f.reason.clone(),
                    message: f.message.clone(),
                    last_update_time: f.last_transition_time.clone(),
                    last_transition_time: f.last_transition_time.clone(),
                },
            ),
            None => remove_condition(&mut working.conditions, "ReplicaFailure"),
        }
        status.conditions = Some(working.conditions.clone());
        self.write_status(d, status, working).await?;

        // Look again when the progress deadline would pass.
        let progressing = get_condition(&working.conditions, "Progressing");
        let deadline = has_progress_deadline(d).then(|| progress_deadline(d));
        match (progressing, deadline) {
            (Some(c), Some(seconds))
                if !complete
                    && c.reason.as_deref() != Some("NewReplicaSetAvailable")
                    && c.reason.as_deref() != Some("ProgressDeadlineExceeded")
                    && c.reason.as_deref() != Some(WAITING_FOR_DISCONNECTED_NODE) =>
            {
                let since = c
                    .last_update_time
                    .as_ref()
                    .map(|t| t.0.as_second())
                    .unwrap_or(0);
                let due = since + i64::from(seconds) - Timestamp::now().as_second();
                Ok(Some(Duration::from_secs(due.max(0) as u64 + 1)))
            }
            _ => Ok(None),
        }
    }

    /// Writes `status` (with `working`'s conditions and collision count) unless it is what
    /// the Deployment already says.
    async fn write_status(
        &self,
        d: &Deployment,
        mut status: k8s_openapi::api::apps::v1::DeploymentStatus,
        working: &Working,
    ) -> Result<(), Error> {
        status.conditions = (!working.conditions.is_empty()).then(|| working.conditions.clone());
        status.collision_count = working.collision_count;
        status.observed_generation = Some(working.generation);
        let old = d.status.clone().unwrap_or_default();
        let normalized = |s: &k8s_openapi::api::apps::v1::DeploymentStatus| {
            json!([
                s.observed_generation.unwrap_or(0),
                s.replicas.unwrap_or(0),
                s.updated_replicas.unwrap_or(0),
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
                s.unavailable_replicas.unwrap_or(0),
                s.collision_count,
                s.conditions.clone().unwrap_or_default(),
            ])
        };
        if normalized(&old) == normalized(&status) {
            return Ok(());
        }
        let patch = json!({"status": {
            "observedGeneration": status.observed_generation,
            "replicas": status.replicas.unwrap_or(0),
            "updatedReplicas": status.updated_replicas.unwrap_or(0),
            "readyReplicas": status.ready_replicas.unwrap_or(0),
            "availableReplicas": status.available_replicas.unwrap_or(0),
            "unavailableReplicas": status.unavailable_replicas.unwrap_or(0),
            "collisionCount": status.collision_count,
            "conditions": status.conditions,
        }});
        let api: Api<Deployment> =
            Api::namespaced(self.client.clone(), &d.namespace().unwrap_or_default());
        match api
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(Error::Api {
                step: "write status of deployment",
                name: d.name_any(),
                source,
            }),
        }
    }
}

/// Whether [`Controller::split`] may create the new ReplicaSet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CreateNew {
    Yes,
    No,
}

/// Whether the ReplicaSet being annotated exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exists {
    Yes,
    No,
}

fn deployment_selector(d: &Deployment) -> Option<Selector> {
    let selector: LabelSelector = d.spec.as_ref()?.selector.clone();
    Selector::try_from(selector).ok()
}

fn reference(d: &Deployment) -> ObjectReference {
    d.object_ref(&())
}

/// `spec.progressDeadlineSeconds`, kube's default (600) when unset; `i32::MAX` means none.
fn progress_deadline(d: &Deployment) -> i32 {
    d.spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE)
}

fn has_progress_deadline(d: &Deployment) -> bool {
    progress_deadline(d) != i32::MAX
}

/// Paused and resumed show in `Progressing` (status Unknown), as kube's `checkPausedConditions`.
fn check_paused_conditions(d: &Deployment, paused: bool, working: &mut Working) {
    if !has_progress_deadline(d) {
        return;
    }
    let current = get_condition(&working.conditions, "Progressing");
    if current.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded")) {
        return;
    }
    let paused_now = current.is_some_and(|c| c.reason.as_deref() == Some("DeploymentPaused"));
    if paused && !paused_now {
        set_condition(
            &mut working.conditions,
            condition(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".into(),
            ),
        );
    } else if !paused && paused_now {
        set_condition(
            &mut working.conditions,
            condition(
                "Progressing",
                "Unknown",
                "DeploymentResumed",
                "Deployment is resumed".into(),
            ),
        );
    }
}

/// kube's `SetNewReplicaSetAnnotations`: copies the Deployment's annotations, raises the
/// revision (keeping a reused ReplicaSet's earlier revisions in `revision-history`), and for a
/// ReplicaSet about to be created sets desired/max replicas. Whether anything changed.
fn set_new_rs_annotations(
    d: &Deployment,
    rs: &mut ReplicaSet,
    new_revision: &str,
    exists: Exists,
) -> bool {
    let replicas = replicas_of(d);
    let max = replicas + max_surge(d);
    let annotations = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let mut changed = false;
    for (k, v) in d.annotations() {
        if NOT_COPIED.contains(&k.as_str()) || annotations.get(k) == Some(v) {
            continue;
        }
        annotations.insert(k.clone(), v.clone());
        changed = true;
    }
    let old_revision = annotations.get(REVISION).cloned();
    let old_number: i64 = match old_revision.as_deref() {
        None => 0,
        Some(v) => match v.parse() {
            Ok(n) => n,
            Err(_) => return changed,
        },
    };
    let new_number: i64 = new_revision.parse().unwrap_or(0);
    if old_number < new_number {
        annotations.insert(REVISION.into(), new_revision.to_string());
        changed = true;
        if let Some(old) = old_revision {
            let history = annotations
                .get(REVISION_HISTORY)
                .cloned()
                .unwrap_or_default();
            let mut revisions: Vec<String> = if history.is_empty() {
                Vec::new()
            } else {
                history.split(',').map(String::from).collect()
            };
            revisions.push(old);
            while revisions.iter().map(|r| r.len() + 1).sum::<usize>() - 1
                > MAX_REVISION_HISTORY_CHARS
                && revisions.len() > 1
            {
                revisions.remove(0);
            }
            annotations.insert(REVISION_HISTORY.into(), revisions.join(","));
        }
    }
    if exists == Exists::No {
        annotations.insert(DESIRED_REPLICAS.into(), replicas.to_string());
        annotations.insert(MAX_REPLICAS.into(), max.to_string());
        changed = true;
    }
    changed
}

/// How many replicas the new ReplicaSet should have now (kube's `NewRSNewReplicas`): all of
/// them for Recreate; for RollingUpdate, as many more as maxSurge leaves room for.
fn new_rs_new_replicas(
    d: &Deployment,
    all: &[ReplicaSet],
    new_rs: &ReplicaSet,
) -> Result<i32, Error> {
    let replicas = replicas_of(d);
    if is_recreate(d) {
        return Ok(replicas);
    }
    let (surge, _) = fenceposts(d)?;
    let current: i32 = all.iter().map(rs_replicas).sum();
    let max_total = replicas + surge;
    if current >= max_total {
        return Ok(rs_replicas(new_rs));
    }
    let up = (max_total - current).min(replicas - rs_replicas(new_rs));
    Ok(rs_replicas(new_rs) + up)
}

/// kube's `IsSaturated`: the new ReplicaSet has all replicas, was sized for them and has
/// them all available.
fn is_saturated(d: &Deployment, rs: &ReplicaSet) -> bool {
    let replicas = replicas_of(d);
    rs_replicas(rs) == replicas
        && annotation_i32(rs, DESIRED_REPLICAS) == Some(replicas)
        && rs_status(rs).2 == replicas
}

/// A ReplicaSet's share of `to_add` (kube's `GetProportion`), by its size against the
/// Deployment size it was last scaled for (`max-replicas`).
fn proportion(
    rs: &ReplicaSet,
    d: &Deployment,
    to_add: i32,
    added: i32,
    status_replicas: i32,
) -> i32 {
    if to_add == 0 {
        return 0;
    }
    let size = rs_replicas(rs);
    let fraction = if replicas_of(d) == 0 {
        -size
    } else {
        let deployment_replicas = replicas_of(d) + max_surge(d);
        let annotated = annotation_i32(rs, MAX_REPLICAS).unwrap_or(status_replicas);
        if annotated <= 0 {
            0
        } else {
            let new_size = (f64::from(size) * f64::from(deployment_replicas) / f64::from(annotated))
                .round() as i32;
            new_size - size
        }
    };
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

/// The status the ReplicaSets add up to (kube's `calculateStatus`), with `Available`.
fn calculate_status(
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    old: &[ReplicaSet],
    working: &mut Working,
) -> k8s_openapi::api::apps::v1::DeploymentStatus {
    let all: Vec<&ReplicaSet> = new_rs.into_iter().chain(old.iter()).collect();
    let available: i32 = all.iter().map(|rs| rs_status(rs).2).sum();
    let total: i32 = all.iter().map(|rs| rs_replicas(rs)).sum();
    let replicas = replicas_of(d);
    if available >= replicas - max_unavailable(d) {
        set_condition(
            &mut working.conditions,
            condition(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
            ),
        );
    } else {
        set_condition(
            &mut working.conditions,
            condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
            ),
        );
    }
    k8s_openapi::api::apps::v1::DeploymentStatus {
        observed_generation: Some(working.generation),
        replicas: Some(all.iter().map(|rs| rs_status(rs).0).sum()),
        updated_replicas: Some(new_rs.map(|rs| rs_status(rs).0).unwrap_or(0)),
        ready_replicas: Some(all.iter().map(|rs| rs_status(rs).1).sum()),
        available_replicas: Some(available),
        unavailable_replicas: Some((total - available).max(0)),
        collision_count: working.collision_count,
        conditions: Some(working.conditions.clone()),
        terminating_replicas: None,
    }
}

/// kube's `DeploymentComplete`: every replica updated and available, none old, this
/// generation observed.
fn deployment_complete(
    d: &Deployment,
    status: &k8s_openapi::api::apps::v1::DeploymentStatus,
    generation: i64,
) -> bool {
    let replicas = replicas_of(d);
    status.updated_replicas.unwrap_or(0) == replicas
        && status.replicas.unwrap_or(0) == replicas
        && status.available_replicas.unwrap_or(0) == replicas
        && status.observed_generation.unwrap_or(0) >= generation
}

/// kube's `DeploymentProgressing`: more updated, fewer old, more ready or more available
/// replicas than the status last written.
fn deployment_progressing(
    old: &k8s_openapi::api::apps::v1::DeploymentStatus,
    new: &k8s_openapi::api::apps::v1::DeploymentStatus,
) -> bool {
    let n = |v: Option<i32>| v.unwrap_or(0);
    let old_old = n(old.replicas) - n(old.updated_replicas);
    let new_old = n(new.replicas) - n(new.updated_replicas);
    n(new.updated_replicas) > n(old.updated_replicas)
        || new_old < old_old
        || n(new.ready_replicas) > n(old.ready_replicas)
        || n(new.available_replicas) > n(old.available_replicas)
}

/// kube's `DeploymentTimedOut`: `Progressing` not updated for progressDeadlineSeconds.
fn timed_out(d: &Deployment, current: Option<&DeploymentCondition>) -> bool {
    let Some(c) = current else {
        return false;
    };
    match c.reason.as_deref() {
        Some("NewReplicaSetAvailable") => return false,
        Some("ProgressDeadlineExceeded") => return true,
        Some(WAITING_FOR_DISCONNECTED_NODE) => return false,
        _ => {}
    }
    if !has_progress_deadline(d) {
        return false;
    }
    let seconds = progress_deadline(d);
    let Some(from) = c.last_update_time.as_ref() else {
        return false;
    };
    from.0.as_second() + i64::from(seconds) < Timestamp::now().as_second()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        DeploymentSpec, DeploymentStrategy, ReplicaSetStatus, RollingUpdateDeployment,
    };

    fn deployment(replicas: i32, surge: IntOrString, unavailable: IntOrString) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(surge),
                        max_unavailable: Some(unavailable),
                    }),
                }),
                ..DeploymentSpec::default()
            }),
            status: None,
        }
    }

    fn rs(replicas: i32, available: i32) -> ReplicaSet {
        ReplicaSet {
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                ..ReplicaSetSpec::default()
            }),
            status: Some(ReplicaSetStatus {
                replicas,
                available_replicas: Some(available),
                ..ReplicaSetStatus::default()
            }),
            ..ReplicaSet::default()
        }
    }

    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn percentages_round_as_kubernetes_does() {
        // Surge rounds up, unavailable down.
        assert_eq!(scaled_value(&pct("25%"), 10, true), Some(3));
        assert_eq!(scaled_value(&pct("25%"), 10, false), Some(2));
        assert_eq!(scaled_value(&pct("25%"), 1, true), Some(1));
        assert_eq!(scaled_value(&pct("25%"), 1, false), Some(0));
        assert_eq!(scaled_value(&IntOrString::Int(3), 10, false), Some(3));
        assert_eq!(scaled_value(&pct("abc"), 10, false), None);
        assert_eq!(scaled_value(&pct("25"), 10, false), None);
    }

    #[test]
    fn fenceposts_never_leave_a_rollout_stuck() {
        let d = deployment(1, pct("0%"), pct("25%"));
        assert_eq!(fenceposts(&d).expect("valid"), (0, 1));
        let d = deployment(4, IntOrString::Int(1), IntOrString::Int(0));
        assert_eq!(fenceposts(&d).expect("valid"), (1, 0));
        assert_eq!(max_unavailable(&d), 0);
        let d = deployment(2, IntOrString::Int(0), IntOrString::Int(5));
        assert_eq!(max_unavailable(&d), 2);
        let d = deployment(2, pct("x%"), IntOrString::Int(5));
        assert!(matches!(fenceposts(&d), Err(Error::Invalid { .. })));
    }

    #[test]
    fn the_new_replica_set_grows_within_max_surge() {
        let d = deployment(4, IntOrString::Int(1), IntOrString::Int(0));
        let old = rs(4, 4);
        let new = rs(0, 0);
        assert_eq!(
            new_rs_new_replicas(&d, &[old.clone(), new.clone()], &new).expect("ok"),
            1
        );
        let new = rs(1, 0);
        assert_eq!(
            new_rs_new_replicas(&d, &[old, new.clone()], &new).expect("ok"),
            1
        );
        let old = rs(3, 3);
        assert_eq!(
            new_rs_new_replicas(&d, &[old, new.clone()], &new).expect("ok"),
            2
        );
    }

    #[test]
    fn revisions_move_up_and_a_reused_replica_set_keeps_its_history() {
        let mut d = deployment(1, pct("25%"), pct("25%"));
        d.metadata.annotations = Some(BTreeMap::from([
            (
                "kubernetes.io/change-cause".to_string(),
                "set image".to_string(),
            ),
            (REVISION.to_string(), "2".to_string()),
        ]));
        let mut fresh = rs(0, 0);
        assert!(set_new_rs_annotations(&d, &mut fresh, "1", Exists::No));
        let a = fresh.annotations();
        assert_eq!(a.get(REVISION).map(String::as_str), Some("1"));
        assert_eq!(a.get(DESIRED_REPLICAS).map(String::as_str), Some("1"));
        assert_eq!(a.get(MAX_REPLICAS).map(String::as_str), Some("2"));
        assert_eq!(
            a.get("kubernetes.io/change-cause").map(String::as_str),
            Some("set image")
        );
        assert!(!a.contains_key(REVISION_HISTORY));

        // Rolled back to: revision 1 becomes 3, and 1 goes to the history.
        assert!(set_new_rs_annotations(&d, &mut fresh, "3", Exists::Yes));
        assert_eq!(
            fresh.annotations().get(REVISION).map(String::as_str),
            Some("3")
        );
        assert_eq!(
            fresh
                .annotations()
                .get(REVISION_HISTORY)
                .map(String::as_str),
            Some("1")
        );
        assert!(set_new_rs_annotations(&d, &mut fresh, "5", Exists::Yes));
        assert_eq!(
            fresh
                .annotations()
                .get(REVISION_HISTORY)
                .map(String::as_str),
            Some("1,3")
        );
        // The same revision again changes nothing.
        assert!(!set_new_rs_annotations(&d, &mut fresh, "5", Exists::Yes));
    }

    #[test]
    fn templates_compare_without_their_hash_label() {
        let mut a = PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..ObjectMeta::default()
            }),
            spec: None,
        };
        let plain = template_without_hash(Some(&a));
        if let Some(labels) = a.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
            labels.insert(POD_TEMPLATE_HASH.into(), "abc".into());
        }
        assert_eq!(template_without_hash(Some(&a)), plain);
        if let Some(meta) = a.metadata.as_mut() {
            meta.annotations = Some(BTreeMap::from([("x".to_string(), "y".to_string())]));
        }
        assert_ne!(template_without_hash(Some(&a)), plain);
    }

    #[test]
    fn proportional_scaling_follows_each_replica_sets_share() {
        // 10 replicas split 6 (old) / 4 (new) during a rollout, scaled to 20 (+ surge 0).
        let d = deployment(20, IntOrString::Int(0), IntOrString::Int(1));
        let mut old = rs(6, 6);
        old.metadata.annotations = Some(BTreeMap::from([(
            MAX_REPLICAS.to_string(),
            "10".to_string(),
        )]));
        let mut new = rs(4, 4);
        new.metadata.annotations = old.metadata.annotations.clone();
        let first = proportion(&old, &d, 10, 0, 10);
        let second = proportion(&new, &d, 10, first, 10);
        assert_eq!((first, second), (6, 4));
    }

    #[test]
    fn conditions_keep_their_transition_time_while_the_status_holds() {
        let mut conditions = Vec::new();
        let mut first = condition("Progressing", "True", "ReplicaSetUpdated", "a".into());
        first.last_transition_time = Some(Time(Timestamp::from_second(1).expect("ts")));
        set_condition(&mut conditions, first);
        set_condition(
            &mut conditions,
            condition("Progressing", "True", "NewReplicaSetAvailable", "b".into()),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            conditions[0].reason.as_deref(),
            Some("NewReplicaSetAvailable")
        );
        assert_eq!(
            conditions[0]
                .last_transition_time
                .as_ref()
                .map(|t| t.0.as_second()),
            Some(1)
        );
        // Same status and reason: unchanged (kube does not refresh the message either).
        set_condition(
            &mut conditions,
            condition("Progressing", "True", "NewReplicaSetAvailable", "c".into()),
        );
        assert_eq!(conditions[0].message.as_deref(), Some("b"));
    }
}
