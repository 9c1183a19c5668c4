//! The `edgecore` command: `join` once, then `run` (usually under systemd); `ctl` inspects the
//! local store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use daemon::logging::LogFormat;
use edgecore::ctl::{CtlError, Resource};
use edgecore::hub::HubConfig;
use edgecore::join::{JoinError, JoinParams, parse_labels};
use edgecore::node::NodeConfig;
use edgecore::store::StoreError;
use edgecore::{RunConfig, RunError};
use tokio_util::sync::CancellationToken;

/// Exit code for a bad command line or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code when the cloud refused the join (bad token, name taken, ...).
const EXIT_REFUSED: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "edgecore",
    version,
    about = "Edge daemon: joins a cloudcore and keeps the tunnel up"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Obtain a node certificate with a join token (once per gateway).
    Join {
        /// cloudcore's tunnel address, HOST:PORT.
        #[arg(long)]
        cloud: String,
        /// The join token, `abcdef.0123456789abcdef`.
        #[arg(long, env = "EDGECORE_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// SHA-256 of the cluster CA certificate, `sha256:HEX` (printed by `cloudcore token create`).
        #[arg(long)]
        ca_hash: String,
        /// Node name; default: this machine's hostname.
        #[arg(long)]
        node_name: Option<String>,
        /// Labels for the node, `k=v,k2=v2`.
        #[arg(long, default_value = "")]
        labels: String,
        #[arg(long, env = "EDGECORE_DATA_DIR", default_value = "/var/lib/edgecore")]
        data_dir: PathBuf,
        /// How long to wait for the cloud.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Replace this gateway's identity (after its certificate expired during an outage, or
        /// was revoked) with a new one for the same node; the local store and the running pods
        /// are kept, and a running edgecore picks the new certificate up at its next dial.
        #[arg(long)]
        rejoin: bool,
    },
    /// Run the daemon.
    Run {
        #[arg(long, env = "EDGECORE_DATA_DIR", default_value = "/var/lib/edgecore")]
        data_dir: PathBuf,
        /// Override the cloud address recorded at join.
        #[arg(long)]
        cloud: Option<String>,
        /// Address of the Prometheus /metrics and /healthz endpoint.
        #[arg(long, default_value = "127.0.0.1:10351")]
        metrics_listen: SocketAddr,
        /// Largest accepted frame in bytes.
        #[arg(long, default_value_t = proto::DEFAULT_MAX_FRAME_SIZE)]
        max_frame_size: usize,
        /// The container runtime's CRI socket.
        #[arg(long, env = "EDGECORE_CRI_ENDPOINT", default_value = edgecore::cri::DEFAULT_ENDPOINT)]
        cri_endpoint: String,
        /// Hold the desired state without running pods (for benchmarks of the sync layer).
        #[arg(long)]
        no_pod_runtime: bool,
        /// Pods this node admits: `pods` in the Node's capacity and allocatable.
        #[arg(long, default_value_t = edgecore::node::DEFAULT_MAX_PODS, value_parser = clap::value_parser!(u32).range(1..))]
        max_pods: u32,
        /// Resources kept back from pods, kubelet syntax: `cpu=100m,memory=100Mi,ephemeral-storage=1Gi`.
        #[arg(long, default_value = "")]
        system_reserved: edgecore::node::Reserved,
        /// Longest use of a service-account token before a new one is asked for; 80 % of the
        /// token's lifetime applies when shorter. Lower it only to test refreshes.
        #[arg(long, env = "EDGECORE_TOKEN_REFRESH_MAX", default_value = "24h", value_parser = humantime::parse_duration)]
        token_refresh_max: Duration,
        /// Pod events kept in memory for the cloud at most (while offline the oldest are
        /// dropped first).
        #[arg(long, default_value_t = edgecore::events::DEFAULT_CAPACITY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
        max_buffered_events: usize,
        /// Where mappers reach edgecore's DMI (`DeviceManagerService`), a Unix socket path, or
        /// `none` for no DMI.
        #[arg(long, env = "EDGECORE_DMI_SOCKET", default_value = edgecore::devices::dmi::DEFAULT_SOCKET)]
        dmi_socket: String,
        /// The local MQTT broker for KubeEdge's device topics, `tcp://HOST:PORT`, or `none`.
        #[arg(long, env = "EDGECORE_MQTT_BROKER", default_value = edgecore::devices::mqtt::DEFAULT_BROKER)]
        mqtt_broker: String,
        /// Calls per second edgecore makes to one mapper (burst: twice it).
        #[arg(long, default_value_t = 20.0)]
        mapper_qps: f64,
        #[command(flatten)]
        services: ServicesArgs,
    },
    /// Remove what edgecore put into the gateway's network (its nftables table, the cluster
    /// DNS address on lo), for an uninstall; pods and the data dir are left alone.
    Cleanup {
        #[command(flatten)]
        services: ServicesArgs,
    },
    /// Images for gateways without a registry.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Local operations on this gateway; need no cloud (`restart` needs the running daemon).
    Ctl {
        #[command(subcommand)]
        command: CtlCommand,
    },
}

