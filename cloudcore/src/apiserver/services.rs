//! core/v1 Services, Endpoints and discovery.k8s.io/v1 EndpointSlices as kube-apiserver's
//! registry shapes them: defaults, validation with its field paths and messages, the update
//! rules of a Service (cluster IP immutable, allocated values kept when an update leaves them
//! out, fields of the old type dropped on a type change), and the allocation of cluster IPs
//! and node ports from the ranges of `cloudcore serve` ([`ServiceRanges`]).
//!
//! The pure parts are hooked from [`super::objects::prepare_create`] and
//! [`super::objects::prepare_update`]. Allocation reads the store: [`Allocator::allocate`]
//! runs under one lock held until the write is done (`verbs`), and what is taken is read from
//! the stored Services each time, so two creates never get the same address, a restart loses
//! nothing and a deleted Service's address and ports are free at once. A dry run computes the
//! same answer and, writing nothing, holds nothing.
//!
//! [`bootstrap_kubernetes`] keeps the `default/kubernetes` Service with its Endpoints and
//! EndpointSlice, as kube-apiserver's bootstrap controller does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::Mutex;

use rand::Rng;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::objects;
use super::status::{ApiError, Cause};
use super::store::{ResourceId, Store, StoreError};

/// kube-apiserver's default `--service-cluster-ip-range`.
pub const DEFAULT_CLUSTER_IP_RANGE: &str = "10.96.0.0/12";
/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: &str = "30000-32767";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

const TYPES: [&str; 4] = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const PROTOCOLS: [&str; 3] = ["SCTP", "TCP", "UDP"];
/// kube's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
const DEFAULT_AFFINITY_TIMEOUT: i64 = 10800;
/// kube's upper bound of that timeout (one day).
const MAX_AFFINITY_TIMEOUT: i64 = 86400;

// ---------------------------------------------------------------------------------------------
// Ranges
// ---------------------------------------------------------------------------------------------

/// A range flag could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not `A.B.C.D/N`.
    #[error("{0:?} is not an IPv4 CIDR (A.B.C.D/N); only IPv4 single-stack is supported")]
    NotIpv4Cidr(String),
    /// Host bits set, or a prefix that leaves no or too many addresses.
    #[error("{cidr:?}: {reason}")]
    BadCidr { cidr: String, reason: &'static str },
    /// Not `FIRST-LAST` with 1 <= FIRST <= LAST <= 65535.
    #[error("{0:?} is not a port range FIRST-LAST (1-65535, FIRST <= LAST)")]
    BadPortRange(String),
}

/// `--service-cluster-ip-range`: an IPv4 network. Its network and broadcast addresses are
/// never handed out; the first address after the network one is `default/kubernetes`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterIpRange {
    network: u32,
    prefix: u8,
}

impl ClusterIpRange {
    /// The first usable address, `default/kubernetes`'s cluster IP.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    fn broadcast(&self) -> u32 {
        self.network | (u32::MAX >> self.prefix)
    }

    /// Whether `ip` is an address of the range that may be allocated.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip > self.network && ip < self.broadcast()
    }

    /// How many addresses may be allocated.
    fn size(&self) -> u32 {
        self.broadcast() - self.network - 1
    }
}

impl FromStr for ClusterIpRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, RangeError> {
        let not = || RangeError::NotIpv4Cidr(text.to_string());
        let (ip, prefix) = text.split_once('/').ok_or_else(not)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| not())?;
        let prefix: u8 = prefix.parse().map_err(|_| not())?;
        let bad = |reason| RangeError::BadCidr {
            cidr: text.to_string(),
            reason,
        };
        if !(8..=30).contains(&prefix) {
            return Err(bad(
                "the prefix must be between /8 and /30 (at least two usable addresses)",
            ));
        }
        let network = u32::from(ip);
        if network & (u32::MAX >> prefix) != 0 {
            return Err(bad("host bits are set; give the network address"));
        }
        Ok(ClusterIpRange { network, prefix })
    }
}

impl fmt::Display for ClusterIpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

/// `--service-node-port-range`: `FIRST-LAST`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePortRange {
    first: u16,
    last: u16,
}

impl NodePortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: i64) -> bool {
        port >= i64::from(self.first) && port <= i64::from(self.last)
    }
}

impl FromStr for NodePortRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, RangeError> {
        let bad = || RangeError::BadPortRange(text.to_string());
        let (first, last) = text.split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(NodePortRange { first, last })
    }
}

