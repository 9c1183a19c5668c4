//! `--state=cluster` (kube mode): the registry's shared part — join tokens, nodes, their
//! certificates and revocations, kubelet ports — lives in the cluster as Secrets in one
//! namespace, so several `serve` replicas and the CLI share it. `DIR/cloudcore.db` stays as this
//! replica's cache and for what is per process (connection marks, the heartbeat, the served
//! store): a watch mirrors the Secrets into it, so a handshake's `certificate_status` or a
//! node's labels are answered locally, and a revocation made anywhere changes the database
//! from a second connection, which `hub::watch_revocations` notices within its poll interval.
//!
//! One Secret per record (type `edge.io/registry`, label `edge.io/registry=token|node|port`,
//! the record as JSON under `record.json`): `edge-token-ID`, `edge-node-NAME` (with the node's
//! certificates) and `edge-kubelet-port-N` (a port's claim; its name makes the port unique
//! across the fleet). Every change is a read-modify-replace with the read's resourceVersion as
//! precondition, retried on conflict, so two replicas taking a token's last use admit one.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{
    Admission, AdmitError, JoinRefusal, KubeletPortRange, KubeletPorts, NewToken, Registry,
    RegistryError, RenewalRefusal, TokenRecord, now_ms, to_ms,
};
use crate::token::{BootstrapToken, hashes_match};

/// The label every registry Secret carries; its value is the record's kind.
pub const KIND_LABEL: &str = "edge.io/registry";
/// The Secret type of registry records.
pub const SECRET_TYPE: &str = "edge.io/registry";
const RECORD_KEY: &str = "record.json";
/// Read-modify-replace attempts before a write gives up. With [`conflict_pause`] between them
/// a writer keeps trying for about 10 s: a multi-use token that a fleet's gateways join with
/// at once is one Secret that every join rewrites, and each lost race costs a pause.
const CONFLICT_RETRIES: u32 = 16;
/// The first pause after a lost race, doubled each time up to [`CONFLICT_PAUSE_MAX`].
const CONFLICT_PAUSE_MIN: Duration = Duration::from_millis(10);
const CONFLICT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// How long to wait before attempt `attempt` (0 = the first, no wait) of a read-modify-replace:
/// a uniformly random share of a cap that doubles from [`CONFLICT_PAUSE_MIN`] to
/// [`CONFLICT_PAUSE_MAX`] ("full jitter"), so writers that collided spread out instead of
/// colliding again, as client-go's `RetryOnConflict` does with its backoff.
fn conflict_pause(attempt: u32, unit: f64) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let cap = CONFLICT_PAUSE_MIN
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(CONFLICT_PAUSE_MAX);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

/// Sleeps [`conflict_pause`] before attempt `attempt`.
async fn pause_before(attempt: u32) {
    let pause = conflict_pause(attempt, rand::random::<f64>());
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
}
/// A port claim whose node does not hold the port is taken over after this long (a replica
/// died between claiming and recording it).
const ORPHAN_CLAIM_AFTER: Duration = Duration::from_secs(60);

/// The namespace the shared state lives in unless `--state-namespace` says otherwise.
pub fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "edge-system".into())
}

/// A cluster registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{action} secret {namespace}/{name} failed")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("listing the registry secrets in {namespace} failed")]
    List {
        namespace: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("secret {namespace}/{name} holds no valid registry record: {why}")]
    Corrupt {
        namespace: String,
        name: String,
        why: String,
    },
    #[error(
        "secret {namespace}/{name} kept changing under {CONFLICT_RETRIES} attempts to update it"
    )]
    Contended { namespace: String, name: String },
}

/// A join token as stored: the secret only as a hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenDoc {
    pub id: String,
    pub secret_hash: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub uses_left: i64,
    pub node: Option<String>,
    pub revoked_ms: Option<i64>,
}

/// A certificate issued to a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertDoc {
    pub serial: String,
    pub issued_ms: i64,
    pub not_after_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// A node as stored, with every certificate issued to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeDoc {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub joined_ms: i64,
    pub revoked_ms: Option<i64>,
    pub kubelet_port: Option<u16>,
    pub certificates: Vec<CertDoc>,
}

