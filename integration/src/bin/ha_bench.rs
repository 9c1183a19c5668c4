//! `ha-bench`: how long edges take to come back when the cloudcore replica holding their
//! sessions dies (docs/scale.md, "Several replicas").
//!
//! Everything is real and on this machine: a fresh control plane ([`KubeCluster`], from
//! `../shared/k8s`), three `cloudcore serve --control-plane=kube` replicas behind one UDP
//! address (the nftables load balancer of [`integration::ha`]), `--edges` `edgecore run`
//! processes joined through that address (no container runtime: only sessions matter here).
//! Then `--kills` rounds: the replica holding the most sessions is killed with -9 and taken out
//! of the load balancer (as kube-proxy would); for each of its edges, the time from the kill
//! until its Node names another live replica and the edge reports itself connected; the
//! replica is started again and put back. With `--leader` rounds the Lease holder is the one
//! killed, and the time until another replica holds the Lease is taken as well.
//!
//! Replicas run with `--heartbeat-interval 2s --dead-after 8s` as the shipped Deployment does
//! (`--heartbeat-interval`, `--dead-after` to change), so an edge notices a dead replica within
//! 8 s; the figures are dominated by that and the edge's reconnect backoff.
//! Stops everything it started at the end or on an error (the temp dir is removed).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use integration::Edge;
use integration::bench::{self, Machine, Report, ms, percentile};
use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::ha::{Replicas, Sharing, lease_holder, owners};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    name = "ha-bench",
    about = "Failover time of edges when a cloudcore replica dies"
)]
struct Cli {
    /// Edges (edgecore processes) spread over the three replicas.
    #[arg(long, default_value_t = 12)]
    edges: usize,
    /// Replicas killed, one after the other (each started again before the next).
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Kill the Lease holder each round instead of the replica with most sessions, and time
    /// the Lease's handover too.
    #[arg(long)]
    leader: bool,
    /// cloudcore binary (default: next to this one).
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// edgecore binary (default: next to this one).
    #[arg(long)]
    edgecore: Option<PathBuf>,
    /// The replicas' `--heartbeat-interval` (default: the shipped Deployment's).
    #[arg(long, default_value = "2s")]
    heartbeat_interval: String,
    /// The replicas' `--dead-after`: how long an edge waits for a dead replica before it
    /// reconnects (default: the shipped Deployment's).
    #[arg(long, default_value = "8s")]
    dead_after: String,
    /// How the replicas share the CA and registry: cluster (`--state=cluster`) or copy.
    #[arg(long, default_value = "cluster")]
    sharing: SharingArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SharingArg {
    Cluster,
    Copy,
}

struct Figures {
    edges: usize,
    kills: usize,
    heartbeat_interval: String,
    dead_after: String,
    failovers: Vec<Duration>,
    handovers: Vec<Duration>,
    machine: Machine,
}

impl Report for Figures {
    fn table(&self) -> String {
        let mut sorted = self.failovers.clone();
        sorted.sort();
        let mut out = format!(
            "ha-bench: {} edges, 3 replicas (--heartbeat-interval {} --dead-after {}), {} kills (-9); {} edge failovers\n",
            self.edges,
            self.heartbeat_interval,
            self.dead_after,
            self.kills,
            sorted.len()
        );
        out += &format!(
            "failover  median {:.0} ms  p90 {:.0} ms  max {:.0} ms  min {:.0} ms\n",
            ms(percentile(&sorted, 0.5)),
            ms(percentile(&sorted, 0.9)),
            ms(sorted.last().copied().unwrap_or_default()),
            ms(sorted.first().copied().unwrap_or_default()),
        );
        if !self.handovers.is_empty() {
            let mut h = self.handovers.clone();
            h.sort();
            out += &format!(
                "lease handover  median {:.0} ms  max {:.0} ms (lease duration 15 s)\n",
                ms(percentile(&h, 0.5)),
                ms(h.last().copied().unwrap_or_default())
            );
        }
        out += &format!(
            "machine: {} CPUs ({}), {} MiB, kernel {}\n",
            self.machine.cpus, self.machine.cpu_model, self.machine.memory_mib, self.machine.kernel
        );
        out
    }

