//! cloudcore's Prometheus metrics; `daemon::http` serves them with the health endpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type ReasonFamily = Family<Vec<(&'static str, &'static str)>, Counter>;

/// Metrics of the downstream sync to edges and of what edges may not do.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    objects_sent: ReasonFamily,
    resync_objects: ReasonFamily,
    pub resyncs: Counter,
    pub retransmits: Counter,
    refused: ReasonFamily,
    /// Sessions waiting for a resync slot.
    pub resyncs_waiting: Gauge,
}

impl SyncMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "cloudcore_sync_objects_sent",
            "Object messages sent to edges, by operation",
            self.objects_sent.clone(),
        );
        registry.register(
            "cloudcore_sync_resync_objects",
            "Objects a (re)connecting edge lacked or held too many, as planned from its inventory, by operation",
            self.resync_objects.clone(),
        );
        registry.register(
            "cloudcore_sync_resyncs",
            "Edge sessions that started a resync",
            self.resyncs.clone(),
        );
        registry.register(
            "cloudcore_sync_retransmits",
            "Object messages sent again after no acknowledgement",
            self.retransmits.clone(),
        );
        registry.register(
            "cloudcore_sync_refused",
            "Edge requests refused by node-scoped authorization or protocol checks, by reason",
            self.refused.clone(),
        );
        registry.register(
            "cloudcore_sync_resyncs_waiting",
            "Edge sessions waiting for a resync slot",
            self.resyncs_waiting.clone(),
        );
    }

    /// Counts a resync plan.
    pub fn record_resync(&self, plan: &proto::sync::ResyncPlan) {
        self.resyncs.inc();
        self.resync_objects
            .get_or_create(&vec![("op", "upsert")])
            .inc_by(plan.upserts as u64);
        self.resync_objects
            .get_or_create(&vec![("op", "delete")])
            .inc_by(plan.deletes as u64);
    }

    /// Counts what a peer sent between two snapshots of its counters.
    pub fn record_sent(&self, before: proto::sync::PeerStats, after: proto::sync::PeerStats) {
        let upserts = after.upserts_sent - before.upserts_sent;
        let deletes = after.deletes_sent - before.deletes_sent;
        if upserts > 0 {
            self.objects_sent
                .get_or_create(&vec![("op", "upsert")])
                .inc_by(upserts);
        }
        if deletes > 0 {
            self.objects_sent
                .get_or_create(&vec![("op", "delete")])
                .inc_by(deletes);
        }
        self.retransmits
            .inc_by(after.retransmits - before.retransmits);
    }

    /// Counts a refused edge request.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&vec![("reason", reason)]).inc();
    }
}

/// Metrics of service-account tokens issued for edge pods (`crate::tokens`).
#[derive(Debug, Default)]
pub struct TokenMetrics {
    /// Tokens the API issued and cloudcore passed to an edge.
    pub issued: Counter,
    refused: ReasonFamily,
}

impl TokenMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "cloudcore_tokens_issued",
            "Service-account tokens issued through the TokenRequest API for edge pods",
            self.issued.clone(),
        );
        registry.register(
            "cloudcore_token_refusals",
            "Edge token requests refused (node scope, embedded mode, API errors, too many at once), by reason",
            self.refused.clone(),
        );
    }

    /// Counts a token request that got no token.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&vec![("reason", reason)]).inc();
    }
}

/// Metrics of streams to edge pods (`crate::streams`).
#[derive(Debug, Default)]
pub struct StreamMetrics {
    open: Family<Vec<(&'static str, &'static str)>, Gauge>,
    total: ReasonFamily,
}

impl StreamMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "cloudcore_streams_open",
            "Streams to edge pods open now (logs, exec, attach, port-forward, stats), by kind",
            self.open.clone(),
        );
        registry.register(
            "cloudcore_streams",
            "Streams to edge pods asked for, by kind and outcome (accepted, or why not)",
            self.total.clone(),
        );
    }

    /// The open-streams gauge of `kind`.
    pub fn open(&self, kind: &'static str) -> Gauge {
        self.open.get_or_create(&vec![("kind", kind)]).clone()
    }

    /// Counts one attempt to open a stream of `kind`.
    pub fn outcome(&self, kind: &'static str, outcome: &'static str) {
        self.total
            .get_or_create(&vec![("kind", kind), ("outcome", outcome)])
            .inc();
    }
}

/// Metrics of the autonomy controller (`crate::autonomy`).
#[derive(Debug, Default)]
pub struct AutonomyMetrics {
    /// Pods whose unreachable/not-ready tolerations were written.
    pub toleration_patches: Counter,
    /// Toleration writes that failed (retried in a later round).
    pub toleration_patch_failures: Counter,
    /// Pods deleted by the embedded taint-eviction pass.
    pub evictions: Counter,
}

impl AutonomyMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "cloudcore_autonomy_toleration_patches",
            "Edge pods whose unreachable/not-ready tolerations were set to their autonomy duration",
            self.toleration_patches.clone(),
        );
        registry.register(
            "cloudcore_autonomy_toleration_patch_failures",
            "Toleration writes for edge pods that failed and wait for a later round",
            self.toleration_patch_failures.clone(),
        );
        registry.register(
            "cloudcore_autonomy_evictions",
            "Pods deleted by the embedded control plane's taint eviction once their tolerations ran out",
            self.evictions.clone(),
        );
    }
}

