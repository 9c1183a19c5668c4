//! core/v1 Events end to end (docs/events.md): the kubelet's pod events recorded at the edge
//! (real containerd), carried up the tunnel, aggregated and written by cloudcore, and read
//! back with real kubectl (`get events`, `describe pod`); the embedded scheduler's events; a
//! partitioned edge's bounded buffer; a forged event refused. In kube mode against a real
//! control plane (`KubeCluster`) with cloudcore holding only the shipped RBAC.
//!
//! Needs root, containerd, runc, CNI plugins, busybox-static, iproute2 and iptables, and for
//! kube mode etcd-server, xz-utils, openssl and curl (`.ci/run` installs them); without them
//! the tests fail saying what is missing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::netns::EdgeNet;
use integration::{Cloud, Containerd, Edge, eventually, join};
use proto::{EdgeEvent, EventType, FrameReader, FrameWriter, Hello, Message, NodeInfo, ObjectRef};
use serde_json::Value;

/// An image no registry serves: the pull fails at once (nothing listens on localhost:443).
const MISSING: &str = "localhost/edge/nonexistent:1";

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn missing_image_pod(name: &str, node: Option<&str>) -> String {
    let node = node.map_or(String::new(), |n| format!("  nodeName: {n}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{node}  automountServiceAccountToken: false\n  containers:\n  - name: app\n    image: {MISSING}\n"
    )
}

/// The Events about pod `name` in namespace `default`, as `kubectl get events -o json` lists
/// them.
fn events_about(kubectl: &dyn Fn(&[&str]) -> String, name: &str) -> Vec<Value> {
    let selector = format!("involvedObject.name={name}");
    let text = kubectl(&["get", "events", "--field-selector", &selector, "-o", "json"]);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default()
}

/// An RFC 3339 time of an Event, or the epoch when missing.
fn timestamp(value: &Value) -> time::OffsetDateTime {
    value
        .as_str()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn count(event: &Value) -> i64 {
    event["count"].as_i64().unwrap_or(0)
}

/// Waits until the pod's events show the kubelet's missing-image sequence with the
/// back-off's repeats counted (BackOff and `Error: ImagePullBackOff` at count 2 or more);
/// returns the events.
fn wait_for_pull_failures(
    kubectl: &dyn Fn(&[&str]) -> String,
    name: &str,
    context: &dyn Fn() -> String,
) -> Vec<Value> {
    let mut events = Vec::new();
    let seen = eventually(Duration::from_secs(60), || {
        events = events_about(kubectl, name);
        let with = |reason: &str, message: &str| {
            events.iter().find(|e| {
                e["reason"] == reason && e["message"].as_str().is_some_and(|m| m.contains(message))
            })
        };
        with("Failed", &format!("Failed to pull image \"{MISSING}\"")).is_some()
            && with("Failed", "Error: ErrImagePull").is_some()
            && with("BackOff", &format!("Back-off pulling image \"{MISSING}\""))
                .is_some_and(|e| count(e) >= 2)
            && with("Failed", "Error: ImagePullBackOff").is_some_and(|e| count(e) >= 2)
    });
    assert!(
        seen,
        "the pod's events never showed the failed pulls with counted back-offs:\n{}\n{}",
        serde_json::to_string_pretty(&events).unwrap_or_default(),
        context()
    );
    events
}

/// What every kubelet event about the pod holds, and one Event object per repeated kind.
fn check_kubelet_events(events: &[Value], pod_uid: &str, node: &str) {
    let mut objects: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e["source"]["component"] == "kubelet")
    {
        assert_eq!(e["involvedObject"]["uid"], pod_uid, "{e}");
        assert_eq!(e["involvedObject"]["kind"], "Pod", "{e}");
        assert_eq!(e["source"]["host"], node, "{e}");
        // MissingClusterDNS (these edges run with --cluster-dns none) is about the pod.
        if e["reason"] != "MissingClusterDNS" {
            assert_eq!(
                e["involvedObject"]["fieldPath"], "spec.containers{app}",
                "the kubelet names the container: {e}"
            );
        }
        *objects
            .entry((
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            ))
            .or_default() += 1;
    }
    let repeated: Vec<_> = objects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "a repeat must raise the count of its Event, not create another: {repeated:?}"
    );
    let backoff = events
        .iter()
        .find(|e| e["reason"] == "BackOff")
        .expect("a BackOff event");
    assert_eq!(
        backoff["type"], "Normal",
        "the kubelet's image back-off is Normal"
    );
    assert!(
        timestamp(&backoff["lastTimestamp"]) > timestamp(&backoff["firstTimestamp"]),
        "a counted event spans its repeats: {backoff}"
    );
}

