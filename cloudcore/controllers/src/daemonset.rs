//! The DaemonSet controller: one pod of each DaemonSet on every node that should run it, as
//! kube-controller-manager's does.
//!
//! A node should run a DaemonSet's pod when it matches the template's `nodeSelector` and
//! required node affinity (and `nodeName`, if set), and the pod tolerates every `NoSchedule`
//! and `NoExecute` taint the node has, counting the tolerations this controller adds to every
//! DaemonSet pod ([`daemon_tolerations`]). A pod already there stays while only `NoSchedule`
//! taints are untolerated. Each pod is pinned to its node with required node affinity
//! `matchFields metadata.name In [node]`; the scheduler then binds it.
//!
//! Updates follow `spec.updateStrategy`: `RollingUpdate` (default `maxUnavailable: 1`,
//! `maxSurge: 0`) replaces old pods node by node, waiting for the new pod to be available
//! (`minReadySeconds`); `OnDelete` replaces a pod only once someone deletes it. Templates are
//! kept as ControllerRevisions ([`crate::history`]); pods carry the revision's hash in
//! `controller-revision-hash`.
//!
//! The autonomy rule ([`crate::pods`]): a pod on a disconnected node is never deleted or
//! replaced by this controller (not when it failed, not when the node stops matching, not by a
//! rolling update); it counts neither as available nor against `maxUnavailable`, and the rolling
//! update reaches it when the node is back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, Pod, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Context;
use crate::events::{EventType, Recorder};
use crate::history::{self, Owner, REVISION_HASH_LABEL};
use crate::informer::{
    Key, Listing, Queue, SharedInformer, Synced, all_keys, api_message, controller_key, key_of,
    observed, watch,
};
use crate::pods;

/// The name this controller reports its caches under.
const NAME: &str = "daemonset";
/// `source.component` of its Events.
const COMPONENT: &str = "daemonset-controller";
/// Every DaemonSet is looked at again this often, even without a change.
const RESYNC: Duration = Duration::from_secs(30);
/// A failed reconcile is retried after this long.
const RETRY: Duration = Duration::from_secs(2);
/// The label kube-controller-manager puts the DaemonSet's generation in.
const TEMPLATE_GENERATION_LABEL: &str = "pod-template-generation";

/// Why a DaemonSet could not be reconciled.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("history")]
    History(#[from] history::HistoryError),
    #[error("api request failed")]
    Api(#[from] kube::Error),
}

/// The DaemonSet controller, following Pods through the shared `pods` informer (its handler is
/// added here); the future runs it until `shutdown`.
pub(crate) fn run(
    ctx: Arc<Context>,
    pods: &mut SharedInformer<Pod>,
    nodes: &mut SharedInformer<Node>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let client = ctx.client.clone();
    let queue = Arc::new(Queue::default());
    let synced = Synced::new(ctx.clone(), NAME);
    let (sets, sets_driver) = watch(
        Api::<DaemonSet>::all(client.clone()),
        queue.clone(),
        &synced,
        |ds| vec![key_of(&ds.metadata)],
    );
    pods.add_keys(queue.clone(), &synced, |pod| {
        controller_key(&pod.metadata, "DaemonSet")
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
            controller_key(&r.metadata, "DaemonSet")
                .into_iter()
                .collect()
        },
    );
    let every_set = sets.clone();
    nodes.add_keys(queue.clone(), &synced, move |_| all_keys(&every_set));
    let nodes_listed = nodes.listing();
    let nodes = nodes.store();
    let controller = Controller {
        recorder: ctx.recorder.for_component(COMPONENT),
        client,
        sets,
        pods,
        pods_listed,
        nodes,
        nodes_listed,
        revisions,
    };
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = futures::future::join(sets_driver, revisions_driver) => {}
            _ = controller.work(&queue) => {}
        }
    }
}

struct Controller {
    client: kube::Client,
    recorder: Recorder,
    sets: Store<DaemonSet>,
    /// The shared pod cache; wait for it with `pods_listed`, never `wait_until_ready`.
    pods: Store<Pod>,
    pods_listed: Listing,
    /// The shared node cache; wait for it with `nodes_listed`.
    nodes: Store<Node>,
    nodes_listed: Listing,
    revisions: Store<ControllerRevision>,
}

