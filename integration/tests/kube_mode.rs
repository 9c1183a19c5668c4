//! Kube mode against a real Kubernetes control plane (v1.36.2 from `../shared/k8s`, started
//! fresh by [`KubeCluster`]), as a cluster operator runs it: cloudcore with the credentials of
//! its ServiceAccount bound to exactly the shipped RBAC, the shipped manifests checked by the
//! real apiserver, one edge in its own network namespace running pods in a real containerd,
//! the real scheduler and controllers placing a Deployment on it, a partition past the
//! eviction timeout and a rolling update after it.
//!
//! Needs root, iproute2, iptables, containerd, runc, CNI plugins, busybox-static, etcd-server,
//! xz-utils and openssl (`.ci/run` installs them); without them the tests fail saying what is
//! missing.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::netns::EdgeNet;
use integration::{Cloud, Containerd, Edge, Tmpfs, bin, deploy_dir};
use serde_json::Value;

/// The node lifecycle controller's grace period here (50 s by default in this version).
const NODE_GRACE: &str = "20s";
/// The apiserver's default `tolerationSeconds` for `unreachable:NoExecute` (300 s by default).
const TOLERATION_SECONDS: u64 = 10;
/// After a heal, edge pods must be Ready again within this long (the issue's promise).
const READY_AFTER_HEAL: Duration = Duration::from_secs(10);

fn ready(object: &Value) -> bool {
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A Deployment of `replicas` on the edge: a ConfigMap volume, a readiness probe, a container
/// that stops on SIGTERM, the `kube-api-access` volume the ServiceAccount admission adds (its
/// token comes through cloudcore, docs/tokens.md); `maxUnavailable: 0` so a rollout never drops
/// below `replicas` Ready.
fn deployment(node: &str, replicas: u32, revision: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: web-settings
data:
  mode: "fast"
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}
  template:
    metadata:
      labels: {{app: web}}
      annotations: {{revision: "{revision}"}}
    spec:
      nodeSelector:
        kubernetes.io/hostname: {node}
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: {image}
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]
        readinessProbe:
          exec:
            command: ["cat", "/etc/settings/mode"]
          periodSeconds: 1
        volumeMounts:
        - name: settings
          mountPath: /etc/settings
      volumes:
      - name: settings
        configMap:
          name: web-settings
"#,
        image = integration::BUSYBOX
    )
}

/// Fields drop in order: edgecore, containerd (removing its pods), cloudcore, the network
/// namespace, the control plane, the edge's tmpfs, then the directory they all used.
struct Site {
    edge: Edge,
    _containerd: Containerd,
    cloud: Cloud,
    net: EdgeNet,
    cluster: KubeCluster,
    node: String,
    _edge_disk: Tmpfs,
    _tmp: tempfile::TempDir,
}

impl Site {
    fn start(node: &str) -> Site {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cluster = KubeCluster::start(
            tmp.path(),
            &ClusterOptions {
                apiserver: vec![format!(
                    "--default-unreachable-toleration-seconds={TOLERATION_SECONDS}"
                )],
                controller_manager: vec![
                    format!("--node-monitor-grace-period={NODE_GRACE}"),
                    "--node-monitor-period=2s".into(),
                ],
                components: Components::All,
            },
        );
        let credentials = cluster.cloudcore_credentials(|rbac| rbac);
        check_manifests(&cluster);
        let net = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
        let containerd = Containerd::start(&tmp.path().join("containerd"));
        let cloud = Cloud::start_kube(
            tmp.path(),
            &cluster,
            &credentials,
            net.host_ip().into(),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        // The edge's data dir on a disk of its own, so that a nearly full machine does not make
        // it report DiskPressure (the scheduler would place nothing on it).
        let edge_disk = Tmpfs::mount("256m");
        let edge_dir = edge_disk.path().join("edge");
        let edge = integration::join_and_run_in(
            &net,
            &cloud,
            &edge_dir,
            node,
            &["--cri-endpoint", &containerd.endpoint],
        );
        Site {
            edge,
            _containerd: containerd,
            cloud,
            net,
            cluster,
            node: node.to_string(),
            _edge_disk: edge_disk,
            _tmp: tmp,
        }
    }

    fn context(&self) -> String {
        let text = |args: &[&str]| {
            let out = self.cluster.kubectl(args, None);
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        format!(
            "pods:\n{}\nevents (end):\n{}\nnode taints: {}\ncloudcore log (end):\n{}\nedge log (end):\n{}\nkube-scheduler log (end):\n{}\nkube-controller-manager log (end):\n{}",
            text(&["get", "pods", "-o", "wide"]),
            tail(&text(&["get", "events", "--sort-by=.lastTimestamp"]), 25),
            self.node()["spec"]["taints"],
            tail(&self.cloud.log(), 40),
            tail(&self.edge.log(), 40),
            self.cluster.log_tail("kube-scheduler", 15),
            self.cluster.log_tail("kube-controller-manager", 15)
        )
    }

    fn node(&self) -> Value {
        self.cluster.get_json(&["node", &self.node])
    }

    /// The edge's Node, or `Null` until cloudcore has created it (it writes the Node once the
    /// edge's session and its kubelet port are known, a moment after the edge connects).
    fn node_if_created(&self) -> Value {
        let out = self
            .cluster
            .kubectl(&["get", "node", &self.node, "-o", "json"], None);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The pods of the Deployment, by name.
    fn web_pods(&self) -> BTreeMap<String, Value> {
        self.cluster.get_json(&["pods", "-l", "app=web"])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    p.clone(),
                )
            })
            .collect()
    }

