//! Statuses reported by edges, written to the Kubernetes API: coalesced per object, never
//! older than what was already written, and paced by a token bucket so a fleet of edges
//! reconnecting at once cannot flood the API server.
//!
//! The tunnel session has already checked that the reporting node may report for the object.
//! [`Upstream::submit`] queues the report in [`Pending`] (no IO); one [`UpstreamWorker`] takes
//! the queued objects in arrival order, one per token, and writes each with the status
//! subresource, up to [`WRITES_IN_FLIGHT`] objects at once and never two writes of one
//! object at once:
//!
//! 1. GET the object. Missing, or a different uid than the report's → [`Outcome::Gone`]. The
//!    uid must be checked here: the embedded API applies a status patch by keeping only its
//!    `status` (`apiserver::objects::prepare_update`), so a `metadata.uid` in the patch is
//!    ignored there and gives no precondition.
//! 2. PATCH the status subresource with the `metadata.resourceVersion` just read, which both
//!    the embedded and a real API server treat as a precondition (409 when the object changed
//!    since the GET), so a pod deleted and recreated between the two requests is never written.
//!    `metadata.uid` is sent too; a real API server refuses a mismatch with 409 as well.
//!    - Pod: JSON merge patch. Lists are replaced (podIPs, containerStatuses), but conditions
//!      the edge does not report (PodScheduled, written at binding; DisruptionTarget) are
//!      copied from the live object, so they are not wiped.
//!    - Node: strategic merge patch, so conditions and addresses merge by `type` and the Ready
//!      condition written by [`crate::nodes`] stays. Strategic directives (`$patch`, ...) in
//!      the reported status are removed: an edge reports values, not patch instructions.
//!    - Device (`devices.kubeedge.io/v1beta1`): JSON merge patch; `twins` is replaced whole
//!      (the edge reports every twin it reports to the cloud), `state` and `lastOnlineTime`
//!      when reported.
//!
//! Each API request (the GET and the PATCH) takes one token. 404 → `Gone`; 409 → the whole
//! GET + PATCH is retried once; any other error → [`Outcome::Failed`] and the report is
//! dropped (the edge resends from its outbox).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::reconcile::{Reassert, Truths, covers};

/// How many objects' last written generation is remembered; the least recently written are
/// forgotten first, and a report for a forgotten object is written without the staleness check.
pub const REMEMBERED_WRITES: usize = 100_000;

/// Status writes (GET + PATCH) in flight at once, each of a different object: the API server
/// answers them in parallel, so the statuses of pods starting together on one edge are not
/// written one round trip after another. The token bucket still paces the requests.
const WRITES_IN_FLIGHT: usize = 16;

/// Settings of the status writer.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Sustained API requests per second. Zero, negative or NaN means no limit.
    pub qps: f64,
    /// Requests allowed at once after a quiet period (at least 1).
    pub burst: u32,
    /// Distinct objects that may wait to be written before [`Upstream::submit`] says [`Busy`].
    pub max_pending: usize,
}

impl Default for UpstreamConfig {
    /// The kubelet's `kubeAPIQPS`/`kubeAPIBurst` defaults.
    fn default() -> Self {
        UpstreamConfig {
            qps: 50.0,
            burst: 100,
            max_pending: 10_000,
        }
    }
}

/// One status report from an edge.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// The reporting node (for logs; authorization is the caller's).
    pub node: String,
    /// The object, kind "Pod", "Node" or "Device". An empty uid writes whatever object has
    /// that name.
    pub object: proto::ObjectRef,
    /// Grows with every report the edge makes about this object.
    pub generation: u64,
    /// What to write.
    pub change: Change,
    /// Who asks for the write.
    pub origin: Origin,
}

/// Why an update is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The edge reported it: written only if newer than what was written.
    Edge,
    /// The API's copy drifted from the edge's last report ([`crate::reconcile`]): the report is
    /// written again although its generation was written before.
    Reassert,
}

/// What an update does to its object.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Replace the object's `status` (a JSON object) through the status subresource.
    Status(Value),
    /// The edge finished the pod's graceful deletion: delete it with grace period 0 and a uid
    /// precondition, as a kubelet does. The newest report of a pod, so it replaces any status
    /// still queued.
    Delete,
}

/// What became of a submitted update.
///
/// Reports of one object that were coalesced share the fate of the report that was kept (the
/// newest): when it is written, the others get `Superseded` (or `Written` if their generation
/// equals the written one); when it is `Gone`, `Stale` or `Failed`, they get the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This report is what the API now holds.
    Written,
    /// A newer report of the same object was written instead.
    Superseded,
    /// The generation is not newer than one already written.
    Stale,
    /// The object (or the object with that uid) no longer exists.
    Gone,
    /// The API refused the write or could not be reached; the report was dropped.
    Failed(String),
}

/// [`Upstream::submit`] refused an update: `max_pending` distinct objects are already queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many statuses are waiting to be written")]
pub struct Busy;

/// Counters of the status writer (registered by [`crate::metrics`]).
#[derive(Debug, Clone, Default)]
pub struct UpstreamMetrics {
    /// Statuses written.
    pub written: Counter,
    /// Writes that failed (other than the object being gone).
    pub failed: Counter,
    /// Reports answered `Stale` without a write.
    pub stale: Counter,
    /// Reports merged into one already queued for the same object.
    pub coalesced: Counter,
    /// Statuses queued again because the API's copy drifted from the edge's report.
    pub reasserted: Counter,
    /// Writes skipped because the API already held the reported status.
    pub unchanged: Counter,
}

/// State shared by the handles and the worker.
struct Shared {
    /// Held only to queue or take updates, never across an await.
    pending: Mutex<Pending>,
    /// Wakes the idle worker when an object is queued. `Notify` keeps a permit when the worker
    /// is not waiting yet, so a submit between its check and its wait is not missed.
    work: Notify,
    metrics: UpstreamMetrics,
    /// What each edge last reported, against the API's copy. Held only for map updates, never
    /// across an await; never held together with `pending`.
    truths: Mutex<Truths>,
    /// Kube mode's kubelet endpoint: what cloudcore adds to each Node status an edge reports
    /// (`nodes::apply_kubelet_endpoint`), set once at start.
    node_status_rewrite: std::sync::OnceLock<NodeStatusRewrite>,
}

