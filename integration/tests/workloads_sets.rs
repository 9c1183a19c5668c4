//! DaemonSets and StatefulSets in the embedded control plane: real cloudcore, real edges with
//! their own containerd each, real `kubectl` (docs/workloads.md, "DaemonSets and
//! StatefulSets"). One DaemonSet's history is also compared with the real control plane's.
//! Needs root and Debian's containerd, runc, containernetworking-plugins and busybox-static
//! (`.ci/run` installs them), and the reference control plane for the comparison; without them
//! the tests fail saying what is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, Containerd, Edge, bin, eventually, join_and_run};
use serde_json::Value;

const AGENT: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  updateStrategy: {type: RollingUpdate}
  template:
    metadata: {labels: {app: agent}}
    spec:
      nodeSelector: {sets: agent}
      terminationGracePeriodSeconds: 2
      containers:
      - name: agent
        image: localhost/edge/busybox:1
        command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]
"#;

const DB: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  replicas: 3
  serviceName: db
  updateStrategy: {type: RollingUpdate}
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: db
        image: localhost/edge/busybox:1
        command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]
"#;

const CACHE: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: cache}
spec:
  replicas: 1
  serviceName: cache
  selector: {matchLabels: {app: cache}}
  template:
    metadata: {labels: {app: cache}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: cache
        image: localhost/edge/busybox:1
        command: ["sh", "-c", "trap 'exit 0' TERM; echo kept > /data/file; while true; do sleep 0.2; done"]
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
"#;

/// `edgecore join` with node labels (the harness' join has none).
fn join_labelled(cloud: &Cloud, dir: &Path, node: &str, labels: &str) {
    let token = cloud.token(&[]);
    let out = Command::new(bin("edgecore"))
        .args(["join", "--cloud", &token.cloud, "--token", &token.token])
        .args(["--ca-hash", &token.ca_hash, "--node-name", node])
        .args(["--labels", labels, "--data-dir"])
        .arg(dir)
        .output()
        .expect("edgecore join");
    assert!(
        out.status.success(),
        "join {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn items(cloud: &Cloud, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let text = cloud.kubectl_ok(&all, None);
    let list: Value = serde_json::from_str(&text).expect("kubectl json");
    list["items"].as_array().cloned().unwrap_or_default()
}

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn label<'a>(object: &'a Value, key: &str) -> &'a str {
    object["metadata"]["labels"][key]
        .as_str()
        .unwrap_or_default()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// The DaemonSet's live pods by node (the node the pod is bound or pinned to).
fn agents_by_node(cloud: &Cloud) -> BTreeMap<String, Vec<Value>> {
    let mut by_node: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for pod in items(cloud, &["pods", "-l", "app=agent"]) {
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let node = pod["spec"]["nodeName"]
            .as_str()
            .unwrap_or("<unbound>")
            .to_string();
        by_node.entry(node).or_default().push(pod);
    }
    by_node
}

/// Waits until each node in `nodes` runs exactly one Ready agent of `hash` (any hash if
/// empty) and no other node runs one.
fn wait_agents(cloud: &Cloud, nodes: &[&str], hash: &str, within: Duration, edges: &[&Edge]) {
    let want: BTreeSet<String> = nodes.iter().map(|s| s.to_string()).collect();
    let mut last = BTreeMap::new();
    let ok = eventually(within, || {
        last = agents_by_node(cloud);
        last.keys().cloned().collect::<BTreeSet<_>>() == want
            && last.values().all(|pods| {
                pods.len() == 1
                    && ready(&pods[0])
                    && (hash.is_empty() || label(&pods[0], "controller-revision-hash") == hash)
            })
    });
    let logs: Vec<String> = edges.iter().map(|e| e.log()).collect();
    assert!(
        ok,
        "agents should run on {want:?} (hash {hash:?}), found {:#?}\ncloud log:\n{}\nedge logs:\n{}",
        last.iter()
            .map(|(n, ps)| (
                n,
                ps.iter()
                    .map(|p| (name(p), ready(p), label(p, "controller-revision-hash")))
                    .collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>(),
        cloud.log(),
        logs.join("\n---\n")
    );
}

/// Polls while a rollout runs until `done`, and returns the fewest nodes seen with a Ready
/// agent at once.
fn fewest_ready_during(
    cloud: &Cloud,
    within: Duration,
    mut done: impl FnMut(&BTreeMap<String, Vec<Value>>) -> bool,
) -> usize {
    let deadline = Instant::now() + within;
    let mut fewest = usize::MAX;
    loop {
        let by_node = agents_by_node(cloud);
        let up = by_node
            .values()
            .filter(|pods| pods.iter().any(ready))
            .count();
        fewest = fewest.min(up);
        if done(&by_node) {
            return fewest;
        }
        assert!(
            Instant::now() < deadline,
            "rollout did not finish: {by_node:#?}\n{}",
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn daemonset_runs_on_matching_edges_follows_them_and_rolls_one_at_a_time() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let runtimes: Vec<Containerd> = (1..=3)
        .map(|i| Containerd::start(&tmp.path().join(format!("containerd-{i}"))))
        .collect();
    let cloud = Cloud::start(tmp.path(), &["--node-grace-period", "5s"]);
    let cri = |i: usize| vec!["--cri-endpoint", runtimes[i].endpoint.as_str()];
    let edge1 = join_and_run(&cloud, &tmp.path().join("edge-1"), "edge-1", &cri(0));
    let edge2 = join_and_run(&cloud, &tmp.path().join("edge-2"), "edge-2", &cri(1));
    // A node that does not match: it must never get a pod (it has no runtime at all).
    let other = join_and_run(&cloud, &tmp.path().join("edge-9"), "edge-9", &[]);
    cloud.kubectl_ok(&["label", "node", "edge-1", "edge-2", "sets=agent"], None);

    cloud.kubectl_ok(&["apply", "-f", "-"], Some(AGENT));
    wait_agents(
        &cloud,
        &["edge-1", "edge-2"],
        "",
        Duration::from_secs(60),
        &[&edge1, &edge2],
    );
    let first_hash = label(
        &agents_by_node(&cloud)["edge-1"][0],
        "controller-revision-hash",
    )
    .to_string();
    let ds: Value =
        serde_json::from_str(&cloud.kubectl_ok(&["get", "ds", "agent", "-o", "json"], None))
            .expect("ds");
    let pod = &agents_by_node(&cloud)["edge-2"][0];
    assert_eq!(
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchFields"][0]["values"],
        serde_json::json!(["edge-2"]),
        "pinned to its node: {pod}"
    );
    assert!(
        pod["spec"]["tolerations"].as_array().is_some_and(|ts| ts
            .iter()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable"
                && t["effect"] == "NoExecute"
                && t["tolerationSeconds"].is_null())),
        "tolerates unreachable for good: {pod}"
    );
    // Status, as `kubectl rollout status` reads it.
    let status = cloud.kubectl_ok(
        &["rollout", "status", "daemonset/agent", "--timeout=30s"],
        None,
    );
    assert!(status.contains("successfully rolled out"), "{status}");
    eventually(Duration::from_secs(10), || {
        let ds: Value =
            serde_json::from_str(&cloud.kubectl_ok(&["get", "ds", "agent", "-o", "json"], None))
                .expect("ds");
        ds["status"]["desiredNumberScheduled"] == 2
            && ds["status"]["numberReady"] == 2
            && ds["status"]["numberAvailable"] == 2
    });
    let ds_now: Value =
        serde_json::from_str(&cloud.kubectl_ok(&["get", "ds", "agent", "-o", "json"], None))
            .expect("ds");
    for (field, want) in [
        ("desiredNumberScheduled", 2),
        ("currentNumberScheduled", 2),
        ("numberReady", 2),
        ("numberAvailable", 2),
        ("updatedNumberScheduled", 2),
        ("numberMisscheduled", 0),
    ] {
        assert_eq!(
            ds_now["status"][field].as_i64().unwrap_or(0),
            want,
            "{field}: {}",
            ds_now["status"]
        );
    }
    assert_eq!(
        ds_now["status"]["observedGeneration"],
        ds["metadata"]["generation"]
    );
    let events = cloud.kubectl_ok(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=agent",
            "-o",
            "json",
        ],
        None,
    );
    let events: Value = serde_json::from_str(&events).expect("events");
    assert!(
        events["items"]
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["reason"] == "SuccessfulCreate"
                && e["source"]["component"] == "daemonset-controller"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Created pod: agent-")))),
        "{events}"
    );

    // A newly joined matching edge gets its pod.
    let dir4 = tmp.path().join("edge-4");
    join_labelled(&cloud, &dir4, "edge-4", "sets=agent");
    let mut edge4 = Edge::start_with(&dir4, &cri(2));
    wait_agents(
        &cloud,
        &["edge-1", "edge-2", "edge-4"],
        &first_hash,
        Duration::from_secs(60),
        &[&edge1, &edge2, &edge4],
    );

    // A node that stops matching loses its pod.
    cloud.kubectl_ok(&["label", "node", "edge-2", "sets-"], None);
    wait_agents(
        &cloud,
        &["edge-1", "edge-4"],
        &first_hash,
        Duration::from_secs(60),
        &[&edge1, &edge4],
    );

    // The autonomy rule: edge-4 stops reporting; a rolling update replaces edge-1's pod and
    // leaves edge-4's alone until edge-4 is back.
    let old_uid = agents_by_node(&cloud)["edge-4"][0]["metadata"]["uid"].clone();
    edge4.stop();
    assert!(
        eventually(Duration::from_secs(30), || cloud.node_ready("edge-4")
            == "Unknown"),
        "edge-4 did not become Unknown"
    );
    cloud.kubectl_ok(&["set", "env", "daemonset/agent", "REV=2"], None);
    let ds: Value =
        serde_json::from_str(&cloud.kubectl_ok(&["get", "ds", "agent", "-o", "json"], None))
            .expect("ds");
    let mut second_hash = String::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            let pods = agents_by_node(&cloud);
            let Some(pod) = pods.get("edge-1").and_then(|p| p.first()) else {
                return false;
            };
            second_hash = label(pod, "controller-revision-hash").to_string();
            ready(pod) && second_hash != first_hash
        }),
        "edge-1 was not updated: {:#?}",
        agents_by_node(&cloud)
    );
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let pods = agents_by_node(&cloud);
        let kept = &pods.get("edge-4").expect("edge-4 keeps its pod")[0];
        assert_eq!(
            kept["metadata"]["uid"], old_uid,
            "edge-4's pod was replaced while it was away"
        );
        assert_eq!(label(kept, "controller-revision-hash"), first_hash);
        std::thread::sleep(Duration::from_millis(200));
    }
    let edge4 = Edge::start_with(&dir4, &cri(2));
    assert!(
        eventually(Duration::from_secs(15), || edge4.connected()),
        "{}",
        edge4.log()
    );
    wait_agents(
        &cloud,
        &["edge-1", "edge-4"],
        &second_hash,
        Duration::from_secs(90),
        &[&edge1, &edge4],
    );
    let env = &agents_by_node(&cloud)["edge-4"][0]["spec"]["containers"][0]["env"];
    assert_eq!(env[0]["value"], "2", "{env}");
    assert!(ds["metadata"]["generation"].as_i64() > Some(1));

    // kubectl rollout history reads the ControllerRevisions.
    let history = cloud.kubectl_ok(&["rollout", "history", "daemonset/agent"], None);
    let numbers: Vec<&str> = history
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(numbers, vec!["1", "2"], "{history}");
    let one = cloud.kubectl_ok(
        &["rollout", "history", "daemonset/agent", "--revision=1"],
        None,
    );
    let two = cloud.kubectl_ok(
        &["rollout", "history", "daemonset/agent", "--revision=2"],
        None,
    );
    assert!(
        !one.contains("REV:") && two.contains("REV:"),
        "revision 1:\n{one}\nrevision 2:\n{two}"
    );
    let revisions = items(&cloud, &["controllerrevisions", "-l", "app=agent"]);
    assert_eq!(revisions.len(), 2, "{revisions:?}");
    for r in &revisions {
        assert_eq!(r["metadata"]["ownerReferences"][0]["kind"], "DaemonSet");
        assert_eq!(r["data"]["spec"]["template"]["$patch"], "replace");
        assert_eq!(
            name(r),
            format!("agent-{}", label(r, "controller-revision-hash"))
        );
    }

    // kubectl rollout undo goes back to revision 1's template, which becomes revision 3; the
    // rolling update replaces one node's pod at a time: never both down at once.
    let undo = cloud.kubectl_ok(&["rollout", "undo", "daemonset/agent"], None);
    assert!(undo.contains("rolled back"), "{undo}");
    let fewest = fewest_ready_during(&cloud, Duration::from_secs(90), |by_node| {
        by_node.len() == 2
            && by_node.values().all(|pods| {
                pods.len() == 1
                    && ready(&pods[0])
                    && label(&pods[0], "controller-revision-hash") == first_hash
            })
    });
    assert_eq!(
        fewest, 1,
        "one node at a time is updated (maxUnavailable 1)"
    );
    let history = cloud.kubectl_ok(&["rollout", "history", "daemonset/agent"], None);
    let numbers: Vec<&str> = history
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(numbers, vec!["2", "3"], "{history}");
    assert_ne!(first_hash, second_hash);
    assert!(other.connected());
    eprintln!("daemonset test took {:?}", started.elapsed());
}

