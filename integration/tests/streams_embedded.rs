//! `kubectl logs`, `exec`, `attach`, `port-forward` and `top` against cloudcore's embedded API:
//! real cloudcore, real edgecore with a real containerd running busybox pods, real kubectl
//! (the one on PATH and each of `/usr/lib/google-cloud-sdk/bin/kubectl.1.27` … `kubectl.1.33`),
//! real curl for the status codes kubectl does not show. Needs root and what `.ci/run`
//! installs (containerd, runc, containernetworking-plugins, busybox-static, curl, script).
//!
//! Tests marked `// needs: tunnel, spdy, websocket` exercise streams end to end and pass once
//! the tunnel, the edge's stream handlers and the streaming protocols are in; the others check
//! what the embedded API decides on its own (validation, authorization, discovery, a
//! disconnected edge).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration::{Cloud, Containerd, Edge, container_status, eventually, join};
use serde_json::Value;

/// Where the versioned kubectl binaries are installed on every machine of this project.
const KUBECTL_DIR: &str = "/usr/lib/google-cloud-sdk/bin";
/// The kubectl minors the issue asks for.
const KUBECTL_MINORS: [u32; 7] = [27, 28, 29, 30, 31, 32, 33];

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A kubectl binary against a cloud's embedded API, with its own discovery cache and HOME.
struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    /// The dispatcher on PATH (it runs the kubectl matching the server's minor).
    fn default_for(cloud: &Cloud) -> Kubectl {
        Kubectl::at(cloud, PathBuf::from("kubectl"), "default")
    }

    /// `kubectl.1.<minor>` from [`KUBECTL_DIR`].
    fn minor(cloud: &Cloud, minor: u32) -> Kubectl {
        let binary = Path::new(KUBECTL_DIR).join(format!("kubectl.1.{minor}"));
        assert!(
            binary.exists(),
            "{} is missing (every machine of this project has kubectl 1.27 to 1.33 there)",
            binary.display()
        );
        Kubectl::at(cloud, binary, &format!("1.{minor}"))
    }

    fn at(cloud: &Cloud, binary: PathBuf, name: &str) -> Kubectl {
        let home = cloud.dir.join(format!("kubectl-{name}"));
        std::fs::create_dir_all(&home).expect("kubectl home");
        Kubectl {
            binary,
            kubeconfig: cloud.kubeconfig(),
            cache: home.join("cache"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .env("HOME", self.cache.parent().expect("home"))
            .env_remove("KUBECONFIG");
        command
    }

    /// The shell words of this kubectl with its flags, for `script -c`.
    fn shell_words(&self) -> String {
        format!(
            "HOME='{}' '{}' --kubeconfig '{}' --cache-dir '{}'",
            self.cache.parent().expect("home").display(),
            self.binary.display(),
            self.kubeconfig.display(),
            self.cache.display()
        )
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], input: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.binary.display()));
        if let (Some(text), Some(mut pipe)) = (input, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).expect("kubectl stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            self.binary.display(),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Starts a long-running kubectl (`logs -f`, `port-forward`, `attach`) whose stdout lines
    /// arrive on the returned channel.
    fn spawn_lines(&self, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()));
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }
}

/// Waits for a line satisfying `what` on `lines`; every line seen, or a panic naming `context`.
fn wait_line(
    lines: &mpsc::Receiver<String>,
    what: impl Fn(&str) -> bool,
    within: Duration,
    context: &str,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = what(&line);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("{context}: expected line not seen within {within:?}; got {seen:?}");
}

fn stop(mut child: Child) -> Output {
    let _ = child.kill();
    child.wait_with_output().expect("wait")
}

/// curl against the embedded API as admin (the kubeconfig's certificate), anonymously, or
/// with another client certificate: the HTTP status and body of each request.
struct Curl {
    port: u16,
    ca: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
}

