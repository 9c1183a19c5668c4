//! Facts about this gateway for the cloud's Node object, read from /proc.

use proto::NodeInfo;

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
    fn collects_this_machine() {
        let info = collect();
        assert_eq!(info.os, "linux");
        assert!(info.cpus >= 1);
        assert!(info.memory_bytes > 0);
        assert!(!info.hostname.is_empty());
    }
}
