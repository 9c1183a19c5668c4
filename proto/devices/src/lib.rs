//! `devices.kubeedge.io/v1beta1`: the Device and DeviceModel resources as KubeEdge defines them
//! (the v1beta1 shape of KubeEdge 1.15–1.22, where a Device's twins live in its own `status`),
//! field for field and with KubeEdge's JSON names, so a KubeEdge manifest reads unchanged.
//!
//! The types are plain serde: the edge reads them from its store, the mappers receive them over
//! DMI, and cloudcore relays them without interpreting more than the node binding and the model
//! reference. Fields we carry but do not act on are listed in `docs/devices.md`. Unknown fields
//! are kept by the API (the CRD preserves them where KubeEdge's does) and ignored here.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "devices.kubeedge.io";
/// The one version served.
pub const VERSION: &str = "v1beta1";
/// `apiVersion` of both kinds.
pub const API_VERSION: &str = "devices.kubeedge.io/v1beta1";
/// Kind (and the sync protocol's object kind) of a device.
pub const DEVICE_KIND: &str = "Device";
/// Kind (and the sync protocol's object kind) of a device model.
pub const DEVICE_MODEL_KIND: &str = "DeviceModel";
/// Plural resource names.
pub const DEVICES: &str = "devices";
pub const DEVICE_MODELS: &str = "devicemodels";

/// Device state values the mappers report (`ReportDeviceStates`) and the edge writes to
/// `status.state`. KubeEdge's mapper framework uses these strings.
pub mod state {
    pub const OK: &str = "ok";
    pub const ONLINE: &str = "online";
    pub const OFFLINE: &str = "offline";
    pub const UNKNOWN: &str = "unknown";
    pub const DISCONNECTED: &str = "disconnected";
}

/// A device instance: which model, which node, how to reach it, which properties to read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DeviceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// The DeviceModel (same namespace) this device is an instance of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model_ref: Option<LocalObjectReference>,
    /// The edge node the device is attached to; only that node receives it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<DeviceProperty>,
    #[serde(default)]
    pub protocol: ProtocolConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<DeviceMethod>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalObjectReference {
    #[serde(default)]
    pub name: String,
}

/// One property of a device: its desired value, how the mapper reaches it, and its cycles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    /// The model property this instance property is.
    #[serde(default)]
    pub name: String,
    /// The value the cloud wants a ReadWrite property to hold.
    #[serde(default)]
    pub desired: TwinProperty,
    #[serde(default)]
    pub visitors: VisitorConfig,
    /// How often the value goes to the cloud, in nanoseconds (a Go `time.Duration`, as
    /// KubeEdge's mapper framework and examples use it: 10000000000 is 10 s); 0 means 1 s.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub report_cycle: i64,
    /// How often the mapper reads the value from the device; nanoseconds, 0 means 1 s.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub collect_cycle: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub report_to_cloud: bool,
    /// Where the mapper pushes values besides the twin (carried to the mapper, not used by us).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_method: Option<serde_json::Value>,
}

/// A value and its metadata (`timestamp` in milliseconds since the epoch, `type`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinProperty {
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol_name: String,
    /// Free-form, protocol-specific (a Modbus slave id, an address, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_data: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VisitorConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol_name: String,
    /// Free-form, protocol-specific (for Modbus: register, offset, limit, scale, isSwap, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_data: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMethod {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub property_names: Vec<String>,
}

/// What the edge reports: the twins, the device's state and when it was last online.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<Twin>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online_time: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub report_to_cloud: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub report_cycle: i64,
}

/// One property's twin: the last value the device reported and the desired value the mapper
/// last received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    #[serde(default)]
    pub property_name: String,
    #[serde(default)]
    pub reported: TwinProperty,
    #[serde(default)]
    pub observed_desired: TwinProperty,
}

/// A device model: the properties every device of the model has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DeviceModelSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<ModelProperty>,
    /// The protocol of the model's devices; a mapper registering for it gets them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// INT, FLOAT, DOUBLE, STRING, BOOLEAN, BYTES or STREAM.
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub type_: String,
    /// ReadWrite or ReadOnly.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access_mode: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub minimum: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub maximum: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

/// The `accessMode` of a property a mapper may write.
pub const READ_WRITE: &str = "ReadWrite";

impl Device {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The model's name, if the device names one.
    pub fn model_name(&self) -> Option<&str> {
        self.spec
            .device_model_ref
            .as_ref()
            .map(|r| r.name.as_str())
            .filter(|n| !n.is_empty())
    }
}

impl DeviceModel {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeedge_modbus_device_reads_with_its_free_form_config() {
        let device: Device = serde_json::from_value(serde_json::json!({
            "apiVersion": "devices.kubeedge.io/v1beta1",
            "kind": "Device",
            "metadata": {"name": "m1", "namespace": "default"},
            "spec": {
                "deviceModelRef": {"name": "model"},
                "nodeName": "edge-1",
                "protocol": {"protocolName": "modbus", "configData": {"slaveID": 1}},
                "properties": [{
                    "name": "temperature",
                    "desired": {"value": "20", "metadata": {"type": "int"}},
                    "visitors": {"protocolName": "modbus",
                                 "configData": {"register": "HoldingRegister", "offset": 2}},
                    "reportCycle": 1_000_000_000i64, "collectCycle": 500_000_000i64, "reportToCloud": true
                }]
            },
            "status": {"twins": [{"propertyName": "temperature",
                                  "reported": {"value": "19", "metadata": {"timestamp": "1"}}}]}
        }))
        .expect("KubeEdge's shape");
        assert_eq!(device.model_name(), Some("model"));
        assert_eq!(device.spec.node_name, "edge-1");
        let property = &device.spec.properties[0];
        assert_eq!(property.collect_cycle, 500_000_000);
        assert!(property.report_to_cloud);
        assert_eq!(
            property
                .visitors
                .config_data
                .as_ref()
                .and_then(|c| c.get("offset")),
            Some(&serde_json::json!(2))
        );
        let status = device.status.expect("status");
        assert_eq!(status.twins[0].reported.value, "19");
        let back = serde_json::to_value(&status.twins[0]).expect("serializes");
        assert_eq!(back["propertyName"], "temperature");
        assert!(back.get("observedDesired").is_some());
    }
}
