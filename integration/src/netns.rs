//! Network namespaces for partition tests: an edge runs in its own namespace behind a veth
//! pair whose host end stays in the root namespace (where cloudcore listens), and a test cuts
//! the link or drops its packets, then heals it.
//!
//! Needs root and iproute2 (`ip`); [`EdgeNet::drop_packets`] also needs `iptables`. Without
//! them [`EdgeNet::create`] fails saying what is missing: these tests never pass silently.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

/// Where `ip netns add` mounts the namespaces it names.
const NETNS_DIR: &str = "/var/run/netns";
/// Prefix of every namespace this harness creates: `edgenet-PID-N`.
const NS_PREFIX: &str = "edgenet-";
/// Prefix of the host end of the veth pair: `edgenetSLOT` (at most 12 characters).
const HOST_LINK_PREFIX: &str = "edgenet";
/// The edge end of the veth pair, inside the namespace.
const EDGE_LINK: &str = "eth0";
/// /30 subnets in 10.199.0.0/16 (clear of the containerd harness's 10.100.0.0/14).
const SLOTS: u32 = 1 << 14;

/// A network namespace for one edge, linked to the root namespace by a veth pair on its own
/// /30: the host end has [`EdgeNet::host_ip`], the edge end [`EdgeNet::edge_ip`]. Dropping it
/// deletes the namespace, the pair and the rules inside.
#[derive(Debug)]
pub struct EdgeNet {
    name: String,
    /// Empty until the pair exists (so a half-built value still cleans up).
    host_link: String,
    host_ip: Ipv4Addr,
    edge_ip: Ipv4Addr,
}

/// The host and edge addresses of a slot's /30 (`10.199.S/64.(S%64)*4 + 1` and `+ 2`).
fn slot_addresses(slot: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 199, 0, 0)) + (slot % SLOTS) * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

impl EdgeNet {
    /// Creates the namespace `edgenet-PID-N`, a veth pair with the host end `edgenetSLOT` in
    /// the root namespace and `eth0` inside, addresses on the slot's /30, and brings both ends
    /// and the namespace's `lo` up.
    ///
    /// The slot is claimed by creating the host link: the kernel refuses a second link of that
    /// name, so concurrent tests and test processes never share a subnet. Namespaces left by a
    /// process that no longer exists (a killed test run) are deleted first.
    pub fn create() -> anyhow::Result<EdgeNet> {
        if !crate::is_root() {
            bail!(
                "network namespace tests need root (CI runs as root); run the test suite as root"
            );
        }
        if Command::new("ip").arg("-V").output().is_err() {
            bail!("`ip` is not installed: apt-get install iproute2 (.ci/run does)");
        }
        reap_stale_namespaces();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let call = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("{NS_PREFIX}{pid}-{call}");
        ip(&["netns", "add", &name])?;
        let mut net = EdgeNet {
            name,
            host_link: String::new(),
            host_ip: Ipv4Addr::UNSPECIFIED,
            edge_ip: Ipv4Addr::UNSPECIFIED,
        };
        let first = pid.wrapping_mul(97).wrapping_add(call) % SLOTS;
        for slot in (0..SLOTS).map(|i| (first + i) % SLOTS).take(256) {
            let (host_ip, edge_ip) = slot_addresses(slot);
            if subnet_in_use(host_ip)? {
                continue;
            }
            let host_link = format!("{HOST_LINK_PREFIX}{slot}");
            let out = Command::new("ip")
                .args(["link", "add", &host_link, "type", "veth", "peer", "name"])
                .args([EDGE_LINK, "netns", &net.name])
                .output()
                .context("cannot run ip")?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                if stderr.contains("File exists") {
                    continue;
                }
                bail!("ip link add {host_link} failed: {}", stderr.trim());
            }
            net.host_link = host_link;
            net.host_ip = host_ip;
            net.edge_ip = edge_ip;
            break;
        }
        if net.host_link.is_empty() {
            bail!("no free /30 in 10.199.0.0/16 among 256 tried");
        }
        let host_cidr = format!("{}/30", net.host_ip);
        let edge_cidr = format!("{}/30", net.edge_ip);
        ip(&["addr", "add", &host_cidr, "dev", &net.host_link])?;
        ip(&["link", "set", &net.host_link, "up"])?;
        ip(&["-n", &net.name, "addr", "add", &edge_cidr, "dev", EDGE_LINK])?;
        ip(&["-n", &net.name, "link", "set", EDGE_LINK, "up"])?;
        ip(&["-n", &net.name, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// The namespace's name (`ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of the host end, in the root namespace: where cloudcore listens.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The address of the edge end, inside the namespace.
    pub fn edge_ip(&self) -> Ipv4Addr {
        self.edge_ip
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    /// `ip netns exec` execs the program, so the child's pid is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// A command that runs `program` in the namespace's network only (`nsenter --net=PATH
    /// program`), keeping the mount namespace: unlike `ip netns exec`, `/sys` and with it the
    /// cgroup hierarchy stay as they are, which containerd and runc need. nsenter execs the
    /// program, so the child's pid is the program's.
    pub fn enter(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={NETNS_DIR}/{}", self.name))
            .arg("--")
            .arg(program);
        command
    }

    /// Partitions by setting the host end down: no packet crosses the pair. While cut, the
    /// host's connected route to the /30 is gone, so packets the host sends to the edge follow
    /// its default route and are lost there.
    pub fn cut(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_link, "down"])
    }

    /// Partitions with both links up: iptables rules inside the namespace drop every packet
    /// arriving on or leaving by the edge end (`lo` keeps working). The edge's own sends fail
    /// with EPERM; the host's vanish.
    pub fn drop_packets(&self) -> anyhow::Result<()> {
        for rule in self.drop_rules() {
            if !self.iptables("-C", &rule)? {
                self.iptables_ok("-I", &rule)?;
            }
        }
        Ok(())
    }

    /// Undoes [`EdgeNet::cut`] and [`EdgeNet::drop_packets`], whichever is in effect.
    pub fn heal(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_link, "up"])?;
        for rule in self.drop_rules() {
            while self.iptables("-C", &rule)? {
                self.iptables_ok("-D", &rule)?;
            }
        }
        Ok(())
    }

    /// Runs `f` on a fresh thread that has entered the namespace (`setns` affects only the
    /// calling thread), e.g. to connect to a port bound to 127.0.0.1 inside it.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in_namespace(&self.name, f).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn drop_rules(&self) -> [[&'static str; 5]; 2] {
        [
            ["INPUT", "-i", EDGE_LINK, "-j", "DROP"],
            ["OUTPUT", "-o", EDGE_LINK, "-j", "DROP"],
        ]
    }

    /// `iptables -w ACTION RULE` inside the namespace; whether it succeeded.
    fn iptables(&self, action: &str, rule: &[&str]) -> anyhow::Result<bool> {
        let out = self
            .command("iptables")
            .args(["-w", action])
            .args(rule)
            .output()
            .context("cannot run ip netns exec")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("exec of \"iptables\" failed") {
            bail!(
                "iptables is not installed: apt-get install iptables (.ci/run does): {}",
                stderr.trim()
            );
        }
        Ok(out.status.success())
    }

    fn iptables_ok(&self, action: &str, rule: &[&str]) -> anyhow::Result<()> {
        if !self.iptables(action, rule)? {
            bail!(
                "iptables {action} {} failed in {}",
                rule.join(" "),
                self.name
            );
        }
        Ok(())
    }
}

