//! The fuzz targets of `integration/fuzz/` run briefly through their documented command
//! (`run.sh`), and the seed corpus of the frame, message and stream targets holds real frames
//! (docs/fuzzing.md).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use proto::stream::{
    AttachRequest, ExecRequest, ExitStatus, LogsRequest, PodTarget, PortForwardRequest, RcCodec,
    RcFrame, Refusal, RefusalCode, StreamReply, StreamRequest, stats, write_header,
};
use proto::{
    ErrorCode, ErrorMessage, FrameCodec, HeldObject, Hello, HelloAck, JoinRequest, Message,
    NodeInfo, ObjectRef, ObjectUpsert, PROTOCOL_VERSION, StatusReport, TokenRequest,
};
use streaming::spdy::frame::{Frame, FrameDecoder, FrameEncoder};
use tokio_util::codec::{Decoder, Encoder};

const TARGETS: [&str; 6] = [
    "frame",
    "message",
    "api_request",
    "api_selector",
    "api_patch",
    "stream",
];

/// Seconds each target runs in the test suite (the 10-minute runs are in docs/fuzzing.md).
const SMOKE_SECONDS: u32 = 5;

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
            "events",
            Message::Events(vec![proto::EdgeEvent {
                object: pod(),
                field_path: "spec.containers{app}".into(),
                type_: proto::EventType::Normal,
                reason: "BackOff".into(),
                message: "Back-off pulling image \"localhost/edge/nonexistent:1\"".into(),
                count: 4,
                first_timestamp_ms: 1_800_000_000_000,
                last_timestamp_ms: 1_800_000_030_000,
            }]),
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
    seeds.extend(stream_seeds());
    seeds
}

fn web_0() -> PodTarget {
    PodTarget {
        namespace: "default".into(),
        name: "web-0".into(),
        uid: "7d1c8a9e-0000-4000-8000-000000000001".into(),
    }
}

/// A stream target input: the decoder byte (0 remote command frames, 1 headers, 2 SPDY), the
/// chunk-size byte, then the bytes.
fn stream_input(decoder: u8, chunk: u8, bytes: &[u8]) -> Vec<u8> {
    let mut input = vec![decoder, chunk];
    input.extend_from_slice(bytes);
    input
}

fn rc_frames(frames: Vec<RcFrame>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for frame in frames.clone() {
        RcCodec
            .encode(frame, &mut buf)
            .expect("a seed frame encodes");
    }
    let encoded = buf.to_vec();
    let mut decoded = Vec::new();
    while let Some(frame) = RcCodec.decode(&mut buf).expect("a seed frame decodes") {
        decoded.push(frame);
    }
    assert_eq!(decoded, frames, "the seed frames do not decode back");
    encoded
}

fn header<T: serde::Serialize>(header: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    futures::executor::block_on(write_header(&mut buf, header)).expect("a seed header encodes");
    buf
}

/// The frames encoded with one compression context; they must decode back (with one
/// decompression context) to themselves, so a seed is a session the decoder accepts.
fn spdy_frames(frames: &[Frame]) -> Vec<u8> {
    let mut encoder = FrameEncoder::default();
    let mut buf = BytesMut::new();
    for frame in frames {
        encoder
            .encode(frame, &mut buf)
            .expect("a seed frame encodes");
    }
    let encoded = buf.to_vec();
    let mut decoder = FrameDecoder::default();
    let mut decoded = Vec::new();
    while let Some(frame) = decoder.decode(&mut buf).expect("a seed frame decodes") {
        decoded.push(frame);
    }
    assert_eq!(decoded, frames, "the seed frames do not decode back");
    encoded
}

fn spdy_headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn syn_stream(stream_id: u32, pairs: &[(&str, &str)]) -> Frame {
    Frame::SynStream {
        stream_id,
        associated_to: 0,
        priority: 0,
        fin: false,
        unidirectional: false,
        headers: spdy_headers(pairs),
    }
}

