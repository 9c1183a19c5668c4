//! The kubelet's Events about this node's pods, on their way to the cloud (docs/events.md).
//!
//! Pod workers [`Events::record`] what happens (Pulling, Failed, BackOff, Started, ...); a
//! session takes them ([`Events::take`]) and sends them in `EventReport`s to a cloud that speaks
//! protocol 1.4. Events are best effort, so the buffer is small, in memory, and never in the
//! way of status reports or the durable outbox:
//!
//! - **aggregated**: a repeat of an event still waiting (same object, field path, type, reason
//!   and message) raises its count and last timestamp instead of taking another slot;
//! - **rate limited**: a token bucket per object as client-go's spam filter (burst 25, one more
//!   every 5 minutes); an event it refuses is dropped;
//! - **bounded**: at most [`DEFAULT_CAPACITY`] events wait; beyond that the one whose last
//!   occurrence is the oldest is dropped, so after a long partition the newest are delivered.
//!
//! Nothing is written to `edge.db`: events lost in a restart are a loss the kubelet's recorder
//! has as well, and the store's writes stay for what must survive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::{EdgeEvent, EventType, ObjectRef};
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Events waiting for the cloud at most.
pub const DEFAULT_CAPACITY: usize = 512;
/// Events one object may have recorded at once.
pub const SPAM_BURST: f64 = 25.0;
/// One more is allowed this often.
pub const SPAM_REFILL_EVERY: Duration = Duration::from_secs(300);
/// Objects whose buckets are remembered at most (the least recently used go first).
const BUCKETS: usize = 4096;

/// An event waiting to be sent.
#[derive(Debug, Clone)]
struct Waiting {
    event: EdgeEvent,
    /// When it was last recorded (monotonic), for dropping the oldest.
    last: Instant,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
struct Buffer {
    waiting: Vec<Waiting>,
    capacity: usize,
    buckets: HashMap<String, Bucket>,
}

/// The edge's event buffer; shared by the pod workers (writers) and the session (reader).
#[derive(Debug)]
pub struct Events {
    /// A std mutex: held only to change the buffer, never across an await.
    buffer: Mutex<Buffer>,
    changed: Notify,
    metrics: Arc<Metrics>,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Cuts `message` to the protocol's limit on a character boundary.
fn bounded_message(mut message: String) -> String {
    let max = proto::message::MAX_EVENT_MESSAGE_LEN;
    if message.len() > max {
        let mut end = max - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

impl Events {
    /// An empty buffer of `capacity` events.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Events {
            buffer: Mutex::new(Buffer {
                waiting: Vec::new(),
                capacity: capacity.max(1),
                buckets: HashMap::new(),
            }),
            changed: Notify::new(),
            metrics,
        })
    }

    /// Records that `reason` happened to `object` (a Pod with its uid, or the Node), at
    /// `field_path` (`spec.containers{app}`, or empty). Never waits.
    pub fn record(
        &self,
        object: &ObjectRef,
        field_path: &str,
        type_: EventType,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.record_at(
            object,
            field_path,
            type_,
            reason,
            message.into(),
            Instant::now(),
            now_ms(),
        );
    }

    // The event's parts and both clocks; a struct would exist only for this call.
    #[allow(clippy::too_many_arguments)]
    fn record_at(
        &self,
        object: &ObjectRef,
        field_path: &str,
        type_: EventType,
        reason: &str,
        message: String,
        now: Instant,
        now_ms: i64,
    ) {
        let message = bounded_message(message);
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics.events_recorded.inc();
        // A repeat of one still waiting: counted on it, and it is the newest now.
        if let Some(i) = buffer.waiting.iter().position(|w| {
            w.event.object == *object
                && w.event.field_path == field_path
                && w.event.type_ == type_
                && w.event.reason == reason
                && w.event.message == message
        }) {
            let mut w = buffer.waiting.remove(i);
            w.event.count = w.event.count.saturating_add(1);
            w.event.last_timestamp_ms = now_ms;
            w.last = now;
            buffer.waiting.push(w);
            return;
        }
        let spam_key = format!(
            "{}/{}/{}/{}",
            object.kind, object.namespace, object.name, object.uid
        );
        if !buffer.allow(spam_key, now) {
            self.metrics.event_dropped("rate_limited");
            return;
        }
        if buffer.waiting.len() >= buffer.capacity {
            // The oldest goes: the newest tell what is happening now.
            buffer.waiting.remove(0);
            self.metrics.event_dropped("buffer_full");
        }
        buffer.waiting.push(Waiting {
            event: EdgeEvent {
                object: object.clone(),
                field_path: field_path.to_string(),
                type_,
                reason: reason.to_string(),
                message,
                count: 1,
                first_timestamp_ms: now_ms,
                last_timestamp_ms: now_ms,
            },
            last: now,
        });
        self.metrics
            .events_buffered
            .set(buffer.waiting.len() as i64);
        drop(buffer);
        self.changed.notify_one();
    }

