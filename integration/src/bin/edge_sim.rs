//! `edge-sim`: N simulated edges (`integration::sim`) on one real `cloudcore serve`, spread
//! over `--processes` worker processes (this binary re-executed as `edge-sim worker`), then a
//! reconnect storm. Everything runs on 127.0.0.1 and stops by itself.
//!
//! Phases: start cloudcore (embedded; `--kube` against a fresh control plane) → join the
//! edges through one token with `--uses N` from the real CLI (or reuse the identities in
//! `--identities DIR`, which also keeps cloudcore's data dir) → create the desired set through
//! the API (`--pods-per-edge` pods bound with `spec.nodeName`, each with a ConfigMap and a
//! Secret) → start the workers → measure the connect (handshakes/s, resync objects/s, time
//! until every Node is Ready), cloudcore's RSS and CPU at rest and under churn → kill -9
//! cloudcore and restart it on the same data dir: time until every edge is back and resynced,
//! Nodes that left Ready, pods deleted or re-created. A table on stdout, or JSON with `--json`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use integration::bench::{self, Machine, mib};
use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::sim::{self, Fleet, FleetConfig, ReadyWatch, Snapshot};
use integration::{Cloud, kube_client};
use serde_json::{Value, json};

const NAMESPACE: &str = "sim";
/// Every simulated edge dials from 127.0.0.1: the per-address share must not be what limits.
const CLOUD_FLAGS: &[&str] = &["--max-handshakes-per-address", "1000000"];
/// How often a worker prints its counters.
const REPORT_EVERY: Duration = Duration::from_millis(500);

#[derive(Parser, Debug)]
#[command(
    name = "edge-sim",
    about = "Simulated edges on one cloudcore: connect, churn, and a kill -9 reconnect storm"
)]
struct Cli {
    /// Simulated edges.
    #[arg(long, default_value_t = 10_000)]
    edges: usize,
    /// Worker processes the edges are spread over.
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// Pods bound to each edge, each with its own ConfigMap and Secret.
    #[arg(long, default_value_t = 3)]
    pods_per_edge: usize,
    /// Keep cloudcore's data dir and the edges' identities here, and reuse them on the next
    /// run (joining 10,000 nodes takes about a minute). Embedded mode only.
    #[arg(long)]
    identities: Option<PathBuf>,
    /// Against a fresh real control plane (`../shared/k8s`) instead of the embedded API.
    #[arg(long)]
    kube: bool,
    /// Pod status changes per edge per minute during the churn phase.
    #[arg(long, default_value_t = 6.0)]
    churn_per_min: f64,
    /// Seconds of churn measured.
    #[arg(long, default_value_t = 30)]
    churn_secs: u64,
    /// Seconds at rest measured.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// First dials in flight at once per worker.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Sessions sharing one client UDP socket.
    #[arg(long, default_value_t = 50)]
    edges_per_endpoint: usize,
    /// Objects created through the API at once.
    #[arg(long, default_value_t = 32)]
    create_concurrency: usize,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// Give up after this many seconds in total.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `edge-sim worker`: one process's share of the fleet; prints a JSON [`Snapshot`] line every
/// 500 ms, reads `churn X` lines on stdin, stops when stdin closes.
#[derive(Parser, Debug)]
#[command(name = "edge-sim worker")]
struct WorkerCli {
    #[arg(long)]
    address: String,
    #[arg(long)]
    edges_dir: PathBuf,
    /// Node names, comma-separated.
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    #[arg(long)]
    pods_per_edge: usize,
    #[arg(long)]
    connect_concurrency: usize,
    #[arg(long)]
    edges_per_endpoint: usize,
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        let cli = match WorkerCli::try_parse_from(std::env::args().skip(1)) {
            Ok(cli) => cli,
            Err(e) => {
                let _ = e.print();
                return ExitCode::from(64);
            }
        };
        bench::init_tracing();
        return match tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(worker(cli)))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--edges", c.edges),
            ("--processes", c.processes),
            ("--connect-concurrency", c.connect_concurrency),
            ("--edges-per-endpoint", c.edges_per_endpoint),
            ("--create-concurrency", c.create_concurrency),
        ]
    }) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.kube && cli.identities.is_some() {
        eprintln!(
            "error: --identities cannot be used with --kube: every run starts a fresh control plane with a new CA, so kept identities would not be trusted"
        );
        return ExitCode::from(64);
    }
    if !(cli.churn_per_min.is_finite() && cli.churn_per_min >= 0.0) {
        eprintln!("error: --churn-per-min must be a number ≥ 0");
        return ExitCode::from(64);
    }
    bench::init_tracing();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| {
            rt.block_on(async {
                let limit = Duration::from_secs(cli.timeout_secs);
                match tokio::time::timeout(limit, run(&cli)).await {
                    Ok(r) => r,
                    Err(_) => bail!("gave up after {} s (--timeout-secs)", cli.timeout_secs),
                }
            })
        });
    bench::finish(result, cli.json)
}