/// Services at the edge (docs/services.md).
#[derive(clap::Args, Debug)]
struct ServicesArgs {
    /// The Services data path: `nftables` (a table of edgecore's own), or `none`.
    #[arg(long, env = "EDGECORE_SERVICE_PROXY", default_value = "nftables")]
    service_proxy: String,
    /// The nftables table (family ip) edgecore creates and alone writes.
    #[arg(long, default_value = edgecore::services::DEFAULT_NFT_TABLE)]
    nft_table: String,
    /// Where the cluster DNS server answers (an address edgecore puts on lo), or `none`:
    /// then ClusterFirst pods get the gateway's resolv.conf.
    #[arg(long, env = "EDGECORE_CLUSTER_DNS", default_value = "169.254.96.16")]
    cluster_dns: String,
    /// The cluster domain.
    #[arg(long, default_value = edgecore::services::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// The resolv.conf whose nameservers answer names outside the cluster domain.
    #[arg(long, default_value = edgecore::services::DEFAULT_DNS_UPSTREAM)]
    dns_upstream: PathBuf,
}

impl ServicesArgs {
    /// The settings, checked: `none` turns the data path or the DNS off.
    fn config(&self) -> Result<edgecore::services::ServicesConfig, String> {
        let proxy = match self.service_proxy.as_str() {
            "nftables" => true,
            "none" => false,
            other => {
                return Err(format!(
                    "--service-proxy must be nftables or none, not {other:?}"
                ));
            }
        };
        let cluster_dns = match self.cluster_dns.as_str() {
            "none" => None,
            address => Some(address.parse().map_err(|_| {
                format!("--cluster-dns must be an IP address or none, not {address:?}")
            })?),
        };
        if !valid_table_name(&self.nft_table) {
            return Err(format!(
                "--nft-table must be 1 to 64 letters, digits, '-' or '_', not {:?}",
                self.nft_table
            ));
        }
        let domain = self.cluster_domain.trim_end_matches('.');
        if domain.is_empty()
            || domain.len() > 253
            || !domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
        {
            return Err(format!(
                "--cluster-domain must be a lower-case DNS name, not {:?}",
                self.cluster_domain
            ));
        }
        Ok(edgecore::services::ServicesConfig {
            proxy,
            nft_table: self.nft_table.clone(),
            cluster_dns,
            cluster_domain: domain.to_string(),
            dns_upstream: self.dns_upstream.clone(),
        })
    }
}

/// An nftables table name edgecore accepts: nothing the nft parser could read as syntax.
fn valid_table_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphabetic()
}

