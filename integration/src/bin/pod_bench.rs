//! `pod-bench`: how long a pod takes from the API to a running container on an edge, how much
//! of that is edgecore's own work beside the CRI calls it has to make, and how much memory
//! edgecore holds idle with pods running.
//!
//! Everything is real and on this machine: a private containerd (the project's config and
//! images, `deploy/containerd/containerd.sh`), `cloudcore serve --control-plane embedded` and
//! `edgecore run` as child processes (so the memory read from `/proc` is edgecore's alone), the
//! edge joined with `edgecore join`, the load through kube-rs (or `kubectl apply`).
//!
//! Per round, on a fresh cloudcore and edge (one containerd serves every round):
//!
//! 1. edgecore connected, no pod: `--idle-secs` of quiet, then its `VmRSS`/`VmHWM` and CPU.
//! 2. `--pods` pods, one at a time, each bound to the edge at create: each is timed from the
//!    create request until a kube-rs watch on the API shows its container `running`. Beside
//!    each, the same pod is started straight through the CRI by this process (RunPodSandbox,
//!    PodSandboxStatus, ImageStatus, CreateContainer, StartContainer, ContainerStatus, with the
//!    configs edgecore's own `pods::spec` builds from the pod the API stored, minus the
//!    `edge.io/managed-by` label so edgecore leaves them alone). The two kinds alternate, and
//!    both stay running, so they meet the same runtime load.
//! 3. After `--idle-pods` of them: quiet again and read edgecore's memory and CPU.
//! 4. The API's own status path is timed on a pod bound to no edge (GET + status PATCH, as
//!    cloudcore writes a report, until the watch shows it).
//! 5. Every pod is deleted, one at a time: graceful delete through the API until the watch
//!    shows it gone; StopContainer + StopPodSandbox + RemovePodSandbox for the direct ones.
//!
//! Each API pod's start is split with timestamps from four clocks of one machine: the bench's
//! (request, answer, watch event), the edge's store (a read-only SQLite connection polled every
//! millisecond sees the commit), containerd's (the sandbox's and container's CreatedAt and the
//! container's StartedAt) and edgecore's log ("pod sandbox ready", "container started").
//!
//! `--control-plane kube` serves the pods from a fresh real control plane per round
//! ([`KubeCluster`], cloudcore in kube mode on its ServiceAccount's credentials); `--burst N`
//! creates N pods at once (and starts N direct pods in parallel) instead of one at a time, each
//! pod still timed from its own create request.
//!
//! A failure or `--timeout-secs` stops everything this bench started (edgecore, cloudcore,
//! containerd and every pod in it) and keeps the temp dir with the logs.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgecore::cri::Cri;
use edgecore::pods::spec::{self, ContainerKind, Objects, PodPaths};
use edgecore::pods::volumes;
use edgecore::store::Store;
use futures::StreamExt;
use integration::Cloud;
use integration::bench::{self, Machine, Spread, mib};
use integration::cluster::{ClusterOptions, KubeCluster};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use proto::sync::ObjectKey;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// The namespace of every pod.
const NAMESPACE: &str = "pod-bench";
/// The edge's node name.
const NODE: &str = "pod-bench-edge";
/// A node no edge has: pods bound to it are only ever written by the bench.
const NOWHERE: &str = "pod-bench-nowhere";
/// The one container of every pod.
const CONTAINER: &str = "c";
/// The container's command: sleeps until SIGTERM, then exits at once (a shell as PID 1
/// ignores SIGTERM without a trap, and `wait` lets the trap run while `sleep` runs).
const COMMAND: &str = "trap 'exit 0' TERM; sleep 2147483647 & wait";
/// terminationGracePeriodSeconds of every pod; the command above never needs it.
const GRACE_SECS: i64 = 5;
/// How long a pod may take to run, or to go away, before the bench fails.
const POD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long edgecore may take to serve its metrics, and then to connect.
const EDGE_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the embedded API may take to answer after cloudcore reports healthy.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the edge's store is read while a pod is on its way to it.
const STORE_POLL: Duration = Duration::from_millis(1);
/// Quiet before the memory readings that are not the idle ones (all pods, none left).
const SHORT_QUIET: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "pod-bench",
    about = "Measures API create -> container running on an edge (median, p99), edgecore's \
             overhead over the raw CRI calls, and edgecore's idle memory with pods running"
)]
struct Cli {
    /// Pods started through the API per round, one at a time (and as many straight through
    /// the CRI, for comparison).
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// Pods running during the idle memory reading (the first ones started).
    #[arg(long, default_value_t = 10)]
    idle_pods: usize,
    /// Seconds of quiet before each idle memory reading (with no pod, and with `--idle-pods`).
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Status writes timed by the API status probe.
    #[arg(long, default_value_t = 20)]
    status_probes: usize,
    /// Rounds, each on a fresh cloudcore and edge; figures are medians across rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Between rounds, start a fresh cloudcore and edge (`restart`), or keep them (`keep`: the
    /// memory readings of later rounds then show what edgecore kept from earlier ones).
    #[arg(long, value_enum, default_value_t = BetweenRounds::Restart)]
    between_rounds: BetweenRounds,
    /// How the API pods are created: a kube-rs POST, or `kubectl apply -f -` (which adds
    /// kubectl's own start-up and its GET before the create to every figure).
    #[arg(long, value_enum, default_value_t = Client::Kube)]
    client: Client,
    /// The API cloudcore serves pods from: its own (`embedded`), or a fresh real control
    /// plane per round (`kube`: `integration::cluster::KubeCluster`, cloudcore with its
    /// ServiceAccount's credentials).
    #[arg(long, value_enum, default_value_t = ControlPlane::Embedded)]
    control_plane: ControlPlane,
    /// Pods created at once: the round's `--pods` go in groups of this many, all of a group's
    /// creates sent together, each timed create -> running; the direct CRI pods go in groups
    /// of as many, their calls in parallel. 1 = one at a time.
    #[arg(long, default_value_t = 1)]
    burst: usize,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BetweenRounds {
    Restart,
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Client {
    Kube,
    Kubectl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ControlPlane {
    Embedded,
    Kube,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--pods", c.pods),
            ("--rounds", c.rounds),
            ("--burst", c.burst),
        ]
    }) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.idle_pods > cli.pods {
        eprintln!("error: --idle-pods must not exceed --pods");
        return ExitCode::from(bench::EXIT_USAGE);
    }
    if cli.pods % cli.burst != 0 || cli.idle_pods % cli.burst != 0 {
        eprintln!("error: --pods and --idle-pods must be multiples of --burst");
        return ExitCode::from(bench::EXIT_USAGE);
    }
    bench::init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(bench(&cli));
    // A containerd start still running in a blocking task (timeout, Ctrl-C) gets time to end,
    // so its guard stops it.
    runtime.shutdown_timeout(Duration::from_secs(30));
    bench::finish(result, cli.json)
}

/// The binaries under test.
struct Binaries {
    cloudcore: PathBuf,
    edgecore: PathBuf,
}

