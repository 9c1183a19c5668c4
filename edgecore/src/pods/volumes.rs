//! Pod volumes on the host, laid out like the kubelet's: `<volumes_dir>/<plugin>/<volume>`,
//! with the kubelet's plugin directory names (`kubernetes.io~configmap`, `kubernetes.io~secret`,
//! `kubernetes.io~projected`, `kubernetes.io~downward-api`, `kubernetes.io~empty-dir`).
//!
//! ConfigMap, Secret, projected and downwardAPI volumes are written as the kubelet's
//! AtomicWriter writes them, so that a running container sees an update all at once:
//!
//! ```text
//! <volume>/..2026_11_24_09_56_11.123456789/<files>   one directory per version
//! <volume>/..data -> ..2026_11_24_09_56_11.123456789 swapped with rename(2)
//! <volume>/<top-level name> -> ..data/<top-level name>  what the container lists
//! ```
//!
//! [`prepare`] is the one entry point, at pod start and for updates: it is idempotent, and
//! cheap when nothing changed (it compares the files of the current version, content and mode,
//! with what the objects say now, and writes a new version only when they differ), so the
//! worker calls it periodically to carry ConfigMap and Secret changes into running pods.
//! [`Prepared::updated`] names the volumes that got a new version.
//!
//! Differences from the kubelet, all deliberate:
//! - Secret volumes are plain files, not a tmpfs: they live under the pod's volumes directory,
//!   which is created 0700 inside edgecore's 0700 data directory.
//! - emptyDir with `medium: Memory` is a plain directory too; `sizeLimit` is not enforced.
//! - No fsGroup ownership change: files belong to root, with the requested modes.
//! - serviceAccountToken projections get the token [`crate::tokens::Tokens`] holds for the
//!   source (bound tokens from the cloud's TokenRequest, docs/tokens.md). While none is held
//!   the volume fails as the kubelet's mount does: the pod stays ContainerCreating with the
//!   reason in its status, and the next pass tries again. A refreshed token is a new version
//!   of the volume, swapped in atomically like a changed ConfigMap.
//! - Only emptyDir, hostPath, configMap, secret, projected and downwardAPI volumes exist here.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use k8s_cri::v1 as api;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, HostPathVolumeSource, KeyToPath, Pod, Secret,
    Volume, VolumeMount,
};

use super::spec::{self, FieldError, Objects, PodPaths};
use crate::tokens::{TokenKey, TokenUnavailable, Tokens};

/// Plugin directory of configMap volumes.
pub const PLUGIN_CONFIG_MAP: &str = "kubernetes.io~configmap";
/// Plugin directory of secret volumes.
pub const PLUGIN_SECRET: &str = "kubernetes.io~secret";
/// Plugin directory of projected volumes.
pub const PLUGIN_PROJECTED: &str = "kubernetes.io~projected";
/// Plugin directory of downwardAPI volumes.
pub const PLUGIN_DOWNWARD_API: &str = "kubernetes.io~downward-api";
/// Plugin directory of emptyDir volumes.
pub const PLUGIN_EMPTY_DIR: &str = "kubernetes.io~empty-dir";

/// The symlink naming the current version of an atomically written volume.
const DATA_LINK: &str = "..data";
/// The new `..data` link before it is renamed over the old one.
const DATA_LINK_TMP: &str = "..data_tmp";
/// File mode when neither the item nor the volume sets one (configMap and secret alike).
const DEFAULT_MODE: u32 = 0o644;
/// emptyDir is writable by any user of the pod, as with the kubelet.
const EMPTY_DIR_MODE: u32 = 0o777;
const DIR_MODE: u32 = 0o755;
/// Only root reaches a pod's volumes on the host; containers reach them through their mounts.
const VOLUMES_DIR_MODE: u32 = 0o700;
const MAX_PATH_LEN: usize = 4096;
const MAX_NAME_LEN: usize = 255;

/// A volume ready to be mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedVolume {
    /// Directory (or, for a hostPath, whatever the path is) on the host.
    pub host_path: PathBuf,
    /// configMap, secret, projected and downwardAPI volumes are always mounted read-only.
    pub read_only: bool,
}

/// The outcome of [`prepare`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Every volume of the pod, by name.
    pub volumes: BTreeMap<String, PreparedVolume>,
    /// Volumes whose files this call wrote: created, or updated to a new version.
    pub updated: Vec<String>,
}

/// A volume cannot be prepared or mounted.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name {0:?}")]
    InvalidName(String),
    #[error("volume {volume:?}: {kind} is not supported")]
    Unsupported { volume: String, kind: String },
    #[error("volume {volume:?}: configmap {name:?} not found")]
    ConfigMapNotFound { volume: String, name: String },
    #[error("volume {volume:?}: secret {name:?} not found")]
    SecretNotFound { volume: String, name: String },
    #[error("volume {volume:?}: configmap {name:?} has no key {key:?}")]
    ConfigMapKeyNotFound {
        volume: String,
        name: String,
        key: String,
    },
    #[error("volume {volume:?}: secret {name:?} has no key {key:?}")]
    SecretKeyNotFound {
        volume: String,
        name: String,
        key: String,
    },
    #[error("volume {volume:?}: {why}")]
    TokenUnavailable {
        volume: String,
        why: TokenUnavailable,
    },
    #[error("volume {volume:?}: a secret volume needs secretName")]
    NoSecretName { volume: String },
    #[error("volume {volume:?}: invalid path {path:?}: {reason}")]
    InvalidPath {
        volume: String,
        path: String,
        reason: &'static str,
    },
    #[error("volume {volume:?}: file mode {mode:#o} is outside 0-0777")]
    InvalidMode { volume: String, mode: i32 },
    #[error("volume {volume:?}: {error}")]
    Field { volume: String, error: FieldError },
    #[error(
        "volume {volume:?}: downwardAPI item {path:?} has neither fieldRef nor resourceFieldRef"
    )]
    EmptyItem { volume: String, path: String },
    #[error("volume {volume:?}: hostPath {path:?} is not absolute")]
    RelativeHostPath { volume: String, path: String },
    #[error("volume {volume:?}: unknown hostPath type {kind:?}")]
    UnknownHostPathType { volume: String, kind: String },
    #[error("volume {volume:?}: hostPath type check failed: {path:?} is not {expected}")]
    HostPathType {
        volume: String,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("container {container:?} mounts volume {volume:?}, which the pod does not declare")]
    UnknownVolume { container: String, volume: String },
    #[error("container {container:?}: volume {volume:?}: mount path {path:?} is not absolute")]
    RelativeMountPath {
        container: String,
        volume: String,
        path: String,
    },
    #[error("container {container:?}: volume {volume:?}: subPath {sub_path:?} {reason}")]
    SubPath {
        container: String,
        volume: String,
        sub_path: String,
        reason: &'static str,
    },
    #[error("container {container:?}: volume {volume:?}: {what} is not supported")]
    UnsupportedMount {
        container: String,
        volume: String,
        what: String,
    },
    #[error(
        "container {container:?}: volume {volume:?}: Bidirectional mount propagation needs a privileged container"
    )]
    BidirectionalNeedsPrivileged { container: String, volume: String },
    #[error("cannot {action} {path:?}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io {
        action,
        path,
        source,
    }
}

