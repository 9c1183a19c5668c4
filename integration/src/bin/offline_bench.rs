//! `offline-bench`: how fast an edge gateway gets its pods back with the cloud unreachable
//! (after a reboot, after a crash of edgecore), and how fast it catches up once the cloud is
//! back.
//!
//! Everything is real and on this machine: a private containerd (the project's config and
//! images, `deploy/containerd/containerd.sh`), `cloudcore serve --control-plane embedded`
//! listening on the host end of a veth pair, and `edgecore run` inside a network namespace
//! behind it (`integration::netns::EdgeNet`), joined with `edgecore join`. The partition downs
//! the host end of the pair ([`EdgeNet::cut`]).
//!
//! Once: `--pods` pods (one busybox container that sleeps, mounting the ConfigMap `settings`)
//! created through the API and running. Then per round, with the link cut at its start:
//!
//! 1. **Reboot.** edgecore stopped (SIGTERM), the gateway "rebooted" (every sandbox and
//!    container removed, containerd stopped and started: `Containerd::reboot`), edgecore
//!    started: the time from its spawn until the CRI shows every pod's container running
//!    (listed every 10 ms), and until the last container's StartedAt in containerd. Beside it,
//!    each after a reboot of its own, the same pods started straight through the CRI by this
//!    process (RunPodSandbox + CreateContainer + StartContainer, with the configs edgecore's
//!    own `pods::spec` builds from the pod the API stored), one after another and all at once:
//!    the raw runtime's time for as many pods. Then edgecore's memory from `/proc`.
//! 2. **Restart.** edgecore killed (SIGKILL) and started: the time from its spawn until its log
//!    says every pod was adopted (`adopted running pod`); every container ID must be unchanged.
//! 3. **Heal.** Still partitioned: `edgecore ctl restart` on every pod (each a status change,
//!    restartCount + 1, through the daemon's control socket), and three API changes (a pod
//!    deleted, the ConfigMap updated, a pod created). Once cloudcore has closed the edge's
//!    session (its dead-after, 30 s), the link is healed: the time until the edge is
//!    connected, every restart count produced offline is in the API, and the API changes are
//!    applied at the edge (the new pod running and the deleted one gone in the runtime, the
//!    ConfigMap's new version in the edge's store); also the node Ready again and the API
//!    showing the new pod running and the deleted one gone.
//!
//! A failure, a panic, SIGINT/SIGTERM or `--timeout-secs` stops everything this bench started
//! (edgecore, cloudcore, containerd and every pod in it, the network namespace) and keeps the
//! temp dir with the logs.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use edgecore::cri::Cri;
use edgecore::pods::spec::{self, ContainerKind, Objects, PodPaths};
use edgecore::pods::volumes;
use edgecore::store::Store;
use integration::bench::{self, Machine, Spread, mib};
use integration::netns::EdgeNet;
use integration::{Cloud, Containerd, Edge};
use k8s_cri::v1 as cri_api;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use proto::sync::ObjectKey;
use serde_json::{Value, json};

/// The namespace of every pod.
const NAMESPACE: &str = "offline-bench";
/// The edge's node name.
const NODE: &str = "offline-bench-edge";
/// The one container of every pod.
const CONTAINER: &str = "c";
/// The container's command: sleeps until SIGTERM, then exits at once (a shell as PID 1
/// ignores SIGTERM without a trap, and `wait` lets the trap run while `sleep` runs).
const COMMAND: &str = "trap 'exit 0' TERM; sleep 2147483647 & wait";
/// terminationGracePeriodSeconds of every pod; the command above never needs it.
const GRACE_SECS: i64 = 2;
/// The ConfigMap every pod mounts, updated during each partition.
const CONFIG_MAP: &str = "settings";
/// How often the runtime (and the rest, after a heal) is looked at while waiting.
const POLL: Duration = Duration::from_millis(10);
/// How often the API is looked at while waiting for pods to run at setup.
const API_POLL: Duration = Duration::from_millis(100);
/// How long one step (pods running, adopted, caught up) may take before the bench fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the edge may take to connect after it starts at setup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long cloudcore may take to close the partitioned edge's session (dead-after 30 s).
const SESSION_CLOSE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one API or CRI call, or one CLI run, may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the embedded API may take to answer after cloudcore reports healthy.
const API_READY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(
    name = "offline-bench",
    about = "Measures offline recovery on an edge with the cloud unreachable: pods back after a \
             reboot (against the raw CRI's time for as many pods), pods adopted after a kill -9, \
             and the catch-up after the link heals"
)]
struct Cli {
    /// Pods on the edge (and started straight through the CRI, twice, for comparison).
    #[arg(long, default_value_t = 20)]
    pods: usize,
    /// Rounds (reboot, restart, heal) on the same cloudcore, edge and containerd; figures are
    /// medians and maxima across rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// cloudcore's --node-grace-period: heartbeats missing this long make the node
    /// Ready=Unknown and tainted unreachable, well within each partition.
    #[arg(long, default_value = "5s")]
    node_grace_period: String,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// The edgecore binary [default: `edgecore` next to this executable].
    #[arg(long)]
    edgecore: Option<PathBuf>,
    /// Give up (and stop everything started) after this many seconds in total.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| vec![("--pods", c.pods), ("--rounds", c.rounds)]) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    bench::init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = Stop {
        deadline: Instant::now() + Duration::from_secs(cli.timeout_secs),
        timeout_secs: cli.timeout_secs,
        interrupted: Arc::default(),
    };
    runtime.spawn(watch_signals(stop.interrupted.clone()));
    let result = run(&cli, &runtime, &stop);
    runtime.shutdown_timeout(Duration::from_secs(5));
    bench::finish(result, cli.json)
}

/// Turns SIGINT and SIGTERM into [`Stop`]: the bench then stops at its next check and cleans
/// up, instead of dying with containerd, cloudcore and the namespace left behind.
async fn watch_signals(interrupted: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping: cleaning up what was started");
    interrupted.store(true, Ordering::SeqCst);
}

/// When the bench must give up: the overall deadline (`--timeout-secs`) or a signal. Every
/// wait checks it, and every call and command has a bound of its own, so the bench stops by
/// itself.
#[derive(Debug, Clone)]
struct Stop {
    deadline: Instant,
    timeout_secs: u64,
    interrupted: Arc<AtomicBool>,
}

impl Stop {
    fn check(&self) -> Result<()> {
        if self.interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        ensure!(
            Instant::now() < self.deadline,
            "gave up after {} s (--timeout-secs)",
            self.timeout_secs
        );
        Ok(())
    }

    /// Calls `probe` every `every` until it gives a value; fails after `limit`, or at once when
    /// the bench must stop.
    fn poll<T>(
        &self,
        what: &str,
        limit: Duration,
        every: Duration,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let until = Instant::now() + limit;
        loop {
            if let Some(value) = probe()? {
                return Ok(value);
            }
            self.check()?;
            ensure!(Instant::now() < until, "{what}: not within {limit:?}");
            std::thread::sleep(every);
        }
    }
}

/// The binaries under test.
struct Binaries {
    cloudcore: PathBuf,
    edgecore: PathBuf,
}

