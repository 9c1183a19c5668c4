//! The cloud side of devices (docs/devices.md, "API" and "Relay"), in both control-plane modes,
//! with the real kubectl, real `edgecore run` edges and a raw tunnel peer for the reports:
//!
//! - KubeEdge's own Modbus example (`deploy/examples/kubeedge/`, the DeviceModel and Device of
//!   kubeedge/mappers-go, only `nodeName` edited to the test's node) applies unchanged and is
//!   served with its free-form fields; the bound edge holds the Device and its DeviceModel,
//!   another edge neither; rebinding moves both; deleting the Device removes both.
//! - `kubectl get devices` prints NODE, MODEL, STATE and LAST SEEN.
//! - A status report for the node's own Device lands in the Device's `status`; an older
//!   generation does not overwrite a newer one; a report for another node's Device, and a
//!   request for it, are refused (FORBIDDEN, counted) and change nothing.
//! - Embedded mode: cloudcore installs the definitions itself. Kube mode: cloudcore starts and is
//!   ready before the definitions exist, under exactly the shipped RBAC, and relays Devices once
//!   the operator applies `deploy/kubernetes/devices-crds.yaml`.
//!
//! Edges run with `--no-pod-runtime --dmi-socket DIR/dmi.sock --mqtt-broker none` (no mapper or
//! broker is needed for the relay).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::peer::Session;
use integration::{Cloud, Edge, EdgeObject, deploy_dir, edge_objects, eventually, join};
use proto::{ErrorCode, Message, ObjectRef};
use serde_json::{Value, json};

/// The example's names (deploy/examples/kubeedge/).
const EXAMPLE_DEVICE: &str = "modbus-instance-01";
const EXAMPLE_MODEL: &str = "modbus-01";

/// A device of our own for the raw peer's node, with its model.
const THERMO: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: thermo-model
  namespace: default
spec:
  protocol: modbus
  properties:
  - {name: temperature, type: INT, accessMode: ReadWrite}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: thermo
  namespace: default
spec:
  deviceModelRef: {name: thermo-model}
  nodeName: edge-3
  protocol:
    protocolName: modbus
    configData: {ip: 127.0.0.1, port: 5020, slaveID: 1}
  properties:
  - name: temperature
    desired: {value: "20"}
    reportToCloud: true
    visitors:
      protocolName: modbus
      configData: {register: HoldingRegister, offset: 0, limit: 1, scale: 1}
"#;

