//! The server role: remotecommand (`v4.channel.k8s.io` down to `channel.k8s.io`) and
//! `portforward.k8s.io` over SPDY/3.1, as the kubelet serves them.
//!
//! INTERFACE SKELETON (issue 13): the signatures are fixed; the bodies are being written.

use crate::{BoxRead, BoxWrite, Dial, RcOptions, Rejection};

/// See [`crate::remotecommand`].
pub fn remotecommand<B>(
    request: &mut http::Request<B>,
    options: RcOptions,
    tunnel: (BoxWrite, BoxRead),
) -> Result<http::Response<bytes::Bytes>, Rejection> {
    let _ = (request, options, tunnel);
    Err(Rejection {
        code: 501,
        message: "remotecommand over SPDY is not implemented yet".into(),
    })
}

/// See [`crate::portforward`].
pub fn portforward<B>(
    request: &mut http::Request<B>,
    ports: Vec<u16>,
    dial: Dial,
) -> Result<http::Response<bytes::Bytes>, Rejection> {
    let _ = (request, ports, dial);
    Err(Rejection {
        code: 501,
        message: "portforward over SPDY is not implemented yet".into(),
    })
}

/// Serves `portforward.k8s.io` over SPDY/3.1 on an already-upgraded byte stream: the hyper
/// upgrade of [`portforward`], or the WebSocket tunnel that kubectl 1.31+ uses
/// (`SPDY/3.1+portforward.k8s.io`, SPDY frames inside binary WebSocket messages) once
/// `websocket` has turned it into bytes. Returns when the session ends.
pub async fn serve_portforward<IO>(io: IO, dial: Dial)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let _ = (io, dial);
}