/// Adjusts the Node status `node` reported before it is recorded and written.
pub type NodeStatusRewrite = Arc<dyn Fn(&str, &mut Value) + Send + Sync>;

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn truths(&self) -> MutexGuard<'_, Truths> {
        self.truths.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Queues status updates for the [`UpstreamWorker`]; cheap to clone, one per tunnel session.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
}

/// Writes what [`Upstream`] queues; run exactly one.
pub struct UpstreamWorker {
    shared: Arc<Shared>,
    client: kube::Client,
    /// Shared by the write tasks: each API request takes a token.
    bucket: Arc<Mutex<TokenBucket>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pending = self.shared.pending();
        f.debug_struct("Upstream")
            .field("queued", &pending.queued.len())
            .field("closed", &pending.closed)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UpstreamWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamWorker")
            .field(
                "bucket",
                &*self.bucket.lock().unwrap_or_else(|p| p.into_inner()),
            )
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A handle and the worker that serves it.
    pub fn new(
        client: kube::Client,
        config: UpstreamConfig,
        metrics: UpstreamMetrics,
    ) -> (Upstream, UpstreamWorker) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::new(config.max_pending, REMEMBERED_WRITES)),
            work: Notify::new(),
            metrics,
            truths: Mutex::new(Truths::default()),
            node_status_rewrite: std::sync::OnceLock::new(),
        });
        let worker = UpstreamWorker {
            shared: shared.clone(),
            client,
            bucket: Arc::new(Mutex::new(TokenBucket::new(
                config.qps,
                config.burst,
                Instant::now(),
            ))),
        };
        (Upstream { shared }, worker)
    }

    /// Queues an update; the receiver resolves once it is written or dropped (an error on the
    /// receiver means the worker stopped first). Err(Busy) when `max_pending` distinct objects
    /// are already queued and this one is not among them.
    pub fn submit(&self, mut update: StatusUpdate) -> Result<oneshot::Receiver<Outcome>, Busy> {
        if let (Some(rewrite), Change::Status(status)) =
            (self.shared.node_status_rewrite.get(), &mut update.change)
            && update.object.kind == "Node"
        {
            rewrite(&update.object.name, status);
        }
        if update.origin == Origin::Edge {
            let mut truths = self.shared.truths();
            match &update.change {
                Change::Status(status) => {
                    truths.reported(&update.node, &update.object, update.generation, status)
                }
                Change::Delete => truths.forget(
                    &update.object.kind,
                    &update.object.namespace,
                    &update.object.name,
                    &update.object.uid,
                ),
            }
        }
        let (reply, answer) = oneshot::channel();
        let pushed = self.shared.pending().push(update, reply)?;
        match pushed {
            Push::Queued => self.shared.work.notify_one(),
            Push::Coalesced => {
                self.shared.metrics.coalesced.inc();
            }
            Push::Stale => {
                self.shared.metrics.stale.inc();
            }
            Push::Closed => {}
        }
        Ok(answer)
    }

    /// Sets what cloudcore adds to every Node status an edge reports (once; later calls are
    /// ignored).
    pub fn rewrite_node_status(&self, rewrite: NodeStatusRewrite) {
        let _ = self.shared.node_status_rewrite.set(rewrite);
    }

    /// A session of `node` started; returns whether it is the node's first since this process
    /// started (the edge is then asked to send its last statuses again). What drifted while
    /// the node was away is written back after `settle`, once the edge has had time to deliver
    /// what it learned offline.
    pub fn session_started(&self, node: &str, settle: Duration) -> bool {
        let first = self.shared.truths().session_started(node);
        let upstream = self.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(settle).await;
            let due = upstream.shared.truths().drifted(&node);
            if !due.is_empty() {
                tracing::info!(node.name = %node, objects = due.len(), "statuses changed in the API while the edge was away; writing the edge's again");
            }
            for reassert in due {
                upstream.reassert(reassert);
            }
        });
        first
    }

    /// A session of `node` ended.
    pub fn session_ended(&self, node: &str) {
        self.shared.truths().session_ended(node);
    }

    /// A watch showed an object's status in the API (an edge's pod or Node): if it drifted from
    /// what the edge reported and the edge is connected, the edge's status is written again.
    ///
    /// `status` is computed only for objects an edge reported on: the watches also see every
    /// pod bound to a cloud node, and those are not serialized for nothing.
    pub fn observed(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        uid: &str,
        status: impl FnOnce() -> Value,
    ) {
        let due = {
            let mut truths = self.shared.truths();
            if !truths.holds(kind, namespace, name) {
                return;
            }
            truths.observed(kind, namespace, name, uid, &status())
        };
        if let Some(reassert) = due {
            tracing::debug!(
                kind,
                namespace,
                name,
                "status drifted from the edge's; writing it again"
            );
            self.reassert(reassert);
        }
    }

    /// The object was deleted from the API.
    pub fn deleted(&self, kind: &str, namespace: &str, name: &str, uid: &str) {
        self.shared.truths().forget(kind, namespace, name, uid);
    }

    fn reassert(&self, reassert: Reassert) {
        let update = StatusUpdate {
            node: reassert.node,
            object: reassert.object,
            generation: reassert.generation,
            change: Change::Status(reassert.status),
            origin: Origin::Reassert,
        };
        // Nobody waits for the outcome; a full queue drops it (the next watch event or
        // session brings it back).
        if self.submit(update).is_ok() {
            self.shared.metrics.reasserted.inc();
        }
    }
}