/// The writes one pass decides: pods to create (by node) and pods to delete (and why).
#[derive(Debug, Default)]
struct Plan {
    create: Vec<String>,
    delete: Vec<(Arc<Pod>, &'static str)>,
}

impl Controller {
    async fn work(&self, queue: &Queue) {
        for ready in [
            self.sets.wait_until_ready().await.is_ok(),
            self.pods_listed.wait().await.is_ok(),
            self.nodes_listed.wait().await.is_ok(),
            self.revisions.wait_until_ready().await.is_ok(),
        ] {
            if !ready {
                return;
            }
        }
        loop {
            for key in queue.next().await {
                let span =
                    tracing::debug_span!("reconcile", namespace = %key.0, daemonset = %key.1);
                match self.reconcile(&key).instrument(span).await {
                    Ok(Some(after)) => queue.add_after(key, after),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(daemonset = %key.1, namespace = %key.0, error = %e, cause = ?std::error::Error::source(&e), "sync failed");
                        queue.add_after(key, RETRY);
                    }
                }
            }
        }
    }

    /// One pass over one DaemonSet; `Some(d)` asks for another pass after `d`.
    async fn reconcile(&self, key: &Key) -> Result<Option<Duration>, SyncError> {
        let Some(ds) = self.sets.get(&ObjectRef::new(&key.1).within(&key.0)) else {
            return Ok(None);
        };
        if ds.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let Some(spec) = ds.spec.as_ref() else {
            return Ok(None);
        };
        let status = ds.status.clone().unwrap_or_default();
        let revisions = history::sync(
            &self.client,
            &self.revisions,
            Owner {
                kind: "DaemonSet",
                meta: &ds.metadata,
                hash_label: REVISION_HASH_LABEL,
            },
            &spec.template,
            ds.metadata.annotations.clone(),
            status.collision_count,
        )
        .await?;
        let hash = revisions.hash();
        let now = Timestamp::now();
        let uid = ds.metadata.uid.clone().unwrap_or_default();

        // The set's pods by the node each targets.
        let mut by_node: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
        for pod in self.pods.state_filter(|p| {
            p.metadata.namespace == ds.metadata.namespace
                && pods::controller_of(&p.metadata).is_some_and(|o| o.uid == uid)
        }) {
            by_node
                .entry(target_node(&pod).unwrap_or_default())
                .or_default()
                .push(pod);
        }
        for pods in by_node.values_mut() {
            pods.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        }

        let mut nodes = self.nodes.state();
        nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let Decision {
            plan,
            counts,
            wait_ready,
        } = decide(spec, &nodes, by_node, &hash, now);
        let wrote = !plan.create.is_empty() || !plan.delete.is_empty();
        self.carry_out(&ds, plan, &hash).await?;

        let live: BTreeSet<String> = self
            .pods
            .state_filter(|p| pods::controller_of(&p.metadata).is_some_and(|o| o.uid == uid))
            .iter()
            .filter_map(|p| {
                p.metadata
                    .labels
                    .as_ref()?
                    .get(REVISION_HASH_LABEL)
                    .cloned()
            })
            .collect();
        history::truncate(
            &self.client,
            &self.revisions,
            &revisions,
            spec.revision_history_limit,
            |r| live.contains(&history::hash_of(r, REVISION_HASH_LABEL)),
        )
        .await?;

        self.write_status(&ds, &counts, revisions.collision_count)
            .await?;
        Ok(if wrote {
            Some(Duration::ZERO)
        } else {
            Some(wait_ready.unwrap_or(RESYNC))
        })
    }

