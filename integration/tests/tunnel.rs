//! The foundation's promises, checked with the real binaries over UDP on 127.0.0.1.

use std::time::{Duration, Instant};

use integration::{Cloud, Edge, eventually, join, join_with};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn joined_edge_connects_and_is_listed_as_connected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&["--node", "gw-1"]);
    let edge_dir = tmp.path().join("gw-1");
    let out = join(&edge_dir, &token, "gw-1");
    assert!(out.status.success(), "join failed: {}", stderr(&out));

    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(edge_dir.join("node.pem"))
            .expect("node.pem")
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the private key file is private");

    let edge = Edge::start(&edge_dir);
    assert!(
        eventually(Duration::from_secs(10), || cloud
            .metric("cloudcore_connected_edges")
            == 1.0),
        "cloud never counted the edge; cloud log:\n{}\nedge log:\n{}",
        cloud.log(),
        edge.log()
    );
    assert!(
        eventually(Duration::from_secs(5), || edge.connected()),
        "edge log:\n{}",
        edge.log()
    );
    let node = cloud.node("gw-1").expect("node listed");
    assert_eq!(node["connected"], true, "{node}");
    assert!(
        node["cert_not_after_ms"].as_i64().unwrap_or(0) > 0,
        "{node}"
    );
    assert_eq!(cloud.metric("cloudcore_joins_total"), 1.0);

    let text = cloud.cli(&["node", "list"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("gw-1") && l.contains("Connected")),
        "{text}"
    );
}

#[test]
fn bad_tokens_are_refused_each_with_its_own_reason_and_no_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &["--join-failure-burst", "100"]);

    let expired = cloud.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1100));
    let used = cloud.token(&[]);
    assert!(
        join(&tmp.path().join("first"), &used, "first")
            .status
            .success()
    );
    let revoked = cloud.token(&[]);
    assert!(
        cloud
            .cli(&["token", "revoke", &revoked.id])
            .status
            .success()
    );
    let good = cloud.token(&[]);
    let wrong_secret = integration::Token {
        token: format!("{}.0000000000000000", good.id),
        ..good.clone()
    };
    let bound = cloud.token(&["--node", "gw-bound"]);

    let cases = [
        (&expired, "token_expired", "expired"),
        (&used, "token_used_up", "no uses left"),
        (&revoked, "token_revoked", "was revoked"),
        (
            &wrong_secret,
            "token_secret_mismatch",
            "secret does not match",
        ),
        (
            &bound,
            "token_node_mismatch",
            "is bound to node \"gw-bound\"",
        ),
    ];
    for (i, (token, reason, text)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("edge-{i}"));
        let out = join(&dir, token, "gw-other");
        assert_eq!(out.status.code(), Some(3), "{reason}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(text),
            "{reason}: expected {text:?} in {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(reason),
            "{reason}: the code is shown: {}",
            stderr(&out)
        );
        assert!(
            !dir.join("node.pem").exists(),
            "{reason}: no certificate was written"
        );
        let series = format!("cloudcore_join_rejections_total{{reason=\"{reason}\"}}");
        assert_eq!(cloud.metric(&series), 1.0, "{series}\n{}", cloud.metrics());
    }
    let names: Vec<String> = cloud
        .nodes()
        .iter()
        .filter_map(|n| n["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, ["first"], "no refused join recorded a node");
    assert_eq!(cloud.metric("cloudcore_joins_total"), 1.0);
    // The token whose secret was guessed wrong is untouched and still works.
    assert!(
        join(&tmp.path().join("good"), &good, "good")
            .status
            .success()
    );
}

#[test]
fn wrong_ca_hash_is_refused_before_the_token_is_sent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let dir = tmp.path().join("edge");
    let out = join_with(&dir, &token.cloud, &token.token, &wrong, "gw-1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("does not match --ca-hash"), "{err}");
    assert!(
        err.contains(&token.ca_hash),
        "the error shows what the cloud presented: {err}"
    );
    assert!(!dir.join("node.pem").exists());
    // The cloud never saw a join request: nothing counted, the token still has its use.
    let page = cloud.metrics();
    assert!(!page.contains("cloudcore_join_rejections_total{"), "{page}");
    let list = cloud.cli(&["token", "list", "-o", "json"]);
    let tokens: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(tokens[0]["uses_left"], 1, "{tokens}");
    assert!(
        join(&dir, &token, "gw-1").status.success(),
        "the right hash works"
    );
}

#[test]
fn malformed_input_to_the_commands_gets_usage_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = join_with(
        &tmp.path().join("e"),
        "127.0.0.1:1",
        "x.y",
        "sha256:zz",
        "gw-1",
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--ca-hash must be"),
        "{}",
        stderr(&out)
    );

    let run = std::process::Command::new(integration::bin("edgecore"))
        .args(["run", "--data-dir"])
        .arg(tmp.path().join("never-joined"))
        .output()
        .expect("run");
    assert_eq!(run.status.code(), Some(64));
    assert!(
        stderr(&run).contains("run `edgecore join`"),
        "{}",
        stderr(&run)
    );

    let serve = std::process::Command::new(integration::bin("cloudcore"))
        .args(["serve", "--listen", "not-an-address"])
        .output()
        .expect("serve");
    assert_eq!(serve.status.code(), Some(64));
    assert!(stderr(&serve).contains("--listen"), "{}", stderr(&serve));
}