impl UpstreamWorker {
    /// Writes queued updates until `shutdown`; then the queued and in-flight updates are
    /// dropped (their receivers resolve with an error) and later submits are dropped at once.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = self.serve() => {}
        }
        self.shared.pending().close();
    }

    async fn serve(&mut self) {
        // Each write runs as its own task, so a write waiting for the API does not hold up
        // the next object's; the objects being written are never taken again until their
        // write is done (the order of one object's writes decides which status wins).
        let mut writes: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, proto::ObjectRef> = HashMap::new();
        loop {
            let startable = writes.len() < WRITES_IN_FLIGHT && {
                let busy: HashSet<&proto::ObjectRef> = in_flight.values().collect();
                self.shared
                    .pending()
                    .has_work_where(|object| !busy.contains(object))
            };
            if !startable {
                tokio::select! {
                    Some(done) = writes.join_next_with_id(), if !writes.is_empty() => {
                        let id = match done {
                            Ok((id, ())) => id,
                            Err(e) => e.id(),
                        };
                        in_flight.remove(&id);
                    }
                    _ = self.shared.work.notified() => {}
                }
                continue;
            }
            // The token is taken before the update, so reports arriving meanwhile coalesce.
            self.token().await;
            let taken = {
                let busy: HashSet<&proto::ObjectRef> = in_flight.values().collect();
                self.shared
                    .pending()
                    .take_where(|object| !busy.contains(object))
            };
            let job = match taken {
                None => continue,
                Some(Taken::Stale(job)) => {
                    self.shared.metrics.stale.inc();
                    job.resolve(&Outcome::Stale);
                    continue;
                }
                Some(Taken::Write(job)) => job,
            };
            let object = job.update.object.clone();
            let writer = self.writer();
            let task = writes.spawn(async move { writer.write_job(job).await });
            in_flight.insert(task.id(), object);
        }
    }

    fn writer(&self) -> Writer {
        Writer {
            shared: self.shared.clone(),
            client: self.client.clone(),
            bucket: self.bucket.clone(),
        }
    }

    async fn token(&self) {
        self.writer().token().await
    }
}

/// One write's share of the worker: cheap to clone, one per write task.
struct Writer {
    shared: Arc<Shared>,
    client: kube::Client,
    bucket: Arc<Mutex<TokenBucket>>,
}

impl Writer {
    /// Writes one update and answers its waiters.
    async fn write_job(&self, job: Job) {
        let (outcome, live) = self.write(&job.update).await;
        let update = &job.update;
        match &outcome {
            Outcome::Written => {
                self.shared
                    .pending()
                    .written(&update.object, update.generation);
                if let Some(live) = live {
                    self.shared
                        .truths()
                        .applied(&update.object, update.generation, live);
                }
                tracing::debug!(node.name = %update.node, kind = %update.object.kind, namespace = %update.object.namespace, name = %update.object.name, generation = update.generation, "status written");
            }
            Outcome::Gone => {
                self.shared.truths().forget(
                    &update.object.kind,
                    &update.object.namespace,
                    &update.object.name,
                    &update.object.uid,
                );
                tracing::debug!(node.name = %update.node, kind = %update.object.kind, namespace = %update.object.namespace, name = %update.object.name, uid = %update.object.uid, "status not written: the object is gone");
            }
            Outcome::Failed(error) => {
                self.shared.metrics.failed.inc();
                tracing::warn!(node.name = %update.node, kind = %update.object.kind, namespace = %update.object.namespace, name = %update.object.name, %error, "cannot write a status; dropped");
            }
            Outcome::Superseded | Outcome::Stale => {}
        }
        job.resolve(&outcome);
    }

    /// Waits for one token of the bucket.
    async fn token(&self) {
        loop {
            let taken = self
                .bucket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(Instant::now());
            match taken {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Writes one update; with `Written`, the object's status in the API afterwards (when a
    /// status was written or found equal).
    async fn write(&self, update: &StatusUpdate) -> (Outcome, Option<Value>) {
        let Some(kind) = StatusKind::of(&update.object.kind) else {
            let why = format!("statuses of kind {:?} are not written", update.object.kind);
            return (Outcome::Failed(why), None);
        };
        if let Change::Status(status) = &update.change
            && !status.is_object()
        {
            return (
                Outcome::Failed("the status is not a JSON object".into()),
                None,
            );
        }
        let api = match kind.api(self.client.clone(), &update.object.namespace) {
            Ok(api) => api,
            Err(message) => return (Outcome::Failed(message), None),
        };
        match self.attempt(kind, &api, update).await {
            Attempt::Done(outcome, live) => (outcome, live),
            Attempt::Conflict(_) => {
                self.token().await;
                match self.attempt(kind, &api, update).await {
                    Attempt::Done(outcome, live) => (outcome, live),
                    Attempt::Conflict(message) => {
                        (Outcome::Failed(format!("conflict: {message}")), None)
                    }
                }
            }
        }
    }

    /// One GET + PATCH; the caller has taken the GET's token.
    async fn attempt(
        &self,
        kind: StatusKind,
        api: &Api<DynamicObject>,
        update: &StatusUpdate,
    ) -> Attempt {
        let name = &update.object.name;
        let live = match api.get_opt(name).await {
            Ok(Some(live)) => live,
            Ok(None) => return Attempt::Done(Outcome::Gone, None),
            Err(e) => return Attempt::of(e),
        };
        let uid = &update.object.uid;
        if !uid.is_empty() && live.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Attempt::Done(Outcome::Gone, None);
        }
        let status = match &update.change {
            Change::Status(status) => status,
            Change::Delete => {
                self.token().await;
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: live.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                return match api.delete(name, &params).await {
                    Ok(_) => {
                        self.shared.metrics.written.inc();
                        Attempt::Done(Outcome::Written, None)
                    }
                    Err(e) => Attempt::of(e),
                };
            }
        };
        let live_status = live.data["status"].clone();
        if covers(&live_status, &kind.reported(status)) {
            // The API already says what the edge says: nothing to write.
            self.shared.metrics.unchanged.inc();
            return Attempt::Done(Outcome::Written, Some(live_status));
        }
        let body = kind.body(&live, status);
        self.token().await;
        match api
            .patch_status(name, &PatchParams::default(), &kind.patch(body))
            .await
        {
            Ok(written) => {
                self.shared.metrics.written.inc();
                Attempt::Done(Outcome::Written, Some(written.data["status"].clone()))
            }
            Err(e) => Attempt::of(e),
        }
    }
}

/// The result of one GET + PATCH.
enum Attempt {
    /// With `Written`, the object's status in the API afterwards.
    Done(Outcome, Option<Value>),
    /// The object changed between the GET and the PATCH.
    Conflict(String),
}

impl Attempt {
    /// The one place API errors become outcomes and retry decisions.
    fn of(error: kube::Error) -> Attempt {
        match error {
            kube::Error::Api(status) if status.is_not_found() => Attempt::Done(Outcome::Gone, None),
            kube::Error::Api(status) if status.is_conflict() => Attempt::Conflict(status.message),
            other => Attempt::Done(Outcome::Failed(other.to_string()), None),
        }
    }
}

/// The kinds whose status edges report, and how each is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusKind {
    Pod,
    Node,
    Device,
}

impl StatusKind {
    fn of(kind: &str) -> Option<StatusKind> {
        match kind {
            "Pod" => Some(StatusKind::Pod),
            "Node" => Some(StatusKind::Node),
            devices::DEVICE_KIND => Some(StatusKind::Device),
            _ => None,
        }
    }

