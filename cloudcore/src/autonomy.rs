//! Autonomy of edge pods: a disconnected edge node keeps its pods.
//!
//! Kubernetes evicts the pods of a node that stops reporting: the node-lifecycle controller
//! taints it `node.kubernetes.io/unreachable:NoExecute` (`not-ready` when Ready=False), and the
//! taint-eviction controller deletes each pod once its tolerations of that taint run out (the
//! DefaultTolerationSeconds admission plugin gives every pod 300 s). An edge is expected to go
//! offline, so this controller makes the NoExecute tolerations of both taints of every pod bound
//! to an edge node last the pod's *autonomy duration*: forever, unless the pod's annotation
//! [`AUTONOMY_ANNOTATION`] or else its node's says otherwise. It runs in both control-plane
//! modes. In embedded mode, where no kube-controller-manager exists, it also does the
//! taint-eviction controller's work ([`TaintEviction::Enabled`]); [`crate::nodes`] sets and
//! clears the taint there. docs/autonomy.md has the rules for operators.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::AutonomyMetrics;
use crate::nodes::EDGE_ROLE_LABEL;

/// Annotation on a pod or an edge node: how long the pods may stay while their node is
/// unreachable or not ready, e.g. `10m`, `0s`, or `forever` (the default).
pub const AUTONOMY_ANNOTATION: &str = "edge.io/autonomy-duration";
/// Taint of a node whose Ready condition is Unknown.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// Taint of a node whose Ready condition is False.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The taints whose tolerations this controller owns on edge pods.
const MANAGED_TAINTS: [&str; 2] = [UNREACHABLE_TAINT, NOT_READY_TAINT];
/// Annotation of mirror pods (static pods of a kubelet); the API refuses changes to them.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Events arriving within this window are handled in one round.
const SETTLE: Duration = Duration::from_millis(50);
/// A round runs at least this often, retrying what failed.
const RESYNC: Duration = Duration::from_secs(10);
/// Conflicting writes retried before giving up until the next round.
const CONFLICT_RETRIES: usize = 3;

/// How long the pods of an edge node may stay while it is unreachable or not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autonomy {
    /// Never evicted: tolerations without `tolerationSeconds`.
    Forever,
    /// Evicted this many seconds after the node was tainted (`0`: at once).
    Seconds(i64),
}

impl Autonomy {
    /// The `tolerationSeconds` that expresses this duration.
    pub fn toleration_seconds(self) -> Option<i64> {
        match self {
            Autonomy::Forever => None,
            Autonomy::Seconds(s) => Some(s),
        }
    }
}

impl std::fmt::Display for Autonomy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Autonomy::Forever => f.write_str("forever"),
            Autonomy::Seconds(s) => write!(f, "{s}s"),
        }
    }
}

/// An [`AUTONOMY_ANNOTATION`] value that is neither a duration nor `forever`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {AUTONOMY_ANNOTATION} {value:?}: expected a duration such as 10m or 0s, or forever"
)]
pub struct InvalidAutonomy {
    /// The annotation's value.
    pub value: String,
}

impl FromStr for Autonomy {
    type Err = InvalidAutonomy;

    /// `forever`, a duration (`90s`, `10m`, `1h 30m`; sub-second parts round up), or a bare
    /// number of seconds.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("forever") {
            return Ok(Autonomy::Forever);
        }
        let invalid = || InvalidAutonomy {
            value: text.to_string(),
        };
        let duration = match text.parse::<u64>() {
            Ok(seconds) => Duration::from_secs(seconds),
            Err(_) => humantime::parse_duration(text).map_err(|_| invalid())?,
        };
        let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
        Ok(Autonomy::Seconds(
            i64::try_from(seconds).map_err(|_| invalid())?,
        ))
    }
}

/// Whether this controller also deletes pods whose tolerations ran out (embedded mode), or a
/// real cluster's taint-eviction controller does (kube mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEviction {
    Enabled,
    Disabled,
}

/// Where a pod's autonomy came from, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Pod,
    Node,
    Default,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Pod => "pod annotation",
            Source::Node => "node annotation",
            Source::Default => "default",
        }
    }
}

/// Kubernetes' `Toleration.ToleratesTaint`.
pub fn tolerates(toleration: &Value, taint: &Value) -> bool {
    fn text<'a>(v: &'a Value, field: &str) -> &'a str {
        v[field].as_str().unwrap_or_default()
    }
    let effect = text(toleration, "effect");
    if !effect.is_empty() && effect != text(taint, "effect") {
        return false;
    }
    let key = text(toleration, "key");
    if !key.is_empty() && key != text(taint, "key") {
        return false;
    }
    match toleration["operator"].as_str().unwrap_or_default() {
        "" | "Equal" => text(toleration, "value") == text(taint, "value"),
        "Exists" => true,
        _ => false,
    }
}

