//! Event expiry in the embedded store, as kube-apiserver's `--event-ttl=1h` (docs/events.md).
//!
//! kube-apiserver gives every Event write an etcd lease of one hour, so an Event goes an hour
//! after it was last written. The store keeps no write time, so an Event's age is taken from
//! the latest of its `metadata.creationTimestamp` (the create), `lastTimestamp`, `eventTime`
//! and `series.lastObservedTime` (what a repeat's patch raises). A sweeper deletes, once a
//! minute, every Event older than [`EVENT_TTL`]; a delete is conditional on the resourceVersion
//! it saw, so an Event patched meanwhile stays. Deletions are ordinary ones: watchers see them.

use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use super::store::{ResourceId, Store, StoreError};

/// How long an Event lives after it was last written.
pub const EVENT_TTL: Duration = Duration::from_secs(3600);
/// How often expired Events are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

fn events() -> ResourceId {
    ResourceId {
        group: String::new(),
        resource: "events".into(),
    }
}

fn parse(value: &Value) -> Option<OffsetDateTime> {
    value
        .as_str()
        .and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok())
}

/// When `event` was last written, as far as its fields tell.
fn last_written(event: &Value) -> Option<OffsetDateTime> {
    [
        &event["metadata"]["creationTimestamp"],
        &event["lastTimestamp"],
        &event["eventTime"],
        &event["series"]["lastObservedTime"],
    ]
    .into_iter()
    .filter_map(parse)
    .max()
}

/// Deletes the Events last written more than `ttl` before `now`; returns how many went.
pub fn sweep(store: &Store, ttl: Duration, now: OffsetDateTime) -> Result<usize, StoreError> {
    let r = events();
    let (all, _) = store.list(&r, None)?;
    let mut deleted = 0;
    for event in all {
        let Some(written) = last_written(&event) else {
            continue;
        };
        if now - written <= ttl {
            continue;
        }
        let (Some(namespace), Some(name)) = (
            event["metadata"]["namespace"].as_str(),
            event["metadata"]["name"].as_str(),
        ) else {
            continue;
        };
        let rv = event["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|rv| rv.parse().ok());
        match store.delete(&r, namespace, name, rv) {
            Ok(_) => deleted += 1,
            // Patched (a repeat) or deleted meanwhile: not expired after all, or gone anyway.
            Err(StoreError::Conflict { .. } | StoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Sweeps every [`SWEEP_EVERY`] until cancelled.
pub async fn run(store: Store, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store = store.clone();
        let swept = tokio::task::spawn_blocking(move || {
            sweep(&store, EVENT_TTL, OffsetDateTime::now_utc())
        })
        .await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(deleted = n, "expired events deleted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete expired events; will retry"),
            Err(e) => tracing::warn!(error = %e, "event expiry task failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, created: &str, last: Option<&str>) -> Value {
        let mut e = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
            "involvedObject": {"kind": "Pod", "name": "web", "namespace": "default"},
            "reason": "BackOff",
        });
        if let Some(last) = last {
            e["lastTimestamp"] = json!(last);
        }
        e
    }

    #[test]
    fn events_last_written_over_an_hour_ago_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("api.db"), Default::default()).unwrap();
        let r = events();
        for (name, created, last) in [
            ("old", "2026-12-01T10:00:00Z", Some("2026-12-01T10:30:00Z")),
            (
                "repeated",
                "2026-12-01T09:00:00Z",
                Some("2026-12-01T11:30:00Z"),
            ),
            ("fresh", "2026-12-01T11:10:00Z", None),
            (
                "late-from-an-edge",
                "2026-12-01T11:50:00Z",
                Some("2026-12-01T08:00:00Z"),
            ),
        ] {
            store
                .create(&r, "default", name, event(name, created, last))
                .unwrap();
        }
        let now = OffsetDateTime::parse("2026-12-01T12:00:00Z", &Rfc3339).unwrap();
        assert_eq!(sweep(&store, EVENT_TTL, now).unwrap(), 1);
        let (left, _) = store.list(&r, None).unwrap();
        let names: Vec<&str> = left
            .iter()
            .filter_map(|e| e["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, ["fresh", "late-from-an-edge", "repeated"]);
        let later = OffsetDateTime::parse("2026-12-01T13:00:01Z", &Rfc3339).unwrap();
        assert_eq!(sweep(&store, EVENT_TTL, later).unwrap(), 3);
    }
}
