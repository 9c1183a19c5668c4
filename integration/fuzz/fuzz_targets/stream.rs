//! The decoders of the streams the cloud opens on an edge's connection and of the streaming
//! protocols kubectl and kube-apiserver speak (docs/streams.md): the first byte picks one, the
//! second how many bytes the transport delivers at a time, the rest is what the peer sent.
//!
//! - `0`: `proto::stream::RcCodec` (exec and attach frames) fed in chunks, then at once;
//! - `1`: `proto::stream::read_header` as `StreamRequest`, `StreamReply` and
//!   `stats::Summary`, each with the limit its production reader uses, over a reader that
//!   returns at most a chunk per read; and `streaming::status::parse_resize` of the bytes;
//! - `2`: `streaming::spdy::frame::FrameDecoder` (SPDY/3.1 frames, header blocks inflated
//!   with the one zlib context the session keeps across frames) fed in chunks, then at once.
//!
//! Every decoded frame or header encodes and decodes back to itself, chunked and whole
//! decoding agree, and the decoders' buffers never grow past what a checked length announced.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use proto::stream::{
    MAX_HEADER_SIZE, MAX_RC_FRAME, RcCodec, RcFrame, StreamError, StreamReply, StreamRequest,
    read_header, stats, write_header,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use streaming::spdy::frame::{Frame, FrameDecoder, FrameEncoder, MAX_FRAME_PAYLOAD};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::{Decoder, Encoder};

/// The limit edgecore reads a `StreamRequest` with (`edgecore::streams::MAX_REQUEST`).
const REQUEST_LIMIT: usize = 64 * 1024;
/// The limit cloudcore reads replies and stats with (`cloudcore::streams::MAX_REPLY`).
const REPLY_LIMIT: usize = MAX_HEADER_SIZE;

/// Decodes `stream` with `decoder`, `chunk` bytes at a time as a socket delivers them, until the
/// bytes run out or the first error. `announced` is the most a checked length lets the buffer
/// hold beyond the input itself.
fn decode_in_chunks<D>(
    mut decoder: D,
    stream: &[u8],
    chunk: usize,
    announced: usize,
) -> (Vec<D::Item>, Option<String>)
where
    D: Decoder,
    D::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.put_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Some(e.to_string())),
            }
        }
        // The decoder reserves only what a checked header announced (the buffer may double).
        assert!(
            buf.capacity() <= 2 * (announced + stream.len()),
            "buffer of {} bytes for {} input bytes",
            buf.capacity(),
            stream.len()
        );
    }
    (items, None)
}

fn rc_frames(stream: &[u8], chunk: usize) {
    let (frames, error) = decode_in_chunks(RcCodec, stream, chunk, 5 + MAX_RC_FRAME);
    let (whole, whole_error) =
        decode_in_chunks(RcCodec, stream, stream.len().max(1), 5 + MAX_RC_FRAME);
    assert_eq!(whole, frames, "chunked and whole decoding differ");
    assert_eq!(whole_error, error);
    let mut encoded = BytesMut::new();
    for frame in &frames {
        let _ = format!("{frame:?}");
        RcCodec
            .encode(frame.clone(), &mut encoded)
            .expect("a decoded remote command frame encodes");
    }
    let mut again = Vec::new();
    while let Some(frame) = RcCodec
        .decode(&mut encoded)
        .expect("an encoded frame decodes")
    {
        again.push(frame);
    }
    assert_eq!(again, frames, "round trip changed the frames");
    assert!(encoded.is_empty(), "round trip left bytes behind");
    for frame in &frames {
        if let RcFrame::Exit(status) = frame {
            let _ = streaming::status::exit_status_json(status);
            let _ = streaming::status::exit_status_text(status);
        }
    }
}

