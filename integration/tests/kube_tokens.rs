//! Service-account tokens for edge pods against a real Kubernetes control plane (v1.36.2 from
//! `../shared/k8s`, started fresh by [`KubeCluster`]), with cloudcore on the credentials of its
//! ServiceAccount bound to exactly the shipped RBAC: a pod given the default `kube-api-access`
//! volume by the ServiceAccount admission plugin finds a token in its volume on the edge that
//! the API server's TokenReview accepts as that pod's service account, and a pod with an
//! explicit short-lived projected token sees it replaced after the refresh point
//! (`edgecore run --token-refresh-max 5s`; the API server's minimum lifetime is 600 s).
//!
//! Needs root, containerd, runc, CNI plugins, busybox-static, etcd-server, xz-utils and
//! openssl (`.ci/run` installs them); without them the test fails saying what is missing.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::{Cloud, Containerd, Edge, eventually, join};
use serde_json::{Value, json};

const NODE: &str = "edge-tokens";
/// The refresh cap given to edgecore, so that a refresh happens within the test.
const REFRESH_MAX: &str = "5s";

fn pod(name: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: {NODE}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {image}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]
{extra_spec}"#,
        image = integration::BUSYBOX
    )
}

/// An explicit projected token: audience `vault`, the API server's minimum lifetime.
const VAULT_TOKEN: &str = r#"    volumeMounts:
    - name: vault
      mountPath: /var/run/secrets/vault
  volumes:
  - name: vault
    projected:
      sources:
      - serviceAccountToken:
          path: token
          audience: vault
          expirationSeconds: 600
"#;

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the API server's TokenReview says of `token` (for `audiences`, if given).
fn review(cluster: &KubeCluster, token: &str, audiences: &[&str]) -> Value {
    let mut spec = json!({"token": token});
    if !audiences.is_empty() {
        spec["audiences"] = json!(audiences);
    }
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": spec,
    });
    let out = cluster.kubectl_ok(
        &["create", "-o", "json", "-f", "-"],
        Some(&request.to_string()),
    );
    serde_json::from_str::<Value>(&out).expect("TokenReview JSON")["status"].clone()
}

/// The token file of projected volume `volume` of pod `uid` on the edge.
fn token_file(edge_dir: &Path, uid: &str, volume: &str) -> PathBuf {
    edge_dir
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~projected")
        .join(volume)
        .join("token")
}

#[test]
fn edge_pods_get_bound_tokens_the_api_server_accepts_and_fresh_ones_after_the_refresh_point() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(
        tmp.path(),
        &ClusterOptions {
            components: Components::All,
            ..ClusterOptions::default()
        },
    );
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let cloud = Cloud::start_kube(
        tmp.path(),
        &cluster,
        &credentials,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let token = cloud.token(&[]);
    let edge_dir = tmp.path().join("edge");
    let out = join(&edge_dir, &token, NODE);
    assert!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edge = Edge::start_with(
        &edge_dir,
        &[
            "--cri-endpoint",
            &containerd.endpoint,
            "--token-refresh-max",
            REFRESH_MAX,
        ],
    );
    let context = || {
        format!(
            "cloudcore log (end):\n{}\nedge log (end):\n{}",
            tail(&cloud.log(), 40),
            tail(&edge.log(), 40)
        )
    };
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "edge did not connect\n{}",
        context()
    );

    // The admission plugin's kube-api-access volume: token, kube-root-ca.crt, namespace.
    cluster.kubectl_ok(&["apply", "-f", "-"], Some(&pod("api-client", "")));
    cluster.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&pod("vault-client", VAULT_TOKEN)),
    );
    let running = |name: &str| {
        cloud.wait_pod(
            name,
            Duration::from_secs(60),
            "Running",
            |p| p["status"]["phase"] == "Running",
            context,
        )
    };
    let api_client = running("api-client");
    let vault_client = running("vault-client");

    let uid = api_client["metadata"]["uid"].as_str().expect("uid");
    let volume = api_client["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .find(|n| n.starts_with("kube-api-access-"))
        .expect("the admission plugin added kube-api-access");
    let file = token_file(&edge_dir, uid, volume);
    let jwt = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", file.display(), context()));
    for other in ["ca.crt", "namespace"] {
        assert!(
            file.with_file_name(other).exists(),
            "{other} is in the volume"
        );
    }
    assert_eq!(
        std::fs::read_to_string(file.with_file_name("namespace")).expect("namespace"),
        "default"
    );
    let status = review(&cluster, &jwt, &[]);
    assert_eq!(status["authenticated"], true, "{status}");
    assert_eq!(
        status["user"]["username"], "system:serviceaccount:default:default",
        "{status}"
    );
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["api-client"]),
        "the token is bound to the pod: {status}"
    );
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([uid]),
        "{status}"
    );

    // The explicit short-lived token is replaced after the refresh point, atomically (the
    // file always holds a whole token the API server accepts).
    let uid = vault_client["metadata"]["uid"].as_str().expect("uid");
    let file = token_file(&edge_dir, uid, "vault");
    let first = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", file.display(), context()));
    let status = review(&cluster, &first, &["vault"]);
    assert_eq!(status["authenticated"], true, "{status}");
    assert_eq!(status["audiences"], json!(["vault"]), "{status}");
    let started = Instant::now();
    let mut fresh = None;
    while started.elapsed() < Duration::from_secs(30) {
        let now = std::fs::read_to_string(&file).expect("the token file stays");
        if now != first {
            fresh = Some(now);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let fresh = fresh.unwrap_or_else(|| {
        panic!(
            "the token was not refreshed within 30s (refresh cap {REFRESH_MAX})\n{}",
            context()
        )
    });
    println!(
        "token refreshed {:.1}s after the first was read",
        started.elapsed().as_secs_f64()
    );
    let status = review(&cluster, &fresh, &["vault"]);
    assert_eq!(status["authenticated"], true, "{status}");
    assert!(
        cloud.metric("cloudcore_tokens_issued_total") >= 3.0,
        "{}",
        cloud.metrics()
    );
    assert_eq!(
        cloud.metric("cloudcore_token_refusals_total{reason=\"api_error\"}"),
        0.0,
        "the shipped RBAC lets cloudcore create tokens"
    );
}
