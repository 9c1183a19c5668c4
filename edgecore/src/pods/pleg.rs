//! Runtime state changes for the pod workers, as the kubelet's PLEG finds them.
//!
//! One task for all pods. With a runtime that offers the CRI's container events
//! (`GetContainerEvents`, containerd 1.7 and later) every event wakes the worker of the pod it
//! is about, and the runtime is relisted every [`EVENTED_RELIST`] as the safety net. Without
//! them (containerd 1.6 answers `UNIMPLEMENTED`), or while the stream is broken, the runtime is
//! relisted every [`POLL_RELIST`] (one ListPodSandbox and one ListContainers for the whole
//! node) and the workers of the pods whose sandboxes or containers changed are woken. A broken
//! stream is subscribed again with a backoff; every (re)subscription is followed by a relist,
//! so a container that exited while the stream was down is still found.
//!
//! The worker does the observing itself (ContainerStatus of its containers, as before): an
//! event or a relist difference only says *which* pod must look now.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_cri::v1 as api;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spec;
use crate::backoff::Backoff;
use crate::cri::{Cri, CriError};
use crate::metrics::Metrics;

/// Relist period while no event stream is up (the kubelet's generic PLEG relists every second).
pub const POLL_RELIST: Duration = Duration::from_secs(1);
/// Relist period while the event stream is up (the kubelet's evented PLEG: 300 s).
pub const EVENTED_RELIST: Duration = Duration::from_secs(300);
/// Between attempts to subscribe again after the stream broke: 1 s doubling to 5 min.
const RESUBSCRIBE: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(300),
};

/// The container events, as the runtime streams them.
pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<api::ContainerEventResponse, tonic::Status>> + Send>>;

/// What the relist needs of the runtime; [`Cri`] in edgecore, a fake in unit tests.
pub trait Runtime: Send + Sync {
    /// Subscribes to the container events.
    fn subscribe(&self) -> impl Future<Output = Result<EventStream, CriError>> + Send;
    /// Lists edgecore's sandboxes and containers.
    fn relist(&self) -> impl Future<Output = Result<Snapshot, CriError>> + Send;
}

impl Runtime for Cri {
    async fn subscribe(&self) -> Result<EventStream, CriError> {
        let stream = self.get_container_events().await?;
        Ok(Box::pin(stream))
    }

    async fn relist(&self) -> Result<Snapshot, CriError> {
        let ours = HashMap::from([(
            spec::LABEL_MANAGED_BY.to_string(),
            spec::MANAGED_BY.to_string(),
        )]);
        let sandboxes = self.list_pod_sandboxes(ours.clone()).await?;
        let containers = self.list_containers(ours).await?;
        Ok(Snapshot::new(&sandboxes, &containers))
    }
}

/// Every sandbox and container of ours by id: its pod's uid and its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(BTreeMap<String, (String, i32)>);

fn pod_uid(labels: &HashMap<String, String>) -> String {
    labels.get(spec::LABEL_POD_UID).cloned().unwrap_or_default()
}

impl Snapshot {
    /// The snapshot of one relist.
    pub fn new(sandboxes: &[api::PodSandbox], containers: &[api::Container]) -> Snapshot {
        let mut map = BTreeMap::new();
        for s in sandboxes {
            map.insert(s.id.clone(), (pod_uid(&s.labels), s.state));
        }
        for c in containers {
            // Sandbox and container states share no numbers' meaning; the offset keeps a
            // sandbox and a container that happened to share an id (they do not) apart.
            map.insert(c.id.clone(), (pod_uid(&c.labels), 100 + c.state));
        }
        Snapshot(map)
    }

    /// The pods whose sandboxes or containers appeared, went or changed state since `before`.
    pub fn changed_since(&self, before: &Snapshot) -> Vec<String> {
        let mut pods: Vec<String> = Vec::new();
        for (id, (uid, state)) in &self.0 {
            if before.0.get(id) != Some(&(uid.clone(), *state)) {
                pods.push(uid.clone());
            }
        }
        for (id, (uid, _)) in &before.0 {
            if !self.0.contains_key(id) {
                pods.push(uid.clone());
            }
        }
        pods.sort();
        pods.dedup();
        pods.retain(|uid| !uid.is_empty());
        pods
    }

    /// The pod a container or sandbox id belongs to, as last listed.
    fn pod_of(&self, id: &str) -> Option<&str> {
        self.0.get(id).map(|(uid, _)| uid.as_str())
    }
}

