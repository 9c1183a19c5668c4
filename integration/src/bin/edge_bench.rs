//! `edge-bench`: a load generator that measures how fast one real `cloudcore serve` accepts
//! tunnel sessions from already-joined edges, and how much memory each idle connected edge costs
//! it. Everything runs on 127.0.0.1; the edges are in-process `edgecore` clients.
//!
//! Phases: start cloudcore in a temp dir → create one token with `--uses N` through the real CLI
//! → join N nodes in-process → then `--rounds` times: (re)start cloudcore on the same data dir,
//! read its RSS, open N sessions (TLS 1.3 mutual auth + Hello/HelloAck) and time them, keep them
//! idle, read RSS and `cloudcore_connected_edges` again, disconnect everyone and wait for the
//! gauge to reach 0. Results are a table on stdout (or JSON with `--json`); medians are quoted
//! across rounds.
//!
//! Each round gets a fresh cloudcore by default because the allocator keeps freed memory: after
//! a round's edges leave, RSS stays near its peak, so a second round in the same process would
//! measure against an inflated baseline. `--between-rounds keep` reuses one process to watch
//! exactly that (retention or leaks across reconnect waves).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use edgecore::hub::{HubConfig, Session};
use edgecore::identity::Identity;
use edgecore::join::JoinParams;
use edgecore::metrics::Metrics;
use integration::bench::{self, Failures, Machine, Spread, mib, ms, percentile};
use integration::metric_value;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad command line (EX_USAGE), as in the daemons.
/// How long cloudcore may take to answer `/healthz` after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long cloudcore may take to count sessions that have their HelloAck.
const COUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gauge may take to fall to 0 after the edges close (above the 30 s idle timeout,
/// so even sessions whose close packet was lost are gone by then).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(40);
/// Quiet time before an RSS reading with no edges, so finished connection tasks are gone.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "edge-bench",
    about = "Measures cloudcore's session handshakes per second and memory per idle connected edge"
)]
struct Cli {
    /// Edges to join and connect.
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// Connect / idle / disconnect rounds; figures are medians across rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// What happens to cloudcore between rounds.
    #[arg(long, value_enum, default_value_t = BetweenRounds::Restart)]
    between_rounds: BetweenRounds,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 16)]
    join_concurrency: usize,
    /// Session handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Sessions sharing one client UDP socket (keeps the bench's file descriptors down).
    #[arg(long, default_value_t = 50)]
    edges_per_endpoint: usize,
    /// Seconds all edges stay connected and idle before cloudcore's memory is read.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// Passed to `cloudcore serve --max-concurrent-handshakes` [default: cloudcore's].
    #[arg(long)]
    cloud_max_handshakes: Option<usize>,
    /// Give up (and stop cloudcore) after this many seconds in total.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What happens to the cloudcore process between connect rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BetweenRounds {
    /// Every round starts a fresh cloudcore on the same data dir (independent samples).
    Restart,
    /// One cloudcore serves every round (shows memory kept across reconnect waves; per-edge
    /// memory is then only meaningful for round 1).
    Keep,
}

impl BetweenRounds {
    fn name(self) -> &'static str {
        match self {
            BetweenRounds::Restart => "restart",
            BetweenRounds::Keep => "keep",
        }
    }
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--edges", c.edges),
            ("--rounds", c.rounds),
            ("--join-concurrency", c.join_concurrency),
            ("--concurrency", c.concurrency),
            ("--edges-per-endpoint", c.edges_per_endpoint),
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

