//! The ReplicaSet controller, in kube-controller-manager's shape: reflectors for ReplicaSets,
//! Pods and Nodes feed a work queue of ReplicaSet keys; each reconcile claims the namespace's
//! pods (adopting orphans the selector matches, releasing its pods it no longer matches),
//! creates or deletes pods until `spec.replicas` are active, and writes the status.
//!
//! Creation goes in slow-start batches (1, 2, 4, ...; a failure stops the rest), at most
//! [`BURST`] per reconcile. Scale-down deletes the pods kube-controller-manager would rank
//! first ([`deletion_order`]) but never one on a disconnected node: the autonomy rule
//! ([`crate::pods`]) keeps it counted and in place. Until the pods it created or deleted are
//! seen by the pod reflector (its *expectations*), a ReplicaSet is not managed again, so a
//! stale cache never doubles a batch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::events::{EventType, Recorder};
use crate::informer::SharedInformer;
use crate::pods;
use crate::workqueue::{Change, DisconnectedNodes, Key, Listed, Queue, on_event, reflect};

/// At most this many pods are created or deleted in one reconcile (kube-controller-manager's
/// `burstReplicas`).
pub const BURST: usize = 500;

/// How long a ReplicaSet waits for its pod creations and deletions to be observed before it
/// is managed again regardless (a lost watch event must not stall it for good).
const EXPECTATIONS_TIMEOUT: Duration = Duration::from_secs(60);

/// How soon a ReplicaSet waiting for its pod changes to be observed looks again.
const EXPECTATIONS_RECHECK: Duration = Duration::from_secs(1);

