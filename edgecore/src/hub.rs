//! The edge end of the tunnel: connect, hello (with the store's inventory), heartbeats,
//! certificate renewal, object messages into the [`Replica`] with acknowledgements after the
//! commit, node status upstream, and reconnects with jittered backoff. Works only with the
//! files `edgecore join` wrote.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proto::{
    ErrorCode, ErrorMessage, FrameError, FrameReader, FrameWriter, HeldObject, Hello, HelloAck,
    Message, ObjectRef, PROTOCOL_VERSION, TokenResponse, close_code,
};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::dial::{self, DialError};
use crate::identity::{self, Identity, IdentityError};
use crate::join::new_key_and_csr;
use crate::metrics::Metrics;
use crate::node::{self, Reporter};
use crate::outbox::{Outbox, Report};
use crate::replica::Replica;
use crate::tls::{self, TlsError};
use crate::tokens::Tokens;

/// A session that lasted at least this long resets the backoff.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How long one dial (QUIC + TLS handshake) may take before it is abandoned and retried
/// ([`HubConfig::connect_timeout`]'s default). Short: a dial started during a partition must
/// not delay the reconnect after it.
pub const CONNECT_TIMEOUT: Duration = proto::DIAL_LIMIT;
/// How long shutdown waits for the connection close to be sent.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Between attempts when retrying cannot help until an operator acts (an expired or revoked
/// certificate): often enough to pick up a rejoin quickly.
const OPERATOR_RETRY: Duration = Duration::from_secs(10);
/// Before reconnecting after the store refused a write (a full disk): the cloud sends again
/// what was not acknowledged, so each retry is a resync.
const STORE_RETRY: Duration = Duration::from_secs(5);
/// How long the cloud may take to answer hello (after the QUIC handshake succeeded).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Repeated connection failures are logged at warn/error level at most this often.
const LOUD_EVERY: Duration = Duration::from_secs(60);
/// Without an answer to a renewal request, ask again after this long.
const RENEW_RETRY: Duration = Duration::from_secs(600);
/// How often the session looks for service-account tokens due for a refresh.
const TOKEN_CHECK: Duration = Duration::from_secs(1);
/// Most object messages committed in one transaction.
const APPLY_BATCH: usize = 512;
/// Messages read ahead of the session loop.
const INCOMING_QUEUE: usize = 1024;

/// Settings of `edgecore run`'s tunnel.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    /// Overrides the cloud address recorded at join.
    pub cloud: Option<String>,
    pub backoff: Backoff,
    pub connect_timeout: Duration,
    pub max_frame_size: usize,
    /// Renew at a random point in this fraction range of the certificate's validity.
    pub renew_window: (f64, f64),
    /// How often a session looks at the node status, reporting it when it changed (and at
    /// least every [`node::STATUS_REPORT_FREQUENCY`]).
    pub node_status_interval: Duration,
    /// Longest use of a service-account token before a new one is asked for (80 % of its
    /// lifetime comes first when shorter); the kubelet's 24 h unless a test lowers it.
    pub token_refresh_max: Duration,
    /// Pod events kept for the cloud at most (`edgecore::events`; the oldest go first).
    pub max_buffered_events: usize,
}

impl HubConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        HubConfig {
            data_dir,
            cloud: None,
            backoff: Backoff::default(),
            connect_timeout: CONNECT_TIMEOUT,
            max_frame_size: proto::DEFAULT_MAX_FRAME_SIZE,
            renew_window: (0.7, 0.9),
            node_status_interval: node::STATUS_CHECK_INTERVAL,
            token_refresh_max: crate::tokens::DEFAULT_REFRESH_MAX,
            max_buffered_events: crate::events::DEFAULT_CAPACITY,
        }
    }
}

/// A session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("the cloud refused the session: {0}")]
    Refused(ErrorMessage),
    #[error("the cloud closed the connection: {0}")]
    Closed(String),
    #[error("protocol error during hello: {0}")]
    Protocol(String),
    /// This edge's own check of `HelloAck`: the cloud's API store is not the one it synced with.
    #[error("the cloud's state does not match this edge's: {0}")]
    StateMismatch(String),
}

impl SessionError {
    /// Whether retrying cannot help until an operator acts (log louder).
    pub fn needs_operator(&self) -> bool {
        match self {
            SessionError::Refused(e) => matches!(
                e.code,
                ErrorCode::NodeRevoked
                    | ErrorCode::Unauthenticated
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::StateMismatch
            ),
            SessionError::Identity(_) | SessionError::Tls(_) | SessionError::StateMismatch(_) => {
                true
            }
            _ => false,
        }
    }

    /// Whether the cloud refused the connection before the handshake because it is busy.
    pub fn is_busy_refusal(&self) -> bool {
        matches!(self, SessionError::Dial(e) if e.is_busy_refusal())
    }

