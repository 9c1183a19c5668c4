//! The embedded control plane's durable object store: objects and watch events in SQLite, the
//! global resourceVersion, and the fan-out of live events to watchers. It knows nothing of HTTP.
//!
//! Every write is one SQLite transaction that replaces the object row, appends an event row and
//! advances the global resourceVersion (rv) in `meta`; after the commit the event is published to
//! live watchers while the writer lock is still held, so live events go out in rv order. Every
//! rv has exactly one event, so the retained events are the contiguous range
//! `compacted + 1 ..= rv`. A MODIFIED or DELETED event keeps the body it replaced, so a list
//! at any retained rv can be rebuilt ([`Store::list_at`]: pages of one list, exact lists).
//!
//! One process writes the file: rvs stay unique even if another connection writes (each write
//! reads the rv inside its transaction), but only this process's writes reach its watchers.
//!
//! All SQLite work happens on the calling thread (callers on a runtime use `spawn_blocking`);
//! only [`Watch::next`] is async.

use std::collections::{BTreeMap, VecDeque};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use serde_json::Value;
use tokio::sync::broadcast;

/// The schema this build writes; older files are migrated by [`migrate`], newer ones refused.
/// The schema migrations in order (`daemon::sqlite::migrate`); append only.
const MIGRATIONS: &[&str] = &[SCHEMA_V1];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const SCHEMA_V1: &str = r#"
CREATE TABLE objects (
    "group" TEXT NOT NULL,
    resource TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    rv INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY ("group", resource, namespace, name)
);
CREATE TABLE events (
    rv INTEGER PRIMARY KEY,
    "group" TEXT NOT NULL,
    resource TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('ADDED', 'MODIFIED', 'DELETED')),
    body TEXT NOT NULL,
    -- The object before a MODIFIED event, so filtered watches can tell an object that
    -- started or stopped matching (sent as ADDED or DELETED, as the apiserver does).
    prev_body TEXT
);
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    rv INTEGER NOT NULL,
    compacted INTEGER NOT NULL
);
INSERT INTO meta (id, rv, compacted) VALUES (1, 0, 0);
"#;

/// Idle read connections kept for reuse; more are opened under load and closed afterwards.
const MAX_IDLE_READERS: usize = 4;

/// Which collection: API group ("" for core) and plural resource name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    /// The API group, "" for the core group.
    pub group: String,
    /// The plural resource name, e.g. `pods`.
    pub resource: String,
}

/// What happened to an object, in Kubernetes watch vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created.
    Added,
    /// The object was replaced.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The Kubernetes watch event type: `ADDED`, `MODIFIED` or `DELETED`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "ADDED" => Some(EventType::Added),
            "MODIFIED" => Some(EventType::Modified),
            "DELETED" => Some(EventType::Deleted),
            _ => None,
        }
    }
}

/// One committed change, as stored in the events table and delivered to watchers.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// The resourceVersion of this change (also the object's `metadata.resourceVersion`).
    pub rv: u64,
    /// What happened.
    pub event_type: EventType,
    /// The collection the object belongs to.
    pub resource: ResourceId,
    /// The object's namespace ("" for cluster-scoped objects).
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// The object after the change; for a deletion, the object as deleted.
    pub object: Arc<Value>,
    /// For `Modified`: the object as it was before this change.
    pub previous: Option<Arc<Value>>,
    /// `object` serialized, once for every watcher that passes it on unchanged
    /// ([`WatchEvent::object_json`]).
    pub encoded: OnceLock<Box<serde_json::value::RawValue>>,
}

impl WatchEvent {
    /// `object` as JSON text, serialized by the first watcher that asks and shared with the
    /// rest (the event reaches every watcher of its collection behind one `Arc`).
    pub fn object_json(&self) -> Result<&serde_json::value::RawValue, serde_json::Error> {
        if let Some(encoded) = self.encoded.get() {
            return Ok(encoded);
        }
        let encoded = serde_json::value::to_raw_value(self.object.as_ref())?;
        Ok(self.encoded.get_or_init(|| encoded))
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Create of an object that exists.
    #[error("object already exists")]
    AlreadyExists,
    /// Update or delete of an object that does not exist.
    #[error("object not found")]
    NotFound,
    /// The resourceVersion precondition did not hold.
    #[error(
        "the object has been modified: resourceVersion is {current}, the request expected {expected}"
    )]
    Conflict {
        /// The object's current resourceVersion.
        current: u64,
        /// The resourceVersion the request required.
        expected: u64,
    },
    /// A watch asked for events that were compacted away; the client must list again.
    #[error("resourceVersion {requested} is too old: the oldest retained event is {oldest}")]
    Gone {
        /// The resourceVersion the watch started from.
        requested: u64,
        /// The oldest event still retained; watching from `oldest - 1` or later works.
        oldest: u64,
    },
    /// SQLite reported `SQLITE_FULL`; the transaction was rolled back and nothing was written.
    #[error("disk full writing api database {path}: nothing was written")]
    DiskFull {
        /// The database file.
        path: PathBuf,
    },
    /// The file was written by a newer cloudcore.
    #[error(
        "api database {path} has schema version {found}, newer than this cloudcore supports ({SCHEMA_VERSION}); refusing to touch it"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The schema version found in `PRAGMA user_version`.
        found: i64,
    },
    /// The file could not be opened or is not a usable SQLite database (e.g. corrupt).
    #[error("cannot open api database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("api database query failed")]
    Sql(#[from] rusqlite::Error),
    /// The object cannot be stored, e.g. it is not a JSON object or has no `metadata` object.
    #[error("invalid object: {0}")]
    InvalidObject(String),
}

/// Which part of a collection [`Store::scan`] reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scan<'a> {
    /// One namespace, or all.
    pub namespace: Option<&'a str>,
    /// `None`: the latest version; `Some(rv)`: the collection as it was at `rv`, rebuilt from
    /// the event history (see [`Store::list_at`]).
    pub at: Option<u64>,
    /// Only objects whose list key ([`list_key`]) is at least this key, compared before the
    /// body is parsed: (start key, whether the list is across namespaces).
    pub from_key: Option<(&'a str, bool)>,
}

/// One object of a [`Store::scan_rows`], not read or parsed yet.
pub struct ScanRow<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    body: RowBody<'a>,
}

/// Where a [`ScanRow`]'s body comes from.
enum RowBody<'a> {
    /// Already read: the object as it was at an older rv, from the event history's
    /// `prev_body` (column 3).
    History(&'a str),
    /// In the objects table, read when asked for, in the scan's own read transaction (so from
    /// the same snapshot). Rows that are only counted never have their body read.
    Stored {
        conn: &'a Connection,
        resource: &'a ResourceId,
    },
}

impl<'a> ScanRow<'a> {
    /// The object's stored JSON text.
    pub fn body(&self) -> Result<std::borrow::Cow<'a, str>, StoreError> {
        match self.body {
            RowBody::History(body) => Ok(std::borrow::Cow::Borrowed(body)),
            RowBody::Stored { conn, resource } => {
                stored_body(conn, resource, self.namespace, self.name)?
                    .map(std::borrow::Cow::Owned)
                    .ok_or(StoreError::Sql(rusqlite::Error::QueryReturnedNoRows))
            }
        }
    }

    /// The object, parsed.
    pub fn object(&self) -> Result<Value, StoreError> {
        let body = self.body()?;
        serde_json::from_str::<Value>(&body).map_err(|e| self.unreadable(e))
    }

    /// The object, parsed, if its stored text passes `keep`: the body is read once, and
    /// parsed only then (a search for a uid in every row parses only the rows that name it).
    pub fn object_if(&self, keep: impl FnOnce(&str) -> bool) -> Result<Option<Value>, StoreError> {
        let body = self.body()?;
        if !keep(&body) {
            return Ok(None);
        }
        serde_json::from_str::<Value>(&body)
            .map(Some)
            .map_err(|e| self.unreadable(e))
    }

    /// The object's JSON text as it is stored, checked to be JSON but not parsed into a
    /// tree: for answers that pass objects on unchanged.
    pub fn raw(&self) -> Result<Box<serde_json::value::RawValue>, StoreError> {
        let body = self.body()?.into_owned();
        serde_json::value::RawValue::from_string(body).map_err(|e| self.unreadable(e))
    }

    fn unreadable(&self, e: serde_json::Error) -> StoreError {
        let column = match self.body {
            RowBody::History(_) => 3,
            RowBody::Stored { .. } => 2,
        };
        StoreError::Sql(unreadable_json(column, e))
    }
}