impl Curl {
    fn new(cloud: &Cloud) -> Curl {
        use base64::Engine as _;
        let kubeconfig = std::fs::read_to_string(cloud.kubeconfig()).expect("kubeconfig");
        let field = |name: &str| -> Vec<u8> {
            let value = kubeconfig
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("{name} in the kubeconfig"));
            base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .expect("base64")
        };
        let dir = cloud.dir.join("curl");
        std::fs::create_dir_all(&dir).expect("curl dir");
        let write = |name: &str, data: Vec<u8>| {
            let path = dir.join(name);
            std::fs::write(&path, data).expect("write");
            path
        };
        Curl {
            port: cloud.api_port,
            ca: write("ca.crt", field("certificate-authority-data")),
            admin_cert: write("admin.crt", field("client-certificate-data")),
            admin_key: write("admin.key", field("client-key-data")),
        }
    }

    fn request(&self, who: Who<'_>, method: &str, path: &str, headers: &[&str]) -> (u16, Value) {
        let mut command = Command::new("curl");
        command
            .args(["-s", "--http1.1", "--max-time", "10", "-X", method])
            .args(["-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&self.ca);
        match who {
            Who::Admin => command
                .arg("--cert")
                .arg(&self.admin_cert)
                .arg("--key")
                .arg(&self.admin_key),
            Who::Anonymous => &mut command,
            Who::Certificate(pem) => command.arg("--cert").arg(pem).arg("--key").arg(pem),
        };
        for h in headers {
            command.args(["-H", h]);
        }
        let out = command
            .arg(format!("https://127.0.0.1:{}{path}", self.port))
            .output()
            .expect("curl is installed by .ci/run");
        let text = stdout(&out);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let code = code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {method} {path}: no status ({text:?}, {})",
                stderr(&out)
            )
        });
        (code, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn admin(&self, method: &str, path: &str) -> (u16, Value) {
        self.request(Who::Admin, method, path, &[])
    }
}

#[derive(Clone, Copy)]
enum Who<'a> {
    Admin,
    Anonymous,
    /// A PEM file holding a client certificate and its key (an edge's `node.pem`).
    Certificate(&'a Path),
}

/// Asserts a `Status` answer: its code, reason and the message (whole, or a part of it).
fn assert_status(answer: &(u16, Value), code: u16, reason: &str, message: &str, what: &str) {
    let (got, body) = answer;
    assert_eq!(*got, code, "{what}: {body}");
    assert_eq!(body["kind"], "Status", "{what}: {body}");
    assert_eq!(body["code"], code, "{what}: {body}");
    assert_eq!(body["reason"], reason, "{what}: {body}");
    let text = body["message"].as_str().unwrap_or_default();
    assert!(text.contains(message), "{what}: {text:?} lacks {message:?}");
}

/// Fields drop in order: edgecore, then containerd (removing its pods), then cloudcore, then
/// the directory they all used.
struct Setup {
    edge: Edge,
    _containerd: Containerd,
    cloud: Cloud,
    edge_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let containerd = Containerd::start(&tmp.path().join("containerd"));
        let cloud = Cloud::start(tmp.path(), &[]);
        let token = cloud.token(&[]);
        let edge_dir = tmp.path().join("edge-1");
        let out = join(&edge_dir, &token, "edge-1");
        assert!(out.status.success(), "{}", stderr(&out));
        let edge = Edge::start_with(&edge_dir, &["--cri-endpoint", &containerd.endpoint]);
        assert!(
            eventually(Duration::from_secs(15), || edge.connected()),
            "{}",
            edge.log()
        );
        Setup {
            _tmp: tmp,
            cloud,
            _containerd: containerd,
            edge,
            edge_dir,
        }
    }

    fn apply(&self, yaml: &str) {
        self.cloud.kubectl_ok(&["apply", "-f", "-"], Some(yaml));
    }

    fn wait_running(&self, pod: &str, containers: &[&str]) -> Value {
        self.cloud.wait_pod(
            pod,
            Duration::from_secs(30),
            "Running",
            |p| {
                containers
                    .iter()
                    .all(|c| container_status(p, c)["state"]["running"].is_object())
            },
            || format!("edge log:\n{}", self.edge.log()),
        )
    }

    /// `edgecore ctl restart POD` on the gateway: the pod's containers start again.
    fn restart_pod(&self, pod: &str) {
        let out = Command::new(integration::bin("edgecore"))
            .args(["ctl", "restart", pod, "--data-dir"])
            .arg(&self.edge_dir)
            .output()
            .expect("ctl restart");
        assert!(out.status.success(), "ctl restart: {}", stderr(&out));
    }

    fn kubectl(&self) -> Kubectl {
        Kubectl::default_for(&self.cloud)
    }
}

