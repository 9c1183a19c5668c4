//! `api-bench`: a load generator for the embedded Kubernetes API of one real `cloudcore serve`.
//! It measures write throughput (pod creates through kube-rs with bounded concurrency) and watch
//! fan-out (many kube-rs watchers on pods, each receiving every one of a series of label
//! patches). Everything runs on 127.0.0.1.
//!
//! Per round, on a fresh data dir: start cloudcore → read its RSS → create `--pods` pods,
//! `--concurrency` in flight, timing each → read RSS and the CPU cloudcore uses while idle with
//! those pods → open `--watchers` watches on the pods from the current resourceVersion → patch
//! `--updates` pods' labels (a sequence number in each), `--concurrency` in flight → wait until
//! every watcher has every patch, timing each delivery from the moment its patch was sent →
//! read RSS with the watchers connected → stop cloudcore. A missed event fails the bench.
//! Results are a table on stdout (or JSON with `--json`); medians are quoted across rounds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use integration::Cloud;
use integration::bench::{self, Failures, Machine, Spread, mib, ms, percentile};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{
    Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad command line (EX_USAGE), as in the daemons.
/// How long the API may take to answer after cloudcore reports healthy.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long watchers may take to receive everything after the last patch returned.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Quiet time before an RSS reading, so start-up work is done.
const SETTLE: Duration = Duration::from_secs(2);
/// The namespace the pods live in.
const NAMESPACE: &str = "api-bench";
/// The label each patch sets to its sequence number; watchers read it back.
const SEQ_LABEL: &str = "api-bench/seq";
/// The node every pod is bound to at create. No such node exists, so the embedded scheduler
/// does not bind them (it only looks at pods without `spec.nodeName`).
const NODE: &str = "api-bench-node";

#[derive(Parser, Debug)]
#[command(
    name = "api-bench",
    about = "Measures the embedded Kubernetes API's write throughput and watch fan-out through kube-rs"
)]
struct Cli {
    /// Pods to create per round.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Requests (creates, then patches) in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Watches open on the pods during the fan-out phase.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Label patches every watcher must receive.
    #[arg(long, default_value_t = 1000)]
    updates: usize,
    /// Rounds, each on a fresh cloudcore and data dir; figures are medians across rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds cloudcore's CPU use is sampled while idle, after the creates.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// Give up (and stop cloudcore) after this many seconds in total.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--pods", c.pods),
            ("--concurrency", c.concurrency),
            ("--watchers", c.watchers),
            ("--updates", c.updates),
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

/// Runs the rounds under the overall timeout. A round's cloudcore is killed when its [`Cloud`]
/// is dropped, so a timeout, an error or Ctrl-C stops it too.
async fn bench(cli: &Cli) -> Result<Report> {
    let binary = bench::cloudcore_binary(cli.cloudcore.as_ref())?;
    let dir = tempfile::Builder::new()
        .prefix("api-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let rounds = async {
        let mut rounds = Vec::with_capacity(cli.rounds);
        for index in 1..=cli.rounds {
            let round_dir = dir.path().join(format!("round-{index}"));
            let round = run_round(cli, &binary, &round_dir)
                .await
                .with_context(|| format!("round {index}"))?;
            eprintln!(
                "round {index}/{}: {:.0} creates/s (p99 {:.1} ms), delivery p99 {:.1} ms, {:.0} events/s to {} watchers",
                cli.rounds,
                round.creates.per_sec(),
                ms(percentile(&round.creates.latencies, 0.99)),
                ms(percentile(&round.fan_out.delivery, 0.99)),
                round.fan_out.delivered_per_sec(),
                cli.watchers,
            );
            rounds.push(round);
        }
        anyhow::Ok(rounds)
    };
    let limit = Duration::from_secs(cli.timeout_secs);
    let rounds = tokio::select! {
        rounds = tokio::time::timeout(limit, rounds) => rounds
            .unwrap_or_else(|_| Err(anyhow!("gave up after {} s (--timeout-secs)", cli.timeout_secs)))?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    Ok(Report {
        pods: cli.pods,
        concurrency: cli.concurrency,
        watchers: cli.watchers,
        updates: cli.updates,
        idle: Duration::from_secs(cli.idle_secs),
        machine: Machine::read(),
        rounds,
    })
}

/// One round's figures.
struct Round {
    /// cloudcore after start-up, with only the bench namespace.
    rss_fresh_kib: u64,
    creates: Writes,
    /// With the pods stored.
    rss_pods_kib: u64,
    /// CPU cloudcore used while idle with the pods, as a fraction of one CPU.
    idle_cpu: f64,
    fan_out: FanOut,
    /// With the watchers connected, after they received everything.
    rss_watchers_kib: u64,
}

/// A batch of writes.
struct Writes {
    count: usize,
    /// From the first request sent to the last answer.
    wall: Duration,
    /// Per request, sent → answered; sorted.
    latencies: Vec<Duration>,
}

impl Writes {
    fn per_sec(&self) -> f64 {
        self.count as f64 / self.wall.as_secs_f64()
    }
}

/// The fan-out phase's figures.
struct FanOut {
    patches: Writes,
    /// Per (watcher, patch): patch sent → event received by that watcher; sorted.
    delivery: Vec<Duration>,
    /// From the first patch sent to the last event received anywhere.
    wall: Duration,
    /// Watches that ended early and were resumed from their last resourceVersion.
    rewatches: usize,
    /// CPU cloudcore used from the first patch to the last delivery.
    cloud_cpu: Duration,
}

impl FanOut {
    fn delivered_per_sec(&self) -> f64 {
        self.delivery.len() as f64 / self.wall.as_secs_f64()
    }

    /// cloudcore CPU per delivered event, in microseconds (the writes' share included).
    fn cloud_cpu_per_event_us(&self) -> f64 {
        self.cloud_cpu.as_secs_f64() * 1e6 / self.delivery.len().max(1) as f64
    }
}

async fn run_round(cli: &Cli, binary: &Path, dir: &Path) -> Result<Round> {
    let (binary, data) = (binary.to_path_buf(), dir.to_path_buf());
    let mut cloud = tokio::task::spawn_blocking(move || Cloud::start_binary(&binary, &data, &[]))
        .await
        .context("the cloudcore start task panicked")??;
    let outcome = measure(cli, &mut cloud).await;
    if outcome.is_err() {
        let log = cloud.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!(
            "last lines of the cloudcore log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    tokio::task::block_in_place(|| cloud.stop());
    outcome
}

/// cloudcore's RSS, failing if it is no longer running.
fn rss(cloud: &mut Cloud) -> Result<u64> {
    ensure!(cloud.is_running(), "cloudcore exited");
    bench::rss_kib(cloud.pid().context("cloudcore is not running")?)
}

async fn measure(cli: &Cli, cloud: &mut Cloud) -> Result<Round> {
    let client = integration::kube_client(&cloud.kubeconfig()).await?;
    wait_for_api(&client).await?;
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
    tokio::time::sleep(SETTLE).await;
    let rss_fresh_kib = rss(cloud)?;

    eprintln!("creating {} pods ({} at once)", cli.pods, cli.concurrency);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let creates = create_pods(cli, &pods).await?;
    let rss_pods_kib = rss(cloud)?;
    let pid = cloud.pid().context("cloudcore is not running")?;
    let cpu_before = bench::cpu_time(pid)?;
    let idle = Duration::from_secs(cli.idle_secs);
    tokio::time::sleep(idle).await;
    let idle_cpu = (bench::cpu_time(pid)? - cpu_before).as_secs_f64() / idle.as_secs_f64();

    eprintln!(
        "{} watchers, {} label patches ({} at once)",
        cli.watchers, cli.updates, cli.concurrency
    );
    let (fan_out, rss_watchers_kib) = fan_out(cli, &client, &pods, pid, || rss(cloud)).await?;
    Ok(Round {
        rss_fresh_kib,
        creates,
        rss_pods_kib,
        idle_cpu,
        fan_out,
        rss_watchers_kib,
    })
}

/// Lists namespaces until the API answers.
async fn wait_for_api(client: &kube::Client) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + API_READY_TIMEOUT;
    loop {
        match namespaces.list(&ListParams::default()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context(format!(
                    "the embedded API did not answer within {API_READY_TIMEOUT:?}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn pod_name(index: usize) -> String {
    format!("pod-{index:05}")
}

fn bench_pod(index: usize) -> Result<Pod> {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(index), "labels": {"app": "api-bench"}},
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
        },
    }))
    .context("the bench pod does not parse as a Pod")
}

async fn create_pods(cli: &Cli, pods: &Api<Pod>) -> Result<Writes> {
    let started = Instant::now();
    let results: Vec<Result<Duration, String>> = futures::stream::iter(0..cli.pods)
        .map(|index| async move {
            let pod = bench_pod(index).map_err(|e| format!("{e:#}"))?;
            let began = Instant::now();
            pods.create(&PostParams::default(), &pod)
                .await
                .map(|_| began.elapsed())
                .map_err(|e| e.to_string())
        })
        .buffer_unordered(cli.concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut failures = Failures::default();
    let mut latencies = Vec::with_capacity(cli.pods);
    for result in results {
        match result {
            Ok(latency) => latencies.push(latency),
            Err(why) => failures.add(why),
        }
    }
    failures.check("pod creates")?;
    latencies.sort();
    Ok(Writes {
        count: cli.pods,
        wall,
        latencies,
    })
}

/// What one watcher received: per patch sequence number, when it arrived.
struct Received {
    at: Vec<Option<Instant>>,
    duplicates: usize,
    rewatches: usize,
}

/// Opens the watchers, patches, waits for delivery, then reads `rss` with the watchers still
/// connected.
async fn fan_out(
    cli: &Cli,
    client: &kube::Client,
    pods: &Api<Pod>,
    pid: u32,
    rss: impl FnOnce() -> Result<u64>,
) -> Result<(FanOut, u64)> {
    // Any list answers with the store's global resourceVersion; namespaces are few.
    let from = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("cannot list namespaces")?
        .metadata
        .resource_version
        .context("the namespace list has no resourceVersion")?;
    let stop = CancellationToken::new();
    let mut watchers = JoinSet::new();
    let mut opened = Vec::with_capacity(cli.watchers);
    for _ in 0..cli.watchers {
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        opened.push(is_ready);
        watchers.spawn(watch_pods(
            pods.clone(),
            from.clone(),
            cli.updates,
            ready,
            stop.clone(),
        ));
    }
    // Every watch is registered at the server before the first patch, so each patch is a live
    // event for every watcher (the watch from `from` would replay it otherwise).
    for is_ready in opened {
        is_ready
            .await
            .map_err(|_| anyhow!("a watcher ended before its watch opened"))?
            .map_err(|e| anyhow!("cannot open a watch: {e}"))?;
    }

    let cpu_before = bench::cpu_time(pid)?;
    let started = Instant::now();
    let results: Vec<Result<(usize, Instant, Duration), String>> =
        futures::stream::iter(0..cli.updates)
            .map(|seq| async move {
                let patch = json!({"metadata": {"labels": {SEQ_LABEL: seq.to_string()}}});
                let name = pod_name(seq % cli.pods);
                let began = Instant::now();
                pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| (seq, began, began.elapsed()))
                    .map_err(|e| e.to_string())
            })
            .buffer_unordered(cli.concurrency)
            .collect()
            .await;
    let patch_wall = started.elapsed();
    let mut failures = Failures::default();
    let mut sent = vec![started; cli.updates];
    let mut latencies = Vec::with_capacity(cli.updates);
    for result in results {
        match result {
            Ok((seq, began, latency)) => {
                sent[seq] = began;
                latencies.push(latency);
            }
            Err(why) => failures.add(why),
        }
    }
    failures.check("label patches")?;
    latencies.sort();

    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DELIVERY_TIMEOUT).await;
            stop.cancel();
        })
    };
    let mut received = Vec::with_capacity(cli.watchers);
    while let Some(joined) = watchers.join_next().await {
        received.push(joined.context("a watcher task panicked")??);
    }
    timer.abort();
    let cloud_cpu = bench::cpu_time(pid)?.saturating_sub(cpu_before);
    let rss_kib = rss()?;

    let mut delivery = Vec::with_capacity(cli.watchers * cli.updates);
    let mut missing = Failures::default();
    let mut last = started;
    let mut rewatches = 0;
    for (index, watcher) in received.iter().enumerate() {
        rewatches += watcher.rewatches;
        let lost = watcher.at.iter().filter(|at| at.is_none()).count();
        if lost > 0 {
            missing.add(format!(
                "a watcher received {} of {} patches within {DELIVERY_TIMEOUT:?} (watcher {index}, first missing seq {})",
                cli.updates - lost,
                cli.updates,
                watcher.at.iter().position(Option::is_none).unwrap_or(0)
            ));
        }
        if watcher.duplicates > 0 {
            missing.add(format!(
                "a watcher received {} events twice (watcher {index})",
                watcher.duplicates
            ));
        }
        for (seq, at) in watcher.at.iter().enumerate() {
            if let Some(at) = at {
                delivery.push(at.saturating_duration_since(sent[seq]));
                last = last.max(*at);
            }
        }
    }
    missing.check("watchers")?;
    delivery.sort();
    Ok((
        FanOut {
            patches: Writes {
                count: cli.updates,
                wall: patch_wall,
                latencies,
            },
            delivery,
            wall: last.duration_since(started),
            rewatches,
            cloud_cpu,
        },
        rss_kib,
    ))
}