    /// Whether the cloud's API store is not the one this edge synced with (either side
    /// noticed): the edge is fenced.
    pub fn is_state_mismatch(&self) -> bool {
        match self {
            SessionError::Refused(e) => e.code == ErrorCode::StateMismatch,
            SessionError::StateMismatch(_) => true,
            _ => false,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEnd {
    /// The link or the cloud ended it (the reason as text).
    Lost(String),
    /// The store refused to commit objects from the cloud (a full disk); nothing of them was
    /// acknowledged.
    StoreRefused(String),
}

impl From<String> for SessionEnd {
    fn from(why: String) -> Self {
        SessionEnd::Lost(why)
    }
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Lost(why) => f.write_str(why),
            SessionEnd::StoreRefused(why) => write!(
                f,
                "cannot store objects from the cloud, nothing acknowledged: {why}"
            ),
        }
    }
}

/// An open tunnel session.
#[derive(Debug)]
pub struct Session {
    /// Owns the UDP socket; also used to let a final close reach the cloud before exit.
    endpoint: Endpoint,
    connection: Connection,
    reader: FrameReader<RecvStream>,
    writer: FrameWriter<SendStream>,
    pub ack: HelloAck,
    /// Serves the streams the cloud opens on this connection; without one they are left
    /// unanswered (the cloud gives up on them after its timeout).
    streams: Option<Arc<crate::streams::Dispatcher>>,
    /// The pods' events to send (to a cloud of protocol 1.4 or later); without one none go.
    events: Option<Arc<crate::events::Events>>,
}

fn describe_close(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            match close.error_code.into_inner() as u32 {
                close_code::REVOKED => format!(
                    "this node's certificate was revoked ({reason}); join again with a new token"
                ),
                close_code::SHUTDOWN => format!("cloudcore is shutting down ({reason})"),
                close_code::REPLACED => {
                    format!("another session of this node took over ({reason})")
                }
                code => format!("code {code}: {reason}"),
            }
        }
        other => other.to_string(),
    }
}

