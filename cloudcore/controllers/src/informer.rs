//! The machinery the DaemonSet and StatefulSet controllers share, in the shape of client-go's
//! informers: a reflector-backed cache per watched kind whose events put owner keys on a
//! [`Queue`], the queue itself (deduplicated keys, some due later), the synced flag a controller
//! reports to [`Context::mark_synced`], and [`observed`], which waits until a controller's own
//! write shows in its cache (kube-controller-manager's "expectations": without it, a reconcile
//! that runs before the cache catches up would create the same pod twice).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Context;

/// An owner's namespace and name.
pub(crate) type Key = (String, String);

/// Keys waiting to be reconciled: each at most once, now or at a later instant.
#[derive(Default)]
pub(crate) struct Queue {
    /// The keys and when each is due; a key queued again keeps the earlier instant.
    due: Mutex<BTreeMap<Key, Instant>>,
    /// Woken when a key is queued, so a sleeping worker looks again.
    added: Notify,
}

impl Queue {
    /// Queues `key` now.
    pub(crate) fn add(&self, key: Key) {
        self.add_at(key, Instant::now());
    }

    /// Queues `key` to be reconciled after `delay` (or sooner if queued again).
    pub(crate) fn add_after(&self, key: Key, delay: Duration) {
        self.add_at(key, Instant::now() + delay);
    }

    fn add_at(&self, key: Key, at: Instant) {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        let entry = due.entry(key).or_insert(at);
        if at < *entry {
            *entry = at;
        }
        drop(due);
        self.added.notify_one();
    }

    /// Waits until at least one key is due and takes every due key.
    pub(crate) async fn next(&self) -> Vec<Key> {
        loop {
            let notified = self.added.notified();
            let now = Instant::now();
            let wake = {
                let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
                let ready: Vec<Key> = due
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                if !ready.is_empty() {
                    for key in &ready {
                        due.remove(key);
                    }
                    return ready;
                }
                due.values().min().copied()
            };
            match wake {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// Whether each of a controller's caches has listed; reported as one flag.
pub(crate) struct Synced {
    ctx: Arc<Context>,
    name: &'static str,
    caches: Mutex<Vec<Arc<AtomicBool>>>,
}

impl Synced {
    pub(crate) fn new(ctx: Arc<Context>, name: &'static str) -> Arc<Synced> {
        ctx.mark_synced(name, false);
        Arc::new(Synced {
            ctx,
            name,
            caches: Mutex::new(Vec::new()),
        })
    }

    fn cache(&self) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(flag.clone());
        flag
    }

    fn report(&self) {
        let all = self
            .caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .all(|f| f.load(Ordering::Relaxed));
        self.ctx.mark_synced(self.name, all);
    }
}

/// A cache of every `K` in `api` and the future that keeps it current: each change calls
/// `keys` and queues what it returns. A lost watch marks the cache unsynced until the watcher
/// has listed again (or, after a transient error, hears from the API again).
pub(crate) fn watch<K>(
    api: Api<K>,
    queue: Arc<Queue>,
    synced: &Arc<Synced>,
    keys: impl Fn(&K) -> Vec<Key> + Send + 'static,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let flag = synced.cache();
    let synced = synced.clone();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let driver = async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => {
                    keys(&object).into_iter().for_each(|k| queue.add(k));
                    flag.store(true, Ordering::Relaxed);
                }
                Ok(watcher::Event::InitApply(object)) => {
                    keys(&object).into_iter().for_each(|k| queue.add(k));
                }
                Ok(watcher::Event::Init) => flag.store(false, Ordering::Relaxed),
                Ok(watcher::Event::InitDone) => flag.store(true, Ordering::Relaxed),
                Err(e) => {
                    tracing::debug!(error = %e, "watch lost");
                    flag.store(false, Ordering::Relaxed);
                }
            }
            synced.report();
        }
    };
    (store, driver)
}

/// How long [`observed`] waits for the cache before reconciling anyway.
const OBSERVE_WITHIN: Duration = Duration::from_secs(10);

/// Waits (up to 10 s) until `seen` holds: the cache shows a write this controller made.
pub(crate) async fn observed(seen: impl Fn() -> bool) {
    let deadline = Instant::now() + OBSERVE_WITHIN;
    while !seen() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The namespace and name of `object`.
pub(crate) fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The key of the `kind` object that controls `meta`, if one does.
pub(crate) fn controller_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &str,
) -> Option<Key> {
    let owner = crate::pods::controller_of(meta)?;
    (owner.kind == kind && owner.api_version == "apps/v1").then(|| {
        (
            meta.namespace.clone().unwrap_or_default(),
            owner.name.clone(),
        )
    })
}

/// The key of every object in `store` (for watches that wake every owner, such as Nodes).
pub(crate) fn all_keys<K: Resource + Clone>(store: &Store<K>) -> Vec<Key>
where
    K::DynamicType: Eq + Hash + Clone,
{
    let keys: BTreeSet<Key> = store.state().iter().map(|o| key_of(o.meta())).collect();
    keys.into_iter().collect()
}

/// The API's message for a failed request (what kube-controller-manager puts in its Events).
pub(crate) fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        ("default".to_string(), name.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn queue_deduplicates_and_honours_delays() {
        let queue = Queue::default();
        queue.add_after(key("b"), Duration::from_secs(5));
        queue.add(key("a"));
        queue.add(key("a"));
        assert_eq!(queue.next().await, vec![key("a")]);
        let start = Instant::now();
        assert_eq!(queue.next().await, vec![key("b")]);
        assert!(start.elapsed() >= Duration::from_secs(5));
        // Queuing again sooner wins over a later instant.
        queue.add_after(key("c"), Duration::from_secs(60));
        queue.add_after(key("c"), Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(queue.next().await, vec![key("c")]);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
