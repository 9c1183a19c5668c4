//! The edge's side of issue 13 with real parts: a private containerd on a non-default socket,
//! real cloudcore (embedded control plane), real edgecore, real `kubectl`. `edgecore ctl` finds
//! the runtime the daemon runs with; the stream handlers read what containerd really writes and
//! reports (log files across a restart, CRI stats). The streams themselves are driven through
//! kubectl once the API front-ends exist; the dispatcher is unit-tested over real QUIC in
//! `edgecore::streams`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use edgecore::streams::logs::{self, Follow, Instance, Options};
use integration::{Cloud, Containerd, Edge, eventually, join};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: ticker
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "while true; do echo tick; sleep 1; done"]
"#;

/// `edgecore ctl exec` on `dir`, with the environment's endpoint removed so only the flag
/// (if any) and the data dir count.
fn ctl_exec(dir: &Path, flag: Option<&str>, command: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(integration::bin("edgecore"));
    cmd.env_remove("EDGECORE_CRI_ENDPOINT")
        .args(["ctl", "exec", "ticker", "--data-dir"])
        .arg(dir);
    if let Some(endpoint) = flag {
        cmd.args(["--cri-endpoint", endpoint]);
    }
    cmd.arg("--").args(command).output().expect("ctl exec")
}

#[test]
fn ctl_exec_uses_the_cri_endpoint_the_daemon_runs_with() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    assert_ne!(containerd.endpoint, edgecore::cri::DEFAULT_ENDPOINT);
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let edge_dir = tmp.path().join("edge-1");
    let out = join(&edge_dir, &token, "edge-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Joined but never run: nothing says which runtime to use.
    let out = ctl_exec(&edge_dir, None, &["true"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("runtime.json does not exist"), "{stderr}");
    assert!(stderr.contains("--cri-endpoint"), "{stderr}");

    let edge = Edge::start_with(&edge_dir, &["--cri-endpoint", &containerd.endpoint]);
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "{}",
        edge.log()
    );
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(POD));
    cloud.wait_pod(
        "ticker",
        Duration::from_secs(60),
        "running",
        |p| p["status"]["phase"] == "Running",
        || format!("edge log:\n{}", edge.log()),
    );

    // No flag: the daemon's endpoint, from DIR/runtime.json.
    let out = ctl_exec(&edge_dir, None, &["sh", "-c", "echo hi; exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(edge_dir.join("runtime.json")).expect("runtime.json"),
    )
    .expect("json");
    assert_eq!(record["criEndpoint"], containerd.endpoint.as_str());

    // The flag still wins over the record.
    let missing = format!("unix://{}/nothing.sock", tmp.path().display());
    let out = ctl_exec(&edge_dir, Some(&missing), &["true"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ListContainers"), "{stderr}");
    let out = ctl_exec(&edge_dir, Some(&containerd.endpoint), &["echo", "flag"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "flag\n");
    drop(edge);
}

const COUNTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: counter}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: counter
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); echo line $i; sleep 0.3; done"]
"#;

/// Reads `reader` into `got` until `done` says so, for 20 s at most.
async fn read_until(
    reader: &mut tokio::io::DuplexStream,
    got: &mut String,
    done: impl Fn(&str) -> bool,
) {
    let read = async {
        while !done(got) {
            let mut buf = [0u8; 4096];
            let n = reader.read(&mut buf).await.expect("read");
            assert!(n > 0, "the followed log ended");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .is_err()
    {
        panic!("the followed log did not get there: {got:?}");
    }
}

#[test]
fn logs_follow_a_real_container_across_its_restart_and_stats_show_it() {
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
    cloud.kubectl_ok(&["apply", "-f", "-"], Some(COUNTER));
    let pod = cloud.wait_pod(
        "counter",
        Duration::from_secs(60),
        "running",
        |p| p["status"]["phase"] == "Running",
        || format!("edge log:\n{}", edge.log()),
    );
    let uid = pod["metadata"]["uid"].as_str().expect("uid").to_string();
    let dir = edgecore::pods::spec::pod_paths(&edge_dir, &uid)
        .log_dir
        .join("counter");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    runtime.block_on(async {
        // Stats of the running pod, from containerd's CRI stats.
        let cri = edgecore::cri::Cri::new(&containerd.endpoint).expect("cri");
        let sampler = tokio::sync::Mutex::default();
        let summary = edgecore::streams::stats::collect("edge-1", &cri, &sampler)
            .await
            .expect("stats");
        assert_eq!(summary.node.node_name, "edge-1");
        assert!(summary.node.memory.working_set_bytes > 0, "{summary:?}");
        assert!(summary.node.cpu.usage_nano_cores.is_some(), "{summary:?}");
        let stats = summary
            .pods
            .iter()
            .find(|p| p.name == "counter")
            .unwrap_or_else(|| panic!("no counter pod in {summary:?}"));
        assert_eq!(
            (stats.namespace.as_str(), stats.uid.as_str()),
            ("default", uid.as_str())
        );
        let [container] = stats.containers.as_slice() else {
            panic!("{stats:?}");
        };
        assert_eq!(container.name, "counter");
        assert!(container.memory.working_set_bytes > 0, "{stats:?}");
        assert!(container.cpu.usage_core_nano_seconds > 0, "{stats:?}");
        assert!(stats.memory.working_set_bytes > 0, "{stats:?}");

        // No previous instance yet.
        let refusal =
            logs::pick(&dir, Instance::Previous, "default/counter", "counter").unwrap_err();
        assert!(
            refusal.message.contains("previous terminated container"),
            "{}",
            refusal.message
        );

        // Follow the running instance, then restart the container: the follow goes on into
        // the next instance's file, which counts from 1 again.
        let start = logs::pick(&dir, Instance::Current, "default/counter", "counter").expect("log");
        let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
        let stop = CancellationToken::new();
        let follow = {
            let (dir, stop) = (dir.clone(), stop.clone());
            tokio::spawn(async move {
                logs::write_log(
                    &dir,
                    start,
                    Options::default(),
                    Follow::Yes,
                    &mut writer,
                    &stop,
                )
                .await
            })
        };
        let mut got = String::new();
        read_until(&mut reader, &mut got, |t| t.contains("line 3\n")).await;
        let out = std::process::Command::new(integration::bin("edgecore"))
            .args(["ctl", "restart", "counter", "--data-dir"])
            .arg(&edge_dir)
            .output()
            .expect("ctl restart");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        read_until(&mut reader, &mut got, |t| {
            t.match_indices("line 1\n")
                .nth(1)
                .is_some_and(|(at, _)| t[at..].contains("line 2\n"))
        })
        .await;
        stop.cancel();
        follow.await.expect("task").expect("no error");
        // Every line once, in order: the first instance's to its end, then the second's.
        let lines: Vec<&str> = got.lines().collect();
        let restart = lines
            .iter()
            .rposition(|l| *l == "line 1")
            .expect("second instance");
        let first: Vec<String> = (1..=restart).map(|i| format!("line {i}")).collect();
        assert_eq!(lines[..restart], first[..], "{got:?}");
        assert_eq!(lines[restart..restart + 2], ["line 1", "line 2"], "{got:?}");

        // Now there is a previous instance: the one that counted to the restart.
        let (attempt, path) =
            logs::pick(&dir, Instance::Previous, "default/counter", "counter").expect("previous");
        assert_eq!(attempt, 0);
        let mut out = Vec::new();
        let options = Options {
            tail: Some(1),
            ..Default::default()
        };
        logs::write_log(
            &dir,
            (attempt, path),
            options,
            Follow::No,
            &mut out,
            &CancellationToken::new(),
        )
        .await
        .expect("previous log");
        assert_eq!(String::from_utf8_lossy(&out), format!("line {restart}\n"));
    });
    drop(edge);
}
