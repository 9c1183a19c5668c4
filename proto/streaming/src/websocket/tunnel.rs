//! A WebSocket as a byte stream, for SPDY/3.1 tunneled in binary messages
//! (`SPDY/3.1+portforward.k8s.io`): the bytes of binary messages in, in order, with no
//! framing of their own; written bytes out as binary messages of at most
//! [`MAX_TUNNEL_MESSAGE`] bytes. A text message is a protocol error; the client's close is the
//! end of the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::remotecommand::close_frame;

/// Largest binary message written (a write of more bytes returns a short count).
pub const MAX_TUNNEL_MESSAGE: usize = 64 * 1024;

/// A WebSocket carrying a byte stream in binary messages. Writes are bounded: a write is
/// taken only when the WebSocket's buffer has room, so a stalled client stalls the writer.
pub struct WebSocketBytes<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// The client closed (or the connection ended): reads return end of file.
    read_closed: bool,
}

impl<S> WebSocketBytes<S> {
    /// Wraps a WebSocket whose handshake is done.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WebSocketBytes {
            ws,
            pending: Bytes::new(),
            read_closed: false,
        }
    }
}

impl<S> AsyncRead for WebSocketBytes<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    this.refuse(
                        cx,
                        CloseCode::Unsupported,
                        "the SPDY tunnel carries only binary messages",
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text message in the SPDY tunnel: only binary messages carry SPDY frames",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => this.read_closed = true,
                Some(Ok(_)) => {} // ping and pong: answered by the WebSocket itself
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    let reason =
                        format!("a message of {size} bytes is over the {max_size}-byte limit");
                    this.refuse(cx, CloseCode::Size, &reason);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
                }
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error))),
            }
        }
    }
}

impl<S> WebSocketBytes<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Queues a close frame with `reason` and tries once to send it (the caller gives up on
    /// the connection after the error it returns).
    fn refuse(&mut self, cx: &mut Context<'_>, code: CloseCode, reason: &str) {
        let ws = Pin::new(&mut self.ws);
        let frame = close_frame(code, reason.to_string());
        if ws.start_send(Message::Close(Some(frame))).is_ok() {
            let _ = Pin::new(&mut self.ws).poll_flush(cx);
        }
    }
}

impl<S> AsyncWrite for WebSocketBytes<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let ws = &mut self.ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(io::Error::other)?;
        let n = buf.len().min(MAX_TUNNEL_MESSAGE);
        Pin::new(&mut *ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WebSocketBytes<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (server, client) = tokio::io::duplex(256 * 1024);
        let server = super::super::server_socket(server).await;
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (WebSocketBytes::new(server), client)
    }

    #[tokio::test]
    async fn binary_messages_are_one_byte_stream_both_ways() {
        let (mut bytes, mut client) = pair().await;
        client.send(Message::binary(&b"ab"[..])).await.unwrap();
        client
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        client.send(Message::binary(&b"cde"[..])).await.unwrap();
        let mut got = [0u8; 5];
        bytes.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcde");

        let out: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let writer = async {
            bytes.write_all(&out).await.unwrap();
            bytes.flush().await.unwrap();
            bytes
        };
        let reader = async {
            let mut received = Vec::new();
            while received.len() < out.len() {
                match client.next().await.unwrap().unwrap() {
                    Message::Binary(b) => {
                        assert!(b.len() <= MAX_TUNNEL_MESSAGE, "{}", b.len());
                        received.extend_from_slice(&b);
                    }
                    Message::Pong(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            received
        };
        let (mut bytes, received) = tokio::join!(writer, reader);
        assert_eq!(received, out);

        client.send(Message::Close(None)).await.unwrap();
        let mut rest = Vec::new();
        bytes.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_text_message_is_refused_with_a_close_reason() {
        let (mut bytes, mut client) = pair().await;
        client.send(Message::text("SYN_STREAM")).await.unwrap();
        let mut buf = [0u8; 8];
        let error = bytes.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("binary"), "{error}");
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => {
                assert_eq!(frame.code, CloseCode::Unsupported);
                assert!(frame.reason.contains("binary"), "{}", frame.reason);
            }
            other => panic!("expected a close, got {other:?}"),
        }
    }
}
