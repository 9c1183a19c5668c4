//! DMI and MQTT on a real edge: a Device and DeviceModel applied with kubectl against the
//! embedded cloud reach edge-1; a test double of a mapper (`RecordingMapper`) registers over
//! DMI on edgecore's socket and is sent the device, then its desired-value change; its reports
//! reach the Device's status in the API; a real mosquitto carries KubeEdge's device topics
//! (`mosquitto_sub` sees the delta of the desired change, a `mosquitto_pub` of an actual value
//! reaches the API); a deleted Device is removed from the mapper.
//!
//! Needs the relay of Devices, the twins and cloudcore's status writes (other parts of the
//! devices work) besides edgecore's DMI and MQTT.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dmi::pb;
use dmi::pb::device_manager_service_client::DeviceManagerServiceClient;
use dmi::pb::device_mapper_service_server::{DeviceMapperService, DeviceMapperServiceServer};
use integration::{Cloud, eventually, free_tcp_port, join_and_run};
use serde_json::Value;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

const MODEL: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: thermo-model
  namespace: default
spec:
  protocol: dmi-test
  properties:
  - name: temperature
    type: INT
    accessMode: ReadWrite
"#;

const DEVICE: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: thermo-1
  namespace: default
spec:
  deviceModelRef:
    name: thermo-model
  nodeName: edge-1
  protocol:
    protocolName: dmi-test
    configData:
      address: "unit-7"
  properties:
  - name: temperature
    desired:
      value: "20"
    reportToCloud: true
    reportCycle: 100000000
    visitors:
      protocolName: dmi-test
      configData:
        register: HoldingRegister
        offset: 2
"#;

const TOPIC: &str = "$hw/events/device/default/thermo-1/";

/// A real mosquitto on a free loopback port, stopped on drop.
struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        let port = free_tcp_port();
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("writes mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        assert!(
            eventually(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "mosquitto did not listen on {port}"
        );
        Mosquitto { child, port }
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// `mosquitto_sub` for one message on `topic`, started now.
    fn subscribe_one(&self, topic: &str) -> Child {
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", topic, "-C", "1", "-W", "30"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients) must be installed");
        std::thread::sleep(Duration::from_millis(300));
        child
    }

    fn publish(&self, topic: &str, payload: &str) {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", topic, "-m", payload])
            .status()
            .expect("mosquitto_pub runs");
        assert!(status.success(), "mosquitto_pub {topic}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn message_of(sub: Child) -> Value {
    let output = sub.wait_with_output().expect("mosquitto_sub ran");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no message ({e}): {output:?}"))
}

/// What the recording mapper was called with.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Register(String, String),
    Update(String, String),
    Remove(String),
    Model(String),
}

/// A test double of a mapper's `DeviceMapperService`: records each call.
struct RecordingMapper {
    calls: mpsc::UnboundedSender<Call>,
}

fn desired_of(device: Option<pb::Device>) -> (String, String) {
    let device = device.unwrap_or_default();
    let desired = device
        .spec
        .and_then(|s| s.properties.into_iter().next())
        .and_then(|p| p.desired)
        .map(|d| d.value)
        .unwrap_or_default();
    (device.name, desired)
}

#[tonic::async_trait]
impl DeviceMapperService for RecordingMapper {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let (name, desired) = desired_of(request.into_inner().device);
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
        let (name, desired) = desired_of(request.into_inner().device);
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
        let _ = self.calls.send(Call::Model(name));
        Ok(Response::new(pb::CreateDeviceModelResponse::default()))
    }
    async fn remove_device_model(
        &self,
        _: Request<pb::RemoveDeviceModelRequest>,
    ) -> Result<Response<pb::RemoveDeviceModelResponse>, Status> {
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
        let _ = self.calls.send(Call::Model(name));
        Ok(Response::new(pb::UpdateDeviceModelResponse {}))
    }
    async fn get_device(
        &self,
        _: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        Err(Status::unimplemented(
            "the recording mapper keeps no devices",
        ))
    }
}

async fn dmi_client(socket: PathBuf) -> DeviceManagerServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://dmi.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("edgecore serves DMI");
    DeviceManagerServiceClient::new(channel)
}

/// The Device's twin of `temperature` in the API (`status.twins[].reported.value`).
fn reported_in_api(cloud: &Cloud) -> Option<String> {
    let out = cloud.kubectl(&["get", "device", "thermo-1", "-o", "json"]);
    let device: Value = serde_json::from_slice(&out.stdout).ok()?;
    device["status"]["twins"]
        .as_array()?
        .iter()
        .find(|t| t["propertyName"] == "temperature")
        .and_then(|t| t["reported"]["value"].as_str())
        .map(str::to_string)
}

fn state_in_api(cloud: &Cloud) -> Option<String> {
    let out = cloud.kubectl(&["get", "device", "thermo-1", "-o", "json"]);
    let device: Value = serde_json::from_slice(&out.stdout).ok()?;
    device["status"]["state"].as_str().map(str::to_string)
}

