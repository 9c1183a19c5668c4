//! SPDY/3.1 frames on the wire: the control frames Kubernetes' sessions use (SYN_STREAM,
//! SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE) and DATA, with the
//! name/value header blocks compressed by one zlib context per direction, primed with the
//! SPDY/3 dictionary.
//!
//! [`FrameDecoder`] checks a frame's length against [`MAX_FRAME_PAYLOAD`] before it waits for
//! the payload, and a decompressed header block against [`MAX_HEADER_BLOCK`] while inflating,
//! so a peer cannot make the session allocate more than that.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio_util::codec::Decoder;

use super::dictionary::DICTIONARY;

/// The only protocol version in a control frame's header (SPDY/3 and 3.1 share it).
pub const VERSION: u16 = 3;
/// Largest frame payload accepted (the field allows 16 MiB). Kubernetes' peers write chunks
/// of at most 32 KiB.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;
/// Largest data frame this side sends.
pub const MAX_DATA_CHUNK: usize = 16 * 1024;
/// Largest decompressed name/value block accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

const FLAG_FIN: u8 = 0x01;
const FLAG_UNIDIRECTIONAL: u8 = 0x02;
const FLAG_CLEAR_SETTINGS: u8 = 0x01;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
}

/// SETTINGS ids this implementation reads or writes.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u32 = 4;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// A stream's headers: lowercase names, one entry per value (SPDY joins a name's values with
/// NUL on the wire).
pub type Headers = Vec<(String, String)>;

/// The first value of `name` in `headers` (names compare case-insensitively).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One SPDY frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        /// (flags, id, value)
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        /// 0: the session's window (SPDY/3.1).
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    /// A control frame of a type this implementation does not use (the spec says to ignore
    /// it; its payload was skipped).
    Ignored {
        kind: u16,
    },
}

impl Frame {
    /// The frame's name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::SynStream { .. } => "SYN_STREAM",
            Frame::SynReply { .. } => "SYN_REPLY",
            Frame::RstStream { .. } => "RST_STREAM",
            Frame::Settings { .. } => "SETTINGS",
            Frame::Ping { .. } => "PING",
            Frame::GoAway { .. } => "GOAWAY",
            Frame::Headers { .. } => "HEADERS",
            Frame::WindowUpdate { .. } => "WINDOW_UPDATE",
            Frame::Data { .. } => "DATA",
            Frame::Ignored { .. } => "unknown control",
        }
    }
}

/// The session failed (the peer's input was malformed, or the transport failed), or one of
/// its streams did.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    #[error("spdy transport: {0}")]
    Io(String),
    #[error("spdy frame of {size} bytes is over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("spdy control frame of version {0}, this side speaks 3")]
    Version(u16),
    #[error("malformed spdy {frame} frame: {reason}")]
    Malformed { frame: &'static str, reason: String },
    #[error("spdy header block: {0}")]
    Compression(String),
    #[error("spdy protocol error: {0}")]
    Protocol(String),
    #[error("the spdy session is closed")]
    Closed,
    #[error("the spdy stream was reset by the peer (status {0})")]
    Reset(u32),
    #[error("the spdy stream was refused: {0}")]
    Refused(String),
}

impl From<std::io::Error> for SpdyError {
    fn from(e: std::io::Error) -> Self {
        SpdyError::Io(e.to_string())
    }
}

fn malformed(frame: &'static str, reason: impl Into<String>) -> SpdyError {
    SpdyError::Malformed {
        frame,
        reason: reason.into(),
    }
}

/// Reads frames, inflating header blocks with the peer's compression context.
pub struct FrameDecoder {
    inflate: Decompress,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            inflate: Decompress::new(true),
        }
    }
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameDecoder")
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = SpdyError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if src.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, src[5], src[6], src[7]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(SpdyError::TooLarge {
                size: len,
                limit: MAX_FRAME_PAYLOAD,
            });
        }
        if src.len() < 8 + len {
            src.reserve(8 + len - src.len());
            return Ok(None);
        }
        let head = src.split_to(8);
        let flags = head[4];
        let payload = src.split_to(len).freeze();
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(malformed("DATA", "stream id 0"));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                fin: flags & FLAG_FIN != 0,
                data: payload,
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        self.control(kind, flags, payload).map(Some)
    }
}

