//! The QUIC tunnel server: TLS set-up, handshake pacing, joins, and one session per node.
//!
//! A connection without a client certificate may only join. A connection with one (verified
//! against the cluster CA by rustls) is a node session whose name comes from the certificate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use proto::sync::{ObjectKey, Resync};
use proto::{
    ErrorCode, FrameError, FrameReader, FrameWriter, HeldObject, HelloAck, Message, StatusReport,
    TokenResponse, close_code,
};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ServeConfig;
use crate::downstream::{Downstream, SessionRef};
use crate::join::{self, JoinLimiter, source_text};
use crate::metrics::Metrics;
use crate::pki::{self, ClusterCa, NodeIdentity};
use crate::registry::{CertificateStatus, Registry};
use crate::slots::{HandshakeSlots, Refusal, Slot};
use crate::tokens::{self, Issuer};
use crate::upstream::{Change, Origin, Outcome, StatusUpdate, Upstream};

/// Outgoing messages queued per session; a full queue makes the sender wait (flow control).
const SESSION_QUEUE: usize = 64;
/// Initial read and write buffer of a session's control stream (the framing default is 8 KiB
/// each): heartbeats, acknowledgements and statuses are far smaller, and a larger frame grows
/// the buffer. Measured: the two 8 KiB buffers were 16 KiB of an idle edge's cost at cloudcore.
const SESSION_FRAME_BUFFER: usize = 1024;
/// After a session starts, statuses that drifted in the API while the edge was away are
/// written back this much later: first the edge delivers what it learned offline, which
/// replaces the cloud's older truths (`reconcile`).
const DRIFT_SETTLE: Duration = Duration::from_secs(1);
/// Status reports of one session queued for the API at once; more are dropped (the edge
/// reports again), so one edge cannot grow the upstream queue's waiters without bound.
const SESSION_STATUS_BACKLOG: usize = 1024;
/// Token requests of one session waiting for the API at once; more are answered at once with
/// an error (the edge asks again), so one edge cannot queue unbounded API calls.
const SESSION_TOKEN_REQUESTS: usize = 16;
/// Frame limit before a peer has authenticated: a join request is a few KiB, so an anonymous
/// peer cannot make cloudcore buffer a full-size frame.
const UNAUTHENTICATED_MAX_FRAME: usize = 64 * 1024;
/// An edge opens its stream right after the TLS handshake; a connection that has opened none
/// this long after it is closed, freeing its handshake slot.
const FIRST_STREAM_WINDOW: Duration = Duration::from_secs(3);

/// The tunnel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot build the TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration is not usable for QUIC")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("cannot issue the serving certificate")]
    Pki(#[from] pki::PkiError),
    #[error("cannot bind the tunnel on UDP {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid transport setting: {0}")]
    Transport(String),
}

/// A live node session, as seen by the revocation watcher and by a newer session of the node.
#[derive(Debug)]
struct SessionHandle {
    id: u64,
    serial: String,
    connection: Connection,
}

/// State shared by all connection tasks.
#[derive(Debug)]
pub struct Shared {
    pub config: ServeConfig,
    pub registry: Registry,
    pub ca: Arc<ClusterCa>,
    pub metrics: Arc<Metrics>,
    /// Guarded by a std mutex: held only for a map lookup, never across an await.
    pub join_limiter: Mutex<JoinLimiter>,
    /// node name -> its current session. Same locking rule as above.
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_session: AtomicU64,
    /// Who is connected, for the node controller.
    pub presence: Arc<crate::nodes::Presence>,
    /// What each edge should hold; sessions attach to their edge's sync state.
    pub downstream: Arc<Downstream>,
    /// Where edges' status reports go.
    pub upstream: Upstream,
    /// Where edge pods' service-account tokens come from.
    pub tokens: Issuer,
    /// Which API store this is; refuses edges whose state came from another one.
    pub fence: crate::state::Fence,
    /// Replacements between different peer addresses per node. Same locking rule as above.
    conflicts: Mutex<IdentityConflicts>,
    /// Streams to edge pods (logs, exec, attach, port-forward, stats) on sessions' connections.
    pub streams: Arc<crate::streams::Streams>,
    /// Where edges' events go once checked (`crate::events`).
    pub events: crate::events::EdgeEvents,
}

/// A node replaced by a different peer address again within this window is used by two
/// peers at once (a copied data dir), not reconnecting from a new address.
pub const CONFLICT_WINDOW: Duration = Duration::from_secs(600);
/// At most one warning per node this often.
pub const CONFLICT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Two peers with one identity: per node, when a session was last replaced by one from a
/// different address and when that was last warned about. No IO; the hub feeds it.
#[derive(Debug, Default)]
pub struct IdentityConflicts {
    nodes: HashMap<String, ConflictState>,
}

#[derive(Debug, Clone, Copy)]
struct ConflictState {
    last_replaced: std::time::Instant,
    last_warned: Option<std::time::Instant>,
}

/// What one replacement means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// The same address, or the first move to a new one: a reconnection.
    Reconnect,
    /// Peers at different addresses keep replacing each other; `warn` when the node was not
    /// warned about in the last [`CONFLICT_WARN_EVERY`].
    Conflict { warn: bool },
}

impl IdentityConflicts {
    /// Records that `node`'s session from `old` was replaced by one from `new` at `now`.
    pub fn replaced(
        &mut self,
        node: &str,
        old: SocketAddr,
        new: SocketAddr,
        now: std::time::Instant,
    ) -> Replacement {
        if old == new {
            return Replacement::Reconnect;
        }
        let Some(state) = self.nodes.get_mut(node) else {
            self.nodes.insert(
                node.to_string(),
                ConflictState {
                    last_replaced: now,
                    last_warned: None,
                },
            );
            return Replacement::Reconnect;
        };
        let repeated = now.duration_since(state.last_replaced) < CONFLICT_WINDOW;
        state.last_replaced = now;
        if !repeated {
            return Replacement::Reconnect;
        }
        let warn = state
            .last_warned
            .is_none_or(|t| now.duration_since(t) >= CONFLICT_WARN_EVERY);
        if warn {
            state.last_warned = Some(now);
        }
        Replacement::Conflict { warn }
    }
}

