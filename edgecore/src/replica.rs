//! The edge's copy of its desired state: the sync engine's edge half ([`EdgeReplica`]) over the
//! SQLite [`Store`] (KubeEdge's MetaManager).
//!
//! The hub hands over object messages in batches; [`Replica::apply`] lets the engine decide
//! what each one changes, commits all changes in one durable transaction on a blocking thread,
//! and only then returns the seqs to acknowledge. If the commit fails nothing is acknowledged
//! and the engine is rebuilt from what the store really holds, so the next session's inventory
//! is the truth.

use std::path::Path;
use std::sync::{Arc, Mutex};

use proto::sync::{EdgeReplica, StoreOp};
use proto::{HeldObject, Message};

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// The store and the engine's view of it.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Std mutexes: the store is used only on blocking threads, the engine only for quick
    /// decisions; neither is held across an await.
    store: Arc<Mutex<Store>>,
    engine: Arc<Mutex<EdgeReplica>>,
    metrics: Arc<Metrics>,
    /// Counts commits, so readers of the store (the pod manager) know when to look again.
    committed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// A batch could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store task failed: {0}")]
    Task(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replica {
    /// Opens the store in `data_dir` (refusing a corrupt or newer one) and loads what it holds.
    pub fn open(data_dir: &Path, metrics: Arc<Metrics>) -> Result<Replica, StoreError> {
        let store = Store::open(data_dir)?;
        let inventory = store.inventory()?;
        metrics.store_objects.set(inventory.len() as i64);
        Ok(Replica {
            engine: Arc::new(Mutex::new(EdgeReplica::new(inventory))),
            store: Arc::new(Mutex::new(store)),
            metrics,
            committed: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// Changes after every commit.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Starts a session: the inventory for `Hello`.
    pub fn start_session(&self) -> Vec<HeldObject> {
        lock(&self.engine).start_session()
    }

    /// The cloud said an operator adopted its store for this node: for the rest of the
    /// session, objects whose version differs are replaced even by lower resourceVersions.
    pub fn adopt(&self) {
        lock(&self.engine).adopt()
    }

    /// The identity of the cloud's API store this edge last synced with, if any.
    pub async fn cloud_state_id(&self) -> Result<Option<String>, ApplyError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || lock(&store).cloud_state_id())
            .await
            .map_err(|e| ApplyError::Task(e.to_string()))?
            .map_err(ApplyError::from)
    }

    /// Remembers the identity of the cloud's API store durably, before anything from it is
    /// applied.
    pub async fn remember_cloud_state(&self, state_id: String) -> Result<(), ApplyError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || lock(&store).set_cloud_state_id(&state_id))
            .await
            .map_err(|e| ApplyError::Task(e.to_string()))?
            .map_err(ApplyError::from)
    }

    /// Applies a batch of object messages durably; returns the seqs to acknowledge. Messages
    /// other than upserts and deletes are ignored.
    pub async fn apply(&self, messages: Vec<Message>) -> Result<Vec<u64>, ApplyError> {
        let mut seqs = Vec::with_capacity(messages.len());
        let mut ops: Vec<StoreOp> = Vec::new();
        {
            let mut engine = lock(&self.engine);
            for message in messages {
                let step = match message {
                    Message::Upsert(u) => engine.upsert(u),
                    Message::Delete(d) => engine.delete(d),
                    _ => continue,
                };
                seqs.push(step.seq);
                match step.op {
                    Ok(op) => ops.push(op),
                    Err(skipped) => {
                        tracing::debug!(seq = step.seq, ?skipped, "object message changes nothing");
                        self.metrics.sync_skipped.inc();
                    }
                }
            }
        }
        if ops.is_empty() {
            return Ok(seqs);
        }
        let (puts, deletes) = ops.iter().fold((0u64, 0u64), |(p, d), op| match op {
            StoreOp::Put { .. } => (p + 1, d),
            StoreOp::Delete { .. } => (p, d + 1),
        });
        let store = self.store.clone();
        let committed = tokio::task::spawn_blocking(move || lock(&store).apply(&ops)).await;
        match committed {
            Ok(Ok(())) => {
                self.metrics.sync_applied.inc_by(puts + deletes);
                self.committed.send_modify(|n| *n += 1);
                let objects = lock(&self.engine).len();
                self.metrics.store_objects.set(objects as i64);
                Ok(seqs)
            }
            Ok(Err(e)) => {
                self.reload().await;
                Err(e.into())
            }
            Err(e) => {
                self.reload().await;
                Err(ApplyError::Task(e.to_string()))
            }
        }
    }

    /// Rebuilds the engine from the store after a failed commit.
    async fn reload(&self) {
        let store = self.store.clone();
        let inventory = tokio::task::spawn_blocking(move || lock(&store).inventory()).await;
        match inventory {
            Ok(Ok(inventory)) => *lock(&self.engine) = EdgeReplica::new(inventory),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot re-read the store"),
            Err(e) => tracing::error!(error = %e, "store task failed"),
        }
    }
}
