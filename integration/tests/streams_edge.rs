//! The edge's side of issue 13 with real parts: a private containerd on a non-default socket,
//! real cloudcore (embedded control plane), real edgecore, real `kubectl`. `edgecore ctl` finds
//! the runtime the daemon runs with. (The streams themselves are driven through kubectl once
//! the API front-ends exist; their edge half is unit-tested in `edgecore::streams`.)

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use integration::{Cloud, Containerd, Edge, eventually, join};

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: ticker
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "while true; do echo tick; sleep 1; done"]
"#;

/// `edgecore ctl exec` on `dir`, with the environment's endpoint removed so only the flag
/// (if any) and the data dir count.
fn ctl_exec(dir: &Path, flag: Option<&str>, command: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(integration::bin("edgecore"));
    cmd.env_remove("EDGECORE_CRI_ENDPOINT")
        .args(["ctl", "exec", "ticker", "--data-dir"])
        .arg(dir);
    if let Some(endpoint) = flag {
        cmd.args(["--cri-endpoint", endpoint]);
    }
    cmd.arg("--").args(command).output().expect("ctl exec")
}

#[test]
fn ctl_exec_uses_the_cri_endpoint_the_daemon_runs_with() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    assert_ne!(containerd.endpoint, edgecore::cri::DEFAULT_ENDPOINT);
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let edge_dir = tmp.path().join("edge-1");
    let out = join(&edge_dir, &token, "edge-1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Joined but never run: nothing says which runtime to use.
    let out = ctl_exec(&edge_dir, None, &["true"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("runtime.json does not exist"), "{stderr}");
    assert!(stderr.contains("--cri-endpoint"), "{stderr}");

    let edge = Edge::start_with(&edge_dir, &["--cri-endpoint", &containerd.endpoint]);
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "{}",
        edge.log()
    );
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(POD));
    cloud.wait_pod(
        "ticker",
        Duration::from_secs(60),
        "running",
        |p| p["status"]["phase"] == "Running",
        || format!("edge log:\n{}", edge.log()),
    );

    // No flag: the daemon's endpoint, from DIR/runtime.json.
    let out = ctl_exec(&edge_dir, None, &["sh", "-c", "echo hi; exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(edge_dir.join("runtime.json")).expect("runtime.json"),
    )
    .expect("json");
    assert_eq!(record["criEndpoint"], containerd.endpoint.as_str());

    // The flag still wins over the record.
    let missing = format!("unix://{}/nothing.sock", tmp.path().display());
    let out = ctl_exec(&edge_dir, Some(&missing), &["true"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ListContainers"), "{stderr}");
    let out = ctl_exec(&edge_dir, Some(&containerd.endpoint), &["echo", "flag"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "flag\n");
    drop(edge);
}
