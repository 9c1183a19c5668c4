//! ControllerRevisions: the template history of DaemonSets and StatefulSets, as
//! kube-controller-manager keeps it, so that `kubectl rollout history` and `kubectl rollout
//! undo` work on them.
//!
//! One revision per distinct pod template, owned by the set (controller reference), named
//! `<owner>-<hash>`, labelled with the template's labels and the hash (`controller-revision-hash`
//! for a DaemonSet, `controller.kubernetes.io/hash` for a StatefulSet, as Kubernetes labels them).
//! Its `data` is the patch kube-controller-manager stores: `{"spec": {"template": T}}` with
//! `"$patch": "replace"` in T, which kubectl applies to the set as a strategic merge patch to roll
//! back. `revision` numbers rise: a new template gets the highest number plus one, and going back
//! to an older template moves that revision to the top instead of copying it. Revisions no pod
//! uses are kept up to `revisionHistoryLimit` (default 10), the oldest deleted first. A name taken
//! by another object is a collision: the owner's `status.collisionCount` goes up and the hash
//! changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::{Value, json};

use crate::informer::observed;
use crate::pods;

/// The label holding a revision's hash on a DaemonSet's revisions and pods, and the revision's
/// name on a StatefulSet's pods.
pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";

/// The label holding a revision's hash on a StatefulSet's revisions (apimachinery's
/// `ControllerRevisionHashLabel`, which kube-controller-manager's StatefulSet history uses).
pub const STATEFUL_SET_HASH_LABEL: &str = "controller.kubernetes.io/hash";

/// How many unused revisions a set keeps when `revisionHistoryLimit` is not given.
pub const DEFAULT_HISTORY_LIMIT: i32 = 10;

/// A name prefix longer than this is cut, so that `<prefix>-<hash>` stays a valid name.
const MAX_PREFIX: usize = 223;

/// Attempts at a new revision name before giving up on collisions.
const MAX_COLLISIONS: i32 = 8;

/// Why a set's history could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("controller revision request failed")]
    Api(#[from] kube::Error),
    #[error("no free controller revision name for {owner} after {MAX_COLLISIONS} collisions")]
    Collisions { owner: String },
}

/// The set a history belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// `DaemonSet` or `StatefulSet` (group `apps/v1`).
    pub kind: &'static str,
    pub meta: &'a ObjectMeta,
    /// The label the hash goes in on the revisions: [`REVISION_HASH_LABEL`] for DaemonSets,
    /// [`STATEFUL_SET_HASH_LABEL`] for StatefulSets.
    pub hash_label: &'static str,
}

/// The revisions of one set after [`sync`].
#[derive(Debug, Clone)]
pub struct Revisions {
    /// The revision of the set's current template.
    pub current: ControllerRevision,
    /// Every revision the set owns, the current one included, oldest number first.
    pub all: Vec<ControllerRevision>,
    /// The set's collision count after this sync (raised when a name was taken).
    pub collision_count: Option<i32>,
    /// The label holding the hash on these revisions ([`Owner::hash_label`]).
    pub hash_label: &'static str,
}

impl Revisions {
    /// The current revision's hash (its hash label).
    pub fn hash(&self) -> String {
        hash_of(&self.current, self.hash_label)
    }
}

/// The hash of `revision`, from its `label`.
pub fn hash_of(revision: &ControllerRevision, label: &str) -> String {
    revision
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(label))
        .cloned()
        .unwrap_or_default()
}

/// The revision data for `template`: the patch that puts it back on the set.
pub fn data(template: &PodTemplateSpec) -> Value {
    let mut template = serde_json::to_value(template).unwrap_or_else(|_| json!({}));
    if let Some(map) = template.as_object_mut() {
        map.insert("$patch".to_string(), json!("replace"));
    }
    json!({"spec": {"template": template}})
}

/// The pod template a revision holds, if its data has one.
pub fn template(revision: &ControllerRevision) -> Option<PodTemplateSpec> {
    let mut template = revision.data.as_ref()?.0["spec"]["template"].clone();
    template.as_object_mut()?.remove("$patch");
    serde_json::from_value(template).ok()
}

