//! The cluster DNS server: answers names in the cluster domain from the service table and
//! forwards the others to the gateway's resolvers ([docs/services.md]).
//!
//! It listens on UDP and TCP port 53 of `--cluster-dns`, an address edgecore puts on `lo`
//! (netlink) before binding and removes on a graceful stop or `edgecore cleanup`; a killed
//! edgecore leaves it, and the next start takes it over. Names of the cluster domain follow
//! the Kubernetes DNS specification as CoreDNS serves it (TTL [`TTL`]); every other name goes
//! to the nameservers of `--dns-upstream` (re-read when the file changes), through hickory's
//! resolver.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::{Time, TokioRuntimeProvider};
use hickory_resolver::net::{DnsError as LookupFailure, NetError};
use hickory_server::Server;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::netlink;
use super::table::{Endpoint, Protocol, ServiceEntry, ServiceKind};
use super::{ServiceTable, ServicesConfig};
use crate::metrics::Metrics;

/// TTL of every answer from the cluster domain, and the negative TTL of its SOA: CoreDNS's
/// default for its `kubernetes` plugin, short enough that a Service's change is seen quickly.
pub const TTL: u32 = 5;
/// Where the server listens on `--cluster-dns`.
pub const DNS_PORT: u16 = 53;
/// How often the upstream resolv.conf is checked for changes.
const UPSTREAM_RECHECK: Duration = Duration::from_secs(5);
/// Idle time after which a TCP client's connection is closed.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// How long one upstream query waits for an answer, and how often it is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const UPSTREAM_ATTEMPTS: usize = 2;

/// The DNS server could not start or its address could not be set.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set the DNS address {address} on lo: {reason}")]
    Address { address: IpAddr, reason: String },
    #[error("cannot listen for DNS on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Puts `address` on `lo`, binds UDP and TCP port 53 there and serves until `shutdown`, then
/// stops answering and removes the address. The table is read on every query; the upstream
/// nameservers come from `config.dns_upstream`.
pub fn spawn(
    address: IpAddr,
    config: &ServicesConfig,
    table: watch::Receiver<Arc<ServiceTable>>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    add_address(address)?;
    let socket = SocketAddr::new(address, DNS_PORT);
    let bind_error = |source| DnsError::Bind {
        address: socket,
        source,
    };
    let udp = std::net::UdpSocket::bind(socket).map_err(bind_error)?;
    udp.set_nonblocking(true).map_err(bind_error)?;
    let udp = tokio::net::UdpSocket::from_std(udp).map_err(bind_error)?;
    let tcp = std::net::TcpListener::bind(socket).map_err(bind_error)?;
    tcp.set_nonblocking(true).map_err(bind_error)?;
    let tcp = tokio::net::TcpListener::from_std(tcp).map_err(bind_error)?;

    let upstream = Arc::new(Upstream::new(config.dns_upstream.clone(), address));
    upstream.reload();
    let handler = ClusterDns {
        zone: Zone::new(&config.cluster_domain),
        table,
        upstream: upstream.clone(),
        metrics,
    };
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT, TCP_RESPONSE_BUFFER);
    tracing::info!(%socket, domain = %config.cluster_domain, upstream = %config.dns_upstream.display(), "cluster DNS listening");

    let stop = shutdown.clone();
    tracker.spawn(async move {
        let mut recheck = tokio::time::interval(UPSTREAM_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = recheck.tick() => upstream.reload(),
            }
        }
    });
    tracker.spawn(async move {
        let ended = tokio::select! {
            result = server.block_until_done() => Some(result),
            () = shutdown.cancelled() => None,
        };
        match ended {
            None => {
                if let Err(e) = server.shutdown_gracefully().await {
                    tracing::warn!(error = %e, "the DNS server stopped with an error");
                }
                match remove_address(address) {
                    Ok(()) => tracing::info!(%address, "cluster DNS stopped, address removed"),
                    Err(e) => tracing::warn!(error = %e, "cannot remove the cluster DNS address"),
                }
            }
            // The address stays: pods' resolv.conf names it, and the next start takes it over.
            Some(Err(e)) => tracing::error!(error = %e, "the DNS server failed; pods get no answers until edgecore restarts"),
            Some(Ok(())) => tracing::error!("the DNS server ended; pods get no answers until edgecore restarts"),
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The address on lo.

fn address_error(address: IpAddr, reason: impl std::fmt::Display) -> DnsError {
    DnsError::Address {
        address,
        reason: reason.to_string(),
    }
}

/// Puts `address` on `lo` as a host address; already there (left by a killed edgecore) is
/// fine. One netlink request, answered at once by the kernel.
pub fn add_address(address: IpAddr) -> Result<(), DnsError> {
    match netlink::add_to_lo(address) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            tracing::info!(%address, "taking over the cluster DNS address already on lo");
            Ok(())
        }
        Err(e) => Err(address_error(address, e)),
    }
}

/// Removes `address` from `lo`, if present. One netlink request, answered at once.
pub fn remove_address(address: IpAddr) -> Result<(), DnsError> {
    match netlink::remove_from_lo(address) {
        // Not there, or removed meanwhile (a concurrent cleanup).
        Err(e) if e.kind() != io::ErrorKind::AddrNotAvailable => Err(address_error(address, e)),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// resolv.conf.

/// A resolv.conf as the kubelet reads one: `nameserver` lines accumulate, the last `search`
/// and the last `options` line win, `#` and `;` start comments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    /// Without trailing dots.
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses the text of a resolv.conf; lines it does not know are ignored.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("nameserver") => conf.nameservers.extend(fields.next().map(str::to_string)),
                Some("search") => {
                    conf.searches = fields
                        .map(|s| s.trim_end_matches('.').to_string())
                        .collect();
                }
                Some("options") => conf.options = fields.map(str::to_string).collect(),
                _ => {}
            }
        }
        conf
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> io::Result<ResolvConf> {
        Ok(ResolvConf::parse(&std::fs::read_to_string(path)?))
    }
}

