//! Discovery and OpenAPI documents of the embedded control plane: `/version`, `/api`, `/apis`,
//! the per-group-version resource lists, and the OpenAPI v3 (and v2) documents kubectl reads.
//!
//! All documents are pure functions of the [`resources::builtin`] table. What each one must
//! contain for kubectl and client-go, and why, is in docs/kubectl-compat.md:
//!
//! - Discovery is served in the legacy (unaggregated) format only. client-go asks for
//!   aggregated discovery first but decides by the response `Content-Type`: a plain
//!   `application/json` answer is read as `APIVersions`/`APIGroupList` and the resource lists
//!   are then fetched per group-version.
//! - OpenAPI v3 lists a PATCH operation with the `fieldValidation` query parameter and the
//!   `x-kubernetes-group-version-kind` extension for every resource, so kubectl leaves
//!   validation to the server (it sends `fieldValidation=Strict` either way) instead of
//!   validating on the client with `/openapi/v2`. The PATCH request bodies deliberately do not list
//!   `application/strategic-merge-patch+json`: `kubectl apply` then computes its strategic
//!   merge patch from the types compiled into kubectl (real merge keys) rather than from these
//!   schemas, which carry no field details.
//! - OpenAPI v2 only matters to kubectl 1.27 and 1.28, which download it (protobuf only) before
//!   validating: [`openapi_v2_protobuf`] is an empty document that satisfies them.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::resources::{self, POD_STREAM_SUBRESOURCES, ResourceInfo, STATUS_VERBS};
use super::{crd, metrics_api};

/// Major version reported by `/version`.
pub const MAJOR: &str = "1";
/// Minor version reported by `/version`: the Kubernetes API level this server follows, and what
/// kubectl dispatchers use to pick a matching kubectl (see docs/kubectl-compat.md).
pub const MINOR: &str = "31";
/// `gitVersion` reported by `/version`. Build metadata (`+cloudcore`) rather than a pre-release
/// suffix, so semver range checks such as `>=1.31.0` still hold.
pub const GIT_VERSION: &str = "v1.31.0+cloudcore";

/// `GET /version`: the `version.Info` document.
pub fn version() -> Value {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    json!({
        "major": MAJOR,
        "minor": MINOR,
        "gitVersion": GIT_VERSION,
        "gitCommit": "",
        "gitTreeState": "",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{arch}", std::env::consts::OS),
    })
}

/// `GET /api`: the `APIVersions` document of the core group, without server addresses (clients
/// ignore them; see [`api_versions_for`]).
pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [],
    })
}

/// `GET /api` with `serverAddressByClientCIDRs` naming `server_address` (`host:port`) for every
/// client, as the apiserver reports its advertised address.
pub fn api_versions_for(server_address: &str) -> Value {
    let mut doc = api_versions();
    doc["serverAddressByClientCIDRs"] =
        json!([{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]);
    doc
}

/// The non-core groups, in table order, each with its versions (first is preferred).
fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in resources::builtin()
        .iter()
        .chain(crd::served())
        .filter(|r| !r.group.is_empty())
    {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => groups.push((r.group, vec![r.version])),
        }
    }
    // Not in the resource table (nothing is stored): served by `metrics_api`.
    groups.push((metrics_api::GROUP, vec![metrics_api::VERSION]));
    groups
}

/// `GET /apis`: the `APIGroupList` of every non-core group with its versions and preferred
/// version.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            json!({
                "name": group,
                "versions": versions,
                "preferredVersion": versions[0],
            })
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Base64 (standard alphabet, padded) of a few bytes; only the storage version hash needs it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The apiserver's `storageVersionHash`: base64 of the first 8 bytes of SHA-256 of
/// `group/version/kind` of the storage version. Clients only compare it for equality (the
/// storage version migrator); it is stable across restarts.
pub fn storage_version_hash(group: &str, version: &str, kind: &str) -> String {
    let digest = Sha256::digest(format!("{group}/{version}/{kind}").as_bytes());
    base64(&digest[..8])
}

fn api_resource(r: &ResourceInfo) -> Value {
    json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": r.verbs,
        "shortNames": r.short_names,
        "categories": r.categories,
        "storageVersionHash": storage_version_hash(r.group, r.version, r.kind),
    })
}

