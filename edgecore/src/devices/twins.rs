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
