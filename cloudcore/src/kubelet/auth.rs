//! Who may call a node's kubelet endpoint, decided as a kubelet with
//! `--client-ca-file` and `--authentication-token-webhook`/`--authorization-mode=Webhook` does:
//! an x509 client certificate verified against the cluster's client CA (ConfigMap
//! `kube-system/extension-apiserver-authentication`, key `client-ca-file`, watched), or a bearer
//! token checked with a `TokenReview`; then a `SubjectAccessReview` for the node, with the
//! subresource the path maps to. Answers are cached briefly.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where a cluster publishes its client CA for aggregated API servers and kubelets.
pub const CLIENT_CA_NAMESPACE: &str = "kube-system";
pub const CLIENT_CA_CONFIGMAP: &str = "extension-apiserver-authentication";
pub const CLIENT_CA_KEY: &str = "client-ca-file";

/// How long a TokenReview's answer is reused.
const TOKEN_TTL: Duration = Duration::from_secs(10);
/// How long an allowed SubjectAccessReview is reused (the kubelet: 5 min).
const ALLOWED_TTL: Duration = Duration::from_secs(30);
/// How long a denied one is reused (the kubelet: 30 s).
const DENIED_TTL: Duration = Duration::from_secs(10);
/// Entries per cache; a full cache is emptied (cheap, and bounded under a flood of tokens).
const CACHE_CAP: usize = 4096;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The authorization attributes of a request, as the kubelet derives them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub verb: &'static str,
    pub subresource: &'static str,
}

/// The kubelet's mapping: the HTTP method gives the verb; `/stats/*` → `stats`, `/metrics/*` →
/// `metrics`, `/logs/*` → `log`, `/spec/*` → `spec`, anything else (`/exec`, `/attach`,
/// `/portForward`, `/run`, `/containerLogs`, `/healthz`) → `proxy`.
pub fn attributes(method: &http::Method, path: &str) -> Attributes {
    let verb = match *method {
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "get",
    };
    let under = |prefix: &str| {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    let subresource = if under("/stats") {
        "stats"
    } else if under("/metrics") {
        "metrics"
    } else if under("/logs") {
        "log"
    } else if under("/spec") {
        "spec"
    } else {
        "proxy"
    };
    Attributes { verb, subresource }
}

/// Why a request is refused: 401, 403, or 500 when the reviews themselves failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Unauthorized(String),
    Forbidden(String),
    Failed(String),
}

impl Denial {
    pub fn code(&self) -> u16 {
        match self {
            Denial::Unauthorized(_) => 401,
            Denial::Forbidden(_) => 403,
            Denial::Failed(_) => 500,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Denial::Unauthorized(m) | Denial::Forbidden(m) | Denial::Failed(m) => m,
        }
    }
}

/// A small TTL map. Each entry keeps its own expiry.
#[derive(Debug)]
struct Cache<K, V> {
    entries: HashMap<K, (Instant, V)>,
}