/// The nameservers of a resolv.conf the server forwards to: addresses only (a `%zone` suffix
/// dropped), without `own` (the cluster DNS itself: forwarding to it would loop), each once.
fn upstream_nameservers(conf: &ResolvConf, own: IpAddr) -> Vec<IpAddr> {
    let mut seen = BTreeSet::new();
    conf.nameservers
        .iter()
        .filter_map(|ns| ns.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| *ip != own && seen.insert(*ip))
        .collect()
}

/// The upstream resolver, rebuilt when the resolv.conf's nameservers change.
struct Upstream {
    path: PathBuf,
    own: IpAddr,
    /// What forwarded queries use. Read by every forwarded query, replaced by the recheck
    /// task: a lock held only to clone or swap.
    current: RwLock<Current>,
}

#[derive(Default)]
struct Current {
    nameservers: Vec<IpAddr>,
    /// `None`: no usable nameserver (SERVFAIL).
    resolver: Option<Arc<TokioResolver>>,
    /// The file could not be read last time (warned once per streak).
    unreadable: bool,
}

impl Upstream {
    fn new(path: PathBuf, own: IpAddr) -> Upstream {
        Upstream {
            path,
            own,
            current: RwLock::new(Current::default()),
        }
    }

    fn resolver(&self) -> Option<Arc<TokioResolver>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .resolver
            .clone()
    }

    /// Reads the resolv.conf again; a new resolver when its nameservers changed. A file that
    /// cannot be read keeps the resolver in use.
    fn reload(&self) {
        let read = ResolvConf::read(&self.path);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let conf = match read {
            Ok(conf) => conf,
            Err(e) => {
                if !current.unreadable {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read the upstream resolv.conf; keeping the nameservers in use");
                    current.unreadable = true;
                }
                return;
            }
        };
        current.unreadable = false;
        let nameservers = upstream_nameservers(&conf, self.own);
        let built = current.resolver.is_some() || current.nameservers.is_empty();
        if current.nameservers == nameservers && built {
            return;
        }
        if nameservers.is_empty() {
            tracing::warn!(path = %self.path.display(), "no upstream nameserver: names outside the cluster domain get SERVFAIL");
            current.nameservers = nameservers;
            current.resolver = None;
            return;
        }
        match upstream_resolver(&nameservers) {
            Ok(resolver) => {
                tracing::info!(nameservers = ?nameservers, "upstream nameservers of the cluster DNS");
                current.nameservers = nameservers;
                current.resolver = Some(Arc::new(resolver));
            }
            Err(e) => tracing::warn!(error = %e, "cannot build the upstream resolver"),
        }
    }
}

