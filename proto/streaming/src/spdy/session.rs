//! A SPDY/3.1 session over a byte stream, either role: streams opened by this side (odd ids
//! for a client, even for a server) or by the peer (handed out on [`Incoming`], each answered
//! with a SYN_REPLY at once, as Kubernetes' servers do), PING answers, GOAWAY, and flow
//! control.
//!
//! One reader task decodes frames and routes them; one writer task owns the transport's write
//! half and the compression context, and writes control frames ahead of data (a data frame is
//! only queued after the SYN frame of its stream was). Stream handles talk to both through
//! the shared state below, guarded by a std mutex that is never held across an await.
//!
//! Flow control ([docs/streams.md](../../../../docs/streams.md#spdy)):
//! - receiving: each stream buffers at most [`INITIAL_WINDOW`] bytes the consumer has not
//!   taken; past that the reader stops reading the transport until the consumer catches up,
//!   so a stalled consumer stalls the peer through TCP even when the peer ignores windows
//!   (moby/spdystream, Kubernetes' implementation, neither sends nor honours WINDOW_UPDATE).
//!   WINDOW_UPDATE frames (stream and session) are sent as the consumer takes the data, so a
//!   peer that honours windows never fills the buffer.
//! - sending: a peer that announces flow control (a SETTINGS or WINDOW_UPDATE frame; this
//!   implementation sends SETTINGS as its first frame) is held to its stream and session
//!   windows: a writer waits for WINDOW_UPDATE. A peer that announced nothing is spdystream,
//!   which ignores windows and blocks its own reader instead: toward it, TCP is the only
//!   limit, as between two spdystream ends.

use std::collections::{HashMap, VecDeque};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::codec::FramedRead;

use super::frame::{
    Frame, FrameDecoder, FrameEncoder, Headers, MAX_DATA_CHUNK, SETTINGS_INITIAL_WINDOW_SIZE,
    SpdyError, goaway, rst,
};

/// SPDY/3.1's initial stream and session window, and the most a stream buffers unread.
pub const INITIAL_WINDOW: u32 = 64 * 1024;
/// The session receive window this side announces at the start (one WINDOW_UPDATE on stream
/// 0), so one stalled stream does not stop the others.
pub const SESSION_WINDOW: u32 = 1024 * 1024;
/// Streams the peer may have open at once; more are refused with REFUSED_STREAM.
pub const MAX_PEER_STREAMS: usize = 1024;
/// How long [`Session::open`] waits for the peer's SYN_REPLY.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_WINDOW: i64 = 0x7fff_ffff;
/// Queued peer-opened streams not yet taken from [`Incoming`].
const INCOMING_QUEUE: usize = 16;
/// Data frames queued for the writer.
const DATA_QUEUE: usize = 16;
/// Control frames queued for the writer (replies, window updates, PING answers).
const CONTROL_QUEUE: usize = 256;

/// Which end of the connection this side is (decides stream id parity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

enum WriteCmd {
    Frame(Frame),
    /// GOAWAY, flush and shut the transport's write half; after all queued data.
    Close(u32),
}

#[derive(Default)]
struct StreamState {
    recv: VecDeque<Bytes>,
    recv_len: usize,
    recv_fin: bool,
    recv_dropped: bool,
    /// What the peer may still send before our next WINDOW_UPDATE.
    recv_window: i64,
    /// Taken by the consumer, not yet announced in a WINDOW_UPDATE.
    consumed: u32,
    send_window: i64,
    local_fin: bool,
    reset: Option<u32>,
    replied: bool,
    /// Live halves ([`SendHalf`], [`RecvHalf`]); the state goes with the last.
    handles: u8,
}

struct State {
    streams: HashMap<u32, StreamState>,
    next_id: u32,
    last_peer_id: u32,
    peer_flow_control: bool,
    peer_initial_window: i64,
    send_session_window: i64,
    session_consumed: u32,
    goaway_received: bool,
    closing: bool,
    /// Set when the reader ended: why.
    ended: Option<SpdyError>,
}

struct Inner {
    role: Role,
    state: Mutex<State>,
    /// Woken on every change of the state; waiters re-check what they wait for.
    changed: Notify,
    control: mpsc::Sender<Frame>,
    data: mpsc::Sender<WriteCmd>,
    /// Stream ids must go out in increasing order: allocation and the SYN_STREAM's queueing
    /// happen under this lock.
    open_lock: tokio::sync::Mutex<()>,
    /// The reader and writer tasks, for [`Session::abort`].
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn own_id(&self, id: u32) -> bool {
        (id % 2 == 1) == (self.role == Role::Client)
    }