/// Starts cloudcore, runs the phases under the overall timeout, and always stops cloudcore.
async fn bench(cli: &Cli) -> Result<Report> {
    let binary = bench::cloudcore_binary(cli.cloudcore.as_ref())?;
    // Dropped last: cloudcore (declared below) is killed before its data dir is removed.
    let dir = tempfile::Builder::new()
        .prefix("edge-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let mut cloud = Cloud::start(&binary, dir.path(), cli.cloud_max_handshakes).await?;
    let limit = Duration::from_secs(cli.timeout_secs);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(limit, measure(cli, &mut cloud, dir.path())) => {
            outcome.unwrap_or_else(|_| Err(anyhow!("gave up after {} s (--timeout-secs)", cli.timeout_secs)))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if outcome.is_err() {
        eprintln!("last lines of the cloudcore log:\n{}", cloud.log_tail(30));
    }
    cloud.stop().await;
    outcome
}

/// The measured phases, against a running cloudcore.
async fn measure(cli: &Cli, cloud: &mut Cloud, dir: &Path) -> Result<Report> {
    let fresh_rss_kib = cloud.rss_kib()?;
    let token = cloud.create_token(cli.edges).await?;
    eprintln!(
        "joining {} edges ({} at once)",
        cli.edges, cli.join_concurrency
    );
    let drops_before = cloud.udp_drops()?;
    let mut join = join_edges(cli, &token, &dir.join("edges")).await?;
    join.udp_drops = cloud.udp_drops()? - drops_before;
    let joins = cloud.metric("cloudcore_joins_total").await?;
    ensure!(
        joins == cli.edges as f64,
        "cloudcore_joins_total is {joins} after {} successful joins",
        cli.edges
    );
    let edges = load_edges(cli, &dir.join("edges"))?;
    let node_info = edgecore::node::collect();
    let mut rounds = Vec::with_capacity(cli.rounds);
    for index in 1..=cli.rounds {
        if cli.between_rounds == BetweenRounds::Restart {
            cloud.restart().await?;
        }
        eprintln!(
            "round {index}/{}: connecting {} edges ({} at once)",
            cli.rounds, cli.edges, cli.concurrency
        );
        let round = connect_round(cli, cloud, &edges, &node_info)
            .await
            .with_context(|| format!("round {index}"))?;
        eprintln!(
            "round {index}/{}: {:.0} handshakes/s, {:.1} KiB per idle edge",
            cli.rounds,
            round.handshakes_per_sec(),
            round.kib_per_edge()
        );
        rounds.push(round);
    }
    Ok(Report {
        edges: cli.edges,
        concurrency: cli.concurrency,
        edges_per_endpoint: cli.edges_per_endpoint,
        between_rounds: cli.between_rounds,
        idle: Duration::from_secs(cli.idle_secs),
        machine: Machine::read(),
        fresh_rss_kib,
        join,
        rounds,
    })
}

/// The output of `cloudcore token create -o json` that joins need.
type Token = bench::JoinToken;

/// The join phase's figures.
struct JoinPhase {
    wall: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    /// Datagrams cloudcore's socket dropped for a full receive buffer meanwhile.
    udp_drops: u64,
}

/// Joins `bench-0000`.. in-process, each into its own data dir under `edges_dir`.
async fn join_edges(cli: &Cli, token: &Token, edges_dir: &Path) -> Result<JoinPhase> {
    let permits = Arc::new(Semaphore::new(cli.join_concurrency));
    let mut joins = JoinSet::new();
    let started = Instant::now();
    for index in 0..cli.edges {
        let name = node_name(cli.edges, index);
        let params = JoinParams {
            cloud: token.cloud.clone(),
            token: token.token.clone(),
            ca_hash: token.ca_hash.clone(),
            data_dir: edges_dir.join(&name),
            node_name: name,
            labels: BTreeMap::new(),
            timeout: Duration::from_secs(15),
            max_frame_size: proto::DEFAULT_MAX_FRAME_SIZE,
            rejoin: false,
        };
        let permits = permits.clone();
        joins.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let began = Instant::now();
            match edgecore::join::join(params).await {
                Ok(_) => Ok(began.elapsed()),
                Err(e) => Err(format!("{:#}", anyhow::Error::new(e))),
            }
        });
    }
    let mut latencies = Vec::with_capacity(cli.edges);
    let mut failures = Failures::default();
    while let Some(joined) = joins.join_next().await {
        match joined.context("a join task panicked")? {
            Ok(latency) => latencies.push(latency),
            Err(why) => failures.add(why),
        }
    }
    let wall = started.elapsed();
    failures.check("joins")?;
    latencies.sort();
    Ok(JoinPhase {
        wall,
        latencies,
        udp_drops: 0,
    })
}

/// `bench-0000`, `bench-0001`, ... (wider when there are more than 10,000 edges).
fn node_name(edges: usize, index: usize) -> String {
    let width = edges.saturating_sub(1).to_string().len().max(4);
    format!("bench-{index:0width$}")
}

/// A joined edge: what opening and running a session needs.
struct Edge {
    identity: Identity,
    config: HubConfig,
    /// Each edge's own SQLite store, as `edgecore run` opens it.
    replica: edgecore::replica::Replica,
    /// Its status outbox (in the same store) and the writer that makes reports sendable.
    outbox: Arc<edgecore::outbox::Outbox>,
    outbox_writer: edgecore::outbox::OutboxWriter,
}

