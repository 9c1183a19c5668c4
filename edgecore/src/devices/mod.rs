//! Devices on this gateway ([docs/devices.md](../../../docs/devices.md)): the Devices and
//! DeviceModels the cloud relayed (held in `edge.db` like pods), a twin per device property
//! (`twins`: the desired value from the spec, the reported value from the mapper, kept in
//! `edge.db` and reported to the cloud through the outbox), KubeEdge's DMI toward mapper
//! processes (`dmi`) and KubeEdge's device topics on a local MQTT broker (`mqtt`).
//!
//! `Devices` is the one handle the DMI server and the MQTT client use; nothing here waits for
//! the cloud, so devices keep being read and written while the uplink is down.

pub mod dmi;
pub mod mqtt;
pub mod twins;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use devices::{Device, DeviceModel, TwinProperty};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::outbox::Outbox;
use crate::store::StoreError;

/// Settings of `edgecore run` for devices.
#[derive(Debug, Clone)]
pub struct DevicesConfig {
    /// Where `DeviceManagerService` is served (`--dmi-socket`); `None` serves no DMI.
    pub dmi_socket: Option<PathBuf>,
    /// The MQTT broker (`--mqtt-broker`, `tcp://HOST:PORT`); `None` speaks no MQTT.
    pub mqtt_broker: Option<String>,
    /// Calls per second edgecore makes to one mapper (`--mapper-qps`), with a burst of twice it.
    pub mapper_qps: f64,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig::new()
    }
}

impl DevicesConfig {
    /// Neither DMI nor MQTT (in-process test edges and benches).
    pub fn disabled() -> DevicesConfig {
        DevicesConfig {
            dmi_socket: None,
            mqtt_broker: None,
            mapper_qps: 20.0,
        }
    }

    /// KubeEdge's defaults: DMI on its socket, MQTT on the local broker.
    pub fn new() -> DevicesConfig {
        DevicesConfig {
            dmi_socket: Some(PathBuf::from(dmi::DEFAULT_SOCKET)),
            mqtt_broker: Some(mqtt::DEFAULT_BROKER.to_string()),
            mapper_qps: 20.0,
        }
    }
}

/// What happened to the devices this node holds, for the mappers and MQTT clients.
#[derive(Debug, Clone)]
pub enum DeviceEvent {
    /// A device arrived or its spec changed; `desired_changed` names the properties whose desired
    /// value differs from what the node held before (all of them for a new device).
    DeviceUpserted {
        device: Arc<Device>,
        model: Option<Arc<DeviceModel>>,
        desired_changed: Vec<String>,
    },
    /// A device left the node (deleted, or bound to another node). `protocol` is what it had.
    DeviceRemoved {
        namespace: String,
        name: String,
        protocol: String,
    },
    ModelUpserted(Arc<DeviceModel>),
    ModelRemoved {
        namespace: String,
        name: String,
        protocol: String,
    },
}

/// One property value a mapper or an MQTT client reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    pub property: String,
    pub value: String,
    /// KubeEdge's metadata: `timestamp` (ms since the epoch; the edge's clock when absent) and
    /// `type`.
    pub metadata: BTreeMap<String, String>,
    /// The desired value the mapper says it holds, when it says.
    pub observed_desired: Option<TwinProperty>,
}

/// One property's twin as the node holds it. Serialized in camelCase (`edgecore ctl twin -o
/// json`), absent parts omitted.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PropertyTwin {
    pub name: String,
    /// The model's `type` and `accessMode` for it ("" when the model is missing).
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access_mode: String,
    /// The spec's desired value (`None` when the spec gives none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinProperty>,
    /// The last value the mapper reported, `metadata.timestamp` in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<TwinProperty>,
    /// The desired value the mapper said it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<TwinProperty>,
}

/// A device's twin as the node holds it. Serialized in camelCase, absent parts omitted.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinView {
    pub namespace: String,
    pub name: String,
    /// The DeviceModel's name ("" when the device names none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// `spec.protocol.protocolName`, else the model's `protocol`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// The mapper's last state ("" before the first).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// RFC 3339; "" when the device was never seen online.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online_time: String,
    /// In the order of the spec.
    #[serde(default)]
    pub properties: Vec<PropertyTwin>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {namespace}/{name} is not on this node")]
    UnknownDevice { namespace: String, name: String },
    #[error("device {namespace}/{name} has no property {property:?}")]
    UnknownProperty {
        namespace: String,
        name: String,
        property: String,
    },
    #[error("cannot record the twin in the local store")]
    Store(#[from] StoreError),
}

/// The handle the DMI server and the MQTT client share.
#[derive(Clone)]
pub struct Devices {
    twins: Arc<twins::Twins>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").finish_non_exhaustive()
    }
}

impl Devices {
    /// The devices the node holds.
    pub fn devices(&self) -> Vec<Arc<Device>> {
        self.twins.devices()
    }

    /// The models the node holds.
    pub fn models(&self) -> Vec<Arc<DeviceModel>> {
        self.twins.models()
    }

    /// A device and its model, if the node holds it.
    pub fn device(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(Arc<Device>, Option<Arc<DeviceModel>>)> {
        self.twins.device(namespace, name)
    }

    /// Changes from now on. A lagging receiver should re-read `devices()`.
    pub fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.twins.subscribe()
    }

    /// Records reported values durably in `edge.db`, then queues them for the cloud per the
    /// properties' `reportToCloud`/`reportCycle`. A value older (by timestamp) than the one held
    /// is ignored. A value without `metadata.timestamp` gets the edge's clock. Values of the
    /// device's properties are recorded even when the error names another, unknown, property.
    pub async fn report(
        &self,
        namespace: &str,
        name: &str,
        reported: Vec<Reported>,
    ) -> Result<(), DeviceError> {
        self.twins.report(namespace, name, reported).await
    }

    /// Records the device's state (`ok`, `online`, `offline`, ...), and `lastOnlineTime` when
    /// it is `ok` or `online` (an offline device keeps the last time it was seen). A new state
    /// goes to the cloud at once.
    pub async fn set_state(
        &self,
        namespace: &str,
        name: &str,
        state: &str,
    ) -> Result<(), DeviceError> {
        self.twins.set_state(namespace, name, state).await
    }

    /// The twin of one device.
    pub fn twin(&self, namespace: &str, name: &str) -> Option<TwinView> {
        self.twins.twin(namespace, name)
    }
}

/// Opens the twins, then serves DMI and MQTT until `shutdown`. Returns the handle at once; the
/// work runs on `tracker`.
pub fn start(
    config: DevicesConfig,
    data_dir: PathBuf,
    store_changed: tokio::sync::watch::Receiver<u64>,
    outbox: Arc<Outbox>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<Devices, StoreError> {
    let twins = Arc::new(twins::Twins::open(&data_dir, outbox)?);
    let devices = Devices { twins };
    tracker.spawn(twins::run(
        devices.twins.clone(),
        store_changed,
        shutdown.clone(),
    ));
    // Twin and state changes made through DMI, for MQTT to publish.
    let notices = mqtt::Notices::new();
    if let Some(socket) = config.dmi_socket.clone() {
        tracker.spawn(dmi::serve(
            socket,
            devices.clone(),
            config.mapper_qps,
            notices.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(broker) = config.mqtt_broker.clone() {
        tracker.spawn(mqtt::run(broker, devices.clone(), notices, shutdown));
    }
    Ok(devices)
}