impl Shared {
    // Each argument is one part of `serve` built in `run`; a struct would exist only for this.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ServeConfig,
        registry: Registry,
        ca: Arc<ClusterCa>,
        metrics: Arc<Metrics>,
        downstream: Arc<Downstream>,
        upstream: Upstream,
        tokens: Issuer,
        fence: crate::state::Fence,
        streams: Arc<crate::streams::Streams>,
    ) -> Self {
        let join_limiter = Mutex::new(JoinLimiter::new(
            config.join_failure_burst,
            config.join_failure_refill,
        ));
        Shared {
            config,
            registry,
            ca,
            metrics,
            join_limiter,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            presence: Arc::default(),
            downstream,
            upstream,
            tokens,
            conflicts: Mutex::default(),
            streams,
            fence,
            events: crate::events::EdgeEvents::default(),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of nodes with a live session.
    pub fn connected_nodes(&self) -> Vec<String> {
        self.sessions().keys().cloned().collect()
    }

    /// Every live session: node name and session id.
    pub fn connected_sessions(&self) -> Vec<(String, u64)> {
        self.sessions()
            .iter()
            .map(|(node, s)| (node.clone(), s.id))
            .collect()
    }

    /// Closes `node`'s session if it is still session `id`; whether it was.
    pub fn close_session(&self, node: &str, id: u64, reason: &[u8]) -> bool {
        match self.sessions().get(node) {
            Some(s) if s.id == id => {
                s.connection
                    .close(VarInt::from_u32(proto::close_code::NORMAL), reason);
                true
            }
            _ => false,
        }
    }

    /// Closes every session (on shutdown).
    pub fn close_all(&self, reason: &str) {
        for session in self.sessions().values() {
            session
                .connection
                .close(VarInt::from_u32(close_code::SHUTDOWN), reason.as_bytes());
        }
    }
}

/// Binds the QUIC endpoint with the cluster CA's serving certificate.
pub fn endpoint(config: &ServeConfig, ca: &ClusterCa) -> Result<Endpoint, HubError> {
    let provider = pki::crypto_provider();
    // Certificates are optional at the TLS layer so that joins work; a session without one is
    // refused after the handshake.
    let verifier = pki::optional_client_auth(ca)?;
    let (chain, key) = ca.issue_server_certificate(&config.server_sans())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(config.dead_after.try_into().map_err(|_| {
            HubError::Transport(format!("dead-after {:?} is too long", config.dead_after))
        })?))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // One datagram per send call: with segmentation offload each connection keeps a
        // transmit buffer of up to 10 datagrams (~14 KiB, measured ~13 KiB per idle edge),
        // while a gateway's control traffic is small.
        .enable_segmentation_offload(false)
        // What the *edge* may open (its session stream); streams the cloud opens to the edge
        // (`crate::streams`) are limited by the edge's transport config instead.
        .max_concurrent_bidi_streams(VarInt::from_u32(4));
    server.transport_config(Arc::new(transport));
    let socket = bind_udp(config)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| HubError::Transport("no async runtime for the tunnel socket".into()))?;
    Endpoint::new(endpoint_config(ca), Some(server), socket, runtime).map_err(|source| {
        HubError::Bind {
            addr: config.listen,
            source,
        }
    })
}

/// Purposes of the secrets derived from the CA key for the QUIC endpoint.
const RESET_KEY_PURPOSE: &str = "cloudcore quic stateless-reset key v1";
const CID_KEY_PURPOSE: &str = "cloudcore quic connection-id key v1";

/// Stateless resets may go out this often at most: 10,000 a second, so every edge of a large
/// fleet learns within one keep-alive that a restarted cloudcore lost its connection (quinn's
/// default of one per 20 ms would take 200 s for 10,000 edges). A reset is smaller than the
/// packet that caused it, so this amplifies nothing.
const MIN_RESET_INTERVAL: Duration = Duration::from_micros(100);

/// The endpoint's reset key and connection-ID key are derived from the CA key, so they are the
/// same after a restart and on every replica sharing the CA. An edge's next packet on a
/// connection this process (or another replica, once the load balancer moves the flow) does
/// not know is then answered with a stateless reset the edge can verify, and the edge dials
/// again at once instead of waiting out `--dead-after` (30 s by default). With a random key, as
/// quinn's default, a restart left every edge silent until its idle timer ran out, and the
/// whole fleet reconnected in the last seconds of the grace period.
fn endpoint_config(ca: &ClusterCa) -> quinn::EndpointConfig {
    let reset_key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &ca.derived_secret(RESET_KEY_PURPOSE),
    );
    let cid_secret = ca.derived_secret(CID_KEY_PURPOSE);
    let cid_key = u64::from_le_bytes(cid_secret[..8].try_into().expect("8 of 32 bytes"));
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config
        .cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        })
        .min_reset_interval(MIN_RESET_INTERVAL);
    config
}

/// Binds the tunnel's UDP socket with a large receive buffer, so a burst of handshake packets
/// from a reconnecting fleet is queued instead of dropped (each drop costs an edge a ~1 s
/// retransmission).
fn bind_udp(config: &ServeConfig) -> Result<std::net::UdpSocket, HubError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| HubError::Bind {
        addr: config.listen,
        source,
    };
    let socket = Socket::new(
        Domain::for_address(config.listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(bind_err)?;
    if config.listen.is_ipv6() {
        // Accept IPv4-mapped peers too when listening on [::].
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(config.udp_receive_buffer) {
        tracing::warn!(error = %e, "cannot set the tunnel socket's receive buffer");
    }
    // Linux reports twice the usable size it granted.
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < config.udp_receive_buffer {
        tracing::warn!(
            requested = config.udp_receive_buffer,
            granted,
            "the kernel capped the tunnel socket's receive buffer; raise net.core.rmem_max for reconnect storms"
        );
    }
    socket.bind(&config.listen.into()).map_err(bind_err)?;
    Ok(socket.into())
}

/// Accepts connections until cancelled. Handshakes beyond `max_concurrent_handshakes` wait
/// their turn (QUIC keeps their packets), so a reconnect storm is served steadily instead of
/// every handshake timing out at once.
pub async fn accept(
    endpoint: Endpoint,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let handshakes = HandshakeSlots::new(
        shared.config.max_concurrent_handshakes,
        shared.config.max_handshakes_per_address,
    );
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let span = tracing::info_span!("conn", peer.addr = %incoming.remote_address(), node.name = tracing::field::Empty);
        tracker.spawn(
            handle_incoming(
                incoming,
                shared.clone(),
                handshakes.clone(),
                shutdown.clone(),
            )
            .instrument(span),
        );
    }
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    handshakes: HandshakeSlots,
    shutdown: CancellationToken,
) {
    let peer = incoming.remote_address();
    let arrived = tokio::time::Instant::now();
    let permit = match handshakes.acquire(peer.ip()).await {
        Ok(slot) => slot,
        Err(Refusal::SourceBusy) => {
            // Not logged per connection: a flood would flood the log too; the counter shows it.
            shared.metrics.connection_rejected("source_busy");
            incoming.refuse();
            return;
        }
        Err(Refusal::Busy) => {
            // Before any crypto: a connection queued past the edge's dial limit would cost a
            // handshake for an edge that already gave up. The edge waits longer and retries.
            shared.metrics.connection_rejected("busy");
            // An edge at the door is not gone: no node is marked lost meanwhile.
            shared.presence.turned_away();
            incoming.refuse();
            return;
        }
        Err(Refusal::Closed) => return,
    };
    // An edge abandons its dial after `proto::DIAL_LIMIT`, so a handshake is worth its slot
    // only until then, counted from the connection's arrival (the wait for the slot
    // included). Held until `handshake_timeout` instead, the slots of a restarted cloudcore
    // filled with handshakes of edges long gone, and no session started for 20 s of a storm.
    let limit = shared.config.handshake_timeout.min(proto::DIAL_LIMIT);
    let Some(left) = limit
        .checked_sub(arrived.elapsed())
        .filter(|left| !left.is_zero())
    else {
        shared.metrics.connection_rejected("abandoned");
        incoming.refuse();
        return;
    };
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "could not accept connection");
            return;
        }
    };
    let connection = match tokio::time::timeout(left, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared.metrics.connection_rejected("tls_handshake");
            tracing::info!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.connection_rejected("handshake_timeout");
            tracing::info!("TLS handshake timed out");
            return;
        }
    };
    match peer_certificate(&connection) {
        None => serve_join(connection, shared, peer).await,
        Some(cert) => serve_node(connection, cert, shared, peer, permit, shutdown).await,
    }
}