/// Creates or updates every volume of `pod` under `paths.volumes_dir` (hostPaths stay where
/// they are): emptyDir is created once and then left alone; hostPath is checked against its
/// type (`DirectoryOrCreate`/`FileOrCreate` create it, the parent of a file must exist; with no
/// type nothing is checked, and containerd creates a missing path as a directory at mount);
/// configMap, secret, projected and downwardAPI volumes get a new atomic version when their
/// content or modes changed. `items` select and rename keys (a missing key is an error unless
/// the source is optional), modes come from the item, else `defaultMode`, else 0644. A missing
/// optional ConfigMap or Secret contributes no files. Paths that are absolute, contain `..` or
/// start with `..` are refused. serviceAccountToken sources take their token from `tokens`.
pub fn prepare(
    pod: &Pod,
    objects: &Objects,
    tokens: &Tokens,
    paths: &PodPaths,
) -> Result<Prepared, VolumeError> {
    let mut prepared = Prepared::default();
    let volumes = pod.spec.iter().flat_map(|s| s.volumes.iter().flatten());
    let mut created_root = false;
    for volume in volumes {
        if !created_root {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(VOLUMES_DIR_MODE)
                .create(&paths.volumes_dir)
                .map_err(io_err("create", &paths.volumes_dir))?;
            created_root = true;
        }
        let (ready, updated) = prepare_volume(pod, objects, tokens, paths, volume)?;
        if updated {
            prepared.updated.push(volume.name.clone());
        }
        prepared.volumes.insert(volume.name.clone(), ready);
    }
    Ok(prepared)
}

fn prepare_volume(
    pod: &Pod,
    objects: &Objects,
    tokens: &Tokens,
    paths: &PodPaths,
    volume: &Volume,
) -> Result<(PreparedVolume, bool), VolumeError> {
    let name = volume.name.as_str();
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(VolumeError::InvalidName(name.to_string()));
    }
    let dir = |plugin: &str| paths.volumes_dir.join(plugin).join(name);
    if let Some(source) = &volume.host_path {
        let host_path = check_host_path(name, source)?;
        let ready = PreparedVolume {
            host_path,
            read_only: false,
        };
        return Ok((ready, false));
    }
    let mut files = Files::default();
    let plugin = if let Some(source) = &volume.config_map {
        let default_mode = mode(name, source.default_mode)?.unwrap_or(DEFAULT_MODE);
        let optional = source.optional.unwrap_or(false);
        let selection = Selection {
            items: source.items.as_deref(),
            default_mode,
            optional,
        };
        config_map_files(name, objects, &source.name, &selection, &mut files)?;
        PLUGIN_CONFIG_MAP
    } else if let Some(source) = &volume.secret {
        let secret_name =
            source
                .secret_name
                .as_deref()
                .ok_or_else(|| VolumeError::NoSecretName {
                    volume: name.to_string(),
                })?;
        let selection = Selection {
            items: source.items.as_deref(),
            default_mode: mode(name, source.default_mode)?.unwrap_or(DEFAULT_MODE),
            optional: source.optional.unwrap_or(false),
        };
        secret_files(name, objects, secret_name, &selection, &mut files)?;
        PLUGIN_SECRET
    } else if let Some(source) = &volume.downward_api {
        let default_mode = mode(name, source.default_mode)?.unwrap_or(DEFAULT_MODE);
        let items = source.items.as_deref().unwrap_or_default();
        downward_files(name, pod, items, default_mode, &mut files)?;
        PLUGIN_DOWNWARD_API
    } else if let Some(source) = &volume.projected {
        let default_mode = mode(name, source.default_mode)?.unwrap_or(DEFAULT_MODE);
        for projection in source.sources.iter().flatten() {
            if let Some(p) = &projection.config_map {
                let selection = Selection {
                    items: p.items.as_deref(),
                    default_mode,
                    optional: p.optional.unwrap_or(false),
                };
                config_map_files(name, objects, &p.name, &selection, &mut files)?;
            }
            if let Some(p) = &projection.secret {
                let selection = Selection {
                    items: p.items.as_deref(),
                    default_mode,
                    optional: p.optional.unwrap_or(false),
                };
                secret_files(name, objects, &p.name, &selection, &mut files)?;
            }
            if let Some(p) = &projection.downward_api {
                let items = p.items.as_deref().unwrap_or_default();
                downward_files(name, pod, items, default_mode, &mut files)?;
            }
            if let Some(p) = &projection.service_account_token {
                let token = tokens.lookup(&TokenKey::of(pod, p)).map_err(|why| {
                    VolumeError::TokenUnavailable {
                        volume: name.to_string(),
                        why,
                    }
                })?;
                files.add(name, &p.path, token.into_bytes(), default_mode)?;
            }
            if let Some(bundle) = &projection.cluster_trust_bundle
                && !bundle.optional.unwrap_or(false)
            {
                return Err(VolumeError::Unsupported {
                    volume: name.to_string(),
                    kind: "a clusterTrustBundle projection".to_string(),
                });
            }
        }
        PLUGIN_PROJECTED
    } else {
        match source_kind(volume) {
            // The API server defaults a volume without a source to emptyDir.
            Some(kind) if kind != "emptyDir" => {
                return Err(VolumeError::Unsupported {
                    volume: name.to_string(),
                    kind: format!("a {kind} volume"),
                });
            }
            _ => {
                let dir = dir(PLUGIN_EMPTY_DIR);
                let created = ensure_dir(&dir, EMPTY_DIR_MODE)?;
                let ready = PreparedVolume {
                    host_path: dir,
                    read_only: false,
                };
                return Ok((ready, created));
            }
        }
    };
    let dir = dir(plugin);
    let updated = write_atomic(&dir, &files.0)?;
    let ready = PreparedVolume {
        host_path: dir,
        read_only: true,
    };
    Ok((ready, updated))
}

/// The field naming a volume's source (`emptyDir`, `persistentVolumeClaim`, ...), if any.
fn source_kind(volume: &Volume) -> Option<String> {
    let value = serde_json::to_value(volume).ok()?;
    value.as_object()?.keys().find(|k| *k != "name").cloned()
}

fn check_host_path(volume: &str, source: &HostPathVolumeSource) -> Result<PathBuf, VolumeError> {
    let path = PathBuf::from(&source.path);
    if !path.is_absolute() {
        return Err(VolumeError::RelativeHostPath {
            volume: volume.to_string(),
            path: source.path.clone(),
        });
    }
    let wrong = |expected| VolumeError::HostPathType {
        volume: volume.to_string(),
        path: path.clone(),
        expected,
    };
    let metadata = match fs::metadata(&path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("inspect", &path)(e)),
    };
    let expect = |ok: bool, expected| if ok { Ok(()) } else { Err(wrong(expected)) };
    let is = |test: fn(&fs::Metadata) -> bool| metadata.as_ref().is_some_and(test);
    match source.type_.as_deref().unwrap_or("") {
        "" => {}
        "Directory" => expect(is(|m| m.is_dir()), "a directory")?,
        "File" => expect(is(|m| m.is_file()), "a file")?,
        "Socket" => expect(is(|m| m.file_type().is_socket()), "a socket")?,
        "CharDevice" => expect(is(|m| m.file_type().is_char_device()), "a character device")?,
        "BlockDevice" => expect(is(|m| m.file_type().is_block_device()), "a block device")?,
        "DirectoryOrCreate" => match &metadata {
            Some(m) => expect(m.is_dir(), "a directory")?,
            None => fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&path)
                .map_err(io_err("create", &path))?,
        },
        "FileOrCreate" => match &metadata {
            Some(m) => expect(m.is_file(), "a file")?,
            None => {
                // Like the kubelet, the parent directory is not created.
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(DEFAULT_MODE)
                    .open(&path)
                    .map_err(io_err("create", &path))?;
            }
        },
        other => {
            return Err(VolumeError::UnknownHostPathType {
                volume: volume.to_string(),
                kind: other.to_string(),
            });
        }
    }
    Ok(path)
}

/// A file of an atomically written volume.
#[derive(Debug, Clone, PartialEq, Eq)]
struct File {
    data: Vec<u8>,
    mode: u32,
}

/// The files of one volume version, by normalized relative path.
#[derive(Debug, Default)]
struct Files(BTreeMap<PathBuf, File>);

