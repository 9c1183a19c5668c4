//! Reports waiting for the cloud: the latest status of each object and finished pod deletions,
//! kept until the cloud acknowledges them.
//!
//! Producers (the node reporter, pod workers) [`put`](Outbox::put) reports at any time,
//! connected or not; a newer report of the same object replaces the older one (latest wins).
//! The hub sends what is unsent in its session, and sends it again when it stays
//! unacknowledged for [`RESEND_AFTER`]. Kept in memory: a restart reports everything afresh.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::{Message, ObjectRef, StatusReport};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Notify;

/// An unacknowledged report is sent again after this long.
pub const RESEND_AFTER: Duration = Duration::from_secs(3);

/// What the cloud should learn.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The object's current `status`.
    Status(Value),
    /// The pod's containers are gone after its graceful deletion: remove it from the API.
    PodDeleted,
}

#[derive(Debug)]
struct Entry {
    object: ObjectRef,
    generation: u64,
    report: Report,
    /// Session and seq it was last sent with, and when.
    sent: Option<(u64, u64, Instant)>,
}

/// The reports, by object (kind, namespace, name, uid).
#[derive(Debug, Default)]
pub struct Outbox {
    /// A std mutex: held for map operations only, never across an await.
    entries: Mutex<BTreeMap<(String, String, String, String), Entry>>,
    changed: Notify,
}

/// Generations of reports: increasing for the life of the process and, seeded from the clock,
/// across restarts unless the clock goes back.
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).max(0) as u64;
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => prev = actual,
        }
    }
}

fn key(object: &ObjectRef) -> (String, String, String, String) {
    (
        object.kind.clone(),
        object.namespace.clone(),
        object.name.clone(),
        object.uid.clone(),
    )
}

impl Outbox {
    fn entries(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(String, String, String, String), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `report` for `object`, replacing an earlier one. An identical status already
    /// queued is left alone (nothing new to say). A deletion is final: later statuses of that
    /// pod are dropped.
    pub fn put(&self, object: ObjectRef, report: Report) {
        let mut entries = self.entries();
        let k = key(&object);
        if let Some(entry) = entries.get(&k)
            && (entry.report == report || entry.report == Report::PodDeleted)
        {
            return;
        }
        entries.insert(
            k,
            Entry {
                object,
                generation: next_generation(),
                report,
                sent: None,
            },
        );
        drop(entries);
        self.changed.notify_one();
    }

    /// Forgets whatever is queued for `object` (its pod is gone for good).
    pub fn forget(&self, object: &ObjectRef) {
        self.entries().remove(&key(object));
    }

    /// Waits until something is put.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Builds the messages to send now in `session`: reports never sent in it, and those sent
    /// over [`RESEND_AFTER`] ago without an acknowledgement. `next_seq` numbers them.
    pub fn due(&self, session: u64, now: Instant, next_seq: &mut u64) -> Vec<Message> {
        let mut out = Vec::new();
        for entry in self.entries().values_mut() {
            let due = match entry.sent {
                Some((s, _, at)) => s != session || now.duration_since(at) >= RESEND_AFTER,
                None => true,
            };
            if !due {
                continue;
            }
            *next_seq += 1;
            let seq = *next_seq;
            entry.sent = Some((session, seq, now));
            out.push(match &entry.report {
                Report::Status(status) => Message::Status(StatusReport {
                    seq,
                    object: entry.object.clone(),
                    generation: entry.generation,
                    status: serde_json::to_vec(status).unwrap_or_default(),
                }),
                Report::PodDeleted => Message::PodDeleted {
                    seq,
                    object: entry.object.clone(),
                },
            });
        }
        out
    }

    /// When the next resend is due, if anything waits for an acknowledgement.
    pub fn next_resend(&self) -> Option<Instant> {
        self.entries()
            .values()
            .filter_map(|e| e.sent.map(|(_, _, at)| at + RESEND_AFTER))
            .min()
    }

    /// The cloud acknowledged `seqs` of `session`: those reports are done, unless a newer one
    /// replaced them meanwhile.
    pub fn acknowledged(&self, session: u64, seqs: &[u64]) {
        self.entries().retain(|_, entry| {
            !matches!(entry.sent, Some((s, seq, _)) if s == session && seqs.contains(&seq))
        });
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str) -> ObjectRef {
        ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn seqs(messages: &[Message]) -> Vec<u64> {
        messages
            .iter()
            .map(|m| match m {
                Message::Status(s) => s.seq,
                Message::PodDeleted { seq, .. } => *seq,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_latest_report_wins_and_an_ack_clears_it() {
        let outbox = Outbox::default();
        let now = Instant::now();
        let mut seq = 0;
        outbox.put(pod("a"), Report::Status(json!({"phase": "Pending"})));
        outbox.put(pod("a"), Report::Status(json!({"phase": "Running"})));
        let sent = outbox.due(1, now, &mut seq);
        assert_eq!(sent.len(), 1);
        assert!(matches!(&sent[0], Message::Status(s) if s.status == br#"{"phase":"Running"}"#));
        assert!(
            outbox.due(1, now, &mut seq).is_empty(),
            "sent, not yet due again"
        );
        outbox.acknowledged(1, &seqs(&sent));
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_report_replaced_while_in_flight_survives_the_old_ack() {
        let outbox = Outbox::default();
        let now = Instant::now();
        let mut seq = 0;
        outbox.put(pod("a"), Report::Status(json!({"phase": "Pending"})));
        let first = outbox.due(1, now, &mut seq);
        outbox.put(pod("a"), Report::Status(json!({"phase": "Running"})));
        outbox.acknowledged(1, &seqs(&first));
        assert_eq!(outbox.len(), 1);
        let second = outbox.due(1, now, &mut seq);
        assert_eq!(second.len(), 1);
    }

    #[test]
    fn unacknowledged_reports_go_again_after_a_while_and_in_a_new_session() {
        let outbox = Outbox::default();
        let now = Instant::now();
        let mut seq = 0;
        outbox.put(pod("a"), Report::Status(json!({})));
        assert_eq!(outbox.due(1, now, &mut seq).len(), 1);
        assert_eq!(outbox.due(2, now, &mut seq).len(), 1, "new session");
        assert!(outbox.due(2, now, &mut seq).is_empty());
        assert_eq!(outbox.due(2, now + RESEND_AFTER, &mut seq).len(), 1);
        assert_eq!(
            outbox.next_resend(),
            Some(now + RESEND_AFTER + RESEND_AFTER)
        );
    }

    #[test]
    fn a_deletion_is_final() {
        let outbox = Outbox::default();
        let mut seq = 0;
        outbox.put(pod("a"), Report::PodDeleted);
        outbox.put(pod("a"), Report::Status(json!({"phase": "Running"})));
        let sent = outbox.due(1, Instant::now(), &mut seq);
        assert!(matches!(&sent[..], [Message::PodDeleted { .. }]));
    }

    #[test]
    fn generations_increase() {
        let a = next_generation();
        let b = next_generation();
        assert!(b > a);
    }
}