#[test]
fn a_mapper_over_dmi_and_clients_over_mqtt_work_with_a_device_from_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]);
    let broker = Mosquitto::start(dir.path());
    let dmi_socket = dir.path().join("dmi.sock");
    let broker_url = broker.url();
    let edge_dir = dir.path().join("edge-1");
    let edge = join_and_run(
        &cloud,
        &edge_dir,
        "edge-1",
        &[
            "--no-pod-runtime",
            "--dmi-socket",
            dmi_socket.to_str().expect("a UTF-8 path"),
            "--mqtt-broker",
            &broker_url,
        ],
    );
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(MODEL));
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(DEVICE));

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let mapper_socket = dir.path().join("mapper.sock");
    let (calls_tx, mut calls) = mpsc::unbounded_channel();
    {
        let _entered = runtime.enter();
        let listener = tokio::net::UnixListener::bind(&mapper_socket).expect("binds");
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(DeviceMapperServiceServer::new(RecordingMapper {
                    calls: calls_tx,
                }))
                .serve_with_incoming(incoming),
        );
    }
    let register = pb::MapperRegisterRequest {
        with_data: true,
        mapper: Some(pb::MapperInfo {
            name: "recording-mapper".into(),
            version: "v1".into(),
            api_version: "v1beta1".into(),
            protocol: "dmi-test".into(),
            address: mapper_socket.to_string_lossy().as_bytes().to_vec(),
            state: "ok".into(),
        }),
    };

    // The device reaches edge-1 and comes with the mapper's registration.
    let mut client = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(connected) =
                tokio::time::timeout(Duration::from_secs(2), dmi_client(dmi_socket.clone())).await
            {
                break connected;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no DMI socket; log:\n{}",
                edge.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let answer = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answer = client
                .mapper_register(register.clone())
                .await
                .expect("edgecore answers MapperRegister")
                .into_inner();
            if !answer.device_list.is_empty() {
                break answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the device did not reach edge-1's mapper; log:\n{}",
                edge.log()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let device = &answer.device_list[0];
    assert_eq!(
        (device.name.as_str(), device.namespace.as_str()),
        ("thermo-1", "default")
    );
    let config = dmi::convert::customized_to_json(
        device
            .spec
            .as_ref()
            .and_then(|s| s.protocol.as_ref())
            .and_then(|p| p.config_data.as_ref()),
    )
    .expect("configData decodes");
    assert_eq!(config["address"], "unit-7");
    assert_eq!(answer.model_list[0].name, "thermo-model");

    // A desired change reaches the mapper as an update and MQTT clients as a delta.
    let delta = broker.subscribe_one(&format!("{TOPIC}twin/update/delta"));
    cloud.kubectl_ok(
        &[
            "patch",
            "device",
            "thermo-1",
            "--type",
            "json",
            "-p",
            r#"[{"op": "replace", "path": "/spec/properties/0/desired/value", "value": "42"}]"#,
        ],
        None,
    );
    let call = runtime.block_on(async {
        loop {
            let call = tokio::time::timeout(Duration::from_secs(10), calls.recv())
                .await
                .expect("a call within 10 s")
                .expect("the mapper runs");
            if matches!(call, Call::Update(..)) {
                break call;
            }
        }
    });
    assert_eq!(call, Call::Update("thermo-1".into(), "42".into()));
    let delta = message_of(delta);
    assert_eq!(delta["delta"]["temperature"], "42", "{delta}");

    // The mapper's report reaches the Device's status in the API.
    let report = pb::ReportDeviceStatusRequest {
        device_name: "thermo-1".into(),
        device_namespace: "default".into(),
        reported_device: Some(pb::DeviceStatus {
            twins: vec![pb::Twin {
                property_name: "temperature".into(),
                reported: Some(pb::TwinProperty {
                    value: "41".into(),
                    metadata: Default::default(),
                }),
                observed_desired: Some(pb::TwinProperty {
                    value: "42".into(),
                    metadata: Default::default(),
                }),
            }],
            report_to_cloud: true,
            report_cycle: 0,
        }),
    };
    runtime
        .block_on(client.report_device_status(report))
        .expect("the report is accepted");
    assert!(
        eventually(Duration::from_secs(10), || reported_in_api(&cloud)
            .as_deref()
            == Some("41")),
        "reported 41 not in the API: {:?}; log:\n{}",
        reported_in_api(&cloud),
        edge.log()
    );

    // A publish of an actual value over MQTT updates the reported twin in the API.
    let result = broker.subscribe_one(&format!("{TOPIC}twin/update/result"));
    broker.publish(
        &format!("{TOPIC}twin/update"),
        r#"{"event_id": "e1", "timestamp": 0, "twin": {"temperature": {"actual": {"value": "43"}}}}"#,
    );
    let result = message_of(result);
    assert_eq!(
        result["twin"]["temperature"]["actual"]["value"], "43",
        "{result}"
    );
    assert!(
        eventually(Duration::from_secs(10), || reported_in_api(&cloud)
            .as_deref()
            == Some("43")),
        "reported 43 not in the API: {:?}",
        reported_in_api(&cloud)
    );

    // A state reported over DMI reaches the API.
    runtime
        .block_on(client.report_device_states(pb::ReportDeviceStatesRequest {
            device_name: "thermo-1".into(),
            device_namespace: "default".into(),
            state: "offline".into(),
        }))
        .expect("the state is accepted");
    assert!(
        eventually(Duration::from_secs(10), || state_in_api(&cloud).as_deref()
            == Some("offline")),
        "state offline not in the API: {:?}",
        state_in_api(&cloud)
    );

    // A device deleted in the API is removed from the mapper.
    cloud.kubectl_ok(&["delete", "device", "thermo-1"], None);
    let removed = runtime.block_on(async {
        loop {
            let call = tokio::time::timeout(Duration::from_secs(15), calls.recv())
                .await
                .expect("a call within 15 s")
                .expect("the mapper runs");
            if let Call::Remove(name) = call {
                break name;
            }
        }
    });
    assert_eq!(removed, "thermo-1");
    drop(edge);
}