/// Runs setup and the rounds in a temp dir; a panic is turned into an error after the guards
/// it unwound through cleaned up. On any failure the temp dir is kept.
fn run(cli: &Cli, rt: &tokio::runtime::Runtime, stop: &Stop) -> Result<Report> {
    let binaries = Binaries {
        cloudcore: bench::cloudcore_binary(cli.cloudcore.as_ref())?,
        edgecore: bench::edgecore_binary(cli.edgecore.as_ref())?,
    };
    let dir = tempfile::Builder::new()
        .prefix("offline-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        measure(cli, rt, stop, &binaries, dir.path())
    }))
    .unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(anyhow!("the bench panicked: {why}"))
    });
    match outcome {
        Ok((runtime_version, rounds)) => Ok(Report {
            pods: cli.pods,
            node_grace_period: cli.node_grace_period.clone(),
            runtime_version,
            machine: Machine::read(),
            rounds,
        }),
        Err(e) => {
            let kept = dir.keep();
            eprintln!("logs and data dirs are kept in {}", kept.display());
            Err(e)
        }
    }
}

fn measure(
    cli: &Cli,
    rt: &tokio::runtime::Runtime,
    stop: &Stop,
    binaries: &Binaries,
    dir: &Path,
) -> Result<(String, Vec<Round>)> {
    let mut site = Site::start(cli, rt, stop, binaries, dir)?;
    let mut rounds = Vec::with_capacity(cli.rounds);
    for index in 1..=cli.rounds {
        match site.round(index) {
            Ok(round) => {
                eprintln!(
                    "round {index}/{}: reboot -> all running {:.0} ms (raw CRI {:.0} ms one by one, \
                     {:.0} ms at once); restart -> adopted {:.0} ms; heal -> connected {:.0} ms, \
                     caught up {:.0} ms",
                    cli.rounds,
                    round.reboot.all_running_ms,
                    round.reboot.raw_sequential_ms,
                    round.reboot.raw_concurrent_ms,
                    round.restart.all_adopted_ms,
                    round.heal.connected_ms,
                    round.heal.all_ms(),
                );
                rounds.push(round);
            }
            Err(e) => {
                site.print_tails();
                return Err(e.context(format!("round {index}")));
            }
        }
    }
    let version = site.runtime_version.clone();
    site.stop();
    Ok((version, rounds))
}

// ---------------------------------------------------------------------------------------------
// The container runtime

/// The private containerd, stopped with every pod in it when dropped (by
/// `integration::Containerd`, on a plain thread, as it runs a runtime of its own); then the pod
/// cgroups a reboot leaves (`/edgecore/pod<uid>`, empty once the pods are gone) are removed
/// for every pod started, as edgecore does for the pods it deletes.
struct Runtime {
    containerd: Option<Containerd>,
    /// Uids of the pods started in it (through edgecore or straight through the CRI).
    uids: Vec<String>,
}