fn stream_id(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
}

fn word(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl FrameDecoder {
    fn control(&mut self, kind: u16, flags: u8, p: Bytes) -> Result<Frame, SpdyError> {
        let need = |name: &'static str, min: usize, exact: bool| {
            if p.len() < min || (exact && p.len() != min) {
                Err(malformed(name, format!("payload of {} bytes", p.len())))
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            TYPE_SYN_STREAM => {
                need("SYN_STREAM", 10, false)?;
                let id = stream_id(&p[0..4]);
                if id == 0 {
                    return Err(malformed("SYN_STREAM", "stream id 0"));
                }
                Frame::SynStream {
                    stream_id: id,
                    associated_to: stream_id(&p[4..8]),
                    priority: p[8] >> 5,
                    fin: flags & FLAG_FIN != 0,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers: self.headers("SYN_STREAM", &p[10..])?,
                }
            }
            TYPE_SYN_REPLY => {
                need("SYN_REPLY", 4, false)?;
                Frame::SynReply {
                    stream_id: stream_id(&p[0..4]),
                    fin: flags & FLAG_FIN != 0,
                    headers: self.headers("SYN_REPLY", &p[4..])?,
                }
            }
            TYPE_HEADERS => {
                need("HEADERS", 4, false)?;
                Frame::Headers {
                    stream_id: stream_id(&p[0..4]),
                    fin: flags & FLAG_FIN != 0,
                    headers: self.headers("HEADERS", &p[4..])?,
                }
            }
            TYPE_RST_STREAM => {
                need("RST_STREAM", 8, true)?;
                Frame::RstStream {
                    stream_id: stream_id(&p[0..4]),
                    status: word(&p[4..8]),
                }
            }
            TYPE_SETTINGS => {
                need("SETTINGS", 4, false)?;
                let count = word(&p[0..4]) as usize;
                if p.len() != 4 + count.saturating_mul(8) {
                    return Err(malformed(
                        "SETTINGS",
                        format!("{count} entries in a payload of {} bytes", p.len()),
                    ));
                }
                let entries = p[4..]
                    .chunks_exact(8)
                    .map(|e| {
                        (
                            e[0],
                            u32::from_be_bytes([0, e[1], e[2], e[3]]),
                            word(&e[4..8]),
                        )
                    })
                    .collect();
                Frame::Settings {
                    clear: flags & FLAG_CLEAR_SETTINGS != 0,
                    entries,
                }
            }
            TYPE_PING => {
                need("PING", 4, true)?;
                Frame::Ping { id: word(&p[0..4]) }
            }
            TYPE_GOAWAY => {
                // SPDY/2 peers sent no status; accept both lengths.
                if p.len() != 8 && p.len() != 4 {
                    return Err(malformed("GOAWAY", format!("payload of {} bytes", p.len())));
                }
                Frame::GoAway {
                    last_good_stream_id: stream_id(&p[0..4]),
                    status: if p.len() == 8 { word(&p[4..8]) } else { 0 },
                }
            }
            TYPE_WINDOW_UPDATE => {
                need("WINDOW_UPDATE", 8, true)?;
                let delta = word(&p[4..8]) & 0x7fff_ffff;
                if delta == 0 {
                    return Err(malformed("WINDOW_UPDATE", "delta 0"));
                }
                Frame::WindowUpdate {
                    stream_id: stream_id(&p[0..4]),
                    delta,
                }
            }
            kind => Frame::Ignored { kind },
        };
        Ok(frame)
    }

    fn headers(&mut self, frame: &'static str, block: &[u8]) -> Result<Headers, SpdyError> {
        let raw = self.inflate(block)?;
        parse_block(frame, &raw)
    }

    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::TooLarge {
                        size: out.len() + 1,
                        limit: MAX_HEADER_BLOCK,
                    });
                }
                out.reserve((MAX_HEADER_BLOCK - out.len()).min(out.len().max(1024)));
            }
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let result =
                self.inflate
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.inflate.total_in() - in_before) as usize;
            match result {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| SpdyError::Compression(e.to_string()))?;
                    continue;
                }
                Err(e) => return Err(SpdyError::Compression(e.to_string())),
            }
            let progressed =
                self.inflate.total_in() != in_before || self.inflate.total_out() != out_before;
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed {
                return Err(SpdyError::Compression(
                    "the compressed block ends in the middle".into(),
                ));
            }
        }
        Ok(out)
    }
}