/// The pod's tolerations with those of the unreachable and not-ready NoExecute taints set to
/// last `autonomy`: every toleration keyed on one of them that matches it gets that
/// `tolerationSeconds` (or loses it, for [`Autonomy::Forever`]), and a toleration is added where
/// none can carry it. Only changes Kubernetes allows on a pod update (`tolerationSeconds` of
/// existing tolerations, new tolerations). Tolerations with an empty key are left alone.
pub fn desired_tolerations(current: &[Value], autonomy: Autonomy) -> Vec<Value> {
    let mut tolerations = current.to_vec();
    for key in MANAGED_TAINTS {
        let taint = json!({"key": key, "effect": "NoExecute"});
        let mut carried = false;
        for toleration in tolerations
            .iter_mut()
            .filter(|t| t["key"] == key && tolerates(t, &taint))
        {
            if toleration["effect"] != "NoExecute" {
                // No effect: tolerates forever, and may not carry tolerationSeconds.
                carried |= autonomy == Autonomy::Forever;
                continue;
            }
            let Some(fields) = toleration.as_object_mut() else {
                continue;
            };
            match autonomy.toleration_seconds() {
                Some(seconds) => {
                    fields.insert("tolerationSeconds".into(), json!(seconds));
                }
                None => {
                    fields.remove("tolerationSeconds");
                }
            }
            carried = true;
        }
        if !carried {
            let mut added = json!({"key": key, "operator": "Exists", "effect": "NoExecute"});
            if let Some(seconds) = autonomy.toleration_seconds() {
                added["tolerationSeconds"] = json!(seconds);
            }
            tolerations.push(added);
        }
    }
    tolerations
}

/// (namespace, name) of a pod.
type PodKey = (String, String);

/// What the controller keeps of a pod bound to a node.
#[derive(Debug, Clone, PartialEq)]
struct PodFacts {
    uid: String,
    resource_version: String,
    node: String,
    /// From the pod's annotation; `None` when absent or invalid.
    autonomy: Option<Autonomy>,
    /// Owned by a DaemonSet: such pods belong to their node, which's annotation does not apply.
    daemon: bool,
    /// A mirror pod, or one being deleted: left alone.
    untouchable: bool,
    tolerations: Tolerations,
}

/// A pod's tolerations as compact JSON text: held for every edge pod, and read only when a pod
/// is judged (not settled) or evicted. As `serde_json::Value` trees they were about 2 KiB of
/// every pod's facts, several times their text.
#[derive(Debug, Clone, PartialEq, Default)]
struct Tolerations(Box<str>);

impl Tolerations {
    fn of<T: serde::Serialize>(tolerations: &[T]) -> Tolerations {
        // A list of tolerations or of JSON values always serializes: a failure is a bug, and
        // an empty list in its place would silently lose the pod's tolerations.
        Tolerations(
            serde_json::to_string(tolerations)
                .expect("a list of tolerations serializes to JSON")
                .into(),
        )
    }

    fn values(&self) -> Vec<Value> {
        serde_json::from_str(&self.0).expect("the JSON text `of` wrote parses")
    }
}

impl PodFacts {
    /// Equal in everything but the resourceVersion.
    fn same_but_version(&self, other: &PodFacts) -> bool {
        self.uid == other.uid
            && self.node == other.node
            && self.autonomy == other.autonomy
            && self.daemon == other.daemon
            && self.untouchable == other.untouchable
            && self.tolerations == other.tolerations
    }
}

/// A NoExecute taint and since when it is on the node.
#[derive(Debug, Clone, PartialEq)]
struct NoExecuteTaint {
    taint: Value,
    added: OffsetDateTime,
}

/// What the controller keeps of an edge node.
#[derive(Debug, Clone, Default, PartialEq)]
struct NodeFacts {
    /// From the node's annotation; `None` when absent or invalid.
    autonomy: Option<Autonomy>,
    taints: Vec<NoExecuteTaint>,
}

/// Watch caches of bound pods and edge nodes, reduced to what the rules need.
#[derive(Debug, Default)]
struct Index {
    pods: HashMap<PodKey, PodFacts>,
    nodes: HashMap<String, NodeFacts>,
    /// Pods whose tolerations a round found as their autonomy wants them, with that autonomy:
    /// the next round compares only the autonomy (a round follows every pod or node change,
    /// and comparing every pod's tolerations each time was most of cloudcore's CPU at 10,000
    /// edges). A pod's entry goes when the pod changes.
    settled: HashMap<PodKey, Autonomy>,
}

fn annotation_autonomy(kind: &str, name: &str, value: Option<&String>) -> Option<Autonomy> {
    match value?.parse() {
        Ok(autonomy) => Some(autonomy),
        Err(e) => {
            tracing::warn!(object = %format!("{kind}/{name}"), "{e}; ignored");
            None
        }
    }
}

