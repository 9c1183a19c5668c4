//! The Services data path (`edgecore::services::proxy`) against the real kernel: each test
//! makes its own network namespace ([`EdgeNet`]), programs edgecore's nftables table inside it
//! through `ip netns exec NS nft`, and serves the endpoints from TCP listeners it binds on
//! addresses of the namespace's `lo` (no containerd needed). A table of someone else's
//! (`table inet someone_else`) sits beside edgecore's throughout and must come out untouched.
//!
//! Needs root, iproute2 and nftables (`.ci/run` installs them); without them the tests fail
//! saying what is missing.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgecore::services::proxy::{self, Hairpin, NftCommand, Proxy};
use edgecore::services::table::{
    Endpoint, Protocol, ServiceEntry, ServiceKey, ServiceKind, ServicePort, ServiceTable,
};
use edgecore::services::{DataPathHost, ServicesConfig};
use integration::netns::EdgeNet;
use integration::{bin, eventually};
use serde_json::json;

const TABLE: &str = "edgecore_test";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
const OTHERS_RULES: &str = "table inet someone_else {
    chain input {
        type filter hook input priority 10; policy accept;
        tcp dport 9999 counter accept
    }
}
";

/// A namespace with nft reachable, a default route (so cluster IPs are routed), endpoint
/// addresses on `lo` with a listener each, and someone else's table.
struct Gateway {
    net: EdgeNet,
    nft: NftCommand,
    /// Endpoint address → the name its listener answers with.
    endpoints: Vec<(Ipv4Addr, String)>,
    others: String,
}