#[test]
fn revoked_node_is_cut_off_within_a_second_and_stays_refused_after_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let dir = tmp.path().join("gw-1");
    assert!(join(&dir, &token, "gw-1").status.success());
    let edge = Edge::start(&dir);
    assert!(eventually(Duration::from_secs(10), || cloud
        .metric("cloudcore_connected_edges")
        == 1.0));

    let revoked_at = Instant::now();
    let out = cloud.cli(&["node", "revoke", "gw-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        eventually(Duration::from_secs(1), || cloud
            .metric("cloudcore_connected_edges")
            == 0.0),
        "still connected 1 s after revocation; cloud log:\n{}",
        cloud.log()
    );
    let closed_after = revoked_at.elapsed();
    assert!(closed_after < Duration::from_secs(1), "{closed_after:?}");
    assert!(eventually(Duration::from_secs(2), || !edge.connected()));

    // The edge keeps retrying and keeps being refused.
    let refused = "cloudcore_connection_rejections_total{reason=\"revoked\"}";
    assert!(
        eventually(Duration::from_secs(10), || cloud.metric(refused) >= 1.0),
        "reconnect was not refused; edge log:\n{}",
        edge.log()
    );
    assert!(
        edge.log().contains("revoked"),
        "the edge says why: {}",
        edge.log()
    );

    cloud.restart();
    assert!(
        eventually(Duration::from_secs(15), || cloud.metric(refused) >= 1.0),
        "after restart the reconnect was not refused as revoked; cloud log:\n{}",
        cloud.log()
    );
    assert_eq!(cloud.metric("cloudcore_connected_edges"), 0.0);
    assert_eq!(cloud.node("gw-1").expect("listed")["revoked"], true);
}

