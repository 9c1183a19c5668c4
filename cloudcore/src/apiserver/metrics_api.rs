//! `metrics.k8s.io/v1beta1` served by the embedded API, so `kubectl top node` and `kubectl top
//! pod` work without a metrics-server: `NodeMetrics` and `PodMetrics` made from the usage each
//! edge reports on a stats stream ([`crate::streams::Streams::stats`]), in the shape
//! metrics-server serves them ([docs/streams.md](../../../docs/streams.md), "Embedded API").
//!
//! Lists leave out nodes that are not Ready, that fail or that are disconnected, and pods whose
//! node does; a get of one answers the node's error (503 for a disconnected node, naming it).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use proto::stream::stats;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::objects::resource_id;
use super::resources::{self, FieldSelector, LabelSelector};
use super::status::ApiError;
use super::verbs::{self, Api};
use crate::streams::OpenError;

/// The API group.
pub const GROUP: &str = "metrics.k8s.io";
/// Its one version.
pub const VERSION: &str = "v1beta1";
/// `window` of every item: the interval over which the edge computes its CPU rate. The stats
/// stream carries rates, not the interval, and the edge samples every 10 s (metrics-server's
/// default resolution too).
pub const WINDOW: &str = "10s";
/// How long one node's stats may take before a list leaves it out (a get fails with 504).
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// Which metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsResource {
    Nodes,
    Pods,
}

/// A request under `/apis/metrics.k8s.io/v1beta1/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsRequest {
    pub resource: MetricsResource,
    /// `None` for nodes and for pods of every namespace.
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The path after `/apis/metrics.k8s.io/v1beta1/`, or `None` for one that names nothing.
pub fn route(rest: &[&str]) -> Option<MetricsRequest> {
    let request = |resource, namespace: Option<&str>, name: Option<&str>| {
        Some(MetricsRequest {
            resource,
            namespace: namespace.map(String::from),
            name: name.map(String::from),
        })
    };
    match rest {
        ["nodes"] => request(MetricsResource::Nodes, None, None),
        ["nodes", name] => request(MetricsResource::Nodes, None, Some(name)),
        ["pods"] => request(MetricsResource::Pods, None, None),
        ["namespaces", ns, "pods"] => request(MetricsResource::Pods, Some(ns), None),
        ["namespaces", ns, "pods", name] => request(MetricsResource::Pods, Some(ns), Some(name)),
        _ => None,
    }
}

/// `GET /apis/metrics.k8s.io/v1beta1`: the `APIResourceList` metrics-server publishes.
pub fn resource_list() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [
            {"name": "nodes", "singularName": "", "namespaced": false, "kind": "NodeMetrics", "verbs": ["get", "list"]},
            {"name": "pods", "singularName": "", "namespaced": true, "kind": "PodMetrics", "verbs": ["get", "list"]},
        ],
    })
}

/// CPU as metrics-server writes it: nano-cores.
pub fn cpu_quantity(nano_cores: u64) -> String {
    format!("{nano_cores}n")
}

