//! This gateway as a Kubernetes Node, reported the way a kubelet reports it: node info,
//! capacity and allocatable, addresses and the four conditions (MemoryPressure, DiskPressure,
//! PIDPressure, Ready) with transition times the edge keeps. The [`Reporter`] puts the whole
//! status in `Hello` (the first write after a connect) and decides when a session reports it
//! again. [docs/nodes.md](../../docs/nodes.md) says where each field comes from.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use proto::NodeInfo;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cri::Cri;

/// Memory pressure below this much available memory (the kubelet's default hard eviction
/// threshold `memory.available<100Mi`).
const MEMORY_PRESSURE_BYTES: u64 = 100 * 1024 * 1024;
/// Disk pressure below this fraction free on the data directory's filesystem (the kubelet's
/// `nodefs.available<10%`).
const DISK_PRESSURE_FRACTION: f64 = 0.10;
/// How long a report waits for the runtime's `Version`: the session loop waits for the report,
/// so a hung runtime must not hold up heartbeats.
const RUNTIME_VERSION_TIMEOUT: Duration = Duration::from_secs(2);
/// The kubelet's default `--max-pods`.
pub const DEFAULT_MAX_PODS: u32 = 110;
/// How often a session looks at the node status and reports it if it changed (the kubelet's
/// `nodeStatusUpdateFrequency`).
pub const STATUS_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// A session reports the status at least this often even when nothing changed (the kubelet's
/// `nodeStatusReportFrequency`); the Lease, renewed by cloudcore, is the liveness signal.
pub const STATUS_REPORT_FREQUENCY: Duration = Duration::from_secs(300);
/// The port written as `daemonEndpoints.kubeletEndpoint.Port`: nothing answers it on a gateway
/// yet, so the apiserver's `logs`/`exec` fail with "connection refused" (docs/nodes.md).
pub const KUBELET_PORT: i32 = 10250;

/// Settings of the Node the edge reports (`edgecore run --max-pods`, `--system-reserved`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// `pods` in capacity and allocatable.
    pub max_pods: u32,
    /// Subtracted from capacity to give allocatable.
    pub reserved: Reserved,
}

impl Default for NodeConfig {
    /// The kubelet's defaults: 110 pods, nothing reserved.
    fn default() -> Self {
        NodeConfig {
            max_pods: DEFAULT_MAX_PODS,
            reserved: Reserved::default(),
        }
    }
}

/// Resources kept back from pods, in the kubelet's `--system-reserved` syntax
/// (`cpu=100m,memory=100Mi,ephemeral-storage=1Gi`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reserved {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
}

/// A `--system-reserved` value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReservedError {
    #[error("expected RESOURCE=QUANTITY, got {0:?}")]
    Malformed(String),
    #[error("unsupported resource {0:?} (cpu, memory, ephemeral-storage)")]
    UnknownResource(String),
    #[error("{resource}: invalid quantity {quantity:?}")]
    BadQuantity { resource: String, quantity: String },
}

impl FromStr for Reserved {
    type Err = ReservedError;

    fn from_str(text: &str) -> Result<Self, ReservedError> {
        let mut reserved = Reserved::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (resource, quantity) = pair
                .split_once('=')
                .ok_or_else(|| ReservedError::Malformed(pair.to_string()))?;
            let (resource, quantity) = (resource.trim(), quantity.trim());
            let bad = || ReservedError::BadQuantity {
                resource: resource.to_string(),
                quantity: quantity.to_string(),
            };
            let millis = quantity_millis(quantity).ok_or_else(bad)?;
            let whole = || u64::try_from(millis.div_ceil(1000)).map_err(|_| bad());
            match resource {
                "cpu" => reserved.cpu_millis = u64::try_from(millis).map_err(|_| bad())?,
                "memory" => reserved.memory_bytes = whole()?,
                "ephemeral-storage" => reserved.ephemeral_storage_bytes = whole()?,
                other => return Err(ReservedError::UnknownResource(other.to_string())),
            }
        }
        Ok(reserved)
    }
}

