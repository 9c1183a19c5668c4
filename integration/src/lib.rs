//! Test harness: starts the real `cloudcore` and `edgecore` binaries on loopback (or an edge
//! in its own network namespace, see [`netns`]), reads their metrics and CLI output, and cleans
//! up. No production code lives here.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which the README's test
//! command does); a missing binary fails the test with that instruction.

pub mod bench;
pub mod cluster;
pub mod devices;
pub mod gateway;
pub mod ha;
pub mod netns;
pub mod peer;
pub mod sim;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::EdgeNet;

/// The status of container `name` in a pod's JSON (`Null` when it has none yet).
pub fn container_status<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["status"]["containerStatuses"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Path of a workspace binary next to the test executable (`target/<profile>/NAME`), or next
/// to a load generator that uses the harness (`target/<profile>/service-bench`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs in target/<profile>/deps, a load generator in target/<profile>.
    let dir = exe.parent().expect("the executable has a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("deps lives in target/<profile>")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    free_udp_port_on(Ipv4Addr::LOCALHOST.into())
}

/// A UDP port that was free a moment ago on `ip`.
fn free_udp_port_on(ip: IpAddr) -> u16 {
    unique_port(Transport::Udp, || {
        UdpSocket::bind((ip, 0))
            .and_then(|s| s.local_addr())
            .unwrap_or_else(|e| panic!("bind a UDP port on {ip}: {e}"))
            .port()
    })
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    unique_port(Transport::Tcp, || {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("bind a TCP port")
            .port()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Transport {
    Tcp,
    Udp,
}

/// A port from `probe` that this process has not handed out before. The port is released
/// before its user binds it, and the kernel may offer the same one to the next probe: two
/// tests run at once were once given one port (the second simulator failed to bind, and its
/// readiness probe reached the first). Within one test binary, a port is handed out once.
fn unique_port(transport: Transport, mut probe: impl FnMut() -> u16) -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<(Transport, u16)>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = probe();
        if handed_out.insert((transport, port)) {
            return port;
        }
    }
    panic!("1000 probes for a free {transport:?} port gave only ports handed out before");
}

/// Polls `check` every 20 ms until it is true or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GETs `path` from a loopback HTTP/1.1 server; `None` if it does not answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_string())
}

/// The value of a metric line `name{labels} value` in a Prometheus text page.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn spawn_logged(mut command: Command, log: &Path) -> Child {
    try_spawn_logged(command.env("RUST_LOG", "info"), log).expect("spawn binary")
}

fn try_spawn_logged(command: &mut Command, log: &Path) -> anyhow::Result<Child> {
    use anyhow::Context as _;
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.get_program()))
}

/// Sends SIGTERM and waits up to 10 s, then SIGKILL.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `cloudcore serve`.
pub struct Cloud {
    pub dir: PathBuf,
    /// UDP port of the tunnel, on [`Cloud::address`]'s IP.
    pub port: u16,
    pub metrics_port: u16,
    /// HTTPS port of the embedded Kubernetes API.
    pub api_port: u16,
    binary: PathBuf,
    /// The tunnel listens and is advertised on this IP (127.0.0.1 unless [`Cloud::start_at`]).
    tunnel_ip: IpAddr,
    extra: Vec<String>,
    /// `RUST_LOG` of the process.
    log_filter: String,
    control_plane: ControlPlane,
    child: Option<Child>,
    starts: usize,
}

/// The API a [`Cloud`] uses.
#[derive(Debug, Clone)]
enum ControlPlane {
    /// Its own, embedded, on a free port.
    Embedded,
    /// A real cluster's: cloudcore runs with `credentials` (a kubeconfig of its
    /// ServiceAccount), tests use `admin`.
    Kube {
        credentials: PathBuf,
        admin: PathBuf,
    },
}