/// The pod an event is about: its sandbox's labels (the pod uid edgecore put there), else the
/// sandbox metadata's uid, else the last relist's knowledge of the container.
pub fn event_pod(event: &api::ContainerEventResponse, known: &Snapshot) -> Option<String> {
    let from_sandbox = event.pod_sandbox_status.as_ref().and_then(|s| {
        let uid = pod_uid(&s.labels);
        if !uid.is_empty() {
            Some(uid)
        } else {
            s.metadata
                .as_ref()
                .map(|m| m.uid.clone())
                .filter(|u| !u.is_empty())
        }
    });
    from_sandbox.or_else(|| known.pod_of(&event.container_id).map(str::to_string))
}

/// How runtime changes reach the pod workers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The event stream is up; relisted every [`EVENTED_RELIST`].
    Events,
    /// No stream (unsupported, broken, not yet subscribed); relisted every [`POLL_RELIST`].
    Polling,
}

/// The wake-ups of the pod workers, by pod uid.
#[derive(Debug)]
pub struct Pleg {
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    metrics: Arc<Metrics>,
    mode: Mutex<Mode>,
}

/// A worker's registration: woken when its pod changes in the runtime; unregisters on drop.
#[derive(Debug)]
pub struct Registration {
    pleg: Arc<Pleg>,
    uid: String,
    notify: Arc<Notify>,
}

impl Registration {
    /// Resolves when the runtime changed something of this pod since the last call.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut wakers = self.pleg.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if wakers
            .get(&self.uid)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
        {
            wakers.remove(&self.uid);
        }
    }
}

