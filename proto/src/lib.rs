//! The cloud<->edge wire protocol, `edge.v1`.
//!
//! Three layers, each usable on its own:
//! - [`pb`]: the prost types generated from `proto/edge/v1/edge.proto`. They never leave this
//!   crate's users' link layer.
//! - [`message`]: the domain types ([`Message`] and friends) with `TryFrom` conversions that
//!   reject malformed input with [`InvalidMessage`].
//! - [`frame`]: length-delimited framing with the size limit checked before any allocation.

pub mod frame;
pub mod message;

/// Generated protobuf types of package `edge.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/edge.v1.rs"));
}

pub use frame::{DEFAULT_MAX_FRAME_SIZE, FrameCodec, FrameError, FrameReader, FrameWriter};
pub use message::{
    ErrorCode, ErrorMessage, Hello, HelloAck, InvalidMessage, JoinRequest, JoinResponse, Message,
    NodeInfo, ObjectDelete, ObjectRef, ObjectUpsert, PROTOCOL_VERSION, ProtocolVersion,
    StatusReport,
};

/// The ALPN protocol id both sides offer; the protocol version itself is negotiated in
/// `Hello`/`JoinRequest` so that a mismatch gets a readable error instead of a TLS alert.
pub const ALPN: &[u8] = b"edge";