impl Cloud {
    /// Starts `cloudcore serve` on fresh loopback ports with state in `dir/cloud`.
    pub fn start(dir: &Path, extra: &[&str]) -> Cloud {
        Cloud::start_binary(&bin("cloudcore"), dir, extra).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Cloud::start`] with a `RUST_LOG` filter, for tests that read debug lines.
    pub fn start_logging(dir: &Path, extra: &[&str], filter: &str) -> Cloud {
        Cloud::start_full(&bin("cloudcore"), dir, loopback(), extra, filter)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Cloud::start_logging`] with the tunnel listening on `tunnel_ip` instead of
    /// 127.0.0.1, advertised there (so join tokens carry it and the serving certificate covers
    /// it): for edges in a network namespace, `tunnel_ip` is [`EdgeNet::host_ip`]. The metrics
    /// and API listeners stay on 127.0.0.1.
    pub fn start_at(dir: &Path, tunnel_ip: IpAddr, extra: &[&str], log_filter: &str) -> Cloud {
        Cloud::start_full(&bin("cloudcore"), dir, tunnel_ip, extra, log_filter)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Cloud::start`] with a given `cloudcore` binary, for the load generators; an error
    /// (holding the log) instead of a panic if it does not become healthy.
    pub fn start_binary(binary: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Cloud> {
        Cloud::start_full(binary, dir, loopback(), extra, "info")
    }

    /// `cloudcore serve --control-plane kube` against `cluster` with the credentials of its
    /// ServiceAccount (`credentials`, from [`cluster::KubeCluster::cloudcore_credentials`]),
    /// the tunnel on `tunnel_ip`. [`Cloud::kubeconfig`] and [`Cloud::kubectl`] are the
    /// cluster's admin ones. An error (holding the log) if it does not become healthy.
    pub fn start_kube(
        dir: &Path,
        cluster: &cluster::KubeCluster,
        credentials: &Path,
        tunnel_ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Cloud> {
        Cloud::start_kube_binary(
            &bin("cloudcore"),
            dir,
            cluster,
            credentials,
            tunnel_ip,
            extra,
        )
    }

    /// Like [`Cloud::start_kube`] with a given `cloudcore` binary, for the load generators.
    pub fn start_kube_binary(
        binary: &Path,
        dir: &Path,
        cluster: &cluster::KubeCluster,
        credentials: &Path,
        tunnel_ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Cloud> {
        let control_plane = ControlPlane::Kube {
            credentials: credentials.to_path_buf(),
            admin: cluster.kubeconfig.clone(),
        };
        Cloud::start_with(binary, dir, tunnel_ip, extra, "info", control_plane)
    }

    fn start_full(
        binary: &Path,
        dir: &Path,
        tunnel_ip: IpAddr,
        extra: &[&str],
        log_filter: &str,
    ) -> anyhow::Result<Cloud> {
        Cloud::start_with(
            binary,
            dir,
            tunnel_ip,
            extra,
            log_filter,
            ControlPlane::Embedded,
        )
    }

    fn start_with(
        binary: &Path,
        dir: &Path,
        tunnel_ip: IpAddr,
        extra: &[&str],
        log_filter: &str,
        control_plane: ControlPlane,
    ) -> anyhow::Result<Cloud> {
        // Ports are picked free and released before cloudcore binds them; another process can
        // take one in between. A first start that dies early is retried on fresh ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cloud = Cloud {
                dir: dir.join("cloud"),
                port: free_udp_port_on(tunnel_ip),
                metrics_port: free_tcp_port(),
                api_port: free_tcp_port(),
                binary: binary.to_path_buf(),
                tunnel_ip,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                log_filter: log_filter.to_string(),
                control_plane: control_plane.clone(),
                child: None,
                starts: 0,
            };
            match cloud.spawn() {
                Ok(()) => return Ok(cloud),
                Err(e) if attempt < 3 && !cloud.is_running() => {
                    eprintln!(
                        "cloudcore exited at start (attempt {attempt}), retrying on other ports: {e:#}"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.address()])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(["--advertise-address", &self.tunnel_ip.to_string()]);
        match &self.control_plane {
            ControlPlane::Embedded => command
                .args(["--control-plane", "embedded"])
                .args(["--api-listen", &format!("127.0.0.1:{}", self.api_port)]),
            ControlPlane::Kube { credentials, .. } => command
                .args(["--control-plane", "kube", "--kubeconfig"])
                .arg(credentials),
        };
        command.args(&self.extra).env("RUST_LOG", &self.log_filter);
        std::fs::create_dir_all(&self.dir)?;
        let log = self.log_path();
        self.child = Some(try_spawn_logged(&mut command, &log)?);
        // Done when healthy, or as soon as it exited.
        eventually(Duration::from_secs(20), || {
            matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
                || http_get(self.metrics_port, "/healthz").is_some()
        });
        let healthy = self.is_running() && http_get(self.metrics_port, "/healthz").is_some();
        if !healthy || !self.is_running() {
            anyhow::bail!("cloudcore did not become healthy; log:\n{}", self.log());
        }
        Ok(())
    }

    /// Process id of the running serve process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("serve-{}.log", self.starts))
    }

    /// The log of the current (latest) serve process.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `IP:PORT`, what edges dial (`127.0.0.1:PORT` unless started with [`Cloud::start_at`]).
    pub fn address(&self) -> String {
        SocketAddr::new(self.tunnel_ip, self.port).to_string()
    }

    /// Graceful stop (SIGTERM), as a Deployment rollout would do.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Stops and starts again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("{e:#}");
        }
    }

    /// Stops (if running) and starts again on the same ports and data dir with `extra` flags
    /// instead of the original ones; an error holding the log if it does not become healthy
    /// (a refused start exits, and [`Cloud::log`] has why).
    pub fn try_restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.stop();
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn()
    }

    /// The extra `serve` flags it runs with.
    pub fn extra_flags(&self) -> &[String] {
        &self.extra
    }

    /// Whether the serve process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `kubectl ARGS` with `stdin`, asserting success; its stdout.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_with_stdin(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pod `name` of namespace `default` as the API holds it (`kubectl get -o json`).
    pub fn pod(&self, name: &str) -> Option<Value> {
        let out = self.kubectl(&["get", "pod", name, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Waits (polling every 100 ms) until pod `name` satisfies `check`; panics after `within`
    /// with `what`, the pod's last status and `context()` (an edge log, say).
    pub fn wait_pod(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
        context: impl FnOnce() -> String,
    ) -> Value {
        let started = Instant::now();
        let mut last = None;
        loop {
            if let Some(pod) = self.pod(name) {
                if check(&pod) {
                    return pod;
                }
                last = Some(pod);
            }
            if started.elapsed() >= within {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "pod {name}: {what} not reached within {within:?}; last status: {}\n{}",
            last.map(|p| p["status"].to_string()).unwrap_or_default(),
            context()
        );
    }

    /// Runs a `cloudcore` CLI command against this data dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("cloudcore"))
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .output()
            .expect("run cloudcore CLI")
    }

    /// `token create -o json` with extra flags.
    pub fn token(&self, extra: &[&str]) -> Token {
        let mut args = vec!["token", "create", "-o", "json", "--cloud"];
        let address = self.address();
        args.push(&address);
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("token JSON");
        Token {
            token: v["token"].as_str().expect("token").to_string(),
            id: v["id"].as_str().expect("id").to_string(),
            ca_hash: v["ca_hash"].as_str().expect("ca_hash").to_string(),
            cloud: v["cloud"].as_str().expect("cloud").to_string(),
        }
    }

    /// `node list -o json`.
    pub fn nodes(&self) -> Vec<Value> {
        let out = self.cli(&["node", "list", "-o", "json"]);
        assert!(
            out.status.success(),
            "node list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("node list JSON")
    }

    /// One node from `node list`.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.nodes().into_iter().find(|n| n["name"] == name)
    }

    /// An admin kubeconfig of the API cloudcore uses: the one the embedded control plane
    /// wrote, or the real cluster's.
    pub fn kubeconfig(&self) -> PathBuf {
        match &self.control_plane {
            ControlPlane::Embedded => self.dir.join("kubeconfig"),
            ControlPlane::Kube { admin, .. } => admin.clone(),
        }
    }

    /// Runs the real `kubectl` against the embedded API as admin, with a private discovery
    /// cache so tests never share state.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_stdin(args, None)
    }

    /// The status of `node`'s Ready condition as kubectl shows it (`True`, `False`,
    /// `Unknown`; empty when the Node or its condition is missing).
    pub fn node_ready(&self, node: &str) -> String {
        let out = self.kubectl(&[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl` with `stdin` piped in (for `apply -f -`).
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        cluster::kubectl(
            &self.kubeconfig(),
            &self.dir.join("kubectl-cache"),
            args,
            stdin,
        )
    }

