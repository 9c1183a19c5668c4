//! Kubelet-style status reconciliation with the embedded control plane: a pod status that
//! someone else changes in the API is written back from the edge's truth while the edge is
//! connected, also after cloudcore restarted and remembered nothing (the edge resends its last
//! statuses). The same against a real control plane is in `kube_mode.rs`.
//!
//! Needs root and Debian's containerd, runc, containernetworking-plugins and busybox-static
//! (`.ci/run` installs them); without them the tests fail saying what is missing.

use std::time::{Duration, Instant};

use integration::{Cloud, Containerd, Edge, eventually};
use serde_json::Value;

/// A status changed by someone else is the edge's again within this long.
const WRITTEN_BACK_WITHIN: Duration = Duration::from_secs(10);

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn pod_yaml(node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: steady
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {image}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]
"#,
        image = integration::BUSYBOX
    )
}

/// Sets the pod's conditions to a lone `Ready=False` through the status subresource, as a
/// controller or a user could, and waits until the edge's status is back; returns how long
/// that took.
fn overwrite_and_wait(cloud: &Cloud, edge: &Edge) -> Duration {
    let patch = r#"{"status":{"conditions":[{"type":"Ready","status":"False","reason":"SetBySomeoneElse"}]}}"#;
    cloud.kubectl_ok(
        &[
            "patch",
            "pod",
            "steady",
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        ],
        None,
    );
    let changed = Instant::now();
    let pod = cloud.wait_pod(
        "steady",
        WRITTEN_BACK_WITHIN,
        "the edge's Ready=True written back",
        |p| {
            ready(p)
                && p["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "ContainersReady"))
        },
        || format!("cloudcore log:\n{}\nedge log:\n{}", cloud.log(), edge.log()),
    );
    assert_eq!(pod["status"]["phase"], "Running");
    changed.elapsed()
}

#[test]
fn a_status_changed_by_someone_else_is_written_back_also_after_a_cloud_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let mut cloud = Cloud::start(tmp.path(), &[]);
    let edge_dir = tmp.path().join("edge");
    let edge = integration::join_and_run(
        &cloud,
        &edge_dir,
        "rec-1",
        &["--cri-endpoint", &containerd.endpoint],
    );
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(&pod_yaml("rec-1")));
    cloud.wait_pod("steady", Duration::from_secs(30), "Ready", ready, || {
        edge.log()
    });

    // Past the moment after the session's start when drift is written back anyway: this
    // change is seen through the watch.
    std::thread::sleep(Duration::from_secs(2));
    let took = overwrite_and_wait(&cloud, &edge);
    eprintln!("written back {took:?} after the change");
    assert!(
        cloud.metric("cloudcore_status_reasserted_total") >= 1.0,
        "the write-back is counted"
    );

    // A restarted cloudcore knows no truth until the edge resends its last statuses.
    cloud.restart();
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "edge did not reconnect: {}",
        edge.log()
    );
    let took = overwrite_and_wait(&cloud, &edge);
    eprintln!("after a cloud restart: written back {took:?} after the change");
    // The resend changed nothing that was already right: the first writes after the restart
    // found the API holding the edge's status.
    assert!(
        cloud.metric("cloudcore_status_unchanged_total") >= 1.0,
        "the resent status equal to the API's was not written again"
    );
    drop(edge);
    drop(containerd);
}
