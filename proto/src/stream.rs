//! Streams the cloud opens on an edge's session connection: `kubectl logs`, `exec`, `attach`,
//! `port-forward` and resource stats ([docs/streams.md](../../docs/streams.md)).
//!
//! Each is its own bidirectional QUIC stream, opened by the cloud on the connection of the node
//! the pod is bound to (never on the session's control stream). The cloud writes one
//! [`StreamRequest`] header; the edge answers with one [`StreamReply`] header, and after an
//! `Accepted` the stream carries the payload of its kind:
//!
//! | kind | cloud → edge | edge → cloud |
//! |---|---|---|
//! | logs | nothing (finish) | the log bytes as kubelet serves them, then finish |
//! | exec, attach | [`RcFrame`]s: stdin, stdin closed, resize | [`RcFrame`]s: stdout, stderr, then exactly one `Exit` |
//! | port-forward | the TCP bytes to the pod's port; finish = half-close | the bytes back |
//! | stats | nothing (finish) | one JSON [`stats::Summary`] header frame, then finish |
//!
//! Headers are JSON in a frame of a 4-byte big-endian length, capped at [`MAX_HEADER_SIZE`]
//! before anything is allocated. Flow control is QUIC's: each side reads from the stream only
//! as fast as it can hand the bytes on, so a stalled reader anywhere stalls the writer instead
//! of growing a buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

/// The first protocol minor version whose edges accept streams. The cloud refuses to open one
/// to an older edge with a clear error instead of a stream the edge would reset.
pub const STREAMS_SINCE_MINOR: u32 = 3;
/// Largest header frame ([`StreamRequest`], [`StreamReply`], [`stats::Summary`]).
pub const MAX_HEADER_SIZE: usize = 4 * 1024 * 1024;
/// Largest [`RcFrame`] payload accepted or sent.
pub const MAX_RC_FRAME: usize = 64 * 1024;

/// The pod a stream is about. The uid pins the pod: a pod deleted and created again under the
/// same name is another pod, and the edge refuses a uid it does not run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What the cloud asks for on a new stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum StreamRequest {
    Logs(LogsRequest),
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
    /// The node's, its pods' and containers' CPU and memory usage.
    Stats,
}

impl StreamRequest {
    /// The pod the request is about (none for stats).
    pub fn pod(&self) -> Option<&PodTarget> {
        match self {
            StreamRequest::Logs(r) => Some(&r.pod),
            StreamRequest::Exec(r) => Some(&r.pod),
            StreamRequest::Attach(r) => Some(&r.pod),
            StreamRequest::PortForward(r) => Some(&r.pod),
            StreamRequest::Stats => None,
        }
    }

    /// A short name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            StreamRequest::Logs(_) => "logs",
            StreamRequest::Exec(_) => "exec",
            StreamRequest::Attach(_) => "attach",
            StreamRequest::PortForward(_) => "portforward",
            StreamRequest::Stats => "stats",
        }
    }
}

/// `GET pods/log` (kubelet `/containerLogs`) options, as `PodLogOptions` defines them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogsRequest {
    pub pod: PodTarget,
    pub container: String,
    #[serde(default)]
    pub follow: bool,
    /// The previous instance of the container (the last one that exited).
    #[serde(default)]
    pub previous: bool,
    /// Prefix each line with its RFC 3339 timestamp (nanoseconds), as the kubelet does.
    #[serde(default)]
    pub timestamps: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_lines: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_seconds: Option<u64>,
    /// RFC 3339; the later of this and `since_seconds` wins, as in the kubelet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
}

/// `pods/exec` (kubelet `/exec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecRequest {
    pub pod: PodTarget,
    pub container: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdout: bool,
    #[serde(default)]
    pub stderr: bool,
    #[serde(default)]
    pub tty: bool,
}

/// `pods/attach` (kubelet `/attach`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachRequest {
    pub pod: PodTarget,
    pub container: String,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdout: bool,
    #[serde(default)]
    pub stderr: bool,
    #[serde(default)]
    pub tty: bool,
}

/// One forwarded TCP connection to `port` inside the pod (`pods/portforward` opens one stream
/// per connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortForwardRequest {
    pub pod: PodTarget,
    pub port: u16,
}

/// The edge's answer to a [`StreamRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "camelCase")]
pub enum StreamReply {
    Accepted,
    Refused(Refusal),
}

/// Why the edge will not serve a stream; `message` is for the human at kubectl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