fn peer_certificate(connection: &Connection) -> Option<CertificateDer<'static>> {
    connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

type Reader = FrameReader<RecvStream>;
type Writer = FrameWriter<SendStream>;

/// Accepts the edge's stream and reads its first message, within the handshake timeout.
async fn open_stream(
    connection: &Connection,
    shared: &Shared,
    max: usize,
) -> Result<(Reader, Writer, Message), Rejection> {
    let deadline = shared.config.handshake_timeout;
    let window = FIRST_STREAM_WINDOW.min(deadline);
    let (send, recv) = match tokio::time::timeout(window, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return Err(Rejection::Gone(e.to_string())),
        Err(_) => return Err(Rejection::NoStream),
    };
    let mut reader = FrameReader::with_capacity(recv, max, SESSION_FRAME_BUFFER);
    let writer = FrameWriter::with_capacity(send, max, SESSION_FRAME_BUFFER);
    match tokio::time::timeout(deadline, reader.next()).await {
        Ok(Ok(Some(first))) => Ok((reader, writer, first)),
        Ok(Ok(None)) => Err(Rejection::Gone(
            "stream finished before the first message".into(),
        )),
        Ok(Err(e)) => Err(Rejection::Frame(e, writer)),
        Err(_) => Err(Rejection::Timeout),
    }
}

/// Why a connection ended before its session started.
enum Rejection {
    Gone(String),
    /// No stream opened within [`FIRST_STREAM_WINDOW`] of the TLS handshake.
    NoStream,
    Timeout,
    Frame(FrameError, Writer),
}

impl Rejection {
    async fn report(self, connection: &Connection, shared: &Shared) {
        match self {
            Rejection::Gone(why) => {
                tracing::info!("connection ended before its first message: {why}")
            }
            Rejection::NoStream => {
                shared.metrics.connection_rejected("no_stream");
                tracing::info!(
                    "no stream opened within {} s of the handshake",
                    FIRST_STREAM_WINDOW.as_secs()
                );
                connection.close(
                    VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
                    b"no stream opened",
                );
            }
            Rejection::Timeout => {
                shared.metrics.connection_rejected("handshake_timeout");
                tracing::info!("no first message within the handshake timeout");
                connection.close(
                    VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
                    b"handshake timeout",
                );
            }
            Rejection::Frame(e, mut writer) => {
                protocol_violation(connection, &mut writer, shared, &e).await
            }
        }
    }
}

/// Logs, counts, tells the peer (best effort) and closes.
async fn protocol_violation(
    connection: &Connection,
    writer: &mut Writer,
    shared: &Shared,
    e: &FrameError,
) {
    let reason = e.reason();
    shared.metrics.protocol_error(reason);
    let detail = match source_text(e) {
        s if s.is_empty() => e.to_string(),
        s => format!("{e}: {s}"),
    };
    tracing::warn!(reason, "closing connection: {detail}");
    // Within 200 ms: send the error, finish the stream and let the peer read it (closing at
    // once would discard it unsent, and an edge whose Hello was refused would not see why).
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        let _ = writer
            .send(Message::error(ErrorCode::ProtocolViolation, detail))
            .await;
        let _ = writer.get_mut().finish();
        connection.closed().await;
    })
    .await;
    connection.close(
        VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
        reason.as_bytes(),
    );
}

