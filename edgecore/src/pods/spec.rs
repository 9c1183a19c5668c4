//! Pod → CRI v1 translation: sandbox and container configs, container environments, and the
//! Kubernetes quantity arithmetic they need. Pure functions, no IO.
//!
//! The mapping follows the kubelet's (kuberuntime) so that a pod behaves on an edge node as it
//! would on a cluster node. Each deliberate difference is documented on the function making it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_cri::v1 as api;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Pod, PodSecurityContext, PodSpec, ResourceFieldSelector,
    SeccompProfile, Secret,
};

/// Label with the pod's uid, on sandboxes and containers (the kubelet's key).
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
/// Label with the pod's name, on sandboxes and containers (the kubelet's key).
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
/// Label with the pod's namespace, on sandboxes and containers (the kubelet's key).
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Label with the container's name, on containers (the kubelet's key).
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// Label marking every sandbox and container edgecore creates; adoption and GC select on it.
pub const LABEL_MANAGED_BY: &str = "edge.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "edgecore";
/// Label telling init containers from regular ones ([`ContainerKind::as_str`]).
pub const LABEL_CONTAINER_KIND: &str = "edge.io/container-kind";
/// Annotation with the container's attempt number (the kubelet's key).
pub const ANNOTATION_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
/// Annotation with the container's terminationMessagePath (the kubelet's key).
pub const ANNOTATION_TERMINATION_MESSAGE_PATH: &str =
    "io.kubernetes.container.terminationMessagePath";
/// Annotation with the container's terminationMessagePolicy (the kubelet's key).
pub const ANNOTATION_TERMINATION_MESSAGE_POLICY: &str =
    "io.kubernetes.container.terminationMessagePolicy";
/// Annotation with the pod's terminationGracePeriodSeconds (the kubelet's key).
pub const ANNOTATION_TERMINATION_GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";

const MAX_HOSTNAME_LEN: usize = 63;
/// CFS period used with a CPU limit (the kubelet's default, 100 ms).
const CPU_PERIOD_US: i64 = 100_000;
const MIN_CPU_SHARES: i64 = 2;
const MAX_CPU_SHARES: i64 = 262_144;
const MIN_CPU_QUOTA_US: i64 = 1_000;
/// BestEffort pods are the first the OOM killer takes, as with the kubelet.
const BEST_EFFORT_OOM_SCORE_ADJ: i64 = 1_000;
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
const DEFAULT_TERMINATION_MESSAGE_POLICY: &str = "File";
const DEFAULT_TERMINATION_GRACE_PERIOD: i64 = 30;

/// The ConfigMaps and Secrets a pod may reference: those of the pod's namespace, by name.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// ConfigMaps by name.
    pub config_maps: HashMap<String, ConfigMap>,
    /// Secrets by name.
    pub secrets: HashMap<String, Secret>,
}

/// Where a pod's files live on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPaths {
    /// `DIR/pods/<uid>/logs`: the sandbox's log_directory; container logs go to
    /// `<container>/<attempt>.log` below it.
    pub log_dir: PathBuf,
    /// `DIR/pods/<uid>/volumes`: see [`super::volumes`].
    pub volumes_dir: PathBuf,
}

/// The paths of pod `uid` under edgecore's data directory.
///
/// Characters other than ASCII letters, digits and `-` in `uid` are replaced by `_`, so the
/// result always stays below `DIR/pods` (Kubernetes uids are UUIDs; [`sandbox_config`] rejects
/// any other uid).
pub fn pod_paths(data_dir: &Path, uid: &str) -> PodPaths {
    let pod_dir = data_dir.join("pods").join(plain_name(uid));
    PodPaths {
        log_dir: pod_dir.join("logs"),
        volumes_dir: pod_dir.join("volumes"),
    }
}

/// The pod's cgroup parent, `/edgecore/pod<uid>`, in cgroupfs syntax: these hosts have no
/// systemd, so containerd runs with the cgroupfs driver and creates
/// `<parent>/<container id>` under every controller. The runtime removes only those leaves;
/// whoever removes the pod also removes this parent (the kubelet owns pod cgroups too).
/// `uid` is made safe as in [`pod_paths`].
pub fn cgroup_parent(uid: &str) -> String {
    format!("/edgecore/pod{}", plain_name(uid))
}

fn plain_name(uid: &str) -> String {
    if uid.is_empty() {
        return "_".to_string();
    }
    uid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether a container runs before the others, to completion, or as part of the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerKind {
    Init,
    Regular,
}

impl ContainerKind {
    /// The value of [`LABEL_CONTAINER_KIND`].
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerKind::Init => "init",
            ContainerKind::Regular => "regular",
        }
    }
}

/// A pod cannot be expressed as CRI configs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("pod has no spec")]
    MissingSpec,
    #[error("pod has no metadata.{0}")]
    MissingMetadata(&'static str),
    #[error("pod uid {0:?} is not made of letters, digits and '-'")]
    InvalidUid(String),
    #[error("invalid container name {0:?}")]
    InvalidContainerName(String),
    #[error("container {container:?} has no image")]
    NoImage { container: String },
    #[error("container {container:?}: {field} {port} is outside 1-65535")]
    PortOutOfRange {
        container: String,
        field: &'static str,
        port: i32,
    },
    #[error("container {container:?}: unknown port protocol {protocol:?}")]
    UnknownProtocol { container: String, protocol: String },
    #[error("container {container:?}: {resource}: {error}")]
    Quantity {
        container: String,
        resource: String,
        error: QuantityError,
    },
    #[error("container {container:?}: {resource} {value:?} is negative")]
    NegativeQuantity {
        container: String,
        resource: String,
        value: String,
    },
    #[error("container {container:?}: runAsNonRoot is set but runAsUser is 0")]
    RunAsRoot { container: String },
    #[error("container {container:?}: runAsNonRoot is set and the image runs as root")]
    ImageRunsAsRoot { container: String },
    #[error(
        "container {container:?}: runAsNonRoot is set and the image's user {user:?} is not numeric, so it cannot be verified"
    )]
    NonNumericImageUser { container: String, user: String },
    #[error("{0} is not supported")]
    Unsupported(String),
}

/// A container's environment references something missing. The worker reports these with the
/// kubelet's reason `CreateContainerConfigError`; the messages are the kubelet's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("configmap {name:?} not found")]
    ConfigMapNotFound { name: String },
    #[error("secret {name:?} not found")]
    SecretNotFound { name: String },
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("env {name:?} has neither a value nor a supported valueFrom")]
    EmptySource { name: String },
    #[error(transparent)]
    Field(#[from] FieldError),
}

/// A downward-API reference (env `fieldRef`/`resourceFieldRef`, downwardAPI volume item) that
/// cannot be resolved on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("unsupported fieldPath: {0}")]
    UnsupportedField(String),
    #[error("resourceFieldRef {resource} of container {container:?}: {reason}")]
    Resource {
        container: String,
        resource: String,
        reason: String,
    },
}

/// The RunPodSandbox config of `pod`; `attempt` counts the pod's sandboxes, from 0.
///
/// - hostname: `spec.hostname`, else the pod name, cut to 63 bytes and stripped of trailing
///   `-`/`.` (kubelet); empty for hostNetwork pods, which keep the node's. `subdomain` and
///   `setHostnameAsFQDN` are ignored (not supported yet, docs/services.md).
/// - DNS: `dns`, from [`pod_dns_config`].
/// - port mappings: every container port with a hostPort (not for hostNetwork pods, where the
///   ports are the host's own).
/// - labels: the pod's, then [`LABEL_POD_NAME`], [`LABEL_POD_NAMESPACE`], [`LABEL_POD_UID`] and
///   [`LABEL_MANAGED_BY`]; annotations: the pod's.
/// - linux: [`cgroup_parent`], namespaces (see [`container_config`]), the pod securityContext's
///   sysctls, runAsUser/runAsGroup, supplementalGroups (+ fsGroup), seccompProfile; privileged
///   when any container is.
pub fn sandbox_config(
    pod: &Pod,
    paths: &PodPaths,
    attempt: u32,
    dns: Option<api::DnsConfig>,
) -> Result<api::PodSandboxConfig, SpecError> {
    let id = PodId::of(pod)?;
    if id.uid.is_empty() || plain_name(id.uid) != id.uid {
        return Err(SpecError::InvalidUid(id.uid.to_string()));
    }
    let spec = pod_spec(pod)?;
    let host_network = spec.host_network.unwrap_or(false);
    let hostname = if host_network {
        String::new()
    } else {
        hostname(spec.hostname.as_deref().unwrap_or(id.name))
    };
    let port_mappings = if host_network {
        Vec::new()
    } else {
        port_mappings(spec)?
    };
    let mut labels: HashMap<String, String> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(id.labels());
    let annotations = pod
        .metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let psc = spec.security_context.as_ref();
    let privileged = all_containers(spec).any(|c| {
        c.security_context
            .as_ref()
            .and_then(|s| s.privileged)
            .unwrap_or(false)
    });
    let security_context = api::LinuxSandboxSecurityContext {
        namespace_options: Some(namespace_options(spec)),
        run_as_user: psc.and_then(|s| s.run_as_user).map(int64),
        run_as_group: psc.and_then(|s| s.run_as_group).map(int64),
        supplemental_groups: supplemental_groups(psc),
        privileged,
        seccomp: seccomp(psc.and_then(|s| s.seccomp_profile.as_ref()))?,
        ..Default::default()
    };
    let sysctls = psc
        .and_then(|s| s.sysctls.as_ref())
        .into_iter()
        .flatten()
        .map(|s| (s.name.clone(), s.value.clone()))
        .collect();
    Ok(api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: id.name.to_string(),
            uid: id.uid.to_string(),
            namespace: id.namespace.to_string(),
            attempt,
        }),
        hostname,
        log_directory: paths.log_dir.to_string_lossy().into_owned(),
        dns_config: dns,
        port_mappings,
        labels,
        annotations,
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent(id.uid),
            security_context: Some(security_context),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Most nameservers a pod's resolv.conf gets (the kubelet's and glibc's limit).
pub const MAX_DNS_NAMESERVERS: usize = 3;
/// Most search domains, and most characters of the search line (the kubelet's limits with
/// ExpandedDNSConfig, GA since 1.28).
pub const MAX_DNS_SEARCHES: usize = 32;
pub const MAX_DNS_SEARCH_CHARS: usize = 2048;
/// Longest search domain kept (glibc aborts on longer ones).
const MAX_DNS_SEARCH_LEN: usize = 253;
/// The options of a `ClusterFirst` pod (the kubelet's).
const CLUSTER_DNS_OPTIONS: [&str; 1] = ["ndots:5"];

/// A pod's DNS: the sandbox's config and the warnings the kubelet records for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDnsConfig {
    /// `None`: the runtime's default, a copy of the gateway's resolv.conf.
    pub config: Option<api::DnsConfig>,
    /// Warning events for the pod: (reason, message).
    pub warnings: Vec<(&'static str, String)>,
}