fn example(file: &str) -> String {
    let path = deploy_dir().join("examples/kubeedge").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `edgecore run` flags of every edge here.
fn edge_flags(dir: &Path) -> Vec<String> {
    vec![
        "--no-pod-runtime".into(),
        "--dmi-socket".into(),
        dir.join("dmi.sock").display().to_string(),
        "--mqtt-broker".into(),
        "none".into(),
    ]
}

fn start_edge(cloud: &Cloud, tmp: &Path, node: &str) -> Edge {
    let dir = tmp.join(node);
    let flags = edge_flags(&dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    integration::join_and_run(cloud, &dir, node, &flags)
}

fn holds(objects: &[EdgeObject], kind: &str, name: &str) -> bool {
    objects
        .iter()
        .any(|o| o.kind == kind && o.namespace == "default" && o.name == name)
}

fn device_json(cloud: &Cloud, name: &str) -> Value {
    let out = cloud.kubectl_ok(
        &["get", "device", name, "-n", "default", "-o", "json"],
        None,
    );
    serde_json::from_str(&out).expect("kubectl JSON")
}

/// Whether cloudcore's `/readyz` answers 200.
fn ready(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.1 200")
}

fn refused(cloud: &Cloud, reason: &str) -> f64 {
    cloud.metric(&format!(
        "cloudcore_sync_refused_total{{reason=\"{reason}\"}}"
    ))
}

fn device_ref(name: &str) -> ObjectRef {
    ObjectRef {
        kind: "Device".into(),
        namespace: "default".into(),
        name: name.into(),
        uid: String::new(),
    }
}

fn device_status(value: &str, state: &str) -> Vec<u8> {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let millis = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).to_string();
    serde_json::to_vec(&json!({
        "twins": [{
            "propertyName": "temperature",
            "reported": {"value": value, "metadata": {"timestamp": millis, "type": "int"}},
            "observedDesired": {"value": "20", "metadata": {"timestamp": millis}}
        }],
        "state": state,
        "lastOnlineTime": now,
    }))
    .expect("json")
}

/// What both modes prove once the definitions are served and cloudcore is up.
async fn devices_reach_their_node_and_report_status(cloud: &Cloud, tmp: &Path) {
    let edge1 = start_edge(cloud, tmp, "edge-1");
    let edge2 = start_edge(cloud, tmp, "edge-2");
    let context = || {
        format!(
            "cloudcore log (end):\n{}\nedge-1 log (end):\n{}",
            tail(&cloud.log(), 40),
            tail(&edge1.log(), 20)
        )
    };

    // KubeEdge's example, unchanged but for the node it is bound to.
    let model = example("modbus-model.yaml");
    let instance = example("modbus-instance.yaml");
    assert!(
        instance.contains("nodeName: edge-node"),
        "the example binds to edge-node"
    );
    let instance = instance.replace("nodeName: edge-node", "nodeName: edge-1");
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(&model));
    cloud.kubectl_ok(&["apply", "-n", "default", "-f", "-"], Some(&instance));
    let served = device_json(cloud, EXAMPLE_DEVICE);
    assert_eq!(served["spec"]["protocol"]["configData"]["baudRate"], 115200);
    assert_eq!(served["spec"]["protocol"]["configData"]["parity"], "even");
    assert_eq!(
        served["spec"]["properties"][0]["visitors"]["configData"]["register"],
        "CoilRegister"
    );
    assert_eq!(
        served["spec"]["properties"][0]["pushMethod"]["mqtt"]["topic"],
        "temperature"
    );
    assert_eq!(
        served["spec"]["properties"][0]["reportCycle"],
        10_000_000_000u64
    );
    assert!(
        served["status"]["twins"].is_null(),
        "status is written through its subresource only, not by apply: {}",
        served["status"]
    );

    assert!(
        eventually(Duration::from_secs(15), || {
            let held = edge_objects(&edge1.dir);
            holds(&held, "Device", EXAMPLE_DEVICE) && holds(&held, "DeviceModel", EXAMPLE_MODEL)
        }),
        "edge-1 does not hold the Device and its model: {:?}\n{}",
        edge_objects(&edge1.dir),
        context()
    );
    let held = edge_objects(&edge2.dir);
    assert!(
        !holds(&held, "Device", EXAMPLE_DEVICE) && !holds(&held, "DeviceModel", EXAMPLE_MODEL),
        "edge-2 holds another node's device: {held:?}"
    );

    // The raw peer's node and its own device.
    let token = cloud.token(&[]);
    let peer_dir = tmp.join("edge-3");
    let out = join(&peer_dir, &token, "edge-3");
    assert!(
        out.status.success(),
        "join edge-3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(THERMO));
    let mut peer = Session::open(&peer_dir, cloud, Duration::from_secs(15)).await;
    let thermo = peer
        .wait_for("the thermo Device", |m| {
            matches!(m, Message::Upsert(u) if u.object.kind == "Device" && u.object.name == "thermo")
        })
        .await;
    let Message::Upsert(thermo) = thermo else {
        unreachable!("matched above")
    };
    peer.wait_for("thermo's model", |m| {
        matches!(m, Message::Upsert(u) if u.object.kind == "DeviceModel" && u.object.name == "thermo-model")
    })
    .await;
    assert!(
        !peer
            .received
            .iter()
            .any(|(_, name, _)| name == EXAMPLE_DEVICE || name == EXAMPLE_MODEL),
        "edge-3 was sent edge-1's device: {:?}",
        peer.received
    );

    // Hostile: edge-3 asks for edge-1's device and reports for it.
    let forbidden_requests = refused(cloud, "request_forbidden");
    let forbidden_reports = refused(cloud, "status_forbidden");
    peer.send(Message::Request(device_ref(EXAMPLE_DEVICE)))
        .await;
    peer.wait_for(
        "FORBIDDEN for the request",
        |m| matches!(m, Message::Error(e) if e.code == ErrorCode::Forbidden),
    )
    .await;
    peer.send(Message::Status(proto::StatusReport {
        seq: 1,
        object: device_ref(EXAMPLE_DEVICE),
        generation: 100,
        status: device_status("666", "ok"),
    }))
    .await;
    peer.wait_for(
        "FORBIDDEN for the report",
        |m| matches!(m, Message::Error(e) if e.code == ErrorCode::Forbidden),
    )
    .await;
    assert_eq!(
        refused(cloud, "request_forbidden"),
        forbidden_requests + 1.0
    );
    assert_eq!(refused(cloud, "status_forbidden"), forbidden_reports + 1.0);

    // Its own device: written; an older generation after it is not.
    let mut own = device_ref("thermo");
    own.uid = thermo.object.uid.clone();
    peer.send(Message::Status(proto::StatusReport {
        seq: 2,
        object: own.clone(),
        generation: 5,
        status: device_status("21", "ok"),
    }))
    .await;
    peer.wait_for(
        "the ack of the report",
        |m| matches!(m, Message::Ack { seqs } if seqs.contains(&2)),
    )
    .await;
    let written = device_json(cloud, "thermo");
    let twins = &written["status"]["twins"];
    assert_eq!(twins[0]["propertyName"], "temperature", "{written}");
    assert_eq!(twins[0]["reported"]["value"], "21", "{written}");
    assert_eq!(twins[0]["observedDesired"]["value"], "20", "{written}");
    assert_eq!(written["status"]["state"], "ok");
    assert!(written["status"]["lastOnlineTime"].is_string());
    let stale = cloud.metric("cloudcore_status_stale_total");
    peer.send(Message::Status(proto::StatusReport {
        seq: 3,
        object: own,
        generation: 4,
        status: device_status("0", "offline"),
    }))
    .await;
    peer.wait_for(
        "the ack of the older report",
        |m| matches!(m, Message::Ack { seqs } if seqs.contains(&3)),
    )
    .await;
    assert_eq!(cloud.metric("cloudcore_status_stale_total"), stale + 1.0);
    let kept = device_json(cloud, "thermo");
    assert_eq!(kept["status"]["twins"][0]["reported"]["value"], "21");
    assert_eq!(kept["status"]["state"], "ok");
    let untouched = device_json(cloud, EXAMPLE_DEVICE);
    assert!(
        untouched["status"]["twins"].is_null(),
        "edge-3's report for edge-1's device was written: {}",
        untouched["status"]
    );

    // The operator's view.
    let table = cloud.kubectl_ok(&["get", "devices", "-n", "default"], None);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "NODE", "MODEL", "STATE", "LAST SEEN", "AGE"] {
        assert!(header.contains(column), "no {column} column:\n{table}");
    }
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let thermo_row = row("thermo");
    assert_eq!(
        thermo_row[1..4],
        ["edge-3", "thermo-model", "ok"],
        "{table}"
    );
    assert!(
        thermo_row[4].ends_with('s') || thermo_row[4].ends_with('m'),
        "LAST SEEN is an age: {table}"
    );
    assert_eq!(
        row(EXAMPLE_DEVICE)[1..3],
        ["edge-1", EXAMPLE_MODEL],
        "{table}"
    );
    let models = cloud.kubectl_ok(&["get", "devicemodels", "-n", "default"], None);
    assert!(
        models
            .lines()
            .next()
            .unwrap_or_default()
            .contains("PROTOCOL")
            && models
                .lines()
                .any(|l| l.starts_with("thermo-model ") && l.contains("modbus")),
        "{models}"
    );

    // Rebinding moves the device and its model; edge-1 lets go of both.
    cloud.kubectl_ok(
        &[
            "patch",
            "device",
            EXAMPLE_DEVICE,
            "-n",
            "default",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"nodeName":"edge-2"}}"#,
        ],
        None,
    );
    assert!(
        eventually(Duration::from_secs(15), || {
            let on1 = edge_objects(&edge1.dir);
            let on2 = edge_objects(&edge2.dir);
            holds(&on2, "Device", EXAMPLE_DEVICE)
                && holds(&on2, "DeviceModel", EXAMPLE_MODEL)
                && !holds(&on1, "Device", EXAMPLE_DEVICE)
                && !holds(&on1, "DeviceModel", EXAMPLE_MODEL)
        }),
        "rebinding did not move the device: edge-1 {:?}, edge-2 {:?}\n{}",
        edge_objects(&edge1.dir),
        edge_objects(&edge2.dir),
        context()
    );

    // Deleting the device removes it, and the model no Device of edge-2 uses any more.
    cloud.kubectl_ok(&["delete", "device", EXAMPLE_DEVICE, "-n", "default"], None);
    assert!(
        eventually(Duration::from_secs(15), || {
            let on2 = edge_objects(&edge2.dir);
            !holds(&on2, "Device", EXAMPLE_DEVICE) && !holds(&on2, "DeviceModel", EXAMPLE_MODEL)
        }),
        "the deleted device stayed on edge-2: {:?}\n{}",
        edge_objects(&edge2.dir),
        context()
    );
    // The model itself is still in the API.
    cloud.kubectl_ok(
        &["get", "devicemodel", EXAMPLE_MODEL, "-n", "default"],
        None,
    );
    assert!(
        !cloud.log().contains("cannot write a status"),
        "a status write failed:\n{}",
        context()
    );
}