/// The pods of `db` by ordinal name, with whether each is Ready and being deleted.
fn db_pods(cloud: &Cloud) -> BTreeMap<String, Value> {
    items(cloud, &["pods", "-l", "app=db"])
        .into_iter()
        .map(|p| (name(&p).to_string(), p))
        .collect()
}

#[test]
fn statefulset_starts_in_order_scales_down_from_the_top_and_rolls_from_the_top() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let cloud = Cloud::start(tmp.path(), &[]);
    let edge = join_and_run(
        &cloud,
        &tmp.path().join("edge-1"),
        "edge-1",
        &["--cri-endpoint", &containerd.endpoint],
    );

    cloud.kubectl_ok(&["apply", "-f", "-"], Some(DB));
    // OrderedReady: db-N exists only once db-(N-1) is Ready.
    let ok = eventually(Duration::from_secs(90), || {
        let pods = db_pods(&cloud);
        for n in 1..3 {
            if pods.contains_key(&format!("db-{n}")) {
                let below = pods.get(&format!("db-{}", n - 1));
                assert!(
                    below.is_some_and(ready),
                    "db-{n} exists before db-{} is Ready: {pods:#?}",
                    n - 1
                );
            }
        }
        pods.len() == 3 && pods.values().all(ready)
    });
    assert!(
        ok,
        "db did not start: {:#?}\n{}\n{}",
        db_pods(&cloud),
        cloud.log(),
        edge.log()
    );
    let pods = db_pods(&cloud);
    assert_eq!(
        pods.keys().cloned().collect::<Vec<_>>(),
        vec!["db-0", "db-1", "db-2"]
    );
    let db1 = &pods["db-1"];
    assert_eq!(db1["spec"]["hostname"], "db-1");
    assert_eq!(db1["spec"]["subdomain"], "db");
    assert_eq!(label(db1, "statefulset.kubernetes.io/pod-name"), "db-1");
    assert_eq!(label(db1, "apps.kubernetes.io/pod-index"), "1");
    let status = cloud.kubectl_ok(
        &["rollout", "status", "statefulset/db", "--timeout=30s"],
        None,
    );
    assert!(
        status.contains("roll out complete") || status.contains("rolling update complete"),
        "{status}"
    );
    let first = label(db1, "controller-revision-hash").to_string();
    assert!(first.starts_with("db-"), "the revision's name: {first}");

    // A rolling update goes from the highest ordinal down, one pod at a time.
    cloud.kubectl_ok(&["set", "env", "statefulset/db", "REV=2"], None);
    let mut order: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pods = db_pods(&cloud);
        let down = (0..3)
            .filter(|n| !pods.get(&format!("db-{n}")).is_some_and(ready))
            .count();
        assert!(down <= 1, "two pods down at once: {pods:#?}");
        for (name, pod) in &pods {
            let updated = label(pod, "controller-revision-hash") != first;
            if updated && !order.contains(name) {
                order.push(name.clone());
            }
        }
        if order.len() == 3 && pods.values().all(ready) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "update did not finish: {order:?} {pods:#?}\n{}",
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(order, vec!["db-2", "db-1", "db-0"]);
    let sts: Value =
        serde_json::from_str(&cloud.kubectl_ok(&["get", "sts", "db", "-o", "json"], None))
            .expect("sts");
    assert!(
        eventually(Duration::from_secs(10), || {
            let sts: Value =
                serde_json::from_str(&cloud.kubectl_ok(&["get", "sts", "db", "-o", "json"], None))
                    .expect("sts");
            let s = &sts["status"];
            s["currentRevision"] == s["updateRevision"]
                && s["updatedReplicas"] == 3
                && s["readyReplicas"] == 3
                && s["currentReplicas"] == 3
        }),
        "{}",
        sts["status"]
    );
    let history = cloud.kubectl_ok(&["rollout", "history", "statefulset/db"], None);
    let numbers: Vec<&str> = history
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(numbers, vec!["1", "2"], "{history}");

    // Scaling down removes the highest ordinal first, one at a time.
    cloud.kubectl_ok(&["scale", "statefulset/db", "--replicas=1"], None);
    let ok = eventually(Duration::from_secs(60), || {
        let pods = db_pods(&cloud);
        if pods
            .get("db-1")
            .is_some_and(|p| !p["metadata"]["deletionTimestamp"].is_null())
        {
            assert!(
                !pods.contains_key("db-2"),
                "db-1 is being deleted while db-2 exists: {pods:#?}"
            );
        }
        assert!(pods.contains_key("db-0"), "db-0 stays: {pods:#?}");
        pods.len() == 1
    });
    assert!(ok, "db did not scale down: {:#?}", db_pods(&cloud));
    let events = cloud.kubectl_ok(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=db",
            "-o",
            "json",
        ],
        None,
    );
    assert!(
        events.contains("delete Pod db-2 in StatefulSet db successful"),
        "{events}"
    );
    assert!(
        events.contains("create Pod db-0 in StatefulSet db successful"),
        "{events}"
    );

    // volumeClaimTemplates: accepted, served as emptyDir volumes, and said so in an Event.
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(CACHE));
    let ok = eventually(Duration::from_secs(60), || {
        cloud.pod("cache-0").is_some_and(|p| ready(&p))
    });
    assert!(
        ok,
        "cache-0 did not start: {:?}\n{}",
        cloud.pod("cache-0"),
        cloud.log()
    );
    let pod = cloud.pod("cache-0").expect("cache-0");
    assert_eq!(
        pod["spec"]["volumes"],
        serde_json::json!([{"name": "data", "emptyDir": {}}]),
        "{pod}"
    );
    let events = cloud.kubectl_ok(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=cache",
            "-o",
            "json",
        ],
        None,
    );
    let events: Value = serde_json::from_str(&events).expect("events");
    assert!(
        events["items"].as_array().is_some_and(|es| es
            .iter()
            .any(|e| e["reason"] == "VolumeClaimTemplatesNotSupported"
                && e["type"] == "Warning"
                && e["message"].as_str().is_some_and(|m| m.contains("data")))),
        "{events}"
    );
    eprintln!("statefulset test took {:?}", started.elapsed());
}

