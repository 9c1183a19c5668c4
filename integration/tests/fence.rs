//! Lost, restored or mistyped cloud state never wipes or freezes the edges (docs/operations.md):
//! a lost `api.db` is refused, and with `--allow-new-store` the edges are fenced (their pods
//! keep running) until `cloudcore store adopt`; a backup put back with `cloudcore store restore`
//! reaches the edges and later updates too, while a plain copy of an old `api.db` is refused; a
//! lost `pki/` or `cloudcore.db` and a mistyped `--data-dir` are refused naming the recovery.
//!
//! The last test does the same in kube mode: a fresh control plane (a new etcd, so a new
//! `kube-system` uid) behind the same cloudcore data dir.
//!
//! Real binaries, a real containerd, real SQLite files, kubectl. Needs root and Debian's
//! containerd, runc, containernetworking-plugins and busybox-static (`.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration::cluster::{ClusterOptions, KubeCluster};
use integration::{Cloud, Containerd, Edge, bin, container_status, eventually};
use serde_json::Value;

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// A long-running pod on `node`, mounting ConfigMap `cfg` when `with_config` says so.
fn pod_yaml(node: &str, with_config: bool) -> String {
    let volume = if with_config {
        "    volumeMounts:\n    - name: cfg\n      mountPath: /cfg\n  volumes:\n  - name: cfg\n    configMap:\n      name: cfg\n"
    } else {
        ""
    };
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
{volume}"#,
        image = integration::BUSYBOX
    )
}

fn config_map_yaml(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata:\n  value: \"{value}\"\n"
    )
}

/// The container id of the running pod `steady` as the API reports it (without `containerd://`).
fn container_id(cloud: &Cloud, edge: &Edge) -> String {
    let pod = cloud.wait_pod("steady", Duration::from_secs(60), "Ready", ready, || {
        edge.log()
    });
    container_status(&pod, "c")["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("containerd://"))
        .unwrap_or_else(|| panic!("no container id: {}", pod["status"]))
        .to_string()
}

/// Ids of the containers containerd runs now (state running).
fn running_containers(containerd: &Containerd) -> Vec<String> {
    let endpoint = containerd.endpoint.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let cri = edgecore::cri::Cri::new(&endpoint).expect("cri");
            cri.list_containers(Default::default())
                .await
                .expect("list containers")
                .into_iter()
                .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
                .map(|c| c.id)
                .collect()
        })
}

/// The ConfigMap value pod `uid` sees in its volume on the edge.
fn mounted_value(edge_dir: &Path, uid: &str) -> Option<String> {
    std::fs::read_to_string(
        edge_dir
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~configmap/cfg/value"),
    )
    .ok()
}

