//! The Job controller: runs a Job's pods to completion, in kube-controller-manager's shape.
//!
//! A Job's pods come from its template with `generateName: <job>-` (`<job>-<index>-` in
//! Indexed mode), the labels `batch.kubernetes.io/controller-uid`, `batch.kubernetes.io/job-name`
//! and their legacy twins `controller-uid`, `job-name`, a controller owner reference, and the
//! finalizer `batch.kubernetes.io/job-tracking`. The finalizer is how a finished pod is counted
//! exactly once, even if it is deleted before the controller sees it finish: a finished (or
//! terminating) pod is first written into `status.uncountedTerminatedPods`, then loses its
//! finalizer, then moves from there into `status.succeeded` or `status.failed`.
//!
//! Each reconcile reads the Job and its pods from the API (a consistent read of the embedded
//! store) rather than from a cache, so it needs none of kube-controller-manager's expectations:
//! the reflectors only trigger reconciles. The rules, in order:
//!
//! 1. count finished pods (the finalizer dance above);
//! 2. decide whether the Job is finishing: `FailureTarget` (`BackoffLimitExceeded` when more
//!    pods failed than `backoffLimit`, `DeadlineExceeded` past `activeDeadlineSeconds`) or
//!    `SuccessCriteriaMet` (`CompletionsReached`); a finishing Job deletes its active pods and,
//!    once none is left, gets its final `Failed` or `Complete` condition (v1.31+ semantics);
//! 3. otherwise keep `min(parallelism, remaining completions)` pods active, recreating failed
//!    ones after the exponential back-off (10 s, 20 s, 40 s, … capped at 6 min, counted from the
//!    last failure after the last success), or none while `suspend` is set;
//! 4. a finished Job with `ttlSecondsAfterFinished` is deleted when that runs out (Foreground,
//!    with a uid precondition, as the TTL-after-finished controller does).
//!
//! The autonomy rule ([`crate::pods`]): a pod bound to a disconnected node is never deleted on
//! the Job's account (scale-down, suspend, deadline, backoff limit). It stays counted as active,
//! and a finishing Job waits for it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus, UncountedTerminatedPods};
use k8s_openapi::api::core::v1::{EnvVar, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, PartialObjectMeta, PartialObjectMetaExt, Patch, PatchParams,
    PostParams, Preconditions,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::events::{EventType, Recorder};
use crate::informer::{SharedInformer, WatchEvent};
use crate::pods;

/// The name this controller reports its sync state under, and its Events' component.
const NAME: &str = "job";
const COMPONENT: &str = "job-controller";

/// Label with the owning Job's uid (and the selector the API generates for a Job).
pub const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
/// Label with the owning Job's name.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
/// The pre-1.27 spellings of the two labels, still set for selectors that use them.
pub const LEGACY_CONTROLLER_UID_LABEL: &str = "controller-uid";
pub const LEGACY_JOB_NAME_LABEL: &str = "job-name";
/// Annotation and label with an Indexed Job pod's completion index.
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// The environment variable an Indexed Job pod finds its index in.
pub const COMPLETION_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";
/// The finalizer that keeps a pod until the Job has counted it.
pub const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";
/// `spec.managedBy` of Jobs this controller manages (or none).
const MANAGED_BY: &str = "kubernetes.io/job-controller";

/// The default `backoffLimit`.
const DEFAULT_BACKOFF_LIMIT: i32 = 6;
/// The first back-off after a failure, doubled for each further one.
const BACKOFF_BASE: Duration = Duration::from_secs(10);
/// The longest back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(360);

/// How often a finishing Job looks again at a pod it keeps for a disconnected node.
const KEPT_POD_RECHECK: Duration = Duration::from_secs(5);

/// What a reconcile can fail with; the Job is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("api request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("the job has no {0}")]
    Incomplete(&'static str),
}

/// What the reconciles share.
struct State {
    ctx: Arc<Context>,
    recorder: Recorder,
}

/// The Job controller, woken by the pods of its Jobs through the shared `pods` informer (its
/// handler is added here, [`pod_triggers`]); the future runs it until `shutdown`.
pub(crate) fn run(
    ctx: Arc<Context>,
    pods: &mut SharedInformer<Pod>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let (triggers, triggered) = futures::channel::mpsc::unbounded();
    pods.add_handler(pod_triggers(ctx.clone(), triggers));
    async move {
        let jobs: Api<Job> = Api::all(ctx.client.clone());
        let state = Arc::new(State {
            recorder: ctx.recorder.for_component(COMPONENT),
            ctx: ctx.clone(),
        });
        let controller = Controller::new(jobs, watcher::Config::default())
            .owns_stream(triggered.map(Ok))
            .graceful_shutdown_on(shutdown.clone().cancelled_owned());
        let store = controller.store();
        tokio::spawn(mark_when_listed(ctx.clone(), NAME, store, shutdown.clone()));
        controller
            .run(reconcile, error_policy, state)
            .for_each(|result| {
                report_sync(&ctx, NAME, &result);
                async {}
            })
            .await;
    }
}

/// The handler that turns the shared pod informer's events into the Job controller's
/// triggers: the metadata of every pod with [`CONTROLLER_UID_LABEL`] listed, applied or
/// deleted, and of a pod that loses the label, as the watch selecting that label would deliver
/// them (the API sends `DELETED` when an object stops matching a watch's selector). A lost
/// watch makes the controller unsynced until a reconcile goes through again ([`report_sync`]).
fn pod_triggers(
    ctx: Arc<Context>,
    triggers: UnboundedSender<PartialObjectMeta<Pod>>,
) -> impl FnMut(&WatchEvent<Pod>) + Send + 'static {
    // The pods the label selects now, by namespace and name (cleared when the watch lists
    // again, as a new selecting list would start from nothing).
    let mut selected: HashSet<(String, String)> = HashSet::new();
    move |event| {
        let pod = match event {
            Ok(watcher::Event::Init) => {
                selected.clear();
                return;
            }
            Ok(watcher::Event::InitDone) => return,
            Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod)) => {
                let key = (pod.namespace().unwrap_or_default(), pod.name_any());
                let was = selected.remove(&key);
                let is = pod.labels().contains_key(CONTROLLER_UID_LABEL);
                if is {
                    selected.insert(key);
                }
                if !(was || is) {
                    return;
                }
                pod
            }
            Ok(watcher::Event::Delete(pod)) => {
                selected.remove(&(pod.namespace().unwrap_or_default(), pod.name_any()));
                if !pod.labels().contains_key(CONTROLLER_UID_LABEL) {
                    return;
                }
                pod
            }
            Err(e) => {
                tracing::warn!(controller = NAME, error = %e, "watch failed; relisting");
                ctx.mark_synced(NAME, false);
                return;
            }
        };
        // The receiver is gone only once the controller has stopped.
        let _ = triggers.unbounded_send(pod.metadata.clone().into_request_partial::<Pod>());
    }
}