/// A resolver asking `nameservers` (UDP, TCP on truncation) for fully qualified names: no
/// search list, no hosts file, CNAME chains kept in answers.
fn upstream_resolver(nameservers: &[IpAddr]) -> Result<TokioResolver, NetError> {
    let config = ResolverConfig::from_parts(
        None,
        Vec::new(),
        nameservers
            .iter()
            .map(|ip| NameServerConfig::udp_and_tcp(*ip))
            .collect(),
    );
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let options = builder.options_mut();
    options.use_hosts_file = ResolveHosts::Never;
    options.preserve_intermediates = true;
    options.timeout = UPSTREAM_TIMEOUT;
    options.attempts = UPSTREAM_ATTEMPTS;
    options.ndots = 0;
    builder.build()
}

// ---------------------------------------------------------------------------------------
// Names of the cluster domain.

/// The cluster domain, lower case, without the trailing dot, and as a name.
#[derive(Debug, Clone)]
struct Zone {
    domain: String,
    name: Name,
}

impl Zone {
    fn new(domain: &str) -> Zone {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut name = Name::from_ascii(&domain).unwrap_or_else(|_| Name::root());
        name.set_fqdn(true);
        Zone { domain, name }
    }

    /// `relative` + the cluster domain, as a fully qualified name.
    fn name(&self, relative: &str) -> Name {
        let mut name = Name::from_ascii(format!("{relative}.{}", self.domain))
            .unwrap_or_else(|_| self.name.clone());
        name.set_fqdn(true);
        name
    }

    /// The labels of `qname` below the cluster domain (`["web", "default", "svc"]`), or
    /// `None` when the name is not in it.
    fn labels(&self, qname: &Name) -> Option<Vec<String>> {
        let full = qname.to_lowercase().to_ascii();
        let full = full.trim_end_matches('.');
        if full == self.domain {
            return Some(Vec::new());
        }
        let relative = full.strip_suffix(&self.domain)?.strip_suffix('.')?;
        Some(relative.split('.').map(str::to_string).collect())
    }

    /// The zone's SOA, given with negative answers (its minimum is the negative TTL).
    fn soa(&self, serial: u32) -> Record {
        let soa = SOA::new(
            self.name("ns.dns"),
            self.name("hostmaster"),
            serial,
            7200,
            1800,
            86400,
            TTL,
        );
        Record::from_rdata(self.name.clone(), TTL, RData::SOA(soa))
    }
}

/// What the table says about a name of the cluster domain.
#[derive(Debug, Clone, PartialEq)]
enum Lookup {
    /// The name exists: these records (none: not with the type asked for), and these for the
    /// additional section.
    Found {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// An ExternalName Service: its CNAME, then the target's records of the type asked for.
    Alias { cname: Box<Record>, target: Name },
    /// No such name.
    NxDomain,
}

impl Lookup {
    fn empty() -> Lookup {
        Lookup::Found {
            answers: Vec::new(),
            additionals: Vec::new(),
        }
    }

    fn answers(answers: Vec<Record>) -> Lookup {
        Lookup::Found {
            answers,
            additionals: Vec::new(),
        }
    }
}

/// The name under which an endpoint of a headless Service is known: its hostname, else its
/// address with dashes (`10-1-2-3`), as CoreDNS names them.
fn endpoint_label(endpoint: &Endpoint) -> String {
    match &endpoint.hostname {
        Some(hostname) if !hostname.is_empty() => hostname.to_ascii_lowercase(),
        _ => endpoint.ip.to_string().replace(['.', ':'], "-"),
    }
}

/// The endpoints DNS lists for a headless Service: the ready ones, or all of them with
/// `publishNotReadyAddresses`; each address once.
fn published(entry: &ServiceEntry) -> Vec<&Endpoint> {
    let mut seen = BTreeSet::new();
    entry
        .endpoints
        .iter()
        .filter(|e| e.ready || entry.publish_not_ready)
        .filter(|e| seen.insert(e.ip))
        .collect()
}

/// A or AAAA records for the addresses of the family asked for.
fn address_records(
    owner: &Name,
    ips: impl IntoIterator<Item = IpAddr>,
    qtype: RecordType,
) -> Vec<Record> {
    ips.into_iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(v4))),
            (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(v6))),
            _ => None,
        })
        .map(|rdata| Record::from_rdata(owner.clone(), TTL, rdata))
        .collect()
}

fn protocol_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

