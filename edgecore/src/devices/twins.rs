//! The twins: per device property, the desired value (from the spec) and the reported value
//! with its timestamp (from the mapper), kept in `edge.db`, reported to the cloud through the
//! outbox as the Device's `status` ([docs/devices.md](../../../../docs/devices.md), "Twins at
//! the edge").
//!
//! [`Twins`] holds in memory the Devices and DeviceModels the store holds (re-read after each
//! commit of the replica by [`run`]) and each device's twin; the twin tables of `edge.db`
//! (`device_states`, `device_twins`) hold the same twins durably, through a connection of its
//! own. Every change of a twin is written (one transaction, on a blocking thread) before memory
//! changes and before anything goes to the outbox, so what the cloud hears is never newer than
//! what a reboot keeps.
//!
//! Reports to the cloud: a Device's report is its whole status (the twins of its properties
//! with `reportToCloud`, its state and `lastOnlineTime`), so the outbox coalesces per device
//! (latest wins) and nothing reported while offline is reported out of order. A device's report
//! goes out at most once per its report cycle (the smallest `reportCycle` of its reported
//! properties, 1 s when none sets one): at once when the last one is older than the cycle,
//! else at the end of the cycle with the values of then. A new state goes at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::{Device, DeviceModel, DeviceStatus, Twin, TwinProperty};
use proto::ObjectRef;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use super::{DeviceError, DeviceEvent, PropertyTwin, Reported, TwinView};
use crate::outbox::{Outbox, Report};
use crate::store::{Store, StoreError, StoredObject, StoredProperty, StoredTwin, TwinsWrite};

/// A device's or a model's namespace and name.
type Key = (String, String);

/// The report cycle of a device whose properties set none (KubeEdge: 0 means 1 s).
pub const DEFAULT_REPORT_CYCLE: Duration = Duration::from_secs(1);
/// A failed sync of the twin tables is tried again after this long.
const RETRY_SYNC_AFTER: Duration = Duration::from_secs(1);
/// Events a slow subscriber may fall behind by before it lags (and re-reads `devices()`).
const EVENT_CAPACITY: usize = 1024;

/// The devices of this node and their twins.
pub struct Twins {
    /// The twin tables' connection. A std mutex held for every change of a twin, from the
    /// decision through the write to the update of memory, so changes apply in one order on
    /// disk and in memory; used on blocking threads only.
    store: Mutex<Store>,
    /// What readers see. A std mutex held for map operations only, never across a disk write.
    /// Lock order: `store`, then `state`.
    state: Mutex<State>,
    events: broadcast::Sender<DeviceEvent>,
    outbox: Arc<Outbox>,
    /// Wakes [`run`]: a report was deferred to the end of its device's cycle.
    deferred: Notify,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<Key, Held>,
    models: BTreeMap<Key, Arc<DeviceModel>>,
    /// Twins in the store of devices the node no longer holds (they left while edgecore was
    /// stopped); removed at the next sync.
    stale: Vec<Key>,
}

#[derive(Debug)]
struct Held {
    device: Arc<Device>,
    /// As `edge.db` holds it (memory follows the store).
    twin: StoredTwin,
    /// The twin's device row is in the store (false after a start found none).
    stored: bool,
    /// When the last report of the device went into the outbox.
    last_report: Option<Instant>,
    /// A report waits for the end of the cycle.
    report_due: Option<Instant>,
}

impl Held {
    fn object(&self) -> ObjectRef {
        ObjectRef {
            kind: devices::DEVICE_KIND.to_string(),
            namespace: self.twin.namespace.clone(),
            name: self.twin.name.clone(),
            uid: self.twin.uid.clone(),
        }
    }
}

/// Whether a report may wait for the device's cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    /// A new state: at once.
    Now,
    /// New values: at most once per cycle.
    Paced,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device's or model's key.
fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

impl Twins {
    /// Opens the twins kept in DIR/edge.db with the Devices and DeviceModels the store holds.
    /// A report the last run deferred and did not send (stopped within a report cycle) is
    /// due at once.
    pub fn open(data_dir: &Path, outbox: Arc<Outbox>) -> Result<Twins, StoreError> {
        let store = Store::open(data_dir)?;
        let objects = store.list(&[devices::DEVICE_KIND, devices::DEVICE_MODEL_KIND])?;
        let (held_devices, models) = parse_objects(&objects, &State::default());
        let mut stored: BTreeMap<Key, StoredTwin> = store
            .device_twins()?
            .into_iter()
            .map(|twin| (key(&twin.namespace, &twin.name), twin))
            .collect();
        let now = Instant::now();
        let mut state = State {
            models,
            ..State::default()
        };
        for (key, (uid, device)) in held_devices {
            let (twin, was_stored) = match stored.remove(&key) {
                Some(twin) if twin.uid == uid => (twin, true),
                Some(_) => {
                    state.stale.push(key.clone());
                    (fresh_twin(&key, &uid), false)
                }
                None => (fresh_twin(&key, &uid), false),
            };
            let mut held = Held {
                device,
                twin,
                stored: was_stored,
                last_report: None,
                report_due: None,
            };
            let status = status_of(&held);
            if !is_empty(&status) && outbox.last_status(&held.object()) != Some(status) {
                held.report_due = Some(now);
            }
            state.devices.insert(key, held);
        }
        state.stale.extend(stored.into_keys());
        tracing::info!(
            path = %store.path().display(),
            devices = state.devices.len(),
            models = state.models.len(),
            "device twins loaded"
        );
        Ok(Twins {
            store: Mutex::new(store),
            state: Mutex::new(state),
            events: broadcast::channel(EVENT_CAPACITY).0,
            outbox,
            deferred: Notify::new(),
        })
    }

    pub fn devices(&self) -> Vec<Arc<Device>> {
        lock(&self.state)
            .devices
            .values()
            .map(|h| h.device.clone())
            .collect()
    }

    pub fn models(&self) -> Vec<Arc<DeviceModel>> {
        lock(&self.state).models.values().cloned().collect()
    }