/// Sends an error, then closes once the peer had a chance to read it.
async fn refuse(
    connection: &Connection,
    writer: &mut Writer,
    code: u32,
    error: Message,
    reason: &str,
) {
    let _ = writer.send(error).await;
    let _ = writer.get_mut().finish();
    // Give the peer a moment to read the error before the close discards unread data.
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
    connection.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn serve_join(connection: Connection, shared: Arc<Shared>, peer: SocketAddr) {
    let max = UNAUTHENTICATED_MAX_FRAME.min(shared.config.max_frame_size);
    let (_reader, mut writer, first) = match open_stream(&connection, &shared, max).await {
        Ok(s) => s,
        Err(rejection) => return rejection.report(&connection, &shared).await,
    };
    let Message::JoinRequest(request) = first else {
        shared.metrics.connection_rejected("no_client_certificate");
        tracing::warn!(
            message = first.kind(),
            "refusing a session without a client certificate"
        );
        let error = Message::error(
            ErrorCode::Unauthenticated,
            "this connection has no client certificate; only a join is allowed",
        );
        return refuse(
            &connection,
            &mut writer,
            close_code::UNAUTHENTICATED,
            error,
            "no client certificate",
        )
        .await;
    };
    let reply = join::admit(shared.clone(), request, peer.ip()).await;
    let _ = writer.send(reply).await;
    let _ = writer.get_mut().finish();
    // The edge closes once it has the reply; don't hold the connection longer than that.
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    connection.close(VarInt::from_u32(close_code::NORMAL), b"join complete");
}

async fn serve_node(
    connection: Connection,
    cert: CertificateDer<'static>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    permit: Slot,
    shutdown: CancellationToken,
) {
    let identity = match pki::node_identity(&cert) {
        Ok(identity) => identity,
        Err(e) => {
            shared.metrics.connection_rejected("not_a_node_certificate");
            tracing::warn!(error = %e, "refusing client certificate");
            connection.close(
                VarInt::from_u32(close_code::UNAUTHENTICATED),
                b"not a node certificate",
            );
            return;
        }
    };
    tracing::Span::current().record("node.name", identity.node_name.as_str());
    let (reader, mut writer, first) =
        match open_stream(&connection, &shared, shared.config.max_frame_size).await {
            Ok(s) => s,
            Err(rejection) => return rejection.report(&connection, &shared).await,
        };
    let Message::Hello(hello) = first else {
        shared.metrics.protocol_error("expected_hello");
        tracing::warn!(message = first.kind(), "first message was not hello");
        let error = Message::error(
            ErrorCode::ProtocolViolation,
            format!("expected hello, got {}", first.kind()),
        );
        return refuse(
            &connection,
            &mut writer,
            close_code::PROTOCOL_VIOLATION,
            error,
            "expected hello",
        )
        .await;
    };
    if !hello.version.is_supported() {
        shared.metrics.connection_rejected("unsupported_version");
        let text = format!(
            "protocol version {} is not supported by this cloudcore (it speaks {})",
            hello.version,
            proto::PROTOCOL_VERSION
        );
        tracing::warn!(version = %hello.version, "refusing session: {text}");
        let error = Message::error(ErrorCode::UnsupportedVersion, text);
        return refuse(
            &connection,
            &mut writer,
            close_code::UNSUPPORTED_VERSION,
            error,
            "unsupported protocol version",
        )
        .await;
    }
    let status = {
        let shared = shared.clone();
        let serial = identity.serial.clone();
        tokio::task::spawn_blocking(move || shared.registry.certificate_status(&serial)).await
    };
    let refusal = match status {
        Ok(Ok(CertificateStatus::Valid)) => None,
        Ok(Ok(CertificateStatus::Revoked)) => Some((
            "revoked",
            close_code::REVOKED,
            ErrorCode::NodeRevoked,
            format!(
                "the certificate of node {} was revoked; join again with a new token",
                identity.node_name
            ),
        )),
        Ok(Ok(CertificateStatus::Unknown)) => Some((
            "unknown_certificate",
            close_code::UNAUTHENTICATED,
            ErrorCode::Unauthenticated,
            "this cloudcore has no record of the certificate; join again with a new token"
                .to_string(),
        )),
        Ok(Err(e)) => {
            tracing::error!(error = %e, cause = %source_text(&e), "cannot check certificate status");
            Some((
                "internal",
                close_code::UNAUTHENTICATED,
                ErrorCode::Internal,
                "cloudcore cannot check the certificate now; retry later".into(),
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "certificate status task failed");
            Some((
                "internal",
                close_code::UNAUTHENTICATED,
                ErrorCode::Internal,
                "cloudcore cannot check the certificate now; retry later".into(),
            ))
        }
    };
    if let Some((reason, code, error_code, text)) = refusal {
        shared.metrics.connection_rejected(reason);
        tracing::warn!(reason, "refusing session: {text}");
        return refuse(
            &connection,
            &mut writer,
            code,
            Message::error(error_code, text),
            reason,
        )
        .await;
    }

    // The edge's state must come from this store: a replaced store or one that went back in
    // time would have its resync delete or freeze what the edge runs.
    let node = identity.node_name.clone();
    let checked = match shared
        .fence
        .check(&hello.cloud_state_id, &hello.inventory)
        .await
    {
        Ok(checked) => checked,
        Err(e) => {
            shared.metrics.connection_rejected("state_unknown");
            tracing::warn!(error = %e, cause = %source_text(&e), "cannot check the edge against the API store");
            return refuse(
                &connection,
                &mut writer,
                close_code::STATE_MISMATCH,
                Message::error(
                    ErrorCode::Internal,
                    "cloudcore cannot read its API store now; retry later",
                ),
                "state unknown",
            )
            .await;
        }
    };
    let resync = match &checked.mismatch {
        None => Resync::Incremental,
        Some(mismatch) => {
            let adopted = {
                let shared = shared.clone();
                let node = node.clone();
                tokio::task::spawn_blocking(move || shared.registry.take_adoption(&node)).await
            };
            match adopted {
                Ok(Ok(true)) => {
                    tracing::warn!(
                        store.id = %checked.state.id,
                        "an operator adopted this API store for the edge (`cloudcore store adopt`): replacing whatever differs: {mismatch}"
                    );
                    Resync::Replace
                }
                other => {
                    if let Ok(Err(e)) = other {
                        tracing::warn!(error = %e, "cannot read adoptions");
                    }
                    let text = format!(
                        "{mismatch}. The cloud sends this node nothing and its pods keep running from its local store. To accept this API store for the node, run `cloudcore store adopt --node {node}`; to go back, restore the store from a backup with `cloudcore store restore` (docs/operations.md)"
                    );
                    shared.metrics.connection_rejected("state_mismatch");
                    shared.fence.fenced(&node, &text);
                    return refuse(
                        &connection,
                        &mut writer,
                        close_code::STATE_MISMATCH,
                        Message::error(ErrorCode::StateMismatch, text),
                        "state mismatch",
                    )
                    .await;
                }
            }
        }
    };
    shared.fence.cleared(&node);

    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    // Balanced by `session_ended` below, whatever becomes of the session.
    let resend_status = shared
        .upstream
        .session_started(&identity.node_name, DRIFT_SETTLE);
    let ack = Message::HelloAck(HelloAck {
        version: proto::PROTOCOL_VERSION,
        node_name: identity.node_name.clone(),
        heartbeat_interval_ms: shared.config.heartbeat_interval.as_millis() as u64,
        dead_after_ms: shared.config.dead_after.as_millis() as u64,
        resend_status,
        cloud_state_id: checked.state.id.clone(),
        cloud_revision: checked.state.revision,
        adopt_state: resync == Resync::Replace,
    });
    if let Err(e) = writer.send(ack).await {
        tracing::info!(error = %e, "connection lost before the session started");
        shared.upstream.session_ended(&identity.node_name);
        return;
    }
    let replaced = shared.sessions().insert(
        identity.node_name.clone(),
        SessionHandle {
            id: session_id,
            serial: identity.serial.clone(),
            connection: connection.clone(),
        },
    );
    if let Some(old) = replaced {
        let (from, to) = (old.connection.remote_address(), connection.remote_address());
        tracing::info!(old.addr = %from, "closing the node's previous session");
        let verdict = shared
            .conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replaced(&identity.node_name, from, to, std::time::Instant::now());
        if let Replacement::Conflict { warn } = verdict {
            shared.metrics.identity_conflicts.inc();
            if warn {
                tracing::warn!(
                    old.addr = %from,
                    new.addr = %to,
                    "two peers are using this node's identity and keep replacing each other's session (a copied data dir?); stop one, or revoke the node and join the other under its own name"
                );
            }
        }
        old.connection.close(
            VarInt::from_u32(close_code::REPLACED),
            b"replaced by a newer session",
        );
    }
    drop(permit);
    // In the background, after the slot is freed: the mark is a registry write (an fsync per
    // commit, one connection), and neither a storm's handshakes nor the session's presence (which
    // keeps the node Ready) may queue behind thousands of them. Awaited before the session's
    // own disconnect mark, so the two stay in order.
    let marked = {
        let shared = shared.clone();
        let name = identity.node_name.clone();
        let address = peer.to_string();
        tokio::spawn(async move {
            let registry = shared.clone();
            let reconnect = tokio::task::spawn_blocking(move || {
                registry.registry.mark_connected(&name, &address)
            })
            .await;
            match reconnect {
                Ok(Ok(true)) => {
                    shared.metrics.reconnects.inc();
                }
                Ok(Ok(false)) | Err(_) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, cause = %source_text(&e), "cannot record connection");
                }
            }
        }.in_current_span())
    };
    // Streams to this node's pods go on this connection from now on.
    shared.streams.connected(
        &identity.node_name,
        session_id,
        connection.clone(),
        hello.version,
    );
    shared.metrics.connected_edges.inc();
    // What the session does not need is not kept in this task for its lifetime: the node
    // info goes to the presence record, the inventory to the session.
    let proto::Hello {
        node_info,
        inventory,
        ..
    } = hello;
    let labels = {
        let shared = shared.clone();
        let name = identity.node_name.clone();
        tokio::task::spawn_blocking(move || shared.registry.node_labels(&name))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    tracing::info!(
        hostname = %node_info.hostname,
        arch = %node_info.arch,
        edgecore.version = %node_info.edgecore_version,
        "edge connected"
    );
    shared.presence.connected(
        &identity.node_name,
        node_info,
        peer.ip().to_string(),
        labels,
    );

    let ended = run_session(
        &connection,
        &identity,
        inventory,
        resync,
        reader,
        writer,
        &shared,
        &shutdown,
    )
    .await;
    tracing::info!("edge disconnected: {ended}");
    shared.streams.disconnected(&identity.node_name, session_id);

    shared.metrics.connected_edges.dec();
    shared.upstream.session_ended(&identity.node_name);
    let still_ours = {
        let mut sessions = shared.sessions();
        match sessions.get(&identity.node_name) {
            Some(s) if s.id == session_id => {
                sessions.remove(&identity.node_name);
                true
            }
            _ => false,
        }
    };
    let _ = marked.await;
    if still_ours {
        shared.presence.disconnected(&identity.node_name);
        let shared = shared.clone();
        let name = identity.node_name.clone();
        let _ = tokio::task::spawn_blocking(move || shared.registry.mark_disconnected(&name)).await;
    }
}

/// Reads the edge's messages until the session ends; returns why it ended.
// The session's parts, each from `serve_node`; a struct would exist only for this call.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    connection: &Connection,
    identity: &NodeIdentity,
    inventory: Vec<HeldObject>,
    resync: Resync,
    mut reader: Reader,
    mut writer: Writer,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> String {
    // The writer task owns the send stream; everything that talks to the edge goes through
    // this bounded queue, so a slow edge holds back its own pump and nothing else.
    // Boxed: tokio allocates a queue's slots 32 at a time, and a `Message` is over 200
    // bytes, so unboxed the first block alone was ~7 KiB of every idle session.
    let (tx, mut rx) = mpsc::channel::<Box<Message>>(SESSION_QUEUE);
    let writer_task = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            writer.send(*message).await?;
        }
        Ok::<_, FrameError>(writer)
    });
    // The pump attaches to the edge's sync state (after the cache is complete and a resync
    // slot is free) and moves its messages into the queue until the session ends.
    let attached: Arc<OnceLock<SessionRef>> = Arc::default();
    let status_backlog = Arc::new(Semaphore::new(SESSION_STATUS_BACKLOG));
    let token_requests = Arc::new(Semaphore::new(SESSION_TOKEN_REQUESTS));
    let pump_cancel = shutdown.child_token();
    let pump = {
        let downstream = shared.downstream.clone();
        let (tx, cancel, attached) = (tx.clone(), pump_cancel.clone(), attached.clone());
        let node = identity.node_name.clone();
        tokio::spawn(
            async move {
                let attachment = tokio::select! {
                    _ = cancel.cancelled() => return None,
                    a = downstream.attach(&node, inventory, resync) => a,
                };
                let _ = attached.set(attachment.session_ref());
                let attachment = downstream.pump(attachment, tx, cancel).await;
                downstream.detach(&attachment.session_ref());
                Some(())
            }
            .in_current_span(),
        )
    };
    let dead_after = shared.config.dead_after;
    let ended = loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => {
                connection.close(VarInt::from_u32(close_code::SHUTDOWN), b"cloudcore shutting down");
                break "cloudcore shutting down".to_string();
            }
            next = tokio::time::timeout(dead_after, reader.next()) => next,
        };
        let message = match next {
            Err(_) => {
                connection.close(
                    VarInt::from_u32(close_code::HEARTBEAT_TIMEOUT),
                    b"heartbeat timeout",
                );
                break format!(
                    "nothing heard for {}",
                    humantime::format_duration(dead_after)
                );
            }
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => {
                connection.close(VarInt::from_u32(close_code::NORMAL), b"stream finished");
                break "edge finished its stream".to_string();
            }
            Ok(Err(e)) => {
                if let Some(reason) = connection.close_reason() {
                    break reason.to_string();
                }
                let mut writer = match abort_writer(writer_task, tx).await {
                    Some(w) => w,
                    None => {
                        connection.close(
                            VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
                            e.reason().as_bytes(),
                        );
                        shared.metrics.protocol_error(e.reason());
                        tracing::warn!(reason = e.reason(), "closing connection: {e}");
                        return format!("protocol violation: {e}");
                    }
                };
                protocol_violation(connection, &mut writer, shared, &e).await;
                return format!("protocol violation: {e}");
            }
        };
        match message {
            Message::Heartbeat { seq } => {
                let _ = tx.send(Box::new(Message::Heartbeat { seq })).await;
            }
            Message::RenewRequest { csr_der } => {
                let reply = renew(shared, identity, csr_der).await;
                let _ = tx.send(Box::new(reply)).await;
            }
            Message::Error(e) => {
                tracing::warn!(code = %e.code, "edge reported an error: {}", e.message)
            }
            Message::Ack { seqs } => {
                let refused = match attached.get() {
                    Some(session) => shared.downstream.acknowledge(session, &seqs),
                    None => seqs.len(),
                };
                if refused > 0 {
                    for _ in 0..refused {
                        shared.metrics.sync.refused("ack_never_sent");
                    }
                    tracing::warn!(refused, "edge acknowledged messages never sent to it");
                    let _ = tx
                        .send(Box::new(Message::error(
                            ErrorCode::ProtocolViolation,
                            format!(
                                "{refused} acknowledged seq(s) were never sent in this session"
                            ),
                        )))
                        .await;
                }
            }
            Message::Request(object) => {
                let key = ObjectKey::of(&object);
                let allowed = attached
                    .get()
                    .is_some_and(|session| shared.downstream.request(session, &key));
                if !allowed {
                    shared.metrics.sync.refused("request_forbidden");
                    tracing::warn!(object = %key, "refusing a request for an object the node may not see");
                    let _ = tx
                        .send(Box::new(Message::error(
                            ErrorCode::Forbidden,
                            format!(
                                "node {} may not read {key}: no pod bound to it references it",
                                identity.node_name
                            ),
                        )))
                        .await;
                }
            }
            Message::PodDeleted { seq, object } => {
                if let Some(error) = submit_pod_deleted(
                    shared,
                    &identity.node_name,
                    seq,
                    object,
                    &tx,
                    &status_backlog,
                ) {
                    let _ = tx.send(Box::new(error)).await;
                }
            }
            Message::Status(report) => {
                if let Some(error) =
                    submit_status(shared, &identity.node_name, report, &tx, &status_backlog)
                {
                    let _ = tx.send(Box::new(error)).await;
                }
            }
            Message::Events(events) => {
                // Best effort and never answered: refusals are counted and logged only.
                shared.events.submit(
                    &shared.downstream,
                    &shared.metrics.events,
                    &identity.node_name,
                    events,
                );
            }
            Message::TokenRequest(request) => {
                if let Some(refusal) =
                    submit_token_request(shared, &identity.node_name, request, &tx, &token_requests)
                {
                    let _ = tx.send(Box::new(Message::TokenResponse(refusal))).await;
                }
            }
            other => {
                let kind = other.kind();
                shared.metrics.protocol_error("unexpected_message");
                tracing::warn!(
                    message = kind,
                    "closing connection: edge sent a message only the cloud may send"
                );
                let _ = tx
                    .send(Box::new(Message::error(
                        ErrorCode::ProtocolViolation,
                        format!("{kind} is not allowed from an edge"),
                    )))
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                connection.close(
                    VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
                    b"unexpected message",
                );
                break format!("protocol violation: unexpected {kind}");
            }
        }
    };
    pump_cancel.cancel();
    let _ = pump.await;
    drop(tx);
    ended
}

