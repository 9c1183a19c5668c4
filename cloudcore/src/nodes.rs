//! Edge nodes as Kubernetes Nodes, in both control-plane modes, through kube-rs.
//!
//! The tunnel ([`crate::hub`]) records who is connected in [`Presence`]; the controller here
//! turns that into API objects: the Node when an edge connects (labels, and the whole status
//! the edge sent in `Hello`, with condition transition times reconciled against what the API
//! shows), its Lease in `kube-node-lease` renewed while it stays connected, and — when
//! cloudcore is the control plane — every condition Unknown once an edge has been gone for the
//! grace period, with the `node.kubernetes.io/unreachable:NoExecute` taint until it is back (a
//! real cluster's node-lifecycle controller does both from the Lease in kube mode).
//!
//! The edge owns its status, as a kubelet does (edgecore's `node` module builds it and reports
//! it upstream); this controller adds only what the tunnel knows: that the edge connected,
//! the address it connected from when the edge knows none, and liveness; and in kube mode
//! where cloudcore's kubelet endpoint for the node is ([`apply_kubelet_endpoint`]). See
//! docs/nodes.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
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
use crate::upstream::remove_directives;

/// Label every edge node carries.
pub const EDGE_ROLE_LABEL: &str = "node-role.kubernetes.io/edge";
/// Namespace of node leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Node writes and lease renewals in flight at once.
const NODE_WRITES_IN_FLIGHT: usize = 16;

/// Embedded mode: Lease renewals written in one store transaction at most. Each renewal is a
/// watch event, and the store's live event stream holds `StoreOptions::watch_buffer` events
/// (4,096): a transaction publishes all its events at once, so one larger than the buffer would
/// end every watch in cloudcore (each then resumes from the event history, or relists). After
/// a reconnect storm all 10,000 edges of a large fleet are due in the same second.
const RENEWALS_PER_COMMIT: usize = 500;
/// The pause between two such transactions in one tick, for the watchers to catch up.
const BETWEEN_RENEWAL_COMMITS: Duration = Duration::from_millis(20);

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
    /// The Node is still to be written and the edge has no Lease yet (seen for the first
    /// time): the Node writer creates it, so the renewal loop leaves it alone until then.
    lease_absent: bool,
}

impl Edge {
    /// Whether its Lease is due for renewal (never renewed, or `interval` ago).
    fn renewal_due(&self, interval: Duration) -> bool {
        self.renewed.is_none_or(|t| t.elapsed() >= interval)
    }
}

/// Who is connected; written by the hub, read by the controller.
#[derive(Debug, Default)]
pub struct Presence {
    /// Held only for map updates, never across an await.
    edges: Mutex<HashMap<String, Edge>>,
    changed: Notify,
    /// Dials the hub turned away because its handshake queue was full.
    crowd: Mutex<Crowd>,
}

/// Refusals further apart than this belong to two crowds. An edge turned away dials again
/// within `edgecore::backoff::BUSY_CAP` (8 s), so a crowd still at the door is refused more
/// often than this.
const CROWD_GAP: time::Duration = time::Duration::seconds(10);

/// A spell of dials turned away for a full handshake queue: a reconnect storm at the door.
/// While it lasts cloudcore cannot tell an edge that is gone from one waiting to be served
/// (the refusal comes before the handshake, so it names no node), so the lifecycle check does
/// not count the grace period of an edge without a session before the last refusal — and,
/// so that a crowd that never clears cannot hold every mark back for ever, not later than one
/// grace period after the crowd began ([`Crowd::counted_from`]).
#[derive(Debug, Default, Clone, Copy)]
struct Crowd {
    /// The crowd's first refusal.
    since: Option<OffsetDateTime>,
    /// Its latest.
    last: Option<OffsetDateTime>,
}

impl Crowd {
    /// Records a refusal at `now`; whether it began a new crowd.
    fn refused(&mut self, now: OffsetDateTime) -> bool {
        let new = self.last.is_none_or(|last| now - last > CROWD_GAP);
        if new {
            self.since = Some(now);
        }
        self.last = Some(now);
        new
    }

    /// The earliest instant the grace period of an edge without a session may count from
    /// because of this crowd: its last refusal, at most one grace period after its first.
    fn counted_from(&self, grace: time::Duration) -> Option<OffsetDateTime> {
        Some(self.last?.min(self.since? + grace))
    }
}