/// Marks controller `name` synced once its main cache has listed. The store is looked at
/// every 200 ms rather than awaited: kube-runtime's readiness signal wakes only the last of
/// several waiters, and the controller's own runner already waits on it.
pub(crate) async fn mark_when_listed<K>(
    ctx: Arc<Context>,
    name: &'static str,
    store: kube::runtime::reflector::Store<K>,
    shutdown: CancellationToken,
) where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Some(listed) = store.wait_until_ready().now_or_never() {
            if listed.is_ok() {
                ctx.mark_synced(name, true);
            }
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Records a controller's sync state from its run stream: a lost watch makes it unsynced until
/// a reconcile goes through again.
pub(crate) fn report_sync<T, E: std::fmt::Display>(
    ctx: &Context,
    name: &'static str,
    result: &Result<T, kube::runtime::controller::Error<E, watcher::Error>>,
) {
    match result {
        Ok(_) => ctx.mark_synced(name, true),
        Err(kube::runtime::controller::Error::QueueError(e)) => {
            tracing::warn!(controller = name, error = %e, "watch failed; relisting");
            ctx.mark_synced(name, false);
        }
        Err(_) => {}
    }
}

fn error_policy(_job: Arc<Job>, error: &Error, _state: Arc<State>) -> Action {
    match error {
        Error::Api(kube::Error::Api(status)) if status.code == 409 => {
            Action::requeue(Duration::from_millis(200))
        }
        _ => {
            tracing::debug!(%error, "job reconcile failed");
            Action::requeue(Duration::from_secs(2))
        }
    }
}

/// How a pod ended, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
}

/// The type, reason and message of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    target: &'static str,
    final_type: &'static str,
    reason: &'static str,
    message: &'static str,
}

const BACKOFF_LIMIT_EXCEEDED: Verdict = Verdict {
    target: "FailureTarget",
    final_type: "Failed",
    reason: "BackoffLimitExceeded",
    message: "Job has reached the specified backoff limit",
};
const DEADLINE_EXCEEDED: Verdict = Verdict {
    target: "FailureTarget",
    final_type: "Failed",
    reason: "DeadlineExceeded",
    message: "Job was active longer than specified deadline",
};
const COMPLETIONS_REACHED: Verdict = Verdict {
    target: "SuccessCriteriaMet",
    final_type: "Complete",
    reason: "CompletionsReached",
    message: "Reached expected number of succeeded pods",
};

fn ns_name(job: &Job) -> Result<(String, String), Error> {
    let ns = job
        .metadata
        .namespace
        .clone()
        .ok_or(Error::Incomplete("namespace"))?;
    let name = job.metadata.name.clone().ok_or(Error::Incomplete("name"))?;
    Ok((ns, name))
}