/// Checks that the node may report this status, then queues it for the API; the edge gets an
/// `Ack` for its seq once it is written (or found stale or gone). Returns the error to send
/// when refused.
fn submit_status(
    shared: &Arc<Shared>,
    node: &str,
    report: StatusReport,
    tx: &mpsc::Sender<Box<Message>>,
    backlog: &Arc<Semaphore>,
) -> Option<Message> {
    let Ok(permit) = backlog.clone().try_acquire_owned() else {
        shared.metrics.sync.refused("status_backlog");
        tracing::warn!("too many status reports queued for this edge; dropped one");
        return None;
    };
    let key = ObjectKey::of(&report.object);
    let Some(uid) = shared.downstream.reportable_uid(node, &key) else {
        shared.metrics.sync.refused("status_forbidden");
        tracing::warn!(object = %key, "refusing a status report for an object not bound to the node");
        return Some(Message::error(
            ErrorCode::Forbidden,
            format!("node {node} may not report status for {key}"),
        ));
    };
    if !report.object.uid.is_empty() && !uid.is_empty() && report.object.uid != uid {
        shared.metrics.sync.refused("status_uid_mismatch");
        tracing::warn!(object = %key, reported = %report.object.uid, current = %uid, "refusing a status report for another incarnation of the object");
        return Some(Message::error(
            ErrorCode::Forbidden,
            format!(
                "status for {key} uid {} refused: the bound object has uid {uid}",
                report.object.uid
            ),
        ));
    }
    let status: serde_json::Value = match serde_json::from_slice(&report.status) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        Ok(_) => {
            shared.metrics.sync.refused("status_malformed");
            return Some(Message::error(
                ErrorCode::ProtocolViolation,
                format!("status for {key} is not a JSON object"),
            ));
        }
        Err(e) => {
            shared.metrics.sync.refused("status_malformed");
            return Some(Message::error(
                ErrorCode::ProtocolViolation,
                format!("status for {key} is not JSON: {e}"),
            ));
        }
    };
    let mut object = report.object;
    if object.uid.is_empty() {
        object.uid = uid;
    }
    let update = StatusUpdate {
        node: node.to_string(),
        object,
        generation: report.generation,
        change: Change::Status(status),
        origin: Origin::Edge,
    };
    queue_upstream(shared, update, report.seq, key, tx, permit);
    None
}

