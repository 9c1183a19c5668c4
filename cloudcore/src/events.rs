//! Edges' events (docs/events.md): each `EventReport` an edge sends is checked like its status
//! reports (only its own pods, by uid, and its own Node; anything else refused and counted) and
//! written through the one Event recorder as the kubelet on that node (`source.component`
//! `kubelet`, `source.host` the session's node name), in both control-plane modes.

use std::sync::OnceLock;

use controllers::events::{EventType, Occurrence, Recorder, RecorderMetrics};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proto::EdgeEvent;
use proto::sync::ObjectKey;

use crate::downstream::Downstream;

/// The component edges' events are written as.
pub const KUBELET: &str = "kubelet";

/// How long an edge's events wait before they are written. An edge sends the events of a
/// change (a container created and started) at once and its status report a few milliseconds
/// later, once the report is on its disk; written first, three Event creates would stand
/// between the report and the API server's storage (measured on the real API server: the
/// status PATCH took 7.6 ms behind them instead of ~5). Events are best effort and nobody waits
/// for them, so the status goes first (docs/events.md).
pub const EDGE_EVENTS_DEFER: std::time::Duration = std::time::Duration::from_millis(100);

/// Metrics of events: what edges sent, what was refused, and the recorder's writes and drops.
#[derive(Debug, Default)]
pub struct EventMetrics {
    /// Events edges sent (before the checks).
    pub received: Counter,
    refused: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// The recorder's counters (`cloudcore_events_written_total`, `..._dropped_total`).
    pub recorder: RecorderMetrics,
}

impl EventMetrics {
    /// Adds the metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cloudcore_edge_events_received",
            "Events edges sent, before the node-scope checks",
            self.received.clone(),
        );
        registry.register(
            "cloudcore_edge_events_refused",
            "Events from edges refused: about an object not bound to the node (forbidden), another incarnation of a pod (uid_mismatch)",
            self.refused.clone(),
        );
        self.recorder.register(registry);
    }

    fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Events refused so far for `reason`.
    pub fn refused_total(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&vec![("reason", reason)]).get()
    }
}

/// Where edges' events go: the recorder, once cloudcore has its API client.
#[derive(Debug, Default)]
pub struct EdgeEvents {
    recorder: OnceLock<Recorder>,
}

impl EdgeEvents {
    /// Writes accepted events through `recorder` (as [`KUBELET`], each
    /// [`EDGE_EVENTS_DEFER`] after it came) from now on; until this is called they are
    /// checked and dropped.
    pub fn connect(&self, recorder: &Recorder) {
        let _ = self
            .recorder
            .set(recorder.for_component(KUBELET).deferred(EDGE_EVENTS_DEFER));
    }

    /// Checks `events` from `node` against what it may report and records the rest. Returns
    /// how many were refused.
    pub fn submit(
        &self,
        downstream: &Downstream,
        metrics: &EventMetrics,
        node: &str,
        events: Vec<EdgeEvent>,
    ) -> usize {
        metrics.received.inc_by(events.len() as u64);
        let now = Timestamp::now();
        let recorder = self.recorder.get().map(|r| r.on_host(node));
        let mut refused = 0;
        for event in events {
            let key = ObjectKey::of(&event.object);
            let allowed = match event.object.kind.as_str() {
                "Pod" | "Node" => downstream.reportable_uid(node, &key),
                _ => None,
            };
            let Some(uid) = allowed else {
                metrics.refused("forbidden");
                refused += 1;
                tracing::debug!(object = %key, reason = %event.reason, "refusing an event about an object not bound to the node");
                continue;
            };
            let uid = match event.object.kind.as_str() {
                // The kubelet's Node events carry the node's name as uid.
                "Node" => node.to_string(),
                _ if event.object.uid.is_empty() || event.object.uid != uid => {
                    metrics.refused("uid_mismatch");
                    refused += 1;
                    continue;
                }
                _ => uid,
            };
            let Some(recorder) = &recorder else { continue };
            recorder.record(occurrence(event, uid, now));
        }
        if refused > 0 {
            tracing::warn!(
                node.name = node,
                refused,
                "refused events about objects the node may not report on"
            );
        }
        refused
    }
}

/// A millisecond timestamp from an edge, or `now` when it is unusable or in the future (a
/// gateway clock ahead of the cloud's).
fn edge_time(ms: i64, now: Timestamp) -> Timestamp {
    match Timestamp::from_millisecond(ms) {
        Ok(t) if ms > 0 && t <= now => t,
        _ => now,
    }
}

fn occurrence(event: EdgeEvent, uid: String, now: Timestamp) -> Occurrence {
    let last = edge_time(event.last_timestamp_ms, now);
    let first = edge_time(event.first_timestamp_ms, now).min(last);
    let namespace = (!event.object.namespace.is_empty()).then_some(event.object.namespace);
    Occurrence {
        object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some(event.object.kind),
            namespace,
            name: Some(event.object.name),
            uid: Some(uid),
            field_path: (!event.field_path.is_empty()).then_some(event.field_path),
            ..ObjectReference::default()
        },
        type_: match event.type_ {
            proto::EventType::Normal => EventType::Normal,
            proto::EventType::Warning => EventType::Warning,
        },
        reason: event.reason,
        message: event.message,
        count: i32::try_from(event.count).unwrap_or(i32::MAX),
        first_timestamp: first,
        last_timestamp: last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, name: &str, uid: &str, first: i64, last: i64) -> EdgeEvent {
        EdgeEvent {
            object: proto::ObjectRef {
                kind: kind.into(),
                namespace: if kind == "Pod" {
                    "default".into()
                } else {
                    String::new()
                },
                name: name.into(),
                uid: uid.into(),
            },
            field_path: "spec.containers{app}".into(),
            type_: proto::EventType::Warning,
            reason: "BackOff".into(),
            message: "Back-off".into(),
            count: 3,
            first_timestamp_ms: first,
            last_timestamp_ms: last,
        }
    }

    #[test]
    fn edge_timestamps_are_kept_unless_unusable_or_ahead_of_the_cloud() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let o = occurrence(
            event("Pod", "web", "u1", 1_799_999_990_000, 1_799_999_995_000),
            "u1".into(),
            now,
        );
        assert_eq!(o.first_timestamp.as_second(), 1_799_999_990);
        assert_eq!(o.last_timestamp.as_second(), 1_799_999_995);
        assert_eq!(o.count, 3);
        assert_eq!(o.object.field_path.as_deref(), Some("spec.containers{app}"));
        assert_eq!(o.object.namespace.as_deref(), Some("default"));
        let ahead = occurrence(
            event("Pod", "web", "u1", 0, 1_900_000_000_000),
            "u1".into(),
            now,
        );
        assert_eq!(ahead.last_timestamp, now);
        assert_eq!(ahead.first_timestamp, now);
        let node = occurrence(event("Node", "gw", "", 1, 1), "gw".into(), now);
        assert_eq!(node.object.namespace, None);
        assert_eq!(node.object.uid.as_deref(), Some("gw"));
    }
}