/// The Job as the object of an Event.
fn job_ref(job: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: job.metadata.name.clone(),
        namespace: job.metadata.namespace.clone(),
        uid: job.metadata.uid.clone(),
        resource_version: job.metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

async fn reconcile(cached: Arc<Job>, state: Arc<State>) -> Result<Action, Error> {
    let (ns, name) = ns_name(&cached)?;
    let client = state.ctx.client.clone();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let Some(job) = jobs.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let uid = job.metadata.uid.clone().ok_or(Error::Incomplete("uid"))?;
    let spec = job.spec.clone().ok_or(Error::Incomplete("spec"))?;
    if spec.managed_by.as_deref().is_some_and(|m| m != MANAGED_BY) {
        return Ok(Action::await_change());
    }
    let selector = format!("{CONTROLLER_UID_LABEL}={uid}");
    let pods: Vec<Pod> = pods_api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|p| pods::controller_of(&p.metadata).is_some_and(|r| r.uid == uid))
        .collect();

    let mut r = Reconcile {
        state: &state,
        jobs,
        pods_api,
        job,
        now: Timestamp::now(),
        nodes: HashMap::new(),
    };
    if r.job.metadata.deletion_timestamp.is_some() {
        // Being deleted: let go of every pod so the garbage collector can remove them.
        for pod in pods.iter().filter(|p| has_finalizer(p)) {
            r.remove_finalizer(pod).await?;
        }
        return Ok(Action::await_change());
    }
    // Counting and managing work on one snapshot of the pods: a pod that finishes meanwhile is
    // still active in it, so it is neither counted nor replaced until the next reconcile.
    let released = r.count_finished(&pods).await?;
    if finished(&r.job).is_some() {
        return r.after_finished().await;
    }
    let pods: Vec<Pod> = pods
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                || p.metadata
                    .uid
                    .as_ref()
                    .is_none_or(|u| !released.contains(u))
        })
        .collect();
    r.sync(&spec, &pods).await
}

/// One reconcile of one Job.
struct Reconcile<'a> {
    state: &'a State,
    jobs: Api<Job>,
    pods_api: Api<Pod>,
    /// The Job as last read or written.
    job: Job,
    now: Timestamp,
    /// Nodes read during this reconcile, for the autonomy rule.
    nodes: HashMap<String, bool>,
}