async fn worker(cli: WorkerCli) -> Result<()> {
    let dirs: Vec<PathBuf> = cli.names.iter().map(|n| cli.edges_dir.join(n)).collect();
    let fleet = Fleet::start(
        &dirs,
        FleetConfig {
            address: cli.address,
            pods_per_edge: cli.pods_per_edge,
            edges_per_endpoint: cli.edges_per_endpoint,
            connect_concurrency: cli.connect_concurrency,
            backoff: edgecore::backoff::Backoff::default(),
        },
    )
    .await?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut tick = tokio::time::interval(REPORT_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{}", fleet.snapshot().to_json()).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            line = lines.recv() => match line {
                None => break,
                Some(line) => {
                    if let Some(rate) = line.strip_prefix("churn ").and_then(|r| r.trim().parse().ok()) {
                        fleet.set_churn(rate);
                    }
                }
            },
        }
    }
    fleet.stop().await;
    Ok(())
}

/// The worker processes and their latest counters.
struct Workers {
    children: Vec<(Child, ChildStdin)>,
    latest: Arc<Mutex<Vec<Snapshot>>>,
}

impl Workers {
    fn start(cli: &Cli, address: &str, edges_dir: &Path, names: &[String]) -> Result<Workers> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let per = names.len().div_ceil(cli.processes);
        let latest = Arc::new(Mutex::new(Vec::new()));
        let mut children = Vec::new();
        for (index, share) in names.chunks(per).enumerate() {
            let mut child = std::process::Command::new(&exe)
                .arg("worker")
                .args(["--address", address])
                .arg("--edges-dir")
                .arg(edges_dir)
                .args(["--names", &share.join(",")])
                .args(["--pods-per-edge", &cli.pods_per_edge.to_string()])
                .args([
                    "--connect-concurrency",
                    &cli.connect_concurrency.to_string(),
                ])
                .args(["--edges-per-endpoint", &cli.edges_per_endpoint.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start a worker")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Snapshot::default());
            let latest = latest.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let Some(snapshot) = serde_json::from_str::<Value>(&line)
                        .ok()
                        .and_then(|v| Snapshot::from_json(&v))
                    else {
                        continue;
                    };
                    latest.lock().unwrap_or_else(|p| p.into_inner())[index] = snapshot;
                }
            });
            children.push((child, stdin));
        }
        Ok(Workers { children, latest })
    }

    fn total(&self) -> Snapshot {
        Snapshot::sum(self.latest.lock().unwrap_or_else(|p| p.into_inner()).iter())
    }

    fn churn(&mut self, per_minute: f64) {
        for (_, stdin) in &mut self.children {
            let _ = writeln!(stdin, "churn {per_minute}");
            let _ = stdin.flush();
        }
    }

    /// The workers' RSS summed, in KiB.
    fn rss_kib(&self) -> u64 {
        self.children
            .iter()
            .filter_map(|(c, _)| bench::rss_kib(c.id()).ok())
            .sum()
    }

    fn check_running(&mut self) -> Result<()> {
        for (child, _) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("worker pid {} exited ({status})", child.id());
            }
        }
        Ok(())
    }

    /// Closes every worker's stdin and waits for them (kills those that do not stop).
    fn stop(mut self) {
        let mut children = Vec::new();
        for (child, stdin) in std::mem::take(&mut self.children) {
            drop(stdin);
            children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for mut child in children {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_for(
    what: &str,
    within: Duration,
    workers: &mut Workers,
    mut done: impl FnMut(&Snapshot) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        workers.check_running()?;
        let now = workers.total();
        if done(&now) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < within,
            "{what}: not within {within:?} ({now:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU share (1.0 = one core) and RSS of `pid` over `span`.
async fn usage(pid: u32, span: Duration) -> Result<(f64, u64)> {
    let cpu0 = bench::cpu_time(pid)?;
    tokio::time::sleep(span).await;
    let cpu1 = bench::cpu_time(pid)?;
    Ok((
        (cpu1 - cpu0).as_secs_f64() / span.as_secs_f64(),
        bench::rss_kib(pid)?,
    ))
}

async fn run(cli: &Cli) -> Result<Report> {
    let binary = bench::cloudcore_binary(cli.cloudcore.as_ref())?;
    let temp = tempfile::Builder::new().prefix("edge-sim-").tempdir()?;
    let dir = cli
        .identities
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cluster = if cli.kube {
        let k8s = dir.join("k8s");
        // `KubeCluster::start` panics saying what is missing or failed.
        let started = tokio::task::spawn_blocking(move || {
            KubeCluster::start(
                &k8s,
                &ClusterOptions {
                    components: Components::All,
                    ..ClusterOptions::default()
                },
            )
        })
        .await;
        Some(started.map_err(|_| anyhow::anyhow!("the control plane did not start (see above)"))?)
    } else {
        None
    };
    let mut cloud = match &cluster {
        Some(cluster) => {
            let credentials = cluster.cloudcore_credentials(|rbac| rbac);
            Cloud::start_kube_binary(
                &binary,
                &dir,
                cluster,
                &credentials,
                std::net::Ipv4Addr::LOCALHOST.into(),
                CLOUD_FLAGS,
            )?
        }
        None => Cloud::start_binary(&binary, &dir, CLOUD_FLAGS)?,
    };
    let outcome = measure(cli, &binary, &mut cloud, &dir).await;
    if outcome.is_err() {
        let log = cloud.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "last lines of the cloudcore log:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
    drop(cloud);
    drop(cluster);
    outcome
}

async fn measure(cli: &Cli, binary: &Path, cloud: &mut Cloud, dir: &Path) -> Result<Report> {
    let machine = Machine::read();
    let edges_dir = dir.join("edges");
    let names: Vec<String> = (0..cli.edges)
        .map(|i| bench::node_name(cli.edges, i))
        .collect();
    // Join the nodes that have no identity yet.
    let missing: Vec<String> = names
        .iter()
        .filter(|n| edgecore::identity::load(&edges_dir.join(n)).is_err())
        .cloned()
        .collect();
    let mut join_secs = None;
    if !missing.is_empty() {
        eprintln!("joining {} nodes", missing.len());
        let token = bench::create_token(binary, cloud, missing.len()).await?;
        let began = Instant::now();
        bench::join_edges(&token, &missing, &edges_dir, 16).await?;
        join_secs = Some((missing.len(), began.elapsed().as_secs_f64()));
    }
    let client = kube_client(&cloud.kubeconfig()).await?;
    eprintln!(
        "creating the desired set ({} pods per edge)",
        cli.pods_per_edge
    );
    let began = Instant::now();
    sim::create_desired_set(
        &client,
        NAMESPACE,
        &names,
        cli.pods_per_edge,
        cli.create_concurrency,
    )
    .await?;
    let create_secs = began.elapsed().as_secs_f64();
    let pid = cloud.pid().context("cloudcore is not running")?;
    let (cpu_empty, rss_empty_kib) = usage(pid, Duration::from_secs(3)).await?;

    eprintln!(
        "starting {} edges in {} processes",
        cli.edges, cli.processes
    );
    let watch = ReadyWatch::start(&client);
    let n = cli.edges as u64;
    let mut workers = Workers::start(cli, &cloud.address(), &edges_dir, &names)?;
    let connect = Duration::from_secs(cli.timeout_secs);
    let connected = wait_for("every edge connected", connect, &mut workers, |s| {
        s.connected == n
    })
    .await?;
    let resynced = wait_for("every edge resynced", connect, &mut workers, |s| {
        s.resynced == n
    })
    .await?
        + connected;
    let synced = workers.total();
    let ready_began = Instant::now();
    while watch.ready() < cli.edges {
        workers.check_running()?;
        ensure!(
            ready_began.elapsed() < connect,
            "only {} of {} Nodes Ready",
            watch.ready(),
            cli.edges
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready = connected.max(resynced) + ready_began.elapsed();
    eprintln!(
        "all connected in {connected:?}, resynced in {resynced:?}, Ready in {all_ready:?}; at rest"
    );
    // Let the first Node writes and lease creations finish before measuring rest.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cpu_idle, rss_idle_kib) = usage(pid, Duration::from_secs(cli.idle_secs)).await?;
    let workers_rss_kib = workers.rss_kib();

    eprintln!(
        "churn: {} status changes per edge per minute",
        cli.churn_per_min
    );
    workers.churn(cli.churn_per_min);
    let statuses0 = workers.total().statuses_sent;
    let (cpu_churn, rss_churn_kib) = usage(pid, Duration::from_secs(cli.churn_secs)).await?;
    let statuses = workers.total().statuses_sent - statuses0;
    workers.churn(0.0);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The storm. Nodes that left Ready before it (at the first start, a kept data dir's Nodes
    // whose edges were gone since the last run) are counted apart: they are no false NotReady.
    let left_ready_before_storm = watch.left_ready().len();
    let uids = sim::pod_uids(&client, NAMESPACE).await?;
    let before = workers.total();
    eprintln!("kill -9 cloudcore pid {pid}");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -9 {pid} failed");
    wait_for(
        "the edges notice",
        Duration::from_secs(60),
        &mut workers,
        |s| s.connected < n,
    )
    .await?;
    let restart_began = Instant::now();
    tokio::task::block_in_place(|| cloud.try_restart_with(CLOUD_FLAGS))?;
    let restarted = restart_began.elapsed();
    let storm_limit = Duration::from_secs(300);
    let back = wait_for("every edge back", storm_limit, &mut workers, |s| {
        s.connected == n && s.hello_acks >= before.hello_acks + n
    })
    .await?
        + restarted;
    let storm_resynced = wait_for("every edge resynced", storm_limit, &mut workers, |s| {
        s.resynced == n
    })
    .await?
        + back;
    let after_storm = workers.total();
    eprintln!("storm: back in {back:?}, resynced in {storm_resynced:?}; settling");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pid2 = cloud.pid().context("cloudcore is not running")?;
    let rss_after_storm_kib = bench::rss_kib(pid2)?;
    let end = workers.total();
    let uids_after = sim::pod_uids(&client, NAMESPACE).await?;
    let recreated = uids
        .iter()
        .filter(|(name, uid)| uids_after.get(*name) != Some(*uid))
        .count();
    let left_ready: Vec<_> = watch
        .left_ready()
        .into_iter()
        .skip(left_ready_before_storm)
        .collect();
    let ready_at_end = watch.ready();
    workers.stop();
    Ok(Report {
        edges: cli.edges,
        processes: cli.processes,
        pods_per_edge: cli.pods_per_edge,
        kube: cli.kube,
        churn_per_min: cli.churn_per_min,
        machine,
        join: join_secs,
        create_secs,
        objects: cli.edges * cli.pods_per_edge * 3,
        cpu_empty,
        rss_empty_kib,
        connected,
        resynced,
        all_ready,
        initial_upserts: synced.upserts,
        cpu_idle,
        rss_idle_kib,
        workers_rss_kib,
        cpu_churn,
        rss_churn_kib,
        statuses_per_sec: statuses as f64 / cli.churn_secs as f64,
        restart: restarted,
        back,
        storm_resynced,
        storm_upserts: after_storm.upserts - before.upserts,
        storm_dial_failures: after_storm.dial_failures - before.dial_failures,
        storm_busy_refusals: after_storm.busy_refusals - before.busy_refusals,
        rss_after_storm_kib,
        left_ready_before_storm,
        left_ready,
        ready_at_end,
        pod_deletes: end.pod_deletes,
        pod_restarts: end.pod_restarts,
        recreated,
    })
}

struct Report {
    edges: usize,
    processes: usize,
    pods_per_edge: usize,
    kube: bool,
    churn_per_min: f64,
    machine: Machine,
    join: Option<(usize, f64)>,
    create_secs: f64,
    objects: usize,
    cpu_empty: f64,
    rss_empty_kib: u64,
    connected: Duration,
    resynced: Duration,
    all_ready: Duration,
    initial_upserts: u64,
    cpu_idle: f64,
    rss_idle_kib: u64,
    /// The simulator's worker processes at rest.
    workers_rss_kib: u64,
    cpu_churn: f64,
    rss_churn_kib: u64,
    statuses_per_sec: f64,
    restart: Duration,
    back: Duration,
    storm_resynced: Duration,
    storm_upserts: u64,
    storm_dial_failures: u64,
    storm_busy_refusals: u64,
    rss_after_storm_kib: u64,
    /// Nodes that left Ready before cloudcore was killed (the first start).
    left_ready_before_storm: usize,
    /// Nodes that left Ready from the kill on.
    left_ready: Vec<(String, String)>,
    ready_at_end: usize,
    pod_deletes: u64,
    pod_restarts: u64,
    recreated: usize,
}

impl Report {
    fn kib_per_edge(&self, rss: u64) -> f64 {
        (rss as f64 - self.rss_empty_kib as f64) / self.edges as f64
    }
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "edge-sim: {} edges in {} processes, {} pods per edge (+ ConfigMap + Secret each), {} mode\n\
             machine: {} CPUs ({}), {} MiB, Linux {}\n\n",
            self.edges,
            self.processes,
            self.pods_per_edge,
            if self.kube { "kube" } else { "embedded" },
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel
        );
        if let Some((n, secs)) = self.join {
            out.push_str(&format!(
                "join                {n} nodes in {secs:.1} s = {:.0} joins/s\n",
                n as f64 / secs
            ));
        }
        let rows = [
            (
                "create desired set",
                format!(
                    "{} objects in {:.1} s = {:.0} objects/s",
                    self.objects,
                    self.create_secs,
                    self.objects as f64 / self.create_secs
                ),
            ),
            (
                "cloudcore, no edge",
                format!(
                    "RSS {:.1} MiB, CPU {:.0} %",
                    mib(self.rss_empty_kib),
                    self.cpu_empty * 100.0
                ),
            ),
            (
                "all connected",
                format!(
                    "{:.1} s = {:.0} handshakes/s",
                    self.connected.as_secs_f64(),
                    self.edges as f64 / self.connected.as_secs_f64()
                ),
            ),
            (
                "all resynced",
                format!(
                    "{:.1} s ({} objects sent = {:.0} objects/s)",
                    self.resynced.as_secs_f64(),
                    self.initial_upserts,
                    self.initial_upserts as f64 / self.resynced.as_secs_f64()
                ),
            ),
            (
                "all Nodes Ready",
                format!("{:.1} s", self.all_ready.as_secs_f64()),
            ),
            (
                "at rest",
                format!(
                    "RSS {:.1} MiB = {:.1} KiB per edge, CPU {:.0} % = {:.1} µs/s per edge",
                    mib(self.rss_idle_kib),
                    self.kib_per_edge(self.rss_idle_kib),
                    self.cpu_idle * 100.0,
                    self.cpu_idle * 1e6 / self.edges as f64
                ),
            ),
            (
                "simulator at rest",
                format!(
                    "RSS {:.1} MiB = {:.1} KiB per simulated edge",
                    mib(self.workers_rss_kib),
                    self.workers_rss_kib as f64 / self.edges as f64
                ),
            ),
            (
                "under churn",
                format!(
                    "{} changes/edge/min = {:.0} statuses/s: RSS {:.1} MiB = {:.1} KiB per edge, CPU {:.0} %",
                    self.churn_per_min,
                    self.statuses_per_sec,
                    mib(self.rss_churn_kib),
                    self.kib_per_edge(self.rss_churn_kib),
                    self.cpu_churn * 100.0
                ),
            ),
            (
                "storm: restart",
                format!(
                    "cloudcore healthy {:.1} s after kill -9",
                    self.restart.as_secs_f64()
                ),
            ),
            (
                "storm: all back",
                format!(
                    "{:.1} s after the restart began ({} failed dials, {} of them refused as busy)",
                    self.back.as_secs_f64(),
                    self.storm_dial_failures,
                    self.storm_busy_refusals
                ),
            ),
            (
                "storm: all resynced",
                format!(
                    "{:.1} s ({} objects sent again)",
                    self.storm_resynced.as_secs_f64(),
                    self.storm_upserts
                ),
            ),
            (
                "storm: false NotReady",
                format!(
                    "{} Nodes left Ready from the kill on ({} before it, at the first start; {} of {} Ready at the end){}",
                    self.left_ready.len(),
                    self.left_ready_before_storm,
                    self.ready_at_end,
                    self.edges,
                    if self.left_ready.is_empty() {
                        String::new()
                    } else {
                        let shown: Vec<String> = self
                            .left_ready
                            .iter()
                            .take(5)
                            .map(|(node, to)| format!("{node} → {to:?}"))
                            .collect();
                        format!(", e.g. {}", shown.join(", "))
                    }
                ),
            ),
            (
                "storm: pods",
                format!(
                    "{} deleted at an edge, {} sent again, {} re-created in the API",
                    self.pod_deletes, self.pod_restarts, self.recreated
                ),
            ),
            (
                "after the storm",
                format!("RSS {:.1} MiB", mib(self.rss_after_storm_kib)),
            ),
        ];
        for (name, value) in rows {
            out.push_str(&format!("{name:<22}{value}\n"));
        }
        out
    }

    fn to_json(&self) -> Value {
        json!({
            "edges": self.edges,
            "processes": self.processes,
            "pods_per_edge": self.pods_per_edge,
            "mode": if self.kube { "kube" } else { "embedded" },
            "machine": self.machine.to_json(),
            "join": self.join.map(|(n, s)| json!({"nodes": n, "secs": s})),
            "create_secs": self.create_secs,
            "objects": self.objects,
            "rss_empty_kib": self.rss_empty_kib,
            "cpu_empty": self.cpu_empty,
            "connected_s": self.connected.as_secs_f64(),
            "handshakes_per_sec": self.edges as f64 / self.connected.as_secs_f64(),
            "resynced_s": self.resynced.as_secs_f64(),
            "initial_upserts": self.initial_upserts,
            "all_ready_s": self.all_ready.as_secs_f64(),
            "rss_idle_kib": self.rss_idle_kib,
            "kib_per_idle_edge": self.kib_per_edge(self.rss_idle_kib),
            "cpu_idle": self.cpu_idle,
            "workers_rss_kib": self.workers_rss_kib,
            "churn_per_min": self.churn_per_min,
            "statuses_per_sec": self.statuses_per_sec,
            "rss_churn_kib": self.rss_churn_kib,
            "cpu_churn": self.cpu_churn,
            "storm": {
                "restart_s": self.restart.as_secs_f64(),
                "back_s": self.back.as_secs_f64(),
                "resynced_s": self.storm_resynced.as_secs_f64(),
                "upserts": self.storm_upserts,
                "dial_failures": self.storm_dial_failures,
                "busy_refusals": self.storm_busy_refusals,
                "left_ready": self.left_ready.len(),
                "left_ready_before_storm": self.left_ready_before_storm,
                "ready_at_end": self.ready_at_end,
                "pod_deletes": self.pod_deletes,
                "pod_restarts": self.pod_restarts,
                "recreated": self.recreated,
                "rss_after_kib": self.rss_after_storm_kib,
            },
        })
    }
}
