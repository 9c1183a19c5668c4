//! The frame decoder on an arbitrary byte stream: `FrameCodec` with a small limit, fed in chunks
//! whose size the input picks, then `FrameReader` over the same bytes. Every message that
//! decodes must encode and decode back to itself, and both readers must agree.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use proto::{FrameCodec, FrameError, FrameReader, Message};
use tokio_util::codec::{Decoder, Encoder};

/// Small, so that the "too large" path is reached often.
const MAX_FRAME_SIZE: usize = 4096;

/// Decodes `stream` with `FrameCodec`, `chunk` bytes at a time as a socket would deliver them.
fn decode_in_chunks(stream: &[u8], chunk: usize) -> (Vec<Message>, Option<String>) {
    let mut codec = FrameCodec::new(MAX_FRAME_SIZE);
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.put_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(e) => return (messages, Some(e.reason().to_string())),
            }
        }
        // The decoder reserves only what a checked header announced (the buffer may double).
        assert!(buf.capacity() <= 2 * (MAX_FRAME_SIZE + 4 + stream.len()));
    }
    match codec.decode_eof(&mut buf) {
        Ok(Some(message)) => {
            messages.push(message);
            (messages, None)
        }
        Ok(None) => (messages, None),
        Err(e) => (messages, Some(e.reason().to_string())),
    }
}

fn round_trip(message: &Message) {
    let mut codec = FrameCodec::new(MAX_FRAME_SIZE);
    let mut buf = BytesMut::new();
    match codec.encode(message.clone(), &mut buf) {
        Ok(()) => {
            let again = codec.decode(&mut buf).expect("a frame we encoded decodes");
            assert_eq!(
                again.as_ref(),
                Some(message),
                "round trip changed the message"
            );
            assert!(buf.is_empty(), "round trip left bytes behind");
        }
        // A message can grow when encoded again (e.g. a default made explicit); over the limit
        // it is refused on the way out too.
        Err(FrameError::TooLarge { .. }) => {}
        Err(e) => panic!("encoding a decoded message failed: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let (messages, error) = decode_in_chunks(stream, chunk);
    for message in &messages {
        let _ = message.kind();
        let _ = format!("{message:?}");
        round_trip(message);
    }
    // The whole stream at once must give the same messages and the same outcome.
    let (whole, whole_error) = decode_in_chunks(stream, stream.len().max(1));
    assert_eq!(whole, messages);
    assert_eq!(whole_error, error);

    let mut reader = FrameReader::new(stream, MAX_FRAME_SIZE);
    let mut read = Vec::new();
    let read_error = futures::executor::block_on(async {
        loop {
            match reader.next().await {
                Ok(Some(message)) => read.push(message),
                Ok(None) => return None,
                Err(e) => return Some(e.reason().to_string()),
            }
        }
    });
    assert_eq!(read, messages);
    assert_eq!(read_error, error);
});
