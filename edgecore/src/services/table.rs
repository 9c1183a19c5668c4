//! The service table: every Service this gateway holds with the endpoints its data path and
//! DNS use, rebuilt from the store (Services, EndpointSlices, this node's Pods) and from the
//! local pods' latest statuses (the outbox), so a local pod's readiness counts at once, with
//! or without the cloud. The proxy ([`super::proxy`]), the DNS server ([`super::dns`]) and the
//! pods' service environment variables ([`super::env`]) read the same table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proto::ObjectRef;
use serde_json::Value;

use crate::store::StoredObject;

/// The kinds the table is built from.
pub const KINDS: [&str; 3] = ["Service", "EndpointSlice", "Pod"];
/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy; kube-proxy ignores them, so does the data
/// path here.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given (3 h, as the API defaults).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// A Service by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

/// Layer-4 protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// As Kubernetes spells it (`TCP`, `UDP`, `SCTP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// How a Service is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    /// A virtual IP (`type: ClusterIP`, also the cluster-IP part of NodePort and LoadBalancer).
    ClusterIp,
    /// `type: NodePort` (or LoadBalancer): the cluster IP plus a port on every node address.
    NodePort,
    /// `clusterIP: None`: DNS answers with the endpoints' addresses; no data path.
    Headless,
    /// `type: ExternalName`: DNS answers with a CNAME; no data path.
    ExternalName(String),
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// `spec.ports[].name` (empty for a single unnamed port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `spec.ports[].nodePort`, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// One endpoint address of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Ready to receive traffic. For a pod of this node, from its latest local status (the
    /// outbox), never from an EndpointSlice.
    pub ready: bool,
    /// Being deleted (`deletionTimestamp` set, or the slice's `terminating`).
    pub terminating: bool,
    /// The data path sends traffic to it directly: a pod of this gateway (for a Service with
    /// a selector), or an address of a Service without a selector as its EndpointSlice gives
    /// it. Endpoints of other nodes are `false`.
    pub local: bool,
    /// The node the endpoint runs on, when known.
    pub node_name: Option<String>,
    /// `hostname` (a StatefulSet pod behind a headless Service: `HOST.SVC.NS.svc.DOMAIN`).
    pub hostname: Option<String>,
    /// The pod behind the address, when there is one (namespace, name).
    pub pod: Option<(String, String)>,
    /// The target port of each Service port, by Service port name, as resolved for this
    /// endpoint (a named `targetPort` is looked up in the pod's containers).
    pub ports: BTreeMap<String, u16>,
}

/// A Service and its endpoints as this gateway sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub uid: String,
    pub kind: ServiceKind,
    /// `spec.clusterIPs` (empty for headless and ExternalName Services).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP` with its timeout (`sessionAffinityConfig`, default 3 h).
    pub affinity: Option<Duration>,
    /// `publishNotReadyAddresses`: DNS lists endpoints that are not ready too.
    pub publish_not_ready: bool,
    /// Every endpoint known: this gateway's pods (computed here from the Service's selector)
    /// and, from the EndpointSlices, the others.
    pub endpoints: Vec<Endpoint>,
}

/// Every Service this gateway holds. `revision` rises with each rebuild that changed
/// something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTable {
    pub revision: u64,
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
}

impl ServiceTable {
    /// The Services of `namespace`, by name.
    pub fn in_namespace<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a ServiceKey, &'a ServiceEntry)> + 'a {
        self.services
            .iter()
            .filter(move |(key, _)| key.namespace == namespace)
    }
}

impl ServiceEntry {
    /// The endpoints the data path sends traffic to: local (see [`Endpoint::local`]), ready
    /// and not terminating, with a target port for the Service port `port_name`.
    pub fn routed_endpoints<'a>(
        &'a self,
        port_name: &'a str,
    ) -> impl Iterator<Item = (&'a Endpoint, u16)> + 'a {
        self.endpoints
            .iter()
            .filter(|e| e.local && e.ready && !e.terminating)
            .filter_map(move |e| Some((e, *e.ports.get(port_name)?)))
    }
}

/// What the table is built from: the store's objects of [`KINDS`] and the latest status the
/// outbox holds for each local pod.
#[derive(Debug, Default)]
pub struct Inputs<'a> {
    pub node_name: &'a str,
    pub objects: &'a [StoredObject],
    pub pod_statuses: &'a [(ObjectRef, Value)],
}