fn remove_api_db(dir: &Path) {
    for name in ["api.db", "api.db-wal", "api.db-shm"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(bin("cloudcore"))
        .args(args)
        .output()
        .expect("run cloudcore")
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Starts containerd, cloudcore and an edge named `node`.
fn site(tmp: &Path, node: &str) -> (Containerd, Cloud, Edge, PathBuf) {
    let containerd = Containerd::start(&tmp.join("containerd"));
    let cloud = Cloud::start(tmp, &[]);
    let edge_dir = tmp.join("edge");
    let edge = integration::join_and_run(
        &cloud,
        &edge_dir,
        node,
        &["--cri-endpoint", &containerd.endpoint],
    );
    (containerd, cloud, edge, edge_dir)
}

/// Waits past a fenced edge's retry (10 s), then checks that the pod's container still runs
/// and the edge's store still holds the pod: a fence deletes and stops nothing.
fn pod_untouched_past_a_retry(containerd: &Containerd, edge: &Edge, container: &str) {
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        running_containers(containerd)
            .iter()
            .any(|c| c == container),
        "the pod's container {container} was stopped; edge log:\n{}",
        edge.log()
    );
    assert!(
        edge.objects()
            .iter()
            .any(|o| o.kind == "Pod" && o.name == "steady"),
        "the edge's store lost the pod"
    );
}
#[test]
fn a_lost_api_db_is_refused_then_fenced_without_stopping_a_pod_until_adopted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (containerd, mut cloud, edge, _edge_dir) = site(tmp.path(), "fence-a");
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(&pod_yaml("fence-a", false)));
    let container = container_id(&cloud, &edge);

    // The accident: api.db gone, cloudcore.db and pki/ still there.
    cloud.stop();
    remove_api_db(&cloud.dir);
    let refused = cloud.try_restart_with(&[]);
    assert!(
        refused.is_err() && !cloud.is_running(),
        "serve started on an empty store"
    );
    let log = cloud.log();
    assert!(
        log.contains("api.db is missing") && log.contains("--allow-new-store"),
        "the refusal names the cause and the flag: {log}"
    );
    assert!(
        !cloud.dir.join("api.db").exists(),
        "the refused start created an api.db"
    );

    // Told explicitly: it starts on a new store, and the edge is fenced instead of wiped.
    cloud
        .try_restart_with(&["--allow-new-store"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        eventually(Duration::from_secs(30), || {
            cloud.metric("cloudcore_edges_state_mismatch") == 1.0
                && edge.metric("edgecore_cloud_state_mismatch") == 1.0
        }),
        "the edge was not fenced; cloud log:\n{}\nedge log:\n{}",
        cloud.log(),
        edge.log()
    );
    let cloud_log = cloud.log();
    assert!(
        cloud_log.lines().any(|l| l.contains("ERROR")
            && l.contains("refusing to sync the edge")
            && l.contains("cloudcore store adopt --node fence-a")),
        "no ERROR line on the cloud names the cause and the command: {cloud_log}"
    );
    assert!(
        eventually(Duration::from_secs(15), || edge
            .log()
            .lines()
            .any(|l| l.contains("ERROR")
                && l.contains("does not match this edge's")
                && l.contains("not the one this edge synced with"))),
        "no ERROR line on the edge names the cause: {}",
        edge.log()
    );
    assert!(
        !cloud_log.contains("resync planned"),
        "a resync was planned for a fenced edge: {cloud_log}"
    );
    // Past a retry of the fenced edge: still nothing deleted, the same container running.
    pod_untouched_past_a_retry(&containerd, &edge, &container);

    // The operator re-creates the workload in the new store and adopts it for the node.
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(&pod_yaml("fence-a", false)));
    let new_uid = cloud.pod("steady").expect("new pod")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let out = cloud.cli(&["store", "adopt", "--node", "fence-a"]);
    let said = ok(out, "store adopt");
    assert!(said.contains("fence-a"), "{said}");
    let pod = cloud.wait_pod(
        "steady",
        Duration::from_secs(60),
        "running on the edge after the adoption",
        ready,
        || format!("cloud log:\n{}\nedge log:\n{}", cloud.log(), edge.log()),
    );
    assert_eq!(pod["metadata"]["uid"], new_uid.as_str());
    assert!(
        eventually(Duration::from_secs(10), || {
            cloud.metric("cloudcore_edges_state_mismatch") == 0.0
                && edge.metric("edgecore_cloud_state_mismatch") == 0.0
        }),
        "the fence was not lifted"
    );
    assert!(
        edge.objects()
            .iter()
            .any(|o| o.kind == "Pod" && o.name == "steady" && o.uid == new_uid),
        "the edge does not hold the adopted store's pod"
    );
    drop(edge);
    drop(containerd);
}