fn parse_block(frame: &'static str, raw: &[u8]) -> Result<Headers, SpdyError> {
    let mut b = raw;
    let take = |b: &mut &[u8], what: &str| -> Result<Vec<u8>, SpdyError> {
        if b.len() < 4 {
            return Err(malformed(
                frame,
                format!("header block ends before a {what} length"),
            ));
        }
        let len = b.get_u32() as usize;
        if len > b.len() {
            return Err(malformed(
                frame,
                format!("{what} of {len} bytes in {} remaining", b.len()),
            ));
        }
        let v = b[..len].to_vec();
        b.advance(len);
        Ok(v)
    };
    if b.len() < 4 {
        return Err(malformed(frame, "header block without a count"));
    }
    let count = b.get_u32() as usize;
    // Each pair needs at least its two lengths.
    if count > b.len() / 8 {
        return Err(malformed(
            frame,
            format!("{count} headers in a block of {} bytes", raw.len()),
        ));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take(&mut b, "header name")?;
        let value = take(&mut b, "header value")?;
        let name = String::from_utf8(name)
            .map_err(|_| malformed(frame, "a header name is not UTF-8"))?
            .to_ascii_lowercase();
        if name.is_empty() {
            return Err(malformed(frame, "an empty header name"));
        }
        let value = String::from_utf8(value)
            .map_err(|_| malformed(frame, "a header value is not UTF-8"))?;
        for v in value.split('\0') {
            headers.push((name.clone(), v.to_string()));
        }
    }
    if !b.is_empty() {
        return Err(malformed(
            frame,
            format!("{} bytes after the headers", b.len()),
        ));
    }
    Ok(headers)
}

/// Writes frames, deflating header blocks with this side's compression context.
pub struct FrameEncoder {
    deflate: Compress,
}

impl Default for FrameEncoder {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Cannot fail on a fresh stream.
        let _ = deflate.set_dictionary(DICTIONARY);
        FrameEncoder { deflate }
    }
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameEncoder")
    }
}

