//! Several `cloudcore serve --control-plane=kube` replicas against one [`KubeCluster`] behind
//! one UDP address, for `tests/ha.rs`, `ha-bench` and `edge-sim --replicas`: a load balancer
//! made of one nftables table (a `redirect` to `numgen random` over the live replicas' tunnel
//! ports, matching only loopback traffic to one test port), from which a killed replica is
//! removed as kube-proxy removes a dead endpoint. It picks a replica per flow (client UDP
//! socket), and a flow keeps its replica, dead or not (conntrack): edgecore dials every session
//! from a new socket, so a reconnect is a new flow.
//!
//! The replicas share the CA and registry in the cluster (`--state=cluster`, [`Sharing::Cluster`])
//! or by copy ([`Sharing::Copy`]: replica 1 starts alone, the edges join through it, then its
//! `pki/` and `cloudcore.db` are copied into the others' data dirs). [`Replicas::start`] starts
//! three and joins the edges; [`Replicas::start_cluster`] starts any number sharing the
//! cluster's state and joins none.
//!
//! Needs root and nftables; without them [`LoadBalancer::new`] fails saying so.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::bench::JoinToken;
use crate::cluster::KubeCluster;
use crate::{Cloud, eventually, join_with};

/// Annotation on a Node naming the replica that holds its session.
pub const REPLICA_ANNOTATION: &str = "edge.io/cloudcore-replica";
/// The leader-election Lease and its namespace.
pub const LEASE: &str = "cloudcore";
pub const LEASE_NAMESPACE: &str = "edge-system";

/// The UDP load balancer in front of the replicas. Deleted when dropped.
pub struct LoadBalancer {
    table: String,
    port: u16,
}

fn nft(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .context("nft is not installed (apt-get install nftables)")?;
    ensure!(
        out.status.success(),
        "nft {} (the load balancer needs root and nftables): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl LoadBalancer {
    /// A table of its own (`ha_lb_PID`) on a free UDP port of 127.0.0.1, routing nowhere yet.
    pub fn new() -> anyhow::Result<LoadBalancer> {
        let lb = LoadBalancer {
            table: format!("ha_lb_{}", std::process::id()),
            port: crate::free_udp_port(),
        };
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &lb.table])
            .output();
        nft(&["add", "table", "ip", &lb.table])?;
        nft(&[
            "add",
            "chain",
            "ip",
            &lb.table,
            "out",
            "{ type nat hook output priority -100 ; }",
        ])?;
        Ok(lb)
    }

    /// The one address edges dial.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// New flows go to one of `backends` (UDP ports on 127.0.0.1) at random; flows already
    /// seen keep their backend (conntrack), as with kube-proxy.
    pub fn route(&self, backends: &[u16]) -> anyhow::Result<()> {
        nft(&["flush", "chain", "ip", &self.table, "out"])?;
        if backends.is_empty() {
            return Ok(());
        }
        let map = backends
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{i} : {p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rule = format!(
            "ip daddr 127.0.0.1 udp dport {} redirect to : numgen random mod {} map {{ {map} }}",
            self.port,
            backends.len()
        );
        let mut args = vec!["add", "rule", "ip", &self.table, "out"];
        args.extend(rule.split(' '));
        nft(&args)
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.table])
            .output();
    }
}

/// One replica: its id, its kubelet endpoint's IP (127.0.0.N) and its process.
pub struct Replica {
    pub id: String,
    pub ip: Ipv4Addr,
    pub cloud: Cloud,
    pub alive: bool,
}

impl Replica {
    /// One series from its metrics; -1 when it does not answer.
    pub fn metric(&self, series: &str) -> f64 {
        crate::http_get(self.cloud.metrics_port, "/metrics")
            .and_then(|page| crate::metric_value(&page, series))
            .unwrap_or(-1.0)
    }

    /// SIGKILL: no release of anything.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let pid = self.cloud.pid().context("the replica is not running")?;
        let out = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .output()?;
        ensure!(out.status.success(), "kill -9 {pid} failed");
        self.alive = false;
        Ok(())
    }
}

