//! The real `modbus-mapper` binary against a Modbus TCP device simulated by pymodbus
//! (`integration/scripts/modbus_sim.py`, an independent implementation) and a test double of
//! edgecore's DMI `DeviceManagerService` that records what the mapper tells it
//! (`RecordingDeviceManager`, tonic on a Unix socket). The test also plays edgecore's other
//! half: it calls the mapper's `DeviceMapperService` on the socket the mapper registered.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dmi::pb;
use dmi::pb::device_manager_service_server::{DeviceManagerService, DeviceManagerServiceServer};
use dmi::pb::device_mapper_service_client::DeviceMapperServiceClient;
use integration::{bin, eventually, free_tcp_port, terminate};
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

/// The simulated device: `modbus_sim.py` under python3, driven through its stdin.
struct Simulator {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Simulator {
    fn start(port: u16) -> Simulator {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/modbus_sim.py");
        let mut errors = tempfile::tempfile().expect("a file for the simulator's stderr");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--port", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(errors.try_clone().expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("python3 is needed to run the pymodbus device simulator: {e}")
            });
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut first = String::new();
        let _ = stdout.read_line(&mut first);
        if !first.starts_with("ready ") {
            let _ = child.wait();
            let mut stderr = String::new();
            let _ = errors.seek(SeekFrom::Start(0));
            let _ = errors.read_to_string(&mut stderr);
            panic!(
                "the Modbus simulator did not start on port {port} (it needs pymodbus: pip install pymodbus): {first:?}\n{stderr}"
            );
        }
        Simulator {
            child,
            stdin,
            stdout,
        }
    }

    fn command(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("simulator stdin");
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("simulator stdout");
        assert!(!answer.starts_with("error"), "{line}: {answer}");
        answer.trim().to_string()
    }

    fn set_holding(&mut self, address: u16, value: u16) {
        assert_eq!(self.command(&format!("set hr {address} {value}")), "ok");
    }

    fn holding(&mut self, address: u16) -> u16 {
        let answer = self.command(&format!("get hr {address} 1"));
        answer
            .strip_prefix("values ")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("cannot read {answer:?}"))
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the mapper told the DMI test double.
#[derive(Debug, Default)]
struct Record {
    registrations: Vec<pb::MapperRegisterRequest>,
    /// (device name, twin, when received).
    twins: Vec<(String, pb::Twin, Instant)>,
    /// (device name, state).
    states: Vec<(String, String)>,
}

/// A test double of edgecore's `DeviceManagerService`: records every call and answers
/// `MapperRegister` with a fixed device and model list.
#[derive(Clone)]
struct RecordingDeviceManager {
    record: Arc<Mutex<Record>>,
    devices: Vec<pb::Device>,
    models: Vec<pb::DeviceModel>,
}

#[tonic::async_trait]
impl DeviceManagerService for RecordingDeviceManager {
    async fn mapper_register(
        &self,
        request: Request<pb::MapperRegisterRequest>,
    ) -> Result<Response<pb::MapperRegisterResponse>, Status> {
        self.record
            .lock()
            .expect("lock")
            .registrations
            .push(request.into_inner());
        Ok(Response::new(pb::MapperRegisterResponse {
            model_list: self.models.clone(),
            device_list: self.devices.clone(),
        }))
    }