/// Checks that the node may delete this pod (bound to it, same uid), then queues the deletion;
/// returns the error to send when refused.
fn submit_pod_deleted(
    shared: &Arc<Shared>,
    node: &str,
    seq: u64,
    mut object: proto::ObjectRef,
    tx: &mpsc::Sender<Box<Message>>,
    backlog: &Arc<Semaphore>,
) -> Option<Message> {
    let key = ObjectKey::of(&object);
    let uid = (key.kind == "Pod")
        .then(|| shared.downstream.reportable_uid(node, &key))
        .flatten();
    let Some(uid) = uid.filter(|uid| object.uid.is_empty() || *uid == object.uid) else {
        shared.metrics.sync.refused("delete_forbidden");
        tracing::warn!(object = %key, "refusing to delete a pod not bound to the node");
        return Some(Message::error(
            ErrorCode::Forbidden,
            format!("node {node} may not delete {key}"),
        ));
    };
    let Ok(permit) = backlog.clone().try_acquire_owned() else {
        shared.metrics.sync.refused("status_backlog");
        return None;
    };
    object.uid = uid;
    let update = StatusUpdate {
        node: node.to_string(),
        object,
        // After every status report of the pod: a deletion replaces any queued status.
        generation: u64::MAX,
        change: Change::Delete,
        origin: Origin::Edge,
    };
    queue_upstream(shared, update, seq, key, tx, permit);
    None
}