#[test]
fn fifty_edges_reconnect_after_a_cloud_restart_with_spread_retries() {
    const EDGES: usize = 50;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&["--uses", &EDGES.to_string()]);
    let names: Vec<String> = (0..EDGES).map(|i| format!("edge-{i:02}")).collect();
    std::thread::scope(|s| {
        for chunk in names.chunks(10) {
            let (token, tmp) = (&token, tmp.path());
            s.spawn(move || {
                for name in chunk {
                    let out = join(&tmp.join(name), token, name);
                    assert!(out.status.success(), "join {name}: {}", stderr(&out));
                }
            });
        }
    });
    let edges: Vec<Edge> = names
        .iter()
        .map(|n| Edge::start(&tmp.path().join(n)))
        .collect();
    // Fifty processes starting at once on two shared cores: give the first connections time.
    let all_connected = eventually(Duration::from_secs(60), || {
        cloud.metric("cloudcore_connected_edges") == EDGES as f64
    });
    if !all_connected {
        let stragglers: Vec<String> = edges
            .iter()
            .filter(|e| !e.connected())
            .map(|e| format!("{}:\n{}", e.dir.display(), e.log()))
            .collect();
        panic!(
            "only {} of {EDGES} connected; edges not connected:\n{}",
            cloud.metric("cloudcore_connected_edges"),
            stragglers.join("\n")
        );
    }

    cloud.stop();
    let restarted = Instant::now();
    cloud.restart();
    let all_back = eventually(Duration::from_secs(15), || {
        cloud.metric("cloudcore_connected_edges") == EDGES as f64
    });
    let took = restarted.elapsed();
    assert!(
        all_back,
        "only {} of {EDGES} reconnected within 15 s",
        cloud.metric("cloudcore_connected_edges")
    );
    eprintln!("{EDGES} edges reconnected {took:?} after the restart began");
    assert_eq!(cloud.metric("cloudcore_reconnects_total"), EDGES as f64);

    // Retry times are spread: reconnections do not arrive in one burst.
    let mut times: Vec<i64> = cloud
        .nodes()
        .iter()
        .filter_map(|n| n["connected_ms"].as_i64())
        .collect();
    times.sort_unstable();
    assert_eq!(times.len(), EDGES);
    let span = times[EDGES - 1] - times[0];
    let busiest_100ms = times
        .iter()
        .map(|t| times.iter().filter(|u| **u >= *t && **u < t + 100).count())
        .max()
        .unwrap_or(0);
    eprintln!("reconnect span {span} ms, busiest 100 ms window holds {busiest_100ms}");
    assert!(span >= 300, "reconnects spread over only {span} ms");
    assert!(
        busiest_100ms <= EDGES / 2,
        "{busiest_100ms} of {EDGES} reconnected within 100 ms"
    );
    for mut edge in edges {
        assert!(edge.is_running());
        edge.stop();
    }
}

#[test]
fn certificate_is_renewed_over_the_tunnel_late_in_its_life() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &["--cert-lifetime", "20s"]);
    let token = cloud.token(&[]);
    let dir = tmp.path().join("gw-1");
    assert!(join(&dir, &token, "gw-1").status.success());
    let before = std::fs::read(dir.join("node.pem")).expect("node.pem");
    let joined = Instant::now();
    let mut edge = Edge::start(&dir);
    assert!(eventually(Duration::from_secs(10), || edge.connected()));
    // Validity is 22 s (20 s plus 2 s backdating); 70–90 % of it is 13–18 s after the join.
    assert!(
        eventually(Duration::from_secs(25), || edge
            .metric("edgecore_certificate_renewals_total")
            == 1.0),
        "no renewal; edge log:\n{}\ncloud log:\n{}",
        edge.log(),
        cloud.log()
    );
    let renewed_after = joined.elapsed();
    assert!(
        renewed_after >= Duration::from_secs(12),
        "renewed too early, after {renewed_after:?}"
    );
    assert_eq!(cloud.metric("cloudcore_certificate_renewals_total"), 1.0);
    let after = std::fs::read(dir.join("node.pem")).expect("node.pem");
    assert_ne!(before, after, "node.pem holds the new certificate and key");

    // The renewed identity opens a new session after the old certificate has expired.
    edge.stop();
    std::thread::sleep(Duration::from_secs(8));
    let edge = Edge::start(&dir);
    assert!(
        eventually(Duration::from_secs(10), || edge.connected()),
        "renewed identity did not connect; edge log:\n{}",
        edge.log()
    );
}
