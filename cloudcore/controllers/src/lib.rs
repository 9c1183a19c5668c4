//! The controllers kube-controller-manager runs in a real cluster, for the embedded control
//! plane: Deployments and ReplicaSets ([`deployment`], [`replicaset`]), DaemonSets
//! ([`daemonset`]), StatefulSets ([`statefulset`]), Jobs and CronJobs ([`job`], [`cronjob`]),
//! each namespace's `default` ServiceAccount ([`serviceaccount`]), and the EndpointSlices and
//! Endpoints of Services with a selector ([`endpointslice`]). Each one is a kube-rs
//! client of the API (reflectors and a work queue), in the shape of kube-controller-manager's,
//! and follows its documented semantics; docs/workloads.md says where we differ.
//!
//! In kube mode none of them runs: the cluster's own kube-controller-manager does this work.
//!
//! Shared pieces have one home here: [`pods`] (pods from templates, readiness and availability,
//! owner references, the autonomy rule for pods of disconnected edge nodes), [`events`] (the
//! Event recorder every controller, the scheduler and the edge's events go through) and
//! `informer` (among others, the one Pod informer the controllers share: [`run_all`]).
//!
//! This crate knows nothing of cloudcore: it sees only the Kubernetes API.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod endpointslice;
pub mod events;
pub mod history;
mod informer;
pub mod job;
pub mod pods;
pub mod replicaset;
pub mod serviceaccount;
pub mod statefulset;
pub mod workqueue;

pub use informer::cached_watch;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Node, Pod};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every controller gets: the API client, the Event recorder, and where it reports that
/// its caches have synced (cloudcore's `/readyz` check `controllers`).
#[derive(Clone)]
pub struct Context {
    pub client: kube::Client,
    pub recorder: events::Recorder,
    synced: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("synced", &self.synced())
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `client`; every controller named in [`CONTROLLERS`] starts unsynced.
    pub fn new(client: kube::Client) -> Self {
        let recorder = events::Recorder::new(client.clone(), "controller-manager");
        let synced = CONTROLLERS.iter().map(|name| (*name, false)).collect();
        Context {
            client,
            recorder,
            synced: Arc::new(Mutex::new(synced)),
        }
    }

    /// The same context writing Events through `recorder` (cloudcore shares one recorder's
    /// queue and writer between the scheduler, the controllers and the edges' events).
    pub fn with_recorder(mut self, recorder: events::Recorder) -> Self {
        self.recorder = recorder;
        self
    }

    /// Records that controller `name` has listed everything it watches (or lost its watch and
    /// has not listed again: `false`).
    pub fn mark_synced(&self, name: &'static str, synced: bool) {
        let mut map = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(name, synced);
    }

    /// Each controller and whether its caches are synced.
    pub fn synced(&self) -> BTreeMap<&'static str, bool> {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The controllers [`run_all`] starts, by the name each reports under.
pub const CONTROLLERS: &[&str] = &[
    "deployment",
    "replicaset",
    "daemonset",
    "statefulset",
    "job",
    "cronjob",
    "serviceaccount",
    "endpointslice",
];

/// Starts every controller on `tracker`; they stop when `shutdown` is cancelled. The
/// controllers that follow Pods share one informer of them (`informer::SharedInformer`): one
/// list and one watch of every Pod, however many controllers read it, and one cached copy of
/// each. Those that follow Nodes (Deployment, ReplicaSet, DaemonSet) share one the same way.
pub fn run_all(ctx: Context, tracker: &TaskTracker, shutdown: CancellationToken) {
    let ctx = Arc::new(ctx);
    let mut pods = informer::SharedInformer::<Pod>::new().trimmed(informer::trim_pod);
    let mut nodes = informer::SharedInformer::<Node>::new();
    tracker.spawn(deployment::run(
        ctx.clone(),
        &mut pods,
        &mut nodes,
        shutdown.clone(),
    ));
    tracker.spawn(replicaset::run(
        ctx.clone(),
        &mut pods,
        &mut nodes,
        shutdown.clone(),
    ));
    tracker.spawn(daemonset::run(
        ctx.clone(),
        &mut pods,
        &mut nodes,
        shutdown.clone(),
    ));
    tracker.spawn(statefulset::run(ctx.clone(), &mut pods, shutdown.clone()));
    tracker.spawn(job::run(ctx.clone(), &mut pods, shutdown.clone()));
    tracker.spawn(cronjob::run(ctx.clone(), shutdown.clone()));
    tracker.spawn(serviceaccount::run(ctx.clone(), shutdown.clone()));
    tracker.spawn(endpointslice::run(ctx.clone(), &mut pods, shutdown.clone()));
    // Started once every handler is in, so each controller sees the first listing.
    let pod_api = kube::Api::<Pod>::all(ctx.client.clone());
    let node_api = kube::Api::<Node>::all(ctx.client.clone());
    tracker.spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = futures::future::join(pods.run(pod_api), nodes.run(node_api)) => {}
        }
    });
}
