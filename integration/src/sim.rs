//! The edge simulator: many simulated gateways in one process, each a real QUIC + mutual-TLS
//! session with a joined node identity, speaking the protocol itself (no SQLite, no CRI), so
//! that thousands fit beside cloudcore on one machine.
//!
//! Each simulated edge sends `Hello` with a realistic node status and the inventory it holds,
//! acknowledges upserts and deletes (keeping what it holds, so a resync after a reconnect sends
//! only what changed), heartbeats at the interval the cloud asks for, reports a Running/Ready
//! status for every pod bound to it (and, with churn, flips pods' readiness), reconnects with
//! edgecore's jittered backoff when its session drops, and counts what it sees: objects held,
//! pods deleted or re-created ("restarts" from the cloud's side), sessions, resyncs.
//!
//! Used by the `edge-sim` bench (one [`Fleet`] per worker process) and by `tests/scale.rs`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgecore::backoff::Backoff;
use edgecore::identity::Identity;
use proto::{HeldObject, Message, ObjectRef, StatusReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A session that lasted this long resets the backoff: edgecore's own rule.
const STABLE_SESSION: Duration = edgecore::hub::STABLE_SESSION;
/// How long one dial (QUIC + TLS) may take: edgecore's default `connect_timeout`, so a storm
/// abandons and retries handshakes as real edges would.
const DIAL_TIMEOUT: Duration = edgecore::hub::CONNECT_TIMEOUT;
/// How long the cloud may take to answer `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// What every simulated edge of a fleet does.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The cloud's tunnel address, `IP:PORT`.
    pub address: String,
    /// Pods each edge expects to be bound to it: its resync is complete once it holds them.
    pub pods_per_edge: usize,
    /// Sessions sharing one client UDP socket.
    pub edges_per_endpoint: usize,
    /// First dials in flight at once (later reconnects are paced by the backoff only).
    pub connect_concurrency: usize,
    /// Reconnect delays.
    pub backoff: Backoff,
}

/// Which UDP socket a simulated edge dials from again after its session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redial {
    /// The socket it shares with its `edges_per_endpoint` neighbours. Behind a NAT load
    /// balancer the flow keeps its backend (conntrack), dead or not.
    SharedSocket,
    /// A new socket of its own for every dial, as edgecore does: behind a load balancer each
    /// reconnect is a new flow, sent to a live backend.
    NewSocket,
}

/// When one edge's latest session got its `HelloAck` and when it held every pod it expects,
/// in ms since the Unix epoch (0: never): wall-clock, so that another process can time each
/// edge's failover from the moment it killed a cloudcore.
#[derive(Debug, Default)]
pub struct EdgeTimes {
    pub hello_ack_ms: AtomicU64,
    pub resynced_ms: AtomicU64,
}

/// Now, in ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Counters summed over a fleet's edges; gauges go up and down.
#[derive(Debug, Default)]
pub struct Stats {
    /// Gauge: edges with a session (HelloAck received).
    pub connected: AtomicU64,
    /// Gauge: edges whose current session holds every pod it expects.
    pub resynced: AtomicU64,
    pub hello_acks: AtomicU64,
    pub dial_failures: AtomicU64,
    /// Dials the cloud refused as busy (counted in `dial_failures` too).
    pub busy_refusals: AtomicU64,
    pub sessions_lost: AtomicU64,
    pub upserts: AtomicU64,
    pub deletes: AtomicU64,
    /// Deletes of a pod the edge held.
    pub pod_deletes: AtomicU64,
    /// A pod deleted then sent again, or replaced by one of the same name with another uid.
    pub pod_restarts: AtomicU64,
    pub statuses_sent: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    /// Objects held, summed over edges.
    pub held: AtomicU64,
    /// Status changes per edge per minute, as `f64` bits (0: none after the first report).
    churn_bits: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            connected: get(&self.connected),
            resynced: get(&self.resynced),
            hello_acks: get(&self.hello_acks),
            dial_failures: get(&self.dial_failures),
            busy_refusals: get(&self.busy_refusals),
            sessions_lost: get(&self.sessions_lost),
            upserts: get(&self.upserts),
            deletes: get(&self.deletes),
            pod_deletes: get(&self.pod_deletes),
            pod_restarts: get(&self.pod_restarts),
            statuses_sent: get(&self.statuses_sent),
            heartbeats_sent: get(&self.heartbeats_sent),
            held: get(&self.held),
        }
    }

    fn churn(&self) -> f64 {
        f64::from_bits(self.churn_bits.load(Ordering::Relaxed))
    }
}