impl Presence {
    fn edges(&self) -> std::sync::MutexGuard<'_, HashMap<String, Edge>> {
        self.edges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Held only to record or copy the crowd, never across an await.
    fn crowd(&self) -> std::sync::MutexGuard<'_, Crowd> {
        self.crowd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session of `name` started. A `node_status` that could not be written to the Node
    /// ([`check_node_status`]) is dropped with a warning: the Node then gets the status the
    /// other node info fields give, as for an edge that sends none.
    pub fn connected(
        &self,
        name: &str,
        mut info: proto::NodeInfo,
        address: String,
        labels: BTreeMap<String, String>,
    ) {
        if !info.node_status.is_empty()
            && let Err(why) = check_node_status(&info.node_status)
        {
            tracing::warn!(node.name = %name, "ignoring the node status the edge sent: {why}");
            info.node_status = Vec::new();
        }
        self.edges().insert(
            name.to_string(),
            Edge {
                connected: true,
                info,
                address,
                labels,
                dirty: true,
                renewed: None,
                lease_absent: false,
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

    /// The hub turned a dial away because its handshake queue was full ([`Crowd`]).
    pub fn turned_away(&self) {
        let new = self.crowd().refused(OffsetDateTime::now_utc());
        if new {
            tracing::info!(
                "handshake queue full, dials turned away: edges without a session are not \
                 marked lost while this goes on (one grace period at most)"
            );
        }
    }

    /// The grace period of an edge without a session counts from this instant at the
    /// earliest: the controller's `started`, or later while a crowd is at the door.
    fn grace_counted_from(&self, started: OffsetDateTime, grace: time::Duration) -> OffsetDateTime {
        let crowd = *self.crowd();
        crowd
            .counted_from(grace)
            .map_or(started, |t| t.max(started))
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
    /// Kube mode's kubelet endpoint: each Node gets cloudcore's address and the node's port
    /// ([`apply_kubelet_endpoint`]).
    pub kubelet: Option<std::sync::Arc<crate::kubelet::Endpoints>>,
    /// Embedded mode: the API's store, through which the renewals due in a tick are written in
    /// one transaction ([`renew_leases_in_store`]) instead of one API request each.
    pub store: Option<crate::apiserver::store::Store>,
}

impl Default for NodeControllerConfig {
    fn default() -> Self {
        NodeControllerConfig {
            renew_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            grace_period: Duration::from_secs(50),
            lifecycle: true,
            kubelet: None,
            store: None,
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

/// Kubernetes names architectures the Go way (the edge checked against
/// `proto::KNOWN_ARCHITECTURES` may name them the Rust way).
fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Node address types Kubernetes defines.
const ADDRESS_TYPES: [&str; 5] = [
    "Hostname",
    "InternalIP",
    "ExternalIP",
    "InternalDNS",
    "ExternalDNS",
];

/// A Kubernetes quantity (`123`, `1.5`, `100m`, `64Gi`, `1e3`): what the API accepts in
/// `capacity` and `allocatable`.
fn is_quantity(text: &str) -> bool {
    let digits = text.trim_start_matches(['+', '-']);
    let number_end = digits
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(digits.len());
    let (number, suffix) = digits.split_at(number_end);
    let number_ok = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && digits.len() + 1 >= text.len();
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|exp| exp.trim_start_matches(['+', '-']))
        .is_some_and(|exp| {
            !exp.is_empty() && exp.len() <= 3 && exp.bytes().all(|b| b.is_ascii_digit())
        });
    number_ok && suffix_ok
}

/// Checks the `NodeStatus` JSON of an edge's `Hello` before it reaches the Node: the shape of a
/// `NodeStatus`, a known architecture, a GOOS-like operating system, node info without
/// control characters, addresses of the known types holding IPs or host names, quantities
/// in capacity and allocatable, and condition statuses the API accepts. The error names the
/// field; values are shown escaped.
pub fn check_node_status(bytes: &[u8]) -> Result<(), String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("it is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("it is not a JSON object".into());
    }
    serde_json::from_value::<k8s_openapi::api::core::v1::NodeStatus>(value.clone())
        .map_err(|e| format!("it is not a NodeStatus: {e}"))?;
    let bad = |field: &str, value: &str, why: &str| {
        let shown: String = value.chars().take(64).collect();
        Err(format!("{field} has the invalid value {shown:?}: {why}"))
    };
    let text_ok = |t: &str| t.len() <= 1024 && !t.chars().any(daemon::logfmt::needs_escape);
    if let Some(info) = value["nodeInfo"].as_object() {
        for (field, v) in info {
            let t = v.as_str().unwrap_or_default();
            if !text_ok(t) {
                return bad(
                    &format!("nodeInfo.{field}"),
                    t,
                    "control characters or over 1024 bytes",
                );
            }
        }
        let arch = value["nodeInfo"]["architecture"]
            .as_str()
            .unwrap_or_default();
        if !arch.is_empty() && !proto::message::is_known_architecture(arch) {
            return bad(
                "nodeInfo.architecture",
                arch,
                "not a GOARCH name such as amd64, arm64 or arm",
            );
        }
        let os = value["nodeInfo"]["operatingSystem"]
            .as_str()
            .unwrap_or_default();
        if os.len() > 32
            || !os
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return bad(
                "nodeInfo.operatingSystem",
                os,
                "not a GOOS name such as linux",
            );
        }
    }
    for (i, address) in value["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let kind = address["type"].as_str().unwrap_or_default();
        let text = address["address"].as_str().unwrap_or_default();
        if !ADDRESS_TYPES.contains(&kind) {
            return bad(
                &format!("addresses[{i}].type"),
                kind,
                "not a node address type",
            );
        }
        let ok = match kind {
            "InternalIP" | "ExternalIP" => text.parse::<std::net::IpAddr>().is_ok(),
            _ => {
                !text.is_empty()
                    && text.len() <= 253
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            }
        };
        if !ok {
            return bad(
                &format!("addresses[{i}].address"),
                text,
                "not an IP address or host name",
            );
        }
    }
    for map in ["capacity", "allocatable"] {
        for (name, quantity) in value[map].as_object().into_iter().flatten() {
            let q = quantity.as_str().unwrap_or_default();
            if !text_ok(name) || !is_quantity(q) {
                return bad(&format!("{map}[{name:?}]"), q, "not a quantity");
            }
        }
    }
    for (i, condition) in value["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let status = condition["status"].as_str().unwrap_or_default();
        if !matches!(status, "True" | "False" | "Unknown") {
            return bad(
                &format!("conditions[{i}].status"),
                status,
                "not True, False or Unknown",
            );
        }
        for field in ["type", "reason", "message"] {
            let t = condition[field].as_str().unwrap_or_default();
            if !text_ok(t) {
                return bad(
                    &format!("conditions[{i}].{field}"),
                    t,
                    "control characters or over 1024 bytes",
                );
            }
        }
    }
    Ok(())
}

/// The condition types a kubelet reports and the node-lifecycle controller marks Unknown.
const CONDITION_TYPES: [&str; 4] = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"];

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

/// Sets each reported condition's `lastTransitionTime` as the API should show it: unchanged
/// when the API already has that status; when the API's status differs, the edge's own
/// transition if it came after the API's last one (a change the API has not seen), else `now`
/// (the API went elsewhere, e.g. Unknown, after the edge's last change). Heartbeats are `now`.
fn reconcile_conditions(reported: &mut [Value], live: &[Value], now: &str) {
    for condition in reported {
        let api = live.iter().find(|c| c["type"] == condition["type"]);
        let edge_text = condition["lastTransitionTime"]
            .as_str()
            .filter(|t| parse_time(t).is_some())
            .map(str::to_string);
        let transition = match api {
            Some(api) if api["status"] == condition["status"] => api["lastTransitionTime"]
                .as_str()
                .filter(|t| parse_time(t).is_some())
                .map(str::to_string)
                .or(edge_text),
            Some(api) => {
                let api_time = api["lastTransitionTime"].as_str().and_then(parse_time);
                let edge_time = edge_text.as_deref().and_then(parse_time);
                edge_text.filter(|_| matches!((edge_time, api_time), (Some(e), Some(a)) if e > a))
            }
            None => edge_text,
        };
        condition["lastTransitionTime"] = json!(transition.unwrap_or_else(|| now.to_string()));
        condition["lastHeartbeatTime"] = json!(now);
    }
}

/// What cloudcore adds to a Node's status for kube mode's kubelet endpoint
/// ([`crate::kubelet`]): `daemonEndpoints.kubeletEndpoint.Port` = the node's port, and
/// cloudcore's address where the apiserver looks first. `Hostname`: cloudcore's address is the
/// one Hostname address (an edge's own Hostname goes; its IPs stay). `InternalIP`: cloudcore's
/// is the first InternalIP and the edge's InternalIPs become ExternalIPs. A `$patch` directive
/// in the list stays last.
pub fn apply_kubelet_endpoint(status: &mut Value, kubelet: crate::kubelet::KubeletAddress) {
    use crate::kubelet::AddressType;
    let ours = kubelet.ip.to_string();
    let reported = status["addresses"].as_array().cloned().unwrap_or_default();
    let (directives, reported): (Vec<Value>, Vec<Value>) = reported
        .into_iter()
        .partition(|a| a.get("$patch").is_some());
    let mut addresses = Vec::with_capacity(reported.len() + 2);
    match kubelet.address_type {
        AddressType::Hostname => {
            addresses.push(json!({"type": "Hostname", "address": ours}));
            addresses.extend(reported.into_iter().filter(|a| a["type"] != "Hostname"));
        }
        AddressType::InternalIp => {
            addresses.push(json!({"type": "InternalIP", "address": ours}));
            for mut a in reported {
                if a["type"] == "InternalIP" {
                    a["type"] = json!("ExternalIP");
                }
                if a["address"] == ours.as_str() {
                    continue;
                }
                if !addresses.contains(&a) {
                    addresses.push(a);
                }
            }
        }
    }
    addresses.extend(directives);
    status["addresses"] = json!(addresses);
    status["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": kubelet.port}});
}

/// The status to write when an edge connects: the edge's own (from `Hello`) reconciled with the
/// live conditions, or, from an edge too old to send one, what its node info gives; with the
/// kubelet endpoint in kube mode.
fn node_status(
    edge: &Edge,
    live_conditions: &[Value],
    kubelet: Option<crate::kubelet::KubeletAddress>,
) -> Value {
    let now = now_text();
    let mut status = match serde_json::from_slice::<Value>(&edge.info.node_status) {
        Ok(mut status @ Value::Object(_)) => {
            remove_directives(&mut status);
            status
        }
        _ => legacy_node_status(edge, live_conditions),
    };
    if let Some(conditions) = status["conditions"].as_array_mut() {
        reconcile_conditions(conditions, live_conditions, &now);
    }
    let mut addresses = status["addresses"].as_array().cloned().unwrap_or_default();
    if !addresses.iter().any(|a| a["type"] == "InternalIP") {
        addresses.insert(0, json!({"type": "InternalIP", "address": edge.address}));
    }
    // The list is the edge's: addresses it no longer reports (such as an old Hostname) go.
    addresses.push(json!({"$patch": "replace"}));
    status["addresses"] = json!(addresses);
    if let Some(kubelet) = kubelet {
        apply_kubelet_endpoint(&mut status, kubelet);
    }
    status
}

/// The status of an edge that sends no `node_status` in `Hello` (edgecore before it did).
fn legacy_node_status(edge: &Edge, live_conditions: &[Value]) -> Value {
    let previous_ready = live_conditions.iter().find(|c| c["type"] == "Ready");
    let capacity = json!({
        "cpu": edge.info.cpus.to_string(),
        "memory": format!("{}Ki", edge.info.memory_bytes / 1024),
        "pods": "110",
    });
    json!({
        "addresses": [{"type": "InternalIP", "address": edge.address}],
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
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
    })
}

/// A Node's status as JSON.
fn status_of(node: &Node) -> Option<Value> {
    node.status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
}

/// The conditions of a Node's status (none when it has no status).
fn conditions_in(status: Option<&Value>) -> Vec<Value> {
    status
        .and_then(|s| s["conditions"].as_array().cloned())
        .unwrap_or_default()
}

fn conditions_of(node: &Node) -> Vec<Value> {
    conditions_in(status_of(node).as_ref())
}

fn ready_of(node: &Node) -> Option<Value> {
    conditions_of(node)
        .into_iter()
        .find(|c| c["type"] == "Ready")
}

/// Creates or updates the Node of a connected edge and writes the status it sent.
/// Writes an edge's Node as it connects and returns the Node as the API then has it. Like a
/// kubelet (`nodeStatusReportFrequency`), a reconnecting edge whose labels and status are what
/// the API already shows, heartbeat times aside, costs no write while the last heartbeat is
/// younger than [`NODE_STATUS_REPORT_EVERY`]: liveness is the Lease's job. In a reconnect storm
/// that is one read per edge instead of two writes, each sent to every Node watcher.
async fn write_node(
    nodes: &Api<Node>,
    name: &str,
    edge: &Edge,
    kubelet: Option<crate::kubelet::KubeletAddress>,
) -> Result<Node, kube::Error> {
    let labels = node_labels(name, edge);
    let existing = nodes.get_opt(name).await?;
    let live_status = existing.as_ref().and_then(status_of);
    let live_conditions = conditions_in(live_status.as_ref());
    let mut written = None;
    match &existing {
        None => {
            // With its status, as a kubelet registers: a real apiserver keeps it on create
            // (the status write below makes sure either way).
            let mut status = node_status(edge, &[], kubelet);
            remove_directives(&mut status);
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "status": status,
            }))
            .map_err(kube::Error::SerdeError)?;
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Some(node) => {
            let live = node.metadata.labels.as_ref();
            let missing = labels
                .iter()
                .any(|(k, v)| live.and_then(|l| l.get(k)) != Some(v));
            if missing {
                let patch = json!({"metadata": {"labels": labels}});
                written = Some(
                    nodes
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?,
                );
            }
        }
    }
    // Strategic merge: conditions merge by type (a condition the edge does not send stays).
    let status = node_status(edge, &live_conditions, kubelet);
    if let (Some(node), Some(live)) = (&existing, &live_status)
        && !status_write_needed(live, &status, OffsetDateTime::now_utc())
    {
        return Ok(written.unwrap_or_else(|| node.clone()));
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(&json!({"status": status})),
        )
        .await
}