    async fn carry_out(&self, ds: &DaemonSet, plan: Plan, hash: &str) -> Result<(), SyncError> {
        let namespace = ds.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let reference = reference(ds);
        for (pod, why) in plan.delete {
            let name = pod.metadata.name.clone().unwrap_or_default();
            if why == "failed" {
                let message = format!(
                    "Found failed daemon pod {namespace}/{name} on node {}, will try to kill it",
                    target_node(&pod).unwrap_or_default()
                );
                self.recorder
                    .publish(&reference, EventType::Warning, "FailedDaemonPod", &message)
                    .await;
            }
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(pod = %name, why, "deleted daemon pod");
                    self.recorder
                        .publish(
                            &reference,
                            EventType::Normal,
                            "SuccessfulDelete",
                            &format!("Deleted pod: {name}"),
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
                            &format!("Error deleting: {}", api_message(&e)),
                        )
                        .await;
                    return Err(e.into());
                }
            }
        }
        for node in plan.create {
            let pod = daemon_pod(ds, &node, hash);
            match api.create(&PostParams::default(), &pod).await {
                Ok(created) => {
                    let name = created.metadata.name.clone().unwrap_or_default();
                    tracing::info!(pod = %name, node = %node, "created daemon pod");
                    self.recorder
                        .publish(
                            &reference,
                            EventType::Normal,
                            "SuccessfulCreate",
                            &format!("Created pod: {name}"),
                        )
                        .await;
                    let key = ObjectRef::new(&name).within(&namespace);
                    observed(|| self.pods.get(&key).is_some()).await;
                }
                Err(e) => {
                    self.recorder
                        .publish(
                            &reference,
                            EventType::Warning,
                            "FailedCreate",
                            &format!("Error creating: {}", api_message(&e)),
                        )
                        .await;
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    async fn write_status(
        &self,
        ds: &DaemonSet,
        counts: &Counts,
        collision_count: Option<i32>,
    ) -> Result<(), kube::Error> {
        let status = json!({
            "currentNumberScheduled": counts.current,
            "desiredNumberScheduled": counts.desired,
            "numberMisscheduled": counts.misscheduled,
            "numberReady": counts.ready,
            "numberAvailable": counts.available,
            "numberUnavailable": counts.desired.saturating_sub(counts.available),
            "updatedNumberScheduled": counts.updated,
            "observedGeneration": ds.metadata.generation,
            "collisionCount": collision_count,
        });
        let old = serde_json::to_value(ds.status.clone().unwrap_or_default()).unwrap_or_default();
        let unchanged = status.as_object().into_iter().flatten().all(|(k, v)| {
            old.get(k).unwrap_or(&json!(null)) == v || (v == &json!(0) && old.get(k).is_none())
        });
        if unchanged {
            return Ok(());
        }
        let api: Api<DaemonSet> = Api::namespaced(
            self.client.clone(),
            ds.metadata.namespace.as_deref().unwrap_or_default(),
        );
        api.patch_status(
            ds.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
        Ok(())
    }
}

/// What one pass decides from the caches, without IO.
#[derive(Debug)]
struct Decision {
    plan: Plan,
    counts: Counts,
    /// When a Ready pod becomes available (`minReadySeconds`), if one is waiting.
    wait_ready: Option<Duration>,
}

/// The pass over every node (kube-controller-manager's `manage`, then its rolling update when
/// nothing else is to be done), the autonomy rule applied: pods of disconnected nodes are
/// neither deleted nor replaced.
fn decide(
    spec: &DaemonSetSpec,
    nodes: &[Arc<Node>],
    mut by_node: BTreeMap<String, Vec<Arc<Pod>>>,
    hash: &str,
    now: Timestamp,
) -> Decision {
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let mut plan = Plan::default();
    let mut counts = Counts::default();
    // The pods of nodes that should run one (disconnected nodes apart), for the update.
    let mut updating: Vec<(String, Vec<Arc<Pod>>)> = Vec::new();
    let mut wait_ready: Option<Duration> = None;
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let fit = fit(spec, node);
        let disconnected = pods::node_disconnected(node);
        let mut running: Vec<Arc<Pod>> = Vec::new();
        for pod in by_node.remove(&name).unwrap_or_default() {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let finished = !pods::is_active(&pod);
            if finished && !disconnected {
                let why = if fit.should_run {
                    "failed"
                } else {
                    "misscheduled"
                };
                plan.delete.push((pod, why));
            } else {
                running.push(pod);
            }
        }
        counts.add(fit, &running, hash, min_ready, now);
        if let Some(first) = running.first()
            && pods::is_ready(first)
            && !pods::is_available(first, min_ready, now)
        {
            wait_ready = Some(Duration::from_secs(
                u64::try_from(min_ready).unwrap_or(0) + 1,
            ));
        }
        if disconnected {
            continue;
        }
        if fit.should_run {
            if running.is_empty() {
                plan.create.push(name.clone());
            } else if running.len() > 1 {
                plan.delete
                    .extend(surplus(spec, &running, hash, min_ready, now));
            }
            updating.push((name, running));
        } else if !fit.should_continue {
            plan.delete
                .extend(running.into_iter().map(|p| (p, "misscheduled")));
        }
    }
    // Pods of nodes that are gone.
    for pods in by_node.into_values() {
        plan.delete.extend(
            pods.into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| (p, "node gone")),
        );
    }

    if plan.create.is_empty() && plan.delete.is_empty() && !is_on_delete(spec) {
        plan = rolling_update(spec, &updating, counts.desired, hash, min_ready, now);
    }
    Decision {
        plan,
        counts,
        wait_ready,
    }
}

/// The status numbers of one pass.
#[derive(Debug, Default)]
struct Counts {
    desired: i32,
    current: i32,
    misscheduled: i32,
    ready: i32,
    available: i32,
    updated: i32,
}

impl Counts {
    fn add(&mut self, fit: Fit, running: &[Arc<Pod>], hash: &str, min_ready: i32, now: Timestamp) {
        if fit.should_run {
            self.desired += 1;
            if let Some(pod) = running.first() {
                self.current += 1;
                self.ready += i32::from(pods::is_ready(pod));
                self.available += i32::from(pods::is_available(pod, min_ready, now));
                self.updated += i32::from(revision_hash(pod) == Some(hash));
            }
        } else if !running.is_empty() {
            self.misscheduled += 1;
        }
    }
}

/// Whether a node should run the set's pod, and whether a pod already there may stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fit {
    should_run: bool,
    should_continue: bool,
}