impl<K: Eq + Hash, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Cache {
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, key: &K) -> Option<V> {
        match self.entries.get(key) {
            Some((until, v)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: K, value: V, ttl: Duration) {
        if self.entries.len() >= CACHE_CAP {
            self.entries.clear();
        }
        self.entries.insert(key, (Instant::now() + ttl, value));
    }
}

type Decisions = Cache<(UserInfo, String, Attributes), Result<(), String>>;

/// Authentication and authorization for every node listener; one per `serve`.
pub struct Auth {
    client: kube::Client,
    /// The current client CA's verifier; replaced when the ConfigMap changes. Held only to
    /// clone the `Arc`, never across an await.
    client_ca: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    /// sha256(token) → the user it authenticated as (`None`: not authenticated). Std mutexes,
    /// never held across an await.
    tokens: Mutex<Cache<[u8; 32], Option<UserInfo>>>,
    decisions: Mutex<Decisions>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(client: kube::Client) -> Arc<Auth> {
        Arc::new(Auth {
            client,
            client_ca: RwLock::new(None),
            tokens: Mutex::new(Cache::new()),
            decisions: Mutex::new(Cache::new()),
        })
    }

    /// Uses the certificates of `pem` as the client CA from now on; returns how many.
    pub fn set_client_ca(&self, pem: &str) -> Result<usize, String> {
        let mut roots = rustls::RootCertStore::empty();
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("{CLIENT_CA_KEY}: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("{CLIENT_CA_KEY}: unusable certificate: {e}"))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!("{CLIENT_CA_KEY} holds no certificate"));
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            crate::pki::crypto_provider(),
        )
        .build()
        .map_err(|e| format!("{CLIENT_CA_KEY}: {e}"))?;
        *self.client_ca.write().unwrap_or_else(|p| p.into_inner()) = Some(verifier);
        Ok(found)
    }

    fn verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.client_ca
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The caller: the verified client certificate's CN and O's, else the bearer token's user
    /// by TokenReview; anything else is 401.
    pub async fn authenticate(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        headers: &http::HeaderMap,
    ) -> Result<UserInfo, Denial> {
        let mut why = Vec::new();
        if let Some([leaf, intermediates @ ..]) = certs {
            match self.verify_certificate(leaf, intermediates) {
                Ok(user) => return Ok(user),
                Err(e) => why.push(e),
            }
        }
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        if let Some(token) = bearer {
            match self.review_token(token).await? {
                Some(user) => return Ok(user),
                None => why.push("the bearer token is not valid".into()),
            }
        }
        if why.is_empty() {
            why.push("no client certificate and no bearer token".into());
        }
        tracing::debug!(reasons = %why.join("; "), "kubelet endpoint: unauthenticated request");
        Err(Denial::Unauthorized("Unauthorized".into()))
    }

    fn verify_certificate(
        &self,
        leaf: &CertificateDer<'static>,
        intermediates: &[CertificateDer<'static>],
    ) -> Result<UserInfo, String> {
        let verifier = self.verifier().ok_or_else(|| {
            format!(
                "the client CA ({CLIENT_CA_NAMESPACE}/{CLIENT_CA_CONFIGMAP}) has not been read yet"
            )
        })?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| format!("client certificate refused: {e}"))?;
        let (name, groups) = crate::pki::user_of(leaf).map_err(|e| e.to_string())?;
        Ok(UserInfo {
            name,
            uid: String::new(),
            groups,
            extra: BTreeMap::new(),
        })
    }

    async fn review_token(&self, token: &str) -> Result<Option<UserInfo>, Denial> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(cached) = self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(cached);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denial::Failed(format!("TokenReview failed: {e}")))?;
        let user = answer
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .map(|u| UserInfo {
                name: u.username.unwrap_or_default(),
                uid: u.uid.unwrap_or_default(),
                groups: u.groups.unwrap_or_default(),
                extra: u.extra.unwrap_or_default(),
            });
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key, user.clone(), TOKEN_TTL);
        Ok(user)
    }

    /// Whether `user` may do `attributes` on the Node `node`, by SubjectAccessReview; a denial
    /// is 403 with the kubelet's message.
    pub async fn authorize(
        &self,
        user: &UserInfo,
        node: &str,
        attributes: &Attributes,
    ) -> Result<(), Denial> {
        let key = (user.clone(), node.to_string(), attributes.clone());
        let cached = self
            .decisions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key);
        let decision = match cached {
            Some(d) => d,
            None => {
                let d = self.review_access(user, node, attributes).await?;
                let ttl = if d.is_ok() { ALLOWED_TTL } else { DENIED_TTL };
                self.decisions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .put(key, d.clone(), ttl);
                d
            }
        };
        decision.map_err(|reason| {
            tracing::debug!(user = %user.name, node.name = %node, reason = %reason, "kubelet endpoint: forbidden");
            Denial::Forbidden(forbidden_message(user, attributes))
        })
    }

    async fn review_access(
        &self,
        user: &UserInfo,
        node: &str,
        attributes: &Attributes,
    ) -> Result<Result<(), String>, Denial> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(attributes.subresource.into()),
                    name: Some(node.to_string()),
                    verb: Some(attributes.verb.into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denial::Failed(format!("SubjectAccessReview failed: {e}")))?;
        Ok(match answer.status {
            Some(s) if s.allowed => Ok(()),
            Some(s) => Err(s.reason.unwrap_or_default()),
            None => Err("no status in the review".into()),
        })
    }
}

/// The kubelet's 403 message.
pub fn forbidden_message(user: &UserInfo, attributes: &Attributes) -> String {
    format!(
        "Forbidden (user={}, verb={}, resource=nodes, subresource={})",
        user.name, attributes.verb, attributes.subresource
    )
}

