//! The garbage collector's finalizers: what kube-controller-manager's garbage collector does
//! for an owner deleted with `propagationPolicy=Orphan` or `Foreground`.
//!
//! A delete with one of them does not remove the owner: it gets `deletionTimestamp` and the
//! `orphan` or `foregroundDeletion` finalizer ([`objects::pending_deletion`]). Then a pass of
//! [`run`]:
//! - `orphan`: removes the owner's reference from every dependent, then the finalizer.
//! - `foregroundDeletion`: deletes every dependent that has no other live owner (itself in the
//!   foreground, so a chain is deleted from the bottom up; a dependent that has another live
//!   owner only loses this owner's reference), and removes the finalizer once no dependent
//!   whose reference has `blockOwnerDeletion: true` is left. Dependents without it are
//!   deleted too but do not hold the owner.
//!
//! When the last finalizer is gone the owner is removed (a pod only once its node confirmed
//! it stopped, [`objects::may_remove`]), and its remaining dependents are collected in the
//! background. Passes run when a delete asks for one ([`wake`]), every second while an owner
//! waits and the store changed, and once at start, so a deletion interrupted by a restart
//! completes.

use std::ops::ControlFlow;
use std::sync::LazyLock;
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::objects::{
    self, FOREGROUND_FINALIZER, ORPHAN_FINALIZER, Propagation, key, resource_id, rv_of,
};
use super::resources::{self, ResourceInfo};
use super::store::{Scan, Store, StoreError};

/// Wakes the collector: a delete just set one of its finalizers. Process-wide, so the verbs
/// need no handle; a wake with no owner waiting costs one pass.
static WAKE: LazyLock<Notify> = LazyLock::new(Notify::new);

/// How often a pass runs while an owner waits for its dependents.
const WAITING_INTERVAL: Duration = Duration::from_secs(1);

/// Asks for a pass soon.
pub fn wake() {
    WAKE.notify_one();
}

/// The propagation a delete without one uses, as kube-apiserver's strategies: `Orphan` for
/// batch/v1 Jobs (kept for compatibility), `Background` for everything else.
pub fn default_propagation(info: &ResourceInfo) -> &'static str {
    match (info.group, info.version, info.kind) {
        ("batch", "v1", "Job") => "Orphan",
        _ => "Background",
    }
}

/// kube-apiserver's warning on a Job delete that names no propagation.
pub const JOB_ORPHAN_WARNING: &str = "child pods are preserved by default when jobs are deleted; set propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress this warning";

/// Runs passes until cancelled.
pub async fn run(store: Store, shutdown: CancellationToken) {
    let mut waiting = true; // the first pass finds what a restart interrupted
    // The store's version after the last pass: while an owner waits on a dependent (a pod
    // whose edge is offline, say), a tick with no write since finds nothing new and is skipped,
    // so a long wait costs no scans.
    let mut seen = None;
    loop {
        if !waiting {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = WAKE.notified() => {}
            }
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = WAKE.notified() => {}
                _ = tokio::time::sleep(WAITING_INTERVAL) => {
                    if seen == Some(store.resource_version()) {
                        continue;
                    }
                }
            }
        }
        let store = store.clone();
        let before = store.resource_version();
        let result = tokio::task::spawn_blocking({
            let store = store.clone();
            move || pass(&store, OffsetDateTime::now_utc())
        })
        .await;
        // What the pass itself wrote is looked at once more (a release may free an owner).
        seen = (store.resource_version() == before).then_some(before);
        match result {
            Ok(Ok(still_waiting)) => waiting = still_waiting,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "garbage collector pass failed; will retry");
                waiting = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "garbage collector task failed; will retry");
                waiting = true;
            }
        }
    }
}

fn has_finalizer(object: &Value, finalizer: &str) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|list| list.iter().any(|f| f == finalizer))
}

fn terminating(object: &Value) -> bool {
    object["metadata"]["deletionTimestamp"].is_string()
}