/// An object's key in a list, as the apiserver orders pages: `name`, or `namespace/name` for a
/// namespaced object in a list across namespaces.
pub fn list_key(namespace: &str, name: &str, across_namespaces: bool) -> String {
    if across_namespaces && !namespace.is_empty() {
        format!("{namespace}/{name}")
    } else {
        name.to_string()
    }
}

/// Tuning for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How many of the newest events are kept for watches that resume from an older rv.
    pub event_retention: usize,
    /// How many live events a watcher may fall behind before its watch ends.
    pub watch_buffer: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            event_retention: 10_000,
            // A write publishes its events at once (a batch of Lease renewals: up to 500,
            // `nodes::RENEWALS_PER_COMMIT`), and every watcher must hold all of them until it
            // runs. Memory: the buffer keeps the last this many events alive.
            watch_buffer: 4096,
        }
    }
}

/// The object store. Cheap to clone; all clones share one database and one event stream.
/// Debug shows the path only.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    event_retention: u64,
    /// The only connection that writes. The lock also orders publication: events are sent while
    /// it is held, and [`Store::watch`] subscribes under it, so a watcher's snapshot rv and its
    /// live stream meet exactly.
    writer: Mutex<Connection>,
    /// Idle read connections. WAL lets them read while the writer commits, so gets, lists and
    /// watch replays never wait for a write's fsync.
    readers: Mutex<Vec<Connection>>,
    /// The latest committed rv; written only under `writer`.
    rv: AtomicU64,
    /// Live events for watchers.
    events: broadcast::Sender<Arc<WatchEvent>>,
}

