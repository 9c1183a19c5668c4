//! Offline autonomy: partitions, restarts and reboots with the cloud unreachable.
//!
//! Everything is real: edgecore runs in its own network namespace created by the test, behind
//! a veth pair whose host end is where cloudcore (embedded control plane) listens; a partition
//! downs the link ([`EdgeNet::cut`]) or drops its packets ([`EdgeNet::drop_packets`]). Pods
//! run in a containerd started by the test. Needs root, iproute2, iptables and Debian's
//! containerd, runc, containernetworking-plugins and busybox-static (`.ci/run` installs them);
//! without them the tests fail saying what is missing.
//!
//! `OFFLINE_PARTITION_SECS` sets the long partition of the first test (default 120 s); the
//! soak in docs/offline.md runs it for hours.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::netns::EdgeNet;
use integration::{Cloud, Containerd, Edge, bin, container_status, eventually};
use serde_json::Value;

/// How long node heartbeats may be missing before the node is Ready=Unknown (and, in
/// embedded mode, tainted unreachable): short, so the partitions here outlast it many times.
const NODE_GRACE: &str = "5s";
/// What the API must show within this long after a heal.
const AFTER_HEAL: Duration = Duration::from_secs(5);

fn partition_length() -> Duration {
    let secs = std::env::var("OFFLINE_PARTITION_SECS")
        .ok()
        .map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("OFFLINE_PARTITION_SECS={v:?} is not a number"))
        })
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// Fields drop in order: edgecore, containerd (removing its pods), cloudcore, the network
/// namespace, then the directory they all used.
struct Site {
    edge: Edge,
    containerd: Containerd,
    cloud: Cloud,
    net: EdgeNet,
    edge_dir: PathBuf,
    node: String,
    _tmp: tempfile::TempDir,
}

impl Site {
    fn start(node: &str, cloud_extra: &[&str]) -> Site {
        Site::start_with(node, cloud_extra, None)
    }

    /// `edge_dir`: where the edge keeps its data (default: in the test's temp dir).
    fn start_with(node: &str, cloud_extra: &[&str], edge_dir: Option<PathBuf>) -> Site {
        let tmp = tempfile::tempdir().expect("tempdir");
        let net = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
        let containerd = Containerd::start(&tmp.path().join("containerd"));
        let mut extra = vec!["--node-grace-period", NODE_GRACE];
        extra.extend_from_slice(cloud_extra);
        let cloud = Cloud::start_at(tmp.path(), net.host_ip().into(), &extra, "info");
        let edge_dir = edge_dir.unwrap_or_else(|| tmp.path().join("edge"));
        let edge = integration::join_and_run_in(
            &net,
            &cloud,
            &edge_dir,
            node,
            &["--cri-endpoint", &containerd.endpoint],
        );
        Site {
            edge,
            containerd,
            cloud,
            net,
            edge_dir,
            node: node.to_string(),
            _tmp: tmp,
        }
    }

    fn start_edge(&mut self) -> Instant {
        let started = Instant::now();
        self.edge = Edge::start_in(
            &self.net,
            &self.edge_dir,
            &["--cri-endpoint", &self.containerd.endpoint],
        );
        started
    }

    /// The body of a namespace `default` object in the edge's store, as JSON text.
    fn stored(&self, kind: &str, name: &str) -> String {
        edgecore::store::Store::open_read_only(&self.edge_dir)
            .ok()
            .and_then(|store| {
                store
                    .get(&proto::sync::ObjectKey::new(kind, "default", name))
                    .ok()
                    .flatten()
            })
            .map(|o| String::from_utf8_lossy(&o.body).into_owned())
            .unwrap_or_default()
    }

