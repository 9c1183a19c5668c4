//! Devices end to end, the issue's "Done when" as one sequence of named checks, run once against
//! the embedded control plane and once against a real Kubernetes control plane (kube mode).
//!
//! Everything is real: `cloudcore`, two `edgecore run --no-pod-runtime` gateways (edge-1 in a
//! network namespace of its own, so it can be partitioned; edge-2 beside it), mosquitto (inside
//! edge-1's namespace, where edge-1 reaches it on 127.0.0.1), a Modbus TCP device simulated by
//! pymodbus (`integration/scripts/modbus_sim.py`), our `modbus-mapper` registered with edge-1
//! over DMI, and kubectl. A failure names its mode and check.
//!
//! `DEVICES_PARTITION_SECS` sets the partition of the `partition` check (default 60 s; the
//! issue's 2 minutes run the same code path: the edge does not behave differently after the
//! first minute, and CI's budget is shared by every test).
//!
//! Needs root, iproute2, Debian's mosquitto and mosquitto-clients, PyPI's pymodbus and, for kube
//! mode, etcd-server, xz-utils, openssl and `../shared/k8s` (`.ci/run` installs them); without
//! them the tests fail saying what is missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::devices::{
    KubectlWatch, Mapper, ModbusSim, Mosquitto, ctl_devices, ctl_twin, status_twin, twin_property,
};
use integration::netns::EdgeNet;
use integration::{Cloud, Edge, deploy_dir, edge_objects, eventually};
use serde_json::Value;

const NS: &str = "default";
/// The Modbus device and its model: `temperature` (ReadOnly) in holding register 0, `setpoint`
/// (ReadWrite) in holding register 1.
const THERMO: &str = "thermo";
const THERMO_MODEL: &str = "thermo-model";
const TEMPERATURE: &str = "temperature";
const TEMPERATURE_REGISTER: u16 = 0;
const SETPOINT: &str = "setpoint";
const SETPOINT_REGISTER: u16 = 1;
/// A device of a protocol no mapper serves, written to over MQTT only.
const PANEL: &str = "panel";
const PANEL_MODEL: &str = "panel-model";
const MESSAGE: &str = "message";
/// A device bound to edge-2.
const OTHER: &str = "other";
const OTHER_MODEL: &str = "other-model";

/// The issue's promises.
const REPORT_LATENCY: Duration = Duration::from_secs(2);
const DESIRED_LATENCY: Duration = Duration::from_secs(2);
const AFTER_HEAL: Duration = Duration::from_secs(5);
/// How long the slower, unpromised steps may take before the check fails (the mapper noticing
/// a dead device, a restarted mapper registering again).
const SLOW_STEP: Duration = Duration::from_secs(20);

