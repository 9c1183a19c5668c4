//! `sync-bench`: a load generator that measures how fast desired state travels from an API
//! change to a durable commit in an edge's SQLite store, and how much memory cloudcore spends
//! per edge that holds objects. Everything runs on 127.0.0.1: the real `cloudcore serve
//! --control-plane embedded` as a child process, the edges in-process with `edgecore::run`
//! (each with its own data dir, store and metrics port), the load through kube-rs.
//!
//! First a store probe times `edgecore::store` commits (one object, and a batch) in a scratch
//! store on the same disk. Then, per round, two independent parts, each on a fresh cloudcore and
//! data dir:
//!
//! - **One edge**: join and run one edge; create `--config-maps` ConfigMaps and a pod bound to the
//!   edge that references them all (`envFrom`). Then *throughput*: `--updates` merge patches to
//!   those ConfigMaps, round robin, `--concurrency` in flight; time from the first patch sent
//!   until the edge's store holds every ConfigMap at its final version. Then *latency*:
//!   `--latency-samples` single patches one after the other, each timed from the request until
//!   the store holds the new version.
//! - **Fleet**: join `--edges` edges and connect them once (so their Nodes exist), stop them,
//!   restart cloudcore (so session memory the allocator kept is gone) and read its RSS; create a
//!   pod per edge referencing `--objects-per-edge` − 1 ConfigMaps of its own; read RSS (desired
//!   state held for disconnected edges); start every edge at once and time until every store
//!   holds its objects (a reconnect resync of the whole fleet); read RSS again; then a live round
//!   of `--updates` patches spread over every edge's ConfigMaps.
//!
//! "Durable at the edge" is observed from outside the edge: the bench reads each edge's store
//! through its own read-only SQLite connection (`Store::open_read_only`, WAL), which sees a
//! transaction only after its commit, and edgecore commits with `synchronous=FULL`. A poller
//! thread reads the stores in a loop and records when each object's resourceVersion changed,
//! so a commit is timed to within one poll cycle. With many stores the poller stays idle while
//! the patches are sent (a read of 100 stores takes milliseconds of CPU the writes would lose)
//! and starts at the last answer.
//!
//! Each throughput measurement also runs a kube-rs watch on the ConfigMaps beside cloudcore's
//! own, to tell the API's delivery time from the tunnel's and the edge's, reads both sides' sync
//! counters (versions sent, versions committed), and the CPU time cloudcore and this process
//! used, to tell a CPU-bound phase from one that waits on the disk.
//!
//! Results are a table on stdout (or JSON with `--json`); medians are quoted across rounds.
//! Failures (an edge that never converges, a refused write) stop the bench with the objects
//! still missing; the temp dir with every log and store is then kept for inspection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use edgecore::store::Store;
use futures::StreamExt;
use integration::Cloud;
use integration::bench::{
    self, Failures, Machine, RunningEdge, Spread, create_token, join_edges, mib, ms, node_name,
    percentile, stop_edges,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{
    Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use proto::sync::{ObjectKey, StoreOp};
use serde_json::{Value, json};

/// How long the API may take to answer after cloudcore reports healthy.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long cloudcore may take to count connected (or departed) edges.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long edges may take to hold what they should, once the writes are done. Far above any
/// healthy figure: reaching it means an edge does not converge, which is a failure.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Poll interval of the stores while timing throughput (one edge, every ConfigMap listed).
const POLL_ONE_EDGE: Duration = Duration::from_millis(2);
/// Poll interval of the single object while timing latency.
const POLL_LATENCY: Duration = Duration::from_micros(250);
/// Commits timed by the store probe, per setting.
const PROBE_COMMITS: usize = 200;
/// Operations per transaction in the store probe's batched setting.
const PROBE_BATCH: usize = 100;
/// The namespace every object lives in.
const NAMESPACE: &str = "sync-bench";
/// The node name of the one-edge part.
const SOLO_NODE: &str = "sync-solo";

#[derive(Parser, Debug)]
#[command(
    name = "sync-bench",
    about = "Measures objects per second from an API change to durable at the edge (1 edge and a \
             fleet) and cloudcore memory per edge holding objects"
)]
struct Cli {
    /// Edges in the fleet part.
    #[arg(long, default_value_t = 100)]
    edges: usize,
    /// Objects each fleet edge holds besides its Node: one pod and this many minus one
    /// ConfigMaps it references.
    #[arg(long, default_value_t = 100)]
    objects_per_edge: usize,
    /// ConfigMaps the one-edge part's pod references.
    #[arg(long, default_value_t = 100)]
    config_maps: usize,
    /// ConfigMap patches per throughput measurement (one edge, and the fleet's live round).
    #[arg(long, default_value_t = 2000)]
    updates: usize,
    /// Sequential single patches timed for latency (one edge).
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// API requests (creates, patches) in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 16)]
    join_concurrency: usize,
    /// Size of the filler value in every ConfigMap, in bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Rounds, each on fresh cloudcores and data dirs; figures are medians across rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Pause between two reads of the fleet's stores, in milliseconds (one read of 100 stores
    /// takes a few ms of CPU; the resync is timed to within one pause plus one read).
    #[arg(long, default_value_t = 10)]
    fleet_poll_ms: u64,
    /// Quiet seconds before each cloudcore memory reading.
    #[arg(long, default_value_t = 3)]
    quiet_secs: u64,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// Give up (and stop cloudcore and the edges) after this many seconds in total.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--edges", c.edges),
            ("--objects-per-edge", c.objects_per_edge.saturating_sub(1)),
            ("--config-maps", c.config_maps),
            ("--updates", c.updates),
            ("--latency-samples", c.latency_samples),
            ("--concurrency", c.concurrency),
            ("--join-concurrency", c.join_concurrency),
            ("--rounds", c.rounds),
        ]
    }) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    bench::init_tracing();
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(bench(&cli)));
    bench::finish(result, cli.json)
}

/// Runs the rounds under the overall timeout. A cloudcore is killed when its [`Cloud`] is
/// dropped and an edge when its task is aborted, so a timeout, an error or Ctrl-C stops them
/// too. On failure the temp dir (logs, stores) is kept and its path printed.
async fn bench(cli: &Cli) -> Result<Report> {
    let binary = bench::cloudcore_binary(cli.cloudcore.as_ref())?;
    let dir = tempfile::Builder::new()
        .prefix("sync-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let work = async {
        let probe = probe_store(&dir.path().join("probe"), cli.value_bytes).await?;
        eprintln!(
            "store probe: {:.2} ms per commit of 1 object, {:.2} ms per commit of {PROBE_BATCH}",
            ms(probe.single),
            ms(probe.batch)
        );
        let mut rounds = Vec::with_capacity(cli.rounds);
        for index in 1..=cli.rounds {
            let round_dir = dir.path().join(format!("round-{index}"));
            let round = run_round(cli, &binary, &round_dir)
                .await
                .with_context(|| format!("round {index}"))?;
            eprintln!(
                "round {index}/{}: one edge {:.0} objects/s (latency p50 {:.1} ms, p99 {:.1} ms); \
                 {} edges: resync {:.0} objects/s, live {:.0} objects/s, {:.1} KiB per edge cached, \
                 {:.1} KiB per edge connected",
                cli.rounds,
                round.solo.throughput.objects_per_sec(),
                ms(percentile(&round.solo.latencies, 0.5)),
                ms(percentile(&round.solo.latencies, 0.99)),
                cli.edges,
                round.fleet.resync.objects_per_sec(),
                round.fleet.live.objects_per_sec(),
                round.fleet.kib_per_edge_cached(),
                round.fleet.kib_per_edge_connected(),
            );
            rounds.push(round);
        }
        anyhow::Ok((probe, rounds))
    };
    let limit = Duration::from_secs(cli.timeout_secs);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(limit, work) => outcome
            .unwrap_or_else(|_| Err(anyhow!("gave up after {} s (--timeout-secs)", cli.timeout_secs))),
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let (probe, rounds) = match outcome {
        Ok(done) => done,
        Err(e) => {
            let kept = dir.keep();
            eprintln!(
                "cloudcore logs, edge stores and data dirs are kept in {}",
                kept.display()
            );
            return Err(e);
        }
    };
    Ok(Report {
        cli: Settings::of(cli),
        machine: Machine::read(),
        probe,
        rounds,
    })
}

