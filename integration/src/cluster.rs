//! A real Kubernetes control plane for kube-mode tests, started fresh per test the way
//! controller-runtime's envtest does: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler (v1.36.2, from `../shared/k8s` beside the repository), cloudcore's
//! ServiceAccount bound to exactly the RBAC in `deploy/kubernetes/rbac.yaml`, and a stand-in
//! Node that stays Ready.
//!
//! - `K8S_BIN` names a folder holding `kube-apiserver`, `kube-controller-manager` and
//!   `kube-scheduler`; without it the binaries packed in `../shared/k8s` are unpacked once into
//!   `~/.cache/k8s-v1.36.2/bin` by the reference `start.sh` there.
//! - `K8S_SHARED` names the folder with `start.sh`/`stop.sh` (default `../shared/k8s`).
//! - etcd comes from Debian's `etcd-server` (`.ci/run` installs it).
//!
//! Anything missing fails the test with a message saying what: these tests never pass
//! silently.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Namespace and name of cloudcore's ServiceAccount in `deploy/kubernetes/rbac.yaml`.
pub const CLOUDCORE_NAMESPACE: &str = "edge-system";
pub const CLOUDCORE_ACCOUNT: &str = "cloudcore";

/// Options of one control plane.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra kube-apiserver flags, e.g. `--default-unreachable-toleration-seconds=10`.
    pub apiserver: Vec<String>,
    /// Extra kube-controller-manager flags, e.g. `--node-monitor-grace-period=20s`.
    pub controller_manager: Vec<String>,
    /// Which components run.
    pub components: Components,
}

/// The components of a control plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Components {
    /// etcd, kube-apiserver, kube-controller-manager and kube-scheduler.
    #[default]
    All,
    /// etcd and kube-apiserver only (faster, for tests of the API alone).
    ApiServerOnly,
}

/// A running control plane; stopped and wiped when dropped.
pub struct KubeCluster {
    /// `K8S_RUN` of the reference scripts: pids, logs, certificates, etcd data.
    pub run_dir: PathBuf,
    /// Admin (`system:masters`) kubeconfig.
    pub kubeconfig: PathBuf,
    scripts: PathBuf,
    stand_in: Option<StandIn>,
}

fn scripts_dir() -> PathBuf {
    std::env::var_os("K8S_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/k8s")
                .components()
                .collect()
        })
}

impl KubeCluster {
    /// Starts a fresh control plane in `dir` (about 10 s); panics saying what is missing or
    /// what failed, with the components' logs.
    pub fn start(dir: &Path, options: &ClusterOptions) -> KubeCluster {
        KubeCluster::try_start(dir, options).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn try_start(dir: &Path, options: &ClusterOptions) -> anyhow::Result<KubeCluster> {
        if !crate::is_root() {
            bail!("kube-mode tests need root (CI runs as root); run the test suite as root");
        }
        let scripts = scripts_dir();
        let start = scripts.join("start.sh");
        if !start.is_file() {
            bail!(
                "the reference Kubernetes control plane is missing: {} does not exist (it comes with ../shared/k8s beside the repository; set K8S_SHARED to its folder)",
                start.display()
            );
        }
        if let Some(bin) = std::env::var_os("K8S_BIN") {
            let bin = PathBuf::from(bin);
            for binary in [
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
            ] {
                if !bin.join(binary).is_file() {
                    bail!(
                        "K8S_BIN={} has no {binary}: it must hold kube-apiserver, kube-controller-manager and kube-scheduler",
                        bin.display()
                    );
                }
            }
        }
        for tool in ["etcd", "kubectl", "openssl", "xz", "python3", "flock"] {
            if !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                bail!(
                    "{tool} is not installed: apt-get install etcd-server xz-utils openssl python3 util-linux (.ci/run does)"
                );
            }
        }
        let run_dir = dir.join("k8s");
        // One start at a time on the machine (test binaries run in two lanes at once,
        // integration/run-tests.sh): on a fresh machine the first start unpacks the binaries
        // into a shared cache, and two doing so at once would trip over each other.
        let lock = std::env::temp_dir().join("edge-k8s-start.lock");
        let out = Command::new("flock")
            .arg(&lock)
            .arg("bash")
            .arg(&start)
            .arg("--fresh")
            .args(match options.components {
                Components::All => ["--mode", "full"],
                Components::ApiServerOnly => ["--mode", "apiserver"],
            })
            .env("K8S_RUN", &run_dir)
            .env("APISERVER_PORT", crate::free_tcp_port().to_string())
            .env("APISERVER_EXTRA", options.apiserver.join(" "))
            .env("KCM_EXTRA", options.controller_manager.join(" "))
            .stdin(Stdio::null())
            .output()
            .context("cannot run start.sh")?;
        let mut cluster = KubeCluster {
            kubeconfig: run_dir.join("kubeconfig"),
            run_dir,
            scripts,
            stand_in: None,
        };
        if !out.status.success() {
            bail!(
                "the control plane did not start:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.stand_in = Some(StandIn::start(&cluster.kubeconfig)?);
        Ok(cluster)
    }

    /// The API server's URL, from the admin kubeconfig.
    pub fn server(&self) -> String {
        let out = self.kubectl_ok(
            &[
                "config",
                "view",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.server}",
            ],
            None,
        );
        out.trim().to_string()
    }

    /// The cluster CA (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.run_dir.join("pki/ca.crt")
    }