fn pod_key(pod: &Pod) -> PodKey {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

fn pod_facts(pod: &Pod) -> Option<PodFacts> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let annotations = pod.metadata.annotations.as_ref();
    let (namespace, name) = pod_key(pod);
    Some(PodFacts {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        resource_version: pod.metadata.resource_version.clone().unwrap_or_default(),
        node,
        autonomy: annotation_autonomy(
            "pod",
            &format!("{namespace}/{name}"),
            annotations.and_then(|a| a.get(AUTONOMY_ANNOTATION)),
        ),
        daemon: pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "DaemonSet" && o.controller == Some(true)),
        untouchable: pod.metadata.deletion_timestamp.is_some()
            || annotations.is_some_and(|a| a.contains_key(MIRROR_ANNOTATION)),
        tolerations: Tolerations::of(spec.tolerations.as_deref().unwrap_or_default()),
    })
}

/// A node's facts; taints without `timeAdded` keep the time they were first seen (`previous`),
/// or `now`.
fn node_facts(node: &Node, previous: Option<&NodeFacts>, now: OffsetDateTime) -> NodeFacts {
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoExecute")
        .map(|t| {
            let taint = json!({"key": t.key, "value": t.value.clone().unwrap_or_default(), "effect": t.effect});
            let seen = || {
                previous
                    .and_then(|p| p.taints.iter().find(|o| o.taint == taint))
                    .map(|o| o.added)
            };
            let added = serde_json::to_value(t)
                .ok()
                .and_then(|v| {
                    v["timeAdded"]
                        .as_str()
                        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
                })
                .or_else(seen)
                .unwrap_or(now);
            NoExecuteTaint { taint, added }
        })
        .collect();
    NodeFacts {
        autonomy: annotation_autonomy(
            "node",
            node.metadata.name.as_deref().unwrap_or_default(),
            node.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(AUTONOMY_ANNOTATION)),
        ),
        taints,
    }
}

impl Index {
    /// Takes in a new version of `pod`; whether anything the rules read changed (a status
    /// change only moves the resourceVersion kept for the next write, and needs no round: at
    /// 10,000 edges their statuses change a thousand times a second).
    fn apply_pod(&mut self, pod: &Pod) -> bool {
        let key = pod_key(pod);
        let facts = pod_facts(pod);
        if let (Some(new), Some(old)) = (&facts, self.pods.get_mut(&key))
            && new.same_but_version(old)
        {
            old.resource_version.clone_from(&new.resource_version);
            return false;
        }
        match facts {
            Some(facts) => {
                self.settled.remove(&key);
                self.pods.insert(key, facts);
            }
            None => self.remove_pod(&key),
        }
        true
    }

    /// Forgets a pod, and that it was settled.
    fn remove_pod(&mut self, key: &PodKey) {
        self.settled.remove(key);
        self.pods.remove(key);
    }

    /// Takes in a new version of `node`; whether its facts changed (a status write alone
    /// changes nothing the rules read).
    fn apply_node(&mut self, node: &Node, now: OffsetDateTime) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        let facts = node_facts(node, self.nodes.get(&name), now);
        self.nodes.insert(name, facts.clone()) != Some(facts)
    }

    /// The autonomy of `pod` on `node`: the pod's annotation, else the node's (not for
    /// DaemonSet pods), else forever.
    fn autonomy(pod: &PodFacts, node: &NodeFacts) -> (Autonomy, Source) {
        if let Some(a) = pod.autonomy {
            return (a, Source::Pod);
        }
        match node.autonomy {
            Some(a) if !pod.daemon => (a, Source::Node),
            _ => (Autonomy::Forever, Source::Default),
        }
    }
}

/// One write a round decided on.
#[derive(Debug, Clone, PartialEq)]
enum Action {
    /// Set the pod's tolerations (from the version it was computed on).
    Tolerate {
        pod: PodKey,
        resource_version: String,
        tolerations: Vec<Value>,
        autonomy: Autonomy,
        source: Source,
    },
    /// Delete the pod: its node is tainted and its tolerations ran out.
    Evict {
        pod: PodKey,
        uid: String,
        resource_version: String,
        node: String,
        why: String,
    },
}

/// What a round does, and when the next eviction falls due.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    actions: Vec<Action>,
    next_deadline: Option<OffsetDateTime>,
}

