//! The Event recorder: core/v1 Events about an object, written the way client-go's recorder and
//! its `EventCorrelator` write them for the kubelet and kube-controller-manager
//! (docs/events.md).
//!
//! - **Aggregation**: a repeat of the same event (source, involved object with its field path,
//!   type, reason, message) raises `count` and `lastTimestamp` of the Event already written
//!   (a PATCH) instead of creating another.
//! - **Similar events**: once one source has told of 10 different messages with the same reason
//!   about one object within 10 minutes, further ones become a single Event whose message starts
//!   `(combined from similar events): `, counted like a repeat.
//! - **Spam filter**: a token bucket per source and object (burst 25, one more every 5 minutes);
//!   what it refuses is dropped.
//! - **Best effort**: [`Recorder::publish`] never waits for the API. It puts the event in a
//!   bounded queue ([`QUEUE`]) that one writer task drains; a full queue drops the event (counted).
//!   A write that fails is logged at debug level and dropped.
//!
//! [`Correlator`] holds the decisions and no IO, fed with the time, so the rules are unit
//! tested; the writer task applies them to the API. Every [`Recorder`] made from one
//! [`Recorder::new`] (with [`Recorder::for_component`] and [`Recorder::on_host`]) shares the
//! queue, the writer and its caches.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Entries each of the correlator's caches keeps (client-go's `maxLruCacheEntries`).
pub const CACHE_ENTRIES: usize = 4096;
/// Different messages of one reason about one object before they are combined.
pub const AGGREGATE_MAX_EVENTS: usize = 10;
/// How long the different messages are remembered for that count.
pub const AGGREGATE_INTERVAL: Duration = Duration::from_secs(600);
/// The prefix of a combined event's message.
pub const COMBINED_PREFIX: &str = "(combined from similar events): ";
/// Events one source may write about one object at once.
pub const SPAM_BURST: u32 = 25;
/// One more such event is allowed this often.
pub const SPAM_REFILL_EVERY: Duration = Duration::from_secs(300);
/// Events waiting for the writer (client-go's broadcaster queues 1,000).
pub const QUEUE: usize = 1000;

/// `Normal` or `Warning`, the two types kubectl shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    /// The type as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One event to record, possibly standing for several occurrences already counted by its
/// source (an edge aggregates before it sends): `count` of them between the two timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct Occurrence {
    /// The involved object (with its `fieldPath` for a container).
    pub object: ObjectReference,
    pub type_: EventType,
    /// Short, CamelCase: `BackOff`, `Scheduled`.
    pub reason: String,
    /// For humans.
    pub message: String,
    /// At least 1.
    pub count: i32,
    pub first_timestamp: Timestamp,
    pub last_timestamp: Timestamp,
}

impl Occurrence {
    /// One occurrence, now.
    pub fn now(object: &ObjectReference, type_: EventType, reason: &str, message: &str) -> Self {
        let now = Timestamp::now();
        Occurrence {
            object: object.clone(),
            type_,
            reason: reason.to_string(),
            message: message.to_string(),
            count: 1,
            first_timestamp: now,
            last_timestamp: now,
        }
    }
}

/// Who reports an event: `source.component` and `source.host`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// `kubelet`, `default-scheduler`, a controller's name.
    pub component: String,
    /// The node, for the kubelet's events.
    pub host: Option<String>,
}

/// What the recorder did with events, registered by cloudcore as
/// `cloudcore_events_written_total{op}` and `cloudcore_events_dropped_total{reason}`.
#[derive(Debug, Clone, Default)]
pub struct RecorderMetrics {
    written: Family<Vec<(&'static str, &'static str)>, Counter>,
    dropped: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl RecorderMetrics {
    /// Adds the recorder's metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cloudcore_events_written",
            "Events written to the API: created, or patched (a repeat raising count)",
            self.written.clone(),
        );
        registry.register(
            "cloudcore_events_dropped",
            "Events not written: queue_full, rate_limited (the spam filter), api_error",
            self.dropped.clone(),
        );
    }

    fn written(&self, op: &'static str) {
        self.written.get_or_create(&vec![("op", op)]).inc();
    }

    fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Events written so far with `op` (`create` or `patch`).
    pub fn written_total(&self, op: &'static str) -> u64 {
        self.written.get_or_create(&vec![("op", op)]).get()
    }

    /// Events dropped so far for `reason`.
    pub fn dropped_total(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&vec![("reason", reason)]).get()
    }
}