/// Checks that the node may have this token (`tokens::authorize`), then asks the API for it
/// on a task of its own; the answer goes back as a `TokenResponse`. Returns the response to
/// send at once when refused.
fn submit_token_request(
    shared: &Arc<Shared>,
    node: &str,
    request: proto::TokenRequest,
    tx: &mpsc::Sender<Box<Message>>,
    in_flight: &Arc<Semaphore>,
) -> Option<TokenResponse> {
    let refuse = |code: ErrorCode, message: String| {
        Some(TokenResponse {
            request_id: request.request_id,
            result: Err(proto::ErrorMessage { code, message }),
        })
    };
    let pod = format!("{}/{}", request.pod.namespace, request.pod.name);
    let bound = shared
        .downstream
        .bound_pod(node, &request.pod.namespace, &request.pod.name);
    if let Err(refusal) = tokens::authorize(node, &request, bound.as_ref()) {
        shared.metrics.tokens.refused(refusal.reason());
        tracing::warn!(%pod, reason = refusal.reason(), "refusing a service-account token: {refusal}");
        return refuse(ErrorCode::Forbidden, refusal.to_string());
    }
    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
        shared.metrics.tokens.refused("busy");
        return refuse(
            ErrorCode::RateLimited,
            format!(
                "{SESSION_TOKEN_REQUESTS} token requests of this node are already waiting for the API; ask again"
            ),
        );
    };
    let (shared, tx) = (shared.clone(), tx.clone());
    tokio::spawn(
        async move {
            let _permit = permit;
            let result = shared.tokens.issue(&request).await;
            match &result {
                Ok(issued) => {
                    shared.metrics.tokens.issued.inc();
                    tracing::info!(%pod, service_account = %request.service_account, lifetime_s = issued.lifetime_seconds, "issued a service-account token");
                }
                Err(e) if e.code == ErrorCode::NotSupported => {
                    shared.metrics.tokens.refused("not_supported");
                    tracing::warn!(%pod, "refusing a service-account token: {}", e.message);
                }
                Err(e) => {
                    shared.metrics.tokens.refused("api_error");
                    tracing::warn!(%pod, "no service-account token: {}", e.message);
                }
            }
            let response = TokenResponse {
                request_id: request.request_id,
                result,
            };
            let _ = tx.send(Box::new(Message::TokenResponse(response))).await;
        }
        .in_current_span(),
    );
    None
}

/// Queues an update for the API; the edge gets an `Ack` for `seq` once it is done.
fn queue_upstream(
    shared: &Arc<Shared>,
    update: StatusUpdate,
    seq: u64,
    key: ObjectKey,
    tx: &mpsc::Sender<Box<Message>>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    match shared.upstream.submit(update) {
        Ok(done) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match done.await {
                    // The Node object is created when the edge connects; its first report
                    // may come first. No ack: the edge reports again shortly.
                    Ok(Outcome::Gone) if key.kind == "Node" => {
                        tracing::debug!("node status before the Node exists; not acknowledged")
                    }
                    Ok(Outcome::Failed(why)) => {
                        tracing::warn!(object = %key, "status not written; the edge will report again: {why}")
                    }
                    Ok(_) => {
                        let _ = tx.send(Box::new(Message::Ack { seqs: vec![seq] })).await;
                    }
                    Err(_) => {}
                }
            });
        }
        Err(_) => {
            tracing::warn!(object = %key, "status queue full; the edge will report again");
        }
    }
}

/// Stops the writer task and takes its stream back, to send a last error on it.
async fn abort_writer(
    task: tokio::task::JoinHandle<Result<Writer, FrameError>>,
    tx: mpsc::Sender<Box<Message>>,
) -> Option<Writer> {
    drop(tx);
    match tokio::time::timeout(Duration::from_millis(200), task).await {
        Ok(Ok(Ok(writer))) => Some(writer),
        _ => None,
    }
}

async fn renew(shared: &Arc<Shared>, identity: &NodeIdentity, csr_der: Vec<u8>) -> Message {
    let worker = shared.clone();
    let name = identity.node_name.clone();
    let serial = identity.serial.clone();
    let result = tokio::task::spawn_blocking(move || {
        crate::pki::check_csr(&csr_der)
            .map_err(|e| (ErrorCode::CsrInvalid, format!("{e}: {}", source_text(&e))))?;
        let ca = worker.ca.clone();
        let lifetime = worker.config.cert_lifetime;
        match worker.registry.renew_certificate(&name, &serial, || {
            ca.sign_node_csr(&csr_der, &name, lifetime)
        }) {
            Ok(Ok(issued)) => Ok(issued),
            Ok(Err(refusal)) => {
                let code = match refusal {
                    crate::registry::RenewalRefusal::Revoked => ErrorCode::NodeRevoked,
                    crate::registry::RenewalRefusal::UnknownCertificate => {
                        ErrorCode::Unauthenticated
                    }
                    crate::registry::RenewalRefusal::TooEarly { .. } => {
                        ErrorCode::ProtocolViolation
                    }
                };
                Err((code, format!("renewal refused: {refusal}")))
            }
            Err(e) => Err((ErrorCode::Internal, format!("{e}: {}", source_text(&e)))),
        }
    })
    .await;
    match result {
        Ok(Ok(issued)) => {
            shared.metrics.certificate_renewals.inc();
            tracing::info!(serial = %issued.serial, not_after = %issued.not_after, "renewed node certificate");
            Message::RenewResponse {
                certificate_der: issued.der,
            }
        }
        Ok(Err((code, text))) => {
            tracing::warn!(%code, "{text}");
            Message::error(code, text)
        }
        Err(e) => Message::error(ErrorCode::Internal, format!("renewal failed: {e}")),
    }
}

