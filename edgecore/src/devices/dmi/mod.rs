//! KubeEdge's DMI v1beta1 on this gateway ([docs/devices.md](../../../../docs/devices.md#dmi-mappers)):
//! `DeviceManagerService` served on a Unix socket for mapper processes (`MapperRegister`,
//! `ReportDeviceStatus`, `ReportDeviceStates`), and, for each registered mapper, a task that
//! keeps the mapper's devices and models equal to the node's through its `DeviceMapperService`
//! (`mapper`).
//!
//! Nothing a mapper sends can stop edgecore: bad input is answered `INVALID_ARGUMENT`, an
//! unknown device `NOT_FOUND`, each naming what was wrong; a socket that cannot be bound is
//! logged and tried again.

#[cfg(test)]
pub(crate) mod fake;
pub mod mapper;

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::dmi::pb;
use ::dmi::pb::device_manager_service_server::{DeviceManagerService, DeviceManagerServiceServer};
use devices::{Device, DeviceModel};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::mqtt::Notices;
use super::{DeviceError, DeviceEvent, Devices, Reported, TwinView};

/// KubeEdge's default socket.
pub const DEFAULT_SOCKET: &str = ::dmi::DEFAULT_DMI_SOCKET;

/// The device states a mapper (or an MQTT client) may report; KubeEdge's mapper framework uses
/// these strings.
pub const STATES: [&str; 6] = [
    "ok",
    "online",
    "offline",
    "disconnected",
    "unhealthy",
    "unknown",
];

/// Longest name, protocol or socket path a mapper may send.
const MAX_NAME: usize = 253;
/// Longest twin value accepted from a mapper or an MQTT client.
pub const MAX_VALUE: usize = 64 * 1024;
/// Most twins in one report.
const MAX_TWINS: usize = 10_000;

