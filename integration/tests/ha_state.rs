//! Shared state in the cluster (`cloudcore serve --control-plane=kube --state=cluster`): two
//! real cloudcore replicas with separate data dirs, each on its own UDP port on 127.0.0.1,
//! against one real control plane (kube-apiserver and etcd from `../shared/k8s`, started fresh
//! by [`KubeCluster`]), on the credentials of the shipped RBAC.
//!
//! One test runs every scenario on that one control plane: both replicas load one CA; a token
//! created through replica A's CLI joins an edge through replica B and its single use is gone
//! through A as well; a second node with a live node's name is refused through either; 24
//! gateways joining at once through both replicas with one token are all admitted; a
//! `node revoke` through A closes the edge's session on B within a generous bound (the time
//! is printed) and B refuses the revoked certificate afterwards; restarting both replicas with
//! empty data dirs loses nothing (nodes still known, the other edge's certificate still
//! valid). Without the control plane's prerequisites the test fails saying what is missing.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration::cluster::{CLOUDCORE_NAMESPACE, ClusterOptions, Components, KubeCluster};
use integration::{Cloud, Edge, Token, bin, eventually, join};
use serde_json::Value;

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A replica with its state in the cluster; its kubelet listeners on `kubelet_ip` so that two
/// replicas on one host do not fight over ports.
fn replica(dir: &Path, cluster: &KubeCluster, credentials: &Path, kubelet_ip: &str) -> Cloud {
    Cloud::start_kube(
        dir,
        cluster,
        credentials,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &[
            "--state=cluster",
            "--state-namespace",
            CLOUDCORE_NAMESPACE,
            "--kubelet-listen",
            kubelet_ip,
            "--kubelet-advertise-address",
            kubelet_ip,
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `cloudcore ARGS --state=cluster …` as run next to `cloud` (its data dir), with the
/// credentials of cloudcore's ServiceAccount.
fn cli(cloud: &Cloud, credentials: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    let credentials = credentials.to_str().expect("UTF-8 path");
    all.extend_from_slice(&[
        "--state",
        "cluster",
        "--state-namespace",
        CLOUDCORE_NAMESPACE,
        "--kubeconfig",
        credentials,
    ]);
    cloud.cli(&all)
}

/// A single-use (or `uses`) token created through `through`'s CLI for edges dialling `dial`.
fn token(through: &Cloud, credentials: &Path, dial: &Cloud, uses: &str) -> Token {
    let address = dial.address();
    let out = cli(
        through,
        credentials,
        &[
            "token", "create", "-o", "json", "--uses", uses, "--cloud", &address,
        ],
    );
    assert!(out.status.success(), "token create: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("token JSON");
    Token {
        token: v["token"].as_str().expect("token").to_string(),
        id: v["id"].as_str().expect("id").to_string(),
        ca_hash: v["ca_hash"].as_str().expect("ca_hash").to_string(),
        cloud: v["cloud"].as_str().expect("cloud").to_string(),
    }
}

/// `node list -o json` through `through`'s CLI.
fn nodes(through: &Cloud, credentials: &Path) -> Vec<Value> {
    let out = cli(through, credentials, &["node", "list", "-o", "json"]);
    assert!(out.status.success(), "node list: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("node list JSON")
}

fn join_err(dir: &Path, token: &Token, node: &str) -> String {
    let out = join(dir, token, node);
    assert!(
        !out.status.success(),
        "join of {node} with token {} through {} must be refused",
        token.id,
        token.cloud
    );
    stderr(&out)
}

#[test]
fn flags_of_cluster_state_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = Command::new(bin("cloudcore"))
        .args(["serve", "--control-plane", "embedded", "--state", "cluster"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run cloudcore");
    assert_eq!(serve.status.code(), Some(64), "{}", stderr(&serve));
    assert!(
        stderr(&serve).contains("--state=cluster"),
        "{}",
        stderr(&serve)
    );
    let list = Command::new(bin("cloudcore"))
        .args(["token", "list", "--state-namespace", "edge-system"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run cloudcore");
    assert_eq!(list.status.code(), Some(64), "{}", stderr(&list));
    assert!(
        stderr(&list).contains("--state-namespace"),
        "{}",
        stderr(&list)
    );
}

#[test]
fn replicas_share_ca_tokens_nodes_and_revocations_through_the_cluster() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = KubeCluster::start(
        tmp.path(),
        &ClusterOptions {
            components: Components::ApiServerOnly,
            ..ClusterOptions::default()
        },
    );
    let credentials = cluster.cloudcore_credentials(|rbac| rbac);
    let mut a = replica(&tmp.path().join("a"), &cluster, &credentials, "127.0.0.1");
    let mut b = replica(&tmp.path().join("b"), &cluster, &credentials, "127.0.0.2");
    let context = |a: &Cloud, b: &Cloud| {
        format!(
            "replica A log (end):\n{}\nreplica B log (end):\n{}",
            tail(&a.log(), 30),
            tail(&b.log(), 30)
        )
    };

    // One CA: the Secret's, in both replicas' logs and in the hash the CLI prints.
    let to_b = token(&a, &credentials, &b, "1");
    for (name, replica) in [("A", &a), ("B", &b)] {
        assert!(
            replica.log().contains(&to_b.ca_hash),
            "replica {name} does not serve with the CA of the cloudcore-ca Secret ({})\n{}",
            to_b.ca_hash,
            context(&a, &b)
        );
    }
    let secret = cluster.get_json(&["secret", "cloudcore-ca", "-n", CLOUDCORE_NAMESPACE]);
    assert_eq!(secret["type"], "kubernetes.io/tls", "{secret}");

    // A token created through A joins an edge through B (whose certificate the join pins
    // with the CA hash); its single use is then gone through A too.
    let gw_b = tmp.path().join("gw-b");
    let out = join(&gw_b, &to_b, "gw-b");
    assert!(
        out.status.success(),
        "join through B: {}\n{}",
        stderr(&out),
        context(&a, &b)
    );
    let mut edge_b = Edge::start(&gw_b);
    assert!(
        eventually(Duration::from_secs(20), || edge_b.connected()),
        "gw-b did not connect to B\n{}\nedge log:\n{}",
        context(&a, &b),
        tail(&edge_b.log(), 30)
    );
    let reuse = Token {
        cloud: a.address(),
        ..to_b.clone()
    };
    let refused = join_err(&tmp.path().join("gw-x"), &reuse, "gw-x");
    assert!(refused.contains("no uses left"), "{refused}");

    // A live node's name is refused through either replica, with a token made through B.
    let two = token(&b, &credentials, &a, "2");
    for (name, through) in [("A", &a), ("B", &b)] {
        let t = Token {
            cloud: through.address(),
            ..two.clone()
        };
        let refused = join_err(&tmp.path().join(format!("dup-{name}")), &t, "gw-b");
        assert!(
            refused.contains("belongs to a live node"),
            "through {name}: {refused}"
        );
    }
    // The refusals consumed nothing: the other edge joins through A with that token.
    let gw_a = tmp.path().join("gw-a");
    let out = join(&gw_a, &two, "gw-a");
    assert!(out.status.success(), "join through A: {}", stderr(&out));
    let mut edge_a = Edge::start(&gw_a);
    assert!(
        eventually(Duration::from_secs(20), || edge_a.connected()),
        "gw-a did not connect to A\n{}",
        context(&a, &b)
    );
    // One single-use token, two joins at once through A and through B: exactly one admitted.
    let race = token(&a, &credentials, &a, "1");
    let racers: Vec<_> = [("race-a", a.address()), ("race-b", b.address())]
        .into_iter()
        .map(|(name, cloud)| {
            let t = Token {
                cloud,
                ..race.clone()
            };
            let dir = tmp.path().join(name);
            std::thread::spawn(move || join(&dir, &t, name).status.success())
        })
        .collect();
    let admitted = racers
        .into_iter()
        .map(|r| r.join().expect("join thread"))
        .filter(|ok| *ok)
        .count();
    assert_eq!(admitted, 1, "a single-use token raced through two replicas");

    // A rollout: one token for 24 gateways, all joining at once, half through each replica.
    // Every join rewrites the token's Secret, so they lose races to each other and must take
    // turns (`registry::cluster::conflict_pause`), not give up; the uses are then all gone.
    const FLEET: usize = 24;
    let fleet = token(&a, &credentials, &a, &FLEET.to_string());
    let joins: Vec<_> = (0..FLEET)
        .map(|i| {
            let name = format!("fleet-{i:02}");
            let t = Token {
                cloud: if i % 2 == 0 { a.address() } else { b.address() },
                ..fleet.clone()
            };
            let dir = tmp.path().join(&name);
            std::thread::spawn(move || {
                let out = join(&dir, &t, &name);
                (name, out.status.success(), stderr(&out))
            })
        })
        .collect();
    let refused: Vec<String> = joins
        .into_iter()
        .map(|j| j.join().expect("join thread"))
        .filter(|(_, ok, _)| !ok)
        .map(|(name, _, err)| format!("{name}: {}", tail(&err, 3)))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {FLEET} joins through one token were refused:\n{}\n{}",
        refused.len(),
        refused.join("\n"),
        context(&a, &b)
    );
    let spent = join_err(&tmp.path().join("fleet-extra"), &fleet, "fleet-extra");
    assert!(spent.contains("no uses left"), "{spent}");

    let listed = nodes(&b, &credentials);
    for name in ["gw-a", "gw-b"] {
        assert!(
            listed
                .iter()
                .any(|n| n["name"] == name && n["revoked"] == false),
            "{name} in {listed:?}"
        );
    }
    let ports: Vec<u64> = listed
        .iter()
        .filter_map(|n| n["kubelet_port"].as_u64())
        .collect();
    assert_eq!(
        ports.len(),
        listed.len(),
        "each node has a kubelet port: {listed:?}"
    );
    let unique: std::collections::BTreeSet<u64> = ports.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ports.len(),
        "kubelet ports are unique: {listed:?}"
    );

    // Revoked through A: B closes gw-b's session.
    let closes = "cloudcore_revocation_closes_total";
    let before = b.metric(closes);
    let started = Instant::now();
    let out = cli(&a, &credentials, &["node", "revoke", "gw-b"]);
    assert!(out.status.success(), "node revoke: {}", stderr(&out));
    assert!(
        eventually(Duration::from_secs(10), || b.metric(closes) > before),
        "B did not close gw-b's session after a revocation through A\n{}",
        context(&a, &b)
    );
    let took = started.elapsed();
    eprintln!("revocation through A closed the session on B after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "revocation took {took:?} to reach B"
    );
    // B refuses the revoked certificate from now on.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!edge_b.connected(), "gw-b reconnected after its revocation");
    assert!(
        edge_b.log().contains("revoked"),
        "edge log:\n{}",
        tail(&edge_b.log(), 20)
    );
    edge_b.stop();

    // Both replicas restart with empty data dirs: nodes, revocations and certificates come
    // back from the cluster.
    a.stop();
    b.stop();
    for replica in [&a, &b] {
        std::fs::remove_dir_all(&replica.dir).expect("empty the data dir");
    }
    a.restart();
    b.restart();
    let listed = nodes(&a, &credentials);
    assert!(
        listed
            .iter()
            .any(|n| n["name"] == "gw-a" && n["revoked"] == false),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|n| n["name"] == "gw-b" && n["revoked"] == true),
        "{listed:?}"
    );
    assert!(
        eventually(Duration::from_secs(40), || edge_a.connected()),
        "gw-a's certificate is not accepted after the replicas lost their data dirs\n{}",
        context(&a, &b)
    );
    assert!(
        a.log().contains(&to_b.ca_hash) && b.log().contains(&to_b.ca_hash),
        "a replica made a new CA after losing its data dir\n{}",
        context(&a, &b)
    );
    edge_a.stop();
}
