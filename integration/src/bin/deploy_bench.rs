//! `deploy-bench`: what the embedded control plane's Deployment and ReplicaSet controllers
//! add to running pods on edges, and what they cost at rest.
//!
//! Everything is real and on this machine: `cloudcore serve --control-plane embedded`,
//! `--edges` edges (`edgecore join` + `edgecore run`), each with a private containerd (the
//! project's config and images), the load through kube-rs.
//!
//! 1. Pods alone: `--replicas` bare pods created at once (the scheduler spreads them over
//!    the edges), timed until all are Ready; then deleted until gone.
//! 2. A Deployment of `--replicas`: created, timed until `availableReplicas` is all of them;
//!    then a full rolling update (a template annotation; maxSurge and maxUnavailable 25%),
//!    timed until the rollout is complete (every replica updated and available, none old);
//!    then deleted until its pods are gone.
//! 3. At rest: cloudcore's memory after `--idle-secs` of quiet, then `--deployments`
//!    Deployments of 0 replicas created (16 requests in flight), timed until each has its
//!    ReplicaSet and a status; after `--idle-secs` of quiet again, cloudcore's memory and the
//!    CPU it used during that quiet.
//!
//! A failure or `--timeout-secs` stops everything this bench started and prints the error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::StreamExt;
use integration::bench::{self, BenchContainerd, Machine, mib};
use integration::{Cloud, Edge};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const NAMESPACE: &str = "deploy-bench";
/// The first pod-subnet octet of the edges' containerds (`10.{80+i}.N.0/24`).
const SUBNET_OCTET: u8 = 80;
/// How long a tool (containerd start, join) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(200);
const COMMAND: &str = "trap 'exit 0' TERM; sleep 2147483647 & wait";

