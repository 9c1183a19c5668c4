//! The fuzz targets of `integration/fuzz/` run briefly through their documented command
//! (`run.sh`), and the seed corpus of the frame and message targets holds real frames
//! (docs/fuzzing.md).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bytes::BytesMut;
use proto::{
    ErrorCode, ErrorMessage, FrameCodec, HeldObject, Hello, HelloAck, JoinRequest, Message,
    NodeInfo, ObjectRef, ObjectUpsert, PROTOCOL_VERSION, StatusReport, TokenRequest,
};
use tokio_util::codec::Encoder;

const TARGETS: [&str; 5] = [
    "frame",
    "message",
    "api_request",
    "api_selector",
    "api_patch",
];

/// Seconds each target runs in the test suite (the 10-minute runs are in docs/fuzzing.md).
const SMOKE_SECONDS: u32 = 20;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn pod() -> ObjectRef {
    ObjectRef {
        kind: "Pod".into(),
        namespace: "default".into(),
        name: "web-0".into(),
        uid: "7d1c8a9e-0000-4000-8000-000000000001".into(),
    }
}

/// Real messages of each kind the edge and the cloud exchange, by seed file name.
fn seed_messages() -> Vec<(&'static str, Message)> {
    let node_status =
        br#"{"conditions":[{"type":"Ready","status":"True"}],"capacity":{"cpu":"4","pods":"110"}}"#;
    vec![
        (
            "hello",
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_info: NodeInfo {
                    hostname: "gw-1".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                    kernel_version: "6.12.0".into(),
                    edgecore_version: "0.1.0".into(),
                    cpus: 4,
                    memory_bytes: 8 << 30,
                    node_status: node_status.to_vec(),
                },
                inventory: vec![HeldObject {
                    object: pod(),
                    resource_version: 42,
                }],
                cloud_state_id: "0b6f3c2e-6c1d-4f7e-9a55-2d0c8e1f4a7b".into(),
            }),
        ),
        (
            "hello-ack",
            Message::HelloAck(HelloAck {
                version: PROTOCOL_VERSION,
                node_name: "edge-1".into(),
                heartbeat_interval_ms: 10_000,
                dead_after_ms: 40_000,
                resend_status: true,
                cloud_state_id: "0b6f3c2e-6c1d-4f7e-9a55-2d0c8e1f4a7b".into(),
                cloud_revision: 1_000_000_042,
                adopt_state: false,
            }),
        ),
        (
            "upsert",
            Message::Upsert(ObjectUpsert {
                seq: 7,
                object: pod(),
                resource_version: 43,
                body: br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-0"}}"#.to_vec(),
            }),
        ),
        (
            "ack",
            Message::Ack {
                seqs: vec![5, 6, 7],
            },
        ),
        (
            "status",
            Message::Status(StatusReport {
                seq: 3,
                object: pod(),
                generation: 1,
                status: br#"{"phase":"Running"}"#.to_vec(),
            }),
        ),
        (
            "join",
            Message::JoinRequest(JoinRequest {
                version: PROTOCOL_VERSION,
                token: "abcdef.0123456789abcdef".into(),
                node_name: "edge-1".into(),
                csr_der: vec![0x30, 0x82, 0x01, 0x0a],
                labels: [("site".to_string(), "plant-3".to_string())].into(),
            }),
        ),
        (
            "token-request",
            Message::TokenRequest(TokenRequest {
                request_id: 1,
                pod: pod(),
                service_account: "default".into(),
                audience: "vault".into(),
                expiration_seconds: 3600,
            }),
        ),
        (
            "error",
            Message::Error(ErrorMessage {
                code: ErrorCode::Forbidden,
                message: "not bound to this node".into(),
            }),
        ),
    ]
}

fn frame(message: Message) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(message, &mut buf)
        .expect("a seed message encodes");
    buf
}

/// The seeds the frame and message targets start from, by target and file name: each message
/// alone (the message target takes a frame's body, the frame target whole frames after a
/// chunk-size byte), and one stream of a session's first frames.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut session = vec![7u8];
    for (name, message) in seed_messages() {
        let framed = frame(message);
        seeds.push(("message", name.to_string(), framed[4..].to_vec()));
        let mut alone = vec![0u8];
        alone.extend_from_slice(&framed);
        seeds.push(("frame", name.to_string(), alone));
        session.extend_from_slice(&framed);
    }
    seeds.push(("frame", "session".to_string(), session));
    seeds
}

/// The committed frame and message seeds are what today's encoder writes for real messages.
/// `FUZZ_WRITE_SEEDS=1` writes them again after a protocol change.
#[test]
fn frame_and_message_seeds_are_real_frames() {
    let write = std::env::var_os("FUZZ_WRITE_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        let path = fuzz_dir().join("corpus").join(target).join(&name);
        if write {
            std::fs::write(&path, &bytes).expect("write seed");
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "seed {} is missing ({e}); run with FUZZ_WRITE_SEEDS=1",
                path.display()
            )
        });
        assert_eq!(
            committed,
            bytes,
            "seed {} differs from what the encoder writes; run with FUZZ_WRITE_SEEDS=1",
            path.display()
        );
    }
}

/// Every target builds with coverage instrumentation and runs for `SMOKE_SECONDS` from its seed
/// corpus without a crash, a hang or a memory blow-up, and really executes inputs.
#[test]
fn every_fuzz_target_runs_without_a_finding() {
    let started = Instant::now();
    // From the committed seeds only, in a directory of its own, with the quicker unoptimized
    // build (run.sh's FUZZ_PROFILE=dev).
    let work = tempfile::tempdir().expect("temporary work directory");
    let output = Command::new(fuzz_dir().join("run.sh"))
        .args(["all", &SMOKE_SECONDS.to_string()])
        .env("FUZZ_PROFILE", "dev")
        .env("FUZZ_WORK_DIR", work.path())
        .output()
        .expect("run integration/fuzz/run.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "run.sh all {SMOKE_SECONDS} failed ({}):\n{stderr}",
        output.status
    );
    for target in TARGETS {
        let executed: u64 = stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("fuzz: {target}: stat::number_of_executed_units: "))
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no execution count for {target} in:\n{stderr}"));
        assert!(
            executed >= 100,
            "{target} ran only {executed} inputs in {SMOKE_SECONDS} s:\n{stderr}"
        );
        eprintln!("{target}: {executed} inputs in {SMOKE_SECONDS} s");
    }
    eprintln!("fuzz smoke run took {:?}", started.elapsed());
}
