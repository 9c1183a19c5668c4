//! Desired state reaches the edge: real cloudcore (embedded control plane), real edgecore
//! processes with their SQLite stores, real `kubectl`, QUIC over loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::{Cloud, Edge, EdgeObject, eventually, join};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// How long a change may take to reach a connected edge (the issue's bound).
const PROPAGATION: Duration = Duration::from_secs(1);

/// An edge for these tests: the sync layer only. Pods here only carry references; without a
/// pod runtime no pod status is written back, so every object message the cloud sends is a
/// change the test made (tests/pods.rs runs pods).
fn sync_edge(dir: &Path) -> Edge {
    Edge::start_with(dir, &["--no-pod-runtime"])
}

struct Setup {
    _tmp: tempfile::TempDir,
    cloud: Cloud,
    edges: Vec<Edge>,
}

fn setup(nodes: &[&str]) -> Setup {
    setup_logging(nodes, "info")
}

fn setup_logging(nodes: &[&str], filter: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start_logging(tmp.path(), &[], filter);
    let uses = nodes.len().to_string();
    let token = cloud.token(&["--uses", &uses]);
    let edges = nodes
        .iter()
        .map(|name| {
            let dir = tmp.path().join(name);
            let out = join(&dir, &token, name);
            assert!(
                out.status.success(),
                "join {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            sync_edge(&dir)
        })
        .collect::<Vec<_>>();
    for edge in &edges {
        assert!(
            eventually(Duration::from_secs(15), || edge.connected()),
            "edge did not connect: {}",
            edge.log()
        );
    }
    Setup {
        _tmp: tmp,
        cloud,
        edges,
    }
}

fn kubectl_ok(cloud: &Cloud, args: &[&str], stdin: Option<&str>) -> String {
    let out = cloud.kubectl_with_stdin(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the edge in `dir` holds of its own node's objects: the Services and EndpointSlices every
/// edge holds (`default/kubernetes` among them; `tests/services_relay.rs` covers them) are left
/// out, so these tests see exactly what their node is bound to.
fn edge_objects(dir: &Path) -> Vec<EdgeObject> {
    integration::edge_objects(dir)
        .into_iter()
        .filter(|o| o.kind != "Service" && o.kind != "EndpointSlice")
        .collect()
}

fn names(objects: &[EdgeObject]) -> BTreeSet<(String, String)> {
    objects
        .iter()
        .map(|o| (o.kind.clone(), o.name.clone()))
        .collect()
}

fn pair(kind: &str, name: &str) -> (String, String) {
    (kind.to_string(), name.to_string())
}

/// Polls the edge's store until `check` holds; returns how long it took, or panics with what
/// the store held.
fn wait_for_store(dir: &Path, what: &str, check: impl Fn(&[EdgeObject]) -> bool) -> Duration {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < Duration::from_secs(15) {
        last = edge_objects(dir);
        if check(&last) {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not reached within 15 s; the edge holds {last:#?}");
}

const APP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: app-config, namespace: default}
data: {mode: "one"}
---
apiVersion: v1
kind: Secret
metadata: {name: app-secret, namespace: default}
stringData: {password: hunter2}
---
apiVersion: v1
kind: Secret
metadata: {name: unrelated-secret, namespace: default}
stringData: {token: nobody-needs-this}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  nodeName: edge-1
  containers:
  - name: web
    image: busybox
    env:
    - name: PASSWORD
      valueFrom: {secretKeyRef: {name: app-secret, key: password}}
    volumeMounts: [{name: config, mountPath: /etc/app}]
  volumes:
  - name: config
    configMap: {name: app-config}
"#;

#[test]
fn objects_reach_only_their_node_and_follow_changes() {
    let s = setup(&["edge-1", "edge-2"]);
    let (edge1, edge2) = (&s.edges[0].dir, &s.edges[1].dir);

    kubectl_ok(&s.cloud, &["apply", "-f", "-"], Some(APP));
    let took = wait_for_store(edge1, "pod, ConfigMap and Secret on edge-1", |objects| {
        let held = names(objects);
        held.contains(&pair("Pod", "web"))
            && held.contains(&pair("ConfigMap", "app-config"))
            && held.contains(&pair("Secret", "app-secret"))
    });
    assert!(
        took <= PROPAGATION,
        "took {took:?}, more than {PROPAGATION:?}"
    );
    let held = names(&edge_objects(edge1));
    assert!(
        !held.contains(&pair("Secret", "unrelated-secret")),
        "edge-1 holds a Secret no pod of it references: {held:?}"
    );
    assert!(held.contains(&pair("Node", "edge-1")), "{held:?}");
    assert!(!held.contains(&pair("Node", "edge-2")), "{held:?}");
    let other = names(&edge_objects(edge2));
    assert_eq!(
        other,
        BTreeSet::from([pair("Node", "edge-2")]),
        "edge-2 holds only its own Node"
    );

    // An update reaches the edge at its new resourceVersion.
    kubectl_ok(
        &s.cloud,
        &[
            "patch",
            "configmap",
            "app-config",
            "--type=merge",
            "-p",
            r#"{"data":{"mode":"two"}}"#,
        ],
        None,
    );
    let rv: u64 = kubectl_ok(
        &s.cloud,
        &[
            "get",
            "configmap",
            "app-config",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
        None,
    )
    .trim()
    .parse()
    .expect("resourceVersion");
    let took = wait_for_store(edge1, "updated ConfigMap on edge-1", |objects| {
        objects
            .iter()
            .any(|o| o.kind == "ConfigMap" && o.name == "app-config" && o.resource_version == rv)
    });
    assert!(
        took <= PROPAGATION,
        "took {took:?}, more than {PROPAGATION:?}"
    );

    // Secret values are never printed by ctl get.
    let out = std::process::Command::new(integration::bin("edgecore"))
        .args(["ctl", "get", "secrets", "--data-dir"])
        .arg(edge1)
        .output()
        .expect("ctl get");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("app-secret"), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains("aHVudGVyMg"),
        "{text}"
    );

    // Deleting the pod (immediately: no kubelet confirms a graceful delete yet) takes the
    // pod and what only it referenced off the edge.
    kubectl_ok(
        &s.cloud,
        &["delete", "pod", "web", "--grace-period=0", "--force"],
        None,
    );
    wait_for_store(
        edge1,
        "pod and its references gone from edge-1",
        |objects| names(objects) == BTreeSet::from([pair("Node", "edge-1")]),
    );

    // The edge's node status carries all four conditions.
    let types = || {
        kubectl_ok(
            &s.cloud,
            &[
                "get",
                "node",
                "edge-1",
                "-o",
                "jsonpath={.status.conditions[*].type}",
            ],
            None,
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let t = types();
            ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"]
                .iter()
                .all(|c| t.contains(c))
        }),
        "node conditions: {}\ncloud log:\n{}\nedge log:\n{}",
        types(),
        s.cloud.log(),
        s.edges[0].log()
    );
}

/// Numbers from the "resync planned" log line of the latest resync of `node`.
fn last_resync(log: &str, node: &str) -> Option<(u64, u64)> {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
    };
    log.lines()
        .rev()
        .find(|l| l.contains("resync planned") && l.contains(&format!("node.name=\"{node}\"")))
        .and_then(|l| Some((field(l, "upserts")?, field(l, "deletes")?)))
}

fn pod_with_config(name: &str, config_map: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "busybox",
                "envFrom": [{"configMapRef": {"name": config_map}}]}]
        }
    }))
    .expect("pod")
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"value": value}
    }))
    .expect("configmap")
}

