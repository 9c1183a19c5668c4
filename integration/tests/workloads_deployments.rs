//! Deployments and ReplicaSets in the embedded control plane, driven with the real `kubectl`
//! on PATH, with pods running on edges through a real containerd: rollouts (RollingUpdate
//! within maxUnavailable, Recreate), history, undo, pause/resume, restart, and the autonomy
//! rule for a Deployment whose pod sits on a partitioned edge (a network namespace partition,
//! as in offline.rs). Needs root, iproute2, iptables and Debian's containerd, runc,
//! containernetworking-plugins and busybox-static (`.ci/run` installs them); without them the
//! tests fail saying what is missing.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration::netns::EdgeNet;
use integration::{BUSYBOX, Cloud, Containerd, Edge, bin, deploy_dir, eventually};
use serde_json::Value;

/// The second image a rollout moves to: the same busybox under another name.
const BUSYBOX_2: &str = "localhost/edge/busybox:2";
/// A container that runs until stopped and stops at once on TERM.
const LOOP: &str = "trap 'exit 0' TERM; while true; do sleep 0.2; done";

/// Builds [`BUSYBOX_2`] and imports it into `containerd`.
fn import_second_image(containerd: &Containerd) {
    let tar = containerd.dir.join("images/busybox-2.tar");
    let out = Command::new(deploy_dir().join("images/build.sh"))
        .arg(&tar)
        .args([BUSYBOX_2, "null", r#"["/bin/sh"]"#])
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "building {BUSYBOX_2}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin("edgecore"))
        .args(["images", "import", "--cri-endpoint", &containerd.endpoint])
        .arg(&tar)
        .output()
        .expect("run edgecore images import");
    assert!(
        out.status.success(),
        "importing {BUSYBOX_2}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn deployment(cloud: &Cloud, name: &str) -> Value {
    json(&cloud.kubectl_ok(&["get", "deployment", name, "-o", "json"], None))
}

fn items(cloud: &Cloud, kind: &str, selector: &str) -> Vec<Value> {
    let list = json(&cloud.kubectl_ok(&["get", kind, "-l", selector, "-o", "json"], None));
    list["items"].as_array().cloned().unwrap_or_default()
}

fn condition<'a>(object: &'a Value, kind: &str) -> &'a Value {
    object["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

fn is_ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null() && condition(pod, "Ready")["status"] == "True"
}

fn image(pod: &Value) -> String {
    pod["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn annotation(object: &Value, name: &str) -> String {
    object["metadata"]["annotations"][name]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits for `kubectl rollout status` to report success within `timeout`.
fn rollout_status(cloud: &Cloud, name: &str, timeout: &str) -> String {
    try_rollout_status(cloud, name, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`rollout_status`], with what the cluster showed when it did not succeed as the error: the
/// command's output, the Deployment's status and each of its pods' state.
fn try_rollout_status(cloud: &Cloud, name: &str, timeout: &str) -> Result<String, String> {
    let out = cloud.kubectl(&[
        "rollout",
        "status",
        &format!("deployment/{name}"),
        &format!("--timeout={timeout}"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && stdout.contains("successfully rolled out") {
        return Ok(stdout);
    }
    let pods: Vec<String> = items(cloud, "pods", &format!("app={name}"))
        .iter()
        .map(|p| {
            format!(
                "{} deleting={} phase={} conditions={} containers={}",
                p["metadata"]["name"],
                !p["metadata"]["deletionTimestamp"].is_null(),
                p["status"]["phase"],
                p["status"]["conditions"],
                p["status"]["containerStatuses"]
            )
        })
        .collect();
    Err(format!(
        "rollout status of {name}: {stdout}{}\ndeployment: {}\npods:\n{}",
        String::from_utf8_lossy(&out.stderr),
        deployment(cloud, name)["status"],
        pods.join("\n")
    ))
}

fn create_deployment(cloud: &Cloud, name: &str, replicas: u32) {
    cloud.kubectl_ok(
        &[
            "create",
            "deployment",
            name,
            &format!("--image={BUSYBOX}"),
            &format!("--replicas={replicas}"),
            "--",
            "sh",
            "-c",
            LOOP,
        ],
        None,
    );
}

fn scale(cloud: &Cloud, name: &str, replicas: u32) {
    cloud.kubectl_ok(
        &[
            "scale",
            &format!("deployment/{name}"),
            &format!("--replicas={replicas}"),
        ],
        None,
    );
}

fn set_image(cloud: &Cloud, name: &str, image: &str) {
    cloud.kubectl_ok(
        &[
            "set",
            "image",
            &format!("deployment/{name}"),
            &format!("busybox={image}"),
        ],
        None,
    );
}

fn pause(cloud: &Cloud, name: &str, paused: bool) {
    let verb = if paused { "pause" } else { "resume" };
    cloud.kubectl_ok(&["rollout", verb, &format!("deployment/{name}")], None);
}

fn restart(cloud: &Cloud, name: &str) {
    cloud.kubectl_ok(&["rollout", "restart", &format!("deployment/{name}")], None);
}

/// Fields drop in order: edgecore, containerd (removing its pods), cloudcore, the directory.
struct Setup {
    edge: Edge,
    _containerd: Containerd,
    cloud: Cloud,
    _tmp: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let containerd = Containerd::start(&tmp.path().join("containerd"));
        import_second_image(&containerd);
        let cloud = Cloud::start(tmp.path(), &[]);
        let edge = integration::join_and_run(
            &cloud,
            &tmp.path().join("edge-1"),
            "edge-1",
            &["--cri-endpoint", &containerd.endpoint],
        );
        Setup {
            edge,
            _containerd: containerd,
            cloud,
            _tmp: tmp,
        }
    }

    fn context(&self) -> String {
        let log = self.edge.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "edge log (end):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

#[test]
fn kubectl_rolls_a_deployment_out_and_back_scales_it_pauses_and_restarts_it() {
    let s = Setup::start();
    let cloud = &s.cloud;

    // Create: one ReplicaSet named after the template hash, revision 1, pods it owns.
    let started = Instant::now();
    create_deployment(cloud, "web", 2);
    rollout_status(cloud, "web", "60s");
    eprintln!("create -> rolled out: {:?}", started.elapsed());
    let rss = items(cloud, "replicasets", "app=web");
    assert_eq!(rss.len(), 1, "{rss:?}");
    let first = &rss[0];
    let hash = first["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .expect("hash label")
        .to_string();
    let first_name = first["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    assert_eq!(first_name, format!("web-{hash}"));
    assert_eq!(
        first["spec"]["selector"]["matchLabels"]["pod-template-hash"],
        hash.as_str()
    );
    assert_eq!(annotation(first, "deployment.kubernetes.io/revision"), "1");
    assert_eq!(
        annotation(first, "deployment.kubernetes.io/desired-replicas"),
        "2"
    );
    let owner = &first["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["controller"].as_bool()),
        (Some("Deployment"), Some(true))
    );
    let pods = items(cloud, "pods", "app=web");
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        assert!(name.starts_with(&format!("{first_name}-")), "{name}");
        assert_eq!(
            pod["metadata"]["ownerReferences"][0]["name"],
            first_name.as_str()
        );
        assert_eq!(
            pod["metadata"]["ownerReferences"][0]["blockOwnerDeletion"],
            true
        );
    }
    let d = deployment(cloud, "web");
    assert_eq!(annotation(&d, "deployment.kubernetes.io/revision"), "1");
    assert_eq!(
        condition(&d, "Available")["reason"],
        "MinimumReplicasAvailable"
    );
    assert_eq!(
        condition(&d, "Progressing")["reason"],
        "NewReplicaSetAvailable"
    );

    // Scale to 4; the rollout then waits 2 s of readiness per pod.
    scale(cloud, "web", 4);
    cloud.kubectl_ok(
        &[
            "patch",
            "deployment",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"minReadySeconds":2}}"#,
        ],
        None,
    );
    rollout_status(cloud, "web", "60s");
    let d = deployment(cloud, "web");
    for field in [
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
    ] {
        assert_eq!(d["status"][field], 4, "{field}: {}", d["status"]);
    }
    assert_eq!(
        items(cloud, "replicasets", "app=web").len(),
        1,
        "scaling made no new ReplicaSet"
    );

    // set image: a rolling update (25%/25% of 4: surge 1, unavailable 1) during which at
    // least 3 pods are Ready at every poll.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        let kubeconfig = cloud.kubeconfig();
        std::thread::spawn(move || WatchOnly { kubeconfig }.watch("app=web", &stop))
    };
    let started = Instant::now();
    set_image(cloud, "web", BUSYBOX_2);
    rollout_status(cloud, "web", "90s");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (fewest, _) = poller.join().expect("poller");
    eprintln!("rolling update of 4 pods: {took:?}, fewest Ready during it: {fewest}");
    assert!(
        fewest >= 3,
        "Ready pods dropped to {fewest} < replicas - maxUnavailable = 3"
    );
    // minReadySeconds 2 per step, at least two steps: it waited for availability.
    assert!(
        took >= Duration::from_secs(4),
        "rolled out in {took:?}, faster than minReadySeconds allows"
    );
    let pods = items(cloud, "pods", "app=web");
    assert!(
        eventually(Duration::from_secs(20), || {
            let pods = items(cloud, "pods", "app=web");
            pods.len() == 4 && pods.iter().all(|p| image(p) == BUSYBOX_2)
        }),
        "old pods left: {:?}",
        pods.iter()
            .map(|p| (p["metadata"]["name"].clone(), image(p)))
            .collect::<Vec<_>>()
    );
    let rss = items(cloud, "replicasets", "app=web");
    assert_eq!(rss.len(), 2);
    let old = rss
        .iter()
        .find(|rs| rs["metadata"]["name"] == first_name.as_str())
        .expect("old RS kept");
    assert_eq!(old["spec"]["replicas"], 0);
    let second = rss
        .iter()
        .find(|rs| rs["metadata"]["name"] != first_name.as_str())
        .expect("new RS");
    assert_eq!(annotation(second, "deployment.kubernetes.io/revision"), "2");
    let history = cloud.kubectl_ok(&["rollout", "history", "deployment/web"], None);
    let revisions: Vec<&str> = history
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, ["1", "2"], "{history}");

    // undo: the client puts revision 1's template back; the old ReplicaSet comes back as
    // revision 3 (no third ReplicaSet).
    cloud.kubectl_ok(&["rollout", "undo", "deployment/web"], None);
    rollout_status(cloud, "web", "90s");
    assert!(
        eventually(Duration::from_secs(20), || {
            let pods = items(cloud, "pods", "app=web");
            pods.len() == 4 && pods.iter().all(|p| image(p) == BUSYBOX)
        }),
        "after undo: {:?}",
        items(cloud, "pods", "app=web")
            .iter()
            .map(image)
            .collect::<Vec<_>>()
    );
    let rss = items(cloud, "replicasets", "app=web");
    assert_eq!(rss.len(), 2, "undo reuses the old ReplicaSet");
    let back = rss
        .iter()
        .find(|rs| rs["metadata"]["name"] == first_name.as_str())
        .expect("old RS");
    assert_eq!(back["spec"]["replicas"], 4);
    assert_eq!(annotation(back, "deployment.kubernetes.io/revision"), "3");
    assert_eq!(
        annotation(back, "deployment.kubernetes.io/revision-history"),
        "1"
    );
    let d = deployment(cloud, "web");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        BUSYBOX
    );
    assert_eq!(annotation(&d, "deployment.kubernetes.io/revision"), "3");

    // pause: a template change makes no ReplicaSet and no pod until resume.
    pause(cloud, "web", true);
    set_image(cloud, "web", BUSYBOX_2);
    assert!(
        eventually(Duration::from_secs(10), || condition(
            &deployment(cloud, "web"),
            "Progressing"
        )["reason"]
            == "DeploymentPaused"),
        "{}",
        deployment(cloud, "web")["status"]
    );
    std::thread::sleep(Duration::from_secs(2));
    let pods = items(cloud, "pods", "app=web");
    assert!(
        pods.iter().all(|p| image(p) == BUSYBOX),
        "a paused deployment rolled out"
    );
    assert_eq!(
        items(cloud, "replicasets", "app=web")[0]["spec"]["replicas"]
            .as_i64()
            .unwrap_or(0)
            + items(cloud, "replicasets", "app=web")[1]["spec"]["replicas"]
                .as_i64()
                .unwrap_or(0),
        4
    );
    pause(cloud, "web", false);
    rollout_status(cloud, "web", "90s");
    let rss = items(cloud, "replicasets", "app=web");
    assert_eq!(rss.len(), 2, "resume reuses revision 2's ReplicaSet");
    assert!(
        items(cloud, "pods", "app=web")
            .iter()
            .all(|p| image(p) == BUSYBOX_2 || !p["metadata"]["deletionTimestamp"].is_null())
    );

    // restart: a new template annotation, so a new ReplicaSet and new pods.
    let before: BTreeSet<String> = items(cloud, "pods", "app=web")
        .iter()
        .map(|p| {
            p["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    restart(cloud, "web");
    rollout_status(cloud, "web", "90s");
    assert!(
        eventually(Duration::from_secs(20), || {
            let pods = items(cloud, "pods", "app=web");
            pods.len() == 4
                && pods
                    .iter()
                    .all(|p| !before.contains(p["metadata"]["uid"].as_str().unwrap_or_default()))
        }),
        "restart left old pods"
    );
    assert_eq!(items(cloud, "replicasets", "app=web").len(), 3);

    // Events, worded as kube-controller-manager's.
    let events = cloud.kubectl_ok(&["get", "events", "-o", "json"], None);
    let events = json(&events);
    let reasons: BTreeSet<(String, String)> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["source"]["component"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for expected in [
        ("ScalingReplicaSet", "deployment-controller"),
        ("SuccessfulCreate", "replicaset-controller"),
        ("SuccessfulDelete", "replicaset-controller"),
    ] {
        assert!(
            reasons.contains(&(expected.0.to_string(), expected.1.to_string())),
            "no {expected:?} event in {reasons:?}"
        );
    }
    let scaled = events["items"].as_array().into_iter().flatten().any(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m == format!("Scaled up replica set {first_name} from 2 to 4"))
    });
    assert!(
        scaled,
        "no 'Scaled up replica set {first_name} from 2 to 4' event"
    );

    // Recreate: no new pod while an old one exists.
    create_deployment(cloud, "rec", 2);
    cloud.kubectl_ok(
        &[
            "patch",
            "deployment",
            "rec",
            "--type=merge",
            "-p",
            r#"{"spec":{"strategy":{"type":"Recreate","rollingUpdate":null}}}"#,
        ],
        None,
    );
    rollout_status(cloud, "rec", "60s");
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        let kubeconfig = cloud.kubeconfig();
        std::thread::spawn(move || WatchOnly { kubeconfig }.watch("app=rec", &stop))
    };
    set_image(cloud, "rec", BUSYBOX_2);
    rollout_status(cloud, "rec", "60s");
    stop.store(true, Ordering::Relaxed);
    let (_, mixed) = poller.join().expect("poller");
    assert!(!mixed, "Recreate ran old and new pods at the same time");
    assert!(
        eventually(Duration::from_secs(20), || {
            let pods = items(cloud, "pods", "app=rec");
            pods.len() == 2 && pods.iter().all(|p| image(p) == BUSYBOX_2)
        }),
        "{}",
        s.context()
    );

    // Deleting the Deployment takes its ReplicaSets and pods with it.
    cloud.kubectl_ok(&["delete", "deployment", "web", "rec"], None);
    assert!(
        eventually(Duration::from_secs(30), || items(
            cloud,
            "replicasets",
            "app in (web,rec)"
        )
        .is_empty()
            && items(cloud, "pods", "app in (web,rec)").is_empty()),
        "left behind: {:?}\n{}",
        items(cloud, "pods", "app in (web,rec)")
            .iter()
            .map(|p| (
                p["metadata"]["name"].clone(),
                p["metadata"]["deletionTimestamp"].clone(),
                p["status"]["containerStatuses"].clone()
            ))
            .collect::<Vec<_>>(),
        s.context()
    );
}

/// A pod poller with only a kubeconfig, for a thread of its own.
struct WatchOnly {
    kubeconfig: PathBuf,
}

impl WatchOnly {
    fn watch(&self, selector: &str, stop: &AtomicBool) -> (usize, bool) {
        let mut fewest = usize::MAX;
        let mut mixed = false;
        while !stop.load(Ordering::Relaxed) {
            if let Some(pods) = self.pods(selector) {
                fewest = fewest.min(pods.iter().filter(|p| is_ready(p)).count());
                let images: BTreeSet<String> = pods
                    .iter()
                    .filter(|p| {
                        let phase = p["status"]["phase"].as_str().unwrap_or("Pending");
                        phase == "Running" || phase == "Pending"
                    })
                    .map(image)
                    .collect();
                mixed |= images.len() > 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (fewest, mixed)
    }

    fn pods(&self, selector: &str) -> Option<Vec<Value>> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["get", "pods", "-l", selector, "-o", "json"])
            .output()
            .ok()?;
        let list: Value = serde_json::from_slice(&out.stdout).ok()?;
        list["items"].as_array().cloned()
    }
}

/// How long an edge may be silent before its node is Ready=Unknown (short, for the test).
const NODE_GRACE: &str = "3s";

#[test]
fn a_deployment_keeps_its_pod_on_a_partitioned_edge_and_a_rollout_waits_for_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
    let far_runtime = Containerd::start(&tmp.path().join("containerd-far"));
    import_second_image(&far_runtime);
    let near_runtime = Containerd::start(&tmp.path().join("containerd-near"));
    import_second_image(&near_runtime);
    let cloud = Cloud::start_at(
        tmp.path(),
        net.host_ip().into(),
        &[
            "--node-grace-period",
            NODE_GRACE,
            "--heartbeat-interval",
            "1s",
            "--dead-after",
            "4s",
        ],
        "info",
    );
    // edge-far behind the veth pair (partitionable), edge-near on the host.
    let far = integration::join_and_run_in(
        &net,
        &cloud,
        &tmp.path().join("far"),
        "edge-far",
        &["--cri-endpoint", &far_runtime.endpoint],
    );
    let near = integration::join_and_run(
        &cloud,
        &tmp.path().join("near"),
        "edge-near",
        &["--cri-endpoint", &near_runtime.endpoint],
    );
    let context = || {
        format!(
            "far log:\n{}\nnear log:\n{}",
            tail(&far.log(), 30),
            tail(&near.log(), 30)
        )
    };
    assert!(
        eventually(Duration::from_secs(20), || ["edge-far", "edge-near"]
            .iter()
            .all(|n| cloud.node_ready(n) == "True")),
        "nodes not Ready; {}",
        context()
    );

    // Two replicas, one on each edge (the scheduler spreads them); no surge, so a rollout
    // must delete an old pod before the last new one.
    create_deployment(&cloud, "app", 2);
    cloud.kubectl_ok(
        &[
            "patch",
            "deployment",
            "app",
            "--type=merge",
            "-p",
            r#"{"spec":{"strategy":{"rollingUpdate":{"maxSurge":1,"maxUnavailable":0}}}}"#,
        ],
        None,
    );
    rollout_status(&cloud, "app", "60s");
    let pods = items(&cloud, "pods", "app=app");
    let on_far: Vec<&Value> = pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "edge-far")
        .collect();
    assert_eq!(
        on_far.len(),
        1,
        "expected one pod per edge: {:?}",
        pods.iter()
            .map(|p| p["spec"]["nodeName"].clone())
            .collect::<Vec<_>>()
    );
    let far_pod = on_far[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let far_uid = on_far[0]["metadata"]["uid"].clone();

    // Partition: the node goes Unknown, the pod stays and is not replaced.
    net.cut().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        eventually(Duration::from_secs(30), || cloud.node_ready("edge-far")
            == "Unknown"),
        "edge-far never became Unknown: {}\ncloud log (end):\n{}",
        cloud.node_ready("edge-far"),
        tail(&cloud.log(), 40)
    );
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let pods = items(&cloud, "pods", "app=app");
        assert_eq!(
            pods.len(),
            2,
            "the partition changed the pods: {:?}",
            pods.iter()
                .map(|p| p["metadata"]["name"].clone())
                .collect::<Vec<_>>()
        );
        let kept = pods
            .iter()
            .find(|p| p["metadata"]["name"] == far_pod.as_str())
            .expect("far pod kept");
        assert_eq!(kept["metadata"]["uid"], far_uid);
        assert!(kept["metadata"]["deletionTimestamp"].is_null());
        std::thread::sleep(Duration::from_millis(500));
    }

    // A rollout during the partition replaces the near pod, then waits for the far one.
    set_image(&cloud, "app", BUSYBOX_2);
    let waiting = || {
        let d = deployment(&cloud, "app");
        let c = condition(&d, "Progressing");
        (c["reason"] == "WaitingForDisconnectedNode")
            .then(|| c["message"].as_str().unwrap_or_default().to_string())
    };
    assert!(
        eventually(Duration::from_secs(60), || waiting().is_some()),
        "no WaitingForDisconnectedNode; deployment status: {}\n{}",
        deployment(&cloud, "app")["status"],
        context()
    );
    let message = waiting().unwrap_or_default();
    assert!(message.contains("edge-far"), "{message}");
    let pods = items(&cloud, "pods", "app=app");
    let kept = pods
        .iter()
        .find(|p| p["metadata"]["name"] == far_pod.as_str())
        .expect("far pod kept during the rollout");
    assert!(
        kept["metadata"]["deletionTimestamp"].is_null(),
        "far pod deleted while its node is disconnected"
    );
    let new_ready = |pods: &[Value]| {
        pods.iter()
            .filter(|p| image(p) == BUSYBOX_2 && is_ready(p))
            .count()
    };
    assert_eq!(
        new_ready(&pods),
        2,
        "the rollout waits only once the new pods run on the connected edge: {pods:?}"
    );
    let status = cloud.kubectl(&["rollout", "status", "deployment/app", "--timeout=1s"]);
    assert!(
        !status.status.success(),
        "the rollout cannot be complete yet"
    );

    // Heal: the far pod goes, the rollout completes, nothing is duplicated.
    net.heal().unwrap_or_else(|e| panic!("{e:#}"));
    rollout_status(&cloud, "app", "90s");
    assert!(
        eventually(Duration::from_secs(30), || {
            let pods = items(&cloud, "pods", "app=app");
            pods.len() == 2 && pods.iter().all(|p| image(p) == BUSYBOX_2 && is_ready(p))
        }),
        "after the heal: {:?}\n{}",
        items(&cloud, "pods", "app=app")
            .iter()
            .map(|p| (
                p["metadata"]["name"].clone(),
                p["spec"]["nodeName"].clone(),
                image(p)
            ))
            .collect::<Vec<_>>(),
        context()
    );
    let d = deployment(&cloud, "app");
    assert_eq!(
        condition(&d, "Progressing")["reason"],
        "NewReplicaSetAvailable"
    );
    assert_eq!(d["status"]["replicas"], 2);
    drop(near);
    drop(far);
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a user sees of a Deployment after the comparison sequence, without what differs by
/// nature between two control planes (names' hashes, times, uids).
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// The last line of each `kubectl rollout status`.
    rollouts: Vec<String>,
    /// Each ReplicaSet is `<deployment>-<its pod-template-hash>`, selecting on that hash.
    named_by_hash: bool,
    /// (revision, revision-history, spec.replicas, desired-replicas, max-replicas) of each
    /// ReplicaSet after the update and after the undo.
    replicasets_after_update: BTreeSet<(String, String, i64, String, String)>,
    replicasets_after_undo: BTreeSet<(String, String, i64, String, String)>,
    /// The REVISION column of `kubectl rollout history`.
    history: Vec<String>,
    /// Status counters, whether observedGeneration caught up, and the revision annotation.
    status: (i64, i64, i64, i64, i64, bool, String),
    /// (type, status, reason) of the Deployment's conditions.
    conditions: BTreeSet<(String, String, String)>,
    /// Event reasons about the Deployment and about its ReplicaSets.
    deployment_events: BTreeSet<String>,
    /// The Deployment's event messages, each ReplicaSet name written `RS` and each number `N`
    /// (which steps a rollout takes depends on timing; the wording does not), without the
    /// prefix client-go's aggregation adds.
    deployment_messages: BTreeSet<String>,
    replicaset_events: BTreeSet<String>,
}

/// The same kubectl sequence on any control plane: create (pinned to `node`), scale to 3,
/// set image, undo; each followed by `rollout status`. `edge_log` is shown when a rollout
/// does not finish.
fn compare_sequence(cloud: &Cloud, node: &str, edge_log: &dyn Fn() -> String) -> Observed {
    // `rollout_status`, with the edge's log when the rollout does not finish.
    let rollout_status = |cloud: &Cloud, name: &str, timeout: &str| {
        try_rollout_status(cloud, name, timeout)
            .unwrap_or_else(|e| panic!("{e}\nedge log (end):\n{}", tail(&edge_log(), 40)))
    };
    let manifest = cloud.kubectl_ok(
        &[
            "create",
            "deployment",
            "cmp",
            &format!("--image={BUSYBOX}"),
            "--replicas=2",
            "--dry-run=client",
            "-o",
            "json",
            "--",
            "sh",
            "-c",
            LOOP,
        ],
        None,
    );
    let mut manifest = json(&manifest);
    manifest["spec"]["template"]["spec"]["nodeSelector"] =
        serde_json::json!({"kubernetes.io/hostname": node});
    manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 2.into();
    cloud.kubectl_ok(&["create", "-f", "-"], Some(&manifest.to_string()));
    let last_line = |s: String| s.lines().last().unwrap_or_default().to_string();
    let mut rollouts = vec![last_line(rollout_status(cloud, "cmp", "90s"))];
    scale(cloud, "cmp", 3);
    rollouts.push(last_line(rollout_status(cloud, "cmp", "90s")));
    set_image(cloud, "cmp", BUSYBOX_2);
    rollouts.push(last_line(rollout_status(cloud, "cmp", "90s")));
    let replicasets = |cloud: &Cloud| {
        items(cloud, "replicasets", "app=cmp")
            .iter()
            .map(|rs| {
                (
                    annotation(rs, "deployment.kubernetes.io/revision"),
                    annotation(rs, "deployment.kubernetes.io/revision-history"),
                    rs["spec"]["replicas"].as_i64().unwrap_or(-1),
                    annotation(rs, "deployment.kubernetes.io/desired-replicas"),
                    annotation(rs, "deployment.kubernetes.io/max-replicas"),
                )
            })
            .collect::<BTreeSet<_>>()
    };
    // Old pods may still be terminating; the ReplicaSets are settled once rollout status is.
    let replicasets_after_update = replicasets(cloud);
    cloud.kubectl_ok(&["rollout", "undo", "deployment/cmp"], None);
    rollouts.push(last_line(rollout_status(cloud, "cmp", "90s")));
    let replicasets_after_undo = replicasets(cloud);
    let history = cloud.kubectl_ok(&["rollout", "history", "deployment/cmp"], None);
    let history = history
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    let named_by_hash = items(cloud, "replicasets", "app=cmp").iter().all(|rs| {
        let hash = rs["metadata"]["labels"]["pod-template-hash"]
            .as_str()
            .unwrap_or("?");
        rs["metadata"]["name"] == format!("cmp-{hash}").as_str()
            && rs["spec"]["selector"]["matchLabels"]["pod-template-hash"] == hash
    });
    let d = deployment(cloud, "cmp");
    let n = |field: &str| d["status"][field].as_i64().unwrap_or(0);
    let status = (
        n("replicas"),
        n("updatedReplicas"),
        n("readyReplicas"),
        n("availableReplicas"),
        n("unavailableReplicas"),
        d["status"]["observedGeneration"] == d["metadata"]["generation"],
        annotation(&d, "deployment.kubernetes.io/revision"),
    );
    let conditions = d["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("status"), s("reason"))
        })
        .collect();
    let events = json(&cloud.kubectl_ok(&["get", "events", "-o", "json"], None));
    let reasons = |kind: &str| {
        events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["involvedObject"]["kind"] == kind
                    && e["involvedObject"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("cmp"))
            })
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let deployment_messages = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["involvedObject"]["kind"] == "Deployment" && e["involvedObject"]["name"] == "cmp"
        })
        .filter_map(|e| e["message"].as_str())
        .map(|m| {
            let m = m.trim_start_matches("(combined from similar events): ");
            m.split(' ')
                .map(|w| {
                    if w.starts_with("cmp-") {
                        "RS"
                    } else if !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()) {
                        "N"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    Observed {
        deployment_messages,
        rollouts,
        named_by_hash,
        replicasets_after_update,
        replicasets_after_undo,
        history,
        status,
        conditions,
        deployment_events: reasons("Deployment"),
        replicaset_events: reasons("ReplicaSet"),
    }
}

#[test]
fn the_same_kubectl_sequence_looks_the_same_as_on_kube_controller_manager() {
    use integration::cluster::{ClusterOptions, KubeCluster};

    let embedded = {
        let s = Setup::start();
        let started = Instant::now();
        let observed = compare_sequence(&s.cloud, "edge-1", &|| s.edge.log());
        eprintln!("embedded sequence: {:?}", started.elapsed());
        observed
    };

    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(tmp.path(), &ClusterOptions::default());
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let net = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    import_second_image(&containerd);
    let cloud = Cloud::start_kube(
        tmp.path(),
        &cluster,
        &credentials,
        net.host_ip().into(),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let edge = integration::join_and_run_in(
        &net,
        &cloud,
        &tmp.path().join("edge"),
        "edge-k",
        &["--cri-endpoint", &containerd.endpoint],
    );
    assert!(
        eventually(Duration::from_secs(30), || cloud.node_ready("edge-k")
            == "True"),
        "edge-k not Ready in the cluster; edge log:\n{}",
        tail(&edge.log(), 30)
    );
    let started = Instant::now();
    let kube = compare_sequence(&cloud, "edge-k", &|| edge.log());
    eprintln!("kube-controller-manager sequence: {:?}", started.elapsed());
    eprintln!("observed on both: {kube:#?}");
    assert_eq!(
        embedded, kube,
        "embedded (left) and kube-controller-manager (right) differ"
    );
    // Not equal by being empty: the sequence showed what it should.
    assert_eq!(kube.rollouts.len(), 4);
    assert!(
        kube.rollouts
            .iter()
            .all(|l| l.contains("successfully rolled out")),
        "{:?}",
        kube.rollouts
    );
    assert!(kube.named_by_hash);
    assert_eq!(kube.history, ["2", "3"]);
    assert!(
        kube.replicasets_after_undo
            .iter()
            .any(|rs| rs.0 == "3" && rs.1 == "1" && rs.2 == 3)
    );
    assert!(
        kube.deployment_messages
            .contains("Scaled down replica set RS from N to N"),
        "{:?}",
        kube.deployment_messages
    );
    assert!(
        kube.deployment_events.contains("ScalingReplicaSet"),
        "{:?}",
        kube.deployment_events
    );
    assert!(
        kube.replicaset_events.contains("SuccessfulCreate"),
        "{:?}",
        kube.replicaset_events
    );
    drop(edge);
}
