//! Streams under load, end to end with real parts: a private containerd, cloudcore with the
//! embedded control plane, an edgecore joined to it, and the real `kubectl logs -f`
//! ([docs/streams.md](../../docs/streams.md)). A stalled reader must not make either daemon
//! buffer the log; a hundred follows work at once; the stream past `--max-streams-per-edge` is
//! refused with 429 naming the node; and every stream is released when its kubectl goes away.
//! Needs root and Debian's containerd, runc, containernetworking-plugins and busybox-static
//! (`.ci/run` installs them).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use integration::bench::{self, metric_sum, rss_kib};
use integration::{Cloud, Containerd, Edge, container_status, eventually, join};

const NODE: &str = "edge-1";
/// A container that writes 1 KiB lines as fast as it can (`yes` as PID 1 ignores SIGTERM,
/// hence the short grace period).
const WRITER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: writer}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "l=0123456789abcdef; l=$l$l$l$l; l=$l$l$l$l; l=$l$l$l$l; exec yes $l"]
"#;
/// A container that writes one numbered line a second.
const TICKER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/edge/busybox:1
    command: ["sh", "-c", "trap 'exit 0' TERM; i=0; while true; do echo \"tick $i\"; i=$((i+1)); sleep 1; done"]
"#;
const CLOUD_STREAMS_OPEN: &str = "cloudcore_streams_open";
const EDGE_STREAMS_OPEN: &str = "edgecore_streams_open";
/// What a stalled reader may add to either daemon's resident memory.
const STALL_RSS_BOUND_KIB: u64 = 16 * 1024;

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
    fn start(cloud_flags: &[&str]) -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let containerd = Containerd::start(&tmp.path().join("containerd"));
        let cloud = Cloud::start(tmp.path(), cloud_flags);
        let token = cloud.token(&[]);
        let edge_dir = tmp.path().join(NODE);
        let out = join(&edge_dir, &token, NODE);
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
            edge,
            _containerd: containerd,
            cloud,
            edge_dir,
            _tmp: tmp,
        }
    }

    /// Applies a pod manifest and waits until its container runs; the pod's uid.
    fn run_pod(&self, manifest: &str, name: &str) -> String {
        self.cloud.kubectl_ok(&["apply", "-f", "-"], Some(manifest));
        let pod = self.cloud.wait_pod(
            name,
            Duration::from_secs(60),
            "container running",
            |pod| !container_status(pod, "c")["state"]["running"].is_null(),
            || format!("edge log:\n{}", self.edge.log()),
        );
        pod["metadata"]["uid"]
            .as_str()
            .expect("pod uid")
            .to_string()
    }

    /// `kubectl ARGS` against the embedded API, started with stdout and stderr piped.
    fn spawn_kubectl(&self, args: &[&str]) -> Kubectl {
        let child = bench::kubectl_command("kubectl".as_ref(), &self.cloud, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed on every machine of this project");
        Kubectl(child)
    }

    /// The open-stream gauges summed over kinds: (cloudcore's, edgecore's); `None` for one
    /// that is not served.
    fn streams_open(&self) -> (Option<f64>, Option<f64>) {
        let edge_page = integration::http_get(self.edge.metrics_port, "/metrics");
        (
            metric_sum(&self.cloud.metrics(), CLOUD_STREAMS_OPEN),
            edge_page.and_then(|page| metric_sum(&page, EDGE_STREAMS_OPEN)),
        )
    }

    /// Waits until both gauges show `n` open streams; panics with what they show otherwise.
    fn wait_streams_open(&self, n: f64, within: Duration, what: &str) {
        let reached = eventually(within, || self.streams_open() == (Some(n), Some(n)));
        let (cloud, edge) = self.streams_open();
        assert!(
            reached,
            "{what}: expected {n} open streams on both sides within {within:?}, \
             {CLOUD_STREAMS_OPEN}={cloud:?} {EDGE_STREAMS_OPEN}={edge:?}"
        );
    }

    fn pids(&self) -> (u32, u32) {
        (
            self.cloud.pid().expect("cloudcore runs"),
            self.edge.pid().expect("edgecore runs"),
        )
    }
}

/// A running kubectl, killed (even if stopped) when dropped, so a failing test leaves none.
struct Kubectl(Child);

impl Drop for Kubectl {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

/// Total size of the files below `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {} failed", child.id());
}