/// kube-controller-manager's `NodeShouldRunDaemonPod`.
fn fit(spec: &DaemonSetSpec, node: &Node) -> Fit {
    let none = Fit {
        should_run: false,
        should_continue: false,
    };
    let pod_spec = spec.template.spec.clone().unwrap_or_default();
    let node_name = node.metadata.name.as_deref().unwrap_or_default();
    if pod_spec
        .node_name
        .as_deref()
        .is_some_and(|n| !n.is_empty() && n != node_name)
    {
        return none;
    }
    if !selects(&pod_spec, node) {
        return none;
    }
    let mut tolerations = pod_spec.tolerations.clone().unwrap_or_default();
    add_daemon_tolerations(&mut tolerations, pod_spec.host_network == Some(true));
    let mut fit = Fit {
        should_run: true,
        should_continue: true,
    };
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
    for taint in taints.into_iter().flatten() {
        if tolerations.iter().any(|t| tolerates(t, taint)) {
            continue;
        }
        match taint.effect.as_str() {
            "NoExecute" => return none,
            "NoSchedule" => fit.should_run = false,
            _ => {}
        }
    }
    fit
}

/// The template's `nodeSelector` and required node affinity against the node.
fn selects(spec: &k8s_openapi::api::core::v1::PodSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|s| &s.node_selector_terms);
    let Some(terms) = terms else {
        return true;
    };
    let name = node.metadata.name.clone();
    // Terms are ORed, requirements within a term ANDed; an empty term matches nothing.
    terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!exprs.is_empty() || !fields.is_empty())
            && exprs.iter().all(|e| requirement(e, labels.get(&e.key)))
            && fields
                .iter()
                .all(|e| e.key == "metadata.name" && requirement(e, name.as_ref()))
    })
}

fn requirement(r: &NodeSelectorRequirement, value: Option<&String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &String| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(number), values.first().and_then(number)), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(number), values.first().and_then(number)), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or_default();
    let exists = toleration.operator.as_deref() == Some("Exists");
    if key.is_empty() {
        // An empty key with Exists matches every taint.
        return exists && effect_ok;
    }
    let value_ok = exists
        || toleration.value.as_deref().unwrap_or_default()
            == taint.value.as_deref().unwrap_or_default();
    effect_ok && key == taint.key && value_ok
}

/// The tolerations kube-controller-manager gives every DaemonSet pod: `not-ready` and
/// `unreachable` `NoExecute` without `tolerationSeconds` (a daemon pod stays on a node that
/// stops reporting), the pressure conditions and `unschedulable` `NoSchedule`, and
/// `network-unavailable` for host-network pods.
pub fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let mut keys = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        (pods::UNREACHABLE_TAINT, "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        keys.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    keys.into_iter()
        .map(|(key, effect)| Toleration {
            key: Some(key.to_string()),
            operator: Some("Exists".to_string()),
            effect: Some(effect.to_string()),
            ..Toleration::default()
        })
        .collect()
}

/// Adds [`daemon_tolerations`] to `tolerations`, replacing any with the same key and effect.
fn add_daemon_tolerations(tolerations: &mut Vec<Toleration>, host_network: bool) {
    for toleration in daemon_tolerations(host_network) {
        tolerations.retain(|t| t.key != toleration.key || t.effect != toleration.effect);
        tolerations.push(toleration);
    }
}

