//! Attacker-controlled strings at the edges of the system: join names and labels, `Hello`'s node
//! info and node status, all against the real `cloudcore` binary, whose text log must hold no
//! line a client wrote; and the CLI's refusal of a token that would be born expired.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgecore::{dial, tls};
use integration::{Cloud, Token, bin, eventually, join};
use proto::{
    ErrorCode, ErrorMessage, FrameReader, FrameWriter, Hello, JoinRequest, Message, NodeInfo,
    close_code,
};
use quinn::Connection;

/// The text a hostile client puts after a newline: a whole log line of its own.
const FORGED: &str =
    "2026-12-04T18:30:00.000000Z  INFO cloudcore::join: node joined node.name=evil";

/// Whether `line` starts the way tracing-subscriber's text format starts every line:
/// `2026-12-04T18:30:00.123456Z  INFO ` (timestamp, then a level).
fn has_log_prefix(line: &str) -> bool {
    let Some((stamp, rest)) = line.split_once(' ') else {
        return false;
    };
    let stamp_ok = stamp.len() >= 20
        && stamp.ends_with('Z')
        && stamp.as_bytes()[4] == b'-'
        && stamp.as_bytes()[10] == b'T'
        && stamp[..4].bytes().all(|b| b.is_ascii_digit());
    let level = rest.trim_start().split(' ').next().unwrap_or_default();
    stamp_ok && matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")
}

/// Every line of `log` starts with a timestamp and a level, and none is the forged one.
fn assert_no_forged_line(log: &str) {
    for line in log.lines().filter(|l| !l.is_empty()) {
        assert!(
            has_log_prefix(line),
            "a log line does not start with a timestamp and level: {line:?}\nlog:\n{log}"
        );
        assert!(!line.starts_with(FORGED), "forged line: {line:?}");
    }
}

/// An unauthenticated connection to `cloud`'s tunnel, pinning its CA as `edgecore join` does.
async fn anonymous(cloud: &Cloud, token: &Token) -> Connection {
    let pin = tls::CaHash::parse(&token.ca_hash).expect("hash");
    let (config, _failure) = tls::join_config(pin).expect("config");
    let addr = dial::resolve(&cloud.address()).await.expect("addr");
    let endpoint = dial::client_endpoint(addr).expect("endpoint");
    dial::connect(
        &endpoint,
        config,
        &cloud.address(),
        addr,
        Duration::from_secs(5),
    )
    .await
    .expect("connect")
}

