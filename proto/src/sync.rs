//! The sync engine: what the cloud sends an edge and what the edge applies, with no IO.
//!
//! Two plain structs fed with messages and time, in the manner of quinn-proto:
//! - [`CloudPeer`] (one per edge, in cloudcore) holds the edge's *desired* set and what the edge
//!   is known to hold (its inventory at connect, then acknowledgements). It decides what to send:
//!   one message per object that differs, always at the object's latest version, so changes are
//!   coalesced; a bounded window of unacknowledged messages is the flow control; messages not
//!   acknowledged in time are sent again (at the then-latest version).
//! - [`EdgeReplica`] (in edgecore) decides how a received message changes the store. It never
//!   replaces a version with an older one, and ignores a message older than one it already
//!   applied for the same object in the session, so duplicates and reorders are harmless. The
//!   caller commits the resulting [`StoreOp`]s and only then acknowledges their `seq`s.
//!
//! Sequence numbers are per session: a new connection starts a new session, and the edge's
//! inventory in `Hello` tells the cloud where to start. Resource versions are the API server's,
//! compared as integers (etcd revisions and the embedded store's are one global counter).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::message::{HeldObject, Message, ObjectDelete, ObjectRef, ObjectUpsert};

/// Where an object lives on an edge: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        ObjectKey {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// The key of a wire object reference (its uid aside).
    pub fn of(object: &ObjectRef) -> Self {
        ObjectKey {
            kind: object.kind.clone(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
        }
    }

    /// The wire reference of this key with `uid`.
    pub fn to_ref(&self, uid: &str) -> ObjectRef {
        ObjectRef {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: uid.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The version of an object the cloud wants an edge to hold. The body is shared between every
/// edge that wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredObject {
    pub uid: String,
    pub resource_version: u64,
    pub body: Arc<[u8]>,
}

/// An object's identity and version, without its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub uid: String,
    pub resource_version: u64,
}

impl Version {
    /// Whether holding `self` makes sending `wanted` unnecessary: same object, not older; in
    /// a [`Resync::Replace`] session only exactly that version.
    fn covers(&self, wanted: &Version, resync: Resync) -> bool {
        match resync {
            Resync::Incremental => {
                self.uid == wanted.uid && self.resource_version >= wanted.resource_version
            }
            Resync::Replace => self == wanted,
        }
    }
}

/// How a session reconciles what the edge holds with the cloud's desired set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resync {
    /// The usual: versions only move forward; a held version at least as new as the desired
    /// one is kept.
    #[default]
    Incremental,
    /// An operator adopted the cloud's (new or restored) state for this edge: every object
    /// whose version differs is replaced, even by a lower resourceVersion, because the
    /// versions the edge holds came from another store's history.
    Replace,
}

/// The cloud's API store as the edges see it: who it is and how far its history goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudState {
    /// The store's identity: the `kube-system` Namespace's uid, new with every new store.
    pub id: String,
    /// The highest resourceVersion the store has issued.
    pub revision: u64,
}

/// Why an edge must not sync with a cloud state: applying its resync could wipe the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateMismatch {
    /// The store was replaced (lost and started empty, or another cluster).
    #[error(
        "the cloud's API store is not the one this edge synced with (store id {current}, the edge remembers {remembered}): it was lost and started anew, or replaced"
    )]
    IdentityChanged { remembered: String, current: String },
    /// The store went back in time (an older copy put in place without `store restore`).
    #[error(
        "the cloud's API store went back in time: its revision is {cloud} but the edge holds {object} at resourceVersion {held} (an older copy of the store was put in place without `cloudcore store restore`)"
    )]
    RevisionBehind {
        cloud: u64,
        held: u64,
        object: String,
    },
}

