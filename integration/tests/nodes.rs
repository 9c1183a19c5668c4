//! Edges as Kubernetes Nodes on the embedded control plane: Ready while connected, Unknown
//! after the grace period without the tunnel, Ready again on reconnect; and the embedded
//! scheduler binding pods to matching Ready edges.

use std::process::Command;
use std::time::{Duration, Instant};

use integration::{Cloud, Containerd, Edge, bin, eventually};

fn kubectl_text(cloud: &Cloud, args: &[&str]) -> String {
    let out = cloud.kubectl(args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn join_with_labels(cloud: &Cloud, dir: &std::path::Path, node: &str, labels: &str) {
    let token = cloud.token(&[]);
    let out = Command::new(bin("edgecore"))
        .args([
            "join",
            "--cloud",
            &token.cloud,
            "--token",
            &token.token,
            "--ca-hash",
            &token.ca_hash,
        ])
        .args(["--node-name", node, "--labels", labels])
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("edgecore join");
    assert!(
        out.status.success(),
        "join {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn edge_node_is_ready_then_unknown_after_the_grace_period_then_ready_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let grace = Duration::from_secs(5);
    let cloud = Cloud::start(tmp.path(), &["--node-grace-period", "5s"]);
    let dir = tmp.path().join("gw-1");
    join_with_labels(&cloud, &dir, "gw-1", "zone=a,line=3");
    let mut edge = Edge::start(&dir);

    assert!(
        eventually(Duration::from_secs(10), || cloud.node_ready("gw-1")
            == "True"),
        "node never Ready; cloud log:\n{}",
        cloud.log()
    );
    let table = kubectl_text(&cloud, &["get", "nodes"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("gw-1") && l.contains(" Ready ") && l.contains("edge")),
        "kubectl get nodes shows the edge Ready with the edge role:\n{table}"
    );
    let labels = kubectl_text(
        &cloud,
        &["get", "node", "gw-1", "-o", "jsonpath={.metadata.labels}"],
    );
    for label in [
        "\"node-role.kubernetes.io/edge\":\"\"",
        "\"zone\":\"a\"",
        "\"line\":\"3\"",
    ] {
        assert!(labels.contains(label), "{label} in {labels}");
    }
    let lease = kubectl_text(
        &cloud,
        &[
            "get",
            "lease",
            "gw-1",
            "-n",
            "kube-node-lease",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    );
    assert_eq!(lease, "gw-1");

    edge.stop();
    // The grace period counts from the last lease renewal, which may be before the stop.
    let renewed = kubectl_text(
        &cloud,
        &[
            "get",
            "lease",
            "gw-1",
            "-n",
            "kube-node-lease",
            "-o",
            "jsonpath={.spec.renewTime}",
        ],
    );
    assert!(
        eventually(grace + Duration::from_secs(10), || cloud.node_ready("gw-1")
            == "Unknown"),
        "Ready did not become Unknown within grace + 10 s; cloud log:\n{}",
        cloud.log()
    );
    let unknown = node_json(&cloud, "gw-1");
    let silent = time_of(&condition(&unknown, "Ready")["lastTransitionTime"])
        - time_of(&serde_json::json!(renewed));
    // Whole seconds in the condition, microseconds in the lease.
    assert!(
        silent >= grace - Duration::from_secs(1),
        "Unknown before the grace period: {silent} after the last renewal"
    );

    let _edge = Edge::start(&dir);
    let restarted = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || cloud.node_ready("gw-1")
            == "True"),
        "Ready not True within 5 s of reconnecting"
    );
    eprintln!(
        "Ready again {:?} after edgecore restarted",
        restarted.elapsed()
    );
}

#[test]
fn pods_are_bound_to_a_matching_ready_edge_or_stay_pending_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let a = tmp.path().join("gw-a");
    let b = tmp.path().join("gw-b");
    join_with_labels(&cloud, &a, "gw-a", "zone=a");
    join_with_labels(&cloud, &b, "gw-b", "zone=b");
    let _ea = Edge::start(&a);
    let _eb = Edge::start(&b);
    assert!(eventually(Duration::from_secs(10), || cloud
        .node_ready("gw-a")
        == "True"
        && cloud.node_ready("gw-b") == "True"));

    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: in-zone-b}
spec:
  nodeSelector: {zone: b}
  containers: [{name: c, image: localhost/busybox:1}]
---
apiVersion: v1
kind: Pod
metadata: {name: nowhere}
spec:
  nodeSelector: {zone: mars}
  containers: [{name: c, image: localhost/busybox:1}]
"#;
    let out = cloud.kubectl_with_stdin(&["apply", "-f", "-"], Some(pods));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(
        eventually(Duration::from_secs(10), || {
            kubectl_text(
                &cloud,
                &["get", "pod", "in-zone-b", "-o", "jsonpath={.spec.nodeName}"],
            ) == "gw-b"
        }),
        "pod not bound to gw-b; cloud log:\n{}",
        cloud.log()
    );
    let scheduled = kubectl_text(
        &cloud,
        &[
            "get",
            "pod",
            "in-zone-b",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].status}",
        ],
    );
    assert_eq!(scheduled, "True");

    let reason = |field: &str| {
        kubectl_text(
            &cloud,
            &[
                "get",
                "pod",
                "nowhere",
                "-o",
                &format!("jsonpath={{.status.conditions[?(@.type==\"PodScheduled\")].{field}}}"),
            ],
        )
    };
    assert!(eventually(Duration::from_secs(10), || reason("reason")
        == "Unschedulable"));
    assert_eq!(reason("status"), "False");
    let message = reason("message");
    assert!(
        message.contains("0/2 nodes are available") && message.contains("node affinity/selector"),
        "{message}"
    );
    assert_eq!(
        kubectl_text(
            &cloud,
            &["get", "pod", "nowhere", "-o", "jsonpath={.spec.nodeName}"]
        ),
        ""
    );
    assert_eq!(
        kubectl_text(
            &cloud,
            &["get", "pod", "nowhere", "-o", "jsonpath={.status.phase}"]
        ),
        "Pending"
    );
}