    /// Waits until `ready` returns `Some`, re-checking after every state change.
    async fn wait<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            if let Some(v) = ready(&mut self.lock()) {
                return v;
            }
            notified.await;
        }
    }

    fn release(&self, id: u32) {
        let mut st = self.lock();
        if let Some(s) = st.streams.get_mut(&id) {
            s.handles = s.handles.saturating_sub(1);
            if s.handles == 0 {
                st.streams.remove(&id);
            }
        }
    }
}

/// A live session; cheap to clone. Dropping every clone and stream handle ends the writer.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.inner.role)
            .finish()
    }
}

/// Streams the peer opened, already answered with SYN_REPLY.
pub type Incoming = mpsc::Receiver<Stream>;

/// One stream: its SYN headers and its two halves.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    pub send: SendHalf,
    pub recv: RecvHalf,
}

/// The writing half of a stream.
pub struct SendHalf {
    id: u32,
    inner: Arc<Inner>,
}

/// The reading half of a stream.
pub struct RecvHalf {
    id: u32,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SendHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendHalf({})", self.id)
    }
}

impl std::fmt::Debug for RecvHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvHalf({})", self.id)
    }
}

impl Session {
    /// Starts a session on `reader`/`writer` (spawning its reader and writer tasks) and sends
    /// this side's SETTINGS and session window.
    pub fn new<R, W>(reader: R, writer: W, role: Role) -> (Session, Incoming)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
        // Both fit in the fresh queue.
        let _ = control_tx.try_send(Frame::Settings {
            clear: false,
            entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, INITIAL_WINDOW)],
        });
        let _ = control_tx.try_send(Frame::WindowUpdate {
            stream_id: 0,
            delta: SESSION_WINDOW - INITIAL_WINDOW,
        });
        let inner = Arc::new(Inner {
            role,
            state: Mutex::new(State {
                streams: HashMap::new(),
                next_id: if role == Role::Client { 1 } else { 2 },
                last_peer_id: 0,
                peer_flow_control: false,
                peer_initial_window: i64::from(INITIAL_WINDOW),
                send_session_window: i64::from(INITIAL_WINDOW),
                session_consumed: 0,
                goaway_received: false,
                closing: false,
                ended: None,
            }),
            changed: Notify::new(),
            control: control_tx,
            data: data_tx,
            open_lock: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
        });
        let writer = tokio::spawn(write_loop(
            writer,
            control_rx,
            data_rx,
            Arc::downgrade(&inner),
        ));
        let reader = tokio::spawn(read_loop(reader, inner.clone(), incoming_tx));
        if let Ok(mut tasks) = inner.tasks.lock() {
            tasks.extend([writer.abort_handle(), reader.abort_handle()]);
        }
        (Session { inner }, incoming_rx)
    }

    /// Opens a stream with `headers` and waits for the peer's SYN_REPLY (or its refusal).
    pub async fn open(&self, headers: Headers) -> Result<Stream, SpdyError> {
        let id = {
            let _order = self.inner.open_lock.lock().await;
            let id = {
                let mut st = self.inner.lock();
                if let Some(e) = &st.ended {
                    return Err(e.clone());
                }
                if st.goaway_received || st.closing {
                    return Err(SpdyError::Closed);
                }
                let id = st.next_id;
                if id > 0x7fff_ffff {
                    return Err(SpdyError::Protocol("stream ids are exhausted".into()));
                }
                st.next_id += 2;
                let window = st.peer_initial_window;
                st.streams.insert(
                    id,
                    StreamState {
                        send_window: window,
                        recv_window: i64::from(INITIAL_WINDOW),
                        handles: 2,
                        ..Default::default()
                    },
                );
                id
            };
            self.inner
                .control
                .send(Frame::SynStream {
                    stream_id: id,
                    associated_to: 0,
                    priority: 0,
                    fin: false,
                    unidirectional: false,
                    headers: headers.clone(),
                })
                .await
                .map_err(|_| SpdyError::Closed)?;
            id
        };
        let stream = Stream {
            id,
            headers,
            send: SendHalf {
                id,
                inner: self.inner.clone(),
            },
            recv: RecvHalf {
                id,
                inner: self.inner.clone(),
            },
        };
        let replied = self.inner.wait(|st| {
            let ended = st.ended.clone();
            match st.streams.get(&id) {
                None => Some(Err(SpdyError::Closed)),
                Some(s) if s.replied => Some(Ok(())),
                Some(s) if s.reset.is_some() => Some(Err(SpdyError::Refused(format!(
                    "the peer reset stream {id} with status {}",
                    s.reset.unwrap_or_default()
                )))),
                Some(_) => ended.map(Err),
            }
        });
        match tokio::time::timeout(OPEN_TIMEOUT, replied).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SpdyError::Refused(format!(
                "no reply to stream {id} within {OPEN_TIMEOUT:?}"
            ))),
        }
    }

    /// Sends GOAWAY after everything already queued, then shuts the transport's write half.
    /// Streams can no longer be opened; the reader runs until the peer closes.
    pub async fn close(&self) {
        let last = {
            let mut st = self.inner.lock();
            st.closing = true;
            st.last_peer_id
        };
        let _ = self.inner.data.send(WriteCmd::Close(last)).await;
    }

    /// [`Session::close`], then waits up to `linger` for the peer to hang up (dropping a
    /// socket with unread input resets it, which can cut off the last output), then
    /// [`Session::abort`]s: a peer that never hangs up holds nothing.
    pub async fn close_and_wait(&self, linger: Duration) {
        self.close().await;
        let _ = tokio::time::timeout(linger, self.closed()).await;
        self.abort();
    }

    /// Ends the session's tasks now, dropping the transport; open streams end with
    /// [`SpdyError::Closed`].
    pub fn abort(&self) {
        if let Ok(tasks) = self.inner.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
        self.inner.lock().ended.get_or_insert(SpdyError::Closed);
        self.inner.changed.notify_waiters();
    }

    /// Waits until the peer closed the transport (or the session failed); returns why.
    pub async fn closed(&self) -> SpdyError {
        self.inner.wait(|st| st.ended.clone()).await
    }

    /// Whether the reader has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().ended.is_some()
    }
}

