//! One task per pod: brings the runtime to what the pod asks for, one step at a time, and
//! reports the pod's status as the kubelet does.
//!
//! ```text
//!            ┌─────────── sandbox fails: retried next step ───────────┐
//!  Pending ──┴─► sandbox up ─► init containers in order ─► containers ─► (Succeeded|Failed)
//!     │                                    │                   │ exit: restart per policy,
//!     │                                    │                   │ crash-loop backoff 10 s→5 min
//!     └──────── deletionTimestamp / removed from the store ────┴─► Terminating ─► Terminated
//! ```
//! `step` looks at the runtime (ContainerStatus of each known container), decides, acts, and
//! the reported status is a pure function of the worker's state ([`Worker::status`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1 as api;
use k8s_openapi::api::core::v1::{Container, Pod};
use proto::ObjectRef;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::probes::{ProbeKind, Prober};
use super::spec::{self, ContainerKind, Objects, PodPaths};
use super::{cgroups, volumes};
use crate::cri::Cri;
use crate::events::Events;
use crate::outbox::{Outbox, Report};
use crate::tokens::Tokens;
use proto::EventType;

/// How often a pod is looked at while it is on its way somewhere (starting, backing off,
/// blocked, restarting): every second, as before events.
const RESYNC: Duration = Duration::from_secs(1);
/// How often a settled pod (sandbox up, every container running) is looked at when nothing
/// wakes it: the kubelet's sync frequency. Runtime changes wake it at once (`pods::pleg`: an
/// event, or the node-wide relist every second), probes when they are due, the store when the
/// pod or its objects change; this pass refreshes volumes (service-account tokens) and is the
/// last safety net.
const SETTLED_RESYNC: Duration = Duration::from_secs(60);
/// Crash-loop backoff: first delay, cap, and how long a container must run to reset it.
const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// Grace period when the pod does not give one.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// A failure that repeats every step (a back-off, a volume or sandbox that cannot be set up)
/// is recorded as an event at most this often: the kubelet's pod worker retries a failed sync
/// after 10 s and records it once per retry.
const EVENT_REPEAT: Duration = Duration::from_secs(10);

/// What the manager wants for a pod.
#[derive(Debug, Clone)]
pub enum Desired {
    /// Run this pod (its latest version) with these ConfigMaps and Secrets.
    Run(Arc<PodInput>),
    /// The pod left the store (deleted for good): stop it and clean up.
    Gone,
}

/// An operator's request to a pod's worker (`edgecore ctl restart`).
#[derive(Debug)]
pub enum Command {
    /// Stop the pod's running containers (preStop hooks and grace period as for a liveness
    /// restart) and start them again at once, whatever the restart policy and backoff say.
    /// Answers with a line saying what was restarted, or why nothing was.
    Restart {
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// A pod and the objects it references.
#[derive(Debug)]
pub struct PodInput {
    pub pod: Pod,
    pub objects: Objects,
}

/// What every worker shares.
#[derive(Debug)]
pub struct Context {
    pub cri: Cri,
    pub data_dir: PathBuf,
    pub node_name: String,
    /// The gateway's address for pods' `hostIP`; `None` when it is not known (no route).
    pub host_ip: Option<std::net::IpAddr>,
    pub outbox: Arc<Outbox>,
    /// Service-account tokens for projected volumes.
    pub tokens: Arc<Tokens>,
    /// The pods' events for the cloud (`edgecore::events`).
    pub events: Arc<Events>,
    /// The service table (environment variables) and the cluster DNS (resolv.conf).
    pub services: crate::services::Services,
    /// Wakes a worker when the runtime changed its pod (`pods::pleg`).
    pub pleg: Arc<super::pleg::Pleg>,
}

/// Runtime objects found at start for this pod (adoption).
#[derive(Debug, Default, Clone)]
pub struct Adopted {
    pub sandbox: Option<api::PodSandbox>,
    pub containers: Vec<api::Container>,
}

#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    ip: String,
    config: api::PodSandboxConfig,
}

#[derive(Debug, Clone, Default)]
struct Backoff {
    delay: Duration,
    not_before: Option<Instant>,
}

/// One container of the pod as the worker tracks it.
#[derive(Debug, Clone)]
struct ContainerState {
    name: String,
    kind: ContainerKind,
    id: Option<String>,
    /// Also the restart count.
    attempt: u32,
    observed: Option<api::ContainerStatus>,
    /// `lastState.terminated` of the status, from the previous run.
    last_termination: Option<Value>,
    /// Why it is not running, when the worker knows better than the runtime.
    waiting: Option<(String, String)>,
    backoff: Backoff,
    /// Between failed image pulls.
    image_backoff: Backoff,
    started_at: Option<Instant>,
    probes: Vec<Prober>,
    /// Set once the container was started once and exited 0 (init containers).
    succeeded: bool,
}

impl ContainerState {
    fn new(container: &Container, kind: ContainerKind) -> Self {
        let mut probes = Vec::new();
        if kind == ContainerKind::Regular {
            if let Some(p) = &container.startup_probe {
                probes.push(Prober::new(ProbeKind::Startup, p.clone()));
            }
            if let Some(p) = &container.liveness_probe {
                probes.push(Prober::new(ProbeKind::Liveness, p.clone()));
            }
            if let Some(p) = &container.readiness_probe {
                probes.push(Prober::new(ProbeKind::Readiness, p.clone()));
            }
        }
        ContainerState {
            name: container.name.clone(),
            kind,
            id: None,
            attempt: 0,
            observed: None,
            last_termination: None,
            waiting: None,
            backoff: Backoff::default(),
            image_backoff: Backoff::default(),
            started_at: None,
            probes,
            succeeded: false,
        }
    }

    fn state(&self) -> api::ContainerState {
        self.observed
            .as_ref()
            .and_then(|s| api::ContainerState::try_from(s.state).ok())
            .unwrap_or(api::ContainerState::ContainerUnknown)
    }

    fn running(&self) -> bool {
        self.id.is_some() && self.state() == api::ContainerState::ContainerRunning
    }

    fn exited(&self) -> Option<i32> {
        (self.state() == api::ContainerState::ContainerExited)
            .then(|| self.observed.as_ref().map_or(0, |s| s.exit_code))
    }

    fn probe_verdict(&self, kind: ProbeKind) -> Option<Option<bool>> {
        self.probes
            .iter()
            .find(|p| p.kind == kind)
            .map(|p| p.verdict)
    }

    /// Started: no startup probe, or it succeeded.
    fn started(&self) -> bool {
        self.running()
            && self
                .probe_verdict(ProbeKind::Startup)
                .is_none_or(|v| v == Some(true))
    }

    fn ready(&self) -> bool {
        self.started()
            && self
                .probe_verdict(ProbeKind::Readiness)
                .is_none_or(|v| v == Some(true))
    }
}

fn rfc3339_from_nanos(nanos: i64) -> Value {
    if nanos <= 0 {
        return Value::Null;
    }
    OffsetDateTime::from_unix_timestamp_nanos(nanos as i128)
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The terminated state of an exited container, as the API shows it.
fn terminated(status: &api::ContainerStatus, id: &str) -> Value {
    json!({
        "exitCode": status.exit_code,
        "reason": if status.reason.is_empty() { Value::Null } else { Value::String(status.reason.clone()) },
        "message": if status.message.is_empty() { Value::Null } else { Value::String(status.message.clone()) },
        "startedAt": rfc3339_from_nanos(status.started_at),
        "finishedAt": rfc3339_from_nanos(status.finished_at),
        "containerID": format!("containerd://{id}"),
    })
}

/// The pod's worker.
#[derive(Debug)]
pub struct Worker {
    ctx: Arc<Context>,
    uid: String,
    object: ObjectRef,
    paths: PodPaths,
    sandbox: Option<Sandbox>,
    sandbox_attempt: u32,
    init: Vec<ContainerState>,
    containers: Vec<ContainerState>,
    start_time: Option<String>,
    /// Why the pod cannot progress (volumes, sandbox), for the status.
    blocked: Option<(String, String)>,
    /// Set when the pod ended for good (restartPolicy Never / OnFailure and all done).
    finished: Option<&'static str>,
    /// The status of a pod that had finished before edgecore restarted and whose containers
    /// are gone: reported as it was.
    final_status: Option<Value>,
    last_status: Option<Value>,
    transitions: HashMap<&'static str, (bool, String)>,
    /// When each repeating event (by field path and reason) was last recorded.
    repeated: HashMap<(String, &'static str), Instant>,
}

/// The involved object's `fieldPath` for a container, as the kubelet sets it.
fn field_path(kind: ContainerKind, name: &str) -> String {
    match kind {
        ContainerKind::Init => format!("spec.initContainers{{{name}}}"),
        ContainerKind::Regular => format!("spec.containers{{{name}}}"),
    }
}

/// A volume error in the kubelet's words: `MountVolume.SetUp failed for volume "v" : why`.
/// The gateway's resolv.conf, the base of `Default` pods' DNS and the source of `ClusterFirst`
/// pods' host searches (the kubelet's `--resolv-conf`); unreadable reads as empty.
fn host_resolv_conf() -> crate::services::dns::ResolvConf {
    let path = std::path::Path::new(crate::services::DEFAULT_DNS_UPSTREAM);
    crate::services::dns::ResolvConf::read(path).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "cannot read the gateway's resolv.conf for a pod's DNS");
        Default::default()
    })
}

