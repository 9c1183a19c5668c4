//! Resource usage for a stats stream (`kubectl top`, the kubelet's `/stats/summary` and
//! `/metrics/resource` at the cloud): the node from `/proc`, this node's running pods and their
//! containers from the CRI's stats calls.
//!
//! Node CPU is the busy time of `/proc/stat` (every field but idle and iowait), in USER_HZ
//! ticks, which Linux fixes at 100 a second for user space on every architecture it exports
//! `/proc/stat` from; the rate in nano-cores is taken between this sample and the previous one
//! ([`Sampler`]), or over 100 ms the first time. Node memory working set is `MemTotal −
//! MemAvailable` of `/proc/meminfo`: like the kubelet's root-cgroup `usage − inactive_file`, it
//! leaves out the page cache the kernel can reclaim.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1 as api;
use proto::stream::stats::{ContainerUsage, Memory, NodeUsage, PodUsage, Summary, Usage};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cri::{Cri, CriError};
use crate::pods::spec::{LABEL_CONTAINER_NAME, LABEL_MANAGED_BY, LABEL_POD_UID, MANAGED_BY};

/// `/proc/stat` ticks per second (USER_HZ).
const USER_HZ: u64 = 100;
/// The interval of the first CPU rate, when there is no earlier sample.
const FIRST_INTERVAL: Duration = Duration::from_millis(100);
/// An earlier sample older than this gives a rate too averaged to be "now": sample again.
const STALE_SAMPLE: Duration = Duration::from_secs(300);

/// Stats could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot read {path}: {source}")]
    Proc {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {what}")]
    Malformed {
        path: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    Cri(#[from] CriError),
}

/// The node's busy CPU time in core-nanoseconds from `/proc/stat` text.
pub fn busy_core_nanos(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    if fields.len() < 8 {
        return None;
    }
    let busy: u64 = fields[..8]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy * (1_000_000_000 / USER_HZ))
}

/// `(MemTotal, MemAvailable)` in bytes from `/proc/meminfo` text.
pub fn memory_bytes(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

fn read(path: &'static str) -> Result<String, StatsError> {
    std::fs::read_to_string(path).map_err(|source| StatsError::Proc { path, source })
}

fn busy_now() -> Result<(Instant, u64), StatsError> {
    let busy = busy_core_nanos(&read("/proc/stat")?).ok_or(StatsError::Malformed {
        path: "/proc/stat",
        what: "cpu line",
    })?;
    Ok((Instant::now(), busy))
}

/// Nano-cores between two samples.
pub fn rate(earlier: (Instant, u64), later: (Instant, u64)) -> Option<u64> {
    let elapsed = later.0.checked_duration_since(earlier.0)?.as_nanos();
    if elapsed == 0 {
        return None;
    }
    let used = u128::from(later.1.checked_sub(earlier.1)?);
    u64::try_from(used * 1_000_000_000 / elapsed).ok()
}

/// Keeps the node's last CPU sample, so successive stats give a rate over the time between
/// them.
#[derive(Debug, Default)]
pub struct Sampler {
    last: Option<(Instant, u64)>,
}

impl Sampler {
    /// The node's cumulative busy time and its current rate.
    async fn cpu(&mut self) -> Result<(u64, Option<u64>), StatsError> {
        let earlier = match self.last {
            Some(last)
                if last.0.elapsed() >= Duration::from_millis(10)
                    && last.0.elapsed() < STALE_SAMPLE =>
            {
                last
            }
            _ => {
                let first = busy_now()?;
                tokio::time::sleep(FIRST_INTERVAL).await;
                first
            }
        };
        let now = busy_now()?;
        self.last = Some(now);
        Ok((now.1, rate(earlier, now)))
    }
}

fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap_or_default()
}

/// An RFC 3339 time from CRI nanoseconds since the epoch.
fn from_nanos(nanos: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .map(rfc3339)
        .unwrap_or_default()
}

fn value(v: &Option<api::UInt64Value>) -> Option<u64> {
    v.as_ref().map(|v| v.value)
}

fn cpu(usage: Option<&api::CpuUsage>) -> Usage {
    let Some(u) = usage else {
        return Usage::default();
    };
    Usage {
        time: from_nanos(u.timestamp),
        usage_core_nano_seconds: value(&u.usage_core_nano_seconds).unwrap_or_default(),
        usage_nano_cores: value(&u.usage_nano_cores),
    }
}

fn memory(usage: Option<&api::MemoryUsage>) -> Memory {
    let Some(u) = usage else {
        return Memory::default();
    };
    Memory {
        time: from_nanos(u.timestamp),
        working_set_bytes: value(&u.working_set_bytes).unwrap_or_default(),
        usage_bytes: value(&u.usage_bytes),
        rss_bytes: value(&u.rss_bytes),
        available_bytes: value(&u.available_bytes),
    }
}

/// The node's usage and that of its running pods.
pub async fn collect(
    node_name: &str,
    cri: &Cri,
    sampler: &tokio::sync::Mutex<Sampler>,
) -> Result<Summary, StatsError> {
    let now = OffsetDateTime::now_utc();
    let (busy, nano_cores) = sampler.lock().await.cpu().await?;
    let (total, available) =
        memory_bytes(&read("/proc/meminfo")?).ok_or(StatsError::Malformed {
            path: "/proc/meminfo",
            what: "MemTotal or MemAvailable",
        })?;
    let uptime: f64 = read("/proc/uptime")?
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(StatsError::Malformed {
            path: "/proc/uptime",
            what: "uptime",
        })?;
    let started = now - time::Duration::seconds_f64(uptime);
    let node = NodeUsage {
        node_name: node_name.to_string(),
        start_time: rfc3339(started),
        cpu: Usage {
            time: rfc3339(now),
            usage_core_nano_seconds: busy,
            usage_nano_cores: nano_cores,
        },
        memory: Memory {
            time: rfc3339(now),
            working_set_bytes: total.saturating_sub(available),
            usage_bytes: Some(total.saturating_sub(available)),
            rss_bytes: None,
            available_bytes: Some(available),
        },
    };
    Ok(Summary {
        node,
        pods: pods(cri).await?,
    })
}

/// This node's running pods (ready sandboxes labelled as edgecore's) with their containers.
async fn pods(cri: &Cri) -> Result<Vec<PodUsage>, StatsError> {
    let ours = HashMap::from([(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string())]);
    let sandboxes: Vec<api::PodSandbox> = cri
        .list_pod_sandboxes(ours.clone())
        .await?
        .into_iter()
        .filter(|s| s.state == api::PodSandboxState::SandboxReady as i32)
        .collect();
    // A runtime without sandbox stats still gives the containers' (the pod is their sum then).
    let sandbox_stats: HashMap<String, api::PodSandboxStats> = cri
        .list_pod_sandbox_stats(ours.clone())
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| Some((s.attributes.as_ref()?.id.clone(), s)))
        .collect();
    let containers: HashMap<String, api::Container> = cri
        .list_containers(ours.clone())
        .await?
        .into_iter()
        .filter(|c| c.state == api::ContainerState::ContainerRunning as i32)
        .map(|c| (c.id.clone(), c))
        .collect();
    let mut by_pod: HashMap<String, Vec<ContainerUsage>> = HashMap::new();
    for stats in cri.list_container_stats(ours).await? {
        let Some(attributes) = &stats.attributes else {
            continue;
        };
        let Some(container) = containers.get(&attributes.id) else {
            continue;
        };
        let uid = container
            .labels
            .get(LABEL_POD_UID)
            .cloned()
            .unwrap_or_default();
        let name = container
            .labels
            .get(LABEL_CONTAINER_NAME)
            .cloned()
            .or_else(|| container.metadata.as_ref().map(|m| m.name.clone()))
            .unwrap_or_default();
        by_pod.entry(uid).or_default().push(ContainerUsage {
            name,
            start_time: from_nanos(container.created_at),
            cpu: cpu(stats.cpu.as_ref()),
            memory: memory(stats.memory.as_ref()),
        });
    }
    let mut pods = Vec::new();
    for sandbox in sandboxes {
        let Some(meta) = &sandbox.metadata else {
            continue;
        };
        let containers = by_pod.remove(&meta.uid).unwrap_or_default();
        let linux = sandbox_stats
            .get(&sandbox.id)
            .and_then(|s| s.linux.as_ref());
        let (pod_cpu, pod_memory) = match linux {
            Some(l) if l.cpu.is_some() && l.memory.is_some() => {
                (cpu(l.cpu.as_ref()), memory(l.memory.as_ref()))
            }
            _ => sum(&containers),
        };
        pods.push(PodUsage {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            uid: meta.uid.clone(),
            start_time: from_nanos(sandbox.created_at),
            cpu: pod_cpu,
            memory: pod_memory,
            containers,
        });
    }
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(pods)
}

