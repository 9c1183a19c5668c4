//! `exec`, `attach` and `port-forward` through the runtime: the CRI `Exec`, `Attach` and
//! `PortForward` calls return a URL on containerd's streaming server, and this module speaks
//! SPDY/3.1 to it (`streaming`'s client) and bridges to the tunnel stream.
//!
//! Each function answers the cloud's request on `send` with a [`proto::stream::StreamReply`]
//! (`Accepted` once the runtime's stream is up, else `Refused` with the reason) and then
//! carries the payload until either side ends.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use proto::stream::{
    AttachRequest, ExecRequest, ExitStatus, MAX_RC_FRAME, RcCodec, RcFrame, Refusal, RefusalCode,
    StreamReply, write_header,
};
use streaming::spdy::RecvHalf;
use streaming::spdy::client::{self, RcClient};
use streaming::{BoxRead, BoxWrite, RcOptions};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::cri::{Cri, StreamsWanted};

/// How long a port-forward waits for the runtime to report a failed connect before it
/// accepts the stream. containerd dials inside the pod as soon as the stream pair is up and
/// says nothing on success, so a refusal within this time becomes a `Refused` with the
/// runtime's message; a later one ends the accepted stream.
pub const CONNECT_GRACE: Duration = Duration::from_millis(200);

/// How long a finished session waits for containerd to hang up before it is dropped.
const LINGER: Duration = Duration::from_secs(2);

/// A remote session failed after it was accepted (it is logged; the client sees the stream end
/// or the exit status's message).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

/// Runs `request.command` in container `container_id` and bridges its stdio as
/// [`proto::stream::RcFrame`]s.
pub async fn exec<W, R>(
    cri: &Cri,
    container_id: &str,
    request: &ExecRequest,
    send: W,
    recv: R,
) -> Result<(), RemoteError>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let wanted = wanted(request.stdin, request.stdout, request.stderr, request.tty);
    match cri
        .exec(container_id, request.command.clone(), wanted)
        .await
    {
        Ok(url) => remote_command(&url, wanted, send, recv).await,
        Err(e) => refuse(send, e.to_string()).await,
    }
}

/// Attaches to the main process of container `container_id`.
pub async fn attach<W, R>(
    cri: &Cri,
    container_id: &str,
    request: &AttachRequest,
    send: W,
    recv: R,
) -> Result<(), RemoteError>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let wanted = wanted(request.stdin, request.stdout, request.stderr, request.tty);
    match cri.attach(container_id, wanted).await {
        Ok(url) => remote_command(&url, wanted, send, recv).await,
        Err(e) => refuse(send, e.to_string()).await,
    }
}

