//! edgecore as a client of each registered mapper's `DeviceMapperService`.
//!
//! One task per mapper keeps what the mapper holds equal to what the node holds for its
//! protocol: it compares the devices and models the node holds (`Wanted`) with what it last
//! sent the mapper, and calls `CreateDeviceModel`/`UpdateDeviceModel`, `RegisterDevice`/
//! `UpdateDevice` (a changed spec, such as a desired value), `RemoveDevice` and
//! `RemoveDeviceModel`, models before the devices that use them and after the devices that used
//! them. It wakes on every `DeviceEvent` (a lagging receiver just compares again), spaces its
//! calls with a token bucket (`--mapper-qps`, burst twice it), and when the mapper is down or
//! refuses a call it tries again with a doubling delay (at most 30 s). A mapper that registers
//! again replaces its record and its task: the old task stops, the new one starts from what the
//! registration answered.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::dmi::convert;
use ::dmi::pb;
use ::dmi::pb::device_mapper_service_client::DeviceMapperServiceClient;
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::{DeviceAccess, MapperInfo, device_protocol};
use crate::devices::DeviceEvent;

/// The first delay before trying a mapper again; it doubles up to `MAX_RETRY_DELAY`.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// How long one call to a mapper may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

type Key = (String, String);

/// The devices and models a mapper should hold (or was sent), by namespace and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted {
    pub devices: BTreeMap<Key, pb::Device>,
    pub models: BTreeMap<Key, pb::DeviceModel>,
}

impl Wanted {
    /// What a mapper of `protocol` should hold: the devices of that protocol whose model the
    /// node holds (a device without its model waits for it, as KubeEdge's mappers need the
    /// model first), their models, and the other models of that protocol.
    pub fn of<D: DeviceAccess>(devices: &D, protocol: &str) -> Wanted {
        let models: HashMap<Key, _> = devices
            .models()
            .into_iter()
            .map(|m| ((m.namespace().to_string(), m.name().to_string()), m))
            .collect();
        let mut wanted = Wanted::default();
        for (key, model) in &models {
            if model.spec.protocol == protocol {
                wanted.models.insert(key.clone(), convert::model(model));
            }
        }
        for device in devices.devices() {
            let model = device
                .model_name()
                .and_then(|m| models.get(&(device.namespace().to_string(), m.to_string())));
            if device_protocol(&device, model.map(|m| &**m)) != protocol {
                continue;
            }
            let Some(model) = model else {
                tracing::debug!(device = %device.name(), namespace = %device.namespace(), "device waits for its model");
                continue;
            };
            wanted.models.insert(
                (model.namespace().to_string(), model.name().to_string()),
                convert::model(model),
            );
            wanted.devices.insert(
                (device.namespace().to_string(), device.name().to_string()),
                convert::device(&device),
            );
        }
        wanted
    }
}

/// The registered mappers, one per protocol (as KubeEdge routes by protocol).
pub struct Mappers<D: DeviceAccess> {
    devices: D,
    qps: f64,
    shutdown: CancellationToken,
    /// Records by protocol. Held only to swap a record, never across an await.
    records: Mutex<HashMap<String, Record>>,
}

struct Record {
    info: MapperInfo,
    stop: CancellationToken,
}

impl<D: DeviceAccess> Mappers<D> {
    pub fn new(devices: D, qps: f64, shutdown: CancellationToken) -> Arc<Mappers<D>> {
        Arc::new(Mappers {
            devices,
            qps,
            shutdown,
            records: Mutex::new(HashMap::new()),
        })
    }

    /// Records the mapper (replacing any earlier record of its protocol or its name and
    /// stopping that record's task), starts its task, and returns the devices and models of its
    /// protocol. With `with_data` the mapper receives them in the answer, so the task starts
    /// from them; without, the task sends them.
    pub fn register(
        &self,
        info: MapperInfo,
        with_data: bool,
    ) -> (Vec<pb::Device>, Vec<pb::DeviceModel>) {
        // Subscribe before reading the set, so no change falls between the two.
        let events = self.devices.subscribe();
        let wanted = Wanted::of(&self.devices, &info.protocol);
        let sent = if with_data {
            wanted.clone()
        } else {
            Wanted::default()
        };
        let stop = self.shutdown.child_token();
        {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records.retain(|protocol, record| {
                let replaced = *protocol == info.protocol || record.info.name == info.name;
                if replaced {
                    tracing::info!(mapper = %record.info.name, protocol = %protocol, "replacing the earlier registration");
                    record.stop.cancel();
                }
                !replaced
            });
            records.insert(
                info.protocol.clone(),
                Record {
                    info: info.clone(),
                    stop: stop.clone(),
                },
            );
        }
        let task = Follower {
            client: client(&info.socket),
            devices: self.devices.clone(),
            info,
            sent,
            limiter: RateLimiter::new(self.qps),
        };
        tokio::spawn(task.run(events, stop));
        (
            wanted.devices.into_values().collect(),
            wanted.models.into_values().collect(),
        )
    }

    /// The registered mappers.
    pub fn registered(&self) -> Vec<MapperInfo> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut infos: Vec<_> = records.values().map(|r| r.info.clone()).collect();
        infos.sort_by(|a, b| a.protocol.cmp(&b.protocol));
        infos
    }

    /// Stops every mapper's task.
    pub fn stop(&self) {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        for record in records.values() {
            record.stop.cancel();
        }
    }
}

/// A channel to a mapper's socket, connected on first use and again after each failure.
fn client(socket: &Path) -> DeviceMapperServiceClient<Channel> {
    let socket: PathBuf = socket.to_path_buf();
    let channel = Endpoint::from_static("http://mapper.invalid")
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }));
    DeviceMapperServiceClient::new(channel)
}

