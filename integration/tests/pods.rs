//! Pods run on the edge through a real containerd (started by the test with the project's
//! config), real cloudcore with the embedded control plane, real `kubectl`. Needs root and
//! Debian's containerd, runc, containernetworking-plugins and busybox-static (`.ci/run`
//! installs them); without them the tests fail saying what is missing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration::{Cloud, Containerd, Edge, container_status, eventually, join};
use serde_json::Value;

/// Fields drop in order: edgecore, then containerd (removing its pods), then cloudcore, then
/// the directory they all used.
struct Setup {
    edge: Edge,
    containerd: Containerd,
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
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let edge = Edge::start_with(&edge_dir, &["--cri-endpoint", &containerd.endpoint]);
        assert!(
            eventually(Duration::from_secs(15), || edge.connected()),
            "{}",
            edge.log()
        );
        Setup {
            _tmp: tmp,
            cloud,
            containerd,
            edge,
            edge_dir,
        }
    }

    /// Ids of every sandbox containerd still has.
    fn containerd_pods(&self) -> Vec<String> {
        let endpoint = self.containerd.endpoint.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let cri = edgecore::cri::Cri::new(&endpoint).expect("cri");
                cri.list_pod_sandboxes(Default::default())
                    .await
                    .expect("list sandboxes")
                    .into_iter()
                    .map(|s| s.id)
                    .collect()
            })
    }

    fn restart_edge(&mut self) {
        self.edge = Edge::start_with(
            &self.edge_dir,
            &["--cri-endpoint", &self.containerd.endpoint],
        );
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.cloud.kubectl_ok(args, stdin)
    }

    fn pod(&self, name: &str) -> Option<Value> {
        self.cloud.pod(name)
    }

    fn wait_pod(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        self.cloud.wait_pod(name, within, what, check, || {
            format!("edge log:\n{}", self.edge.log())
        })
    }

    fn exec(&self, pod: &str, command: &[&str]) -> (i32, String) {
        let out = std::process::Command::new(integration::bin("edgecore"))
            .args(["ctl", "exec", pod, "--data-dir"])
            .arg(&self.edge_dir)
            .args(["--cri-endpoint", &self.containerd.endpoint, "--"])
            .args(command)
            .output()
            .expect("ctl exec");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

fn condition(pod: &Value, kind: &str) -> String {
    pod["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == kind))
        .and_then(|c| c["status"].as_str())
        .unwrap_or_default()
        .to_string()
}

const WEB: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data: {greeting: hello}
---
apiVersion: v1
kind: Secret
metadata: {name: web-secret}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 5
  containers:
  - name: web
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "trap 'echo got TERM; exit 0' TERM; echo started; while true; do sleep 0.2; done"]
    env:
    - name: PASSWORD
      valueFrom: {secretKeyRef: {name: web-secret, key: password}}
    volumeMounts: [{name: config, mountPath: /etc/web}]
    readinessProbe:
      exec: {command: ["test", "-f", "/etc/web/greeting"]}
      periodSeconds: 1
  volumes:
  - name: config
    configMap: {name: web-config}
"#;

#[test]
fn a_pod_runs_with_its_config_and_secret_and_goes_away_cleanly() {
    let s = Setup::start();
    let applied = Instant::now();
    s.kubectl(&["apply", "-f", "-"], Some(WEB));
    let pod = s.wait_pod("web", Duration::from_secs(20), "Running", |p| {
        container_status(p, "web")["state"]["running"].is_object()
    });
    let took = applied.elapsed();
    eprintln!("apply -> running took {took:?}");
    assert!(
        took <= Duration::from_secs(3),
        "took {took:?}, more than 3 s"
    );
    let pod = if condition(&pod, "Ready") == "True" {
        pod
    } else {
        s.wait_pod("web", Duration::from_secs(10), "Ready", |p| {
            condition(p, "Ready") == "True"
        })
    };
    assert_eq!(pod["status"]["phase"], "Running");
    assert!(
        pod["status"]["podIP"]
            .as_str()
            .is_some_and(|ip| !ip.is_empty()),
        "{}",
        pod["status"]
    );
    assert_eq!(container_status(&pod, "web")["restartCount"], 0);
    let wide = s.kubectl(&["get", "pod", "web", "-o", "wide"], None);
    assert!(wide.contains("Running") && wide.contains("1/1"), "{wide}");

    // The mounted file and the env have the right content.
    assert_eq!(
        s.exec("web", &["cat", "/etc/web/greeting"]),
        (0, "hello".into())
    );
    assert_eq!(
        s.exec("web", &["sh", "-c", "echo -n $PASSWORD"]),
        (0, "s3cret".into())
    );

    // A ConfigMap update reaches the file without a restart.
    let container_id = container_status(&pod, "web")["containerID"].clone();
    s.kubectl(
        &[
            "patch",
            "configmap",
            "web-config",
            "--type=merge",
            "-p",
            r#"{"data":{"greeting":"hi again"}}"#,
        ],
        None,
    );
    assert!(
        eventually(Duration::from_secs(60), || s
            .exec("web", &["cat", "/etc/web/greeting"])
            .1
            == "hi again"),
        "the mounted file did not change"
    );
    let pod = s.pod("web").expect("pod");
    assert_eq!(container_status(&pod, "web")["containerID"], container_id);
    assert_eq!(container_status(&pod, "web")["restartCount"], 0);

    // The container's log, read locally from the gateway's files.
    let out = std::process::Command::new(integration::bin("edgecore"))
        .args(["ctl", "logs", "web", "--tail", "5", "--data-dir"])
        .arg(&s.edge_dir)
        .output()
        .expect("ctl logs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "started",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Delete: SIGTERM, gone within the grace period, the object leaves the API, nothing left.
    let uid = pod["metadata"]["uid"].as_str().expect("uid").to_string();
    // The pod's cgroups, on a cgroup v1 host one per controller, on a v2 host one.
    let cgroups = edgecore::pods::cgroups::pod_dirs(&uid);
    assert!(
        cgroups.iter().any(|dir| dir.exists()),
        "the running pod has no cgroup at any of {cgroups:?}"
    );
    let deleted = Instant::now();
    s.kubectl(&["delete", "pod", "web", "--wait=false"], None);
    assert!(
        eventually(Duration::from_secs(15), || s.pod("web").is_none()),
        "the pod stayed in the API; edge log:\n{}",
        s.edge.log()
    );
    // The container traps SIGTERM and exits at once; without the signal it would have been
    // killed only when the 5 s grace period ran out.
    assert!(
        deleted.elapsed() < Duration::from_secs(4),
        "deletion took {:?}: SIGTERM not delivered?",
        deleted.elapsed()
    );
    assert!(
        s.containerd_pods().is_empty(),
        "sandboxes left behind: {:?}",
        s.containerd_pods()
    );
    let logs_dir = s.edge_dir.join("pods").join(&uid);
    assert!(!logs_dir.exists(), "{} left behind", logs_dir.display());
    // The shim removes the container's own cgroup a moment after the container; edgecore
    // removes the pod's once that is done.
    assert!(
        eventually(Duration::from_secs(5), || cgroups
            .iter()
            .all(|dir| !dir.exists())),
        "cgroups left behind: {:?}",
        cgroups
            .iter()
            .filter(|dir| dir.exists())
            .collect::<Vec<_>>()
    );
}

const CRASHER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  nodeName: edge-1
  restartPolicy: Always
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "exit 1"]
---
apiVersion: v1
kind: Pod
metadata: {name: once}
spec:
  nodeName: edge-1
  restartPolicy: Never
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {name: missing-image}
spec:
  nodeName: edge-1
  containers:
  - name: c
    image: localhost/edge/nonexistent:1
---
apiVersion: v1
kind: Pod
metadata: {name: unhealthy}
spec:
  nodeName: edge-1
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "while true; do sleep 1; done"]
    livenessProbe:
      exec: {command: ["false"]}
      periodSeconds: 1
      failureThreshold: 1