    /// The Node object as the API holds it.
    fn node(&self) -> Value {
        serde_json::from_str(&self.kubectl(&["get", "node", &self.node, "-o", "json"], None))
            .expect("node JSON")
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.cloud.kubectl_ok(args, stdin)
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    fn pod(&self, name: &str) -> Option<Value> {
        self.cloud.pod(name)
    }

    fn wait_pod(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        self.cloud.wait_pod(name, within, what, check, || {
            format!("edge log (end):\n{}", tail(&self.edge.log(), 60))
        })
    }

    fn wait_gone(&self, name: &str, within: Duration) {
        assert!(
            eventually(within, || self.pod(name).is_none()),
            "pod {name} still in the API after {within:?}; edge log (end):\n{}",
            tail(&self.edge.log(), 40)
        );
    }

    /// `edgecore ctl ARGS --data-dir DIR`: (success, stdout, stderr).
    fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin("edgecore"))
            .arg("ctl")
            .args(args)
            .arg("--data-dir")
            .arg(&self.edge_dir)
            .output()
            .expect("run edgecore ctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Containers the runtime holds, by pod name: (container name, id, running), and the
    /// number of sandboxes per pod uid.
    fn runtime(&self) -> Runtime {
        let endpoint = self.containerd.endpoint.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let cri = edgecore::cri::Cri::new(&endpoint).expect("cri");
                let mut runtime = Runtime::default();
                for sandbox in cri
                    .list_pod_sandboxes(Default::default())
                    .await
                    .expect("list sandboxes")
                {
                    let ready = sandbox.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32;
                    if ready {
                        let uid = sandbox
                            .labels
                            .get(edgecore::pods::spec::LABEL_POD_UID)
                            .cloned()
                            .unwrap_or_default();
                        *runtime.ready_sandboxes.entry(uid).or_default() += 1;
                    }
                }
                for c in cri
                    .list_containers(Default::default())
                    .await
                    .expect("list containers")
                {
                    let pod = c
                        .labels
                        .get(edgecore::pods::spec::LABEL_POD_NAME)
                        .cloned()
                        .unwrap_or_default();
                    let name = c
                        .metadata
                        .as_ref()
                        .map(|m| m.name.clone())
                        .unwrap_or_default();
                    let running = c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32;
                    runtime
                        .containers
                        .entry(pod)
                        .or_default()
                        .push((name, c.id, running));
                }
                runtime
            })
    }
}

#[derive(Debug, Default)]
struct Runtime {
    /// pod name → (container name, id, running)
    containers: BTreeMap<String, Vec<(String, String, bool)>>,
    /// pod uid → ready sandboxes
    ready_sandboxes: HashMap<String, usize>,
}

impl Runtime {
    /// The running container's id of each pod (the one container named `c`).
    fn running(&self, pod: &str) -> Option<String> {
        self.containers
            .get(pod)?
            .iter()
            .find(|(name, _, running)| name == "c" && *running)
            .map(|(_, id, _)| id.clone())
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn restarts(pod: &Value) -> u64 {
    container_status(pod, "c")["restartCount"]
        .as_u64()
        .unwrap_or(0)
}

fn container_id(pod: &Value) -> String {
    container_status(pod, "c")["containerID"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("containerd://")
        .to_string()
}

fn running(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && container_status(pod, "c")["state"]["running"].is_object()
}

fn uid(pod: &Value) -> String {
    pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A pod bound to `node` whose one container `c` runs `script` (busybox sh).
fn pod_yaml(name: &str, node: &str, script: &str, extra_annotations: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations:
    test: offline{extra_annotations}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: {image}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", {script:?}]
    volumeMounts:
    - name: settings
      mountPath: /etc/settings
  volumes:
  - name: settings
    configMap:
      name: settings
      optional: true
"#,
        image = integration::BUSYBOX
    )
}

/// Debian's libfaketime (package faketime).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Sleeps until SIGTERM (a shell as PID 1 ignores SIGTERM without a trap).
const SLEEPER: &str = "trap 'exit 0' TERM; sleep 2147483647 & wait";
/// Runs three seconds, then fails.
const CRASHER: &str = "sleep 3; exit 1";

fn settings(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: {value:?}\n"
    )
}

/// The `edgecore ctl get pods -o json` entries, by name.
fn local_pods(site: &Site) -> HashMap<String, Value> {
    let (ok, out, err) = site.ctl(&["get", "pods", "-o", "json"]);
    assert!(ok, "ctl get pods: {err}");
    let parsed: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    parsed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == "Pod")
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p.clone(),
            )
        })
        .collect()
}

