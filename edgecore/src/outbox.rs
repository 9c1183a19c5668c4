//! Reports for the cloud: the latest status of each object and finished pod deletions, kept
//! durably in `edge.db` so that what the edge learned while offline, or before a crash, still
//! reaches the cloud (KubeEdge's offline autonomy).
//!
//! Producers (the node reporter, pod workers) [`put`](Outbox::put) reports at any time,
//! connected or not, without waiting for the disk; a newer report of the same object replaces
//! the older one (latest wins). The report keeps the whole status, so restart counts and last
//! termination states are never lost to coalescing, and [`Outbox::last_status`] gives a pod
//! worker the last status it reported even after a reboot.
//!
//! Three parties share an [`Outbox`]:
//!
//! - the producers, which only touch memory;
//! - the [`OutboxWriter`] task, the only user of its SQLite connection: it writes what changed
//!   in one transaction as soon as it is told (a group commit: puts that arrive during a
//!   commit go in the next one), marks acknowledged reports, removes rows of forgotten
//!   objects, and drops reports of pods and Devices the store no longer holds;
//! - the hub, which sends what is [`due`](Outbox::due) in its session, oldest generation
//!   first, at most [`MAX_IN_FLIGHT`] unacknowledged at a time, again after [`RESEND_AFTER`],
//!   and hands back the acknowledgements.
//!
//! **Rules that give the guarantees:**
//!
//! - *Generations order the reports, not clocks.* Each put takes the next value of a counter
//!   that only grows, across restarts too: at start and with every write the store records
//!   `reserved_below` (the counter plus [`GENERATION_BLOCK`]), and a restart continues from
//!   there. A generation is sent only when it is below the recorded reservation, so none the
//!   cloud saw is ever handed out again, and an edge clock set back changes nothing. The wall
//!   clock is read once, when the store has no counter yet (the first start after the
//!   migration), so that generations start above the clock-based ones earlier edgecores sent.
//! - *A report is sent only once its row is durable.* The edge then always holds, on disk, a
//!   report of each object at least as new as anything the cloud received: after a `kill -9`
//!   nothing acknowledged is lost ([`Outbox::last_status`] is never older than what the cloud
//!   holds) and what is resent is never older than what was sent before. This costs one
//!   commit of latency per burst of reports.
//! - *While writes fail* (disk full), reports stay in memory, the writer retries every
//!   [`RETRY_WRITE_AFTER`], and reports whose generation is covered by the stored reservation
//!   are sent from memory, so the cloud still hears about pods and the node's `DiskPressure`.
//!   Only a crash during such an episode can lose what was acknowledged meanwhile.
//! - *Acknowledged reports are remembered, not resent*: the row stays, marked acknowledged,
//!   until its object is forgotten ([`Outbox::forget`]), its pod deletion is acknowledged, or
//!   the store no longer holds the pod.
//! - *A pod deletion is final*: statuses of that pod put afterwards are dropped.
//!
//! The cloud applies a report only if its generation is newer than the last one it wrote for
//! the object (`cloudcore::upstream`), so resends after a crash are no-ops there.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::{Message, ObjectRef, StatusReport};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{ReportsWrite, Store, StoreError, StoredReport};

/// An unacknowledged report is sent again after this long.
pub const RESEND_AFTER: Duration = Duration::from_secs(3);
/// Most reports sent in a session and not yet acknowledged (sent within [`RESEND_AFTER`]);
/// the next ones go as acknowledgements come back, so a reconnect after a long offline period
/// does not flood the link or the cloud's queue.
pub const MAX_IN_FLIGHT: usize = 128;
/// An acknowledgement of a report sent this long ago is still honoured (the cloud's writes
/// may lag behind a resend).
const ACK_MEMORY: Duration = Duration::from_secs(60);
/// Generations reserved ahead of use by every write: how many reports may be sent from memory
/// while writes fail, and how far a restart skips.
pub const GENERATION_BLOCK: u64 = 100_000;
/// A failed write is tried again after this long.
pub const RETRY_WRITE_AFTER: Duration = Duration::from_secs(1);
/// Kinds whose reports go when the store no longer holds the object (the node's stays).
const DROPPED_WHEN_GONE: [&str; 2] = ["Pod", devices::DEVICE_KIND];

/// What the cloud should learn.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The object's current `status`.
    Status(Value),
    /// The pod's containers are gone after its graceful deletion: remove it from the API.
    PodDeleted,
}

/// The latest report of one object.
#[derive(Debug)]
struct Entry {
    generation: u64,
    /// The latest status put; kept when a deletion replaces it, for [`Outbox::last_status`].
    status: Option<Value>,
    /// The report is the pod's deletion.
    pod_deleted: bool,
    /// The cloud acknowledged this generation.
    acknowledged: bool,
    /// Generation and acknowledgement as the store holds them; `None` without a row.
    written: Option<(u64, bool)>,
    /// Session and time this generation was last sent.
    sent: Option<(u64, Instant)>,
}

impl Entry {
    fn durable(&self) -> bool {
        self.written
            .is_some_and(|(generation, _)| generation == self.generation)
    }

    fn dirty(&self) -> bool {
        self.written != Some((self.generation, self.acknowledged))
    }
}

/// One message sent in the current session and not yet acknowledged.
#[derive(Debug)]
struct Sent {
    object: ObjectRef,
    generation: u64,
    at: Instant,
}

/// Everything behind the outbox's lock.
#[derive(Debug)]
struct State {
    entries: BTreeMap<ObjectRef, Entry>,
    /// Rows to delete at the next write.
    removed: BTreeSet<ObjectRef>,
    /// The next generation to hand out.
    next_generation: u64,
    /// The store's reservation: every generation sent so far is below it, and a restart
    /// continues from it. (Generations handed out above it were never sent nor written, so
    /// handing them out again after a crash is harmless.)
    reserved_below: u64,
    /// The last write failed.
    failing: bool,
    /// The hub session `sent` belongs to.
    session: u64,
    /// Messages of `session` by seq, forgotten after [`ACK_MEMORY`].
    sent: BTreeMap<u64, Sent>,
    /// When [`Outbox::due`] last looked: resends due before then were made.
    checked: Option<Instant>,
}

