//! SPDY/3.1 (framing, zlib header compression with the SPDY/3 dictionary, sessions with
//! streams and flow control) as Kubernetes uses it, both roles
//! ([docs/streams.md](../../../../docs/streams.md#spdy)).
//!
//! - [`frame`]: frames on the wire and the header compression contexts;
//! - [`session`]: a session over any byte stream, client or server;
//! - [`server`]: remotecommand and port-forward as the kubelet serves them;
//! - [`client`]: the edge's side toward a CRI streaming server (containerd's).

pub mod client;
mod dictionary;
pub mod frame;
pub mod server;
pub mod session;

pub use frame::{Headers, SpdyError};
pub use session::{Incoming, RecvHalf, Role, SendHalf, Session, Stream};

/// The `Upgrade` token.
pub const UPGRADE: &str = "SPDY/3.1";
/// The header naming the stream protocol (remotecommand version or port-forward).
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
/// Remote command versions the server role speaks, most preferred first.
pub const RC_PROTOCOLS: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// The port-forward protocol.
pub const PORTFORWARD_PROTOCOL: &str = "portforward.k8s.io";
