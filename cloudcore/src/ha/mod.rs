//! Several cloudcore replicas against one real cluster (kube mode): who does the once-only
//! work ([`lease`], a coordination.k8s.io Lease as client-go's leader election holds it), and
//! which replica holds each edge's session ([`sessions`], an annotation on the Node, watched by
//! every replica). Embedded mode is one process and uses none of this. See docs/scale.md
//! ("Several replicas").

pub mod lease;
pub mod sessions;

use std::time::Duration;

/// Default name of the leader-election Lease (`--leader-elect-lease`).
pub const DEFAULT_LEASE_NAME: &str = "cloudcore";

/// Leader election as client-go's defaults: a holder that stops renewing is replaced after
/// `lease_duration`; the holder gives up if it could not renew for `renew_deadline`; every
/// replica tries (and the holder renews) every `retry_period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for ElectionTiming {
    fn default() -> Self {
        ElectionTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether this replica competes for the once-only work (`--leader-elect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    /// Hold the Lease `name` in `namespace` to run the once-only work.
    Lease {
        name: String,
        namespace: String,
        timing: ElectionTiming,
    },
    /// `--leader-elect=false`: this replica runs the once-only work unconditionally (one
    /// replica only; two would both write).
    Disabled,
}

/// This replica among others (kube mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaSettings {
    /// `--replica-id`: the holder identity in the Lease and the session owner on Nodes.
    pub replica_id: String,
    pub election: Election,
}

impl HaSettings {
    /// The defaults for a replica called `replica_id`: election on, Lease `cloudcore` in
    /// `namespace`.
    pub fn new(replica_id: String, namespace: String) -> HaSettings {
        HaSettings {
            replica_id,
            election: Election::Lease {
                name: DEFAULT_LEASE_NAME.into(),
                namespace,
                timing: ElectionTiming::default(),
            },
        }
    }
}

/// Metrics of the replica's part among others.
#[derive(Debug, Default)]
pub struct HaMetrics {
    /// 1 while this replica holds the leader-election Lease.
    pub leader: prometheus_client::metrics::gauge::Gauge,
    pub leader_transitions: prometheus_client::metrics::counter::Counter,
    /// Local sessions closed because their node connected to another replica.
    pub sessions_moved: prometheus_client::metrics::counter::Counter,
    /// Kubelet-endpoint connections forwarded to the replica holding the node's session.
    pub streams_forwarded: prometheus_client::metrics::counter::Counter,
}

impl HaMetrics {
    pub(crate) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "cloudcore_leader",
            "1 while this replica holds the leader-election Lease and runs the once-only work",
            self.leader.clone(),
        );
        registry.register(
            "cloudcore_leader_transitions",
            "Times this replica won the leader-election Lease",
            self.leader_transitions.clone(),
        );
        registry.register(
            "cloudcore_sessions_moved",
            "Sessions closed because their node connected to another replica since",
            self.sessions_moved.clone(),
        );
        registry.register(
            "cloudcore_kubelet_forwarded",
            "Kubelet-endpoint connections forwarded to the replica holding the node's session",
            self.streams_forwarded.clone(),
        );
    }
}