#[derive(Subcommand, Debug)]
enum ImagesCommand {
    /// Load OCI image-layout or docker-archive tarballs into the runtime (namespace k8s.io).
    Import {
        /// Tarballs to load.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The container runtime's CRI socket.
        #[arg(long, env = "EDGECORE_CRI_ENDPOINT", default_value = edgecore::cri::DEFAULT_ENDPOINT)]
        cri_endpoint: String,
    },
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// List the objects in the local store (Secrets by key names only).
    Get {
        /// What to list.
        #[arg(value_enum, default_value_t = Resource::All)]
        what: Resource,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = edgecore::ctl::Output::Table)]
        output: edgecore::ctl::Output,
        #[arg(long, env = "EDGECORE_DATA_DIR", default_value = "/var/lib/edgecore")]
        data_dir: PathBuf,
    },
    /// Show a device's twin from the local store: desired, reported and observed desired
    /// values per property, the device's state (works with the daemon stopped).
    Twin {
        /// The Device.
        device: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = edgecore::ctl::Output::Table)]
        output: edgecore::ctl::Output,
        #[arg(long, env = "EDGECORE_DATA_DIR", default_value = "/var/lib/edgecore")]
        data_dir: PathBuf,
    },
    /// Print a container's log from this gateway's files.
    Logs {
        /// The pod.
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// The container (needed when the pod has several).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Keep printing what the container writes.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        #[arg(long, env = "EDGECORE_DATA_DIR", default_value = "/var/lib/edgecore")]
        data_dir: PathBuf,
    },
    /// Restart a pod's running containers now, through the running edgecore (works offline).
    Restart {
        /// The pod.
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long, env = "EDGECORE_DATA_DIR", default_value = "/var/lib/edgecore")]
        data_dir: PathBuf,
    },
    /// Run a command in a running container: `edgecore ctl exec POD [-c NAME] [-i] [-t] -- CMD...`.
    Exec {
        /// The pod.
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// The container (needed when the pod has several).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Pass stdin to the container (an interactive session through the runtime's
        /// streaming server, as `kubectl exec -i`).
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Stdin is a TTY: the local terminal goes raw and its size follows (`kubectl exec -t`).
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(long, env = "EDGECORE_DATA_DIR", default_value = "/var/lib/edgecore")]
        data_dir: PathBuf,
        /// The container runtime's CRI socket; default: the one the daemon of the data dir
        /// runs with (recorded in DIR/runtime.json).
        #[arg(long, env = "EDGECORE_CRI_ENDPOINT")]
        cri_endpoint: Option<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

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
    match cli.command {
        Command::Ctl { command } => ctl(command),
        Command::Cleanup { services } => {
            let config = match services.config() {
                Ok(config) => config,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(edgecore::services::cleanup(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", daemon::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Images {
            command:
                ImagesCommand::Import {
                    files,
                    cri_endpoint,
                },
        } => match edgecore::images::import(&cri_endpoint, &files) {
            Ok(lines) => {
                for line in lines {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", daemon::error_chain(&e));
                ExitCode::FAILURE
            }
        },
        Command::Join {
            cloud,
            token,
            ca_hash,
            node_name,
            labels,
            data_dir,
            timeout,
            rejoin,
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let labels = match parse_labels(&labels) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: --labels: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            // A rejoin keeps the node's name.
            let joined_name = || {
                rejoin
                    .then(|| edgecore::identity::load(&data_dir).ok())
                    .flatten()
                    .map(|i| i.config.node_name)
            };
            let node_name = match node_name.or_else(joined_name).or_else(default_node_name) {
                Some(n) => n,
                None => {
                    eprintln!("error: no --node-name given and the hostname is not usable as one");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let params = JoinParams {
                cloud,
                token,
                ca_hash,
                node_name,
                labels,
                data_dir: data_dir.clone(),
                timeout,
                max_frame_size: proto::DEFAULT_MAX_FRAME_SIZE,
                rejoin,
            };
            match runtime.block_on(edgecore::join::join(params)) {
                Ok(joined) if rejoin => {
                    eprintln!(
                        "rejoined as node {}; certificate valid until {}. A running edgecore uses it at its next connection attempt; the local store and pods were kept",
                        joined.node_name, joined.not_after,
                    );
                    ExitCode::SUCCESS
                }
                Ok(joined) => {
                    eprintln!(
                        "joined as node {}; certificate valid until {}. Start the daemon with: edgecore run --data-dir {}",
                        joined.node_name,
                        joined.not_after,
                        data_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}", daemon::error_chain(&e));
                    match e {
                        JoinError::Refused(_) => ExitCode::from(EXIT_REFUSED),
                        JoinError::Tls(_) | JoinError::InvalidNodeName { .. } => {
                            ExitCode::from(EXIT_USAGE)
                        }
                        _ => ExitCode::FAILURE,
                    }
                }
            }
        }
        Command::Run {
            data_dir,
            cloud,
            metrics_listen,
            max_frame_size,
            cri_endpoint,
            no_pod_runtime,
            max_pods,
            system_reserved,
            token_refresh_max,
            max_buffered_events,
            dmi_socket,
            mqtt_broker,
            mapper_qps,
            services,
        } => {
            if token_refresh_max < Duration::from_secs(1) {
                eprintln!("error: --token-refresh-max must be at least 1s");
                return ExitCode::from(EXIT_USAGE);
            }
            let devices = match devices_config(&dmi_socket, &mqtt_broker, mapper_qps) {
                Ok(devices) => devices,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let services = match services.config() {
                Ok(services) => services,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let mut hub = HubConfig::new(data_dir);
            hub.cloud = cloud;
            hub.max_frame_size = max_frame_size;
            hub.token_refresh_max = token_refresh_max;
            hub.max_buffered_events = max_buffered_events;
            let config = RunConfig {
                hub,
                metrics_listen,
                cri_endpoint: (!no_pod_runtime).then_some(cri_endpoint),
                node: NodeConfig {
                    max_pods,
                    reserved: system_reserved,
                },
                devices,
                services,
            };
            let result = runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(daemon::signal::cancel_on_signal(shutdown.clone()));
                edgecore::run(config, shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ RunError::Identity(_)) => {
                    eprintln!("error: {}", daemon::error_chain(&e));
                    ExitCode::from(EXIT_USAGE)
                }
                Err(e) => {
                    eprintln!("error: {}", daemon::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The devices flags of `run`, checked: `none` turns DMI or MQTT off.
fn devices_config(
    dmi_socket: &str,
    mqtt_broker: &str,
    mapper_qps: f64,
) -> Result<edgecore::devices::DevicesConfig, String> {
    if !(mapper_qps.is_finite() && mapper_qps > 0.0) {
        return Err(format!(
            "--mapper-qps must be a number above 0, not {mapper_qps}"
        ));
    }
    let dmi_socket = match dmi_socket {
        "none" => None,
        "" => return Err("--dmi-socket is empty (give a path, or none)".to_string()),
        path => Some(PathBuf::from(path)),
    };
    let mqtt_broker = match mqtt_broker {
        "none" => None,
        broker => {
            edgecore::devices::mqtt::parse_broker(broker)
                .map_err(|e| format!("--mqtt-broker: {e} (or none)"))?;
            Some(broker.to_string())
        }
    };
    Ok(edgecore::devices::DevicesConfig {
        dmi_socket,
        mqtt_broker,
        mapper_qps,
    })
}

/// The async runtime of `join` and `run`; `ctl` does without one. One thread: edgecore's own
/// work is a few milliseconds of CPU per pod start and next to none at rest, everything slow
/// (CRI, QUIC, mappers) is I/O it awaits, and SQLite runs on the blocking pool. A worker thread
/// per core would cost a stack and a malloc arena each on a small gateway
/// (docs/benchmarks.md, "The edge build").
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            None
        }
    }
}

/// Runs a `ctl` command: local, synchronous, no network.
fn ctl(command: CtlCommand) -> ExitCode {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let result = match command {
        CtlCommand::Get {
            what,
            output,
            data_dir,
        } => edgecore::ctl::get_as(&data_dir, what, output, &mut out),
        CtlCommand::Twin {
            device,
            namespace,
            output,
            data_dir,
        } => edgecore::ctl::twin(&data_dir, &namespace, &device, output, &mut out),
        CtlCommand::Logs {
            pod,
            namespace,
            container,
            follow,
            tail,
            data_dir,
        } => {
            let target = edgecore::ctl::Target {
                namespace,
                pod,
                container,
            };
            edgecore::ctl::logs(&data_dir, &target, tail, follow, &mut out)
        }
        CtlCommand::Restart {
            pod,
            namespace,
            data_dir,
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            runtime.block_on(edgecore::ctl::restart(
                &data_dir, &namespace, &pod, &mut out,
            ))
        }
        CtlCommand::Exec {
            pod,
            namespace,
            container,
            stdin,
            tty,
            data_dir,
            cri_endpoint,
            command,
        } => {
            let target = edgecore::ctl::Target {
                namespace,
                pod,
                container,
            };
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let cri_endpoint = match edgecore::ctl::cri_endpoint(&data_dir, cri_endpoint.as_deref())
            {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let mut err = std::io::stderr().lock();
            let ran = if stdin || tty {
                runtime.block_on(edgecore::ctl::exec_interactive(
                    &data_dir,
                    &cri_endpoint,
                    &target,
                    command,
                    edgecore::ctl::Interactive { stdin, tty },
                    &mut out,
                    &mut err,
                ))
            } else {
                runtime.block_on(edgecore::ctl::exec(
                    &data_dir,
                    &cri_endpoint,
                    &target,
                    command,
                    &mut out,
                    &mut err,
                ))
            };
            match ran {
                Ok(0) => Ok(()),
                Ok(code) => {
                    let _ = std::io::Write::flush(&mut out);
                    return ExitCode::from(u8::try_from(code).unwrap_or(1));
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing left to tell anyone.
        Err(CtlError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", daemon::error_chain(&e));
            match e {
                CtlError::Store(StoreError::Missing { .. }) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The hostname, lowercased, if it is a valid node name.
fn default_node_name() -> Option<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let host = host.trim().to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_flags_turn_parts_off_with_none_and_name_bad_values() {
        let config = devices_config("none", "none", 20.0).expect("valid");
        assert!(config.dmi_socket.is_none() && config.mqtt_broker.is_none());
        let config = devices_config("/run/dmi.sock", "tcp://127.0.0.1:1883", 5.0).expect("valid");
        assert_eq!(config.dmi_socket, Some(PathBuf::from("/run/dmi.sock")));
        assert_eq!(config.mapper_qps, 5.0);
        for (socket, broker, qps, named) in [
            ("", "none", 20.0, "--dmi-socket"),
            ("none", "localhost:1883", 20.0, "--mqtt-broker"),
            ("none", "none", 0.0, "--mapper-qps"),
            ("none", "none", f64::NAN, "--mapper-qps"),
        ] {
            let error = devices_config(socket, broker, qps).expect_err("invalid");
            assert!(error.contains(named), "{named}: {error}");
        }
    }
}