/// The node a daemon pod is for: its `spec.nodeName`, or before binding the node its
/// affinity pins it to.
fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(name) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(name.clone());
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms.iter().find_map(|term| {
        term.match_fields.as_ref()?.iter().find_map(|f| {
            let values = f.values.as_deref()?;
            (f.key == "metadata.name" && f.operator == "In" && values.len() == 1)
                .then(|| values[0].clone())
        })
    })
}

/// The DaemonSet's pod for `node`: the template with the revision hash and generation labels,
/// the daemon tolerations, and required node affinity to that node alone.
fn daemon_pod(ds: &DaemonSet, node: &str, hash: &str) -> Pod {
    let spec = ds.spec.clone().unwrap_or_default();
    let name = ds.metadata.name.clone().unwrap_or_default();
    let mut pod = pods::pod_from_template(
        &spec.template,
        ds.metadata.namespace.as_deref().unwrap_or_default(),
        pods::owner_reference("apps/v1", "DaemonSet", &ds.metadata),
        None,
        Some(format!("{name}-")),
    );
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(REVISION_HASH_LABEL.to_string(), hash.to_string());
    if let Some(generation) = ds.metadata.generation {
        labels.insert(
            TEMPLATE_GENERATION_LABEL.to_string(),
            generation.to_string(),
        );
    }
    let pod_spec = pod.spec.get_or_insert_with(Default::default);
    let host_network = pod_spec.host_network == Some(true);
    add_daemon_tolerations(
        pod_spec.tolerations.get_or_insert_with(Vec::new),
        host_network,
    );
    let pinned = NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".to_string(),
                operator: "In".to_string(),
                values: Some(vec![node.to_string()]),
            }]),
            match_expressions: None,
        }],
    };
    let affinity = pod_spec.affinity.get_or_insert_with(Affinity::default);
    affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .required_during_scheduling_ignored_during_execution = Some(pinned);
    pod
}

fn revision_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(REVISION_HASH_LABEL)
        .map(String::as_str)
}

fn is_on_delete(spec: &DaemonSetSpec) -> bool {
    spec.update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        == Some("OnDelete")
}

