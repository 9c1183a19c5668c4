//! Authenticated but hostile or broken peers: the cloud closes their connection with a logged
//! reason and keeps serving everyone else. Clients here are in-process and speak raw QUIC.

use std::time::Duration;

use edgecore::{dial, identity, tls};
use integration::peer::{closed_by_cloud, connect_as, connect_with};
use integration::{Cloud, Edge, eventually, join, join_with};
use proto::{FrameReader, FrameWriter, Hello, Message, NodeInfo, ProtocolVersion, close_code};
use quinn::{Connection, ConnectionError};
use rand::{Rng, SeedableRng};

fn hello(major: u32) -> Message {
    Message::Hello(Hello {
        version: ProtocolVersion { major, minor: 0 },
        node_info: NodeInfo::default(),
        inventory: Vec::new(),
        cloud_state_id: String::new(),
    })
}

/// Opens a stream, writes raw bytes (optionally after a proper hello) and finishes it.
async fn send_raw(connection: &Connection, after_hello: bool, bytes: &[u8]) {
    let (send, recv) = connection.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
    let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
    if after_hello {
        writer.send(hello(1)).await.expect("hello");
        let ack = reader.next().await.expect("read").expect("reply");
        assert!(matches!(ack, Message::HelloAck(_)), "{ack:?}");
    }
    let stream = writer.get_mut();
    // The cloud may close before everything is written; that is the point.
    let _ = stream.write_all(bytes).await;
    let _ = stream.finish();
}