/// Whether an edge that remembers `remembered` (empty: nothing yet) and holds `inventory` may
/// sync with `cloud`. The same check runs on both sides of the tunnel. An empty id or a zero
/// revision means unknown (a cloud older than protocol 1.2) and is not checked.
pub fn check_state(
    cloud: &CloudState,
    remembered: &str,
    inventory: &[HeldObject],
) -> Result<(), StateMismatch> {
    if !remembered.is_empty() && !cloud.id.is_empty() && remembered != cloud.id {
        return Err(StateMismatch::IdentityChanged {
            remembered: remembered.to_string(),
            current: cloud.id.clone(),
        });
    }
    if cloud.revision > 0
        && let Some(newest) = inventory.iter().max_by_key(|h| h.resource_version)
        && newest.resource_version > cloud.revision
    {
        return Err(StateMismatch::RevisionBehind {
            cloud: cloud.revision,
            held: newest.resource_version,
            object: ObjectKey::of(&newest.object).to_string(),
        });
    }
    Ok(())
}

/// Limits of one edge's sync.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Most unacknowledged messages at once.
    pub window: usize,
    /// Most unacknowledged body bytes at once (one message is always allowed).
    pub window_bytes: usize,
    /// A message not acknowledged within this is sent again at the object's latest version.
    pub retry_after: Duration,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            window: 256,
            window_bytes: 8 * 1024 * 1024,
            retry_after: Duration::from_secs(30),
        }
    }
}

/// What a (re)connecting edge needs, from its inventory versus the desired set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncPlan {
    /// Objects the edge reported holding.
    pub held: usize,
    /// Objects the edge should hold.
    pub desired: usize,
    /// Objects to send: missing on the edge, or held at an older version or another uid.
    pub upserts: usize,
    /// Objects the edge holds that it should not.
    pub deletes: usize,
}

/// An acknowledgement the cloud cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("seq {seq} was never sent in this session (the next one is {next})")]
    NeverSent { seq: u64, next: u64 },
    #[error("acknowledgement outside a session")]
    NoSession,
}

/// What an acknowledgement confirmed: the edge durably holds `version` at `key` (or nothing,
/// for a delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub key: ObjectKey,
    pub version: Option<Version>,
}

/// Counters of one peer, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub upserts_sent: u64,
    pub deletes_sent: u64,
    pub retransmits: u64,
    pub acknowledged: u64,
}

#[derive(Debug)]
enum Sent {
    Upsert(Version),
    Delete,
}

#[derive(Debug)]
struct Flight {
    key: ObjectKey,
    sent: Sent,
    at: Instant,
    bytes: usize,
}

/// Per-connection state; gone when the connection is.
#[derive(Debug, Default)]
struct Session {
    next_seq: u64,
    /// Unacknowledged messages by seq; oldest first, so the first is the next to time out.
    flights: BTreeMap<u64, Flight>,
    bytes_in_flight: usize,
    /// The latest seq sent for each object in this session.
    latest: HashMap<ObjectKey, u64>,
    /// The latest seq acknowledged for each object in this session.
    acked: HashMap<ObjectKey, u64>,
    /// Objects whose last message timed out: it may still arrive, so the edge's state is
    /// unknown and the next message for them is sent whatever the edge is believed to hold.
    uncertain: HashSet<ObjectKey>,
    /// How this session compares versions.
    resync: Resync,
    /// Objects to look at, in the order they changed; each at most once.
    dirty: VecDeque<ObjectKey>,
    dirty_set: HashSet<ObjectKey>,
}

impl Session {
    fn mark(&mut self, key: &ObjectKey) {
        if self.dirty_set.insert(key.clone()) {
            self.dirty.push_back(key.clone());
        }
    }

    /// Frees what a session at rest no longer needs. `latest` and `acked` are only read for
    /// an object with a message in flight (an acknowledgement without its flight is ignored
    /// before `acked` is looked at, and `believed` falls back to `held`), so with nothing in
    /// flight they say nothing; the dirty queue is empty once everything has been sent. Each
    /// map keeps its capacity until replaced, a few hundred bytes per idle edge otherwise, and
    /// an emptied `BTreeMap` keeps its root node: 1.4 KiB of `flights` per idle edge.
    fn settle(&mut self) {
        if self.flights.is_empty() {
            self.flights = BTreeMap::new();
            self.latest = HashMap::new();
            self.acked = HashMap::new();
        }
        if self.dirty.is_empty() {
            self.dirty = VecDeque::new();
            self.dirty_set = HashSet::new();
        }
    }