/// The kubelet's events and the scheduler's with a real edge and containerd, in embedded mode;
/// then a forged event from another node is refused while that node's own is written.
#[test]
fn a_missing_image_shows_failed_and_backoff_events_counted_and_scheduler_events() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let edge_dir = tmp.path().join("edge-1");
    let out = join(&edge_dir, &token, "edge-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edge = Edge::start_with(&edge_dir, &["--cri-endpoint", &containerd.endpoint]);
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "{}",
        edge.log()
    );
    let kubectl = |args: &[&str]| cloud.kubectl_ok(args, None);
    let context = || {
        format!(
            "cloudcore log (end):\n{}\nedge log (end):\n{}",
            tail(&cloud.log(), 30),
            tail(&edge.log(), 30)
        )
    };

    // Scheduled by the embedded scheduler (no nodeName), and one that fits nowhere.
    let started = Instant::now();
    cloud.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&missing_image_pod("missing", None)),
    );
    cloud.kubectl_ok(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: nowhere}\nspec:\n  nodeSelector: {zone: mars}\n  containers:\n  - name: app\n    image: localhost/edge/busybox:1\n"),
    );
    let events = wait_for_pull_failures(&kubectl, "missing", &context);
    eprintln!(
        "pull failures with counted back-offs after {:?}",
        started.elapsed()
    );
    let pod = cloud.pod("missing").expect("pod");
    let uid = pod["metadata"]["uid"].as_str().expect("uid").to_string();
    check_kubelet_events(&events, &uid, "edge-1");
    let scheduled = events
        .iter()
        .find(|e| e["reason"] == "Scheduled")
        .unwrap_or_else(|| panic!("no Scheduled event: {events:?}"));
    assert_eq!(scheduled["source"]["component"], "default-scheduler");
    assert_eq!(
        scheduled["message"],
        "Successfully assigned default/missing to edge-1"
    );
    assert_eq!(scheduled["involvedObject"]["uid"], uid.as_str());
    let pulling = events
        .iter()
        .find(|e| e["reason"] == "Pulling")
        .expect("a Pulling event");
    assert_eq!(pulling["message"], format!("Pulling image \"{MISSING}\""));
    let mut unschedulable = Vec::new();
    assert!(
        eventually(Duration::from_secs(20), || {
            unschedulable = events_about(&kubectl, "nowhere");
            unschedulable.iter().any(|e| {
                e["reason"] == "FailedScheduling"
                    && e["type"] == "Warning"
                    && e["source"]["component"] == "default-scheduler"
                    && e["message"]
                        == "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
            })
        }),
        "no FailedScheduling event for the pod that fits nowhere: {unschedulable:?}"
    );

    // What a user reads.
    let described = kubectl(&["describe", "pod", "missing"]);
    for expected in [
        "Scheduled",
        "Successfully assigned default/missing to edge-1",
        "Pulling",
        "Failed to pull image",
        "Error: ErrImagePull",
        "BackOff",
        "Back-off pulling image",
        "Error: ImagePullBackOff",
        " over ",
    ] {
        assert!(
            described.contains(expected),
            "`kubectl describe pod` lacks {expected:?}:\n{described}"
        );
    }
    let listed = kubectl(&["get", "events"]);
    assert!(
        listed.contains("pod/missing")
            && listed.contains("BackOff")
            && listed.contains("FailedScheduling"),
        "`kubectl get events`:\n{listed}"
    );

    // Another node's session may write its own Node's events, never about edge-1's pod.
    let other = tmp.path().join("edge-2");
    let out = join(&other, &cloud.token(&[]), "edge-2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forged = EdgeEvent {
        object: ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "missing".into(),
            uid: uid.clone(),
        },
        field_path: "spec.containers{app}".into(),
        type_: EventType::Warning,
        reason: "Forged".into(),
        message: "written by another node".into(),
        count: 1,
        first_timestamp_ms: 0,
        last_timestamp_ms: 0,
    };
    let own = EdgeEvent {
        object: ObjectRef {
            kind: "Node".into(),
            namespace: String::new(),
            name: "edge-2".into(),
            uid: String::new(),
        },
        field_path: String::new(),
        type_: EventType::Normal,
        reason: "NodeHasSufficientMemory".into(),
        message: "Node edge-2 status is now: NodeHasSufficientMemory".into(),
        ..forged.clone()
    };
    // Multi-threaded: the checks below block their thread while the connection must go on.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let connection = integration::peer::connect_as(&other, &cloud).await;
        let (send, recv) = connection.open_bi().await.expect("stream");
        let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
        let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
        writer
            .send(Message::Hello(Hello {
                version: proto::PROTOCOL_VERSION,
                node_info: NodeInfo::default(),
                inventory: Vec::new(),
                cloud_state_id: String::new(),
            }))
            .await
            .expect("hello");
        let ack = reader.next().await.expect("read").expect("reply");
        assert!(matches!(ack, Message::HelloAck(_)), "{ack:?}");
        writer
            .send(Message::Events(vec![forged, own]))
            .await
            .expect("events");
        assert!(
            eventually(Duration::from_secs(10), || {
                cloud.metric("cloudcore_edge_events_refused_total{reason=\"forbidden\"}") == 1.0
            }),
            "the forged event was not refused:\n{}",
            cloud.metrics()
        );
        let mut node_events = Vec::new();
        assert!(
            eventually(Duration::from_secs(10), || {
                node_events = events_about(&kubectl, "edge-2");
                node_events
                    .iter()
                    .any(|e| e["reason"] == "NodeHasSufficientMemory")
            }),
            "the node's event about itself was not written: {node_events:?}"
        );
        let node_event = &node_events[0];
        assert_eq!(node_event["source"]["host"], "edge-2");
        assert_eq!(node_event["involvedObject"]["kind"], "Node");
        connection.close(0u32.into(), b"done");
    });
    let events = events_about(&kubectl, "missing");
    assert!(
        events.iter().all(|e| e["reason"] != "Forged"),
        "a forged event reached the API: {events:?}"
    );
    assert!(cloud.metric("cloudcore_edge_events_received_total") >= 2.0);
    assert!(cloud.metric("cloudcore_events_written_total{op=\"patch\"}") >= 1.0);
    assert!(edge.metric("edgecore_events_sent_total") >= 4.0);
}

