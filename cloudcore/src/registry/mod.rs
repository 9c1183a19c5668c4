//! cloudcore's own durable state in `DIR/cloudcore.db` (SQLite, WAL): join tokens, nodes and the
//! certificates issued to them. The CLI (`token …`, `node …`) and a running `serve` share the
//! file; `serve` notices the CLI's commits through `PRAGMA data_version`.
//!
//! Only this module touches that database. All times are milliseconds since the Unix epoch.
//!
//! With `--state=cluster` (kube mode) tokens, nodes, certificates and kubelet ports live in the
//! cluster ([`cluster`]): writes go there first and the database is this process's cache of
//! them, kept by a watch.

pub mod cluster;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::token::{BootstrapToken, hashes_match};

/// The schema migrations in order (`daemon::sqlite::migrate`); append only.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const SCHEMA_V1: &str = "
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    node TEXT,
    revoked_ms INTEGER
);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL DEFAULT '{}',
    joined_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    connected INTEGER NOT NULL DEFAULT 0,
    connected_ms INTEGER,
    last_seen_ms INTEGER,
    address TEXT
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    issued_ms INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE INDEX certificates_by_node ON certificates(node);
CREATE TABLE server (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    heartbeat_ms INTEGER NOT NULL,
    cloud_address TEXT
);
";

/// Version 2: the API store this cloud serves (identity and the highest revision seen, the
/// high-water mark that `serve` and `store restore` check), and operators' adoptions of a new
/// store per node (`cloudcore store adopt`), taken by the node's next session.
const SCHEMA_V2: &str = "
CREATE TABLE cloud_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE adoptions (
    node TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL
);
";

/// Version 3: each node's kubelet port (kube mode's kubelet endpoint, `cloudcore::kubelet`),
/// one per node, unique; NULL until assigned and again once the node is revoked.
const SCHEMA_V3: &str = "
ALTER TABLE nodes ADD COLUMN kubelet_port INTEGER;
CREATE UNIQUE INDEX nodes_by_kubelet_port ON nodes(kubelet_port) WHERE kubelet_port IS NOT NULL;
";

/// The API store this cloud last served, from `cloudcore.db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedState {
    /// The store's identity (the `kube-system` Namespace's uid).
    pub state_id: String,
    /// The highest revision seen while serving it.
    pub revision: u64,
}

/// A registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot open registry database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "registry database {path} has schema version {found}, newer than this cloudcore supports ({SCHEMA_VERSION}); refusing to touch it"
    )]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("registry database query failed")]
    Sql(#[from] rusqlite::Error),
    #[error("the registry in the cluster failed")]
    Cluster(#[from] cluster::ClusterError),
}

/// Why a join was refused by the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("token {id} does not exist")]
    TokenUnknown { id: String },
    #[error("token {id}: secret does not match")]
    SecretMismatch { id: String },
    #[error("token {id} expired {ago} ago")]
    Expired { id: String, ago: String },
    #[error("token {id} has no uses left")]
    UsedUp { id: String },
    #[error("token {id} was revoked")]
    Revoked { id: String },
    #[error("token {id} is bound to node {bound:?}, not {requested:?}")]
    NodeMismatch {
        id: String,
        bound: String,
        requested: String,
    },
    #[error(
        "node name {name:?} belongs to a live node; revoke it first or use a token bound to that name"
    )]
    NameTaken { name: String },
    #[error(
        "no kubelet port left for node {name:?}: every port of --kubelet-ports {first}-{last} belongs to a node; widen the range or revoke nodes that are gone"
    )]
    NoKubeletPort { name: String, first: u16, last: u16 },
}

/// Why a renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewalRefusal {
    #[error("the presented certificate or its node was revoked")]
    Revoked,
    #[error("the presented certificate is unknown to this cloudcore")]
    UnknownCertificate,
    #[error("the presented certificate is less than half-way through its lifetime; renew after {}", humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis((*.not_before_ms).max(0) as u64)))]
    TooEarly { not_before_ms: i64 },
}

/// A token's stored columns: secret hash, expiry, uses left, node binding, revocation time.
type TokenRow = (String, i64, i64, Option<String>, Option<i64>);

/// A token being created.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: BootstrapToken,
    pub ttl: Duration,
    pub uses: u32,
    pub node: Option<String>,
}

/// A token as `token list` shows it: never the secret.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub uses_left: i64,
    pub node: Option<String>,
    pub revoked: bool,
}

/// A node as `node list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub joined_ms: i64,
    pub revoked: bool,
    /// Connected to a `serve` whose heartbeat is fresh.
    pub connected: bool,
    pub connected_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub address: Option<String>,
    /// Expiry of the newest unrevoked certificate.
    pub cert_not_after_ms: Option<i64>,
    /// Kube mode's kubelet endpoint port of the node, once assigned.
    pub kubelet_port: Option<u16>,
}

/// Whether a presented certificate may open a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    Valid,
    Revoked,
    /// Signed by our CA but not in the registry (e.g. the database was replaced).
    Unknown,
}

/// What a successful join recorded.
#[derive(Debug, Clone)]
pub struct Admission {
    pub token_id: String,
    pub uses_left: i64,
}

/// The registry handle. One connection behind a mutex: writes are rare and short.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// `--kubelet-ports` when this `serve` runs the kubelet endpoint (kube mode): a join then
    /// takes a port in the same transaction, or is refused when none is left.
    kubelet_ports: std::sync::OnceLock<KubeletPortRange>,
    /// `--state=cluster`: where tokens, nodes and certificates really live; the database is
    /// then their cache.
    cluster: OnceLock<Arc<cluster::ClusterState>>,
}

/// The inclusive range of kubelet ports (`--kubelet-ports START-END`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeletPortRange {
    pub first: u16,
    pub last: u16,
}