/// Counts the bytes a child prints on stdout, on a thread of its own.
fn count_stdout(child: &mut Child) -> Arc<AtomicU64> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let count = Arc::new(AtomicU64::new(0));
    let counting = count.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            counting.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    count
}

/// Keeps the last `tick N` a child prints on stdout (-1 before any), on a thread of its own.
fn follow_ticks(child: &mut Child) -> Arc<AtomicI64> {
    let stdout = child.stdout.take().expect("piped stdout");
    let last = Arc::new(AtomicI64::new(-1));
    let keeping = last.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("tick ").and_then(|n| n.parse().ok()) {
                keeping.store(n, Ordering::Relaxed);
            }
        }
    });
    last
}

/// The stderr of a child that has exited (or been killed).
fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut text);
    }
    text
}

/// SIGKILL (which also ends a stopped process) and reap.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `kubectl logs -f` of a fast writer is stopped with SIGSTOP for 15 s while the writer keeps
/// writing: neither daemon's memory grows by more than 16 MiB, a small fraction of what the
/// writer wrote meanwhile (flow control reaches back to the log file). After SIGCONT the data
/// flows again, and once kubectl is killed both sides release the stream.
#[test]
fn a_stalled_reader_keeps_cloudcore_and_edgecore_memory_flat() {
    let setup = Setup::start(&[]);
    let uid = setup.run_pod(WRITER, "writer");
    let log_dir = edgecore::pods::spec::pod_paths(&setup.edge_dir, &uid).log_dir;
    let (cloud_pid, edge_pid) = setup.pids();

    let mut reader = setup.spawn_kubectl(&["logs", "-f", "writer"]);
    let received = count_stdout(&mut reader.0);
    // Normally a few seconds; a machine busy with other tests' I/O has taken over 20 s.
    assert!(
        eventually(Duration::from_secs(60), || received.load(Ordering::Relaxed)
            > 4_000_000),
        "kubectl logs -f printed {} bytes of the fast writer in 60 s; kubectl: {}",
        received.load(Ordering::Relaxed),
        {
            kill(&mut reader.0);
            stderr_of(&mut reader.0)
        }
    );
    setup.wait_streams_open(1.0, Duration::from_secs(5), "while following");
    // Running at full speed for a moment: what is in flight is in the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let (cloud_before, edge_before) = (rss_kib(cloud_pid).unwrap(), rss_kib(edge_pid).unwrap());
    let written_before = dir_bytes(&log_dir);

    signal(&reader.0, "-STOP");
    let stopped = Instant::now();
    let (mut cloud_max, mut edge_max) = (cloud_before, edge_before);
    while stopped.elapsed() < Duration::from_secs(15) {
        cloud_max = cloud_max.max(rss_kib(cloud_pid).unwrap());
        edge_max = edge_max.max(rss_kib(edge_pid).unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    let written = dir_bytes(&log_dir) - written_before;
    let received_stopped = received.load(Ordering::Relaxed);
    let (cloud_growth, edge_growth) = (
        cloud_max.saturating_sub(cloud_before),
        edge_max.saturating_sub(edge_before),
    );
    eprintln!(
        "stalled 15 s: the writer wrote {:.1} MB; RSS growth cloudcore {cloud_growth} KiB \
         (from {cloud_before} KiB), edgecore {edge_growth} KiB (from {edge_before} KiB)",
        written as f64 / 1e6
    );
    // Buffering the log would take many times the bound: otherwise the bound proves nothing.
    assert!(
        written > 8 * STALL_RSS_BOUND_KIB * 1024,
        "the writer wrote only {written} bytes in 15 s, too little to tell buffering from flow control"
    );
    assert!(
        cloud_growth < STALL_RSS_BOUND_KIB && edge_growth < STALL_RSS_BOUND_KIB,
        "a stalled reader grew cloudcore by {cloud_growth} KiB and edgecore by {edge_growth} KiB \
         (bound {STALL_RSS_BOUND_KIB} KiB) while the writer wrote {written} bytes"
    );

    signal(&reader.0, "-CONT");
    assert!(
        eventually(Duration::from_secs(30), || received.load(Ordering::Relaxed)
            > received_stopped + 4_000_000),
        "after SIGCONT kubectl printed only {} more bytes in 30 s",
        received.load(Ordering::Relaxed) - received_stopped
    );
    assert_eq!(
        reader.0.try_wait().expect("kubectl status"),
        None,
        "kubectl exited"
    );

    kill(&mut reader.0);
    setup.wait_streams_open(0.0, Duration::from_secs(10), "after kubectl was killed");
}

/// A hundred `kubectl logs -f` of one pod on one edge all deliver the lines written while they
/// are all open, both sides count a hundred streams, and none is left once they are killed.
#[test]
fn a_hundred_concurrent_follows_all_deliver() {
    const FOLLOWS: usize = 100;
    let setup = Setup::start(&[]);
    setup.run_pod(TICKER, "ticker");

    let mut followers: Vec<(Kubectl, Arc<AtomicI64>)> = (0..FOLLOWS)
        .map(|_| {
            let mut child = setup.spawn_kubectl(&["logs", "-f", "ticker"]);
            let last = follow_ticks(&mut child.0);
            std::thread::sleep(Duration::from_millis(20));
            (child, last)
        })
        .collect();
    let behind = |followers: &[(Kubectl, Arc<AtomicI64>)], at_least: i64| {
        followers
            .iter()
            .filter(|(_, last)| last.load(Ordering::Relaxed) < at_least)
            .count()
    };
    let all_printed = eventually(Duration::from_secs(180), || behind(&followers, 0) == 0);
    let newest = followers
        .iter()
        .map(|(_, last)| last.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let all_live = all_printed
        && eventually(Duration::from_secs(30), || {
            behind(&followers, newest + 1) == 0
        });
    if !all_live {
        let late = behind(&followers, newest + 1);
        let errors: std::collections::BTreeSet<String> = followers
            .iter_mut()
            .map(|(child, _)| {
                kill(&mut child.0);
                stderr_of(&mut child.0).trim().to_string()
            })
            .filter(|e| !e.is_empty())
            .collect();
        panic!(
            "{late} of {FOLLOWS} kubectl logs -f did not deliver tick {newest}+1; kubectl said: {errors:?}"
        );
    }
    setup.wait_streams_open(
        FOLLOWS as f64,
        Duration::from_secs(5),
        "with every follow open",
    );
    for (child, _) in &mut followers {
        assert_eq!(child.0.try_wait().expect("kubectl status"), None);
        kill(&mut child.0);
    }
    setup.wait_streams_open(
        0.0,
        Duration::from_secs(15),
        "after every kubectl was killed",
    );
}

/// With `--max-streams-per-edge 4`, four follows run and the fifth `kubectl logs` is refused
/// with 429 (kubectl's `TooManyRequests`) naming the node and the cap; once one follow ends,
/// its slot is free again.
#[test]
fn the_stream_past_the_cap_is_refused_naming_the_node() {
    let setup = Setup::start(&["--max-streams-per-edge", "4"]);
    setup.run_pod(TICKER, "ticker");

    let mut followers: Vec<(Kubectl, Arc<AtomicI64>)> = (0..4)
        .map(|_| {
            let mut child = setup.spawn_kubectl(&["logs", "-f", "ticker"]);
            let last = follow_ticks(&mut child.0);
            (child, last)
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(60), || followers
            .iter()
            .all(|(_, last)| last.load(Ordering::Relaxed) >= 0)),
        "the four follows did not all print a line"
    );
    setup.wait_streams_open(4.0, Duration::from_secs(5), "with four follows");

    let started = Instant::now();
    let out = setup.cloud.kubectl(&["logs", "ticker", "--tail=1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a fifth stream was let through");
    eprintln!("the fifth stream: {}", stderr.trim());
    assert!(
        stderr.contains("TooManyRequests") && stderr.contains(NODE) && stderr.contains('4'),
        "the refusal should be a 429 naming node {NODE} and its cap of 4: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        started.elapsed()
    );
    // The refused request took no slot, and the four still deliver.
    assert_eq!(setup.streams_open(), (Some(4.0), Some(4.0)));

    let (mut first, _) = followers.remove(0);
    kill(&mut first.0);
    setup.wait_streams_open(3.0, Duration::from_secs(10), "after one follow ended");
    let line = setup
        .cloud
        .kubectl_ok(&["logs", "ticker", "--tail=1"], None);
    assert!(line.starts_with("tick "), "{line}");
    for (child, _) in &mut followers {
        kill(&mut child.0);
    }
    setup.wait_streams_open(
        0.0,
        Duration::from_secs(10),
        "after every kubectl was killed",
    );
}
