//! One exec or attach session: the client's channels on one side, the tunnel's
//! [`RcFrame`]s on the other.
//!
//! Two pumps run together, each moving one message at a time: the next tunnel frame is read
//! only once the WebSocket took the previous message (sent and flushed to the socket), and
//! the next client message is read only once the tunnel took the previous frame. A stalled
//! reader on either side therefore stalls the writer on the other instead of growing a queue.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use proto::stream::{ExitStatus, MAX_RC_FRAME, RcCodec, RcFrame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::channel::{self, CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};
use super::{CLOSE_GRACE, RcProtocol};
use crate::status::{exit_status_json, exit_status_text, parse_resize};
use crate::{BoxRead, BoxWrite, RcOptions};

/// How a session ended, decided by whichever pump stopped first.
#[derive(Debug)]
pub(super) enum Ended {
    /// The command ended (or the tunnel failed, with the reason in the status): send it on the
    /// error channel and close normally.
    Exit(ExitStatus),
    /// The client closed, or its connection broke.
    ClientGone,
    /// The client broke the protocol: close with this frame.
    Refused(CloseFrame),
}

/// Runs a remote command session until the command ends or the client goes away.
pub(super) async fn serve<S>(
    ws: WebSocketStream<S>,
    protocol: RcProtocol,
    options: RcOptions,
    tunnel: (BoxWrite, BoxRead),
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut sink, mut stream) = ws.split();
    let (to_edge, from_edge) = tunnel;
    let mut to_edge = FramedWrite::new(to_edge, RcCodec);
    let mut from_edge = FramedRead::new(from_edge, RcCodec);
    let encoding = protocol.encoding;

    // The kubelet's "connection established" notice: an empty message on the lowest channel
    // the client reads.
    let first = if options.stdout {
        STDOUT
    } else if options.stderr {
        STDERR
    } else {
        ERROR
    };
    if sink.send(encoding.encode(first, &[])).await.is_err() {
        return;
    }

    let ended = tokio::select! {
        ended = down(&mut sink, &mut from_edge, protocol, options) => ended,
        ended = up(&mut stream, &mut to_edge, protocol, options) => ended,
    };
    tracing::debug!(?ended, "websocket remotecommand ends");
    match ended {
        Ended::Exit(status) => {
            let body = if protocol.json_status() {
                exit_status_json(&status)
            } else {
                exit_status_text(&status)
            };
            if protocol.json_status() || !body.is_empty() {
                let _ = sink.send(encoding.encode(ERROR, &body)).await;
            }
            let _ = sink.send(Message::Close(Some(normal_close()))).await;
        }
        Ended::Refused(frame) => {
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        Ended::ClientGone => {}
    }
    // The edge learns the session is over from the end of the tunnel stream.
    let _ = tokio::time::timeout(CLOSE_GRACE, to_edge.close()).await;
    drop(from_edge);
    // Finish the closing handshake: flush our close (or the reply to the client's) and read
    // until the client's close arrives.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = sink.close().await;
        while stream.next().await.is_some() {}
    })
    .await;
}

/// Tunnel → client: stdout and stderr to their channels, until the exit status.
async fn down<K, R>(
    sink: &mut K,
    from_edge: &mut FramedRead<R, RcCodec>,
    protocol: RcProtocol,
    options: RcOptions,
) -> Ended
where
    K: futures::Sink<Message> + Unpin,
    R: AsyncRead + Unpin,
{
    loop {
        let frame = match from_edge.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                return Ended::Exit(failure(format!("reading the edge's stream: {error}")));
            }
            None => {
                return Ended::Exit(failure(
                    "the edge ended the stream without an exit status".into(),
                ));
            }
        };
        let (channel, data) = match frame {
            RcFrame::Stdout(data) if options.stdout => (STDOUT, data),
            RcFrame::Stderr(data) if options.stderr => (STDERR, data),
            RcFrame::Stdout(_) | RcFrame::Stderr(_) => continue,
            RcFrame::Exit(status) => return Ended::Exit(status),
            other => {
                return Ended::Exit(failure(format!(
                    "the edge sent {}, which only the cloud sends",
                    frame_name(&other)
                )));
            }
        };
        if data.is_empty() {
            continue;
        }
        if sink
            .send(protocol.encoding.encode(channel, &data))
            .await
            .is_err()
        {
            return Ended::ClientGone;
        }
    }
}

