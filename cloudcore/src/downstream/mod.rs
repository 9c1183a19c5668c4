//! What each edge node should hold, taken from the cluster through kube-rs, and the per-edge
//! sync state that sends it (KubeEdge's edgecontroller "downstream").
//!
//! Watchers (pods with a `spec.nodeName`, ConfigMaps, Secrets, edge Nodes, KubeEdge's Devices
//! and DeviceModels) feed an [`Index`]: for every edge node its desired set is its own Node, the
//! pods bound to it, the ConfigMaps and Secrets those pods reference ([`refs`]), the Devices
//! bound to it and the DeviceModels those reference ([`device_index`]) — in the spirit of
//! Kubernetes' Node authorizer — plus every Service and EndpointSlice of the cluster
//! ([`services`]: what a node's kube-proxy and DNS read too). The desired sets live in one [`CloudPeer`] per edge (the sans-IO engine in
//! `proto::sync`); tunnel sessions [`Downstream::attach`] to their peer and a pump task moves the
//! peer's messages into the session's bounded send queue.
//!
//! Bodies are serialized once per object version and shared (`Arc`) by every edge that holds
//! it. A reconnecting edge's resync waits for the watchers' first full list (so an empty cache
//! never tells edges to delete everything) and for one of a bounded number of resync slots (so
//! a reconnect storm is paced).

pub mod device_index;
pub mod refs;
pub mod services;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use proto::HeldObject;
use proto::Message;
use proto::sync::{CloudPeer, DesiredObject, ObjectKey, PeerConfig, Resync, ResyncPlan};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::device_crds;
use crate::metrics::Metrics;
use crate::nodes::EDGE_ROLE_LABEL;
use crate::tokens::BoundPod;
use crate::upstream::Upstream;
use refs::{PodRefs, pod_refs};
use services::ClusterWide;

/// Kinds an edge may hold.
pub const KINDS: [&str; 8] = [
    "Node",
    "Pod",
    "ConfigMap",
    "Secret",
    devices::DEVICE_KIND,
    devices::DEVICE_MODEL_KIND,
    "Service",
    "EndpointSlice",
];

/// The kinds an edge holds because something bound to it references them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Referenced {
    /// Referenced by a pod.
    ConfigMap,
    /// Referenced by a pod.
    Secret,
    /// Referenced by a Device (`spec.deviceModelRef`).
    DeviceModel,
}

impl Referenced {
    /// The object kind in the sync protocol.
    pub fn kind(self) -> &'static str {
        match self {
            Referenced::ConfigMap => "ConfigMap",
            Referenced::Secret => "Secret",
            Referenced::DeviceModel => devices::DEVICE_MODEL_KIND,
        }
    }
}

/// Settings of the downstream dispatcher.
#[derive(Debug, Clone)]
pub struct DownstreamConfig {
    /// Flow control and retransmission per edge.
    pub peer: PeerConfig,
    /// Edges whose initial resync may run at once; the rest wait their turn.
    pub concurrent_resyncs: usize,
    /// Messages moved from a peer to its session queue per lock.
    pub pump_batch: usize,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        DownstreamConfig {
            peer: PeerConfig::default(),
            concurrent_resyncs: 64,
            pump_batch: 64,
        }
    }
}

/// A cached object version: its identity and its body, serialized once.
#[derive(Debug, Clone)]
struct Cached {
    uid: String,
    resource_version: u64,
    body: Arc<[u8]>,
}

impl Cached {
    fn desired(&self) -> DesiredObject {
        DesiredObject {
            uid: self.uid.clone(),
            resource_version: self.resource_version,
            body: self.body.clone(),
        }
    }
}

/// Why an object from the API could not be cached.
#[derive(Debug, thiserror::Error)]
enum CacheError {
    #[error("resourceVersion {0:?} is not an integer")]
    ResourceVersion(String),
    #[error("cannot serialize: {0}")]
    Serialize(#[from] serde_json::Error),
}

fn cache<K: Resource + Serialize + Clone>(object: &K) -> Result<Cached, CacheError> {
    let rv = object.meta().resource_version.clone().unwrap_or_default();
    let resource_version = rv.parse().map_err(|_| CacheError::ResourceVersion(rv))?;
    // Field-manager bookkeeping is of no use on the edge.
    let mut trimmed = object.clone();
    trimmed.meta_mut().managed_fields = None;
    Ok(Cached {
        uid: object.meta().uid.clone().unwrap_or_default(),
        resource_version,
        body: Arc::from(serde_json::to_vec(&trimmed)?),
    })
}

/// A pod as the index remembers it.
#[derive(Debug, Clone)]
struct PodEntry {
    node: String,
    refs: PodRefs,
    /// What a token request for this pod is checked against (`crate::tokens`).
    token_check: BoundPod,
}

/// One edge: its sync engine and the wake-up of its current session's pump.
#[derive(Debug)]
struct EdgeState {
    peer: CloudPeer,
    /// Which session owns the peer; a stale session's calls are ignored.
    session: u64,
    waker: Arc<Notify>,
}

/// The cluster objects edges care about, and who references what.
#[derive(Debug)]
pub struct Index {
    peer_config: PeerConfig,
    pods: HashMap<(String, String), PodEntry>,
    pod_bodies: HashMap<(String, String), Cached>,
    config_maps: HashMap<(String, String), Cached>,
    secrets: HashMap<(String, String), Cached>,
    nodes: HashMap<String, Cached>,
    /// Devices by (namespace, name), bound to a node or not.
    devices: HashMap<(String, String), device_index::DeviceEntry>,
    device_models: HashMap<(String, String), Cached>,
    /// ConfigMap/Secret/DeviceModel key -> node -> number of that node's pods or Devices
    /// referencing it.
    referrers: HashMap<ObjectKey, HashMap<String, usize>>,
    /// Services and EndpointSlices: every edge holds all of them ([`services`]).
    cluster_wide: HashMap<ObjectKey, Cached>,
    /// Node -> what is bound to it: the reverse of `pods`, `devices` and `referrers`, so a new
    /// edge's desired set comes from its own objects. A pass over every object for each new
    /// edge made a restart with 10,000 edges and 30,000 objects quadratic (16 s of CPU).
    bound: HashMap<String, Bound>,
    edges: HashMap<String, EdgeState>,
}

/// What is bound to one node ([`Index::bound`]).
#[derive(Debug, Default)]
struct Bound {
    pods: HashSet<(String, String)>,
    devices: HashSet<(String, String)>,
    referenced: HashSet<ObjectKey>,
}

impl Bound {
    fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.devices.is_empty() && self.referenced.is_empty()
    }
}