impl Stream {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        super::frame::header(&self.headers, name)
    }
}

impl SendHalf {
    /// Sends `data`, in frames of at most [`MAX_DATA_CHUNK`] bytes, each when the peer's
    /// windows allow it (see the module's flow control).
    pub async fn send(&mut self, mut data: Bytes) -> Result<(), SpdyError> {
        while !data.is_empty() {
            let want = data.len().min(MAX_DATA_CHUNK);
            let n = self.reserve(want).await?;
            let chunk = data.split_to(n);
            self.inner
                .data
                .send(WriteCmd::Frame(Frame::Data {
                    stream_id: self.id,
                    fin: false,
                    data: chunk,
                }))
                .await
                .map_err(|_| SpdyError::Closed)?;
        }
        Ok(())
    }

    async fn reserve(&self, want: usize) -> Result<usize, SpdyError> {
        let id = self.id;
        self.inner
            .wait(|st| {
                if let Some(e) = &st.ended {
                    return Some(Err(e.clone()));
                }
                let flow = st.peer_flow_control;
                let session = st.send_session_window;
                let Some(s) = st.streams.get_mut(&id) else {
                    return Some(Err(SpdyError::Closed));
                };
                if let Some(code) = s.reset {
                    return Some(Err(SpdyError::Reset(code)));
                }
                if s.local_fin {
                    return Some(Err(SpdyError::Protocol(format!(
                        "write on stream {id} after its FIN"
                    ))));
                }
                let n = if flow {
                    let avail = s.send_window.min(session);
                    if avail <= 0 {
                        return None;
                    }
                    (avail as usize).min(want)
                } else {
                    want
                };
                s.send_window -= n as i64;
                st.send_session_window -= n as i64;
                Some(Ok(n))
            })
            .await
    }

    /// Half-closes the stream (an empty DATA frame with FIN), after the data already sent.
    pub async fn finish(&mut self) -> Result<(), SpdyError> {
        {
            let mut st = self.inner.lock();
            match st.streams.get_mut(&self.id) {
                Some(s) if s.reset.is_none() && !s.local_fin => s.local_fin = true,
                _ => return Ok(()),
            }
        }
        self.inner
            .data
            .send(WriteCmd::Frame(Frame::Data {
                stream_id: self.id,
                fin: true,
                data: Bytes::new(),
            }))
            .await
            .map_err(|_| SpdyError::Closed)
    }

