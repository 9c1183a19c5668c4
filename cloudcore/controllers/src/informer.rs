//! The machinery the DaemonSet, StatefulSet and EndpointSlice controllers share, in the shape of
//! client-go's informers: a reflector-backed cache per watched kind whose events put owner keys
//! on a [`Queue`], the queue itself (deduplicated keys, some due later), the synced flag a
//! controller reports to [`Context::mark_synced`], and [`observed`], which waits until a
//! controller's own write shows in its cache (kube-controller-manager's "expectations": without
//! it, a reconcile that runs before the cache catches up would create the same pod twice).
//!
//! [`SharedInformer`] is the one reflector behind such a cache, and what every controller that
//! follows Pods shares, as client-go's `SharedInformerFactory` shares one informer per kind: one
//! list and one watch of all Pods, one [`Store`] every controller reads, and each watch event
//! handed to every controller's handler. After a restart with many pods, one list instead of
//! one per controller.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{Store, reflector, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
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

/// One event of a watch as a [`SharedInformer`] hands it to its handlers, after its store has
/// applied it: kube-rs' watcher event, or the error that lost the watch.
pub(crate) type WatchEvent<K> = Result<watcher::Event<K>, watcher::Error>;

/// A handler of a [`SharedInformer`]'s events.
type Handler<K> = Box<dyn FnMut(&WatchEvent<K>) + Send>;

/// One reflector of every `K` (one list, then one watch, listing again after a lost watch) and
/// the handlers its events go to, in the order they were added. Handlers are added before
/// [`SharedInformer::run`], which takes the informer, so each one sees the first listing.
pub(crate) struct SharedInformer<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    writer: Writer<K>,
    handlers: Vec<Handler<K>>,
    /// Set once the store has listed; the store's own readiness signal wakes only the last of
    /// several tasks waiting on it, and a shared store has one waiter per controller.
    listed: watch::Sender<bool>,
    /// What is cut from each object before the store and the handlers see it.
    trim: fn(&mut K),
}

impl<K> SharedInformer<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    /// An informer with an empty store and no handler.
    pub(crate) fn new() -> Self {
        SharedInformer {
            writer: Writer::default(),
            handlers: Vec::new(),
            listed: watch::channel(false).0,
            trim: |_| {},
        }
    }

    /// The same informer, cutting `trim` from each object before it is stored or handed on:
    /// for fields no reader of the cache looks at.
    pub(crate) fn trimmed(mut self, trim: fn(&mut K)) -> Self {
        self.trim = trim;
        self
    }

    /// The cache every handler's controller reads (a handle on the one store).
    pub(crate) fn store(&self) -> Store<K> {
        self.writer.as_reader()
    }

    /// The wait for the store's first listing, done once every handler has seen it (wait on
    /// this, not on the store's readiness).
    pub(crate) fn listing(&self) -> Listing {
        Listing(self.listed.subscribe())
    }

    /// Hands every watch event to `handler`.
    pub(crate) fn add_handler(&mut self, handler: impl FnMut(&WatchEvent<K>) + Send + 'static) {
        self.handlers.push(Box::new(handler));
    }

    /// Queues what `keys` returns for each object listed, applied or deleted, and adds the
    /// store as one of `synced`'s caches: unsynced from the start of a listing (or a lost
    /// watch) until the listing is done (or, after a transient error, the API is heard again).
    pub(crate) fn add_keys(
        &mut self,
        queue: Arc<Queue>,
        synced: &Arc<Synced>,
        keys: impl Fn(&K) -> Vec<Key> + Send + 'static,
    ) {
        let flag = synced.cache();
        let synced = synced.clone();
        self.add_handler(move |event| {
            match event {
                Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => {
                    keys(object).into_iter().for_each(|k| queue.add(k));
                    flag.store(true, Ordering::Relaxed);
                }
                Ok(watcher::Event::InitApply(object)) => {
                    keys(object).into_iter().for_each(|k| queue.add(k));
                }
                Ok(watcher::Event::Init) => flag.store(false, Ordering::Relaxed),
                Ok(watcher::Event::InitDone) => flag.store(true, Ordering::Relaxed),
                Err(e) => {
                    tracing::debug!(error = %e, "watch lost");
                    flag.store(false, Ordering::Relaxed);
                }
            }
            synced.report();
        });
    }

    /// Lists and watches `api` into the store and hands each event to every handler; returns
    /// only if the watch stream ends.
    pub(crate) async fn run(self, api: Api<K>) {
        self.dispatch(cached_watch(api, watcher::Config::default()))
            .await;
    }

    /// Applies each of `events` to the store, then hands it to every handler.
    async fn dispatch(self, events: impl Stream<Item = WatchEvent<K>>) {
        let SharedInformer {
            writer,
            mut handlers,
            listed,
            trim,
        } = self;
        let stream = reflector(writer, events.modify(trim));
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            for handler in &mut handlers {
                handler(&event);
            }
            if matches!(event, Ok(watcher::Event::InitDone)) {
                listed.send_replace(true);
            }
        }
    }
}