impl FrameEncoder {
    /// Appends `frame` to `dst`.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), SpdyError> {
        match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                check_len(data.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u8(if *fin { FLAG_FIN } else { 0 });
                put_u24(dst, data.len());
                dst.extend_from_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                fin,
                unidirectional,
                headers,
            } => {
                let block = self.block(headers)?;
                let flags = if *fin { FLAG_FIN } else { 0 }
                    | if *unidirectional {
                        FLAG_UNIDIRECTIONAL
                    } else {
                        0
                    };
                control(dst, TYPE_SYN_STREAM, flags, 10 + block.len())?;
                dst.put_u32(*stream_id);
                dst.put_u32(*associated_to);
                dst.put_u8((priority & 0x7) << 5);
                dst.put_u8(0);
                dst.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => {
                let block = self.block(headers)?;
                control(dst, TYPE_SYN_REPLY, fin_flag(*fin), 4 + block.len())?;
                dst.put_u32(*stream_id);
                dst.extend_from_slice(&block);
            }
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let block = self.block(headers)?;
                control(dst, TYPE_HEADERS, fin_flag(*fin), 4 + block.len())?;
                dst.put_u32(*stream_id);
                dst.extend_from_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control(dst, TYPE_RST_STREAM, 0, 8)?;
                dst.put_u32(*stream_id);
                dst.put_u32(*status);
            }
            Frame::Settings { clear, entries } => {
                let flags = if *clear { FLAG_CLEAR_SETTINGS } else { 0 };
                control(dst, TYPE_SETTINGS, flags, 4 + 8 * entries.len())?;
                dst.put_u32(entries.len() as u32);
                for (flags, id, value) in entries {
                    dst.put_u32((u32::from(*flags) << 24) | (id & 0xff_ffff));
                    dst.put_u32(*value);
                }
            }
            Frame::Ping { id } => {
                control(dst, TYPE_PING, 0, 4)?;
                dst.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control(dst, TYPE_GOAWAY, 0, 8)?;
                dst.put_u32(*last_good_stream_id);
                dst.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control(dst, TYPE_WINDOW_UPDATE, 0, 8)?;
                dst.put_u32(*stream_id);
                dst.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Ignored { kind } => {
                return Err(SpdyError::Protocol(format!(
                    "cannot send a control frame of unknown type {kind}"
                )));
            }
        }
        Ok(())
    }

    fn block(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        // One entry per name, its values joined with NUL, names lowercase.
        let mut names: Vec<(String, String)> = Vec::new();
        for (n, v) in headers {
            let n = n.to_ascii_lowercase();
            match names.iter_mut().find(|(m, _)| *m == n) {
                Some((_, joined)) => {
                    joined.push('\0');
                    joined.push_str(v);
                }
                None => names.push((n, v.clone())),
            }
        }
        let mut raw = BytesMut::new();
        raw.put_u32(names.len() as u32);
        for (n, v) in &names {
            raw.put_u32(n.len() as u32);
            raw.extend_from_slice(n.as_bytes());
            raw.put_u32(v.len() as u32);
            raw.extend_from_slice(v.as_bytes());
        }
        if raw.len() > MAX_HEADER_BLOCK {
            return Err(SpdyError::TooLarge {
                size: raw.len(),
                limit: MAX_HEADER_BLOCK,
            });
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            consumed += (self.deflate.total_in() - before) as usize;
            // A sync flush is complete once the output is not full after all input went in.
            if consumed == raw.len() && out.len() < out.capacity() {
                break;
            }
        }
        Ok(out)
    }
}

fn fin_flag(fin: bool) -> u8 {
    if fin { FLAG_FIN } else { 0 }
}

fn check_len(len: usize) -> Result<(), SpdyError> {
    if len > MAX_FRAME_PAYLOAD {
        return Err(SpdyError::TooLarge {
            size: len,
            limit: MAX_FRAME_PAYLOAD,
        });
    }
    Ok(())
}

fn control(dst: &mut BytesMut, kind: u16, flags: u8, len: usize) -> Result<(), SpdyError> {
    check_len(len)?;
    dst.reserve(8 + len);
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(kind);
    dst.put_u8(flags);
    put_u24(dst, len);
    Ok(())
}