/// Answers `qname`/`qtype` from `table` when the name is in the cluster domain; `None`
/// otherwise (the name is forwarded).
///
/// - `SVC.NS.svc`: A/AAAA of the cluster IPs, or for a headless Service of its published
///   endpoints; SRV for each port; an ExternalName Service answers with its CNAME.
/// - `_PORT._PROTO.SVC.NS.svc`: SRV of a named port (for a headless Service one per endpoint,
///   aimed at `HOST.SVC.NS.svc`), with the targets' addresses as additionals.
/// - `HOST.SVC.NS.svc`: A/AAAA of the headless Service's endpoint of that hostname (or dashed
///   address).
/// - `A-B-C-D.NS.pod`: A of that address (CoreDNS's `pods insecure`).
/// - the domain itself, `svc`, `pod`, `NS.svc` of a namespace with Services, `NS.pod`: no
///   records (SOA for the domain); anything else: NXDOMAIN.
///
/// The type asked for but absent gives an empty answer (NODATA), never NXDOMAIN.
fn cluster_lookup(
    table: &ServiceTable,
    zone: &Zone,
    qname: &Name,
    qtype: RecordType,
) -> Option<Lookup> {
    let labels = zone.labels(qname)?;
    let owner = qname.clone();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let lookup = match labels.as_slice() {
        [] if qtype == RecordType::SOA => Lookup::answers(vec![zone.soa(table.revision as u32)]),
        [] | ["svc"] | ["pod"] | [_, "pod"] => Lookup::empty(),
        [namespace, "svc"] => {
            if table.in_namespace(namespace).next().is_some() {
                Lookup::empty()
            } else {
                Lookup::NxDomain
            }
        }
        [service, namespace, "svc"] => match entry(table, namespace, service) {
            Some(entry) => service_lookup(zone, &owner, namespace, service, entry, qtype),
            None => Lookup::NxDomain,
        },
        [host, service, namespace, "svc"] => match entry(table, namespace, service) {
            Some(entry) if entry.kind == ServiceKind::Headless => {
                let ips: Vec<IpAddr> = published(entry)
                    .into_iter()
                    .filter(|e| endpoint_label(e) == *host)
                    .map(|e| e.ip)
                    .collect();
                if ips.is_empty() {
                    Lookup::NxDomain
                } else {
                    Lookup::answers(address_records(&owner, ips, qtype))
                }
            }
            _ => Lookup::NxDomain,
        },
        [port, protocol, service, namespace, "svc"] => {
            let Some(entry) = entry(table, namespace, service) else {
                return Some(Lookup::NxDomain);
            };
            let (Some(port), Some(protocol)) = (port.strip_prefix('_'), protocol.strip_prefix('_'))
            else {
                return Some(Lookup::NxDomain);
            };
            let matching = entry.ports.iter().any(|p| {
                !p.name.is_empty()
                    && p.name.eq_ignore_ascii_case(port)
                    && protocol_label(p.protocol)[1..] == *protocol
            });
            if !matching || matches!(entry.kind, ServiceKind::ExternalName(_)) {
                Lookup::NxDomain
            } else if qtype == RecordType::SRV {
                srv_lookup(
                    zone,
                    &owner,
                    namespace,
                    service,
                    entry,
                    Some((port, protocol)),
                )
            } else {
                Lookup::empty()
            }
        }
        [address, _namespace, "pod"] => match pod_address(address) {
            Some(ip) => Lookup::answers(address_records(&owner, [IpAddr::V4(ip)], qtype)),
            None => Lookup::NxDomain,
        },
        _ => Lookup::NxDomain,
    };
    Some(lookup)
}

fn entry<'a>(table: &'a ServiceTable, namespace: &str, service: &str) -> Option<&'a ServiceEntry> {
    table.services.get(&super::table::ServiceKey {
        namespace: namespace.to_string(),
        name: service.to_string(),
    })
}

/// `A-B-C-D` of a pod name (`10-1-2-3`).
fn pod_address(label: &str) -> Option<Ipv4Addr> {
    let octets: Vec<u8> = label
        .split('-')
        .map(|o| o.parse::<u8>().ok())
        .collect::<Option<_>>()?;
    <[u8; 4]>::try_from(octets).ok().map(Ipv4Addr::from)
}

