//! The `scale` subresource: an `autoscaling/v1` `Scale` view of a resource's replica count, as
//! kube-apiserver serves it for deployments, replicasets and statefulsets (and for custom
//! resources whose CRD declares one: [`serve_with`] takes the paths).
//!
//! GET answers the Scale; PUT and PATCH change only `spec.replicas` of the object behind it, through
//! the same update path as a write of the whole object (so its generation moves, its validation
//! runs, and a `metadata.resourceVersion` in the Scale is a precondition: `kubectl scale
//! --current-replicas` reads the Scale, compares, and writes it back with that version).

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::patch::{self, PatchError, PatchType};
use super::request::ResourceRequest;
use super::status::{ApiError, Cause};
use super::verbs::{self, Api};
use super::workloads;

/// The Scale's API group.
pub const GROUP: &str = "autoscaling";
/// The Scale's API version.
pub const VERSION: &str = "v1";

/// How a resource's label selector reaches `status.selector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectorPath {
    /// A `metav1.LabelSelector` object at this JSON pointer (built-in kinds: `/spec/selector`),
    /// printed as a selector string.
    LabelSelector(String),
    /// A string at this JSON pointer, taken as it is (a CRD's `labelSelectorPath`).
    Text(String),
}

/// Where an object keeps what its Scale shows, as JSON pointers (`/spec/replicas`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub selector: Option<SelectorPath>,
}

impl ScalePaths {
    /// The paths of a CRD's `subresources.scale` (`.spec.replicas` style JSON paths).
    pub fn from_json_paths(
        spec_replicas: &str,
        status_replicas: &str,
        label_selector: Option<&str>,
    ) -> Self {
        ScalePaths {
            spec_replicas: pointer_of(spec_replicas),
            status_replicas: pointer_of(status_replicas),
            selector: label_selector.map(|p| SelectorPath::Text(pointer_of(p))),
        }
    }
}

/// `.spec.replicas` → `/spec/replicas`.
fn pointer_of(json_path: &str) -> String {
    json_path
        .trim_start_matches('.')
        .split('.')
        .map(|part| format!("/{part}"))
        .collect()
}

/// The scale paths of the built-in resources that have a `scale` subresource.
pub fn builtin_paths(plural: &str) -> Option<ScalePaths> {
    match plural {
        "deployments" | "replicasets" | "statefulsets" => Some(ScalePaths {
            spec_replicas: "/spec/replicas".into(),
            status_replicas: "/status/replicas".into(),
            selector: Some(SelectorPath::LabelSelector("/spec/selector".into())),
        }),
        _ => None,
    }
}

/// The `Scale` of `object`.
pub fn scale_of(object: &Value, paths: &ScalePaths) -> Value {
    let replicas = |pointer: &str| object.pointer(pointer).and_then(Value::as_i64).unwrap_or(0);
    let mut metadata = serde_json::Map::new();
    for key in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(value) = object["metadata"].get(key) {
            metadata.insert(key.into(), value.clone());
        }
    }
    let mut status = json!({"replicas": replicas(&paths.status_replicas)});
    let selector = match &paths.selector {
        Some(SelectorPath::LabelSelector(p)) => {
            workloads::selector_string(object.pointer(p).unwrap_or(&Value::Null))
        }
        Some(SelectorPath::Text(p)) => object
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    };
    if !selector.is_empty() {
        status["selector"] = json!(selector);
    }
    json!({
        "kind": "Scale",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": metadata,
        "spec": {"replicas": replicas(&paths.spec_replicas)},
        "status": status,
    })
}

/// `object` with the replica count a Scale asks for; the Scale's causes if it is invalid.
fn scaled(
    object: &Value,
    paths: &ScalePaths,
    scale: &Value,
    name: &str,
) -> Result<Value, ApiError> {
    let invalid = |message: String| {
        ApiError::invalid(
            "Scale.autoscaling",
            name,
            vec![Cause {
                field: "spec.replicas".into(),
                message,
            }],
        )
    };
    let replicas = match &scale["spec"]["replicas"] {
        Value::Null => 0,
        Value::Number(n) => match n.as_i64() {
            Some(n) if n >= 0 && n <= i64::from(i32::MAX) => n,
            Some(n) if n < 0 => {
                return Err(invalid(format!(
                    "Invalid value: {n}: must be greater than or equal to 0"
                )));
            }
            _ => return Err(invalid(format!("Invalid value: {n}: must be an int32"))),
        },
        other => {
            return Err(invalid(format!(
                "Invalid value: {other}: must be an integer"
            )));
        }
    };
    let mut new = object.clone();
    let (parent, field) = paths
        .spec_replicas
        .rsplit_once('/')
        .unwrap_or(("", paths.spec_replicas.as_str()));
    let slot = if parent.is_empty() {
        Some(&mut new)
    } else {
        new.pointer_mut(parent)
    };
    match slot {
        Some(Value::Object(map)) => {
            map.insert(field.to_string(), json!(replicas));
        }
        _ => {
            return Err(ApiError::internal(format!(
                "the object has no {} to scale",
                paths.spec_replicas
            )));
        }
    }
    Ok(new)
}