    fn to_json(&self) -> Value {
        let mut sorted = self.failovers.clone();
        sorted.sort();
        json!({
            "edges": self.edges,
            "replicas": 3,
            "heartbeat_interval": self.heartbeat_interval,
            "dead_after": self.dead_after,
            "kills": self.kills,
            "failover_ms": {
                "median": ms(percentile(&sorted, 0.5)),
                "p90": ms(percentile(&sorted, 0.9)),
                "max": ms(sorted.last().copied().unwrap_or_default()),
                "all": sorted.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            },
            "lease_handover_ms": self.handovers.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "machine": self.machine.to_json(),
        })
    }
}

fn main() -> ExitCode {
    let cli = match bench::parse_cli::<Cli>(|c| vec![("--edges", c.edges), ("--kills", c.kills)]) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    bench::init_tracing();
    let json = cli.json;
    bench::finish(run(cli), json)
}

fn run(cli: Cli) -> Result<Figures> {
    let cloudcore = bench::cloudcore_binary(cli.cloudcore.as_ref())?;
    let edgecore = bench::edgecore_binary(cli.edgecore.as_ref())?;
    let tmp = tempfile::tempdir()?;
    let cluster = KubeCluster::start(
        tmp.path(),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let names: Vec<String> = (0..cli.edges).map(|i| format!("ha-bench-{i}")).collect();
    let sharing = match cli.sharing {
        SharingArg::Cluster => Sharing::Cluster,
        SharingArg::Copy => Sharing::Copy,
    };
    let mut ha = Replicas::start(
        &cloudcore,
        tmp.path(),
        &cluster,
        &credentials,
        &names,
        sharing,
        integration::ha::Liveness {
            heartbeat_interval: &cli.heartbeat_interval,
            dead_after: &cli.dead_after,
        },
    )?;
    let mut edges: BTreeMap<String, Edge> = BTreeMap::new();
    for (name, dir) in &ha.edges {
        edges.insert(name.clone(), bench::start_edge(&edgecore, dir, &[])?);
    }
    let settled = |ha: &Replicas, edges: &BTreeMap<String, Edge>| {
        let owners = owners(&cluster);
        edges.iter().all(|(name, edge)| {
            edge.connected()
                && owners
                    .get(name)
                    .is_some_and(|o| ha.get(o).is_ok_and(|r| r.alive))
        })
    };
    if !integration::eventually(Duration::from_secs(60), || settled(&ha, &edges)) {
        bail!("edges not all connected and recorded\n{}", ha.logs(20));
    }
    let mut failovers = Vec::new();
    let mut handovers = Vec::new();
    for round in 0..cli.kills {
        let owners_now = owners(&cluster);
        let victim = if cli.leader {
            match lease_holder(&cluster) {
                Some(h) => h,
                None => bail!("nobody holds the lease"),
            }
        } else {
            let mut count: BTreeMap<&str, usize> = BTreeMap::new();
            for o in owners_now.values() {
                *count.entry(o).or_default() += 1;
            }
            match count.into_iter().max_by_key(|(_, n)| *n) {
                Some((id, _)) => id.to_string(),
                None => bail!("no sessions recorded"),
            }
        };
        let moved: Vec<String> = owners_now
            .iter()
            .filter(|(_, o)| **o == victim)
            .map(|(n, _)| n.clone())
            .collect();
        let killed = Instant::now();
        ha.kill(&victim)?;
        let mut back: BTreeMap<String, Duration> = BTreeMap::new();
        let mut handover = None;
        let deadline = killed + Duration::from_secs(60);
        while (back.len() < moved.len() || (cli.leader && handover.is_none()))
            && Instant::now() < deadline
        {
            let owners = owners(&cluster);
            for name in &moved {
                if !back.contains_key(name)
                    && owners.get(name).is_some_and(|o| *o != victim)
                    && edges.get(name).is_some_and(Edge::connected)
                {
                    back.insert(name.clone(), killed.elapsed());
                }
            }
            if cli.leader
                && handover.is_none()
                && lease_holder(&cluster).is_some_and(|h| h != victim)
            {
                handover = Some(killed.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if back.len() < moved.len() {
            bail!(
                "round {round}: {} of {} edges of {victim} not back within 60 s\n{}",
                moved.len() - back.len(),
                moved.len(),
                ha.logs(20)
            );
        }
        eprintln!(
            "round {round}: killed {victim} holding {} edges; back after {:?}",
            moved.len(),
            back.values().max()
        );
        failovers.extend(back.into_values());
        handovers.extend(handover);
        ha.revive(&victim)?;
    }
    for edge in edges.values_mut() {
        edge.stop();
    }
    Ok(Figures {
        edges: cli.edges,
        kills: cli.kills,
        heartbeat_interval: cli.heartbeat_interval.clone(),
        dead_after: cli.dead_after.clone(),
        failovers,
        handovers,
        machine: Machine::read(),
    })
}