impl Runtime {
    /// Starts containerd in `dir` with the project's config and imports the test images, as
    /// `integration::Containerd::start` does (which finds `edgecore` only next to a test).
    fn start(dir: &Path) -> Result<Runtime> {
        for tool in ["containerd", "runc", "ctr"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            ensure!(
                found,
                "{tool} is not installed: apt-get install containerd runc containernetworking-plugins iptables busybox-static"
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // A subnet and bridge of its own, away from the tests' 10.100-10.112, pod-bench's
        // 10.99 and another offline-bench running at the same time. The guard first: a start
        // that fails half-way is stopped too.
        let n = std::process::id() % 250;
        let runtime = Runtime {
            containerd: Some(Containerd {
                dir: dir.to_path_buf(),
                endpoint: format!("unix://{}/containerd.sock", dir.display()),
                subnet: format!("10.98.{n}.0/24"),
                bridge: format!("edgeob{n}"),
                netns: None,
            }),
            uids: Vec::new(),
        };
        let containerd = runtime.get()?;
        let script = integration::deploy_dir().join("containerd/containerd.sh");
        bench::run_tool(
            Command::new(&script)
                .arg("start")
                .arg(dir)
                .arg(&containerd.subnet)
                .arg(&containerd.bridge),
            "containerd.sh start",
            CALL_TIMEOUT,
        )?;
        let images = dir.join("images");
        std::fs::create_dir_all(&images)?;
        let build = integration::deploy_dir().join("images/build.sh");
        for (file, name, entrypoint, cmd) in [
            (
                "busybox.tar",
                integration::BUSYBOX,
                "null",
                r#"["/bin/sh"]"#,
            ),
            (
                "pause.tar",
                integration::PAUSE,
                r#"["/bin/busybox","sleep","2147483647"]"#,
                "null",
            ),
        ] {
            bench::run_tool(
                Command::new(&build)
                    .arg(images.join(file))
                    .args([name, entrypoint, cmd]),
                &format!("build.sh {name}"),
                CALL_TIMEOUT,
            )?;
            edgecore::images::import(&containerd.endpoint, &[images.join(file)])
                .with_context(|| format!("cannot import {name}"))?;
        }
        Ok(runtime)
    }

    fn get(&self) -> Result<&Containerd> {
        self.containerd.as_ref().context("containerd is stopped")
    }

    /// What a reboot leaves: no sandbox, no container, containerd started again.
    fn reboot(&self) -> Result<()> {
        self.get()?.reboot();
        Ok(())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(containerd) = self.containerd.take() {
            let _ = std::thread::spawn(move || drop(containerd)).join();
        }
        let mut left: Vec<PathBuf> = self
            .uids
            .iter()
            .flat_map(|uid| edgecore::pods::cgroups::pod_dirs(uid))
            .collect();
        // The shims remove the containers' own cgroups below these a moment after the pods
        // are removed.
        for _ in 0..50 {
            left.retain(|dir| dir.exists() && std::fs::remove_dir(dir).is_err());
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the runtime holds of the bench namespace's pods, by pod name.
#[derive(Debug, Default)]
struct Observed {
    /// The id of the running container `c`.
    running: HashMap<String, String>,
    /// Containers in any state.
    containers: HashMap<String, usize>,
    /// Sandboxes in any state, and the ready ones.
    sandboxes: HashMap<String, usize>,
    ready_sandboxes: HashMap<String, usize>,
}

impl Observed {
    /// Whether nothing of pod `name` is left in the runtime.
    fn gone(&self, name: &str) -> bool {
        !self.containers.contains_key(name) && !self.sandboxes.contains_key(name)
    }
}

async fn observe(cri: &Cri) -> Result<Observed> {
    let labels = HashMap::from([(spec::LABEL_POD_NAMESPACE.to_string(), NAMESPACE.to_string())]);
    let mut observed = Observed::default();
    for sandbox in cri.list_pod_sandboxes(labels.clone()).await? {
        let name = sandbox
            .labels
            .get(spec::LABEL_POD_NAME)
            .cloned()
            .unwrap_or_default();
        if sandbox.state == cri_api::PodSandboxState::SandboxReady as i32 {
            *observed.ready_sandboxes.entry(name.clone()).or_default() += 1;
        }
        *observed.sandboxes.entry(name).or_default() += 1;
    }
    for container in cri.list_containers(labels).await? {
        let name = container
            .labels
            .get(spec::LABEL_POD_NAME)
            .cloned()
            .unwrap_or_default();
        let running = container.state == cri_api::ContainerState::ContainerRunning as i32
            && container
                .metadata
                .as_ref()
                .is_some_and(|m| m.name == CONTAINER);
        if running {
            observed.running.insert(name.clone(), container.id.clone());
        }
        *observed.containers.entry(name).or_default() += 1;
    }
    Ok(observed)
}

/// Lists the runtime every [`POLL`] until every pod of `names` has its container running;
/// when it saw that.
async fn wait_running(cri: Cri, names: Vec<String>, stop: Stop) -> Result<Instant> {
    let started = Instant::now();
    loop {
        let observed = observe(&cri).await?;
        if names.iter().all(|n| observed.running.contains_key(n)) {
            return Ok(Instant::now());
        }
        stop.check()?;
        if started.elapsed() >= STEP_TIMEOUT {
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !observed.running.contains_key(*n))
                .collect();
            bail!("pods not running within {STEP_TIMEOUT:?}: {missing:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A pod this bench starts straight through the CRI, its configs built before the clock
/// starts.
struct RawPod {
    uid: String,
    paths: PodPaths,
    sandbox: cri_api::PodSandboxConfig,
    container: cri_api::ContainerConfig,
}

/// RunPodSandbox + CreateContainer + StartContainer: what a pod start cannot do without.
async fn start_raw(cri: &Cri, pod: &RawPod) -> Result<()> {
    let sandbox = cri.run_pod_sandbox(pod.sandbox.clone()).await?;
    let container = cri
        .create_container(&sandbox, pod.container.clone(), pod.sandbox.clone())
        .await?;
    cri.start_container(&container).await?;
    Ok(())
}

/// How the raw pods are started.
#[derive(Debug, Clone, Copy)]
enum RawOrder {
    OneByOne,
    AllAtOnce,
}

// ---------------------------------------------------------------------------------------------
// The site: containerd, cloudcore, the edge in its namespace

/// A pod on the edge, as the API created it.
#[derive(Debug, Clone)]
struct PodRef {
    name: String,
    uid: String,
}

/// A pod as `edgecore ctl get pods -o json` shows it (its local status).
#[derive(Debug, Clone)]
struct LocalPod {
    status: String,
    restarts: u64,
}

/// Fields drop in order: edgecore, containerd (with its pods), cloudcore, the namespace.
struct Site<'a> {
    edge: Option<Edge>,
    runtime: Runtime,
    cloud: Cloud,
    net: EdgeNet,
    client: kube::Client,
    rt: &'a tokio::runtime::Runtime,
    stop: &'a Stop,
    binaries: &'a Binaries,
    pods_wanted: usize,
    edge_dir: PathBuf,
    raw_dir: PathBuf,
    /// The pods the edge runs, oldest first.
    pods: Vec<PodRef>,
    /// The number of the next pod created.
    next_pod: usize,
    /// edgecore processes started so far (their logs are kept as `run-N.log`).
    edge_starts: usize,
    runtime_version: String,
}

impl<'a> Site<'a> {
    fn start(
        cli: &Cli,
        rt: &'a tokio::runtime::Runtime,
        stop: &'a Stop,
        binaries: &'a Binaries,
        dir: &Path,
    ) -> Result<Site<'a>> {
        eprintln!("starting containerd, the network namespace and cloudcore");
        let net = EdgeNet::create()?;
        let runtime = Runtime::start(&dir.join("containerd"))?;
        stop.check()?;
        let cloud = bench::start_cloud_at(
            &binaries.cloudcore,
            dir,
            net.host_ip().into(),
            &["--node-grace-period", &cli.node_grace_period],
            "info",
        )?;
        let edge_dir = dir.join("edge");
        join(binaries, &net, &cloud, &edge_dir)?;
        let client = block(
            rt,
            "reach the API",
            bench::api_client(NAMESPACE, API_READY_TIMEOUT, &cloud),
        )?;
        let mut site = Site {
            edge: None,
            runtime,
            cloud,
            net,
            client,
            rt,
            stop,
            binaries,
            pods_wanted: cli.pods,
            edge_dir,
            raw_dir: dir.join("raw"),
            pods: Vec::new(),
            next_pod: 0,
            edge_starts: 0,
            runtime_version: String::new(),
        };
        let setup = site.setup();
        if setup.is_err() {
            site.print_tails();
        }
        setup.map(|()| site)
    }

    /// The edge connected, the ConfigMap and the pods created and running.
    fn setup(&mut self) -> Result<()> {
        let cri = self.cri()?;
        self.runtime_version = self
            .block("read the runtime's version", async {
                let v = cri.version().await?;
                anyhow::Ok(format!("{} {}", v.runtime_name, v.runtime_version))
            })
            .unwrap_or_default();
        self.start_edge()?;
        self.stop
            .poll("the edge connected", CONNECT_TIMEOUT, POLL, || {
                Ok(self.edge()?.connected().then_some(()))
            })?;
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        let config_map: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIG_MAP, "namespace": NAMESPACE},
            "data": {"mode": "setup"},
        }))?;
        self.block("create the ConfigMap", async {
            Ok(config_maps
                .create(&PostParams::default(), &config_map)
                .await?)
        })?;
        eprintln!("creating {} pods through the API", self.pods_wanted);
        for _ in 0..self.pods_wanted {
            let pod = self.create_pod()?;
            self.pods.push(pod);
        }
        let names = self.names();
        self.stop.poll(
            "every pod running in the API",
            STEP_TIMEOUT,
            API_POLL,
            || {
                let pods = self.api_pods()?;
                Ok(names
                    .iter()
                    .all(|n| pods.get(n).is_some_and(container_running))
                    .then_some(()))
            },
        )?;
        Ok(())
    }

    /// Runs a future on the async runtime, bounded by [`CALL_TIMEOUT`].
    fn block<T>(&self, what: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        block(self.rt, what, work)
    }

    fn edge(&self) -> Result<&Edge> {
        self.edge.as_ref().context("edgecore is not running")
    }

    fn names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// A CRI client (made anew after each reboot of containerd).
    fn cri(&self) -> Result<Cri> {
        let endpoint = self.runtime.get()?.endpoint.clone();
        let _context = self.rt.enter();
        Ok(Cri::new(&endpoint)?)
    }

    /// Starts edgecore (its previous log kept as `run-N.log`); the instant and wall-clock
    /// time just before its spawn.
    fn start_edge(&mut self) -> Result<(Instant, i128)> {
        let log = self.edge_dir.join("run.log");
        if log.exists() {
            self.edge_starts += 1;
            let kept = self.edge_dir.join(format!("run-{}.log", self.edge_starts));
            std::fs::rename(&log, &kept)
                .with_context(|| format!("cannot keep {}", log.display()))?;
        }
        let endpoint = self.runtime.get()?.endpoint.clone();
        let wall = bench::wall_ns();
        let at = Instant::now();
        let edge = bench::start_edge_in(
            &self.binaries.edgecore,
            &self.net,
            &self.edge_dir,
            &["--cri-endpoint", &endpoint],
        )?;
        self.edge = Some(edge);
        Ok((at, wall))
    }

    fn edge_pid(&self) -> Result<u32> {
        self.edge()?.pid().context("edgecore is not running")
    }

    /// `edgecore ctl ARGS --data-dir DIR`, the real CLI; its stdout.
    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = bench::run_tool(
            Command::new(&self.binaries.edgecore)
                .arg("ctl")
                .args(args)
                .arg("--data-dir")
                .arg(&self.edge_dir),
            &format!("edgecore ctl {}", args.join(" ")),
            CALL_TIMEOUT,
        )?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The pods' local status, by name, from `edgecore ctl get pods -o json`.
    fn local_pods(&self) -> Result<HashMap<String, LocalPod>> {
        let out = self.ctl(&["get", "pods", "-o", "json"])?;
        let items: Value = serde_json::from_str(&out)
            .with_context(|| format!("ctl get pods -o json printed no JSON: {out}"))?;
        Ok(items
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["kind"] == "Pod" && p["namespace"] == NAMESPACE)
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    LocalPod {
                        status: p["status"].as_str().unwrap_or_default().to_string(),
                        restarts: p["restarts"].as_u64().unwrap_or(0),
                    },
                )
            })
            .collect())
    }

    /// The pods of the bench namespace in the API, by name.
    fn api_pods(&self) -> Result<HashMap<String, Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let list = self.block("list the pods", async {
            Ok(pods.list(&ListParams::default()).await?)
        })?;
        Ok(list
            .items
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect())
    }

    /// The node's Ready condition in the API (`True`, `False`, `Unknown`).
    fn node_ready(&self) -> Result<String> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = self.block("get the node", async { Ok(nodes.get(NODE).await?) })?;
        Ok(node
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status)
            .unwrap_or_default())
    }

    /// Creates the next pod through the API, bound to the edge.
    fn create_pod(&mut self) -> Result<PodRef> {
        let name = format!("pod-{:03}", self.next_pod);
        self.next_pod += 1;
        let pod: Pod = serde_json::from_value(pod_manifest(&name))?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let created = self.block("create a pod", async {
            Ok(pods.create(&PostParams::default(), &pod).await?)
        })?;
        let uid = created.metadata.uid.context("the created pod has no uid")?;
        self.runtime.uids.push(uid.clone());
        Ok(PodRef { name, uid })
    }

    /// Stops the edge and cloudcore gracefully; the rest stops as the guards drop.
    fn stop(mut self) {
        if let Some(edge) = self.edge.as_mut() {
            edge.stop();
        }
        self.cloud.stop();
    }

    fn print_tails(&self) {
        if let Some(edge) = &self.edge {
            print_tail("edgecore", &edge.log());
        }
        print_tail("cloudcore", &self.cloud.log());
    }

    // -----------------------------------------------------------------------------------------
    // One round

    fn round(&mut self, index: usize) -> Result<Round> {
        let local_before = self.local_pods()?;
        self.net.cut()?;
        let partitioned = Instant::now();
        eprintln!("round {index}: link cut; reboot");
        let reboot = self.reboot(index, &local_before)?;
        eprintln!("round {index}: restart (kill -9)");
        let restart = self.restart()?;
        eprintln!("round {index}: changes while partitioned, then heal");
        let heal = self.heal(index, partitioned)?;
        Ok(Round {
            reboot,
            restart,
            heal,
        })
    }

    /// Scenario 1: a reboot with the cloud unreachable, and the raw CRI's time for as many pods.
    fn reboot(&mut self, round: usize, local_before: &HashMap<String, LocalPod>) -> Result<Reboot> {
        if let Some(edge) = self.edge.as_mut() {
            edge.stop();
        }
        self.runtime.reboot()?;
        let raw_sequential_ms = self.raw_start(round, RawOrder::OneByOne)?;
        self.stop.check()?;
        let raw_concurrent_ms = self.raw_start(round, RawOrder::AllAtOnce)?;
        self.stop.check()?;
        let cri = self.cri()?;
        let left = self.block("list the runtime", observe(&cri))?;
        ensure!(
            left.containers.is_empty() && left.sandboxes.is_empty(),
            "the reboot left pods in the runtime: {left:?}"
        );

        let names = self.names();
        let poller = self
            .rt
            .spawn(wait_running(cri.clone(), names.clone(), self.stop.clone()));
        let (spawned, spawned_wall) = match self.start_edge() {
            Ok(started) => started,
            Err(e) => {
                poller.abort();
                return Err(e);
            }
        };
        let all_running = self
            .rt
            .block_on(poller)
            .context("the runtime poller panicked")??;
        let pid = self.edge_pid()?;
        let memory = Memory::read(pid)?;
        let all_running_ms = bench::ms(all_running.saturating_duration_since(spawned));

        // containerd's own stamps, and edgecore's log.
        let last_started_ns = self.block("read the containers' start times", async {
            let labels = HashMap::from([(
                spec::LABEL_MANAGED_BY.to_string(),
                spec::MANAGED_BY.to_string(),
            )]);
            let mut last = 0i128;
            for c in cri.list_containers(labels).await? {
                last = last.max(cri.container_status(&c.id).await?.started_at as i128);
            }
            anyhow::Ok(last)
        })?;
        let log = self.edge()?.log();
        let since = |message: &str| {
            log_stamps(&log, message)
                .next()
                .map(|(ns, _)| (ns - spawned_wall) as f64 / 1e6)
        };
        let process_up_ms = since("edgecore running");
        let runtime_answered_ms = since("found pods in the runtime");

        let observed = self.block("list the runtime", observe(&cri))?;
        for name in &names {
            ensure!(
                observed.ready_sandboxes.get(name) == Some(&1),
                "pod {name}: {:?} ready sandboxes after the reboot, expected 1",
                observed.ready_sandboxes.get(name)
            );
        }
        // A running container lost in the reboot counts one restart, as with the kubelet.
        self.stop.poll(
            "restart counts after the reboot (ctl get pods)",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                let local = self.local_pods()?;
                Ok(names
                    .iter()
                    .all(|n| {
                        let before = local_before.get(n).map_or(0, |p| p.restarts);
                        local
                            .get(n)
                            .is_some_and(|p| p.status == "Running" && p.restarts == before + 1)
                    })
                    .then_some(()))
            },
        )?;
        Ok(Reboot {
            all_running_ms,
            last_started_ms: (last_started_ns - spawned_wall) as f64 / 1e6,
            process_up_ms,
            runtime_answered_ms,
            raw_sequential_ms,
            raw_concurrent_ms,
            memory,
        })
    }

    /// Starts as many pods as the edge runs straight through the CRI, in `order`, and times
    /// it; then reboots, which removes them.
    fn raw_start(&mut self, round: usize, order: RawOrder) -> Result<f64> {
        let cri = self.cri()?;
        let first = self.pods.first().context("no pod")?.name.clone();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        let (template, config_map, image) = self.block("read the pod template", async {
            let template = pods.get(&first).await?;
            let config_map = config_maps.get(CONFIG_MAP).await?;
            let image = cri.image_status(integration::BUSYBOX).await?;
            anyhow::Ok((template, config_map, image))
        })?;
        let objects = Objects {
            config_maps: HashMap::from([(CONFIG_MAP.to_string(), config_map)]),
            ..Objects::default()
        };
        let tag = match order {
            RawOrder::OneByOne => "s",
            RawOrder::AllAtOnce => "c",
        };
        let mut raw = Vec::with_capacity(self.pods.len());
        for index in 0..self.pods.len() {
            let uid = format!("offline-bench-{}-{round}-{tag}-{index}", std::process::id());
            self.runtime.uids.push(uid.clone());
            raw.push(raw_pod(
                &template,
                &objects,
                image.as_ref(),
                &self.raw_dir,
                &format!("raw-{round}-{tag}-{index:03}"),
                &uid,
            )?);
        }
        let took = self.block("start the pods straight through the CRI", async {
            let started = Instant::now();
            match order {
                RawOrder::OneByOne => {
                    for pod in &raw {
                        start_raw(&cri, pod).await?;
                    }
                }
                RawOrder::AllAtOnce => {
                    futures::future::try_join_all(raw.iter().map(|pod| start_raw(&cri, pod)))
                        .await?;
                }
            }
            anyhow::Ok(started.elapsed())
        })?;
        let observed = self.block("list the runtime", observe(&cri))?;
        ensure!(
            observed.running.len() == raw.len(),
            "{} of {} direct pods running",
            observed.running.len(),
            raw.len()
        );
        self.runtime.reboot()?;
        for pod in &raw {
            edgecore::pods::worker::cleanup(&pod.paths, &pod.uid);
        }
        Ok(bench::ms(took))
    }

    /// Scenario 2: kill -9 and start with the cloud unreachable; every pod adopted untouched.
    fn restart(&mut self) -> Result<Restart> {
        let cri = self.cri()?;
        let before = self.block("list the runtime", observe(&cri))?;
        let local_before = self.local_pods()?;
        if let Some(edge) = self.edge.as_mut() {
            edge.kill();
        }
        let (_, spawned_wall) = self.start_edge()?;
        let uids: HashSet<String> = self.pods.iter().map(|p| p.uid.clone()).collect();
        let adopted = self
            .stop
            .poll("every pod adopted", STEP_TIMEOUT, POLL, || {
                let log = self.edge()?.log();
                let mut adopted: HashMap<String, i128> = HashMap::new();
                for (ns, line) in log_stamps(&log, "adopted running pod") {
                    if let Some(uid) = pod_uid(line) {
                        adopted.entry(uid.to_string()).or_insert(ns);
                    }
                }
                Ok(uids
                    .iter()
                    .all(|u| adopted.contains_key(u))
                    .then_some(adopted))
            })?;
        let log = self.edge()?.log();
        let since = |ns: i128| (ns - spawned_wall) as f64 / 1e6;
        let stamps = || adopted.values().copied();
        let first_adopted_ms = stamps().min().map(since).unwrap_or_default();
        let all_adopted_ms = stamps().max().map(since).unwrap_or_default();
        let process_up_ms = log_stamps(&log, "edgecore running")
            .next()
            .map(|(ns, _)| since(ns));

        let after = self.block("list the runtime", observe(&cri))?;
        let mut kept = 0;
        for pod in &self.pods {
            let (was, is) = (before.running.get(&pod.name), after.running.get(&pod.name));
            ensure!(
                was.is_some() && was == is,
                "pod {}: container {was:?} before the restart, {is:?} after: not adopted untouched",
                pod.name
            );
            ensure!(
                after.ready_sandboxes.get(&pod.name) == Some(&1),
                "pod {}: {:?} ready sandboxes after the restart",
                pod.name,
                after.ready_sandboxes.get(&pod.name)
            );
            kept += 1;
        }
        let local = self.local_pods()?;
        for pod in &self.pods {
            let (was, is) = (local_before.get(&pod.name), local.get(&pod.name));
            ensure!(
                is.is_some_and(
                    |p| p.status == "Running" && Some(p.restarts) == was.map(|w| w.restarts)
                ),
                "pod {}: local status {is:?} after the restart, {was:?} before",
                pod.name
            );
        }
        Ok(Restart {
            first_adopted_ms,
            all_adopted_ms,
            process_up_ms,
            kept,
        })
    }

    /// Scenario 3: status and API changes while partitioned, then the heal and the catch-up.
    fn heal(&mut self, round: usize, partitioned: Instant) -> Result<Heal> {
        // Status changes on the gateway: one restart of every pod, through the control socket.
        let mut expected: HashMap<String, u64> = HashMap::new();
        let mut ctl_restart_ms = Vec::with_capacity(self.pods.len());
        for pod in &self.pods {
            let started = Instant::now();
            let out = self.ctl(&["restart", &pod.name, "-n", NAMESPACE])?;
            ctl_restart_ms.push(bench::ms(started.elapsed()));
            let count = restart_count_in(&out).with_context(|| {
                format!("ctl restart {} printed no restartCount: {out}", pod.name)
            })?;
            expected.insert(pod.name.clone(), count);
        }
        // Changes in the API that the edge cannot hear.
        let doomed = self.pods.remove(0);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        self.block("delete a pod", async {
            pods.delete(&doomed.name, &DeleteParams::default()).await?;
            anyhow::Ok(())
        })?;
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        let patch = json!({"data": {"mode": format!("round-{round}")}});
        let updated = self.block("update the ConfigMap", async {
            Ok(config_maps
                .patch(CONFIG_MAP, &PatchParams::default(), &Patch::Merge(&patch))
                .await?)
        })?;
        let config_map_version: u64 = updated
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .context("the updated ConfigMap has no numeric resourceVersion")?;
        let newcomer = self.create_pod()?;
        expected.remove(&doomed.name);

        // The local status holds the restarts before the heal.
        self.stop.poll(
            "the offline restarts in the local status",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                let local = self.local_pods()?;
                Ok(expected
                    .iter()
                    .all(|(name, count)| local.get(name).is_some_and(|p| p.restarts == *count))
                    .then_some(()))
            },
        )?;
        ensure!(
            !self.edge()?.connected(),
            "the edge is connected during the partition"
        );
        // A real outage: the cloud has given up on the session, and on the node.
        self.stop.poll(
            "cloudcore closing the edge's session",
            SESSION_CLOSE_TIMEOUT,
            Duration::from_millis(100),
            || Ok((self.cloud.metric("cloudcore_connected_edges") == 0.0).then_some(())),
        )?;
        let session_closed_s = partitioned.elapsed().as_secs_f64();
        self.stop.poll(
            "the node Ready=Unknown in the API",
            SESSION_CLOSE_TIMEOUT,
            Duration::from_millis(100),
            || Ok((self.node_ready()? == "Unknown").then_some(())),
        )?;
        let node_unknown_s = partitioned.elapsed().as_secs_f64();

        let partition_s = partitioned.elapsed().as_secs_f64();
        self.net.heal()?;
        let healed_wall = bench::wall_ns();
        let healed = Instant::now();

        let cri = self.cri()?;
        let store =
            Store::open_read_only(&self.edge_dir).context("cannot open the edge's store")?;
        let config_map_key = ObjectKey::new("ConfigMap", NAMESPACE, CONFIG_MAP);
        let mut seen = CatchUp::default();
        let mut iterations = 0u32;
        while !seen.done() {
            iterations += 1;
            if seen.connected.is_none() && self.edge()?.connected() {
                seen.connected = Some(Instant::now());
            }
            if seen.new_pod_running_edge.is_none() || seen.deleted_pod_gone_edge.is_none() {
                let observed = self.block("list the runtime", observe(&cri))?;
                let at = Instant::now();
                if observed.running.contains_key(&newcomer.name) {
                    seen.new_pod_running_edge.get_or_insert(at);
                }
                if observed.gone(&doomed.name) {
                    seen.deleted_pod_gone_edge.get_or_insert(at);
                }
            }
            if seen.config_map_stored.is_none()
                && store
                    .get(&config_map_key)
                    .ok()
                    .flatten()
                    .is_some_and(|o| o.resource_version >= config_map_version)
            {
                seen.config_map_stored = Some(Instant::now());
            }
            if seen.restarts_in_api.is_none()
                || seen.new_pod_running_api.is_none()
                || seen.deleted_pod_gone_api.is_none()
            {
                let api = self.api_pods()?;
                let at = Instant::now();
                let all_restarts = expected.iter().all(|(name, count)| {
                    api.get(name)
                        .is_some_and(|p| restart_count(p) == Some(*count))
                });
                if all_restarts {
                    seen.restarts_in_api.get_or_insert(at);
                }
                if api.get(&newcomer.name).is_some_and(container_running) {
                    seen.new_pod_running_api.get_or_insert(at);
                }
                if !api.contains_key(&doomed.name) {
                    seen.deleted_pod_gone_api.get_or_insert(at);
                }
            }
            if seen.node_ready.is_none() && self.node_ready()? == "True" {
                seen.node_ready = Some(Instant::now());
            }
            if seen.done() {
                break;
            }
            self.stop.check()?;
            if healed.elapsed() >= STEP_TIMEOUT {
                let api = self.api_pods()?;
                let restarts: Vec<String> = expected
                    .iter()
                    .filter(|(name, count)| api.get(*name).and_then(restart_count) != Some(**count))
                    .map(|(name, count)| {
                        format!(
                            "{name}: {:?} in the API, {count} at the edge",
                            api.get(name).and_then(restart_count)
                        )
                    })
                    .collect();
                bail!(
                    "not caught up within {STEP_TIMEOUT:?} of the heal: {seen:?}; restart counts \
                     behind: {restarts:?}"
                );
            }
            std::thread::sleep(POLL);
        }
        let poll_ms = bench::ms(healed.elapsed()) / f64::from(iterations.max(1));
        let log = self.edge()?.log();
        let connected_logged_ms = log_stamps(&log, "connected to the cloud")
            .find(|(ns, line)| *ns >= healed_wall && !line.contains("disconnected"))
            .map(|(ns, _)| (ns - healed_wall) as f64 / 1e6);
        let since = |at: Option<Instant>| {
            at.map_or(f64::NAN, |at| {
                bench::ms(at.saturating_duration_since(healed))
            })
        };
        let rss_kib = bench::rss_kib(self.edge_pid()?)?;
        self.pods.push(newcomer);
        Ok(Heal {
            partition_s,
            session_closed_s,
            node_unknown_s,
            status_changes: ctl_restart_ms.len(),
            api_changes: 3,
            ctl_restart_ms,
            connected_ms: since(seen.connected),
            connected_logged_ms,
            restarts_in_api_ms: since(seen.restarts_in_api),
            new_pod_running_edge_ms: since(seen.new_pod_running_edge),
            deleted_pod_gone_edge_ms: since(seen.deleted_pod_gone_edge),
            config_map_stored_ms: since(seen.config_map_stored),
            node_ready_ms: since(seen.node_ready),
            new_pod_running_api_ms: since(seen.new_pod_running_api),
            deleted_pod_gone_api_ms: since(seen.deleted_pod_gone_api),
            poll_ms,
            rss_kib,
        })
    }
}