impl NodeDoc {
    /// Holds an unrevoked, unexpired certificate and is not revoked.
    fn live(&self, now: i64) -> bool {
        self.revoked_ms.is_none()
            && self
                .certificates
                .iter()
                .any(|c| c.revoked_ms.is_none() && c.not_after_ms > now)
    }
}

/// A kubelet port's claim.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PortDoc {
    port: u16,
    node: String,
}

/// A record read from the cluster, with the resourceVersion a replace must match.
struct Read<T> {
    doc: T,
    version: Option<String>,
}

fn token_secret(id: &str) -> String {
    format!("edge-token-{id}")
}

/// `edge-node-NAME`, or a hash of the name when that would be too long for a Secret's name.
pub fn node_secret(name: &str) -> String {
    let plain = format!("edge-node-{name}");
    if plain.len() <= 253 {
        plain
    } else {
        format!("edge-node-h-{}", &hex::encode(Sha256::digest(name))[..40])
    }
}

fn port_secret(port: u16) -> String {
    format!("edge-kubelet-port-{port}")
}

/// The record kind of a registry Secret (its [`KIND_LABEL`]).
fn kind_of(secret: &Secret) -> Option<&str> {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(KIND_LABEL))
        .map(String::as_str)
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The cluster side of a [`Registry`] in `--state=cluster`.
#[derive(Debug)]
pub struct ClusterState {
    api: Api<Secret>,
    namespace: String,
    runtime: tokio::runtime::Handle,
}

impl ClusterState {
    /// The shared state in `namespace`, through `client`. Must be called inside a multi-thread
    /// tokio runtime: the registry's synchronous methods wait on the API through it.
    pub fn new(client: Client, namespace: &str) -> Self {
        ClusterState {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn client(&self) -> Client {
        self.api.clone().into_client()
    }

    /// Runs `f` to completion from synchronous code (a `spawn_blocking` thread, the CLI, or a
    /// runtime worker, which `block_in_place` hands over first).
    fn block<F: Future>(&self, f: F) -> F::Output {
        tokio::task::block_in_place(|| self.runtime.block_on(f))
    }

    fn api_err(
        &self,
        action: &'static str,
        name: &str,
    ) -> impl FnOnce(kube::Error) -> ClusterError {
        let namespace = self.namespace.clone();
        let name = name.to_string();
        move |source| ClusterError::Api {
            action,
            namespace,
            name,
            source: Box::new(source),
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, secret: &Secret) -> Result<T, ClusterError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let corrupt = |why: String| ClusterError::Corrupt {
            namespace: self.namespace.clone(),
            name: name.clone(),
            why,
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(RECORD_KEY))
            .ok_or_else(|| corrupt(format!("no {RECORD_KEY}")))?;
        serde_json::from_slice(&bytes.0).map_err(|e| corrupt(format!("{RECORD_KEY}: {e}")))
    }

    fn encode<T: Serialize>(name: &str, kind: &str, doc: &T, version: Option<String>) -> Secret {
        let json = serde_json::to_vec(doc).unwrap_or_default();
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(BTreeMap::from([(KIND_LABEL.to_string(), kind.to_string())])),
                resource_version: version,
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.to_string()),
            data: Some(BTreeMap::from([(RECORD_KEY.to_string(), ByteString(json))])),
            ..Default::default()
        }
    }