/// Forwards one connection to `port` inside the pod whose sandbox is `sandbox_id`.
pub async fn port_forward<W, R>(
    cri: &Cri,
    sandbox_id: &str,
    port: u16,
    mut send: W,
    recv: R,
) -> Result<(), RemoteError>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let url = match cri.port_forward(sandbox_id, port).await {
        Ok(url) => url,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let session = match client::portforward(&url).await {
        Ok(s) => s,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let (error, data) = match client::forward(&session, port, 0).await {
        Ok(pair) => pair,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    // The error stream carries the runtime's message if the connect fails, and ends empty
    // when the connection ends.
    let (failed_tx, mut failed) = oneshot::channel();
    let mut error_recv = error.recv;
    tokio::spawn(async move {
        let message = read_message(&mut error_recv).await;
        let _ = failed_tx.send(message);
    });
    if let Ok(Ok(message)) = tokio::time::timeout(CONNECT_GRACE, &mut failed).await
        && !message.is_empty()
    {
        session.close_and_wait(LINGER).await;
        return refuse(send, message).await;
    }
    accept(&mut send).await?;
    let copy = streaming::spdy::server::copy_both_ways(
        data,
        Box::pin(send) as BoxWrite,
        Box::pin(recv) as BoxRead,
    );
    tokio::pin!(copy);
    let result = tokio::select! {
        _ = &mut copy => Ok(()),
        message = &mut failed => match message {
            Ok(m) if !m.is_empty() => Err(RemoteError(m)),
            _ => {
                copy.await;
                Ok(())
            }
        },
    };
    session.close_and_wait(LINGER).await;
    result
}

fn wanted(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> StreamsWanted {
    // As the kubelet: a tty merges stderr into stdout.
    StreamsWanted {
        stdin,
        stdout,
        stderr: stderr && !tty,
        tty,
    }
}

async fn refuse<W: AsyncWrite + Unpin>(mut send: W, message: String) -> Result<(), RemoteError> {
    tracing::info!(reason = %message, "stream refused by the runtime");
    let reply = StreamReply::Refused(Refusal {
        code: RefusalCode::Runtime,
        message,
    });
    write_header(&mut send, &reply)
        .await
        .map_err(|e| RemoteError(format!("answering the cloud: {e}")))?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
    Ok(())
}

async fn accept<W: AsyncWrite + Unpin>(send: &mut W) -> Result<(), RemoteError> {
    write_header(send, &StreamReply::Accepted)
        .await
        .map_err(|e| RemoteError(format!("answering the cloud: {e}")))
}

/// Reads an error stream to its end (or reset), bounded; what arrived before a reset counts
/// (the kubelet's server writes the status, then resets every stream).
async fn read_message(recv: &mut RecvHalf) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = recv.recv().await {
        let room = client::MAX_ERROR_MESSAGE.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    String::from_utf8_lossy(&body).into_owned()
}

async fn next_chunk(recv: &mut Option<RecvHalf>) -> Option<Bytes> {
    match recv.as_mut() {
        Some(r) => r.recv().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// Upgrades `url` and bridges the command's streams with the tunnel: cloud frames to stdin and
/// resize, stdout and stderr to frames, then exactly one `Exit` from the error stream.
async fn remote_command<W, R>(
    url: &str,
    wanted: StreamsWanted,
    mut send: W,
    recv: R,
) -> Result<(), RemoteError>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let options = RcOptions {
        stdin: wanted.stdin,
        stdout: wanted.stdout,
        stderr: wanted.stderr,
        tty: wanted.tty,
    };
    let rc = match client::remotecommand(url, options).await {
        Ok(rc) => rc,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    accept(&mut send).await?;
    bridge(rc, send, recv).await
}

async fn bridge<W, R>(rc: RcClient, send: W, recv: R) -> Result<(), RemoteError>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let RcClient {
        session,
        protocol,
        error,
        stdin,
        stdout,
        stderr,
        resize,
    } = rc;
    let mut to_cloud = FramedWrite::new(send, RcCodec);
    let mut from_cloud = FramedRead::new(recv, RcCodec);

    // Cloud → container: stdin, its end, terminal sizes. A failed tunnel stream (the cloud
    // reset it: kubectl went away) ends the whole session; a clean end only ends stdin.
    let (gone_tx, mut gone) = oneshot::channel::<String>();
    let upstream = tokio::spawn(async move {
        let mut stdin = stdin.map(|s| s.send);
        let mut resize = resize.map(|s| s.send);
        while let Some(frame) = from_cloud.next().await {
            match frame {
                Ok(RcFrame::Stdin(data)) => {
                    if let Some(s) = stdin.as_mut()
                        && s.send(data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Ok(RcFrame::StdinClosed) => {
                    if let Some(mut s) = stdin.take() {
                        let _ = s.finish().await;
                    }
                }
                Ok(RcFrame::Resize { width, height }) => {
                    if let Some(s) = resize.as_mut() {
                        let _ = s.send(client::resize_message(width, height)).await;
                    }
                }
                Ok(other) => {
                    tracing::debug!(frame = ?other, "exec: unexpected frame from the cloud")
                }
                Err(e) => {
                    let _ = gone_tx.send(e.to_string());
                    break;
                }
            }
        }
        // The cloud's side ended: so does stdin.
        if let Some(mut s) = stdin.take() {
            let _ = s.finish().await;
        }
    });

    // Container → cloud: output until every output stream and the error stream ended.
    let mut stdout = stdout.map(|s| s.recv);
    let mut stderr = stderr.map(|s| s.recv);
    let mut error_recv = error.recv;
    let error_body = read_message(&mut error_recv);
    tokio::pin!(error_body);
    let mut status: Option<ExitStatus> = None;
    let mut failed: Option<RemoteError> = None;
    let mut cloud_open = true;
    while stdout.is_some() || stderr.is_some() || status.is_none() {
        let frames: Vec<RcFrame> = tokio::select! {
            chunk = next_chunk(&mut stdout), if stdout.is_some() => match chunk {
                Some(data) => split(data, RcFrame::Stdout),
                None => { stdout = None; continue; }
            },
            chunk = next_chunk(&mut stderr), if stderr.is_some() => match chunk {
                Some(data) => split(data, RcFrame::Stderr),
                None => { stderr = None; continue; }
            },
            body = &mut error_body, if status.is_none() => {
                status = Some(client::exit_status(&protocol, body.as_bytes()));
                continue;
            }
            why = &mut gone, if cloud_open => match why {
                Ok(why) => {
                    failed = Some(RemoteError(format!("the cloud's stream failed: {why}")));
                    break;
                }
                // A clean end of the cloud's side: the output still goes back.
                Err(_) => { cloud_open = false; continue; }
            },
        };
        for frame in frames {
            if let Err(e) = to_cloud.send(frame).await {
                failed = Some(RemoteError(format!("writing to the cloud: {e}")));
                break;
            }
        }
        if failed.is_some() {
            break;
        }
    }
    if failed.is_none() {
        let status = status.unwrap_or_else(|| ExitStatus {
            code: None,
            message: "the runtime's session ended without an exit status".into(),
        });
        if let Err(e) = to_cloud.send(RcFrame::Exit(status)).await {
            failed = Some(RemoteError(format!("writing to the cloud: {e}")));
        }
        let _ = to_cloud.close().await;
    }
    upstream.abort();
    session.close_and_wait(LINGER).await;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn split(data: Bytes, frame: fn(Bytes) -> RcFrame) -> Vec<RcFrame> {
    let mut data = data;
    let mut out = Vec::with_capacity(data.len() / MAX_RC_FRAME + 1);
    while !data.is_empty() {
        let n = data.len().min(MAX_RC_FRAME);
        out.push(frame(data.split_to(n)));
    }
    out
}