    /// `kubectl ARGS` as admin, with `stdin`.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl(
            &self.kubeconfig,
            &self.run_dir.join("kubectl-cache"),
            args,
            stdin,
        )
    }

    /// `kubectl ARGS` as admin, asserting success; its stdout.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&all, None)).expect("kubectl JSON")
    }

    /// Applies `deploy/kubernetes/rbac.yaml` (after `rewrite`, which a test may use to remove
    /// a permission) with cloudcore's namespace, then writes a kubeconfig holding a token of
    /// cloudcore's ServiceAccount: the credentials a Deployment would give cloudcore, never
    /// admin ones.
    pub fn cloudcore_credentials(&self, rewrite: impl FnOnce(String) -> String) -> PathBuf {
        let rbac = std::fs::read_to_string(crate::deploy_dir().join("kubernetes/rbac.yaml"))
            .expect("deploy/kubernetes/rbac.yaml");
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CLOUDCORE_NAMESPACE}});
        self.kubectl_ok(&["apply", "-f", "-"], Some(&namespace.to_string()));
        self.kubectl_ok(&["apply", "-f", "-"], Some(&rewrite(rbac)));
        let token = self.kubectl_ok(
            &[
                "create",
                "token",
                CLOUDCORE_ACCOUNT,
                "-n",
                CLOUDCORE_NAMESPACE,
                "--duration=24h",
            ],
            None,
        );
        let ca = std::fs::read(self.ca_file()).expect("cluster CA");
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": {
                "server": self.server(),
                "certificate-authority-data": base64_encode(&ca),
            }}],
            "users": [{"name": "cloudcore", "user": {"token": token.trim()}}],
            "contexts": [{"name": "cloudcore", "context": {"cluster": "cluster", "user": "cloudcore"}}],
            "current-context": "cloudcore",
        });
        let path = self.run_dir.join("cloudcore.kubeconfig");
        std::fs::write(&path, kubeconfig.to_string()).expect("write cloudcore kubeconfig");
        path
    }

    /// The name of the stand-in node that stays Ready.
    pub fn stand_in_node(&self) -> &str {
        STAND_IN
    }

    /// The end of a component's log (`kube-controller-manager`, `kube-apiserver`, ...).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.run_dir.join(format!("{component}.log")))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        self.stand_in.take();
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop.sh"))
            .arg("--wipe")
            .env("K8S_RUN", &self.run_dir)
            .stdin(Stdio::null())
            .output();
    }
}

/// Runs kubectl with a private discovery cache.
pub fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new("kubectl");
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        // No user's ~/.kube (cache, kuberc) leaks into a test.
        .env("HOME", cache.parent().unwrap_or(cache))
        .env_remove("KUBECONFIG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .expect("kubectl is installed on every machine of this project");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .expect("write kubectl stdin");
    }
    child.wait_with_output().expect("kubectl output")
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Name of the stand-in node.
const STAND_IN: &str = "stand-in";
/// How often the stand-in's Lease is renewed.
const STAND_IN_RENEW: Duration = Duration::from_secs(3);

/// A Node that is always Ready (its Lease renewed every few seconds) and takes no pods (it is
/// tainted NoSchedule): with it the node lifecycle controller behaves as in a cluster of many
/// nodes. With a single node that goes NotReady it enters "master disruption mode" and never
/// taints anything NoExecute.
struct StandIn {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    fn start(kubeconfig: &Path) -> anyhow::Result<StandIn> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(crate::kube_client(kubeconfig))?;
        runtime
            .block_on(stand_in_node(&client))
            .context("cannot create the stand-in node")?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = runtime.block_on(renew_stand_in(&client)) {
                        eprintln!("stand-in node: cannot renew its lease: {e}");
                    }
                    // Short naps so that a drop does not wait a whole period.
                    for _ in 0..(STAND_IN_RENEW.as_millis() / 100) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        Ok(StandIn {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn now_micro() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{}.{:06}Z",
        now.replace_nanosecond(0)
            .unwrap_or(now)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
            .trim_end_matches('Z'),
        now.nanosecond() / 1000
    )
}

async fn stand_in_node(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": STAND_IN, "labels": {"kubernetes.io/hostname": STAND_IN}},
        "spec": {"taints": [{"key": "integration.test/stand-in", "effect": "NoSchedule"}]},
    }))
    .map_err(kube::Error::SerdeError)?;
    nodes.create(&PostParams::default(), &node).await?;
    let now = now_micro();
    let seconds = now.split('.').next().unwrap_or_default().to_string() + "Z";
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "StandIn",
            "message": "a test's stand-in node", "lastHeartbeatTime": seconds, "lastTransitionTime": seconds}],
        "capacity": {"cpu": "1", "memory": "1Gi", "pods": "0"},
        "allocatable": {"cpu": "1", "memory": "1Gi", "pods": "0"},
    }});
    nodes
        .patch_status(STAND_IN, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    renew_stand_in(client).await
}

async fn renew_stand_in(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, Patch, PatchParams};
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": STAND_IN, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": STAND_IN, "leaseDurationSeconds": 40, "renewTime": now_micro()},
    });
    leases
        .patch(
            STAND_IN,
            &PatchParams::apply("integration-stand-in").force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}