impl Gateway {
    fn new(endpoints: usize) -> Gateway {
        let nft = Command::new("nft").arg("--version").output();
        assert!(
            nft.is_ok_and(|o| o.status.success()),
            "nft is not installed: apt-get install nftables (.ci/run does)"
        );
        let net = EdgeNet::create().expect("network namespace");
        run(net
            .command("ip")
            .args(["route", "add", "default", "via", &net.host_ip().to_string()]));
        let mut gateway = Gateway {
            nft: NftCommand::in_netns(net.name()),
            net,
            endpoints: Vec::new(),
            others: String::new(),
        };
        for i in 0..endpoints {
            let ip = Ipv4Addr::new(10, 244, 0, 1 + i as u8);
            run(gateway
                .net
                .command("ip")
                .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"]));
            let name = format!("endpoint-{i}");
            let listener = gateway
                .net
                .run_in(|| TcpListener::bind((ip, TARGET_PORT)))
                .expect("bind an endpoint");
            serve(listener, name.clone());
            gateway.endpoints.push((ip, name));
        }
        let mut add = gateway.net.command("nft");
        add.args(["-f", "-"]);
        run_with_input(&mut add, OTHERS_RULES);
        gateway.others = gateway.others_rules();
        gateway
    }

    fn others_rules(&self) -> String {
        let out = self
            .net
            .command("nft")
            .args(["list", "table", "inet", "someone_else"])
            .output()
            .expect("nft list");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn assert_others_untouched(&self) {
        assert_eq!(
            self.others_rules(),
            self.others,
            "someone else's table changed"
        );
    }

    fn has_table(&self) -> bool {
        self.net
            .command("nft")
            .args(["list", "table", "ip", TABLE])
            .output()
            .expect("nft list")
            .status
            .success()
    }

    /// Connects from inside the namespace (source: the namespace's uplink address).
    fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        self.net
            .run_in(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
    }

    /// Which endpoint answered a new connection to `to` from inside the namespace.
    fn ask(&self, to: SocketAddr) -> std::io::Result<String> {
        let stream = self.connect(to)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim().to_string())
    }

    fn proxy(&self) -> Proxy {
        Proxy::new(
            self.nft.clone(),
            TABLE.to_string(),
            Hairpin::BridgeNetfilter,
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // The namespace goes with its tables; nothing outside it was touched.
        let _ = self
            .net
            .command("nft")
            .args(["delete", "table", "ip", TABLE])
            .output();
    }
}

/// Answers every connection with `name` and a newline, then echoes lines until EOF.
fn serve(listener: TcpListener, name: String) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let name = name.clone();
            std::thread::spawn(move || {
                if writeln!(stream, "{name}").is_err() {
                    return;
                }
                let Ok(reader) = stream.try_clone() else {
                    return;
                };
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(stream, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn run(command: &mut Command) {
    let out = command.output().expect("run");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_with_input(command: &mut Command, input: &str) {
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key(name: &str) -> ServiceKey {
    ServiceKey {
        namespace: "default".into(),
        name: name.into(),
    }
}

/// A NodePort Service `web` on [`CLUSTER_IP`]:80 / [`NODE_PORT`] whose endpoints are
/// `ready` (address, ready).
fn web(ready: &[(Ipv4Addr, bool)], affinity: Option<Duration>) -> ServiceTable {
    let endpoints = ready
        .iter()
        .map(|(ip, ready)| Endpoint {
            ip: IpAddr::V4(*ip),
            ready: *ready,
            terminating: false,
            local: true,
            node_name: Some("gw".into()),
            hostname: None,
            pod: None,
            ports: BTreeMap::from([("http".to_string(), TARGET_PORT)]),
        })
        .collect();
    let mut table = ServiceTable::default();
    table.services.insert(
        key("web"),
        ServiceEntry {
            uid: "uid-web".into(),
            kind: ServiceKind::NodePort,
            cluster_ips: vec![IpAddr::V4(CLUSTER_IP)],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(NODE_PORT),
            }],
            affinity,
            publish_not_ready: false,
            endpoints,
        },
    );
    table
}

fn cluster_ip() -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, 80))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_cluster_ip_reaches_both_endpoints_and_client_ip_affinity_pins() {
    let gw = Gateway::new(2);
    let rt = runtime();
    let mut proxy = gw.proxy();
    let all: Vec<(Ipv4Addr, bool)> = gw.endpoints.iter().map(|(ip, _)| (*ip, true)).collect();
    let (programmed, took) = rt.block_on(proxy.sync(&web(&all, None))).expect("apply");
    assert_eq!(programmed, 1);
    eprintln!("applied in {took:?}");
    let mut answers: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let who = gw
            .ask(cluster_ip())
            .expect("connect through the cluster IP");
        *answers.entry(who).or_default() += 1;
    }
    assert_eq!(
        answers.len(),
        2,
        "both endpoints answer over 100 connections: {answers:?}"
    );
    gw.assert_others_untouched();

    rt.block_on(proxy.sync(&web(&all, Some(Duration::from_secs(60)))))
        .expect("apply with affinity");
    let first = gw.ask(cluster_ip()).expect("connect");
    for _ in 0..30 {
        assert_eq!(
            gw.ask(cluster_ip()).expect("connect"),
            first,
            "ClientIP affinity pins"
        );
    }
    gw.assert_others_untouched();
}

#[test]
fn a_node_port_is_reachable_from_the_root_end_of_the_veth() {
    let gw = Gateway::new(2);
    let rt = runtime();
    let mut proxy = gw.proxy();
    let all: Vec<(Ipv4Addr, bool)> = gw.endpoints.iter().map(|(ip, _)| (*ip, true)).collect();
    rt.block_on(proxy.sync(&web(&all, None))).expect("apply");
    let node_port = SocketAddr::from((gw.net.edge_ip(), NODE_PORT));
    let mut answers: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let stream = TcpStream::connect_timeout(&node_port, Duration::from_secs(2))
            .expect("connect to the NodePort from the LAN side");
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).expect("read");
        *answers.entry(line.trim().to_string()).or_default() += 1;
    }
    assert_eq!(answers.len(), 2, "{answers:?}");
    gw.assert_others_untouched();
}