/// How long a Node's status goes unwritten when nothing in it changed: the kubelet's default
/// `nodeStatusReportFrequency`.
const NODE_STATUS_REPORT_EVERY: Duration = Duration::from_secs(5 * 60);

/// Whether `desired` (what [`node_status`] builds) would change the Node's `live` status:
/// any field that differs, any condition whose status, reason, message or transition differs,
/// or a heartbeat older than [`NODE_STATUS_REPORT_EVERY`]. Anything it cannot compare is a
/// change.
fn status_write_needed(live: &Value, desired: &Value, now: OffsetDateTime) -> bool {
    let Some(desired) = desired.as_object() else {
        return true;
    };
    desired.iter().any(|(field, want)| match field.as_str() {
        "conditions" => {
            let Some(want) = want.as_array() else {
                return true;
            };
            let have = live["conditions"].as_array().map_or(&[][..], Vec::as_slice);
            want.iter().any(|condition| {
                let Some(had) = have.iter().find(|c| c["type"] == condition["type"]) else {
                    return true;
                };
                let differs = ["status", "reason", "message", "lastTransitionTime"]
                    .iter()
                    .any(|f| had.get(*f) != condition.get(*f));
                let heartbeat = had["lastHeartbeatTime"].as_str().and_then(parse_time);
                differs || heartbeat.is_none_or(|beat| now - beat >= NODE_STATUS_REPORT_EVERY)
            })
        }
        "addresses" => {
            let want: Vec<&Value> = want
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a.get("$patch").is_none())
                .collect();
            let have: Vec<&Value> = live["addresses"].as_array().into_iter().flatten().collect();
            want != have
        }
        _ => live.get(field) != Some(want),
    })
}

