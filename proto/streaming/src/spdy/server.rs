//! The server role: remotecommand (`v4.channel.k8s.io` down to `channel.k8s.io`) and
//! `portforward.k8s.io` over SPDY/3.1, as the kubelet serves them.
//!
//! The HTTP exchange is the kubelet's: the request must ask for `Connection: Upgrade` and
//! `Upgrade: SPDY/3.1` (else 400) and name its protocols in `X-Stream-Protocol-Version`
//! (none: 400; none in common: 403 listing ours); the answer is `101 Switching Protocols`
//! with the chosen protocol, and the session runs on the upgraded connection in a task of
//! its own.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use proto::stream::{ExitStatus, MAX_RC_FRAME, RcCodec, RcFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::session::{Incoming, Role, Session, Stream};
use super::{PORTFORWARD_PROTOCOL, PROTOCOL_HEADER, RC_PROTOCOLS, UPGRADE};
use crate::status::{exit_status_json, exit_status_text, parse_resize};
use crate::{BoxRead, BoxWrite, Dial, RcOptions, Rejection};

/// How long the client has to create the streams a session needs (the kubelet's default).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a finished session waits for the client to close the connection before dropping
/// it (dropping it with unread input would reset it and could lose the last output).
const LINGER: Duration = Duration::from_secs(10);
/// Largest resize message buffered.
const MAX_RESIZE_MESSAGE: usize = 4096;

/// See [`crate::remotecommand`].
pub fn remotecommand<B>(
    request: &mut http::Request<B>,
    options: RcOptions,
    tunnel: (BoxWrite, BoxRead),
) -> Result<http::Response<bytes::Bytes>, Rejection> {
    if !(options.stdin || options.stdout || options.stderr) {
        return Err(Rejection {
            code: 400,
            message: "you must specify at least 1 of stdin, stdout, stderr".into(),
        });
    }
    check_upgrade(request)?;
    let protocol = negotiate(request, &RC_PROTOCOLS)?;
    let version = RcVersion::of(protocol);
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let (r, w) = tokio::io::split(TokioIo::new(upgraded));
                let (session, incoming) = Session::new(r, w, Role::Server);
                serve_remotecommand(session, incoming, version, options, tunnel).await;
            }
            Err(e) => tracing::debug!(error = %e, "remotecommand upgrade failed"),
        }
    });
    Ok(switching_protocols(protocol))
}

/// See [`crate::portforward`]. Over SPDY each stream pair names its port, so `ports` (the
/// WebSocket form's query) is not used, as in the kubelet.
pub fn portforward<B>(
    request: &mut http::Request<B>,
    ports: Vec<u16>,
    dial: Dial,
) -> Result<http::Response<bytes::Bytes>, Rejection> {
    let _ = ports;
    check_upgrade(request)?;
    let protocol = negotiate(request, &[PORTFORWARD_PROTOCOL])?;
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve_portforward(TokioIo::new(upgraded), dial).await,
            Err(e) => tracing::debug!(error = %e, "portforward upgrade failed"),
        }
    });
    Ok(switching_protocols(protocol))
}

fn check_upgrade<B>(request: &http::Request<B>) -> Result<(), Rejection> {
    let has = |name: http::header::HeaderName, token: &str| {
        request.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, UPGRADE) {
        Ok(())
    } else {
        Err(Rejection {
            code: 400,
            message: "unable to upgrade: missing upgrade headers in request (Connection: Upgrade, Upgrade: SPDY/3.1)".into(),
        })
    }
}

/// The first of the client's protocols (in its order) that `ours` has.
fn negotiate<B>(
    request: &http::Request<B>,
    ours: &[&'static str],
) -> Result<&'static str, Rejection> {
    let theirs: Vec<String> = request
        .headers()
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if theirs.is_empty() {
        return Err(Rejection {
            code: 400,
            message: format!("unable to upgrade: {PROTOCOL_HEADER} is required"),
        });
    }
    theirs
        .iter()
        .find_map(|p| ours.iter().find(|o| **o == p.as_str()).copied())
        .ok_or_else(|| Rejection {
            code: 403,
            message: format!(
                "unable to upgrade: unable to negotiate protocol: client supports {theirs:?}, server accepts {ours:?}"
            ),
        })
}