/// `PRETTY_NAME` of this machine, as the Node must show it.
fn pretty_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

fn node_json(cloud: &Cloud, node: &str) -> serde_json::Value {
    serde_json::from_str(&cloud.kubectl_ok(&["get", "node", node, "-o", "json"], None))
        .expect("node json")
}

fn condition<'a>(node: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    node["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or(&serde_json::Value::Null)
}

fn time_of(value: &serde_json::Value) -> time::OffsetDateTime {
    let text = value.as_str().unwrap_or_default();
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| panic!("not an RFC 3339 time: {value}"))
}

const CONDITIONS: [&str; 4] = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"];

#[test]
fn edge_node_reports_like_a_kubelet_and_transition_times_follow_the_api() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let cloud = Cloud::start(tmp.path(), &["--node-grace-period", "5s"]);
    let dir = tmp.path().join("gw-k");
    join_with_labels(&cloud, &dir, "gw-k", "zone=k");
    let flags = [
        "--cri-endpoint",
        &containerd.endpoint,
        "--max-pods",
        "20",
        "--system-reserved",
        "cpu=100m,memory=100Mi,ephemeral-storage=1Gi",
    ];
    let mut edge = Edge::start_with(&dir, &flags);
    assert!(
        eventually(Duration::from_secs(10), || cloud.node_ready("gw-k")
            == "True"),
        "node never Ready; cloud log:\n{}",
        cloud.log()
    );

    let wide = cloud.kubectl_ok(&["get", "nodes", "-o", "wide"], None);
    let row = wide
        .lines()
        .find(|l| l.starts_with("gw-k "))
        .unwrap_or_else(|| panic!("no gw-k row:\n{wide}"));
    assert!(row.contains(&pretty_name()), "OS-IMAGE in:\n{wide}");
    assert!(
        row.contains("containerd://"),
        "CONTAINER-RUNTIME in:\n{wide}"
    );
    assert!(row.contains("127.0.0.1"), "INTERNAL-IP in:\n{wide}");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    assert!(row.contains(kernel.trim()), "KERNEL-VERSION in:\n{wide}");
    eprintln!("{wide}");

    let node = node_json(&cloud, "gw-k");
    let status = &node["status"];
    let info = &status["nodeInfo"];
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(info["osImage"], pretty_name());
    assert_eq!(info["operatingSystem"], "linux");
    assert_eq!(info["machineID"], read("/etc/machine-id"));
    assert_eq!(info["bootID"], read("/proc/sys/kernel/random/boot_id"));
    assert_eq!(info["systemUUID"], read("/sys/class/dmi/id/product_uuid"));
    assert_eq!(info["kernelVersion"], read("/proc/sys/kernel/osrelease"));
    let runtime = info["containerRuntimeVersion"].as_str().unwrap_or_default();
    assert!(
        runtime.starts_with("containerd://") && runtime.len() > "containerd://".len(),
        "{runtime}"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(status["capacity"]["cpu"], cpus.to_string());
    assert_eq!(
        status["allocatable"]["cpu"],
        format!("{}m", cpus * 1000 - 100)
    );
    assert_eq!(status["capacity"]["pods"], "20");
    assert_eq!(status["allocatable"]["pods"], "20");
    for resource in ["ephemeral-storage", "memory"] {
        let kib = |v: &serde_json::Value| -> u64 {
            v.as_str()
                .and_then(|s| s.strip_suffix("Ki"))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{resource}: {v}"))
        };
        let reserved = if resource == "memory" {
            100 * 1024
        } else {
            1024 * 1024
        };
        let capacity = kib(&status["capacity"][resource]);
        assert!(capacity > reserved, "{resource}: {capacity}Ki");
        assert_eq!(kib(&status["allocatable"][resource]), capacity - reserved);
    }
    assert_eq!(
        status["addresses"],
        serde_json::json!([{"type": "InternalIP", "address": "127.0.0.1"}])
    );
    assert_eq!(status["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250);
    let first = node.clone();
    for kind in CONDITIONS {
        let c = condition(&first, kind);
        let transition = time_of(&c["lastTransitionTime"]);
        assert!(transition.year() > 2000, "{kind}: {c}");
        time_of(&c["lastHeartbeatTime"]);
    }
    // The kubelet's reasons (this machine's disk may be nearly full, so either status).
    let disk = condition(&first, "DiskPressure");
    let want = if disk["status"] == "True" {
        "KubeletHasDiskPressure"
    } else {
        "KubeletHasNoDiskPressure"
    };
    assert_eq!(disk["reason"], want);

    // A restart is no transition: the times stay.
    edge.stop();
    let mut edge = Edge::start_with(&dir, &flags);
    assert!(eventually(Duration::from_secs(10), || edge.connected()));
    std::thread::sleep(Duration::from_secs(2));
    // ... neither at the connect write nor at the session's first full report (10 s later).
    let heartbeat =
        |node: &serde_json::Value| time_of(&condition(node, "Ready")["lastHeartbeatTime"]);
    let connected = heartbeat(&node_json(&cloud, "gw-k"));
    assert!(
        eventually(Duration::from_secs(20), || heartbeat(&node_json(
            &cloud, "gw-k"
        )) > connected),
        "no report after the connect write; edge log:\n{}",
        edge.log()
    );
    let again = node_json(&cloud, "gw-k");
    for kind in CONDITIONS {
        assert_eq!(
            condition(&again, kind)["lastTransitionTime"],
            condition(&first, kind)["lastTransitionTime"],
            "{kind} after a restart"
        );
    }

    // Gone past the grace period: all four Unknown, as the node-lifecycle controller does.
    edge.stop();
    assert!(
        eventually(Duration::from_secs(20), || {
            let node = node_json(&cloud, "gw-k");
            CONDITIONS
                .iter()
                .all(|kind| condition(&node, kind)["status"] == "Unknown")
        }),
        "conditions not all Unknown; cloud log:\n{}",
        cloud.log()
    );
    let lost = node_json(&cloud, "gw-k");
    let unknown_at = time_of(&condition(&lost, "Ready")["lastTransitionTime"]);

    // Back: each condition's transition is the return, not the edge's old time.
    let _edge = Edge::start_with(&dir, &flags);
    assert!(
        eventually(Duration::from_secs(10), || cloud.node_ready("gw-k")
            == "True"),
        "Ready not True after the return"
    );
    std::thread::sleep(Duration::from_secs(2));
    let back = node_json(&cloud, "gw-k");
    for kind in CONDITIONS {
        let c = condition(&back, kind);
        assert_ne!(c["status"], "Unknown", "{kind}: {c}");
        assert!(
            time_of(&c["lastTransitionTime"]) >= unknown_at,
            "{kind} keeps a transition time from before it went Unknown: {c}"
        );
    }
}

#[test]
fn bad_node_flags_exit_64_naming_the_flag() {
    for (flag, value) in [
        ("--system-reserved", "memory=lots"),
        ("--system-reserved", "gpu=1"),
        ("--max-pods", "0"),
    ] {
        let out = Command::new(bin("edgecore"))
            .args(["run", "--data-dir", "/nonexistent", flag, value])
            .output()
            .expect("edgecore run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}
