//! `exec`, `attach` and `port-forward` through the runtime: the CRI `Exec`, `Attach` and
//! `PortForward` calls return a URL on containerd's streaming server, and this module speaks
//! SPDY/3.1 to it (`streaming`'s client) and bridges to the tunnel stream.
//!
//! Each function answers the cloud's request on `send` with a [`proto::stream::StreamReply`]
//! (`Accepted` once the runtime's stream is up, else `Refused` with the reason) and then
//! carries the payload until either side ends.
//!
//! INTERFACE SKELETON (issue 13): the signatures are fixed; the bodies are being written.

use proto::stream::{AttachRequest, ExecRequest};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cri::Cri;

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
    let _ = (cri, container_id, request, send, recv);
    Err(RemoteError("exec is not implemented yet".into()))
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
    let _ = (cri, container_id, request, send, recv);
    Err(RemoteError("attach is not implemented yet".into()))
}

/// Forwards one connection to `port` inside the pod whose sandbox is `sandbox_id`.
pub async fn port_forward<W, R>(
    cri: &Cri,
    sandbox_id: &str,
    port: u16,
    send: W,
    recv: R,
) -> Result<(), RemoteError>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let _ = (cri, sandbox_id, port, send, recv);
    Err(RemoteError("port-forward is not implemented yet".into()))
}