/// A pod that counts, each run starting with a line naming its run (a fresh uuid).
const TALKER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: talker, labels: {app: talker}}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "trap 'exit 0' TERM; echo run $(cat /proc/sys/kernel/random/uuid); i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]
"#;

/// busybox httpd serving one page on port 80, and a shell for exec.
const WEB: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-pod > /www/index.html && echo serving && exec httpd -f -p 80 -h /www"]
"#;

/// Two containers, each saying who it is.
const DUO: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: duo}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: a
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "echo from-a; exec sleep 3600"]
  - name: b
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "echo from-b; exec sleep 3600"]
"#;

/// Reads its stdin and answers each line, for `kubectl attach -i`.
const ECHOER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: echoer}
spec:
  nodeName: edge-1
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/edge/busybox:1
    stdin: true
    stdinOnce: true
    command: ["sh", "-c", "echo ready; while read l; do echo got $l; done; echo bye"]
"#;

// ---------------------------------------------------------------------------------------------
// What the embedded API decides on its own (pass without the tunnel)
// ---------------------------------------------------------------------------------------------

/// Every check kube-apiserver makes before it contacts a kubelet is made before a tunnel
/// stream is opened: a bad query, an unknown pod or container, an unbound pod, a missing
/// command or stream, a missing upgrade. Anonymous users get 401 and certificates outside
/// `system:masters` (an edge's node certificate) 403, on every route of this issue.
#[test]
fn pod_stream_requests_are_checked_before_any_tunnel_is_opened() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    // No edge is connected: a request that got as far as opening a stream would be answered
    // 503 "node edge-1 is not connected"; every answer below is another one.
    cloud.kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: two}
spec:
  nodeName: edge-1
  initContainers:
  - {name: init, image: localhost/edge/busybox:1}
  containers:
  - {name: a, image: localhost/edge/busybox:1}
  - {name: b, image: localhost/edge/busybox:1}
---
apiVersion: v1
kind: Pod
metadata: {name: pending}
spec:
  containers:
  - {name: c, image: localhost/edge/busybox:1}
