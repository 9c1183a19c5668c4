//! `DeviceMapperService` on the mapper's Unix socket: edgecore adds, changes and removes
//! devices and models here, and reads a device back with `GetDevice`.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dmi::pb;
use dmi::pb::device_mapper_service_server::{DeviceMapperService, DeviceMapperServiceServer};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::inventory::Inventory;
use crate::plan::namespace_or_default;

/// Why the mapper's socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {path}: another process answers on it")]
    InUse { path: PathBuf },
    #[error("socket {path}: exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("socket {path}: {step}")]
    Io {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {path}")]
    Serve {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Binds `path`. A file left by a dead process is replaced; a socket someone answers on is
/// never taken over.
pub async fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let io = |step| {
        let path = path.to_path_buf();
        move |source| ServeError::Io { path, step, source }
    };
    match std::fs::symlink_metadata(path) {
        Ok(metadata) => {
            if !metadata.file_type().is_socket() {
                return Err(ServeError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            if UnixStream::connect(path).await.is_ok() {
                return Err(ServeError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspecting")(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("creating its directory"))?;
    }
    UnixListener::bind(path).map_err(io("binding"))
}

/// Serves `DeviceMapperService` on `listener` until `shutdown`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    inventory: Arc<Inventory>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let result = tonic::transport::Server::builder()
        .add_service(DeviceMapperServiceServer::new(MapperService { inventory }))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await;
    let _ = std::fs::remove_file(&path);
    result.map_err(|source| ServeError::Serve { path, source })
}

/// The service edgecore calls.
#[derive(Debug)]
struct MapperService {
    inventory: Arc<Inventory>,
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("{field} is missing")))
}

#[tonic::async_trait]
impl DeviceMapperService for MapperService {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let device = required(request.into_inner().device, "device")?;
        let response = pb::RegisterDeviceResponse {
            device_name: device.name.clone(),
            device_namespace: namespace_or_default(&device.namespace).to_string(),
        };
        self.inventory
            .upsert_device(device)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(response))
    }

    async fn remove_device(
        &self,
        request: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
        let request = request.into_inner();
        self.inventory
            .remove_device(&request.device_namespace, &request.device_name);
        Ok(Response::new(pb::RemoveDeviceResponse {}))
    }

    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::UpdateDeviceResponse>, Status> {
        let device = required(request.into_inner().device, "device")?;
        self.inventory
            .upsert_device(device)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::UpdateDeviceResponse {}))
    }

    async fn create_device_model(
        &self,
        request: Request<pb::CreateDeviceModelRequest>,
    ) -> Result<Response<pb::CreateDeviceModelResponse>, Status> {
        let model = required(request.into_inner().model, "model")?;
        let response = pb::CreateDeviceModelResponse {
            device_model_name: model.name.clone(),
            device_model_namespace: namespace_or_default(&model.namespace).to_string(),
        };
        self.inventory.upsert_model(model);
        Ok(Response::new(response))
    }

    async fn remove_device_model(
        &self,
        request: Request<pb::RemoveDeviceModelRequest>,
    ) -> Result<Response<pb::RemoveDeviceModelResponse>, Status> {
        let request = request.into_inner();
        self.inventory
            .remove_model(&request.model_namespace, &request.model_name);
        Ok(Response::new(pb::RemoveDeviceModelResponse {}))
    }

    async fn update_device_model(
        &self,
        request: Request<pb::UpdateDeviceModelRequest>,
    ) -> Result<Response<pb::UpdateDeviceModelResponse>, Status> {
        let model = required(request.into_inner().model, "model")?;
        self.inventory.upsert_model(model);
        Ok(Response::new(pb::UpdateDeviceModelResponse {}))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        let request = request.into_inner();
        let device = self
            .inventory
            .get_device(&request.device_namespace, &request.device_name)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "device {}/{} is not registered with this mapper",
                    namespace_or_default(&request.device_namespace),
                    request.device_name
                ))
            })?;
        Ok(Response::new(pb::GetDeviceResponse {
            device: Some(device),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/mapper.sock");
        let live = bind(&path).await.expect("binds a fresh path");
        assert!(matches!(bind(&path).await, Err(ServeError::InUse { .. })));
        drop(live);
        // The file stays behind with nobody answering: it is stale and replaced.
        assert!(path.exists());
        let _again = bind(&path).await.expect("replaces the stale socket");

        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").expect("writes");
        assert!(matches!(
            bind(&plain).await,
            Err(ServeError::NotASocket { .. })
        ));
        assert!(plain.exists(), "a regular file is never removed");
    }
}