/// The spec of a node's Lease renewed at `now` (a MicroTime text).
fn lease_spec(name: &str, duration: Duration, now: &str) -> Value {
    json!({"holderIdentity": name, "leaseDurationSeconds": duration.as_secs(), "renewTime": now})
}

/// Renews an existing Lease with one merge patch (404 when there is none).
async fn patch_lease(
    leases: &Api<Lease>,
    name: &str,
    duration: Duration,
    now: &str,
) -> Result<(), kube::Error> {
    let patch = json!({"spec": lease_spec(name, duration, now)});
    leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

/// Renews (creating if needed) the node's Lease.
async fn renew_lease(
    leases: &Api<Lease>,
    nodes: &Api<Node>,
    name: &str,
    duration: Duration,
) -> Result<(), kube::Error> {
    let now = micro_time(OffsetDateTime::now_utc());
    let spec = lease_spec(name, duration, &now);
    // A patch renews an existing lease in one call (most renewals); only a missing one is
    // created.
    match patch_lease(leases, name, duration, &now).await {
        Ok(()) => return Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e),
    }
    let owner = nodes
        .get_opt(name)
        .await?
        .and_then(|n| n.metadata.uid)
        .map(|uid| json!([{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]));
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
    Ok(())
}

/// Renews the existing Leases of `names` in the embedded API's store, all in one transaction
/// (one commit instead of one API request, patch and commit each: at 10,000 edges that was
/// 1,000 requests a second). Each Lease still gets its own resourceVersion and watch event, and
/// the fields a renewal through the API would set, so kubectl and watchers see the same Lease.
/// Returns the names that have no Lease yet (created through the API, with their owner).
fn renew_leases_in_store(
    store: &crate::apiserver::store::Store,
    names: &[String],
    duration: Duration,
) -> Result<Vec<String>, crate::apiserver::store::StoreError> {
    let leases = crate::apiserver::store::ResourceId {
        group: "coordination.k8s.io".into(),
        resource: "leases".into(),
    };
    let keys: Vec<(String, String)> = names
        .iter()
        .map(|n| (LEASE_NAMESPACE.to_string(), n.clone()))
        .collect();
    let now = micro_time(OffsetDateTime::now_utc());
    let missing = store.update_each(&leases, &keys, |_, name, mut lease| {
        let spec = lease.as_object_mut()?.entry("spec").or_insert(json!({}));
        let spec = spec.as_object_mut()?;
        spec.insert("holderIdentity".into(), json!(name));
        spec.insert("leaseDurationSeconds".into(), json!(duration.as_secs()));
        spec.insert("renewTime".into(), json!(now));
        Some(lease)
    })?;
    Ok(missing.into_iter().map(|(_, name)| name).collect())
}

/// Renews the Leases of `names` in the store, [`RENEWALS_PER_COMMIT`] per transaction with a
/// pause between, off the async workers. Returns the names whose Lease was not renewed: none
/// exists yet (to be created through the API), or the store failed (logged; retried on a later
/// tick through the API).
async fn renew_leases_in_store_batches(
    store: &crate::apiserver::store::Store,
    names: &[String],
    duration: Duration,
) -> std::collections::HashSet<String> {
    let mut missing = std::collections::HashSet::new();
    for (i, chunk) in names.chunks(RENEWALS_PER_COMMIT).enumerate() {
        if i > 0 {
            // Let the watchers drain this chunk's events before the next.
            tokio::time::sleep(BETWEEN_RENEWAL_COMMITS).await;
        }
        let (store, batch) = (store.clone(), chunk.to_vec());
        let renewed =
            tokio::task::spawn_blocking(move || renew_leases_in_store(&store, &batch, duration))
                .await;
        match renewed {
            Ok(Ok(none_yet)) => missing.extend(none_yet),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, leases = chunk.len(), "cannot renew node leases in the store; will retry");
                missing.extend(chunk.iter().cloned());
            }
            Err(e) => {
                tracing::warn!(error = %e, "the lease renewal task failed; will retry");
                missing.extend(chunk.iter().cloned());
            }
        }
    }
    missing
}

/// Whether a Lease, as the API shows it, has not expired at `now`: renewed within its own
/// `leaseDurationSeconds`.
fn lease_unexpired(lease: &Lease, now: OffsetDateTime) -> bool {
    let Some(spec) = lease
        .spec
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
    else {
        return false;
    };
    let (Some(renewed), Some(duration)) = (
        spec["renewTime"].as_str().and_then(parse_time),
        spec["leaseDurationSeconds"].as_i64(),
    ) else {
        return false;
    };
    now - renewed < time::Duration::seconds(duration.max(0))
}

/// Kube mode, once at start: renews the edge Leases that have not expired. They belong to
/// edges that were connected when the previous cloudcore stopped (a kill, a crash, a rollout),
/// which are reconnecting now; the cluster's node-lifecycle controller counts its grace period
/// from the last renewal it saw, so without this a reconnect wave longer than what is left of
/// it (an edge notices a dead cloud only after `--dead-after`) would mark edges Unknown and
/// evict their pods although nothing but cloudcore was down. This is what
/// kube-controller-manager does for itself after its own restart; the cost is that an edge
/// that died together with cloudcore is marked Unknown one lease duration later. An expired
/// Lease is left alone: that edge was already gone.
async fn renew_unexpired_at_start(
    nodes: &Api<Node>,
    leases: &Api<Lease>,
    duration: Duration,
) -> Result<usize, kube::Error> {
    let edges: std::collections::HashSet<String> = nodes
        .list_metadata(&ListParams::default().labels(EDGE_ROLE_LABEL))
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let now = OffsetDateTime::now_utc();
    let due: Vec<String> = leases
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|l| lease_unexpired(l, now))
        .filter_map(|l| l.metadata.name)
        .filter(|n| edges.contains(n))
        .collect();
    let renewed = std::sync::atomic::AtomicUsize::new(0);
    let spec_now = micro_time(OffsetDateTime::now_utc());
    futures::stream::iter(&due)
        .for_each_concurrent(NODE_WRITES_IN_FLIGHT, |name| {
            let (renewed, spec_now) = (&renewed, &spec_now);
            async move {
                match patch_lease(leases, name, duration, spec_now).await {
                    Ok(()) => {
                        renewed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(node.name = %name, error = %e, "cannot renew the lease of a reconnecting edge at start")
                    }
                }
            }
        })
        .await;
    Ok(renewed.into_inner())
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