/// What DMI and MQTT need of the node's devices: the `Devices` handle, or a test double of it.
pub trait DeviceAccess: Clone + Send + Sync + 'static {
    fn devices(&self) -> Vec<Arc<Device>>;
    fn models(&self) -> Vec<Arc<DeviceModel>>;
    fn device(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(Arc<Device>, Option<Arc<DeviceModel>>)>;
    fn subscribe(&self) -> broadcast::Receiver<DeviceEvent>;
    fn report(
        &self,
        namespace: &str,
        name: &str,
        reported: Vec<Reported>,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn set_state(
        &self,
        namespace: &str,
        name: &str,
        state: &str,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn twin(&self, namespace: &str, name: &str) -> Option<TwinView>;
}

impl DeviceAccess for Devices {
    fn devices(&self) -> Vec<Arc<Device>> {
        Devices::devices(self)
    }

    fn models(&self) -> Vec<Arc<DeviceModel>> {
        Devices::models(self)
    }

    fn device(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(Arc<Device>, Option<Arc<DeviceModel>>)> {
        Devices::device(self, namespace, name)
    }

    fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        Devices::subscribe(self)
    }

    fn report(
        &self,
        namespace: &str,
        name: &str,
        reported: Vec<Reported>,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        Devices::report(self, namespace, name, reported)
    }

    fn set_state(
        &self,
        namespace: &str,
        name: &str,
        state: &str,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        Devices::set_state(self, namespace, name, state)
    }

    fn twin(&self, namespace: &str, name: &str) -> Option<TwinView> {
        Devices::twin(self, namespace, name)
    }
}

/// A device's protocol: `spec.protocol.protocolName`, else its model's `spec.protocol`.
pub fn device_protocol<'a>(device: &'a Device, model: Option<&'a DeviceModel>) -> &'a str {
    let own = device.spec.protocol.protocol_name.as_str();
    if own.is_empty() {
        model.map(|m| m.spec.protocol.as_str()).unwrap_or_default()
    } else {
        own
    }
}

/// A state as stored: lowercase, one of `STATES`.
pub fn normalize_state(state: &str) -> Option<String> {
    let lower = state.trim().to_ascii_lowercase();
    STATES.contains(&lower.as_str()).then_some(lower)
}

#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error("cannot create the socket's directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; remove it or choose another --dmi-socket")]
    NotASocket { path: PathBuf },
    #[error("{path} is served by another live process; it is left alone")]
    InUse { path: PathBuf },
    #[error("cannot bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path`: creates its directory, removes a stale socket file (one nobody answers on),
/// never one a live process serves, and makes the socket private (0600).
async fn bind(path: &Path) -> Result<(UnixListener, u64), BindError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| BindError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(BindError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing a stale DMI socket");
                let _ = std::fs::remove_file(path);
            }
            Err(source) => {
                return Err(BindError::Bind {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    let bind_error = |source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    let inode = std::fs::metadata(path).map_err(bind_error)?.ino();
    Ok((listener, inode))
}

/// Serves DMI on `socket` until `shutdown`: binds (retrying while it cannot), answers mappers,
/// and runs a client task per registered mapper.
pub async fn serve(
    socket: PathBuf,
    devices: Devices,
    mapper_qps: f64,
    notices: Notices,
    shutdown: CancellationToken,
) {
    serve_with(socket, devices, mapper_qps, notices, shutdown).await
}

/// `serve` over any `DeviceAccess`.
pub async fn serve_with<D: DeviceAccess>(
    socket: PathBuf,
    devices: D,
    mapper_qps: f64,
    notices: Notices,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_secs(1);
    let (listener, inode) = loop {
        match bind(&socket).await {
            Ok(bound) => break bound,
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %daemon::error_chain(&e), retry_in = ?delay, "cannot serve DMI yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(socket = %socket.display(), "serving DMI (DeviceManagerService)");
    let mappers = mapper::Mappers::new(devices.clone(), mapper_qps, shutdown.child_token());
    let service = DeviceManager {
        devices,
        mappers: mappers.clone(),
        notices,
    };
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let served = tonic::transport::Server::builder()
        .add_service(DeviceManagerServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await;
    if let Err(e) = served {
        tracing::error!(socket = %socket.display(), error = %daemon::error_chain(&e), "DMI server stopped");
    }
    mappers.stop();
    // Remove the socket only if it is still the one bound here.
    if std::fs::metadata(&socket).is_ok_and(|m| m.ino() == inode) {
        let _ = std::fs::remove_file(&socket);
    }
}

/// `DeviceManagerService`: what mappers call.
struct DeviceManager<D: DeviceAccess> {
    devices: D,
    mappers: Arc<mapper::Mappers<D>>,
    /// Tells the MQTT side which device's twin or state changed through DMI.
    notices: Notices,
}

fn status_of(error: DeviceError) -> Status {
    match error {
        e @ (DeviceError::UnknownDevice { .. } | DeviceError::UnknownProperty { .. }) => {
            Status::not_found(e.to_string())
        }
        e @ DeviceError::Store(_) => Status::unavailable(daemon::error_chain(&e)),
    }
}

fn namespace_or_default(namespace: &str) -> &str {
    if namespace.is_empty() {
        "default"
    } else {
        namespace
    }
}

fn check_name(what: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is empty")));
    }
    if value.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "{what} is longer than {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

/// A mapper's registration, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MapperInfo {
    pub name: String,
    pub protocol: String,
    /// Where the mapper serves `DeviceMapperService`.
    pub socket: PathBuf,
    pub version: String,
}

impl TryFrom<pb::MapperInfo> for MapperInfo {
    type Error = Status;

    fn try_from(info: pb::MapperInfo) -> Result<MapperInfo, Status> {
        check_name("mapper.name", &info.name)?;
        check_name(&format!("mapper {:?}: protocol", info.name), &info.protocol)?;
        let socket = String::from_utf8(info.address).map_err(|_| {
            Status::invalid_argument(format!(
                "mapper {:?}: address (its socket path) is not UTF-8",
                info.name
            ))
        })?;
        check_name(&format!("mapper {:?}: address", info.name), &socket)?;
        let socket = PathBuf::from(socket.strip_prefix("unix://").unwrap_or(&socket));
        if !socket.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "mapper {:?}: address {:?} is not an absolute socket path",
                info.name,
                socket.display()
            )));
        }
        Ok(MapperInfo {
            name: info.name,
            protocol: info.protocol,
            socket,
            version: info.version,
        })
    }
}

/// One reported twin, checked.
fn reported_of(index: usize, twin: pb::Twin) -> Result<Reported, Status> {
    let property = twin.property_name;
    if property.is_empty() {
        return Err(Status::invalid_argument(format!(
            "reportedDevice.twins[{index}].propertyName is empty"
        )));
    }
    let Some(reported) = twin.reported else {
        return Err(Status::invalid_argument(format!(
            "twin {property:?} has no reported value"
        )));
    };
    let too_long = |v: &pb::TwinProperty| {
        v.value.len() > MAX_VALUE || v.metadata.iter().any(|(k, v)| k.len() + v.len() > 1024)
    };
    if too_long(&reported) || twin.observed_desired.as_ref().is_some_and(too_long) {
        return Err(Status::invalid_argument(format!(
            "twin {property:?}: a value is longer than {MAX_VALUE} bytes or a metadata entry longer than 1024"
        )));
    }
    let api = ::dmi::convert::api_twin_property(&reported);
    let observed_desired = twin
        .observed_desired
        .as_ref()
        .map(::dmi::convert::api_twin_property)
        .filter(|o| !o.value.is_empty() || !o.metadata.is_empty());
    Ok(Reported {
        property,
        value: api.value,
        metadata: api.metadata,
        observed_desired,
    })
}

#[tonic::async_trait]
impl<D: DeviceAccess> DeviceManagerService for DeviceManager<D> {
    async fn mapper_register(
        &self,
        request: Request<pb::MapperRegisterRequest>,
    ) -> Result<Response<pb::MapperRegisterResponse>, Status> {
        let request = request.into_inner();
        let Some(info) = request.mapper else {
            return Err(Status::invalid_argument("mapperRegister has no mapper"));
        };
        let info = MapperInfo::try_from(info)?;
        tracing::info!(mapper = %info.name, protocol = %info.protocol, socket = %info.socket.display(), with_data = request.with_data, "mapper registered");
        let (devices, models) = self.mappers.register(info, request.with_data);
        Ok(Response::new(if request.with_data {
            pb::MapperRegisterResponse {
                model_list: models,
                device_list: devices,
            }
        } else {
            pb::MapperRegisterResponse::default()
        }))
    }

    async fn report_device_status(
        &self,
        request: Request<pb::ReportDeviceStatusRequest>,
    ) -> Result<Response<pb::ReportDeviceStatusResponse>, Status> {
        let request = request.into_inner();
        check_name("deviceName", &request.device_name)?;
        let namespace = namespace_or_default(&request.device_namespace);
        let name = request.device_name.as_str();
        let Some(reported) = request.reported_device else {
            return Err(Status::invalid_argument(format!(
                "report of device {namespace}/{name} has no reportedDevice"
            )));
        };
        if reported.twins.len() > MAX_TWINS {
            return Err(Status::invalid_argument(format!(
                "report of device {namespace}/{name} has more than {MAX_TWINS} twins"
            )));
        }
        let reported = reported
            .twins
            .into_iter()
            .enumerate()
            .map(|(i, twin)| reported_of(i, twin))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|s| {
                Status::invalid_argument(format!("device {namespace}/{name}: {}", s.message()))
            })?;
        if reported.is_empty() {
            return Ok(Response::new(pb::ReportDeviceStatusResponse {}));
        }
        self.devices
            .report(namespace, name, reported)
            .await
            .map_err(status_of)?;
        self.notices.touch(namespace, name);
        Ok(Response::new(pb::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        request: Request<pb::ReportDeviceStatesRequest>,
    ) -> Result<Response<pb::ReportDeviceStatesResponse>, Status> {
        let request = request.into_inner();
        check_name("deviceName", &request.device_name)?;
        let namespace = namespace_or_default(&request.device_namespace);
        let name = request.device_name.as_str();
        let Some(state) = normalize_state(&request.state) else {
            return Err(Status::invalid_argument(format!(
                "device {namespace}/{name}: state {:?} is not one of {}",
                request.state.chars().take(64).collect::<String>(),
                STATES.join(", ")
            )));
        };
        self.devices
            .set_state(namespace, name, &state)
            .await
            .map_err(status_of)?;
        self.notices.touch(namespace, name);
        Ok(Response::new(pb::ReportDeviceStatesResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::dmi::pb::device_manager_service_client::DeviceManagerServiceClient;
    use ::dmi::pb::device_mapper_service_server::{DeviceMapperService, DeviceMapperServiceServer};
    use serde_json::json;
    use tokio::sync::mpsc;
    use tonic::transport::Channel;

    use super::fake::FakeDevices;
    use super::*;

    fn model(name: &str, protocol: &str) -> DeviceModel {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "plant"},
            "spec": {"protocol": protocol, "properties": [
                {"name": "temperature", "type": "INT", "accessMode": "ReadWrite"}]}
        }))
        .expect("model")
    }

    fn device(name: &str, model: &str, protocol: &str, desired: &str) -> Device {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "plant"},
            "spec": {"deviceModelRef": {"name": model}, "nodeName": "edge-1",
                     "protocol": {"protocolName": protocol, "configData": {"slaveID": 1}},
                     "properties": [{"name": "temperature",
                                     "desired": {"value": desired},
                                     "visitors": {"protocolName": protocol,
                                                  "configData": {"register": "HoldingRegister"}}}]}
        }))
        .expect("device")
    }

    /// The node of the tests: a modbus model and device, a device of the model's protocol by
    /// fallback, an opcua device, and a modbus device whose model is missing.
    fn node() -> FakeDevices {
        let devices = FakeDevices::new();
        devices.put_model(model("modbus-model", "modbus"));
        devices.put_model(model("opcua-model", "opcua"));
        devices.put_device(device("m1", "modbus-model", "modbus", "20"));
        devices.put_device(device("m2", "modbus-model", "", "5"));
        devices.put_device(device("o1", "opcua-model", "opcua", "1"));
        devices.put_device(device("lost", "missing-model", "modbus", "1"));
        devices
    }

    async fn uds_channel(path: PathBuf) -> Channel {
        tonic::transport::Endpoint::from_static("http://dmi.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .expect("connects")
    }

    struct Served {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        client: DeviceManagerServiceClient<Channel>,
        shutdown: CancellationToken,
        notices: tokio::sync::broadcast::Receiver<(String, String)>,
    }

    async fn serve_fake(devices: FakeDevices, qps: f64) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/dmi.sock");
        let shutdown = CancellationToken::new();
        let notices = Notices::new();
        let receiver = notices.subscribe_for_tests();
        tokio::spawn(serve_with(
            socket.clone(),
            devices,
            qps,
            notices,
            shutdown.clone(),
        ));
        for _ in 0..200 {
            if UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let client = DeviceManagerServiceClient::new(uds_channel(socket.clone()).await);
        Served {
            _dir: dir,
            socket,
            client,
            shutdown,
            notices: receiver,
        }
    }

    fn register(
        name: &str,
        protocol: &str,
        socket: &Path,
        with_data: bool,
    ) -> pb::MapperRegisterRequest {
        pb::MapperRegisterRequest {
            with_data,
            mapper: Some(pb::MapperInfo {
                name: name.into(),
                version: "v1".into(),
                api_version: "v1beta1".into(),
                protocol: protocol.into(),
                address: socket.to_string_lossy().as_bytes().to_vec(),
                state: "ok".into(),
            }),
        }
    }

    /// What the recording mapper (a test double of a mapper) was called with.
    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        CreateModel(String),
        UpdateModel(String),
        RemoveModel(String),
        Register(String, String),
        Update(String, String),
        Remove(String),
    }

    /// A test double of a mapper's `DeviceMapperService` that records each call.
    struct RecordingMapper {
        calls: mpsc::UnboundedSender<Call>,
    }

    fn desired_of(device: &Option<pb::Device>) -> (String, String) {
        let device = device.as_ref().expect("a device");
        let desired = device
            .spec
            .as_ref()
            .and_then(|s| s.properties.first())
            .and_then(|p| p.desired.as_ref())
            .map(|d| d.value.clone())
            .unwrap_or_default();
        (device.name.clone(), desired)
    }

    #[tonic::async_trait]
    impl DeviceMapperService for RecordingMapper {
        async fn register_device(
            &self,
            request: Request<pb::RegisterDeviceRequest>,
        ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
            let (name, desired) = desired_of(&request.into_inner().device);
            let _ = self.calls.send(Call::Register(name, desired));
            Ok(Response::new(pb::RegisterDeviceResponse::default()))
        }
        async fn remove_device(
            &self,
            request: Request<pb::RemoveDeviceRequest>,
        ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
            let _ = self
                .calls
                .send(Call::Remove(request.into_inner().device_name));
            Ok(Response::new(pb::RemoveDeviceResponse {}))
        }
        async fn update_device(
            &self,
            request: Request<pb::UpdateDeviceRequest>,
        ) -> Result<Response<pb::UpdateDeviceResponse>, Status> {
            let (name, desired) = desired_of(&request.into_inner().device);
            let _ = self.calls.send(Call::Update(name, desired));
            Ok(Response::new(pb::UpdateDeviceResponse {}))
        }
        async fn create_device_model(
            &self,
            request: Request<pb::CreateDeviceModelRequest>,
        ) -> Result<Response<pb::CreateDeviceModelResponse>, Status> {
            let name = request
                .into_inner()
                .model
                .map(|m| m.name)
                .unwrap_or_default();
            let _ = self.calls.send(Call::CreateModel(name));
            Ok(Response::new(pb::CreateDeviceModelResponse::default()))
        }
        async fn remove_device_model(
            &self,
            request: Request<pb::RemoveDeviceModelRequest>,
        ) -> Result<Response<pb::RemoveDeviceModelResponse>, Status> {
            let _ = self
                .calls
                .send(Call::RemoveModel(request.into_inner().model_name));
            Ok(Response::new(pb::RemoveDeviceModelResponse {}))
        }
        async fn update_device_model(
            &self,
            request: Request<pb::UpdateDeviceModelRequest>,
        ) -> Result<Response<pb::UpdateDeviceModelResponse>, Status> {
            let name = request
                .into_inner()
                .model
                .map(|m| m.name)
                .unwrap_or_default();
            let _ = self.calls.send(Call::UpdateModel(name));
            Ok(Response::new(pb::UpdateDeviceModelResponse {}))
        }
        async fn get_device(
            &self,
            _: Request<pb::GetDeviceRequest>,
        ) -> Result<Response<pb::GetDeviceResponse>, Status> {
            Err(Status::unimplemented("not recorded"))
        }
    }

    /// Serves a recording mapper on `socket` until `stop`.
    fn recording_mapper(socket: &Path, stop: CancellationToken) -> mpsc::UnboundedReceiver<Call> {
        let (calls, received) = mpsc::unbounded_channel();
        let listener = UnixListener::bind(socket).expect("binds the mapper's socket");
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DeviceMapperServiceServer::new(RecordingMapper { calls }))
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
        );
        received
    }

    async fn next_call(calls: &mut mpsc::UnboundedReceiver<Call>) -> Call {
        tokio::time::timeout(Duration::from_secs(10), calls.recv())
            .await
            .expect("a call within 10 s")
            .expect("the mapper runs")
    }

    async fn no_call(calls: &mut mpsc::UnboundedReceiver<Call>) {
        if let Ok(Some(call)) = tokio::time::timeout(Duration::from_millis(300), calls.recv()).await
        {
            panic!("unexpected call {call:?}");
        }
    }

    #[tokio::test]
    async fn a_mapper_registering_with_data_gets_the_devices_and_models_of_its_protocol() {
        let mut served = serve_fake(node(), 100.0).await;
        let answer = served
            .client
            .mapper_register(register(
                "modbus-mapper",
                "modbus",
                Path::new("/nonexistent/m.sock"),
                true,
            ))
            .await
            .expect("registers")
            .into_inner();
        let mut devices: Vec<_> = answer.device_list.iter().map(|d| d.name.as_str()).collect();
        devices.sort();
        // m2 by its model's protocol; not o1 (opcua), not lost (its model is missing).
        assert_eq!(devices, ["m1", "m2"]);
        let models: Vec<_> = answer.model_list.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(models, ["modbus-model"]);
        let m1 = answer
            .device_list
            .iter()
            .find(|d| d.name == "m1")
            .expect("m1");
        assert_eq!(m1.namespace, "plant");
        assert_eq!(
            m1.spec.as_ref().expect("spec").device_model_reference,
            "modbus-model"
        );

        let without = served
            .client
            .mapper_register(register(
                "modbus-mapper",
                "modbus",
                Path::new("/nonexistent/m.sock"),
                false,
            ))
            .await
            .expect("registers")
            .into_inner();
        assert!(without.device_list.is_empty() && without.model_list.is_empty());
        served.shutdown.cancel();
    }

    #[tokio::test]
    async fn bad_registrations_are_refused_naming_the_field() {
        let mut served = serve_fake(node(), 100.0).await;
        let cases = [
            (
                pb::MapperRegisterRequest {
                    with_data: true,
                    mapper: None,
                },
                "no mapper",
            ),
            (
                register("", "modbus", Path::new("/m.sock"), true),
                "mapper.name",
            ),
            (register("m", "", Path::new("/m.sock"), true), "protocol"),
            (register("m", "modbus", Path::new(""), true), "address"),
            (
                register("m", "modbus", Path::new("relative.sock"), true),
                "absolute",
            ),
        ];
        for (request, named) in cases {
            let status = served
                .client
                .mapper_register(request)
                .await
                .expect_err("refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().contains(named),
                "{named}: {}",
                status.message()
            );
        }
        served.shutdown.cancel();
    }

    #[tokio::test]
    async fn reports_reach_the_twins_and_bad_ones_are_refused() {
        let devices = node();
        let mut served = serve_fake(devices.clone(), 100.0).await;
        let twin = |name: &str, value: &str| pb::Twin {
            property_name: name.into(),
            reported: Some(pb::TwinProperty {
                value: value.into(),
                metadata: [("timestamp".to_string(), "1700000000123".to_string())].into(),
            }),
            observed_desired: Some(pb::TwinProperty {
                value: "20".into(),
                metadata: Default::default(),
            }),
        };
        let report = |name: &str, twins: Vec<pb::Twin>| pb::ReportDeviceStatusRequest {
            device_name: name.into(),
            device_namespace: "plant".into(),
            reported_device: Some(pb::DeviceStatus {
                twins,
                report_to_cloud: true,
                report_cycle: 0,
            }),
        };
        served
            .client
            .report_device_status(report("m1", vec![twin("temperature", "19")]))
            .await
            .expect("accepted");
        let reports = devices.reports();
        assert_eq!(reports.len(), 1);
        let reported = &reports[0].2[0];
        assert_eq!(
            (reported.property.as_str(), reported.value.as_str()),
            ("temperature", "19")
        );
        assert_eq!(reported.metadata["timestamp"], "1700000000123");
        assert_eq!(
            reported.observed_desired.as_ref().map(|o| o.value.as_str()),
            Some("20")
        );
        let notice = served.notices.try_recv().expect("MQTT hears of it");
        assert_eq!(notice, ("plant".to_string(), "m1".to_string()));

        let status = served
            .client
            .report_device_status(report("ghost", vec![twin("temperature", "1")]))
            .await
            .expect_err("unknown device");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(
            status.message().contains("plant/ghost"),
            "{}",
            status.message()
        );

        let status = served
            .client
            .report_device_status(report("m1", vec![twin("pressure", "1")]))
            .await
            .expect_err("unknown property");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(
            status.message().contains("pressure"),
            "{}",
            status.message()
        );

        let mut no_reported = twin("temperature", "1");
        no_reported.reported = None;
        let status = served
            .client
            .report_device_status(report("m1", vec![no_reported]))
            .await
            .expect_err("no reported value");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("temperature"),
            "{}",
            status.message()
        );

        let status = served
            .client
            .report_device_status(report(
                "m1",
                vec![twin("temperature", &"x".repeat(MAX_VALUE + 1))],
            ))
            .await
            .expect_err("too long");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        let mut nameless = report("m1", vec![]);
        nameless.device_name.clear();
        let status = served
            .client
            .report_device_status(nameless)
            .await
            .expect_err("no name");
        assert!(
            status.message().contains("deviceName"),
            "{}",
            status.message()
        );
        assert_eq!(devices.reports().len(), 1, "nothing refused was recorded");
        served.shutdown.cancel();
    }

    #[tokio::test]
    async fn states_are_recorded_in_lowercase_and_unknown_ones_refused() {
        let devices = node();
        let mut served = serve_fake(devices.clone(), 100.0).await;
        let state = |name: &str, state: &str| pb::ReportDeviceStatesRequest {
            device_name: name.into(),
            device_namespace: "plant".into(),
            state: state.into(),
        };
        served
            .client
            .report_device_states(state("m1", "OK"))
            .await
            .expect("accepted");
        assert_eq!(devices.state_of("plant", "m1").as_deref(), Some("ok"));
        let status = served
            .client
            .report_device_states(state("m1", "sleepy"))
            .await
            .expect_err("not a state");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("offline"),
            "lists the states: {}",
            status.message()
        );
        let status = served
            .client
            .report_device_states(state("ghost", "ok"))
            .await
            .expect_err("unknown device");
        assert_eq!(status.code(), tonic::Code::NotFound);
        served.shutdown.cancel();
    }

    #[tokio::test]
    async fn the_mapper_follows_the_node_and_a_new_registration_replaces_the_old() {
        let devices = node();
        let mut served = serve_fake(devices.clone(), 1000.0).await;
        let mapper_socket = served.socket.with_file_name("mapper.sock");
        let stop = CancellationToken::new();
        let mut calls = recording_mapper(&mapper_socket, stop.clone());

        served
            .client
            .mapper_register(register("modbus-mapper", "modbus", &mapper_socket, false))
            .await
            .expect("registers");
        // Without data, the mapper is sent its model first, then its devices.
        assert_eq!(
            next_call(&mut calls).await,
            Call::CreateModel("modbus-model".into())
        );
        let mut registered = vec![next_call(&mut calls).await, next_call(&mut calls).await];
        registered.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            registered,
            [
                Call::Register("m1".into(), "20".into()),
                Call::Register("m2".into(), "5".into())
            ]
        );

        // A desired value changes: an update.
        devices.put_device(device("m1", "modbus-model", "modbus", "25"));
        assert_eq!(
            next_call(&mut calls).await,
            Call::Update("m1".into(), "25".into())
        );
        // An opcua device changes: nothing for this mapper.
        devices.put_device(device("o1", "opcua-model", "opcua", "2"));
        no_call(&mut calls).await;
        // A device leaves the node: removed.
        devices.remove_device("plant", "m2");
        assert_eq!(next_call(&mut calls).await, Call::Remove("m2".into()));

        // The mapper registers again (with data): it is not sent what it was answered, and only
        // one task follows it.
        served
            .client
            .mapper_register(register("modbus-mapper", "modbus", &mapper_socket, true))
            .await
            .expect("registers again");
        devices.put_device(device("m1", "modbus-model", "modbus", "30"));
        assert_eq!(
            next_call(&mut calls).await,
            Call::Update("m1".into(), "30".into())
        );
        no_call(&mut calls).await;
        stop.cancel();
        served.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_mapper_that_is_down_gets_its_devices_when_it_comes_up() {
        let devices = node();
        let mut served = serve_fake(devices.clone(), 1000.0).await;
        let mapper_socket = served.socket.with_file_name("late.sock");
        served
            .client
            .mapper_register(register("modbus-mapper", "modbus", &mapper_socket, false))
            .await
            .expect("registers");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stop = CancellationToken::new();
        let mut calls = recording_mapper(&mapper_socket, stop.clone());
        assert_eq!(
            next_call(&mut calls).await,
            Call::CreateModel("modbus-model".into())
        );
        assert!(matches!(next_call(&mut calls).await, Call::Register(..)));
        stop.cancel();
        served.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Stale: bound, then its listener dropped.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("binds"));
        let (_listener, _) = bind(&stale).await.expect("a stale socket is replaced");
        let mode = std::fs::metadata(&stale)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Live: someone answers on it.
        let live = dir.path().join("live.sock");
        let _holder = UnixListener::bind(&live).expect("binds");
        let error = bind(&live).await.expect_err("a live socket is not stolen");
        assert!(matches!(error, BindError::InUse { .. }), "{error}");

        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("writes");
        let error = bind(&file).await.expect_err("not a socket");
        assert!(error.to_string().contains("not a socket"), "{error}");
        assert!(file.exists(), "a file that is no socket is kept");
    }

    #[tokio::test]
    async fn serving_waits_for_a_live_socket_holder_and_takes_the_path_when_it_leaves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("dmi.sock");
        let holder = UnixListener::bind(&socket).expect("binds");
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_with(
            socket.clone(),
            node(),
            10.0,
            Notices::new(),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Still the holder's: a connection lands on it.
        let _client = UnixStream::connect(&socket).await.expect("connects");
        let _accepted = holder.accept().await.expect("the holder answers");
        drop(holder);
        let _ = std::fs::remove_file(&socket);
        let mut served = None;
        for _ in 0..100 {
            if let Ok(stream) = UnixStream::connect(&socket).await {
                served = Some(stream);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served.is_some(), "edgecore serves once the path is free");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn the_rate_limiter_allows_a_burst_then_spaces_calls() {
        let mut limiter = mapper::RateLimiter::new(50.0);
        let start = tokio::time::Instant::now();
        for _ in 0..100 {
            limiter.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "a burst of twice the rate"
        );
        for _ in 0..25 {
            limiter.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(450) && elapsed <= Duration::from_millis(900),
            "25 more at 50/s take half a second: {elapsed:?}"
        );
    }
}
