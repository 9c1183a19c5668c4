//! Service-account tokens with the embedded control plane, end to end through a real
//! containerd: the embedded API issues no tokens, so a pod that declares a projected
//! `serviceAccountToken` source stays ContainerCreating with the cloud's reason, while a pod
//! without one runs. (Tokens from a real cluster are checked against its API server by hand,
//! docs/tokens.md, until the kube-mode harness exists.) Needs root, like `pods.rs`.

use std::time::Duration;

use integration::{Cloud, Containerd, eventually};

const POD_WITH_TOKEN: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: wants-token}
spec:
  nodeName: edge-1
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["/bin/busybox", "sleep", "3600"]
    volumeMounts: [{name: vault, mountPath: /var/run/secrets/tokens}]
  volumes:
  - name: vault
    projected:
      sources:
      - serviceAccountToken: {path: vault-token, audience: vault, expirationSeconds: 600}
"#;

#[test]
fn embedded_mode_refuses_tokens_and_the_pod_says_why() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let cloud = Cloud::start(tmp.path(), &[]);
    let edge_dir = tmp.path().join("edge-1");
    let edge = integration::join_and_run(
        &cloud,
        &edge_dir,
        "edge-1",
        &["--cri-endpoint", &containerd.endpoint],
    );

    cloud.kubectl_ok(&["apply", "-f", "-"], Some(POD_WITH_TOKEN));
    let pod = cloud.wait_pod(
        "wants-token",
        Duration::from_secs(30),
        "the embedded refusal in the status",
        |pod| {
            pod["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot issue service-account tokens"))
        },
        || format!("edge log:\n{}", edge.log()),
    );
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(pod["status"]["reason"], "ContainerCreating");
    assert_eq!(
        pod["status"]["message"],
        "volume \"vault\": no token for service account default/default (audience \"vault\"): \
         the cloud answered: the embedded control plane cannot issue service-account tokens"
    );
    assert!(
        cloud.metric("cloudcore_token_refusals_total{reason=\"not_supported\"}") >= 1.0,
        "{}",
        cloud.metrics()
    );
    let volume = edge_dir.join(format!(
        "pods/{}/volumes/kubernetes.io~projected/vault",
        pod["metadata"]["uid"].as_str().unwrap_or_default()
    ));
    assert!(!volume.join("vault-token").exists(), "nothing is mounted");

    // Deleting it works as for any pod that never started.
    cloud.kubectl_ok(&["delete", "pod", "wants-token", "--wait=false"], None);
    assert!(
        eventually(Duration::from_secs(30), || cloud
            .pod("wants-token")
            .is_none()),
        "{}",
        edge.log()
    );
}
