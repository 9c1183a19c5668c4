//! Three `cloudcore serve --control-plane=kube` replicas against one real control plane
//! (v1.36.2 from `../shared/k8s`, [`KubeCluster`]), with real edgecore processes reaching them
//! through one address: the nftables load balancer of [`integration::ha`], from which a killed
//! replica is removed as kube-proxy removes a dead endpoint. The replicas share their state in
//! the cluster (`--state=cluster`); tokens are made through replica 1, edges join through the
//! one address (any replica).
//!
//! One `#[test]` runs the scenarios on one control plane: sessions spread and recorded on the
//! Nodes, one leader; `containerLogs` and `/run` (exec) for a pod whose session is on replica B
//! sent to replica A's kubelet endpoint; B killed with -9 under churn → its edges back on the
//! others, the pod's container unchanged, a pod created during the failover in the edge's
//! store; the leader killed → another replica holds the Lease within its duration and the
//! once-only work (autonomy tolerations) goes on.
//!
//! Needs root, nftables, containerd, runc, CNI plugins, busybox-static, etcd-server, xz-utils,
//! openssl and curl (`.ci/run` installs them); without them the test fails saying what is
//! missing.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::cluster::{ClusterOptions, KubeCluster};
use integration::ha::{Replicas, lease_holder, owners};
use integration::{Containerd, Edge, eventually};
use serde_json::Value;

/// Edges in the test; the first runs pods on a real containerd, the others have no runtime.
const EDGES: usize = 4;
/// Lease duration (client-go's default, cloudcore's too).
const LEASE_DURATION: Duration = Duration::from_secs(15);

fn tail(text: &str, lines: usize) -> String {
    integration::gateway::tail(text, lines)
}