impl Files {
    fn add(
        &mut self,
        volume: &str,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> Result<(), VolumeError> {
        let relative = relative_path(volume, path)?;
        let conflict = self.0.keys().any(|existing| {
            existing == &relative
                || existing.starts_with(&relative)
                || relative.starts_with(existing)
        });
        if conflict {
            return Err(VolumeError::InvalidPath {
                volume: volume.to_string(),
                path: path.to_string(),
                reason: "conflicts with another item",
            });
        }
        self.0.insert(relative, File { data, mode });
        Ok(())
    }
}

/// Which keys of a ConfigMap or Secret become files, and how.
struct Selection<'a> {
    items: Option<&'a [KeyToPath]>,
    default_mode: u32,
    optional: bool,
}

fn config_map_files(
    volume: &str,
    objects: &Objects,
    name: &str,
    selection: &Selection<'_>,
    files: &mut Files,
) -> Result<(), VolumeError> {
    let Some(map) = objects.config_maps.get(name) else {
        if selection.optional {
            return Ok(());
        }
        return Err(VolumeError::ConfigMapNotFound {
            volume: volume.to_string(),
            name: name.to_string(),
        });
    };
    let missing = |key: &str| VolumeError::ConfigMapKeyNotFound {
        volume: volume.to_string(),
        name: name.to_string(),
        key: key.to_string(),
    };
    key_files(volume, &config_map_data(map), selection, missing, files)
}

fn secret_files(
    volume: &str,
    objects: &Objects,
    name: &str,
    selection: &Selection<'_>,
    files: &mut Files,
) -> Result<(), VolumeError> {
    let Some(secret) = objects.secrets.get(name) else {
        if selection.optional {
            return Ok(());
        }
        return Err(VolumeError::SecretNotFound {
            volume: volume.to_string(),
            name: name.to_string(),
        });
    };
    let missing = |key: &str| VolumeError::SecretKeyNotFound {
        volume: volume.to_string(),
        name: name.to_string(),
        key: key.to_string(),
    };
    key_files(volume, &secret_data(secret), selection, missing, files)
}

/// `data` and `binaryData` of a ConfigMap.
fn config_map_data(map: &ConfigMap) -> BTreeMap<&str, Vec<u8>> {
    let text = map
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.clone().into_bytes()));
    let binary = map
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.0.clone()));
    text.chain(binary).collect()
}

/// `data` of a Secret, overridden by `stringData` when an object carries it.
fn secret_data(secret: &Secret) -> BTreeMap<&str, Vec<u8>> {
    let data = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.0.clone()));
    let string_data = secret
        .string_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.clone().into_bytes()));
    data.chain(string_data).collect()
}

fn key_files(
    volume: &str,
    data: &BTreeMap<&str, Vec<u8>>,
    selection: &Selection<'_>,
    missing: impl Fn(&str) -> VolumeError,
    files: &mut Files,
) -> Result<(), VolumeError> {
    let items = selection.items.unwrap_or_default();
    if items.is_empty() {
        for (key, value) in data {
            files.add(volume, key, value.clone(), selection.default_mode)?;
        }
        return Ok(());
    }
    for item in items {
        let Some(value) = data.get(item.key.as_str()) else {
            if selection.optional {
                continue;
            }
            return Err(missing(&item.key));
        };
        let file_mode = mode(volume, item.mode)?.unwrap_or(selection.default_mode);
        files.add(volume, &item.path, value.clone(), file_mode)?;
    }
    Ok(())
}

fn downward_files(
    volume: &str,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
    files: &mut Files,
) -> Result<(), VolumeError> {
    for item in items {
        let value = if let Some(selector) = &item.field_ref {
            downward_field(pod, &selector.field_path)
        } else if let Some(selector) = &item.resource_field_ref {
            spec::resource_field(pod, None, selector)
        } else {
            return Err(VolumeError::EmptyItem {
                volume: volume.to_string(),
                path: item.path.clone(),
            });
        };
        let value = value.map_err(|error| VolumeError::Field {
            volume: volume.to_string(),
            error,
        })?;
        let file_mode = mode(volume, item.mode)?.unwrap_or(default_mode);
        files.add(volume, &item.path, value.into_bytes(), file_mode)?;
    }
    Ok(())
}

/// A downwardAPI volume field: what env fieldRefs offer, plus whole label and annotation maps
/// as `key="value"` lines, sorted by key, values quoted as the kubelet (Go's `%q`) does.
fn downward_field(pod: &Pod, path: &str) -> Result<String, FieldError> {
    let map = match path {
        "metadata.labels" => pod.metadata.labels.as_ref(),
        "metadata.annotations" => pod.metadata.annotations.as_ref(),
        _ => {
            return spec::object_field(pod, path)
                .ok_or_else(|| FieldError::UnsupportedField(path.to_string()));
        }
    };
    let lines: Vec<String> = map
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect();
    Ok(lines.join("\n"))
}

/// `value` in double quotes with Go's escapes for quotes, backslashes and control characters.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Kubernetes file mode (`0..=0o777`, given in decimal in JSON).
fn mode(volume: &str, mode: Option<i32>) -> Result<Option<u32>, VolumeError> {
    match mode {
        None => Ok(None),
        Some(m) if (0..=0o777).contains(&m) => Ok(Some(m as u32)),
        Some(m) => Err(VolumeError::InvalidMode {
            volume: volume.to_string(),
            mode: m,
        }),
    }
}

/// `path` as a normalized relative path that stays inside the volume and does not collide with
/// the writer's own `..`-prefixed entries.
fn relative_path(volume: &str, path: &str) -> Result<PathBuf, VolumeError> {
    let invalid = |reason| VolumeError::InvalidPath {
        volume: volume.to_string(),
        path: path.to_string(),
        reason,
    };
    if path.len() > MAX_PATH_LEN {
        return Err(invalid("is too long"));
    }
    let mut relative = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) if part.len() > MAX_NAME_LEN => {
                return Err(invalid("has a component that is too long"));
            }
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(invalid("contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(invalid("is absolute")),
        }
    }
    match relative.components().next() {
        None => Err(invalid("is empty")),
        Some(first) if first.as_os_str().as_encoded_bytes().starts_with(b"..") => {
            Err(invalid("starts with '..'"))
        }
        Some(_) => Ok(relative),
    }
}

/// Creates `dir` with `mode` unless it exists; returns whether it created it.
fn ensure_dir(dir: &Path, mode: u32) -> Result<bool, VolumeError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(false),
        Ok(_) => {
            let source = io::Error::new(io::ErrorKind::AlreadyExists, "not a directory");
            return Err(io_err("create", dir)(source));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", dir)(e)),
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .map_err(io_err("create", dir))?;
    // The umask may have narrowed the mode.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", dir))?;
    Ok(true)
}

