//! Facts about this gateway for the cloud's Node object, read from /proc: the node info sent
//! in `Hello`, and the pressure conditions of the node status reported upstream.

use std::path::Path;

use proto::NodeInfo;
use serde_json::{Value, json};

/// Memory pressure below this much available memory (the kubelet's default hard eviction
/// threshold `memory.available<100Mi`).
const MEMORY_PRESSURE_BYTES: u64 = 100 * 1024 * 1024;
/// Disk pressure below this fraction free on the data directory's filesystem (the kubelet's
/// `nodefs.available<10%`).
const DISK_PRESSURE_FRACTION: f64 = 0.10;

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `MemTotal` from /proc/meminfo, in bytes.
fn memory_bytes(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn memory_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Free fraction of the filesystem holding `path`.
fn disk_free_fraction(path: &Path) -> Option<f64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    (stat.f_blocks > 0).then(|| stat.f_bavail as f64 / stat.f_blocks as f64)
}

fn condition(kind: &str, pressure: bool, reason_ok: &str, reason_bad: &str, now: &str) -> Value {
    let (status, reason, message) = if pressure {
        ("True", reason_bad, format!("edgecore reports {kind}"))
    } else {
        ("False", reason_ok, format!("edgecore reports no {kind}"))
    };
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now,
    })
}

/// The node status the edge reports: pressure conditions with the kubelet's reasons.
/// `lastTransitionTime` is left to the cloud side's merge.
pub fn status(data_dir: &Path, now: &str) -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_pressure = memory_available(&meminfo).is_some_and(|a| a < MEMORY_PRESSURE_BYTES);
    let disk_pressure = disk_free_fraction(data_dir).is_some_and(|f| f < DISK_PRESSURE_FRACTION);
    json!({
        "conditions": [
            condition("MemoryPressure", memory_pressure, "KubeletHasSufficientMemory", "KubeletHasInsufficientMemory", now),
            condition("DiskPressure", disk_pressure, "KubeletHasNoDiskPressure", "KubeletHasDiskPressure", now),
            condition("PIDPressure", false, "KubeletHasSufficientPID", "KubeletHasInsufficientPID", now),
        ]
    })
}

/// The address this gateway uses to reach `peer` (no packet is sent): the node's host IP.
pub fn host_ip(peer: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    let any: std::net::SocketAddr = if peer.is_ipv6() {
        "[::]:0".parse().ok()?
    } else {
        "0.0.0.0:0".parse().ok()?
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// Collects the node info sent in `Hello`.
pub fn collect() -> NodeInfo {
    NodeInfo {
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
        edgecore_version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: memory_bytes(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memtotal() {
        let meminfo = "MemTotal:        1000 kB\nMemFree:  5 kB\n";
        assert_eq!(memory_bytes(meminfo), 1_024_000);
        assert_eq!(memory_bytes("garbage"), 0);
    }

    #[test]
    fn parses_memavailable() {
        assert_eq!(
            memory_available("MemTotal: 9 kB\nMemAvailable:   2 kB\n"),
            Some(2048)
        );
        assert_eq!(memory_available("MemTotal: 9 kB\n"), None);
    }

    #[test]
    fn status_has_the_three_pressure_conditions() {
        let status = status(Path::new("/"), "2026-01-01T00:00:00Z");
        let types: Vec<&str> = status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| c["type"].as_str().expect("type"))
            .collect();
        assert_eq!(types, ["MemoryPressure", "DiskPressure", "PIDPressure"]);
        assert_eq!(status["conditions"][2]["status"], "False");
    }

    #[test]
    fn collects_this_machine() {
        let info = collect();
        assert_eq!(info.os, "linux");
        assert!(info.cpus >= 1);
        assert!(info.memory_bytes > 0);
        assert!(!info.hostname.is_empty());
    }
}
