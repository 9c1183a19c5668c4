//! Edge nodes as Kubernetes Nodes, in both control-plane modes, through kube-rs.
//!
//! The tunnel ([`crate::hub`]) records who is connected in [`Presence`]; the controller here
//! turns that into API objects: the Node (labels, addresses, capacity, nodeInfo, the Ready
//! condition) when an edge connects, its Lease in `kube-node-lease` renewed while it stays
//! connected, and — when cloudcore is the control plane — Ready=Unknown once an edge has been
//! gone for the grace period, with the `node.kubernetes.io/unreachable:NoExecute` taint until it
//! is back (a real cluster's node-lifecycle controller does both from the Lease in kube mode).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::autonomy::{NOT_READY_TAINT, UNREACHABLE_TAINT};

/// Label every edge node carries.
pub const EDGE_ROLE_LABEL: &str = "node-role.kubernetes.io/edge";
/// Namespace of node leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

/// One edge as the tunnel sees it.
#[derive(Debug, Clone)]
struct Edge {
    connected: bool,
    info: proto::NodeInfo,
    address: String,
    labels: BTreeMap<String, String>,
    /// The Node object has not been written since the edge (re)connected.
    dirty: bool,
    /// When the lease was last renewed.
    renewed: Option<Instant>,
}

/// Who is connected; written by the hub, read by the controller.
#[derive(Debug, Default)]
pub struct Presence {
    /// Held only for map updates, never across an await.
    edges: Mutex<HashMap<String, Edge>>,
    changed: Notify,
}

impl Presence {
    fn edges(&self) -> std::sync::MutexGuard<'_, HashMap<String, Edge>> {
        self.edges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session of `name` started.
    pub fn connected(
        &self,
        name: &str,
        info: proto::NodeInfo,
        address: String,
        labels: BTreeMap<String, String>,
    ) {
        self.edges().insert(
            name.to_string(),
            Edge {
                connected: true,
                info,
                address,
                labels,
                dirty: true,
                renewed: None,
            },
        );
        self.changed.notify_one();
    }

    /// The session of `name` ended.
    pub fn disconnected(&self, name: &str) {
        if let Some(edge) = self.edges().get_mut(name) {
            edge.connected = false;
        }
        self.changed.notify_one();
    }

    /// Whether `name` has a live session.
    pub fn is_connected(&self, name: &str) -> bool {
        self.edges().get(name).is_some_and(|e| e.connected)
    }
}

/// Settings of the node controller.
#[derive(Debug, Clone)]
pub struct NodeControllerConfig {
    /// Lease renewal interval while connected.
    pub renew_interval: Duration,
    /// Lease duration written into the Lease.
    pub lease_duration: Duration,
    /// After this long without the tunnel a node's Ready becomes Unknown (embedded mode).
    pub grace_period: Duration,
    /// Whether this controller marks lost nodes Unknown and taints them unreachable
    /// (embedded); a real cluster does it itself.
    pub lifecycle: bool,
}

impl Default for NodeControllerConfig {
    fn default() -> Self {
        NodeControllerConfig {
            renew_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            grace_period: Duration::from_secs(40),
            lifecycle: true,
        }
    }
}

fn now_text() -> String {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn micro_time(t: OffsetDateTime) -> String {
    let micros = t.nanosecond() / 1000;
    let whole = t
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default();
    // RFC 3339 with microseconds, as Kubernetes' MicroTime.
    format!("{}.{micros:06}Z", whole.trim_end_matches('Z'))
}

fn node_labels(name: &str, edge: &Edge) -> BTreeMap<String, String> {
    let mut labels = edge.labels.clone();
    labels.insert(EDGE_ROLE_LABEL.into(), String::new());
    labels.insert("kubernetes.io/hostname".into(), name.into());
    labels.insert("kubernetes.io/os".into(), edge.info.os.clone());
    labels.insert("kubernetes.io/arch".into(), go_arch(&edge.info.arch).into());
    labels.insert("beta.kubernetes.io/os".into(), edge.info.os.clone());
    labels.insert(
        "beta.kubernetes.io/arch".into(),
        go_arch(&edge.info.arch).into(),
    );
    labels
}

/// Kubernetes names architectures the Go way.
fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn ready_condition(status: &str, reason: &str, message: &str, previous: Option<&Value>) -> Value {
    let now = now_text();
    let transition = match previous {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": transition,
    })
}

