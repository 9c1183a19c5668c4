//! `FakeDevices`: a test double of the `Devices` handle for the DMI and MQTT unit tests —
//! devices, models, reported values and states in memory, changes announced like the real one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use devices::{Device, DeviceModel, TwinProperty};
use tokio::sync::broadcast;

use super::DeviceAccess;
use crate::devices::{DeviceError, DeviceEvent, PropertyTwin, Reported, TwinView};

type Key = (String, String);

#[derive(Default)]
struct State {
    devices: BTreeMap<Key, Arc<Device>>,
    models: BTreeMap<Key, Arc<DeviceModel>>,
    reported: HashMap<Key, BTreeMap<String, Reported>>,
    states: HashMap<Key, String>,
    reports: Vec<(String, String, Vec<Reported>)>,
}

#[derive(Clone)]
pub struct FakeDevices {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<DeviceEvent>,
}

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

impl FakeDevices {
    pub fn new() -> FakeDevices {
        FakeDevices {
            state: Arc::default(),
            events: broadcast::channel(64).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake devices lock")
    }

    pub fn put_model(&self, model: DeviceModel) {
        let model = Arc::new(model);
        self.lock()
            .models
            .insert(key(model.namespace(), model.name()), model.clone());
        let _ = self.events.send(DeviceEvent::ModelUpserted(model));
    }

    pub fn put_device(&self, device: Device) {
        let device = Arc::new(device);
        let k = key(device.namespace(), device.name());
        let (old, model) = {
            let mut state = self.lock();
            let old = state.devices.insert(k.clone(), device.clone());
            let model = device
                .model_name()
                .and_then(|m| state.models.get(&key(device.namespace(), m)).cloned());
            (old, model)
        };
        let desired_changed = device
            .spec
            .properties
            .iter()
            .filter(|p| {
                old.as_ref().is_none_or(|old| {
                    old.spec
                        .properties
                        .iter()
                        .find(|o| o.name == p.name)
                        .is_none_or(|o| o.desired != p.desired)
                })
            })
            .map(|p| p.name.clone())
            .collect();
        let _ = self.events.send(DeviceEvent::DeviceUpserted {
            device,
            model,
            desired_changed,
        });
    }

    pub fn remove_device(&self, namespace: &str, name: &str) {
        let removed = self.lock().devices.remove(&key(namespace, name));
        if let Some(device) = removed {
            let _ = self.events.send(DeviceEvent::DeviceRemoved {
                namespace: namespace.to_string(),
                name: name.to_string(),
                protocol: device.spec.protocol.protocol_name.clone(),
            });
        }
    }

    /// Every report accepted, in order.
    pub fn reports(&self) -> Vec<(String, String, Vec<Reported>)> {
        self.lock().reports.clone()
    }

    pub fn state_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.lock().states.get(&key(namespace, name)).cloned()
    }
}

impl DeviceAccess for FakeDevices {
    fn devices(&self) -> Vec<Arc<Device>> {
        self.lock().devices.values().cloned().collect()
    }

    fn models(&self) -> Vec<Arc<DeviceModel>> {
        self.lock().models.values().cloned().collect()
    }

    fn device(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(Arc<Device>, Option<Arc<DeviceModel>>)> {
        let state = self.lock();
        let device = state.devices.get(&key(namespace, name))?.clone();
        let model = device
            .model_name()
            .and_then(|m| state.models.get(&key(namespace, m)).cloned());
        Some((device, model))
    }

    fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }

    async fn report(
        &self,
        namespace: &str,
        name: &str,
        reported: Vec<Reported>,
    ) -> Result<(), DeviceError> {
        let mut state = self.lock();
        let k = key(namespace, name);
        let Some(device) = state.devices.get(&k).cloned() else {
            return Err(DeviceError::UnknownDevice {
                namespace: namespace.into(),
                name: name.into(),
            });
        };
        for r in &reported {
            if !device.spec.properties.iter().any(|p| p.name == r.property) {
                return Err(DeviceError::UnknownProperty {
                    namespace: namespace.into(),
                    name: name.into(),
                    property: r.property.clone(),
                });
            }
        }
        state
            .reports
            .push((namespace.to_string(), name.to_string(), reported.clone()));
        let held = state.reported.entry(k).or_default();
        for mut r in reported {
            r.metadata
                .entry("timestamp".into())
                .or_insert_with(|| "1700000000000".into());
            held.insert(r.property.clone(), r);
        }
        Ok(())
    }

    async fn set_state(&self, namespace: &str, name: &str, state: &str) -> Result<(), DeviceError> {
        let mut held = self.lock();
        let k = key(namespace, name);
        if !held.devices.contains_key(&k) {
            return Err(DeviceError::UnknownDevice {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
        held.states.insert(k, state.to_string());
        Ok(())
    }

    fn twin(&self, namespace: &str, name: &str) -> Option<TwinView> {
        let state = self.lock();
        let k = key(namespace, name);
        let device = state.devices.get(&k)?;
        let model = device
            .model_name()
            .and_then(|m| state.models.get(&key(namespace, m)));
        let reported = state.reported.get(&k);
        let properties = device
            .spec
            .properties
            .iter()
            .map(|p| {
                let model_property =
                    model.and_then(|m| m.spec.properties.iter().find(|mp| mp.name == p.name));
                let held = reported.and_then(|r| r.get(&p.name));
                PropertyTwin {
                    name: p.name.clone(),
                    type_: model_property.map(|m| m.type_.clone()).unwrap_or_default(),
                    access_mode: model_property
                        .map(|m| m.access_mode.clone())
                        .unwrap_or_default(),
                    desired: (!p.desired.value.is_empty()).then(|| p.desired.clone()),
                    reported: held.map(|r| TwinProperty {
                        value: r.value.clone(),
                        metadata: r.metadata.clone(),
                    }),
                    observed_desired: held.and_then(|r| r.observed_desired.clone()),
                }
            })
            .collect();
        Some(TwinView {
            namespace: namespace.to_string(),
            name: name.to_string(),
            model: device.model_name().unwrap_or_default().to_string(),
            protocol: device.spec.protocol.protocol_name.clone(),
            state: state.states.get(&k).cloned().unwrap_or_default(),
            last_online_time: String::new(),
            properties,
        })
    }
}