/// Client → tunnel: stdin, resize and (v5) the close of stdin, until the client goes away.
async fn up<T, W>(
    stream: &mut T,
    to_edge: &mut FramedWrite<W, RcCodec>,
    protocol: RcProtocol,
    options: RcOptions,
) -> Ended
where
    T: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    W: AsyncWrite + Unpin,
{
    // Once the edge stops reading (its side ended), client input is dropped while the exit
    // status still comes down.
    let mut edge_reads = true;
    while let Some(item) = stream.next().await {
        let message = match item {
            Ok(message) => message,
            Err(error) => return client_error(error),
        };
        if matches!(message, Message::Close(_)) {
            return Ended::ClientGone;
        }
        let Some(payload) = channel::payload(message) else {
            continue; // ping and pong: answered by the WebSocket itself
        };
        let (channel, data) = match protocol.encoding.decode(payload) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => continue,
            Err(error) => {
                return Ended::Refused(close_frame(CloseCode::Invalid, error.to_string()));
            }
        };
        let frames: Vec<RcFrame> = match channel {
            STDIN if options.stdin => data
                .chunks(MAX_RC_FRAME)
                .map(|chunk| RcFrame::Stdin(Bytes::copy_from_slice(chunk)))
                .collect(),
            RESIZE => match parse_resize(&data) {
                Some((width, height)) => vec![RcFrame::Resize { width, height }],
                None => {
                    tracing::debug!(len = data.len(), "ignoring a malformed resize message");
                    Vec::new()
                }
            },
            CLOSE if protocol.close_signal() => match data.as_ref() {
                [STDIN] if options.stdin => vec![RcFrame::StdinClosed],
                [_] => Vec::new(),
                _ => {
                    return Ended::Refused(close_frame(
                        CloseCode::Protocol,
                        format!(
                            "a close signal carries exactly one channel byte, not {}",
                            data.len()
                        ),
                    ));
                }
            },
            _ => Vec::new(),
        };
        if !edge_reads {
            continue;
        }
        for frame in frames {
            if let Err(error) = to_edge.send(frame).await {
                tracing::debug!(%error, "the edge stopped reading the session's input");
                edge_reads = false;
                break;
            }
        }
    }
    Ended::ClientGone
}

/// A read error from the client: too big a message is refused with a reason, the rest means
/// the connection is gone.
pub(super) fn client_error(error: tokio_tungstenite::tungstenite::Error) -> Ended {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    match error {
        Error::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            Ended::Refused(close_frame(
                CloseCode::Size,
                format!("a message of {size} bytes is over the {max_size}-byte limit"),
            ))
        }
        error => {
            tracing::debug!(%error, "websocket client connection ended");
            Ended::ClientGone
        }
    }
}

pub(super) fn close_frame(code: CloseCode, reason: String) -> CloseFrame {
    // A close reason is at most 123 bytes (a control frame's 125 minus the code).
    let mut reason = reason;
    while reason.len() > 123 {
        reason.pop();
    }
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

pub(super) fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

fn failure(message: String) -> ExitStatus {
    ExitStatus {
        code: None,
        message,
    }
}

fn frame_name(frame: &RcFrame) -> &'static str {
    match frame {
        RcFrame::Stdin(_) => "a stdin frame",
        RcFrame::StdinClosed => "a stdin-closed frame",
        RcFrame::Resize { .. } => "a resize frame",
        RcFrame::Stdout(_) => "a stdout frame",
        RcFrame::Stderr(_) => "a stderr frame",
        RcFrame::Exit(_) => "an exit frame",
    }
}