/// A point-in-time copy of [`Stats`]; workers print it as one JSON line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub connected: u64,
    pub resynced: u64,
    pub hello_acks: u64,
    pub dial_failures: u64,
    pub busy_refusals: u64,
    pub sessions_lost: u64,
    pub upserts: u64,
    pub deletes: u64,
    pub pod_deletes: u64,
    pub pod_restarts: u64,
    pub statuses_sent: u64,
    pub heartbeats_sent: u64,
    pub held: u64,
}

macro_rules! snapshot_fields {
    ($m:ident) => {
        $m!(
            connected,
            resynced,
            hello_acks,
            dial_failures,
            busy_refusals,
            sessions_lost,
            upserts,
            deletes,
            pod_deletes,
            pod_restarts,
            statuses_sent,
            heartbeats_sent,
            held
        )
    };
}

impl Snapshot {
    pub fn to_json(&self) -> Value {
        macro_rules! to {
            ($($f:ident),*) => { json!({ $(stringify!($f): self.$f),* }) };
        }
        snapshot_fields!(to)
    }

    /// Reads what [`Snapshot::to_json`] wrote; `None` names no field (a line that is not one).
    pub fn from_json(value: &Value) -> Option<Snapshot> {
        macro_rules! from {
            ($($f:ident),*) => { Snapshot { $($f: value[stringify!($f)].as_u64()?),* } };
        }
        Some(snapshot_fields!(from))
    }

    /// The sum of several fleets' snapshots.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        let mut total = Snapshot::default();
        for s in all {
            macro_rules! add {
                ($($f:ident),*) => { $(total.$f += s.$f;)* };
            }
            snapshot_fields!(add);
        }
        total
    }
}

/// Simulated edges running until [`Fleet::stop`].
pub struct Fleet {
    pub stats: Arc<Stats>,
    /// Each edge's node name and [`EdgeTimes`], in the order of the directories it started with.
    times: Vec<(String, Arc<EdgeTimes>)>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Fleet {
    /// Starts one simulated edge per identity directory (as `edgecore join` left it).
    pub async fn start(dirs: &[PathBuf], config: FleetConfig) -> anyhow::Result<Fleet> {
        Fleet::start_redialing(dirs, config, Redial::SharedSocket).await
    }

    /// [`Fleet::start`], the edges dialing again from the socket `redial` says.
    pub async fn start_redialing(
        dirs: &[PathBuf],
        config: FleetConfig,
        redial: Redial,
    ) -> anyhow::Result<Fleet> {
        let remote = edgecore::dial::resolve(&config.address).await?;
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let permits = Arc::new(tokio::sync::Semaphore::new(config.connect_concurrency));
        let config = Arc::new(config);
        let mut endpoint = None;
        let mut times = Vec::with_capacity(dirs.len());
        for (index, dir) in dirs.iter().enumerate() {
            if index % config.edges_per_endpoint.max(1) == 0 {
                endpoint = Some(edgecore::dial::client_endpoint(remote)?);
            }
            let identity = edgecore::identity::load(dir)?;
            let tls = edgecore::tls::node_config(&identity)?;
            let edge_times = Arc::new(EdgeTimes::default());
            times.push((identity.config.node_name.clone(), edge_times.clone()));
            let edge = SimEdge {
                identity,
                tls,
                endpoint: endpoint.clone().expect("an endpoint for the first edge"),
                remote,
                redial,
                config: config.clone(),
                stats: stats.clone(),
                times: edge_times,
                state: EdgeState::default(),
                rng: StdRng::from_os_rng(),
            };
            let (shutdown, permits) = (shutdown.clone(), permits.clone());
            tasks.spawn(edge.run(shutdown, permits));
        }
        tasks.close();
        Ok(Fleet {
            stats,
            times,
            shutdown,
            tasks,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        self.stats.snapshot()
    }

    /// Every edge's `{"NODE": [hello_ack_ms, resynced_ms]}` ([`EdgeTimes`]), as one JSON object.
    pub fn times_json(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Value::Object(
            self.times
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        json!([get(&t.hello_ack_ms), get(&t.resynced_ms)]),
                    )
                })
                .collect(),
        )
    }