fn partition_length() -> Duration {
    let secs = std::env::var("DEVICES_PARTITION_SECS")
        .ok()
        .map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("DEVICES_PARTITION_SECS={v:?} is not a number"))
        })
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// The models and devices of the test, the Modbus one pointing at the simulator's port.
fn manifests(sim_port: u16) -> String {
    format!(
        r#"apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: {THERMO_MODEL}
  namespace: {NS}
spec:
  protocol: modbus
  properties:
  - name: {TEMPERATURE}
    description: temperature in tenths of a degree
    type: INT
    accessMode: ReadOnly
    minimum: "0"
    maximum: "65535"
    unit: "0.1 C"
  - name: {SETPOINT}
    type: INT
    accessMode: ReadWrite
    minimum: "0"
    maximum: "1000"
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: {THERMO}
  namespace: {NS}
spec:
  deviceModelRef:
    name: {THERMO_MODEL}
  nodeName: edge-1
  protocol:
    protocolName: modbus
    configData:
      ip: 127.0.0.1
      port: {sim_port}
      slaveID: 1
  properties:
  - name: {TEMPERATURE}
    collectCycle: 500000000
    reportCycle: 500000000
    reportToCloud: true
    visitors:
      protocolName: modbus
      configData:
        register: HoldingRegister
        offset: {TEMPERATURE_REGISTER}
        limit: 1
        scale: 1
        isSwap: false
        isRegisterSwap: false
  - name: {SETPOINT}
    collectCycle: 500000000
    reportCycle: 500000000
    reportToCloud: true
    visitors:
      protocolName: modbus
      configData:
        register: HoldingRegister
        offset: {SETPOINT_REGISTER}
        limit: 1
        scale: 1
        isSwap: false
        isRegisterSwap: false
---
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: {PANEL_MODEL}
  namespace: {NS}
spec:
  protocol: virtual
  properties:
  - name: {MESSAGE}
    type: STRING
    accessMode: ReadOnly
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: {PANEL}
  namespace: {NS}
spec:
  deviceModelRef:
    name: {PANEL_MODEL}
  nodeName: edge-1
  protocol:
    protocolName: virtual
  properties:
  - name: {MESSAGE}
    reportCycle: 500000000
    reportToCloud: true
---
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: {OTHER_MODEL}
  namespace: {NS}
spec:
  protocol: virtual
  properties:
  - name: {MESSAGE}
    type: STRING
    accessMode: ReadOnly
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: {OTHER}
  namespace: {NS}
spec:
  deviceModelRef:
    name: {OTHER_MODEL}
  nodeName: edge-2
  protocol:
    protocolName: virtual
  properties:
  - name: {MESSAGE}
    reportToCloud: true
"#
    )
}

