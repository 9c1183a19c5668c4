//! What the load generators (`edge-bench`, `api-bench`, ...) share: nearest-rank percentiles,
//! the spread of a figure across rounds, failures grouped by message, a description of the
//! machine, a process's memory and CPU time from `/proc`, log timestamps, the command-line
//! plumbing of a load generator (flags, logging, the binaries, printing the report), and the
//! harness's [`Cloud`], [`Edge`], a joined edge, `kubectl` and a private containerd started
//! from given binaries (the harness finds them only next to a test), and in-process edges
//! (`edgecore::join` and `edgecore::run` inside the load generator: [`RunningEdge`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::netns::EdgeNet;
use crate::{Cloud, Edge};

/// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`, fixed at 100 by the kernel ABI).
const USER_HZ: f64 = 100.0;

/// Failure messages grouped by text, so a thousand identical errors read as one line.
#[derive(Debug, Default)]
pub struct Failures(BTreeMap<String, usize>);

impl Failures {
    /// Counts one failure.
    pub fn add(&mut self, why: String) {
        *self.0.entry(why).or_default() += 1;
    }

    /// Ok if nothing failed, else an error listing each message with its count.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let total: usize = self.0.values().sum();
        let mut text = format!("{total} {what} failed:");
        for (why, count) in &self.0 {
            text.push_str(&format!("\n  {count} x {why}"));
        }
        bail!(text)
    }
}

/// Median, minimum and maximum of per-round values.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (all zero when there are none).
    pub fn of(values: impl Iterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }

    /// `{"median": .., "min": .., "max": ..}`.
    pub fn to_json(&self) -> Value {
        json!({ "median": self.median, "min": self.min, "max": self.max })
    }
}

/// Nearest-rank percentile (`p` in 0..=1) of sorted values; zero for none.
/// Exit code for a bad command line (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// A load generator's results, printed as a table or as JSON.
pub trait Report {
    fn table(&self) -> String;
    fn to_json(&self) -> Value;
}

