//! How both daemons open SQLite: a private file, a busy timeout, WAL with
//! `synchronous=FULL` (in WAL mode every commit is fsynced, so a write reported done survives
//! a power cut), and versioned migrations counted in `PRAGMA user_version`.
//!
//! The owners of the databases (`cloudcore::registry`, `cloudcore::apiserver::store`,
//! `edgecore::store`) are the only callers; they keep their schemas, their checks and their
//! error types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::datadir;
use crate::files::FileError;

/// How long a statement waits for a lock another connection holds.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes sure the database at `path` and its `-wal`/`-shm` files are private before SQLite
/// opens them: the directory 0700, the file created 0600 (SQLite gives the `-wal` and `-shm`
/// files the database file's mode), existing files with looser modes fixed.
pub fn create_private(path: &Path) -> Result<(), FileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        datadir::ensure_private_dir(dir)?;
    }
    datadir::create_private_file(path)?;
    for companion in companions(path) {
        datadir::ensure_private_file(&companion)?;
    }
    Ok(())
}

/// The `-wal` and `-shm` files next to a database.
pub fn companions(path: &Path) -> [PathBuf; 2] {
    let with = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [with("-wal"), with("-shm")]
}

/// Opens a connection with `flags` and [`BUSY_TIMEOUT`].
pub fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// The flags of a connection that may create and write the database.
pub fn read_write() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

/// Switches to WAL with `synchronous=FULL`; returns the journal mode SQLite reports (not `wal`
/// on a file system without shared memory, for the caller to judge).
pub fn make_durable(conn: &Connection) -> rusqlite::Result<String> {
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(mode)
}

/// The schema version in `PRAGMA user_version`.
pub fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// A migration failed and was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("migration to schema {version} failed")]
pub struct MigrateError {
    /// The schema version it would have reached.
    pub version: usize,
    /// What SQLite said.
    #[source]
    pub source: rusqlite::Error,
}

/// Applies what the database lacks of `migrations` (applying `migrations[i]` takes
/// `user_version` from `i` to `i + 1`), each in one `IMMEDIATE` transaction with its version
/// bump; the version is read again under the write lock, since another process may have
/// migrated meanwhile. Returns the versions applied. Never lowers a newer version: callers
/// refuse those before calling.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<Vec<usize>, MigrateError> {
    let mut applied = Vec::new();
    for (from, sql) in migrations.iter().enumerate() {
        let version = from + 1;
        let err = |source| MigrateError { version, source };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let current: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(err)?;
        if current >= version as i64 {
            continue;
        }
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version as i64)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        applied.push(version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const MIGRATIONS: &[&str] = &["CREATE TABLE a (x);", "CREATE TABLE b (y);"];

    #[test]
    fn a_new_database_is_private_durable_and_migrated_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data/x.db");
        create_private(&path).expect("create");
        let mut conn = open(&path, read_write()).expect("open");
        assert_eq!(make_durable(&conn).expect("wal"), "wal");
        assert_eq!(migrate(&mut conn, MIGRATIONS).expect("migrate"), vec![1, 2]);
        assert_eq!(
            migrate(&mut conn, MIGRATIONS).expect("again"),
            Vec::<usize>::new()
        );
        assert_eq!(schema_version(&conn).expect("version"), 2);
        conn.execute("INSERT INTO a VALUES (1)", [])
            .expect("insert");
        for file in [
            path.clone(),
            companions(&path)[0].clone(),
            companions(&path)[1].clone(),
        ] {
            let mode = std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
        let mode = std::fs::metadata(dir.path().join("data"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_failing_migration_is_rolled_back_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        create_private(&path).expect("create");
        let mut conn = open(&path, read_write()).expect("open");
        let err = migrate(&mut conn, &["CREATE TABLE a (x);", "CREATE TABLE a (x);"]).unwrap_err();
        assert_eq!(err.version, 2);
        assert_eq!(schema_version(&conn).expect("version"), 1);
    }
}