/// Runs the rounds under the overall timeout. Whatever was started is stopped by its guard
/// when this returns, also on an error, the timeout or Ctrl-C; then the temp dir is kept.
async fn bench(cli: &Cli) -> Result<Report> {
    let binaries = Binaries {
        cloudcore: bench::cloudcore_binary(cli.cloudcore.as_ref())?,
        edgecore: bench::edgecore_binary(cli.edgecore.as_ref())?,
    };
    let dir = tempfile::Builder::new()
        .prefix("pod-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let work = async {
        eprintln!("starting containerd and importing the images");
        let runtime = start_runtime(dir.path().join("containerd")).await?;
        let mut rounds = Vec::with_capacity(cli.rounds);
        let mut kept: Option<Site> = None;
        for index in 1..=cli.rounds {
            let round_dir = dir.path().join(format!("round-{index}"));
            let mut site = match kept.take() {
                Some(site) => site,
                None => Site::start(&binaries, &runtime, &round_dir, cli.control_plane).await?,
            };
            let outcome = measure(cli, &mut site, &runtime, &round_dir, index).await;
            if outcome.is_err() || cli.between_rounds == BetweenRounds::Restart {
                site.stop(outcome.is_err()).await;
            } else {
                kept = Some(site);
            }
            let round = outcome.with_context(|| format!("round {index}"))?;
            eprintln!(
                "round {index}/{}: apply -> running p50 {:.0} ms, p99 {:.0} ms; raw CRI p50 {:.0} ms; \
                 edgecore RSS {:.1} MiB with {} pods idle",
                cli.rounds,
                round.start_total().median,
                round.start_total().p99,
                round.raw_core().median,
                mib(round.idle_loaded.rss_kib),
                cli.idle_pods,
            );
            rounds.push(round);
        }
        if let Some(site) = kept {
            site.stop(false).await;
        }
        drop(runtime);
        anyhow::Ok(rounds)
    };
    let limit = Duration::from_secs(cli.timeout_secs);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(limit, work) => outcome
            .unwrap_or_else(|_| Err(anyhow!("gave up after {} s (--timeout-secs)", cli.timeout_secs))),
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(rounds) => Ok(Report {
            settings: Settings::of(cli),
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

// ---------------------------------------------------------------------------------------------
// The container runtime

/// The private containerd: `bench::BenchContainerd` on pod-bench's subnet `10.99.N.0/24` and
/// bridge `edgepbN`, away from the tests' 10.100-10.112 and the other load generators.
type Runtime = bench::BenchContainerd;

/// How long each step of containerd's start (the script, an image build) may take.
const RUNTIME_START_LIMIT: Duration = Duration::from_secs(300);

async fn start_runtime(dir: PathBuf) -> Result<Runtime> {
    tokio::task::spawn_blocking(move || Runtime::start(&dir, 99, "edgepb", RUNTIME_START_LIMIT))
        .await
        .context("the containerd start task panicked")?
}

// ---------------------------------------------------------------------------------------------
// cloudcore and edgecore

/// cloudcore, and in kube mode the fresh control plane it serves from (stopped and wiped when
/// dropped, after cloudcore).
async fn start_cloud(
    binary: &Path,
    dir: &Path,
    control_plane: ControlPlane,
) -> Result<(Cloud, Option<KubeCluster>)> {
    let (binary, dir) = (binary.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || match control_plane {
        ControlPlane::Embedded => Cloud::start_binary(&binary, &dir, &[]).map(|c| (c, None)),
        ControlPlane::Kube => {
            // KubeCluster panics saying what is missing; the panic becomes this task's error.
            let cluster = KubeCluster::start(&dir, &ClusterOptions::default());
            let credentials = cluster.cloudcore_credentials(|rbac| rbac);
            let cloud = Cloud::start_kube_binary(
                &binary,
                &dir,
                &cluster,
                &credentials,
                Ipv4Addr::LOCALHOST.into(),
                &[],
            )?;
            Ok((cloud, Some(cluster)))
        }
    })
    .await
    .map_err(|e| anyhow!("starting cloudcore (and the control plane) failed: {e}"))?
}

/// In kube mode the ServiceAccount admission wants the namespace's `default` ServiceAccount
/// even for pods that mount no token; the controller-manager makes it shortly after the
/// namespace, the bench does not wait for that.
async fn ensure_service_account(client: &kube::Client) -> Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    match accounts.create(&PostParams::default(), &account).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context("cannot create the namespace's default ServiceAccount"),
    }
}

/// Runs a command to completion; its stdout, or an error with its stderr.
async fn run_tool(command: &mut tokio::process::Command, what: &str) -> Result<Vec<u8>> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run `{what}`"))?;
    ensure!(
        output.status.success(),
        "`{what}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output.stdout)
}

/// `cloudcore token create` and `edgecore join`, both the real CLIs.
async fn join_edge(binaries: &Binaries, cloud: &Cloud, edge_dir: &Path) -> Result<()> {
    let stdout = run_tool(
        tokio::process::Command::new(&binaries.cloudcore)
            .args(["token", "create", "--data-dir"])
            .arg(&cloud.dir)
            .args(["-o", "json", "--cloud", &cloud.address()]),
        "cloudcore token create",
    )
    .await?;
    let token = bench::JoinToken::from_cli_json(&stdout)?;
    run_tool(
        tokio::process::Command::new(&binaries.edgecore)
            .args(["join", "--cloud", &token.cloud])
            .args(["--token", &token.token])
            .args(["--ca-hash", &token.ca_hash])
            .args(["--node-name", NODE, "--data-dir"])
            .arg(edge_dir),
        "edgecore join",
    )
    .await?;
    Ok(())
}

/// A running `edgecore run`, killed when dropped.
struct EdgeProcess {
    /// `None` once stopped.
    child: Option<Child>,
    metrics_port: u16,
    /// The data dir.
    dir: PathBuf,
    log: PathBuf,
}

impl EdgeProcess {
    /// Starts `edgecore run` with the CRI endpoint and waits until it is connected to the cloud.
    async fn start(binary: &Path, dir: &Path, endpoint: &str) -> Result<EdgeProcess> {
        let log = dir.join("run.log");
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(binary)
            .arg("run")
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--cri-endpoint",
                endpoint,
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut edge = EdgeProcess {
            child: Some(child),
            metrics_port: 0,
            dir: dir.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + EDGE_START_TIMEOUT;
        loop {
            if let Some(port) = metrics_port_in(&edge.log_text()) {
                edge.metrics_port = port;
                break;
            }
            edge.check_running()?;
            ensure!(
                Instant::now() < deadline,
                "edgecore did not start within {EDGE_START_TIMEOUT:?}; log:\n{}",
                edge.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        loop {
            if edge.metric("edgecore_cloud_connected").await == Some(1.0) {
                return Ok(edge);
            }
            edge.check_running()?;
            ensure!(
                Instant::now() < deadline,
                "edgecore did not connect within {EDGE_START_TIMEOUT:?}; log:\n{}",
                edge.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .context("edgecore is stopped")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_running(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("edgecore is stopped")?;
        if let Ok(Some(status)) = child.try_wait() {
            bail!("edgecore exited ({status}); log:\n{}", self.log_text());
        }
        Ok(())
    }

    async fn metric(&self, series: &'static str) -> Option<f64> {
        let port = self.metrics_port;
        tokio::task::spawn_blocking(move || {
            integration::http_get(port, "/metrics")
                .and_then(|page| integration::metric_value(&page, series))
        })
        .await
        .ok()
        .flatten()
    }

    /// SIGTERM, then SIGKILL after 10 s.
    async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = tokio::task::spawn_blocking(move || integration::terminate(&mut child)).await;
        }
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The metrics port in edgecore's start-up line (`... metrics=127.0.0.1:PORT ...`).
fn metrics_port_in(log: &str) -> Option<u16> {
    log.lines()
        .filter(|l| l.contains("edgecore running"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("metrics=127.0.0.1:"))
        })
        .and_then(|p| p.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Clocks and memory

/// The bench's monotonic clock and the wall clock, read together: containerd's and edgecore's
/// timestamps are wall-clock nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Start {
    at: Instant,
    wall_ns: i128,
}

impl Start {
    fn now() -> Start {
        Start {
            at: Instant::now(),
            wall_ns: bench::wall_ns(),
        }
    }

    /// Milliseconds from this start to an instant.
    fn ms_until(&self, at: Instant) -> f64 {
        bench::ms(at.saturating_duration_since(self.at))
    }

    /// Milliseconds from this start to a wall-clock timestamp (negative if before).
    fn ms_until_wall(&self, ns: i128) -> f64 {
        (ns - self.wall_ns) as f64 / 1e6
    }
}

/// edgecore's memory and CPU over a quiet period.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    pods: usize,
    quiet: Duration,
    rss_kib: u64,
    hwm_kib: u64,
    /// The anonymous (heap, stacks) and file-backed (the binary's pages) parts of `rss_kib`.
    anon_kib: u64,
    file_kib: u64,
    /// CPU edgecore used during the quiet period, in percent of one CPU.
    cpu_percent: f64,
    /// The same for containerd (it answers edgecore's resyncs); `None` if unreadable.
    containerd_cpu_percent: Option<f64>,
}

impl Memory {
    fn to_json(self) -> Value {
        json!({
            "pods": self.pods,
            "quiet_s": self.quiet.as_secs_f64(),
            "vm_rss_kib": self.rss_kib,
            "vm_hwm_kib": self.hwm_kib,
            "rss_anon_kib": self.anon_kib,
            "rss_file_kib": self.file_kib,
            "cpu_percent_of_one_cpu": self.cpu_percent,
            "containerd_cpu_percent_of_one_cpu": self.containerd_cpu_percent,
        })
    }
}

/// CPU time the threads of process `pid` have run so far, in nanoseconds: the sum of each
/// thread's `/proc/PID/task/TID/schedstat` (exact, where `/proc/PID/stat` counts 10 ms ticks).
/// Threads that have exited are no longer counted.
fn cpu_ns(pid: u32) -> Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&tasks).with_context(|| format!("cannot read {tasks}"))? {
        let path = task?.path().join("schedstat");
        // A thread that exits meanwhile is skipped.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .with_context(|| format!("cannot parse {}", path.display()))?;
        }
    }
    Ok(total)
}

/// Waits `quiet` without touching edgecore, then reads its memory and the CPU it used.
async fn quiet_memory(
    edge: &mut EdgeProcess,
    containerd_pid: Option<u32>,
    pods: usize,
    quiet: Duration,
) -> Result<Memory> {
    edge.check_running()?;
    let pid = edge.pid()?;
    let cpu_before = bench::cpu_time(pid)?;
    let containerd_before = containerd_pid.and_then(|p| bench::cpu_time(p).ok());
    tokio::time::sleep(quiet).await;
    edge.check_running()?;
    let cpu = bench::cpu_time(pid)?.saturating_sub(cpu_before);
    let percent = |cpu: Duration| 100.0 * cpu.as_secs_f64() / quiet.as_secs_f64().max(1e-9);
    let containerd_cpu = containerd_pid
        .and_then(|p| bench::cpu_time(p).ok())
        .zip(containerd_before)
        .map(|(after, before)| percent(after.saturating_sub(before)));
    Ok(Memory {
        pods,
        quiet,
        rss_kib: bench::status_kib(pid, "VmRSS")?,
        hwm_kib: bench::status_kib(pid, "VmHWM")?,
        anon_kib: bench::status_kib(pid, "RssAnon")?,
        file_kib: bench::status_kib(pid, "RssFile")?,
        cpu_percent: percent(cpu),
        containerd_cpu_percent: containerd_cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// Observers: the API watch and the edge's store

/// What the watch saw of one pod, with when.
#[derive(Debug, Default)]
struct Seen {
    /// First event showing the container `running`.
    running: Option<Instant>,
    /// The Deleted event.
    deleted: Option<Instant>,
    /// Events received before the one showing `running`.
    events_before_running: usize,
    /// Each new `status.message`, with when (the status probe sets them).
    messages: Vec<(String, Instant)>,
    /// The last status, for error messages.
    last_status: String,
}

/// A kube-rs watch on the bench namespace's pods, resumed from its last resourceVersion when
/// the server ends it. `changed` ticks after every event.
struct PodWatch {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    changed: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn container_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.name == CONTAINER && c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

impl PodWatch {
    /// Opens the watch; it is registered at the server when this returns.
    async fn start(client: &kube::Client) -> Result<PodWatch> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
        let mut from = pods
            .list(&ListParams::default())
            .await
            .context("cannot list the pods")?
            .metadata
            .resource_version
            .context("the pod list has no resourceVersion")?;
        let mut stream = pods
            .watch(&WatchParams::default(), &from)
            .await
            .context("cannot watch the pods")?
            .boxed();
        let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let (tick, changed) = tokio::sync::watch::channel(0u64);
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    while let Some(event) = stream.next().await {
                        let at = Instant::now();
                        let (pod, deleted) = match event {
                            Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod)) => (pod, false),
                            Ok(WatchEvent::Deleted(pod)) => (pod, true),
                            Ok(WatchEvent::Bookmark(mark)) => {
                                from = mark.metadata.resource_version;
                                continue;
                            }
                            Ok(WatchEvent::Error(status)) => {
                                bail!("the pod watch failed: {status:?}")
                            }
                            // A broken stream is resumed below.
                            Err(_) => break,
                        };
                        if let Some(rv) = &pod.metadata.resource_version {
                            from = rv.clone();
                        }
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        {
                            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                            let entry = seen.entry(name).or_default();
                            if deleted {
                                entry.deleted.get_or_insert(at);
                            } else if entry.running.is_none() {
                                if container_running(&pod) {
                                    entry.running = Some(at);
                                } else {
                                    entry.events_before_running += 1;
                                }
                            }
                            let message = pod
                                .status
                                .as_ref()
                                .and_then(|s| s.message.clone())
                                .unwrap_or_default();
                            if !message.is_empty()
                                && entry.messages.last().is_none_or(|(m, _)| *m != message)
                            {
                                entry.messages.push((message, at));
                            }
                            entry.last_status = pod
                                .status
                                .as_ref()
                                .and_then(|s| serde_json::to_string(s).ok())
                                .unwrap_or_default();
                        }
                        tick.send_modify(|n| *n += 1);
                    }
                    stream = pods
                        .watch(&WatchParams::default(), &from)
                        .await
                        .context("cannot resume the pod watch")?
                        .boxed();
                }
            })
        };
        Ok(PodWatch {
            seen,
            changed,
            task,
        })
    }

    /// Waits until `check` finds something in what the watch saw of `name`.
    async fn wait<T>(
        &mut self,
        name: &str,
        what: &str,
        check: impl Fn(&Seen) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
        loop {
            {
                let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(found) = seen.get(name).and_then(&check) {
                    return Ok(found);
                }
            }
            if self.task.is_finished() {
                (&mut self.task)
                    .await
                    .context("the watch task panicked")??;
                bail!("the pod watch ended");
            }
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                let last = self
                    .seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(name)
                    .map(|s| s.last_status.clone())
                    .unwrap_or_default();
                bail!("pod {name}: {what} not seen within {POD_TIMEOUT:?}; last status: {last}");
            }
        }
    }

    fn events_before_running(&self, name: &str) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map_or(0, |s| s.events_before_running)
    }
}

