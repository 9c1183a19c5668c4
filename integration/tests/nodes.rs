//! Edges as Kubernetes Nodes on the embedded control plane: Ready while connected, Unknown
//! after the grace period without the tunnel, Ready again on reconnect; and the embedded
//! scheduler binding pods to matching Ready edges.

use std::process::Command;
use std::time::{Duration, Instant};

use integration::{Cloud, Edge, bin, eventually};

fn kubectl_text(cloud: &Cloud, args: &[&str]) -> String {
    let out = cloud.kubectl(args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ready(cloud: &Cloud, node: &str) -> String {
    kubectl_text(
        cloud,
        &[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
    )
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
        eventually(Duration::from_secs(10), || ready(&cloud, "gw-1") == "True"),
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
    let stopped = Instant::now();
    assert!(
        eventually(grace + Duration::from_secs(10), || ready(&cloud, "gw-1")
            == "Unknown"),
        "Ready did not become Unknown within grace + 10 s; cloud log:\n{}",
        cloud.log()
    );
    assert!(
        stopped.elapsed() >= grace,
        "not before the grace period ({:?})",
        stopped.elapsed()
    );

    let _edge = Edge::start(&dir);
    let restarted = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || ready(&cloud, "gw-1") == "True"),
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
    assert!(eventually(Duration::from_secs(10), || ready(
        &cloud, "gw-a"
    ) == "True"
        && ready(&cloud, "gw-b") == "True"));

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
