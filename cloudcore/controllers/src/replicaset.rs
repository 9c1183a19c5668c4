//! The ReplicaSet controller (not written yet: see issue 14).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::Context;

/// Runs the ReplicaSet controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    ctx.mark_synced("replicaset", true); // stub: until this controller lists its caches
    let _ = ctx;
    shutdown.cancelled().await;
}