/// KubeEdge's device topic of a device (`$hw/events/device/{ns}/{name}/...`).
fn topic(name: &str, suffix: &str) -> String {
    format!("$hw/events/device/{NS}/{name}/{suffix}")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The whole set-up of one mode. Fields drop in order: the mapper, the edges, the broker (in
/// edge-1's namespace), the simulator, cloudcore, the namespace, the control plane, then the
/// directory they all used.
struct Site {
    mode: &'static str,
    mapper: Mapper,
    edge1: Edge,
    edge2: Edge,
    mqtt: Mosquitto,
    sim: ModbusSim,
    cloud: Cloud,
    net: EdgeNet,
    cluster: Option<KubeCluster>,
    edge1_dir: PathBuf,
    edge2_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// Which control plane a [`Site`] runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Embedded,
    Kube,
}

impl Site {
    fn start(mode: Mode) -> Site {
        // Prerequisites first, so a missing one fails before anything starts.
        integration::devices::mosquitto_program();
        integration::devices::require_program("mosquitto_sub", "apt-get install mosquitto-clients");
        integration::devices::require_pymodbus();
        let tmp = tempfile::tempdir().expect("tempdir");
        let net = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
        let (cluster, cloud) = match mode {
            Mode::Embedded => (
                None,
                Cloud::start_at(tmp.path(), net.host_ip().into(), &[], "info"),
            ),
            Mode::Kube => {
                let cluster = KubeCluster::start(
                    tmp.path(),
                    &ClusterOptions {
                        components: Components::ApiServerOnly,
                        ..ClusterOptions::default()
                    },
                );
                apply_device_crds(&cluster);
                let credentials = cluster.cloudcore_credentials(|rbac| rbac);
                let cloud = Cloud::start_kube(
                    tmp.path(),
                    &cluster,
                    &credentials,
                    net.host_ip().into(),
                    &[],
                )
                .unwrap_or_else(|e| panic!("{e:#}"));
                (Some(cluster), cloud)
            }
        };
        let sim = ModbusSim::start(&tmp.path().join("sim"));
        let mqtt = Mosquitto::start_in(&net, &tmp.path().join("mqtt"));
        let edge1_dir = tmp.path().join("edge-1");
        let dmi_socket = edge1_dir.join("dmi.sock");
        let dmi_flag = dmi_socket.display().to_string();
        let broker = mqtt.url();
        let edge1 = integration::join_and_run_in(
            &net,
            &cloud,
            &edge1_dir,
            "edge-1",
            &[
                "--no-pod-runtime",
                "--dmi-socket",
                &dmi_flag,
                "--mqtt-broker",
                &broker,
            ],
        );
        let edge2_dir = tmp.path().join("edge-2");
        let edge2 = integration::join_and_run(&cloud, &edge2_dir, "edge-2", &["--no-pod-runtime"]);
        let mapper = Mapper::start(&tmp.path().join("mapper"), &dmi_socket);
        Site {
            mode: match mode {
                Mode::Embedded => "embedded",
                Mode::Kube => "kube",
            },
            mapper,
            edge1,
            edge2,
            mqtt,
            sim,
            cloud,
            net,
            cluster,
            edge1_dir,
            edge2_dir,
            _tmp: tmp,
        }
    }

    /// What a failed check shows besides its own message.
    fn context(&self) -> String {
        let text = |args: &[&str]| {
            let out = self.cloud.kubectl(args);
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        format!(
            "devices in the API:\n{}\ncloudcore log (end):\n{}\nedge-1 log (end):\n{}\nmapper log (end):\n{}\nsimulator log (end):\n{}\nmosquitto log (end):\n{}{}",
            text(&["get", "devices", "-A", "-o", "wide"]),
            tail(&self.cloud.log(), 40),
            tail(&self.edge1.log(), 40),
            tail(&self.mapper.log(), 30),
            tail(&self.sim.log(), 10),
            tail(&self.mqtt.log(), 15),
            self.cluster
                .as_ref()
                .map(|c| format!(
                    "\nkube-apiserver log (end):\n{}",
                    c.log_tail("kube-apiserver", 15)
                ))
                .unwrap_or_default()
        )
    }

    /// Runs one named check; a failure says the mode, the check and the context.
    fn check(&mut self, name: &str, f: impl FnOnce(&mut Site)) {
        let mode = self.mode;
        eprintln!("[{mode}] check {name}: start");
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "[{mode}] check {name:?} failed: {message}\n{}",
                self.context()
            );
        }
        eprintln!("[{mode}] check {name}: passed in {:?}", started.elapsed());
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.cloud.kubectl_ok(args, stdin)
    }

    /// A Device as the API holds it (`kubectl get device -o json`), `None` when absent.
    fn device(&self, name: &str) -> Option<Value> {
        let out = self
            .cloud
            .kubectl(&["get", "device", name, "-n", NS, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Polls the Device every 100 ms until `check` holds; panics with `what` and its last
    /// status after `within`. Returns the device and when it was first seen so.
    fn wait_device(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> (Value, SystemTime) {
        let started = Instant::now();
        let mut last = Value::Null;
        loop {
            if let Some(device) = self.device(name) {
                if check(&device) {
                    return (device, SystemTime::now());
                }
                last = device;
            }
            assert!(
                started.elapsed() < within,
                "device {name}: {what} not seen within {within:?}; last status: {}",
                last["status"]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The edge-1 twin's property, polled until `check` holds or `within` passes.
    fn wait_twin(
        &self,
        name: &str,
        property: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) {
        let mut last = Value::Null;
        let held = eventually(within, || {
            last = ctl_twin(&self.edge1_dir, NS, name).unwrap_or(Value::Null);
            check(twin_property(&last, property))
        });
        assert!(
            held,
            "edge-1's twin of {name}: {what} not seen within {within:?}; `edgecore ctl twin`: {last}"
        );
    }
}

/// Applies `deploy/kubernetes/devices-crds.yaml` to a real cluster and waits until both
/// definitions are established.
fn apply_device_crds(cluster: &KubeCluster) {
    let path = deploy_dir().join("kubernetes/devices-crds.yaml");
    let crds = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()));
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&crds));
    cluster.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/devices.devices.kubeedge.io",
            "crd/devicemodels.devices.kubeedge.io",
        ],
        None,
    );
}

fn reported(device: &Value, property: &str) -> String {
    status_twin(device, property)["reported"]["value"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn elapsed_since(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}

/// Whether every field of `part` is in `whole` with the same value (objects recursively,
/// arrays element by element): what the API kept of a manifest, whatever it added.
fn contains(whole: &Value, part: &Value) -> bool {
    match (whole, part) {
        (Value::Object(w), Value::Object(p)) => p
            .iter()
            .all(|(k, v)| w.get(k).is_some_and(|wv| contains(wv, v))),
        (Value::Array(w), Value::Array(p)) => {
            w.len() == p.len() && w.iter().zip(p).all(|(wv, pv)| contains(wv, pv))
        }
        // YAML numbers and JSON numbers of the same value compare equal.
        (Value::Number(w), Value::Number(p)) => w.as_f64() == p.as_f64(),
        _ => whole == part,
    }
}

fn run_all_checks(mode: Mode) {
    let mut site = Site::start(mode);
    site.kubectl(&["apply", "-f", "-"], Some(&manifests(site.sim.port)));

    site.check(
        "relay: edge-1 holds its devices and their models, edge-2 only its own",
        |site| {
            let names = |dir: &Path| -> Vec<String> {
                ctl_devices(dir)
                    .into_iter()
                    .map(|row| row.get("NAME").cloned().unwrap_or_default())
                    .collect()
            };
            let mut last = (Vec::new(), Vec::new());
            let relayed = eventually(Duration::from_secs(15), || {
                last = (names(&site.edge1_dir), names(&site.edge2_dir));
                last.0.contains(&THERMO.to_string())
                    && last.0.contains(&PANEL.to_string())
                    && last.1.contains(&OTHER.to_string())
            });
            assert!(
                relayed,
                "`edgecore ctl get devices`: edge-1 {:?}, edge-2 {:?}",
                last.0, last.1
            );
            let rows = ctl_devices(&site.edge1_dir);
            let thermo = rows
                .iter()
                .find(|r| r.get("NAME").map(String::as_str) == Some(THERMO))
                .expect("thermo row");
            assert_eq!(thermo.get("NAMESPACE").map(String::as_str), Some(NS));
            assert_eq!(thermo.get("MODEL").map(String::as_str), Some(THERMO_MODEL));
            assert_eq!(thermo.get("PROTOCOL").map(String::as_str), Some("modbus"));
            let kinds = |dir: &Path| -> Vec<(String, String)> {
                edge_objects(dir)
                    .into_iter()
                    .filter(|o| o.kind == "Device" || o.kind == "DeviceModel")
                    .map(|o| (o.kind, o.name))
                    .collect()
            };
            let pair = |kind: &str, name: &str| (kind.to_string(), name.to_string());
            let mut expected1 = vec![
                pair("Device", PANEL),
                pair("Device", THERMO),
                pair("DeviceModel", PANEL_MODEL),
                pair("DeviceModel", THERMO_MODEL),
            ];
            expected1.sort();
            // Devices and models come from two watches, so a model may land a moment after
            // the device that names it.
            let mut edge1 = Vec::new();
            eventually(Duration::from_secs(10), || {
                edge1 = kinds(&site.edge1_dir);
                edge1.sort();
                edge1 == expected1
            });
            assert_eq!(
                edge1, expected1,
                "edge-1 holds exactly its devices and their models"
            );
            let mut edge2 = kinds(&site.edge2_dir);
            edge2.sort();
            assert_eq!(
                edge2,
                vec![pair("Device", OTHER), pair("DeviceModel", OTHER_MODEL)],
                "edge-2 holds exactly its device and its model"
            );
        },
    );

    site.check(
        "report: a register change reaches `kubectl get device -o yaml` within 2 s",
        |site| {
            let changed = site.sim.write_holding(SETPOINT_REGISTER, 42);
            let started = Instant::now();
            let seen = loop {
                let out = site
                    .cloud
                    .kubectl(&["get", "device", THERMO, "-n", NS, "-o", "yaml"]);
                let device: Value = serde_yaml_ng::from_slice(&out.stdout).unwrap_or(Value::Null);
                if reported(&device, SETPOINT) == "42" {
                    break SystemTime::now();
                }
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "the reported setpoint never became 42; last status: {}",
                    device["status"]
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let latency = elapsed_since(changed, seen);
            assert!(
                latency <= REPORT_LATENCY,
                "the reported value took {latency:?} to reach the API (at most {REPORT_LATENCY:?})"
            );
            eprintln!("[{}] register change to the API: {latency:?}", site.mode);
            let (device, _) = site.wait_device(THERMO, SLOW_STEP, "state ok/online", |d| {
                matches!(d["status"]["state"].as_str(), Some("ok" | "online"))
            });
            assert!(
                !device["status"]["lastOnlineTime"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
                "an online device has a lastOnlineTime: {}",
                device["status"]
            );
            // The operator's view: the printer columns.
            let table = site.kubectl(&["get", "device", THERMO, "-n", NS], None);
            let header = table.lines().next().unwrap_or_default();
            for column in ["NODE", "MODEL", "STATE", "LAST SEEN"] {
                assert!(header.contains(column), "no {column} column: {table}");
            }
            assert!(
                table.contains("edge-1") && table.contains(THERMO_MODEL),
                "the node and model are not shown: {table}"
            );
        },
    );

    site.check("desired: kubectl patch reaches the register within 2 s, the delta topic and observedDesired", |site| {
        let delta = site
            .mqtt
            .subscribe(&topic(THERMO, "twin/update/delta"));
        let watch = site.sim.watch_holding(
            SETPOINT_REGISTER,
            7,
            SystemTime::now() + Duration::from_secs(15),
        );
        let patched = SystemTime::now();
        site.kubectl(
            &[
                "patch",
                "device",
                THERMO,
                "-n",
                NS,
                "--type",
                "json",
                "-p",
                r#"[{"op":"add","path":"/spec/properties/1/desired","value":{"value":"7"}}]"#,
            ],
            None,
        );
        let written = watch.wait().unwrap_or_else(|e| panic!("{e}"));
        let latency = elapsed_since(patched, written);
        assert!(
            latency <= DESIRED_LATENCY,
            "the desired value took {latency:?} to reach the device (at most {DESIRED_LATENCY:?})"
        );
        eprintln!("[{}] kubectl patch to the register: {latency:?}", site.mode);
        site.wait_twin(THERMO, SETPOINT, Duration::from_secs(5), "observedDesired 7", |p| {
            p["observedDesired"]["value"] == "7" && p["desired"]["value"] == "7"
        });
        site.wait_device(THERMO, Duration::from_secs(5), "observedDesired 7 in the API", |d| {
            status_twin(d, SETPOINT)["observedDesired"]["value"] == "7"
        });
        let message = delta
            .wait_for(Duration::from_secs(5), |m| {
                m.json()["delta"][SETPOINT] == "7"
            })
            .unwrap_or_else(|seen| {
                panic!(
                    "no message on {} with delta.{SETPOINT} = \"7\"; received: {seen:?}",
                    delta.topic()
                )
            });
        let payload = message.json();
        assert!(
            payload["event_id"].is_string() && payload["timestamp"].is_i64(),
            "KubeEdge's delta carries event_id and timestamp: {payload}"
        );
    });

    site.check("mqtt: a publish to twin/update updates the reported twin in the API", |site| {
        let payload = serde_json::json!({
            "event_id": "e2e-1",
            "timestamp": SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default(),
            "twin": {MESSAGE: {"actual": {"value": "hello from mqtt"}, "metadata": {"type": "string"}}}
        });
        site.mqtt
            .publish(&topic(PANEL, "twin/update"), &payload.to_string());
        site.wait_twin(PANEL, MESSAGE, Duration::from_secs(5), "the published value", |p| {
            p["reported"]["value"] == "hello from mqtt"
        });
        site.wait_device(PANEL, Duration::from_secs(5), "the published value in the API", |d| {
            reported(d, MESSAGE) == "hello from mqtt"
        });
    });

    site.check("partition: the edge twin follows offline, the API gets the latest after the heal, in order", |site| {
        let base = 1000;
        site.sim.write_holding(TEMPERATURE_REGISTER, base);
        site.wait_device(THERMO, Duration::from_secs(10), "temperature 1000", |d| {
            reported(d, TEMPERATURE) == base.to_string()
        });
        let watch = KubectlWatch::start(
            &site.cloud.kubeconfig(),
            &site.cloud.dir.join("kubectl-watch-cache"),
            &["get", "device", THERMO, "-n", NS],
        );
        assert!(
            eventually(Duration::from_secs(10), || !watch.events().is_empty()),
            "kubectl get -w printed nothing"
        );
        site.net.cut().unwrap_or_else(|e| panic!("{e:#}"));
        let partition = partition_length();
        let steps: u16 = 6;
        let started = Instant::now();
        let mut last = base;
        for step in 1..=steps {
            last = base + step;
            site.sim.write_holding(TEMPERATURE_REGISTER, last);
            site.wait_twin(THERMO, TEMPERATURE, Duration::from_secs(5), &format!("reported {last} while partitioned"), |p| {
                p["reported"]["value"] == last.to_string().as_str()
            });
            let next = partition.mul_f64(f64::from(step) / f64::from(steps));
            if let Some(wait) = next.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let before_heal = site.device(THERMO).unwrap_or(Value::Null);
        assert_ne!(
            reported(&before_heal, TEMPERATURE),
            last.to_string(),
            "the API had the latest value before the heal: the partition did not hold"
        );
        site.net.heal().unwrap_or_else(|e| panic!("{e:#}"));
        let healed = SystemTime::now();
        let (_, seen) = site.wait_device(THERMO, Duration::from_secs(30), "the latest temperature after the heal", |d| {
            reported(d, TEMPERATURE) == last.to_string()
        });
        let latency = elapsed_since(healed, seen);
        assert!(
            latency <= AFTER_HEAL,
            "the latest value reached the API {latency:?} after the heal (at most {AFTER_HEAL:?})"
        );
        eprintln!("[{}] heal to the latest value in the API: {latency:?}", site.mode);
        std::thread::sleep(Duration::from_secs(1));
        let sequence: Vec<(u16, u64)> = watch
            .events()
            .iter()
            .filter_map(|(_, device)| {
                let twin = status_twin(device, TEMPERATURE);
                let value = twin["reported"]["value"].as_str()?.parse().ok()?;
                let timestamp = twin["reported"]["metadata"]["timestamp"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_default();
                Some((value, timestamp))
            })
            .collect();
        assert!(
            sequence.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
            "the API went back to an older value (value, timestamp ms) in {sequence:?}"
        );
        assert_eq!(
            sequence.last().map(|s| s.0),
            Some(last),
            "the watch did not end on the latest value: {sequence:?}"
        );
        eprintln!("[{}] values the API showed across the partition: {sequence:?}", site.mode);
    });

    site.check(
        "device state: offline when the simulator stops, online when it is back",
        |site| {
            site.sim.stop();
            site.wait_device(THERMO, SLOW_STEP, "state offline", |d| {
                d["status"]["state"] == "offline"
            });
            site.sim.start_again();
            site.wait_device(THERMO, SLOW_STEP, "state ok/online again", |d| {
                matches!(d["status"]["state"].as_str(), Some("ok" | "online"))
            });
        },
    );

    site.check(
        "mapper restart: killed with -9 and started again, it registers and values flow",
        |site| {
            site.mapper.kill();
            site.sim.write_holding(TEMPERATURE_REGISTER, 2000);
            site.mapper.restart();
            site.wait_device(
                THERMO,
                SLOW_STEP,
                "temperature 2000 read by the restarted mapper",
                |d| reported(d, TEMPERATURE) == "2000",
            );
            let held = eventually(Duration::from_secs(5), || {
                site.mapper
                    .get_device(NS, THERMO)
                    .is_some_and(|d| d.name == THERMO)
            });
            assert!(
                held,
                "the restarted mapper does not answer GetDevice for {THERMO}"
            );
        },
    );

    site.check(
        "delete: a Device deleted in the API leaves the mapper and the edge",
        |site| {
            site.kubectl(&["delete", "device", THERMO, "-n", NS], None);
            let gone = eventually(Duration::from_secs(10), || {
                site.mapper.get_device(NS, THERMO).is_none()
            });
            assert!(
                gone,
                "the mapper still has {THERMO} (GetDevice) 10 s after the delete"
            );
            let left_edge = eventually(Duration::from_secs(10), || {
                !edge_objects(&site.edge1_dir)
                    .iter()
                    .any(|o| o.name == THERMO || o.name == THERMO_MODEL)
            });
            assert!(
                left_edge,
                "edge-1 still holds {THERMO} or its model: {:?}",
                edge_objects(&site.edge1_dir)
            );
            assert!(
                !ctl_devices(&site.edge1_dir)
                    .iter()
                    .any(|r| r.get("NAME").map(String::as_str) == Some(THERMO)),
                "`edgecore ctl get devices` still lists {THERMO}"
            );
            assert!(
                edge_objects(&site.edge1_dir)
                    .iter()
                    .any(|o| o.name == PANEL),
                "edge-1 lost a device that was not deleted"
            );
        },
    );

    site.check("kubeedge example: KubeEdge's own v1beta1 manifests apply unchanged", |site| {
        let examples = kubeedge_examples();
        assert!(
            !examples.is_empty(),
            "deploy/examples/kubeedge holds no devices.kubeedge.io/v1beta1 manifest"
        );
        for (path, text) in examples {
            site.kubectl(&["apply", "-f", "-"], Some(&text));
            for document in serde_yaml_ng::Deserializer::from_str(&text) {
                let manifest: Value = serde::Deserialize::deserialize(document)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if manifest.is_null() {
                    continue;
                }
                let kind = manifest["kind"].as_str().unwrap_or_default();
                let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
                let namespace = manifest["metadata"]["namespace"].as_str().unwrap_or(NS);
                let stored: Value = serde_json::from_str(&site.kubectl(
                    &["get", kind, name, "-n", namespace, "-o", "json"],
                    None,
                ))
                .expect("kubectl JSON");
                assert!(
                    contains(&stored["spec"], &manifest["spec"]),
                    "{}: the API did not keep {kind} {name} as written:\nmanifest spec: {}\nstored spec: {}",
                    path.display(),
                    manifest["spec"],
                    stored["spec"]
                );
            }
        }
    });

    // Edge-2 stayed up and connected throughout (its devices were never touched).
    assert!(
        site.edge2.is_running(),
        "edge-2 exited: {}",
        site.edge2.log()
    );
}

/// The YAML files in `deploy/examples/kubeedge/` (KubeEdge's own examples, each naming its
/// source) holding `devices.kubeedge.io/v1beta1` objects.
fn kubeedge_examples() -> Vec<(PathBuf, String)> {
    let dir = deploy_dir().join("examples/kubeedge");
    let mut found: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            text.contains("devices.kubeedge.io/v1beta1")
                .then_some((p, text))
        })
        .collect();
    found.sort();
    found
}

#[test]
fn devices_end_to_end_with_the_embedded_control_plane() {
    run_all_checks(Mode::Embedded);
}

#[test]
fn devices_end_to_end_in_kube_mode() {
    run_all_checks(Mode::Kube);
}

#[test]
fn manifests_are_contained_in_what_the_api_returns() {
    let stored = serde_json::json!({"a": 1.0, "b": {"c": [1, {"d": "x", "e": true}]}, "extra": 2});
    assert!(contains(
        &stored,
        &serde_json::json!({"a": 1, "b": {"c": [1, {"d": "x"}]}})
    ));
    assert!(!contains(&stored, &serde_json::json!({"b": {"c": [1]}})));
    assert!(!contains(&stored, &serde_json::json!({"a": 2})));
    assert!(!contains(&stored, &serde_json::json!({"missing": null})));
}
