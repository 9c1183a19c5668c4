//! No eviction by default: pods of an edge node that loses the cloud stay, unless they or their
//! node opt out with `edge.io/autonomy-duration`. Real cloudcore (embedded control plane, which
//! taints unreachable nodes and runs the taint eviction itself), real edgecore processes
//! without a pod runtime (the cloud side is what is tested), real `kubectl`.

use std::time::{Duration, Instant};

use integration::{Cloud, Edge, eventually, join};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};

const ANNOTATION: &str = "edge.io/autonomy-duration";
const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NOT_READY: &str = "node.kubernetes.io/not-ready";

fn kubectl_ok(cloud: &Cloud, args: &[&str], stdin: Option<&str>) -> String {
    let out = cloud.kubectl_with_stdin(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pod(cloud: &Cloud, name: &str) -> Option<Pod> {
    let out = cloud.kubectl(&["get", "pod", name, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn node(cloud: &Cloud, name: &str) -> Node {
    serde_json::from_str(&kubectl_ok(
        cloud,
        &["get", "node", name, "-o", "json"],
        None,
    ))
    .expect("node JSON")
}

fn ready(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

/// `timeAdded` (Unix seconds) of the node's unreachable NoExecute taint, if it has one.
fn unreachable_since(node: &Node) -> Option<i64> {
    node.spec
        .as_ref()?
        .taints
        .as_ref()?
        .iter()
        .find(|t| t.key == UNREACHABLE && t.effect == "NoExecute")
        .map(|t| t.time_added.as_ref().map_or(0, |time| time.0.as_second()))
}

/// `tolerationSeconds` of the pod's NoExecute toleration of `key`: `Some(None)` for one without
/// seconds (forever), `None` for no such toleration.
fn toleration(pod: &Pod, key: &str) -> Option<Option<i64>> {
    pod.spec
        .as_ref()?
        .tolerations
        .as_ref()?
        .iter()
        .find(|t| t.key.as_deref() == Some(key) && t.effect.as_deref() == Some("NoExecute"))
        .map(|t| t.toleration_seconds)
}

/// Both managed tolerations of `name` carry `seconds`.
fn tolerates_for(cloud: &Cloud, name: &str, seconds: Option<i64>) -> bool {
    pod(cloud, name).is_some_and(|p| {
        toleration(&p, UNREACHABLE) == Some(seconds) && toleration(&p, NOT_READY) == Some(seconds)
    })
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// A pod bound to `node` (no scheduler involved), with extra metadata and spec fields.
fn pod_yaml(name: &str, node: &str, metadata: Value, spec: Value) -> String {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "localhost/busybox:1"}]},
    });
    for (k, v) in metadata.as_object().into_iter().flatten() {
        pod["metadata"][k] = v.clone();
    }
    for (k, v) in spec.as_object().into_iter().flatten() {
        pod["spec"][k] = v.clone();
    }
    pod.to_string()
}

fn apply(cloud: &Cloud, yaml: &str) {
    kubectl_ok(cloud, &["apply", "-f", "-"], Some(yaml));
}

struct Setup {
    _tmp: tempfile::TempDir,
    cloud: Cloud,
    edges: Vec<Edge>,
}

fn setup(nodes: &[&str], cloud_flags: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), cloud_flags);
    let token = cloud.token(&["--uses", &nodes.len().to_string()]);
    let edges: Vec<Edge> = nodes
        .iter()
        .map(|name| {
            let dir = tmp.path().join(name);
            let out = join(&dir, &token, name);
            assert!(
                out.status.success(),
                "join {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Edge::start_with(&dir, &["--no-pod-runtime"])
        })
        .collect();
    for name in nodes {
        assert!(
            eventually(Duration::from_secs(15), || ready(&node(&cloud, name))
                == "True"),
            "{name} never Ready; cloud log:\n{}",
            cloud.log()
        );
    }
    Setup {
        _tmp: tmp,
        cloud,
        edges,
    }
}

#[test]
fn annotations_set_the_tolerations_pod_over_node_and_follow_changes() {
    let s = setup(&["gw-1"], &[]);
    let cloud = &s.cloud;
    // A node that is not an edge (no edge role label): its pods are never touched.
    apply(
        cloud,
        r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cluster-node"}}"#,
    );
    let admission_default = json!({"tolerations": [
        {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
    ]});
    for yaml in [
        pod_yaml("plain", "gw-1", json!({}), json!({})),
        pod_yaml("admitted", "gw-1", json!({}), admission_default.clone()),
        pod_yaml(
            "opted-out",
            "gw-1",
            json!({"annotations": {ANNOTATION: "5s"}}),
            json!({}),
        ),
        pod_yaml(
            "garbled",
            "gw-1",
            json!({"annotations": {ANNOTATION: "soon"}}),
            json!({}),
        ),
        pod_yaml("elsewhere", "cluster-node", json!({}), admission_default),
    ] {
        apply(cloud, &yaml);
    }
    let settled = |expected: &[(&str, Option<i64>)]| {
        eventually(Duration::from_secs(10), || {
            expected
                .iter()
                .all(|(name, seconds)| tolerates_for(cloud, name, *seconds))
        })
    };
    assert!(
        settled(&[
            ("plain", None),
            ("admitted", None),
            ("opted-out", Some(5)),
            ("garbled", None),
        ]),
        "default: forever (DefaultTolerationSeconds' 300 s removed, an invalid value ignored); the pod's annotation otherwise; cloud log:\n{}",
        cloud.log()
    );
    let admitted = pod(cloud, "admitted").expect("admitted");
    assert_eq!(
        admitted
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_ref())
            .map(Vec::len),
        Some(2),
        "existing tolerations changed in place, none added"
    );

    kubectl_ok(
        cloud,
        &["annotate", "node", "gw-1", &format!("{ANNOTATION}=2m")],
        None,
    );
    assert!(
        settled(&[
            ("plain", Some(120)),
            ("admitted", Some(120)),
            ("opted-out", Some(5))
        ]),
        "the node's annotation applies to pods without their own"
    );
    kubectl_ok(
        cloud,
        &["annotate", "pod", "opted-out", &format!("{ANNOTATION}-")],
        None,
    );
    assert!(
        settled(&[("opted-out", Some(120))]),
        "without its own annotation the pod takes its node's"
    );
    kubectl_ok(
        cloud,
        &["annotate", "pod", "plain", &format!("{ANNOTATION}=forever")],
        None,
    );
    kubectl_ok(
        cloud,
        &["annotate", "node", "gw-1", &format!("{ANNOTATION}-")],
        None,
    );
    assert!(
        settled(&[
            ("plain", None),
            ("admitted", None),
            ("opted-out", None),
            ("garbled", None)
        ]),
        "back to forever"
    );

    let elsewhere = pod(cloud, "elsewhere").expect("elsewhere");
    assert_eq!(
        toleration(&elsewhere, UNREACHABLE),
        Some(Some(300)),
        "a pod on a node that is not an edge keeps its tolerations"
    );
    let patches = cloud.metric("cloudcore_autonomy_toleration_patches_total");
    assert!(
        patches >= 10.0,
        "4 pods at first, 3 for the node annotation, 1, then 4: {patches}"
    );
}

#[test]
fn pods_of_a_partitioned_edge_stay_unless_opted_out_and_are_not_recreated_after_the_heal() {
    let grace = Duration::from_secs(3);
    let mut s = setup(&["gw-a", "gw-b"], &["--node-grace-period", "3s"]);
    let cloud = &s.cloud;
    kubectl_ok(
        cloud,
        &["annotate", "node", "gw-b", &format!("{ANNOTATION}=5s")],
        None,
    );
    // On gw-a (no node annotation): a bare pod; one that arrived with 1 s tolerations (as from
    // a DefaultTolerationSeconds set very low), which would be gone a second after the taint if
    // they were kept; and one that opts out for 5 s. On gw-b (node annotation 5 s): a pod that
    // inherits it, and one that insists on staying.
    let short = json!({"tolerations": [
        {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 1},
        {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 1},
    ]});
    for yaml in [
        pod_yaml("bare", "gw-a", json!({}), json!({})),
        pod_yaml("short", "gw-a", json!({}), short),
        pod_yaml(
            "opted-out",
            "gw-a",
            json!({"annotations": {ANNOTATION: "5s"}}),
            json!({}),
        ),
        pod_yaml("inherits", "gw-b", json!({}), json!({})),
        pod_yaml(
            "pinned",
            "gw-b",
            json!({"annotations": {ANNOTATION: "forever"}}),
            json!({}),
        ),
    ] {
        apply(cloud, &yaml);
    }
    let staying = ["bare", "short", "pinned"];
    let leaving = [("opted-out", "gw-a"), ("inherits", "gw-b")];
    assert!(
        eventually(Duration::from_secs(10), || {
            staying.iter().all(|p| tolerates_for(cloud, p, None))
                && leaving
                    .iter()
                    .all(|(p, _)| tolerates_for(cloud, p, Some(5)))
        }),
        "tolerations settled; cloud log:\n{}",
        cloud.log()
    );
    let uids: Vec<(&str, String)> = staying
        .iter()
        .map(|p| (*p, uid(&pod(cloud, p).expect("pod"))))
        .collect();

    // The partition: both edges go away.
    for edge in &mut s.edges {
        edge.stop();
    }
    let stopped = Instant::now();
    assert!(
        eventually(grace + Duration::from_secs(10), || ["gw-a", "gw-b"]
            .iter()
            .all(|n| unreachable_since(&node(cloud, n)).is_some())),
        "nodes not tainted unreachable; cloud log:\n{}",
        cloud.log()
    );
    for name in ["gw-a", "gw-b"] {
        let n = node(cloud, name);
        assert_eq!(ready(&n), "Unknown", "{name} Ready=Unknown with the taint");
    }
    eprintln!("tainted {:?} after the edges stopped", stopped.elapsed());

    let evicted =
        |name: &str| pod(cloud, name).is_none_or(|p| p.metadata.deletion_timestamp.is_some());
    assert!(
        eventually(Duration::from_secs(15), || leaving
            .iter()
            .all(|(p, _)| evicted(p))),
        "opted-out pods not evicted; cloud log:\n{}",
        cloud.log()
    );
    eprintln!(
        "opted-out pods evicted {:?} after the edges stopped",
        stopped.elapsed()
    );
    for (name, node_name) in leaving {
        let tainted_at = unreachable_since(&node(cloud, node_name)).expect("still tainted");
        // Graceful deletion: the pod stays Terminating until its node confirms, and its
        // deletionTimestamp is the eviction time plus the 30 s grace period.
        let p = pod(cloud, name).expect("a terminating pod stays until its node confirms");
        let deleted = p
            .metadata
            .deletion_timestamp
            .as_ref()
            .expect("deletionTimestamp")
            .0
            .as_second();
        let grace = p
            .metadata
            .deletion_grace_period_seconds
            .expect("deletionGracePeriodSeconds");
        assert!(
            deleted - grace >= tainted_at + 5 - 1,
            "{name} evicted at {}, not 5 s after {node_name}'s taint ({tainted_at})",
            deleted - grace
        );
    }
    // The opted-out pods went 5 s after the taint; the 1 s tolerations are long past.
    std::thread::sleep(Duration::from_secs(2));
    for (name, expected) in &uids {
        let p = pod(cloud, name).unwrap_or_else(|| panic!("{name} deleted"));
        assert_eq!(&uid(&p), expected, "{name} recreated");
        assert!(
            p.metadata.deletion_timestamp.is_none(),
            "{name} evicted; cloud log:\n{}",
            cloud.log()
        );
    }
    assert_eq!(
        cloud.metric("cloudcore_autonomy_evictions_total"),
        2.0,
        "exactly the two opted-out pods were evicted"
    );

    // The heal.
    let dirs: Vec<_> = s.edges.iter().map(|e| e.dir.clone()).collect();
    s.edges = dirs
        .iter()
        .map(|d| Edge::start_with(d, &["--no-pod-runtime"]))
        .collect();
    let back = |n: &Node| ready(n) == "True" && unreachable_since(n).is_none();
    assert!(
        eventually(Duration::from_secs(10), || ["gw-a", "gw-b"]
            .iter()
            .all(|n| back(&node(cloud, n)))),
        "nodes not Ready and untainted after the edges came back; cloud log:\n{}",
        cloud.log()
    );
    // Give anything that would restart or recreate pods time to show.
    std::thread::sleep(Duration::from_secs(3));
    for (name, expected) in &uids {
        let p = pod(cloud, name).unwrap_or_else(|| panic!("{name} gone after the heal"));
        assert_eq!(&uid(&p), expected, "{name} recreated after the heal");
        assert!(
            p.metadata.deletion_timestamp.is_none(),
            "{name} deleted after the heal"
        );
    }
    assert_eq!(cloud.metric("cloudcore_autonomy_evictions_total"), 2.0);
}