    fn api(self, client: kube::Client, namespace: &str) -> Result<Api<DynamicObject>, String> {
        match self {
            StatusKind::Pod if namespace.is_empty() => {
                Err("a pod's status report has no namespace".into())
            }
            StatusKind::Pod => Ok(Api::namespaced_with(
                client,
                namespace,
                &ApiResource::erase::<Pod>(&()),
            )),
            StatusKind::Node => Ok(Api::all_with(client, &ApiResource::erase::<Node>(&()))),
            StatusKind::Device if namespace.is_empty() => {
                Err("a device's status report has no namespace".into())
            }
            StatusKind::Device => Ok(Api::namespaced_with(
                client,
                namespace,
                &crate::device_crds::device_resource(),
            )),
        }
    }

    /// The reported status as it is meant to appear in the API (for a Node without strategic
    /// merge directives).
    fn reported(self, reported: &Value) -> Value {
        let mut status = reported.clone();
        if self == StatusKind::Node {
            remove_directives(&mut status);
        }
        status
    }

    /// The patch body: the reported status, conditional on the live object's uid and
    /// resourceVersion.
    fn body(self, live: &DynamicObject, reported: &Value) -> Value {
        let mut status = self.reported(reported);
        if self == StatusKind::Pod {
            keep_unreported_conditions(&mut status, &live.data["status"]["conditions"])
        }
        json!({
            "metadata": {
                "uid": live.metadata.uid,
                "resourceVersion": live.metadata.resource_version,
            },
            "status": status,
        })
    }

    fn patch(self, body: Value) -> Patch<Value> {
        match self {
            StatusKind::Pod | StatusKind::Device => Patch::Merge(body),
            StatusKind::Node => Patch::Strategic(body),
        }
    }
}

/// Appends to the reported conditions the live ones of types the report does not mention, so a
/// merge patch (which replaces the list) keeps them. A report without conditions leaves the
/// live list alone anyway.
fn keep_unreported_conditions(status: &mut Value, live: &Value) {
    let (Some(reported), Some(live)) = (
        status.get_mut("conditions").and_then(Value::as_array_mut),
        live.as_array(),
    ) else {
        return;
    };
    let types: HashSet<String> = reported
        .iter()
        .filter_map(|c| c["type"].as_str().map(String::from))
        .collect();
    reported.extend(
        live.iter()
            .filter(|c| c["type"].as_str().is_some_and(|t| !types.contains(t)))
            .cloned(),
    );
}

/// Removes strategic merge patch directives (`$patch`, `$retainKeys`, `$setElementOrder/..`,
/// ...) at any depth: an edge reports values, not patch instructions.
pub(crate) fn remove_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|key, _| !key.starts_with('$'));
            map.values_mut().for_each(remove_directives);
        }
        Value::Array(list) => {
            list.retain(|element| {
                element
                    .as_object()
                    .is_none_or(|m| !m.keys().any(|k| k == "$patch"))
            });
            list.iter_mut().for_each(remove_directives);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// The queue: coalescing and staleness, without IO.
// ---------------------------------------------------------------------------------------------

/// Updates waiting to be written, at most one per object, and the last written generation of
/// recently written objects.
///
/// An object is its kind, namespace, name *and uid*: reports about two incarnations of one
/// name (a pod deleted and recreated) are not merged, since their generations are unrelated;
/// the one for the old uid ends as `Gone`.
struct Pending {
    /// Objects in the order they were first queued; a coalesced report keeps the place.
    order: VecDeque<proto::ObjectRef>,
    queued: HashMap<proto::ObjectRef, Queued>,
    written: Written,
    max_pending: usize,
    /// The worker stopped: nothing more is queued.
    closed: bool,
}

/// The update to write for one object and everyone waiting for it.
struct Queued {
    update: StatusUpdate,
    waiters: Vec<Waiter>,
}

struct Waiter {
    generation: u64,
    reply: oneshot::Sender<Outcome>,
}

/// What [`Pending::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    /// A new object is queued.
    Queued,
    /// The object was already queued; the newer of the two reports is kept.
    Coalesced,
    /// Answered `Stale` at once.
    Stale,
    /// The worker has stopped; the reply was dropped.
    Closed,
}

/// An update taken off the queue with its waiters.
struct Job {
    update: StatusUpdate,
    waiters: Vec<Waiter>,
}

/// What [`Pending::take`] found.
enum Taken {
    Write(Job),
    /// A newer generation was written while this one waited (it was in flight when this
    /// arrived).
    Stale(Job),
}

impl Pending {
    fn new(max_pending: usize, remembered: usize) -> Pending {
        Pending {
            order: VecDeque::new(),
            queued: HashMap::new(),
            written: Written::new(remembered),
            max_pending,
            closed: false,
        }
    }

    fn push(
        &mut self,
        update: StatusUpdate,
        reply: oneshot::Sender<Outcome>,
    ) -> Result<Push, Busy> {
        if self.closed {
            return Ok(Push::Closed);
        }
        if update.origin == Origin::Edge && self.written.is_stale(&update.object, update.generation)
        {
            // The submitter may already have stopped waiting.
            let _ = reply.send(Outcome::Stale);
            return Ok(Push::Stale);
        }
        let waiter = Waiter {
            generation: update.generation,
            reply,
        };
        if let Some(queued) = self.queued.get_mut(&update.object) {
            if update.generation > queued.update.generation {
                queued.update = update;
            } else if update.generation == queued.update.generation
                && update.origin == Origin::Reassert
            {
                // The same report, now to be written even if that generation was.
                queued.update.origin = Origin::Reassert;
            }
            queued.waiters.push(waiter);
            return Ok(Push::Coalesced);
        }
        if self.queued.len() >= self.max_pending {
            return Err(Busy);
        }
        self.order.push_back(update.object.clone());
        self.queued.insert(
            update.object.clone(),
            Queued {
                update,
                waiters: vec![waiter],
            },
        );
        Ok(Push::Queued)
    }

    #[cfg(test)]
    fn has_work(&self) -> bool {
        !self.order.is_empty()
    }

    /// Whether an object `free` accepts is queued.
    fn has_work_where(&self, free: impl Fn(&proto::ObjectRef) -> bool) -> bool {
        self.order.iter().any(free)
    }