fn mount_failure(error: &str) -> String {
    match error
        .strip_prefix("volume \"")
        .and_then(|rest| rest.split_once("\": "))
    {
        Some((volume, why)) => {
            format!("MountVolume.SetUp failed for volume \"{volume}\" : {why}")
        }
        None => format!("MountVolume.SetUp failed: {error}"),
    }
}

impl Worker {
    fn new(ctx: Arc<Context>, pod: &Pod) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let object = ObjectRef {
            kind: "Pod".into(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: uid.clone(),
        };
        let spec = pod.spec.clone().unwrap_or_default();
        Worker {
            paths: spec::pod_paths(&ctx.data_dir, &uid),
            ctx,
            uid,
            object,
            sandbox: None,
            sandbox_attempt: 0,
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| ContainerState::new(c, ContainerKind::Init))
                .collect(),
            containers: spec
                .containers
                .iter()
                .map(|c| ContainerState::new(c, ContainerKind::Regular))
                .collect(),
            start_time: None,
            blocked: None,
            finished: None,
            final_status: None,
            last_status: None,
            transitions: HashMap::new(),
            repeated: HashMap::new(),
        }
    }

    /// Records an event about this pod (`field_path` empty) or one of its containers.
    fn event(&self, field_path: &str, type_: EventType, reason: &str, message: String) {
        self.ctx
            .events
            .record(&self.object, field_path, type_, reason, message);
    }

    /// Records an event that repeats every step at most once per [`EVENT_REPEAT`].
    fn repeating_event(
        &mut self,
        field_path: &str,
        type_: EventType,
        reason: &'static str,
        message: String,
    ) {
        let now = Instant::now();
        let key = (field_path.to_string(), reason);
        if self
            .repeated
            .get(&key)
            .is_some_and(|last| now.duration_since(*last) < EVENT_REPEAT)
        {
            return;
        }
        self.repeated.insert(key, now);
        self.event(field_path, type_, reason, message);
    }

    /// Takes over what the runtime already runs for this pod: a ready sandbox and, per
    /// container name, its latest container. Nothing is restarted.
    async fn adopt(&mut self, adopted: Adopted) {
        let Some(sandbox) = adopted.sandbox else {
            return;
        };
        let ready = api::PodSandboxState::try_from(sandbox.state)
            .is_ok_and(|s| s == api::PodSandboxState::SandboxReady);
        let attempt = sandbox.metadata.as_ref().map_or(0, |m| m.attempt);
        self.sandbox_attempt = attempt + 1;
        if !ready {
            let _ = self.ctx.cri.remove_pod_sandbox(&sandbox.id).await;
            return;
        }
        let ip = match self.ctx.cri.pod_sandbox_status(&sandbox.id).await {
            Ok(status) => status.network.map(|n| n.ip).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the adopted sandbox; starting a new one");
                return;
            }
        };
        self.start_time = rfc3339_from_nanos(sandbox.created_at)
            .as_str()
            .map(str::to_string);
        self.sandbox = Some(Sandbox {
            id: sandbox.id.clone(),
            ip,
            config: api::PodSandboxConfig::default(),
        });
        let mut latest: HashMap<String, &api::Container> = HashMap::new();
        for c in &adopted.containers {
            let Some(meta) = &c.metadata else { continue };
            if latest
                .get(&meta.name)
                .is_none_or(|l| l.metadata.as_ref().is_none_or(|m| m.attempt < meta.attempt))
            {
                latest.insert(meta.name.clone(), c);
            }
        }
        let any_regular = self.containers.iter().any(|c| latest.contains_key(&c.name));
        for state in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if let Some(c) = latest.get(&state.name) {
                state.attempt = c.metadata.as_ref().map_or(0, |m| m.attempt);
                if c.state == api::ContainerState::ContainerCreated as i32 {
                    // Created but never started: edgecore stopped between CreateContainer
                    // and StartContainer. It never ran, so it is replaced by a fresh one of
                    // the same attempt, not counted as a restart.
                    tracing::info!(container = %state.name, id = %c.id, "removing a container that was created but never started");
                    let _ = self.ctx.cri.remove_container(&c.id).await;
                    continue;
                }
                state.id = Some(c.id.clone());
                state.started_at = Some(Instant::now());
            }
            // Regular containers exist, so the init containers completed before.
            if state.kind == ContainerKind::Init && any_regular {
                state.succeeded = true;
            }
        }
        tracing::info!(sandbox = %sandbox.id, containers = latest.len(), "adopted running pod");
    }

    /// Containers edgecore reported before but did not find in the runtime at start (the
    /// gateway rebooted, containerd lost its state, or edgecore was killed between removing an
    /// exited container and starting its successor): carries on from the last report, as the
    /// kubelet does from the API's copy. Restart counts keep growing (a container that was
    /// running counts one restart, with `lastState.terminated` reason `Unknown` and exit code
    /// 255, what the kubelet shows after a reboot). With nothing of the pod left at all, a pod
    /// that had finished stays finished instead of running again.
    fn resume(&mut self, previous: &Value) {
        if self.sandbox.is_none() {
            let finished = match previous["phase"].as_str() {
                Some("Succeeded") => Some("Succeeded"),
                Some("Failed") => Some("Failed"),
                _ => None,
            };
            if let Some(phase) = finished {
                self.finished = Some(phase);
                self.final_status = Some(previous.clone());
                tracing::info!(
                    phase,
                    "pod had finished before edgecore restarted; kept finished"
                );
                return;
            }
            self.start_time = previous["startTime"].as_str().map(str::to_string);
        }
        let mut resumed = Vec::new();
        for (list, states) in [
            ("initContainerStatuses", &mut self.init),
            ("containerStatuses", &mut self.containers),
        ] {
            for reported in previous[list].as_array().into_iter().flatten() {
                let Some(state) = states
                    .iter_mut()
                    .find(|c| reported["name"].as_str() == Some(c.name.as_str()))
                else {
                    continue;
                };
                if state.id.is_some() {
                    // Found in the runtime: adopted as it is.
                    continue;
                }
                let restarts = reported["restartCount"]
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0);
                let previous_termination = reported["lastState"]["terminated"].clone();
                if let Some(running) = reported["state"].get("running") {
                    state.attempt = restarts.saturating_add(1);
                    let mut lost = json!({
                        "exitCode": 255,
                        "reason": "Unknown",
                        "message": "the container was gone when edgecore started (gateway reboot or runtime state lost)",
                        "startedAt": running["startedAt"],
                    });
                    if let Some(id) = reported["containerID"].as_str() {
                        lost["containerID"] = json!(id);
                    }
                    state.last_termination = Some(lost);
                } else if let Some(terminated) = reported["state"].get("terminated") {
                    state.attempt = restarts.saturating_add(1);
                    state.last_termination = Some(terminated.clone());
                } else {
                    state.attempt = restarts;
                    if previous_termination.is_object() {
                        state.last_termination = Some(previous_termination);
                    }
                }
                resumed.push(format!("{}={}", state.name, state.attempt));
            }
        }
        if !resumed.is_empty() {
            tracing::info!(restart_counts = %resumed.join(","), "containers missing from the runtime; resuming from the last reported status");
        }
    }

    fn pod_status_changed(&mut self, status: Value) {
        if self.last_status.as_ref() != Some(&status) {
            self.ctx
                .outbox
                .put(self.object.clone(), Report::Status(status.clone()));
            self.last_status = Some(status);
        }
    }

    /// Whether nothing is under way: the pod finished, or its sandbox is up, nothing blocks
    /// it, its init containers are done and every container runs (no backoff, no waiting
    /// reason). Only such a pod waits for a wake-up instead of stepping every second.
    fn settled(&self) -> bool {
        if self.finished.is_some() {
            return true;
        }
        self.sandbox.is_some()
            && self.blocked.is_none()
            && self.init.iter().all(|c| c.succeeded)
            && self
                .containers
                .iter()
                .all(|c| c.running() && c.waiting.is_none() && c.started_at.is_some())
    }

    /// When the next probe of a running container is due (the probes run as `run_probes`
    /// would run them: liveness and readiness after the startup probe succeeded).
    fn next_probe_at(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for state in &self.containers {
            let (true, Some(started)) = (state.running(), state.started_at) else {
                continue;
            };
            let startup_done = state
                .probe_verdict(ProbeKind::Startup)
                .is_none_or(|v| v == Some(true));
            for probe in &state.probes {
                if probe.kind != ProbeKind::Startup && !startup_done {
                    continue;
                }
                if probe.kind == ProbeKind::Startup && probe.verdict == Some(true) {
                    continue;
                }
                let due = probe.next_due(started);
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    /// How long the worker may wait before its next step when nothing wakes it.
    fn next_step_in(&self, now: Instant) -> Duration {
        if !self.settled() {
            return RESYNC;
        }
        if self.finished.is_some() {
            // A finished pod runs no probes.
            return SETTLED_RESYNC;
        }
        let wait = match self.next_probe_at() {
            Some(due) => due.saturating_duration_since(now).min(SETTLED_RESYNC),
            None => SETTLED_RESYNC,
        };
        // Never spin: a probe due now runs in the step right after.
        wait.max(Duration::from_millis(10))
    }

    /// One pass: observe the runtime, act, report.
    async fn step(&mut self, input: &PodInput) {
        self.observe().await;
        if self.finished.is_none() {
            let before = self.sandbox.as_ref().map(|s| s.id.clone());
            self.act(input).await;
            // A sandbox this pass started was ready when PodSandboxStatus read its IP a moment
            // ago: only the containers are read again (one CRI call less on a pod's start).
            let fresh = self.sandbox.as_ref().map(|s| &s.id) != before.as_ref();
            self.observe_runtime(!fresh).await;
            self.run_probes().await;
        }
        let status = self.status(&input.pod);
        self.pod_status_changed(status);
    }

    async fn observe(&mut self) {
        self.observe_runtime(true).await;
    }

    /// Reads the containers' states from the runtime, and first the sandbox's when
    /// `with_sandbox` (a sandbox that is not ready any more is cleared).
    async fn observe_runtime(&mut self, with_sandbox: bool) {
        let cri = self.ctx.cri.clone();
        if let Some(sandbox) = self.sandbox.as_ref().filter(|_| with_sandbox) {
            let ready = match cri.pod_sandbox_status(&sandbox.id).await {
                Ok(status) => api::PodSandboxState::try_from(status.state)
                    .is_ok_and(|s| s == api::PodSandboxState::SandboxReady),
                Err(e) if e.is_not_found() => false,
                // The runtime cannot answer (containerd restarting): keep what we know.
                Err(_) => true,
            };
            if !ready {
                self.sandbox_died().await;
            }
        }
        for state in self.init.iter_mut().chain(self.containers.iter_mut()) {
            let Some(id) = &state.id else { continue };
            match cri.container_status(id).await {
                Ok(status) => state.observed = Some(status),
                Err(e) if e.is_not_found() => {
                    state.id = None;
                    state.observed = None;
                }
                Err(e) => {
                    tracing::warn!(container = %state.name, error = %e, "cannot read container status")
                }
            }
        }
    }

    /// The sandbox is gone or not ready (its pause process died, the gateway rebooted): its
    /// containers went with it. Clears it so the next step starts a new one, as the kubelet
    /// does; every container that ran counts a restart.
    async fn sandbox_died(&mut self) {
        let Some(sandbox) = self.sandbox.take() else {
            return;
        };
        tracing::warn!(sandbox = %sandbox.id, "pod sandbox is not ready any more; starting a new one");
        self.event(
            "",
            EventType::Normal,
            "SandboxChanged",
            "Pod sandbox changed, it will be killed and re-created.".into(),
        );
        let _ = self.ctx.cri.stop_pod_sandbox(&sandbox.id).await;
        let _ = self.ctx.cri.remove_pod_sandbox(&sandbox.id).await;
        for state in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if let (Some(id), Some(observed)) = (state.id.take(), state.observed.take()) {
                state.last_termination = Some(terminated(&observed, &id));
                state.attempt += 1;
            }
            state.waiting = None;
            for p in &mut state.probes {
                p.reset();
            }
        }
    }

    async fn act(&mut self, input: &PodInput) {
        let pod = &input.pod;
        if self.sandbox.is_none() && !self.start_sandbox(input).await {
            return;
        }
        // Volumes are refreshed every pass, so ConfigMap and Secret updates reach the files.
        let prepared = match volumes::prepare(pod, &input.objects, &self.ctx.tokens, &self.paths) {
            Ok(p) => {
                // A volume that could not be written before (no token yet, a ConfigMap on its
                // way) is now: the reason no longer holds.
                self.blocked = None;
                p
            }
            Err(e) => {
                let message = e.to_string();
                self.repeating_event(
                    "",
                    EventType::Warning,
                    "FailedMount",
                    mount_failure(&message),
                );
                self.blocked = Some(("ContainerCreating".into(), message));
                return;
            }
        };
        let restart = restart_policy(pod);
        let spec = pod.spec.clone().unwrap_or_default();
        // Init containers, one at a time, in order.
        let init_specs = spec.init_containers.clone().unwrap_or_default();
        for (i, init_spec) in init_specs.iter().enumerate().take(self.init.len()) {
            if self.init[i].succeeded {
                continue;
            }
            match self.init[i].exited() {
                Some(0) => {
                    self.init[i].succeeded = true;
                    continue;
                }
                Some(code) => {
                    if restart == "Never" {
                        self.finished = Some("Failed");
                        tracing::info!(container = %self.init[i].name, code, "init container failed; the pod failed");
                        return;
                    }
                    self.restart_after_exit(i, ContainerKind::Init);
                }
                None if self.init[i].id.is_some() => return, // still running
                None => {}
            }
            self.start_container(pod, init_spec, ContainerKind::Init, i, input, &prepared)
                .await;
            return;
        }
        for i in 0..self.containers.len() {
            let state = &self.containers[i];
            match state.exited() {
                Some(code) => {
                    let again = match restart {
                        "Always" => true,
                        "OnFailure" => code != 0,
                        _ => false,
                    };
                    if !again {
                        continue;
                    }
                    self.restart_after_exit(i, ContainerKind::Regular);
                }
                None if state.id.is_some() => {
                    // Running (or created): a failed liveness or startup probe restarts it.
                    let failed = state.probes.iter().find(|p| {
                        matches!(p.kind, ProbeKind::Liveness | ProbeKind::Startup)
                            && p.verdict == Some(false)
                    });
                    if let Some(probe) = failed {
                        let why = probe.last_failure.clone().unwrap_or_default();
                        tracing::info!(container = %state.name, "probe failed, restarting: {why}");
                        let which = if probe.kind == ProbeKind::Startup {
                            "startup"
                        } else {
                            "liveness"
                        };
                        self.event(
                            &field_path(ContainerKind::Regular, &state.name),
                            EventType::Normal,
                            "Killing",
                            format!(
                                "Container {} failed {which} probe, will be restarted",
                                state.name
                            ),
                        );
                        let grace = grace_period(pod);
                        if let Some(id) = state.id.clone() {
                            let _ = self.ctx.cri.stop_container(&id, grace).await;
                        }
                        self.observe().await;
                        self.restart_after_exit(i, ContainerKind::Regular);
                    } else {
                        continue;
                    }
                }
                None => {}
            }
            if let Some(not_before) = self.containers[i].backoff.not_before
                && Instant::now() < not_before
            {
                let name = self.containers[i].name.clone();
                let message = format!(
                    "Back-off restarting failed container {name} in pod {}_{}({})",
                    self.object.name, self.object.namespace, self.uid
                );
                self.repeating_event(
                    &field_path(ContainerKind::Regular, &name),
                    EventType::Warning,
                    "BackOff",
                    message,
                );
                continue;
            }
            self.start_container(
                pod,
                &spec.containers[i],
                ContainerKind::Regular,
                i,
                input,
                &prepared,
            )
            .await;
        }
        if restart != "Always"
            && !self.containers.is_empty()
            && self.containers.iter().all(|c| c.exited().is_some())
        {
            let failed = self.containers.iter().any(|c| c.exited() != Some(0));
            if restart == "Never" || !failed {
                self.finished = Some(if failed { "Failed" } else { "Succeeded" });
            }
        }
    }

    /// Records an exit and arms the crash-loop backoff before the next start.
    fn restart_after_exit(&mut self, index: usize, kind: ContainerKind) {
        let state = match kind {
            ContainerKind::Init => &mut self.init[index],
            ContainerKind::Regular => &mut self.containers[index],
        };
        let (Some(id), Some(observed)) = (state.id.take(), state.observed.take()) else {
            return;
        };
        state.last_termination = Some(terminated(&observed, &id));
        let ran = Duration::from_nanos((observed.finished_at - observed.started_at).max(0) as u64);
        state.backoff.delay = if ran >= BACKOFF_RESET || state.backoff.delay.is_zero() {
            BACKOFF_INITIAL
        } else {
            (state.backoff.delay * 2).min(BACKOFF_MAX)
        };
        state.backoff.not_before = Some(Instant::now() + state.backoff.delay);
        state.attempt += 1;
        // Logs of the run before the one that just ended go (the last one stays for reading).
        if let Some(old) = state.attempt.checked_sub(2) {
            let log = self
                .paths
                .log_dir
                .join(&state.name)
                .join(format!("{old}.log"));
            let _ = std::fs::remove_file(log);
        }
        state.waiting = Some((
            "CrashLoopBackOff".into(),
            format!(
                "back-off {} restarting failed container={} pod={}_{}({})",
                humantime::format_duration(state.backoff.delay),
                state.name,
                self.object.name,
                self.object.namespace,
                self.uid
            ),
        ));
        for p in &mut state.probes {
            p.reset();
        }
        // The exited container stays until the next one starts (kubelet keeps it for logs).
        let cri = self.ctx.cri.clone();
        let old = id;
        tokio::spawn(async move {
            let _ = cri.remove_container(&old).await;
        });
    }

    /// `edgecore ctl restart`: stops the regular containers that run, counts a restart for each
    /// and clears their backoff, so the next step starts them again at once.
    async fn restart_containers(&mut self, pod: &Pod) -> Result<String, String> {
        if let Some(phase) = self.finished {
            return Err(format!(
                "pod {}/{} has finished ({phase}); only a running pod can be restarted",
                self.object.namespace, self.object.name
            ));
        }
        let grace = grace_period(pod);
        let mut stopped = Vec::new();
        for state in &self.containers {
            if let Some(id) = state.id.clone().filter(|_| state.exited().is_none()) {
                stopped.push((state.name.clone(), id));
            }
        }
        if stopped.is_empty() {
            return Err(format!(
                "pod {}/{} has no running container to restart",
                self.object.namespace, self.object.name
            ));
        }
        let stops: Vec<_> = stopped
            .iter()
            .map(|(_, id)| {
                let (cri, id) = (self.ctx.cri.clone(), id.clone());
                tokio::spawn(async move { cri.stop_container(&id, grace).await })
            })
            .collect();
        for (stop, (name, _)) in stops.into_iter().zip(&stopped) {
            if let Ok(Err(e)) = stop.await {
                tracing::warn!(container = %name, error = %e, "cannot stop the container for a restart");
            }
        }
        self.observe().await;
        let mut names = Vec::new();
        for i in 0..self.containers.len() {
            if !stopped
                .iter()
                .any(|(name, _)| *name == self.containers[i].name)
            {
                continue;
            }
            if self.containers[i].exited().is_none() {
                // Still running after the grace period: StopContainer kills, so this is rare.
                continue;
            }
            self.restart_after_exit(i, ContainerKind::Regular);
            let state = &mut self.containers[i];
            state.backoff = Backoff::default();
            state.waiting = None;
            names.push(format!("{} (restartCount {})", state.name, state.attempt));
        }
        tracing::info!(containers = ?names, "containers restarted by a local operator");
        if names.is_empty() {
            return Err(format!(
                "the containers of pod {}/{} did not stop",
                self.object.namespace, self.object.name
            ));
        }
        Ok(format!(
            "pod {}/{}: restarting {}",
            self.object.namespace,
            self.object.name,
            names.join(", ")
        ))
    }

    async fn start_sandbox(&mut self, input: &PodInput) -> bool {
        let dns = spec::pod_dns_config(
            &input.pod,
            self.ctx.services.pod_dns.as_ref(),
            host_resolv_conf,
        );
        // The kubelet's DNS warnings, once per pod (its first sandbox).
        if self.sandbox_attempt == 0 {
            for (reason, message) in dns.warnings {
                self.event("", EventType::Warning, reason, message);
            }
        }
        let config =
            match spec::sandbox_config(&input.pod, &self.paths, self.sandbox_attempt, dns.config) {
                Ok(c) => c,
                Err(e) => {
                    self.blocked = Some(("CreatePodSandboxError".into(), e.to_string()));
                    return false;
                }
            };
        if let Err(e) = std::fs::create_dir_all(&self.paths.log_dir) {
            self.blocked = Some(("CreatePodSandboxError".into(), e.to_string()));
            return false;
        }
        let attempt = self.sandbox_attempt;
        self.sandbox_attempt += 1;
        let id = match self.ctx.cri.run_pod_sandbox(config.clone()).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "cannot start the pod sandbox");
                self.repeating_event(
                    "",
                    EventType::Warning,
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {e}"),
                );
                self.blocked = Some(("CreatePodSandboxError".into(), e.to_string()));
                // A failed start may leave a NOTREADY sandbox behind; the manager's garbage
                // collection removes it.
                return false;
            }
        };
        let ip = match self.ctx.cri.pod_sandbox_status(&id).await {
            Ok(status) => status.network.map(|n| n.ip).unwrap_or_default(),
            Err(_) => String::new(),
        };
        tracing::info!(sandbox = %id, pod.ip = %ip, "pod sandbox ready");
        self.blocked = None;
        self.start_time.get_or_insert_with(now_rfc3339);
        self.sandbox = Some(Sandbox { id, ip, config });
        true
    }

    /// Starts a container (pulling its image first when needed) and records the kubelet's
    /// events for what happened.
    async fn start_container(
        &mut self,
        pod: &Pod,
        container: &Container,
        kind: ContainerKind,
        index: usize,
        input: &PodInput,
        prepared: &volumes::Prepared,
    ) {
        let mut events = Vec::new();
        self.start_container_recording(pod, container, kind, index, input, prepared, &mut events)
            .await;
        let path = field_path(kind, &container.name);
        for (repeat, type_, reason, message) in events {
            match repeat {
                Repeat::EveryStep => self.repeating_event(&path, type_, reason, message),
                Repeat::Once => self.event(&path, type_, reason, message),
            }
        }
    }

    // `start_container`'s arguments and where its events go.
    #[allow(clippy::too_many_arguments)]
    async fn start_container_recording(
        &mut self,
        pod: &Pod,
        container: &Container,
        kind: ContainerKind,
        index: usize,
        input: &PodInput,
        prepared: &volumes::Prepared,
        events: &mut Vec<ContainerEvent>,
    ) {
        let Some(sandbox) = self.sandbox.clone() else {
            return;
        };
        let ctx = self.ctx.clone();
        let state = match kind {
            ContainerKind::Init => &mut self.init[index],
            ContainerKind::Regular => &mut self.containers[index],
        };
        let image = container.image.clone().unwrap_or_default();
        if let Some(not_before) = state.image_backoff.not_before
            && Instant::now() < not_before
        {
            if state
                .waiting
                .as_ref()
                .is_some_and(|(r, _)| r == "ErrImagePull" || r == "ImagePullBackOff")
            {
                events.push((
                    Repeat::EveryStep,
                    EventType::Normal,
                    "BackOff",
                    format!("Back-off pulling image \"{image}\""),
                ));
                events.push((
                    Repeat::EveryStep,
                    EventType::Warning,
                    "Failed",
                    "Error: ImagePullBackOff".into(),
                ));
            }
            return;
        }
        let image_info = match ensure_image(&ctx.cri, &image, container, events).await {
            Ok(info) => {
                state.image_backoff = Backoff::default();
                info
            }
            Err((reason, message)) => {
                // As the kubelet: the first failed pull is ErrImagePull, then ImagePullBackOff
                // with the same doubling delays as a crash loop.
                let again = state
                    .waiting
                    .as_ref()
                    .is_some_and(|(r, _)| r == "ErrImagePull" || r == "ImagePullBackOff");
                state.image_backoff.delay = if state.image_backoff.delay.is_zero() {
                    BACKOFF_INITIAL
                } else {
                    (state.image_backoff.delay * 2).min(BACKOFF_MAX)
                };
                state.image_backoff.not_before = Some(Instant::now() + state.image_backoff.delay);
                events.push((
                    Repeat::Once,
                    EventType::Warning,
                    "Failed",
                    format!("Error: {reason}"),
                ));
                state.waiting = Some(if again && reason == "ErrImagePull" {
                    (
                        "ImagePullBackOff".into(),
                        format!("Back-off pulling image \"{image}\": {message}"),
                    )
                } else {
                    (reason, message)
                });
                return;
            }
        };
        // Read when the container is created: a later Service change restarts nothing.
        let service_env = crate::services::env::service_env(
            &ctx.services.table.borrow(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.spec
                .as_ref()
                .and_then(|s| s.enable_service_links)
                .unwrap_or(true),
        );
        let env = match spec::container_env(
            pod,
            container,
            &input.objects,
            &service_env,
            &sandbox.ip,
            &ctx.node_name,
        ) {
            Ok(env) => env,
            Err(e) => {
                events.push((
                    Repeat::EveryStep,
                    EventType::Warning,
                    "Failed",
                    format!("Error: {e}"),
                ));
                state.waiting = Some(("CreateContainerConfigError".into(), e.to_string()));
                return;
            }
        };
        let mounts = match volumes::mounts(container, prepared) {
            Ok(m) => m,
            Err(e) => {
                events.push((
                    Repeat::EveryStep,
                    EventType::Warning,
                    "Failed",
                    format!("Error: {e}"),
                ));
                state.waiting = Some(("CreateContainerConfigError".into(), e.to_string()));
                return;
            }
        };
        let config = spec::container_config(pod, container, kind, state.attempt, env, mounts)
            .and_then(|mut config| {
                if let Some(image) = &image_info {
                    spec::apply_image_user(pod, container, image, &mut config)?;
                }
                Ok(config)
            });
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                events.push((
                    Repeat::EveryStep,
                    EventType::Warning,
                    "Failed",
                    format!("Error: {e}"),
                ));
                state.waiting = Some(("CreateContainerConfigError".into(), e.to_string()));
                return;
            }
        };
        let sandbox_config = if sandbox.config.metadata.is_some() {
            sandbox.config.clone()
        } else {
            // Adopted sandbox: rebuild its config (only the metadata and paths matter here).
            spec::sandbox_config(
                pod,
                &self.paths,
                self.sandbox_attempt.saturating_sub(1),
                None,
            )
            .unwrap_or_default()
        };
        let id = match ctx
            .cri
            .create_container(&sandbox.id, config, sandbox_config)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                let message = e.to_string();
                if let Some(stale) = reserved_by(&message) {
                    // A container of this name and attempt exists that we never learned of:
                    // edgecore was stopped while creating it. It never ran; remove it so the
                    // next step creates this attempt again.
                    tracing::info!(container = %state.name, id = %stale, "removing a container left half-created by an earlier edgecore");
                    let _ = ctx.cri.remove_container(stale).await;
                }
                events.push((
                    Repeat::EveryStep,
                    EventType::Warning,
                    "Failed",
                    format!("Error: {message}"),
                ));
                state.waiting = Some(("CreateContainerError".into(), message));
                return;
            }
        };
        events.push((
            Repeat::Once,
            EventType::Normal,
            "Created",
            format!("Created container: {}", container.name),
        ));
        if let Err(e) = ctx.cri.start_container(&id).await {
            events.push((
                Repeat::Once,
                EventType::Warning,
                "Failed",
                format!("Error: {e}"),
            ));
            state.waiting = Some(("RunContainerError".into(), e.to_string()));
            state.id = Some(id);
            return;
        }
        events.push((
            Repeat::Once,
            EventType::Normal,
            "Started",
            format!("Started container {}", container.name),
        ));
        tracing::info!(container = %state.name, id = %id, restarts = state.attempt, "container started");
        state.id = Some(id);
        state.waiting = None;
        state.started_at = Some(Instant::now());
        state.succeeded = false;
    }

    async fn run_probes(&mut self) {
        let Some(sandbox) = self.sandbox.clone() else {
            return;
        };
        let now = Instant::now();
        for state in &mut self.containers {
            if !state.running() {
                continue;
            }
            let (Some(id), Some(started)) = (state.id.clone(), state.started_at) else {
                continue;
            };
            let startup_done = state
                .probe_verdict(ProbeKind::Startup)
                .is_none_or(|v| v == Some(true));
            for probe in &mut state.probes {
                // Liveness and readiness wait for the startup probe.
                if probe.kind != ProbeKind::Startup && !startup_done {
                    continue;
                }
                if probe.kind == ProbeKind::Startup && probe.verdict == Some(true) {
                    continue;
                }
                if !probe.due(now, started) {
                    continue;
                }
                let result = probe.run(&self.ctx.cri, &id, &sandbox.ip).await;
                if let Err(why) = &result {
                    let which = match probe.kind {
                        ProbeKind::Liveness => "Liveness",
                        ProbeKind::Readiness => "Readiness",
                        ProbeKind::Startup => "Startup",
                    };
                    self.ctx.events.record(
                        &self.object,
                        &field_path(ContainerKind::Regular, &state.name),
                        EventType::Warning,
                        "Unhealthy",
                        format!("{which} probe failed: {why}"),
                    );
                }
                probe.record(now, result);
            }
        }
    }

    /// Stops everything of the pod within `grace`, then removes it from the runtime and disk.
    async fn terminate(&mut self, pod: Option<&Pod>, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut stops = Vec::new();
        for state in self.init.iter().chain(self.containers.iter()) {
            let Some(id) = state.id.clone() else { continue };
            if state.exited().is_none() {
                self.ctx.events.record(
                    &self.object,
                    &field_path(state.kind, &state.name),
                    EventType::Normal,
                    "Killing",
                    format!("Stopping container {}", state.name),
                );
            }
            let hook = pod
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| s.containers.iter().find(|c| c.name == state.name))
                .and_then(|c| c.lifecycle.as_ref())
                .and_then(|l| l.pre_stop.clone());
            let cri = self.ctx.cri.clone();
            let pod_ip = self
                .sandbox
                .as_ref()
                .map(|s| s.ip.clone())
                .unwrap_or_default();
            stops.push(tokio::spawn(async move {
                if let Some(hook) = hook {
                    let budget = deadline.saturating_duration_since(Instant::now());
                    let ran = tokio::time::timeout(budget, pre_stop(&cri, &id, &hook, &pod_ip)).await;
                    match ran {
                        Ok(Ok(())) => {}
                        Ok(Err(why)) => tracing::warn!(container = %id, "preStop hook failed: {why}"),
                        Err(_) => tracing::warn!(container = %id, "preStop hook ran out of the grace period"),
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if let Err(e) = cri.stop_container(&id, left).await
                    && !e.is_not_found()
                {
                    tracing::warn!(container = %id, error = %e, "cannot stop container");
                }
            }));
        }
        for stop in stops {
            let _ = stop.await;
        }
        if let Some(sandbox) = self.sandbox.take() {
            if let Err(e) = self.ctx.cri.stop_pod_sandbox(&sandbox.id).await
                && !e.is_not_found()
            {
                tracing::warn!(error = %e, "cannot stop the sandbox");
            }
            if let Err(e) = self.ctx.cri.remove_pod_sandbox(&sandbox.id).await {
                tracing::warn!(error = %e, "cannot remove the sandbox");
            }
        }
        cleanup(&self.paths, &self.uid);
        tracing::info!("pod terminated and cleaned up");
    }

    fn condition(&mut self, kind: &'static str, ok: bool) -> Value {
        let entry = self
            .transitions
            .entry(kind)
            .or_insert_with(|| (ok, now_rfc3339()));
        if entry.0 != ok {
            *entry = (ok, now_rfc3339());
        }
        json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "lastTransitionTime": entry.1,
        })
    }

    fn container_status(&self, state: &ContainerState, container: Option<&Container>) -> Value {
        let image = container.and_then(|c| c.image.clone()).unwrap_or_default();
        let mut status = json!({
            "name": state.name,
            "image": image,
            "imageID": "",
            "restartCount": state.attempt,
            "ready": state.kind == ContainerKind::Regular && state.ready(),
            "started": state.running(),
            "lastState": state.last_termination.as_ref().map_or(json!({}), |t| json!({"terminated": t})),
        });
        if let Some(observed) = &state.observed {
            status["imageID"] = json!(observed.image_ref);
            if let Some(id) = &state.id {
                status["containerID"] = json!(format!("containerd://{id}"));
            }
        }
        let waiting = |reason: &str, message: &str| json!({"waiting": {"reason": reason, "message": if message.is_empty() { Value::Null } else { json!(message) }}});
        status["state"] = match (state.state(), &state.waiting, &state.id) {
            (api::ContainerState::ContainerRunning, _, Some(_)) => json!({"running": {
                "startedAt": state.observed.as_ref().map_or(Value::Null, |o| rfc3339_from_nanos(o.started_at)),
            }}),
            (api::ContainerState::ContainerExited, _, Some(id)) => match &state.observed {
                Some(o) => json!({"terminated": terminated(o, id)}),
                None => waiting("ContainerCreating", ""),
            },
            (_, Some((reason, message)), _) => waiting(reason, message),
            _ => waiting(
                if state.kind == ContainerKind::Init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                },
                "",
            ),
        };
        status
    }

    /// The pod status as the kubelet reports it.
    fn status(&mut self, pod: &Pod) -> Value {
        if let Some(status) = &self.final_status {
            return status.clone();
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let initialized = self.init.iter().all(|c| c.succeeded);
        let containers_ready = initialized
            && !self.containers.is_empty()
            && self.containers.iter().all(ContainerState::ready);
        let phase = match self.finished {
            Some(phase) => phase,
            None if self.sandbox.is_some()
                && initialized
                && self
                    .containers
                    .iter()
                    .any(|c| c.id.is_some() && c.exited().is_none()) =>
            {
                "Running"
            }
            None if self.sandbox.is_some()
                && initialized
                && self
                    .containers
                    .iter()
                    .all(|c| c.exited().is_some() || c.last_termination.is_some()) =>
            {
                "Running"
            }
            None => "Pending",
        };
        let conditions = vec![
            json!({"type": "PodScheduled", "status": "True"}),
            self.condition("Initialized", initialized),
            self.condition("ContainersReady", containers_ready),
            self.condition("Ready", containers_ready),
        ];
        let init_statuses: Vec<Value> = self
            .init
            .iter()
            .map(|s| {
                let c = spec
                    .init_containers
                    .iter()
                    .flatten()
                    .find(|c| c.name == s.name);
                self.container_status(s, c)
            })
            .collect();
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|s| {
                let c = spec.containers.iter().find(|c| c.name == s.name);
                self.container_status(s, c)
            })
            .collect();
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": statuses,
        });
        // Never an empty IP: without a known address the fields are left out.
        if let Some(ip) = self.ctx.host_ip {
            status["hostIP"] = json!(ip.to_string());
            status["hostIPs"] = json!([{"ip": ip.to_string()}]);
        }
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        if let Some(start) = &self.start_time {
            status["startTime"] = json!(start);
        }
        if let Some(sandbox) = &self.sandbox
            && !sandbox.ip.is_empty()
        {
            status["podIP"] = json!(sandbox.ip);
            status["podIPs"] = json!([{"ip": sandbox.ip}]);
        }
        if let Some((reason, message)) = &self.blocked
            && phase == "Pending"
        {
            status["reason"] = json!(reason);
            status["message"] = json!(message);
        } else {
            // Explicit nulls: the cloud writes pod status with a merge patch, where an absent
            // key would leave a reason written while the pod was blocked.
            status["reason"] = Value::Null;
            status["message"] = Value::Null;
        }
        status
    }
}