fn scale_response(value: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Serves `GET`, `PUT` and `PATCH` of `{plural}/{name}/scale` for a built-in resource.
pub async fn serve(
    api: &Arc<Api>,
    method: Method,
    request: &ResourceRequest,
    headers: &HeaderMap,
    body: &Bytes,
    manager: &str,
) -> Result<Response, ApiError> {
    let paths = builtin_paths(request.info.plural)
        .ok_or_else(|| ApiError::no_route(&format!("{}/scale", request.info.plural)))?;
    serve_with(api, &paths, method, request, headers, body, manager).await
}

/// [`serve`] for any resource whose objects keep their replicas at `paths`.
pub async fn serve_with(
    api: &Arc<Api>,
    paths: &ScalePaths,
    method: Method,
    request: &ResourceRequest,
    headers: &HeaderMap,
    body: &Bytes,
    manager: &str,
) -> Result<Response, ApiError> {
    let info = request.info;
    let Some(name) = request.name.as_deref() else {
        return Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {}/scale collections",
            info.plural
        )));
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let patch_type = if method == Method::PATCH {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Some(PatchType::from_content_type(content_type).ok_or_else(|| {
            ApiError::unsupported_media_type(format!(
                "the patch content type {content_type:?} is not supported"
            ))
        })?)
    } else {
        None
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let current = verbs::load(api, info, &namespace, name).await?;
        let scale = scale_of(&current, paths);
        let (wanted, expected) = match method {
            Method::GET => return Ok(scale_response(&scale)),
            Method::PUT => {
                let wanted = verbs::parse_body(body)?;
                if let Some(given) = wanted["metadata"]["name"].as_str()
                    && !given.is_empty()
                    && given != name
                {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({given}) does not match the name on the URL ({name})"
                    )));
                }
                let expected = match wanted["metadata"]["resourceVersion"].as_str() {
                    None | Some("") => None,
                    Some(text) => Some(text.parse::<u64>().map_err(|_| {
                        ApiError::bad_request(format!(
                            "metadata.resourceVersion: Invalid value: {text:?}: must be an unsigned decimal integer"
                        ))
                    })?),
                };
                (wanted, expected)
            }
            Method::PATCH => {
                let patch_type = patch_type.unwrap_or(PatchType::Merge);
                let wanted =
                    patch::apply(patch_type, "Scale", &scale, body).map_err(|e| match e {
                        PatchError::Malformed(m) => ApiError::bad_request(m),
                        PatchError::Failed(m) => ApiError::invalid(
                            "Scale.autoscaling",
                            name,
                            vec![Cause {
                                field: "patch".into(),
                                message: m,
                            }],
                        ),
                        PatchError::Unsupported(m) => ApiError::unsupported_media_type(m),
                    })?;
                let expected = current["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok());
                (wanted, expected)
            }
            _ => {
                return Err(ApiError::method_not_allowed(format!(
                    "{method} is not supported on {}/scale",
                    info.plural
                )));
            }
        };
        let new = scaled(&current, paths, &wanted, name)?;
        // Written as an update of the object itself (`scale` is not `status`): generation,
        // defaults and validation apply.
        match verbs::write_update(
            api,
            request,
            name,
            &current,
            new,
            expected,
            verbs::Ownership::Update(manager),
        )
        .await
        {
            Err(e) if e.reason == "Conflict" && method == Method::PATCH && attempts < 5 => continue,
            Err(e) => return Err(e),
            Ok(written) => return Ok(scale_response(&scale_of(&written, paths))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1", "resourceVersion": "7", "labels": {"x": "y"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web", "tier": "front"}}},
            "status": {"replicas": 1}
        })
    }

    #[test]
    fn a_deployment_reads_as_a_scale() {
        let paths = builtin_paths("deployments").expect("deployments scale");
        let scale = scale_of(&deployment(), &paths);
        assert_eq!(
            scale,
            json!({
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {"name": "web", "namespace": "ns", "uid": "u1", "resourceVersion": "7"},
                "spec": {"replicas": 2},
                "status": {"replicas": 1, "selector": "app=web,tier=front"}
            })
        );
        assert!(builtin_paths("daemonsets").is_none());
    }

    #[test]
    fn a_scale_changes_only_the_replicas() {
        let paths = builtin_paths("deployments").expect("deployments scale");
        let new = scaled(
            &deployment(),
            &paths,
            &json!({"spec": {"replicas": 5}}),
            "web",
        )
        .expect("valid");
        let mut want = deployment();
        want["spec"]["replicas"] = json!(5);
        assert_eq!(new, want);
        let e = scaled(
            &deployment(),
            &paths,
            &json!({"spec": {"replicas": -1}}),
            "web",
        )
        .expect_err("negative");
        assert_eq!(e.reason, "Invalid");
        assert_eq!(e.causes()[0].field, "spec.replicas");
        assert!(
            e.message
                .starts_with("Scale.autoscaling \"web\" is invalid"),
            "{}",
            e.message
        );
    }

    #[test]
    fn crd_paths_become_pointers() {
        let paths =
            ScalePaths::from_json_paths(".spec.size", ".status.size", Some(".status.selector"));
        let object = json!({"metadata": {"name": "c"}, "spec": {"size": 3}, "status": {"size": 2, "selector": "a=b"}});
        let scale = scale_of(&object, &paths);
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"], json!({"replicas": 2, "selector": "a=b"}));
    }
}