fn pod_key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new("Pod", namespace, name)
}

fn ref_keys(namespace: &str, refs: &PodRefs) -> impl Iterator<Item = ObjectKey> {
    refs.config_maps
        .iter()
        .map(move |n| ObjectKey::new("ConfigMap", namespace, n))
        .chain(
            refs.secrets
                .iter()
                .map(move |n| ObjectKey::new("Secret", namespace, n)),
        )
        .collect::<Vec<_>>()
        .into_iter()
}

impl Index {
    /// An empty index.
    pub fn new(peer_config: PeerConfig) -> Self {
        Index {
            peer_config,
            pods: HashMap::new(),
            pod_bodies: HashMap::new(),
            config_maps: HashMap::new(),
            secrets: HashMap::new(),
            nodes: HashMap::new(),
            devices: HashMap::new(),
            device_models: HashMap::new(),
            referrers: HashMap::new(),
            cluster_wide: HashMap::new(),
            bound: HashMap::new(),
            edges: HashMap::new(),
        }
    }

    /// Changes what is recorded as bound to `node`, dropping a node left with nothing.
    fn rebind(&mut self, node: &str, change: impl FnOnce(&mut Bound)) {
        if node.is_empty() {
            return;
        }
        let bound = self.bound.entry(node.to_string()).or_default();
        change(bound);
        if bound.is_empty() {
            self.bound.remove(node);
        }
    }

    /// Takes a pod out of the index (and out of its node's bound set).
    fn take_pod(&mut self, id: &(String, String)) -> Option<PodEntry> {
        let old = self.pods.remove(id)?;
        self.rebind(&old.node, |b| {
            b.pods.remove(id);
        });
        Some(old)
    }

    /// Puts a pod into the index (and into its node's bound set).
    fn put_pod(&mut self, id: (String, String), entry: PodEntry) {
        let node = entry.node.clone();
        self.rebind(&node, |b| {
            b.pods.insert(id.clone());
        });
        self.pods.insert(id, entry);
    }

    /// The cached version of a ConfigMap, Secret or DeviceModel.
    fn referenced(&self, key: &ObjectKey) -> Option<&Cached> {
        let id = (key.namespace.clone(), key.name.clone());
        match key.kind.as_str() {
            "ConfigMap" => self.config_maps.get(&id),
            "Secret" => self.secrets.get(&id),
            devices::DEVICE_MODEL_KIND => self.device_models.get(&id),
            _ => None,
        }
    }

    /// The cache of one referenced kind.
    fn referenced_objects(&mut self, kind: Referenced) -> &mut HashMap<(String, String), Cached> {
        match kind {
            Referenced::ConfigMap => &mut self.config_maps,
            Referenced::Secret => &mut self.secrets,
            Referenced::DeviceModel => &mut self.device_models,
        }
    }

    /// Sets what `node` should hold at `key`, if `node` is an edge this index tracks.
    fn publish(&mut self, node: &str, key: ObjectKey, object: Option<DesiredObject>) {
        if let Some(edge) = self.edges.get_mut(node) {
            edge.peer.set_desired(key, object);
            edge.waker.notify_one();
        }
    }