fn load_edges(cli: &Cli, edges_dir: &Path) -> Result<Vec<Arc<Edge>>> {
    (0..cli.edges)
        .map(|index| {
            let data_dir = edges_dir.join(node_name(cli.edges, index));
            let identity = edgecore::identity::load(&data_dir)?;
            let metrics = Arc::new(Metrics::default());
            let replica = edgecore::replica::Replica::open(&data_dir, metrics.clone())?;
            let (outbox, outbox_writer) = edgecore::outbox::Outbox::open(&data_dir, metrics)?;
            Ok(Arc::new(Edge {
                identity,
                config: HubConfig::new(data_dir),
                replica,
                outbox,
                outbox_writer,
            }))
        })
        .collect()
}

/// One connect / idle / disconnect round.
struct Round {
    edges: usize,
    /// From the first dial to the last HelloAck.
    wall: Duration,
    /// Per session, from its dial to its HelloAck; sorted.
    latencies: Vec<Duration>,
    /// Datagrams cloudcore's socket dropped for a full receive buffer during the handshakes.
    udp_drops: u64,
    /// cloudcore with no edge connected, before the round.
    rss_before_kib: u64,
    /// With every edge connected and idle.
    rss_connected_kib: u64,
    /// After every edge left again.
    rss_after_kib: u64,
}

impl Round {
    fn handshakes_per_sec(&self) -> f64 {
        self.edges as f64 / self.wall.as_secs_f64()
    }

    fn kib_per_edge(&self) -> f64 {
        (self.rss_connected_kib as f64 - self.rss_before_kib as f64) / self.edges as f64
    }
}

async fn connect_round(
    cli: &Cli,
    cloud: &mut Cloud,
    edges: &[Arc<Edge>],
    node_info: &proto::NodeInfo,
) -> Result<Round> {
    cloud.wait_for_connected(0, DRAIN_TIMEOUT).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_before_kib = cloud.rss_kib()?;

    let address = cloud.address().to_string();
    let remote = edgecore::dial::resolve(&address).await?;
    let endpoints = (0..edges.len().div_ceil(cli.edges_per_endpoint))
        .map(|_| edgecore::dial::client_endpoint(remote))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot open a client UDP socket")?;
    let permits = Arc::new(Semaphore::new(cli.concurrency));
    let mut opening = JoinSet::new();
    let drops_before = cloud.udp_drops()?;
    let started = Instant::now();
    for (index, edge) in edges.iter().enumerate() {
        let (edge, permits, node_info) = (edge.clone(), permits.clone(), node_info.clone());
        let endpoint = endpoints[index / cli.edges_per_endpoint].clone();
        let address = address.clone();
        opening.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let began = Instant::now();
            let inventory = edge.replica.start_session();
            match Session::open(
                endpoint,
                &edge.identity,
                &address,
                &edge.config,
                node_info,
                inventory,
                String::new(),
            )
            .await
            {
                Ok(session) => Ok((edge, session, began.elapsed())),
                Err(e) => Err(format!("{:#}", anyhow::Error::new(e))),
            }
        });
    }
    let mut sessions = Vec::with_capacity(edges.len());
    let mut latencies = Vec::with_capacity(edges.len());
    let mut failures = Failures::default();
    while let Some(opened) = opening.join_next().await {
        match opened.context("a session task panicked")? {
            Ok((edge, session, latency)) => {
                sessions.push((edge, session));
                latencies.push(latency);
            }
            Err(why) => failures.add(why),
        }
    }
    let wall = started.elapsed();
    let udp_drops = cloud.udp_drops()? - drops_before;
    // Sessions opened so far close when dropped on the way out.
    failures.check("session handshakes")?;
    latencies.sort();

    // Keep every session alive: heartbeats, the cloud's heartbeats, QUIC keep-alives.
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let mut running = JoinSet::new();
    for (edge, session) in sessions {
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        running.spawn(async move {
            let writer = edge
                .outbox_writer
                .clone()
                .run(edge.replica.subscribe(), shutdown.clone());
            let mut reporter = edgecore::node::Reporter::new(
                edge.config.data_dir.clone(),
                edgecore::node::NodeConfig::default(),
                None,
            );
            // The benchmark's edges run no pods, so they never want a token.
            let tokens = edgecore::tokens::Tokens::in_memory(edgecore::tokens::DEFAULT_REFRESH_MAX);
            let local = edgecore::hub::Local {
                replica: &edge.replica,
                outbox: &edge.outbox,
                tokens: &tokens,
            };
            let session = session.run(
                &edge.identity,
                &edge.config,
                &metrics,
                local,
                &mut reporter,
                &shutdown,
            );
            let (ended, ()) = tokio::join!(session, writer);
            ended.to_string()
        });
    }
    cloud
        .wait_for_connected(edges.len() as u64, COUNT_TIMEOUT)
        .await?;
    tokio::time::sleep(Duration::from_secs(cli.idle_secs)).await;
    let rss_connected_kib = cloud.rss_kib()?;
    let connected = cloud.metric("cloudcore_connected_edges").await?;
    let mut ended = Failures::default();
    while let Some(result) = running.try_join_next() {
        ended.add(result.unwrap_or_else(|e| format!("session task failed: {e}")));
    }
    ended.check("sessions ending while idle")?;
    ensure!(
        connected == edges.len() as f64,
        "cloudcore_connected_edges is {connected} after {} s idle, expected {}",
        cli.idle_secs,
        edges.len()
    );

    shutdown.cancel();
    let stopped = tokio::time::timeout(COUNT_TIMEOUT, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    ensure!(
        stopped.is_ok(),
        "the edge sessions did not stop within {COUNT_TIMEOUT:?}"
    );
    cloud.wait_for_connected(0, DRAIN_TIMEOUT).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_after_kib = cloud.rss_kib()?;
    Ok(Round {
        edges: edges.len(),
        wall,
        latencies,
        udp_drops,
        rss_before_kib,
        rss_connected_kib,
        rss_after_kib,
    })
}