/// Every metric cloudcore exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connected_edges: Gauge,
    /// Edges refused because the cloud's API store is not the one they synced with.
    pub edges_state_mismatch: Gauge,
    pub joins: Counter,
    join_rejections: ReasonFamily,
    pub reconnects: Counter,
    connection_rejections: ReasonFamily,
    protocol_errors: ReasonFamily,
    pub certificate_renewals: Counter,
    pub revocation_closes: Counter,
    /// Sessions replaced by a peer at another address while two peers share one identity.
    pub identity_conflicts: Counter,
    pub sync: SyncMetrics,
    pub upstream: crate::upstream::UpstreamMetrics,
    pub autonomy: Arc<AutonomyMetrics>,
    pub tokens: TokenMetrics,
    pub streams: StreamMetrics,
    /// Edges' events and the Event recorder (`crate::events`).
    pub events: crate::events::EventMetrics,
    /// Several replicas (kube mode): leadership, moved sessions, forwarded streams.
    pub ha: Arc<crate::ha::HaMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connected_edges: Gauge::default(),
            edges_state_mismatch: Gauge::default(),
            joins: Counter::default(),
            join_rejections: ReasonFamily::default(),
            reconnects: Counter::default(),
            connection_rejections: ReasonFamily::default(),
            protocol_errors: ReasonFamily::default(),
            certificate_renewals: Counter::default(),
            revocation_closes: Counter::default(),
            identity_conflicts: Counter::default(),
            sync: SyncMetrics::default(),
            upstream: crate::upstream::UpstreamMetrics::default(),
            autonomy: Arc::default(),
            tokens: TokenMetrics::default(),
            streams: StreamMetrics::default(),
            events: crate::events::EventMetrics::default(),
            ha: Arc::default(),
            registry: Registry::default(),
        };
        registry.register(
            "cloudcore_connected_edges",
            "Edges with an open tunnel session",
            m.connected_edges.clone(),
        );
        registry.register(
            "cloudcore_edges_state_mismatch",
            "Edges fenced because the API store is not the one they synced with (replaced or gone back in time); they keep their pods and wait for `cloudcore store adopt`",
            m.edges_state_mismatch.clone(),
        );
        registry.register("cloudcore_joins", "Successful joins", m.joins.clone());
        registry.register(
            "cloudcore_join_rejections",
            "Refused joins by reason",
            m.join_rejections.clone(),
        );
        registry.register(
            "cloudcore_reconnects",
            "Sessions opened by nodes that had connected before",
            m.reconnects.clone(),
        );
        registry.register(
            "cloudcore_connection_rejections",
            "Tunnel connections refused before a session started, by reason",
            m.connection_rejections.clone(),
        );
        registry.register(
            "cloudcore_protocol_errors",
            "Sessions closed because the peer broke the protocol, by reason",
            m.protocol_errors.clone(),
        );
        registry.register(
            "cloudcore_certificate_renewals",
            "Node certificates renewed over the tunnel",
            m.certificate_renewals.clone(),
        );
        registry.register(
            "cloudcore_revocation_closes",
            "Live sessions closed because their certificate was revoked",
            m.revocation_closes.clone(),
        );
        registry.register(
            "cloudcore_identity_conflicts",
            "Sessions replaced by a peer at another address while two peers use one node identity (a copied data dir)",
            m.identity_conflicts.clone(),
        );
        m.sync.register(&mut registry);
        m.autonomy.register(&mut registry);
        m.tokens.register(&mut registry);
        m.streams.register(&mut registry);
        m.events.register(&mut registry);
        m.ha.register(&mut registry);
        registry.register(
            "cloudcore_status_writes",
            "Status reports from edges written to the API",
            m.upstream.written.clone(),
        );
        registry.register(
            "cloudcore_status_write_failures",
            "Status reports from edges the API refused or that failed",
            m.upstream.failed.clone(),
        );
        registry.register(
            "cloudcore_status_stale",
            "Status reports dropped as older than one already written",
            m.upstream.stale.clone(),
        );
        registry.register(
            "cloudcore_status_coalesced",
            "Status reports replaced by a newer one of the same object before being written",
            m.upstream.coalesced.clone(),
        );
        registry.register(
            "cloudcore_status_reasserted",
            "Edge statuses queued again because the API's copy drifted from what the edge reported",
            m.upstream.reasserted.clone(),
        );
        registry.register(
            "cloudcore_status_unchanged",
            "Status writes skipped because the API already held what the edge reported",
            m.upstream.unchanged.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn join_rejected(&self, reason: &'static str) {
        self.join_rejections
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn connection_rejected(&self, reason: &'static str) {
        self.connection_rejections
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn protocol_error(&self, reason: &'static str) {
        self.protocol_errors
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Binds the metrics listener, so the caller can log the bound address before serving.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_reason() {
        let m = Metrics::default();
        m.joins.inc();
        m.join_rejected("token_expired");
        m.join_rejected("token_expired");
        m.connected_edges.set(3);
        let text = m.render();
        assert!(text.contains("cloudcore_joins_total 1"), "{text}");
        assert!(
            text.contains("cloudcore_join_rejections_total{reason=\"token_expired\"} 2"),
            "{text}"
        );
        assert!(text.contains("cloudcore_connected_edges 3"), "{text}");
    }
}