/// Parses the flags; on a bad command line (or a `positive` flag given 0) the exit code to
/// return, after printing why.
pub fn parse_cli<C: clap::Parser>(
    positive: impl Fn(&C) -> Vec<(&'static str, usize)>,
) -> Result<C, ExitCode> {
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return Err(if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    for (flag, value) in positive(&cli) {
        if value == 0 {
            eprintln!("error: {flag} must be at least 1");
            return Err(ExitCode::from(EXIT_USAGE));
        }
    }
    Ok(cli)
}

/// Logs to stderr at warn (the in-process clients are chatty at info); RUST_LOG overrides.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The cloudcore binary: `given`, or `cloudcore` next to this executable.
pub fn cloudcore_binary(given: Option<&PathBuf>) -> Result<PathBuf> {
    let binary = match given {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable's path")?
            .parent()
            .context("this executable has no parent directory")?
            .join("cloudcore"),
    };
    ensure!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --release -p cloudcore -p integration` or pass --cloudcore PATH",
        binary.display()
    );
    Ok(binary)
}

/// The edgecore binary: `given`, or `edgecore` next to this executable.
pub fn edgecore_binary(given: Option<&PathBuf>) -> Result<PathBuf> {
    let binary = match given {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable's path")?
            .parent()
            .context("this executable has no parent directory")?
            .join("edgecore"),
    };
    ensure!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --release -p cloudcore -p edgecore -p integration` or pass --edgecore PATH",
        binary.display()
    );
    Ok(binary)
}

/// [`Cloud::start_at`] with a given `cloudcore` binary: the tunnel listens and is advertised on
/// `tunnel_ip` (an [`EdgeNet::host_ip`]); an error holding the log instead of a panic.
pub fn start_cloud_at(
    binary: &Path,
    dir: &Path,
    tunnel_ip: IpAddr,
    extra: &[&str],
    log_filter: &str,
) -> Result<Cloud> {
    Cloud::start_full(binary, dir, tunnel_ip, extra, log_filter)
}

/// How long a starting edgecore may take to log its metrics address.
const EDGE_START_TIMEOUT: Duration = Duration::from_secs(20);

/// [`Edge::start_in`] with a given `edgecore` binary: `edgecore run` inside `net`, logging at
/// info to `dir/run.log` (truncated). Returns once the metrics listener is bound; an error
/// holding the log (and the process killed) instead of a panic.
pub fn start_edge_in(binary: &Path, net: &EdgeNet, dir: &Path, extra: &[&str]) -> Result<Edge> {
    start_edge_command(net.command(binary), Some(net.name()), dir, extra)
}

/// [`Edge::start_with`] with a given `edgecore` binary, in this network namespace; like
/// [`start_edge_in`] otherwise.
pub fn start_edge(binary: &Path, dir: &Path, extra: &[&str]) -> Result<Edge> {
    start_edge_command(Command::new(binary), None, dir, extra)
}

/// `command` (`edgecore`, maybe behind `ip netns exec`) with the `run` arguments, started and
/// waited for until its metrics listener is bound.
fn start_edge_command(
    mut command: Command,
    netns: Option<&str>,
    dir: &Path,
    extra: &[&str],
) -> Result<Edge> {
    command
        .arg("run")
        .arg("--data-dir")
        .arg(dir)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info");
    // Benches' edges share the machine's network namespace: no data path or DNS of Services
    // unless a bench asks for them.
    for flag in ["--service-proxy", "--cluster-dns"] {
        if !extra.contains(&flag) {
            command.args([flag, "none"]);
        }
    }
    let log = dir.join("run.log");
    // The guard first: an edgecore that does not come up is killed when this returns.
    let mut edge = Edge {
        dir: dir.to_path_buf(),
        metrics_port: 0,
        child: Some(crate::try_spawn_logged(&mut command, &log)?),
        netns: netns.map(str::to_string),
    };
    let deadline = Instant::now() + EDGE_START_TIMEOUT;
    loop {
        if let Some(port) = crate::bound_metrics_port(&edge.log()) {
            edge.metrics_port = port;
            return Ok(edge);
        }
        if let Some(Ok(Some(status))) = edge.child.as_mut().map(|c| c.try_wait()) {
            bail!(
                "edgecore exited ({status}) before serving metrics; log:\n{}",
                edge.log()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "edgecore did not start within {EDGE_START_TIMEOUT:?}; log:\n{}",
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `command` to completion within `limit` (killed after it); its stdout, or an error with
/// its stderr.
pub fn run_tool(command: &mut Command, what: &str, limit: Duration) -> Result<Vec<u8>> {
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{what}`"))?;
    let pid = child.id();
    // The output is read on a thread of its own, so a child that fills a pipe never blocks.
    let (done, wait) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match wait.recv_timeout(limit) {
        Ok(output) => output.with_context(|| format!("cannot run `{what}`"))?,
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = reader.join();
            bail!("`{what}` did not finish within {limit:?}");
        }
    };
    let _ = reader.join();
    ensure!(
        output.status.success(),
        "`{what}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output.stdout)
}

/// `cloudcore token create` and `edgecore join` (the real CLIs, each bounded by `limit`): joins
/// `edge_dir` to `cloud` as node `node`.
pub fn join_edge(
    cloudcore: &Path,
    edgecore: &Path,
    cloud: &Cloud,
    edge_dir: &Path,
    node: &str,
    limit: Duration,
) -> Result<()> {
    let stdout = run_tool(
        Command::new(cloudcore)
            .args(["token", "create", "--data-dir"])
            .arg(&cloud.dir)
            .args(["-o", "json", "--cloud", &cloud.address()]),
        "cloudcore token create",
        limit,
    )?;
    let token = JoinToken::from_cli_json(&stdout)?;
    run_tool(
        Command::new(edgecore)
            .args(["join", "--cloud", &token.cloud])
            .args(["--token", &token.token])
            .args(["--ca-hash", &token.ca_hash])
            .args(["--node-name", node, "--data-dir"])
            .arg(edge_dir),
        "edgecore join",
        limit,
    )?;
    Ok(())
}

/// `kubectl ARGS` (the binary `kubectl`, e.g. `kubectl` on PATH or `kubectl.1.33`) as admin of
/// `cloud`'s API, with a private discovery cache and no user's `~/.kube`, as the tests'
/// `cluster::kubectl` runs it; not started, so the caller picks its pipes and waits itself.
pub fn kubectl_command(kubectl: &Path, cloud: &Cloud, args: &[&str]) -> Command {
    let cache = cloud.dir.join("kubectl-cache");
    let mut command = Command::new(kubectl);
    command
        .arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .arg("--cache-dir")
        .arg(&cache)
        .args(args)
        .env("HOME", &cloud.dir)
        .env_remove("KUBECONFIG");
    command
}

/// A private containerd for a load generator, started with the project's config
/// (`deploy/containerd/containerd.sh`) and the test images imported, as
/// `integration::Containerd::start` does for a test (which finds `edgecore` only next to a
/// test). Dropped on a plain thread (the harness's `Containerd` runs a runtime of its own when
/// dropped), so this guard may go out of scope inside an async runtime too; then the pod
/// cgroups the runtime leaves are removed for every pod uid [`BenchContainerd::started`] was
/// told of.
pub struct BenchContainerd {
    containerd: Option<crate::Containerd>,
    uids: std::sync::Mutex<Vec<String>>,
}

impl BenchContainerd {
    /// Starts containerd in `dir` on the pod subnet `10.{octet}.N.0/24` and bridge
    /// `{bridge}N`, N from this process's id (so two load generators do not collide; the
    /// tests use 10.100-10.112). Each step is bounded by `limit`.
    pub fn start(dir: &Path, octet: u8, bridge: &str, limit: Duration) -> Result<BenchContainerd> {
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
        let n = std::process::id() % 250;
        // The guard first: a start that fails half-way is stopped too.
        let runtime = BenchContainerd {
            containerd: Some(crate::Containerd {
                dir: dir.to_path_buf(),
                endpoint: format!("unix://{}/containerd.sock", dir.display()),
                subnet: format!("10.{octet}.{n}.0/24"),
                bridge: format!("{bridge}{n}"),
                netns: None,
            }),
            uids: std::sync::Mutex::default(),
        };
        let containerd = runtime.get()?;
        run_tool(
            Command::new(crate::deploy_dir().join("containerd/containerd.sh"))
                .arg("start")
                .arg(dir)
                .arg(&containerd.subnet)
                .arg(&containerd.bridge),
            "containerd.sh start",
            limit,
        )?;
        let images = dir.join("images");
        std::fs::create_dir_all(&images)
            .with_context(|| format!("cannot create {}", images.display()))?;
        let build = crate::deploy_dir().join("images/build.sh");
        for (file, name, entrypoint, cmd) in [
            ("busybox.tar", crate::BUSYBOX, "null", r#"["/bin/sh"]"#),
            (
                "pause.tar",
                crate::PAUSE,
                r#"["/bin/busybox","sleep","2147483647"]"#,
                "null",
            ),
        ] {
            run_tool(
                Command::new(&build)
                    .arg(images.join(file))
                    .args([name, entrypoint, cmd]),
                &format!("build.sh {name}"),
                limit,
            )?;
            edgecore::images::import(&containerd.endpoint, &[images.join(file)])
                .with_context(|| format!("cannot import {name}"))?;
        }
        Ok(runtime)
    }

    /// The running containerd.
    pub fn get(&self) -> Result<&crate::Containerd> {
        self.containerd.as_ref().context("containerd is stopped")
    }

    /// The containerd daemon's process id, from its pid file.
    pub fn pid(&self) -> Option<u32> {
        let containerd = self.containerd.as_ref()?;
        std::fs::read_to_string(containerd.dir.join("containerd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Notes a pod started in this runtime, whose cgroups are removed at the end.
    pub fn started(&self, uid: &str) {
        self.uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(uid.to_string());
    }
}

impl Drop for BenchContainerd {
    fn drop(&mut self) {
        if let Some(containerd) = self.containerd.take() {
            let _ = std::thread::spawn(move || drop(containerd)).join();
        }
        let uids = std::mem::take(self.uids.get_mut().unwrap_or_else(|p| p.into_inner()));
        let mut left: Vec<PathBuf> = uids
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

/// The sum of every series of metric family `name` in a Prometheus text page (`name 3`,
/// `name{kind="logs"} 2`, ...): 0 for a family that is declared (`# TYPE name ...`) and has no
/// series yet, `None` for one the page does not have.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let declared = page.lines().any(|l| {
        l.strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_whitespace().next())
            == Some(name)
    });
    let mut sum = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = match rest.chars().next() {
            Some('{') => rest.rsplit_once('}').map(|(_, v)| v),
            Some(' ') => Some(rest),
            _ => None,
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum.or(declared.then_some(0.0))
}

/// Unix nanoseconds of an RFC 3339 UTC timestamp as tracing writes it at the start of a log
/// line (`2026-11-24T06:39:17.123456Z`); `None` for anything else.
pub fn rfc3339_ns(text: &str) -> Option<i128> {
    if !text.ends_with('Z') {
        return None;
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339);
    at.ok().map(|t| t.unix_timestamp_nanos())
}

/// A kube-rs client once the embedded API answers (within `ready_timeout`), with `namespace`
/// created for the bench's objects.
pub async fn api_client(
    namespace: &str,
    ready_timeout: Duration,
    cloud: &Cloud,
) -> Result<kube::Client> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, ListParams, ObjectMeta, PostParams};
    let client = crate::kube_client(&cloud.kubeconfig()).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let deadline = std::time::Instant::now() + ready_timeout;
    loop {
        match namespaces.list(&ListParams::default()).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e).context(format!(
                    "the embedded API did not answer within {ready_timeout:?}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let object = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &object)
        .await
        .context("cannot create the bench namespace")?;
    Ok(client)
}

/// The wall clock in Unix nanoseconds, to compare with log and runtime timestamps.
pub fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Prints the report (JSON or table) or the error, and the process's exit code.
pub fn finish(result: Result<impl Report>, json: bool) -> ExitCode {
    match result {
        Ok(report) if json => match serde_json::to_string_pretty(&report.to_json()) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render JSON: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `p` quantile (0..=1) of sorted durations, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// MiB from KiB, for printing.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Where the figures were taken.
#[derive(Debug)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub kernel: String,
}

impl Machine {
    /// Reads CPUs, CPU model, memory and kernel release from `/proc`.
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")?
                        .split_once(':')
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_else(|| "unknown".into()),
            memory_mib: meminfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix("MemTotal:")?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
                / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }

    /// `{"cpus": .., "cpu_model": .., "memory_mib": .., "kernel": ..}`.
    pub fn to_json(&self) -> Value {
        json!({
            "cpus": self.cpus,
            "cpu_model": self.cpu_model,
            "memory_mib": self.memory_mib,
            "kernel": self.kernel,
        })
    }
}

/// Resident set size of process `pid` from `/proc/PID/status` (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// A memory field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`).
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {field} in {path}"))
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    cpu_time_of_stat(&stat).with_context(|| format!("cannot parse {path}"))
}

/// utime + stime from a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn cpu_time_of_stat(stat: &str) -> Option<Duration> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / USER_HZ))
}

// ---------------------------------------------------------------------------------------------
// In-process edges (`edgecore::join` and `edgecore::run` inside the load generator)

/// How long an in-process edge may take to serve its metrics after `edgecore::run` starts.
const RUN_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an in-process edge may take to stop after its shutdown is cancelled.
const RUN_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The output of `cloudcore token create -o json` that joins need.
#[derive(Debug, Clone)]
pub struct JoinToken {
    pub token: String,
    pub ca_hash: String,
    pub cloud: String,
}

/// `cloudcore token create --uses N -o json`, through the real CLI.
pub async fn create_token(binary: &Path, cloud: &Cloud, uses: usize) -> Result<JoinToken> {
    create_token_in(binary, &cloud.dir, &cloud.address(), uses).await
}

/// [`create_token`] for a cloudcore data dir `data_dir` serving at `address`.
pub async fn create_token_in(
    binary: &Path,
    data_dir: &Path,
    address: &str,
    uses: usize,
) -> Result<JoinToken> {
    let output = tokio::process::Command::new(binary)
        .args(["token", "create", "--data-dir"])
        .arg(data_dir)
        .args(["--uses", &uses.to_string(), "-o", "json"])
        .args(["--cloud", address])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("cannot run `cloudcore token create`")?;
    ensure!(
        output.status.success(),
        "`cloudcore token create` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    JoinToken::from_cli_json(&output.stdout)
}

impl JoinToken {
    /// The token `cloudcore token create -o json` printed.
    pub fn from_cli_json(stdout: &[u8]) -> Result<JoinToken> {
        let value: Value = serde_json::from_slice(stdout)
            .context("`cloudcore token create -o json` printed no JSON")?;
        let field = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("`cloudcore token create -o json` has no {name:?}"))
        };
        Ok(JoinToken {
            token: field("token")?,
            ca_hash: field("ca_hash")?,
            cloud: field("cloud")?,
        })
    }
}

/// Joins `names` in-process, `concurrency` at once, each into `edges_dir/NAME`.
pub async fn join_edges(
    token: &JoinToken,
    names: &[String],
    edges_dir: &Path,
    concurrency: usize,
) -> Result<Vec<PathBuf>> {
    let results: Vec<Result<PathBuf, String>> = futures::stream::iter(names)
        .map(|name| async move {
            let data_dir = edges_dir.join(name);
            let params = edgecore::join::JoinParams {
                cloud: token.cloud.clone(),
                token: token.token.clone(),
                ca_hash: token.ca_hash.clone(),
                data_dir: data_dir.clone(),
                node_name: name.clone(),
                labels: BTreeMap::new(),
                timeout: Duration::from_secs(15),
                max_frame_size: proto::DEFAULT_MAX_FRAME_SIZE,
                rejoin: false,
            };
            edgecore::join::join(params)
                .await
                .map(|_| data_dir)
                .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
        })
        .buffered(concurrency)
        .collect()
        .await;
    let mut failures = Failures::default();
    let mut dirs = Vec::with_capacity(names.len());
    for result in results {
        match result {
            Ok(dir) => dirs.push(dir),
            Err(why) => failures.add(why),
        }
    }
    failures.check("joins")?;
    Ok(dirs)
}

/// `bench-000`, `bench-001`, ... (as wide as the largest index needs, at least 3 digits).
pub fn node_name(edges: usize, index: usize) -> String {
    let width = edges.saturating_sub(1).to_string().len().max(3);
    format!("bench-{index:0width$}")
}

/// One in-process `edgecore::run`.
pub struct RunningEdge {
    pub metrics_port: u16,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), edgecore::RunError>>,
}

impl Drop for RunningEdge {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// Starts a complete edge on a joined data dir, dialing `cloud`, with `devices` (DMI, MQTT)
/// and no pod runtime, and waits for its metrics endpoint. The metrics port is picked free first and passed in, so the bench can read the
/// edge's counters; if another process takes it in between, the start is retried.
pub async fn run_edge(
    data_dir: &Path,
    cloud: &str,
    devices: edgecore::devices::DevicesConfig,
) -> Result<RunningEdge> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .context("cannot find a free TCP port")?
            .port();
        let mut hub = edgecore::hub::HubConfig::new(data_dir.to_path_buf());
        hub.cloud = Some(cloud.to_string());
        let config = edgecore::RunConfig {
            hub,
            metrics_listen: ([127, 0, 0, 1], metrics_port).into(),
            cri_endpoint: None,
            node: edgecore::node::NodeConfig::default(),
            devices: devices.clone(),
            services: edgecore::services::ServicesConfig::disabled(),
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut edge = RunningEdge {
            metrics_port,
            shutdown: shutdown.clone(),
            task: tokio::spawn(edgecore::run(config, shutdown)),
        };
        let deadline = Instant::now() + RUN_START_TIMEOUT;
        loop {
            if edge.task.is_finished() {
                let ended = (&mut edge.task).await.context("an edge task panicked")?;
                match ended {
                    Err(edgecore::RunError::Metrics { .. }) if attempt < 3 => break,
                    Err(e) => {
                        return Err(anyhow::Error::new(e))
                            .with_context(|| format!("edge {} failed", data_dir.display()));
                    }
                    Ok(()) => bail!("edge {} stopped at start", data_dir.display()),
                }
            }
            let port = edge.metrics_port;
            let healthy = tokio::task::spawn_blocking(move || {
                crate::http_get(port, "/healthz").is_some_and(|b| b.starts_with("ok"))
            })
            .await
            .unwrap_or(false);
            if healthy {
                return Ok(edge);
            }
            ensure!(
                Instant::now() < deadline,
                "edge {} did not serve its metrics within {RUN_START_TIMEOUT:?}",
                data_dir.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Starts every edge at once, each with the devices settings `devices` gives for its data dir.
pub async fn run_edges(
    dirs: &[PathBuf],
    cloud: &str,
    devices: impl Fn(&Path) -> edgecore::devices::DevicesConfig,
) -> Result<Vec<RunningEdge>> {
    let mut starting = tokio::task::JoinSet::new();
    for (index, dir) in dirs.iter().enumerate() {
        let (dir, cloud, devices) = (dir.clone(), cloud.to_string(), devices(dir));
        starting.spawn(async move { (index, run_edge(&dir, &cloud, devices).await) });
    }
    let mut edges: Vec<Option<RunningEdge>> = dirs.iter().map(|_| None).collect();
    let mut failures = Failures::default();
    while let Some(started) = starting.join_next().await {
        let (index, started) = started.context("an edge start task panicked")?;
        match started {
            Ok(edge) => edges[index] = Some(edge),
            Err(e) => failures.add(format!("{e:#}")),
        }
    }
    failures.check("edge starts")?;
    Ok(edges.into_iter().flatten().collect())
}

/// Cancels every edge and waits until each has returned from `edgecore::run`.
pub async fn stop_edges(edges: Vec<RunningEdge>) -> Result<()> {
    for edge in &edges {
        edge.shutdown.cancel();
    }
    let mut failures = Failures::default();
    for mut edge in edges {
        match tokio::time::timeout(RUN_STOP_TIMEOUT, &mut edge.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.add(format!("{:#}", anyhow::Error::new(e))),
            Ok(Err(e)) => failures.add(format!("edge task failed: {e}")),
            Err(_) => failures.add(format!("did not stop within {RUN_STOP_TIMEOUT:?}")),
        }
    }
    failures.check("edge stops")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&values[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of([3.0, 1.0, 2.0].into_iter());
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([1.0, 2.0].into_iter()).median, 1.5);
    }

    #[test]
    fn failures_are_grouped() {
        let mut f = Failures::default();
        f.add("timeout".into());
        f.add("timeout".into());
        f.add("refused".into());
        let text = f.check("joins").expect_err("failures").to_string();
        assert!(text.starts_with("3 joins failed"), "{text}");
        assert!(text.contains("2 x timeout"), "{text}");
        assert!(Failures::default().check("joins").is_ok());
    }

    #[test]
    fn rfc3339_timestamps_become_unix_nanoseconds() {
        assert_eq!(rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ns("2026-11-24T06:39:17.123456Z"),
            Some(1_795_502_357_123_456_000)
        );
        assert_eq!(
            rfc3339_ns("2000-02-29T12:00:00.5Z"),
            Some(951_825_600_500_000_000)
        );
        assert_eq!(rfc3339_ns("yesterday"), None);
    }

    #[test]
    fn tools_give_stdout_or_their_stderr_and_are_bounded() {
        let out = run_tool(
            Command::new("sh").args(["-c", "echo hi"]),
            "echo",
            Duration::from_secs(10),
        );
        assert_eq!(out.expect("echo runs"), b"hi\n");
        let err = run_tool(
            Command::new("sh").args(["-c", "echo nope >&2; exit 3"]),
            "failing",
            Duration::from_secs(10),
        )
        .expect_err("exit 3");
        assert!(err.to_string().contains("nope"), "{err}");
        let started = Instant::now();
        let err = run_tool(
            Command::new("sleep").arg("30"),
            "sleep",
            Duration::from_millis(200),
        )
        .expect_err("too slow");
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn metric_sums_add_every_series_of_a_family() {
        let page = "# HELP x_open Open.\n# TYPE x_open gauge\nx_open{kind=\"logs\"} 3\n\
                    x_open{kind=\"exec\"} 1\nx_open_total 9\nx_other 5\n# TYPE y gauge\n";
        assert_eq!(metric_sum(page, "x_open"), Some(4.0));
        assert_eq!(metric_sum(page, "x_other"), Some(5.0));
        assert_eq!(metric_sum(page, "y"), Some(0.0));
        assert_eq!(metric_sum(page, "z"), None);
    }

    #[test]
    fn cpu_time_counts_fields_after_the_command_name() {
        let stat = "4242 (cloud core) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 100 0";
        assert_eq!(cpu_time_of_stat(stat), Some(Duration::from_secs(3)));
        assert_eq!(cpu_time_of_stat("garbage"), None);
    }
}