/// Writes `files` into `dir` as a new version unless the current one holds exactly these files
/// with these modes; returns whether it wrote one. In order: the version directory, the
/// `..data` swap, the top-level links, then removal of stale links and old versions.
fn write_atomic(dir: &Path, files: &BTreeMap<PathBuf, File>) -> Result<bool, VolumeError> {
    ensure_dir(dir, DIR_MODE)?;
    let (version, written) = match current_version(dir) {
        Some(current) if read_version(&dir.join(&current)).is_ok_and(|old| old == *files) => {
            (current, false)
        }
        _ => {
            let version = write_version(dir, files)?;
            let tmp = dir.join(DATA_LINK_TMP);
            remove_if_present(&tmp)?;
            symlink(&version, &tmp).map_err(io_err("create", &tmp))?;
            let data = dir.join(DATA_LINK);
            fs::rename(&tmp, &data).map_err(io_err("replace", &data))?;
            (version, true)
        }
    };
    let top: BTreeSet<&OsStr> = files
        .keys()
        .filter_map(|p| p.components().next())
        .map(|c| c.as_os_str())
        .collect();
    for name in &top {
        let link = dir.join(name);
        let target = Path::new(DATA_LINK).join(name);
        match fs::read_link(&link) {
            Ok(existing) if existing == target => {}
            Ok(_) => {
                remove_if_present(&link)?;
                symlink(&target, &link).map_err(io_err("create", &link))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                symlink(&target, &link).map_err(io_err("create", &link))?;
            }
            // Something other than a link holds the name.
            Err(e) => return Err(io_err("link", &link)(e)),
        }
    }
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("inspect", &path))?;
        let internal = name.as_encoded_bytes().starts_with(b"..");
        if name == DATA_LINK || name == version {
            continue;
        }
        if internal && kind.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
        } else if (internal || kind.is_symlink()) && !top.contains(name.as_os_str()) {
            remove_if_present(&path)?;
        }
    }
    Ok(written)
}

/// The version `..data` points to, if it is one of ours.
fn current_version(dir: &Path) -> Option<OsString> {
    let target = fs::read_link(dir.join(DATA_LINK)).ok()?;
    let mut components = target.components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(name)), None) if name.as_encoded_bytes().starts_with(b"..") => {
            Some(name.to_os_string())
        }
        _ => None,
    }
}

/// The regular files below `root`, with content and mode; anything else is an error.
fn read_version(root: &Path) -> io::Result<BTreeMap<PathBuf, File>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        for entry in fs::read_dir(root.join(&relative))? {
            let entry = entry?;
            let path = relative.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let full = root.join(&path);
                let mode = fs::symlink_metadata(&full)?.permissions().mode() & 0o7777;
                let data = fs::read(&full)?;
                files.insert(path, File { data, mode });
            } else {
                return Err(io::Error::other("unexpected file type"));
            }
        }
    }
    Ok(files)
}

/// Writes `files` into a new `..<UTC timestamp>` directory of `dir`; returns its name.
fn write_version(dir: &Path, files: &BTreeMap<PathBuf, File>) -> Result<OsString, VolumeError> {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    );
    let mut name = stamp.clone();
    let mut suffix = 0;
    let version = loop {
        let candidate = dir.join(&name);
        match fs::DirBuilder::new().mode(DIR_MODE).create(&candidate) {
            Ok(()) => break candidate,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && suffix < 100 => {
                suffix += 1;
                name = format!("{stamp}_{suffix}");
            }
            Err(e) => return Err(io_err("create", &candidate)(e)),
        }
    };
    fs::set_permissions(&version, fs::Permissions::from_mode(DIR_MODE))
        .map_err(io_err("chmod", &version))?;
    for (relative, file) in files {
        let path = version.join(relative);
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(parent)
                .map_err(io_err("create", parent))?;
        }
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file.mode)
            .open(&path)
            .map_err(io_err("create", &path))?;
        out.write_all(&file.data).map_err(io_err("write", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(file.mode))
            .map_err(io_err("chmod", &path))?;
    }
    Ok(name.into())
}

fn remove_if_present(path: &Path) -> Result<(), VolumeError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// The CRI mounts of `container`'s volumeMounts, and nothing else: as with the kubelet, no
/// service account token (none exists here) and no termination-log file; containerd itself
/// provides /etc/hosts, /etc/hostname, /etc/resolv.conf and /dev/shm.
///
/// readOnly is the mount's, and always set for configMap, secret, projected and downwardAPI
/// volumes. mountPropagation maps to the CRI's (private by default; Bidirectional only for
/// privileged containers). A subPath is resolved on the host: it must stay inside the volume
/// after following symlinks; missing directories are created with the volume root's mode in
/// writable volumes, and are an error in read-only ones. A subPath into a configMap or secret
/// volume is a copy-free bind of the current version's file, so like the kubelet's it does
/// not follow updates. subPathExpr and `recursiveReadOnly: Enabled` are not supported
/// (containerd 1.6 has no recursive read-only mounts).
pub fn mounts(container: &Container, prepared: &Prepared) -> Result<Vec<api::Mount>, VolumeError> {
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false);
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|mount| cri_mount(&container.name, privileged, mount, prepared))
        .collect()
}

fn cri_mount(
    container: &str,
    privileged: bool,
    mount: &VolumeMount,
    prepared: &Prepared,
) -> Result<api::Mount, VolumeError> {
    let unsupported = |what: &str| VolumeError::UnsupportedMount {
        container: container.to_string(),
        volume: mount.name.clone(),
        what: what.to_string(),
    };
    let volume = prepared
        .volumes
        .get(&mount.name)
        .ok_or_else(|| VolumeError::UnknownVolume {
            container: container.to_string(),
            volume: mount.name.clone(),
        })?;
    if !mount.mount_path.starts_with('/') {
        return Err(VolumeError::RelativeMountPath {
            container: container.to_string(),
            volume: mount.name.clone(),
            path: mount.mount_path.clone(),
        });
    }
    if mount
        .sub_path_expr
        .as_deref()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(unsupported("subPathExpr"));
    }
    if mount.recursive_read_only.as_deref() == Some("Enabled") {
        return Err(unsupported("recursiveReadOnly: Enabled"));
    }
    let propagation = match mount.mount_propagation.as_deref() {
        None | Some("None") => api::MountPropagation::PropagationPrivate,
        Some("HostToContainer") => api::MountPropagation::PropagationHostToContainer,
        Some("Bidirectional") if privileged => api::MountPropagation::PropagationBidirectional,
        Some("Bidirectional") => {
            return Err(VolumeError::BidirectionalNeedsPrivileged {
                container: container.to_string(),
                volume: mount.name.clone(),
            });
        }
        Some(other) => return Err(unsupported(&format!("mountPropagation {other:?}"))),
    };
    let host_path = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
        None => volume.host_path.clone(),
        Some(sub_path) => resolve_sub_path(container, &mount.name, volume, sub_path)?,
    };
    Ok(api::Mount {
        container_path: mount.mount_path.clone(),
        host_path: host_path.to_string_lossy().into_owned(),
        readonly: mount.read_only.unwrap_or(false) || volume.read_only,
        propagation: propagation as i32,
        ..Default::default()
    })
}