impl Session {
    /// Dials the cloud with the node certificate and exchanges hello. `cloud_state_id` is the
    /// identity of the cloud's API store this edge synced with last (empty: none); a `HelloAck`
    /// from another store, or from one whose revision is below what the edge holds, is refused
    /// here too unless it says an operator adopted it.
    // Each argument is one thing Hello needs; a struct would exist only for this call.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        endpoint: Endpoint,
        identity: &Identity,
        cloud: &str,
        config: &HubConfig,
        node_info: proto::NodeInfo,
        inventory: Vec<HeldObject>,
        cloud_state_id: String,
    ) -> Result<Session, SessionError> {
        let newest = inventory.iter().max_by_key(|h| h.resource_version).cloned();
        let addr = dial::resolve(cloud).await?;
        let connection = dial::connect(
            &endpoint,
            tls::node_config(identity)?,
            cloud,
            addr,
            config.connect_timeout,
        )
        .await?;
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| SessionError::Closed(describe_close(&e)))?;
        let mut writer = FrameWriter::new(send, config.max_frame_size);
        let mut reader = FrameReader::new(recv, config.max_frame_size);
        writer
            .send(Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_info,
                inventory,
                cloud_state_id: cloud_state_id.clone(),
            }))
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        // The cloud answers hello once it has planned the resync, which waits for a free resync
        // slot when many edges come back at once: a longer wait than the handshake's.
        let reply = tokio::time::timeout(HELLO_TIMEOUT, reader.next())
            .await
            .map_err(|_| SessionError::Protocol("no answer to hello".into()))?;
        let ack = match reply {
            Ok(Some(Message::HelloAck(ack))) => ack,
            Ok(Some(Message::Error(e))) => return Err(SessionError::Refused(e)),
            Ok(Some(other)) => {
                return Err(SessionError::Protocol(format!(
                    "expected hello_ack, got {}",
                    other.kind()
                )));
            }
            Ok(None) => {
                return Err(SessionError::Protocol(
                    "the cloud finished the stream".into(),
                ));
            }
            Err(e) => match connection.close_reason() {
                Some(reason) => return Err(SessionError::Closed(describe_close(&reason))),
                None => return Err(SessionError::Protocol(e.to_string())),
            },
        };
        if !ack.version.is_supported() {
            connection.close(
                VarInt::from_u32(close_code::UNSUPPORTED_VERSION),
                b"unsupported protocol version",
            );
            return Err(SessionError::Refused(ErrorMessage {
                code: ErrorCode::UnsupportedVersion,
                message: format!(
                    "the cloud speaks protocol {}, this edgecore {}",
                    ack.version, PROTOCOL_VERSION
                ),
            }));
        }
        let cloud_state = proto::sync::CloudState {
            id: ack.cloud_state_id.clone(),
            revision: ack.cloud_revision,
        };
        if !ack.adopt_state
            && let Err(mismatch) =
                proto::sync::check_state(&cloud_state, &cloud_state_id, newest.as_slice())
        {
            connection.close(
                VarInt::from_u32(close_code::STATE_MISMATCH),
                b"cloud state mismatch",
            );
            return Err(SessionError::StateMismatch(mismatch.to_string()));
        }
        Ok(Session {
            endpoint,
            connection,
            reader,
            writer,
            ack,
            streams: None,
            events: None,
        })
    }

    /// Serves the cloud's streams (logs, exec, attach, port-forward, stats) while the session
    /// runs.
    pub fn serving(mut self, streams: Arc<crate::streams::Dispatcher>) -> Session {
        self.streams = Some(streams);
        self
    }

    /// Sends the pods' events while the session runs (best effort, after the status reports
    /// due at its start; only to a cloud that speaks protocol 1.4).
    pub fn reporting(mut self, events: Arc<crate::events::Events>) -> Session {
        self.events = Some(events);
        self
    }

    /// Keeps the session alive until it ends; returns why it ended.
    // Each argument is a part of the edge that outlives the session and is owned by `run`
    // (or a load generator); a struct would exist only for this call.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        self,
        identity: &Identity,
        config: &HubConfig,
        metrics: &Metrics,
        local: Local<'_>,
        reporter: &mut Reporter,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let Local {
            replica,
            outbox,
            tokens,
        } = local;
        let Session {
            endpoint,
            connection,
            reader,
            mut writer,
            ack,
            streams,
            events,
        } = self;
        // Events go only to a cloud that understands them; otherwise they wait in the bounded
        // buffer (and the oldest are dropped) until one does.
        let events = events.filter(|_| ack.version.has_events());
        // Events sent but not yet known to have arrived: put back in the buffer if the session
        // ends first (a partition the edge has not noticed yet swallows what it sends).
        let mut unconfirmed = events.as_ref().map(|e| Unconfirmed {
            events: e.clone(),
            batches: Vec::new(),
        });
        // Streams the cloud opens are served on tasks of their own, cancelled with the session.
        let streams_cancel = shutdown.child_token();
        let _streams_end = streams_cancel.clone().drop_guard();
        let _accepting = streams.map(|dispatcher| {
            AbortOnDropHandle::new(tokio::spawn(accept_streams(
                connection.clone(),
                dispatcher,
                streams_cancel.clone(),
            )))
        });
        let link = Link {
            endpoint,
            connection,
        };
        let heartbeat =
            Duration::from_millis(ack.heartbeat_interval_ms).max(Duration::from_millis(100));
        let dead_after = Duration::from_millis(ack.dead_after_ms).max(heartbeat * 2);
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first node status goes at session start (below), the next after an interval.
        let mut status_ticker = tokio::time::interval_at(
            Instant::now() + config.node_status_interval,
            config.node_status_interval,
        );
        status_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rng = StdRng::from_os_rng();
        let mut renew_at = renewal_instant(
            identity.not_before,
            identity.not_after,
            config.renew_window,
            &mut rng,
        );
        let mut pending_key: Option<KeyPair> = None;
        let mut last_heard = Instant::now();
        let mut seq = 0u64;
        // Reports (statuses, pod deletions) go through the outbox, numbered per session.
        static SESSIONS: AtomicU64 = AtomicU64::new(1);
        let session = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let mut report_seq = 0u64;
        let node_ref = ObjectRef {
            kind: "Node".into(),
            namespace: String::new(),
            name: ack.node_name.clone(),
            uid: String::new(),
        };
        // A reader task fills a queue, so object messages that arrive together are committed
        // in one transaction.
        let (incoming_tx, mut incoming) = mpsc::channel(INCOMING_QUEUE);
        let _reader = AbortOnDropHandle::new(tokio::spawn(read_into(reader, incoming_tx)));
        let mut deferred: Option<Result<Message, FrameError>> = None;
        // `Hello` carried the whole node status. A fresh report without conditions replaces
        // one left unacknowledged by an earlier session or run (latest wins; it goes once
        // written) and leaves the conditions the cloud wrote from `Hello` alone. Reports
        // waiting from before go first.
        outbox.put(
            node_ref.clone(),
            Report::Status(reporter.session_start_report().await),
        );
        if ack.resend_status {
            // The cloud restarted and remembers none of our statuses: it compares each with the
            // API's copy and writes back only what differs (the API may have been changed
            // meanwhile, e.g. pods set not-ready during a partition).
            let again = outbox.resend_all();
            tracing::debug!(
                reports = again,
                "the cloud asked for our last statuses again"
            );
        }
        if let Err(e) = send_due(outbox, session, &mut report_seq, &mut writer, metrics).await {
            return link.lost(e).into();
        }
        // Events buffered while offline go after the statuses above, newest kept.
        if let Some(unconfirmed) = &mut unconfirmed
            && let Err(e) = unconfirmed.send(&mut writer, seq + 1, metrics).await
        {
            return link.lost(e).into();
        }
        // Token requests lost with the previous session go again now, as do those due.
        tokens.session_started();
        let mut token_ticker = tokio::time::interval(TOKEN_CHECK);
        token_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = match deferred.take() {
                Some(item) => Wake::Incoming(Some(item)),
                None => tokio::select! {
                    _ = shutdown.cancelled() => Wake::Shutdown,
                    _ = tokio::time::sleep_until(last_heard + dead_after) => Wake::Dead,
                    _ = ticker.tick() => Wake::Heartbeat,
                    _ = status_ticker.tick() => Wake::NodeStatus,
                    _ = outbox.changed() => Wake::Outbox,
                    _ = sleep_until_or_never(outbox.next_resend()) => Wake::Outbox,
                    _ = tokio::time::sleep_until(renew_at) => Wake::Renew,
                    _ = tokens.wanted() => Wake::Tokens,
                    _ = token_ticker.tick() => Wake::Tokens,
                    _ = events_changed(events.as_deref()) => Wake::Events,
                    item = incoming.recv() => Wake::Incoming(item),
                },
            };
            match wake {
                Wake::Shutdown => {
                    link.connection.close(
                        VarInt::from_u32(close_code::SHUTDOWN),
                        b"edgecore shutting down",
                    );
                    // Let the close frame leave before the process exits, so the cloud sees the
                    // session end now rather than after its idle timeout.
                    let _ = tokio::time::timeout(CLOSE_GRACE, link.endpoint.wait_idle()).await;
                    return SessionEnd::Lost("edgecore shutting down".into());
                }
                Wake::Dead => {
                    link.connection.close(
                        VarInt::from_u32(close_code::HEARTBEAT_TIMEOUT),
                        b"heartbeat timeout",
                    );
                    return SessionEnd::Lost(format!(
                        "nothing heard from the cloud for {}",
                        humantime::format_duration(dead_after)
                    ));
                }
                Wake::Heartbeat => {
                    seq += 1;
                    if let Err(e) = writer.send(Message::Heartbeat { seq }).await {
                        return link.lost(e).into();
                    }
                }
                Wake::NodeStatus => {
                    if let Some(status) = reporter.due().await {
                        outbox.put(node_ref.clone(), Report::Status(status));
                    }
                }
                Wake::Outbox => {
                    if let Err(e) =
                        send_due(outbox, session, &mut report_seq, &mut writer, metrics).await
                    {
                        return link.lost(e).into();
                    }
                }
                Wake::Events => {
                    // Statuses due now go first: events never delay them.
                    if let Err(e) =
                        send_due(outbox, session, &mut report_seq, &mut writer, metrics).await
                    {
                        return link.lost(e).into();
                    }
                    if let Some(unconfirmed) = &mut unconfirmed
                        && let Err(e) = unconfirmed.send(&mut writer, seq + 1, metrics).await
                    {
                        return link.lost(e).into();
                    }
                }
                Wake::Tokens => {
                    let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
                    for request in tokens.due(Instant::now(), now_unix) {
                        if !ack.version.has_tokens() {
                            let why = format!(
                                "cloudcore speaks protocol {}, which cannot issue service-account tokens; upgrade cloudcore",
                                ack.version
                            );
                            let response = TokenResponse {
                                request_id: request.request_id,
                                result: Err(ErrorMessage {
                                    code: ErrorCode::NotSupported,
                                    message: why,
                                }),
                            };
                            tokens.answer(response).await;
                            continue;
                        }
                        tracing::debug!(pod.uid = %request.pod.uid, request_id = request.request_id, "asking the cloud for a service-account token");
                        if let Err(e) = writer.send(Message::TokenRequest(request)).await {
                            return link.lost(e).into();
                        }
                    }
                }
                Wake::Renew => {
                    renew_at = Instant::now() + RENEW_RETRY;
                    match new_key_and_csr(&ack.node_name) {
                        Ok((key, csr_der)) => {
                            tracing::info!(not_after = %identity.not_after, "renewing the node certificate");
                            if let Err(e) = writer.send(Message::RenewRequest { csr_der }).await {
                                return link.lost(e).into();
                            }
                            pending_key = Some(key);
                        }
                        Err(e) => tracing::error!(error = %e, "cannot generate a key for renewal"),
                    }
                }
                Wake::Incoming(None) => {
                    link.connection
                        .close(VarInt::from_u32(close_code::NORMAL), b"stream finished");
                    return link
                        .connection
                        .close_reason()
                        .map(|r| describe_close(&r))
                        .unwrap_or_else(|| "the cloud finished the stream".into())
                        .into();
                }
                Wake::Incoming(Some(Err(e))) => return link.lost(e).into(),
                Wake::Incoming(Some(Ok(message))) => {
                    last_heard = Instant::now();
                    match message {
                        Message::Heartbeat { seq: echoed } => {
                            if let Some(unconfirmed) = &mut unconfirmed {
                                unconfirmed.confirm(echoed);
                            }
                        }
                        message @ (Message::Upsert(_) | Message::Delete(_)) => {
                            let mut batch = vec![message];
                            while batch.len() < APPLY_BATCH {
                                match incoming.try_recv() {
                                    Ok(Ok(m @ (Message::Upsert(_) | Message::Delete(_)))) => {
                                        batch.push(m)
                                    }
                                    Ok(other) => {
                                        deferred = Some(other);
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            match replica.apply(batch).await {
                                Ok(seqs) if seqs.is_empty() => {}
                                Ok(seqs) => {
                                    if let Err(e) = writer.send(Message::Ack { seqs }).await {
                                        return link.lost(e).into();
                                    }
                                }
                                Err(e) => {
                                    link.connection.close(
                                        VarInt::from_u32(close_code::NORMAL),
                                        b"edge store write failed",
                                    );
                                    return SessionEnd::StoreRefused(daemon::error_chain(&e));
                                }
                            }
                        }
                        Message::RenewResponse { certificate_der } => match pending_key.take() {
                            Some(key) => match install_renewed(config, &key, &certificate_der) {
                                Ok((not_before, not_after)) => {
                                    metrics.certificate_renewals.inc();
                                    tracing::info!(%not_after, "node certificate renewed");
                                    renew_at = renewal_instant(
                                        not_before,
                                        not_after,
                                        config.renew_window,
                                        &mut rng,
                                    );
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "cannot install the renewed certificate")
                                }
                            },
                            None => tracing::warn!(
                                "renewal response without a pending request; ignored"
                            ),
                        },
                        Message::TokenResponse(response) => tokens.answer(response).await,
                        Message::Ack { seqs } => {
                            tracing::debug!(?seqs, "reports acknowledged");
                            outbox.acknowledged(session, &seqs);
                        }
                        Message::Error(e) => {
                            tracing::warn!(code = %e.code, "the cloud reported an error: {}", e.message);
                            if e.code != ErrorCode::Forbidden {
                                pending_key = None;
                            }
                        }
                        other => tracing::debug!(
                            message = other.kind(),
                            "unexpected message from the cloud; dropped"
                        ),
                    }
                }
            }
        }
    }
}

