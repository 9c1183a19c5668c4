//! The partition harness with the real binaries: edgecore in its own network namespace,
//! cloudcore on the host end of a veth pair. Cutting the link or dropping its packets
//! disconnects the edge; healing reconnects it.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use integration::netns::EdgeNet;
use integration::{Cloud, Edge, eventually, join_in};

/// Short heartbeats so a dead path is noticed in seconds: with cloudcore's defaults (10 s
/// heartbeat, 30 s dead-after, which is also the QUIC idle timeout) it takes about 30 s.
const CLOUD_FLAGS: &[&str] = &["--heartbeat-interval", "1s", "--dead-after", "5s"];
/// Bounds from the harness's brief.
const DETECT: Duration = Duration::from_secs(20);
const RECONNECT: Duration = Duration::from_secs(15);

/// One way to partition the pair.
#[derive(Debug, Clone, Copy)]
enum Partition {
    Cut,
    DropPackets,
}

struct Setup {
    // Fields drop in order: the edge process before its namespace, the namespace before the
    // directory.
    edge: Edge,
    cloud: Cloud,
    net: EdgeNet,
    _tmp: tempfile::TempDir,
}

fn net_namespace(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("read a process's net namespace")
}

/// A cloud on the host end and a joined, connected, Ready edge inside a fresh namespace.
fn setup(node: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
    let cloud = Cloud::start_at(tmp.path(), IpAddr::V4(net.host_ip()), CLOUD_FLAGS, "info");
    let token = cloud.token(&[]);
    assert_eq!(
        token.cloud,
        format!("{}:{}", net.host_ip(), cloud.port),
        "the token carries the host end's address"
    );
    let dir = tmp.path().join(node);
    let out = join_in(&net, &dir, &token, node);
    assert!(
        out.status.success(),
        "join from inside {} failed: {}\ncloud log:\n{}",
        net.name(),
        String::from_utf8_lossy(&out.stderr),
        cloud.log()
    );
    let edge = Edge::start_in(&net, &dir, &["--no-pod-runtime"]);
    let pid = edge.pid().expect("edgecore runs");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .expect("edgecore's executable")
            .file_name(),
        Some(std::ffi::OsStr::new("edgecore")),
        "ip netns exec execs edgecore, so the child is edgecore itself"
    );
    assert_ne!(
        net_namespace(pid),
        net_namespace(std::process::id()),
        "edgecore runs in its own network namespace"
    );
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "edge in {} never connected; edge log:\n{}\ncloud log:\n{}",
        net.name(),
        edge.log(),
        cloud.log()
    );
    assert!(
        cloud
            .log()
            .contains(&format!("peer.addr={}:", net.edge_ip())),
        "the cloud sees the edge at its veth address {}; cloud log:\n{}",
        net.edge_ip(),
        cloud.log()
    );
    assert!(
        eventually(Duration::from_secs(15), || cloud.node_ready(node) == "True"),
        "node {node} never Ready; cloud log:\n{}",
        cloud.log()
    );
    Setup {
        edge,
        cloud,
        net,
        _tmp: tmp,
    }
}

/// Partitions, waits for the edge to notice, heals, waits for the reconnect; twice, to check
/// that the partition and the heal are repeatable and idempotent.
fn partition_and_heal(node: &str, partition: Partition) {
    let mut s = setup(node);
    for round in 1..=2 {
        let reconnects = s.edge.metric("edgecore_reconnects_total");
        let apply = || match partition {
            Partition::Cut => s.net.cut(),
            Partition::DropPackets => s.net.drop_packets(),
        };
        apply().unwrap_or_else(|e| panic!("{partition:?}: {e:#}"));
        apply().unwrap_or_else(|e| panic!("{partition:?} again: {e:#}"));
        let partitioned = Instant::now();
        assert!(
            eventually(DETECT, || s.edge.metric("edgecore_cloud_connected") == 0.0),
            "{partition:?} round {round}: the edge still reports connected after {DETECT:?}; edge log:\n{}",
            s.edge.log()
        );
        let detected = partitioned.elapsed();
        assert!(
            s.edge.is_running(),
            "{partition:?} round {round}: edgecore exited; edge log:\n{}",
            s.edge.log()
        );
        s.net.heal().unwrap_or_else(|e| panic!("heal: {e:#}"));
        s.net.heal().unwrap_or_else(|e| panic!("heal again: {e:#}"));
        let healed = Instant::now();
        assert!(
            eventually(RECONNECT, || s.edge.connected()),
            "{partition:?} round {round}: no reconnect within {RECONNECT:?} of healing; edge log:\n{}\ncloud log:\n{}",
            s.edge.log(),
            s.cloud.log()
        );
        let reconnected = healed.elapsed();
        assert!(
            s.edge.metric("edgecore_reconnects_total") > reconnects,
            "{partition:?} round {round}: a new session, not the old one"
        );
        eprintln!(
            "{partition:?} round {round}: disconnect noticed after {detected:.1?}, reconnected {reconnected:.1?} after healing"
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || s.cloud.node_ready(node)
            == "True"),
        "node {node} not Ready after healing; cloud log:\n{}",
        s.cloud.log()
    );
}

#[test]
fn cutting_the_link_disconnects_the_edge_and_healing_reconnects_it() {
    partition_and_heal("gw-cut", Partition::Cut);
}

#[test]
fn dropping_packets_disconnects_the_edge_and_healing_reconnects_it() {
    partition_and_heal("gw-drop", Partition::DropPackets);
}

#[test]
fn namespaces_are_unique_and_removed_on_drop() {
    let a = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
    let b = EdgeNet::create().unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(a.name(), b.name());
    assert_ne!(a.host_ip(), b.host_ip());
    let exists = |name: &str| Path::new("/var/run/netns").join(name).exists();
    let name = a.name().to_string();
    let host_ip = a.host_ip();
    assert!(exists(&name));
    let listener = a
        .run_in(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind inside the namespace");
    let port = listener.local_addr().expect("bound address").port();
    let connected = a.run_in(|| std::net::TcpStream::connect(("127.0.0.1", port)));
    assert!(
        connected.is_ok(),
        "run_in reaches 127.0.0.1:{port} inside the namespace: {connected:?}"
    );
    drop(a);
    assert!(!exists(&name), "{name} is deleted");
    let addresses = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "to", &host_ip.to_string()])
        .output()
        .expect("ip addr");
    assert!(
        addresses.stdout.is_empty(),
        "the host end is gone: {}",
        String::from_utf8_lossy(&addresses.stdout)
    );
    drop(b);
}