    fn wait(&self, within: Duration, what: &str, mut check: impl FnMut(&Site) -> bool) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if check(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{what} not reached within {within:?}\n{}", self.context());
    }

    fn deployment_available(&self, replicas: u64) -> bool {
        let d = self.cluster.get_json(&["deployment", "web"]);
        d["status"]["availableReplicas"].as_u64() == Some(replicas)
            && d["status"]["updatedReplicas"].as_u64() == Some(replicas)
            && d["status"]["replicas"].as_u64() == Some(replicas)
    }

    /// Nothing cloudcore asked for was refused: every permission it used is in the shipped
    /// RBAC.
    fn assert_never_forbidden(&self) {
        let log = self.cloud.log();
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("forbidden") || l.contains("Forbidden") || l.contains(" 403"))
            .collect();
        assert!(
            refused.is_empty(),
            "the API refused cloudcore something the shipped RBAC (deploy/kubernetes/rbac.yaml) does not grant:\n{}",
            refused.join("\n")
        );
    }
}

/// The Node as `kubectl get nodes -o wide` and `describe node` show it: what a kubelet
/// reports (docs/nodes.md).
fn assert_node_reports_like_a_kubelet(site: &Site) {
    let node = site.node();
    let info = &node["status"]["nodeInfo"];
    let context = || format!("node: {node:#}");
    let os_image = info["osImage"].as_str().unwrap_or_default();
    assert!(
        !os_image.is_empty() && os_image != "linux",
        "osImage from os-release\n{}",
        context()
    );
    assert!(
        info["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("containerd://")),
        "containerRuntimeVersion from the CRI\n{}",
        context()
    );
    for id in ["machineID", "bootID", "kernelVersion"] {
        assert!(
            info[id].as_str().is_some_and(|v| !v.is_empty()),
            "{id}\n{}",
            context()
        );
    }
    for resource in ["cpu", "memory", "pods", "ephemeral-storage"] {
        assert!(
            node["status"]["capacity"][resource].is_string()
                && node["status"]["allocatable"][resource].is_string(),
            "capacity and allocatable {resource}\n{}",
            context()
        );
    }
    let conditions = node["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for kind in ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"] {
        let condition = conditions
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap_or_else(|| panic!("condition {kind}\n{}", context()));
        for time in ["lastTransitionTime", "lastHeartbeatTime"] {
            assert!(
                condition[time]
                    .as_str()
                    .is_some_and(|t| t.starts_with("20")),
                "{kind}.{time} is a real time\n{}",
                context()
            );
        }
    }
    let addresses = node["status"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        addresses
            .iter()
            .any(|a| a["type"] == "InternalIP" && a["address"] == site.net.edge_ip().to_string()),
        "the gateway's own address\n{}",
        context()
    );
    let wide = site
        .cluster
        .kubectl_ok(&["get", "node", &site.node, "-o", "wide"], None);
    assert!(
        wide.contains(os_image) && wide.contains("containerd://") && !wide.contains("<unknown>"),
        "kubectl get nodes -o wide:\n{wide}"
    );
    let describe = site
        .cluster
        .kubectl_ok(&["describe", "node", &site.node], None);
    for wrong in ["01 Jan 0001", "never posted"] {
        assert!(
            !describe.contains(wrong),
            "describe node shows {wrong:?}:\n{describe}"
        );
    }
}

/// The shipped manifests as the real apiserver sees them: `apply --dry-run=server` of every
/// file in deploy/kubernetes, and the RBAC it holds after applying rbac.yaml is exactly what
/// `cloudcore permissions` says cloudcore needs.
fn check_manifests(cluster: &KubeCluster) {
    let dir = deploy_dir().join("kubernetes");
    let dir = dir.to_str().expect("UTF-8 path");
    let out = cluster.kubectl(&["apply", "--dry-run=server", "-f", dir], None);
    assert!(
        out.status.success(),
        "the real apiserver refuses the manifests in deploy/kubernetes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let needed = Command::new(bin("cloudcore"))
        .arg("permissions")
        .output()
        .expect("cloudcore permissions");
    assert!(needed.status.success());
    let needed: Value = serde_json::from_slice(&needed.stdout).expect("permissions JSON");
    let needed: BTreeSet<(String, String, String, String)> = needed
        .as_array()
        .expect("a list")
        .iter()
        .flat_map(|p| {
            let group = p["apiGroup"].as_str().unwrap_or_default().to_string();
            let resource = p["resource"].as_str().unwrap_or_default().to_string();
            let namespace = p["namespace"].as_str().unwrap_or_default().to_string();
            p["verbs"].as_array().into_iter().flatten().map(move |v| {
                (
                    namespace.clone(),
                    group.clone(),
                    resource.clone(),
                    v.as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect();
    // What the cluster grants the ServiceAccount through the objects rbac.yaml made.
    let mut granted = BTreeSet::new();
    let bindings = [
        ("clusterrolebinding", ""),
        ("rolebinding", "kube-node-lease"),
        ("rolebinding", "edge-system"),
        ("rolebinding", "default"),
    ];
    for (kind, namespace) in bindings {
        let mut args = vec![kind];
        if !namespace.is_empty() {
            args.extend_from_slice(&["-n", namespace]);
        }
        for binding in cluster.get_json(&args)["items"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let ours = binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == integration::cluster::CLOUDCORE_ACCOUNT
                        && s["namespace"] == integration::cluster::CLOUDCORE_NAMESPACE
                });
            if !ours {
                continue;
            }
            let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            let role = if role_kind == "ClusterRole" {
                cluster.get_json(&["clusterrole", role_name])
            } else {
                cluster.get_json(&["role", role_name, "-n", namespace])
            };
            for rule in role["rules"].as_array().into_iter().flatten() {
                for group in rule["apiGroups"].as_array().into_iter().flatten() {
                    for resource in rule["resources"].as_array().into_iter().flatten() {
                        for verb in rule["verbs"].as_array().into_iter().flatten() {
                            granted.insert((
                                namespace.to_string(),
                                group.as_str().unwrap_or_default().to_string(),
                                resource.as_str().unwrap_or_default().to_string(),
                                verb.as_str().unwrap_or_default().to_string(),
                            ));
                        }
                    }
                }
            }
        }
    }
    assert_eq!(
        granted, needed,
        "deploy/kubernetes/rbac.yaml must grant exactly what `cloudcore permissions` lists (namespace, group, resource, verb)"
    );
}

/// Join → a Ready Node; a Deployment placed on the edge by the real scheduler becomes
/// available; a partition past the eviction timeout taints the node but evicts and replaces
/// nothing; after the heal the pods are Ready again within 10 s; a rolling update with
/// `maxUnavailable: 0` keeps a Ready replica at every poll and completes.
#[test]
fn deployment_survives_a_partition_and_rolls_out_after_it() {
    let site = Site::start("kube-gw");
    site.wait(Duration::from_secs(30), "node Ready", |s| {
        ready(&s.node_if_created())
    });
    assert_node_reports_like_a_kubelet(&site);

    // The real scheduler places the Deployment on the edge (the stand-in takes no pods).
    site.cluster
        .kubectl_ok(&["apply", "-f", "-"], Some(&deployment(&site.node, 2, "1")));
    site.wait(
        Duration::from_secs(90),
        "deployment web 2/2 available",
        |s| s.deployment_available(2),
    );
    let before = site.web_pods();
    assert_eq!(before.len(), 2);
    for pod in before.values() {
        assert_eq!(pod["spec"]["nodeName"], site.node.as_str());
    }

    // Partition past the grace period and the shortened toleration.
    site.net.cut().expect("cut");
    let cut_at = Instant::now();
    site.wait(
        Duration::from_secs(90),
        "the unreachable:NoExecute taint on the edge node",
        |s| {
            s.node()["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")
        },
    );
    site.wait(
        Duration::from_secs(30),
        "the node lifecycle controller setting the edge pods not ready",
        |s| s.web_pods().values().all(|p| !ready(p)),
    );
    // Well past the default toleration the apiserver would have given (10 s here).
    std::thread::sleep(Duration::from_secs(TOLERATION_SECONDS + 5));
    let during = site.web_pods();
    assert_eq!(
        during.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "no pod was evicted or replaced during the partition"
    );
    for (name, pod) in &during {
        assert!(
            pod["metadata"]["deletionTimestamp"].is_null(),
            "{name} is being deleted"
        );
        assert_eq!(pod["metadata"]["uid"], before[name]["metadata"]["uid"]);
    }
    eprintln!("partitioned for {:?}", cut_at.elapsed());

    // Heal: Ready again within 10 s, and the Deployment available.
    site.net.heal().expect("heal");
    let healed = Instant::now();
    site.wait(
        READY_AFTER_HEAL,
        "every edge pod Ready after the heal",
        |s| {
            let pods = s.web_pods();
            pods.len() == 2 && pods.values().all(ready)
        },
    );
    eprintln!("pods Ready {:?} after the heal", healed.elapsed());
    site.wait(
        Duration::from_secs(10),
        "deployment 2/2 available again",
        |s| s.deployment_available(2),
    );
    assert_eq!(
        site.web_pods().keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same pods, never replaced"
    );
    // Someone else changes a pod's status while the edge is connected: written back.
    let (name, _) = before.iter().next().expect("a pod");
    site.cluster.kubectl_ok(
        &[
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"False","reason":"SetBySomeoneElse"}]}}"#,
        ],
        None,
    );
    site.wait(
        READY_AFTER_HEAL,
        "a status changed by a user written back",
        |s| s.web_pods().get(name).is_some_and(ready),
    );
    site.wait(
        Duration::from_secs(30),
        "the unreachable taint removed",
        |s| {
            !s.node()["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable")
        },
    );

    // A rolling update never drops below one Ready replica, and completes.
    site.cluster
        .kubectl_ok(&["apply", "-f", "-"], Some(&deployment(&site.node, 2, "2")));
    let started = Instant::now();
    let mut fewest_ready = usize::MAX;
    loop {
        let pods = site.web_pods();
        let ready_now = pods
            .values()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && ready(p))
            .count();
        fewest_ready = fewest_ready.min(ready_now);
        assert!(
            ready_now >= 1,
            "no Ready replica during the rollout ({:?} in)\n{}",
            started.elapsed(),
            site.context()
        );
        let done = site.deployment_available(2)
            && pods.len() == 2
            && pods
                .values()
                .all(|p| p["metadata"]["annotations"]["revision"] == "2");
        if done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the rollout did not complete\n{}",
            site.context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "rollout done in {:?}, at least {fewest_ready} Ready at every poll",
        started.elapsed()
    );
    site.assert_never_forbidden();
}

/// cloudcore refuses to start with RBAC that lacks a permission it needs, naming it.
#[test]
fn a_missing_permission_is_named_at_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(
        tmp.path(),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    // The shipped RBAC without `patch pods/status`.
    let credentials = cluster.cloudcore_credentials(|rbac| {
        let without = rbac.replace(
            "  - apiGroups: [\"\"]\n    resources: [\"pods/status\"]\n    verbs: [\"patch\"]\n",
            "",
        );
        assert_ne!(
            without, rbac,
            "the test expects rbac.yaml to grant pods/status"
        );
        without
    });
    let err = match Cloud::start_kube(
        tmp.path(),
        &cluster,
        &credentials,
        std::net::Ipv4Addr::LOCALHOST.into(),
        &[],
    ) {
        Ok(_) => panic!("cloudcore started without the permission to write pod status"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("lack permissions") && err.contains("patch pods/status"),
        "cloudcore's refusal does not name the missing permission:\n{err}"
    );
}