/// The annotation whose lower value makes a pod go first on scale-down.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Why a reconcile failed; the key is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {step} {kind} {name}")]
    Api {
        step: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The ReplicaSet controller, following Pods through the shared `pods` informer (its handler
/// is added here); the future runs it until `shutdown`.
pub(crate) fn run(
    ctx: Arc<Context>,
    pods: &mut SharedInformer<Pod>,
    nodes: &mut SharedInformer<Node>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let client = ctx.client.clone();
    let (rs_store, rs_writer) = reflector::store::<ReplicaSet>();
    let controller = Arc::new(Controller {
        recorder: ctx.recorder.for_component("replicaset-controller"),
        client: client.clone(),
        replicasets: rs_store,
        pods: pods.store(),
        nodes: nodes.store(),
        queue: Queue::default(),
        expectations: Expectations::default(),
    });
    let listed = Listed::new(ctx, "replicaset", 3);
    // The shared pod cache is this controller's reflector 1.
    let pod_events = controller.clone();
    pods.add_handler(on_event(listed.clone(), 1, move |pod: &Pod, change| {
        pod_events.pod_changed(pod, change)
    }));
    let pods_listed = pods.listing();
    // The shared node cache is reflector 2.
    let node_events = controller.clone();
    let disconnected = DisconnectedNodes::default();
    nodes.add_handler(on_event(listed.clone(), 2, move |node: &Node, change| {
        if disconnected.flipped(node, change) {
            node_events.node_changed(&node.name_any());
        }
    }));
    let nodes_listed = nodes.listing();
    async move {
        let watch_replicasets = reflect(
            Api::<ReplicaSet>::all(client.clone()),
            rs_writer,
            &listed,
            0,
            |rs, change| {
                let key = Key::new(&rs.namespace().unwrap_or_default(), &rs.name_any());
                if change == Change::Deleted {
                    controller.expectations.forget(&key);
                }
                controller.queue.add(key);
            },
        );
        let work = async {
            let ready = futures::future::join3(
                controller.replicasets.wait_until_ready(),
                pods_listed.wait(),
                nodes_listed.wait(),
            );
            let _ = ready.await;
            while let Some(key) = controller.queue.next(&shutdown).await {
                match controller.reconcile(&key).await {
                    Ok(()) => controller.queue.forget(&key),
                    Err(e) => {
                        tracing::warn!(replicaset = %key, error = %e, "reconcile failed, retrying");
                        controller.queue.retry(key);
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = watch_replicasets => {}
            _ = work => {}
        }
    }
}

/// What one ReplicaSet waits to see in the pod cache before it is managed again.
#[derive(Debug)]
struct Expectation {
    /// Names of pods it created.
    creates: HashSet<String>,
    /// Uids of pods it deleted.
    deletes: HashSet<String>,
    since: Instant,
}

/// Each ReplicaSet's [`Expectation`]; locked by the pod reflector (observing) and the worker.
#[derive(Debug, Default)]
struct Expectations(Mutex<HashMap<Key, Expectation>>);

impl Expectations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Expectation>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expect(&self, key: &Key, creates: HashSet<String>, deletes: HashSet<String>) {
        if creates.is_empty() && deletes.is_empty() {
            return;
        }
        self.lock().insert(
            key.clone(),
            Expectation {
                creates,
                deletes,
                since: Instant::now(),
            },
        );
    }

    /// Whether `key` has seen what it did (or waited long enough). The pod store is asked
    /// too: a pod's event may have come before the expectation was recorded (creations are
    /// recorded once the whole slow-start round is done).
    fn satisfied(&self, key: &Key, pods: &Store<Pod>) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(key) else {
            return true;
        };
        e.creates.retain(|name| {
            pods.get(&ObjectRef::new(name).within(&key.namespace))
                .is_none()
        });
        e.deletes.retain(|uid| {
            pods.find(|p| {
                p.metadata.uid.as_ref() == Some(uid) && p.metadata.deletion_timestamp.is_none()
            })
            .is_some()
        });
        if e.creates.is_empty() && e.deletes.is_empty() {
            map.remove(key);
            return true;
        }
        if e.since.elapsed() > EXPECTATIONS_TIMEOUT {
            tracing::info!(replicaset = %key, "pod changes not observed in time, managing again");
            map.remove(key);
            return true;
        }
        false
    }

    fn observe(&self, key: &Key, pod: &Pod, change: Change) {
        let mut map = self.lock();
        if let Some(e) = map.get_mut(key) {
            e.creates.remove(&pod.name_any());
            let gone = change == Change::Deleted || pod.metadata.deletion_timestamp.is_some();
            if gone && let Some(uid) = &pod.metadata.uid {
                e.deletes.remove(uid);
            }
        }
    }

    fn forget(&self, key: &Key) {
        self.lock().remove(key);
    }
}

struct Controller {
    client: kube::Client,
    recorder: Recorder,
    replicasets: Store<ReplicaSet>,
    /// The shared pod cache (wait for its listing on the informer's `Listing`).
    pods: Store<Pod>,
    nodes: Store<Node>,
    queue: Queue,
    expectations: Expectations,
}

/// The label selector of a ReplicaSet; `None` if it cannot be parsed (validation refuses such
/// objects, so this is a cache of something the API would not store).
fn selector_of(rs: &ReplicaSet) -> Option<Selector> {
    let selector = rs.spec.as_ref()?.selector.clone();
    Selector::try_from(selector).ok()
}

/// Whether `selector` selects an object with these labels; an empty selector selects nothing
/// (apps/v1 validation refuses it; a controller must never claim every pod).
pub fn selects(selector: &Selector, labels: &BTreeMap<String, String>) -> bool {
    !selector.selects_all() && selector.matches(labels)
}

fn reference(rs: &ReplicaSet) -> ObjectReference {
    rs.object_ref(&())
}

impl Controller {
    fn pod_changed(&self, pod: &Pod, change: Change) {
        let namespace = pod.namespace().unwrap_or_default();
        match pods::controller_of(&pod.metadata) {
            Some(owner) if owner.kind == "ReplicaSet" => {
                let key = Key::new(&namespace, &owner.name);
                self.expectations.observe(&key, pod, change);
                self.queue.add(key);
            }
            Some(_) => {}
            None if change == Change::Applied => {
                for rs in self.replicasets.state() {
                    if rs.namespace().as_deref() == Some(&namespace)
                        && selector_of(&rs).is_some_and(|s| selects(&s, pod.labels()))
                    {
                        self.queue.add(Key::new(&namespace, &rs.name_any()));
                    }
                }
            }
            None => {}
        }
    }

    /// A node connected or disconnected: the ReplicaSets with pods there decide again.
    fn node_changed(&self, node: &str) {
        for pod in self.pods.state() {
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                && let Some(owner) = pods::controller_of(&pod.metadata)
                && owner.kind == "ReplicaSet"
            {
                let namespace = pod.namespace().unwrap_or_default();
                self.queue.add(Key::new(&namespace, &owner.name));
            }
        }
    }

    async fn reconcile(&self, key: &Key) -> Result<(), Error> {
        let Some(rs) = self
            .replicasets
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
        else {
            self.expectations.forget(key);
            return Ok(());
        };
        let Some(selector) = selector_of(&rs) else {
            tracing::warn!(replicaset = %key, "selector cannot be parsed, ignoring");
            return Ok(());
        };
        let uid = rs.metadata.uid.clone().unwrap_or_default();
        let candidates: Vec<Arc<Pod>> = self.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(&key.namespace) && pods::is_active(p)
        });
        let mut owned = Vec::new();
        for pod in candidates {
            if let Some(pod) = self.claim(&rs, &uid, &selector, pod).await? {
                owned.push(pod);
            }
        }

        let needs_sync = self.expectations.satisfied(key, &self.pods);
        if !needs_sync {
            // Look again soon even if the events it waits for went by unseen.
            self.queue.add_after(key.clone(), EXPECTATIONS_RECHECK);
        }
        let mut failure = None;
        if needs_sync && rs.metadata.deletion_timestamp.is_none() {
            failure = self.manage(key, &rs, &owned).await;
        }
        self.write_status(key, &rs, &owned, failure).await?;
        Ok(())
    }

    /// The pod if `rs` controls it after claiming: adopted when an orphan matches, released
    /// when it no longer matches (as client-go's `PodControllerRefManager`).
    async fn claim(
        &self,
        rs: &ReplicaSet,
        uid: &str,
        selector: &Selector,
        pod: Arc<Pod>,
    ) -> Result<Option<Arc<Pod>>, Error> {
        let matches = selects(selector, pod.labels());
        match pods::controller_of(&pod.metadata) {
            Some(owner) if owner.uid == uid => {
                if matches || rs.metadata.deletion_timestamp.is_some() {
                    return Ok(Some(pod));
                }
                let kept: Vec<_> = pod
                    .owner_references()
                    .iter()
                    .filter(|r| r.uid != uid)
                    .cloned()
                    .collect();
                self.patch_owners(&pod, json!(kept), "release").await?;
                Ok(None)
            }
            Some(_) => Ok(None),
            None => {
                if !matches
                    || rs.metadata.deletion_timestamp.is_some()
                    || pod.metadata.deletion_timestamp.is_some()
                {
                    return Ok(None);
                }
                let mut owners = pod.owner_references().to_vec();
                owners.push(pods::owner_reference("apps/v1", "ReplicaSet", &rs.metadata));
                self.patch_owners(&pod, json!(owners), "adopt").await?;
                Ok(Some(pod))
            }
        }
    }

    async fn patch_owners(
        &self,
        pod: &Pod,
        owners: Value,
        step: &'static str,
    ) -> Result<(), Error> {
        let namespace = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let patch = json!({"metadata": {
            "ownerReferences": owners,
            "resourceVersion": pod.metadata.resource_version,
        }});
        match api
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Gone or changed meanwhile: the next event brings the truth.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(source) => Err(Error::Api {
                step,
                kind: "pod",
                name: pod.name_any(),
                source,
            }),
        }
    }

    /// Creates or deletes pods until `spec.replicas` are active; the failure, if one
    /// happened, for the `ReplicaFailure` condition (reason, message).
    async fn manage(
        &self,
        key: &Key,
        rs: &ReplicaSet,
        owned: &[Arc<Pod>],
    ) -> Option<(String, String)> {
        let want = rs
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
            .max(0) as usize;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let reference = reference(rs);
        if owned.len() < want {
            let template = rs.spec.as_ref().and_then(|s| s.template.as_ref())?;
            let missing = (want - owned.len()).min(BURST);
            let owner = pods::owner_reference("apps/v1", "ReplicaSet", &rs.metadata);
            let pod = pods::pod_from_template(
                template,
                &key.namespace,
                owner,
                None,
                Some(format!("{}-", key.name)),
            );
            let params = PostParams::default();
            let mut created = HashSet::new();
            let mut failure = None;
            let mut batch = 1;
            let mut done = 0;
            while done < missing {
                let size = batch.min(missing - done);
                let results = join_all((0..size).map(|_| api.create(&params, &pod))).await;
                done += size;
                for result in results {
                    match result {
                        Ok(pod) => {
                            let name = pod.name_any();
                            self.recorder
                                .publish(
                                    &reference,
                                    EventType::Normal,
                                    "SuccessfulCreate",
                                    &format!("Created pod: {name}"),
                                )
                                .await;
                            created.insert(name);
                        }
                        Err(e) => {
                            let message = format!("Error creating: {}", api_message(&e));
                            self.recorder
                                .publish(&reference, EventType::Warning, "FailedCreate", &message)
                                .await;
                            failure = Some(("FailedCreate".to_string(), api_message(&e)));
                        }
                    }
                }
                if failure.is_some() {
                    break;
                }
                batch *= 2;
            }
            self.expectations.expect(key, created, HashSet::new());
            return failure;
        }
        if owned.len() > want {
            let excess = (owned.len() - want).min(BURST);
            let disconnected = self.disconnected_nodes();
            let order = deletion_order(owned, &disconnected, Timestamp::now());
            let kept = order.len() < excess;
            let victims: Vec<&Arc<Pod>> = order.into_iter().take(excess).collect();
            if kept {
                tracing::info!(
                    replicaset = %key,
                    excess,
                    deleting = victims.len(),
                    "keeping pods of disconnected nodes (autonomy rule)"
                );
            }
            let uids: HashSet<String> = victims
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            self.expectations.expect(key, HashSet::new(), uids);
            let results = join_all(victims.iter().map(|pod| async {
                let name = pod.name_any();
                (
                    name.clone(),
                    api.delete(&name, &DeleteParams::default()).await,
                )
            }))
            .await;
            let mut failure = None;
            for (name, result) in results {
                match result {
                    Ok(_) => {
                        self.recorder
                            .publish(
                                &reference,
                                EventType::Normal,
                                "SuccessfulDelete",
                                &format!("Deleted pod: {name}"),
                            )
                            .await;
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        let message = format!("Error deleting: {}", api_message(&e));
                        self.recorder
                            .publish(&reference, EventType::Warning, "FailedDelete", &message)
                            .await;
                        failure = Some(("FailedDelete".to_string(), api_message(&e)));
                    }
                }
            }
            if failure.is_some() {
                // What failed was not deleted: do not wait for it.
                self.expectations.forget(key);
            }
            return failure;
        }
        None
    }

    fn disconnected_nodes(&self) -> HashSet<String> {
        self.nodes
            .state()
            .iter()
            .filter(|n| pods::node_disconnected(n))
            .map(|n| n.name_any())
            .collect()
    }

    async fn write_status(
        &self,
        key: &Key,
        rs: &ReplicaSet,
        owned: &[Arc<Pod>],
        failure: Option<(String, String)>,
    ) -> Result<(), Error> {
        let now = Timestamp::now();
        let spec = rs.spec.as_ref();
        let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
        let template_labels = spec
            .and_then(|s| s.template.as_ref())
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let replicas = owned.len() as i32;
        let fully_labeled = owned
            .iter()
            .filter(|p| {
                template_labels
                    .iter()
                    .all(|(k, v)| p.labels().get(k) == Some(v))
            })
            .count() as i32;
        let ready = owned.iter().filter(|p| pods::is_ready(p)).count() as i32;
        let available = owned
            .iter()
            .filter(|p| pods::is_available(p, min_ready, now))
            .count() as i32;

        let old = rs.status.clone().unwrap_or_default();
        let old_failure = old
            .conditions
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.type_ == "ReplicaFailure"))
            .cloned();
        let failure_condition = match (&failure, &old_failure) {
            (Some((reason, message)), Some(c))
                if c.reason.as_deref() == Some(reason) && c.message.as_deref() == Some(message) =>
            {
                Some(serde_json::to_value(c).unwrap_or_default())
            }
            (Some((reason, message)), _) => Some(json!({
                "type": "ReplicaFailure", "status": "True", "reason": reason, "message": message,
                "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
            })),
            // A failure is cleared only by a reconcile that managed the pods.
            (None, Some(c)) if !self.expectations.satisfied(key, &self.pods) => {
                Some(serde_json::to_value(c).unwrap_or_default())
            }
            (None, _) => None,
        };
        let mut conditions: Vec<Value> = old
            .conditions
            .iter()
            .flatten()
            .filter(|c| c.type_ != "ReplicaFailure")
            .map(|c| serde_json::to_value(c).unwrap_or_default())
            .collect();
        conditions.extend(failure_condition);

        let generation = rs.metadata.generation.unwrap_or(0);
        let unchanged = old.replicas == replicas
            && old.fully_labeled_replicas.unwrap_or(0) == fully_labeled
            && old.ready_replicas.unwrap_or(0) == ready
            && old.available_replicas.unwrap_or(0) == available
            && old.observed_generation.unwrap_or(0) == generation
            && serde_json::to_value(old.conditions.clone().unwrap_or_default()).unwrap_or_default()
                == Value::Array(conditions.clone());
        if !unchanged {
            let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &key.namespace);
            let patch = json!({"status": {
                "replicas": replicas,
                "fullyLabeledReplicas": fully_labeled,
                "readyReplicas": ready,
                "availableReplicas": available,
                "observedGeneration": generation,
                "conditions": if conditions.is_empty() { Value::Null } else { Value::Array(conditions) },
            }});
            match api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
                Err(source) => {
                    return Err(Error::Api {
                        step: "write status of",
                        kind: "replicaset",
                        name: key.to_string(),
                        source,
                    });
                }
            }
        }
        // A pod ready but not yet available for minReadySeconds becomes available later
        // without any event: look again then.
        if min_ready > 0 && ready > available {
            self.queue.add_after(
                key.clone(),
                Duration::from_secs(u64::from(min_ready.unsigned_abs())),
            );
        }
        Ok(())
    }
}