/// A long partition (link down): pods keep running with the same containers, a crashing one
/// is restarted locally, `ctl restart` and `ctl get` work; the node is not evicted (only the
/// pod that opted out is); API changes made meanwhile arrive within 5 s of the heal, and the
/// status produced offline reaches the API with its restart counts, restarting nothing else.
#[test]
fn partition_keeps_pods_running_and_the_heal_catches_up() {
    let length = partition_length();
    let site = Site::start("offline-a", &[]);
    let node = site.node.clone();
    site.apply(&settings("before"));
    for (name, script, annotations) in [
        ("steady", SLEEPER, ""),
        ("crasher", CRASHER, ""),
        ("restartme", SLEEPER, ""),
        ("doomed", SLEEPER, ""),
        ("optout", SLEEPER, "\n    edge.io/autonomy-duration: 10s"),
    ] {
        site.apply(&pod_yaml(name, &node, script, annotations));
    }
    let mut before = HashMap::new();
    for name in ["steady", "restartme", "doomed", "optout"] {
        before.insert(
            name,
            site.wait_pod(name, Duration::from_secs(30), "running", running),
        );
    }
    site.wait_pod("crasher", Duration::from_secs(30), "running", running);
    let cm_file = |site: &Site| -> String {
        let out = Command::new(bin("edgecore"))
            .args(["ctl", "exec", "steady", "--data-dir"])
            .arg(&site.edge_dir)
            .args(["--cri-endpoint", &site.containerd.endpoint, "--"])
            .args(["cat", "/etc/settings/mode"])
            .output()
            .expect("ctl exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cm_file(&site), "before");

    site.net.cut().expect("cut the link");
    let partitioned = Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || !site.edge.connected()),
        "the edge did not notice the partition; log:\n{}",
        tail(&site.edge.log(), 30)
    );
    // Changes in the API while the edge cannot hear them.
    site.kubectl(&["delete", "pod", "doomed", "--wait=false"], None);
    site.apply(&settings("after"));
    site.apply(&pod_yaml("newcomer", &node, SLEEPER, ""));
    // A local operation while offline.
    let (ok, out, err) = site.ctl(&["restart", "restartme"]);
    assert!(ok, "ctl restart while partitioned: {out}{err}");
    assert!(out.contains("restartCount 1"), "{out}");
    // The node goes Unknown in the API; the default pods stay, the opted-out one is evicted.
    assert!(
        eventually(Duration::from_secs(30), || {
            site.node()["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
        }),
        "node never became Ready=Unknown while partitioned: {:?}\ncloud log (end):\n{}",
        site.node()["status"]["conditions"],
        tail(&site.cloud.log(), 40)
    );
    // Evicted as a kubelet-less node's pods are: Terminating until its node confirms.
    site.wait_pod(
        "optout",
        Duration::from_secs(60),
        "evicted (deletionTimestamp)",
        |p| p["metadata"]["deletionTimestamp"].is_string(),
    );

    // Meanwhile on the gateway.
    while partitioned.elapsed() < length {
        std::thread::sleep(Duration::from_secs(5).min(length));
    }
    let runtime = site.runtime();
    for name in ["steady", "doomed", "optout"] {
        assert_eq!(
            runtime.running(name),
            Some(container_id(&before[name])),
            "{name} must keep running in the same container while partitioned: {runtime:?}"
        );
    }
    let local = local_pods(&site);
    let crasher_local = local["crasher"]["restarts"].as_u64().unwrap_or(0);
    assert!(
        crasher_local >= 2,
        "the crashing container was not restarted locally: {}",
        local["crasher"]
    );
    assert_eq!(local["restartme"]["restarts"], 1, "{}", local["restartme"]);
    assert_eq!(local["steady"]["restarts"], 0, "{}", local["steady"]);
    assert_eq!(local["steady"]["ready"], "1/1", "{}", local["steady"]);
    assert!(
        !local.contains_key("newcomer"),
        "the edge cannot know of a pod created during the partition"
    );

    site.net.heal().expect("heal");
    let healed = Instant::now();
    // Changes made in the API during the partition, applied within 5 s.
    site.wait_pod(
        "newcomer",
        AFTER_HEAL + Duration::from_secs(10),
        "running",
        running,
    );
    site.wait_gone("doomed", AFTER_HEAL + Duration::from_secs(10));
    site.wait_gone("optout", AFTER_HEAL + Duration::from_secs(10));
    assert!(
        eventually(AFTER_HEAL, || cm_file(&site) == "after"),
        "ConfigMap update not in the mounted file after the heal"
    );
    // Status produced during the partition: restart counts as the edge counted them.
    site.wait_pod(
        "crasher",
        AFTER_HEAL,
        "restart count from the partition",
        |p| restarts(p) >= crasher_local,
    );
    site.wait_pod(
        "restartme",
        AFTER_HEAL,
        "restart count 1 from ctl restart",
        |p| restarts(p) == 1 && running(p),
    );
    let elapsed = healed.elapsed();
    eprintln!("after a {length:?} partition the API caught up in {elapsed:?}");
    assert!(
        elapsed < AFTER_HEAL + Duration::from_secs(10),
        "catching up took {elapsed:?}"
    );
    // Nothing else restarted or was recreated.
    let steady = site.pod("steady").expect("steady still exists");
    assert_eq!(uid(&steady), uid(&before["steady"]), "steady was recreated");
    assert_eq!(container_id(&steady), container_id(&before["steady"]));
    assert_eq!(restarts(&steady), 0);
    let restartme = site.pod("restartme").expect("restartme still exists");
    assert_eq!(uid(&restartme), uid(&before["restartme"]));
    assert!(
        eventually(Duration::from_secs(15), || site.node()["spec"]["taints"]
            .as_array()
            .is_none_or(|t| t.is_empty())),
        "the unreachable taint stayed after the heal: {}",
        site.node()["spec"]
    );
    let runtime = site.runtime();
    assert_eq!(
        runtime.running("steady"),
        Some(container_id(&before["steady"]))
    );
    assert!(
        runtime.ready_sandboxes.values().all(|&n| n == 1),
        "a pod has more than one sandbox: {runtime:?}"
    );
}

/// With the link dropping packets: edgecore restarted, then a reboot (edgecore and containerd
/// stopped, every sandbox and container removed, both started again). Every pod comes back
/// from the local store within 5 s of edgecore's start, with no cloud; after the heal the API
/// shows one more restart per container and `lastState` from the reboot, same pod objects.
#[test]
fn restart_and_reboot_while_partitioned_bring_every_pod_back() {
    let mut site = Site::start("offline-b", &[]);
    let node = site.node.clone();
    site.apply(&settings("x"));
    let names = ["p1", "p2", "p3"];
    for name in names {
        site.apply(&pod_yaml(name, &node, SLEEPER, ""));
    }
    let mut before = HashMap::new();
    for name in names {
        before.insert(
            name,
            site.wait_pod(name, Duration::from_secs(30), "running", running),
        );
    }
    site.net.drop_packets().expect("drop packets");
    assert!(
        eventually(Duration::from_secs(30), || !site.edge.connected()),
        "the edge did not notice the partition"
    );

    // 1. edgecore restarts (kill -9): everything adopted, nothing restarted.
    site.edge.kill();
    let started = site.start_edge();
    assert!(
        eventually(Duration::from_secs(5), || {
            let local = local_pods(&site);
            names
                .iter()
                .all(|n| local.get(*n).is_some_and(|p| p["status"] == "Running"))
        }),
        "pods not reported running by the restarted edgecore within 5 s; log:\n{}",
        tail(&site.edge.log(), 40)
    );
    let runtime = site.runtime();
    for name in names {
        assert_eq!(
            runtime.running(name),
            Some(container_id(&before[name])),
            "{name} was not adopted untouched"
        );
    }
    eprintln!(
        "restart while partitioned: pods reported in {:?}",
        started.elapsed()
    );

    // 2. Reboot: nothing survives in the runtime.
    site.edge.stop();
    site.containerd.reboot();
    assert!(
        site.runtime().containers.is_empty(),
        "the reboot left containers"
    );
    let started = site.start_edge();
    let mut back_after = None;
    while started.elapsed() < Duration::from_secs(5) {
        let runtime = site.runtime();
        if names.iter().all(|n| runtime.running(n).is_some()) {
            back_after = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let back_after = back_after.unwrap_or_else(|| {
        panic!(
            "pods not all running within 5 s of edgecore's start after a reboot: {:?}\nlog:\n{}",
            site.runtime(),
            tail(&site.edge.log(), 60)
        )
    });
    eprintln!("reboot while partitioned: every pod running {back_after:?} after edgecore started");
    assert!(!site.edge.connected(), "the partition must still hold");
    // The containers run before edgecore's status pass records them in edge.db: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let local = loop {
        let local = local_pods(&site);
        if names.iter().all(|n| local[*n]["restarts"] == 1) || std::time::Instant::now() > deadline
        {
            break local;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for name in names {
        assert_eq!(local[name]["restarts"], 1, "{name}: {}", local[name]);
    }

    site.net.heal().expect("heal");
    for name in names {
        let pod = site.wait_pod(
            name,
            AFTER_HEAL + Duration::from_secs(10),
            "the reboot reported",
            |p| restarts(p) == 1 && running(p),
        );
        assert_eq!(uid(&pod), uid(&before[name]), "{name} was recreated");
        let last = &container_status(&pod, "c")["lastState"]["terminated"];
        assert_eq!(last["reason"], "Unknown", "{name}: {last}");
        assert_eq!(
            last["containerID"]
                .as_str()
                .map(|s| s.trim_start_matches("containerd://")),
            Some(container_id(&before[name]).as_str()),
            "{name}: lastState must name the container lost in the reboot"
        );
    }
    let runtime = site.runtime();
    assert!(
        runtime.ready_sandboxes.values().all(|&n| n == 1)
            && runtime.ready_sandboxes.len() == names.len(),
        "one sandbox per pod expected: {runtime:?}"
    );
}

/// kill -9 of edgecore while it flushes the status produced offline, and during an update
/// storm: nothing the edge acknowledged is lost, and no pod ever runs twice.
#[test]
fn kill_during_status_flush_and_update_storm_loses_nothing() {
    let mut site = Site::start("offline-c", &[]);
    let node = site.node.clone();
    site.apply(&settings("0"));
    site.apply(&pod_yaml("crasher", &node, CRASHER, ""));
    site.apply(&pod_yaml("steady", &node, SLEEPER, ""));
    let flushed: Vec<String> = (0..6).map(|i| format!("flush-{i}")).collect();
    for name in &flushed {
        site.apply(&pod_yaml(name, &node, SLEEPER, ""));
    }
    site.wait_pod("steady", Duration::from_secs(30), "running", running);
    for name in &flushed {
        site.wait_pod(name, Duration::from_secs(30), "running", running);
    }
    site.net.cut().expect("cut");
    assert!(eventually(Duration::from_secs(30), || !site
        .edge
        .connected()));
    // Status to flush after the heal: one restart of each pod, made offline.
    for name in &flushed {
        let (ok, out, err) = site.ctl(&["restart", name]);
        assert!(ok, "ctl restart {name}: {out}{err}");
    }
    // Crash-loop offline long enough for a few restarts (10 s, 20 s backoff).
    assert!(
        eventually(Duration::from_secs(60), || local_pods(&site)
            .get("crasher")
            .and_then(|p| p["restarts"].as_u64())
            .is_some_and(|r| r >= 2)),
        "crasher not restarted offline"
    );
    // Heal and kill edgecore the moment it is connected: the flush has just started.
    site.net.heal().expect("heal");
    let healed = Instant::now();
    while !site.edge.connected() {
        assert!(
            healed.elapsed() < Duration::from_secs(15),
            "no reconnect after the heal"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let pending = site.edge.metric("edgecore_outbox_pending");
    site.edge.kill();
    eprintln!("killed with {pending} reports unacknowledged");
    let local_restarts = local_pods(&site)["crasher"]["restarts"]
        .as_u64()
        .unwrap_or(0);
    site.start_edge();
    site.wait_pod(
        "crasher",
        Duration::from_secs(15),
        "offline restart count",
        |p| restarts(p) >= local_restarts,
    );
    for name in &flushed {
        site.wait_pod(name, AFTER_HEAL, "the restart made offline", |p| {
            restarts(p) == 1 && running(p)
        });
    }

    // Update storm with kill -9 in the middle of it.
    let storm = std::thread::scope(|scope| {
        let cloud = &site.cloud;
        let apply = move |yaml: &str| {
            let out = cloud.kubectl_with_stdin(&["apply", "-f", "-"], Some(yaml));
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let node = node.clone();
        let writer = scope.spawn(move || {
            for i in 1..=60 {
                apply(&settings(&i.to_string()));
                if i % 10 == 0 {
                    apply(&pod_yaml(&format!("storm-{i}"), &node, SLEEPER, ""));
                }
            }
        });
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            site.edge.kill();
            site.edge = Edge::start_in(
                &site.net,
                &site.edge_dir,
                &["--cri-endpoint", &site.containerd.endpoint],
            );
        }
        writer.join()
    });
    storm.expect("writer");
    for i in (10..=60).step_by(10) {
        site.wait_pod(
            &format!("storm-{i}"),
            Duration::from_secs(30),
            "running",
            running,
        );
    }
    // The final ConfigMap reached the edge store.
    assert!(
        eventually(Duration::from_secs(10), || site
            .stored("ConfigMap", "settings")
            .contains("\"60\"")),
        "the last ConfigMap version never reached the edge"
    );
    // No pod runs twice.
    let runtime = site.runtime();
    assert!(
        runtime.ready_sandboxes.values().all(|&n| n == 1),
        "a pod has more than one sandbox: {runtime:?}"
    );
    for (pod, containers) in &runtime.containers {
        let live = containers.iter().filter(|(_, _, running)| *running).count();
        assert!(live <= 1, "{pod} runs {live} containers: {containers:?}");
    }
}

/// A certificate that expired while the cloud was unreachable: a clear error at the next
/// dial, pods untouched, and the documented recovery (a token for the node, `edgecore join
/// --rejoin`) works with edgecore running.
#[test]
fn certificate_expired_during_an_outage_is_recovered_with_a_rejoin() {
    let site = Site::start("offline-d", &["--cert-lifetime", "30s"]);
    let node = site.node.clone();
    site.apply(&pod_yaml("keeper", &node, SLEEPER, ""));
    let before = site.wait_pod("keeper", Duration::from_secs(30), "running", running);
    site.net.cut().expect("cut");
    assert!(eventually(Duration::from_secs(30), || !site
        .edge
        .connected()));
    // Outlast the certificate.
    let identity = edgecore::identity::load(&site.edge_dir).expect("identity");
    let left = (identity.not_after - time::OffsetDateTime::now_utc()).as_seconds_f64();
    std::thread::sleep(Duration::from_secs_f64(left.max(0.0) + 2.0));
    site.net.heal().expect("heal");
    assert!(
        eventually(Duration::from_secs(30), || site
            .edge
            .log()
            .contains("certificate expired")),
        "no clear error about the expired certificate; log:\n{}",
        tail(&site.edge.log(), 30)
    );
    assert!(!site.edge.connected());
    assert_eq!(
        site.runtime().running("keeper"),
        Some(container_id(&before)),
        "the pod must keep running through an expired certificate"
    );
    // The documented recovery.
    let token = site.cloud.token(&["--node", &node]);
    let out = site
        .net
        .command(bin("edgecore"))
        .args([
            "join",
            "--rejoin",
            "--cloud",
            &token.cloud,
            "--token",
            &token.token,
        ])
        .args(["--ca-hash", &token.ca_hash, "--data-dir"])
        .arg(&site.edge_dir)
        .output()
        .expect("edgecore join --rejoin");
    assert!(
        out.status.success(),
        "rejoin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(30), || site.edge.connected()),
        "edgecore did not reconnect with the new certificate; log:\n{}",
        tail(&site.edge.log(), 30)
    );
    let after = site.wait_pod("keeper", AFTER_HEAL, "running", running);
    assert_eq!(container_id(&after), container_id(&before));
    assert_eq!(restarts(&after), 0);
}

/// A full disk on the gateway: the store refuses new writes with a clear error, running pods
/// keep running, and everything catches up when space returns.
#[test]
fn disk_full_refuses_writes_and_recovers() {
    // The edge's data dir on a small tmpfs of its own.
    let mount = tempfile::tempdir().expect("mount point");
    let edge_dir = mount.path().join("edge");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(mount.path())
        .status()
        .expect("run mount");
    assert!(status.success(), "cannot mount a tmpfs (needs root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.path().to_path_buf());
    let site = Site::start_with("offline-e", &[], Some(edge_dir.clone()));
    let node = site.node.clone();
    site.apply(&settings("roomy"));
    site.apply(&pod_yaml("runner", &node, SLEEPER, ""));
    let before = site.wait_pod("runner", Duration::from_secs(30), "running", running);

    // Fill the disk.
    let filler = mount.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", filler.display()))
        .output()
        .expect("dd");
    site.apply(&settings("while-full"));
    site.apply(&pod_yaml("late", &node, SLEEPER, ""));
    assert!(
        eventually(Duration::from_secs(20), || {
            let log = site.edge.log();
            log.contains("disk is full") || log.contains("database or disk is full")
        }),
        "no clear disk-full error; log:\n{}",
        tail(&site.edge.log(), 30)
    );
    // The error is logged once, not at every retry: the docs promise at most once a minute.
    // (The store is retried every 5 s, so 16 s would hold three or four retries.)
    std::thread::sleep(Duration::from_secs(16));
    let log = site.edge.log();
    let full_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disk is full") && (l.contains("ERROR") || l.contains("WARN")))
        .collect();
    assert!(
        full_lines.len() <= 2,
        "the disk-full error was logged {} times in about 20 s:\n{}",
        full_lines.len(),
        full_lines.join("\n")
    );
    // Running pods keep running; local reads work.
    assert_eq!(
        site.runtime().running("runner"),
        Some(container_id(&before))
    );
    let (ok, _, err) = site.ctl(&["get", "pods"]);
    assert!(ok, "ctl get with a full disk: {err}");

    // Space returns.
    std::fs::remove_file(&filler).expect("remove filler");
    site.wait_pod(
        "late",
        Duration::from_secs(60),
        "running after space returned",
        running,
    );
    assert!(
        eventually(Duration::from_secs(30), || site
            .stored("ConfigMap", "settings")
            .contains("while-full")),
        "the ConfigMap written while the disk was full never reached the store"
    );
    let runner = site.pod("runner").expect("runner");
    assert_eq!(container_id(&runner), container_id(&before));
    assert_eq!(restarts(&runner), 0);
    drop(site);
}

/// An edge whose clock is 10 minutes ahead, then 10 minutes behind (edgecore under
/// libfaketime): it joins and connects, and status written after the clock went back is still
/// applied (reports are ordered by the edge's sequence, not by its clock).
#[test]
fn clock_skew_of_ten_minutes_breaks_neither_certificates_nor_status() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: apt-get install faketime (.ci/run does)"
    );
    let mut site = Site::start("offline-f", &[]);
    let node = site.node.clone();
    let restart_with_clock = |site: &mut Site, offset: &str| {
        site.edge.stop();
        site.edge = Edge::start_in_with_env(
            &site.net,
            &site.edge_dir,
            &[
                ("LD_PRELOAD", LIBFAKETIME),
                ("FAKETIME", offset),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
            &["--cri-endpoint", &site.containerd.endpoint],
        );
        assert!(
            eventually(Duration::from_secs(20), || site.edge.connected()),
            "edge with clock {offset} did not connect; log:\n{}",
            tail(&site.edge.log(), 30)
        );
    };
    restart_with_clock(&mut site, "+10m");
    site.apply(&pod_yaml("skewed", &node, SLEEPER, ""));
    site.wait_pod("skewed", Duration::from_secs(30), "running", running);
    let (ok, out, err) = site.ctl(&["restart", "skewed"]);
    assert!(ok, "{out}{err}");
    site.wait_pod(
        "skewed",
        AFTER_HEAL,
        "restart 1 with the clock ahead",
        |p| restarts(p) == 1 && running(p),
    );
    restart_with_clock(&mut site, "-10m");
    let (ok, out, err) = site.ctl(&["restart", "skewed"]);
    assert!(ok, "{out}{err}");
    site.wait_pod(
        "skewed",
        AFTER_HEAL,
        "restart 2 with the clock behind",
        |p| restarts(p) == 2 && running(p),
    );
}

/// Runs `edgecore run` on the site's data dir expecting it to refuse to start: returns its
/// stderr and stdout (the log). Fails if it is still running after 20 s.
fn run_expecting_refusal(site: &Site) -> String {
    let mut child = Command::new(bin("edgecore"))
        .args(["run", "--metrics-listen", "127.0.0.1:0", "--cri-endpoint"])
        .arg(&site.containerd.endpoint)
        .arg("--data-dir")
        .arg(&site.edge_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn edgecore run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "edgecore run started anyway:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success(), "edgecore run exited 0");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Clumsy operations on the gateway: its store truncated to zero bytes, its data dir mounted
/// read-only, `edgecore ctl restart` run by a user who is not root. Each gets an error that
/// says what is wrong, and the pod keeps running throughout.
#[test]
fn a_lost_store_a_read_only_data_dir_and_a_non_root_ctl_get_clear_errors_and_stop_no_pod() {
    let mut site = Site::start("offline-g", &[]);
    let node = site.node.clone();
    site.apply(&pod_yaml("keeper", &node, SLEEPER, ""));
    let before = site.wait_pod("keeper", Duration::from_secs(30), "running", running);
    let id = container_id(&before);

    // Not root: the socket is root's; the error says so (it used to blame "not running").
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("edgecore"))
        .args(["ctl", "restart", "keeper", "--data-dir"])
        .arg(&site.edge_dir)
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("run edgecore ctl as root") && !stderr.contains("not running"),
        "a non-root ctl restart: {stderr}"
    );

    // The store emptied while edgecore is stopped: edgecore refuses it, nothing is stopped.
    site.edge.stop();
    let db = site.edge_dir.join("edge.db");
    let saved = std::fs::read(&db).expect("read edge.db");
    std::fs::File::create(&db).expect("truncate edge.db");
    let log = run_expecting_refusal(&site);
    assert!(
        log.contains("is empty (0 bytes)") && log.contains("refuses to start from an empty store"),
        "{log}"
    );
    assert_eq!(
        std::fs::metadata(&db).expect("edge.db").len(),
        0,
        "the emptied file is left as it is"
    );
    assert_eq!(site.runtime().running("keeper"), Some(id.clone()));
    std::fs::write(&db, &saved).expect("restore edge.db");

    // The data dir on a read-only mount: a clear refusal, and ctl get still reads the store.
    let bind = |args: &[&str]| {
        let status = Command::new("mount")
            .args(args)
            .arg(&site.edge_dir)
            .arg(&site.edge_dir)
            .status()
            .expect("mount");
        assert!(status.success(), "mount {args:?} (needs root)");
    };
    bind(&["--bind"]);
    bind(&["-o", "remount,bind,ro"]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let unmount = Unmount(site.edge_dir.clone());
    let log = run_expecting_refusal(&site);
    assert!(log.contains("is on a read-only file system"), "{log}");
    let (ok, out, err) = site.ctl(&["get", "pods"]);
    assert!(
        ok && out.contains("keeper"),
        "ctl get on a read-only data dir: {out}{err}"
    );
    assert_eq!(site.runtime().running("keeper"), Some(id.clone()));
    drop(unmount);

    // Back to normal: edgecore starts on the restored store and adopts the pod untouched.
    site.start_edge();
    assert!(
        eventually(Duration::from_secs(20), || site.edge.connected()),
        "{}",
        tail(&site.edge.log(), 30)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(site.runtime().running("keeper"), Some(id));
}