fn service_lookup(
    zone: &Zone,
    owner: &Name,
    namespace: &str,
    service: &str,
    entry: &ServiceEntry,
    qtype: RecordType,
) -> Lookup {
    if let ServiceKind::ExternalName(target) = &entry.kind {
        let Ok(mut target) = Name::from_ascii(target.trim_end_matches('.')) else {
            return Lookup::empty();
        };
        target.set_fqdn(true);
        let cname = Record::from_rdata(owner.clone(), TTL, RData::CNAME(CNAME(target.clone())));
        return match qtype {
            RecordType::CNAME => Lookup::answers(vec![cname]),
            _ => Lookup::Alias {
                cname: Box::new(cname),
                target,
            },
        };
    }
    match qtype {
        RecordType::A | RecordType::AAAA => {
            let ips: Vec<IpAddr> = match entry.kind {
                ServiceKind::Headless => published(entry).into_iter().map(|e| e.ip).collect(),
                _ => entry.cluster_ips.clone(),
            };
            Lookup::answers(address_records(owner, ips, qtype))
        }
        RecordType::SRV => srv_lookup(zone, owner, namespace, service, entry, None),
        _ => Lookup::empty(),
    }
}

/// SRV records of `entry`'s ports (`only`: the one named port and protocol asked for).
fn srv_lookup(
    zone: &Zone,
    owner: &Name,
    namespace: &str,
    service: &str,
    entry: &ServiceEntry,
    only: Option<(&str, &str)>,
) -> Lookup {
    let ports = entry.ports.iter().filter(|p| match only {
        Some((name, protocol)) => {
            p.name.eq_ignore_ascii_case(name) && protocol_label(p.protocol)[1..] == *protocol
        }
        None => true,
    });
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let srv = |priority_target: Name, port: u16, weight: u16| {
        Record::from_rdata(
            owner.clone(),
            TTL,
            RData::SRV(SRV::new(0, weight, port, priority_target)),
        )
    };
    match entry.kind {
        ServiceKind::Headless => {
            let endpoints = published(entry);
            let weight = (100 / endpoints.len().max(1)).max(1) as u16;
            for port in ports {
                for endpoint in &endpoints {
                    let target = zone.name(&format!(
                        "{}.{service}.{namespace}.svc",
                        endpoint_label(endpoint)
                    ));
                    let number = endpoint.ports.get(&port.name).copied().unwrap_or(port.port);
                    answers.push(srv(target.clone(), number, weight));
                    for qtype in [RecordType::A, RecordType::AAAA] {
                        additionals.extend(address_records(&target, [endpoint.ip], qtype));
                    }
                }
            }
            additionals.dedup();
        }
        _ => {
            let target = zone.name(&format!("{service}.{namespace}.svc"));
            for port in ports {
                answers.push(srv(target.clone(), port.port, 100));
            }
            if !answers.is_empty() {
                for qtype in [RecordType::A, RecordType::AAAA] {
                    additionals.extend(address_records(&target, entry.cluster_ips.clone(), qtype));
                }
            }
        }
    }
    Lookup::Found {
        answers,
        additionals,
    }
}

// ---------------------------------------------------------------------------------------
// The request handler.

/// How a query was answered, for `edgecore_dns_queries_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// From the service table, with or without records.
    Cluster,
    /// An unknown name of the cluster domain.
    NxDomain,
    /// By the upstream nameservers (their answer, NXDOMAIN included).
    Forwarded,
    /// SERVFAIL: no upstream nameserver, or none answered.
    Failed,
    /// Not a query this server answers (an UPDATE, a malformed message).
    Refused,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Cluster => "cluster",
            Outcome::NxDomain => "nxdomain",
            Outcome::Forwarded => "forwarded",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

/// A response before it is sent.
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    outcome: Outcome,
}

impl Reply {
    fn error(code: ResponseCode, outcome: Outcome) -> Reply {
        Reply {
            code,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            outcome,
        }
    }
}

/// The handler hickory's server calls for every query.
struct ClusterDns {
    zone: Zone,
    table: watch::Receiver<Arc<ServiceTable>>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
}