/// Kinds of refusal, each mapped to an HTTP status by the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RefusalCode {
    /// The edge does not run this pod (name and uid): 404 at the cloud.
    PodNotFound,
    /// No such container in the pod, or none has run yet (logs), or no previous instance: 400.
    ContainerNotFound,
    /// The container is not running (exec, attach): 400.
    ContainerNotRunning,
    /// The request is malformed or asks for something the kind does not allow: 400.
    BadRequest,
    /// Too many streams open on this edge already: 429.
    TooManyStreams,
    /// The runtime failed (CRI call, connecting to the pod's port): 500.
    Runtime,
    /// A request kind this edge does not know: 501.
    Unsupported,
}

/// How a remote command ended. `code` is the process's exit code; `None` with a message is a
/// failure before or around the process (it could not start, the runtime failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Reading or writing a header failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("stream header of {size} bytes is over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed stream header: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the stream ended before its header")]
    Ended,
    #[error("remote command frame: {0}")]
    BadFrame(String),
}

/// Writes one header frame (`StreamRequest`, `StreamReply` or a stats summary).
pub async fn write_header<W, T>(w: &mut W, header: &T) -> Result<(), StreamError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(header)?;
    if body.len() > MAX_HEADER_SIZE {
        return Err(StreamError::TooLarge {
            size: body.len(),
            limit: MAX_HEADER_SIZE,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one header frame, refusing one over `limit` (at most [`MAX_HEADER_SIZE`]) before
/// allocating it.
pub async fn read_header<R, T>(r: &mut R, limit: usize) -> Result<T, StreamError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let limit = limit.min(MAX_HEADER_SIZE);
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(StreamError::Ended),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(StreamError::TooLarge { size, limit });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// One frame of a remote command (exec, attach) after the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcFrame {
    /// cloud → edge: bytes for the process's stdin.
    Stdin(Bytes),
    /// cloud → edge: the client closed stdin (the process sees end of file).
    StdinClosed,
    /// cloud → edge: the client's terminal size changed (tty sessions).
    Resize { width: u16, height: u16 },
    /// edge → cloud: bytes the process wrote to stdout (and, with a tty, stderr).
    Stdout(Bytes),
    /// edge → cloud: bytes the process wrote to stderr.
    Stderr(Bytes),
    /// edge → cloud: the command ended; the last frame the edge sends.
    Exit(ExitStatus),
}

const TAG_STDIN: u8 = 0;
const TAG_STDOUT: u8 = 1;
const TAG_STDERR: u8 = 2;
const TAG_EXIT: u8 = 3;
const TAG_RESIZE: u8 = 4;
const TAG_STDIN_CLOSED: u8 = 5;

/// [`RcFrame`] on the wire: a 1-byte tag, a 4-byte big-endian length, the payload (raw bytes
/// for the data frames, two big-endian u16 for a resize, JSON [`ExitStatus`] for the exit).
/// Payloads over [`MAX_RC_FRAME`] are refused on both sides; writers split larger chunks.
#[derive(Debug, Default, Clone, Copy)]
pub struct RcCodec;

impl Decoder for RcCodec {
    type Item = RcFrame;
    type Error = StreamError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RcFrame>, StreamError> {
        if src.len() < 5 {
            return Ok(None);
        }
        let tag = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        if len > MAX_RC_FRAME {
            return Err(StreamError::BadFrame(format!(
                "payload of {len} bytes is over the {MAX_RC_FRAME}-byte limit"
            )));
        }
        if src.len() < 5 + len {
            src.reserve(5 + len - src.len());
            return Ok(None);
        }
        src.advance(5);
        let payload = src.split_to(len).freeze();
        let frame = match tag {
            TAG_STDIN => RcFrame::Stdin(payload),
            TAG_STDOUT => RcFrame::Stdout(payload),
            TAG_STDERR => RcFrame::Stderr(payload),
            TAG_STDIN_CLOSED if payload.is_empty() => RcFrame::StdinClosed,
            TAG_RESIZE if payload.len() == 4 => RcFrame::Resize {
                width: u16::from_be_bytes([payload[0], payload[1]]),
                height: u16::from_be_bytes([payload[2], payload[3]]),
            },
            TAG_EXIT => RcFrame::Exit(serde_json::from_slice(&payload)?),
            other => {
                return Err(StreamError::BadFrame(format!(
                    "tag {other} with a {len}-byte payload is not a remote command frame"
                )));
            }
        };
        Ok(Some(frame))
    }
}

impl Encoder<RcFrame> for RcCodec {
    type Error = StreamError;

    fn encode(&mut self, frame: RcFrame, dst: &mut BytesMut) -> Result<(), StreamError> {
        let (tag, payload): (u8, Bytes) = match frame {
            RcFrame::Stdin(b) => (TAG_STDIN, b),
            RcFrame::Stdout(b) => (TAG_STDOUT, b),
            RcFrame::Stderr(b) => (TAG_STDERR, b),
            RcFrame::StdinClosed => (TAG_STDIN_CLOSED, Bytes::new()),
            RcFrame::Resize { width, height } => {
                let mut b = BytesMut::with_capacity(4);
                b.put_u16(width);
                b.put_u16(height);
                (TAG_RESIZE, b.freeze())
            }
            RcFrame::Exit(status) => (TAG_EXIT, Bytes::from(serde_json::to_vec(&status)?)),
        };
        if payload.len() > MAX_RC_FRAME {
            return Err(StreamError::BadFrame(format!(
                "payload of {} bytes is over the {MAX_RC_FRAME}-byte limit",
                payload.len()
            )));
        }
        dst.reserve(5 + payload.len());
        dst.put_u8(tag);
        dst.put_u32(payload.len() as u32);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

/// Resource usage an edge reports on a stats stream: what kubelet's `/stats/summary` and
/// `/metrics/resource` are made from. Cumulative CPU in core-nanoseconds and a rate in
/// nano-cores over the edge's last sampling interval; memory working set in bytes.
pub mod stats {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Summary {
        pub node: NodeUsage,
        #[serde(default)]
        pub pods: Vec<PodUsage>,
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NodeUsage {
        pub node_name: String,
        /// When the node started (RFC 3339).
        pub start_time: String,
        pub cpu: Usage,
        pub memory: Memory,
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodUsage {
        pub namespace: String,
        pub name: String,
        pub uid: String,
        pub start_time: String,
        pub cpu: Usage,
        pub memory: Memory,
        #[serde(default)]
        pub containers: Vec<ContainerUsage>,
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ContainerUsage {
        pub name: String,
        pub start_time: String,
        pub cpu: Usage,
        pub memory: Memory,
    }

    /// CPU usage at `time` (RFC 3339 with nanoseconds).
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Usage {
        pub time: String,
        pub usage_core_nano_seconds: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub usage_nano_cores: Option<u64>,
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Memory {
        pub time: String,
        pub working_set_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub usage_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub rss_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub available_bytes: Option<u64>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rc_frames_round_trip() {
        let frames = vec![
            RcFrame::Stdin(Bytes::from_static(b"hi\n")),
            RcFrame::StdinClosed,
            RcFrame::Resize {
                width: 120,
                height: 40,
            },
            RcFrame::Stdout(Bytes::from_static(b"out")),
            RcFrame::Stderr(Bytes::new()),
            RcFrame::Exit(ExitStatus {
                code: Some(3),
                message: String::new(),
            }),
        ];
        let mut buf = BytesMut::new();
        for f in frames.clone() {
            RcCodec.encode(f, &mut buf).unwrap();
        }
        let mut got = Vec::new();
        while let Some(f) = RcCodec.decode(&mut buf).unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn rc_frame_over_limit_is_refused_before_its_payload_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u8(TAG_STDOUT);
        buf.put_u32(MAX_RC_FRAME as u32 + 1);
        let err = RcCodec.decode(&mut buf).unwrap_err();
        assert!(err.to_string().contains("over the"), "{err}");
    }

    #[test]
    fn unknown_tag_and_bad_resize_are_refused() {
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert!(RcCodec.decode(&mut buf).is_err());
        let mut buf = BytesMut::from(&[TAG_RESIZE, 0, 0, 0, 1, 7][..]);
        assert!(RcCodec.decode(&mut buf).is_err());
    }

    #[tokio::test]
    async fn headers_round_trip_and_oversize_is_refused() {
        let request = StreamRequest::Logs(LogsRequest {
            pod: PodTarget {
                namespace: "default".into(),
                name: "hello".into(),
                uid: "u1".into(),
            },
            container: "c".into(),
            follow: true,
            tail_lines: Some(10),
            ..Default::default()
        });
        let mut buf = Vec::new();
        write_header(&mut buf, &request).await.unwrap();
        let got: StreamRequest = read_header(&mut &buf[..], MAX_HEADER_SIZE).await.unwrap();
        assert_eq!(got, request);
        let err = read_header::<_, StreamRequest>(&mut &buf[..], 8)
            .await
            .unwrap_err();
        assert!(matches!(err, StreamError::TooLarge { .. }), "{err}");
        let err = read_header::<_, StreamRequest>(&mut &[][..], 8)
            .await
            .unwrap_err();
        assert!(matches!(err, StreamError::Ended), "{err}");
    }
}