/// `cloudcore serve` on one data dir, (re)started on free loopback ports.
struct Cloud {
    binary: PathBuf,
    /// The bench's temp dir; logs go here.
    dir: PathBuf,
    data_dir: PathBuf,
    max_handshakes: Option<usize>,
    starts: usize,
    process: Process,
}

/// One running `cloudcore serve`; killed when dropped.
struct Process {
    child: Child,
    pid: u32,
    /// `127.0.0.1:PORT`, what edges dial.
    address: SocketAddr,
    metrics_port: u16,
    log: PathBuf,
}

impl Cloud {
    async fn start(binary: &Path, dir: &Path, max_handshakes: Option<usize>) -> Result<Cloud> {
        let data_dir = dir.join("cloud");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let log = dir.join("cloudcore-1.log");
        let process = Process::spawn(binary, &data_dir, log, max_handshakes).await?;
        Ok(Cloud {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            data_dir,
            max_handshakes,
            starts: 1,
            process,
        })
    }

    /// Kills cloudcore and starts it again on the same data dir, on new ports.
    async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.starts += 1;
        let log = self.dir.join(format!("cloudcore-{}.log", self.starts));
        self.process =
            Process::spawn(&self.binary, &self.data_dir, log, self.max_handshakes).await?;
        Ok(())
    }

    fn address(&self) -> SocketAddr {
        self.process.address
    }

    /// `cloudcore token create --uses N -o json`, through the real CLI.
    async fn create_token(&self, uses: usize) -> Result<Token> {
        bench::create_token_in(
            &self.binary,
            &self.data_dir,
            &self.address().to_string(),
            uses,
        )
        .await
    }

    /// One series from `/metrics`.
    async fn metric(&self, series: &str) -> Result<f64> {
        let page = http_get(self.process.metrics_port, "/metrics")
            .await
            .context("cannot read cloudcore's metrics")?;
        metric_value(&page, series).with_context(|| format!("no {series} in cloudcore's metrics"))
    }

    /// Polls `cloudcore_connected_edges` until it equals `want`.
    async fn wait_for_connected(&mut self, want: u64, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.process.ensure_running()?;
            let now = self.metric("cloudcore_connected_edges").await?;
            if now == want as f64 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("cloudcore_connected_edges is {now}, expected {want} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resident set size from /proc/PID/status, in KiB.
    fn rss_kib(&mut self) -> Result<u64> {
        self.process.ensure_running()?;
        bench::rss_kib(self.process.pid)
    }

    /// Datagrams the kernel dropped at cloudcore's UDP socket since it was opened (the last
    /// column of /proc/net/udp: the receive buffer was full).
    fn udp_drops(&mut self) -> Result<u64> {
        self.process.ensure_running()?;
        let local = format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes([127, 0, 0, 1]),
            self.address().port()
        );
        let table =
            std::fs::read_to_string("/proc/net/udp").context("cannot read /proc/net/udp")?;
        table
            .lines()
            .skip(1)
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.get(1) != Some(&local.as_str()) {
                    return None;
                }
                fields.last()?.parse().ok()
            })
            .with_context(|| format!("cloudcore's socket {local} is not in /proc/net/udp"))
    }

    fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    async fn stop(&mut self) {
        if let Err(e) = self.process.child.kill().await {
            eprintln!(
                "warning: cannot stop cloudcore pid {}: {e}",
                self.process.pid
            );
        }
    }
}