    /// Status changes per edge per minute from now on (readiness flips of random pods).
    pub fn set_churn(&self, per_minute: f64) {
        self.stats
            .churn_bits
            .store(per_minute.max(0.0).to_bits(), Ordering::Relaxed);
    }

    /// Closes every session (the cloud sees them end at once) and waits for the edges.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }
}

/// One pod as the edge holds it.
#[derive(Debug, Clone)]
struct HeldPod {
    uid: String,
    /// Generation of the last status report (monotonic for this pod on this edge).
    generation: u64,
    ready: bool,
}

/// What an edge keeps across sessions, as edgecore's store does.
#[derive(Debug, Default)]
struct EdgeState {
    /// Objects held: (kind, namespace, name) → (uid, resourceVersion).
    held: HashMap<(String, String, String), (String, u64)>,
    pods: HashMap<(String, String), HeldPod>,
    /// Pods the cloud deleted: one sent again is a restart.
    gone: HashSet<(String, String)>,
    cloud_state_id: String,
}

struct SimEdge {
    identity: Identity,
    tls: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    remote: SocketAddr,
    redial: Redial,
    config: Arc<FleetConfig>,
    stats: Arc<Stats>,
    times: Arc<EdgeTimes>,
    state: EdgeState,
    rng: StdRng,
}

/// Why a session ended (for the reconnect decision only).
enum End {
    Shutdown,
    Lost,
    /// The cloud refused the dial as busy (edgecore then waits `backoff::after_busy`).
    Busy,
}