/// The edge's own state a session feeds and drains: the store's replica (objects from the
/// cloud), the status outbox (reports for it) and the service-account tokens (asked of it).
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    pub replica: &'a Replica,
    pub outbox: &'a Outbox,
    pub tokens: &'a Arc<Tokens>,
}

/// What woke the session loop.
// Built once per wake-up and matched at once; boxing the message would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Shutdown,
    Dead,
    Heartbeat,
    NodeStatus,
    Outbox,
    Renew,
    Tokens,
    Events,
    Incoming(Option<Result<Message, FrameError>>),
}

/// Resolves when an event was recorded; never without a buffer to send from.
async fn events_changed(events: Option<&crate::events::Events>) {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
    }
}

/// Events a session sent, each batch with the first heartbeat sent after it. The stream is
/// ordered, so the cloud's echo of that heartbeat confirms the batch arrived; whatever is
/// unconfirmed when the session ends goes back to the buffer (the cloud may then count an event
/// twice, if it got it but its echo was lost: events are best effort).
struct Unconfirmed {
    events: Arc<crate::events::Events>,
    batches: Vec<(u64, Vec<proto::EdgeEvent>)>,
}

impl Unconfirmed {
    /// Sends every waiting event, in reports of at most `MAX_EVENTS_PER_REPORT`, to be
    /// confirmed by heartbeat `next_heartbeat`.
    async fn send(
        &mut self,
        writer: &mut FrameWriter<SendStream>,
        next_heartbeat: u64,
        metrics: &Metrics,
    ) -> Result<(), FrameError> {
        loop {
            let batch = self.events.take(proto::message::MAX_EVENTS_PER_REPORT);
            if batch.is_empty() {
                return Ok(());
            }
            let n = batch.len() as u64;
            // Kept before the send: a send that fails mid-way leaves them unconfirmed.
            self.batches.push((next_heartbeat, batch.clone()));
            writer.send(Message::Events(batch)).await?;
            metrics.events_sent.inc_by(n);
        }
    }