impl ClusterDns {
    async fn reply(&self, request: &Request) -> Reply {
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            return Reply::error(ResponseCode::NotImp, Outcome::Refused);
        }
        let Ok(info) = request.request_info() else {
            return Reply::error(ResponseCode::FormErr, Outcome::Refused);
        };
        let qname = info.query.original().name().clone();
        let qtype = info.query.query_type();
        let table = self.table.borrow().clone();
        let serial = table.revision as u32;
        match cluster_lookup(&table, &self.zone, &qname, qtype) {
            None => self.forward(qname, qtype).await,
            Some(Lookup::Found {
                answers,
                additionals,
            }) => Reply {
                code: ResponseCode::NoError,
                authoritative: true,
                authorities: if answers.is_empty() {
                    vec![self.zone.soa(serial)]
                } else {
                    Vec::new()
                },
                answers,
                additionals,
                outcome: Outcome::Cluster,
            },
            Some(Lookup::NxDomain) => Reply {
                code: ResponseCode::NXDomain,
                authoritative: true,
                answers: Vec::new(),
                authorities: vec![self.zone.soa(serial)],
                additionals: Vec::new(),
                outcome: Outcome::NxDomain,
            },
            Some(Lookup::Alias { cname, target }) => {
                // The target's records too: stub resolvers do not chase a lone CNAME.
                let mut answers = vec![*cname];
                match cluster_lookup(&table, &self.zone, &target, qtype) {
                    Some(Lookup::Found { answers: more, .. }) => answers.extend(more),
                    Some(_) => {}
                    None => answers.extend(self.forward(target, qtype).await.answers),
                }
                Reply {
                    code: ResponseCode::NoError,
                    authoritative: true,
                    answers,
                    authorities: Vec::new(),
                    additionals: Vec::new(),
                    outcome: Outcome::Cluster,
                }
            }
        }
    }

    /// Asks the upstream nameservers.
    async fn forward(&self, qname: Name, qtype: RecordType) -> Reply {
        let Some(resolver) = self.upstream.resolver() else {
            return Reply::error(ResponseCode::ServFail, Outcome::Failed);
        };
        match resolver.lookup(qname.clone(), qtype).await {
            Ok(lookup) => Reply {
                code: ResponseCode::NoError,
                authoritative: false,
                answers: lookup.answers().to_vec(),
                authorities: Vec::new(),
                additionals: Vec::new(),
                outcome: Outcome::Forwarded,
            },
            Err(NetError::Dns(LookupFailure::NoRecordsFound(none))) => Reply {
                code: none.response_code,
                authoritative: false,
                answers: Vec::new(),
                authorities: none
                    .soa
                    .map(|soa| vec![soa.into_record_of_rdata()])
                    .unwrap_or_default(),
                additionals: Vec::new(),
                outcome: Outcome::Forwarded,
            },
            Err(NetError::Dns(LookupFailure::ResponseCode(code))) => {
                Reply::error(code, Outcome::Forwarded)
            }
            Err(e) => {
                tracing::debug!(name = %qname, r#type = %qtype, error = %e, "upstream lookup failed");
                Reply::error(ResponseCode::ServFail, Outcome::Failed)
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for ClusterDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let reply = self.reply(request).await;
        self.metrics.dns_query(reply.outcome.label());
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(512));
            edns
        });
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.code;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = true;
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a DNS response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv6Addr;

    use super::super::table::{ServiceKey, ServicePort};
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("test name")
    }

    fn endpoint(address: &str, ready: bool, hostname: Option<&str>) -> Endpoint {
        Endpoint {
            ip: ip(address),
            ready,
            terminating: false,
            local: true,
            node_name: Some("edge-1".into()),
            hostname: hostname.map(str::to_string),
            pod: None,
            ports: BTreeMap::from([("http".to_string(), 8080)]),
        }
    }

    fn service(kind: ServiceKind, cluster_ips: &[&str], endpoints: Vec<Endpoint>) -> ServiceEntry {
        ServiceEntry {
            uid: "u".into(),
            kind,
            cluster_ips: cluster_ips.iter().map(|s| ip(s)).collect(),
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: None,
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    node_port: None,
                },
            ],
            affinity: None,
            publish_not_ready: false,
            endpoints,
        }
    }

    fn table() -> ServiceTable {
        let key = |ns: &str, name: &str| ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        };
        let mut services = BTreeMap::new();
        services.insert(
            key("default", "web"),
            service(ServiceKind::ClusterIp, &["10.96.0.10"], vec![]),
        );
        services.insert(
            key("default", "dual"),
            service(ServiceKind::NodePort, &["10.96.0.11", "fd00::11"], vec![]),
        );
        services.insert(
            key("db", "pg"),
            service(
                ServiceKind::Headless,
                &[],
                vec![
                    endpoint("10.1.0.5", true, Some("pg-0")),
                    endpoint("10.1.0.6", true, None),
                    endpoint("10.1.0.7", false, Some("pg-2")),
                ],
            ),
        );
        let mut lenient = service(
            ServiceKind::Headless,
            &[],
            vec![endpoint("10.1.0.8", false, Some("warm"))],
        );
        lenient.publish_not_ready = true;
        services.insert(key("db", "warm"), lenient);
        services.insert(
            key("default", "ext"),
            service(
                ServiceKind::ExternalName("www.example.test".into()),
                &[],
                vec![],
            ),
        );
        ServiceTable {
            revision: 7,
            services,
        }
    }

    fn lookup(qname: &str, qtype: RecordType) -> Option<Lookup> {
        cluster_lookup(&table(), &Zone::new("cluster.local"), &name(qname), qtype)
    }

    /// The answers' data as text, sorted.
    fn answers(qname: &str, qtype: RecordType) -> Vec<String> {
        match lookup(qname, qtype) {
            Some(Lookup::Found { answers, .. }) => {
                let mut out: Vec<String> = answers.iter().map(|r| r.data.to_string()).collect();
                out.sort();
                out
            }
            other => panic!("{qname} {qtype}: {other:?}"),
        }
    }

    #[test]
    fn cluster_ip_services_answer_with_their_cluster_ips() {
        assert_eq!(
            answers("web.default.svc.cluster.local.", RecordType::A),
            ["10.96.0.10"]
        );
        assert_eq!(
            answers("WEB.Default.svc.cluster.local.", RecordType::A),
            ["10.96.0.10"]
        );
        // IPv4 only: an empty answer, not NXDOMAIN (a resolver asking both keeps the A).
        assert!(answers("web.default.svc.cluster.local.", RecordType::AAAA).is_empty());
        assert!(answers("web.default.svc.cluster.local.", RecordType::TXT).is_empty());
        assert_eq!(
            answers("dual.default.svc.cluster.local.", RecordType::A),
            ["10.96.0.11"]
        );
        assert_eq!(
            answers("dual.default.svc.cluster.local.", RecordType::AAAA),
            [Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11).to_string()]
        );
        let Some(Lookup::Found { answers, .. }) =
            lookup("web.default.svc.cluster.local.", RecordType::A)
        else {
            panic!("no answer");
        };
        assert_eq!(answers[0].ttl, TTL);
        assert_eq!(answers[0].name, name("web.default.svc.cluster.local."));
    }

    #[test]
    fn headless_services_answer_with_published_endpoints() {
        assert_eq!(
            answers("pg.db.svc.cluster.local.", RecordType::A),
            ["10.1.0.5", "10.1.0.6"],
            "ready endpoints only"
        );
        assert_eq!(
            answers("warm.db.svc.cluster.local.", RecordType::A),
            ["10.1.0.8"],
            "publishNotReadyAddresses"
        );
        assert_eq!(
            answers("pg-0.pg.db.svc.cluster.local.", RecordType::A),
            ["10.1.0.5"]
        );
        assert_eq!(
            answers("10-1-0-6.pg.db.svc.cluster.local.", RecordType::A),
            ["10.1.0.6"]
        );
        assert_eq!(
            lookup("pg-2.pg.db.svc.cluster.local.", RecordType::A),
            Some(Lookup::NxDomain),
            "not ready"
        );
        assert_eq!(
            lookup("pg-9.pg.db.svc.cluster.local.", RecordType::A),
            Some(Lookup::NxDomain)
        );
        assert_eq!(
            lookup("x.web.default.svc.cluster.local.", RecordType::A),
            Some(Lookup::NxDomain),
            "a ClusterIP Service has no endpoint names"
        );
    }

    #[test]
    fn srv_records_name_ports_and_endpoints() {
        assert_eq!(
            answers("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
            ["0 100 80 web.default.svc.cluster.local."]
        );
        assert_eq!(
            answers("_dns._udp.web.default.svc.cluster.local.", RecordType::SRV),
            ["0 100 53 web.default.svc.cluster.local."]
        );
        assert_eq!(
            lookup("_dns._tcp.web.default.svc.cluster.local.", RecordType::SRV),
            Some(Lookup::NxDomain)
        );
        assert_eq!(
            lookup("_nope._tcp.web.default.svc.cluster.local.", RecordType::SRV),
            Some(Lookup::NxDomain)
        );
        assert!(answers("_http._tcp.web.default.svc.cluster.local.", RecordType::A).is_empty());
        let Some(Lookup::Found {
            answers: records,
            additionals,
        }) = lookup("_http._tcp.pg.db.svc.cluster.local.", RecordType::SRV)
        else {
            panic!("no SRV answer");
        };
        let mut srv: Vec<String> = records.iter().map(|r| r.data.to_string()).collect();
        srv.sort();
        assert_eq!(
            srv,
            [
                "0 50 8080 10-1-0-6.pg.db.svc.cluster.local.",
                "0 50 8080 pg-0.pg.db.svc.cluster.local."
            ],
            "one per ready endpoint, at its target port"
        );
        let glue: Vec<String> = additionals
            .iter()
            .map(|r| format!("{} {}", r.name, r.data))
            .collect();
        assert!(
            glue.contains(&"pg-0.pg.db.svc.cluster.local. 10.1.0.5".to_string()),
            "{glue:?}"
        );
        assert_eq!(
            answers("web.default.svc.cluster.local.", RecordType::SRV).len(),
            2,
            "the bare name lists every port"
        );
    }

    #[test]
    fn external_names_are_aliases() {
        let Some(Lookup::Alias { cname, target }) =
            lookup("ext.default.svc.cluster.local.", RecordType::A)
        else {
            panic!("no alias");
        };
        assert_eq!(target, name("www.example.test."));
        assert_eq!(cname.data.to_string(), "www.example.test.");
        assert_eq!(
            answers("ext.default.svc.cluster.local.", RecordType::CNAME),
            ["www.example.test."]
        );
    }

    #[test]
    fn unknown_names_of_the_domain_do_not_exist() {
        for qname in [
            "nope.default.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "web.default.svc.cluster.local.default.svc.cluster.local.",
            "a.b.c.d.e.f.cluster.local.",
            "web.cluster.local.",
            "other.svc.cluster.local.",
        ] {
            assert_eq!(
                lookup(qname, RecordType::A),
                Some(Lookup::NxDomain),
                "{qname}"
            );
        }
        for qname in [
            "cluster.local.",
            "svc.cluster.local.",
            "default.svc.cluster.local.",
            "pod.cluster.local.",
        ] {
            assert_eq!(
                lookup(qname, RecordType::A),
                Some(Lookup::empty()),
                "{qname}"
            );
        }
        assert_eq!(answers("cluster.local.", RecordType::SOA).len(), 1);
    }

    #[test]
    fn pod_names_carry_their_address() {
        assert_eq!(
            answers("10-1-0-9.default.pod.cluster.local.", RecordType::A),
            ["10.1.0.9"]
        );
        assert_eq!(
            lookup("10-1-0.default.pod.cluster.local.", RecordType::A),
            Some(Lookup::NxDomain)
        );
        assert_eq!(
            lookup("10-1-0-300.default.pod.cluster.local.", RecordType::A),
            Some(Lookup::NxDomain)
        );
    }

    #[test]
    fn other_names_are_forwarded() {
        for qname in [
            "www.example.test.",
            "cluster.local.example.",
            "local.",
            "xcluster.local.",
        ] {
            assert_eq!(lookup(qname, RecordType::A), None, "{qname}");
        }
        let zone = Zone::new("edge.example");
        assert_eq!(
            cluster_lookup(
                &table(),
                &zone,
                &name("web.default.svc.edge.example."),
                RecordType::A
            ),
            Some(Lookup::Found {
                answers: address_records(
                    &name("web.default.svc.edge.example."),
                    [ip("10.96.0.10")],
                    RecordType::A
                ),
                additionals: vec![],
            })
        );
        assert_eq!(
            cluster_lookup(
                &table(),
                &zone,
                &name("web.default.svc.cluster.local."),
                RecordType::A
            ),
            None
        );
    }

    #[test]
    fn resolv_conf_parsing_follows_the_kubelet() {
        let conf = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.2\nsearch a.example. b.example\n; other\nnameserver fe80::1%eth0\nsearch c.example\noptions ndots:2 edns0\nnameserver\n",
        );
        assert_eq!(conf.nameservers, ["10.0.0.2", "fe80::1%eth0"]);
        assert_eq!(conf.searches, ["c.example"], "the last search line wins");
        assert_eq!(conf.options, ["ndots:2", "edns0"]);
        let own = ip("169.254.96.16");
        let conf = ResolvConf::parse(
            "nameserver 169.254.96.16\nnameserver 10.0.0.2\nnameserver bogus\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n",
        );
        assert_eq!(
            upstream_nameservers(&conf, own),
            [ip("10.0.0.2"), ip("fe80::1")]
        );
    }
}