/// The message of an API error (a `Status`'s message), else the error's text.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

fn phase_rank(pod: &Pod) -> u8 {
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") => 0,
        Some("Running") => 2,
        _ => 1,
    }
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).max().unwrap_or(0))
        .unwrap_or(0)
}

fn deletion_cost(pod: &Pod) -> i32 {
    pod.annotations()
        .get(POD_DELETION_COST)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The pods a scale-down may delete, first to go first: those on a disconnected node are left
/// out (the autonomy rule); the rest in kube-controller-manager's order: unassigned before
/// assigned, Pending before Unknown before Running, not ready before ready, lower
/// pod-deletion-cost first, more of these pods on the same node first, ready for less time
/// first, more restarts first, newer first.
pub fn deletion_order<'a>(
    pods: &'a [Arc<Pod>],
    disconnected: &HashSet<String>,
    now: Timestamp,
) -> Vec<&'a Arc<Pod>> {
    let node = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default()
    };
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for p in pods {
        *per_node.entry(node(p)).or_default() += 1;
    }
    let mut eligible: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| !disconnected.contains(&node(p)))
        .collect();
    eligible.sort_by(|a, b| {
        let (na, nb) = (node(a), node(b));
        let ready_for = |p: &Pod| pods::ready_since(p).map(|t| now.as_second() - t.as_second());
        let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (!na.is_empty())
            .cmp(&!nb.is_empty())
            .then(phase_rank(a).cmp(&phase_rank(b)))
            .then(pods::is_ready(a).cmp(&pods::is_ready(b)))
            .then(deletion_cost(a).cmp(&deletion_cost(b)))
            .then(per_node[&nb].cmp(&per_node[&na]))
            .then(ready_for(a).cmp(&ready_for(b)))
            .then(restarts(b).cmp(&restarts(a)))
            .then(created(b).cmp(&created(a)))
    });
    eligible
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(name: &str, node: &str, phase: &str, ready_since: Option<i64>) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(Timestamp::from_second(1_000).expect("ts"))),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: (!node.is_empty()).then(|| node.to_string()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: ready_since.map(|t| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        last_transition_time: Some(Time(Timestamp::from_second(t).expect("ts"))),
                        ..PodCondition::default()
                    }]
                }),
                ..PodStatus::default()
            }),
        })
    }

    fn names(order: Vec<&Arc<Pod>>) -> Vec<String> {
        order.into_iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn deletion_order_follows_kube_controller_manager_ranks() {
        let now = Timestamp::from_second(10_000).expect("ts");
        let pods = vec![
            pod("running-ready-old", "a", "Running", Some(1_000)),
            pod("unassigned", "", "Pending", None),
            pod("running-ready-new", "b", "Running", Some(9_000)),
            pod("pending", "a", "Pending", None),
            pod("running-not-ready", "b", "Running", None),
        ];
        let order = names(deletion_order(&pods, &HashSet::new(), now));
        assert_eq!(
            order,
            [
                "unassigned",
                "pending",
                "running-not-ready",
                "running-ready-new",
                "running-ready-old"
            ]
        );
    }

    #[test]
    fn doubled_up_pods_go_first_among_equals() {
        let now = Timestamp::from_second(10_000).expect("ts");
        let pods = vec![
            pod("alone", "a", "Running", Some(5_000)),
            pod("shared-1", "b", "Running", Some(5_000)),
            pod("shared-2", "b", "Running", Some(5_000)),
        ];
        let order = names(deletion_order(&pods, &HashSet::new(), now));
        assert_eq!(order.last().map(String::as_str), Some("alone"), "{order:?}");
    }

    #[test]
    fn pods_of_disconnected_nodes_are_never_picked() {
        let now = Timestamp::from_second(10_000).expect("ts");
        let pods = vec![
            pod("offline-pending", "gw-off", "Pending", None),
            pod("online-ready", "gw-on", "Running", Some(1_000)),
        ];
        let disconnected = HashSet::from(["gw-off".to_string()]);
        let order = names(deletion_order(&pods, &disconnected, now));
        assert_eq!(order, ["online-ready"]);
        let only_offline = vec![pods[0].clone()];
        assert!(deletion_order(&only_offline, &disconnected, now).is_empty());
    }

    fn applied(writer: &mut reflector::store::Writer<Pod>, pod: &Pod) {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(pod.clone()));
    }

    #[test]
    fn expectations_are_met_by_the_store_even_when_events_went_first() {
        let (store, mut writer) = reflector::store::<Pod>();
        let expectations = Expectations::default();
        let key = Key::new("ns", "web");
        let mut created = Pod::clone(&pod("web-a", "", "Pending", None));
        created.metadata.namespace = Some("ns".into());
        created.metadata.uid = Some("uid-a".into());
        // The pod's event arrived before the expectation was recorded.
        applied(&mut writer, &created);
        expectations.observe(&key, &created, Change::Applied);
        expectations.expect(&key, HashSet::from(["web-a".to_string()]), HashSet::new());
        assert!(expectations.satisfied(&key, &store));

        // A deletion is met once the pod is terminating (or gone), not before.
        expectations.expect(&key, HashSet::new(), HashSet::from(["uid-a".to_string()]));
        assert!(!expectations.satisfied(&key, &store));
        created.metadata.deletion_timestamp =
            Some(Time(Timestamp::from_second(2_000).expect("ts")));
        applied(&mut writer, &created);
        assert!(expectations.satisfied(&key, &store));

        // A creation nobody has seen yet holds the ReplicaSet back.
        expectations.expect(&key, HashSet::from(["web-b".to_string()]), HashSet::new());
        assert!(!expectations.satisfied(&key, &store));
    }

    #[test]
    fn an_empty_selector_selects_nothing() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert!(!selects(&Selector::default(), &labels));
        let web: Selector = [("app", "web")].into_iter().collect();
        assert!(selects(&web, &labels));
        let other: Selector = [("app", "db")].into_iter().collect();
        assert!(!selects(&other, &labels));
    }
}
