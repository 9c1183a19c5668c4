//! The `cloudcore` command: `serve`, and the operator's `token` and `node` commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use cloudcore::apiserver::services::{
    ClusterIpRange as ServiceCidr, NodePortRange as NodePorts, ServiceRanges,
};
use cloudcore::registry::{NewToken, Registry};
use cloudcore::token::{BootstrapToken, validate_node_name};
use cloudcore::{SERVER_STALE_AFTER, ServeConfig, config::join_host_port, pki::ClusterCa};
use daemon::logging::LogFormat;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad command line or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "cloudcore",
    version,
    about = "Cloud side of the edge system: tunnel server, CA, join tokens"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ControlPlaneMode {
    /// Serve a Kubernetes-compatible API from cloudcore itself (SQLite in the data dir).
    Embedded,
    /// Work against a real cluster.
    Kube,
    /// kube when running in a cluster or given a kubeconfig, embedded otherwise.
    Auto,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
struct DataDir {
    /// Directory holding the CA, the registry database and other state.
    #[arg(long, env = "CLOUDCORE_DATA_DIR", default_value = "/var/lib/cloudcore")]
    data_dir: PathBuf,
}

/// Where the shared state lives (`--state`).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum StateMode {
    /// The data dir (pki/, cloudcore.db): one cloudcore.
    Local,
    /// Secrets in the cluster (kube mode only): several cloudcore replicas share them.
    Cluster,
}

#[derive(Args, Debug, Clone)]
struct StateArgs {
    /// Where the CA, tokens, nodes and certificates live: local (the data dir) or cluster
    /// (Secrets in --state-namespace; kube mode, several replicas).
    #[arg(long, env = "CLOUDCORE_STATE", value_enum, default_value_t = StateMode::Local)]
    state: StateMode,
    /// With --state=cluster: the namespace of the shared state (default: $POD_NAMESPACE, else
    /// edge-system).
    #[arg(long)]
    state_namespace: Option<String>,
}

impl StateArgs {
    /// The cluster namespace, or `Err(flag)` naming a flag that does not apply.
    fn namespace(&self) -> Result<Option<String>, &'static str> {
        match (self.state, &self.state_namespace) {
            (StateMode::Local, Some(_)) => Err("--state-namespace"),
            (StateMode::Local, None) => Ok(None),
            (StateMode::Cluster, Some(ns)) => Ok(Some(ns.clone())),
            (StateMode::Cluster, None) => {
                Ok(Some(cloudcore::registry::cluster::default_namespace()))
            }
        }
    }
}