fn switching_protocols(protocol: &str) -> http::Response<Bytes> {
    let mut response = http::Response::new(Bytes::new());
    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static(UPGRADE),
    );
    if let Ok(v) = http::HeaderValue::from_str(protocol) {
        headers.insert(PROTOCOL_HEADER, v);
    }
    response
}

/// The remotecommand versions over SPDY and what each changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RcVersion {
    V1,
    V2,
    V3,
    V4,
}

impl RcVersion {
    fn of(protocol: &str) -> RcVersion {
        match protocol {
            "v4.channel.k8s.io" => RcVersion::V4,
            "v3.channel.k8s.io" => RcVersion::V3,
            "v2.channel.k8s.io" => RcVersion::V2,
            _ => RcVersion::V1,
        }
    }

    /// The streams the kubelet waits for: error always, stdin/stdout/stderr as asked (no
    /// stderr with a tty), resize with a tty from v3 on.
    fn expected(self, options: RcOptions) -> usize {
        1 + usize::from(options.stdin)
            + usize::from(options.stdout)
            + usize::from(options.stderr && !options.tty)
            + usize::from(options.tty && self >= RcVersion::V3)
    }
}

#[derive(Default)]
struct Channels {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

/// Collects the client's streams, then bridges them to the tunnel until either side ends.
async fn serve_remotecommand(
    session: Session,
    mut incoming: Incoming,
    version: RcVersion,
    options: RcOptions,
    tunnel: (BoxWrite, BoxRead),
) {
    let expected = version.expected(options);
    let mut channels = Channels::default();
    let mut received = 0usize;
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while received < expected {
        let stream = tokio::select! {
            s = incoming.recv() => s,
            _ = &mut deadline => {
                tracing::info!(received, expected, "remotecommand: timed out waiting for the client to create streams");
                None
            }
        };
        let Some(mut stream) = stream else {
            session.close_and_wait(LINGER).await;
            return;
        };
        let slot = match stream.header("streamtype").unwrap_or_default() {
            "error" => &mut channels.error,
            "stdin" => &mut channels.stdin,
            "stdout" => &mut channels.stdout,
            "stderr" => &mut channels.stderr,
            "resize" => &mut channels.resize,
            other => {
                tracing::debug!(stream_type = other, "remotecommand: unexpected stream type");
                stream.send.reset().await;
                continue;
            }
        };
        *slot = Some(stream);
        received += 1;
    }
    if version == RcVersion::V1 {
        // As 1.0 kubelets did: v1 has no usable error channel, and stdin's server half is
        // closed at once.
        if let Some(mut e) = channels.error.take() {
            e.send.reset().await;
        }
        if let Some(s) = channels.stdin.as_mut() {
            let _ = s.send.finish().await;
        }
    }
    bridge_remotecommand(&session, incoming, version, channels, tunnel).await;
    session.close_and_wait(LINGER).await;
}

async fn bridge_remotecommand(
    session: &Session,
    mut incoming: Incoming,
    version: RcVersion,
    channels: Channels,
    (tunnel_w, tunnel_r): (BoxWrite, BoxRead),
) {
    let Channels {
        error,
        stdin,
        stdout,
        stderr,
        resize,
    } = channels;
    let mut to_edge = FramedWrite::new(tunnel_w, RcCodec);
    let mut from_edge = FramedRead::new(tunnel_r, RcCodec);
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();

    // Client → edge: stdin and resize.
    let upstream = tokio::spawn(async move {
        let mut stdin = stdin.map(|s| s.recv);
        let mut resize = resize.map(|s| s.recv);
        let mut resize_buf = BytesMut::new();
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                chunk = async { stdin.as_mut()?.recv().await.ok() }, if stdin.is_some() => {
                    let frames: Vec<RcFrame> = match chunk.flatten() {
                        Some(data) => data.chunks(MAX_RC_FRAME).map(|c| RcFrame::Stdin(Bytes::copy_from_slice(c))).collect(),
                        None => {
                            stdin = None;
                            vec![RcFrame::StdinClosed]
                        }
                    };
                    for f in frames {
                        if to_edge.send(f).await.is_err() {
                            return;
                        }
                    }
                }
                chunk = async { resize.as_mut()?.recv().await.ok() }, if resize.is_some() => {
                    let Some(data) = chunk.flatten() else {
                        resize = None;
                        continue;
                    };
                    resize_buf.extend_from_slice(&data);
                    for (width, height) in take_resizes(&mut resize_buf) {
                        if to_edge.send(RcFrame::Resize { width, height }).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let _ = to_edge.close().await;
    });

    // Edge → client: output, then the exit status.
    let mut stdout = stdout.map(|s| s.send);
    let mut stderr = stderr.map(|s| s.send);
    let status = loop {
        let frame = tokio::select! {
            f = from_edge.next() => f,
            why = session.closed() => {
                tracing::debug!(reason = %why, "remotecommand: the client went away");
                None
            }
            // Streams the client opens late are not part of the session.
            Some(mut s) = incoming.recv() => {
                s.send.reset().await;
                continue;
            }
        };
        match frame {
            Some(Ok(RcFrame::Stdout(data))) => {
                if let Some(s) = stdout.as_mut() {
                    let _ = s.send(data).await;
                }
            }
            Some(Ok(RcFrame::Stderr(data))) => {
                // A tty has no stderr stream: its output is all on stdout already.
                if let Some(s) = stderr.as_mut() {
                    let _ = s.send(data).await;
                }
            }
            Some(Ok(RcFrame::Exit(status))) => break Some(status),
            Some(Ok(other)) => {
                tracing::debug!(frame = ?other, "remotecommand: unexpected frame from the edge");
            }
            Some(Err(e)) => {
                break Some(ExitStatus {
                    code: None,
                    message: format!("the edge's stream failed: {e}"),
                });
            }
            None if session.is_closed() => break None,
            None => {
                break Some(ExitStatus {
                    code: None,
                    message: "the edge ended the session without an exit status".into(),
                });
            }
        }
    };
    let _ = stop_tx.send(());
    // It may be stuck handing stdin to an edge that no longer reads.
    let mut upstream = upstream;
    if tokio::time::timeout(Duration::from_secs(1), &mut upstream)
        .await
        .is_err()
    {
        upstream.abort();
    }
    if let Some(s) = stdout.as_mut() {
        let _ = s.finish().await;
    }
    if let Some(s) = stderr.as_mut() {
        let _ = s.finish().await;
    }
    if let (Some(status), Some(mut error)) = (status, error) {
        let body = if version == RcVersion::V4 {
            exit_status_json(&status)
        } else {
            exit_status_text(&status)
        };
        if !body.is_empty() {
            let _ = error.send.send(Bytes::from(body)).await;
        }
        let _ = error.send.finish().await;
    }
}

/// Takes the complete resize messages (JSON objects, one after another) out of `buf`.
fn take_resizes(buf: &mut BytesMut) -> Vec<(u16, u16)> {
    let mut sizes = Vec::new();
    let mut consumed = 0usize;
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
    loop {
        match values.next() {
            Some(Ok(v)) => {
                consumed = values.byte_offset();
                match parse_resize(v.to_string().as_bytes()) {
                    Some(size) => sizes.push(size),
                    None => tracing::debug!(message = %v, "remotecommand: not a resize message"),
                }
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "remotecommand: malformed resize stream");
                consumed = buf.len();
                break;
            }
            None => {
                consumed = buf.len();
                break;
            }
        }
    }
    let _ = buf.split_to(consumed);
    if buf.len() > MAX_RESIZE_MESSAGE {
        buf.clear();
    }
    sizes
}

/// A forwarded connection's two streams, as they arrive.
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
    since: tokio::time::Instant,
}

/// Serves `portforward.k8s.io` over SPDY/3.1 on an already-upgraded byte stream: the hyper
/// upgrade of [`portforward`], or the WebSocket tunnel that kubectl 1.31+ uses
/// (`SPDY/3.1+portforward.k8s.io`, SPDY frames inside binary WebSocket messages) once
/// `websocket` has turned it into bytes. Returns when the session ends.
pub async fn serve_portforward<IO>(io: IO, dial: Dial)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (r, w) = tokio::io::split(io);
    let (session, mut incoming) = Session::new(r, w, Role::Server);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            stream = incoming.recv() => {
                let Some(mut stream) = stream else { break };
                let kind = stream.header("streamtype").unwrap_or_default().to_string();
                // Clients before requestID: the error stream's id names the pair, the data
                // stream comes next (two ids on).
                let request = match stream.header("requestid") {
                    Some(id) => id.to_string(),
                    None if kind == "data" => stream.id.saturating_sub(2).to_string(),
                    None => stream.id.to_string(),
                };
                let pair = pairs.entry(request.clone()).or_insert_with(|| Pair {
                    error: None,
                    data: None,
                    since: tokio::time::Instant::now(),
                });
                let slot = match kind.as_str() {
                    "error" => &mut pair.error,
                    "data" => &mut pair.data,
                    other => {
                        tracing::debug!(stream_type = other, "portforward: unexpected stream type");
                        stream.send.reset().await;
                        continue;
                    }
                };
                if slot.is_some() {
                    let message = format!("error processing stream for request {request}: {kind} stream already assigned");
                    if let Some(mut e) = pair.error.take() {
                        let _ = e.send.send(Bytes::from(message)).await;
                        let _ = e.send.finish().await;
                    }
                    stream.send.reset().await;
                    pairs.remove(&request);
                    continue;
                }
                *slot = Some(stream);
                if pair.error.is_some()
                    && pair.data.is_some()
                    && let Some(Pair { error: Some(error), data: Some(data), .. }) = pairs.remove(&request)
                {
                    tokio::spawn(forward(error, data, dial.clone()));
                }
            }
            _ = sweep.tick() => {
                let expired: Vec<String> = pairs
                    .iter()
                    .filter(|(_, p)| p.since.elapsed() > STREAM_CREATION_TIMEOUT)
                    .map(|(k, _)| k.clone())
                    .collect();
                for request in expired {
                    if let Some(Pair { error, data, .. }) = pairs.remove(&request) {
                        if let Some(mut e) = error {
                            let message = format!("request {request}: timed out waiting for streams");
                            let _ = e.send.send(Bytes::from(message)).await;
                            let _ = e.send.finish().await;
                        }
                        if let Some(mut d) = data {
                            d.send.reset().await;
                        }
                    }
                }
            }
        }
    }
    session.close_and_wait(LINGER).await;
}