    /// Takes up to `max` waiting events, oldest first.
    pub fn take(&self, max: usize) -> Vec<EdgeEvent> {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let n = buffer.waiting.len().min(max);
        let taken: Vec<EdgeEvent> = buffer.waiting.drain(..n).map(|w| w.event).collect();
        self.metrics
            .events_buffered
            .set(buffer.waiting.len() as i64);
        taken
    }

    /// Puts back events that were sent but never confirmed (the session ended first), as the
    /// oldest: each merges into a waiting repeat of itself, and the bound drops the oldest.
    pub fn requeue(&self, events: Vec<EdgeEvent>) {
        if events.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let mut front = Vec::new();
        for event in events {
            if let Some(w) = buffer.waiting.iter_mut().find(|w| same(&w.event, &event)) {
                w.event.count = w.event.count.saturating_add(event.count);
                w.event.first_timestamp_ms =
                    w.event.first_timestamp_ms.min(event.first_timestamp_ms);
                continue;
            }
            if let Some(w) = front
                .iter_mut()
                .find(|w: &&mut Waiting| same(&w.event, &event))
            {
                w.event.count = w.event.count.saturating_add(event.count);
                w.event.last_timestamp_ms = w.event.last_timestamp_ms.max(event.last_timestamp_ms);
                continue;
            }
            front.push(Waiting { event, last: now });
        }
        front.append(&mut buffer.waiting);
        let over = front.len().saturating_sub(buffer.capacity);
        if over > 0 {
            front.drain(..over);
            for _ in 0..over {
                self.metrics.event_dropped("buffer_full");
            }
        }
        buffer.waiting = front;
        self.metrics
            .events_buffered
            .set(buffer.waiting.len() as i64);
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when an event was recorded since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Whether `a` and `b` are the same event (a repeat), whatever their counts and times.
fn same(a: &EdgeEvent, b: &EdgeEvent) -> bool {
    a.object == b.object
        && a.field_path == b.field_path
        && a.type_ == b.type_
        && a.reason == b.reason
        && a.message == b.message
}

impl Buffer {
    /// The spam filter: takes a token of `key`'s bucket if it has one.
    fn allow(&mut self, key: String, now: Instant) -> bool {
        if !self.buckets.contains_key(&key)
            && self.buckets.len() >= BUCKETS
            && let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone())
        {
            self.buckets.remove(&oldest);
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: SPAM_BURST,
            last: now,
        });
        let refill = now.saturating_duration_since(bucket.last).as_secs_f64()
            / SPAM_REFILL_EVERY.as_secs_f64();
        bucket.tokens = (bucket.tokens + refill).min(SPAM_BURST);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> ObjectRef {
        ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn events(capacity: usize) -> (Arc<Events>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (Events::new(capacity, metrics.clone()), metrics)
    }

    #[test]
    fn a_repeat_waiting_to_be_sent_raises_its_count() {
        let (events, _) = events(8);
        let start = Instant::now();
        let web = pod("web");
        for i in 0..3 {
            events.record_at(
                &web,
                "spec.containers{app}",
                EventType::Normal,
                "BackOff",
                "Back-off pulling image \"x\"".into(),
                start + Duration::from_secs(i),
                1000 + i as i64 * 1000,
            );
        }
        events.record_at(
            &web,
            "spec.containers{app}",
            EventType::Warning,
            "Failed",
            "Error: ImagePullBackOff".into(),
            start,
            5000,
        );
        let sent = events.take(10);
        assert_eq!(sent.len(), 2, "{sent:?}");
        let backoff = sent.iter().find(|e| e.reason == "BackOff").unwrap();
        assert_eq!(backoff.count, 3);
        assert_eq!(backoff.first_timestamp_ms, 1000);
        assert_eq!(backoff.last_timestamp_ms, 3000);
        assert_eq!(backoff.field_path, "spec.containers{app}");
        assert!(events.is_empty(), "taken events leave the buffer");
        // Once sent, a repeat is a new entry (the cloud adds its count to the Event).
        events.record_at(
            &web,
            "spec.containers{app}",
            EventType::Normal,
            "BackOff",
            "Back-off pulling image \"x\"".into(),
            start,
            6000,
        );
        assert_eq!(events.take(10)[0].count, 1);
    }

    #[test]
    fn the_buffer_keeps_its_bound_dropping_the_oldest() {
        let (events, metrics) = events(4);
        let start = Instant::now();
        for i in 0..10u64 {
            events.record_at(
                &pod(&format!("p{i}")),
                "",
                EventType::Warning,
                "FailedCreatePodSandBox",
                format!("attempt {i}"),
                start + Duration::from_secs(i),
                i as i64,
            );
            assert!(events.len() <= 4);
        }
        let kept: Vec<String> = events.take(100).into_iter().map(|e| e.message).collect();
        assert_eq!(kept, ["attempt 6", "attempt 7", "attempt 8", "attempt 9"]);
        let text = metrics.render();
        assert!(
            text.contains("edgecore_events_dropped_total{reason=\"buffer_full\"} 6"),
            "{text}"
        );
        // A repeat of an old one makes it the newest: it survives the next drop.
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            events.record_at(
                &pod(name),
                "",
                EventType::Normal,
                "Pulled",
                "x".into(),
                start,
                i as i64,
            );
        }
        events.record_at(
            &pod("a"),
            "",
            EventType::Normal,
            "Pulled",
            "x".into(),
            start,
            10,
        );
        events.record_at(
            &pod("e"),
            "",
            EventType::Normal,
            "Pulled",
            "x".into(),
            start,
            11,
        );
        let names: Vec<String> = events
            .take(100)
            .into_iter()
            .map(|e| e.object.name)
            .collect();
        assert_eq!(names, ["c", "d", "a", "e"]);
    }

    #[test]
    fn each_object_may_record_a_burst_of_25_then_one_per_five_minutes() {
        let (events, metrics) = events(1000);
        let start = Instant::now();
        for i in 0..30 {
            events.record_at(
                &pod("web"),
                "",
                EventType::Warning,
                "Unhealthy",
                format!("Liveness probe failed: {i}"),
                start,
                i,
            );
        }
        assert_eq!(events.len(), 25);
        events.record_at(
            &pod("db"),
            "",
            EventType::Warning,
            "Unhealthy",
            "other object".into(),
            start,
            30,
        );
        assert_eq!(events.len(), 26, "another object has its own bucket");
        let later = start + SPAM_REFILL_EVERY;
        events.record_at(
            &pod("web"),
            "",
            EventType::Warning,
            "Unhealthy",
            "after 5 min".into(),
            later,
            31,
        );
        events.record_at(
            &pod("web"),
            "",
            EventType::Warning,
            "Unhealthy",
            "one too many".into(),
            later,
            32,
        );
        assert_eq!(events.len(), 27);
        assert!(
            metrics
                .render()
                .contains("edgecore_events_dropped_total{reason=\"rate_limited\"} 6")
        );
    }

    #[test]
    fn unconfirmed_events_go_back_as_the_oldest_within_the_bound() {
        let (events, metrics) = events(3);
        let start = Instant::now();
        let record = |name: &str, reason: &str, ms: i64| {
            events.record_at(
                &pod(name),
                "",
                EventType::Normal,
                reason,
                "m".into(),
                start,
                ms,
            )
        };
        record("a", "Started", 1);
        record("b", "Started", 2);
        let sent = events.take(10);
        record("b", "Started", 3);
        record("c", "Started", 4);
        events.requeue(sent);
        let back: Vec<(String, u32, i64)> = events
            .take(10)
            .into_iter()
            .map(|e| (e.object.name, e.count, e.first_timestamp_ms))
            .collect();
        assert_eq!(
            back,
            [("a".into(), 1, 1), ("b".into(), 2, 2), ("c".into(), 1, 4)],
            "the unconfirmed b merged into its waiting repeat"
        );
        record("d", "Started", 5);
        record("e", "Started", 6);
        record("f", "Started", 7);
        let sent = events.take(10);
        record("g", "Started", 8);
        events.requeue(sent);
        let names: Vec<String> = events.take(10).into_iter().map(|e| e.object.name).collect();
        assert_eq!(names, ["e", "f", "g"], "the oldest went over the bound");
        assert!(
            metrics
                .render()
                .contains("edgecore_events_dropped_total{reason=\"buffer_full\"} 1")
        );
    }

    #[test]
    fn long_messages_are_cut_to_the_protocol_limit() {
        let cut = bounded_message("é".repeat(1000));
        assert!(cut.len() <= proto::message::MAX_EVENT_MESSAGE_LEN);
        assert!(cut.ends_with("..."));
    }
}