    async fn report_device_status(
        &self,
        request: Request<pb::ReportDeviceStatusRequest>,
    ) -> Result<Response<pb::ReportDeviceStatusResponse>, Status> {
        let request = request.into_inner();
        let mut record = self.record.lock().expect("lock");
        for twin in request.reported_device.unwrap_or_default().twins {
            record
                .twins
                .push((request.device_name.clone(), twin, Instant::now()));
        }
        Ok(Response::new(pb::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        request: Request<pb::ReportDeviceStatesRequest>,
    ) -> Result<Response<pb::ReportDeviceStatesResponse>, Status> {
        let request = request.into_inner();
        self.record
            .lock()
            .expect("lock")
            .states
            .push((request.device_name, request.state));
        Ok(Response::new(pb::ReportDeviceStatesResponse {}))
    }
}

/// The double served on its own runtime, so stopping it drops every connection as a crashed
/// edgecore would.
struct DmiServer {
    record: Arc<Mutex<Record>>,
    runtime: Option<tokio::runtime::Runtime>,
    socket: PathBuf,
}

impl DmiServer {
    fn start(socket: &Path, devices: Vec<pb::Device>, models: Vec<pb::DeviceModel>) -> DmiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let record = Arc::new(Mutex::new(Record::default()));
        let service = RecordingDeviceManager {
            record: record.clone(),
            devices,
            models,
        };
        let _ = std::fs::remove_file(socket);
        let listener = runtime
            .block_on(async { tokio::net::UnixListener::bind(socket) })
            .expect("bind the DMI socket");
        runtime.spawn(async move {
            let incoming = futures::stream::unfold(listener, |listener| async move {
                Some((listener.accept().await.map(|(s, _)| s), listener))
            });
            let _ = tonic::transport::Server::builder()
                .add_service(DeviceManagerServiceServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        DmiServer {
            record,
            runtime: Some(runtime),
            socket: socket.to_path_buf(),
        }
    }

    /// Stops at once: every task and connection is dropped, the socket file removed.
    fn crash(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::ZERO);
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    fn registrations(&self) -> usize {
        self.record.lock().expect("lock").registrations.len()
    }

    /// The last twin of `property` the mapper reported.
    fn last_twin(&self, property: &str) -> Option<pb::Twin> {
        let record = self.record.lock().expect("lock");
        record
            .twins
            .iter()
            .rev()
            .find(|(_, t, _)| t.property_name == property)
            .map(|(_, t, _)| t.clone())
    }

    fn reported(&self, property: &str) -> Option<String> {
        self.last_twin(property)
            .and_then(|t| t.reported)
            .map(|r| r.value)
    }

    fn observed_desired(&self, property: &str) -> Option<String> {
        self.last_twin(property)
            .and_then(|t| t.observed_desired)
            .map(|r| r.value)
    }

    fn twin_count(&self) -> usize {
        self.record.lock().expect("lock").twins.len()
    }

    fn last_state(&self) -> Option<String> {
        let record = self.record.lock().expect("lock");
        record.states.last().map(|(_, s)| s.clone())
    }

    fn dump(&self) -> String {
        format!("{:#?}", self.record.lock().expect("lock"))
    }
}

impl Drop for DmiServer {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A running `modbus-mapper`.
struct Mapper {
    child: Option<Child>,
    log: PathBuf,
}

impl Mapper {
    fn start(dir: &Path, dmi_socket: &Path, socket: &Path) -> Mapper {
        let log = dir.join("mapper.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin("modbus-mapper"))
            .arg("--dmi-socket")
            .arg(dmi_socket)
            .arg("--socket")
            .arg(socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start modbus-mapper");
        Mapper {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; returns whether it exited cleanly.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        terminate(&mut child);
        child.try_wait().ok().flatten().is_some_and(|s| s.success())
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn customized(value: serde_json::Value) -> Option<pb::CustomizedValue> {
    dmi::convert::customized_value(value.as_object())
}

/// A thermostat: `temperature` (holding register 0, read-only) and `setpoint` (holding
/// register 1, read-write, desired `setpoint`), both read every second.
fn thermostat(port: u16, setpoint: &str) -> pb::Device {
    let property = |name: &str, offset: u16, desired: &str| pb::DeviceProperty {
        name: name.into(),
        desired: Some(pb::TwinProperty {
            value: desired.into(),
            metadata: [("type".to_string(), "int".to_string())].into(),
        }),
        visitors: Some(pb::VisitorConfig {
            protocol_name: "modbus".into(),
            config_data: customized(json!({
                "register": "HoldingRegister", "offset": offset, "limit": 1, "scale": 1,
                "isSwap": false, "isRegisterSwap": false
            })),
        }),
        report_cycle: 1_000_000_000,
        collect_cycle: 1_000_000_000,
        report_to_cloud: true,
        push_method: None,
    };
    pb::Device {
        name: "thermostat".into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceSpec {
            device_model_reference: "thermostat-model".into(),
            protocol: Some(pb::ProtocolConfig {
                protocol_name: "modbus".into(),
                config_data: customized(json!({"ip": "127.0.0.1", "port": port, "slaveID": 1})),
            }),
            properties: vec![
                property("temperature", 0, ""),
                property("setpoint", 1, setpoint),
            ],
            methods: vec![],
        }),
        status: None,
    }
}

fn thermostat_model() -> pb::DeviceModel {
    let property = |name: &str, access: &str| pb::ModelProperty {
        name: name.into(),
        r#type: "INT".into(),
        access_mode: access.into(),
        ..Default::default()
    };
    pb::DeviceModel {
        name: "thermostat-model".into(),
        namespace: "default".into(),
        spec: Some(pb::DeviceModelSpec {
            properties: vec![
                property("temperature", "ReadOnly"),
                property("setpoint", "ReadWrite"),
            ],
            commands: vec![],
        }),
    }
}

/// A client of the mapper's `DeviceMapperService`, as edgecore would dial it.
async fn mapper_client(socket: &Path) -> DeviceMapperServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://mapper.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to the mapper's socket");
    DeviceMapperServiceClient::new(channel)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

#[test]
fn the_mapper_reads_writes_and_reports_a_pymodbus_device_over_dmi() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_tcp_port();
    let mut sim = Simulator::start(port);
    sim.set_holding(0, 21);

    let dmi_socket = dir.path().join("dmi.sock");
    let mapper_socket = dir.path().join("modbus.sock");
    let dmi = DmiServer::start(
        &dmi_socket,
        vec![thermostat(port, "25")],
        vec![thermostat_model()],
    );
    let mut mapper = Mapper::start(dir.path(), &dmi_socket, &mapper_socket);

    // Registration: protocol modbus, its own socket as the address, asking for its devices.
    assert!(
        eventually(Duration::from_secs(10), || dmi.registrations() == 1),
        "no registration; mapper log:\n{}",
        mapper.log()
    );
    {
        let record = dmi.record.lock().expect("lock");
        let registration = &record.registrations[0];
        assert!(registration.with_data);
        let info = registration.mapper.as_ref().expect("mapper info");
        assert_eq!(info.protocol, "modbus");
        assert_eq!(info.api_version, "v1beta1");
        assert_eq!(info.address, mapper_socket.to_string_lossy().as_bytes());
    }

    // Reads: the register's value, typed and timestamped in milliseconds, and the state ok.
    assert!(
        eventually(Duration::from_secs(5), || dmi
            .reported("temperature")
            .as_deref()
            == Some("21")),
        "{}\nmapper log:\n{}",
        dmi.dump(),
        mapper.log()
    );
    let twin = dmi.last_twin("temperature").expect("twin");
    let reported = twin.reported.expect("reported");
    assert_eq!(
        reported.metadata.get("type").map(String::as_str),
        Some("int")
    );
    let timestamp: u128 = reported.metadata["timestamp"].parse().expect("ms");
    assert!(now_ms().abs_diff(timestamp) < 10_000, "{timestamp}");
    assert!(
        eventually(Duration::from_secs(2), || dmi.last_state().as_deref()
            == Some("ok")),
        "{}",
        dmi.dump()
    );

    // Every cycle: an unchanged value is read and reported again about every second.
    let fresh_timestamps = |dmi: &DmiServer| {
        let record = dmi.record.lock().expect("lock");
        let mut stamps: Vec<String> = record
            .twins
            .iter()
            .filter(|(_, t, _)| t.property_name == "temperature")
            .filter_map(|(_, t, _)| t.reported.as_ref()?.metadata.get("timestamp").cloned())
            .collect();
        stamps.dedup();
        stamps.len()
    };
    let before = fresh_timestamps(&dmi);
    std::thread::sleep(Duration::from_millis(2_500));
    let after = fresh_timestamps(&dmi);
    assert!(after >= before + 2, "{before} -> {after} readings in 2.5 s");

    // A change in the simulator is reported within 2 s.
    sim.set_holding(0, 37);
    let changed = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || dmi
            .reported("temperature")
            .as_deref()
            == Some("37")),
        "{}",
        dmi.dump()
    );
    eprintln!("change reported after {:?}", changed.elapsed());

    // The desired setpoint was written at registration and observedDesired follows it.
    assert!(
        eventually(Duration::from_secs(3), || sim.holding(1) == 25),
        "mapper log:\n{}",
        mapper.log()
    );
    assert!(
        eventually(Duration::from_secs(2), || dmi
            .observed_desired("setpoint")
            .as_deref()
            == Some("25")
            && dmi.reported("setpoint").as_deref() == Some("25")),
        "{}",
        dmi.dump()
    );

    // edgecore's other half: a new desired value through UpdateDevice reaches the device.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut client = runtime.block_on(mapper_client(&mapper_socket));
    runtime
        .block_on(client.update_device(pb::UpdateDeviceRequest {
            device: Some(thermostat(port, "30")),
        }))
        .expect("UpdateDevice");
    assert!(
        eventually(Duration::from_secs(2), || sim.holding(1) == 30),
        "mapper log:\n{}",
        mapper.log()
    );
    assert!(
        eventually(Duration::from_secs(2), || dmi
            .observed_desired("setpoint")
            .as_deref()
            == Some("30")),
        "{}",
        dmi.dump()
    );
    // A desired value the register cannot hold is refused without touching the device.
    runtime
        .block_on(client.update_device(pb::UpdateDeviceRequest {
            device: Some(thermostat(port, "70000")),
        }))
        .expect("UpdateDevice");
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(sim.holding(1), 30);
    assert!(mapper.log().contains("desired value cannot be written"));
    runtime
        .block_on(client.update_device(pb::UpdateDeviceRequest {
            device: Some(thermostat(port, "30")),
        }))
        .expect("UpdateDevice");

    // GetDevice answers with the last readings.
    let device = runtime
        .block_on(client.get_device(pb::GetDeviceRequest {
            device_name: "thermostat".into(),
            device_namespace: "default".into(),
        }))
        .expect("GetDevice")
        .into_inner()
        .device
        .expect("device");
    let twins = device.status.expect("status").twins;
    let temperature = twins
        .iter()
        .find(|t| t.property_name == "temperature")
        .expect("temperature twin");
    assert_eq!(
        temperature.reported.as_ref().map(|r| r.value.as_str()),
        Some("37")
    );

    // The device stops answering: offline within a few seconds; back: ok, desired re-written.
    sim.kill();
    assert!(
        eventually(Duration::from_secs(4), || dmi.last_state().as_deref()
            == Some("offline")),
        "{}\nmapper log:\n{}",
        dmi.dump(),
        mapper.log()
    );
    let mut sim = Simulator::start(port);
    assert_eq!(sim.holding(1), 0, "a restarted simulator starts empty");
    sim.set_holding(0, 40);
    assert!(
        eventually(Duration::from_secs(5), || dmi.last_state().as_deref()
            == Some("ok")),
        "{}\nmapper log:\n{}",
        dmi.dump(),
        mapper.log()
    );
    assert!(
        eventually(Duration::from_secs(3), || sim.holding(1) == 30),
        "the desired value is kept after the device comes back; mapper log:\n{}",
        mapper.log()
    );
    assert!(eventually(Duration::from_secs(3), || dmi
        .reported("temperature")
        .as_deref()
        == Some("40")));

    // RemoveDevice: the mapper forgets it and reports nothing more about it.
    runtime
        .block_on(client.remove_device(pb::RemoveDeviceRequest {
            device_name: "thermostat".into(),
            device_namespace: "default".into(),
        }))
        .expect("RemoveDevice");
    let missing = runtime
        .block_on(client.get_device(pb::GetDeviceRequest {
            device_name: "thermostat".into(),
            device_namespace: "default".into(),
        }))
        .expect_err("removed");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    std::thread::sleep(Duration::from_millis(300));
    let count = dmi.twin_count();
    std::thread::sleep(Duration::from_millis(2_000));
    assert_eq!(dmi.twin_count(), count, "reports after removal");

    assert!(
        mapper.stop(),
        "SIGTERM ends the mapper cleanly; log:\n{}",
        mapper.log()
    );
    assert!(!mapper_socket.exists(), "the mapper removes its socket");
    sim.kill();
}

#[test]
fn the_mapper_registers_again_when_edgecore_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_tcp_port();
    let mut sim = Simulator::start(port);
    sim.set_holding(0, 5);
    let dmi_socket = dir.path().join("dmi.sock");
    let mapper_socket = dir.path().join("modbus.sock");

    // The mapper starts before edgecore and keeps trying.
    let mut mapper = Mapper::start(dir.path(), &dmi_socket, &mapper_socket);
    std::thread::sleep(Duration::from_millis(1_000));
    let mut first = DmiServer::start(
        &dmi_socket,
        vec![thermostat(port, "")],
        vec![thermostat_model()],
    );
    assert!(
        eventually(Duration::from_secs(5), || first
            .reported("temperature")
            .as_deref()
            == Some("5")),
        "{}\nmapper log:\n{}",
        first.dump(),
        mapper.log()
    );
    assert_eq!(first.registrations(), 1);

    // edgecore crashes; while it is down the device keeps being read.
    first.crash();
    sim.set_holding(0, 6);
    std::thread::sleep(Duration::from_millis(1_500));
    let second = DmiServer::start(
        &dmi_socket,
        vec![thermostat(port, "")],
        vec![thermostat_model()],
    );
    assert!(
        eventually(Duration::from_secs(5), || second.registrations() == 1),
        "no registration after edgecore came back; mapper log:\n{}",
        mapper.log()
    );
    // After registering again the mapper tells the new edgecore the current value and state.
    assert!(
        eventually(Duration::from_secs(3), || second
            .reported("temperature")
            .as_deref()
            == Some("6")
            && second.last_state().as_deref() == Some("ok")),
        "{}\nmapper log:\n{}",
        second.dump(),
        mapper.log()
    );
    assert!(mapper.stop(), "log:\n{}", mapper.log());
    sim.kill();
}
