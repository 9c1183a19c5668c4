//! `stream-bench`: what `kubectl exec`, `kubectl logs -f` and open streams cost when they reach
//! an edge pod through cloudcore and the edge's QUIC connection ([docs/streams.md]).
//!
//! Everything is real and on this machine: a private containerd (the project's config and
//! images, `deploy/containerd/containerd.sh`), `cloudcore serve --control-plane embedded` and
//! `edgecore run` as child processes (so `/proc` readings are theirs alone), the edge joined
//! with `edgecore join`, pods created through the embedded API, and the real `kubectl` (the
//! one on PATH unless `--kubectl`) doing what a user does. In one run:
//!
//! 1. **exec round trip**: `--execs` times, in rotating order, on the same container:
//!    `kubectl exec POD -- true` (through the API, cloudcore and the tunnel), `edgecore ctl
//!    exec POD -- true` on the gateway (a process that calls the CRI's ExecSync), the raw CRI
//!    `ExecSync` from this process (`edgecore::cri::Cri::exec_sync`, the call `crictl exec -s`
//!    makes; crictl is not installed on these machines), and `kubectl get pod` (kubectl's own
//!    start-up, discovery and one API request: what `kubectl exec` pays before any stream).
//! 2. **log throughput**: a pod whose container writes 1 KiB lines as fast as it can (busybox
//!    `yes`), followed with `kubectl logs -f`: bytes kubectl printed per second over
//!    `--log-secs` (after `--warmup-secs`), the log file's growth on the edge over the same
//!    window (what the writer managed, CRI line prefixes included), and the CPU time cloudcore,
//!    edgecore and kubectl used in it, from `/proc/PID/stat`.
//! 3. **memory per stream**: cloudcore's and edgecore's `VmRSS` before and while `--streams`
//!    concurrent `kubectl logs -f` of a slow writer (one line a second) are open, each having
//!    received a line written after the last one opened; (difference) / streams. Then every
//!    kubectl is killed and the time until both sides' open-stream gauges are back is taken.
//!
//! A failure or `--timeout-secs` stops everything this bench started (kubectl, edgecore,
//! cloudcore, containerd and its pods) and keeps the temp dir with the logs (the fast writer's
//! log file removed).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use edgecore::cri::Cri;
use edgecore::pods::spec;
use integration::bench::{self, BenchContainerd, Machine, Spread, mib, ms, percentile};
use integration::{Cloud, Edge};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// The namespace of every pod.
const NAMESPACE: &str = "stream-bench";
/// The edge's node name.
const NODE: &str = "stream-bench-edge";
/// The one container of every pod.
const CONTAINER: &str = "c";
/// The exec target: sleeps until SIGTERM (a shell as PID 1 ignores SIGTERM without a trap).
const SLEEPER: &str = "sleeper";
const SLEEPER_COMMAND: &str = "trap 'exit 0' TERM; sleep 2147483647 & wait";
/// The fast writer: `yes` of a line of `LINE_LEN` bytes (64 × "0123456789abcdef"), well
/// under the 16 KiB at which containerd splits a line into partial CRI entries.
const WRITER: &str = "writer";
const WRITER_COMMAND: &str = "l=0123456789abcdef; l=$l$l$l$l; l=$l$l$l$l; l=$l$l$l$l; exec yes $l";
const LINE_LEN: usize = 1024;
/// The slow writer the concurrent streams follow: one numbered line a second.
const TICKER: &str = "ticker";
const TICKER_COMMAND: &str =
    "trap 'exit 0' TERM; i=0; while true; do echo \"tick $i\"; i=$((i+1)); sleep 1; done";
/// terminationGracePeriodSeconds of every pod (`yes` as PID 1 ignores SIGTERM).
const GRACE_SECS: i64 = 1;
/// The pod subnet's second octet and the bridge prefix of this bench's containerd (the tests
/// use 10.100-10.112, pod-bench 10.99, offline-bench 10.98).
const SUBNET_OCTET: u8 = 97;
const BRIDGE: &str = "edgesb";
/// How long a pod may take to run, or to go away.
const POD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a tool (containerd.sh, join, one kubectl exec) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the edge may take to connect, and the embedded API to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the concurrent streams may take to all deliver their first line.
const STREAMS_OPEN_TIMEOUT: Duration = Duration::from_secs(180);
/// Quiet before each memory reading.
const SETTLE: Duration = Duration::from_secs(3);
/// Pause between two `kubectl logs -f` starts, so a hundred Go start-ups do not land at once.
const SPAWN_PACE: Duration = Duration::from_millis(20);
/// How long the open-stream gauges may take to fall back after the readers are killed.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// cloudcore's `--max-streams-per-edge` default (`cloudcore::streams`).
const DEFAULT_MAX_STREAMS_PER_EDGE: usize = 128;
/// The gauges of open streams (issue 13's tunnel), one series per kind of stream.
const CLOUD_STREAMS_OPEN: &str = "cloudcore_streams_open";
const EDGE_STREAMS_OPEN: &str = "edgecore_streams_open";