/// Closes live sessions whose certificate the CLI revoked, within one poll interval.
pub async fn watch_revocations(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut seen = None;
    let mut tick = tokio::time::interval(shared.config.revocation_poll);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let worker = shared.clone();
        let Ok(Ok(version)) =
            tokio::task::spawn_blocking(move || worker.registry.data_version()).await
        else {
            continue;
        };
        if seen == Some(version) {
            continue;
        }
        seen = Some(version);
        let worker = shared.clone();
        let Ok(Ok(revoked)) =
            tokio::task::spawn_blocking(move || worker.registry.revoked_serials()).await
        else {
            continue;
        };
        for (name, session) in shared.sessions().iter() {
            if revoked.contains(&session.serial) {
                tracing::warn!(node.name = %name, "certificate revoked: closing the live session");
                shared.metrics.revocation_closes.inc();
                session.connection.close(
                    VarInt::from_u32(close_code::REVOKED),
                    b"node certificate revoked",
                );
            }
        }
    }
}

/// Records that `serve` is alive and which nodes it saw, every few seconds.
pub async fn heartbeat_registry(shared: Arc<Shared>, shutdown: CancellationToken, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let worker = shared.clone();
        let seen = shared.connected_nodes();
        match tokio::task::spawn_blocking(move || worker.registry.server_heartbeat(&seen)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, cause = %source_text(&e), "cannot record heartbeat")
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client of `endpoint` that trusts `ca` and sends a keep-alive every 50 ms.
    fn test_client(ca: &ClusterCa) -> (Endpoint, quinn::ClientConfig) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).expect("CA root");
        let mut tls = rustls::ClientConfig::builder_with_provider(pki::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![proto::ALPN.to_vec()];
        let mut client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS"),
        ));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_millis(50)))
            .max_idle_timeout(Some(Duration::from_secs(20).try_into().expect("idle")));
        client.transport_config(Arc::new(transport));
        let endpoint = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        (endpoint, client)
    }

    /// The cloud's endpoint in a runtime of its own, so that dropping the runtime ends it the
    /// way kill -9 does: no CONNECTION_CLOSE goes out, the socket just closes.
    fn cloud_in_own_runtime(
        config: &ServeConfig,
        ca: &ClusterCa,
    ) -> (tokio::runtime::Runtime, SocketAddr) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = {
            let _in_it = rt.enter();
            endpoint(config, ca).expect("endpoint")
        };
        let addr = server.local_addr().expect("addr");
        rt.spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = server.accept().await {
                if let Ok(conn) = incoming.await {
                    held.push(conn);
                }
            }
        });
        (rt, addr)
    }

    /// Ends a runtime from [`cloud_in_own_runtime`] and waits until its socket is closed.
    async fn kill(rt: tokio::runtime::Runtime) {
        tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(5)))
            .await
            .expect("runtime shut down");
    }

    /// A cloud with a fresh CA in `dir`, an edge connected to it, and then the cloud killed:
    /// the config to start another on the same port, the edge's endpoint and connection.
    struct Killed {
        config: ServeConfig,
        addr: SocketAddr,
        client: Endpoint,
        client_config: quinn::ClientConfig,
        conn: Connection,
    }

    async fn connect_then_kill_the_cloud(dir: &std::path::Path) -> Killed {
        let ca = ClusterCa::load_or_create(dir).expect("CA");
        let mut config = ServeConfig::new(dir.to_path_buf());
        config.listen = "127.0.0.1:0".parse().expect("addr");
        let (first, addr) = cloud_in_own_runtime(&config, &ca);
        let (client, client_config) = test_client(&ca);
        let conn = client
            .connect_with(client_config.clone(), addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        kill(first).await;
        config.listen = addr;
        Killed {
            config,
            addr,
            client,
            client_config,
            conn,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_cloud_resets_the_old_connections_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let killed = connect_then_kill_the_cloud(dir.path()).await;
        // The new process on the same port with the same CA (reloaded).
        let reloaded = ClusterCa::load_or_create(dir.path()).expect("CA again");
        let (second, _) = cloud_in_own_runtime(&killed.config, &reloaded);
        let started = std::time::Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(10), killed.conn.closed())
            .await
            .expect("the old connection ends well before its 20 s idle timeout");
        assert!(
            matches!(why, quinn::ConnectionError::Reset),
            "ended by a stateless reset, not {why:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // And the edge can connect again to the new process.
        killed
            .client
            .connect_with(killed.client_config, killed.addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake with the restarted cloud");
        kill(second).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cloud_with_another_ca_cannot_reset_the_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let killed = connect_then_kill_the_cloud(dir.path()).await;
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = ClusterCa::load_or_create(other_dir.path()).expect("other CA");
        let (second, _) = cloud_in_own_runtime(&killed.config, &other);
        // Its connection-ID key differs, so it drops the edge's packets as not its own (and a
        // reset from it would carry a token the client cannot verify): the connection is
        // still up a second later, until its own idle timeout.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            killed.conn.close_reason().is_none(),
            "ended by {:?}",
            killed.conn.close_reason()
        );
        kill(second).await;
    }

    #[test]
    fn peers_at_two_addresses_replacing_each_other_are_a_conflict_warned_once_a_minute() {
        let a: SocketAddr = "10.0.0.1:4000".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:4000".parse().expect("addr");
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = IdentityConflicts::default();
        assert_eq!(c.replaced("n", a, a, at(0)), Replacement::Reconnect);
        // A gateway moving to a new address once is a reconnection.
        assert_eq!(c.replaced("n", a, b, at(1)), Replacement::Reconnect);
        assert_eq!(
            c.replaced("n", b, a, at(2)),
            Replacement::Conflict { warn: true }
        );
        assert_eq!(
            c.replaced("n", a, b, at(3)),
            Replacement::Conflict { warn: false }
        );
        assert_eq!(
            c.replaced("n", b, a, at(63)),
            Replacement::Conflict { warn: true }
        );
        // Other nodes are counted on their own; a move long after the last one is not one.
        assert_eq!(c.replaced("m", a, b, at(63)), Replacement::Reconnect);
        assert_eq!(c.replaced("m", b, a, at(63 + 601)), Replacement::Reconnect);
    }
}