    /// The current metrics page (empty if the server does not answer).
    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").unwrap_or_default()
    }

    /// One metric series, 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series).unwrap_or(0.0)
    }
}

fn loopback() -> IpAddr {
    Ipv4Addr::LOCALHOST.into()
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A join token as `token create -o json` prints it.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub id: String,
    pub ca_hash: String,
    pub cloud: String,
}

/// Runs `edgecore join` into `dir` with the given token and node name.
pub fn join(dir: &Path, token: &Token, node: &str) -> Output {
    join_with(dir, &token.cloud, &token.token, &token.ca_hash, node)
}

/// Joins an edge named `node` into `dir` with a fresh token of `cloud`, runs `edgecore run`
/// with `extra` flags (e.g. `--cri-endpoint`) and waits until it is connected; panics with the
/// join's error or the edge's log otherwise.
pub fn join_and_run(cloud: &Cloud, dir: &Path, node: &str, extra: &[&str]) -> Edge {
    join_and_start(cloud, None, dir, node, extra)
}

/// [`join_and_run`] inside `net`'s network namespace (`cloud` started with
/// [`Cloud::start_at`] its host address, or [`Cloud::start_kube`] there).
pub fn join_and_run_in(
    net: &EdgeNet,
    cloud: &Cloud,
    dir: &Path,
    node: &str,
    extra: &[&str],
) -> Edge {
    join_and_start(cloud, Some(net), dir, node, extra)
}

