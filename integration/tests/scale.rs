//! A few hundred simulated edges (`integration::sim`: real QUIC + mutual-TLS sessions with
//! joined node identities) on one real cloudcore, in both control-plane modes: all connected,
//! resynced and their Nodes Ready; then cloudcore is killed with -9 and restarted on the same
//! data dir, and every edge must reconnect and resync within 60 s, with no Node's Ready leaving
//! True at any point (a Node watch runs throughout) and no pod deleted or re-created (the API's
//! uids are unchanged and no edge saw a pod deleted or sent again).
//!
//! Kube mode needs what `kube_mode.rs` needs (etcd, kube-apiserver, kube-controller-manager
//! from `../shared/k8s`); without them the test fails saying what is missing.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::bench::{self, JoinToken};
use integration::cluster::{ClusterOptions, Components, KubeCluster};
use integration::sim::{self, Fleet, FleetConfig, ReadyWatch, Snapshot};
use integration::{Cloud, kube_client};

const EDGES: usize = 300;
const PODS_PER_EDGE: usize = 2;
const NAMESPACE: &str = "sim";
/// Every edge must be back and resynced within this long of cloudcore's restart.
const RESYNC_WITHIN: Duration = Duration::from_secs(60);
/// Generous: the first connect also writes every Node and sends every object.
const FIRST_READY_WITHIN: Duration = Duration::from_secs(120);

/// Every simulated edge dials from 127.0.0.1; the per-address share of handshakes must not be
/// what limits the storm.
const CLOUD_FLAGS: &[&str] = &["--max-handshakes-per-address", "1000000"];

/// One storm at a time: the two modes' fleets on the same two cores at once make each other's
/// reconnects (and so the Leases' renewal) slower than either alone, which measures the
/// machine, not cloudcore.
static ONE_STORM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn wait_until(
    what: &str,
    within: Duration,
    cloud: &Cloud,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}; cloud log tail:\n{}",
            tail(&cloud.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn all_in(s: &Snapshot) -> bool {
    s.connected == EDGES as u64 && s.resynced == EDGES as u64
}

/// Joins the edges, creates their desired set, runs the fleet, kills and restarts cloudcore,
/// and checks what the module comment promises.
async fn storm(mut cloud: Cloud, edges_dir: PathBuf) {
    let out = cloud.token(&["--uses", &EDGES.to_string()]);
    let token = JoinToken {
        token: out.token,
        ca_hash: out.ca_hash,
        cloud: out.cloud,
    };
    let names: Vec<String> = (0..EDGES).map(|i| bench::node_name(EDGES, i)).collect();
    let dirs = bench::join_edges(&token, &names, &edges_dir, 16)
        .await
        .expect("join the simulated edges");
    let client = kube_client(&cloud.kubeconfig()).await.expect("kube client");
    sim::create_desired_set(&client, NAMESPACE, &names, PODS_PER_EDGE, 32)
        .await
        .expect("create the desired set");
    let watch = ReadyWatch::start(&client);
    // Each phase's time, counted from the watch's start as the Ready changes are, so that a
    // failure shows its timeline.
    let watching = Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1} s: {what}", watching.elapsed().as_secs_f64());
    let fleet = Fleet::start(
        &dirs,
        FleetConfig {
            address: cloud.address(),
            pods_per_edge: PODS_PER_EDGE,
            edges_per_endpoint: 50,
            connect_concurrency: 64,
            backoff: edgecore::backoff::Backoff::default(),
        },
    )
    .await
    .expect("start the fleet");
    fleet.set_churn(2.0);

    wait_until(
        "all edges connected and resynced",
        FIRST_READY_WITHIN,
        &cloud,
        || all_in(&fleet.snapshot()),
    )
    .await;
    phase("all edges connected and resynced");
    wait_until("all Nodes Ready", FIRST_READY_WITHIN, &cloud, || {
        watch.ready() == EDGES
    })
    .await;
    phase("all Nodes Ready");
    let uids = sim::pod_uids(&client, NAMESPACE).await.expect("pod uids");
    assert_eq!(uids.len(), EDGES * PODS_PER_EDGE, "every pod exists");
    let before = fleet.snapshot();
    assert_eq!(
        (before.pod_deletes, before.pod_restarts),
        (0, 0),
        "no pod deleted or re-sent before the storm: {before:?}"
    );
    assert!(
        before.held >= (EDGES * PODS_PER_EDGE * 3) as u64,
        "every edge holds its pods, ConfigMaps and Secrets: {before:?}"
    );

    // The storm: kill -9, restart on the same data dir and ports.
    let pid = cloud.pid().expect("cloudcore runs");
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -9 {pid}");
    phase("cloudcore killed");
    wait_until(
        "the fleet sees cloudcore gone",
        Duration::from_secs(30),
        &cloud,
        || fleet.snapshot().connected < EDGES as u64,
    )
    .await;
    phase("the fleet saw cloudcore gone");
    cloud.restart();
    phase("cloudcore restarted and healthy");
    let resynced = wait_until(
        "every edge reconnected and resynced after the restart",
        RESYNC_WITHIN,
        &cloud,
        || {
            let now = fleet.snapshot();
            all_in(&now) && now.hello_acks >= before.hello_acks + EDGES as u64
        },
    )
    .await;
    eprintln!("{EDGES} edges reconnected and resynced {resynced:?} after the restart");
    phase("every edge reconnected and resynced");
    // Give the node controller time to write every Node after the reconnects, so that a
    // wrong write (Unknown, NotReady) would be seen by the watch.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = fleet.snapshot();
    let left = watch.left_ready();
    assert!(
        left.is_empty(),
        "no Node's Ready left True during the storm, but {} did: {left:?}; cloud log on leases:\n{}",
        left.len(),
        cloud
            .log()
            .lines()
            .filter(|l| l.contains("lease"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(watch.ready(), EDGES, "every Node Ready after the storm");
    assert_eq!(
        (after.pod_deletes, after.pod_restarts),
        (0, 0),
        "no edge saw a pod deleted or sent again: {after:?}"
    );
    assert!(
        after.held >= before.held,
        "the edges hold what they held: {before:?} → {after:?}"
    );
    assert_eq!(
        sim::pod_uids(&client, NAMESPACE).await.expect("pod uids"),
        uids,
        "no pod deleted or re-created in the API"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_three_hundred_edges_survive_a_kill_and_restart_of_cloudcore() {
    let _one = ONE_STORM.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), CLOUD_FLAGS);
    storm(cloud, tmp.path().join("edges")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_three_hundred_edges_survive_a_kill_and_restart_of_cloudcore() {
    let _one = ONE_STORM.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let (cluster, cloud) = tokio::task::spawn_blocking(move || {
        let cluster = KubeCluster::start(
            &dir.join("k8s"),
            &ClusterOptions {
                components: Components::All,
                ..ClusterOptions::default()
            },
        );
        let credentials = cluster.cloudcore_credentials(|rbac| rbac);
        let cloud = Cloud::start_kube(
            &dir,
            &cluster,
            &credentials,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            CLOUD_FLAGS,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        (cluster, cloud)
    })
    .await
    .expect("start the control plane and cloudcore");
    storm(cloud, tmp.path().join("edges")).await;
    drop(cluster);
}