/// The state the token and node commands work on.
#[derive(Args, Debug, Clone)]
struct CliState {
    #[command(flatten)]
    data_dir: DataDir,
    #[command(flatten)]
    state: StateArgs,
    /// With --state=cluster: the cluster's kubeconfig (default: KUBECONFIG, else in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the tunnel server.
    Serve(Box<ServeArgs>),
    /// Create, list and revoke join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List and revoke edge nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Back up, restore and adopt the cloud's state (docs/operations.md).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Print the Kubernetes API permissions cloudcore needs in kube mode (what
    /// deploy/kubernetes/rbac.yaml grants), as JSON.
    Permissions,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    data_dir: DataDir,
    /// UDP address of the QUIC tunnel.
    #[arg(long, default_value = "0.0.0.0:10000")]
    listen: SocketAddr,
    /// Address (host or IP) edges dial; added to the serving certificate. Repeatable.
    #[arg(long = "advertise-address")]
    advertise_addresses: Vec<String>,
    /// Extra subject alternative name for the serving certificate. Repeatable.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Address of the Prometheus /metrics and /healthz endpoint.
    #[arg(long, default_value = "127.0.0.1:10350")]
    metrics_listen: SocketAddr,
    /// Lifetime of node certificates (e.g. 90d, 12h).
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    cert_lifetime: Duration,
    /// Interval edges are told to heartbeat at.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// A session with nothing heard for this long is closed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    dead_after: Duration,
    /// Largest accepted frame in bytes.
    #[arg(long, default_value_t = proto::DEFAULT_MAX_FRAME_SIZE)]
    max_frame_size: usize,
    /// Handshakes served at once; the rest wait their turn.
    #[arg(long, default_value_t = 64)]
    max_concurrent_handshakes: usize,
    /// Handshakes one source address (IPv6: one /64) may hold at once; a few more wait, the
    /// rest are refused.
    #[arg(long, default_value_t = 8)]
    max_handshakes_per_address: usize,
    /// Streams (kubectl logs, exec, attach, port-forward; stats) open at once per edge; more
    /// are refused with 429 naming the node.
    #[arg(long, default_value_t = cloudcore::streams::DEFAULT_MAX_STREAMS_PER_EDGE)]
    max_streams_per_edge: usize,
    /// Kube mode: the kubelet endpoint's ports, one per edge node (START-END).
    #[arg(long, default_value = "20250-30249", value_parser = cloudcore::kubelet::parse_port_range)]
    kubelet_ports: cloudcore::registry::KubeletPortRange,
    /// Kube mode: the IP the kubelet endpoint's listeners bind.
    #[arg(long, default_value = "0.0.0.0")]
    kubelet_listen: std::net::IpAddr,
    /// Kube mode: the IP written on edge Nodes for the apiserver to dial (default: the first
    /// --advertise-address that is an IP, else this host's IP toward the API server).
    #[arg(long)]
    kubelet_advertise_address: Option<std::net::IpAddr>,
    /// Kube mode: the Node address type carrying that IP: Hostname, or InternalIP for an
    /// apiserver with --kubelet-preferred-address-types=InternalIP,...
    #[arg(long, default_value = "Hostname")]
    kubelet_address_type: cloudcore::kubelet::AddressType,
    /// Failed joins allowed at once per source address.
    #[arg(long, default_value_t = 10)]
    join_failure_burst: u32,
    /// After the burst, one more failed join is allowed per this interval.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    join_failure_refill: Duration,
    /// Which Kubernetes API to use.
    #[arg(long, value_enum, default_value_t = ControlPlaneMode::Auto)]
    control_plane: ControlPlaneMode,
    /// HTTPS address of the embedded API.
    #[arg(long, default_value = "127.0.0.1:6443")]
    api_listen: SocketAddr,
    /// Embedded mode: the IPv4 range Services' cluster IPs come from (its first address is
    /// default/kubernetes's); refused in kube mode, where the real apiserver owns it.
    #[arg(long, value_name = "CIDR", value_parser = parse_cluster_ip_range)]
    service_cluster_ip_range: Option<ServiceCidr>,
    /// Embedded mode: the range NodePorts come from (FIRST-LAST); refused in kube mode.
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_node_port_range)]
    service_node_port_range: Option<NodePorts>,
    /// Kubeconfig of a real cluster (kube mode); KUBECONFIG works too.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// A node without its tunnel for this long becomes Ready=Unknown (embedded mode). The
    /// default is kube-controller-manager's `--node-monitor-grace-period` (50 s since v1.32).
    #[arg(long, default_value = "50s", value_parser = humantime::parse_duration)]
    node_grace_period: Duration,
    /// Receive buffer for the tunnel's UDP socket in bytes (capped by net.core.rmem_max).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    udp_receive_buffer: usize,
    /// Kube mode: this replica's name among several (the Lease holder and the session owner
    /// on Nodes); default POD_NAME, else the hostname. Refused in embedded mode.
    #[arg(long)]
    replica_id: Option<String>,
    /// Kube mode: run the once-only work (autonomy tolerations) only while holding the
    /// leader-election Lease (default true); false for a lone replica. Refused in embedded mode.
    #[arg(long, value_name = "true|false")]
    leader_elect: Option<bool>,
    /// Kube mode: the leader-election Lease's name, in POD_NAMESPACE (else edge-system).
    #[arg(long, value_name = "NAME")]
    leader_elect_lease: Option<String>,
    /// Start although the API store is not the one this cloud served (api.db lost, replaced
    /// or an older copy; a new cluster): edges keep their pods and stay fenced until
    /// `cloudcore store adopt`.
    #[arg(long)]
    allow_new_store: bool,
    /// Start with a new CA although the registry knows nodes (pki/ lost): every edge must
    /// join again.
    #[arg(long)]
    allow_new_ca: bool,
    /// Start with an empty registry although the data dir holds a CA or an API store
    /// (cloudcore.db lost): every edge must join again.
    #[arg(long)]
    allow_empty_registry: bool,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Copy the cloud's state (cloudcore.db, api.db, pki/) into a new directory; safe while
    /// `serve` runs.
    Backup {
        #[command(flatten)]
        data_dir: DataDir,
        /// New directory to write the backup into (mode 0700: it holds the CA key).
        #[arg(long)]
        to: PathBuf,
    },
    /// Put a backup in place (`serve` stopped): api.db with its resourceVersions moved past
    /// anything an edge holds, so edges converge to it; cloudcore.db and pki/ only if lost.
    Restore {
        #[command(flatten)]
        data_dir: DataDir,
        /// The backup directory `store backup` wrote.
        #[arg(long)]
        from: PathBuf,
    },
    /// Let fenced edges accept the cloud's current API store at their next connection: they
    /// replace what differs from it, deletions included.
    Adopt {
        #[command(flatten)]
        data_dir: DataDir,
        /// The node to adopt; repeatable.
        #[arg(long = "node", required_unless_present = "all", conflicts_with = "all")]
        nodes: Vec<String>,
        /// Every node the registry knows.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a join token and print the `edgecore join` command that uses it.
    Create {
        #[command(flatten)]
        at: CliState,
        /// How long the token is valid (at least 1s; 0 is refused: every token expires).
        #[arg(long, default_value = "24h", value_parser = cloudcore::token::parse_ttl)]
        ttl: Duration,
        /// How many joins it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Bind the token to this node name.
        #[arg(long)]
        node: Option<String>,
        /// `host:port` edges dial; default: what `serve` advertised last.
        #[arg(long)]
        cloud: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        at: CliState,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Revoke a token by its id (the part before the dot).
    Revoke {
        #[command(flatten)]
        at: CliState,
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List known nodes with connection state and certificate expiry.
    List {
        #[command(flatten)]
        at: CliState,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Revoke a node: close its live session and refuse its certificates from now on.
    Revoke {
        #[command(flatten)]
        at: CliState,
        name: String,
    },
}

/// `--service-cluster-ip-range`: an IPv4 CIDR.
fn parse_cluster_ip_range(text: &str) -> Result<ServiceCidr, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// `--service-node-port-range`: FIRST-LAST.
fn parse_node_port_range(text: &str) -> Result<NodePorts, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// jemalloc instead of glibc's malloc: with 10,000 edges it held 15 % less at rest, glibc
/// keeping much of the start-up lists' and the handshakes' freed peaks as RSS (docs/scale.md,
/// "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    daemon::logging::init(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(cmd) => token(cmd),
        Command::Node(cmd) => node(cmd),
        Command::Store(cmd) => store(cmd),
        Command::Permissions => serde_json::to_string_pretty(&cloudcore::permissions::all())
            .map(|json| {
                println!("{json}");
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = ServeConfig::new(args.data_dir.data_dir);
    config.listen = args.listen;
    config.advertise_addresses = args.advertise_addresses;
    config.sans = args.sans;
    config.metrics_listen = args.metrics_listen;
    config.cert_lifetime = args.cert_lifetime;
    config.heartbeat_interval = args.heartbeat_interval;
    config.dead_after = args.dead_after;
    config.max_frame_size = args.max_frame_size;
    config.max_concurrent_handshakes = args.max_concurrent_handshakes;
    config.max_handshakes_per_address = args.max_handshakes_per_address;
    config.max_streams_per_edge = args.max_streams_per_edge;
    config.kubelet = cloudcore::kubelet::KubeletSettings {
        listen: args.kubelet_listen,
        advertise: args.kubelet_advertise_address,
        ports: args.kubelet_ports,
        address_type: args.kubelet_address_type,
    };
    config.join_failure_burst = args.join_failure_burst;
    config.join_failure_refill = args.join_failure_refill;
    config.udp_receive_buffer = args.udp_receive_buffer;
    config.node_grace_period = args.node_grace_period;
    config.allow = cloudcore::state::Allow {
        new_store: args.allow_new_store,
        new_ca: args.allow_new_ca,
        empty_registry: args.allow_empty_registry,
    };
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let kube = match args.control_plane {
        ControlPlaneMode::Embedded => false,
        ControlPlaneMode::Kube => true,
        ControlPlaneMode::Auto => in_cluster || args.kubeconfig.is_some(),
    };
    config.control_plane = if kube {
        for (given, flag) in [
            (
                args.service_cluster_ip_range.is_some(),
                "--service-cluster-ip-range",
            ),
            (
                args.service_node_port_range.is_some(),
                "--service-node-port-range",
            ),
        ] {
            if given {
                eprintln!(
                    "error: {flag} applies to the embedded API only; in kube mode the cluster's kube-apiserver allocates Services from its own flags"
                );
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        }
        let replica_id = args
            .replica_id
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()))
            .or_else(cloudcore::hostname)
            .unwrap_or_else(|| "cloudcore".into());
        if let Err(e) = validate_node_name(&replica_id) {
            eprintln!("error: --replica-id {replica_id:?}: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        // The state namespace (--state-namespace, below, may replace it).
        let namespace = cloudcore::registry::cluster::default_namespace();
        let mut ha = cloudcore::ha::HaSettings::new(replica_id, namespace);
        if let cloudcore::ha::Election::Lease { name, .. } = &mut ha.election
            && let Some(lease) = &args.leader_elect_lease
        {
            if let Err(e) = validate_node_name(lease) {
                eprintln!("error: --leader-elect-lease {lease:?}: {e}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            *name = lease.clone();
        }
        if args.leader_elect == Some(false) {
            if args.leader_elect_lease.is_some() {
                eprintln!(
                    "error: --leader-elect-lease names the Lease of an election that --leader-elect=false turns off"
                );
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            ha.election = cloudcore::ha::Election::Disabled;
        }
        config.ha = Some(ha);
        cloudcore::config::ControlPlane::Kube {
            kubeconfig: args.kubeconfig,
        }
    } else {
        for (given, flag) in [
            (args.replica_id.is_some(), "--replica-id"),
            (args.leader_elect.is_some(), "--leader-elect"),
            (args.leader_elect_lease.is_some(), "--leader-elect-lease"),
        ] {
            if given {
                eprintln!(
                    "error: {flag} applies to kube mode only; embedded mode is one cloudcore process (docs/scale.md)"
                );
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        }
        let mut services = ServiceRanges::default();
        if let Some(range) = args.service_cluster_ip_range {
            services.cluster_ip = range;
        }
        if let Some(range) = args.service_node_port_range {
            services.node_ports = range;
        }
        cloudcore::config::ControlPlane::Embedded {
            listen: args.api_listen,
            services,
        }
    };
    config.shared_state = match args.state.namespace() {
        Err(flag) => {
            eprintln!("error: {flag} applies to --state=cluster only");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Ok(None) => cloudcore::config::SharedState::Local,
        Ok(Some(_)) if !kube => {
            eprintln!(
                "error: --state=cluster needs kube mode (--control-plane=kube): the embedded control plane runs as one process with its state in the data dir"
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Ok(Some(namespace)) => {
            if let Err(e) = validate_namespace(&namespace) {
                eprintln!("error: --state-namespace: {e}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            // The leader-election Lease lives with the shared state.
            if let Some(cloudcore::ha::HaSettings {
                election: cloudcore::ha::Election::Lease { namespace: ns, .. },
                ..
            }) = &mut config.ha
            {
                *ns = namespace.clone();
            }
            cloudcore::config::SharedState::Cluster { namespace }
        }
    };
    if config.dead_after <= config.heartbeat_interval {
        eprintln!(
            "error: --dead-after ({}) must be longer than --heartbeat-interval ({})",
            humantime::format_duration(config.dead_after),
            humantime::format_duration(config.heartbeat_interval)
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    for san in config.advertise_addresses.iter().chain(&config.sans) {
        if san.parse::<std::net::IpAddr>().is_err() && validate_node_name(san).is_err() {
            eprintln!(
                "error: --advertise-address/--san {san:?} is neither an IP address nor a DNS name"
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(daemon::signal::cancel_on_signal(shutdown.clone()));
        cloudcore::run(config, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The registry of an initialized data dir; never creates one (only `serve` does).
fn open_registry(dir: &Path) -> anyhow::Result<Registry> {
    cloudcore::state::require_initialized(dir)?;
    Ok(Registry::open(dir)?)
}

/// A namespace name: one DNS label.
fn validate_namespace(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

/// The registry the token and node commands work on: the data dir's, or with
/// `--state=cluster` a snapshot of the cluster's in a temporary cache, with every write going
/// to the cluster.
struct CliRegistry {
    registry: Registry,
    /// `--state=cluster`: the runtime the cluster calls run on, and the cache's directory.
    cluster: Option<(tokio::runtime::Runtime, PathBuf, kube::Client, String)>,
    data_dir: PathBuf,
}

impl std::ops::Deref for CliRegistry {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.registry
    }
}

impl Drop for CliRegistry {
    fn drop(&mut self) {
        if let Some((_, cache, _, _)) = &self.cluster {
            let _ = std::fs::remove_dir_all(cache);
        }
    }
}

impl CliRegistry {
    fn open(at: &CliState) -> anyhow::Result<Result<Self, ExitCode>> {
        let namespace = match at.state.namespace() {
            Ok(ns) => ns,
            Err(flag) => {
                eprintln!("error: {flag} applies to --state=cluster only");
                return Ok(Err(ExitCode::from(EXIT_USAGE)));
            }
        };
        let Some(namespace) = namespace else {
            return Ok(Ok(CliRegistry {
                registry: open_registry(&at.data_dir.data_dir)?,
                cluster: None,
                data_dir: at.data_dir.data_dir.clone(),
            }));
        };
        if let Err(e) = validate_namespace(&namespace) {
            eprintln!("error: --state-namespace: {e}");
            return Ok(Err(ExitCode::from(EXIT_USAGE)));
        }
        let runtime = tokio::runtime::Runtime::new()?;
        let cache = std::env::temp_dir().join(format!(
            "cloudcore-cli-{}-{}",
            std::process::id(),
            cloudcore::registry::now_ms()
        ));
        std::fs::create_dir_all(&cache)?;
        let _enter = runtime.enter();
        let client = runtime.block_on(cloudcore::cli_kube_client(at.kubeconfig.as_deref()))?;
        let opened = (|| -> anyhow::Result<Registry> {
            let registry = Registry::open(&cache)?;
            let state = std::sync::Arc::new(cloudcore::registry::cluster::ClusterState::new(
                client.clone(),
                &namespace,
            ));
            runtime.block_on(registry.attach_cluster(state))?;
            Ok(registry)
        })();
        let registry = match opened {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&cache);
                return Err(e);
            }
        };
        drop(_enter);
        Ok(Ok(CliRegistry {
            registry,
            cluster: Some((runtime, cache, client, namespace)),
            data_dir: at.data_dir.data_dir.clone(),
        }))
    }

    /// Runs a registry call inside the runtime the cluster calls need.
    fn run<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        match &self.cluster {
            Some((runtime, ..)) => {
                let _enter = runtime.enter();
                f(&self.registry)
            }
            None => f(&self.registry),
        }
    }

    /// The cluster CA: the data dir's, or the `cloudcore-ca` Secret's.
    fn ca(&self) -> anyhow::Result<ClusterCa> {
        match &self.cluster {
            Some((runtime, _, client, namespace)) => {
                Ok(runtime.block_on(ClusterCa::load_from_cluster(client.clone(), namespace))?)
            }
            None => Ok(ClusterCa::load_existing(&self.data_dir)?),
        }
    }
}

/// Opens the registry for a CLI command, or returns the exit code of a bad flag.
macro_rules! open_or_exit {
    ($at:expr) => {
        match CliRegistry::open(&$at)? {
            Ok(registry) => registry,
            Err(code) => return Ok(code),
        }
    };
}

fn store(cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Backup { data_dir, to } => {
            let report = cloudcore::state::backup(&data_dir.data_dir, &to)?;
            for file in report.files {
                eprintln!("wrote {}", file.display());
            }
            eprintln!(
                "backup of {} complete in {}; keep it private (it holds the CA key)",
                data_dir.data_dir.display(),
                to.display()
            );
        }
        StoreCommand::Restore { data_dir, from } => {
            let report = cloudcore::state::restore(&from, &data_dir.data_dir)?;
            for line in report.lines {
                eprintln!("{line}");
            }
            eprintln!(
                "restore complete; start `cloudcore serve` and the edges converge to the restored state"
            );
        }
        StoreCommand::Adopt {
            data_dir,
            nodes,
            all,
        } => {
            let registry = open_registry(&data_dir.data_dir)?;
            let chosen = if all { None } else { Some(nodes.as_slice()) };
            match registry.adopt(chosen)? {
                Ok(adopted) if adopted.is_empty() => {
                    eprintln!("no nodes to adopt");
                }
                Ok(adopted) => {
                    for node in adopted {
                        eprintln!(
                            "node {node} accepts the cloud's current API store at its next connection (fenced edges retry every 10s)"
                        );
                    }
                }
                Err(unknown) => {
                    eprintln!(
                        "error: no node named {unknown:?} (see `cloudcore node list`); nothing adopted"
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn relative(ms: i64) -> String {
    let now = cloudcore::registry::now_ms();
    let d = Duration::from_secs(((now - ms).unsigned_abs()) / 1000);
    let text = humantime::format_duration(d).to_string();
    let text = text.split(' ').take(2).collect::<Vec<_>>().join(" ");
    if ms <= now {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create {
            at,
            ttl,
            uses,
            node,
            cloud,
            output,
        } => {
            if uses == 0 {
                eprintln!("error: --uses must be at least 1");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            if let Some(name) = &node
                && let Err(e) = validate_node_name(name)
            {
                eprintln!("error: --node: {e}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            let registry = open_or_exit!(at);
            let ca = registry.ca()?;
            let cloud = match cloud {
                Some(c) => c,
                None => registry.run(|r| r.cloud_address())?.unwrap_or_else(|| {
                    join_host_port(
                        &cloudcore::hostname().unwrap_or_else(|| "localhost".into()),
                        10000,
                    )
                }),
            };
            let token = BootstrapToken::generate();
            let record = registry.run(|r| {
                r.create_token(&NewToken {
                    token: token.clone(),
                    ttl,
                    uses,
                    node: node.clone(),
                })
            })?;
            let mut command = format!(
                "edgecore join --cloud {cloud} --token {} --ca-hash {}",
                token.reveal(),
                ca.hash()
            );
            if let Some(name) = &node {
                command.push_str(&format!(" --node-name {name}"));
            }
            if output == Output::Json {
                let value = serde_json::json!({
                    "token": token.reveal(),
                    "id": record.id,
                    "ca_hash": ca.hash(),
                    "cloud": cloud,
                    "expires": rfc3339(record.expires_ms),
                    "uses": uses,
                    "node": node,
                    "join_command": command,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                eprintln!(
                    "token {} created: valid until {} ({}), {} use(s){}. Run on the edge gateway:",
                    record.id,
                    rfc3339(record.expires_ms),
                    relative(record.expires_ms),
                    uses,
                    node.as_deref()
                        .map(|n| format!(", bound to node {n}"))
                        .unwrap_or_default()
                );
                println!("{command}");
            }
        }
        TokenCommand::List { at, output } => {
            let tokens = open_or_exit!(at).list_tokens()?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                println!(
                    "{:<8} {:<22} {:<10} {:<9} NODE",
                    "ID", "EXPIRES", "USES-LEFT", "STATE"
                );
                let now = cloudcore::registry::now_ms();
                for t in tokens {
                    let state = if t.revoked {
                        "revoked"
                    } else if t.expires_ms <= now {
                        "expired"
                    } else if t.uses_left <= 0 {
                        "used-up"
                    } else {
                        "valid"
                    };
                    println!(
                        "{:<8} {:<22} {:<10} {:<9} {}",
                        t.id,
                        rfc3339(t.expires_ms),
                        t.uses_left,
                        state,
                        t.node.as_deref().unwrap_or("<any>")
                    );
                }
            }
        }
        TokenCommand::Revoke { at, id } => {
            if !open_or_exit!(at).run(|r| r.revoke_token(&id))? {
                eprintln!("error: no token with id {id:?} (see `cloudcore token list`)");
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("token {id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn node(cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NodeCommand::List { at, output } => {
            let nodes = open_or_exit!(at).list_nodes(SERVER_STALE_AFTER)?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!(
                    "{:<24} {:<13} {:<16} {:<22} ADDRESS",
                    "NAME", "STATUS", "LAST-SEEN", "CERT-EXPIRES"
                );
                for n in nodes {
                    let status = if n.revoked {
                        "Revoked"
                    } else if n.connected {
                        "Connected"
                    } else {
                        "Disconnected"
                    };
                    println!(
                        "{:<24} {:<13} {:<16} {:<22} {}",
                        n.name,
                        status,
                        n.last_seen_ms
                            .map(relative)
                            .unwrap_or_else(|| "never".into()),
                        n.cert_not_after_ms
                            .map(rfc3339)
                            .unwrap_or_else(|| "-".into()),
                        n.address.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        NodeCommand::Revoke { at, name } => {
            if !open_or_exit!(at).run(|r| r.revoke_node(&name))? {
                eprintln!("error: no node named {name:?} (see `cloudcore node list`)");
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("node {name} revoked; its live session closes within a second");
        }
    }
    Ok(ExitCode::SUCCESS)
}