/// Whether the taint-eviction controller would delete `pod` now: `Ok(Some(why))` if so,
/// `Ok(None)` if it tolerates the node's NoExecute taints forever, `Err(deadline)` if it may
/// stay until then.
fn eviction_verdict(
    tolerations: &[Value],
    node: &NodeFacts,
    now: OffsetDateTime,
) -> Result<Option<String>, OffsetDateTime> {
    let mut used: Vec<&Value> = Vec::new();
    for t in &node.taints {
        let matching: Vec<&Value> = tolerations
            .iter()
            .filter(|tol| tolerates(tol, &t.taint))
            .collect();
        if matching.is_empty() {
            return Ok(Some(format!(
                "no toleration of the taint {}:NoExecute",
                t.taint["key"].as_str().unwrap_or_default()
            )));
        }
        used.extend(matching);
    }
    // The smallest tolerationSeconds among the tolerations used wins; none: forever.
    let Some(seconds) = used
        .iter()
        .filter_map(|t| t["tolerationSeconds"].as_i64())
        .map(|s| s.max(0))
        .min()
    else {
        return Ok(None);
    };
    let since = node.taints.iter().map(|t| t.added).min().unwrap_or(now);
    let deadline = since + time::Duration::seconds(seconds);
    if deadline <= now {
        Ok(Some(format!("tolerated the node's taints for {seconds}s")))
    } else {
        Err(deadline)
    }
}

/// The round: toleration writes for every edge pod whose tolerations differ from its autonomy;
/// with eviction enabled, deletions of settled pods whose tolerations ran out.
fn plan(index: &mut Index, eviction: TaintEviction, now: OffsetDateTime) -> Plan {
    let mut plan = Plan::default();
    let Index {
        pods,
        nodes,
        settled,
    } = index;
    for (key, pod) in pods.iter() {
        // Edge nodes only: pods of other nodes are never touched.
        let Some(node) = nodes.get(&pod.node) else {
            continue;
        };
        if pod.untouchable {
            continue;
        }
        let (autonomy, source) = Index::autonomy(pod, node);
        if settled.get(key) != Some(&autonomy) {
            let current = pod.tolerations.values();
            let wanted = desired_tolerations(&current, autonomy);
            if wanted != current {
                plan.actions.push(Action::Tolerate {
                    pod: key.clone(),
                    resource_version: pod.resource_version.clone(),
                    tolerations: wanted,
                    autonomy,
                    source,
                });
                // Not settled: judged again once its tolerations are written.
                continue;
            }
            settled.insert(key.clone(), autonomy);
        }
        if eviction == TaintEviction::Disabled || node.taints.is_empty() {
            continue;
        }
        match eviction_verdict(&pod.tolerations.values(), node, now) {
            Ok(Some(why)) => plan.actions.push(Action::Evict {
                pod: key.clone(),
                uid: pod.uid.clone(),
                resource_version: pod.resource_version.clone(),
                node: pod.node.clone(),
                why,
            }),
            Ok(None) => {}
            Err(deadline) => {
                plan.next_deadline = Some(plan.next_deadline.map_or(deadline, |d| d.min(deadline)))
            }
        }
    }
    plan
}

/// Writes a pod's tolerations by JSON merge patch with a resourceVersion precondition; on a
/// conflict, reads the pod again and recomputes. Returns the written pod (`None`: nothing to do
/// any more).
async fn tolerate(
    pods: &Api<Pod>,
    name: &str,
    mut resource_version: String,
    mut tolerations: Vec<Value>,
    node_autonomy: impl Fn(&PodFacts) -> Option<Autonomy>,
) -> Result<Option<Pod>, kube::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let patch = json!({
            "metadata": {"resourceVersion": resource_version},
            "spec": {"tolerations": tolerations},
        });
        match pods
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(pod) => return Ok(Some(pod)),
            Err(kube::Error::Api(e)) if e.code == 409 && attempt <= CONFLICT_RETRIES => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
            Err(e) => return Err(e),
        }
        let Some(fresh) = pods.get_opt(name).await? else {
            return Ok(None);
        };
        let Some(facts) = pod_facts(&fresh).filter(|f| !f.untouchable) else {
            return Ok(None);
        };
        let Some(autonomy) = node_autonomy(&facts) else {
            return Ok(None);
        };
        let current = facts.tolerations.values();
        let wanted = desired_tolerations(&current, autonomy);
        if wanted == current {
            return Ok(None);
        }
        resource_version = facts.resource_version;
        tolerations = wanted;
    }
}