    /// Resets the stream (RST_STREAM CANCEL): both directions end at once.
    pub async fn reset(&mut self) {
        {
            let mut st = self.inner.lock();
            match st.streams.get_mut(&self.id) {
                Some(s) if s.reset.is_none() => s.reset = Some(rst::CANCEL),
                _ => return,
            }
        }
        self.inner.changed.notify_waiters();
        let _ = self
            .inner
            .control
            .send(Frame::RstStream {
                stream_id: self.id,
                status: rst::CANCEL,
            })
            .await;
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}

impl RecvHalf {
    /// The next chunk the peer sent, `None` at its FIN (or when the session ended), an error
    /// when the peer reset the stream.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, SpdyError> {
        let id = self.id;
        let (chunk, updates) = self
            .inner
            .wait(|st| {
                let ended = st.ended.is_some();
                let s = st.streams.get_mut(&id)?;
                if let Some(chunk) = s.recv.pop_front() {
                    s.recv_len -= chunk.len();
                    let n = chunk.len() as u32;
                    let mut updates = Vec::new();
                    s.consumed += n;
                    if !s.recv_fin && s.consumed >= INITIAL_WINDOW / 2 {
                        updates.push(Frame::WindowUpdate {
                            stream_id: id,
                            delta: s.consumed,
                        });
                        s.recv_window += i64::from(s.consumed);
                        s.consumed = 0;
                    }
                    st.session_consumed += n;
                    if st.session_consumed >= SESSION_WINDOW / 2 {
                        updates.push(Frame::WindowUpdate {
                            stream_id: 0,
                            delta: st.session_consumed,
                        });
                        st.session_consumed = 0;
                    }
                    return Some((Ok(Some(chunk)), updates));
                }
                if let Some(code) = s.reset {
                    return Some((Err(SpdyError::Reset(code)), Vec::new()));
                }
                if s.recv_fin || ended {
                    return Some((Ok(None), Vec::new()));
                }
                None
            })
            .await;
        // The reader may be waiting for this stream's buffer to drain.
        self.inner.changed.notify_waiters();
        for frame in updates {
            let _ = self.inner.control.send(frame).await;
        }
        chunk
    }

    /// Reads to the FIN, keeping at most `limit` bytes (the rest is read and dropped).
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, SpdyError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.recv().await? {
            let room = limit.saturating_sub(all.len());
            all.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok(all)
    }
}

impl Drop for RecvHalf {
    fn drop(&mut self) {
        {
            let mut st = self.inner.lock();
            if let Some(s) = st.streams.get_mut(&self.id) {
                s.recv_dropped = true;
                s.recv.clear();
                s.recv_len = 0;
            }
        }
        self.inner.changed.notify_waiters();
        self.inner.release(self.id);
    }
}

