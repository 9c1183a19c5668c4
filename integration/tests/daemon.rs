//! What both daemons share (`daemon` crate), checked on the real binaries: private data dirs,
//! one process per data dir, one gateway per identity, and health endpoints that tell the
//! truth about the store, the disk and the runtime.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{
    Cloud, Containerd, Edge, Tmpfs, bin, eventually, free_tcp_port, free_udp_port, join_and_run,
};

/// GETs `path` on a loopback port: the status code and the body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((code, body.to_string()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn secret(cloud: &Cloud) {
    cloud.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "db-password",
            "--from-literal=password=hunter2",
        ],
        None,
    );
}

#[test]
fn data_dirs_databases_and_keys_are_private_on_both_sides_and_loose_modes_are_fixed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cloud = Cloud::start(tmp.path(), &[]);
    secret(&cloud);
    let edge_dir = tmp.path().join("edge");
    let mut edge = join_and_run(&cloud, &edge_dir, "gw-modes", &["--no-pod-runtime"]);
    // Writes went through both WALs (the Secret, the node's session), so -wal and -shm exist.
    let c = &cloud.dir.clone();
    assert_eq!(mode(c), 0o700, "cloud data dir");
    assert_eq!(mode(&c.join("pki")), 0o700, "pki");
    for file in [
        "cloudcore.db",
        "cloudcore.db-wal",
        "cloudcore.db-shm",
        "api.db",
        "api.db-wal",
        "api.db-shm",
        "pki/ca.key",
        "kubeconfig",
        "cloudcore.lock",
    ] {
        assert_eq!(mode(&c.join(file)), 0o600, "cloud {file}");
    }
    assert_eq!(mode(&edge_dir), 0o700, "edge data dir");
    for file in [
        "edge.db",
        "edge.db-wal",
        "edge.db-shm",
        "node.pem",
        "edgecore.lock",
    ] {
        assert_eq!(mode(&edge_dir.join(file)), 0o600, "edge {file}");
    }

    // Modes an older version (or an operator's cp) left behind: fixed at the next start, with
    // a warning naming the file.
    edge.stop();
    cloud.stop();
    chmod(c, 0o755);
    for file in ["api.db", "api.db-wal", "cloudcore.db"] {
        if c.join(file).exists() {
            chmod(&c.join(file), 0o644);
        }
    }
    chmod(&edge_dir, 0o755);
    chmod(&edge_dir.join("edge.db"), 0o644);
    cloud.restart();
    assert_eq!(mode(c), 0o700, "cloud data dir after restart");
    assert_eq!(mode(&c.join("api.db")), 0o600);
    assert_eq!(mode(&c.join("cloudcore.db")), 0o600);
    let log = cloud.log();
    assert!(
        log.contains("data dir was open to other users; made it private"),
        "{log}"
    );
    assert!(
        log.contains("file holding secrets was readable by other users"),
        "{log}"
    );
    assert!(log.contains("api.db"), "{log}");
    let edge = Edge::start_with(&edge_dir, &["--no-pod-runtime"]);
    assert!(
        eventually(Duration::from_secs(15), || edge.connected()),
        "{}",
        edge.log()
    );
    assert_eq!(mode(&edge_dir), 0o700);
    assert_eq!(mode(&edge_dir.join("edge.db")), 0o600);
    assert!(
        edge.log()
            .contains("file holding secrets was readable by other users"),
        "{}",
        edge.log()
    );
}