fn node_status(edge: &Edge, previous_ready: Option<&Value>) -> Value {
    let capacity = json!({
        "cpu": edge.info.cpus.to_string(),
        "memory": format!("{}Ki", edge.info.memory_bytes / 1024),
        "pods": "110",
    });
    json!({
        "addresses": [
            {"type": "InternalIP", "address": edge.address},
            {"type": "Hostname", "address": edge.info.hostname},
        ],
        "capacity": capacity,
        "allocatable": capacity,
        "nodeInfo": {
            "architecture": go_arch(&edge.info.arch),
            "operatingSystem": edge.info.os,
            "kernelVersion": edge.info.kernel_version,
            "osImage": edge.info.os,
            "kubeletVersion": format!("v{}-edgecore", edge.info.edgecore_version),
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
        "conditions": [ready_condition("True", "EdgecoreReady", "edgecore is connected over the tunnel", previous_ready)],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    })
}

fn ready_of(node: &Node) -> Option<Value> {
    let status = serde_json::to_value(node.status.as_ref()?).ok()?;
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
}

/// Creates or updates the Node of a connected edge and sets Ready=True.
async fn write_node(nodes: &Api<Node>, name: &str, edge: &Edge) -> Result<(), kube::Error> {
    let labels = node_labels(name, edge);
    let existing = nodes.get_opt(name).await?;
    let previous_ready = existing.as_ref().and_then(ready_of);
    match existing {
        None => {
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels},
            }))
            .map_err(kube::Error::SerdeError)?;
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Some(_) => {
            let patch = json!({"metadata": {"labels": labels}});
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
    }
    // Strategic merge: conditions merge by type, so the pressure conditions the edge reports
    // survive this controller's Ready.
    let status = json!({"status": node_status(edge, previous_ready.as_ref())});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
        .await?;
    Ok(())
}