/// What goes through the queue to the writer.
#[derive(Debug)]
enum Item {
    /// Boxed: most of the queue's slots are empty, a record is large. Written no earlier than
    /// the instant (see [`Recorder::deferred`]).
    Record(Box<(Source, Occurrence)>, Option<Instant>),
    /// Answered once everything queued before it is written (tests, shutdown).
    Flush(oneshot::Sender<()>),
}

/// The queue and the writer every recorder of one [`Recorder::new`] shares. The writer task
/// starts with the first event (so a recorder can be built outside a runtime) and ends when
/// the last recorder is dropped.
struct Sink {
    client: kube::Client,
    queue: OnceLock<mpsc::Sender<Item>>,
    metrics: RecorderMetrics,
}

impl Sink {
    fn queue(&self) -> &mpsc::Sender<Item> {
        self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(write_events(self.client.clone(), rx, self.metrics.clone()));
            tx
        })
    }
}

/// Writes Events as one component (`source.component`, e.g. `deployment-controller`), on one
/// host (`source.host`, the node for the kubelet's events).
#[derive(Clone)]
pub struct Recorder {
    sink: Arc<Sink>,
    component: String,
    host: Option<String>,
    /// How long each event waits in the queue before it is written ([`Recorder::deferred`]).
    defer: Duration,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("component", &self.component)
            .field("host", &self.host)
            .field("defer", &self.defer)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder writing as `component` through `client`, with a queue and writer of its own.
    pub fn new(client: kube::Client, component: &str) -> Self {
        Recorder::with_metrics(client, component, RecorderMetrics::default())
    }

    /// A recorder counting in `metrics` (counters already registered by the caller).
    pub fn with_metrics(client: kube::Client, component: &str, metrics: RecorderMetrics) -> Self {
        Recorder {
            sink: Arc::new(Sink {
                client,
                queue: OnceLock::new(),
                metrics,
            }),
            component: component.to_string(),
            host: None,
            defer: Duration::ZERO,
        }
    }

    /// The same recorder writing as another component (each controller has its own name).
    pub fn for_component(&self, component: &str) -> Self {
        Recorder {
            component: component.to_string(),
            ..self.clone()
        }
    }

    /// The same recorder with `source.host` set.
    pub fn on_host(&self, host: &str) -> Self {
        Recorder {
            host: Some(host.to_string()),
            ..self.clone()
        }
    }

    /// The same recorder, whose events wait `defer` in the queue before they are written.
    /// Events are best effort and nobody waits for them; a write that must not queue behind
    /// them (an edge's status report, sent a few milliseconds after the events of the same
    /// change) reaches the API first. The queue stays in order, so events recorded after a
    /// deferred one, through any recorder of this sink, wait for it too.
    pub fn deferred(&self, defer: Duration) -> Self {
        Recorder {
            defer,
            ..self.clone()
        }
    }

    /// The counters of this recorder's writer (shared by every recorder made from it).
    pub fn metrics(&self) -> &RecorderMetrics {
        &self.sink.metrics
    }

    /// Records that `reason` happened to `object`, with a human `message`. Never fails and
    /// never waits for the API: the event is queued for the writer, or dropped (and counted)
    /// when the queue is full.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) {
        self.record(Occurrence::now(object, type_, reason, message));
    }

    /// Records an event with its own count and timestamps (events an edge aggregated), from
    /// this recorder's component and host. Does not wait, as [`Recorder::publish`]. Call it
    /// within a Tokio runtime: the first event starts the writer task.
    pub fn record(&self, occurrence: Occurrence) {
        let source = Source {
            component: self.component.clone(),
            host: self.host.clone(),
        };
        if self
            .sink
            .queue()
            .try_send(Item::Record(
                Box::new((source, occurrence)),
                (!self.defer.is_zero()).then(|| Instant::now() + self.defer),
            ))
            .is_err()
        {
            self.sink.metrics.dropped("queue_full");
        }
    }

    /// Waits until every event queued before this call has been written (or dropped).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.sink.queue().send(Item::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The writer: correlates each queued event and writes what the correlator decides.