/// Carries out one round's actions.
async fn execute(
    client: &kube::Client,
    index: &Mutex<Index>,
    actions: Vec<Action>,
    metrics: &AutonomyMetrics,
) {
    let lock = || index.lock().unwrap_or_else(|p| p.into_inner());
    let nodes: Api<Node> = Api::all(client.clone());
    for action in actions {
        match action {
            Action::Tolerate {
                pod: (namespace, name),
                resource_version,
                tolerations,
                autonomy,
                source,
            } => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
                // A conflict recomputes from the fresh pod with the node's current annotation.
                let node_autonomy = |facts: &PodFacts| {
                    let index = lock();
                    let node = index.nodes.get(&facts.node)?;
                    Some(Index::autonomy(facts, node).0)
                };
                match tolerate(&pods, &name, resource_version, tolerations, node_autonomy).await {
                    Ok(Some(written)) => {
                        metrics.toleration_patches.inc();
                        tracing::info!(pod = %format!("{namespace}/{name}"), autonomy = %autonomy, source = source.as_str(), "pod tolerations set for its autonomy on an edge node");
                        // The watch brings the same version; applying it now keeps the next
                        // round from writing again on a stale copy.
                        lock().apply_pod(&written);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        metrics.toleration_patch_failures.inc();
                        tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot set the pod's tolerations; will retry");
                    }
                }
            }
            Action::Evict {
                pod: (namespace, name),
                uid,
                resource_version,
                node,
                why,
            } => {
                // Judge again against the node as it is now, not as the cache last saw it:
                // a node that just came back must not lose pods.
                let fresh = match nodes.get_opt(&node).await {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(node.name = %node, error = %e, "cannot read the node before an eviction; will retry");
                        continue;
                    }
                };
                let (facts, tolerations) = {
                    let mut index = lock();
                    let now = OffsetDateTime::now_utc();
                    index.apply_node(&fresh, now);
                    let facts = index.nodes.get(&node).cloned().unwrap_or_default();
                    let tolerations = index
                        .pods
                        .get(&(namespace.clone(), name.clone()))
                        .map(|p| p.tolerations.values())
                        .unwrap_or_default();
                    (facts, tolerations)
                };
                if !matches!(
                    eviction_verdict(&tolerations, &facts, OffsetDateTime::now_utc()),
                    Ok(Some(_))
                ) {
                    continue;
                }
                let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: Some(resource_version),
                    }),
                    ..DeleteParams::default()
                };
                match pods.delete(&name, &params).await {
                    Ok(_) => {
                        metrics.evictions.inc();
                        tracing::warn!(pod = %format!("{namespace}/{name}"), node.name = %node, "evicting pod from an unreachable edge node: {why}");
                    }
                    // Gone, or changed since it was judged: the next round judges it again.
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                    Err(e) => {
                        tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot evict the pod; will retry")
                    }
                }
            }
        }
    }
}

/// Follows bound pods into the index. A relist builds a fresh map that replaces the old one.
async fn follow_pods(api: Api<Pod>, index: Arc<Mutex<Index>>, changed: Arc<Notify>) {
    let config = watcher::Config::default().fields("spec.nodeName!=");
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut rebuilding: Option<Index> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "autonomy pod watch interrupted; the watcher retries");
                continue;
            }
        };
        let mut live = index.lock().unwrap_or_else(|p| p.into_inner());
        // Whether a round is needed: not for a relist's single objects, nor for a change the
        // rules do not read.
        let matters = match event {
            watcher::Event::Init => {
                rebuilding = Some(Index::default());
                false
            }
            watcher::Event::InitApply(pod) => {
                rebuilding
                    .get_or_insert_with(Index::default)
                    .apply_pod(&pod);
                false
            }
            watcher::Event::InitDone => {
                if let Some(fresh) = rebuilding.take() {
                    live.pods = fresh.pods;
                    live.settled.clear();
                }
                true
            }
            watcher::Event::Apply(pod) => live.apply_pod(&pod),
            watcher::Event::Delete(pod) => {
                live.remove_pod(&pod_key(&pod));
                true
            }
        };
        drop(live);
        if matters {
            changed.notify_one();
        }
    }
}

/// Follows edge nodes into the index.
async fn follow_nodes(api: Api<Node>, index: Arc<Mutex<Index>>, changed: Arc<Notify>) {
    let config = watcher::Config::default().labels(EDGE_ROLE_LABEL);
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut rebuilding: Option<Index> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "autonomy node watch interrupted; the watcher retries");
                continue;
            }
        };
        let now = OffsetDateTime::now_utc();
        let mut live = index.lock().unwrap_or_else(|p| p.into_inner());
        // As for pods: a round for a change of what the rules read.
        let matters = match event {
            watcher::Event::Init => {
                rebuilding = Some(Index::default());
                false
            }
            watcher::Event::InitApply(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                let facts = node_facts(&node, live.nodes.get(&name), now);
                rebuilding
                    .get_or_insert_with(Index::default)
                    .nodes
                    .insert(name, facts);
                false
            }
            watcher::Event::InitDone => {
                if let Some(fresh) = rebuilding.take() {
                    live.nodes = fresh.nodes;
                }
                true
            }
            watcher::Event::Apply(node) => live.apply_node(&node, now),
            watcher::Event::Delete(node) => {
                live.nodes
                    .remove(node.metadata.name.as_deref().unwrap_or_default());
                true
            }
        };
        drop(live);
        if matters {
            changed.notify_one();
        }
    }
}