"#;

#[test]
fn restart_policies_backoff_probes_and_missing_images() {
    let s = Setup::start();
    s.kubectl(&["apply", "-f", "-"], Some(CRASHER));
    let pod = s.wait_pod(
        "crasher",
        Duration::from_secs(30),
        "CrashLoopBackOff",
        |p| {
            container_status(p, "c")["state"]["waiting"]["reason"] == "CrashLoopBackOff"
                && container_status(p, "c")["restartCount"].as_u64() >= Some(1)
        },
    );
    assert_eq!(
        container_status(&pod, "c")["lastState"]["terminated"]["exitCode"],
        1
    );
    let message = container_status(&pod, "c")["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("back-off 10s"), "{message}");
    // The backoff grows: the second restart waits 20 s.
    let pod = s.wait_pod(
        "crasher",
        Duration::from_secs(40),
        "a second restart",
        |p| {
            container_status(p, "c")["restartCount"].as_u64() >= Some(2)
                && container_status(p, "c")["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        },
    );
    let message = container_status(&pod, "c")["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("back-off 20s"), "{message}");

    let pod = s.wait_pod("once", Duration::from_secs(20), "Failed", |p| {
        p["status"]["phase"] == "Failed"
    });
    assert_eq!(
        container_status(&pod, "c")["state"]["terminated"]["exitCode"],
        3
    );
    assert_eq!(container_status(&pod, "c")["restartCount"], 0);

    let pod = s.wait_pod(
        "missing-image",
        Duration::from_secs(20),
        "an image error",
        |p| {
            container_status(p, "c")["state"]["waiting"]["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("ErrImage") || r == "ImagePullBackOff")
        },
    );
    assert!(
        container_status(&pod, "c")["state"]["waiting"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("localhost/edge/nonexistent:1")),
        "{}",
        pod["status"]
    );

    s.wait_pod(
        "unhealthy",
        Duration::from_secs(30),
        "a liveness restart",
        |p| container_status(p, "c")["restartCount"].as_u64() >= Some(1),
    );
    assert!(s.edge.connected(), "edgecore stayed healthy");
}

#[test]
fn a_killed_edgecore_adopts_its_running_pods_untouched() {
    let mut s = Setup::start();
    let mut yaml = String::new();
    for i in 0..5 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec:\n  nodeName: edge-1\n  containers:\n  - name: c\n    image: localhost/edge/busybox:1\n    command: [\"sh\", \"-c\", \"while true; do sleep 1; done\"]\n"
        ));
    }
    s.kubectl(&["apply", "-f", "-"], Some(&yaml));
    let before: Vec<(Value, Value, Value)> = (0..5)
        .map(|i| {
            let pod = s.wait_pod(&format!("p{i}"), Duration::from_secs(30), "Running", |p| {
                container_status(p, "c")["state"]["running"].is_object()
            });
            let c = container_status(&pod, "c");
            (
                c["containerID"].clone(),
                c["state"]["running"]["startedAt"].clone(),
                c["restartCount"].clone(),
            )
        })
        .collect();
    s.edge.kill();
    // The containers keep running without edgecore.
    for i in 0..5 {
        assert_eq!(s.exec(&format!("p{i}"), &["true"]).0, 0, "p{i} still runs");
    }
    s.restart_edge();
    std::thread::sleep(Duration::from_secs(3));
    for (i, (id, started, restarts)) in before.iter().enumerate() {
        let pod = s.pod(&format!("p{i}")).expect("pod");
        let c = container_status(&pod, "c");
        assert_eq!(&c["containerID"], id, "p{i} kept its container");
        assert_eq!(
            &c["state"]["running"]["startedAt"], started,
            "p{i} was not restarted"
        );
        assert_eq!(&c["restartCount"], restarts);
    }
    assert!(
        s.edge.log().contains("adopted running pod"),
        "{}",
        s.edge.log()
    );
}

#[test]
fn security_context_host_ports_and_config_errors() {
    let s = Setup::start();
    let host_port = integration::free_tcp_port();
    let yaml = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: locked}}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 2
  securityContext: {{runAsUser: 65534, runAsGroup: 65534}}
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["httpd", "-f", "-p", "8080", "-h", "/etc"]
    securityContext: {{readOnlyRootFilesystem: true, capabilities: {{drop: ["ALL"]}}}}
    ports: [{{containerPort: 8080, hostPort: {host_port}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: misconfigured}}
spec:
  nodeName: edge-1
  containers:
  - name: c
    image: localhost/edge/busybox:1
    env:
    - name: X
      valueFrom: {{configMapKeyRef: {{name: nope, key: k}}}}
"#
    );
    s.kubectl(&["apply", "-f", "-"], Some(&yaml));
    s.wait_pod("locked", Duration::from_secs(20), "Running", |p| {
        container_status(p, "c")["state"]["running"].is_object()
    });
    assert_eq!(s.exec("locked", &["id", "-u"]), (0, "65534\n".into()));
    assert_eq!(s.exec("locked", &["id", "-g"]), (0, "65534\n".into()));
    let (code, _) = s.exec("locked", &["sh", "-c", "echo x > /etc/x"]);
    assert_ne!(code, 0, "the root filesystem is read-only");
    // The hostPort reaches the container's httpd from the gateway.
    let mut answered = String::new();
    let reached = eventually(Duration::from_secs(10), || {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", host_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.write_all(b"GET /passwd HTTP/1.0\r\n\r\n");
        answered.clear();
        let _ = stream.read_to_string(&mut answered);
        answered.starts_with("HTTP/1")
    });
    assert!(
        reached,
        "no HTTP answer on hostPort {host_port}: {answered:?}"
    );
    assert!(answered.contains("nobody"), "{answered}");

    let pod = s.wait_pod(
        "misconfigured",
        Duration::from_secs(20),
        "CreateContainerConfigError",
        |p| container_status(p, "c")["state"]["waiting"]["reason"] == "CreateContainerConfigError",
    );
    assert_eq!(
        container_status(&pod, "c")["state"]["waiting"]["message"],
        "configmap \"nope\" not found"
    );
    assert_eq!(pod["status"]["phase"], "Pending");
    // Creating the ConfigMap unblocks it.
    s.kubectl(&["create", "configmap", "nope", "--from-literal=k=v"], None);
    s.wait_pod("misconfigured", Duration::from_secs(20), "Running", |p| {
        container_status(p, "c")["state"]["running"].is_object()
            || container_status(p, "c")["state"]["terminated"].is_object()
            || container_status(p, "c")["lastState"]["terminated"].is_object()
    });
}

#[test]
fn a_pod_whose_sandbox_dies_comes_back_in_a_new_one() {
    let s = Setup::start();
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: phoenix}\nspec:\n  nodeName: edge-1\n  containers:\n  - name: c\n    image: localhost/edge/busybox:1\n    command: [\"sh\", \"-c\", \"while true; do sleep 1; done\"]\n";
    s.kubectl(&["apply", "-f", "-"], Some(yaml));
    let pod = s.wait_pod("phoenix", Duration::from_secs(20), "Running", |p| {
        container_status(p, "c")["state"]["running"].is_object()
    });
    let first = container_status(&pod, "c")["containerID"].clone();
    // What a crash of the pause process or a reboot does: the sandbox stops under edgecore.
    let endpoint = s.containerd.endpoint.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let cri = edgecore::cri::Cri::new(&endpoint).expect("cri");
            for sandbox in cri
                .list_pod_sandboxes(Default::default())
                .await
                .expect("list")
            {
                cri.stop_pod_sandbox(&sandbox.id).await.expect("stop");
            }
        });
    let pod = s.wait_pod(
        "phoenix",
        Duration::from_secs(30),
        "running again in a new sandbox",
        |p| {
            let c = container_status(p, "c");
            c["state"]["running"].is_object() && c["containerID"] != first
        },
    );
    assert_eq!(container_status(&pod, "c")["restartCount"], 1);
    assert_eq!(s.containerd_pods().len(), 1, "the dead sandbox was removed");
}