/// Reads the edge's `edge.db` through its own read-only connection (WAL: it sees a
/// transaction once committed), on a thread of its own, and tells when an object appeared.
struct StorePoller {
    requests: Option<std::sync::mpsc::Sender<StoreRequest>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct StoreRequest {
    key: ObjectKey,
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Option<Instant>>,
}

impl StorePoller {
    fn start(edge_dir: &Path) -> Result<StorePoller> {
        let store = Store::open_read_only(edge_dir).context("cannot open the edge's store")?;
        let (requests, incoming) = std::sync::mpsc::channel::<StoreRequest>();
        // Every key asked for is looked for on each pass, so a burst's pods are all timed.
        let thread = std::thread::spawn(move || {
            let mut pending: Vec<StoreRequest> = Vec::new();
            loop {
                if pending.is_empty() {
                    match incoming.recv() {
                        Ok(request) => pending.push(request),
                        Err(_) => return,
                    }
                }
                pending.extend(incoming.try_iter());
                let mut waiting = Vec::with_capacity(pending.len());
                for request in pending.drain(..) {
                    if let Ok(Some(_)) = store.get(&request.key) {
                        let _ = request.reply.send(Some(Instant::now()));
                    } else if Instant::now() >= request.deadline {
                        let _ = request.reply.send(None);
                    } else {
                        waiting.push(request);
                    }
                }
                pending = waiting;
                if !pending.is_empty() {
                    std::thread::sleep(STORE_POLL);
                }
            }
        });
        Ok(StorePoller {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Starts looking for `key`; the answer is when it was first seen committed.
    fn look_for(&self, key: ObjectKey) -> tokio::sync::oneshot::Receiver<Option<Instant>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if let Some(requests) = &self.requests {
            let _ = requests.send(StoreRequest {
                key,
                deadline: Instant::now() + POD_TIMEOUT,
                reply,
            });
        }
        answer
    }
}

impl Drop for StorePoller {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What edgecore's log says about each pod, by uid: when "pod sandbox ready" (RunPodSandbox
/// and PodSandboxStatus returned) and "container started" (StartContainer returned) were
/// logged, in wall-clock nanoseconds.
#[derive(Debug, Default, Clone, Copy)]
struct Logged {
    sandbox_ready: Option<i128>,
    container_started: Option<i128>,
}

fn edge_log_stamps(log: &str) -> HashMap<String, Logged> {
    let mut found: HashMap<String, Logged> = HashMap::new();
    for line in log.lines() {
        let sandbox = line.contains("pod sandbox ready");
        let started = line.contains("container started");
        if !sandbox && !started {
            continue;
        }
        let Some(at) = line.split_whitespace().next().and_then(bench::rfc3339_ns) else {
            continue;
        };
        let Some(uid) = line
            .split_once("pod.uid=")
            .and_then(|(_, rest)| rest.split([' ', '}']).next())
        else {
            continue;
        };
        let entry = found.entry(uid.to_string()).or_default();
        if sandbox {
            entry.sandbox_ready.get_or_insert(at);
        } else {
            entry.container_started.get_or_insert(at);
        }
    }
    found
}

/// containerd's own timestamps of a pod (wall-clock nanoseconds).
#[derive(Debug, Default, Clone, Copy)]
struct RuntimeStamps {
    sandbox_created: i128,
    container_created: i128,
    container_started: i128,
}

/// The timestamps of the sandbox and container labelled with pod `uid`.
async fn runtime_stamps(cri: &Cri, uid: &str) -> Result<RuntimeStamps> {
    let labels = HashMap::from([(spec::LABEL_POD_UID.to_string(), uid.to_string())]);
    let sandbox = cri
        .list_pod_sandboxes(labels.clone())
        .await?
        .into_iter()
        .max_by_key(|s| s.created_at)
        .with_context(|| format!("no sandbox of pod {uid} in the runtime"))?;
    let container = cri
        .list_containers(labels)
        .await?
        .into_iter()
        .max_by_key(|c| c.created_at)
        .with_context(|| format!("no container of pod {uid} in the runtime"))?;
    let status = cri.container_status(&container.id).await?;
    Ok(RuntimeStamps {
        sandbox_created: sandbox.created_at as i128,
        container_created: status.created_at as i128,
        container_started: status.started_at as i128,
    })
}

// ---------------------------------------------------------------------------------------------
// One round

/// What a round's measurements share.
struct Bench<'a> {
    cli: &'a Cli,
    runtime: &'a Runtime,
    cloud: &'a Cloud,
    pods: Api<Pod>,
    watch: PodWatch,
    store: StorePoller,
    cri: Cri,
    /// Where the direct CRI pods keep their logs (as edgecore's do under its data dir).
    raw_dir: PathBuf,
    round: usize,
    edge_pid: u32,
    cloud_pid: u32,
}

/// A cloudcore and an edge joined to it, running pods in the bench's containerd.
struct Site {
    cloud: Cloud,
    edge: EdgeProcess,
    client: kube::Client,
    /// The real control plane in kube mode; dropped (stopped, wiped) after cloudcore.
    cluster: Option<KubeCluster>,
}

impl Site {
    async fn start(
        binaries: &Binaries,
        runtime: &Runtime,
        dir: &Path,
        control_plane: ControlPlane,
    ) -> Result<Site> {
        let (mut cloud, cluster) = start_cloud(&binaries.cloudcore, dir, control_plane).await?;
        let edge_dir = dir.join("edge");
        let started = async {
            join_edge(binaries, &cloud, &edge_dir).await?;
            let edge =
                EdgeProcess::start(&binaries.edgecore, &edge_dir, &runtime.get()?.endpoint).await?;
            let client = bench::api_client(NAMESPACE, API_READY_TIMEOUT, &cloud).await?;
            if control_plane == ControlPlane::Kube {
                ensure_service_account(&client).await?;
            }
            anyhow::Ok((edge, client))
        }
        .await;
        match started {
            Ok((edge, client)) => Ok(Site {
                cloud,
                edge,
                client,
                cluster,
            }),
            Err(e) => {
                print_tail("cloudcore", &cloud.log());
                tokio::task::block_in_place(|| {
                    cloud.stop();
                    drop(cluster);
                });
                Err(e)
            }
        }
    }

    /// Stops the edge, then cloudcore; after a failure, first prints the ends of their logs.
    async fn stop(mut self, failed: bool) {
        if failed {
            print_tail("edgecore", &self.edge.log_text());
            print_tail("cloudcore", &self.cloud.log());
        }
        self.edge.stop().await;
        let cluster = self.cluster.take();
        tokio::task::block_in_place(|| {
            self.cloud.stop();
            drop(cluster);
        });
    }
}

fn print_tail(what: &str, log: &str) {
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    eprintln!(
        "last lines of the {what} log:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

async fn measure(
    cli: &Cli,
    site: &mut Site,
    runtime: &Runtime,
    dir: &Path,
    round: usize,
) -> Result<Round> {
    let (cloud, edge, client) = (&site.cloud, &mut site.edge, &site.client);
    let mut b = Bench {
        cli,
        cloud,
        pods: Api::namespaced(client.clone(), NAMESPACE),
        watch: PodWatch::start(client).await?,
        store: StorePoller::start(&edge.dir)?,
        cri: Cri::new(&runtime.get()?.endpoint)?,
        runtime,
        raw_dir: dir.join("raw"),
        round,
        edge_pid: edge.pid()?,
        cloud_pid: cloud.pid().context("cloudcore is not running")?,
    };
    let idle_secs = Duration::from_secs(cli.idle_secs);
    let containerd_pid = std::fs::read_to_string(runtime.get()?.dir.join("containerd.pid"))
        .ok()
        .and_then(|pid| pid.trim().parse().ok());
    eprintln!(
        "round {round}: edgecore idle with no pod ({} s)",
        cli.idle_secs
    );
    let idle_empty = quiet_memory(edge, containerd_pid, 0, idle_secs).await?;

    eprintln!(
        "round {round}: starting {} pods through the API and {} through the CRI",
        cli.pods, cli.pods
    );
    let mut api_starts: Vec<ApiStart> = Vec::with_capacity(cli.pods);
    let mut raw_starts: Vec<RawStart> = Vec::with_capacity(cli.pods);
    let mut raw_pods: Vec<RawPod> = Vec::with_capacity(cli.pods);
    let mut idle_loaded = None;
    let mut template: Option<Pod> = None;
    for group in 0..cli.pods / cli.burst {
        let first = group * cli.burst;
        let indices: Vec<usize> = (first..first + cli.burst).collect();
        if first == cli.idle_pods {
            eprintln!(
                "round {round}: edgecore idle with {first} pods ({} s)",
                cli.idle_secs
            );
            idle_loaded = Some(quiet_memory(edge, containerd_pid, first, idle_secs).await?);
        }
        // Alternate which kind goes first; the first API pod gives the direct ones their spec.
        let direct_first = group % 2 == 1;
        if direct_first && let Some(template) = &template {
            for (start, pod) in start_raw_pods(&b, template, &indices).await? {
                raw_starts.push(start);
                raw_pods.push(pod);
            }
        }
        for (start, pod) in start_api_pods(&mut b, &indices).await? {
            api_starts.push(start);
            template.get_or_insert(pod);
        }
        if !direct_first && let Some(template) = &template {
            for (start, pod) in start_raw_pods(&b, template, &indices).await? {
                raw_starts.push(start);
                raw_pods.push(pod);
            }
        }
    }
    let idle_loaded = match idle_loaded {
        Some(memory) => memory,
        None => quiet_memory(edge, containerd_pid, cli.pods, idle_secs).await?,
    };
    let all_running = quiet_memory(edge, containerd_pid, cli.pods, SHORT_QUIET).await?;

    // edgecore's log lines of each pod.
    let logged = edge_log_stamps(&edge.log_text());
    for start in &mut api_starts {
        let stamps = logged.get(&start.uid).copied().unwrap_or_default();
        start.sandbox_ready_logged = stamps.sandbox_ready.map(|ns| start.start.ms_until_wall(ns));
        start.container_started_logged = stamps
            .container_started
            .map(|ns| start.start.ms_until_wall(ns));
    }

    eprintln!(
        "round {round}: API status probe ({} writes)",
        cli.status_probes
    );
    let status_probe = status_probe(&mut b).await?;

    eprintln!("round {round}: deleting every pod");
    let mut raw_deletes = Vec::with_capacity(raw_pods.len());
    for pod in raw_pods {
        raw_deletes.push(remove_raw_pod(&b.cri, pod).await?);
    }
    let mut api_deletes = Vec::with_capacity(api_starts.len());
    for index in 0..api_starts.len() {
        api_deletes.push(delete_api_pod(&mut b, &api_name(index)).await?);
    }
    let leftover = b
        .cri
        .list_pod_sandboxes(HashMap::from([(
            spec::LABEL_MANAGED_BY.to_string(),
            spec::MANAGED_BY.to_string(),
        )]))
        .await?;
    ensure!(
        leftover.is_empty(),
        "{} sandboxes of edgecore are still in the runtime after every pod was deleted",
        leftover.len()
    );
    let after = quiet_memory(edge, containerd_pid, 0, SHORT_QUIET).await?;
    Ok(Round {
        api_starts,
        raw_starts,
        api_deletes,
        raw_deletes,
        status_probe,
        idle_empty,
        idle_loaded,
        all_running,
        after,
    })
}

fn api_name(index: usize) -> String {
    format!("pod-{index:03}")
}

/// The pod as the bench applies it: bound to `node` at create, so no scheduler is involved.
fn pod_manifest(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app": "pod-bench"},
        },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": GRACE_SECS,
            "containers": [{
                "name": CONTAINER,
                "image": integration::BUSYBOX,
                "command": ["sh", "-c", COMMAND],
            }],
        },
    })
}

/// Creates a pod through the chosen client; the pod as the API stored it.
async fn create_pod(b: &Bench<'_>, manifest: &Value) -> Result<Pod> {
    match b.cli.client {
        Client::Kube => {
            let pod: Pod = serde_json::from_value(manifest.clone())?;
            b.pods
                .create(&PostParams::default(), &pod)
                .await
                .context("cannot create a pod")
        }
        Client::Kubectl => {
            let mut child = tokio::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(b.cloud.kubeconfig())
                .arg("--cache-dir")
                .arg(b.cloud.dir.join("kubectl-cache"))
                .args(["apply", "-f", "-", "-o", "json"])
                .env("HOME", &b.cloud.dir)
                .env_remove("KUBECONFIG")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("cannot run kubectl")?;
            let mut stdin = child.stdin.take().context("kubectl has no stdin")?;
            stdin.write_all(manifest.to_string().as_bytes()).await?;
            drop(stdin);
            let output = child.wait_with_output().await?;
            ensure!(
                output.status.success(),
                "kubectl apply failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            serde_json::from_slice(&output.stdout).context("kubectl apply -o json printed no pod")
        }
    }
}

/// One pod through the API, create request → container running in the API.
#[derive(Debug, Clone)]
struct ApiStart {
    uid: String,
    start: Start,
    /// Milliseconds since the create request of each milestone.
    answered: f64,
    store_committed: Option<f64>,
    sandbox_created: f64,
    sandbox_ready_logged: Option<f64>,
    container_created: f64,
    container_started: f64,
    container_started_logged: Option<f64>,
    running_seen: f64,
    /// CPU time edgecore and cloudcore used from the create request until running was seen
    /// (their other work in that span included: resyncs of the running pods, heartbeats).
    edge_cpu: f64,
    cloud_cpu: f64,
    /// Watch events of the pod before the one showing it running (the create's, statuses
    /// without a running container).
    events_before_running: usize,
}

/// A pod created through the API, not yet seen running.
struct Created {
    name: String,
    uid: String,
    start: Start,
    answered: Instant,
    committed: tokio::sync::oneshot::Receiver<Option<Instant>>,
    pod: Pod,
}

/// Creates the pods `indices` through the API all at once (one at a time for one index), each
/// timed from its own create request until the watch shows its container running. The CPU
/// edgecore and cloudcore used over the whole group is shared out evenly.
async fn start_api_pods(b: &mut Bench<'_>, indices: &[usize]) -> Result<Vec<(ApiStart, Pod)>> {
    let cpu_before = (cpu_ns(b.edge_pid)?, cpu_ns(b.cloud_pid)?);
    let created = {
        let b = &*b;
        futures::future::try_join_all(indices.iter().map(|&index| async move {
            let name = api_name(index);
            let manifest = pod_manifest(&name, NODE);
            let key = ObjectKey {
                kind: "Pod".into(),
                namespace: NAMESPACE.into(),
                name: name.clone(),
            };
            let start = Start::now();
            // The edge may commit the pod before the create's answer is back: look from the
            // start.
            let committed = b.store.look_for(key);
            let pod = create_pod(b, &manifest).await?;
            let answered = Instant::now();
            let uid = pod
                .metadata
                .uid
                .clone()
                .context("the created pod has no uid")?;
            b.runtime.started(&uid);
            anyhow::Ok(Created {
                name,
                uid,
                start,
                answered,
                committed,
                pod,
            })
        }))
        .await?
    };
    // The watch task stamps every event as it comes, so waiting in turn loses nothing.
    let mut running = Vec::with_capacity(created.len());
    for c in &created {
        running.push(
            b.watch
                .wait(&c.name, "container running", |s| s.running)
                .await?,
        );
    }
    let cpu_after = (cpu_ns(b.edge_pid)?, cpu_ns(b.cloud_pid)?);
    let share = created.len() as f64 * 1e6;
    let mut starts = Vec::with_capacity(created.len());
    for (c, running) in created.into_iter().zip(running) {
        let committed = c.committed.await.ok().flatten();
        let stamps = runtime_stamps(&b.cri, &c.uid).await?;
        let start = c.start;
        starts.push((
            ApiStart {
                uid: c.uid,
                start,
                answered: start.ms_until(c.answered),
                store_committed: committed.map(|at| start.ms_until(at)),
                sandbox_created: start.ms_until_wall(stamps.sandbox_created),
                sandbox_ready_logged: None,
                container_created: start.ms_until_wall(stamps.container_created),
                container_started: start.ms_until_wall(stamps.container_started),
                container_started_logged: None,
                running_seen: start.ms_until(running),
                edge_cpu: cpu_after.0.saturating_sub(cpu_before.0) as f64 / share,
                cloud_cpu: cpu_after.1.saturating_sub(cpu_before.1) as f64 / share,
                events_before_running: b.watch.events_before_running(&c.name),
            },
            c.pod,
        ));
    }
    Ok(starts)
}

/// Starts copies of `template` straight through the CRI for `indices`, all at once: each
/// pod's calls in turn, the pods in parallel.
async fn start_raw_pods(
    b: &Bench<'_>,
    template: &Pod,
    indices: &[usize],
) -> Result<Vec<(RawStart, RawPod)>> {
    futures::future::try_join_all(
        indices
            .iter()
            .map(|&index| start_raw_pod(b, template, index)),
    )
    .await
}

async fn delete_api_pod(b: &mut Bench<'_>, name: &str) -> Result<f64> {
    let start = Instant::now();
    b.pods
        .delete(name, &DeleteParams::default())
        .await
        .with_context(|| format!("cannot delete pod {name}"))?;
    let gone = b.watch.wait(name, "deletion", |s| s.deleted).await?;
    Ok(bench::ms(gone.saturating_duration_since(start)))
}

/// A pod this bench runs straight through the CRI.
struct RawPod {
    uid: String,
    sandbox_id: String,
    container_id: String,
    paths: PodPaths,
}

/// One pod straight through the CRI: milliseconds since the RunPodSandbox request of each
/// call's answer, and containerd's timestamps.
#[derive(Debug, Clone, Copy)]
struct RawStart {
    sandbox_created: f64,
    run_sandbox: f64,
    sandbox_status: f64,
    image_status: f64,
    create_container: f64,
    container_created: f64,
    container_started: f64,
    start_container: f64,
    container_status: f64,
}

impl RawStart {
    /// RunPodSandbox + CreateContainer + StartContainer, the calls a pod start cannot do
    /// without.
    fn core(&self) -> f64 {
        self.run_sandbox + (self.start_container - self.image_status)
    }
}

/// Starts a copy of `template` (a pod as the API stored it) with its own name and uid, with
/// the CRI configs edgecore builds, but without the `edge.io/managed-by` label.
async fn start_raw_pod(b: &Bench<'_>, template: &Pod, index: usize) -> Result<(RawStart, RawPod)> {
    let mut pod = template.clone();
    let uid = format!("pod-bench-{}-{}-{index}", std::process::id(), b.round);
    pod.metadata.name = Some(format!("direct-{index:03}"));
    pod.metadata.uid = Some(uid.clone());
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
        .context("the pod has no container")?;
    let paths = spec::pod_paths(&b.raw_dir, &uid);
    b.runtime.started(&uid);
    std::fs::create_dir_all(&paths.log_dir)
        .with_context(|| format!("cannot create {}", paths.log_dir.display()))?;
    // Built before the clock starts; edgecore builds the container's after PodSandboxStatus
    // (for the pod IP, which this pod's env does not use). Building takes microseconds.
    let mut sandbox_config = spec::sandbox_config(&pod, &paths, 0, None)?;
    sandbox_config.labels.remove(spec::LABEL_MANAGED_BY);
    let objects = Objects::default();
    // The benchmark's pods have no service-account token volume.
    let tokens = edgecore::tokens::Tokens::in_memory(edgecore::tokens::DEFAULT_REFRESH_MAX);
    let prepared = volumes::prepare(&pod, &objects, &tokens, &paths)?;
    let env = spec::container_env(&pod, &container, &objects, &[], "", NODE)?;
    let mounts = volumes::mounts(&container, &prepared)?;
    let mut config =
        spec::container_config(&pod, &container, ContainerKind::Regular, 0, env, mounts)?;
    config.labels.remove(spec::LABEL_MANAGED_BY);
    let image = container.image.clone().unwrap_or_default();

    let start = Start::now();
    let sandbox_id = b.cri.run_pod_sandbox(sandbox_config.clone()).await?;
    let run_sandbox = start.ms_until(Instant::now());
    let sandbox = b.cri.pod_sandbox_status(&sandbox_id).await?;
    let sandbox_status = start.ms_until(Instant::now());
    let image_info = b.cri.image_status(&image).await?;
    let image_status = start.ms_until(Instant::now());
    if let Some(info) = &image_info {
        spec::apply_image_user(&pod, &container, info, &mut config)?;
    }
    let container_id = b
        .cri
        .create_container(&sandbox_id, config, sandbox_config)
        .await?;
    let create_container = start.ms_until(Instant::now());
    b.cri.start_container(&container_id).await?;
    let start_container = start.ms_until(Instant::now());
    let status = b.cri.container_status(&container_id).await?;
    let container_status = start.ms_until(Instant::now());
    ensure!(
        status.started_at > 0 && status.finished_at == 0,
        "direct pod {index}: the container is not running: {} {}",
        status.reason,
        status.message
    );
    Ok((
        RawStart {
            sandbox_created: start.ms_until_wall(sandbox.created_at as i128),
            run_sandbox,
            sandbox_status,
            image_status,
            create_container,
            container_created: start.ms_until_wall(status.created_at as i128),
            container_started: start.ms_until_wall(status.started_at as i128),
            start_container,
            container_status,
        },
        RawPod {
            uid,
            sandbox_id,
            container_id,
            paths,
        },
    ))
}

/// Stops and removes a direct pod as edgecore removes one (StopContainer with the grace
/// period, StopPodSandbox, RemovePodSandbox), then its files and cgroups; the milliseconds the
/// calls took.
async fn remove_raw_pod(cri: &Cri, pod: RawPod) -> Result<f64> {
    let start = Instant::now();
    cri.stop_container(&pod.container_id, Duration::from_secs(GRACE_SECS as u64))
        .await?;
    cri.stop_pod_sandbox(&pod.sandbox_id).await?;
    cri.remove_pod_sandbox(&pod.sandbox_id).await?;
    let took = bench::ms(start.elapsed());
    edgecore::pods::worker::cleanup(&pod.paths, &pod.uid);
    Ok(took)
}

/// The API's part of a status report: on a pod bound to a node no edge has, GET the pod and
/// merge-PATCH its status with the resourceVersion read, as cloudcore writes an edge's report,
/// and time until the watch shows it.
async fn status_probe(b: &mut Bench<'_>) -> Result<Vec<f64>> {
    const NAME: &str = "status-probe";
    let pod: Pod = serde_json::from_value(pod_manifest(NAME, NOWHERE))?;
    b.pods
        .create(&PostParams::default(), &pod)
        .await
        .context("cannot create the status probe pod")?;
    b.watch
        .wait(NAME, "creation", |s| Some(s.last_status.len()))
        .await?;
    let mut samples = Vec::with_capacity(b.cli.status_probes);
    for n in 0..b.cli.status_probes {
        let message = format!("probe {n}");
        let start = Instant::now();
        let live = b
            .pods
            .get(NAME)
            .await
            .context("cannot read the probe pod")?;
        let patch = json!({
            "metadata": {"resourceVersion": live.metadata.resource_version},
            "status": {"message": message},
        });
        b.pods
            .patch_status(NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("cannot patch the probe pod's status")?;
        let seen = b
            .watch
            .wait(NAME, &message, |s| {
                s.messages
                    .iter()
                    .find(|(m, _)| *m == message)
                    .map(|(_, at)| *at)
            })
            .await?;
        samples.push(bench::ms(seen.saturating_duration_since(start)));
    }
    b.pods
        .delete(NAME, &DeleteParams::default().grace_period(0))
        .await
        .context("cannot delete the status probe pod")?;
    b.watch.wait(NAME, "deletion", |s| s.deleted).await?;
    Ok(samples)
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Median, p90, p99 (nearest rank) and max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    count: usize,
    median: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(values: impl IntoIterator<Item = f64>) -> Stats {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            if v.is_empty() {
                return 0.0;
            }
            let r = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[r - 1]
        };
        Stats {
            count: v.len(),
            median: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: v.last().copied().unwrap_or(0.0),
        }
    }

    fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "median_ms": self.median,
            "p90_ms": self.p90,
            "p99_ms": self.p99,
            "max_ms": self.max,
        })
    }
}