/// What a write does to one object.
enum Change {
    Create(Value),
    Update(Value, Option<u64>),
    Delete(Option<u64>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the database at `path`, creating and migrating it if needed. A file with a newer
    /// schema or one that is not a SQLite database is refused and left untouched.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        daemon::sqlite::create_private(path).map_err(|e| {
            open_err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(daemon::error_chain(&e)),
            ))
        })?;
        let mut conn =
            daemon::sqlite::open(path, daemon::sqlite::read_write()).map_err(open_err)?;
        // Read before anything writes to the file: a corrupt file fails here, a newer one is
        // refused here, and neither is modified.
        let version = daemon::sqlite::schema_version(&conn).map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
            });
        }
        // FULL: a write that returned success survives a power cut.
        let mode = daemon::sqlite::make_durable(&conn).map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "api database is not in WAL mode");
        }
        migrate(&mut conn, path)?;

        let event_retention = u64::try_from(options.event_retention).unwrap_or(u64::MAX);
        let rv = {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (rv, compacted) = read_meta(&tx)?;
            compact(&tx, rv, compacted, event_retention)?;
            tx.commit()?;
            rv
        };
        tracing::debug!(path = %path.display(), rv, "api store opened");
        let (events, _) = broadcast::channel(options.watch_buffer.max(1));
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                event_retention,
                writer: Mutex::new(conn),
                readers: Mutex::new(Vec::new()),
                rv: AtomicU64::new(rv),
                events,
            }),
        })
    }

    /// The latest committed resourceVersion (0 for an empty store).
    pub fn resource_version(&self) -> u64 {
        self.inner.rv.load(Ordering::SeqCst)
    }

    /// One object, or `None` if it does not exist.
    pub fn get(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, StoreError> {
        self.read(|tx| {
            let Some(body) = stored_body(tx, r, namespace, name)? else {
                return Ok(None);
            };
            serde_json::from_str(&body)
                .map(Some)
                .map_err(|e| StoreError::Sql(unreadable_json(0, e)))
        })
    }

    /// Every object of the collection (optionally one namespace), in list-key order
    /// ([`list_key`] across namespaces), and the rv they were read at.
    pub fn list(
        &self,
        r: &ResourceId,
        namespace: Option<&str>,
    ) -> Result<(Vec<Value>, u64), StoreError> {
        let mut objects = Vec::new();
        let rv = self.scan(
            r,
            Scan {
                namespace,
                ..Scan::default()
            },
            |o| objects.push(o),
        )?;
        Ok((objects, rv))
    }

    /// The list as it was at `rv` (sorted by (namespace, name)): the current objects with the
    /// changes after `rv` undone from the event history (an object added since is left out,
    /// one modified or deleted since is taken as it was before). Gone when events after `rv`
    /// were compacted (or a deletion's event predates the prior body being kept), or when
    /// `rv` is newer than the store.
    pub fn list_at(
        &self,
        r: &ResourceId,
        namespace: Option<&str>,
        rv: u64,
    ) -> Result<Vec<Value>, StoreError> {
        let mut objects = Vec::new();
        self.scan(
            r,
            Scan {
                namespace,
                at: Some(rv),
                from_key: None,
            },
            |o| objects.push(o),
        )?;
        Ok(objects)
    }

    /// Hands `visit` the objects of a collection one at a time, sorted by (namespace, name),
    /// and returns the rv they were read at; see [`Scan`]. Only one parsed object is alive at
    /// a time here, so a caller that keeps a page of a list holds a page, not the collection
    /// (every page of a paged list used to parse the whole collection at once).
    pub fn scan(
        &self,
        r: &ResourceId,
        scan: Scan<'_>,
        mut visit: impl FnMut(Value),
    ) -> Result<u64, StoreError> {
        self.scan_rows(r, scan, |row| {
            visit(row.object()?);
            Ok(ControlFlow::Continue(()))
        })
    }

    /// As [`Store::scan`], but hands over each row before its body is read, in key order
    /// ([`list_key`] across namespaces, which is etcd's order too), and stops when `visit`
    /// says so. A caller that needs only some objects (a page of a list) reads only those: a
    /// list of 10,000 Nodes in pages of 500 used to parse every object after each page's start,
    /// some 100,000 parses per list, most of cloudcore's CPU after a restart.
    pub fn scan_rows(
        &self,
        r: &ResourceId,
        scan: Scan<'_>,
        mut visit: impl FnMut(ScanRow<'_>) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<u64, StoreError> {
        self.read(|tx| {
            // One read transaction: the rv and the rows come from the same WAL snapshot.
            let (current, compacted) = read_meta(tx)?;
            let rv = scan.at.unwrap_or(current);
            let gone = || StoreError::Gone {
                requested: rv,
                oldest: compacted + 1,
            };
            if scan.at.is_some() && (rv < compacted || rv > current) {
                return Err(gone());
            }
            // Rows are compared by their key across namespaces; a start key of a list in one
            // namespace (a bare name) gets the namespace in front.
            let start: Option<String> = scan.from_key.map(|(start, across_namespaces)| match scan
                .namespace
            {
                Some(namespace) if !across_namespaces && !namespace.is_empty() => {
                    format!("{namespace}/{start}")
                }
                _ => start.to_string(),
            });
            let wanted = |key: &str| start.as_deref().is_none_or(|start| key >= start);
            // The first change after `rv` of each object changed since, by key: `None` when it
            // was added since (left out), else its body as it was at `rv`.
            let mut undone: BTreeMap<String, (String, String, Option<String>)> = BTreeMap::new();
            if scan.at.is_some() {
                let mut stmt = tx.prepare_cached(
                    r#"SELECT namespace, name, type, prev_body FROM events
                       WHERE rv > ?1 AND "group" = ?2 AND resource = ?3
                         AND (?4 IS NULL OR namespace = ?4)
                       ORDER BY rv"#,
                )?;
                let mut rows = stmt.query(params![rv, r.group, r.resource, scan.namespace])?;
                while let Some(row) = rows.next()? {
                    let (namespace, name): (String, String) = (row.get(0)?, row.get(1)?);
                    let key = list_key(&namespace, &name, true);
                    if undone.contains_key(&key) {
                        continue; // only the first change after rv tells the state at rv
                    }
                    let kind: String = row.get(2)?;
                    if kind == EventType::Added.as_str() {
                        undone.insert(key, (namespace, name, None));
                        continue;
                    }
                    match row.get_ref(3)? {
                        rusqlite::types::ValueRef::Null => return Err(gone()),
                        _ => {
                            let body: String = row.get(3)?;
                            undone.insert(key, (namespace, name, Some(body)));
                        }
                    }
                }
            }
            // Objects deleted since `rv` are merged in at their place in the order.
            let emit_undone_before =
                |undone: &mut BTreeMap<String, (String, String, Option<String>)>,
                 limit: Option<&str>,
                 visit: &mut dyn FnMut(ScanRow<'_>) -> Result<ControlFlow<()>, StoreError>|
                 -> Result<ControlFlow<()>, StoreError> {
                    while let Some(entry) = undone.first_entry() {
                        if limit.is_some_and(|l| entry.key().as_str() >= l) {
                            break;
                        }
                        let (key, (namespace, name, body)) = entry.remove_entry();
                        if let Some(body) = body
                            && wanted(&key)
                        {
                            let row = ScanRow {
                                namespace: &namespace,
                                name: &name,
                                body: RowBody::History(&body),
                            };
                            if visit(row)?.is_break() {
                                return Ok(ControlFlow::Break(()));
                            }
                        }
                    }
                    Ok(ControlFlow::Continue(()))
                };
            // Keys only: a body is read when the visitor asks for it (a page of a list reads
            // its page, not the rows it only counts). Rows before the start key are left out
            // by SQLite.
            let mut stmt = tx.prepare_cached(
                r#"SELECT namespace, name,
                          CASE WHEN namespace <> '' THEN namespace || '/' || name ELSE name END
                            AS key
                   FROM objects
                   WHERE "group" = ?1 AND resource = ?2 AND (?3 IS NULL OR namespace = ?3)
                     AND (?4 IS NULL OR key >= ?4)
                   ORDER BY key"#,
            )?;
            let mut rows = stmt.query(params![r.group, r.resource, scan.namespace, start])?;
            let conn: &Connection = tx;
            while let Some(row) = rows.next()? {
                let namespace = row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
                let name = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
                let key = row.get_ref(2)?.as_str().map_err(rusqlite::Error::from)?;
                if emit_undone_before(&mut undone, Some(key), &mut visit)?.is_break() {
                    return Ok(rv);
                }
                let before = if undone.is_empty() {
                    None
                } else {
                    undone.remove(key)
                };
                let body = match &before {
                    // Changed since rv: as it was then, or not at all (added since).
                    Some((_, _, None)) => continue,
                    Some((_, _, Some(body))) => RowBody::History(body),
                    None => RowBody::Stored { conn, resource: r },
                };
                if wanted(key)
                    && visit(ScanRow {
                        namespace,
                        name,
                        body,
                    })?
                    .is_break()
                {
                    return Ok(rv);
                }
            }
            // Whether the visitor stopped or not, the scan ends here.
            let _ = emit_undone_before(&mut undone, None, &mut visit)?;
            Ok(rv)
        })
    }

    /// Stores a new object; sets metadata.resourceVersion (decimal string) to the new rv.
    /// AlreadyExists if present.
    pub fn create(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Result<Value, StoreError> {
        self.write(r, namespace, name, Change::Create(object))
    }

    /// Replaces an existing object. With Some(expected) the current rv must equal it (else
    /// Conflict). NotFound if absent. Sets the new rv.
    pub fn update(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        object: Value,
        expected: Option<u64>,
    ) -> Result<Value, StoreError> {
        self.write(r, namespace, name, Change::Update(object, expected))
    }

    /// Removes an object (optionally with the rv precondition); returns the object as deleted,
    /// with the deletion's rv as its resourceVersion.
    pub fn delete(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        expected: Option<u64>,
    ) -> Result<Value, StoreError> {
        self.write(r, namespace, name, Change::Delete(expected))
    }

    /// Rewrites existing objects of `r` in one transaction: `change` gets each stored object
    /// (keys as `(namespace, name)`) and returns it changed, or `None` to leave it. One commit
    /// (one fsync) for the lot instead of one per object; each changed object still gets its
    /// own rv, event row and watch event, in rv order, exactly as [`Store::update`] would give
    /// it. Returns the keys that do not exist (nothing is written for them).
    pub fn update_each(
        &self,
        r: &ResourceId,
        keys: &[(String, String)],
        mut change: impl FnMut(&str, &str, Value) -> Option<Value>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut writer = self.writer();
        let mut missing = Vec::new();
        let mut events = Vec::new();
        let tx = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (mut rv, compacted) = read_meta(&tx)?;
        for (namespace, name) in keys {
            let stored = stored_body(&tx, r, namespace, name)?;
            let Some(prev_body) = stored else {
                missing.push((namespace.clone(), name.clone()));
                continue;
            };
            let previous: Value = serde_json::from_str(&prev_body)
                .map_err(|e| StoreError::InvalidObject(e.to_string()))?;
            let Some(mut object) = change(namespace, name, previous.clone()) else {
                continue;
            };
            rv += 1;
            let body = stamp(&mut object, rv)?;
            tx.prepare_cached(
                r#"UPDATE objects SET rv = ?5, body = ?6
                   WHERE "group" = ?1 AND resource = ?2 AND namespace = ?3 AND name = ?4"#,
            )?
            .execute(params![r.group, r.resource, namespace, name, rv, body])?;
            tx.prepare_cached(
                r#"INSERT INTO events (rv, "group", resource, namespace, name, type, body, prev_body)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"#,
            )?
            .execute(params![
                rv,
                r.group,
                r.resource,
                namespace,
                name,
                EventType::Modified.as_str(),
                body,
                prev_body
            ])?;
            events.push(WatchEvent {
                rv,
                event_type: EventType::Modified,
                resource: r.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                object: Arc::new(object),
                previous: Some(Arc::new(previous)),
                encoded: OnceLock::new(),
            });
        }
        if events.is_empty() {
            return Ok(missing);
        }
        compact(&tx, rv, compacted, self.inner.event_retention)?;
        tx.commit()?;
        self.inner.rv.store(rv, Ordering::SeqCst);
        // Still under the writer lock: live events leave in rv order.
        if self.inner.events.receiver_count() > 0 {
            for event in events {
                let _ = self.inner.events.send(Arc::new(event));
            }
        }
        drop(writer);
        Ok(missing)
    }

    /// Events of resource `r` (optionally one namespace) with rv > from. Gone if events after
    /// `from` were compacted away. From the current rv or later it streams live events only.
    pub fn watch(
        &self,
        r: &ResourceId,
        namespace: Option<&str>,
        from: u64,
    ) -> Result<Watch, StoreError> {
        let (live, snapshot) = {
            // Events are published under the writer lock, so nothing can be published between
            // these two lines: the receiver gets exactly the events with rv > snapshot.
            let _writer = self.writer();
            (self.inner.events.subscribe(), self.resource_version())
        };
        let replay = if from < snapshot {
            self.replay(r, namespace, from, snapshot)?
        } else {
            VecDeque::new()
        };
        let live_after = from.max(snapshot);
        Ok(Watch {
            resource: r.clone(),
            namespace: namespace.map(str::to_owned),
            position: if replay.is_empty() { live_after } else { from },
            replay,
            live,
            live_after,
            ended: false,
        })
    }

    /// Stored events of `r` with `from < rv <= snapshot`, in rv order.
    fn replay(
        &self,
        r: &ResourceId,
        namespace: Option<&str>,
        from: u64,
        snapshot: u64,
    ) -> Result<VecDeque<WatchEvent>, StoreError> {
        self.read(|tx| {
            let (_, compacted) = read_meta(tx)?;
            if from < compacted {
                return Err(StoreError::Gone {
                    requested: from,
                    oldest: compacted + 1,
                });
            }
            let mut stmt = tx.prepare_cached(
                r#"SELECT rv, namespace, name, type, body, prev_body FROM events
                   WHERE rv > ?1 AND rv <= ?2 AND "group" = ?3 AND resource = ?4
                     AND (?5 IS NULL OR namespace = ?5)
                   ORDER BY rv"#,
            )?;
            let events = stmt
                .query_map(
                    params![from, snapshot, r.group, r.resource, namespace],
                    |row| {
                        let text: String = row.get(3)?;
                        let event_type = EventType::parse(&text).ok_or_else(|| {
                            rusqlite::Error::FromSqlConversionFailure(
                                3,
                                Type::Text,
                                format!("unknown event type {text:?}").into(),
                            )
                        })?;
                        let modified = event_type == EventType::Modified;
                        Ok(WatchEvent {
                            rv: row.get(0)?,
                            event_type,
                            resource: r.clone(),
                            namespace: row.get(1)?,
                            name: row.get(2)?,
                            object: Arc::new(json_column(row, 4)?),
                            previous: match row.get_ref(5)? {
                                rusqlite::types::ValueRef::Null => None,
                                _ if !modified => None,
                                _ => Some(Arc::new(json_column(row, 5)?)),
                            },
                            encoded: OnceLock::new(),
                        })
                    },
                )?
                .collect::<Result<VecDeque<_>, _>>()?;
            Ok(events)
        })
    }

    /// Runs one write transaction, then publishes its event.
    fn write(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        change: Change,
    ) -> Result<Value, StoreError> {
        let mut writer = self.writer();
        let (event_type, object, previous, rv) = commit_change(
            &mut writer,
            self.inner.event_retention,
            r,
            namespace,
            name,
            change,
        )
        .map_err(|e| match e {
            StoreError::Sql(ref sql)
                if sql.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) =>
            {
                StoreError::DiskFull {
                    path: self.inner.path.clone(),
                }
            }
            other => other,
        })?;
        self.inner.rv.store(rv, Ordering::SeqCst);
        // Still under the writer lock: live events leave in rv order.
        if self.inner.events.receiver_count() > 0 {
            let event = WatchEvent {
                rv,
                event_type,
                resource: r.clone(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                object: Arc::new(object.clone()),
                previous: previous.map(Arc::new),
                encoded: OnceLock::new(),
            };
            // An error means every receiver was dropped since the check: nobody to tell.
            let _ = self.inner.events.send(Arc::new(event));
        }
        drop(writer);
        Ok(object)
    }

    /// Reads the store's bookkeeping through a new connection to the file at the store's path,
    /// which the pooled connections' open files and page caches cannot hide: fails when the file
    /// is gone, replaced (by a directory, by something that is not a SQLite database) or
    /// unreadable. The `api-store` readiness check.
    pub fn check_file(&self) -> Result<(), StoreError> {
        let mut conn = self.open_reader()?;
        let tx = conn.transaction()?;
        read_meta(&tx)?;
        Ok(())
    }

    /// Runs `f` in a read transaction on a pooled read connection.
    fn read<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = lock(&self.inner.readers).pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.open_reader()?,
        };
        let result = conn.transaction().map_err(StoreError::from).and_then(|tx| {
            let result = f(&tx);
            // Dropping the transaction rolls it back, which ends a read cleanly.
            drop(tx);
            result
        });
        let mut idle = lock(&self.inner.readers);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }

    fn open_reader(&self) -> Result<Connection, StoreError> {
        let path = &self.inner.path;
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_URI
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = daemon::sqlite::open(path, flags).map_err(open_err)?;
        conn.execute_batch("PRAGMA query_only = ON;")
            .map_err(open_err)?;
        Ok(conn)
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        lock(&self.inner.writer)
    }

    /// Caps the database size so the next growing write fails with `SQLITE_FULL`.
    #[cfg(test)]
    fn limit_pages_for_test(&self, extra_pages: u64) {
        let conn = self.writer();
        let count: u64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page_count");
        let _: u64 = conn
            .query_row(
                &format!("PRAGMA max_page_count = {}", count + extra_pages),
                [],
                |r| r.get(0),
            )
            .expect("max_page_count");
    }
}

/// A stream of events for one resource (optionally one namespace), in rv order: first the
/// stored events after the starting rv, then live ones, with no gap and no repeat between them.
pub struct Watch {
    resource: ResourceId,
    namespace: Option<String>,
    replay: VecDeque<WatchEvent>,
    live: broadcast::Receiver<Arc<WatchEvent>>,
    /// Live events at or below this rv were replayed or precede the start.
    live_after: u64,
    /// Every matching event with an rv at or below this has been returned.
    position: u64,
    ended: bool,
}

impl Watch {
    /// Next event in rv order. None when the watcher fell too far behind the live stream (the
    /// client must re-watch from its last rv) or the store was dropped — never silently skips
    /// an event. Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        if self.ended {
            return None;
        }
        if let Some(event) = self.replay.pop_front() {
            self.position = if self.replay.is_empty() {
                self.live_after
            } else {
                event.rv
            };
            return Some(event);
        }
        loop {
            match self.live.recv().await {
                Ok(event) => {
                    if event.rv <= self.live_after {
                        continue;
                    }
                    self.position = event.rv;
                    if event.resource == self.resource
                        && self
                            .namespace
                            .as_deref()
                            .is_none_or(|ns| ns == event.namespace)
                    {
                        return Some(Arc::unwrap_or_clone(event));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::info!(
                        group = %self.resource.group,
                        resource = %self.resource.resource,
                        position = self.position,
                        missed,
                        "watcher fell behind the live stream; ending watch"
                    );
                    self.ended = true;
                    return None;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// The rv up to which this watch has returned every matching event: a safe bookmark, and
    /// where to resume after [`Watch::next`] returned `None`.
    pub fn resource_version(&self) -> u64 {
        self.position
    }
}

/// Locks a mutex, ignoring poison: a panic mid-transaction rolls SQLite back, so the
/// connections stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// How far [`restore`] moves the revision past the highest one the lost store is known to
/// have issued (etcd's `--bump-revision` advice): covers the revisions issued after the last
/// recorded high-water mark.
pub const RESTORE_BUMP: u64 = 1_000_000_000;

/// What [`restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The revision the backup had reached.
    pub backup_revision: u64,
    /// The restored store's revision now: every object got a fresh resourceVersion below it.
    pub revision: u64,
    /// Objects restored.
    pub objects: u64,
}

/// Writes a consistent copy of the api database at `path` to `dest` with `VACUUM INTO`, safe
/// while `serve` writes to it (WAL readers see one committed state). `dest` must not exist.
pub fn backup(path: &Path, dest: &Path) -> Result<(), StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    if !path.exists() {
        return Err(open_err(rusqlite::Error::InvalidPath(path.to_path_buf())));
    }
    let conn = daemon::sqlite::open(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    let dest_text = dest
        .to_str()
        .ok_or_else(|| StoreError::Sql(rusqlite::Error::InvalidPath(dest.to_path_buf())))?;
    conn.execute("VACUUM INTO ?1", [dest_text])?;
    Ok(())
}

/// Puts the backup file `from` in place as the api database at `path` (cloudcore stopped),
/// so that edges converge to it instead of freezing on versions the backup never saw:
/// the revision moves to `max(backup's revision, floor) + RESTORE_BUMP`, every object gets a
/// fresh resourceVersion above everything any edge can hold, and the event history is marked
/// compacted (a watch from an older resourceVersion gets 410 Gone and lists again). Object
/// uids stay, so the store keeps its identity. The old file is replaced atomically.
pub fn restore(from: &Path, path: &Path, floor: u64) -> Result<Restored, StoreError> {
    let staged = path.with_extension(format!("db.restore-{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    {
        let source = daemon::sqlite::open(
            from,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: from.to_path_buf(),
            source,
        })?;
        let version: i64 = source
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|source| StoreError::Open {
                path: from.to_path_buf(),
                source,
            })?;
        if version > SCHEMA_VERSION || version < 1 {
            return Err(StoreError::InvalidObject(format!(
                "{} is not an api database this cloudcore can restore (schema version {version})",
                from.display()
            )));
        }
        let staged_text = staged
            .to_str()
            .ok_or_else(|| StoreError::Sql(rusqlite::Error::InvalidPath(staged.clone())))?;
        source.execute("VACUUM INTO ?1", [staged_text])?;
    }
    let result = (|| {
        // VACUUM INTO creates the file with the process umask; it holds Secrets.
        daemon::sqlite::create_private(&staged).map_err(|e| StoreError::Open {
            path: staged.clone(),
            source: rusqlite::Error::InvalidPath(e.path),
        })?;
        let mut conn =
            daemon::sqlite::open(&staged, daemon::sqlite::read_write()).map_err(|source| {
                StoreError::Open {
                    path: staged.clone(),
                    source,
                }
            })?;
        migrate(&mut conn, &staged)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (backup_revision, _) = read_meta(&tx)?;
        let base = backup_revision.max(floor).saturating_add(RESTORE_BUMP);
        let rows: Vec<(String, String, String, String, String)> = {
            let mut stmt = tx.prepare(
                r#"SELECT "group", resource, namespace, name, body FROM objects
                   ORDER BY "group", resource, namespace, name"#,
            )?;
            stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut rv = base;
        for (group, resource, namespace, name, body) in &rows {
            rv += 1;
            let mut object: Value = serde_json::from_str(body).map_err(|e| {
                StoreError::InvalidObject(format!("{resource} {namespace}/{name}: {e}"))
            })?;
            let body = stamp(&mut object, rv)?;
            tx.execute(
                r#"UPDATE objects SET rv = ?5, body = ?6
                   WHERE "group" = ?1 AND resource = ?2 AND namespace = ?3 AND name = ?4"#,
                params![group, resource, namespace, name, rv, body],
            )?;
        }
        tx.execute("DELETE FROM events", [])?;
        tx.execute(
            "UPDATE meta SET rv = ?1, compacted = ?1 WHERE id = 1",
            params![rv],
        )?;
        tx.commit()?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(Restored {
            backup_revision,
            revision: rv,
            objects: rows.len() as u64,
        })
    })();
    let restored = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
    };
    let io = |e: std::io::Error| {
        StoreError::Sql(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            Some(format!(
                "cannot put the restored database in place at {}: {e}",
                path.display()
            )),
        ))
    };
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        match std::fs::remove_file(std::path::PathBuf::from(side)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
    }
    for suffix in ["-wal", "-shm"] {
        let mut side = staged.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(side));
    }
    std::fs::rename(&staged, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(restored)
}

/// Brings the schema from `PRAGMA user_version` up to [`SCHEMA_VERSION`].
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    daemon::sqlite::migrate(conn, MIGRATIONS).map_err(|e| StoreError::Sql(e.source))?;
    // Another process may have migrated to a newer schema since the caller checked.
    let version = daemon::sqlite::schema_version(conn)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: version,
        });
    }
    Ok(())
}

