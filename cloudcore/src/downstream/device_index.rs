//! KubeEdge's Devices and DeviceModels in the [`Index`] (docs/devices.md, "Relay"): a Device
//! goes to the node its `spec.nodeName` names and nowhere else; a DeviceModel goes to every node
//! holding a Device whose `spec.deviceModelRef.name` names it (same namespace), counted like the
//! ConfigMaps pods reference, so it leaves a node with the last such Device.
//!
//! A Device whose spec and metadata did not change (only its status, which the edge itself
//! reported, or its resourceVersion) is not sent again: the edge would only receive what it
//! already knows, once per status write.

use std::time::Duration;

use kube::api::{DynamicObject, TypeMeta};
use kube::runtime::utils::Backoff;
use proto::sync::ObjectKey;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::{Cached, Index, Referenced, cache};

/// A Device as the index remembers it.
#[derive(Debug, Clone)]
pub(super) struct DeviceEntry {
    /// `spec.nodeName`; empty when the Device is bound to no node.
    pub(super) node: String,
    /// `spec.deviceModelRef.name`, when not empty.
    model: Option<String>,
    pub(super) cached: Cached,
    /// SHA-256 of the Device without its status, resourceVersion and managedFields.
    digest: [u8; 32],
}

/// The sync key of a Device.
pub(super) fn device_key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(devices::DEVICE_KIND, namespace, name)
}

/// The key of the DeviceModel a Device references, if it references one.
fn model_key(namespace: &str, model: Option<&str>) -> Option<ObjectKey> {
    model.map(|m| ObjectKey::new(devices::DEVICE_MODEL_KIND, namespace, m))
}

/// `spec.nodeName` and `spec.deviceModelRef.name` of a Device (empty and `None` when absent or
/// not strings).
fn binding(device: &DynamicObject) -> (String, Option<String>) {
    let spec = &device.data["spec"];
    let node = spec["nodeName"].as_str().unwrap_or_default().to_string();
    let model = spec["deviceModelRef"]["name"]
        .as_str()
        .filter(|m| !m.is_empty())
        .map(String::from);
    (node, model)
}

/// What an edge needs of a Device, hashed: everything but the status and the bookkeeping that
/// changes with every write.
fn spec_digest(device: &DynamicObject) -> [u8; 32] {
    let mut metadata = device.metadata.clone();
    metadata.resource_version = None;
    metadata.managed_fields = None;
    let mut data = device.data.clone();
    if let Value::Object(fields) = &mut data {
        fields.remove("status");
    }
    let bytes = serde_json::to_vec(&(metadata, data)).unwrap_or_default();
    Sha256::digest(bytes).into()
}

/// `apiVersion` and `kind` filled in when the API left them out of a list's items, so the
/// edge reads the body as KubeEdge's object.
fn typed(object: &DynamicObject, kind: &str) -> DynamicObject {
    let mut object = object.clone();
    if object.types.is_none() {
        object.types = Some(TypeMeta {
            api_version: devices::API_VERSION.into(),
            kind: kind.into(),
        });
    }
    object
}

impl Index {
    /// A Device was created or changed.
    pub fn apply_device(&mut self, device: &DynamicObject) {
        let namespace = device.metadata.namespace.clone().unwrap_or_default();
        let name = device.metadata.name.clone().unwrap_or_default();
        let cached = match cache(&typed(device, devices::DEVICE_KIND)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(device = %format!("{namespace}/{name}"), "not sent to the edge: {e}");
                return;
            }
        };
        let (node, model) = binding(device);
        let digest = spec_digest(device);
        let id = (namespace.clone(), name.clone());
        let old = self.take_device(&id);
        if let Some(old) = old
            .as_ref()
            .filter(|old| old.digest == digest && old.cached.uid == cached.uid && old.node == node)
        {
            // Only the status changed: the edge keeps the version it holds.
            self.put_device(id, old.clone());
            return;
        }
        let key = device_key(&namespace, &name);
        if let Some(old) = &old
            && !old.node.is_empty()
            && old.node != node
        {
            self.publish(&old.node, key.clone(), None);
        }
        // Add before removing, so a model kept across the change never drops to zero.
        if !node.is_empty() {
            self.add_refs(&node, model_key(&namespace, model.as_deref()));
        }
        if let Some(old) = &old
            && !old.node.is_empty()
        {
            self.remove_refs(&old.node, model_key(&namespace, old.model.as_deref()));
        }
        if !node.is_empty() {
            self.publish(&node, key, Some(cached.desired()));
        }
        self.put_device(
            id,
            DeviceEntry {
                node,
                model,
                cached,
                digest,
            },
        );
    }

    /// Takes a Device out of the index (and out of its node's bound set).
    fn take_device(&mut self, id: &(String, String)) -> Option<DeviceEntry> {
        let old = self.devices.remove(id)?;
        self.rebind(&old.node, |b| {
            b.devices.remove(id);
        });
        Some(old)
    }

    /// Puts a Device into the index (and into its node's bound set, if it has a node).
    fn put_device(&mut self, id: (String, String), entry: DeviceEntry) {
        let node = entry.node.clone();
        self.rebind(&node, |b| {
            b.devices.insert(id.clone());
        });
        self.devices.insert(id, entry);
    }

    /// A Device was deleted.
    pub fn delete_device(&mut self, namespace: &str, name: &str) {
        let Some(old) = self.take_device(&(namespace.to_string(), name.to_string())) else {
            return;
        };
        if old.node.is_empty() {
            return;
        }
        self.publish(&old.node, device_key(namespace, name), None);
        self.remove_refs(&old.node, model_key(namespace, old.model.as_deref()));
    }

    /// A DeviceModel was created or changed.
    pub fn apply_device_model(&mut self, model: &DynamicObject) {
        self.apply_referenced(
            Referenced::DeviceModel,
            &typed(model, devices::DEVICE_MODEL_KIND),
        );
    }
}