/// The sandbox DNS config of `pod`, with the kubelet's rules (`dnsPolicy`, default
/// `ClusterFirst`):
///
/// - `ClusterFirst` (not hostNetwork) and `ClusterFirstWithHostNet`, with cluster DNS: the
///   cluster DNS as the only nameserver, search `NS.svc.DOMAIN svc.DOMAIN DOMAIN` then the
///   host's searches, `options ndots:5`;
/// - the same without cluster DNS (`--cluster-dns none`): a `MissingClusterDNS` warning and
///   `Default`;
/// - `Default` (and `ClusterFirst` with hostNetwork): the host's resolv.conf: without a
///   `dnsConfig`, `None` (containerd copies the host's file); with one, the host's settings
///   read through `host`;
/// - `None`: only what `dnsConfig` gives.
///
/// Then `dnsConfig` is merged in: nameservers and searches appended (each once), options by
/// name (a value given replacing the one there). Past the limits ([`MAX_DNS_NAMESERVERS`],
/// [`MAX_DNS_SEARCHES`], [`MAX_DNS_SEARCH_CHARS`], search domains over 253 characters) the
/// rest is left out with a `DNSConfigForming` warning. `host` is called only when needed.
pub fn pod_dns_config(
    pod: &Pod,
    cluster: Option<&crate::services::PodDns>,
    host: impl FnOnce() -> crate::services::dns::ResolvConf,
) -> PodDnsConfig {
    let mut warnings = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return PodDnsConfig::default();
    };
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster_policy = match policy {
        "None" | "Default" => false,
        "ClusterFirst" => !host_network,
        // ClusterFirstWithHostNet, and an unknown policy as the kubelet (ClusterFirst).
        _ => true,
    };
    let mut base = if policy == "None" {
        api::DnsConfig::default()
    } else if let (true, Some(cluster)) = (cluster_policy, cluster) {
        let domain = cluster.cluster_domain.as_str();
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let mut searches = vec![
            format!("{namespace}.svc.{domain}"),
            format!("svc.{domain}"),
            domain.to_string(),
        ];
        searches.extend(host().searches);
        api::DnsConfig {
            servers: vec![cluster.server.to_string()],
            searches: unique(searches),
            options: CLUSTER_DNS_OPTIONS.iter().map(|o| o.to_string()).collect(),
        }
    } else {
        if cluster_policy {
            warnings.push((
                "MissingClusterDNS",
                format!(
                    "pod: \"{}_{}({})\". edgecore runs without cluster DNS (--cluster-dns none) and cannot create Pod using \"{policy}\" policy. Falling back to \"Default\" policy.",
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                    pod.metadata.uid.as_deref().unwrap_or_default(),
                ),
            ));
        }
        if spec.dns_config.is_none() {
            return PodDnsConfig {
                config: None,
                warnings,
            };
        }
        let host = host();
        api::DnsConfig {
            servers: host.nameservers,
            searches: host.searches,
            options: host.options,
        }
    };
    if let Some(extra) = &spec.dns_config {
        base.servers
            .extend(extra.nameservers.iter().flatten().cloned());
        base.servers = unique(std::mem::take(&mut base.servers));
        base.searches
            .extend(extra.searches.iter().flatten().cloned());
        base.searches = unique(std::mem::take(&mut base.searches));
        for option in extra.options.iter().flatten() {
            let Some(name) = option.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let merged = match &option.value {
                Some(value) => format!("{name}:{value}"),
                None => name.to_string(),
            };
            let same = |o: &String| o.split(':').next() == Some(name);
            match base.options.iter_mut().find(|o| same(o)) {
                Some(existing) => *existing = merged,
                None => base.options.push(merged),
            }
        }
    }
    if base.servers.len() > MAX_DNS_NAMESERVERS {
        base.servers.truncate(MAX_DNS_NAMESERVERS);
        warnings.push((
            "DNSConfigForming",
            format!(
                "Nameserver limits were exceeded, some nameservers have been omitted, the applied nameserver line is: {}",
                base.servers.join(" ")
            ),
        ));
    }
    let mut exceeded = base.searches.len() > MAX_DNS_SEARCHES;
    base.searches.truncate(MAX_DNS_SEARCHES);
    let before = base.searches.len();
    base.searches.retain(|s| s.len() <= MAX_DNS_SEARCH_LEN);
    exceeded |= base.searches.len() != before;
    while base.searches.join(" ").len() > MAX_DNS_SEARCH_CHARS {
        base.searches.pop();
        exceeded = true;
    }
    if exceeded {
        warnings.push((
            "DNSConfigForming",
            format!(
                "Search Line limits were exceeded, some search paths have been omitted, the applied search line is: {}",
                base.searches.join(" ")
            ),
        ));
    }
    PodDnsConfig {
        config: Some(base),
        warnings,
    }
}

/// `items` without repeats, in first-seen order.
fn unique(items: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(item.clone()))
        .collect()
}

/// The CreateContainer config of `container` in `pod`; `attempt` counts its restarts, from 0.
/// `env` comes from [`container_env`], `mounts` from [`super::volumes::mounts`].
///
/// - image as given (no normalization); command and args with `$(VAR)` expanded from `env`
///   (kubelet); working_dir, stdin, stdin_once, tty from the spec.
/// - log_path `<name>/<attempt>.log`, relative to the sandbox's log directory.
/// - labels: [`LABEL_MANAGED_BY`], the pod labels of [`sandbox_config`], [`LABEL_CONTAINER_NAME`]
///   and [`LABEL_CONTAINER_KIND`]; annotations: restart count, termination message path and
///   policy, the pod's termination grace period (kubelet keys).
/// - resources: cpu_shares from the cpu request (or the limit when there is no request;
///   `milli*1024/1000`, at least 2), CFS quota from the cpu limit (period 100000 µs,
///   `milli*100`, at least 1000), memory limit in bytes, oom_score_adj 1000 for BestEffort
///   pods and 0 otherwise (containerd here clamps lower values to 0 anyway).
/// - security: runAsUser/runAsGroup/runAsNonRoot/seccompProfile from the container, else the
///   pod; privileged, readOnlyRootFilesystem, capabilities (upper case, without `CAP_`:
///   containerd prefixes `CAP_` itself), no_new_privs when allowPrivilegeEscalation is false;
///   supplementalGroups + fsGroup of the pod.
/// - namespaces (as the kubelet): network and IPC are the pod's, or the node's with
///   hostNetwork/hostIPC; PID is the container's own unless hostPID (node) or
///   shareProcessNamespace (pod).
///
/// runAsNonRoot with an image that runs as root is checked by [`apply_image_user`], which the
/// caller runs once it knows the image.
pub fn container_config(
    pod: &Pod,
    container: &Container,
    kind: ContainerKind,
    attempt: u32,
    env: Vec<api::KeyValue>,
    mounts: Vec<api::Mount>,
) -> Result<api::ContainerConfig, SpecError> {
    let id = PodId::of(pod)?;
    let spec = pod_spec(pod)?;
    let name = container.name.as_str();
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(SpecError::InvalidContainerName(name.to_string()));
    }
    let image = container
        .image
        .as_deref()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| SpecError::NoImage {
            container: name.to_string(),
        })?;
    let lookup = |var: &str| {
        env.iter()
            .find(|kv| kv.key == var)
            .map(|kv| kv.value.clone())
    };
    let expand_all = |words: &Option<Vec<String>>| -> Vec<String> {
        words.iter().flatten().map(|w| expand(w, lookup)).collect()
    };
    let command = expand_all(&container.command);
    let args = expand_all(&container.args);
    let mut labels = id.labels();
    labels.insert(LABEL_CONTAINER_NAME.to_string(), name.to_string());
    labels.insert(LABEL_CONTAINER_KIND.to_string(), kind.as_str().to_string());
    let annotations = HashMap::from([
        (ANNOTATION_RESTART_COUNT.to_string(), attempt.to_string()),
        (
            ANNOTATION_TERMINATION_MESSAGE_PATH.to_string(),
            container
                .termination_message_path
                .clone()
                .unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_PATH.to_string()),
        ),
        (
            ANNOTATION_TERMINATION_MESSAGE_POLICY.to_string(),
            container
                .termination_message_policy
                .clone()
                .unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_POLICY.to_string()),
        ),
        (
            ANNOTATION_TERMINATION_GRACE_PERIOD.to_string(),
            spec.termination_grace_period_seconds
                .unwrap_or(DEFAULT_TERMINATION_GRACE_PERIOD)
                .to_string(),
        ),
    ]);
    Ok(api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_string(),
            attempt,
        }),
        image: Some(api::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command,
        args,
        working_dir: container.working_dir.clone().unwrap_or_default(),
        envs: env,
        mounts,
        labels,
        annotations,
        log_path: format!("{name}/{attempt}.log"),
        stdin: container.stdin.unwrap_or(false),
        stdin_once: container.stdin_once.unwrap_or(false),
        tty: container.tty.unwrap_or(false),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(linux_resources(spec, container)?),
            security_context: Some(container_security_context(spec, container)?),
        }),
        ..Default::default()
    })
}

/// Completes a container config with the image's user and enforces runAsNonRoot, as the
/// kubelet does once it knows the image: when neither the container nor the pod sets
/// runAsUser, the image's numeric uid (or else its user name) is used; an image without a user
/// runs as root. containerd rejects a runAsGroup without a user, so call this before
/// CreateContainer whenever the pod may set runAsGroup or runAsNonRoot.
pub fn apply_image_user(
    pod: &Pod,
    container: &Container,
    image: &api::Image,
    config: &mut api::ContainerConfig,
) -> Result<(), SpecError> {
    let spec = pod_spec(pod)?;
    let non_root = effective(
        spec,
        container,
        |s| s.run_as_non_root,
        |s| s.run_as_non_root,
    )
    .unwrap_or(false);
    let context = config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default);
    let name = || container.name.clone();
    if let Some(uid) = &context.run_as_user {
        // Set from the spec; container_config already refused uid 0 with runAsNonRoot.
        if non_root && uid.value == 0 {
            return Err(SpecError::RunAsRoot { container: name() });
        }
        return Ok(());
    }
    if !context.run_as_username.is_empty() {
        return Ok(());
    }
    match (&image.uid, image.username.as_str()) {
        (Some(uid), _) => {
            if non_root && uid.value == 0 {
                return Err(SpecError::ImageRunsAsRoot { container: name() });
            }
            context.run_as_user = Some(int64(uid.value));
        }
        (None, "") => {
            if non_root {
                return Err(SpecError::ImageRunsAsRoot { container: name() });
            }
            context.run_as_user = Some(int64(0));
        }
        (None, user) => {
            if non_root {
                return Err(SpecError::NonNumericImageUser {
                    container: name(),
                    user: user.to_string(),
                });
            }
            context.run_as_username = user.to_string();
        }
    }
    Ok(())
}

