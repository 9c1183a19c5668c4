//! Channel messages: each WebSocket data message is one channel's bytes, led by the channel
//! number, either raw (binary protocols) or as an ASCII digit followed by the base64 of the
//! bytes (`base64.` protocols, text messages).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, Bytes, BytesMut};
use tokio_tungstenite::tungstenite::Message;

/// Remote command channels.
pub(super) const STDIN: u8 = 0;
pub(super) const STDOUT: u8 = 1;
pub(super) const STDERR: u8 = 2;
pub(super) const ERROR: u8 = 3;
pub(super) const RESIZE: u8 = 4;
/// v5: "the client closed the channel in the next byte".
pub(super) const CLOSE: u8 = 255;

/// How a protocol carries channel bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Binary,
    Base64,
}

/// A message the channel codec cannot read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum ChannelError {
    #[error("the message for channel {channel} is not valid base64")]
    Base64 { channel: u8 },
}

impl Encoding {
    /// The message carrying `data` on `channel`.
    pub(super) fn encode(self, channel: u8, data: &[u8]) -> Message {
        match self {
            Encoding::Binary => {
                let mut b = BytesMut::with_capacity(1 + data.len());
                b.put_u8(channel);
                b.extend_from_slice(data);
                Message::Binary(b.freeze())
            }
            Encoding::Base64 => {
                let mut s = String::with_capacity(1 + data.len().div_ceil(3) * 4);
                s.push(char::from(b'0'.wrapping_add(channel)));
                STANDARD.encode_string(data, &mut s);
                Message::text(s)
            }
        }
    }

    /// The channel and bytes of a data message's payload; `None` for an empty message, which
    /// carries no channel (ignored, as the kubelet does).
    pub(super) fn decode(self, mut payload: Bytes) -> Result<Option<(u8, Bytes)>, ChannelError> {
        if payload.is_empty() {
            return Ok(None);
        }
        let lead = payload.split_to(1)[0];
        match self {
            Encoding::Binary => Ok(Some((lead, payload))),
            Encoding::Base64 => {
                let channel = lead.wrapping_sub(b'0');
                let data = STANDARD
                    .decode(&payload)
                    .map_err(|_| ChannelError::Base64 { channel })?;
                Ok(Some((channel, Bytes::from(data))))
            }
        }
    }

    /// How many forwarded ports fit in the channel numbers (two channels each): a byte for
    /// binary, an ASCII character from `'0'` for base64.
    pub(super) fn max_ports(self) -> usize {
        match self {
            Encoding::Binary => 128,
            Encoding::Base64 => usize::from(0x7f - b'0') / 2,
        }
    }
}

/// The payload of a data message, whatever its type (kubelet reads text and binary alike).
pub(super) fn payload(message: Message) -> Option<Bytes> {
    match message {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(Bytes::from(t)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_base64_round_trip() {
        for encoding in [Encoding::Binary, Encoding::Base64] {
            for (channel, data) in [(0u8, &b"hello"[..]), (3, b""), (4, b"{\"Width\":1}")] {
                let message = encoding.encode(channel, data);
                let got = encoding.decode(payload(message).unwrap()).unwrap();
                assert_eq!(got, Some((channel, Bytes::copy_from_slice(data))));
            }
        }
    }

    #[test]
    fn wire_forms_are_what_kubernetes_clients_send() {
        assert_eq!(
            Encoding::Binary.encode(1, b"hi"),
            Message::Binary(Bytes::from_static(b"\x01hi"))
        );
        assert_eq!(Encoding::Base64.encode(1, b"hi"), Message::text("1aGk="));
        assert_eq!(
            Encoding::Base64.decode(Bytes::from_static(b"0aGk=")),
            Ok(Some((0, Bytes::from_static(b"hi"))))
        );
    }

    #[test]
    fn empty_messages_are_skipped_and_bad_base64_is_named() {
        assert_eq!(Encoding::Binary.decode(Bytes::new()), Ok(None));
        assert_eq!(
            Encoding::Base64.decode(Bytes::from_static(b"0!!")),
            Err(ChannelError::Base64 { channel: 0 })
        );
    }
}