/// The same kubectl sequence on a DaemonSet that matches no node and a StatefulSet of no
/// replicas, against the embedded API and the real control plane: the same revision history,
/// the same template per revision, the same shape of ControllerRevisions.
#[test]
fn set_history_matches_the_real_control_plane() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(
        &tmp.path().join("k8s"),
        &ClusterOptions {
            components: Components::All,
            ..ClusterOptions::default()
        },
    );
    let cloud = Cloud::start(&tmp.path().join("cloud"), &[]);
    // `set` is `daemonset/agent` or `statefulset/db`, made from `manifest`.
    let run = |kubectl: &dyn Fn(&[&str], Option<&str>) -> String,
               set: &str,
               manifest: &str|
     -> (Vec<String>, Vec<Value>) {
        let (resource, set_name) = set.split_once('/').expect("kind/name");
        let printed = format!("{resource}.apps/{set_name}");
        let kind = if resource == "daemonset" {
            "DaemonSet"
        } else {
            "StatefulSet"
        };
        let mut seen = Vec::new();
        kubectl(&["apply", "-f", "-"], Some(manifest));
        let wait_history = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = kubectl(&["rollout", "history", set], None);
                if text
                    .lines()
                    .skip(2)
                    .filter(|l| !l.trim().is_empty())
                    .count()
                    == n
                {
                    return text;
                }
                assert!(
                    Instant::now() < deadline,
                    "history never had {n} revisions: {text}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        seen.push(wait_history(1));
        kubectl(&["set", "env", set, "REV=2"], None);
        seen.push(wait_history(2));
        // The template per revision; the lines defaults cannot change (the real API server
        // fills in more of the template than ours may).
        for revision in ["--revision=1", "--revision=2"] {
            let text = kubectl(&["rollout", "history", set, revision], None);
            let kept: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    ["Labels:", "Image:", "REV:", printed.as_str()]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .collect();
            seen.push(kept.join("\n"));
        }
        seen.push(kubectl(&["rollout", "undo", set, "--to-revision=1"], None));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = kubectl(&["rollout", "history", set], None);
            let numbers: Vec<&str> = text
                .lines()
                .skip(2)
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            if numbers == ["2", "3"] {
                seen.push(text);
                break;
            }
            assert!(Instant::now() < deadline, "undo did not renumber: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let list: Value = serde_json::from_str(&kubectl(
            &["get", "controllerrevisions", "-o", "json"],
            None,
        ))
        .expect("json");
        let mut shapes: Vec<Value> = list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["metadata"]["ownerReferences"][0]["kind"] == kind)
            .map(|r| {
                let mut labels: Vec<String> = r["metadata"]["labels"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
                labels.sort();
                let owner = &r["metadata"]["ownerReferences"][0];
                let named = ["controller-revision-hash", "controller.kubernetes.io/hash"]
                    .iter()
                    .any(|l| name(&r) == format!("{set_name}-{}", label(&r, l)));
                serde_json::json!({
                    "revision": r["revision"],
                    "labels": labels,
                    "owner": [owner["apiVersion"], owner["kind"], owner["name"], owner["controller"], owner["blockOwnerDeletion"]],
                    "named": named,
                    "data_keys": r["data"].as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()),
                    "patch": r["data"]["spec"]["template"]["$patch"],
                    "env": r["data"]["spec"]["template"]["spec"]["containers"][0]["env"],
                })
            })
            .collect();
        shapes.sort_by_key(|s| s["revision"].as_i64());
        (seen, shapes)
    };
    let db = DB.replace("replicas: 3", "replicas: 0");
    let nowhere = AGENT.replace("sets: agent", "sets: nowhere");
    for (set, manifest) in [
        ("daemonset/agent", nowhere.as_str()),
        ("statefulset/db", db.as_str()),
    ] {
        let real = run(
            &|args, stdin| cluster.kubectl_ok(args, stdin),
            set,
            manifest,
        );
        let ours = run(&|args, stdin| cloud.kubectl_ok(args, stdin), set, manifest);
        eprintln!("real control plane, {set}: {real:#?}");
        assert_eq!(real.1.len(), 2, "two revisions after the undo: {real:?}");
        assert!(
            real.0[3].contains("REV:") && !real.0[2].contains("REV:"),
            "{real:?}"
        );
        assert_eq!(
            ours.0, real.0,
            "{set}: kubectl output differs from the real control plane's"
        );
        assert_eq!(
            ours.1, real.1,
            "{set}: ControllerRevisions differ from the real control plane's"
        );
    }
}