#[derive(Parser, Debug)]
#[command(
    name = "stream-bench",
    about = "Measures kubectl exec round trips through the tunnel against ctl exec and the raw \
             CRI ExecSync, kubectl logs -f throughput of a fast writer with the CPU it costs \
             cloudcore and edgecore, and their memory per open stream"
)]
struct Cli {
    /// Round trips of each kind (kubectl exec, ctl exec, raw ExecSync, kubectl get).
    #[arg(long, default_value_t = 30)]
    execs: usize,
    /// Seconds over which `kubectl logs -f` of the fast writer is measured.
    #[arg(long, default_value_t = 10)]
    log_secs: u64,
    /// Seconds of `kubectl logs -f` before that window (not counted).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Concurrent `kubectl logs -f` for the memory per stream.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// The kubectl to run (`kubectl` on PATH, or a path such as
    /// `/usr/lib/google-cloud-sdk/bin/kubectl.1.33`).
    #[arg(long, default_value = "kubectl")]
    kubectl: PathBuf,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// The edgecore binary [default: `edgecore` next to this executable].
    #[arg(long)]
    edgecore: Option<PathBuf>,
    /// Give up (and stop everything started) after this many seconds in total.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--execs", c.execs),
            ("--log-secs", c.log_secs as usize),
            ("--streams", c.streams),
        ]
    }) {
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
    let result = runtime.block_on(bench(&cli));
    // A containerd start still running in a blocking task (timeout, Ctrl-C) gets time to end,
    // so its guard stops it.
    runtime.shutdown_timeout(Duration::from_secs(30));
    bench::finish(result, cli.json)
}

/// Runs the bench under the overall timeout. Whatever was started is stopped by its guard when
/// this returns, also on an error, the timeout or Ctrl-C; then the temp dir is kept.
async fn bench(cli: &Cli) -> Result<Report> {
    let cloudcore = bench::cloudcore_binary(cli.cloudcore.as_ref())?;
    let edgecore = bench::edgecore_binary(cli.edgecore.as_ref())?;
    let dir = tempfile::Builder::new()
        .prefix("stream-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let writer_logs = WriterLogs::default();
    let work = async {
        let site = Site::start(cli, &cloudcore, &edgecore, dir.path()).await?;
        let outcome = measure(cli, &site, &writer_logs).await;
        if outcome.is_err() {
            site.print_tails();
        }
        site.stop().await;
        outcome
    };
    let limit = Duration::from_secs(cli.timeout_secs);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(limit, work) => outcome
            .unwrap_or_else(|_| Err(anyhow!("gave up after {} s (--timeout-secs)", cli.timeout_secs))),
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(figures) => Ok(Report {
            settings: json!({
                "execs": cli.execs,
                "log_secs": cli.log_secs,
                "warmup_secs": cli.warmup_secs,
                "streams": cli.streams,
                "kubectl": cli.kubectl.display().to_string(),
                "kubectl_version": kubectl_version(&cli.kubectl).await,
            }),
            machine: Machine::read(),
            figures,
        }),
        Err(e) => {
            writer_logs.remove();
            let kept = dir.keep();
            eprintln!("logs and data dirs are kept in {}", kept.display());
            Err(e)
        }
    }
}

/// The fast writer's log directory, once known: removed if the bench fails, so a kept temp
/// dir does not hold gigabytes of `yes`.
#[derive(Default, Clone)]
struct WriterLogs(Arc<std::sync::Mutex<Option<PathBuf>>>);

