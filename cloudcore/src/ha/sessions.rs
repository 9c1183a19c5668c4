//! Which replica holds each edge's session, recorded on the edge's Node and watched by every
//! replica. When a replica's session of node N starts, it writes its replica id and its kubelet
//! endpoint for N into N's annotations ([`REPLICA_ANNOTATION`], [`KUBELET_ANNOTATION`]). A
//! replica that has claimed its session of N and then sees another replica's claim closes its
//! own session: the claim written last wins, so two replicas never both write N's status.
//! The same watch tells the kubelet endpoint where to forward a stream request for a node
//! whose session is elsewhere ([`Owners::forward_to`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::hub::Shared;
use crate::kubelet::Endpoints;

/// Annotation naming the replica that holds the node's session.
pub const REPLICA_ANNOTATION: &str = "edge.io/cloudcore-replica";
/// Annotation with that replica's kubelet endpoint for the node (`IP:PORT`).
pub const KUBELET_ANNOTATION: &str = "edge.io/cloudcore-kubelet";
/// How often new local sessions are looked for and claimed.
const CLAIM_EVERY: Duration = Duration::from_millis(250);

/// Where a node's session is, as its Node says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub replica: String,
    pub kubelet: Option<SocketAddr>,
}

/// Every edge Node's session owner, from the watch. Held only for map access.
#[derive(Debug)]
pub struct Owners {
    me: String,
    owners: Mutex<HashMap<String, Owner>>,
}

impl Owners {
    pub fn new(me: String) -> Arc<Owners> {
        Arc::new(Owners {
            me,
            owners: Mutex::new(HashMap::new()),
        })
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, Owner>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Another replica's kubelet endpoint for `node`, when that replica holds its session.
    pub fn forward_to(&self, node: &str) -> Option<SocketAddr> {
        self.owners()
            .get(node)
            .filter(|o| o.replica != self.me)
            .and_then(|o| o.kubelet)
    }

    /// The replica holding `node`'s session, as its Node says.
    pub fn owner(&self, node: &str) -> Option<Owner> {
        self.owners().get(node).cloned()
    }

    /// This replica's id.
    pub fn me(&self) -> &str {
        &self.me
    }
}

/// The owner a Node's annotations name, if any.
pub fn owner_of(node: &Node) -> Option<Owner> {
    let annotations = node.metadata.annotations.as_ref()?;
    let replica = annotations.get(REPLICA_ANNOTATION)?.clone();
    let kubelet = annotations
        .get(KUBELET_ANNOTATION)
        .and_then(|a| a.parse().ok());
    Some(Owner { replica, kubelet })
}

/// What to do about a local session of a node, given its Node's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Ours, or not claimed yet by us: keep it.
    Keep,
    /// We claimed it and another replica claimed it after us: close ours.
    Close,
}

/// The rule: a session this replica has claimed is closed once the Node names another
/// replica (that replica's claim was written after ours).
pub fn verdict(me: &str, claimed: bool, owner: Option<&Owner>) -> Verdict {
    match owner {
        Some(o) if claimed && o.replica != me => Verdict::Close,
        _ => Verdict::Keep,
    }
}

