//! The cloud<->edge wire protocol, `edge.v1`.
//!
//! Three layers, each usable on its own:
//! - [`pb`]: the prost types generated from `proto/edge/v1/edge.proto`. They never leave this
//!   crate's users' link layer.
//! - [`message`]: the domain types ([`Message`] and friends) with `TryFrom` conversions that
//!   reject malformed input with [`InvalidMessage`].
//! - [`frame`]: length-delimited framing with the size limit checked before any allocation.
//! - [`sync`]: the sans-IO sync engine both ends run over those messages.

pub mod frame;
pub mod message;
pub mod stream;
pub mod sync;

/// Generated protobuf types of package `edge.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/edge.v1.rs"));
}

pub use frame::{DEFAULT_MAX_FRAME_SIZE, FrameCodec, FrameError, FrameReader, FrameWriter};
pub use message::{
    EdgeEvent, ErrorCode, ErrorMessage, EventType, HeldObject, Hello, HelloAck, InvalidMessage,
    IssuedToken, JoinRequest, JoinResponse, Message, NodeInfo, ObjectDelete, ObjectRef,
    ObjectUpsert, PROTOCOL_VERSION, ProtocolVersion, StatusReport, TokenRequest, TokenResponse,
};

/// QUIC application close codes. The reason text that goes with them is for humans.
pub mod close_code {
    /// Orderly close (the session ended, the join completed).
    pub const NORMAL: u32 = 0;
    /// The peer sent something the protocol does not allow (bad frame, wrong message).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The peer's protocol major version is not supported.
    pub const UNSUPPORTED_VERSION: u32 = 2;
    /// The node's certificate was revoked.
    pub const REVOKED: u32 = 3;
    /// No acceptable identity (no client certificate where one is required, unknown serial).
    pub const UNAUTHENTICATED: u32 = 4;
    /// Nothing heard from the peer within the dead-after interval.
    pub const HEARTBEAT_TIMEOUT: u32 = 5;
    /// A newer session of the same node took over.
    pub const REPLACED: u32 = 6;
    /// The process is shutting down.
    pub const SHUTDOWN: u32 = 7;
    /// The cloud's API store is not the one the edge synced with; see
    /// `ErrorCode::StateMismatch`.
    pub const STATE_MISMATCH: u32 = 8;
}

/// The ALPN protocol id both sides offer; the protocol version itself is negotiated in
/// `Hello`/`JoinRequest` so that a mismatch gets a readable error instead of a TLS alert.
pub const ALPN: &[u8] = b"edge";

/// How long an edge's dial (QUIC and TLS handshake) may take before the edge abandons it and
/// dials again later (`edgecore::hub::CONNECT_TIMEOUT`). cloudcore stops a handshake whose
/// connection arrived this long ago: its edge is gone.
pub const DIAL_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);