    /// The object queued longest, if any.
    #[cfg(test)]
    fn take(&mut self) -> Option<Taken> {
        self.take_where(|_| true)
    }

    /// The object queued longest among those `free` accepts (the others keep their place).
    fn take_where(&mut self, free: impl Fn(&proto::ObjectRef) -> bool) -> Option<Taken> {
        let position = self.order.iter().position(free)?;
        let object = self.order.remove(position)?;
        let queued = self.queued.remove(&object)?;
        let stale = queued.update.origin == Origin::Edge
            && self
                .written
                .is_stale(&queued.update.object, queued.update.generation);
        let job = Job {
            update: queued.update,
            waiters: queued.waiters,
        };
        Some(if stale {
            Taken::Stale(job)
        } else {
            Taken::Write(job)
        })
    }

    /// Records that `generation` of `object` is what the API holds.
    fn written(&mut self, object: &proto::ObjectRef, generation: u64) {
        self.written.record(object, generation);
    }

    /// Drops everything queued (the receivers see an error) and refuses further updates.
    fn close(&mut self) {
        self.closed = true;
        self.order.clear();
        self.queued.clear();
    }
}

impl Job {
    /// Answers every waiter; see [`Outcome`] for what coalesced reports get.
    fn resolve(self, outcome: &Outcome) {
        for waiter in self.waiters {
            let answer = match outcome {
                Outcome::Written if waiter.generation < self.update.generation => {
                    Outcome::Superseded
                }
                other => other.clone(),
            };
            // The submitter may have stopped waiting.
            let _ = waiter.reply.send(answer);
        }
    }
}

/// The last written generation per object, bounded: the least recently written is forgotten.
///
/// Why this memory is enough, although a cloudcore restart (or eviction) forgets it and the
/// next report of the object is written unchecked:
///
/// - An edge's generations grow strictly across its restarts and ignore its wall clock
///   (`edgecore::outbox` keeps a counter in `edge.db` and never hands out a generation the
///   cloud may have seen), so "newer" is a plain `>` on the number, whatever the clocks of
///   edge and cloud say. Generations of different edges are never compared: a pod's reports
///   come from the one node it is bound to, and the uid is part of the key.
/// - An edge holds one report per object, the latest, and sends a report only once it is
///   durable on the edge (except while its disk refuses writes). What it sends after a
///   reconnect or a crash is therefore that latest report, never an older one.
/// - Within a session reports arrive in the order sent (one QUIC stream), and an edge sends
///   an object's reports in generation order and never an older one after a newer one; a
///   report arriving while an older one of the object waits is coalesced with it in
///   [`Pending`]. Messages of a session never arrive after it ended, and a cloudcore restart
///   ends every session, so what arrives after a restart is each edge's latest report.
///
/// The one gap: while an edge's disk refuses writes it sends reports from memory; if it then
/// crashes *and* cloudcore restarts, the edge may resend an older durable report, which is
/// written once, until the pod's worker reports the current status again.
struct Written {
    /// Generation and write sequence number per object.
    generations: HashMap<proto::ObjectRef, (u64, u64)>,
    /// Objects by write sequence number, oldest first.
    by_age: BTreeMap<u64, proto::ObjectRef>,
    next: u64,
    capacity: usize,
}

impl Written {
    fn new(capacity: usize) -> Written {
        Written {
            generations: HashMap::new(),
            by_age: BTreeMap::new(),
            next: 0,
            capacity,
        }
    }

    fn is_stale(&self, object: &proto::ObjectRef, generation: u64) -> bool {
        self.generations
            .get(object)
            .is_some_and(|&(written, _)| generation <= written)
    }