struct Setup {
    _tmp: tempfile::TempDir,
    cloud: Cloud,
    hostile_dir: std::path::PathBuf,
    good: Edge,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&["--uses", "2"]);
    let hostile_dir = tmp.path().join("gw-a");
    assert!(join(&hostile_dir, &token, "gw-a").status.success());
    let good_dir = tmp.path().join("gw-b");
    assert!(join(&good_dir, &token, "gw-b").status.success());
    let good = Edge::start(&good_dir);
    assert!(
        eventually(Duration::from_secs(10), || good.connected()),
        "{}",
        good.log()
    );
    Setup {
        _tmp: tmp,
        cloud,
        hostile_dir,
        good,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_the_offending_connection() {
    integration::init_test_tracing();
    let mut s = setup();
    let oversized = u32::MAX.to_be_bytes().to_vec();
    let empty_envelope = 0u32.to_be_bytes().to_vec();
    // An envelope with only field 99 set: well-formed protobuf, unknown message type.
    let unknown_field = [0, 0, 0, 3, 0x98, 0x06, 0x01].to_vec();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let random: Vec<Vec<u8>> = (0..4)
        .map(|_| (0..4096).map(|_| rng.random::<u8>()).collect())
        .collect();

    let mut cases: Vec<(&str, bool, Vec<u8>)> = vec![
        ("oversized frame before hello", false, oversized.clone()),
        ("oversized frame mid-session", true, oversized),
        ("empty envelope", false, empty_envelope.clone()),
        ("empty envelope mid-session", true, empty_envelope),
        ("unknown message type", true, unknown_field),
    ];
    for (i, bytes) in random.into_iter().enumerate() {
        cases.push((
            if i % 2 == 0 {
                "random bytes"
            } else {
                "random bytes mid-session"
            },
            i % 2 == 1,
            bytes,
        ));
    }
    let total = cases.len();
    for (name, after_hello, bytes) in cases {
        let connection = connect_as(&s.hostile_dir, &s.cloud).await;
        send_raw(&connection, after_hello, &bytes).await;
        assert_eq!(
            closed_by_cloud(&connection).await,
            close_code::PROTOCOL_VIOLATION,
            "{name}"
        );
    }

    let log = s.cloud.log();
    for reason in ["frame_too_large", "unknown_message_type"] {
        assert!(log.contains(reason), "the cloud logs {reason}:\n{log}");
    }
    let page = s.cloud.metrics();
    let counted: f64 = page
        .lines()
        .filter(|l| l.starts_with("cloudcore_protocol_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        counted, total as f64,
        "every bad connection is counted by reason:\n{page}"
    );
    assert!(
        s.cloud
            .metric("cloudcore_protocol_errors_total{reason=\"frame_too_large\"}")
            >= 2.0,
        "{page}"
    );
    assert!(s.cloud.is_running(), "cloudcore survived");
    assert!(s.good.connected(), "the well-behaved edge stayed connected");
    assert_eq!(
        s.good.metric("edgecore_reconnects_total"),
        0.0,
        "and never had to reconnect"
    );
    assert_eq!(s.cloud.metric("cloudcore_connected_edges"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_version_and_cloud_only_messages_are_refused() {
    integration::init_test_tracing();
    let mut s = setup();

    let connection = connect_as(&s.hostile_dir, &s.cloud).await;
    let (send, recv) = connection.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
    let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
    writer.send(hello(2)).await.expect("hello");
    match reader.next().await {
        Ok(Some(Message::Error(e))) => {
            assert_eq!(e.code, proto::ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("2.0"), "{}", e.message);
        }
        other => panic!("expected an unsupported-version error, got {other:?}"),
    }
    drop(reader);
    assert_eq!(
        closed_by_cloud(&connection).await,
        close_code::UNSUPPORTED_VERSION
    );

    // A message only the cloud may send, mid-session.
    let connection = connect_as(&s.hostile_dir, &s.cloud).await;
    let (send, recv) = connection.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
    let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
    writer.send(hello(1)).await.expect("hello");
    assert!(matches!(
        reader.next().await,
        Ok(Some(Message::HelloAck(_)))
    ));
    writer
        .send(Message::JoinResponse(proto::JoinResponse {
            certificate_der: vec![],
            ca_der: vec![],
        }))
        .await
        .expect("send");
    assert_eq!(
        closed_by_cloud(&connection).await,
        close_code::PROTOCOL_VIOLATION
    );

    assert!(
        s.cloud.log().contains("unsupported_version") || s.cloud.log().contains("not supported")
    );
    assert!(s.cloud.is_running());
    assert!(s.good.connected());
    assert_eq!(s.good.metric("edgecore_reconnects_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_node_a_can_never_act_as_node_b() {
    integration::init_test_tracing();
    let s = setup();
    // Node A's certificate with files claiming to be B: the cloud reads the name from the
    // certificate, so the session is A's.
    let mut identity = identity::load(&s.hostile_dir).expect("identity");
    identity.config.node_name = "gw-b".into();
    let endpoint = dial::client_endpoint(dial::resolve(&s.cloud.address()).await.expect("addr"))
        .expect("endpoint");
    let mut config = edgecore::hub::HubConfig::new(s.hostile_dir.clone());
    config.connect_timeout = Duration::from_secs(5);
    let session = edgecore::hub::Session::open(
        endpoint,
        &identity,
        &s.cloud.address(),
        &config,
        NodeInfo::default(),
        Vec::new(),
        String::new(),
    )
    .await
    .expect("session");
    assert_eq!(session.ack.node_name, "gw-a");
    let nodes = s.cloud.nodes();
    let a = nodes.iter().find(|n| n["name"] == "gw-a").expect("a");
    assert_eq!(a["connected"], true, "{a}");

    // A certificate from another cluster's CA is refused at the TLS layer.
    let other_tmp = tempfile::tempdir().expect("tempdir");
    let other = Cloud::start(other_tmp.path(), &[]);
    let other_token = other.token(&[]);
    let foreign_dir = other_tmp.path().join("gw-b");
    assert!(join(&foreign_dir, &other_token, "gw-b").status.success());
    let mut foreign = identity::load(&foreign_dir).expect("identity");
    foreign.ca = identity.ca.clone();
    let result = connect_with(&foreign, &s.cloud).await;
    let refused = match result {
        Err(_) => true,
        Ok(connection) => {
            // TLS 1.3 client auth fails after the client thinks the handshake is done.
            matches!(
                tokio::time::timeout(Duration::from_secs(5), connection.closed()).await,
                Ok(ConnectionError::ConnectionClosed(_) | ConnectionError::TransportError(_))
            )
        }
    };
    assert!(refused, "a foreign certificate must not open a session");
    assert!(eventually(Duration::from_secs(2), || s.cloud.metric(
        "cloudcore_connection_rejections_total{reason=\"tls_handshake\"}"
    ) >= 1.0));
}

#[test]
fn failed_joins_are_rate_limited_per_source_address() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(
        tmp.path(),
        &["--join-failure-burst", "3", "--join-failure-refill", "1h"],
    );
    let token = cloud.token(&[]);
    let wrong = format!("{}.0000000000000000", token.id);
    for i in 0..3 {
        let out = join_with(
            &tmp.path().join(format!("e{i}")),
            &token.cloud,
            &wrong,
            &token.ca_hash,
            "gw-1",
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("secret does not match"), "{err}");
    }
    let out = join(&tmp.path().join("e-right"), &token, "gw-1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("too many failed join attempts"),
        "even the right token waits: {err}"
    );
    assert_eq!(
        cloud.metric("cloudcore_join_rejections_total{reason=\"rate_limited\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_peers_get_a_small_frame_limit_and_no_session() {
    integration::init_test_tracing();
    let s = setup();
    let token = s.cloud.token(&[]);
    let pin = tls::CaHash::parse(&token.ca_hash).expect("hash");
    let anonymous = || async {
        let (config, _failure) = tls::join_config(pin).expect("config");
        let addr = dial::resolve(&s.cloud.address()).await.expect("addr");
        let endpoint = dial::client_endpoint(addr).expect("endpoint");
        dial::connect(
            &endpoint,
            config,
            &s.cloud.address(),
            addr,
            Duration::from_secs(5),
        )
        .await
        .expect("connect")
    };

    // A 1 MiB frame is fine for a node, but not before authentication.
    let connection = anonymous().await;
    send_raw(&connection, false, &(1024 * 1024u32).to_be_bytes()).await;
    assert_eq!(
        closed_by_cloud(&connection).await,
        close_code::PROTOCOL_VIOLATION
    );

    // Without a client certificate, a hello is refused: only a join is allowed.
    let connection = anonymous().await;
    let (send, recv) = connection.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
    let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
    writer.send(hello(1)).await.expect("hello");
    match reader.next().await {
        Ok(Some(Message::Error(e))) => assert_eq!(e.code, proto::ErrorCode::Unauthenticated),
        other => panic!("expected an unauthenticated error, got {other:?}"),
    }
    assert_eq!(
        s.cloud.metric("cloudcore_connected_edges"),
        1.0,
        "only the good edge"
    );
}

const TWO_NODES: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: secret-b, namespace: default}
stringData: {password: only-for-b}
---
apiVersion: v1
kind: Pod
metadata: {name: pod-b, namespace: default}
spec:
  nodeName: gw-b
  containers:
  - name: c
    image: busybox
    env:
    - name: P
      valueFrom: {secretKeyRef: {name: secret-b, key: password}}
---
apiVersion: v1
kind: Pod
metadata: {name: pod-a, namespace: default}
spec:
  nodeName: gw-a
  containers: [{name: c, image: busybox}]
"#;

fn object(kind: &str, namespace: &str, name: &str) -> proto::ObjectRef {
    proto::ObjectRef {
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        uid: String::new(),
    }
}

fn status(seq: u64, object: proto::ObjectRef, status: serde_json::Value) -> Message {
    Message::Status(proto::StatusReport {
        seq,
        object,
        generation: seq,
        status: serde_json::to_vec(&status).expect("json"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_can_neither_read_nor_acknowledge_nor_report_for_another_node() {
    integration::init_test_tracing();
    let s = setup();
    let out = s
        .cloud
        .kubectl_with_stdin(&["apply", "-f", "-"], Some(TWO_NODES));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Node A, with a valid certificate, claims to hold B's Secret and then asks for it,
    // reports status for B's pod and B's Node, acknowledges a message never sent, and reports
    // status for its own pod.
    let connection = connect_as(&s.hostile_dir, &s.cloud).await;
    let (send, recv) = connection.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
    let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
    writer
        .send(Message::Hello(Hello {
            version: proto::PROTOCOL_VERSION,
            node_info: NodeInfo::default(),
            inventory: vec![proto::HeldObject {
                object: object("Secret", "default", "secret-b"),
                resource_version: 1,
            }],
            cloud_state_id: String::new(),
        }))
        .await
        .expect("hello");
    assert!(matches!(
        reader.next().await,
        Ok(Some(Message::HelloAck(_)))
    ));
    let hostile = [
        Message::Request(object("Secret", "default", "secret-b")),
        status(
            1,
            object("Pod", "default", "pod-b"),
            serde_json::json!({"phase": "Failed"}),
        ),
        status(
            2,
            object("Node", "", "gw-b"),
            serde_json::json!({"conditions": []}),
        ),
        Message::Ack {
            seqs: vec![1_000_000],
        },
    ];
    for message in hostile {
        writer.send(message).await.expect("send");
    }
    // The status for its own pod goes once the cloud has sent that pod: before, the cloud's
    // watch may not have seen the pod yet and would rightly refuse the report.
    let own_status = status(
        3,
        object("Pod", "default", "pod-a"),
        serde_json::json!({"phase": "Running"}),
    );
    let mut own_status = Some(own_status);

    let mut forbidden = 0;
    let mut violations = 0;
    let mut own_status_acked = false;
    let mut deleted_claim = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(forbidden == 3 && violations == 1 && own_status_acked && deleted_claim) {
        let next = tokio::time::timeout_at(deadline, reader.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "within 10 s: forbidden {forbidden}/3, violations {violations}/1, own status acknowledged {own_status_acked}, claimed Secret deleted {deleted_claim}"
                )
            });
        match next.expect("read").expect("message") {
            Message::Error(e) if e.code == proto::ErrorCode::Forbidden => forbidden += 1,
            Message::Error(e) if e.code == proto::ErrorCode::ProtocolViolation => violations += 1,
            Message::Ack { seqs } => own_status_acked |= seqs.contains(&3),
            Message::Delete(d) if d.object.name == "secret-b" => {
                deleted_claim = true;
                writer
                    .send(Message::Ack { seqs: vec![d.seq] })
                    .await
                    .expect("ack");
            }
            Message::Upsert(u) => {
                assert!(
                    u.object.name != "secret-b"
                        && u.object.name != "pod-b"
                        && u.object.name != "gw-b",
                    "node A was sent node B's object {:?}",
                    u.object
                );
                writer
                    .send(Message::Ack { seqs: vec![u.seq] })
                    .await
                    .expect("ack");
                if u.object.name == "pod-a"
                    && let Some(report) = own_status.take()
                {
                    writer.send(report).await.expect("send");
                }
            }
            _ => {}
        }
    }

    let metric = |reason: &str| {
        s.cloud.metric(&format!(
            "cloudcore_sync_refused_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(metric("request_forbidden"), 1.0);
    assert_eq!(metric("status_forbidden"), 2.0);
    assert_eq!(metric("ack_never_sent"), 1.0);
    let phase = |pod: &str| {
        let out = s
            .cloud
            .kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(phase("pod-a"), "Running", "A's own report was written");
    assert_ne!(phase("pod-b"), "Failed", "A's report for B's pod was not");
    assert!(s.good.connected());
}

/// Keeps `target` anonymous connections from `source` open (completing TLS, then silent),
/// opening a new one whenever one ends, until `stop` is cancelled. Returns how many handshakes
/// completed.
async fn silent_flood(
    cloud_addr: std::net::SocketAddr,
    server_name: String,
    pin: tls::CaHash,
    source: std::net::SocketAddr,
    target: usize,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let endpoint = quinn::Endpoint::client(source).expect("attacker endpoint");
    let completed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.len() < target {
            let (config, _failure) = tls::join_config(pin).expect("config");
            let endpoint = endpoint.clone();
            let name = server_name.clone();
            let completed = completed.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                let Ok(connecting) = endpoint.connect_with(config, cloud_addr, &name) else {
                    return;
                };
                let connection = tokio::select! {
                    _ = stop.cancelled() => return,
                    c = connecting => match c { Ok(c) => c, Err(_) => return },
                };
                completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Silent: no stream, hold the connection until the cloud closes it.
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = connection.closed() => {}
                }
            });
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tasks.join_next() => {}
        }
    }
    tasks.shutdown().await;
    completed.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where an anonymous dial to `cloud` goes: its address, the TLS server name, and the pin of
/// its CA (`ca_hash`, from a token).
async fn dial_target(cloud: &Cloud, ca_hash: &str) -> (std::net::SocketAddr, String, tls::CaHash) {
    let pin = tls::CaHash::parse(ca_hash).expect("hash");
    let cloud_addr = dial::resolve(&cloud.address()).await.expect("addr");
    let server_name = cloud
        .address()
        .rsplit_once(':')
        .expect("host:port")
        .0
        .to_string();
    (cloud_addr, server_name, pin)
}

/// Starts [`silent_flood`] against `cloud` (whose CA has `ca_hash`) with `target` dials in
/// flight until `stop`, from 127.0.0.2: all of 127/8 is loopback, so the flood's source address
/// differs from the edges'.
async fn flood_from_another_address(
    cloud: &Cloud,
    ca_hash: &str,
    target: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    let (cloud_addr, server_name, pin) = dial_target(cloud, ca_hash).await;
    tokio::spawn(silent_flood(
        cloud_addr,
        server_name,
        pin,
        "127.0.0.2:0".parse().expect("literal"),
        target,
        stop.clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_silent_connections_cannot_lock_edges_out() {
    integration::init_test_tracing();
    let s = setup();
    let token = s.cloud.token(&[]);
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = flood_from_another_address(&s.cloud, &token.ca_hash, 250, &stop).await;
    // Let the flood fill whatever it can.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // A legitimate edge reconnects (restart of its daemon) while the flood goes on.
    let good_dir = s.good.dir.clone();
    let mut good = s.good;
    let (reconnect, good) = tokio::task::spawn_blocking(move || {
        good.stop();
        let started = std::time::Instant::now();
        let good = Edge::start(&good_dir);
        let connected = eventually(Duration::from_secs(30), || good.connected());
        (connected.then(|| started.elapsed()), good)
    })
    .await
    .expect("edge task");
    let rejected_busy = s
        .cloud
        .metric("cloudcore_connection_rejections_total{reason=\"source_busy\"}");
    let closed_silent = s
        .cloud
        .metric("cloudcore_connection_rejections_total{reason=\"no_stream\"}");
    stop.cancel();
    let completed = flood.await.expect("flood task");

    let reconnect =
        reconnect.unwrap_or_else(|| panic!("the edge never reconnected:\n{}", good.log()));
    // Without per-address slots this took 26 s (every slot held by the flood for 10 s each);
    // a normal reconnect takes well under a second.
    assert!(
        reconnect < Duration::from_secs(5),
        "the edge took {reconnect:?} to reconnect during the flood"
    );
    assert!(
        completed >= 8,
        "the flood must really complete handshakes ({completed}), or it tests nothing"
    );
    assert!(
        rejected_busy > 0.0,
        "connections beyond the address's share are refused: {}",
        s.cloud.metrics()
    );
    assert!(
        closed_silent > 0.0,
        "silent connections are closed after the first-stream window: {}",
        s.cloud.metrics()
    );
}

/// A reconnect storm at the door (the handshake queue full, dials turned away before any TLS)
/// hides which edges are still there, so the lifecycle check does not mark an edge without a
/// session lost while it lasts — for one grace period at most: an edge that is really gone is
/// marked `Unknown` even if the crowd never clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_edge_is_marked_lost_one_grace_period_late_while_dials_are_turned_away() {
    integration::init_test_tracing();
    let grace = Duration::from_secs(8);
    let tmp = tempfile::tempdir().expect("tempdir");
    // One handshake at a time and four queued: a flood of dials fills the queue. The flood's
    // share per address is lifted so that the refusals are the whole queue's (`busy`), as in
    // a storm of many gateways, not one address's.
    let cloud = Cloud::start(
        tmp.path(),
        &[
            "--node-grace-period",
            &format!("{}s", grace.as_secs()),
            "--max-concurrent-handshakes",
            "1",
            "--max-handshakes-per-address",
            "1000",
        ],
    );
    let token = cloud.token(&[]);
    let dir = tmp.path().join("gw-gone");
    assert!(join(&dir, &token, "gw-gone").status.success());
    let mut edge = Edge::start(&dir);
    assert!(
        eventually(Duration::from_secs(15), || cloud.node_ready("gw-gone")
            == "True"),
        "the edge's node never became Ready:\n{}",
        edge.log()
    );

    let stop = tokio_util::sync::CancellationToken::new();
    let crowd_began = std::time::Instant::now();
    let flood = flood_from_another_address(&cloud, &token.ca_hash, 64, &stop).await;
    assert!(
        eventually(Duration::from_secs(5), || cloud
            .metric("cloudcore_connection_rejections_total{reason=\"busy\"}")
            > 0.0),
        "the flood never filled the handshake queue: {}",
        cloud.metrics()
    );
    // The edge goes for good. Its Lease was renewed at most when it stopped, so without the
    // crowd it would be marked within grace + the check's 2 s: 10 s from here at the latest.
    edge.stop();
    let stopped = std::time::Instant::now();
    let not_before = crowd_began + 2 * grace;
    let mut unknown_at = None;
    while stopped.elapsed() < 3 * grace {
        if cloud.node_ready("gw-gone") == "Unknown" {
            unknown_at = Some(std::time::Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let busy = cloud.metric("cloudcore_connection_rejections_total{reason=\"busy\"}");
    stop.cancel();
    flood.await.expect("flood task");
    let unknown_at = unknown_at.unwrap_or_else(|| {
        panic!(
            "the gone edge was never marked Unknown while the crowd stayed ({busy} dials \
             turned away); cloud log:\n{}",
            cloud.log()
        )
    });
    // Not before the crowd's hold (its start + one grace period) plus the grace period itself,
    // and not much after it: the hold is capped.
    assert!(
        unknown_at >= not_before - Duration::from_secs(1),
        "marked Unknown {:?} after the crowd began, inside the hold",
        unknown_at - crowd_began
    );
    // The check runs every 2 s; the rest is room for a loaded machine.
    assert!(
        unknown_at <= not_before + Duration::from_secs(8),
        "marked Unknown {:?} after the crowd began: the hold is not capped",
        unknown_at - crowd_began
    );
    assert!(
        cloud
            .log()
            .contains("handshake queue full, dials turned away"),
        "cloudcore says why marks wait: {}",
        cloud.log()
    );
}

/// A UDP relay in front of `cloud` that passes the client's datagrams only until the cloud
/// first answers: the ClientHello gets through, the client's Finished never does, so the cloud's
/// side of the TLS handshake stalls. Returns the relay's address and, once set, when the cloud
/// first answered (just after the connection arrived there).
async fn stalling_relay(
    cloud: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::OnceLock<std::time::Instant>>,
    tokio::task::JoinHandle<()>,
) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind the relay's front");
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind the relay's back");
    back.connect(cloud)
        .await
        .expect("aim the relay at the cloud");
    let address = front.local_addr().expect("relay address");
    let answered = std::sync::Arc::new(std::sync::OnceLock::new());
    let first_answer = answered.clone();
    let task = tokio::spawn(async move {
        let mut client = None;
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                received = front.recv_from(&mut up) => {
                    let Ok((n, from)) = received else { return };
                    client = Some(from);
                    if first_answer.get().is_none() {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                received = back.recv(&mut down) => {
                    let Ok(n) = received else { return };
                    let _ = first_answer.set(std::time::Instant::now());
                    if let Some(client) = client {
                        let _ = front.send_to(&down[..n], client).await;
                    }
                }
            }
        }
    });
    (address, answered, task)
}

/// An edge gives up a dial after `proto::DIAL_LIMIT` (3 s), so the cloud gives a TLS handshake
/// no longer than that, although its handshake timeout is 10 s: a handshake that stalls is
/// dropped (`reason="handshake_timeout"`) about 3 s after its connection arrived, and its slot
/// is free for an edge that is still dialling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_dropped_at_the_edges_dial_limit() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let (cloud_addr, server_name, pin) = dial_target(&cloud, &token.ca_hash).await;
    let timed_out =
        || cloud.metric("cloudcore_connection_rejections_total{reason=\"handshake_timeout\"}");
    assert_eq!(timed_out(), 0.0, "{}", cloud.metrics());

    let (relay, answered, relay_task) = stalling_relay(cloud_addr).await;
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal")).expect("client endpoint");
    let (config, _failure) = tls::join_config(pin).expect("config");
    let connecting = endpoint
        .connect_with(config, relay, &server_name)
        .expect("dial through the relay");
    let client = tokio::spawn(connecting);

    let dropped =
        tokio::task::block_in_place(|| eventually(Duration::from_secs(15), || timed_out() >= 1.0));
    assert!(
        dropped,
        "the stalled handshake was not dropped within 15 s:\n{}",
        cloud.metrics()
    );
    let after = answered
        .get()
        .map(|at| at.elapsed())
        .expect("the cloud answered the ClientHello");
    // 3 s, counted from the connection's arrival; the handshake timeout alone would give 10 s.
    assert!(
        after >= Duration::from_millis(2500) && after <= Duration::from_secs(7),
        "the stalled handshake was dropped {after:?} after the cloud first answered, not about 3 s"
    );
    assert_eq!(
        cloud.metric("cloudcore_connection_rejections_total{reason=\"tls_handshake\"}"),
        0.0,
        "the handshake was cut by the limit, not failed: {}",
        cloud.metrics()
    );
    client.abort();
    relay_task.abort();
}
