//! Service-account tokens for pods' projected `serviceAccountToken` volume sources, obtained
//! from the cloud over the tunnel and kept in `edge.db` (docs/tokens.md).
//!
//! ```text
//! volume writer ─lookup(key)─► Tokens ◄─answer(TokenResponse)── hub ◄── cloud
//!   (every pass)    │  held tokens (memory + edge.db), wants, requests in flight
//!                   └─due()──► hub ─TokenRequest──► cloud ─► TokenRequest API
//! ```
//!
//! The volume writer asks with [`Tokens::lookup`], which records that the pod wants the token
//! and answers from what is held (the last token, even past its expiry: the API server decides
//! whether it still accepts it). The hub sends what [`Tokens::due`] hands out (a token not held
//! yet, or held past its refresh point) on the current session and gives the answers to
//! [`Tokens::answer`], which writes the token to `edge.db` before holding it, so a restart
//! offline mounts it again. The pods manager calls [`Tokens::retain_pods`] with the pods it
//! runs, and the tokens of every other pod are dropped, from memory and from the store.
//!
//! Refresh as the kubelet does: at 80 % of the lifetime the API granted, or after 24 h,
//! whichever comes first ([`refresh_at`]); the 24 h cap is `HubConfig::token_refresh_max`
//! (`edgecore run --token-refresh-max`), which tests lower to see a refresh within seconds.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ServiceAccountTokenProjection};
use proto::{ErrorCode, ObjectRef, TokenRequest, TokenResponse};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::store::{Store, StoreError, StoredToken};

/// The service account of a pod that does not name one.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// `expirationSeconds` of a projected token source that does not set it.
pub const DEFAULT_EXPIRATION_SECONDS: u64 = 3600;
/// The longest a token is used before a new one is asked for (the kubelet's 24 h).
pub const DEFAULT_REFRESH_MAX: Duration = Duration::from_secs(24 * 3600);
/// A request without an answer by then is asked again (the cloud may have lost it).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Which token: one projected source of one pod (by uid).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    pub service_account: String,
    /// Empty for the API server's default audiences.
    pub audience: String,
    pub expiration_seconds: u64,
}

impl TokenKey {
    /// The token a projected source of `pod` asks for.
    pub fn of(pod: &Pod, source: &ServiceAccountTokenProjection) -> Self {
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string());
        TokenKey {
            pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            pod_name: pod.metadata.name.clone().unwrap_or_default(),
            service_account,
            audience: source.audience.clone().unwrap_or_default(),
            expiration_seconds: source
                .expiration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .unwrap_or(DEFAULT_EXPIRATION_SECONDS),
        }
    }

    /// A short description for pod status messages and logs.
    fn describe(&self) -> String {
        let audience = if self.audience.is_empty() {
            "the API server's audiences".to_string()
        } else {
            format!("audience {:?}", self.audience)
        };
        format!(
            "service account {}/{} ({audience})",
            self.namespace, self.service_account
        )
    }
}

/// A token held for a source. `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq)]
pub struct HeldToken {
    pub token: String,
    /// The API server's expiry, Unix seconds.
    pub expires_at: i64,
    /// When a new one is asked for, Unix seconds on the edge's clock.
    pub refresh_at: i64,
}

impl std::fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldToken")
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish_non_exhaustive()
    }
}

/// When to ask for a new token: at 80 % of the `lifetime` the API granted, counted from when
/// the edge `received` it, or `max` after it, whichever comes first. The lifetime comes from
/// the cloud (expiry minus the cloud's time of issue), so a gateway clock that is off does not
/// move the refresh point against the expiry.
pub fn refresh_at(received: i64, lifetime_seconds: u64, max: Duration) -> i64 {
    let eighty_percent = lifetime_seconds / 5 * 4 + lifetime_seconds % 5 * 4 / 5;
    let after = eighty_percent.min(max.as_secs());
    received.saturating_add(i64::try_from(after).unwrap_or(i64::MAX))
}

/// How long to wait before asking again after the cloud said no. Retries are decided here
/// only.
fn retry_after(code: ErrorCode) -> Duration {
    match code {
        // Embedded control plane: asking again only helps once the cloud changes.
        ErrorCode::NotSupported => Duration::from_secs(60),
        // Not (yet) bound here as the cloud sees it: the pod may still be on its way.
        ErrorCode::Forbidden => Duration::from_secs(10),
        _ => Duration::from_secs(5),
    }
}