    /// Whether the session holds no per-object bookkeeping (and no capacity for any).
    #[cfg(test)]
    fn is_settled(&self) -> bool {
        self.latest.capacity() == 0
            && self.acked.capacity() == 0
            && self.dirty.capacity() == 0
            && self.dirty_set.capacity() == 0
    }
}

/// The cloud's view of one edge: what it should hold, what it is known to hold, what is on
/// the way.
#[derive(Debug)]
pub struct CloudPeer {
    config: PeerConfig,
    desired: HashMap<ObjectKey, DesiredObject>,
    /// Confirmed by the edge: its inventory, then acknowledgements.
    held: HashMap<ObjectKey, Version>,
    session: Option<Session>,
    stats: PeerStats,
}

impl CloudPeer {
    /// A peer with nothing desired and no session.
    pub fn new(config: PeerConfig) -> Self {
        CloudPeer {
            config,
            desired: HashMap::new(),
            held: HashMap::new(),
            session: None,
            stats: PeerStats::default(),
        }
    }

    /// Sets (or with `None` clears) what the edge should hold at `key`.
    pub fn set_desired(&mut self, key: ObjectKey, object: Option<DesiredObject>) {
        let changed = match object {
            Some(object) => self.desired.insert(key.clone(), object.clone()) != Some(object),
            None => self.desired.remove(&key).is_some(),
        };
        if changed && let Some(session) = &mut self.session {
            session.mark(&key);
        }
    }

    /// What the edge should hold at `key`, if anything: the node-scoped authorization check.
    pub fn desired(&self, key: &ObjectKey) -> Option<&DesiredObject> {
        self.desired.get(key)
    }

    /// Number of objects the edge should hold.
    pub fn desired_len(&self) -> usize {
        self.desired.len()
    }

    /// A new session started; `inventory` is what the edge's store holds. Plans the
    /// difference, which the following [`poll_transmit`](Self::poll_transmit) calls send.
    pub fn connect(&mut self, inventory: impl IntoIterator<Item = HeldObject>) -> ResyncPlan {
        self.connect_with(inventory, Resync::Incremental)
    }

    /// [`connect`](Self::connect) with a choice of how versions compare in this session.
    pub fn connect_with(
        &mut self,
        inventory: impl IntoIterator<Item = HeldObject>,
        resync: Resync,
    ) -> ResyncPlan {
        self.held = inventory
            .into_iter()
            .map(|h| {
                (
                    ObjectKey::of(&h.object),
                    Version {
                        uid: h.object.uid,
                        resource_version: h.resource_version,
                    },
                )
            })
            .collect();
        let mut session = Session {
            resync,
            ..Session::default()
        };
        let mut plan = ResyncPlan {
            held: self.held.len(),
            desired: self.desired.len(),
            ..ResyncPlan::default()
        };
        let mut differing: Vec<&ObjectKey> = Vec::new();
        for (key, want) in &self.desired {
            let want = Version {
                uid: want.uid.clone(),
                resource_version: want.resource_version,
            };
            if !self
                .held
                .get(key)
                .is_some_and(|have| have.covers(&want, resync))
            {
                plan.upserts += 1;
                differing.push(key);
            }
        }
        for key in self.held.keys() {
            if !self.desired.contains_key(key) {
                plan.deletes += 1;
                differing.push(key);
            }
        }
        // Deterministic order: pods after what they reference would be nicer, but any order
        // converges; sorting keeps runs reproducible.
        differing.sort();
        for key in differing {
            session.mark(key);
        }
        self.session = Some(session);
        plan
    }

    /// The session ended; what is on the way is lost with it.
    pub fn disconnect(&mut self) {
        self.session = None;
    }

    /// Whether a session is open.
    pub fn is_connected(&self) -> bool {
        self.session.is_some()
    }

