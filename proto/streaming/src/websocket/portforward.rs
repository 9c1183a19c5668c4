//! The kubelet's WebSocket port-forward: the ports come from the query, port `i` has a data
//! channel `2*i` (both ways) and an error channel `2*i+1` (server to client), and the first
//! message on each starts with the port, little-endian. Each port is one forwarded connection
//! (`dial` once); the session ends when every port's connection has ended.
//!
//! Flow control as in remotecommand: the tunnels are read only once the WebSocket took the
//! previous message, and the client only once the port's tunnel took the previous bytes.

use bytes::Bytes;
use futures::stream::{self, BoxStream, SelectAll};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::io::ReaderStream;

use super::CLOSE_GRACE;
use super::channel::{self, Encoding};
use super::remotecommand::{Ended, client_error, close_frame, normal_close};
use crate::{BoxWrite, Dial};

/// Bytes read from a forwarded connection at a time (one message each).
const READ_CHUNK: usize = 32 * 1024;

/// What one port's tunnel produced: bytes, a read error, or its end.
type PortEvent = (usize, Option<std::io::Result<Bytes>>);

pub(super) async fn serve<S>(
    ws: WebSocketStream<S>,
    encoding: Encoding,
    ports: Vec<u16>,
    dial: Dial,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut sink, mut stream) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        let prefix = port.to_le_bytes();
        for channel in [data_channel(i), error_channel(i)] {
            if sink.feed(encoding.encode(channel, &prefix)).await.is_err() {
                return;
            }
        }
    }
    if sink.flush().await.is_err() {
        return;
    }

    let dialed = futures::future::join_all(ports.iter().map(|port| dial(*port))).await;
    let mut writers: Vec<Option<BoxWrite>> = Vec::with_capacity(ports.len());
    let mut readers: SelectAll<BoxStream<'static, PortEvent>> = SelectAll::new();
    for (i, result) in dialed.into_iter().enumerate() {
        match result {
            Ok((writer, reader)) => {
                writers.push(Some(writer));
                let events = ReaderStream::with_capacity(reader, READ_CHUNK)
                    .map(move |read| (i, Some(read)))
                    .chain(stream::once(async move { (i, None) }));
                readers.push(events.boxed());
            }
            Err(message) => {
                writers.push(None);
                let text = format!("error forwarding port {}: {message}", ports[i]);
                if sink
                    .send(encoding.encode(error_channel(i), text.as_bytes()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }

    let ended = if readers.is_empty() {
        all_done()
    } else {
        tokio::select! {
            ended = down(&mut sink, &mut readers, encoding, &ports) => ended,
            ended = up(&mut stream, &mut writers, encoding) => ended,
        }
    };
    tracing::debug!(?ended, "websocket portforward ends");
    match ended {
        Ended::Exit(_) => {
            let _ = sink.send(Message::Close(Some(normal_close()))).await;
        }
        Ended::Refused(frame) => {
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        Ended::ClientGone => {}
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        for writer in writers.iter_mut().flatten() {
            let _ = writer.shutdown().await;
        }
    })
    .await;
    drop(readers);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = sink.close().await;
        while stream.next().await.is_some() {}
    })
    .await;
}

/// Tunnels → client, until every port's connection ended.
async fn down<K>(
    sink: &mut K,
    readers: &mut SelectAll<BoxStream<'static, PortEvent>>,
    encoding: Encoding,
    ports: &[u16],
) -> Ended
where
    K: futures::Sink<Message> + Unpin,
{
    while let Some((i, event)) = readers.next().await {
        let message = match event {
            Some(Ok(data)) => encoding.encode(data_channel(i), &data),
            Some(Err(error)) => {
                let text = format!("error forwarding port {}: {error}", ports[i]);
                encoding.encode(error_channel(i), text.as_bytes())
            }
            None => continue,
        };
        if sink.send(message).await.is_err() {
            return Ended::ClientGone;
        }
    }
    all_done()
}

/// Client → tunnels: each data channel's bytes to its port's connection.
async fn up<T>(stream: &mut T, writers: &mut [Option<BoxWrite>], encoding: Encoding) -> Ended
where
    T: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(item) = stream.next().await {
        let message = match item {
            Ok(message) => message,
            Err(error) => return client_error(error),
        };
        if matches!(message, Message::Close(_)) {
            return Ended::ClientGone;
        }
        let Some(payload) = channel::payload(message) else {
            continue;
        };
        let (channel, data) = match encoding.decode(payload) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => continue,
            Err(error) => {
                return Ended::Refused(close_frame(CloseCode::Invalid, error.to_string()));
            }
        };
        let index = usize::from(channel / 2);
        if channel % 2 != 0 || data.is_empty() {
            continue; // error channels are the server's to write
        }
        let Some(slot) = writers.get_mut(index) else {
            tracing::debug!(channel, "ignoring data for a channel no port has");
            continue;
        };
        let Some(writer) = slot.as_mut() else {
            continue;
        };
        let written = async {
            writer.write_all(&data).await?;
            writer.flush().await
        };
        if let Err(error) = written.await {
            tracing::debug!(%error, channel, "a forwarded connection stopped taking bytes");
            *slot = None;
        }
    }
    Ended::ClientGone
}

fn data_channel(i: usize) -> u8 {
    (2 * i) as u8
}

fn error_channel(i: usize) -> u8 {
    (2 * i + 1) as u8
}

/// Every port's connection ended: the session closes normally.
fn all_done() -> Ended {
    Ended::Exit(proto::stream::ExitStatus {
        code: Some(0),
        message: String::new(),
    })
}