/// Runs a future on the async runtime, bounded by [`CALL_TIMEOUT`].
fn block<T>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    rt.block_on(async { tokio::time::timeout(CALL_TIMEOUT, work).await })
        .map_err(|_| anyhow!("{what}: no answer within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("cannot {what}"))
}

/// `cloudcore token create` and `edgecore join` (inside the namespace), both the real CLIs.
fn join(binaries: &Binaries, net: &EdgeNet, cloud: &Cloud, edge_dir: &Path) -> Result<()> {
    let stdout = bench::run_tool(
        Command::new(&binaries.cloudcore)
            .args(["token", "create", "--data-dir"])
            .arg(&cloud.dir)
            .args(["-o", "json", "--cloud", &cloud.address()]),
        "cloudcore token create",
        CALL_TIMEOUT,
    )?;
    let token = bench::JoinToken::from_cli_json(&stdout)?;
    bench::run_tool(
        net.command(&binaries.edgecore)
            .args(["join", "--cloud", &token.cloud])
            .args(["--token", &token.token])
            .args(["--ca-hash", &token.ca_hash])
            .args(["--node-name", NODE, "--data-dir"])
            .arg(edge_dir)
            .stdin(Stdio::null()),
        "edgecore join",
        CALL_TIMEOUT,
    )?;
    Ok(())
}

/// The pod as the bench creates it: bound to the edge at create, mounting the ConfigMap.
fn pod_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app": "offline-bench"},
        },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": GRACE_SECS,
            "containers": [{
                "name": CONTAINER,
                "image": integration::BUSYBOX,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", COMMAND],
                "volumeMounts": [{"name": "settings", "mountPath": "/etc/settings"}],
            }],
            "volumes": [{
                "name": "settings",
                "configMap": {"name": CONFIG_MAP, "optional": true},
            }],
        },
    })
}