/// An in-memory reader that returns at most `chunk` bytes per read, as a QUIC stream may.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Reads one header of type `T` with `limit` and checks the outcome against the length prefix.
fn header<T>(stream: &[u8], chunk: usize, limit: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut reader = Chunked {
        data: stream,
        chunk,
    };
    let result = futures::executor::block_on(read_header::<_, T>(&mut reader, limit));
    let announced = stream
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    match (result, announced) {
        (Err(StreamError::Ended), None) => {}
        (Err(StreamError::TooLarge { size, limit: l }), Some(n)) => {
            assert_eq!((size, l), (n, limit));
            assert!(n > limit);
        }
        (Err(StreamError::Io(e)), Some(n)) => {
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            assert!(n <= limit && stream.len() < 4 + n);
        }
        (Err(StreamError::Malformed(_)), Some(n)) => {
            assert!(n <= limit && stream.len() >= 4 + n);
        }
        (Ok(header), Some(n)) => {
            assert!(n <= limit && stream.len() >= 4 + n);
            assert_eq!(
                reader.data.len(),
                stream.len() - 4 - n,
                "read past the header"
            );
            let _ = format!("{header:?}");
            let mut encoded = Vec::new();
            futures::executor::block_on(write_header(&mut encoded, &header))
                .expect("a decoded header encodes");
            // Defaults made explicit can grow a header past the reader's limit; only the
            // round trip is checked here.
            let again: T =
                futures::executor::block_on(read_header(&mut &encoded[..], MAX_HEADER_SIZE))
                    .expect("an encoded header decodes");
            assert_eq!(again, header, "round trip changed the header");
        }
        (other, announced) => panic!(
            "unexpected outcome {other:?} for a length prefix of {announced:?} and {} bytes",
            stream.len()
        ),
    }
}

fn headers(stream: &[u8], chunk: usize) {
    header::<StreamRequest>(stream, chunk, REQUEST_LIMIT);
    header::<StreamReply>(stream, chunk, REPLY_LIMIT);
    header::<stats::Summary>(stream, chunk, REPLY_LIMIT);
    if let Some((width, height)) = streaming::status::parse_resize(stream) {
        let again = format!(r#"{{"Width":{width},"Height":{height}}}"#);
        assert_eq!(
            streaming::status::parse_resize(again.as_bytes()),
            Some((width, height))
        );
    }
}

/// A frame as it reads back after an encoder grouped its header values by name (one entry
/// per name, values joined with NUL): the same headers, ordered by name.
fn normalized(frame: &Frame) -> Frame {
    let mut frame = frame.clone();
    if let Frame::SynStream { headers, .. }
    | Frame::SynReply { headers, .. }
    | Frame::Headers { headers, .. } = &mut frame
    {
        headers.sort_by(|a, b| a.0.cmp(&b.0));
    }
    frame
}

fn spdy_frames(stream: &[u8], chunk: usize) {
    let announced = 8 + MAX_FRAME_PAYLOAD;
    let (frames, error) = decode_in_chunks(FrameDecoder::default(), stream, chunk, announced);
    let (whole, whole_error) = decode_in_chunks(
        FrameDecoder::default(),
        stream,
        stream.len().max(1),
        announced,
    );
    assert_eq!(whole, frames, "chunked and whole decoding differ");
    assert_eq!(whole_error, error);
    // Encode them with one context and decode with another, as the two ends of a session do.
    let mut encoder = FrameEncoder::default();
    let mut encoded = BytesMut::new();
    let mut sent = Vec::new();
    for frame in &frames {
        let _ = format!("{frame:?} {}", frame.name());
        if let Frame::Ignored { .. } = frame {
            continue;
        }
        encoder
            .encode(frame, &mut encoded)
            .unwrap_or_else(|e| panic!("a decoded {} frame does not encode: {e}", frame.name()));
        sent.push(normalized(frame));
    }
    let mut decoder = FrameDecoder::default();
    let mut again = Vec::new();
    while let Some(frame) = decoder
        .decode(&mut encoded)
        .unwrap_or_else(|e| panic!("an encoded frame does not decode: {e}"))
    {
        again.push(normalized(&frame));
    }
    assert_eq!(again, sent, "round trip changed the frames");
    assert!(encoded.is_empty(), "round trip left bytes behind");
}

fuzz_target!(|data: &[u8]| {
    let [which, chunk, stream @ ..] = data else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    match which % 3 {
        0 => rc_frames(stream, chunk),
        1 => headers(stream, chunk),
        _ => spdy_frames(stream, chunk),
    }
});