/// The host path of `sub_path` inside `volume`, created if missing (writable volumes only),
/// with every existing step checked to resolve inside the volume.
fn resolve_sub_path(
    container: &str,
    volume_name: &str,
    volume: &PreparedVolume,
    sub_path: &str,
) -> Result<PathBuf, VolumeError> {
    let refuse = |reason| VolumeError::SubPath {
        container: container.to_string(),
        volume: volume_name.to_string(),
        sub_path: sub_path.to_string(),
        reason,
    };
    let mut parts = Vec::new();
    for component in Path::new(sub_path).components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse("is absolute")),
        }
    }
    let root = fs::canonicalize(&volume.host_path).map_err(io_err("resolve", &volume.host_path))?;
    let root_mode = fs::metadata(&root)
        .map_err(io_err("inspect", &root))?
        .permissions()
        .mode()
        & 0o7777;
    let mut current = root.clone();
    for part in parts {
        let next = current.join(part);
        match fs::symlink_metadata(&next) {
            Ok(_) => {
                current = fs::canonicalize(&next).map_err(io_err("resolve", &next))?;
                if !current.starts_with(&root) {
                    return Err(refuse("leaves the volume"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && volume.read_only => {
                return Err(refuse("does not exist"));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(root_mode)
                    .create(&next)
                    .map_err(io_err("create", &next))?;
                fs::set_permissions(&next, fs::Permissions::from_mode(root_mode))
                    .map_err(io_err("chmod", &next))?;
                current = next;
            }
            Err(e) => return Err(io_err("inspect", &next)(e)),
        }
    }
    Ok(current)
}

/// Removes the pod's volumes directory (pod GC); hostPath volumes are not touched. Succeeds
/// when it is already gone.
pub fn remove(paths: &PodPaths) -> Result<(), VolumeError> {
    match fs::remove_dir_all(&paths.volumes_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err("remove", &paths.volumes_dir)(e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web", "namespace": "ns", "uid": "1234-abcd",
                "labels": {"app": "web", "tier": "front"},
                "annotations": {"note": "say \"hi\"\n"},
            },
            "spec": {
                "containers": [{
                    "name": "c", "image": "x",
                    "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}},
                }],
                "volumes": volumes,
            },
        }))
        .expect("a valid pod")
    }

    fn objects() -> Objects {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "cm"},
            "data": {"a": "A", "b": "B"},
            "binaryData": {"bin": "AAEC"},
        }))
        .expect("configmap");
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "sec"},
            // "pass" and the raw bytes ff fe.
            "data": {"password": "cGFzcw==", "raw": "//4="},
        }))
        .expect("secret");
        Objects {
            config_maps: HashMap::from([("cm".to_string(), cm)]),
            secrets: HashMap::from([("sec".to_string(), secret)]),
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        paths: PodPaths,
        tokens: std::sync::Arc<Tokens>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let paths = spec::pod_paths(&root.join("data"), "1234-abcd");
        Fixture {
            _dir: dir,
            root,
            paths,
            tokens: Tokens::in_memory(crate::tokens::DEFAULT_REFRESH_MAX),
        }
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn file_mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    /// Names in a volume directory, sorted.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn version(dir: &Path) -> PathBuf {
        fs::read_link(dir.join(DATA_LINK)).expect("..data link")
    }

    #[test]
    fn empty_dir_is_created_once_world_writable_and_kept() {
        let f = fixture();
        for volumes in [
            json!([{"name": "scratch", "emptyDir": {}}]),
            json!([{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}]),
            json!([{"name": "scratch"}]),
        ] {
            let p = pod(volumes);
            let first = prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare");
            let dir = f.paths.volumes_dir.join(PLUGIN_EMPTY_DIR).join("scratch");
            assert_eq!(
                first.volumes["scratch"],
                PreparedVolume {
                    host_path: dir.clone(),
                    read_only: false
                }
            );
            assert_eq!(file_mode(&dir), 0o777);
            fs::write(dir.join("kept"), "x").expect("write");
            let again = prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare");
            assert!(again.updated.is_empty());
            assert_eq!(read(&dir.join("kept")), "x");
            remove(&f.paths).expect("remove");
        }
    }

    #[test]
    fn volumes_dir_is_private() {
        let f = fixture();
        prepare(
            &pod(json!([{"name": "v", "emptyDir": {}}])),
            &objects(),
            &f.tokens,
            &f.paths,
        )
        .expect("prepare");
        assert_eq!(file_mode(&f.paths.volumes_dir) & 0o077, 0);
    }

    #[test]
    fn host_path_types() {
        let f = fixture();
        let dir = f.root.join("dir");
        let file = f.root.join("file");
        let socket = f.root.join("sock");
        fs::create_dir(&dir).expect("dir");
        fs::write(&file, "f").expect("file");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("socket");
        let missing = f.root.join("missing");
        let null = PathBuf::from("/dev/null");
        // (path, type, ok)
        let cases = [
            (&missing, "", true),
            (&dir, "", true),
            (&dir, "Directory", true),
            (&file, "Directory", false),
            (&missing, "Directory", false),
            (&file, "File", true),
            (&dir, "File", false),
            (&missing, "File", false),
            (&socket, "Socket", true),
            (&file, "Socket", false),
            (&null, "CharDevice", true),
            (&file, "CharDevice", false),
            (&null, "BlockDevice", false),
            (&dir, "DirectoryOrCreate", true),
            (&file, "DirectoryOrCreate", false),
            (&file, "FileOrCreate", true),
            (&dir, "FileOrCreate", false),
        ];
        for (path, kind, ok) in cases {
            let p = pod(json!([{"name": "h", "hostPath": {"path": path, "type": kind}}]));
            let got = prepare(&p, &objects(), &f.tokens, &f.paths);
            assert_eq!(got.is_ok(), ok, "{} {kind}: {got:?}", path.display());
            if let Ok(prepared) = got {
                assert_eq!(prepared.volumes["h"].host_path, *path);
                assert!(!prepared.volumes["h"].read_only);
            }
        }
        assert!(!missing.exists(), "only the *OrCreate types create");

        let new_dir = f.root.join("new/nested");
        let p =
            pod(json!([{"name": "h", "hostPath": {"path": new_dir, "type": "DirectoryOrCreate"}}]));
        prepare(&p, &objects(), &f.tokens, &f.paths).expect("creates the directory");
        assert!(new_dir.is_dir());

        let new_file = f.root.join("new-file");
        let p = pod(json!([{"name": "h", "hostPath": {"path": new_file, "type": "FileOrCreate"}}]));
        prepare(&p, &objects(), &f.tokens, &f.paths).expect("creates the file");
        assert!(new_file.is_file());
        assert_eq!(file_mode(&new_file), 0o644);

        let orphan = f.root.join("no-parent/file");
        let p = pod(json!([{"name": "h", "hostPath": {"path": orphan, "type": "FileOrCreate"}}]));
        assert!(matches!(
            prepare(&p, &objects(), &f.tokens, &f.paths),
            Err(VolumeError::Io {
                action: "create",
                ..
            })
        ));

        let p = pod(json!([{"name": "h", "hostPath": {"path": "relative/x"}}]));
        assert!(matches!(
            prepare(&p, &objects(), &f.tokens, &f.paths),
            Err(VolumeError::RelativeHostPath { .. })
        ));
        let p = pod(json!([{"name": "h", "hostPath": {"path": "/tmp", "type": "Fifo"}}]));
        assert!(matches!(
            prepare(&p, &objects(), &f.tokens, &f.paths),
            Err(VolumeError::UnknownHostPathType { .. })
        ));
    }

    #[test]
    fn config_map_volume_with_all_keys() {
        let f = fixture();
        let p = pod(json!([{"name": "config", "configMap": {"name": "cm"}}]));
        let prepared = prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare");
        let dir = f.paths.volumes_dir.join(PLUGIN_CONFIG_MAP).join("config");
        assert_eq!(
            prepared.volumes["config"],
            PreparedVolume {
                host_path: dir.clone(),
                read_only: true
            }
        );
        assert_eq!(prepared.updated, vec!["config".to_string()]);
        let v = version(&dir);
        assert!(v.to_string_lossy().starts_with("..2"), "{}", v.display());
        assert_eq!(
            entries(&dir),
            vec![
                v.to_string_lossy().into_owned(),
                DATA_LINK.to_string(),
                "a".into(),
                "b".into(),
                "bin".into()
            ]
        );
        for key in ["a", "b", "bin"] {
            assert_eq!(
                fs::read_link(dir.join(key)).expect("link"),
                Path::new("..data").join(key)
            );
            assert_eq!(file_mode(&dir.join(key)), 0o644);
        }
        assert_eq!(read(&dir.join("a")), "A");
        assert_eq!(fs::read(dir.join("bin")).expect("bin"), vec![0, 1, 2]);
    }

    #[test]
    fn items_select_rename_and_set_modes() {
        let f = fixture();
        let p = pod(json!([{"name": "config", "configMap": {
            "name": "cm",
            "defaultMode": 0o600,
            "items": [
                {"key": "a", "path": "nested/dir/a.txt", "mode": 0o400},
                {"key": "b", "path": "b.conf"},
            ],
        }}]));
        prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare");
        let dir = f.paths.volumes_dir.join(PLUGIN_CONFIG_MAP).join("config");
        let v = version(&dir);
        assert_eq!(
            entries(&dir),
            vec![
                v.to_string_lossy().into_owned(),
                DATA_LINK.to_string(),
                "b.conf".into(),
                "nested".into()
            ]
        );
        assert_eq!(
            fs::read_link(dir.join("nested")).expect("link"),
            Path::new("..data/nested")
        );
        assert_eq!(read(&dir.join("nested/dir/a.txt")), "A");
        assert_eq!(file_mode(&dir.join("nested/dir/a.txt")), 0o400);
        assert_eq!(read(&dir.join("b.conf")), "B");
        assert_eq!(file_mode(&dir.join("b.conf")), 0o600);
    }

    #[test]
    fn secret_volume_keeps_bytes_and_modes() {
        let f = fixture();
        let p = pod(json!([
            {"name": "s1", "secret": {"secretName": "sec"}},
            {"name": "s2", "secret": {"secretName": "sec", "defaultMode": 0o440,
                "items": [{"key": "raw", "path": "raw.bin"}]}},
        ]));
        let prepared = prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare");
        let s1 = f.paths.volumes_dir.join(PLUGIN_SECRET).join("s1");
        let s2 = f.paths.volumes_dir.join(PLUGIN_SECRET).join("s2");
        assert!(prepared.volumes["s1"].read_only);
        assert_eq!(read(&s1.join("password")), "pass");
        assert_eq!(file_mode(&s1.join("password")), 0o644);
        assert_eq!(fs::read(s1.join("raw")).expect("raw"), vec![0xff, 0xfe]);
        assert_eq!(fs::read(s2.join("raw.bin")).expect("raw"), vec![0xff, 0xfe]);
        assert_eq!(file_mode(&s2.join("raw.bin")), 0o440);
        assert!(!s2.join("password").exists());
    }

    #[test]
    fn downward_api_volume() {
        let f = fixture();
        let p = pod(json!([{"name": "info", "downwardAPI": {"items": [
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
            {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}},
            {"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}},
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}, "mode": 0o400},
            {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
            {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}},
            {"path": "cpu", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu", "divisor": "1m"}},
        ]}}]));
        prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare");
        let dir = f.paths.volumes_dir.join(PLUGIN_DOWNWARD_API).join("info");
        let cases = [
            ("name", "web"),
            ("namespace", "ns"),
            ("uid", "1234-abcd"),
            ("labels", "app=\"web\"\ntier=\"front\""),
            ("annotations", "note=\"say \\\"hi\\\"\\n\""),
            ("app", "web"),
            ("mem", "64"),
            ("cpu", "500"),
        ];
        for (file, want) in cases {
            assert_eq!(read(&dir.join(file)), want, "{file}");
        }
        assert_eq!(file_mode(&dir.join("annotations")), 0o400);
        assert_eq!(file_mode(&dir.join("name")), 0o644);

        let errors = [
            json!({"path": "x", "fieldRef": {"fieldPath": "status.hostIP"}}),
            json!({"path": "x", "resourceFieldRef": {"resource": "limits.cpu"}}),
            json!({"path": "x"}),
        ];
        for item in errors {
            let p = pod(json!([{"name": "info", "downwardAPI": {"items": [item.clone()]}}]));
            let got = prepare(&p, &objects(), &f.tokens, &f.paths);
            assert!(
                matches!(
                    got,
                    Err(VolumeError::Field { .. } | VolumeError::EmptyItem { .. })
                ),
                "{item}: {got:?}"
            );
        }
    }

    #[test]
    fn quoting_matches_go() {
        let cases = [
            ("plain", "\"plain\""),
            ("a\"b\\c", "\"a\\\"b\\\\c\""),
            ("l1\nl2\tx\r", "\"l1\\nl2\\tx\\r\""),
            ("\u{1}\u{7f}", "\"\\x01\\x7f\""),
            ("ünï", "\"ünï\""),
        ];
        for (value, want) in cases {
            assert_eq!(quote(value), want, "{value:?}");
        }
    }

    /// The volume the ServiceAccount admission plugin adds to every pod.
    fn kube_api_access() -> serde_json::Value {
        json!([{"name": "kube-api-access-x", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}}])
    }

    fn with_root_ca(mut objects: Objects) -> Objects {
        let ca: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "kube-root-ca.crt"},
            "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\n"},
        }))
        .expect("configmap");
        objects.config_maps.insert("kube-root-ca.crt".into(), ca);
        objects
    }

    #[test]
    fn service_account_token_waits_for_a_token_then_is_written_and_swapped_on_refresh() {
        let f = fixture();
        let p = pod(kube_api_access());
        let objects = with_root_ca(objects());
        let got = prepare(&p, &objects, &f.tokens, &f.paths);
        let Err(e @ VolumeError::TokenUnavailable { .. }) = got else {
            panic!("no token held yet: {got:?}");
        };
        assert_eq!(
            e.to_string(),
            "volume \"kube-api-access-x\": no token for service account ns/default (the API server's audiences) yet: waiting for the cloud"
        );
        let dir = f
            .paths
            .volumes_dir
            .join(PLUGIN_PROJECTED)
            .join("kube-api-access-x");
        assert!(!dir.exists(), "nothing mounted without the token");

        let source: k8s_openapi::api::core::v1::ServiceAccountTokenProjection =
            serde_json::from_value(json!({"path": "token", "expirationSeconds": 3607})).unwrap();
        let key = TokenKey::of(&p, &source);
        let held = |token: &str| crate::tokens::HeldToken {
            token: token.into(),
            expires_at: 0,
            refresh_at: 0,
        };
        f.tokens.hold(key.clone(), held("jwt-1"));
        let prepared = prepare(&p, &objects, &f.tokens, &f.paths).expect("prepare");
        assert_eq!(prepared.updated, ["kube-api-access-x"]);
        assert_eq!(read(&dir.join("token")), "jwt-1");
        assert_eq!(file_mode(&dir.join("token")), 0o644);
        assert_eq!(read(&dir.join("ca.crt")), "-----BEGIN CERTIFICATE-----\n");
        assert_eq!(read(&dir.join("namespace")), "ns");
        assert_eq!(
            entries(&dir)
                .into_iter()
                .filter(|n| !n.starts_with("..2"))
                .collect::<Vec<_>>(),
            ["..data", "ca.crt", "namespace", "token"]
        );
        let first = version(&dir);
        let same = prepare(&p, &objects, &f.tokens, &f.paths).expect("again");
        assert!(same.updated.is_empty(), "same token, no new version");

        f.tokens.hold(key, held("jwt-2"));
        let refreshed = prepare(&p, &objects, &f.tokens, &f.paths).expect("refresh");
        assert_eq!(refreshed.updated, ["kube-api-access-x"]);
        assert_eq!(read(&dir.join("token")), "jwt-2");
        assert_ne!(version(&dir), first, "a new version behind ..data");
        assert!(!dir.join(&first).exists(), "the old version is gone");
    }

    #[test]
    fn projected_volume_merges_sources() {
        let f = fixture();
        let p = pod(
            json!([{"name": "all", "projected": {"defaultMode": 0o640, "sources": [
                {"configMap": {"name": "cm", "items": [{"key": "a", "path": "cm/a"}]}},
                {"secret": {"name": "sec", "items": [{"key": "password", "path": "sec/password", "mode": 0o400}]}},
                {"downwardAPI": {"items": [{"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
                {"configMap": {"name": "kube-root-ca.crt", "optional": true}},
            ]}}]),
        );
        let prepared = prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare");
        let dir = f.paths.volumes_dir.join(PLUGIN_PROJECTED).join("all");
        assert!(prepared.volumes["all"].read_only);
        assert_eq!(read(&dir.join("cm/a")), "A");
        assert_eq!(file_mode(&dir.join("cm/a")), 0o640);
        assert_eq!(read(&dir.join("sec/password")), "pass");
        assert_eq!(file_mode(&dir.join("sec/password")), 0o400);
        assert_eq!(read(&dir.join("ns")), "ns");

        let p = pod(json!([{"name": "all", "projected": {"sources": [
            {"configMap": {"name": "cm", "items": [{"key": "a", "path": "x"}]}},
            {"secret": {"name": "sec", "items": [{"key": "password", "path": "x"}]}},
        ]}}]));
        assert!(matches!(
            prepare(&p, &objects(), &f.tokens, &f.paths),
            Err(VolumeError::InvalidPath {
                reason: "conflicts with another item",
                ..
            })
        ));
        let p = pod(json!([{"name": "all", "projected": {"sources": [
            {"clusterTrustBundle": {"name": "b", "path": "b"}},
        ]}}]));
        assert!(matches!(
            prepare(&p, &objects(), &f.tokens, &f.paths),
            Err(VolumeError::Unsupported { .. })
        ));
    }

    #[test]
    fn updates_swap_versions_atomically_and_only_on_change() {
        let f = fixture();
        let p = pod(json!([{"name": "config", "configMap": {"name": "cm"}}]));
        let mut objects = objects();
        let dir = f.paths.volumes_dir.join(PLUGIN_CONFIG_MAP).join("config");
        prepare(&p, &objects, &f.tokens, &f.paths).expect("first");
        let v1 = version(&dir);

        // Unchanged: no new version, nothing reported.
        let again = prepare(&p, &objects, &f.tokens, &f.paths).expect("again");
        assert!(again.updated.is_empty());
        assert_eq!(version(&dir), v1);

        // Changed content, a key removed and one added: a new version replaces the old one.
        let data = objects
            .config_maps
            .get_mut("cm")
            .expect("cm")
            .data
            .as_mut()
            .expect("data");
        data.insert("a".into(), "A2".into());
        data.remove("b");
        data.insert("c".into(), "C".into());
        let changed = prepare(&p, &objects, &f.tokens, &f.paths).expect("update");
        assert_eq!(changed.updated, vec!["config".to_string()]);
        let v2 = version(&dir);
        assert_ne!(v1, v2);
        assert!(!dir.join(&v1).exists(), "old version removed");
        assert_eq!(read(&dir.join("a")), "A2");
        assert_eq!(read(&dir.join("c")), "C");
        assert!(
            fs::symlink_metadata(dir.join("b")).is_err(),
            "stale link removed"
        );
        assert_eq!(
            entries(&dir),
            vec![
                v2.to_string_lossy().into_owned(),
                DATA_LINK.to_string(),
                "a".into(),
                "bin".into(),
                "c".into()
            ]
        );

        // A mode change alone is a change too.
        let p = pod(json!([{"name": "config", "configMap": {"name": "cm", "defaultMode": 0o600}}]));
        let moded = prepare(&p, &objects, &f.tokens, &f.paths).expect("mode");
        assert_eq!(moded.updated.len(), 1);
        assert_ne!(version(&dir), v2);
        assert_eq!(file_mode(&dir.join("a")), 0o600);

        // Leftovers of an interrupted write are cleaned up, and a tampered file is rewritten.
        fs::create_dir(dir.join("..2000_01_01_00_00_00.000000000")).expect("stray");
        let current = dir.join(version(&dir));
        fs::write(current.join("a"), "tampered").expect("tamper");
        let repaired = prepare(&p, &objects, &f.tokens, &f.paths).expect("repair");
        assert_eq!(repaired.updated.len(), 1);
        assert_eq!(read(&dir.join("a")), "A2");
        assert_eq!(
            entries(&dir)
                .iter()
                .filter(|e| e.starts_with("..2"))
                .count(),
            1
        );
    }

    #[test]
    fn missing_objects_and_keys() {
        let f = fixture();
        // Optional and missing: an empty volume.
        let optional = [
            json!({"name": "v", "configMap": {"name": "nope", "optional": true}}),
            json!({"name": "v", "secret": {"secretName": "nope", "optional": true}}),
            json!({"name": "v", "configMap": {"name": "cm", "optional": true, "items": [{"key": "nope", "path": "x"}]}}),
            json!({"name": "v", "projected": {"sources": [{"secret": {"name": "nope", "optional": true}}]}}),
        ];
        for volume in optional {
            let prepared = prepare(
                &pod(json!([volume.clone()])),
                &objects(),
                &f.tokens,
                &f.paths,
            )
            .unwrap_or_else(|e| panic!("{volume}: {e}"));
            let dir = &prepared.volumes["v"].host_path;
            assert_eq!(
                entries(dir).len(),
                2,
                "{volume}: only ..data and its version"
            );
            remove(&f.paths).expect("remove");
        }
        let errors = [
            (
                json!({"name": "v", "configMap": {"name": "nope"}}),
                "volume \"v\": configmap \"nope\" not found",
            ),
            (
                json!({"name": "v", "secret": {"secretName": "nope"}}),
                "volume \"v\": secret \"nope\" not found",
            ),
            (
                json!({"name": "v", "configMap": {"name": "cm", "items": [{"key": "nope", "path": "x"}]}}),
                "volume \"v\": configmap \"cm\" has no key \"nope\"",
            ),
            (
                json!({"name": "v", "secret": {"secretName": "sec", "items": [{"key": "nope", "path": "x"}]}}),
                "volume \"v\": secret \"sec\" has no key \"nope\"",
            ),
            (
                json!({"name": "v", "secret": {}}),
                "volume \"v\": a secret volume needs secretName",
            ),
            (
                json!({"name": "v", "persistentVolumeClaim": {"claimName": "pvc"}}),
                "volume \"v\": a persistentVolumeClaim volume is not supported",
            ),
        ];
        for (volume, want) in errors {
            let got = prepare(
                &pod(json!([volume.clone()])),
                &objects(),
                &f.tokens,
                &f.paths,
            );
            assert_eq!(
                got.map_err(|e| e.to_string()),
                Err(want.to_string()),
                "{volume}"
            );
        }
    }

    #[test]
    fn paths_modes_and_names_are_checked() {
        let f = fixture();
        let bad_paths = [
            ("../x", "contains '..'"),
            ("a/../../x", "contains '..'"),
            ("/etc/passwd", "is absolute"),
            ("..data", "starts with '..'"),
            ("./..x", "starts with '..'"),
            ("", "is empty"),
            (".", "is empty"),
        ];
        for (path, reason) in bad_paths {
            let p = pod(
                json!([{"name": "v", "configMap": {"name": "cm", "items": [{"key": "a", "path": path}]}}]),
            );
            match prepare(&p, &objects(), &f.tokens, &f.paths) {
                Err(VolumeError::InvalidPath { reason: got, .. }) => {
                    assert_eq!(got, reason, "{path:?}")
                }
                other => panic!("{path:?}: {other:?}"),
            }
        }
        let p = pod(json!([{"name": "v", "configMap": {"name": "cm", "items": [
            {"key": "a", "path": "x"}, {"key": "b", "path": "x/y"},
        ]}}]));
        assert!(matches!(
            prepare(&p, &objects(), &f.tokens, &f.paths),
            Err(VolumeError::InvalidPath { .. })
        ));
        for volume in [
            json!({"name": "v", "configMap": {"name": "cm", "defaultMode": 0o1000}}),
            json!({"name": "v", "secret": {"secretName": "sec", "items": [{"key": "raw", "path": "r", "mode": -1}]}}),
        ] {
            let got = prepare(
                &pod(json!([volume.clone()])),
                &objects(),
                &f.tokens,
                &f.paths,
            );
            assert!(
                matches!(got, Err(VolumeError::InvalidMode { .. })),
                "{volume}: {got:?}"
            );
        }
        for name in ["../x", "a/b", ".hidden", ""] {
            let got = prepare(
                &pod(json!([{"name": name, "emptyDir": {}}])),
                &objects(),
                &f.tokens,
                &f.paths,
            );
            assert!(
                matches!(got, Err(VolumeError::InvalidName(_))),
                "{name:?}: {got:?}"
            );
        }
        assert!(!f.root.join("x").exists() && !f.paths.volumes_dir.join("x").exists());
    }

    fn container(mounts: serde_json::Value, privileged: bool) -> Container {
        serde_json::from_value(json!({
            "name": "c", "image": "x", "volumeMounts": mounts,
            "securityContext": {"privileged": privileged},
        }))
        .expect("container")
    }

    fn prepared_pod(f: &Fixture) -> Prepared {
        let p = pod(json!([
            {"name": "scratch", "emptyDir": {}},
            {"name": "config", "configMap": {"name": "cm"}},
            {"name": "host", "hostPath": {"path": f.root.join("host"), "type": "DirectoryOrCreate"}},
        ]));
        prepare(&p, &objects(), &f.tokens, &f.paths).expect("prepare")
    }

    #[test]
    fn mounts_map_read_only_and_propagation() {
        let f = fixture();
        let prepared = prepared_pod(&f);
        let c = container(
            json!([
                {"name": "scratch", "mountPath": "/scratch"},
                {"name": "scratch", "mountPath": "/ro", "readOnly": true},
                {"name": "config", "mountPath": "/etc/config"},
                {"name": "host", "mountPath": "/host", "mountPropagation": "HostToContainer"},
                {"name": "host", "mountPath": "/shared", "mountPropagation": "Bidirectional"},
                {"name": "host", "mountPath": "/rro", "recursiveReadOnly": "IfPossible", "readOnly": true},
            ]),
            true,
        );
        let got = mounts(&c, &prepared).expect("mounts");
        let host = |name: &str| {
            prepared.volumes[name]
                .host_path
                .to_string_lossy()
                .into_owned()
        };
        let mount =
            |path: &str, volume: &str, readonly, propagation: api::MountPropagation| api::Mount {
                container_path: path.into(),
                host_path: host(volume),
                readonly,
                propagation: propagation as i32,
                ..Default::default()
            };
        use api::MountPropagation::*;
        assert_eq!(
            got,
            vec![
                mount("/scratch", "scratch", false, PropagationPrivate),
                mount("/ro", "scratch", true, PropagationPrivate),
                mount("/etc/config", "config", true, PropagationPrivate),
                mount("/host", "host", false, PropagationHostToContainer),
                mount("/shared", "host", false, PropagationBidirectional),
                mount("/rro", "host", true, PropagationPrivate),
            ]
        );
        assert_eq!(
            mounts(&container(json!([]), false), &prepared).expect("none"),
            vec![]
        );
    }

    #[test]
    fn mount_errors() {
        let f = fixture();
        let prepared = prepared_pod(&f);
        let cases = [
            (
                json!({"name": "nope", "mountPath": "/x"}),
                false,
                "mounts volume \"nope\", which the pod does not declare",
            ),
            (
                json!({"name": "scratch", "mountPath": "x"}),
                false,
                "mount path \"x\" is not absolute",
            ),
            (
                json!({"name": "scratch", "mountPath": "/x", "subPathExpr": "$(POD)"}),
                false,
                "subPathExpr is not supported",
            ),
            (
                json!({"name": "scratch", "mountPath": "/x", "recursiveReadOnly": "Enabled", "readOnly": true}),
                false,
                "recursiveReadOnly: Enabled is not supported",
            ),
            (
                json!({"name": "host", "mountPath": "/x", "mountPropagation": "Bidirectional"}),
                false,
                "Bidirectional mount propagation needs a privileged container",
            ),
            (
                json!({"name": "scratch", "mountPath": "/x", "subPath": "../up"}),
                false,
                "subPath \"../up\" contains '..'",
            ),
            (
                json!({"name": "scratch", "mountPath": "/x", "subPath": "a/../../up"}),
                false,
                "contains '..'",
            ),
            (
                json!({"name": "scratch", "mountPath": "/x", "subPath": "/abs"}),
                false,
                "subPath \"/abs\" is absolute",
            ),
            (
                json!({"name": "config", "mountPath": "/x", "subPath": "nope"}),
                false,
                "subPath \"nope\" does not exist",
            ),
        ];
        for (m, privileged, want) in cases {
            let got = mounts(&container(json!([m.clone()]), privileged), &prepared);
            let message = got.map(|_| ()).expect_err("an error").to_string();
            assert!(message.contains(want), "{m}: {message}");
        }
    }

    #[test]
    fn sub_paths_resolve_inside_the_volume() {
        let f = fixture();
        let prepared = prepared_pod(&f);
        let scratch = prepared.volumes["scratch"].host_path.clone();
        let config = prepared.volumes["config"].host_path.clone();
        let c = container(
            json!([
                {"name": "scratch", "mountPath": "/data", "subPath": "app/data"},
                {"name": "config", "mountPath": "/etc/a.conf", "subPath": "a"},
            ]),
            false,
        );
        let got = mounts(&c, &prepared).expect("mounts");
        let created = fs::canonicalize(&scratch)
            .expect("canonical")
            .join("app/data");
        assert_eq!(got[0].host_path, created.to_string_lossy());
        assert!(created.is_dir());
        assert_eq!(file_mode(&created), 0o777, "the volume root's mode");
        assert!(!got[0].readonly);
        // A subPath into an atomically written volume binds the current version's file.
        let file = fs::canonicalize(&config)
            .expect("canonical")
            .join(version(&config))
            .join("a");
        assert_eq!(got[1].host_path, file.to_string_lossy());
        assert!(got[1].readonly);

        // A symlink planted in a writable volume cannot lead a subPath out of it.
        symlink(&f.root, scratch.join("escape")).expect("symlink");
        symlink("../..", scratch.join("app/up")).expect("symlink");
        symlink("app/data", scratch.join("inside")).expect("symlink");
        for sub_path in ["escape", "escape/x", "app/up", "app/up/etc"] {
            let c = container(
                json!([{"name": "scratch", "mountPath": "/x", "subPath": sub_path}]),
                false,
            );
            let got = mounts(&c, &prepared);
            assert!(
                matches!(
                    got,
                    Err(VolumeError::SubPath {
                        reason: "leaves the volume",
                        ..
                    })
                ),
                "{sub_path}: {got:?}"
            );
        }
        assert!(!f.root.join("x").exists());
        let c = container(
            json!([{"name": "scratch", "mountPath": "/x", "subPath": "inside"}]),
            false,
        );
        assert_eq!(
            mounts(&c, &prepared).expect("inside")[0].host_path,
            created.to_string_lossy()
        );
    }

    #[test]
    fn remove_deletes_the_volumes_and_tolerates_absence() {
        let f = fixture();
        let prepared = prepared_pod(&f);
        let host = prepared.volumes["host"].host_path.clone();
        assert!(f.paths.volumes_dir.exists());
        remove(&f.paths).expect("remove");
        assert!(!f.paths.volumes_dir.exists());
        assert!(host.is_dir(), "hostPath volumes are not touched");
        remove(&f.paths).expect("already gone");
        // A pod without volumes leaves nothing behind.
        let empty = prepare(&pod(json!([])), &objects(), &f.tokens, &f.paths).expect("prepare");
        assert!(empty.volumes.is_empty());
        assert!(!f.paths.volumes_dir.exists());
    }
}