    /// The edge's state, created (with its desired set computed from the index) if new.
    fn edge(&mut self, node: &str) -> &mut EdgeState {
        if !self.edges.contains_key(node) {
            let mut peer = CloudPeer::new(self.peer_config.clone());
            if let Some(cached) = self.nodes.get(node) {
                peer.set_desired(ObjectKey::new("Node", "", node), Some(cached.desired()));
            }
            if let Some(bound) = self.bound.get(node) {
                for (namespace, name) in &bound.pods {
                    let id = (namespace.clone(), name.clone());
                    if let Some(body) = self.pod_bodies.get(&id) {
                        peer.set_desired(pod_key(namespace, name), Some(body.desired()));
                    }
                }
                for id in &bound.devices {
                    if let Some(entry) = self.devices.get(id) {
                        peer.set_desired(
                            device_index::device_key(&id.0, &id.1),
                            Some(entry.cached.desired()),
                        );
                    }
                }
                for key in &bound.referenced {
                    if let Some(cached) = self.referenced(key) {
                        peer.set_desired(key.clone(), Some(cached.desired()));
                    }
                }
            }
            for (key, cached) in &self.cluster_wide {
                peer.set_desired(key.clone(), Some(cached.desired()));
            }
            self.edges.insert(
                node.to_string(),
                EdgeState {
                    peer,
                    session: 0,
                    waker: Arc::new(Notify::new()),
                },
            );
        }
        self.edges
            .get_mut(node)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    fn add_refs(&mut self, node: &str, keys: impl IntoIterator<Item = ObjectKey>) {
        for key in keys {
            let count = self
                .referrers
                .entry(key.clone())
                .or_default()
                .entry(node.to_string())
                .or_insert(0);
            *count += 1;
            if *count == 1 {
                self.rebind(node, |b| {
                    b.referenced.insert(key.clone());
                });
                let cached = self.referenced(&key).map(Cached::desired);
                self.publish(node, key, cached);
            }
        }
    }

    fn remove_refs(&mut self, node: &str, keys: impl IntoIterator<Item = ObjectKey>) {
        for key in keys {
            let Some(nodes) = self.referrers.get_mut(&key) else {
                continue;
            };
            let gone = match nodes.get_mut(node) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => {
                    nodes.remove(node);
                    true
                }
                None => false,
            };
            if nodes.is_empty() {
                self.referrers.remove(&key);
            }
            if gone {
                self.rebind(node, |b| {
                    b.referenced.remove(&key);
                });
                self.publish(node, key, None);
            }
        }
    }

    /// A pod was created or changed.
    pub fn apply_pod(&mut self, pod: &Pod) {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let cached = match cache(pod) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), "not sent to edges: {e}");
                return;
            }
        };
        let id = (namespace.clone(), name.clone());
        let refs = pod_refs(pod);
        let old = self.take_pod(&id);
        if let Some(old) = &old
            && old.node != node
        {
            self.publish(&old.node, pod_key(&namespace, &name), None);
        }
        if node.is_empty() {
            self.pod_bodies.remove(&id);
            if let Some(old) = old {
                self.remove_refs(&old.node, ref_keys(&namespace, &old.refs));
            }
            return;
        }
        // Add before removing, so a reference kept across the change never drops to zero.
        self.add_refs(&node, ref_keys(&namespace, &refs));
        if let Some(old) = old {
            self.remove_refs(&old.node, ref_keys(&namespace, &old.refs));
        }
        self.publish(&node, pod_key(&namespace, &name), Some(cached.desired()));
        self.pod_bodies.insert(id.clone(), cached);
        let token_check = BoundPod::of(pod);
        self.put_pod(
            id,
            PodEntry {
                node,
                refs,
                token_check,
            },
        );
    }

    /// A pod was deleted.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let id = (namespace.to_string(), name.to_string());
        self.pod_bodies.remove(&id);
        if let Some(old) = self.take_pod(&id) {
            self.publish(&old.node, pod_key(namespace, name), None);
            self.remove_refs(&old.node, ref_keys(namespace, &old.refs));
        }
    }

    fn referencing_nodes(&self, key: &ObjectKey) -> Vec<String> {
        self.referrers
            .get(key)
            .map(|nodes| nodes.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A ConfigMap, Secret or DeviceModel was created or changed.
    fn apply_referenced<K: Resource + Serialize + Clone>(&mut self, kind: Referenced, object: &K) {
        let namespace = object.meta().namespace.clone().unwrap_or_default();
        let name = object.meta().name.clone().unwrap_or_default();
        let cached = match cache(object) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(kind = kind.kind(), object = %format!("{namespace}/{name}"), "not sent to edges: {e}");
                return;
            }
        };
        let key = ObjectKey::new(kind.kind(), &namespace, &name);
        for node in self.referencing_nodes(&key) {
            self.publish(&node, key.clone(), Some(cached.desired()));
        }
        self.referenced_objects(kind)
            .insert((namespace, name), cached);
    }

    /// A ConfigMap, Secret or DeviceModel was deleted.
    pub fn delete_referenced(&mut self, kind: Referenced, namespace: &str, name: &str) {
        let id = (namespace.to_string(), name.to_string());
        if self.referenced_objects(kind).remove(&id).is_some() {
            let key = ObjectKey::new(kind.kind(), namespace, name);
            for node in self.referencing_nodes(&key) {
                self.publish(&node, key.clone(), None);
            }
        }
    }

    /// A ConfigMap was created or changed.
    pub fn apply_config_map(&mut self, object: &ConfigMap) {
        self.apply_referenced(Referenced::ConfigMap, object);
    }

    /// A Secret was created or changed.
    pub fn apply_secret(&mut self, object: &Secret) {
        self.apply_referenced(Referenced::Secret, object);
    }

    /// An edge Node was created or changed.
    pub fn apply_node(&mut self, node: &Node) {
        let name = node.name_any();
        match cache(node) {
            Ok(cached) => {
                self.publish(
                    &name,
                    ObjectKey::new("Node", "", &name),
                    Some(cached.desired()),
                );
                self.nodes.insert(name.clone(), cached);
                // Every edge node gets its peer, so its desired set is kept while it is away.
                self.edge(&name);
            }
            Err(e) => tracing::warn!(node = %name, "not sent to the edge: {e}"),
        }
    }

    /// An edge Node was deleted.
    pub fn delete_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.publish(name, ObjectKey::new("Node", "", name), None);
        }
    }

    /// What `node` should hold at `key`, if anything.
    pub fn desired(&self, node: &str, key: &ObjectKey) -> Option<&DesiredObject> {
        self.edges.get(node)?.peer.desired(key)
    }
}

