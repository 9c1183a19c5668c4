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
//!
//! With `--kube --replicas N` (N > 1) the same figures come from N replicas sharing the cluster
//! (`--state=cluster`, `integration::ha`: replica N on 127.0.0.N, heartbeats every 2 s, an edge
//! gives a silent replica up after 8 s, as the shipped Deployment runs) behind one UDP address
//! (an nftables load balancer; it spreads client sockets, `--edges-per-endpoint` edges each):
//! RSS and CPU per replica and summed, the sessions each holds. Instead of the restart storm the
//! replica holding most sessions is killed with -9 and taken out of the load balancer (not
//! started again): per edge of it, the time from the kill until its new `HelloAck` (median, p90,
//! max; a simulated edge dials again from a new socket, as edgecore does), until all are
//! resynced, and the same Ready and pod counts. Needs root and nftables.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use integration::bench::{self, JoinToken, Machine, mib, percentile};
use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::ha::{self, Liveness, ReplicaSpec, Replicas};
use integration::sim::{self, Fleet, FleetConfig, ReadyWatch, Redial, Snapshot};
use integration::{Cloud, kube_client};
use serde_json::{Value, json};

const NAMESPACE: &str = "sim";
/// Every simulated edge dials from 127.0.0.1: the per-address share must not be what limits.
const CLOUD_FLAGS: &[&str] = &["--max-handshakes-per-address", "1000000"];
/// How often a worker prints its counters.
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// How soon the edges of a dead replica notice: as the shipped Deployment runs.
const LIVENESS: Liveness<'static> = Liveness::SHIPPED;
/// Joins in flight at once.
const JOINS_AT_ONCE: usize = 16;
/// Longest wait for the edges of a killed cloudcore to be back and resynced.
const STORM_LIMIT: Duration = Duration::from_secs(300);

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
    /// cloudcore replicas sharing the cluster (`--state=cluster`) behind one UDP address
    /// (needs --kube, root and nftables); the replica holding most sessions is then killed
    /// instead of the restart storm.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    replicas: u8,
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
/// 500 ms, reads `churn X` lines on stdin (and `times`, answered with a `{"times": ..}` line of
/// every edge's [`sim::EdgeTimes`]), stops when stdin closes.
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
    /// Which socket an edge dials again from.
    #[arg(long, value_enum, default_value = "shared-socket")]
    redial: RedialArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RedialArg {
    SharedSocket,
    NewSocket,
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
    if cli.replicas > 1 && !cli.kube {
        eprintln!(
            "error: --replicas {} needs --kube: replicas share their state in the cluster (--state=cluster), and embedded mode has none",
            cli.replicas
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
    let redial = match cli.redial {
        RedialArg::SharedSocket => Redial::SharedSocket,
        RedialArg::NewSocket => Redial::NewSocket,
    };
    let fleet = Fleet::start_redialing(
        &dirs,
        FleetConfig {
            address: cli.address,
            pods_per_edge: cli.pods_per_edge,
            edges_per_endpoint: cli.edges_per_endpoint,
            connect_concurrency: cli.connect_concurrency,
            backoff: edgecore::backoff::Backoff::default(),
        },
        redial,
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
                    } else if line.trim() == "times" {
                        let mut out = std::io::stdout().lock();
                        let times = json!({"times": fleet.times_json()});
                        if writeln!(out, "{times}").and_then(|_| out.flush()).is_err() {
                            break;
                        }
                    }
                }
            },
        }
    }
    fleet.stop().await;
    Ok(())
}

/// Each edge's `(hello_ack_ms, resynced_ms)` ([`sim::EdgeTimes`]) by node name.
type TimesByNode = BTreeMap<String, (u64, u64)>;

/// The worker processes and their latest counters.
struct Workers {
    children: Vec<(Child, ChildStdin)>,
    latest: Arc<Mutex<Vec<Snapshot>>>,
    /// Each worker's answer to the last `times` request; `None` until it came.
    times: Arc<Mutex<Vec<Option<TimesByNode>>>>,
}

