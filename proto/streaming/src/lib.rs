//! Kubernetes' streaming protocols, both roles, over any byte stream:
//! - the server side that `kubectl` (through the embedded API) and kube-apiserver (through the
//!   kubelet endpoint) speak to: `exec`/`attach` (remotecommand over SPDY/3.1 or WebSocket,
//!   `v5.channel.k8s.io` down to `channel.k8s.io`) and `portforward` (SPDY/3.1 and WebSocket);
//! - the client side edgecore speaks to the CRI streaming server of containerd, whose
//!   `Exec`/`Attach`/`PortForward` calls return a URL on it.
//!
//! The tunnel side of every session is [`proto::stream`]: remote commands become
//! [`proto::stream::RcFrame`]s, forwarded connections raw bytes.
//!
//! INTERFACE SKELETON (issue 13): the signatures are fixed; the bodies are being written.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

pub mod spdy;
pub mod status;
pub mod websocket;

/// A boxed writer half (for example a tunnel's `quinn::SendStream`).
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;
/// A boxed reader half (for example a tunnel's `quinn::RecvStream`).
pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;

/// Which channels a remote command has, from the request's query (`stdin=1`, `tty=true`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RcOptions {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// An error answered as a plain HTTP response before any upgrade: the status code and the
/// message for a Kubernetes `Status` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: u16,
    pub message: String,
}

/// Opens one forwarded connection to a port of the pod: the tunnel's writer and reader, or
/// the message for the port's error channel.
pub type Dial = Arc<
    dyn Fn(u16) -> Pin<Box<dyn Future<Output = Result<(BoxWrite, BoxRead), String>> + Send>>
        + Send
        + Sync,
>;

/// Whether `request` asks for an upgrade this crate speaks (SPDY/3.1 or WebSocket).
pub fn is_upgrade<B>(request: &http::Request<B>) -> bool {
    transport(request).is_some()
}

/// The two upgrade transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Spdy,
    WebSocket,
}

/// The transport the request's `Upgrade` header asks for.
pub fn transport<B>(request: &http::Request<B>) -> Option<Transport> {
    let upgrade = request
        .headers()
        .get(http::header::UPGRADE)?
        .to_str()
        .ok()?;
    upgrade.split(',').map(str::trim).find_map(|p| {
        if p.eq_ignore_ascii_case("SPDY/3.1") {
            Some(Transport::Spdy)
        } else if p.eq_ignore_ascii_case("websocket") {
            Some(Transport::WebSocket)
        } else {
            None
        }
    })
}

/// Answers an `exec` or `attach` upgrade request: negotiates the transport (SPDY/3.1 or
/// WebSocket) and the remotecommand version, returns the `101 Switching Protocols` response
/// to send, and spawns the task that bridges the client's channels to `tunnel` (which speaks
/// [`proto::stream::RcFrame`], after the edge accepted) until either side ends. A request it
/// cannot serve gets a `Rejection` instead (400 for a missing upgrade, 403/400 for no
/// common protocol version).
pub fn remotecommand<B>(
    request: &mut http::Request<B>,
    options: RcOptions,
    tunnel: (BoxWrite, BoxRead),
) -> Result<http::Response<Bytes>, Rejection> {
    match transport(request) {
        Some(Transport::Spdy) => spdy::server::remotecommand(request, options, tunnel),
        Some(Transport::WebSocket) => websocket::remotecommand(request, options, tunnel),
        None => Err(not_an_upgrade()),
    }
}

/// Answers a `portforward` upgrade request (SPDY/3.1: any number of connections, each a
/// data/error stream pair with its `port` header; WebSocket: the `ports` of the query, one
/// data/error channel pair each). Each forwarded connection calls `dial` once.
pub fn portforward<B>(
    request: &mut http::Request<B>,
    ports: Vec<u16>,
    dial: Dial,
) -> Result<http::Response<Bytes>, Rejection> {
    match transport(request) {
        Some(Transport::Spdy) => spdy::server::portforward(request, ports, dial),
        Some(Transport::WebSocket) => websocket::portforward(request, ports, dial),
        None => Err(not_an_upgrade()),
    }
}

fn not_an_upgrade() -> Rejection {
    Rejection {
        code: 400,
        message: "Upgrade request required (SPDY/3.1 or websocket)".into(),
    }
}
