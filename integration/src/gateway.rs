//! The gateway of the Services tests and benchmark: one network namespace holding edgecore
//! AND its containerd, so the pod bridge, edgecore's nftables table and the cluster DNS
//! address all live inside it, behind an [`EdgeNet`] veth whose root end stands for both the
//! uplink (cloudcore listens there) and the factory LAN (NodePorts are reached from there).
//!
//! Both run under `nsenter --net` rather than `ip netns exec`: the latter gives the process a
//! private mount namespace with a fresh `/sys`, and with it no cgroup hierarchy for runc.
//!
//! The gateway's upstream resolver (`--dns-upstream`) is a [`TestResolver`] the harness runs on
//! the root end of the veth, so the forwarding of names outside the cluster domain is seen
//! without depending on the machine's resolvers.
//!
//! Needs root, iproute2, nftables (`nft`), util-linux (`nsenter`) and what [`Containerd`]
//! needs; without them [`Gateway::start`] fails saying what is missing.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cluster::{ClusterOptions, KubeCluster};
use crate::netns::EdgeNet;
use crate::{Cloud, Containerd, Edge, Tmpfs, bin, eventually};

/// The cluster DNS address the gateway serves (edgecore's default, on the namespace's `lo`).
pub const CLUSTER_DNS: &str = "169.254.96.16";
/// The nftables table (family `ip`) edgecore owns on the gateway.
pub const NFT_TABLE: &str = "edgecore";
/// The bridge the CNI creates inside the namespace.
const BRIDGE: &str = "edgegw0";

/// Which control plane the gateway's cloud uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// cloudcore's embedded API (SQLite, its own controllers).
    Embedded,
    /// A real Kubernetes control plane started for the test ([`KubeCluster`]).
    Kube,
}

/// What a gateway starts with.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub mode: Mode,
    /// The node name of the edge.
    pub node: String,
    /// Names the upstream resolver answers with an A record; it answers NXDOMAIN to the rest.
    pub upstream_zone: BTreeMap<String, Ipv4Addr>,
    /// Extra `cloudcore serve` flags.
    pub cloud_extra: Vec<String>,
    /// Extra `edgecore run` flags.
    pub edge_extra: Vec<String>,
}

impl GatewayOptions {
    /// A gateway named `node` in `mode`, with an empty upstream zone and no extra flags.
    pub fn new(mode: Mode, node: &str) -> GatewayOptions {
        GatewayOptions {
            mode,
            node: node.to_string(),
            upstream_zone: BTreeMap::new(),
            cloud_extra: Vec::new(),
            edge_extra: Vec::new(),
        }
    }
}

/// A cloud and one gateway joined to it. Fields drop in order: edgecore, containerd (removing
/// its pods), the resolver, cloudcore, the namespace, the control plane, the edge's tmpfs,
/// then the directory they all used; [`Drop`] first removes the root namespace's route to the
/// pod subnet.
pub struct Gateway {
    edge: Option<Edge>,
    pub containerd: Containerd,
    pub resolver: TestResolver,
    pub cloud: Cloud,
    pub net: EdgeNet,
    cluster: Option<KubeCluster>,
    pub node: String,
    pub mode: Mode,
    pub edge_dir: PathBuf,
    /// The pod subnet of the gateway's containerd (a /24 in 10.128.0.0/10, one per
    /// [`EdgeNet`] slot, so it never clashes with another gateway's routes).
    pub pod_subnet: String,
    /// The `edgecore run` flags besides the data dir and metrics ones.
    run_flags: Vec<String>,
    routed: AtomicBool,
    _edge_disk: Tmpfs,
    tmp: tempfile::TempDir,
}