/// Holds a gauge one higher for as long as it lives.
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Shared by the watchers and the tunnel sessions.
#[derive(Debug)]
pub struct Downstream {
    /// A std mutex: held for index updates and engine calls, never across an await.
    index: Mutex<Index>,
    config: DownstreamConfig,
    metrics: Arc<Metrics>,
    /// Becomes true once every watcher has listed its resource once.
    synced: watch::Sender<bool>,
    resync_slots: Arc<Semaphore>,
    next_session: std::sync::atomic::AtomicU64,
}

/// Which session of which edge; calls from a session that was replaced are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    pub node: String,
    pub session: u64,
}

/// Where a bound pod runs, from [`Downstream::pod_location`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLocation {
    pub node: String,
    pub uid: String,
    /// The node is an edge node (its Node carries the edge role label).
    pub edge: bool,
}

/// A session's claim on its edge's peer, from [`Downstream::attach`].
#[derive(Debug)]
pub struct Attachment {
    session: SessionRef,
    pub plan: ResyncPlan,
    waker: Arc<Notify>,
    resync_slot: Option<OwnedSemaphorePermit>,
}

impl Attachment {
    /// The session this attachment belongs to.
    pub fn session_ref(&self) -> SessionRef {
        self.session.clone()
    }
}

impl Downstream {
    /// A dispatcher with an empty index; [`run`] fills it.
    pub fn new(config: DownstreamConfig, metrics: Arc<Metrics>) -> Self {
        Downstream {
            index: Mutex::new(Index::new(config.peer.clone())),
            resync_slots: Arc::new(Semaphore::new(config.concurrent_resyncs.max(1))),
            config,
            metrics,
            synced: watch::Sender::new(false),
            next_session: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change to the index.
    pub fn update(&self, change: impl FnOnce(&mut Index)) {
        change(&mut self.index());
    }

    /// Whether the watchers have listed everything once.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Starts a session's sync: waits until the cache is complete and a resync slot is free,
    /// then plans the difference from the edge's inventory.
    /// `resync` is [`Resync::Replace`] when an operator adopted a new store for the edge.
    pub async fn attach(
        &self,
        node: &str,
        inventory: Vec<HeldObject>,
        resync: Resync,
    ) -> Attachment {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
        let slot = {
            // Counted while waiting, also when the session ends meanwhile.
            let _waiting = Waiting::new(&self.metrics.sync.resyncs_waiting);
            self.resync_slots.clone().acquire_owned().await.ok()
        };
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inventory: Vec<HeldObject> = inventory
            .into_iter()
            .filter(|h| KINDS.contains(&h.object.kind.as_str()))
            .collect();
        let mut index = self.index();
        let edge = index.edge(node);
        edge.session = session;
        let plan = edge.peer.connect_with(inventory, resync);
        self.metrics.sync.record_resync(&plan);
        Attachment {
            session: SessionRef {
                node: node.to_string(),
                session,
            },
            plan,
            waker: edge.waker.clone(),
            resync_slot: slot,
        }
    }

    /// The session ended.
    pub fn detach(&self, session: &SessionRef) {
        let mut index = self.index();
        if let Some(edge) = index.edges.get_mut(&session.node)
            && edge.session == session.session
        {
            edge.peer.disconnect();
        }
    }

    /// The edge acknowledged `seqs`. Returns how many were refused (never sent).
    pub fn acknowledge(&self, session: &SessionRef, seqs: &[u64]) -> usize {
        let mut index = self.index();
        let Some(edge) = index.edges.get_mut(&session.node) else {
            return seqs.len();
        };
        if edge.session != session.session {
            return 0;
        }
        let mut refused = 0;
        for &seq in seqs {
            match edge.peer.on_ack(seq) {
                Ok(Some(acked)) => tracing::debug!(
                    target: "cloudcore::sync::acked",
                    node = %session.node,
                    kind = %acked.key.kind,
                    namespace = %acked.key.namespace,
                    name = %acked.key.name,
                    resource_version = acked.version.as_ref().map_or(0, |v| v.resource_version),
                    deleted = acked.version.is_none(),
                    "acknowledged"
                ),
                Ok(None) => {}
                Err(e) => {
                    refused += 1;
                    tracing::warn!(seq, "refusing acknowledgement: {e}");
                }
            }
        }
        edge.waker.notify_one();
        refused
    }

    /// The edge asks for `key`; whether it may see it (then it is sent again).
    pub fn request(&self, session: &SessionRef, key: &ObjectKey) -> bool {
        let mut index = self.index();
        let Some(edge) = index.edges.get_mut(&session.node) else {
            return false;
        };
        if edge.session != session.session {
            return false;
        }
        let allowed = edge.peer.request(key);
        edge.waker.notify_one();
        allowed
    }

    /// The uid of the object `node` may report status for at `key`, if it may.
    pub fn reportable_uid(&self, node: &str, key: &ObjectKey) -> Option<String> {
        match key.kind.as_str() {
            "Node" if key.name == node && key.namespace.is_empty() => Some(
                self.index()
                    .nodes
                    .get(node)
                    .map(|c| c.uid.clone())
                    .unwrap_or_default(),
            ),
            "Pod" | devices::DEVICE_KIND => self.index().desired(node, key).map(|d| d.uid.clone()),
            _ => None,
        }
    }

    /// The pod `namespace/name` if it is bound to `node`, with what a token request for it is
    /// checked against.
    pub fn bound_pod(&self, node: &str, namespace: &str, name: &str) -> Option<BoundPod> {
        self.index()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .filter(|entry| entry.node == node)
            .map(|entry| entry.token_check.clone())
    }

    /// Where the pod `namespace/name` runs, if the index holds it (pods bound to a node): the
    /// node, the pod's uid, and whether that node is an edge node of this cloudcore.
    pub fn pod_location(&self, namespace: &str, name: &str) -> Option<PodLocation> {
        let index = self.index();
        let entry = index.pods.get(&(namespace.to_string(), name.to_string()))?;
        Some(PodLocation {
            node: entry.node.clone(),
            uid: entry.token_check.uid.clone(),
            edge: index.nodes.contains_key(&entry.node) || index.edges.contains_key(&entry.node),
        })
    }

    /// Moves the peer's messages into the session's queue until the session ends. Releases
    /// the resync slot once the edge first holds exactly its desired set.
    pub async fn pump(
        &self,
        mut attachment: Attachment,
        tx: mpsc::Sender<Box<Message>>,
        cancel: CancellationToken,
    ) -> Attachment {
        let plan = attachment.plan;
        tracing::info!(
            held = plan.held,
            desired = plan.desired,
            upserts = plan.upserts,
            deletes = plan.deletes,
            "resync planned: sending the difference"
        );
        let started = tokio::time::Instant::now();
        loop {
            let (batch, deadline, synced) = {
                let mut index = self.index();
                let Some(edge) = index.edges.get_mut(&attachment.session.node) else {
                    return attachment;
                };
                if edge.session != attachment.session.session {
                    return attachment;
                }
                let now = std::time::Instant::now();
                let before = edge.peer.stats();
                edge.peer.handle_timeout(now);
                let mut batch = Vec::new();
                while batch.len() < self.config.pump_batch {
                    match edge.peer.poll_transmit(now) {
                        Some(m) => batch.push(m),
                        None => break,
                    }
                }
                let after = edge.peer.stats();
                self.metrics.sync.record_sent(before, after);
                (batch, edge.peer.poll_timeout(), edge.peer.is_synced())
            };
            if synced && attachment.resync_slot.take().is_some() {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "resync complete"
                );
            }
            let full = batch.len() == self.config.pump_batch;
            for message in batch {
                tokio::select! {
                    _ = cancel.cancelled() => return attachment,
                    sent = tx.send(Box::new(message)) => if sent.is_err() { return attachment },
                }
            }
            if full {
                continue;
            }
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return attachment,
                _ = attachment.waker.notified() => {}
                _ = sleep => {}
            }
        }
    }
}