#[test]
fn a_restored_backup_reaches_the_edge_and_a_plain_copy_of_an_old_api_db_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (containerd, mut cloud, edge, edge_dir) = site(tmp.path(), "fence-b");
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(&config_map_yaml("v1")));
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(&pod_yaml("fence-b", true)));
    let container = container_id(&cloud, &edge);
    let uid = cloud.pod("steady").expect("pod")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let sees = |value: &str| {
        eventually(Duration::from_secs(30), || {
            mounted_value(&edge_dir, &uid).as_deref() == Some(value)
        })
    };
    assert!(sees("v1"), "v1 never reached the pod: {}", edge.log());

    // Online backup while serve runs.
    let backup = tmp.path().join("backup");
    let data_dir = cloud.dir.display().to_string();
    let out = cli(&[
        "store",
        "backup",
        "--data-dir",
        &data_dir,
        "--to",
        &backup.display().to_string(),
    ]);
    ok(out, "store backup");
    for file in ["api.db", "cloudcore.db", "pki/ca.crt", "pki/ca.key"] {
        assert!(backup.join(file).exists(), "backup lacks {file}");
    }

    // Life goes on after the backup: the edge holds versions the backup never saw.
    for value in ["v2", "v3"] {
        cloud.kubectl_ok(&["apply", "-f", "-"], Some(&config_map_yaml(value)));
    }
    assert!(sees("v3"), "v3 never reached the pod: {}", edge.log());
    cloud.stop();

    // A plain copy of the old api.db is refused, not served to freeze the edges.
    remove_api_db(&cloud.dir);
    std::fs::copy(backup.join("api.db"), cloud.dir.join("api.db")).expect("copy api.db");
    assert!(
        cloud.try_restart_with(&[]).is_err(),
        "served an older api.db"
    );
    let log = cloud.log();
    assert!(
        log.contains("went back in time") && log.contains("cloudcore store restore"),
        "the refusal names the cause and the procedure: {log}"
    );

    // The documented restore.
    let out = cli(&[
        "store",
        "restore",
        "--from",
        &backup.display().to_string(),
        "--data-dir",
        &data_dir,
    ]);
    let said = ok(out, "store restore");
    assert!(
        said.contains("restored") && said.contains("api.db"),
        "{said}"
    );
    cloud
        .try_restart_with(&[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        eventually(Duration::from_secs(30), || edge.connected()),
        "the edge did not reconnect: {}",
        edge.log()
    );
    // The edge converges to the restored state, with nothing stopped.
    assert!(
        sees("v1"),
        "the restored v1 never reached the pod; edge log:\n{}",
        edge.log()
    );
    assert_eq!(edge.metric("edgecore_cloud_state_mismatch"), 0.0);
    assert!(
        running_containers(&containerd).contains(&container),
        "the pod's container {container} was stopped; edge log:\n{}",
        edge.log()
    );
    let pod = cloud.wait_pod("steady", Duration::from_secs(30), "Ready", ready, || {
        edge.log()
    });
    assert_eq!(
        container_status(&pod, "c")["containerID"],
        format!("containerd://{container}").as_str()
    );

    // And the freeze is gone: an update after the restore reaches the edge.
    cloud.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&config_map_yaml("after-restore")),
    );
    assert!(
        sees("after-restore"),
        "an update after the restore never reached the pod; edge log:\n{}",
        edge.log()
    );
    let held = edge
        .objects()
        .into_iter()
        .find(|o| o.kind == "ConfigMap" && o.name == "cfg")
        .expect("cfg held");
    assert!(
        held.resource_version > 1_000_000_000,
        "restored versions are bumped past what the edge held: {held:?}"
    );
    drop(edge);
    drop(containerd);
}