/// One forwarded connection: dial the port once, then copy both ways; a failed dial's message
/// goes to the error stream.
async fn forward(mut error: Stream, data: Stream, dial: Dial) {
    let port = data
        .header("port")
        .or_else(|| error.header("port"))
        .unwrap_or_default();
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            let message = format!("invalid port {port:?}: must be a number in 1-65535");
            let _ = error.send.send(Bytes::from(message)).await;
            let _ = error.send.finish().await;
            let mut data = data;
            data.send.reset().await;
            return;
        }
    };
    match dial(port).await {
        Err(message) => {
            let _ = error.send.send(Bytes::from(message)).await;
            let _ = error.send.finish().await;
            let mut data = data;
            let _ = data.send.finish().await;
        }
        Ok((tunnel_w, tunnel_r)) => {
            copy_both_ways(data, tunnel_w, tunnel_r).await;
            let _ = error.send.finish().await;
        }
    }
}

/// Copies a SPDY stream to and from a byte stream; each direction's end is a half-close of
/// the other side.
pub async fn copy_both_ways(data: Stream, mut w: BoxWrite, mut r: BoxRead) {
    let Stream {
        send: mut out,
        recv: mut input,
        ..
    } = data;
    let inbound = async move {
        while let Ok(Some(chunk)) = input.recv().await {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = out.finish().await;
    };
    tokio::join!(inbound, outbound);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spdy::frame::header;

    fn request(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().method("POST").uri("/exec");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_handshake_is_the_kubelets() {
        let ok = request(&[
            ("Connection", "Upgrade"),
            ("Upgrade", "SPDY/3.1"),
            (PROTOCOL_HEADER, "v5.channel.k8s.io"),
            (PROTOCOL_HEADER, "v4.channel.k8s.io, v3.channel.k8s.io"),
        ]);
        check_upgrade(&ok).unwrap();
        assert_eq!(negotiate(&ok, &RC_PROTOCOLS).unwrap(), "v4.channel.k8s.io");
        let old = request(&[(PROTOCOL_HEADER, "v2.channel.k8s.io,channel.k8s.io")]);
        assert_eq!(negotiate(&old, &RC_PROTOCOLS).unwrap(), "v2.channel.k8s.io");

        let none = request(&[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]);
        let r = negotiate(&none, &RC_PROTOCOLS).unwrap_err();
        assert_eq!(r.code, 400);
        assert!(r.message.contains(PROTOCOL_HEADER), "{}", r.message);
        let foreign = request(&[(PROTOCOL_HEADER, "v5.channel.k8s.io")]);
        let r = negotiate(&foreign, &RC_PROTOCOLS).unwrap_err();
        assert_eq!(r.code, 403);
        assert!(r.message.contains("v5.channel.k8s.io"), "{}", r.message);
        let r = check_upgrade(&request(&[("Upgrade", "SPDY/3.1")])).unwrap_err();
        assert_eq!(r.code, 400);
        let mut full = ok;
        let (r, w) = tokio::io::split(tokio::io::empty());
        let r =
            remotecommand(&mut full, RcOptions::default(), (Box::pin(w), Box::pin(r))).unwrap_err();
        assert_eq!(r.code, 400);
        assert!(r.message.contains("at least 1 of stdin"), "{}", r.message);
        let response = switching_protocols("v4.channel.k8s.io");
        assert_eq!(response.status(), 101);
        assert_eq!(response.headers()[PROTOCOL_HEADER], "v4.channel.k8s.io");
    }

    #[test]
    fn expected_streams_follow_the_version_and_options() {
        let all = RcOptions {
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        };
        assert_eq!(RcVersion::V4.expected(all), 4);
        let tty = RcOptions { tty: true, ..all };
        assert_eq!(RcVersion::V4.expected(tty), 4); // error, stdin, stdout, resize
        assert_eq!(RcVersion::V2.expected(tty), 3); // no resize before v3
        let out_only = RcOptions {
            stdout: true,
            ..Default::default()
        };
        assert_eq!(RcVersion::V1.expected(out_only), 2);
    }

    #[test]
    fn resize_messages_are_split_across_and_within_frames() {
        let mut buf = BytesMut::from(&b"{\"Width\":80,\"Height\":24}\n{\"Width\":1"[..]);
        assert_eq!(take_resizes(&mut buf), vec![(80, 24)]);
        buf.extend_from_slice(b"20,\"Height\":40}\n");
        assert_eq!(take_resizes(&mut buf), vec![(120, 40)]);
        assert!(buf.iter().all(u8::is_ascii_whitespace));
        buf.extend_from_slice(b"not json");
        assert_eq!(take_resizes(&mut buf), vec![]);
        assert!(buf.is_empty());
    }

    fn duplex_session(role_a: Role) -> (Session, Incoming, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (s, i) = Session::new(ar, aw, role_a);
        (s, i, b)
    }

    fn hdrs(pairs: &[(&str, &str)]) -> super::super::Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// A whole exec over SPDY against a fake edge at the tunnel's end: stdin reaches it as
    /// frames, its output and exit code come back on the client's streams.
    #[tokio::test]
    async fn remotecommand_bridges_a_session_to_rc_frames() {
        let (client, _ci, server_io) = duplex_session(Role::Client);
        let (r, w) = tokio::io::split(server_io);
        let (server, incoming) = Session::new(r, w, Role::Server);
        let (tunnel_cloud, tunnel_edge) = tokio::io::duplex(64 * 1024);
        let (cloud_r, cloud_w) = tokio::io::split(tunnel_cloud);
        let options = RcOptions {
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        };
        let served = tokio::spawn(serve_remotecommand(
            server,
            incoming,
            RcVersion::V4,
            options,
            (Box::pin(cloud_w), Box::pin(cloud_r)),
        ));
        // The fake edge: echoes stdin to stdout, writes "oops" to stderr, exits 3.
        let edge = tokio::spawn(async move {
            let (er, ew) = tokio::io::split(tunnel_edge);
            let mut input = FramedRead::new(er, RcCodec);
            let mut output = FramedWrite::new(ew, RcCodec);
            let mut seen = Vec::new();
            while let Some(Ok(f)) = input.next().await {
                match f {
                    RcFrame::Stdin(b) => output.send(RcFrame::Stdout(b)).await.unwrap(),
                    RcFrame::StdinClosed => break,
                    other => seen.push(other),
                }
            }
            output
                .send(RcFrame::Stderr(Bytes::from_static(b"oops")))
                .await
                .unwrap();
            output
                .send(RcFrame::Exit(ExitStatus {
                    code: Some(3),
                    message: String::new(),
                }))
                .await
                .unwrap();
            seen
        });
        let mut error = client.open(hdrs(&[("streamtype", "error")])).await.unwrap();
        let mut stdin = client.open(hdrs(&[("streamtype", "stdin")])).await.unwrap();
        let mut stdout = client
            .open(hdrs(&[("streamtype", "stdout")]))
            .await
            .unwrap();
        let mut stderr = client
            .open(hdrs(&[("streamtype", "stderr")]))
            .await
            .unwrap();
        stdin.send.send(Bytes::from_static(b"hi\n")).await.unwrap();
        stdin.send.finish().await.unwrap();
        assert_eq!(stdout.recv.read_to_end(1024).await.unwrap(), b"hi\n");
        assert_eq!(stderr.recv.read_to_end(1024).await.unwrap(), b"oops");
        let status: serde_json::Value =
            serde_json::from_slice(&error.recv.read_to_end(4096).await.unwrap()).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "3");
        assert_eq!(edge.await.unwrap(), vec![]);
        // The server says GOAWAY and waits for the client to hang up.
        drop((error, stdin, stdout, stderr));
        assert_eq!(client.closed().await, crate::spdy::SpdyError::Closed);
        drop(client);
        served.await.unwrap();
    }

    /// A client that stops reading stdout stops the bridge from reading the tunnel: the edge's
    /// writes block after a bounded amount, and everything arrives once the client reads.
    #[tokio::test]
    async fn a_stalled_client_stalls_the_edge_instead_of_growing_a_buffer() {
        let (client, _ci, server_io) = duplex_session(Role::Client);
        let (r, w) = tokio::io::split(server_io);
        let (server, incoming) = Session::new(r, w, Role::Server);
        let (tunnel_cloud, tunnel_edge) = tokio::io::duplex(16 * 1024);
        let (cloud_r, cloud_w) = tokio::io::split(tunnel_cloud);
        let options = RcOptions {
            stdout: true,
            ..Default::default()
        };
        tokio::spawn(serve_remotecommand(
            server,
            incoming,
            RcVersion::V4,
            options,
            (Box::pin(cloud_w), Box::pin(cloud_r)),
        ));
        let mut error = client.open(hdrs(&[("streamtype", "error")])).await.unwrap();
        let mut stdout = client
            .open(hdrs(&[("streamtype", "stdout")]))
            .await
            .unwrap();
        const CHUNK: usize = 32 * 1024;
        const FRAMES: usize = 40;
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        let flood = tokio::spawn(async move {
            let (_er, ew) = tokio::io::split(tunnel_edge);
            let mut out = FramedWrite::new(ew, RcCodec);
            for _ in 0..FRAMES {
                let frame = RcFrame::Stdout(Bytes::from(vec![b'x'; CHUNK]));
                out.send(frame).await.unwrap();
                counter.fetch_add(CHUNK, std::sync::atomic::Ordering::SeqCst);
            }
            out.send(RcFrame::Exit(ExitStatus {
                code: Some(0),
                message: String::new(),
            }))
            .await
            .unwrap();
        });
        // Wait until the edge's writes stop progressing.
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = sent.load(std::sync::atomic::Ordering::SeqCst);
            if now == last {
                break;
            }
            last = now;
        }
        // The client's 64 KiB window, the bridge's frame in hand, the tunnel's buffers.
        assert!(last >= 64 * 1024, "sent {last}");
        assert!(
            last <= 512 * 1024,
            "sent {last}: the server buffered without bound"
        );
        let mut total = 0usize;
        while let Some(c) = stdout.recv.recv().await.unwrap() {
            total += c.len();
        }
        assert_eq!(total, FRAMES * CHUNK);
        flood.await.unwrap();
        let status = error.recv.read_to_end(4096).await.unwrap();
        assert!(String::from_utf8_lossy(&status).contains("Success"));
    }

    #[tokio::test]
    async fn portforward_dials_once_per_pair_and_reports_dial_errors() {
        let (client, _ci, server_io) = duplex_session(Role::Client);
        let dials = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = dials.clone();
        let dial: Dial = std::sync::Arc::new(move |port| {
            seen.lock().unwrap().push(port);
            Box::pin(async move {
                if port == 81 {
                    return Err("error forwarding port 81: connection refused".to_string());
                }
                // An echo server on the far side.
                let (near, far) = tokio::io::duplex(4096);
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(far);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                let (r, w) = tokio::io::split(near);
                Ok((Box::pin(w) as BoxWrite, Box::pin(r) as BoxRead))
            })
        });
        tokio::spawn(serve_portforward(server_io, dial));
        let mut connections = Vec::new();
        for (request, port) in [("0", "80"), ("1", "80")] {
            let error = client
                .open(hdrs(&[
                    ("streamtype", "error"),
                    ("port", port),
                    ("requestid", request),
                ]))
                .await
                .unwrap();
            let data = client
                .open(hdrs(&[
                    ("streamtype", "data"),
                    ("port", port),
                    ("requestid", request),
                ]))
                .await
                .unwrap();
            assert_eq!(header(&data.headers, "port"), Some(port));
            connections.push((error, data));
        }
        for (i, (_, data)) in connections.iter_mut().enumerate() {
            let msg = format!("ping {i}");
            data.send.send(Bytes::from(msg)).await.unwrap();
            data.send.finish().await.unwrap();
        }
        for (i, (error, data)) in connections.iter_mut().enumerate() {
            assert_eq!(
                data.recv.read_to_end(1024).await.unwrap(),
                format!("ping {i}").as_bytes()
            );
            assert_eq!(error.recv.read_to_end(1024).await.unwrap(), b"");
        }
        let mut error = client
            .open(hdrs(&[
                ("streamtype", "error"),
                ("port", "81"),
                ("requestid", "2"),
            ]))
            .await
            .unwrap();
        let _data = client
            .open(hdrs(&[
                ("streamtype", "data"),
                ("port", "81"),
                ("requestid", "2"),
            ]))
            .await
            .unwrap();
        let message = error.recv.read_to_end(1024).await.unwrap();
        assert_eq!(message, b"error forwarding port 81: connection refused");
        assert_eq!(*dials.lock().unwrap(), vec![80, 80, 81]);
    }
}