fn join_and_start(
    cloud: &Cloud,
    net: Option<&EdgeNet>,
    dir: &Path,
    node: &str,
    extra: &[&str],
) -> Edge {
    let token = cloud.token(&[]);
    let out = match net {
        Some(net) => join_in(net, dir, &token, node),
        None => join(dir, &token, node),
    };
    assert!(
        out.status.success(),
        "join {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edge = match net {
        Some(net) => Edge::start_in(net, dir, extra),
        None => Edge::start_with(dir, extra),
    };
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "edge {node} did not connect; log:\n{}",
        edge.log()
    );
    edge
}

/// Runs `edgecore join` inside `net`'s network namespace (the token's cloud address must be
/// reachable from there: see [`Cloud::start_at`]).
pub fn join_in(net: &EdgeNet, dir: &Path, token: &Token, node: &str) -> Output {
    join_command(
        net.command(bin("edgecore")),
        dir,
        &token.cloud,
        &token.token,
        &token.ca_hash,
        node,
    )
}

/// Runs `edgecore join` with explicit values (for the negative cases).
pub fn join_with(dir: &Path, cloud: &str, token: &str, ca_hash: &str, node: &str) -> Output {
    join_command(
        Command::new(bin("edgecore")),
        dir,
        cloud,
        token,
        ca_hash,
        node,
    )
}

/// Adds the join arguments to `command` (`edgecore`, maybe behind `ip netns exec`) and runs it.
pub(crate) fn join_command(
    mut command: Command,
    dir: &Path,
    cloud: &str,
    token: &str,
    ca_hash: &str,
    node: &str,
) -> Output {
    command
        .args([
            "join",
            "--cloud",
            cloud,
            "--token",
            token,
            "--ca-hash",
            ca_hash,
            "--node-name",
            node,
        ])
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run edgecore join")
}

/// A running `edgecore run`.
pub struct Edge {
    pub dir: PathBuf,
    /// Port of the metrics listener on 127.0.0.1 (inside the namespace, if any).
    pub metrics_port: u16,
    child: Option<Child>,
    /// The network namespace edgecore runs in ([`Edge::start_in`]); `None` for the root one.
    netns: Option<String>,
}

impl Edge {
    /// Starts `edgecore run` on a joined data dir. The metrics listener binds port 0 and the
    /// port is read from the log line edgecore writes once it is bound, so fifty edges started
    /// at once never race for ports.
    pub fn start(dir: &Path) -> Edge {
        Edge::start_with(dir, &[])
    }