#[derive(Parser, Debug)]
#[command(
    name = "deploy-bench",
    about = "Measures a Deployment's create -> all Ready and a full rolling update against the \
             pods alone, across edges, and cloudcore's memory and CPU with many Deployments at rest"
)]
struct Cli {
    /// Edges, each with its own containerd.
    #[arg(long, default_value_t = 10)]
    edges: usize,
    /// Replicas of the Deployment (and bare pods of the comparison).
    #[arg(long, default_value_t = 100)]
    replicas: usize,
    /// Deployments (of 0 replicas) for the at-rest reading.
    #[arg(long, default_value_t = 1000)]
    deployments: usize,
    /// Seconds of quiet before each at-rest reading.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// The cloudcore binary [default: `cloudcore` next to this executable].
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// The edgecore binary [default: `edgecore` next to this executable].
    #[arg(long)]
    edgecore: Option<PathBuf>,
    /// Give up on a phase (pods Ready, a rollout complete, ...) after this many seconds.
    #[arg(long, default_value_t = 600)]
    phase_timeout_secs: u64,
    /// Give up after this many seconds in total.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--edges", c.edges),
            ("--replicas", c.replicas),
            ("--deployments", c.deployments),
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
    let limit = Duration::from_secs(cli.timeout_secs);
    let result = runtime.block_on(async {
        match tokio::time::timeout(limit, run(&cli)).await {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!(
                "gave up after --timeout-secs {}",
                cli.timeout_secs
            )),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(30));
    bench::finish(result, cli.json)
}

/// The figures.
struct Report {
    edges: usize,
    replicas: usize,
    deployments: usize,
    pods_ready: Duration,
    deployment_ready: Duration,
    rollout: Duration,
    spread: BTreeMap<String, usize>,
    create_deployments: Duration,
    rss_before_kib: u64,
    rss_after_kib: u64,
    idle_cpu_percent: f64,
    idle_secs: u64,
    machine: Machine,
}

impl bench::Report for Report {
    fn table(&self) -> String {
        let per = |d: Duration| d.as_secs_f64();
        let spread: Vec<usize> = self.spread.values().copied().collect();
        format!(
            "edges {}, replicas {}\n\
             pods alone: create -> all Ready        {:8.1} s\n\
             Deployment: create -> all available    {:8.1} s\n\
             Deployment: full rolling update        {:8.1} s\n\
             Deployment pods per edge               {:?}\n\
             {} Deployments (0 replicas) -> each with its ReplicaSet and status {:8.1} s\n\
             cloudcore RSS before / after           {:8.1} / {:.1} MiB ({:.1} KiB per Deployment)\n\
             cloudcore CPU at rest over {} s          {:8.2} %\n\
             machine: {} CPUs, {}, {} MiB, kernel {}\n",
            self.edges,
            self.replicas,
            per(self.pods_ready),
            per(self.deployment_ready),
            per(self.rollout),
            spread,
            self.deployments,
            per(self.create_deployments),
            mib(self.rss_before_kib),
            mib(self.rss_after_kib),
            (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.deployments as f64,
            self.idle_secs,
            self.idle_cpu_percent,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_mib,
            self.machine.kernel,
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "edges": self.edges,
            "replicas": self.replicas,
            "pods_alone_ready_s": self.pods_ready.as_secs_f64(),
            "deployment_available_s": self.deployment_ready.as_secs_f64(),
            "rolling_update_s": self.rollout.as_secs_f64(),
            "pods_per_edge": self.spread,
            "deployments": self.deployments,
            "deployments_created_s": self.create_deployments.as_secs_f64(),
            "cloudcore_rss_before_kib": self.rss_before_kib,
            "cloudcore_rss_after_kib": self.rss_after_kib,
            "cloudcore_idle_cpu_percent": self.idle_cpu_percent,
            "idle_secs": self.idle_secs,
            "machine": self.machine.to_json(),
        })
    }
}

/// Everything started; dropped in order: edges, containerds, cloudcore.
struct Site {
    edges: Vec<Edge>,
    _runtimes: Vec<BenchContainerd>,
    cloud: Cloud,
    _tmp: tempfile::TempDir,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("blocking task")?
}

async fn start(cli: &Cli) -> Result<Site> {
    let cloudcore = bench::cloudcore_binary(cli.cloudcore.as_ref())?;
    let edgecore = bench::edgecore_binary(cli.edgecore.as_ref())?;
    let tmp = tempfile::tempdir().context("tempdir")?;
    let cloud = {
        let (binary, dir) = (cloudcore.clone(), tmp.path().to_path_buf());
        blocking(move || Cloud::start_binary(&binary, &dir, &[])).await?
    };
    let mut runtimes = Vec::new();
    let mut edges = Vec::new();
    for i in 0..cli.edges {
        let dir = tmp.path().join(format!("containerd-{i}"));
        let octet = SUBNET_OCTET + i as u8;
        let bridge = format!("edgdb{i}x");
        let runtime =
            blocking(move || BenchContainerd::start(&dir, octet, &bridge, TOOL_TIMEOUT)).await?;
        let endpoint = runtime.get()?.endpoint.clone();
        runtimes.push(runtime);
        let edge_dir = tmp.path().join(format!("edge-{i}"));
        let node = format!("bench-edge-{i}");
        bench::join_edge(
            &cloudcore,
            &edgecore,
            &cloud,
            &edge_dir,
            &node,
            TOOL_TIMEOUT,
        )?;
        let edge = {
            let edgecore = edgecore.clone();
            blocking(move || {
                bench::start_edge(&edgecore, &edge_dir, &["--cri-endpoint", &endpoint])
            })
            .await?
        };
        edges.push(edge);
    }
    Ok(Site {
        edges,
        _runtimes: runtimes,
        cloud,
        _tmp: tmp,
    })
}

async fn wait_for(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what} not reached within {limit:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn template(labels: Value) -> Value {
    json!({
        "metadata": {"labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "c", "image": integration::BUSYBOX, "command": ["sh", "-c", COMMAND]}],
        },
    })
}

async fn run(cli: &Cli) -> Result<Report> {
    let site = start(cli).await?;
    let result = measure(cli, &site).await;
    if result.is_err() {
        let log = site.cloud.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!(
            "cloudcore log (end):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    tokio::task::block_in_place(move || drop(site));
    result
}

async fn measure(cli: &Cli, site: &Site) -> Result<Report> {
    let client = bench::api_client(NAMESPACE, API_READY_TIMEOUT, &site.cloud).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), NAMESPACE);
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let edges = site.edges.len();
    wait_for(
        "every edge's Node Ready",
        Duration::from_secs(60),
        async || {
            let list = nodes.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .filter(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
                .count()
                >= edges)
        },
    )
    .await?;
    let long = Duration::from_secs(cli.phase_timeout_secs);
    let r = cli.replicas;

    // 1. Pods alone.
    let started = Instant::now();
    let creates = futures::stream::iter(0..r)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("bare-{i}")}});
                let t = template(json!({"bench": "bare"}));
                pod["metadata"]["labels"] = t["metadata"]["labels"].clone();
                pod["spec"] = t["spec"].clone();
                let pod: Pod = serde_json::from_value(pod)?;
                pods.create(&PostParams::default(), &pod).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    creates.into_iter().collect::<Result<Vec<_>>>()?;
    let bare = ListParams::default().labels("bench=bare");
    wait_for("every bare pod Ready", long, async || {
        Ok(pods
            .list(&bare)
            .await?
            .items
            .iter()
            .filter(|p| pod_ready(p))
            .count()
            == r)
    })
    .await?;
    let pods_ready = started.elapsed();
    eprintln!("pods alone: {pods_ready:?}");
    pods.delete_collection(&DeleteParams::default(), &bare)
        .await?;
    wait_for("bare pods gone", long, async || {
        Ok(pods.list(&bare).await?.items.is_empty())
    })
    .await?;

    // 2. The Deployment.
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "bench"},
        "spec": {
            "replicas": r,
            "selector": {"matchLabels": {"bench": "deploy"}},
            "template": template(json!({"bench": "deploy"})),
        },
    }))?;
    let started = Instant::now();
    deployments.create(&PostParams::default(), &d).await?;
    let complete = async || -> Result<bool> {
        let d = deployments.get("bench").await?;
        let s = d.status.unwrap_or_default();
        let n = |v: Option<i32>| v.unwrap_or(0) as usize;
        Ok(s.observed_generation >= d.metadata.generation
            && n(s.updated_replicas) == r
            && n(s.replicas) == r
            && n(s.available_replicas) == r)
    };
    wait_for("the Deployment available", long, complete).await?;
    let deployment_ready = started.elapsed();
    eprintln!("deployment available: {deployment_ready:?}");
    let mut spread = BTreeMap::new();
    for pod in pods
        .list(&ListParams::default().labels("bench=deploy"))
        .await?
        .items
    {
        let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        *spread.entry(node).or_insert(0) += 1;
    }
    let started = Instant::now();
    let patch =
        json!({"spec": {"template": {"metadata": {"annotations": {"bench/rollout": "2"}}}}});
    deployments
        .patch("bench", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    if let Err(e) = wait_for("the rolling update complete", long, complete).await {
        let d = deployments.get("bench").await?;
        let rss: Vec<Value> = replicasets
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|rs| {
                json!([
                    rs.metadata.name,
                    rs.spec.as_ref().and_then(|s| s.replicas),
                    rs.status
                ])
            })
            .collect();
        bail!(
            "{e:#}: deployment {} {:?}; replicasets {rss:?}",
            json!(d.metadata.annotations),
            d.status
        );
    }
    let rollout = started.elapsed();
    eprintln!("rolling update: {rollout:?}");
    deployments
        .delete("bench", &DeleteParams::default())
        .await?;
    let deploy_pods = ListParams::default().labels("bench=deploy");
    wait_for("the Deployment's pods gone", long, async || {
        Ok(pods.list(&deploy_pods).await?.items.is_empty())
    })
    .await?;

    // 3. At rest.
    let pid = site.cloud.pid().context("cloudcore has no pid")?;
    tokio::time::sleep(Duration::from_secs(cli.idle_secs)).await;
    let rss_before_kib = bench::rss_kib(pid)?;
    let started = Instant::now();
    let creates = futures::stream::iter(0..cli.deployments)
        .map(|i| {
            let deployments = deployments.clone();
            async move {
                let d: Deployment = serde_json::from_value(json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": format!("rest-{i}")},
                    "spec": {
                        "replicas": 0,
                        "selector": {"matchLabels": {"rest": format!("r{i}")}},
                        "template": template(json!({"rest": format!("r{i}")})),
                    },
                }))?;
                deployments.create(&PostParams::default(), &d).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    creates.into_iter().collect::<Result<Vec<_>>>()?;
    let n = cli.deployments;
    wait_for(
        "every Deployment with its ReplicaSet and status",
        long,
        async || {
            let rss = replicasets.list(&ListParams::default()).await?.items.len();
            let with_status = deployments
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|d| {
                    d.status
                        .as_ref()
                        .is_some_and(|s| s.observed_generation.is_some())
                })
                .count();
            Ok(rss >= n && with_status >= n)
        },
    )
    .await?;
    let create_deployments = started.elapsed();
    eprintln!("{n} deployments: {create_deployments:?}");
    tokio::time::sleep(Duration::from_secs(cli.idle_secs)).await;
    let cpu_before = bench::cpu_time(pid)?;
    let quiet = Instant::now();
    tokio::time::sleep(Duration::from_secs(cli.idle_secs)).await;
    let cpu = bench::cpu_time(pid)?.saturating_sub(cpu_before);
    let idle_cpu_percent = cpu.as_secs_f64() / quiet.elapsed().as_secs_f64() * 100.0;
    let rss_after_kib = bench::rss_kib(pid)?;
    Ok(Report {
        edges,
        replicas: r,
        deployments: n,
        pods_ready,
        deployment_ready,
        rollout,
        spread,
        create_deployments,
        rss_before_kib,
        rss_after_kib,
        idle_cpu_percent,
        idle_secs: cli.idle_secs,
        machine: Machine::read(),
    })
}