impl Reconcile<'_> {
    fn status(&self) -> JobStatus {
        self.job.status.clone().unwrap_or_default()
    }

    async fn publish(&self, type_: EventType, reason: &str, message: &str) {
        self.state
            .recorder
            .publish(&job_ref(&self.job), type_, reason, message)
            .await;
    }

    /// Writes `status` if it differs from the stored one.
    async fn write_status(&mut self, status: JobStatus) -> Result<(), Error> {
        if self.job.status.as_ref() == Some(&status) {
            return Ok(());
        }
        let mut job = self.job.clone();
        job.status = Some(status);
        let name = job.metadata.name.clone().unwrap_or_default();
        self.job = self
            .jobs
            .replace_status(&name, &PostParams::default(), &job)
            .await?;
        Ok(())
    }

    async fn remove_finalizer(&self, pod: &Pod) -> Result<(), Error> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": [TRACKING_FINALIZER]}
        });
        match self
            .pods_api
            .patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Counts finished pods exactly once: into `uncountedTerminatedPods`, finalizer off, then
    /// into `succeeded`/`failed`. Returns the uids of the pods whose finalizer it removed (a
    /// deleted one is gone now).
    async fn count_finished(&mut self, pods: &[Pod]) -> Result<BTreeSet<String>, Error> {
        let mut released = BTreeSet::new();
        let mut status = self.status();
        let mut uncounted = status.uncounted_terminated_pods.clone().unwrap_or_default();
        let known: BTreeSet<String> = uncounted
            .succeeded
            .iter()
            .chain(uncounted.failed.iter())
            .flatten()
            .cloned()
            .collect();
        // Pods deleted because the Job succeeded or is suspended are not failures.
        let uncounted_deletion = has_condition(&self.job, COMPLETIONS_REACHED.target)
            || self.job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
        let mut completed = parse_indexes(status.completed_indexes.as_deref().unwrap_or(""));
        let mut added = false;
        for pod in pods.iter().filter(|p| has_finalizer(p)) {
            let Some(pod_uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if known.contains(&pod_uid) {
                continue;
            }
            let outcome = match outcome(pod) {
                Some(o) => o,
                None if pod.metadata.deletion_timestamp.is_some() && uncounted_deletion => {
                    self.remove_finalizer(pod).await?;
                    released.insert(pod_uid);
                    continue;
                }
                None if pod.metadata.deletion_timestamp.is_some() => Outcome::Failed,
                None => continue,
            };
            let list = match outcome {
                Outcome::Succeeded => {
                    if let Some(i) = completion_index(pod) {
                        completed.insert(i);
                    }
                    &mut uncounted.succeeded
                }
                Outcome::Failed => &mut uncounted.failed,
            };
            list.get_or_insert_with(Vec::new).push(pod_uid);
            added = true;
        }
        if added {
            status.uncounted_terminated_pods = Some(uncounted.clone());
            if is_indexed(&self.job) {
                status.completed_indexes = Some(format_indexes(&completed));
            }
            self.write_status(status.clone()).await?;
        }
        let empty = uncounted.succeeded.as_ref().is_none_or(|v| v.is_empty())
            && uncounted.failed.as_ref().is_none_or(|v| v.is_empty());
        if empty {
            return Ok(released);
        }
        let by_uid: HashMap<&str, &Pod> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref().map(|u| (u, p)))
            .collect();
        let uids: Vec<String> = uncounted
            .succeeded
            .iter()
            .chain(uncounted.failed.iter())
            .flatten()
            .cloned()
            .collect();
        for uid in &uids {
            if let Some(pod) = by_uid.get(uid.as_str())
                && has_finalizer(pod)
            {
                self.remove_finalizer(pod).await?;
            }
            released.insert(uid.clone());
        }
        let succeeded = uncounted.succeeded.take().unwrap_or_default().len();
        let failed = uncounted.failed.take().unwrap_or_default().len();
        status.succeeded = nonzero(status.succeeded.unwrap_or(0) + count(succeeded));
        status.failed = nonzero(status.failed.unwrap_or(0) + count(failed));
        status.uncounted_terminated_pods = Some(UncountedTerminatedPods::default());
        self.write_status(status).await?;
        Ok(released)
    }

    /// Whether the pod's node has stopped reporting (the autonomy rule).
    async fn on_disconnected_node(&mut self, pod: &Pod) -> Result<bool, Error> {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return Ok(false);
        };
        if let Some(d) = self.nodes.get(&node) {
            return Ok(*d);
        }
        let nodes: Api<Node> = Api::all(self.state.ctx.client.clone());
        let disconnected = nodes
            .get_opt(&node)
            .await?
            .is_some_and(|n| pods::node_disconnected(&n));
        self.nodes.insert(node, disconnected);
        Ok(disconnected)
    }

    /// Deletes `pods` (each with an Event), except those the autonomy rule keeps. Returns how
    /// many were deleted.
    async fn delete_pods(&mut self, pods: &[&Pod]) -> Result<usize, Error> {
        let mut deleted = 0;
        for pod in pods {
            if self.on_disconnected_node(pod).await? {
                tracing::info!(
                    pod.name = pod.metadata.name.as_deref().unwrap_or_default(),
                    "keeping a job's pod on a disconnected node"
                );
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            match self.pods_api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    deleted += 1;
                    self.publish(
                        EventType::Normal,
                        "SuccessfulDelete",
                        &format!("Deleted pod: {name}"),
                    )
                    .await;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    self.publish(
                        EventType::Warning,
                        "FailedDelete",
                        &format!("Error deleting: {e}"),
                    )
                    .await;
                    return Err(e.into());
                }
            }
        }
        Ok(deleted)
    }

    /// A finished Job: only its time to live remains.
    async fn after_finished(&mut self) -> Result<Action, Error> {
        let Some(ttl) = self
            .job
            .spec
            .as_ref()
            .and_then(|s| s.ttl_seconds_after_finished)
        else {
            return Ok(Action::await_change());
        };
        let Some(finished_at) = finished(&self.job).and_then(|c| c.last_transition_time.clone())
        else {
            return Ok(Action::await_change());
        };
        let expires = finished_at.0 + SignedDuration::from_secs(i64::from(ttl.max(0)));
        if self.now < expires {
            return Ok(Action::requeue(until(self.now, expires)));
        }
        let name = self.job.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Foreground),
            preconditions: Some(Preconditions {
                uid: self.job.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        tracing::info!(job.name = %name, ttl, "deleting a finished job whose time to live ran out");
        match self.jobs.delete(&name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Action::await_change())
    }

    /// An unfinished Job: decide whether it finishes, else keep the right pods running.
    async fn sync(
        &mut self,
        spec: &k8s_openapi::api::batch::v1::JobSpec,
        pods: &[Pod],
    ) -> Result<Action, Error> {
        let mut status = self.status();
        let active: Vec<&Pod> = pods.iter().filter(|p| pods::is_active(p)).collect();
        let terminating = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some() && outcome(p).is_none())
            .count();
        let succeeded = status.succeeded.unwrap_or(0);
        let failed = status.failed.unwrap_or(0);
        let suspended = spec.suspend == Some(true);
        let indexed = is_indexed(&self.job);
        let completions = completions(spec);
        let completed = parse_indexes(status.completed_indexes.as_deref().unwrap_or(""));
        let mut requeue: Option<Duration> = None;

        // Is it finishing?
        let mut verdict = [
            BACKOFF_LIMIT_EXCEEDED,
            DEADLINE_EXCEEDED,
            COMPLETIONS_REACHED,
        ]
        .into_iter()
        .find(|v| {
            condition(&self.job, v.target).is_some_and(|c| c.reason.as_deref() == Some(v.reason))
        });
        if verdict.is_none() {
            let deadline = status.start_time.as_ref().and_then(|start| {
                spec.active_deadline_seconds
                    .map(|s| start.0 + SignedDuration::from_secs(s))
            });
            let done = match (indexed, completions) {
                (true, Some(c)) => count(completed.len()) >= c,
                (false, Some(c)) => succeeded >= c,
                (_, None) => succeeded > 0 && active.is_empty(),
            };
            verdict = if failed > spec.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT) {
                Some(BACKOFF_LIMIT_EXCEEDED)
            } else if done {
                Some(COMPLETIONS_REACHED)
            } else if !suspended && deadline.is_some_and(|d| self.now >= d) {
                Some(DEADLINE_EXCEEDED)
            } else {
                requeue = deadline.map(|d| until(self.now, d));
                None
            };
            if let Some(v) = verdict {
                set_condition(&mut status, v.target, "True", v.reason, v.message, self.now);
            }
        }
        if let Some(v) = verdict {
            let deleted = self.delete_pods(&active).await?;
            let left = active.len() - deleted;
            status.active = nonzero(count(left));
            status.ready = Some(count(
                active
                    .iter()
                    .filter(|p| pods::is_ready(p))
                    .count()
                    .min(left),
            ));
            status.terminating = Some(count(terminating + deleted));
            if left == 0 && terminating == 0 && deleted == 0 {
                set_condition(
                    &mut status,
                    v.final_type,
                    "True",
                    v.reason,
                    v.message,
                    self.now,
                );
                status.ready = Some(0);
                status.terminating = Some(0);
                if v.final_type == "Complete" {
                    status.completion_time = Some(Time(self.now));
                }
                self.write_status(status).await?;
                let (type_, reason, message) = match v.final_type {
                    "Complete" => (EventType::Normal, "Completed", "Job completed"),
                    _ => (EventType::Warning, v.reason, v.message),
                };
                self.publish(type_, reason, message).await;
                return self.after_finished().await;
            }
            self.write_status(status).await?;
            // The deleted pods come back as watch events. A pod kept for its disconnected node
            // is looked at again soon: nothing here watches nodes coming back.
            return Ok(Action::requeue(if left > 0 {
                KEPT_POD_RECHECK
            } else {
                Duration::from_secs(30)
            }));
        }

        let mut active_count = active.len();
        if suspended {
            let deleted = self.delete_pods(&active).await?;
            active_count -= deleted;
            if !has_condition(&self.job, "Suspended") {
                self.publish(EventType::Normal, "Suspended", "Job suspended")
                    .await;
            }
            set_condition(
                &mut status,
                "Suspended",
                "True",
                "JobSuspended",
                "Job suspended",
                self.now,
            );
            status.start_time = None;
        } else {
            if has_condition(&self.job, "Suspended") {
                set_condition(
                    &mut status,
                    "Suspended",
                    "False",
                    "JobResumed",
                    "Job resumed",
                    self.now,
                );
                self.publish(EventType::Normal, "Resumed", "Job resumed")
                    .await;
                status.start_time = None;
            }
            if status.start_time.is_none() {
                status.start_time = Some(Time(self.now));
                if let Some(s) = spec.active_deadline_seconds {
                    requeue = Some(Duration::from_secs(s.max(0).unsigned_abs()));
                }
            }
            let parallelism = spec.parallelism.unwrap_or(1).max(0);
            let want = want_active(
                parallelism,
                completions,
                succeeded,
                count(completed.len()),
                indexed,
                active.len(),
            );
            if active_count > want {
                let mut surplus = active.clone();
                surplus.sort_by_key(|p| deletion_rank(p));
                let surplus: Vec<&Pod> = surplus.into_iter().take(active_count - want).collect();
                active_count -= self.delete_pods(&surplus).await?;
            } else if active_count < want {
                let wait = backoff_remaining(pods, self.now);
                match wait {
                    Some(wait) => requeue = Some(requeue.map_or(wait, |r| r.min(wait))),
                    None => {
                        let indexes = if indexed {
                            let taken: BTreeSet<u32> =
                                active.iter().filter_map(|p| completion_index(p)).collect();
                            missing_indexes(
                                completions.unwrap_or(0),
                                &completed,
                                &taken,
                                want - active_count,
                            )
                        } else {
                            Vec::new()
                        };
                        let n = if indexed {
                            indexes.len()
                        } else {
                            want - active_count
                        };
                        for i in 0..n {
                            self.create_pod(indexes.get(i).copied()).await?;
                            active_count += 1;
                        }
                    }
                }
            }
        }
        status.active = nonzero(count(active_count));
        status.ready = Some(count(
            active
                .iter()
                .filter(|p| pods::is_ready(p))
                .count()
                .min(active_count),
        ));
        status.terminating = Some(count(terminating));
        if status.uncounted_terminated_pods.is_none() {
            status.uncounted_terminated_pods = Some(UncountedTerminatedPods::default());
        }
        self.write_status(status).await?;
        Ok(match requeue {
            Some(d) => Action::requeue(d + Duration::from_millis(100)),
            None => Action::await_change(),
        })
    }

    /// Creates one pod from the template (with `index` in Indexed mode).
    async fn create_pod(&mut self, index: Option<u32>) -> Result<(), Error> {
        let pod = pod_for(&self.job, index)?;
        match self.pods_api.create(&PostParams::default(), &pod).await {
            Ok(created) => {
                let name = created.metadata.name.unwrap_or_default();
                self.publish(
                    EventType::Normal,
                    "SuccessfulCreate",
                    &format!("Created pod: {name}"),
                )
                .await;
                Ok(())
            }
            Err(e) => {
                self.publish(
                    EventType::Warning,
                    "FailedCreate",
                    &format!("Error creating: {e}"),
                )
                .await;
                Err(e.into())
            }
        }
    }
}