/// The stream target's seeds: exec and attach frames both ways, every header kind, and the
/// SPDY frames of a `kubectl exec -it` and a `kubectl port-forward` session, each direction
/// with its own compression context.
fn stream_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut seed = |name: &str, input: Vec<u8>| seeds.push(("stream", name.to_string(), input));
    seed(
        "rc-cloud-to-edge",
        stream_input(
            0,
            3,
            &rc_frames(vec![
                RcFrame::Resize {
                    width: 120,
                    height: 40,
                },
                RcFrame::Stdin(Bytes::from_static(b"ls -l /\n")),
                RcFrame::Stdin(Bytes::from_static(b"exit\n")),
                RcFrame::StdinClosed,
            ]),
        ),
    );
    seed(
        "rc-edge-to-cloud",
        stream_input(
            0,
            17,
            &rc_frames(vec![
                RcFrame::Stdout(Bytes::from_static(b"bin\netc\nusr\n")),
                RcFrame::Stderr(Bytes::from_static(b"ls: /root: Permission denied\n")),
                RcFrame::Exit(ExitStatus {
                    code: Some(2),
                    message: String::new(),
                }),
            ]),
        ),
    );
    seed(
        "rc-exit-failed-to-start",
        stream_input(
            0,
            64,
            &rc_frames(vec![RcFrame::Exit(ExitStatus {
                code: None,
                message: "exec failed: \"sh\": executable file not found in $PATH".into(),
            })]),
        ),
    );
    let requests = [
        (
            "header-logs",
            StreamRequest::Logs(LogsRequest {
                pod: web_0(),
                container: "web".into(),
                follow: true,
                timestamps: true,
                tail_lines: Some(10),
                since_time: Some("2026-12-04T10:00:00Z".into()),
                limit_bytes: Some(1 << 20),
                ..Default::default()
            }),
        ),
        (
            "header-exec",
            StreamRequest::Exec(ExecRequest {
                pod: web_0(),
                container: "web".into(),
                command: vec!["sh".into(), "-c".into(), "echo hi".into()],
                stdin: true,
                stdout: true,
                stderr: false,
                tty: true,
            }),
        ),
        (
            "header-attach",
            StreamRequest::Attach(AttachRequest {
                pod: web_0(),
                container: "web".into(),
                stdin: false,
                stdout: true,
                stderr: true,
                tty: false,
            }),
        ),
        (
            "header-portforward",
            StreamRequest::PortForward(PortForwardRequest {
                pod: web_0(),
                port: 8080,
            }),
        ),
        ("header-stats", StreamRequest::Stats),
    ];
    for (name, request) in requests {
        seed(name, stream_input(1, 5, &header(&request)));
    }
    seed(
        "header-accepted",
        stream_input(1, 64, &header(&StreamReply::Accepted)),
    );
    seed(
        "header-refused",
        stream_input(
            1,
            2,
            &header(&StreamReply::Refused(Refusal {
                code: RefusalCode::ContainerNotRunning,
                message: "container web is not running".into(),
            })),
        ),
    );
    let usage = |core_ns: u64| stats::Usage {
        time: "2026-12-04T10:00:00.123456789Z".into(),
        usage_core_nano_seconds: core_ns,
        usage_nano_cores: Some(1_500_000),
    };
    let memory = |bytes: u64| stats::Memory {
        time: "2026-12-04T10:00:00.123456789Z".into(),
        working_set_bytes: bytes,
        usage_bytes: Some(bytes + 4096),
        rss_bytes: Some(bytes / 2),
        available_bytes: None,
    };
    let summary = stats::Summary {
        node: stats::NodeUsage {
            node_name: "edge-1".into(),
            start_time: "2026-12-04T08:00:00Z".into(),
            cpu: usage(9_000_000_000),
            memory: memory(512 << 20),
        },
        pods: vec![stats::PodUsage {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: web_0().uid,
            start_time: "2026-12-04T09:00:00Z".into(),
            cpu: usage(1_000_000_000),
            memory: memory(32 << 20),
            containers: vec![stats::ContainerUsage {
                name: "web".into(),
                start_time: "2026-12-04T09:00:01Z".into(),
                cpu: usage(990_000_000),
                memory: memory(30 << 20),
            }],
        }],
    };
    seed("header-summary", stream_input(1, 33, &header(&summary)));
    seed(
        "resize",
        stream_input(1, 7, br#"{"Width":120,"Height":40}"#),
    );
    // kubectl exec -it: the error, stdin, stdout and resize streams, then data both ways.
    let protocol = ("x-stream-protocol-version", "v4.channel.k8s.io");
    seed(
        "spdy-exec-client",
        stream_input(
            2,
            11,
            &spdy_frames(&[
                Frame::Settings {
                    clear: false,
                    entries: vec![(0, 7, 65536)],
                },
                syn_stream(1, &[("streamtype", "error"), protocol]),
                syn_stream(3, &[("streamtype", "stdin")]),
                syn_stream(5, &[("streamtype", "stdout")]),
                syn_stream(7, &[("streamtype", "resize")]),
                Frame::Data {
                    stream_id: 7,
                    fin: false,
                    data: Bytes::from_static(br#"{"Width":120,"Height":40}"#),
                },
                Frame::Data {
                    stream_id: 3,
                    fin: true,
                    data: Bytes::from_static(b"exit\n"),
                },
                Frame::WindowUpdate {
                    stream_id: 5,
                    delta: 32768,
                },
                Frame::Ping { id: 1 },
            ]),
        ),
    );
    seed(
        "spdy-exec-server",
        stream_input(
            2,
            29,
            &spdy_frames(&[
                Frame::SynReply {
                    stream_id: 1,
                    fin: false,
                    headers: spdy_headers(&[("streamtype", "error"), protocol]),
                },
                Frame::SynReply {
                    stream_id: 5,
                    fin: false,
                    headers: spdy_headers(&[("streamtype", "stdout")]),
                },
                Frame::Data {
                    stream_id: 5,
                    fin: true,
                    data: Bytes::from_static(b"hi\n"),
                },
                Frame::Data {
                    stream_id: 1,
                    fin: true,
                    data: Bytes::from_static(
                        br#"{"kind":"Status","apiVersion":"v1","status":"Success"}"#,
                    ),
                },
                Frame::Headers {
                    stream_id: 3,
                    fin: true,
                    headers: spdy_headers(&[("a", "1"), ("a", "2")]),
                },
                Frame::RstStream {
                    stream_id: 7,
                    status: 5,
                },
                Frame::GoAway {
                    last_good_stream_id: 7,
                    status: 0,
                },
            ]),
        ),
    );
    // kubectl port-forward: an error and a data stream per connection, tagged by request id.
    seed(
        "spdy-portforward",
        stream_input(
            2,
            64,
            &spdy_frames(&[
                syn_stream(
                    1,
                    &[
                        ("streamtype", "error"),
                        ("port", "8080"),
                        ("requestid", "0"),
                    ],
                ),
                syn_stream(
                    3,
                    &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
                ),
                Frame::Data {
                    stream_id: 3,
                    fin: false,
                    data: Bytes::from_static(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
                },
            ]),
        ),
    );
    seeds
}

/// The committed frame, message and stream seeds are what today's encoders write for real
/// messages. `FUZZ_WRITE_SEEDS=1` writes them again after a protocol change.
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