/// Runs a preStop hook: exec, httpGet or sleep, as the kubelet does.
async fn pre_stop(
    cri: &Cri,
    id: &str,
    hook: &k8s_openapi::api::core::v1::LifecycleHandler,
    pod_ip: &str,
) -> Result<(), String> {
    if let Some(exec) = &hook.exec {
        let command = exec.command.clone().unwrap_or_default();
        let reply = cri
            .exec_sync(id, command, Duration::ZERO)
            .await
            .map_err(|e| e.to_string())?;
        return match reply.exit_code {
            0 => Ok(()),
            code => Err(format!("exec exited with {code}")),
        };
    }
    if let Some(http) = &hook.http_get {
        let host = http.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let port = super::probes::port_number(&http.port)?;
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        return super::probes::http_get(&host, port, &path).await;
    }
    if let Some(sleep) = &hook.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64)).await;
        return Ok(());
    }
    Err("the hook has no handler (exec, httpGet or sleep)".into())
}

fn restart_policy(pod: &Pod) -> &'static str {
    match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
        Some("Never") => "Never",
        Some("OnFailure") => "OnFailure",
        _ => "Always",
    }
}

fn grace_period(pod: &Pod) -> Duration {
    pod.metadata
        .deletion_grace_period_seconds
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds))
        .map_or(DEFAULT_GRACE, |s| Duration::from_secs(s.max(0) as u64))
}

