//! One protocol message: arbitrary bytes as the body of a single frame, so they go through the
//! production path (`pb::Envelope` decode, then `Message::try_from`, inside `FrameCodec`). What
//! decodes must encode and decode back to the same `Message`.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use proto::{DEFAULT_MAX_FRAME_SIZE, FrameCodec, FrameError};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Ok(len) = u32::try_from(data.len()) else {
        return;
    };
    let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_SIZE);
    let mut buf = BytesMut::with_capacity(data.len() + 4);
    buf.put_u32(len);
    buf.put_slice(data);
    let message = match codec.decode(&mut buf) {
        Ok(Some(message)) => message,
        Ok(None) => panic!("a complete frame of {len} bytes was not decoded"),
        Err(FrameError::Decode(_) | FrameError::Invalid(_)) => return,
        Err(e) => panic!("unexpected error for a complete frame: {e}"),
    };
    assert!(buf.is_empty());
    let _ = format!("{message:?}");
    let _ = message.kind();
    let mut encoded = BytesMut::new();
    codec
        .encode(message.clone(), &mut encoded)
        .expect("a decoded message encodes");
    let again = codec
        .decode(&mut encoded)
        .expect("an encoded message decodes")
        .expect("a whole frame");
    assert_eq!(again, message, "encode/decode changed the message");
    // Not checked: that the two encodings are the same bytes. `JoinRequest.labels` is a protobuf
    // map, which prost encodes in a HashMap's order (docs/fuzzing.md, finding 1).
});
