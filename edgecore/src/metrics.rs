//! edgecore's Prometheus metrics; `daemon::http` serves them with the health endpoints.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every metric edgecore exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// 1 while a tunnel session is up.
    pub cloud_connected: Gauge,
    /// 1 while the cloud's API store is not the one this edge synced with (the edge is
    /// fenced: it keeps its pods and syncs nothing until an operator decides).
    pub cloud_state_mismatch: Gauge,
    pub reconnects: Counter,
    pub connect_failures: Counter,
    pub certificate_renewals: Counter,
    /// When the node certificate in use expires (Unix seconds): alert well before it.
    pub certificate_not_after: Gauge,
    /// Store changes committed from the cloud's object messages.
    pub sync_applied: Counter,
    /// Object messages that changed nothing (duplicates, older versions).
    pub sync_skipped: Counter,
    /// Objects in the local store.
    pub store_objects: Gauge,
    /// Node status reports sent.
    pub status_reports: Counter,
    /// Reports in the outbox not yet acknowledged by the cloud.
    pub outbox_pending: Gauge,
    /// Failed attempts to write the outbox into the store (disk full, I/O errors).
    pub outbox_write_errors: Counter,
    /// Streams from the cloud being served, by kind (`edgecore::streams`).
    streams_open: Family<Vec<(&'static str, &'static str)>, Gauge>,
    /// Events the pod workers recorded (`edgecore::events`), repeats included.
    pub events_recorded: Counter,
    /// Events sent to the cloud (each with its count of repeats).
    pub events_sent: Counter,
    /// Events waiting for the cloud.
    pub events_buffered: Gauge,
    events_dropped: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Property values the mappers reported that changed a twin (`edgecore::devices::twins`).
    pub device_twin_updates: Counter,
    /// Reported values ignored as older than the one held.
    pub device_reports_ignored: Counter,
    /// Device status reports put into the outbox.
    pub device_reports: Counter,
    /// Queries the cluster DNS answered, by result (`edgecore::services::dns`).
    dns_queries: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Transactions the Services data path applied (`edgecore::services::proxy`).
    pub service_rules_syncs: Counter,
    /// Transactions nft refused or that could not run.
    pub service_rules_sync_failures: Counter,
    /// How long the last successful apply took.
    pub service_rules_last_sync_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Service ports the data path sends to at least one endpoint.
    pub services_programmed: Gauge,
    /// 1 while the runtime's container event stream is up, 0 while pods are polled
    /// (`edgecore::pods::pleg`).
    pub runtime_events_subscribed: Gauge,
    /// Subscriptions to the runtime's events that were refused or broke.
    pub runtime_events_failures: Counter,
    /// Lists of the runtime's sandboxes and containers (the relist).
    pub runtime_relists: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let cloud_connected = Gauge::default();
        let cloud_state_mismatch = Gauge::default();
        let reconnects = Counter::default();
        let connect_failures = Counter::default();
        let certificate_renewals = Counter::default();
        let certificate_not_after = Gauge::default();
        let sync_applied = Counter::default();
        let sync_skipped = Counter::default();
        let store_objects = Gauge::default();
        let status_reports = Counter::default();
        let outbox_pending = Gauge::default();
        let outbox_write_errors = Counter::default();
        let streams_open = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        let events_recorded = Counter::default();
        let events_sent = Counter::default();
        let events_buffered = Gauge::default();
        let events_dropped = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "edgecore_events_recorded",
            "Pod events recorded on this node (repeats included)",
            events_recorded.clone(),
        );
        registry.register(
            "edgecore_events_sent",
            "Events sent to the cloud (a repeat counted on a waiting event is sent once)",
            events_sent.clone(),
        );
        registry.register(
            "edgecore_events_buffered",
            "Events waiting for the cloud (in memory, bounded)",
            events_buffered.clone(),
        );
        registry.register(
            "edgecore_events_dropped",
            "Events dropped: rate_limited (per object), buffer_full (the oldest, while offline or while the cloud is older than protocol 1.4)",
            events_dropped.clone(),
        );
        registry.register(
            "edgecore_streams_open",
            "Streams from the cloud being served now (logs, exec, attach, port-forward, stats), by kind",
            streams_open.clone(),
        );
        registry.register(
            "edgecore_sync_applied",
            "Store changes committed from the cloud's object messages",
            sync_applied.clone(),
        );
        registry.register(
            "edgecore_sync_skipped",
            "Object messages that changed nothing (duplicates, older versions)",
            sync_skipped.clone(),
        );
        registry.register(
            "edgecore_store_objects",
            "Objects in the local store",
            store_objects.clone(),
        );
        registry.register(
            "edgecore_status_reports",
            "Status reports sent to the cloud",
            status_reports.clone(),
        );
        registry.register(
            "edgecore_outbox_pending",
            "Status reports and pod deletions not yet acknowledged by the cloud",
            outbox_pending.clone(),
        );
        registry.register(
            "edgecore_outbox_write_errors",
            "Failed attempts to write the status outbox into the store (kept in memory and retried)",
            outbox_write_errors.clone(),
        );
        registry.register(
            "edgecore_cloud_connected",
            "1 while the tunnel to cloudcore is up, else 0",
            cloud_connected.clone(),
        );
        registry.register(
            "edgecore_cloud_state_mismatch",
            "1 while the cloud's API store is not the one this edge synced with (replaced or gone back in time): pods keep running, nothing syncs until an operator adopts or restores (docs/operations.md)",
            cloud_state_mismatch.clone(),
        );
        registry.register(
            "edgecore_reconnects",
            "Tunnel sessions opened after an earlier one was lost",
            reconnects.clone(),
        );
        registry.register(
            "edgecore_connect_failures",
            "Attempts to open a tunnel session that failed",
            connect_failures.clone(),
        );
        registry.register(
            "edgecore_certificate_renewals",
            "Node certificates renewed over the tunnel",
            certificate_renewals.clone(),
        );
        registry.register(
            "edgecore_certificate_not_after_seconds",
            "When the node certificate expires, in Unix seconds (renewed over the tunnel from 70 % of its lifetime)",
            certificate_not_after.clone(),
        );
        let device_twin_updates = Counter::default();
        let device_reports_ignored = Counter::default();
        let device_reports = Counter::default();
        registry.register(
            "edgecore_device_twin_updates",
            "Property values reported by mappers or MQTT clients that changed a device twin (written to edge.db)",
            device_twin_updates.clone(),
        );
        registry.register(
            "edgecore_device_reports_ignored",
            "Reported property values ignored because their timestamp is older than the value held",
            device_reports_ignored.clone(),
        );
        registry.register(
            "edgecore_device_reports",
            "Device status reports put into the outbox for the cloud (coalesced per device and report cycle)",
            device_reports.clone(),
        );
        let dns_queries = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "edgecore_dns_queries",
            "Queries the cluster DNS answered, by result: cluster (from the service table), nxdomain (unknown name of the cluster domain), forwarded (answered upstream), failed (SERVFAIL: no upstream answered), refused (not a query)",
            dns_queries.clone(),
        );
        let service_rules_syncs = Counter::default();
        let service_rules_sync_failures = Counter::default();
        let service_rules_last_sync_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let services_programmed = Gauge::default();
        registry.register(
            "edgecore_service_rules_syncs",
            "Transactions that replaced the Services data path (the nftables table)",
            service_rules_syncs.clone(),
        );
        registry.register(
            "edgecore_service_rules_sync_failures",
            "Transactions of the Services data path that nft refused or that could not run (retried)",
            service_rules_sync_failures.clone(),
        );
        registry.register(
            "edgecore_service_rules_last_sync_seconds",
            "Duration of the last successful apply of the Services data path",
            service_rules_last_sync_seconds.clone(),
        );
        registry.register(
            "edgecore_services_programmed",
            "Service ports the data path sends to at least one ready local endpoint",
            services_programmed.clone(),
        );
        let runtime_events_subscribed = Gauge::default();
        let runtime_events_failures = Counter::default();
        let runtime_relists = Counter::default();
        registry.register(
            "edgecore_runtime_events_subscribed",
            "1 while the runtime's container event stream (CRI GetContainerEvents) is up; 0 while the runtime is relisted every second instead",
            runtime_events_subscribed.clone(),
        );
        registry.register(
            "edgecore_runtime_events_failures",
            "Subscriptions to the runtime's container events that were refused (unsupported) or broke",
            runtime_events_failures.clone(),
        );
        registry.register(
            "edgecore_runtime_relists",
            "Lists of the runtime's sandboxes and containers (every second without events, every 300 s with them)",
            runtime_relists.clone(),
        );
        Metrics {
            runtime_events_subscribed,
            runtime_events_failures,
            runtime_relists,
            registry,
            cloud_connected,
            cloud_state_mismatch,
            reconnects,
            connect_failures,
            certificate_renewals,
            certificate_not_after,
            sync_applied,
            sync_skipped,
            store_objects,
            status_reports,
            outbox_pending,
            outbox_write_errors,
            streams_open,
            events_recorded,
            events_sent,
            events_buffered,
            events_dropped,
            device_twin_updates,
            device_reports_ignored,
            device_reports,
            dns_queries,
            service_rules_syncs,
            service_rules_sync_failures,
            service_rules_last_sync_seconds,
            services_programmed,
        }
    }
}

impl Metrics {
    /// The gauge of streams of `kind` being served.
    pub fn stream_open(&self, kind: &'static str) -> Gauge {
        self.streams_open
            .get_or_create(&vec![("kind", kind)])
            .clone()
    }

    /// Counts an event dropped for `reason`.
    pub fn event_dropped(&self, reason: &'static str) {
        self.events_dropped
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts a query the cluster DNS answered with `result`.
    pub fn dns_query(&self, result: &'static str) {
        self.dns_queries
            .get_or_create(&vec![("result", result)])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_connected_gauge() {
        let m = Metrics::default();
        let text = m.render();
        assert!(text.contains("edgecore_cloud_connected 0"), "{text}");
        m.cloud_connected.set(1);
        m.reconnects.inc();
        let text = m.render();
        assert!(text.contains("edgecore_cloud_connected 1"), "{text}");
        assert!(text.contains("edgecore_reconnects_total 1"), "{text}");
    }
}