/// The container id in containerd's "name ... is reserved for \"ID\"" refusal.
fn reserved_by(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once("is reserved for \"")?;
    let id = rest.split('"').next()?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The kubelet's default pull policy: Always for `:latest` or no tag, else IfNotPresent.
fn pull_policy(container: &Container, image: &str) -> String {
    if let Some(policy) = &container.image_pull_policy {
        return policy.clone();
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    let tagged = last.contains(':') || image.contains('@');
    if !tagged || image.ends_with(":latest") {
        "Always".into()
    } else {
        "IfNotPresent".into()
    }
}

/// Makes sure the image is there: ImageStatus first; pull only if absent (or policy Always).
/// Returns the image as the runtime describes it (its user, for the security context).
async fn ensure_image(
    cri: &Cri,
    image: &str,
    container: &Container,
    events: &mut Vec<ContainerEvent>,
) -> Result<Option<api::Image>, (String, String)> {
    if !is_image_reference(image) {
        let message = format!(
            "Failed to apply default image tag \"{image}\": couldn't parse image name \"{image}\": invalid reference format"
        );
        events.push((
            Repeat::EveryStep,
            EventType::Warning,
            "InspectFailed",
            message.clone(),
        ));
        return Err(("InvalidImageName".into(), message));
    }
    let policy = pull_policy(container, image);
    let found = match cri.image_status(image).await {
        Ok(found) => found,
        Err(e) => return Err(("ErrImageInspect".into(), e.to_string())),
    };
    let present = found.is_some();
    if present && policy != "Always" {
        events.push((
            Repeat::Once,
            EventType::Normal,
            "Pulled",
            format!("Container image \"{image}\" already present on machine"),
        ));
        return Ok(found);
    }
    if policy == "Never" {
        let message =
            format!("Container image \"{image}\" is not present with pull policy of Never");
        events.push((
            Repeat::EveryStep,
            EventType::Warning,
            "ErrImageNeverPull",
            message.clone(),
        ));
        return Err(("ErrImageNeverPull".into(), message));
    }
    events.push((
        Repeat::Once,
        EventType::Normal,
        "Pulling",
        format!("Pulling image \"{image}\""),
    ));
    let started = Instant::now();
    match cri.pull_image(image).await {
        Ok(_) => {
            let took = go_duration(started.elapsed());
            let pulled = cri.image_status(image).await.ok().flatten();
            let size = pulled.as_ref().map_or(0, |i| i.size);
            events.push((
                Repeat::Once,
                EventType::Normal,
                "Pulled",
                format!(
                    "Successfully pulled image \"{image}\" in {took} ({took} including waiting). Image size: {size} bytes."
                ),
            ));
            Ok(pulled)
        }
        // An air-gapped gateway: a present image is good enough even under Always.
        Err(_) if present => Ok(found),
        Err(e) => {
            let message = format!("failed to pull image \"{image}\": {e}");
            events.push((
                Repeat::Once,
                EventType::Warning,
                "Failed",
                format!("Failed to pull image \"{image}\": {e}"),
            ));
            Err(("ErrImagePull".into(), message))
        }
    }
}

/// How often a container event may be recorded: once per occurrence, or (a failure met at
/// every step) at most once per [`EVENT_REPEAT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Once,
    EveryStep,
}

/// An event about a container, recorded once the container's state is no longer borrowed.
type ContainerEvent = (Repeat, EventType, &'static str, String);

/// A duration as Go prints one (`523ms`, `1.25s`), for the kubelet's Pulled message.
fn go_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        let ms = d.as_secs_f64() * 1000.0;
        let text = format!("{ms:.3}");
        format!("{}ms", text.trim_end_matches('0').trim_end_matches('.'))
    } else {
        let text = format!("{:.3}", d.as_secs_f64());
        format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Whether `image` parses as an image reference: `[host[:port]/]path[:tag][@digest]` with a
/// lowercase path (what the kubelet refuses as InvalidImageName otherwise).
fn is_image_reference(image: &str) -> bool {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest
        && !digest.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty() && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_alphanumeric())
        })
    {
        return false;
    }
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    if let Some(tag) = tag
        && (tag.is_empty()
            || tag.len() > 128
            || !tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        return false;
    }
    let mut components = path.split('/');
    let first = components.next().unwrap_or_default();
    // A first component with a '.' or ':' (or localhost) is a registry host, which may hold
    // capitals and a port.
    let has_host = path.contains('/') && (first.contains(['.', ':']) || first == "localhost");
    let lower = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
    };
    let host_ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
    };
    (if has_host {
        host_ok(first)
    } else {
        lower(first)
    }) && components.all(lower)
}