impl SimEdge {
    async fn run(mut self, shutdown: CancellationToken, permits: Arc<tokio::sync::Semaphore>) {
        // The first dial waits for a permit, so a fleet start is paced like edge-bench's.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits.acquire_owned() => p.ok(),
        };
        let mut first = first;
        let mut attempt = 0u32;
        let mut busy_refusals = 0u32;
        loop {
            let began = Instant::now();
            let end = self.session(&shutdown, &mut first).await;
            if matches!(end, End::Shutdown) || shutdown.is_cancelled() {
                return;
            }
            self.stats.sessions_lost.fetch_add(1, Ordering::Relaxed);
            if began.elapsed() >= STABLE_SESSION {
                attempt = 0;
            }
            // edgecore's rule (`edgecore::hub::run`): a busy refusal waits longer.
            busy_refusals = match end {
                End::Busy => busy_refusals.saturating_add(1),
                _ => 0,
            };
            let delay = if busy_refusals > 0 {
                edgecore::backoff::after_busy(busy_refusals, &mut self.rng)
            } else {
                self.config.backoff.delay(attempt, &mut self.rng)
            };
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn hello(&self) -> Message {
        let inventory = self
            .state
            .held
            .iter()
            .map(|((kind, namespace, name), (uid, rv))| HeldObject {
                object: ObjectRef {
                    kind: kind.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    uid: uid.clone(),
                },
                resource_version: *rv,
            })
            .collect();
        Message::Hello(proto::Hello {
            version: proto::PROTOCOL_VERSION,
            node_info: proto::NodeInfo {
                hostname: self.identity.config.node_name.clone(),
                os: "linux".into(),
                arch: "amd64".into(),
                kernel_version: "6.1.0-sim".into(),
                edgecore_version: "sim".into(),
                cpus: 4,
                memory_bytes: 8 << 30,
                node_status: node_status(&self.identity.config.node_name),
            },
            inventory,
            cloud_state_id: self.state.cloud_state_id.clone(),
        })
    }

    /// One session: dial, `Hello`, then serve until it ends.
    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        first: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> End {
        // Once it had a session: first dials share sockets, to keep a fleet's sockets few.
        if self.redial == Redial::NewSocket && self.times.hello_ack_ms.load(Ordering::Relaxed) > 0 {
            match edgecore::dial::client_endpoint(self.remote) {
                Ok(endpoint) => self.endpoint = endpoint,
                Err(_) => {
                    self.stats.dial_failures.fetch_add(1, Ordering::Relaxed);
                    return End::Lost;
                }
            }
        }
        let connecting = edgecore::dial::connect(
            &self.endpoint,
            self.tls.clone(),
            &self.config.address,
            self.remote,
            DIAL_TIMEOUT,
        );
        let connection = tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            c = connecting => match c {
                Ok(c) => c,
                Err(e) => {
                    self.stats.dial_failures.fetch_add(1, Ordering::Relaxed);
                    if e.is_busy_refusal() {
                        self.stats.busy_refusals.fetch_add(1, Ordering::Relaxed);
                        return End::Busy;
                    }
                    return End::Lost;
                }
            },
        };
        let Ok((send, recv)) = connection.open_bi().await else {
            return End::Lost;
        };
        let mut writer = proto::FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE);
        let mut reader = proto::FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE);
        if writer.send(self.hello()).await.is_err() {
            return End::Lost;
        }
        let ack = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(Message::HelloAck(ack)))) => ack,
            _ => {
                connection.close(0u32.into(), b"no hello ack");
                return End::Lost;
            }
        };
        // Later reconnects are paced by the backoff alone.
        first.take();
        if ack.adopt_state || self.state.cloud_state_id != ack.cloud_state_id {
            self.state.cloud_state_id = ack.cloud_state_id.clone();
        }
        self.times.hello_ack_ms.store(unix_ms(), Ordering::Relaxed);
        self.stats.hello_acks.fetch_add(1, Ordering::Relaxed);
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        let end = self
            .serve(&connection, reader, writer, &ack, shutdown)
            .await;
        self.stats.connected.fetch_sub(1, Ordering::Relaxed);
        end
    }

    fn is_resynced(&self) -> bool {
        self.state.pods.len() >= self.config.pods_per_edge
    }

    async fn serve(
        &mut self,
        connection: &quinn::Connection,
        mut reader: proto::FrameReader<quinn::RecvStream>,
        mut writer: proto::FrameWriter<quinn::SendStream>,
        ack: &proto::HelloAck,
        shutdown: &CancellationToken,
    ) -> End {
        // A reader task, so a read is never cancelled half-way by the select below.
        let (incoming_tx, mut incoming) = mpsc::channel::<Message>(64);
        let reading = tokio::spawn(async move {
            while let Ok(Some(message)) = reader.next().await {
                if incoming_tx.send(message).await.is_err() {
                    break;
                }
            }
        });
        let _reading = tokio_util::task::AbortOnDropHandle::new(reading);
        let heartbeat = Duration::from_millis(ack.heartbeat_interval_ms.max(100));
        let dead_after = Duration::from_millis(ack.dead_after_ms).max(heartbeat * 2);
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Churn is checked once a second: a flip with probability churn/60 per pod-edge.
        let mut churn_tick = tokio::time::interval(Duration::from_secs(1));
        churn_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut seq = 0u64;
        let mut report_seq = 0u64;
        let mut resynced = false;
        // The cloud restarted and remembers no status: send the last ones again.
        let mut pending: Vec<(String, String)> = if ack.resend_status {
            self.state.pods.keys().cloned().collect()
        } else {
            Vec::new()
        };
        let end = loop {
            if !resynced && self.is_resynced() {
                resynced = true;
                self.times.resynced_ms.store(unix_ms(), Ordering::Relaxed);
                self.stats.resynced.fetch_add(1, Ordering::Relaxed);
            }
            for key in pending.drain(..) {
                let Some(report) = self.status_report(&key, &mut report_seq) else {
                    continue;
                };
                if writer.send(report).await.is_err() {
                    break;
                }
                self.stats.statuses_sent.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    connection.close(0u32.into(), b"simulator stopping");
                    break End::Shutdown;
                }
                _ = tokio::time::sleep_until(last_heard + dead_after) => {
                    connection.close(0u32.into(), b"heartbeat timeout");
                    break End::Lost;
                }
                _ = ticker.tick() => {
                    seq += 1;
                    if writer.send(Message::Heartbeat { seq }).await.is_err() {
                        break End::Lost;
                    }
                    self.stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                }
                _ = churn_tick.tick() => {
                    let churn = self.stats.churn();
                    if churn > 0.0 && !self.state.pods.is_empty()
                        && self.rng.random_bool((churn / 60.0).min(1.0))
                    {
                        let keys: Vec<_> = self.state.pods.keys().cloned().collect();
                        let key = keys[self.rng.random_range(0..keys.len())].clone();
                        if let Some(pod) = self.state.pods.get_mut(&key) {
                            pod.ready = !pod.ready;
                        }
                        pending.push(key);
                    }
                }
                message = incoming.recv() => {
                    let Some(message) = message else { break End::Lost };
                    last_heard = Instant::now();
                    let acked = match message {
                        Message::Upsert(upsert) => {
                            let seq = upsert.seq;
                            if let Some(key) = self.upserted(upsert) {
                                pending.push(key);
                            }
                            Some(seq)
                        }
                        Message::Delete(delete) => {
                            let seq = delete.seq;
                            self.deleted(delete.object);
                            Some(seq)
                        }
                        _ => None,
                    };
                    if let Some(seq) = acked
                        && writer.send(Message::Ack { seqs: vec![seq] }).await.is_err()
                    {
                        break End::Lost;
                    }
                }
            }
        };
        if resynced {
            self.stats.resynced.fetch_sub(1, Ordering::Relaxed);
        }
        end
    }

    /// Keeps an upserted object; a pod new to this edge gets a status report (its key).
    fn upserted(&mut self, upsert: proto::ObjectUpsert) -> Option<(String, String)> {
        self.stats.upserts.fetch_add(1, Ordering::Relaxed);
        let o = upsert.object;
        tracing::debug!(node = %self.identity.config.node_name, kind = %o.kind, namespace = %o.namespace, name = %o.name, rv = upsert.resource_version, "upsert");
        let key = (o.kind.clone(), o.namespace.clone(), o.name.clone());
        let before = self
            .state
            .held
            .insert(key, (o.uid.clone(), upsert.resource_version));
        if before.is_none() {
            self.stats.held.fetch_add(1, Ordering::Relaxed);
        }
        if o.kind != "Pod" {
            return None;
        }
        let pod_key = (o.namespace, o.name);
        let restarted = self.state.gone.remove(&pod_key)
            || self
                .state
                .pods
                .get(&pod_key)
                .is_some_and(|p| p.uid != o.uid);
        if restarted {
            self.stats.pod_restarts.fetch_add(1, Ordering::Relaxed);
        }
        match self.state.pods.get(&pod_key) {
            Some(p) if p.uid == o.uid => None,
            _ => {
                self.state.pods.insert(
                    pod_key.clone(),
                    HeldPod {
                        uid: o.uid,
                        generation: 0,
                        ready: true,
                    },
                );
                Some(pod_key)
            }
        }
    }

    fn deleted(&mut self, o: ObjectRef) {
        self.stats.deletes.fetch_add(1, Ordering::Relaxed);
        let key = (o.kind.clone(), o.namespace.clone(), o.name.clone());
        if self.state.held.remove(&key).is_some() {
            self.stats.held.fetch_sub(1, Ordering::Relaxed);
        }
        if o.kind == "Pod" {
            let pod_key = (o.namespace, o.name);
            if self.state.pods.remove(&pod_key).is_some() {
                self.stats.pod_deletes.fetch_add(1, Ordering::Relaxed);
                self.state.gone.insert(pod_key);
            }
        }
    }

    /// The pod's current status as a report with the next generation.
    fn status_report(&mut self, key: &(String, String), report_seq: &mut u64) -> Option<Message> {
        let pod = self.state.pods.get_mut(key)?;
        pod.generation += 1;
        *report_seq += 1;
        Some(Message::Status(StatusReport {
            seq: *report_seq,
            object: ObjectRef {
                kind: "Pod".into(),
                namespace: key.0.clone(),
                name: key.1.clone(),
                uid: pod.uid.clone(),
            },
            generation: pod.generation,
            status: pod_status(pod.ready),
        }))
    }
}

