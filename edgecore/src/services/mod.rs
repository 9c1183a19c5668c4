//! Services at the edge, built in (what KubeEdge leaves to EdgeMesh, and a kubelet node gets
//! from kube-proxy and the cluster DNS): pods on this gateway reach Services by cluster IP and
//! by name, and the LAN reaches NodePorts, from the local store alone ([docs/services.md]).
//!
//! - [`table`]: the service table, rebuilt from the store and the local pods' statuses;
//! - [`proxy`]: the data path, one nftables table of edgecore's own, replaced atomically;
//! - [`dns`]: the cluster DNS server on `--cluster-dns`, forwarding other names upstream;
//! - [`env`]: the Service environment variables the kubelet gives containers.

pub mod dns;
pub mod env;
mod netlink;
pub mod proxy;
pub mod table;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::outbox::Outbox;
use crate::store::Store;
pub use table::ServiceTable;

/// The cluster DNS address by default: a link-local address, as EdgeMesh and NodeLocal
/// DNSCache use, so it can never clash with a pod or Service range.
pub const DEFAULT_CLUSTER_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 96, 16));
/// The cluster domain by default (kubelet's `--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The nftables table (family `ip`) edgecore owns by default.
pub const DEFAULT_NFT_TABLE: &str = "edgecore";
/// The resolver configuration whose nameservers get the names outside the cluster domain.
pub const DEFAULT_DNS_UPSTREAM: &str = "/etc/resolv.conf";

/// Settings of the services at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicesConfig {
    /// Program the data path (`--service-proxy nftables`); `false` for `none`.
    pub proxy: bool,
    /// The nftables table (family `ip`) edgecore creates and alone writes (`--nft-table`).
    pub nft_table: String,
    /// Where the DNS server answers, an address edgecore puts on `lo` (`--cluster-dns`);
    /// `None` (`none`) serves no DNS, and `ClusterFirst` pods get the gateway's resolv.conf, as
    /// with a kubelet without `clusterDNS`.
    pub cluster_dns: Option<IpAddr>,
    /// The cluster domain (`--cluster-domain`).
    pub cluster_domain: String,
    /// The resolv.conf whose nameservers get every other name (`--dns-upstream`).
    pub dns_upstream: PathBuf,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            proxy: true,
            nft_table: DEFAULT_NFT_TABLE.to_string(),
            cluster_dns: Some(DEFAULT_CLUSTER_DNS),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_string(),
            dns_upstream: PathBuf::from(DEFAULT_DNS_UPSTREAM),
        }
    }
}

impl ServicesConfig {
    /// Neither data path nor DNS (in-process test edges and benches); the table is still kept
    /// for the pods' environment variables.
    pub fn disabled() -> ServicesConfig {
        ServicesConfig {
            proxy: false,
            cluster_dns: None,
            ..ServicesConfig::default()
        }
    }
}

/// The services could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("cannot read the local store")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
}

/// The running services: the current table, for the pods' environment variables.
#[derive(Debug, Clone)]
pub struct Services {
    pub table: watch::Receiver<Arc<ServiceTable>>,
    /// What `ClusterFirst` pods get in their resolv.conf; `None` without DNS.
    pub pod_dns: Option<PodDns>,
}

impl Services {
    /// An empty table and no DNS, for tests of code that reads them.
    pub fn detached() -> Services {
        Services {
            table: watch::Sender::new(Arc::new(ServiceTable::default())).subscribe(),
            pod_dns: None,
        }
    }
}

/// The cluster DNS as pods see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDns {
    pub server: IpAddr,
    pub cluster_domain: String,
}

/// How often a cluster DNS that could not start is tried again.
const DNS_RETRY: Duration = Duration::from_secs(5);
/// How long the table task waits after a change for more before rebuilding: a pod's status
/// and its store change often come together.
const DEBOUNCE: Duration = Duration::from_millis(30);
/// A failed apply is tried again after 1 s, doubling to 30 s (sooner when the table changes).
const APPLY_RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(30),
};