/// Retries of the device watches: from 0.5 s doubling to 5 s (the other watches back off to
/// 30 s), so Devices are relayed within seconds of their definitions being installed in a
/// cluster that had none.
#[derive(Debug, Clone)]
pub(super) struct DefinitionBackoff {
    next: Duration,
}

impl DefinitionBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(5);

    pub(super) fn new() -> Self {
        DefinitionBackoff { next: Self::FIRST }
    }
}

impl Iterator for DefinitionBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(wait)
    }
}

impl Backoff for DefinitionBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sync::PeerConfig;
    use serde_json::json;

    fn device(name: &str, node: &str, model: &str, rv: u64) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                "resourceVersion": rv.to_string()},
            "spec": {"nodeName": node, "deviceModelRef": {"name": model},
                "protocol": {"protocolName": "modbus", "configData": {"slaveID": 1}},
                "properties": [{"name": "temperature", "desired": {"value": "20"}}]}
        }))
        .expect("device")
    }

    fn model(name: &str, rv: u64) -> DynamicObject {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                "resourceVersion": rv.to_string()},
            "spec": {"protocol": "modbus", "properties": [{"name": "temperature", "type": "INT"}]}
        }))
        .expect("model")
    }

    fn node(name: &str) -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1"}
        }))
        .expect("node")
    }

    fn index() -> Index {
        let mut index = Index::new(PeerConfig::default());
        index.apply_node(&node("n1"));
        index.apply_node(&node("n2"));
        index
    }

    fn wants(index: &Index, node: &str, kind: &str, name: &str) -> Option<u64> {
        index
            .desired(node, &ObjectKey::new(kind, "ns", name))
            .map(|d| d.resource_version)
    }

    fn body(index: &Index, node: &str, kind: &str, name: &str) -> Value {
        let desired = index
            .desired(node, &ObjectKey::new(kind, "ns", name))
            .expect("desired");
        serde_json::from_slice(&desired.body).expect("json")
    }

    #[test]
    fn a_node_wants_its_devices_and_their_models_and_nothing_else() {
        let mut index = index();
        index.apply_device_model(&model("m", 2));
        index.apply_device_model(&model("unused", 3));
        index.apply_device(&device("d", "n1", "m", 4));
        // A model that arrives after the device that references it.
        index.apply_device(&device("late-model", "n1", "later", 5));
        index.apply_device_model(&model("later", 6));
        assert_eq!(wants(&index, "n1", "Device", "d"), Some(4));
        assert_eq!(wants(&index, "n1", "DeviceModel", "m"), Some(2));
        assert_eq!(wants(&index, "n1", "DeviceModel", "later"), Some(6));
        assert_eq!(wants(&index, "n1", "DeviceModel", "unused"), None);
        for (kind, name) in [
            ("Device", "d"),
            ("DeviceModel", "m"),
            ("DeviceModel", "later"),
        ] {
            assert_eq!(wants(&index, "n2", kind, name), None, "{kind} {name}");
        }
        // The model's body carries its apiVersion and kind although the list item had none.
        let sent = body(&index, "n1", "DeviceModel", "m");
        assert_eq!(sent["apiVersion"], "devices.kubeedge.io/v1beta1");
        assert_eq!(sent["kind"], "DeviceModel");
        // Updates follow.
        index.apply_device_model(&model("m", 9));
        assert_eq!(wants(&index, "n1", "DeviceModel", "m"), Some(9));
    }

    #[test]
    fn rebinding_moves_the_device_and_its_model_and_deleting_removes_them() {
        let mut index = index();
        index.apply_device_model(&model("m", 2));
        index.apply_device(&device("a", "n1", "m", 3));
        index.apply_device(&device("b", "n1", "m", 4));
        index.apply_device(&device("a", "n2", "m", 5));
        assert_eq!(wants(&index, "n1", "Device", "a"), None);
        assert_eq!(wants(&index, "n2", "Device", "a"), Some(5));
        assert_eq!(wants(&index, "n2", "DeviceModel", "m"), Some(2));
        assert_eq!(
            wants(&index, "n1", "DeviceModel", "m"),
            Some(2),
            "b still uses the model on n1"
        );
        index.apply_device(&device("b", "n2", "m", 6));
        assert_eq!(wants(&index, "n1", "DeviceModel", "m"), None);
        // Unbound: nowhere.
        index.apply_device(&device("b", "", "m", 7));
        assert_eq!(wants(&index, "n2", "Device", "b"), None);
        assert_eq!(wants(&index, "n2", "DeviceModel", "m"), Some(2));
        index.delete_device("ns", "a");
        assert_eq!(wants(&index, "n2", "Device", "a"), None);
        assert_eq!(wants(&index, "n2", "DeviceModel", "m"), None);
        assert!(index.referrers.is_empty(), "{:?}", index.referrers);
        assert!(index.bound.is_empty(), "{:?}", index.bound);
        // A device that changes its model lets go of the old one.
        index.apply_device_model(&model("other", 8));
        index.apply_device(&device("c", "n1", "m", 9));
        index.apply_device(&device("c", "n1", "other", 10));
        assert_eq!(wants(&index, "n1", "DeviceModel", "m"), None);
        assert_eq!(wants(&index, "n1", "DeviceModel", "other"), Some(8));
        // A deleted model leaves the node, and comes back when created again.
        index.delete_referenced(Referenced::DeviceModel, "ns", "other");
        assert_eq!(wants(&index, "n1", "DeviceModel", "other"), None);
        index.apply_device_model(&model("other", 11));
        assert_eq!(wants(&index, "n1", "DeviceModel", "other"), Some(11));
    }

    #[test]
    fn a_status_write_is_not_sent_back_to_the_edge_but_a_spec_change_is() {
        let mut index = index();
        index.apply_device(&device("d", "n1", "m", 4));
        let mut reported = device("d", "n1", "m", 5);
        reported.data["status"] = json!({"state": "ok", "twins": [{"propertyName": "temperature",
            "reported": {"value": "21"}}]});
        index.apply_device(&reported);
        assert_eq!(wants(&index, "n1", "Device", "d"), Some(4), "status only");
        let mut changed = device("d", "n1", "m", 6);
        changed.data["spec"]["properties"][0]["desired"]["value"] = json!("25");
        index.apply_device(&changed);
        assert_eq!(wants(&index, "n1", "Device", "d"), Some(6));
        let sent = body(&index, "n1", "Device", "d");
        assert_eq!(sent["spec"]["properties"][0]["desired"]["value"], "25");
        // A new label is sent too (metadata is the edge's as well).
        let mut labelled = changed.clone();
        labelled.metadata.resource_version = Some("7".into());
        labelled.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        index.apply_device(&labelled);
        assert_eq!(wants(&index, "n1", "Device", "d"), Some(7));
    }

    #[test]
    fn a_node_that_appears_later_gets_its_devices_and_models() {
        let mut index = Index::new(PeerConfig::default());
        index.apply_device_model(&model("m", 2));
        index.apply_device(&device("d", "late", "m", 3));
        assert_eq!(wants(&index, "late", "Device", "d"), None);
        index.apply_node(&node("late"));
        assert_eq!(wants(&index, "late", "Device", "d"), Some(3));
        assert_eq!(wants(&index, "late", "DeviceModel", "m"), Some(2));
    }

    #[test]
    fn the_device_backoff_doubles_to_five_seconds_and_resets() {
        let mut backoff = DefinitionBackoff::new();
        let waits: Vec<_> = backoff.by_ref().take(6).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 5000, 5000].map(Duration::from_millis)
        );
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(500)));
    }
}