impl fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The ranges Services are allocated from (embedded mode; the real apiserver owns its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceRanges {
    pub cluster_ip: ClusterIpRange,
    pub node_ports: NodePortRange,
}

impl Default for ServiceRanges {
    fn default() -> Self {
        ServiceRanges {
            cluster_ip: DEFAULT_CLUSTER_IP_RANGE.parse().expect("default range"),
            node_ports: DEFAULT_NODE_PORT_RANGE.parse().expect("default range"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a Service
// ---------------------------------------------------------------------------------------------

fn service_type(object: &Value) -> &str {
    object["spec"]["type"].as_str().unwrap_or("ClusterIP")
}

/// Every type but ExternalName has a cluster IP (or is headless).
fn has_cluster_ip(object: &Value) -> bool {
    service_type(object) != "ExternalName"
}

/// NodePort, and LoadBalancer unless `allocateLoadBalancerNodePorts` is false.
fn needs_node_ports(object: &Value) -> bool {
    match service_type(object) {
        "NodePort" => true,
        "LoadBalancer" => object["spec"]["allocateLoadBalancerNodePorts"] != false,
        _ => false,
    }
}

/// A LoadBalancer with `externalTrafficPolicy: Local` gets a health check node port.
fn needs_health_check_port(object: &Value) -> bool {
    service_type(object) == "LoadBalancer" && object["spec"]["externalTrafficPolicy"] == "Local"
}

fn cluster_ip(object: &Value) -> &str {
    object["spec"]["clusterIP"].as_str().unwrap_or_default()
}

fn int(value: &Value) -> i64 {
    value.as_i64().unwrap_or(0)
}

/// The Go-style JSON rendering kube-apiserver uses for a list value in a message.
fn list_text(values: &[&str]) -> String {
    serde_json::to_string(values).unwrap_or_default()
}

fn ports_mut(object: &mut Value) -> Vec<&mut Map<String, Value>> {
    match object["spec"]["ports"].as_array_mut() {
        Some(ports) => ports.iter_mut().filter_map(Value::as_object_mut).collect(),
        None => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------------------------

/// kube-apiserver's defaults for a Service (on create and on every update, as decoding does):
/// type ClusterIP, sessionAffinity None (ClientIP gets a 10800 s timeout), ports' protocol TCP
/// and targetPort = port, the traffic policies, `clusterIPs` from `clusterIP` and back, IPv4
/// single-stack families, and for ExternalName no IP fields at all.
pub fn default_service(object: &mut Value) {
    if !object["spec"].is_object() {
        object["spec"] = json!({});
    }
    let kind = service_type(object).to_string();
    let spec = &mut object["spec"];
    if spec["type"].is_null() {
        spec["type"] = json!("ClusterIP");
    }
    if spec["sessionAffinity"].is_null() {
        spec["sessionAffinity"] = json!("None");
    }
    if spec["sessionAffinity"] == "ClientIP" {
        if spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"].is_null()
            && (spec["sessionAffinityConfig"].is_null()
                || spec["sessionAffinityConfig"].is_object())
            && (spec["sessionAffinityConfig"]["clientIP"].is_null()
                || spec["sessionAffinityConfig"]["clientIP"].is_object())
        {
            spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] =
                json!(DEFAULT_AFFINITY_TIMEOUT);
        }
    } else if spec["sessionAffinity"] == "None"
        && let Some(map) = spec.as_object_mut()
    {
        // kube drops a config that has nothing to configure.
        map.remove("sessionAffinityConfig");
    }
    for port in ports_mut(object) {
        if port.get("protocol").is_none_or(Value::is_null) {
            port.insert("protocol".into(), json!("TCP"));
        }
        let target = port.get("targetPort").cloned().unwrap_or(Value::Null);
        if target.is_null() || target == 0 || target == "" {
            let number = port.get("port").cloned().unwrap_or(Value::Null);
            port.insert("targetPort".into(), number);
        }
    }
    let spec = &mut object["spec"];
    if kind == "ExternalName" {
        if let Some(map) = spec.as_object_mut() {
            for field in ["ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy"] {
                map.remove(field);
            }
        }
    } else {
        if spec["internalTrafficPolicy"].is_null() {
            spec["internalTrafficPolicy"] = json!("Cluster");
        }
        if spec["ipFamilyPolicy"].is_null() {
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
        if spec["ipFamilies"].is_null() {
            spec["ipFamilies"] = json!(["IPv4"]);
        }
        let ip = spec["clusterIP"].as_str().unwrap_or_default().to_string();
        let first = spec["clusterIPs"][0].as_str().map(String::from);
        match (ip.is_empty(), first) {
            (false, None) => spec["clusterIPs"] = json!([ip]),
            (true, Some(first)) if !first.is_empty() => spec["clusterIP"] = json!(first),
            _ => {}
        }
    }
    if matches!(kind.as_str(), "NodePort" | "LoadBalancer")
        && spec["externalTrafficPolicy"].is_null()
    {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    if kind == "LoadBalancer" && spec["allocateLoadBalancerNodePorts"].is_null() {
        spec["allocateLoadBalancerNodePorts"] = json!(true);
    }
}

/// What a create fills in beyond the defaults: the empty load-balancer status.
pub fn prepare_create(plural: &str, object: &mut Value) {
    match plural {
        "services" => {
            default_service(object);
            object["status"] = json!({"loadBalancer": {}});
        }
        "endpoints" => default_endpoints(object),
        "endpointslices" => {
            default_endpoint_slice(object);
            object["metadata"]["generation"] = json!(1);
        }
        _ => {}
    }
}

fn default_port_protocol(ports: Option<&mut Vec<Value>>) {
    for port in ports.into_iter().flatten().filter_map(Value::as_object_mut) {
        if port.get("protocol").is_none_or(Value::is_null) {
            port.insert("protocol".into(), json!("TCP"));
        }
    }
}

fn default_endpoints(object: &mut Value) {
    for subset in object["subsets"].as_array_mut().into_iter().flatten() {
        default_port_protocol(subset.get_mut("ports").and_then(Value::as_array_mut));
    }
}

fn default_endpoint_slice(object: &mut Value) {
    if let Some(ports) = object["ports"].as_array_mut() {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            if port.get("name").is_none_or(Value::is_null) {
                port.insert("name".into(), json!(""));
            }
        }
    }
    default_port_protocol(object["ports"].as_array_mut());
    for endpoint in object["endpoints"].as_array_mut().into_iter().flatten() {
        if let Some(map) = endpoint.as_object_mut()
            && map.get("conditions").is_none_or(Value::is_null)
        {
            map.insert("conditions".into(), json!({}));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Updates
// ---------------------------------------------------------------------------------------------

/// The update rules of the three kinds, applied to `new` given the stored `current`: for a
/// Service, the fields of a type left behind are dropped when unchanged, values allocated
/// before and left out are kept (cluster IP; node ports by port name; the health check port),
/// and a set cluster IP may not change; an EndpointSlice's `addressType` is immutable and its
/// generation moves with its content.
pub fn prepare_update(plural: &str, current: &Value, new: &mut Value, causes: &mut Vec<Cause>) {
    match plural {
        "services" => update_service(current, new, causes),
        "endpoints" => default_endpoints(new),
        "endpointslices" => {
            default_endpoint_slice(new);
            if new["addressType"] != current["addressType"] {
                causes.push(Cause {
                    field: "addressType".into(),
                    message: format!("Invalid value: {}: field is immutable", new["addressType"]),
                });
            }
            let content = |o: &Value| {
                let mut o = o.clone();
                if let Some(map) = o.as_object_mut() {
                    map.remove("metadata");
                }
                o
            };
            let generation = int(&current["metadata"]["generation"]).max(1);
            new["metadata"]["generation"] = if content(current) != content(new) {
                json!(generation + 1)
            } else {
                json!(generation)
            };
        }
        _ => {}
    }
}

fn update_service(current: &Value, new: &mut Value, causes: &mut Vec<Cause>) {
    if !new["spec"].is_object() {
        new["spec"] = json!({});
    }
    drop_type_dependent_fields(current, new);
    keep_allocated_values(current, new);
    default_service(new);
    // kube-apiserver: a cluster IP, once set, stays (unless the Service is or becomes
    // ExternalName, which has none).
    let old_ip = cluster_ip(current);
    if has_cluster_ip(current) && has_cluster_ip(new) && !old_ip.is_empty() {
        let ips: Vec<&str> = new["spec"]["clusterIPs"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if cluster_ip(new) != old_ip || ips.first().copied() != Some(old_ip) {
            let shown = if ips.is_empty() {
                vec![cluster_ip(new)]
            } else {
                ips.clone()
            };
            causes.push(Cause {
                field: "spec.clusterIPs[0]".into(),
                message: format!(
                    "Invalid value: {}: may not change once set",
                    list_text(&shown)
                ),
            });
        }
    }
}

/// kube's `dropTypeDependentFields`: fields only the old type uses go away when the update
/// left them as they were.
fn drop_type_dependent_fields(current: &Value, new: &mut Value) {
    if has_cluster_ip(current)
        && !has_cluster_ip(new)
        && new["spec"]["clusterIP"] == current["spec"]["clusterIP"]
        && let Some(spec) = new["spec"].as_object_mut()
    {
        for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            if spec.get(field) == current["spec"].get(field) {
                spec.remove(field);
            }
        }
        if spec.get("internalTrafficPolicy") == current["spec"].get("internalTrafficPolicy") {
            spec.remove("internalTrafficPolicy");
        }
    }
    if needs_node_ports(current) && !needs_node_ports(new) {
        let old: HashSet<i64> = current["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| int(&p["nodePort"]))
            .collect();
        for port in ports_mut(new) {
            if port.get("nodePort").is_some_and(|n| old.contains(&int(n))) {
                port.remove("nodePort");
            }
        }
    }
    if needs_health_check_port(current)
        && !needs_health_check_port(new)
        && new["spec"]["healthCheckNodePort"] == current["spec"]["healthCheckNodePort"]
        && let Some(spec) = new["spec"].as_object_mut()
    {
        spec.remove("healthCheckNodePort");
    }
    let external = matches!(service_type(new), "NodePort" | "LoadBalancer");
    if !external
        && new["spec"]["externalTrafficPolicy"] == current["spec"]["externalTrafficPolicy"]
        && let Some(spec) = new["spec"].as_object_mut()
    {
        spec.remove("externalTrafficPolicy");
    }
    if service_type(new) != "LoadBalancer"
        && new["spec"]["allocateLoadBalancerNodePorts"]
            == current["spec"]["allocateLoadBalancerNodePorts"]
        && let Some(spec) = new["spec"].as_object_mut()
    {
        spec.remove("allocateLoadBalancerNodePorts");
    }
}

/// kube's `patchAllocatedValues`: an update (a `kubectl apply` or `replace` of a manifest
/// without them) keeps the cluster IP and the node ports already allocated.
fn keep_allocated_values(current: &Value, new: &mut Value) {
    if has_cluster_ip(current) && has_cluster_ip(new) {
        let spec = &mut new["spec"];
        let empty = |v: &Value| v.is_null() || v == "";
        if empty(&spec["clusterIP"]) {
            spec["clusterIP"] = current["spec"]["clusterIP"].clone();
        }
        if spec["clusterIPs"].is_null() && spec["clusterIP"] == current["spec"]["clusterIP"] {
            spec["clusterIPs"] = current["spec"]["clusterIPs"].clone();
        }
    }
    if needs_node_ports(current) && needs_node_ports(new) {
        let node_ports = |object: &Value| -> HashSet<i64> {
            object["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| int(&p["nodePort"]))
                .filter(|n| *n != 0)
                .collect()
        };
        let used: HashSet<i64> = node_ports(current)
            .intersection(&node_ports(new))
            .copied()
            .collect();
        let by_name: HashMap<String, i64> = current["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    int(&p["nodePort"]),
                )
            })
            .collect();
        for port in ports_mut(new) {
            if port.get("nodePort").map_or(0, int) != 0 {
                continue;
            }
            let name = port.get("name").and_then(Value::as_str).unwrap_or_default();
            if let Some(old) = by_name.get(name)
                && *old != 0
                && !used.contains(old)
            {
                port.insert("nodePort".into(), json!(old));
            }
        }
    }
    if needs_health_check_port(current)
        && needs_health_check_port(new)
        && int(&new["spec"]["healthCheckNodePort"]) == 0
    {
        new["spec"]["healthCheckNodePort"] = current["spec"]["healthCheckNodePort"].clone();
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn cause(causes: &mut Vec<Cause>, field: impl Into<String>, message: impl Into<String>) {
    causes.push(Cause {
        field: field.into(),
        message: message.into(),
    });
}

fn unsupported(causes: &mut Vec<Cause>, field: impl Into<String>, value: &Value, allowed: &[&str]) {
    let listed: Vec<String> = allowed.iter().map(|v| format!("{v:?}")).collect();
    cause(
        causes,
        field,
        format!(
            "Unsupported value: {value}: supported values: {}",
            listed.join(", ")
        ),
    );
}

/// An IANA service name, what a named `targetPort` must be.
fn iana_service_name_error(name: &str) -> Option<&'static str> {
    if name.len() > 15 {
        return Some("must be no more than 15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if name.contains("--") {
        return Some("must not contain consecutive hyphens");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Some("must contain at least one letter (a-z)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("must not begin or end with a hyphen");
    }
    None
}

fn validate_port_number(causes: &mut Vec<Cause>, field: String, value: &Value) {
    match value.as_i64() {
        Some(1..=65535) => {}
        _ => cause(
            causes,
            field,
            format!("Invalid value: {value}: must be between 1 and 65535, inclusive"),
        ),
    }
}

fn validate_protocol(causes: &mut Vec<Cause>, field: String, value: &Value) {
    if !value.as_str().is_some_and(|p| PROTOCOLS.contains(&p)) {
        unsupported(causes, field, value, &PROTOCOLS);
    }
}

/// A port of a list of `count` (Service ports, Endpoints subset ports): its name (required
/// when there are several, unique among `names`), number and protocol.
fn validate_named_port(
    causes: &mut Vec<Cause>,
    at: &str,
    port: &Value,
    count: usize,
    names: &mut HashSet<String>,
) {
    let name = port["name"].as_str().unwrap_or_default();
    if count > 1 && name.is_empty() {
        cause(causes, format!("{at}.name"), "Required value");
    } else if !name.is_empty() {
        validate_port_name(causes, format!("{at}.name"), name);
        if !names.insert(name.to_string()) {
            cause(
                causes,
                format!("{at}.name"),
                format!("Duplicate value: {name:?}"),
            );
        }
    }
    validate_port_number(causes, format!("{at}.port"), &port["port"]);
    validate_protocol(causes, format!("{at}.protocol"), &port["protocol"]);
}

fn validate_port_name(causes: &mut Vec<Cause>, field: String, name: &str) {
    if !name.is_empty() && !objects::is_dns_label(name) {
        cause(
            causes,
            field,
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
            ),
        );
    }
}

/// The metadata name of a Service: a DNS label (kube 1.34+ accepts a leading digit).
pub fn validate_service_name(name: &str, causes: &mut Vec<Cause>) {
    if name.contains('.') {
        cause(
            causes,
            "metadata.name",
            format!("Invalid value: {name:?}: must not contain dots"),
        );
    } else if !objects::is_dns_label(name) {
        cause(
            causes,
            "metadata.name",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
            ),
        );
    }
}

/// Validates one of the three kinds; `plural` picks which.
pub fn validate(plural: &str, object: &Value, causes: &mut Vec<Cause>) {
    match plural {
        "services" => validate_service(object, causes),
        "endpoints" => validate_endpoints(object, causes),
        "endpointslices" => validate_endpoint_slice(object, causes),
        _ => {}
    }
}

/// The IP family checks kube-apiserver makes first; any of them failing ends validation, as
/// there. This cluster is IPv4 single-stack.
fn validate_families(spec: &Value, causes: &mut Vec<Cause>) {
    let ip = spec["clusterIP"].as_str().unwrap_or_default();
    let ips: Vec<&str> = spec["clusterIPs"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap_or_default()).collect())
        .unwrap_or_default();
    if spec["type"] == "ExternalName" {
        // Checked with the type's other rules, in kube-apiserver's order.
        return;
    }
    if !spec["clusterIPs"].is_null() && !spec["clusterIPs"].is_array() {
        cause(
            causes,
            "spec.clusterIPs",
            "Invalid value: must be a list of strings",
        );
        return;
    }
    if ips.len() > 1 {
        if ip.is_empty() {
            cause(
                causes,
                "spec.clusterIPs",
                format!(
                    "Invalid value: {}: must be empty when `clusterIP` is not specified",
                    list_text(&ips)
                ),
            );
        }
        cause(
            causes,
            "spec.clusterIPs",
            format!(
                "Invalid value: {}: may specify no more than one IP for each IP family",
                list_text(&ips)
            ),
        );
        return;
    }
    if let Some(first) = ips.first()
        && *first != ip
    {
        cause(
            causes,
            "spec.clusterIPs",
            format!(
                "Invalid value: {}: first value must match `clusterIP`",
                list_text(&ips)
            ),
        );
        return;
    }
    match spec["ipFamilyPolicy"].as_str() {
        Some("SingleStack" | "PreferDualStack") => {}
        Some("RequireDualStack") => {
            cause(
                causes,
                "spec.ipFamilyPolicy",
                "Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services",
            );
            return;
        }
        _ => {
            unsupported(
                causes,
                "spec.ipFamilyPolicy",
                &spec["ipFamilyPolicy"],
                &["PreferDualStack", "RequireDualStack", "SingleStack"],
            );
            return;
        }
    }
    let families = spec["ipFamilies"].as_array().cloned().unwrap_or_default();
    for (i, family) in families.iter().enumerate() {
        match family.as_str() {
            Some("IPv4") => {}
            Some("IPv6") => {
                cause(
                    causes,
                    format!("spec.ipFamilies[{i}]"),
                    "Invalid value: \"IPv6\": not configured on this cluster",
                );
                return;
            }
            _ => {
                unsupported(
                    causes,
                    format!("spec.ipFamilies[{i}]"),
                    family,
                    &["IPv4", "IPv6"],
                );
                return;
            }
        }
    }
    if families.len() > 1 {
        cause(
            causes,
            "spec.ipFamilies",
            format!(
                "Invalid value: {}: this cluster is single-stack (IPv4): at most one IP family",
                Value::Array(families)
            ),
        );
        return;
    }
    if !ip.is_empty() && ip != "None" {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => {}
            Ok(IpAddr::V6(_)) => cause(
                causes,
                "spec.clusterIPs[0]",
                format!(
                    "Invalid value: {}: IPv6 is not configured on this cluster",
                    list_text(&[ip])
                ),
            ),
            Err(_) => cause(
                causes,
                "spec.clusterIPs[0]",
                format!(
                    "Invalid value: {ip:?}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
                ),
            ),
        }
    }
}

/// kube-apiserver's `ValidateService`, its checks in its order (kubectl prints the causes in
/// the order they come).
fn validate_service(object: &Value, causes: &mut Vec<Cause>) {
    let spec = &object["spec"];
    let mut families = Vec::new();
    validate_families(spec, &mut families);
    if !families.is_empty() {
        causes.append(&mut families);
        return;
    }
    let kind = spec["type"].as_str().unwrap_or_default();
    let headless = spec["clusterIP"] == "None";
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if !spec["ports"].is_null() && !spec["ports"].is_array() {
        cause(causes, "spec.ports", "Invalid value: must be a list");
    }
    if ports.is_empty() && !headless && kind != "ExternalName" {
        cause(causes, "spec.ports", "Required value");
    }
    match kind {
        "NodePort" | "LoadBalancer" if headless => cause(
            causes,
            "spec.clusterIPs[0]",
            format!("Invalid value: \"None\": may not be set to 'None' for {kind} services"),
        ),
        "ExternalName" => {
            let has_ip = !cluster_ip(object).is_empty()
                || spec["clusterIPs"].as_array().is_some_and(|a| !a.is_empty());
            if has_ip {
                cause(
                    causes,
                    "spec.clusterIPs",
                    "Forbidden: may not be set for ExternalName services",
                );
            }
            match spec["externalName"].as_str() {
                None | Some("") => cause(causes, "spec.externalName", "Required value"),
                Some(name) => {
                    let bare = name.strip_suffix('.').unwrap_or(name);
                    if !objects::is_dns_subdomain(bare) {
                        cause(
                            causes,
                            "spec.externalName",
                            format!(
                                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                            ),
                        );
                    }
                }
            }
        }
        _ => {}
    }
    let mut names = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        validate_named_port(causes, &at, port, ports.len(), &mut names);
        match &port["targetPort"] {
            Value::String(target) => {
                if let Some(reason) = iana_service_name_error(target) {
                    cause(
                        causes,
                        format!("{at}.targetPort"),
                        format!("Invalid value: {target:?}: {reason}"),
                    );
                }
            }
            other => validate_port_number(causes, format!("{at}.targetPort"), other),
        }
        let node_port = int(&port["nodePort"]);
        if !(0..=65535).contains(&node_port) {
            cause(
                causes,
                format!("{at}.nodePort"),
                format!("Invalid value: {node_port}: must be between 1 and 65535, inclusive"),
            );
        }
    }
    if let Some(selector) = spec["selector"].as_object() {
        for (key, value) in selector {
            if !objects::is_qualified_name(key) {
                cause(
                    causes,
                    "spec.selector",
                    format!(
                        "Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.'"
                    ),
                );
            }
            if !value
                .as_str()
                .is_some_and(|v| v.is_empty() || objects::is_label_name(v))
            {
                cause(
                    causes,
                    "spec.selector",
                    format!(
                        "Invalid value: {value}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"
                    ),
                );
            }
        }
    } else if !spec["selector"].is_null() {
        cause(causes, "spec.selector", "Invalid value: must be a map");
    }
    match spec["sessionAffinity"].as_str() {
        Some("None") => {}
        Some("ClientIP") => {
            let timeout = &spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"];
            if !timeout
                .as_i64()
                .is_some_and(|t| t > 0 && t <= MAX_AFFINITY_TIMEOUT)
            {
                cause(
                    causes,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!(
                        "Invalid value: {timeout}: must be greater than 0 and less than {MAX_AFFINITY_TIMEOUT}"
                    ),
                );
            }
        }
        _ => unsupported(
            causes,
            "spec.sessionAffinity",
            &spec["sessionAffinity"],
            &["ClientIP", "None"],
        ),
    }
    if (!kind.is_empty() && !TYPES.contains(&kind)) || !spec["type"].is_string() {
        unsupported(causes, "spec.type", &spec["type"], &TYPES);
    }
    let mut keys = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        if kind == "ClusterIP" && int(&port["nodePort"]) != 0 {
            cause(
                causes,
                format!("{at}.nodePort"),
                "Forbidden: may not be used when `type` is 'ClusterIP'",
            );
        }
        let key = (int(&port["port"]), port["protocol"].to_string());
        if !keys.insert(key) {
            cause(
                causes,
                at,
                format!(
                    "Duplicate value: {{\"Port\":{},\"Protocol\":{}}}",
                    port["port"], port["protocol"]
                ),
            );
        }
    }
    for (i, ip) in spec["externalIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if ip.as_str().is_none_or(|s| s.parse::<IpAddr>().is_err()) {
            cause(
                causes,
                format!("spec.externalIPs[{i}]"),
                format!(
                    "Invalid value: {ip}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
                ),
            );
        }
    }
    let external = matches!(kind, "NodePort" | "LoadBalancer");
    let etp = &spec["externalTrafficPolicy"];
    if !etp.is_null() {
        if !external {
            cause(
                causes,
                "spec.externalTrafficPolicy",
                format!("Invalid value: {etp}: may only be set for externally-accessible services"),
            );
        } else if !matches!(etp.as_str(), Some("Cluster" | "Local")) {
            unsupported(
                causes,
                "spec.externalTrafficPolicy",
                etp,
                &["Cluster", "Local"],
            );
        }
    }
    let health = int(&spec["healthCheckNodePort"]);
    if health != 0 && !needs_health_check_port(object) {
        cause(
            causes,
            "spec.healthCheckNodePort",
            format!(
                "Invalid value: {health}: may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"
            ),
        );
    }
    let itp = &spec["internalTrafficPolicy"];
    if !itp.is_null() && !matches!(itp.as_str(), Some("Cluster" | "Local")) {
        unsupported(
            causes,
            "spec.internalTrafficPolicy",
            itp,
            &["Cluster", "Local"],
        );
    }
    if !spec["publishNotReadyAddresses"].is_null() && !spec["publishNotReadyAddresses"].is_boolean()
    {
        cause(
            causes,
            "spec.publishNotReadyAddresses",
            "Invalid value: must be a boolean",
        );
    }
}

fn validate_ip(causes: &mut Vec<Cause>, field: String, value: &Value) {
    if value.as_str().is_none_or(|s| s.parse::<IpAddr>().is_err()) {
        let shown = value
            .as_str()
            .map_or_else(|| value.to_string(), |s| format!("{s:?}"));
        cause(
            causes,
            field,
            format!(
                "Invalid value: {shown}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
            ),
        );
    }
}

fn validate_endpoints(object: &Value, causes: &mut Vec<Cause>) {
    for (s, subset) in object["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        for list in ["addresses", "notReadyAddresses"] {
            for (a, address) in subset[list].as_array().into_iter().flatten().enumerate() {
                validate_ip(
                    causes,
                    format!("subsets[{s}].{list}[{a}].ip"),
                    &address["ip"],
                );
            }
        }
        let ports = subset["ports"].as_array().cloned().unwrap_or_default();
        let mut names = HashSet::new();
        for (p, port) in ports.iter().enumerate() {
            let at = format!("subsets[{s}].ports[{p}]");
            validate_named_port(causes, &at, port, ports.len(), &mut names);
        }
    }
}

/// kube-apiserver's limits on one EndpointSlice.
const MAX_SLICE_ENDPOINTS: usize = 1000;
const MAX_SLICE_PORTS: usize = 20000;
const MAX_ENDPOINT_ADDRESSES: usize = 100;

fn validate_endpoint_slice(object: &Value, causes: &mut Vec<Cause>) {
    let address_type = object["addressType"].as_str().unwrap_or_default();
    match address_type {
        "" => cause(causes, "addressType", "Required value"),
        "IPv4" | "IPv6" | "FQDN" => {}
        _ => unsupported(
            causes,
            "addressType",
            &object["addressType"],
            &["FQDN", "IPv4", "IPv6"],
        ),
    }
    let ports = object["ports"].as_array().cloned().unwrap_or_default();
    if ports.len() > MAX_SLICE_PORTS {
        cause(
            causes,
            "ports",
            format!(
                "Too many: {}: must have at most {MAX_SLICE_PORTS} items",
                ports.len()
            ),
        );
    }
    let mut names = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let name = port["name"].as_str().unwrap_or_default();
        validate_port_name(causes, format!("ports[{i}].name"), name);
        if !names.insert(name.to_string()) {
            cause(
                causes,
                format!("ports[{i}].name"),
                format!("Duplicate value: {name:?}"),
            );
        }
        if !port["port"].is_null() {
            match port["port"].as_i64() {
                Some(0..=65535) => {}
                _ => cause(
                    causes,
                    format!("ports[{i}].port"),
                    format!(
                        "Invalid value: {}: must be between 0 and 65535, inclusive",
                        port["port"]
                    ),
                ),
            }
        }
        validate_protocol(causes, format!("ports[{i}].protocol"), &port["protocol"]);
    }
    let endpoints = object["endpoints"].as_array().cloned().unwrap_or_default();
    if endpoints.len() > MAX_SLICE_ENDPOINTS {
        cause(
            causes,
            "endpoints",
            format!(
                "Too many: {}: must have at most {MAX_SLICE_ENDPOINTS} items",
                endpoints.len()
            ),
        );
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        let addresses = endpoint["addresses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if addresses.is_empty() {
            cause(
                causes,
                format!("endpoints[{i}].addresses"),
                "Required value: must contain at least 1 address",
            );
        } else if addresses.len() > MAX_ENDPOINT_ADDRESSES {
            cause(
                causes,
                format!("endpoints[{i}].addresses"),
                format!(
                    "Too many: {}: must have at most {MAX_ENDPOINT_ADDRESSES} items",
                    addresses.len()
                ),
            );
        }
        for (a, address) in addresses.iter().enumerate() {
            let text = address.as_str().unwrap_or_default();
            let ok = match address_type {
                "IPv4" => text.parse::<Ipv4Addr>().is_ok(),
                "IPv6" => text.parse::<std::net::Ipv6Addr>().is_ok(),
                "FQDN" => objects::is_dns_subdomain(text),
                _ => true,
            };
            if !ok {
                let what = match address_type {
                    "FQDN" => "must be a valid DNS subdomain",
                    "IPv6" => "must be a valid IPv6 address",
                    _ => "must be a valid IPv4 address",
                };
                cause(
                    causes,
                    format!("endpoints[{i}].addresses[{a}]"),
                    format!("Invalid value: {address}: {what}"),
                );
            }
        }
        if let Some(hostname) = endpoint["hostname"].as_str()
            && !objects::is_dns_label(hostname)
        {
            cause(
                causes,
                format!("endpoints[{i}].hostname"),
                format!(
                    "Invalid value: {hostname:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
                ),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Allocation
// ---------------------------------------------------------------------------------------------

/// Cluster IPs and node ports taken by the stored Services other than the one being written.
#[derive(Debug, Default)]
struct Taken {
    ips: HashSet<u32>,
    node_ports: HashSet<i64>,
}

impl Taken {
    fn read(store: &Store, namespace: &str, name: &str) -> Result<Taken, StoreError> {
        let (services, _) = store.list(&services_id(), None)?;
        let mut taken = Taken::default();
        for service in &services {
            if service["metadata"]["namespace"] == namespace && service["metadata"]["name"] == name
            {
                continue;
            }
            taken.add(service);
        }
        Ok(taken)
    }

    fn add(&mut self, service: &Value) {
        if let Ok(ip) = cluster_ip(service).parse::<Ipv4Addr>() {
            self.ips.insert(u32::from(ip));
        }
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            let node_port = int(&port["nodePort"]);
            if node_port != 0 {
                self.node_ports.insert(node_port);
            }
        }
        let health = int(&service["spec"]["healthCheckNodePort"]);
        if health != 0 {
            self.node_ports.insert(health);
        }
    }
}

fn services_id() -> ResourceId {
    ResourceId {
        group: String::new(),
        resource: "services".into(),
    }
}

/// Hands out cluster IPs and node ports. One lock serializes every Service write (allocation
/// and the store write behind it), so what a write reads as taken is exactly what is stored.
#[derive(Debug)]
pub struct Allocator {
    ranges: ServiceRanges,
    /// Held from reading what is taken until the Service is written (or refused).
    lock: Mutex<()>,
}

/// Proof that the allocation lock is held; keep it until the write is done.
pub type AllocationGuard<'a> = std::sync::MutexGuard<'a, ()>;

impl Allocator {
    /// An allocator over `ranges`.
    pub fn new(ranges: ServiceRanges) -> Allocator {
        Allocator {
            ranges,
            lock: Mutex::new(()),
        }
    }

    /// The ranges allocated from.
    pub fn ranges(&self) -> ServiceRanges {
        self.ranges
    }

    /// Allocates what `new` (a Service about to be created, or to replace `current`) lacks
    /// and checks what it asks for: a cluster IP unless ExternalName or headless, node ports
    /// for NodePort and LoadBalancer, a health check port for a LoadBalancer with
    /// `externalTrafficPolicy: Local`. Returns the lock, to be held until the write is done.
    /// Blocking (reads the store).
    pub fn allocate(
        &self,
        store: &Store,
        current: Option<&Value>,
        new: &mut Value,
    ) -> Result<AllocationGuard<'_>, ApiError> {
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let (namespace, name) = objects::key(new);
        let taken = Taken::read(store, &namespace, &name)
            .map_err(|e| ApiError::internal(format!("cannot read the allocated services: {e}")))?;
        self.assign(&taken, current, new)
            .map_err(|causes| ApiError::invalid("Service", &name, causes))?;
        Ok(guard)
    }

    /// The allocation itself, given what is taken.
    fn assign(
        &self,
        taken: &Taken,
        current: Option<&Value>,
        new: &mut Value,
    ) -> Result<(), Vec<Cause>> {
        let mut causes = Vec::new();
        if has_cluster_ip(new) && cluster_ip(new) != "None" {
            let own = current
                .filter(|c| has_cluster_ip(c))
                .map(|c| cluster_ip(c).to_string());
            let requested = cluster_ip(new).to_string();
            if requested.is_empty() {
                match self.next_ip(taken) {
                    Some(ip) => {
                        new["spec"]["clusterIP"] = json!(ip.to_string());
                        new["spec"]["clusterIPs"] = json!([ip.to_string()]);
                    }
                    None => {
                        return Err(vec![Cause {
                            field: "spec.clusterIPs".into(),
                            message: format!(
                                "Internal error: failed to allocate a serviceIP: range {} is full",
                                self.ranges.cluster_ip
                            ),
                        }]);
                    }
                }
            } else if own.as_deref() != Some(requested.as_str()) {
                let ip: Ipv4Addr = requested.parse().map_err(|_| {
                    vec![Cause {
                        field: "spec.clusterIPs[0]".into(),
                        message: format!(
                            "Invalid value: {requested:?}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
                        ),
                    }]
                })?;
                let why = if !self.ranges.cluster_ip.contains(ip) {
                    Some("the provided network does not match the current range")
                } else if taken.ips.contains(&u32::from(ip)) {
                    Some("provided IP is already allocated")
                } else {
                    None
                };
                if let Some(why) = why {
                    causes.push(Cause {
                        field: "spec.clusterIPs".into(),
                        message: format!(
                            "Invalid value: {}: failed to allocate IP {ip}: {why}",
                            list_text(&[&requested])
                        ),
                    });
                    return Err(causes);
                }
                new["spec"]["clusterIPs"] = json!([requested]);
            }
        }
        let mut own_ports: HashSet<i64> = HashSet::new();
        if let Some(current) = current {
            let mut mine = Taken::default();
            mine.add(current);
            own_ports = mine.node_ports;
        }
        let mut used: HashSet<i64> = HashSet::new();
        if needs_node_ports(new) {
            let count = new["spec"]["ports"].as_array().map_or(0, Vec::len);
            // Ports asked for first, then the rest allocated around them; a port number with
            // two protocols shares one node port, as kube-apiserver does.
            let mut requested: HashMap<i64, i64> = HashMap::new();
            for i in 0..count {
                let node_port = int(&new["spec"]["ports"][i]["nodePort"]);
                if node_port == 0 {
                    continue;
                }
                let port = int(&new["spec"]["ports"][i]["port"]);
                let why = if own_ports.contains(&node_port) {
                    None
                } else {
                    self.port_refusal(taken, node_port)
                };
                // Within one Service a node port serves one port number (its protocols).
                let why = why.or_else(|| {
                    (requested.get(&node_port).is_some_and(|p| *p != port))
                        .then(|| "provided port is already allocated".to_string())
                });
                if let Some(why) = why {
                    causes.push(Cause {
                        field: format!("spec.ports[{i}].nodePort"),
                        message: format!("Invalid value: {node_port}: {why}"),
                    });
                    continue;
                }
                requested.insert(node_port, port);
                used.insert(node_port);
            }
            if !causes.is_empty() {
                return Err(causes);
            }
            let mut by_port: HashMap<i64, i64> = HashMap::new();
            for i in 0..count {
                let port = &new["spec"]["ports"][i];
                if int(&port["nodePort"]) != 0 {
                    by_port.insert(int(&port["port"]), int(&port["nodePort"]));
                }
            }
            for i in 0..count {
                if int(&new["spec"]["ports"][i]["nodePort"]) != 0 {
                    continue;
                }
                let port = int(&new["spec"]["ports"][i]["port"]);
                let chosen = match by_port.get(&port) {
                    Some(shared) => *shared,
                    None => self.next_port(taken, &used).ok_or_else(|| {
                        vec![Cause {
                            field: format!("spec.ports[{i}].nodePort"),
                            message: format!(
                                "Internal error: failed to allocate a nodePort: range {} is full",
                                self.ranges.node_ports
                            ),
                        }]
                    })?,
                };
                used.insert(chosen);
                by_port.insert(port, chosen);
                new["spec"]["ports"][i]["nodePort"] = json!(chosen);
            }
        }
        if needs_health_check_port(new) {
            let health = int(&new["spec"]["healthCheckNodePort"]);
            if health == 0 {
                let chosen = self.next_port(taken, &used).ok_or_else(|| {
                    vec![Cause {
                        field: "spec.healthCheckNodePort".into(),
                        message: format!(
                            "Internal error: failed to allocate a nodePort: range {} is full",
                            self.ranges.node_ports
                        ),
                    }]
                })?;
                new["spec"]["healthCheckNodePort"] = json!(chosen);
            } else if !own_ports.contains(&health)
                && let Some(why) = self.port_refusal(taken, health).or_else(|| {
                    used.contains(&health)
                        .then(|| "provided port is already allocated".to_string())
                })
            {
                return Err(vec![Cause {
                    field: "spec.healthCheckNodePort".into(),
                    message: format!("Invalid value: {health}: {why}"),
                }]);
            }
        }
        Ok(())
    }

    fn port_refusal(&self, taken: &Taken, port: i64) -> Option<String> {
        if !self.ranges.node_ports.contains(port) {
            return Some(format!(
                "provided port is not in the valid range. The range of valid ports is {}",
                self.ranges.node_ports
            ));
        }
        taken
            .node_ports
            .contains(&port)
            .then(|| "provided port is already allocated".to_string())
    }

    /// A free cluster IP: kube's split range, the upper part first (addresses asked for by
    /// name usually sit in the lower part), never the first address (`default/kubernetes`).
    fn next_ip(&self, taken: &Taken) -> Option<Ipv4Addr> {
        let range = self.ranges.cluster_ip;
        let size = range.size();
        let low = (size / 16).clamp(16, 256).min(size);
        let start = range.network + 1;
        let free = |ip: u32| ip != start && !taken.ips.contains(&ip);
        let pick = |from: u32, count: u32| -> Option<u32> {
            if count == 0 {
                return None;
            }
            let offset = rand::rng().random_range(0..count);
            (0..count)
                .map(|i| from + (offset + i) % count)
                .find(|ip| free(*ip))
        };
        pick(start + low, size - low)
            .or_else(|| pick(start, low))
            .map(Ipv4Addr::from)
    }

    /// A free node port, the upper part of the range first, as kube-apiserver does.
    fn next_port(&self, taken: &Taken, used: &HashSet<i64>) -> Option<i64> {
        let first = i64::from(self.ranges.node_ports.first);
        let size = i64::from(self.ranges.node_ports.last) - first + 1;
        let low = (size / 32).clamp(16, 128).min(size);
        let free = |p: i64| !taken.node_ports.contains(&p) && !used.contains(&p);
        let pick = |from: i64, count: i64| -> Option<i64> {
            if count <= 0 {
                return None;
            }
            let offset = rand::rng().random_range(0..count);
            (0..count)
                .map(|i| from + (offset + i) % count)
                .find(|p| free(*p))
        };
        pick(first + low, size - low).or_else(|| pick(first, low))
    }
}

// ---------------------------------------------------------------------------------------------
// default/kubernetes
// ---------------------------------------------------------------------------------------------

/// Creates or corrects `default/kubernetes` (cluster IP the range's first address, port 443
/// named `https` to the API's port, no selector) and its Endpoints and EndpointSlice pointing
/// at `api`, as kube-apiserver's bootstrap controller does. Blocking; writes the store
/// directly (the API's own housekeeping).
pub fn bootstrap_kubernetes(
    store: &Store,
    allocator: &Allocator,
    api: std::net::SocketAddr,
) -> Result<(), ApiError> {
    let store_error = |e: StoreError| ApiError::internal(format!("default/kubernetes: {e}"));
    let port = api.port();
    let ip = api.ip().to_string();
    let now = OffsetDateTime::now_utc();
    let service_info =
        super::resources::lookup("", "v1", "services").expect("services is a builtin resource");
    let want_ports = json!([{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]);
    let first = allocator.ranges().cluster_ip.first().to_string();
    {
        let id = services_id();
        match store
            .get(&id, "default", "kubernetes")
            .map_err(store_error)?
        {
            None => {
                let mut service = json!({
                    "metadata": {"name": "kubernetes", "namespace": "default",
                                 "labels": {"component": "apiserver", "provider": "kubernetes"}},
                    "spec": {"type": "ClusterIP", "clusterIP": first, "ports": want_ports,
                             "sessionAffinity": "None"},
                });
                objects::prepare_create(service_info, &mut service, now)?;
                let _guard = allocator.allocate(store, None, &mut service)?;
                match store.create(&id, "default", "kubernetes", service) {
                    Ok(_) | Err(StoreError::AlreadyExists) => {}
                    Err(e) => return Err(store_error(e)),
                }
            }
            Some(service) if service["spec"]["ports"] != want_ports => {
                let mut updated = service.clone();
                updated["spec"]["ports"] = want_ports;
                store
                    .update(&id, "default", "kubernetes", updated, None)
                    .map_err(store_error)?;
            }
            Some(_) => {}
        }
    }
    let endpoints = json!({
        "subsets": [{"addresses": [{"ip": ip}],
                     "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
    });
    let slice = json!({
        "addressType": if api.is_ipv4() { "IPv4" } else { "IPv6" },
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    });
    for (plural, group, body) in [
        ("endpoints", "", endpoints),
        ("endpointslices", "discovery.k8s.io", slice),
    ] {
        let info = super::resources::lookup(group, "v1", plural).expect("builtin resource");
        let id = objects::resource_id(info);
        let labels = if plural == "endpointslices" {
            json!({SERVICE_NAME_LABEL: "kubernetes"})
        } else {
            json!({"endpointslice.kubernetes.io/skip-mirror": "true"})
        };
        let content = |o: &Value| -> Map<String, Value> {
            o.as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "kind" | "apiVersion"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        match store
            .get(&id, "default", "kubernetes")
            .map_err(store_error)?
        {
            None => {
                let mut object = body;
                object["metadata"] =
                    json!({"name": "kubernetes", "namespace": "default", "labels": labels});
                objects::prepare_create(info, &mut object, now)?;
                match store.create(&id, "default", "kubernetes", object) {
                    Ok(_) | Err(StoreError::AlreadyExists) => {}
                    Err(e) => return Err(store_error(e)),
                }
            }
            Some(stored) => {
                let mut wanted = body;
                prepare_create(plural, &mut wanted);
                if content(&stored) != content(&wanted) {
                    let mut updated = stored.clone();
                    for (k, v) in content(&wanted) {
                        updated[k] = v;
                    }
                    if plural == "endpointslices" {
                        updated["metadata"]["generation"] =
                            json!(int(&stored["metadata"]["generation"]) + 1);
                    }
                    store
                        .update(&id, "default", "kubernetes", updated, None)
                        .map_err(store_error)?;
                }
            }
        }
    }
    Ok(())
}

/// The address `default/kubernetes` points at: the API's bound address, or when it is bound
/// to every interface the first non-loopback IP among `candidates` (the advertised addresses),
/// else loopback.
pub fn api_endpoint(bound: std::net::SocketAddr, candidates: &[String]) -> std::net::SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = candidates
        .iter()
        .filter_map(|c| c.parse::<IpAddr>().ok())
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    std::net::SocketAddr::new(ip, bound.port())
}

/// `k=v,k2=v2` sorted by key, what kubectl prints for a selector map.
pub fn selector_text(selector: &Value) -> String {
    let Some(map) = selector.as_object() else {
        return String::new();
    };
    let sorted: BTreeMap<&String, &Value> = map.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(plural: &str) -> &'static super::super::resources::ResourceInfo {
        let group = if plural == "endpointslices" {
            "discovery.k8s.io"
        } else {
            ""
        };
        super::super::resources::lookup(group, "v1", plural).expect("builtin")
    }

    fn create(object: Value) -> Result<Value, ApiError> {
        let mut object = object;
        objects::prepare_create(info("services"), &mut object, OffsetDateTime::now_utc())?;
        Ok(object)
    }

    fn svc(spec: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec})
    }

    fn fields(e: &ApiError) -> Vec<String> {
        e.causes()
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect()
    }

    #[test]
    fn ranges_parse_and_refuse_what_cannot_be_served() {
        let r: ClusterIpRange = "10.96.0.0/12".parse().expect("range");
        assert_eq!(r.first(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(r.contains(Ipv4Addr::new(10, 111, 255, 254)));
        assert!(!r.contains(Ipv4Addr::new(10, 111, 255, 255)), "broadcast");
        assert!(!r.contains(Ipv4Addr::new(10, 96, 0, 0)), "network");
        assert!(!r.contains(Ipv4Addr::new(10, 112, 0, 1)));
        assert_eq!(r.to_string(), "10.96.0.0/12");
        for bad in [
            "10.96.0.1/12",
            "fd00::/108",
            "10.96.0.0",
            "10.0.0.0/31",
            "x/8",
        ] {
            assert!(bad.parse::<ClusterIpRange>().is_err(), "{bad}");
        }
        let p: NodePortRange = "30000-32767".parse().expect("ports");
        assert!(p.contains(30000) && p.contains(32767) && !p.contains(32768));
        for bad in ["0-10", "20-10", "30000", "a-b"] {
            assert!(bad.parse::<NodePortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn services_get_kube_apiservers_defaults() {
        let s = create(svc(
            json!({"ports": [{"port": 80}], "selector": {"app": "web"}}),
        ))
        .expect("valid");
        let spec = &s["spec"];
        assert_eq!(spec["type"], "ClusterIP");
        assert_eq!(spec["sessionAffinity"], "None");
        assert_eq!(spec["internalTrafficPolicy"], "Cluster");
        assert_eq!(spec["ipFamilies"], json!(["IPv4"]));
        assert_eq!(spec["ipFamilyPolicy"], "SingleStack");
        assert_eq!(
            spec["ports"][0],
            json!({"port": 80, "protocol": "TCP", "targetPort": 80})
        );
        assert!(spec.get("externalTrafficPolicy").is_none());
        assert_eq!(s["status"], json!({"loadBalancer": {}}));

        let s = create(svc(json!({"type": "LoadBalancer", "ports": [{"port": 80}],
            "sessionAffinity": "ClientIP"})))
        .expect("valid");
        assert_eq!(s["spec"]["externalTrafficPolicy"], "Cluster");
        assert_eq!(s["spec"]["allocateLoadBalancerNodePorts"], true);
        assert_eq!(
            s["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
        let s = create(svc(
            json!({"type": "ExternalName", "externalName": "example.com"}),
        ))
        .expect("valid");
        assert!(s["spec"].get("ipFamilies").is_none());
        assert!(s["spec"].get("clusterIP").is_none());
        let s = create(svc(json!({"clusterIP": "None"}))).expect("headless needs no ports");
        assert_eq!(s["spec"]["clusterIPs"], json!(["None"]));
    }

    #[test]
    fn invalid_services_are_refused_with_kube_apiservers_paths() {
        let e = create(svc(json!({"ports": [{"port": 80}, {"port": 81}]}))).expect_err("names");
        assert_eq!(
            fields(&e),
            [
                "spec.ports[0].name: Required value",
                "spec.ports[1].name: Required value"
            ]
        );
        assert_eq!(e.code.as_u16(), 422);
        let e = create(svc(json!({"ports": [{"port": 80}],
            "ipFamilyPolicy": "RequireDualStack"})))
        .expect_err("dual stack");
        assert_eq!(
            fields(&e),
            [
                "spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services"
            ]
        );
        let e = create(svc(
            json!({"ports": [{"port": 80}], "ipFamilies": ["IPv6"]}),
        ))
        .expect_err("ipv6");
        assert_eq!(
            fields(&e),
            ["spec.ipFamilies[0]: Invalid value: \"IPv6\": not configured on this cluster"]
        );
        let e = create(svc(json!({"ports": [{"port": 80, "nodePort": 30001,
            "targetPort": "Bad_Name", "protocol": "XX"}], "sessionAffinity": "Foo"})))
        .expect_err("several");
        let got = fields(&e);
        for want in [
            "spec.ports[0].protocol: Unsupported value: \"XX\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
            "spec.ports[0].targetPort: Invalid value: \"Bad_Name\": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
            "spec.sessionAffinity: Unsupported value: \"Foo\": supported values: \"ClientIP\", \"None\"",
            "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'",
        ] {
            assert!(got.iter().any(|g| g == want), "{want} not in {got:?}");
        }
        let e = create(svc(json!({"type": "NodePort", "clusterIP": "None",
            "ports": [{"port": 80}]})))
        .expect_err("headless nodeport");
        assert_eq!(
            fields(&e),
            [
                "spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None' for NodePort services"
            ]
        );
        let e = create(svc(json!({"type": "ExternalName"}))).expect_err("no name");
        assert_eq!(fields(&e), ["spec.externalName: Required value"]);
        let e = create(json!({"metadata": {"name": "b.ad"}, "spec": {"ports": [{"port": 80}]}}))
            .expect_err("dots");
        assert_eq!(
            fields(&e),
            ["metadata.name: Invalid value: \"b.ad\": must not contain dots"]
        );
        let e = create(svc(
            json!({"ports": [{"port": 80}], "externalTrafficPolicy": "Local"}),
        ))
        .expect_err("etp");
        assert_eq!(
            fields(&e),
            [
                "spec.externalTrafficPolicy: Invalid value: \"Local\": may only be set for externally-accessible services"
            ]
        );
    }

    #[test]
    fn updates_keep_allocations_and_refuse_a_new_cluster_ip() {
        let update = |current: &Value, new: Value| -> Result<Value, ApiError> {
            let mut new = new;
            objects::prepare_update(info("services"), None, current, &mut new)?;
            Ok(new)
        };
        let mut current = create(svc(json!({"type": "NodePort",
            "ports": [{"name": "http", "port": 80}]})))
        .expect("valid");
        current["spec"]["clusterIP"] = json!("10.96.0.10");
        current["spec"]["clusterIPs"] = json!(["10.96.0.10"]);
        current["spec"]["ports"][0]["nodePort"] = json!(30080);
        // An apply of the original manifest keeps what was allocated.
        let kept = update(
            &current,
            svc(json!({"type": "NodePort", "ports": [{"name": "http", "port": 80}]})),
        )
        .expect("kept");
        assert_eq!(kept["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(kept["spec"]["ports"][0]["nodePort"], 30080);
        let e = update(
            &current,
            svc(json!({"type": "NodePort", "clusterIP": "10.96.0.11",
                "ports": [{"name": "http", "port": 80}]})),
        )
        .expect_err("immutable");
        assert_eq!(
            fields(&e),
            ["spec.clusterIPs[0]: Invalid value: [\"10.96.0.11\"]: may not change once set"]
        );
        // NodePort -> ClusterIP drops the node port and the external policy.
        let mut to_cluster_ip = current.clone();
        to_cluster_ip["spec"]["type"] = json!("ClusterIP");
        let changed = update(&current, to_cluster_ip).expect("type change");
        assert!(changed["spec"]["ports"][0].get("nodePort").is_none());
        assert!(changed["spec"].get("externalTrafficPolicy").is_none());
        // -> ExternalName drops the cluster IP and families.
        let mut to_external = current.clone();
        to_external["spec"]["type"] = json!("ExternalName");
        to_external["spec"]["externalName"] = json!("db.example.com");
        let changed = update(&current, to_external).expect("to ExternalName");
        assert!(changed["spec"].get("clusterIP").is_none());
        assert!(changed["spec"].get("ipFamilies").is_none());
    }

    #[test]
    fn the_allocator_checks_requests_and_fills_the_rest() {
        let ranges = ServiceRanges {
            cluster_ip: "10.96.0.0/28".parse().expect("range"),
            node_ports: "30000-30002".parse().expect("ports"),
        };
        let allocator = Allocator::new(ranges);
        let mut taken = Taken::default();
        taken.add(&svc(json!({"clusterIP": "10.96.0.5",
            "ports": [{"port": 80, "nodePort": 30000}]})));
        let mut s = create(svc(json!({"type": "NodePort", "ports": [
            {"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "UDP"},
            {"name": "c", "port": 81}]})))
        .expect("valid");
        allocator.assign(&taken, None, &mut s).expect("allocated");
        let ip: Ipv4Addr = cluster_ip(&s).parse().expect("ip");
        assert!(ranges.cluster_ip.contains(ip) && ip != Ipv4Addr::new(10, 96, 0, 5));
        assert_ne!(
            ip,
            ranges.cluster_ip.first(),
            "reserved for default/kubernetes"
        );
        let ports: Vec<i64> = (0..3)
            .map(|i| int(&s["spec"]["ports"][i]["nodePort"]))
            .collect();
        assert_eq!(
            ports[0], ports[1],
            "one node port for both protocols of a port"
        );
        assert!(ports.iter().all(|p| (30001..=30002).contains(p)) && ports[0] != ports[2]);

        let refuse = |spec: Value| -> Vec<String> {
            let mut s = create(svc(spec)).expect("valid");
            allocator
                .assign(&taken, None, &mut s)
                .expect_err("refused")
                .into_iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect()
        };
        assert_eq!(
            refuse(json!({"clusterIP": "10.96.0.5", "ports": [{"port": 80}]})),
            [
                "spec.clusterIPs: Invalid value: [\"10.96.0.5\"]: failed to allocate IP 10.96.0.5: provided IP is already allocated"
            ]
        );
        assert_eq!(
            refuse(json!({"clusterIP": "10.97.0.5", "ports": [{"port": 80}]})),
            [
                "spec.clusterIPs: Invalid value: [\"10.97.0.5\"]: failed to allocate IP 10.97.0.5: the provided network does not match the current range"
            ]
        );
        assert_eq!(
            refuse(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]})),
            ["spec.ports[0].nodePort: Invalid value: 30000: provided port is already allocated"]
        );
        assert_eq!(
            refuse(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 40000}]})),
            [
                "spec.ports[0].nodePort: Invalid value: 40000: provided port is not in the valid range. The range of valid ports is 30000-30002"
            ]
        );
        // A Service keeps its own address and ports on update.
        let mut again = s.clone();
        allocator
            .assign(&taken, Some(&s), &mut again)
            .expect("own values");
        assert_eq!(again, s);
        // Exhaustion is an error, not a loop.
        let mut full = Taken::default();
        for n in 1..15 {
            full.ips.insert(u32::from(Ipv4Addr::new(10, 96, 0, n)));
        }
        let mut s = create(svc(json!({"ports": [{"port": 80}]}))).expect("valid");
        let e = allocator.assign(&full, None, &mut s).expect_err("full");
        assert!(e[0].message.contains("range 10.96.0.0/28 is full"), "{e:?}");
    }

    #[test]
    fn endpoints_and_slices_are_validated_and_defaulted() {
        let slice_info = info("endpointslices");
        let mut slice = json!({"metadata": {"name": "es"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 80}]});
        objects::prepare_create(slice_info, &mut slice, OffsetDateTime::now_utc()).expect("valid");
        assert_eq!(
            slice["ports"][0],
            json!({"name": "", "port": 80, "protocol": "TCP"})
        );
        assert_eq!(slice["endpoints"][0]["conditions"], json!({}));
        assert_eq!(slice["metadata"]["generation"], 1);
        let mut changed = slice.clone();
        changed["addressType"] = json!("IPv6");
        let e =
            objects::prepare_update(slice_info, None, &slice, &mut changed).expect_err("immutable");
        assert_eq!(
            fields(&e),
            ["addressType: Invalid value: \"IPv6\": field is immutable"]
        );
        let mut moved = slice.clone();
        moved["endpoints"][0]["addresses"] = json!(["10.0.0.2"]);
        objects::prepare_update(slice_info, None, &slice, &mut moved).expect("update");
        assert_eq!(moved["metadata"]["generation"], 2);

        let mut bad = json!({"metadata": {"name": "es"},
            "endpoints": [{"addresses": []}], "ports": [{"name": "a", "port": 80}, {"name": "a", "protocol": "XX"}]});
        let e = objects::prepare_create(slice_info, &mut bad, OffsetDateTime::now_utc())
            .expect_err("invalid");
        let got = fields(&e);
        for want in [
            "addressType: Required value",
            "ports[1].name: Duplicate value: \"a\"",
            "ports[1].protocol: Unsupported value: \"XX\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
            "endpoints[0].addresses: Required value: must contain at least 1 address",
        ] {
            assert!(got.iter().any(|g| g == want), "{want} not in {got:?}");
        }
        let mut ep = json!({"metadata": {"name": "ep"}, "subsets": [{"addresses": [{"ip": "abc"}],
            "ports": [{"port": 0}, {"port": 80, "protocol": "XX"}]}]});
        let e = objects::prepare_create(info("endpoints"), &mut ep, OffsetDateTime::now_utc())
            .expect_err("invalid");
        let got = fields(&e);
        assert!(got.contains(&"subsets[0].ports[0].name: Required value".to_string()));
        assert!(got.contains(
            &"subsets[0].ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"
                .to_string()
        ));
    }

    #[test]
    fn kubernetes_service_points_at_the_api() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("api.db"), Default::default()).expect("open");
        let allocator = Allocator::new(ServiceRanges::default());
        let api: std::net::SocketAddr = "192.0.2.10:6443".parse().expect("addr");
        bootstrap_kubernetes(&store, &allocator, api).expect("bootstrap");
        let service = store
            .get(&services_id(), "default", "kubernetes")
            .expect("get")
            .expect("created");
        assert_eq!(service["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(
            service["spec"]["ports"],
            json!([{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}])
        );
        assert!(service["spec"].get("selector").is_none());
        let slices = ResourceId {
            group: "discovery.k8s.io".into(),
            resource: "endpointslices".into(),
        };
        let slice = store
            .get(&slices, "default", "kubernetes")
            .expect("get")
            .expect("slice");
        assert_eq!(slice["endpoints"][0]["addresses"], json!(["192.0.2.10"]));
        assert_eq!(
            slice["metadata"]["labels"][SERVICE_NAME_LABEL],
            "kubernetes"
        );
        // A second pass changes nothing; a new API port corrects all three.
        let rv = store.resource_version();
        bootstrap_kubernetes(&store, &allocator, api).expect("again");
        assert_eq!(store.resource_version(), rv);
        let moved: std::net::SocketAddr = "192.0.2.10:7443".parse().expect("addr");
        bootstrap_kubernetes(&store, &allocator, moved).expect("moved");
        let service = store
            .get(&services_id(), "default", "kubernetes")
            .expect("get")
            .expect("kept");
        assert_eq!(service["spec"]["ports"][0]["targetPort"], 7443);
        assert_eq!(service["spec"]["clusterIP"], "10.96.0.1");
        let slice = store
            .get(&slices, "default", "kubernetes")
            .expect("get")
            .expect("slice");
        assert_eq!(slice["ports"][0]["port"], 7443);
        assert_eq!(slice["metadata"]["generation"], 2);
        assert_eq!(
            api_endpoint(
                "0.0.0.0:6443".parse().expect("addr"),
                &["127.0.0.1".into(), "10.1.2.3".into()]
            ),
            "10.1.2.3:6443".parse().expect("addr")
        );
    }
}