/// `maxSurge` and `maxUnavailable` as numbers of nodes out of `desired` (percentages round up);
/// both zero means one unavailable, as kube-controller-manager treats it.
fn budgets(spec: &DaemonSetSpec, desired: i32) -> (i32, i32) {
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let scaled = |value: Option<&IntOrString>, default: i32| match value {
        None => default,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => {
            let percent: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            i32::try_from((percent * i64::from(desired) + 99) / 100).unwrap_or(i32::MAX)
        }
    };
    let surge = scaled(rolling.and_then(|r| r.max_surge.as_ref()), 0);
    let unavailable = scaled(rolling.and_then(|r| r.max_unavailable.as_ref()), 1);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

/// Of several pods on one node, those to delete: all but the oldest, or with surge all but the
/// oldest new and oldest old pod, the old one too once the new one is available.
fn surplus(
    spec: &DaemonSetSpec,
    running: &[Arc<Pod>],
    hash: &str,
    min_ready: i32,
    now: Timestamp,
) -> Vec<(Arc<Pod>, &'static str)> {
    let (surge, _) = budgets(spec, 1);
    if surge == 0 || is_on_delete(spec) {
        return running[1..]
            .iter()
            .map(|p| (p.clone(), "duplicate"))
            .collect();
    }
    let mut doomed = Vec::new();
    let (mut newest, mut oldest): (Option<&Arc<Pod>>, Option<&Arc<Pod>>) = (None, None);
    for pod in running {
        let slot = if revision_hash(pod) == Some(hash) {
            &mut newest
        } else {
            &mut oldest
        };
        if slot.is_none() {
            *slot = Some(pod);
        } else {
            doomed.push((pod.clone(), "duplicate"));
        }
    }
    if let (Some(new), Some(old)) = (newest, oldest)
        && (!pods::is_ready(old) || pods::is_available(new, min_ready, now))
    {
        doomed.push((old.clone(), "replaced"));
    }
    doomed
}

/// kube-controller-manager's rolling update for one pass over the nodes that should run a pod
/// (disconnected ones left out): which old pods to delete and, with `maxSurge`, which nodes get
/// their new pod next to the old one.
fn rolling_update(
    spec: &DaemonSetSpec,
    nodes: &[(String, Vec<Arc<Pod>>)],
    desired: i32,
    hash: &str,
    min_ready: i32,
    now: Timestamp,
) -> Plan {
    let (max_surge, max_unavailable) = budgets(spec, desired);
    let available = |p: &Arc<Pod>| pods::is_available(p, min_ready, now);
    let mut plan = Plan::default();
    if max_surge == 0 {
        let mut unavailable = 0;
        let mut replace_now = Vec::new();
        let mut candidates = Vec::new();
        for (_, running) in nodes {
            let (new, old) = split(running, hash);
            match (new, old) {
                (Some(new), None) => unavailable += i32::from(!available(new)),
                (None, Some(old)) if !available(old) => replace_now.push(old.clone()),
                (None, Some(_)) if unavailable >= max_unavailable => {}
                (None, Some(old)) => candidates.push(old.clone()),
                _ => unavailable += 1,
            }
        }
        let room = usize::try_from(max_unavailable - unavailable).unwrap_or(0);
        plan.delete = replace_now
            .into_iter()
            .chain(candidates.into_iter().take(room))
            .map(|p| (p, "rolling update"))
            .collect();
        return plan;
    }
    let mut surging = 0;
    let mut allowed = Vec::new();
    let mut candidates = Vec::new();
    for (node, running) in nodes {
        if running.len() > 2 {
            surging += 1;
            continue;
        }
        let (new, old) = split(running, hash);
        match (new, old) {
            (_, None) => {}
            (None, Some(old)) if !available(old) => allowed.push(node.clone()),
            (None, Some(_)) if surging >= max_surge => {}
            (None, Some(_)) => {
                surging += 1;
                candidates.push(node.clone());
            }
            (Some(new), Some(_)) if !available(new) => surging += 1,
            (Some(_), Some(old)) => plan.delete.push((old.clone(), "rolling update")),
        }
    }
    plan.create = allowed.into_iter().chain(candidates).collect();
    plan
}

/// The new-revision and old-revision pod of one node's running pods (at most one of each).
fn split<'a>(running: &'a [Arc<Pod>], hash: &str) -> (Option<&'a Arc<Pod>>, Option<&'a Arc<Pod>>) {
    let new = running.iter().find(|p| revision_hash(p) == Some(hash));
    let old = running.iter().find(|p| revision_hash(p) != Some(hash));
    (new, old)
}