/// A pod's usage as the sum of its containers'.
fn sum(containers: &[ContainerUsage]) -> (Usage, Memory) {
    let time = containers
        .iter()
        .map(|c| c.cpu.time.clone())
        .max()
        .unwrap_or_default();
    let cpu = Usage {
        time: time.clone(),
        usage_core_nano_seconds: containers
            .iter()
            .map(|c| c.cpu.usage_core_nano_seconds)
            .sum(),
        usage_nano_cores: containers
            .iter()
            .map(|c| c.cpu.usage_nano_cores)
            .sum::<Option<u64>>(),
    };
    let memory = Memory {
        time,
        working_set_bytes: containers.iter().map(|c| c.memory.working_set_bytes).sum(),
        ..Default::default()
    };
    (cpu, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_idle_and_iowait_out() {
        let stat = "cpu  100 20 30 5000 40 5 6 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        // (100 + 20 + 30 + 5 + 6 + 7) ticks of 10 ms.
        assert_eq!(busy_core_nanos(stat), Some(168 * 10_000_000));
        assert_eq!(busy_core_nanos("cpu0 1 2 3\n"), None);
        assert_eq!(busy_core_nanos("cpu  1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn working_set_comes_from_total_and_available() {
        let meminfo =
            "MemTotal:        2048 kB\nMemFree:          100 kB\nMemAvailable:     512 kB\n";
        assert_eq!(memory_bytes(meminfo), Some((2048 * 1024, 512 * 1024)));
        assert_eq!(memory_bytes("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn rate_is_nano_cores_over_the_interval() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(500);
        // 250 ms of CPU in 500 ms: half a core.
        assert_eq!(rate((t0, 0), (t1, 250_000_000)), Some(500_000_000));
        assert_eq!(rate((t0, 10), (t0, 20)), None);
        assert_eq!(rate((t0, 20), (t1, 10)), None);
    }

    #[tokio::test]
    async fn this_machine_gives_a_node_sample_and_a_rate() {
        let mut sampler = Sampler::default();
        let (busy, first) = sampler.cpu().await.expect("cpu");
        assert!(busy > 0);
        assert!(first.is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (later, _) = sampler.cpu().await.expect("cpu");
        assert!(later >= busy);
        let (total, available) =
            memory_bytes(&std::fs::read_to_string("/proc/meminfo").expect("meminfo"))
                .expect("parsed");
        assert!(total > 0 && available <= total);
    }
}