    /// Whether the edge is known to hold exactly the desired set: nothing to send, nothing
    /// unacknowledged.
    pub fn is_synced(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.dirty.is_empty() && s.flights.is_empty())
    }

    /// Counters since this peer was created.
    pub fn stats(&self) -> PeerStats {
        self.stats
    }

    /// Messages sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.session.as_ref().map_or(0, |s| s.flights.len())
    }

    /// The edge asks for `key` (it does not hold it): send it again if the edge may see it.
    /// Returns whether it may.
    pub fn request(&mut self, key: &ObjectKey) -> bool {
        if !self.desired.contains_key(key) {
            return false;
        }
        self.held.remove(key);
        if let Some(session) = &mut self.session {
            session.latest.remove(key);
            session.mark(key);
        }
        true
    }

    /// What the edge will hold at `key` once everything sent so far is applied.
    fn believed(&self, session: &Session, key: &ObjectKey) -> Option<Version> {
        if let Some(flight) = session.latest.get(key).and_then(|s| session.flights.get(s)) {
            return match &flight.sent {
                Sent::Upsert(v) => Some(v.clone()),
                Sent::Delete => None,
            };
        }
        self.held.get(key).cloned()
    }

    /// The next message to send, if the window allows and anything differs.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Message> {
        let mut session = self.session.take()?;
        let message = self.next_message(&mut session, now);
        self.session = Some(session);
        message
    }

    fn next_message(&mut self, session: &mut Session, now: Instant) -> Option<Message> {
        loop {
            let window_open = session.flights.len() < self.config.window
                && (session.flights.is_empty()
                    || session.bytes_in_flight < self.config.window_bytes);
            if !window_open {
                return None;
            }
            let key = session.dirty.pop_front()?;
            session.dirty_set.remove(&key);
            let believed = self.believed(session, &key);
            let uncertain = session.uncertain.remove(&key);
            let seq = session.next_seq;
            let (message, sent, bytes) = match (self.desired.get(&key), believed) {
                (None, None) if !uncertain => continue,
                (None, None) => (
                    Message::Delete(ObjectDelete {
                        seq,
                        object: key.to_ref(""),
                        resource_version: 0,
                    }),
                    Sent::Delete,
                    0,
                ),
                (None, Some(have)) => (
                    Message::Delete(ObjectDelete {
                        seq,
                        object: key.to_ref(&have.uid),
                        resource_version: have.resource_version,
                    }),
                    Sent::Delete,
                    0,
                ),
                (Some(want), have) => {
                    let version = Version {
                        uid: want.uid.clone(),
                        resource_version: want.resource_version,
                    };
                    if !uncertain && have.is_some_and(|h| h.covers(&version, session.resync)) {
                        continue;
                    }
                    (
                        Message::Upsert(ObjectUpsert {
                            seq,
                            object: key.to_ref(&want.uid),
                            resource_version: want.resource_version,
                            body: want.body.to_vec(),
                        }),
                        Sent::Upsert(version),
                        want.body.len(),
                    )
                }
            };
            match sent {
                Sent::Upsert(_) => self.stats.upserts_sent += 1,
                Sent::Delete => self.stats.deletes_sent += 1,
            }
            session.next_seq += 1;
            session.latest.insert(key.clone(), seq);
            session.bytes_in_flight += bytes;
            session.flights.insert(
                seq,
                Flight {
                    key,
                    sent,
                    at: now,
                    bytes,
                },
            );
            return Some(message);
        }
    }

    /// The edge made message `seq` durable. A seq acknowledged twice, or after it was sent
    /// again, is ignored; one never sent is an error. Returns what the edge now holds when the
    /// acknowledgement changed the cloud's view.
    pub fn on_ack(&mut self, seq: u64) -> Result<Option<Acked>, AckError> {
        let acked = self.acknowledge(seq);
        if let Some(session) = &mut self.session {
            session.settle();
        }
        acked
    }

    fn acknowledge(&mut self, seq: u64) -> Result<Option<Acked>, AckError> {
        let session = self.session.as_mut().ok_or(AckError::NoSession)?;
        if seq >= session.next_seq {
            return Err(AckError::NeverSent {
                seq,
                next: session.next_seq,
            });
        }
        let Some(flight) = session.flights.remove(&seq) else {
            return Ok(None);
        };
        self.stats.acknowledged += 1;
        session.bytes_in_flight -= flight.bytes;
        if session.acked.get(&flight.key).is_some_and(|&a| a > seq) {
            // A later message for this object was acknowledged first; it wins.
            return Ok(None);
        }
        session.acked.insert(flight.key.clone(), seq);
        let version = match flight.sent {
            Sent::Upsert(version) => {
                self.held.insert(flight.key.clone(), version.clone());
                Some(version)
            }
            Sent::Delete => {
                self.held.remove(&flight.key);
                None
            }
        };
        Ok(Some(Acked {
            key: flight.key,
            version,
        }))
    }

    /// When [`handle_timeout`](Self::handle_timeout) has work to do next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let session = self.session.as_ref()?;
        let (_, oldest) = session.flights.first_key_value()?;
        Some(oldest.at + self.config.retry_after)
    }

    /// Marks messages unacknowledged for longer than `retry_after` to be sent again.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(session) = &mut self.session else {
            return;
        };
        while let Some(entry) = session.flights.first_entry() {
            if entry.get().at + self.config.retry_after > now {
                break;
            }
            let (seq, flight) = entry.remove_entry();
            session.bytes_in_flight -= flight.bytes;
            if session.latest.get(&flight.key) == Some(&seq) {
                session.latest.remove(&flight.key);
            }
            session.uncertain.insert(flight.key.clone());
            self.stats.retransmits += 1;
            session.mark(&flight.key);
        }
    }
}