async fn write_events(
    client: kube::Client,
    mut queue: mpsc::Receiver<Item>,
    metrics: RecorderMetrics,
) {
    let mut correlator = Correlator::default();
    while let Some(item) = queue.recv().await {
        let (source, occurrence) = match item {
            Item::Record(record, not_before) => {
                if let Some(at) = not_before {
                    tokio::time::sleep_until(at).await;
                }
                *record
            }
            Item::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let Some(write) = correlator.correlate(&source, occurrence, Timestamp::now()) else {
            metrics.dropped("rate_limited");
            continue;
        };
        match apply(&client, &write).await {
            Ok((op, written)) => {
                metrics.written(op);
                correlator.written(&write.key, &written);
            }
            Err(e) => {
                metrics.dropped("api_error");
                correlator.forget(&write.key);
                tracing::debug!(error = %e, reason = write.event.reason.as_deref().unwrap_or_default(), "cannot record event");
            }
        }
    }
}

/// Creates the Event, or patches the existing one for a repeat; a repeat whose Event is gone
/// (expired, deleted) is created again, as client-go does.
async fn apply(client: &kube::Client, write: &Write) -> Result<(&'static str, Event), kube::Error> {
    let namespace = write
        .event
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("default");
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    if write.repeat {
        let name = write.event.metadata.name.as_deref().unwrap_or_default();
        let patch = json!({
            "count": write.event.count,
            "lastTimestamp": write.event.last_timestamp,
            "message": write.event.message,
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(event) => return Ok(("patch", event)),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let mut event = write.event.clone();
    event.metadata.resource_version = None;
    api.create(&PostParams::default(), &event)
        .await
        .map(|e| ("create", e))
}

/// One write the correlator decided on: the whole Event, and whether it repeats one already
/// written under `key` (a patch of its count, lastTimestamp and message).
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The correlator's key of the Event (what repeats of it share).
    pub key: String,
    /// Whether the Event exists already (a patch) or is new (a create).
    pub repeat: bool,
    /// The Event as it should be after the write.
    pub event: Event,
}

/// A map that keeps at most `capacity` entries, evicting the least recently used.
#[derive(Debug)]
struct Lru<V> {
    entries: HashMap<String, (u64, V)>,
    tick: u64,
    capacity: usize,
}

impl<V> Lru<V> {
    fn new(capacity: usize) -> Self {
        Lru {
            entries: HashMap::new(),
            tick: 0,
            capacity,
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(used, v)| {
            *used = tick;
            v
        })
    }

    fn insert(&mut self, key: String, value: V) {
        self.tick += 1;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            // Rare (only when full), so a scan is cheaper than keeping an order.
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (self.tick, value));
    }

    fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

/// The different messages seen for one aggregate key, and when the last came.
#[derive(Debug)]
struct Similar {
    messages: HashSet<String>,
    last: Timestamp,
}

/// An Event already written (or being written) for an event key.
#[derive(Debug, Clone)]
struct Observed {
    name: String,
    count: i32,
    first_timestamp: Timestamp,
}

/// A token bucket of the spam filter.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Timestamp,
}

/// client-go's `EventCorrelator`, without IO: decides for each event whether to create an
/// Event, patch one (a repeat), or drop it (the spam filter).
#[derive(Debug)]
pub struct Correlator {
    similar: Lru<Similar>,
    observed: Lru<Observed>,
    buckets: Lru<Bucket>,
}

impl Default for Correlator {
    fn default() -> Self {
        Correlator {
            similar: Lru::new(CACHE_ENTRIES),
            observed: Lru::new(CACHE_ENTRIES),
            buckets: Lru::new(CACHE_ENTRIES),
        }
    }
}

fn seconds_between(earlier: Timestamp, later: Timestamp) -> f64 {
    (later.as_nanosecond() - earlier.as_nanosecond()) as f64 / 1e9
}

/// The parts of an object reference every key holds.
fn object_key(o: &ObjectReference) -> String {
    [
        o.kind.as_deref(),
        o.namespace.as_deref(),
        o.name.as_deref(),
        o.uid.as_deref(),
        o.api_version.as_deref(),
    ]
    .iter()
    .map(|p| p.unwrap_or_default())
    .collect::<Vec<_>>()
    .join("\u{0}")
}

fn source_key(source: &Source) -> String {
    format!(
        "{}\u{0}{}",
        source.component,
        source.host.as_deref().unwrap_or_default()
    )
}

impl Correlator {
    /// The write for `occurrence` from `source` at `now`, or `None` when the spam filter drops
    /// it.
    pub fn correlate(
        &mut self,
        source: &Source,
        occurrence: Occurrence,
        now: Timestamp,
    ) -> Option<Write> {
        let object = object_key(&occurrence.object);
        let from = source_key(source);
        let field_path = occurrence.object.field_path.clone().unwrap_or_default();
        // Similar events: same source, object, type and reason; different messages.
        let aggregate_key = format!(
            "{from}\u{0}{object}\u{0}{}\u{0}{}",
            occurrence.type_.as_str(),
            occurrence.reason
        );
        let similar = match self.similar.get_mut(&aggregate_key) {
            Some(s) if seconds_between(s.last, now) <= AGGREGATE_INTERVAL.as_secs_f64() => s,
            _ => {
                self.similar.insert(
                    aggregate_key.clone(),
                    Similar {
                        messages: HashSet::new(),
                        last: now,
                    },
                );
                self.similar.get_mut(&aggregate_key)?
            }
        };
        similar.messages.insert(occurrence.message.clone());
        similar.last = now;
        let combined = similar.messages.len() >= AGGREGATE_MAX_EVENTS;
        let (key, message) = if combined {
            // One message makes room, so the set stays at the limit and later ones combine too.
            if let Some(any) = similar.messages.iter().next().cloned() {
                similar.messages.remove(&any);
            }
            (
                aggregate_key,
                format!("{COMBINED_PREFIX}{}", occurrence.message),
            )
        } else {
            (
                format!(
                    "{from}\u{0}{object}\u{0}{field_path}\u{0}{}\u{0}{}\u{0}{}",
                    occurrence.type_.as_str(),
                    occurrence.reason,
                    occurrence.message
                ),
                occurrence.message.clone(),
            )
        };
        // Repeats of one event: the Event written before, with its count raised.
        let count = occurrence.count.max(1);
        let (repeat, name, count, first_timestamp) = match self.observed.get_mut(&key) {
            Some(seen) => {
                seen.count = seen.count.saturating_add(count);
                (true, seen.name.clone(), seen.count, seen.first_timestamp)
            }
            None => {
                let name = format!(
                    "{}.{:x}",
                    occurrence.object.name.as_deref().unwrap_or("unknown"),
                    now.as_nanosecond()
                );
                let first = if combined {
                    now
                } else {
                    occurrence.first_timestamp
                };
                self.observed.insert(
                    key.clone(),
                    Observed {
                        name: name.clone(),
                        count,
                        first_timestamp: first,
                    },
                );
                (false, name, count, first)
            }
        };
        // The spam filter: a bucket per source and object.
        let spam_key = format!("{from}\u{0}{object}");
        let allowed = match self.buckets.get_mut(&spam_key) {
            Some(bucket) => {
                let refill = seconds_between(bucket.last, now) / SPAM_REFILL_EVERY.as_secs_f64();
                bucket.tokens = (bucket.tokens + refill.max(0.0)).min(SPAM_BURST as f64);
                bucket.last = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    true
                } else {
                    false
                }
            }
            None => {
                self.buckets.insert(
                    spam_key,
                    Bucket {
                        tokens: SPAM_BURST as f64 - 1.0,
                        last: now,
                    },
                );
                true
            }
        };
        if !allowed {
            return None;
        }
        let last_timestamp = if combined {
            now
        } else {
            occurrence.last_timestamp
        };
        let namespace = occurrence
            .object
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace),
                ..ObjectMeta::default()
            },
            involved_object: occurrence.object,
            reason: Some(occurrence.reason),
            message: Some(message),
            type_: Some(occurrence.type_.as_str().to_string()),
            count: Some(count),
            first_timestamp: Some(Time(first_timestamp)),
            last_timestamp: Some(Time(last_timestamp)),
            source: Some(EventSource {
                component: Some(source.component.clone()),
                host: source.host.clone(),
            }),
            reporting_component: Some(source.component.clone()),
            reporting_instance: source.host.clone(),
            ..Event::default()
        };
        Some(Write { key, repeat, event })
    }

    /// Records what the API answered for the write under `key` (its name, should it differ).
    pub fn written(&mut self, key: &str, event: &Event) {
        if let (Some(seen), Some(name)) = (self.observed.get_mut(key), &event.metadata.name) {
            seen.name = name.clone();
        }
    }

    /// Forgets the Event under `key` (its write failed): the next repeat creates it anew.
    pub fn forget(&mut self, key: &str) {
        self.observed.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When each request came, and the reason of the event it wrote.
    type Seen = Arc<std::sync::Mutex<Vec<(Instant, String)>>>;

    /// A client whose API server answers every request at once with the Event it was sent,
    /// and notes when each one came and the event's reason.
    fn echo_client() -> (kube::Client, Seen) {
        use http_body_util::BodyExt;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let body = request.into_body().collect().await?.to_bytes();
                let event: Event = serde_json::from_slice(&body)?;
                log.lock()
                    .unwrap()
                    .push((Instant::now(), event.reason.clone().unwrap_or_default()));
                let answer = http::Response::builder()
                    .status(201)
                    .body(http_body_util::Full::new(body))?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(answer)
            }
        });
        (kube::Client::new(service, "default"), seen)
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_event_waits_its_delay_and_what_is_queued_behind_it_waits_too() {
        let (client, seen) = echo_client();
        let recorder = Recorder::new(client, "kubelet");
        let start = Instant::now();
        recorder
            .publish(&pod("a"), EventType::Normal, "Now", "written at once")
            .await;
        recorder.flush().await;
        recorder
            .deferred(Duration::from_millis(100))
            .publish(&pod("b"), EventType::Normal, "Later", "waits")
            .await;
        recorder
            .publish(&pod("c"), EventType::Normal, "Behind", "queued after it")
            .await;
        recorder.flush().await;
        let seen = seen.lock().unwrap().clone();
        let order: Vec<&str> = seen.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(order, ["Now", "Later", "Behind"]);
        let after = |i: usize| seen[i].0 - start;
        assert!(
            after(0) < Duration::from_millis(1),
            "not deferred: {:?}",
            after(0)
        );
        assert!(
            after(1) >= Duration::from_millis(100),
            "deferred: {:?}",
            after(1)
        );
        assert!(after(2) >= after(1), "in order: {:?}", after(2));
    }

    fn pod(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            field_path: Some("spec.containers{app}".into()),
            ..ObjectReference::default()
        }
    }

    fn kubelet() -> Source {
        Source {
            component: "kubelet".into(),
            host: Some("gw-1".into()),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn occurrence(object: &ObjectReference, reason: &str, message: &str, t: i64) -> Occurrence {
        Occurrence {
            object: object.clone(),
            type_: EventType::Warning,
            reason: reason.into(),
            message: message.into(),
            count: 1,
            first_timestamp: at(t),
            last_timestamp: at(t),
        }
    }

    #[test]
    fn a_repeat_patches_the_same_event_with_a_higher_count() {
        let mut c = Correlator::default();
        let web = pod("web");
        let first = c
            .correlate(
                &kubelet(),
                occurrence(&web, "BackOff", "Back-off pulling image \"x\"", 0),
                at(0),
            )
            .expect("written");
        assert!(!first.repeat);
        assert_eq!(first.event.count, Some(1));
        let second = c
            .correlate(
                &kubelet(),
                occurrence(&web, "BackOff", "Back-off pulling image \"x\"", 20),
                at(20),
            )
            .expect("written");
        assert!(second.repeat, "a repeat is a patch");
        assert_eq!(second.event.metadata.name, first.event.metadata.name);
        assert_eq!(second.event.count, Some(2));
        assert_eq!(second.event.first_timestamp, Some(Time(at(0))));
        assert_eq!(second.event.last_timestamp, Some(Time(at(20))));
        // Another message, another object or another source is another Event.
        let other = c
            .correlate(
                &kubelet(),
                occurrence(&web, "Failed", "Error: ErrImagePull", 21),
                at(21),
            )
            .expect("written");
        assert!(!other.repeat);
        let host2 = Source {
            component: "kubelet".into(),
            host: Some("gw-2".into()),
        };
        assert!(
            !c.correlate(
                &host2,
                occurrence(&web, "BackOff", "Back-off pulling image \"x\"", 22),
                at(22)
            )
            .expect("written")
            .repeat
        );
        assert!(
            !c.correlate(
                &kubelet(),
                occurrence(&pod("db"), "BackOff", "Back-off pulling image \"x\"", 23),
                at(23)
            )
            .expect("written")
            .repeat
        );
    }

    #[test]
    fn an_edge_count_adds_to_the_existing_count_and_keeps_its_timestamps() {
        let mut c = Correlator::default();
        let web = pod("web");
        let mut o = occurrence(
            &web,
            "BackOff",
            "Back-off restarting failed container app",
            0,
        );
        o.count = 4;
        o.last_timestamp = at(30);
        let first = c
            .correlate(&kubelet(), o.clone(), at(100))
            .expect("written");
        assert_eq!(first.event.count, Some(4));
        assert_eq!(first.event.first_timestamp, Some(Time(at(0))));
        assert_eq!(
            first.event.last_timestamp,
            Some(Time(at(30))),
            "when it happened, not when it arrived"
        );
        o.count = 3;
        o.first_timestamp = at(40);
        o.last_timestamp = at(60);
        let again = c.correlate(&kubelet(), o, at(101)).expect("written");
        assert!(again.repeat);
        assert_eq!(again.event.count, Some(7));
        assert_eq!(again.event.first_timestamp, Some(Time(at(0))));
        assert_eq!(again.event.last_timestamp, Some(Time(at(60))));
    }

    #[test]
    fn the_tenth_different_message_is_combined_and_later_ones_count_on_it() {
        let mut c = Correlator::default();
        let web = pod("web");
        let mut names = HashSet::new();
        for i in 0..9 {
            let w = c
                .correlate(
                    &kubelet(),
                    occurrence(&web, "Unhealthy", &format!("probe failed: {i}"), i),
                    at(i),
                )
                .expect("written");
            assert!(!w.repeat);
            assert!(
                !w.event
                    .message
                    .as_deref()
                    .unwrap()
                    .starts_with(COMBINED_PREFIX)
            );
            names.insert(w.event.metadata.name.clone());
        }
        assert_eq!(names.len(), 9, "nine Events, one per message");
        let tenth = c
            .correlate(
                &kubelet(),
                occurrence(&web, "Unhealthy", "probe failed: 9", 9),
                at(9),
            )
            .expect("written");
        assert_eq!(
            tenth.event.message.as_deref(),
            Some("(combined from similar events): probe failed: 9")
        );
        assert!(!tenth.repeat);
        let eleventh = c
            .correlate(
                &kubelet(),
                occurrence(&web, "Unhealthy", "probe failed: 10", 10),
                at(10),
            )
            .expect("written");
        assert!(eleventh.repeat, "the combined Event counts the next one");
        assert_eq!(eleventh.event.metadata.name, tenth.event.metadata.name);
        assert_eq!(eleventh.event.count, Some(2));
        assert_eq!(
            eleventh.event.message.as_deref(),
            Some("(combined from similar events): probe failed: 10")
        );
        // Another reason is not combined with these.
        let other = c
            .correlate(
                &kubelet(),
                occurrence(&web, "Killing", "Stopping container app", 11),
                at(11),
            )
            .expect("written");
        assert_eq!(
            other.event.message.as_deref(),
            Some("Stopping container app")
        );
    }

    #[test]
    fn similar_messages_are_forgotten_after_ten_quiet_minutes() {
        let mut c = Correlator::default();
        let web = pod("web");
        for i in 0..9 {
            c.correlate(
                &kubelet(),
                occurrence(&web, "Unhealthy", &format!("m{i}"), i),
                at(i),
            );
        }
        let later = 9 + AGGREGATE_INTERVAL.as_secs() as i64 + 1;
        let w = c
            .correlate(
                &kubelet(),
                occurrence(&web, "Unhealthy", "m9", later),
                at(later),
            )
            .expect("written");
        assert_eq!(
            w.event.message.as_deref(),
            Some("m9"),
            "the count started again"
        );
    }

    #[test]
    fn the_spam_filter_allows_a_burst_of_25_then_one_per_five_minutes() {
        let mut c = Correlator::default();
        let web = pod("web");
        let mut written = 0;
        for i in 0..40 {
            // Each a repeat of one event: repeats are rate limited as well.
            if c.correlate(
                &kubelet(),
                occurrence(&web, "BackOff", "Back-off", 0),
                at(i),
            )
            .is_some()
            {
                written += 1;
            }
        }
        assert_eq!(written, SPAM_BURST, "a burst of 25 within 40 seconds");
        // Another object of the same source has its own bucket.
        assert!(
            c.correlate(
                &kubelet(),
                occurrence(&pod("db"), "BackOff", "Back-off", 40),
                at(40)
            )
            .is_some()
        );
        // One more after five minutes, not two.
        let t = 39 + SPAM_REFILL_EVERY.as_secs() as i64;
        assert!(
            c.correlate(
                &kubelet(),
                occurrence(&web, "BackOff", "Back-off", t),
                at(t)
            )
            .is_some()
        );
        assert!(
            c.correlate(
                &kubelet(),
                occurrence(&web, "BackOff", "Back-off", t),
                at(t)
            )
            .is_none()
        );
        // The count kept rising while dropped: the next written one carries all of them.
        let t = t + SPAM_REFILL_EVERY.as_secs() as i64;
        let w = c
            .correlate(
                &kubelet(),
                occurrence(&web, "BackOff", "Back-off", t),
                at(t),
            )
            .expect("refilled");
        assert_eq!(w.event.count, Some(43));
    }

    #[test]
    fn a_failed_write_is_created_again_on_the_next_repeat() {
        let mut c = Correlator::default();
        let web = pod("web");
        let w = c
            .correlate(
                &kubelet(),
                occurrence(&web, "Pulling", "Pulling image \"x\"", 0),
                at(0),
            )
            .unwrap();
        c.forget(&w.key);
        let again = c
            .correlate(
                &kubelet(),
                occurrence(&web, "Pulling", "Pulling image \"x\"", 1),
                at(1),
            )
            .unwrap();
        assert!(!again.repeat);
        assert_eq!(again.event.count, Some(1));
    }

    #[test]
    fn the_caches_keep_at_most_their_capacity() {
        let mut lru: Lru<u32> = Lru::new(3);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            lru.insert(k.to_string(), i as u32);
        }
        lru.get_mut("a");
        lru.insert("d".into(), 3);
        assert_eq!(lru.entries.len(), 3);
        assert!(lru.get_mut("b").is_none(), "the least recently used went");
        assert!(lru.get_mut("a").is_some());
    }
}
