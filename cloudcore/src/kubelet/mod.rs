//! Kube mode's kubelet endpoint: the HTTPS API a stock kube-apiserver and metrics-server call
//! on a Node's kubelet (`/containerLogs`, `/exec`, `/attach`, `/portForward`, `/run`,
//! `/metrics/resource`, `/stats/summary`, `/healthz`), served by cloudcore for every edge node
//! and carried to the edge over its tunnel ([`crate::streams`]). See docs/kube-mode.md and
//! docs/streams.md ("Kubelet endpoint").
//!
//! Node-scoped paths carry no pod, so each listener serves one node: one TCP port per edge node
//! from `--kubelet-ports` (kept in `cloudcore.db`, [`crate::registry`]), bound at start for every
//! non-revoked node and within a second of a join, closed within a second of a revocation. The
//! Node advertises the port in `status.daemonEndpoints.kubeletEndpoint.Port` and cloudcore's
//! address first in `status.addresses` ([`crate::nodes`]), so the apiserver dials cloudcore
//! without any flag of its own. Not run in embedded mode: the embedded API reaches
//! [`crate::streams::Streams`] directly.

pub mod auth;
pub mod metrics;
pub mod server;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::registry::KubeletPortRange;

/// The default `--kubelet-ports`: 10,000 ports, above a real kubelet's 10250 and below the
/// Linux ephemeral range (32768-60999), so a kubelet on the same host never collides.
pub const DEFAULT_PORTS: KubeletPortRange = KubeletPortRange {
    first: 20250,
    last: 30249,
};
/// How often the registry is checked for joined and revoked nodes.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// A port that could not be bound is tried again after this long.
const BIND_RETRY: Duration = Duration::from_secs(10);

/// Which address type carries cloudcore's address on edge Nodes (`--kubelet-address-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressType {
    /// A `Hostname` address (the apiserver's first preference by default); the edge's own
    /// addresses stay as it reported them, but for its Hostname, which ours replaces.
    #[default]
    Hostname,
    /// For clusters whose apiserver sets `--kubelet-preferred-address-types=InternalIP,...`:
    /// cloudcore's address is the first `InternalIP`, the edge's own InternalIPs become
    /// `ExternalIP`s.
    InternalIp,
}

impl std::str::FromStr for AddressType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Hostname" => Ok(AddressType::Hostname),
            "InternalIP" => Ok(AddressType::InternalIp),
            other => Err(format!(
                "{other:?} is not an address type cloudcore can advertise (Hostname or InternalIP)"
            )),
        }
    }
}

/// Settings of the kubelet endpoint (`--kubelet-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletSettings {
    /// Where the per-node listeners bind (`--kubelet-listen`).
    pub listen: IpAddr,
    /// The address the apiserver dials (`--kubelet-advertise-address`); `None`: the first
    /// `--advertise-address` if it is an IP, else this host's address toward the API server.
    pub advertise: Option<IpAddr>,
    pub ports: KubeletPortRange,
    pub address_type: AddressType,
}

impl Default for KubeletSettings {
    fn default() -> Self {
        KubeletSettings {
            listen: IpAddr::from([0, 0, 0, 0]),
            advertise: None,
            ports: DEFAULT_PORTS,
            address_type: AddressType::Hostname,
        }
    }
}

/// Parses `--kubelet-ports START-END`.
pub fn parse_port_range(text: &str) -> Result<KubeletPortRange, String> {
    let bad = || format!("{text:?} is not a port range START-END (e.g. 20250-30249)");
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if first == 0 || last < first {
        return Err(format!(
            "port range {text:?} is empty or starts at 0: START must be 1..=END"
        ));
    }
    Ok(KubeletPortRange { first, last })
}

/// Where the apiserver reaches a node's kubelet endpoint: what [`crate::nodes`] writes on the
/// Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeletAddress {
    pub address_type: AddressType,
    pub ip: IpAddr,
    pub port: u16,
}