/// Renews (creating if needed) the node's Lease.
async fn renew_lease(
    leases: &Api<Lease>,
    nodes: &Api<Node>,
    name: &str,
    duration: Duration,
) -> Result<(), kube::Error> {
    let now = micro_time(OffsetDateTime::now_utc());
    let spec = json!({"holderIdentity": name, "leaseDurationSeconds": duration.as_secs(), "renewTime": now});
    match leases.get_opt(name).await? {
        Some(_) => {
            leases
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": spec})),
                )
                .await?;
        }
        None => {
            let owner =
                nodes.get_opt(name).await?.and_then(|n| n.metadata.uid).map(
                    |uid| json!([{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]),
                );
            let mut lease = json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
                "spec": spec,
            });
            if let Some(owner) = owner {
                lease["metadata"]["ownerReferences"] = owner;
            }
            let lease: Lease = serde_json::from_value(lease).map_err(kube::Error::SerdeError)?;
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Whether a node should carry the unreachable NoExecute taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reachability {
    /// Ready=Unknown: tainted `node.kubernetes.io/unreachable:NoExecute`.
    Unreachable,
    /// Ready=True: neither the unreachable nor the not-ready NoExecute taint.
    Reachable,
}

/// The node's taints as they should be, or `None` if they already are. A new unreachable taint
/// gets `timeAdded`, from which the taint eviction counts.
fn taints_for(current: &[Value], want: Reachability, now: &str) -> Option<Vec<Value>> {
    let ours = |t: &Value, key: &str| t["key"] == key && t["effect"] == "NoExecute";
    match want {
        Reachability::Unreachable => {
            if current.iter().any(|t| ours(t, UNREACHABLE_TAINT)) {
                return None;
            }
            let mut taints = current.to_vec();
            taints.push(json!({"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": now}));
            Some(taints)
        }
        Reachability::Reachable => {
            let kept: Vec<Value> = current
                .iter()
                .filter(|t| !ours(t, UNREACHABLE_TAINT) && !ours(t, NOT_READY_TAINT))
                .cloned()
                .collect();
            (kept.len() != current.len()).then_some(kept)
        }
    }
}

/// Sets or clears the unreachable taint (what the node-lifecycle controller does in a real
/// cluster) by JSON merge patch with a resourceVersion precondition, reading the node again on
/// a conflict. `node` is the caller's copy, if it has a fresh one.
async fn set_reachability(
    nodes: &Api<Node>,
    name: &str,
    node: Option<Node>,
    want: Reachability,
) -> Result<(), kube::Error> {
    let mut node = match node {
        Some(n) => n,
        None => nodes.get(name).await?,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current: Vec<Value> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|t| serde_json::to_value(t).ok())
            .collect();
        let Some(taints) = taints_for(&current, want, &now_text()) else {
            return Ok(());
        };
        let taints = if taints.is_empty() {
            Value::Null
        } else {
            json!(taints)
        };
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "spec": {"taints": taints},
        });
        match nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                match want {
                    Reachability::Unreachable => {
                        tracing::warn!(node.name = %name, "node tainted {UNREACHABLE_TAINT}:NoExecute")
                    }
                    Reachability::Reachable => {
                        tracing::info!(node.name = %name, "node back: {UNREACHABLE_TAINT}:NoExecute taint removed")
                    }
                }
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 && attempt <= 3 => {
                node = nodes.get(name).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Marks edge nodes whose lease expired, and that have no session, Ready=Unknown and taints
/// them unreachable (also those already Unknown whose taint is missing).
async fn mark_lost(
    nodes: &Api<Node>,
    leases: &Api<Lease>,
    presence: &Presence,
    grace: Duration,
) -> Result<(), kube::Error> {
    let edge_nodes = nodes
        .list(&ListParams::default().labels(EDGE_ROLE_LABEL))
        .await?;
    let now = OffsetDateTime::now_utc();
    for node in edge_nodes {
        let Some(name) = node.metadata.name.clone() else {
            continue;
        };
        if presence.is_connected(&name) {
            continue;
        }
        let ready = ready_of(&node);
        if ready.as_ref().is_some_and(|r| r["status"] == "Unknown") {
            set_reachability(nodes, &name, Some(node), Reachability::Unreachable).await?;
            continue;
        }
        let renewed = leases
            .get_opt(&name)
            .await?
            .and_then(|l| serde_json::to_value(l.spec?).ok())
            .and_then(|spec| spec["renewTime"].as_str().and_then(parse_time));
        let last_seen = renewed.or_else(|| {
            ready
                .as_ref()
                .and_then(|r| r["lastHeartbeatTime"].as_str().and_then(parse_time))
        });
        let stale = last_seen.is_none_or(|t| {
            now - t > time::Duration::try_from(grace).unwrap_or(time::Duration::MAX)
        });
        if !stale {
            continue;
        }
        tracing::warn!(node.name = %name, "edge gone for longer than the grace period: Ready=Unknown");
        let mut condition = ready_condition(
            "Unknown",
            "NodeStatusUnknown",
            &format!(
                "edgecore stopped reporting: no tunnel for over {}",
                humantime::format_duration(grace)
            ),
            ready.as_ref(),
        );
        // Keep the last heartbeat the edge actually gave.
        if let Some(r) = &ready {
            condition["lastHeartbeatTime"] = r["lastHeartbeatTime"].clone();
        }
        let patch = json!({"status": {"conditions": [condition]}});
        let node = nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await?;
        set_reachability(nodes, &name, Some(node), Reachability::Unreachable).await?;
    }
    Ok(())
}

/// Runs the controller until cancelled. API failures are logged and retried on the next tick.
pub async fn run(
    client: kube::Client,
    presence: std::sync::Arc<Presence>,
    config: NodeControllerConfig,
    shutdown: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_lifecycle = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = presence.changed.notified() => {}
        }
        // Snapshot under the lock, write without it.
        let work: Vec<(String, Edge)> = presence
            .edges()
            .iter()
            .filter(|(_, e)| e.connected)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for (name, edge) in work {
            if edge.dirty {
                let written = match write_node(&nodes, &name, &edge).await {
                    // Embedded mode: the taint goes with Ready=Unknown (kube mode: the
                    // cluster's node-lifecycle controller removes it).
                    Ok(()) if config.lifecycle => {
                        set_reachability(&nodes, &name, None, Reachability::Reachable).await
                    }
                    other => other,
                };
                match written {
                    Ok(()) => {
                        tracing::info!(node.name = %name, "node object written: Ready=True");
                        if let Some(e) = presence.edges().get_mut(&name) {
                            e.dirty = false;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node.name = %name, error = %e, "cannot write the node object; will retry");
                        continue;
                    }
                }
            }
            if edge.dirty
                || edge
                    .renewed
                    .is_none_or(|t| t.elapsed() >= config.renew_interval)
            {
                match renew_lease(&leases, &nodes, &name, config.lease_duration).await {
                    Ok(()) => {
                        if let Some(e) = presence.edges().get_mut(&name) {
                            e.renewed = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node.name = %name, error = %e, "cannot renew the node lease; will retry")
                    }
                }
            }
        }
        if config.lifecycle && last_lifecycle.elapsed() >= Duration::from_secs(2) {
            last_lifecycle = Instant::now();
            if let Err(e) = mark_lost(&nodes, &leases, &presence, config.grace_period).await {
                tracing::warn!(error = %e, "node lifecycle check failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge() -> Edge {
        Edge {
            connected: true,
            info: proto::NodeInfo {
                hostname: "gw".into(),
                os: "linux".into(),
                arch: "aarch64".into(),
                kernel_version: "6.1".into(),
                edgecore_version: "0.1.0".into(),
                cpus: 4,
                memory_bytes: 2 * 1024 * 1024 * 1024,
            },
            address: "192.0.2.7".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            dirty: true,
            renewed: None,
        }
    }

    #[test]
    fn labels_mark_the_edge_role_and_platform() {
        let labels = node_labels("gw-1", &edge());
        assert_eq!(labels.get(EDGE_ROLE_LABEL).map(String::as_str), Some(""));
        assert_eq!(
            labels.get("kubernetes.io/arch").map(String::as_str),
            Some("arm64")
        );
        assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn status_reports_capacity_and_keeps_transition_time() {
        let previous = json!({"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"});
        let status = node_status(&edge(), Some(&previous));
        assert_eq!(status["capacity"]["memory"], "2097152Ki");
        assert_eq!(status["capacity"]["cpu"], "4");
        assert_eq!(
            status["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        let after_unknown = node_status(
            &edge(),
            Some(
                &json!({"type": "Ready", "status": "Unknown", "lastTransitionTime": "2020-01-01T00:00:00Z"}),
            ),
        );
        assert_ne!(
            after_unknown["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
    }

    #[test]
    fn micro_time_has_six_fraction_digits() {
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::microseconds(1_500_042);
        assert_eq!(micro_time(t), "1970-01-01T00:00:01.500042Z");
    }

    #[test]
    fn unreachable_taint_is_added_once_and_removed_with_not_ready() {
        let custom = json!({"key": "dedicated", "value": "x", "effect": "NoSchedule"});
        let now = "2024-05-01T12:00:00Z";
        let tainted = taints_for(
            std::slice::from_ref(&custom),
            Reachability::Unreachable,
            now,
        )
        .expect("the taint is added");
        assert_eq!(
            tainted,
            vec![
                custom.clone(),
                json!({"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": now}),
            ]
        );
        assert_eq!(
            taints_for(&tainted, Reachability::Unreachable, "2024-05-01T12:05:00Z"),
            None,
            "an existing taint keeps its timeAdded"
        );
        let mut both = tainted.clone();
        both.push(json!({"key": NOT_READY_TAINT, "effect": "NoExecute"}));
        both.push(json!({"key": UNREACHABLE_TAINT, "effect": "NoSchedule"}));
        assert_eq!(
            taints_for(&both, Reachability::Reachable, now),
            Some(vec![
                custom.clone(),
                json!({"key": UNREACHABLE_TAINT, "effect": "NoSchedule"})
            ])
        );
        assert_eq!(taints_for(&[custom], Reachability::Reachable, now), None);
    }

    #[test]
    fn presence_tracks_sessions() {
        let presence = Presence::default();
        presence.connected(
            "gw-1",
            proto::NodeInfo::default(),
            "127.0.0.1".into(),
            BTreeMap::new(),
        );
        assert!(presence.is_connected("gw-1"));
        presence.disconnected("gw-1");
        assert!(!presence.is_connected("gw-1"));
        assert!(!presence.is_connected("other"));
    }
}