/// Runs the async part (the raw peer) on a runtime of its own: the control-plane harness blocks
/// on runtimes itself and must not run inside one.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

#[test]
fn embedded_mode_serves_relays_and_writes_devices() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    // cloudcore installed the definitions from the shipped file, established.
    for name in [
        "devices.devices.kubeedge.io",
        "devicemodels.devices.kubeedge.io",
    ] {
        let out = cloud.kubectl_ok(
            &[
                "wait",
                "--for",
                "condition=established",
                "--timeout=10s",
                &format!("crd/{name}"),
            ],
            None,
        );
        assert!(out.contains("condition met"), "{out}");
    }
    let definition: Value = serde_json::from_str(&cloud.kubectl_ok(
        &["get", "crd", "devices.devices.kubeedge.io", "-o", "json"],
        None,
    ))
    .expect("json");
    assert!(
        definition["metadata"]["annotations"]["edge.io/definition-sha256"].is_string(),
        "{definition}"
    );
    block_on(devices_reach_their_node_and_report_status(
        &cloud,
        tmp.path(),
    ));

    // A restart finds the definitions current and leaves them alone (readiness comes after
    // the installation).
    let mut cloud = cloud;
    cloud.restart();
    assert!(
        eventually(Duration::from_secs(20), || ready(cloud.metrics_port)),
        "not ready after a restart:\n{}",
        tail(&cloud.log(), 40)
    );
    let log = cloud.log();
    assert!(
        !log.contains("device definition created") && !log.contains("device definition replaced"),
        "the restart rewrote current definitions:\n{log}"
    );
}