/// One round's samples.
struct Round {
    api_starts: Vec<ApiStart>,
    raw_starts: Vec<RawStart>,
    api_deletes: Vec<f64>,
    raw_deletes: Vec<f64>,
    status_probe: Vec<f64>,
    idle_empty: Memory,
    idle_loaded: Memory,
    all_running: Memory,
    after: Memory,
}

/// A named span of the API pods' start.
type Segment = (&'static str, fn(&ApiStart) -> Option<f64>);

/// The consecutive parts of an API pod's start, each from one milestone to the next.
const SEGMENTS: [Segment; 6] = [
    ("create request -> answer", |s| Some(s.answered)),
    ("create request -> pod committed in the edge's store", |s| {
        s.store_committed
    }),
    ("store commit -> sandbox created (containerd)", |s| {
        Some(s.sandbox_created - s.store_committed?)
    }),
    ("sandbox created -> container started (containerd)", |s| {
        Some(s.container_started - s.sandbox_created)
    }),
    (
        "container started -> StartContainer returned (edgecore log)",
        |s| Some(s.container_started_logged? - s.container_started),
    ),
    ("StartContainer returned -> running seen in the API", |s| {
        Some(s.running_seen - s.container_started_logged?)
    }),
];

impl Round {
    fn api(&self, f: impl Fn(&ApiStart) -> Option<f64>) -> Stats {
        Stats::of(self.api_starts.iter().filter_map(f))
    }

    fn raw(&self, f: impl Fn(&RawStart) -> f64) -> Stats {
        Stats::of(self.raw_starts.iter().map(f))
    }

    fn start_total(&self) -> Stats {
        self.api(|s| Some(s.running_seen))
    }

    fn raw_core(&self) -> Stats {
        self.raw(RawStart::core)
    }

    /// Store commit → StartContainer returned: the start path inside edgecore, CRI included.
    fn edge_start(&self) -> Stats {
        self.api(|s| Some(s.container_started_logged? - s.store_committed?))
    }

    /// The median over pod pairs (the API pod and the direct pod started next to it) of
    /// `f(API pod)` − the direct pod's RunPodSandbox + CreateContainer + StartContainer.
    fn paired(&self, f: impl Fn(&ApiStart) -> Option<f64>) -> Stats {
        Stats::of(
            self.api_starts
                .iter()
                .zip(&self.raw_starts)
                .filter_map(|(api, raw)| Some(f(api)? - raw.core())),
        )
    }

    /// Per pair: store commit → StartContainer returned − the direct pod's core calls.
    fn edgecore_pairs(&self) -> Stats {
        self.paired(|s| Some(s.container_started_logged? - s.store_committed?))
    }

    /// edgecore's CPU time per API pod start.
    fn edgecore_cpu(&self) -> Stats {
        Stats::of(self.api_starts.iter().map(|s| s.edge_cpu))
    }

    /// The same for the pods started before the idle reading: with few pods running, the
    /// 1 s resyncs of the others add little to a pod's span.
    fn edgecore_cpu_first(&self) -> Stats {
        Stats::of(
            self.api_starts
                .iter()
                .take(self.idle_loaded.pods)
                .map(|s| s.edge_cpu),
        )
    }

    /// median(apply → running) / median(raw CRI start): how far from the runtime's floor.
    fn floor_ratio(&self) -> f64 {
        self.start_total().median / self.raw_core().median.max(1e-9)
    }

    /// median(apply → running) − median(raw CRI start).
    fn overhead_end_to_end(&self) -> f64 {
        self.start_total().median - self.raw_core().median
    }

    /// median(store commit → StartContainer returned) − median(raw CRI start).
    fn overhead_edgecore(&self) -> f64 {
        self.edge_start().median - self.raw_core().median
    }

    fn to_json(&self) -> Value {
        let segments: Vec<Value> = SEGMENTS
            .iter()
            .map(|(name, f)| json!({"span": name, "stats": self.api(f).to_json()}))
            .collect();
        let first = self.api_starts.first();
        let per_pod: Vec<Value> = self
            .api_starts
            .iter()
            .zip(&self.raw_starts)
            .map(|(api, raw)| {
                json!({
                    "apply_to_running_ms": api.running_seen,
                    "store_commit_ms": api.store_committed,
                    "start_returned_logged_ms": api.container_started_logged,
                    "edgecore_cpu_ms": api.edge_cpu,
                    "cloudcore_cpu_ms": api.cloud_cpu,
                    "raw_cri_core_ms": raw.core(),
                })
            })
            .collect();
        json!({
            "per_pod": per_pod,
            "apply_to_running": self.start_total().to_json(),
            "first_pod_apply_to_running_ms": first.map(|s| s.running_seen),
            "segments": segments,
            "edgecore_store_commit_to_start_returned": self.edge_start().to_json(),
            "edgecore_store_commit_to_sandbox_ready_logged": self.api(|s| Some(s.sandbox_ready_logged? - s.store_committed?)).to_json(),
            "container_created_to_started": self.api(|s| Some(s.container_started - s.container_created)).to_json(),
            "watch_events_before_running": Stats::of(self.api_starts.iter().map(|s| s.events_before_running as f64)).to_json(),
            "raw_cri": {
                "run_sandbox_to_start_returned_core": self.raw_core().to_json(),
                "all_calls": self.raw(|r| r.container_status).to_json(),
                "run_pod_sandbox": self.raw(|r| r.run_sandbox).to_json(),
                "pod_sandbox_status": self.raw(|r| r.sandbox_status - r.run_sandbox).to_json(),
                "image_status": self.raw(|r| r.image_status - r.sandbox_status).to_json(),
                "create_container": self.raw(|r| r.create_container - r.image_status).to_json(),
                "start_container": self.raw(|r| r.start_container - r.create_container).to_json(),
                "container_status": self.raw(|r| r.container_status - r.start_container).to_json(),
                "request_to_sandbox_created": self.raw(|r| r.sandbox_created).to_json(),
                "sandbox_created_to_container_started": self.raw(|r| r.container_started - r.sandbox_created).to_json(),
                "container_created_to_started": self.raw(|r| r.container_started - r.container_created).to_json(),
                "container_started_to_start_returned": self.raw(|r| r.start_container - r.container_started).to_json(),
            },
            "overhead_end_to_end_ms": self.overhead_end_to_end(),
            "overhead_edgecore_ms": self.overhead_edgecore(),
            "overhead_end_to_end_paired": self.paired(|s| Some(s.running_seen)).to_json(),
            "overhead_edgecore_paired": self.edgecore_pairs().to_json(),
            "edgecore_cpu_per_start": self.edgecore_cpu().to_json(),
            "edgecore_cpu_per_start_first_pods": self.edgecore_cpu_first().to_json(),
            "cloudcore_cpu_per_start": Stats::of(self.api_starts.iter().map(|s| s.cloud_cpu)).to_json(),
            "status_probe": Stats::of(self.status_probe.iter().copied()).to_json(),
            "delete_to_gone": Stats::of(self.api_deletes.iter().copied()).to_json(),
            "raw_cri_delete": Stats::of(self.raw_deletes.iter().copied()).to_json(),
            "memory": {
                "idle_no_pods": self.idle_empty.to_json(),
                "idle_with_pods": self.idle_loaded.to_json(),
                "all_pods_running": self.all_running.to_json(),
                "after_all_deleted": self.after.to_json(),
            },
        })
    }
}

#[derive(Debug)]
struct Settings {
    pods: usize,
    idle_pods: usize,
    idle_secs: u64,
    status_probes: usize,
    rounds: usize,
    between_rounds: BetweenRounds,
    client: Client,
    control_plane: ControlPlane,
    burst: usize,
}

impl Settings {
    fn of(cli: &Cli) -> Settings {
        Settings {
            pods: cli.pods,
            idle_pods: cli.idle_pods,
            idle_secs: cli.idle_secs,
            status_probes: cli.status_probes,
            rounds: cli.rounds,
            between_rounds: cli.between_rounds,
            client: cli.client,
            control_plane: cli.control_plane,
            burst: cli.burst,
        }
    }
}

struct Report {
    settings: Settings,
    machine: Machine,
    rounds: Vec<Round>,
}

impl Report {
    fn spread(&self, f: impl Fn(&Round) -> f64) -> Spread {
        Spread::of(self.rounds.iter().map(f))
    }
}

fn fmt_spread(s: Spread, unit: &str) -> String {
    format!("{:.1}{unit} ({:.1} … {:.1})", s.median, s.min, s.max)
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let s = &self.settings;
        let mut out = format!(
            "pod-bench: {} pods through the API ({}, control plane {}) and {} straight through the CRI per round, {}, {} round(s) \
             ({} between rounds); {} CPUs ({}), {} MiB, kernel {}\n\n",
            s.pods,
            match s.client {
                Client::Kube => "kube-rs create",
                Client::Kubectl => "kubectl apply",
            },
            match s.control_plane {
                ControlPlane::Embedded => "embedded",
                ControlPlane::Kube => "kube",
            },
            s.pods,
            if s.burst == 1 {
                "one at a time".to_string()
            } else {
                format!("{} at once", s.burst)
            },
            s.rounds,
            match s.between_rounds {
                BetweenRounds::Restart => "cloudcore and edgecore restarted",
                BetweenRounds::Keep => "cloudcore and edgecore kept",
            },
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_mib,
            self.machine.kernel
        );
        for (i, round) in self.rounds.iter().enumerate() {
            let total = round.start_total();
            out.push_str(&format!("round {}\n", i + 1));
            out.push_str(&format!(
                "  apply -> running:        p50 {:7.1}  p90 {:7.1}  p99 {:7.1}  max {:7.1} ms  (first pod {:.1} ms)\n",
                total.median,
                total.p90,
                total.p99,
                total.max,
                round.api_starts.first().map_or(0.0, |s| s.running_seen)
            ));
            for (name, f) in SEGMENTS {
                let st = round.api(f);
                out.push_str(&format!(
                    "    {name:<62} p50 {:7.1}  p90 {:7.1}  p99 {:7.1}  (n={})\n",
                    st.median, st.p90, st.p99, st.count
                ));
            }
            let edge = round.edge_start();
            out.push_str(&format!(
                "  edgecore: store commit -> StartContainer returned: p50 {:.1}  p90 {:.1}  p99 {:.1} ms\n",
                edge.median, edge.p90, edge.p99
            ));
            let raw = |name: &str, st: Stats| {
                format!(
                    "    {name:<62} p50 {:7.1}  p90 {:7.1}  p99 {:7.1}\n",
                    st.median, st.p90, st.p99
                )
            };
            out.push_str("  raw CRI, same pod:\n");
            out.push_str(&raw("RunPodSandbox", round.raw(|r| r.run_sandbox)));
            out.push_str(&raw(
                "PodSandboxStatus",
                round.raw(|r| r.sandbox_status - r.run_sandbox),
            ));
            out.push_str(&raw(
                "ImageStatus",
                round.raw(|r| r.image_status - r.sandbox_status),
            ));
            out.push_str(&raw(
                "CreateContainer",
                round.raw(|r| r.create_container - r.image_status),
            ));
            out.push_str(&raw(
                "StartContainer",
                round.raw(|r| r.start_container - r.create_container),
            ));
            out.push_str(&raw(
                "ContainerStatus",
                round.raw(|r| r.container_status - r.start_container),
            ));
            out.push_str(&raw(
                "core: RunPodSandbox + CreateContainer + StartContainer",
                round.raw_core(),
            ));
            out.push_str(&raw("all six calls", round.raw(|r| r.container_status)));
            out.push_str(&raw(
                "sandbox created -> container started (containerd)",
                round.raw(|r| r.container_started - r.sandbox_created),
            ));
            out.push_str(&raw(
                "RunPodSandbox request -> sandbox created (containerd)",
                round.raw(|r| r.sandbox_created),
            ));
            out.push_str(&format!(
                "  apply -> running p50 / raw CRI core p50: {:.2}x\n",
                round.floor_ratio()
            ));
            out.push_str(&format!(
                "  overhead over raw CRI (difference of medians): end to end {:.1} ms, inside edgecore {:.1} ms\n",
                round.overhead_end_to_end(),
                round.overhead_edgecore()
            ));
            let paired_total = round.paired(|s| Some(s.running_seen));
            let paired_edge = round.edgecore_pairs();
            out.push_str(&format!(
                "  overhead over raw CRI (median of pairs): end to end {:.1} ms, inside edgecore {:.1} ms (p90 {:.1})\n",
                paired_total.median, paired_edge.median, paired_edge.p90
            ));
            let edge_cpu = round.edgecore_cpu();
            let edge_cpu_first = round.edgecore_cpu_first();
            let cloud_cpu = Stats::of(round.api_starts.iter().map(|s| s.cloud_cpu));
            out.push_str(&format!(
                "  CPU per pod start (create -> running): edgecore p50 {:.1} ms (p90 {:.1}; first {} pods p50 {:.1}), cloudcore p50 {:.1} ms (p90 {:.1})\n",
                edge_cpu.median,
                edge_cpu.p90,
                edge_cpu_first.count,
                edge_cpu_first.median,
                cloud_cpu.median,
                cloud_cpu.p90
            ));
            let probe = Stats::of(round.status_probe.iter().copied());
            let del = Stats::of(round.api_deletes.iter().copied());
            let raw_del = Stats::of(round.raw_deletes.iter().copied());
            out.push_str(&format!(
                "  API status write (GET + PATCH -> watch): p50 {:.1}  p99 {:.1} ms\n  delete -> gone: p50 {:.1}  p99 {:.1} ms; raw CRI stop + remove: p50 {:.1}  p99 {:.1} ms\n",
                probe.median, probe.p99, del.median, del.p99, raw_del.median, raw_del.p99
            ));
            for m in [
                round.idle_empty,
                round.idle_loaded,
                round.all_running,
                round.after,
            ] {
                out.push_str(&format!(
                    "  edgecore with {:>3} pods after {:>4.0} s quiet: VmRSS {:6.2} MiB (anon {:5.2}, file {:5.2})  VmHWM {:6.2} MiB  CPU {:.2} % (containerd {})\n",
                    m.pods,
                    m.quiet.as_secs_f64(),
                    mib(m.rss_kib),
                    mib(m.anon_kib),
                    mib(m.file_kib),
                    mib(m.hwm_kib),
                    m.cpu_percent,
                    m.containerd_cpu_percent
                        .map_or("unknown".to_string(), |c| format!("{c:.2} %"))
                ));
            }
            out.push('\n');
        }
        out.push_str("across rounds, median (min … max):\n");
        out.push_str(&format!(
            "  apply -> running p50       {}\n  apply -> running p99       {}\n  raw CRI core p50           {}\n  ratio to the floor (p50)   {}\n  overhead end to end        {}\n  overhead inside edgecore   {}\n    same, median of pairs    {}\n  edgecore CPU per start     {}\n  edgecore RSS, {} pods idle  {}\n  edgecore RSS, 0 pods idle  {}\n",
            fmt_spread(self.spread(|r| r.start_total().median), " ms"),
            fmt_spread(self.spread(|r| r.start_total().p99), " ms"),
            fmt_spread(self.spread(|r| r.raw_core().median), " ms"),
            {
                let r = self.spread(Round::floor_ratio);
                format!("{:.2}x ({:.2} … {:.2})", r.median, r.min, r.max)
            },
            fmt_spread(self.spread(Round::overhead_end_to_end), " ms"),
            fmt_spread(self.spread(Round::overhead_edgecore), " ms"),
            fmt_spread(self.spread(|r| r.edgecore_pairs().median), " ms"),
            fmt_spread(self.spread(|r| r.edgecore_cpu().median), " ms"),
            s.idle_pods,
            fmt_spread(self.spread(|r| mib(r.idle_loaded.rss_kib)), " MiB"),
            fmt_spread(self.spread(|r| mib(r.idle_empty.rss_kib)), " MiB"),
        ));
        out
    }

    fn to_json(&self) -> Value {
        let s = &self.settings;
        let spread = |f: &dyn Fn(&Round) -> f64| self.spread(f).to_json();
        json!({
            "settings": {
                "pods": s.pods,
                "idle_pods": s.idle_pods,
                "idle_secs": s.idle_secs,
                "status_probes": s.status_probes,
                "rounds": s.rounds,
                "client": format!("{:?}", s.client).to_lowercase(),
                "control_plane": format!("{:?}", s.control_plane).to_lowercase(),
                "burst": s.burst,
                "between_rounds": format!("{:?}", s.between_rounds).to_lowercase(),
            },
            "machine": self.machine.to_json(),
            "rounds": self.rounds.iter().map(Round::to_json).collect::<Vec<_>>(),
            "summary": {
                "apply_to_running_median_ms": spread(&|r| r.start_total().median),
                "apply_to_running_p99_ms": spread(&|r| r.start_total().p99),
                "raw_cri_core_median_ms": spread(&|r| r.raw_core().median),
                "floor_ratio_median": spread(&Round::floor_ratio),
                "overhead_end_to_end_ms": spread(&Round::overhead_end_to_end),
                "overhead_edgecore_ms": spread(&Round::overhead_edgecore),
                "overhead_edgecore_paired_median_ms": spread(&|r| r.edgecore_pairs().median),
                "edgecore_cpu_per_start_median_ms": spread(&|r| r.edgecore_cpu().median),
                "edgecore_rss_idle_with_pods_kib": spread(&|r| r.idle_loaded.rss_kib as f64),
                "edgecore_rss_idle_no_pods_kib": spread(&|r| r.idle_empty.rss_kib as f64),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_become_unix_nanoseconds() {
        assert_eq!(bench::rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            bench::rfc3339_ns("2026-11-24T06:39:17.123456Z"),
            Some(1_795_502_357_123_456_000)
        );
        assert_eq!(
            bench::rfc3339_ns("2000-02-29T12:00:00.5Z"),
            Some(951_825_600_500_000_000)
        );
        assert_eq!(bench::rfc3339_ns("yesterday"), None);
    }

    #[test]
    fn edgecore_log_lines_give_each_pods_stamps() {
        let log = "2026-11-24T06:39:17.000100Z  INFO pod{pod.uid=abc-1 pod.name=p pod.namespace=n}: edgecore::pods::worker: pod sandbox ready sandbox=x pod.ip=10.0.0.2\n\
                   2026-11-24T06:39:17.000200Z  INFO pod{pod.uid=abc-1 pod.name=p pod.namespace=n}: edgecore::pods::worker: container started container=c id=y restarts=0\n\
                   2026-11-24T06:39:18Z  INFO edgecore: something else\n";
        let stamps = edge_log_stamps(log);
        let abc = stamps.get("abc-1").copied().unwrap_or_default();
        assert_eq!(
            abc.container_started
                .zip(abc.sandbox_ready)
                .map(|(c, s)| c - s),
            Some(100_000)
        );
        assert_eq!(stamps.len(), 1);
    }

    #[test]
    fn stats_use_nearest_rank() {
        let s = Stats::of((1..=50).map(f64::from));
        assert_eq!((s.median, s.p90, s.p99, s.max), (25.0, 45.0, 50.0, 50.0));
    }
}