/// `ctl logs -f` prints what the container writes as it writes it, and keeps following into
/// the next container after a restart (`ctl restart`); `--tail N` prints the last N lines.
#[test]
fn ctl_logs_follows_a_container_across_restarts() {
    let s = Setup::start();
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: talker}\nspec:\n  nodeName: edge-1\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: localhost/edge/busybox:1\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done\"]\n";
    s.kubectl(&["apply", "-f", "-"], Some(yaml));
    s.wait_pod("talker", Duration::from_secs(20), "Running", |p| {
        container_status(p, "c")["state"]["running"].is_object()
    });
    let ctl = |args: &[&str]| {
        let mut command = std::process::Command::new(integration::bin("edgecore"));
        command
            .arg("ctl")
            .args(args)
            .arg("--data-dir")
            .arg(&s.edge_dir);
        command
    };
    let mut follow = ctl(&["logs", "-f", "talker"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ctl logs -f");
    let stdout = follow.stdout.take().expect("stdout");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &dyn Fn(&str) -> bool, within: Duration| -> Vec<String> {
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
        panic!("ctl logs -f: expected line not seen within {within:?}; got {seen:?}");
    };
    // Lines keep coming while the container runs.
    let seen = wait_for(&|l| l == "tick 10", Duration::from_secs(10));
    assert!(seen.iter().any(|l| l == "tick 0"), "{seen:?}");
    // After a restart the new container starts counting again, on the same follow.
    let out = ctl(&["restart", "talker"]).output().expect("ctl restart");
    assert!(
        out.status.success(),
        "ctl restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(&|l| l == "tick 0", Duration::from_secs(15));
    wait_for(&|l| l == "tick 3", Duration::from_secs(5));
    let _ = follow.kill();
    let _ = follow.wait();
    // --tail
    let out = ctl(&["logs", "talker", "--tail", "2"])
        .output()
        .expect("ctl logs --tail");
    let text = String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = text.lines().collect();
    assert_eq!(tail.len(), 2, "{text}");
    assert!(tail.iter().all(|l| l.starts_with("tick ")), "{text}");
}

/// Runtime changes reach the API without a per-pod poll (`edgecore::pods::pleg`): a settled
/// pod steps only every 60 s on its own, so a container that exits by itself is reported
/// within seconds only if the runtime's events (containerd ≥ 1.7) or the node-wide relist (1.6,
/// which answers GetContainerEvents with UNIMPLEMENTED) woke its worker. A container that
/// exits while containerd is down (the event stream, if any, broken with it) is found by the
/// relist once containerd is back.
#[test]
fn containers_that_exit_by_themselves_are_reported_promptly_also_across_a_runtime_restart() {
    let s = Setup::start();
    let pod = |name: &str, seconds: u32, code: u32| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: edge-1\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: localhost/edge/busybox:1\n    command: [\"sh\", \"-c\", \"sleep {seconds}; exit {code}\"]\n"
        )
    };
    s.kubectl(&["apply", "-f", "-"], Some(&pod("quitter", 5, 3)));
    s.wait_pod("quitter", Duration::from_secs(20), "Running", |p| {
        container_status(p, "c")["state"]["running"].is_object()
    });
    // 5 s of sleep, then the exit must show well before the 60 s a settled pod waits.
    let pod_seen = s.wait_pod("quitter", Duration::from_secs(15), "Failed", |p| {
        p["status"]["phase"] == "Failed"
    });
    assert_eq!(
        container_status(&pod_seen, "c")["state"]["terminated"]["exitCode"],
        3
    );
    // The metrics say truthfully how changes are followed on this runtime.
    let endpoint = s.containerd.endpoint.clone();
    let version = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let cri = edgecore::cri::Cri::new(&endpoint).expect("cri");
            cri.version().await.expect("version").runtime_version
        });
    let subscribed = s.edge.metric("edgecore_runtime_events_subscribed");
    if version.starts_with("1.6") {
        assert_eq!(subscribed, 0.0, "containerd {version} has no events");
        assert!(s.edge.metric("edgecore_runtime_events_failures_total") >= 1.0);
    } else {
        assert_eq!(subscribed, 1.0, "containerd {version} offers events");
    }
    assert!(s.edge.metric("edgecore_runtime_relists_total") >= 1.0);

    // Exits while containerd is down.
    s.kubectl(&["apply", "-f", "-"], Some(&pod("late", 12, 4)));
    s.wait_pod("late", Duration::from_secs(20), "Running", |p| {
        container_status(p, "c")["state"]["running"].is_object()
    });
    let running = Instant::now();
    s.containerd.stop_daemon();
    assert!(
        running.elapsed() < Duration::from_secs(10),
        "containerd took {:?} to stop: the container may have exited before",
        running.elapsed()
    );
    std::thread::sleep(Duration::from_secs(14).saturating_sub(running.elapsed()));
    s.containerd.start_daemon();
    let pod_seen = s.wait_pod(
        "late",
        Duration::from_secs(20),
        "Failed after containerd came back",
        |p| p["status"]["phase"] == "Failed",
    );
    assert_eq!(
        container_status(&pod_seen, "c")["state"]["terminated"]["exitCode"],
        4
    );
}