    /// The cloud echoed heartbeat `seq`: every batch sent before it arrived.
    fn confirm(&mut self, seq: u64) {
        self.batches.retain(|(after, _)| *after > seq);
    }
}

impl Drop for Unconfirmed {
    fn drop(&mut self) {
        let lost: Vec<proto::EdgeEvent> = self
            .batches
            .drain(..)
            .flat_map(|(_, batch)| batch)
            .collect();
        if !lost.is_empty() {
            tracing::debug!(
                events = lost.len(),
                "events the cloud did not confirm go back to the buffer"
            );
            self.events.requeue(lost);
        }
    }
}

/// Sends the outbox's reports that are due in `session` (paced by the outbox: oldest first, a
/// bounded number unacknowledged).
async fn send_due(
    outbox: &Outbox,
    session: u64,
    report_seq: &mut u64,
    writer: &mut FrameWriter<SendStream>,
    metrics: &Metrics,
) -> Result<(), FrameError> {
    for report in outbox.due(session, std::time::Instant::now(), report_seq) {
        writer.send(report).await?;
        metrics.status_reports.inc();
    }
    Ok(())
}

/// Accepts the streams the cloud opens on the session's connection and serves each on a task
/// of its own until the connection ends; `cancel` ends them all.
async fn accept_streams(
    connection: Connection,
    dispatcher: Arc<crate::streams::Dispatcher>,
    cancel: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = connection.accept_bi() => accepted,
        };
        match accepted {
            Ok((send, recv)) => {
                tracker.spawn(
                    crate::streams::serve_stream(dispatcher.clone(), send, recv, cancel.clone())
                        .in_current_span(),
                );
            }
            Err(e) => {
                tracing::debug!(error = %e, "no more streams from the cloud on this connection");
                break;
            }
        }
    }
    tracker.close();
}

/// Reads frames into the session's queue until the stream ends or fails.
async fn read_into(
    mut reader: FrameReader<RecvStream>,
    queue: mpsc::Sender<Result<Message, FrameError>>,
) {
    loop {
        match reader.next().await {
            Ok(Some(message)) => {
                if queue.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = queue.send(Err(e)).await;
                return;
            }
        }
    }
}