/// Memory as a `resource.Quantity` in binary SI writes it: `Ki` when the byte count is a
/// multiple of 1024 (a working set always is, being whole pages), plain bytes otherwise.
pub fn memory_quantity(bytes: u64) -> String {
    if bytes.is_multiple_of(1024) {
        format!("{}Ki", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

fn usage(cpu: &stats::Usage, memory: &stats::Memory) -> Option<Value> {
    let nano_cores = cpu.usage_nano_cores?;
    Some(json!({
        "cpu": cpu_quantity(nano_cores),
        "memory": memory_quantity(memory.working_set_bytes),
    }))
}

fn labels_of(object: &Value) -> Value {
    match &object["metadata"]["labels"] {
        Value::Object(map) if !map.is_empty() => Value::Object(map.clone()),
        _ => json!({}),
    }
}

fn sample_time(time: &str, now: OffsetDateTime) -> String {
    resources::parse_timestamp(time)
        .map(resources::format_timestamp)
        .unwrap_or_else(|| resources::format_timestamp(now))
}

/// The `NodeMetrics` of `node` (its Node object) from the node part of its edge's summary;
/// `None` while the edge has no CPU rate yet (its first sample).
pub fn node_metrics(
    node: &Value,
    usage_of: &stats::NodeUsage,
    now: OffsetDateTime,
) -> Option<Value> {
    let usage = usage(&usage_of.cpu, &usage_of.memory)?;
    Some(json!({
        "kind": "NodeMetrics",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {
            "name": node["metadata"]["name"],
            "creationTimestamp": resources::format_timestamp(now),
            "labels": labels_of(node),
        },
        "timestamp": sample_time(&usage_of.cpu.time, now),
        "window": WINDOW,
        "usage": usage,
    }))
}

/// The `PodMetrics` of `pod` (its Pod object) from its entry in the edge's summary; `None`
/// while any of its containers has no CPU rate yet, as metrics-server leaves such pods out.
pub fn pod_metrics(pod: &Value, usage_of: &stats::PodUsage, now: OffsetDateTime) -> Option<Value> {
    let containers: Option<Vec<Value>> = usage_of
        .containers
        .iter()
        .map(|c| Some(json!({"name": c.name, "usage": usage(&c.cpu, &c.memory)?})))
        .collect();
    let containers = containers?;
    if containers.is_empty() {
        return None;
    }
    Some(json!({
        "kind": "PodMetrics",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {
            "name": pod["metadata"]["name"],
            "namespace": pod["metadata"]["namespace"],
            "creationTimestamp": resources::format_timestamp(now),
            "labels": labels_of(pod),
        },
        "timestamp": sample_time(&usage_of.cpu.time, now),
        "window": WINDOW,
        "containers": containers,
    }))
}

/// The summary entry of `pod`: by uid, or by namespace and name when the edge sent no uid.
fn find_pod<'a>(summary: &'a stats::Summary, pod: &Value) -> Option<&'a stats::PodUsage> {
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    summary.pods.iter().find(|p| {
        if p.uid.is_empty() || uid.is_empty() {
            p.namespace == namespace && p.name == name
        } else {
            p.uid == uid
        }
    })
}

fn is_ready(node: &Value) -> bool {
    node["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn not_found(plural: &str, name: &str) -> ApiError {
    ApiError::not_found(GROUP, plural, name)
}

async fn stats_of(api: &Arc<Api>, node: &str) -> Result<stats::Summary, ApiError> {
    match tokio::time::timeout(STATS_TIMEOUT, api.streams.stats(node)).await {
        Ok(Ok(summary)) => Ok(summary),
        Ok(Err(e)) => Err(open_error(e)),
        Err(_) => Err(ApiError::from_code(
            504,
            format!(
                "node {node} did not send its stats within {}s",
                STATS_TIMEOUT.as_secs()
            ),
        )),
    }
}

fn open_error(e: OpenError) -> ApiError {
    ApiError::from_code(e.http_status(), e.to_string())
}

/// The summaries of `nodes`, asked for at the same time; a node that fails is logged and left
/// out.
async fn summaries(api: &Arc<Api>, nodes: Vec<String>) -> HashMap<String, stats::Summary> {
    let asks = nodes.into_iter().map(|node| async move {
        let result = stats_of(api, &node).await;
        (node, result)
    });
    let mut found = HashMap::new();
    for (node, result) in futures::future::join_all(asks).await {
        match result {
            Ok(summary) => {
                found.insert(node, summary);
            }
            Err(e) => tracing::debug!(node = %node, error = %e.message, "node left out of metrics"),
        }
    }
    found
}

async fn load(
    api: &Arc<Api>,
    plural: &'static str,
    namespace: Option<String>,
    name: Option<String>,
) -> Result<Vec<Value>, ApiError> {
    let info = resources::lookup("", "v1", plural).expect("nodes and pods are in the table");
    let store = api.store.clone();
    let id = resource_id(info);
    let result = tokio::task::spawn_blocking(move || match name {
        Some(name) => store
            .get(&id, namespace.as_deref().unwrap_or_default(), &name)
            .map(|o| o.into_iter().collect()),
        None => store
            .list(&id, namespace.as_deref())
            .map(|(objects, _)| objects),
    })
    .await
    .map_err(|e| ApiError::internal(format!("storage task failed: {e}")))?;
    result.map_err(|e| ApiError::from_store(e, "", plural, ""))
}

fn keep(
    labels: &Option<LabelSelector>,
    fields: &Option<FieldSelector>,
    kind: &str,
    object: &Value,
) -> Result<bool, ApiError> {
    if let Some(selector) = labels
        && !selector.matches_object(object)
    {
        return Ok(false);
    }
    match fields {
        Some(selector) => selector
            .matches(kind, object)
            .map_err(|e| ApiError::bad_request(e.to_string())),
        None => Ok(true),
    }
}

fn list_response(kind: &str, items: Vec<Value>) -> Response {
    let body = json!({
        "kind": kind,
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {},
        "items": items,
    });
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn item_response(item: Value) -> Response {
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        item.to_string(),
    )
        .into_response()
}

/// Serves a `GET` of node or pod metrics.
pub async fn serve(
    api: &Arc<Api>,
    request: MetricsRequest,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (labels, fields) = verbs::selectors(query)?;
    let now = OffsetDateTime::now_utc();
    match (request.resource, request.name) {
        (MetricsResource::Nodes, Some(name)) => {
            let node = load(api, "nodes", None, Some(name.clone()))
                .await?
                .pop()
                .ok_or_else(|| not_found("nodes", &name))?;
            let summary = stats_of(api, &name).await?;
            node_metrics(&node, &summary.node, now)
                .map(item_response)
                .ok_or_else(|| not_found("nodes", &name))
        }
        (MetricsResource::Nodes, None) => {
            let mut nodes = Vec::new();
            for node in load(api, "nodes", None, None).await? {
                if is_ready(&node) && keep(&labels, &fields, "Node", &node)? {
                    nodes.push(node);
                }
            }
            let names = nodes
                .iter()
                .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
                .collect();
            let found = summaries(api, names).await;
            let items = nodes
                .iter()
                .filter_map(|node| {
                    let summary = found.get(node["metadata"]["name"].as_str()?)?;
                    node_metrics(node, &summary.node, now)
                })
                .collect();
            Ok(list_response("NodeMetricsList", items))
        }
        (MetricsResource::Pods, Some(name)) => {
            let namespace = request.namespace.unwrap_or_default();
            let pod = load(api, "pods", Some(namespace), Some(name.clone()))
                .await?
                .pop()
                .ok_or_else(|| not_found("pods", &name))?;
            let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
            if node.is_empty() {
                return Err(not_found("pods", &name));
            }
            let summary = stats_of(api, node).await?;
            find_pod(&summary, &pod)
                .and_then(|usage| pod_metrics(&pod, usage, now))
                .map(item_response)
                .ok_or_else(|| not_found("pods", &name))
        }
        (MetricsResource::Pods, None) => {
            let mut by_node: BTreeMap<String, Vec<Value>> = BTreeMap::new();
            for pod in load(api, "pods", request.namespace, None).await? {
                let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
                if !node.is_empty() && keep(&labels, &fields, "Pod", &pod)? {
                    by_node.entry(node.to_string()).or_default().push(pod);
                }
            }
            let found = summaries(api, by_node.keys().cloned().collect()).await;
            let mut items = Vec::new();
            for (node, pods) in &by_node {
                let Some(summary) = found.get(node) else {
                    continue;
                };
                items.extend(
                    pods.iter()
                        .filter_map(|pod| pod_metrics(pod, find_pod(summary, pod)?, now)),
                );
            }
            Ok(list_response("PodMetricsList", items))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::stream::stats::{ContainerUsage, Memory, NodeUsage, PodUsage, Summary, Usage};

    fn cpu(nano: Option<u64>) -> Usage {
        Usage {
            time: "2026-01-02T03:04:05.123456789Z".into(),
            usage_core_nano_seconds: 42_000_000_000,
            usage_nano_cores: nano,
        }
    }

    fn memory(bytes: u64) -> Memory {
        Memory {
            time: "2026-01-02T03:04:05Z".into(),
            working_set_bytes: bytes,
            usage_bytes: Some(bytes * 2),
            ..Memory::default()
        }
    }

    fn summary() -> Summary {
        Summary {
            node: NodeUsage {
                node_name: "edge-1".into(),
                start_time: "2026-01-01T00:00:00Z".into(),
                cpu: cpu(Some(250_000_000)),
                memory: memory(512 * 1024 * 1024),
            },
            pods: vec![PodUsage {
                namespace: "default".into(),
                name: "web".into(),
                uid: "u-1".into(),
                start_time: "2026-01-01T00:00:00Z".into(),
                cpu: cpu(Some(3_000_000)),
                memory: memory(8 * 1024 * 1024),
                containers: vec![
                    ContainerUsage {
                        name: "app".into(),
                        start_time: "2026-01-01T00:00:00Z".into(),
                        cpu: cpu(Some(2_000_000)),
                        memory: memory(6 * 1024 * 1024),
                    },
                    ContainerUsage {
                        name: "sidecar".into(),
                        start_time: "2026-01-01T00:00:00Z".into(),
                        cpu: cpu(Some(1_000_000)),
                        memory: memory(2 * 1024 * 1024 + 100),
                    },
                ],
            }],
        }
    }

    fn at() -> OffsetDateTime {
        resources::parse_timestamp("2026-01-02T03:05:00Z").expect("time")
    }

    #[test]
    fn node_metrics_are_shaped_like_metrics_server() {
        let node = json!({"metadata": {"name": "edge-1", "labels": {"zone": "a"}}});
        let m = node_metrics(&node, &summary().node, at()).expect("metrics");
        assert_eq!(m["kind"], "NodeMetrics");
        assert_eq!(m["apiVersion"], "metrics.k8s.io/v1beta1");
        assert_eq!(m["metadata"]["name"], "edge-1");
        assert_eq!(m["metadata"]["labels"], json!({"zone": "a"}));
        assert_eq!(m["metadata"]["creationTimestamp"], "2026-01-02T03:05:00Z");
        assert_eq!(m["timestamp"], "2026-01-02T03:04:05Z");
        assert_eq!(m["window"], "10s");
        assert_eq!(
            m["usage"],
            json!({"cpu": "250000000n", "memory": "524288Ki"})
        );
    }

    #[test]
    fn pod_metrics_list_each_container_by_working_set() {
        let pod = json!({"metadata": {"name": "web", "namespace": "default", "uid": "u-1"}});
        let s = summary();
        let usage = find_pod(&s, &pod).expect("found by uid");
        let m = pod_metrics(&pod, usage, at()).expect("metrics");
        assert_eq!(m["kind"], "PodMetrics");
        assert_eq!(m["metadata"]["namespace"], "default");
        assert_eq!(m["metadata"]["labels"], json!({}));
        assert_eq!(
            m["containers"],
            json!([
                {"name": "app", "usage": {"cpu": "2000000n", "memory": "6144Ki"}},
                {"name": "sidecar", "usage": {"cpu": "1000000n", "memory": "2097252"}},
            ])
        );
        let other = json!({"metadata": {"name": "web", "namespace": "default", "uid": "u-2"}});
        assert!(
            find_pod(&s, &other).is_none(),
            "another pod of the same name"
        );
    }

    #[test]
    fn usage_without_a_rate_yet_is_left_out() {
        let node = json!({"metadata": {"name": "edge-1"}});
        let mut s = summary();
        s.node.cpu.usage_nano_cores = None;
        assert!(node_metrics(&node, &s.node, at()).is_none());
        s.pods[0].containers[1].cpu.usage_nano_cores = None;
        let pod = json!({"metadata": {"name": "web", "namespace": "default", "uid": "u-1"}});
        assert!(pod_metrics(&pod, &s.pods[0], at()).is_none());
        s.pods[0].containers.clear();
        assert!(pod_metrics(&pod, &s.pods[0], at()).is_none());
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_quantity(0), "0n");
        assert_eq!(memory_quantity(0), "0Ki");
        assert_eq!(memory_quantity(4096), "4Ki");
        assert_eq!(memory_quantity(1000), "1000");
    }

    #[test]
    fn paths() {
        assert_eq!(
            route(&["namespaces", "ns", "pods", "p"]),
            Some(MetricsRequest {
                resource: MetricsResource::Pods,
                namespace: Some("ns".into()),
                name: Some("p".into())
            })
        );
        assert_eq!(
            route(&["nodes"]).map(|r| r.resource),
            Some(MetricsResource::Nodes)
        );
        assert_eq!(route(&["namespaces", "ns", "nodes"]), None);
        assert_eq!(route(&["widgets"]), None);
    }
}
