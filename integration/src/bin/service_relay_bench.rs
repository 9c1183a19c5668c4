//! `service-relay-bench`: what relaying every Service and EndpointSlice to every edge costs
//! (docs/services.md, "Relay: which Services an edge holds"; figures in docs/benchmarks.md,
//! "Services relay").
//!
//! A real control plane (`../shared/k8s`, kube-apiserver only: the bench writes the slices
//! itself, two endpoints each, so the figures are the relay's and not a controller's), the real
//! `cloudcore serve --control-plane kube` under the shipped RBAC, and `--edges` in-process
//! `edgecore::run` edges, all on 127.0.0.1. The bench creates `--services` Services with one
//! EndpointSlice each in a namespace of its own, and measures:
//!
//! - the time from the first create until the API answered the last, and until every edge's
//!   store holds every one of them;
//! - per edge: objects and body bytes held for those Services (scaled per 100 Services), and
//!   the growth of its `edge.db`;
//! - cloudcore's RSS before and after;
//! - the time a late edge needs, from its start, to hold them all.
//!
//! Stores are read through their own read-only SQLite connections, as sync-bench does.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use edgecore::store::Store;
use futures::StreamExt;
use integration::Cloud;
use integration::bench::{self, Machine, create_token, join_edges, mib, ms, node_name};
use integration::cluster::{ClusterOptions, Components, KubeCluster};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

const NAMESPACE: &str = "relay-bench";
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Parser)]
#[command(
    name = "service-relay-bench",
    about = "What relaying Services to every edge costs"
)]
struct Cli {
    /// Services to create, each with one EndpointSlice of two endpoints.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Edges connected while the Services are created.
    #[arg(long, default_value_t = 10)]
    edges: usize,
    /// Creates in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

struct Figures {
    services: usize,
    edges: usize,
    converge: Duration,
    /// From the first create to the API's answer to the last.
    creates: Duration,
    objects_per_edge: usize,
    body_bytes_per_edge: u64,
    db_growth_bytes: u64,
    late_edge: Duration,
    cloud_rss_before_kib: u64,
    cloud_rss_after_kib: u64,
    machine: Machine,
}

impl bench::Report for Figures {
    fn table(&self) -> String {
        let per_100 = |v: f64| v * 100.0 / self.services as f64;
        format!(
            "services relay: {} Services (1 slice, 2 endpoints each) to {} edges\n\
             creates (first → API answered the last)           {:>10.0} ms\n\
             converge (first create → every store holds all)   {:>10.0} ms\n\
             objects per edge                                  {:>10}  ({:.0} per 100 Services)\n\
             body bytes per edge                               {:>10}  ({:.1} KiB per 100 Services)\n\
             edge.db growth per edge                           {:>10}  ({:.1} KiB per 100 Services)\n\
             late edge: start → holds all                      {:>10.0} ms\n\
             cloudcore RSS before / after                      {:>6.1} / {:.1} MiB\n\
             machine: {} CPUs ({}), {} MiB, kernel {}\n",
            self.services,
            self.edges,
            ms(self.creates),
            ms(self.converge),
            self.objects_per_edge,
            per_100(self.objects_per_edge as f64),
            self.body_bytes_per_edge,
            per_100(self.body_bytes_per_edge as f64) / 1024.0,
            self.db_growth_bytes,
            per_100(self.db_growth_bytes as f64) / 1024.0,
            ms(self.late_edge),
            mib(self.cloud_rss_before_kib),
            mib(self.cloud_rss_after_kib),
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_mib,
            self.machine.kernel,
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "services": self.services,
            "edges": self.edges,
            "creates_ms": ms(self.creates),
            "converge_ms": ms(self.converge),
            "objects_per_edge": self.objects_per_edge,
            "body_bytes_per_edge": self.body_bytes_per_edge,
            "db_growth_bytes_per_edge": self.db_growth_bytes,
            "late_edge_ms": ms(self.late_edge),
            "cloud_rss_before_kib": self.cloud_rss_before_kib,
            "cloud_rss_after_kib": self.cloud_rss_after_kib,
            "machine": self.machine.to_json(),
        })
    }
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| {
        vec![
            ("--services", c.services),
            ("--edges", c.edges),
            ("--concurrency", c.concurrency),
        ]
    }) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    bench::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let json = cli.json;
    bench::finish(runtime.block_on(run(&cli)), json)
}

/// Objects of the bench's namespace in a store: (count, body bytes).
fn held(dir: &Path) -> Result<(usize, u64)> {
    let store = Store::open_read_only(dir)?;
    let objects = store.list(&["Service", "EndpointSlice"])?;
    let ours = objects.iter().filter(|o| o.key.namespace == NAMESPACE);
    Ok(ours.fold((0, 0), |(n, bytes), o| (n + 1, bytes + o.body.len() as u64)))
}

