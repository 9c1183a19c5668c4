//! The devices and models edgecore gave this mapper, and a running task per device.
//!
//! Fed by `DeviceMapperService` calls (`server`) and by the lists `MapperRegister` returns
//! (`run`); a device is planned against its model, and planned again when the model changes.
//! One `std::sync::Mutex` guards both maps: every operation is short and never awaits.

use std::collections::BTreeMap;
use std::sync::Mutex;

use dmi::pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::device::{self, DeviceHandle};
use crate::edgecore::Edgecore;
use crate::plan::{self, PlanError, namespace_or_default};

/// `(namespace, name)`.
type Key = (String, String);

fn key(namespace: &str, name: &str) -> Key {
    (
        namespace_or_default(namespace).to_string(),
        name.to_string(),
    )
}

struct Entry {
    device: pb::Device,
    handle: DeviceHandle,
}

#[derive(Default)]
struct Inner {
    models: BTreeMap<Key, pb::DeviceModel>,
    devices: BTreeMap<Key, Entry>,
}

/// The mapper's devices and models.
pub struct Inventory {
    inner: Mutex<Inner>,
    edgecore: Edgecore,
    /// Bumped after each registration: every device task reports everything again.
    resync: watch::Sender<u64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory").finish_non_exhaustive()
    }
}

impl Inventory {
    pub fn new(edgecore: Edgecore, shutdown: CancellationToken) -> Inventory {
        Inventory {
            inner: Mutex::new(Inner::default()),
            edgecore,
            resync: watch::Sender::new(0),
            shutdown,
            tracker: TaskTracker::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind; keep using them.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts `device`, or hands its task the new plan. Refuses a device whose protocol
    /// configuration is unusable; properties that are unusable are logged and left out.
    pub fn upsert_device(&self, device: pb::Device) -> Result<(), PlanError> {
        let mut inner = self.lock();
        let model = model_of(&inner.models, &device).cloned();
        if model.is_none() {
            warn!(device = %device.name, namespace = %device.namespace, "device model not known yet; typing properties from their desired values");
        }
        let (plan, skipped) = plan::plan(&device, model.as_ref())?;
        for problem in skipped {
            warn!(%problem, "property left out");
        }
        let key = key(&device.namespace, &device.name);
        match inner.devices.get_mut(&key) {
            Some(entry) => {
                entry.handle.update(plan);
                entry.device = device;
            }
            None => {
                info!(device = %plan.id(), "device added");
                let handle = device::spawn(
                    plan,
                    self.edgecore.clone(),
                    self.resync.subscribe(),
                    &self.shutdown,
                    &self.tracker,
                );
                inner.devices.insert(key, Entry { device, handle });
            }
        }
        Ok(())
    }

    /// Stops and forgets a device; `false` if it was not here.
    pub fn remove_device(&self, namespace: &str, name: &str) -> bool {
        let removed = self.lock().devices.remove(&key(namespace, name));
        if let Some(entry) = &removed {
            info!(device = %name, namespace = %namespace_or_default(namespace), "device removed");
            entry.handle.stop();
        }
        removed.is_some()
    }

    /// Keeps `model` and plans again the devices that use it.
    pub fn upsert_model(&self, model: pb::DeviceModel) {
        let mut inner = self.lock();
        let model_key = key(&model.namespace, &model.name);
        inner.models.insert(model_key.clone(), model.clone());
        for entry in inner.devices.values_mut() {
            let device = &entry.device;
            if key(&device.namespace, &model_of_name(device)) != model_key {
                continue;
            }
            match plan::plan(device, Some(&model)) {
                Ok((plan, skipped)) => {
                    for problem in skipped {
                        warn!(%problem, "property left out");
                    }
                    entry.handle.update(plan);
                }
                Err(problem) => warn!(%problem, "device cannot run under the new model"),
            }
        }
    }

    pub fn remove_model(&self, namespace: &str, name: &str) {
        self.lock().models.remove(&key(namespace, name));
    }

    /// The device as edgecore gave it, with the twins last read in its status.
    pub fn get_device(&self, namespace: &str, name: &str) -> Option<pb::Device> {
        let inner = self.lock();
        let entry = inner.devices.get(&key(namespace, name))?;
        let snapshot = entry.handle.snapshot();
        let mut device = entry.device.clone();
        device.status = Some(pb::DeviceStatus {
            twins: snapshot.twins.into_values().collect(),
            ..device.status.unwrap_or_default()
        });
        Some(device)
    }

    /// Replaces everything with what a registration returned; devices absent from it stop.
    pub fn replace_all(&self, response: pb::MapperRegisterResponse) {
        for model in response.model_list {
            self.upsert_model(model);
        }
        let wanted: Vec<Key> = response
            .device_list
            .iter()
            .map(|d| key(&d.namespace, &d.name))
            .collect();
        let gone: Vec<Key> = self
            .lock()
            .devices
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        for (namespace, name) in gone {
            self.remove_device(&namespace, &name);
        }
        for device in response.device_list {
            if let Err(problem) = self.upsert_device(device) {
                warn!(%problem, "device refused");
            }
        }
        self.resync.send_modify(|generation| *generation += 1);
    }

    /// How many devices run.
    pub fn device_count(&self) -> usize {
        self.lock().devices.len()
    }

    /// Stops every device task and waits for them.
    pub async fn stop_all(&self) {
        for entry in std::mem::take(&mut self.lock().devices).into_values() {
            entry.handle.stop();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn model_of_name(device: &pb::Device) -> String {
    device
        .spec
        .as_ref()
        .map(|s| s.device_model_reference.clone())
        .unwrap_or_default()
}

fn model_of<'a>(
    models: &'a BTreeMap<Key, pb::DeviceModel>,
    device: &pb::Device,
) -> Option<&'a pb::DeviceModel> {
    models.get(&key(&device.namespace, &model_of_name(device)))
}