/// The replicas, the load balancer, and the joined (not yet running) edges' data dirs.
pub struct Replicas {
    pub replicas: Vec<Replica>,
    pub lb: LoadBalancer,
    /// `(node name, data dir)` of every edge [`Replicas::join`] joined.
    pub edges: Vec<(String, PathBuf)>,
    /// The `cloudcore` binary, whose CLI makes the tokens.
    binary: PathBuf,
    /// The replicas' credentials, with which the CLI reaches the shared state.
    credentials: PathBuf,
}

/// How soon edges notice a dead replica: the replicas' `--heartbeat-interval` and
/// `--dead-after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness<'a> {
    pub heartbeat_interval: &'a str,
    pub dead_after: &'a str,
}

impl Liveness<'static> {
    /// Heartbeats every second, dead after 4 s: quick failovers for tests.
    pub const QUICK: Liveness<'static> = Liveness {
        heartbeat_interval: "1s",
        dead_after: "4s",
    };
    /// What `deploy/kubernetes/cloudcore.yaml` sets.
    pub const SHIPPED: Liveness<'static> = Liveness {
        heartbeat_interval: "2s",
        dead_after: "8s",
    };
}

/// What a set of replicas runs: everything [`Replicas::start_cluster`] needs but the control
/// plane.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaSpec<'a> {
    /// The `cloudcore` binary; its CLI makes the tokens too.
    pub binary: &'a Path,
    /// Replica N's data dir is `dir/replica-N`.
    pub dir: &'a Path,
    /// cloudcore's credentials for the cluster.
    pub credentials: &'a Path,
    /// How many: `replica-1` to `replica-N` on 127.0.0.1 to 127.0.0.N.
    pub replicas: u8,
    /// How many nodes will join: every replica binds a kubelet port for each.
    pub nodes: usize,
    pub liveness: Liveness<'a>,
    /// More `serve` flags for every replica.
    pub extra: &'a [&'a str],
}