/// The watch behind a cache: kube-rs' watcher of `api` with its default backoff, each object
/// without its managedFields. No reader of a cache looks at them, and on an object whose
/// status a kubelet (or cloudcore) keeps writing they are a third or more of its size, held
/// once in every cache of the kind.
pub fn cached_watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = WatchEvent<K>> + Send + use<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .modify(|object| object.meta_mut().managed_fields = None)
}

/// What the shared Pod cache leaves out: the volumes. No controller reads a cached pod's volumes
/// (the StatefulSet controller adds its claims' volumes to the pods it builds, not to cached
/// ones), and k8s-openapi's `Volume` is 3.2 KiB inline, every volume source an `Option` field:
/// a pod with a ConfigMap and a Secret volume held 6.4 KiB of them in the cache.
pub(crate) fn trim_pod(pod: &mut k8s_openapi::api::core::v1::Pod) {
    if let Some(spec) = &mut pod.spec {
        spec.volumes = None;
    }
}

/// The wait for a [`SharedInformer`]'s first listing; every waiter wakes.
#[derive(Debug, Clone)]
pub(crate) struct Listing(watch::Receiver<bool>);

/// The informer stopped before its store had listed.
#[derive(Debug, thiserror::Error)]
#[error("the informer stopped before it listed")]
pub(crate) struct Stopped;

impl Listing {
    /// Returns once the store has listed (at once if it has).
    pub(crate) async fn wait(&self) -> Result<(), Stopped> {
        let mut listed = self.0.clone();
        listed
            .wait_for(|l| *l)
            .await
            .map(|_| ())
            .map_err(|_| Stopped)
    }
}