/// `<owner>-<hash>`, the owner's name cut to 223 bytes first.
pub fn revision_name(owner: &str, hash: &str) -> String {
    let mut end = owner.len().min(MAX_PREFIX);
    while !owner.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}-{hash}", &owner[..end])
}

/// The revisions in `store` that `owner` controls, oldest number first.
pub fn owned(
    store: &Store<ControllerRevision>,
    owner: &ObjectMeta,
) -> Vec<Arc<ControllerRevision>> {
    let uid = owner.uid.as_deref().unwrap_or_default();
    let mut revisions = store.state_filter(|r| {
        r.metadata.namespace == owner.namespace
            && pods::controller_of(&r.metadata).is_some_and(|o| o.uid == uid)
    });
    revisions.sort_by(|a, b| (a.revision, &a.metadata.name).cmp(&(b.revision, &b.metadata.name)));
    revisions
}

fn data_of(revision: &ControllerRevision) -> Option<&Value> {
    revision.data.as_ref().map(|d| &d.0)
}

/// Makes the history of `owner` hold `template` as its newest revision: finds the revision
/// with equal data (moving it to the top if an older one) or creates one, and deletes
/// duplicates. `annotations` are the owner's (kube-controller-manager copies a DaemonSet's
/// onto its revisions, `kubernetes.io/change-cause` among them).
pub async fn sync(
    client: &kube::Client,
    store: &Store<ControllerRevision>,
    owner: Owner<'_>,
    template: &PodTemplateSpec,
    annotations: Option<BTreeMap<String, String>>,
    collision_count: Option<i32>,
) -> Result<Revisions, HistoryError> {
    let namespace = owner.meta.namespace.clone().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &namespace);
    let want = data(template);
    let mut all: Vec<ControllerRevision> = owned(store, owner.meta)
        .into_iter()
        .map(|r| (*r).clone())
        .collect();
    let top = all.iter().map(|r| r.revision).max().unwrap_or(0);

    let mut equal: Vec<ControllerRevision> = all
        .iter()
        .filter(|r| data_of(r) == Some(&want))
        .cloned()
        .collect();
    if let Some(keep) = equal.pop() {
        // Older duplicates of the same template (oldest first: the last is the highest).
        for duplicate in &equal {
            let name = duplicate.metadata.name.clone().unwrap_or_default();
            delete_revision(&api, store, &namespace, &name).await?;
            all.retain(|r| r.metadata.name.as_deref() != Some(&name));
        }
        let current = if keep.revision < top {
            renumber(&api, store, &keep, top + 1).await?
        } else {
            keep
        };
        replace(&mut all, &current);
        return Ok(Revisions {
            current,
            all,
            collision_count,
            hash_label: owner.hash_label,
        });
    }

    let mut collisions = collision_count;
    for _ in 0..MAX_COLLISIONS {
        let hash = pods::template_hash(template, collisions);
        let name = revision_name(owner.meta.name.as_deref().unwrap_or_default(), &hash);
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(owner.hash_label.to_string(), hash.clone());
        let revision = ControllerRevision {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(labels),
                annotations: annotations.clone(),
                owner_references: Some(vec![pods::owner_reference(
                    "apps/v1", owner.kind, owner.meta,
                )]),
                ..ObjectMeta::default()
            },
            data: Some(RawExtension(want.clone())),
            revision: top + 1,
        };
        match api.create(&PostParams::default(), &revision).await {
            Ok(created) => {
                wait_for(store, &namespace, &created).await;
                all.push(created.clone());
                return Ok(Revisions {
                    current: created,
                    all,
                    collision_count: collisions,
                    hash_label: owner.hash_label,
                });
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = api.get(&name).await?;
                let ours = pods::controller_of(&existing.metadata)
                    .is_some_and(|o| Some(&o.uid) == owner.meta.uid.as_ref());
                if ours && data_of(&existing) == Some(&want) {
                    // Created by an earlier pass whose write the cache has not shown yet.
                    let current = if existing.revision < top {
                        renumber(&api, store, &existing, top + 1).await?
                    } else {
                        existing
                    };
                    replace(&mut all, &current);
                    return Ok(Revisions {
                        current,
                        all,
                        collision_count: collisions,
                        hash_label: owner.hash_label,
                    });
                }
                collisions = Some(collisions.unwrap_or(0) + 1);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(HistoryError::Collisions {
        owner: owner.meta.name.clone().unwrap_or_default(),
    })
}

/// Deletes the oldest revisions `is_live` says no pod uses, beyond `limit` of them.
pub async fn truncate(
    client: &kube::Client,
    store: &Store<ControllerRevision>,
    revisions: &Revisions,
    limit: Option<i32>,
    is_live: impl Fn(&ControllerRevision) -> bool,
) -> Result<(), kube::Error> {
    let limit = usize::try_from(limit.unwrap_or(DEFAULT_HISTORY_LIMIT)).unwrap_or(0);
    let current = revisions.current.metadata.name.as_deref();
    let old: Vec<&ControllerRevision> = revisions
        .all
        .iter()
        .filter(|r| r.metadata.name.as_deref() != current && !is_live(r))
        .collect();
    let excess = old.len().saturating_sub(limit);
    for revision in old.into_iter().take(excess) {
        let namespace = revision.metadata.namespace.clone().unwrap_or_default();
        let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &namespace);
        let name = revision.metadata.name.clone().unwrap_or_default();
        delete_revision(&api, store, &namespace, &name).await?;
    }
    Ok(())
}