    async fn read<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
    ) -> Result<Option<Read<T>>, ClusterError> {
        let secret = self
            .api
            .get_opt(name)
            .await
            .map_err(self.api_err("reading", name))?;
        match secret {
            None => Ok(None),
            Some(s) => Ok(Some(Read {
                doc: self.decode(&s)?,
                version: s.metadata.resource_version.clone(),
            })),
        }
    }

    /// Creates (`version` None) or replaces with the `version` precondition. `Ok(false)` when
    /// someone else won (409: AlreadyExists or a changed resourceVersion).
    async fn write<T: Serialize>(
        &self,
        name: &str,
        kind: &str,
        doc: &T,
        version: Option<String>,
    ) -> Result<bool, ClusterError> {
        let secret = Self::encode(name, kind, doc, version.clone());
        let pp = PostParams::default();
        let result = match version {
            None => self.api.create(&pp, &secret).await.map(|_| ()),
            Some(_) => self.api.replace(name, &pp, &secret).await.map(|_| ()),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_code(&e, 409) => Ok(false),
            Err(e) => Err(self.api_err("writing", name)(e)),
        }
    }

    async fn delete(&self, name: &str) -> Result<(), ClusterError> {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 404) => Ok(()),
            Err(e) => Err(self.api_err("deleting", name)(e)),
        }
    }

    /// Every registry Secret, decoded.
    async fn list(&self) -> Result<Vec<Secret>, ClusterError> {
        let lp = kube::api::ListParams::default().labels(KIND_LABEL);
        self.api
            .list(&lp)
            .await
            .map(|l| l.items)
            .map_err(|source| ClusterError::List {
                namespace: self.namespace.clone(),
                source: Box::new(source),
            })
    }

    /// Applies one Secret to the cache through `cache` (a registry connection).
    fn apply(&self, cache: &Registry, secret: &Secret) -> Result<(), RegistryError> {
        match kind_of(secret) {
            Some("token") => cache.cache_token(&self.decode(secret)?),
            Some("node") => cache.cache_node(&self.decode(secret)?),
            _ => Ok(()),
        }
    }

    /// Fills the cache from a fresh list: records that are gone are dropped.
    pub async fn load_into(&self, cache: &Registry) -> Result<(), RegistryError> {
        let secrets = self.list().await?;
        self.replace_cache(cache, &secrets)
    }

    fn replace_cache(&self, cache: &Registry, secrets: &[Secret]) -> Result<(), RegistryError> {
        let mut tokens = HashSet::new();
        let mut nodes = HashSet::new();
        for secret in secrets {
            match self.apply(cache, secret) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %daemon::error_chain(&e), "skipping a registry secret");
                    continue;
                }
            }
            match kind_of(secret) {
                Some("token") => {
                    if let Ok(t) = self.decode::<TokenDoc>(secret) {
                        tokens.insert(t.id);
                    }
                }
                Some("node") => {
                    if let Ok(n) = self.decode::<NodeDoc>(secret) {
                        nodes.insert(n.name);
                    }
                }
                _ => {}
            }
        }
        cache.cache_retain(&tokens, &nodes)
    }

    /// Mirrors every change of the registry Secrets into `cache` until `shutdown`. `cache`
    /// must be a connection of its own, so its commits change the serving connection's
    /// `data_version`.
    pub async fn follow(self: Arc<Self>, cache: Registry, shutdown: CancellationToken) {
        let config = watcher::Config::default().labels(KIND_LABEL);
        let stream = watcher(self.api.clone(), config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut relist: Option<Vec<Secret>> = None;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            let Some(event) = event else { return };
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(error = %e, "registry watch interrupted; the watcher retries");
                    continue;
                }
            };
            let result = match event {
                watcher::Event::Init => {
                    relist = Some(Vec::new());
                    Ok(())
                }
                watcher::Event::InitApply(s) => {
                    relist.get_or_insert_with(Vec::new).push(s);
                    Ok(())
                }
                watcher::Event::InitDone => {
                    let secrets = relist.take().unwrap_or_default();
                    self.replace_cache(&cache, &secrets)
                }
                watcher::Event::Apply(s) => self.apply(&cache, &s),
                watcher::Event::Delete(s) => match kind_of(&s) {
                    Some("token") => self
                        .decode::<TokenDoc>(&s)
                        .map_err(RegistryError::from)
                        .and_then(|t| cache.cache_forget_token(&t.id)),
                    Some("node") => self
                        .decode::<NodeDoc>(&s)
                        .map_err(RegistryError::from)
                        .and_then(|n| cache.cache_forget_node(&n.name)),
                    _ => Ok(()),
                },
            };
            if let Err(e) = result {
                tracing::warn!(error = %daemon::error_chain(&e), "cannot mirror a registry change");
            }
        }
    }

    pub fn create_token(&self, new: &NewToken) -> Result<TokenRecord, RegistryError> {
        let now = now_ms();
        let doc = TokenDoc {
            id: new.token.id.clone(),
            secret_hash: new.token.secret_hash(),
            created_ms: now,
            expires_ms: now + new.ttl.as_millis() as i64,
            uses_left: new.uses.into(),
            node: new.node.clone(),
            revoked_ms: None,
        };
        let name = token_secret(&doc.id);
        if !self.block(self.write(&name, "token", &doc, None))? {
            return Err(ClusterError::Contended {
                namespace: self.namespace.clone(),
                name,
            }
            .into());
        }
        Ok(TokenRecord {
            id: doc.id,
            created_ms: doc.created_ms,
            expires_ms: doc.expires_ms,
            uses_left: doc.uses_left,
            node: doc.node,
            revoked: false,
        })
    }

    /// Read-modify-replace of one record: `change` returns `None` to write nothing.
    async fn update<T, R>(
        &self,
        name: &str,
        kind: &str,
        mut change: impl FnMut(&mut T) -> Option<R>,
    ) -> Result<Option<(T, Option<R>)>, ClusterError>
    where
        T: Serialize + for<'de> Deserialize<'de> + Clone,
    {
        for attempt in 0..CONFLICT_RETRIES {
            pause_before(attempt).await;
            let Some(Read { mut doc, version }) = self.read::<T>(name).await? else {
                return Ok(None);
            };
            let Some(out) = change(&mut doc) else {
                return Ok(Some((doc, None)));
            };
            if self.write(name, kind, &doc, version).await? {
                return Ok(Some((doc, Some(out))));
            }
        }
        Err(ClusterError::Contended {
            namespace: self.namespace.clone(),
            name: name.to_string(),
        })
    }

    pub fn revoke_token(&self, cache: &Registry, id: &str) -> Result<bool, RegistryError> {
        let now = now_ms();
        let result = self.block(
            self.update::<TokenDoc, ()>(&token_secret(id), "token", |t| {
                if t.revoked_ms.is_some() {
                    return None;
                }
                t.revoked_ms = Some(now);
                Some(())
            }),
        )?;
        match result {
            None => Ok(false),
            Some((doc, _)) => {
                cache.cache_token(&doc)?;
                Ok(true)
            }
        }
    }

    pub fn revoke_node(&self, cache: &Registry, name: &str) -> Result<bool, RegistryError> {
        let now = now_ms();
        let result =
            self.block(
                self.update::<NodeDoc, Option<u16>>(&node_secret(name), "node", |n| {
                    let port = n.kubelet_port.take();
                    n.revoked_ms.get_or_insert(now);
                    for c in &mut n.certificates {
                        c.revoked_ms.get_or_insert(now);
                    }
                    Some(port)
                }),
            )?;
        let Some((doc, released)) = result else {
            return Ok(false);
        };
        if let Some(Some(port)) = released
            && let Err(e) = self.block(self.delete(&port_secret(port)))
        {
            tracing::warn!(error = %daemon::error_chain(&e), port, "cannot release a revoked node's kubelet port");
        }
        cache.cache_node(&doc)?;
        Ok(true)
    }

    /// Takes a kubelet port for `node` in `range` that no other node claims: the lowest free
    /// one by the cache, then by the claims' names in the cluster.
    async fn claim_port(
        &self,
        cache: &Registry,
        node: &str,
        range: KubeletPortRange,
    ) -> Result<Option<u16>, RegistryError> {
        let taken = cache.cached_kubelet_ports(node)?;
        for port in range.first..=range.last {
            if taken.contains(&port) {
                continue;
            }
            let name = port_secret(port);
            let doc = PortDoc {
                port,
                node: node.to_string(),
            };
            if self.write(&name, "port", &doc, None).await? {
                return Ok(Some(port));
            }
            // Claimed already: ours (an earlier attempt), or an orphan whose node never
            // recorded it.
            let Some(claim) = self.read::<PortDoc>(&name).await? else {
                continue;
            };
            if claim.doc.node == node {
                return Ok(Some(port));
            }
            let holder = self.read::<NodeDoc>(&node_secret(&claim.doc.node)).await?;
            let held = holder.is_some_and(|h| h.doc.kubelet_port == Some(port));
            if !held && self.claim_age(&name).await? > ORPHAN_CLAIM_AFTER {
                let precondition = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: claim.version.clone(),
                        uid: None,
                    }),
                    ..Default::default()
                };
                let _ = self.api.delete(&name, &precondition).await;
                if self.write(&name, "port", &doc, None).await? {
                    return Ok(Some(port));
                }
            }
        }
        Ok(None)
    }

    async fn claim_age(&self, name: &str) -> Result<Duration, ClusterError> {
        let secret = self
            .api
            .get_opt(name)
            .await
            .map_err(self.api_err("reading", name))?;
        let created = secret
            .and_then(|s| s.metadata.creation_timestamp)
            .map(|t| t.0.as_millisecond());
        Ok(created.map_or(Duration::ZERO, |ms| {
            Duration::from_millis((now_ms() - ms).max(0) as u64)
        }))
    }

    async fn release_port(&self, port: u16, node: &str) {
        let name = port_secret(port);
        if let Ok(Some(claim)) = self.read::<PortDoc>(&name).await
            && claim.doc.node == node
            && let Err(e) = self.delete(&name).await
        {
            tracing::warn!(error = %daemon::error_chain(&e), port, "cannot release a kubelet port claim");
        }
    }

    /// Gives back one use of a token consumed for a join that then lost its node name.
    async fn give_back_use(&self, id: &str) {
        let result = self
            .update::<TokenDoc, ()>(&token_secret(id), "token", |t| {
                t.uses_left += 1;
                Some(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %daemon::error_chain(&e), token = id, "cannot give back a token use");
        }
    }

    /// `Registry::admit_join` against the cluster: the token's use is taken with a
    /// resourceVersion precondition, then the node record is created (or replaced with a
    /// precondition); a join that loses the name to another replica gives the use back.
    #[allow(clippy::type_complexity)]
    pub fn admit_join<E>(
        &self,
        cache: &Registry,
        token: &BootstrapToken,
        node_name: &str,
        labels: &BTreeMap<String, String>,
        sign: impl FnOnce() -> Result<crate::pki::IssuedCertificate, E>,
    ) -> Result<Result<(Admission, crate::pki::IssuedCertificate), JoinRefusal>, AdmitError<E>>
    {
        let kubelet_ports = cache.kubelet_ports.get().copied();
        let mut sign = Some(sign);
        let mut issued = None;
        for attempt in 0..CONFLICT_RETRIES {
            self.block(pause_before(attempt));
            let step = self.block(self.try_admit(
                cache,
                token,
                node_name,
                labels,
                kubelet_ports,
                &mut sign,
                &mut issued,
            ));
            match step {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(AdmitError::Cluster(ClusterError::Contended {
            namespace: self.namespace.clone(),
            name: token_secret(&token.id),
        }))
    }

    /// One attempt; `Ok(None)` when a precondition failed and the join should be retried.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    async fn try_admit<E, S>(
        &self,
        cache: &Registry,
        token: &BootstrapToken,
        node_name: &str,
        labels: &BTreeMap<String, String>,
        kubelet_ports: Option<KubeletPortRange>,
        sign: &mut Option<S>,
        issued: &mut Option<crate::pki::IssuedCertificate>,
    ) -> Result<
        Option<Result<(Admission, crate::pki::IssuedCertificate), JoinRefusal>>,
        AdmitError<E>,
    >
    where
        S: FnOnce() -> Result<crate::pki::IssuedCertificate, E>,
    {
        let now = now_ms();
        let id = token.id.clone();
        let Some(Read {
            doc: mut t,
            version: token_version,
        }) = self
            .read::<TokenDoc>(&token_secret(&id))
            .await
            .map_err(AdmitError::Cluster)?
        else {
            return Ok(Some(Err(JoinRefusal::TokenUnknown { id })));
        };
        if let Err(refusal) = admits(&t, token, node_name, now) {
            return Ok(Some(Err(refusal)));
        }
        let existing = self
            .read::<NodeDoc>(&node_secret(node_name))
            .await
            .map_err(AdmitError::Cluster)?;
        if t.node.is_none()
            && let Some(n) = &existing
            && n.doc.live(now)
        {
            return Ok(Some(Err(JoinRefusal::NameTaken {
                name: node_name.to_string(),
            })));
        }
        let own_port = existing.as_ref().and_then(|n| n.doc.kubelet_port);
        let port = match kubelet_ports {
            None => own_port,
            Some(range) => match own_port.filter(|p| (range.first..=range.last).contains(p)) {
                Some(p) => Some(p),
                None => match self
                    .claim_port(cache, node_name, range)
                    .await
                    .map_err(registry_to_admit)?
                {
                    Some(p) => Some(p),
                    None => {
                        return Ok(Some(Err(JoinRefusal::NoKubeletPort {
                            name: node_name.to_string(),
                            first: range.first,
                            last: range.last,
                        })));
                    }
                },
            },
        };
        let new_port = port.filter(|p| Some(*p) != own_port);
        if issued.is_none() {
            let Some(sign) = sign.take() else {
                return Ok(None);
            };
            match sign() {
                Ok(cert) => *issued = Some(cert),
                Err(e) => {
                    if let Some(p) = new_port {
                        self.release_port(p, node_name).await;
                    }
                    return Err(AdmitError::Sign(e));
                }
            }
        }
        let Some(cert) = issued.clone() else {
            return Ok(None);
        };
        // The token's use first, with its resourceVersion: of racing joins one wins. A loser
        // reads the token again and takes a use of that, keeping its port and certificate, for
        // as long as the token still admits it: a fleet joining with one token contends on this
        // write alone, not on the whole join.
        let mut token_version = token_version;
        let mut attempt = 0;
        loop {
            t.uses_left -= 1;
            let taken = self
                .write(&token_secret(&id), "token", &t, token_version)
                .await;
            let outcome = match taken {
                Ok(true) => break,
                Ok(false) if attempt + 1 < CONFLICT_RETRIES => {
                    attempt += 1;
                    pause_before(attempt).await;
                    match self.read::<TokenDoc>(&token_secret(&id)).await {
                        Ok(Some(read)) => match admits(&read.doc, token, node_name, now_ms()) {
                            Ok(()) => {
                                t = read.doc;
                                token_version = read.version;
                                continue;
                            }
                            Err(refusal) => Ok(Some(Err(refusal))),
                        },
                        Ok(None) => Ok(Some(Err(JoinRefusal::TokenUnknown { id: id.clone() }))),
                        Err(e) => Err(AdmitError::Cluster(e)),
                    }
                }
                Ok(false) => Err(AdmitError::Cluster(ClusterError::Contended {
                    namespace: self.namespace.clone(),
                    name: token_secret(&id),
                })),
                Err(e) => Err(AdmitError::Cluster(e)),
            };
            if let Some(p) = new_port {
                self.release_port(p, node_name).await;
            }
            return outcome;
        }
        let mut certificates = existing
            .as_ref()
            .map(|n| n.doc.certificates.clone())
            .unwrap_or_default();
        // A join replaces the node's identity: older certificates stop working.
        for c in &mut certificates {
            c.revoked_ms.get_or_insert(now);
        }
        certificates.push(CertDoc {
            serial: cert.serial.clone(),
            issued_ms: now,
            not_after_ms: to_ms(cert.not_after),
            revoked_ms: None,
        });
        let node = NodeDoc {
            name: node_name.to_string(),
            labels: labels.clone(),
            joined_ms: now,
            revoked_ms: None,
            kubelet_port: port,
            certificates,
        };
        let node_version = existing.and_then(|n| n.version);
        let written = self
            .write(&node_secret(node_name), "node", &node, node_version)
            .await
            .map_err(AdmitError::Cluster)?;
        if !written {
            // Another replica changed the node meanwhile: give the use back and start over
            // (the next attempt sees a live name and refuses it, or retries a bound token).
            self.give_back_use(&id).await;
            if let Some(p) = new_port {
                self.release_port(p, node_name).await;
            }
            return Ok(None);
        }
        if let Some(old) = own_port.filter(|p| Some(*p) != port) {
            self.release_port(old, node_name).await;
        }
        cache.cache_token(&t).map_err(registry_to_admit)?;
        cache.cache_node(&node).map_err(registry_to_admit)?;
        Ok(Some(Ok((
            Admission {
                token_id: id,
                uses_left: t.uses_left,
            },
            cert,
        ))))
    }

    /// `Registry::renew_certificate` against the cluster.
    pub fn renew_certificate<E>(
        &self,
        cache: &Registry,
        node: &str,
        presented_serial: &str,
        sign: impl FnOnce() -> Result<crate::pki::IssuedCertificate, E>,
    ) -> Result<Result<crate::pki::IssuedCertificate, RenewalRefusal>, AdmitError<E>> {
        let mut sign = Some(sign);
        let mut issued: Option<crate::pki::IssuedCertificate> = None;
        for attempt in 0..CONFLICT_RETRIES {
            self.block(pause_before(attempt));
            let read = self
                .block(self.read::<NodeDoc>(&node_secret(node)))
                .map_err(AdmitError::Cluster)?;
            let Some(Read { mut doc, version }) = read else {
                return Ok(Err(RenewalRefusal::UnknownCertificate));
            };
            let Some(presented) = doc
                .certificates
                .iter()
                .find(|c| c.serial == presented_serial)
            else {
                return Ok(Err(RenewalRefusal::UnknownCertificate));
            };
            if presented.revoked_ms.is_some() || doc.revoked_ms.is_some() {
                return Ok(Err(RenewalRefusal::Revoked));
            }
            let now = now_ms();
            let halfway = presented.issued_ms + (presented.not_after_ms - presented.issued_ms) / 2;
            if now < halfway {
                return Ok(Err(RenewalRefusal::TooEarly {
                    not_before_ms: halfway,
                }));
            }
            if issued.is_none() {
                let Some(sign) = sign.take() else { break };
                issued = Some(sign().map_err(AdmitError::Sign)?);
            }
            let Some(cert) = issued.clone() else { break };
            doc.certificates.push(CertDoc {
                serial: cert.serial.clone(),
                issued_ms: now,
                not_after_ms: to_ms(cert.not_after),
                revoked_ms: None,
            });
            let written = self
                .block(self.write(&node_secret(node), "node", &doc, version))
                .map_err(AdmitError::Cluster)?;
            if written {
                cache.cache_node(&doc).map_err(registry_to_admit)?;
                return Ok(Ok(cert));
            }
        }
        Err(AdmitError::Cluster(ClusterError::Contended {
            namespace: self.namespace.clone(),
            name: node_secret(node),
        }))
    }

    /// `Registry::assign_kubelet_ports` against the cluster: nodes without a port in `range`
    /// claim one, then the cache answers.
    pub fn assign_kubelet_ports(
        &self,
        cache: &Registry,
        range: KubeletPortRange,
    ) -> Result<KubeletPorts, RegistryError> {
        let nodes = cache.cached_live_node_ports()?;
        for (name, port) in nodes {
            if port.is_some_and(|p| (range.first..=range.last).contains(&p)) {
                continue;
            }
            self.block(self.move_port(cache, &name, port, range))?;
        }
        cache.cached_assignment()
    }

    async fn move_port(
        &self,
        cache: &Registry,
        name: &str,
        old: Option<u16>,
        range: KubeletPortRange,
    ) -> Result<(), RegistryError> {
        let Some(port) = self.claim_port(cache, name, range).await? else {
            // Full: the node keeps none; `cached_assignment` reports it.
            return Ok(());
        };
        let result = self
            .update::<NodeDoc, ()>(&node_secret(name), "node", |n| {
                if n.revoked_ms.is_some() {
                    return None;
                }
                n.kubelet_port = Some(port);
                Some(())
            })
            .await?;
        match result {
            Some((doc, Some(()))) => {
                if let Some(old) = old {
                    self.release_port(old, name).await;
                }
                cache.cache_node(&doc)
            }
            _ => {
                self.release_port(port, name).await;
                Ok(())
            }
        }
    }

    /// Records where edges dial on the CA Secret, for `token create` through any replica.
    pub async fn record_cloud_address(&self, address: &str) -> Result<(), ClusterError> {
        let patch = serde_json::json!({
            "metadata": {"annotations": {CLOUD_ADDRESS_ANNOTATION: address}}
        });
        self.api
            .patch(
                crate::pki::CA_SECRET,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(self.api_err("annotating", crate::pki::CA_SECRET))
    }

    /// The address recorded by [`Self::record_cloud_address`].
    pub fn cloud_address(&self) -> Result<Option<String>, ClusterError> {
        let secret = self
            .block(self.api.get_opt(crate::pki::CA_SECRET))
            .map_err(self.api_err("reading", crate::pki::CA_SECRET))?;
        Ok(secret
            .and_then(|s| s.metadata.annotations)
            .and_then(|mut a| a.remove(CLOUD_ADDRESS_ANNOTATION)))
    }
}

/// The annotation on the CA Secret naming the address edges dial.
pub const CLOUD_ADDRESS_ANNOTATION: &str = "edge.io/cloud-address";

/// Whether the token as stored (`t`) admits `node_name` now: the secret matches, it is not
/// revoked or expired, a use is left, and it is not bound to another node.
fn admits(
    t: &TokenDoc,
    token: &BootstrapToken,
    node_name: &str,
    now: i64,
) -> Result<(), JoinRefusal> {
    let id = token.id.clone();
    if !hashes_match(&t.secret_hash, &token.secret_hash()) {
        return Err(JoinRefusal::SecretMismatch { id });
    }
    if t.revoked_ms.is_some() {
        return Err(JoinRefusal::Revoked { id });
    }
    if t.expires_ms <= now {
        let ago =
            humantime::format_duration(Duration::from_secs(((now - t.expires_ms) / 1000) as u64));
        return Err(JoinRefusal::Expired {
            id,
            ago: ago.to_string(),
        });
    }
    if t.uses_left <= 0 {
        return Err(JoinRefusal::UsedUp { id });
    }
    if let Some(bound) = &t.node
        && bound != node_name
    {
        return Err(JoinRefusal::NodeMismatch {
            id,
            bound: bound.clone(),
            requested: node_name.to_string(),
        });
    }
    Ok(())
}

fn registry_to_admit<E>(e: RegistryError) -> AdmitError<E> {
    match e {
        RegistryError::Cluster(c) => AdmitError::Cluster(c),
        RegistryError::Sql(s) => AdmitError::Registry(s),
        other => AdmitError::Registry(rusqlite::Error::ToSqlConversionFailure(Box::new(
            std::io::Error::other(daemon::error_chain(&other)),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_pauses_start_at_nothing_grow_to_a_cap_and_are_a_random_share_of_it() {
        assert_eq!(
            conflict_pause(0, 1.0),
            Duration::ZERO,
            "the first attempt waits for nothing"
        );
        let caps: Vec<Duration> = (1..CONFLICT_RETRIES)
            .map(|a| conflict_pause(a, 1.0))
            .collect();
        assert_eq!(caps[0], CONFLICT_PAUSE_MIN);
        assert_eq!(caps[1], CONFLICT_PAUSE_MIN * 2);
        assert!(caps.windows(2).all(|w| w[0] <= w[1]), "{caps:?}");
        assert_eq!(*caps.last().unwrap(), CONFLICT_PAUSE_MAX);
        // Long enough in all for a fleet's joins through one token to take their turns.
        let total: Duration = caps.iter().sum();
        assert!(total >= Duration::from_secs(8), "{total:?}");
        assert_eq!(conflict_pause(3, 0.5), CONFLICT_PAUSE_MIN * 2);
        assert_eq!(conflict_pause(3, 0.0), Duration::ZERO);
        assert_eq!(
            conflict_pause(u32::MAX, 1.0),
            CONFLICT_PAUSE_MAX,
            "no overflow"
        );
    }

    #[test]
    fn long_node_names_map_to_valid_distinct_secret_names() {
        assert_eq!(node_secret("gw-1"), "edge-node-gw-1");
        let a = format!("{}.a", "x".repeat(63)).repeat(4);
        let b = format!("{}.b", "x".repeat(63)).repeat(4);
        assert!(node_secret(&a).len() <= 253);
        assert_ne!(node_secret(&a), node_secret(&b));
    }

    #[test]
    fn a_node_is_live_only_with_an_unrevoked_unexpired_certificate() {
        let cert = |revoked: Option<i64>, not_after_ms| CertDoc {
            serial: "01".into(),
            issued_ms: 0,
            not_after_ms,
            revoked_ms: revoked,
        };
        let mut node = NodeDoc {
            name: "gw".into(),
            labels: BTreeMap::new(),
            joined_ms: 0,
            revoked_ms: None,
            kubelet_port: None,
            certificates: vec![cert(None, 100)],
        };
        assert!(node.live(50));
        assert!(!node.live(150));
        node.certificates = vec![cert(Some(1), 100)];
        assert!(!node.live(50));
        node.certificates = vec![cert(None, 100)];
        node.revoked_ms = Some(1);
        assert!(!node.live(50));
    }
}