/// Builds the table (revision 0; the caller numbers revisions). Objects that do not parse are
/// left out with a warning naming them: one bad object never hides the others.
pub fn build(inputs: &Inputs<'_>) -> ServiceTable {
    let mut services = Vec::new();
    let mut slices: HashMap<(String, String), Vec<EndpointSlice>> = HashMap::new();
    let mut pods: HashMap<String, Vec<Pod>> = HashMap::new();
    for object in inputs.objects {
        let key = &object.key;
        match key.kind.as_str() {
            "Service" => {
                if let Some(service) = parse::<Service>(object) {
                    services.push(service);
                }
            }
            "EndpointSlice" => {
                let Some(slice) = parse::<EndpointSlice>(object) else {
                    continue;
                };
                let Some(service) = slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .cloned()
                else {
                    continue;
                };
                slices
                    .entry((key.namespace.clone(), service))
                    .or_default()
                    .push(slice);
            }
            "Pod" => {
                if let Some(pod) = parse::<Pod>(object) {
                    pods.entry(key.namespace.clone()).or_default().push(pod);
                }
            }
            _ => {}
        }
    }
    let statuses: HashMap<(&str, &str), (&str, &Value)> = inputs
        .pod_statuses
        .iter()
        .filter(|(object, _)| object.kind == "Pod")
        .map(|(object, status)| {
            (
                (object.namespace.as_str(), object.name.as_str()),
                (object.uid.as_str(), status),
            )
        })
        .collect();
    let mut table = ServiceTable::default();
    for service in &services {
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let name = service.metadata.name.clone().unwrap_or_default();
        let Some(entry) = entry(
            inputs.node_name,
            service,
            pods.get(&namespace).map(Vec::as_slice).unwrap_or_default(),
            &statuses,
            slices
                .get(&(namespace.clone(), name.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default(),
        ) else {
            continue;
        };
        table.services.insert(ServiceKey { namespace, name }, entry);
    }
    table
}

fn parse<T: serde::de::DeserializeOwned>(object: &StoredObject) -> Option<T> {
    match serde_json::from_slice(&object.body) {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!(
                kind = %object.key.kind,
                namespace = %object.key.namespace,
                name = %object.key.name,
                error = %e,
                "services: left out an object that does not parse"
            );
            None
        }
    }
}

fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// One Service's entry; `None` for a Service another proxy owns.
fn entry(
    node_name: &str,
    service: &Service,
    pods: &[Pod],
    statuses: &HashMap<(&str, &str), (&str, &Value)>,
    slices: &[EndpointSlice],
) -> Option<ServiceEntry> {
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return None;
    }
    let spec = service.spec.clone().unwrap_or_default();
    let service_name = service.metadata.name.as_deref().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let kind = match spec.type_.as_deref() {
        Some("ExternalName") => {
            ServiceKind::ExternalName(spec.external_name.clone().unwrap_or_default())
        }
        _ if headless => ServiceKind::Headless,
        Some("NodePort") | Some("LoadBalancer") => ServiceKind::NodePort,
        _ => ServiceKind::ClusterIp,
    };
    let cluster_ips = match &kind {
        ServiceKind::ClusterIp | ServiceKind::NodePort => {
            let listed = spec
                .cluster_ips
                .clone()
                .filter(|ips| !ips.is_empty())
                .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
                .unwrap_or_default();
            listed.iter().filter_map(|ip| ip.parse().ok()).collect()
        }
        _ => Vec::new(),
    };
    let spec_ports = spec.ports.clone().unwrap_or_default();
    let ports: Vec<ServicePort> = spec_ports
        .iter()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(p.protocol.as_deref())?,
                port: u16::try_from(p.port).ok()?,
                node_port: match kind {
                    ServiceKind::NodePort => p.node_port.and_then(|n| u16::try_from(n).ok()),
                    _ => None,
                },
            })
        })
        .collect();
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs)
    });
    let selector = spec.selector.clone().unwrap_or_default();
    let mut endpoints = Vec::new();
    // Pods of this node the data path uses directly; their slice entries are skipped below.
    let mut local_ips = HashSet::new();
    if !selector.is_empty() {
        for pod in pods {
            let meta = &pod.metadata;
            let pod_spec = pod.spec.clone().unwrap_or_default();
            let matches = meta
                .labels
                .as_ref()
                .is_some_and(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
            if !matches
                || meta.deletion_timestamp.is_some()
                || pod_spec
                    .node_name
                    .as_deref()
                    .is_some_and(|n| n != node_name)
            {
                continue;
            }
            let namespace = meta.namespace.as_deref().unwrap_or_default();
            let name = meta.name.as_deref().unwrap_or_default();
            let uid = meta.uid.as_deref().unwrap_or_default();
            let Some((status_uid, status)) = statuses.get(&(namespace, name)) else {
                continue;
            };
            if !uid.is_empty() && !status_uid.is_empty() && uid != *status_uid {
                continue;
            }
            let Some(ip) = status
                .get("podIP")
                .and_then(Value::as_str)
                .and_then(|ip| ip.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let ready = status
                .get("conditions")
                .and_then(Value::as_array)
                .is_some_and(|conditions| {
                    conditions.iter().any(|c| {
                        c.get("type").and_then(Value::as_str) == Some("Ready")
                            && c.get("status").and_then(Value::as_str) == Some("True")
                    })
                });
            let mut target_ports = BTreeMap::new();
            for (port, spec_port) in ports.iter().zip(spec_ports.iter().filter(|p| {
                protocol(p.protocol.as_deref()).is_some() && u16::try_from(p.port).is_ok()
            })) {
                if let Some(target) = target_port(spec_port.target_port.as_ref(), port, &pod_spec) {
                    target_ports.insert(port.name.clone(), target);
                }
            }
            let hostname = match (&pod_spec.hostname, &pod_spec.subdomain) {
                (Some(host), Some(sub)) if sub == service_name && !host.is_empty() => {
                    Some(host.clone())
                }
                _ => None,
            };
            local_ips.insert(ip);
            endpoints.push(Endpoint {
                ip,
                ready,
                terminating: false,
                local: true,
                node_name: Some(node_name.to_string()),
                hostname,
                pod: Some((namespace.to_string(), name.to_string())),
                ports: target_ports,
            });
        }
    }
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let slice_ports: Vec<(String, u16)> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let on_this_node = endpoint.node_name.as_deref() == Some(node_name);
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                // A Service with a selector: this node's pods come from the store and the
                // local statuses, never from the slice.
                if !selector.is_empty() && (on_this_node || local_ips.contains(&ip)) {
                    continue;
                }
                if endpoints.iter().any(|e: &Endpoint| e.ip == ip) {
                    continue;
                }
                let pod = endpoint.target_ref.as_ref().and_then(|r| {
                    (r.kind.as_deref() == Some("Pod")).then(|| {
                        (
                            r.namespace.clone().unwrap_or_default(),
                            r.name.clone().unwrap_or_default(),
                        )
                    })
                });
                endpoints.push(Endpoint {
                    ip,
                    ready: conditions.ready.unwrap_or(true),
                    terminating: conditions.terminating.unwrap_or(false),
                    local: selector.is_empty(),
                    node_name: endpoint.node_name.clone(),
                    hostname: endpoint.hostname.clone(),
                    pod,
                    ports: slice_ports.iter().cloned().collect(),
                });
            }
        }
    }
    endpoints.sort_by(|a, b| (a.ip, &a.pod).cmp(&(b.ip, &b.pod)));
    Some(ServiceEntry {
        uid: service.metadata.uid.clone().unwrap_or_default(),
        kind,
        cluster_ips,
        ports,
        affinity,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        endpoints,
    })
}