    /// Like [`Edge::start`] with extra `edgecore run` flags (`--cri-endpoint ...`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Edge {
        Edge::spawn(Command::new(bin("edgecore")), dir, extra, None)
    }

    /// Like [`Edge::start_with`] inside `net`'s network namespace: the edge reaches the cloud
    /// only over the veth pair, and [`Edge::metric`] enters the namespace to read metrics.
    /// Drop the `Edge` before the [`EdgeNet`].
    pub fn start_in(net: &EdgeNet, dir: &Path, extra: &[&str]) -> Edge {
        Edge::spawn(
            net.command(bin("edgecore")),
            dir,
            extra,
            Some(net.name().to_string()),
        )
    }

    /// Like [`Edge::start_in`] through [`EdgeNet::enter`] (`nsenter --net`): edgecore keeps the
    /// machine's mount namespace, as it must next to a containerd in the same namespace
    /// ([`gateway`]).
    pub fn start_entered(net: &EdgeNet, dir: &Path, extra: &[&str]) -> Edge {
        Edge::spawn(
            net.enter(bin("edgecore")),
            dir,
            extra,
            Some(net.name().to_string()),
        )
    }

    /// Like [`Edge::start_in`] with extra environment for edgecore (`LD_PRELOAD` of
    /// libfaketime to skew its clock, for example).
    pub fn start_in_with_env(
        net: &EdgeNet,
        dir: &Path,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Edge {
        let mut command = net.command(bin("edgecore"));
        command.envs(env.iter().copied());
        Edge::spawn(command, dir, extra, Some(net.name().to_string()))
    }

    /// Starts `command` (`edgecore`, maybe behind `ip netns exec`, which execs it, so the
    /// child is edgecore itself) with the `run` arguments.
    ///
    /// Unless `extra` says otherwise, DMI is served on `DIR/dmi.sock` and no MQTT broker is
    /// used ([`device_defaults`]): edges of parallel tests never share KubeEdge's default socket
    /// or broker.
    fn spawn(mut command: Command, dir: &Path, extra: &[&str], netns: Option<String>) -> Edge {
        command
            .arg("run")
            .arg("--data-dir")
            .arg(dir)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(device_defaults(dir, extra))
            .args(extra);
        let log = dir.join("run.log");
        let mut child = spawn_logged(command, &log);
        let deadline = Instant::now() + Duration::from_secs(20);
        let metrics_port = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = bound_metrics_port(&text) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("edgecore exited ({status}) before serving metrics; log:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "edgecore did not start within 20 s; log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Edge {
            dir: dir.to_path_buf(),
            metrics_port,
            child: Some(child),
            netns,
        }
    }

    /// Process id of edgecore.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("run.log")).unwrap_or_default()
    }

    /// One metric series, 0 when absent or when the edge does not answer.
    pub fn metric(&self, series: &str) -> f64 {
        let port = self.metrics_port;
        let page = match &self.netns {
            None => http_get(port, "/metrics"),
            Some(name) => netns::run_in_namespace(name, || http_get(port, "/metrics"))
                .ok()
                .flatten(),
        };
        page.and_then(|page| metric_value(&page, series))
            .unwrap_or(0.0)
    }

    pub fn connected(&self) -> bool {
        self.metric("edgecore_cloud_connected") == 1.0
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// SIGKILL, as a crash or power cut would end it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the edge's store holds, from `edgecore ctl get all -o json`.
    pub fn objects(&self) -> Vec<EdgeObject> {
        edge_objects(&self.dir)
    }
}

/// The flags `edgecore run` gets unless `extra` gives them: `--dmi-socket DIR/dmi.sock`,
/// `--mqtt-broker none`, `--service-proxy none` and `--cluster-dns none` (edges of parallel
/// tests share the root network namespace; a test of Services runs its gateway in a namespace
/// of its own and turns them on).
fn device_defaults(dir: &Path, extra: &[&str]) -> Vec<String> {
    let given = |flag: &str| {
        extra
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
    };
    let mut flags = Vec::new();
    if !given("--dmi-socket") {
        flags.push("--dmi-socket".to_string());
        flags.push(dir.join("dmi.sock").display().to_string());
    }
    if !given("--mqtt-broker") {
        flags.extend(["--mqtt-broker".to_string(), "none".to_string()]);
    }
    for flag in ["--service-proxy", "--cluster-dns"] {
        if !given(flag) {
            flags.extend([flag.to_string(), "none".to_string()]);
        }
    }
    flags
}

/// One object in an edge's store, as `edgecore ctl get -o json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeObject {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: u64,
}