#[test]
fn kube_mode_relays_devices_once_the_definitions_are_applied() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(
        tmp.path(),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let cloud = Cloud::start_kube(
        tmp.path(),
        &cluster,
        &credentials,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // No definitions yet: cloudcore is ready all the same, and says why it relays no devices.
    assert!(
        eventually(Duration::from_secs(20), || ready(cloud.metrics_port)),
        "cloudcore is not ready without the device definitions:\n{}",
        tail(&cloud.log(), 40)
    );
    assert!(
        eventually(Duration::from_secs(10), || cloud
            .log()
            .contains("is its CustomResourceDefinition installed?")),
        "no warning about the missing definitions:\n{}",
        tail(&cloud.log(), 40)
    );
    let crds = deploy_dir().join("kubernetes/devices-crds.yaml");
    cluster.kubectl_ok(&["apply", "-f", crds.to_str().expect("UTF-8 path")], None);
    cluster.kubectl_ok(
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout=20s",
            "crd/devices.devices.kubeedge.io",
            "crd/devicemodels.devices.kubeedge.io",
        ],
        None,
    );
    block_on(devices_reach_their_node_and_report_status(
        &cloud,
        tmp.path(),
    ));
    // The API's refusals read "... is forbidden: User ..." (403).
    let forbidden: Vec<String> = cloud
        .log()
        .lines()
        .filter(|l| l.contains("is forbidden") || l.contains(" 403"))
        .map(str::to_string)
        .collect();
    assert!(
        forbidden.is_empty(),
        "the API refused cloudcore something the shipped RBAC does not grant:\n{}",
        forbidden.join("\n")
    );
}