"#,
        ),
    );
    let curl = Curl::new(&cloud);
    let pods = "/api/v1/namespaces/default/pods";

    // pods/log
    assert_status(
        &curl.admin("GET", &format!("{pods}/two/log")),
        400,
        "BadRequest",
        "a container name must be specified for pod two, choose one of: [a b] or one of the init containers: [init]",
        "log without a container",
    );
    assert_status(
        &curl.admin("GET", &format!("{pods}/two/log?container=c")),
        400,
        "BadRequest",
        "container c is not valid for pod two",
        "log of an unknown container",
    );
    let both = curl.admin(
        "GET",
        &format!("{pods}/two/log?container=a&sinceSeconds=5&sinceTime=2024-01-01T00:00:00Z"),
    );
    assert_status(
        &both,
        422,
        "Invalid",
        "at most one of `sinceTime` or `sinceSeconds` may be specified",
        "sinceSeconds with sinceTime",
    );
    for (query, field) in [
        ("tailLines=-1", "tailLines"),
        ("sinceSeconds=0", "sinceSeconds"),
        ("limitBytes=-3", "limitBytes"),
    ] {
        let answer = curl.admin("GET", &format!("{pods}/two/log?container=a&{query}"));
        assert_status(
            &answer,
            422,
            "Invalid",
            "PodLogOptions \"two\" is invalid",
            query,
        );
        assert_eq!(answer.1["details"]["causes"][0]["field"], field, "{query}");
    }
    assert_status(
        &curl.admin("GET", &format!("{pods}/two/log?container=a&tailLines=ten")),
        400,
        "BadRequest",
        "tailLines",
        "a tailLines that is no number",
    );
    assert_status(
        &curl.admin("GET", &format!("{pods}/pending/log")),
        400,
        "BadRequest",
        "pod pending does not have a host assigned",
        "log of an unbound pod",
    );
    assert_status(
        &curl.admin("GET", &format!("{pods}/nope/log")),
        404,
        "NotFound",
        "pods \"nope\" not found",
        "log of a missing pod",
    );
    assert_status(
        &curl.admin("DELETE", &format!("{pods}/two/log?container=a")),
        405,
        "MethodNotAllowed",
        "",
        "DELETE of a log",
    );

    // pods/exec and pods/attach
    assert_status(
        &curl.admin("POST", &format!("{pods}/two/exec?container=a&stdout=true")),
        400,
        "BadRequest",
        "you must specify at least one command for the container",
        "exec without a command",
    );
    assert_status(
        &curl.admin("POST", &format!("{pods}/two/exec?container=a&command=ls")),
        400,
        "BadRequest",
        "you must specify at least 1 of stdin, stdout, stderr",
        "exec without a stream",
    );
    assert_status(
        &curl.admin("POST", &format!("{pods}/two/attach?container=a")),
        400,
        "BadRequest",
        "you must specify at least 1 of stdin, stdout, stderr",
        "attach without a stream",
    );
    assert_status(
        &curl.admin("POST", &format!("{pods}/two/exec?command=ls&stdout=1")),
        400,
        "BadRequest",
        "a container name must be specified for pod two",
        "exec without a container",
    );
    assert_status(
        &curl.admin("POST", &format!("{pods}/pending/exec?command=ls&stdout=1")),
        400,
        "BadRequest",
        "pod pending does not have a host assigned",
        "exec in an unbound pod",
    );
    assert_status(
        &curl.admin("POST", &format!("{pods}/two/attach?container=a&stdout=1")),
        400,
        "BadRequest",
        "Upgrade request required",
        "attach without an upgrade",
    );

    // pods/portforward
    for bad in ["0", "65536", "http"] {
        assert_status(
            &curl.admin("POST", &format!("{pods}/two/portforward?ports={bad}")),
            400,
            "BadRequest",
            "invalid port",
            bad,
        );
    }
    assert_status(
        &curl.admin("POST", &format!("{pods}/nope/portforward?ports=80")),
        404,
        "NotFound",
        "pods \"nope\" not found",
        "port-forward to a missing pod",
    );

    // Authentication and authorization, as on every other path of the API.
    let paths = [
        ("GET", format!("{pods}/two/log?container=a")),
        (
            "POST",
            format!("{pods}/two/exec?container=a&command=ls&stdout=1"),
        ),
        ("POST", format!("{pods}/two/attach?container=a&stdout=1")),
        ("POST", format!("{pods}/two/portforward?ports=80")),
        ("GET", "/apis/metrics.k8s.io/v1beta1/nodes".to_string()),
        (
            "GET",
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods".to_string(),
        ),
    ];
    for (method, path) in &paths {
        assert_status(
            &curl.request(Who::Anonymous, method, path, &[]),
            401,
            "Unauthorized",
            "Unauthorized",
            &format!("anonymous {method} {path}"),
        );
    }
    // An edge's node certificate is signed by the same CA but is no master.
    let token = cloud.token(&[]);
    let edge_dir = tmp.path().join("edge-1");
    let out = join(&edge_dir, &token, "edge-1");
    assert!(out.status.success(), "{}", stderr(&out));
    let node_pem = edge_dir.join("node.pem");
    for (method, path) in &paths {
        assert_status(
            &curl.request(Who::Certificate(&node_pem), method, path, &[]),
            403,
            "Forbidden",
            "system:node:edge-1",
            &format!("node certificate {method} {path}"),
        );
    }
}