fn reference(ds: &DaemonSet) -> ObjectReference {
    ObjectReference {
        api_version: Some("apps/v1".to_string()),
        kind: Some("DaemonSet".to_string()),
        name: ds.metadata.name.clone(),
        namespace: ds.metadata.namespace.clone(),
        uid: ds.metadata.uid.clone(),
        resource_version: ds.metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use serde_json::Value;

    fn node(name: &str, labels: Value, taints: Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints},
        }))
        .expect("node")
    }

    fn spec(pod_spec: Value) -> DaemonSetSpec {
        DaemonSetSpec {
            template: serde_json::from_value::<PodTemplateSpec>(json!({"spec": pod_spec}))
                .expect("template"),
            ..DaemonSetSpec::default()
        }
    }

    fn pod(name: &str, hash: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {REVISION_HASH_LABEL: hash}},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            }))
            .expect("pod"),
        )
    }

    #[test]
    fn nodes_fit_by_selector_affinity_and_taints() {
        let run = Fit {
            should_run: true,
            should_continue: true,
        };
        let selected = spec(json!({"nodeSelector": {"role": "gateway"}, "containers": []}));
        assert_eq!(
            fit(&selected, &node("a", json!({"role": "gateway"}), json!([]))),
            run
        );
        assert!(!fit(&selected, &node("b", json!({"role": "other"}), json!([]))).should_continue);
        let affinity = spec(
            json!({"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["x"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["c"]}]},
            ]}}}}),
        );
        assert!(fit(&affinity, &node("a", json!({"zone": "x"}), json!([]))).should_run);
        assert!(fit(&affinity, &node("c", json!({}), json!([]))).should_run);
        assert!(!fit(&affinity, &node("d", json!({"zone": "y"}), json!([]))).should_run);

        let plain = spec(json!({"containers": []}));
        let no_schedule = json!([{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]);
        let tainted = fit(&plain, &node("a", json!({}), no_schedule));
        assert_eq!(
            (tainted.should_run, tainted.should_continue),
            (false, true),
            "a NoSchedule taint keeps the pod already there"
        );
        let no_execute = json!([{"key": "dedicated", "value": "x", "effect": "NoExecute"}]);
        assert!(!fit(&plain, &node("a", json!({}), no_execute.clone())).should_continue);
        let tolerant = spec(
            json!({"containers": [], "tolerations": [{"key": "dedicated", "operator": "Exists"}]}),
        );
        assert_eq!(fit(&tolerant, &node("a", json!({}), no_execute)), run);
        // The daemon tolerations: unreachable, not-ready and unschedulable are tolerated.
        let stock = json!([
            {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
            {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
        ]);
        assert_eq!(fit(&plain, &node("a", json!({}), stock)), run);
    }

    #[test]
    fn daemon_pods_are_pinned_and_tolerant() {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "agent", "namespace": "default", "uid": "u1", "generation": 3},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "a", "image": "busybox"}],
                         "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}],
                         "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Exists"}]}]}}}}}}
        }))
        .expect("ds");
        let pod = daemon_pod(&ds, "edge-2", "h1");
        let value = serde_json::to_value(&pod).expect("json");
        assert_eq!(value["metadata"]["generateName"], "agent-");
        assert_eq!(value["metadata"]["labels"][REVISION_HASH_LABEL], "h1");
        assert_eq!(value["metadata"]["labels"][TEMPLATE_GENERATION_LABEL], "3");
        assert_eq!(value["metadata"]["ownerReferences"][0]["kind"], "DaemonSet");
        assert_eq!(
            value["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"],
            json!({"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["edge-2"]}]}]})
        );
        let tolerations = value["spec"]["tolerations"]
            .as_array()
            .expect("tolerations");
        assert_eq!(tolerations.len(), 6, "{tolerations:?}");
        let unreachable: Vec<&Value> = tolerations
            .iter()
            .filter(|t| t["key"] == "node.kubernetes.io/unreachable")
            .collect();
        assert_eq!(
            unreachable,
            vec![
                &json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"})
            ],
            "the daemon toleration replaces the template's, without tolerationSeconds"
        );
        assert_eq!(target_node(&pod).as_deref(), Some("edge-2"));
    }

    #[test]
    fn rolling_update_replaces_within_max_unavailable() {
        let plain = spec(json!({"containers": []}));
        let now = Timestamp::now();
        let nodes = vec![
            ("a".to_string(), vec![pod("a1", "old", true)]),
            ("b".to_string(), vec![pod("b1", "old", true)]),
            ("c".to_string(), vec![pod("c1", "old", true)]),
        ];
        let plan = rolling_update(&plain, &nodes, 3, "new", 0, now);
        let names = |plan: &Plan| -> Vec<String> {
            plan.delete
                .iter()
                .map(|(p, _)| p.metadata.name.clone().unwrap_or_default())
                .collect()
        };
        assert_eq!(names(&plan), vec!["a1"]);
        assert!(plan.create.is_empty());
        // A new pod not yet ready uses the budget: nothing more is deleted.
        let nodes = vec![
            ("a".to_string(), vec![pod("a2", "new", false)]),
            ("b".to_string(), vec![pod("b1", "old", true)]),
        ];
        assert!(
            rolling_update(&plain, &nodes, 2, "new", 0, now)
                .delete
                .is_empty()
        );
        // An old pod that is not available is replaced at once, besides the budget.
        let nodes = vec![
            ("a".to_string(), vec![pod("a1", "old", false)]),
            ("b".to_string(), vec![pod("b1", "old", true)]),
        ];
        assert_eq!(
            names(&rolling_update(&plain, &nodes, 2, "new", 0, now)),
            vec!["a1", "b1"]
        );
        // A node without a pod counts as unavailable.
        let nodes = vec![
            ("a".to_string(), vec![]),
            ("b".to_string(), vec![pod("b1", "old", true)]),
        ];
        assert!(
            rolling_update(&plain, &nodes, 2, "new", 0, now)
                .delete
                .is_empty()
        );

        let mut surge = plain.clone();
        surge.update_strategy = serde_json::from_value(
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        )
        .expect("strategy");
        let nodes = vec![
            ("a".to_string(), vec![pod("a1", "old", true)]),
            ("b".to_string(), vec![pod("b1", "old", true)]),
        ];
        let plan = rolling_update(&surge, &nodes, 2, "new", 0, now);
        assert_eq!(plan.create, vec!["a"]);
        assert!(plan.delete.is_empty());
        let nodes = vec![
            (
                "a".to_string(),
                vec![pod("a1", "old", true), pod("a2", "new", true)],
            ),
            ("b".to_string(), vec![pod("b1", "old", true)]),
        ];
        let plan = rolling_update(&surge, &nodes, 2, "new", 0, now);
        assert_eq!(names(&plan), vec!["a1"]);
        assert_eq!(plan.create, vec!["b"]);
    }

    fn on(mut pod: Arc<Pod>, node: &str, phase: &str) -> Arc<Pod> {
        let p = Arc::make_mut(&mut pod);
        p.spec.get_or_insert_with(Default::default).node_name = Some(node.to_string());
        if let Some(status) = p.status.as_mut() {
            status.phase = Some(phase.to_string());
        }
        pod
    }

    fn names(plan: &Plan) -> Vec<(String, &'static str)> {
        plan.delete
            .iter()
            .map(|(p, why)| (p.metadata.name.clone().unwrap_or_default(), *why))
            .collect()
    }

    #[test]
    fn pods_of_disconnected_nodes_are_left_alone() {
        let selected = spec(json!({"nodeSelector": {"role": "gw"}, "containers": []}));
        let connected = |name: &str, labels: Value| Arc::new(node(name, labels, json!([])));
        let mut offline = node("b", json!({}), json!([]));
        offline.status =
            serde_json::from_value(json!({"conditions": [{"type": "Ready", "status": "Unknown"}]}))
                .expect("status");
        let offline = Arc::new(offline);
        let nodes = vec![connected("a", json!({"role": "gw"})), offline.clone()];
        let now = Timestamp::now();

        // b stopped matching and its pod failed, but b is disconnected: nothing happens to it.
        let by_node: BTreeMap<String, Vec<Arc<Pod>>> = [
            (
                "a".to_string(),
                vec![on(pod("a1", "h", true), "a", "Running")],
            ),
            (
                "b".to_string(),
                vec![on(pod("b1", "h", false), "b", "Failed")],
            ),
        ]
        .into();
        let decision = decide(&selected, &nodes, by_node.clone(), "h", now);
        assert!(
            decision.plan.delete.is_empty(),
            "{:?}",
            names(&decision.plan)
        );
        assert!(decision.plan.create.is_empty());
        assert_eq!(
            (decision.counts.desired, decision.counts.misscheduled),
            (1, 1)
        );

        // Connected, the same node loses its misscheduled pod.
        let nodes = vec![
            connected("a", json!({"role": "gw"})),
            connected("b", json!({})),
        ];
        let decision = decide(&selected, &nodes, by_node, "h", now);
        assert_eq!(
            names(&decision.plan),
            vec![("b1".to_string(), "misscheduled")]
        );

        // A rolling update replaces a's pod and waits for b's; a pod of a node that is gone
        // is deleted.
        let matching = Arc::new({
            let mut n = (*offline).clone();
            n.metadata.labels = Some([("role".to_string(), "gw".to_string())].into());
            n
        });
        let nodes = vec![connected("a", json!({"role": "gw"})), matching];
        let by_node: BTreeMap<String, Vec<Arc<Pod>>> = [
            (
                "a".to_string(),
                vec![on(pod("a1", "old", true), "a", "Running")],
            ),
            (
                "b".to_string(),
                vec![on(pod("b1", "old", true), "b", "Running")],
            ),
        ]
        .into();
        let decision = decide(&selected, &nodes, by_node.clone(), "new", now);
        assert_eq!(
            names(&decision.plan),
            vec![("a1".to_string(), "rolling update")]
        );
        let mut gone = by_node;
        gone.insert(
            "z".to_string(),
            vec![on(pod("z1", "old", true), "z", "Running")],
        );
        let decision = decide(&selected, &nodes, gone, "new", now);
        assert_eq!(names(&decision.plan), vec![("z1".to_string(), "node gone")]);
    }

    #[test]
    fn budgets_scale_percentages_up() {
        let mut s = spec(json!({"containers": []}));
        assert_eq!(budgets(&s, 10), (0, 1));
        s.update_strategy =
            serde_json::from_value(json!({"rollingUpdate": {"maxUnavailable": "25%"}}))
                .expect("strategy");
        assert_eq!(budgets(&s, 10), (0, 3));
        s.update_strategy =
            serde_json::from_value(json!({"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 0}}))
                .expect("strategy");
        assert_eq!(budgets(&s, 10), (0, 1));
    }
}