/// What the node-lifecycle controller writes for a node that stopped reporting: each of the
/// four conditions Unknown (a transition now, unless already Unknown), keeping the last
/// heartbeat the edge gave.
fn unknown_conditions(live: &[Value], message: &str, now: &str) -> Vec<Value> {
    CONDITION_TYPES
        .iter()
        .map(|kind| {
            let previous = live.iter().find(|c| c["type"] == *kind);
            let transition = match previous {
                Some(p) if p["status"] == "Unknown" && p["lastTransitionTime"].is_string() => {
                    p["lastTransitionTime"].clone()
                }
                _ => json!(now),
            };
            json!({
                "type": kind,
                "status": "Unknown",
                "reason": "NodeStatusUnknown",
                "message": message,
                "lastHeartbeatTime": previous.map(|p| p["lastHeartbeatTime"].clone()).unwrap_or(Value::Null),
                "lastTransitionTime": transition,
            })
        })
        .collect()
}

/// Whether a node last seen at `last_seen` (lease renewal or heartbeat) is gone for longer
/// than `grace` at `now`. The grace period counts from `counted_from` at the earliest: the
/// controller's start, as kube-controller-manager's does (after a cloudcore restart every edge
/// is reconnecting, and a lease that aged while cloudcore was down is no sign the edge is
/// gone), or later while dials are turned away ([`Presence::grace_counted_from`]).
fn is_stale(
    last_seen: Option<OffsetDateTime>,
    counted_from: OffsetDateTime,
    now: OffsetDateTime,
    grace: time::Duration,
) -> bool {
    let last_seen = last_seen.map_or(counted_from, |t| t.max(counted_from));
    now - last_seen > grace
}

/// How often the lifecycle check lists every edge Node; between lists it reads only the Nodes
/// it knows of that have no session. A list of 10,000 Nodes is some 30 MB of JSON, which every
/// 2 s was a large share of cloudcore's CPU at rest.
const NODE_LIST_EVERY: Duration = Duration::from_secs(60);

/// The edge Node names the lifecycle check knows: from its last full list, plus every edge
/// that connected since (an edge's Node is written when it connects).
#[derive(Debug, Default)]
struct KnownNodes {
    names: std::collections::BTreeSet<String>,
    listed: Option<Instant>,
}

/// Marks edge nodes whose lease expired, and that have no session, Ready=Unknown and taints
/// them unreachable (also those already Unknown whose taint is missing).
async fn mark_lost(
    nodes: &Api<Node>,
    leases: &Api<Lease>,
    presence: &Presence,
    known: &mut KnownNodes,
    grace: Duration,
    started: OffsetDateTime,
) -> Result<(), kube::Error> {
    let grace_span = time::Duration::try_from(grace).unwrap_or(time::Duration::MAX);
    let counted_from = presence.grace_counted_from(started, grace_span);
    // No node can be stale before a grace period has passed since this controller started,
    // or since the last dial turned away (below): skip the list and the lease reads while
    // every edge is reconnecting.
    if OffsetDateTime::now_utc() - counted_from <= grace_span {
        return Ok(());
    }
    let edge_nodes: Vec<Node> = if known.listed.is_none_or(|t| t.elapsed() >= NODE_LIST_EVERY) {
        let listed = nodes
            .list(&ListParams::default().labels(EDGE_ROLE_LABEL))
            .await?
            .items;
        known.names = listed
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        known.listed = Some(Instant::now());
        listed
    } else {
        known.names.extend(presence.edges().keys().cloned());
        let silent: Vec<String> = known
            .names
            .iter()
            .filter(|n| !presence.is_connected(n))
            .cloned()
            .collect();
        let mut found = Vec::with_capacity(silent.len());
        for name in silent {
            match nodes.get_opt(&name).await? {
                Some(node)
                    if node
                        .metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key(EDGE_ROLE_LABEL)) =>
                {
                    found.push(node)
                }
                _ => {
                    known.names.remove(&name);
                }
            }
        }
        found
    };
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
        if !is_stale(last_seen, counted_from, now, grace_span) {
            continue;
        }
        tracing::warn!(node.name = %name, "edge gone for longer than the grace period: conditions Unknown");
        let message = format!(
            "edgecore stopped reporting: no tunnel for over {}",
            humantime::format_duration(grace)
        );
        let patch = json!({"status": {"conditions": unknown_conditions(&conditions_of(&node), &message, &now_text())}});
        let node = nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await?;
        set_reachability(nodes, &name, Some(node), Reachability::Unreachable).await?;
    }
    Ok(())
}