/// The outcome of [`Registry::assign_kubelet_ports`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeletPorts {
    /// Every non-revoked node and its port, by name.
    pub assigned: Vec<(String, u16)>,
    /// Non-revoked nodes that got none because the range is full.
    pub unassigned: Vec<String>,
}

/// The lowest port of `range` not in `taken`.
fn free_port(range: KubeletPortRange, taken: &HashSet<u16>) -> Option<u16> {
    (range.first..=range.last).find(|p| !taken.contains(p))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Registry {
    /// Opens (creating and migrating if needed) `DIR/cloudcore.db`.
    pub fn open(data_dir: &Path) -> Result<Self, RegistryError> {
        let path = data_dir.join("cloudcore.db");
        let open_err = |source| RegistryError::Open {
            path: path.clone(),
            source,
        };
        daemon::sqlite::create_private(&path).map_err(|e| {
            open_err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(daemon::error_chain(&e)),
            ))
        })?;
        let mut conn =
            daemon::sqlite::open(&path, daemon::sqlite::read_write()).map_err(open_err)?;
        // FULL: a join or revocation that was reported done survives a power cut.
        daemon::sqlite::make_durable(&conn).map_err(open_err)?;
        conn.execute_batch("PRAGMA foreign_keys = ON;")
            .map_err(open_err)?;
        let version = daemon::sqlite::schema_version(&conn).map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(RegistryError::NewerSchema {
                path,
                found: version,
            });
        }
        daemon::sqlite::migrate(&mut conn, MIGRATIONS).map_err(|e| RegistryError::Sql(e.source))?;
        Ok(Registry {
            path,
            conn: Mutex::new(conn),
            kubelet_ports: std::sync::OnceLock::new(),
            cluster: OnceLock::new(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes whenever another connection (another process) commits.
    pub fn data_version(&self) -> Result<i64, RegistryError> {
        Ok(self
            .conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Keeps the shared state in the cluster from now on (`--state=cluster`), after filling
    /// the cache from it. Set once, before edges are accepted.
    pub async fn attach_cluster(
        &self,
        state: Arc<cluster::ClusterState>,
    ) -> Result<(), RegistryError> {
        state.load_into(self).await?;
        let _ = self.cluster.set(state);
        Ok(())
    }

    /// The cluster side, in `--state=cluster`.
    pub fn cluster(&self) -> Option<&Arc<cluster::ClusterState>> {
        self.cluster.get()
    }

    pub fn create_token(&self, new: &NewToken) -> Result<TokenRecord, RegistryError> {
        if let Some(c) = self.cluster.get() {
            let record = c.create_token(new)?;
            self.cache_token(&cluster::TokenDoc {
                id: record.id.clone(),
                secret_hash: new.token.secret_hash(),
                created_ms: record.created_ms,
                expires_ms: record.expires_ms,
                uses_left: record.uses_left,
                node: record.node.clone(),
                revoked_ms: None,
            })?;
            return Ok(record);
        }
        let now = now_ms();
        let expires = now + new.ttl.as_millis() as i64;
        self.conn().execute(
            "INSERT INTO tokens (id, secret_hash, created_ms, expires_ms, uses_left, node) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![new.token.id, new.token.secret_hash(), now, expires, new.uses, new.node],
        )?;
        Ok(TokenRecord {
            id: new.token.id.clone(),
            created_ms: now,
            expires_ms: expires,
            uses_left: new.uses.into(),
            node: new.node.clone(),
            revoked: false,
        })
    }

    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, created_ms, expires_ms, uses_left, node, revoked_ms FROM tokens ORDER BY created_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenRecord {
                id: r.get(0)?,
                created_ms: r.get(1)?,
                expires_ms: r.get(2)?,
                uses_left: r.get(3)?,
                node: r.get(4)?,
                revoked: r.get::<_, Option<i64>>(5)?.is_some(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes a token; `false` if there is no such token.
    pub fn revoke_token(&self, id: &str) -> Result<bool, RegistryError> {
        if let Some(c) = self.cluster.get() {
            return c.revoke_token(self, id);
        }
        let n = self.conn().execute(
            "UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, now_ms()],
        )?;
        if n == 0 {
            let exists: Option<i64> = self
                .conn()
                .query_row("SELECT 1 FROM tokens WHERE id = ?1", [id], |r| r.get(0))
                .optional()?;
            return Ok(exists.is_some());
        }
        Ok(true)
    }

    /// Checks the token and the node name, consumes one use, calls `sign` for the certificate
    /// and records node and certificate — all in one transaction, so a failed signature consumes
    /// nothing and two racing joins cannot both take the last use.
    pub fn admit_join<E>(
        &self,
        token: &BootstrapToken,
        node_name: &str,
        labels: &BTreeMap<String, String>,
        sign: impl FnOnce() -> Result<crate::pki::IssuedCertificate, E>,
    ) -> Result<Result<(Admission, crate::pki::IssuedCertificate), JoinRefusal>, AdmitError<E>>
    {
        if let Some(c) = self.cluster.get() {
            return c.admit_join(self, token, node_name, labels, sign);
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(AdmitError::Registry)?;
        let now = now_ms();
        let row: Option<TokenRow> = tx
            .query_row(
                "SELECT secret_hash, expires_ms, uses_left, node, revoked_ms FROM tokens WHERE id = ?1",
                [&token.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(AdmitError::Registry)?;
        let id = token.id.clone();
        let Some((hash, expires_ms, uses_left, bound, revoked_ms)) = row else {
            return Ok(Err(JoinRefusal::TokenUnknown { id }));
        };
        if !hashes_match(&hash, &token.secret_hash()) {
            return Ok(Err(JoinRefusal::SecretMismatch { id }));
        }
        if revoked_ms.is_some() {
            return Ok(Err(JoinRefusal::Revoked { id }));
        }
        if expires_ms <= now {
            let ago =
                humantime::format_duration(Duration::from_secs(((now - expires_ms) / 1000) as u64));
            return Ok(Err(JoinRefusal::Expired {
                id,
                ago: ago.to_string(),
            }));
        }
        if uses_left <= 0 {
            return Ok(Err(JoinRefusal::UsedUp { id }));
        }
        if let Some(bound) = &bound
            && bound != node_name
        {
            return Ok(Err(JoinRefusal::NodeMismatch {
                id,
                bound: bound.clone(),
                requested: node_name.to_string(),
            }));
        }
        if bound.is_none() {
            // A live node holds an unrevoked, unexpired certificate.
            let live: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM nodes n JOIN certificates c ON c.node = n.name
                     WHERE n.name = ?1 AND n.revoked_ms IS NULL AND c.revoked_ms IS NULL AND c.not_after_ms > ?2 LIMIT 1",
                    params![node_name, now],
                    |r| r.get(0),
                )
                .optional()
                .map_err(AdmitError::Registry)?;
            if live.is_some() {
                return Ok(Err(JoinRefusal::NameTaken {
                    name: node_name.to_string(),
                }));
            }
        }
        let kubelet_port = match self.kubelet_ports.get() {
            Some(range) => {
                match kubelet_port_for(&tx, node_name, *range).map_err(AdmitError::Registry)? {
                    Some(port) => Some(port),
                    None => {
                        return Ok(Err(JoinRefusal::NoKubeletPort {
                            name: node_name.to_string(),
                            first: range.first,
                            last: range.last,
                        }));
                    }
                }
            }
            None => None,
        };
        let issued = sign().map_err(AdmitError::Sign)?;
        let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        tx.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1",
            [&token.id],
        )
        .map_err(AdmitError::Registry)?;
        tx.execute(
            "INSERT INTO nodes (name, labels, joined_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, joined_ms = excluded.joined_ms, revoked_ms = NULL",
            params![node_name, labels_json, now],
        )
        .map_err(AdmitError::Registry)?;
        if let Some(port) = kubelet_port {
            tx.execute(
                "UPDATE nodes SET kubelet_port = ?2 WHERE name = ?1",
                params![node_name, port],
            )
            .map_err(AdmitError::Registry)?;
        }
        // A join replaces the node's identity: certificates issued to the name before (possible
        // only with a token bound to it) stop working, so a re-joined gateway and an old copy
        // of its key cannot both hold the name.
        tx.execute(
            "UPDATE certificates SET revoked_ms = ?2 WHERE node = ?1 AND revoked_ms IS NULL",
            params![node_name, now],
        )
        .map_err(AdmitError::Registry)?;
        tx.execute(
            "INSERT INTO certificates (serial, node, issued_ms, not_after_ms) VALUES (?1, ?2, ?3, ?4)",
            params![issued.serial, node_name, now, to_ms(issued.not_after)],
        )
        .map_err(AdmitError::Registry)?;
        tx.commit().map_err(AdmitError::Registry)?;
        Ok(Ok((
            Admission {
                token_id: token.id.clone(),
                uses_left: uses_left - 1,
            },
            issued,
        )))
    }

    /// Records a certificate renewed by the holder of `presented_serial`, in one transaction
    /// with the checks that make renewal safe: the presented certificate and its node must not
    /// be revoked (so a renewal racing a revocation cannot outlive it), and the presented
    /// certificate must be past half of its lifetime (so a stolen key cannot mint certificates
    /// in a loop). `sign` runs only when the checks pass.
    pub fn renew_certificate<E>(
        &self,
        node: &str,
        presented_serial: &str,
        sign: impl FnOnce() -> Result<crate::pki::IssuedCertificate, E>,
    ) -> Result<Result<crate::pki::IssuedCertificate, RenewalRefusal>, AdmitError<E>> {
        if let Some(c) = self.cluster.get() {
            return c.renew_certificate(self, node, presented_serial, sign);
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(AdmitError::Registry)?;
        let row: Option<(i64, i64, Option<i64>, Option<i64>)> = tx
            .query_row(
                "SELECT c.issued_ms, c.not_after_ms, c.revoked_ms, n.revoked_ms
                 FROM certificates c JOIN nodes n ON n.name = c.node WHERE c.serial = ?1 AND c.node = ?2",
                params![presented_serial, node],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(AdmitError::Registry)?;
        let Some((issued_ms, not_after_ms, cert_revoked, node_revoked)) = row else {
            return Ok(Err(RenewalRefusal::UnknownCertificate));
        };
        if cert_revoked.is_some() || node_revoked.is_some() {
            return Ok(Err(RenewalRefusal::Revoked));
        }
        let now = now_ms();
        let halfway = issued_ms + (not_after_ms - issued_ms) / 2;
        if now < halfway {
            return Ok(Err(RenewalRefusal::TooEarly {
                not_before_ms: halfway,
            }));
        }
        let issued = sign().map_err(AdmitError::Sign)?;
        tx.execute(
            "INSERT INTO certificates (serial, node, issued_ms, not_after_ms) VALUES (?1, ?2, ?3, ?4)",
            params![issued.serial, node, now, to_ms(issued.not_after)],
        )
        .map_err(AdmitError::Registry)?;
        tx.commit().map_err(AdmitError::Registry)?;
        Ok(Ok(issued))
    }

    /// Revokes a node and every certificate issued to it so far; `false` if unknown.
    pub fn revoke_node(&self, name: &str) -> Result<bool, RegistryError> {
        if let Some(c) = self.cluster.get() {
            return c.revoke_node(self, name);
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let n = tx.execute(
            "UPDATE nodes SET revoked_ms = COALESCE(revoked_ms, ?2), kubelet_port = NULL WHERE name = ?1",
            params![name, now],
        )?;
        tx.execute(
            "UPDATE certificates SET revoked_ms = ?2 WHERE node = ?1 AND revoked_ms IS NULL",
            params![name, now],
        )?;
        tx.commit()?;
        Ok(n > 0)
    }

    pub fn certificate_status(&self, serial: &str) -> Result<CertificateStatus, RegistryError> {
        let row: Option<Option<i64>> = self
            .conn()
            .query_row(
                "SELECT revoked_ms FROM certificates WHERE serial = ?1",
                [serial],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match row {
            None => CertificateStatus::Unknown,
            Some(Some(_)) => CertificateStatus::Revoked,
            Some(None) => CertificateStatus::Valid,
        })
    }

    /// Serials of all revoked certificates.
    pub fn revoked_serials(&self) -> Result<HashSet<String>, RegistryError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT serial FROM certificates WHERE revoked_ms IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The labels a node was joined with.
    pub fn node_labels(&self, name: &str) -> Result<BTreeMap<String, String>, RegistryError> {
        let labels: Option<String> = self
            .conn()
            .query_row("SELECT labels FROM nodes WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(labels
            .and_then(|l| serde_json::from_str(&l).ok())
            .unwrap_or_default())
    }

    /// Marks a session start. Returns whether the node had connected before (a reconnect).
    pub fn mark_connected(&self, name: &str, address: &str) -> Result<bool, RegistryError> {
        let now = now_ms();
        let conn = self.conn();
        let before: Option<Option<i64>> = conn
            .query_row(
                "SELECT connected_ms FROM nodes WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        without_fsync(&conn, |conn| {
            conn.execute(
                "UPDATE nodes SET connected = 1, connected_ms = ?2, last_seen_ms = ?2, address = ?3 WHERE name = ?1",
                params![name, now, address],
            )
        })?;
        Ok(matches!(before, Some(Some(_))))
    }

    pub fn mark_disconnected(&self, name: &str) -> Result<(), RegistryError> {
        let conn = self.conn();
        without_fsync(&conn, |conn| {
            conn.execute(
                "UPDATE nodes SET connected = 0, last_seen_ms = ?2 WHERE name = ?1",
                params![name, now_ms()],
            )
        })?;
        Ok(())
    }

    /// `serve` start: nobody is connected yet; record where edges should dial.
    pub fn server_started(&self, cloud_address: &str) -> Result<(), RegistryError> {
        let conn = self.conn();
        conn.execute("UPDATE nodes SET connected = 0", [])?;
        conn.execute(
            "INSERT INTO server (id, heartbeat_ms, cloud_address) VALUES (1, ?1, ?2)
             ON CONFLICT(id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms, cloud_address = excluded.cloud_address",
            params![now_ms(), cloud_address],
        )?;
        Ok(())
    }

    /// `serve` is alive; the given nodes were seen now. One transaction for all of them.
    pub fn server_heartbeat(&self, seen: &[String]) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        tx.execute("UPDATE server SET heartbeat_ms = ?1 WHERE id = 1", [now])?;
        {
            let mut stmt = tx.prepare("UPDATE nodes SET last_seen_ms = ?2 WHERE name = ?1")?;
            for name in seen {
                stmt.execute(params![name, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// `serve` stopped cleanly: nobody is connected.
    pub fn server_stopped(&self) -> Result<(), RegistryError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE nodes SET connected = 0, last_seen_ms = ?1 WHERE connected = 1",
            [now_ms()],
        )?;
        conn.execute("UPDATE server SET heartbeat_ms = 0 WHERE id = 1", [])?;
        Ok(())
    }

    /// The address `serve` advertised last, for join commands printed by `token create`.
    pub fn cloud_address(&self) -> Result<Option<String>, RegistryError> {
        if let Some(c) = self.cluster.get() {
            return Ok(c.cloud_address()?);
        }
        Ok(self
            .conn()
            .query_row("SELECT cloud_address FROM server WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?
            .flatten())
    }

    /// Whether a `serve` recorded a heartbeat within `stale_after` (it is running).
    pub fn serve_alive(&self, stale_after: Duration) -> Result<bool, RegistryError> {
        let heartbeat: i64 = self
            .conn()
            .query_row("SELECT heartbeat_ms FROM server WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        Ok(now_ms() - heartbeat < stale_after.as_millis() as i64)
    }

    /// How many nodes ever joined (revoked ones included) and certificates were issued.
    pub fn known_nodes(&self) -> Result<(u64, u64), RegistryError> {
        let conn = self.conn();
        let nodes: i64 = conn.query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0))?;
        let certificates: i64 =
            conn.query_row("SELECT COUNT(*) FROM certificates", [], |r| r.get(0))?;
        Ok((nodes.max(0) as u64, certificates.max(0) as u64))
    }

    /// The API store this cloud last served, if any was recorded.
    pub fn served_state(&self) -> Result<Option<ServedState>, RegistryError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT state_id, revision FROM cloud_state WHERE id = 1",
                [],
                |r| {
                    Ok(ServedState {
                        state_id: r.get(0)?,
                        revision: r.get::<_, i64>(1)?.max(0) as u64,
                    })
                },
            )
            .optional()?)
    }

    /// Records the store being served and a revision it reached. For the same store the
    /// high-water mark only rises; another store replaces the record.
    pub fn record_served_state(&self, state_id: &str, revision: u64) -> Result<(), RegistryError> {
        let revision = i64::try_from(revision).unwrap_or(i64::MAX);
        self.conn().execute(
            "INSERT INTO cloud_state (id, state_id, revision, updated_ms) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET
                revision = CASE WHEN state_id = excluded.state_id
                                THEN MAX(revision, excluded.revision) ELSE excluded.revision END,
                state_id = excluded.state_id,
                updated_ms = excluded.updated_ms",
            params![state_id, revision, now_ms()],
        )?;
        Ok(())
    }

    /// Records `state_id` at `revision` whatever was recorded before: the operator accepted
    /// another or an older store (`serve --allow-new-store`).
    pub fn replace_served_state(&self, state_id: &str, revision: u64) -> Result<(), RegistryError> {
        let revision = i64::try_from(revision).unwrap_or(i64::MAX);
        self.conn().execute(
            "INSERT INTO cloud_state (id, state_id, revision, updated_ms) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET state_id = excluded.state_id,
                revision = excluded.revision, updated_ms = excluded.updated_ms",
            params![state_id, revision, now_ms()],
        )?;
        Ok(())
    }

    /// Records an operator's decision that `nodes` (all known nodes when `None`) accept the
    /// cloud's current store at their next session. Returns the nodes adopted; a name the
    /// registry does not know is refused as `Ok(Err(name))`.
    pub fn adopt(
        &self,
        nodes: Option<&[String]>,
    ) -> Result<Result<Vec<String>, String>, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let known: Vec<String> = {
            let mut stmt =
                tx.prepare("SELECT name FROM nodes WHERE revoked_ms IS NULL ORDER BY name")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let chosen = match nodes {
            None => known,
            Some(names) => {
                if let Some(unknown) = names.iter().find(|n| !known.contains(n)) {
                    return Ok(Err(unknown.clone()));
                }
                names.to_vec()
            }
        };
        let now = now_ms();
        for name in &chosen {
            tx.execute(
                "INSERT INTO adoptions (node, created_ms) VALUES (?1, ?2)
                 ON CONFLICT(node) DO UPDATE SET created_ms = excluded.created_ms",
                params![name, now],
            )?;
        }
        tx.commit()?;
        Ok(Ok(chosen))
    }

    /// Takes the node's pending adoption, if any: true once, then it is gone.
    pub fn take_adoption(&self, node: &str) -> Result<bool, RegistryError> {
        Ok(self
            .conn()
            .execute("DELETE FROM adoptions WHERE node = ?1", [node])?
            > 0)
    }

    /// Nodes with an adoption not yet taken.
    pub fn pending_adoptions(&self) -> Result<Vec<String>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node FROM adoptions ORDER BY node")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes a consistent copy of the database to `dest` (`VACUUM INTO`), safe while `serve`
    /// runs. `dest` must not exist.
    pub fn backup_to(&self, dest: &Path) -> Result<(), RegistryError> {
        let dest = dest
            .to_str()
            .ok_or_else(|| RegistryError::Sql(rusqlite::Error::InvalidPath(dest.to_path_buf())))?;
        self.conn().execute("VACUUM INTO ?1", [dest])?;
        Ok(())
    }

    /// Makes joins take a kubelet port from `range` (kube mode's kubelet endpoint); set once
    /// at start, before edges are accepted.
    pub fn use_kubelet_ports(&self, range: KubeletPortRange) {
        let _ = self.kubelet_ports.set(range);
    }

    /// When the node was last seen connected (its last session's end, or its start while
    /// connected), if ever.
    pub fn node_last_seen(&self, name: &str) -> Result<Option<i64>, RegistryError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT last_seen_ms FROM nodes WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    /// Changes whenever a node joins, is revoked or gets another kubelet port (a cheap read the
    /// kubelet endpoint polls; `data_version` misses this connection's own commits).
    pub fn kubelet_fingerprint(&self) -> Result<(i64, i64, i64, i64), RegistryError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*), COALESCE(SUM(joined_ms), 0), COALESCE(SUM(kubelet_port), 0),
                    COALESCE(SUM(revoked_ms IS NULL), 0) FROM nodes",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?)
    }

    /// Gives every non-revoked node a kubelet port in `range`: a node keeps the one it has
    /// when it is inside the range, others (joined before, or the range changed) get the
    /// lowest free one, and revoked nodes hold none. One transaction.
    pub fn assign_kubelet_ports(
        &self,
        range: KubeletPortRange,
    ) -> Result<KubeletPorts, RegistryError> {
        if let Some(c) = self.cluster.get() {
            return c.assign_kubelet_ports(self, range);
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE nodes SET kubelet_port = NULL WHERE revoked_ms IS NOT NULL OR kubelet_port < ?1 OR kubelet_port > ?2",
            params![range.first, range.last],
        )?;
        let nodes: Vec<(String, Option<u16>)> = {
            let mut stmt = tx.prepare(
                "SELECT name, kubelet_port FROM nodes WHERE revoked_ms IS NULL ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut taken: HashSet<u16> = nodes.iter().filter_map(|(_, p)| *p).collect();
        let mut ports = KubeletPorts::default();
        for (name, port) in nodes {
            let port = match port {
                Some(p) => p,
                None => match free_port(range, &taken) {
                    Some(p) => {
                        tx.execute(
                            "UPDATE nodes SET kubelet_port = ?2 WHERE name = ?1",
                            params![name, p],
                        )?;
                        taken.insert(p);
                        p
                    }
                    None => {
                        ports.unassigned.push(name);
                        continue;
                    }
                },
            };
            ports.assigned.push((name, port));
        }
        tx.commit()?;
        Ok(ports)
    }

    /// All nodes. `connected` is true only while a `serve` heartbeat younger than `stale_after`
    /// vouches for it.
    pub fn list_nodes(&self, stale_after: Duration) -> Result<Vec<NodeRecord>, RegistryError> {
        let conn = self.conn();
        let now = now_ms();
        let heartbeat: i64 = conn
            .query_row("SELECT heartbeat_ms FROM server WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        let serve_alive = now - heartbeat < stale_after.as_millis() as i64;
        let mut stmt = conn.prepare(
            "SELECT n.name, n.labels, n.joined_ms, n.revoked_ms, n.connected, n.connected_ms, n.last_seen_ms, n.address,
                    (SELECT MAX(c.not_after_ms) FROM certificates c WHERE c.node = n.name AND c.revoked_ms IS NULL),
                    n.kubelet_port
             FROM nodes n ORDER BY n.name",
        )?;
        let rows = stmt.query_map([], |r| {
            let labels: String = r.get(1)?;
            Ok(NodeRecord {
                name: r.get(0)?,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                joined_ms: r.get(2)?,
                revoked: r.get::<_, Option<i64>>(3)?.is_some(),
                connected: serve_alive && r.get::<_, i64>(4)? == 1,
                connected_ms: r.get(5)?,
                last_seen_ms: r.get(6)?,
                address: r.get(7)?,
                cert_not_after_ms: r.get(8)?,
                kubelet_port: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The cache of `--state=cluster`: the cluster's records written into the database.
impl Registry {
    /// Stores a token record as the cluster holds it.
    pub(crate) fn cache_token(&self, t: &cluster::TokenDoc) -> Result<(), RegistryError> {
        self.conn().execute(
            "INSERT INTO tokens (id, secret_hash, created_ms, expires_ms, uses_left, node, revoked_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(id) DO UPDATE SET secret_hash = excluded.secret_hash,
                created_ms = excluded.created_ms, expires_ms = excluded.expires_ms,
                uses_left = excluded.uses_left, node = excluded.node, revoked_ms = excluded.revoked_ms",
            params![t.id, t.secret_hash, t.created_ms, t.expires_ms, t.uses_left, t.node, t.revoked_ms],
        )?;
        Ok(())
    }

    /// Stores a node record and its certificates as the cluster holds them; this process's
    /// connection marks are kept.
    pub(crate) fn cache_node(&self, n: &cluster::NodeDoc) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(port) = n.kubelet_port {
            // The port moved to this node; the record that gave it up may not have arrived.
            tx.execute(
                "UPDATE nodes SET kubelet_port = NULL WHERE kubelet_port = ?1 AND name != ?2",
                params![port, n.name],
            )?;
        }
        let labels = serde_json::to_string(&n.labels).unwrap_or_else(|_| "{}".into());
        tx.execute(
            "INSERT INTO nodes (name, labels, joined_ms, revoked_ms, kubelet_port) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, joined_ms = excluded.joined_ms,
                revoked_ms = excluded.revoked_ms, kubelet_port = excluded.kubelet_port",
            params![n.name, labels, n.joined_ms, n.revoked_ms, n.kubelet_port],
        )?;
        for c in &n.certificates {
            tx.execute(
                "INSERT INTO certificates (serial, node, issued_ms, not_after_ms, revoked_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(serial) DO UPDATE SET node = excluded.node, issued_ms = excluded.issued_ms,
                    not_after_ms = excluded.not_after_ms, revoked_ms = excluded.revoked_ms",
                params![c.serial, n.name, c.issued_ms, c.not_after_ms, c.revoked_ms],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn cache_forget_token(&self, id: &str) -> Result<(), RegistryError> {
        self.conn()
            .execute("DELETE FROM tokens WHERE id = ?1", [id])?;
        Ok(())
    }

    pub(crate) fn cache_forget_node(&self, name: &str) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM certificates WHERE node = ?1", [name])?;
        tx.execute("DELETE FROM nodes WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    /// Drops every cached token and node the cluster no longer has.
    pub(crate) fn cache_retain(
        &self,
        tokens: &HashSet<String>,
        nodes: &HashSet<String>,
    ) -> Result<(), RegistryError> {
        let (cached_tokens, cached_nodes): (Vec<String>, Vec<String>) = {
            let conn = self.conn();
            let t = conn
                .prepare("SELECT id FROM tokens")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let n = conn
                .prepare("SELECT name FROM nodes")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            (t, n)
        };
        for id in cached_tokens.iter().filter(|t| !tokens.contains(*t)) {
            self.cache_forget_token(id)?;
        }
        for name in cached_nodes.iter().filter(|n| !nodes.contains(*n)) {
            self.cache_forget_node(name)?;
        }
        Ok(())
    }

    /// Kubelet ports held by nodes other than `node`.
    pub(crate) fn cached_kubelet_ports(&self, node: &str) -> Result<HashSet<u16>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT kubelet_port FROM nodes WHERE kubelet_port IS NOT NULL AND name != ?1",
        )?;
        let ports = stmt
            .query_map([node], |r| r.get(0))?
            .collect::<Result<HashSet<u16>, _>>()?;
        Ok(ports)
    }

    /// Every non-revoked node and its port, if any.
    pub(crate) fn cached_live_node_ports(
        &self,
    ) -> Result<Vec<(String, Option<u16>)>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, kubelet_port FROM nodes WHERE revoked_ms IS NULL ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The assignment the cache holds, written nowhere.
    pub(crate) fn cached_assignment(&self) -> Result<KubeletPorts, RegistryError> {
        let mut ports = KubeletPorts::default();
        for (name, port) in self.cached_live_node_ports()? {
            match port {
                Some(p) => ports.assigned.push((name, p)),
                None => ports.unassigned.push(name),
            }
        }
        Ok(ports)
    }
}

/// `admit_join` failed for a reason other than a refusal.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError<E> {
    #[error("registry database query failed")]
    Registry(#[source] rusqlite::Error),
    #[error("the registry in the cluster failed")]
    Cluster(#[source] cluster::ClusterError),
    #[error("signing the node certificate failed")]
    Sign(#[source] E),
}

/// The node's kubelet port if it has one in `range`, else the lowest free one (`None` when the
/// range is full); nothing is written.
fn kubelet_port_for(
    tx: &rusqlite::Transaction<'_>,
    node: &str,
    range: KubeletPortRange,
) -> Result<Option<u16>, rusqlite::Error> {
    let own: Option<Option<u16>> = tx
        .query_row(
            "SELECT kubelet_port FROM nodes WHERE name = ?1",
            [node],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(Some(port)) = own
        && (range.first..=range.last).contains(&port)
    {
        return Ok(Some(port));
    }
    let mut stmt =
        tx.prepare("SELECT kubelet_port FROM nodes WHERE kubelet_port IS NOT NULL AND name != ?1")?;
    let taken = stmt
        .query_map([node], |r| r.get(0))?
        .collect::<Result<HashSet<u16>, _>>()?;
    Ok(free_port(range, &taken))
}

fn to_ms(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Runs `f` with its commit not fsynced (WAL `synchronous=NORMAL`; the next fsynced commit
/// makes it durable too), then restores `FULL`. Only for connection marks: every `serve` start
/// resets them (`server_started`), so a power loss that loses the newest costs nothing, and a
/// reconnect storm's 10,000 marks no longer wait for an fsync each on the registry's one
/// connection, which the handshakes' certificate checks share.
fn without_fsync<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> Result<T, RegistryError> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let result = f(conn);
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::IssuedCertificate;

    fn issued(serial: &str) -> IssuedCertificate {
        IssuedCertificate {
            der: vec![],
            serial: serial.into(),
            not_after: time::OffsetDateTime::now_utc() + Duration::from_secs(3600),
        }
    }

    fn token(reg: &Registry, ttl: Duration, uses: u32, node: Option<&str>) -> BootstrapToken {
        let token = BootstrapToken::generate();
        reg.create_token(&NewToken {
            token: token.clone(),
            ttl,
            uses,
            node: node.map(String::from),
        })
        .expect("create token");
        token
    }

    fn join(
        reg: &Registry,
        token: &BootstrapToken,
        node: &str,
        serial: &str,
    ) -> Result<Admission, JoinRefusal> {
        reg.admit_join(token, node, &BTreeMap::new(), || {
            Ok::<_, std::convert::Infallible>(issued(serial))
        })
        .expect("no db error")
        .map(|(a, _)| a)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn token_uses_are_consumed_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        let t = token(&reg, HOUR, 2, None);
        assert_eq!(join(&reg, &t, "a", "01").expect("first").uses_left, 1);
        assert_eq!(join(&reg, &t, "b", "02").expect("second").uses_left, 0);
        assert!(matches!(
            join(&reg, &t, "c", "03"),
            Err(JoinRefusal::UsedUp { .. })
        ));
    }

    #[test]
    fn each_refusal_has_its_own_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        let expired = token(&reg, Duration::ZERO, 1, None);
        assert!(matches!(
            join(&reg, &expired, "a", "01"),
            Err(JoinRefusal::Expired { .. })
        ));

        let revoked = token(&reg, HOUR, 1, None);
        assert!(reg.revoke_token(&revoked.id).expect("revoke"));
        assert!(matches!(
            join(&reg, &revoked, "a", "01"),
            Err(JoinRefusal::Revoked { .. })
        ));

        let bound = token(&reg, HOUR, 1, Some("gw-1"));
        assert!(matches!(
            join(&reg, &bound, "gw-2", "01"),
            Err(JoinRefusal::NodeMismatch { .. })
        ));

        let good = token(&reg, HOUR, 1, None);
        let wrong = BootstrapToken::parse(&format!("{}.0000000000000000", good.id)).expect("shape");
        assert!(matches!(
            join(&reg, &wrong, "a", "01"),
            Err(JoinRefusal::SecretMismatch { .. })
        ));

        let unknown = BootstrapToken::parse("zzzzzz.0000000000000000").expect("shape");
        assert!(matches!(
            join(&reg, &unknown, "a", "01"),
            Err(JoinRefusal::TokenUnknown { .. })
        ));

        // None of the refusals consumed the good token or recorded a node.
        assert_eq!(join(&reg, &good, "a", "01").expect("join").uses_left, 0);
        assert_eq!(reg.list_nodes(HOUR).expect("list").len(), 1);
    }

    #[test]
    fn live_name_is_taken_unless_token_is_bound_or_node_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        join(&reg, &token(&reg, HOUR, 1, None), "gw-1", "01").expect("first join");
        assert!(matches!(
            join(&reg, &token(&reg, HOUR, 1, None), "gw-1", "02"),
            Err(JoinRefusal::NameTaken { .. })
        ));
        join(&reg, &token(&reg, HOUR, 1, Some("gw-1")), "gw-1", "03")
            .expect("bound token may re-join");
        assert!(reg.revoke_node("gw-1").expect("revoke"));
        assert_eq!(
            reg.certificate_status("01").expect("status"),
            CertificateStatus::Revoked
        );
        assert_eq!(
            reg.certificate_status("03").expect("status"),
            CertificateStatus::Revoked
        );
        join(&reg, &token(&reg, HOUR, 1, None), "gw-1", "04").expect("revoked name is free");
        assert_eq!(
            reg.certificate_status("04").expect("status"),
            CertificateStatus::Valid
        );
        assert_eq!(
            reg.certificate_status("ff").expect("status"),
            CertificateStatus::Unknown
        );
    }

    #[test]
    fn failed_signing_consumes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        let t = token(&reg, HOUR, 1, None);
        let result = reg.admit_join(&t, "a", &BTreeMap::new(), || {
            Err::<IssuedCertificate, _>("boom")
        });
        assert!(matches!(result, Err(AdmitError::Sign("boom"))));
        assert_eq!(reg.list_tokens().expect("list")[0].uses_left, 1);
        assert!(reg.list_nodes(HOUR).expect("nodes").is_empty());
    }

    #[test]
    fn renewal_is_refused_when_revoked_or_too_early() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        join(&reg, &token(&reg, HOUR, 1, None), "gw-1", "01").expect("join");
        let renew = |serial: &str, new: &str| {
            reg.renew_certificate("gw-1", serial, || {
                Ok::<_, std::convert::Infallible>(issued(new))
            })
            .expect("no db error")
        };
        assert!(matches!(
            renew("01", "02"),
            Err(RenewalRefusal::TooEarly { .. })
        ));
        assert_eq!(
            renew("ff", "02").unwrap_err(),
            RenewalRefusal::UnknownCertificate
        );
        // Age the certificate past half its life.
        reg.conn()
            .execute(
                "UPDATE certificates SET issued_ms = issued_ms - 7200000 WHERE serial = '01'",
                [],
            )
            .expect("age");
        assert_eq!(renew("01", "02").expect("renewed").serial, "02");
        assert_eq!(
            reg.certificate_status("02").expect("status"),
            CertificateStatus::Valid
        );
        reg.revoke_node("gw-1").expect("revoke");
        assert_eq!(renew("01", "03").unwrap_err(), RenewalRefusal::Revoked);
        assert_eq!(
            reg.certificate_status("03").expect("status"),
            CertificateStatus::Unknown
        );
    }

    #[test]
    fn the_high_water_mark_only_rises_for_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        assert_eq!(reg.served_state().unwrap(), None);
        reg.record_served_state("a", 50).unwrap();
        reg.record_served_state("a", 40).unwrap();
        assert_eq!(reg.served_state().unwrap().map(|s| s.revision), Some(50));
        reg.record_served_state("b", 7).unwrap();
        assert_eq!(
            reg.served_state().unwrap(),
            Some(ServedState {
                state_id: "b".into(),
                revision: 7
            })
        );
    }

    #[test]
    fn an_adoption_is_taken_once_and_unknown_nodes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let t = token(&reg, HOUR, 2, None);
        join(&reg, &t, "gw-1", "s1").unwrap();
        join(&reg, &t, "gw-2", "s2").unwrap();
        assert_eq!(
            reg.adopt(Some(&["gw-9".to_string()])).unwrap(),
            Err("gw-9".to_string())
        );
        assert_eq!(
            reg.adopt(None).unwrap(),
            Ok(vec!["gw-1".to_string(), "gw-2".to_string()])
        );
        assert!(reg.take_adoption("gw-1").unwrap());
        assert!(!reg.take_adoption("gw-1").unwrap());
        assert_eq!(reg.pending_adoptions().unwrap(), vec!["gw-2".to_string()]);
    }

    #[test]
    fn kubelet_ports_are_kept_assigned_freed_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        // Joined before the kubelet endpoint existed: no port yet.
        let t = token(&reg, HOUR, 10, None);
        join(&reg, &t, "gw-b", "s1").expect("join");
        join(&reg, &t, "gw-a", "s2").expect("join");
        let range = KubeletPortRange {
            first: 20250,
            last: 20252,
        };
        let ports = reg.assign_kubelet_ports(range).expect("assign");
        assert_eq!(
            ports.assigned,
            vec![("gw-a".to_string(), 20250), ("gw-b".to_string(), 20251)]
        );
        // Joins take a port in their transaction; a kept port survives a second pass.
        reg.use_kubelet_ports(range);
        join(&reg, &t, "gw-c", "s3").expect("join");
        let ports = reg.assign_kubelet_ports(range).expect("assign");
        assert_eq!(ports.assigned.len(), 3);
        assert!(ports.assigned.contains(&("gw-c".to_string(), 20252)));
        // Full: a fourth join is refused naming the range, and consumes nothing.
        let before = reg.list_tokens().expect("tokens")[0].uses_left;
        let err = join(&reg, &t, "gw-d", "s4").unwrap_err();
        assert!(matches!(err, JoinRefusal::NoKubeletPort { .. }), "{err}");
        assert!(err.to_string().contains("20250-20252"), "{err}");
        assert_eq!(reg.list_tokens().expect("tokens")[0].uses_left, before);
        // Revoking frees the port for the next join.
        assert!(reg.revoke_node("gw-a").expect("revoke"));
        join(&reg, &t, "gw-d", "s5").expect("join after a revocation");
        let ports = reg.assign_kubelet_ports(range).expect("assign");
        assert!(ports.assigned.contains(&("gw-d".to_string(), 20250)));
        assert!(!ports.assigned.iter().any(|(n, _)| n == "gw-a"));
        // A narrower range moves the nodes outside it and reports who is left without.
        let narrow = KubeletPortRange {
            first: 20251,
            last: 20252,
        };
        let ports = reg.assign_kubelet_ports(narrow).expect("assign");
        assert_eq!(ports.assigned.len(), 2);
        assert_eq!(ports.unassigned.len(), 1);
        assert!(
            ports
                .assigned
                .iter()
                .all(|(_, p)| (20251..=20252).contains(p))
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Registry::open(dir.path()).expect("open"));
        let conn = Connection::open(dir.path().join("cloudcore.db")).expect("raw open");
        conn.execute_batch("PRAGMA user_version = 99")
            .expect("bump");
        drop(conn);
        let err = Registry::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[test]
    fn other_connections_commits_change_data_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let serve = Registry::open(dir.path()).expect("serve");
        let cli = Registry::open(dir.path()).expect("cli");
        let before = serve.data_version().expect("version");
        serve.server_started("x:1").expect("own write");
        assert_eq!(
            serve.data_version().expect("version"),
            before,
            "own writes do not count"
        );
        token(&cli, HOUR, 1, None);
        assert_ne!(serve.data_version().expect("version"), before);
    }

    #[test]
    fn connected_needs_a_fresh_server_heartbeat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        join(&reg, &token(&reg, HOUR, 1, None), "gw-1", "01").expect("join");
        reg.server_started("x:1").expect("start");
        assert!(!reg.mark_connected("gw-1", "127.0.0.1:5").expect("connect"));
        assert!(reg.list_nodes(HOUR).expect("list")[0].connected);
        assert!(!reg.list_nodes(Duration::ZERO).expect("list")[0].connected);
        reg.mark_disconnected("gw-1").expect("disconnect");
        assert!(
            reg.mark_connected("gw-1", "127.0.0.1:6")
                .expect("reconnect")
        );
    }
}