impl Pleg {
    /// No workers yet; polling until a subscription succeeds.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Pleg> {
        Arc::new(Pleg {
            wakers: Mutex::new(HashMap::new()),
            metrics,
            mode: Mutex::new(Mode::Polling),
        })
    }

    /// How changes are found now.
    pub fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
        self.metrics
            .runtime_events_subscribed
            .set(i64::from(mode == Mode::Events));
    }

    /// Registers the worker of pod `uid`.
    pub fn register(self: &Arc<Self>, uid: &str) -> Registration {
        let notify = Arc::new(Notify::new());
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_string(), notify.clone());
        Registration {
            pleg: self.clone(),
            uid: uid.to_string(),
            notify,
        }
    }

    /// Wakes the worker of `uid`, if there is one (a permit is kept if it is busy).
    pub fn wake(&self, uid: &str) {
        if let Some(n) = self
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
        {
            n.notify_one();
        }
    }

    /// Relists once; wakes the pods that changed. Keeps the old snapshot when the runtime
    /// does not answer (the next relist compares with what was last seen).
    async fn relist(&self, runtime: &impl Runtime, known: &mut Option<Snapshot>) {
        self.metrics.runtime_relists.inc();
        match runtime.relist().await {
            Ok(now) => {
                if let Some(before) = known.as_ref() {
                    for uid in now.changed_since(before) {
                        self.wake(&uid);
                    }
                }
                *known = Some(now);
            }
            Err(e) => tracing::debug!(error = %e, "relist failed; trying again"),
        }
    }

    /// Follows the runtime until `shutdown`.
    pub async fn run(self: Arc<Self>, runtime: impl Runtime, shutdown: CancellationToken) {
        let mut known: Option<Snapshot> = None;
        let mut stream: Option<EventStream> = None;
        let mut failures = 0u32;
        let mut said_unsupported = false;
        let mut next_subscribe = Instant::now();
        let mut next_relist = Instant::now();
        loop {
            let now = Instant::now();
            if stream.is_none() && now >= next_subscribe {
                match runtime.subscribe().await {
                    Ok(s) => {
                        tracing::info!(
                            relist = ?EVENTED_RELIST,
                            "following the runtime's container events"
                        );
                        stream = Some(s);
                        failures = 0;
                        said_unsupported = false;
                        self.set_mode(Mode::Events);
                        // Whatever changed while there was no stream.
                        next_relist = now;
                    }
                    Err(e) => {
                        self.metrics.runtime_events_failures.inc();
                        self.set_mode(Mode::Polling);
                        let delay = if e.is_unimplemented() {
                            if !said_unsupported {
                                tracing::info!(
                                    error = %e,
                                    relist = ?POLL_RELIST,
                                    retry = ?RESUBSCRIBE.cap,
                                    "the runtime offers no container events; relisting it instead"
                                );
                                said_unsupported = true;
                            }
                            RESUBSCRIBE.cap
                        } else {
                            let delay = RESUBSCRIBE.ceiling(failures);
                            tracing::warn!(error = %e, retry = ?delay, "cannot follow the runtime's container events; relisting it every second meanwhile");
                            delay
                        };
                        failures = failures.saturating_add(1);
                        next_subscribe = now + delay;
                    }
                }
            }
            if Instant::now() >= next_relist {
                self.relist(&runtime, &mut known).await;
                let period = if stream.is_some() {
                    EVENTED_RELIST
                } else {
                    POLL_RELIST
                };
                next_relist = Instant::now() + period;
            }
            let wake_at = if stream.is_some() {
                next_relist
            } else {
                next_relist.min(next_subscribe)
            };
            let next_event = async {
                match stream.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(wake_at) => {}
                item = next_event => match item {
                    Some(Ok(event)) => {
                        let pod = known.as_ref().and_then(|k| event_pod(&event, k))
                            .or_else(|| event_pod(&event, &Snapshot::default()));
                        match pod {
                            Some(uid) => self.wake(&uid),
                            // Not a pod we can name: the relist finds it.
                            None => next_relist = Instant::now(),
                        }
                    }
                    broken => {
                        let why = match broken {
                            Some(Err(status)) => status.message().to_string(),
                            _ => "the runtime ended the stream".to_string(),
                        };
                        stream = None;
                        self.metrics.runtime_events_failures.inc();
                        self.set_mode(Mode::Polling);
                        let delay = RESUBSCRIBE.ceiling(failures);
                        failures = failures.saturating_add(1);
                        tracing::warn!(error = %why, retry = ?delay, "the runtime's container event stream broke; relisting it every second meanwhile");
                        next_subscribe = Instant::now() + delay;
                        next_relist = Instant::now();
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn container(id: &str, uid: &str, state: api::ContainerState) -> api::Container {
        api::Container {
            id: id.into(),
            labels: HashMap::from([(spec::LABEL_POD_UID.to_string(), uid.to_string())]),
            state: state as i32,
            ..Default::default()
        }
    }

    fn sandbox(id: &str, uid: &str) -> api::PodSandbox {
        api::PodSandbox {
            id: id.into(),
            labels: HashMap::from([(spec::LABEL_POD_UID.to_string(), uid.to_string())]),
            state: api::PodSandboxState::SandboxReady as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_relist_names_the_pods_whose_containers_changed() {
        use api::ContainerState::*;
        let before = Snapshot::new(
            &[sandbox("s1", "a"), sandbox("s2", "b")],
            &[
                container("c1", "a", ContainerRunning),
                container("c2", "b", ContainerRunning),
                container("c3", "c", ContainerRunning),
            ],
        );
        assert!(before.changed_since(&before).is_empty(), "nothing changed");
        // c1 exited, c3 was deleted, c4 is new for pod d.
        let after = Snapshot::new(
            &[sandbox("s1", "a"), sandbox("s2", "b")],
            &[
                container("c1", "a", ContainerExited),
                container("c2", "b", ContainerRunning),
                container("c4", "d", ContainerCreated),
            ],
        );
        assert_eq!(after.changed_since(&before), vec!["a", "c", "d"]);
    }

    #[test]
    fn an_event_names_its_pod_by_sandbox_label_metadata_or_the_last_relist() {
        let known = Snapshot::new(
            &[],
            &[container("c9", "z", api::ContainerState::ContainerRunning)],
        );
        let mut event = api::ContainerEventResponse {
            container_id: "c1".into(),
            container_event_type: api::ContainerEventType::ContainerStoppedEvent as i32,
            pod_sandbox_status: Some(api::PodSandboxStatus {
                labels: HashMap::from([(spec::LABEL_POD_UID.to_string(), "a".to_string())]),
                metadata: Some(api::PodSandboxMetadata {
                    uid: "m".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(event_pod(&event, &known).as_deref(), Some("a"));
        if let Some(s) = event.pod_sandbox_status.as_mut() {
            s.labels.clear();
        }
        assert_eq!(event_pod(&event, &known).as_deref(), Some("m"));
        event.pod_sandbox_status = None;
        assert_eq!(event_pod(&event, &known), None, "unknown container");
        event.container_id = "c9".into();
        assert_eq!(event_pod(&event, &known).as_deref(), Some("z"));
    }

    /// A fake runtime: its subscriptions are scripted, its relist answers a shared snapshot.
    struct FakeRuntime {
        subscriptions: Mutex<Vec<Result<EventStream, CriError>>>,
        snapshot: Arc<Mutex<Snapshot>>,
        relists: Arc<AtomicUsize>,
    }

    impl Runtime for FakeRuntime {
        async fn subscribe(&self) -> Result<EventStream, CriError> {
            let mut s = self.subscriptions.lock().unwrap();
            if s.is_empty() {
                return Err(unavailable());
            }
            s.remove(0)
        }

        async fn relist(&self) -> Result<Snapshot, CriError> {
            self.relists.fetch_add(1, Ordering::SeqCst);
            Ok(self.snapshot.lock().unwrap().clone())
        }
    }

    fn unavailable() -> CriError {
        CriError::Call {
            call: "GetContainerEvents",
            status: tonic::Status::unavailable("down"),
        }
    }

    fn unimplemented() -> CriError {
        CriError::Call {
            call: "GetContainerEvents",
            status: tonic::Status::unimplemented("not implemented"),
        }
    }

    fn stopped(uid: &str) -> api::ContainerEventResponse {
        api::ContainerEventResponse {
            container_id: "c1".into(),
            container_event_type: api::ContainerEventType::ContainerStoppedEvent as i32,
            pod_sandbox_status: Some(api::PodSandboxStatus {
                labels: HashMap::from([(spec::LABEL_POD_UID.to_string(), uid.to_string())]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_events_the_runtime_is_relisted_every_second_and_changes_wake_the_pod() {
        let metrics = Arc::new(Metrics::default());
        let pleg = Pleg::new(metrics.clone());
        let snapshot = Arc::new(Mutex::new(Snapshot::new(
            &[sandbox("s1", "a")],
            &[container("c1", "a", api::ContainerState::ContainerRunning)],
        )));
        let relists = Arc::new(AtomicUsize::new(0));
        let runtime = FakeRuntime {
            subscriptions: Mutex::new(vec![Err(unimplemented())]),
            snapshot: snapshot.clone(),
            relists: relists.clone(),
        };
        let a = pleg.register("a");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pleg.clone().run(runtime, shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(5500)).await;
        assert_eq!(pleg.mode(), Mode::Polling);
        assert_eq!(metrics.runtime_events_subscribed.get(), 0);
        assert_eq!(
            metrics.runtime_events_failures.get(),
            1,
            "unsupported: asked once"
        );
        let n = relists.load(Ordering::SeqCst);
        assert!((5..=7).contains(&n), "relisted every second: {n}");
        // Nothing changed: no wake-up.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), a.changed())
                .await
                .is_err()
        );
        // The container exits: the pod is woken within a relist period.
        *snapshot.lock().unwrap() = Snapshot::new(
            &[sandbox("s1", "a")],
            &[container("c1", "a", api::ContainerState::ContainerExited)],
        );
        tokio::time::timeout(POLL_RELIST + Duration::from_millis(100), a.changed())
            .await
            .expect("woken by the relist");
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn events_wake_the_pod_and_a_broken_stream_falls_back_to_polling_and_resubscribes() {
        let metrics = Arc::new(Metrics::default());
        let pleg = Pleg::new(metrics.clone());
        let snapshot = Arc::new(Mutex::new(Snapshot::new(
            &[sandbox("s1", "a")],
            &[container("c1", "a", api::ContainerState::ContainerRunning)],
        )));
        let relists = Arc::new(AtomicUsize::new(0));
        // First stream: one event, then an error after 10 s. Second: stays open.
        let first = futures::stream::iter(vec![Ok(stopped("a"))])
            .chain(futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Err(tonic::Status::unavailable("containerd restarting"))
            }))
            .boxed();
        let second = futures::stream::pending().boxed();
        let runtime = FakeRuntime {
            subscriptions: Mutex::new(vec![Ok(first), Err(unavailable()), Ok(second)]),
            snapshot: snapshot.clone(),
            relists: relists.clone(),
        };
        let a = pleg.register("a");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pleg.clone().run(runtime, shutdown.clone()));
        tokio::time::timeout(Duration::from_millis(100), a.changed())
            .await
            .expect("woken by the event");
        assert_eq!(pleg.mode(), Mode::Events);
        assert_eq!(metrics.runtime_events_subscribed.get(), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            relists.load(Ordering::SeqCst),
            1,
            "with events: one relist at subscription"
        );
        // The stream breaks at 10 s; the container exits while there is none.
        tokio::time::sleep(Duration::from_millis(5100)).await;
        assert_eq!(pleg.mode(), Mode::Polling, "broken stream: polling");
        assert_eq!(metrics.runtime_events_subscribed.get(), 0);
        *snapshot.lock().unwrap() = Snapshot::new(
            &[sandbox("s1", "a")],
            &[container("c1", "a", api::ContainerState::ContainerExited)],
        );
        tokio::time::timeout(POLL_RELIST + Duration::from_millis(100), a.changed())
            .await
            .expect("found by the relist while the stream is down");
        // Resubscribed after a backoff (1 s, then 2 s after the refused attempt).
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pleg.mode(), Mode::Events, "subscribed again");
        assert_eq!(metrics.runtime_events_failures.get(), 2);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn a_dropped_registration_stops_the_wake_ups() {
        let pleg = Pleg::new(Arc::new(Metrics::default()));
        let a = pleg.register("a");
        drop(a);
        assert!(pleg.wakers.lock().unwrap().is_empty());
        pleg.wake("a");
    }
}