/// Builds the table from the store, then keeps it current (store commits, local pod
/// statuses) and starts the data path and the DNS server as `config` says. The first table is
/// built before this returns, so pods started after it see their Services. On `shutdown` the
/// data path's rules and the DNS address are removed (a killed edgecore leaves them in place,
/// and the next start takes them over).
pub fn start(
    config: ServicesConfig,
    data_dir: PathBuf,
    node_name: String,
    store_changed: watch::Receiver<u64>,
    outbox: Arc<Outbox>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<Services, ServicesError> {
    start_with(
        config,
        DataPathHost::default(),
        data_dir,
        node_name,
        store_changed,
        outbox,
        tracker,
        shutdown,
    )
}

/// Where the data path is programmed: how `nft` runs and how hairpin traffic is handled.
#[derive(Debug, Clone, Default)]
pub struct DataPathHost {
    pub nft: proxy::NftCommand,
    /// `None`: decided at start by [`proxy::enable_bridge_netfilter`] in this process's
    /// network namespace (edgecore); tests that program another namespace say it.
    pub hairpin: Option<proxy::Hairpin>,
}

/// [`start`] with the data path programmed as `host` says (tests run `nft` inside a network
/// namespace of their own).
#[allow(clippy::too_many_arguments)]
pub fn start_with(
    config: ServicesConfig,
    host: DataPathHost,
    data_dir: PathBuf,
    node_name: String,
    mut store_changed: watch::Receiver<u64>,
    outbox: Arc<Outbox>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<Services, ServicesError> {
    let store = Store::open_read_only(&data_dir)?;
    let mut current = build_table(&store, &node_name, &outbox)?;
    current.revision = 1;
    let (sender, table) = watch::channel(Arc::new(current.clone()));
    let pod_dns = config.cluster_dns.map(|server| PodDns {
        server,
        cluster_domain: config.cluster_domain.clone(),
    });
    if let Some(address) = config.cluster_dns {
        let (metrics, table) = (outbox.metrics().clone(), table.clone());
        if let Err(e) = dns::spawn(
            address,
            &config,
            table.clone(),
            metrics.clone(),
            tracker,
            shutdown.clone(),
        ) {
            // Not fatal: pods run without the cluster DNS (their resolv.conf names it, and it
            // answers as soon as it can start), and it is tried again every few seconds.
            tracing::error!(
                error = %daemon::error_chain(&e),
                retry_in_s = DNS_RETRY.as_secs(),
                "services: cannot start the cluster DNS"
            );
            let (config, tracker_inner, shutdown) =
                (config.clone(), tracker.clone(), shutdown.clone());
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(DNS_RETRY) => {}
                    }
                    match dns::spawn(
                        address,
                        &config,
                        table.clone(),
                        metrics.clone(),
                        &tracker_inner,
                        shutdown.clone(),
                    ) {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(
                            error = %daemon::error_chain(&e),
                            "services: the cluster DNS still cannot start"
                        ),
                    }
                }
            });
        }
    }
    let mut proxy = config.proxy.then(|| {
        proxy::Proxy::new(
            host.nft,
            config.nft_table.clone(),
            host.hairpin.unwrap_or_else(proxy::enable_bridge_netfilter),
        )
    });
    let metrics = outbox.metrics().clone();
    let mut puts = outbox.subscribe_puts();
    tracker.spawn(async move {
        // The table is applied at once (taking over what a killed edgecore left).
        let mut dirty = proxy.is_some();
        let mut failures = 0u32;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if let (true, Some(p)) = (dirty, proxy.as_mut()) {
                match p.sync(&current).await {
                    Ok((programmed, took)) => {
                        metrics.service_rules_syncs.inc();
                        metrics
                            .service_rules_last_sync_seconds
                            .set(took.as_secs_f64());
                        metrics.services_programmed.set(programmed as i64);
                        tracing::debug!(
                            revision = current.revision,
                            services = programmed,
                            took_ms = took.as_millis() as u64,
                            "services: rules applied"
                        );
                        dirty = false;
                        failures = 0;
                        retry_at = None;
                    }
                    Err(e) => {
                        metrics.service_rules_sync_failures.inc();
                        let delay = APPLY_RETRY.ceiling(failures);
                        failures = failures.saturating_add(1);
                        tracing::error!(
                            error = %daemon::error_chain(&e),
                            retry_in_ms = delay.as_millis() as u64,
                            "services: cannot apply the rules"
                        );
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = store_changed.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                changed = puts.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = sleep_until(retry_at) => {
                    retry_at = None;
                    continue;
                }
            }
            tokio::time::sleep(DEBOUNCE).await;
            store_changed.borrow_and_update();
            puts.borrow_and_update();
            match build_table(&store, &node_name, &outbox) {
                Ok(mut next) if next.services != current.services => {
                    next.revision = current.revision + 1;
                    current = next;
                    sender.send_replace(Arc::new(current.clone()));
                    dirty = proxy.is_some();
                    retry_at = None;
                }
                Ok(_) => {}
                Err(e) => tracing::error!(
                    error = %daemon::error_chain(&e),
                    "services: cannot read the store; keeping the last table"
                ),
            }
        }
        if let Some(mut p) = proxy {
            match p.remove().await {
                Ok(()) => tracing::info!("services: rules removed"),
                Err(e) => tracing::error!(
                    error = %daemon::error_chain(&e),
                    "services: cannot remove the rules"
                ),
            }
        }
    });
    Ok(Services { table, pod_dns })
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The table from the store's Services, EndpointSlices and Pods and the outbox's statuses.
fn build_table(
    store: &Store,
    node_name: &str,
    outbox: &Outbox,
) -> Result<ServiceTable, crate::store::StoreError> {
    let objects = store.list(&table::KINDS)?;
    let pod_statuses = outbox.statuses("Pod");
    Ok(table::build(&table::Inputs {
        node_name,
        objects: &objects,
        pod_statuses: &pod_statuses,
    }))
}

/// `edgecore cleanup`: removes what the services put on this gateway (the nftables table
/// named in `config`, the DNS address on `lo`), for an uninstall after edgecore was killed.
pub async fn cleanup(config: &ServicesConfig) -> Result<(), ServicesError> {
    proxy::cleanup(&config.nft_table).await?;
    if let Some(address) = config.cluster_dns {
        dns::remove_address(address)?;
    }
    Ok(())
}