/// The objects `node` should hold according to the API: its Node, its pods, and the
/// ConfigMaps they reference (the test's pods reference nothing else).
fn desired_from_api(cloud: &Cloud, node: &str) -> BTreeMap<(String, String), u64> {
    let pods: serde_json::Value =
        serde_json::from_str(&kubectl_ok(cloud, &["get", "pods", "-o", "json"], None))
            .expect("pods json");
    let maps: serde_json::Value = serde_json::from_str(&kubectl_ok(
        cloud,
        &["get", "configmaps", "-o", "json"],
        None,
    ))
    .expect("configmaps json");
    let rv = |o: &serde_json::Value| -> u64 {
        o["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    let mut desired = BTreeMap::new();
    let mut referenced = BTreeSet::new();
    for pod in pods["items"].as_array().into_iter().flatten() {
        if pod["spec"]["nodeName"] != node {
            continue;
        }
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        desired.insert(pair("Pod", name), rv(pod));
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            for from in c["envFrom"].as_array().into_iter().flatten() {
                if let Some(n) = from["configMapRef"]["name"].as_str() {
                    referenced.insert(n.to_string());
                }
            }
        }
    }
    for map in maps["items"].as_array().into_iter().flatten() {
        let name = map["metadata"]["name"].as_str().unwrap_or_default();
        if referenced.contains(name) {
            desired.insert(pair("ConfigMap", name), rv(map));
        }
    }
    let node_json: serde_json::Value = serde_json::from_str(&kubectl_ok(
        cloud,
        &["get", "node", node, "-o", "json"],
        None,
    ))
    .expect("node json");
    desired.insert(pair("Node", node), rv(&node_json));
    desired
}

fn store_map(objects: &[EdgeObject]) -> BTreeMap<(String, String), u64> {
    objects
        .iter()
        .map(|o| (pair(&o.kind, &o.name), o.resource_version))
        .collect()
}

#[test]
fn a_restarted_edge_receives_only_the_difference() {
    let mut s = setup(&["edge-1"]);
    let dir: PathBuf = s.edges[0].dir.clone();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = runtime
        .block_on(integration::kube_client(&s.cloud.kubeconfig()))
        .expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    runtime.block_on(async {
        for i in 0..30 {
            maps.create(&pp, &config_map(&format!("cm-{i}"), "0"))
                .await
                .expect("create cm");
            pods.create(
                &pp,
                &pod_with_config(&format!("pod-{i}"), &format!("cm-{i}"), "edge-1"),
            )
            .await
            .expect("create pod");
        }
    });
    // Settled: the edge holds exactly what the API says it should (its Node included, after
    // the status it reported).
    assert!(
        eventually(Duration::from_secs(20), || store_map(&edge_objects(&dir))
            == desired_from_api(&s.cloud, "edge-1")),
        "edge-1 did not settle: holds {:?}, should hold {:?}",
        store_map(&edge_objects(&dir)),
        desired_from_api(&s.cloud, "edge-1")
    );
    s.edges[0].stop();
    let before = store_map(&edge_objects(&dir));
    assert_eq!(before.len(), 61, "30 pods, 30 ConfigMaps, the Node");

    // 100 changes while the edge is away: 40 updates (20 ConfigMaps twice), 10 deletions,
    // 25 new ConfigMaps and 25 new pods referencing them.
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    runtime.block_on(async {
        for round in 1..=2 {
            for i in 0..20 {
                let patch = json!({"data": {"value": round.to_string()}});
                maps.patch(
                    &format!("cm-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .expect("update cm");
            }
        }
        for i in 20..30 {
            pods.delete(&format!("pod-{i}"), &dp)
                .await
                .expect("delete pod");
        }
        for i in 0..25 {
            maps.create(&pp, &config_map(&format!("new-cm-{i}"), "0"))
                .await
                .expect("create cm");
            pods.create(
                &pp,
                &pod_with_config(&format!("new-pod-{i}"), &format!("new-cm-{i}"), "edge-1"),
            )
            .await
            .expect("create pod");
        }
    });
    let desired = desired_from_api(&s.cloud, "edge-1");
    let upserts = desired
        .iter()
        .filter(|(k, rv)| before.get(*k) != Some(*rv))
        .count() as u64;
    let deletes = before.keys().filter(|k| !desired.contains_key(*k)).count() as u64;
    // 20 updated + 50 new (+ the Node if its status changed meanwhile); 10 pods + their 10
    // ConfigMaps gone.
    assert!((70..=71).contains(&upserts), "{upserts}");
    assert_eq!(deletes, 20);

    let sent_before = s
        .cloud
        .metric("cloudcore_sync_objects_sent_total{op=\"upsert\"}")
        + s.cloud
            .metric("cloudcore_sync_objects_sent_total{op=\"delete\"}");
    s.edges[0] = sync_edge(&dir);
    assert!(
        eventually(Duration::from_secs(20), || store_map(&edge_objects(&dir))
            == desired_from_api(&s.cloud, "edge-1")),
        "edge-1 did not converge: holds {:?}, should hold {:?}",
        store_map(&edge_objects(&dir)),
        desired_from_api(&s.cloud, "edge-1")
    );
    let (planned_upserts, planned_deletes) =
        last_resync(&s.cloud.log(), "edge-1").unwrap_or_else(|| {
            panic!(
                "no resync planned line in the cloud log:\n{}",
                s.cloud.log()
            )
        });
    // The Node may also change right at reconnect (status, Ready): at most one more.
    assert!(
        planned_upserts == upserts || planned_upserts == upserts + 1,
        "resync planned {planned_upserts} upserts, the difference is {upserts}"
    );
    assert_eq!(planned_deletes, deletes, "resync deletes");
    let sent = s
        .cloud
        .metric("cloudcore_sync_objects_sent_total{op=\"upsert\"}")
        + s.cloud
            .metric("cloudcore_sync_objects_sent_total{op=\"delete\"}")
        - sent_before;
    // What was sent is the difference (plus Node updates from the reconnect itself), far from
    // the 106 objects edge-1 now holds.
    assert!(
        sent >= (upserts + deletes) as f64 && sent <= (upserts + deletes + 3) as f64,
        "sent {sent} objects for a difference of {}",
        upserts + deletes
    );
}

/// The latest acknowledged resourceVersion per (kind, name) of `node`, from the cloud's
/// debug log.
fn acknowledged(log: &str, node: &str) -> BTreeMap<(String, String), Option<u64>> {
    let mut acked = BTreeMap::new();
    for line in log.lines() {
        if !line.contains("acknowledged") || !line.contains(&format!("node={node}")) {
            continue;
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        let (Some(kind), Some(name), Some(rv), Some(deleted)) = (
            field("kind"),
            field("name"),
            field("resource_version"),
            field("deleted"),
        ) else {
            continue;
        };
        let version = (deleted != "true").then(|| rv.parse().unwrap_or_default());
        acked.insert((kind, name), version);
    }
    acked
}

#[test]
fn kill_9_during_an_update_stream_never_loses_an_acknowledged_version() {
    let mut s = setup_logging(&["edge-1"], "info,cloudcore::sync::acked=debug");
    let dir = s.edges[0].dir.clone();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = runtime
        .block_on(integration::kube_client(&s.cloud.kubeconfig()))
        .expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    runtime.block_on(async {
        for i in 0..5 {
            maps.create(
                &PostParams::default(),
                &config_map(&format!("hot-{i}"), "0"),
            )
            .await
            .expect("cm");
            pods.create(
                &PostParams::default(),
                &pod_with_config(&format!("p-{i}"), &format!("hot-{i}"), "edge-1"),
            )
            .await
            .expect("pod");
        }
    });
    wait_for_store(&dir, "initial objects", |o| o.len() == 11);

    // A stream of updates for the whole test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let maps = maps.clone();
        runtime.spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let patch = json!({"data": {"value": n.to_string()}});
                let _ = maps
                    .patch(
                        &format!("hot-{}", n % 5),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
            n
        })
    };
    let mut checked = 0;
    for round in 0..6u64 {
        std::thread::sleep(Duration::from_millis(300 + 170 * round));
        s.edges[0].kill();
        // Acknowledgements already on the wire reach the cloud and are logged.
        std::thread::sleep(Duration::from_millis(300));
        let acked = acknowledged(&s.cloud.log(), "edge-1");
        assert!(!acked.is_empty(), "no acknowledgement logged");
        // The store opens cleanly after the kill and holds every acknowledged version (or a
        // newer one), whatever its kind.
        let held = store_map(&integration::edge_objects(&dir));
        for (key, version) in &acked {
            match version {
                Some(rv) => {
                    let have = held.get(key).copied();
                    assert!(
                        have.is_some_and(|h| h >= *rv),
                        "round {round}: {key:?} acknowledged at {rv}, store has {have:?}"
                    );
                    checked += 1;
                }
                None => assert!(!held.contains_key(key), "{key:?} acknowledged deleted"),
            }
        }
        s.edges[0] = sync_edge(&dir);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let updates = runtime.block_on(writer).expect("writer");
    assert!(updates > 20, "only {updates} updates were made");
    assert!(checked > 0);
    // And it converges on the final state.
    let final_rvs = {
        let list = kubectl_ok(&s.cloud, &["get", "configmaps", "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&list).expect("json");
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    pair(
                        "ConfigMap",
                        m["metadata"]["name"].as_str().unwrap_or_default(),
                    ),
                    m["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|r| r.parse::<u64>().ok())
                        .unwrap_or_default(),
                )
            })
            .filter(|(k, _)| k.1.starts_with("hot-"))
            .collect::<BTreeMap<_, _>>()
    };
    wait_for_store(&dir, "final versions", |objects| {
        let held = store_map(objects);
        final_rvs.iter().all(|(k, rv)| held.get(k) == Some(rv))
    });
}

#[test]
fn a_restarted_cloudcore_tells_its_edges_nothing_they_already_hold() {
    let mut s = setup(&["edge-1"]);
    let dir = s.edges[0].dir.clone();
    kubectl_ok(&s.cloud, &["apply", "-f", "-"], Some(APP));
    wait_for_store(&dir, "the app on edge-1", |objects| objects.len() == 4);
    assert!(
        eventually(Duration::from_secs(20), || store_map(&edge_objects(&dir))
            .get(&pair("Node", "edge-1"))
            .copied()
            == desired_from_api(&s.cloud, "edge-1")
                .get(&pair("Node", "edge-1"))
                .copied()),
        "the Node settled"
    );
    let before = store_map(&edge_objects(&dir));

    // A fresh cloudcore knows nothing until its watchers have listed everything: the edge's
    // resync must not start from an empty cache (which would delete everything it holds).
    s.cloud.restart();
    assert!(
        eventually(Duration::from_secs(20), || s.edges[0].connected()
            && last_resync(&s.cloud.log(), "edge-1").is_some()),
        "edge-1 reconnected and resynced: {}",
        s.cloud.log()
    );
    let (upserts, deletes) = last_resync(&s.cloud.log(), "edge-1").expect("resync line");
    assert_eq!(deletes, 0, "nothing the edge holds is deleted");
    assert!(upserts <= 1, "at most the Node changed: {upserts} upserts");
    let after = store_map(&edge_objects(&dir));
    for (key, rv) in &before {
        if key.0 != "Node" {
            assert_eq!(after.get(key), Some(rv), "{key:?} unchanged");
        }
    }
}