/// One HTTPS request with the apiserver's kubelet client certificate: status and body.
fn kubelet_call(
    cluster: &KubeCluster,
    at: (Ipv4Addr, u16),
    method: &str,
    path: &str,
) -> (u16, String) {
    let pki = cluster.run_dir.join("pki");
    let out = Command::new("curl")
        .args([
            "-sSk",
            "--max-time",
            "15",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cert")
        .arg(pki.join("apiserver-kubelet-client.crt"))
        .arg("--key")
        .arg(pki.join("apiserver-kubelet-client.key"))
        .arg(format!("https://{}:{}{path}", at.0, at.1))
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

struct Site {
    edges: Vec<(String, Edge)>,
    _containerd: Containerd,
    ha: Replicas,
    cluster: KubeCluster,
    tmp: tempfile::TempDir,
}

impl Site {
    fn node(&self, name: &str) -> Value {
        self.cluster.get_json(&["node", name])
    }

    fn owner(&self, name: &str) -> Option<String> {
        owners(&self.cluster).remove(name)
    }

    fn kubelet_port(&self, name: &str) -> u16 {
        self.node(name)["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect("the Node shows its kubelet port")
    }

    fn lease_holder(&self) -> Option<String> {
        lease_holder(&self.cluster)
    }

    fn replica(&self, id: &str) -> &integration::ha::Replica {
        self.ha.get(id).expect("replica")
    }

    fn context(&self) -> String {
        let mut text = self.ha.logs(30);
        for (name, e) in &self.edges {
            text += &format!("--- edge {name} log (end):\n{}\n", tail(&e.log(), 15));
        }
        text
    }

    fn pod(&self, name: &str) -> Option<Value> {
        let out = self
            .cluster
            .kubectl(&["get", "pod", name, "-o", "json"], None);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn kill(&mut self, id: &str) {
        self.ha.kill(id).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

fn pod_yaml(name: &str, node: &str, command: &str, annotations: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations: {{{annotations}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {image}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", {command:?}]
"#,
        image = integration::BUSYBOX
    )
}

fn start_site() -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(tmp.path(), &ClusterOptions::default());
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let names: Vec<String> = (0..EDGES).map(|i| format!("ha-e{i}")).collect();
    let ha = Replicas::start(
        &integration::bin("cloudcore"),
        tmp.path(),
        &cluster,
        &credentials,
        &names,
        integration::ha::Sharing::Cluster,
        integration::ha::Liveness::QUICK,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut edges = Vec::new();
    for (i, (name, dir)) in ha.edges.iter().enumerate() {
        let edge = if i == 0 {
            Edge::start_with(dir, &["--cri-endpoint", &containerd.endpoint])
        } else {
            Edge::start(dir)
        };
        edges.push((name.clone(), edge));
    }
    Site {
        edges,
        _containerd: containerd,
        ha,
        cluster,
        tmp,
    }
}

#[test]
fn replicas_share_edges_fail_over_and_forward_streams() {
    let mut site = start_site();
    let ids: Vec<String> = site.ha.replicas.iter().map(|r| r.id.clone()).collect();

    // Every edge connected, its session recorded on its Node by the replica holding it.
    let names: Vec<String> = site.edges.iter().map(|(n, _)| n.clone()).collect();
    let recorded = eventually(Duration::from_secs(40), || {
        site.edges.iter().all(|(_, e)| e.connected())
            && names
                .iter()
                .all(|n| site.owner(n).is_some_and(|o| ids.contains(&o)))
    });
    assert!(
        recorded,
        "edges not all connected and recorded\n{}",
        site.context()
    );
    let owners: Vec<String> = names.iter().map(|n| site.owner(n).unwrap()).collect();
    eprintln!(
        "sessions: {:?}",
        names.iter().zip(&owners).collect::<Vec<_>>()
    );
    let connected: f64 = site
        .ha
        .replicas
        .iter()
        .map(|r| r.metric("cloudcore_connected_edges"))
        .sum();
    assert_eq!(
        connected,
        EDGES as f64,
        "each edge holds exactly one session across the replicas\n{}",
        site.context()
    );

    // Exactly one leader, the Lease's holder.
    let led = eventually(Duration::from_secs(20), || site.lease_holder().is_some());
    assert!(
        led,
        "nobody took the leader-election lease\n{}",
        site.context()
    );
    let leader = site.lease_holder().unwrap();
    let leaders: Vec<&str> = site
        .ha
        .replicas
        .iter()
        .filter(|r| r.metric("cloudcore_leader") == 1.0)
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(
        leaders,
        vec![leader.as_str()],
        "cloudcore_leader is 1 on the holder only"
    );
    let says = integration::http_get(site.replica(&leader).cloud.metrics_port, "/readyz?verbose")
        .unwrap_or_default();
    assert!(
        says.contains(&format!(
            "[+]leader-election ok: this replica ({leader}) leads"
        )),
        "{says}"
    );

    // A graceful stop releases the Lease: another replica holds it within a few seconds.
    let stopped_at = Instant::now();
    site.ha.stop(&leader).unwrap_or_else(|e| panic!("{e:#}"));
    let released = eventually(Duration::from_secs(8), || {
        site.lease_holder().is_some_and(|h| h != leader)
    });
    assert!(
        released,
        "the Lease was not released at a graceful stop\n{}",
        site.context()
    );
    eprintln!(
        "lease handed over {:?} after a graceful stop",
        stopped_at.elapsed()
    );
    site.ha.revive(&leader).unwrap_or_else(|e| panic!("{e:#}"));
    let leader = site.lease_holder().unwrap();
    let settled = |site: &Site| {
        let owners = integration::ha::owners(&site.cluster);
        site.edges.iter().all(|(name, e)| {
            e.connected()
                && owners
                    .get(name)
                    .is_some_and(|o| site.ha.get(o).is_ok_and(|r| r.alive))
        })
    };
    assert!(
        eventually(Duration::from_secs(30), || settled(&site)),
        "edges not back after the graceful stop\n{}",
        site.context()
    );

    // The newest session wins: an edge restarted while its old session is still open lands
    // on another replica, which closes the old one at once (not after --dead-after).
    let last = names.len() - 1;
    let mut moved_once = false;
    for _ in 0..6 {
        let old = site.owner(&names[last]).unwrap();
        let before = site.replica(&old).metric("cloudcore_sessions_moved_total");
        site.edges[last].1.kill();
        let dir = site.edges[last].1.dir.clone();
        site.edges[last].1 = Edge::start(&dir);
        assert!(
            eventually(Duration::from_secs(20), || settled(&site)),
            "restarted edge not back\n{}",
            site.context()
        );
        // The new session's replica records its claim a moment after the edge connects
        // (its claim loop runs every 250 ms): give it that moment before concluding the edge
        // landed on the same replica again.
        let moved = eventually(Duration::from_secs(5), || {
            site.owner(&names[last]).is_some_and(|o| o != old)
        });
        if moved {
            let closed = eventually(Duration::from_secs(3), || {
                site.replica(&old).metric("cloudcore_sessions_moved_total") > before
            });
            assert!(
                closed,
                "{old} kept the stale session of {}\n{}",
                names[last],
                site.context()
            );
            moved_once = true;
            break;
        }
    }
    assert!(
        moved_once,
        "the restarted edge never landed on another replica in 6 tries"
    );
    let connected: f64 = site
        .ha
        .replicas
        .iter()
        .map(|r| r.metric("cloudcore_connected_edges"))
        .sum();
    assert_eq!(
        connected,
        EDGES as f64,
        "one session per edge\n{}",
        site.context()
    );
    let owners: Vec<String> = names.iter().map(|n| site.owner(n).unwrap()).collect();

    // A pod on the containerd edge.
    let e0 = names[0].clone();
    site.cluster.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&pod_yaml(
            "logger",
            &e0,
            "echo hello-from-edge; while true; do sleep 1; done",
            "",
        )),
    );
    let running = eventually(Duration::from_secs(60), || {
        site.pod("logger")
            .is_some_and(|p| p["status"]["containerStatuses"][0]["state"]["running"].is_object())
    });
    assert!(running, "pod logger not running\n{}", site.context());
    let container_id = |site: &Site| {
        site.pod("logger").map(|p| {
            (
                p["status"]["containerStatuses"][0]["containerID"].clone(),
                p["status"]["containerStatuses"][0]["restartCount"].clone(),
            )
        })
    };
    let before = container_id(&site);

    // Streams for a pod whose session is on B, sent to A's kubelet endpoint.
    let b = site.owner(&e0).unwrap();
    let a = ids.iter().find(|id| **id != b).unwrap().clone();
    let port = site.kubelet_port(&e0);
    let a_ip = site.replica(&a).ip;
    let (code, body) = kubelet_call(
        &site.cluster,
        (a_ip, port),
        "GET",
        "/containerLogs/default/logger/c",
    );
    assert!(
        code == 200 && body.contains("hello-from-edge"),
        "logs through {a} for a session on {b}: {code} {body}\n{}",
        site.context()
    );
    let (code, body) = kubelet_call(
        &site.cluster,
        (a_ip, port),
        "POST",
        "/run/default/logger/c?cmd=echo%20ran-through-a",
    );
    assert!(
        code == 200 && body.contains("ran-through-a"),
        "exec (/run) through {a} for a session on {b}: {code} {body}\n{}",
        site.context()
    );
    assert!(site.replica(&a).metric("cloudcore_kubelet_forwarded_total") >= 2.0);
    let logs = site.cluster.kubectl_ok(&["logs", "logger"], None);
    assert!(logs.contains("hello-from-edge"), "kubectl logs: {logs}");

    // Kill B (holding the pod's edge) with -9 under churn.
    let moved: Vec<String> = names
        .iter()
        .zip(&owners)
        .filter(|(_, o)| **o == b)
        .map(|(n, _)| n.clone())
        .collect();
    let stop_churn = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop_churn.clone();
        let kubeconfig = site.cluster.kubeconfig.clone();
        let cache = site.tmp.path().join("kubectl-cache");
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let _ = integration::cluster::kubectl(
                    &kubeconfig,
                    &cache,
                    &[
                        "annotate",
                        "--overwrite",
                        "pod",
                        "logger",
                        &format!("churn={n}"),
                    ],
                    None,
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            n
        })
    };
    let killed_at = Instant::now();
    site.kill(&b);
    // The Node still names dead B: A answers itself instead of dropping the connection.
    let (code, body) = kubelet_call(&site.cluster, (a_ip, port), "GET", "/healthz");
    assert_ne!(
        code, 0,
        "A dropped a kubelet connection for a node of dead {b}: {body}"
    );
    // A pod applied during the failover, for every moved edge.
    for name in &moved {
        site.cluster.kubectl_ok(
            &["apply", "-f", "-"],
            Some(&pod_yaml(&format!("after-{name}"), name, "sleep 3600", "")),
        );
    }
    let mut back: Vec<Option<Duration>> = vec![None; moved.len()];
    let all_back = eventually(Duration::from_secs(45), || {
        for (i, name) in moved.iter().enumerate() {
            if back[i].is_none()
                && site.owner(name).is_some_and(|o| o != b)
                && site.edges.iter().any(|(n, e)| n == name && e.connected())
            {
                back[i] = Some(killed_at.elapsed());
            }
        }
        back.iter().all(Option::is_some)
    });
    assert!(
        all_back,
        "edges of {b} not all back on another replica within 45 s: {back:?}\n{}",
        site.context()
    );
    let times: Vec<Duration> = back.into_iter().flatten().collect();
    eprintln!(
        "failover of {} edges: median {:?}, all {times:?}",
        times.len(),
        median(times.clone())
    );
    for name in &moved {
        let pod = format!("after-{name}");
        let dir = site.tmp.path().join(name);
        let arrived = eventually(Duration::from_secs(30), || {
            integration::edge_objects(&dir)
                .iter()
                .any(|o| o.kind == "Pod" && o.name == pod)
        });
        assert!(
            arrived,
            "{pod}, applied during the failover, never reached {name}\n{}",
            site.context()
        );
    }
    stop_churn.store(true, std::sync::atomic::Ordering::SeqCst);
    let churned = churn.join().expect("churn thread");
    assert!(churned > 0);
    let last = format!("churn={churned}");
    let synced = eventually(Duration::from_secs(30), || {
        site.pod("logger")
            .is_some_and(|p| p["metadata"]["annotations"]["churn"].as_str() == Some(&last[6..]))
    });
    assert!(synced);
    assert_eq!(
        container_id(&site),
        before,
        "the pod's container was restarted by the failover\n{}",
        site.context()
    );
    let (code, body) = {
        let owner = site.owner(&e0).unwrap();
        let ip = site.replica(&owner).ip;
        kubelet_call(
            &site.cluster,
            (ip, port),
            "POST",
            "/run/default/logger/c?cmd=echo%20after",
        )
    };
    assert!(
        code == 200 && body.contains("after"),
        "exec after failover: {code} {body}"
    );

    // The leader killed (if B was not it): another replica holds the Lease within its
    // duration, and the once-only work goes on.
    let leader_killed_at = if leader == b {
        killed_at
    } else {
        let at = Instant::now();
        site.kill(&leader);
        at
    };
    let taken = eventually(LEASE_DURATION + Duration::from_secs(10), || {
        site.lease_holder()
            .is_some_and(|h| h != leader && site.ha.replicas.iter().any(|r| r.alive && r.id == h))
    });
    assert!(
        taken,
        "no live replica took the lease over\n{}",
        site.context()
    );
    let took = leader_killed_at.elapsed();
    eprintln!("lease taken over {took:?} after the leader was killed");
    assert!(
        took <= LEASE_DURATION + Duration::from_secs(10),
        "lease handed over after {took:?}"
    );
    let new_leader = site.lease_holder().unwrap();
    assert_eq!(site.replica(&new_leader).metric("cloudcore_leader"), 1.0);
    let target = names.last().unwrap().clone();
    site.cluster.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&pod_yaml(
            "tolerant",
            &target,
            "sleep 3600",
            "edge.io/autonomy-duration: 42s",
        )),
    );
    let tolerated = eventually(Duration::from_secs(30), || {
        site.pod("tolerant").is_some_and(|p| {
            p["spec"]["tolerations"].as_array().is_some_and(|ts| {
                ts.iter().any(|t| {
                    t["key"] == "node.kubernetes.io/unreachable" && t["tolerationSeconds"] == 42
                })
            })
        })
    });
    assert!(
        tolerated,
        "the new leader did not write the autonomy toleration\n{}",
        site.context()
    );
}

/// The replica flags are kube mode's: embedded mode (one process) refuses them, and a Lease
/// name without an election is refused, each with exit 64 naming the flag.
#[test]
fn replica_flags_are_refused_where_they_mean_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = |args: &[&str]| {
        Command::new(integration::bin("cloudcore"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("cloud"))
            .args(args)
            .output()
            .expect("run cloudcore")
    };
    for (args, flag) in [
        (
            &["--control-plane", "embedded", "--replica-id", "r1"][..],
            "--replica-id",
        ),
        (
            &["--control-plane", "embedded", "--leader-elect", "false"][..],
            "--leader-elect",
        ),
        (
            &[
                "--control-plane",
                "kube",
                "--kubeconfig",
                "/nonexistent",
                "--leader-elect=false",
                "--leader-elect-lease",
                "other",
            ][..],
            "--leader-elect-lease",
        ),
        (
            &[
                "--control-plane",
                "kube",
                "--kubeconfig",
                "/nonexistent",
                "--replica-id",
                "Not_A_Name",
            ][..],
            "--replica-id",
        ),
    ] {
        let out = serve(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
