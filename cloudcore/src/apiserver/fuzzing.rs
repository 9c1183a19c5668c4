//! Entry points for the fuzz targets in `integration/fuzz/`: the embedded API's request decoding
//! run on arbitrary input, with no store and no server. Not part of cloudcore's API.
//!
//! Each function runs the same code a request goes through in [`super::verbs`], in the same
//! order, and returns nothing: a fuzz target only looks for panics, hangs and memory blow-ups.
//! An error a function meets is rendered as a `Status` body, as the server would answer it.

use axum::http::{Method, Uri};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::dryrun::DryRun;
use super::patch::{self, PatchType};
use super::request::{self, Target};
use super::resources::{self, FieldSelector, LabelSelector};
use super::status::ApiError;
use super::validation::{self, FieldValidation};
use super::{objects, pagination, verbs};

/// Renders an error the way a response would carry it.
fn answer<T>(result: Result<T, ApiError>) -> Option<T> {
    result.map_err(|e| e.to_status()).ok()
}

/// A pod as the store holds it: what bodies, patches and selectors are checked against.
pub fn sample_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-0", "namespace": "default", "uid": "7d1c8a9e-0000-4000-8000-000000000001",
            "resourceVersion": "42", "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": "web", "tier": "front", "example.com/role": "x"},
            "annotations": {"note": "a"},
            "finalizers": ["example.com/keep"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ReplicationController", "name": "web", "uid": "u1", "controller": true}]
        },
        "spec": {
            "nodeName": "edge-1",
            "containers": [
                {"name": "app", "image": "busybox:1.36", "args": ["sleep", "3600"],
                 "ports": [{"containerPort": 80, "protocol": "TCP"}],
                 "env": [{"name": "A", "value": "1"}],
                 "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}],
                 "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}}},
                {"name": "side", "image": "busybox"}
            ],
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a", "path": "a"}]}}],
            "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}]
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0}]
        }
    })
}

/// A stored object of `kind` to patch or select: a pod, or a small object of another kind.
fn sample_of(kind: &str) -> Value {
    match kind {
        "Pod" => sample_pod(),
        "Node" => json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "edge-1", "resourceVersion": "7", "labels": {"node-role.kubernetes.io/edge": ""}},
            "spec": {"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                       "capacity": {"cpu": "4"}}
        }),
        "Secret" => json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "s", "namespace": "default", "resourceVersion": "3"},
            "data": {"k": "dmFsdWU="}
        }),
        other => json!({
            "apiVersion": "v1", "kind": other,
            "metadata": {"name": "c", "namespace": "default", "resourceVersion": "3", "labels": {"a": "b"}},
            "data": {"k": "v"}
        }),
    }
}

/// A request line and body: `target` is a path with an optional query string, e.g.
/// `/api/v1/namespaces/default/pods/web-0?labelSelector=app%3Dweb`. Runs routing, the query
/// parameters (selectors, table options, delete options, dryRun, fieldValidation, limit and
/// the continue token) and, when the path names a resource, the body through strict decoding
/// and create and update preparation.
pub fn request(target: &str, body: &[u8]) {
    let Ok(uri) = target.parse::<Uri>() else {
        return;
    };
    let Some(routed) = answer(request::route(uri.path())) else {
        return;
    };
    let Some(query) = answer(verbs::query_of(&uri)) else {
        return;
    };
    let _ = verbs::table_options(&query);
    let _ = answer(verbs::delete_options(&query, body));
    let _ = answer(pagination::Paging::from_query(&query));
    let _ = answer(DryRun::from_request(&Method::DELETE, &query, body));
    let _ = answer(FieldValidation::from_query(&Method::PATCH, &query));
    let selectors = answer(verbs::selectors(&query));
    let Target::Resource(resource) = routed else {
        return;
    };
    let info = resource.info;
    if let Some((labels, fields)) = selectors
        && answer(verbs::check_fields(info, &fields)).is_some()
    {
        let stored = sample_of(info.kind);
        let _ = labels.map(|l| l.matches_object(&stored));
        let _ = fields.map(|f| f.matches(info.kind, &stored));
    }
    body_for(info, resource.subresource.as_deref(), body);
}

/// A create or update body for the resource `info`, as `verbs` decodes and prepares it.
fn body_for(info: &'static resources::ResourceInfo, subresource: Option<&str>, body: &[u8]) {
    let _ = objects::name_of_body(body);
    let _ = validation::body_findings(info, subresource, body);
    let Some(object) = answer(verbs::parse_body(body)) else {
        return;
    };
    if answer(objects::check_type(info, &object)).is_none() {
        return;
    }
    let now = OffsetDateTime::UNIX_EPOCH;
    let mut created = object.clone();
    let _ = answer(objects::prepare_create(info, &mut created, now));
    let current = sample_of(info.kind);
    let mut updated = object;
    let _ = answer(objects::prepare_update(
        info,
        subresource,
        &current,
        &mut updated,
    ));
    let _ = resources::table(info.kind, &[created, updated], "1", now);
}

/// The request body for a resource given by its plural (`pods`, `configmaps`, ...) in the core
/// group, for a create and an update of that resource.
pub fn body(plural: &str, body: &[u8]) {
    if let Some(info) = resources::lookup("", "v1", plural) {
        body_for(info, None, body);
    }
}

/// A label selector and a field selector as the query parameters carry them, matched against
/// an object of `kind`.
pub fn selectors(kind: &str, label_selector: &str, field_selector: &str) {
    let stored = sample_of(kind);
    if let Ok(selector) = LabelSelector::parse(label_selector) {
        let _ = selector.matches_object(&stored);
        let _ = selector.is_empty();
    }
    if let Ok(selector) = FieldSelector::parse(field_selector)
        && selector.validate(kind).is_ok()
    {
        let _ = selector.matches(kind, &stored);
    }
}

/// A patch body of `content_type` applied to a stored object of `kind`, then validated as the
/// update it becomes.
pub fn patch(content_type: &str, kind: &str, body: &[u8]) {
    let Some(patch_type) = PatchType::from_content_type(content_type) else {
        return;
    };
    let stored = sample_of(kind);
    let Ok(mut patched) = patch::apply(patch_type, kind, &stored, body) else {
        return;
    };
    // As `verbs::write_update` does: the type check, then the update rules.
    if let Some(info) = resources::builtin().iter().find(|i| i.kind == kind)
        && answer(objects::check_type(info, &patched)).is_some()
    {
        let _ = answer(objects::prepare_update(info, None, &stored, &mut patched));
    }
}
