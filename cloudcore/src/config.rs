//! Settings of `cloudcore serve`, parsed once from the command line into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the Kubernetes API that cloudcore works against comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlPlane {
    /// cloudcore serves a Kubernetes-compatible API itself, on SQLite in the data dir, and
    /// allocates Services' cluster IPs and node ports from `services`.
    Embedded {
        listen: SocketAddr,
        services: crate::apiserver::services::ServiceRanges,
    },
    /// A real cluster (in-cluster config or a kubeconfig).
    Kube { kubeconfig: Option<PathBuf> },
}

/// Where the state replicas share (CA, tokens, nodes, certificates) lives (`--state`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SharedState {
    /// `DIR/pki` and `DIR/cloudcore.db`: one replica.
    #[default]
    Local,
    /// Secrets in `namespace` of the real cluster (kube mode only): several replicas.
    Cluster { namespace: String },
}

/// Everything `serve` needs; tests build it directly.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// UDP address of the QUIC tunnel.
    pub listen: SocketAddr,
    /// Addresses edges dial; the first one goes into printed join commands.
    pub advertise_addresses: Vec<String>,
    /// Extra subject alternative names for the serving certificate.
    pub sans: Vec<String>,
    pub metrics_listen: SocketAddr,
    pub cert_lifetime: Duration,
    pub heartbeat_interval: Duration,
    pub dead_after: Duration,
    pub max_frame_size: usize,
    /// Connections allowed between QUIC accept and a finished Hello at once.
    pub max_concurrent_handshakes: usize,
    /// Of those, held by one source address at once (IPv6: one /64), so a single address
    /// cannot hold them all (`slots`).
    pub max_handshakes_per_address: usize,
    /// Time a peer has to complete TLS and send its first message. TLS itself gets at most
    /// `proto::DIAL_LIMIT` from the connection's arrival (an edge gives up its dial then).
    pub handshake_timeout: Duration,
    /// Failed joins allowed at once per source address, then one per `join_failure_refill`.
    pub join_failure_burst: u32,
    pub join_failure_refill: Duration,
    /// How often `serve` checks the registry for revocations made by the CLI.
    pub revocation_poll: Duration,
    /// Receive buffer asked for on the tunnel's UDP socket. The kernel caps it at
    /// `net.core.rmem_max`; the default 208 KiB drops handshake packets in reconnect storms.
    pub udp_receive_buffer: usize,
    pub control_plane: ControlPlane,
    /// A node without its tunnel for this long becomes Ready=Unknown (embedded mode).
    pub node_grace_period: Duration,
    /// Lost or replaced state `serve` may start on anyway (`--allow-new-store`,
    /// `--allow-new-ca`, `--allow-empty-registry`); by default it refuses.
    pub allow: crate::state::Allow,
    /// Streams (logs, exec, attach, port-forward, stats) open at once per edge.
    pub max_streams_per_edge: usize,
    /// Kube mode's kubelet endpoint (`--kubelet-*`).
    pub kubelet: crate::kubelet::KubeletSettings,
    /// Kube mode: this replica among others (`--replica-id`, `--leader-elect*`); `None` in
    /// embedded mode, which is one process.
    pub ha: Option<crate::ha::HaSettings>,
    /// `--state`: where the shared state lives.
    pub shared_state: SharedState,
}

impl ServeConfig {
    /// Defaults for everything but the data dir.
    pub fn new(data_dir: PathBuf) -> Self {
        ServeConfig {
            data_dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 10000)),
            advertise_addresses: Vec::new(),
            sans: Vec::new(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 10350)),
            cert_lifetime: Duration::from_secs(90 * 24 * 3600),
            heartbeat_interval: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            max_frame_size: proto::DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_handshakes: 64,
            max_handshakes_per_address: 8,
            handshake_timeout: Duration::from_secs(10),
            join_failure_burst: 10,
            join_failure_refill: Duration::from_secs(6),
            revocation_poll: Duration::from_millis(200),
            udp_receive_buffer: 4 * 1024 * 1024,
            control_plane: ControlPlane::Embedded {
                listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
                services: Default::default(),
            },
            node_grace_period: Duration::from_secs(50),
            allow: crate::state::Allow::default(),
            max_streams_per_edge: crate::streams::DEFAULT_MAX_STREAMS_PER_EDGE,
            kubelet: crate::kubelet::KubeletSettings::default(),
            ha: None,
            shared_state: SharedState::Local,
        }
    }

    /// `host:port` for join commands: the first advertise address, else the hostname.
    pub fn cloud_address(&self) -> String {
        let host = self
            .advertise_addresses
            .first()
            .cloned()
            .unwrap_or_else(|| crate::hostname().unwrap_or_else(|| "localhost".into()));
        join_host_port(&host, self.listen.port())
    }

    /// SANs of the serving certificate: localhost, loopback, the hostname, the advertised
    /// addresses and the extra SANs, without duplicates.
    pub fn server_sans(&self) -> Vec<String> {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        sans.extend(crate::hostname());
        sans.extend(self.advertise_addresses.iter().cloned());
        sans.extend(self.sans.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        sans.retain(|s| seen.insert(s.clone()));
        sans
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