fn put_u24(dst: &mut BytesMut, len: usize) {
    dst.put_u8((len >> 16) as u8);
    dst.put_u16(len as u16);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn round_trip(frames: Vec<Frame>) -> Vec<Frame> {
        let mut enc = FrameEncoder::default();
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        for f in &frames {
            enc.encode(f, &mut buf).unwrap();
        }
        let mut got = Vec::new();
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(f);
        }
        assert!(buf.is_empty());
        got
    }

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options"));
        assert!(DICTIONARY.ends_with(b"enq=0."));
    }

    #[test]
    fn every_frame_round_trips_and_header_contexts_carry_over() {
        let frames = vec![
            Frame::Settings {
                clear: false,
                entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 65536)],
            },
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: h(&[("streamtype", "error"), ("port", "80")]),
            },
            // The second block is compressed against the first: same context.
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 7,
                fin: true,
                unidirectional: false,
                headers: h(&[
                    ("streamtype", "data"),
                    ("port", "80"),
                    ("x", "a"),
                    ("x", "b"),
                ]),
            },
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: vec![],
            },
            Frame::Headers {
                stream_id: 1,
                fin: true,
                headers: h(&[("k", "v")]),
            },
            Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::from_static(b"hello"),
            },
            Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            Frame::Ping { id: 1 },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 4096,
            },
            Frame::GoAway {
                last_good_stream_id: 3,
                status: goaway::OK,
            },
        ];
        assert_eq!(round_trip(frames.clone()), frames);
    }

    #[test]
    fn hand_made_frames_decode() {
        // PING id 7, then a DATA frame with FIN on stream 5.
        let mut buf = BytesMut::from(
            &[
                0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 7, //
                0x00, 0x00, 0x00, 0x05, 0x01, 0x00, 0x00, 0x02, b'h', b'i',
            ][..],
        );
        let mut dec = FrameDecoder::default();
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(Frame::Ping { id: 7 }));
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::Data {
                stream_id: 5,
                fin: true,
                data: Bytes::from_static(b"hi")
            })
        );
        // An unknown control type is skipped, not an error.
        let mut buf = BytesMut::from(&[0x80, 0x03, 0x00, 0x0a, 0, 0, 0, 1, 9][..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::Ignored { kind: 10 })
        );
    }

    #[test]
    fn malformed_input_is_an_error_naming_what_was_wrong() {
        let cases: Vec<(&[u8], &str)> = vec![
            (
                &[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1],
                "version 2",
            ),
            (&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1], "PING"),
            (
                &[0x80, 0x03, 0x00, 0x09, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
                "delta 0",
            ),
            (
                &[0x80, 0x03, 0x00, 0x04, 0, 0, 0, 4, 0, 0, 0, 9],
                "9 entries",
            ),
            (&[0x00, 0x00, 0x00, 0x00, 0, 0, 0, 0], "stream id 0"),
            // A SYN_STREAM whose "compressed" block is garbage.
            (
                &[
                    0x80, 0x03, 0x00, 0x01, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad,
                ],
                "header block",
            ),
        ];
        for (bytes, want) in cases {
            let mut dec = FrameDecoder::default();
            let err = dec.decode(&mut BytesMut::from(bytes)).unwrap_err();
            assert!(err.to_string().contains(want), "{err} should name {want}");
        }
    }

    /// Garbage, and valid frames with bytes flipped, give frames or errors, never a panic.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = BytesMut::new();
        let mut enc = FrameEncoder::default();
        for f in [
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: h(&[("streamtype", "stdout")]),
            },
            Frame::Settings {
                clear: false,
                entries: vec![(0, 7, 65536)],
            },
            Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::from_static(b"abc"),
            },
        ] {
            enc.encode(&f, &mut valid).unwrap();
        }
        for round in 0..5000 {
            let mut buf = if round % 2 == 0 {
                let mut b = valid.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % b.len();
                    b[i] ^= next() as u8;
                }
                b
            } else {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect::<BytesMut>()
            };
            let mut dec = FrameDecoder::default();
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_their_payload_arrives() {
        let mut buf = BytesMut::from(&[0x00, 0x00, 0x00, 0x01, 0x00, 0xff, 0xff, 0xff][..]);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, SpdyError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_header_bomb_is_refused_at_the_block_limit() {
        let big = "x".repeat(MAX_HEADER_BLOCK);
        let frame = Frame::SynReply {
            stream_id: 1,
            fin: false,
            headers: h(&[("a", &big)]),
        };
        let err = FrameEncoder::default()
            .encode(&frame, &mut BytesMut::new())
            .unwrap_err();
        assert!(matches!(err, SpdyError::TooLarge { .. }));
        // The same block compressed by hand (it compresses to almost nothing) is refused
        // while inflating.
        let mut raw = BytesMut::new();
        raw.put_u32(1);
        raw.put_u32(1);
        raw.put_u8(b'a');
        raw.put_u32(big.len() as u32);
        raw.extend_from_slice(big.as_bytes());
        let mut deflate = Compress::new(Compression::default(), true);
        deflate.set_dictionary(DICTIONARY).unwrap();
        let mut block = Vec::with_capacity(raw.len());
        deflate
            .compress_vec(&raw, &mut block, FlushCompress::Sync)
            .unwrap();
        assert!(block.len() < 4096);
        let mut buf = BytesMut::new();
        control(&mut buf, TYPE_SYN_REPLY, 0, 4 + block.len()).unwrap();
        buf.put_u32(1);
        buf.extend_from_slice(&block);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, SpdyError::TooLarge { .. }), "{err}");
    }
}
