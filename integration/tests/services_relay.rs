//! The relay of Services and EndpointSlices to edges (docs/services.md, "Relay: which Services
//! an edge holds"), in both control-plane modes, with kubectl, real `edgecore run` edges and a
//! raw tunnel peer standing for the gateway the Service's pods run on:
//!
//! - every Service of the cluster (`default/kubernetes` included) and every EndpointSlice
//!   reach every edge's store; a Service labelled `service.kubernetes.io/service-proxy-name`
//!   and its slices stay away;
//! - the slices are the controller's (kube-controller-manager's in kube mode, cloudcore's in
//!   embedded mode): the pods' IPs with the readiness their edge reported, and they follow
//!   when the edge reports a change;
//! - an edge that joins later gets them all; a deleted Service and its slices leave every edge;
//! - `edgecore ctl get services|endpointslices` lists them in kubectl's columns.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use integration::cluster::{ClusterOptions, KubeCluster};
use integration::peer::Session;
use integration::{Cloud, Edge, bin, edge_objects, eventually, join};
use proto::Message;
use serde_json::{Value, json};

/// The Services and pods of the test: `web` selects two pods on the raw peer's node;
/// `mesh` belongs to another proxy.
const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: mesh
  namespace: default
  labels: {service.kubernetes.io/service-proxy-name: other-proxy}
spec:
  selector: {app: mesh}
  ports: [{port: 81}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec:
  nodeName: gw-pods
  containers: [{name: c, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: web}}
spec:
  nodeName: gw-pods
  containers: [{name: c, image: busybox}]
"#;

const IP_1: &str = "10.244.7.11";
const IP_2: &str = "10.244.7.12";

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn start_edge(cloud: &Cloud, tmp: &Path, node: &str) -> Edge {
    let dir = tmp.join(node);
    let dmi = dir.join("dmi.sock").display().to_string();
    let flags = [
        "--no-pod-runtime",
        "--dmi-socket",
        dmi.as_str(),
        "--mqtt-broker",
        "none",
    ];
    integration::join_and_run(cloud, &dir, node, &flags)
}

fn holds(dir: &Path, kind: &str, namespace: &str, name: &str) -> bool {
    edge_objects(dir)
        .iter()
        .any(|o| o.kind == kind && o.namespace == namespace && o.name == name)
}

/// The bodies of the EndpointSlices of Service `service` in the edge's store.
fn edge_slices(dir: &Path, service: &str) -> Vec<Value> {
    let Ok(store) = edgecore::store::Store::open_read_only(dir) else {
        return Vec::new();
    };
    store
        .list(&["EndpointSlice"])
        .unwrap_or_default()
        .iter()
        .filter_map(|o| serde_json::from_slice::<Value>(&o.body).ok())
        .filter(|b| b["metadata"]["labels"]["kubernetes.io/service-name"] == service)
        .collect()
}

/// Address → ready, over the slices of `service` the edge holds.
fn edge_readiness(dir: &Path, service: &str) -> Vec<(String, bool)> {
    let mut seen: Vec<(String, bool)> = edge_slices(dir, service)
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| {
            Some((
                e["addresses"][0].as_str()?.to_string(),
                e["conditions"]["ready"].as_bool().unwrap_or(false),
            ))
        })
        .collect();
    seen.sort();
    seen
}