/// `pods/log|exec|attach|portforward` and `metrics.k8s.io` are discovered the way kubectl and
/// kube-rs read discovery; with no edge reporting usage, `kubectl top` of every version says
/// the metrics are not available yet rather than that the Metrics API is missing.
#[test]
fn discovery_lists_the_pod_subresources_and_the_metrics_api() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kubectl = Kubectl::default_for(&cloud);

    let core: Value =
        serde_json::from_str(&kubectl.ok(&["get", "--raw", "/api/v1"])).expect("json");
    let entry = |list: &Value, name: &str| -> Value {
        list["resources"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {list}"))
    };
    for (name, kind, verbs) in [
        ("pods/log", "Pod", vec!["get"]),
        ("pods/exec", "PodExecOptions", vec!["create", "get"]),
        ("pods/attach", "PodAttachOptions", vec!["create", "get"]),
        (
            "pods/portforward",
            "PodPortForwardOptions",
            vec!["create", "get"],
        ),
    ] {
        let e = entry(&core, name);
        assert_eq!(e["kind"], kind, "{name}");
        assert_eq!(e["verbs"], serde_json::json!(verbs), "{name}");
        assert_eq!(e["namespaced"], true, "{name}");
    }

    let groups: Value =
        serde_json::from_str(&kubectl.ok(&["get", "--raw", "/apis"])).expect("json");
    let metrics = groups["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "metrics.k8s.io"))
        .unwrap_or_else(|| panic!("metrics.k8s.io in {groups}"));
    assert_eq!(
        metrics["preferredVersion"]["groupVersion"],
        "metrics.k8s.io/v1beta1"
    );
    let group: Value =
        serde_json::from_str(&kubectl.ok(&["get", "--raw", "/apis/metrics.k8s.io"])).expect("json");
    assert_eq!(group["kind"], "APIGroup");
    let list: Value =
        serde_json::from_str(&kubectl.ok(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1"]))
            .expect("json");
    assert_eq!(entry(&list, "nodes")["kind"], "NodeMetrics");
    assert_eq!(entry(&list, "pods")["kind"], "PodMetrics");
    assert_eq!(
        entry(&list, "pods")["verbs"],
        serde_json::json!(["get", "list"])
    );

    // kubectl resolves the metrics kinds through discovery.
    let resources = kubectl.ok(&["api-resources", "--api-group", "metrics.k8s.io"]);
    assert!(
        resources.contains("NodeMetrics") && resources.contains("PodMetrics"),
        "{resources}"
    );
    // Empty lists, in metrics-server's list kinds.
    let nodes: Value =
        serde_json::from_str(&kubectl.ok(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes"]))
            .expect("json");
    assert_eq!(nodes["kind"], "NodeMetricsList");
    assert_eq!(nodes["items"], serde_json::json!([]));

    // kube-rs sees the group and the subresources too.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = integration::kube_client(&cloud.kubeconfig())
            .await
            .expect("kube client");
        let discovery = kube::Discovery::new(client.clone())
            .run()
            .await
            .expect("kube-rs discovery");
        assert!(
            discovery.has_group("metrics.k8s.io"),
            "kube-rs discovery has metrics.k8s.io"
        );
        let core = client
            .list_core_api_resources("v1")
            .await
            .expect("core resources");
        assert!(
            core.resources.iter().any(|r| r.name == "pods/exec"),
            "kube-rs sees pods/exec"
        );
    });

    // Every kubectl finds the Metrics API (it would say "Metrics API not available").
    for minor in KUBECTL_MINORS {
        let kubectl = Kubectl::minor(&cloud, minor);
        let out = kubectl.run(&["top", "node"]);
        assert!(!out.status.success(), "1.{minor}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("metrics not available yet"),
            "kubectl 1.{minor} top node: {}",
            stderr(&out)
        );
    }
}

/// With its edgecore stopped, every command about a pod of the node fails within a second,
/// naming the node, and nothing waits: logs, logs -f, exec, attach, port-forward, top.
#[test]
fn a_disconnected_edge_fails_every_command_within_a_second() {
    let mut s = Setup::start();
    s.apply(WEB);
    s.wait_running("web", &["web"]);
    let kubectl = s.kubectl();
    // Discovery is cached before the clock starts, as for any user who ran kubectl before.
    kubectl.ok(&["get", "pods"]);
    s.edge.stop();
    let curl = Curl::new(&s.cloud);
    let pods = "/api/v1/namespaces/default/pods";
    let paths = [
        ("GET", format!("{pods}/web/log")),
        ("GET", format!("{pods}/web/log?follow=true")),
        ("POST", format!("{pods}/web/exec?command=true&stdout=1")),
        ("POST", format!("{pods}/web/attach?stdout=1")),
        ("POST", format!("{pods}/web/portforward?ports=80")),
        (
            "GET",
            "/apis/metrics.k8s.io/v1beta1/nodes/edge-1".to_string(),
        ),
        (
            "GET",
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/web".to_string(),
        ),
    ];
    let upgrade = [
        "Connection: Upgrade",
        "Upgrade: SPDY/3.1",
        "X-Stream-Protocol-Version: v4.channel.k8s.io",
    ];
    for (method, path) in &paths {
        let started = Instant::now();
        let answer = curl.request(Who::Admin, method, path, &upgrade);
        let took = started.elapsed();
        assert_status(&answer, 503, "ServiceUnavailable", "node edge-1", path);
        let message = answer.1["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("disconnected") || message.contains("not connected"),
            "{path}: {message}"
        );
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
    }
    // The node's usage is left out of lists rather than failing them, as fast.
    let started = Instant::now();
    let (code, list) = curl.admin("GET", "/apis/metrics.k8s.io/v1beta1/nodes");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (code, &list["items"]),
        (200, &serde_json::json!([])),
        "{list}"
    );

    for args in [
        vec!["logs", "web"],
        vec!["logs", "-f", "web"],
        vec!["exec", "web", "--", "true"],
        vec!["attach", "web"],
        vec!["port-forward", "pod/web", "0:80"],
        vec!["top", "pod", "web"],
        vec!["top", "node", "edge-1"],
    ] {
        let started = Instant::now();
        let out = kubectl.run(&args);
        let took = started.elapsed();
        assert!(!out.status.success(), "kubectl {args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("node edge-1"),
            "kubectl {args:?}: {}",
            stderr(&out)
        );
        assert!(
            took < Duration::from_secs(1),
            "kubectl {args:?} took {took:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// End to end through the tunnel
// ---------------------------------------------------------------------------------------------

/// `kubectl logs` with each option behaves as against a kubelet, and `-f` follows into the
/// next container after a restart.
// needs: tunnel, spdy, websocket
#[test]
fn kubectl_logs_through_the_tunnel() {
    let s = Setup::start();
    s.apply(TALKER);
    s.apply(DUO);
    s.wait_running("talker", &["c"]);
    s.wait_running("duo", &["a", "b"]);
    let kubectl = s.kubectl();
    assert!(
        eventually(Duration::from_secs(10), || {
            kubectl
                .run(&["logs", "talker"])
                .stdout
                .split(|b| *b == b'\n')
                .count()
                > 15
        }),
        "talker logs grow; last answer: {}",
        stderr(&kubectl.run(&["logs", "talker"]))
    );

    let all = kubectl.ok(&["logs", "talker"]);
    let lines: Vec<&str> = all.lines().collect();
    assert!(lines[0].starts_with("run "), "{all}");
    assert_eq!(lines[1], "tick 0", "{all}");
    let first_run = lines[0].to_string();

    let tail = kubectl.ok(&["logs", "talker", "--tail=2"]);
    let tail: Vec<&str> = tail.lines().collect();
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert!(tail.iter().all(|l| l.starts_with("tick ")), "{tail:?}");

    let recent = kubectl.ok(&["logs", "talker", "--since=1s"]);
    let recent: Vec<&str> = recent.lines().collect();
    assert!(
        !recent.is_empty() && recent.len() < lines.len(),
        "{recent:?}"
    );
    assert!(!recent.contains(&"tick 0"), "{recent:?}");
    let since_hour = kubectl.ok(&["logs", "talker", "--since=1h"]);
    assert!(since_hour.starts_with(&first_run), "{since_hour}");

    let stamped = kubectl.ok(&["logs", "talker", "--timestamps", "--tail=3"]);
    for line in stamped.lines() {
        let (stamp, rest) = line.split_once(' ').expect("timestamp, space, line");
        assert!(
            stamp.len() >= 20 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{line}"
        );
        assert!(rest.starts_with("tick "), "{line}");
    }

    let duo = kubectl.ok(&["logs", "duo", "--all-containers"]);
    assert!(duo.contains("from-a") && duo.contains("from-b"), "{duo}");
    assert_eq!(kubectl.ok(&["logs", "duo", "-c", "b"]).trim(), "from-b");

    let limited = kubectl.ok(&["logs", "talker", "--limit-bytes=10"]);
    assert_eq!(limited.len(), 10, "{limited:?}");

    // -f across a restart, then --previous.
    let (follow, lines) = kubectl.spawn_lines(&["logs", "-f", "talker"]);
    wait_line(
        &lines,
        |l| l == "tick 3",
        Duration::from_secs(10),
        "logs -f",
    );
    s.restart_pod("talker");
    let seen = wait_line(
        &lines,
        |l| l.starts_with("run ") && l != first_run,
        Duration::from_secs(20),
        "logs -f after the restart",
    );
    let second_run = seen.last().expect("line").clone();
    wait_line(
        &lines,
        |l| l == "tick 2",
        Duration::from_secs(10),
        "logs -f, new run",
    );
    stop(follow);
    let previous = kubectl.ok(&["logs", "talker", "--previous"]);
    assert!(previous.starts_with(&first_run), "{previous}");
    let current = kubectl.ok(&["logs", "talker"]);
    assert!(current.starts_with(&second_run), "{current}");
}

/// `kubectl exec` with stdin, exit codes, separate stderr and a terminal that is resized;
/// `kubectl attach` to a running process's stdin and stdout.
// needs: tunnel, spdy, websocket
#[test]
fn kubectl_exec_and_attach_through_the_tunnel() {
    let s = Setup::start();
    s.apply(WEB);
    s.wait_running("web", &["web"]);
    let kubectl = s.kubectl();

    let out = kubectl.run_with_stdin(&["exec", "-i", "web", "--", "cat"], Some("hi\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi\n");

    let out = kubectl.run(&["exec", "web", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));

    let out = kubectl.run(&["exec", "web", "--", "sh", "-c", "echo out; echo err >&2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).contains("err"), "{}", stderr(&out));

    let out = kubectl.run(&["exec", "web", "--", "no-such-command"]);
    assert!(!out.status.success());

    // A terminal: script gives kubectl a pseudo-terminal of 30 rows and 100 columns; the
    // container sees that size.
    let shell = format!(
        "stty rows 30 cols 100; {} exec -it web -- stty size",
        kubectl.shell_words()
    );
    let out = Command::new("script")
        .args(["-qec", &shell, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (bsdutils) is installed");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("30 100"), "{}", stdout(&out));

    // attach: output of a running process, then its stdin.
    s.apply(TALKER);
    s.wait_running("talker", &["c"]);
    let (attach, lines) = kubectl.spawn_lines(&["attach", "talker"]);
    wait_line(
        &lines,
        |l| l.starts_with("tick "),
        Duration::from_secs(10),
        "attach",
    );
    stop(attach);

    s.apply(ECHOER);
    s.wait_running("echoer", &["c"]);
    let out = kubectl.run_with_stdin(&["attach", "-i", "echoer"], Some("hello\n"));
    assert!(
        stdout(&out).contains("got hello"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// `kubectl port-forward` to busybox httpd in the pod serves several curls at once.
// needs: tunnel, spdy, websocket
#[test]
fn kubectl_port_forward_through_the_tunnel() {
    let s = Setup::start();
    s.apply(WEB);
    s.wait_running("web", &["web"]);
    forward_and_curl(&s.kubectl(), "default");
}

/// Forwards a free local port to the pod's port 80 and fetches the page with 8 curls at once.
fn forward_and_curl(kubectl: &Kubectl, name: &str) {
    let port = integration::free_tcp_port();
    let (forward, lines) = kubectl.spawn_lines(&["port-forward", "pod/web", &format!("{port}:80")]);
    wait_line(
        &lines,
        |l| l.contains(&format!("127.0.0.1:{port}")),
        Duration::from_secs(10),
        &format!("kubectl {name} port-forward"),
    );
    let curls: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                Command::new("curl")
                    .args(["-s", "--max-time", "10"])
                    .arg(format!("http://127.0.0.1:{port}/"))
                    .output()
                    .expect("curl")
            })
        })
        .collect();
    for curl in curls {
        let out = curl.join().expect("curl thread");
        assert_eq!(
            stdout(&out),
            "hello-from-pod\n",
            "kubectl {name} port-forward: {}",
            stderr(&out)
        );
    }
    let out = stop(forward);
    assert!(
        !stderr(&out).contains("error"),
        "kubectl {name} port-forward: {}",
        stderr(&out)
    );
}

/// `kubectl top node` and `kubectl top pod` show the edge's usage; the raw documents are
/// shaped like metrics-server's.
// needs: tunnel, spdy, websocket
#[test]
fn kubectl_top_shows_edge_usage() {
    let s = Setup::start();
    s.apply(WEB);
    s.apply(TALKER);
    s.wait_running("web", &["web"]);
    s.wait_running("talker", &["c"]);
    let kubectl = s.kubectl();
    assert!(
        eventually(Duration::from_secs(40), || {
            let out = kubectl.run(&["top", "node"]);
            out.status.success() && stdout(&out).lines().any(|l| l.starts_with("edge-1 "))
        }),
        "kubectl top node shows edge-1; last: {}",
        stderr(&kubectl.run(&["top", "node"]))
    );
    let nodes = kubectl.ok(&["top", "node"]);
    assert!(
        !nodes.contains("<unknown>"),
        "allocatable is known: {nodes}"
    );
    assert!(
        eventually(Duration::from_secs(30), || {
            let out = kubectl.run(&["top", "pod"]);
            let text = stdout(&out);
            out.status.success() && text.contains("web ") && text.contains("talker ")
        }),
        "kubectl top pod shows both pods"
    );
    let selected = kubectl.ok(&["top", "pod", "-l", "app=web"]);
    assert!(
        selected.contains("web ") && !selected.contains("talker"),
        "{selected}"
    );
    let containers = kubectl.ok(&["top", "pod", "talker", "--containers"]);
    assert!(
        containers.contains("talker") && containers.contains(" c "),
        "{containers}"
    );

    let node: Value = serde_json::from_str(&kubectl.ok(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/nodes/edge-1",
    ]))
    .expect("json");
    assert_eq!(node["kind"], "NodeMetrics");
    assert_eq!(node["window"], "10s");
    let cpu = node["usage"]["cpu"].as_str().expect("cpu");
    assert!(cpu.ends_with('n') && cpu.len() > 1, "{node}");
    assert!(
        node["usage"]["memory"]
            .as_str()
            .is_some_and(|m| m.ends_with("Ki")),
        "{node}"
    );
    let pod: Value = serde_json::from_str(&kubectl.ok(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/talker",
    ]))
    .expect("json");
    assert_eq!(pod["kind"], "PodMetrics");
    assert_eq!(pod["metadata"]["labels"]["app"], "talker");
    assert_eq!(pod["containers"][0]["name"], "c");
}

/// Each kubectl from 1.27 to 1.33 reads logs, runs commands with stdin and exit codes, and
/// forwards a port, whichever of SPDY and WebSocket it speaks.
// needs: tunnel, spdy, websocket
#[test]
fn every_kubectl_version_logs_execs_and_forwards() {
    let s = Setup::start();
    s.apply(WEB);
    s.wait_running("web", &["web"]);
    for minor in KUBECTL_MINORS {
        let kubectl = Kubectl::minor(&s.cloud, minor);
        let name = format!("1.{minor}");
        let logs = kubectl.ok(&["logs", "web"]);
        assert_eq!(logs, "serving\n", "kubectl {name} logs");
        let out = kubectl.run_with_stdin(&["exec", "-i", "web", "--", "cat"], Some("hi\n"));
        assert_eq!(
            stdout(&out),
            "hi\n",
            "kubectl {name} exec -i: {}",
            stderr(&out)
        );
        let out = kubectl.run(&["exec", "web", "--", "sh", "-c", "exit 3"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "kubectl {name}: {}",
            stderr(&out)
        );
        forward_and_curl(&kubectl, &name);
    }
}