/// Kube mode: the edge's events reach the real kube-apiserver through cloudcore, written under
/// the shipped RBAC (events create and patch), counted the same way.
#[test]
fn kube_mode_writes_the_edge_events_to_the_real_api() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(
        tmp.path(),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let port = integration::free_tcp_port();
    let ports = format!("{port}-{port}");
    let cloud = Cloud::start_kube(
        tmp.path(),
        &cluster,
        &credentials,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &["--kubelet-ports", &ports],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let token = cloud.token(&[]);
    let dir: PathBuf = tmp.path().join("kube-edge");
    let out = join(&dir, &token, "kube-edge");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edge = Edge::start_with(&dir, &["--cri-endpoint", &containerd.endpoint]);
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "{}",
        edge.log()
    );
    // The Node exists once cloudcore wrote it; a pod bound to it directly (only the
    // apiserver runs, no scheduler).
    assert!(
        eventually(Duration::from_secs(20), || cluster
            .kubectl(&["get", "node", "kube-edge"], None)
            .status
            .success()),
        "no Node for the edge\n{}",
        tail(&cloud.log(), 30)
    );
    // Without kube-controller-manager nobody creates the namespace's `default`
    // ServiceAccount, which the apiserver's admission requires of a pod.
    let _ = cluster.kubectl(&["create", "serviceaccount", "default"], None);
    cluster.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&missing_image_pod("missing", Some("kube-edge"))),
    );
    let kubectl = |args: &[&str]| cluster.kubectl_ok(args, None);
    let context = || {
        format!(
            "cloudcore log (end):\n{}\nedge log (end):\n{}\nkube-apiserver log (end):\n{}",
            tail(&cloud.log(), 30),
            tail(&edge.log(), 20),
            cluster.log_tail("kube-apiserver", 15)
        )
    };
    let events = wait_for_pull_failures(&kubectl, "missing", &context);
    let pod: Value = cluster.get_json(&["pod", "missing"]);
    check_kubelet_events(
        &events,
        pod["metadata"]["uid"].as_str().expect("uid"),
        "kube-edge",
    );
    let described = kubectl(&["describe", "pod", "missing"]);
    for expected in [
        "Back-off pulling image",
        "Error: ImagePullBackOff",
        " over ",
    ] {
        assert!(
            described.contains(expected),
            "`kubectl describe pod` lacks {expected:?}:\n{described}"
        );
    }
    let refused: Vec<String> = cloud
        .log()
        .lines()
        .filter(|l| l.contains("forbidden") || l.contains("Forbidden") || l.contains(" 403"))
        .map(str::to_string)
        .collect();
    assert!(
        refused.is_empty(),
        "the API refused cloudcore something the shipped RBAC does not grant:\n{}",
        refused.join("\n")
    );
    assert_eq!(
        cloud.metric("cloudcore_events_dropped_total{reason=\"api_error\"}"),
        0.0,
        "{}",
        cloud.metrics()
    );
}