/// The committed rv and the highest compacted (deleted) event rv.
fn read_meta(tx: &Transaction<'_>) -> Result<(u64, u64), StoreError> {
    Ok(
        tx.query_row("SELECT rv, compacted FROM meta WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?,
    )
}

/// Deletes events beyond the newest `retention` and records the new `compacted` with `rv`.
fn compact(
    tx: &Transaction<'_>,
    rv: u64,
    compacted: u64,
    retention: u64,
) -> Result<(), StoreError> {
    let cut = rv.saturating_sub(retention).max(compacted);
    if cut > compacted {
        tx.execute("DELETE FROM events WHERE rv <= ?1", [cut])?;
    }
    tx.execute(
        "UPDATE meta SET rv = ?1, compacted = ?2 WHERE id = 1",
        params![rv, cut],
    )?;
    Ok(())
}

/// The write transaction: object row, event row, compaction, meta, commit. Returns the event
/// type, the object as written (or deleted) and its new rv. Rolls back on any error.
fn commit_change(
    conn: &mut Connection,
    retention: u64,
    r: &ResourceId,
    namespace: &str,
    name: &str,
    change: Change,
) -> Result<(EventType, Value, Option<Value>, u64), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (rv, compacted) = read_meta(&tx)?;
    let new_rv = rv + 1;
    let key = params![r.group, r.resource, namespace, name];
    let stored: Option<(u64, String)> = tx
        .prepare_cached(
            r#"SELECT rv, body FROM objects
               WHERE "group" = ?1 AND resource = ?2 AND namespace = ?3 AND name = ?4"#,
        )?
        .query_row(key, |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let current = stored.as_ref().map(|(rv, _)| *rv);
    let check = |expected: Option<u64>| match (current, expected) {
        (None, _) => Err(StoreError::NotFound),
        (Some(current), Some(expected)) if current != expected => {
            Err(StoreError::Conflict { current, expected })
        }
        (Some(_), _) => Ok(()),
    };
    let (event_type, object, body, prev_body) = match change {
        Change::Create(mut object) => {
            if current.is_some() {
                return Err(StoreError::AlreadyExists);
            }
            let body = stamp(&mut object, new_rv)?;
            tx.prepare_cached(
                r#"INSERT INTO objects ("group", resource, namespace, name, rv, body)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#,
            )?
            .execute(params![r.group, r.resource, namespace, name, new_rv, body])?;
            (EventType::Added, object, body, None)
        }
        Change::Update(mut object, expected) => {
            check(expected)?;
            let body = stamp(&mut object, new_rv)?;
            tx.prepare_cached(
                r#"UPDATE objects SET rv = ?5, body = ?6
                   WHERE "group" = ?1 AND resource = ?2 AND namespace = ?3 AND name = ?4"#,
            )?
            .execute(params![r.group, r.resource, namespace, name, new_rv, body])?;
            (EventType::Modified, object, body, stored.map(|(_, b)| b))
        }
        Change::Delete(expected) => {
            check(expected)?;
            let mut object = tx
                .prepare_cached(
                    r#"DELETE FROM objects
                       WHERE "group" = ?1 AND resource = ?2 AND namespace = ?3 AND name = ?4
                       RETURNING body"#,
                )?
                .query_row(key, |row| json_column(row, 0))?;
            let body = stamp(&mut object, new_rv)?;
            // The body before the deletion: `list_at` serves older versions from it.
            (EventType::Deleted, object, body, stored.map(|(_, b)| b))
        }
    };
    tx.prepare_cached(
        r#"INSERT INTO events (rv, "group", resource, namespace, name, type, body, prev_body)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"#,
    )?
    .execute(params![
        new_rv,
        r.group,
        r.resource,
        namespace,
        name,
        event_type.as_str(),
        body,
        prev_body
    ])?;
    compact(&tx, new_rv, compacted, retention)?;
    tx.commit()?;
    let previous = match &prev_body {
        Some(text) if event_type == EventType::Modified => {
            Some(serde_json::from_str(text).map_err(|e| StoreError::InvalidObject(e.to_string()))?)
        }
        _ => None,
    };
    Ok((event_type, object, previous, new_rv))
}

/// Sets `metadata.resourceVersion` to `rv` and serializes the object; InvalidObject unless it is
/// a JSON object with a `metadata` object.
fn stamp(object: &mut Value, rv: u64) -> Result<String, StoreError> {
    let metadata = object
        .as_object_mut()
        .ok_or_else(|| StoreError::InvalidObject("object is not a JSON object".into()))?
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| StoreError::InvalidObject("object has no metadata object".into()))?;
    metadata.insert("resourceVersion".into(), Value::String(rv.to_string()));
    serde_json::to_string(object).map_err(|e| StoreError::InvalidObject(e.to_string()))
}

