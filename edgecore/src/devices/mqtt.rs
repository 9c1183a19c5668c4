//! KubeEdge's device topics (`$hw/events/device/...`) on a local MQTT broker. (Skeleton: filled
//! in by the MQTT work.)

use tokio_util::sync::CancellationToken;

use super::Devices;

/// KubeEdge's eventbus default.
pub const DEFAULT_BROKER: &str = "tcp://127.0.0.1:1883";

/// Speaks the device topics on `broker` until `shutdown`, reconnecting as needed.
pub async fn run(broker: String, devices: Devices, shutdown: CancellationToken) {
    let _ = (broker, devices);
    shutdown.cancelled().await;
}