/// The environment of `container`, with the kubelet's semantics:
///
/// 1. `envFrom` in order: every key of the ConfigMap's `data` or the Secret's `data` (decoded
///    as UTF-8, lossily), with the optional prefix; keys that are not valid variable names are
///    skipped; a missing source is an error unless optional.
/// 2. `env` in order, later definitions winning: `value` with `$(VAR)` expanded from what is
///    defined so far (`$$` is a literal `$`, unknown references stay as written), or
///    `valueFrom`: configMapKeyRef/secretKeyRef (skipped when optional and missing), fieldRef
///    (`metadata.name|namespace|uid`, `metadata.labels['k']`, `metadata.annotations['k']`,
///    `spec.nodeName` = `node_name`, `spec.serviceAccountName`, `status.podIP(s)` = `pod_ip`),
///    resourceFieldRef (`limits.*`/`requests.*` of cpu, memory, ephemeral-storage; a limit the
///    container does not set is an error, since the node's allocatable is not known here).
///
/// Variables keep the position of their first definition. Then come the Service variables
/// (`service_env`, from [`crate::services::env::service_env`]) whose names the container
/// does not define; `$(VAR)` in `env` values sees them too, the container's own first.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    objects: &Objects,
    service_env: &[(String, String)],
    pod_ip: &str,
    node_name: &str,
) -> Result<Vec<api::KeyValue>, EnvError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = Env::default();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or("");
        if let Some(reference) = &source.config_map_ref {
            match objects.config_maps.get(&reference.name) {
                Some(map) => {
                    for (key, value) in map.data.iter().flatten() {
                        env.set_if_valid(format!("{prefix}{key}"), value.clone());
                    }
                }
                None if reference.optional.unwrap_or(false) => {}
                None => {
                    return Err(EnvError::ConfigMapNotFound {
                        name: reference.name.clone(),
                    });
                }
            }
        }
        if let Some(reference) = &source.secret_ref {
            match objects.secrets.get(&reference.name) {
                Some(secret) => {
                    for (key, value) in secret.data.iter().flatten() {
                        let value = String::from_utf8_lossy(&value.0).into_owned();
                        env.set_if_valid(format!("{prefix}{key}"), value);
                    }
                }
                None if reference.optional.unwrap_or(false) => {}
                None => {
                    return Err(EnvError::SecretNotFound {
                        name: reference.name.clone(),
                    });
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (var.value.as_deref(), &var.value_from) {
            (Some(value), _) if !value.is_empty() => expand(value, |name| {
                env.get(name).or_else(|| {
                    service_env
                        .iter()
                        .find(|(key, _)| key == name)
                        .map(|(_, value)| value.clone())
                })
            }),
            (_, Some(_)) => {
                match env_source(pod, container, objects, &namespace, var, pod_ip, node_name)? {
                    Some(value) => value,
                    None => continue,
                }
            }
            (_, None) => String::new(),
        };
        env.set(var.name.clone(), value);
    }
    for (name, value) in service_env {
        if env.get(name).is_none() {
            env.set(name.clone(), value.clone());
        }
    }
    Ok(env.into_key_values())
}

/// The value of one `valueFrom`; `None` when an optional reference is missing.
fn env_source(
    pod: &Pod,
    container: &Container,
    objects: &Objects,
    namespace: &str,
    var: &EnvVar,
    pod_ip: &str,
    node_name: &str,
) -> Result<Option<String>, EnvError> {
    let empty = || EnvError::EmptySource {
        name: var.name.clone(),
    };
    let source = var.value_from.as_ref().ok_or_else(empty)?;
    if let Some(selector) = &source.config_map_key_ref {
        let optional = selector.optional.unwrap_or(false);
        let Some(map) = objects.config_maps.get(&selector.name) else {
            if optional {
                return Ok(None);
            }
            return Err(EnvError::ConfigMapNotFound {
                name: selector.name.clone(),
            });
        };
        return match map.data.as_ref().and_then(|d| d.get(&selector.key)) {
            Some(value) => Ok(Some(value.clone())),
            None if optional => Ok(None),
            None => Err(EnvError::ConfigMapKeyNotFound {
                namespace: namespace.to_string(),
                name: selector.name.clone(),
                key: selector.key.clone(),
            }),
        };
    }
    if let Some(selector) = &source.secret_key_ref {
        let optional = selector.optional.unwrap_or(false);
        let Some(secret) = objects.secrets.get(&selector.name) else {
            if optional {
                return Ok(None);
            }
            return Err(EnvError::SecretNotFound {
                name: selector.name.clone(),
            });
        };
        return match secret.data.as_ref().and_then(|d| d.get(&selector.key)) {
            Some(value) => Ok(Some(String::from_utf8_lossy(&value.0).into_owned())),
            None if optional => Ok(None),
            None => Err(EnvError::SecretKeyNotFound {
                namespace: namespace.to_string(),
                name: selector.name.clone(),
                key: selector.key.clone(),
            }),
        };
    }
    if let Some(selector) = &source.field_ref {
        let path = selector.field_path.as_str();
        let value = match path {
            "spec.nodeName" => node_name.to_string(),
            "status.podIP" | "status.podIPs" => pod_ip.to_string(),
            _ => {
                object_field(pod, path).ok_or_else(|| FieldError::UnsupportedField(path.into()))?
            }
        };
        return Ok(Some(value));
    }
    if let Some(selector) = &source.resource_field_ref {
        return Ok(Some(resource_field(pod, Some(container), selector)?));
    }
    Err(empty())
}

/// Environment under construction: first-definition order, later values win.
#[derive(Default)]
struct Env {
    vars: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl Env {
    fn set(&mut self, name: String, value: String) {
        match self.index.get(&name) {
            Some(&i) => self.vars[i].1 = value,
            None => {
                self.index.insert(name.clone(), self.vars.len());
                self.vars.push((name, value));
            }
        }
    }

    fn set_if_valid(&mut self, name: String, value: String) {
        if is_env_var_name(&name) {
            self.set(name, value);
        } else {
            tracing::debug!(env.name = %name, "skipping envFrom key that is not a valid variable name");
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.index.get(name).map(|&i| self.vars[i].1.clone())
    }

    fn into_key_values(self) -> Vec<api::KeyValue> {
        self.vars
            .into_iter()
            .map(|(key, value)| api::KeyValue { key, value })
            .collect()
    }
}

/// Kubernetes' rule for environment variable names: `[-._a-zA-Z][-._a-zA-Z0-9]*`.
fn is_env_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    let allowed = |c: char| c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_');
    chars.next().is_some_and(allowed) && chars.all(|c| allowed(c) || c.is_ascii_digit())
}

/// Expands `$(VAR)` references the way the kubelet does: `$$` is a literal `$`, a reference
/// that `lookup` cannot resolve stays as written, an unterminated `$(` and any other `$` are
/// kept as they are.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        match after.chars().next() {
            None => {
                out.push('$');
                rest = after;
            }
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('(') => match after[1..].find(')') {
                Some(close) => {
                    let name = &after[1..1 + close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 2..];
                }
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(c) => {
                out.push('$');
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The pod fields available both to env and to downwardAPI volumes: `metadata.name`,
/// `metadata.namespace`, `metadata.uid`, `metadata.labels['k']`, `metadata.annotations['k']`
/// (empty when the key is absent), `spec.nodeName`, `spec.serviceAccountName`.
pub(crate) fn object_field(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    match path {
        "metadata.name" => return Some(meta.name.clone().unwrap_or_default()),
        "metadata.namespace" => return Some(meta.namespace.clone().unwrap_or_default()),
        "metadata.uid" => return Some(meta.uid.clone().unwrap_or_default()),
        "spec.nodeName" => {
            return Some(pod.spec.as_ref()?.node_name.clone().unwrap_or_default());
        }
        "spec.serviceAccountName" => {
            return Some(
                pod.spec
                    .as_ref()?
                    .service_account_name
                    .clone()
                    .unwrap_or_default(),
            );
        }
        _ => {}
    }
    let (map, key) = subscripted(path)?;
    let map = match map {
        "metadata.labels" => meta.labels.as_ref(),
        "metadata.annotations" => meta.annotations.as_ref(),
        _ => return None,
    };
    Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
}

/// Splits `path['key']` into `(path, key)`.
fn subscripted(path: &str) -> Option<(&str, &str)> {
    let (map, rest) = path.split_once("['")?;
    let key = rest.strip_suffix("']")?;
    Some((map, key))
}

/// The value of a resourceFieldRef, as the kubelet renders it: cpu as
/// `ceil(milli / divisor milli)`, memory and ephemeral-storage as `ceil(bytes / divisor)`;
/// the divisor defaults to 1. `current` is the container of an env reference; the selector's
/// containerName, when set, names the container instead.
pub(crate) fn resource_field(
    pod: &Pod,
    current: Option<&Container>,
    selector: &ResourceFieldSelector,
) -> Result<String, FieldError> {
    let wanted = selector.container_name.as_deref().filter(|n| !n.is_empty());
    let container = match (wanted, current) {
        (None, Some(c)) => Some(c),
        (Some(name), _) => pod
            .spec
            .as_ref()
            .and_then(|s| all_containers(s).find(|c| c.name == name)),
        (None, None) => None,
    };
    let resource = selector.resource.as_str();
    let fail = |reason: &str| FieldError::Resource {
        container: wanted
            .or(current.map(|c| c.name.as_str()))
            .unwrap_or_default()
            .to_string(),
        resource: resource.to_string(),
        reason: reason.to_string(),
    };
    let container = container.ok_or_else(|| fail("no such container"))?;
    let (limit, name) = if let Some(name) = resource.strip_prefix("limits.") {
        (true, name)
    } else if let Some(name) = resource.strip_prefix("requests.") {
        (false, name)
    } else {
        return Err(fail("unsupported resource"));
    };
    if !matches!(name, "cpu" | "memory" | "ephemeral-storage") {
        return Err(fail("unsupported resource"));
    }
    let resources = container.resources.as_ref();
    let map = if limit {
        resources.and_then(|r| r.limits.as_ref())
    } else {
        resources.and_then(|r| r.requests.as_ref())
    };
    let amount = match map.and_then(|m| m.get(name)) {
        Some(q) => Amount::parse(&q.0).map_err(|e| fail(&e.to_string()))?,
        None if limit => {
            return Err(fail(
                "the container sets no such limit and the node's allocatable is not known here",
            ));
        }
        None => Amount::ZERO,
    };
    let divisor = match &selector.divisor {
        Some(q) => Amount::parse(&q.0).map_err(|e| fail(&e.to_string()))?,
        None => Amount::ONE,
    };
    let overflow = |_| fail("value out of range");
    let value = if name == "cpu" {
        let divisor = divisor.milli().map_err(overflow)?;
        if divisor <= 0 {
            return Err(fail("divisor must be positive"));
        }
        ceil_div(
            i128::from(amount.milli().map_err(overflow)?),
            i128::from(divisor),
        )
    } else {
        let divisor = divisor.value().map_err(overflow)?;
        if divisor <= 0 {
            return Err(fail("divisor must be positive"));
        }
        ceil_div(
            i128::from(amount.value().map_err(overflow)?),
            i128::from(divisor),
        )
    };
    Ok(value.to_string())
}

/// A pod's identity, required on every config.
struct PodId<'a> {
    name: &'a str,
    namespace: &'a str,
    uid: &'a str,
}

impl<'a> PodId<'a> {
    fn of(pod: &'a Pod) -> Result<PodId<'a>, SpecError> {
        let meta = &pod.metadata;
        Ok(PodId {
            name: meta
                .name
                .as_deref()
                .ok_or(SpecError::MissingMetadata("name"))?,
            namespace: meta
                .namespace
                .as_deref()
                .ok_or(SpecError::MissingMetadata("namespace"))?,
            uid: meta
                .uid
                .as_deref()
                .ok_or(SpecError::MissingMetadata("uid"))?,
        })
    }

    /// Our labels, common to sandboxes and containers.
    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_POD_NAME.to_string(), self.name.to_string()),
            (LABEL_POD_NAMESPACE.to_string(), self.namespace.to_string()),
            (LABEL_POD_UID.to_string(), self.uid.to_string()),
            (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        ])
    }
}

fn pod_spec(pod: &Pod) -> Result<&PodSpec, SpecError> {
    pod.spec.as_ref().ok_or(SpecError::MissingSpec)
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

/// `name` as a hostname: names longer than 63 bytes are cut, then stripped of trailing `-`
/// and `.` (the kubelet's rule).
fn hostname(name: &str) -> String {
    if name.len() <= MAX_HOSTNAME_LEN {
        return name.to_string();
    }
    let mut end = MAX_HOSTNAME_LEN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].trim_end_matches(['-', '.']).to_string()
}

fn port_mappings(spec: &PodSpec) -> Result<Vec<api::PortMapping>, SpecError> {
    let mut mappings = Vec::new();
    for container in &spec.containers {
        for port in container.ports.iter().flatten() {
            let Some(host_port) = port.host_port.filter(|&p| p != 0) else {
                continue;
            };
            let out_of_range = |field, port| SpecError::PortOutOfRange {
                container: container.name.clone(),
                field,
                port,
            };
            if !(1..=65535).contains(&host_port) {
                return Err(out_of_range("hostPort", host_port));
            }
            if !(1..=65535).contains(&port.container_port) {
                return Err(out_of_range("containerPort", port.container_port));
            }
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => api::Protocol::Tcp,
                "UDP" => api::Protocol::Udp,
                "SCTP" => api::Protocol::Sctp,
                other => {
                    return Err(SpecError::UnknownProtocol {
                        container: container.name.clone(),
                        protocol: other.to_string(),
                    });
                }
            };
            mappings.push(api::PortMapping {
                protocol: protocol as i32,
                container_port: port.container_port,
                host_port,
                host_ip: port.host_ip.clone().unwrap_or_default(),
            });
        }
    }
    Ok(mappings)
}

