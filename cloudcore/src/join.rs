//! Join admission: rate limiting of failed attempts per source address, token and name checks,
//! and signing of the node certificate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{ErrorCode, JoinRequest, JoinResponse, Message};

use crate::hub::Shared;
use crate::registry::JoinRefusal;
use crate::token::{BootstrapToken, validate_labels, validate_node_name};

/// Token bucket per source address, charged only by failed joins.
#[derive(Debug)]
pub struct JoinLimiter {
    burst: f64,
    refill: Duration,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl JoinLimiter {
    /// Allows `burst` failures at once, then one more every `refill`.
    pub fn new(burst: u32, refill: Duration) -> Self {
        JoinLimiter {
            burst: burst.max(1).into(),
            refill,
            buckets: HashMap::new(),
        }
    }

    fn level(&self, ip: IpAddr, now: Instant) -> f64 {
        match self.buckets.get(&ip) {
            None => self.burst,
            Some((tokens, at)) => {
                let gained = now.saturating_duration_since(*at).as_secs_f64()
                    / self.refill.as_secs_f64().max(f64::MIN_POSITIVE);
                (tokens + gained).min(self.burst)
            }
        }
    }

    /// Whether `ip` may attempt a join now.
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        self.level(ip, now) >= 1.0
    }

    /// Charges one failure to `ip`.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        let level = self.level(ip, now);
        self.buckets.insert(ip, ((level - 1.0).max(0.0), now));
        if self.buckets.len() > 10_000 {
            // Forget addresses whose bucket has refilled: they carry no state worth keeping.
            let (burst, refill) = (self.burst, self.refill);
            self.buckets.retain(|_, (tokens, at)| {
                tokens.to_owned()
                    + now.saturating_duration_since(*at).as_secs_f64() / refill.as_secs_f64()
                    < burst
            });
        }
    }
}

fn refusal_code(refusal: &JoinRefusal) -> ErrorCode {
    match refusal {
        JoinRefusal::TokenUnknown { .. } => ErrorCode::TokenUnknown,
        JoinRefusal::SecretMismatch { .. } => ErrorCode::TokenSecretMismatch,
        JoinRefusal::Expired { .. } => ErrorCode::TokenExpired,
        JoinRefusal::UsedUp { .. } => ErrorCode::TokenUsedUp,
        JoinRefusal::Revoked { .. } => ErrorCode::TokenRevoked,
        JoinRefusal::NodeMismatch { .. } => ErrorCode::TokenNodeMismatch,
        JoinRefusal::NameTaken { .. } => ErrorCode::NodeNameTaken,
        // The protocol has no "exhausted" code; the message names the flag to change.
        JoinRefusal::NoKubeletPort { .. } => ErrorCode::Internal,
    }
}

/// Decides a join request: the reply to send (a `JoinResponse` or an `Error`).
pub async fn admit(shared: Arc<Shared>, request: JoinRequest, peer: IpAddr) -> Message {
    let token_id = request.token_id().to_string();
    // Bounded: the name is not checked yet (the text log escapes it, JSON logs quote it).
    let node: String = request.node_name.chars().take(253).collect();
    let reply = decide(&shared, request, peer).await;
    match &reply {
        Message::JoinResponse(_) => {
            shared.metrics.joins.inc();
            tracing::info!(node.name = %node, token.id = %token_id, peer.addr = %peer, "node joined");
        }
        Message::Error(e) => {
            shared.metrics.join_rejected(e.code.as_str());
            if e.code != ErrorCode::RateLimited {
                shared
                    .join_limiter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record_failure(peer, Instant::now());
            }
            tracing::warn!(node.name = %node, token.id = %token_id, peer.addr = %peer, reason = %e.code, "join refused: {}", e.message);
        }
        _ => {}
    }
    reply
}

async fn decide(shared: &Arc<Shared>, request: JoinRequest, peer: IpAddr) -> Message {
    if !request.version.is_supported() {
        return Message::error(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported by this cloudcore (it speaks {})",
                request.version,
                proto::PROTOCOL_VERSION
            ),
        );
    }
    let allowed = shared
        .join_limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allows(peer, Instant::now());
    if !allowed {
        return Message::error(
            ErrorCode::RateLimited,
            format!("too many failed join attempts from {peer}; wait and retry"),
        );
    }
    let token = match BootstrapToken::parse(&request.token) {
        Ok(t) => t,
        Err(e) => return Message::error(ErrorCode::TokenMalformed, e.to_string()),
    };
    if let Err(e) = validate_node_name(&request.node_name) {
        return Message::error(ErrorCode::NodeNameInvalid, e.to_string());
    }
    if let Err(e) = validate_labels(&request.labels) {
        return Message::error(ErrorCode::LabelsInvalid, e);
    }
    // Parse (and verify the self-signature of) the CSR before touching the token.
    if let Err(e) = crate::pki::check_csr(&request.csr_der) {
        return Message::error(ErrorCode::CsrInvalid, format!("{e}: {}", source_text(&e)));
    }
    let worker = shared.clone();
    let lifetime = shared.config.cert_lifetime;
    let result = tokio::task::spawn_blocking(move || {
        let ca = worker.ca.clone();
        worker
            .registry
            .admit_join(&token, &request.node_name, &request.labels, || {
                ca.sign_node_csr(&request.csr_der, &request.node_name, lifetime)
            })
    })
    .await;
    match result {
        Ok(Ok(Ok((_admission, issued)))) => Message::JoinResponse(JoinResponse {
            certificate_der: issued.der,
            ca_der: shared.ca.cert_der().to_vec(),
        }),
        Ok(Ok(Err(refusal))) => Message::error(refusal_code(&refusal), refusal.to_string()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, cause = %source_text(&e), "join failed inside cloudcore");
            Message::error(
                ErrorCode::Internal,
                "cloudcore could not record the join; see its log",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "join task failed");
            Message::error(
                ErrorCode::Internal,
                "cloudcore could not record the join; see its log",
            )
        }
    }
}

/// The chain of causes of an error, for one-line log messages.
pub fn source_text(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_then_refills() {
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        let mut limiter = JoinLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.allows(ip, t0));
            limiter.record_failure(ip, t0);
        }
        assert!(!limiter.allows(ip, t0));
        assert!(limiter.allows(other, t0), "limits are per address");
        assert!(!limiter.allows(ip, t0 + Duration::from_secs(9)));
        assert!(limiter.allows(ip, t0 + Duration::from_secs(10)));
    }
}
