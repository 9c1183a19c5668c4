//! Device twins at the edge with the real binaries: a DeviceModel and a Device applied with
//! kubectl reach the node they are bound to (and no other), `edgecore ctl get devices` and
//! `edgecore ctl twin` show them from `edge.db` with the daemon stopped, and the twin follows
//! a new desired value after a restart. Run against the embedded control plane and against a
//! real kube-apiserver (the CRDs applied from `deploy/kubernetes/devices-crds.yaml`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, Edge, bin, eventually, join_and_run};
use serde_json::Value;

const MODEL: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: thermo-model
  namespace: default
spec:
  protocol: modbus
  properties:
  - name: temperature
    type: INT
    accessMode: ReadOnly
    unit: degC
  - name: setpoint
    type: INT
    accessMode: ReadWrite
    minimum: "0"
    maximum: "100"
"#;

const DEVICE: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: thermo
  namespace: default
spec:
  deviceModelRef:
    name: thermo-model
  nodeName: edge-1
  protocol:
    protocolName: modbus
    configData:
      ip: 127.0.0.1
      port: 5020
      slaveID: 1
  properties:
  - name: temperature
    reportToCloud: true
    collectCycle: 1000000000
    reportCycle: 1000000000
    visitors:
      protocolName: modbus
      configData: {register: HoldingRegister, offset: 0, limit: 1, scale: 1}
  - name: setpoint
    reportToCloud: true
    desired:
      value: "20"
    visitors:
      protocolName: modbus
      configData: {register: HoldingRegister, offset: 1, limit: 1, scale: 1}
"#;

/// Flags for a test edge: no runtime, DMI on a socket of its own, no MQTT.
fn edge_flags(dir: &Path) -> Vec<String> {
    vec![
        "--no-pod-runtime".into(),
        "--dmi-socket".into(),
        dir.join("dmi.sock").display().to_string(),
        "--mqtt-broker".into(),
        "none".into(),
    ]
}

fn start_edge(cloud: &Cloud, dir: &Path, node: &str) -> Edge {
    let flags = edge_flags(dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    join_and_run(cloud, dir, node, &flags)
}

/// `edgecore ctl ARGS --data-dir DIR`: stdout, panicking with stderr on failure.
fn ctl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("edgecore"))
        .arg("ctl")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run edgecore ctl");
    assert!(
        out.status.success(),
        "edgecore ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The devices an edge holds, from `ctl get devices -o json`: (namespace/name, model).
fn devices(dir: &Path) -> Vec<(String, String)> {
    let items: Vec<Value> =
        serde_json::from_str(&ctl(dir, &["get", "devices", "-o", "json"])).expect("json");
    items
        .iter()
        .map(|d| {
            (
                format!(
                    "{}/{}",
                    d["namespace"].as_str().unwrap_or_default(),
                    d["name"].as_str().unwrap_or_default()
                ),
                d["model"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn twin(dir: &Path) -> Value {
    serde_json::from_str(&ctl(
        dir,
        &["twin", "thermo", "-n", "default", "-o", "json"],
    ))
    .expect("json")
}

/// The scenario, the same in both control-plane modes.
fn scenario(cloud: &Cloud, dir: &Path) {
    let (dir1, dir2) = (dir.join("edge-1"), dir.join("edge-2"));
    let mut edge1 = start_edge(cloud, &dir1, "edge-1");
    let mut edge2 = start_edge(cloud, &dir2, "edge-2");
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(MODEL));
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(DEVICE));
    let wanted = vec![("default/thermo".to_string(), "thermo-model".to_string())];
    assert!(
        eventually(Duration::from_secs(10), || devices(&dir1) == wanted),
        "edge-1 does not hold the device: {:?}; log:\n{}",
        devices(&dir1),
        edge1.log()
    );
    // The twin rows are written by the running daemon after the store's commit; the
    // DeviceModel (the properties' types) travels on a watch of its own, which in kube mode
    // may start up to 5 s later when its first listing came before the definitions were
    // established.
    assert!(
        eventually(Duration::from_secs(30), || {
            let view = twin(&dir1);
            view["properties"][1]["desired"]["value"] == "20"
                && view["properties"][0]["type"] == "INT"
        }),
        "{}",
        twin(&dir1)
    );
    assert_eq!(devices(&dir2), Vec::<(String, String)>::new());
    let objects = ctl(&dir2, &["get", "all"]);
    assert!(!objects.contains("thermo"), "edge-2 holds:\n{objects}");

    // With the daemon stopped, ctl reads the twin from edge.db.
    edge1.stop();
    let view = twin(&dir1);
    assert_eq!(view["model"], "thermo-model");
    assert_eq!(view["protocol"], "modbus");
    assert_eq!(view["properties"][0]["name"], "temperature");
    assert_eq!(view["properties"][0]["type"], "INT");
    assert_eq!(view["properties"][0]["accessMode"], "ReadOnly");
    assert!(view["properties"][0].get("desired").is_none(), "{view}");
    assert_eq!(view["properties"][1]["accessMode"], "ReadWrite");
    assert_eq!(view["properties"][1]["desired"]["value"], "20");
    let table = ctl(&dir1, &["get", "devices"]);
    let row = table
        .lines()
        .find(|l| l.contains("thermo"))
        .unwrap_or_else(|| panic!("no device row:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["default", "thermo", "thermo-model", "modbus"]);
    let text = ctl(&dir1, &["twin", "thermo"]);
    assert!(text.contains("setpoint"), "{text}");

    // A desired value changed while the edge is down reaches its twin after the restart.
    cloud.kubectl_ok(
        &[
            "patch",
            "device",
            "thermo",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/properties/1/desired/value","value":"42"}]"#,
        ],
        None,
    );
    let flags = edge_flags(&dir1);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut edge1 = Edge::start_with(&dir1, &flags);
    assert!(
        eventually(Duration::from_secs(15), || {
            twin(&dir1)["properties"][1]["desired"]["value"] == "42"
        }),
        "the twin did not follow the desired value: {}; log:\n{}",
        twin(&dir1),
        edge1.log()
    );

    // Deleted in the API: gone from the edge, twin included.
    cloud.kubectl_ok(&["delete", "device", "thermo"], None);
    assert!(
        eventually(Duration::from_secs(10), || devices(&dir1).is_empty()),
        "edge-1 still holds {:?}",
        devices(&dir1)
    );
    edge1.stop();
    edge2.stop();
}

#[test]
fn device_twins_at_the_edge_embedded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(&tmp.path().join("cloud"), &[]);
    scenario(&cloud, tmp.path());
}

#[test]
fn device_twins_at_the_edge_kube() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(
        tmp.path(),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let crds =
        std::fs::read_to_string(integration::deploy_dir().join("kubernetes/devices-crds.yaml"))
            .expect("deploy/kubernetes/devices-crds.yaml (the device CRDs)");
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&crds));
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let cloud = Cloud::start_kube(
        &tmp.path().join("cloud"),
        &cluster,
        &credentials,
        std::net::Ipv4Addr::LOCALHOST.into(),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        eventually(Duration::from_secs(30), || {
            cloud
                .kubectl(&["get", "crd", "devices.devices.kubeedge.io"])
                .status
                .success()
        }),
        "the device CRDs are not established"
    );
    scenario(&cloud, tmp.path());
}