#[test]
fn without_endpoints_connections_are_refused_at_once() {
    let gw = Gateway::new(1);
    let rt = runtime();
    let mut proxy = gw.proxy();
    let ip = gw.endpoints[0].0;
    rt.block_on(proxy.sync(&web(&[(ip, false)], None)))
        .expect("apply");
    let started = Instant::now();
    let err = gw.connect(cluster_ip()).expect_err("no endpoint");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let node_port = SocketAddr::from((gw.net.edge_ip(), NODE_PORT));
    let err =
        TcpStream::connect_timeout(&node_port, Duration::from_secs(2)).expect_err("no endpoint");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    // One becomes ready: the same address answers.
    rt.block_on(proxy.sync(&web(&[(ip, true)], None)))
        .expect("apply");
    assert_eq!(gw.ask(cluster_ip()).expect("connect"), "endpoint-0");
    gw.assert_others_untouched();
}

#[test]
fn a_restart_takes_the_table_over_without_dropping_connections_or_affinity() {
    let gw = Gateway::new(2);
    let rt = runtime();
    let all: Vec<(Ipv4Addr, bool)> = gw.endpoints.iter().map(|(ip, _)| (*ip, true)).collect();
    let services = web(&all, Some(Duration::from_secs(600)));
    let mut before = gw.proxy();
    rt.block_on(before.sync(&services)).expect("apply");
    let pinned = gw.ask(cluster_ip()).expect("connect");
    let stream = gw.connect(cluster_ip()).expect("a long-lived connection");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    // Killed: the table stays. A new edgecore knows nothing and takes it over.
    drop(before);
    // An obsolete chain and set of the earlier run (a Service since deleted) must go.
    let mut stale = web(&all, Some(Duration::from_secs(600)));
    let entry = stale.services[&key("web")].clone();
    stale.services.insert(
        key("gone"),
        ServiceEntry {
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11))],
            ..entry
        },
    );
    let mut earlier = gw.proxy();
    rt.block_on(earlier.sync(&stale))
        .expect("apply the earlier run's table");
    drop(earlier);
    let mut after = gw.proxy();
    rt.block_on(after.sync(&services)).expect("take over");
    let listed = rt
        .block_on(proxy::list(&gw.nft, TABLE))
        .expect("list")
        .expect("table");
    let expected = proxy::render(
        TABLE,
        &services,
        Hairpin::BridgeNetfilter,
        &Default::default(),
    );
    assert_eq!(
        listed, expected.objects,
        "exactly the chains and sets of the table now"
    );
    let mut writer = stream;
    writeln!(writer, "still there").expect("write on the old connection");
    line.clear();
    reader
        .read_line(&mut line)
        .expect("echo on the old connection");
    assert_eq!(line.trim(), "still there");
    for _ in 0..20 {
        assert_eq!(
            gw.ask(cluster_ip()).expect("connect"),
            pinned,
            "affinity survives"
        );
    }
    gw.assert_others_untouched();
}