#[test]
fn a_second_serve_or_run_on_a_data_dir_is_refused_and_the_first_keeps_working() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let kubeconfig = std::fs::read(cloud.kubeconfig()).expect("kubeconfig");
    let second = Command::new(bin("cloudcore"))
        .args(["serve", "--control-plane", "embedded", "--data-dir"])
        .arg(&cloud.dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_udp_port())])
        .args([
            "--metrics-listen",
            &format!("127.0.0.1:{}", free_tcp_port()),
        ])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_tcp_port())])
        .output()
        .expect("run a second cloudcore serve");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second serve ran: {stderr}");
    let pid = cloud.pid().expect("pid");
    assert!(
        stderr.contains(&format!(
            "data dir {} is in use by another cloudcore serve (pid {pid})",
            cloud.dir.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(cloud.kubeconfig()).expect("kubeconfig"),
        kubeconfig,
        "the second serve rewrote the kubeconfig"
    );
    // The CLI is not the daemon: it works while serve runs.
    let list = cloud.cli(&["token", "list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    // Ready once the controllers' caches have listed (a moment after the start).
    assert!(
        eventually(Duration::from_secs(20), || get(
            cloud.metrics_port,
            "/readyz"
        )
        .is_some_and(|r| r.0 == 200)),
        "{:?}",
        get(cloud.metrics_port, "/readyz?verbose")
    );

    let edge_dir = tmp.path().join("edge");
    let edge = join_and_run(&cloud, &edge_dir, "gw-once", &["--no-pod-runtime"]);
    let second = Command::new(bin("edgecore"))
        .args([
            "run",
            "--no-pod-runtime",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&edge_dir)
        .output()
        .expect("run a second edgecore run");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second run ran: {stderr}");
    let pid = edge.pid().expect("pid");
    assert!(
        stderr.contains(&format!(
            "data dir {} is in use by another edgecore run (pid {pid})",
            edge_dir.display()
        )),
        "{stderr}"
    );
    assert!(
        edge.connected(),
        "the first edge lost its session: {}",
        edge.log()
    );
    // `ctl get` reads the store while run holds it (the Node arrives once the session's
    // resync is through, which may be a moment after the session opened).
    assert!(
        eventually(Duration::from_secs(10), || edge
            .objects()
            .iter()
            .any(|o| o.kind == "Node" && o.name == "gw-once")),
        "{:?}",
        edge.objects()
    );
    assert_eq!(cloud.metric("cloudcore_reconnects_total"), 0.0);
}

#[test]
fn edge_json_naming_another_node_than_the_certificate_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let dir = tmp.path().join("edge");
    drop(join_and_run(&cloud, &dir, "gw-real", &["--no-pod-runtime"]));
    let path = dir.join("edge.json");
    let text = std::fs::read_to_string(&path).expect("edge.json");
    std::fs::write(&path, text.replace("gw-real", "gw-other")).expect("write");
    let out = Command::new(bin("edgecore"))
        .args([
            "run",
            "--no-pod-runtime",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .expect("run edgecore");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("names node \"gw-other\" but the certificate in")
            && stderr.contains("is for node \"gw-real\""),
        "{stderr}"
    );
}

#[test]
fn a_copied_edge_data_dir_is_reported_by_the_cloud_and_the_replaced_edge_backs_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let first_dir = tmp.path().join("edge-a");
    let first = join_and_run(&cloud, &first_dir, "gw-twin", &["--no-pod-runtime"]);
    // A copy of the joined data dir, run elsewhere: the same certificate and key.
    let copy_dir = tmp.path().join("edge-b");
    std::fs::create_dir(&copy_dir).expect("mkdir");
    for file in ["node.pem", "ca.crt", "edge.json"] {
        std::fs::copy(first_dir.join(file), copy_dir.join(file)).expect("copy");
    }
    let resyncs_before = cloud.metric("cloudcore_sync_resyncs_total");
    let started = Instant::now();
    let copy = Edge::start_with(&copy_dir, &["--no-pod-runtime"]);
    std::thread::sleep(Duration::from_secs(20));
    let resyncs = cloud.metric("cloudcore_sync_resyncs_total") - resyncs_before;
    let conflicts = cloud.metric("cloudcore_identity_conflicts_total");
    eprintln!(
        "two edgecores with one identity for {:?}: {resyncs} resyncs, {conflicts} identity conflicts",
        started.elapsed()
    );
    // Without the backoff they replaced each other about once a second (20+ resyncs).
    assert!(resyncs >= 2.0, "the copy never took over: {}", copy.log());
    assert!(resyncs <= 8.0, "{resyncs} resyncs in 20 s");
    assert!(
        conflicts >= 1.0,
        "no conflict counted; cloud log:\n{}",
        cloud.log()
    );
    let log = cloud.log();
    assert_eq!(
        log.matches("two peers are using this node's identity")
            .count(),
        1,
        "one warning per node per minute:\n{log}"
    );
    let edge_logs = format!("{}{}", first.log(), copy.log());
    assert!(
        edge_logs.contains("another connection with this node's identity took over"),
        "{edge_logs}"
    );
}

#[test]
fn cloudcore_readiness_follows_a_full_disk_and_liveness_does_not() {
    let disk = Tmpfs::mount("64m");
    let cloud = Cloud::start(disk.path(), &[]);
    assert!(
        eventually(Duration::from_secs(20), || get(
            cloud.metrics_port,
            "/readyz"
        )
        .is_some_and(|r| r.0 == 200)),
        "{:?}",
        get(cloud.metrics_port, "/readyz?verbose")
    );
    let (code, body) = get(cloud.metrics_port, "/readyz?verbose").expect("readyz");
    assert_eq!(code, 200, "{body}");
    for check in [
        "ping",
        "registry",
        "data-dir",
        "watch-caches",
        "hub",
        "api-store",
        "controllers",
    ] {
        assert!(body.contains(&format!("[+]{check} ok")), "{body}");
    }

    // Fill the disk.
    let filler = disk.path().join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    drop(file);
    let (code, body) = get(cloud.metrics_port, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("[-]data-dir failed: cannot write in")
            && body.contains("No space left on device"),
        "{body}"
    );
    assert!(body.contains("readyz check failed"), "{body}");
    let (code, body) = get(cloud.metrics_port, "/healthz").expect("healthz");
    assert_eq!(code, 503, "{body}");
    let (code, body) = get(cloud.metrics_port, "/livez").expect("livez");
    assert_eq!(code, 200, "a full disk is no reason to restart: {body}");
    // The embedded API's own /readyz says the same, to kubectl.
    let out = cloud.kubectl(&["get", "--raw", "/readyz?verbose"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    // kube-apiserver answers a failed check with 500, which kubectl shows as InternalError
    // with the check lines (the metrics port above keeps 503).
    assert!(
        text.contains("InternalError") && text.contains("[-]data-dir failed"),
        "{text}"
    );
    // A probe without a client certificate reads them too, as kube-apiserver lets everyone
    // read its health endpoints (system:public-info-viewer).
    let url = format!("https://127.0.0.1:{}/readyz?verbose", cloud.api_port);
    let out = std::process::Command::new("curl")
        .args(["-sk", "-w", "\n%{http_code}", &url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n500") && text.contains("[-]data-dir failed"),
        "anonymous /readyz on the embedded API: {text}"
    );
    let out = cloud.kubectl(&["get", "--raw", "/livez"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::remove_file(&filler).expect("free the disk");
    assert!(
        eventually(Duration::from_secs(10), || get(
            cloud.metrics_port,
            "/readyz"
        )
        .is_some_and(|r| r.0 == 200)),
        "{:?}",
        get(cloud.metrics_port, "/readyz?verbose")
    );
    let out = cloud.kubectl(&["get", "--raw", "/readyz"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn edgecore_readiness_follows_the_runtime_not_the_cloud() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let mut cloud = Cloud::start(tmp.path(), &[]);
    let edge = join_and_run(
        &cloud,
        &tmp.path().join("edge"),
        "gw-health",
        &["--cri-endpoint", &containerd.endpoint],
    );
    let port = edge.metrics_port;
    let (code, body) = get(port, "/readyz?verbose").expect("readyz");
    assert_eq!(code, 200, "{body}");
    for check in ["ping", "store", "data-dir", "runtime"] {
        assert!(body.contains(&format!("[+]{check} ok")), "{body}");
    }

    // The cloud going away is no failure: the edge works offline.
    cloud.stop();
    assert!(eventually(Duration::from_secs(40), || !edge.connected()));
    assert_eq!(get(port, "/readyz").map(|r| r.0), Some(200));

    containerd.stop_daemon();
    let (code, body) = get(port, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("[-]runtime failed: "), "{body}");
    let (code, body) = get(port, "/livez").expect("livez");
    assert_eq!(
        code, 200,
        "a runtime outage is no reason to restart edgecore: {body}"
    );

    containerd.start_daemon();
    assert!(
        eventually(Duration::from_secs(20), || get(port, "/readyz")
            .is_some_and(|r| r.0 == 200)),
        "{:?}",
        get(port, "/readyz?verbose")
    );
}