/// Creates the desired set of `nodes` in `namespace` through the API: per node
/// `pods_per_edge` pods bound with `spec.nodeName`, each with its own ConfigMap and Secret
/// mounted. Objects that exist already are kept (reruns on the same data dir).
pub async fn create_desired_set(
    client: &kube::Client,
    namespace: &str,
    nodes: &[String],
    pods_per_edge: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use kube::api::{Api, DynamicObject, PostParams};
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let mut objects = Vec::with_capacity(nodes.len() * pods_per_edge * 3);
    for node in nodes {
        for i in 0..pods_per_edge {
            let name = format!("{node}-{i}");
            objects.push((
                "v1",
                "ConfigMap",
                json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": namespace},
                    "data": {"settings.conf": format!("node={node}\npod={i}\nmode=normal\n")},
                }),
            ));
            objects.push((
                "v1",
                "Secret",
                json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace},
                    "stringData": {"password": format!("secret-of-{name}")},
                }),
            ));
            objects.push((
                "v1",
                "Pod",
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": namespace, "labels": {"app": "sim"}},
                    "spec": {
                        "nodeName": node,
                        "automountServiceAccountToken": false,
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{
                            "name": "app", "image": "registry.local/app:1",
                            "volumeMounts": [
                                {"name": "settings", "mountPath": "/etc/app"},
                                {"name": "password", "mountPath": "/run/secrets/app"},
                            ],
                        }],
                        "volumes": [
                            {"name": "settings", "configMap": {"name": name}},
                            {"name": "password", "secret": {"secretName": name}},
                        ],
                    },
                }),
            ));
        }
    }
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(objects)
        .map(|(version, kind, body)| async move {
            let resource = kube::discovery::ApiResource::from_gvk(
                &kube::core::GroupVersionKind::gvk("", version, kind),
            );
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource);
            let object: DynamicObject = serde_json::from_value(body)?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                match api.create(&PostParams::default(), &object).await {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
                    // A fresh cluster refuses pods until the namespace's ServiceAccount exists.
                    Err(e) if attempt < 30 => {
                        tracing::debug!(error = %e, "create failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => {
                        return Err(anyhow::anyhow!(
                            "cannot create {kind} {namespace}/{}: {e}",
                            object.metadata.name.clone().unwrap_or_default()
                        ));
                    }
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// The uid of every pod in `namespace`, by name.
pub async fn pod_uids(
    client: &kube::Client,
    namespace: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    use kube::api::{Api, ListParams};
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default()).await?;
    Ok(list
        .into_iter()
        .filter_map(|p| Some((p.metadata.name?, p.metadata.uid?)))
        .collect())
}

/// Watches the edge Nodes' Ready condition and records every node whose Ready left `True`
/// (to `False` or `Unknown`) while watched: a false NotReady when the edge was only waiting
/// for cloudcore.
pub struct ReadyWatch {
    state: Arc<std::sync::Mutex<ReadyState>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

#[derive(Debug, Default)]
struct ReadyState {
    ready: HashMap<String, bool>,
    /// Nodes seen going from Ready=True to anything else, with what they went to.
    left_ready: Vec<(String, String)>,
}

impl ReadyWatch {
    pub fn start(client: &kube::Client) -> ReadyWatch {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
        let state = Arc::new(std::sync::Mutex::new(ReadyState::default()));
        let recorder = state.clone();
        let watching = Instant::now();
        let task = tokio::spawn(async move {
            let config = watcher::Config::default().labels("node-role.kubernetes.io/edge");
            let mut events = watcher(nodes, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(node) = event else { continue };
                let Some(name) = node.metadata.name.clone() else {
                    continue;
                };
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| c.status)
                    .unwrap_or_default();
                let mut state = recorder.lock().unwrap_or_else(|p| p.into_inner());
                let was = state.ready.insert(name.clone(), ready == "True");
                if was == Some(true) && ready != "True" {
                    let ready = if ready.is_empty() {
                        "no Ready condition".to_string()
                    } else {
                        ready
                    };
                    let at = watching.elapsed().as_secs_f64();
                    state
                        .left_ready
                        .push((name, format!("{ready} {at:.1} s into the watch")));
                }
            }
        });
        ReadyWatch {
            state,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Nodes whose Ready is `True` now.
    pub fn ready(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.ready.values().filter(|r| **r).count()
    }

    /// Every Ready=True → not True seen so far: (node, what it became and when).
    pub fn left_ready(&self) -> Vec<(String, String)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.left_ready.clone()
    }
}

fn now_text() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A Running pod, Ready or (with churn) not.
fn pod_status(ready: bool) -> Vec<u8> {
    let now = now_text();
    let ready = if ready { "True" } else { "False" };
    json!({
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "startTime": now,
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": "app",
            "image": "registry.local/app:1",
            "imageID": "",
            "ready": ready == "True",
            "restartCount": 0,
            "started": true,
            "state": {"running": {"startedAt": now}},
        }],
    })
    .to_string()
    .into_bytes()
}

/// The node status a healthy gateway reports in `Hello`, as edgecore's `node` module builds it.
fn node_status(name: &str) -> Vec<u8> {
    let now = now_text();
    let condition = |kind: &str, status: &str, reason: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": "simulated",
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        "capacity": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "32Gi", "pods": "110"},
        "allocatable": {"cpu": "3800m", "memory": "7680Mi", "ephemeral-storage": "30Gi", "pods": "110"},
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "conditions": [
            condition("Ready", "True", "KubeletReady"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10350}},
        "nodeInfo": {
            "machineID": name, "systemUUID": name, "bootID": "sim",
            "kernelVersion": "6.1.0-sim", "osImage": "simulated gateway",
            "containerRuntimeVersion": "sim://1", "kubeletVersion": "v1.0.0-edgecore-sim",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
        },
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_sum() {
        let a = Snapshot {
            connected: 3,
            held: 9,
            pod_restarts: 1,
            ..Snapshot::default()
        };
        let back = Snapshot::from_json(&a.to_json()).expect("parses");
        assert_eq!(back, a);
        let total = Snapshot::sum([&a, &a]);
        assert_eq!(
            (total.connected, total.held, total.pod_restarts),
            (6, 18, 2)
        );
        assert_eq!(Snapshot::from_json(&json!({"connected": 1})), None);
    }

    #[test]
    fn the_simulated_node_status_passes_cloudcores_checks() {
        let status: Value = serde_json::from_slice(&node_status("sim-0001")).expect("json");
        serde_json::from_value::<k8s_openapi::api::core::v1::NodeStatus>(status.clone())
            .expect("a NodeStatus");
        assert_eq!(status["conditions"][0]["status"], "True");
        let pod: Value = serde_json::from_slice(&pod_status(false)).expect("json");
        serde_json::from_value::<k8s_openapi::api::core::v1::PodStatus>(pod.clone())
            .expect("a PodStatus");
        assert_eq!(pod["conditions"][3]["status"], "False");
    }
}