/// One round: the one-edge part and the fleet part, each on its own cloudcore.
struct Round {
    solo: Solo,
    fleet: Fleet,
}

async fn run_round(cli: &Cli, binary: &Path, dir: &Path) -> Result<Round> {
    eprintln!(
        "one edge: {} ConfigMaps, {} updates",
        cli.config_maps, cli.updates
    );
    let solo_dir = dir.join("one-edge");
    let mut cloud = start_cloud(binary, &solo_dir).await?;
    let outcome = measure_solo(cli, &mut cloud, binary, &solo_dir).await;
    let solo = stop_cloud(cloud, outcome).context("one edge")?;

    eprintln!(
        "fleet: {} edges x {} objects",
        cli.edges, cli.objects_per_edge
    );
    let fleet_dir = dir.join("fleet");
    let mut cloud = start_cloud(binary, &fleet_dir).await?;
    let outcome = measure_fleet(cli, &mut cloud, binary, &fleet_dir).await;
    let fleet = stop_cloud(cloud, outcome).context("fleet")?;
    Ok(Round { solo, fleet })
}

/// Stops cloudcore gracefully after a measurement, first printing its log's tail if the
/// measurement failed. (A [`Cloud`] dropped without this, on a timeout, is killed.)
fn stop_cloud<T>(mut cloud: Cloud, outcome: Result<T>) -> Result<T> {
    if outcome.is_err() {
        let log = cloud.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "last lines of the cloudcore log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    tokio::task::block_in_place(|| cloud.stop());
    outcome
}

async fn start_cloud(binary: &Path, dir: &Path) -> Result<Cloud> {
    let (binary, dir) = (binary.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || Cloud::start_binary(&binary, &dir, &[]))
        .await
        .context("the cloudcore start task panicked")?
}

/// cloudcore's RSS in KiB, failing if it is no longer running.
fn rss(cloud: &mut Cloud) -> Result<u64> {
    ensure!(cloud.is_running(), "cloudcore exited");
    bench::rss_kib(cloud.pid().context("cloudcore is not running")?)
}

/// One series from cloudcore's metrics; 0 for a labelled counter not yet created.
async fn cloud_metric(cloud: &Cloud, series: &str) -> Result<f64> {
    let page = metrics_page(cloud.metrics_port)
        .await
        .context("cannot read cloudcore's metrics")?;
    Ok(integration::metric_value(&page, series).unwrap_or(0.0))
}

async fn metrics_page(port: u16) -> Result<String> {
    tokio::task::spawn_blocking(move || integration::http_get(port, "/metrics"))
        .await
        .context("the metrics task panicked")?
        .with_context(|| format!("127.0.0.1:{port}/metrics does not answer"))
}

/// Starts every edge at once, sync only: the bench measures desired state reaching the store,
/// not pods or devices.
async fn start_edges(dirs: &[PathBuf], cloud: &str) -> Result<Vec<RunningEdge>> {
    bench::run_edges(dirs, cloud, |_| {
        edgecore::devices::DevicesConfig::disabled()
    })
    .await
}

/// Polls `cloudcore_connected_edges` until it equals `want`.
async fn wait_for_connected(cloud: &mut Cloud, want: usize) -> Result<()> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        ensure!(cloud.is_running(), "cloudcore exited");
        let now = cloud_metric(cloud, "cloudcore_connected_edges").await?;
        if now == want as f64 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("cloudcore_connected_edges is {now}, expected {want} within {CONNECT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A kube-rs client once the embedded API answers.
async fn api_client(cloud: &Cloud) -> Result<kube::Client> {
    let client = integration::kube_client(&cloud.kubeconfig()).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + API_READY_TIMEOUT;
    loop {
        match namespaces.list(&ListParams::default()).await {
            Ok(_) => return Ok(client),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context(format!(
                    "the embedded API did not answer within {API_READY_TIMEOUT:?}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn create_namespace(client: &kube::Client) -> Result<()> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .context("cannot create the bench namespace")?;
    Ok(())
}

/// `edgecore_sync_applied_total` and `edgecore_sync_skipped_total`, summed over `edges`.
async fn edge_counters(edges: &[RunningEdge]) -> Result<EdgeCounters> {
    let mut sum = EdgeCounters::default();
    for edge in edges {
        let page = metrics_page(edge.metrics_port).await?;
        let read = |series: &str| {
            integration::metric_value(&page, series)
                .with_context(|| format!("no {series} in an edge's metrics"))
        };
        sum.applied += read("edgecore_sync_applied_total")?;
        sum.skipped += read("edgecore_sync_skipped_total")?;
    }
    Ok(sum)
}

/// What the edges' and the cloud's sync counters moved by during one measurement.
#[derive(Debug, Default, Clone, Copy)]
struct EdgeCounters {
    /// Store changes the edges committed (each a new version of one object).
    applied: f64,
    /// Object messages that changed nothing at the edges.
    skipped: f64,
}

/// The cloud's sync counters.
#[derive(Debug, Default, Clone, Copy)]
struct CloudCounters {
    upserts_sent: f64,
    retransmits: f64,
    resyncs: f64,
    resync_upserts: f64,
}

async fn cloud_counters(cloud: &Cloud) -> Result<CloudCounters> {
    Ok(CloudCounters {
        upserts_sent: cloud_metric(cloud, "cloudcore_sync_objects_sent_total{op=\"upsert\"}")
            .await?,
        retransmits: cloud_metric(cloud, "cloudcore_sync_retransmits_total").await?,
        resyncs: cloud_metric(cloud, "cloudcore_sync_resyncs_total").await?,
        resync_upserts: cloud_metric(cloud, "cloudcore_sync_resync_objects_total{op=\"upsert\"}")
            .await?,
    })
}

/// What moved between two readings of both sides' counters.
#[derive(Debug, Default, Clone, Copy)]
struct SyncCounts {
    /// Upsert messages cloudcore sent (retransmits included).
    upserts_sent: f64,
    retransmits: f64,
    /// Sessions that started a resync.
    resyncs: f64,
    /// Upserts the resyncs planned from the edges' inventories.
    resync_upserts: f64,
    /// Object versions the edges committed.
    applied: f64,
    /// Object messages the edges found changed nothing.
    skipped: f64,
}

impl SyncCounts {
    fn between(
        before: (CloudCounters, EdgeCounters),
        after: (CloudCounters, EdgeCounters),
    ) -> SyncCounts {
        SyncCounts {
            upserts_sent: after.0.upserts_sent - before.0.upserts_sent,
            retransmits: after.0.retransmits - before.0.retransmits,
            resyncs: after.0.resyncs - before.0.resyncs,
            resync_upserts: after.0.resync_upserts - before.0.resync_upserts,
            applied: after.1.applied - before.1.applied,
            skipped: after.1.skipped - before.1.skipped,
        }
    }

    fn to_json(self) -> Value {
        json!({
            "cloud_upserts_sent": self.upserts_sent,
            "cloud_retransmits": self.retransmits,
            "cloud_resyncs": self.resyncs,
            "cloud_resync_upserts_planned": self.resync_upserts,
            "edge_versions_committed": self.applied,
            "edge_messages_skipped": self.skipped,
        })
    }
}

async fn counters(cloud: &Cloud, edges: &[RunningEdge]) -> Result<(CloudCounters, EdgeCounters)> {
    Ok((cloud_counters(cloud).await?, edge_counters(edges).await?))
}

/// CPU time cloudcore and this process (the in-process edges, the API client, the store
/// poller) used over one timed span, to tell a CPU-bound phase from one that waits on disks.
#[derive(Debug, Default, Clone, Copy)]
struct CpuUse {
    cloud: Duration,
    bench: Duration,
    wall: Duration,
}

impl CpuUse {
    /// CPUs kept busy on average: (cloud, bench).
    fn cores(&self) -> (f64, f64) {
        let wall = self.wall.as_secs_f64().max(1e-9);
        (
            self.cloud.as_secs_f64() / wall,
            self.bench.as_secs_f64() / wall,
        )
    }

    fn to_json(self) -> Value {
        let (cloud, bench) = self.cores();
        json!({
            "wall_s": self.wall.as_secs_f64(),
            "cloudcore_cpu_s": self.cloud.as_secs_f64(),
            "bench_cpu_s": self.bench.as_secs_f64(),
            "cloudcore_cores": cloud,
            "bench_cores": bench,
        })
    }
}

/// Where a [`CpuUse`] span starts.
struct CpuMark {
    cloud: Duration,
    bench: Duration,
    at: Instant,
}

impl CpuMark {
    fn now(cloud: &Cloud) -> Result<CpuMark> {
        Ok(CpuMark {
            cloud: bench::cpu_time(cloud.pid().context("cloudcore is not running")?)?,
            bench: bench::cpu_time(std::process::id())?,
            at: Instant::now(),
        })
    }

    fn used(&self, cloud: &Cloud) -> Result<CpuUse> {
        let now = CpuMark::now(cloud)?;
        Ok(CpuUse {
            cloud: now.cloud.saturating_sub(self.cloud),
            bench: now.bench.saturating_sub(self.bench),
            wall: now.at.duration_since(self.at),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Watching the edges' stores

/// What a [`StorePoller`] reads each cycle.
#[derive(Debug, Clone)]
enum Scope {
    /// Nothing: the poller sleeps (it would compete with the load for the CPUs).
    Idle,
    /// Every object of these kinds, in each store still to be watched.
    Kinds(&'static [&'static str]),
    /// One object of store 0 (one indexed read, so it can be polled more often).
    Key(ObjectKey),
}

/// Versions each store must reach: store index → key → resourceVersion.
type Want = HashMap<usize, HashMap<ObjectKey, u64>>;

/// Shared between the poller thread and the bench.
#[derive(Debug)]
struct PollState {
    /// Bumped by every reset; a cycle that started under an older one is discarded.
    generation: u64,
    scope: Scope,
    interval: Duration,
    /// Per (store, key): each resourceVersion seen, with when it was first seen, in order.
    history: HashMap<(usize, ObjectKey), Vec<(Instant, u64)>>,
    want: Option<Want>,
    /// Stores that hold what they should, with the moment the last wanted version was seen.
    done: HashMap<usize, Instant>,
    /// The poller stopped on an error.
    failed: Option<String>,
    cycles: u64,
    /// Time spent reading stores (not sleeping).
    busy: Duration,
}

impl PollState {
    /// When `store` first held every wanted version, if it does.
    fn reached(&self, store: usize, want: &HashMap<ObjectKey, u64>) -> Option<Instant> {
        let mut latest: Option<Instant> = None;
        for (key, &rv) in want {
            let seen = self.history.get(&(store, key.clone()))?;
            let (at, _) = seen.iter().find(|(_, held)| *held >= rv)?;
            latest = Some(latest.map_or(*at, |l| l.max(*at)));
        }
        latest
    }

    /// The versions `store` holds now at the keys it lacks, for an error message.
    fn missing(&self, store: usize, want: &HashMap<ObjectKey, u64>) -> Vec<String> {
        let mut missing: Vec<String> = want
            .iter()
            .filter_map(|(key, &rv)| {
                let held = self
                    .history
                    .get(&(store, key.clone()))
                    .and_then(|seen| seen.last())
                    .map(|(_, held)| *held);
                match held {
                    Some(held) if held >= rv => None,
                    Some(held) => Some(format!("{key} at {held}, wanted {rv}")),
                    None => Some(format!("{key} absent, wanted {rv}")),
                }
            })
            .collect();
        missing.sort();
        missing
    }
}

/// Reads the edges' stores from a thread of its own, through read-only SQLite connections that
/// see each commit of the running edges, and records when each object's version changed.
struct StorePoller {
    state: Arc<Mutex<PollState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(state: &Mutex<PollState>) -> std::sync::MutexGuard<'_, PollState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl StorePoller {
    /// Opens every edge's store (each must exist: its edge has run once) and starts polling.
    fn start(data_dirs: &[PathBuf], scope: Scope, interval: Duration) -> Result<StorePoller> {
        let stores = data_dirs
            .iter()
            .map(|dir| {
                Store::open_read_only(dir)
                    .with_context(|| format!("cannot open the store in {}", dir.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let state = Arc::new(Mutex::new(PollState {
            generation: 0,
            scope,
            interval,
            history: HashMap::new(),
            want: None,
            done: HashMap::new(),
            failed: None,
            cycles: 0,
            busy: Duration::ZERO,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("store-poller".into())
                .spawn(move || poll_stores(&stores, &state, &stop))
                .context("cannot start the store poller thread")?
        };
        Ok(StorePoller {
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// Forgets what was seen and wanted, and polls `scope` every `interval` from now on.
    fn reset(&self, scope: Scope, interval: Duration) {
        let mut state = lock(&self.state);
        state.generation += 1;
        state.scope = scope;
        state.interval = interval;
        state.history.clear();
        state.want = None;
        state.done.clear();
        state.cycles = 0;
        state.busy = Duration::ZERO;
    }

    /// Sets the versions to wait for; stores not in `want` are no longer read.
    fn set_want(&self, want: Want) {
        lock(&self.state).want = Some(want);
    }

    /// Waits until every store in the wanted set holds its versions; when each got there.
    async fn wait(&self, within: Duration) -> Result<HashMap<usize, Instant>> {
        let deadline = Instant::now() + within;
        loop {
            {
                let state = lock(&self.state);
                if let Some(why) = &state.failed {
                    bail!("reading the edge stores failed: {why}");
                }
                let want = state.want.as_ref().context("nothing to wait for")?;
                if want.keys().all(|store| state.done.contains_key(store)) {
                    return Ok(state.done.clone());
                }
                if Instant::now() >= deadline {
                    let mut lacking: Vec<(usize, Vec<String>)> = want
                        .iter()
                        .filter(|(store, _)| !state.done.contains_key(store))
                        .map(|(store, keys)| (*store, state.missing(*store, keys)))
                        .collect();
                    lacking.sort();
                    let total: usize = lacking.iter().map(|(_, m)| m.len()).sum();
                    let mut text = format!(
                        "{} of {} edge stores lack {total} objects after {within:?}:",
                        lacking.len(),
                        want.len()
                    );
                    for (store, missing) in lacking.iter().take(5) {
                        text.push_str(&format!(
                            "\n  store {store}: {} missing, e.g. {}",
                            missing.len(),
                            missing
                                .iter()
                                .take(3)
                                .cloned()
                                .collect::<Vec<_>>()
                                .join("; ")
                        ));
                    }
                    bail!(text);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Poll cycles since the last reset and the mean time one took (reading only).
    fn cycle_cost(&self) -> (u64, Duration) {
        let state = lock(&self.state);
        (
            state.cycles,
            state.busy / u32::try_from(state.cycles.max(1)).unwrap_or(u32::MAX),
        )
    }
}

impl Drop for StorePoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The poller thread: read, record changes, check the wanted versions, sleep.
fn poll_stores(stores: &[Store], state: &Mutex<PollState>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let (generation, scope, interval, watched) = {
            let state = lock(state);
            let watched: Vec<usize> = match &state.want {
                Some(want) => want
                    .keys()
                    .copied()
                    .filter(|s| !state.done.contains_key(s))
                    .collect(),
                None => (0..stores.len()).collect(),
            };
            (
                state.generation,
                state.scope.clone(),
                state.interval,
                watched,
            )
        };
        let began = Instant::now();
        let result = read_stores(stores, &scope, &watched);
        let spent = began.elapsed();
        {
            let mut state = lock(state);
            let read = match result {
                Ok(read) => read,
                Err(e) => {
                    state.failed = Some(format!("{e:#}"));
                    return;
                }
            };
            if state.generation == generation && !matches!(scope, Scope::Idle) {
                state.cycles += 1;
                state.busy += spent;
                for (index, key, rv, at) in read {
                    let seen = state.history.entry((index, key)).or_default();
                    if seen.last().is_none_or(|(_, last)| *last != rv) {
                        seen.push((at, rv));
                    }
                }
                if let Some(want) = state.want.take() {
                    for (&store, keys) in &want {
                        if !state.done.contains_key(&store)
                            && let Some(at) = state.reached(store, keys)
                        {
                            state.done.insert(store, at);
                        }
                    }
                    state.want = Some(want);
                }
            }
        }
        std::thread::sleep(interval);
    }
}

/// One read of the `watched` stores: (store, key, resourceVersion, when read) per object.
fn read_stores(
    stores: &[Store],
    scope: &Scope,
    watched: &[usize],
) -> Result<Vec<(usize, ObjectKey, u64, Instant)>> {
    let mut read = Vec::new();
    match scope {
        Scope::Idle => {}
        Scope::Kinds(kinds) => {
            for &index in watched {
                let objects = stores[index].list(kinds)?;
                let at = Instant::now();
                read.extend(
                    objects
                        .into_iter()
                        .map(|o| (index, o.key, o.resource_version, at)),
                );
            }
        }
        Scope::Key(key) => {
            if let Some(object) = stores[0].get(key)? {
                read.push((0, object.key, object.resource_version, Instant::now()));
            }
        }
    }
    Ok(read)
}

// ---------------------------------------------------------------------------------------------
// Objects

fn resource_version(meta: &ObjectMeta) -> Result<u64> {
    let rv = meta.resource_version.as_deref().unwrap_or_default();
    rv.parse()
        .with_context(|| format!("resourceVersion {rv:?} is not an integer"))
}

fn config_map_key(name: &str) -> ObjectKey {
    ObjectKey::new("ConfigMap", NAMESPACE, name)
}

fn bench_config_map(name: &str, value_bytes: usize) -> Result<ConfigMap> {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "sync-bench"}},
        "data": {"seq": "0", "filler": "x".repeat(value_bytes)},
    }))
    .context("the bench ConfigMap does not parse as a ConfigMap")
}

/// A pod bound to `node` that reads every ConfigMap in `config_maps` through `envFrom`. No
/// runtime on the edge starts it; it is there to make the edge need those ConfigMaps.
fn bench_pod(name: &str, node: &str, config_maps: &[String]) -> Result<Pod> {
    let env_from: Vec<Value> = config_maps
        .iter()
        .map(|cm| json!({"configMapRef": {"name": cm}}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "sync-bench"}},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "main",
                "image": "busybox:1.36",
                "command": ["sleep", "infinity"],
                "envFrom": env_from,
            }],
        },
    }))
    .context("the bench pod does not parse as a Pod")
}

/// Creates `config_maps` then `pods`, `concurrency` in flight; each object's key and
/// resourceVersion, and the wall time.
async fn create_objects(
    client: &kube::Client,
    config_maps: Vec<ConfigMap>,
    pods: Vec<Pod>,
    concurrency: usize,
) -> Result<(HashMap<ObjectKey, u64>, Duration)> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    let mut created = HashMap::new();
    let mut failures = Failures::default();
    let results: Vec<Result<(ObjectKey, u64), String>> = futures::stream::iter(config_maps)
        .map(|cm| {
            let cms = cms.clone();
            async move {
                let cm = cms
                    .create(&PostParams::default(), &cm)
                    .await
                    .map_err(|e| e.to_string())?;
                let rv = resource_version(&cm.metadata).map_err(|e| format!("{e:#}"))?;
                Ok((
                    config_map_key(cm.metadata.name.as_deref().unwrap_or_default()),
                    rv,
                ))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for result in results {
        match result {
            Ok((key, rv)) => {
                created.insert(key, rv);
            }
            Err(why) => failures.add(why),
        }
    }
    failures.check("ConfigMap creates")?;
    let results: Vec<Result<(ObjectKey, u64), String>> = futures::stream::iter(pods)
        .map(|pod| {
            let pod_api = pod_api.clone();
            async move {
                let pod = pod_api
                    .create(&PostParams::default(), &pod)
                    .await
                    .map_err(|e| e.to_string())?;
                let rv = resource_version(&pod.metadata).map_err(|e| format!("{e:#}"))?;
                let name = pod.metadata.name.unwrap_or_default();
                Ok((ObjectKey::new("Pod", NAMESPACE, &name), rv))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for result in results {
        match result {
            Ok((key, rv)) => {
                created.insert(key, rv);
            }
            Err(why) => failures.add(why),
        }
    }
    failures.check("pod creates")?;
    Ok((created, started.elapsed()))
}

/// A batch of ConfigMap patches.
struct Patches {
    /// From the first request sent to the last answer.
    wall: Duration,
    /// The highest resourceVersion answered per ConfigMap: the version the edge must reach.
    finals: HashMap<String, u64>,
}

/// Sends `names.len()` merge patches, patch *i* setting `data.seq` of `names[i]` to
/// `first_seq + i`, `concurrency` in flight.
async fn patch_config_maps(
    client: &kube::Client,
    names: &[String],
    first_seq: usize,
    concurrency: usize,
) -> Result<Patches> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    let results: Vec<Result<(usize, u64), String>> =
        futures::stream::iter(names.iter().enumerate())
            .map(|(i, name)| {
                let cms = cms.clone();
                async move {
                    let patch = json!({"data": {"seq": (first_seq + i).to_string()}});
                    let cm = cms
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|e| e.to_string())?;
                    let rv = resource_version(&cm.metadata).map_err(|e| format!("{e:#}"))?;
                    Ok((i, rv))
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
    let wall = started.elapsed();
    let mut finals: HashMap<String, u64> = HashMap::new();
    let mut failures = Failures::default();
    for result in results {
        match result {
            Ok((i, rv)) => {
                let latest = finals.entry(names[i].clone()).or_insert(rv);
                *latest = (*latest).max(rv);
            }
            Err(why) => failures.add(why),
        }
    }
    failures.check("ConfigMap patches")?;
    Ok(Patches { wall, finals })
}

/// Updates sent and the time until the edges held the final versions.
struct Throughput {
    updates: usize,
    /// The API side alone: from the first patch sent to the last answer.
    patch_wall: Duration,
    /// From the first patch sent until every edge store held every final version.
    elapsed: Duration,
    /// From the first patch sent until a watcher of the API (beside cloudcore's) had received
    /// every final version.
    watched: Duration,
    /// What the sync did meanwhile.
    counts: SyncCounts,
    /// Mean time of one read of the watched stores.
    poll_cycle: Duration,
    cpu: CpuUse,
}

impl Throughput {
    fn objects_per_sec(&self) -> f64 {
        self.updates as f64 / self.elapsed.as_secs_f64()
    }
    fn patches_per_sec(&self) -> f64 {
        self.updates as f64 / self.patch_wall.as_secs_f64()
    }
    /// How long after the last patch's answer the edges were done (0 if before).
    fn tail(&self) -> Duration {
        self.elapsed.saturating_sub(self.patch_wall)
    }
    /// How long after the last patch's answer the API's watch had delivered everything.
    fn watch_tail(&self) -> Duration {
        self.watched.saturating_sub(self.patch_wall)
    }
    fn to_json(&self) -> Value {
        json!({
            "updates": self.updates,
            "patch_wall_s": self.patch_wall.as_secs_f64(),
            "patches_per_sec": self.patches_per_sec(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "objects_per_sec": self.objects_per_sec(),
            "tail_after_last_patch_ms": ms(self.tail()),
            "api_watch_s": self.watched.as_secs_f64(),
            "api_watch_tail_after_last_patch_ms": ms(self.watch_tail()),
            "sync": self.counts.to_json(),
            "poll_cycle_us": self.poll_cycle.as_secs_f64() * 1e6,
            "cpu": self.cpu.to_json(),
        })
    }
}

/// Per ConfigMap name: each resourceVersion a watch received, with when.
type Received = HashMap<String, Vec<(Instant, u64)>>;

/// A kube-rs watch on the bench's ConfigMaps beside the edges, like cloudcore's own watch:
/// when the API delivered each version to a watcher. It splits the end-to-end time into the
/// API's part and the tunnel's and edge's part.
struct ApiWatch {
    seen: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Drop for ApiWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiWatch {
    /// Opens the watch from the current resourceVersion; it is registered at the server when
    /// this returns.
    async fn start(client: &kube::Client) -> Result<ApiWatch> {
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
        let from = cms
            .list(&ListParams::default())
            .await
            .context("cannot list the ConfigMaps")?
            .metadata
            .resource_version
            .context("the ConfigMap list has no resourceVersion")?;
        let mut stream = cms
            .watch(&WatchParams::default(), &from)
            .await
            .context("cannot watch the ConfigMaps")?
            .boxed();
        let seen: Arc<Mutex<Received>> = Arc::default();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(event) = stream.next().await {
                    let at = Instant::now();
                    let cm = match event.context("the ConfigMap watch failed")? {
                        WatchEvent::Added(cm) | WatchEvent::Modified(cm) => cm,
                        WatchEvent::Deleted(_) | WatchEvent::Bookmark(_) => continue,
                        WatchEvent::Error(status) => bail!("watch ERROR event: {status:?}"),
                    };
                    let rv = resource_version(&cm.metadata)?;
                    let name = cm.metadata.name.unwrap_or_default();
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(name)
                        .or_default()
                        .push((at, rv));
                }
                Ok(())
            })
        };
        Ok(ApiWatch { seen, task })
    }

    /// When the watch had received every final version, waiting up to `within`.
    async fn reached(
        &mut self,
        finals: &HashMap<String, u64>,
        within: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            {
                let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                let firsts: Option<Vec<Instant>> = finals
                    .iter()
                    .map(|(name, &rv)| {
                        seen.get(name)?
                            .iter()
                            .find(|(_, got)| *got >= rv)
                            .map(|(at, _)| *at)
                    })
                    .collect();
                if let Some(firsts) = firsts {
                    return firsts.into_iter().max().context("no ConfigMap was patched");
                }
            }
            if self.task.is_finished() {
                (&mut self.task)
                    .await
                    .context("the watch task panicked")??;
                bail!("the ConfigMap watch ended before every final version arrived");
            }
            ensure!(
                Instant::now() < deadline,
                "the ConfigMap watch lacks final versions after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// When the poller reads the stores during [`timed_updates`].
#[derive(Debug, Clone, Copy)]
enum StoreReads {
    /// From before the first patch, so each commit is timed exactly (one store: cheap).
    Throughout,
    /// Only from the last patch's answer on, so reading many stores does not take CPU from the
    /// writes; a store that is done earlier counts as done when first read.
    AfterWrites,
}

/// Sends one patch per `plan` entry (edge store index, ConfigMap name), waits until every
/// store holds the final versions, and times it from the first patch sent.
async fn timed_updates(
    client: &kube::Client,
    cloud: &Cloud,
    edges: &[RunningEdge],
    poller: &StorePoller,
    plan: &[(usize, String)],
    concurrency: usize,
    (reads, interval): (StoreReads, Duration),
) -> Result<Throughput> {
    let before = counters(cloud, edges).await?;
    match reads {
        StoreReads::Throughout => {
            poller.reset(Scope::Kinds(&["ConfigMap"]), interval);
            // Let the poller record the versions held before the first patch.
            tokio::time::sleep(interval * 3).await;
        }
        StoreReads::AfterWrites => poller.reset(Scope::Idle, interval),
    }
    let names: Vec<String> = plan.iter().map(|(_, name)| name.clone()).collect();
    let store_of: HashMap<&str, usize> = plan
        .iter()
        .map(|(store, name)| (name.as_str(), *store))
        .collect();
    let mut api_watch = ApiWatch::start(client).await?;
    let cpu = CpuMark::now(cloud)?;
    let started = Instant::now();
    let patches = patch_config_maps(client, &names, 1, concurrency).await?;
    if let StoreReads::AfterWrites = reads {
        poller.reset(Scope::Kinds(&["ConfigMap"]), interval);
    }
    let mut want: Want = HashMap::new();
    for (name, rv) in &patches.finals {
        let store = *store_of
            .get(name.as_str())
            .with_context(|| format!("ConfigMap {name} was not patched"))?;
        want.entry(store)
            .or_default()
            .insert(config_map_key(name), *rv);
    }
    poller.set_want(want);
    let done = poller.wait(CONVERGE_TIMEOUT).await?;
    let cpu = cpu.used(cloud)?;
    let last = done.values().max().copied().unwrap_or(started);
    let (_, poll_cycle) = poller.cycle_cost();
    let watched = api_watch
        .reached(&patches.finals, CONVERGE_TIMEOUT)
        .await?
        .saturating_duration_since(started);
    drop(api_watch);
    // Counters settle once the acknowledgements are in; the store already shows the commits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = counters(cloud, edges).await?;
    Ok(Throughput {
        updates: plan.len(),
        patch_wall: patches.wall,
        elapsed: last.saturating_duration_since(started),
        watched,
        counts: SyncCounts::between(before, after),
        poll_cycle,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// One edge

/// The one-edge part's figures.
struct Solo {
    /// Objects created first: the ConfigMaps and the pod.
    initial_objects: usize,
    /// From their first create until all were durable at the edge.
    initial: Duration,
    throughput: Throughput,
    /// Per sample, patch sent → new version seen in the edge's store; sorted.
    latencies: Vec<Duration>,
    /// Mean poll cycle of the latency phase (its resolution).
    latency_poll: Duration,
}

async fn measure_solo(cli: &Cli, cloud: &mut Cloud, binary: &Path, dir: &Path) -> Result<Solo> {
    let client = api_client(cloud).await?;
    create_namespace(&client).await?;
    let token = create_token(binary, cloud, 1).await?;
    let dirs = join_edges(&token, &[SOLO_NODE.to_string()], &dir.join("edges"), 1).await?;
    let mut edges = start_edges(&dirs, &cloud.address()).await?;
    wait_for_connected(cloud, 1).await?;
    let poller = StorePoller::start(&dirs, Scope::Kinds(&["Node"]), POLL_ONE_EDGE)?;
    poller.set_want(HashMap::from([(
        0,
        HashMap::from([(ObjectKey::new("Node", "", SOLO_NODE), 1)]),
    )]));
    poller
        .wait(CONNECT_TIMEOUT)
        .await
        .context("the edge's Node")?;

    // The pod and its ConfigMaps.
    let names: Vec<String> = (0..cli.config_maps)
        .map(|i| format!("solo-{i:04}"))
        .collect();
    let config_maps = names
        .iter()
        .map(|n| bench_config_map(n, cli.value_bytes))
        .collect::<Result<Vec<_>>>()?;
    let pod = bench_pod("solo", SOLO_NODE, &names)?;
    poller.reset(Scope::Kinds(&["ConfigMap", "Pod"]), POLL_ONE_EDGE);
    let started = Instant::now();
    let (created, _) = create_objects(&client, config_maps, vec![pod], cli.concurrency).await?;
    let initial_objects = created.len();
    poller.set_want(HashMap::from([(0, created)]));
    let done = poller
        .wait(CONVERGE_TIMEOUT)
        .await
        .context("the pod and its ConfigMaps")?;
    let initial = done
        .get(&0)
        .context("the edge's store was not waited for")?
        .saturating_duration_since(started);

    eprintln!(
        "one edge: {} updates ({} in flight)",
        cli.updates, cli.concurrency
    );
    let plan: Vec<(usize, String)> = (0..cli.updates)
        .map(|i| (0, names[i % names.len()].clone()))
        .collect();
    let throughput = timed_updates(
        &client,
        cloud,
        &edges,
        &poller,
        &plan,
        cli.concurrency,
        (StoreReads::Throughout, POLL_ONE_EDGE),
    )
    .await
    .context("throughput")?;

    eprintln!("one edge: {} sequential updates", cli.latency_samples);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let mut latencies = Vec::with_capacity(cli.latency_samples);
    let mut polls = (0u64, Duration::ZERO);
    for sample in 0..cli.latency_samples {
        let name = &names[sample % names.len()];
        let key = config_map_key(name);
        poller.reset(Scope::Key(key.clone()), POLL_LATENCY);
        // The poller has seen the version held before the patch.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let patch = json!({"data": {"seq": format!("latency-{sample}")}});
        let began = Instant::now();
        let cm = cms
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("latency sample {sample}: patch {name}"))?;
        let rv = resource_version(&cm.metadata)?;
        poller.set_want(HashMap::from([(0, HashMap::from([(key, rv)]))]));
        let done = poller
            .wait(CONVERGE_TIMEOUT)
            .await
            .with_context(|| format!("latency sample {sample}"))?;
        let seen = done
            .get(&0)
            .context("the edge's store was not waited for")?;
        latencies.push(seen.saturating_duration_since(began));
        let (cycles, mean) = poller.cycle_cost();
        polls.0 += cycles;
        polls.1 += mean * u32::try_from(cycles).unwrap_or(u32::MAX);
    }
    latencies.sort();
    drop(poller);
    stop_edges(std::mem::take(&mut edges)).await?;
    Ok(Solo {
        initial_objects,
        initial,
        throughput,
        latencies,
        latency_poll: polls.1 / u32::try_from(polls.0.max(1)).unwrap_or(u32::MAX),
    })
}

// ---------------------------------------------------------------------------------------------
// Fleet

/// The fleet part's figures.
struct Fleet {
    edges: usize,
    /// cloudcore after the joins, before any edge connected.
    rss_joined_kib: u64,
    /// Every edge connected once, holding only its Node.
    rss_connected_empty_kib: u64,
    /// After a restart with the edges away: nodes known, no pod or ConfigMap (A0).
    rss_restarted_kib: u64,
    creates: usize,
    create_wall: Duration,
    /// With every object created, every edge away (A).
    rss_objects_kib: u64,
    resync: Resync,
    /// Every edge connected and holding its objects (B).
    rss_synced_kib: u64,
    live: Throughput,
    /// Mean time of one poll cycle over the stores still resyncing.
    poll_cycle: Duration,
}

impl Fleet {
    /// (A − A0) / edges: desired state cached for away edges, the API's copy included.
    fn kib_per_edge_cached(&self) -> f64 {
        (self.rss_objects_kib as f64 - self.rss_restarted_kib as f64) / self.edges as f64
    }
    /// (B − A) / edges: a connected session holding its objects.
    fn kib_per_edge_connected(&self) -> f64 {
        (self.rss_synced_kib as f64 - self.rss_objects_kib as f64) / self.edges as f64
    }
    /// Connected without objects, against the fresh process.
    fn kib_per_edge_first_connect(&self) -> f64 {
        (self.rss_connected_empty_kib as f64 - self.rss_joined_kib as f64) / self.edges as f64
    }
}

/// The reconnect of the whole fleet.
struct Resync {
    objects: usize,
    /// From starting the edges until every store held every object.
    elapsed: Duration,
    /// Per edge, from the start until its store held its objects; sorted.
    per_edge: Vec<Duration>,
    counts: SyncCounts,
    cpu: CpuUse,
}

impl Resync {
    fn objects_per_sec(&self) -> f64 {
        self.objects as f64 / self.elapsed.as_secs_f64()
    }
}

async fn measure_fleet(cli: &Cli, cloud: &mut Cloud, binary: &Path, dir: &Path) -> Result<Fleet> {
    let quiet = Duration::from_secs(cli.quiet_secs);
    let fleet_poll = Duration::from_millis(cli.fleet_poll_ms);
    let client = api_client(cloud).await?;
    create_namespace(&client).await?;
    let token = create_token(binary, cloud, cli.edges).await?;
    let names: Vec<String> = (0..cli.edges).map(|i| node_name(cli.edges, i)).collect();
    eprintln!("fleet: joining {} edges", cli.edges);
    let dirs = join_edges(&token, &names, &dir.join("edges"), cli.join_concurrency).await?;
    tokio::time::sleep(quiet).await;
    let rss_joined_kib = rss(cloud)?;

    // Connect once, so every Node exists and every store has been created.
    eprintln!("fleet: first connect");
    let edges = start_edges(&dirs, &cloud.address()).await?;
    wait_for_connected(cloud, cli.edges).await?;
    {
        let poller = StorePoller::start(&dirs, Scope::Kinds(&["Node"]), fleet_poll)?;
        poller.set_want(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (i, HashMap::from([(ObjectKey::new("Node", "", n), 1)])))
                .collect(),
        );
        poller
            .wait(CONNECT_TIMEOUT)
            .await
            .context("the edges' Nodes")?;
    }
    tokio::time::sleep(quiet).await;
    let rss_connected_empty_kib = rss(cloud)?;
    stop_edges(edges).await?;
    wait_for_connected(cloud, 0).await?;

    // A fresh process: memory a session used is not kept by the allocator into A0.
    eprintln!("fleet: restarting cloudcore with the edges away");
    tokio::task::block_in_place(|| cloud.stop());
    let first_log = cloud.dir.join("serve-1.log");
    let _ = std::fs::rename(&first_log, cloud.dir.join("serve-0-first-start.log"));
    *cloud = start_cloud(binary, dir).await?;
    let client = api_client(cloud).await?;
    tokio::time::sleep(quiet).await;
    let rss_restarted_kib = rss(cloud)?;

    // Every edge's pod and ConfigMaps, created while every edge is away.
    let per_edge_cms = cli.objects_per_edge - 1;
    let mut config_maps = Vec::with_capacity(cli.edges * per_edge_cms);
    let mut pods = Vec::with_capacity(cli.edges);
    let mut cm_names: Vec<Vec<String>> = Vec::with_capacity(cli.edges);
    for node in &names {
        let own: Vec<String> = (0..per_edge_cms)
            .map(|i| format!("{node}-cm-{i:03}"))
            .collect();
        for name in &own {
            config_maps.push(bench_config_map(name, cli.value_bytes)?);
        }
        pods.push(bench_pod(&format!("{node}-pod"), node, &own)?);
        cm_names.push(own);
    }
    eprintln!(
        "fleet: creating {} ConfigMaps and {} pods ({} in flight)",
        config_maps.len(),
        pods.len(),
        cli.concurrency
    );
    let (created, create_wall) =
        create_objects(&client, config_maps, pods, cli.concurrency).await?;
    let creates = created.len();
    tokio::time::sleep(quiet).await;
    let rss_objects_kib = rss(cloud)?;

    // The reconnect: every edge at once, each resyncing its 100 objects.
    let mut want: Want = HashMap::new();
    for (index, node) in names.iter().enumerate() {
        let keys = std::iter::once(ObjectKey::new("Pod", NAMESPACE, &format!("{node}-pod")))
            .chain(cm_names[index].iter().map(|name| config_map_key(name)));
        let mine = want.entry(index).or_default();
        for key in keys {
            let rv = *created
                .get(&key)
                .with_context(|| format!("{key} was not created"))?;
            mine.insert(key, rv);
        }
    }
    let objects: usize = want.values().map(HashMap::len).sum();
    let poller = StorePoller::start(&dirs, Scope::Kinds(&["ConfigMap", "Pod"]), fleet_poll)?;
    poller.set_want(want);
    let before = (cloud_counters(cloud).await?, EdgeCounters::default());
    eprintln!("fleet: starting {} edges at once", cli.edges);
    let cpu = CpuMark::now(cloud)?;
    let started = Instant::now();
    let edges = start_edges(&dirs, &cloud.address()).await?;
    let done = poller
        .wait(CONVERGE_TIMEOUT)
        .await
        .context("the fleet's resync")?;
    let cpu = cpu.used(cloud)?;
    let mut per_edge: Vec<Duration> = done
        .values()
        .map(|at| at.saturating_duration_since(started))
        .collect();
    per_edge.sort();
    let elapsed = per_edge.last().copied().unwrap_or_default();
    let (_, poll_cycle) = poller.cycle_cost();
    wait_for_connected(cloud, cli.edges).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = counters(cloud, &edges).await?;
    let resync = Resync {
        objects,
        elapsed,
        per_edge,
        counts: SyncCounts::between(before, after),
        cpu,
    };
    tokio::time::sleep(quiet).await;
    let rss_synced_kib = rss(cloud)?;

    eprintln!(
        "fleet: {} updates over every edge's ConfigMaps ({} in flight)",
        cli.updates, cli.concurrency
    );
    let plan: Vec<(usize, String)> = (0..cli.updates)
        .map(|i| {
            let edge = i % cli.edges;
            let own = &cm_names[edge];
            (edge, own[(i / cli.edges) % own.len()].clone())
        })
        .collect();
    let live = timed_updates(
        &client,
        cloud,
        &edges,
        &poller,
        &plan,
        cli.concurrency,
        (StoreReads::AfterWrites, fleet_poll),
    )
    .await
    .context("live updates")?;
    drop(poller);
    stop_edges(edges).await?;
    Ok(Fleet {
        edges: cli.edges,
        rss_joined_kib,
        rss_connected_empty_kib,
        rss_restarted_kib,
        creates,
        create_wall,
        rss_objects_kib,
        resync,
        rss_synced_kib,
        live,
        poll_cycle,
    })
}

// ---------------------------------------------------------------------------------------------
// The store probe

/// What one commit costs in the edge's store on this disk, through `edgecore::store` itself.
struct Probe {
    /// Median time of a transaction writing one object.
    single: Duration,
    /// Median time of a transaction writing `PROBE_BATCH` objects.
    batch: Duration,
}

/// Commits `PROBE_COMMITS` transactions of one object and as many of `PROBE_BATCH` objects into
/// a scratch store next to the edges' (same disk, same `synchronous=FULL`), timing each.
async fn probe_store(dir: &Path, value_bytes: usize) -> Result<Probe> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&dir).context("cannot open the probe store")?;
        let body = vec![b'x'; value_bytes + 300];
        let mut rv = 0u64;
        let mut timed = |ops_per_commit: usize| -> Result<Duration> {
            let mut times = Vec::with_capacity(PROBE_COMMITS);
            for _ in 0..PROBE_COMMITS {
                let ops: Vec<StoreOp> = (0..ops_per_commit)
                    .map(|i| {
                        rv += 1;
                        StoreOp::Put {
                            key: config_map_key(&format!("probe-{i:03}")),
                            uid: format!("uid-{i}"),
                            resource_version: rv,
                            body: body.clone(),
                        }
                    })
                    .collect();
                let began = Instant::now();
                store.apply(&ops).context("a probe commit failed")?;
                times.push(began.elapsed());
            }
            times.sort();
            Ok(percentile(&times, 0.5))
        };
        Ok(Probe {
            single: timed(1)?,
            batch: timed(PROBE_BATCH)?,
        })
    })
    .await
    .context("the store probe panicked")?
}

// ---------------------------------------------------------------------------------------------
// Report

/// The settings a run used.
struct Settings {
    edges: usize,
    objects_per_edge: usize,
    config_maps: usize,
    updates: usize,
    latency_samples: usize,
    concurrency: usize,
    value_bytes: usize,
    fleet_poll_ms: u64,
}

impl Settings {
    fn of(cli: &Cli) -> Settings {
        Settings {
            edges: cli.edges,
            objects_per_edge: cli.objects_per_edge,
            config_maps: cli.config_maps,
            updates: cli.updates,
            latency_samples: cli.latency_samples,
            concurrency: cli.concurrency,
            value_bytes: cli.value_bytes,
            fleet_poll_ms: cli.fleet_poll_ms,
        }
    }
}

/// Everything measured.
struct Report {
    cli: Settings,
    machine: Machine,
    probe: Probe,
    rounds: Vec<Round>,
}

impl bench::Report for Report {
    fn table(&self) -> String {
        Report::table(self)
    }

    fn to_json(&self) -> Value {
        Report::to_json(self)
    }
}

impl Report {
    fn spread(&self, figure: impl Fn(&Round) -> f64) -> Spread {
        Spread::of(self.rounds.iter().map(figure))
    }

    /// The headline figures: name, spread across rounds, unit.
    fn summary(&self) -> Vec<(&'static str, Spread, &'static str)> {
        vec![
            (
                "1 edge: objects/s (updates)",
                self.spread(|r| r.solo.throughput.objects_per_sec()),
                "/s ",
            ),
            (
                "1 edge: patches/s (API alone)",
                self.spread(|r| r.solo.throughput.patches_per_sec()),
                "/s ",
            ),
            (
                "1 edge: versions committed",
                self.spread(|r| r.solo.throughput.counts.applied),
                "   ",
            ),
            (
                "1 edge: latency p50",
                self.spread(|r| ms(percentile(&r.solo.latencies, 0.5))),
                "ms ",
            ),
            (
                "1 edge: latency p90",
                self.spread(|r| ms(percentile(&r.solo.latencies, 0.9))),
                "ms ",
            ),
            (
                "1 edge: latency p99",
                self.spread(|r| ms(percentile(&r.solo.latencies, 0.99))),
                "ms ",
            ),
            (
                "fleet: resync objects/s",
                self.spread(|r| r.fleet.resync.objects_per_sec()),
                "/s ",
            ),
            (
                "fleet: resync wall",
                self.spread(|r| r.fleet.resync.elapsed.as_secs_f64()),
                "s  ",
            ),
            (
                "fleet: live objects/s (updates)",
                self.spread(|r| r.fleet.live.objects_per_sec()),
                "/s ",
            ),
            (
                "fleet: live patches/s (API)",
                self.spread(|r| r.fleet.live.patches_per_sec()),
                "/s ",
            ),
            (
                "fleet: versions committed",
                self.spread(|r| r.fleet.live.counts.applied),
                "   ",
            ),
            (
                "memory/edge, cached (A-A0)",
                self.spread(|r| r.fleet.kib_per_edge_cached()),
                "KiB",
            ),
            (
                "memory/edge, connected (B-A)",
                self.spread(|r| r.fleet.kib_per_edge_connected()),
                "KiB",
            ),
            (
                "memory/edge, first connect",
                self.spread(|r| r.fleet.kib_per_edge_first_connect()),
                "KiB",
            ),
            (
                "cloudcore RSS, synced fleet",
                self.spread(|r| mib(r.fleet.rss_synced_kib)),
                "MiB",
            ),
        ]
    }

    fn table(&self) -> String {
        let m = &self.machine;
        let c = &self.cli;
        let mut out = format!(
            "sync-bench: 1 edge x {} ConfigMaps; {} edges x {} objects; {} updates, {} latency \
             samples, {} requests in flight, {} B filler per ConfigMap, {} rounds\n\
             machine: {} CPUs ({}), {} MiB, Linux {}\n\
             edge store on this disk: {:.2} ms per commit of 1 object, {:.2} ms per commit of {} \
             (median of {PROBE_COMMITS})\n\n",
            c.config_maps,
            c.edges,
            c.objects_per_edge,
            c.updates,
            c.latency_samples,
            c.concurrency,
            c.value_bytes,
            self.rounds.len(),
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel,
            ms(self.probe.single),
            ms(self.probe.batch),
            PROBE_BATCH,
        );
        let throughput_header = |name: &str| {
            format!(
                "{name:<14} {:>9} {:>9} {:>8} {:>8} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>7}\n",
                "objects/s",
                "patches/s",
                "watch ms",
                "tail ms",
                "sent",
                "retrans",
                "commits",
                "skipped",
                "cloud",
                "bench",
                "poll us"
            )
        };
        let throughput_row = |name: String, t: &Throughput| {
            let (cloud, bench) = t.cpu.cores();
            format!(
                "{name:<14} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>7.0} {:>7.0} {:>8.0} {:>7.0} {:>6.2} {:>6.2} {:>7.0}\n",
                t.objects_per_sec(),
                t.patches_per_sec(),
                ms(t.watch_tail()),
                ms(t.tail()),
                t.counts.upserts_sent,
                t.counts.retransmits,
                t.counts.applied,
                t.counts.skipped,
                cloud,
                bench,
                t.poll_cycle.as_secs_f64() * 1e6,
            )
        };
        out.push_str(&throughput_header("updates"));
        for (i, r) in self.rounds.iter().enumerate() {
            out.push_str(&throughput_row(
                format!("{} 1 edge", i + 1),
                &r.solo.throughput,
            ));
            out.push_str(&throughput_row(
                format!("{} {} edges", i + 1, c.edges),
                &r.fleet.live,
            ));
        }
        out.push_str(
            "(objects/s: updates / time from the first patch sent until every final version was \
             durable at the edges; patches/s: the API alone; watch, tail: a watcher of the API had \
             every final version, the edges had them durable, after the last patch's answer; sent: upserts cloudcore sent; commits: object versions the edges committed; \
             cloud, bench: CPUs kept busy by cloudcore and by this process with its in-process \
             edges; poll us: one read of the watched stores)\n\n",
        );

        out.push_str(&format!(
            "{:<6} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
            "1 edge", "initial s", "p50 ms", "p90 ms", "p99 ms", "max ms", "poll us"
        ));
        for (i, r) in self.rounds.iter().enumerate() {
            let s = &r.solo;
            out.push_str(&format!(
                "{:<6} {:>9.3} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.0}\n",
                i + 1,
                s.initial.as_secs_f64(),
                ms(percentile(&s.latencies, 0.5)),
                ms(percentile(&s.latencies, 0.9)),
                ms(percentile(&s.latencies, 0.99)),
                ms(s.latencies.last().copied().unwrap_or_default()),
                s.latency_poll.as_secs_f64() * 1e6,
            ));
        }
        out.push_str(
            "(initial: the pod and its ConfigMaps, first create to durable; latency: one patch at \
             a time, request sent to new version durable)\n\n",
        );

        out.push_str(&format!(
            "{:<6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7}\n",
            "resync",
            "creates/s",
            "objects/s",
            "wall s",
            "edge p50",
            "edge max",
            "commits",
            "cloud",
            "bench",
            "poll ms",
        ));
        for (i, r) in self.rounds.iter().enumerate() {
            let f = &r.fleet;
            let (cloud, bench) = f.resync.cpu.cores();
            out.push_str(&format!(
                "{:<6} {:>9.0} {:>9.0} {:>9.3} {:>8.3} {:>8.3} {:>8.0} {:>6.2} {:>6.2} {:>7.2}\n",
                i + 1,
                f.creates as f64 / f.create_wall.as_secs_f64(),
                f.resync.objects_per_sec(),
                f.resync.elapsed.as_secs_f64(),
                percentile(&f.resync.per_edge, 0.5).as_secs_f64(),
                f.resync
                    .per_edge
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64(),
                f.resync.counts.applied,
                cloud,
                bench,
                ms(f.poll_cycle),
            ));
        }
        out.push_str(&format!(
            "(creates/s: the {} objects created while every edge was away; objects/s: those \
             objects / time from starting every edge until every store held its own)\n\n",
            c.edges * c.objects_per_edge
        ));

        out.push_str(&format!(
            "{:<6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}\n",
            "memory", "joined", "conn'd", "A0", "A", "B", "cached", "connected", "1st conn",
        ));
        for (i, r) in self.rounds.iter().enumerate() {
            let f = &r.fleet;
            out.push_str(&format!(
                "{:<6} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1}\n",
                i + 1,
                mib(f.rss_joined_kib),
                mib(f.rss_connected_empty_kib),
                mib(f.rss_restarted_kib),
                mib(f.rss_objects_kib),
                mib(f.rss_synced_kib),
                f.kib_per_edge_cached(),
                f.kib_per_edge_connected(),
                f.kib_per_edge_first_connect(),
            ));
        }
        out.push_str(
            "(cloudcore RSS in MiB: joined, none connected; conn'd: all connected once, no \
             objects; A0: restarted, edges away; A: objects created, edges away; B: every edge \
             connected and synced. KiB per edge: cached (A-A0), connected (B-A), 1st conn \
             (conn'd-joined))\n",
        );
        out.push_str("\nmedian across rounds (min .. max)\n");
        for (name, s, unit) in self.summary() {
            out.push_str(&format!(
                "{name:<32} {:>9.1} {unit}  ({:.1} .. {:.1})\n",
                s.median, s.min, s.max
            ));
        }
        out
    }

    fn to_json(&self) -> Value {
        let c = &self.cli;
        json!({
            "settings": {
                "edges": c.edges,
                "objects_per_edge": c.objects_per_edge,
                "config_maps": c.config_maps,
                "updates": c.updates,
                "latency_samples": c.latency_samples,
                "concurrency": c.concurrency,
                "value_bytes": c.value_bytes,
                "fleet_poll_ms": c.fleet_poll_ms,
            },
            "machine": self.machine.to_json(),
            "store_probe": {
                "commits": PROBE_COMMITS,
                "single_object_commit_ms": ms(self.probe.single),
                "batch_objects": PROBE_BATCH,
                "batch_commit_ms": ms(self.probe.batch),
            },
            "rounds": self.rounds.iter().map(|r| {
                let s = &r.solo;
                let f = &r.fleet;
                json!({
                    "one_edge": {
                        "initial_objects": s.initial_objects,
                        "initial_s": s.initial.as_secs_f64(),
                        "throughput": s.throughput.to_json(),
                        "latency": {
                            "samples": s.latencies.len(),
                            "p50_ms": ms(percentile(&s.latencies, 0.5)),
                            "p90_ms": ms(percentile(&s.latencies, 0.9)),
                            "p99_ms": ms(percentile(&s.latencies, 0.99)),
                            "max_ms": ms(s.latencies.last().copied().unwrap_or_default()),
                            "poll_cycle_us": s.latency_poll.as_secs_f64() * 1e6,
                        },
                    },
                    "fleet": {
                        "edges": f.edges,
                        "creates": f.creates,
                        "create_wall_s": f.create_wall.as_secs_f64(),
                        "resync": {
                            "objects": f.resync.objects,
                            "elapsed_s": f.resync.elapsed.as_secs_f64(),
                            "objects_per_sec": f.resync.objects_per_sec(),
                            "per_edge_p50_s": percentile(&f.resync.per_edge, 0.5).as_secs_f64(),
                            "per_edge_p99_s": percentile(&f.resync.per_edge, 0.99).as_secs_f64(),
                            "sync": f.resync.counts.to_json(),
                            "cpu": f.resync.cpu.to_json(),
                        },
                        "live": f.live.to_json(),
                        "rss_kib": {
                            "joined": f.rss_joined_kib,
                            "connected_no_objects": f.rss_connected_empty_kib,
                            "restarted_edges_away": f.rss_restarted_kib,
                            "objects_edges_away": f.rss_objects_kib,
                            "synced": f.rss_synced_kib,
                        },
                        "kib_per_edge_cached": f.kib_per_edge_cached(),
                        "kib_per_edge_connected": f.kib_per_edge_connected(),
                        "kib_per_edge_first_connect": f.kib_per_edge_first_connect(),
                        "poll_cycle_ms": ms(f.poll_cycle),
                    },
                })
            }).collect::<Vec<_>>(),
            "summary": self.summary().into_iter().map(|(name, spread, unit)| json!({
                "figure": name,
                "unit": unit.trim(),
                "spread": spread.to_json(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_sort_in_order() {
        assert_eq!(node_name(100, 7), "bench-007");
        assert_eq!(node_name(1000, 7), "bench-007");
        assert_eq!(node_name(1001, 7), "bench-0007");
    }

    #[test]
    fn the_bench_pod_is_bound_and_references_every_config_map() {
        let names = vec!["a".to_string(), "b".to_string()];
        let pod = bench_pod("p", "node-1", &names).expect("pod");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        let referenced: Vec<String> = spec.containers[0]
            .env_from
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.config_map_ref.as_ref().map(|r| r.name.clone()))
            .collect();
        assert_eq!(referenced, names);
    }

    #[test]
    fn a_store_is_done_when_every_wanted_version_was_seen() {
        let t0 = Instant::now();
        let (a, b) = (config_map_key("a"), config_map_key("b"));
        let mut state = PollState {
            generation: 0,
            scope: Scope::Kinds(&["ConfigMap"]),
            interval: Duration::ZERO,
            history: HashMap::new(),
            want: None,
            done: HashMap::new(),
            failed: None,
            cycles: 0,
            busy: Duration::ZERO,
        };
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        state
            .history
            .insert((0, a.clone()), vec![(at(0), 5), (at(10), 7), (at(20), 9)]);
        state.history.insert((0, b.clone()), vec![(at(5), 8)]);
        let want = HashMap::from([(a.clone(), 7), (b.clone(), 8)]);
        assert_eq!(state.reached(0, &want), Some(at(10)));
        let later = HashMap::from([(a, 10), (b, 8)]);
        assert_eq!(state.reached(0, &later), None);
        assert_eq!(
            state.missing(0, &later),
            vec!["ConfigMap sync-bench/a at 9, wanted 10".to_string()]
        );
    }
}