/// A copy of `template` (a pod as the API stored it) with its own name and uid, and the CRI
/// configs edgecore builds for it (volumes prepared), without the `edge.io/managed-by` label.
fn raw_pod(
    template: &Pod,
    objects: &Objects,
    image: Option<&cri_api::Image>,
    raw_dir: &Path,
    name: &str,
    uid: &str,
) -> Result<RawPod> {
    let mut pod = template.clone();
    pod.metadata.name = Some(name.to_string());
    pod.metadata.uid = Some(uid.to_string());
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
        .context("the pod has no container")?;
    let paths = spec::pod_paths(raw_dir, uid);
    std::fs::create_dir_all(&paths.log_dir)
        .with_context(|| format!("cannot create {}", paths.log_dir.display()))?;
    let mut sandbox = spec::sandbox_config(&pod, &paths, 0, None)?;
    sandbox.labels.remove(spec::LABEL_MANAGED_BY);
    // The benchmark's pods have no service-account token volume.
    let tokens = edgecore::tokens::Tokens::in_memory(edgecore::tokens::DEFAULT_REFRESH_MAX);
    let prepared = volumes::prepare(&pod, objects, &tokens, &paths)?;
    let env = spec::container_env(&pod, &container, objects, &[], "", NODE)?;
    let mounts = volumes::mounts(&container, &prepared)?;
    let mut config =
        spec::container_config(&pod, &container, ContainerKind::Regular, 0, env, mounts)?;
    config.labels.remove(spec::LABEL_MANAGED_BY);
    if let Some(image) = image {
        spec::apply_image_user(&pod, &container, image, &mut config)?;
    }
    Ok(RawPod {
        uid: uid.to_string(),
        paths,
        sandbox,
        container: config,
    })
}

