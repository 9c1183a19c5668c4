//! A controller's work queue of object keys, in the shape of client-go's: a key waits at most
//! once (adding a queued key again does nothing), a key can be added after a delay (a
//! requeue, or a retry with backoff), and one worker takes keys in order. Reflector events
//! add keys; the worker reconciles the object named by each key from the reflector stores.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::informer::{WatchEvent, cached_watch};

/// A namespaced object's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: &str, name: &str) -> Key {
        Key {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The shortest and longest retry delay after a failed reconcile (doubled per failure, as
/// client-go's default controller rate limiter does from 5 ms to 1000 s; ours stops at 60 s).
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    ready: VecDeque<Key>,
    queued: HashSet<Key>,
    /// Keys to add at an instant; the earliest per key wins.
    delayed: BTreeMap<Instant, Vec<Key>>,
    /// Failures in a row per key, for the retry delay.
    failures: HashMap<Key, u32>,
}

/// The queue. Shared by the reflector tasks (adding) and the one worker (taking); the mutex
/// guards the three collections together, `Notify` wakes the worker.
#[derive(Default)]
pub struct Queue {
    state: Mutex<State>,
    wake: Notify,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `key` now, unless it is already waiting.
    pub fn add(&self, key: Key) {
        let mut state = self.lock();
        if state.queued.insert(key.clone()) {
            state.ready.push_back(key);
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Adds `key` after `delay`.
    pub fn add_after(&self, key: Key, delay: Duration) {
        let mut state = self.lock();
        state
            .delayed
            .entry(Instant::now() + delay)
            .or_default()
            .push(key);
        drop(state);
        self.wake.notify_one();
    }

    /// Adds `key` again after a failure, later each time it fails in a row.
    pub fn retry(&self, key: Key) {
        let failures = {
            let mut state = self.lock();
            let n = state.failures.entry(key.clone()).or_default();
            *n = n.saturating_add(1);
            *n
        };
        let delay = RETRY_FIRST
            .saturating_mul(1 << failures.min(10).saturating_sub(1))
            .min(RETRY_MAX);
        self.add_after(key, delay);
    }

    /// Forgets the failures of `key` (its reconcile succeeded).
    pub fn forget(&self, key: &Key) {
        self.lock().failures.remove(key);
    }

    /// Moves delayed keys that are due to the ready queue; returns when the next one is due.
    fn promote(&self) -> Option<Instant> {
        let mut state = self.lock();
        let now = Instant::now();
        let later = state.delayed.split_off(&(now + Duration::from_nanos(1)));
        let due = std::mem::replace(&mut state.delayed, later);
        for key in due.into_values().flatten() {
            if state.queued.insert(key.clone()) {
                state.ready.push_back(key);
            }
        }
        state.delayed.keys().next().copied()
    }

    /// The next key to reconcile, waiting for one; `None` once `shutdown` is cancelled.
    pub async fn next(&self, shutdown: &CancellationToken) -> Option<Key> {
        loop {
            let next_due = self.promote();
            if let Some(key) = {
                let mut state = self.lock();
                let key = state.ready.pop_front();
                if let Some(key) = &key {
                    state.queued.remove(key);
                }
                key
            } {
                return Some(key);
            }
            let sleep = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.wake.notified() => {}
                _ = sleep => {}
            }
        }
    }
}

/// What happened to a watched object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Listed, added or modified.
    Applied,
    Deleted,
}

/// Whether each node was disconnected when its reflector last saw it, for controllers that act
/// when a node's connection changes (the autonomy rule, [`crate::pods::node_disconnected`]).
#[derive(Debug, Default)]
pub struct DisconnectedNodes(Mutex<HashMap<String, bool>>);

impl DisconnectedNodes {
    /// Records `node` as its reflector reports it (a deleted node counts as connected) and
    /// returns whether it was known before and has flipped since.
    pub fn flipped(&self, node: &k8s_openapi::api::core::v1::Node, change: Change) -> bool {
        let now = change == Change::Applied && crate::pods::node_disconnected(node);
        let before = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kube::ResourceExt::name_any(node), now);
        before.is_some_and(|b| b != now)
    }
}

/// Whether each of a controller's reflectors has listed, reported as the controller's sync
/// state ([`Context::mark_synced`]): synced once all have listed, unsynced while any has lost
/// its watch and not listed again. Clones share the state (a shared informer's handler
/// reports into the same one as the controller's own reflectors).
#[derive(Clone)]
pub struct Listed {
    ctx: std::sync::Arc<Context>,
    controller: &'static str,
    listed: std::sync::Arc<Mutex<Vec<bool>>>,
}