/// Each node's kubelet port, shared with the node controller. Held only for map access, never
/// across an await.
#[derive(Debug)]
pub struct Endpoints {
    advertise: IpAddr,
    address_type: AddressType,
    /// Every non-revoked node the registry listed last, with its port if it got one.
    ports: Mutex<HashMap<String, Option<u16>>>,
}

impl Endpoints {
    pub fn new(advertise: IpAddr, address_type: AddressType) -> Arc<Endpoints> {
        Arc::new(Endpoints {
            advertise,
            address_type,
            ports: Mutex::new(HashMap::new()),
        })
    }

    fn ports(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<u16>>> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's kubelet address, once it has a port.
    pub fn of(&self, node: &str) -> Option<KubeletAddress> {
        self.ports()
            .get(node)
            .copied()
            .flatten()
            .map(|port| KubeletAddress {
                address_type: self.address_type,
                ip: self.advertise,
                port,
            })
    }

    /// Whether the registry's last listing had `node` (with or without a port): until it
    /// does, a just-joined node's port is not known here yet, and its Node waits for it.
    pub fn knows(&self, node: &str) -> bool {
        self.ports().contains_key(node)
    }

    pub fn advertise(&self) -> IpAddr {
        self.advertise
    }

    fn replace(&self, ports: HashMap<String, Option<u16>>) {
        *self.ports() = ports;
    }
}

/// The address the apiserver dials when `--kubelet-advertise-address` is not given: the first
/// `--advertise-address` that is an IP, else the local address of a socket pointed at the API
/// server (no packet is sent).
pub async fn default_advertise(
    advertise_addresses: &[String],
    api_server: Option<&http::Uri>,
) -> Result<IpAddr, String> {
    if let Some(ip) = advertise_addresses
        .first()
        .and_then(|a| a.parse::<IpAddr>().ok())
    {
        return Ok(ip);
    }
    let uri = api_server.ok_or(
        "no --kubelet-advertise-address, no IP --advertise-address and no API server address to find this host's IP from",
    )?;
    let host = uri
        .host()
        .ok_or_else(|| format!("API server URL {uri} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let target = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve the API server {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("the API server {host} resolves to no address"))?;
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = std::net::UdpSocket::bind(local).map_err(|e| e.to_string())?;
    socket
        .connect(target)
        .map_err(|e| format!("no route to the API server {target}: {e}"))?;
    let ip = socket.local_addr().map_err(|e| e.to_string())?.ip();
    if ip.is_unspecified() {
        return Err(format!("no local address toward the API server {target}"));
    }
    Ok(ip)
}

/// Keeps one listener per non-revoked node until cancelled: ports assigned at start to nodes
/// without one, listeners opened for nodes that joined and closed for nodes revoked, each
/// checked every second.
pub async fn run(
    settings: KubeletSettings,
    endpoints: Arc<Endpoints>,
    shared: Arc<crate::hub::Shared>,
    auth: Arc<auth::Auth>,
    owners: Option<Arc<crate::ha::sessions::Owners>>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut running: HashMap<String, (u16, CancellationToken)> = HashMap::new();
    let mut failed: HashMap<(String, u16), tokio::time::Instant> = HashMap::new();
    let mut fingerprint = None;
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let registry = shared.clone();
        let range = settings.ports;
        let now =
            tokio::task::spawn_blocking(move || registry.registry.kubelet_fingerprint()).await;
        let current = match now {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!(error = %daemon::error_chain(&e), "cannot read the registry's nodes; kubelet listeners unchanged");
                continue;
            }
            Err(_) => continue,
        };
        let retry_due = failed.values().any(|t| t.elapsed() >= BIND_RETRY);
        if fingerprint == Some(current) && !retry_due {
            continue;
        }
        let registry = shared.clone();
        let assigned = match tokio::task::spawn_blocking(move || {
            registry.registry.assign_kubelet_ports(range)
        })
        .await
        {
            Ok(Ok(ports)) => ports,
            Ok(Err(e)) => {
                tracing::warn!(error = %daemon::error_chain(&e), "cannot assign kubelet ports");
                continue;
            }
            Err(_) => continue,
        };
        fingerprint = Some(current);
        for name in &assigned.unassigned {
            tracing::error!(
                node.name = %name,
                "no kubelet port left in --kubelet-ports {}-{}: kubectl logs/exec/port-forward and metrics cannot reach this node; widen the range or revoke nodes that are gone",
                range.first,
                range.last
            );
        }
        let want: HashMap<String, u16> = assigned.assigned.into_iter().collect();
        // Known to the node controller before the listeners are up: a Node written now
        // already points at its port.
        endpoints.replace(
            want.iter()
                .map(|(n, p)| (n.clone(), Some(*p)))
                .chain(assigned.unassigned.iter().map(|n| (n.clone(), None)))
                .collect(),
        );
        running.retain(|name, (port, token)| {
            let keep = want.get(name) == Some(port);
            if !keep {
                token.cancel();
                tracing::info!(node.name = %name, port = *port, "kubelet listener closed");
            }
            keep
        });
        failed.retain(|(name, port), _| want.get(name) == Some(port));
        for (name, &port) in &want {
            if running.contains_key(name) {
                continue;
            }
            if failed
                .get(&(name.clone(), port))
                .is_some_and(|t| t.elapsed() < BIND_RETRY)
            {
                continue;
            }
            let addr = SocketAddr::new(settings.listen, port);
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(node.name = %name, listen = %addr, error = %e, "cannot bind the node's kubelet listener; retrying in 10s");
                    failed.insert((name.clone(), port), tokio::time::Instant::now());
                    continue;
                }
            };
            failed.remove(&(name.clone(), port));
            let node = Arc::new(server::NodeServer {
                node: name.clone(),
                shared: shared.clone(),
                auth: auth.clone(),
                owners: owners.clone(),
            });
            let ca = shared.ca.clone();
            let sans = vec![endpoints.advertise().to_string(), name.clone()];
            let tls = match tokio::task::spawn_blocking(move || server::tls_config(&ca, &sans))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::error!(node.name = %name, error = %daemon::error_chain(&e), "cannot build the kubelet listener's TLS");
                    failed.insert((name.clone(), port), tokio::time::Instant::now());
                    continue;
                }
                Err(_) => continue,
            };
            let token = shutdown.child_token();
            tracing::info!(node.name = %name, listen = %addr, advertise = %endpoints.advertise(), "kubelet listener bound");
            tracker.spawn(server::serve(listener, tls, node, token.clone()));
            running.insert(name.clone(), (port, token));
        }
    }
    for (_, token) in running.values() {
        token.cancel();
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_bad_ones_name_the_input() {
        assert_eq!(
            parse_port_range("20250-30249"),
            Ok(KubeletPortRange {
                first: 20250,
                last: 30249
            })
        );
        for bad in ["20250", "a-b", "30000-20000", "0-10", "1-70000"] {
            let err = parse_port_range(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        assert_eq!(
            (DEFAULT_PORTS.last - DEFAULT_PORTS.first + 1) as usize,
            10_000
        );
        assert!(!(DEFAULT_PORTS.first..=DEFAULT_PORTS.last).contains(&10250));
    }

    #[test]
    fn address_types_parse() {
        assert_eq!("Hostname".parse(), Ok(AddressType::Hostname));
        assert_eq!("InternalIP".parse(), Ok(AddressType::InternalIp));
        assert!("ExternalDNS".parse::<AddressType>().is_err());
    }

    #[tokio::test]
    async fn advertise_defaults_to_an_ip_advertise_address_then_the_route_to_the_api() {
        let ip = default_advertise(&["192.0.2.9".into()], None).await;
        assert_eq!(ip, Ok(IpAddr::from([192, 0, 2, 9])));
        let uri: http::Uri = "https://127.0.0.1:6443".parse().expect("uri");
        let ip = default_advertise(&["cloud.example".into()], Some(&uri)).await;
        assert_eq!(ip, Ok(IpAddr::from([127, 0, 0, 1])));
        assert!(default_advertise(&[], None).await.is_err());
    }
}
