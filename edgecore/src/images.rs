//! Images without a registry: `edgecore images import FILE...` loads OCI image-layout or
//! docker-archive tarballs into the runtime's `k8s.io` namespace, where the CRI finds them.
//!
//! The import itself is containerd's own (`ctr images import`, shipped with containerd): it
//! unpacks into the snapshotter the CRI uses, and the CRI plugin sees the image at once.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cri;

/// An import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Endpoint(#[from] cri::CriError),
    #[error("{path}: no such file")]
    Missing { path: PathBuf },
    #[error("cannot run ctr (it comes with the containerd package)")]
    Ctr(#[source] std::io::Error),
    #[error("importing {path} failed: {output}")]
    Failed { path: PathBuf, output: String },
}

/// Imports each tarball; returns the lines `ctr` printed (one per image).
pub fn import(endpoint: &str, files: &[PathBuf]) -> Result<Vec<String>, ImportError> {
    let socket = cri::socket_path(endpoint)?;
    let mut imported = Vec::new();
    for path in files {
        if !Path::new(path).is_file() {
            return Err(ImportError::Missing { path: path.clone() });
        }
        let output = Command::new("ctr")
            .args([
                "--address",
                socket,
                "--namespace",
                "k8s.io",
                "images",
                "import",
            ])
            .arg(path)
            .output()
            .map_err(ImportError::Ctr)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            return Err(ImportError::Failed {
                path: path.clone(),
                output: text.trim().to_string(),
            });
        }
        imported.extend(text.lines().map(str::to_string));
    }
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named() {
        let err = import(
            "unix:///run/containerd/containerd.sock",
            &[PathBuf::from("/nonexistent/image.tar")],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "/nonexistent/image.tar: no such file");
    }

    #[test]
    fn only_unix_endpoints_are_accepted() {
        assert!(matches!(
            import("tcp://x:1", &[]),
            Err(ImportError::Endpoint(_))
        ));
    }
}