/// One watcher: watches the pods from `from`, notes when each patch's event arrives, and
/// returns when it has all `updates` of them or `stop` fires. A watch the server ends early
/// (e.g. a watcher that fell too far behind) is resumed from the last resourceVersion seen,
/// as kube-rs's watcher does; a watch ERROR event fails the watcher.
async fn watch_pods(
    pods: Api<Pod>,
    mut from: String,
    updates: usize,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    stop: CancellationToken,
) -> Result<Received> {
    let mut received = Received {
        at: vec![None; updates],
        duplicates: 0,
        rewatches: 0,
    };
    let mut count = 0;
    let mut ready = Some(ready);
    loop {
        let stream = match pods.watch(&WatchParams::default(), &from).await {
            Ok(stream) => stream,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e.to_string()));
                }
                return Err(e).context("cannot open a watch");
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        let mut stream = stream.boxed();
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return Ok(received),
                event = stream.try_next() => event.context("watch stream failed")?,
            };
            let Some(event) = event else { break };
            let now = Instant::now();
            let pod = match event {
                WatchEvent::Added(pod) | WatchEvent::Modified(pod) | WatchEvent::Deleted(pod) => {
                    pod
                }
                WatchEvent::Bookmark(bookmark) => {
                    from = bookmark.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(status) => bail!("watch ERROR event: {status:?}"),
            };
            if let Some(rv) = pod.resource_version() {
                from = rv;
            }
            let Some(seq) = pod
                .labels()
                .get(SEQ_LABEL)
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&seq| seq < updates)
            else {
                continue;
            };
            match &mut received.at[seq] {
                Some(_) => received.duplicates += 1,
                slot => {
                    *slot = Some(now);
                    count += 1;
                }
            }
            if count == updates {
                return Ok(received);
            }
        }
        received.rewatches += 1;
    }
}

