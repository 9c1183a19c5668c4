//! Length-delimited framing: a 4-byte big-endian length, then one protobuf `Envelope`.
//!
//! The length is checked against the limit before any buffer is reserved, so a peer cannot make
//! us allocate more than `max_frame_size` bytes per stream by lying in the header.

use bytes::{Buf, BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

use crate::message::{InvalidMessage, Message};
use crate::pb;

/// Default largest frame, header excluded: 16 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16 * 1024 * 1024;

const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not a valid protobuf envelope")]
    Decode(#[source] prost::DecodeError),
    #[error("invalid message")]
    Invalid(#[source] InvalidMessage),
    #[error("stream ended in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("stream i/o failed")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// A short snake_case name, used as a metrics label and close reason.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::Decode(_) => "malformed_frame",
            FrameError::Invalid(InvalidMessage::UnknownType) => "unknown_message_type",
            FrameError::Invalid(_) => "invalid_message",
            FrameError::Truncated { .. } => "truncated_frame",
            FrameError::Io(_) => "io",
        }
    }
}

/// Encodes and decodes [`Message`]s as length-delimited protobuf envelopes.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_size: usize,
}

impl FrameCodec {
    /// A codec that refuses frames over `max_frame_size` bytes, in both directions.
    pub fn new(max_frame_size: usize) -> Self {
        Self { max_frame_size }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_size {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_size,
            });
        }
        if src.len() < HEADER_LEN + len {
            // Reserve only what the (checked) header announced.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let frame = src.split_to(len);
        let envelope = pb::Envelope::decode(frame.freeze()).map_err(FrameError::Decode)?;
        Message::try_from(envelope)
            .map(Some)
            .map_err(FrameError::Invalid)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        match self.decode(src)? {
            Some(message) => Ok(Some(message)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        let envelope = pb::Envelope::from(message);
        let len = envelope.encoded_len();
        if len > self.max_frame_size {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_size,
            });
        }
        dst.reserve(HEADER_LEN + len);
        dst.put_u32(len as u32);
        envelope
            .encode(dst)
            .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
        Ok(())
    }
}

/// Reads messages from a byte stream (a QUIC receive stream in production).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: FramedRead<R, FrameCodec>,
    /// The buffer's starting size, to which it returns after a larger frame.
    capacity: usize,
}

/// tokio-util's starting buffer size for a framed reader or writer.
const FRAMED_DEFAULT_CAPACITY: usize = 8 * 1024;