    pub fn device(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(Arc<Device>, Option<Arc<DeviceModel>>)> {
        let state = lock(&self.state);
        let held = state.devices.get(&key(namespace, name))?;
        Some((held.device.clone(), model_of(&state.models, &held.device)))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }

    pub async fn report(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        reported: Vec<Reported>,
    ) -> Result<(), DeviceError> {
        let (twins, namespace, name) = (self.clone(), namespace.to_string(), name.to_string());
        blocking(move || twins.record(&namespace, &name, reported, Instant::now())).await
    }

    pub async fn set_state(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        state: &str,
    ) -> Result<(), DeviceError> {
        let (twins, namespace, name, state) = (
            self.clone(),
            namespace.to_string(),
            name.to_string(),
            state.to_string(),
        );
        blocking(move || twins.record_state(&namespace, &name, &state, Instant::now())).await
    }

    pub fn twin(&self, namespace: &str, name: &str) -> Option<TwinView> {
        let state = lock(&self.state);
        let held = state.devices.get(&key(namespace, name))?;
        let model = model_of(&state.models, &held.device);
        Some(view(&held.device, model.as_deref(), Some(&held.twin)))
    }

    /// Records reported values (blocking): see [`super::Devices::report`].
    fn record(
        &self,
        namespace: &str,
        name: &str,
        reported: Vec<Reported>,
        now: Instant,
    ) -> Result<(), DeviceError> {
        let key = key(namespace, name);
        let mut store = lock(&self.store);
        let mut unknown = Vec::new();
        let mut ignored = 0u64;
        let changed: BTreeMap<String, StoredProperty> = {
            let state = lock(&self.state);
            let held = state
                .devices
                .get(&key)
                .ok_or_else(|| DeviceError::UnknownDevice {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })?;
            let mut changed: BTreeMap<String, StoredProperty> = BTreeMap::new();
            let now_ms = now_millis().to_string();
            for value in reported {
                if !held
                    .device
                    .spec
                    .properties
                    .iter()
                    .any(|p| p.name == value.property)
                {
                    unknown.push(value.property);
                    continue;
                }
                let before = changed
                    .get(&value.property)
                    .or_else(|| held.twin.properties.get(&value.property))
                    .cloned()
                    .unwrap_or_default();
                let mut metadata = value.metadata;
                metadata
                    .entry("timestamp".to_string())
                    .or_insert_with(|| now_ms.clone());
                let new = TwinProperty {
                    value: value.value,
                    metadata,
                };
                if before
                    .reported
                    .as_ref()
                    .is_some_and(|held| older(&new, held))
                {
                    ignored += 1;
                    continue;
                }
                let mut after = before.clone();
                after.reported = Some(new);
                if let Some(observed) = value.observed_desired {
                    after.observed_desired = Some(observed);
                }
                if after != before {
                    changed.insert(value.property, after);
                }
            }
            changed
        };
        let metrics = self.outbox.metrics();
        metrics.device_reports_ignored.inc_by(ignored);
        if !changed.is_empty() {
            let write = TwinsWrite {
                properties: changed
                    .iter()
                    .map(|(property, values)| {
                        (
                            namespace.to_string(),
                            name.to_string(),
                            property.clone(),
                            values.clone(),
                        )
                    })
                    .collect(),
                ..TwinsWrite::default()
            };
            store.write_twins(&write)?;
            metrics.device_twin_updates.inc_by(changed.len() as u64);
            let mut state = lock(&self.state);
            // The store lock kept the device on the node since the check above.
            if let Some(held) = state.devices.get_mut(&key) {
                let reported_to_cloud = held
                    .device
                    .spec
                    .properties
                    .iter()
                    .any(|p| p.report_to_cloud && changed.contains_key(&p.name));
                held.twin.properties.extend(changed);
                if reported_to_cloud {
                    self.offer(held, now, Urgency::Paced);
                }
            }
        }
        drop(store);
        match unknown.into_iter().next() {
            Some(property) => Err(DeviceError::UnknownProperty {
                namespace: namespace.to_string(),
                name: name.to_string(),
                property,
            }),
            None => Ok(()),
        }
    }

    /// Records a device's state (blocking): see [`super::Devices::set_state`].
    fn record_state(
        &self,
        namespace: &str,
        name: &str,
        new_state: &str,
        now: Instant,
    ) -> Result<(), DeviceError> {
        let key = key(namespace, name);
        let mut store = lock(&self.store);
        let row = {
            let state = lock(&self.state);
            let held = state
                .devices
                .get(&key)
                .ok_or_else(|| DeviceError::UnknownDevice {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })?;
            let last_online_time = match new_state {
                devices::state::OK | devices::state::ONLINE => now_rfc3339(),
                _ => held.twin.last_online_time.clone(),
            };
            if held.twin.state == new_state && held.twin.last_online_time == last_online_time {
                return Ok(());
            }
            StoredTwin {
                state: new_state.to_string(),
                last_online_time,
                properties: BTreeMap::new(),
                ..held.twin.clone()
            }
        };
        store.write_twins(&TwinsWrite {
            devices: vec![row.clone()],
            ..TwinsWrite::default()
        })?;
        let mut state = lock(&self.state);
        if let Some(held) = state.devices.get_mut(&key) {
            let urgency = if held.twin.state == row.state {
                Urgency::Paced
            } else {
                Urgency::Now
            };
            held.twin.state = row.state;
            held.twin.last_online_time = row.last_online_time;
            held.stored = true;
            self.offer(held, now, urgency);
        }
        Ok(())
    }

    /// Puts the device's status into the outbox now, or defers it to the end of its cycle.
    /// Nothing when the status is empty or the outbox holds it already.
    fn offer(&self, held: &mut Held, now: Instant, urgency: Urgency) {
        if urgency == Urgency::Paced && held.report_due.is_some() {
            // The deferred report takes the values of when it goes.
            return;
        }
        let cycle = report_cycle(&held.device);
        let at_once = urgency == Urgency::Now
            || held
                .last_report
                .is_none_or(|last| now.saturating_duration_since(last) >= cycle);
        if at_once {
            self.send(held, now);
        } else if let Some(last) = held.last_report {
            held.report_due = Some(last + cycle);
            self.deferred.notify_one();
        }
    }

    /// Puts the device's status into the outbox, unless it is empty or already there.
    fn send(&self, held: &mut Held, now: Instant) {
        held.report_due = None;
        let status = status_of(held);
        let object = held.object();
        if is_empty(&status) || self.outbox.last_status(&object).as_ref() == Some(&status) {
            return;
        }
        held.last_report = Some(now);
        self.outbox.put(object, Report::Status(status));
        self.outbox.metrics().device_reports.inc();
    }

    /// Sends the deferred reports due at `now`; returns when the next one is due.
    fn flush_due(&self, now: Instant) -> Option<Instant> {
        let mut state = lock(&self.state);
        let mut next: Option<Instant> = None;
        for held in state.devices.values_mut() {
            match held.report_due {
                Some(due) if due <= now => self.send(held, now),
                Some(due) => next = Some(next.map_or(due, |n| n.min(due))),
                None => {}
            }
        }
        next
    }

    /// Follows the store (blocking): re-reads its Devices and DeviceModels, records the twin
    /// rows that changed, updates memory and announces what changed. On an error nothing
    /// changed, in memory or on disk; the next sync starts from the same point.
    fn sync(&self, now: Instant) -> Result<(), StoreError> {
        let mut store = lock(&self.store);
        let objects = store.list(&[devices::DEVICE_KIND, devices::DEVICE_MODEL_KIND])?;
        let plan = {
            let state = lock(&self.state);
            let (devices, models) = parse_objects(&objects, &state);
            plan(&state, devices, models)
        };
        if !plan.write.is_empty() {
            store.write_twins(&plan.write)?;
        }
        let mut state = lock(&self.state);
        let mut events = Vec::new();
        for (key, model) in &plan.models {
            if state.models.get(key).is_none_or(|held| **held != **model) {
                events.push(DeviceEvent::ModelUpserted(model.clone()));
            }
        }
        let old_models = std::mem::replace(&mut state.models, plan.models);
        state.stale.clear();
        for key in &plan.removed {
            let Some(held) = state.devices.remove(key) else {
                continue;
            };
            self.outbox.forget(&held.object());
            tracing::info!(device.namespace = %key.0, device.name = %key.1, "device left the node");
            events.push(DeviceEvent::DeviceRemoved {
                namespace: key.0.clone(),
                name: key.1.clone(),
                protocol: protocol_of(&held.device, model_of(&old_models, &held.device).as_deref()),
            });
        }
        let written: BTreeMap<(&str, &str, &str), &StoredProperty> = plan
            .write
            .properties
            .iter()
            .map(|(ns, name, property, values)| {
                ((ns.as_str(), name.as_str(), property.as_str()), values)
            })
            .collect();
        for (key, (uid, device)) in plan.devices {
            let model = model_of(&state.models, &device);
            let (upserted, desired_changed) = match state.devices.get(&key) {
                None => {
                    tracing::info!(device.namespace = %key.0, device.name = %key.1, "device arrived");
                    let names = device.spec.properties.iter().map(|p| p.name.clone());
                    (true, names.collect())
                }
                Some(held) => {
                    let changed = desired_changes(&held.device, &device);
                    let model_changed = model_of(&old_models, &held.device) != model;
                    (held.device.spec != device.spec || model_changed, changed)
                }
            };
            let held = state.devices.entry(key.clone()).or_insert_with(|| Held {
                device: device.clone(),
                twin: fresh_twin(&key, &uid),
                stored: false,
                last_report: None,
                report_due: None,
            });
            let spec_changed = held.device.spec != device.spec;
            held.device = device.clone();
            held.stored = true;
            held.twin.uid = uid;
            held.twin
                .properties
                .retain(|name, _| device.spec.properties.iter().any(|p| &p.name == name));
            for property in &device.spec.properties {
                if let Some(values) =
                    written.get(&(key.0.as_str(), key.1.as_str(), property.name.as_str()))
                {
                    held.twin
                        .properties
                        .insert(property.name.clone(), (*values).clone());
                }
            }
            if spec_changed {
                // `reportToCloud` or the cycles may have changed what the cloud should hold.
                self.offer(held, now, Urgency::Paced);
            }
            if upserted {
                events.push(DeviceEvent::DeviceUpserted {
                    device,
                    model,
                    desired_changed,
                });
            }
        }
        for (key, model) in &old_models {
            if !state.models.contains_key(key) {
                events.push(DeviceEvent::ModelRemoved {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    protocol: model.spec.protocol.clone(),
                });
            }
        }
        drop(state);
        drop(store);
        for event in events {
            // No subscriber is fine: the DMI and MQTT parts read `devices()` when they start.
            let _ = self.events.send(event);
        }
        Ok(())
    }
}

/// What a sync changes.
struct Plan {
    devices: BTreeMap<Key, (String, Arc<Device>)>,
    models: BTreeMap<Key, Arc<DeviceModel>>,
    /// Devices that leave memory (gone, or replaced by a new uid).
    removed: Vec<Key>,
    write: TwinsWrite,
}

impl TwinsWrite {
    fn is_empty(&self) -> bool {
        self.remove_devices.is_empty()
            && self.remove_properties.is_empty()
            && self.devices.is_empty()
            && self.properties.is_empty()
    }
}

/// Decides a sync: which twins go, which rows are written.
fn plan(
    state: &State,
    devices: BTreeMap<Key, (String, Arc<Device>)>,
    models: BTreeMap<Key, Arc<DeviceModel>>,
) -> Plan {
    let mut write = TwinsWrite {
        remove_devices: state.stale.clone(),
        ..TwinsWrite::default()
    };
    let mut removed = Vec::new();
    for (key, held) in &state.devices {
        if devices
            .get(key)
            .is_none_or(|(uid, _)| *uid != held.twin.uid)
        {
            removed.push(key.clone());
            write.remove_devices.push(key.clone());
        }
    }
    for (key, (uid, device)) in &devices {
        let held = state
            .devices
            .get(key)
            .filter(|held| held.twin.uid == *uid && !removed.contains(key));
        let before = held.map(|held| &held.twin);
        // A twin without its device row (a start found none) is written whole.
        let whole = held.is_none_or(|held| !held.stored);
        if whole {
            write.devices.push(match before {
                Some(twin) => StoredTwin {
                    properties: BTreeMap::new(),
                    ..twin.clone()
                },
                None => fresh_twin(key, uid),
            });
        }
        for property in &device.spec.properties {
            let desired = desired_of(&property.desired);
            let held = before.and_then(|twin| twin.properties.get(&property.name));
            let differs = held.map(|values| &values.desired) != Some(&desired);
            if (whole || differs) && (held.is_some() || desired.is_some()) {
                let mut values = held.cloned().unwrap_or_default();
                values.desired = desired;
                write.properties.push((
                    key.0.clone(),
                    key.1.clone(),
                    property.name.clone(),
                    values,
                ));
            }
        }
        for name in before.into_iter().flat_map(|twin| twin.properties.keys()) {
            if !device.spec.properties.iter().any(|p| &p.name == name) {
                write
                    .remove_properties
                    .push((key.0.clone(), key.1.clone(), name.clone()));
            }
        }
    }
    Plan {
        devices,
        models,
        removed,
        write,
    }
}

/// Parses the store's Devices and DeviceModels. A body that does not parse is logged naming
/// the object; the version held before (if any) stays, so a bad body loses nothing.
#[allow(clippy::type_complexity)]
fn parse_objects(
    objects: &[StoredObject],
    held: &State,
) -> (
    BTreeMap<Key, (String, Arc<Device>)>,
    BTreeMap<Key, Arc<DeviceModel>>,
) {
    let mut devices = BTreeMap::new();
    let mut models = BTreeMap::new();
    for object in objects {
        let key = key(&object.key.namespace, &object.key.name);
        if object.key.kind == devices::DEVICE_KIND {
            match parse_device(object) {
                Ok(device) => {
                    let device = match held.devices.get(&key) {
                        Some(h) if *h.device == device => h.device.clone(),
                        _ => Arc::new(device),
                    };
                    devices.insert(key, (object.uid.clone(), device));
                }
                Err(e) => {
                    tracing::warn!(
                        kind = %object.key.kind, namespace = %object.key.namespace, name = %object.key.name,
                        "cannot read the device: {e}; keeping what was held before, if anything"
                    );
                    if let Some(h) = held.devices.get(&key) {
                        devices.insert(key, (h.twin.uid.clone(), h.device.clone()));
                    }
                }
            }
        } else {
            match parse_model(object) {
                Ok(model) => {
                    let model = match held.models.get(&key) {
                        Some(m) if **m == model => m.clone(),
                        _ => Arc::new(model),
                    };
                    models.insert(key, model);
                }
                Err(e) => {
                    tracing::warn!(
                        kind = %object.key.kind, namespace = %object.key.namespace, name = %object.key.name,
                        "cannot read the device model: {e}; keeping what was held before, if anything"
                    );
                    if let Some(m) = held.models.get(&key) {
                        models.insert(key, m.clone());
                    }
                }
            }
        }
    }
    (devices, models)
}

/// A stored Device: its body with the store's namespace, name and uid (the store's key is the
/// truth).
pub fn parse_device(object: &StoredObject) -> Result<Device, serde_json::Error> {
    let mut device: Device = serde_json::from_slice(&object.body)?;
    device.metadata.namespace = Some(object.key.namespace.clone());
    device.metadata.name = Some(object.key.name.clone());
    device.metadata.uid = Some(object.uid.clone());
    Ok(device)
}

/// A stored DeviceModel, with the store's namespace and name.
pub fn parse_model(object: &StoredObject) -> Result<DeviceModel, serde_json::Error> {
    let mut model: DeviceModel = serde_json::from_slice(&object.body)?;
    model.metadata.namespace = Some(object.key.namespace.clone());
    model.metadata.name = Some(object.key.name.clone());
    Ok(model)
}

fn fresh_twin(key: &Key, uid: &str) -> StoredTwin {
    StoredTwin {
        namespace: key.0.clone(),
        name: key.1.clone(),
        uid: uid.to_string(),
        ..StoredTwin::default()
    }
}

fn model_of(models: &BTreeMap<Key, Arc<DeviceModel>>, device: &Device) -> Option<Arc<DeviceModel>> {
    let name = device.model_name()?;
    models.get(&key(device.namespace(), name)).cloned()
}

fn protocol_of(device: &Device, model: Option<&DeviceModel>) -> String {
    let protocol = &device.spec.protocol.protocol_name;
    if protocol.is_empty() {
        model.map(|m| m.spec.protocol.clone()).unwrap_or_default()
    } else {
        protocol.clone()
    }
}

/// The names of the properties whose desired value differs between two specs (or that are
/// new).
fn desired_changes(old: &Device, new: &Device) -> Vec<String> {
    new.spec
        .properties
        .iter()
        .filter(|p| {
            old.spec
                .properties
                .iter()
                .find(|o| o.name == p.name)
                .is_none_or(|o| o.desired != p.desired)
        })
        .map(|p| p.name.clone())
        .collect()
}

/// A spec's desired value, `None` when it gives none.
fn desired_of(desired: &TwinProperty) -> Option<TwinProperty> {
    (!desired.value.is_empty() || !desired.metadata.is_empty()).then(|| desired.clone())
}

/// Whether `new` is older than `held` by `metadata.timestamp`, when both have a readable one.
fn older(new: &TwinProperty, held: &TwinProperty) -> bool {
    let stamp = |p: &TwinProperty| p.metadata.get("timestamp")?.trim().parse::<i64>().ok();
    matches!((stamp(new), stamp(held)), (Some(new), Some(held)) if new < held)
}

/// The smallest `reportCycle` of the properties reported to the cloud (0 counts as 1 s).
fn report_cycle(device: &Device) -> Duration {
    device
        .spec
        .properties
        .iter()
        .filter(|p| p.report_to_cloud)
        .map(|p| match u64::try_from(p.report_cycle) {
            Ok(0) | Err(_) => DEFAULT_REPORT_CYCLE,
            Ok(nanos) => Duration::from_nanos(nanos),
        })
        .min()
        .unwrap_or(DEFAULT_REPORT_CYCLE)
}

/// The Device status the edge reports (contract: `devices::DeviceStatus` JSON): the twins of
/// the properties with `reportToCloud` that have something to say, the state, lastOnlineTime.
fn status_of(held: &Held) -> serde_json::Value {
    let twins = held
        .device
        .spec
        .properties
        .iter()
        .filter(|p| p.report_to_cloud)
        .filter_map(|p| {
            let values = held.twin.properties.get(&p.name)?;
            if values.reported.is_none() && values.observed_desired.is_none() {
                return None;
            }
            Some(Twin {
                property_name: p.name.clone(),
                reported: values.reported.clone().unwrap_or_default(),
                observed_desired: values.observed_desired.clone().unwrap_or_default(),
            })
        })
        .collect();
    let status = DeviceStatus {
        twins,
        state: held.twin.state.clone(),
        last_online_time: held.twin.last_online_time.clone(),
        ..DeviceStatus::default()
    };
    // Serializing strings and maps cannot fail.
    serde_json::to_value(status).unwrap_or_default()
}

fn is_empty(status: &serde_json::Value) -> bool {
    status.as_object().is_none_or(|o| o.is_empty())
}

/// A device's twin for readers (`Devices::twin`, `edgecore ctl twin`): the spec's properties
/// in order, with the model's type and access mode and what the twin holds.
pub fn view(device: &Device, model: Option<&DeviceModel>, twin: Option<&StoredTwin>) -> TwinView {
    let properties = device
        .spec
        .properties
        .iter()
        .map(|p| {
            let of_model =
                model.and_then(|m| m.spec.properties.iter().find(|mp| mp.name == p.name));
            let values = twin.and_then(|t| t.properties.get(&p.name));
            PropertyTwin {
                name: p.name.clone(),
                type_: of_model.map(|m| m.type_.clone()).unwrap_or_default(),
                access_mode: of_model.map(|m| m.access_mode.clone()).unwrap_or_default(),
                desired: desired_of(&p.desired),
                reported: values.and_then(|v| v.reported.clone()),
                observed_desired: values.and_then(|v| v.observed_desired.clone()),
            }
        })
        .collect();
    TwinView {
        namespace: device.namespace().to_string(),
        name: device.name().to_string(),
        model: device.model_name().unwrap_or_default().to_string(),
        protocol: protocol_of(device, model),
        state: twin.map(|t| t.state.clone()).unwrap_or_default(),
        last_online_time: twin.map(|t| t.last_online_time.clone()).unwrap_or_default(),
        properties,
    }
}

fn now_millis() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Runs `f` on a blocking thread (the store's writes sync to disk).
async fn blocking(
    f: impl FnOnce() -> Result<(), DeviceError> + Send + 'static,
) -> Result<(), DeviceError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(DeviceError::Store(StoreError::Io {
            action: "run the twin write of",
            path: "edge.db".into(),
            source: std::io::Error::other(e.to_string()),
        })),
    }
}