async fn write_loop<W>(
    mut writer: W,
    mut control: mpsc::Receiver<Frame>,
    mut data: mpsc::Receiver<WriteCmd>,
    inner: std::sync::Weak<Inner>,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut encoder = FrameEncoder::default();
    let mut buf = bytes::BytesMut::new();
    let result: Result<(), SpdyError> = async {
        loop {
            let cmd = tokio::select! {
                biased;
                Some(frame) = control.recv() => WriteCmd::Frame(frame),
                Some(cmd) = data.recv() => cmd,
                else => return Ok(()),
            };
            match cmd {
                WriteCmd::Frame(frame) => encoder.encode(&frame, &mut buf)?,
                WriteCmd::Close(last) => {
                    encoder.encode(
                        &Frame::GoAway {
                            last_good_stream_id: last,
                            status: goaway::OK,
                        },
                        &mut buf,
                    )?;
                    writer.write_all(&buf).await?;
                    writer.flush().await?;
                    let _ = writer.shutdown().await;
                    return Ok(());
                }
            }
            // Batch what is already queued into one write.
            if buf.len() < 64 * 1024 && !(control.is_empty() && data.is_empty()) {
                continue;
            }
            writer.write_all(&buf).await?;
            buf.clear();
            if control.is_empty() && data.is_empty() {
                writer.flush().await?;
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "spdy writer ended");
        if let Some(inner) = inner.upgrade() {
            inner.lock().ended.get_or_insert(e);
            inner.changed.notify_waiters();
        }
    }
}

async fn read_loop<R>(reader: R, inner: Arc<Inner>, incoming: mpsc::Sender<Stream>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let mut frames = FramedRead::new(reader, FrameDecoder::default());
    let why = loop {
        let frame = match frames.next().await {
            None => break SpdyError::Closed,
            Some(Err(e)) => {
                let _ = inner.control.try_send(Frame::GoAway {
                    last_good_stream_id: inner.lock().last_peer_id,
                    status: goaway::PROTOCOL_ERROR,
                });
                break e;
            }
            Some(Ok(frame)) => frame,
        };
        if let Err(e) = handle(&inner, &incoming, frame).await {
            let _ = inner.control.try_send(Frame::GoAway {
                last_good_stream_id: inner.lock().last_peer_id,
                status: goaway::PROTOCOL_ERROR,
            });
            break e;
        }
    };
    if why != SpdyError::Closed {
        tracing::debug!(error = %why, "spdy session failed");
    }
    inner.lock().ended.get_or_insert(why);
    inner.changed.notify_waiters();
}

async fn handle(
    inner: &Arc<Inner>,
    incoming: &mpsc::Sender<Stream>,
    frame: Frame,
) -> Result<(), SpdyError> {
    match frame {
        Frame::SynStream {
            stream_id,
            fin,
            unidirectional,
            headers,
            ..
        } => {
            let refuse = {
                let mut st = inner.lock();
                if inner.own_id(stream_id) || stream_id <= st.last_peer_id {
                    return Err(SpdyError::Protocol(format!(
                        "the peer opened stream {stream_id} (after {})",
                        st.last_peer_id
                    )));
                }
                st.last_peer_id = stream_id;
                if st.closing || st.streams.len() >= MAX_PEER_STREAMS {
                    true
                } else {
                    let window = st.peer_initial_window;
                    st.streams.insert(
                        stream_id,
                        StreamState {
                            recv_fin: fin,
                            local_fin: unidirectional,
                            send_window: window,
                            recv_window: i64::from(INITIAL_WINDOW),
                            replied: true,
                            handles: 2,
                            ..Default::default()
                        },
                    );
                    false
                }
            };
            if refuse {
                return reset(inner, stream_id, rst::REFUSED_STREAM).await;
            }
            inner
                .control
                .send(Frame::SynReply {
                    stream_id,
                    fin: false,
                    headers: Vec::new(),
                })
                .await
                .map_err(|_| SpdyError::Closed)?;
            let stream = Stream {
                id: stream_id,
                headers,
                send: SendHalf {
                    id: stream_id,
                    inner: inner.clone(),
                },
                recv: RecvHalf {
                    id: stream_id,
                    inner: inner.clone(),
                },
            };
            if let Err(refused) = incoming.send(stream).await {
                drop(refused);
                reset(inner, stream_id, rst::REFUSED_STREAM).await?;
            }
        }
        Frame::SynReply { stream_id, .. } => {
            let mut st = inner.lock();
            if let Some(s) = st.streams.get_mut(&stream_id) {
                s.replied = true;
            }
        }
        Frame::RstStream { stream_id, status } => {
            let mut st = inner.lock();
            if let Some(s) = st.streams.get_mut(&stream_id) {
                s.reset.get_or_insert(status);
            }
        }
        Frame::Settings { entries, .. } => {
            let mut st = inner.lock();
            st.peer_flow_control = true;
            for (_, id, value) in entries {
                if id == SETTINGS_INITIAL_WINDOW_SIZE {
                    let value = i64::from(value);
                    if value > MAX_WINDOW {
                        return Err(SpdyError::Protocol(format!(
                            "initial window of {value} bytes"
                        )));
                    }
                    let delta = value - st.peer_initial_window;
                    st.peer_initial_window = value;
                    for s in st.streams.values_mut() {
                        s.send_window += delta;
                    }
                }
            }
        }
        Frame::WindowUpdate { stream_id, delta } => {
            let overflow = {
                let mut st = inner.lock();
                st.peer_flow_control = true;
                let delta = i64::from(delta);
                if stream_id == 0 {
                    st.send_session_window += delta;
                    if st.send_session_window > MAX_WINDOW {
                        return Err(SpdyError::Protocol(
                            "the session window grew past 2^31-1".into(),
                        ));
                    }
                    false
                } else if let Some(s) = st.streams.get_mut(&stream_id) {
                    s.send_window += delta;
                    s.send_window > MAX_WINDOW
                } else {
                    false
                }
            };
            if overflow {
                reset(inner, stream_id, rst::FLOW_CONTROL_ERROR).await?;
            }
        }
        Frame::Ping { id } => {
            // Answer the peer's pings (a client's are odd, a server's even); ours come back.
            let peers = (id % 2 == 1) == (inner.role == Role::Server);
            if peers {
                inner
                    .control
                    .send(Frame::Ping { id })
                    .await
                    .map_err(|_| SpdyError::Closed)?;
            }
        }
        Frame::GoAway { .. } => inner.lock().goaway_received = true,
        Frame::Headers { .. } | Frame::Ignored { .. } => {}
        Frame::Data {
            stream_id,
            fin,
            data,
        } => return handle_data(inner, stream_id, fin, data).await,
    }
    inner.changed.notify_waiters();
    Ok(())
}

async fn handle_data(
    inner: &Arc<Inner>,
    stream_id: u32,
    fin: bool,
    data: Bytes,
) -> Result<(), SpdyError> {
    let len = data.len();
    enum Outcome {
        Buffered,
        Dropped,
        Reset(u32),
    }
    let outcome = {
        let mut st = inner.lock();
        let flow = st.peer_flow_control;
        match st.streams.get_mut(&stream_id) {
            None => Outcome::Dropped,
            Some(s) if s.reset.is_some() => Outcome::Dropped,
            Some(s) if s.recv_fin => Outcome::Reset(rst::STREAM_ALREADY_CLOSED),
            Some(s) => {
                s.recv_window -= len as i64;
                s.recv_fin = fin;
                if flow && s.recv_window < 0 {
                    s.reset = Some(rst::FLOW_CONTROL_ERROR);
                    Outcome::Reset(rst::FLOW_CONTROL_ERROR)
                } else if s.recv_dropped {
                    Outcome::Dropped
                } else {
                    if len > 0 {
                        s.recv_len += len;
                        s.recv.push_back(data);
                    }
                    Outcome::Buffered
                }
            }
        }
    };
    inner.changed.notify_waiters();
    match outcome {
        Outcome::Reset(status) => {
            // Whatever was dropped still counts against the session window.
            credit_session(inner, len).await?;
            reset(inner, stream_id, status).await
        }
        Outcome::Dropped => credit_session(inner, len).await,
        Outcome::Buffered => {
            // Backpressure: stop reading the transport while this stream holds more than a
            // window the consumer has not taken.
            inner
                .wait(|st| match st.streams.get(&stream_id) {
                    Some(s) if s.recv_len > INITIAL_WINDOW as usize => {
                        (s.reset.is_some() || s.recv_dropped).then_some(())
                    }
                    _ => Some(()),
                })
                .await;
            Ok(())
        }
    }
}

async fn credit_session(inner: &Arc<Inner>, len: usize) -> Result<(), SpdyError> {
    let update = {
        let mut st = inner.lock();
        st.session_consumed += len as u32;
        (st.session_consumed >= SESSION_WINDOW / 2).then(|| {
            let delta = st.session_consumed;
            st.session_consumed = 0;
            delta
        })
    };
    if let Some(delta) = update {
        inner
            .control
            .send(Frame::WindowUpdate {
                stream_id: 0,
                delta,
            })
            .await
            .map_err(|_| SpdyError::Closed)?;
    }
    Ok(())
}

async fn reset(inner: &Arc<Inner>, stream_id: u32, status: u32) -> Result<(), SpdyError> {
    inner
        .control
        .send(Frame::RstStream { stream_id, status })
        .await
        .map_err(|_| SpdyError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spdy::frame::header;
    use tokio::io::{AsyncReadExt, DuplexStream};

    fn pair() -> (Session, Incoming, Session, Incoming) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (client, client_in) = Session::new(ar, aw, Role::Client);
        let (server, server_in) = Session::new(br, bw, Role::Server);
        (client, client_in, server, server_in)
    }

    fn hdr(name: &str, value: &str) -> Headers {
        vec![(name.to_string(), value.to_string())]
    }

    #[tokio::test]
    async fn client_and_server_exchange_data_both_ways_with_fin() {
        let (client, _ci, _server, mut incoming) = pair();
        let opened = tokio::spawn(async move {
            let mut s = client.open(hdr("streamtype", "stdin")).await.unwrap();
            assert_eq!(s.id, 1);
            s.send.send(Bytes::from_static(b"hello")).await.unwrap();
            s.send.finish().await.unwrap();
            let back = s.recv.read_to_end(1024).await.unwrap();
            (client, back)
        });
        let mut s = incoming.recv().await.unwrap();
        assert_eq!(header(&s.headers, "streamType"), Some("stdin"));
        let got = s.recv.read_to_end(1024).await.unwrap();
        assert_eq!(got, b"hello");
        s.send.send(Bytes::from_static(b"world")).await.unwrap();
        s.send.finish().await.unwrap();
        let (client, back) = opened.await.unwrap();
        assert_eq!(back, b"world");
        // A second stream gets the next odd id.
        let s2 = client.open(hdr("streamtype", "stdout")).await.unwrap();
        assert_eq!(s2.id, 3);
    }

    #[tokio::test]
    async fn a_stalled_reader_stalls_the_writer_and_memory_stays_bounded() {
        let (client, _ci, _server, mut incoming) = pair();
        let writer = tokio::spawn(async move {
            let mut s = client.open(hdr("streamtype", "data")).await.unwrap();
            let chunk = Bytes::from(vec![7u8; 8 * 1024]);
            let mut sent = 0usize;
            loop {
                match tokio::time::timeout(Duration::from_millis(300), s.send.send(chunk.clone()))
                    .await
                {
                    Ok(Ok(())) => sent += chunk.len(),
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => return (sent, s),
                }
            }
        });
        let mut s = incoming.recv().await.unwrap();
        let (sent, mut client_stream) = writer.await.unwrap();
        // The peer (this implementation) announced flow control: the writer stops at the
        // stream window, not at the transport's buffer.
        assert_eq!(sent, INITIAL_WINDOW as usize, "sent {sent}");
        // Reading lets it continue, and everything arrives in order.
        let reader = tokio::spawn(async move {
            let mut total = 0usize;
            while let Some(c) = s.recv.recv().await.unwrap() {
                assert!(c.iter().all(|b| *b == 7));
                total += c.len();
            }
            total
        });
        for _ in 0..32 {
            client_stream
                .send
                .send(Bytes::from(vec![7u8; 8 * 1024]))
                .await
                .unwrap();
        }
        client_stream.send.finish().await.unwrap();
        assert_eq!(reader.await.unwrap(), sent + 32 * 8 * 1024);
    }

    /// A peer that ignores windows (as spdystream does) is stalled by the transport: the
    /// reader stops reading once a stream holds a window's worth, so the raw writer blocks.
    #[tokio::test]
    async fn a_peer_ignoring_windows_is_stalled_by_the_transport() {
        let (a, b) = tokio::io::duplex(16 * 1024);
        let (br, bw) = tokio::io::split(b);
        let (_server, mut incoming) = Session::new(br, bw, Role::Server);
        let (mut raw_r, mut raw_w) = tokio::io::split(a);
        tokio::spawn(async move {
            // Swallow what the server writes (SETTINGS, replies, updates).
            let mut sink = vec![0u8; 4096];
            while raw_r.read(&mut sink).await.unwrap_or(0) > 0 {}
        });
        let mut enc = FrameEncoder::default();
        let mut buf = bytes::BytesMut::new();
        enc.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: hdr("streamtype", "stdin"),
            },
            &mut buf,
        )
        .unwrap();
        raw_w.write_all(&buf).await.unwrap();
        let stream = incoming.recv().await.unwrap();
        let pushed = tokio::spawn(async move {
            let mut pushed = 0usize;
            let mut enc = enc;
            loop {
                let mut buf = bytes::BytesMut::new();
                enc.encode(
                    &Frame::Data {
                        stream_id: 1,
                        fin: false,
                        data: Bytes::from(vec![1u8; 4096]),
                    },
                    &mut buf,
                )
                .unwrap();
                match tokio::time::timeout(Duration::from_millis(300), raw_w.write_all(&buf)).await
                {
                    Ok(r) => {
                        r.unwrap();
                        pushed += 4096;
                    }
                    Err(_) => return pushed,
                }
            }
        });
        let pushed = pushed.await.unwrap();
        // Stream buffer (one window) + one frame in the reader + the duplex buffer.
        assert!(
            pushed <= INITIAL_WINDOW as usize + 4096 + 16 * 1024 + 4096,
            "pushed {pushed}"
        );
        assert!(pushed >= INITIAL_WINDOW as usize, "pushed {pushed}");
        drop(stream);
    }

    /// Counts DATA bytes until the sender stalls (false) or sends FIN (true).
    async fn data_until_stall(
        frames: &mut FramedRead<tokio::io::ReadHalf<DuplexStream>, FrameDecoder>,
        received: &mut usize,
    ) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_millis(300), frames.next()).await {
                Ok(Some(Ok(Frame::Data { data, fin, .. }))) => {
                    *received += data.len();
                    if fin {
                        return true;
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("{other:?}"),
                Err(_) => return false,
            }
        }
    }

    /// A peer's SETTINGS_INITIAL_WINDOW_SIZE and WINDOW_UPDATE frames decide how much this
    /// side sends.
    #[tokio::test]
    async fn the_peers_initial_window_and_updates_are_honoured() {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let (br, bw) = tokio::io::split(b);
        let (_server, mut incoming) = Session::new(br, bw, Role::Server);
        let (raw_r, mut raw_w) = tokio::io::split(a);
        let mut enc = FrameEncoder::default();
        let mut buf = bytes::BytesMut::new();
        for f in [
            Frame::Settings {
                clear: false,
                entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 1000)],
            },
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: hdr("streamtype", "stdout"),
            },
        ] {
            enc.encode(&f, &mut buf).unwrap();
        }
        raw_w.write_all(&buf).await.unwrap();
        let mut stream = incoming.recv().await.unwrap();
        let sender = tokio::spawn(async move {
            stream
                .send
                .send(Bytes::from(vec![9u8; 5000]))
                .await
                .unwrap();
            stream.send.finish().await.unwrap();
            stream
        });
        let mut frames = FramedRead::new(raw_r, FrameDecoder::default());
        let mut received = 0usize;
        assert!(!data_until_stall(&mut frames, &mut received).await);
        assert_eq!(received, 1000, "the initial window of 1000 bytes");
        let mut buf = bytes::BytesMut::new();
        enc.encode(
            &Frame::WindowUpdate {
                stream_id: 1,
                delta: 1500,
            },
            &mut buf,
        )
        .unwrap();
        raw_w.write_all(&buf).await.unwrap();
        assert!(!data_until_stall(&mut frames, &mut received).await);
        assert_eq!(received, 2500);
        let mut buf = bytes::BytesMut::new();
        enc.encode(
            &Frame::WindowUpdate {
                stream_id: 1,
                delta: 10_000,
            },
            &mut buf,
        )
        .unwrap();
        raw_w.write_all(&buf).await.unwrap();
        assert!(data_until_stall(&mut frames, &mut received).await);
        assert_eq!(received, 5000);
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn pings_from_the_peer_are_answered() {
        let (a, b): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
        let (br, bw) = tokio::io::split(b);
        let (_server, _incoming) = Session::new(br, bw, Role::Server);
        let (raw_r, mut raw_w) = tokio::io::split(a);
        let mut enc = FrameEncoder::default();
        let mut buf = bytes::BytesMut::new();
        enc.encode(&Frame::Ping { id: 5 }, &mut buf).unwrap();
        raw_w.write_all(&buf).await.unwrap();
        let mut frames = FramedRead::new(raw_r, FrameDecoder::default());
        let mut seen = Vec::new();
        while let Some(f) = frames.next().await {
            let f = f.unwrap();
            seen.push(f.clone());
            if f == (Frame::Ping { id: 5 }) {
                break;
            }
        }
        // SETTINGS and the session window come first, then the answer.
        assert!(matches!(seen[0], Frame::Settings { .. }), "{seen:?}");
        assert_eq!(seen.last(), Some(&Frame::Ping { id: 5 }));
    }

    #[tokio::test]
    async fn malformed_input_ends_the_session_with_a_goaway_and_the_error() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (br, bw) = tokio::io::split(b);
        let (server, _incoming) = Session::new(br, bw, Role::Server);
        let (raw_r, mut raw_w) = tokio::io::split(a);
        // A control frame of version 2.
        raw_w
            .write_all(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1])
            .await
            .unwrap();
        let why = server.closed().await;
        assert!(why.to_string().contains("version 2"), "{why}");
        let mut frames = FramedRead::new(raw_r, FrameDecoder::default());
        let mut goaway = None;
        while let Some(Ok(f)) = frames.next().await {
            if let Frame::GoAway { status, .. } = f {
                goaway = Some(status);
                break;
            }
        }
        assert_eq!(goaway, Some(goaway::PROTOCOL_ERROR));
    }

    #[tokio::test]
    async fn an_even_stream_id_from_a_client_is_a_protocol_error() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (br, bw) = tokio::io::split(b);
        let (server, _incoming) = Session::new(br, bw, Role::Server);
        let (_raw_r, mut raw_w) = tokio::io::split(a);
        let mut enc = FrameEncoder::default();
        let mut buf = bytes::BytesMut::new();
        enc.encode(
            &Frame::SynStream {
                stream_id: 2,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: vec![],
            },
            &mut buf,
        )
        .unwrap();
        raw_w.write_all(&buf).await.unwrap();
        let why = server.closed().await;
        assert!(why.to_string().contains("opened stream 2"), "{why}");
    }

    #[tokio::test]
    async fn a_peer_that_never_hangs_up_is_dropped_after_the_linger() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (br, bw) = tokio::io::split(b);
        let (server, _incoming) = Session::new(br, bw, Role::Server);
        let (mut raw_r, _raw_w) = tokio::io::split(a);
        let started = std::time::Instant::now();
        server.close_and_wait(Duration::from_millis(200)).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(server.is_closed());
        // The peer sees the GOAWAY, then the end of the transport.
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), raw_r.read_to_end(&mut seen))
            .await
            .expect("the transport is dropped")
            .unwrap();
        let mut frames = FramedRead::new(&seen[..], FrameDecoder::default());
        let mut last = None;
        while let Some(f) = frames.next().await {
            last = Some(f.unwrap());
        }
        assert!(matches!(last, Some(Frame::GoAway { .. })), "{last:?}");
    }

    #[tokio::test]
    async fn reset_reaches_the_other_side_and_close_ends_both() {
        let (client, _ci, server, mut incoming) = pair();
        let opener = tokio::spawn(async move {
            let mut s = client.open(hdr("streamtype", "data")).await.unwrap();
            let err = s.recv.recv().await.unwrap_err();
            (client, err)
        });
        let mut s = incoming.recv().await.unwrap();
        s.send.reset().await;
        let (client, err) = opener.await.unwrap();
        assert_eq!(err, SpdyError::Reset(rst::CANCEL));
        server.close().await;
        assert_eq!(client.closed().await, SpdyError::Closed);
        assert!(client.open(vec![]).await.is_err());
    }
}