/// The objects of `info` being deleted. Only a body whose text names `deletionTimestamp` is
/// parsed: a pass at start used to parse (and hold) every object of every kind, some 50,000 at
/// 10,000 edges with a pod each, to find none.
fn terminating_objects(store: &Store, info: &ResourceInfo) -> Result<Vec<Value>, StoreError> {
    let mut found = Vec::new();
    store.scan_rows(&resource_id(info), Scan::default(), |row| {
        if row.body()?.contains("\"deletionTimestamp\"") {
            let object = row.object()?;
            if terminating(&object) {
                found.push(object);
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(found)
}

/// One pass over every owner holding one of the collector's finalizers; true while one still
/// waits for dependents.
pub fn pass(store: &Store, now: OffsetDateTime) -> Result<bool, StoreError> {
    let mut waiting = false;
    for info in resources::builtin() {
        for owner in terminating_objects(store, info)?.iter() {
            let result = if has_finalizer(owner, ORPHAN_FINALIZER) {
                orphan(store, info, owner)
            } else if has_finalizer(owner, FOREGROUND_FINALIZER) {
                foreground(store, info, owner, now).map(|done| waiting |= !done)
            } else {
                Ok(())
            };
            match result {
                // Changed meanwhile: the next pass sees the new version.
                Err(StoreError::Conflict { .. } | StoreError::NotFound) => waiting = true,
                other => other?,
            }
        }
    }
    Ok(waiting)
}

/// Removes the owner's references from its dependents, then the `orphan` finalizer.
fn orphan(store: &Store, info: &ResourceInfo, owner: &Value) -> Result<(), StoreError> {
    if let Some(uid) = owner["metadata"]["uid"].as_str() {
        objects::collect_garbage(store, uid, Propagation::Orphan)?;
    }
    release(store, info, owner, ORPHAN_FINALIZER)
}

fn owner_reference<'a>(object: &'a Value, uid: &str) -> Option<&'a Value> {
    object["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["uid"].as_str() == Some(uid))
}

/// Whether the owner a reference names exists with that uid and is not being deleted.
fn live_owner(store: &Store, namespace: &str, reference: &Value) -> Result<bool, StoreError> {
    let (Some(kind), Some(name), Some(uid)) = (
        reference["kind"].as_str(),
        reference["name"].as_str(),
        reference["uid"].as_str(),
    ) else {
        return Ok(false);
    };
    for info in resources::builtin().iter().filter(|i| i.kind == kind) {
        let ns = if info.namespaced { namespace } else { "" };
        if let Some(owner) = store.get(&resource_id(info), ns, name)?
            && owner["metadata"]["uid"].as_str() == Some(uid)
        {
            return Ok(!terminating(&owner));
        }
    }
    Ok(false)
}

/// Deletes the owner's dependents; true when none that blocks it is left and the
/// `foregroundDeletion` finalizer was removed.
fn foreground(
    store: &Store,
    info: &ResourceInfo,
    owner: &Value,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let Some(uid) = owner["metadata"]["uid"].as_str() else {
        return Ok(true);
    };
    let mut blocked = false;
    for (dependent_info, dependent) in objects::dependents(store, uid)? {
        let blocks = owner_reference(&dependent, uid)
            .is_some_and(|r| r["blockOwnerDeletion"] == json!(true));
        let (namespace, name) = key(&dependent);
        let id = resource_id(dependent_info);
        let others: Vec<Value> = dependent["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["uid"].as_str() != Some(uid))
            .cloned()
            .collect();
        let mut kept_by_another = false;
        for reference in &others {
            if live_owner(store, &namespace, reference)? {
                kept_by_another = true;
                break;
            }
        }
        if kept_by_another {
            // Another owner keeps it: it only stops depending on this one.
            let mut updated = dependent.clone();
            updated["metadata"]["ownerReferences"] = Value::Array(others);
            store.update(&id, &namespace, &name, updated, rv_of(&dependent))?;
            continue;
        }
        if terminating(&dependent) {
            blocked |= blocks;
            continue;
        }
        tracing::info!(resource = dependent_info.plural, %namespace, %name, owner.uid = %uid, "deleting a dependent of an owner deleted in the foreground");
        match objects::pending_deletion(dependent_info, &dependent, None, Some("Foreground"), now) {
            Some(pending) => {
                store.update(&id, &namespace, &name, pending, rv_of(&dependent))?;
                blocked |= blocks;
            }
            None => {
                let deleted = store.delete(&id, &namespace, &name, rv_of(&dependent))?;
                if let Some(dependent_uid) = deleted["metadata"]["uid"].as_str() {
                    objects::collect_garbage(store, dependent_uid, Propagation::Background)?;
                }
            }
        }
    }
    if blocked {
        return Ok(false);
    }
    release(store, info, owner, FOREGROUND_FINALIZER)?;
    Ok(true)
}

/// Removes `finalizer` from the owner; with no finalizer left the owner is removed (when it
/// may be, [`objects::may_remove`]) and its remaining dependents collected in the background.
fn release(
    store: &Store,
    info: &ResourceInfo,
    owner: &Value,
    finalizer: &str,
) -> Result<(), StoreError> {
    let (namespace, name) = key(owner);
    let id = resource_id(info);
    let mut updated = owner.clone();
    let left: Vec<Value> = owner["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f.as_str() != Some(finalizer))
        .cloned()
        .collect();
    let Some(meta) = updated["metadata"].as_object_mut() else {
        return Ok(());
    };
    if left.is_empty() {
        meta.remove("finalizers");
    } else {
        meta.insert("finalizers".into(), Value::Array(left.clone()));
    }
    if left.is_empty() && objects::may_remove(info, &updated) {
        let deleted = store.delete(&id, &namespace, &name, rv_of(owner))?;
        tracing::info!(resource = info.plural, %namespace, %name, finalizer, "owner removed after its dependents were handled");
        if let Some(uid) = deleted["metadata"]["uid"].as_str() {
            objects::collect_garbage(store, uid, Propagation::Background)?;
        }
    } else {
        store.update(&id, &namespace, &name, updated, rv_of(owner))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(plural: &str) -> &'static ResourceInfo {
        resources::builtin()
            .iter()
            .find(|i| i.plural == plural)
            .expect("builtin resource")
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("api.db"), Default::default()).expect("open");
        (dir, store)
    }

    fn create(store: &Store, plural: &str, name: &str, owners: &[(&Value, bool)]) -> Value {
        let i = info(plural);
        let mut object = json!({"metadata": {"name": name, "namespace": "ns"}});
        if plural == "pods" {
            object["spec"] = json!({"containers": [{"name": "c", "image": "i"}]});
        }
        if !owners.is_empty() {
            object["metadata"]["ownerReferences"] = owners
                .iter()
                .map(|(o, block)| {
                    json!({"apiVersion": "v1", "kind": o["kind"], "name": o["metadata"]["name"],
                        "uid": o["metadata"]["uid"], "blockOwnerDeletion": block})
                })
                .collect();
        }
        objects::prepare_create(i, &mut object, OffsetDateTime::now_utc()).expect("prepare");
        store
            .create(&resource_id(i), "ns", name, object)
            .expect("create")
    }

    fn get(store: &Store, plural: &str, name: &str) -> Option<Value> {
        store
            .get(&resource_id(info(plural)), "ns", name)
            .expect("get")
    }

    /// Deletes `object` with `policy` as the verbs do.
    fn delete(store: &Store, plural: &str, object: &Value, policy: &str) {
        let i = info(plural);
        let (ns, name) = key(object);
        let pending =
            objects::pending_deletion(i, object, None, Some(policy), OffsetDateTime::now_utc())
                .expect("a propagation finalizer makes the delete wait");
        store
            .update(&resource_id(i), &ns, &name, pending, rv_of(object))
            .expect("mark");
    }

    #[test]
    fn dependents_are_the_objects_whose_owner_references_name_the_uid() {
        let (_dir, store) = open();
        let owner = create(&store, "configmaps", "owner", &[]);
        let other = create(&store, "configmaps", "other", &[]);
        let uid = owner["metadata"]["uid"].as_str().expect("uid").to_string();
        create(&store, "pods", "owned", &[(&owner, true)]);
        create(&store, "pods", "elsewhere", &[(&other, true)]);
        // The uid in its text, but not as an owner: found by the text search, then dropped.
        let i = info("secrets");
        let mut mentions = json!({"metadata": {"name": "mentions", "namespace": "ns",
            "annotations": {"about": uid}}, "stringData": {"uid": uid}});
        objects::prepare_create(i, &mut mentions, OffsetDateTime::now_utc()).expect("prepare");
        store
            .create(&resource_id(i), "ns", "mentions", mentions)
            .expect("create");

        let found: Vec<(&str, String)> = objects::dependents(&store, &uid)
            .expect("dependents")
            .into_iter()
            .map(|(info, o)| (info.plural, key(&o).1))
            .collect();
        assert_eq!(found, vec![("pods", "owned".to_string())]);
    }

    #[test]
    fn foreground_deletes_dependents_first_and_waits_for_blocking_ones() {
        let (_dir, store) = open();
        let owner = create(&store, "configmaps", "owner", &[]);
        let blocking = create(&store, "configmaps", "blocking", &[(&owner, true)]);
        let loose = create(&store, "configmaps", "loose", &[(&owner, false)]);
        // A dependent whose own dependent blocks it: the chain goes bottom up.
        let grandchild = create(&store, "configmaps", "grandchild", &[(&blocking, true)]);
        let other = create(&store, "configmaps", "other-owner", &[]);
        let shared = create(
            &store,
            "configmaps",
            "shared",
            &[(&owner, true), (&other, true)],
        );
        delete(&store, "configmaps", &owner, "Foreground");
        let marked = get(&store, "configmaps", "owner").expect("owner stays");
        assert!(terminating(&marked));
        assert!(has_finalizer(&marked, FOREGROUND_FINALIZER));

        let now = OffsetDateTime::now_utc();
        let mut passes = 0;
        while pass(&store, now).expect("pass") {
            passes += 1;
            assert!(passes < 10, "foreground deletion never finished");
            // While the owner waits, it is still there and the blocking dependent is marked.
            if get(&store, "configmaps", "blocking").is_some() {
                assert!(get(&store, "configmaps", "owner").is_some());
            }
        }
        for gone in ["owner", "blocking", "loose", "grandchild"] {
            assert_eq!(get(&store, "configmaps", gone), None, "{gone}");
        }
        let kept = get(&store, "configmaps", "shared").expect("another owner keeps it");
        let refs = kept["metadata"]["ownerReferences"]
            .as_array()
            .expect("refs");
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0]["uid"], other["metadata"]["uid"]);
        let _ = (loose, grandchild, shared);
    }

    #[test]
    fn a_terminating_pod_holds_its_owner_until_its_node_confirms() {
        let (_dir, store) = open();
        let owner = create(&store, "configmaps", "owner", &[]);
        let mut pod = create(&store, "pods", "p", &[(&owner, true)]);
        pod["spec"]["nodeName"] = json!("edge-1");
        let pod = store
            .update(&resource_id(info("pods")), "ns", "p", pod, None)
            .expect("bind");
        delete(&store, "configmaps", &owner, "Foreground");
        let now = OffsetDateTime::now_utc();
        assert!(pass(&store, now).expect("pass"), "waits for the pod");
        let terminating_pod = get(&store, "pods", "p").expect("graceful");
        assert!(terminating(&terminating_pod));
        assert!(pass(&store, now).expect("pass"), "still waits");
        assert!(get(&store, "configmaps", "owner").is_some());
        assert!(get(&store, "pods", "p").is_some_and(|p| terminating(&p)));
        // The node confirms: the pod is deleted with grace 0, as `verbs::delete` does it.
        let current = get(&store, "pods", "p").expect("still there");
        let id = resource_id(info("pods"));
        match objects::pending_deletion(info("pods"), &current, Some(0), None, now) {
            Some(confirmed) => {
                store
                    .update(&id, "ns", "p", confirmed, rv_of(&current))
                    .expect("confirm");
            }
            None => {
                store
                    .delete(&id, "ns", "p", rv_of(&current))
                    .expect("confirm");
            }
        }
        while pass(&store, now).expect("pass") {}
        assert_eq!(get(&store, "pods", "p"), None);
        assert_eq!(get(&store, "configmaps", "owner"), None);
        let _ = pod;
    }

    #[test]
    fn orphan_removes_references_then_the_owner() {
        let (_dir, store) = open();
        let owner = create(&store, "configmaps", "owner", &[]);
        create(&store, "configmaps", "child", &[(&owner, true)]);
        delete(&store, "configmaps", &owner, "Orphan");
        let marked = get(&store, "configmaps", "owner").expect("owner stays");
        assert!(has_finalizer(&marked, ORPHAN_FINALIZER));
        assert!(!pass(&store, OffsetDateTime::now_utc()).expect("pass"));
        assert_eq!(get(&store, "configmaps", "owner"), None);
        let child = get(&store, "configmaps", "child").expect("orphaned, kept");
        assert!(child["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn jobs_orphan_by_default() {
        let jobs = resources::lookup("batch", "v1", "jobs").expect("jobs");
        assert_eq!(default_propagation(jobs), "Orphan");
        assert_eq!(default_propagation(info("configmaps")), "Background");
        let deployments = resources::lookup("apps", "v1", "deployments").expect("deployments");
        assert_eq!(default_propagation(deployments), "Background");
    }
}