/// Why a volume has no token to write yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenUnavailable {
    #[error("no token for {0} yet: waiting for the cloud")]
    Waiting(String),
    #[error("no token for {what}: the cloud answered: {why}")]
    Refused { what: String, why: String },
}

/// What a pod's volume wants, and where asking for it stands.
#[derive(Debug, Default)]
struct Want {
    /// The request in flight and when it was sent.
    asked: Option<(u64, Instant)>,
    /// No request before this (after a refusal).
    not_before: Option<Instant>,
    /// The cloud's last refusal, shown in the pod's status while no token is held.
    refused: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    held: HashMap<TokenKey, HeldToken>,
    wants: HashMap<TokenKey, Want>,
    /// Requests in flight, by request id.
    pending: HashMap<u64, TokenKey>,
    next_id: u64,
}

/// The edge's service-account tokens (see the module doc).
#[derive(Debug)]
pub struct Tokens {
    /// A std mutex: held for map operations only, never across an await or a SQLite call.
    state: Mutex<State>,
    /// `None` keeps tokens in memory only (tests and benchmarks).
    store: Option<Mutex<Store>>,
    /// Wakes the hub when a pod starts wanting a token.
    wanted: Notify,
    /// The uid of each pod a token (first or refreshed) arrived for: its worker writes the
    /// volume at once rather than at its next periodic step ([`Tokens::arrivals`]).
    arrived: tokio::sync::broadcast::Sender<String>,
    refresh_max: Duration,
}