/// The port a pod serves Service port `port` on: the number given, the container port of that
/// name and protocol, or the Service port itself without a `targetPort`.
fn target_port(
    target: Option<&IntOrString>,
    port: &ServicePort,
    pod: &k8s_openapi::api::core::v1::PodSpec,
) -> Option<u16> {
    match target {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n > 0),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<u16>() {
                return Some(n);
            }
            pod.containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && protocol(p.protocol.as_deref()) == Some(port.protocol)
                })
                .and_then(|p| u16::try_from(p.container_port).ok())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sync::ObjectKey;
    use serde_json::json;

    const NODE: &str = "gw-1";

    fn object(kind: &str, body: Value) -> StoredObject {
        let namespace = body["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
        StoredObject {
            key: ObjectKey {
                kind: kind.to_string(),
                namespace,
                name: name.clone(),
            },
            uid: format!("uid-{name}"),
            resource_version: 1,
            body: serde_json::to_vec(&body).expect("json"),
        }
    }

    fn service(name: &str, spec: Value) -> StoredObject {
        object(
            "Service",
            json!({"metadata": {"namespace": "default", "name": name, "uid": format!("uid-{name}")},
                   "spec": spec}),
        )
    }

    fn pod(name: &str, labels: Value, spec: Value) -> StoredObject {
        let mut spec = spec;
        spec["nodeName"] = json!(NODE);
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "c", "image": "i"}]);
        }
        object(
            "Pod",
            json!({"metadata": {"namespace": "default", "name": name, "uid": format!("uid-{name}"),
                                "labels": labels},
                   "spec": spec}),
        )
    }

    fn status(name: &str, ip: &str, ready: bool) -> (ObjectRef, Value) {
        (
            ObjectRef {
                kind: "Pod".into(),
                namespace: "default".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            },
            json!({"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}),
        )
    }

    fn slice(service: &str, endpoints: Value, ports: Value) -> StoredObject {
        object(
            "EndpointSlice",
            json!({"metadata": {"namespace": "default", "name": format!("{service}-abc"),
                                "labels": {SERVICE_NAME_LABEL: service}},
                   "addressType": "IPv4", "endpoints": endpoints, "ports": ports}),
        )
    }

    fn build_with(objects: &[StoredObject], statuses: &[(ObjectRef, Value)]) -> ServiceTable {
        build(&Inputs {
            node_name: NODE,
            objects,
            pod_statuses: statuses,
        })
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn web() -> StoredObject {
        service(
            "web",
            json!({"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                   "selector": {"app": "web"}, "sessionAffinity": "ClientIP",
                   "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080}]}),
        )
    }

    fn web_pod(name: &str) -> StoredObject {
        pod(
            name,
            json!({"app": "web"}),
            json!({"containers": [{"name": "httpd", "image": "i",
                                   "ports": [{"name": "http", "containerPort": 8080}]}]}),
        )
    }

    #[test]
    fn local_pods_are_endpoints_with_readiness_from_their_latest_status() {
        let objects = [
            web(),
            web_pod("web-a"),
            web_pod("web-b"),
            pod("other", json!({"app": "db"}), json!({})),
        ];
        let statuses = [
            status("web-a", "10.99.0.2", true),
            status("web-b", "10.99.0.3", false),
            status("other", "10.99.0.4", true),
        ];
        let table = build_with(&objects, &statuses);
        let entry = &table.services[&key("web")];
        assert_eq!(entry.kind, ServiceKind::NodePort);
        assert_eq!(
            entry.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(entry.ports[0].node_port, Some(30080));
        assert_eq!(entry.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        let got: Vec<(String, bool, bool, Option<u16>)> = entry
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.ip.to_string(),
                    e.ready,
                    e.local,
                    e.ports.get("http").copied(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.99.0.2".into(), true, true, Some(8080)),
                ("10.99.0.3".into(), false, true, Some(8080)),
            ]
        );
        let routed: Vec<String> = entry
            .routed_endpoints("http")
            .map(|(e, port)| format!("{}:{port}", e.ip))
            .collect();
        assert_eq!(routed, vec!["10.99.0.2:8080"]);
    }

    #[test]
    fn the_slice_never_overrides_a_local_pods_readiness() {
        // The cloud's slice still says ready (it has not heard yet): the local status wins,
        // and the slice's copy of the local pod is not added a second time.
        let objects = [
            web(),
            web_pod("web-a"),
            slice(
                "web",
                json!([{"addresses": ["10.99.0.2"], "conditions": {"ready": true}, "nodeName": NODE},
                       {"addresses": ["10.98.0.7"], "conditions": {"ready": true}, "nodeName": "gw-2",
                        "hostname": "h"}]),
                json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            ),
        ];
        let table = build_with(&objects, &[status("web-a", "10.99.0.2", false)]);
        let entry = &table.services[&key("web")];
        let got: Vec<(String, bool, bool)> = entry
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.ready, e.local))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.98.0.7".into(), true, false),
                ("10.99.0.2".into(), false, true),
            ]
        );
        assert_eq!(entry.endpoints[0].hostname.as_deref(), Some("h"));
        assert_eq!(
            entry.routed_endpoints("http").count(),
            0,
            "remote endpoints are not routed"
        );
    }

    #[test]
    fn deleted_pods_stale_statuses_and_pods_without_ip_are_left_out() {
        let mut deleting = web_pod("web-d");
        let mut body: Value = serde_json::from_slice(&deleting.body).unwrap();
        body["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        deleting.body = serde_json::to_vec(&body).unwrap();
        let objects = [web(), deleting, web_pod("web-s"), web_pod("web-n")];
        let mut stale = status("web-s", "10.99.0.8", true);
        stale.0.uid = "uid-of-an-earlier-pod".into();
        let statuses = [
            status("web-d", "10.99.0.7", true),
            stale,
            (status("web-n", "", true).0, json!({"phase": "Pending"})),
        ];
        let table = build_with(&objects, &statuses);
        assert!(table.services[&key("web")].endpoints.is_empty());
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_unresolved_ports_are_left_out() {
        let objects = [
            web(),
            web_pod("web-a"),
            pod(
                "web-x",
                json!({"app": "web"}),
                json!({"containers": [{"name": "c", "image": "i",
                                       "ports": [{"name": "http", "containerPort": 9090, "protocol": "UDP"}]}]}),
            ),
        ];
        let table = build_with(
            &objects,
            &[
                status("web-a", "10.99.0.2", true),
                status("web-x", "10.99.0.9", true),
            ],
        );
        let entry = &table.services[&key("web")];
        let routed: Vec<String> = entry
            .routed_endpoints("http")
            .map(|(e, port)| format!("{}:{port}", e.ip))
            .collect();
        assert_eq!(
            routed,
            vec!["10.99.0.2:8080"],
            "a UDP port does not serve a TCP Service port"
        );
    }

    #[test]
    fn kinds_headless_hostnames_and_selectorless_services() {
        let objects = [
            service(
                "db",
                json!({"clusterIP": "None", "selector": {"app": "db"}, "publishNotReadyAddresses": true,
                       "ports": [{"port": 5432}]}),
            ),
            pod(
                "db-0",
                json!({"app": "db"}),
                json!({"hostname": "db-0", "subdomain": "db"}),
            ),
            service(
                "ext",
                json!({"type": "ExternalName", "externalName": "example.com"}),
            ),
            service(
                "manual",
                json!({"clusterIP": "10.96.0.20", "ports": [{"name": "p", "port": 81}]}),
            ),
            slice(
                "manual",
                json!([{"addresses": ["192.0.2.10"]}]),
                json!([{"name": "p", "port": 8081}]),
            ),
            service(
                "foreign",
                json!({"clusterIP": "10.96.0.30", "ports": [{"port": 1}]}),
            ),
        ];
        let mut objects = objects.to_vec();
        let mut body: Value = serde_json::from_slice(&objects[5].body).unwrap();
        body["metadata"]["labels"] = json!({SERVICE_PROXY_NAME_LABEL: "other"});
        objects[5].body = serde_json::to_vec(&body).unwrap();
        let table = build_with(&objects, &[status("db-0", "10.99.0.5", false)]);
        let db = &table.services[&key("db")];
        assert_eq!(db.kind, ServiceKind::Headless);
        assert!(db.cluster_ips.is_empty());
        assert!(db.publish_not_ready);
        assert_eq!(db.endpoints[0].hostname.as_deref(), Some("db-0"));
        assert_eq!(db.endpoints[0].ports.get(""), Some(&5432));
        assert_eq!(
            table.services[&key("ext")].kind,
            ServiceKind::ExternalName("example.com".into())
        );
        let manual = &table.services[&key("manual")];
        let routed: Vec<String> = manual
            .routed_endpoints("p")
            .map(|(e, port)| format!("{}:{port}", e.ip))
            .collect();
        assert_eq!(
            routed,
            vec!["192.0.2.10:8081"],
            "a selectorless Service routes its slice"
        );
        assert!(!table.services.contains_key(&key("foreign")));
    }

    #[test]
    fn a_body_that_does_not_parse_hides_nothing_else() {
        let mut bad = service("bad", json!({}));
        bad.body = b"{not json".to_vec();
        let table = build_with(&[bad, web()], &[]);
        assert_eq!(table.services.keys().collect::<Vec<_>>(), vec![&key("web")]);
    }
}