    fn record(&mut self, object: &proto::ObjectRef, generation: u64) {
        let sequence = self.next;
        self.next += 1;
        let generation = match self.generations.get(object) {
            Some(&(written, old_sequence)) => {
                self.by_age.remove(&old_sequence);
                written.max(generation)
            }
            None => generation,
        };
        self.generations
            .insert(object.clone(), (generation, sequence));
        self.by_age.insert(sequence, object.clone());
        while self.generations.len() > self.capacity {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.generations.remove(&oldest);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pacing.
// ---------------------------------------------------------------------------------------------

/// A token bucket: `rate` tokens per second, holding at most `capacity`, full at the start.
#[derive(Debug, Clone)]
struct TokenBucket {
    /// `None`: no limit.
    rate: Option<f64>,
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// Tolerance for float rounding: a token is available once this close to whole.
    const EPSILON: f64 = 1e-9;

    fn new(qps: f64, burst: u32, now: Instant) -> TokenBucket {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            rate: (qps > 0.0).then_some(qps),
            capacity,
            tokens: capacity,
            updated: now,
        }
    }

    /// Takes a token at `now`, or says how long until one is available.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        if now > self.updated {
            let earned = now.duration_since(self.updated).as_secs_f64() * rate;
            self.tokens = (self.tokens + earned).min(self.capacity);
            self.updated = now;
        }
        if self.tokens + Self::EPSILON >= 1.0 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / rate;
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, uid: &str) -> proto::ObjectRef {
        proto::ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn update(name: &str, generation: u64) -> StatusUpdate {
        StatusUpdate {
            node: "edge-1".into(),
            object: object(name, "uid-1"),
            generation,
            change: Change::Status(json!({"phase": "Running", "generation": generation})),
            origin: Origin::Edge,
        }
    }

    /// Pushes `update` and returns what happened and the submitter's receiver.
    fn push(
        pending: &mut Pending,
        update: StatusUpdate,
    ) -> (Result<Push, Busy>, oneshot::Receiver<Outcome>) {
        let (reply, answer) = oneshot::channel();
        (pending.push(update, reply), answer)
    }

    fn write(taken: Option<Taken>) -> Job {
        match taken {
            Some(Taken::Write(job)) => job,
            Some(Taken::Stale(job)) => panic!("generation {} taken stale", job.update.generation),
            None => panic!("nothing queued"),
        }
    }

    fn answer(mut receiver: oneshot::Receiver<Outcome>) -> Outcome {
        receiver.try_recv().expect("answered")
    }

    #[test]
    fn a_single_report_is_written() {
        let mut pending = Pending::new(10, 10);
        let (pushed, rx) = push(&mut pending, update("web", 1));
        assert_eq!(pushed, Ok(Push::Queued));
        assert!(pending.has_work());
        let job = write(pending.take());
        assert_eq!(job.update, update("web", 1));
        assert!(!pending.has_work());
        assert!(pending.take().is_none());
        pending.written(&job.update.object, 1);
        job.resolve(&Outcome::Written);
        assert_eq!(answer(rx), Outcome::Written);
    }

    #[test]
    fn reports_of_one_object_coalesce_to_the_newest() {
        let mut pending = Pending::new(10, 10);
        let (first, rx1) = push(&mut pending, update("web", 1));
        let (second, rx3) = push(&mut pending, update("web", 3));
        let (third, rx2) = push(&mut pending, update("web", 2));
        let (duplicate, rx3_again) = push(&mut pending, update("web", 3));
        assert_eq!(first, Ok(Push::Queued));
        assert_eq!(second, Ok(Push::Coalesced));
        assert_eq!(
            third,
            Ok(Push::Coalesced),
            "an older report joins the newer"
        );
        assert_eq!(duplicate, Ok(Push::Coalesced));

        let job = write(pending.take());
        assert_eq!(job.update, update("web", 3), "the newest status is written");
        assert!(pending.take().is_none(), "one write for the object");
        job.resolve(&Outcome::Written);
        assert_eq!(answer(rx1), Outcome::Superseded);
        assert_eq!(answer(rx2), Outcome::Superseded);
        assert_eq!(answer(rx3), Outcome::Written);
        assert_eq!(answer(rx3_again), Outcome::Written);
    }

    #[test]
    fn coalesced_reports_share_a_failed_or_gone_outcome() {
        for outcome in [
            Outcome::Gone,
            Outcome::Failed("boom".into()),
            Outcome::Stale,
        ] {
            let mut pending = Pending::new(10, 10);
            let (_, rx1) = push(&mut pending, update("web", 1));
            let (_, rx2) = push(&mut pending, update("web", 2));
            write(pending.take()).resolve(&outcome);
            assert_eq!(answer(rx1), outcome);
            assert_eq!(answer(rx2), outcome);
        }
    }

    #[test]
    fn a_reassert_writes_a_generation_already_written() {
        let mut pending = Pending::new(10, 10);
        pending.written(&object("web", "uid-1"), 5);
        let reassert = StatusUpdate {
            origin: Origin::Reassert,
            ..update("web", 5)
        };
        let (pushed, _rx) = push(&mut pending, reassert.clone());
        assert_eq!(pushed, Ok(Push::Queued));
        assert!(matches!(pending.take(), Some(Taken::Write(job)) if job.update == reassert));
        // Coalesced with the edge's resend of the same generation, it is still written.
        let (pushed, _rx) = push(&mut pending, update("web", 5));
        assert_eq!(pushed, Ok(Push::Stale), "alone, the resend is stale");
        let mut fresh = Pending::new(10, 10);
        let (_, _rx1) = push(&mut fresh, update("web", 5));
        let (pushed, _rx2) = push(&mut fresh, reassert.clone());
        assert_eq!(pushed, Ok(Push::Coalesced));
        fresh.written(&object("web", "uid-1"), 5);
        assert!(
            matches!(fresh.take(), Some(Taken::Write(job)) if job.update.origin == Origin::Reassert)
        );
    }

    #[test]
    fn reports_not_newer_than_the_written_one_are_stale() {
        let mut pending = Pending::new(10, 10);
        pending.written(&object("web", "uid-1"), 5);
        for generation in [1, 5] {
            let (pushed, rx) = push(&mut pending, update("web", generation));
            assert_eq!(pushed, Ok(Push::Stale), "generation {generation}");
            assert_eq!(answer(rx), Outcome::Stale);
        }
        assert!(!pending.has_work(), "stale reports are not queued");
        let (pushed, _rx) = push(&mut pending, update("web", 6));
        assert_eq!(pushed, Ok(Push::Queued));
        // The generation is per uid: a recreated pod starts again.
        let recreated = StatusUpdate {
            object: object("web", "uid-2"),
            ..update("web", 1)
        };
        let (pushed, _rx) = push(&mut pending, recreated);
        assert_eq!(pushed, Ok(Push::Queued));
    }

    #[test]
    fn a_report_queued_during_a_newer_write_is_stale_when_taken() {
        let mut pending = Pending::new(10, 10);
        let (_, rx3) = push(&mut pending, update("web", 3));
        let in_flight = write(pending.take());
        let (pushed, rx2) = push(&mut pending, update("web", 2));
        assert_eq!(pushed, Ok(Push::Queued), "nothing written yet");
        pending.written(&in_flight.update.object, 3);
        in_flight.resolve(&Outcome::Written);
        match pending.take() {
            Some(Taken::Stale(job)) => job.resolve(&Outcome::Stale),
            _ => panic!("generation 2 after 3 must be stale"),
        }
        assert_eq!(answer(rx3), Outcome::Written);
        assert_eq!(answer(rx2), Outcome::Stale);
    }

    #[test]
    fn a_report_queued_during_a_failed_write_is_written() {
        let mut pending = Pending::new(10, 10);
        let (_, _rx3) = push(&mut pending, update("web", 3));
        let in_flight = write(pending.take());
        let (_, _rx2) = push(&mut pending, update("web", 2));
        in_flight.resolve(&Outcome::Failed("unavailable".into()));
        assert_eq!(write(pending.take()).update.generation, 2);
    }

    #[test]
    fn an_object_being_written_is_not_taken_again_but_others_are() {
        let mut pending = Pending::new(10, 10);
        let _ = push(&mut pending, update("a", 1));
        let in_flight = write(pending.take_where(|_| true));
        let _ = push(&mut pending, update("a", 2));
        let _ = push(&mut pending, update("b", 1));
        let free = |o: &proto::ObjectRef| *o != in_flight.update.object;
        assert!(pending.has_work_where(free));
        assert_eq!(write(pending.take_where(free)).update, update("b", 1));
        assert!(
            !pending.has_work_where(free),
            "a's report waits for a's write"
        );
        assert!(pending.take_where(free).is_none());
        pending.written(&in_flight.update.object, 1);
        assert_eq!(write(pending.take_where(|_| true)).update, update("a", 2));
    }

    #[test]
    fn incarnations_of_one_name_are_separate_objects() {
        let mut pending = Pending::new(10, 10);
        let old = update("web", 7);
        let new = StatusUpdate {
            object: object("web", "uid-2"),
            ..update("web", 1)
        };
        assert_eq!(push(&mut pending, old.clone()).0, Ok(Push::Queued));
        assert_eq!(push(&mut pending, new.clone()).0, Ok(Push::Queued));
        assert_eq!(write(pending.take()).update, old);
        assert_eq!(write(pending.take()).update, new);
    }

    #[test]
    fn objects_are_taken_in_arrival_order() {
        let mut pending = Pending::new(10, 10);
        for (name, generation) in [("a", 1), ("b", 1), ("a", 2), ("c", 1)] {
            let _ = push(&mut pending, update(name, generation));
        }
        let order: Vec<(String, u64)> = std::iter::from_fn(|| pending.take())
            .map(|taken| {
                let job = match taken {
                    Taken::Write(job) | Taken::Stale(job) => job,
                };
                (job.update.object.name, job.update.generation)
            })
            .collect();
        assert_eq!(order, [("a".into(), 2), ("b".into(), 1), ("c".into(), 1)]);
    }

    #[test]
    fn busy_when_max_pending_objects_are_queued() {
        let mut pending = Pending::new(2, 10);
        assert_eq!(push(&mut pending, update("a", 1)).0, Ok(Push::Queued));
        assert_eq!(push(&mut pending, update("b", 1)).0, Ok(Push::Queued));
        let (refused, mut rx) = push(&mut pending, update("c", 1));
        assert_eq!(refused, Err(Busy));
        assert!(rx.try_recv().is_err(), "the refused reply is dropped");
        assert_eq!(
            push(&mut pending, update("a", 2)).0,
            Ok(Push::Coalesced),
            "a queued object still takes newer reports"
        );
        let _ = pending.take();
        assert_eq!(push(&mut pending, update("c", 1)).0, Ok(Push::Queued));
    }

    #[test]
    fn closing_drops_queued_and_later_reports() {
        let mut pending = Pending::new(10, 10);
        let (_, mut queued) = push(&mut pending, update("a", 1));
        pending.close();
        assert!(queued.try_recv().is_err());
        assert!(!pending.has_work());
        let (pushed, mut later) = push(&mut pending, update("b", 1));
        assert_eq!(pushed, Ok(Push::Closed));
        assert!(later.try_recv().is_err());
    }

    #[test]
    fn written_generations_are_bounded_least_recently_written_first() {
        let mut written = Written::new(2);
        let (a, b, c) = (object("a", "1"), object("b", "1"), object("c", "1"));
        written.record(&a, 1);
        written.record(&b, 1);
        written.record(&a, 2); // a is now the most recent
        written.record(&c, 1); // evicts b
        assert!(written.is_stale(&a, 2));
        assert!(!written.is_stale(&b, 1), "b was forgotten");
        assert!(written.is_stale(&c, 1));
        assert_eq!(written.generations.len(), 2);
        assert_eq!(written.by_age.len(), 2);
        written.record(&a, 1);
        assert!(written.is_stale(&a, 2), "a generation never goes back");
    }

    #[test]
    fn token_bucket_starts_full_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut bucket = TokenBucket::new(10.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(t0), Ok(()));
        }
        assert_eq!(bucket.take(t0), Err(Duration::from_millis(100)));
        assert_eq!(bucket.take(at(40)), Err(Duration::from_millis(60)));
        assert_eq!(bucket.take(at(100)), Ok(()));
        assert!(bucket.take(at(100)).is_err());
        // 250ms earn 2.5 tokens.
        assert_eq!(bucket.take(at(350)), Ok(()));
        assert_eq!(bucket.take(at(350)), Ok(()));
        assert_eq!(bucket.take(at(350)), Err(Duration::from_millis(50)));
        // A long quiet period refills only up to the burst.
        let later = at(60_000);
        for _ in 0..3 {
            assert_eq!(bucket.take(later), Ok(()));
        }
        assert!(bucket.take(later).is_err());
    }

    #[test]
    fn token_bucket_edge_cases() {
        let t0 = Instant::now();
        let mut unlimited = TokenBucket::new(0.0, 1, t0);
        let mut nan = TokenBucket::new(f64::NAN, 1, t0);
        for _ in 0..1000 {
            assert_eq!(unlimited.take(t0), Ok(()));
            assert_eq!(nan.take(t0), Ok(()));
        }
        let mut no_burst = TokenBucket::new(2.0, 0, t0);
        assert_eq!(no_burst.take(t0), Ok(()), "a burst of 0 still allows one");
        assert_eq!(no_burst.take(t0), Err(Duration::from_millis(500)));
        // Time that appears to go backwards earns nothing and does not panic.
        let mut bucket = TokenBucket::new(1.0, 1, t0 + Duration::from_secs(5));
        assert_eq!(bucket.take(t0 + Duration::from_secs(5)), Ok(()));
        assert_eq!(bucket.take(t0), Err(Duration::from_secs(1)));
        // A tiny rate gives a long wait, not an overflow.
        let mut slow = TokenBucket::new(1e-300, 1, t0);
        assert_eq!(slow.take(t0), Ok(()));
        assert_eq!(slow.take(t0), Err(Duration::MAX));
    }

    #[test]
    fn pod_patches_keep_conditions_the_edge_does_not_report() {
        let live: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "uid": "u1", "resourceVersion": "42"},
            "status": {"conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False"}
            ], "podIPs": [{"ip": "10.0.0.1"}]}
        }))
        .expect("a pod");
        let reported = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}], "podIPs": [{"ip": "10.0.0.2"}]});
        let body = StatusKind::Pod.body(&live, &reported);
        assert_eq!(
            body,
            json!({
                "metadata": {"uid": "u1", "resourceVersion": "42"},
                "status": {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
                    "podIPs": [{"ip": "10.0.0.2"}]
                }
            })
        );
        let without_conditions = StatusKind::Pod.body(&live, &json!({"phase": "Running"}));
        assert_eq!(without_conditions["status"], json!({"phase": "Running"}));
    }

    #[test]
    fn node_patches_carry_no_strategic_directives() {
        let live: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "edge-1", "uid": "n1", "resourceVersion": "7"},
        }))
        .expect("a node");
        let reported = json!({
            "$patch": "replace",
            "conditions": [
                {"type": "Ready", "$patch": "delete"},
                {"type": "MemoryPressure", "status": "False", "$retainKeys": ["type"]}
            ],
            "$setElementOrder/conditions": [{"type": "MemoryPressure"}]
        });
        let body = StatusKind::Node.body(&live, &reported);
        assert_eq!(
            body["status"],
            json!({"conditions": [{"type": "MemoryPressure", "status": "False"}]})
        );
        assert_eq!(
            body["metadata"],
            json!({"uid": "n1", "resourceVersion": "7"})
        );
        assert!(matches!(StatusKind::Node.patch(body), Patch::Strategic(_)));
    }

    #[test]
    fn api_errors_map_to_outcomes() {
        fn api_error(code: u16, reason: &str) -> kube::Error {
            let status: kube::core::Status = serde_json::from_value(
                json!({"status": "Failure", "code": code, "reason": reason, "message": "m"}),
            )
            .expect("a status");
            kube::Error::Api(Box::new(status))
        }
        assert!(matches!(
            Attempt::of(api_error(404, "NotFound")),
            Attempt::Done(Outcome::Gone, None)
        ));
        assert!(matches!(
            Attempt::of(api_error(409, "Conflict")),
            Attempt::Conflict(_)
        ));
        assert!(matches!(
            Attempt::of(api_error(422, "Invalid")),
            Attempt::Done(Outcome::Failed(_), None)
        ));
    }

    #[test]
    fn device_patches_merge_the_reported_status_with_preconditions() {
        let live: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "thermo", "namespace": "default", "uid": "d1", "resourceVersion": "9"},
            "status": {"twins": [{"propertyName": "old"}], "state": "offline"}
        }))
        .expect("a device");
        let reported = json!({"twins": [{"propertyName": "t", "reported": {"value": "21"}}],
            "state": "ok", "lastOnlineTime": "2026-01-01T00:00:00Z"});
        assert_eq!(StatusKind::of("Device"), Some(StatusKind::Device));
        let body = StatusKind::Device.body(&live, &reported);
        assert_eq!(
            body["status"], reported,
            "the twins list replaces the live one"
        );
        assert_eq!(
            body["metadata"],
            json!({"uid": "d1", "resourceVersion": "9"})
        );
        assert!(matches!(StatusKind::Device.patch(body), Patch::Merge(_)));
    }

    /// The worker against the embedded API server: uid precondition, pod conditions kept,
    /// node conditions merged by type, staleness.
    #[tokio::test]
    async fn writes_through_the_embedded_api() {
        use k8s_openapi::api::core::v1::{Node, Pod};
        use kube::api::PostParams;

        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::pki::ClusterCa::load_or_create(dir.path()).expect("ca");
        let shutdown = CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let embedded = crate::apiserver::start(
            dir.path(),
            "127.0.0.1:0".parse().expect("address"),
            &["127.0.0.1".to_string()],
            &ca,
            crate::streams::Streams::new(1),
            shutdown.clone(),
            &tracker,
        )
        .await
        .expect("embedded api");
        let kubeconfig = kube::config::Kubeconfig::read_from(&embedded.kubeconfig).expect("read");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        let client = kube::Client::try_from(config).expect("client");

        let metrics = UpstreamMetrics::default();
        let (upstream, worker) =
            Upstream::new(client.clone(), UpstreamConfig::default(), metrics.clone());
        tracker.spawn(worker.run(shutdown.clone()));

        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let new_pod = || -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"containers": [{"name": "app", "image": "nginx"}]}
            }))
            .expect("pod")
        };
        let pod = pods
            .create(&PostParams::default(), &new_pod())
            .await
            .expect("create");
        let uid = pod.metadata.uid.clone().expect("uid");
        pods.patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}),
            ),
        )
        .await
        .expect("scheduled");

        let report = |uid: &str, generation: u64| StatusUpdate {
            node: "edge-1".into(),
            object: proto::ObjectRef {
                kind: "Pod".into(),
                namespace: "default".into(),
                name: "web".into(),
                uid: uid.into(),
            },
            generation,
            change: Change::Status(
                json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
            ),
            origin: Origin::Edge,
        };
        let outcome = upstream.submit(report(&uid, 1)).expect("queued").await;
        assert_eq!(outcome, Ok(Outcome::Written));
        let written = serde_json::to_value(pods.get("web").await.expect("get")).expect("json");
        assert_eq!(written["status"]["phase"], "Running");
        let mut types: Vec<&str> = written["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        types.sort_unstable();
        assert_eq!(types, ["PodScheduled", "Ready"]);

        let outcome = upstream.submit(report(&uid, 1)).expect("answered").await;
        assert_eq!(outcome, Ok(Outcome::Stale));

        // Deleted and recreated under the same name: the old uid's report is not written.
        pods.delete("web", &DeleteParams::default().grace_period(0))
            .await
            .expect("delete");
        pods.create(&PostParams::default(), &new_pod())
            .await
            .expect("recreate");
        let outcome = upstream.submit(report(&uid, 2)).expect("queued").await;
        assert_eq!(outcome, Ok(Outcome::Gone));
        let recreated = pods.get("web").await.expect("get");
        assert_ne!(
            recreated.status.and_then(|s| s.phase).as_deref(),
            Some("Running")
        );

        // Node: conditions merge by type, so the Ready condition stays.
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "edge-1"}})).expect("node");
        let node = nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        nodes
            .patch_status(
                "edge-1",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "EdgecoreReady"}]}})),
            )
            .await
            .expect("ready");
        let node_report = StatusUpdate {
            node: "edge-1".into(),
            object: proto::ObjectRef {
                kind: "Node".into(),
                namespace: String::new(),
                name: "edge-1".into(),
                uid: node.metadata.uid.clone().expect("uid"),
            },
            generation: 1,
            change: Change::Status(
                json!({"conditions": [{"type": "MemoryPressure", "status": "False"}]}),
            ),
            origin: Origin::Edge,
        };
        let outcome = upstream.submit(node_report).expect("queued").await;
        assert_eq!(outcome, Ok(Outcome::Written));
        let written = serde_json::to_value(nodes.get("edge-1").await.expect("get")).expect("json");
        let conditions = written["status"]["conditions"]
            .as_array()
            .expect("conditions");
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["reason"] == "EdgecoreReady"),
            "{conditions:?}"
        );
        assert!(
            conditions.iter().any(|c| c["type"] == "MemoryPressure"),
            "{conditions:?}"
        );

        assert_eq!(metrics.written.get(), 2);
        assert_eq!(metrics.stale.get(), 1);
        assert_eq!(metrics.failed.get(), 0);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