fn api_subresource(r: &ResourceInfo, sub: &str) -> Value {
    if sub == "scale" {
        // kube-apiserver names the Scale's own group and version: clients (`kubectl scale`)
        // pick the Scale version from here.
        return json!({
            "name": format!("{}/scale", r.plural),
            "singularName": "",
            "namespaced": r.namespaced,
            "group": super::scale::GROUP,
            "version": super::scale::VERSION,
            "kind": "Scale",
            "verbs": STATUS_VERBS,
        });
    }
    json!({
        "name": format!("{}/{sub}", r.plural),
        "singularName": "",
        "namespaced": r.namespaced,
        "kind": if sub == "binding" { "Binding" } else { r.kind },
        "verbs": if sub == "binding" { &["create"][..] } else { STATUS_VERBS },
    })
}

/// `GET /api/v1` (group `""`) or `GET /apis/{group}/{version}`: the `APIResourceList` with each
/// resource and its subresources (`pods/status`), or `None` for a group-version not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if (group, version) == (metrics_api::GROUP, metrics_api::VERSION) {
        return Some(metrics_api::resource_list());
    }
    let served: Vec<&ResourceInfo> = resources::builtin()
        .iter()
        .chain(crd::served())
        .filter(|r| r.group == group && r.version == version)
        .collect();
    let first = served.first()?;
    let mut list = Vec::new();
    for r in &served {
        list.push(api_resource(r));
        for sub in r.subresources {
            list.push(api_subresource(r, sub));
        }
        if r.group.is_empty() && r.plural == "pods" {
            for (sub, kind, verbs) in POD_STREAM_SUBRESOURCES {
                list.push(json!({
                    "name": format!("pods/{sub}"),
                    "singularName": "",
                    "namespaced": true,
                    "kind": kind,
                    "verbs": verbs,
                }));
            }
        }
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": first.api_version(),
        "resources": list,
    }))
}

// ---------------------------------------------------------------------------------------------
// OpenAPI v3
// ---------------------------------------------------------------------------------------------

/// `api/v1` or `apis/{group}/{version}`: the key of a group-version in the OpenAPI v3 index and
/// the URL prefix of its resources.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The group-versions served, in table order.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut gvs: Vec<(&'static str, &'static str)> = Vec::new();
    for r in resources::builtin().iter().chain(crd::served()) {
        if !gvs.contains(&(r.group, r.version)) {
            gvs.push((r.group, r.version));
        }
    }
    gvs
}

