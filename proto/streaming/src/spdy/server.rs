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