impl WriterLogs {
    fn set(&self, dir: PathBuf) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir);
    }

    fn remove(&self) {
        if let Some(dir) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The kubectl client's version (`kubectl version --client -o json`), if it says.
async fn kubectl_version(kubectl: &Path) -> Option<String> {
    let out = tokio::process::Command::new(kubectl)
        .args(["version", "--client", "-o", "json"])
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["clientVersion"]["gitVersion"]
        .as_str()
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// containerd, cloudcore, edgecore and the pods

/// Everything the bench runs. Fields drop in order: the edge, then containerd (removing its
/// pods), then cloudcore.
struct Site {
    edge: Edge,
    containerd: BenchContainerd,
    cloud: Cloud,
    client: kube::Client,
    kubectl: PathBuf,
    edgecore: PathBuf,
}

impl Site {
    async fn start(cli: &Cli, cloudcore: &Path, edgecore: &Path, dir: &Path) -> Result<Site> {
        eprintln!("starting containerd and importing the images");
        let containerd = {
            let dir = dir.join("containerd");
            blocking(move || BenchContainerd::start(&dir, SUBNET_OCTET, BRIDGE, TOOL_TIMEOUT))
                .await?
        };
        let endpoint = containerd.get()?.endpoint.clone();
        // Room for every concurrent stream and the ones the other phases open beside them.
        let cap = (cli.streams + 16).max(DEFAULT_MAX_STREAMS_PER_EDGE);
        let cloud = {
            let (binary, dir) = (cloudcore.to_path_buf(), dir.to_path_buf());
            let cap = cap.to_string();
            blocking(move || Cloud::start_binary(&binary, &dir, &["--max-streams-per-edge", &cap]))
                .await?
        };
        let edge_dir = dir.join("edge");
        // Short blocking steps (the CLIs, the edge's start) on this worker thread.
        let edge = tokio::task::block_in_place(|| {
            bench::join_edge(cloudcore, edgecore, &cloud, &edge_dir, NODE, TOOL_TIMEOUT)?;
            let edge = bench::start_edge(edgecore, &edge_dir, &["--cri-endpoint", &endpoint])?;
            ensure!(
                integration::eventually(START_TIMEOUT, || edge.connected()),
                "edgecore did not connect within {START_TIMEOUT:?}; log:\n{}",
                edge.log()
            );
            anyhow::Ok(edge)
        })?;
        let client = bench::api_client(NAMESPACE, START_TIMEOUT, &cloud).await?;
        Ok(Site {
            edge,
            containerd,
            cloud,
            client,
            kubectl: cli.kubectl.clone(),
            edgecore: edgecore.to_path_buf(),
        })
    }

    fn cloud_pid(&self) -> Result<u32> {
        self.cloud.pid().context("cloudcore is not running")
    }

    fn edge_pid(&self) -> Result<u32> {
        self.edge.pid().context("edgecore is not running")
    }

    /// `kubectl -n NAMESPACE ARGS` against the embedded API.
    fn kubectl(&self, args: &[&str]) -> tokio::process::Command {
        let mut all = vec!["-n", NAMESPACE];
        all.extend_from_slice(args);
        let mut command: tokio::process::Command =
            bench::kubectl_command(&self.kubectl, &self.cloud, &all).into();
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    /// The open-stream gauges (cloudcore's, edgecore's); `None` for one that is not served.
    async fn streams_open(&self) -> (Option<f64>, Option<f64>) {
        tokio::task::block_in_place(|| {
            (
                bench::metric_sum(&self.cloud.metrics(), CLOUD_STREAMS_OPEN),
                integration::http_get(self.edge.metrics_port, "/metrics")
                    .and_then(|page| bench::metric_sum(&page, EDGE_STREAMS_OPEN)),
            )
        })
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// Creates a pod bound to the edge running `command` in busybox, and waits until its
    /// container runs; its uid.
    async fn run_pod(&self, name: &str, command: &str) -> Result<String> {
        let manifest = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": GRACE_SECS,
                "containers": [{
                    "name": CONTAINER,
                    "image": integration::BUSYBOX,
                    "command": ["sh", "-c", command],
                }],
            },
        });
        let pod: Pod = serde_json::from_value(manifest)?;
        let created = self
            .pods()
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("cannot create pod {name}"))?;
        let uid = created.metadata.uid.context("the created pod has no uid")?;
        self.containerd.started(&uid);
        let deadline = Instant::now() + POD_TIMEOUT;
        loop {
            let pod = self.pods().get(name).await?;
            let running = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
            if running {
                return Ok(uid);
            }
            ensure!(
                Instant::now() < deadline,
                "pod {name} not running within {POD_TIMEOUT:?}; status: {}",
                serde_json::to_string(&pod.status).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes a pod and waits until the API no longer has it (the edge confirmed it).
    async fn delete_pod(&self, name: &str) -> Result<()> {
        self.pods()
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("cannot delete pod {name}"))?;
        let deadline = Instant::now() + POD_TIMEOUT;
        while self.pods().get_opt(name).await?.is_some() {
            ensure!(
                Instant::now() < deadline,
                "pod {name} still in the API {POD_TIMEOUT:?} after its delete"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The running container of a pod, by the labels edgecore gives it.
    async fn container_id(&self, cri: &Cri, uid: &str) -> Result<String> {
        let labels = std::collections::HashMap::from([
            (
                spec::LABEL_MANAGED_BY.to_string(),
                spec::MANAGED_BY.to_string(),
            ),
            (spec::LABEL_POD_UID.to_string(), uid.to_string()),
            (
                spec::LABEL_CONTAINER_NAME.to_string(),
                CONTAINER.to_string(),
            ),
        ]);
        cri.list_containers(labels)
            .await?
            .into_iter()
            .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
            .max_by_key(|c| c.created_at)
            .map(|c| c.id)
            .with_context(|| format!("pod {uid} has no running container in containerd"))
    }

    fn print_tails(&self) {
        print_tail("edgecore", &self.edge.log());
        print_tail("cloudcore", &self.cloud.log());
    }

    /// Stops edgecore, then containerd (with its pods), then cloudcore.
    async fn stop(self) {
        let Site {
            mut edge,
            containerd,
            mut cloud,
            ..
        } = self;
        let _ = blocking(move || {
            edge.stop();
            drop(containerd);
            cloud.stop();
            Ok(())
        })
        .await;
    }
}

/// Runs a blocking closure on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking task panicked")?
}

fn print_tail(what: &str, log: &str) {
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    eprintln!(
        "last lines of the {what} log:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

async fn measure(cli: &Cli, site: &Site, writer_logs: &WriterLogs) -> Result<Figures> {
    eprintln!("exec round trips ({} of each kind)", cli.execs);
    let exec = exec_round_trips(cli, site).await?;
    eprintln!(
        "log throughput: kubectl logs -f of a fast writer ({} s + {} s warm-up)",
        cli.log_secs, cli.warmup_secs
    );
    let logs = log_throughput(cli, site, writer_logs).await?;
    eprintln!(
        "memory per stream: {} concurrent kubectl logs -f",
        cli.streams
    );
    let streams = memory_per_stream(cli, site).await?;
    Ok(Figures {
        exec,
        logs,
        streams,
    })
}

// ---------------------------------------------------------------------------------------------
// 1. exec round trips

/// The ways of running `true` in the sleeper's container that are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExecKind {
    /// `kubectl exec POD -- true`.
    Kubectl,
    /// `edgecore ctl exec POD -- true` on the gateway.
    Ctl,
    /// `ExecSync` from this process.
    Raw,
    /// `kubectl get pod POD`: kubectl with no stream.
    KubectlGet,
}

const EXEC_KINDS: [ExecKind; 4] = [
    ExecKind::Kubectl,
    ExecKind::Ctl,
    ExecKind::Raw,
    ExecKind::KubectlGet,
];

/// Milliseconds of each kind's round trips, in the order taken.
#[derive(Debug, Default)]
struct ExecFigures {
    kubectl: Vec<f64>,
    ctl: Vec<f64>,
    raw: Vec<f64>,
    kubectl_get: Vec<f64>,
}

impl ExecFigures {
    fn of(&mut self, kind: ExecKind) -> &mut Vec<f64> {
        match kind {
            ExecKind::Kubectl => &mut self.kubectl,
            ExecKind::Ctl => &mut self.ctl,
            ExecKind::Raw => &mut self.raw,
            ExecKind::KubectlGet => &mut self.kubectl_get,
        }
    }
}

async fn exec_round_trips(cli: &Cli, site: &Site) -> Result<ExecFigures> {
    let uid = site.run_pod(SLEEPER, SLEEPER_COMMAND).await?;
    let cri = Cri::new(&site.containerd.get()?.endpoint)?;
    let container = site.container_id(&cri, &uid).await?;
    // One of each first, unmeasured: kubectl fills its discovery cache, the CRI client connects.
    for kind in EXEC_KINDS {
        exec_once(site, &cri, &container, kind).await?;
    }
    let mut figures = ExecFigures::default();
    for round in 0..cli.execs {
        // Each kind goes first as often as the others, so all meet the same conditions.
        for step in 0..EXEC_KINDS.len() {
            let kind = EXEC_KINDS[(round + step) % EXEC_KINDS.len()];
            let took = exec_once(site, &cri, &container, kind).await?;
            figures.of(kind).push(ms(took));
        }
    }
    site.delete_pod(SLEEPER).await?;
    Ok(figures)
}

/// One round trip of `kind`, checked to have succeeded.
async fn exec_once(site: &Site, cri: &Cri, container: &str, kind: ExecKind) -> Result<Duration> {
    let started = Instant::now();
    match kind {
        ExecKind::Raw => {
            let reply = cri
                .exec_sync(container, vec!["true".into()], Duration::from_secs(10))
                .await?;
            ensure!(
                reply.exit_code == 0,
                "ExecSync of `true` exited {}: {}",
                reply.exit_code,
                String::from_utf8_lossy(&reply.stderr)
            );
        }
        ExecKind::Kubectl => {
            let command = site.kubectl(&["exec", SLEEPER, "-c", CONTAINER, "--", "true"]);
            run(command, "kubectl exec").await?;
        }
        ExecKind::KubectlGet => {
            let command = site.kubectl(&["get", "pod", SLEEPER, "-o", "name"]);
            run(command, "kubectl get pod").await?;
        }
        ExecKind::Ctl => {
            let mut command = tokio::process::Command::new(&site.edgecore);
            command
                .args(["ctl", "exec", SLEEPER, "-n", NAMESPACE, "-c", CONTAINER])
                .arg("--data-dir")
                .arg(&site.edge.dir)
                .args(["--", "true"])
                .stdin(Stdio::null())
                .kill_on_drop(true);
            run(command, "edgecore ctl exec").await?;
        }
    }
    Ok(started.elapsed())
}

/// Runs a command to its end within `TOOL_TIMEOUT`; an error with its stderr unless it
/// succeeded.
async fn run(mut command: tokio::process::Command, what: &str) -> Result<()> {
    let output = tokio::time::timeout(TOOL_TIMEOUT, command.output())
        .await
        .map_err(|_| anyhow!("`{what}` did not finish within {TOOL_TIMEOUT:?}"))?
        .with_context(|| format!("cannot run `{what}`"))?;
    ensure!(
        output.status.success(),
        "`{what}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. log throughput

/// What one `kubectl logs -f` of the fast writer received: bytes, and lines that are not the
/// writer's line (a stream that corrupts or drops bytes shows here).
#[derive(Debug, Default)]
struct Received {
    bytes: AtomicU64,
    bad_lines: AtomicU64,
}

/// One window of `kubectl logs -f` of the fast writer.
#[derive(Debug, Clone)]
struct LogFigures {
    /// What `/proc/PID/exe` of the following kubectl showed.
    kubectl_binary: Option<String>,
    window: Duration,
    /// MB kubectl printed in each second of the window.
    per_second: Spread,
    /// Bytes kubectl printed in the window.
    received: u64,
    /// Growth of the container's log file on the edge in the window (CRI format: each line
    /// led by its timestamp, stream and tag).
    written: u64,
    /// Bytes the writer had in its log file at the end, against what kubectl had printed by
    /// then (content only): how far the reader was behind, roughly.
    file_total: u64,
    received_total: u64,
    /// CPU time used in the window.
    cloud_cpu: Duration,
    edge_cpu: Duration,
    kubectl_cpu: Duration,
    containerd_cpu: Option<Duration>,
    /// RSS at the end of the window, KiB.
    cloud_rss_kib: u64,
    edge_rss_kib: u64,
}

impl LogFigures {
    fn mb_per_s(bytes: u64, window: Duration) -> f64 {
        bytes as f64 / 1e6 / window.as_secs_f64().max(1e-9)
    }

    fn received_mb_s(&self) -> f64 {
        LogFigures::mb_per_s(self.received, self.window)
    }

    fn written_mb_s(&self) -> f64 {
        LogFigures::mb_per_s(self.written, self.window)
    }

    /// Percent of one CPU.
    fn percent(&self, cpu: Duration) -> f64 {
        100.0 * cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9)
    }

    /// CPU milliseconds per MB received.
    fn ms_per_mb(&self, cpu: Duration) -> f64 {
        let mb = self.received as f64 / 1e6;
        if mb == 0.0 { 0.0 } else { ms(cpu) / mb }
    }

    fn to_json(&self) -> Value {
        json!({
            "kubectl_binary": self.kubectl_binary,
            "window_s": self.window.as_secs_f64(),
            "received_bytes": self.received,
            "received_mb_per_s": self.received_mb_s(),
            "received_mb_per_s_each_second": self.per_second.to_json(),
            "log_file_growth_bytes": self.written,
            "log_file_growth_mb_per_s": self.written_mb_s(),
            "log_file_bytes_at_end": self.file_total,
            "received_bytes_at_end": self.received_total,
            "cloudcore": {
                "cpu_ms": ms(self.cloud_cpu),
                "cpu_percent_of_one_cpu": self.percent(self.cloud_cpu),
                "cpu_ms_per_mb": self.ms_per_mb(self.cloud_cpu),
                "vm_rss_kib_at_end": self.cloud_rss_kib,
            },
            "edgecore": {
                "cpu_ms": ms(self.edge_cpu),
                "cpu_percent_of_one_cpu": self.percent(self.edge_cpu),
                "cpu_ms_per_mb": self.ms_per_mb(self.edge_cpu),
                "vm_rss_kib_at_end": self.edge_rss_kib,
            },
            "kubectl": {
                "cpu_ms": ms(self.kubectl_cpu),
                "cpu_percent_of_one_cpu": self.percent(self.kubectl_cpu),
            },
            "containerd_cpu_ms": self.containerd_cpu.map(ms),
        })
    }
}

async fn log_throughput(cli: &Cli, site: &Site, writer_logs: &WriterLogs) -> Result<LogFigures> {
    let uid = site.run_pod(WRITER, WRITER_COMMAND).await?;
    let log_dir = spec::pod_paths(&site.edge.dir, &uid).log_dir;
    writer_logs.set(log_dir.clone());
    let mut reader = site
        .kubectl(&["logs", "-f", WRITER, "-c", CONTAINER])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run kubectl logs -f")?;
    let kubectl_pid = reader.id().context("kubectl exited at once")?;
    let stdout = reader.stdout.take().context("kubectl has no stdout")?;
    let received = Arc::new(Received::default());
    let counting = tokio::spawn(count_lines(stdout, received.clone()));
    let measured = async {
        // The window starts after the warm-up that follows the first byte.
        let first_byte_deadline = Instant::now() + START_TIMEOUT;
        while received.bytes.load(Ordering::Relaxed) == 0 {
            if let Some(status) = reader.try_wait()? {
                bail!("kubectl logs -f exited ({status}) before printing anything");
            }
            ensure!(
                Instant::now() < first_byte_deadline,
                "kubectl logs -f printed nothing within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The binary that runs once the machine's kubectl dispatcher has picked a version.
        let kubectl_binary = std::fs::read_link(format!("/proc/{kubectl_pid}/exe"))
            .ok()
            .map(|path| path.display().to_string());
        tokio::time::sleep(Duration::from_secs(cli.warmup_secs)).await;
        let (cloud, edge) = (site.cloud_pid()?, site.edge_pid()?);
        let containerd = site.containerd.pid();
        let cpu = |pid: u32| bench::cpu_time(pid);
        let before = (
            cpu(cloud)?,
            cpu(edge)?,
            cpu(kubectl_pid)?,
            containerd.and_then(|p| cpu(p).ok()),
        );
        let (received_before, written_before) =
            (received.bytes.load(Ordering::Relaxed), dir_bytes(&log_dir));
        let started = Instant::now();
        // Per-second rates too, for their median and spread.
        let mut per_second = Vec::with_capacity(cli.log_secs as usize);
        let mut last = received_before;
        for second in 1..=cli.log_secs {
            tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
            let now = received.bytes.load(Ordering::Relaxed);
            per_second.push((now - last) as f64 / 1e6);
            last = now;
        }
        let window = started.elapsed();
        let (received_after, written_after) =
            (received.bytes.load(Ordering::Relaxed), dir_bytes(&log_dir));
        let after = (
            cpu(cloud)?,
            cpu(edge)?,
            cpu(kubectl_pid)?,
            containerd.and_then(|p| cpu(p).ok()),
        );
        if let Some(status) = reader.try_wait()? {
            bail!("kubectl logs -f exited ({status}) during the window");
        }
        anyhow::Ok(LogFigures {
            kubectl_binary,
            window,
            per_second: Spread::of(per_second.into_iter()),
            received: received_after - received_before,
            written: written_after.saturating_sub(written_before),
            file_total: written_after,
            received_total: received_after,
            cloud_cpu: after.0.saturating_sub(before.0),
            edge_cpu: after.1.saturating_sub(before.1),
            kubectl_cpu: after.2.saturating_sub(before.2),
            containerd_cpu: after.3.zip(before.3).map(|(a, b)| a.saturating_sub(b)),
            cloud_rss_kib: bench::rss_kib(cloud)?,
            edge_rss_kib: bench::rss_kib(edge)?,
        })
    }
    .await;
    let _ = reader.start_kill();
    let stderr = match reader.stderr.take() {
        Some(mut pipe) => {
            let mut text = String::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), pipe.read_to_string(&mut text)).await;
            text
        }
        None => String::new(),
    };
    let _ = reader.wait().await;
    counting.abort();
    let figures = measured.with_context(|| format!("kubectl said: {}", stderr.trim()))?;
    let bad = received.bad_lines.load(Ordering::Relaxed);
    ensure!(
        bad == 0,
        "kubectl logs -f printed {bad} lines that are not the writer's {LINE_LEN}-byte line"
    );
    site.delete_pod(WRITER).await?;
    writer_logs.remove();
    Ok(figures)
}

/// Reads kubectl's stdout to its end, counting bytes and lines that are not `LINE_LEN` bytes
/// of the writer's pattern.
async fn count_lines(mut stdout: tokio::process::ChildStdout, received: Arc<Received>) {
    const PATTERN: &[u8] = b"0123456789abcdef";
    let mut buf = vec![0u8; 256 * 1024];
    // Position in the current line, and whether it still matches.
    let (mut at, mut good) = (0usize, true);
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &byte in &buf[..n] {
            if byte == b'\n' {
                if !(good && at == LINE_LEN) {
                    received.bad_lines.fetch_add(1, Ordering::Relaxed);
                }
                (at, good) = (0, true);
            } else {
                good &= at < LINE_LEN && byte == PATTERN[at % PATTERN.len()];
                at += 1;
            }
        }
        received.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Total size of the files in `dir` and its subdirectories (0 if unreadable).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// 3. memory per stream

/// cloudcore's and edgecore's memory around `streams` concurrent follows.
#[derive(Debug, Clone, Copy)]
struct StreamFigures {
    streams: usize,
    /// Seconds from the first `kubectl logs -f` start until every one had a line.
    open_s: f64,
    cloud_before_kib: u64,
    cloud_open_kib: u64,
    cloud_after_kib: u64,
    edge_before_kib: u64,
    edge_open_kib: u64,
    edge_after_kib: u64,
    /// The open-stream gauges while every follow was open (`None`: not served).
    cloud_gauge_open: Option<f64>,
    edge_gauge_open: Option<f64>,
    /// Seconds from the SIGKILL of the first reader until both gauges were back to what they
    /// showed before (`None`: a gauge is not served); polled every 20 ms once every kubectl
    /// was reaped.
    release_s: Option<f64>,
}

impl StreamFigures {
    /// KiB per stream from a before and an open reading.
    fn per_stream(&self, before: u64, open: u64) -> f64 {
        (open as f64 - before as f64) / self.streams as f64
    }

    fn cloud_per_stream_kib(&self) -> f64 {
        self.per_stream(self.cloud_before_kib, self.cloud_open_kib)
    }

    fn edge_per_stream_kib(&self) -> f64 {
        self.per_stream(self.edge_before_kib, self.edge_open_kib)
    }

    fn to_json(self) -> Value {
        json!({
            "streams": self.streams,
            "all_delivering_after_s": self.open_s,
            "cloudcore": {
                "vm_rss_kib_before": self.cloud_before_kib,
                "vm_rss_kib_open": self.cloud_open_kib,
                "vm_rss_kib_after_close": self.cloud_after_kib,
                "kib_per_stream": self.cloud_per_stream_kib(),
                "streams_open_gauge": self.cloud_gauge_open,
            },
            "edgecore": {
                "vm_rss_kib_before": self.edge_before_kib,
                "vm_rss_kib_open": self.edge_open_kib,
                "vm_rss_kib_after_close": self.edge_after_kib,
                "kib_per_stream": self.edge_per_stream_kib(),
                "streams_open_gauge": self.edge_gauge_open,
            },
            "released_after_s": self.release_s,
        })
    }
}

/// One `kubectl logs -f` of the ticker: the last tick number it printed (-1 before any).
struct Follower {
    child: tokio::process::Child,
    last_tick: Arc<AtomicI64>,
    reading: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.reading.abort();
    }
}

async fn memory_per_stream(cli: &Cli, site: &Site) -> Result<StreamFigures> {
    site.run_pod(TICKER, TICKER_COMMAND).await?;
    let (cloud, edge) = (site.cloud_pid()?, site.edge_pid()?);
    tokio::time::sleep(SETTLE).await;
    let gauges_before = site.streams_open().await;
    let (cloud_before_kib, edge_before_kib) = (bench::rss_kib(cloud)?, bench::rss_kib(edge)?);

    let started = Instant::now();
    let mut followers = Vec::with_capacity(cli.streams);
    let outcome = async {
        for _ in 0..cli.streams {
            let mut child = site
                .kubectl(&["logs", "-f", TICKER, "-c", CONTAINER])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot run kubectl logs -f")?;
            let stdout = child.stdout.take().context("kubectl has no stdout")?;
            let last_tick = Arc::new(AtomicI64::new(-1));
            let reading = tokio::spawn(follow_ticks(stdout, last_tick.clone()));
            followers.push(Follower {
                child,
                last_tick,
                reading,
            });
            tokio::time::sleep(SPAWN_PACE).await;
        }
        // Every follower has printed a line, then one written after that moment: all are live.
        wait_ticks(&mut followers, |_| 0, STREAMS_OPEN_TIMEOUT).await?;
        let newest = followers
            .iter()
            .map(|f| f.last_tick.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        wait_ticks(&mut followers, |_| newest + 1, STREAMS_OPEN_TIMEOUT).await?;
        let open_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let (cloud_open_kib, edge_open_kib) = (bench::rss_kib(cloud)?, bench::rss_kib(edge)?);
        let gauges_open = site.streams_open().await;
        // Still live after the settle.
        let newest = followers
            .iter()
            .map(|f| f.last_tick.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        wait_ticks(&mut followers, |_| newest, Duration::from_secs(10)).await?;
        anyhow::Ok((open_s, cloud_open_kib, edge_open_kib, gauges_open))
    }
    .await;
    // Close them all, then see both sides let go.
    let closed = Instant::now();
    for follower in &mut followers {
        let _ = follower.child.start_kill();
    }
    for follower in &mut followers {
        let _ = follower.child.wait().await;
    }
    let stderrs = collect_stderr(&mut followers).await;
    drop(followers);
    let (open_s, cloud_open_kib, edge_open_kib, gauges_open) =
        outcome.with_context(|| format!("kubectl said: {stderrs}"))?;
    let release_s = match (gauges_before, gauges_open) {
        ((Some(cloud_was), Some(edge_was)), (Some(_), Some(_))) => {
            let deadline = closed + RELEASE_TIMEOUT;
            loop {
                let (cloud_now, edge_now) = site.streams_open().await;
                if cloud_now == Some(cloud_was) && edge_now == Some(edge_was) {
                    break Some(closed.elapsed().as_secs_f64());
                }
                ensure!(
                    Instant::now() < deadline,
                    "{RELEASE_TIMEOUT:?} after every kubectl was killed the open streams are \
                     {CLOUD_STREAMS_OPEN}={cloud_now:?}, {EDGE_STREAMS_OPEN}={edge_now:?} \
                     (were {cloud_was} and {edge_was} before)"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        _ => None,
    };
    tokio::time::sleep(SETTLE).await;
    let figures = StreamFigures {
        streams: cli.streams,
        open_s,
        cloud_before_kib,
        cloud_open_kib,
        cloud_after_kib: bench::rss_kib(cloud)?,
        edge_before_kib,
        edge_open_kib,
        edge_after_kib: bench::rss_kib(edge)?,
        cloud_gauge_open: gauges_open.0,
        edge_gauge_open: gauges_open.1,
        release_s,
    };
    site.delete_pod(TICKER).await?;
    Ok(figures)
}

/// Reads `tick N` lines, keeping the last N.
async fn follow_ticks(stdout: tokio::process::ChildStdout, last_tick: Arc<AtomicI64>) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(n) = line.strip_prefix("tick ").and_then(|n| n.parse().ok()) {
            last_tick.store(n, Ordering::Relaxed);
        }
    }
}

/// Waits until every follower printed a tick at least `at_least(index)`; an error naming how
/// many did not (and failing at once when a kubectl exits).
async fn wait_ticks(
    followers: &mut [Follower],
    at_least: impl Fn(usize) -> i64,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut behind = 0;
        for (index, follower) in followers.iter_mut().enumerate() {
            if let Some(status) = follower.child.try_wait()? {
                bail!("kubectl logs -f number {index} exited ({status})");
            }
            if follower.last_tick.load(Ordering::Relaxed) < at_least(index) {
                behind += 1;
            }
        }
        if behind == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{behind} of {} kubectl logs -f had not printed the expected tick within {within:?}",
            followers.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The distinct stderr texts of the followers (after they exited), one per line.
async fn collect_stderr(followers: &mut [Follower]) -> String {
    let mut texts = std::collections::BTreeSet::new();
    for follower in followers {
        if let Some(mut pipe) = follower.child.stderr.take() {
            let mut text = String::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(1), pipe.read_to_string(&mut text)).await;
            let text = text.trim();
            if !text.is_empty() {
                texts.insert(text.to_string());
            }
        }
    }
    texts.into_iter().collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------------------------------------
// Figures

/// p50, p99 and mean of milliseconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
    n: usize,
}

impl Stats {
    fn of(values: &[f64]) -> Stats {
        let mut sorted: Vec<Duration> = values
            .iter()
            .map(|v| Duration::from_secs_f64(v.max(0.0) / 1000.0))
            .collect();
        sorted.sort();
        Stats {
            p50: ms(percentile(&sorted, 0.5)),
            p99: ms(percentile(&sorted, 0.99)),
            mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
            n: values.len(),
        }
    }

    fn to_json(self) -> Value {
        json!({ "p50_ms": self.p50, "p99_ms": self.p99, "mean_ms": self.mean, "n": self.n })
    }
}

struct Figures {
    exec: ExecFigures,
    logs: LogFigures,
    streams: StreamFigures,
}

struct Report {
    settings: Value,
    machine: Machine,
    figures: Figures,
}

impl Report {
    fn exec_stats(&self) -> [(ExecKind, Stats); 4] {
        let e = &self.figures.exec;
        [
            (ExecKind::Kubectl, Stats::of(&e.kubectl)),
            (ExecKind::Ctl, Stats::of(&e.ctl)),
            (ExecKind::Raw, Stats::of(&e.raw)),
            (ExecKind::KubectlGet, Stats::of(&e.kubectl_get)),
        ]
    }

    /// p50 ratios: kubectl exec / raw ExecSync, kubectl exec / ctl exec, ctl exec / raw, and
    /// kubectl exec − kubectl get (ms: what the stream adds to a kubectl that does a request).
    fn ratios(&self) -> Value {
        let [(_, kubectl), (_, ctl), (_, raw), (_, get)] = self.exec_stats();
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        json!({
            "kubectl_exec_over_raw_exec_sync": ratio(kubectl.p50, raw.p50),
            "kubectl_exec_over_ctl_exec": ratio(kubectl.p50, ctl.p50),
            "ctl_exec_over_raw_exec_sync": ratio(ctl.p50, raw.p50),
            "kubectl_exec_minus_kubectl_get_ms": kubectl.p50 - get.p50,
        })
    }
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        out.push_str(&format!(
            "machine: {} CPUs ({}), {} MiB, kernel {}\nkubectl: {} ({}), running {}\n\n",
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel,
            self.settings["kubectl"].as_str().unwrap_or("?"),
            self.settings["kubectl_version"]
                .as_str()
                .unwrap_or("version unknown"),
            self.figures
                .logs
                .kubectl_binary
                .as_deref()
                .unwrap_or("an unknown binary"),
        ));
        out.push_str("exec round trip of `true` (ms)            p50      p99     mean    n\n");
        for (kind, s) in self.exec_stats() {
            let name = match kind {
                ExecKind::Kubectl => "kubectl exec POD -- true (tunnel)",
                ExecKind::Ctl => "edgecore ctl exec POD -- true",
                ExecKind::Raw => "CRI ExecSync (raw, in-process)",
                ExecKind::KubectlGet => "kubectl get pod (no stream)",
            };
            out.push_str(&format!(
                "  {name:<38} {:>7.1}  {:>7.1}  {:>7.1}  {:>3}\n",
                s.p50, s.p99, s.mean, s.n
            ));
        }
        let r = self.ratios();
        out.push_str(&format!(
            "  p50 ratios: kubectl exec / raw {:.1}x, kubectl exec / ctl exec {:.1}x, \
             ctl exec / raw {:.1}x; kubectl exec - kubectl get {:+.1} ms\n\n",
            r["kubectl_exec_over_raw_exec_sync"].as_f64().unwrap_or(0.0),
            r["kubectl_exec_over_ctl_exec"].as_f64().unwrap_or(0.0),
            r["ctl_exec_over_raw_exec_sync"].as_f64().unwrap_or(0.0),
            r["kubectl_exec_minus_kubectl_get_ms"]
                .as_f64()
                .unwrap_or(0.0),
        ));
        let l = &self.figures.logs;
        out.push_str(&format!(
            "kubectl logs -f of a fast writer, {:.1} s window\n  received {:.1} MB/s \
             (each second: median {:.1}, {:.1} … {:.1}); log file grew {:.1} MB/s, CRI \
             prefixes included\n",
            l.window.as_secs_f64(),
            l.received_mb_s(),
            l.per_second.median,
            l.per_second.min,
            l.per_second.max,
            l.written_mb_s()
        ));
        for (name, cpu) in [
            ("cloudcore", l.cloud_cpu),
            ("edgecore", l.edge_cpu),
            ("kubectl", l.kubectl_cpu),
        ] {
            out.push_str(&format!(
                "  {name:<10} CPU {:>6.1} % of a core, {:>6.2} CPU-ms per MB\n",
                l.percent(cpu),
                l.ms_per_mb(cpu)
            ));
        }
        if let Some(cpu) = l.containerd_cpu {
            out.push_str(&format!(
                "  containerd CPU {:>6.1} % of a core (writing the log)\n",
                l.percent(cpu)
            ));
        }
        let s = &self.figures.streams;
        out.push_str(&format!(
            "\n{} concurrent kubectl logs -f (all delivering after {:.1} s)\n",
            s.streams, s.open_s
        ));
        out.push_str("               RSS before   with streams   after close   per stream\n");
        for (name, before, open, after, per) in [
            (
                "cloudcore",
                s.cloud_before_kib,
                s.cloud_open_kib,
                s.cloud_after_kib,
                s.cloud_per_stream_kib(),
            ),
            (
                "edgecore",
                s.edge_before_kib,
                s.edge_open_kib,
                s.edge_after_kib,
                s.edge_per_stream_kib(),
            ),
        ] {
            out.push_str(&format!(
                "  {name:<10} {:>9.1} MiB {:>10.1} MiB {:>10.1} MiB {:>8.1} KiB\n",
                mib(before),
                mib(open),
                mib(after),
                per
            ));
        }
        out.push_str(&format!(
            "  open-stream gauges while open: {CLOUD_STREAMS_OPEN}={}, {EDGE_STREAMS_OPEN}={}; \
             back after the readers were killed: {}\n",
            gauge(s.cloud_gauge_open),
            gauge(s.edge_gauge_open),
            s.release_s
                .map_or("not measured (no gauge)".into(), |t| format!("{:.2} s", t)),
        ));
        out
    }

    fn to_json(&self) -> Value {
        let exec: serde_json::Map<String, Value> = self
            .exec_stats()
            .into_iter()
            .map(|(kind, s)| {
                let name = match kind {
                    ExecKind::Kubectl => "kubectl_exec",
                    ExecKind::Ctl => "ctl_exec",
                    ExecKind::Raw => "raw_exec_sync",
                    ExecKind::KubectlGet => "kubectl_get",
                };
                (name.to_string(), s.to_json())
            })
            .collect();
        json!({
            "settings": self.settings,
            "machine": self.machine.to_json(),
            "exec": exec,
            "exec_p50_ratios": self.ratios(),
            "logs": self.figures.logs.to_json(),
            "streams": self.figures.streams.to_json(),
        })
    }
}

fn gauge(value: Option<f64>) -> String {
    value.map_or("not served".into(), |v| format!("{v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_line_checker_counts_only_the_writers_lines() {
        let line = "0123456789abcdef".repeat(LINE_LEN / 16);
        let text = format!(
            "{line}\n{line}\nshort\n{}X\n{line}\n",
            &line[..LINE_LEN - 1]
        );
        let mut child = tokio::process::Command::new("printf")
            .args(["%s", &text])
            .stdout(Stdio::piped())
            .spawn()
            .expect("printf runs");
        let received = Arc::new(Received::default());
        count_lines(child.stdout.take().expect("stdout"), received.clone()).await;
        let _ = child.wait().await;
        assert_eq!(received.bytes.load(Ordering::Relaxed), text.len() as u64);
        assert_eq!(received.bad_lines.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn stats_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&values);
        assert_eq!((s.p50, s.p99, s.n), (50.0, 99.0, 100));
        assert!((s.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn per_stream_memory_is_the_difference_over_the_streams() {
        let s = StreamFigures {
            streams: 100,
            open_s: 1.0,
            cloud_before_kib: 10_000,
            cloud_open_kib: 15_000,
            cloud_after_kib: 10_500,
            edge_before_kib: 8_000,
            edge_open_kib: 7_900,
            edge_after_kib: 8_000,
            cloud_gauge_open: Some(100.0),
            edge_gauge_open: None,
            release_s: None,
        };
        assert_eq!(s.cloud_per_stream_kib(), 50.0);
        assert_eq!(s.edge_per_stream_kib(), -1.0);
    }
}