/// The stored JSON text of one object, if it exists: the one point lookup of the objects table.
fn stored_body(
    conn: &Connection,
    r: &ResourceId,
    namespace: &str,
    name: &str,
) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        r#"SELECT body FROM objects
           WHERE "group" = ?1 AND resource = ?2 AND namespace = ?3 AND name = ?4"#,
    )?
    .query_row(params![r.group, r.resource, namespace, name], |row| {
        row.get(0)
    })
    .optional()
}

/// Parses a JSON text column; a malformed stored body is a conversion error naming the column.
fn json_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<Value> {
    let text = row.get_ref(idx)?.as_str()?;
    serde_json::from_str(text).map_err(|e| unreadable_json(idx, e))
}

/// A stored body that is not JSON: a conversion error naming the column it was read from.
fn unreadable_json(column: usize, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, Type::Text, Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn pods() -> ResourceId {
        ResourceId {
            group: String::new(),
            resource: "pods".into(),
        }
    }

    fn leases() -> ResourceId {
        ResourceId {
            group: "coordination.k8s.io".into(),
            resource: "leases".into(),
        }
    }

    fn pod(namespace: &str, name: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"nodeName": "edge-1"},
        })
    }

    fn rv_of(object: &Value) -> u64 {
        object["metadata"]["resourceVersion"]
            .as_str()
            .expect("resourceVersion is a string")
            .parse()
            .expect("resourceVersion is decimal")
    }

    fn db(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("api.db")
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&db(dir), StoreOptions::default()).expect("open")
    }

    fn open_with(dir: &tempfile::TempDir, event_retention: usize, watch_buffer: usize) -> Store {
        let options = StoreOptions {
            event_retention,
            watch_buffer,
        };
        Store::open(&db(dir), options).expect("open")
    }

    /// Collects `n` events, failing if they do not arrive promptly.
    async fn take(watch: &mut Watch, n: usize) -> Vec<WatchEvent> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("event arrives")
                .expect("watch continues");
            events.push(event);
        }
        events
    }

    /// Asserts no event is pending right now.
    async fn assert_quiet(watch: &mut Watch) {
        let next = tokio::time::timeout(Duration::from_millis(50), watch.next()).await;
        assert!(next.is_err(), "unexpected event {next:?}");
    }

    #[tokio::test]
    async fn update_each_writes_many_in_one_commit_with_an_event_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let lease = |name: &str| json!({"metadata": {"namespace": "kube-node-lease", "name": name}, "spec": {"renewTime": "old"}});
        for name in ["a", "b", "c"] {
            store
                .create(&leases(), "kube-node-lease", name, lease(name))
                .expect("create");
        }
        let mut watch = store.watch(&leases(), None, 3).expect("watch");
        let keys: Vec<(String, String)> = ["a", "gone", "b", "c"]
            .iter()
            .map(|n| ("kube-node-lease".to_string(), n.to_string()))
            .collect();
        let missing = store
            .update_each(&leases(), &keys, |_, name, mut object| {
                // "c" is left as it is.
                (name != "c").then(|| {
                    object["spec"]["renewTime"] = json!("new");
                    object
                })
            })
            .expect("update_each");
        assert_eq!(
            missing,
            vec![("kube-node-lease".to_string(), "gone".to_string())]
        );
        assert_eq!(store.resource_version(), 5);
        let events = take(&mut watch, 2).await;
        let seen: Vec<(u64, &str, &str)> = events
            .iter()
            .map(|e| (e.rv, e.name.as_str(), e.event_type.as_str()))
            .collect();
        assert_eq!(seen, [(4, "a", "MODIFIED"), (5, "b", "MODIFIED")]);
        assert_eq!(events[0].object["spec"]["renewTime"], "new");
        assert_eq!(rv_of(&events[0].object), 4);
        let previous = events[0].previous.as_ref().expect("previous");
        assert_eq!(previous["spec"]["renewTime"], "old");
        let b = store
            .get(&leases(), "kube-node-lease", "b")
            .expect("get")
            .expect("b");
        assert_eq!(
            (rv_of(&b), b["spec"]["renewTime"].as_str()),
            (5, Some("new"))
        );
        let c = store
            .get(&leases(), "kube-node-lease", "c")
            .expect("get")
            .expect("c");
        assert_eq!(
            (rv_of(&c), c["spec"]["renewTime"].as_str()),
            (3, Some("old"))
        );
        // Replayed from the events table like any other write.
        let mut replay = store.watch(&leases(), None, 3).expect("watch");
        assert_eq!(take(&mut replay, 2).await[1].rv, 5);
        // Nothing to change: no commit, no rv.
        store
            .update_each(&leases(), &keys, |_, _, _| None)
            .expect("no-op");
        assert_eq!(store.resource_version(), 5);
    }

    #[test]
    fn create_get_list_update_delete_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        assert_eq!(store.resource_version(), 0);

        let created = store
            .create(&pods(), "default", "a", pod("default", "a"))
            .expect("create");
        assert_eq!(rv_of(&created), 1);
        assert_eq!(created["spec"]["nodeName"], "edge-1");
        assert!(
            created["metadata"].get("uid").is_none(),
            "the store invents no uid"
        );
        assert_eq!(
            store.get(&pods(), "default", "a").expect("get"),
            Some(created.clone())
        );
        assert_eq!(store.get(&pods(), "other", "a").expect("get"), None);
        assert_eq!(store.get(&leases(), "default", "a").expect("get"), None);

        let mut changed = created.clone();
        changed["spec"]["nodeName"] = json!("edge-2");
        let updated = store
            .update(&pods(), "default", "a", changed, Some(1))
            .expect("update");
        assert_eq!(rv_of(&updated), 2);
        assert_eq!(updated["spec"]["nodeName"], "edge-2");
        assert_eq!(
            store.get(&pods(), "default", "a").expect("get"),
            Some(updated.clone())
        );

        let unconditional = store
            .update(&pods(), "default", "a", updated.clone(), None)
            .expect("update without precondition");
        assert_eq!(rv_of(&unconditional), 3);

        let (items, rv) = store.list(&pods(), None).expect("list");
        assert_eq!((items, rv), (vec![unconditional.clone()], 3));

        let deleted = store
            .delete(&pods(), "default", "a", Some(3))
            .expect("delete");
        assert_eq!(rv_of(&deleted), 4);
        assert_eq!(deleted["spec"]["nodeName"], "edge-2");
        assert_eq!(store.get(&pods(), "default", "a").expect("get"), None);
        assert_eq!(store.list(&pods(), None).expect("list"), (vec![], 4));
        assert_eq!(store.resource_version(), 4);
    }

    #[test]
    fn refusals_write_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store
            .create(&pods(), "default", "a", pod("default", "a"))
            .expect("create");

        let again = store.create(&pods(), "default", "a", pod("default", "a"));
        assert!(matches!(again, Err(StoreError::AlreadyExists)), "{again:?}");
        let missing = store.update(&pods(), "default", "b", pod("default", "b"), None);
        assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
        let missing = store.delete(&pods(), "default", "b", None);
        assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
        let stale = store.update(&pods(), "default", "a", pod("default", "a"), Some(7));
        assert!(
            matches!(
                stale,
                Err(StoreError::Conflict {
                    current: 1,
                    expected: 7
                })
            ),
            "{stale:?}"
        );
        let stale = store.delete(&pods(), "default", "a", Some(0));
        assert!(
            matches!(
                stale,
                Err(StoreError::Conflict {
                    current: 1,
                    expected: 0
                })
            ),
            "{stale:?}"
        );
        for bad in [
            json!("pod"),
            json!([1]),
            json!({"kind": "Pod"}),
            json!({"metadata": 3}),
        ] {
            let invalid = store.create(&pods(), "default", "c", bad);
            assert!(
                matches!(invalid, Err(StoreError::InvalidObject(_))),
                "{invalid:?}"
            );
        }

        assert_eq!(store.resource_version(), 1);
        drop(store);
        let store = open(&dir);
        assert_eq!(store.resource_version(), 1);
        assert_eq!(store.list(&pods(), None).expect("list").0.len(), 1);
    }

    #[test]
    fn list_is_sorted_filtered_and_carries_its_rv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        for (ns, name) in [("b", "z"), ("a", "y"), ("b", "a"), ("a", "x")] {
            store
                .create(&pods(), ns, name, pod(ns, name))
                .expect("create");
        }
        store
            .create(&leases(), "a", "lease", pod("a", "lease"))
            .expect("create");

        let names = |items: &[Value]| {
            items
                .iter()
                .map(|o| format!("{}/{}", o["metadata"]["namespace"], o["metadata"]["name"]))
                .map(|s| s.replace('"', ""))
                .collect::<Vec<_>>()
        };
        let (all, rv) = store.list(&pods(), None).expect("list");
        assert_eq!(names(&all), ["a/x", "a/y", "b/a", "b/z"]);
        assert_eq!(rv, 5, "the rv is global, including other resources");
        let (in_a, rv) = store.list(&pods(), Some("a")).expect("list");
        assert_eq!(names(&in_a), ["a/x", "a/y"]);
        assert_eq!(rv, 5);
        let (leases_in_b, _) = store.list(&leases(), Some("b")).expect("list");
        assert!(leases_in_b.is_empty());
    }

    #[test]
    fn rv_is_strictly_increasing_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen = Vec::new();
        {
            let store = open(&dir);
            for i in 0..5 {
                let name = format!("p{i}");
                seen.push(rv_of(
                    &store
                        .create(&pods(), "ns", &name, pod("ns", &name))
                        .expect("create"),
                ));
            }
            seen.push(rv_of(
                &store.delete(&pods(), "ns", "p0", None).expect("delete"),
            ));
        }
        let store = open(&dir);
        assert_eq!(store.resource_version(), 6);
        let object = store
            .get(&pods(), "ns", "p1")
            .expect("get")
            .expect("present");
        seen.push(rv_of(
            &store
                .update(&pods(), "ns", "p1", object, Some(2))
                .expect("update"),
        ));
        seen.push(rv_of(
            &store
                .create(&pods(), "ns", "p0", pod("ns", "p0"))
                .expect("create"),
        ));
        assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn rv_survives_compaction_of_every_event_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open_with(&dir, 0, 16);
            for i in 0..3 {
                let name = format!("p{i}");
                store
                    .create(&pods(), "ns", &name, pod("ns", &name))
                    .expect("create");
            }
        }
        let store = open_with(&dir, 0, 16);
        assert_eq!(store.resource_version(), 3);
        let created = store
            .create(&pods(), "ns", "p9", pod("ns", "p9"))
            .expect("create");
        assert_eq!(rv_of(&created), 4);
    }

    #[tokio::test]
    async fn watch_replays_then_streams_live_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let a = store
            .create(&pods(), "default", "a", pod("default", "a"))
            .expect("create");
        store
            .create(&leases(), "default", "l", pod("default", "l"))
            .expect("create");
        store
            .update(&pods(), "default", "a", a, None)
            .expect("update");

        let mut watch = store.watch(&pods(), None, 0).expect("watch");
        assert_eq!(watch.resource_version(), 0);
        let replayed = take(&mut watch, 2).await;
        assert_eq!(
            replayed
                .iter()
                .map(|e| (e.rv, e.event_type))
                .collect::<Vec<_>>(),
            [(1, EventType::Added), (3, EventType::Modified)]
        );
        assert_eq!(watch.resource_version(), 3);
        assert_eq!(replayed[1].object["metadata"]["resourceVersion"], "3");
        assert_eq!(replayed[1].resource, pods());
        // A replayed MODIFIED carries the object as it was before the change.
        let previous = replayed[1].previous.as_ref().expect("previous object");
        assert_eq!(previous["metadata"]["resourceVersion"], "1");
        assert!(replayed[0].previous.is_none());
        assert_eq!(
            (replayed[1].namespace.as_str(), replayed[1].name.as_str()),
            ("default", "a")
        );

        store
            .create(&leases(), "default", "m", pod("default", "m"))
            .expect("create");
        store.delete(&pods(), "default", "a", None).expect("delete");
        let live = take(&mut watch, 1).await;
        assert_eq!((live[0].rv, live[0].event_type), (5, EventType::Deleted));
        assert_eq!(live[0].object["metadata"]["resourceVersion"], "5");
        assert_eq!(watch.resource_version(), 5);
        assert_quiet(&mut watch).await;

        let mut from_now = store
            .watch(&pods(), None, store.resource_version())
            .expect("watch");
        assert_quiet(&mut from_now).await;
        store
            .create(&pods(), "default", "b", pod("default", "b"))
            .expect("create");
        assert_eq!(take(&mut from_now, 1).await[0].rv, 6);
    }

    #[tokio::test]
    async fn watch_filters_by_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store
            .create(&pods(), "a", "p", pod("a", "p"))
            .expect("create");
        store
            .create(&pods(), "b", "p", pod("b", "p"))
            .expect("create");
        let mut in_a = store.watch(&pods(), Some("a"), 0).expect("watch");
        let mut cluster = store.watch(&pods(), Some(""), 0).expect("watch");
        store
            .create(&pods(), "b", "q", pod("b", "q"))
            .expect("create");
        store
            .create(&pods(), "a", "q", pod("a", "q"))
            .expect("create");

        let events = take(&mut in_a, 2).await;
        assert_eq!(events.iter().map(|e| e.rv).collect::<Vec<_>>(), [1, 4]);
        assert!(events.iter().all(|e| e.namespace == "a"));
        assert_quiet(&mut in_a).await;
        assert_quiet(&mut cluster).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_has_no_gap_or_repeat_across_replay_and_live() {
        const WRITES: u64 = 600;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_with(&dir, 10_000, 4096);
        let mut expected = Vec::new();
        for i in 0..20 {
            let name = format!("early{i}");
            expected.push(rv_of(
                &store
                    .create(&pods(), "ns", &name, pod("ns", &name))
                    .expect("create"),
            ));
        }

        let (started, start_watch) = std::sync::mpsc::channel();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut pod_rvs = Vec::new();
                for i in 0..WRITES {
                    if i % 120 == 119 {
                        // Ask for a watcher and keep writing while it starts.
                        let _ = started.send(());
                    }
                    let name = format!("p{}", i % 50);
                    let object = pod("ns", &name);
                    // Interleave other resources and namespaces, which the watch must skip.
                    if i % 3 == 0 {
                        store
                            .create(&leases(), "ns", &format!("l{i}"), object)
                            .expect("lease");
                        continue;
                    }
                    if i % 5 == 0 {
                        store
                            .create(&pods(), "other", &format!("o{i}"), object)
                            .expect("other");
                        continue;
                    }
                    let written = match store.get(&pods(), "ns", &name).expect("get") {
                        Some(current) => store.update(&pods(), "ns", &name, current, None),
                        None => store.create(&pods(), "ns", &name, object),
                    };
                    pod_rvs.push(rv_of(&written.expect("write")));
                }
                pod_rvs
            })
        };

        // Watchers start from rv 0 at different moments while the writer runs, so each crosses
        // from replay to live at a different rv.
        let mut watches = Vec::new();
        while start_watch.recv().is_ok() {
            watches.push(store.watch(&pods(), Some("ns"), 0).expect("watch"));
        }
        let pod_rvs = writer.join().expect("writer thread");
        expected.extend(pod_rvs);
        assert!(expected.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(watches.len(), 5);
        let boundaries: Vec<u64> = watches.iter().map(|w| w.live_after).collect();
        assert!(boundaries.iter().all(|&b| b > 20), "{boundaries:?}");
        assert!(
            boundaries.iter().any(|&b| b < store.resource_version()),
            "no watcher started while writes were under way: {boundaries:?}"
        );

        for mut watch in watches {
            let got: Vec<u64> = take(&mut watch, expected.len())
                .await
                .iter()
                .map(|e| e.rv)
                .collect();
            assert_eq!(got, expected);
            assert_quiet(&mut watch).await;
            assert_eq!(watch.resource_version(), store.resource_version());
        }
    }

    #[tokio::test]
    async fn lagging_watcher_ends_instead_of_skipping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_with(&dir, 100, 4);
        let mut watch = store.watch(&pods(), None, 0).expect("watch");
        for i in 0..10 {
            let name = format!("p{i}");
            store
                .create(&pods(), "ns", &name, pod("ns", &name))
                .expect("create");
        }
        assert!(watch.next().await.is_none());
        assert!(watch.next().await.is_none(), "an ended watch stays ended");
        assert_eq!(
            watch.resource_version(),
            0,
            "resume from the last delivered rv"
        );

        let mut resumed = store
            .watch(&pods(), None, watch.resource_version())
            .expect("rewatch");
        let rvs: Vec<u64> = take(&mut resumed, 10).await.iter().map(|e| e.rv).collect();
        assert_eq!(rvs, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_scan_keeps_the_order_with_deletions_merged_in_and_starts_at_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_with(&dir, 64, 64);
        for (ns, name) in [("a", "p1"), ("a", "p2"), ("a", "p3"), ("b", "q")] {
            store
                .create(&pods(), ns, name, pod(ns, name))
                .expect("create");
        }
        let at = store.resource_version();
        store.delete(&pods(), "a", "p2", None).expect("delete");
        store
            .create(&pods(), "a", "p0", pod("a", "p0"))
            .expect("create");
        let names = |scan: Scan<'_>| {
            let mut seen = Vec::new();
            store
                .scan(&pods(), scan, |o| {
                    seen.push(format!(
                        "{}/{}",
                        o["metadata"]["namespace"].as_str().unwrap_or_default(),
                        o["metadata"]["name"].as_str().unwrap_or_default()
                    ))
                })
                .expect("scan");
            seen
        };
        let past = Scan {
            at: Some(at),
            ..Scan::default()
        };
        assert_eq!(names(past), ["a/p1", "a/p2", "a/p3", "b/q"]);
        assert_eq!(names(Scan::default()), ["a/p0", "a/p1", "a/p3", "b/q"]);
        let from = Scan {
            at: Some(at),
            from_key: Some(("a/p2", true)),
            ..Scan::default()
        };
        assert_eq!(names(from), ["a/p2", "a/p3", "b/q"]);
        let in_a = Scan {
            namespace: Some("a"),
            from_key: Some(("p1\u{0}", false)),
            ..Scan::default()
        };
        assert_eq!(names(in_a), ["a/p3"]);
    }

    #[test]
    fn lists_at_retained_versions_are_rebuilt_from_the_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_with(&dir, 8, 64);
        let mut snapshots = Vec::new();
        let mut snap = |store: &Store| {
            let (objects, rv) = store.list(&pods(), None).expect("list");
            snapshots.push((rv, objects));
        };
        store
            .create(&pods(), "a", "p", pod("a", "p"))
            .expect("create");
        store
            .create(&pods(), "b", "q", pod("b", "q"))
            .expect("create");
        snap(&store);
        let mut changed = pod("a", "p");
        changed["spec"]["nodeName"] = json!("edge-2");
        store
            .update(&pods(), "a", "p", changed, None)
            .expect("update");
        snap(&store);
        store.delete(&pods(), "b", "q", None).expect("delete");
        store
            .create(&pods(), "a", "r", pod("a", "r"))
            .expect("create");
        snap(&store);
        store
            .create(&leases(), "a", "l", pod("a", "l"))
            .expect("other resource");
        for (rv, objects) in &snapshots {
            assert_eq!(
                &store.list_at(&pods(), None, *rv).expect("list_at"),
                objects,
                "at {rv}"
            );
        }
        let (rv, objects) = &snapshots[0];
        let in_b: Vec<Value> = objects
            .iter()
            .filter(|o| o["metadata"]["namespace"] == "b")
            .cloned()
            .collect();
        assert_eq!(store.list_at(&pods(), Some("b"), *rv).expect("ns"), in_b);
        assert!(matches!(
            store.list_at(&pods(), None, store.resource_version() + 1),
            Err(StoreError::Gone { .. })
        ));
        // Once the events after it are compacted, a version cannot be rebuilt.
        for i in 0..10 {
            let name = format!("x{i}");
            store
                .create(&pods(), "a", &name, pod("a", &name))
                .expect("create");
        }
        assert!(matches!(
            store.list_at(&pods(), None, *rv),
            Err(StoreError::Gone { .. })
        ));
    }

    #[tokio::test]
    async fn compacted_history_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_with(&dir, 5, 64);
        for i in 0..20 {
            let name = format!("p{i}");
            store
                .create(&pods(), "ns", &name, pod("ns", &name))
                .expect("create");
        }
        for from in [0, 14] {
            let gone = store.watch(&pods(), None, from);
            assert!(
                matches!(gone, Err(StoreError::Gone { requested, oldest: 16 }) if requested == from),
                "{:?}",
                gone.err()
            );
        }
        let mut oldest = store
            .watch(&pods(), None, 15)
            .expect("watch from oldest - 1");
        let rvs: Vec<u64> = take(&mut oldest, 5).await.iter().map(|e| e.rv).collect();
        assert_eq!(rvs, [16, 17, 18, 19, 20]);
        store.watch(&pods(), None, 20).expect("watch from now");

        // A smaller retention applies at open.
        drop(oldest);
        drop(store);
        let store = open_with(&dir, 2, 64);
        assert!(matches!(
            store.watch(&pods(), None, 17),
            Err(StoreError::Gone { oldest: 19, .. })
        ));
        store.watch(&pods(), None, 18).expect("watch");
    }

    #[tokio::test]
    async fn watch_resumes_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let resume_at = {
            let store = open(&dir);
            let a = store
                .create(&pods(), "ns", "a", pod("ns", "a"))
                .expect("create");
            store.update(&pods(), "ns", "a", a, None).expect("update");
            store.delete(&pods(), "ns", "a", None).expect("delete");
            2
        };
        let store = open(&dir);
        let mut watch = store.watch(&pods(), None, resume_at).expect("watch");
        store
            .create(&pods(), "ns", "b", pod("ns", "b"))
            .expect("create");
        let events = take(&mut watch, 2).await;
        assert_eq!(
            events
                .iter()
                .map(|e| (e.rv, e.event_type))
                .collect::<Vec<_>>(),
            [(3, EventType::Deleted), (4, EventType::Added)]
        );
        assert_eq!(events[0].object["metadata"]["resourceVersion"], "3");
    }

    #[tokio::test]
    async fn a_restored_backup_moves_every_version_past_the_floor_and_compacts_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.create(&pods(), "ns", "a", pod("ns", "a")).unwrap();
        store.create(&pods(), "ns", "b", pod("ns", "b")).unwrap();
        let backup_file = dir.path().join("backup.db");
        backup(&db(&dir), &backup_file).expect("online backup");
        for _ in 0..5 {
            store
                .update(&pods(), "ns", "b", pod("ns", "b"), None)
                .unwrap();
        }
        let newest = store.resource_version();
        drop(store);
        let restored = restore(&backup_file, &db(&dir), newest).expect("restore");
        assert_eq!(restored.backup_revision, 2);
        assert_eq!(restored.objects, 2);
        assert_eq!(restored.revision, newest + RESTORE_BUMP + 2);
        let store = open(&dir);
        assert_eq!(store.resource_version(), restored.revision);
        let a = store.get(&pods(), "ns", "a").unwrap().expect("a restored");
        assert!(rv_of(&a) > newest + RESTORE_BUMP);
        let gone = store.watch(&pods(), None, newest);
        assert!(matches!(gone, Err(StoreError::Gone { .. })));
        let written = store
            .update(&pods(), "ns", "a", pod("ns", "a"), None)
            .unwrap();
        assert_eq!(rv_of(&written), restored.revision + 1);
    }

    #[test]
    fn a_scan_reads_only_the_bodies_asked_for_and_starts_at_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        for (ns, name) in [("a", "x"), ("a-b", "y"), ("b", "p"), ("b", "q"), ("c", "r")] {
            store
                .create(&pods(), ns, name, pod(ns, name))
                .expect("create");
        }
        // Break the stored body of b/q (not even text): a scan that only counts it must not
        // notice, as it would if it read the row's body.
        let conn = Connection::open(db(&dir)).expect("raw open");
        conn.execute(
            "UPDATE objects SET body = X'ff7b' WHERE namespace = 'b' AND name = 'q'",
            [],
        )
        .expect("corrupt one row");
        let visited = |from_key: Option<(&str, bool)>, read: &dyn Fn(&str) -> bool| {
            let mut seen = Vec::new();
            let scan = Scan {
                namespace: None,
                at: None,
                from_key,
            };
            let result = store.scan_rows(&pods(), scan, |row| {
                let key = list_key(row.namespace, row.name, true);
                if read(&key) {
                    row.object()?;
                }
                seen.push(key);
                Ok(ControlFlow::Continue(()))
            });
            (seen, result)
        };
        // Key order is the string's: "a/x" after "a-b/y".
        let (seen, result) = visited(None, &|key| key != "b/q");
        result.expect("no body of b/q was read");
        assert_eq!(seen, vec!["a-b/y", "a/x", "b/p", "b/q", "c/r"]);
        // From "b/": the rows before it are left out, the corrupt one is handed over unread.
        let (seen, result) = visited(Some(("b/", true)), &|key| key != "b/q");
        result.expect("no body of b/q was read");
        assert_eq!(seen, vec!["b/p", "b/q", "c/r"]);
        // A start of "a-c" keeps "a/x" and drops "a-b/y", although ("a", "x") comes first by
        // (namespace, name).
        let (seen, result) = visited(Some(("a-c", true)), &|_| false);
        result.expect("nothing read");
        assert_eq!(seen, vec!["a/x", "b/p", "b/q", "c/r"]);
        // Reading the corrupt body fails.
        let (_, result) = visited(None, &|key| key == "b/q");
        assert!(
            matches!(result, Err(StoreError::Sql(_))),
            "expected the body's read to fail, got {result:?}"
        );
    }

    #[test]
    fn newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(&dir));
        {
            let conn = Connection::open(db(&dir)).expect("raw open");
            conn.execute_batch("PRAGMA user_version = 99")
                .expect("bump");
        }
        let refused = Store::open(&db(&dir), StoreOptions::default());
        let Err(err @ StoreError::NewerSchema { found: 99, .. }) = refused else {
            panic!("expected NewerSchema, got {:?}", refused.err());
        };
        assert!(
            err.to_string().contains(&db(&dir).display().to_string()),
            "{err}"
        );
        let conn = Connection::open(db(&dir)).expect("raw open");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 99);
    }

    #[test]
    fn corrupt_file_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = b"this is not a sqlite database, it only pretends to be one".repeat(100);
        std::fs::write(db(&dir), &garbage).expect("write garbage");
        let refused = Store::open(&db(&dir), StoreOptions::default());
        let Err(err @ StoreError::Open { .. }) = refused else {
            panic!("expected Open, got {:?}", refused.err());
        };
        assert!(
            err.to_string().contains(&db(&dir).display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::read(db(&dir)).expect("read back"), garbage);
    }

    #[test]
    fn wal_and_full_sync_are_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let conn = store.writer();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("sync");
        assert_eq!((mode.as_str(), sync), ("wal", 2));
    }

    #[tokio::test]
    async fn disk_full_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store
            .create(&pods(), "ns", "small", pod("ns", "small"))
            .expect("create");
        let mut watch = store.watch(&pods(), None, 1).expect("watch");
        store.limit_pages_for_test(2);

        let mut big = pod("ns", "big");
        big["data"] = json!("x".repeat(1 << 20));
        let full = store.create(&pods(), "ns", "big", big);
        let Err(err @ StoreError::DiskFull { .. }) = full else {
            panic!("expected DiskFull, got {full:?}");
        };
        assert!(
            err.to_string().contains(&db(&dir).display().to_string()),
            "{err}"
        );
        assert_eq!(store.resource_version(), 1);
        assert_eq!(store.get(&pods(), "ns", "big").expect("get"), None);
        assert_quiet(&mut watch).await;

        // The store is still usable, and the failed write left no trace on disk.
        let next = store
            .create(&pods(), "ns", "next", pod("ns", "next"))
            .expect("create");
        assert_eq!(rv_of(&next), 2);
        assert_eq!(take(&mut watch, 1).await[0].name, "next");
        drop(watch);
        drop(store);
        let store = open(&dir);
        assert_eq!(store.resource_version(), 2);
        let (items, _) = store.list(&pods(), None).expect("list");
        assert_eq!(items.len(), 2);
        let mut replay = store.watch(&pods(), None, 0).expect("watch");
        let rvs: Vec<u64> = take(&mut replay, 2).await.iter().map(|e| e.rv).collect();
        assert_eq!(rvs, [1, 2]);
    }
}