/// Runs the controller until cancelled. API failures are logged and retried on the next tick.
///
/// Lease renewals and Node writes are two loops ([`keep_leases`], [`write_nodes`]): after a
/// reconnect storm every edge's Node is a few API requests, and one pass over hundreds of them
/// can outlast the grace period of the edges written first. Were the renewals in the same
/// pass, those edges' Leases would wait behind it and go stale; a real cluster's node
/// lifecycle controller then marks their Nodes Unknown although every edge is connected.
pub async fn run(
    client: kube::Client,
    presence: std::sync::Arc<Presence>,
    config: NodeControllerConfig,
    shutdown: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    if !config.lifecycle {
        match renew_unexpired_at_start(&nodes, &leases, config.lease_duration).await {
            Ok(n) => {
                tracing::info!(
                    leases = n,
                    "renewed the unexpired leases of edges reconnecting after a restart"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leases of reconnecting edges at start")
            }
        }
    }
    tokio::join!(
        keep_leases(&nodes, &leases, &presence, &config, &shutdown),
        write_nodes(&nodes, &leases, &presence, &config, &shutdown),
    );
}

/// Renews, every second, the Lease of each connected edge whose renewal is due, also of an
/// edge whose Node is still to be written (its Lease from before a reconnect is renewed at
/// once). An edge seen for the first time has no Lease yet: [`write_nodes`] creates it after
/// the Node, its owner. Embedded mode renews through the store, a batch per transaction.
async fn keep_leases(
    nodes: &Api<Node>,
    leases: &Api<Lease>,
    presence: &Presence,
    config: &NodeControllerConfig,
    shutdown: &CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Snapshot under the lock, write without it: (name, Node still to be written).
        let due: Vec<(String, bool)> = presence
            .edges()
            .iter()
            .filter(|(_, e)| {
                e.connected && !(e.dirty && e.lease_absent) && e.renewal_due(config.renew_interval)
            })
            .map(|(n, e)| (n.clone(), e.dirty))
            .collect();
        if due.is_empty() {
            continue;
        }
        let renewed_at = Instant::now();
        // What is left for the API: Leases the store lacks, or every due one in kube mode.
        let left: Vec<(String, bool)> = match &config.store {
            Some(store) => {
                let names: Vec<String> = due.iter().map(|(n, _)| n.clone()).collect();
                let missing =
                    renew_leases_in_store_batches(store, &names, config.lease_duration).await;
                let mut edges = presence.edges();
                for (name, _) in due.iter().filter(|(n, _)| !missing.contains(n)) {
                    if let Some(e) = edges.get_mut(name) {
                        e.renewed = Some(renewed_at);
                    }
                }
                due.into_iter()
                    .filter(|(n, _)| missing.contains(n))
                    .collect()
            }
            None => due,
        };
        futures::stream::iter(left)
            .for_each_concurrent(NODE_WRITES_IN_FLIGHT, |(name, dirty)| async move {
                // An edge whose Node is still to be written only renews a Lease it has; one
                // whose Node is written gets its Lease back if someone deleted it.
                let renewed = if dirty {
                    let now = micro_time(OffsetDateTime::now_utc());
                    patch_lease(leases, &name, config.lease_duration, &now).await
                } else {
                    renew_lease(leases, nodes, &name, config.lease_duration).await
                };
                let mut edges = presence.edges();
                let Some(edge) = edges.get_mut(&name) else {
                    return;
                };
                match renewed {
                    Ok(()) => edge.renewed = Some(Instant::now()),
                    Err(kube::Error::Api(e)) if dirty && e.code == 404 => edge.lease_absent = true,
                    Err(e) => {
                        tracing::warn!(node.name = %name, error = %e, "cannot renew the node lease; will retry")
                    }
                }
            })
            .await;
    }
}