impl Workers {
    fn start(
        cli: &Cli,
        address: &str,
        edges_dir: &Path,
        names: &[String],
        redial: RedialArg,
    ) -> Result<Workers> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let per = names.len().div_ceil(cli.processes);
        let latest = Arc::new(Mutex::new(Vec::new()));
        let times = Arc::new(Mutex::new(Vec::new()));
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
                .args([
                    "--redial",
                    match redial {
                        RedialArg::SharedSocket => "shared-socket",
                        RedialArg::NewSocket => "new-socket",
                    },
                ])
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
            times.lock().unwrap_or_else(|p| p.into_inner()).push(None);
            let (latest, times) = (latest.clone(), times.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let Ok(value) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if let Some(edges) = value["times"].as_object() {
                        let edges = edges
                            .iter()
                            .map(|(name, t)| {
                                let at = |i: usize| t[i].as_u64().unwrap_or_default();
                                (name.clone(), (at(0), at(1)))
                            })
                            .collect();
                        times.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(edges);
                    } else if let Some(snapshot) = Snapshot::from_json(&value) {
                        latest.lock().unwrap_or_else(|p| p.into_inner())[index] = snapshot;
                    }
                }
            });
            children.push((child, stdin));
        }
        Ok(Workers {
            children,
            latest,
            times,
        })
    }

    /// Every edge's `(hello_ack_ms, resynced_ms)`, asked of the workers now.
    async fn edge_times(&mut self) -> Result<TimesByNode> {
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
            .for_each(|t| *t = None);
        for (_, stdin) in &mut self.children {
            writeln!(stdin, "times")?;
            stdin.flush()?;
        }
        let asked = Instant::now();
        loop {
            self.check_running()?;
            {
                let mut answers = self.times.lock().unwrap_or_else(|p| p.into_inner());
                if answers.iter().all(Option::is_some) {
                    return Ok(answers
                        .iter_mut()
                        .flat_map(|t| t.take())
                        .flatten()
                        .collect());
                }
            }
            ensure!(
                asked.elapsed() < Duration::from_secs(30),
                "the workers did not tell their edges' times within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

/// CPU share (1.0 = one core) and RSS of each of `pids` over the same `span`.
async fn usage(pids: &[u32], span: Duration) -> Result<Vec<Usage>> {
    let cpu0 = pids
        .iter()
        .map(|pid| bench::cpu_time(*pid))
        .collect::<Result<Vec<_>>>()?;
    tokio::time::sleep(span).await;
    pids.iter()
        .zip(cpu0)
        .map(|(pid, cpu0)| {
            Ok(Usage {
                cpu: (bench::cpu_time(*pid)? - cpu0).as_secs_f64() / span.as_secs_f64(),
                rss_kib: bench::rss_kib(*pid)?,
            })
        })
        .collect()
}

/// One process's CPU share (1.0 = one core) over a span, and its RSS at the end.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu: f64,
    rss_kib: u64,
}

impl Usage {
    fn sum(all: &[Usage]) -> Usage {
        Usage {
            cpu: all.iter().map(|u| u.cpu).sum(),
            rss_kib: all.iter().map(|u| u.rss_kib).sum(),
        }
    }
}

/// The cloudcore processes under test.
enum Clouds {
    /// One cloudcore, embedded or kube: the storm kills it and starts it again.
    One(Cloud),
    /// `--replicas N`: replicas sharing the cluster behind one UDP address; the one holding
    /// most sessions is killed.
    Replicas(Replicas),
}

impl Clouds {
    /// What edges dial: the one cloudcore, or the load balancer.
    fn address(&self) -> String {
        match self {
            Clouds::One(cloud) => cloud.address(),
            Clouds::Replicas(r) => r.lb.address(),
        }
    }

    fn kubeconfig(&self) -> Result<PathBuf> {
        match self {
            Clouds::One(cloud) => Ok(cloud.kubeconfig()),
            Clouds::Replicas(r) => Ok(r.replicas.first().context("no replica")?.cloud.kubeconfig()),
        }
    }

    /// Joins `nodes` into `edges_dir` through one token of the real CLI, [`JOINS_AT_ONCE`] at
    /// once; how long the joins took (the token made). With replicas, as an operator rolls
    /// gateways out: every use rewrites the token's Secret, so joins through different replicas
    /// race for it and take turns (`registry::cluster::conflict_pause`).
    async fn join(&self, binary: &Path, nodes: &[String], edges_dir: &Path) -> Result<Duration> {
        let token: JoinToken = match self {
            Clouds::One(cloud) => bench::create_token(binary, cloud, nodes.len()).await?,
            Clouds::Replicas(r) => tokio::task::block_in_place(|| r.token(nodes.len()))?,
        };
        let began = Instant::now();
        bench::join_edges(&token, nodes, edges_dir, JOINS_AT_ONCE).await?;
        Ok(began.elapsed())
    }

    /// The running processes: `(replica id, pid)`, the one cloudcore's id being `cloudcore`.
    fn pids(&self) -> Result<Vec<(String, u32)>> {
        match self {
            Clouds::One(cloud) => Ok(vec![(
                "cloudcore".to_string(),
                cloud.pid().context("cloudcore is not running")?,
            )]),
            Clouds::Replicas(r) => r
                .replicas
                .iter()
                .filter(|r| r.alive)
                .map(|r| {
                    let pid = r
                        .cloud
                        .pid()
                        .with_context(|| format!("{} is not running", r.id))?;
                    Ok((r.id.clone(), pid))
                })
                .collect(),
        }
    }

    /// The end of every log.
    fn logs(&self) -> String {
        match self {
            Clouds::One(cloud) => format!(
                "last lines of the cloudcore log:\n{}",
                integration::gateway::tail(&cloud.log(), 30)
            ),
            Clouds::Replicas(r) => r.logs(30),
        }
    }
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
    let mut clouds = match &cluster {
        Some(cluster) if cli.replicas > 1 => {
            let credentials = cluster.cloudcore_credentials(|rbac| rbac);
            eprintln!("starting {} cloudcore replicas", cli.replicas);
            let spec = ReplicaSpec {
                binary: &binary,
                dir: &dir,
                credentials: &credentials,
                replicas: cli.replicas,
                nodes: cli.edges,
                liveness: LIVENESS,
                extra: CLOUD_FLAGS,
            };
            Clouds::Replicas(tokio::task::block_in_place(|| {
                Replicas::start_cluster(cluster, &spec)
            })?)
        }
        Some(cluster) => {
            let credentials = cluster.cloudcore_credentials(|rbac| rbac);
            Clouds::One(Cloud::start_kube_binary(
                &binary,
                &dir,
                cluster,
                &credentials,
                std::net::Ipv4Addr::LOCALHOST.into(),
                CLOUD_FLAGS,
            )?)
        }
        None => Clouds::One(Cloud::start_binary(&binary, &dir, CLOUD_FLAGS)?),
    };
    let outcome = measure(cli, &binary, &mut clouds, cluster.as_ref(), &dir).await;
    if outcome.is_err() {
        eprintln!("{}", clouds.logs());
    }
    drop(clouds);
    drop(cluster);
    outcome
}

/// Each Node's session owner once every one of `names` has one (a replica annotates a Node
/// within moments of taking its session).
async fn owners_of_all(
    cluster: &KubeCluster,
    names: &[String],
) -> Result<BTreeMap<String, String>> {
    let began = Instant::now();
    loop {
        let owners = tokio::task::block_in_place(|| ha::owners(cluster));
        let missing = names.iter().filter(|n| !owners.contains_key(*n)).count();
        if missing == 0 {
            return Ok(owners);
        }
        ensure!(
            began.elapsed() < Duration::from_secs(60),
            "{missing} of {} Nodes name no replica (annotation {}) after 60 s",
            names.len(),
            ha::REPLICA_ANNOTATION
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How many of `names` each replica holds, every replica listed.
fn sessions(
    replicas: &Replicas,
    owners: &BTreeMap<String, String>,
    names: &[String],
) -> BTreeMap<String, usize> {
    let mut count: BTreeMap<String, usize> = replicas
        .replicas
        .iter()
        .map(|r| (r.id.clone(), 0))
        .collect();
    for name in names {
        if let Some(owner) = owners.get(name) {
            *count.entry(owner.clone()).or_default() += 1;
        }
    }
    count
}

async fn measure(
    cli: &Cli,
    binary: &Path,
    clouds: &mut Clouds,
    cluster: Option<&KubeCluster>,
    dir: &Path,
) -> Result<Report> {
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
        let took = clouds.join(binary, &missing, &edges_dir).await?;
        join_secs = Some((missing.len(), took.as_secs_f64()));
    }
    let client = kube_client(&clouds.kubeconfig()?).await?;
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
    let processes = clouds.pids()?;
    let pids: Vec<u32> = processes.iter().map(|(_, pid)| *pid).collect();
    let empty = usage(&pids, Duration::from_secs(3)).await?;

    eprintln!(
        "starting {} edges in {} processes",
        cli.edges, cli.processes
    );
    let redial = match clouds {
        Clouds::One(_) => RedialArg::SharedSocket,
        Clouds::Replicas(_) => {
            let sockets: usize = names
                .chunks(cli.edges.div_ceil(cli.processes))
                .map(|share| share.len().div_ceil(cli.edges_per_endpoint))
                .sum();
            if sockets < 10 * usize::from(cli.replicas) {
                eprintln!(
                    "note: the load balancer spreads client sockets, not edges: {sockets} sockets of up to {} edges over {} replicas; a lower --edges-per-endpoint spreads the edges more evenly",
                    cli.edges_per_endpoint, cli.replicas
                );
            }
            RedialArg::NewSocket
        }
    };
    let watch = ReadyWatch::start(&client);
    let n = cli.edges as u64;
    let mut workers = Workers::start(cli, &clouds.address(), &edges_dir, &names, redial)?;
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
    let idle = usage(&pids, Duration::from_secs(cli.idle_secs)).await?;
    let workers_rss_kib = workers.rss_kib();
    let sessions_at_rest = match (&*clouds, cluster) {
        (Clouds::Replicas(replicas), Some(cluster)) => {
            sessions(replicas, &owners_of_all(cluster, &names).await?, &names)
        }
        _ => BTreeMap::new(),
    };

    eprintln!(
        "churn: {} status changes per edge per minute",
        cli.churn_per_min
    );
    workers.churn(cli.churn_per_min);
    let statuses0 = workers.total().statuses_sent;
    let churn = usage(&pids, Duration::from_secs(cli.churn_secs)).await?;
    let statuses = workers.total().statuses_sent - statuses0;
    workers.churn(0.0);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The storm. Nodes that left Ready before it (at the first start, a kept data dir's Nodes
    // whose edges were gone since the last run) are counted apart: they are no false NotReady.
    let left_ready_before_storm = watch.left_ready().len();
    let uids = sim::pod_uids(&client, NAMESPACE).await?;
    let before = workers.total();
    let (mut outage, storm_resynced) = match (&mut *clouds, cluster) {
        (Clouds::Replicas(replicas), Some(cluster)) => {
            fail_over(replicas, cluster, &names, &mut workers, &before).await?
        }
        (Clouds::Replicas(_), None) => bail!("replicas without a cluster"),
        (Clouds::One(cloud), _) => {
            let pid = pids[0];
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
            let back = wait_for("every edge back", STORM_LIMIT, &mut workers, |s| {
                s.connected == n && s.hello_acks >= before.hello_acks + n
            })
            .await?
                + restarted;
            let storm_resynced = wait_for("every edge resynced", STORM_LIMIT, &mut workers, |s| {
                s.resynced == n
            })
            .await?
                + back;
            eprintln!("storm: back in {back:?}, resynced in {storm_resynced:?}; settling");
            (
                Outage::Restart {
                    restart: restarted,
                    back,
                },
                storm_resynced,
            )
        }
    };
    let after_storm = workers.total();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after: BTreeMap<String, u64> = clouds
        .pids()?
        .into_iter()
        .map(|(id, pid)| Ok((id, bench::rss_kib(pid)?)))
        .collect::<Result<_>>()?;
    let rss_after_storm_kib = after.values().sum();
    if let (Outage::Failover(failover), Clouds::Replicas(replicas), Some(cluster)) =
        (&mut outage, &*clouds, cluster)
    {
        let owners = tokio::task::block_in_place(|| ha::owners(cluster));
        failover.sessions_after = sessions(replicas, &owners, &names);
    }
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
    let (sum_empty, sum_idle, sum_churn) =
        (Usage::sum(&empty), Usage::sum(&idle), Usage::sum(&churn));
    let replicas = match clouds {
        Clouds::One(_) => Vec::new(),
        Clouds::Replicas(_) => processes
            .iter()
            .enumerate()
            .map(|(i, (id, _))| ReplicaFigures {
                id: id.clone(),
                empty: empty[i],
                idle: idle[i],
                churn: churn[i],
                sessions: sessions_at_rest.get(id).copied().unwrap_or_default(),
                rss_after_kib: after.get(id).copied(),
            })
            .collect(),
    };
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
        cpu_empty: sum_empty.cpu,
        rss_empty_kib: sum_empty.rss_kib,
        connected,
        resynced,
        all_ready,
        initial_upserts: synced.upserts,
        cpu_idle: sum_idle.cpu,
        rss_idle_kib: sum_idle.rss_kib,
        workers_rss_kib,
        cpu_churn: sum_churn.cpu,
        rss_churn_kib: sum_churn.rss_kib,
        statuses_per_sec: statuses as f64 / cli.churn_secs as f64,
        replicas,
        outage,
        storm_resynced,
        storm_upserts: after_storm.upserts - before.upserts,
        storm_dial_failures: after_storm.dial_failures - before.dial_failures,
        storm_busy_refusals: after_storm.busy_refusals - before.busy_refusals,
        storm_sessions_lost: after_storm.sessions_lost - before.sessions_lost,
        rss_after_storm_kib,
        left_ready_before_storm,
        left_ready,
        ready_at_end,
        pod_deletes: end.pod_deletes,
        pod_restarts: end.pod_restarts,
        recreated,
    })
}

/// Kills the replica holding most sessions with -9 and takes it out of the load balancer (as
/// kube-proxy would), then waits until each of its edges has a new `HelloAck` and is resynced:
/// the failover, and the time from the kill until all are resynced.
async fn fail_over(
    replicas: &mut Replicas,
    cluster: &KubeCluster,
    names: &[String],
    workers: &mut Workers,
    before: &Snapshot,
) -> Result<(Outage, Duration)> {
    let owners = owners_of_all(cluster, names).await?;
    let held = sessions(replicas, &owners, names);
    let Some((victim, _)) = held.iter().max_by_key(|(_, n)| **n) else {
        bail!("no replica");
    };
    let victim = victim.clone();
    let moved: Vec<&String> = names
        .iter()
        .filter(|n| owners.get(*n) == Some(&victim))
        .collect();
    eprintln!(
        "kill -9 {victim}, holding {} of {} sessions",
        moved.len(),
        names.len()
    );
    let killed_ms = sim::unix_ms();
    let killed = Instant::now();
    tokio::task::block_in_place(|| replicas.kill(&victim))?;
    let n = names.len() as u64;
    let back = loop {
        workers.check_running()?;
        let now = workers.total();
        if now.connected == n
            && now.resynced == n
            && now.hello_acks >= before.hello_acks + moved.len() as u64
        {
            let times = workers.edge_times().await?;
            // Per moved edge: (new HelloAck, resynced) after the kill, if both are.
            let back: Option<Vec<(Duration, Duration)>> = moved
                .iter()
                .map(|name| {
                    let &(hello, resynced) = times.get(*name)?;
                    (hello > killed_ms && resynced >= hello).then(|| {
                        (
                            Duration::from_millis(hello - killed_ms),
                            Duration::from_millis(resynced - killed_ms),
                        )
                    })
                })
                .collect();
            if let Some(back) = back {
                break back;
            }
        }
        ensure!(
            killed.elapsed() < STORM_LIMIT,
            "the {} edges of {victim}: not all back and resynced within {STORM_LIMIT:?} ({now:?})",
            moved.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let resynced = back.iter().map(|(_, r)| *r).max().unwrap_or_default();
    let mut hello_acks: Vec<Duration> = back.into_iter().map(|(h, _)| h).collect();
    hello_acks.sort();
    eprintln!(
        "failover: back after {:?} at most, resynced after {resynced:?}; settling",
        hello_acks.last().copied().unwrap_or_default()
    );
    Ok((
        Outage::Failover(Failover {
            replica: victim,
            edges: moved.len(),
            back: hello_acks,
            sessions_after: BTreeMap::new(),
        }),
        resynced,
    ))
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
    /// With replicas, this and the other cloudcore figures are sums over them.
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
    /// Each replica's figures; empty with one cloudcore.
    replicas: Vec<ReplicaFigures>,
    outage: Outage,
    /// From the kill (replicas) or the restart's beginning (one cloudcore).
    storm_resynced: Duration,
    storm_upserts: u64,
    storm_dial_failures: u64,
    storm_busy_refusals: u64,
    storm_sessions_lost: u64,
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

/// How the cloud went away after the churn.
enum Outage {
    /// The one cloudcore killed with -9 and started again on its data dir and ports.
    Restart {
        /// From the kill until it was healthy again.
        restart: Duration,
        /// From the restart's beginning until every edge had a new `HelloAck`.
        back: Duration,
    },
    /// The replica holding most sessions killed with -9, out of the load balancer for good.
    Failover(Failover),
}

struct Failover {
    replica: String,
    /// Its sessions when it was killed.
    edges: usize,
    /// Per edge of it, from the kill until its new `HelloAck`; sorted.
    back: Vec<Duration>,
    /// Sessions each replica holds once settled.
    sessions_after: BTreeMap<String, usize>,
}

/// One replica's share of the figures.
struct ReplicaFigures {
    id: String,
    empty: Usage,
    idle: Usage,
    churn: Usage,
    /// Sessions it held at rest.
    sessions: usize,
    /// After the failover; `None`: it was the one killed.
    rss_after_kib: Option<u64>,
}

impl Report {
    fn kib_per_edge(&self, rss: u64) -> f64 {
        (rss as f64 - self.rss_empty_kib as f64) / self.edges as f64
    }

    /// `kube`, `embedded`, or `kube, N replicas`.
    fn mode(&self) -> String {
        match (self.kube, self.replicas.len()) {
            (false, _) => "embedded".to_string(),
            (true, 0) => "kube".to_string(),
            (true, n) => format!("kube, {n} replicas"),
        }
    }

    /// `N Nodes left Ready from the kill on (...)`.
    fn left_ready_text(&self) -> String {
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
        )
    }

    fn pods_text(&self) -> String {
        format!(
            "{} deleted at an edge, {} sent again, {} re-created in the API",
            self.pod_deletes, self.pod_restarts, self.recreated
        )
    }
}

/// `A 1, B 2`.
fn counts_text(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(id, n)| format!("{id} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "edge-sim: {} edges in {} processes, {} pods per edge (+ ConfigMap + Secret each), {} mode{}\n\
             machine: {} CPUs ({}), {} MiB, Linux {}\n",
            self.edges,
            self.processes,
            self.pods_per_edge,
            if self.kube { "kube" } else { "embedded" },
            match self.replicas.len() {
                0 => String::new(),
                n => format!(", {n} replicas"),
            },
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel
        );
        if !self.replicas.is_empty() {
            out.push_str(&format!(
                "replicas: --state=cluster behind one UDP address, --heartbeat-interval {} --dead-after {}; the cloudcore figures are their sums\n",
                LIVENESS.heartbeat_interval, LIVENESS.dead_after
            ));
        }
        out.push('\n');
        if let Some((n, secs)) = self.join {
            out.push_str(&format!(
                "join                {n} nodes in {secs:.1} s = {:.0} joins/s\n",
                n as f64 / secs
            ));
        }
        let mut rows = vec![
            (
                "create desired set".to_string(),
                format!(
                    "{} objects in {:.1} s = {:.0} objects/s",
                    self.objects,
                    self.create_secs,
                    self.objects as f64 / self.create_secs
                ),
            ),
            (
                "cloudcore, no edge".to_string(),
                format!(
                    "RSS {:.1} MiB, CPU {:.0} %",
                    mib(self.rss_empty_kib),
                    self.cpu_empty * 100.0
                ),
            ),
            (
                "all connected".to_string(),
                format!(
                    "{:.1} s = {:.0} handshakes/s",
                    self.connected.as_secs_f64(),
                    self.edges as f64 / self.connected.as_secs_f64()
                ),
            ),
            (
                "all resynced".to_string(),
                format!(
                    "{:.1} s ({} objects sent = {:.0} objects/s)",
                    self.resynced.as_secs_f64(),
                    self.initial_upserts,
                    self.initial_upserts as f64 / self.resynced.as_secs_f64()
                ),
            ),
            (
                "all Nodes Ready".to_string(),
                format!("{:.1} s", self.all_ready.as_secs_f64()),
            ),
            (
                "at rest".to_string(),
                format!(
                    "RSS {:.1} MiB = {:.1} KiB per edge ({:.1} in all), CPU {:.0} % = {:.1} µs/s per edge",
                    mib(self.rss_idle_kib),
                    self.kib_per_edge(self.rss_idle_kib),
                    self.rss_idle_kib as f64 / self.edges as f64,
                    self.cpu_idle * 100.0,
                    self.cpu_idle * 1e6 / self.edges as f64
                ),
            ),
            (
                "simulator at rest".to_string(),
                format!(
                    "RSS {:.1} MiB = {:.1} KiB per simulated edge",
                    mib(self.workers_rss_kib),
                    self.workers_rss_kib as f64 / self.edges as f64
                ),
            ),
            (
                "under churn".to_string(),
                format!(
                    "{} changes/edge/min = {:.0} statuses/s: RSS {:.1} MiB = {:.1} KiB per edge, CPU {:.0} %",
                    self.churn_per_min,
                    self.statuses_per_sec,
                    mib(self.rss_churn_kib),
                    self.kib_per_edge(self.rss_churn_kib),
                    self.cpu_churn * 100.0
                ),
            ),
        ];
        for r in &self.replicas {
            rows.push((
                r.id.clone(),
                format!(
                    "no edge RSS {:.1} MiB CPU {:.0} %; at rest {} sessions, RSS {:.1} MiB CPU {:.0} %; churn RSS {:.1} MiB CPU {:.0} %; after the failover {}",
                    mib(r.empty.rss_kib),
                    r.empty.cpu * 100.0,
                    r.sessions,
                    mib(r.idle.rss_kib),
                    r.idle.cpu * 100.0,
                    mib(r.churn.rss_kib),
                    r.churn.cpu * 100.0,
                    r.rss_after_kib
                        .map_or("killed".to_string(), |k| format!("RSS {:.1} MiB", mib(k)))
                ),
            ));
        }
        match &self.outage {
            Outage::Restart { restart, back } => rows.extend([
                (
                    "storm: restart".to_string(),
                    format!("cloudcore healthy {:.1} s after kill -9", secs(*restart)),
                ),
                (
                    "storm: all back".to_string(),
                    format!(
                        "{:.1} s after the restart began ({} failed dials, {} of them refused as busy)",
                        secs(*back),
                        self.storm_dial_failures,
                        self.storm_busy_refusals
                    ),
                ),
                (
                    "storm: all resynced".to_string(),
                    format!(
                        "{:.1} s ({} objects sent again)",
                        secs(self.storm_resynced),
                        self.storm_upserts
                    ),
                ),
                ("storm: false NotReady".to_string(), self.left_ready_text()),
                ("storm: pods".to_string(), self.pods_text()),
                (
                    "after the storm".to_string(),
                    format!("RSS {:.1} MiB", mib(self.rss_after_storm_kib)),
                ),
            ]),
            Outage::Failover(f) => rows.extend([
                (
                    "failover: kill -9".to_string(),
                    format!(
                        "{} holding {} of {} sessions, taken out of the load balancer, not restarted ({} sessions ended in all)",
                        f.replica, f.edges, self.edges, self.storm_sessions_lost
                    ),
                ),
                (
                    "failover: back".to_string(),
                    format!(
                        "kill → each edge's new HelloAck: median {:.1} s, p90 {:.1} s, max {:.1} s ({} failed dials, {} of them refused as busy)",
                        secs(percentile(&f.back, 0.5)),
                        secs(percentile(&f.back, 0.9)),
                        secs(f.back.last().copied().unwrap_or_default()),
                        self.storm_dial_failures,
                        self.storm_busy_refusals
                    ),
                ),
                (
                    "failover: resynced".to_string(),
                    format!(
                        "all {:.1} s after the kill ({} objects sent again)",
                        secs(self.storm_resynced),
                        self.storm_upserts
                    ),
                ),
                ("failover: NotReady".to_string(), self.left_ready_text()),
                ("failover: pods".to_string(), self.pods_text()),
                (
                    "after the failover".to_string(),
                    format!(
                        "RSS {:.1} MiB (live replicas); sessions {}",
                        mib(self.rss_after_storm_kib),
                        counts_text(&f.sessions_after)
                    ),
                ),
            ]),
        }
        for (name, value) in rows {
            out.push_str(&format!("{name:<22}{value}\n"));
        }
        out
    }

    fn to_json(&self) -> Value {
        let mut report = json!({
            "edges": self.edges,
            "processes": self.processes,
            "pods_per_edge": self.pods_per_edge,
            "mode": self.mode(),
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
            "kib_per_idle_edge_in_all": self.rss_idle_kib as f64 / self.edges as f64,
            "cpu_idle": self.cpu_idle,
            "workers_rss_kib": self.workers_rss_kib,
            "churn_per_min": self.churn_per_min,
            "statuses_per_sec": self.statuses_per_sec,
            "rss_churn_kib": self.rss_churn_kib,
            "cpu_churn": self.cpu_churn,
        });
        let common = json!({
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
        });
        match &self.outage {
            Outage::Restart { restart, back } => {
                let mut storm = json!({
                    "restart_s": restart.as_secs_f64(),
                    "back_s": back.as_secs_f64(),
                });
                merge(&mut storm, common);
                report["storm"] = storm;
            }
            Outage::Failover(f) => {
                report["liveness"] = json!({
                    "heartbeat_interval": LIVENESS.heartbeat_interval,
                    "dead_after": LIVENESS.dead_after,
                });
                report["replicas"] = self
                    .replicas
                    .iter()
                    .map(|r| {
                        json!({
                            "id": r.id,
                            "rss_empty_kib": r.empty.rss_kib,
                            "cpu_empty": r.empty.cpu,
                            "sessions": r.sessions,
                            "rss_idle_kib": r.idle.rss_kib,
                            "cpu_idle": r.idle.cpu,
                            "rss_churn_kib": r.churn.rss_kib,
                            "cpu_churn": r.churn.cpu,
                            "rss_after_kib": r.rss_after_kib,
                            "sessions_after": f.sessions_after.get(&r.id),
                        })
                    })
                    .collect();
                let ms = bench::ms;
                let mut failover = json!({
                    "replica": f.replica,
                    "edges": f.edges,
                    "sessions_lost": self.storm_sessions_lost,
                    "back_ms": {
                        "median": ms(percentile(&f.back, 0.5)),
                        "p90": ms(percentile(&f.back, 0.9)),
                        "max": ms(f.back.last().copied().unwrap_or_default()),
                    },
                });
                merge(&mut failover, common);
                report["failover"] = failover;
            }
        }
        report
    }
}

/// Adds `from`'s fields to the object `to`.
fn merge(to: &mut Value, from: Value) {
    if let (Some(to), Value::Object(from)) = (to.as_object_mut(), from) {
        to.extend(from);
    }
}