/// A change to the edge's store, decided by [`EdgeReplica::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    Put {
        key: ObjectKey,
        uid: String,
        resource_version: u64,
        body: Vec<u8>,
    },
    Delete {
        key: ObjectKey,
    },
}

/// Why a received message did not change the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// A later message for the object was already applied in this session.
    Superseded,
    /// The store holds this version or a newer one.
    NotNewer,
    /// A delete of something the store does not hold.
    Absent,
}

/// The outcome of one object message: acknowledge `seq` once `op` (if any) is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub seq: u64,
    pub op: Result<StoreOp, Skipped>,
}

/// The edge's side: the versions its store holds, and the session's ordering guard.
#[derive(Debug, Default)]
pub struct EdgeReplica {
    held: HashMap<ObjectKey, Version>,
    /// The latest seq applied per object in this session.
    applied: HashMap<ObjectKey, u64>,
    /// How this session compares versions.
    resync: Resync,
}

impl EdgeReplica {
    /// A replica of a store that holds `held`.
    pub fn new(held: impl IntoIterator<Item = HeldObject>) -> Self {
        EdgeReplica {
            held: held
                .into_iter()
                .map(|h| {
                    (
                        ObjectKey::of(&h.object),
                        Version {
                            uid: h.object.uid,
                            resource_version: h.resource_version,
                        },
                    )
                })
                .collect(),
            applied: HashMap::new(),
            resync: Resync::Incremental,
        }
    }

    /// A new session starts; returns the inventory to send in `Hello`. The session is
    /// [`Resync::Incremental`] until [`adopt`](Self::adopt).
    pub fn start_session(&mut self) -> Vec<HeldObject> {
        self.applied.clear();
        self.resync = Resync::Incremental;
        let mut inventory: Vec<HeldObject> = self
            .held
            .iter()
            .map(|(key, v)| HeldObject {
                object: key.to_ref(&v.uid),
                resource_version: v.resource_version,
            })
            .collect();
        inventory.sort_by(|a, b| a.object.cmp(&b.object));
        inventory
    }

    /// The cloud said an operator adopted its state for this edge: for the rest of this
    /// session an upsert replaces any held version that differs, older or not.
    pub fn adopt(&mut self) {
        self.resync = Resync::Replace;
    }

