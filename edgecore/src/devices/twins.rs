//! The twins: per device property, the desired value (from the spec) and the reported value
//! with its timestamp (from the mapper), kept in `edge.db`, reported to the cloud through the
//! outbox as the Device's `status`. (Skeleton: filled in by the twins work.)

use std::path::Path;
use std::sync::Arc;

use devices::{Device, DeviceModel};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{DeviceError, DeviceEvent, Reported, TwinView};
use crate::outbox::Outbox;
use crate::store::StoreError;

pub struct Twins {
    events: broadcast::Sender<DeviceEvent>,
    _outbox: Arc<Outbox>,
}

impl Twins {
    pub fn open(data_dir: &Path, outbox: Arc<Outbox>) -> Result<Twins, StoreError> {
        let _ = data_dir;
        Ok(Twins {
            events: broadcast::channel(256).0,
            _outbox: outbox,
        })
    }

    pub fn devices(&self) -> Vec<Arc<Device>> {
        Vec::new()
    }

    pub fn models(&self) -> Vec<Arc<DeviceModel>> {
        Vec::new()
    }

    pub fn device(
        &self,
        _namespace: &str,
        _name: &str,
    ) -> Option<(Arc<Device>, Option<Arc<DeviceModel>>)> {
        None
    }

    pub fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }

    pub async fn report(
        &self,
        namespace: &str,
        name: &str,
        _reported: Vec<Reported>,
    ) -> Result<(), DeviceError> {
        Err(DeviceError::UnknownDevice {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    pub async fn set_state(
        &self,
        namespace: &str,
        name: &str,
        _state: &str,
    ) -> Result<(), DeviceError> {
        Err(DeviceError::UnknownDevice {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    pub fn twin(&self, _namespace: &str, _name: &str) -> Option<TwinView> {
        None
    }
}

/// Follows the store: after each commit, re-reads the Devices and DeviceModels and announces
/// what changed.
pub async fn run(
    twins: Arc<Twins>,
    mut store_changed: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let _ = twins;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = store_changed.changed() => if changed.is_err() { return },
        }
    }
}