impl std::fmt::Debug for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listed")
            .field("controller", &self.controller)
            .finish_non_exhaustive()
    }
}

impl Listed {
    /// Tracks `reflectors` reflectors of `controller`, none listed yet.
    pub fn new(ctx: std::sync::Arc<Context>, controller: &'static str, reflectors: usize) -> Self {
        ctx.mark_synced(controller, false);
        Listed {
            ctx,
            controller,
            listed: std::sync::Arc::new(Mutex::new(vec![false; reflectors])),
        }
    }

    fn set(&self, reflector: usize, listed: bool) {
        let mut all = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = all.get_mut(reflector) {
            *slot = listed;
        }
        let synced = all.iter().all(|l| *l);
        drop(all);
        self.ctx.mark_synced(self.controller, synced);
    }
}

/// Runs one reflector: lists and watches `api` into `writer` (relisting with backoff after a
/// lost watch), calls `handle` for every object listed, applied or deleted, and reports its
/// listing as number `index` of `listed` ([`on_event`]). Never returns.
pub async fn reflect<K>(
    api: Api<K>,
    writer: Writer<K>,
    listed: &Listed,
    index: usize,
    handle: impl FnMut(&K, Change),
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut on_event = on_event(listed.clone(), index, handle);
    let stream = reflector::reflector(writer, cached_watch(api, watcher::Config::default()));
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        on_event(&event);
    }
    std::future::pending::<()>().await;
}

/// What a reflector does with each event of its watch (its own, or a
/// [`SharedInformer`](crate::informer::SharedInformer)'s): calls `handle` for every object
/// listed, applied or deleted, and reports its listing as number `index` of `listed`.
pub(crate) fn on_event<K>(
    listed: Listed,
    index: usize,
    mut handle: impl FnMut(&K, Change),
) -> impl FnMut(&WatchEvent<K>) {
    move |event| match event {
        Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
            handle(object, Change::Applied)
        }
        Ok(watcher::Event::Delete(object)) => handle(object, Change::Deleted),
        Ok(watcher::Event::Init) => {}
        Ok(watcher::Event::InitDone) => listed.set(index, true),
        Err(e) => {
            tracing::warn!(controller = listed.controller, error = %e, "watch lost, listing again");
            listed.set(index, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_counts_as_flipped_only_when_its_connection_changed_since_last_seen() {
        use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
        let node = |ready: &str| Node {
            metadata: kube::api::ObjectMeta {
                name: Some("edge-1".into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let nodes = DisconnectedNodes::default();
        assert!(
            !nodes.flipped(&node("True"), Change::Applied),
            "first sighting"
        );
        assert!(!nodes.flipped(&node("True"), Change::Applied), "unchanged");
        assert!(
            nodes.flipped(&node("Unknown"), Change::Applied),
            "disconnected"
        );
        assert!(
            !nodes.flipped(&node("Unknown"), Change::Applied),
            "still disconnected"
        );
        assert!(
            nodes.flipped(&node("Unknown"), Change::Deleted),
            "gone counts as connected"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_waits_once_and_delayed_keys_come_when_due() {
        let queue = Queue::default();
        let shutdown = CancellationToken::new();
        queue.add(Key::new("ns", "a"));
        queue.add(Key::new("ns", "a"));
        queue.add(Key::new("ns", "b"));
        assert_eq!(queue.next(&shutdown).await, Some(Key::new("ns", "a")));
        assert_eq!(queue.next(&shutdown).await, Some(Key::new("ns", "b")));

        queue.add_after(Key::new("ns", "c"), Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(queue.next(&shutdown).await, Some(Key::new("ns", "c")));
        assert!(start.elapsed() >= Duration::from_secs(5));

        shutdown.cancel();
        assert_eq!(queue.next(&shutdown).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_forget_resets_them() {
        let queue = Queue::default();
        let shutdown = CancellationToken::new();
        let key = Key::new("ns", "x");
        let mut waits = Vec::new();
        for _ in 0..3 {
            queue.retry(key.clone());
            let start = Instant::now();
            queue.next(&shutdown).await;
            waits.push(start.elapsed());
        }
        assert!(waits[0] < waits[1] && waits[1] < waits[2], "{waits:?}");
        queue.forget(&key);
        queue.retry(key.clone());
        let start = Instant::now();
        queue.next(&shutdown).await;
        assert_eq!(start.elapsed(), waits[0]);
    }
}