/// The pod the Job runs (for `index` in Indexed mode).
fn pod_for(job: &Job, index: Option<u32>) -> Result<Pod, Error> {
    let spec = job.spec.as_ref().ok_or(Error::Incomplete("spec"))?;
    let (ns, name) = ns_name(job)?;
    let uid = job.metadata.uid.clone().ok_or(Error::Incomplete("uid"))?;
    let generate_name = match index {
        Some(i) => format!("{name}-{i}-"),
        None => format!("{name}-"),
    };
    let owner = pods::owner_reference("batch/v1", "Job", &job.metadata);
    let mut pod = pods::pod_from_template(&spec.template, &ns, owner, None, Some(generate_name));
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(CONTROLLER_UID_LABEL.into(), uid.clone());
    labels.insert(LEGACY_CONTROLLER_UID_LABEL.into(), uid);
    labels.insert(JOB_NAME_LABEL.into(), name.clone());
    labels.insert(LEGACY_JOB_NAME_LABEL.into(), name.clone());
    pod.metadata
        .finalizers
        .get_or_insert_with(Vec::new)
        .push(TRACKING_FINALIZER.into());
    if let Some(i) = index {
        let value = i.to_string();
        labels.insert(COMPLETION_INDEX.into(), value.clone());
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(COMPLETION_INDEX.into(), value.clone());
        if let Some(pod_spec) = pod.spec.as_mut() {
            if pod_spec.hostname.is_none() {
                pod_spec.hostname = Some(format!("{name}-{i}"));
            }
            for c in pod_spec
                .containers
                .iter_mut()
                .chain(pod_spec.init_containers.iter_mut().flatten())
            {
                let env = c.env.get_or_insert_with(Vec::new);
                if !env.iter().any(|e| e.name == COMPLETION_INDEX_ENV) {
                    env.push(EnvVar {
                        name: COMPLETION_INDEX_ENV.into(),
                        value: Some(value.clone()),
                        value_from: None,
                    });
                }
            }
        }
    }
    Ok(pod)
}