/// `edgecore ctl get RESOURCE` on the edge's data dir.
fn ctl_get(dir: &Path, resource: &str) -> String {
    let out = std::process::Command::new(bin("edgecore"))
        .args(["ctl", "get", resource, "--data-dir"])
        .arg(dir)
        .output()
        .expect("edgecore ctl");
    assert!(
        out.status.success(),
        "ctl get {resource}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A raw tunnel peer with a node's identity: it acknowledges what the cloud sends and reports
/// the status of its pods, as the gateway running them would.
struct PodsGateway {
    session: Session,
    seq: u64,
}

impl PodsGateway {
    async fn connect(dir: &Path, cloud: &Cloud) -> PodsGateway {
        PodsGateway {
            session: Session::open(dir, cloud, Duration::from_secs(30)).await,
            seq: 0,
        }
    }

    async fn send(&mut self, message: Message) {
        self.session.send(message).await;
    }

    async fn wait_for(&mut self, what: &str, want: impl Fn(&Message) -> bool) -> Message {
        self.session.wait_for(what, want).await
    }

    /// Reports pod `name` running at `ip`, ready or not.
    async fn report(&mut self, name: &str, ip: &str, ready: bool) {
        self.seq += 1;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");
        let status = if ready { "True" } else { "False" };
        let body = json!({
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.0.2.10",
            "startTime": now,
            "conditions": [
                {"type": "Ready", "status": status, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": status, "lastTransitionTime": now},
            ],
        });
        self.send(Message::Status(proto::StatusReport {
            seq: self.seq,
            object: proto::ObjectRef {
                kind: "Pod".into(),
                namespace: "default".into(),
                name: name.into(),
                uid: String::new(),
            },
            generation: self.seq,
            status: serde_json::to_vec(&body).expect("json"),
        }))
        .await;
        let seq = self.seq;
        self.wait_for(
            "the status acknowledgement",
            |m| matches!(m, Message::Ack { seqs } if seqs.contains(&seq)),
        )
        .await;
    }
}

/// What both modes prove once cloudcore is up.
async fn services_reach_every_edge(cloud: &Cloud, tmp: &Path) {
    let edge1 = start_edge(cloud, tmp, "edge-1");
    let context = |edge: &Edge| {
        format!(
            "cloudcore log (end):\n{}\nedge log (end):\n{}",
            tail(&cloud.log(), 40),
            tail(&edge.log(), 20)
        )
    };
    // The gateway the pods run on: a raw peer that reports their status.
    let token = cloud.token(&[]);
    let gateway_dir = tmp.join("gw-pods");
    let out = join(&gateway_dir, &token, "gw-pods");
    assert!(
        out.status.success(),
        "join gw-pods: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut gateway = PodsGateway::connect(&gateway_dir, cloud).await;
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(OBJECTS));
    for pod in ["web-1", "web-2"] {
        gateway
            .wait_for(pod, |m| {
                matches!(m, Message::Upsert(u) if u.object.kind == "Pod" && u.object.name == pod)
            })
            .await;
    }
    gateway.report("web-1", IP_1, true).await;
    gateway.report("web-2", IP_2, false).await;

    // Every Service and the controller's slices, with the readiness the gateway reported.
    let want = vec![(IP_1.to_string(), true), (IP_2.to_string(), false)];
    assert!(
        eventually(Duration::from_secs(30), || {
            holds(&edge1.dir, "Service", "default", "web")
                && holds(&edge1.dir, "Service", "default", "kubernetes")
                && edge_readiness(&edge1.dir, "web") == want
        }),
        "edge-1 lacks web, kubernetes or web's endpoints ({:?}): {:?}\nAPI slices: {}\n{}",
        edge_readiness(&edge1.dir, "web"),
        edge_objects(&edge1.dir),
        cloud.kubectl_ok(&["get", "endpointslices", "-A", "-o", "wide"], None),
        context(&edge1)
    );
    // Another proxy's Service and its slices stay away (kube's controller gives it an empty
    // slice with its labels).
    let mesh_slices = cloud.kubectl_ok(
        &[
            "get",
            "endpointslices",
            "-n",
            "default",
            "-l",
            "kubernetes.io/service-name=mesh",
            "-o",
            "name",
        ],
        None,
    );
    assert!(
        !mesh_slices.trim().is_empty(),
        "the controller made no slice for mesh, so its exclusion proves nothing"
    );
    assert!(!holds(&edge1.dir, "Service", "default", "mesh"));
    assert!(
        edge_slices(&edge1.dir, "mesh").is_empty(),
        "edge-1 holds mesh's slices"
    );
    let services = ctl_get(&edge1.dir, "services");
    assert!(
        services.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.len() == 5 && cells[1] == "web" && cells[2] == "ClusterIP" && cells[4] == "80/TCP"
        }),
        "{services}"
    );
    let slices = ctl_get(&edge1.dir, "endpointslices");
    // The order of endpoints in a slice is the controller's (kube-controller-manager's follows
    // when each pod became ready), not part of the contract.
    assert!(
        (slices.contains(&format!("{IP_1},{IP_2}")) || slices.contains(&format!("{IP_2},{IP_1}")))
            && slices.contains("8080"),
        "{slices}"
    );

    // The legacy Endpoints too (what older kubectl's describe reads).
    let endpoints: Value = serde_json::from_str(&cloud.kubectl_ok(
        &["get", "endpoints", "web", "-n", "default", "-o", "json"],
        None,
    ))
    .expect("kubectl JSON");
    assert_eq!(
        endpoints["subsets"][0]["addresses"][0]["ip"], IP_1,
        "{endpoints}"
    );
    assert_eq!(
        endpoints["subsets"][0]["notReadyAddresses"][0]["ip"], IP_2,
        "{endpoints}"
    );

    // The gateway reports web-2 ready: the slices follow, on every edge.
    gateway.report("web-2", IP_2, true).await;
    let all_ready = vec![(IP_1.to_string(), true), (IP_2.to_string(), true)];
    assert!(
        eventually(Duration::from_secs(30), || edge_readiness(
            &edge1.dir, "web"
        ) == all_ready),
        "web-2's readiness did not reach edge-1: {:?}\n{}",
        edge_readiness(&edge1.dir, "web"),
        context(&edge1)
    );

    // An edge that joins later gets them all.
    let edge2 = start_edge(cloud, tmp, "edge-2");
    assert!(
        eventually(Duration::from_secs(30), || {
            holds(&edge2.dir, "Service", "default", "web")
                && holds(&edge2.dir, "Service", "default", "kubernetes")
                && edge_readiness(&edge2.dir, "web") == all_ready
        }),
        "edge-2 did not get the Services and slices: {:?}\n{}",
        edge_objects(&edge2.dir),
        context(&edge2)
    );
    assert!(!holds(&edge2.dir, "Service", "default", "mesh"));

    // A deleted Service leaves every edge, its slices with it.
    cloud.kubectl_ok(&["delete", "service", "web", "-n", "default"], None);
    for edge in [&edge1, &edge2] {
        assert!(
            eventually(Duration::from_secs(30), || {
                !holds(&edge.dir, "Service", "default", "web")
                    && edge_slices(&edge.dir, "web").is_empty()
            }),
            "web or its slices stayed on {}: {:?}\n{}",
            edge.dir.display(),
            edge_objects(&edge.dir),
            context(edge)
        );
        assert!(holds(&edge.dir, "Service", "default", "kubernetes"));
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

#[test]
fn embedded_mode_relays_services_and_the_controllers_slices() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    block_on(services_reach_every_edge(&cloud, tmp.path()));
    // The controller deletes the Endpoints it made with their Service.
    assert!(
        eventually(Duration::from_secs(10), || !cloud
            .kubectl(&["get", "endpoints", "web", "-n", "default"])
            .status
            .success()),
        "the Endpoints of a deleted Service stayed"
    );
}

#[test]
fn kube_mode_relays_the_clusters_services_and_slices() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(tmp.path(), &ClusterOptions::default());
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let cloud = Cloud::start_kube(
        tmp.path(),
        &cluster,
        &credentials,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    block_on(services_reach_every_edge(&cloud, tmp.path()));
    let forbidden: Vec<String> = cloud
        .log()
        .lines()
        .filter(|l| l.contains("is forbidden") || l.contains(" 403"))
        .map(str::to_string)
        .collect();
    assert!(
        forbidden.is_empty(),
        "the API refused cloudcore something the shipped RBAC does not grant:\n{}",
        forbidden.join("\n")
    );
}