/// Runs the controller until cancelled: a round on every pod or node change, when the next
/// eviction falls due, and every 10 s.
pub async fn run(
    client: kube::Client,
    eviction: TaintEviction,
    metrics: Arc<AutonomyMetrics>,
    shutdown: CancellationToken,
) {
    // The index is shared by the two watch tasks and the rounds; held only for map updates and
    // planning, never across an await.
    let index = Arc::new(Mutex::new(Index::default()));
    let changed = Arc::new(Notify::new());
    let caches = async {
        tokio::join!(
            follow_pods(Api::all(client.clone()), index.clone(), changed.clone()),
            follow_nodes(Api::all(client.clone()), index.clone(), changed.clone()),
        );
    };
    let rounds = async {
        let mut next_deadline: Option<OffsetDateTime> = None;
        loop {
            let wait = next_deadline
                .map(|d| {
                    let left = d - OffsetDateTime::now_utc();
                    Duration::try_from(left)
                        .unwrap_or(Duration::ZERO)
                        .min(RESYNC)
                })
                .unwrap_or(RESYNC);
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            tokio::time::sleep(SETTLE).await;
            let round = {
                let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
                plan(&mut index, eviction, OffsetDateTime::now_utc())
            };
            next_deadline = round.next_deadline;
            execute(&client, &index, round.actions, &metrics).await;
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = caches => {}
        _ = rounds => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000 + seconds)
    }

    #[test]
    fn annotation_values() {
        for (text, expected) in [
            ("forever", Some(Autonomy::Forever)),
            ("Forever", Some(Autonomy::Forever)),
            ("0s", Some(Autonomy::Seconds(0))),
            ("0", Some(Autonomy::Seconds(0))),
            ("300", Some(Autonomy::Seconds(300))),
            ("10m", Some(Autonomy::Seconds(600))),
            ("1h 30m", Some(Autonomy::Seconds(5400))),
            ("1500ms", Some(Autonomy::Seconds(2))),
            (" 5s ", Some(Autonomy::Seconds(5))),
            ("off", None),
            ("-5s", None),
            ("", None),
            ("ten minutes", None),
        ] {
            assert_eq!(text.parse::<Autonomy>().ok(), expected, "{text:?}");
        }
        let e = "soon".parse::<Autonomy>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid edge.io/autonomy-duration \"soon\": expected a duration such as 10m or 0s, or forever"
        );
    }

    #[test]
    fn tolerations_follow_the_autonomy() {
        let default_seconds = |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300});
        let forever = |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute"});
        let seconds = |key: &str, s: i64| json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": s});
        let other = json!({"key": "dedicated", "operator": "Equal", "value": "line-1", "effect": "NoSchedule"});
        let cases: Vec<(&str, Vec<Value>, Autonomy, Vec<Value>)> = vec![
            (
                "a bare pod gets both tolerations, forever",
                vec![],
                Autonomy::Forever,
                vec![forever(UNREACHABLE_TAINT), forever(NOT_READY_TAINT)],
            ),
            (
                "DefaultTolerationSeconds' 300 s are dropped in place, others kept",
                vec![
                    other.clone(),
                    default_seconds(NOT_READY_TAINT),
                    default_seconds(UNREACHABLE_TAINT),
                ],
                Autonomy::Forever,
                vec![
                    other.clone(),
                    forever(NOT_READY_TAINT),
                    forever(UNREACHABLE_TAINT),
                ],
            ),
            (
                "an opt-out sets the seconds",
                vec![default_seconds(UNREACHABLE_TAINT)],
                Autonomy::Seconds(5),
                vec![seconds(UNREACHABLE_TAINT, 5), seconds(NOT_READY_TAINT, 5)],
            ),
            (
                "a toleration without effect tolerates forever but cannot carry seconds",
                vec![json!({"key": UNREACHABLE_TAINT, "operator": "Exists"})],
                Autonomy::Seconds(60),
                vec![
                    json!({"key": UNREACHABLE_TAINT, "operator": "Exists"}),
                    seconds(UNREACHABLE_TAINT, 60),
                    seconds(NOT_READY_TAINT, 60),
                ],
            ),
            (
                "Equal with an empty value matches the taint",
                vec![
                    json!({"key": UNREACHABLE_TAINT, "operator": "Equal", "effect": "NoExecute", "tolerationSeconds": 1}),
                ],
                Autonomy::Forever,
                vec![
                    json!({"key": UNREACHABLE_TAINT, "operator": "Equal", "effect": "NoExecute"}),
                    forever(NOT_READY_TAINT),
                ],
            ),
            (
                "a wildcard toleration is left alone",
                vec![json!({"operator": "Exists"})],
                Autonomy::Seconds(0),
                vec![
                    json!({"operator": "Exists"}),
                    seconds(UNREACHABLE_TAINT, 0),
                    seconds(NOT_READY_TAINT, 0),
                ],
            ),
        ];
        for (name, current, autonomy, expected) in cases {
            let desired = desired_tolerations(&current, autonomy);
            assert_eq!(desired, expected, "{name}");
            assert_eq!(
                desired_tolerations(&desired, autonomy),
                desired,
                "{name}: idempotent"
            );
        }
    }

    fn pod(node: &str, autonomy: Option<Autonomy>, tolerations: Vec<Value>) -> PodFacts {
        PodFacts {
            uid: "u".into(),
            resource_version: "7".into(),
            node: node.into(),
            autonomy,
            daemon: false,
            untouchable: false,
            tolerations: Tolerations::of(&tolerations),
        }
    }

    fn tainted(added: OffsetDateTime) -> Vec<NoExecuteTaint> {
        vec![NoExecuteTaint {
            taint: json!({"key": UNREACHABLE_TAINT, "value": "", "effect": "NoExecute"}),
            added,
        }]
    }

    fn index(pods: Vec<(&str, PodFacts)>, nodes: Vec<(&str, NodeFacts)>) -> Index {
        Index {
            pods: pods
                .into_iter()
                .map(|(n, p)| (("default".to_string(), n.to_string()), p))
                .collect(),
            nodes: nodes.into_iter().map(|(n, f)| (n.to_string(), f)).collect(),
            settled: HashMap::new(),
        }
    }

    fn tolerated_names(plan: &Plan) -> Vec<(String, Autonomy)> {
        let mut names: Vec<_> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Tolerate { pod, autonomy, .. } => Some((pod.1.clone(), *autonomy)),
                Action::Evict { .. } => None,
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        names
    }

    fn evicted_names(plan: &Plan) -> Vec<String> {
        let mut names: Vec<_> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Evict { pod, .. } => Some(pod.1.clone()),
                Action::Tolerate { .. } => None,
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn pod_annotation_wins_over_node_annotation_over_forever() {
        let node = NodeFacts {
            autonomy: Some(Autonomy::Seconds(600)),
            taints: vec![],
        };
        let mut daemon = pod("annotated", None, vec![]);
        daemon.daemon = true;
        let mut mirror = pod("annotated", None, vec![]);
        mirror.untouchable = true;
        let mut i = index(
            vec![
                ("inherits", pod("annotated", None, vec![])),
                ("pinned", pod("annotated", Some(Autonomy::Forever), vec![])),
                ("short", pod("plain", Some(Autonomy::Seconds(5)), vec![])),
                ("plain", pod("plain", None, vec![])),
                ("daemon", daemon),
                ("mirror", mirror),
                ("elsewhere", pod("not-an-edge", None, vec![])),
            ],
            vec![("annotated", node), ("plain", NodeFacts::default())],
        );
        let plan = plan(&mut i, TaintEviction::Enabled, at(0));
        assert_eq!(
            tolerated_names(&plan),
            vec![
                ("daemon".to_string(), Autonomy::Forever),
                ("inherits".to_string(), Autonomy::Seconds(600)),
                ("pinned".to_string(), Autonomy::Forever),
                ("plain".to_string(), Autonomy::Forever),
                ("short".to_string(), Autonomy::Seconds(5)),
            ]
        );
    }

    #[test]
    fn settled_pods_already_tolerating_are_left_alone() {
        let settled = desired_tolerations(&[], Autonomy::Forever);
        let mut i = index(
            vec![("p", pod("gw", None, settled))],
            vec![("gw", NodeFacts::default())],
        );
        assert_eq!(plan(&mut i, TaintEviction::Enabled, at(0)), Plan::default());
        let key = ("default".to_string(), "p".to_string());
        assert_eq!(i.settled.get(&key), Some(&Autonomy::Forever));

        // The node's autonomy changes: the settled pod is judged again.
        i.nodes.get_mut("gw").expect("node").autonomy = Some(Autonomy::Seconds(600));
        assert_eq!(
            tolerated_names(&plan(&mut i, TaintEviction::Enabled, at(0))),
            vec![("p".to_string(), Autonomy::Seconds(600))]
        );
        i.nodes.get_mut("gw").expect("node").autonomy = None;
        assert_eq!(plan(&mut i, TaintEviction::Enabled, at(0)), Plan::default());

        // The pod changes (its tolerations dropped): judged again from the new facts.
        let changed: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u", "resourceVersion": "9"},
            "spec": {"nodeName": "gw", "containers": [{"name": "c", "image": "i"}]},
        }))
        .expect("pod");
        assert!(
            i.apply_pod(&changed),
            "tolerations dropped: a change the rules read"
        );
        assert_eq!(i.settled.get(&key), None);
        // A new version with the same facts (a status change): no round needed, only the
        // resourceVersion the next write is conditional on moves.
        let mut status_only = changed.clone();
        status_only.metadata.resource_version = Some("10".into());
        status_only.status = Some(Default::default());
        assert!(!i.apply_pod(&status_only));
        assert_eq!(i.pods[&key].resource_version, "10");
        assert_eq!(
            tolerated_names(&plan(&mut i, TaintEviction::Enabled, at(0))),
            vec![("p".to_string(), Autonomy::Forever)]
        );
    }

    #[test]
    fn eviction_follows_the_taint_manager() {
        let forever = desired_tolerations(&[], Autonomy::Forever);
        let five = desired_tolerations(&[], Autonomy::Seconds(5));
        let node = NodeFacts {
            autonomy: None,
            taints: tainted(at(0)),
        };
        let mut unsettled = pod("gw", Some(Autonomy::Seconds(5)), vec![]);
        unsettled.resource_version = "8".into();
        let mut terminating = pod("gw", Some(Autonomy::Seconds(5)), five.clone());
        terminating.untouchable = true;
        let mut i = index(
            vec![
                ("forever", pod("gw", None, forever)),
                ("five", pod("gw", Some(Autonomy::Seconds(5)), five.clone())),
                ("unsettled", unsettled),
                ("terminating", terminating),
            ],
            vec![("gw", node.clone())],
        );
        let early = plan(&mut i, TaintEviction::Enabled, at(4));
        assert_eq!(evicted_names(&early), Vec::<String>::new());
        assert_eq!(early.next_deadline, Some(at(5)));
        assert_eq!(
            tolerated_names(&early),
            vec![("unsettled".to_string(), Autonomy::Seconds(5))],
            "an unsettled pod gets its tolerations first, and is not judged on the old ones"
        );
        let due = plan(&mut i, TaintEviction::Enabled, at(5));
        assert_eq!(evicted_names(&due), vec!["five".to_string()]);
        assert_eq!(
            evicted_names(&plan(&mut i, TaintEviction::Disabled, at(60))),
            Vec::<String>::new(),
            "kube mode: the cluster evicts"
        );

        // The taint manager's rules, one pod at a time.
        let cases: Vec<(&str, Vec<Value>, Result<bool, OffsetDateTime>)> = vec![
            ("no toleration: at once", vec![], Ok(true)),
            (
                "a toleration of another taint: at once",
                vec![json!({"key": "other", "operator": "Exists", "effect": "NoExecute"})],
                Ok(true),
            ),
            (
                "the smallest seconds win over forever",
                vec![
                    json!({"operator": "Exists"}),
                    json!({"key": UNREACHABLE_TAINT, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}),
                ],
                Err(at(30)),
            ),
            (
                "zero or negative seconds: at once",
                vec![
                    json!({"key": UNREACHABLE_TAINT, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": -1}),
                ],
                Ok(true),
            ),
            (
                "a wildcard without seconds: forever",
                vec![json!({"operator": "Exists"})],
                Ok(false),
            ),
        ];
        for (name, tolerations, expected) in cases {
            let verdict = eviction_verdict(&tolerations, &node, at(10)).map(|v| v.is_some());
            assert_eq!(verdict, expected, "{name}");
        }
    }

    #[test]
    fn taints_without_time_added_keep_their_first_sighting() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "gw", "annotations": {AUTONOMY_ANNOTATION: "2m"}},
            "spec": {"taints": [
                {"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": "2023-11-14T22:13:25Z"},
                {"key": "custom", "effect": "NoExecute"},
                {"key": "soft", "effect": "NoSchedule"},
            ]},
        }))
        .expect("node");
        let first = node_facts(&node, None, at(100));
        assert_eq!(first.autonomy, Some(Autonomy::Seconds(120)));
        assert_eq!(first.taints.len(), 2, "NoExecute taints only");
        assert_eq!(first.taints[0].added, at(5));
        assert_eq!(first.taints[1].added, at(100));
        let later = node_facts(&node, Some(&first), at(200));
        assert_eq!(later.taints[1].added, at(100));
    }

    #[test]
    fn pod_facts_read_annotation_owner_and_mirror() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "p", "namespace": "default", "uid": "u1", "resourceVersion": "9",
                "annotations": {AUTONOMY_ANNOTATION: "bogus"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "d", "controller": true}],
            },
            "spec": {"nodeName": "gw", "containers": [{"name": "c", "image": "i"}],
                     "tolerations": [{"key": "a", "operator": "Exists"}]},
        }))
        .expect("pod");
        let facts = pod_facts(&pod).expect("bound");
        assert_eq!(facts.autonomy, None, "an invalid value is ignored");
        assert!(facts.daemon);
        assert!(!facts.untouchable);
        assert_eq!(
            facts.tolerations.values(),
            vec![json!({"key": "a", "operator": "Exists"})]
        );
        let unbound: Pod =
            serde_json::from_value(json!({"metadata": {"name": "q"}, "spec": {"containers": []}}))
                .expect("pod");
        assert_eq!(pod_facts(&unbound), None);
    }
}