/// A counter as kube-apiserver writes `active`, `succeeded` and `failed`: left out when 0.
fn nonzero(n: i32) -> Option<i32> {
    (n != 0).then_some(n)
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn until(now: Timestamp, then: Timestamp) -> Duration {
    let d = then.duration_since(now);
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

fn has_finalizer(pod: &Pod) -> bool {
    pod.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == TRACKING_FINALIZER))
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// How the pod ended, if it did.
fn outcome(pod: &Pod) -> Option<Outcome> {
    match phase(pod) {
        Some("Succeeded") => Some(Outcome::Succeeded),
        Some("Failed") => Some(Outcome::Failed),
        _ => None,
    }
}

fn is_indexed(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.completion_mode.as_deref()) == Some("Indexed")
}

/// `spec.completions`, with the API's default (1 when neither it nor parallelism is set).
fn completions(spec: &k8s_openapi::api::batch::v1::JobSpec) -> Option<i32> {
    match (spec.completions, spec.parallelism) {
        (None, None) => Some(1),
        (c, _) => c,
    }
}

fn completion_index(pod: &Pod) -> Option<u32> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COMPLETION_INDEX))
        .or_else(|| {
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(COMPLETION_INDEX))
        })
        .and_then(|v| v.parse().ok())
}

fn condition<'a>(job: &'a Job, type_: &str) -> Option<&'a JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

fn has_condition(job: &Job, type_: &str) -> bool {
    condition(job, type_).is_some()
}

/// The Job's `Complete` or `Failed` condition, if it has finished.
fn finished(job: &Job) -> Option<&JobCondition> {
    condition(job, "Complete").or_else(|| condition(job, "Failed"))
}

