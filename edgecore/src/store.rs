//! The edge's SQLite store (`edge.db` in the data dir): the objects the cloud sent this node,
//! and the status outbox (the reports for the cloud, see [`crate::outbox`]).
//!
//! KubeEdge calls this part MetaManager. Only this module touches SQLite; rows become
//! [`StoredObject`]s, [`HeldObject`]s and [`StoredReport`]s here. Each user opens its own
//! connection: the replica and the outbox writer for writing, the pod manager and `ctl` for
//! reading.
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`. In WAL mode `FULL` syncs
//! the WAL at every commit, so a transaction that [`Store::apply`] reports committed survives a
//! power loss; `NORMAL` would only keep the file consistent and could lose the last commits,
//! after the cloud was told they were applied. Acknowledge to the cloud only after `apply`
//! returns.
//!
//! Sharing: `edgecore run` holds the store open for writing while `edgecore ctl` reads it
//! ([`Store::open_read_only`]); WAL lets readers and the writer proceed together, and a busy
//! timeout covers the short moments when one waits for the other.
//!
//! Schema: `PRAGMA user_version` is the number of [`MIGRATIONS`] applied. Each migration runs in
//! one transaction with its version bump. A store written by a newer edgecore is refused and left
//! as it is.
//!
//! Failure policy: a corrupt store is refused, never deleted or recreated: the operator decides.
//! Moving `edge.db` aside (with any `edge.db-wal` and `edge.db-shm` next to it) is always safe:
//! edgecore then starts empty and fetches everything from the cloud again.
//!
//! Permissions: the store holds Secrets, so `edge.db` is created with mode 0600 before SQLite
//! opens it (`daemon::sqlite::create_private`, which also fixes looser modes of an existing
//! file and its `-wal`/`-shm`); SQLite gives its `-wal` and `-shm` files the mode of the
//! database file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use devices::TwinProperty;

use proto::sync::{ObjectKey, StoreOp};
use proto::{HeldObject, ObjectRef};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

/// The store's file name in the data dir.
pub const DB_FILE: &str = "edge.db";

/// The schema migrations in order: applying `MIGRATIONS[i]` takes `user_version` from `i` to
/// `i + 1`. Append only; never edit one that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: one row per object the cloud sent. `namespace` is empty for cluster-scoped kinds;
    // `updated_at` is in Unix seconds, for operators reading the file.
    "CREATE TABLE objects (
        kind TEXT NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        uid TEXT NOT NULL,
        resource_version INTEGER NOT NULL,
        body BLOB NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (kind, namespace, name)
    );",
    // 2: the status outbox (`edgecore::outbox`). One row per object the edge reports on: the
    // latest report, its generation and whether the cloud acknowledged it. The row stays after
    // the acknowledgement (the last status reported survives a reboot) and goes when the
    // object is forgotten or its pod deletion is acknowledged. `status` is JSON text, NULL
    // when only a deletion was reported. `report_generations` holds one row: every generation
    // below `reserved_below` may have been handed out, so a restart continues from there.
    "CREATE TABLE status_reports (
        kind TEXT NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        uid TEXT NOT NULL,
        generation INTEGER NOT NULL,
        status TEXT,
        pod_deleted INTEGER NOT NULL,
        acknowledged INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (kind, namespace, name, uid)
    );
    CREATE TABLE report_generations (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        reserved_below INTEGER NOT NULL
    );",
    // 3: service-account tokens of pods' projected volumes (`edgecore::tokens`), one row per
    // pod uid and token source, so a restart offline mounts the last token again. `token` is
    // the JWT (a secret, like the Secrets in `objects`); `expires_at` is the API server's
    // expiry and `refresh_at` when the edge asks for a new one, both Unix seconds.
    "CREATE TABLE service_account_tokens (
        pod_uid TEXT NOT NULL,
        namespace TEXT NOT NULL,
        pod_name TEXT NOT NULL,
        service_account TEXT NOT NULL,
        audience TEXT NOT NULL,
        expiration_seconds INTEGER NOT NULL,
        token TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        refresh_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (pod_uid, service_account, audience, expiration_seconds)
    );",
    // 4: the identity of the cloud's API store this edge synced with (`HelloAck`'s
    // `cloud_state_id`), one row. A cloud with another store is not synced with until an
    // operator adopts it (docs/operations.md).
    "CREATE TABLE cloud_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        state_id TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );",
    // 5: the device twins (`edgecore::devices::twins`). `device_states` has one row per Device
    // the node holds (its uid, so a Device deleted and created again under the same name starts
    // a fresh twin), with the state the mapper reported and the RFC 3339 time it was last
    // online ("" when unknown). `device_twins` has one row per device property: the desired
    // value from the spec, the value the mapper reported and the desired value it says it holds,
    // each a JSON `{value, metadata}` text or NULL. Rows go when the device leaves the node.
    "CREATE TABLE device_states (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        uid TEXT NOT NULL,
        state TEXT NOT NULL,
        last_online_time TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    CREATE TABLE device_twins (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        property TEXT NOT NULL,
        desired TEXT,
        reported TEXT,
        observed_desired TEXT,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name, property)
    );",
];

/// The store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A read-only open found no store.
    #[error(
        "{path} does not exist: this gateway holds no objects yet (does `edgecore run` use this data dir?)"
    )]
    Missing { path: PathBuf },
    /// The data dir or the database file could not be created or inspected.
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite could not open the file.
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// SQLite kept another journal mode than WAL (the file system lacks shared memory support).
    #[error("cannot switch {path} to WAL mode (journal_mode stays {mode})")]
    NoWal { path: PathBuf, mode: String },
    /// The file is not a database, or its integrity check failed.
    #[error(
        "{path} is corrupt ({detail}); edgecore leaves it as it is: stop edgecore and move it aside \
         together with any {DB_FILE}-wal and {DB_FILE}-shm next to it, and edgecore will fetch \
         everything from the cloud again"
    )]
    Corrupt { path: PathBuf, detail: String },
    /// The schema is newer than this build knows.
    #[error(
        "{path} was written by a newer edgecore (schema {found}, this build knows up to {known}); \
         upgrade edgecore or restore a backup"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    /// A read-only open found a schema that `edgecore run` has not migrated yet.
    #[error(
        "{path} has schema {found} and this build reads schema {known}; start `edgecore run` once to migrate it"
    )]
    OlderSchema {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    /// A migration failed; it was rolled back.
    #[error("cannot migrate {path} to schema {version}")]
    Migrate {
        path: PathBuf,
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    /// The file exists but is empty although an earlier start created it: its contents were
    /// lost. Starting from it would stop every pod the gateway runs.
    #[error(
        "{path} is empty (0 bytes): the gateway's store was lost (truncated or replaced). edgecore \
         refuses to start from an empty store, which would stop every pod this gateway runs. \
         Restore {DB_FILE} (with any {DB_FILE}-wal next to it) from a backup; or, to start anew, \
         remove it: the cloud then sends what this node should run, and pods it no longer \
         knows are stopped"
    )]
    Emptied { path: PathBuf },
    /// The data dir is on a read-only file system.
    #[error(
        "the data dir {dir} is on a read-only file system: edgecore run writes its store \
         ({DB_FILE}) there; remount it read-write (edgecore ctl get still reads it)"
    )]
    ReadOnly { dir: PathBuf },
    /// The file system is full; the transaction was rolled back.
    #[error("disk full writing {path}")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// An object's resource version does not fit SQLite's signed 64-bit integers.
    #[error("cannot store {key} in {path}: resource version {resource_version} is too large")]
    ResourceVersionTooLarge {
        path: PathBuf,
        key: ObjectKey,
        resource_version: u64,
    },
    /// A status report's generation does not fit SQLite's signed 64-bit integers.
    #[error("cannot store status report generation {generation} in {path}: too large")]
    GenerationTooLarge { path: PathBuf, generation: u64 },
    /// A query failed.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// A write failed; the transaction was rolled back.
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// Turns a SQLite error into a corruption or disk-full error when it is one, else `otherwise`.
fn classify(
    path: &Path,
    source: rusqlite::Error,
    otherwise: impl FnOnce(PathBuf, rusqlite::Error) -> StoreError,
) -> StoreError {
    let path = path.to_path_buf();
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path,
            detail: source.to_string(),
        },
        Some(ErrorCode::DiskFull) => StoreError::DiskFull { path, source },
        _ => otherwise(path, source),
    }
}

fn read_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| {
        classify(path, source, |path, source| StoreError::Read {
            path,
            source,
        })
    }
}

fn write_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| {
        classify(path, source, |path, source| StoreError::Write {
            path,
            source,
        })
    }
}

fn open_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| {
        classify(path, source, |path, source| StoreError::Open {
            path,
            source,
        })
    }
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One object as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Kind, namespace (empty for cluster-scoped kinds) and name.
    pub key: ObjectKey,
    /// The API server's uid of the object.
    pub uid: String,
    /// The API server's resource version of this body.
    pub resource_version: u64,
    /// The Kubernetes JSON body, as the cloud sent it.
    pub body: Vec<u8>,
}

impl StoredObject {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredObject> {
        Ok(StoredObject {
            key: ObjectKey {
                kind: row.get(0)?,
                namespace: row.get(1)?,
                name: row.get(2)?,
            },
            uid: row.get(3)?,
            resource_version: row.get(4)?,
            body: row.get(5)?,
        })
    }
}

/// An open `edge.db`: the only handle to the edge's SQLite database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// For a read-only open of a store on a read-only file system: the private copy the
    /// connection reads, removed with the store.
    _snapshot: Option<Snapshot>,
}

impl Store {
    /// Opens or creates DIR/edge.db, applies migrations, checks integrity.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join(DB_FILE);
        if on_read_only_fs(data_dir) {
            return Err(StoreError::ReadOnly {
                dir: data_dir.to_path_buf(),
            });
        }
        let existed = path.exists();
        daemon::sqlite::create_private(&path).map_err(|e| StoreError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        })?;
        if existed && fs::metadata(&path).map_err(io_err("inspect", &path))?.len() == 0 {
            return Err(StoreError::Emptied { path });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = daemon::sqlite::open(&path, flags).map_err(open_err(&path))?;
        // Read-only checks first: a store this build must refuse is never modified.
        schema_version(&conn, &path)?;
        quick_check(&conn, &path)?;
        let mode = daemon::sqlite::make_durable(&conn).map_err(open_err(&path))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        migrate(&mut conn, &path)?;
        Ok(Store {
            conn,
            path,
            _snapshot: None,
        })
    }

    /// Opens an existing store read-only (for `edgecore ctl`, works while `edgecore run` has it
    /// open). Error naming the path if it does not exist.
    pub fn open_read_only(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join(DB_FILE);
        if let Err(e) = fs::metadata(&path) {
            return Err(if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::Missing { path }
            } else {
                io_err("inspect", &path)(e)
            });
        }
        // SQLite reads a WAL store only where it can create the shared-memory file; on a
        // read-only file system it reads a private copy (with the WAL, so nothing committed
        // is missed).
        let snapshot = if on_read_only_fs(data_dir) {
            Some(Snapshot::of(&path)?)
        } else {
            None
        };
        let flags = match &snapshot {
            None => OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            Some(_) => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        };
        let file = snapshot.as_ref().map_or(path.as_path(), |s| s.db.as_path());
        let conn = daemon::sqlite::open(file, flags).map_err(open_err(&path))?;
        let found = schema_version(&conn, &path)?;
        if found < MIGRATIONS.len() as i64 {
            return Err(StoreError::OlderSchema {
                path,
                found,
                known: MIGRATIONS.len(),
            });
        }
        quick_check(&conn, &path)?;
        Ok(Store {
            conn,
            path,
            _snapshot: snapshot,
        })
    }

    /// The readiness probe's check: the store opens on the real file and answers, with a
    /// schema this build knows. Unlike [`Store::open_read_only`] it neither scans the file
    /// (`quick_check`, done at start) nor copies it on a read-only file system, so a probe every
    /// few seconds costs the same whatever the store's size; a store SQLite cannot read there
    /// fails the probe, as it should.
    pub fn probe(data_dir: &Path) -> Result<(), StoreError> {
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Missing { path });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = daemon::sqlite::open(&path, flags).map_err(open_err(&path))?;
        schema_version(&conn, &path).map(drop)
    }

    /// The identity of the cloud's API store this edge last synced with, if any.
    pub fn cloud_state_id(&self) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT state_id FROM cloud_state WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(read_err(&self.path))
    }

    /// Remembers the identity of the cloud's API store, durably.
    pub fn set_cloud_state_id(&mut self, state_id: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO cloud_state (id, state_id, updated_at) VALUES (1, ?1, unixepoch())
                 ON CONFLICT(id) DO UPDATE SET state_id = excluded.state_id,
                    updated_at = excluded.updated_at",
                [state_id],
            )
            .map_err(write_err(&self.path))?;
        Ok(())
    }

    /// What the store holds, for Hello and for EdgeReplica::new.
    pub fn inventory(&self) -> Result<Vec<HeldObject>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT kind, namespace, name, uid, resource_version FROM objects
                 ORDER BY kind, namespace, name",
            )
            .map_err(read_err(&self.path))?;
        let rows = statement
            .query_map([], |row| {
                let key = ObjectKey {
                    kind: row.get(0)?,
                    namespace: row.get(1)?,
                    name: row.get(2)?,
                };
                let uid: String = row.get(3)?;
                Ok(HeldObject {
                    object: key.to_ref(&uid),
                    resource_version: row.get(4)?,
                })
            })
            .map_err(read_err(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(read_err(&self.path))
    }

    /// Applies ops in ONE transaction; returns only once the transaction is durable.
    ///
    /// On any error nothing is applied.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_err(path))?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO objects
                         (kind, namespace, name, uid, resource_version, body, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, unixepoch())
                     ON CONFLICT (kind, namespace, name) DO UPDATE SET
                         uid = excluded.uid,
                         resource_version = excluded.resource_version,
                         body = excluded.body,
                         updated_at = excluded.updated_at",
                )
                .map_err(write_err(path))?;
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                )
                .map_err(write_err(path))?;
            for op in ops {
                match op {
                    StoreOp::Put {
                        key,
                        uid,
                        resource_version,
                        body,
                    } => {
                        let rv = i64::try_from(*resource_version).map_err(|_| {
                            StoreError::ResourceVersionTooLarge {
                                path: path.clone(),
                                key: key.clone(),
                                resource_version: *resource_version,
                            }
                        })?;
                        put.execute(rusqlite::params![
                            key.kind,
                            key.namespace,
                            key.name,
                            uid,
                            rv,
                            body
                        ])
                        .map_err(write_err(path))?;
                    }
                    StoreOp::Delete { key } => {
                        delete
                            .execute([&key.kind, &key.namespace, &key.name])
                            .map_err(write_err(path))?;
                    }
                }
            }
        }
        // With synchronous=FULL the commit has synced the WAL when it returns.
        tx.commit().map_err(write_err(path))
    }

    /// The objects of `kinds` (every kind when empty), ordered by kind, namespace, name.
    pub fn list(&self, kinds: &[&str]) -> Result<Vec<StoredObject>, StoreError> {
        let filter = if kinds.is_empty() {
            String::new()
        } else {
            format!("WHERE kind IN ({})", vec!["?"; kinds.len()].join(", "))
        };
        let sql = format!(
            "SELECT kind, namespace, name, uid, resource_version, body FROM objects {filter}
             ORDER BY kind, namespace, name"
        );
        let mut statement = self
            .conn
            .prepare_cached(&sql)
            .map_err(read_err(&self.path))?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(kinds), StoredObject::from_row)
            .map_err(read_err(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(read_err(&self.path))
    }

    /// The object at `key`, if the store holds it.
    pub fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT kind, namespace, name, uid, resource_version, body FROM objects
                 WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
            )
            .map_err(read_err(&self.path))?;
        statement
            .query_row(
                [&key.kind, &key.namespace, &key.name],
                StoredObject::from_row,
            )
            .optional()
            .map_err(read_err(&self.path))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The objects of `kind` the store holds, as references (no bodies).
    pub fn refs(&self, kind: &str) -> Result<Vec<ObjectRef>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT namespace, name, uid FROM objects WHERE kind = ?1
                 ORDER BY namespace, name",
            )
            .map_err(read_err(&self.path))?;
        let rows = statement
            .query_map([kind], |row| {
                Ok(ObjectRef {
                    kind: kind.to_string(),
                    namespace: row.get(0)?,
                    name: row.get(1)?,
                    uid: row.get(2)?,
                })
            })
            .map_err(read_err(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(read_err(&self.path))
    }

    /// The status outbox as the last [`Store::write_reports`] left it.
    pub fn reports(&self) -> Result<StoredReports, StoreError> {
        let path = &self.path;
        let reserved_below: Option<i64> = self
            .conn
            .query_row(
                "SELECT reserved_below FROM report_generations WHERE id = 1",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(read_err(path))?;
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT kind, namespace, name, uid, generation, status, pod_deleted, acknowledged
                 FROM status_reports ORDER BY generation",
            )
            .map_err(read_err(path))?;
        let rows = statement
            .query_map([], |row| {
                let object = ObjectRef {
                    kind: row.get(0)?,
                    namespace: row.get(1)?,
                    name: row.get(2)?,
                    uid: row.get(3)?,
                };
                let generation: i64 = row.get(4)?;
                let status: Option<String> = row.get(5)?;
                Ok((object, generation, status, row.get(6)?, row.get(7)?))
            })
            .map_err(read_err(path))?;
        let mut reports = Vec::new();
        for row in rows {
            let (object, generation, status, pod_deleted, acknowledged) =
                row.map_err(read_err(path))?;
            let corrupt = |detail: String| StoreError::Corrupt {
                path: path.clone(),
                detail,
            };
            let generation = u64::try_from(generation).map_err(|_| {
                corrupt(format!(
                    "status report of {object:?} has generation {generation}"
                ))
            })?;
            let status = status
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|e| corrupt(format!("status report of {object:?} is not JSON: {e}")))?;
            reports.push(StoredReport {
                object,
                generation,
                status,
                pod_deleted,
                acknowledged,
            });
        }
        let reserved_below = reserved_below
            .map(|value| {
                u64::try_from(value).map_err(|_| StoreError::Corrupt {
                    path: path.clone(),
                    detail: format!("report generations reserved below {value}"),
                })
            })
            .transpose()?;
        Ok(StoredReports {
            reports,
            reserved_below,
        })
    }

    /// Applies one write of the status outbox in ONE transaction (deletes, then upserts, then
    /// the reservation); returns only once it is durable. On any error nothing is applied.
    pub fn write_reports(&mut self, write: &ReportsWrite) -> Result<(), StoreError> {
        let path = &self.path;
        let too_large = |generation: u64| StoreError::GenerationTooLarge {
            path: path.clone(),
            generation,
        };
        let reserved_below =
            i64::try_from(write.reserved_below).map_err(|_| too_large(write.reserved_below))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_err(path))?;
        {
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM status_reports
                     WHERE kind = ?1 AND namespace = ?2 AND name = ?3 AND uid = ?4",
                )
                .map_err(write_err(path))?;
            for object in &write.delete {
                delete
                    .execute([&object.kind, &object.namespace, &object.name, &object.uid])
                    .map_err(write_err(path))?;
            }
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO status_reports (kind, namespace, name, uid, generation, status,
                         pod_deleted, acknowledged, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, unixepoch())
                     ON CONFLICT (kind, namespace, name, uid) DO UPDATE SET
                         generation = excluded.generation,
                         status = excluded.status,
                         pod_deleted = excluded.pod_deleted,
                         acknowledged = excluded.acknowledged,
                         updated_at = excluded.updated_at",
                )
                .map_err(write_err(path))?;
            for report in &write.upsert {
                let generation =
                    i64::try_from(report.generation).map_err(|_| too_large(report.generation))?;
                let status = report.status.as_ref().map(|status| status.to_string());
                put.execute(rusqlite::params![
                    report.object.kind,
                    report.object.namespace,
                    report.object.name,
                    report.object.uid,
                    generation,
                    status,
                    report.pod_deleted,
                    report.acknowledged,
                ])
                .map_err(write_err(path))?;
            }
            tx.execute(
                "INSERT INTO report_generations (id, reserved_below) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET
                     reserved_below = max(reserved_below, excluded.reserved_below)",
                [reserved_below],
            )
            .map_err(write_err(path))?;
        }
        // With synchronous=FULL the commit has synced the WAL when it returns.
        tx.commit().map_err(write_err(path))
    }

    /// Every service-account token the store holds.
    pub fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let path = &self.path;
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT pod_uid, namespace, pod_name, service_account, audience,
                        expiration_seconds, token, expires_at, refresh_at
                 FROM service_account_tokens",
            )
            .map_err(read_err(path))?;
        let rows = statement
            .query_map([], |row| {
                Ok(StoredToken {
                    pod_uid: row.get(0)?,
                    namespace: row.get(1)?,
                    pod_name: row.get(2)?,
                    service_account: row.get(3)?,
                    audience: row.get(4)?,
                    expiration_seconds: row.get::<_, i64>(5)?.max(0) as u64,
                    token: row.get(6)?,
                    expires_at: row.get(7)?,
                    refresh_at: row.get(8)?,
                })
            })
            .map_err(read_err(path))?;
        rows.collect::<Result<_, _>>().map_err(read_err(path))
    }

    /// Stores a token, replacing the one held for the same pod and source; returns once it is
    /// durable.
    pub fn put_token(&mut self, token: &StoredToken) -> Result<(), StoreError> {
        let path = &self.path;
        let expiration = i64::try_from(token.expiration_seconds).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached(
                "INSERT INTO service_account_tokens (pod_uid, namespace, pod_name,
                     service_account, audience, expiration_seconds, token, expires_at,
                     refresh_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, unixepoch())
                 ON CONFLICT (pod_uid, service_account, audience, expiration_seconds)
                 DO UPDATE SET
                     namespace = excluded.namespace,
                     pod_name = excluded.pod_name,
                     token = excluded.token,
                     expires_at = excluded.expires_at,
                     refresh_at = excluded.refresh_at,
                     updated_at = excluded.updated_at",
            )
            .and_then(|mut put| {
                put.execute(rusqlite::params![
                    token.pod_uid,
                    token.namespace,
                    token.pod_name,
                    token.service_account,
                    token.audience,
                    expiration,
                    token.token,
                    token.expires_at,
                    token.refresh_at,
                ])
            })
            .map_err(write_err(path))?;
        Ok(())
    }

    /// Removes the tokens of the given pods (by uid) in one transaction.
    pub fn delete_pod_tokens(&mut self, pod_uids: &[String]) -> Result<(), StoreError> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_err(path))?;
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM service_account_tokens WHERE pod_uid = ?1")
                .map_err(write_err(path))?;
            for uid in pod_uids {
                delete.execute([uid]).map_err(write_err(path))?;
            }
        }
        tx.commit().map_err(write_err(path))
    }

    /// Every device twin the store holds, by namespace and name.
    pub fn device_twins(&self) -> Result<Vec<StoredTwin>, StoreError> {
        let path = &self.path;
        let mut twins: BTreeMap<(String, String), StoredTwin> = BTreeMap::new();
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT namespace, name, uid, state, last_online_time FROM device_states",
            )
            .map_err(read_err(path))?;
        let rows = statement
            .query_map([], |row| {
                Ok(StoredTwin {
                    namespace: row.get(0)?,
                    name: row.get(1)?,
                    uid: row.get(2)?,
                    state: row.get(3)?,
                    last_online_time: row.get(4)?,
                    properties: BTreeMap::new(),
                })
            })
            .map_err(read_err(path))?;
        for twin in rows {
            let twin = twin.map_err(read_err(path))?;
            twins.insert((twin.namespace.clone(), twin.name.clone()), twin);
        }
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT namespace, name, property, desired, reported, observed_desired
                 FROM device_twins",
            )
            .map_err(read_err(path))?;
        let rows = statement
            .query_map([], |row| {
                let key: (String, String) = (row.get(0)?, row.get(1)?);
                let property: String = row.get(2)?;
                let values: [Option<String>; 3] = [row.get(3)?, row.get(4)?, row.get(5)?];
                Ok((key, property, values))
            })
            .map_err(read_err(path))?;
        for row in rows {
            let (key, property, [desired, reported, observed_desired]) =
                row.map_err(read_err(path))?;
            let parse = |text: Option<String>| -> Result<Option<TwinProperty>, StoreError> {
                text.map(|text| serde_json::from_str(&text))
                    .transpose()
                    .map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        detail: format!(
                            "twin of property {property:?} of device {}/{} is not a value: {e}",
                            key.0, key.1
                        ),
                    })
            };
            let stored = StoredProperty {
                desired: parse(desired)?,
                reported: parse(reported)?,
                observed_desired: parse(observed_desired)?,
            };
            // A property row without its device row (cannot happen through `write_twins`) is
            // left out: the twin of a device starts with its device row.
            if let Some(twin) = twins.get_mut(&key) {
                twin.properties.insert(property, stored);
            }
        }
        Ok(twins.into_values().collect())
    }

    /// Applies one write of the device twins in ONE transaction (removals first, then
    /// upserts); returns only once it is durable. On any error nothing is applied.
    pub fn write_twins(&mut self, write: &TwinsWrite) -> Result<(), StoreError> {
        let path = &self.path;
        let json = |value: &Option<TwinProperty>| {
            // Serializing strings cannot fail.
            value
                .as_ref()
                .map(|v| serde_json::to_string(v).unwrap_or_default())
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_err(path))?;
        {
            let mut delete_states = tx
                .prepare_cached("DELETE FROM device_states WHERE namespace = ?1 AND name = ?2")
                .map_err(write_err(path))?;
            let mut delete_twins = tx
                .prepare_cached("DELETE FROM device_twins WHERE namespace = ?1 AND name = ?2")
                .map_err(write_err(path))?;
            for (namespace, name) in &write.remove_devices {
                delete_states
                    .execute([namespace, name])
                    .map_err(write_err(path))?;
                delete_twins
                    .execute([namespace, name])
                    .map_err(write_err(path))?;
            }
            let mut delete_property = tx
                .prepare_cached(
                    "DELETE FROM device_twins
                     WHERE namespace = ?1 AND name = ?2 AND property = ?3",
                )
                .map_err(write_err(path))?;
            for (namespace, name, property) in &write.remove_properties {
                delete_property
                    .execute([namespace, name, property])
                    .map_err(write_err(path))?;
            }
            let mut put_state = tx
                .prepare_cached(
                    "INSERT INTO device_states
                         (namespace, name, uid, state, last_online_time, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, unixepoch())
                     ON CONFLICT (namespace, name) DO UPDATE SET
                         uid = excluded.uid,
                         state = excluded.state,
                         last_online_time = excluded.last_online_time,
                         updated_at = excluded.updated_at",
                )
                .map_err(write_err(path))?;
            for device in &write.devices {
                put_state
                    .execute([
                        &device.namespace,
                        &device.name,
                        &device.uid,
                        &device.state,
                        &device.last_online_time,
                    ])
                    .map_err(write_err(path))?;
            }
            let mut put_property = tx
                .prepare_cached(
                    "INSERT INTO device_twins (namespace, name, property, desired, reported,
                         observed_desired, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, unixepoch())
                     ON CONFLICT (namespace, name, property) DO UPDATE SET
                         desired = excluded.desired,
                         reported = excluded.reported,
                         observed_desired = excluded.observed_desired,
                         updated_at = excluded.updated_at",
                )
                .map_err(write_err(path))?;
            for (namespace, name, property, values) in &write.properties {
                put_property
                    .execute(rusqlite::params![
                        namespace,
                        name,
                        property,
                        json(&values.desired),
                        json(&values.reported),
                        json(&values.observed_desired),
                    ])
                    .map_err(write_err(path))?;
            }
        }
        // With synchronous=FULL the commit has synced the WAL when it returns.
        tx.commit().map_err(write_err(path))
    }

    /// Makes writes of this connection fail with SQLITE_FULL as on a full file system once
    /// the file would grow (`full`), or lifts that limit. Fault injection for tests.
    #[cfg(test)]
    pub(crate) fn simulate_disk_full(&self, full: bool) {
        let pages: i64 = if full {
            self.conn
                .pragma_query_value(None, "page_count", |row| row.get(0))
                .expect("page_count")
        } else {
            i64::from(u32::MAX - 1)
        };
        self.conn
            .pragma_update_and_check(None, "max_page_count", pages, |row| row.get::<_, i64>(0))
            .expect("max_page_count");
    }
}

/// A service-account token as the store keeps it (`edgecore::tokens`). `Debug` leaves the
/// token out.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    pub service_account: String,
    /// Empty for the API server's default audiences.
    pub audience: String,
    pub expiration_seconds: u64,
    /// The JWT.
    pub token: String,
    /// The API server's expiry, Unix seconds.
    pub expires_at: i64,
    /// When the edge asks for a new one, Unix seconds.
    pub refresh_at: i64,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("pod_uid", &self.pod_uid)
            .field("service_account", &self.service_account)
            .field("audience", &self.audience)
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish_non_exhaustive()
    }
}

/// A device's twin as the store keeps it (`device_states` and its `device_twins` rows).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredTwin {
    pub namespace: String,
    pub name: String,
    /// The uid of the Device the twin belongs to.
    pub uid: String,
    /// The mapper's last state ("" before the first).
    pub state: String,
    /// RFC 3339; "" when the device was never seen online.
    pub last_online_time: String,
    /// By property name.
    pub properties: BTreeMap<String, StoredProperty>,
}

/// One property's row of a twin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredProperty {
    /// The desired value of the spec, as last written.
    pub desired: Option<TwinProperty>,
    /// The value the mapper (or an MQTT client) reported, with its metadata.
    pub reported: Option<TwinProperty>,
    /// The desired value the mapper said it holds.
    pub observed_desired: Option<TwinProperty>,
}

/// One durable write of the device twins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TwinsWrite {
    /// Devices whose twin goes (both tables), by namespace and name; applied first.
    pub remove_devices: Vec<(String, String)>,
    /// Property rows that go: namespace, name, property.
    pub remove_properties: Vec<(String, String, String)>,
    /// Device rows inserted or replaced (their `properties` are ignored here).
    pub devices: Vec<StoredTwin>,
    /// Property rows inserted or replaced: namespace, name, property, values.
    pub properties: Vec<(String, String, String, StoredProperty)>,
}

/// One status report as the store keeps it (a row of the outbox).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReport {
    /// The object reported on; the uid is empty for the node.
    pub object: ObjectRef,
    /// Orders the reports of this edge; never reused.
    pub generation: u64,
    /// The latest status reported (kept when a pod deletion replaces it).
    pub status: Option<serde_json::Value>,
    /// The report is the pod's deletion, not its status.
    pub pod_deleted: bool,
    /// The cloud acknowledged this generation.
    pub acknowledged: bool,
}

/// The status outbox in the store.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredReports {
    /// Oldest generation first.
    pub reports: Vec<StoredReport>,
    /// Every generation handed out so far is below this; `None` before the first write.
    pub reserved_below: Option<u64>,
}

/// One durable write of the status outbox.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportsWrite {
    /// Rows removed (applied first, so an object forgotten and reported again ends upserted).
    pub delete: Vec<ObjectRef>,
    /// Rows inserted or replaced.
    pub upsert: Vec<StoredReport>,
    /// Generations reserved from now on (the stored value never decreases).
    pub reserved_below: u64,
}

/// Whether `dir` (or, if it does not exist yet, its nearest existing parent) is on a file
/// system mounted read-only.
fn on_read_only_fs(dir: &Path) -> bool {
    let Some(existing) = dir.ancestors().find(|d| d.exists()) else {
        return false;
    };
    rustix::fs::statvfs(existing)
        .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// A private copy of a store (and its WAL) in a 0700 temporary directory, removed on drop.
#[derive(Debug)]
struct Snapshot {
    dir: PathBuf,
    db: PathBuf,
}

impl Snapshot {
    fn of(path: &Path) -> Result<Snapshot, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("edgecore-store-{}-{nanos}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        let snapshot = Snapshot {
            db: dir.join(DB_FILE),
            dir,
        };
        fs::copy(path, &snapshot.db).map_err(io_err("copy", path))?;
        let wal = path.with_file_name(format!("{DB_FILE}-wal"));
        if wal.exists() {
            let to = snapshot.dir.join(format!("{DB_FILE}-wal"));
            fs::copy(&wal, to).map_err(io_err("copy", &wal))?;
        }
        Ok(snapshot)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The schema version, refusing one newer than this build knows. Reads only.
fn schema_version(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err(path))?;
    if found < 0 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("schema version {found} is not one edgecore writes"),
        });
    }
    if found > MIGRATIONS.len() as i64 {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            known: MIGRATIONS.len(),
        });
    }
    Ok(found)
}

/// Runs `PRAGMA quick_check`; anything but a single "ok" is corruption.
fn quick_check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mut problems: Vec<String> = Vec::new();
    conn.pragma_query(None, "quick_check", |row| {
        problems.push(row.get(0)?);
        Ok(())
    })
    .map_err(open_err(path))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    const SHOWN: usize = 3;
    let mut detail = problems
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > SHOWN {
        detail.push_str(&format!("; and {} more problems", problems.len() - SHOWN));
    }
    Err(StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("integrity check failed: {detail}"),
    })
}

/// Applies the migrations this store lacks (`daemon::sqlite::migrate`).
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let applied = daemon::sqlite::migrate(conn, MIGRATIONS).map_err(|e| {
        let version = e.version;
        classify(path, e.source, |path, source| StoreError::Migrate {
            path,
            version,
            source,
        })
    })?;
    for version in applied {
        tracing::info!(path = %path.display(), schema = version, "store migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn put(kind: &str, namespace: &str, name: &str, rv: u64, body: &str) -> StoreOp {
        StoreOp::Put {
            key: ObjectKey::new(kind, namespace, name),
            uid: format!("uid-{name}"),
            resource_version: rv,
            body: body.as_bytes().to_vec(),
        }
    }

    fn keys(objects: &[StoredObject]) -> Vec<String> {
        objects.iter().map(|o| o.key.to_string()).collect()
    }

    /// Every file in `dir`, by name, with its length and a digest of its bytes.
    fn snapshot(dir: &Path) -> Vec<(String, usize, String)> {
        use sha2::Digest;
        let mut files: Vec<(String, usize, String)> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| {
                let e = e.expect("entry");
                let bytes = fs::read(e.path()).expect("read");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    bytes.len(),
                    hex::encode(sha2::Sha256::digest(&bytes)),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn applied_objects_come_back_in_order_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[
                put("Pod", "default", "web", 12, r#"{"kind":"Pod"}"#),
                put("ConfigMap", "default", "b", 10, "{}"),
                put("ConfigMap", "default", "a", 11, "{}"),
                put("Node", "", "gw-1", 9, "{}"),
            ])
            .expect("apply");
        for store in [store, Store::open(dir.path()).expect("reopen")] {
            assert_eq!(
                keys(&store.list(&[]).expect("list")),
                [
                    "ConfigMap default/a",
                    "ConfigMap default/b",
                    "Node gw-1",
                    "Pod default/web"
                ]
            );
            assert_eq!(
                keys(&store.list(&["Pod", "Node"]).expect("list")),
                ["Node gw-1", "Pod default/web"]
            );
            let pod = store
                .get(&ObjectKey::new("Pod", "default", "web"))
                .expect("get")
                .expect("pod is there");
            assert_eq!(pod.uid, "uid-web");
            assert_eq!(pod.resource_version, 12);
            assert_eq!(pod.body, br#"{"kind":"Pod"}"#);
            let inventory = store.inventory().expect("inventory");
            assert_eq!(inventory.len(), 4);
            assert_eq!(
                inventory[3],
                HeldObject {
                    object: ObjectKey::new("Pod", "default", "web").to_ref("uid-web"),
                    resource_version: 12,
                }
            );
            assert_eq!(
                store
                    .get(&ObjectKey::new("Pod", "other", "web"))
                    .expect("get"),
                None
            );
        }
    }

    #[test]
    fn device_twins_survive_reopen_and_go_with_their_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let value = |v: &str| TwinProperty {
            value: v.into(),
            metadata: [("timestamp".to_string(), "1".to_string())].into(),
        };
        let twin = StoredTwin {
            namespace: "default".into(),
            name: "sensor".into(),
            uid: "u1".into(),
            state: "ok".into(),
            last_online_time: "2026-12-05T10:00:00Z".into(),
            properties: BTreeMap::new(),
        };
        let row = |property: &str, reported: &str| {
            (
                "default".to_string(),
                "sensor".to_string(),
                property.to_string(),
                StoredProperty {
                    desired: Some(value("20")),
                    reported: Some(value(reported)),
                    observed_desired: None,
                },
            )
        };
        {
            let mut store = Store::open(dir.path()).expect("open");
            store
                .write_twins(&TwinsWrite {
                    devices: vec![twin.clone()],
                    properties: vec![row("a", "1"), row("b", "2")],
                    ..TwinsWrite::default()
                })
                .expect("write");
            store
                .write_twins(&TwinsWrite {
                    remove_properties: vec![("default".into(), "sensor".into(), "b".into())],
                    properties: vec![row("a", "3")],
                    ..TwinsWrite::default()
                })
                .expect("write");
        }
        let mut store = Store::open(dir.path()).expect("reopen");
        let twins = store.device_twins().expect("read");
        let mut expected = twin.clone();
        expected.properties.insert("a".into(), row("a", "3").3);
        assert_eq!(twins, [expected]);
        store
            .write_twins(&TwinsWrite {
                remove_devices: vec![("default".into(), "sensor".into())],
                ..TwinsWrite::default()
            })
            .expect("write");
        assert_eq!(store.device_twins().expect("read"), []);
    }

    #[test]
    fn tokens_survive_reopen_are_replaced_per_source_and_go_with_their_pod() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = |uid: &str, audience: &str, jwt: &str| StoredToken {
            pod_uid: uid.into(),
            namespace: "default".into(),
            pod_name: "web".into(),
            service_account: "default".into(),
            audience: audience.into(),
            expiration_seconds: 3607,
            token: jwt.into(),
            expires_at: 2_000,
            refresh_at: 1_800,
        };
        {
            let mut store = Store::open(dir.path()).expect("open");
            store.put_token(&token("u-1", "", "old")).expect("put");
            store.put_token(&token("u-1", "", "new")).expect("replace");
            store.put_token(&token("u-1", "vault", "v")).expect("put");
            store.put_token(&token("u-2", "", "other")).expect("put");
        }
        let mut store = Store::open(dir.path()).expect("reopen");
        let mut held: Vec<_> = store
            .tokens()
            .expect("tokens")
            .into_iter()
            .map(|t| (t.pod_uid, t.audience, t.token))
            .collect();
        held.sort();
        let row = |u: &str, a: &str, t: &str| (u.to_string(), a.to_string(), t.to_string());
        assert_eq!(
            held,
            [
                row("u-1", "", "new"),
                row("u-1", "vault", "v"),
                row("u-2", "", "other")
            ]
        );
        store.delete_pod_tokens(&["u-1".into()]).expect("delete");
        assert_eq!(store.tokens().expect("tokens").len(), 1);
        assert!(!format!("{:?}", token("u", "", "jwt-secret")).contains("jwt-secret"));
    }

    #[test]
    fn put_replaces_and_delete_removes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[put("Secret", "default", "s", 1, "old")])
            .expect("apply");
        store
            .apply(&[StoreOp::Put {
                key: ObjectKey::new("Secret", "default", "s"),
                uid: "recreated".into(),
                resource_version: 5,
                body: b"new".to_vec(),
            }])
            .expect("apply");
        let key = ObjectKey::new("Secret", "default", "s");
        let secret = store.get(&key).expect("get").expect("there");
        assert_eq!(
            (secret.uid.as_str(), secret.resource_version, secret.body),
            ("recreated", 5, b"new".to_vec())
        );
        store
            .apply(&[StoreOp::Delete { key: key.clone() }])
            .expect("delete");
        assert_eq!(store.get(&key).expect("get"), None);
        assert!(store.inventory().expect("inventory").is_empty());
        // Deleting what is absent is not an error.
        store.apply(&[StoreOp::Delete { key }]).expect("delete");
    }

    #[test]
    fn an_apply_that_fails_midway_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[put("ConfigMap", "default", "kept", 1, "v1")])
            .expect("apply");
        let err = store
            .apply(&[
                put("ConfigMap", "default", "kept", 2, "v2"),
                StoreOp::Delete {
                    key: ObjectKey::new("ConfigMap", "default", "kept"),
                },
                put("ConfigMap", "default", "new", 3, "x"),
                // Not representable as a SQLite integer: fails after the ops above ran.
                put("ConfigMap", "default", "huge", u64::MAX, "x"),
            ])
            .unwrap_err();
        assert!(
            matches!(err, StoreError::ResourceVersionTooLarge { .. }),
            "{err}"
        );
        let all = store.list(&[]).expect("list");
        assert_eq!(keys(&all), ["ConfigMap default/kept"]);
        assert_eq!(
            (all[0].resource_version, all[0].body.as_slice()),
            (1, &b"v1"[..])
        );
        // The connection is usable afterwards.
        store
            .apply(&[put("ConfigMap", "default", "new", 3, "x")])
            .expect("apply");
    }

    #[test]
    fn a_full_disk_is_reported_as_such_and_applies_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[put("ConfigMap", "default", "kept", 1, "v1")])
            .expect("apply");
        // SQLite answers SQLITE_FULL, as for a full file system, once the database would
        // grow past max_page_count.
        let pages: i64 = store
            .conn
            .pragma_query_value(None, "page_count", |row| row.get(0))
            .expect("page_count");
        store
            .conn
            .pragma_update_and_check(None, "max_page_count", pages, |row| row.get::<_, i64>(0))
            .expect("max_page_count");
        let big = "x".repeat(256 * 1024);
        let err = store
            .apply(&[
                put("ConfigMap", "default", "kept", 2, "v2"),
                put("ConfigMap", "default", "big", 3, &big),
            ])
            .unwrap_err();
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("disk full writing {}", dir.path().join(DB_FILE).display())
        );
        let all = store.list(&[]).expect("list");
        assert_eq!(keys(&all), ["ConfigMap default/kept"]);
        assert_eq!(all[0].body, b"v1");
    }

    #[test]
    fn a_store_from_a_newer_edgecore_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).expect("create");
            conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 7;")
                .expect("future schema");
        }
        let before = snapshot(dir.path());
        for err in [
            Store::open(dir.path()).unwrap_err(),
            Store::open_read_only(dir.path()).unwrap_err(),
        ] {
            assert!(
                matches!(err, StoreError::NewerSchema { found: 7, .. }),
                "{err}"
            );
            assert!(
                err.to_string().contains(&format!(
                    "{} was written by a newer edgecore (schema 7, this build knows up to {})",
                    dir.path().join(DB_FILE).display(),
                    MIGRATIONS.len()
                )),
                "{err}"
            );
        }
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn a_schema_1_store_is_migrated_and_keeps_its_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).expect("create");
            conn.execute_batch(MIGRATIONS[0]).expect("schema 1");
            conn.execute_batch(
                "INSERT INTO objects VALUES ('Pod', 'default', 'web', 'u1', 7, x'7b7d', 0);
                 PRAGMA user_version = 1;",
            )
            .expect("schema 1 data");
        }
        let mut store = Store::open(dir.path()).expect("open");
        assert_eq!(keys(&store.list(&[]).expect("list")), ["Pod default/web"]);
        assert_eq!(store.reports().expect("reports"), StoredReports::default());
        let object = ObjectKey::new("Pod", "default", "web").to_ref("u1");
        assert_eq!(
            store.refs("Pod").expect("refs"),
            std::slice::from_ref(&object)
        );
        let report = StoredReport {
            object: object.clone(),
            generation: 5,
            status: Some(serde_json::json!({"phase": "Running"})),
            pod_deleted: false,
            acknowledged: true,
        };
        store
            .write_reports(&ReportsWrite {
                delete: vec![],
                upsert: vec![report.clone()],
                reserved_below: 10,
            })
            .expect("write");
        // The reservation never goes back; deletes apply before upserts.
        store
            .write_reports(&ReportsWrite {
                delete: vec![object.clone()],
                upsert: vec![report.clone()],
                reserved_below: 3,
            })
            .expect("write");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.reports().expect("reports"),
            StoredReports {
                reports: vec![report],
                reserved_below: Some(10),
            }
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
        fs::write(dir.path().join(DB_FILE), &garbage).expect("write");
        let before = snapshot(dir.path());
        for err in [
            Store::open(dir.path()).unwrap_err(),
            Store::open_read_only(dir.path()).unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains(&dir.path().join(DB_FILE).display().to_string()));
            assert!(text.contains("not a database"), "{text}");
            assert!(text.contains("move it aside"), "{text}");
        }
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn a_damaged_database_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store = Store::open(dir.path()).expect("open");
            let ops: Vec<StoreOp> = (0..200)
                .map(|i| {
                    put(
                        "ConfigMap",
                        "default",
                        &format!("cm-{i}"),
                        i,
                        &"v".repeat(300),
                    )
                })
                .collect();
            store.apply(&ops).expect("apply");
        }
        // Overwrite the middle of the file (table b-tree pages) with junk, keeping the header.
        let path = dir.path().join(DB_FILE);
        let mut bytes = fs::read(&path).expect("read");
        assert!(bytes.len() > 16 * 4096, "{} bytes", bytes.len());
        bytes[8 * 4096..12 * 4096].fill(0xa5);
        fs::write(&path, &bytes).expect("write");
        // The file is in WAL mode: a read-only open may leave an empty -wal and a -shm next
        // to it, which SQLite cannot remove without write access. The database stays as it is.
        let db_file = |files: Vec<(String, usize, String)>| {
            files.into_iter().find(|(name, ..)| name == DB_FILE)
        };
        let before = db_file(snapshot(dir.path()));
        for err in [
            Store::open(dir.path()).unwrap_err(),
            Store::open_read_only(dir.path()).unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
            assert!(err.to_string().contains("move it aside"), "{err}");
        }
        assert_eq!(db_file(snapshot(dir.path())), before);
    }

    #[test]
    fn read_only_open_of_a_missing_store_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Store::open_read_only(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Missing { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&dir.path().join(DB_FILE).display().to_string()),
            "{err}"
        );
        assert!(!dir.path().join(DB_FILE).exists(), "nothing was created");
    }

    #[test]
    fn a_reader_sees_commits_while_the_daemon_holds_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .apply(&[put("Pod", "default", "a", 1, "{}")])
            .expect("apply");
        let mut reader = Store::open_read_only(dir.path()).expect("open read-only");
        assert_eq!(keys(&reader.list(&[]).expect("list")), ["Pod default/a"]);
        store
            .apply(&[put("Pod", "default", "b", 2, "{}")])
            .expect("apply");
        assert_eq!(
            keys(&reader.list(&["Pod"]).expect("list")),
            ["Pod default/a", "Pod default/b"]
        );
        let err = reader
            .apply(&[put("Pod", "default", "c", 3, "{}")])
            .unwrap_err();
        assert!(matches!(err, StoreError::Write { .. }), "{err:?}");
    }

    #[test]
    fn a_new_store_is_private_durable_and_at_the_latest_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("data")).expect("open");
        store
            .apply(&[put("Secret", "default", "s", 1, "{}")])
            .expect("apply");
        for file in [DB_FILE.to_string(), format!("{DB_FILE}-wal")] {
            let mode = fs::metadata(dir.path().join("data").join(&file))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let mode = fs::metadata(dir.path().join("data"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "data dir {mode:o}");
        let pragma = |name: &str| -> String {
            store
                .conn
                .query_row(&format!("PRAGMA {name}"), [], |row| {
                    row.get::<_, rusqlite::types::Value>(0)
                })
                .map(|v| format!("{v:?}"))
                .expect("pragma")
        };
        assert_eq!(pragma("journal_mode"), r#"Text("wal")"#);
        assert_eq!(pragma("synchronous"), "Integer(2)", "2 is FULL");
        assert_eq!(
            pragma("user_version"),
            format!("Integer({})", MIGRATIONS.len())
        );
        assert_eq!(store.path(), dir.path().join("data").join(DB_FILE));
    }
}