/// Whether a buffer that a larger frame grew, now empty, is worth giving back: it keeps what it
/// grew to otherwise, which on thousands of mostly idle sessions (each resync sends a pod or a
/// Secret of a few KiB) adds up.
fn outgrown(buffer: &BytesMut, capacity: usize) -> bool {
    buffer.is_empty() && buffer.capacity() > 2 * capacity
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, max_frame_size: usize) -> Self {
        Self::with_capacity(reader, max_frame_size, FRAMED_DEFAULT_CAPACITY)
    }

    /// A reader whose buffer starts at `capacity` bytes (`new`: 8 KiB), grows only for a
    /// larger frame and goes back to `capacity` once that frame is read: one per session adds
    /// up at thousands of mostly idle sessions.
    pub fn with_capacity(reader: R, max_frame_size: usize, capacity: usize) -> Self {
        Self {
            inner: FramedRead::with_capacity(reader, FrameCodec::new(max_frame_size), capacity),
            capacity,
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Message>, FrameError> {
        let next = self.inner.next().await.transpose();
        if outgrown(self.inner.read_buffer(), self.capacity) {
            *self.inner.read_buffer_mut() = BytesMut::with_capacity(self.capacity);
        }
        next
    }
}

/// Writes messages to a byte stream (a QUIC send stream in production).
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: FramedWrite<W, FrameCodec>,
    /// The buffer's starting size, to which it returns after a larger frame.
    capacity: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(writer: W, max_frame_size: usize) -> Self {
        Self::with_capacity(writer, max_frame_size, FRAMED_DEFAULT_CAPACITY)
    }

    /// A writer whose buffer starts at `capacity` bytes (`new`: 8 KiB), grows only for a
    /// larger frame and goes back to `capacity` once that frame is written. Every
    /// [`FrameWriter::send`] flushes, so the buffer never holds more than one frame either way.
    pub fn with_capacity(writer: W, max_frame_size: usize, capacity: usize) -> Self {
        Self {
            inner: FramedWrite::with_capacity(writer, FrameCodec::new(max_frame_size), capacity),
            capacity,
        }
    }

    /// Writes and flushes one message.
    pub async fn send(&mut self, message: Message) -> Result<(), FrameError> {
        let sent = self.inner.send(message).await;
        if outgrown(self.inner.write_buffer(), self.capacity) {
            *self.inner.write_buffer_mut() = BytesMut::with_capacity(self.capacity);
        }
        sent
    }

    /// The underlying writer, e.g. to finish a QUIC stream.
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(message: Message) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(message, &mut buf)
            .expect("encode");
        buf
    }

    #[test]
    fn decodes_what_it_encodes_even_byte_by_byte() {
        let message = Message::Heartbeat { seq: 99 };
        let encoded = encode(message.clone());
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut decoded = None;
        for byte in encoded.iter() {
            buf.put_u8(*byte);
            if let Some(m) = codec.decode(&mut buf).expect("decode") {
                decoded = Some(m);
            }
        }
        assert_eq!(decoded, Some(message));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_header_is_refused_before_allocation() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, max: 1024 } if len == u32::MAX as usize));
        assert!(
            buf.capacity() < 1024,
            "no buffer was reserved for the claimed length"
        );
    }

    #[test]
    fn encoding_over_the_limit_fails() {
        let mut codec = FrameCodec::new(8);
        let mut buf = BytesMut::new();
        let err = codec
            .encode(
                Message::RenewRequest {
                    csr_der: vec![0; 64],
                },
                &mut buf,
            )
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 8, .. }));
        assert!(buf.is_empty());
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32(4);
        buf.put_slice(&[0xff, 0xff, 0xff, 0xff]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert_eq!(err.reason(), "malformed_frame");
    }

    #[test]
    fn empty_envelope_is_an_unknown_message_type() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        let err = codec.decode(&mut buf).unwrap_err();
        assert_eq!(err.reason(), "unknown_message_type");
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut codec = FrameCodec::default();
        let mut buf = encode(Message::Heartbeat { seq: 1 });
        buf.truncate(buf.len() - 1);
        let err = codec.decode_eof(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }));
    }

    #[tokio::test]
    async fn buffers_a_large_frame_grew_go_back_to_their_starting_size() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut writer = FrameWriter::with_capacity(a, DEFAULT_MAX_FRAME_SIZE, 256);
        let mut reader = FrameReader::with_capacity(b, DEFAULT_MAX_FRAME_SIZE, 256);
        let large = Message::RenewRequest {
            csr_der: vec![7; 20_000],
        };
        writer.send(large.clone()).await.expect("send large");
        assert!(writer.inner.write_buffer().capacity() <= 512);
        writer
            .send(Message::Heartbeat { seq: 1 })
            .await
            .expect("send small");
        assert_eq!(reader.next().await.expect("read large"), Some(large));
        assert_eq!(
            reader.next().await.expect("read small"),
            Some(Message::Heartbeat { seq: 1 })
        );
        assert!(reader.inner.read_buffer().capacity() <= 512);
    }

    #[tokio::test]
    async fn reader_and_writer_round_trip_over_a_pipe() {
        let (a, b) = tokio::io::duplex(64);
        let mut writer = FrameWriter::new(a, DEFAULT_MAX_FRAME_SIZE);
        let mut reader = FrameReader::new(b, DEFAULT_MAX_FRAME_SIZE);
        let sent = vec![
            Message::Heartbeat { seq: 1 },
            Message::RenewRequest {
                csr_der: vec![9; 500],
            },
            Message::Ack { seqs: vec![3] },
        ];
        let to_send = sent.clone();
        let task = tokio::spawn(async move {
            for m in to_send {
                writer.send(m).await.expect("send");
            }
        });
        for expected in sent {
            assert_eq!(reader.next().await.expect("read"), Some(expected));
        }
        task.await.expect("writer task");
        assert_eq!(reader.next().await.expect("eof"), None);
    }
}