/// Removes what the runtime leaves behind: logs, volumes, pod cgroups.
pub fn cleanup(paths: &PodPaths, uid: &str) {
    if let Err(e) = volumes::remove(paths) {
        tracing::warn!(error = %e, "cannot remove the pod's volumes");
    }
    if let Some(pod_dir) = paths.log_dir.parent() {
        let _ = std::fs::remove_dir_all(pod_dir);
    }
    cgroups::remove_pod(uid);
}

/// Runs one pod until it is gone (or edgecore stops: then its containers keep running).
pub async fn run(
    ctx: Arc<Context>,
    mut desired: watch::Receiver<Desired>,
    mut commands: mpsc::Receiver<Command>,
    adopted: Adopted,
    shutdown: CancellationToken,
) {
    let first = desired.borrow().clone();
    let Desired::Run(input) = first else {
        return;
    };
    let mut worker = Worker::new(ctx.clone(), &input.pod);
    worker.adopt(adopted).await;
    if let Some(previous) = ctx.outbox.last_status(&worker.object) {
        worker.resume(&previous);
    }
    let mut input = input;
    let runtime_changed = ctx.pleg.register(&worker.uid);
    let mut tokens_arrived = ctx.tokens.arrivals();
    loop {
        let deleting = input.pod.metadata.deletion_timestamp.is_some();
        if deleting {
            worker
                .terminate(Some(&input.pod), grace_period(&input.pod))
                .await;
            ctx.outbox.put(worker.object.clone(), Report::PodDeleted);
            // Wait until the pod leaves the store.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = desired.changed() => if changed.is_err() { return },
                }
                if matches!(*desired.borrow(), Desired::Gone) {
                    return;
                }
            }
        }
        worker.step(&input).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = desired.changed() => {
                if changed.is_err() {
                    return;
                }
                let next = desired.borrow().clone();
                match next {
                    Desired::Run(next) => input = next,
                    Desired::Gone => {
                        worker.terminate(Some(&input.pod), grace_period(&input.pod)).await;
                        ctx.outbox.forget(&worker.object);
                        return;
                    }
                }
            }
            Some(command) = commands.recv() => match command {
                Command::Restart { reply } => {
                    let result = worker.restart_containers(&input.pod).await;
                    let _ = reply.send(result);
                }
            },
            _ = runtime_changed.changed() => {}
            _ = token_arrived(&mut tokens_arrived, &worker.uid) => {}
            _ = tokio::time::sleep(worker.next_step_in(Instant::now())) => {}
        }
    }
}