fn namespace_options(spec: &PodSpec) -> api::NamespaceOption {
    let mode = |node: Option<bool>, otherwise: api::NamespaceMode| {
        if node.unwrap_or(false) {
            api::NamespaceMode::Node as i32
        } else {
            otherwise as i32
        }
    };
    let pid_otherwise = if spec.share_process_namespace.unwrap_or(false) {
        api::NamespaceMode::Pod
    } else {
        api::NamespaceMode::Container
    };
    api::NamespaceOption {
        network: mode(spec.host_network, api::NamespaceMode::Pod),
        pid: mode(spec.host_pid, pid_otherwise),
        ipc: mode(spec.host_ipc, api::NamespaceMode::Pod),
        ..Default::default()
    }
}

fn supplemental_groups(psc: Option<&PodSecurityContext>) -> Vec<i64> {
    let mut groups: Vec<i64> = psc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default();
    if let Some(fs_group) = psc.and_then(|s| s.fs_group)
        && !groups.contains(&fs_group)
    {
        groups.push(fs_group);
    }
    groups
}

fn seccomp(profile: Option<&SeccompProfile>) -> Result<Option<api::SecurityProfile>, SpecError> {
    use api::security_profile::ProfileType;
    let Some(profile) = profile else {
        // Unset: containerd's default, unconfined (as the kubelet without SeccompDefault).
        return Ok(None);
    };
    let profile_type = match profile.type_.as_str() {
        "RuntimeDefault" => ProfileType::RuntimeDefault,
        "Unconfined" => ProfileType::Unconfined,
        other => {
            return Err(SpecError::Unsupported(format!(
                "seccompProfile type {other:?}"
            )));
        }
    };
    Ok(Some(api::SecurityProfile {
        profile_type: profile_type as i32,
        localhost_ref: String::new(),
    }))
}

fn int64(value: i64) -> api::Int64Value {
    api::Int64Value { value }
}

/// The container's setting, else the pod's.
fn effective<T>(
    spec: &PodSpec,
    container: &Container,
    from_container: impl Fn(&k8s_openapi::api::core::v1::SecurityContext) -> Option<T>,
    from_pod: impl Fn(&PodSecurityContext) -> Option<T>,
) -> Option<T> {
    container
        .security_context
        .as_ref()
        .and_then(from_container)
        .or_else(|| spec.security_context.as_ref().and_then(from_pod))
}

fn container_security_context(
    spec: &PodSpec,
    container: &Container,
) -> Result<api::LinuxContainerSecurityContext, SpecError> {
    let csc = container.security_context.as_ref();
    let run_as_user = effective(spec, container, |s| s.run_as_user, |s| s.run_as_user);
    let run_as_group = effective(spec, container, |s| s.run_as_group, |s| s.run_as_group);
    let run_as_non_root = effective(
        spec,
        container,
        |s| s.run_as_non_root,
        |s| s.run_as_non_root,
    )
    .unwrap_or(false);
    if run_as_non_root && run_as_user == Some(0) {
        return Err(SpecError::RunAsRoot {
            container: container.name.clone(),
        });
    }
    let seccomp_profile = effective(
        spec,
        container,
        |s| s.seccomp_profile.clone(),
        |s| s.seccomp_profile.clone(),
    );
    let capabilities = csc.and_then(|s| s.capabilities.as_ref()).map(|caps| {
        let names = |list: &Option<Vec<String>>| -> Vec<String> {
            list.iter().flatten().map(|c| capability_name(c)).collect()
        };
        api::Capability {
            add_capabilities: names(&caps.add),
            drop_capabilities: names(&caps.drop),
            ..Default::default()
        }
    });
    Ok(api::LinuxContainerSecurityContext {
        capabilities,
        privileged: csc.and_then(|s| s.privileged).unwrap_or(false),
        namespace_options: Some(namespace_options(spec)),
        run_as_user: run_as_user.map(int64),
        run_as_group: run_as_group.map(int64),
        readonly_rootfs: csc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        supplemental_groups: supplemental_groups(spec.security_context.as_ref()),
        no_new_privs: csc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        seccomp: seccomp(seccomp_profile.as_ref())?,
        ..Default::default()
    })
}

/// A capability as containerd 1.6 wants it: upper case, without `CAP_` (containerd prepends
/// `CAP_` to every name but `ALL`, so `CAP_NET_ADMIN` would become `CAP_CAP_NET_ADMIN`).
fn capability_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    match upper.strip_prefix("CAP_") {
        Some(bare) => bare.to_string(),
        None => upper,
    }
}

/// Whether no container of the pod requests or limits cpu or memory (QoS class BestEffort).
fn best_effort(spec: &PodSpec) -> bool {
    all_containers(spec).all(|c| {
        let resources = c.resources.as_ref();
        [
            resources.and_then(|r| r.requests.as_ref()),
            resources.and_then(|r| r.limits.as_ref()),
        ]
        .into_iter()
        .flatten()
        .all(|m| !m.contains_key("cpu") && !m.contains_key("memory"))
    })
}

fn linux_resources(
    spec: &PodSpec,
    container: &Container,
) -> Result<api::LinuxContainerResources, SpecError> {
    let resources = container.resources.as_ref();
    let requests = resources.and_then(|r| r.requests.as_ref());
    let limits = resources.and_then(|r| r.limits.as_ref());
    let cpu_request = quantity(container, requests, "requests", "cpu")?;
    let cpu_limit = quantity(container, limits, "limits", "cpu")?;
    let memory_limit = quantity(container, limits, "limits", "memory")?;
    let milli = |a: Option<Amount>, resource: &str| -> Result<i64, SpecError> {
        a.map_or(Ok(0), |a| {
            a.milli().map_err(|error| SpecError::Quantity {
                container: container.name.clone(),
                resource: resource.to_string(),
                error,
            })
        })
    };
    let request_milli = milli(cpu_request, "requests.cpu")?;
    let limit_milli = milli(cpu_limit, "limits.cpu")?;
    let shares_milli = if request_milli == 0 {
        limit_milli
    } else {
        request_milli
    };
    let cpu_shares = (i128::from(shares_milli) * 1024 / 1000)
        .clamp(i128::from(MIN_CPU_SHARES), i128::from(MAX_CPU_SHARES)) as i64;
    let (cpu_period, cpu_quota) = if limit_milli > 0 {
        let quota = (i128::from(limit_milli) * i128::from(CPU_PERIOD_US) / 1000)
            .clamp(i128::from(MIN_CPU_QUOTA_US), i128::from(i64::MAX)) as i64;
        (CPU_PERIOD_US, quota)
    } else {
        (0, 0)
    };
    let memory_limit_in_bytes = match memory_limit {
        Some(a) => a.value().map_err(|error| SpecError::Quantity {
            container: container.name.clone(),
            resource: "limits.memory".to_string(),
            error,
        })?,
        None => 0,
    };
    Ok(api::LinuxContainerResources {
        cpu_period,
        cpu_quota,
        cpu_shares,
        memory_limit_in_bytes,
        oom_score_adj: if best_effort(spec) {
            BEST_EFFORT_OOM_SCORE_ADJ
        } else {
            0
        },
        ..Default::default()
    })
}

/// `map[name]` parsed; negative amounts are refused.
fn quantity(
    container: &Container,
    map: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
    kind: &str,
    name: &str,
) -> Result<Option<Amount>, SpecError> {
    let Some(q) = map.and_then(|m| m.get(name)) else {
        return Ok(None);
    };
    let resource = format!("{kind}.{name}");
    let amount = Amount::parse(&q.0).map_err(|error| SpecError::Quantity {
        container: container.name.clone(),
        resource: resource.clone(),
        error,
    })?;
    if amount.numerator < 0 {
        return Err(SpecError::NegativeQuantity {
            container: container.name.clone(),
            resource,
            value: q.0.clone(),
        });
    }
    Ok(Some(amount))
}

/// A Kubernetes quantity (`100m`, `0.5`, `128Mi`, `1G`, `1e3`), held exactly as a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount {
    numerator: i128,
    /// Always positive.
    denominator: i128,
}

/// A string is not a Kubernetes quantity, or does not fit the integer asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {0:?}")]
pub struct QuantityError(String);

impl Amount {
    const ZERO: Amount = Amount {
        numerator: 0,
        denominator: 1,
    };
    const ONE: Amount = Amount {
        numerator: 1,
        denominator: 1,
    };