/// The flags of replica `id`: its kubelet endpoint on `ip`, and how soon its edges notice
/// its death.
fn replica_flags(id: &str, ip: Ipv4Addr, ports: &str, liveness: Liveness) -> Vec<String> {
    [
        "--kubelet-ports",
        ports,
        "--kubelet-listen",
        &ip.to_string(),
        "--kubelet-advertise-address",
        &ip.to_string(),
        "--replica-id",
        id,
        "--heartbeat-interval",
        liveness.heartbeat_interval,
        "--dead-after",
        liveness.dead_after,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// cloudcore's own default first kubelet port (`cloudcore::kubelet::DEFAULT_PORTS`).
const DEFAULT_FIRST_KUBELET_PORT: u32 = 20250;

/// The replicas' `--kubelet-ports` for `nodes` nodes: `nodes + 3` ports, the same range for
/// every replica (each binds on its own IP). Up to 1,000 nodes the range starts at a free port,
/// so tests running at once get different ones; beyond, at cloudcore's default start (20250),
/// so that thousands of listeners neither run past port 65535 nor take the ephemeral ports
/// (32768-60999) that outgoing connections on this host draw from.
fn kubelet_ports(nodes: usize) -> anyhow::Result<String> {
    let first = if nodes <= 1000 {
        u32::from(crate::free_tcp_port().min(60000))
    } else {
        DEFAULT_FIRST_KUBELET_PORT
    };
    let last = first + nodes as u32 + 2;
    ensure!(
        last <= u32::from(u16::MAX),
        "{nodes} nodes need more kubelet ports than {first}-65535 holds"
    );
    Ok(format!("{first}-{last}"))
}

/// Starts replica `i` (`replica-I` on 127.0.0.I) of `spec` against `cluster`.
fn start_replica(
    cluster: &KubeCluster,
    spec: &ReplicaSpec,
    ports: &str,
    sharing: Sharing,
    i: u8,
) -> anyhow::Result<Replica> {
    let id = format!("replica-{i}");
    let ip = Ipv4Addr::new(127, 0, 0, i);
    let mut flags = replica_flags(&id, ip, ports, spec.liveness);
    if sharing == Sharing::Cluster {
        flags.extend(["--state=cluster", "--state-namespace", LEASE_NAMESPACE].map(String::from));
    }
    flags.extend(spec.extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cloud = Cloud::start_kube_binary(
        spec.binary,
        &spec.dir.join(&id),
        cluster,
        spec.credentials,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &flags,
    )?;
    Ok(Replica {
        id,
        ip,
        cloud,
        alive: true,
    })
}

/// Copies a data dir's shared parts (CA and registry) into `to`.
fn copy_state(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to.join("pki"))?;
    for entry in std::fs::read_dir(from.join("pki"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join("pki").join(entry.file_name()))?;
    }
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("cloudcore.db")
        {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// How the replicas come to share the CA and the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// `--state=cluster`: Secrets in `edge-system`; tokens made through the CLI against the
    /// cluster, joins through the load balancer (any replica).
    Cluster,
    /// Local state copied from replica 1 to the others after the joins.
    Copy,
}

impl Replicas {
    /// Three replicas of `binary` in `dir/replica-N` behind the load balancer, with `nodes`
    /// joined through its address into `dir/NODE` (not started), sharing their state as
    /// `sharing` says; their edges notice a dead one as `liveness` says.
    pub fn start(
        binary: &Path,
        dir: &Path,
        cluster: &KubeCluster,
        credentials: &Path,
        nodes: &[String],
        sharing: Sharing,
        liveness: Liveness,
    ) -> anyhow::Result<Replicas> {
        let spec = ReplicaSpec {
            binary,
            dir,
            credentials,
            replicas: 3,
            nodes: nodes.len(),
            liveness,
            extra: &[],
        };
        if sharing == Sharing::Cluster {
            let mut all = Replicas::start_cluster(cluster, &spec)?;
            all.join(dir, nodes)?;
            return Ok(all);
        }
        let lb = LoadBalancer::new()?;
        let ports = kubelet_ports(nodes.len())?;
        let mut first_replica = start_replica(cluster, &spec, &ports, sharing, 1)?;
        lb.route(&[first_replica.cloud.port])?;
        let mut edges = Vec::new();
        for name in nodes {
            let token = first_replica.cloud.token(&[]);
            let edge_dir = dir.join(name);
            let out = join_with(&edge_dir, &lb.address(), &token.token, &token.ca_hash, name);
            ensure!(
                out.status.success(),
                "join {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            edges.push((name.clone(), edge_dir));
        }
        let bound = eventually(Duration::from_secs(30), || {
            first_replica
                .cloud
                .log()
                .matches("kubelet listener bound")
                .count()
                >= nodes.len()
        });
        if !bound {
            bail!(
                "kubelet ports not assigned:\n{}",
                crate::gateway::tail(&first_replica.cloud.log(), 30)
            );
        }
        first_replica.cloud.stop();
        for i in 2..=3 {
            copy_state(
                &first_replica.cloud.dir,
                &dir.join(format!("replica-{i}")).join("cloud"),
            )?;
        }
        let flags = first_replica.cloud.extra_flags().to_vec();
        first_replica
            .cloud
            .try_restart_with(&flags.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut replicas = vec![first_replica];
        replicas.push(start_replica(cluster, &spec, &ports, sharing, 2)?);
        replicas.push(start_replica(cluster, &spec, &ports, sharing, 3)?);
        let all = Replicas {
            replicas,
            lb,
            edges,
            binary: binary.to_path_buf(),
            credentials: credentials.to_path_buf(),
        };
        all.route_live()?;
        Ok(all)
    }

    /// `spec.replicas` replicas sharing the CA and registry in the cluster (`--state=cluster`),
    /// one after the other, behind the load balancer; no edge joined.
    pub fn start_cluster(cluster: &KubeCluster, spec: &ReplicaSpec) -> anyhow::Result<Replicas> {
        ensure!(
            (1..=254).contains(&spec.replicas),
            "{} replicas: 1 to 254 fit on 127.0.0.N",
            spec.replicas
        );
        let lb = LoadBalancer::new()?;
        let ports = kubelet_ports(spec.nodes)?;
        let replicas = (1..=spec.replicas)
            .map(|i| start_replica(cluster, spec, &ports, Sharing::Cluster, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let all = Replicas {
            replicas,
            lb,
            edges: Vec::new(),
            binary: spec.binary.to_path_buf(),
            credentials: spec.credentials.to_path_buf(),
        };
        all.route_live()?;
        Ok(all)
    }

    /// `cloudcore token create --state=cluster --uses USES` through the replicas' binary: a
    /// token for edges that dial the load balancer.
    pub fn token(&self, uses: usize) -> anyhow::Result<JoinToken> {
        let first = self.replicas.first().context("no replica")?;
        let out = Command::new(&self.binary)
            .args(["token", "create", "-o", "json", "--uses", &uses.to_string()])
            .args(["--cloud", &self.lb.address()])
            .args(["--state", "cluster", "--state-namespace", LEASE_NAMESPACE])
            .arg("--kubeconfig")
            .arg(&self.credentials)
            .arg("--data-dir")
            .arg(&first.cloud.dir)
            .output()
            .context("cannot run `cloudcore token create`")?;
        ensure!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        JoinToken::from_cli_json(&out.stdout)
    }

    /// Joins `nodes` (`edgecore join`, one single-use token each) through the load balancer
    /// into `dir/NODE`, not started; they are added to [`Replicas::edges`].
    pub fn join(&mut self, dir: &Path, nodes: &[String]) -> anyhow::Result<()> {
        for name in nodes {
            let token = self.token(1)?;
            let edge_dir = dir.join(name);
            let out = join_with(
                &edge_dir,
                &self.lb.address(),
                &token.token,
                &token.ca_hash,
                name,
            );
            ensure!(
                out.status.success(),
                "join {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            self.edges.push((name.clone(), edge_dir));
        }
        Ok(())
    }

    /// The load balancer routes to every live replica.
    pub fn route_live(&self) -> anyhow::Result<()> {
        let live: Vec<u16> = self
            .replicas
            .iter()
            .filter(|r| r.alive)
            .map(|r| r.cloud.port)
            .collect();
        self.lb.route(&live)
    }

    /// Kills replica `id` with -9 and takes it out of the load balancer, as kube-proxy would.
    pub fn kill(&mut self, id: &str) -> anyhow::Result<()> {
        self.get_mut(id)?.kill()?;
        self.route_live()
    }

    /// Stops replica `id` gracefully (SIGTERM) and takes it out of the load balancer.
    pub fn stop(&mut self, id: &str) -> anyhow::Result<()> {
        let r = self.get_mut(id)?;
        r.cloud.stop();
        r.alive = false;
        self.route_live()
    }

    /// Starts a killed replica again (same ports and data dir) and routes to it.
    pub fn revive(&mut self, id: &str) -> anyhow::Result<()> {
        let r = self.get_mut(id)?;
        let flags = r.cloud.extra_flags().to_vec();
        r.cloud
            .try_restart_with(&flags.iter().map(String::as_str).collect::<Vec<_>>())?;
        r.alive = true;
        self.route_live()
    }

    pub fn get(&self, id: &str) -> anyhow::Result<&Replica> {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .with_context(|| format!("no replica {id}"))
    }

    fn get_mut(&mut self, id: &str) -> anyhow::Result<&mut Replica> {
        self.replicas
            .iter_mut()
            .find(|r| r.id == id)
            .with_context(|| format!("no replica {id}"))
    }

    /// The end of every replica's log.
    pub fn logs(&self, lines: usize) -> String {
        self.replicas
            .iter()
            .map(|r| {
                format!(
                    "--- {} log (end):\n{}\n",
                    r.id,
                    crate::gateway::tail(&r.cloud.log(), lines)
                )
            })
            .collect()
    }
}

/// Each edge Node's session owner (the replica its annotation names), from one list.
pub fn owners(cluster: &KubeCluster) -> std::collections::BTreeMap<String, String> {
    let out = cluster.kubectl(&["get", "nodes", "-o", "json"], None);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|n| {
                    Some((
                        n["metadata"]["name"].as_str()?.to_string(),
                        n["metadata"]["annotations"][REPLICA_ANNOTATION]
                            .as_str()?
                            .to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The holder of the leader-election Lease, if any.
pub fn lease_holder(cluster: &KubeCluster) -> Option<String> {
    let out = cluster.kubectl(
        &["get", "lease", LEASE, "-n", LEASE_NAMESPACE, "-o", "json"],
        None,
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}