/// A cache of every `K` in `api` of its own and the future that keeps it current: each change
/// calls `keys` and queues what it returns ([`SharedInformer::add_keys`]).
pub(crate) fn watch<K, F>(
    api: Api<K>,
    queue: Arc<Queue>,
    synced: &Arc<Synced>,
    keys: F,
) -> (Store<K>, impl Future<Output = ()> + Send + use<K, F>)
where
    F: Fn(&K) -> Vec<Key> + Send + 'static,
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let mut informer = SharedInformer::new();
    informer.add_keys(queue, synced, keys);
    (informer.store(), informer.run(api))
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
    use std::sync::atomic::AtomicUsize;

    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn key(name: &str) -> Key {
        ("default".to_string(), name.to_string())
    }

    /// A context whose client is never used: these tests feed the informer their own events.
    fn context() -> Arc<Context> {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        Arc::new(Context::new(
            kube::Client::try_from(config).expect("client"),
        ))
    }

    /// A pod in `default` controlled by DaemonSet `owner`.
    fn pod(name: &str, owner: &str) -> Pod {
        let owner = ObjectMeta {
            name: Some(owner.to_string()),
            uid: Some(format!("uid-{owner}")),
            ..ObjectMeta::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some("default".to_string()),
                owner_references: Some(vec![crate::pods::owner_reference(
                    "apps/v1",
                    "DaemonSet",
                    &owner,
                )]),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    /// The keys due in `queue` now (none if nothing is queued).
    async fn due(queue: &Queue) -> Vec<Key> {
        tokio::time::timeout(Duration::from_millis(50), queue.next())
            .await
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn one_event_reaches_every_handler_and_each_queues_its_own_keys() {
        let ctx = context();
        let mut pods = SharedInformer::<Pod>::new();
        // Two controllers, each with its own queue, synced flag and keys; "services" also has
        // a cache of its own that never lists, so it must stay unsynced.
        let (owners, services) = (Arc::new(Queue::default()), Arc::new(Queue::default()));
        let owners_synced = Synced::new(ctx.clone(), "owners");
        let services_synced = Synced::new(ctx.clone(), "services");
        let calls = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let seen = calls.clone();
        pods.add_keys(owners.clone(), &owners_synced, move |pod| {
            seen[0].fetch_add(1, Ordering::Relaxed);
            controller_key(&pod.metadata, "DaemonSet")
                .into_iter()
                .collect()
        });
        let seen = calls.clone();
        pods.add_keys(services.clone(), &services_synced, move |pod| {
            seen[1].fetch_add(1, Ordering::Relaxed);
            vec![(
                "default".to_string(),
                format!("svc-{}", key_of(&pod.metadata).1),
            )]
        });
        let mut never_listed = SharedInformer::<Pod>::new();
        never_listed.add_keys(services.clone(), &services_synced, |_| Vec::new());
        let store = pods.store();
        let listing = pods.listing();

        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(pod("a", "ds-1"))),
            Ok(watcher::Event::InitDone),
        ];
        let (tx, rx) = futures::channel::mpsc::unbounded();
        for event in events {
            tx.unbounded_send(event).expect("send");
        }
        let running = tokio::spawn(pods.dispatch(rx));
        listing.wait().await.expect("listed");
        assert_eq!(due(&owners).await, vec![key("ds-1")]);
        assert_eq!(due(&services).await, vec![key("svc-a")]);
        let synced = ctx.synced();
        assert_eq!(synced.get("owners"), Some(&true));
        assert_eq!(synced.get("services"), Some(&false));

        // One watch event, after the listing: both handlers, one call each.
        tx.unbounded_send(Ok(watcher::Event::Apply(pod("b", "ds-2"))))
            .expect("send");
        drop(tx);
        running.await.expect("dispatch");
        assert_eq!(due(&owners).await, vec![key("ds-2")]);
        assert_eq!(due(&services).await, vec![key("svc-b")]);
        assert_eq!(calls[0].load(Ordering::Relaxed), 2);
        assert_eq!(calls[1].load(Ordering::Relaxed), 2);
        // Both read the one store the events went into.
        let mut names: Vec<String> = store
            .state()
            .iter()
            .map(|p| key_of(&p.metadata).1)
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
    }

    #[tokio::test]
    async fn every_waiter_wakes_when_the_shared_store_has_listed() {
        let pods = SharedInformer::<Pod>::new();
        let listing = pods.listing();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let listing = listing.clone();
                tokio::spawn(async move { listing.wait().await.is_ok() })
            })
            .collect();
        // The waiters are parked before the listing ends.
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        let events = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(pod("a", "ds-1"))),
            Ok(watcher::Event::InitDone),
        ]);
        pods.dispatch(events).await;
        for waiter in waiters {
            let listed = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("every waiter wakes")
                .expect("waiter");
            assert!(listed);
        }
    }

    #[tokio::test]
    async fn a_trimmed_informer_stores_and_hands_on_the_trimmed_object() {
        let mut pods = SharedInformer::<Pod>::new().trimmed(trim_pod);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler_saw = seen.clone();
        pods.add_handler(move |event| {
            if let Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod)) = event {
                handler_saw
                    .lock()
                    .expect("lock")
                    .push(pod.spec.as_ref().and_then(|s| s.volumes.clone()));
            }
        });
        let store = pods.store();
        let mut with_volume = pod("a", "ds-1");
        with_volume.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("gw".to_string()),
            volumes: Some(vec![k8s_openapi::api::core::v1::Volume {
                name: "config".to_string(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let events = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(with_volume)),
            Ok(watcher::Event::InitDone),
        ]);
        pods.dispatch(events).await;
        let cached = store
            .get(&kube::runtime::reflector::ObjectRef::new("a").within("default"))
            .expect("cached");
        let spec = cached.spec.as_ref().expect("spec");
        assert_eq!(spec.volumes, None);
        assert_eq!(spec.node_name.as_deref(), Some("gw"), "the rest is kept");
        assert_eq!(*seen.lock().expect("lock"), vec![None]);
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