/// Sends one raw `JoinRequest` (no local checks, unlike `edgecore join`) and returns the
/// cloud's error.
async fn raw_join(
    cloud: &Cloud,
    token: &Token,
    secret: &str,
    node_name: &str,
    labels: &[(&str, &str)],
) -> ErrorMessage {
    let connection = anonymous(cloud, token).await;
    let (send, recv) = connection.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
    let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
    let (_key, csr_der) = edgecore::join::new_key_and_csr("hostile").expect("csr");
    writer
        .send(Message::JoinRequest(JoinRequest {
            version: proto::PROTOCOL_VERSION,
            token: secret.to_string(),
            node_name: node_name.to_string(),
            csr_der,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }))
        .await
        .expect("join request");
    match reader.next().await {
        Ok(Some(Message::Error(e))) => e,
        other => panic!("expected a refusal of {node_name:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_join_names_and_labels_get_name_errors_and_forge_no_log_line() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &["--join-failure-burst", "100"]);
    let token = cloud.token(&[]);

    // A well-formed but unknown token and a name holding a whole log line after a newline.
    let hostile = format!("gw\n{FORGED}");
    let e = raw_join(&cloud, &token, "abcdef.0123456789abcdef", &hostile, &[]).await;
    assert_eq!(e.code, ErrorCode::NodeNameInvalid, "{e:?}");
    assert!(!e.message.contains('\n'), "{:?}", e.message);

    // 300 characters: a name error naming the limit, not a broken stream.
    let long = "a".repeat(300);
    let e = raw_join(&cloud, &token, &token.token, &long, &[]).await;
    assert_eq!(e.code, ErrorCode::NodeNameInvalid, "{e:?}");
    assert!(
        e.message.contains("limit of 253") && e.message.contains("300 characters"),
        "{}",
        e.message
    );

    // A label value holding a newline would make the Node write fail: refused at the join.
    let e = raw_join(
        &cloud,
        &token,
        &token.token,
        "gw-labels",
        &[("zone", "a\nb")],
    )
    .await;
    assert_eq!(e.code, ErrorCode::LabelsInvalid, "{e:?}");
    assert!(e.message.contains("\"zone\""), "{}", e.message);

    // None of the refusals consumed the token: a good join still works.
    let dir = tmp.path().join("gw-1");
    let out = join(&dir, &token, "gw-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let log = cloud.log();
    assert_no_forged_line(&log);
    assert!(
        log.contains(&format!("gw\\n{}", &FORGED[..20])),
        "the hostile name appears escaped in the refusal line:\n{log}"
    );
    let joined: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.split_whitespace().nth(1) == Some("INFO")
                && line.contains(" cloudcore::join: node joined ")
        })
        .collect();
    assert_eq!(joined.len(), 1, "only gw-1 joined:\n{log}");
    assert!(joined[0].contains("node.name=gw-1 "), "{}", joined[0]);
}

#[test]
fn edgecore_join_refuses_an_invalid_name_before_dialling() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Nothing listens there: a dial would take the join timeout and say so.
    let started = Instant::now();
    let out = Command::new(bin("edgecore"))
        .args([
            "join",
            "--cloud",
            "127.0.0.1:9",
            "--token",
            "abcdef.0123456789abcdef",
            "--ca-hash",
            &format!("sha256:{}", "0".repeat(64)),
            "--node-name",
            &"a".repeat(300),
            "--data-dir",
        ])
        .arg(tmp.path().join("edge"))
        .output()
        .expect("run edgecore join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("not a valid DNS-1123 subdomain")
            && stderr.contains("limit of 253 characters"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "it dialled");
    assert!(!tmp.path().join("edge").join("node.pem").exists());
}

#[test]
fn token_create_refuses_a_lifetime_that_is_zero_negative_or_too_short() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Only `serve` initializes a data dir; the token commands need one.
    let cloud = Cloud::start(tmp.path(), &[]);
    let create = |ttl: &str| {
        let ttl = format!("--ttl={ttl}");
        cloud.cli(&["token", "create", "--cloud", "127.0.0.1:10000", &ttl])
    };
    for (ttl, says) in [
        ("0s", "already expired"),
        ("0", "already expired"),
        ("-1h", "negative"),
        ("500ms", "shorter than the minimum of 1s"),
    ] {
        let out = create(ttl);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "--ttl {ttl}: {stderr}");
        assert!(
            stderr.contains("--ttl") && stderr.contains(says),
            "--ttl {ttl}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "no token printed for --ttl {ttl}");
    }
    let out = create("1s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A session's stream, kept open while a test looks at the session.
type Stream = (
    FrameWriter<quinn::SendStream>,
    FrameReader<quinn::RecvStream>,
);

/// Opens a session as the node whose identity is in `dir` and sends `hello`; returns the
/// cloud's first answer, the connection and its stream.
async fn hello_as(dir: &Path, cloud: &Cloud, info: NodeInfo) -> (Message, Connection, Stream) {
    let connection = integration::peer::connect_as(dir, cloud).await;
    let (send, recv) = connection.open_bi().await.expect("stream");
    let mut writer = FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
    let mut reader = FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
    writer
        .send(Message::Hello(Hello {
            version: proto::PROTOCOL_VERSION,
            node_info: info,
            inventory: Vec::new(),
            cloud_state_id: String::new(),
        }))
        .await
        .expect("hello");
    let reply = reader.next().await.expect("read").expect("a reply");
    (reply, connection, (writer, reader))
}

fn node_info() -> NodeInfo {
    NodeInfo {
        hostname: "gw-1".into(),
        os: "linux".into(),
        arch: "arm64".into(),
        kernel_version: "6.8.0-49-generic".into(),
        edgecore_version: "0.1.0".into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        node_status: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hello_is_refused_naming_the_field_and_a_bad_node_status_is_dropped() {
    integration::init_test_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(tmp.path(), &[]);
    let token = cloud.token(&[]);
    let dir = tmp.path().join("gw-1");
    let out = join(&dir, &token, "gw-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A hostname and an arch that would forge a log line or break the Node are refused with
    // PROTOCOL_VIOLATION, the text naming the field.
    type Change = fn(&mut NodeInfo);
    let cases: [(Change, &str); 3] = [
        (
            |i| i.hostname = format!("gw\n{FORGED}"),
            "node_info.hostname",
        ),
        (|i| i.arch = format!("amd64\n{FORGED}"), "node_info.arch"),
        (|i| i.arch = "amd64\u{202e}".into(), "node_info.arch"),
    ];
    for (change, field) in cases {
        let mut info = node_info();
        change(&mut info);
        let (reply, connection, _stream) = hello_as(&dir, &cloud, info).await;
        match reply {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::ProtocolViolation, "{e:?}");
                assert!(e.message.contains(field), "{}", e.message);
                assert!(!e.message.contains('\n'), "{:?}", e.message);
            }
            other => panic!("{field}: expected a refusal, got {other:?}"),
        }
        assert_eq!(
            integration::peer::closed_by_cloud(&connection).await,
            close_code::PROTOCOL_VIOLATION
        );
    }
    assert_eq!(cloud.metric("cloudcore_connected_edges"), 0.0);

    // A node status whose arch would make every Node write fail is dropped with a warning;
    // the Node is written from the node info, and it is Ready.
    let mut info = node_info();
    info.node_status = serde_json::to_vec(&serde_json::json!({
        "nodeInfo": {"architecture": format!("arm64\n{FORGED}"), "operatingSystem": "linux"},
        "capacity": {"cpu": "four"},
    }))
    .expect("json");
    let (reply, _connection, _stream) = hello_as(&dir, &cloud, info).await;
    assert!(matches!(reply, Message::HelloAck(_)), "{reply:?}");
    let written = eventually(Duration::from_secs(15), || {
        cloud
            .kubectl(&["get", "node", "gw-1", "-o", "json"])
            .status
            .success()
            && {
                let node: serde_json::Value = serde_json::from_slice(
                    &cloud.kubectl(&["get", "node", "gw-1", "-o", "json"]).stdout,
                )
                .unwrap_or_default();
                node["status"]["nodeInfo"]["architecture"] == "arm64"
                    && node["metadata"]["labels"]["kubernetes.io/arch"] == "arm64"
                    && node["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
            }
    });
    assert!(written, "node not written; log:\n{}", cloud.log());
    let log = cloud.log();
    assert!(
        log.contains("ignoring the node status the edge sent")
            && log.contains("nodeInfo.architecture"),
        "{log}"
    );
    assert!(
        !log.contains("cannot write the node object"),
        "the Node write failed:\n{log}"
    );
    assert_no_forged_line(&log);
}
