//! The server role over WebSocket: remotecommand (`v5.channel.k8s.io` down to
//! `channel.k8s.io`, binary and base64) and port-forward (`v4.channel.k8s.io` /
//! `portforward.k8s.io`), as kube-apiserver and the kubelet serve them.
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
        message: "remotecommand over WebSocket is not implemented yet".into(),
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
        message: "portforward over WebSocket is not implemented yet".into(),
    })
}