#[test]
fn lost_pki_or_registry_and_a_mistyped_data_dir_are_refused_naming_the_recovery() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (containerd, mut cloud, edge, _edge_dir) = site(tmp.path(), "fence-c");

    // A mistyped --data-dir: no CA, no join command, and nothing created.
    let typo = tmp.path().join("clod");
    let out = cli(&["token", "create", "--data-dir", &typo.display().to_string()]);
    assert!(
        !out.status.success(),
        "token create on an empty dir succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&typo.display().to_string()) && stderr.contains("initialized"),
        "the error names the directory: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "printed a join command: {:?}",
        out.stdout
    );
    assert!(!typo.exists(), "token create created {}", typo.display());
    let out = cli(&["node", "list", "--data-dir", &typo.display().to_string()]);
    assert!(!out.status.success() && !typo.exists());

    // pki/ lost: refused; with --allow-new-ca the edge says what happened, not "retrying".
    cloud.stop();
    let pki = cloud.dir.join("pki");
    let kept = tmp.path().join("pki.kept");
    std::fs::rename(&pki, &kept).expect("move pki away");
    assert!(cloud.try_restart_with(&[]).is_err(), "served with a new CA");
    let log = cloud.log();
    assert!(
        log.contains("pki is missing") && log.contains("--allow-new-ca"),
        "the refusal names the cause and the flag: {log}"
    );
    assert!(!pki.exists(), "the refused start created a CA");
    cloud
        .try_restart_with(&["--allow-new-ca"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        eventually(Duration::from_secs(30), || edge
            .log()
            .contains("not signed by the pinned cluster CA")),
        "the edge does not name the foreign CA: {}",
        edge.log()
    );

    // The CA back; cloudcore.db lost: refused.
    cloud.stop();
    std::fs::remove_dir_all(&pki).expect("remove the new CA");
    std::fs::rename(&kept, &pki).expect("put pki back");
    let registry_kept = tmp.path().join("registry.kept");
    std::fs::create_dir_all(&registry_kept).expect("dir");
    for name in ["cloudcore.db", "cloudcore.db-wal", "cloudcore.db-shm"] {
        let _ = std::fs::rename(cloud.dir.join(name), registry_kept.join(name));
    }
    assert!(
        cloud.try_restart_with(&[]).is_err(),
        "served an empty registry"
    );
    let log = cloud.log();
    assert!(
        log.contains("cloudcore.db is missing") && log.contains("--allow-empty-registry"),
        "the refusal names the cause and the flag: {log}"
    );
    assert!(!cloud.dir.join("cloudcore.db").exists());

    // Everything back: the edge reconnects as before.
    for name in ["cloudcore.db", "cloudcore.db-wal", "cloudcore.db-shm"] {
        let _ = std::fs::rename(registry_kept.join(name), cloud.dir.join(name));
    }
    cloud
        .try_restart_with(&[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        eventually(Duration::from_secs(30), || edge.connected()),
        "the edge did not reconnect: {}",
        edge.log()
    );
    drop(edge);
    drop(containerd);
}

#[test]
fn kube_mode_a_new_control_plane_is_refused_then_fences_the_edge_with_its_pod_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let loopback = std::net::Ipv4Addr::LOCALHOST.into();
    let first = KubeCluster::start(&tmp.path().join("first"), &ClusterOptions::default());
    let credentials = first.cloudcore_credentials(|rbac| rbac);
    let cloud = Cloud::start_kube(tmp.path(), &first, &credentials, loopback, &[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let edge_dir = tmp.path().join("edge");
    let cri = ["--cri-endpoint", containerd.endpoint.as_str()];
    let mut edge = integration::join_and_run(&cloud, &edge_dir, "fence-k", &cri);
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(&pod_yaml("fence-k", false)));
    let container = container_id(&cloud, &edge);

    // The cluster is replaced by a fresh one (its etcd lost); cloudcore keeps its data dir.
    drop(cloud);
    drop(first);
    let second = KubeCluster::start(&tmp.path().join("second"), &ClusterOptions::default());
    let credentials = second.cloudcore_credentials(|rbac| rbac);
    let refused = match Cloud::start_kube(tmp.path(), &second, &credentials, loopback, &[]) {
        Ok(_) => panic!("cloudcore served a new control plane as if it were the old one"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("not the one this cloud served") && refused.contains("--allow-new-store"),
        "the refusal names the cause and the flag: {refused}"
    );
    let cloud = Cloud::start_kube(
        tmp.path(),
        &second,
        &credentials,
        loopback,
        &["--allow-new-store"],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // The new cloudcore listens elsewhere; restarting edgecore stops no container.
    edge.stop();
    let address = cloud.address();
    edge = Edge::start_with(&edge_dir, &[cri[0], cri[1], "--cloud", &address]);
    assert!(
        eventually(Duration::from_secs(30), || {
            cloud.metric("cloudcore_edges_state_mismatch") == 1.0
                && edge.metric("edgecore_cloud_state_mismatch") == 1.0
        }),
        "the edge was not fenced; cloud log:\n{}\nedge log:\n{}",
        cloud.log(),
        edge.log()
    );
    pod_untouched_past_a_retry(&containerd, &edge, &container);
    assert!(
        second
            .kubectl(&["get", "pod", "steady"], None)
            .stdout
            .is_empty(),
        "the new control plane has no such pod: the edge kept it on its own"
    );
    drop(edge);
    drop(cloud);
    drop(containerd);
}
