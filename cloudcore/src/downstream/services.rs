//! Services and EndpointSlices in the [`Index`] (docs/services.md, "Relay: which Services an
//! edge holds"): every edge node holds every Service and every EndpointSlice of the cluster, so
//! its proxy, its DNS server and its pods' service environment variables work from its own
//! store, also while the uplink is down.
//!
//! The one exception is kube-proxy's: an object labelled
//! `service.kubernetes.io/service-proxy-name` belongs to another proxy and reaches no edge.
//! The EndpointSlice controllers (kube-controller-manager's and ours) copy a Service's labels
//! onto its slices, so the label on the slice itself decides, as kube-proxy's informer does.
//! An object that gains the label leaves every edge; one that loses it comes back.
//!
//! Each version is serialized once and its body shared by every edge (the same `Arc` in every
//! desired set), so a Service costs the cloud one body however many edges hold it.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use proto::sync::ObjectKey;
use serde::Serialize;

use super::{Index, cache};

/// The label that hands a Service (and its slices) to another proxy (kube-proxy's
/// `service.kubernetes.io/service-proxy-name`): such objects are not relayed.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// The kinds every edge holds all of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterWide {
    /// core/v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
}

impl ClusterWide {
    /// The object kind in the sync protocol.
    pub fn kind(self) -> &'static str {
        match self {
            ClusterWide::Service => "Service",
            ClusterWide::EndpointSlice => "EndpointSlice",
        }
    }
}

/// Whether an object with these labels belongs to another service proxy.
fn excluded(object: &impl Resource) -> bool {
    object
        .meta()
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
}

impl Index {
    /// Sets what every edge should hold at `key`.
    fn publish_everywhere(&mut self, key: &ObjectKey, object: Option<proto::sync::DesiredObject>) {
        for edge in self.edges.values_mut() {
            edge.peer.set_desired(key.clone(), object.clone());
            edge.waker.notify_one();
        }
    }

    fn apply_cluster_wide<K: Resource + Serialize + Clone>(
        &mut self,
        kind: ClusterWide,
        object: &K,
    ) {
        let namespace = object.meta().namespace.clone().unwrap_or_default();
        let name = object.meta().name.clone().unwrap_or_default();
        if excluded(object) {
            // Another proxy's: gone from every edge (if it was there before the label).
            self.delete_cluster_wide(kind, &namespace, &name);
            return;
        }
        let cached = match cache(object) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(kind = kind.kind(), object = %format!("{namespace}/{name}"), "not sent to edges: {e}");
                return;
            }
        };
        let key = ObjectKey::new(kind.kind(), &namespace, &name);
        self.publish_everywhere(&key, Some(cached.desired()));
        self.cluster_wide.insert(key, cached);
    }

    /// A Service was created or changed.
    pub fn apply_service(&mut self, service: &Service) {
        self.apply_cluster_wide(ClusterWide::Service, service);
    }

    /// An EndpointSlice was created or changed.
    pub fn apply_endpoint_slice(&mut self, slice: &EndpointSlice) {
        self.apply_cluster_wide(ClusterWide::EndpointSlice, slice);
    }

    /// A Service or EndpointSlice was deleted (or handed to another proxy).
    pub fn delete_cluster_wide(&mut self, kind: ClusterWide, namespace: &str, name: &str) {
        let key = ObjectKey::new(kind.kind(), namespace, name);
        if self.cluster_wide.remove(&key).is_some() {
            self.publish_everywhere(&key, None);
        }
    }

    /// How many Services and EndpointSlices every edge holds.
    pub fn cluster_wide_len(&self) -> usize {
        self.cluster_wide.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::node;
    use super::*;
    use proto::sync::PeerConfig;
    use serde_json::json;
    use std::sync::Arc;

    fn service(name: &str, rv: u64, labels: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                "resourceVersion": rv.to_string(), "labels": labels},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}], "clusterIP": "10.96.0.10"}
        }))
        .expect("service")
    }

    fn slice(name: &str, service: &str, rv: u64, labels: serde_json::Value) -> EndpointSlice {
        let mut labels = labels;
        labels["kubernetes.io/service-name"] = json!(service);
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                "resourceVersion": rv.to_string(), "labels": labels},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"port": 8080, "protocol": "TCP"}]
        }))
        .expect("slice")
    }

    fn wants(index: &Index, node: &str, kind: &str, name: &str) -> Option<u64> {
        index
            .desired(node, &ObjectKey::new(kind, "ns", name))
            .map(|d| d.resource_version)
    }

    #[test]
    fn every_edge_holds_every_service_and_slice_with_one_shared_body() {
        let mut index = Index::new(PeerConfig::default());
        index.apply_node(&node("n1"));
        index.apply_service(&service("web", 3, json!({})));
        index.apply_endpoint_slice(&slice("web-abc", "web", 4, json!({})));
        // A node that appears later gets them all.
        index.apply_node(&node("n2"));
        for n in ["n1", "n2"] {
            assert_eq!(wants(&index, n, "Service", "web"), Some(3), "{n}");
            assert_eq!(wants(&index, n, "EndpointSlice", "web-abc"), Some(4), "{n}");
        }
        let key = ObjectKey::new("Service", "ns", "web");
        let one = index.desired("n1", &key).expect("n1").body.clone();
        let two = index.desired("n2", &key).expect("n2").body.clone();
        assert!(
            Arc::ptr_eq(&one, &two),
            "one serialization shared by every edge"
        );
        // Updates reach every edge; a delete leaves every edge.
        index.apply_service(&service("web", 9, json!({})));
        assert_eq!(wants(&index, "n2", "Service", "web"), Some(9));
        index.delete_cluster_wide(ClusterWide::Service, "ns", "web");
        index.delete_cluster_wide(ClusterWide::EndpointSlice, "ns", "web-abc");
        for n in ["n1", "n2"] {
            assert_eq!(wants(&index, n, "Service", "web"), None, "{n}");
            assert_eq!(wants(&index, n, "EndpointSlice", "web-abc"), None, "{n}");
        }
        assert_eq!(index.cluster_wide_len(), 0);
    }

    #[test]
    fn another_proxys_services_and_slices_stay_away() {
        let mut index = Index::new(PeerConfig::default());
        index.apply_node(&node("n1"));
        let other = json!({SERVICE_PROXY_NAME_LABEL: "other-proxy"});
        index.apply_service(&service("mesh", 2, other.clone()));
        index.apply_endpoint_slice(&slice("mesh-x", "mesh", 3, other.clone()));
        assert_eq!(wants(&index, "n1", "Service", "mesh"), None);
        assert_eq!(wants(&index, "n1", "EndpointSlice", "mesh-x"), None);
        // Losing the label brings it to the edges; gaining it again takes it away.
        index.apply_service(&service("mesh", 4, json!({})));
        assert_eq!(wants(&index, "n1", "Service", "mesh"), Some(4));
        index.apply_service(&service("mesh", 5, other));
        assert_eq!(wants(&index, "n1", "Service", "mesh"), None);
        assert_eq!(index.cluster_wide_len(), 0);
    }
}