#[test]
fn an_unready_local_pod_leaves_within_a_second_and_stop_and_cleanup_leave_no_table() {
    use edgecore::outbox::{Outbox, Report};
    use proto::sync::{ObjectKey, StoreOp};
    let gw = Gateway::new(2);
    let dir = tempfile::tempdir().expect("dir");
    let node = "gw-1";
    let pod = |name: &str| {
        json!({"metadata": {"namespace": "default", "name": name, "uid": format!("uid-{name}"),
                            "labels": {"app": "web"}},
               "spec": {"nodeName": node, "containers": [{"name": "httpd", "image": "i",
                        "ports": [{"name": "http", "containerPort": TARGET_PORT}]}]}})
    };
    let service = json!({"metadata": {"namespace": "default", "name": "web", "uid": "uid-web"},
        "spec": {"type": "ClusterIP", "clusterIP": CLUSTER_IP.to_string(), "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}});
    let put = |kind: &str, name: &str, body: &serde_json::Value| StoreOp::Put {
        key: ObjectKey {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
        },
        uid: format!("uid-{name}"),
        resource_version: 1,
        body: serde_json::to_vec(body).expect("json"),
    };
    {
        let mut store = edgecore::store::Store::open(dir.path()).expect("store");
        store
            .apply(&[
                put("Service", "web", &service),
                put("Pod", "web-0", &pod("web-0")),
                put("Pod", "web-1", &pod("web-1")),
            ])
            .expect("apply");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let metrics = Arc::new(edgecore::metrics::Metrics::default());
    let (outbox, _writer) = Outbox::open(dir.path(), metrics.clone()).expect("outbox");
    let status = |ip: Ipv4Addr, ready: bool| {
        Report::Status(json!({"phase": "Running", "podIP": ip.to_string(),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}))
    };
    let object = |name: &str| proto::ObjectRef {
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    };
    let (ip0, ip1) = (gw.endpoints[0].0, gw.endpoints[1].0);
    outbox.put(object("web-0"), status(ip0, true));
    outbox.put(object("web-1"), status(ip1, true));
    let (_store_tx, store_changed) = tokio::sync::watch::channel(0u64);
    let tracker = tokio_util::task::TaskTracker::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = ServicesConfig {
        proxy: true,
        nft_table: TABLE.into(),
        cluster_dns: None,
        ..ServicesConfig::default()
    };
    let services = edgecore::services::start_with(
        config,
        DataPathHost {
            nft: gw.nft.clone(),
            hairpin: Some(Hairpin::BridgeNetfilter),
        },
        dir.path().to_path_buf(),
        node.into(),
        store_changed,
        outbox.clone(),
        &tracker,
        shutdown.clone(),
    )
    .expect("start");
    assert_eq!(services.table.borrow().services.len(), 1);
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..40 {
                if let Ok(who) = gw.ask(cluster_ip()) {
                    seen.insert(who);
                }
            }
            seen.len() == 2
        }),
        "both local pods serve the Service"
    );
    // web-1 turns unready: the outbox has it at once, the data path within a second.
    let unready_at = Instant::now();
    outbox.put(object("web-1"), status(ip1, false));
    let mut last_hit = None;
    while unready_at.elapsed() < Duration::from_secs(2) {
        if gw.ask(cluster_ip()).expect("connect") == "endpoint-1" {
            last_hit = Some(unready_at.elapsed());
        }
    }
    assert!(
        last_hit.is_none_or(|at| at < Duration::from_secs(1)),
        "the unready endpoint still answered {last_hit:?} after"
    );
    eprintln!("last connection to the unready endpoint: {last_hit:?} after");
    assert!(
        metrics
            .render()
            .contains("edgecore_service_rules_syncs_total")
    );
    // Graceful stop removes the table.
    shutdown.cancel();
    tracker.close();
    rt.block_on(tracker.wait());
    assert!(!gw.has_table(), "a graceful stop leaves no table");
    gw.assert_others_untouched();

    // After a kill (the table left in place), `edgecore cleanup` removes it.
    let mut proxy = gw.proxy();
    rt.block_on(proxy.sync(&web(&[(ip0, true)], None)))
        .expect("apply");
    drop(proxy);
    assert!(gw.has_table());
    let out = gw
        .net
        .command(bin("edgecore"))
        .args(["cleanup", "--nft-table", TABLE, "--cluster-dns", "none"])
        .output()
        .expect("edgecore cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!gw.has_table(), "edgecore cleanup leaves no table");
    // Twice is fine: nothing to remove.
    let out = gw
        .net
        .command(bin("edgecore"))
        .args(["cleanup", "--nft-table", TABLE, "--cluster-dns", "none"])
        .output()
        .expect("edgecore cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.assert_others_untouched();
    drop(rt);
}