/// Writes the Node of each edge that (re)connected, then creates the Lease of an edge seen for
/// the first time (or renews one [`keep_leases`] could not); embedded mode also runs the
/// lifecycle check here.
async fn write_nodes(
    nodes: &Api<Node>,
    leases: &Api<Lease>,
    presence: &Presence,
    config: &NodeControllerConfig,
    shutdown: &CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_lifecycle = Instant::now();
    let mut known = KnownNodes::default();
    let started = OffsetDateTime::now_utc();
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
            .filter(|(_, e)| e.connected && e.dirty)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        // Several at once: one after another, a reconnect storm's thousands of Nodes (a few
        // API requests each) would take minutes.
        futures::stream::iter(work)
            .for_each_concurrent(NODE_WRITES_IN_FLIGHT, |(name, edge)| async move {
                // A node that just joined: its kubelet port reaches `Endpoints` within a
                // second; write the Node once it has.
                if config.kubelet.as_ref().is_some_and(|k| !k.knows(&name)) {
                    return;
                }
                let kubelet = config.kubelet.as_ref().and_then(|k| k.of(&name));
                let written = match write_node(nodes, &name, &edge, kubelet).await {
                    // Embedded mode: the taint goes with Ready=Unknown (kube mode: the
                    // cluster's node-lifecycle controller removes it).
                    Ok(node) if config.lifecycle => {
                        set_reachability(nodes, &name, Some(node), Reachability::Reachable).await
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    tracing::warn!(node.name = %name, error = %e, "cannot write the node object; will retry");
                    return;
                }
                tracing::info!(node.name = %name, "node object written: Ready=True");
                // A reconnecting edge's Lease was renewed by `keep_leases` already; what is
                // left here is a Lease it could not renew: none yet, for a new edge.
                let lease_due = presence.edges().get_mut(&name).is_some_and(|e| {
                    e.dirty = false;
                    e.renewal_due(config.renew_interval)
                });
                if !lease_due {
                    return;
                }
                match renew_lease(leases, nodes, &name, config.lease_duration).await {
                    Ok(()) => {
                        if let Some(e) = presence.edges().get_mut(&name) {
                            e.renewed = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node.name = %name, error = %e, "cannot renew the node lease; will retry")
                    }
                }
            })
            .await;
        if config.lifecycle && last_lifecycle.elapsed() >= Duration::from_secs(2) {
            last_lifecycle = Instant::now();
            if let Err(e) = mark_lost(
                nodes,
                leases,
                presence,
                &mut known,
                config.grace_period,
                started,
            )
            .await
            {
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
                node_status: Vec::new(),
            },
            address: "192.0.2.7".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            dirty: true,
            renewed: None,
            lease_absent: false,
        }
    }

    #[test]
    fn a_status_is_rewritten_only_when_something_but_the_heartbeat_changed() {
        let now = OffsetDateTime::now_utc();
        let beat = |age: Duration| micro_time(now - age);
        let live = |heartbeat: String| {
            json!({
                "addresses": [{"type": "InternalIP", "address": "192.0.2.7"}],
                "capacity": {"cpu": "4"},
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "EdgecoreReady", "message": "up",
                     "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": heartbeat},
                    {"type": "DiskPressure", "status": "False", "reason": "Ok", "message": "",
                     "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "2026-01-01T00:00:00Z"},
                ],
            })
        };
        let desired = json!({
            "addresses": [{"type": "InternalIP", "address": "192.0.2.7"}, {"$patch": "replace"}],
            "capacity": {"cpu": "4"},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "EdgecoreReady", "message": "up",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "now"},
            ],
        });
        let fresh = live(beat(Duration::from_secs(60)));
        assert!(
            !status_write_needed(&fresh, &desired, now),
            "only the heartbeat differs"
        );
        let stale = live(beat(NODE_STATUS_REPORT_EVERY + Duration::from_secs(1)));
        assert!(
            status_write_needed(&stale, &desired, now),
            "heartbeat too old"
        );
        let changed = |path: &str, value: Value| {
            let mut d = desired.clone();
            *d.pointer_mut(path).expect("path") = value;
            status_write_needed(&fresh, &d, now)
        };
        assert!(changed("/conditions/0/status", json!("False")));
        assert!(changed("/conditions/0/message", json!("other")));
        assert!(
            changed("/conditions/0/type", json!("PIDPressure")),
            "a condition the API lacks"
        );
        assert!(changed("/capacity/cpu", json!("2")));
        assert!(changed("/addresses/0/address", json!("192.0.2.8")));
        let mut more = desired.clone();
        more["allocatable"] = json!({"cpu": "4"});
        assert!(
            status_write_needed(&fresh, &more, now),
            "a field the API lacks"
        );
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
    fn legacy_status_reports_capacity_and_keeps_transition_time() {
        let previous = json!({"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"});
        let status = node_status(&edge(), &[previous], None);
        assert_eq!(status["capacity"]["memory"], "2097152Ki");
        assert_eq!(status["capacity"]["cpu"], "4");
        assert_eq!(
            status["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        let after_unknown = node_status(
            &edge(),
            &[
                json!({"type": "Ready", "status": "Unknown", "lastTransitionTime": "2020-01-01T00:00:00Z"}),
            ],
            None,
        );
        assert_ne!(
            after_unknown["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
    }

    #[test]
    fn the_kubelet_endpoint_puts_cloudcores_address_first_and_the_nodes_port() {
        use crate::kubelet::{AddressType, KubeletAddress};
        let reported = json!({
            "addresses": [
                {"type": "InternalIP", "address": "10.1.1.1"},
                {"type": "Hostname", "address": "gw-1"},
                {"$patch": "replace"},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        });
        let kubelet = KubeletAddress {
            address_type: AddressType::Hostname,
            ip: "192.0.2.5".parse().expect("ip"),
            port: 20251,
        };
        let mut status = reported.clone();
        apply_kubelet_endpoint(&mut status, kubelet);
        assert_eq!(
            status["addresses"],
            json!([
                {"type": "Hostname", "address": "192.0.2.5"},
                {"type": "InternalIP", "address": "10.1.1.1"},
                {"$patch": "replace"},
            ])
        );
        assert_eq!(status["daemonEndpoints"]["kubeletEndpoint"]["Port"], 20251);
        // Applying it again (a later report of the same status) changes nothing.
        let once = status.clone();
        apply_kubelet_endpoint(&mut status, kubelet);
        assert_eq!(status, once);

        let mut status = reported;
        apply_kubelet_endpoint(
            &mut status,
            KubeletAddress {
                address_type: AddressType::InternalIp,
                ..kubelet
            },
        );
        assert_eq!(
            status["addresses"],
            json!([
                {"type": "InternalIP", "address": "192.0.2.5"},
                {"type": "ExternalIP", "address": "10.1.1.1"},
                {"type": "Hostname", "address": "gw-1"},
                {"$patch": "replace"},
            ])
        );
    }

    #[test]
    fn edge_status_is_written_with_the_tunnel_address_when_it_has_none() {
        let mut edge = edge();
        edge.info.node_status = serde_json::to_vec(&json!({
            "nodeInfo": {"osImage": "Debian GNU/Linux 12 (bookworm)"},
            "addresses": [],
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }))
        .expect("json");
        let status = node_status(&edge, &[], None);
        assert_eq!(
            status["nodeInfo"]["osImage"],
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(
            status["addresses"],
            json!([{"type": "InternalIP", "address": "192.0.2.7"}, {"$patch": "replace"}])
        );
        assert_eq!(
            status["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        edge.info.node_status = serde_json::to_vec(&json!({
            "addresses": [{"type": "InternalIP", "address": "10.1.1.1"}, {"$patch": "delete"}],
            "conditions": [{"type": "Ready", "status": "True", "$retainKeys": ["type"]}],
        }))
        .expect("json");
        let status = node_status(&edge, &[], None);
        assert_eq!(
            status["addresses"],
            json!([{"type": "InternalIP", "address": "10.1.1.1"}, {"$patch": "replace"}]),
            "the edge's directives are dropped"
        );
        assert!(status["conditions"][0].get("$retainKeys").is_none());
    }

    #[test]
    fn transition_times_follow_what_the_api_showed() {
        let now = "2026-01-01T02:00:00Z";
        let condition = |kind: &str, status: &str, at: &str| json!({"type": kind, "status": status, "lastTransitionTime": at});
        // (reported by the edge, live in the API, the transition time written)
        let cases = [
            // Same status: the API's time stays, whatever the edge's is.
            (
                condition("Ready", "True", "2026-01-01T01:00:00Z"),
                Some(condition("Ready", "True", "2026-01-01T00:00:00Z")),
                "2026-01-01T00:00:00Z",
            ),
            // The API went Unknown after the edge's last change: the transition is now.
            (
                condition("Ready", "True", "2026-01-01T00:00:00Z"),
                Some(condition("Ready", "Unknown", "2026-01-01T01:00:00Z")),
                now,
            ),
            // The edge changed after the API's last transition (offline): its own time.
            (
                condition("DiskPressure", "True", "2026-01-01T01:30:00Z"),
                Some(condition("DiskPressure", "False", "2026-01-01T00:00:00Z")),
                "2026-01-01T01:30:00Z",
            ),
            // A zero time in the API (an old write) is no time.
            (
                condition("MemoryPressure", "False", "2026-01-01T00:30:00Z"),
                Some(json!({"type": "MemoryPressure", "status": "False"})),
                "2026-01-01T00:30:00Z",
            ),
            // Nothing in the API yet: the edge's time.
            (
                condition("PIDPressure", "False", "2026-01-01T00:10:00Z"),
                None,
                "2026-01-01T00:10:00Z",
            ),
            // Neither has a time: now.
            (json!({"type": "Ready", "status": "True"}), None, now),
        ];
        for (reported, live, want) in cases {
            let mut conditions = [reported.clone()];
            let live: Vec<Value> = live.into_iter().collect();
            reconcile_conditions(&mut conditions, &live, now);
            assert_eq!(
                conditions[0]["lastTransitionTime"], want,
                "{reported} over {live:?}"
            );
            assert_eq!(conditions[0]["lastHeartbeatTime"], now);
        }
    }

    #[test]
    fn a_lost_node_has_all_four_conditions_unknown() {
        let live = [
            json!({"type": "Ready", "status": "True", "lastHeartbeatTime": "h", "lastTransitionTime": "t"}),
            json!({"type": "DiskPressure", "status": "Unknown", "lastHeartbeatTime": "h", "lastTransitionTime": "t"}),
        ];
        let conditions = unknown_conditions(&live, "gone", "now");
        assert_eq!(conditions.len(), 4);
        assert!(conditions.iter().all(|c| c["status"] == "Unknown"));
        let ready = &conditions[3];
        assert_eq!(
            (&ready["lastHeartbeatTime"], &ready["lastTransitionTime"]),
            (&json!("h"), &json!("now"))
        );
        assert_eq!(conditions[1]["lastTransitionTime"], "t");
        assert_eq!(conditions[0]["lastTransitionTime"], "now");
    }

    #[test]
    fn the_grace_period_counts_from_the_controllers_start_at_the_earliest() {
        let t = |s: i64| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s);
        let grace = time::Duration::seconds(40);
        // Renewed an hour before cloudcore restarted at 3600: not stale until 3640.
        assert!(!is_stale(Some(t(0)), t(3600), t(3630), grace));
        assert!(is_stale(Some(t(0)), t(3600), t(3641), grace));
        // Renewed after the start: counted from the renewal.
        assert!(!is_stale(Some(t(3620)), t(3600), t(3650), grace));
        assert!(is_stale(Some(t(3620)), t(3600), t(3661), grace));
        // Never seen: counted from the start.
        assert!(!is_stale(None, t(3600), t(3639), grace));
        assert!(is_stale(None, t(3600), t(3641), grace));
    }

    #[test]
    fn a_crowd_at_the_door_holds_the_grace_period_back_for_one_grace_period_at_most() {
        let t = |s: i64| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s);
        let grace = time::Duration::seconds(50);
        let mut crowd = Crowd::default();
        assert_eq!(crowd.counted_from(grace), None, "no refusal, no hold");
        assert!(crowd.refused(t(100)), "the first refusal begins a crowd");
        assert!(!crowd.refused(t(108)), "8 s later: the same crowd");
        assert_eq!(
            crowd.counted_from(grace),
            Some(t(108)),
            "held until the last refusal"
        );
        for s in (116..=200).step_by(8) {
            assert!(!crowd.refused(t(s)));
        }
        assert_eq!(
            crowd.counted_from(grace),
            Some(t(150)),
            "a crowd that stays holds one grace period past its start, no more"
        );
        assert!(crowd.refused(t(211)), "11 s of quiet: a new crowd");
        assert_eq!(crowd.counted_from(grace), Some(t(211)));

        // Through Presence: the later of the controller's start and the crowd's hold.
        let presence = Presence::default();
        let started = OffsetDateTime::now_utc();
        assert_eq!(presence.grace_counted_from(started, grace), started);
        presence.turned_away();
        let held = presence.grace_counted_from(started, grace);
        assert!(held >= started);
        let long_ago = started - time::Duration::hours(1);
        assert_eq!(presence.grace_counted_from(long_ago, grace), held);
        // An edge last seen an hour ago is stale one grace period after the refusal, not
        // before.
        let second = time::Duration::seconds(1);
        assert!(!is_stale(Some(long_ago), held, held + grace, grace));
        assert!(is_stale(Some(long_ago), held, held + grace + second, grace));
    }

    #[test]
    fn only_a_lease_renewed_within_its_duration_is_unexpired() {
        let now = OffsetDateTime::now_utc();
        let lease = |renewed: Option<OffsetDateTime>, duration: Option<i32>| -> Lease {
            serde_json::from_value(json!({
                "metadata": {"name": "n", "namespace": LEASE_NAMESPACE},
                "spec": {
                    "holderIdentity": "n",
                    "leaseDurationSeconds": duration,
                    "renewTime": renewed.map(micro_time),
                },
            }))
            .expect("lease")
        };
        let secs = time::Duration::seconds;
        assert!(lease_unexpired(&lease(Some(now - secs(5)), Some(40)), now));
        assert!(lease_unexpired(&lease(Some(now - secs(39)), Some(40)), now));
        assert!(!lease_unexpired(
            &lease(Some(now - secs(41)), Some(40)),
            now
        ));
        assert!(
            !lease_unexpired(&lease(None, Some(40)), now),
            "never renewed"
        );
        assert!(
            !lease_unexpired(&lease(Some(now), None), now),
            "no duration"
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
    fn quantities() {
        for good in [
            "1",
            "4",
            "110",
            "100m",
            "64Gi",
            "16318424Ki",
            "1.5",
            "1e3",
            "+2",
            "0.5Mi",
        ] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in [
            "", "abc", "1Qi", "1 Gi", "--1", "1..2", ".", "Gi", "1e", "1\nGi",
        ] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn node_status_from_the_edge_is_checked_before_it_reaches_the_node() {
        let good = json!({
            "nodeInfo": {"architecture": "arm64", "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12 (bookworm)"},
            "addresses": [{"type": "InternalIP", "address": "10.0.0.7"}, {"type": "Hostname", "address": "gw-1"}],
            "capacity": {"cpu": "4", "memory": "16318424Ki", "pods": "110"},
            "allocatable": {"cpu": "3500m", "memory": "15Gi"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "edgecore is posting ready status"}],
        });
        assert_eq!(check_node_status(good.to_string().as_bytes()), Ok(()));
        let cases: [(&str, Value, &str); 8] = [
            (
                "/nodeInfo/architecture",
                json!("amd64\nINFO forged"),
                "nodeInfo.architecture",
            ),
            (
                "/nodeInfo/architecture",
                json!("pdp11"),
                "nodeInfo.architecture",
            ),
            (
                "/nodeInfo/operatingSystem",
                json!("Linux"),
                "nodeInfo.operatingSystem",
            ),
            (
                "/nodeInfo/osImage",
                json!("Debian\u{202e}"),
                "nodeInfo.osImage",
            ),
            (
                "/addresses/0/address",
                json!("10.0.0.999"),
                "addresses[0].address",
            ),
            ("/addresses/1/type", json!("Tunnel"), "addresses[1].type"),
            ("/capacity/cpu", json!("four"), "capacity"),
            (
                "/conditions/0/status",
                json!("Maybe"),
                "conditions[0].status",
            ),
        ];
        for (pointer, value, field) in cases {
            let mut status = good.clone();
            *status.pointer_mut(pointer).expect(pointer) = value;
            let e = check_node_status(status.to_string().as_bytes()).expect_err(field);
            assert!(e.contains(field), "{field}: {e}");
            assert!(!e.contains('\n'), "{e:?}");
        }
        assert!(check_node_status(b"[1]").is_err());
        assert!(check_node_status(br#"{"capacity": 5}"#).is_err());
    }

    #[test]
    fn an_invalid_node_status_is_dropped_for_the_legacy_one() {
        let presence = Presence::default();
        let mut info = edge().info;
        info.node_status = br#"{"nodeInfo":{"architecture":"x\ny"}}"#.to_vec();
        presence.connected("gw", info, "10.0.0.9".into(), BTreeMap::new());
        let held = presence.edges().get("gw").cloned().expect("recorded");
        assert!(held.info.node_status.is_empty());
        let status = node_status(&held, &[], None);
        assert_eq!(status["nodeInfo"]["architecture"], "arm64");
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