fn db_size(dir: &Path) -> u64 {
    ["edge.db", "edge.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Waits until every store in `dirs` holds `want` objects of the namespace.
async fn converge(dirs: &[PathBuf], want: usize) -> Result<()> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let mut behind = Vec::new();
        for dir in dirs {
            let (n, _) = held(dir).unwrap_or((0, 0));
            if n < want {
                behind.push(format!("{}: {n}/{want}", dir.display()));
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "not converged within {CONVERGE_TIMEOUT:?}: {}",
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn service(i: usize) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": NAMESPACE, "labels": {"app": format!("svc-{i}")}},
        "spec": {"selector": {"app": format!("svc-{i}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))?)
}

fn slice(i: usize) -> Result<EndpointSlice> {
    let endpoint = |n: usize| {
        json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256 / 2 * 2 + n)],
               "conditions": {"ready": true, "serving": true, "terminating": false},
               "nodeName": "gateway-7",
               "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": format!("svc-{i}-pod-{n}"),
                             "uid": format!("00000000-0000-0000-0000-{:012}", i * 2 + n)}})
    };
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}"),
                                "endpointslice.kubernetes.io/managed-by": "service-relay-bench"}},
        "addressType": "IPv4",
        "endpoints": [endpoint(0), endpoint(1)],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))?)
}

async fn run(cli: &Cli) -> Result<Figures> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let cluster = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            // Panics naming what is missing (root, the binaries, etcd).
            let cluster = KubeCluster::start(
                &dir,
                &ClusterOptions {
                    components: Components::ApiServerOnly,
                    ..ClusterOptions::default()
                },
            );
            let credentials = cluster.cloudcore_credentials(|rbac| rbac);
            (cluster, credentials)
        }
    })
    .await
    .context("the control plane's start panicked")?;
    let (cluster, credentials) = cluster;
    let binary = bench::cloudcore_binary(None)?;
    let mut cloud = Cloud::start_kube_binary(
        &binary,
        &dir,
        &cluster,
        &credentials,
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        &[],
    )?;
    let token = create_token(&binary, &cloud, cli.edges + 1).await?;
    let names: Vec<String> = (0..=cli.edges)
        .map(|i| node_name(cli.edges + 1, i))
        .collect();
    let edges_dir = dir.join("edges");
    std::fs::create_dir_all(&edges_dir)?;
    let dirs = join_edges(&token, &names, &edges_dir, 8).await?;
    let (late_dir, dirs) = dirs.split_last().context("no edges")?;
    let edges = bench::run_edges(dirs, &cloud.address(), |_| {
        edgecore::devices::DevicesConfig::disabled()
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while cloud.metric("cloudcore_connected_edges") < cli.edges as f64 {
        ensure!(
            Instant::now() < deadline,
            "the edges did not connect within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = integration::kube_client(&cluster.kubeconfig).await?;
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    // Let the first resyncs settle before the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let db_before = db_size(&dirs[0]);
    let cloud_rss_before_kib = bench::rss_kib(cloud.pid().context("cloudcore exited")?)?;

    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(0..cli.services)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                services
                    .create(&PostParams::default(), &service(i)?)
                    .await?;
                slices.create(&PostParams::default(), &slice(i)?).await?;
                Ok(())
            }
        })
        .buffer_unordered(cli.concurrency)
        .collect()
        .await;
    for result in results {
        result.context("a create failed")?;
    }
    let creates = started.elapsed();
    let want = cli.services * 2;
    converge(dirs, want).await?;
    let converge_time = started.elapsed();
    let (objects_per_edge, body_bytes_per_edge) = held(&dirs[0])?;
    let db_growth_bytes = db_size(&dirs[0]).saturating_sub(db_before);
    let cloud_rss_after_kib = bench::rss_kib(cloud.pid().context("cloudcore exited")?)?;

    let late_started = Instant::now();
    let late = bench::run_edge(
        late_dir,
        &cloud.address(),
        edgecore::devices::DevicesConfig::disabled(),
    )
    .await?;
    converge(std::slice::from_ref(late_dir), want).await?;
    let late_edge = late_started.elapsed();

    let mut all = edges;
    all.push(late);
    bench::stop_edges(all).await?;
    cloud.stop();
    drop(cluster);
    Ok(Figures {
        services: cli.services,
        edges: cli.edges,
        converge: converge_time,
        creates,
        objects_per_edge,
        body_bytes_per_edge,
        db_growth_bytes,
        late_edge,
        cloud_rss_before_kib,
        cloud_rss_after_kib,
        machine: Machine::read(),
    })
}