impl State {
    fn sendable(&self, entry: &Entry) -> bool {
        !entry.acknowledged
            && (entry.durable() || (self.failing && entry.generation < self.reserved_below))
    }

    fn pending(&self) -> usize {
        self.entries.values().filter(|e| !e.acknowledged).count()
    }
}

/// The reports, by object (kind, namespace, name, uid).
#[derive(Debug)]
pub struct Outbox {
    /// A std mutex: held for map operations only, never across an await or a disk write.
    state: Mutex<State>,
    /// Wakes the hub: something may be due (a report became durable, an ack freed room).
    ready: Notify,
    /// Wakes the writer: something changed that the store does not hold yet.
    dirty: Notify,
    /// Counts the statuses put, for local readers that follow them without the cloud
    /// ([`Outbox::subscribe_puts`]).
    puts: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// How many times the writer began to wait for more acknowledgements to share a commit,
    /// for tests that must catch it waiting.
    #[cfg(test)]
    pauses: std::sync::atomic::AtomicU64,
}

/// Microseconds since the Unix epoch by the wall clock.
fn wall_clock_micros() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Outbox {
    /// Opens the outbox kept in DIR/edge.db: unacknowledged reports come back (and are sent
    /// first), acknowledged ones give [`Outbox::last_status`]. The returned writer must run
    /// ([`OutboxWriter::run`]) for anything to be sent.
    pub fn open(
        data_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Outbox>, OutboxWriter), StoreError> {
        Outbox::open_with_clock(data_dir, metrics, wall_clock_micros)
    }

    /// [`Outbox::open`] with the clock used when the store has no generation counter yet.
    fn open_with_clock(
        data_dir: &Path,
        metrics: Arc<Metrics>,
        clock: impl FnOnce() -> u64,
    ) -> Result<(Arc<Outbox>, OutboxWriter), StoreError> {
        let mut store = Store::open(data_dir)?;
        let stored = store.reports()?;
        let after_rows = stored
            .reports
            .iter()
            .map(|r| r.generation.saturating_add(1))
            .max()
            .unwrap_or(0);
        let next_generation = match stored.reserved_below {
            Some(reserved) => reserved.max(after_rows),
            None => clock().max(after_rows),
        };
        let mut entries = BTreeMap::new();
        for report in stored.reports {
            if report.status.is_none() && !report.pod_deleted {
                tracing::warn!(object = ?report.object, "status report row without a status; ignored");
                continue;
            }
            entries.insert(
                report.object,
                Entry {
                    generation: report.generation,
                    status: report.status,
                    pod_deleted: report.pod_deleted,
                    acknowledged: report.acknowledged,
                    written: Some((report.generation, report.acknowledged)),
                    sent: None,
                },
            );
        }
        // Reserve a block before handing out anything, so reports can be sent from memory
        // at once if writes fail later. If even this small write fails (a full disk at
        // start), reports wait for their own write.
        let reserve = ReportsWrite {
            reserved_below: next_generation.saturating_add(GENERATION_BLOCK),
            ..ReportsWrite::default()
        };
        let reserved_below = match store.write_reports(&reserve) {
            Ok(()) => reserve.reserved_below,
            Err(e) => {
                metrics.outbox_write_errors.inc();
                tracing::warn!(
                    "cannot reserve status report generations: {}; reports are sent once written",
                    daemon::error_chain(&e)
                );
                next_generation
            }
        };
        let state = State {
            entries,
            removed: BTreeSet::new(),
            next_generation,
            reserved_below,
            failing: false,
            session: 0,
            sent: BTreeMap::new(),
            checked: None,
        };
        let pending = state.pending();
        metrics.outbox_pending.set(pending as i64);
        tracing::info!(
            path = %store.path().display(),
            reports.pending = pending,
            reports.held = state.entries.len(),
            next_generation,
            "status outbox loaded"
        );
        let outbox = Arc::new(Outbox {
            state: Mutex::new(state),
            ready: Notify::new(),
            dirty: Notify::new(),
            puts: watch::Sender::new(0),
            metrics,
            #[cfg(test)]
            pauses: Default::default(),
        });
        let writer = OutboxWriter {
            outbox: outbox.clone(),
            path: store.path().to_path_buf(),
            store: Arc::new(Mutex::new(store)),
        };
        Ok((outbox, writer))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn count_pending(&self, state: &State) {
        self.metrics.outbox_pending.set(state.pending() as i64);
    }

    /// Queues `report` for `object`, replacing an earlier one. A status equal to the latest one
    /// put (acknowledged or not) is left alone: there is nothing new to say. A deletion is
    /// final: later statuses of that pod are dropped. Never waits for the disk.
    pub fn put(&self, object: ObjectRef, report: Report) {
        let mut guard = self.state();
        let state = &mut *guard;
        let previous = state.entries.get(&object);
        if let Some(entry) = previous {
            let nothing_new = match &report {
                Report::Status(status) => entry.status.as_ref() == Some(status),
                Report::PodDeleted => false,
            };
            if entry.pod_deleted || nothing_new {
                return;
            }
        }
        let (status, pod_deleted) = match report {
            Report::Status(status) => (Some(status), false),
            Report::PodDeleted => (previous.and_then(|e| e.status.clone()), true),
        };
        let generation = state.next_generation;
        state.next_generation += 1;
        let written = previous.and_then(|e| e.written);
        state.removed.remove(&object);
        state.entries.insert(
            object,
            Entry {
                generation,
                status,
                pod_deleted,
                acknowledged: false,
                written,
                sent: None,
            },
        );
        let failing = state.failing;
        self.count_pending(state);
        drop(guard);
        self.dirty.notify_one();
        if failing {
            self.ready.notify_one();
        }
        self.puts.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes whenever a report is put: the service table follows local pods' readiness
    /// through it, with or without the cloud.
    pub fn subscribe_puts(&self) -> watch::Receiver<u64> {
        self.puts.subscribe()
    }

    /// The latest status put for every object of `kind` (acknowledged or not, including what
    /// an earlier run put), with deleted pods' last status left out.
    pub fn statuses(&self, kind: &str) -> Vec<(ObjectRef, Value)> {
        self.state()
            .entries
            .iter()
            .filter(|(object, entry)| object.kind == kind && !entry.pod_deleted)
            .filter_map(|(object, entry)| Some((object.clone(), entry.status.clone()?)))
            .collect()
    }

    /// Makes every acknowledged status due again (not pod deletions, which are final): the
    /// cloud asked for them because it no longer knows them. Their generations stay; the
    /// acknowledgement is recorded again when it comes. Returns how many became due.
    pub fn resend_all(&self) -> usize {
        let mut guard = self.state();
        let state = &mut *guard;
        let mut again = 0;
        for entry in state.entries.values_mut() {
            if entry.acknowledged && !entry.pod_deleted && entry.status.is_some() {
                entry.acknowledged = false;
                entry.sent = None;
                again += 1;
            }
        }
        if again > 0 {
            self.count_pending(state);
            drop(guard);
            self.dirty.notify_one();
            self.ready.notify_one();
        }
        again
    }

    /// Forgets whatever is held for `object` (its pod is gone for good), in the store too.
    pub fn forget(&self, object: &ObjectRef) {
        let mut state = self.state();
        if state.entries.remove(object).is_some() {
            state.removed.insert(object.clone());
            self.count_pending(&state);
            drop(state);
            self.dirty.notify_one();
            self.puts.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The latest status put for `object`, acknowledged or not, including what an earlier run
    /// put (from the store). Kept after a pod deletion is put, until it is acknowledged.
    pub fn last_status(&self, object: &ObjectRef) -> Option<Value> {
        self.state()
            .entries
            .get(object)
            .and_then(|e| e.status.clone())
    }

    /// Waits until something may have become due (a report became sendable, an
    /// acknowledgement made room).
    pub async fn changed(&self) {
        self.ready.notified().await
    }

    /// Builds the messages to send now in `session`: reports not yet sent in it, and those
    /// sent over [`RESEND_AFTER`] ago without an acknowledgement; oldest generation first and
    /// at most [`MAX_IN_FLIGHT`] unacknowledged. `next_seq` numbers them.
    pub fn due(&self, session: u64, now: Instant, next_seq: &mut u64) -> Vec<Message> {
        let mut guard = self.state();
        let state = &mut *guard;
        if state.session != session {
            state.session = session;
            state.sent.clear();
        }
        state.checked = Some(now);
        state
            .sent
            .retain(|_, s| now.saturating_duration_since(s.at) < ACK_MEMORY);
        let in_flight = state
            .sent
            .values()
            .filter(|s| now.saturating_duration_since(s.at) < RESEND_AFTER)
            .count();
        let room = MAX_IN_FLIGHT.saturating_sub(in_flight);
        if room == 0 {
            return Vec::new();
        }
        let mut due: Vec<(u64, ObjectRef)> = state
            .entries
            .iter()
            .filter(|(_, e)| {
                state.sendable(e)
                    && match e.sent {
                        Some((s, at)) => {
                            s != session || now.saturating_duration_since(at) >= RESEND_AFTER
                        }
                        None => true,
                    }
            })
            .map(|(object, e)| (e.generation, object.clone()))
            .collect();
        due.sort_unstable();
        due.truncate(room);
        let mut out = Vec::with_capacity(due.len());
        for (generation, object) in due {
            let Some(entry) = state.entries.get_mut(&object) else {
                continue;
            };
            *next_seq += 1;
            let seq = *next_seq;
            entry.sent = Some((session, now));
            out.push(match (&entry.status, entry.pod_deleted) {
                (Some(status), false) => Message::Status(StatusReport {
                    seq,
                    object: object.clone(),
                    generation,
                    status: serde_json::to_vec(status).unwrap_or_default(),
                }),
                _ => Message::PodDeleted {
                    seq,
                    object: object.clone(),
                },
            });
            state.sent.insert(
                seq,
                Sent {
                    object,
                    generation,
                    at: now,
                },
            );
        }
        out
    }

    /// When a message sent in the current session stops counting as in flight (its report
    /// may be resent, or room opens for another), if any.
    pub fn next_resend(&self) -> Option<Instant> {
        let state = self.state();
        state
            .sent
            .values()
            .map(|s| s.at + RESEND_AFTER)
            .filter(|at| state.checked.is_none_or(|checked| *at > checked))
            .min()
    }

    /// The cloud acknowledged `seqs` of `session`: those reports are done, unless a newer one
    /// replaced them meanwhile. An acknowledged pod deletion removes the pod's row.
    pub fn acknowledged(&self, session: u64, seqs: &[u64]) {
        let mut guard = self.state();
        let state = &mut *guard;
        if state.session != session {
            return;
        }
        let mut changed = false;
        for seq in seqs {
            let Some(sent) = state.sent.remove(seq) else {
                continue;
            };
            // Older messages of the object are moot now.
            state
                .sent
                .retain(|_, s| s.object != sent.object || s.generation > sent.generation);
            let Some(entry) = state.entries.get_mut(&sent.object) else {
                continue;
            };
            if entry.generation != sent.generation || entry.acknowledged {
                continue;
            }
            changed = true;
            if entry.pod_deleted {
                state.entries.remove(&sent.object);
                state.removed.insert(sent.object);
            } else {
                entry.acknowledged = true;
            }
        }
        self.count_pending(state);
        drop(guard);
        self.ready.notify_one();
        if changed {
            self.dirty.notify_one();
        }
    }

    /// The metrics the outbox counts in (shared with the producers that feed it).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Reports waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.state().pending()
    }

    /// Whether no report waits for an acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether and how soon the store should catch up with memory.
    fn needs_write(&self) -> Option<Urgency> {
        let state = self.state();
        if state.entries.values().any(|e| !e.durable()) {
            Some(Urgency::Now)
        } else if !state.removed.is_empty() || state.entries.values().any(Entry::dirty) {
            Some(Urgency::Soon)
        } else {
            None
        }
    }
}

/// How soon a write is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    /// A report waits for its row before it can be sent.
    Now,
    /// Only acknowledgements and removals: they may wait [`BOOKKEEPING_DELAY`] to share a
    /// commit (each commit is an fsync, and acknowledgements come one by one).
    Soon,
}

/// How long acknowledgements and removals may wait for their write.
const BOOKKEEPING_DELAY: Duration = Duration::from_millis(100);

/// Writes the outbox into `edge.db`; the only user of its connection. Run it with
/// [`OutboxWriter::run`]; tests call [`OutboxWriter::write`] directly.
#[derive(Debug, Clone)]
pub struct OutboxWriter {
    outbox: Arc<Outbox>,
    /// A std mutex: used only on blocking threads.
    store: Arc<Mutex<Store>>,
    /// The database file, for logs.
    path: PathBuf,
}

impl OutboxWriter {
    /// Writes what changed since the last write in one durable transaction (blocking). On
    /// failure everything stays in memory for the next attempt; the first failure of an
    /// episode is logged as an error, the recovery as info.
    pub fn write(&self) -> Result<(), StoreError> {
        let outbox = &self.outbox;
        let write = {
            let mut state = outbox.state();
            let upsert: Vec<StoredReport> = state
                .entries
                .iter()
                .filter(|(_, e)| e.dirty())
                .map(|(object, e)| StoredReport {
                    object: object.clone(),
                    generation: e.generation,
                    status: e.status.clone(),
                    pod_deleted: e.pod_deleted,
                    acknowledged: e.acknowledged,
                })
                .collect();
            ReportsWrite {
                delete: std::mem::take(&mut state.removed).into_iter().collect(),
                upsert,
                reserved_below: state.next_generation.saturating_add(GENERATION_BLOCK),
            }
        };
        let result = lock(&self.store).write_reports(&write);
        let mut state = outbox.state();
        match &result {
            Ok(()) => {
                for report in &write.upsert {
                    if let Some(entry) = state.entries.get_mut(&report.object) {
                        entry.written = Some((report.generation, report.acknowledged));
                    }
                }
                state.reserved_below = state.reserved_below.max(write.reserved_below);
                if state.failing {
                    state.failing = false;
                    tracing::info!(
                        path = %self.path.display(),
                        "status reports are written to the store again"
                    );
                }
            }
            Err(e) => {
                state.removed.extend(write.delete.iter().cloned());
                outbox.metrics.outbox_write_errors.inc();
                if !state.failing {
                    state.failing = true;
                    tracing::error!(
                        path = %self.path.display(),
                        reports = write.upsert.len(),
                        "cannot write status reports: {}; status reports are kept in memory and retried every {}",
                        daemon::error_chain(e),
                        humantime::format_duration(RETRY_WRITE_AFTER)
                    );
                }
            }
        }
        drop(state);
        outbox.ready.notify_one();
        result
    }

    /// Drops the reports of pods and Devices the store no longer holds (blocking): the cloud
    /// refuses reports of objects not bound to this node, and the store holds exactly those
    /// the cloud has told it about. Reports put after the store was read are kept (their
    /// object may have arrived since).
    pub fn drop_reports_of_gone_objects(&self) -> Result<usize, StoreError> {
        let before = self.outbox.state().next_generation;
        let held: HashSet<ObjectRef> = {
            let store = lock(&self.store);
            let mut held = store.refs("Pod")?;
            held.extend(store.refs(devices::DEVICE_KIND)?);
            held.into_iter().collect()
        };
        let mut guard = self.outbox.state();
        let state = &mut *guard;
        let gone: Vec<ObjectRef> = state
            .entries
            .iter()
            .filter(|(object, e)| {
                DROPPED_WHEN_GONE.contains(&object.kind.as_str())
                    && e.generation < before
                    && !held.contains(*object)
            })
            .map(|(object, _)| object.clone())
            .collect();
        for object in &gone {
            tracing::debug!(
                ?object,
                "dropping the status report of an object the store no longer holds"
            );
            state.entries.remove(object);
            state.removed.insert(object.clone());
        }
        self.outbox.count_pending(state);
        drop(guard);
        if !gone.is_empty() {
            self.outbox.dirty.notify_one();
        }
        Ok(gone.len())
    }

    /// Runs `f` on a blocking thread; a panic counts as a failure.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&OutboxWriter) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let writer = self.clone();
        match tokio::task::spawn_blocking(move || f(&writer)).await {
            Ok(result) => result.map_err(|e| daemon::error_chain(&e)),
            Err(e) => {
                tracing::error!("the outbox writer task failed: {e}");
                Err(format!("the outbox writer task failed: {e}"))
            }
        }
    }

    /// Waits up to [`BOOKKEEPING_DELAY`] for more acknowledgements to share a commit, but not
    /// once a report is waiting for its row: a pod's status must not queue behind the
    /// acknowledgement of another's (in a burst of pod starts it did, for up to 100 ms).
    /// False when `shutdown` was cancelled.
    async fn bookkeeping_pause(&self, shutdown: &CancellationToken) -> bool {
        #[cfg(test)]
        self.outbox
            .pauses
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let until = tokio::time::Instant::now() + BOOKKEEPING_DELAY;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                _ = self.outbox.dirty.notified() => {
                    if self.outbox.needs_write() == Some(Urgency::Now) {
                        return true;
                    }
                }
            }
        }
    }

    /// Writes changes as they come, retries failed writes, drops reports of pods and Devices
    /// that left the store after each of its commits (`store_changed`), and writes a last time when
    /// `shutdown` is cancelled.
    pub async fn run(self, mut store_changed: watch::Receiver<u64>, shutdown: CancellationToken) {
        let mut check_pods = true;
        let mut store_open = true;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if check_pods {
                check_pods = false;
                if let Err(e) = self.blocking(|w| w.drop_reports_of_gone_objects()).await {
                    tracing::warn!("cannot check which pods the store holds: {e}");
                }
            }
            if let Some(urgency) = self.outbox.needs_write()
                && retry_at.is_none_or(|at| at <= tokio::time::Instant::now())
            {
                if urgency == Urgency::Soon && !self.bookkeeping_pause(&shutdown).await {
                    break;
                }
                retry_at = match self.blocking(|w| w.write()).await {
                    Ok(()) => None,
                    // Logged by `write`; a panic is not.
                    Err(e) => {
                        tracing::debug!("status report write failed: {e}");
                        Some(tokio::time::Instant::now() + RETRY_WRITE_AFTER)
                    }
                };
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.outbox.dirty.notified(), if retry_at.is_none() => {}
                _ = sleep_until(retry_at), if retry_at.is_some() => {}
                changed = store_changed.changed(), if store_open => match changed {
                    Ok(()) => check_pods = true,
                    Err(_) => store_open = false,
                },
            }
        }
        if self.outbox.needs_write().is_some()
            && let Err(e) = self.blocking(|w| w.write()).await
        {
            tracing::warn!("status reports not written before exit: {e}");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

    /// The gateway's Node: kept by the writer's look at which pods the store holds.
    fn node() -> ObjectRef {
        ObjectRef {
            kind: "Node".into(),
            namespace: String::new(),
            name: "gw-1".into(),
            uid: String::new(),
        }
    }

    /// Waits until reports are due in session 1 and returns them.
    async fn next_due(outbox: &Outbox, seq: &mut u64) -> Vec<Message> {
        loop {
            let sent = outbox.due(1, Instant::now(), seq);
            if !sent.is_empty() {
                return sent;
            }
            outbox.changed().await;
        }
    }

    fn status(phase: &str) -> Report {
        Report::Status(json!({ "phase": phase }))
    }

    /// Seq of each message.
    fn seqs(messages: &[Message]) -> Vec<u64> {
        messages.iter().map(|m| parts(m).0).collect()
    }

    /// Seq, object name and generation (`None` for a deletion) of a message.
    fn parts(message: &Message) -> (u64, String, Option<u64>) {
        match message {
            Message::Status(s) => (s.seq, s.object.name.clone(), Some(s.generation)),
            Message::PodDeleted { seq, object } => (*seq, object.name.clone(), None),
            other => panic!("{other:?}"),
        }
    }

    fn names(messages: &[Message]) -> Vec<String> {
        messages.iter().map(|m| parts(m).1).collect()
    }

    fn generation(message: &Message) -> u64 {
        parts(message).2.expect("a status report")
    }

    struct Edge {
        dir: tempfile::TempDir,
        outbox: Arc<Outbox>,
        writer: OutboxWriter,
        metrics: Arc<Metrics>,
    }

    impl Edge {
        fn new() -> Edge {
            let dir = tempfile::tempdir().expect("tempdir");
            let metrics = Arc::new(Metrics::default());
            let (outbox, writer) = Outbox::open(dir.path(), metrics.clone()).expect("open");
            Edge {
                dir,
                outbox,
                writer,
                metrics,
            }
        }

        /// The same data dir opened again, as after a crash: what was not written is lost.
        fn restart(self) -> Edge {
            self.restart_with_clock(|| panic!("the clock is read only for a new counter"))
        }

        fn restart_with_clock(self, clock: impl FnOnce() -> u64) -> Edge {
            let Edge { dir, .. } = self;
            let metrics = Arc::new(Metrics::default());
            let (outbox, writer) =
                Outbox::open_with_clock(dir.path(), metrics.clone(), clock).expect("reopen");
            Edge {
                dir,
                outbox,
                writer,
                metrics,
            }
        }

        fn write(&self) {
            self.writer.write().expect("write");
        }
    }

    #[test]
    fn the_latest_report_wins_and_an_ack_settles_it() {
        let edge = Edge::new();
        let now = Instant::now();
        let mut seq = 0;
        edge.outbox.put(pod("a"), status("Pending"));
        edge.outbox.put(pod("a"), status("Running"));
        edge.write();
        let sent = edge.outbox.due(1, now, &mut seq);
        assert_eq!(sent.len(), 1);
        assert!(matches!(&sent[0], Message::Status(s) if s.status == br#"{"phase":"Running"}"#));
        assert!(
            edge.outbox.due(1, now, &mut seq).is_empty(),
            "sent, not yet due again"
        );
        assert_eq!(edge.outbox.len(), 1);
        edge.outbox.acknowledged(1, &seqs(&sent));
        assert!(edge.outbox.is_empty());
        assert!(
            edge.outbox
                .due(1, now + RESEND_AFTER * 2, &mut seq)
                .is_empty()
        );
        // The same status again is nothing new; another one is.
        edge.outbox.put(pod("a"), status("Running"));
        assert!(edge.outbox.is_empty());
        edge.outbox.put(pod("a"), status("Succeeded"));
        assert_eq!(edge.outbox.len(), 1);
    }

    #[test]
    fn a_cloud_that_forgot_gets_the_acknowledged_statuses_again_with_their_generations() {
        let edge = Edge::new();
        let now = Instant::now();
        let mut seq = 0;
        edge.outbox.put(pod("a"), status("Running"));
        edge.outbox.put(pod("b"), Report::PodDeleted);
        edge.write();
        let sent = edge.outbox.due(1, now, &mut seq);
        assert_eq!(sent.len(), 2);
        let generation_a = sent
            .iter()
            .find(|m| parts(m).1 == "a")
            .map(generation)
            .expect("a was sent");
        edge.outbox.acknowledged(1, &seqs(&sent));
        edge.write();
        assert!(edge.outbox.is_empty());
        assert_eq!(edge.outbox.resend_all(), 1, "a deletion is not sent again");
        edge.write();
        let again = edge.outbox.due(2, now, &mut seq);
        assert_eq!(names(&again), ["a"]);
        assert_eq!(generation(&again[0]), generation_a, "the same report");
        edge.outbox.acknowledged(2, &seqs(&again));
        assert!(edge.outbox.is_empty());
        // Survives a restart either way: the acknowledgement was written again.
        edge.write();
        let edge = edge.restart();
        assert!(edge.outbox.due(3, now, &mut seq).is_empty());
    }

    #[test]
    fn nothing_is_sent_before_it_is_written() {
        let edge = Edge::new();
        let mut seq = 0;
        edge.outbox.put(pod("a"), status("Running"));
        assert!(edge.outbox.due(1, Instant::now(), &mut seq).is_empty());
        edge.write();
        assert_eq!(edge.outbox.due(1, Instant::now(), &mut seq).len(), 1);
        // A newer report replaces the sent one and waits for its own write.
        edge.outbox.put(pod("a"), status("Failed"));
        assert!(
            edge.outbox
                .due(1, Instant::now() + RESEND_AFTER, &mut seq)
                .is_empty()
        );
        edge.write();
        let sent = edge.outbox.due(1, Instant::now(), &mut seq);
        assert!(matches!(&sent[..], [Message::Status(s)] if s.status == br#"{"phase":"Failed"}"#));
    }

    #[test]
    fn an_old_ack_after_a_newer_put_keeps_the_newer_report() {
        let edge = Edge::new();
        let now = Instant::now();
        let mut seq = 0;
        edge.outbox.put(pod("a"), status("Pending"));
        edge.write();
        let first = edge.outbox.due(1, now, &mut seq);
        edge.outbox.put(pod("a"), status("Running"));
        edge.write();
        edge.outbox.acknowledged(1, &seqs(&first));
        assert_eq!(edge.outbox.len(), 1);
        let second = edge.outbox.due(1, now, &mut seq);
        assert_eq!(second.len(), 1);
        assert!(generation(&second[0]) > generation(&first[0]));
        // Also across a restart: the newer report is the one kept.
        let edge = edge.restart();
        assert_eq!(edge.outbox.len(), 1);
        assert_eq!(
            edge.outbox.last_status(&pod("a")),
            Some(json!({"phase": "Running"}))
        );
    }

    #[test]
    fn unacknowledged_reports_go_again_after_a_while_and_in_a_new_session() {
        let edge = Edge::new();
        let now = Instant::now();
        let mut seq = 0;
        edge.outbox.put(pod("a"), status("Running"));
        edge.write();
        assert_eq!(edge.outbox.due(1, now, &mut seq).len(), 1);
        assert_eq!(edge.outbox.next_resend(), Some(now + RESEND_AFTER));
        assert_eq!(edge.outbox.due(2, now, &mut seq).len(), 1, "new session");
        assert!(edge.outbox.due(2, now, &mut seq).is_empty());
        let later = now + RESEND_AFTER;
        let again = edge.outbox.due(2, later, &mut seq);
        assert_eq!(again.len(), 1);
        assert_eq!(edge.outbox.next_resend(), Some(later + RESEND_AFTER));
        // An acknowledgement of the earlier send in this session still counts.
        edge.outbox.acknowledged(2, &[seqs(&again)[0] - 1]);
        assert!(edge.outbox.is_empty());
        // Acknowledgements of another session do not.
        edge.outbox.put(pod("a"), status("Failed"));
        edge.write();
        let sent = edge.outbox.due(3, later, &mut seq);
        edge.outbox.acknowledged(2, &seqs(&sent));
        assert_eq!(edge.outbox.len(), 1);
    }

    #[test]
    fn reports_go_oldest_first_and_at_most_max_in_flight() {
        let edge = Edge::new();
        let now = Instant::now();
        let mut seq = 0;
        // Put in an order unrelated to the names, so the map's order is not the generations'.
        let order: Vec<usize> = (0..300).map(|i| (i * 7) % 300).collect();
        for i in &order {
            edge.outbox.put(pod(&format!("p{i:03}")), status("Running"));
        }
        edge.write();
        let first = edge.outbox.due(1, now, &mut seq);
        assert_eq!(first.len(), MAX_IN_FLIGHT);
        let expected: Vec<String> = order.iter().map(|i| format!("p{i:03}")).collect();
        assert_eq!(names(&first), expected[..MAX_IN_FLIGHT]);
        assert!(
            first
                .windows(2)
                .all(|w| generation(&w[0]) < generation(&w[1]))
        );
        assert!(edge.outbox.due(1, now, &mut seq).is_empty(), "window full");
        // Ten acknowledgements make room for ten more, the next oldest.
        edge.outbox.acknowledged(1, &seqs(&first[..10]));
        let next = edge.outbox.due(1, now, &mut seq);
        assert_eq!(names(&next), expected[MAX_IN_FLIGHT..MAX_IN_FLIGHT + 10]);
        // After RESEND_AFTER the unacknowledged go again, still oldest first and paced.
        let later = now + RESEND_AFTER;
        let resent = edge.outbox.due(1, later, &mut seq);
        assert_eq!(resent.len(), MAX_IN_FLIGHT);
        assert_eq!(names(&resent), expected[10..10 + MAX_IN_FLIGHT]);
        assert_eq!(edge.outbox.len(), 290);
    }

    #[test]
    fn a_deletion_is_final_and_its_ack_removes_the_row() {
        let edge = Edge::new();
        let mut seq = 0;
        edge.outbox.put(pod("a"), status("Running"));
        edge.outbox.put(pod("a"), Report::PodDeleted);
        edge.outbox.put(pod("a"), status("Failed"));
        assert_eq!(
            edge.outbox.last_status(&pod("a")),
            Some(json!({"phase": "Running"})),
            "the status before the deletion"
        );
        edge.write();
        let edge = edge.restart();
        let sent = edge.outbox.due(1, Instant::now(), &mut seq);
        assert!(
            matches!(&sent[..], [Message::PodDeleted { .. }]),
            "{sent:?}"
        );
        edge.outbox.acknowledged(1, &seqs(&sent));
        assert!(edge.outbox.is_empty());
        assert_eq!(edge.outbox.last_status(&pod("a")), None);
        edge.write();
        let edge = edge.restart();
        assert!(edge.outbox.is_empty());
        assert_eq!(edge.outbox.last_status(&pod("a")), None);
        let stored = lock(&edge.writer.store).reports().expect("reports");
        assert!(stored.reports.is_empty(), "{stored:?}");
    }

    #[test]
    fn unacknowledged_reports_survive_a_restart_and_acknowledged_ones_are_remembered() {
        let edge = Edge::new();
        let now = Instant::now();
        let mut seq = 0;
        let node = node();
        edge.outbox.put(pod("acked"), status("Running"));
        edge.write();
        let sent = edge.outbox.due(1, now, &mut seq);
        edge.outbox.acknowledged(1, &seqs(&sent));
        edge.outbox
            .put(pod("waiting"), Report::Status(json!({"restartCount": 3})));
        edge.outbox
            .put(node.clone(), Report::Status(json!({"conditions": []})));
        edge.write();
        // Put, but not written before the crash: lost, like anything not yet durable.
        edge.outbox.put(pod("unwritten"), status("Running"));
        assert_eq!(edge.metrics.outbox_pending.get(), 3);

        let edge = edge.restart();
        assert_eq!(edge.outbox.len(), 2);
        assert_eq!(edge.metrics.outbox_pending.get(), 2);
        assert_eq!(
            edge.outbox.last_status(&pod("acked")),
            Some(json!({"phase": "Running"})),
            "the acknowledged status is remembered"
        );
        assert_eq!(
            edge.outbox.last_status(&pod("waiting")),
            Some(json!({"restartCount": 3}))
        );
        assert_eq!(edge.outbox.last_status(&pod("unwritten")), None);
        let resent = edge.outbox.due(7, now, &mut seq);
        assert_eq!(names(&resent), ["waiting", "gw-1"], "unacknowledged only");
        // Forgetting removes the row too.
        edge.outbox.forget(&pod("acked"));
        edge.write();
        let edge = edge.restart();
        assert_eq!(edge.outbox.last_status(&pod("acked")), None);
        assert_eq!(edge.outbox.len(), 2);
    }

    #[test]
    fn an_ack_not_yet_written_at_a_crash_means_one_harmless_resend() {
        let edge = Edge::new();
        let mut seq = 0;
        edge.outbox.put(pod("a"), status("Running"));
        edge.write();
        let sent = edge.outbox.due(1, Instant::now(), &mut seq);
        edge.outbox.acknowledged(1, &seqs(&sent));
        let edge = edge.restart();
        let again = edge.outbox.due(1, Instant::now(), &mut seq);
        // Same generation: the cloud sees it is not newer than what it wrote.
        assert_eq!(generation(&again[0]), generation(&sent[0]));
        edge.outbox.acknowledged(1, &seqs(&again));
        edge.write();
        let edge = edge.restart();
        assert!(edge.outbox.due(1, Instant::now(), &mut seq).is_empty());
    }

    #[test]
    fn generations_grow_across_restarts_whatever_the_clock_says() {
        /// Receives and acknowledges reports in fresh sessions, as the cloud applies them:
        /// only if newer than what it has for the object. Checks that nothing older than
        /// what it has arrives, and that every new report is above all it saw before.
        #[derive(Default)]
        struct Cloud {
            seq: u64,
            session: u64,
            applied: BTreeMap<String, u64>,
            highest: u64,
        }
        impl Cloud {
            /// The generations applied.
            fn receive(&mut self, outbox: &Outbox) -> Vec<u64> {
                self.session += 1;
                let sent = outbox.due(self.session, Instant::now(), &mut self.seq);
                outbox.acknowledged(self.session, &seqs(&sent));
                let mut applied = Vec::new();
                for message in &sent {
                    let (_, name, g) = parts(message);
                    let g = g.expect("a status");
                    let last = self.applied.entry(name.clone()).or_default();
                    assert!(g >= *last, "{name}: {g} is older than {last}");
                    if g > *last {
                        assert!(g > self.highest, "{name}: {g} after {}", self.highest);
                        *last = g;
                        applied.push(g);
                    }
                }
                self.highest = applied.iter().copied().fold(self.highest, u64::max);
                applied
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let now_us: u64 = 1_750_000_000_000_000;
        let open = |clock: u64| {
            Outbox::open_with_clock(dir.path(), Arc::new(Metrics::default()), move || clock)
                .expect("open")
        };
        let report = |outbox: &Outbox, writer: &OutboxWriter, phase: &str| {
            outbox.put(pod("a"), status(phase));
            writer.write().expect("write");
        };
        let mut cloud = Cloud::default();
        // The first start seeds from the clock: above the clock-based generations of old.
        let (outbox, writer) = open(now_us);
        report(&outbox, &writer, "Pending");
        assert!(cloud.receive(&outbox)[0] >= now_us);
        report(&outbox, &writer, "Running");
        assert_eq!(cloud.receive(&outbox).len(), 1);
        drop((outbox, writer));
        // Clock set back ten minutes, then to the epoch: the counter in the store rules.
        for clock in [now_us - 600_000_000, 0] {
            let (outbox, writer) = open(clock);
            report(&outbox, &writer, &format!("after {clock}"));
            assert_eq!(cloud.receive(&outbox).len(), 1);
            drop((outbox, writer));
        }
        // Reports sent from memory while the disk is full, then a crash: the generations the
        // cloud saw are below the stored reservation, so the next start stays above them.
        let (outbox, writer) = open(0);
        lock(&writer.store).simulate_disk_full(true);
        let big = "x".repeat(256 * 1024);
        for i in 0..10 {
            outbox.put(
                pod(&format!("b{i}")),
                Report::Status(json!({ "message": big })),
            );
        }
        assert!(writer.write().is_err());
        assert_eq!(cloud.receive(&outbox).len(), 10, "sent from memory");
        drop((outbox, writer));
        let (outbox, writer) = open(0);
        report(&outbox, &writer, "after the crash");
        assert_eq!(cloud.receive(&outbox).len(), 1);
    }

    #[test]
    fn a_failed_write_keeps_reports_in_memory_and_recovers() {
        let edge = Edge::new();
        let now = Instant::now();
        let mut seq = 0;
        edge.outbox.put(pod("before"), status("Running"));
        edge.write();
        let store = edge.writer.store.clone();
        lock(&store).simulate_disk_full(true);
        let big = "x".repeat(256 * 1024);
        edge.outbox
            .put(pod("a"), Report::Status(json!({ "message": big })));
        let err = edge.writer.write().unwrap_err();
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
        assert_eq!(edge.metrics.outbox_write_errors.get(), 1);
        assert_eq!(edge.outbox.needs_write(), Some(Urgency::Now));
        // Reports covered by the stored reservation are sent from memory meanwhile.
        assert_eq!(names(&edge.outbox.due(1, now, &mut seq)), ["before", "a"]);
        // Forgetting and acknowledging while the disk is full is kept for later too.
        edge.outbox.forget(&pod("before"));
        assert!(edge.writer.write().is_err());
        assert_eq!(edge.metrics.outbox_write_errors.get(), 2);
        let text = edge.metrics.render();
        assert!(
            text.contains("edgecore_outbox_write_errors_total 2"),
            "{text}"
        );
        assert!(text.contains("edgecore_outbox_pending 1"), "{text}");

        lock(&store).simulate_disk_full(false);
        edge.write();
        assert_eq!(edge.outbox.needs_write(), None);
        let edge = edge.restart();
        assert_eq!(edge.outbox.last_status(&pod("before")), None);
        assert_eq!(
            edge.outbox.last_status(&pod("a")),
            Some(json!({ "message": big }))
        );
    }

    #[test]
    fn reports_of_pods_and_devices_the_store_no_longer_holds_are_dropped() {
        let edge = Edge::new();
        let device = |name: &str| ObjectRef {
            kind: "Device".into(),
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        };
        {
            let mut store = Store::open(edge.dir.path()).expect("open");
            let put = |kind: &str, name: &str| proto::sync::StoreOp::Put {
                key: proto::sync::ObjectKey::new(kind, "default", name),
                uid: format!("uid-{name}"),
                resource_version: 1,
                body: b"{}".to_vec(),
            };
            store
                .apply(&[put("Pod", "kept"), put("Device", "sensor")])
                .expect("apply");
        }
        edge.outbox.put(pod("kept"), status("Running"));
        edge.outbox.put(pod("gone"), Report::PodDeleted);
        edge.outbox
            .put(device("sensor"), Report::Status(json!({"state": "ok"})));
        edge.outbox
            .put(device("unbound"), Report::Status(json!({"state": "ok"})));
        let node = node();
        edge.outbox.put(node.clone(), Report::Status(json!({})));
        edge.write();
        assert_eq!(
            edge.writer.drop_reports_of_gone_objects().expect("check"),
            2
        );
        edge.write();
        let edge = edge.restart();
        let mut seq = 0;
        let sent = edge.outbox.due(1, Instant::now(), &mut seq);
        assert_eq!(names(&sent), ["kept", "sensor", "gw-1"]);
    }

    #[tokio::test]
    async fn the_writer_task_writes_puts_and_makes_them_due() {
        let edge = Edge::new();
        let shutdown = CancellationToken::new();
        let (_store_changed, store_changed_rx) = watch::channel(0);
        let task = tokio::spawn(edge.writer.clone().run(store_changed_rx, shutdown.clone()));
        let node = node();
        edge.outbox.put(node.clone(), status("Running"));
        let mut seq = 0;
        let sent = tokio::time::timeout(Duration::from_secs(10), next_due(&edge.outbox, &mut seq))
            .await
            .expect("sent within 10 s");
        edge.outbox.acknowledged(1, &seqs(&sent));
        shutdown.cancel();
        task.await.expect("writer task");
        let edge = edge.restart();
        assert!(edge.outbox.is_empty(), "the acknowledgement was written");
        assert!(edge.outbox.last_status(&node).is_some());
    }

    /// An acknowledgement makes the writer wait for more to share a commit; a report put
    /// meanwhile ends the wait. Paused clock: the wait is the only timer, so the virtual time
    /// that passes until the report is due is the time it waited.
    #[tokio::test(start_paused = true)]
    async fn a_report_does_not_wait_behind_an_acknowledgement() {
        let edge = Edge::new();
        let shutdown = CancellationToken::new();
        let (_store_changed, store_changed_rx) = watch::channel(0);
        let task = tokio::spawn(edge.writer.clone().run(store_changed_rx, shutdown.clone()));
        let node = node();
        let mut seq = 0;
        edge.outbox.put(node.clone(), status("Running"));
        let first = next_due(&edge.outbox, &mut seq).await;
        let paused = || edge.outbox.pauses.load(std::sync::atomic::Ordering::SeqCst);
        let before = paused();
        edge.outbox.acknowledged(1, &seqs(&first));
        // The writer sees the acknowledgement alone and starts its wait; the clock is paused,
        // so the wait cannot end by itself meanwhile.
        let mut turns = 0;
        while paused() == before {
            turns += 1;
            assert!(
                turns < 10_000,
                "the writer never began to wait after an acknowledgement"
            );
            tokio::task::yield_now().await;
        }
        let put_at = tokio::time::Instant::now();
        edge.outbox.put(node.clone(), status("Ready"));
        let second = next_due(&edge.outbox, &mut seq).await;
        assert_eq!(second.len(), 1);
        assert!(
            put_at.elapsed() < BOOKKEEPING_DELAY,
            "the report waited {:?} behind an acknowledgement",
            put_at.elapsed()
        );
        shutdown.cancel();
        task.await.expect("writer task");
    }
}