impl Drop for EdgeNet {
    /// Deletes the pair first (a process still inside would keep the namespace, and with it
    /// the pair, alive), then the namespace with its rules. Errors are ignored.
    fn drop(&mut self) {
        if !self.host_link.is_empty() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_link])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a fresh thread inside the named namespace.
pub(crate) fn run_in_namespace<T: Send>(
    name: &str,
    f: impl FnOnce() -> T + Send,
) -> anyhow::Result<T> {
    let path = Path::new(NETNS_DIR).join(name);
    let ns = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("setns into {} failed", path.display()))?;
            Ok(f())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether an address of the /30 around `host_ip` is already on a root-namespace interface.
fn subnet_in_use(host_ip: Ipv4Addr) -> anyhow::Result<bool> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "to", &format!("{host_ip}/30")])
        .output()
        .context("cannot run ip")?;
    Ok(!out.stdout.is_empty())
}

/// Deletes `edgenet-PID-N` namespaces whose process is gone, with their veth pairs.
fn reap_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let _ = Command::new("ip")
            .args(["-n", &name, "link", "del", EDGE_LINK])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_distinct_30s_in_10_199() {
        assert_eq!(
            slot_addresses(0),
            (Ipv4Addr::new(10, 199, 0, 1), Ipv4Addr::new(10, 199, 0, 2))
        );
        assert_eq!(
            slot_addresses(65),
            (Ipv4Addr::new(10, 199, 1, 5), Ipv4Addr::new(10, 199, 1, 6))
        );
        assert_eq!(
            slot_addresses(SLOTS - 1),
            (
                Ipv4Addr::new(10, 199, 255, 253),
                Ipv4Addr::new(10, 199, 255, 254)
            )
        );
        let longest = format!("{HOST_LINK_PREFIX}{}", SLOTS - 1);
        assert!(longest.len() <= 15, "{longest} fits IFNAMSIZ");
    }
}