impl Gateway {
    /// Starts the control plane (kube mode), the namespace, the upstream resolver, containerd
    /// inside the namespace, cloudcore (tunnel on the veth's root end) and a joined edgecore
    /// inside the namespace with the Services on (`--service-proxy nftables --cluster-dns
    /// 169.254.96.16 --nft-table edgecore --dns-upstream FILE`); waits until the edge is
    /// connected. Panics saying what is missing or what failed.
    pub fn start(options: GatewayOptions) -> Gateway {
        Gateway::try_start(options).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn try_start(options: GatewayOptions) -> anyhow::Result<Gateway> {
        for (tool, package) in [("nft", "nftables"), ("nsenter", "util-linux")] {
            if !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                bail!("{tool} is not installed: apt-get install {package}");
            }
        }
        let tmp = tempfile::tempdir().context("tempdir")?;
        let cluster = match options.mode {
            Mode::Embedded => None,
            Mode::Kube => Some(KubeCluster::start(tmp.path(), &ClusterOptions::default())),
        };
        let net = EdgeNet::create()?;
        // A gateway's default route leads out over its uplink: the gateway's own processes
        // reach cluster IPs through it (the output hook runs after the route lookup).
        let status = net
            .command("ip")
            .args(["route", "add", "default", "via"])
            .arg(net.host_ip().to_string())
            .status()
            .context("run ip route add")?;
        if !status.success() {
            bail!("ip route add default in {} failed", net.name());
        }
        let pod_subnet = pod_subnet_of(net.host_ip());
        let resolver = TestResolver::start(
            SocketAddr::from((net.host_ip(), 53)),
            options.upstream_zone.clone(),
        )?;
        let upstream = tmp.path().join("upstream-resolv.conf");
        std::fs::write(&upstream, format!("nameserver {}\n", net.host_ip()))
            .context("write the upstream resolv.conf")?;
        let containerd =
            Containerd::start_in(&net, &tmp.path().join("containerd"), &pod_subnet, BRIDGE);
        let cloud_extra: Vec<&str> = options.cloud_extra.iter().map(String::as_str).collect();
        let cloud = match &cluster {
            None => Cloud::start_at(tmp.path(), net.host_ip().into(), &cloud_extra, "info"),
            Some(cluster) => {
                let credentials = cluster.cloudcore_credentials(|rbac| rbac);
                Cloud::start_kube(
                    tmp.path(),
                    cluster,
                    &credentials,
                    net.host_ip().into(),
                    &cloud_extra,
                )?
            }
        };
        // The edge's data dir on a disk of its own, so that a nearly full machine does not
        // make it report DiskPressure (the scheduler would then place nothing there).
        let edge_disk = Tmpfs::mount("256m");
        let edge_dir = edge_disk.path().join("edge");
        let mut run_flags: Vec<String> = [
            "--cri-endpoint",
            &containerd.endpoint,
            "--service-proxy",
            "nftables",
            "--cluster-dns",
            CLUSTER_DNS,
            "--nft-table",
            NFT_TABLE,
            "--dns-upstream",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        run_flags.push(upstream.display().to_string());
        run_flags.extend(options.edge_extra.iter().cloned());
        let token = cloud.token(&[]);
        let out = crate::join_command(
            net.enter(bin("edgecore")),
            &edge_dir,
            &token.cloud,
            &token.token,
            &token.ca_hash,
            &options.node,
        );
        if !out.status.success() {
            bail!(
                "join {}: {}",
                options.node,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut gateway = Gateway {
            edge: None,
            containerd,
            resolver,
            cloud,
            net,
            cluster,
            node: options.node,
            mode: options.mode,
            edge_dir,
            pod_subnet,
            run_flags,
            routed: AtomicBool::new(false),
            _edge_disk: edge_disk,
            tmp,
        };
        gateway.start_edge();
        if !eventually(Duration::from_secs(20), || gateway.edge().connected()) {
            bail!(
                "edge {} did not connect; log:\n{}",
                gateway.node,
                gateway.edge_log()
            );
        }
        Ok(gateway)
    }

    /// The running edgecore; panics when it was stopped or killed.
    pub fn edge(&self) -> &Edge {
        self.edge.as_ref().expect("edgecore is not running")
    }

    /// The log of the current (or last) edgecore run.
    pub fn edge_log(&self) -> String {
        std::fs::read_to_string(self.edge_dir.join("run.log")).unwrap_or_default()
    }

    /// The directory every part of the gateway keeps its files in.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The `edgecore run` flags of this gateway besides `--data-dir` and `--metrics-listen`.
    pub fn run_flags(&self) -> &[String] {
        &self.run_flags
    }

    /// Starts edgecore in the namespace (after [`Gateway::kill_edge`] or
    /// [`Gateway::stop_edge`]); returns once its metrics answer, not waiting for the cloud.
    pub fn start_edge(&mut self) {
        assert!(self.edge.is_none(), "edgecore is already running");
        let flags: Vec<&str> = self.run_flags.iter().map(String::as_str).collect();
        self.edge = Some(Edge::start_entered(&self.net, &self.edge_dir, &flags));
    }

    /// SIGKILL, as a crash or power cut would end it: its table and DNS address stay.
    pub fn kill_edge(&mut self) {
        if let Some(mut edge) = self.edge.take() {
            edge.kill();
        }
    }

    /// SIGTERM, waiting for the exit (a graceful stop removes the table and the address).
    pub fn stop_edge(&mut self) {
        if let Some(mut edge) = self.edge.take() {
            edge.stop();
        }
    }

    /// `edgecore cleanup` with the gateway's flags, inside the namespace.
    pub fn cleanup(&self) -> Output {
        self.net
            .enter(bin("edgecore"))
            .args(["cleanup", "--service-proxy", "nftables", "--nft-table"])
            .args([NFT_TABLE, "--cluster-dns", CLUSTER_DNS])
            .output()
            .expect("run edgecore cleanup")
    }

    /// Runs `program ARGS` inside the namespace (the gateway's host, not a pod).
    pub fn host(&self, program: &str, args: &[&str]) -> Output {
        self.net
            .enter(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program} in {}: {e}", self.net.name()))
    }

    /// `nft ARGS` inside the namespace, asserting success; its stdout.
    pub fn nft(&self, args: &[&str]) -> String {
        let out = self.host("nft", args);
        assert!(
            out.status.success(),
            "nft {args:?} in {}: {}",
            self.net.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The namespace's whole ruleset (`nft list ruleset`).
    pub fn ruleset(&self) -> String {
        self.nft(&["list", "ruleset"])
    }

    /// `nft list table FAMILY NAME` inside the namespace; `None` when there is no such table.
    pub fn nft_table(&self, family: &str, name: &str) -> Option<String> {
        let out = self.host("nft", &["list", "table", family, name]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// edgecore's table (`ip edgecore`), if present.
    pub fn edgecore_table(&self) -> Option<String> {
        self.nft_table("ip", NFT_TABLE)
    }

    /// Whether the cluster DNS address is on the namespace's `lo`.
    pub fn has_dns_address(&self) -> bool {
        let out = self.host("ip", &["-o", "addr", "show", "dev", "lo"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {CLUSTER_DNS}/"))
    }

    /// Adds (again: a [`EdgeNet::cut`] takes it away) a root-namespace route to the pod subnet
    /// via the namespace's end of the veth, so the root namespace reaches pods by their IPs.
    pub fn route_pods(&self) {
        let out = Command::new("ip")
            .args(["route", "replace", &self.pod_subnet, "via"])
            .arg(self.net.edge_ip().to_string())
            .output()
            .expect("run ip route");
        assert!(
            out.status.success(),
            "ip route replace {} via {}: {}",
            self.pod_subnet,
            self.net.edge_ip(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.routed.store(true, Ordering::Relaxed);
    }

    /// `edgecore ctl exec POD -- COMMAND` inside the namespace (containerd's streaming server
    /// listens on the namespace's loopback); works with the cloud unreachable. Returns (exit
    /// code, stdout, stderr).
    pub fn exec(&self, pod: &str, command: &[&str]) -> (i32, String, String) {
        let out = self
            .exec_command(pod, command)
            .output()
            .expect("run edgecore ctl exec");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// [`Gateway::exec`] started in the background, its stdout piped.
    pub fn spawn_exec(&self, pod: &str, command: &[&str]) -> Child {
        self.exec_command(pod, command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgecore ctl exec")
    }

    fn exec_command(&self, pod: &str, command: &[&str]) -> Command {
        let mut c = self.net.enter(bin("edgecore"));
        c.args(["ctl", "exec", pod, "--data-dir"])
            .arg(&self.edge_dir)
            .args(["--cri-endpoint", &self.containerd.endpoint, "--"])
            .args(command);
        c
    }

    /// `kubectl ARGS` as the cluster's admin, asserting success; its stdout.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.cloud.kubectl_ok(args, stdin)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    /// `kubectl get KIND NAME -o json` in namespace `default`; `None` if it does not exist.
    pub fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let out = self.cloud.kubectl(&["get", kind, name, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// The items of `kubectl get KIND ARGS -o json`.
    pub fn list(&self, kind: &str, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["get", kind];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let text = self.kubectl(&all, None);
        let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `check` every 200 ms; panics after `within` with `what` and [`Gateway::context`].
    pub fn wait(&self, within: Duration, what: &str, mut check: impl FnMut(&Gateway) -> bool) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if check(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{what} not reached within {within:?}\n{}", self.context());
    }

    /// What a failing test prints: pods, Services, EndpointSlices, the edge's table and the
    /// ends of the logs.
    pub fn context(&self) -> String {
        let text = |args: &[&str]| {
            let out = self.cloud.kubectl(args);
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        let mut context = format!(
            "pods:\n{}\nservices:\n{}\nendpointslices:\n{}\nnft table ip {NFT_TABLE}:\n{}\nupstream queries: {:?}\ncloudcore log (end):\n{}\nedge log (end):\n{}",
            text(&["get", "pods", "-o", "wide"]),
            text(&["get", "services", "-o", "wide"]),
            text(&["get", "endpointslices", "-o", "wide"]),
            self.edgecore_table().unwrap_or_else(|| "(none)".into()),
            self.resolver.queries(),
            tail(&self.cloud.log(), 40),
            tail(&self.edge_log(), 60),
        );
        if let Some(cluster) = &self.cluster {
            context.push_str(&format!(
                "\nkube-controller-manager log (end):\n{}",
                cluster.log_tail("kube-controller-manager", 15)
            ));
        }
        context
    }

    /// Pods matching `selector` that are Running with an IP, by name → IP.
    pub fn running_pods(&self, selector: &str) -> BTreeMap<String, String> {
        self.list("pods", &["-l", selector])
            .iter()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
            })
            .filter_map(|p| {
                Some((
                    p["metadata"]["name"].as_str()?.to_string(),
                    p["status"]["podIP"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// Pod `name`'s Ready condition is `status` ("True"/"False").
    pub fn pod_ready_is(&self, name: &str, status: &str) -> bool {
        self.get("pod", name).is_some_and(|pod| {
            pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == status)
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.routed.load(Ordering::Relaxed) {
            let _ = Command::new("ip")
                .args(["route", "del", &self.pod_subnet])
                .output();
        }
    }
}

/// A Deployment `web` of `replicas` busybox httpd pods on `node`, on port 8080 (named `http`) serving their pod's name, ready
/// while `/tmp/ready` exists (probed every second, one failure makes it unready).
pub fn web_deployment(node: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      nodeSelector:
        kubernetes.io/hostname: {node}
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: {image}
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "mkdir -p /www && hostname > /www/index.html && touch /tmp/ready && exec httpd -f -p 8080 -h /www"]
        ports:
        - {{name: http, containerPort: 8080}}
        readinessProbe:
          exec:
            command: ["cat", "/tmp/ready"]
          periodSeconds: 1
          failureThreshold: 1
"#,
        image = crate::BUSYBOX
    )
}

/// A busybox pod on the gateway that sleeps until SIGTERM (`dnsPolicy` ClusterFirst, the
/// default).
pub fn client_pod(name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {image}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]
"#,
        image = crate::BUSYBOX
    )
}

/// The pod subnet of the gateway on the slot of `host_ip` (`10.199.S/64.(S%64)*4 + 1`): slot
/// S gets `10.(128 + S/256).(S%256).0/24`.
fn pod_subnet_of(host_ip: Ipv4Addr) -> String {
    let [_, _, high, low] = host_ip.octets();
    let slot = u32::from(high) * 64 + u32::from(low) / 4;
    format!("10.{}.{}.0/24", 128 + slot / 256, slot % 256)
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// GETs `path` from `address` over HTTP/1.1 with a new connection; `None` if it does not
/// answer within `timeout`.
pub fn http_get_at(address: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// The gateway's upstream resolver: a DNS server over UDP that the test runs, answering the
/// names of its zone with A records and every other name with NXDOMAIN, and recording the
/// names it was asked. Stopped when dropped.
pub struct TestResolver {
    pub address: SocketAddr,
    queries: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestResolver {
    /// Binds `address` and serves `zone` (names without the final dot, lower case).
    pub fn start(
        address: SocketAddr,
        zone: BTreeMap<String, Ipv4Addr>,
    ) -> anyhow::Result<TestResolver> {
        let socket = UdpSocket::bind(address)
            .with_context(|| format!("the test resolver cannot bind {address}"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("set the resolver's read timeout")?;
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let queries = queries.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some((name, reply)) = dns_reply(&buf[..n], &zone) else {
                        continue;
                    };
                    queries.lock().expect("queries").push(name);
                    let _ = socket.send_to(&reply, from);
                }
            })
        };
        Ok(TestResolver {
            address,
            queries,
            stop,
            thread: Some(thread),
        })
    }

    /// The names asked so far, in order (lower case, without the final dot).
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().expect("queries").clone()
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The answer to a DNS query: the name asked and the reply, an A record for a name of `zone`
/// asked with type A (no records for other types), NXDOMAIN for other names. `None` for what is
/// not a standard query with one question.
fn dns_reply(query: &[u8], zone: &BTreeMap<String, Ipv4Addr>) -> Option<(String, Vec<u8>)> {
    const TYPE_A: u16 = 1;
    if query.len() < 12 || query[2] & 0x80 != 0 || query[2] & 0x78 != 0 {
        return None;
    }
    if u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    query.get(..question_end)?;
    let name = labels.join(".");
    let address = zone.get(&name);
    let mut reply = query[..question_end].to_vec();
    // QR, the query's opcode and RD; RA; NOERROR or NXDOMAIN.
    reply[2] = 0x80 | (query[2] & 0x01);
    reply[3] = 0x80 | if address.is_some() { 0 } else { 3 };
    let answers: u16 = match address {
        Some(ip) if qtype == TYPE_A => {
            reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            reply.extend_from_slice(&ip.octets());
            1
        }
        _ => 0,
    };
    reply[6..8].copy_from_slice(&answers.to_be_bytes());
    reply[8..12].copy_from_slice(&[0, 0, 0, 0]);
    Some((name, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn the_resolver_answers_its_zone_and_nxdomain_otherwise() {
        let zone = BTreeMap::from([("external.example".to_string(), Ipv4Addr::new(192, 0, 2, 7))]);
        let (name, reply) = dns_reply(&query("External.Example", 1), &zone).expect("a reply");
        assert_eq!(name, "external.example");
        assert_eq!(&reply[..2], &[0x12, 0x34], "the query's id");
        assert_eq!(reply[2] & 0x80, 0x80, "a response");
        assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&reply[6..8], &[0, 1], "one answer");
        assert_eq!(&reply[reply.len() - 4..], &[192, 0, 2, 7]);

        let (_, reply) = dns_reply(&query("external.example", 28), &zone).expect("a reply");
        assert_eq!(
            (reply[3] & 0x0f, &reply[6..8]),
            (0, &[0, 0][..]),
            "AAAA: no data"
        );

        let (_, reply) = dns_reply(&query("nosuch.example", 1), &zone).expect("a reply");
        assert_eq!(reply[3] & 0x0f, 3, "NXDOMAIN");

        let mut response = query("external.example", 1);
        response[2] |= 0x80;
        assert!(
            dns_reply(&response, &zone).is_none(),
            "responses are ignored"
        );
        assert!(dns_reply(&[0; 5], &zone).is_none(), "short messages too");
    }

    #[test]
    fn each_slot_gets_its_own_pod_subnet() {
        assert_eq!(pod_subnet_of(Ipv4Addr::new(10, 199, 0, 1)), "10.128.0.0/24");
        assert_eq!(
            pod_subnet_of(Ipv4Addr::new(10, 199, 1, 5)),
            "10.128.65.0/24"
        );
        assert_eq!(
            pod_subnet_of(Ipv4Addr::new(10, 199, 255, 253)),
            "10.191.255.0/24"
        );
    }
}