/// Follows the store: after each commit, re-reads the Devices and DeviceModels and announces
/// what changed; sends deferred reports when their cycle ends.
pub async fn run(
    twins: Arc<Twins>,
    mut store_changed: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let mut sync_needed = true;
    let mut store_open = true;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        if sync_needed && retry_at.is_none_or(|at| at <= tokio::time::Instant::now()) {
            sync_needed = false;
            let syncing = twins.clone();
            let result = tokio::task::spawn_blocking(move || syncing.sync(Instant::now())).await;
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(daemon::error_chain(&e)),
                Err(e) => Some(format!("the sync task failed: {e}")),
            };
            retry_at = failure.map(|e| {
                tracing::warn!(
                    "cannot follow the store's devices: {e}; trying again in {}",
                    humantime::format_duration(RETRY_SYNC_AFTER)
                );
                sync_needed = true;
                tokio::time::Instant::now() + RETRY_SYNC_AFTER
            });
        }
        let next_due = twins
            .flush_due(Instant::now())
            .map(tokio::time::Instant::from_std);
        let wake = match (next_due, retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = store_changed.changed(), if store_open => match changed {
                Ok(()) => sync_needed = true,
                Err(_) => store_open = false,
            },
            _ = twins.deferred.notified() => {}
            _ = sleep_until(wake) => {}
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::outbox::OutboxWriter;
    use proto::sync::{ObjectKey, StoreOp};
    use serde_json::json;

    const MODEL: &str = r#"{"apiVersion":"devices.kubeedge.io/v1beta1","kind":"DeviceModel",
        "metadata":{"name":"thermo","namespace":"default"},
        "spec":{"protocol":"modbus","properties":[
            {"name":"temperature","type":"INT","accessMode":"ReadOnly"},
            {"name":"setpoint","type":"INT","accessMode":"ReadWrite"},
            {"name":"debug","type":"STRING","accessMode":"ReadOnly"}]}}"#;

    /// A Device of model `thermo`: `temperature` reported to the cloud every `cycle_ns`,
    /// `setpoint` reported with the desired value `desired`, `debug` kept local.
    fn device(cycle_ns: i64, desired: &str) -> String {
        json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "sensor", "namespace": "default"},
            "spec": {
                "deviceModelRef": {"name": "thermo"}, "nodeName": "edge-1",
                "protocol": {"protocolName": "modbus", "configData": {"ip": "127.0.0.1", "port": 5020}},
                "properties": [
                    {"name": "temperature", "reportToCloud": true, "reportCycle": cycle_ns},
                    {"name": "setpoint", "reportToCloud": true, "reportCycle": cycle_ns,
                     "desired": {"value": desired}},
                    {"name": "debug"}
                ]
            }
        })
        .to_string()
    }

    fn put(kind: &str, name: &str, uid: &str, rv: u64, body: &str) -> StoreOp {
        StoreOp::Put {
            key: ObjectKey::new(kind, "default", name),
            uid: uid.into(),
            resource_version: rv,
            body: body.as_bytes().to_vec(),
        }
    }

    fn delete(kind: &str, name: &str) -> StoreOp {
        StoreOp::Delete {
            key: ObjectKey::new(kind, "default", name),
        }
    }

    /// A node with a real `edge.db`: the replica's store, the outbox and the twins.
    struct Node {
        dir: tempfile::TempDir,
        store: Store,
        outbox: Arc<Outbox>,
        writer: OutboxWriter,
        twins: Arc<Twins>,
    }

    impl Node {
        fn new(ops: &[StoreOp]) -> Node {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = Store::open(dir.path()).expect("open");
            store.apply(ops).expect("apply");
            Node::open(dir, store)
        }

        fn open(dir: tempfile::TempDir, store: Store) -> Node {
            let (outbox, writer) =
                Outbox::open(dir.path(), Arc::new(Metrics::default())).expect("outbox");
            let twins = Arc::new(Twins::open(dir.path(), outbox.clone()).expect("twins"));
            twins.sync(Instant::now()).expect("first sync");
            Node {
                dir,
                store,
                outbox,
                writer,
                twins,
            }
        }

        /// Writes the outbox and drops everything but the files.
        fn restart(self) -> Node {
            self.writer.write().expect("outbox write");
            let Node { dir, store, .. } = self;
            Node::open(dir, store)
        }

        fn apply(&mut self, ops: &[StoreOp]) {
            self.store.apply(ops).expect("apply");
            self.twins.sync(Instant::now()).expect("sync");
        }

        fn object(&self, uid: &str) -> ObjectRef {
            ObjectRef {
                kind: "Device".into(),
                namespace: "default".into(),
                name: "sensor".into(),
                uid: uid.into(),
            }
        }

        /// The status in the outbox for the device.
        fn reported(&self, uid: &str) -> Option<serde_json::Value> {
            self.outbox.last_status(&self.object(uid))
        }

        fn record(&self, property: &str, value: &str, timestamp: Option<i64>) {
            self.record_at(property, value, timestamp, Instant::now())
        }

        fn record_at(&self, property: &str, value: &str, timestamp: Option<i64>, now: Instant) {
            self.twins
                .record(
                    "default",
                    "sensor",
                    vec![reported(property, value, timestamp)],
                    now,
                )
                .expect("record");
        }

        fn value(&self, property: &str) -> Option<String> {
            let view = self.twins.twin("default", "sensor")?;
            let p = view.properties.into_iter().find(|p| p.name == property)?;
            p.reported.map(|r| r.value)
        }
    }

    fn reported(property: &str, value: &str, timestamp: Option<i64>) -> Reported {
        Reported {
            property: property.into(),
            value: value.into(),
            metadata: timestamp
                .map(|t| [("timestamp".to_string(), t.to_string())].into())
                .unwrap_or_default(),
            observed_desired: None,
        }
    }

    fn drain(events: &mut broadcast::Receiver<DeviceEvent>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(event) = events.try_recv() {
            out.push(match event {
                DeviceEvent::DeviceUpserted {
                    device,
                    model,
                    desired_changed,
                } => format!(
                    "device {} model={} desired={}",
                    device.name(),
                    model.is_some(),
                    desired_changed.join(",")
                ),
                DeviceEvent::DeviceRemoved { name, protocol, .. } => {
                    format!("removed {name} {protocol}")
                }
                DeviceEvent::ModelUpserted(model) => format!("model {}", model.name()),
                DeviceEvent::ModelRemoved { name, .. } => format!("model removed {name}"),
            });
        }
        out
    }

    const SECOND: i64 = 1_000_000_000;

    #[test]
    fn devices_and_models_are_followed_and_announced() {
        let mut node = Node::new(&[]);
        let mut events = node.twins.subscribe();
        // A device whose model is missing is held; a body that does not parse is skipped.
        node.apply(&[
            put("Device", "sensor", "u1", 1, &device(SECOND, "20")),
            put("Device", "broken", "u2", 2, "{not json"),
        ]);
        assert_eq!(
            drain(&mut events),
            ["device sensor model=false desired=temperature,setpoint,debug"]
        );
        assert_eq!(node.twins.devices().len(), 1);
        assert!(
            node.twins
                .device("default", "sensor")
                .expect("held")
                .1
                .is_none()
        );
        // The model arrives: the device is announced again, with it.
        node.apply(&[put("DeviceModel", "thermo", "m1", 3, MODEL)]);
        assert_eq!(
            drain(&mut events),
            ["model thermo", "device sensor model=true desired="]
        );
        let view = node.twins.twin("default", "sensor").expect("twin");
        assert_eq!(view.protocol, "modbus");
        assert_eq!(view.properties[1].type_, "INT");
        assert_eq!(view.properties[1].access_mode, "ReadWrite");
        assert_eq!(
            view.properties[1].desired.as_ref().expect("desired").value,
            "20"
        );
        // A new desired value names its property; a status written back by the cloud (a new
        // resourceVersion, same spec) is no change.
        node.apply(&[put("Device", "sensor", "u1", 4, &device(SECOND, "25"))]);
        assert_eq!(
            drain(&mut events),
            ["device sensor model=true desired=setpoint"]
        );
        let mut with_status: serde_json::Value =
            serde_json::from_str(&device(SECOND, "25")).expect("json");
        with_status["status"] = json!({"state": "ok"});
        node.apply(&[put("Device", "sensor", "u1", 5, &with_status.to_string())]);
        assert_eq!(drain(&mut events), Vec::<String>::new());
        // The desired value is in the twin table.
        let stored = node.store.device_twins().expect("twins");
        assert_eq!(stored.len(), 1);
        assert_eq!(
            stored[0].properties["setpoint"].desired,
            Some(TwinProperty {
                value: "25".into(),
                metadata: BTreeMap::new()
            })
        );
        // A body that stops parsing keeps the device held as it was.
        node.apply(&[put("Device", "sensor", "u1", 6, r#"{"spec": 5}"#)]);
        assert_eq!(drain(&mut events), Vec::<String>::new());
        assert_eq!(node.twins.devices().len(), 1);
        node.apply(&[delete("Device", "sensor"), delete("DeviceModel", "thermo")]);
        assert_eq!(
            drain(&mut events),
            ["removed sensor modbus", "model removed thermo"]
        );
    }

    #[test]
    fn an_older_value_never_replaces_a_newer_one() {
        let node = Node::new(&[
            put("DeviceModel", "thermo", "m1", 1, MODEL),
            put("Device", "sensor", "u1", 2, &device(0, "20")),
        ]);
        let t0 = Instant::now();
        node.record_at("temperature", "21", Some(2_000), t0);
        node.record_at(
            "temperature",
            "19",
            Some(1_000),
            t0 + Duration::from_secs(5),
        );
        assert_eq!(node.value("temperature").as_deref(), Some("21"));
        let status = node.reported("u1").expect("reported");
        assert_eq!(status["twins"][0]["reported"]["value"], "21");
        assert_eq!(
            status["twins"][0]["reported"]["metadata"]["timestamp"],
            "2000"
        );
        node.record_at(
            "temperature",
            "23",
            Some(3_000),
            t0 + Duration::from_secs(10),
        );
        assert_eq!(node.value("temperature").as_deref(), Some("23"));
        assert_eq!(
            node.reported("u1").expect("reported")["twins"][0]["reported"]["value"],
            "23"
        );
        // Without a timestamp the edge's clock stamps it.
        node.record_at("setpoint", "20", None, t0 + Duration::from_secs(20));
        let view = node.twins.twin("default", "sensor").expect("twin");
        let stamp: i64 = view.properties[1]
            .reported
            .as_ref()
            .expect("reported")
            .metadata["timestamp"]
            .parse()
            .expect("ms");
        assert!(stamp > 1_700_000_000_000, "{stamp}");
        // An unknown property is named; the known values of the same report are kept.
        let err = node
            .twins
            .record(
                "default",
                "sensor",
                vec![reported("nope", "1", None), reported("debug", "x", None)],
                t0 + Duration::from_secs(30),
            )
            .unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
        assert_eq!(node.value("debug").as_deref(), Some("x"));
        let err = node
            .twins
            .record("default", "other", vec![], t0)
            .unwrap_err();
        assert!(matches!(err, DeviceError::UnknownDevice { .. }), "{err}");
    }

    #[test]
    fn only_properties_reported_to_the_cloud_reach_the_outbox() {
        let node = Node::new(&[
            put("DeviceModel", "thermo", "m1", 1, MODEL),
            put("Device", "sensor", "u1", 2, &device(0, "20")),
        ]);
        node.record("debug", "local only", Some(1));
        assert_eq!(node.value("debug").as_deref(), Some("local only"));
        assert_eq!(node.reported("u1"), None);
        node.record("temperature", "21", Some(2));
        let status = node.reported("u1").expect("reported");
        assert_eq!(
            status,
            json!({"twins": [{"propertyName": "temperature",
                "reported": {"value": "21", "metadata": {"timestamp": "2"}},
                "observedDesired": {"value": ""}}]})
        );
    }

    #[test]
    fn reports_go_at_most_once_per_report_cycle_and_states_at_once() {
        let node = Node::new(&[
            put("DeviceModel", "thermo", "m1", 1, MODEL),
            put("Device", "sensor", "u1", 2, &device(10 * SECOND, "20")),
        ]);
        let value = |node: &Node| {
            node.reported("u1")
                .map(|s| s["twins"][0]["reported"]["value"].clone())
        };
        let t0 = Instant::now();
        // Leading edge: the first value goes at once.
        node.record_at("temperature", "1", Some(1), t0);
        assert_eq!(value(&node), Some(json!("1")));
        // Within the cycle: held back, and the latest goes at its end.
        node.record_at("temperature", "2", Some(2), t0 + Duration::from_secs(1));
        node.record_at("temperature", "3", Some(3), t0 + Duration::from_secs(2));
        assert_eq!(value(&node), Some(json!("1")));
        assert_eq!(
            node.twins.flush_due(t0 + Duration::from_secs(9)),
            Some(t0 + Duration::from_secs(10))
        );
        assert_eq!(value(&node), Some(json!("1")));
        assert_eq!(node.twins.flush_due(t0 + Duration::from_secs(10)), None);
        assert_eq!(value(&node), Some(json!("3")));
        // A new state goes at once, with the latest values.
        node.record_at("temperature", "4", Some(4), t0 + Duration::from_secs(11));
        assert_eq!(value(&node), Some(json!("3")));
        node.twins
            .record_state("default", "sensor", "ok", t0 + Duration::from_secs(12))
            .expect("state");
        let status = node.reported("u1").expect("reported");
        assert_eq!(status["state"], "ok");
        assert_eq!(status["twins"][0]["reported"]["value"], "4");
        let online = status["lastOnlineTime"].as_str().expect("lastOnlineTime");
        OffsetDateTime::parse(online, &Rfc3339).expect("RFC 3339");
        // Offline keeps the last time it was seen.
        node.twins
            .record_state("default", "sensor", "offline", t0 + Duration::from_secs(13))
            .expect("state");
        let status = node.reported("u1").expect("reported");
        assert_eq!(status["state"], "offline");
        assert_eq!(status["lastOnlineTime"], online);
        // Past the cycle since the last report: at once again.
        node.record_at("temperature", "5", Some(5), t0 + Duration::from_secs(30));
        assert_eq!(value(&node), Some(json!("5")));
    }

    #[test]
    fn a_device_leaving_the_node_takes_its_twin_and_its_report() {
        let mut node = Node::new(&[
            put("DeviceModel", "thermo", "m1", 1, MODEL),
            put("Device", "sensor", "u1", 2, &device(0, "20")),
        ]);
        node.record("temperature", "21", Some(1));
        assert!(node.reported("u1").is_some());
        node.apply(&[delete("Device", "sensor")]);
        assert_eq!(node.reported("u1"), None);
        assert_eq!(node.store.device_twins().expect("twins"), Vec::new());
        assert!(node.twins.twin("default", "sensor").is_none());
        let err = node
            .twins
            .record(
                "default",
                "sensor",
                vec![reported("temperature", "1", None)],
                Instant::now(),
            )
            .unwrap_err();
        assert!(matches!(err, DeviceError::UnknownDevice { .. }), "{err}");
        // Created again under the same name (a new uid): a fresh twin.
        node.apply(&[put("Device", "sensor", "u2", 3, &device(0, "20"))]);
        assert_eq!(node.value("temperature"), None);
        node.record("temperature", "30", Some(2));
        node.apply(&[put("Device", "sensor", "u3", 4, &device(0, "20"))]);
        assert_eq!(node.value("temperature"), None);
        assert_eq!(node.reported("u2"), None);
        let stored = node.store.device_twins().expect("twins");
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].uid, "u3");
        assert!(stored[0].properties.values().all(|p| p.reported.is_none()));
    }

    #[test]
    fn a_restart_reloads_the_twins_and_sends_what_was_held_back() {
        let node = Node::new(&[
            put("DeviceModel", "thermo", "m1", 1, MODEL),
            put("Device", "sensor", "u1", 2, &device(10 * SECOND, "20")),
        ]);
        let t0 = Instant::now();
        node.record_at("temperature", "1", Some(1), t0);
        node.twins
            .record_state("default", "sensor", "ok", t0)
            .expect("state");
        // Held back by the cycle when edgecore stops.
        node.record_at("temperature", "2", Some(2), t0 + Duration::from_secs(1));
        node.record_at("debug", "kept", Some(3), t0 + Duration::from_secs(1));
        let before = node.twins.twin("default", "sensor").expect("twin");
        let node = node.restart();
        let after = node.twins.twin("default", "sensor").expect("twin");
        assert_eq!(after, before);
        assert_eq!(node.value("temperature").as_deref(), Some("2"));
        assert_eq!(node.value("debug").as_deref(), Some("kept"));
        assert_eq!(
            node.reported("u1").expect("reported")["twins"][0]["reported"]["value"],
            "1"
        );
        node.twins.flush_due(Instant::now());
        let status = node.reported("u1").expect("reported");
        assert_eq!(status["twins"][0]["reported"]["value"], "2");
        assert_eq!(status["state"], "ok");
        // A device deleted while edgecore was stopped loses its twin at the first sync.
        let Node {
            dir,
            mut store,
            writer,
            ..
        } = node;
        writer.write().expect("outbox write");
        store.apply(&[delete("Device", "sensor")]).expect("apply");
        let node = Node::open(dir, store);
        assert_eq!(node.store.device_twins().expect("twins"), Vec::new());
        assert!(node.twins.devices().is_empty());
    }

    #[tokio::test]
    async fn the_run_task_follows_commits_and_sends_deferred_reports() {
        let node = Node::new(&[put("DeviceModel", "thermo", "m1", 1, MODEL)]);
        let (changed, changed_rx) = tokio::sync::watch::channel(0u64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(node.twins.clone(), changed_rx, shutdown.clone()));
        let mut store = Store::open(node.dir.path()).expect("open");
        store
            .apply(&[put("Device", "sensor", "u1", 2, &device(SECOND / 5, "20"))])
            .expect("apply");
        let mut events = node.twins.subscribe();
        changed.send_replace(1);
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("announced")
            .expect("event");
        assert!(
            matches!(event, DeviceEvent::DeviceUpserted { .. }),
            "{event:?}"
        );
        let devices = super::super::Devices {
            twins: node.twins.clone(),
        };
        devices
            .report(
                "default",
                "sensor",
                vec![reported("temperature", "1", Some(1))],
            )
            .await
            .expect("report");
        devices
            .report(
                "default",
                "sensor",
                vec![reported("temperature", "2", Some(2))],
            )
            .await
            .expect("report");
        assert_eq!(
            node.reported("u1").expect("reported")["twins"][0]["reported"]["value"],
            "1"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while node.reported("u1").expect("reported")["twins"][0]["reported"]["value"] != "2" {
            assert!(Instant::now() < deadline, "the deferred report never went");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        task.await.expect("run ends");
    }

    #[test]
    fn the_twin_view_serializes_as_the_ctl_contract_says() {
        let view = TwinView {
            namespace: "default".into(),
            name: "sensor".into(),
            model: "thermo".into(),
            protocol: "modbus".into(),
            state: "ok".into(),
            last_online_time: "2026-12-05T10:00:00Z".into(),
            properties: vec![PropertyTwin {
                name: "setpoint".into(),
                type_: "INT".into(),
                access_mode: "ReadWrite".into(),
                desired: Some(TwinProperty {
                    value: "20".into(),
                    metadata: BTreeMap::new(),
                }),
                reported: None,
                observed_desired: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&view).expect("json"),
            json!({"namespace": "default", "name": "sensor", "model": "thermo",
                "protocol": "modbus", "state": "ok", "lastOnlineTime": "2026-12-05T10:00:00Z",
                "properties": [{"name": "setpoint", "type": "INT", "accessMode": "ReadWrite",
                    "desired": {"value": "20"}}]})
        );
    }
}