    /// Parses `[+-]digits[.digits][suffix]` with suffix one of the binary `Ki Mi Gi Ti Pi Ei`,
    /// the decimal `n u m k M G T P E`, or an exponent `e<int>`/`E<int>`.
    pub fn parse(text: &str) -> Result<Amount, QuantityError> {
        let fail = || QuantityError(text.to_string());
        let (negative, unsigned) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let number_len = unsigned
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(unsigned.len());
        let (number, suffix) = unsigned.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if fraction.contains('.') || whole.len() + fraction.len() == 0 {
            return Err(fail());
        }
        let mut numerator: i128 = 0;
        for digit in whole.bytes().chain(fraction.bytes()) {
            numerator = numerator
                .checked_mul(10)
                .and_then(|n| n.checked_add(i128::from(digit - b'0')))
                .ok_or_else(fail)?;
        }
        let mut denominator = pow10(fraction.len() as u32).ok_or_else(fail)?;
        let binary = |shift: u32| (1i128 << shift, 1);
        let decimal = |exp: u32| (10i128.pow(exp), 1);
        let (multiply, divide) = match suffix {
            "" => (1, 1),
            "Ki" => binary(10),
            "Mi" => binary(20),
            "Gi" => binary(30),
            "Ti" => binary(40),
            "Pi" => binary(50),
            "Ei" => binary(60),
            "n" => (1, 10i128.pow(9)),
            "u" => (1, 10i128.pow(6)),
            "m" => (1, 10i128.pow(3)),
            "k" => decimal(3),
            "M" => decimal(6),
            "G" => decimal(9),
            "T" => decimal(12),
            "P" => decimal(15),
            "E" => decimal(18),
            _ => {
                let exponent = suffix
                    .strip_prefix(['e', 'E'])
                    .filter(|e| !e.is_empty())
                    .and_then(|e| e.parse::<i32>().ok())
                    .ok_or_else(fail)?;
                let power = pow10(exponent.unsigned_abs()).ok_or_else(fail)?;
                if exponent >= 0 {
                    (power, 1)
                } else {
                    (1, power)
                }
            }
        };
        numerator = numerator.checked_mul(multiply).ok_or_else(fail)?;
        denominator = denominator.checked_mul(divide).ok_or_else(fail)?;
        let divisor = gcd(numerator, denominator);
        if negative {
            numerator = -numerator;
        }
        Ok(Amount {
            numerator: numerator / divisor,
            denominator: denominator / divisor,
        })
    }

    /// Thousandths, rounded up (Kubernetes' `MilliValue`).
    pub fn milli(&self) -> Result<i64, QuantityError> {
        let scaled = self
            .numerator
            .checked_mul(1000)
            .ok_or_else(|| self.overflow())?;
        i64::try_from(ceil_div(scaled, self.denominator)).map_err(|_| self.overflow())
    }

    /// The value, rounded up (Kubernetes' `Value`).
    pub fn value(&self) -> Result<i64, QuantityError> {
        i64::try_from(ceil_div(self.numerator, self.denominator)).map_err(|_| self.overflow())
    }

    fn overflow(&self) -> QuantityError {
        QuantityError(format!("{}/{}", self.numerator, self.denominator))
    }
}

fn pow10(exponent: u32) -> Option<i128> {
    10i128.checked_pow(exponent)
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs().max(1)
}