/// Resolves when a service-account token arrives for the pod `uid` (its projected volume is
/// then rewritten at once, where a settled pod would otherwise wait for its periodic step), or
/// when arrivals were missed (the worker looks anyway). Cancel-safe.
async fn token_arrived(arrivals: &mut tokio::sync::broadcast::Receiver<String>, uid: &str) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match arrivals.recv().await {
            Ok(arrived) if arrived == uid => return,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => return,
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(dir: &std::path::Path, pod: &Pod) -> Worker {
        worker_at(dir, pod, "10.0.0.2".parse().ok())
    }

    fn worker_at(dir: &std::path::Path, pod: &Pod, host_ip: Option<std::net::IpAddr>) -> Worker {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let (outbox, _writer) = Outbox::open(dir, metrics.clone()).expect("outbox");
        let ctx = Arc::new(Context {
            cri: Cri::new("unix:///nonexistent/containerd.sock").expect("lazy client"),
            data_dir: dir.to_path_buf(),
            node_name: "gw".into(),
            host_ip,
            outbox,
            tokens: Tokens::in_memory(crate::tokens::DEFAULT_REFRESH_MAX),
            events: crate::events::Events::new(16, metrics.clone()),
            services: crate::services::Services::detached(),
            pleg: super::super::pleg::Pleg::new(metrics.clone()),
        });
        Worker::new(ctx, pod)
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "spec": {"containers": [{"name": "app", "image": "busybox"}, {"name": "side", "image": "busybox"}]},
        }))
        .expect("pod")
    }

    #[tokio::test]
    async fn after_a_reboot_restart_counts_continue_from_the_last_report() {
        let dir = tempfile::tempdir().unwrap();
        let pod = pod();
        let mut worker = worker(dir.path(), &pod);
        worker.resume(&json!({
            "phase": "Running",
            "startTime": "2026-11-24T10:00:00Z",
            "containerStatuses": [
                {"name": "app", "restartCount": 2, "containerID": "containerd://old",
                 "state": {"running": {"startedAt": "2026-11-24T10:05:00Z"}}},
                {"name": "side", "restartCount": 4,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}},
            ],
        }));
        let app = &worker.containers[0];
        assert_eq!(
            app.attempt, 3,
            "a running container lost in the reboot counts a restart"
        );
        let lost = app.last_termination.as_ref().expect("lastState");
        assert_eq!(lost["reason"], "Unknown");
        assert_eq!(lost["exitCode"], 255);
        assert_eq!(lost["containerID"], "containerd://old");
        assert_eq!(lost["startedAt"], "2026-11-24T10:05:00Z");
        let side = &worker.containers[1];
        assert_eq!(
            side.attempt, 4,
            "a container waiting to restart keeps its count"
        );
        assert_eq!(side.last_termination.as_ref().unwrap()["reason"], "Error");
        assert_eq!(worker.start_time.as_deref(), Some("2026-11-24T10:00:00Z"));
        let status = worker.status(&pod);
        assert_eq!(status["containerStatuses"][0]["restartCount"], 3);
        assert_eq!(
            status["containerStatuses"][0]["lastState"]["terminated"]["reason"],
            "Unknown"
        );
    }

    #[tokio::test]
    async fn host_ip_is_reported_only_when_known() {
        let pod = pod();
        let known = tempfile::tempdir().unwrap();
        let status = worker(known.path(), &pod).status(&pod);
        assert_eq!(status["hostIP"], "10.0.0.2");
        assert_eq!(status["hostIPs"], json!([{"ip": "10.0.0.2"}]));
        let unknown = tempfile::tempdir().unwrap();
        let status = worker_at(unknown.path(), &pod, None).status(&pod);
        assert!(status.get("hostIP").is_none(), "{status}");
        assert!(status.get("hostIPs").is_none(), "{status}");
    }

    #[tokio::test]
    async fn a_blocked_reason_shows_while_pending_and_is_cleared_with_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let pod = pod();
        let mut worker = worker(dir.path(), &pod);
        let why = "volume \"kube-api-access-x\": no token for service account default/default (the API server's audiences) yet: waiting for the cloud";
        worker.blocked = Some(("ContainerCreating".into(), why.into()));
        let status = worker.status(&pod);
        assert_eq!(status["phase"], "Pending");
        assert_eq!(status["reason"], "ContainerCreating");
        assert_eq!(status["message"], why);
        worker.blocked = None;
        let status = worker.status(&pod);
        let status = status.as_object().expect("an object");
        assert!(
            status.get("reason").is_some_and(Value::is_null)
                && status.get("message").is_some_and(Value::is_null),
            "explicit nulls remove the reason in the cloud's merge patch: {status:?}"
        );
    }

    #[test]
    fn image_references_are_checked_as_the_kubelet_parses_them() {
        for good in [
            "busybox",
            "busybox:1.36",
            "docker.io/library/busybox:latest",
            "localhost:5000/edge/app:v1",
            "Registry.Example.com/app@sha256:abc123",
            "edge-test/missing:1",
        ] {
            assert!(is_image_reference(good), "{good}");
        }
        for bad in [
            "",
            "BusyBox",
            "busybox:",
            "bad image",
            "app:t@g",
            "a//b",
            "app@sha256",
        ] {
            assert!(!is_image_reference(bad), "{bad}");
        }
    }

    #[test]
    fn events_name_containers_and_volumes_as_the_kubelet_does() {
        assert_eq!(
            field_path(ContainerKind::Regular, "app"),
            "spec.containers{app}"
        );
        assert_eq!(
            field_path(ContainerKind::Init, "setup"),
            "spec.initContainers{setup}"
        );
        assert_eq!(
            mount_failure("volume \"config\": configmap \"app\" not found"),
            "MountVolume.SetUp failed for volume \"config\" : configmap \"app\" not found"
        );
        assert_eq!(go_duration(Duration::from_millis(523)), "523ms");
        assert_eq!(go_duration(Duration::from_millis(1250)), "1.25s");
    }

    #[test]
    fn the_reserving_container_is_read_from_containerds_refusal() {
        let message = r#"CreateContainer: failed to reserve container name "c_web_default_u1_0": name "c_web_default_u1_0" is reserved for "746108ce0dd6""#;
        assert_eq!(reserved_by(message), Some("746108ce0dd6"));
        assert_eq!(reserved_by("CreateContainer: image not found"), None);
        assert_eq!(reserved_by(r#"is reserved for "../etc""#), None);
    }

    #[tokio::test]
    async fn a_pod_that_had_finished_stays_finished_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let pod = pod();
        let mut worker = worker(dir.path(), &pod);
        let reported = json!({
            "phase": "Succeeded",
            "containerStatuses": [{"name": "app", "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
        });
        worker.resume(&reported);
        assert_eq!(worker.finished, Some("Succeeded"));
        assert_eq!(worker.status(&pod), reported, "reported as it was");
    }

    #[tokio::test]
    async fn containers_found_in_the_runtime_are_not_touched_by_the_last_report() {
        let dir = tempfile::tempdir().unwrap();
        let pod = pod();
        let mut worker = worker(dir.path(), &pod);
        worker.sandbox = Some(Sandbox {
            id: "s".into(),
            ip: "10.1.0.2".into(),
            config: api::PodSandboxConfig::default(),
        });
        worker.containers[0].id = Some("adopted".into());
        worker.containers[0].attempt = 7;
        worker.resume(&json!({
            "phase": "Succeeded",
            "containerStatuses": [
                {"name": "app", "restartCount": 2, "state": {"running": {}}},
                {"name": "side", "restartCount": 1, "state": {"running": {}}},
            ],
        }));
        assert_eq!(
            worker.finished, None,
            "a pod with a live sandbox is judged by the runtime"
        );
        assert_eq!(
            worker.containers[0].attempt, 7,
            "adopted: the runtime's count stands"
        );
        assert_eq!(
            worker.containers[1].attempt, 2,
            "missing from the runtime: one restart more"
        );
    }

    #[tokio::test]
    async fn only_a_settled_pod_waits_for_a_wake_up_and_probes_keep_their_periods() {
        let dir = tempfile::tempdir().unwrap();
        let pod = pod();
        let mut worker = worker(dir.path(), &pod);
        let now = Instant::now();
        assert_eq!(worker.next_step_in(now), RESYNC, "starting: every second");
        worker.sandbox = Some(Sandbox {
            id: "s".into(),
            ip: "10.1.0.2".into(),
            config: api::PodSandboxConfig::default(),
        });
        let running = api::ContainerStatus {
            state: api::ContainerState::ContainerRunning as i32,
            ..Default::default()
        };
        for (i, c) in worker.containers.iter_mut().enumerate() {
            c.id = Some(format!("c{i}"));
            c.observed = Some(running.clone());
            c.started_at = Some(now);
        }
        assert_eq!(
            worker.next_step_in(now),
            SETTLED_RESYNC,
            "settled, no probe"
        );
        // A readiness probe every 5 s, last run now: the worker steps when it is due.
        let probe: k8s_openapi::api::core::v1::Probe =
            serde_json::from_value(json!({"exec": {"command": ["true"]}, "periodSeconds": 5}))
                .unwrap();
        let mut readiness = Prober::new(ProbeKind::Readiness, probe);
        readiness.record(now, Ok(()));
        worker.containers[0].probes.push(readiness);
        assert_eq!(worker.next_step_in(now), Duration::from_secs(5));
        // A container exited (the relist or an event woke the worker): every second again
        // until it is running.
        worker.containers[1].observed = Some(api::ContainerStatus {
            state: api::ContainerState::ContainerExited as i32,
            ..Default::default()
        });
        assert_eq!(worker.next_step_in(now), RESYNC);
        worker.containers[1].observed = Some(running);
        worker.containers[1].waiting = Some(("CrashLoopBackOff".into(), "back-off".into()));
        assert_eq!(worker.next_step_in(now), RESYNC, "backing off");
        worker.containers[1].waiting = None;
        worker.finished = Some("Succeeded");
        assert_eq!(worker.next_step_in(now), SETTLED_RESYNC, "finished");
    }
}