impl Process {
    /// Starts `cloudcore serve` on free loopback ports and waits for its `/healthz`.
    async fn spawn(
        binary: &Path,
        data_dir: &Path,
        log: PathBuf,
        max_handshakes: Option<usize>,
    ) -> Result<Process> {
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .context("cannot find a free UDP port")?
            .port();
        let metrics_port = TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .context("cannot find a free TCP port")?
            .port();
        let api_port = TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .context("cannot find a free TCP port")?
            .port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &address.to_string()])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--advertise-address", "127.0.0.1"])
            .args(["--control-plane", "embedded"])
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            // Every simulated edge dials from 127.0.0.1, where a real fleet comes from many
            // addresses: the per-address share must not be what the bench measures.
            .args(["--max-handshakes-per-address", "1000000"]);
        if let Some(n) = max_handshakes {
            command.args(["--max-concurrent-handshakes", &n.to_string()]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().context("cloudcore exited at once")?;
        let mut process = Process {
            child,
            pid,
            address,
            metrics_port,
            log,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            process.ensure_running()?;
            if http_get(metrics_port, "/healthz")
                .await
                .is_ok_and(|body| body.starts_with("ok"))
            {
                eprintln!(
                    "cloudcore pid {pid} serving on {address} (metrics 127.0.0.1:{metrics_port})"
                );
                return Ok(process);
            }
            if Instant::now() >= deadline {
                bail!(
                    "cloudcore did not answer /healthz within {STARTUP_TIMEOUT:?}; log:\n{}",
                    process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait().context("cannot check on cloudcore")? {
            None => Ok(()),
            Some(status) => bail!("cloudcore pid {} exited ({status})", self.pid),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// GETs `path` over plain HTTP/1.0 from 127.0.0.1:`port`; the body of a 200 answer.
async fn http_get(port: u16, path: &str) -> Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("GET {path}: no answer within 5 s"))??;
    let text = String::from_utf8(response).with_context(|| format!("GET {path}: not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no end of headers"))?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {status}"
    );
    Ok(body.to_string())
}

/// Everything measured.
struct Report {
    edges: usize,
    concurrency: usize,
    edges_per_endpoint: usize,
    between_rounds: BetweenRounds,
    idle: Duration,
    machine: Machine,
    /// cloudcore right after its first start, no node known.
    fresh_rss_kib: u64,
    join: JoinPhase,
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
    fn handshakes(&self) -> Spread {
        Spread::of(self.rounds.iter().map(Round::handshakes_per_sec))
    }
    fn p50(&self) -> Spread {
        Spread::of(
            self.rounds
                .iter()
                .map(|r| ms(percentile(&r.latencies, 0.5))),
        )
    }
    fn p99(&self) -> Spread {
        Spread::of(
            self.rounds
                .iter()
                .map(|r| ms(percentile(&r.latencies, 0.99))),
        )
    }
    fn per_edge(&self) -> Spread {
        Spread::of(self.rounds.iter().map(Round::kib_per_edge))
    }
    fn connected_rss(&self) -> Spread {
        Spread::of(self.rounds.iter().map(|r| mib(r.rss_connected_kib)))
    }
    fn udp_drops(&self) -> Spread {
        Spread::of(self.rounds.iter().map(|r| r.udp_drops as f64))
    }
    fn joins_per_sec(&self) -> f64 {
        self.edges as f64 / self.join.wall.as_secs_f64()
    }

    fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "edge-bench: {} edges, {} rounds (cloudcore between rounds: {}), {} handshakes in flight, \
             {} edges per client socket, {} s idle\n\
             machine: {} CPUs ({}), {} MiB, Linux {}\n\n",
            self.edges,
            self.rounds.len(),
            self.between_rounds.name(),
            self.concurrency,
            self.edges_per_endpoint,
            self.idle.as_secs(),
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel
        );
        out.push_str(&format!(
            "join       {} nodes in {:.2} s = {:.1} joins/s (p50 {:.1} ms, p99 {:.1} ms, {} UDP drops)\n",
            self.edges,
            self.join.wall.as_secs_f64(),
            self.joins_per_sec(),
            ms(percentile(&self.join.latencies, 0.5)),
            ms(percentile(&self.join.latencies, 0.99)),
            self.join.udp_drops
        ));
        out.push_str(&format!(
            "cloudcore  RSS {:.1} MiB at first start, no nodes\n\n",
            mib(self.fresh_rss_kib)
        ));
        out.push_str(&format!(
            "{:<6} {:>12} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "round",
            "handshakes/s",
            "wall s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "UDP drops",
            "RSS0 MiB",
            "RSSN MiB",
            "after MiB",
            "KiB/edge"
        ));
        for (i, r) in self.rounds.iter().enumerate() {
            out.push_str(&format!(
                "{:<6} {:>12.1} {:>7.2} {:>7.1} {:>7.1} {:>7.1} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                i + 1,
                r.handshakes_per_sec(),
                r.wall.as_secs_f64(),
                ms(percentile(&r.latencies, 0.5)),
                ms(percentile(&r.latencies, 0.99)),
                ms(r.latencies.last().copied().unwrap_or_default()),
                r.udp_drops,
                mib(r.rss_before_kib),
                mib(r.rss_connected_kib),
                mib(r.rss_after_kib),
                r.kib_per_edge()
            ));
        }
        let row = |name: &str, s: &Spread, unit: &str| {
            format!(
                "{name:<24} {:>9.1} {unit}  ({:.1} .. {:.1})\n",
                s.median, s.min, s.max
            )
        };
        out.push_str("\nmedian across rounds (min .. max)\n");
        out.push_str(&row("handshakes per second", &self.handshakes(), "/s "));
        out.push_str(&row("handshake p50", &self.p50(), "ms "));
        out.push_str(&row("handshake p99", &self.p99(), "ms "));
        out.push_str(&row("UDP drops at cloudcore", &self.udp_drops(), "   "));
        out.push_str(&row("memory per idle edge", &self.per_edge(), "KiB"));
        out.push_str(&row("cloudcore RSS, all on", &self.connected_rss(), "MiB"));
        if self.between_rounds == BetweenRounds::Keep {
            out.push_str(
                "note: one cloudcore served every round; KiB/edge after round 1 is measured \
                 against memory the allocator kept from the previous round\n",
            );
        }
        out
    }

    fn to_json(&self) -> Value {
        let m = &self.machine;
        json!({
            "edges": self.edges,
            "concurrency": self.concurrency,
            "edges_per_endpoint": self.edges_per_endpoint,
            "between_rounds": self.between_rounds.name(),
            "idle_s": self.idle.as_secs(),
            "machine": {
                "cpus": m.cpus,
                "cpu_model": m.cpu_model,
                "memory_mib": m.memory_mib,
                "kernel": m.kernel,
            },
            "cloudcore_fresh_rss_kib": self.fresh_rss_kib,
            "join": {
                "wall_s": self.join.wall.as_secs_f64(),
                "joins_per_sec": self.joins_per_sec(),
                "p50_ms": ms(percentile(&self.join.latencies, 0.5)),
                "p99_ms": ms(percentile(&self.join.latencies, 0.99)),
                "udp_drops": self.join.udp_drops,
            },
            "rounds": self.rounds.iter().map(|r| json!({
                "wall_s": r.wall.as_secs_f64(),
                "handshakes_per_sec": r.handshakes_per_sec(),
                "p50_ms": ms(percentile(&r.latencies, 0.5)),
                "p99_ms": ms(percentile(&r.latencies, 0.99)),
                "max_ms": ms(r.latencies.last().copied().unwrap_or_default()),
                "udp_drops": r.udp_drops,
                "rss_before_kib": r.rss_before_kib,
                "rss_connected_kib": r.rss_connected_kib,
                "rss_after_kib": r.rss_after_kib,
                "kib_per_edge": r.kib_per_edge(),
            })).collect::<Vec<_>>(),
            "summary": {
                "handshakes_per_sec": self.handshakes().to_json(),
                "p50_ms": self.p50().to_json(),
                "p99_ms": self.p99().to_json(),
                "udp_drops": self.udp_drops().to_json(),
                "kib_per_edge": self.per_edge().to_json(),
                "rss_connected_mib": self.connected_rss().to_json(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_sort_in_order() {
        assert_eq!(node_name(1000, 7), "bench-0007");
        assert_eq!(node_name(20000, 7), "bench-00007");
    }
}