/// Claims local sessions on their Nodes and closes the ones another replica took over, until
/// `shutdown`.
pub async fn run(
    client: kube::Client,
    shared: Arc<Shared>,
    endpoints: Arc<Endpoints>,
    owners: Arc<Owners>,
    metrics: Arc<super::HaMetrics>,
    shutdown: CancellationToken,
) {
    let api: Api<Node> = Api::all(client);
    // node -> the session id this replica has claimed on its Node.
    let claimed: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let claims = claim_loop(
        api.clone(),
        shared.clone(),
        endpoints,
        owners.clone(),
        claimed.clone(),
        shutdown.clone(),
    );
    let watch = async {
        let config = watcher::Config::default().labels(crate::nodes::EDGE_ROLE_LABEL);
        let mut events = std::pin::pin!(
            watcher(api.clone(), config)
                .default_backoff()
                .applied_objects()
        );
        while let Some(next) = events.next().await {
            let node = match next {
                Ok(node) => node,
                Err(e) => {
                    tracing::warn!(error = %e, "watching edge nodes' session owners");
                    continue;
                }
            };
            let Some(name) = node.metadata.name.clone() else {
                continue;
            };
            let owner = owner_of(&node);
            match &owner {
                Some(o) => owners.owners().insert(name.clone(), o.clone()),
                None => owners.owners().remove(&name),
            };
            let session = claimed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .copied();
            if verdict(owners.me(), session.is_some(), owner.as_ref()) == Verdict::Close
                && let Some(id) = session
            {
                // The watch may deliver another replica's older claim after ours was written:
                // decide on the Node as it is now.
                let current = match api.get(&name).await {
                    Ok(node) => owner_of(&node),
                    Err(e) => {
                        tracing::warn!(node.name = %name, error = %e, "cannot read the node to check its session's holder");
                        continue;
                    }
                };
                if verdict(owners.me(), true, current.as_ref()) == Verdict::Keep {
                    continue;
                }
                let to = owner.map(|o| o.replica).unwrap_or_default();
                if shared.close_session(
                    &name,
                    id,
                    b"the session moved to another cloudcore replica",
                ) {
                    tracing::info!(node.name = %name, to = %to, "closing this replica's session: the node connected to another replica");
                    metrics.sessions_moved.inc();
                }
                claimed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = claims => {}
        _ = watch => {}
    }
}

/// Writes this replica's claim on the Node of every session that started since the last look.
async fn claim_loop(
    api: Api<Node>,
    shared: Arc<Shared>,
    endpoints: Arc<Endpoints>,
    owners: Arc<Owners>,
    claimed: Arc<Mutex<HashMap<String, u64>>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(CLAIM_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let live: HashMap<String, u64> = shared.connected_sessions().into_iter().collect();
        let todo: Vec<(String, u64)> = {
            let mut claimed = claimed.lock().unwrap_or_else(|p| p.into_inner());
            claimed.retain(|node, id| live.get(node) == Some(id));
            live.iter()
                .filter(|(node, _)| !claimed.contains_key(*node))
                .map(|(n, id)| (n.clone(), *id))
                .collect()
        };
        for (node, id) in todo {
            let kubelet = endpoints
                .of(&node)
                .map(|a| SocketAddr::new(a.ip, a.port).to_string());
            let patch = json!({"metadata": {"annotations": {
                REPLICA_ANNOTATION: owners.me(),
                KUBELET_ANNOTATION: kubelet,
            }}});
            match api
                .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::debug!(node.name = %node, "session claimed on the node");
                    claimed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(node, id);
                }
                // No Node yet (a first join): the node controller creates it; next look.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    tracing::warn!(node.name = %node, error = %e, "cannot record this replica as the session's holder; will retry")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(annotations: &[(&str, &str)]) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "annotations": annotations.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()}
        }))
        .unwrap()
    }

    #[test]
    fn the_claim_written_last_wins() {
        let b = Owner {
            replica: "b".into(),
            kubelet: None,
        };
        let a = Owner {
            replica: "a".into(),
            kubelet: None,
        };
        assert_eq!(verdict("a", true, Some(&b)), Verdict::Close);
        assert_eq!(
            verdict("a", false, Some(&b)),
            Verdict::Keep,
            "a session not claimed yet is newer than the claim it sees"
        );
        assert_eq!(verdict("a", true, Some(&a)), Verdict::Keep);
        assert_eq!(verdict("a", true, None), Verdict::Keep);
    }

    #[test]
    fn owners_come_from_annotations_and_forward_only_elsewhere() {
        let n = node(&[
            (REPLICA_ANNOTATION, "b"),
            (KUBELET_ANNOTATION, "127.0.0.2:20251"),
        ]);
        let owner = owner_of(&n).unwrap();
        assert_eq!(owner.replica, "b");
        assert_eq!(owner.kubelet, Some("127.0.0.2:20251".parse().unwrap()));
        let owners = Owners::new("a".into());
        owners.owners().insert("n1".into(), owner.clone());
        assert_eq!(owners.forward_to("n1"), owner.kubelet);
        let mine = Owners::new("b".into());
        mine.owners().insert("n1".into(), owner);
        assert_eq!(mine.forward_to("n1"), None);
        assert!(owner_of(&node(&[])).is_none());
    }
}
