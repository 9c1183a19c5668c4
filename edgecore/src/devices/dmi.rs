//! KubeEdge's DMI v1beta1 on this gateway: `DeviceManagerService` served on a Unix socket for
//! mappers, and a client of each registered mapper's `DeviceMapperService`. (Skeleton: filled in
//! by the DMI work.)

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::Devices;

/// KubeEdge's default socket.
pub const DEFAULT_SOCKET: &str = dmi::DEFAULT_DMI_SOCKET;

/// Serves DMI on `socket` until `shutdown`.
pub async fn serve(
    socket: PathBuf,
    devices: Devices,
    mapper_qps: f64,
    shutdown: CancellationToken,
) {
    let _ = (socket, devices, mapper_qps);
    shutdown.cancelled().await;
}