async fn sleep_until_or_never(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The connection of a running session, for closing it.
struct Link {
    /// Owns the UDP socket; also used to let a final close reach the cloud before exit.
    endpoint: Endpoint,
    connection: Connection,
}

impl Link {
    fn lost(&self, e: FrameError) -> String {
        if let Some(reason) = self.connection.close_reason() {
            return describe_close(&reason);
        }
        match e {
            FrameError::Io(io) => format!("connection lost: {io}"),
            protocol => {
                tracing::warn!(
                    reason = protocol.reason(),
                    "closing: the cloud broke the protocol: {protocol}"
                );
                self.connection.close(
                    VarInt::from_u32(close_code::PROTOCOL_VIOLATION),
                    protocol.reason().as_bytes(),
                );
                format!("protocol violation by the cloud: {protocol}")
            }
        }
    }
}

/// A random instant within `window` of the certificate's validity period.
fn renewal_instant(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    window: (f64, f64),
    rng: &mut impl rand::Rng,
) -> Instant {
    let fraction = rng.random_range(window.0..=window.1);
    let lifetime = (not_after - not_before).as_seconds_f64().max(0.0);
    let at = not_before + time::Duration::seconds_f64(lifetime * fraction);
    let from_now = (at - OffsetDateTime::now_utc()).as_seconds_f64().max(0.0);
    Instant::now() + Duration::from_secs_f64(from_now)
}

fn install_renewed(
    config: &HubConfig,
    key: &KeyPair,
    cert_der: &[u8],
) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| e.to_string())?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the renewed certificate is not for our new key".into());
    }
    identity::write_node_pem(&config.data_dir, cert_der, &key.serialize_der())
        .map_err(|e| e.to_string())?;
    Ok((
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    ))
}