/// `ceil(a / b)` for `b > 0`.
fn ceil_div(a: i128, b: i128) -> i128 {
    a.div_euclid(b) + i128::from(a.rem_euclid(b) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a valid pod")
    }

    /// A pod with one container named `c`; `spec` and `container` are merged into the base.
    fn pod_with(spec: serde_json::Value, container: serde_json::Value) -> Pod {
        let mut c = json!({"name": "c", "image": "localhost/edgelab/busybox:1"});
        merge(&mut c, container);
        let mut s = json!({"containers": [c]});
        merge(&mut s, spec);
        pod(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "1234-abcd"},
            "spec": s,
        }))
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        if let (Some(base), serde_json::Value::Object(extra)) = (base.as_object_mut(), extra) {
            base.extend(extra);
        }
    }

    fn paths() -> PodPaths {
        pod_paths(Path::new("/data"), "1234-abcd")
    }

    fn sandbox(pod: &Pod) -> api::PodSandboxConfig {
        sandbox_config(pod, &paths(), 0, None).expect("sandbox config")
    }

    fn config(pod: &Pod) -> api::ContainerConfig {
        let container = &pod.spec.as_ref().expect("spec").containers[0];
        container_config(pod, container, ContainerKind::Regular, 0, vec![], vec![])
            .expect("container config")
    }

    fn linux_sc(config: &api::ContainerConfig) -> api::LinuxContainerSecurityContext {
        config
            .linux
            .clone()
            .and_then(|l| l.security_context)
            .expect("security context")
    }

    fn resources(config: &api::ContainerConfig) -> api::LinuxContainerResources {
        config
            .linux
            .clone()
            .and_then(|l| l.resources)
            .expect("resources")
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<api::KeyValue> {
        pairs
            .iter()
            .map(|(k, v)| api::KeyValue {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect()
    }

    #[test]
    fn paths_and_cgroup_parent_stay_below_their_roots() {
        let p = pod_paths(Path::new("/data"), "1234-abcd");
        assert_eq!(p.log_dir, Path::new("/data/pods/1234-abcd/logs"));
        assert_eq!(p.volumes_dir, Path::new("/data/pods/1234-abcd/volumes"));
        assert_eq!(cgroup_parent("1234-abcd"), "/edgecore/pod1234-abcd");
        for (uid, safe) in [("../x", "___x"), ("a/b", "a_b"), ("", "_")] {
            assert_eq!(
                pod_paths(Path::new("/d"), uid).log_dir,
                Path::new("/d/pods").join(safe).join("logs")
            );
            assert_eq!(cgroup_parent(uid), format!("/edgecore/pod{safe}"));
        }
    }

    #[test]
    fn sandbox_metadata_labels_annotations_and_paths() {
        let mut p = pod_with(json!({}), json!({}));
        p.metadata.labels = Some(BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            (LABEL_MANAGED_BY.to_string(), "someone-else".to_string()),
        ]));
        p.metadata.annotations = Some(BTreeMap::from([("a".to_string(), "b".to_string())]));
        let s = sandbox_config(&p, &paths(), 3, None).expect("config");
        assert_eq!(
            s.metadata,
            Some(api::PodSandboxMetadata {
                name: "web".into(),
                uid: "1234-abcd".into(),
                namespace: "ns".into(),
                attempt: 3,
            })
        );
        assert_eq!(s.log_directory, "/data/pods/1234-abcd/logs");
        let expected = HashMap::from([
            ("app".to_string(), "web".to_string()),
            (LABEL_POD_NAME.to_string(), "web".to_string()),
            (LABEL_POD_NAMESPACE.to_string(), "ns".to_string()),
            (LABEL_POD_UID.to_string(), "1234-abcd".to_string()),
            (LABEL_MANAGED_BY.to_string(), "edgecore".to_string()),
        ]);
        assert_eq!(s.labels, expected);
        assert_eq!(s.annotations, HashMap::from([("a".into(), "b".into())]));
        let linux = s.linux.expect("linux");
        assert_eq!(linux.cgroup_parent, "/edgecore/pod1234-abcd");
    }

    #[test]
    fn sandbox_requires_identity_and_a_plain_uid() {
        let cases = [
            (
                json!({"name": "a", "namespace": "n"}),
                SpecError::MissingMetadata("uid"),
            ),
            (
                json!({"namespace": "n", "uid": "u"}),
                SpecError::MissingMetadata("name"),
            ),
            (
                json!({"name": "a", "uid": "u"}),
                SpecError::MissingMetadata("namespace"),
            ),
            (
                json!({"name": "a", "namespace": "n", "uid": "../u"}),
                SpecError::InvalidUid("../u".into()),
            ),
            (
                json!({"name": "a", "namespace": "n", "uid": ""}),
                SpecError::InvalidUid("".into()),
            ),
        ];
        for (metadata, want) in cases {
            let p = pod(json!({"metadata": metadata, "spec": {"containers": []}}));
            assert_eq!(
                sandbox_config(&p, &paths(), 0, None),
                Err(want),
                "{metadata}"
            );
        }
        let p = pod(json!({"metadata": {"name": "a", "namespace": "n", "uid": "u"}}));
        assert_eq!(
            sandbox_config(&p, &paths(), 0, None),
            Err(SpecError::MissingSpec)
        );
    }

    #[test]
    fn sandbox_hostname() {
        let long = "a".repeat(62) + "-b";
        let cases = [
            (json!({}), "web"),
            (json!({"hostname": "box"}), "box"),
            (json!({"hostNetwork": true, "hostname": "box"}), ""),
        ];
        for (spec, want) in cases {
            let p = pod_with(spec.clone(), json!({}));
            assert_eq!(sandbox(&p).hostname, want, "{spec}");
        }
        // Cut to 63 bytes, then trailing '-' and '.' removed.
        let mut p = pod_with(json!({}), json!({}));
        p.metadata.name = Some(long.clone());
        assert_eq!(sandbox(&p).hostname, "a".repeat(62));
        p.metadata.name = Some("b".repeat(70));
        assert_eq!(sandbox(&p).hostname, "b".repeat(63));
        p.metadata.name = Some("c".repeat(63));
        assert_eq!(sandbox(&p).hostname, "c".repeat(63));
        p.metadata.name = Some("é".repeat(40));
        assert_eq!(sandbox(&p).hostname, "é".repeat(31));
    }

    fn host_conf() -> crate::services::dns::ResolvConf {
        crate::services::dns::ResolvConf {
            nameservers: vec!["10.0.0.2".into(), "10.0.0.3".into()],
            searches: vec!["factory.example".into(), "svc.cluster.local".into()],
            options: vec!["ndots:1".into(), "timeout:2".into()],
        }
    }

    fn cluster() -> crate::services::PodDns {
        crate::services::PodDns {
            server: "169.254.96.16".parse().expect("address"),
            cluster_domain: "cluster.local".into(),
        }
    }

    fn dns(spec: serde_json::Value, cluster_dns: bool) -> PodDnsConfig {
        let p = pod_with(spec, json!({}));
        let cluster = cluster();
        pod_dns_config(&p, cluster_dns.then_some(&cluster), host_conf)
    }

    fn dns_config(servers: &[&str], searches: &[&str], options: &[&str]) -> api::DnsConfig {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        api::DnsConfig {
            servers: strings(servers),
            searches: strings(searches),
            options: strings(options),
        }
    }

    #[test]
    fn cluster_first_pods_get_the_cluster_dns() {
        let want = dns_config(
            &["169.254.96.16"],
            &[
                "ns.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "factory.example",
            ],
            &["ndots:5"],
        );
        for spec in [
            json!({}),
            json!({"dnsPolicy": "ClusterFirst"}),
            json!({"dnsPolicy": "ClusterFirstWithHostNet", "hostNetwork": true}),
        ] {
            let got = dns(spec.clone(), true);
            assert_eq!(got.config.as_ref(), Some(&want), "{spec}");
            assert!(got.warnings.is_empty(), "{spec}");
        }
        // hostNetwork with plain ClusterFirst falls back to the host's resolver.
        assert_eq!(
            dns(json!({"hostNetwork": true}), true),
            PodDnsConfig::default()
        );
        assert_eq!(
            dns(json!({"dnsPolicy": "Default"}), true),
            PodDnsConfig::default()
        );
    }

    #[test]
    fn dns_config_is_merged_into_the_policy() {
        let extra = json!({
            "nameservers": ["10.0.0.3", "1.1.1.1"],
            "searches": ["a.local", "cluster.local"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}, {"value": "x"}],
        });
        assert_eq!(
            dns(json!({"dnsConfig": extra}), true).config,
            Some(dns_config(
                &["169.254.96.16", "10.0.0.3", "1.1.1.1"],
                &[
                    "ns.svc.cluster.local",
                    "svc.cluster.local",
                    "cluster.local",
                    "factory.example",
                    "a.local"
                ],
                &["ndots:2", "edns0"],
            ))
        );
        assert_eq!(
            dns(json!({"dnsPolicy": "Default", "dnsConfig": extra}), true).config,
            Some(dns_config(
                &["10.0.0.2", "10.0.0.3", "1.1.1.1"],
                &[
                    "factory.example",
                    "svc.cluster.local",
                    "a.local",
                    "cluster.local"
                ],
                &["ndots:2", "timeout:2", "edns0"],
            ))
        );
        assert_eq!(
            dns(json!({"dnsPolicy": "None", "dnsConfig": extra}), true).config,
            Some(dns_config(
                &["10.0.0.3", "1.1.1.1"],
                &["a.local", "cluster.local"],
                &["ndots:2", "edns0"],
            ))
        );
        assert_eq!(
            dns(json!({"dnsPolicy": "None"}), false).config,
            Some(api::DnsConfig::default())
        );
    }

    #[test]
    fn without_cluster_dns_cluster_first_falls_back_with_a_warning() {
        let got = dns(json!({}), false);
        assert_eq!(got.config, None, "containerd copies the host's resolv.conf");
        assert_eq!(got.warnings.len(), 1);
        assert_eq!(got.warnings[0].0, "MissingClusterDNS");
        assert!(
            got.warnings[0].1.contains("web_ns(1234-abcd)"),
            "{:?}",
            got.warnings
        );
        let got = dns(json!({"dnsConfig": {"searches": ["a.local"]}}), false);
        assert_eq!(
            got.config,
            Some(dns_config(
                &["10.0.0.2", "10.0.0.3"],
                &["factory.example", "svc.cluster.local", "a.local"],
                &["ndots:1", "timeout:2"],
            ))
        );
        assert!(
            dns(json!({"dnsPolicy": "Default"}), false)
                .warnings
                .is_empty()
        );
        // The host's file is read only when needed.
        let p = pod_with(json!({"dnsPolicy": "Default"}), json!({}));
        pod_dns_config(&p, None, || panic!("read the host's resolv.conf"));
    }

    #[test]
    fn dns_limits_are_the_kubelets() {
        let got = dns(
            json!({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["1.0.0.1", "1.0.0.2", "1.0.0.3", "1.0.0.4"]}}),
            true,
        );
        assert_eq!(
            got.config.map(|c| c.servers),
            Some(vec!["1.0.0.1".into(), "1.0.0.2".into(), "1.0.0.3".into()])
        );
        assert_eq!(got.warnings.len(), 1);
        assert_eq!(got.warnings[0].0, "DNSConfigForming");

        let many: Vec<String> = (0..40).map(|i| format!("d{i}.example")).collect();
        let got = dns(json!({"dnsConfig": {"searches": many}}), true);
        let searches = got.config.expect("config").searches;
        assert_eq!(searches.len(), MAX_DNS_SEARCHES);
        assert_eq!(searches[0], "ns.svc.cluster.local");
        assert_eq!(got.warnings[0].0, "DNSConfigForming");

        let long: Vec<String> = (0..12).map(|i| format!("{i}{}", "x".repeat(200))).collect();
        let mut with_too_long = long.clone();
        with_too_long.push("y".repeat(254));
        let got = dns(
            json!({"dnsPolicy": "None", "dnsConfig": {"searches": with_too_long}}),
            true,
        );
        let searches = got.config.expect("config").searches;
        assert!(searches.join(" ").len() <= MAX_DNS_SEARCH_CHARS);
        assert_eq!(
            searches,
            long[..10].to_vec(),
            "cut from the end to fit 2048 characters"
        );
        assert_eq!(got.warnings.len(), 1);
    }

    #[test]
    fn sandbox_port_mappings() {
        let mapping =
            |protocol: api::Protocol, container_port, host_port, host_ip: &str| api::PortMapping {
                protocol: protocol as i32,
                container_port,
                host_port,
                host_ip: host_ip.into(),
            };
        let cases = [
            (json!({}), json!([]), vec![]),
            (json!({}), json!([{"containerPort": 80}]), vec![]),
            (
                json!({}),
                json!([
                    {"containerPort": 8080, "hostPort": 18080},
                    {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "127.0.0.1"},
                    {"containerPort": 9, "hostPort": 9, "protocol": "SCTP"},
                    {"containerPort": 81, "hostPort": 0},
                ]),
                vec![
                    mapping(api::Protocol::Tcp, 8080, 18080, ""),
                    mapping(api::Protocol::Udp, 53, 5353, "127.0.0.1"),
                    mapping(api::Protocol::Sctp, 9, 9, ""),
                ],
            ),
            (
                json!({"hostNetwork": true}),
                json!([{"containerPort": 8080, "hostPort": 8080}]),
                vec![],
            ),
        ];
        for (spec, ports, want) in cases {
            let p = pod_with(spec, json!({"ports": ports.clone()}));
            assert_eq!(sandbox(&p).port_mappings, want, "{ports}");
        }
        let errors = [
            (
                json!([{"containerPort": 80, "hostPort": 70000}]),
                SpecError::PortOutOfRange {
                    container: "c".into(),
                    field: "hostPort",
                    port: 70000,
                },
            ),
            (
                json!([{"containerPort": 0, "hostPort": 80}]),
                SpecError::PortOutOfRange {
                    container: "c".into(),
                    field: "containerPort",
                    port: 0,
                },
            ),
            (
                json!([{"containerPort": 80, "hostPort": 80, "protocol": "tcp"}]),
                SpecError::UnknownProtocol {
                    container: "c".into(),
                    protocol: "tcp".into(),
                },
            ),
        ];
        for (ports, want) in errors {
            let p = pod_with(json!({}), json!({"ports": ports.clone()}));
            assert_eq!(sandbox_config(&p, &paths(), 0, None), Err(want), "{ports}");
        }
    }

    #[test]
    fn namespaces_for_sandbox_and_containers() {
        use api::NamespaceMode::{Container, Node, Pod};
        let cases = [
            (json!({}), (Pod, Container, Pod)),
            (json!({"hostNetwork": true}), (Node, Container, Pod)),
            (json!({"hostPID": true}), (Pod, Node, Pod)),
            (json!({"hostIPC": true}), (Pod, Container, Node)),
            (json!({"shareProcessNamespace": true}), (Pod, Pod, Pod)),
            (
                json!({"hostPID": true, "shareProcessNamespace": true}),
                (Pod, Node, Pod),
            ),
        ];
        for (spec, (network, pid, ipc)) in cases {
            let p = pod_with(spec.clone(), json!({}));
            let want = api::NamespaceOption {
                network: network as i32,
                pid: pid as i32,
                ipc: ipc as i32,
                ..Default::default()
            };
            let sandbox_ns = sandbox(&p)
                .linux
                .and_then(|l| l.security_context)
                .and_then(|s| s.namespace_options);
            assert_eq!(sandbox_ns.as_ref(), Some(&want), "sandbox {spec}");
            assert_eq!(
                linux_sc(&config(&p)).namespace_options,
                Some(want),
                "container {spec}"
            );
        }
    }

    #[test]
    fn sandbox_security_context_and_sysctls() {
        let p = pod_with(
            json!({"securityContext": {
                "runAsUser": 1000, "runAsGroup": 2000, "fsGroup": 3000,
                "supplementalGroups": [4000],
                "sysctls": [{"name": "net.core.somaxconn", "value": "1024"}],
                "seccompProfile": {"type": "RuntimeDefault"},
            }}),
            json!({}),
        );
        let linux = sandbox(&p).linux.expect("linux");
        assert_eq!(
            linux.sysctls,
            HashMap::from([("net.core.somaxconn".into(), "1024".into())])
        );
        let sc = linux.security_context.expect("security context");
        assert_eq!(sc.run_as_user, Some(int64(1000)));
        assert_eq!(sc.run_as_group, Some(int64(2000)));
        assert_eq!(sc.supplemental_groups, vec![4000, 3000]);
        assert!(!sc.privileged);
        assert_eq!(
            sc.seccomp.map(|s| s.profile_type),
            Some(api::security_profile::ProfileType::RuntimeDefault as i32)
        );

        // Privileged as soon as one container (init included) is.
        let mut p = pod_with(json!({}), json!({}));
        let mut init: Container = serde_json::from_value(
            json!({"name": "i", "image": "x", "securityContext": {"privileged": true}}),
        )
        .expect("container");
        init.name = "init".into();
        p.spec.as_mut().expect("spec").init_containers = Some(vec![init]);
        let sc = sandbox(&p)
            .linux
            .and_then(|l| l.security_context)
            .expect("sc");
        assert!(sc.privileged);
        assert_eq!(sc.seccomp, None);
    }

    #[test]
    fn container_basics() {
        let p = pod_with(
            json!({"terminationGracePeriodSeconds": 5}),
            json!({
                "image": "docker.io/library/busybox",
                "command": ["sh", "-c"],
                "args": ["echo $(GREETING) $$(GREETING) $(MISSING)"],
                "workingDir": "/work",
                "stdin": true, "stdinOnce": true, "tty": true,
                "terminationMessagePath": "/tmp/msg",
            }),
        );
        let container = &p.spec.as_ref().expect("spec").containers[0];
        let env = kv(&[("GREETING", "hi")]);
        let mounts = vec![api::Mount {
            container_path: "/m".into(),
            host_path: "/h".into(),
            ..Default::default()
        }];
        let c = container_config(
            &p,
            container,
            ContainerKind::Init,
            2,
            env.clone(),
            mounts.clone(),
        )
        .expect("config");
        assert_eq!(
            c.metadata,
            Some(api::ContainerMetadata {
                name: "c".into(),
                attempt: 2
            })
        );
        assert_eq!(c.image.expect("image").image, "docker.io/library/busybox");
        assert_eq!(c.command, vec!["sh", "-c"]);
        assert_eq!(c.args, vec!["echo hi $(GREETING) $(MISSING)"]);
        assert_eq!(c.working_dir, "/work");
        assert_eq!(c.envs, env);
        assert_eq!(c.mounts, mounts);
        assert_eq!(c.log_path, "c/2.log");
        assert!(c.stdin && c.stdin_once && c.tty);
        assert_eq!(c.labels[LABEL_MANAGED_BY], "edgecore");
        assert_eq!(c.labels[LABEL_CONTAINER_NAME], "c");
        assert_eq!(c.labels[LABEL_CONTAINER_KIND], "init");
        assert_eq!(c.labels[LABEL_POD_UID], "1234-abcd");
        assert_eq!(c.labels[LABEL_POD_NAME], "web");
        assert_eq!(c.labels[LABEL_POD_NAMESPACE], "ns");
        assert_eq!(c.annotations[ANNOTATION_RESTART_COUNT], "2");
        assert_eq!(
            c.annotations[ANNOTATION_TERMINATION_MESSAGE_PATH],
            "/tmp/msg"
        );
        assert_eq!(c.annotations[ANNOTATION_TERMINATION_MESSAGE_POLICY], "File");
        assert_eq!(c.annotations[ANNOTATION_TERMINATION_GRACE_PERIOD], "5");

        let plain = config(&pod_with(json!({}), json!({})));
        assert_eq!(plain.labels[LABEL_CONTAINER_KIND], "regular");
        assert!(plain.command.is_empty() && plain.args.is_empty());
        assert_eq!(
            plain.annotations[ANNOTATION_TERMINATION_MESSAGE_PATH],
            "/dev/termination-log"
        );
        assert_eq!(plain.annotations[ANNOTATION_TERMINATION_GRACE_PERIOD], "30");
        assert!(!plain.stdin && !plain.tty);
    }

    #[test]
    fn container_errors() {
        let cases = [
            (
                json!({"image": ""}),
                SpecError::NoImage {
                    container: "c".into(),
                },
            ),
            (
                json!({"image": null}),
                SpecError::NoImage {
                    container: "c".into(),
                },
            ),
            (
                json!({"name": "a/b"}),
                SpecError::InvalidContainerName("a/b".into()),
            ),
            (
                json!({"name": ".."}),
                SpecError::InvalidContainerName("..".into()),
            ),
            (
                json!({"resources": {"limits": {"cpu": "lots"}}}),
                SpecError::Quantity {
                    container: "c".into(),
                    resource: "limits.cpu".into(),
                    error: QuantityError("lots".into()),
                },
            ),
            (
                json!({"resources": {"limits": {"memory": "-1Mi"}}}),
                SpecError::NegativeQuantity {
                    container: "c".into(),
                    resource: "limits.memory".into(),
                    value: "-1Mi".into(),
                },
            ),
            (
                json!({"securityContext": {"runAsNonRoot": true, "runAsUser": 0}}),
                SpecError::RunAsRoot {
                    container: "c".into(),
                },
            ),
            (
                json!({"securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "x"}}}),
                SpecError::Unsupported("seccompProfile type \"Localhost\"".into()),
            ),
        ];
        for (container, want) in cases {
            let p = pod_with(json!({}), container.clone());
            let c = &p.spec.as_ref().expect("spec").containers[0];
            let got = container_config(&p, c, ContainerKind::Regular, 0, vec![], vec![]);
            assert_eq!(got, Err(want), "{container}");
        }
    }

    #[test]
    fn container_resources() {
        // (resources, cpu_shares, cpu_period, cpu_quota, memory bytes, oom_score_adj)
        let cases = [
            (json!({}), 2, 0, 0, 0, 1000),
            (json!({"requests": {"cpu": "100m"}}), 102, 0, 0, 0, 0),
            (json!({"requests": {"cpu": "1"}}), 1024, 0, 0, 0, 0),
            (json!({"requests": {"cpu": "1m"}}), 2, 0, 0, 0, 0),
            (
                json!({"requests": {"cpu": "0.5"}, "limits": {"cpu": "2"}}),
                512,
                100_000,
                200_000,
                0,
                0,
            ),
            (
                json!({"limits": {"cpu": "250m"}}),
                256,
                100_000,
                25_000,
                0,
                0,
            ),
            (json!({"limits": {"cpu": "5m"}}), 5, 100_000, 1_000, 0, 0),
            (json!({"requests": {"cpu": "1000"}}), 262_144, 0, 0, 0, 0),
            (
                json!({"limits": {"memory": "128Mi"}}),
                2,
                0,
                0,
                134_217_728,
                0,
            ),
            (
                json!({"limits": {"memory": "1G"}}),
                2,
                0,
                0,
                1_000_000_000,
                0,
            ),
            (json!({"limits": {"memory": "1e3"}}), 2, 0, 0, 1000, 0),
            (json!({"requests": {"memory": "64Mi"}}), 2, 0, 0, 0, 0),
            (
                json!({"requests": {"ephemeral-storage": "1Gi"}}),
                2,
                0,
                0,
                0,
                1000,
            ),
        ];
        for (r, shares, period, quota, memory, oom) in cases {
            let p = pod_with(json!({}), json!({"resources": r.clone()}));
            let got = resources(&config(&p));
            assert_eq!(
                (
                    got.cpu_shares,
                    got.cpu_period,
                    got.cpu_quota,
                    got.memory_limit_in_bytes,
                    got.oom_score_adj
                ),
                (shares, period, quota, memory, oom),
                "{r}"
            );
        }
    }

    #[test]
    fn container_security_contexts() {
        let cases = [
            // pod securityContext, container securityContext, (user, group, privileged,
            // readonly rootfs, no_new_privs, add, drop)
            (
                json!({}),
                json!({}),
                (None, None, false, false, false, vec![], vec![]),
            ),
            (
                json!({"runAsUser": 1000, "runAsGroup": 1001}),
                json!({}),
                (Some(1000), Some(1001), false, false, false, vec![], vec![]),
            ),
            (
                json!({"runAsUser": 1000, "runAsGroup": 1001}),
                json!({"runAsUser": 5, "runAsGroup": 6}),
                (Some(5), Some(6), false, false, false, vec![], vec![]),
            ),
            (
                json!({}),
                json!({"privileged": true, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": true}),
                (None, None, true, true, false, vec![], vec![]),
            ),
            (
                json!({}),
                json!({"allowPrivilegeEscalation": false}),
                (None, None, false, false, true, vec![], vec![]),
            ),
            (
                json!({}),
                json!({"capabilities": {"add": ["NET_ADMIN", "cap_sys_time"], "drop": ["ALL"]}}),
                (
                    None,
                    None,
                    false,
                    false,
                    false,
                    vec!["NET_ADMIN".to_string(), "SYS_TIME".to_string()],
                    vec!["ALL".to_string()],
                ),
            ),
        ];
        for (psc, csc, want) in cases {
            let p = pod_with(
                json!({"securityContext": psc.clone()}),
                json!({"securityContext": csc.clone()}),
            );
            let sc = linux_sc(&config(&p));
            let caps = sc.capabilities.clone().unwrap_or_default();
            let got = (
                sc.run_as_user.map(|v| v.value),
                sc.run_as_group.map(|v| v.value),
                sc.privileged,
                sc.readonly_rootfs,
                sc.no_new_privs,
                caps.add_capabilities,
                caps.drop_capabilities,
            );
            assert_eq!(got, want, "pod {psc} container {csc}");
        }
        // Seccomp: the container's profile wins over the pod's.
        let p = pod_with(
            json!({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "fsGroup": 7}}),
            json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}),
        );
        let sc = linux_sc(&config(&p));
        assert_eq!(
            sc.seccomp.map(|s| s.profile_type),
            Some(api::security_profile::ProfileType::Unconfined as i32)
        );
        assert_eq!(sc.supplemental_groups, vec![7]);
    }

    #[test]
    fn image_user_completes_the_config_and_enforces_run_as_non_root() {
        let image = |uid: Option<i64>, username: &str| api::Image {
            uid: uid.map(int64),
            username: username.into(),
            ..Default::default()
        };
        // (pod securityContext, image, Ok((run_as_user, run_as_username)) or the error)
        let cases = [
            (json!({}), image(Some(1000), ""), Ok((Some(1000), ""))),
            (json!({}), image(None, ""), Ok((Some(0), ""))),
            (json!({}), image(None, "nobody"), Ok((None, "nobody"))),
            (
                json!({"runAsUser": 7}),
                image(Some(0), ""),
                Ok((Some(7), "")),
            ),
            (
                json!({"runAsGroup": 9}),
                image(Some(1000), ""),
                Ok((Some(1000), "")),
            ),
            (
                json!({"runAsNonRoot": true}),
                image(Some(1000), ""),
                Ok((Some(1000), "")),
            ),
            (
                json!({"runAsNonRoot": true}),
                image(Some(0), ""),
                Err(SpecError::ImageRunsAsRoot {
                    container: "c".into(),
                }),
            ),
            (
                json!({"runAsNonRoot": true}),
                image(None, ""),
                Err(SpecError::ImageRunsAsRoot {
                    container: "c".into(),
                }),
            ),
            (
                json!({"runAsNonRoot": true}),
                image(None, "app"),
                Err(SpecError::NonNumericImageUser {
                    container: "c".into(),
                    user: "app".into(),
                }),
            ),
            (
                json!({"runAsNonRoot": true, "runAsUser": 5}),
                image(Some(0), ""),
                Ok((Some(5), "")),
            ),
        ];
        for (psc, image, want) in cases {
            let p = pod_with(json!({"securityContext": psc.clone()}), json!({}));
            let c = &p.spec.as_ref().expect("spec").containers[0];
            let mut cfg = config(&p);
            let got = apply_image_user(&p, c, &image, &mut cfg).map(|()| {
                let sc = linux_sc(&cfg);
                (sc.run_as_user.map(|v| v.value), sc.run_as_username)
            });
            let want = want.map(|(u, n)| (u, n.to_string()));
            assert_eq!(got, want, "{psc} {image:?}");
        }
    }

    fn objects() -> Objects {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "cm", "namespace": "ns"},
            "data": {"A": "from-cm", "B": "b", "bad key": "x", "1X": "y"},
        }))
        .expect("configmap");
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "sec", "namespace": "ns"},
            // "pass" and "\xff": base64 of raw bytes, the latter not UTF-8.
            "data": {"PASSWORD": "cGFzcw==", "RAW": "/w=="},
        }))
        .expect("secret");
        Objects {
            config_maps: HashMap::from([("cm".to_string(), cm)]),
            secrets: HashMap::from([("sec".to_string(), secret)]),
        }
    }

    #[test]
    fn service_variables_come_last_and_the_containers_own_win() {
        let p = pod_with(
            json!({}),
            json!({"env": [
                {"name": "WEB_SERVICE_PORT", "value": "8080"},
                {"name": "URL", "value": "http://$(WEB_SERVICE_HOST):$(WEB_SERVICE_PORT)"},
            ]}),
        );
        let c = p.spec.as_ref().expect("spec").containers[0].clone();
        let services = [
            ("WEB_SERVICE_HOST".to_string(), "10.96.0.10".to_string()),
            ("WEB_SERVICE_PORT".to_string(), "80".to_string()),
            ("WEB_PORT".to_string(), "tcp://10.96.0.10:80".to_string()),
        ];
        let env = container_env(&p, &c, &objects(), &services, "10.99.0.7", "edge-1").expect("env");
        assert_eq!(
            env,
            kv(&[
                ("WEB_SERVICE_PORT", "8080"),
                ("URL", "http://10.96.0.10:8080"),
                ("WEB_SERVICE_HOST", "10.96.0.10"),
                ("WEB_PORT", "tcp://10.96.0.10:80"),
            ])
        );
    }

    fn env_of(container: serde_json::Value) -> Result<Vec<api::KeyValue>, EnvError> {
        let mut p = pod_with(
            json!({"nodeName": "stored-node", "serviceAccountName": "sa"}),
            container,
        );
        p.metadata.labels = Some(BTreeMap::from([("app".into(), "web".into())]));
        p.metadata.annotations = Some(BTreeMap::from([("note".into(), "n".into())]));
        let c = p.spec.as_ref().expect("spec").containers[0].clone();
        container_env(&p, &c, &objects(), &[], "10.99.0.7", "edge-1")
    }

    #[test]
    fn env_from_sources() {
        let cases = [
            (
                json!([{"configMapRef": {"name": "cm"}}]),
                kv(&[("A", "from-cm"), ("B", "b")]),
            ),
            (
                json!([{"configMapRef": {"name": "cm"}, "prefix": "CM_"}]),
                kv(&[("CM_1X", "y"), ("CM_A", "from-cm"), ("CM_B", "b")]),
            ),
            (
                json!([{"secretRef": {"name": "sec"}}]),
                kv(&[("PASSWORD", "pass"), ("RAW", "\u{fffd}")]),
            ),
            (
                json!([{"configMapRef": {"name": "nope", "optional": true}}]),
                vec![],
            ),
            (
                json!([{"secretRef": {"name": "nope", "optional": true}}]),
                vec![],
            ),
        ];
        for (env_from, want) in cases {
            assert_eq!(
                env_of(json!({"envFrom": env_from.clone()})),
                Ok(want),
                "{env_from}"
            );
        }
        let errors = [
            (
                json!([{"configMapRef": {"name": "nope"}}]),
                EnvError::ConfigMapNotFound {
                    name: "nope".into(),
                },
            ),
            (
                json!([{"secretRef": {"name": "nope"}}]),
                EnvError::SecretNotFound {
                    name: "nope".into(),
                },
            ),
        ];
        for (env_from, want) in errors {
            assert_eq!(
                env_of(json!({"envFrom": env_from.clone()})),
                Err(want),
                "{env_from}"
            );
        }
    }

    #[test]
    fn env_values_expansion_and_order() {
        let got = env_of(json!({
            "envFrom": [{"configMapRef": {"name": "cm"}}],
            "env": [
                {"name": "X", "value": "x"},
                {"name": "Y", "value": "$(X)-$(A)-$$(X)-$(NOPE)-$(Z)"},
                {"name": "Z", "value": "z"},
                {"name": "A", "value": "override"},
                {"name": "EMPTY", "value": ""},
                {"name": "X", "value": "$(X)$(X)"},
            ],
        }));
        let want = kv(&[
            ("A", "override"),
            ("B", "b"),
            ("X", "xx"),
            ("Y", "x-from-cm-$(X)-$(NOPE)-$(Z)"),
            ("Z", "z"),
            ("EMPTY", ""),
        ]);
        assert_eq!(got, Ok(want));
    }

    #[test]
    fn env_value_from() {
        let cases = [
            (
                json!({"configMapKeyRef": {"name": "cm", "key": "B"}}),
                Some("b"),
            ),
            (
                json!({"secretKeyRef": {"name": "sec", "key": "PASSWORD"}}),
                Some("pass"),
            ),
            (
                json!({"configMapKeyRef": {"name": "cm", "key": "NO", "optional": true}}),
                None,
            ),
            (
                json!({"configMapKeyRef": {"name": "no", "key": "NO", "optional": true}}),
                None,
            ),
            (
                json!({"secretKeyRef": {"name": "sec", "key": "NO", "optional": true}}),
                None,
            ),
            (
                json!({"secretKeyRef": {"name": "no", "key": "NO", "optional": true}}),
                None,
            ),
            (
                json!({"fieldRef": {"fieldPath": "metadata.name"}}),
                Some("web"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "metadata.namespace"}}),
                Some("ns"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "metadata.uid"}}),
                Some("1234-abcd"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "spec.nodeName"}}),
                Some("edge-1"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "spec.serviceAccountName"}}),
                Some("sa"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "status.podIP"}}),
                Some("10.99.0.7"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "status.podIPs"}}),
                Some("10.99.0.7"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "metadata.labels['app']"}}),
                Some("web"),
            ),
            (
                json!({"fieldRef": {"fieldPath": "metadata.labels['none']"}}),
                Some(""),
            ),
            (
                json!({"fieldRef": {"fieldPath": "metadata.annotations['note']"}}),
                Some("n"),
            ),
            (
                json!({"resourceFieldRef": {"resource": "limits.cpu"}}),
                Some("2"),
            ),
            (
                json!({"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}),
                Some("1500"),
            ),
            (
                json!({"resourceFieldRef": {"resource": "requests.cpu"}}),
                Some("1"),
            ),
            (
                json!({"resourceFieldRef": {"resource": "limits.memory"}}),
                Some("134217728"),
            ),
            (
                json!({"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}),
                Some("128"),
            ),
            (
                json!({"resourceFieldRef": {"resource": "requests.memory"}}),
                Some("0"),
            ),
        ];
        for (source, want) in cases {
            let got = env_of(json!({
                "resources": {"limits": {"cpu": "1500m", "memory": "128Mi"}, "requests": {"cpu": "250m"}},
                "env": [{"name": "V", "valueFrom": source.clone()}],
            }));
            let want = want.map(|v| kv(&[("V", v)])).unwrap_or_default();
            assert_eq!(got, Ok(want), "{source}");
        }
    }

    #[test]
    fn env_errors_read_like_the_kubelet() {
        let cases = [
            (
                json!({"configMapKeyRef": {"name": "no", "key": "K"}}),
                "configmap \"no\" not found",
            ),
            (
                json!({"secretKeyRef": {"name": "no", "key": "K"}}),
                "secret \"no\" not found",
            ),
            (
                json!({"configMapKeyRef": {"name": "cm", "key": "K"}}),
                "couldn't find key K in ConfigMap ns/cm",
            ),
            (
                json!({"secretKeyRef": {"name": "sec", "key": "K"}}),
                "couldn't find key K in Secret ns/sec",
            ),
            (
                json!({}),
                "env \"V\" has neither a value nor a supported valueFrom",
            ),
            (
                json!({"fieldRef": {"fieldPath": "status.hostIP"}}),
                "unsupported fieldPath: status.hostIP",
            ),
            (
                json!({"fieldRef": {"fieldPath": "metadata.labels"}}),
                "unsupported fieldPath: metadata.labels",
            ),
            (
                json!({"resourceFieldRef": {"resource": "limits.memory"}}),
                "resourceFieldRef limits.memory of container \"c\": the container sets no such limit and the node's allocatable is not known here",
            ),
            (
                json!({"resourceFieldRef": {"resource": "limits.nvidia.com/gpu"}}),
                "resourceFieldRef limits.nvidia.com/gpu of container \"c\": unsupported resource",
            ),
            (
                json!({"resourceFieldRef": {"resource": "requests.cpu", "divisor": "0"}}),
                "resourceFieldRef requests.cpu of container \"c\": divisor must be positive",
            ),
            (
                json!({"resourceFieldRef": {"resource": "requests.cpu", "containerName": "other"}}),
                "resourceFieldRef requests.cpu of container \"other\": no such container",
            ),
        ];
        for (source, want) in cases {
            let got = env_of(json!({"env": [{"name": "V", "valueFrom": source.clone()}]}));
            assert_eq!(
                got.map_err(|e| e.to_string()),
                Err(want.to_string()),
                "{source}"
            );
        }
    }

    #[test]
    fn expansion_follows_the_kubelet_rules() {
        let lookup = |name: &str| match name {
            "A" => Some("a".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let cases = [
            ("", ""),
            ("plain", "plain"),
            ("$(A)", "a"),
            ("x$(A)y$(A)z", "xayaz"),
            ("$(EMPTY)|", "|"),
            ("$(B)", "$(B)"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$a"),
            ("$$", "$"),
            ("$", "$"),
            ("a$", "a$"),
            ("$A", "$A"),
            ("$(A", "$(A"),
            ("$(", "$("),
            ("$()", "$()"),
            ("$(A$(A)", "$(A$(A)"),
            ("$é$(A)", "$éa"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, lookup), want, "{input:?}");
        }
    }

    #[test]
    fn env_var_names() {
        for good in ["A", "a_b", "_x", "-x", ".x", "A1", "my.var-2"] {
            assert!(is_env_var_name(good), "{good}");
        }
        for bad in ["", "1A", "a b", "a=b", "é"] {
            assert!(!is_env_var_name(bad), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        // (text, milli, value)
        let cases = [
            ("0", 0, 0),
            ("1", 1000, 1),
            ("100m", 100, 1),
            ("0.5", 500, 1),
            (".5", 500, 1),
            ("5.", 5000, 5),
            ("1.5", 1500, 2),
            ("+2", 2000, 2),
            ("-1", -1000, -1),
            ("-1.5", -1500, -1),
            ("0.1m", 1, 1),
            ("1n", 1, 1),
            ("1500u", 2, 1),
            ("128Mi", 134_217_728_000, 134_217_728),
            ("1Ki", 1_024_000, 1024),
            ("1.5Gi", 1_610_612_736_000, 1_610_612_736),
            ("1Ti", 1_099_511_627_776_000, 1_099_511_627_776),
            ("1k", 1_000_000, 1000),
            ("1M", 1_000_000_000, 1_000_000),
            ("1G", 1_000_000_000_000, 1_000_000_000),
            ("2T", 2_000_000_000_000_000, 2_000_000_000_000),
            ("1P", 1_000_000_000_000_000_000, 1_000_000_000_000_000),
            ("1e3", 1_000_000, 1000),
            ("1E3", 1_000_000, 1000),
            ("1.5e2", 150_000, 150),
            ("1e-3", 1, 1),
            ("5e+1", 50_000, 50),
            ("1Ei", 0, 1_152_921_504_606_846_976),
            ("1E", 0, 1_000_000_000_000_000_000),
        ];
        for (text, milli, value) in cases {
            let amount = Amount::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(amount.value(), Ok(value), "{text} value");
            if milli != 0 || text == "0" {
                assert_eq!(amount.milli(), Ok(milli), "{text} milli");
            } else {
                assert!(amount.milli().is_err(), "{text} milli overflows i64");
            }
        }
        for bad in [
            "",
            "abc",
            "1.2.3",
            "1x",
            "1e",
            "1e+",
            "Mi",
            ".",
            "-",
            "1 Mi",
            " 1",
            "1mi",
            "1KI",
            "1e99999",
            "99999999999999999999999999999999999999999",
            "1Ki1",
            "--1",
        ] {
            assert_eq!(
                Amount::parse(bad),
                Err(QuantityError(bad.to_string())),
                "{bad:?}"
            );
        }
        assert!(Amount::parse("1e30").expect("parses").value().is_err());
    }
}
