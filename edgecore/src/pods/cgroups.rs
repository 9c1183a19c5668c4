//! Where a pod's cgroups live on this host, on cgroup v1 (one hierarchy per controller, and in
//! hybrid mode also the `unified` v2 one) and on cgroup v2 (one unified hierarchy), and their
//! removal once the pod is gone.
//!
//! With the cgroupfs driver the runtime puts a container in `<cgroup_parent>/<container id>`
//! ([`spec::cgroup_parent`](super::spec::cgroup_parent)); the container's own cgroup goes with
//! it, the pod's parent stays behind unless removed.

use std::path::{Path, PathBuf};

use super::spec;

/// Where cgroup file systems are mounted.
const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup layouts a host can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2 only: one hierarchy at the root (`cgroup.controllers` exists there).
    Unified,
    /// cgroup v1, each controller a hierarchy of its own below the root (hybrid hosts also
    /// mount v2 at `unified`, which counts as one more hierarchy).
    PerController,
}

/// This host's layout, read from the mounted file system.
pub fn layout() -> Layout {
    layout_at(Path::new(ROOT))
}

fn layout_at(root: &Path) -> Layout {
    if root.join("cgroup.controllers").exists() {
        Layout::Unified
    } else {
        Layout::PerController
    }
}

/// The directories pod `uid`'s cgroup has, or would have, on this host: one per hierarchy.
pub fn pod_dirs(uid: &str) -> Vec<PathBuf> {
    pod_dirs_at(Path::new(ROOT), uid)
}

fn pod_dirs_at(root: &Path, uid: &str) -> Vec<PathBuf> {
    let parent = spec::cgroup_parent(uid);
    let relative = parent.trim_start_matches('/');
    match layout_at(root) {
        Layout::Unified => vec![root.join(relative)],
        Layout::PerController => std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .map(|entry| entry.path().join(relative))
            .collect(),
    }
}

/// Removes pod `uid`'s cgroups in every hierarchy: empty child cgroups first (a container's
/// the shim has not removed yet), then the pod's. A cgroup still holding a process stays, as
/// rmdir refuses it. Returns the directories that are still there.
pub fn remove_pod(uid: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for dir in pod_dirs(uid) {
        if !dir.exists() {
            continue;
        }
        if let Ok(children) = std::fs::read_dir(&dir) {
            for child in children.flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
        }
        if std::fs::remove_dir(&dir).is_err() && dir.exists() {
            left.push(dir);
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_hosts_have_one_pod_cgroup_below_the_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        std::fs::create_dir(root.path().join("system.slice")).expect("mkdir");
        assert_eq!(layout_at(root.path()), Layout::Unified);
        assert_eq!(
            pod_dirs_at(root.path(), "1234-abcd"),
            vec![root.path().join("edgecore/pod1234-abcd")]
        );
    }

    #[test]
    fn per_controller_hosts_have_one_pod_cgroup_per_hierarchy() {
        let root = tempfile::tempdir().expect("tempdir");
        for controller in ["memory", "cpu", "unified"] {
            std::fs::create_dir(root.path().join(controller)).expect("mkdir");
        }
        // A file at the root (as `cpu,cpuacct` symlinks are not directories of their own here)
        // is not a hierarchy.
        std::fs::write(root.path().join("release_agent"), "").expect("write");
        assert_eq!(layout_at(root.path()), Layout::PerController);
        let mut dirs = pod_dirs_at(root.path(), "1234-abcd");
        dirs.sort();
        assert_eq!(
            dirs,
            ["cpu", "memory", "unified"]
                .map(|c| root.path().join(c).join("edgecore/pod1234-abcd"))
                .to_vec()
        );
    }
}