/// `GET /openapi/v3`: the index mapping each group-version to the URL of its document. The
/// `hash` query parameter changes whenever the document does, so clients may cache by URL.
pub fn openapi_v3_index() -> Value {
    let mut paths = Map::new();
    for (group, version) in group_versions() {
        let Some(doc) = openapi_v3_group_version(group, version) else {
            continue;
        };
        let hash = hex::encode_upper(Sha256::digest(doc.to_string().as_bytes()));
        let key = gv_path(group, version);
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

/// The OpenAPI definition name of a kind, as the apiserver names it (`io.k8s.api.core.v1.Pod`).
fn definition_name(r: &ResourceInfo) -> String {
    if crd::is_custom(r) {
        return crd::definition_name(r);
    }
    match r.group {
        "" => format!("io.k8s.api.core.{}.{}", r.version, r.kind),
        "apiextensions.k8s.io" => format!(
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.{}.{}",
            r.version, r.kind
        ),
        group => {
            let short = group.strip_suffix(".k8s.io").unwrap_or(group);
            format!("io.k8s.api.{short}.{}.{}", r.version, r.kind)
        }
    }
}

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn query_parameter(name: &str, kind: &str, description: &str) -> Value {
    json!({
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": kind, "uniqueItems": true},
    })
}

fn field_validation_parameter() -> Value {
    query_parameter(
        "fieldValidation",
        "string",
        "What to do with unknown or duplicate fields in the body: Ignore, Warn or Strict (reject the request).",
    )
}

fn dry_run_parameter() -> Value {
    query_parameter(
        "dryRun",
        "string",
        "When All, validate and answer as if the request were applied, but persist nothing.",
    )
}

fn field_manager_parameter() -> Value {
    query_parameter(
        "fieldManager",
        "string",
        "Name of the actor making the change, recorded in managedFields.",
    )
}

fn path_parameter(name: &str, description: &str) -> Value {
    json!({
        "name": name,
        "in": "path",
        "required": true,
        "description": description,
        "schema": {"type": "string", "uniqueItems": true},
    })
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn ok_response(schema: Value) -> Value {
    json!({
        "200": {"description": "OK", "content": json_content(schema)},
        "401": {"description": "Unauthorized"},
    })
}

/// `Core`, `Coordination`, `Apiextensions`: the group part of an operation id.
fn operation_group(group: &str) -> String {
    let first = if group.is_empty() {
        "core"
    } else {
        group.split('.').next().unwrap_or(group)
    };
    let mut chars = first.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// One operation on a resource path with the extensions client-go and kubectl look for.
struct Operation<'a> {
    info: &'a ResourceInfo,
    /// `get`, `list`, `post`, `put`, `patch`, `delete`, `deletecollection`, `watch`.
    action: &'static str,
    /// Operation id verb (`read`, `list`, `create`, `replace`, `patch`, `delete`, ...).
    verb: &'static str,
    /// `Namespaced` in the id for namespaced paths, `ForAllNamespaces` for cross-namespace lists.
    scope: &'static str,
    /// `Status` for the status subresource.
    suffix: &'static str,
    parameters: Vec<Value>,
    request_body: Option<Value>,
    response: Value,
}

impl Operation<'_> {
    fn render(self) -> Value {
        let r = self.info;
        let (scope_before, scope_after) = match self.scope {
            "ForAllNamespaces" => ("", "ForAllNamespaces"),
            scope => (scope, ""),
        };
        let mut op = json!({
            "operationId": format!(
                "{}{}{}{}{}{}{scope_after}",
                self.verb,
                operation_group(r.group),
                capitalized(r.version),
                scope_before,
                r.kind,
                self.suffix,
            ),
            "tags": [format!("{}_{}", operation_group(r.group).to_lowercase(), r.version)],
            "parameters": self.parameters,
            "responses": ok_response(self.response),
            "x-kubernetes-action": self.action,
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
        });
        if let Some(body) = self.request_body {
            op["requestBody"] = body;
        }
        op
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn object_body(r: &ResourceInfo) -> Value {
    json!({"content": json_content(schema_ref(&definition_name(r))), "required": true})
}

/// PATCH request body. `application/strategic-merge-patch+json` is accepted by the server but
/// deliberately not listed: kubectl would otherwise compute `apply` patches from these field-less
/// schemas instead of its compiled-in types (see the module docs).
fn patch_body() -> Value {
    let patch = schema_ref(&format!("{META}.Patch"));
    json!({
        "content": {
            "application/json-patch+json": {"schema": patch},
            "application/merge-patch+json": {"schema": patch},
        },
        "required": true,
    })
}

/// The item operations (get, replace, patch, and delete unless `status`) of a resource path.
fn item_operations(
    r: &ResourceInfo,
    scope: &'static str,
    suffix: &'static str,
) -> Map<String, Value> {
    let object = schema_ref(&definition_name(r));
    let write_parameters = || {
        vec![
            dry_run_parameter(),
            field_manager_parameter(),
            field_validation_parameter(),
        ]
    };
    let mut ops = Map::new();
    let op = |action, verb, parameters, request_body, response| Operation {
        info: r,
        action,
        verb,
        scope,
        suffix,
        parameters,
        request_body,
        response,
    };
    ops.insert(
        "get".into(),
        op("get", "read", vec![], None, object.clone()).render(),
    );
    ops.insert(
        "put".into(),
        op(
            "put",
            "replace",
            write_parameters(),
            Some(object_body(r)),
            object.clone(),
        )
        .render(),
    );
    let mut patch_parameters = write_parameters();
    patch_parameters.push(query_parameter(
        "force",
        "boolean",
        "Take over conflicting fields in a server-side apply.",
    ));
    ops.insert(
        "patch".into(),
        op(
            "patch",
            "patch",
            patch_parameters,
            Some(patch_body()),
            object.clone(),
        )
        .render(),
    );
    if suffix.is_empty() {
        ops.insert(
            "delete".into(),
            op(
                "delete",
                "delete",
                vec![
                    dry_run_parameter(),
                    query_parameter(
                        "gracePeriodSeconds",
                        "integer",
                        "Seconds before a pod is stopped.",
                    ),
                    query_parameter(
                        "propagationPolicy",
                        "string",
                        "Orphan, Background or Foreground: what happens to dependents.",
                    ),
                ],
                Some(
                    json!({"content": json_content(schema_ref(&format!("{META}.DeleteOptions")))}),
                ),
                schema_ref(&format!("{META}.Status")),
            )
            .render(),
        );
    }
    ops
}

fn collection_operations(r: &ResourceInfo, scope: &'static str) -> Map<String, Value> {
    let list = schema_ref(&format!("{}List", definition_name(r)));
    let op = |action, verb, parameters, request_body, response| Operation {
        info: r,
        action,
        verb,
        scope,
        suffix: "",
        parameters,
        request_body,
        response,
    };
    let list_parameters = || {
        vec![
            query_parameter(
                "labelSelector",
                "string",
                "Only objects whose labels match.",
            ),
            query_parameter(
                "fieldSelector",
                "string",
                "Only objects whose fields match.",
            ),
            query_parameter(
                "resourceVersion",
                "string",
                "List at or watch from this version.",
            ),
            query_parameter("watch", "boolean", "Stream changes instead of listing."),
            query_parameter(
                "allowWatchBookmarks",
                "boolean",
                "Send BOOKMARK events during a watch.",
            ),
            query_parameter(
                "timeoutSeconds",
                "integer",
                "End a watch after this many seconds.",
            ),
            query_parameter(
                "limit",
                "integer",
                "At most this many items; more are reached with metadata.continue.",
            ),
            query_parameter(
                "continue",
                "string",
                "The token of the previous page (same resourceVersion).",
            ),
        ]
    };
    let mut ops = Map::new();
    ops.insert(
        "get".into(),
        op("list", "list", list_parameters(), None, list).render(),
    );
    if scope == "ForAllNamespaces" {
        return ops;
    }
    ops.insert(
        "post".into(),
        op(
            "post",
            "create",
            vec![
                dry_run_parameter(),
                field_manager_parameter(),
                field_validation_parameter(),
            ],
            Some(object_body(r)),
            schema_ref(&definition_name(r)),
        )
        .render(),
    );
    if r.verbs.contains(&"deletecollection") {
        let mut parameters = list_parameters();
        parameters.truncate(2);
        parameters.push(dry_run_parameter());
        ops.insert(
            "delete".into(),
            op(
                "deletecollection",
                "deleteCollection",
                parameters,
                None,
                schema_ref(&format!("{META}.Status")),
            )
            .render(),
        );
    }
    ops
}

fn with_parameters(mut ops: Map<String, Value>, parameters: Vec<Value>) -> Value {
    if !parameters.is_empty() {
        ops.insert("parameters".into(), Value::Array(parameters));
    }
    Value::Object(ops)
}

fn kind_schema(r: &ResourceInfo, list: bool) -> Value {
    let kind = if list {
        format!("{}List", r.kind)
    } else {
        r.kind.to_string()
    };
    json!({
        "type": "object",
        "description": format!("{kind} ({}); fields are not described here, the server validates them.", r.api_version()),
        "x-kubernetes-group-version-kind": [{"group": r.group, "version": r.version, "kind": kind}],
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn meta_schemas(schemas: &mut Map<String, Value>) {
    let object = |description: &str| json!({"type": "object", "description": description, "x-kubernetes-preserve-unknown-fields": true});
    schemas.insert(
        format!("{META}.Patch"),
        object("A JSON patch, JSON merge patch, strategic merge patch or apply configuration."),
    );
    schemas.insert(
        format!("{META}.DeleteOptions"),
        object(
            "Options of a delete: gracePeriodSeconds, preconditions, propagationPolicy, dryRun.",
        ),
    );
    schemas.insert(
        format!("{META}.Status"),
        object("The result of an operation that returns no object, or an error."),
    );
}

/// The OpenAPI name of `autoscaling/v1` `Scale`.
const SCALE: &str = "io.k8s.api.autoscaling.v1.Scale";

fn scale_schema() -> Value {
    json!({
        "type": "object",
        "description": "Scale (autoscaling/v1): spec.replicas, status.replicas and status.selector of a resource with a scale subresource.",
        "x-kubernetes-group-version-kind": [{"group": super::scale::GROUP, "version": super::scale::VERSION, "kind": "Scale"}],
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A scale subresource's operations take and return a `Scale`, as kube-apiserver documents
/// them: the parent's schema references and kind are replaced.
fn scale_operations(ops: Map<String, Value>, parent: &str) -> Map<String, Value> {
    let parent_ref = format!("#/components/schemas/{parent}");
    let text = Value::Object(ops)
        .to_string()
        .replace(&parent_ref, &format!("#/components/schemas/{SCALE}"));
    let mut ops: Map<String, Value> = serde_json::from_str(&text).unwrap_or_default();
    for op in ops.values_mut() {
        op["x-kubernetes-group-version-kind"] = json!({
            "group": super::scale::GROUP,
            "version": super::scale::VERSION,
            "kind": "Scale",
        });
    }
    ops
}

/// `GET /openapi/v3/api/v1` or `/openapi/v3/apis/{group}/{version}`: a minimal OpenAPI 3.0
/// document with the paths and operations of every resource of the group-version, or `None` for
/// a group-version not served.
///
/// Each operation carries `x-kubernetes-group-version-kind` and `x-kubernetes-action`; POST,
/// PUT and PATCH take `dryRun`, `fieldManager` and `fieldValidation`. Component schemas only
/// name their kind.
pub fn openapi_v3_group_version(group: &str, version: &str) -> Option<Value> {
    let served: Vec<&ResourceInfo> = resources::builtin()
        .iter()
        .chain(crd::served())
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let prefix = format!("/{}", gv_path(group, version));
    let mut paths = Map::new();
    let mut schemas = Map::new();
    meta_schemas(&mut schemas);
    for r in served {
        let name = path_parameter("name", &format!("name of the {}", r.kind));
        let namespace = path_parameter("namespace", "object name and auth scope");
        let (base, scope, scope_parameters) = if r.namespaced {
            (
                format!("{prefix}/namespaces/{{namespace}}/{}", r.plural),
                "Namespaced",
                vec![namespace],
            )
        } else {
            (format!("{prefix}/{}", r.plural), "", vec![])
        };
        paths.insert(
            base.clone(),
            with_parameters(collection_operations(r, scope), scope_parameters.clone()),
        );
        if r.namespaced {
            paths.insert(
                format!("{prefix}/{}", r.plural),
                with_parameters(collection_operations(r, "ForAllNamespaces"), vec![]),
            );
        }
        let mut item_parameters = vec![name];
        item_parameters.extend(scope_parameters);
        paths.insert(
            format!("{base}/{{name}}"),
            with_parameters(item_operations(r, scope, ""), item_parameters.clone()),
        );
        for sub in r.subresources {
            let ops = if *sub == "scale" {
                schemas.insert(SCALE.into(), scale_schema());
                scale_operations(item_operations(r, scope, "Scale"), &definition_name(r))
            } else {
                item_operations(r, scope, "Status")
            };
            paths.insert(
                format!("{base}/{{name}}/{sub}"),
                with_parameters(ops, item_parameters.clone()),
            );
        }
        schemas.insert(
            definition_name(r),
            crd::openapi_schema(r).unwrap_or_else(|| kind_schema(r, false)),
        );
        schemas.insert(format!("{}List", definition_name(r)), kind_schema(r, true));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

// ---------------------------------------------------------------------------------------------
// OpenAPI v2
// ---------------------------------------------------------------------------------------------

/// `GET /openapi/v2` as JSON: a minimal Swagger 2.0 document with a PATCH (carrying
/// `fieldValidation`) per resource item path.
///
/// kubectl only asks for v2 in protobuf (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`)
/// and cannot read this JSON; with the v3 documents above it never needs v2 (see
/// docs/kubectl-compat.md). This document is for other clients that read JSON.
pub fn openapi_v2() -> Value {
    let mut paths = Map::new();
    let mut definitions = Map::new();
    for r in resources::builtin().iter().chain(crd::served()) {
        let prefix = format!("/{}", gv_path(r.group, r.version));
        let item = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let param = |name: &str, kind: &str| json!({"name": name, "in": "query", "type": kind, "uniqueItems": true});
        paths.insert(
            item,
            json!({
                "patch": {
                    "operationId": format!("patch{}{}{}", operation_group(r.group), capitalized(r.version), r.kind),
                    "consumes": ["application/json-patch+json", "application/merge-patch+json"],
                    "produces": ["application/json"],
                    "parameters": [
                        {"name": "body", "in": "body", "required": true,
                         "schema": {"$ref": format!("#/definitions/{META}.Patch")}},
                        param("dryRun", "string"),
                        param("fieldManager", "string"),
                        param("fieldValidation", "string"),
                    ],
                    "responses": {"200": {"description": "OK", "schema": {"$ref": format!("#/definitions/{}", definition_name(r))}}},
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                },
            }),
        );
        definitions.insert(
            definition_name(r),
            json!({"type": "object", "x-kubernetes-group-version-kind": [gvk]}),
        );
    }
    definitions.insert(format!("{META}.Patch"), json!({"type": "object"}));
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "definitions": definitions,
    })
}

/// Appends a protobuf length-delimited field (wire type 2).
fn protobuf_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push((field << 3) | 2);
    let mut len = bytes.len();
    while len >= 0x80 {
        out.push(u8::try_from(len & 0x7f).unwrap_or(0) | 0x80);
        len >>= 7;
    }
    out.push(u8::try_from(len).unwrap_or(0));
    out.extend_from_slice(bytes);
}

/// `GET /openapi/v2` with `Accept: application/com.github.proto-openapi.spec.v2@v1.0+protobuf`:
/// an empty Swagger 2.0 document (`swagger`, `info`, no paths) in the protobuf encoding of
/// gnostic's `openapi.v2.Document`, the only form kubectl reads.
///
/// kubectl 1.27 and 1.28 download this before every `apply`/`create` with validation on and fail
/// (`failed to download openapi`, or a protobuf parse error for JSON) without it; they take
/// `fieldValidation` support from the v3 documents afterwards. kubectl 1.29+ does not need it.
/// Answer with [`OPENAPI_V2_PROTOBUF_CONTENT_TYPE`].
pub fn openapi_v2_protobuf() -> Vec<u8> {
    let mut info = Vec::new();
    protobuf_bytes(&mut info, 1, b"Kubernetes");
    protobuf_bytes(&mut info, 2, GIT_VERSION.as_bytes());
    let mut document = Vec::new();
    protobuf_bytes(&mut document, 1, b"2.0");
    protobuf_bytes(&mut document, 2, &info);
    protobuf_bytes(&mut document, 8, &[]);
    document
}

/// The media type kubectl puts in `Accept` for `/openapi/v2`; answer it with
/// [`openapi_v2_protobuf`] and [`OPENAPI_V2_PROTOBUF_CONTENT_TYPE`].
pub const OPENAPI_V2_PROTOBUF_ACCEPT: &str =
    "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
/// The `Content-Type` of [`openapi_v2_protobuf`]: the dotted form the apiserver answers with.
/// The `@` form kubectl asks for is not a valid media type for Go's `mime.ParseMediaType`, and
/// kubectl fails with "mime: unexpected content after media subtype" if it comes back.
pub const OPENAPI_V2_PROTOBUF_CONTENT_TYPE: &str =
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_reports_the_api_level() {
        let v = version();
        assert_eq!(v["major"], "1");
        assert_eq!(v["minor"], MINOR);
        let git = v["gitVersion"].as_str().unwrap();
        assert!(git.starts_with(&format!("v{MAJOR}.{MINOR}.")), "{git}");
        assert!(v["platform"].as_str().unwrap().contains('/'));
    }

    #[test]
    fn api_versions_and_groups() {
        let core = api_versions();
        assert_eq!(core["kind"], "APIVersions");
        assert_eq!(core["versions"], json!(["v1"]));
        assert!(core["serverAddressByClientCIDRs"].is_array());
        let at = api_versions_for("127.0.0.1:6443");
        assert_eq!(
            at["serverAddressByClientCIDRs"][0]["serverAddress"],
            "127.0.0.1:6443"
        );
        assert_eq!(
            at["serverAddressByClientCIDRs"][0]["clientCIDR"],
            "0.0.0.0/0"
        );

        let groups = api_group_list();
        assert_eq!(groups["kind"], "APIGroupList");
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "apps",
                "batch",
                "coordination.k8s.io",
                "discovery.k8s.io",
                "apiextensions.k8s.io",
                "metrics.k8s.io"
            ]
        );
        for g in groups["groups"].as_array().unwrap() {
            let version = if g["name"] == "metrics.k8s.io" {
                "v1beta1"
            } else {
                "v1"
            };
            let gv = format!("{}/{version}", g["name"].as_str().unwrap());
            assert_eq!(g["preferredVersion"]["groupVersion"], gv.as_str());
            assert_eq!(g["versions"][0]["groupVersion"], gv.as_str());
        }
    }

    #[test]
    fn storage_version_hashes_match_the_apiserver() {
        // Values a v1.31 apiserver reports in discovery.
        assert_eq!(storage_version_hash("", "v1", "Pod"), "xPOwRZ+Yhw8=");
        assert_eq!(storage_version_hash("", "v1", "Node"), "XwShjMxG9Fs=");
        assert_eq!(storage_version_hash("", "v1", "ConfigMap"), "qFsyl6wFWjQ=");
        assert_eq!(
            storage_version_hash("coordination.k8s.io", "v1", "Lease"),
            "gqkMMb/YqFM="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    fn find<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
        list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
    }

    #[test]
    fn resource_lists_contain_every_builtin_resource() {
        for r in resources::builtin() {
            let list = resource_list(r.group, r.version).unwrap();
            assert_eq!(list["kind"], "APIResourceList");
            assert_eq!(list["groupVersion"], r.api_version().as_str());
            let entry = find(&list, r.plural).unwrap_or_else(|| panic!("{} listed", r.plural));
            assert_eq!(entry["kind"], r.kind);
            assert_eq!(entry["namespaced"], r.namespaced, "{} scope", r.plural);
            assert_eq!(entry["verbs"], json!(r.verbs));
            assert_eq!(entry["singularName"], r.singular);
            assert_eq!(entry["shortNames"], json!(r.short_names));
            assert_eq!(entry["categories"], json!(r.categories));
            assert_eq!(entry["storageVersionHash"].as_str().unwrap().len(), 12);
            for sub in r.subresources {
                let entry = find(&list, &format!("{}/{sub}", r.plural)).unwrap();
                assert_eq!(entry["namespaced"], r.namespaced);
                if *sub == "binding" {
                    assert_eq!(entry["verbs"], json!(["create"]));
                    assert_eq!(entry["kind"], "Binding");
                } else {
                    assert_eq!(entry["verbs"], json!(["get", "patch", "update"]));
                    let kind = if *sub == "scale" { "Scale" } else { r.kind };
                    assert_eq!(entry["kind"], kind);
                }
            }
        }
        let core = resource_list("", "v1").unwrap();
        assert!(find(&core, "pods/status").is_some());
        assert!(find(&core, "nodes/status").is_some());
        assert!(find(&core, "configmaps/status").is_none());
        assert_eq!(find(&core, "namespaces").unwrap()["namespaced"], false);
        assert!(
            !find(&core, "namespaces").unwrap()["verbs"]
                .as_array()
                .unwrap()
                .contains(&json!("deletecollection"))
        );
        assert_eq!(find(&core, "pods").unwrap()["shortNames"], json!(["po"]));
        let crds = resource_list("apiextensions.k8s.io", "v1").unwrap();
        assert_eq!(
            find(&crds, "customresourcedefinitions").unwrap()["namespaced"],
            false
        );
        assert!(find(&crds, "customresourcedefinitions/status").is_some());
        for (sub, kind, verbs) in [
            ("pods/log", "Pod", json!(["get"])),
            ("pods/exec", "PodExecOptions", json!(["create", "get"])),
            ("pods/attach", "PodAttachOptions", json!(["create", "get"])),
            (
                "pods/portforward",
                "PodPortForwardOptions",
                json!(["create", "get"]),
            ),
        ] {
            let entry = find(&core, sub).unwrap_or_else(|| panic!("{sub} listed"));
            assert_eq!((&entry["kind"], &entry["verbs"]), (&json!(kind), &verbs));
        }
        let metrics = resource_list("metrics.k8s.io", "v1beta1").unwrap();
        assert_eq!(metrics["groupVersion"], "metrics.k8s.io/v1beta1");
        assert_eq!(find(&metrics, "nodes").unwrap()["kind"], "NodeMetrics");
        assert_eq!(find(&metrics, "pods").unwrap()["namespaced"], true);
        let apps = resource_list("apps", "v1").unwrap();
        let deployments = find(&apps, "deployments").unwrap();
        assert_eq!(deployments["shortNames"], json!(["deploy"]));
        assert_eq!(deployments["categories"], json!(["all"]));
        let scale = find(&apps, "deployments/scale").unwrap();
        assert_eq!(
            (&scale["group"], &scale["version"], &scale["kind"]),
            (&json!("autoscaling"), &json!("v1"), &json!("Scale"))
        );
        assert!(find(&apps, "daemonsets/scale").is_none());
        let batch = resource_list("batch", "v1").unwrap();
        assert_eq!(
            find(&batch, "cronjobs").unwrap()["shortNames"],
            json!(["cj"])
        );
        assert!(resource_list("apps", "v2").is_none());
        assert!(resource_list("", "v2").is_none());
    }

    /// Every PATCH operation of a document, by the kind in its GVK extension.
    fn patches(doc: &Value) -> Vec<(String, &Value)> {
        doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter_map(|(path, item)| Some((path.clone(), item.get("patch")?)))
            .collect()
    }

    #[test]
    fn openapi_v3_has_a_validating_patch_for_every_resource() {
        for r in resources::builtin() {
            let doc = openapi_v3_group_version(r.group, r.version).unwrap();
            assert_eq!(doc["openapi"], "3.0.0");
            let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
            let found: Vec<_> = patches(&doc)
                .into_iter()
                .filter(|(_, op)| op["x-kubernetes-group-version-kind"] == gvk)
                .collect();
            // A scale subresource's operations are the Scale's.
            let own = r.subresources.iter().filter(|s| **s != "scale").count();
            assert_eq!(found.len(), 1 + own, "{} patch operations", r.plural);
            for (path, op) in found {
                let names: Vec<&str> = op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["in"] == "query")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                assert!(names.contains(&"fieldValidation"), "{path}");
                assert!(names.contains(&"dryRun"), "{path}");
                let content = op["requestBody"]["content"].as_object().unwrap();
                assert!(
                    content.contains_key("application/merge-patch+json"),
                    "{path}"
                );
                assert!(
                    !content.contains_key("application/strategic-merge-patch+json"),
                    "{path}"
                );
            }
            for (path, item) in doc["paths"].as_object().unwrap() {
                for (method, op) in item.as_object().unwrap() {
                    if method == "parameters" {
                        continue;
                    }
                    assert!(
                        op["x-kubernetes-group-version-kind"].is_object(),
                        "{method} {path}"
                    );
                    assert!(op["x-kubernetes-action"].is_string(), "{method} {path}");
                    if matches!(method.as_str(), "post" | "put" | "patch") {
                        let has = op["parameters"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|p| p["name"] == "fieldValidation");
                        assert!(has, "{method} {path} takes fieldValidation");
                    }
                }
            }
            let schema = &doc["components"]["schemas"][definition_name(r)];
            assert_eq!(schema["x-kubernetes-group-version-kind"], json!([gvk]));
        }
        let core = openapi_v3_group_version("", "v1").unwrap();
        let paths = core["paths"].as_object().unwrap();
        for path in [
            "/api/v1/namespaces/{namespace}/pods",
            "/api/v1/pods",
            "/api/v1/namespaces/{namespace}/pods/{name}",
            "/api/v1/namespaces/{namespace}/pods/{name}/status",
            "/api/v1/nodes",
            "/api/v1/nodes/{name}",
            "/api/v1/nodes/{name}/status",
            "/api/v1/namespaces/{name}",
        ] {
            assert!(paths.contains_key(path), "{path}");
        }
        assert_eq!(
            paths["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"]["operationId"],
            "patchCoreV1NamespacedPod"
        );
        assert_eq!(
            paths["/api/v1/nodes/{name}/status"]["patch"]["operationId"],
            "patchCoreV1NodeStatus"
        );
        assert_eq!(
            paths["/api/v1/pods"]["get"]["operationId"],
            "listCoreV1PodForAllNamespaces"
        );
        assert!(
            paths["/api/v1/namespaces"].get("delete").is_none(),
            "namespaces have no deletecollection"
        );
        assert!(openapi_v3_group_version("apps", "v2").is_none());
        let apps = openapi_v3_group_version("apps", "v1").unwrap();
        let scale = &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"];
        assert_eq!(
            scale["put"]["operationId"],
            "replaceAppsV1NamespacedDeploymentScale"
        );
        assert_eq!(
            scale["put"]["x-kubernetes-group-version-kind"]["kind"],
            "Scale"
        );
        assert_eq!(
            scale["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/io.k8s.api.autoscaling.v1.Scale"
        );
        assert!(apps["components"]["schemas"]["io.k8s.api.autoscaling.v1.Scale"].is_object());
    }

    #[test]
    fn openapi_v3_index_points_at_every_group_version() {
        let index = openapi_v3_index();
        let paths = index["paths"].as_object().unwrap();
        let keys: Vec<&str> = paths.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6);
        for key in [
            "api/v1",
            "apis/apps/v1",
            "apis/batch/v1",
            "apis/coordination.k8s.io/v1",
            "apis/discovery.k8s.io/v1",
            "apis/apiextensions.k8s.io/v1",
        ] {
            let url = paths[key]["serverRelativeURL"].as_str().unwrap();
            assert!(
                url.starts_with(&format!("/openapi/v3/{key}?hash=")),
                "{url}"
            );
        }
        assert_eq!(index, openapi_v3_index(), "stable across calls");
    }

    #[test]
    fn openapi_v2_protobuf_is_a_minimal_document() {
        let pb = openapi_v2_protobuf();
        // swagger = "2.0" (field 1), then info (field 2) holding title and version.
        assert_eq!(&pb[..5], &[0x0a, 3, b'2', b'.', b'0']);
        assert_eq!(pb[5], 0x12);
        let info_len = usize::from(pb[6]);
        assert_eq!(&pb[7..9], &[0x0a, 10]);
        assert_eq!(&pb[9..19], b"Kubernetes");
        assert_eq!(pb[19], 0x12);
        assert_eq!(&pb[21..21 + GIT_VERSION.len()], GIT_VERSION.as_bytes());
        assert_eq!(7 + info_len, 21 + GIT_VERSION.len());
        // An empty paths message (field 8) ends the document.
        assert_eq!(&pb[pb.len() - 2..], &[0x42, 0]);
        let mut long = Vec::new();
        protobuf_bytes(&mut long, 1, &[0; 300]);
        assert_eq!(&long[..3], &[0x0a, 0xac, 0x02]);
    }

    #[test]
    fn openapi_v2_has_a_validating_patch_for_every_resource() {
        let doc = openapi_v2();
        assert_eq!(doc["swagger"], "2.0");
        for r in resources::builtin() {
            let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
            let op = patches(&doc)
                .into_iter()
                .find(|(_, op)| op["x-kubernetes-group-version-kind"] == gvk);
            let (_, op) = op.unwrap_or_else(|| panic!("{} patch", r.plural));
            assert!(
                op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == "fieldValidation")
            );
        }
    }
}