fn replace(all: &mut Vec<ControllerRevision>, revision: &ControllerRevision) {
    all.retain(|r| r.metadata.name != revision.metadata.name);
    all.push(revision.clone());
    all.sort_by(|a, b| (a.revision, &a.metadata.name).cmp(&(b.revision, &b.metadata.name)));
}

async fn renumber(
    api: &Api<ControllerRevision>,
    store: &Store<ControllerRevision>,
    revision: &ControllerRevision,
    number: i64,
) -> Result<ControllerRevision, kube::Error> {
    let name = revision.metadata.name.clone().unwrap_or_default();
    let patched = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"revision": number})),
        )
        .await?;
    let namespace = patched.metadata.namespace.clone().unwrap_or_default();
    wait_for(store, &namespace, &patched).await;
    Ok(patched)
}

async fn delete_revision(
    api: &Api<ControllerRevision>,
    store: &Store<ControllerRevision>,
    namespace: &str,
    name: &str,
) -> Result<(), kube::Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(e),
    }
    let key = ObjectRef::new(name).within(namespace);
    observed(|| store.get(&key).is_none()).await;
    Ok(())
}

/// Waits until the cache holds `revision` at its resourceVersion or later.
async fn wait_for(
    store: &Store<ControllerRevision>,
    namespace: &str,
    revision: &ControllerRevision,
) {
    let key =
        ObjectRef::new(revision.metadata.name.as_deref().unwrap_or_default()).within(namespace);
    let want = revision.revision;
    let uid = revision.metadata.uid.clone();
    observed(|| {
        store
            .get(&key)
            .is_some_and(|r| r.metadata.uid == uid && r.revision == want)
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_a_replacing_patch_of_the_template_and_reads_back() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "agent"}},
            "spec": {"containers": [{"name": "agent", "image": "busybox:1"}]}
        }))
        .expect("template");
        let data = data(&template);
        assert_eq!(data["spec"]["template"]["$patch"], "replace");
        assert_eq!(
            data["spec"]["template"]["spec"]["containers"][0]["image"],
            "busybox:1"
        );
        assert_eq!(data.as_object().map(|o| o.len()), Some(1), "{data}");
        let revision = ControllerRevision {
            data: Some(RawExtension(data)),
            ..ControllerRevision::default()
        };
        assert_eq!(self::template(&revision), Some(template));
    }

    #[test]
    fn names_cut_long_owners() {
        assert_eq!(revision_name("agent", "5d8f7c9b"), "agent-5d8f7c9b");
        let long = "a".repeat(300);
        let name = revision_name(&long, "xyz");
        assert_eq!(name.len(), MAX_PREFIX + 4);
        assert!(name.ends_with("a-xyz"));
    }
}