    /// The version held at `key`.
    pub fn held(&self, key: &ObjectKey) -> Option<&Version> {
        self.held.get(key)
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn superseded(&mut self, key: &ObjectKey, seq: u64) -> bool {
        match self.applied.get(key) {
            Some(&last) if last >= seq => true,
            _ => {
                self.applied.insert(key.clone(), seq);
                false
            }
        }
    }

    /// Decides what an upsert does to the store.
    pub fn upsert(&mut self, message: ObjectUpsert) -> Step {
        let key = ObjectKey::of(&message.object);
        let seq = message.seq;
        if self.superseded(&key, seq) {
            return Step {
                seq,
                op: Err(Skipped::Superseded),
            };
        }
        let version = Version {
            uid: message.object.uid,
            resource_version: message.resource_version,
        };
        if let Some(have) = self.held.get(&key) {
            // Same object at the same or a newer version, or another object (uid) that is
            // newer: never go back (unless an operator adopted a new history).
            let keep = match self.resync {
                Resync::Incremental => have.resource_version > version.resource_version,
                Resync::Replace => false,
            };
            if keep || have == &version {
                return Step {
                    seq,
                    op: Err(Skipped::NotNewer),
                };
            }
        }
        self.held.insert(key.clone(), version.clone());
        Step {
            seq,
            op: Ok(StoreOp::Put {
                key,
                uid: version.uid,
                resource_version: version.resource_version,
                body: message.body,
            }),
        }
    }

    /// Decides what a delete does to the store.
    pub fn delete(&mut self, message: ObjectDelete) -> Step {
        let key = ObjectKey::of(&message.object);
        let seq = message.seq;
        if self.superseded(&key, seq) {
            return Step {
                seq,
                op: Err(Skipped::Superseded),
            };
        }
        match self.held.remove(&key) {
            Some(_) => Step {
                seq,
                op: Ok(StoreOp::Delete { key }),
            },
            None => Step {
                seq,
                op: Err(Skipped::Absent),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("ConfigMap", "default", name)
    }

    fn object(uid: &str, rv: u64) -> DesiredObject {
        DesiredObject {
            uid: uid.into(),
            resource_version: rv,
            body: Arc::from(format!("{{\"rv\":{rv}}}").into_bytes()),
        }
    }

    fn held(name: &str, uid: &str, rv: u64) -> HeldObject {
        HeldObject {
            object: key(name).to_ref(uid),
            resource_version: rv,
        }
    }

    fn drain(peer: &mut CloudPeer, now: Instant) -> Vec<Message> {
        std::iter::from_fn(|| peer.poll_transmit(now)).collect()
    }

    #[test]
    fn resync_sends_only_the_difference() {
        let mut peer = CloudPeer::new(PeerConfig::default());
        peer.set_desired(key("same"), Some(object("u1", 5)));
        peer.set_desired(key("newer"), Some(object("u2", 9)));
        peer.set_desired(key("missing"), Some(object("u3", 3)));
        peer.set_desired(key("recreated"), Some(object("u9", 12)));
        let plan = peer.connect([
            held("same", "u1", 5),
            held("newer", "u2", 7),
            held("recreated", "u4", 2),
            held("gone", "u5", 4),
        ]);
        assert_eq!(
            plan,
            ResyncPlan {
                held: 4,
                desired: 4,
                upserts: 3,
                deletes: 1
            }
        );
        let sent = drain(&mut peer, Instant::now());
        let mut names: Vec<(&str, String)> = sent
            .iter()
            .map(|m| match m {
                Message::Upsert(u) => ("upsert", u.object.name.clone()),
                Message::Delete(d) => ("delete", d.object.name.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("delete", "gone".to_string()),
                ("upsert", "missing".to_string()),
                ("upsert", "newer".to_string()),
                ("upsert", "recreated".to_string()),
            ]
        );
    }

    #[test]
    fn a_hundred_changes_behind_a_full_window_are_sent_once_at_the_latest_version() {
        let mut peer = CloudPeer::new(PeerConfig {
            window: 1,
            ..PeerConfig::default()
        });
        let now = Instant::now();
        peer.connect([]);
        peer.set_desired(key("blocker"), Some(object("b", 1)));
        let first = peer.poll_transmit(now).expect("first message");
        for rv in 2..=101 {
            peer.set_desired(key("hot"), Some(object("h", rv)));
            assert!(peer.poll_transmit(now).is_none(), "window of one is full");
        }
        let Message::Upsert(first) = first else {
            panic!("expected an upsert")
        };
        peer.on_ack(first.seq).expect("ack");
        let sent = drain(&mut peer, now);
        assert_eq!(sent.len(), 1);
        assert!(matches!(&sent[0], Message::Upsert(u) if u.resource_version == 101));
    }

    #[test]
    fn unacknowledged_messages_are_sent_again_after_the_retry_interval() {
        let config = PeerConfig::default();
        let retry = config.retry_after;
        let mut peer = CloudPeer::new(config);
        let start = Instant::now();
        peer.connect([]);
        peer.set_desired(key("a"), Some(object("u", 1)));
        assert_eq!(drain(&mut peer, start).len(), 1);
        assert_eq!(peer.poll_timeout(), Some(start + retry));
        peer.handle_timeout(start + retry - Duration::from_millis(1));
        assert!(drain(&mut peer, start).is_empty());
        peer.handle_timeout(start + retry);
        let again = drain(&mut peer, start + retry);
        assert_eq!(again.len(), 1);
        assert_eq!(peer.stats().retransmits, 1);
    }

    #[test]
    fn a_session_at_rest_holds_no_bookkeeping_and_still_ignores_a_late_ack() {
        let config = PeerConfig::default();
        let retry = config.retry_after;
        let mut peer = CloudPeer::new(config);
        let start = Instant::now();
        peer.connect([held("a", "u", 1)]);
        for name in ["a", "b", "c"] {
            peer.set_desired(key(name), Some(object("u", 2)));
        }
        let sent = drain(&mut peer, start);
        assert_eq!(sent.len(), 3);
        let seqs: Vec<u64> = sent
            .iter()
            .map(|m| match m {
                Message::Upsert(u) => u.seq,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        // "a" times out and is sent again; the others are acknowledged.
        peer.on_ack(seqs[1]).expect("ack b");
        peer.on_ack(seqs[2]).expect("ack c");
        assert!(!peer.session.as_ref().expect("session").is_settled());
        peer.handle_timeout(start + retry);
        let again = drain(&mut peer, start + retry);
        let [Message::Upsert(again)] = again.as_slice() else {
            panic!("expected one upsert, got {again:?}")
        };
        // The late ack of the first "a" changes nothing: its flight is gone.
        assert_eq!(peer.on_ack(seqs[0]), Ok(None));
        assert_eq!(
            peer.held.get(&key("a")).map(|v| v.resource_version),
            Some(1)
        );
        let acked = peer.on_ack(again.seq).expect("ack a").expect("a changed");
        assert_eq!(acked.version.map(|v| v.resource_version), Some(2));
        assert!(peer.is_synced());
        assert!(peer.session.as_ref().expect("session").is_settled());
        // A change after rest is sent and acknowledged as before.
        peer.set_desired(key("b"), Some(object("u", 3)));
        let sent = drain(&mut peer, start + retry);
        let [Message::Upsert(next)] = sent.as_slice() else {
            panic!("expected one upsert, got {sent:?}")
        };
        assert_eq!(next.resource_version, 3);
        assert!(peer.on_ack(next.seq).expect("ack").is_some());
        assert_eq!(peer.on_ack(next.seq), Ok(None), "a duplicate is ignored");
        assert!(peer.session.as_ref().expect("session").is_settled());
    }

    #[test]
    fn acks_for_seqs_never_sent_are_refused() {
        let mut peer = CloudPeer::new(PeerConfig::default());
        assert_eq!(peer.on_ack(0), Err(AckError::NoSession));
        peer.connect([]);
        assert_eq!(peer.on_ack(7), Err(AckError::NeverSent { seq: 7, next: 0 }));
    }

    #[test]
    fn byte_window_holds_back_large_bodies_but_always_lets_one_through() {
        let mut peer = CloudPeer::new(PeerConfig {
            window_bytes: 10,
            ..PeerConfig::default()
        });
        peer.connect([]);
        let big = DesiredObject {
            uid: "u".into(),
            resource_version: 1,
            body: Arc::from(vec![0u8; 100]),
        };
        peer.set_desired(key("a"), Some(big.clone()));
        peer.set_desired(key("b"), Some(big));
        assert_eq!(drain(&mut peer, Instant::now()).len(), 1);
    }

    #[test]
    fn edge_never_goes_back_to_an_older_version() {
        let mut edge = EdgeReplica::new([held("a", "u", 10)]);
        edge.start_session();
        let step = edge.upsert(ObjectUpsert {
            seq: 0,
            object: key("a").to_ref("u"),
            resource_version: 9,
            body: vec![],
        });
        assert_eq!(step.op, Err(Skipped::NotNewer));
        assert_eq!(edge.held(&key("a")).map(|v| v.resource_version), Some(10));
    }

    #[test]
    fn an_adopted_session_replaces_what_differs_even_with_a_lower_version() {
        let mut peer = CloudPeer::new(PeerConfig::default());
        peer.set_desired(key("older"), Some(object("u1", 8)));
        peer.set_desired(key("same"), Some(object("u2", 3)));
        let plan = peer.connect_with(
            [held("older", "u1", 65), held("same", "u2", 3)],
            Resync::Replace,
        );
        assert_eq!(plan.upserts, 1);
        let sent = drain(&mut peer, Instant::now());
        assert_eq!(sent.len(), 1);
        let Message::Upsert(upsert) = sent.into_iter().next().expect("one") else {
            panic!("expected an upsert")
        };
        assert_eq!(upsert.resource_version, 8);

        let mut edge = EdgeReplica::new([held("older", "u1", 65)]);
        edge.start_session();
        edge.adopt();
        assert!(edge.upsert(upsert.clone()).op.is_ok());
        assert_eq!(
            edge.held(&key("older")).map(|v| v.resource_version),
            Some(8)
        );
        // The next session is incremental again.
        let mut edge = EdgeReplica::new([held("older", "u1", 65)]);
        edge.start_session();
        assert_eq!(edge.upsert(upsert).op, Err(Skipped::NotNewer));
    }

    #[test]
    fn state_checks_name_a_replaced_store_and_one_that_went_back() {
        let cloud = CloudState {
            id: "new".into(),
            revision: 20,
        };
        assert_eq!(check_state(&cloud, "", &[held("a", "u", 20)]), Ok(()));
        assert_eq!(check_state(&cloud, "new", &[]), Ok(()));
        assert!(matches!(
            check_state(&cloud, "old", &[]),
            Err(StateMismatch::IdentityChanged { .. })
        ));
        let behind = check_state(&cloud, "new", &[held("a", "u", 5), held("b", "u", 65)]);
        assert_eq!(
            behind,
            Err(StateMismatch::RevisionBehind {
                cloud: 20,
                held: 65,
                object: "ConfigMap default/b".into()
            })
        );
        // A cloud older than 1.2 sends neither: nothing can be checked.
        assert_eq!(
            check_state(&CloudState::default(), "old", &[held("a", "u", 65)]),
            Ok(())
        );
    }

    #[test]
    fn edge_ignores_a_message_older_than_one_applied_in_the_session() {
        let mut edge = EdgeReplica::default();
        edge.start_session();
        let delete = edge.delete(ObjectDelete {
            seq: 5,
            object: key("a").to_ref("u"),
            resource_version: 1,
        });
        assert_eq!(delete.op, Err(Skipped::Absent));
        let late = edge.upsert(ObjectUpsert {
            seq: 3,
            object: key("a").to_ref("u"),
            resource_version: 1,
            body: vec![],
        });
        assert_eq!(late.op, Err(Skipped::Superseded));
        assert!(edge.is_empty());
    }
}