/// Connects, runs sessions, and reconnects with backoff until `shutdown`. Returns an error only
/// if the identity files are unusable.
// Each argument is a part of the edge built in `lib::run`; a struct would exist only for this.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: HubConfig,
    metrics: Arc<Metrics>,
    replica: Replica,
    outbox: Arc<Outbox>,
    mut reporter: Reporter,
    tokens: Arc<Tokens>,
    streams: Arc<crate::streams::Dispatcher>,
    events: Arc<crate::events::Events>,
    shutdown: CancellationToken,
) -> Result<(), IdentityError> {
    let mut rng = StdRng::from_os_rng();
    let mut attempt: u32 = 0;
    // Consecutive sessions the cloud closed with REPLACED (another connection with this
    // node's identity took over); they wait `backoff::after_replaced`.
    let mut replacements: u32 = 0;
    // Consecutive dials the cloud refused as busy; they wait `backoff::after_busy`.
    let mut busy_refusals: u32 = 0;
    let mut connected_before = false;
    // Repeated failures are logged at most once a minute, with how long the cloud has been away.
    let mut offline_since: Option<Instant> = None;
    let mut last_loud: Option<Instant> = None;
    // A store refusing writes is found anew by every session (one each `STORE_RETRY`), so it
    // has its own clock, which a session that connects does not reset; only a session that
    // ends for another reason (the store took writes again) does.
    let mut store_loud: Option<Instant> = None;
    // A failure with a new cause (the cloud fenced this edge, or presents another CA) is logged
    // loudly at once, whatever was logged within the minute.
    let mut last_cause: Option<&'static str> = None;
    loop {
        // Re-read every time: a renewal or a rejoin may have replaced node.pem. A file that
        // cannot be read now (an operator replacing it) is retried; pods run on regardless.
        let identity = match identity::load(&config.data_dir) {
            Ok(identity) => identity,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the node identity; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(OPERATOR_RETRY) => continue,
                }
            }
        };
        metrics
            .certificate_not_after
            .set(identity.not_after.unix_timestamp());
        let cloud = config
            .cloud
            .clone()
            .unwrap_or_else(|| identity.config.cloud.clone());
        let remembered = match replica.cloud_state_id().await {
            Ok(id) => id.unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the cloud state this edge synced with; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(STORE_RETRY) => continue,
                }
            }
        };
        let opened = match dial::resolve(&cloud).await {
            Ok(peer) => {
                // The node's InternalIP: the address this gateway uses to reach the cloud.
                let node_info = reporter.hello(node::host_ip(peer)).await;
                match dial::client_endpoint(peer) {
                    Ok(endpoint) => tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        opened = Session::open(endpoint, &identity, &cloud, &config, node_info, replica.start_session(), remembered.clone()) => opened,
                    },
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        };
        let mut needs_operator = false;
        let mut store_failed = false;
        busy_refusals = match &opened {
            Err(e) if e.is_busy_refusal() => busy_refusals.saturating_add(1),
            _ => 0,
        };
        // The cloud's store identity is remembered before anything from it is applied.
        let opened = match opened {
            Ok(session)
                if !session.ack.cloud_state_id.is_empty()
                    && (session.ack.adopt_state || session.ack.cloud_state_id != remembered) =>
            {
                if session.ack.adopt_state {
                    tracing::warn!(
                        cloud = %cloud,
                        store.id = %session.ack.cloud_state_id,
                        "an operator adopted the cloud's API store for this node: replacing whatever differs from it"
                    );
                    replica.adopt();
                }
                match replica
                    .remember_cloud_state(session.ack.cloud_state_id.clone())
                    .await
                {
                    Ok(()) => Ok(session),
                    Err(e) => Err(SessionError::Protocol(format!(
                        "cannot remember the cloud's store identity: {e}"
                    ))),
                }
            }
            other => other,
        };
        match opened {
            Ok(session) => {
                metrics.cloud_connected.set(1);
                metrics.cloud_state_mismatch.set(0);
                if connected_before {
                    metrics.reconnects.inc();
                }
                connected_before = true;
                match offline_since.take() {
                    Some(since) => {
                        tracing::info!(cloud = %cloud, node.name = %session.ack.node_name, offline_for = %humantime::format_duration(round_secs(since.elapsed())), "connected to the cloud")
                    }
                    None => {
                        tracing::info!(cloud = %cloud, node.name = %session.ack.node_name, "connected to the cloud")
                    }
                }
                last_loud = None;
                last_cause = None;
                let started = Instant::now();
                let connection = session.connection.clone();
                let ended = session
                    .serving(streams.clone())
                    .reporting(events.clone())
                    .run(
                        &identity,
                        &config,
                        &metrics,
                        Local {
                            replica: &replica,
                            outbox: &outbox,
                            tokens: &tokens,
                        },
                        &mut reporter,
                        &shutdown,
                    )
                    .await;
                metrics.cloud_connected.set(0);
                if shutdown.is_cancelled() {
                    tracing::info!(cloud = %cloud, "disconnected from the cloud: {ended}");
                    return Ok(());
                }
                offline_since = Some(Instant::now());
                let replaced = matches!(
                    connection.close_reason(),
                    Some(quinn::ConnectionError::ApplicationClosed(close))
                        if close.error_code.into_inner() == u64::from(close_code::REPLACED)
                );
                replacements = if replaced {
                    replacements.saturating_add(1)
                } else {
                    0
                };
                if replaced {
                    tracing::warn!(cloud = %cloud, replacements, "the cloud closed this session because another connection with this node's identity took over; if another gateway runs with a copy of this data dir, stop it; waiting longer before each reconnection");
                } else if let SessionEnd::StoreRefused(_) = ended {
                    store_failed = true;
                    if store_loud.is_none_or(|t| t.elapsed() >= LOUD_EVERY) {
                        store_loud = Some(Instant::now());
                        tracing::error!(cloud = %cloud, "{ended}; pods keep running from the local store; retrying every {}s until it accepts writes (logged again in a minute if it still fails)", STORE_RETRY.as_secs());
                    } else {
                        tracing::debug!(cloud = %cloud, "{ended}");
                    }
                } else {
                    store_loud = None;
                    tracing::warn!(cloud = %cloud, "disconnected from the cloud: {ended}; pods keep running from the local store");
                }
                attempt = if started.elapsed() >= STABLE_SESSION {
                    0
                } else {
                    attempt.saturating_add(1)
                };
            }
            Err(e) => {
                metrics.connect_failures.inc();
                let since = *offline_since.get_or_insert_with(Instant::now);
                let (cause, expired) =
                    if let Some(why) = expired_certificate(&identity, &e, &config.data_dir) {
                        ("expired_certificate", Some(why))
                    } else if let Some(why) = other_ca(&e, &config.data_dir) {
                        ("other_ca", Some(why))
                    } else if let Some(why) = fenced(&e, &identity) {
                        ("state_mismatch", Some(why))
                    } else {
                        ("unreachable", None)
                    };
                needs_operator = expired.is_some() || e.needs_operator();
                metrics
                    .cloud_state_mismatch
                    .set(i64::from(e.is_state_mismatch()));
                let loud = last_loud.is_none_or(|t| t.elapsed() >= LOUD_EVERY)
                    || (expired.is_some() && last_cause != Some(cause));
                last_cause = Some(cause);
                if loud {
                    last_loud = Some(Instant::now());
                    let away = humantime::format_duration(round_secs(since.elapsed()));
                    if let Some(why) = expired {
                        tracing::error!(cloud = %cloud, offline_for = %away, "cannot connect: {why}");
                    } else if needs_operator {
                        tracing::error!(cloud = %cloud, offline_for = %away, "cannot connect: {e}");
                    } else {
                        tracing::warn!(cloud = %cloud, offline_for = %away, attempts = attempt + 1, "cannot connect: {e}; pods keep running from the local store, retrying every few seconds");
                    }
                } else {
                    tracing::debug!(cloud = %cloud, "cannot connect: {e}");
                }
                attempt = attempt.saturating_add(1);
            }
        }
        let delay = if needs_operator {
            OPERATOR_RETRY
        } else if replacements > 0 {
            crate::backoff::after_replaced(replacements, &mut rng)
        } else if store_failed {
            STORE_RETRY
        } else if busy_refusals > 0 {
            crate::backoff::after_busy(busy_refusals, &mut rng)
        } else {
            config.backoff.delay(attempt, &mut rng)
        };
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            attempt,
            "reconnecting after a delay"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whole seconds, for log lines.
fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// When the cloud refused to sync (or this edge did) because its API store is not the one the
/// edge synced with: what that means and what the operator can do.
fn fenced(error: &SessionError, identity: &Identity) -> Option<String> {
    if !error.is_state_mismatch() {
        return None;
    }
    let why = match error {
        SessionError::Refused(e) => e.message.clone(),
        other => other.to_string(),
    };
    Some(format!(
        "the cloud's state does not match this edge's, so nothing is synced and nothing is deleted; pods keep running from the local store. {why}. On the cloud, `cloudcore store adopt --node {node}` accepts the cloud's state for this node (docs/operations.md); retrying every {}s",
        OPERATOR_RETRY.as_secs(),
        node = identity.config.node_name,
    ))
}

/// When the dial failed because the cloud's serving certificate is not signed by the pinned
/// cluster CA (its pki/ was lost or replaced): a clear cause instead of a transient-looking
/// TLS retry.
fn other_ca(error: &SessionError, data_dir: &std::path::Path) -> Option<String> {
    let text = error.to_string();
    if !(text.contains("BadSignature") || text.contains("UnknownIssuer")) {
        return None;
    }
    Some(format!(
        "the cloud presents a certificate not signed by the pinned cluster CA ({}/ca.crt): the cloud's pki/ was lost or replaced ({text}). Pods keep running from the local store. Restore the cloud's pki/ from its backup (`cloudcore store restore`, docs/operations.md), or join this node to the new CA with `edgecore join --rejoin`",
        data_dir.display()
    ))
}

/// When the dial failed because the node certificate expired (by this gateway's clock, or as
/// the cloud said with a TLS alert): what happened and how to recover.
fn expired_certificate(
    identity: &Identity,
    error: &SessionError,
    data_dir: &std::path::Path,
) -> Option<String> {
    let now = time::OffsetDateTime::now_utc();
    let text = error.to_string().to_ascii_lowercase();
    let said_by_cloud = text.contains("certificate expired") || text.contains("certificateexpired");
    if identity.not_after > now && !said_by_cloud {
        return None;
    }
    let ago = (now - identity.not_after).max(time::Duration::ZERO);
    let ago = humantime::format_duration(Duration::from_secs(ago.whole_seconds().max(0) as u64));
    Some(format!(
        "the node certificate expired at {} ({ago} ago by this gateway's clock), during an outage longer than its renewal margin, and the cloud refuses it. Pods keep running from the local store. To recover, create a token for this node on the cloud (`cloudcore token create --node {node}`) and run here `edgecore join --rejoin --cloud {cloud} --token TOKEN --ca-hash HASH --data-dir {dir}`; the running edgecore picks the new certificate up (docs/offline.md)",
        identity.not_after,
        node = identity.config.node_name,
        cloud = identity.config.cloud,
        dir = data_dir.display(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_go_back_unless_a_later_heartbeat_was_echoed() {
        let metrics = Arc::new(Metrics::default());
        let events = crate::events::Events::new(16, metrics);
        let pod = ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "web".into(),
            uid: "u1".into(),
        };
        let event = |reason: &str| proto::EdgeEvent {
            object: pod.clone(),
            field_path: String::new(),
            type_: proto::EventType::Normal,
            reason: reason.into(),
            message: "m".into(),
            count: 1,
            first_timestamp_ms: 1,
            last_timestamp_ms: 1,
        };
        let mut unconfirmed = Unconfirmed {
            events: events.clone(),
            batches: vec![(3, vec![event("Pulled")]), (4, vec![event("Started")])],
        };
        unconfirmed.confirm(2);
        assert_eq!(
            unconfirmed.batches.len(),
            2,
            "an echo of an earlier heartbeat confirms nothing"
        );
        unconfirmed.confirm(3);
        assert_eq!(unconfirmed.batches.len(), 1);
        drop(unconfirmed);
        let back: Vec<String> = events.take(10).into_iter().map(|e| e.reason).collect();
        assert_eq!(back, ["Started"], "only the unconfirmed batch went back");
    }

    #[test]
    fn a_foreign_ca_and_a_fenced_session_are_named_not_retried_quietly() {
        let dir = std::path::Path::new("/var/lib/edgecore");
        let foreign =
            SessionError::Closed("aborted by peer: invalid peer certificate: BadSignature".into());
        let why = other_ca(&foreign, dir).expect("a foreign CA is recognised");
        assert!(why.contains("not signed by the pinned cluster CA"), "{why}");
        assert!(why.contains("/var/lib/edgecore/ca.crt"), "{why}");
        assert!(other_ca(&SessionError::Closed("timed out".into()), dir).is_none());

        let refused = SessionError::Refused(ErrorMessage {
            code: ErrorCode::StateMismatch,
            message: "the cloud's API store went back in time".into(),
        });
        assert!(refused.is_state_mismatch() && refused.needs_operator());
        let own = SessionError::StateMismatch("store id b".into());
        assert!(own.is_state_mismatch() && own.needs_operator());
        assert!(!SessionError::Closed("x".into()).is_state_mismatch());
    }

    #[test]
    fn renewal_lands_between_70_and_90_percent() {
        let mut rng = StdRng::seed_from_u64(1);
        let now = OffsetDateTime::now_utc();
        let not_before = now - time::Duration::hours(10);
        let not_after = not_before + time::Duration::hours(100);
        for _ in 0..200 {
            let at = renewal_instant(not_before, not_after, (0.7, 0.9), &mut rng);
            let hours = (at - Instant::now()).as_secs_f64() / 3600.0;
            // 70..90 hours after not_before, i.e. 60..80 hours from now.
            assert!((59.9..=80.1).contains(&hours), "{hours}");
        }
    }

    #[test]
    fn overdue_renewal_is_immediate() {
        let mut rng = StdRng::seed_from_u64(2);
        let now = OffsetDateTime::now_utc();
        let at = renewal_instant(
            now - time::Duration::hours(10),
            now + time::Duration::hours(1),
            (0.7, 0.9),
            &mut rng,
        );
        assert!(at <= Instant::now() + Duration::from_millis(10));
    }
}