/// A partitioned edge keeps at most its bound of events (the oldest dropped), and after the
/// heal delivers the newest while its statuses are written first or in time.
#[test]
fn a_partitioned_edge_keeps_its_bound_and_delivers_the_newest_after_the_heal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let cloud = Cloud::start_at(
        tmp.path(),
        net.host_ip().into(),
        &["--node-grace-period", "5s"],
        "info",
    );
    const BOUND: usize = 2;
    let edge = integration::join_and_run_in(
        &net,
        &cloud,
        &tmp.path().join("edge"),
        "gw",
        &[
            "--cri-endpoint",
            &containerd.endpoint,
            "--max-buffered-events",
            &BOUND.to_string(),
        ],
    );
    let kubectl = |args: &[&str]| cloud.kubectl_ok(args, None);
    // A container that exits at once: restarts, each with Created, Started and back-offs.
    cloud.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: crasher}}\nspec:\n  nodeName: gw\n  containers:\n  - name: app\n    image: {}\n    imagePullPolicy: Never\n    command: [\"/bin/sh\", \"-c\", \"exit 1\"]\n",
            integration::BUSYBOX
        )),
    );
    let restarts = |pod: &Value| {
        pod["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0)
    };
    cloud.wait_pod(
        "crasher",
        Duration::from_secs(60),
        "a first restart",
        |p| restarts(p) >= 1,
        || tail(&edge.log(), 40),
    );
    assert!(
        eventually(Duration::from_secs(20), || events_about(
            &kubectl, "crasher"
        )
        .iter()
        .any(|e| e["reason"] == "Started")),
        "no Started event before the partition\n{}",
        tail(&edge.log(), 40)
    );
    let before: i64 = restarts(&cloud.pod("crasher").expect("pod"));

    net.cut().unwrap_or_else(|e| panic!("{e:#}"));
    let cut_at = time::OffsetDateTime::now_utc();
    // While cut: the restarts go on and their events wait, at most BOUND of them.
    let mut most_buffered = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(45);
    while Instant::now() < deadline {
        most_buffered = most_buffered.max(edge.metric("edgecore_events_buffered"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        most_buffered >= 1.0 && most_buffered <= BOUND as f64,
        "the buffer held {most_buffered} events while cut (bound {BOUND})"
    );
    let dropped = edge.metric("edgecore_events_dropped_total{reason=\"buffer_full\"}");
    assert!(
        dropped >= 1.0,
        "nothing was dropped while cut; bound {BOUND}:\n{}",
        tail(&edge.log(), 40)
    );
    eprintln!(
        "while cut: at most {most_buffered} events buffered, {dropped} dropped (bound {BOUND})"
    );

    net.heal().unwrap_or_else(|e| panic!("{e:#}"));
    let healed = Instant::now();
    let mut status_at = None;
    let mut events_at = None;
    let mut newest = Vec::new();
    let both = eventually(Duration::from_secs(40), || {
        if status_at.is_none() && cloud.pod("crasher").is_some_and(|p| restarts(&p) > before) {
            status_at = Some(healed.elapsed());
        }
        if events_at.is_none() {
            newest = events_about(&kubectl, "crasher")
                .into_iter()
                .filter(|e| timestamp(&e["lastTimestamp"]) > cut_at)
                .collect();
            if !newest.is_empty() {
                events_at = Some(healed.elapsed());
            }
        }
        status_at.is_some() && events_at.is_some()
    });
    assert!(
        both,
        "after the heal: status at {status_at:?}, events from the partition at {events_at:?}\n{}",
        tail(&edge.log(), 40)
    );
    let (status_at, events_at) = (status_at.unwrap_or_default(), events_at.unwrap_or_default());
    eprintln!("after the heal: status in {status_at:?}, the partition's events in {events_at:?}");
    assert!(
        status_at <= events_at + Duration::from_secs(2),
        "events delayed the status: status {status_at:?}, events {events_at:?}"
    );
    assert!(
        status_at < Duration::from_secs(20),
        "status took {status_at:?} after the heal"
    );
    drop(edge);
    drop(containerd);
}