/// Sets a condition, keeping its transition time when the status does not change.
fn set_condition(
    status: &mut JobStatus,
    type_: &str,
    value: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let new = JobCondition {
        type_: type_.into(),
        status: value.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == value && c.reason == new.reason => {}
        Some(c) => *c = new,
        None => conditions.push(new),
    }
}

/// How many pods should be active.
fn want_active(
    parallelism: i32,
    completions: Option<i32>,
    succeeded: i32,
    completed_indexes: i32,
    indexed: bool,
    active: usize,
) -> usize {
    let want = match completions {
        // Work queue: once one pod succeeded, no new pods start.
        None if succeeded > 0 => count(active).min(parallelism),
        None => parallelism,
        Some(c) => {
            let done = if indexed {
                completed_indexes
            } else {
                succeeded
            };
            (c - done).clamp(0, parallelism)
        }
    };
    usize::try_from(want.max(0)).unwrap_or(0)
}

/// The lowest `n` indexes in `0..completions` neither completed nor taken by an active pod.
fn missing_indexes(
    completions: i32,
    completed: &BTreeSet<u32>,
    taken: &BTreeSet<u32>,
    n: usize,
) -> Vec<u32> {
    (0..u32::try_from(completions.max(0)).unwrap_or(0))
        .filter(|i| !completed.contains(i) && !taken.contains(i))
        .take(n)
        .collect()
}

/// Parses `status.completedIndexes` (`"1,3-5,7"`).
fn parse_indexes(s: &str) -> BTreeSet<u32> {
    let mut set = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    set.extend(a..=b);
                }
            }
            None => {
                if let Ok(i) = part.parse() {
                    set.insert(i);
                }
            }
        }
    }
    set
}

/// Formats indexes as `status.completedIndexes` does: ascending, runs as ranges.
fn format_indexes(set: &BTreeSet<u32>) -> String {
    let mut parts = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

/// Which surplus pods go first: unscheduled, then not ready, then the youngest.
fn deletion_rank(pod: &Pod) -> (bool, bool, std::cmp::Reverse<Option<Timestamp>>) {
    let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    (
        scheduled,
        pods::is_ready(pod),
        std::cmp::Reverse(pod.metadata.creation_timestamp.as_ref().map(|t| t.0)),
    )
}

/// When the pod finished: its containers' last `finishedAt`.
fn finish_time(pod: &Pod) -> Option<Timestamp> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .chain(status.init_container_statuses.iter())
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0)
        .max()
}