/// A token bucket: `rate` calls a second, at most `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `qps` calls a second with a burst of twice it (at least 1).
    pub fn new(qps: f64) -> RateLimiter {
        let rate = if qps.is_finite() && qps > 0.0 {
            qps
        } else {
            1.0
        };
        let burst = (2.0 * rate).max(1.0);
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Waits for a token and takes it.
    pub async fn acquire(&mut self) {
        self.refill();
        if self.tokens < 1.0 {
            let wait = (1.0 - self.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            self.refill();
        }
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("mapper is unreachable: {0}")]
    Down(tonic::Status),
    #[error("mapper refused {count} call(s), the first: {first}")]
    Refused { count: usize, first: String },
}

/// Whether a failed call means the mapper is not there (rather than that it refused).
fn is_down(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// The outcome of a removal: a mapper that refuses to remove something does not hold it, so
/// only an unreachable mapper is tried again.
fn removed<T>(
    mapper: &str,
    what: &str,
    key: &Key,
    result: Result<T, tonic::Status>,
) -> Result<(), SyncError> {
    match result {
        Ok(_) => {
            tracing::debug!(mapper, what, namespace = %key.0, name = %key.1, "removed from the mapper");
            Ok(())
        }
        Err(status) if is_down(&status) => Err(SyncError::Down(status)),
        Err(status) => {
            tracing::warn!(mapper, what, namespace = %key.0, name = %key.1, error = %status.message(), "the mapper refused a removal; it is taken as done");
            Ok(())
        }
    }
}

/// The task of one registered mapper.
struct Follower<D: DeviceAccess> {
    client: DeviceMapperServiceClient<Channel>,
    devices: D,
    info: MapperInfo,
    /// What the mapper was sent (or answered with at registration).
    sent: Wanted,
    limiter: RateLimiter,
}

impl<D: DeviceAccess> Follower<D> {
    async fn run(mut self, mut events: broadcast::Receiver<DeviceEvent>, stop: CancellationToken) {
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let wanted = Wanted::of(&self.devices, &self.info.protocol);
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.sync(&wanted) => outcome,
            };
            match outcome {
                Ok(()) => {
                    delay = FIRST_RETRY_DELAY;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        event = events.recv() => {
                            if let Err(broadcast::error::RecvError::Closed) = event {
                                return;
                            }
                        }
                    }
                    // Changes that came together make one comparison.
                    loop {
                        match events.try_recv() {
                            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(broadcast::error::TryRecvError::Closed) => return,
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(mapper = %self.info.name, socket = %self.info.socket.display(), error = %e, retry_in = ?delay, "cannot bring the mapper up to date");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }

    /// Makes the mapper hold `wanted`, recording each call that succeeded.
    async fn sync(&mut self, wanted: &Wanted) -> Result<(), SyncError> {
        let mut refused = Vec::new();
        let mut outcome = |key: &Key, what: &str, result: Result<(), tonic::Status>| match result {
            Ok(()) => Ok(true),
            Err(status) if is_down(&status) => Err(SyncError::Down(status)),
            Err(status) => {
                refused.push(format!("{what} {}/{}: {}", key.0, key.1, status.message()));
                Ok(false)
            }
        };

        for (key, model) in &wanted.models {
            let result = match self.sent.models.get(key) {
                None => {
                    self.limiter.acquire().await;
                    let request = pb::CreateDeviceModelRequest {
                        model: Some(model.clone()),
                    };
                    self.client.create_device_model(request).await.map(drop)
                }
                Some(old) if old != model => {
                    self.limiter.acquire().await;
                    let request = pb::UpdateDeviceModelRequest {
                        model: Some(model.clone()),
                    };
                    self.client.update_device_model(request).await.map(drop)
                }
                Some(_) => continue,
            };
            if outcome(key, "model", result)? {
                tracing::debug!(mapper = %self.info.name, model = %key.1, "model sent");
                self.sent.models.insert(key.clone(), model.clone());
            }
        }

        for (key, device) in &wanted.devices {
            let result = match self.sent.devices.get(key) {
                None => {
                    self.limiter.acquire().await;
                    let request = pb::RegisterDeviceRequest {
                        device: Some(device.clone()),
                    };
                    self.client.register_device(request).await.map(drop)
                }
                // Only the spec matters: status twins change with every report.
                Some(old) if old.spec != device.spec => {
                    self.limiter.acquire().await;
                    let request = pb::UpdateDeviceRequest {
                        device: Some(device.clone()),
                    };
                    self.client.update_device(request).await.map(drop)
                }
                Some(_) => continue,
            };
            if outcome(key, "device", result)? {
                tracing::debug!(mapper = %self.info.name, device = %key.1, "device sent");
                self.sent.devices.insert(key.clone(), device.clone());
            }
        }

        let gone: Vec<Key> = self
            .sent
            .devices
            .keys()
            .filter(|k| !wanted.devices.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.limiter.acquire().await;
            let request = pb::RemoveDeviceRequest {
                device_name: key.1.clone(),
                device_namespace: key.0.clone(),
            };
            let result = self.client.remove_device(request).await;
            removed(&self.info.name, "device", &key, result)?;
            self.sent.devices.remove(&key);
        }

        let gone: Vec<Key> = self
            .sent
            .models
            .keys()
            .filter(|k| !wanted.models.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.limiter.acquire().await;
            let request = pb::RemoveDeviceModelRequest {
                model_name: key.1.clone(),
                model_namespace: key.0.clone(),
            };
            let result = self.client.remove_device_model(request).await;
            removed(&self.info.name, "model", &key, result)?;
            self.sent.models.remove(&key);
        }

        match refused.len() {
            0 => Ok(()),
            count => Err(SyncError::Refused {
                count,
                first: refused.swap_remove(0),
            }),
        }
    }
}