/// What the store in `dir` holds (works whether or not `edgecore run` is running).
pub fn edge_objects(dir: &Path) -> Vec<EdgeObject> {
    let out = Command::new(bin("edgecore"))
        .args(["ctl", "get", "all", "-o", "json", "--data-dir"])
        .arg(dir)
        .output()
        .expect("run edgecore ctl");
    assert!(
        out.status.success(),
        "edgecore ctl get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ctl get -o json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    items
        .iter()
        .map(|item| EdgeObject {
            kind: item["kind"].as_str().unwrap_or_default().to_string(),
            namespace: item["namespace"].as_str().unwrap_or_default().to_string(),
            name: item["name"].as_str().unwrap_or_default().to_string(),
            uid: item["uid"].as_str().unwrap_or_default().to_string(),
            resource_version: item["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_default(),
        })
        .collect()
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A tmpfs of its own, unmounted when dropped: a data dir whose free space the test controls,
/// whatever the machine's disk holds (a nearly full shared disk makes edgecore report
/// DiskPressure, as a kubelet would, and the scheduler then places nothing there).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `256m`) on a fresh directory; needs root.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {} (needs root; CI runs as root)",
            dir.path().display()
        );
        Tmpfs { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The repository's `deploy/` directory (scripts the harness shares with the quick start).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ lives in the workspace")
        .join("deploy")
}

/// A private containerd started with the project's config (`deploy/containerd/containerd.sh`),
/// with the test images (`localhost/edge/busybox:1`, `localhost/edge/pause:1`, built from
/// Debian's busybox-static by `deploy/images/build.sh`) imported. Stopped, with every pod it
/// ran removed, when dropped.
pub struct Containerd {
    pub dir: PathBuf,
    /// `unix://DIR/containerd.sock`, for `edgecore run --cri-endpoint`.
    pub endpoint: String,
    /// The pod subnet and bridge of this instance (for [`Containerd::reboot`]).
    pub subnet: String,
    pub bridge: String,
    /// The network namespace it runs in ([`Containerd::start_in`]); `None` for the root one.
    pub netns: Option<String>,
}

/// Image names the tests use.
pub const BUSYBOX: &str = "localhost/edge/busybox:1";
pub const PAUSE: &str = "localhost/edge/pause:1";

impl Containerd {
    /// Starts containerd in `dir`. Fails with what is missing when the machine cannot run it
    /// (not root, packages absent): these tests never pass silently.
    pub fn start(dir: &Path) -> Containerd {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = (std::process::id() % 200) * 16
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 16;
        let subnet = format!("10.{}.{}.0/24", 100 + n / 250, n % 250);
        let bridge = format!("edget{n}");
        Containerd::start_full(dir, None, subnet, bridge)
    }

    /// Like [`Containerd::start`] inside `net`'s network namespace (through
    /// [`EdgeNet::enter`]), with pod subnet `subnet` on bridge `bridge`, both inside the
    /// namespace: the gateway of [`gateway`].
    pub fn start_in(net: &EdgeNet, dir: &Path, subnet: &str, bridge: &str) -> Containerd {
        Containerd::start_full(
            dir,
            Some(net.name().to_string()),
            subnet.to_string(),
            bridge.to_string(),
        )
    }

    fn start_full(dir: &Path, netns: Option<String>, subnet: String, bridge: String) -> Containerd {
        assert!(
            is_root(),
            "containerd tests need root (CI runs as root); run the test suite as root"
        );
        for tool in ["containerd", "runc", "ctr"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .is_ok_and(|o| o.status.success()),
                "{tool} is not installed: apt-get install containerd runc containernetworking-plugins iptables busybox-static (.ci/run does)"
            );
        }
        std::fs::create_dir_all(dir).expect("containerd dir");
        let containerd = Containerd {
            dir: dir.to_path_buf(),
            endpoint: format!("unix://{}/containerd.sock", dir.display()),
            subnet,
            bridge,
            netns,
        };
        containerd.start_daemon();
        let images = dir.join("images");
        std::fs::create_dir_all(&images).expect("images dir");
        for (file, name, entrypoint, cmd) in [
            ("busybox.tar", BUSYBOX, "null", r#"["/bin/sh"]"#),
            (
                "pause.tar",
                PAUSE,
                r#"["/bin/busybox","sleep","2147483647"]"#,
                "null",
            ),
        ] {
            let out = Command::new(deploy_dir().join("images/build.sh"))
                .arg(images.join(file))
                .args([name, entrypoint, cmd])
                .output()
                .expect("run build.sh");
            assert!(
                out.status.success(),
                "building {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = Command::new(bin("edgecore"))
                .args(["images", "import", "--cri-endpoint", &containerd.endpoint])
                .arg(images.join(file))
                .output()
                .expect("run edgecore images import");
            assert!(
                out.status.success(),
                "importing {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        containerd
    }

    /// Starts this containerd's daemon (again), on the same state and images.
    pub fn start_daemon(&self) {
        let script = deploy_dir().join("containerd/containerd.sh");
        let mut command = match &self.netns {
            None => Command::new(script),
            Some(name) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/var/run/netns/{name}"))
                    .arg("--")
                    .arg(script);
                command
            }
        };
        let out = command
            .arg("start")
            .arg(&self.dir)
            .arg(&self.subnet)
            .arg(&self.bridge)
            .output()
            .expect("run containerd.sh");
        assert!(
            out.status.success(),
            "containerd did not start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What a reboot leaves of the runtime: every sandbox and container removed, containerd
    /// stopped (its bridge deleted) and started again; the images stay.
    pub fn reboot(&self) {
        self.remove_all_pods();
        self.stop_daemon();
        self.start_daemon();
    }

    /// Stops the daemon only (a runtime outage): sandboxes and containers stay as they are.
    pub fn stop_daemon(&self) {
        let out = Command::new(deploy_dir().join("containerd/containerd.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output()
            .expect("run containerd.sh stop");
        assert!(
            out.status.success(),
            "containerd did not stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops and removes every pod sandbox this containerd runs.
    pub fn remove_all_pods(&self) {
        let endpoint = self.endpoint.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let Ok(cri) = edgecore::cri::Cri::new(&endpoint) else {
                return;
            };
            if let Ok(sandboxes) = cri.list_pod_sandboxes(Default::default()).await {
                for sandbox in sandboxes {
                    let _ = cri.stop_pod_sandbox(&sandbox.id).await;
                    let _ = cri.remove_pod_sandbox(&sandbox.id).await;
                    // The pod cgroups edgecore would remove (a real reboot empties cgroupfs).
                    if let Some(uid) = sandbox.labels.get(edgecore::pods::spec::LABEL_POD_UID) {
                        edgecore::pods::cgroups::remove_pod(uid);
                    }
                }
            }
        });
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all_pods();
        let _ = Command::new(deploy_dir().join("containerd/containerd.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

fn is_root() -> bool {
    // The real uid, as `id -u` prints it.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A kube-rs client for the admin kubeconfig the embedded control plane wrote (see
/// [`Cloud::kubeconfig`]). kube's `ring` feature builds its TLS config with ring itself, so no
/// process-wide rustls provider is needed.
pub async fn kube_client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("cannot read {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .context("the kubeconfig is not usable")?;
    kube::Client::try_from(config).context("cannot build a kube client")
}

/// The metrics port in edgecore's start-up line (`... metrics=127.0.0.1:PORT ...`).
fn bound_metrics_port(log: &str) -> Option<u16> {
    log.lines()
        .filter(|l| l.contains("edgecore running"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("metrics=127.0.0.1:"))
        })
        .and_then(|p| p.parse().ok())
}

/// Installs a test tracing subscriber once (for in-process clients).
pub fn init_test_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_test_writer()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_port_is_read_from_the_start_line() {
        let log = "2026-11-24T06:39:17Z  INFO edgecore: edgecore running node.name=gw-1 metrics=127.0.0.1:41234 data_dir=x\n";
        assert_eq!(bound_metrics_port(log), Some(41234));
        assert_eq!(bound_metrics_port("nothing yet"), None);
    }

    #[test]
    fn edges_get_a_private_dmi_socket_and_no_broker_unless_told() {
        let dir = Path::new("/tmp/e");
        assert_eq!(
            device_defaults(dir, &["--no-pod-runtime"]),
            [
                "--dmi-socket",
                "/tmp/e/dmi.sock",
                "--mqtt-broker",
                "none",
                "--service-proxy",
                "none",
                "--cluster-dns",
                "none"
            ]
        );
        assert_eq!(
            device_defaults(
                dir,
                &[
                    "--mqtt-broker",
                    "tcp://127.0.0.1:1",
                    "--service-proxy",
                    "nftables",
                    "--cluster-dns",
                    "169.254.96.16"
                ]
            ),
            ["--dmi-socket", "/tmp/e/dmi.sock"]
        );
        assert_eq!(
            device_defaults(
                dir,
                &[
                    "--dmi-socket=none",
                    "--mqtt-broker=none",
                    "--service-proxy=none",
                    "--cluster-dns=none"
                ]
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn metric_lines_are_found_by_series() {
        let page = "# HELP x y\ncloudcore_joins_total 3\ncloudcore_join_rejections_total{reason=\"token_expired\"} 2\n";
        assert_eq!(metric_value(page, "cloudcore_joins_total"), Some(3.0));
        assert_eq!(
            metric_value(
                page,
                "cloudcore_join_rejections_total{reason=\"token_expired\"}"
            ),
            Some(2.0)
        );
        assert_eq!(metric_value(page, "cloudcore_joins"), None);
    }
}