fn container_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)
}

fn container_running(pod: &Pod) -> bool {
    container_status(pod).is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

fn restart_count(pod: &Pod) -> Option<u64> {
    container_status(pod).and_then(|c| u64::try_from(c.restart_count).ok())
}

/// The count in `ctl restart`'s answer (`pod ns/name: restarting c (restartCount 2)`).
fn restart_count_in(text: &str) -> Option<u64> {
    let (_, rest) = text.split_once("restartCount ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The log lines containing `message`, with their timestamps (Unix nanoseconds), in order.
fn log_stamps<'l>(log: &'l str, message: &'l str) -> impl Iterator<Item = (i128, &'l str)> + 'l {
    log.lines()
        .filter(move |l| l.contains(message))
        .filter_map(|l| {
            let at = bench::rfc3339_ns(l.split_whitespace().next()?)?;
            Some((at, l))
        })
}

/// The `pod.uid` of a log line written in a pod's span.
fn pod_uid(line: &str) -> Option<&str> {
    line.split_once("pod.uid=")
        .and_then(|(_, rest)| rest.split([' ', '}']).next())
}

fn print_tail(what: &str, log: &str) {
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    eprintln!(
        "last lines of the {what} log:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Figures

/// edgecore's memory from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

impl Memory {
    fn read(pid: u32) -> Result<Memory> {
        Ok(Memory {
            rss_kib: bench::status_kib(pid, "VmRSS")?,
            hwm_kib: bench::status_kib(pid, "VmHWM")?,
            anon_kib: bench::status_kib(pid, "RssAnon")?,
            file_kib: bench::status_kib(pid, "RssFile")?,
        })
    }
}

/// Scenario 1, milliseconds from edgecore's spawn unless said otherwise.
#[derive(Debug)]
struct Reboot {
    /// Every pod's container running, as the CRI poll saw it.
    all_running_ms: f64,
    /// The last container's StartedAt in containerd.
    last_started_ms: f64,
    /// edgecore's `edgecore running` line (store open, listeners bound).
    process_up_ms: Option<f64>,
    /// edgecore's `found pods in the runtime` line (the runtime answered; pods start next).
    runtime_answered_ms: Option<f64>,
    /// The same pods straight through the CRI after a reboot, first request to last
    /// StartContainer returned: one after another, and all at once.
    raw_sequential_ms: f64,
    raw_concurrent_ms: f64,
    /// edgecore's memory when every pod was running.
    memory: Memory,
}

/// Scenario 2, milliseconds from edgecore's spawn.
#[derive(Debug)]
struct Restart {
    first_adopted_ms: f64,
    all_adopted_ms: f64,
    process_up_ms: Option<f64>,
    /// Pods whose container was the same before and after.
    kept: usize,
}

/// When each part of the catch-up was first seen.
#[derive(Debug, Default)]
struct CatchUp {
    connected: Option<Instant>,
    restarts_in_api: Option<Instant>,
    new_pod_running_edge: Option<Instant>,
    deleted_pod_gone_edge: Option<Instant>,
    config_map_stored: Option<Instant>,
    node_ready: Option<Instant>,
    new_pod_running_api: Option<Instant>,
    deleted_pod_gone_api: Option<Instant>,
}

impl CatchUp {
    fn done(&self) -> bool {
        [
            self.connected,
            self.restarts_in_api,
            self.new_pod_running_edge,
            self.deleted_pod_gone_edge,
            self.config_map_stored,
            self.node_ready,
            self.new_pod_running_api,
            self.deleted_pod_gone_api,
        ]
        .iter()
        .all(Option::is_some)
    }
}

/// Scenario 3, milliseconds from the heal (the link up again).
#[derive(Debug)]
struct Heal {
    /// From the cut to the heal, to cloudcore closing the session (its dead-after), and to
    /// the node Ready=Unknown in the API (then the heal follows).
    partition_s: f64,
    session_closed_s: f64,
    node_unknown_s: f64,
    status_changes: usize,
    api_changes: usize,
    /// Each `edgecore ctl restart` while partitioned (the CLI run included).
    ctl_restart_ms: Vec<f64>,
    /// `edgecore_cloud_connected` 1, polled; and edgecore's `connected to the cloud` line.
    connected_ms: f64,
    connected_logged_ms: Option<f64>,
    restarts_in_api_ms: f64,
    new_pod_running_edge_ms: f64,
    deleted_pod_gone_edge_ms: f64,
    config_map_stored_ms: f64,
    node_ready_ms: f64,
    new_pod_running_api_ms: f64,
    deleted_pod_gone_api_ms: f64,
    /// The catch-up poll's mean period: the resolution of the figures above.
    poll_ms: f64,
    /// edgecore's VmRSS once caught up.
    rss_kib: u64,
}

impl Heal {
    /// The API changes all applied at the edge.
    fn api_changes_at_edge_ms(&self) -> f64 {
        self.new_pod_running_edge_ms
            .max(self.deleted_pod_gone_edge_ms)
            .max(self.config_map_stored_ms)
    }

    /// Everything caught up.
    fn all_ms(&self) -> f64 {
        [
            self.connected_ms,
            self.restarts_in_api_ms,
            self.api_changes_at_edge_ms(),
            self.node_ready_ms,
            self.new_pod_running_api_ms,
            self.deleted_pod_gone_api_ms,
        ]
        .into_iter()
        .fold(0.0, f64::max)
    }
}

struct Round {
    reboot: Reboot,
    restart: Restart,
    heal: Heal,
}

/// A figure of a round: its JSON name, its label in the table, its unit, its value.
type Figure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Round) -> Option<f64>,
);

const REBOOT_FIGURES: &[Figure] = &[
    (
        "reboot_spawn_to_all_running_ms",
        "edgecore spawn -> every pod running (CRI, 10 ms poll)",
        "ms",
        |r| Some(r.reboot.all_running_ms),
    ),
    (
        "reboot_spawn_to_last_container_started_ms",
        "edgecore spawn -> last container StartedAt (containerd)",
        "ms",
        |r| Some(r.reboot.last_started_ms),
    ),
    (
        "reboot_spawn_to_process_up_ms",
        "edgecore spawn -> \"edgecore running\" (log)",
        "ms",
        |r| r.reboot.process_up_ms,
    ),
    (
        "reboot_spawn_to_runtime_answered_ms",
        "edgecore spawn -> \"found pods in the runtime\" (log)",
        "ms",
        |r| r.reboot.runtime_answered_ms,
    ),
    (
        "raw_cri_one_by_one_ms",
        "raw CRI, same pods one after another",
        "ms",
        |r| Some(r.reboot.raw_sequential_ms),
    ),
    (
        "raw_cri_all_at_once_ms",
        "raw CRI, same pods all at once",
        "ms",
        |r| Some(r.reboot.raw_concurrent_ms),
    ),
    (
        "ratio_to_raw_one_by_one",
        "ratio: edgecore / raw one after another",
        "x",
        |r| Some(r.reboot.all_running_ms / r.reboot.raw_sequential_ms),
    ),
    (
        "ratio_to_raw_all_at_once",
        "ratio: edgecore / raw all at once",
        "x",
        |r| Some(r.reboot.all_running_ms / r.reboot.raw_concurrent_ms),
    ),
    (
        "edgecore_vm_rss_after_recovery_mib",
        "edgecore VmRSS, every pod running",
        "MiB",
        |r| Some(mib(r.reboot.memory.rss_kib)),
    ),
    (
        "edgecore_rss_anon_after_recovery_mib",
        "  of which anonymous",
        "MiB",
        |r| Some(mib(r.reboot.memory.anon_kib)),
    ),
    (
        "edgecore_vm_hwm_after_recovery_mib",
        "edgecore VmHWM (peak) during the recovery",
        "MiB",
        |r| Some(mib(r.reboot.memory.hwm_kib)),
    ),
];

const RESTART_FIGURES: &[Figure] = &[
    (
        "restart_spawn_to_process_up_ms",
        "edgecore spawn -> \"edgecore running\" (log)",
        "ms",
        |r| r.restart.process_up_ms,
    ),
    (
        "restart_spawn_to_first_adopted_ms",
        "edgecore spawn -> first pod adopted (log)",
        "ms",
        |r| Some(r.restart.first_adopted_ms),
    ),
    (
        "restart_spawn_to_all_adopted_ms",
        "edgecore spawn -> every pod adopted (log)",
        "ms",
        |r| Some(r.restart.all_adopted_ms),
    ),
    (
        "restart_containers_kept",
        "containers kept (same ID)",
        "",
        |r| Some(r.restart.kept as f64),
    ),
];

const HEAL_FIGURES: &[Figure] = &[
    (
        "cut_to_session_closed_s",
        "cut -> cloudcore closed the session",
        "s",
        |r| Some(r.heal.session_closed_s),
    ),
    (
        "cut_to_node_unknown_s",
        "cut -> node Ready=Unknown in the API",
        "s",
        |r| Some(r.heal.node_unknown_s),
    ),
    ("partition_s", "partition (cut -> heal)", "s", |r| {
        Some(r.heal.partition_s)
    }),
    (
        "ctl_restart_median_ms",
        "edgecore ctl restart, each, median",
        "ms",
        |r| Some(median(&r.heal.ctl_restart_ms)),
    ),
    (
        "heal_to_connected_ms",
        "heal -> edge connected (metric poll)",
        "ms",
        |r| Some(r.heal.connected_ms),
    ),
    (
        "heal_to_connected_logged_ms",
        "heal -> \"connected to the cloud\" (edgecore log)",
        "ms",
        |r| r.heal.connected_logged_ms,
    ),
    (
        "heal_to_offline_restarts_in_api_ms",
        "heal -> every offline restartCount in the API",
        "ms",
        |r| Some(r.heal.restarts_in_api_ms),
    ),
    (
        "heal_to_new_pod_running_at_edge_ms",
        "heal -> new pod running in the runtime",
        "ms",
        |r| Some(r.heal.new_pod_running_edge_ms),
    ),
    (
        "heal_to_deleted_pod_gone_at_edge_ms",
        "heal -> deleted pod gone from the runtime",
        "ms",
        |r| Some(r.heal.deleted_pod_gone_edge_ms),
    ),
    (
        "heal_to_config_map_in_edge_store_ms",
        "heal -> ConfigMap update in the edge's store",
        "ms",
        |r| Some(r.heal.config_map_stored_ms),
    ),
    (
        "heal_to_api_changes_at_edge_ms",
        "heal -> all API changes applied at the edge",
        "ms",
        |r| Some(r.heal.api_changes_at_edge_ms()),
    ),
    (
        "heal_to_node_ready_ms",
        "heal -> node Ready=True in the API",
        "ms",
        |r| Some(r.heal.node_ready_ms),
    ),
    (
        "heal_to_new_pod_running_in_api_ms",
        "heal -> new pod running in the API",
        "ms",
        |r| Some(r.heal.new_pod_running_api_ms),
    ),
    (
        "heal_to_deleted_pod_gone_from_api_ms",
        "heal -> deleted pod gone from the API",
        "ms",
        |r| Some(r.heal.deleted_pod_gone_api_ms),
    ),
    (
        "heal_to_all_caught_up_ms",
        "heal -> all of the above",
        "ms",
        |r| Some(r.heal.all_ms()),
    ),
    (
        "catch_up_poll_period_ms",
        "  (catch-up poll period, the resolution)",
        "ms",
        |r| Some(r.heal.poll_ms),
    ),
    (
        "edgecore_vm_rss_caught_up_mib",
        "edgecore VmRSS once caught up",
        "MiB",
        |r| Some(mib(r.heal.rss_kib)),
    ),
];

fn median(values: &[f64]) -> f64 {
    Spread::of(values.iter().copied()).median
}

struct Report {
    pods: usize,
    node_grace_period: String,
    runtime_version: String,
    machine: Machine,
    rounds: Vec<Round>,
}

impl Report {
    fn spread(&self, f: fn(&Round) -> Option<f64>) -> Spread {
        Spread::of(self.rounds.iter().filter_map(f))
    }

    fn sections(&self) -> [(String, &'static [Figure]); 3] {
        let first = self.rounds.first();
        [
            (
                format!(
                    "reboot with the cloud unreachable: {} pods, runtime emptied and restarted",
                    self.pods
                ),
                REBOOT_FIGURES,
            ),
            (
                "restart (kill -9) with the cloud unreachable".to_string(),
                RESTART_FIGURES,
            ),
            (
                format!(
                    "heal: {} restarts (ctl restart) and {} API changes (delete, ConfigMap, create) made while \
                     partitioned; healed once the cloud had closed the session and the node was Ready=Unknown",
                    first.map_or(0, |r| r.heal.status_changes),
                    first.map_or(0, |r| r.heal.api_changes),
                ),
                HEAL_FIGURES,
            ),
        ]
    }
}

fn cell(value: Option<f64>, unit: &str) -> String {
    match value {
        None => "-".to_string(),
        Some(v) if v.is_nan() => "-".to_string(),
        Some(v) => match unit {
            "x" => format!("{v:.2}"),
            "" => format!("{v:.0}"),
            "ms" if v >= 100.0 => format!("{v:.0}"),
            _ => format!("{v:.1}"),
        },
    }
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "offline-bench: {} pods, {} round(s), link to the cloud cut for the reboot, the restart \
             and the changes of each round; cloudcore --node-grace-period {}; {}; {} CPUs ({}), \
             {} MiB, kernel {}\n\n",
            self.pods,
            self.rounds.len(),
            self.node_grace_period,
            self.runtime_version,
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel
        );
        let label_width = 60;
        let mut header = format!("{:<label_width$}", "");
        for i in 1..=self.rounds.len() {
            header.push_str(&format!("{:>10}", format!("round {i}")));
        }
        header.push_str(&format!("{:>10}{:>10}\n", "median", "max"));
        for (title, figures) in self.sections() {
            out.push_str(&title);
            out.push('\n');
            out.push_str(&header);
            for (_, label, unit, f) in figures {
                let label = if unit.is_empty() || *unit == "x" {
                    label.to_string()
                } else {
                    format!("{label} ({unit})")
                };
                out.push_str(&format!("  {label:<w$}", w = label_width - 2));
                for round in &self.rounds {
                    out.push_str(&format!("{:>10}", cell(f(round), unit)));
                }
                let spread = self.spread(*f);
                let any = self.rounds.iter().any(|r| f(r).is_some());
                out.push_str(&format!(
                    "{:>10}{:>10}\n",
                    cell(any.then_some(spread.median), unit),
                    cell(any.then_some(spread.max), unit)
                ));
            }
            out.push('\n');
        }
        out
    }

    fn to_json(&self) -> Value {
        let rounds: Vec<Value> = self
            .rounds
            .iter()
            .map(|r| {
                let mut figures = serde_json::Map::new();
                for (_, figures_of) in self.sections() {
                    for (name, _, _, f) in figures_of {
                        figures.insert(name.to_string(), json!(f(r).filter(|v| !v.is_nan())));
                    }
                }
                figures.insert("ctl_restart_ms".into(), json!(r.heal.ctl_restart_ms));
                figures.insert(
                    "edgecore_memory_after_recovery_kib".into(),
                    json!({
                        "vm_rss": r.reboot.memory.rss_kib,
                        "vm_hwm": r.reboot.memory.hwm_kib,
                        "rss_anon": r.reboot.memory.anon_kib,
                        "rss_file": r.reboot.memory.file_kib,
                    }),
                );
                Value::Object(figures)
            })
            .collect();
        let mut summary = serde_json::Map::new();
        for (_, figures) in self.sections() {
            for (name, _, _, f) in figures {
                summary.insert(name.to_string(), self.spread(*f).to_json());
            }
        }
        json!({
            "settings": {
                "pods": self.pods,
                "rounds": self.rounds.len(),
                "node_grace_period": self.node_grace_period,
            },
            "runtime": self.runtime_version,
            "machine": self.machine.to_json(),
            "rounds": rounds,
            "summary": summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_counts_are_read_from_the_ctl_answer() {
        assert_eq!(
            restart_count_in("pod ns/p: restarting c (restartCount 12)\n"),
            Some(12)
        );
        assert_eq!(restart_count_in("nothing"), None);
    }

    #[test]
    fn log_lines_give_stamps_and_pod_uids() {
        let log = "2026-11-24T06:39:17.000100Z  INFO pod{pod.uid=abc-1 pod.name=p pod.namespace=n}: edgecore::pods::worker: adopted running pod sandbox=x containers=1\n\
                   2026-11-24T06:39:17.000200Z  INFO edgecore::hub: connected to the cloud cloud=x\n\
                   2026-11-24T06:39:18Z  WARN edgecore::hub: disconnected from the cloud: gone\n";
        let adopted: Vec<(i128, &str)> = log_stamps(log, "adopted running pod").collect();
        assert_eq!(adopted.len(), 1);
        assert_eq!(pod_uid(adopted[0].1), Some("abc-1"));
        let connected: Vec<i128> = log_stamps(log, "connected to the cloud")
            .filter(|(_, l)| !l.contains("disconnected"))
            .map(|(ns, _)| ns)
            .collect();
        assert_eq!(connected.len(), 1);
        assert_eq!(connected[0] - adopted[0].0, 100_000);
    }

    #[test]
    fn cells_print_units_and_gaps() {
        assert_eq!(cell(Some(1234.56), "ms"), "1235");
        assert_eq!(cell(Some(12.34), "ms"), "12.3");
        assert_eq!(cell(Some(1.234), "x"), "1.23");
        assert_eq!(cell(Some(f64::NAN), "ms"), "-");
        assert_eq!(cell(None, "ms"), "-");
    }
}