/// Token arrivals a worker may miss before it is told it lagged (and then looks anyway).
const ARRIVALS_QUEUED: usize = 64;

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Tokens {
    /// Opens the tokens kept in `DIR/edge.db`.
    pub fn open(data_dir: &Path, refresh_max: Duration) -> Result<Arc<Tokens>, StoreError> {
        let store = Store::open(data_dir)?;
        let mut state = State::default();
        for row in store.tokens()? {
            let key = TokenKey {
                pod_uid: row.pod_uid,
                namespace: row.namespace,
                pod_name: row.pod_name,
                service_account: row.service_account,
                audience: row.audience,
                expiration_seconds: row.expiration_seconds,
            };
            let held = HeldToken {
                token: row.token,
                expires_at: row.expires_at,
                refresh_at: row.refresh_at,
            };
            state.held.insert(key, held);
        }
        Ok(Arc::new(Tokens {
            state: Mutex::new(state),
            store: Some(Mutex::new(store)),
            wanted: Notify::new(),
            arrived: tokio::sync::broadcast::channel(ARRIVALS_QUEUED).0,
            refresh_max,
        }))
    }

    /// Tokens kept in memory only, for tests and benchmarks.
    pub fn in_memory(refresh_max: Duration) -> Arc<Tokens> {
        Arc::new(Tokens {
            state: Mutex::default(),
            store: None,
            wanted: Notify::new(),
            arrived: tokio::sync::broadcast::channel(ARRIVALS_QUEUED).0,
            refresh_max,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token to write for `key`: the one held (even past its expiry), else why there is
    /// none. Records that the pod wants it, so the hub asks the cloud.
    pub fn lookup(&self, key: &TokenKey) -> Result<String, TokenUnavailable> {
        let mut state = self.state();
        if !state.wants.contains_key(key) {
            state.wants.insert(key.clone(), Want::default());
            self.wanted.notify_one();
        }
        if let Some(held) = state.held.get(key) {
            return Ok(held.token.clone());
        }
        match state.wants.get(key).and_then(|w| w.refused.clone()) {
            Some(why) => Err(TokenUnavailable::Refused {
                what: key.describe(),
                why,
            }),
            None => Err(TokenUnavailable::Waiting(key.describe())),
        }
    }

    /// Resolves when a pod starts wanting a token it has not asked for before.
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// A new session: requests in flight on the old one are lost, and refusals are forgotten,
    /// so everything due goes out at once.
    pub fn session_started(&self) {
        let mut state = self.state();
        state.pending.clear();
        for want in state.wants.values_mut() {
            want.asked = None;
            want.not_before = None;
        }
    }

    /// The requests to send now: every wanted token not held, or held past its refresh point,
    /// that is not already asked for (or was asked for over 30 s ago without an answer).
    pub fn due(&self, now: Instant, now_unix: i64) -> Vec<TokenRequest> {
        let mut state = self.state();
        let State {
            held,
            wants,
            pending,
            next_id,
        } = &mut *state;
        let mut requests = Vec::new();
        for (key, want) in wants.iter_mut() {
            let needed = held.get(key).is_none_or(|h| now_unix >= h.refresh_at);
            let waiting = want
                .asked
                .is_some_and(|(_, at)| now.duration_since(at) < ANSWER_TIMEOUT);
            let held_back = want.not_before.is_some_and(|t| now < t);
            if !needed || waiting || held_back {
                continue;
            }
            if let Some((old, _)) = want.asked.take() {
                pending.remove(&old);
            }
            *next_id += 1;
            let id = *next_id;
            want.asked = Some((id, now));
            pending.insert(id, key.clone());
            requests.push(TokenRequest {
                request_id: id,
                pod: ObjectRef {
                    kind: "Pod".into(),
                    namespace: key.namespace.clone(),
                    name: key.pod_name.clone(),
                    uid: key.pod_uid.clone(),
                },
                service_account: key.service_account.clone(),
                audience: key.audience.clone(),
                expiration_seconds: key.expiration_seconds,
            });
        }
        requests
    }

    /// Takes the cloud's answer: a token is written to the store, then held (the volume
    /// writer picks it up on its next pass as a new version of the volume); a refusal is kept
    /// for the pod's status and asked again later. Answers to requests not in flight (an
    /// earlier session's, a dropped pod's) are ignored.
    pub async fn answer(self: &Arc<Self>, response: TokenResponse) {
        let key = {
            let mut state = self.state();
            let Some(key) = state.pending.remove(&response.request_id) else {
                tracing::debug!(
                    request_id = response.request_id,
                    "token answer for no request in flight; ignored"
                );
                return;
            };
            if let Some(want) = state.wants.get_mut(&key) {
                want.asked = None;
            }
            key
        };
        let issued = match response.result {
            Ok(issued) => issued,
            Err(e) => {
                tracing::warn!(pod.uid = %key.pod_uid, code = %e.code, "no service-account token for {}: {}", key.describe(), e.message);
                let mut state = self.state();
                if let Some(want) = state.wants.get_mut(&key) {
                    want.not_before = Some(Instant::now() + retry_after(e.code));
                    want.refused = Some(e.message);
                }
                return;
            }
        };
        let received = unix_now();
        let held = HeldToken {
            token: issued.token,
            expires_at: issued.expires_at_unix,
            refresh_at: refresh_at(received, issued.lifetime_seconds, self.refresh_max),
        };
        if let Err(e) = self.persist(&key, &held).await {
            // Still usable now; only a restart before the next refresh would miss it.
            tracing::warn!(pod.uid = %key.pod_uid, error = %e, "cannot keep the service-account token in the store");
        }
        tracing::info!(
            pod.uid = %key.pod_uid,
            expires_at = held.expires_at,
            refresh_in_s = held.refresh_at - received,
            "service-account token for {}",
            key.describe()
        );
        let pod_uid = key.pod_uid.clone();
        let held_now = {
            let mut state = self.state();
            // The pod may have gone while the token was on its way.
            match state.wants.get_mut(&key) {
                Some(want) => {
                    want.refused = None;
                    state.held.insert(key, held);
                    true
                }
                None => false,
            }
        };
        if held_now {
            // No receiver (no worker yet) is fine: a new worker writes its volumes anyway.
            let _ = self.arrived.send(pod_uid);
        }
    }

    /// The uids of the pods tokens arrive for, from now on.
    pub fn arrivals(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.arrived.subscribe()
    }

    async fn persist(self: &Arc<Self>, key: &TokenKey, held: &HeldToken) -> Result<(), StoreError> {
        if self.store.is_none() {
            return Ok(());
        }
        let row = StoredToken {
            pod_uid: key.pod_uid.clone(),
            namespace: key.namespace.clone(),
            pod_name: key.pod_name.clone(),
            service_account: key.service_account.clone(),
            audience: key.audience.clone(),
            expiration_seconds: key.expiration_seconds,
            token: held.token.clone(),
            expires_at: held.expires_at,
            refresh_at: held.refresh_at,
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || match &this.store {
            Some(store) => store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put_token(&row),
            None => Ok(()),
        })
        .await
        .unwrap_or(Ok(()))
    }

    /// Drops the tokens and wants of every pod not in `running` (by uid), from memory and from
    /// the store: a deleted pod's token is gone.
    pub async fn retain_pods(self: &Arc<Self>, running: &HashSet<String>) {
        let dropped: Vec<String> = {
            let mut state = self.state();
            let mut dropped: HashSet<String> = HashSet::new();
            state.held.retain(|key, _| {
                let keep = running.contains(&key.pod_uid);
                if !keep {
                    dropped.insert(key.pod_uid.clone());
                }
                keep
            });
            state.wants.retain(|key, _| running.contains(&key.pod_uid));
            state
                .pending
                .retain(|_, key| running.contains(&key.pod_uid));
            dropped.into_iter().collect()
        };
        if dropped.is_empty() || self.store.is_none() {
            return;
        }
        tracing::info!(
            pods = dropped.len(),
            "dropping the service-account tokens of pods gone from this node"
        );
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || match &this.store {
            Some(store) => store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .delete_pod_tokens(&dropped),
            None => Ok(()),
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "cannot drop service-account tokens from the store");
        }
    }

    /// Holds a token directly (tests and benchmarks).
    pub fn hold(&self, key: TokenKey, held: HeldToken) {
        self.state().held.insert(key, held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{ErrorMessage, IssuedToken};
    use serde_json::json;

    fn pod(uid: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": uid},
            "spec": {"containers": [{"name": "c"}]}
        }))
        .unwrap()
    }

    fn key(uid: &str) -> TokenKey {
        let source: ServiceAccountTokenProjection =
            serde_json::from_value(json!({"path": "token", "expirationSeconds": 3607})).unwrap();
        TokenKey::of(&pod(uid), &source)
    }

    fn issued(token: &str, lifetime_seconds: u64) -> Result<IssuedToken, ErrorMessage> {
        Ok(IssuedToken {
            token: token.into(),
            expires_at_unix: unix_now() + lifetime_seconds as i64,
            lifetime_seconds,
        })
    }

    #[test]
    fn refresh_point_is_80_percent_of_the_lifetime_or_the_cap() {
        let day = DEFAULT_REFRESH_MAX;
        let cases = [
            // (lifetime, cap, refresh after)
            (3600, day, 2880),
            (3607, day, 2885),
            (600, day, 480),
            (31_536_000, day, 86_400),
            (3600, Duration::from_secs(5), 5),
            (0, day, 0),
            (1, day, 0),
            (u64::MAX, day, 86_400),
        ];
        for (lifetime, cap, after) in cases {
            assert_eq!(
                refresh_at(1_000, lifetime, cap),
                1_000 + after,
                "lifetime {lifetime}"
            );
        }
        assert_eq!(refresh_at(i64::MAX - 1, 600, day), i64::MAX);
    }

    #[test]
    fn key_defaults_service_account_and_lifetime() {
        let k = key("u-1");
        assert_eq!(k.service_account, "default");
        assert_eq!(k.audience, "");
        assert_eq!(k.expiration_seconds, 3607);
        let source: ServiceAccountTokenProjection =
            serde_json::from_value(json!({"path": "t", "audience": "vault"})).unwrap();
        let mut named = pod("u-1");
        named.spec.as_mut().unwrap().service_account_name = Some("reader".into());
        let k = TokenKey::of(&named, &source);
        assert_eq!(
            (k.service_account.as_str(), k.audience.as_str()),
            ("reader", "vault")
        );
        assert_eq!(k.expiration_seconds, DEFAULT_EXPIRATION_SECONDS);
    }

    #[tokio::test]
    async fn a_wanted_token_is_asked_once_held_and_refreshed_when_due() {
        let tokens = Tokens::in_memory(DEFAULT_REFRESH_MAX);
        let k = key("u-1");
        let now = Instant::now();
        assert!(tokens.due(now, unix_now()).is_empty(), "nothing wanted yet");
        assert_eq!(
            tokens.lookup(&k),
            Err(TokenUnavailable::Waiting(
                "service account default/default (the API server's audiences)".into()
            ))
        );
        let sent = tokens.due(now, unix_now());
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].pod.uid, "u-1");
        assert_eq!(sent[0].expiration_seconds, 3607);
        assert!(tokens.due(now, unix_now()).is_empty(), "in flight");
        tokens
            .answer(TokenResponse {
                request_id: sent[0].request_id,
                result: issued("jwt-1", 3600),
            })
            .await;
        assert_eq!(tokens.lookup(&k).as_deref(), Ok("jwt-1"));
        assert!(tokens.due(now, unix_now()).is_empty(), "fresh");
        let refresh = unix_now() + 2880;
        let again = tokens.due(now, refresh);
        assert_eq!(again.len(), 1, "due at 80 %");
        assert_eq!(tokens.lookup(&k).as_deref(), Ok("jwt-1"), "kept meanwhile");
        tokens
            .answer(TokenResponse {
                request_id: again[0].request_id,
                result: issued("jwt-2", 3600),
            })
            .await;
        assert_eq!(tokens.lookup(&k).as_deref(), Ok("jwt-2"));
    }

    #[tokio::test]
    async fn an_arrived_token_is_announced_with_its_pods_uid() {
        let tokens = Tokens::in_memory(DEFAULT_REFRESH_MAX);
        let mut arrivals = tokens.arrivals();
        let _ = tokens.lookup(&key("u-7"));
        let sent = tokens.due(Instant::now(), unix_now());
        tokens
            .answer(TokenResponse {
                request_id: sent[0].request_id,
                result: issued("jwt-7", 3600),
            })
            .await;
        assert_eq!(arrivals.try_recv().as_deref(), Ok("u-7"));
        assert!(arrivals.try_recv().is_err(), "one announcement per token");
    }

    #[tokio::test]
    async fn unanswered_requests_are_asked_again_and_a_new_session_asks_at_once() {
        let tokens = Tokens::in_memory(DEFAULT_REFRESH_MAX);
        let k = key("u-1");
        let _ = tokens.lookup(&k);
        let now = Instant::now();
        let first = tokens.due(now, 0);
        assert!(tokens.due(now + Duration::from_secs(29), 0).is_empty());
        let second = tokens.due(now + ANSWER_TIMEOUT, 0);
        assert_eq!(second.len(), 1);
        assert_ne!(second[0].request_id, first[0].request_id);
        // A late answer to the first request is ignored.
        tokens
            .answer(TokenResponse {
                request_id: first[0].request_id,
                result: issued("late", 3600),
            })
            .await;
        assert!(tokens.lookup(&k).is_err());
        tokens.session_started();
        assert_eq!(tokens.due(now + ANSWER_TIMEOUT, 0).len(), 1);
    }

    #[tokio::test]
    async fn a_refusal_shows_in_the_lookup_and_is_retried_later() {
        let tokens = Tokens::in_memory(DEFAULT_REFRESH_MAX);
        let k = key("u-1");
        let _ = tokens.lookup(&k);
        let sent = tokens.due(Instant::now(), 0);
        tokens
            .answer(TokenResponse {
                request_id: sent[0].request_id,
                result: Err(ErrorMessage {
                    code: ErrorCode::NotSupported,
                    message: "the embedded control plane cannot issue service-account tokens"
                        .into(),
                }),
            })
            .await;
        let err = tokens.lookup(&k).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no token for service account default/default (the API server's audiences): the cloud answered: the embedded control plane cannot issue service-account tokens"
        );
        let now = Instant::now();
        assert!(tokens.due(now, 0).is_empty(), "held back");
        assert_eq!(tokens.due(now + Duration::from_secs(61), 0).len(), 1);
    }

    #[tokio::test]
    async fn tokens_are_kept_in_the_store_and_dropped_with_their_pod() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = (key("u-1"), key("u-2"));
        {
            let tokens = Tokens::open(dir.path(), DEFAULT_REFRESH_MAX).unwrap();
            for k in [&k1, &k2] {
                let _ = tokens.lookup(k);
            }
            for request in tokens.due(Instant::now(), 0) {
                let token = format!("jwt-{}", request.pod.uid);
                tokens
                    .answer(TokenResponse {
                        request_id: request.request_id,
                        result: issued(&token, 3600),
                    })
                    .await;
            }
        }
        // A restart (offline): the tokens are there, and not due yet.
        let tokens = Tokens::open(dir.path(), DEFAULT_REFRESH_MAX).unwrap();
        assert_eq!(tokens.lookup(&k1).as_deref(), Ok("jwt-u-1"));
        assert_eq!(tokens.lookup(&k2).as_deref(), Ok("jwt-u-2"));
        assert!(tokens.due(Instant::now(), unix_now()).is_empty());
        tokens
            .retain_pods(&HashSet::from(["u-2".to_string()]))
            .await;
        assert!(tokens.lookup(&k1).is_err(), "pod u-1 is gone");
        drop(tokens);
        let tokens = Tokens::open(dir.path(), DEFAULT_REFRESH_MAX).unwrap();
        assert!(tokens.lookup(&k1).is_err(), "and gone from the store");
        assert_eq!(tokens.lookup(&k2).as_deref(), Ok("jwt-u-2"));
    }
}