/// A Kubernetes quantity (`100m`, `0.5`, `100Mi`, `1G`) in thousandths of its unit, rounded
/// up as `Quantity.MilliValue` does. Exponent forms (`1e3`) and negative values are refused.
fn quantity_millis(text: &str) -> Option<u128> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "m" => 1,
        "" => 1_000,
        "k" => 1_000_000,
        "M" => 1_000_000_000,
        "G" => 1_000_000_000_000,
        "T" => 1_000_000_000_000_000,
        "P" => 1_000_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000_000,
        binary => {
            let power = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
                .iter()
                .position(|s| *s == binary)?;
            1_000 * 1024u128.pow(power as u32 + 1)
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let value: u128 = digits.parse().ok()?;
    let scale = 10u128.checked_pow(fraction.len() as u32)?;
    Some(value.checked_mul(multiplier)?.div_ceil(scale))
}

/// CPU in the API's form: whole cores when exact, else millicores.
fn format_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Bytes in the API's form: `Ki` when exact (as the kubelet reports memory), else bytes.
fn format_bytes(bytes: u64) -> String {
    if bytes.is_multiple_of(1024) {
        format!("{}Ki", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

/// What this machine is and has, read at each report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// `PRETTY_NAME` from /etc/os-release.
    pub os_image: String,
    pub kernel_version: String,
    /// Go's name (`amd64`, `arm64`), as Kubernetes uses.
    pub architecture: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    /// `<runtime_name>://<runtime_version>` from the CRI, empty without a runtime.
    pub container_runtime_version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Size of the data directory's filesystem.
    pub ephemeral_storage_bytes: u64,
    pub memory_pressure: bool,
    pub disk_pressure: bool,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `PRETTY_NAME` from an os-release file, unquoted; "Linux" without one (as cAdvisor, which
/// the kubelet asks, answers).
fn os_image(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|line| line.trim().strip_prefix("PRETTY_NAME="))
        .map(|value| {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            unquoted.replace("\\\"", "\"")
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "Linux".into())
}

/// A /proc/meminfo field in bytes.
fn meminfo_bytes(meminfo: &str, field: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Kubernetes names architectures the Go way.
pub fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Facts {
    /// Reads this machine; `runtime` is the CRI client, if pods run here.
    pub async fn read(data_dir: &Path, runtime: Option<&Cri>) -> Facts {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let disk = rustix::fs::statvfs(data_dir).ok();
        let container_runtime_version = match runtime {
            Some(cri) => match tokio::time::timeout(RUNTIME_VERSION_TIMEOUT, cri.version()).await {
                Ok(Ok(v)) => format!("{}://{}", v.runtime_name, v.runtime_version),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "the runtime does not answer Version");
                    String::new()
                }
                Err(_) => {
                    tracing::debug!("the runtime does not answer Version in time");
                    String::new()
                }
            },
            None => String::new(),
        };
        let machine_id = Some(read_trimmed("/etc/machine-id"))
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| read_trimmed("/var/lib/dbus/machine-id"));
        Facts {
            os_image: os_image(&std::fs::read_to_string("/etc/os-release").unwrap_or_default()),
            kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
            architecture: go_arch(std::env::consts::ARCH).to_string(),
            machine_id,
            system_uuid: read_trimmed("/sys/class/dmi/id/product_uuid"),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            container_runtime_version,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_bytes: meminfo_bytes(&meminfo, "MemTotal").unwrap_or(0),
            ephemeral_storage_bytes: disk
                .as_ref()
                .map(|s| s.f_blocks.saturating_mul(s.f_frsize))
                .unwrap_or(0),
            memory_pressure: meminfo_bytes(&meminfo, "MemAvailable")
                .is_some_and(|a| a < MEMORY_PRESSURE_BYTES),
            disk_pressure: disk.as_ref().is_some_and(|s| {
                s.f_blocks > 0 && (s.f_bavail as f64 / s.f_blocks as f64) < DISK_PRESSURE_FRACTION
            }),
        }
    }
}

/// One condition type the edge reports, with the kubelet's reasons.
struct ConditionKind {
    kind: &'static str,
    /// (reason, message) when the condition is True and when it is False.
    when_true: (&'static str, &'static str),
    when_false: (&'static str, &'static str),
}

const CONDITIONS: [ConditionKind; 4] = [
    ConditionKind {
        kind: "MemoryPressure",
        when_true: (
            "KubeletHasInsufficientMemory",
            "edgecore has insufficient memory available",
        ),
        when_false: (
            "KubeletHasSufficientMemory",
            "edgecore has sufficient memory available",
        ),
    },
    ConditionKind {
        kind: "DiskPressure",
        when_true: ("KubeletHasDiskPressure", "edgecore has disk pressure"),
        when_false: ("KubeletHasNoDiskPressure", "edgecore has no disk pressure"),
    },
    ConditionKind {
        kind: "PIDPressure",
        when_true: (
            "KubeletHasInsufficientPID",
            "edgecore has insufficient PID available",
        ),
        when_false: (
            "KubeletHasSufficientPID",
            "edgecore has sufficient PID available",
        ),
    },
    ConditionKind {
        kind: "Ready",
        when_true: ("KubeletReady", "edgecore is posting ready status"),
        when_false: ("KubeletNotReady", "edgecore is not ready"),
    },
];

/// The edge's own condition history: each condition's status and when it last changed on this
/// gateway (since edgecore started, which counts as a change).
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    since: BTreeMap<&'static str, (bool, OffsetDateTime)>,
}

impl Conditions {
    /// Records the statuses seen at `now`; a status that differs from the last one starts at
    /// `now`.
    fn observe(&mut self, statuses: [(&'static str, bool); 4], now: OffsetDateTime) {
        for (kind, status) in statuses {
            match self.since.get(kind) {
                Some((last, _)) if *last == status => {}
                _ => {
                    self.since.insert(kind, (status, now));
                }
            }
        }
    }

    /// The conditions as API values, all four, each with its own transition time.
    fn to_json(&self, now: OffsetDateTime) -> Vec<Value> {
        CONDITIONS
            .iter()
            .filter_map(|c| {
                let (status, since) = self.since.get(c.kind)?;
                let (reason, message) = if *status { c.when_true } else { c.when_false };
                Some(json!({
                    "type": c.kind,
                    "status": if *status { "True" } else { "False" },
                    "reason": reason,
                    "message": message,
                    "lastHeartbeatTime": rfc3339(now),
                    "lastTransitionTime": rfc3339(*since),
                }))
            })
            .collect()
    }
}

/// RFC 3339 in whole seconds, as Kubernetes' `Time`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The whole node status, as a kubelet would post it.
fn node_status(
    facts: &Facts,
    config: &NodeConfig,
    conditions: &Conditions,
    host_ip: Option<IpAddr>,
    now: OffsetDateTime,
) -> Value {
    let cpu_millis = u64::from(facts.cpus) * 1000;
    let capacity = json!({
        "cpu": format_cpu(cpu_millis),
        "memory": format_bytes(facts.memory_bytes),
        "ephemeral-storage": format_bytes(facts.ephemeral_storage_bytes),
        "pods": config.max_pods.to_string(),
    });
    let reserved = &config.reserved;
    let allocatable = json!({
        "cpu": format_cpu(cpu_millis.saturating_sub(reserved.cpu_millis)),
        "memory": format_bytes(facts.memory_bytes.saturating_sub(reserved.memory_bytes)),
        "ephemeral-storage": format_bytes(
            facts.ephemeral_storage_bytes.saturating_sub(reserved.ephemeral_storage_bytes),
        ),
        "pods": config.max_pods.to_string(),
    });
    // InternalIP only: a Hostname address would make the apiserver (which prefers Hostname)
    // resolve a name in the cloud's DNS, which may be another machine (docs/nodes.md).
    let addresses: Vec<Value> = host_ip
        .into_iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    json!({
        "capacity": capacity,
        "allocatable": allocatable,
        "addresses": addresses,
        "conditions": conditions.to_json(now),
        "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
        "nodeInfo": {
            "machineID": facts.machine_id,
            "systemUUID": facts.system_uuid,
            "bootID": facts.boot_id,
            "kernelVersion": facts.kernel_version,
            "osImage": facts.os_image,
            "containerRuntimeVersion": facts.container_runtime_version,
            "kubeletVersion": format!("v{}-edgecore", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": facts.architecture,
        },
    })
}

/// Drops `lastTransitionTime` from conditions that did not change on the gateway after
/// `session_start`: the connect write (from `Hello`) set those against what the API showed, and
/// a strategic merge keeps a field the patch leaves out. A transition during the session
/// carries its own time.
fn keep_session_transitions(
    status: &mut Value,
    conditions: &Conditions,
    session_start: OffsetDateTime,
) {
    let Some(list) = status["conditions"].as_array_mut() else {
        return;
    };
    for condition in list {
        let before = condition["type"]
            .as_str()
            .and_then(|kind| conditions.since.get(kind))
            .is_none_or(|(_, since)| *since <= session_start);
        if before && let Some(map) = condition.as_object_mut() {
            map.remove("lastTransitionTime");
        }
    }
}

/// The status without heartbeat times: what must differ for a report to be due early.
fn without_heartbeats(status: &Value) -> Value {
    let mut status = status.clone();
    if let Some(conditions) = status["conditions"].as_array_mut() {
        for c in conditions.iter_mut().filter_map(Value::as_object_mut) {
            c.remove("lastHeartbeatTime");
        }
    }
    status
}

/// Builds the node status and decides when a session reports it (the kubelet's status
/// manager). One per `edgecore run`; the condition history outlives sessions.
#[derive(Debug)]
pub struct Reporter {
    data_dir: PathBuf,
    config: NodeConfig,
    runtime: Option<Cri>,
    conditions: Conditions,
    /// The runtime's last answer to `Version`, reported while it does not answer.
    runtime_version: String,
    /// The session's start, its host IP, and the last report (without heartbeats) with when it
    /// was put.
    session: Option<SessionReports>,
}

#[derive(Debug)]
struct SessionReports {
    started: OffsetDateTime,
    host_ip: Option<IpAddr>,
    last: Value,
    last_at: Instant,
}

impl Reporter {
    /// A reporter for the gateway whose data dir is `data_dir`; `runtime` answers `Version`.
    pub fn new(data_dir: PathBuf, config: NodeConfig, runtime: Option<Cri>) -> Reporter {
        Reporter {
            data_dir,
            config,
            runtime,
            conditions: Conditions::default(),
            runtime_version: String::new(),
            session: None,
        }
    }

    async fn status(&mut self, host_ip: Option<IpAddr>) -> Value {
        let mut facts = Facts::read(&self.data_dir, self.runtime.as_ref()).await;
        if facts.container_runtime_version.is_empty() {
            facts.container_runtime_version = self.runtime_version.clone();
        } else {
            self.runtime_version = facts.container_runtime_version.clone();
        }
        let now = OffsetDateTime::now_utc();
        self.conditions.observe(
            [
                ("MemoryPressure", facts.memory_pressure),
                ("DiskPressure", facts.disk_pressure),
                ("PIDPressure", false),
                ("Ready", true),
            ],
            now,
        );
        node_status(&facts, &self.config, &self.conditions, host_ip, now)
    }

    /// Starts a session: the node info for `Hello`, carrying the whole status with the edge's
    /// own transition times (cloudcore reconciles them with what the API shows).
    pub async fn hello(&mut self, host_ip: Option<IpAddr>) -> NodeInfo {
        let status = self.status(host_ip).await;
        let node_info = NodeInfo {
            node_status: serde_json::to_vec(&status).unwrap_or_default(),
            ..collect()
        };
        self.session = Some(SessionReports {
            started: OffsetDateTime::now_utc(),
            host_ip,
            last: Value::Null,
            last_at: Instant::now(),
        });
        node_info
    }

    /// The report that goes at session start: the status without conditions, so that it
    /// replaces a report left from an earlier session without touching the conditions the
    /// connect write set.
    pub async fn session_start_report(&mut self) -> Value {
        let host_ip = self.session.as_ref().and_then(|s| s.host_ip);
        let mut status = self.status(host_ip).await;
        if let Some(map) = status.as_object_mut() {
            map.remove("conditions");
        }
        if let Some(session) = &mut self.session {
            session.last = without_heartbeats(&status);
            session.last_at = Instant::now();
        }
        status
    }

    /// The report due now in this session, if any: when the status changed since the last one,
    /// or [`STATUS_REPORT_FREQUENCY`] after it.
    pub async fn due(&mut self) -> Option<Value> {
        let host_ip = self.session.as_ref()?.host_ip;
        let mut status = self.status(host_ip).await;
        let session = self.session.as_mut()?;
        keep_session_transitions(&mut status, &self.conditions, session.started);
        let comparable = without_heartbeats(&status);
        if comparable == session.last && session.last_at.elapsed() < STATUS_REPORT_FREQUENCY {
            return None;
        }
        session.last = comparable;
        session.last_at = Instant::now();
        Some(status)
    }
}

/// The node info fields of `Hello` other than the status (what an older cloud reads).
pub fn collect() -> NodeInfo {
    NodeInfo {
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        os: std::env::consts::OS.to_string(),
        arch: go_arch(std::env::consts::ARCH).to_string(),
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
        edgecore_version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: meminfo_bytes(
            &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
            "MemTotal",
        )
        .unwrap_or(0),
        node_status: Vec::new(),
    }
}

/// The address this gateway uses to reach `peer` (no packet is sent): the node's host IP.
pub fn host_ip(peer: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if peer.is_ipv6() {
        "[::]:0".parse().ok()?
    } else {
        "0.0.0.0:0".parse().ok()?
    };
    let socket = UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// The gateway of the IPv4 default route in /proc/net/route.
fn default_gateway(route_table: &str) -> Option<std::net::Ipv4Addr> {
    route_table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway, mask) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        if *destination != "00000000" || *mask != "00000000" {
            return None;
        }
        // The kernel prints the network-order address as a native integer.
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        Some(std::net::Ipv4Addr::from(raw.to_ne_bytes()))
    })
}

/// The primary address of the default-route interface (what the gateway uses to reach the
/// world), or `None` without a default route: the host IP when the cloud's name does not
/// resolve (an offline start).
pub fn default_route_ip() -> Option<IpAddr> {
    let gateway = default_gateway(&std::fs::read_to_string("/proc/net/route").ok()?)?;
    host_ip(SocketAddr::new(IpAddr::V4(gateway), 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).expect("time")
    }

    fn facts() -> Facts {
        Facts {
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel_version: "6.1.0".into(),
            architecture: "arm64".into(),
            machine_id: "m".into(),
            system_uuid: String::new(),
            boot_id: "b".into(),
            container_runtime_version: "containerd://1.6.20".into(),
            cpus: 4,
            memory_bytes: 2 * 1024 * 1024 * 1024,
            ephemeral_storage_bytes: 10 * 1024 * 1024 * 1024,
            memory_pressure: false,
            disk_pressure: false,
        }
    }

    #[test]
    fn os_image_is_pretty_name() {
        let debian = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(os_image(debian), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_image("PRETTY_NAME='Alpine v3'\n"), "Alpine v3");
        assert_eq!(os_image("PRETTY_NAME=Plain\n"), "Plain");
        assert_eq!(os_image("PRETTY_NAME=\"\"\nID=x\n"), "Linux");
        assert_eq!(os_image(""), "Linux");
    }

    #[test]
    fn parses_meminfo_fields() {
        let meminfo = "MemTotal:        1000 kB\nMemFree:  5 kB\nMemAvailable:   2 kB\n";
        assert_eq!(meminfo_bytes(meminfo, "MemTotal"), Some(1_024_000));
        assert_eq!(meminfo_bytes(meminfo, "MemAvailable"), Some(2048));
        assert_eq!(meminfo_bytes("garbage", "MemTotal"), None);
    }

    #[test]
    fn quantities_in_kubelet_syntax() {
        let cases = [
            ("100m", Some(100)),
            ("1", Some(1_000)),
            ("0.5", Some(500)),
            ("1.5k", Some(1_500_000)),
            ("100Mi", Some(100 * 1024 * 1024 * 1000)),
            ("1Gi", Some(1024 * 1024 * 1024 * 1000)),
            ("1G", Some(1_000_000_000_000)),
            ("0.0001", Some(1)),
            ("", None),
            (".", None),
            ("1.2.3", None),
            ("-1", None),
            ("1e3", None),
            ("10Xi", None),
            ("100Mi ", None),
        ];
        for (text, want) in cases {
            assert_eq!(quantity_millis(text), want, "{text:?}");
        }
    }

    #[test]
    fn parses_system_reserved() {
        let reserved: Reserved = "cpu=100m,memory=100Mi,ephemeral-storage=1Gi"
            .parse()
            .expect("valid");
        assert_eq!(
            reserved,
            Reserved {
                cpu_millis: 100,
                memory_bytes: 100 * 1024 * 1024,
                ephemeral_storage_bytes: 1024 * 1024 * 1024,
            }
        );
        assert_eq!("".parse::<Reserved>(), Ok(Reserved::default()));
        assert_eq!(
            " cpu = 1 ".parse::<Reserved>().map(|r| r.cpu_millis),
            Ok(1000)
        );
        assert_eq!(
            "cpu".parse::<Reserved>(),
            Err(ReservedError::Malformed("cpu".into()))
        );
        assert_eq!(
            "gpu=1".parse::<Reserved>(),
            Err(ReservedError::UnknownResource("gpu".into()))
        );
        assert_eq!(
            "memory=lots".parse::<Reserved>(),
            Err(ReservedError::BadQuantity {
                resource: "memory".into(),
                quantity: "lots".into()
            })
        );
    }

    #[test]
    fn allocatable_is_capacity_minus_reserved_never_negative() {
        let mut conditions = Conditions::default();
        let now = at("2026-01-01T00:00:00Z");
        conditions.observe(
            [
                ("MemoryPressure", false),
                ("DiskPressure", false),
                ("PIDPressure", false),
                ("Ready", true),
            ],
            now,
        );
        let config = NodeConfig {
            max_pods: 20,
            reserved: "cpu=100m,memory=100Mi,ephemeral-storage=1Gi"
                .parse()
                .expect("valid"),
        };
        let status = node_status(&facts(), &config, &conditions, None, now);
        assert_eq!(
            status["capacity"],
            json!({"cpu": "4", "memory": "2097152Ki", "ephemeral-storage": "10485760Ki", "pods": "20"})
        );
        assert_eq!(
            status["allocatable"],
            json!({"cpu": "3900m", "memory": "1994752Ki", "ephemeral-storage": "9437184Ki", "pods": "20"})
        );
        let greedy = NodeConfig {
            max_pods: 110,
            reserved: "cpu=8,memory=1Ti,ephemeral-storage=1Pi"
                .parse()
                .expect("valid"),
        };
        let status = node_status(&facts(), &greedy, &conditions, None, now);
        assert_eq!(
            status["allocatable"],
            json!({"cpu": "0", "memory": "0Ki", "ephemeral-storage": "0Ki", "pods": "110"})
        );
        assert_eq!(format_bytes(1000), "1000");
    }

    #[test]
    fn status_reads_like_a_kubelets() {
        let mut conditions = Conditions::default();
        let now = at("2026-01-01T00:00:00Z");
        conditions.observe(
            [
                ("MemoryPressure", false),
                ("DiskPressure", true),
                ("PIDPressure", false),
                ("Ready", true),
            ],
            now,
        );
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let status = node_status(&facts(), &NodeConfig::default(), &conditions, Some(ip), now);
        assert_eq!(
            status["addresses"],
            json!([{"type": "InternalIP", "address": "192.0.2.7"}])
        );
        assert_eq!(
            status["nodeInfo"]["osImage"],
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(
            status["nodeInfo"]["containerRuntimeVersion"],
            "containerd://1.6.20"
        );
        assert_eq!(status["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250);
        let types: Vec<&str> = status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| c["type"].as_str().expect("type"))
            .collect();
        assert_eq!(
            types,
            ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
        );
        assert_eq!(status["conditions"][1]["reason"], "KubeletHasDiskPressure");
        assert_eq!(
            status["conditions"][3]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
    }

    #[test]
    fn transition_times_change_only_on_transitions() {
        let mut conditions = Conditions::default();
        let statuses = |memory| {
            [
                ("MemoryPressure", memory),
                ("DiskPressure", false),
                ("PIDPressure", false),
                ("Ready", true),
            ]
        };
        let t0 = at("2026-01-01T00:00:00Z");
        let t1 = at("2026-01-01T00:00:10Z");
        let t2 = at("2026-01-01T00:00:20Z");
        conditions.observe(statuses(false), t0);
        conditions.observe(statuses(false), t1);
        let json = conditions.to_json(t1);
        assert_eq!(json[0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(json[0]["lastHeartbeatTime"], "2026-01-01T00:00:10Z");
        conditions.observe(statuses(true), t2);
        let json = conditions.to_json(t2);
        assert_eq!(json[0]["status"], "True");
        assert_eq!(json[0]["lastTransitionTime"], "2026-01-01T00:00:20Z");
        assert_eq!(json[3]["lastTransitionTime"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn session_reports_carry_only_the_sessions_transitions() {
        let mut conditions = Conditions::default();
        let statuses = |disk| {
            [
                ("MemoryPressure", false),
                ("DiskPressure", disk),
                ("PIDPressure", false),
                ("Ready", true),
            ]
        };
        // Started, and the session began, within the same second.
        let started = at("2026-01-01T01:00:00Z");
        let session = started + time::Duration::milliseconds(300);
        conditions.observe(statuses(false), started);
        let mut status = json!({"conditions": conditions.to_json(session)});
        keep_session_transitions(&mut status, &conditions, session);
        assert!(
            status["conditions"]
                .as_array()
                .expect("conditions")
                .iter()
                .all(|c| c.get("lastTransitionTime").is_none()),
            "{status}"
        );
        let later = at("2026-01-01T01:00:05Z");
        conditions.observe(statuses(true), later);
        let mut status = json!({"conditions": conditions.to_json(later)});
        keep_session_transitions(&mut status, &conditions, session);
        assert_eq!(
            status["conditions"][1]["lastTransitionTime"],
            "2026-01-01T01:00:05Z"
        );
        assert!(status["conditions"][3].get("lastTransitionTime").is_none());
    }

    #[test]
    fn heartbeats_alone_are_no_change() {
        let a = json!({"conditions": [{"type": "Ready", "lastHeartbeatTime": "1"}]});
        let b = json!({"conditions": [{"type": "Ready", "lastHeartbeatTime": "2"}]});
        assert_eq!(without_heartbeats(&a), without_heartbeats(&b));
    }

    #[test]
    fn finds_the_default_gateway() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            default_gateway(table),
            Some(std::net::Ipv4Addr::new(192, 168, 0, 1))
        );
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
    }

    #[tokio::test]
    async fn a_session_reports_at_start_without_conditions_then_only_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reporter = Reporter::new(dir.path().to_path_buf(), NodeConfig::default(), None);
        assert_eq!(reporter.due().await, None, "no session, no report");
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let hello = reporter.hello(Some(ip)).await;
        let status: Value = serde_json::from_slice(&hello.node_status).expect("json");
        assert_eq!(status["conditions"].as_array().map(Vec::len), Some(4));
        assert!(status["conditions"][3]["lastTransitionTime"].is_string());
        assert_eq!(status["addresses"][0]["address"], "192.0.2.7");
        let start = reporter.session_start_report().await;
        assert!(start.get("conditions").is_none(), "{start}");
        assert_eq!(start["nodeInfo"], status["nodeInfo"]);
        // The first check finds the conditions missing from the last report: due, without the
        // transition times the connect write set.
        let first = reporter.due().await.expect("conditions are new");
        let conditions = first["conditions"].as_array().expect("conditions");
        assert_eq!(conditions.len(), 4);
        assert!(
            conditions
                .iter()
                .all(|c| c.get("lastTransitionTime").is_none())
        );
        assert!(
            conditions
                .iter()
                .all(|c| c["lastHeartbeatTime"].is_string())
        );
        // Nothing changed since (this machine's pressure aside): nothing due before 5 min.
        if reporter.due().await.is_some() {
            let facts = Facts::read(dir.path(), None).await;
            panic!("a report without a change: {facts:?}");
        }
    }

    #[tokio::test]
    async fn reads_this_machine() {
        let facts = Facts::read(Path::new("/"), None).await;
        assert!(facts.cpus >= 1);
        assert!(facts.memory_bytes > 0);
        assert!(facts.ephemeral_storage_bytes > 0);
        assert!(!facts.os_image.is_empty());
        assert!(!facts.boot_id.is_empty());
        assert_eq!(facts.container_runtime_version, "");
    }
}