/// Keeps `auth`'s client CA current from the cluster's ConfigMap until cancelled.
pub async fn watch_client_ca(client: kube::Client, auth: Arc<Auth>, shutdown: CancellationToken) {
    let api: Api<ConfigMap> = Api::namespaced(client, CLIENT_CA_NAMESPACE);
    let config = watcher::Config::default().fields(&format!("metadata.name={CLIENT_CA_CONFIGMAP}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = events.next() => next,
        };
        match next {
            Some(Ok(cm)) => {
                let pem = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(CLIENT_CA_KEY))
                    .cloned()
                    .unwrap_or_default();
                match auth.set_client_ca(&pem) {
                    Ok(n) => tracing::info!(
                        certificates = n,
                        "kubelet endpoint: client CA read from {CLIENT_CA_NAMESPACE}/{CLIENT_CA_CONFIGMAP}"
                    ),
                    Err(e) => tracing::warn!(
                        "kubelet endpoint: {CLIENT_CA_NAMESPACE}/{CLIENT_CA_CONFIGMAP}: {e}; client certificates are refused until it is fixed"
                    ),
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "kubelet endpoint: watching the client CA failed; retrying")
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_follow_the_kubelet() {
        let get = http::Method::GET;
        let post = http::Method::POST;
        let cases = [
            (&get, "/metrics/resource", "get", "metrics"),
            (&get, "/metrics", "get", "metrics"),
            (&get, "/stats/summary", "get", "stats"),
            (&get, "/containerLogs/ns/p/c", "get", "proxy"),
            (&post, "/exec/ns/p/c", "create", "proxy"),
            (&get, "/exec/ns/p/c", "get", "proxy"),
            (&post, "/portForward/ns/p", "create", "proxy"),
            (&post, "/run/ns/p/c", "create", "proxy"),
            (&get, "/healthz", "get", "proxy"),
            (&get, "/metricsx", "get", "proxy"),
            (&get, "/logs/messages", "get", "log"),
        ];
        for (method, path, verb, subresource) in cases {
            assert_eq!(
                attributes(method, path),
                Attributes { verb, subresource },
                "{method} {path}"
            );
        }
    }

    #[test]
    fn forbidden_reads_like_the_kubelet() {
        let user = UserInfo {
            name: "system:serviceaccount:default:viewer".into(),
            uid: String::new(),
            groups: vec![],
            extra: BTreeMap::new(),
        };
        assert_eq!(
            forbidden_message(&user, &attributes(&http::Method::POST, "/exec/a/b/c")),
            "Forbidden (user=system:serviceaccount:default:viewer, verb=create, resource=nodes, subresource=proxy)"
        );
    }

    #[test]
    fn cache_entries_expire_and_a_full_cache_is_emptied() {
        let mut cache: Cache<u32, bool> = Cache::new();
        cache.put(1, true, Duration::from_secs(60));
        cache.put(2, true, Duration::ZERO);
        assert_eq!(cache.get(&1), Some(true));
        assert_eq!(cache.get(&2), None);
        for i in 0..CACHE_CAP as u32 + 1 {
            cache.put(i + 10, false, Duration::from_secs(60));
        }
        assert!(cache.entries.len() <= CACHE_CAP);
        assert_eq!(cache.get(&1), None);
    }

    #[tokio::test]
    async fn client_ca_must_hold_a_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::pki::ClusterCa::load_or_create(dir.path()).expect("ca");
        // No client needed to parse: a bogus URL never dialled.
        let config = kube::Config::new("https://127.0.0.1:1".parse().expect("url"));
        let auth = Auth::new(kube::Client::try_from(config).expect("client"));
        assert!(auth.set_client_ca("").is_err());
        assert_eq!(auth.set_client_ca(ca.cert_pem()), Ok(1));
        let (cert, _) = ca
            .issue_client_certificate(
                "kube-apiserver-kubelet-client",
                &["system:masters"],
                Duration::from_secs(60),
            )
            .expect("cert");
        let user = auth.verify_certificate(&cert, &[]).expect("verified");
        assert_eq!(user.name, "kube-apiserver-kubelet-client");
        assert_eq!(user.groups, vec!["system:masters".to_string()]);
        let other = tempfile::tempdir().expect("tempdir");
        let other = crate::pki::ClusterCa::load_or_create(other.path()).expect("ca");
        let (stranger, _) = other
            .issue_client_certificate("admin", &["system:masters"], Duration::from_secs(60))
            .expect("cert");
        assert!(auth.verify_certificate(&stranger, &[]).is_err());
    }
}
