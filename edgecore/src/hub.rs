//! The edge end of the tunnel: connect, hello, heartbeats, certificate renewal, and reconnects
//! with jittered backoff. Works only with the files `edgecore join` wrote.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::{
    ErrorCode, ErrorMessage, FrameError, FrameReader, FrameWriter, Hello, HelloAck, Message,
    PROTOCOL_VERSION, close_code,
};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::dial::{self, DialError};
use crate::identity::{self, Identity, IdentityError};
use crate::join::new_key_and_csr;
use crate::metrics::Metrics;
use crate::tls::{self, TlsError};

/// A session that lasted at least this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How long shutdown waits for the connection close to be sent.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Without an answer to a renewal request, ask again after this long.
const RENEW_RETRY: Duration = Duration::from_secs(600);

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
}

impl HubConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        HubConfig {
            data_dir,
            cloud: None,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            max_frame_size: proto::DEFAULT_MAX_FRAME_SIZE,
            renew_window: (0.7, 0.9),
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
}

impl SessionError {
    /// Whether retrying cannot help until an operator acts (log louder).
    pub fn needs_operator(&self) -> bool {
        match self {
            SessionError::Refused(e) => matches!(
                e.code,
                ErrorCode::NodeRevoked | ErrorCode::Unauthenticated | ErrorCode::UnsupportedVersion
            ),
            SessionError::Identity(_) | SessionError::Tls(_) => true,
            _ => false,
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
    /// Dials the cloud with the node certificate and exchanges hello.
    pub async fn open(
        endpoint: Endpoint,
        identity: &Identity,
        cloud: &str,
        config: &HubConfig,
        node_info: proto::NodeInfo,
    ) -> Result<Session, SessionError> {
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
            }))
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        let reply = tokio::time::timeout(config.connect_timeout, reader.next())
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
        Ok(Session {
            endpoint,
            connection,
            reader,
            writer,
            ack,
        })
    }

    /// Keeps the session alive until it ends; returns why it ended.
    pub async fn run(
        mut self,
        identity: &Identity,
        config: &HubConfig,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> String {
        let heartbeat =
            Duration::from_millis(self.ack.heartbeat_interval_ms).max(Duration::from_millis(100));
        let dead_after = Duration::from_millis(self.ack.dead_after_ms).max(heartbeat * 2);
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.connection.close(VarInt::from_u32(close_code::SHUTDOWN), b"edgecore shutting down");
                    // Let the close frame leave before the process exits, so the cloud sees the
                    // session end now rather than after its idle timeout.
                    let _ = tokio::time::timeout(CLOSE_GRACE, self.endpoint.wait_idle()).await;
                    return "edgecore shutting down".into();
                }
                _ = tokio::time::sleep_until(last_heard + dead_after) => {
                    self.connection.close(VarInt::from_u32(close_code::HEARTBEAT_TIMEOUT), b"heartbeat timeout");
                    return format!("nothing heard from the cloud for {}", humantime::format_duration(dead_after));
                }
                _ = ticker.tick() => {
                    seq += 1;
                    if let Err(e) = self.writer.send(Message::Heartbeat { seq }).await {
                        return self.lost(e);
                    }
                }
                _ = tokio::time::sleep_until(renew_at) => {
                    renew_at = Instant::now() + RENEW_RETRY;
                    match new_key_and_csr(&self.ack.node_name) {
                        Ok((key, csr_der)) => {
                            tracing::info!(not_after = %identity.not_after, "renewing the node certificate");
                            if let Err(e) = self.writer.send(Message::RenewRequest { csr_der }).await {
                                return self.lost(e);
                            }
                            pending_key = Some(key);
                        }
                        Err(e) => tracing::error!(error = %e, "cannot generate a key for renewal"),
                    }
                }
                next = self.reader.next() => {
                    last_heard = Instant::now();
                    match next {
                        Ok(Some(Message::Heartbeat { .. })) => {}
                        Ok(Some(Message::RenewResponse { certificate_der })) => {
                            match pending_key.take() {
                                Some(key) => match install_renewed(config, &key, &certificate_der) {
                                    Ok((not_before, not_after)) => {
                                        metrics.certificate_renewals.inc();
                                        tracing::info!(%not_after, "node certificate renewed");
                                        renew_at = renewal_instant(not_before, not_after, config.renew_window, &mut rng);
                                    }
                                    Err(e) => tracing::error!(error = %e, "cannot install the renewed certificate"),
                                },
                                None => tracing::warn!("renewal response without a pending request; ignored"),
                            }
                        }
                        Ok(Some(Message::Error(e))) => {
                            tracing::warn!(code = %e.code, "the cloud reported an error: {}", e.message);
                            pending_key = None;
                        }
                        Ok(Some(other)) => tracing::debug!(message = other.kind(), "no handler yet; dropped"),
                        Ok(None) => {
                            self.connection.close(VarInt::from_u32(close_code::NORMAL), b"stream finished");
                            return "the cloud finished the stream".into();
                        }
                        Err(e) => return self.lost(e),
                    }
                }
            }
        }
    }

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
pub async fn run(
    config: HubConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), IdentityError> {
    let mut rng = StdRng::from_os_rng();
    let mut attempt: u32 = 0;
    let mut connected_before = false;
    let node_info = crate::node::collect();
    loop {
        // Re-read every time: a renewal may have replaced node.pem.
        let identity = identity::load(&config.data_dir)?;
        let cloud = config
            .cloud
            .clone()
            .unwrap_or_else(|| identity.config.cloud.clone());
        let opened = match dial::resolve(&cloud).await.and_then(dial::client_endpoint) {
            Ok(endpoint) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    opened = Session::open(endpoint, &identity, &cloud, &config, node_info.clone()) => opened,
                }
            }
            Err(e) => Err(e.into()),
        };
        match opened {
            Ok(session) => {
                metrics.cloud_connected.set(1);
                if connected_before {
                    metrics.reconnects.inc();
                }
                connected_before = true;
                tracing::info!(cloud = %cloud, node.name = %session.ack.node_name, "connected to the cloud");
                let started = Instant::now();
                let ended = session.run(&identity, &config, &metrics, &shutdown).await;
                metrics.cloud_connected.set(0);
                tracing::warn!(cloud = %cloud, "disconnected from the cloud: {ended}");
                attempt = if started.elapsed() >= STABLE_SESSION {
                    0
                } else {
                    attempt.saturating_add(1)
                };
            }
            Err(e) => {
                metrics.connect_failures.inc();
                if e.needs_operator() {
                    tracing::error!(cloud = %cloud, "cannot connect: {e}");
                } else {
                    tracing::warn!(cloud = %cloud, "cannot connect: {e}");
                }
                attempt = attempt.saturating_add(1);
            }
        }
        let delay = config.backoff.delay(attempt, &mut rng);
        tracing::info!(
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

#[cfg(test)]
mod tests {
    use super::*;

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
