//! A Modbus TCP mapper speaking KubeEdge's DMI v1beta1 to edgecore ([docs/devices.md], "The
//! Modbus TCP mapper"): it registers with edgecore for protocol `modbus`, serves
//! `DeviceMapperService` on its own Unix socket, and runs one task per device that reads the
//! properties' registers, writes desired values and reports twins and state.
//!
//! - `plan`: a DMI Device (and its model) to a typed plan: endpoint, visitors, types, cycles;
//! - `codec`: register contents to values and back (scale, swaps), as KubeEdge's mapper does;
//! - `device`: the per-device task (connection, collect, write, report);
//! - `inventory`: the devices and models, and their tasks;
//! - `server`: `DeviceMapperService` on `--socket`;
//! - `edgecore`: the client of edgecore's `DeviceManagerService` on `--dmi-socket`.
//!
//! [docs/devices.md]: ../../../docs/devices.md

pub mod codec;
pub mod device;
pub mod edgecore;
pub mod inventory;
pub mod plan;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dmi::pb;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::edgecore::Edgecore;
use crate::inventory::Inventory;

/// The protocol this mapper registers for unless told otherwise.
pub const DEFAULT_PROTOCOL: &str = "modbus";
/// The name it registers under unless told otherwise.
pub const DEFAULT_NAME: &str = "modbus-mapper";

/// What `modbus-mapper` is started with.
#[derive(Debug, Clone)]
pub struct MapperConfig {
    /// edgecore's `DeviceManagerService` socket.
    pub dmi_socket: PathBuf,
    /// Where this mapper serves `DeviceMapperService` (sent to edgecore as its address).
    pub socket: PathBuf,
    pub name: String,
    pub protocol: String,
}

/// Why the mapper stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MapperError {
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error("the DeviceMapperService task ended unexpectedly")]
    ServerGone,
}

/// Runs the mapper until `shutdown`: serves its socket, registers with edgecore (again each time
/// edgecore's connection closes), and runs the devices edgecore gives it.
pub async fn run(config: MapperConfig, shutdown: CancellationToken) -> Result<(), MapperError> {
    let listener = server::bind(&config.socket).await?;
    info!(
        socket = %config.socket.display(),
        dmi_socket = %config.dmi_socket.display(),
        name = %config.name,
        protocol = %config.protocol,
        "modbus mapper serving DeviceMapperService"
    );
    let edgecore = Edgecore::new(&config.dmi_socket);
    let devices_stop = CancellationToken::new();
    let inventory = Arc::new(Inventory::new(edgecore.clone(), devices_stop.clone()));
    let server_stop = CancellationToken::new();
    let mut server = tokio::spawn(server::serve(
        listener,
        config.socket.clone(),
        inventory.clone(),
        server_stop.clone(),
    ));

    let result = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        _ = register_forever(&config, &edgecore, &inventory) => Ok(()),
        ended = &mut server => Err(match ended {
            Ok(Err(error)) => MapperError::Serve(error),
            _ => MapperError::ServerGone,
        }),
    };
    info!("modbus mapper stopping");
    devices_stop.cancel();
    inventory.stop_all().await;
    server_stop.cancel();
    if !server.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
    }
    let _ = std::fs::remove_file(&config.socket);
    result
}

/// Registers, waits for edgecore's connection to close, registers again; forever.
async fn register_forever(config: &MapperConfig, edgecore: &Edgecore, inventory: &Inventory) {
    let request = pb::MapperRegisterRequest {
        with_data: true,
        mapper: Some(pb::MapperInfo {
            name: config.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: dmi::API_VERSION.into(),
            protocol: config.protocol.clone(),
            address: config.socket.to_string_lossy().as_bytes().to_vec(),
            state: devices::state::OK.into(),
        }),
    };
    loop {
        let mut delay = Duration::from_millis(200);
        let mut attempts = 0u32;
        let response = loop {
            match edgecore.register(request.clone()).await {
                Ok(response) => break response,
                Err(error) => {
                    attempts += 1;
                    // The first failures are expected while edgecore starts; say so once.
                    if attempts == 1 || attempts.is_power_of_two() {
                        warn!(%error, attempts, "registration with edgecore failed; retrying");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        info!(
            devices = response.device_list.len(),
            models = response.model_list.len(),
            "registered with edgecore"
        );
        inventory.replace_all(response);
        edgecore.connection_lost().await;
        info!("edgecore's DMI connection closed; registering again");
    }
}
