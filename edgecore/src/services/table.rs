//! The service table: every Service this gateway holds with the endpoints its data path and
//! DNS use, rebuilt from the store (Services, EndpointSlices, this node's Pods) and from the
//! local pods' latest statuses (the outbox), so a local pod's readiness counts at once, with
//! or without the cloud. The proxy ([`super::proxy`]), the DNS server ([`super::dns`]) and the
//! pods' service environment variables ([`super::env`]) read the same table.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

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
    /// A pod of this gateway: the data path sends traffic to it directly.
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