/// The back-off before a new pod after `failures` failures since the last success.
pub fn backoff_delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// How long new pods must still wait: the back-off for the failed pods finished after the
/// last success, counted from the last failure (`None`: no wait).
fn backoff_remaining(pods: &[Pod], now: Timestamp) -> Option<Duration> {
    let last_success = pods
        .iter()
        .filter(|p| outcome(p) == Some(Outcome::Succeeded))
        .filter_map(finish_time)
        .max();
    let failures: Vec<Timestamp> = pods
        .iter()
        .filter(|p| outcome(p) == Some(Outcome::Failed))
        .map(|p| {
            finish_time(p)
                .or_else(|| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .unwrap_or(now)
        })
        .filter(|t| last_success.is_none_or(|s| *t > s))
        .collect();
    let last = failures.iter().max()?;
    let delay = backoff_delay(u32::try_from(failures.len()).unwrap_or(u32::MAX));
    let ready_at = *last + SignedDuration::try_from(delay).unwrap_or(SignedDuration::ZERO);
    (now < ready_at).then(|| until(now, ready_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::JobSpec;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodSpec, PodStatus,
        PodTemplateSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn backoff_doubles_from_ten_seconds_up_to_six_minutes() {
        let secs: Vec<u64> = (0..8).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(secs, [0, 10, 20, 40, 80, 160, 320, 360]);
        assert_eq!(backoff_delay(1000), BACKOFF_MAX);
    }

    #[test]
    fn completed_indexes_round_trip_as_ranges() {
        let set = parse_indexes("0-2,4, 7-8");
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), [0, 1, 2, 4, 7, 8]);
        assert_eq!(format_indexes(&set), "0-2,4,7-8");
        assert_eq!(format_indexes(&BTreeSet::new()), "");
        assert_eq!(format_indexes(&parse_indexes("5")), "5");
    }

    #[test]
    fn wanted_pods_follow_parallelism_and_remaining_completions() {
        // completions 3, parallelism 2.
        assert_eq!(want_active(2, Some(3), 0, 0, false, 0), 2);
        assert_eq!(want_active(2, Some(3), 2, 0, false, 1), 1);
        assert_eq!(want_active(2, Some(3), 3, 0, false, 0), 0);
        // Indexed counts completed indexes, not succeeded pods.
        assert_eq!(want_active(2, Some(3), 5, 1, true, 0), 2);
        // Work queue: parallelism until one succeeds, then nothing new.
        assert_eq!(want_active(3, None, 0, 0, false, 1), 3);
        assert_eq!(want_active(3, None, 1, 0, false, 2), 2);
        assert_eq!(want_active(0, Some(3), 0, 0, false, 0), 0);
    }

    #[test]
    fn missing_indexes_skip_completed_and_running_ones() {
        let completed = parse_indexes("0,2");
        let taken = parse_indexes("1");
        assert_eq!(missing_indexes(6, &completed, &taken, 2), [3, 4]);
        assert_eq!(missing_indexes(3, &completed, &taken, 2), Vec::<u32>::new());
    }

    fn job(mode: Option<&str>) -> Job {
        Job {
            metadata: ObjectMeta {
                name: Some("pi".into()),
                namespace: Some("default".into()),
                uid: Some("u-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                completion_mode: mode.map(String::from),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some([("app".to_string(), "pi".to_string())].into()),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Default::default()],
                        restart_policy: Some("Never".into()),
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn pods_carry_the_labels_finalizer_and_owner_kube_controller_manager_sets() {
        let pod = pod_for(&job(None), None).expect("pod");
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("pi-"));
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels["app"], "pi");
        assert_eq!(labels[CONTROLLER_UID_LABEL], "u-1");
        assert_eq!(labels[LEGACY_CONTROLLER_UID_LABEL], "u-1");
        assert_eq!(labels[JOB_NAME_LABEL], "pi");
        assert_eq!(labels[LEGACY_JOB_NAME_LABEL], "pi");
        assert!(!labels.contains_key(COMPLETION_INDEX));
        assert_eq!(
            pod.metadata.finalizers,
            Some(vec![TRACKING_FINALIZER.to_string()])
        );
        let owner = pods::controller_of(&pod.metadata).expect("controller reference");
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Job", "u-1"));

        let pod = pod_for(&job(Some("Indexed")), Some(2)).expect("pod");
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("pi-2-"));
        assert_eq!(completion_index(&pod), Some(2));
        assert_eq!(
            pod.metadata.labels.unwrap_or_default()[COMPLETION_INDEX],
            "2"
        );
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some("pi-2"));
        let env = spec.containers[0].env.clone().unwrap_or_default();
        assert!(
            env.iter()
                .any(|e| e.name == COMPLETION_INDEX_ENV && e.value.as_deref() == Some("2")),
            "{env:?}"
        );
    }

    fn finished_pod(phase: &str, at: Timestamp) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(vec![ContainerStatus {
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            finished_at: Some(Time(at)),
                            ..ContainerStateTerminated::default()
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn backoff_counts_failures_after_the_last_success_from_the_last_failure() {
        let t0 = Timestamp::from_second(1_000_000).expect("time");
        let s = |n: i64| t0 + SignedDuration::from_secs(n);
        // One failure 4 s ago: 6 s of the first 10 s left.
        let pods = vec![finished_pod("Failed", s(0))];
        assert_eq!(backoff_remaining(&pods, s(4)), Some(Duration::from_secs(6)));
        assert_eq!(backoff_remaining(&pods, s(10)), None);
        // Two failures: 20 s from the second.
        let pods = vec![finished_pod("Failed", s(0)), finished_pod("Failed", s(5))];
        assert_eq!(
            backoff_remaining(&pods, s(10)),
            Some(Duration::from_secs(15))
        );
        // A success after the first failure resets the count.
        let pods = vec![
            finished_pod("Failed", s(0)),
            finished_pod("Succeeded", s(2)),
            finished_pod("Failed", s(5)),
        ];
        assert_eq!(
            backoff_remaining(&pods, s(10)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            backoff_remaining(&[finished_pod("Succeeded", s(0))], s(1)),
            None
        );
    }

    #[test]
    fn conditions_keep_their_transition_time_until_they_change() {
        let t0 = Timestamp::from_second(1_000_000).expect("time");
        let t1 = t0 + SignedDuration::from_secs(5);
        let mut status = JobStatus::default();
        set_condition(
            &mut status,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            t0,
        );
        set_condition(
            &mut status,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            t1,
        );
        let c = &status.conditions.as_ref().expect("conditions")[0];
        assert_eq!(c.last_transition_time, Some(Time(t0)));
        set_condition(
            &mut status,
            "Suspended",
            "False",
            "JobResumed",
            "Job resumed",
            t1,
        );
        let conditions = status.conditions.expect("conditions");
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Some(Time(t1)));
        assert_eq!(conditions[0].reason.as_deref(), Some("JobResumed"));
    }

    #[test]
    fn completions_default_to_one_only_without_parallelism() {
        let spec = |c, p| JobSpec {
            completions: c,
            parallelism: p,
            ..JobSpec::default()
        };
        assert_eq!(completions(&spec(None, None)), Some(1));
        assert_eq!(completions(&spec(None, Some(3))), None);
        assert_eq!(completions(&spec(Some(4), Some(2))), Some(4));
    }
}