/// Watches what edges need and keeps the index current until `shutdown`.
///
/// Every status of an edge pod or Node the watches show goes to `upstream` too, which writes
/// the edge's own status again when the API's copy drifted from it ([`crate::reconcile`]).
pub async fn run(
    client: kube::Client,
    downstream: Arc<Downstream>,
    upstream: Upstream,
    shutdown: CancellationToken,
) {
    let pods: Api<Pod> = Api::all(client.clone());
    let config_maps: Api<ConfigMap> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let device_objects: Api<DynamicObject> =
        Api::all_with(client.clone(), &device_crds::device_resource());
    let device_models: Api<DynamicObject> =
        Api::all_with(client.clone(), &device_crds::model_resource());
    let services: Api<Service> = Api::all(client.clone());
    let endpoint_slices: Api<EndpointSlice> = Api::all(client);
    let pending = Arc::new(Mutex::new(BTreeSet::from([
        "pods",
        "configmaps",
        "secrets",
        "nodes",
        devices::DEVICES,
        devices::DEVICE_MODELS,
        "services",
        "endpointslices",
    ])));
    let bound = watcher::Config::default().fields("spec.nodeName!=");
    let edge_nodes = watcher::Config::default().labels(EDGE_ROLE_LABEL);
    tokio::join!(
        follow(
            Watched {
                resource: "pods",
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(pods, bound).default_backoff(),
            |i, p| i.apply_pod(p),
            |i, namespace, name| i.delete_pod(namespace, name),
            |change| observe(&upstream, "Pod", change, |p| status_json(p.status.as_ref())),
        ),
        follow(
            Watched {
                resource: "configmaps",
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(config_maps, watcher::Config::default()).default_backoff(),
            |i, c| i.apply_config_map(c),
            |i, namespace, name| i.delete_referenced(Referenced::ConfigMap, namespace, name),
            |_| {},
        ),
        follow(
            Watched {
                resource: "secrets",
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(secrets, watcher::Config::default()).default_backoff(),
            |i, s| i.apply_secret(s),
            |i, namespace, name| i.delete_referenced(Referenced::Secret, namespace, name),
            |_| {},
        ),
        follow(
            Watched {
                resource: "nodes",
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(nodes, edge_nodes).default_backoff(),
            |i, n| i.apply_node(n),
            |i, _, name| i.delete_node(name),
            |change| observe(&upstream, "Node", change, |n| status_json(
                n.status.as_ref()
            )),
        ),
        // Devices and models: in kube mode their definitions may not be installed; the watch
        // then counts as listed (empty) and keeps retrying (`follow`).
        follow(
            Watched {
                resource: devices::DEVICES,
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(device_objects, watcher::Config::default())
                .backoff(device_index::DefinitionBackoff::new()),
            |i, d| i.apply_device(d),
            |i, namespace, name| i.delete_device(namespace, name),
            |change| observe(&upstream, devices::DEVICE_KIND, change, |d| {
                d.data["status"].clone()
            }),
        ),
        follow(
            Watched {
                resource: devices::DEVICE_MODELS,
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(device_models, watcher::Config::default())
                .backoff(device_index::DefinitionBackoff::new()),
            |i, m| i.apply_device_model(m),
            |i, namespace, name| i.delete_referenced(Referenced::DeviceModel, namespace, name),
            |_| {},
        ),
        follow(
            Watched {
                resource: "services",
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(services, watcher::Config::default()).default_backoff(),
            |i, s| i.apply_service(s),
            |i, namespace, name| i.delete_cluster_wide(ClusterWide::Service, namespace, name),
            |_| {},
        ),
        follow(
            Watched {
                resource: "endpointslices",
                downstream: &downstream,
                pending: &pending,
                shutdown: &shutdown,
            },
            watcher(endpoint_slices, watcher::Config::default()).default_backoff(),
            |i, s| i.apply_endpoint_slice(s),
            |i, namespace, name| {
                i.delete_cluster_wide(ClusterWide::EndpointSlice, namespace, name)
            },
            |_| {},
        ),
    );
}

/// One watch's place in [`run`], for [`follow`].
struct Watched<'a> {
    resource: &'static str,
    downstream: &'a Downstream,
    /// Resources not yet listed once.
    pending: &'a Mutex<BTreeSet<&'static str>>,
    shutdown: &'a CancellationToken,
}

/// What a watch saw happen to one object, for [`observe`].
enum Seen<'a, K> {
    Applied(&'a K),
    Deleted(&'a K),
}

/// Hands an edge object's status in the API to `upstream`'s drift check.
/// `status` gives the object's status as JSON; it runs only for objects an edge reported on.
fn observe<K: Resource>(
    upstream: &Upstream,
    kind: &str,
    seen: Seen<'_, K>,
    status: impl FnOnce(&K) -> serde_json::Value,
) {
    let object = match seen {
        Seen::Applied(o) | Seen::Deleted(o) => o,
    };
    let meta = object.meta();
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or_default();
    let uid = meta.uid.as_deref().unwrap_or_default();
    match seen {
        Seen::Deleted(_) => upstream.deleted(kind, namespace, name, uid),
        Seen::Applied(_) => upstream.observed(kind, namespace, name, uid, || status(object)),
    }
}

/// A status as JSON (`null` when absent).
fn status_json<T: Serialize>(status: Option<&T>) -> serde_json::Value {
    status
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or_default()
}

/// Applies one watcher's events to the index. A relist (after the watch expired or at start)
/// ends with deletes for everything the list no longer has.
async fn follow<K, S>(
    watched: Watched<'_>,
    stream: S,
    apply: impl Fn(&mut Index, &K),
    delete: impl Fn(&mut Index, &str, &str),
    seen: impl Fn(Seen<'_, K>),
) where
    K: Resource + Clone,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let Watched {
        resource,
        downstream,
        pending,
        shutdown,
    } = watched;
    let mut stream = std::pin::pin!(stream);
    // (namespace, name) of every object seen, to delete what a relist no longer has.
    let mut known: HashSet<(String, String)> = HashSet::new();
    let mut relisted: Option<HashSet<(String, String)>> = None;
    // The API does not serve the resource (a custom resource whose definition is missing).
    let mut unserved = false;
    let listed = || {
        let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.remove(resource) && pending.is_empty() {
            tracing::info!("edge objects cached; resyncs may start");
            downstream.synced.send_replace(true);
        }
    };
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => match event {
                Some(e) => e,
                None => return,
            },
        };
        let id = |o: &K| {
            (
                o.meta().namespace.clone().unwrap_or_default(),
                o.meta().name.clone().unwrap_or_default(),
            )
        };
        match event {
            Ok(watcher::Event::Apply(object)) => {
                downstream.update(|i| apply(i, &object));
                seen(Seen::Applied(&object));
                known.insert(id(&object));
            }
            Ok(watcher::Event::Delete(object)) => {
                let (namespace, name) = id(&object);
                downstream.update(|i| delete(i, &namespace, &name));
                seen(Seen::Deleted(&object));
                known.remove(&(namespace, name));
            }
            Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(object)) => {
                downstream.update(|i| apply(i, &object));
                seen(Seen::Applied(&object));
                if let Some(seen) = &mut relisted {
                    seen.insert(id(&object));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let seen = relisted.take().unwrap_or_default();
                for (namespace, name) in known.difference(&seen) {
                    downstream.update(|i| delete(i, namespace, name));
                }
                known = seen;
                if std::mem::take(&mut unserved) {
                    tracing::info!(resource, "the API serves the resource now");
                }
                listed();
            }
            // Not served: as good as an empty list, so neither resyncs nor readiness wait for
            // a definition that may never be installed. The stream keeps retrying.
            Err(e) if not_served(&e) => {
                if !unserved {
                    tracing::warn!(
                        resource,
                        "the API does not serve this resource (is its CustomResourceDefinition installed?); none are relayed until it does"
                    );
                    unserved = true;
                }
                relisted = None;
                for (namespace, name) in known.drain() {
                    downstream.update(|i| delete(i, &namespace, &name));
                }
                listed();
            }
            // The stream backs off and retries by itself.
            Err(e) => tracing::warn!(resource, error = %e, "watch failed; retrying"),
        }
    }
}

/// Whether a watch failed because the API does not serve the resource at all (404 on the list
/// or the watch), as for a custom resource whose definition is not installed. The code decides:
/// kube-apiserver answers an unknown group with a plain-text "404 page not found", which has
/// no `NotFound` reason.
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn pod(name: &str, node: &str, config_map: &str, secret: &str, rv: u64) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                "resourceVersion": rv.to_string()},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i",
                "envFrom": [{"configMapRef": {"name": config_map}}, {"secretRef": {"name": secret}}]}]}
        }))
        .expect("pod")
    }

    fn config_map(name: &str, rv: u64) -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                "resourceVersion": rv.to_string()},
            "data": {"k": "v"}
        }))
        .expect("configmap")
    }

    fn secret(name: &str, rv: u64) -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                "resourceVersion": rv.to_string()}
        }))
        .expect("secret")
    }

    pub(super) fn node(name: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1"}
        }))
        .expect("node")
    }

    fn index() -> Index {
        let mut index = Index::new(PeerConfig::default());
        index.apply_node(&node("n1"));
        index.apply_node(&node("n2"));
        index
    }

    fn wants(index: &Index, node: &str, kind: &str, name: &str) -> Option<u64> {
        let namespace = if kind == "Node" { "" } else { "ns" };
        index
            .desired(node, &ObjectKey::new(kind, namespace, name))
            .map(|d| d.resource_version)
    }

    #[test]
    fn a_node_wants_its_pods_and_what_they_reference_and_nothing_else() {
        let mut index = index();
        index.apply_secret(&secret("s", 3));
        index.apply_secret(&secret("unrelated", 4));
        index.apply_pod(&pod("p", "n1", "cm", "s", 5));
        // The ConfigMap arrives after the pod that references it.
        index.apply_config_map(&config_map("cm", 6));
        assert_eq!(wants(&index, "n1", "Pod", "p"), Some(5));
        assert_eq!(wants(&index, "n1", "ConfigMap", "cm"), Some(6));
        assert_eq!(wants(&index, "n1", "Secret", "s"), Some(3));
        assert_eq!(wants(&index, "n1", "Secret", "unrelated"), None);
        assert_eq!(wants(&index, "n1", "Node", "n1"), Some(1));
        assert_eq!(wants(&index, "n1", "Node", "n2"), None);
        for (kind, name) in [("Pod", "p"), ("ConfigMap", "cm"), ("Secret", "s")] {
            assert_eq!(wants(&index, "n2", kind, name), None, "{kind} {name}");
        }
        // Updates follow.
        index.apply_config_map(&config_map("cm", 9));
        assert_eq!(wants(&index, "n1", "ConfigMap", "cm"), Some(9));
    }

    #[test]
    fn a_shared_reference_stays_until_the_last_pod_lets_go() {
        let mut index = index();
        index.apply_config_map(&config_map("cm", 2));
        index.apply_secret(&secret("s", 3));
        index.apply_pod(&pod("a", "n1", "cm", "s", 4));
        index.apply_pod(&pod("b", "n1", "cm", "s", 5));
        index.delete_pod("ns", "a");
        assert_eq!(wants(&index, "n1", "Pod", "a"), None);
        assert_eq!(wants(&index, "n1", "ConfigMap", "cm"), Some(2));
        // b stops referencing cm (references another one) and then goes.
        index.apply_pod(&pod("b", "n1", "other", "s", 6));
        assert_eq!(wants(&index, "n1", "ConfigMap", "cm"), None);
        assert_eq!(wants(&index, "n1", "Secret", "s"), Some(3));
        index.delete_pod("ns", "b");
        assert_eq!(wants(&index, "n1", "Secret", "s"), None);
        assert!(index.referrers.is_empty(), "{:?}", index.referrers);
        assert!(index.bound.is_empty(), "{:?}", index.bound);
    }

    #[test]
    fn a_late_node_gets_what_is_bound_to_it_now_after_moves_and_deletes() {
        let mut index = Index::new(PeerConfig::default());
        for (name, rv) in [("cm", 2), ("cm2", 3)] {
            index.apply_config_map(&config_map(name, rv));
        }
        index.apply_secret(&secret("s", 4));
        index.apply_pod(&pod("p", "late", "cm", "s", 5));
        index.apply_pod(&pod("q", "other", "cm2", "s", 6));
        index.apply_pod(&pod("r", "late", "cm2", "s", 7));
        index.apply_pod(&pod("r", "other", "cm2", "s", 8)); // moved away
        index.apply_pod(&pod("t", "late", "cm2", "s", 9));
        index.delete_pod("ns", "t");
        index.apply_node(&node("late"));
        assert_eq!(wants(&index, "late", "Pod", "p"), Some(5));
        assert_eq!(wants(&index, "late", "ConfigMap", "cm"), Some(2));
        assert_eq!(wants(&index, "late", "Secret", "s"), Some(4));
        for (kind, name) in [
            ("Pod", "q"),
            ("Pod", "r"),
            ("Pod", "t"),
            ("ConfigMap", "cm2"),
        ] {
            assert_eq!(wants(&index, "late", kind, name), None, "{kind} {name}");
        }
        // What is recorded as bound is what the forward maps say.
        for (node, want) in [("late", vec!["p"]), ("other", vec!["q", "r"])] {
            let mut pods: Vec<&str> = index.bound[node]
                .pods
                .iter()
                .map(|(_, n)| n.as_str())
                .collect();
            pods.sort();
            assert_eq!(pods, want, "{node}");
        }
        index.delete_pod("ns", "p");
        assert!(!index.bound.contains_key("late"), "{:?}", index.bound);
    }

    #[test]
    fn a_node_that_appears_later_gets_its_desired_set() {
        let mut index = Index::new(PeerConfig::default());
        index.apply_config_map(&config_map("cm", 2));
        index.apply_secret(&secret("s", 3));
        index.apply_pod(&pod("p", "late", "cm", "s", 4));
        assert!(index.desired("late", &pod_key("ns", "p")).is_none());
        index.apply_node(&node("late"));
        assert_eq!(wants(&index, "late", "Pod", "p"), Some(4));
        assert_eq!(wants(&index, "late", "ConfigMap", "cm"), Some(2));
        assert_eq!(wants(&index, "late", "Secret", "s"), Some(3));
    }

    #[test]
    fn deleted_referenced_objects_leave_the_desired_set() {
        let mut index = index();
        index.apply_config_map(&config_map("cm", 2));
        index.apply_secret(&secret("s", 3));
        index.apply_pod(&pod("p", "n1", "cm", "s", 4));
        index.delete_referenced(Referenced::Secret, "ns", "s");
        assert_eq!(wants(&index, "n1", "Secret", "s"), None);
        // It comes back when it is created again.
        index.apply_secret(&secret("s", 7));
        assert_eq!(wants(&index, "n1", "Secret", "s"), Some(7));
    }

    #[test]
    fn objects_without_an_integer_resource_version_are_not_sent() {
        let mut index = index();
        let mut p = pod("p", "n1", "cm", "s", 1);
        p.metadata.resource_version = Some("abc".into());
        index.apply_pod(&p);
        assert_eq!(wants(&index, "n1", "Pod", "p"), None);
    }

    #[test]
    fn bodies_are_sent_without_managed_fields() {
        let mut index = index();
        let mut map = config_map("cm", 2);
        map.metadata.managed_fields = Some(vec![Default::default()]);
        index.apply_config_map(&map);
        index.apply_secret(&secret("s", 3));
        index.apply_pod(&pod("p", "n1", "cm", "s", 4));
        let body = &index
            .desired("n1", &ObjectKey::new("ConfigMap", "ns", "cm"))
            .expect("desired")
            .body;
        let value: serde_json::Value = serde_json::from_slice(body).expect("json");
        assert!(value["metadata"].get("managedFields").is_none(), "{value}");
        assert_eq!(value["data"]["k"], "v");
    }

    #[test]
    fn a_404_list_or_watch_means_not_served() {
        let api = |code: u16, reason: &str| {
            let status: kube::core::Status = serde_json::from_value(
                json!({"status": "Failure", "code": code, "reason": reason, "message": "m"}),
            )
            .expect("a status");
            kube::Error::Api(Box::new(status))
        };
        // kube-apiserver's plain-text 404 for an unknown group, and the embedded API's Status.
        assert!(not_served(&watcher::Error::InitialListFailed(api(
            404,
            "Failed to parse error data"
        ))));
        assert!(not_served(&watcher::Error::WatchStartFailed(api(
            404, "NotFound"
        ))));
        assert!(!not_served(&watcher::Error::InitialListFailed(api(
            403,
            "Forbidden"
        ))));
        assert!(!not_served(&watcher::Error::NoResourceVersion));
    }

    #[tokio::test]
    async fn resyncs_beyond_the_limit_wait_for_a_slot() {
        let downstream = Downstream::new(
            DownstreamConfig {
                concurrent_resyncs: 1,
                ..DownstreamConfig::default()
            },
            Arc::new(Metrics::default()),
        );
        // Nothing starts before the watchers listed everything once.
        let early = tokio::time::timeout(
            Duration::from_millis(50),
            downstream.attach("n1", Vec::new(), Resync::Incremental),
        )
        .await;
        assert!(early.is_err(), "attach must wait for the first full list");
        downstream.synced.send_replace(true);
        let first = downstream
            .attach("n1", Vec::new(), Resync::Incremental)
            .await;
        let second = tokio::time::timeout(
            Duration::from_millis(50),
            downstream.attach("n2", Vec::new(), Resync::Incremental),
        )
        .await;
        assert!(second.is_err(), "the only slot is taken");
        assert_eq!(downstream.metrics.sync.resyncs_waiting.get(), 0);
        drop(first);
        let second = tokio::time::timeout(
            Duration::from_secs(1),
            downstream.attach("n2", Vec::new(), Resync::Incremental),
        )
        .await;
        assert!(second.is_ok(), "a freed slot lets the next resync start");
    }
}