/// Everything measured.
struct Report {
    pods: usize,
    concurrency: usize,
    watchers: usize,
    updates: usize,
    idle: Duration,
    machine: Machine,
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

    fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "api-bench: {} pods, {} requests in flight, {} watchers x {} label patches, {} rounds\n\
             machine: {} CPUs ({}), {} MiB, Linux {}\n\n",
            self.pods,
            self.concurrency,
            self.watchers,
            self.updates,
            self.rounds.len(),
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.kernel
        );
        out.push_str(&format!(
            "{:<6} {:>9} {:>7} {:>7} {:>7} {:>8} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
            "round",
            "creates/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "idle CPU",
            "patches/s",
            "p50 ms",
            "p99 ms",
            "deliv p50",
            "deliv p99",
            "deliv max",
            "events/s",
            "us/event",
            "RSS0 MiB",
            "pods MiB",
            "wtch MiB",
        ));
        for (i, r) in self.rounds.iter().enumerate() {
            let c = &r.creates;
            let p = &r.fan_out.patches;
            let d = &r.fan_out.delivery;
            out.push_str(&format!(
                "{:<6} {:>9.0} {:>7.1} {:>7.1} {:>7.1} {:>7.1}% {:>9.0} {:>7.1} {:>7.1} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1}\n",
                i + 1,
                c.per_sec(),
                ms(percentile(&c.latencies, 0.5)),
                ms(percentile(&c.latencies, 0.99)),
                ms(c.latencies.last().copied().unwrap_or_default()),
                r.idle_cpu * 100.0,
                p.per_sec(),
                ms(percentile(&p.latencies, 0.5)),
                ms(percentile(&p.latencies, 0.99)),
                ms(percentile(d, 0.5)),
                ms(percentile(d, 0.99)),
                ms(d.last().copied().unwrap_or_default()),
                r.fan_out.delivered_per_sec(),
                r.fan_out.cloud_cpu_per_event_us(),
                mib(r.rss_fresh_kib),
                mib(r.rss_pods_kib),
                mib(r.rss_watchers_kib),
            ));
        }
        let rewatches: usize = self.rounds.iter().map(|r| r.fan_out.rewatches).sum();
        out.push_str(&format!(
            "\nevery watcher received every patch in every round; watches resumed after ending early: {rewatches}\n"
        ));
        let row = |name: &str, s: Spread, unit: &str| {
            format!(
                "{name:<32} {:>9.1} {unit}  ({:.1} .. {:.1})\n",
                s.median, s.min, s.max
            )
        };
        out.push_str("\nmedian across rounds (min .. max)\n");
        for (name, spread, unit) in self.summary() {
            out.push_str(&row(name, spread, unit));
        }
        out
    }

    /// The headline figures: name, spread across rounds, unit.
    fn summary(&self) -> Vec<(&'static str, Spread, &'static str)> {
        vec![
            (
                "pod creates per second",
                self.spread(|r| r.creates.per_sec()),
                "/s ",
            ),
            (
                "create latency p50",
                self.spread(|r| ms(percentile(&r.creates.latencies, 0.5))),
                "ms ",
            ),
            (
                "create latency p99",
                self.spread(|r| ms(percentile(&r.creates.latencies, 0.99))),
                "ms ",
            ),
            (
                "idle CPU with the pods",
                self.spread(|r| r.idle_cpu * 100.0),
                "%  ",
            ),
            (
                "label patches per second",
                self.spread(|r| r.fan_out.patches.per_sec()),
                "/s ",
            ),
            (
                "patch latency p99",
                self.spread(|r| ms(percentile(&r.fan_out.patches.latencies, 0.99))),
                "ms ",
            ),
            (
                "delivery latency p50",
                self.spread(|r| ms(percentile(&r.fan_out.delivery, 0.5))),
                "ms ",
            ),
            (
                "delivery latency p99",
                self.spread(|r| ms(percentile(&r.fan_out.delivery, 0.99))),
                "ms ",
            ),
            (
                "events delivered per second",
                self.spread(|r| r.fan_out.delivered_per_sec()),
                "/s ",
            ),
            (
                "cloudcore CPU per delivered event",
                self.spread(|r| r.fan_out.cloud_cpu_per_event_us()),
                "us ",
            ),
            (
                "cloudcore RSS, fresh",
                self.spread(|r| mib(r.rss_fresh_kib)),
                "MiB",
            ),
            (
                "cloudcore RSS, with the pods",
                self.spread(|r| mib(r.rss_pods_kib)),
                "MiB",
            ),
            (
                "cloudcore RSS, with the watchers",
                self.spread(|r| mib(r.rss_watchers_kib)),
                "MiB",
            ),
        ]
    }

    fn to_json(&self) -> Value {
        let writes = |w: &Writes| {
            json!({
                "count": w.count,
                "wall_s": w.wall.as_secs_f64(),
                "per_sec": w.per_sec(),
                "p50_ms": ms(percentile(&w.latencies, 0.5)),
                "p99_ms": ms(percentile(&w.latencies, 0.99)),
                "max_ms": ms(w.latencies.last().copied().unwrap_or_default()),
            })
        };
        json!({
            "pods": self.pods,
            "concurrency": self.concurrency,
            "watchers": self.watchers,
            "updates": self.updates,
            "idle_s": self.idle.as_secs(),
            "machine": self.machine.to_json(),
            "rounds": self.rounds.iter().map(|r| json!({
                "rss_fresh_kib": r.rss_fresh_kib,
                "creates": writes(&r.creates),
                "rss_pods_kib": r.rss_pods_kib,
                "idle_cpu_fraction": r.idle_cpu,
                "patches": writes(&r.fan_out.patches),
                "delivery": {
                    "events": r.fan_out.delivery.len(),
                    "wall_s": r.fan_out.wall.as_secs_f64(),
                    "per_sec": r.fan_out.delivered_per_sec(),
                    "p50_ms": ms(percentile(&r.fan_out.delivery, 0.5)),
                    "p99_ms": ms(percentile(&r.fan_out.delivery, 0.99)),
                    "max_ms": ms(r.fan_out.delivery.last().copied().unwrap_or_default()),
                    "rewatches": r.fan_out.rewatches,
                    "cloudcore_cpu_s": r.fan_out.cloud_cpu.as_secs_f64(),
                    "cloudcore_cpu_per_event_us": r.fan_out.cloud_cpu_per_event_us(),
                },
                "rss_watchers_kib": r.rss_watchers_kib,
            })).collect::<Vec<_>>(),
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
    fn pod_names_sort_in_order() {
        assert_eq!(pod_name(7), "pod-00007");
        assert!(pod_name(9) < pod_name(10));
    }

    #[test]
    fn the_bench_pod_is_bound_and_labelled() {
        let pod = bench_pod(3).expect("pod");
        assert_eq!(pod.name_any(), "pod-00003");
        assert_eq!(
            pod.spec.and_then(|s| s.node_name).as_deref(),
            Some(NODE),
            "bound at create, so the scheduler leaves it alone"
        );
    }
}
